"""Dispatch of aten ops on `ShardedTensor`s: rule lookup, pricing, redistribution, local run.

Owns the decision cache, the choice between a rule's candidate strategies
(least planner bytes, then the rule's order), strict mode, the opt-in
replicate fallback, and the "no rule" error. It does not own any rule: rule
families register into `_rules.py`.

Hot path: a decision is cached by (op, every argument's abstract signature,
mesh), so a repeated op costs one dict lookup, the redistributions it needs
(none, typically) and the local op on each shard. Where the op returns one
tensor, its tensor arguments are positional, already in the decided layouts
(by equality), none is a linked copy to refresh (alias views are fine, except
as the target of an in-place op) and plain operands are replicated constants,
`_dispatch` runs the local op (or the strategy's per-device `local`) and wraps
the result inline; everything else goes through `_run`. That per-op cost is
about that of a minimal `__torch_dispatch__` wrapper (unwrap, call, wrap):
the rest is torch's own subclass dispatch and autograd machinery.

Implicit redistributions are never cached on a tensor: an input an op needs in
another layout is moved for that op and the moved copy is dropped with it, so
no gathered copy outlives the op, the ledger of a repeated computation is the
same every time, and edits of `x.local_shards()` are always seen. Within one
op, one input passed twice (``x * x``) is moved once.

In-place ops keep the layout of the tensor they write. Where the rule needs
that tensor in another layout: a partial value whose op needs the value is
reduced in place first (its family's layouts drop the partial axes; same
global value; `_aliasing.reduce_in_place`); otherwise the op runs out of place
and its result is copied back into the tensor's own layout (``copy_``). Views
and writes through them follow torch's aliasing (`_aliasing.py`). Ops without
a rule whose torch kernel is a composite of other ops (matmul, linear, einsum
reach us whole under `torch.inference_mode`) are decomposed into those ops;
``out=`` variants run the functional op and copy into ``out``.

Which mechanism covers which ops, in the order they are tried:

1. A rule registered for the overload or its packet (one module per family:
   `_pointwise` (plus every op tagged ``torch.Tag.pointwise``), `_contractions`,
   `_reductions`, `_views`, `_nn`, `_attention`, `_fills`, `_foreach`
   (``_foreach_*`` and ``_fused_adamw_``: one call per device, partial inputs
   reduced in one collective per same-layout group), `_scans`, `_indexing`,
   `_conv`, `_norms`, `_losses`, `_linalg`, `_spectral`). Ops that run
   independently along some dims and need the others whole (linalg, fft, sort
   along an unsplit dim, ...) get their candidates from `_batched.batched`.
2. ``out=`` variants: the functional op, then a copy into ``out``.
3. In-place ops: the rule of the op; where it would change the written tensor's
   layout, a partial value is reduced in place first or the op runs out of place
   and is copied back. In-place view ops (``unsqueeze_``, ``t_``, ...): the
   out-of-place view's rule, applied to every shard and to the tensor itself.
4. No rule, CompositeImplicitAutograd (reached whole under inference mode):
   torch's composition, each part by its rule.
5. No rule, every input replicated and not partial, and not a random op: the
   op runs on each replica (no communication; data-dependent output shapes such
   as ``nonzero`` included).
6. No rule, otherwise: torch's registered decomposition (`torch._decomp`), each
   part by its rule (its collectives are in the ledger under the parts' names).
7. Else `NoRuleError`, naming the op, its layouts and the fixes; with
   `sl.allow_replicate_fallback()`, gather-compute-keep-replica, in the ledger.

Invariant: every collective issued here goes through `collectives.execute`,
so it is in the ledger with the op's name as cause.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import (
    LayoutError,
    MeshMismatchError,
    NoRuleError,
    ShapeInferenceError,
    ShardlibError,
)
from ..collectives._ledger import current_direction
from ..collectives._redistribute import execute
from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ..layouts._planner import plan
from ..layouts._shard import max_local_numel
from . import _accumulate, _aliasing
from ._rules import ArgSpec, RuleInput, Strategy, rule_for
from ._tensor import ShardedTensor

__all__ = ["allow_replicate_fallback", "cause_prefix", "dispatch", "move", "strict"]

_state: dict[str, Any] = {"strict": 0, "fallback": 0, "cause": ""}
_explainers: list = []  # open `sl.explain` recorders (see _explain.py)
# Callables ``observer(func, args, kwargs, out)`` run after every top-level op while
# registered (`sl.check_replicas`, _replicas.py). Empty on the hot path.
_observers: list = []


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


@contextlib.contextmanager
def cause_prefix(prefix: str) -> Iterator[None]:
    """Prefix the ledger cause of collectives issued inside (``"refresh:"``, ``"write-back:"``)."""
    old = _state["cause"]
    _state["cause"] = prefix
    try:
        yield
    finally:
        _state["cause"] = old


# == argument paths and signatures ==============================================
# aten ops take tensors as top-level arguments or inside one list (cat, index, ...), so
# a tensor's place is a short path: (i,), (i, j), ("kw", name) or ("kw", name, j). This
# avoids pytree walks on the hot path.
_ATOMS = (
    int,
    float,
    bool,
    str,
    type(None),
    torch.dtype,
    torch.device,
    torch.memory_format,
    torch.layout,
)


_SIG_IDS: dict[tuple, int] = {}


def _sig_of(a: ShardedTensor) -> int:
    """A small int standing for (layout, shape, dtype, mesh, strides, offset), cached on the tensor.

    Strides are part of it because the result's strides (and memory-order random fills)
    follow the inputs' as in torch.
    """
    sig = a._sig
    if sig is None:
        sig = a._sig = _intern_sig(
            (a._layout, a.shape, a.dtype, a._mesh, a.stride(), a.storage_offset())
        )
    return sig


def _intern_sig(full: tuple) -> int:
    sig = _SIG_IDS.get(full)
    if sig is None:
        sig = _SIG_IDS[full] = len(_SIG_IDS)
    return sig


_ATOM_TYPES = frozenset(_ATOMS)


def _signature(a: Any) -> Any:
    t = type(a)
    if t in _ATOM_TYPES:
        return (t, a)  # 1, 1.0 and True hash alike but give different dtypes
    if t is list or t is tuple:
        if set(map(type, a)) <= _ATOM_TYPES:  # ints of a shape or dims: no recursion
            return (t, a if t is tuple else tuple(a), tuple(map(type, a)))
        return (t, *map(_signature, a))
    if isinstance(a, ShardedTensor):
        return _sig_of(a)
    if isinstance(a, torch.Tensor):
        if a.layout is not torch.strided:  # sparse: no strides (refused by _decide)
            return ("tensor", a.layout, a.shape, a.dtype, a.device)
        return ("tensor", a.shape, a.dtype, a.device, a.stride(), a.storage_offset())
    return ("object", id(a))  # unhashable or unknown: never shared between calls


def _has_unknown(sig: Any) -> bool:
    """Whether a signature holds an ("object", id) entry, which must not key a cache."""
    if isinstance(sig, tuple):
        return sig[:1] == ("object",) or any(_has_unknown(s) for s in sig)
    return False


def _key(func: Any, args: tuple, kwargs: dict) -> tuple:
    """The decision-cache key (`dispatch` builds the same key inline when there are no kwargs).

    The op enters by id (an OpOverload hashes in Python); `_LIVE_OPS` holds every op that
    ever keyed a decision, so no other object can take its id."""
    _LIVE_OPS.setdefault(id(func), func)
    if kwargs:
        return (id(func), *map(_signature, args), *((k, _signature(v)) for k, v in kwargs.items()))
    return (id(func), *map(_signature, args))


_LIVE_OPS: dict[int, Any] = {}


def _tensor_paths(args: tuple, kwargs: dict) -> tuple[tuple, ...]:
    paths = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            paths.append((i,))
        elif isinstance(a, list | tuple):
            paths += [(i, j) for j, b in enumerate(a) if isinstance(b, torch.Tensor)]
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor):
            paths.append(("kw", k))
        elif isinstance(a, list | tuple):
            paths += [("kw", k, j) for j, b in enumerate(a) if isinstance(b, torch.Tensor)]
    return tuple(paths)


def _get(args: tuple, kwargs: dict, path: tuple) -> Any:
    if path[0] == "kw":
        a = kwargs[path[1]]
        return a[path[2]] if len(path) == 3 else a
    a = args[path[0]]
    return a[path[1]] if len(path) == 2 else a


def _substitute(args: tuple, kwargs: dict, paths: tuple, values: list) -> tuple[list, dict]:
    """Copies of args/kwargs with `values` placed at `paths` (lists copied where touched)."""
    new_args, new_kwargs = list(args), dict(kwargs) if kwargs else kwargs
    for path, v in zip(paths, values):
        holder, original, place = (
            (new_kwargs, kwargs, path[1:]) if path[0] == "kw" else (new_args, args, path)
        )
        if len(place) == 1:
            holder[place[0]] = v
        else:
            seq = holder[place[0]]
            if seq is original[place[0]]:
                seq = holder[place[0]] = list(seq)
            seq[place[1]] = v
    return new_args, new_kwargs


@dataclass(frozen=True, slots=True)
class _Decision:
    strategy: Strategy
    paths: tuple[tuple, ...]  # where the tensor arguments sit
    out_specs: tuple[ArgSpec, ...]
    inplace: bool
    # (position, required layout) when every tensor argument is a positional ShardedTensor,
    # the op runs as is and returns one tensor: the hot path of `_run`.
    fast: tuple[tuple[int, Layout], ...] | None = None
    out_sig: int | None = None
    view: bool = False  # a view op: its outputs are aliases or linked copies (_aliasing)
    # the fast path's keyword arguments of `_make_wrapper_subclass`: the result's geometry
    # (nothing when contiguous at offset 0, the cheap default), then its dtype and device,
    # filled in by the first run (the local op's result has them)
    geometry: dict | None = None
    fn: Any = None  # what the fast path runs per device: the op, or the strategy's `local`
    # aten.add of two tensors in one layout, shape and dtype: autograd's engine may be
    # summing gradients, into one shardlib's backward made (`_accumulate`)
    accumulate: bool = False


_DECISIONS: dict[tuple, _Decision] = {}
_DECISION_LIMIT = 65536


def dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run `func` on sharded arguments: the entry point of `ShardedTensor.__torch_dispatch__`."""
    if _explainers:
        out = _explainers[-1].record(func, args, kwargs, _dispatch)
    elif not _observers:
        return _dispatch(func, args, kwargs)
    else:
        out = _dispatch(func, args, kwargs)
    for observe in _observers:
        observe(func, args, kwargs, out)
    return out


def _dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    if kwargs:
        key = _key(func, args, kwargs)
    else:  # the same key as `_key`, built inline: this is the hot path
        key = (
            id(func),
            *[
                a._sig
                if type(a) is ShardedTensor and a._sig is not None
                else (type(a), a)
                if type(a) in _ATOM_TYPES
                else _signature(a)
                for a in args
            ],
        )
    decision = _DECISIONS.get(key)
    if decision is None:
        _LIVE_OPS.setdefault(id(func), func)
        decision = _decide(func, args, kwargs)
        if len(_DECISIONS) >= _DECISION_LIMIT:
            _DECISIONS.clear()
        if not _has_unknown(key):  # an id() may be reused by another object later
            _DECISIONS[key] = decision
    fast = decision.fast
    if fast is not None:
        for i, want in fast:
            a = args[i]
            if (a._layout is not want and a._layout != want) or (
                a._root is not None and (decision.inplace or a._root._link is not None)
            ):
                break
        else:
            # Hot path: positional sharded inputs already in place (plain ones replicated
            # constants, passed as they are), no linked copy to refresh and no write into
            # a view family, one tensor output.
            first = args[fast[0][0]]
            fn = decision.fn
            if decision.accumulate and _accumulate.claim(args):
                per_device = [b.add_(a) for a, b in zip(args[0]._shards, args[1]._shards)]
            elif len(first._shards) == 1:  # one device per process (the distributed backend)
                a = list(args)
                for i, _ in fast:
                    a[i] = args[i]._shards[0]
                per_device = [fn(*a, **kwargs)]
            else:
                per_device = []
                for j in range(len(first._shards)):
                    a = list(args)
                    for i, _ in fast:
                        a[i] = args[i]._shards[j]
                    per_device.append(fn(*a, **kwargs))
            if decision.inplace:
                first._writes += 1
                return first
            wrap = decision.geometry
            if "device" not in wrap:
                wrap["dtype"], wrap["device"] = per_device[0].dtype, per_device[0].device
            out = _make_wrapper(ShardedTensor, decision.out_specs[0].shape, **wrap)
            out._shards = per_device
            out._mesh = first._mesh
            out._layout = decision.strategy.outputs[0]
            out._sig = decision.out_sig
            if decision.view:  # an alias of its input (or, if the local op copied, linked)
                _aliasing.link_view(func, args, kwargs, first, out, False)
            return out
    return _run(func, decision, args, kwargs)


_make_wrapper = torch.Tensor._make_wrapper_subclass
_ADD = torch.ops.aten.add.Tensor


def _mesh_of(func: Any, tensors: list) -> Mesh:
    meshes = []
    for a in tensors:
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
    """A meta tensor with `a`'s global shape, strides and storage offset."""
    shape, stride, offset = tuple(a.shape), a.stride(), a.storage_offset()
    if offset == 0 and a.is_contiguous():
        return torch.empty(shape, dtype=a.dtype, device="meta")
    extent = offset + 1 + sum((n - 1) * st for n, st in zip(shape, stride) if n > 0)
    if any(n == 0 for n in shape):
        extent = offset
    base = torch.empty(extent, dtype=a.dtype, device="meta")
    return base.as_strided(shape, stride, offset)


def _decide(func: Any, args: tuple, kwargs: dict) -> _Decision:
    paths = _tensor_paths(args, kwargs)
    tensors = [_get(args, kwargs, p) for p in paths]
    mesh = _mesh_of(func, tensors)
    odd = [t for t in tensors if t.layout is not torch.strided]
    if odd:
        raise NoRuleError(
            f"{func}: a {odd[0].layout} operand beside sharded tensors; shardlib shards strided "
            "(dense) tensors only. Convert it with .to_dense(), or compute on x.full()."
        )
    schema = getattr(func, "_schema", None)
    reads_kept = not (
        _is_inplace(func) or _is_view(func) or (schema is not None and schema.is_mutable)
    )
    specs = tuple(
        ArgSpec(
            tuple(a.shape),
            a.dtype,
            (_kept_layout(a) if reads_kept else a._layout)
            if isinstance(a, ShardedTensor)
            else Layout(((),) * a.ndim),
            a.stride(),
            a.storage_offset(),
        )
        for a in tensors
    )
    if _out_arguments(func):
        return _Decision(Strategy(_current(specs), decompose=_out_variant(func)), paths, (), False)
    try:
        out_specs = _output_specs(func, args, kwargs, paths, tensors)
    except NoRuleError:
        if _all_replicated(func, specs):  # nonzero, unique, ...: every device computes it whole
            return _Decision(Strategy(_current(specs), decompose=_locally(func)), paths, (), False)
        # (h9b) an op whose output shape depends on the values may still have a rule: it
        # sees no outputs and must answer with a decomposition (x[mask], nonzero, ...)
        # (h9a) so may an op without a meta kernel whose rule is marked `no_meta` (histogram)
        found = rule_for(func)
        if found is None or not (
            torch.Tag.dynamic_output_shape in func.tags or getattr(found, "no_meta", False)
        ):
            raise
        out_specs = ()
    a_args, a_kwargs = _substitute(args, kwargs, paths, list(specs))
    ri = RuleInput(
        func,
        mesh.abstract,
        tuple(a_args),
        dict(a_kwargs),
        specs,
        tuple(o for o in out_specs if o is not None),
    )
    inplace = _is_inplace(func)
    if inplace and not (paths and isinstance(tensors[0], ShardedTensor)):
        raise LayoutError(
            f"{func}: an in-place op on a plain tensor with sharded operands; the result would "
            "be sharded. Use the out-of-place op, or x.full() to get a plain operand."
        )
    if inplace and torch.Tag.inplace_view in func.tags:  # t_, unsqueeze_, transpose_, ...
        return _Decision(Strategy(_current(specs), decompose=_inplace_view(func)), paths, (), False)
    rule = rule_for(func)
    if rule is None:
        if _is_composite(func):  # e.g. matmul under inference_mode: run its decomposition
            return _Decision(Strategy(_current(specs), decompose=func.decompose), paths, (), False)
        if _all_replicated(func, specs) and not (
            inplace
            and out_specs
            and out_specs[0] is not None
            and out_specs[0].shape != specs[0].shape
        ):  # no data crosses devices: run it on each replica (resize_ changes the shape: no)
            return _Decision(Strategy(_current(specs), decompose=_locally(func)), paths, (), False)
        decomposition = _decompositions().get(func)
        if decomposition is not None:  # torch's own decomposition, each part by its rule
            return _Decision(
                Strategy(_current(specs), decompose=_decomposed(func, decomposition)),
                paths,
                (),
                False,
            )
        if not _state["fallback"]:
            raise NoRuleError(_no_rule_message(func, specs))
        candidates = [_replicate_everything(ri)]
    else:
        candidates = list(rule(ri))
    if inplace:
        self_layout = specs[0].layout
        kept = [c for c in candidates if _keeps(c, self_layout)]
        if not kept and self_layout.partial:
            unreduced = self_layout.without_partial()
            if any(_keeps(c, unreduced) for c in candidates):
                # a partial value whose op needs the value: reduce it in place, then run
                return _Decision(
                    Strategy(_current(specs), decompose=_reduce_then(func)), paths, (), True
                )
        if not kept and candidates:
            functional = _functional_of(func)
            if functional is not None:  # run out of place, copy back into the own layout
                return _Decision(
                    Strategy(_current(specs), decompose=_copy_back(functional)), paths, (), True
                )
        if not kept and candidates:
            raise LayoutError(
                f"{func}: this in-place op would change the layout of its first operand "
                f"{self_layout!r} (shape {specs[0].shape}), and it has no out-of-place form "
                "to run instead. sl.reshard the operands first (layouts: "
                f"{', '.join(repr(s.layout) for s in specs)}), or call the out-of-place op."
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
    view = _is_view(func) and bool(paths) and isinstance(tensors[0], ShardedTensor)
    fast = None
    simple = (
        all(len(p) == 1 and p[0] != "kw" for p in paths)
        and any(isinstance(t, ShardedTensor) for t in tensors)
        and all(
            isinstance(t, ShardedTensor) or want.is_replicated
            for t, want in zip(tensors, best.inputs)
        )
        and not best.local_device
        and best.decompose is None
        and len(out_specs) == 1
        and out_specs[0] is not None
        and not (view and paths[0] != (0,))
    )
    if simple:
        # Required layouts are compared by identity on the hot path: use the inputs' own
        # layout objects where they already match.
        # (plain operands are replicated constants: left in place, as `_constant_blocks` would)
        fast = tuple(
            (p[0], t._layout if t._layout == want else want)
            for p, t, want in zip(paths, tensors, best.inputs)
            if isinstance(t, ShardedTensor)
        )
        best = Strategy(
            tuple(
                t._layout if isinstance(t, ShardedTensor) and t._layout == want else want
                for t, want in zip(tensors, best.inputs)
            ),
            best.outputs,
            best.local,
        )
    out_sig, geometry = None, None
    if fast is not None:
        o = out_specs[0]
        full = (best.outputs[0], torch.Size(o.shape), o.dtype, mesh, o.stride, o.offset)
        out_sig = _SIG_IDS.setdefault(full, len(_SIG_IDS))
        contiguous = o.offset == 0 and o.stride == torch.empty(o.shape, device="meta").stride()
        geometry = {} if contiguous else {"strides": o.stride, "storage_offset": o.offset}
    fn = best.local or getattr(func, "_op", func)  # the C++ op: skips OpOverload.__call__
    accumulate = (
        func is _ADD
        and not kwargs
        and fast is not None
        and len(fast) == 2
        and len(args) == 2
        and geometry == {}
        and best.local is None
        and _sig_of(args[0]) == _sig_of(args[1])
        and best.inputs[0] == best.inputs[1] == best.outputs[0] == args[0]._layout
    )
    return _Decision(best, paths, out_specs, inplace, fast, out_sig, view, geometry, fn, accumulate)


def _current(specs: tuple[ArgSpec, ...]) -> tuple[Layout, ...]:
    return tuple(s.layout for s in specs)


def _keeps(c: Strategy, layout: Layout) -> bool:
    """Whether candidate `c` takes its first operand in `layout` and writes it back in it."""
    return c.inputs[0] == layout and (c.decompose is not None or c.outputs[0] == layout)


def _reduce_then(func: Any) -> Any:
    def run(self, *args, **kwargs):
        _aliasing.reduce_in_place(self, func)
        return func(self, *args, **kwargs)

    run.writes_through_dispatch = True  # the inner op records the write (see _run)
    return run


def _copy_back(functional: Any) -> Any:
    def run(self, *args, **kwargs):
        result = functional(self, *args, **kwargs)
        return aten.copy_.default(self, result)

    run.writes_through_dispatch = True
    return run


aten = torch.ops.aten


def _functional_of(func: Any) -> Any:
    """The out-of-place overload of an in-place op (``relu_.default`` -> ``relu.default``)."""
    name = func._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_foreach"):
        return None
    packet = getattr(aten, name[:-1], None)
    if packet is None:
        return None
    same = getattr(packet, func._overloadname, None)
    if same is not None:
        return same
    names = [a.name for a in func._schema.arguments]  # transpose_.default -> transpose.int
    for overload in packet.overloads():
        op = getattr(packet, overload)
        if [a.name for a in op._schema.arguments] == names:
            return op
    return None


def _is_view(func: Any) -> bool:
    schema = getattr(func, "_schema", None) if func is not None else None
    if schema is None or not schema.returns:
        return False
    info = schema.returns[0].alias_info
    return info is not None and not info.is_write


def _is_composite(func: Any) -> bool:
    return hasattr(func, "decompose") and func.has_kernel_for_dispatch_key(
        torch._C.DispatchKey.CompositeImplicitAutograd
    )


def _out_arguments(func: Any) -> list[str]:
    """Names of the ``out=`` arguments of an out variant (``add.out``), else []."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    return [
        a.name
        for a in schema.arguments
        if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
    ]


def _out_variant(func: Any) -> Any:
    """``op.out(..., out=o)``: the functional op, then a copy into ``o`` (its layout kept)."""
    names = _out_arguments(func)
    functional = _functional_overload(func, names)

    def run(*args, **kwargs):
        outs = [kwargs.pop(n) for n in names]
        operands = [a for a in (*args, *kwargs.values()) if isinstance(a, ShardedTensor)]
        for o in outs:
            if isinstance(o, ShardedTensor):
                _aliasing.check_overlap(func, o, operands)
        if functional is None:
            raise NoRuleError(
                f"{func}: shardlib runs out= variants as the functional op and a copy, and "
                f"found no functional overload of {func._schema.name}. Call the op without out= "
                "and assign the result."
            )
        result = functional(*args, **kwargs)
        results = result if isinstance(result, tuple | list) else (result,)
        for o, r in zip(outs, results):
            if not isinstance(o, ShardedTensor):
                raise LayoutError(
                    f"{func}: out= is a plain {type(o).__name__} but the result is sharded. "
                    "Pass a ShardedTensor as out, or call the op without out=."
                )
            if tuple(o.shape) != tuple(r.shape):
                raise LayoutError(
                    f"{func}: out= has shape {tuple(o.shape)} but the result has shape "
                    f"{tuple(r.shape)}; a sharded out= tensor cannot be resized. Pass an out "
                    "tensor of the result's shape, or call the op without out=."
                )
            aten.copy_.default(o, r)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run


def _functional_overload(func: Any, out_names: list[str]) -> Any:
    packet = func.overloadpacket
    wanted = [a.name for a in func._schema.arguments if a.name not in out_names]
    for name in packet.overloads():
        op = getattr(packet, name)
        if _out_arguments(op):
            continue
        if [a.name for a in op._schema.arguments] == wanted:
            return op
    return None


def _output_specs(
    func: Any, args: tuple, kwargs: dict, paths: tuple, tensors: list
) -> tuple[ArgSpec, ...]:
    if torch.Tag.data_dependent_output in func.tags:  # .item(): a Python number, no tensor
        return (None,)
    try:
        out = _on_meta(func, args, kwargs, paths, tensors)
    except NotImplementedError as e:  # an op without a meta kernel
        if torch.Tag.dynamic_output_shape in func.tags or "data-independent" in str(e):
            raise NoRuleError(
                f"{func}: its output shape depends on the values (like nonzero, unique or a "
                "boolean mask), which are spread over devices, so no layout rule can say what "
                "each device holds. Compute it on the global value (x.full()), or per device "
                "in sl.shard_map and assemble the result with sl.from_local."
            ) from None
        raise NoRuleError(
            f"{func}: shardlib infers output shapes on the meta device and this op has no meta "
            f"kernel ({type(e).__name__}: {e}). Compute it on x.full() or in sl.shard_map."
        ) from None
    except Exception as e:  # torch rejected the arguments (or its meta kernel differs)
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in tensors)
        raise ShapeInferenceError(
            f"{func} on tensors {shapes}: torch rejected the call when shardlib inferred the "
            f"output on the meta device: {type(e).__name__}: {e}. If plain torch accepts the "
            "same call, the op's meta kernel is missing or differs: compute it on x.full() or "
            "per device in sl.shard_map."
        ) from e
    if isinstance(out, torch.Tensor):
        return (_out_spec(out),)
    leaves = out if isinstance(out, list | tuple) else [out]
    # a trailing None marks "not a single tensor" (lists of one tensor, tuples, scalars)
    return (*(_out_spec(t) for t in leaves if isinstance(t, torch.Tensor)), None)


def _on_meta(func: Any, args: tuple, kwargs: dict, paths: tuple, tensors: list) -> Any:
    """`func` on meta stand-ins of the tensors (the global shapes, strides and dtypes).

    Some meta kernels insist that small plain operands stay on the CPU (``_foreach_addcmul_``'s
    ``scalars``): if the all-meta call fails, plain tensors are passed as they are.
    """
    m_args, m_kwargs = _substitute(args, kwargs, paths, [_meta(t) for t in tensors])
    if m_kwargs.get("device") is not None:  # e.g. randn_like(x, device="cpu"): stay on meta
        m_kwargs = {**m_kwargs, "device": torch.device("meta")}
    try:
        return func(*m_args, **m_kwargs)
    except Exception:
        if all(isinstance(t, ShardedTensor) for t in tensors):
            raise
        mixed = [_meta(t) if isinstance(t, ShardedTensor) else t for t in tensors]
        m_args, m_kwargs = _substitute(args, kwargs, paths, mixed)
        if m_kwargs.get("device") is not None:
            m_kwargs = {**m_kwargs, "device": torch.device("meta")}
        try:
            return func(*m_args, **m_kwargs)
        except Exception:
            pass
        raise


def _out_spec(t: torch.Tensor) -> ArgSpec:
    return ArgSpec(tuple(t.shape), t.dtype, None, tuple(t.stride()), t.storage_offset())


def _is_inplace(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    return bool(
        schema
        and schema.arguments
        and schema.arguments[0].alias_info
        and schema.arguments[0].alias_info.is_write
    )


def _all_replicated(func: Any, specs: tuple[ArgSpec, ...]) -> bool:
    """Every input replicated and not partial, and the op draws no random numbers."""
    return (
        bool(specs)
        and all(s.layout.is_replicated for s in specs)
        and torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ())
    )


def _locally(func: Any) -> Any:
    """Run `func` on each device's replicas; every tensor output is replicated (no communication)."""

    def run(*args, **kwargs):
        paths = _tensor_paths(args, kwargs)
        tensors = [_get(args, kwargs, p) for p in paths]
        mesh = _mesh_of(func, tensors)
        n = len(mesh.local_devices)
        blocks = [t._shards if isinstance(t, ShardedTensor) else [t] * n for t in tensors]
        results = [
            func(*a, **k)
            for a, k in (_substitute(args, kwargs, paths, [b[j] for b in blocks]) for j in range(n))
        ]
        if _is_inplace(func):
            _aliasing.after_write(tensors[0])
            return tensors[0]

        def wrap(i: int | None) -> Any:
            leaves = [r if i is None else r[i] for r in results]
            first = leaves[0]
            if not isinstance(first, torch.Tensor):
                return first
            return ShardedTensor(
                leaves,
                mesh,
                Layout(((),) * first.ndim),
                tuple(first.shape),
                False,
                tuple(first.stride()),
                first.storage_offset(),
            )

        first = results[0]
        if isinstance(first, tuple | list):
            return type(first)(wrap(i) for i in range(len(first)))
        return wrap(None)

    return run


_DECOMPOSITIONS: dict[Any, Any] = {}


def _decompositions() -> dict[Any, Any]:
    """torch's registered decompositions (`torch._decomp`), loaded on first use."""
    if not _DECOMPOSITIONS:
        from torch._decomp import decomposition_table

        _DECOMPOSITIONS.update(decomposition_table)
        _DECOMPOSITIONS[None] = None  # loaded
    return _DECOMPOSITIONS


def _inplace_view(func: Any) -> Any:
    """An in-place view op (``unsqueeze_``, ``squeeze_``, ``t_``, ``transpose_``, ...) on a ShardedTensor.

    Its out-of-place view's rule decides the new layout; where that needs no communication,
    every shard is re-viewed in place, the tensor takes the new layout, and its own (global)
    sizes and strides are changed as torch changes a plain tensor's. A tensor with alias views
    or links (`_aliasing.py`), or a view that would need communication, is refused.
    """
    functional = _functional_of(func)
    name = func._schema.name.split("::")[-1]
    fix = f"Use the out-of-place form and rebind the name: `x = x.{name[:-1]}(...)`."

    def run(self, *args, **kwargs):
        if self._root is not None or self._views or self._linked or self._link is not None:
            raise NoRuleError(
                f"{func}: {self.spec!r} {tuple(self.shape)} shares storage with other sharded "
                f"tensors (views of it, or it is a view), whose layouts would go stale. {fix}"
            )
        decision = _decide(functional, (self, *args), kwargs)
        strategy = decision.strategy
        if strategy.decompose is not None or strategy.inputs[0] != self._layout:
            raise NoRuleError(
                f"{func}: on {self.spec!r} {tuple(self.shape)} this view needs communication "
                f"(its rule wants the input in {strategy.inputs[0]!r}). {fix}"
            )
        if strategy.local is None:  # the same view on every shard, in place
            for s in self._shards:
                func(s, *args, **kwargs)
        else:  # a view whose per-device arguments differ (e.g. sizes): new views of the shards
            self._shards = [strategy.local(s, *args, **kwargs) for s in self._shards]
        self._layout = strategy.outputs[0]
        self._sig = None
        with torch.utils._mode_utils.no_dispatch():  # the wrapper's own sizes, as torch does
            meta = torch._C._meta_in_tls_dispatch_include()
            torch._C._set_meta_in_tls_dispatch_include(True)
            try:
                func(self, *args, **kwargs)
            finally:
                torch._C._set_meta_in_tls_dispatch_include(meta)
        return self

    return run


def _decomposed(func: Any, decomposition: Any) -> Any:
    """torch's decomposition of `func`; where one of its parts cannot run sharded, a NoRuleError.

    Strict mode's refusals and replica checks pass through unchanged.
    """

    def run(*args, **kwargs):
        try:
            out = decomposition(*args, **kwargs)
        except NoRuleError as e:
            raise NoRuleError(
                f"{func} has no layout rule, and torch's decomposition of it needs a part that "
                f"cannot run on these layouts: {e}"
            ) from e
        except ShardlibError as e:
            if _state["strict"] or not isinstance(e, LayoutError | ShapeInferenceError):
                raise
            raise NoRuleError(
                f"{func} has no layout rule, and torch's decomposition of it does not run on "
                f"sharded tensors ({type(e).__name__}: {e}). {_FIXES}"
            ) from e
        except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise NoRuleError(
                f"{func} has no layout rule, and torch's decomposition of it does not run on "
                f"sharded tensors ({type(e).__name__}: {e}). {_FIXES}"
            ) from e
        if out is NotImplemented:  # the decomposition does not cover these arguments
            raise NoRuleError(
                f"{func} has no layout rule, and torch's decomposition of it does not cover "
                f"these arguments. {_FIXES}"
            )
        return out

    return run


def _replicate_everything(ri: RuleInput) -> Strategy:
    return Strategy(
        tuple(Layout(((),) * s.ndim) for s in ri.tensors),
        tuple(Layout(((),) * s.ndim) for s in ri.outputs),
    )


def _no_rule_message(func: Any, specs: tuple[ArgSpec, ...]) -> str:
    layouts = ", ".join(f"{s.layout!r} {s.shape}" for s in specs)
    return f"shardlib has no layout rule for {func} (inputs: {layouts}). {_FIXES}"


_FIXES = (
    "Fixes: compute on the global value with x.full(), or per device with sl.shard_map; opt "
    "into gather-compute-keep-replica with `with sl.allow_replicate_fallback():` (recorded in "
    "the ledger); or add a rule: `@shardlib.ops.register_rule(torch.ops.aten.<op>)` on a "
    "function of a RuleInput that yields Strategy(input_layouts, output_layouts)."
)


# == running ===================================================================
def move(func: Any, a: ShardedTensor, want: Layout) -> ShardedTensor:
    """`a` redistributed to `want` for op `func`: implicit, in the ledger, checked by strict mode.

    The result is a fresh tensor that lives as long as the op needs it, with one exception: a
    reduction of a partial `a` (a result no larger than `a`'s blocks) is kept with `a`, and
    later ops that want `a` in the same layout get it again, with no communication, for as
    long as neither `a`'s storage nor the kept blocks are written (`_kept`). A partial value
    read by several ops (a norm's input, a residual stream) is reduced once, not once per
    op; gathers are never kept (FSDP's weights stay split between uses).
    """
    if a._layout.partial:
        kept = _kept(a, want)
        if kept is not None:
            return kept
    expanded = _expanded_dims(a, want)
    if expanded:
        return _move_compact(func, a, want, expanded)
    p = plan(a._layout, want, tuple(a.shape), a._mesh, a.dtype)
    am = a._mesh.abstract
    if all(
        getattr(s.step, "axes", None) and am.group_size(s.step.axes) == 1  # ppermute: ()
        for s in p.steps
    ):
        # every step is over axes of size 1: the blocks are already right (a relabelling)
        return ShardedTensor([t.clone() for t in a._shards], a._mesh, want, tuple(a.shape))
    if _state["strict"] and any(s.step.kind for s in p.steps):
        steps = ", ".join(f"{s.step} ({s.bytes} B)" for s in p.steps if s.step.kind)
        raise LayoutError(
            f"sl.strict: {func} needs communication: an input of shape {tuple(a.shape)} with "
            f"layout {a._layout!r} must become {want!r} ({steps}). Fix: make it explicit with "
            f"`x = sl.reshard(x, {want!r})` before the op, or leave strict mode."
        )
    shards = execute(p, a._mesh, a._shards, direction=current_direction(), cause=_cause(func))
    out = ShardedTensor(shards, a._mesh, want, tuple(a.shape))
    if a._layout.partial:
        _keep(a, want, out)
    return out


_move = move  # the name the rule modules import


def _versions(t: ShardedTensor) -> tuple:
    """Changes whenever `t`'s storage (its family's) or its blocks are written."""
    try:
        return (_aliasing._stamp(_aliasing.family_root(t)), *(s._version for s in t._shards))
    except RuntimeError:  # inference tensors keep no version counters: nothing is kept
        return ()


def _keep(a: ShardedTensor, want: Layout, out: ShardedTensor) -> None:
    """Keep `out`, a reduction of partial `a`, with `a` (see `move`)."""
    shape, am = tuple(a.shape), a._mesh.abstract
    # the largest block of any device, not this process's: every rank must take the same
    # decision (a kept copy skips the reduction's collective)
    if torch.compiler.is_compiling() or max_local_numel(shape, want, am) > max_local_numel(
        shape, a._layout, am
    ):
        return
    stamp = _versions(a)
    if stamp:
        a._kept = (want, stamp, out, _versions(out))
        # a signature of its own: the decisions of ops that read `a` are taken with `a` in
        # `want`, free (`_kept_layout`), and their `_run` gets the kept copy from `move`
        a._sig = _intern_sig(
            ("kept", want, a._layout, a.shape, a.dtype, a._mesh, a.stride(), a.storage_offset())
        )


def _kept_layout(a: ShardedTensor) -> Layout:
    """The layout an op that only reads `a` sees it in: its kept reduction's, if any."""
    kept = a._kept
    return a._layout if kept is None or _kept(a, kept[0]) is None else kept[0]


def _kept(a: ShardedTensor, want: Layout) -> ShardedTensor | None:
    kept = a._kept
    if kept is None or kept[0] != want or torch.compiler.is_compiling():
        return None
    if kept[1] != _versions(a) or kept[3] != _versions(kept[2]):
        a._kept = None  # written since: reduce again
        return None
    return kept[2]


def _expanded_dims(a: ShardedTensor, want: Layout) -> tuple[int, ...]:
    """Dims of an expanded view (stride 0, size > 1) that neither layout splits."""
    if a._layout.dims == want.dims and a._layout.partial == want.partial:
        return ()
    return tuple(
        d
        for d, (n, st) in enumerate(zip(a.shape, a.stride()))
        if st == 0 and n > 1 and not a._layout.dims[d] and not want.dims[d]
    )


def _move_compact(func: Any, a: ShardedTensor, want: Layout, dims: tuple[int, ...]):
    """Move an expanded view by moving its compact data (size 1 on `dims`) and expanding
    each block again: the bytes are those of the data, not of the broadcast."""
    from ._aliasing import sync

    sync(a)
    compact_shape = tuple(1 if d in dims else n for d, n in enumerate(a.shape))
    compact = ShardedTensor(
        [_narrow_all(t, dims) for t in a._shards], a._mesh, a._layout, compact_shape
    )
    moved = move(func, compact, want)
    shards = [
        t.expand(*(a.shape[d] if d in dims else -1 for d in range(a.ndim))) for t in moved._shards
    ]
    return ShardedTensor(shards, a._mesh, want, tuple(a.shape))


def _narrow_all(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    for d in dims:
        t = t.narrow(d, 0, 1)
    return t


def _cause(func: Any) -> str:
    return _state["cause"] + str(func).removeprefix("aten.")


def _run(func: Any, decision: _Decision, args: tuple, kwargs: dict) -> Any:
    strategy, paths = decision.strategy, decision.paths
    inputs = []
    mesh = None
    moved: dict[tuple[int, Layout], ShardedTensor] = {}  # one move per input and layout
    if decision.inplace:
        _aliasing.check_overlap(
            func, _get(args, kwargs, paths[0]), [_get(args, kwargs, p) for p in paths[1:]]
        )
    for path, want in zip(paths, strategy.inputs):
        a = _get(args, kwargs, path)
        if isinstance(a, ShardedTensor):
            mesh = a._mesh
            if a._root is not None:
                _aliasing.sync(a)
            if a._layout is not want and a._layout != want:
                key = (id(a), want)
                hit = moved.get(key)
                a = moved[key] = hit if hit is not None else move(func, a, want)
        inputs.append(a)
    if strategy.decompose is not None:
        d_args, d_kwargs = _substitute(args, kwargs, paths, inputs)
        out = strategy.decompose(*d_args, **d_kwargs)
        if decision.inplace and not getattr(strategy.decompose, "writes_through_dispatch", False):
            _aliasing.after_write(_get(args, kwargs, paths[0]))
        return out
    shard_lists = [
        a._shards if isinstance(a, ShardedTensor) else _constant_blocks(a, mesh, want)
        for a, want in zip(inputs, strategy.inputs)
    ]
    fn = strategy.local or func
    results = []
    for j, dev in enumerate(mesh.local_devices):
        d_args, d_kwargs = _substitute(args, kwargs, paths, [s[j] for s in shard_lists])
        if strategy.local_device:
            results.append(fn(dev, *d_args, **d_kwargs))
        else:
            results.append(fn(*d_args, **d_kwargs))
    if decision.inplace:
        target = _get(args, kwargs, paths[0])
        _aliasing.after_write(target)
        return target
    first = results[0]
    if isinstance(first, torch.Tensor):
        o = decision.out_specs[0]
        out = ShardedTensor(results, mesh, strategy.outputs[0], o.shape, False, o.stride, o.offset)
    else:
        outs, k = [], 0
        for i, leaf in enumerate(first):
            if isinstance(leaf, torch.Tensor):
                o = decision.out_specs[k]
                outs.append(
                    ShardedTensor(
                        [r[i] for r in results],
                        mesh,
                        strategy.outputs[k],
                        o.shape,
                        False,
                        o.stride,
                        o.offset,
                    )
                )
                k += 1
            else:
                outs.append(leaf)
        out = type(first)(outs) if isinstance(first, tuple | list) else outs
    if decision.view:
        base = _get(args, kwargs, paths[0])
        _aliasing.link_view(func, args, kwargs, base, out, inputs[0] is not base)
    return out


def _constant_blocks(t: torch.Tensor, mesh: Mesh, want: Layout) -> list[torch.Tensor]:
    """A plain tensor is a replicated constant: cut it locally to `want` (no communication)."""
    from ._api import _local_blocks

    if want.is_replicated:
        return [t] * len(mesh.local_devices)  # read-only use by the op; no copies
    return _local_blocks(t, mesh, want)._shards
