"""Per-device code: `shard_map` and the named-axis collectives used inside it (DESIGN §7).

Owns `shard_map(fn, mesh, in_layouts, out_layouts)`, the collectives `psum`,
`pmean`, `pmax`, `pmin`, `all_gather`, `psum_scatter`, `all_to_all`,
`ppermute`, `axis_index`, their autograd rules, and the lockstep that lets
the simulated backend run one Python call of `fn` per device. It does not own
the backends (`collectives/`), the ledger, or redistribution of whole
ShardedTensors (`sl.reshard`, which `shard_map` calls to bring inputs to
`in_layouts`).

How `fn` runs:
- **distributed** mesh (one device per process): `fn` runs once, in the
  calling thread, on this process's shards; a collective calls the backend.
- **simulated** mesh: `fn` runs once per device, each call on its own Python
  thread, in lockstep: at a collective every device deposits its tensor, the
  last to arrive checks that all devices made the same call with compatible
  shapes, runs the collective for all of them at once (one backend call, one
  autograd node, one ledger record) and wakes the others, who pick up their
  result. Results are deterministic (thread timing decides only *which*
  thread computes), and any Python control flow works as long as every device
  issues the same collectives in the same order (SPMD); a device that issues
  a different call, returns early or raises stops all of them with an error.
  A mesh with one local device (every distributed mesh) uses no threads.

Autodiff (the convention of JAX's `shard_map(..., check_vma=False)`): every
device's local value is its own variable, and each collective is the linear
map it computes, so its backward is its transpose, with no tracking of which
values are replicated:

    psum ⇄ psum                               all_gather ⇄ psum_scatter
    all_to_all ⇄ all_to_all (dims swapped)    ppermute ⇄ ppermute (pairs reversed)
    pmax, pmin: the summed cotangent goes to the devices holding the extremum

The two ends make this exact for the global function:
- an input replicated over mesh axes is handed to every device of those
  axes; its gradient is the *sum* of the devices' cotangents, returned
  lazily as a ShardedTensor that is partial (sum) over those axes;
- an output replicated over mesh axes is taken to be the mean of its
  (identical) replicas, so each device receives ``1/k`` of its cotangent
  (k = number of replicas); an output partial (sum) over axes gives every
  device the whole cotangent, partial (avg) gives ``1/k``.
DESIGN §7 pairs "psum of a varying value ⇄ identity": that is JAX's *typed*
rule (check_vma=True), which needs every local value to carry the set of axes
it varies over, and silently gives k-fold or partial gradients when a
replicated value meets a varying one unless conversions are inserted. The
untyped rule above is exact without that bookkeeping. The identity-backward
reduction of Megatron's row-parallel layer is still one line: return the
summand with ``out_layouts=sl.P(..., partial=axes)`` and let shardlib reduce
it outside `fn` (its cotangent reaches every device with no communication).

Invariants: `fn` sees plain tensors, fresh per device (never aliased across
devices or with the input ShardedTensor); every collective is one ledger
record per call (kind, axes, group size, ring-model bytes as in DESIGN §4,
direction, cause ``"shard_map:<name>"``), identical on both backends when
the groups' shapes are equal everywhere (with shapes that differ between
groups, a simulated mesh records the largest, a process its own).

Limits: collectives need equal shapes and dtypes within each group and
divisible split dims (as in JAX; checked with a clear error on a simulated
mesh, not checked on a distributed one, where a mismatch fails inside
`torch.distributed`). Inputs may not be partial. Outputs may be uneven
(torch.chunk-style blocks): the global shape is computed from every device's
local shape (a distributed mesh exchanges the local shapes of outputs with a
split dim: one small unrecorded all-gather of metadata, like the shape
broadcast of ``sl.shard(src=)``). Outputs declared replicated are compared
across their replicas (see `shard_map`'s `out_layouts` and `_replicas.py`): a
forgotten ``sl.psum`` is an error, not device 0's summand. The mapped function
is differentiable once (like ``x.full()``); a backward started *inside* fn
through a collective raises on a simulated mesh (see `_Collective`). `torch.func` transforms and autocast
do not reach into the per-device threads of a simulated mesh.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._errors import LayoutError, MeshMismatchError
from ..collectives._ledger import capture_hooks, current_direction, inherit_direction
from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh, Mesh
from ..layouts._planner import plan
from ..layouts._shard import local_shape
from ._api import _as_sharded, _check_layout, _check_mesh, _Reshard, _reshard_impl, shard
from ._named import (
    ShardMapError,
    _Aborted,
    _Device,
    _Lockstep,
    _tls,
)
from ._replicas import check_shard_map_outputs
from ._tensor import ShardedTensor

__all__ = ["shard_map"]


# == entering and leaving fn ===================================================
def _no_second_order() -> None:
    if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(create_graph=True)
        raise ShardMapError(
            "sl.shard_map: a backward with create_graph=True (second-order gradients, gradient "
            "penalties) through sl.shard_map is not supported: its backward is not itself "
            "differentiable. Take the higher-order gradient outside shard_map (write the "
            "computation with ops on ShardedTensors), or use create_graph=False."
        )


class _Enter(torch.autograd.Function):
    """ShardedTensors -> their local shards (arg-major, then device), fresh copies.

    Backward: each device's cotangent becomes that device's shard of the
    gradient, partial (sum) over the axes the input was replicated over.
    """

    @staticmethod
    def forward(ctx, mesh, *xs):
        ctx.mesh, ctx.meta = mesh, [(x._layout, tuple(x.shape)) for x in xs]
        return tuple(s.clone(memory_format=torch.contiguous_format) for x in xs for s in x._shards)

    @staticmethod
    def backward(ctx, *grads):
        _no_second_order()
        mesh, n = ctx.mesh, len(ctx.mesh.local_devices)
        out: list[Any] = [None]
        for i, (layout, shape) in enumerate(ctx.meta):
            replicated = layout.replicated_axes(mesh.abstract)
            g_layout = Layout(layout.dims, replicated) if replicated else layout
            shards = _distinct([g.contiguous() for g in grads[i * n : (i + 1) * n]])
            out.append(ShardedTensor(shards, mesh, g_layout, shape))
        return tuple(out)


class _Exit(torch.autograd.Function):
    """Local outputs (leaf-major, then device) -> ShardedTensors, one per output leaf.

    Backward: the cotangent is brought to the output's layout without its
    partial axes; each device's block is divided by the number of replicas
    it stands for (replicated axes; partial ``avg`` axes) -- see the module
    docstring.
    """

    @staticmethod
    def forward(ctx, mesh, layouts, shapes, *local):
        n = len(mesh.local_devices)
        ctx.mesh, ctx.layouts, ctx.shapes = mesh, layouts, shapes
        outs = []
        for j, (layout, shape) in enumerate(zip(layouts, shapes)):
            shards = [
                t.detach().clone(memory_format=torch.contiguous_format)
                for t in local[j * n : (j + 1) * n]
            ]
            outs.append(ShardedTensor(shards, mesh, layout, shape))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        _no_second_order()
        mesh, am = ctx.mesh, ctx.mesh.abstract
        out: list[Any] = [None, None, None]
        for layout, shape, g in zip(ctx.layouts, ctx.shapes, grads):
            g = _as_sharded(g, mesh, shape)
            target = layout.without_partial()
            if g._layout != target:
                g = _reshard_impl(g, target, "shard_map", "backward")
            k = am.group_size(layout.replicated_axes(am))
            if layout.reduce_op == "avg":
                k *= am.group_size(layout.partial)
            out.extend(s / k if k != 1 else s for s in g._shards)
        return tuple(out)


def _distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy any tensor that shares storage with an earlier one (replicas must not alias)."""
    seen, out = set(), []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out.append(t)
    return out


# == running fn per device =====================================================
def _run_devices(fn: Callable, mesh: Mesh, per_device: list[list[Any]]) -> list[Any]:
    """Call ``fn(*per_device[pos])`` for each local device; return the results in order."""
    devices = mesh.local_devices
    if len(devices) == 1:
        _tls.device = _Device(mesh, devices[0], 0, None)
        try:
            return [fn(*per_device[0])]
        finally:
            _tls.device = None
    if capture_hooks:
        from ._capture import CaptureError

        raise CaptureError(
            f"sl.capture: a simulated sl.shard_map over {len(devices)} devices runs them on "
            "threads, which the recording does not follow. Capture it on a distributed "
            "mesh (one device per process: sl.launch), or call this function eagerly."
        )
    sync = _Lockstep(len(devices))
    results: list[Any] = [None] * len(devices)
    errors: list[BaseException | None] = [None] * len(devices)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    direction = current_direction()  # a fn run inside a backward records "backward" (h2)

    def main(pos: int) -> None:
        _tls.device = _Device(mesh, devices[pos], pos, sync)
        try:
            with (
                torch.inference_mode(inference),
                torch.set_grad_enabled(grad),
                inherit_direction(direction),
            ):
                results[pos] = fn(*per_device[pos])
            sync.returned(pos)
        except BaseException as e:  # re-raised in the caller's thread below
            errors[pos] = e
            sync.fail()
        finally:
            _tls.device = None

    threads = [
        threading.Thread(target=main, args=(pos,), name=f"shard_map-device-{dev}", daemon=True)
        for pos, dev in enumerate(devices)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException:
        sync.fail()
        raise
    real = [
        (pos, e) for pos, e in enumerate(errors) if e is not None and not isinstance(e, _Aborted)
    ]
    if real:
        pos, e = real[0]
        if hasattr(e, "add_note"):
            e.add_note(f"(raised by fn on device {devices[pos]} of {mesh!r} in sl.shard_map)")
        raise e
    return results


def _global_shape(
    layout: Layout, mesh: AbstractMesh, shapes: list[tuple[int, ...]], where: str
) -> tuple[int, ...]:
    """The global shape whose torch.chunk-style blocks under `layout` are `shapes` (per device)."""
    shape = []
    for d, axes in enumerate(layout.dims):
        by_chunk: dict[int, set[int]] = {}
        for dev, s in enumerate(shapes):
            by_chunk.setdefault(mesh.index_along(dev, axes), set()).add(s[d])
        shape.append(sum(max(sizes) for sizes in by_chunk.values()))
    shape = tuple(shape)
    wrong = [
        f"device {dev}: {s}, want {local_shape(shape, layout, mesh, dev)}"
        for dev, s in enumerate(shapes)
        if local_shape(shape, layout, mesh, dev) != s
    ]
    if wrong:
        raise LayoutError(
            f"{where}: the devices' local shapes are not the blocks of one global tensor under "
            f"{layout!r} (torch.chunk-style: chunk c of n over k covers [c*ceil(n/k), ...), and "
            f"devices holding the same block hold equal shapes). Closest global shape {shape}: "
            + "; ".join(wrong[:6])
            + (" ..." if len(wrong) > 6 else "")
            + ". Fix fn's output shapes, or the out_layouts entry."
        )
    return shape


def _device_shapes(mesh: Mesh, leaves: list[list[torch.Tensor]], layouts: list[Layout]):
    """Per output leaf, every mesh device's local shape (exchanged on a distributed mesh)."""
    local = [[tuple(t.shape) for t in per_dev] for per_dev in leaves]  # [leaf][pos]
    am = mesh.abstract
    if len(mesh.local_devices) == am.size:
        return local
    if not any(any(axes) for layout in layouts for axes in layout.dims):
        return [[s[0]] * am.size for s in local]  # nothing split: every block is the whole
    vec = torch.tensor([n for s in local for n in s[0]], dtype=torch.int64)
    device = torch.device(getattr(mesh.backend, "device_type", "cpu"))
    (got,) = mesh.backend.all_gather(am, [vec.to(device)], am.axis_names)
    got = got.cpu().tolist()
    out, at = [], 0
    for s in local:
        nd = len(s[0])
        out.append([tuple(row[at : at + nd]) for row in got])
        at += nd
    return out


def _check_out_layout(layout: Any, where: str) -> Layout:
    if not isinstance(layout, Layout):
        raise LayoutError(f"{where}: expected a layout built with sl.P(...), got {layout!r}.")
    if layout.partial and layout.reduce_op in ("max", "min"):
        raise LayoutError(
            f"{where}: {layout!r} is a partial {layout.reduce_op}, whose gradient would need "
            f"the reduced value. Reduce inside fn with sl.p{layout.reduce_op}(x, "
            f"{layout.partial!r}) and return a replicated value, or use partial sum/avg."
        )
    return layout


# == shard_map =================================================================
def shard_map(
    fn: Callable[..., Any],
    mesh: Mesh,
    in_layouts: Layout | Sequence[Layout | None],
    out_layouts: Any,
) -> Callable[..., Any]:
    """Map `fn` over the local shards of its arguments, one call per device.

    Calling the result with ShardedTensors first reshards each to its entry of
    `in_layouts` (`sl.reshard`, in the ledger with cause ``"shard_map"``), then
    runs ``fn(*local_shards)`` on every device (plain tensors: this device's
    block), where named-axis collectives (`sl.psum`, `sl.all_gather`, ...)
    communicate, and wraps what `fn` returns as ShardedTensors with
    `out_layouts` (like `sl.from_local`; the global shapes are computed from the
    local ones, uneven torch.chunk-style blocks included). Differentiable; the
    gradient conventions are in the module docstring of `shardlib.ops._shard_map`
    (replicated inputs get partial-sum gradients; replicated outputs hand each
    replica 1/k of the cotangent). On a simulated mesh `fn` runs on one thread
    per device, in lockstep at collectives.

    Args:
        fn: ``fn(*local_tensors) -> tensor or pytree of tensors``; must issue
            the same collectives in the same order on every device.
        mesh: the `sl.Mesh`.
        in_layouts: one `sl.P(...)` per positional argument (a single layout
            for a one-argument fn); ``None`` passes a non-tensor argument
            unchanged to every device. A plain-tensor argument is a replicated
            constant cut to its layout (no communication). Not partial.
        out_layouts: a layout per output leaf, in the output's pytree structure
            (a single layout applies to every leaf). Partial ``sum``/``avg``
            is allowed: the local outputs are then the summands. Devices that
            differ only along an output's replicated axes must return equal
            values: checked on a simulated mesh always (beyond rounding; bitwise
            under `sl.check_replicas`), on a distributed one under the check
            (`sl.ReplicaMismatchError` names the leaf, the axis and the fix).

    Returns:
        A function of the same positional arguments returning ShardedTensors
        in `fn`'s output structure.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"tp": 2})
        >>> def row_parallel(x, w):          # x: [4, 3] block, w: [3, 5] block
        ...     return sl.psum(x @ w, "tp")
        >>> f = sl.shard_map(row_parallel, mesh, (sl.P(None, "tp"), sl.P("tp", None)),
        ...                  sl.P(None, None))
        >>> x, w = torch.randn(4, 6), torch.randn(6, 5)
        >>> y = f(sl.shard(x, mesh, sl.P(None, None)), sl.shard(w, mesh, sl.P(None, None)))
        >>> torch.allclose(y.full(), x @ w, atol=1e-6), y.spec
        (True, P(None, None))
    """
    _check_mesh(mesh, "sl.shard_map(mesh=...)")
    if not callable(fn):
        raise LayoutError(f"sl.shard_map(fn=...): fn must be callable, got {type(fn).__name__}.")
    if isinstance(in_layouts, Layout) or in_layouts is None:
        in_layouts = (in_layouts,)
    if not isinstance(in_layouts, tuple | list):
        raise LayoutError(
            f"sl.shard_map(in_layouts={in_layouts!r}): give one sl.P(...) per argument of fn, "
            "as a tuple (a single layout for a one-argument fn)."
        )
    in_layouts = tuple(in_layouts)
    for i, layout in enumerate(in_layouts):
        where = f"sl.shard_map(in_layouts[{i}])"
        if layout is not None and not isinstance(layout, Layout):
            raise LayoutError(f"{where}: expected sl.P(...) or None, got {layout!r}.")
        if layout is not None:
            layout.check(mesh.abstract, layout.ndim, where)
            if layout.partial:
                raise LayoutError(
                    f"{where}: {layout!r} is partial; fn receives whole values, not summands. "
                    f"Use {layout.without_partial()!r} (shard_map reduces the input first)."
                )
    flat_out, out_spec = tree_flatten(out_layouts)
    for j, layout in enumerate(flat_out):
        _check_out_layout(layout, f"sl.shard_map(out_layouts) leaf {j}")
        layout.check(mesh.abstract, layout.ndim, f"sl.shard_map(out_layouts) leaf {j}")

    @functools.wraps(fn)
    def mapped(*args: Any) -> Any:
        if getattr(_tls, "device", None) is not None:
            raise ShardMapError(
                "sl.shard_map: a mapped function was called inside another shard_map's fn; "
                "nesting is not supported. Call it outside, or inline its body in the outer fn."
            )
        if len(args) != len(in_layouts):
            raise LayoutError(
                f"sl.shard_map: the mapped {getattr(fn, '__name__', 'fn')} got {len(args)} "
                f"argument(s) but in_layouts has {len(in_layouts)} entries {in_layouts!r}; give "
                "one layout per positional argument (None for a non-tensor argument)."
            )
        tensors, slots = _prepare_inputs(args, in_layouts, mesh)
        n = len(mesh.local_devices)
        local = _Enter.apply(mesh, *tensors) if tensors else ()
        per_device = []
        for pos in range(n):
            dev_args = list(args)
            for slot, i in enumerate(slots):
                dev_args[i] = local[slot * n + pos]
            per_device.append(dev_args)
        outputs = _run_devices(fn, mesh, per_device)
        return _wrap_outputs(outputs, mesh, flat_out, out_spec, fn)

    return mapped


def _prepare_inputs(args, in_layouts, mesh: Mesh) -> tuple[list[ShardedTensor], list[int]]:
    """Bring every tensor argument to its layout; return them and their argument positions."""
    tensors, slots = [], []
    for i, (a, layout) in enumerate(zip(args, in_layouts)):
        where = f"sl.shard_map: argument {i}"
        if layout is None:
            if isinstance(a, torch.Tensor):
                raise LayoutError(
                    f"{where} is a tensor but in_layouts[{i}] is None (None passes non-tensor "
                    f"values). Give it a layout, e.g. sl.P({', '.join(['None'] * a.ndim)})."
                )
            continue
        if isinstance(a, ShardedTensor):
            if a._mesh != mesh:
                raise MeshMismatchError(
                    f"{where} lives on {a._mesh!r}, but the shard_map mesh is {mesh!r}. Build "
                    "both from the same axes and backend."
                )
            _check_layout(layout, mesh, a.ndim, a.dtype, f"sl.shard_map(in_layouts[{i}])")
            if a._layout != layout:
                a = _reshard_in(a, layout, i)
        elif isinstance(a, torch.Tensor):
            a = shard(a, mesh, layout)
        else:
            raise LayoutError(
                f"{where} is a {type(a).__name__}, but in_layouts[{i}] is {layout!r}; pass a "
                "tensor, or set in_layouts[i] to None to pass the value unchanged."
            )
        tensors.append(a)
        slots.append(i)
    return tensors, slots


def _reshard_in(a: ShardedTensor, layout: Layout, i: int) -> ShardedTensor:
    from . import _dispatch

    p = plan(a._layout, layout, tuple(a.shape), a._mesh, a.dtype)
    if _dispatch._state.get("strict") and any(s.step.kind for s in p.steps):
        steps = ", ".join(f"{s.step} ({s.bytes} B)" for s in p.steps if s.step.kind)
        raise LayoutError(
            f"sl.strict: sl.shard_map argument {i} of shape {tuple(a.shape)} has layout "
            f"{a._layout!r} but in_layouts[{i}] is {layout!r}, which needs communication "
            f"({steps}). Fix: `x = sl.reshard(x, {layout!r})` before the call, or leave strict mode."
        )
    return _Reshard.apply(a, layout, "shard_map", current_direction())


def _compact(spec: Any) -> str:
    return " ".join(str(spec).split())


def _wrap_outputs(outputs, mesh: Mesh, flat_out, out_spec, fn) -> Any:
    name = getattr(fn, "__name__", "fn")
    flat = [tree_flatten(o) for o in outputs]
    leaves0, spec0 = flat[0]
    for pos, (leaves, spec) in enumerate(flat):
        if spec != spec0:
            raise ShardMapError(
                f"sl.shard_map: {name} returned different structures on device "
                f"{mesh.local_devices[0]} ({_compact(spec0)}) and device "
                f"{mesh.local_devices[pos]} ({_compact(spec)}); every device returns the same "
                "pytree of tensors."
            )
        bad = [j for j, t in enumerate(leaves) if not isinstance(t, torch.Tensor)]
        if bad or any(isinstance(t, ShardedTensor) for t in leaves):
            j = (
                bad[0]
                if bad
                else next(j for j, t in enumerate(leaves) if isinstance(t, ShardedTensor))
            )
            raise LayoutError(
                f"sl.shard_map: output leaf {j} of {name} is a {type(leaves[j]).__name__}; fn "
                "returns plain local tensors (or a pytree of them)."
            )
    if len(flat_out) == 1 and out_spec.is_leaf():
        layouts = flat_out * len(leaves0)
    elif out_spec == spec0:
        layouts = list(flat_out)
    else:
        raise LayoutError(
            f"sl.shard_map: {name} returned {len(leaves0)} tensor(s) structured as "
            f"{_compact(spec0)}, but out_layouts has {len(flat_out)} layout(s) structured as "
            f"{_compact(out_spec)}. Give one sl.P(...) per output, in the same structure (or "
            "one layout for all)."
        )
    per_leaf = [[leaves[j] for leaves, _ in flat] for j in range(len(leaves0))]
    for j, (layout, ts) in enumerate(zip(layouts, per_leaf)):
        where = f"sl.shard_map(out_layouts) for output leaf {j} of {name}"
        if any(t.dtype != ts[0].dtype or t.ndim != ts[0].ndim for t in ts):
            raise LayoutError(
                f"{where}: the devices returned different dtypes or ranks: "
                f"{sorted({(str(t.dtype), t.ndim) for t in ts})}; every device returns the "
                "same dtype and rank for an output."
            )
        layouts[j] = _check_layout(layout, mesh, ts[0].ndim, ts[0].dtype, where)  # padded
    shapes = [
        _global_shape(layout, mesh.abstract, dev_shapes, f"sl.shard_map output leaf {j} of {name}")
        for j, (layout, dev_shapes) in enumerate(
            zip(layouts, _device_shapes(mesh, per_leaf, layouts))
        )
    ]
    if not per_leaf:
        return tree_unflatten([], spec0)
    # Declared-replicated outputs: compared on a simulated mesh always, under
    # sl.check_replicas on a distributed one (see _replicas.py).
    check_shard_map_outputs(mesh, layouts, shapes, per_leaf, name)
    wrapped = _Exit.apply(mesh, tuple(layouts), tuple(shapes), *(t for ts in per_leaf for t in ts))
    return tree_unflatten(list(wrapped), spec0)
