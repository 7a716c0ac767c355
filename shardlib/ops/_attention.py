"""Rules for attention: `F.scaled_dot_product_attention` as the CPU kernel reaches it.

Owns ``_scaled_dot_product_flash_attention_for_cpu`` and its backward (what
`F.scaled_dot_product_attention` reaches on CPU in torch 2.13, traced with a
`TorchDispatchMode`; grouped-query attention, ``enable_gqa=True`` with fewer
key/value heads, reaches the same kernel with the key/value tensors holding
``kv_heads`` heads: query head ``j`` reads key/value head ``j // g``, ``g =
heads // kv_heads``), and ``_safe_softmax`` (the math path's softmax over
keys). It does not own the views and matmuls of the math attention path
(`_views.py`, `_contractions.py`), nor ring attention (a `sl.shard_map`
kernel in `shardlib/nn/_ring.py`). Split out of `_nn.py`.

Layouts are (B, H, L, E) for the query and the output, (B, H_kv, S, E) for key
and value, (B, H, L) for logsumexp. The candidates, in preference order (the
dispatcher prices them by the bytes of the input moves; A = mesh axes):

- **the query's split** (B, H, L) with key/value split like it on (B, H) and
  unsplit on S: batch and head splits are local; a query-sequence split runs
  each query chunk against the whole key/value sequence (K/V gathered if they
  were sequence split: "sequence sharded: correct, by gathering K/V"), and the
  gradients of key and value come out partial-``sum`` over the sequence axes;
- **the keys' split** (B, H) with the query's sequence unsplit;
- **heads-split (Ulysses)**: for q (or k) whose sequence dim is split over A,
  the heads dim split over A as well (after its own head axes) and the
  sequence unsplit: the planner moves each of q, k, v by one all-to-all,
  output and logsumexp (forward) and dq, dk, dv (backward) come out
  heads-split, so a pinned round trip (q, k, v `sl.with_layout` to heads-split,
  the output back to sequence-split, what `snn.attention` does under
  `snn.ulysses`) is exactly four all-to-alls forward, (P-1)/P^2 * b*s*d*(2H +
  2H_kv) elements per device, and four backward (grad_out in, dq, dk, dv out).
  The dispatcher prices input moves only, but this candidate also changes the
  layout of the outputs; so it is offered for sequence-split inputs only when
  its input moves *plus* the moves of its outputs back to the inputs' own
  layouts cost strictly less than those of every other candidate (at P = 2
  gathering K/V is as cheap and stays the choice);
- nothing split.

The head dim is unsplit. A causal mask is rebuilt per query chunk from global
positions (top-left aligned, as torch's ``is_causal``); an attention mask is
cut like the query's (B, H, L) splits. Dropout inside the fused op is refused
(the math path, taken with dropout, reaches ``bernoulli_``).

**Heads split over A (Ulysses and grouped-query attention).** Heads are cut
the torch.chunk way, uneven chunks legal (a head count |A| does not divide is
padded inside the all-to-all, to the largest chunk, and the padding is in the
ledger's bytes). With grouped-query attention a device's query heads must use
its own key/value heads: chunk c of the query heads must be exactly ``g`` times
chunk c of the key/value heads ("the chunks line up"; true when |A| divides
kv_heads, and for some other sizes, e.g. 10 heads, 5 kv heads on 3 devices).
Where they don't line up, no heads-split candidate over A is offered, and a
query and key both split over the same head axes raise a `LayoutError` that
names heads, kv_heads, the axes and their size, and the fixes (pad the head
counts to a multiple, choose an axis size dividing kv_heads, or use ring
attention): never a silently wrong grouping (DeepSpeed shipped both that and a
silent failure). Zero-padding inside the op was not chosen: a padded head
count would change the global shapes the dispatcher reasons about.

Invariant: every strategy is exact for uneven shapes (empty chunks included)
and for every partial input it keeps; anything else is reduced first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from .._errors import LayoutError, NoRuleError
from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh
from ..layouts._planner import plan
from ..layouts._shard import chunk_bounds, local_bounds
from ._nn import Dims, _axes, _bind, _in_order, _kept_partial, _unique
from ._rules import ArgSpec, RuleInput, Strategy, register_rule

aten = torch.ops.aten

# == attention =================================================================
_SDPA = aten._scaled_dot_product_flash_attention_for_cpu.default
_SDPA_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _mask_layout(mask: ArgSpec, bhl: Dims, full: tuple[int, ...]) -> Layout:
    """An attention mask broadcast to (B, H, L, S): cut like the query's B, H, L splits."""
    off = 4 - mask.ndim
    dims = []
    for d, n in enumerate(mask.shape):
        j = d + off
        dims.append(bhl[j] if j < 3 and n == full[j] and n != 1 else ())
    return Layout(tuple(dims))


def _misaligned(heads: int, kv_heads: int, k: int) -> int | None:
    """The first chunk (of `k`) whose query heads are not `g` x its key/value heads, or None.

    >>> _misaligned(8, 4, 4), _misaligned(10, 5, 3), _misaligned(6, 3, 2), _misaligned(3, 3, 2)
    (None, None, 0, None)
    """
    if heads == kv_heads or k == 1:
        return None
    g = heads // kv_heads if kv_heads else 0
    for c in range(k):
        lo, hi = chunk_bounds(kv_heads, k, c)
        if chunk_bounds(heads, k, c) != (g * lo, g * hi):
            return c
    return None


def _lines_up(q: ArgSpec, k: ArgSpec, axes: tuple[str, ...], mesh: AbstractMesh) -> bool:
    return _misaligned(q.shape[1], k.shape[1], mesh.group_size(axes)) is None


def _check_groups(op: Any, q: ArgSpec, k: ArgSpec, mesh: AbstractMesh) -> None:
    """Raise when q and k split their heads over the same axes in chunks that don't line up."""
    axes = q.layout.dims[1]
    if not axes or k.layout.dims[1] != axes:
        return
    heads, kv_heads, n = q.shape[1], k.shape[1], mesh.group_size(axes)
    c = _misaligned(heads, kv_heads, n)
    if c is None:
        return
    g = heads // kv_heads
    qlo, qhi = chunk_bounds(heads, n, c)
    klo, khi = chunk_bounds(kv_heads, n, c)
    padded = n * -(-kv_heads // n)
    raise LayoutError(
        f"{op} (F.scaled_dot_product_attention, grouped-query): query heads={heads} and "
        f"kv_heads={kv_heads} are both split over {axes} (size {n}), and their chunks do not "
        f"line up: device chunk {c} holds query heads [{qlo}, {qhi}) and key/value heads "
        f"[{klo}, {khi}), whose query heads are [{g * klo}, {g * khi}) (query head j reads "
        f"kv head j // g, g = heads // kv_heads = {g}). Each device's query heads must use its "
        f"own key/value heads, so chunk c of the query heads must be g times chunk c of the "
        f"kv heads, which holds when the axis size divides kv_heads. Fix: choose a mesh axis "
        f"size dividing kv_heads={kv_heads}; or pad kv_heads with zero heads to {padded} and "
        f"heads to {g * padded} (the padded query heads last), dropping their output after; "
        "or use ring attention (snn.ring), which splits the sequence and keeps every head on "
        "every device."
    )


def _sdpa_choices(q: ArgSpec, k: ArgSpec, mesh: AbstractMesh) -> list[Dims]:
    """Candidate (B, H, L) splits: the query's, the keys', none (head splits that line up)."""
    same_b = q.shape[0] == k.shape[0]
    found = []
    for src in (q.layout.dims, k.layout.dims[:2] + ((),)):
        b = src[0] if same_b else ()
        h = src[1] if _lines_up(q, k, src[1], mesh) else ()
        found.append((b, h, src[2]))
    return _unique([*found, ((), (), ())])


def _heads_choices(q: ArgSpec, k: ArgSpec, mesh: AbstractMesh) -> list[Dims]:
    """Ulysses candidates: a sequence split of q (or k) over A moved onto the heads dim."""
    same_b = q.shape[0] == k.shape[0]
    found = []
    for src in (q.layout.dims, k.layout.dims):
        seq, heads = src[2], src[1] + src[2]
        if seq and _lines_up(q, k, heads, mesh):
            found.append((src[0] if same_b else (), heads, ()))
    return _unique(found)


def _query_chunk(func: Any, shape: tuple[int, ...], s_len: int, layout: Layout, mesh: Any):
    """`func` on a query chunk: a causal mask is rebuilt from the chunk's global rows
    (top-left aligned, as torch's `is_causal`) where the chunk is part of the sequence (a
    whole sequence keeps `is_causal`: the same mask, and the kernel skips the masked
    blocks), and an empty chunk skips the kernel
    (the CPU kernel dies of SIGFPE on zero query rows or heads)."""
    names = [a.name for a in func._schema.arguments if not a.kwarg_only]

    def local(device: int, *args: Any, **kwargs: Any):
        b = _bind(func, args, kwargs)
        q = b["query"]
        if q.numel() == 0:
            if func is _SDPA_BACKWARD:  # no query: no gradient anywhere
                return tuple(torch.zeros_like(b[n]) for n in ("query", "key", "value"))
            metas = {n: b[n].to("meta") for n in ("query", "key", "value")}
            outs = func(metas["query"], metas["key"], metas["value"], scale=b["scale"])
            return tuple(torch.empty(o.shape, dtype=o.dtype, device=q.device) for o in outs)
        if b["is_causal"]:
            lo, hi = local_bounds(shape, layout, mesh, device)[2]
        if b["is_causal"] and hi - lo != shape[2]:  # a chunk of the sequence: its own rows
            rows = torch.arange(lo, hi, device=q.device).unsqueeze(1)
            allowed = torch.arange(s_len, device=q.device).unsqueeze(0) <= rows
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            b["is_causal"], b["attn_mask"] = False, mask.masked_fill_(~allowed, -math.inf)
        return func(*(b[n] for n in names), attn_mask=b["attn_mask"], scale=b["scale"])

    return local


def _strategy(ri: RuleInput, b: dict[str, Any], bhl: Dims) -> Strategy:
    """The strategy that cuts the query (B, H, L) by `bhl`, key/value by its (B, H)."""
    q, k, mask = b["query"], b["key"], b["attn_mask"]
    seq = bhl[2]
    q_layout = Layout((*bhl, ()))
    kv_layout = Layout((*bhl[:2], (), ()))
    want = {"query": q_layout, "key": kv_layout, "value": kv_layout}
    grads: tuple[Layout, ...] = ()
    if ri.op is _SDPA_BACKWARD:
        kept = _kept_partial(b["grad_out"].layout, _axes(bhl))
        want["grad_out"] = Layout(q_layout.dims, kept.partial)
        want["out"] = q_layout
        want["logsumexp"] = Layout(bhl)
        kv_grad = Layout(kv_layout.dims, seq + kept.partial)
        grads = (Layout(q_layout.dims, kept.partial), kv_grad, kv_grad)
    if isinstance(mask, ArgSpec):
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        want["attn_mask"] = _mask_layout(mask, bhl, full)
    outs = grads or (q_layout, Layout(bhl))
    local = _query_chunk(ri.op, q.shape, k.shape[2], q_layout, ri.mesh)
    return Strategy(_in_order(ri, want), outs, local=local, local_device=True)


def _round_trip(ri: RuleInput, b: dict[str, Any], s: Strategy) -> int:
    """Bytes of `s`'s input moves plus its outputs' moves back to the inputs' own layouts."""
    q = b["query"].layout.without_partial()
    if ri.op is _SDPA_BACKWARD:
        homes = (q, b["key"].layout.without_partial(), b["value"].layout.without_partial())
    else:
        homes = (q, Layout(q.dims[:3]))
    total = sum(
        plan(t.layout, want, t.shape, ri.mesh, t.dtype).total_bytes
        for t, want in zip(ri.tensors, s.inputs)
    )
    return total + sum(
        plan(got, home, o.shape, ri.mesh, o.dtype).total_bytes
        for o, got, home in zip(ri.outputs, s.outputs, homes)
    )


@register_rule(_SDPA, _SDPA_BACKWARD)
def sdpa_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Batch/head splits local; query sequence split against whole K/V; or heads-split (Ulysses).

    See the module docstring for the candidates and the grouped-query rule.
    """
    b = _bind(ri.op, ri.args, ri.kwargs)
    q, k = b["query"], b["key"]
    if b["dropout_p"]:
        raise NoRuleError(
            f"{ri.op}: dropout inside the fused attention kernel cannot draw layout-independent "
            "random numbers. Call F.scaled_dot_product_attention with dropout_p=0 and apply "
            "F.dropout to the attention weights yourself (the math path), or use sl.shard_map."
        )
    if q.ndim != 4 or k.ndim != 4:  # (B, H, L, E) is what the CPU kernel takes; else replicate
        yield Strategy(
            tuple(Layout(((),) * s.ndim) for s in ri.tensors),
            tuple(Layout(((),) * o.ndim) for o in ri.outputs),
        )
        return
    _check_groups(ri.op, q, k, ri.mesh)
    plain = _sdpa_choices(q, k, ri.mesh)
    found = [_strategy(ri, b, bhl) for bhl in plain]
    heads = [bhl for bhl in _heads_choices(q, k, ri.mesh) if bhl not in plain]
    if heads:
        best = min(_round_trip(ri, b, s) for s in found)
        for bhl in heads:
            s = _strategy(ri, b, bhl)
            if _round_trip(ri, b, s) < best:
                found.append(s)
    yield from found


@register_rule(aten._safe_softmax.default)
def safe_softmax_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Local over an unsplit dim (the math attention path's softmax over keys)."""
    x = ri.tensors[0]
    dim = _bind(ri.op, ri.args, ri.kwargs)["dim"] % x.ndim
    dims = list(x.layout.dims)
    dims[dim] = ()
    yield Strategy((Layout(tuple(dims)),), (Layout(tuple(dims)),))
