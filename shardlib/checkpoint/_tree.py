"""Checkpoint keys: how a pytree of training state becomes DCP's flat, dotted keys.

Owns the leaf rule shared by `save` and `load` and the key (FQN) of each leaf.
It does not touch tensors' data or files.

The rule follows torch.distributed.checkpoint's own flattening
(`_traverse.traverse_state_dict`) so that a plain `dcp.load` of nested dicts
finds our entries under the keys it computes itself:

- a mapping is always descended into, key ``str(k)``;
- a list or tuple (NamedTuples too) that holds a tensor or a mapping somewhere
  inside is descended into, key the index (a NamedTuple's key is the field
  name); NamedTuples are always descended into (an optimizer state);
- anything else is a leaf: tensors, ``None``, numbers, strings, and lists or
  tuples of those (``random.getstate()`` is one leaf, as in DCP).

A leaf's key is its path joined by ``"."``: ``{"params": {"wq": t}}`` is
``"params.wq"``, ``{"opt": [s0, s1]}`` gives ``"opt.0"``, ``"opt.1"``.

Invariants: keys are unique within one tree (two paths that join to the same
string are an error, not an overwrite); `flatten` and the tree it came from
rebuild each other with `torch.utils._pytree.tree_unflatten`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ._errors import CheckpointError

__all__ = ["Leaf", "flatten", "is_target"]


class Leaf(NamedTuple):
    """One leaf of a checkpointed tree: its DCP key, its path parts and its value."""

    key: str
    path: tuple[str | int, ...]
    value: Any


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _holds_tensor_or_mapping(x: Any) -> bool:
    if isinstance(x, torch.Tensor | Mapping):
        return True
    if isinstance(x, list | tuple):
        return any(_holds_tensor_or_mapping(v) for v in x)
    return False


def is_target(x: Any) -> bool:
    """A `(mesh, layout)` pair standing for a sharded tensor in `load`'s `like`."""
    return (
        isinstance(x, tuple)
        and not _is_namedtuple(x)
        and len(x) == 2
        and isinstance(x[0], Mesh)
        and isinstance(x[1], Layout)
    )


def _is_leaf(x: Any) -> bool:
    if x is None or is_target(x):
        return True
    if _is_namedtuple(x) or isinstance(x, Mapping):
        return False
    if isinstance(x, list | tuple):
        return not _holds_tensor_or_mapping(x)
    return False  # pytree decides: tensors and other non-containers are its leaves


def _part(entry: Any) -> str | int:
    if isinstance(entry, pytree.MappingKey):
        return str(entry.key)  # DCP's traversal: mapping keys are strings, indices ints
    if isinstance(entry, pytree.SequenceKey):
        return entry.idx
    if isinstance(entry, pytree.GetAttrKey):
        return entry.name
    return str(entry)


def flatten(tree: Any, where: str) -> tuple[list[Leaf], Any]:
    """The leaves of `tree` with their DCP keys, and the tree's structure.

    Examples:
        >>> import torch
        >>> leaves, _ = flatten({"params": {"w": torch.ones(2)}, "step": 3, "rng": [1, 2]}, "x")
        >>> [(leaf.key, leaf.path) for leaf in leaves]
        [('params.w', ('params', 'w')), ('step', ('step',)), ('rng', ('rng',))]
    """
    pairs, spec = pytree.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    leaves: list[Leaf] = []
    seen: dict[str, str] = {}
    clashes = []
    for keypath, value in pairs:
        path = tuple(_part(e) for e in keypath)
        key = ".".join(map(str, path)) if path else ""
        shown = pytree.keystr(keypath) or "<root>"
        if key in seen:
            clashes.append(f"{seen[key]} and {shown} are both {key!r}")
        seen[key] = shown
        leaves.append(Leaf(key, path, value))
    if clashes:
        raise CheckpointError(
            f"{where}: two entries of the tree get the same checkpoint key ("
            + "; ".join(clashes)
            + "). Keys are the path joined by '.', as torch.distributed.checkpoint "
            "flattens a state dict; rename a dict key that contains '.' or that "
            "repeats a sibling's index."
        )
    if any(leaf.key == "" for leaf in leaves):
        raise CheckpointError(
            f"{where}: the tree is a single leaf ({type(tree).__name__}); a checkpoint holds "
            'named entries. Wrap it in a dict, e.g. {"state": value}.'
        )
    return leaves, spec
