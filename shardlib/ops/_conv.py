"""Rules for convolution, pooling, padding and resampling (forward and backward).

Owns the layouts of the aten ops behind `F.conv*d` / `F.conv_transpose*d`
(``convolution``, ``convolution_backward``), the pools (max, avg, adaptive,
fractional, max_unpool; lp pools are avg pools in torch), the pads
(``constant_pad_nd``, ``reflection_pad*d``, ``replication_pad*d`` and their
backwards; ``F.pad(mode="circular")`` is torch's own decomposition into
slices and ``cat``), and resampling (``upsample_*``, ``_upsample_*_aa``,
``im2col`` / ``col2im``, ``pixel_shuffle`` / ``pixel_unshuffle``,
``channel_shuffle``, ``grid_sampler_2d/3d``). It does not own the ops these
decompose into elsewhere (``gather`` in max_unpool's backward: `_indexing.py`).

The rules, by op (A = mesh axes; N batch, C channels, S spatial dims):

- ``convolution`` (conv1d/2d/3d, transposed, groups, any stride, padding,
  dilation): N split over A -> local, output split on N. The weight's output
  channels split over A -> output split on C (bias split alike). The input
  channels split over A (input dim 1 and the weight's input-channel dim, alike;
  ``groups == 1``) -> output partial-``sum`` over A: the contraction over
  C_in, no gather; the bias is added by the devices at index 0 of the output's
  partial axes only. ``groups > 1``: channels split over A where every device's
  input and output channel blocks are whole groups (chunks that line up with
  the groups) -> a local conv with the device's own group count. A ``sum``
  partial input (or weight) stays partial (a conv is linear in each).
  **Spatial split** (non-transposed): an input split on a spatial dim over A
  keeps that split; each device exchanges with its neighbours only the rows
  its output block's windows reach beyond its own block (`_Rows`, one
  ``ppermute`` per neighbour distance: (k-1)·dilation rows in all for stride 1,
  split left/right by the padding; more for stride > 1 or uneven blocks), pads
  with zeros where the windows leave the tensor, and runs the conv with that
  dim's padding 0. The output is split on the same dim in the *standard*
  chunking of the output size (the rows a device needs are derived from its
  output block, so uneven splits and any stride are exact). Transposed convs
  need their spatial dims whole (gathered, in the ledger).
- ``convolution_backward``: the same placements. N split -> grad_weight and
  grad_bias partial-``sum`` over A; output channels split -> grad_input
  partial-``sum`` over A; input channels split -> grad_input split on C,
  grad_weight split alike; a partial grad_output stays partial in every
  gradient. Spatial split: the input's halo rows are exchanged again (only
  when grad_weight is wanted), a local backward runs on the extended block,
  and grad_input's halo rows flow back to their owners (the exchange's
  transpose: a ``ppermute`` the other way, then an add); grad_weight and
  grad_bias are partial-``sum`` over the spatial axes.
- ``max_pool{2,3}d_with_indices``, ``avg_pool{2,3}d`` and their backwards
  (``F.max_pool1d``/``avg_pool1d`` reach the 2d ops): the leading (batch,
  channel) dims keep their splits; a split spatial dim keeps its split by the
  conv's halo exchange (a fixed window is local to a few rows): the extended
  block is padded with -inf (max) or 0 (avg) and pooled with that dim's
  padding 0; max pool's indices are made global (a window that is all -inf
  points at its first real row, as torch's does); avg pool sums with divisor
  1 and divides by torch's divisor of each output position (count_include_pad,
  ceil_mode and divisor_override as torch). The backwards scatter into the
  extended block and send the halo rows' gradients back (the transpose).
- Other pools (adaptive, fractional, max_unpool), resampling, pixel/channel
  shuffles, grid_sampler: `batched`: the leading (batch, channel) dims run
  independently and keep their splits; the spatial dims are coupled and
  gathered when split (their windows depend on the whole size). Linear ones
  (avg pools, upsampling, im2col/col2im, max_unpool, the backwards in their
  gradient) keep a ``sum`` partial. grid_sampler: N and C of the input and
  the output positions of the grid are independent; its backward splits C
  (grad_grid partial-``sum`` over the channel axes). fractional_max_pool's
  random samples (drawn outside, by `torch.rand`) are split like the batch
  and channel dims. Upsample backwards get their block's ``input_size``.
- Pads: unpadded dims keep their splits (GPT-2's ``constant_pad_nd`` on an
  unsplit dim is local). A padded (or cropped) split dim keeps its split: the
  output is in the standard chunking of the padded size; each device takes
  the rows of its output block from its own block, the fill value, and the
  rows its neighbours hold (`_Rows`: rows move only across a block boundary,
  at most about the pad width per neighbour for constant and replicate pads;
  reflect pads also take the mirrored rows near the edges). Constant pads
  keep partials whose reduce op commutes with the fill (``sum`` only when the
  value is 0; ``avg``/``max``/``min`` always); reflect and replicate keep any
  partial (each output element copies one input element); their backwards
  (sums of contributions) keep ``sum``/``avg``. ``F.pad(mode="circular")``
  is decomposed by torch above dispatch (``_pad_circular`` is
  CompositeImplicitAutograd: slices copied into a new tensor), so with autograd
  on a split padded dim is gathered there (one all-gather of the input, in the
  ledger; the output is whole along that dim). Under ``torch.inference_mode``
  ``_pad_circular`` arrives whole and its rule keeps the split: each device takes
  only the wrapped rows it lacks (`_rechunk.RowMove`).

Strict mode refuses the row exchanges (they are implicit communication),
naming the op, the dim, the axes and the fix.

Invariant: every strategy is exact for uneven splits (empty blocks
included); a device whose block of some dim is empty produces its (empty or
zero) block without calling the kernel, which rejects empty inputs. Global
size arguments are made local where an op takes them (upsample backwards'
``input_size``, conv's ``bias_sizes`` and ``groups``). torch 2.13 lacks a meta
kernel for ``fractional_max_pool3d_backward`` (the dispatcher infers shapes on
the meta device): one is registered here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .._errors import LayoutError
from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh, Mesh
from ..layouts._planner import plan as _plan
from ..layouts._shard import chunk_bounds, local_shape
from . import _dispatch
from ._batched import batched, leading_batch
from ._named import _Call
from ._named import _run as _collective
from ._rechunk import RowMove, block_srcs, row_bytes, select_rows, take_rows
from ._rng import _bind
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor

aten = torch.ops.aten

Axes = tuple[str, ...]

__all__: list[str] = []


# == helpers ===================================================================
def _sum_partial(layout: Layout) -> Axes:
    return layout.partial if layout.partial and layout.reduce_op == "sum" else ()


def _mesh_of(*args: Any) -> Mesh:
    for a in args:
        if isinstance(a, ShardedTensor):
            return a._mesh
    raise LayoutError("shardlib internal: a decomposition without a sharded operand")


def _blocks(t: Any, mesh: Mesh, layout: Layout) -> list:
    """Per local device, the block of `t` under `layout` (a plain tensor is a replicated constant)."""
    if t is None:
        return [None] * len(mesh.local_devices)
    if isinstance(t, ShardedTensor):
        return list(t._shards)
    return _dispatch._constant_blocks(t, mesh, layout)


def _wrap(shards: list, mesh: Mesh, layout: Layout, spec: ArgSpec) -> ShardedTensor:
    return ShardedTensor(shards, mesh, layout, spec.shape, False, spec.stride, spec.offset)


def _intlist(v: Any, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 and n > 1 else v


# == row exchange (halos, shifted pad blocks) ==================================
@dataclass(frozen=True)
class _Rows:
    """A gather of rows along one split dim: device i's output rows ``srcs[i]`` (source rows).

    `dim` of size `n` is split over `axes` (P torch.chunk blocks); device i (its index
    along `axes`) must produce output rows whose source rows are ``srcs[i]`` (-1: the
    fill value). Rows it does not hold come from the devices that do, one ``ppermute``
    per distance s = i - j between receiver i and sender j, each buffer as wide as the
    most rows any device receives over that distance (`width`). The same plan run
    backwards (`_exchange_back`) sends the gradient of every received row to its owner.

    Examples:
        >>> r = _Rows(0, ("x",), 8, ((-1, 0, 1, 2), (1, 2, 3, 4), (3, 4, 5, 6), (5, 6, 7, -1)))
        >>> r.shifts, r.width
        ((-1, 1), {-1: 1, 1: 1})
    """

    dim: int
    axes: Axes
    n: int
    srcs: tuple[tuple[int, ...], ...]
    # derived in __post_init__: each device's own input block, the rows it receives per
    # distance, the distances used, their buffer widths, and each output row's position
    # in the device's pool of rows (own block, received rows, one fill row)
    bounds: tuple[tuple[int, int], ...] = field(init=False, compare=False, repr=False)
    need: dict[int, tuple[tuple[int, ...], ...]] = field(init=False, compare=False, repr=False)
    shifts: tuple[int, ...] = field(init=False, compare=False, repr=False)
    width: dict[int, int] = field(init=False, compare=False, repr=False)
    pos: tuple[tuple[int, ...], ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        p = len(self.srcs)
        size = -(-self.n // p) if self.n else 1
        bounds = tuple(chunk_bounds(self.n, p, i) for i in range(p))
        need: dict[int, list[tuple[int, ...]]] = {}
        for i, src in enumerate(self.srcs):
            owners: dict[int, set[int]] = {}
            for q in src:
                if q >= 0 and not bounds[i][0] <= q < bounds[i][1]:
                    owners.setdefault(q // size, set()).add(q)
            for j, rows in owners.items():
                need.setdefault(i - j, [()] * p)[i] = tuple(sorted(rows))
        shifts = tuple(sorted(need))
        width = {s: max(len(r) for r in need[s]) for s in shifts}
        pos = []
        for i, src in enumerate(self.srcs):
            lo, hi = bounds[i]
            where = {q: q - lo for q in range(lo, hi)}
            k = hi - lo
            for s in shifts:
                for q in need[s][i]:
                    where[q] = k
                    k += 1
            pos.append(tuple(where[q] if q >= 0 else k for q in src))  # k: the fill row
        object.__setattr__(self, "bounds", bounds)
        object.__setattr__(self, "need", {s: tuple(v) for s, v in need.items()})
        object.__setattr__(self, "shifts", shifts)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "pos", tuple(pos))

    def received(self, i: int) -> int:
        return sum(len(self.need[s][i]) for s in self.shifts)


def _check_strict(op: Any, plan: _Rows) -> None:
    if _dispatch._state["strict"] and plan.shifts:
        rows = ", ".join(f"{plan.width[s]} row(s) over distance {s}" for s in plan.shifts)
        raise LayoutError(
            f"sl.strict: {op} on a tensor whose dim {plan.dim} (size {plan.n}) is split over "
            f"{plan.axes!r} exchanges boundary rows with neighbouring devices ({rows}, "
            "ppermute). Fix: leave strict mode for this op, or sl.reshard the input so that dim "
            "is not split (e.g. split the batch dim instead)."
        )


def _shift(mesh: Mesh, axes: Axes, s: int, bufs: list, cause: str) -> list:
    """`bufs` sent from index j to index j + s along `axes` (a ppermute, in the ledger)."""
    p = mesh.abstract.group_size(axes)
    pairs = tuple((j, j + s) for j in range(p) if 0 <= j + s < p)
    return _collective(_Call("ppermute", axes, (pairs,), cause), mesh, bufs)


def _exchange(op: Any, plan: _Rows, mesh: Mesh, shards: list, fill: Any = 0) -> list:
    """Per local device, its output rows of `plan` (fresh tensors, never views of `shards`)."""
    _check_strict(op, plan)
    am, d, p = mesh.abstract, plan.dim, len(plan.srcs)
    idx = [am.index_along(dev, plan.axes) for dev in mesh.local_devices]
    cause = _dispatch._cause(op)
    received: dict[int, list] = {}
    for s in plan.shifts:
        bufs = []
        for x, i in zip(shards, idx):
            rows = plan.need[s][i + s] if 0 <= i + s < p else ()
            lo = plan.bounds[i][0]
            bufs.append(take_rows(x, d, [q - lo for q in rows], plan.width[s]))
        got = _shift(mesh, plan.axes, s, bufs, cause)
        received[s] = [g.narrow(d, 0, len(plan.need[s][i])) for g, i in zip(got, idx)]
    out = []
    for j, (x, i) in enumerate(zip(shards, idx)):
        parts = [x] + [received[s][j] for s in plan.shifts]
        if any(q < 0 for q in plan.srcs[i]):
            shape = list(x.shape)
            shape[d] = 1
            parts.append(x.new_full(shape, fill))
        pool = torch.cat(parts, d) if len(parts) > 1 else x
        block = select_rows(pool, d, plan.pos[i])
        out.append(block.clone() if pool is x else block)
    return out


def _exchange_back(op: Any, plan: _Rows, mesh: Mesh, grads: list) -> list:
    """The transpose of `_exchange`: output-row gradients summed into their source rows."""
    _check_strict(op, plan)
    am, d, p = mesh.abstract, plan.dim, len(plan.srcs)
    idx = [am.index_along(dev, plan.axes) for dev in mesh.local_devices]
    cause = _dispatch._cause(op)
    owns, pieces = [], []
    for g, i in zip(grads, idx):
        lo, hi = plan.bounds[i]
        shape = list(g.shape)
        shape[d] = hi - lo + plan.received(i) + 1
        pool = g.new_zeros(shape)
        pos = torch.as_tensor(plan.pos[i], dtype=torch.long, device=g.device)
        pool.index_add_(d, pos, g)
        owns.append(pool.narrow(d, 0, hi - lo).clone())
        at, mine = hi - lo, {}
        for s in plan.shifts:
            k = len(plan.need[s][i])
            mine[s] = pool.narrow(d, at, k)
            at += k
        pieces.append(mine)
    for s in plan.shifts:
        bufs = []
        for mine in pieces:
            piece = mine[s]
            if piece.shape[d] < plan.width[s]:
                shape = list(piece.shape)
                shape[d] = plan.width[s] - piece.shape[d]
                piece = torch.cat([piece, piece.new_zeros(shape)], d)
            bufs.append(piece)
        got = _shift(mesh, plan.axes, -s, bufs, cause)
        for own, g, i in zip(owns, got, idx):
            if not 0 <= i + s < p:
                continue
            rows = plan.need[s][i + s]
            lo = plan.bounds[i][0]
            where = torch.as_tensor([q - lo for q in rows], dtype=torch.long, device=g.device)
            own.index_add_(d, where, g.narrow(d, 0, len(rows)))
    return owns


# == convolution ===============================================================
class _Assign(NamedTuple):
    """Which mesh axes split what in a convolution (disjoint axis sets).

    n: the batch; co: output channels (``groups == 1``); ci: input channels
    (``groups == 1``, a contraction: partial output); g: whole groups (input and
    output channels alike, ``groups > 1``); sp: per spatial dim (halo exchange);
    pin: a ``sum`` partial of the input (forward) or of grad_output (backward);
    pw: a ``sum`` partial of the weight (forward).
    """

    n: Axes = ()
    co: Axes = ()
    ci: Axes = ()
    g: Axes = ()
    sp: tuple[Axes, ...] = ()
    pin: Axes = ()
    pw: Axes = ()

    def clean(self, nsp: int) -> _Assign:
        """The same with any field whose axes repeat an earlier field's dropped."""
        used: set[str] = set()

        def keep(axes: Axes) -> Axes:
            if used.intersection(axes):
                return ()
            used.update(axes)
            return tuple(axes)

        n, g, co, ci = keep(self.n), keep(self.g), keep(self.co), keep(self.ci)
        sp = tuple(keep(a) for a in (*self.sp, *((),) * nsp)[:nsp])
        return _Assign(n, co, ci, g, sp, keep(self.pin), keep(self.pw))

    @property
    def spatial_axes(self) -> Axes:
        return tuple(a for axes in self.sp for a in axes)


@dataclass(frozen=True)
class _Geometry:
    """The static shape facts of one convolution call."""

    transposed: bool
    groups: int
    nsp: int
    cin: int
    cout: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    kernel: tuple[int, ...]
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]

    @property
    def w_out(self) -> int:
        return 1 if self.transposed else 0

    @property
    def w_in(self) -> int:
        return 0 if self.transposed else 1

    def aligned(self, am: AbstractMesh, axes: Axes) -> bool:
        """Whether splitting channels over `axes` gives every device whole groups."""
        if not axes or self.groups == 1:
            return False
        k = am.group_size(axes)
        for c in (self.cin, self.cout):
            per = c // self.groups
            for i in range(k):
                lo, hi = chunk_bounds(self.groups, k, i)
                if chunk_bounds(c, k, i) != (lo * per, hi * per):
                    return False
        return True

    def halo(self, k: int, axes: Axes, am: AbstractMesh) -> _Rows:
        """The input rows each device needs along spatial dim `k` for its output block."""
        return _window_rows(
            2 + k,
            axes,
            am,
            self.in_spatial[k],
            self.out_spatial[k],
            (self.kernel[k], self.stride[k], self.padding[k], self.dilation[k]),
        )


def _window_rows(
    dim: int, axes: Axes, am: AbstractMesh, n: int, o: int, window: tuple[int, int, int, int]
) -> _Rows:
    """The input rows each device's output block of a sliding window reads (-1: padding).

    Output row r reads input rows ``r*stride - pad + j*dilation`` (j < kernel); a device's
    block of the output (the standard chunking of `o` rows over `axes`) reads a contiguous
    range of them.
    """
    ker, stride, pad, dil = window
    p = am.group_size(axes)
    srcs = []
    for i in range(p):
        lo, hi = chunk_bounds(o, p, i)
        rows = range(lo * stride - pad, (hi - 1) * stride - pad + dil * (ker - 1) + 1)
        srcs.append(tuple(q if 0 <= q < n else -1 for q in rows) if hi > lo else ())
    return _Rows(dim, axes, n, tuple(srcs))


def _geometry(b: dict, x: ArgSpec, w: ArgSpec) -> _Geometry:
    nsp = x.ndim - 2
    transposed, groups = bool(b["transposed"]), int(b["groups"])
    out_spatial = ()
    cin = x.shape[1]
    cout = w.shape[1] * groups if transposed else w.shape[0]
    stride = tuple(_intlist(b["stride"], nsp))
    padding = tuple(_intlist(b["padding"], nsp))
    dilation = tuple(_intlist(b["dilation"], nsp))
    kernel = tuple(w.shape[2:])
    if not transposed:
        out_spatial = tuple(
            (x.shape[2 + k] + 2 * padding[k] - dilation[k] * (kernel[k] - 1) - 1) // stride[k] + 1
            for k in range(nsp)
        )
    return _Geometry(
        transposed,
        groups,
        nsp,
        cin,
        cout,
        stride,
        padding,
        dilation,
        kernel,
        tuple(x.shape[2:]),
        out_spatial,
    )


def _weight_dims(geo: _Geometry, a: _Assign, ndim: int) -> tuple[Axes, ...]:
    dims: list[Axes] = [()] * ndim
    dims[geo.w_out] = a.co
    dims[geo.w_in] = a.ci
    dims[0] = dims[0] + a.g  # the groups are the major factor of weight dim 0 either way
    return tuple(dims)


def _local_groups(geo: _Geometry, a: _Assign, x: torch.Tensor) -> int:
    return x.shape[1] // (geo.cin // geo.groups) if a.g else geo.groups


def _forward_local(geo: _Geometry, a: _Assign, out: ArgSpec, out_layout: Layout, am: AbstractMesh):
    """The per-device conv: local group count, bias on one device of the partial axes only."""
    halo = {k for k, axes in enumerate(a.sp) if axes}

    def local(dev, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
        shape = local_shape(out.shape, out_layout, am, dev)
        add_bias = b is not None and (
            not out_layout.partial or am.index_along(dev, out_layout.partial) == 0
        )
        g = _local_groups(geo, a, x)
        if g == 0 or 0 in x.shape[:2] or 0 in w.shape[:2] or 0 in shape:
            y = x.new_zeros(shape)
            if add_bias and y.numel():
                y += b.reshape(1, -1, *(1,) * geo.nsp)
            return y
        pad = [0 if k in halo else p for k, p in enumerate(_intlist(padding, geo.nsp))]
        return aten.convolution.default(
            x, w, b if add_bias else None, stride, pad, dilation, transposed, output_padding, g
        )

    return local


def _forward_assigns(ri: RuleInput, geo: _Geometry) -> list[_Assign]:
    x, w = ri.tensors[:2]
    xd, wd = x.layout.dims, w.layout.dims
    pin, pw = _sum_partial(x.layout), _sum_partial(w.layout)
    sp = () if geo.transposed else xd[2:]
    if geo.groups == 1:
        first = [
            _Assign(n=xd[0], ci=xd[1], co=wd[geo.w_out], sp=sp, pin=pin, pw=pw),
            _Assign(n=xd[0], co=wd[geo.w_out], ci=wd[geo.w_in], sp=sp, pin=pin, pw=pw),
        ]
    else:
        first = [
            _Assign(n=xd[0], g=axes, sp=sp, pin=pin, pw=pw)
            for axes in (xd[1], wd[0])
            if geo.aligned(ri.mesh, axes)
        ]
    rest = [_Assign(n=xd[0], sp=sp, pin=pin, pw=pw), _Assign(n=xd[0]), _Assign(sp=sp), _Assign()]
    out: list[_Assign] = []
    for a in [*first, *rest]:
        for c in (a, a._replace(pin=(), pw=())):
            c = c.clean(geo.nsp)
            if c not in out:
                out.append(c)
    return out


def _conv_halo(op: Any, geo: _Geometry, a: _Assign, plans: list[_Rows], layouts, local, out_spec):
    w_layout, b_layout, out_layout = layouts

    def decompose(x, w, b, *rest):
        mesh = _mesh_of(x, w, b)
        xs = list(x._shards)
        for plan in plans:
            xs = _exchange(op, plan, mesh, xs)
        ws, bs = _blocks(w, mesh, w_layout), _blocks(b, mesh, b_layout)
        shards = [
            local(dev, xs[j], ws[j], bs[j], *rest) for j, dev in enumerate(mesh.local_devices)
        ]
        return _wrap(shards, mesh, out_layout, out_spec)

    return decompose


@register_rule(aten.convolution.default)
def convolution_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Batch and channel splits local (input channels -> partial sum); spatial splits: halos."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    x, w = ri.tensors[:2]
    has_bias = isinstance(b["bias"], ArgSpec)
    geo = _geometry(b, x, w)
    out = ri.outputs[0]
    for a in _forward_assigns(ri, geo):
        in_layout = Layout((a.n, a.ci + a.g, *a.sp), a.pin)
        w_layout = Layout(_weight_dims(geo, a, w.ndim), a.pw)
        b_layout = Layout((a.co + a.g,))
        out_layout = Layout((a.n, a.co + a.g, *a.sp), a.ci + a.pin + a.pw)
        inputs = (in_layout, w_layout, b_layout) if has_bias else (in_layout, w_layout)
        local = _forward_local(geo, a, out, out_layout, ri.mesh)
        if a.spatial_axes:
            plans = [geo.halo(k, axes, ri.mesh) for k, axes in enumerate(a.sp) if axes]
            layouts = (w_layout, b_layout, out_layout)
            decompose = _conv_halo(ri.op, geo, a, plans, layouts, local, out)
            yield Strategy(inputs, (out_layout,), decompose=decompose)
        else:
            yield Strategy(inputs, (out_layout,), local=local, local_device=True)


def _backward_local(geo: _Geometry, a: _Assign):
    halo = {k for k, axes in enumerate(a.sp) if axes}

    def local(
        dev, go, x, w, bias_sizes, stride, padding, dilation, transposed, out_pad, groups, mask
    ):
        g = _local_groups(geo, a, x)
        if g == 0 or 0 in go.shape or 0 in x.shape or 0 in w.shape:
            dims = [d for d in range(go.ndim) if d != 1]
            return (
                x.new_zeros(x.shape) if mask[0] else None,
                w.new_zeros(w.shape) if mask[1] else None,
                go.sum(dims) if mask[2] else None,
            )
        pad = [0 if k in halo else p for k, p in enumerate(_intlist(padding, geo.nsp))]
        sizes = [go.shape[1]] if bias_sizes is not None else None
        return aten.convolution_backward.default(
            go, x, w, sizes, stride, pad, dilation, transposed, out_pad, g, mask
        )

    return local


def _backward_assigns(ri: RuleInput, geo: _Geometry) -> list[_Assign]:
    go, x, w = ri.tensors[:3]
    gd, xd, wd = go.layout.dims, x.layout.dims, w.layout.dims
    pg = _sum_partial(go.layout)
    gsp = () if geo.transposed else gd[2:]
    xsp = () if geo.transposed else xd[2:]
    if geo.groups == 1:
        from_grad = _Assign(n=gd[0], co=gd[1], sp=gsp, pin=pg)
        from_input = _Assign(n=xd[0], ci=xd[1], sp=xsp)
        from_weight = _Assign(co=wd[geo.w_out], ci=wd[geo.w_in])
    else:
        g1 = gd[1] if geo.aligned(ri.mesh, gd[1]) else ()
        g2 = xd[1] if geo.aligned(ri.mesh, xd[1]) else ()
        g3 = wd[0] if geo.aligned(ri.mesh, wd[0]) else ()
        from_grad = _Assign(n=gd[0], g=g1, sp=gsp, pin=pg)
        from_input = _Assign(n=xd[0], g=g2, sp=xsp)
        from_weight = _Assign(g=g3)

    def merge(*parts: _Assign) -> _Assign:
        fields = {}
        for f in _Assign._fields:
            for p in parts:
                v = getattr(p, f)
                if v and any(v):
                    fields[f] = v
                    break
        return _Assign(**fields)

    firsts = [
        merge(from_grad, from_input, from_weight),
        merge(from_input, from_grad, from_weight),
        merge(from_weight, from_grad, from_input),
        from_grad,
        from_input,
        _Assign(n=gd[0], pin=pg),
        _Assign(n=gd[0]),
        _Assign(),
    ]
    out: list[_Assign] = []
    for a in firsts:
        for c in (a, a._replace(pin=())):
            c = c.clean(geo.nsp)
            if c not in out:
                out.append(c)
    return out


def _conv_backward_halo(op, geo, a, plans, layouts, local, out_specs, mask):
    go_layout, x_layout, w_layout, out_layouts = layouts

    def decompose(go, x, w, *rest):
        mesh = _mesh_of(go, x, w)
        gos = _blocks(go, mesh, go_layout)
        xs = _blocks(x, mesh, x_layout)
        ws = _blocks(w, mesh, w_layout)
        am = mesh.abstract
        if mask[1]:
            for plan in plans:
                xs = _exchange(op, plan, mesh, xs)
        else:  # only the extended block's shape matters to grad_input
            ext = []
            for t, dev in zip(xs, mesh.local_devices):
                shape = list(t.shape)
                for plan in plans:
                    shape[plan.dim] = len(plan.srcs[am.index_along(dev, plan.axes)])
                ext.append(t.new_zeros(()).expand(shape))
            xs = ext
        results = [
            local(dev, gos[j], xs[j], ws[j], *rest) for j, dev in enumerate(mesh.local_devices)
        ]
        grads = [list(r) for r in results]
        if mask[0]:
            gi = [r[0] for r in grads]
            for plan in reversed(plans):
                gi = _exchange_back(op, plan, mesh, gi)
            for r, t in zip(grads, gi):
                r[0] = t
        outs, k = [], 0
        for i in range(3):
            if not mask[i]:
                outs.append(None)
                continue
            outs.append(_wrap([r[i] for r in grads], mesh, out_layouts[k], out_specs[k]))
            k += 1
        return tuple(outs)

    return decompose


@register_rule(aten.convolution_backward.default)
def convolution_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The forward's placements; spatial splits send grad_input's halo rows back to their owners."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    go, x, w = ri.tensors[:3]
    geo = _geometry(b, x, w)
    mask = list(b["output_mask"])
    for a in _backward_assigns(ri, geo):
        go_layout = Layout((a.n, a.co + a.g, *a.sp), a.pin)
        x_layout = Layout((a.n, a.ci + a.g, *a.sp))
        w_layout = Layout(_weight_dims(geo, a, w.ndim))
        reduced = a.n + a.spatial_axes + a.pin
        candidates = [
            Layout((a.n, a.ci + a.g, *a.sp), a.co + a.pin),
            Layout(_weight_dims(geo, a, w.ndim), reduced),
            Layout((a.co + a.g,), reduced),
        ]
        outs = tuple(lay for lay, m in zip(candidates, mask) if m)
        inputs = (go_layout, x_layout, w_layout)
        local = _backward_local(geo, a)
        if a.spatial_axes:
            plans = [geo.halo(k, axes, ri.mesh) for k, axes in enumerate(a.sp) if axes]
            layouts = (go_layout, x_layout, w_layout, outs)
            decompose = _conv_backward_halo(ri.op, geo, a, plans, layouts, local, ri.outputs, mask)
            yield Strategy(inputs, outs, decompose=decompose)
        else:
            yield Strategy(inputs, outs, local=local, local_device=True)


# == empty blocks ===============================================================
def _may_be_empty(ri: RuleInput, layouts: Sequence[Layout]) -> bool:
    """Whether some device's block of some input is empty along a dim that is not empty."""
    am = ri.mesh
    for t, lay in zip(ri.tensors, layouts):
        for dev in range(am.size) if any(lay.dims) else ():
            if any(k == 0 < n for k, n in zip(local_shape(t.shape, lay, am, dev), t.shape)):
                return True
    return False


def _empty_guard(op: Any, outs: tuple[ArgSpec, ...], layouts: tuple[Layout, ...], am) -> Callable:
    """`op` per device, except on a device with an empty input block: zeros of its output blocks.

    The pool, pad and resampling kernels reject empty inputs (torch's own callers never
    pass them); every output block there is empty too (it shares the empty batch dim).
    """

    def local(dev: int, *args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not any(t.numel() == 0 for t in tensors):
            return op(*args, **kwargs)
        device = tensors[0].device
        made = [
            torch.zeros(local_shape(o.shape, lay, am, dev), dtype=o.dtype, device=device)
            for o, lay in zip(outs, layouts)
        ]
        return made[0] if len(made) == 1 else tuple(made)

    return local


def _guarded(
    ri: RuleInput, strategies: Iterable[Strategy], fn: Callable | None = None
) -> Iterator[Strategy]:
    """`strategies` running `fn` (default: the op) per device, through `_empty_guard` where
    some device gets an empty block."""
    for s in strategies:
        if s.decompose is not None or s.local is not None:
            yield s
        elif not _may_be_empty(ri, s.inputs):
            yield s if fn is None else dataclasses.replace(s, local=fn)
        else:
            guard = _empty_guard(fn or ri.op, ri.outputs, s.outputs, ri.mesh)
            yield dataclasses.replace(s, local=guard, local_device=True)


def _local_input_size(op: Any, n: int) -> Callable | None:
    """For an upsample backward: the op with its global ``input_size`` made the block's.

    Its leading (batch, channel) sizes are the gradient block's; the last `n` are whole.
    """
    names = [a.name for a in op._schema.arguments]
    if "input_size" not in names:
        return None
    k = names.index("input_size")

    def local(grad: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        args = list(args)
        if len(args) >= k:
            args[k - 1] = [*grad.shape[: grad.ndim - n], *args[k - 1][-n:]]
        else:
            kwargs["input_size"] = [*grad.shape[: grad.ndim - n], *kwargs["input_size"][-n:]]
        return op(grad, *args, **kwargs)

    return local


# == pools, resampling, shuffles: batch and channel dims local =================
def _core(n: int) -> Callable[[RuleInput], Iterator[Strategy]]:
    """A `batched` rule: the last `n` dims of every tensor coupled, leading dims batch."""

    def rule(ri: RuleInput) -> Iterator[Strategy]:
        yield from _guarded(
            ri,
            batched(
                ri,
                [leading_batch(t.ndim, n) for t in ri.tensors],
                [leading_batch(o.ndim, n) for o in ri.outputs],
                linear=_LINEAR.get(ri.op.overloadpacket, ()),
            ),
            _local_input_size(ri.op, n),
        )

    rule.__doc__ = f"Leading (batch, channel) dims keep their splits; the last {n} dims are whole."
    return rule


_POOLS: dict[Any, int] = {
    aten.max_pool1d: 1,
    aten.max_pool2d: 2,
    aten.max_pool3d: 3,
    aten.max_pool1d_with_indices: 1,
    aten.max_pool2d_with_indices: 2,
    aten.max_pool3d_with_indices: 3,
    aten.max_pool2d_with_indices_backward: 2,
    aten.max_pool3d_with_indices_backward: 3,
    aten.avg_pool1d: 1,
    aten.avg_pool2d: 2,
    aten.avg_pool3d: 3,
    aten.avg_pool2d_backward: 2,
    aten.avg_pool3d_backward: 3,
    aten.adaptive_avg_pool1d: 1,
    aten.adaptive_avg_pool2d: 2,
    aten.adaptive_avg_pool3d: 3,
    aten._adaptive_avg_pool2d: 2,
    aten._adaptive_avg_pool3d: 3,
    aten._adaptive_avg_pool2d_backward: 2,
    aten._adaptive_avg_pool3d_backward: 3,
    aten.adaptive_max_pool1d: 1,
    aten.adaptive_max_pool2d: 2,
    aten.adaptive_max_pool3d: 3,
    aten.adaptive_max_pool2d_backward: 2,
    aten.adaptive_max_pool3d_backward: 3,
    aten.fractional_max_pool2d_backward: 2,
    aten.fractional_max_pool3d_backward: 3,
    aten.max_unpool2d: 2,
    aten.max_unpool3d: 3,
    aten.upsample_nearest1d: 1,
    aten.upsample_nearest2d: 2,
    aten.upsample_nearest3d: 3,
    aten._upsample_nearest_exact1d: 1,
    aten._upsample_nearest_exact2d: 2,
    aten._upsample_nearest_exact3d: 3,
    aten.upsample_linear1d: 1,
    aten.upsample_bilinear2d: 2,
    aten.upsample_bicubic2d: 2,
    aten.upsample_trilinear3d: 3,
    aten._upsample_bilinear2d_aa: 2,
    aten._upsample_bicubic2d_aa: 2,
    aten.upsample_nearest1d_backward: 1,
    aten.upsample_nearest2d_backward: 2,
    aten.upsample_nearest3d_backward: 3,
    aten._upsample_nearest_exact1d_backward: 1,
    aten._upsample_nearest_exact2d_backward: 2,
    aten._upsample_nearest_exact3d_backward: 3,
    aten.upsample_linear1d_backward: 1,
    aten.upsample_bilinear2d_backward: 2,
    aten.upsample_bicubic2d_backward: 2,
    aten.upsample_trilinear3d_backward: 3,
    aten._upsample_bilinear2d_aa_backward: 2,
    aten._upsample_bicubic2d_aa_backward: 2,
    aten.pixel_shuffle: 3,
    aten.pixel_unshuffle: 3,
}
# Ops linear in their first tensor (a ``sum`` partial of it passes through).
_LINEAR: dict[Any, tuple[int, ...]] = {
    op: (0,)
    for op in _POOLS
    if not str(op).startswith(("aten.max_pool", "aten.adaptive_max_pool", "aten.fractional"))
    or str(op).endswith("_backward")
}
for _op, _n in _POOLS.items():
    register_rule(_op)(_core(_n))


# == pools over a split spatial dim: halos =====================================
@dataclass(frozen=True)
class _Pool:
    """A max or avg pool's window along its `nsp` spatial dims (global sizes)."""

    kind: str  # "max" | "avg"
    nsp: int
    n: tuple[int, ...]  # input sizes
    o: tuple[int, ...]  # output sizes
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    count_include_pad: bool = True
    divisor_override: int | None = None

    def rows(self, j: int, dim: int, axes: Axes, am: AbstractMesh) -> _Rows:
        window = (self.kernel[j], self.stride[j], self.padding[j], self.dilation[j])
        return _window_rows(dim, axes, am, self.n[j], self.o[j], window)

    def counts(self, j: int, lo: int, hi: int) -> list[int]:
        """torch's divisor factor along dim j for output rows [lo, hi) (avg pools)."""
        k, s, p, n = self.kernel[j], self.stride[j], self.padding[j], self.n[j]
        out = []
        for r in range(lo, hi):
            start = r * s - p
            end = min(start + k, n + p)
            out.append(end - start if self.count_include_pad else min(end, n) - max(start, 0))
        return out


_HALO_POOLS = {  # aten.max_pool2d_with_indices, ..._backward, aten.avg_pool3d, ...: (kind, nsp)
    getattr(aten, f"{name}{n}d{suffix}{grad}").default: (kind, n)
    for kind, name, suffix in (("max", "max_pool", "_with_indices"), ("avg", "avg_pool", ""))
    for n in (2, 3)
    for grad in ("", "_backward")
}


def _pool_geometry(ri: RuleInput, kind: str, nsp: int, x: ArgSpec, out: ArgSpec) -> _Pool:
    b = _bind(ri.op, ri.args, ri.kwargs)
    kernel = tuple(_intlist(b["kernel_size"], nsp))
    stride = tuple(_intlist(b["stride"], nsp)) or kernel
    padding = tuple(_intlist(b["padding"], nsp))
    dilation = tuple(_intlist(b.get("dilation", 1), nsp))
    return _Pool(
        kind,
        nsp,
        x.shape[x.ndim - nsp :],
        out.shape[out.ndim - nsp :],
        kernel,
        stride,
        padding,
        dilation,
        bool(b.get("count_include_pad", True)),
        b.get("divisor_override"),
    )


class _PoolHalo(NamedTuple):
    """What a device needs to pool its block of a spatially split input."""

    pool: _Pool
    plans: dict[int, _Rows]  # spatial index -> its row plan (split spatial dims only)
    am: AbstractMesh

    def lead(self, t: torch.Tensor) -> int:
        return t.ndim - self.pool.nsp

    def out_range(self, j: int, dev: int) -> tuple[int, int]:
        plan = self.plans.get(j)
        if plan is None:
            return 0, self.pool.o[j]
        p = self.am.group_size(plan.axes)
        return chunk_bounds(self.pool.o[j], p, self.am.index_along(dev, plan.axes))

    def start(self, j: int, dev: int) -> int:
        """Global row of the first row of the device's extended block along dim j."""
        if j not in self.plans:
            return 0
        return self.out_range(j, dev)[0] * self.pool.stride[j] - self.pool.padding[j]

    def ext_sizes(self, dev: int) -> list[int]:
        sizes = list(self.pool.n)
        for j, plan in self.plans.items():
            sizes[j] = len(plan.srcs[self.am.index_along(dev, plan.axes)])
        return sizes

    def local_padding(self) -> list[int]:
        return [0 if j in self.plans else p for j, p in enumerate(self.pool.padding)]

    def divisor(self, dev: int, like: torch.Tensor) -> torch.Tensor:
        """The avg pool's divisors of the device's output block, broadcastable to it."""
        nsp = self.pool.nsp
        out = like.new_ones(())
        for j in range(nsp):
            lo, hi = self.out_range(j, dev)
            c = torch.tensor(self.pool.counts(j, lo, hi), dtype=like.dtype, device=like.device)
            out = out * c.reshape(-1, *(1,) * (nsp - 1 - j))
        return out


def _pool_halo(ri: RuleInput, kind: str, nsp: int, layout: Layout) -> _PoolHalo | None:
    forward = ri.op in _POOL_FORWARDS
    x = ri.tensors[0] if forward else ri.tensors[1]
    out = ri.outputs[0] if forward else ri.tensors[0]
    lead = x.ndim - nsp
    split = {j: layout.dims[lead + j] for j in range(nsp) if layout.dims[lead + j]}
    if not split:
        return None
    pool = _pool_geometry(ri, kind, nsp, x, out)
    plans = {j: pool.rows(j, lead + j, axes, ri.mesh) for j, axes in sorted(split.items())}
    return _PoolHalo(pool, plans, ri.mesh)


_POOL_FORWARDS = {
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
}


def _lowest(dtype: torch.dtype) -> Any:
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


def _unravel(idx: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    coords = []
    for n in reversed(sizes):
        coords.append(idx % n if n else idx)
        idx = idx // n if n else idx
    return coords[::-1]


def _ravel(coords: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    flat = torch.zeros_like(coords[0])
    for c, n in zip(coords, sizes):
        flat = flat * n + c
    return flat


def _max_pool_forward(op: Any, h: _PoolHalo, layout: Layout, outs: tuple[ArgSpec, ...]):
    def decompose(x, kernel_size, *rest):
        mesh = x._mesh
        xs = list(x._shards)
        for plan in h.plans.values():
            xs = _exchange(op, plan, mesh, xs, _lowest(x.dtype))
        b = _bind(op, (x, kernel_size, *rest), {})
        values, indices = [], []
        for t, dev in zip(xs, mesh.local_devices):
            shape = local_shape(outs[0].shape, layout, h.am, dev)
            if 0 in shape or t.numel() == 0:
                values.append(t.new_zeros(shape))
                indices.append(torch.zeros(shape, dtype=torch.long, device=t.device))
                continue
            y, idx = op(
                t, kernel_size, b["stride"], h.local_padding(), b["dilation"], b["ceil_mode"]
            )
            coords = _unravel(idx, t.shape[h.lead(t) :])
            coords = [
                (c + h.start(j, dev)).clamp_(0, h.pool.n[j] - 1) for j, c in enumerate(coords)
            ]
            values.append(y)
            indices.append(_ravel(coords, h.pool.n))
        return _wrap(values, mesh, layout, outs[0]), _wrap(indices, mesh, layout, outs[1])

    return decompose


def _max_pool_backward(op: Any, h: _PoolHalo, layout: Layout, out: ArgSpec):
    def decompose(go, x, *rest):
        indices = rest[-1]
        mesh = _mesh_of(go, x)
        gos, idxs = _blocks(go, mesh, layout), _blocks(indices, mesh, layout)
        grads = []
        for g, idx, dev in zip(gos, idxs, mesh.local_devices):
            lead = g.shape[: h.lead(g)]
            sizes = h.ext_sizes(dev)
            ext = g.new_zeros((*lead, *sizes))
            if g.numel():
                coords = _unravel(idx, h.pool.n)
                local = _ravel([c - h.start(j, dev) for j, c in enumerate(coords)], sizes)
                m = math.prod(lead)
                ext.view(m, -1).scatter_add_(1, local.reshape(m, -1), g.reshape(m, -1))
            grads.append(ext)
        for plan in reversed(h.plans.values()):
            grads = _exchange_back(op, plan, mesh, grads)
        return _wrap(grads, mesh, layout, out)

    return decompose


def _avg_pool_forward(op: Any, h: _PoolHalo, layout: Layout, out: ArgSpec):
    override = h.pool.divisor_override

    def decompose(x, kernel_size, *rest):
        mesh = x._mesh
        xs = list(x._shards)
        for plan in h.plans.values():
            xs = _exchange(op, plan, mesh, xs, 0)
        b = _bind(op, (x, kernel_size, *rest), {})
        results = []
        for t, dev in zip(xs, mesh.local_devices):
            shape = local_shape(out.shape, layout, h.am, dev)
            if 0 in shape or t.numel() == 0:
                results.append(t.new_zeros(shape))
                continue
            pad, ceil = h.local_padding(), b["ceil_mode"]
            y = op(t, kernel_size, b["stride"], pad, ceil, True, override or 1)
            results.append(y if override else y / h.divisor(dev, y))
        return _wrap(results, mesh, layout, out)

    return decompose


def _avg_pool_backward(op: Any, h: _PoolHalo, layout: Layout, out: ArgSpec):
    override = h.pool.divisor_override

    def decompose(go, x, kernel_size, stride, padding, ceil_mode, *rest):
        mesh = _mesh_of(go, x)
        gos = _blocks(go, mesh, layout)
        grads = []
        for g, dev in zip(gos, mesh.local_devices):
            sizes = h.ext_sizes(dev)
            ext = g.new_zeros((*g.shape[: h.lead(g)], *sizes))
            if g.numel() and ext.numel():
                g = g if override else g / h.divisor(dev, g)
                pad = h.local_padding()
                ext = op(g, ext, kernel_size, stride, pad, ceil_mode, True, override or 1)
            grads.append(ext)
        for plan in reversed(h.plans.values()):
            grads = _exchange_back(op, plan, mesh, grads)
        return _wrap(grads, mesh, layout, out)

    return decompose


@register_rule(*_HALO_POOLS)
def pool_rule(ri: RuleInput) -> Iterator[Strategy]:
    """A split spatial dim keeps its split (halo rows by ppermute); then the batched rule."""
    kind, nsp = _HALO_POOLS[ri.op]
    forward = ri.op in _POOL_FORWARDS
    x = ri.tensors[0] if forward else ri.tensors[1]
    plain = Layout(x.layout.dims)
    # avg pools are linear in their input (forward) and gradient (backward): a sum stays
    keep = _sum_partial(ri.tensors[0].layout) if kind == "avg" else ()
    layout = Layout(x.layout.dims, keep)
    h = _pool_halo(ri, kind, nsp, plain)
    if h is not None and forward and kind == "max":
        decompose = _max_pool_forward(ri.op, h, plain, ri.outputs)
        yield Strategy((plain,), (plain, plain), decompose=decompose)
    elif h is not None and forward:
        decompose = _avg_pool_forward(ri.op, h, layout, ri.outputs[0])
        yield Strategy((layout,), (layout,), decompose=decompose)
    elif h is not None and kind == "max":
        decompose = _max_pool_backward(ri.op, h, plain, ri.outputs[0])
        yield Strategy((plain, plain, plain), (plain,), decompose=decompose)
    elif h is not None:
        decompose = _avg_pool_backward(ri.op, h, layout, ri.outputs[0])
        yield Strategy((layout, plain), (layout,), decompose=decompose)
    yield from _core(nsp)(ri)


@register_rule(aten.fractional_max_pool2d, aten.fractional_max_pool3d)
def fractional_max_pool_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Batch and channel dims keep their splits (the random samples split alike); spatial whole."""
    x, samples = ri.tensors[:2]
    n = 2 if ri.op.overloadpacket is aten.fractional_max_pool2d else 3
    labels = leading_batch(x.ndim, n)
    # samples: (N or 1, C, n): the batch label only where the input has a batch dim
    s_labels = (labels[0] if x.ndim == n + 2 else None, labels[-n - 1], None)
    yield from _guarded(ri, batched(ri, [labels, s_labels], [labels, labels]))


@register_rule(aten.channel_shuffle, aten.native_channel_shuffle)
def channel_shuffle_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Dim 1 (the channels) whole; every other dim keeps its split."""
    (x,) = ri.tensors
    labels = tuple(None if d == 1 else d for d in range(x.ndim))
    yield from _guarded(ri, batched(ri, [labels], [labels], linear=(0,)))


@register_rule(aten.im2col, aten.col2im)
def im2col_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The batch dim (of a batched call) keeps its split; the others are whole."""
    (x,) = ri.tensors
    out = ri.outputs[0]
    batch = x.ndim == (4 if ri.op.overloadpacket is aten.im2col else 3)

    def labels(ndim: int) -> tuple:
        return tuple("n" if batch and d == 0 else None for d in range(ndim))

    yield from _guarded(ri, batched(ri, [labels(x.ndim)], [labels(out.ndim)], linear=(0,)))


@register_rule(aten.grid_sampler_2d, aten.grid_sampler_3d)
def grid_sampler_rule(ri: RuleInput) -> Iterator[Strategy]:
    """N of input and grid, C of the input, the grid's output positions: independent."""
    x, grid = ri.tensors[:2]
    n = x.ndim - 2
    where = tuple(f"o{k}" for k in range(n))
    labels_in = [("n", "c", *(None,) * n), ("n", *where, None)]
    yield from _guarded(ri, batched(ri, labels_in, [("n", "c", *where)], linear=(0,)))


@register_rule(aten.grid_sampler_2d_backward, aten.grid_sampler_3d_backward)
def grid_sampler_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """N split -> local; grad_output/input split on C -> grad_input split, grad_grid partial."""
    go, x, grid = ri.tensors[:3]
    mask = list(_bind(ri.op, ri.args, ri.kwargs)["output_mask"])
    n = x.ndim - 2
    nd, cd = go.layout.dims[0], x.layout.dims[1] or go.layout.dims[1]
    if cd and not set(cd) & set(nd):
        base = (nd, cd, *((),) * n)
        outs = (Layout(base), Layout((nd, *((),) * (n + 1)), cd))
        strategy = Strategy(
            (Layout(base), Layout(base), Layout((nd, *((),) * (n + 1)))),
            tuple(lay for lay, m in zip(outs, mask) if m),
        )
        yield from _guarded(ri, [strategy])
    labels = ("n", *(None,) * (n + 1))
    outs_labels = [labels, labels]
    outs = [lab for lab, m in zip(outs_labels, mask) if m]
    yield from _guarded(ri, batched(ri, [labels, labels, labels], outs))


# == pads ======================================================================
def _pad_pairs(pad: Sequence[int], ndim: int) -> dict[int, tuple[int, int]]:
    """{dim: (before, after)} of an aten pad list (last dim first), zero pairs left out."""
    out = {}
    for i in range(len(pad) // 2):
        lr = (int(pad[2 * i]), int(pad[2 * i + 1]))
        if lr != (0, 0):
            out[ndim - 1 - i] = lr
    return out


def _source(mode: str, q: int, n: int) -> int:
    """The input row of padded position q - before (-1: the fill value)."""
    if mode == "constant":
        return q if 0 <= q < n else -1
    if mode == "replicate":
        return min(max(q, 0), n - 1)
    if q < 0:  # reflect
        q = -q
    if q >= n:
        q = 2 * (n - 1) - q
    return q


def _pad_plan(
    mode: str, d: int, axes: Axes, n: int, lr: tuple[int, int], am: AbstractMesh
) -> _Rows:
    p = am.group_size(axes)
    m = n + lr[0] + lr[1]
    srcs = []
    for i in range(p):
        lo, hi = chunk_bounds(m, p, i)
        srcs.append(tuple(_source(mode, q - lr[0], n) for q in range(lo, hi)))
    return _Rows(d, axes, n, tuple(srcs))


def _zeroed(pad: Sequence[int], ndim: int, dims: set[int]) -> list[int]:
    """`pad` with the pairs of `dims` set to 0."""
    out = list(pad)
    for i in range(len(pad) // 2):
        if ndim - 1 - i in dims:
            out[2 * i] = out[2 * i + 1] = 0
    return out


def _mode_pads(suffix: str) -> dict:
    """aten.reflection_pad{1,2,3}d{suffix}, aten.replication_pad...: (mode, spatial dims)."""
    return {
        getattr(aten, f"{name}_pad{n}d{suffix}").default: (mode, n)
        for name, mode in (("reflection", "reflect"), ("replication", "replicate"))
        for n in (1, 2, 3)
    }


_PADS = {aten.constant_pad_nd.default: ("constant", None), **_mode_pads("")}
_PAD_BACKWARDS = _mode_pads("_backward")


def _pad_partial(layout: Layout, mode: str, value: Any) -> tuple[Axes, str]:
    if not layout.partial:
        return (), "sum"
    op = layout.reduce_op
    if mode != "constant" or op != "sum" or value == 0:
        return layout.partial, op
    return (), "sum"


def _pad_decomposition(op: Any, mode: str, plans: list[_Rows], layout: Layout, out: ArgSpec):
    split = {p.dim for p in plans}

    def decompose(x, pad, value=None):
        mesh = x._mesh
        fill = 0 if value is None else value
        shards = list(x._shards)
        local_pad = _zeroed(pad, x.ndim, split)
        if any(local_pad):
            shards = [_local_pad(op, s, local_pad, fill) for s in shards]
        for plan in plans:
            shards = _exchange(op, plan, mesh, shards, fill)
        return _wrap(shards, mesh, layout, out)

    return decompose


def _local_pad(op: Any, s: torch.Tensor, pad: list[int], fill: Any) -> torch.Tensor:
    if op is aten.constant_pad_nd.default:
        return aten.constant_pad_nd.default(s, pad, fill)
    if s.numel() == 0:  # the kernels reject empty blocks: only the shape matters
        shape = list(s.shape)
        for d, (lo, hi) in _pad_pairs(pad, s.ndim).items():
            shape[d] += lo + hi
        return s.new_zeros(shape)
    return op(s, pad)


@register_rule(*_PADS)
def pad_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Unpadded dims keep their splits; a padded split dim keeps it (rows cross block boundaries)."""
    mode, _ = _PADS[ri.op]
    b = _bind(ri.op, ri.args, ri.kwargs)
    x = ri.tensors[0]
    pad = b["pad"] if "pad" in b else b["padding"]
    value = b.get("value", 0)
    pairs = _pad_pairs(pad, x.ndim)
    out = ri.outputs[0]
    partial, reduce_op = _pad_partial(x.layout, mode, value)
    for part in _unique([partial, ()]):
        layout = Layout(x.layout.dims, part, reduce_op)
        split = [d for d in sorted(pairs) if x.layout.dims[d]]
        if not split:
            yield from _guarded(ri, [Strategy((layout,), (layout,))])
            continue
        plans = [_pad_plan(mode, d, x.layout.dims[d], x.shape[d], pairs[d], ri.mesh) for d in split]
        yield Strategy(
            (layout,), (layout,), decompose=_pad_decomposition(ri.op, mode, plans, layout, out)
        )
    labels = tuple(None if d in pairs else d for d in range(x.ndim))
    linear = (0,) if mode != "constant" or value == 0 else ()
    yield from _guarded(ri, batched(ri, [labels], [labels], linear=linear))


def _unique(items: list) -> list:
    found = []
    for item in items:
        if item not in found:
            found.append(item)
    return found


def _pad_backward_decomposition(op: Any, plans: list[_Rows], layout: Layout, out: ArgSpec):
    split = {p.dim for p in plans}

    def decompose(go, x, padding):
        mesh = _mesh_of(go, x)
        grads = _blocks(go, mesh, layout)
        for plan in reversed(plans):
            grads = _exchange_back(op, plan, mesh, grads)
        local_pad = _zeroed(padding, go.ndim, split)
        if any(local_pad):
            xs = _blocks(x, mesh, layout.without_partial())
            grads = [
                op(g, s, local_pad) if s.numel() else s.new_zeros(s.shape)
                for g, s in zip(grads, xs)
            ]
        return _wrap(grads, mesh, layout, out)

    return decompose


@register_rule(*_PAD_BACKWARDS)
def pad_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The pad's transpose: a padded split dim sends each row's gradient to the row's owner."""
    mode, _ = _PAD_BACKWARDS[ri.op]
    go, x = ri.tensors[:2]
    padding = _bind(ri.op, ri.args, ri.kwargs)["padding"]
    pairs = _pad_pairs(padding, x.ndim)
    dims = x.layout.dims
    out = ri.outputs[0]
    ok = go.layout.partial and go.layout.reduce_op in ("sum", "avg")
    for part in _unique([go.layout.partial if ok else (), ()]):
        op = go.layout.reduce_op if part else "sum"
        g_layout = Layout(dims, part, op)
        split = [d for d in sorted(pairs) if dims[d]]
        inputs = (g_layout, Layout(dims))
        if not split:
            yield from _guarded(ri, [Strategy(inputs, (g_layout,))])
            continue
        plans = [_pad_plan(mode, d, dims[d], x.shape[d], pairs[d], ri.mesh) for d in split]
        decompose = _pad_backward_decomposition(ri.op, plans, g_layout, out)
        yield Strategy(inputs, (g_layout,), decompose=decompose)
    labels = tuple(None if d in pairs else d for d in range(x.ndim))
    yield from _guarded(ri, batched(ri, [labels, labels], [labels], linear=(0,)))


@register_rule(aten._pad_circular.default)
def circular_pad_rule(ri: RuleInput) -> Iterator[Strategy]:
    """A padded split dim keeps its split: each device takes the wrapped rows it lacks (a
    `RowMove`: at most the pad width per boundary), unless gathering is cheaper.

    torch reaches this op whole only under ``torch.inference_mode`` (it is
    CompositeImplicitAutograd: with autograd on it is decomposed above dispatch into
    ``new_empty`` and slice copies, which gather a split padded dim).
    """
    x, out = ri.tensors[0], ri.outputs[0]
    pairs = _pad_pairs(_bind(ri.op, ri.args, ri.kwargs)["pad"], x.ndim)
    split = [d for d in sorted(pairs) if x.layout.dims[d] and x.shape[d]]
    if not split:
        yield Strategy((x.layout,), (x.layout,))
        return
    moves, shape, moved = [], list(x.shape), 0
    for d in split:
        axes, n, (lo, hi) = x.layout.dims[d], x.shape[d], pairs[d]
        srcs = block_srcs(n + lo + hi, ri.mesh.group_size(axes), lambda q, n=n, lo=lo: (q - lo) % n)
        moves.append(RowMove(d, axes, (n,), srcs))
        moved += moves[-1].bytes(row_bytes(shape, x.layout, d, ri.mesh, x.dtype))
        shape[d] = n + lo + hi
    want = x.layout
    for d in split:
        want = want.with_dim(d, ())
    if moved > _plan(x.layout, want, x.shape, ri.mesh, x.dtype).total_bytes:
        yield Strategy((want,), (want,))
        return

    def decompose(t: ShardedTensor, pad: Sequence[int]) -> ShardedTensor:
        mesh = t._mesh
        local_pad = _zeroed(pad, t.ndim, set(split))
        shards = list(t._shards)
        if any(local_pad):
            shards = [aten._pad_circular.default(s, local_pad) for s in shards]
        for m in moves:
            shards = m.run(ri.op, mesh, [shards])
        return _wrap(shards, mesh, x.layout, out)

    yield Strategy((x.layout,), (x.layout,), decompose=decompose)


# == meta kernels torch lacks ==================================================
# The dispatcher infers output shapes on the meta device; torch 2.13 has no meta kernel
# for fractional_max_pool3d's backward (its 2d twin has one): the gradient has the
# input's shape and dtype.
_META = torch.library.Library("aten", "IMPL")
if not torch._C._dispatch_has_kernel_for_dispatch_key(
    "aten::fractional_max_pool3d_backward", "Meta"
):
    _META.impl(
        "fractional_max_pool3d_backward",
        lambda grad_output, self, kernel_size, output_size, indices: self.new_empty(self.shape),
        "Meta",
    )
