"""ZeRO as layouts (DESIGN §9): `sl.optim.zero(stage, axis)`.

Owns the ZeRO policy `Zero` (built by `zero`): for a parameter of layout L it
names four layouts, and `place`, `compute`, `reduce` and `state` move a pytree
to them. ``L+dp`` is L also split over the ZeRO axis (`Zero.split_layout`); the
stage table is `zero`'s docstring.

It deliberately owns no collective of its own kind: every move is a planner
plan (`_reshard_impl`) or one plan over a flat buffer of many tensors
(coalesced, DTensor #170367), so all of it is in the ledger. It owns no
optimizer (`_transform.py`) and no scheme (a scheme gives L; ZeRO adds the
axis on top).

Invariants:
- stateless: L is a tensor's layout with the ZeRO axis taken out of its dims
  (L never splits over the data axis: gradients there are partial), so a
  fresh policy, a resumed run and a checkpoint agree. A layout that splits
  over the axis but is not what the policy makes of its L raises;
- ``L+dp`` appends the axis as the minor-most split of one dim: among dims whose
  blocks under L can be cut in N (the axis size) so each L block is the union
  of N blocks of L+dp, the one with the largest block extent (>= N; ties: the
  first dim). A tensor with no such dim (a scalar, every block extent < N)
  stays L in every role; its gradient is all-reduced;
- every collective is recorded with cause ``zero.<what>`` (``zero.reduce``,
  ``zero.place``, ``zero.gather``, ``zero.grad``) or ``regather``;
- plain tensors and non-tensor leaves pass through every call untouched.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from .._errors import LayoutError
from ..collectives._compressed import Wire, wire_of
from ..collectives._ledger import current_direction
from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh
from ..layouts._shard import chunk_bounds, local_shape, max_chunk
from ..ops._aliasing import sync
from ..ops._api import _as_sharded, _reshard_impl, compressed_source
from ..ops._contractions import gradient_layout
from ..ops._foreach import reduced_copies
from ..ops._tensor import ShardedTensor

__all__ = ["STAGES", "Zero", "ZeroLayouts", "zero"]

STAGES = (0, 1, 2, 3)
_F = torch._C._functorch


class ZeroLayouts(NamedTuple):
    """The four layouts of one tensor under a ZeRO stage (see the module table)."""

    stored: Layout
    gradient: Layout
    state: Layout
    computed: Layout


# == L+dp ===========================================================================
_SPLIT: dict[tuple, Layout | None] = {}


def _nests(n: int, k: int, m: int) -> bool:
    """Whether each of the k torch.chunk blocks of n is the union of m consecutive of k*m."""
    for c in range(k):
        lo, hi = chunk_bounds(n, k, c)
        if chunk_bounds(n, k * m, c * m)[0] != lo or chunk_bounds(n, k * m, c * m + m - 1)[1] != hi:
            return False
    return True


def split_layout(
    layout: Layout, shape: tuple[int, ...], mesh: AbstractMesh, axis: str
) -> Layout | None:
    """L+axis: `layout` (without `axis`) also split over `axis`, or None when too small.

    The axis goes minor-most on the dim with the largest block extent under
    `layout` that is at least the axis size and whose blocks the axis cuts
    exactly (each L block the union of N L+axis blocks); ties go to the first dim.

    Examples:
        >>> import shardlib as sl
        >>> from shardlib.optim._zero import split_layout
        >>> am = sl.Mesh.simulated({"dp": 4, "tp": 2}).abstract
        >>> split_layout(sl.P(None, "tp"), (6, 16), am, "dp")
        P(None, ('tp', 'dp'))
        >>> split_layout(sl.P(None, "tp"), (10, 4), am, "dp")
        P('dp', 'tp')
        >>> split_layout(sl.P(), (3,), am, "dp") is None
        True
    """
    key = (layout, tuple(shape), mesh, axis)
    if key in _SPLIT:
        return _SPLIT[key]
    n_axis = mesh.axis_size(axis)
    best, best_extent = None, 0
    for d, (n, axes) in enumerate(zip(shape, layout.dims)):
        k = mesh.group_size(axes)
        extent = max_chunk(n, k)
        if extent >= n_axis and extent > best_extent and _nests(n, k, n_axis):
            best, best_extent = d, extent
    out = None if best is None else layout.with_dim(best, layout.dims[best] + (axis,))
    if len(_SPLIT) > 65536:
        _SPLIT.clear()
    _SPLIT[key] = out
    return out


# == functorch: read a transformed tensor's layout, move its cotangent =================
def _base(t: Any) -> Any:
    """The ShardedTensor under `torch.func`'s wrappers (or `t` itself)."""
    while isinstance(t, torch.Tensor) and _F.is_functorch_wrapped_tensor(t):
        t = _F.get_unwrapped(t)
    return t


def _move_cotangent(
    g: torch.Tensor, mesh: Any, target: Layout, wire: Wire | None = None
) -> torch.Tensor:
    """`g` moved to `target`'s gradient layout (`gradient_layout`), inside a backward
    (through `wire` when given: a compressed reduce-scatter).

    Under `torch.func` the cotangent arrives wrapped; it is unwrapped, moved by the
    planner and wrapped again at the same levels (first-order transforms only).
    """
    if not _F.is_functorch_wrapped_tensor(g):
        return _to_gradient_layout(g, mesh, target, wire)
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    interpreter = retrieve_current_functorch_interpreter()
    level = interpreter.level()
    inner = _F._unwrap_for_grad(g, level)
    with interpreter.lower():  # run the move below the transform, as its forward ran
        moved = _move_cotangent(inner, mesh, target, wire)
    return _F._wrap_for_grad(moved, level)


def _to_gradient_layout(
    g: torch.Tensor, mesh: Any, target: Layout, wire: Wire | None = None
) -> ShardedTensor:
    g = _as_sharded(g, mesh, tuple(g.shape))
    want = gradient_layout(target, mesh.abstract, g._layout)
    if g._layout == want:
        return g
    return _reshard_impl(g, want, "zero.grad", "backward", wire)


class _ToComputed(torch.autograd.Function):
    """Forward: `x` to `layout` (an alias when it is there already, else a planned move,
    cause ``zero.gather``, through `wire` when given). Backward: the cotangent to
    `grad_layout` (a partial cotangent over the ZeRO axis is reduce-scattered there as
    backward produces it, cause ``zero.grad``, through `grad_wire` when given).
    New-style (``setup_context``) so `torch.func.grad` runs it too."""

    @staticmethod
    def forward(
        x: ShardedTensor,
        layout: Layout,
        grad_layout: Layout,
        mesh: Any,
        wire: Wire | None = None,
        grad_wire: Wire | None = None,
    ) -> Any:
        if x._layout == layout:
            sync(x)
            return ShardedTensor(list(x._shards), x._mesh, layout, tuple(x.shape))
        return _reshard_impl(x, layout, "zero.gather", current_direction(), wire)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.grad_layout, ctx.mesh = inputs[2], inputs[3]
        ctx.grad_wire = inputs[5] if len(inputs) > 5 else None

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        moved = _move_cotangent(g, ctx.mesh, ctx.grad_layout, ctx.grad_wire)
        return moved, None, None, None, None, None


# == flat buffers: one collective for many tensors ====================================
class _Member(NamedTuple):
    """One tensor of a bucket: its global shape, L, L+dp and the dim dp cuts."""

    shape: tuple[int, ...]
    base: Layout
    split: Layout
    dim: int


def _pieces(m: _Member, am: AbstractMesh, dev: int, n_axis: int) -> list[tuple[int, int]]:
    """(offset, length) along `m.dim` inside `dev`'s L block of each of the N L+dp blocks."""
    axes = m.base.dims[m.dim]
    n, k = m.shape[m.dim], am.group_size(axes)
    c = am.index_along(dev, axes) if axes else 0
    lo = chunk_bounds(n, k, c)[0]
    out = []
    for i in range(n_axis):
        a, b = chunk_bounds(n, k * n_axis, c * n_axis + i)
        out.append((a - lo, b - a))
    return out


def _piece_numel(m: _Member, am: AbstractMesh, dev: int, length: int) -> int:
    block = local_shape(m.shape, m.base, am, dev)
    return math.prod(block[: m.dim]) * length * math.prod(block[m.dim + 1 :])


def _segment_size(members: list[_Member], am: AbstractMesh, n_axis: int) -> int:
    """C: the longest segment (one L+dp block of every member) over all devices."""
    longest = 0
    for dev in range(am.size):
        per_segment = [0] * n_axis
        for m in members:
            for i, (_, length) in enumerate(_pieces(m, am, dev, n_axis)):
                per_segment[i] += _piece_numel(m, am, dev, length)
        longest = max(longest, *per_segment)
    return longest


def _bucket_reduce_scatter(
    tensors: list[ShardedTensor],
    members: list[_Member],
    axis: str,
    partial: tuple[str, ...] | None = None,
    wire: Wire | None = None,
) -> list[ShardedTensor]:
    """Tensors in L partial over `partial` (`axis` and maybe others) -> reduced in L+dp: one
    reduce-scatter over `axis` in all, then one all-reduce of the scattered bucket over the
    other axes (the planner's order: the all-reduce moves the smaller piece).

    Each device lays out its L blocks as N segments of C elements, segment i holding
    every member's piece for the device of dp index i (zero-padded to C); the
    reduce-scatter of that buffer leaves each device its own segment, summed.
    """
    partial = partial or (axis,)
    first = tensors[0]
    mesh, am = first._mesh, first._mesh.abstract
    n_axis = am.axis_size(axis)
    size = _segment_size(members, am, n_axis)
    bufs = []
    for j, dev in enumerate(mesh.local_devices):
        segments: list[list[torch.Tensor]] = [[] for _ in range(n_axis)]
        for t, m in zip(tensors, members):
            for i, (off, length) in enumerate(_pieces(m, am, dev, n_axis)):
                segments[i].append(t._shards[j].narrow(m.dim, off, length).reshape(-1))
        flat = []
        for seg in segments:
            used = sum(p.numel() for p in seg)
            flat += seg + ([first._shards[j].new_zeros(size - used)] if size > used else [])
        bufs.append(torch.cat(flat) if flat else first._shards[j].new_zeros(0))
    # split over the other axes (devices there hold different blocks: a bucket replicated
    # over them would let the planner take one device's buffer for another's), dp minor
    free = tuple(a for a in mesh.axis_names if a not in partial)
    length = n_axis * size * am.group_size(free)
    bucket = ShardedTensor(bufs, mesh, Layout((free,), partial), (length,))
    dst = Layout((free + (axis,),))
    # through `wire` when grad_comm_dtype is set: one quantization per summand chunk
    out = _reshard_impl(bucket, dst, "zero.reduce", current_direction(), wire)
    results = []
    offsets = [0] * len(mesh.local_devices)
    for m in members:
        shards = []
        for j, dev in enumerate(mesh.local_devices):
            want = local_shape(m.shape, m.split, am, dev)
            numel = math.prod(want)
            shards.append(out._shards[j][offsets[j] : offsets[j] + numel].view(want))
            offsets[j] += numel
        results.append(ShardedTensor(shards, mesh, m.split, m.shape))
    return results


def _bucket_all_gather(
    tensors: list[ShardedTensor], members: list[_Member], axis: str
) -> list[ShardedTensor]:
    """Tensors in L+dp -> L: one all-gather in all (each device's blocks, flat, padded to C)."""
    first = tensors[0]
    mesh, am = first._mesh, first._mesh.abstract
    n_axis = am.axis_size(axis)
    size = _segment_size(members, am, n_axis)
    bufs = []
    for j in range(len(mesh.local_devices)):
        flat = [t._shards[j].reshape(-1) for t in tensors]
        used = sum(p.numel() for p in flat)
        if size > used:
            flat.append(first._shards[j].new_zeros(size - used))
        bufs.append(torch.cat(flat) if flat else first._shards[j].new_zeros(0))
    free = tuple(a for a in mesh.axis_names if a != axis)  # as in _bucket_reduce_scatter
    length = n_axis * size * am.group_size(free)
    bucket = ShardedTensor(bufs, mesh, Layout((free + (axis,),)), (length,))
    whole = _reshard_impl(bucket, Layout((free,)), "zero.place", current_direction())
    results = []
    offsets = [[i * size for i in range(n_axis)] for _ in mesh.local_devices]
    for m in members:
        shards = []
        for j, dev in enumerate(mesh.local_devices):
            block = local_shape(m.shape, m.base, am, dev)
            parts = []
            for i, (_, length) in enumerate(_pieces(m, am, dev, n_axis)):
                piece = block[: m.dim] + (length,) + block[m.dim + 1 :]
                numel = math.prod(piece)
                parts.append(whole._shards[j][offsets[j][i] : offsets[j][i] + numel].view(piece))
                offsets[j][i] += numel
            shards.append(torch.cat(parts, dim=m.dim) if len(parts) > 1 else parts[0].clone())
        results.append(ShardedTensor(shards, mesh, m.base, m.shape))
    return results


# == the policy =======================================================================
def _dims_record() -> tuple[Any, Any]:
    from ..nn._use import record_dims, recorded_dims

    return record_dims, recorded_dims


def _carry_dims(src: Any, out: Any) -> Any:
    """Give `out` the logical dims `snn.shard_params` recorded on `src` (snn.linear reads them)."""
    record_dims, recorded_dims = _dims_record()
    base = _base(src)
    dims = recorded_dims(base) if isinstance(base, torch.Tensor) else None
    if dims is not None and isinstance(out, torch.Tensor):
        record_dims(_base(out), dims)
    return out


def _leaf_like(src: torch.Tensor, out: ShardedTensor) -> ShardedTensor:
    """`out` detached, requiring grad as `src` does, with `src`'s recorded dims."""
    out = out.detach() if out.requires_grad or out.grad_fn is not None else out
    if src.requires_grad:
        out.requires_grad_(True)
    return _carry_dims(src, out)


@dataclass(frozen=True, slots=True)
class Zero:
    """ZeRO stage `stage` over mesh axis `axis`, as layouts (build with `zero`).

    See `zero` for the table, the step and the guarantees.
    """

    stage: int
    axis: str = "dp"
    comm_dtype: Any = None
    grad_comm_dtype: Any = None

    def _wire(self, comm_dtype: Any, t: ShardedTensor, arg: str) -> Wire | None:
        if comm_dtype is None or not t.dtype.is_floating_point:
            return None  # (an integer buffer moves exactly)
        return wire_of(comm_dtype, t.dtype, f"sl.optim.zero({self.stage}, {arg}=...)")

    # -- layouts ---------------------------------------------------------------
    def layouts(self, x: ShardedTensor) -> ZeroLayouts:
        """The stored, gradient, optimizer-state and computed layouts of `x` (a parameter,
        its gradient or a state tensor: L is its layout without the axis).

        Examples:
            >>> import shardlib as sl, torch
            >>> mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
            >>> w = sl.shard(torch.zeros(8, 6), mesh, sl.P(None, "tp"))
            >>> sl.optim.zero(1).layouts(w)
            ZeroLayouts(stored=P(None, 'tp'), gradient=P(None, 'tp'), state=P('dp', 'tp'), computed=P(None, 'tp'))
        """
        base, split = self._base_and_split(x, "layouts", "x")
        return self._table(base, split)

    def _table(self, base: Layout, split: Layout | None) -> ZeroLayouts:
        s = split if split is not None else base
        stored = s if self.stage == 3 else base
        gradient = s if self.stage >= 2 else base
        state = s if self.stage >= 1 else base
        return ZeroLayouts(stored, gradient, state, base)

    def _base_and_split(self, x: Any, call: str, where: str) -> tuple[Layout, Layout | None]:
        t = _base(x)
        mesh = t._mesh
        if self.axis not in mesh.axis_names:
            raise LayoutError(
                f"sl.optim.zero({self.stage}, axis={self.axis!r}).{call}: {where} lives on "
                f"{mesh!r}, whose axes are {mesh.axis_names}; there is no axis {self.axis!r} to "
                "split over. Build the mesh with that axis, or pass the data-parallel axis "
                f"the mesh has: zero({self.stage}, axis={mesh.axis_names[0]!r})."
            )
        layout, am, shape = t._layout, mesh.abstract, tuple(t.shape)
        base = Layout(tuple(tuple(a for a in axes if a != self.axis) for axes in layout.dims))
        split = split_layout(base, shape, am, self.axis)
        if (
            self.axis in {a for axes in layout.dims for a in axes}
            and layout.without_partial() != split
        ):
            raise LayoutError(
                f"sl.optim.zero({self.stage}, axis={self.axis!r}).{call}: {where} (shape {shape}) "
                f"is {layout!r}, already split over {self.axis!r}, but not as ZeRO splits "
                f"{base!r} (that is {split!r}). ZeRO adds the axis itself: pass parameters in "
                f"the layout they are computed in (here {base!r}, e.g. from snn.shard_params "
                f"with snn.dp({self.axis!r}) rather than snn.fsdp), or ZeRO over another axis."
            )
        return base, split

    def _check_param(self, x: Any, call: str, where: str) -> tuple[Layout, Layout | None]:
        base, split = self._base_and_split(x, call, where)
        layout = _base(x)._layout
        if layout.partial:
            raise LayoutError(
                f"sl.optim.zero({self.stage}, axis={self.axis!r}).{call}: {where} is partial "
                f"({layout!r}); a parameter has one value. Reduce it first: "
                f"sl.reshard(p, {layout.without_partial()!r})."
            )
        return base, split

    # -- the four calls -------------------------------------------------------
    def place(self, params: Any) -> Any:
        """`params` in their stored layouts: L at stages 0-2 (an all-gather of L+dp after an
        update, one per mesh and dtype), L+dp at stage 3 (a free slice of L).

        Returns new leaves (detached) that require grad where the input did; a tensor
        already stored where it belongs is returned as it is.

        Examples:
            >>> import shardlib as sl, torch
            >>> mesh = sl.Mesh.simulated({"dp": 4})
            >>> params = {"w": sl.shard(torch.ones(8, 2), mesh, sl.P()), "b": torch.zeros(2)}
            >>> placed = sl.optim.zero(3).place(params)
            >>> placed["w"].spec, placed["b"] is params["b"]  # plain tensors pass through
            (P('dp', None), True)
            >>> with sl.comm_ledger() as led:
            ...     back = sl.optim.zero(1).place(placed)  # L+dp -> L: one all-gather
            >>> back["w"].spec, [r.kind for r in led.records]
            (P(None, None), ['all_gather'])
        """
        paths, leaves, spec = _flatten(params)
        out = list(leaves)
        gathers: dict[tuple, list[tuple[int, _Member]]] = {}
        with torch.no_grad():
            for i, (path, p) in enumerate(zip(paths, leaves)):
                if not isinstance(_base(p), ShardedTensor):
                    continue
                base, split = self._check_param(p, "place", f"params{path}")
                want = self._table(base, split).stored
                if p._layout == want:
                    out[i] = p if p.is_leaf else _leaf_like(p, p)
                elif split is not None and p._layout == split and want == base:
                    m = _Member(tuple(p.shape), base, split, split.dim_of(self.axis))
                    gathers.setdefault((p._mesh, p.dtype), []).append((i, m))
                else:
                    out[i] = _leaf_like(
                        p, _reshard_impl(p, want, "zero.place", current_direction())
                    )
            for group in gathers.values():
                tensors = [leaves[i] for i, _ in group]
                for t in tensors:
                    sync(t)
                placed = _bucket_all_gather(tensors, [m for _, m in group], self.axis)
                for (i, _), t in zip(group, placed):
                    out[i] = _leaf_like(leaves[i], t)
        return pytree.tree_unflatten(out, spec)

    def compute(self, params: Any) -> Any:
        """`params` in their computed layout L, for the model to read.

        Stages 0 and 1: `params` itself. Stage 2: each tensor through an identity whose
        backward reduce-scatters its gradient to L+dp as backward produces it (cause
        ``zero.grad``), so full gradients never coexist. Stage 3: an all-gather of
        L+dp to L (``zero.gather``) that `sl.einsum` / `snn.linear` (and every op inside
        ``sl.remat_saves()``) do not keep for backward: they re-gather there
        (``regather``), and the gradient is reduce-scattered to L+dp.

        A mapping comes back as a lazy read-only mapping: a tensor moves when the model
        reads its key, so a gathered weight lives only while it is used. A key read again
        while its moved copy is alive gets that copy, and the latest read is kept until the
        mapping is dropped. Other pytrees (lists, tuples) move every tensor at once.

        Under `torch.func` transforms (first order) the same moves run, but saved-tensor
        hooks are refused there, so ops keep the gathered weights for backward (no re-gather).

        Examples:
            >>> import shardlib as sl, torch
            >>> mesh = sl.Mesh.simulated({"dp": 2})
            >>> z = sl.optim.zero(3)
            >>> params = z.place({"w": sl.shard(torch.ones(4, 4), mesh, sl.P())})
            >>> seen = z.compute(params)
            >>> "w" in seen, seen["w"].spec  # gathered when read
            (True, P(None, None))
        """
        if self.stage < 2:
            return params
        if isinstance(params, Mapping):
            return _Computed(self, params, "")
        return pytree.tree_map(lambda p: self._compute_one(p, "params"), params)

    def _compute_one(self, p: Any, where: str) -> Any:
        t = _base(p)
        if not isinstance(t, ShardedTensor):
            return p
        base, split = self._check_param(p, "compute", where)
        table = self._table(base, split)
        if table.computed == table.stored and table.gradient == table.stored:
            return p  # too small to split: the gradient comes as it is and `reduce` finishes it
        wire = self._wire(self.comm_dtype, t, "comm_dtype") if self.stage == 3 else None
        grad_wire = self._wire(self.grad_comm_dtype, t, "grad_comm_dtype")
        out = _ToComputed.apply(p, table.computed, table.gradient, t._mesh, wire, grad_wire)
        if isinstance(out, ShardedTensor) and table.computed != t._layout:
            # sl.einsum / snn.linear / sl.remat_saves re-gather from the source in backward:
            # through `wire` too, from an alias that `_reshard_impl` compresses
            if wire is None:
                out._remat = (p, table.computed)
            elif t is p:  # (under torch.func the gathered weight is kept instead)
                out._remat = (compressed_source(t, wire), table.computed)
        return _carry_dims(p, out)

    def reduce(self, grads: Any) -> Any:
        """Gradients in the optimizer state's layout: an all-reduce at stage 0 (to L), a
        reduce-scatter at 1 (to L+dp), nothing left at 2 and 3 (backward did it); a
        tensor too small to split is all-reduced at every stage.

        Coalesced: one all-reduce per (mesh, partial axes, dtype) and one reduce-scatter
        per (mesh, dtype) over a flat buffer, not one per tensor. A gradient in another
        layout is moved by its own plan. `None` leaves pass through.

        Examples:
            >>> import shardlib as sl, torch
            >>> mesh = sl.Mesh.simulated({"dp": 2})
            >>> grads = {k: sl.shard(torch.ones(4, n), mesh, sl.P(partial="dp")) for k, n in [("a", 3), ("b", 5)]}
            >>> with sl.comm_ledger() as led:
            ...     out = sl.optim.zero(1).reduce(grads)
            >>> out["a"].spec, out["b"].spec, [r.kind for r in led.records]  # one for both
            (P('dp', None), P(None, 'dp'), ['reduce_scatter'])
        """
        paths, leaves, spec = _flatten(grads)
        out = list(leaves)
        scatters: dict[tuple, list[tuple[int, _Member]]] = {}
        alls: list[int] = []
        with torch.no_grad():
            for i, (path, g) in enumerate(zip(paths, leaves)):
                if not isinstance(g, ShardedTensor):
                    continue
                base, split = self._base_and_split(g, "reduce", f"grads{path}")
                want = self._table(base, split).state
                layout = g._layout
                if layout == want:
                    continue
                # partial over dp, and maybe over other axes too (sp, a tp axis: a norm's
                # gradient), summed: coalesced with the other tensors partial over the same axes
                partial_here = (
                    layout.dims == base.dims
                    and self.axis in layout.partial
                    and layout.reduce_op == "sum"
                )
                if partial_here and want == base:
                    alls.append(i)
                elif partial_here and want == split:
                    m = _Member(tuple(g.shape), base, split, split.dim_of(self.axis))
                    scatters.setdefault((g._mesh, g.dtype, layout.partial), []).append((i, m))
                else:
                    out[i] = _reshard_impl(g, want, "zero.reduce", current_direction())
            if alls:
                copies = reduced_copies("zero.reduce", [leaves[i] for i in alls])
                for i in alls:
                    out[i] = copies[id(leaves[i])]
            for (_, _, partial), group in scatters.items():
                tensors = [leaves[i] for i, _ in group]
                for t in tensors:
                    sync(t)
                members = [m for _, m in group]
                wire = self._wire(self.grad_comm_dtype, tensors[0], "grad_comm_dtype")
                for (i, _), t in zip(
                    group, _bucket_reduce_scatter(tensors, members, self.axis, partial, wire)
                ):
                    out[i] = t
        return pytree.tree_unflatten(out, spec)

    def state(self, params: Any) -> Any:
        """`params` in the optimizer state's layout (L+dp at stages >= 1): a local slice of
        each device's block, no communication; detached.

        Examples:
            >>> import shardlib as sl, torch
            >>> mesh = sl.Mesh.simulated({"dp": 2})
            >>> params = {"w": sl.shard(torch.arange(8.0).reshape(4, 2), mesh, sl.P())}
            >>> with sl.comm_ledger() as led:
            ...     st = sl.optim.zero(1).state(params)
            >>> st["w"].spec, st["w"].local_shards()[1].tolist(), led.count()
            (P('dp', None), [[4.0, 5.0], [6.0, 7.0]], 0)
        """
        paths, leaves, spec = _flatten(params)
        out = list(leaves)
        with torch.no_grad():
            for i, (path, p) in enumerate(zip(paths, leaves)):
                if not isinstance(p, ShardedTensor):
                    continue
                base, split = self._check_param(p, "state", f"params{path}")
                want = self._table(base, split).state
                moved = (
                    p.detach()
                    if p._layout == want
                    else _reshard_impl(p, want, "zero.state", current_direction())
                )
                out[i] = _carry_dims(p, moved)
        return pytree.tree_unflatten(out, spec)


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """(key paths as strings, leaves, spec) of a pytree; a tensor is a leaf."""
    with_paths, spec = pytree.tree_flatten_with_path(tree)
    return [pytree.keystr(k) for k, _ in with_paths], [v for _, v in with_paths], spec


class _Computed(Mapping):
    """A mapping of parameters seen in their computed layouts, moved when a key is read."""

    def __init__(self, policy: Zero, params: Mapping, path: str) -> None:
        self._policy, self._params, self._path = policy, params, path
        self._seen: dict[Any, weakref.ref] = {}
        self._latest: Any = None  # the latest read stays alive (`x.dtype` then `f(x)`: one move)

    def __getitem__(self, key: Any) -> Any:
        value = self._params[key]
        where = f"params{self._path}[{key!r}]"
        if isinstance(value, Mapping):
            return _Computed(self._policy, value, f"{self._path}[{key!r}]")
        if not isinstance(value, torch.Tensor):
            return pytree.tree_map(lambda p: self._policy._compute_one(p, where), value)
        ref = self._seen.get(key)
        hit = ref() if ref is not None else None
        if hit is not None:
            return hit
        self._latest = None  # not alive while the next one is gathered
        out = self._policy._compute_one(value, where)
        self._seen[key] = weakref.ref(out)
        self._latest = out
        return out

    def __iter__(self) -> Iterator[Any]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __contains__(self, key: object) -> bool:
        return key in self._params

    def __repr__(self) -> str:
        return f"<{self._policy!r}.compute of {len(self)} params>"


def zero(
    stage: int, axis: str = "dp", *, comm_dtype: Any = None, grad_comm_dtype: Any = None
) -> Zero:
    """ZeRO (Rajbhandari et al. 2020) as a layout policy over mesh axis `axis`.

    For a parameter of layout L (what the scheme stores and computes it in) and
    ``L+dp`` (L also split over `axis`, minor-most, on its largest dim whose L
    blocks `axis` cuts exactly; uneven allowed; a scalar or a tensor whose
    blocks are all shorter than the axis stays L):

    | stage | stored | gradient | optimizer state | computed |
    |---|---|---|---|---|
    | 0 | L | L | L | L |
    | 1 | L | L | L+dp | L |
    | 2 | L | L+dp | L+dp | L |
    | 3 | L+dp | L+dp | L+dp | L (re-gathered in backward) |

    Bytes per device per step (Ψ the parameter bytes a dp group holds, N the
    axis size): stages 0-2 2Ψ(N-1)/N (stage 0 an all-reduce; 1 and 2 a
    reduce-scatter and the all-gather of `place`), stage 3 3Ψ(N-1)/N (gather,
    re-gather, reduce-scatter); uneven splits pad to the largest device's share.
    Optimizer state per device Ψ_state/N at stages >= 1.

    Compressed communication (ZeRO++, Wang et al. 2023; the formats of
    ``sl.reshard(comm_dtype=...)``): `comm_dtype` sends stage 3's weight gathers
    (``zero.gather`` and their ``regather`` in backward) in that format, so the model
    computes with the dequantized weights while the stored L+dp shards stay exact
    (qwZ); `grad_comm_dtype` sends the gradient reduce-scatters (``zero.grad`` in
    backward at stages 2-3, the bucket of `reduce` at stage 1) in it, each summand chunk
    quantized once and dequantize-reduced in float32 (qgZ). Gradient all-reduces (stage
    0, tensors too small to split) and `place`'s gathers (which write the stored weights)
    stay exact. Integer tensors always move exactly.

    Args:
        stage: 0, 1, 2 or 3.
        axis: the data-parallel mesh axis (gradients arrive partial over it).
        comm_dtype: None, ``"int8"``, ``"fp8"`` or ``torch.bfloat16``: the wire format
            of stage 3's weight gathers (stage 3 only).
        grad_comm_dtype: None or one of the same: the wire format of the gradient
            reduce-scatters (stages 1-3).

    Returns:
        A `Zero` with `place`, `compute`, `reduce`, `state` and `layouts`.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"dp": 4})
        >>> x = sl.shard(torch.randn(8, 6), mesh, sl.P("dp", None)).requires_grad_()
        >>> params = {"w": sl.shard(torch.randn(6, 6), mesh, sl.P())}
        >>> z = sl.optim.zero(3)
        >>> params = z.place(params)
        >>> params["w"].spec
        P('dp', None)
        >>> for p in params.values():
        ...     _ = p.requires_grad_()
        >>> with sl.comm_ledger() as led:
        ...     with sl.remat_saves():
        ...         loss = (x @ z.compute(params)["w"]).tanh().sum()
        ...     loss.backward()
        >>> grads = z.reduce({k: p.grad for k, p in params.items()})
        >>> grads["w"].spec, [(r.kind, r.cause) for r in led.records]  # gather, re-gather for dx
        (P('dp', None), [('all_gather', 'zero.gather'), ('all_gather', 'regather'), ('reduce_scatter', 'zero.grad')])
        >>> with torch.no_grad():  # SGD on the shards: the update is local
        ...     params = z.place({k: p - 0.1 * grads[k] for k, p in z.state(params).items()})
    """
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in STAGES:
        raise LayoutError(
            f"sl.optim.zero(stage={stage!r}): stage is one of 0, 1, 2, 3 (0: plain data "
            "parallel; 1: optimizer state split over the axis; 2: and gradients; 3: and "
            "parameters)."
        )
    if not isinstance(axis, str):
        raise LayoutError(
            f"sl.optim.zero({stage}, axis={axis!r}): axis is the name of the data-parallel "
            'mesh axis, e.g. zero(2, axis="dp").'
        )
    for arg, value in (("comm_dtype", comm_dtype), ("grad_comm_dtype", grad_comm_dtype)):
        if value is not None:
            wire_of(value, torch.float32, f"sl.optim.zero({stage}, {arg}={value!r})")
    if comm_dtype is not None and stage != 3:
        raise LayoutError(
            f"sl.optim.zero({stage}, comm_dtype={comm_dtype!r}): comm_dtype compresses stage "
            "3's weight gathers; below stage 3 weights are gathered only by place, which "
            "writes the stored weights and stays exact. Use zero(3, comm_dtype=...), or "
            f"grad_comm_dtype={comm_dtype!r} to compress the gradient reduce-scatters."
        )
    if grad_comm_dtype is not None and stage == 0:
        raise LayoutError(
            f"sl.optim.zero(0, grad_comm_dtype={grad_comm_dtype!r}): stage 0 reduces "
            "gradients by all-reduce, which grad_comm_dtype does not compress (it compresses "
            "the reduce-scatters of stages 1-3). Use stage >= 1, or sl.reshard(g, layout, "
            "comm_dtype=...) on the gradients yourself."
        )
    return Zero(stage, axis, comm_dtype, grad_comm_dtype)
