"""Rules for torch's multi-tensor ops: ``aten._foreach_*`` and the fused optimizer steps.

torch's optimizers (``foreach=True``, ``fused=True``), ``clip_grad_norm_`` and
``clip_grad_value_`` (``foreach=True``) and ``Optimizer.zero_grad`` call these on
lists of parameters, gradients and optimizer states. This module owns:

- **The generic rule** of every ``_foreach_X`` overload (list, scalar,
  scalar-list and tensor overloads, out-of-place and in-place ``_foreach_X_``):
  a decomposition into the per-tensor op ``X`` on each element (``maximum`` with
  a number is ``clamp_min``, ``pow.Scalar`` is ``pow.Tensor_Scalar``, a
  scalar-list entry or an entry of a ``scalars`` tensor becomes ``value=``...),
  each dispatched through its own rule, so layouts propagate per tensor and a
  partial input is reduced where the per-tensor op needs its value. An in-place
  element whose partial first operand must be reduced is reduced *in place*
  first (its global value is unchanged; its `.spec` loses the partial axes),
  all such elements together: one all-reduce per (mesh, partial axes, reduce
  op, dtype) group of a flat buffer, not one per tensor (DESIGN §9, DTensor
  #170367).
- **``_foreach_norm`` / ``_foreach_powsum``**: partial inputs are reduce-scattered
  as one flat buffer per (mesh, partial axes, op, dtype) group (half an
  all-reduce's bytes; the values are only needed for the norm), each device
  takes the power sums of its pieces, and one all-reduce of the stacked partial
  power sums of *all* tensors finishes every norm (the entries of a tensor not
  split or partial over some of the reduced axes count once: zero elsewhere).
- **``_fused_adam_``, ``_fused_adamw_``, ``_fused_sgd_``** (and ``tensor_lr``):
  partial tensors of the mutable lists (gradients, most often) are reduced in
  place, grouped as above; per index, gradient and states must be in the
  parameter's layout (a gradient in another layout is moved to it); then
  torch's fused kernel runs on each device's shards. Step counts, ``lr``,
  ``grad_scale`` and ``found_inf`` are replicated constants, read only.

It does not own the per-tensor rules (pointwise, reductions, ...), nor the
dispatcher's general in-place reduction of a partial operand (`_dispatch.py`):
the generic rule only groups the reductions that dispatcher would otherwise do
one tensor at a time.

Invariants: every result equals torch's on the unsharded values; a tensor
reduced in place keeps its global value, its split dims and its shards'
identity (the reduced values are copied into them); every collective goes
through `_dispatch._move`, so it is in the ledger with the foreach op as cause
and strict mode sees it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._errors import LayoutError, NoRuleError, ShardlibError
from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ..layouts._shard import local_bounds, local_shape
from . import _aliasing
from ._dispatch import (
    _DECISIONS,
    _decide,
    _get,
    _has_unknown,
    _key,
    _move,
    _output_specs,
    _substitute,
    _tensor_paths,
)
from ._rules import ArgSpec, RuleInput, Strategy, register_rule, rule_for
from ._tensor import ShardedTensor

aten = torch.ops.aten

__all__ = ["element_op", "foreach_rule", "fused_optimizer_rule"]


# == per-element ops =============================================================
# (per-tensor packet, foreach overload) -> per-tensor overload, where the names differ.
_SPECIAL: dict[tuple[str, str], str] = {
    ("maximum", "Scalar"): "clamp_min.default",
    ("maximum", "ScalarList"): "clamp_min.default",
    ("minimum", "Scalar"): "clamp_max.default",
    ("minimum", "ScalarList"): "clamp_max.default",
    ("pow", "List"): "pow.Tensor_Tensor",
    ("pow", "Scalar"): "pow.Tensor_Scalar",
    ("pow", "ScalarList"): "pow.Tensor_Scalar",
    ("pow", "ScalarAndTensor"): "pow.Scalar",
    ("clamp_min", "List"): "clamp_min.Tensor",
    ("clamp_max", "List"): "clamp_max.Tensor",
    ("lerp", "List"): "lerp.Tensor",
    ("lerp", "ScalarList"): "lerp.Scalar",
    ("addcmul", "Scalar"): "addcmul.default",
    ("addcmul", "ScalarList"): "addcmul.default",
    ("addcmul", "Tensor"): "addcmul.default",
    ("addcdiv", "Scalar"): "addcdiv.default",
    ("addcdiv", "ScalarList"): "addcdiv.default",
    ("addcdiv", "Tensor"): "addcdiv.default",
}
# foreach overload -> per-tensor overloads to try, in order.
_GENERIC: dict[str, tuple[str, ...]] = {
    "List": ("Tensor", "default"),
    "Scalar": ("Scalar", "default"),
    "ScalarList": ("Scalar", "default"),
    "Tensor": ("Tensor", "default"),
    "default": ("default",),
}
# out-of-place overload -> the in-place packet's overload where they differ (pow_.Scalar
# is tensor ** number, pow.Scalar is number ** tensor).
_INPLACE_OVERLOAD = {"Tensor_Tensor": "Tensor", "Tensor_Scalar": "Scalar"}


def element_op(func: Any) -> Any:
    """The per-tensor aten overload that `func` (a ``_foreach_*`` overload) applies to each element.

    Examples:
        >>> import torch
        >>> from shardlib.ops._foreach import element_op
        >>> element_op(torch.ops.aten._foreach_maximum_.Scalar)
        <OpOverload(op='aten.clamp_min_', overload='default')>
    """
    name = func._schema.name.removeprefix("aten::_foreach_")
    inplace = name.endswith("_")
    base = name.removesuffix("_")
    overload = func._overloadname
    special = _SPECIAL.get((base, overload))
    tries = [special] if special else [f"{base}.{o}" for o in _GENERIC.get(overload, ())]
    for t in tries:
        packet, _, ov = t.partition(".")
        op = getattr(getattr(aten, packet, None), ov, None)
        if op is None:
            continue
        if not inplace:
            return op
        op_ = getattr(getattr(aten, packet + "_", None), _INPLACE_OVERLOAD.get(ov, ov), None)
        return op_ if op_ is not None else _InPlaceViaCopy(op)
    raise NoRuleError(
        f"{func}: shardlib found no per-tensor op to apply to each element (tried "
        f"{', '.join(tries) or 'none'}). Loop over the tensors with the per-tensor op, or "
        "register a rule with @shardlib.ops.register_rule(...)."
    )


class _InPlaceViaCopy:
    """``self.copy_(op(self, ...))``: the in-place form of an op torch has no in-place op for.

    (``_foreach_maximum_`` and ``_foreach_minimum_`` with lists: there is no
    ``aten.maximum_``.) `copy_` brings the result to the first operand's layout.
    """

    def __init__(self, op: Any) -> None:
        self.op = op
        self._schema = op._schema

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return aten.copy_.default(args[0], self.op(*args, **kwargs))

    def __repr__(self) -> str:
        return f"copy_ of {self.op}"


def _is_list(arg: Any) -> bool:
    return str(arg.type).startswith("List[")


def _bind(schema: Any, args: tuple, kwargs: dict) -> list[tuple[Any, Any, bool]]:
    """(schema argument, value, given) for every argument of `schema`, in schema order."""
    out = []
    for k, a in enumerate(schema.arguments):
        if k < len(args):
            out.append((a, args[k], True))
        elif a.name in kwargs:
            out.append((a, kwargs[a.name], True))
        else:
            out.append((a, a.default_value if a.has_default_value() else None, False))
    return out


def _element_calls(func: Any, op: Any, args: tuple, kwargs: dict) -> list[tuple[list, dict]]:
    """The (args, kwargs) of `op` for each element of the foreach call `func(*args, **kwargs)`."""
    bound = _bind(func._schema, args, kwargs)
    lengths = {len(v) for a, v, given in bound if given and _is_list(a)}
    if len(lengths) > 1:
        raise LayoutError(
            f"{func}: its tensor and scalar lists have unequal lengths {sorted(lengths)}; every "
            "list argument of a foreach op has one entry per tensor."
        )
    n = lengths.pop() if lengths else 0
    el = op._schema.arguments
    n_positional = sum(1 for a in el if not a.kwarg_only)
    kwarg_only = [a.name for a in el if a.kwarg_only]
    calls = []
    for i in range(n):
        pos, kw, extra = [], {}, 0
        for a, v, given in bound:
            if not given:
                continue
            if _is_list(a):
                v = v[i]
            elif a.name == "scalars" and isinstance(v, torch.Tensor):  # addcmul_.Tensor
                v = v[i].item()
            if a.kwarg_only:
                kw[a.name] = v
            elif len(pos) < n_positional:
                pos.append(v)
            else:  # a foreach positional that is keyword-only per tensor (value=)
                kw[kwarg_only[extra]] = v
                extra += 1
        calls.append((pos, kw))
    return calls


# == grouped reductions ==========================================================
def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _flat_bucket(func: Any, group: list[ShardedTensor]) -> tuple[ShardedTensor, list[list[int]]]:
    """One 1-d partial tensor holding, on each device, its shards of `group` flattened.

    The members share mesh, partial axes, reduce op and dtype; their split axes are
    disjoint from the partial ones, so the devices of one reduction group hold shards
    of equal shapes and the offsets agree. Each device's buffer is zero-padded to one
    length (a multiple of the reduction group's size, so a reduce-scatter's chunks are
    even). The bucket is split over every mesh axis that is not partial (`_bucket_free`):
    devices that differ there hold different data, and a layout replicated over them
    would let the planner take one device's buffer for another's. Returns it and, per
    local device, each member's offset.
    """
    first = group[0]
    mesh, am = first._mesh, first._mesh.abstract
    partial = first._layout.partial
    longest = max(
        sum(_numel(local_shape(tuple(t.shape), t._layout, am, dev)) for t in group)
        for dev in range(am.size)
    )
    k = am.group_size(partial)
    longest = -(-longest // k) * k
    bufs, offsets = [], []
    for j in range(len(mesh.local_devices)):
        pieces = [t._shards[j].reshape(-1) for t in group]
        offs, o = [], 0
        for p in pieces:
            offs.append(o)
            o += p.numel()
        pad = longest - o
        if pad:
            pieces.append(pieces[0].new_zeros(pad))
        bufs.append(torch.cat(pieces) if pieces else first._shards[j].new_zeros(0))
        offsets.append(offs)
    free = _bucket_free(mesh, partial)
    layout = Layout((free,), partial, first._layout.reduce_op)
    return ShardedTensor(bufs, mesh, layout, (longest * am.group_size(free),)), offsets


def _bucket_free(mesh: Mesh, partial: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh axes a flat bucket partial over `partial` is split over: all the others."""
    return tuple(a for a in mesh.axis_names if a not in partial)


def _partial_groups(tensors: list[Any]) -> list[list[ShardedTensor]]:
    """Distinct partial ShardedTensors grouped by (mesh, partial axes, reduce op, dtype)."""
    groups: dict[tuple, list[ShardedTensor]] = {}
    seen: set[int] = set()
    for t in tensors:
        if isinstance(t, ShardedTensor) and t._layout.partial and id(t) not in seen:
            seen.add(id(t))
            key = (t._mesh, t._layout.partial, t._layout.reduce_op, t.dtype)
            groups.setdefault(key, []).append(t)
    return list(groups.values())


def _in_family(t: ShardedTensor) -> bool:
    """Whether `t` is a view, a linked copy, or the root of live partial views."""
    return t._root is not None or bool(t._views)


def synced(tensors: list[Any]) -> None:
    """Bring linked copies among `tensors` up to date before their shards are read directly."""
    for t in tensors:
        if isinstance(t, ShardedTensor) and t._root is not None:
            _aliasing.sync(t)


def _flat_pieces(group: list[ShardedTensor], reduced: ShardedTensor, offsets: list) -> list:
    """Per member of `group`, per local device, its block of the reduced flat bucket."""
    return [
        [
            reduced._shards[j][o : o + t._shards[j].numel()].view(t._shards[j].shape)
            for j, o in enumerate(offs_of)
        ]
        for t, offs_of in zip(group, zip(*offsets))
    ]


def reduce_in_place(func: Any, tensors: list[Any]) -> None:
    """Reduce the partial axes of every partial tensor in `tensors`, in place, grouped.

    One all-reduce per (mesh, partial axes, reduce op, dtype) group, of a flat buffer
    of all the group's storage (cause: `func`). Afterwards each tensor's `.spec` is its
    layout without partial axes; its global value is unchanged and its shards are the
    same tensor objects. A view reduces its whole family: the family root's shards
    are reduced and every live view drops its partial axes, as the dispatcher's
    one-tensor `_aliasing.reduce_in_place` does.
    """
    roots = []
    for t in tensors:
        if isinstance(t, ShardedTensor) and t._layout.partial:
            root = _aliasing.family_root(t)
            synced([root])
            roots.append(root)
    for group in _partial_groups(roots):
        bucket, offsets = _flat_bucket(func, group)
        reduced = _move(func, bucket, Layout((_bucket_free(bucket._mesh, bucket._layout.partial),)))
        with torch.no_grad():
            for t, blocks in zip(group, _flat_pieces(group, reduced, offsets)):
                for s, b in zip(t._shards, blocks):
                    s.copy_(b)
        for root in group:
            _aliasing.drop_partial(root)


def reduced_copies(func: Any, tensors: list[ShardedTensor]) -> dict[int, ShardedTensor]:
    """Reduced copies of partial `tensors` (by id), one all-reduce per group; inputs untouched."""
    synced(tensors)
    out = {}
    for group in _partial_groups(tensors):
        bucket, offsets = _flat_bucket(func, group)
        reduced = _move(func, bucket, Layout((_bucket_free(bucket._mesh, bucket._layout.partial),)))
        for t, blocks in zip(group, _flat_pieces(group, reduced, offsets)):
            out[id(t)] = ShardedTensor(
                [b.clone() for b in blocks], t._mesh, t._layout.without_partial(), tuple(t.shape)
            )
    return out


# == the generic foreach rule ====================================================
_NEEDS_REDUCTION: dict[tuple, bool] = {}


def _needs_reduced_self(op: Any, args: list, kwargs: dict) -> bool:
    """Whether the in-place element `op(*args, **kwargs)` needs its partial first operand reduced.

    The dispatcher's criterion, asked of the element's own rule: no candidate keeps the
    partial layout of the first operand, and one keeps that layout without the partial
    axes. Cached by the element's dispatch key.
    """
    self = args[0]
    if isinstance(op, _InPlaceViaCopy):  # copy_ keeps a partial destination partial
        return False
    if not isinstance(self, ShardedTensor) or not self._layout.partial:
        return False
    key = _key(op, tuple(args), kwargs)
    hit = _NEEDS_REDUCTION.get(key)
    if hit is not None:
        return hit
    rule = rule_for(op)
    if rule is None:
        return False  # the dispatcher raises its own "no rule" error
    paths = _tensor_paths(tuple(args), kwargs)
    tensors = [_get(tuple(args), kwargs, p) for p in paths]
    specs = tuple(
        ArgSpec(
            tuple(t.shape),
            t.dtype,
            t._layout if isinstance(t, ShardedTensor) else Layout(((),) * t.ndim),
        )
        for t in tensors
    )
    outs = _output_specs(op, tuple(args), kwargs, paths, tensors)
    a_args, a_kwargs = _substitute(tuple(args), kwargs, paths, list(specs))
    ri = RuleInput(
        op, self._mesh.abstract, tuple(a_args), dict(a_kwargs), specs, tuple(o for o in outs if o)
    )
    candidates = list(rule(ri))
    layout = self._layout

    def keeps(c: Strategy, want: Layout) -> bool:
        return c.inputs[0] == want and (c.decompose is not None or c.outputs[0] == want)

    needs = not any(keeps(c, layout) for c in candidates) and any(
        keeps(c, layout.without_partial()) for c in candidates
    )
    if not _has_unknown(key):
        _NEEDS_REDUCTION[key] = needs
    return needs


def _reduce_read_operands(func: Any, op: Any, calls: list, inplace: bool) -> list:
    """`calls` with every partial operand its element's rule all-reduces replaced by a
    reduced copy, the copies made together: one all-reduce per group, not per tensor.

    Only operands the element reads (not an in-place element's first operand) whose
    chosen strategy wants them exactly without their partial axes; everything else
    is left to the element's own dispatch.
    """
    wanted: list[ShardedTensor] = []
    plans = []
    for a, k in calls:
        tensors = [
            x for x in (*a, *k.values()) for x in (x if isinstance(x, list | tuple) else [x])
        ]
        if isinstance(op, _InPlaceViaCopy) or not any(
            isinstance(x, ShardedTensor) and x._layout.partial for x in tensors
        ):
            plans.append(None)
            continue
        try:
            key = _key(op, tuple(a), k)
            decision = _DECISIONS.get(key)
            decision = _decide(op, tuple(a), k) if decision is None else decision
        except ShardlibError:
            plans.append(None)  # the element's own call raises the error
            continue
        picks = []
        for q, (path, want) in enumerate(zip(decision.paths, decision.strategy.inputs)):
            x = _get(tuple(a), k, path)
            if (inplace and q == 0) or not isinstance(x, ShardedTensor) or not x._layout.partial:
                continue
            if want == x._layout.without_partial():
                picks.append((path, x))
                wanted.append(x)
        plans.append((decision.paths, picks) if picks else None)
    if not wanted:
        return calls
    copies = reduced_copies(func, wanted)
    out = []
    for (a, k), plan_ in zip(calls, plans):
        if plan_ is None:
            out.append((a, k))
            continue
        paths, picks = plan_
        chosen = dict((p, copies[id(x)]) for p, x in picks)
        values = [chosen.get(p, _get(tuple(a), k, p)) for p in paths]
        new_a, new_k = _substitute(tuple(a), k, paths, values)
        out.append((list(new_a), new_k))
    return out


def _foreach_decomposition(func: Any) -> Callable:
    op = element_op(func)
    inplace = func._schema.name.endswith("_")

    def decompose(*args: Any, **kwargs: Any) -> Any:
        calls = _element_calls(func, op, args, kwargs)
        if inplace:
            reduce_in_place(func, [a[0] for a, k in calls if _needs_reduced_self(op, a, k)])
        calls = _reduce_read_operands(func, op, calls, inplace)
        results = []
        for i, (a, k) in enumerate(calls):
            try:
                results.append(op(*a, **k))
            except ShardlibError as e:
                raise type(e)(f"{func}, element {i} of {len(calls)}: {e}") from None
        return None if inplace else results

    return decompose


def foreach_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Every tensor where it is; the decomposition dispatches the per-tensor op per element."""
    yield Strategy(tuple(s.layout for s in ri.tensors), decompose=_foreach_decomposition(ri.op))


# == _foreach_norm / _foreach_powsum =============================================
def _power_sum(piece: torch.Tensor, ord: float) -> torch.Tensor:
    """This device's contribution to ``sum |x|^ord`` (max / min of |x| for ord = ±inf)."""
    a = piece.abs()
    if ord == math.inf:
        return a.amax() if a.numel() else a.new_zeros(())  # |x| >= 0: 0 is max's identity
    if ord == -math.inf:
        return a.amin() if a.numel() else a.new_full((), math.inf)
    if ord == 0:
        return (a != 0).sum().to(a.dtype)
    if ord == 1:
        return a.sum()
    return a.pow(ord).sum()


def _norm_decomposition(func: Any, root: bool) -> Callable:
    def decompose(tensors: list, ord: Any = 2, dtype: Any = None, *args: Any, **kw: Any) -> list:
        ord = float(ord)
        xs = [
            aten._to_copy.default(x, dtype=dtype) if dtype is not None and x.dtype != dtype else x
            for x in tensors
        ]
        out: list[Any] = [None] * len(xs)
        by_mesh: dict[Mesh, list[int]] = {}
        for i, x in enumerate(xs):
            if isinstance(x, ShardedTensor):
                by_mesh.setdefault(x._mesh, []).append(i)
            elif root:  # a plain tensor: torch's own
                out[i] = aten.linalg_vector_norm.default(x, ord)
            else:
                out[i] = _power_sum(x, ord)
        for mesh, idx in by_mesh.items():
            for i, v in zip(idx, _mesh_norms(func, mesh, [xs[i] for i in idx], ord, root)):
                out[i] = v
        return out

    return decompose


def _mesh_norms(func: Any, mesh: Mesh, xs: list[ShardedTensor], ord: float, root: bool) -> list:
    """Norms (or power sums) of sharded tensors on one mesh: <= 1 reduce-scatter per group + 1 all-reduce."""
    am, devs = mesh.abstract, mesh.local_devices
    synced(xs)
    # pieces[i][j]: device j's values of tensor i; axes[i]: the axes its contributions vary on
    pieces: list[list[torch.Tensor]] = [list(x._shards) for x in xs]
    axes = [set(a for d in x._layout.dims for a in d) for x in xs]
    where = {id(x): i for i, x in enumerate(xs)}
    for group in _partial_groups(xs):
        bucket, offsets = _flat_bucket(func, group)
        partial = group[0]._layout.partial
        free = _bucket_free(mesh, partial)
        scattered = _move(func, bucket, Layout((free + partial,)))  # reduce-scatter
        for j, (dev, offs) in enumerate(zip(devs, offsets)):
            base = local_bounds(tuple(bucket.shape), bucket._layout, am, dev)[0][0]
            (c0, c1) = local_bounds(tuple(bucket.shape), scattered._layout, am, dev)[0]
            c0, c1 = c0 - base, c1 - base
            chunk = scattered._shards[j]
            for t, o in zip(group, offs):
                lo, hi = max(o, c0), min(o + t._shards[j].numel(), c1)
                pieces[where[id(t)]][j] = chunk[lo - c0 : max(hi, lo) - c0]
        for t in group:
            axes[where[id(t)]] |= set(partial)
    op = "max" if ord == math.inf else "min" if ord == -math.inf else "sum"
    union = tuple(sorted(set().union(*axes)))
    vectors = []
    for j, dev in enumerate(devs):
        vals = [_power_sum(p[j], ord) for p in pieces]
        if op == "sum":  # a tensor replicated over some of `union` counts once there
            vals = [
                v if am.index_along(dev, tuple(a for a in union if a not in ax)) == 0 else v * 0
                for v, ax in zip(vals, axes)
            ]
        vectors.append(torch.stack(vals))
    dtype = vectors[0].dtype
    stacked = ShardedTensor(vectors, mesh, Layout(((),), union, op), (len(xs),))
    total = _move(func, stacked, Layout(((),))) if union else stacked
    finished = []
    for v in total._shards:
        if root and ord not in (0.0, 1.0, math.inf, -math.inf):
            v = v.pow(1.0 / ord)
        finished.append(v.to(dtype))
    scalar = Layout(())
    return [ShardedTensor([v[i] for v in finished], mesh, scalar, ()) for i in range(len(xs))]


def _norm_rule(root: bool) -> Callable[[RuleInput], Iterator[Strategy]]:
    def rule(ri: RuleInput) -> Iterator[Strategy]:
        inputs = tuple(s.layout for s in ri.tensors)
        yield Strategy(inputs, decompose=_norm_decomposition(ri.op, root))

    return rule


# == fused optimizers ============================================================
_FUSED = (
    aten._fused_adam_.default,
    aten._fused_adam_.tensor_lr,
    aten._fused_adamw_.default,
    aten._fused_adamw_.tensor_lr,
    aten._fused_sgd_.default,
    aten._fused_sgd_.tensor_lr,
)
_READ_ONLY_LISTS = ("state_steps",)


def _local(func: Any, name: str, v: Any, j: int) -> Any:
    """Device j's copy of a replicated constant argument (plain tensors are shared)."""
    if not isinstance(v, ShardedTensor):
        return v
    if any(v._layout.dims) or v._layout.partial:
        v = _move(func, v, Layout(((),) * v.ndim))
    return v._shards[j]


def _fused_decomposition(func: Any) -> Callable:
    schema = func._schema
    lists = [a.name for a in schema.arguments if _is_list(a)]
    mutable = [n for n in lists if n not in _READ_ONLY_LISTS]

    def decompose(*args: Any, **kwargs: Any) -> None:
        bound = {a.name: v for a, v, _ in _bind(schema, args, kwargs)}
        params = bound["self"]
        columns = {n: list(bound[n]) for n in lists}
        sharded = [i for i, p in enumerate(params) if isinstance(p, ShardedTensor)]
        plain = [i for i in range(len(params)) if not isinstance(params[i], ShardedTensor)]
        for i in plain:
            if any(isinstance(columns[n][i], ShardedTensor) for n in lists if columns[n]):
                raise LayoutError(
                    f"{func}: parameter {i} is a plain tensor but another argument at that index "
                    "is sharded. Shard the parameter too (sl.shard(p, mesh, layout)), or keep "
                    "the optimizer's tensors plain."
                )
        if plain:  # plain parameters: torch's kernel on the plain sub-lists
            sub = {n: [columns[n][i] for i in plain] if columns[n] else [] for n in lists}
            func(*[sub[n] for n in lists], **_kw(bound, lists))
        if not sharded:
            return None
        synced([columns[n][i] for n in lists if columns[n] for i in sharded])
        touched = [columns[n][i] for n in mutable if columns[n] for i in sharded]
        # the kernel needs values: partial parameters, gradients and states are reduced in place
        reduce_in_place(func, [columns[n][i] for n in mutable if columns[n] for i in sharded])
        written_back = []  # (tensor, the copy in its parameter's layout the kernel updates)
        for i in sharded:
            p = params[i]
            if p._layout.partial:  # a family member the dispatcher could not reduce
                raise LayoutError(
                    f"{func}: parameter {i} (shape {tuple(p.shape)}) is still partial "
                    f"{p._layout!r}; a fused step needs its value. sl.reshard it to "
                    f"{p._layout.without_partial()!r} first."
                )
            for n in mutable[1:]:
                if not columns[n]:
                    continue
                t = columns[n][i]
                if not isinstance(t, ShardedTensor) or t._mesh != p._mesh:
                    where = (
                        "a plain tensor" if not isinstance(t, ShardedTensor) else f"on {t._mesh!r}"
                    )
                    raise LayoutError(
                        f"{func}: {n}[{i}] is {where} but its parameter is sharded on "
                        f"{p._mesh!r} with {p._layout!r}. Create optimizer state with "
                        "torch.zeros_like(param) (sharded like it), and gradients by backward "
                        "through sharded ops."
                    )
                if t._layout != p._layout:
                    # per element in the parameter's layout; what the kernel writes is copied
                    # back into the tensor's own layout (gradients are only read, unless a
                    # grad_scale unscales them)
                    moved = _move(func, t, p._layout)
                    columns[n][i] = moved
                    if n != "grads" or bound.get("grad_scale") is not None:
                        written_back.append((t, moved))
        mesh = params[sharded[0]]._mesh
        kw = _kw(bound, lists)
        for j in range(len(mesh.local_devices)):
            local_lists = []
            for n in lists:
                col = [columns[n][i] for i in sharded] if columns[n] else []
                if n in _READ_ONLY_LISTS:
                    local_lists.append([_local(func, n, t, j) for t in col])
                else:
                    local_lists.append([t._shards[j] for t in col])
            func(*local_lists, **{k: _local(func, k, v, j) for k, v in kw.items()})
        for t, moved in written_back:
            aten.copy_.default(t, moved)
        for t in {id(t): t for t in touched if isinstance(t, ShardedTensor)}.values():
            if t._root is not None:
                _aliasing.after_write(t)
        return None

    return decompose


def _kw(bound: dict, lists: list[str]) -> dict:
    return {k: v for k, v in bound.items() if k not in lists}


def fused_optimizer_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Partials reduced in place, every list in its parameter's layout, torch's kernel per device."""
    yield Strategy(tuple(s.layout for s in ri.tensors), decompose=_fused_decomposition(ri.op))


# == registration ================================================================
def _foreach_overloads() -> list[Any]:
    ops = []
    for s in torch._C._jit_get_all_schemas():
        if not s.name.startswith("aten::_foreach_") or "out" in s.overload_name:
            continue
        packet = getattr(aten, s.name.removeprefix("aten::"))
        ops.append(getattr(packet, s.overload_name or "default"))
    return ops


_NORMS = {"_foreach_norm": True, "_foreach_powsum": False}


def _register() -> None:
    for op in _foreach_overloads():
        name = op._schema.name.removeprefix("aten::")
        if name in _NORMS:
            register_rule(op)(_norm_rule(_NORMS[name]))
            continue
        try:
            element_op(op)
        except NoRuleError:
            continue  # no per-tensor counterpart: the dispatcher's "no rule" error stands
        register_rule(op)(foreach_rule)
    register_rule(*_FUSED)(fused_optimizer_rule)


def _register_meta_kernels() -> None:
    """Meta kernels for the fused steps that lack one (the dispatcher infers shapes on meta).

    They return nothing and write nothing, which is all shape inference needs.
    """
    missing = [
        op
        for op in _FUSED
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")
        and not torch._C._dispatch_has_kernel_for_dispatch_key(
            op.name(), "CompositeExplicitAutograd"
        )
    ]
    if not missing:
        return
    global _META_LIB
    _META_LIB = torch.library.Library("aten", "IMPL", "Meta")  # noqa: TOR901
    for op in missing:
        _META_LIB.impl(op.name().removeprefix("aten::"), _no_op)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


_META_LIB: Any = None
_register()
_register_meta_kernels()
