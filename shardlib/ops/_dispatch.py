"""Dispatch of aten ops on `ShardedTensor`s: rule lookup, pricing, redistribution, local run.

Owns the decision cache, the choice between a rule's candidate strategies
(least planner bytes, then the rule's order), strict mode, the opt-in
replicate fallback, and the "no rule" error. It does not own any rule: rule
families register into `_rules.py`.

Hot path: a decision is cached by (op, every argument's abstract signature,
mesh), so a repeated op costs one dict lookup, the redistributions it needs
(none, typically) and the local op on each shard.

Invariant: every collective issued here goes through `collectives.execute`,
so it is in the ledger with the op's name as cause.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._errors import LayoutError, MeshMismatchError, NoRuleError
from ..collectives._redistribute import execute
from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ..layouts._planner import plan
from ._rules import ArgSpec, RuleInput, Strategy, rule_for
from ._tensor import ShardedTensor

__all__ = ["allow_replicate_fallback", "dispatch", "strict"]

_state = {"strict": 0, "fallback": 0}


@contextlib.contextmanager
def strict() -> Iterator[None]:
    """Raise on any implicit communication inside the block.

    The error names the op, the layouts and the `sl.reshard` call that would
    make the communication explicit.
    """
    _state["strict"] += 1
    try:
        yield
    finally:
        _state["strict"] -= 1


@contextlib.contextmanager
def allow_replicate_fallback() -> Iterator[None]:
    """Let ops without a rule run by gathering every input, computing, and keeping a replica.

    The gathers are in the ledger (cause: the op's name); outputs are replicated.
    """
    _state["fallback"] += 1
    try:
        yield
    finally:
        _state["fallback"] -= 1


# == signatures and the decision cache =========================================
def _signature(a: Any) -> Any:
    if isinstance(a, ShardedTensor):
        return (a._layout, a.shape, a.dtype, a._mesh)
    if isinstance(a, torch.Tensor):
        return ("tensor", a.shape, a.dtype, a.device)
    if isinstance(
        a,
        int
        | float
        | bool
        | str
        | None
        | torch.dtype
        | torch.device
        | torch.memory_format
        | torch.layout,
    ):
        return (type(a), a)
    return ("object", id(a))  # not shared between calls; decisions for these are not reused


@dataclass(frozen=True, slots=True)
class _Decision:
    strategy: Strategy
    tensor_pos: tuple[int, ...]  # positions of tensor leaves among the flat arguments
    out_specs: tuple[ArgSpec, ...]
    inplace: bool


_DECISIONS: dict[tuple, _Decision] = {}
_DECISION_LIMIT = 65536


def dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    flat, spec = tree_flatten((args, kwargs))
    key = (func, *map(_signature, flat))
    decision = _DECISIONS.get(key)
    mesh = _mesh_of(func, flat)
    if decision is None:
        decision = _decide(func, flat, spec, mesh)
        if len(_DECISIONS) >= _DECISION_LIMIT:
            _DECISIONS.clear()
        _DECISIONS[key] = decision
    return _run(func, decision, flat, spec, mesh)


def _mesh_of(func: Any, flat: list) -> Mesh:
    meshes = []
    for a in flat:
        if isinstance(a, ShardedTensor) and a._mesh not in meshes:
            meshes.append(a._mesh)
    if len(meshes) > 1:
        raise MeshMismatchError(
            f"{func}: its inputs live on unequal meshes "
            + ", ".join(repr(m) for m in meshes)
            + ". Put all operands on one mesh (the same sl.Mesh) before combining them."
        )
    return meshes[0]


# == deciding ==================================================================
def _meta(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.empty(a.shape, dtype=a.dtype, device="meta")
    return a


def _decide(func: Any, flat: list, spec: Any, mesh: Mesh) -> _Decision:
    tensor_pos = tuple(i for i, a in enumerate(flat) if isinstance(a, torch.Tensor))
    specs = []
    for i in tensor_pos:
        a = flat[i]
        layout = a._layout if isinstance(a, ShardedTensor) else Layout(((),) * a.ndim)
        specs.append(ArgSpec(tuple(a.shape), a.dtype, layout))
    out_specs = _output_specs(func, flat, spec)
    abstract = [
        ArgSpec(tuple(a.shape), a.dtype, specs[tensor_pos.index(i)].layout)
        if isinstance(a, torch.Tensor)
        else a
        for i, a in enumerate(flat)
    ]
    a_args, a_kwargs = tree_unflatten(abstract, spec)
    ri = RuleInput(func, mesh.abstract, tuple(a_args), dict(a_kwargs), tuple(specs), out_specs)
    inplace = _is_inplace(func)
    if inplace and not (tensor_pos and isinstance(flat[tensor_pos[0]], ShardedTensor)):
        raise LayoutError(
            f"{func}: an in-place op on a plain tensor with sharded operands; the result would "
            "be sharded. Use the out-of-place op, or x.full() to get a plain operand."
        )
    rule = rule_for(func)
    if rule is None:
        if not _state["fallback"]:
            raise NoRuleError(_no_rule_message(func, specs))
        candidates = [_replicate_everything(ri)]
    else:
        candidates = list(rule(ri))
    if inplace:
        self_layout = specs[0].layout
        kept = [c for c in candidates if c.inputs[0] == self_layout and c.outputs[0] == self_layout]
        if not kept:
            raise LayoutError(
                f"{func}: this in-place op would change the layout of its first operand "
                f"{self_layout!r} (shape {specs[0].shape}); in-place ops keep layouts. Use the "
                f"out-of-place op, or sl.reshard the operands first (layouts: "
                f"{', '.join(repr(s.layout) for s in specs)})."
            )
        candidates = kept
    if not candidates:
        raise LayoutError(
            f"{func}: no valid layout for inputs {', '.join(f'{s.layout!r} {s.shape}' for s in specs)}. "
            "sl.reshard the inputs to a layout the op accepts (e.g. replicated)."
        )
    best, best_cost = None, None
    for c in candidates:
        cost = sum(
            plan(s.layout, want, s.shape, mesh.abstract, s.dtype).total_bytes
            for s, want in zip(specs, c.inputs)
        )
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
    return _Decision(best, tensor_pos, out_specs, inplace)


def _output_specs(func: Any, flat: list, spec: Any) -> tuple[ArgSpec, ...]:
    m_args, m_kwargs = tree_unflatten([_meta(a) for a in flat], spec)
    try:
        out = func(*m_args, **m_kwargs)
    except NotImplementedError as e:  # an op without a meta kernel (others: torch's own error)
        raise NoRuleError(
            f"{func}: shardlib infers output shapes on the meta device and this op has no meta "
            f"kernel ({type(e).__name__}: {e}). Compute it on x.full() or in sl.shard_map."
        ) from None
    leaves, _ = tree_flatten(out)
    return tuple(ArgSpec(tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor))


def _is_inplace(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    return bool(
        schema
        and schema.arguments
        and schema.arguments[0].alias_info
        and schema.arguments[0].alias_info.is_write
    )


def _replicate_everything(ri: RuleInput) -> Strategy:
    return Strategy(
        tuple(Layout(((),) * s.ndim) for s in ri.tensors),
        tuple(Layout(((),) * s.ndim) for s in ri.outputs),
    )


def _no_rule_message(func: Any, specs: list[ArgSpec]) -> str:
    layouts = ", ".join(f"{s.layout!r} {s.shape}" for s in specs)
    return (
        f"shardlib has no layout rule for {func} (inputs: {layouts}). Fixes: compute on the "
        "global value with x.full(), or per device with sl.shard_map; opt into "
        "gather-compute-keep-replica with `with sl.allow_replicate_fallback():` (recorded in "
        "the ledger); or add a rule: `@shardlib.ops.register_rule(torch.ops.aten.<op>)` on a "
        "function of a RuleInput that yields Strategy(input_layouts, output_layouts)."
    )


# == running ===================================================================
def _direction() -> str:
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


def _move(func: Any, a: ShardedTensor, want: Layout) -> ShardedTensor:
    p = plan(a._layout, want, tuple(a.shape), a._mesh, a.dtype)
    if _state["strict"] and any(s.step.kind for s in p.steps):
        steps = ", ".join(f"{s.step} ({s.bytes} B)" for s in p.steps if s.step.kind)
        raise LayoutError(
            f"sl.strict: {func} needs communication: an input of shape {tuple(a.shape)} with "
            f"layout {a._layout!r} must become {want!r} ({steps}). Fix: make it explicit with "
            f"`x = sl.reshard(x, {want!r})` before the op, or leave strict mode."
        )
    shards = execute(p, a._mesh, a._shards, direction=_direction(), cause=_cause(func))
    return ShardedTensor(shards, a._mesh, want, tuple(a.shape))


def _cause(func: Any) -> str:
    name = str(func)
    return name.removeprefix("aten.")


def _run(func: Any, decision: _Decision, flat: list, spec: Any, mesh: Mesh) -> Any:
    strategy = decision.strategy
    n = len(mesh.local_devices)
    per_device = [list(flat) for _ in range(n)]
    for pos, want in zip(decision.tensor_pos, strategy.inputs):
        a = flat[pos]
        if isinstance(a, ShardedTensor):
            if a._layout != want:
                a = _move(func, a, want)
            shards = a._shards
        else:
            shards = _constant_blocks(a, mesh, want)
        for j in range(n):
            per_device[j][pos] = shards[j]
    if strategy.decompose is not None:
        moved = list(flat)
        for pos, want in zip(decision.tensor_pos, strategy.inputs):
            a = flat[pos]
            if isinstance(a, ShardedTensor) and a._layout != want:
                moved[pos] = _move(func, a, want)
        d_args, d_kwargs = tree_unflatten(moved, spec)
        return strategy.decompose(*d_args, **d_kwargs)
    fn = strategy.local or func
    results = []
    for j in range(n):
        d_args, d_kwargs = tree_unflatten(per_device[j], spec)
        results.append(fn(*d_args, **d_kwargs))
    if decision.inplace:
        return flat[0]
    leaves0, out_spec = tree_flatten(results[0])
    per_leaf = [tree_flatten(r)[0] for r in results]
    outs, k = [], 0
    for i, leaf in enumerate(leaves0):
        if isinstance(leaf, torch.Tensor):
            o = decision.out_specs[k]
            outs.append(ShardedTensor([p[i] for p in per_leaf], mesh, strategy.outputs[k], o.shape))
            k += 1
        else:
            outs.append(leaf)
    return tree_unflatten(outs, out_spec)


def _constant_blocks(t: torch.Tensor, mesh: Mesh, want: Layout) -> list[torch.Tensor]:
    """A plain tensor is a replicated constant: cut it locally to `want` (no communication)."""
    from ._api import _local_blocks

    if want.is_replicated:
        return [t] * len(mesh.local_devices)  # read-only use by the op; no copies
    return _local_blocks(t, mesh, want)._shards
