"""The rule framework: abstract inputs, strategies, and the rule registry.

A rule is a pure function from abstract inputs (global shapes, dtypes,
layouts, the op's non-tensor arguments) to candidate strategies: for each
tensor input the layout it must have, and for each tensor output the layout it
gets. It never touches tensor data or process groups, so it is testable with
no devices. The dispatcher (`_dispatch.py`) prices every candidate by the
planner's bytes for the implied redistributions and runs the cheapest; ties
go to the earlier candidate, so rules list candidates in preference order.

Rule families live one module per family (`_pointwise.py`,
`_contractions.py`, ...), each registering into this table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh

__all__ = ["ArgSpec", "RuleInput", "Strategy", "register_rule", "register_tag_rule", "rule_for"]


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """A tensor seen by a rule: global shape, dtype and current layout (None for outputs).

    Outputs also carry torch's global strides and storage offset for the result (what the
    op gives on plain tensors), which the sharded result reports.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: Layout | None = None
    stride: tuple[int, ...] | None = field(default=None, compare=False)
    offset: int = field(default=0, compare=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True, slots=True)
class Strategy:
    """Required input layouts (one per tensor input, flat order) and output layouts.

    `outputs` has one layout per tensor output (flat order). `local`, when
    given, replaces the op on each device's shards: ``local(*args, **kwargs)``
    with the same argument structure (used by rules whose local computation
    differs from the global one, e.g. a mean over a split dim).

    `decompose`, when given, replaces the whole op: it is called with the
    original arguments (ShardedTensors included) after the inputs were moved
    to `inputs`, and computes the result from other ops, each dispatched by
    its own rule (DESIGN §6 decompositions: softmax over a split dim, var, ...).
    Its collectives are in the ledger and strict mode sees them; `outputs` is
    then informational and may be empty.
    """

    inputs: tuple[Layout, ...]
    outputs: tuple[Layout, ...] = ()
    local: Callable | None = field(default=None, compare=False)
    decompose: Callable | None = field(default=None, compare=False)
    # With `local_device=True`, `local` is called as ``local(device, *args, **kwargs)``,
    # `device` being the flat mesh index of the shard (e.g. a vocabulary chunk's offset).
    local_device: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class RuleInput:
    """What a rule sees: the op, the mesh, arguments with tensors as `ArgSpec`s."""

    op: Any
    mesh: AbstractMesh
    args: tuple
    kwargs: dict
    tensors: tuple[ArgSpec, ...]
    outputs: tuple[ArgSpec, ...]


Rule = Callable[[RuleInput], Iterable[Strategy]]
_RULES: dict[Any, Rule] = {}


def register_rule(*ops: Any) -> Callable[[Rule], Rule]:
    """Register a rule for aten overloads (or whole overload packets).

    Examples:
        >>> import torch
        >>> from shardlib.ops import register_rule, Strategy
        >>> @torch.library.custom_op("shardlib_doc::sign", mutates_args=())
        ... def sign(t: torch.Tensor) -> torch.Tensor:
        ...     return torch.sgn(t)
        >>> _ = sign.register_fake(lambda t: torch.empty_like(t))
        >>> @register_rule(torch.ops.shardlib_doc.sign.default)
        ... def sign_rule(ri):
        ...     (x,) = ri.tensors
        ...     yield Strategy((x.layout.without_partial(),), (x.layout.without_partial(),))
    """

    def deco(fn: Rule) -> Rule:
        for op in ops:
            _RULES[op] = fn
        return fn

    return deco


_TAG_RULES: dict[Any, Rule] = {}


def register_tag_rule(tag: Any) -> Callable[[Rule], Rule]:
    """Register a rule for every op carrying a `torch.Tag` (e.g. `torch.Tag.pointwise`)."""

    def deco(fn: Rule) -> Rule:
        _TAG_RULES[tag] = fn
        return fn

    return deco


def rule_for(op: Any) -> Rule | None:
    """The rule of an overload: its own, its packet's, or its tag's (first match)."""
    rule = _RULES.get(op) or _RULES.get(getattr(op, "overloadpacket", None))
    if rule is None:
        for tag in getattr(op, "tags", ()):
            if tag in _TAG_RULES:
                return _TAG_RULES[tag]
    return rule
