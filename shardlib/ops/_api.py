"""Public entry points that create, move and read out sharded tensors.

Owns `shard`, `from_local`, `reshard`, `full` and `visualize`, each with its
autograd rule (DESIGN §4, last paragraph: the cotangent of a reshard goes back
to the source layout with its partial axes made replicated, so a gather's
backward is a reduce-scatter only when the gradient arrives partial). Argument
checking for these calls lives here too, with errors that name the argument,
the values and a fix.
"""

from __future__ import annotations

from typing import Any

import torch

from .._errors import LayoutError, MeshMismatchError
from .._format import dtype_name
from ..collectives._compressed import Wire, execute_compressed, wire_of
from ..collectives._ledger import record
from ..collectives._redistribute import execute, pad_to_shape
from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ..layouts._planner import plan
from ..layouts._shard import local_bounds, local_shape, max_local_numel, max_local_shape
from ._aliasing import sync
from ._tensor import ShardedTensor

__all__ = ["from_local", "full", "reshard", "shard", "visualize", "with_layout"]


# == argument checks ===========================================================
def _check_mesh(mesh: Any, where: str) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise LayoutError(
            f"{where}: mesh must be a sl.Mesh, got {type(mesh).__name__}. "
            'Build one with sl.Mesh.simulated({"x": 4}) or sl.Mesh.distributed({...}).'
        )
    return mesh


def _check_layout(layout: Any, mesh: Mesh, ndim: int, dtype: torch.dtype, where: str) -> Layout:
    if not isinstance(layout, Layout):
        raise LayoutError(
            f"{where}: layout must be built with sl.P(...), got {layout!r}"
            + (
                f"; did you mean sl.P(*{tuple(layout)!r})?"
                if isinstance(layout, tuple | list)
                else "."
            )
        )
    layout = layout.check(mesh.abstract, ndim, where)
    if (
        layout.reduce_op == "avg"
        and layout.partial
        and not (dtype.is_floating_point or dtype.is_complex)
    ):
        raise LayoutError(
            f"{where}: {layout!r} is a partial average, but the tensor is {dtype}; an integer "
            "average would truncate. Cast to a floating dtype first, or use partial 'sum'."
        )
    return layout


def _check_sharded(x: Any, where: str) -> ShardedTensor:
    if not isinstance(x, ShardedTensor):
        hint = (
            " Use sl.shard(tensor, mesh, layout) to make one."
            if isinstance(x, torch.Tensor)
            else ""
        )
        raise LayoutError(f"{where}: expected a ShardedTensor, got {type(x).__name__}.{hint}")
    return x


def _as_sharded(g: Any, like_mesh: Mesh, shape: tuple[int, ...]) -> ShardedTensor:
    """A cotangent as a ShardedTensor: a plain tensor is a replicated constant."""
    if isinstance(g, ShardedTensor):
        if g._mesh != like_mesh:
            raise MeshMismatchError(f"gradient on {g._mesh!r}, expected {like_mesh!r}")
        return g
    return _local_blocks(g, like_mesh, Layout(((),) * len(shape)))


def _local_blocks(tensor: torch.Tensor, mesh: Mesh, layout: Layout) -> ShardedTensor:
    """Cut a global tensor every process holds into this process's blocks (no communication)."""
    shape = tuple(tensor.shape)
    shards = []
    for dev in mesh.local_devices:
        block = tensor
        for d, (lo, hi) in enumerate(local_bounds(shape, layout, mesh.abstract, dev)):
            if hi - lo != shape[d]:
                block = block.narrow(d, lo, hi - lo)
        if layout.partial and layout.reduce_op == "sum" and mesh.index_along(dev, layout.partial):
            shards.append(torch.zeros_like(block, memory_format=torch.contiguous_format))
        else:
            shards.append(block.clone(memory_format=torch.contiguous_format))
    return ShardedTensor(shards, mesh, layout, shape)


# == reshard ===================================================================
def _reshard_impl(
    x: ShardedTensor,
    layout: Layout,
    cause: str,
    direction: str,
    wire: Wire | None = None,
    donate: bool = False,
) -> ShardedTensor:
    """`x` moved to `layout` by the planner's plan; each step through `wire` when given, or
    when `x` is a `compressed_source` (issue 10: its regathers compress too)."""
    sync(x)
    p = plan(x._layout, layout, tuple(x.shape), x._mesh, x.dtype)
    if wire is None:
        wire = x._comm_wire
    if wire is None:
        shards = execute(p, x._mesh, x._shards, direction=direction, cause=cause, donate=donate)
    else:
        shards = execute_compressed(p, x._mesh, x._shards, wire, direction=direction, cause=cause)
    return ShardedTensor(shards, x._mesh, layout, tuple(x.shape))


class _Reshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, cause, direction):
        ctx.src_layout, ctx.mesh, ctx.cause = x._layout, x._mesh, cause
        return _reshard_impl(x, layout, cause, direction)

    @staticmethod
    def backward(ctx, g):
        g = _as_sharded(g, ctx.mesh, tuple(g.shape))
        target = ctx.src_layout.without_partial()
        if g._layout == target:
            return g, None, None, None
        return _Reshard.apply(g, target, ctx.cause, "backward"), None, None, None


# -- dtype= of reshard (issue 8, mixed precision) --
class _Cast(torch.autograd.Function):
    """Each device casts its blocks (layout kept, no communication); backward casts the
    cotangent back to the source dtype, also locally (None for a non-float source)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.src_dtype, ctx.mesh = x.dtype, x._mesh
        return _cast_blocks(x, dtype)

    @staticmethod
    def backward(ctx, g):
        if not (ctx.src_dtype.is_floating_point or ctx.src_dtype.is_complex):
            return None, None
        return _cast_blocks(_as_sharded(g, ctx.mesh, tuple(g.shape)), ctx.src_dtype), None


def _cast_blocks(x: ShardedTensor, dtype: torch.dtype) -> ShardedTensor:
    sync(x)
    return ShardedTensor([s.to(dtype) for s in x._shards], x._mesh, x._layout, tuple(x.shape))


def _check_cast(x: ShardedTensor, dtype: Any) -> ShardedTensor:
    """A partial `x` may be cast summand by summand only where that is a rounding of the
    sum (float to float) or exact (`_cast_commutes`): not float to int, nor to bool."""
    from ._pointwise import _cast_commutes

    if not isinstance(dtype, torch.dtype):
        raise LayoutError(
            f"sl.reshard(dtype={dtype!r}): dtype must be a torch.dtype, e.g. torch.bfloat16."
        )
    lay = x._layout
    floats = all(d.is_floating_point or d.is_complex for d in (x.dtype, dtype))
    if lay.partial and not (floats or _cast_commutes(lay.reduce_op, x.dtype, dtype)):
        raise LayoutError(
            f"sl.reshard(x, dtype={dtype}): x is {lay!r} in {x.dtype}; casting each summand "
            f"to {dtype} would not give the cast of the {lay.reduce_op}. Reduce first: "
            f"sl.reshard(x, {lay.without_partial()!r}) (in {x.dtype}), then cast."
        )
    return x


# -- end dtype= of reshard --


def reshard(
    x: ShardedTensor,
    layout: Layout,
    *,
    remat: bool = False,
    dtype: torch.dtype | None = None,
    comm_dtype: Any = None,
) -> ShardedTensor:
    """Return `x` with a new layout, moving data by the cheapest plan (see `sl.plan`).

    Differentiable: the gradient flows back to `x.spec` with its partial axes
    made replicated (a summand's gradient is the whole gradient).

    With ``remat=True`` the result is not kept for backward: where it is saved
    (by `sl.einsum(..., out_layout=)` and `snn.linear`, which handle it
    themselves, or any op inside `sl.remat_saves()`), only `x` is kept and the move is redone in
    backward, recorded with cause ``"regather"`` (FSDP's reshard after forward,
    SUMMA's memory).

    With ``dtype=`` (mixed precision, DESIGN §9) each device casts its blocks
    first, so the move communicates in `dtype` (the ledger shows its bytes);
    ``layout == x.spec`` just casts (no communication). The cast is
    differentiable: backward moves the cotangent back in the dtype it arrives
    in (`dtype`: the cheaper way; a partial cotangent is reduced in `dtype`),
    then casts it to ``x.dtype``. A partial `x` has its summands cast, then
    summed in `dtype` (rounding each summand; reshard in ``x.dtype`` and cast
    after for the exactly rounded sum). With ``remat=True`` the cast blocks
    (`x`'s blocks in `dtype`) are what is kept and re-gathered in backward.

    With ``comm_dtype=`` (compressed communication, DESIGN §10, ZeRO++) every
    communicating step of the plan sends blockwise ``"int8"`` or ``"fp8"`` (e4m3) values
    with one float32 scale per 256 elements (``shardlib.cuda._quant``; its CUDA kernels
    on a GPU), or ``torch.bfloat16`` values, and the result is in ``x.dtype``. A gather
    dequantizes every block, its own included (replicas agree bit for bit); a
    reduce-scatter quantizes each destination chunk of each summand once, moves them by
    one all-to-all and dequantize-reduces them in float32 in member order (never
    requantized per ring hop); partial to replicated is that reduce-scatter and a
    compressed gather; an all-to-all or a ppermute sends each piece encoded. A partial
    max/min raises. Per element and step, with absmax the largest magnitude of
    the element's 256-block: int8 ``|err| <= absmax/254``; fp8 ``|err| <= |x|/16 +
    absmax/458752`` (3 mantissa bits; the subnormal floor); bf16 ``|err| <= |x|/256``;
    a reduce-scatter adds up each summand's bound. The ledger records the wire dtype,
    the bytes with the scales, and `CommRecord.scale_bytes`. Differentiable: backward
    moves the cotangent with the same `comm_dtype` (a compressed gather's gradient is a
    compressed reduce-scatter where it arrives partial). Blocks holding inf or NaN come
    out NaN.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 4})
        >>> x = sl.shard(torch.arange(16.0).reshape(4, 4), mesh, sl.P("x", None))
        >>> y = sl.reshard(x, sl.P(None, "x"))
        >>> y.local_shards()[1].flatten().tolist()
        [1.0, 5.0, 9.0, 13.0]
        >>> with sl.comm_ledger() as led:
        ...     z = sl.reshard(x, sl.P(), dtype=torch.bfloat16)
        >>> z.dtype, [(r.kind, r.dtype, r.bytes) for r in led.records]
        (torch.bfloat16, [('all_gather', 'bfloat16', 24)])
        >>> with sl.comm_ledger() as led:
        ...     q = sl.reshard(x, sl.P(), comm_dtype="int8")
        >>> q.dtype, [(r.kind, r.dtype, r.bytes, r.scale_bytes) for r in led.records]
        (torch.float32, [('all_gather', 'int8', 24, 12)])
        >>> bool(((q.full() - torch.arange(16.0).reshape(4, 4)).abs() <= 15 / 254).all())
        True
    """
    _check_sharded(x, "sl.reshard(x=...)")
    # -- dtype= (issue 8, mixed precision): cast the blocks first, then move them --
    layout = _check_layout(
        layout, x._mesh, x.ndim, x.dtype if dtype is None else dtype, "sl.reshard(layout=...)"
    )
    if dtype is not None and dtype != x.dtype:
        x = _Cast.apply(_check_cast(x, dtype), dtype)
    # -- end dtype= --
    if comm_dtype is not None:  # issue 10: compressed communication
        wire = wire_of(comm_dtype, x.dtype, "sl.reshard(comm_dtype=...)")
        if layout == x._layout:
            return x
        y = _CompressedReshard.apply(x, layout, wire, wire, "reshard", "forward")
        if remat:
            y._remat = (compressed_source(x, wire), layout)
        return y
    if layout == x._layout:
        return x
    y = _Reshard.apply(x, layout, "reshard", "forward")
    if remat:
        y._remat = (x, layout)
    return y


# -- comm_dtype= of reshard (issue 10, compressed communication) --
class _CompressedReshard(torch.autograd.Function):
    """A compressed move; backward moves the cotangent back to the source layout (partial
    axes replicated) through `grad_wire` (None: uncompressed), ZeRO++ style: a gather's
    backward is a compressed reduce-scatter when the cotangent arrives partial."""

    @staticmethod
    def forward(ctx, x, layout, wire, grad_wire, cause, direction):
        ctx.src_layout, ctx.mesh, ctx.cause, ctx.grad_wire = x._layout, x._mesh, cause, grad_wire
        return _reshard_impl(x, layout, cause, direction, wire)

    @staticmethod
    def backward(ctx, g):
        g = _as_sharded(g, ctx.mesh, tuple(g.shape))
        target = ctx.src_layout.without_partial()
        if g._layout != target:
            if ctx.grad_wire is None:
                g = _Reshard.apply(g, target, ctx.cause, "backward")
            else:
                w = ctx.grad_wire
                g = _CompressedReshard.apply(g, target, w, w, ctx.cause, "backward")
        return g, None, None, None, None, None


def compressed_source(x: ShardedTensor, wire: Wire) -> ShardedTensor:
    """An alias of `x`'s blocks (no copy) that `_reshard_impl` moves through `wire`: the
    source a compressed ``remat`` move keeps, so its regather in backward (by `sl.einsum`,
    `snn.linear` or `remat_saves`) is compressed like the forward move."""
    sync(x)
    alias = ShardedTensor(list(x._shards), x._mesh, x._layout, tuple(x.shape))
    alias._comm_wire = wire
    return alias


# -- end comm_dtype= --


def _pack(t: torch.Tensor) -> Any:
    src = getattr(t, "_remat", None) if isinstance(t, ShardedTensor) else None
    return _Regather(src[0], src[1]) if src is not None else t


class _Regather:
    """A saved `remat` tensor: its source and layout; unpacking redoes the move."""

    __slots__ = ("source", "layout")

    def __init__(self, source: ShardedTensor, layout: Layout) -> None:
        self.source, self.layout = source, layout


def _unpack(saved: Any) -> Any:
    if isinstance(saved, _Regather):
        return _reshard_impl(saved.source, saved.layout, "regather", "backward")
    return saved


def remat_saves() -> Any:
    """A context in which autograd saves of `sl.reshard(..., remat=True)` results keep only
    their source and redo the move in backward (saved-tensor hooks, so not inside
    `torch.func` transforms, which refuse them; `sl.einsum` needs no context).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> w = sl.shard(torch.ones(4, 4), mesh, sl.P("x", None)).requires_grad_()
        >>> with sl.comm_ledger() as led:
        ...     with sl.remat_saves():
        ...         loss = (sl.reshard(w, sl.P(), remat=True) ** 2).sum()
        ...     loss.backward()
        >>> [r.cause for r in led.records if r.direction == "backward"]
        ['regather']
    """
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def with_layout(x: ShardedTensor, layout: Layout) -> ShardedTensor:
    """Pin `x` to `layout` (JAX's sharding constraint): a reshard with cause ``"with_layout"``.

    Use it to fix an intermediate's layout where several would be valid, so the
    ops around it are chosen against it.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> y = sl.with_layout(sl.shard(torch.ones(4, 4), mesh, sl.P(None, None)), sl.P("x", None))
        >>> y.spec
        P('x', None)
    """
    _check_sharded(x, "sl.with_layout(x=...)")
    layout = _check_layout(layout, x._mesh, x.ndim, x.dtype, "sl.with_layout(layout=...)")
    if layout == x._layout:
        return x
    return _Reshard.apply(x, layout, "with_layout", "forward")


# == full ======================================================================
class _Full(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        # The cotangent of full() is the same on every device: keep it replicated so the
        # producer of `x` moves it only as far as it must (a slice, for a reshard); a leaf
        # gets it cut to its own layout so `.grad` matches the parameter.
        ctx.mesh = x._mesh
        ctx.layout = x._layout if x.is_leaf else Layout(((),) * x.ndim)
        return _global_value(x, "full", "forward")

    @staticmethod
    def backward(ctx, g):
        return _local_blocks(g, ctx.mesh, ctx.layout.without_partial())


def full(x: ShardedTensor) -> torch.Tensor:
    """The global value of `x` (partials reduced) as a plain tensor on every process.

    Collective (every rank must call it), differentiable, in the ledger with
    cause ``"full"``.
    """
    _check_sharded(x, "x.full()")
    return _Full.apply(x)


# == shard / from_local ========================================================
# `sl.check_replicas` (ops/_replicas.py) registers ``check(call, given, out)`` here while on:
# it verifies values entering by `shard` (every rank passed the same tensor) and `from_local`.
_entry_checks: list = []


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, mesh, layout):
        ctx.mesh = mesh
        return _local_blocks(tensor, mesh, layout)

    @staticmethod
    def backward(ctx, g):
        g = _as_sharded(g, ctx.mesh, tuple(g.shape))
        return _global_value(g, "shard", "backward"), None, None


def _global_value(x: ShardedTensor, cause: str, direction: str) -> torch.Tensor:
    """The global value of `x` as a fresh plain tensor (a reshard to replicated, if needed)."""
    replicated = Layout(((),) * x.ndim)
    if x._layout == replicated:
        sync(x)
        return x._shards[0].clone()
    return _reshard_impl(x, replicated, cause, direction)._shards[0]


def shard(
    tensor: torch.Tensor | None, mesh: Mesh, layout: Layout, src: int | None = None
) -> ShardedTensor:
    """Split a global tensor over `mesh` as `layout` says.

    Args:
        tensor: the global value. With ``src=None`` every process passes the
            same value (no communication). With ``src=r`` only rank r's tensor
            is used; the others may pass None (broadcast or scatter, in the ledger).
        mesh: the `sl.Mesh`.
        layout: `sl.P(...)` with one entry per dim of `tensor`. A partial
            layout keeps the value on the device with index 0 along the partial
            axes and zeros elsewhere (``sum``), or the value everywhere (other ops).
        src: optional source rank (flat device index).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
        >>> x = sl.shard(torch.ones(4, 6), mesh, sl.P("dp", "tp"))
        >>> [tuple(s.shape) for s in x.local_shards()]
        [(2, 3), (2, 3), (2, 3), (2, 3)]
    """
    _check_mesh(mesh, "sl.shard(mesh=...)")
    if src is not None:
        return _shard_from(tensor, mesh, layout, src)
    if not isinstance(tensor, torch.Tensor):
        raise LayoutError(
            f"sl.shard(tensor=...): expected a torch.Tensor, got {type(tensor).__name__}. "
            "Wrap numbers with torch.tensor(...)."
        )
    if isinstance(tensor, ShardedTensor):
        raise LayoutError("sl.shard(tensor=...): already sharded; use sl.reshard(x, layout).")
    if _is_dtensor(tensor):
        raise LayoutError(
            f"sl.shard(tensor=...): got a DTensor ({tensor.placements} on a DeviceMesh of shape "
            f"{tuple(tensor.device_mesh.shape)}). sl.shard splits a global plain tensor; a "
            "DTensor's global value is dtensor.full_tensor() (a collective). The direct bridge, "
            "sl.from_dtensor(dt), keeps the shards where they are."  # h9h: the bridge exists
        )
    layout = _check_layout(layout, mesh, tensor.ndim, tensor.dtype, "sl.shard(layout=...)")
    out = _Shard.apply(tensor, mesh, layout)
    for check in _entry_checks:  # sl.check_replicas (ops/_replicas.py)
        check("sl.shard", tensor, out)
    return out


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _shard_from(tensor: torch.Tensor | None, mesh: Mesh, layout: Any, src: int) -> ShardedTensor:
    be, am = mesh.backend, mesh.abstract
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < mesh.size:
        raise LayoutError(f"sl.shard(src={src!r}): src is a rank in [0, {mesh.size}).")
    owns_src = src in mesh.local_devices
    if owns_src and not isinstance(tensor, torch.Tensor):
        raise LayoutError(
            f"sl.shard(tensor=..., src={src}): rank {src} must pass a torch.Tensor, "
            f"got {type(tensor).__name__}."
        )
    meta = be.broadcast_object(am, (tuple(tensor.shape), tensor.dtype) if owns_src else None, src)
    shape, dtype = meta
    layout = _check_layout(layout, mesh, len(shape), dtype, "sl.shard(layout=...)")
    itemsize = dtype.itemsize
    if not any(layout.dims):
        nbytes = max_local_numel(shape, layout, am) * itemsize
        value = be.broadcast(am, tensor.detach() if owns_src else None, src, shape, dtype)
        record(
            "broadcast",
            am.axis_names,
            am.size,
            nbytes,
            dtype_name(dtype),
            "forward",
            "shard",
            data=[value],
        )
        return _local_blocks(value, mesh, layout)
    pad = max_local_shape(shape, layout, am)
    pieces = None
    if owns_src:
        full_blocks = _local_blocks(tensor.detach(), Mesh.simulated(mesh.axes), layout)
        pieces = [pad_to_shape(b, pad) for b in full_blocks._shards]
    got = be.scatter(am, pieces, src, pad, dtype)
    nbytes = (am.size - 1) * max_local_numel(shape, layout, am) * itemsize
    record(
        "scatter", am.axis_names, am.size, nbytes, dtype_name(dtype), "forward", "shard", data=got
    )
    shards = []
    for dev, t in zip(mesh.local_devices, got):
        for d, n in enumerate(local_shape(shape, layout, am, dev)):
            t = t.narrow(d, 0, n)
        shards.append(t.contiguous())
    return ShardedTensor(shards, mesh, layout, shape)


class _FromLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mesh, layout, shape, *shards):
        ctx.mesh, ctx.layout = mesh, layout
        return ShardedTensor([s.detach().clone() for s in shards], mesh, layout, shape)

    @staticmethod
    def backward(ctx, g):
        g = _as_sharded(g, ctx.mesh, tuple(g.shape))
        target = ctx.layout.without_partial()
        if g._layout != target:
            g = _reshard_impl(g, target, "from_local", "backward")
        return (None, None, None, *g._shards)


def from_local(
    shards: list[torch.Tensor], mesh: Mesh, layout: Layout, shape: tuple[int, ...]
) -> ShardedTensor:
    """Assemble a ShardedTensor from this process's exact blocks; no communication.

    Args:
        shards: always a list: the unpadded blocks of the devices this process
            owns, in flat device order (all devices on a simulated mesh, one on
            a distributed mesh).
        mesh, layout: where the blocks sit.
        shape: the global shape.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> x = sl.from_local([torch.ones(2), torch.zeros(1)], mesh, sl.P("x"), (3,))
        >>> x.full().tolist()
        [1.0, 1.0, 0.0]
    """
    _check_mesh(mesh, "sl.from_local(mesh=...)")
    if not isinstance(shards, list | tuple) or not all(isinstance(s, torch.Tensor) for s in shards):
        raise LayoutError(
            f"sl.from_local(shards=...): expected a list of torch.Tensor, got "
            f"{type(shards).__name__}; pass [t] even for a single shard."
        )
    try:
        shape = tuple(int(n) for n in shape)
    except TypeError:
        raise LayoutError(
            f"sl.from_local(shape={shape!r}): the global shape is a tuple of ints."
        ) from None
    devices = mesh.local_devices
    if len(shards) != len(devices):
        raise LayoutError(
            f"sl.from_local(shards=...): got {len(shards)} shards, but this process owns "
            f"{len(devices)} devices of {mesh!r}; pass one block per device in flat order."
        )
    dtype = shards[0].dtype
    layout = _check_layout(layout, mesh, len(shape), dtype, "sl.from_local(layout=...)")
    wrong = []
    for dev, s in zip(devices, shards):
        want = local_shape(shape, layout, mesh.abstract, dev)
        if tuple(s.shape) != want or s.dtype != dtype or s.device != shards[0].device:
            wrong.append(f"device {dev}: got {tuple(s.shape)} {s.dtype}, want {want} {dtype}")
    if wrong:
        raise LayoutError(
            f"sl.from_local: shards do not match {layout!r} of global shape {shape} on "
            f"{mesh!r}: "
            + "; ".join(wrong[:8])
            + (" ..." if len(wrong) > 8 else "")
            + ". Shards are exact torch.chunk-style blocks (see sl.visualize)."
        )
    out = _FromLocal.apply(mesh, layout, shape, *shards)
    for check in _entry_checks:  # sl.check_replicas (ops/_replicas.py)
        check("sl.from_local", shards, out)
    return out


# == visualize =================================================================
def visualize(x: ShardedTensor | Any, *, show: bool = True) -> str:
    """Print (and return) which device holds which block of `x`.

    A 1-d or 2-d tensor is drawn as a grid of blocks, each cell listing the
    devices that hold it (``*`` marks a partial summand); higher ranks are
    listed block by block.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"a": 2, "b": 2})
        >>> _ = sl.visualize(sl.shard(torch.zeros(4, 6), mesh, sl.P("a", None)))
        P('a', None)  shape=(4, 6) on Mesh.simulated({'a': 2, 'b': 2})
        +----------------+
        | rows 0:2       |
        | dev 0,1        |
        +----------------+
        | rows 2:4       |
        | dev 2,3        |
        +----------------+
    """
    x = _check_sharded(x, "sl.visualize(x=...)")
    am, layout, shape = x._mesh.abstract, x._layout, tuple(x.shape)
    blocks: dict[tuple, list[str]] = {}
    for dev in range(am.size):
        b = local_bounds(shape, layout, am, dev)
        tag = str(dev) + ("*" if layout.partial else "")
        blocks.setdefault(b, []).append(tag)
    head = f"{layout!r}  shape={shape} on {x._mesh!r}"
    if len(shape) > 2 or len(shape) == 0:
        lines = [head] + [
            f"  [{', '.join(f'{lo}:{hi}' for lo, hi in b)}] on devices {','.join(d)}"
            for b, d in blocks.items()
        ]
    else:
        b2 = {((b[0]), (b[1] if len(b) > 1 else None)): d for b, d in blocks.items()}
        rows = sorted({r for r, _ in b2})
        cols = sorted({c for _, c in b2}, key=lambda c: c or (0, 0))
        cells = {}
        for (r, c), d in b2.items():
            label = f"rows {r[0]}:{r[1]}" + (f" cols {c[0]}:{c[1]}" if c and len(cols) > 1 else "")
            cells[(r, c)] = (label, "dev " + ",".join(d))
        width = max(max(len(s) for pair in cells.values() for s in pair), 14) + 2
        sep = "+" + "+".join("-" * width for _ in cols) + "+"
        lines = [head, sep]
        for r in rows:
            for i in range(2):
                lines.append(
                    "|"
                    + "|".join(f" {cells.get((r, c), ('', ''))[i]:<{width - 1}}" for c in cols)
                    + "|"
                )
            lines.append(sep)
    text = "\n".join(lines)
    if layout.partial:
        text += f"\n(* partial {layout.reduce_op} over {', '.join(layout.partial)})"
    if show:
        print(text)
    return text
