"""In-place accumulation of the gradients shardlib's own backward functions make.

When a tensor feeds several ops (a residual stream, the input of the q, k and v
projections), autograd's engine sums the gradients arriving for it in an input
buffer. For a plain tensor it adds in place when it holds the only reference
(``InputBuffer::accumulate``); for any tensor subclass it never does, and each
arrival costs a fresh activation-sized ``old + new`` (allocation, page faults,
a dispatch), which hand-written Megatron on plain tensors does not pay.

shardlib can tell when adding in place is as safe as torch's own rule: a
backward of ours (a contraction's, a gufunc's) made its gradient blocks itself
and hands them to the engine, which routes each output to one input buffer and
adds it there right after the node returns, while the node is still the engine's
current one. `offer` records those outputs; `claim` accepts the engine's
``old + new`` for one of them when

- grad mode is off (with ``create_graph=True`` the sum is part of a graph);
- the current autograd node is the one that offered it, and ``new`` is one of
  its outputs (the engine's own add, not a later op on the buffer's content);
- nothing else in Python holds ``new`` (a node hook that kept its
  ``grad_inputs`` raises the reference count) and its blocks alias neither
  ``old``'s nor one another's;

then each block of ``new`` gets ``old`` added in place (``new += old``: float
addition commutes, so the values are the out-of-place sum's, bit for bit) and
the dispatcher wraps those blocks as the sum. Anything else runs as before.

Invariant: an offer lasts until the next one; an output is claimed at most once.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["claim", "offer"]

_current_node = torch._C._current_autograd_node
# Python references to the engine's ``new`` while `claim` runs, when nothing outside holds
# it: the dispatcher's argument tuple, its loop variable, torch's own during
# ``__torch_dispatch__``, `claim`'s local and getrefcount's argument (tests check both ways:
# claimed alone, refused when a hook keeps it)
_EXPECTED_REFS = 5

_node: object = None
_ids: set[int] = set()


def _storages(t) -> list[int] | None:
    """The data pointers of `t`'s blocks; None where one is not a plain tensor with real
    memory (a fake or functional tensor while torch.compile traces the backward)."""
    if any(type(b) is not torch.Tensor for b in t._shards):
        return None
    return [b.untyped_storage().data_ptr() for b in t._shards]


def offer(node, grads, others=()) -> None:
    """`node` (the running backward's ctx) returns `grads` (ShardedTensors or None), whose
    blocks it allocated: they may be accumulated into in place, unless a block shares
    storage with another gradient's or with one of `others` (the cotangents and operands
    the backward read, which may pass through)."""
    global _node
    _ids.clear()
    _node = node
    taken: set[int] = set()
    for t in others:
        if t is not None:
            got = _storages(t)
            if got is None:
                return
            taken.update(got)
    for g in grads:
        if g is None:
            continue
        mine = _storages(g)
        if mine is None:
            return
        if (
            taken.isdisjoint(mine)
            and len(set(mine)) == len(mine)
            and all(b.is_contiguous() for b in g._shards)
        ):
            _ids.add(id(g))
        taken.update(mine)


def claim(args: tuple) -> bool:
    """Whether the engine's ``old + new`` (``args``; same layout, shape and dtype) may run as
    ``new += old`` block by block; consumes the offer of ``new``."""
    old, new = args
    if id(new) not in _ids or torch.is_grad_enabled() or _current_node() is not _node:
        return False
    _ids.discard(id(new))
    if sys.getrefcount(new) > _EXPECTED_REFS:
        return False
    return all(
        a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        for a, b in zip(old._shards, new._shards)
    )
