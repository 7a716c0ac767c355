"""Rules for scans, sorts and selection along a dim: cumsum, cumprod, cummax, cummin,
logcumsumexp, sort, topk, kthvalue, median, nanmedian, mode, searchsorted, bucketize, histc,
bincount, unique, histogram, histogramdd.

Owns how these ops treat a split dim. It does not own the backward ops autograd emits
for them (flip and new_zeros: `_views.py`; scatter, scatter_add and gather:
`_indexing.py`; the pointwise ops), nor the ops torch decomposes above dispatch into
the ones here (argsort and msort are ``sort``; quantile is sort + gather + lerp;
cumulative_trapezoid is slices + cumsum; the masked scans are where + a scan).

Notation: d = the op's dim, n = its size, A = the mesh axes splitting it, P = their
group size, n_c = the size of chunk c (torch.chunk-style: uneven, possibly 0), B = the
batch elements (the other dims' local extent) per device.

The rules, by op:

- Along an unsplit dim every op here runs locally by the batch rule
  (`_batched.batched`): the other dims keep their split. That is also every rule's
  fallback (a split dim is gathered, priced by the planner, refused by strict mode).
- Scans along a split dim (cumsum, cumprod, cummax, cummin, logcumsumexp): each
  device scans its block; the last element of each block's scan (its total) is
  all-gathered over A, (P-1)·B totals received per device (cummax/cummin also their
  indices); each device folds the totals of the non-empty chunks before its own into
  an exclusive prefix and combines it with its scan: add, multiply, logaddexp, or the
  extremum with its index (torch's semantics: the later index wins ties, a NaN sticks).
  The dim is never gathered. cumsum is linear: a sum/avg-partial input stays partial
  (its totals are summands too); the others reduce partial inputs first.
- sort (argsort, msort) along a split dim: the dim is gathered, (P-1)·block bytes per
  device, and torch's kernel sorts it whole (so indices and ties are torch's); the
  sorted dim is then whole on every device, which its consumers slice for free and
  which keeps sort's backward (a scatter along the dim) local. Or the dim's axes move
  to another dim by an all-to-all (about 1/P of the gather), if the planner prices it
  lower; the output is then split there. (Keeping each device's block of the sorted
  order instead saves memory but costs the backward two gathers of the dim.)
- topk along a split dim: each device sorts its block stably and offers its first
  min(k, n_c) (global indices); the candidates are all-gathered over A, (P-1)·B·
  min(k, max n_c) values and as many indices per device, and merged in the total
  order (value, then index). O(P·k), never the dim.
- kthvalue, median and nanmedian (along a dim, and median/nanmedian over all
  elements): the element of rank t in the ascending total order (NaN greatest, ties
  by global index). Each device keeps a window of the positions of its sorted block
  that can still hold it; R rounds each all-gather s = 8 samples per device, get
  their exact global ranks by an all-reduce of local counts (a binary search per
  sample) and shrink every window by a factor s; then the surviving windows (at most
  ceil(max n_c / s^R) each; for R = 0, each device's ranks that can hold rank t, at
  most min(k, n_c) for kthvalue) are all-gathered and merged. R minimizes the bytes:
  kthvalue with a small k moves O(P·k) elements, median O(P·s·log_s n), never the dim.
  median propagates NaN (t is then the first NaN) and nanmedian ranks the non-NaN: the
  per-row NaN count is all-reduced first. Ties: torch's index among equal values is
  whatever its selection kernel leaves; here it is the one of rank t in the total order.
- mode along a split dim: gathered (or all-to-all): the mode needs every value's count.
- searchsorted / bucketize with 1-d boundaries split over A and no sorter: each
  device searches its chunk; the insertion index is the sum of the chunks' (the
  boundaries are sorted), so the output is partial-sum over A with no communication
  (boundaries holding NaN are not sorted in torch's binary-search sense: its own
  result then depends on the search path, and this one may differ). Else the batch rule.
- unique, unique_consecutive (and along a dim): the output's length depends on the
  values and a dim's slices compare whole: gathered, then torch's kernel on every device.
- bincount: the global max (an all-reduce), then each device counts its block with
  that length: partial-sum counts (weights split alike; an empty block keeps torch's dtype).
- histogram, histogramdd (torch has no meta kernel: the rule is marked ``no_meta`` and
  decomposes): bin edges from the bins, the range or the all-reduced extremes per
  coordinate (torch's own edge code on every device); counts local with those edges,
  partial-sum over the input's split axes; density reduces the counts first.
  histogramdd's coordinate dim is whole (gathered if split).
- histc: each device counts its block with the global range; the histogram is
  partial-sum over the input's split axes, no communication. min = max (torch: the
  data's range) costs an all-reduce of the min and max first.

Invariant: every strategy is exact for uneven and empty chunks, dims split over
several axes and the partial inputs it keeps; every collective is a `_move` of a
ShardedTensor (in the ledger with the op as cause, refused by strict mode).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..layouts._layout import Layout
from ..layouts._shard import chunk_bounds, local_bounds, local_shape
from ._api import _local_blocks
from ._batched import batched
from ._dispatch import _locally, _move
from ._pointwise import _cast_commutes
from ._rng import _bind
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor

aten = torch.ops.aten

Dims = tuple[tuple[str, ...], ...]
_SAMPLES = 8  # samples per device per selection round
_NO_INDEX = torch.iinfo(torch.int64).max  # the index of a padding candidate (sorts last)


# == helpers ===================================================================
def _labels(ndim: int, coupled: Sequence[int]) -> tuple[int | None, ...]:
    """Batch labels of a tensor whose dims in `coupled` the op couples (the others: their index)."""
    return tuple(None if e in coupled else e for e in range(ndim))


def _without(labels: tuple, d: int, keepdim: bool) -> tuple:
    """`labels` with dim `d` dropped, or kept as a coupled size-1 dim."""
    if keepdim:
        return tuple(None if e == d else lab for e, lab in enumerate(labels))
    return tuple(lab for e, lab in enumerate(labels) if e != d)


def _reduced_dims(dims: Dims, d: int, keepdim: bool) -> Dims:
    """Layout dims after reducing dim `d` (unsplit size 1 when kept)."""
    if keepdim:
        return tuple(() if e == d else axes for e, axes in enumerate(dims))
    return tuple(axes for e, axes in enumerate(dims) if e != d)


def _moved_candidates(ri: RuleInput, d: int, labels_in: list, labels_out: list) -> list[Strategy]:
    """The batch rule's strategies where the axes splitting `d` first move to another dim
    (an all-to-all instead of a gather), one per dim large enough to take them."""
    x = ri.tensors[0]
    axes = x.layout.dims[d]
    if not axes:
        return []
    base = x.layout.without_partial().with_dim(d, ())
    found = []
    for e in range(x.ndim):
        if e == d or labels_in[0][e] is None:
            continue
        moved = base.with_dim(e, base.dims[e] + axes)
        if x.shape[e] < ri.mesh.group_size(moved.dims[e]):
            continue
        spec = ArgSpec(x.shape, x.dtype, moved)
        moved_ri = dataclasses.replace(ri, tensors=(spec, *ri.tensors[1:]))
        found.append(batched(moved_ri, labels_in, labels_out)[0])
    return found


def _gather_blocks(
    func: Any, x: ShardedTensor, blocks: list[torch.Tensor], batch: Dims, shape: tuple, axes: tuple
) -> list[torch.Tensor]:
    """Per local device, the (b..., W) `blocks` of every device of its `axes` group: (b..., P, W).

    One all-gather over `axes` (in the ledger with `func` as cause); `batch` and `shape` are
    the layout dims and global sizes of the leading (batch) dims.
    """
    p = x._mesh.abstract.group_size(axes)
    width = blocks[0].shape[-1]
    src = ShardedTensor(
        [b.unsqueeze(-2).contiguous() for b in blocks],
        x._mesh,
        Layout((*batch, axes, ())),
        (*shape, p, width),
    )
    return _move(func, src, Layout((*batch, (), ())))._shards


def _sum_blocks(
    func: Any, x: ShardedTensor, blocks: list[torch.Tensor], batch: Dims, shape: tuple, axes: tuple
) -> list[torch.Tensor]:
    """Per local device, the sum of the (b..., m) `blocks` over its `axes` group (an all-reduce)."""
    src = ShardedTensor(
        [b.contiguous() for b in blocks],
        x._mesh,
        Layout((*batch, ()), axes, "sum"),
        (*shape, blocks[0].shape[-1]),
    )
    return _move(func, src, Layout((*batch, ())))._shards


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


# == scans =====================================================================
_SCANS = {
    aten.cumsum.default: "sum",
    aten.cumprod.default: "prod",
    aten.cummax.default: "max",
    aten.cummin.default: "min",
    aten.logcumsumexp.default: "logsumexp",
}


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_complex():  # logaddexp has no complex kernel: the two-term scan's last term
        return torch.logcumsumexp(torch.stack(torch.broadcast_tensors(a, b)), 0)[-1]
    return torch.logaddexp(a, b)


def _combine(kind: str, before: tuple, after: tuple) -> tuple:
    """The scan of `before` (a prefix) followed by `after` (values, and indices for extrema)."""
    if kind == "sum":
        return (after[0] + before[0],)
    if kind == "prod":
        return (after[0] * before[0],)
    if kind == "logsumexp":
        return (_logaddexp(after[0], before[0]),)
    (bv, bi), (av, ai) = before, after
    later = av >= bv if kind == "max" else av <= bv
    if _is_float(av.dtype):  # torch: a NaN always takes over, nothing replaces a NaN
        later = torch.isnan(av) | (~torch.isnan(bv) & later)
    return torch.where(later, av, bv), torch.where(later, ai, bi)


def _scan_decomposition(func: Any, kind: str, d: int) -> Callable:
    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> Any:
        mesh, layout = x._mesh, x._layout
        am, axes, n = mesh.abstract, layout.dims[d], x.shape[d]
        p = am.group_size(axes)
        sizes = [hi - lo for lo, hi in (chunk_bounds(n, p, c) for c in range(p))]
        chunks = [am.index_along(dev, axes) for dev in mesh.local_devices]
        scans = []
        for s, c in zip(x._shards, chunks):
            out = func(s, *args, **kwargs)
            if kind in ("max", "min"):  # global indices
                out = (out[0], out[1] + chunk_bounds(n, p, c)[0])
            scans.append(out if isinstance(out, tuple) else (out,))
        totals_layout = Layout(layout.dims, layout.partial, layout.reduce_op)
        shape = tuple(p if e == d else m for e, m in enumerate(x.shape))
        gathered = []
        for k in range(len(scans[0])):  # the values, then the indices of an extremum
            lasts = []
            for out, c in zip(scans, chunks):
                t = out[k]
                lasts.append(t.narrow(d, sizes[c] - 1, 1) if sizes[c] else t.new_zeros(_one(t, d)))
            totals = ShardedTensor(lasts, mesh, totals_layout, shape)
            gathered.append(_move(func, totals, totals_layout.with_dim(d, ()))._shards)
        results = []
        for j, (out, c) in enumerate(zip(scans, chunks)):
            prefix = None
            for before in range(c):
                if sizes[before]:
                    total = tuple(g[j].narrow(d, before, 1) for g in gathered)
                    prefix = total if prefix is None else _combine(kind, prefix, total)
            results.append(out if prefix is None or not sizes[c] else _combine(kind, prefix, out))
        values = ShardedTensor([r[0] for r in results], mesh, layout, tuple(x.shape))
        if kind not in ("max", "min"):
            return values
        indices = ShardedTensor([r[1] for r in results], mesh, Layout(layout.dims), tuple(x.shape))
        return values, indices

    return decompose


def _one(t: torch.Tensor, d: int) -> list[int]:
    """`t`'s shape with dim `d` of size 1."""
    return [1 if e == d else m for e, m in enumerate(t.shape)]


def _nonempty_chunks(n: int, p: int) -> int:
    return sum(1 for c in range(p) if chunk_bounds(n, p, c)[1] > chunk_bounds(n, p, c)[0])


@register_rule(*_SCANS)
def scan_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Along a split dim: local scans + an all-gather of the chunks' totals; else the batch rule."""
    x = ri.tensors[0]
    kind = _SCANS[ri.op]
    out_dtype = ri.outputs[0].dtype
    if x.ndim == 0:
        yield from batched(ri, [()], [()] * len(ri.outputs))
        return
    d = _bind(ri.op, ri.args, ri.kwargs)["dim"] % x.ndim
    src = x.layout
    linear = kind == "sum" and _cast_commutes(src.reduce_op, x.dtype, out_dtype)
    if not (linear and src.partial and src.reduce_op in ("sum", "avg")):
        src = src.without_partial()
    axes = src.dims[d]
    if axes and _nonempty_chunks(x.shape[d], ri.mesh.group_size(axes)) > 1:
        yield Strategy((src,), decompose=_scan_decomposition(ri.op, kind, d))
    elif axes:  # one chunk holds the whole dim: its local scan is the answer
        yield Strategy((src,), (src,) + (src.without_partial(),) * (len(ri.outputs) - 1))
    labels = _labels(x.ndim, (d,))
    keep = (0,) if kind == "sum" and _cast_commutes("sum", x.dtype, out_dtype) else ()
    yield from batched(ri, [labels], [labels] * len(ri.outputs), linear=keep)


_INPLACE_SCANS = {
    aten.cumsum_.default: aten.cumsum.default,
    aten.cumprod_.default: aten.cumprod.default,
}


@register_rule(*_INPLACE_SCANS)
def scan_inplace_rule(ri: RuleInput) -> Iterator[Strategy]:
    """cumsum_ / cumprod_: the out-of-place scan (its own rule), copied back into the input."""
    functional = _INPLACE_SCANS[ri.op]

    def run(x: ShardedTensor, *args: Any, **kwargs: Any) -> ShardedTensor:
        return aten.copy_.default(x, functional(x, *args, **kwargs))

    run.writes_through_dispatch = True  # copy_ records the write
    yield Strategy(tuple(s.layout for s in ri.tensors), decompose=run)


# == rows: blocks seen along the reduced dims ==================================
class _Rows:
    """A tensor's blocks as rows along its reduced dims, for the candidate and selection merges.

    `dims` is one dim (kthvalue, topk, median.dim, ...) or every dim (median over all
    elements). Per local device: `values` and `indices` (b..., n_c), the block sorted
    stably (so equal values are in global index order), and its chunk `c` along `axes`.
    Indices are global along the dim; over all elements, ``c * max n_c + position``
    (unique, ordered by chunk; only the value is returned there).
    """

    def __init__(self, func: Any, x: ShardedTensor, dims: tuple[int, ...], descending: bool):
        mesh, layout = x._mesh, x._layout
        am = mesh.abstract
        self.func, self.x, self.descending = func, x, descending
        self.axes = tuple(a for e in dims for a in layout.dims[e])
        self.p = am.group_size(self.axes)
        keep = [e for e in range(x.ndim) if e not in dims]
        self.batch = tuple(layout.dims[e] for e in keep)
        self.shape = tuple(x.shape[e] for e in keep)
        self.n = math.prod(x.shape[e] for e in dims)
        sizes = [0] * self.p
        for dev in range(am.size):
            c = am.index_along(dev, self.axes)
            sizes[c] = math.prod(local_shape(tuple(x.shape), layout, am, dev)[e] for e in dims)
        self.sizes = sizes
        self.n_max = max(sizes)
        self.chunks = [am.index_along(dev, self.axes) for dev in mesh.local_devices]
        self.values, self.indices = [], []
        for s, dev, c in zip(x._shards, mesh.local_devices, self.chunks):
            if len(dims) == 1:
                row = s.movedim(dims[0], -1)
                start = local_bounds(tuple(x.shape), layout, am, dev)[dims[0]][0]
            else:
                row, start = s.reshape(-1), c * self.n_max
            v, i = torch.sort(row, dim=-1, descending=descending, stable=True)
            self.values.append(v)
            self.indices.append(i + start)

    def gather(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """(b..., W) per device -> every device's of the group, flattened: (b..., P·W)."""
        out = _gather_blocks(self.func, self.x, blocks, self.batch, self.shape, self.axes)
        return [g.flatten(-2) for g in out]

    def total(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """(b..., m) per device -> their sums over the group (an all-reduce)."""
        return _sum_blocks(self.func, self.x, blocks, self.batch, self.shape, self.axes)

    def window(self, starts: list[torch.Tensor], widths: list[torch.Tensor], w: int) -> tuple:
        """Per device, `w` candidates from position `starts` on (padding past `widths`)."""
        vals, idxs = [], []
        for v, i, a, k in zip(self.values, self.indices, starts, widths):
            j = torch.arange(w, dtype=torch.int64)
            pos = a.unsqueeze(-1) + j
            ok = j < k.unsqueeze(-1)
            if v.shape[-1]:
                pos = pos.clamp(0, v.shape[-1] - 1)
                vals.append(v.gather(-1, pos))
                idxs.append(torch.where(ok, i.gather(-1, pos), -1))
            else:
                vals.append(v.new_zeros(pos.shape))
                idxs.append(torch.full(pos.shape, -1, dtype=torch.int64))
        return vals, idxs


def _merge(values: torch.Tensor, indices: torch.Tensor, descending: bool) -> tuple:
    """Candidates sorted in the total order (value, then index); padding (index -1) last."""
    key = torch.where(indices < 0, _NO_INDEX, indices)
    order = torch.argsort(key, dim=-1, stable=True)
    values, key = values.gather(-1, order), key.gather(-1, order)
    values = torch.where(key == _NO_INDEX, _worst(values.dtype, descending), values)
    values, order = torch.sort(values, dim=-1, descending=descending, stable=True)
    return values, key.gather(-1, order)


def _worst(dtype: torch.dtype, descending: bool) -> Any:
    """A value that sorts last (ties with real values go by index: padding's is the largest)."""
    if dtype == torch.bool:
        return not descending
    if dtype.is_floating_point:
        return -math.inf if descending else math.nan
    info = torch.iinfo(dtype)
    return info.min if descending else info.max


def _less(u: torch.Tensor, ui: torch.Tensor, q: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
    """u < q in the ascending total order: NaN greatest, equal values by index."""
    lt, eq = u < q, u == q
    if u.dtype.is_floating_point:
        un, qn = torch.isnan(u), torch.isnan(q)
        lt = lt | (~un & qn)
        eq = eq | (un & qn)
    return lt | (eq & (ui < qi))


def _count_less(
    v: torch.Tensor, i: torch.Tensor, q: torch.Tensor, qi: torch.Tensor
) -> torch.Tensor:
    """Per query (b..., m), how many of the sorted row (b..., n) precede it: a binary search."""
    n = v.shape[-1]
    lo = torch.zeros(q.shape, dtype=torch.int64)
    if n == 0:
        return lo
    hi = torch.full(q.shape, n, dtype=torch.int64)
    for _ in range(n.bit_length()):
        active = lo < hi
        mid = (lo + hi) // 2
        at = mid.clamp(max=n - 1)
        less = _less(v.gather(-1, at), i.gather(-1, at), q, qi)
        lo = torch.where(active & less, mid + 1, lo)
        hi = torch.where(active & ~less, mid, hi)
    return lo


def _rounds(rows: _Rows, first: int, itemsize: int) -> tuple[int, int]:
    """(R, W): the sampling rounds and the final window width of least bytes per batch element.

    A round all-gathers s values and indices and all-reduces P·s counts; the final step
    all-gathers W values and indices. R = 0 keeps the first windows (`first` wide); each
    round after starts from whole blocks and divides every window by s (rounding up).
    """
    p, s = rows.p, _SAMPLES
    round_bytes = (p - 1) * s * (itemsize + 8) + 2 * (p - 1) * s * 8
    best = (first * (p - 1) * (itemsize + 8), 0, first)
    w, r = rows.n_max, 0
    while w > 1:
        w, r = -(-w // s), r + 1
        cost = r * round_bytes + w * (p - 1) * (itemsize + 8)
        best = min(best, (cost, r, w))
    return best[1], best[2]


def _select(rows: _Rows, targets: list[torch.Tensor], static: int | None) -> tuple[list, list]:
    """Per local device, the (value, global index) of rank `targets` (b...,) per row.

    `static` is the rank when it is the same known number for every row (kthvalue), which
    bounds the first windows: device c's ranks that can hold it are
    [t - (n - n_c), t] within its block.
    """
    n, sizes = rows.n, rows.sizes
    first = rows.n_max
    if static is not None:
        first = max(min(m, static + 1) - max(0, static - (n - m)) for m in sizes)
    itemsize = rows.values[0].element_size()
    r_count, width = _rounds(rows, max(first, 1), itemsize)
    starts, ends, below = [], [], []
    for t, c in zip(targets, rows.chunks):
        if r_count:
            starts.append(torch.zeros_like(t))
            ends.append(torch.full_like(t, sizes[c]))
            below.append(torch.zeros_like(t))
        else:
            starts.append((t - (n - sizes[c])).clamp(min=0))
            ends.append(torch.minimum(t + 1, torch.full_like(t, sizes[c])))
            below.append(sum((t - (n - m)).clamp(min=0) for m in sizes))
    for _ in range(r_count):
        starts, ends, below = _round(rows, targets, starts, ends, below)
    widths = [e - a for a, e in zip(starts, ends)]
    vals, idxs = rows.window(starts, widths, width)
    values, indices = [], []
    for v, i, t, b in zip(rows.gather(vals), rows.gather(idxs), targets, below):
        mv, mi = _merge(v, i, descending=False)
        at = (t - b).unsqueeze(-1)
        values.append(mv.gather(-1, at).squeeze(-1))
        indices.append(mi.gather(-1, at).squeeze(-1))
    return values, indices


def _round(rows: _Rows, targets: list, starts: list, ends: list, below: list) -> tuple:
    """One sampling round: every window shrinks to what lies between the samples around rank t."""
    s = _SAMPLES
    widths = [e - a for a, e in zip(starts, ends)]
    step = torch.arange(s, dtype=torch.int64)
    picks = [(w.unsqueeze(-1) * step) // s for w in widths]  # offsets in the window
    vals, idxs = [], []
    for v, i, a, w, off in zip(rows.values, rows.indices, starts, widths, picks):
        pos = a.unsqueeze(-1) + off
        ok = (w > 0).unsqueeze(-1).expand(pos.shape)
        if v.shape[-1]:
            pos = pos.clamp(0, v.shape[-1] - 1)
            vals.append(v.gather(-1, pos))
            idxs.append(torch.where(ok, i.gather(-1, pos), -1))
        else:
            vals.append(v.new_zeros(pos.shape))
            idxs.append(torch.full(pos.shape, -1, dtype=torch.int64))
    samples_v, samples_i = rows.gather(vals), rows.gather(idxs)
    counts = [
        _count_less(v, i, q, qi)
        for v, i, q, qi in zip(rows.values, rows.indices, samples_v, samples_i)
    ]
    ranks = rows.total(counts)
    out = ([], [], [])
    for j, c in enumerate(rows.chunks):
        qi, rank, lt, t = samples_i[j], ranks[j], counts[j], targets[j].unsqueeze(-1)
        valid = qi >= 0
        mine = torch.zeros(qi.shape[-1], dtype=torch.bool)
        mine[c * s : (c + 1) * s] = True
        le = lt + (valid & mine)
        lo_rank, lo_at = torch.where(valid & (rank < t), rank, -1).max(-1, keepdim=True)
        hi_rank, hi_at = torch.where(valid & (rank > t), rank, _NO_INDEX).min(-1, keepdim=True)
        hit = valid & (rank == t)
        found, hit_at = hit.any(-1, keepdim=True), hit.to(torch.int8).argmax(-1, keepdim=True)
        a = torch.where(lo_rank >= 0, le.gather(-1, lo_at), starts[j].unsqueeze(-1))
        e = torch.where(hi_rank < _NO_INDEX, lt.gather(-1, hi_at), ends[j].unsqueeze(-1))
        b = torch.where(lo_rank >= 0, lo_rank + 1, below[j].unsqueeze(-1))
        a = torch.where(found, lt.gather(-1, hit_at), a)
        e = torch.where(found, le.gather(-1, hit_at), e)
        b = torch.where(found, t, b)
        for slot, value in zip(out, (a, e, b)):
            slot.append(value.squeeze(-1))
    return out


# == sort ======================================================================
_SORTS = {aten.sort.default, aten.sort.stable}


@register_rule(*_SORTS)
def sort_rule(ri: RuleInput) -> Iterator[Strategy]:
    """A split dim is gathered (the sorted dim is then whole on every device) or all-to-all'd."""
    x = ri.tensors[0]
    if x.ndim == 0:
        yield from batched(ri, [()], [(), ()])
        return
    d = _bind(ri.op, ri.args, ri.kwargs)["dim"] % x.ndim
    labels = _labels(x.ndim, (d,))
    yield from _moved_candidates(ri, d, [labels], [labels, labels])
    yield from batched(ri, [labels], [labels, labels])


# == topk ======================================================================
def _topk_decomposition(func: Any, k: int, d: int, largest: bool, out_layout: Layout) -> Callable:
    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> tuple:
        rows = _Rows(func, x, (d,), descending=largest)
        width = min(k, rows.n_max)
        starts = [torch.zeros(v.shape[:-1], dtype=torch.int64) for v in rows.values]
        widths = [
            torch.full(v.shape[:-1], min(k, rows.sizes[c]))
            for v, c in zip(rows.values, rows.chunks)
        ]
        vals, idxs = rows.window(starts, widths, width)
        outs: tuple[list, list] = ([], [])
        for v, i in zip(rows.gather(vals), rows.gather(idxs)):
            mv, mi = _merge(v, i, descending=largest)
            outs[0].append(mv[..., :k].movedim(-1, d).contiguous())
            outs[1].append(mi[..., :k].movedim(-1, d).contiguous())
        shape = tuple(k if e == d else m for e, m in enumerate(x.shape))
        return tuple(ShardedTensor(o, x._mesh, out_layout, shape) for o in outs)

    return decompose


@register_rule(aten.topk.default)
def topk_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Along a split dim: each device's top min(k, n_c), all-gathered (P·k), merged."""
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    if x.ndim == 0:
        yield from batched(ri, [()], [(), ()])
        return
    d, k = b["dim"] % x.ndim, b["k"]
    src = x.layout.without_partial()
    labels = _labels(x.ndim, (d,))
    if src.dims[d] and k > 0 and math.prod(ri.outputs[0].shape) > 0:
        out = src.with_dim(d, ())
        yield Strategy((src,), decompose=_topk_decomposition(ri.op, k, d, b["largest"], out))
    yield from batched(ri, [labels], [labels, labels])


# == kthvalue / median / nanmedian ============================================
_SELECT = {
    aten.kthvalue.default: "kth",
    aten.median.dim: "median",
    aten.nanmedian.dim: "nanmedian",
    aten.median.default: "median",
    aten.nanmedian.default: "nanmedian",
}
_WHOLE = {aten.median.default, aten.nanmedian.default}


def _targets(rows: _Rows, kind: str, k: int) -> tuple[list[torch.Tensor], int | None]:
    """Per device, the rank t (b...,) each row selects, and t itself when it is one known number."""
    batch = [v.shape[:-1] for v in rows.values]
    if kind == "kth":
        return [torch.full(s, k - 1, dtype=torch.int64) for s in batch], k - 1
    n = rows.n
    if not rows.values[0].dtype.is_floating_point:  # no NaN: the lower median
        return [torch.full(s, (n - 1) // 2, dtype=torch.int64) for s in batch], (n - 1) // 2
    nans = rows.total([torch.isnan(v).sum(-1, keepdim=True) for v in rows.values])
    targets = []
    for m in (nan.squeeze(-1) for nan in nans):
        if kind == "median":  # any NaN: the first NaN (NaN sorts last, by index)
            targets.append(torch.where(m > 0, n - m, (n - 1) // 2))
        else:  # the lower median of the non-NaN values; all NaN: the first NaN
            targets.append(((n - m - 1) // 2).clamp(min=0))
    return targets, None


def _select_decomposition(
    func: Any, kind: str, k: int, dims: tuple, keepdim: bool, layout: Layout, shape: tuple
) -> Callable:
    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> Any:
        rows = _Rows(func, x, dims, descending=False)
        targets, static = _targets(rows, kind, k)
        values, indices = _select(rows, targets, static)
        if func in _WHOLE:
            return ShardedTensor([v.reshape(()) for v in values], x._mesh, layout, shape)
        if keepdim:
            values = [v.unsqueeze(dims[0]) for v in values]
            indices = [i.unsqueeze(dims[0]) for i in indices]
        return (
            ShardedTensor(values, x._mesh, layout, shape),
            ShardedTensor(indices, x._mesh, layout, shape),
        )

    return decompose


@register_rule(*_SELECT)
def select_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Along a split dim (or over all elements): a distributed selection of rank t; else batch."""
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    kind = _SELECT[ri.op]
    src = x.layout.without_partial()
    whole = ri.op in _WHOLE
    n_out = len(ri.outputs)
    if x.ndim == 0:
        yield from batched(ri, [()], [()] * n_out)
        return
    dims = tuple(range(x.ndim)) if whole else (b["dim"] % x.ndim,)
    keepdim = bool(b.get("keepdim") or False)
    split = any(src.dims[e] for e in dims)
    if split and math.prod(x.shape) > 0:
        out = Layout(()) if whole else Layout(_reduced_dims(src.dims, dims[0], keepdim))
        k = b.get("k") or 0
        decompose = _select_decomposition(ri.op, kind, k, dims, keepdim, out, ri.outputs[0].shape)
        yield Strategy((src,), decompose=decompose)
    labels = _labels(x.ndim, dims)
    if whole:
        yield from batched(ri, [labels], [()])
        return
    out_labels = _without(labels, dims[0], keepdim)
    yield from batched(ri, [labels], [out_labels] * n_out)


# == mode ======================================================================
@register_rule(aten.mode.default)
def mode_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The most frequent value needs every value of the dim: gathered or all-to-all'd."""
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    if x.ndim == 0:
        yield from batched(ri, [()], [(), ()])
        return
    d = b["dim"] % x.ndim
    labels = _labels(x.ndim, (d,))
    out = _without(labels, d, bool(b["keepdim"]))
    yield from _moved_candidates(ri, d, [labels], [out, out])
    yield from batched(ri, [labels], [out, out])


# == searchsorted / bucketize ==================================================
_SEARCHES = {
    aten.searchsorted.Tensor: ("sorted_sequence", "self"),
    aten.searchsorted.Scalar: ("sorted_sequence", None),
    aten.bucketize.Tensor: ("boundaries", "self"),
    aten.bucketize.Scalar: ("boundaries", None),
}


@register_rule(*_SEARCHES)
def search_rule(ri: RuleInput) -> Iterator[Strategy]:
    """1-d boundaries split over A (no sorter): local searches, output partial-sum over A."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    seq_name, values_name = _SEARCHES[ri.op]
    seq = b[seq_name]
    values = b[values_name] if values_name else None
    sorter = b.get("sorter")
    order = [a for a in ri.tensors]  # flat order: positional tensors, then sorter
    out = ri.outputs[0]
    if seq.ndim == 1 and sorter is None and seq.layout.dims[0]:
        axes = seq.layout.dims[0]
        v_layout = (
            Layout(()) if values is None else _drop_axes(values.layout.without_partial(), axes)
        )
        want = {id(seq): seq.layout.without_partial(), id(values): v_layout}
        inputs = tuple(want[id(a)] for a in order)
        yield Strategy(inputs, (Layout(v_layout.dims, axes, "sum"),))
    seq_labels = (
        (None,) if seq.ndim == 1 else tuple(("b", e) for e in range(seq.ndim - 1)) + (None,)
    )
    if values is None:
        v_labels: tuple = ()
    elif seq.ndim == 1:
        v_labels = tuple(("v", e) for e in range(values.ndim))
    else:
        v_labels = seq_labels[:-1] + (("v", values.ndim - 1),)
    labels = {id(seq): seq_labels, id(values): v_labels, id(sorter): seq_labels}
    yield from batched(ri, [labels[id(a)] for a in order], [v_labels if out.ndim else ()])


def _drop_axes(layout: Layout, axes: tuple[str, ...]) -> Layout:
    """`layout` without `axes` on any dim (each dim keeps its major axes up to the first dropped)."""
    dims = []
    for dim in layout.dims:
        kept: tuple[str, ...] = ()
        for a in dim:
            if a in axes:
                break
            kept += (a,)
        dims.append(kept)
    return Layout(tuple(dims))


# == histc =====================================================================
def _histc_decomposition(func: Any, bins: int, axes: tuple[str, ...]) -> Callable:
    """min = max: the data's range (all-reduced min and max), then local counts (partial)."""

    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> ShardedTensor:
        lo = _move(func, aten.amin.default(x, [], False), Layout(()))._shards[0].item()
        hi = _move(func, aten.amax.default(x, [], False), Layout(()))._shards[0].item()
        if lo == hi:  # torch widens a one-point range by 1 on each side
            lo, hi = lo - 1, hi + 1
        shards = [aten.histc.default(s, bins, lo, hi) for s in x._shards]
        return ShardedTensor(shards, x._mesh, Layout(((),), axes, "sum"), (bins,))

    return decompose


@register_rule(aten.histc.default)
def histc_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Local counts with the global range: partial-sum over the input's split axes."""
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    src = x.layout.without_partial()
    axes = tuple(a for dim in src.dims for a in dim)
    if not axes:
        yield Strategy((src,), (Layout(((),)),))
        return
    if b["min"] == b["max"] and math.prod(x.shape) > 0:
        yield Strategy((src,), decompose=_histc_decomposition(ri.op, b["bins"], axes))
        return
    yield Strategy((src,), (Layout(((),), axes, "sum"),))


# == bincount ==================================================================
def _blocks(t: Any, mesh: Any, layout: Layout) -> Any:
    """A plain tensor (a replicated constant) cut into this process's blocks of `layout`."""
    if t is None or isinstance(t, ShardedTensor):
        return t
    return _local_blocks(t, mesh, layout)


def _bincount_decomposition(func: Any, minlength: int, axes: tuple[str, ...]) -> Callable:
    """The global max (an all-reduce), then each device counts its block: partial-sum counts."""

    def decompose(x: Any, weights: Any = None, *args: Any, **kwargs: Any) -> Any:
        mesh = (x if isinstance(x, ShardedTensor) else weights)._mesh
        x, weights = (_blocks(t, mesh, Layout((axes,))) for t in (x, weights))
        length = minlength
        if x.numel():
            top = _move(func, aten.amax.default(x, [], False), Layout(()))._shards[0]
            length = max(minlength, int(top.item()) + 1)
        w = weights._shards if weights is not None else [None] * len(x._shards)
        shards = [aten.bincount.default(s, ws, length) for s, ws in zip(x._shards, w)]
        if x.numel() and weights is not None:  # torch counts an empty block in int64
            one = torch.zeros(1, dtype=x.dtype)
            dtype = aten.bincount.default(one, torch.ones(1, dtype=weights.dtype)).dtype
            shards = [t.to(dtype) for t in shards]
        return ShardedTensor(shards, x._mesh, Layout(((),), axes, "sum"), (length,))

    return decompose


@register_rule(aten.bincount.default)
def bincount_rule(ri: RuleInput) -> Iterator[Strategy]:
    """1-d values (and weights) split over A: local counts, partial-sum over A.

    The output's length is max(minlength, max + 1): the rule sees no output spec (its
    shape depends on the values) and answers with a decomposition.
    """
    b = _bind(ri.op, ri.args, ri.kwargs)
    axes = next((t.layout.dims[0] for t in ri.tensors if t.layout.dims[0]), ())
    inputs = tuple(Layout((axes,)) for _ in ri.tensors)
    yield Strategy(inputs, decompose=_bincount_decomposition(ri.op, b["minlength"] or 0, axes))


# == unique ====================================================================
_UNIQUE = (
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_dim_consecutive.default,
)


@register_rule(*_UNIQUE)
def unique_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Distinct (or consecutive-distinct) values: the input is gathered (in the ledger; strict
    mode refuses) and every device computes the replicated result with torch's kernel.

    The output's length depends on the values, and along a dim the op compares whole
    slices, so no dim is independent; torch's own order (``sorted=False``) is kept.
    """
    yield Strategy(tuple(Layout(((),) * s.ndim) for s in ri.tensors), decompose=_locally(ri.op))


# == histogram / histogramdd ===================================================
# torch's histogram ops have no meta kernel: their rule sees no outputs (`no_meta`) and
# answers with decompositions. Bin edges depend only on the bins, the range and (without
# a range) the data's extremes per coordinate, so every device computes them from the
# all-reduced extremes with torch's own edge code; counts are local with those edges.
_HISTOGRAMS = {
    aten.histogram.bin_ct: "counts",
    aten.histogram.bins_tensor: "edges_given",
    aten._histogramdd_bin_edges.default: "dd_edges",
    aten._histogramdd_from_bin_cts.default: "dd_counts",
    aten._histogramdd_from_bin_tensors.default: "dd_edges_given",
}


def _local(t: Any, j: int) -> Any:
    """Device j's block of `t` (a plain tensor is a replicated constant), lists elementwise."""
    if isinstance(t, list | tuple):
        return [_local(a, j) for a in t]
    return t._shards[j] if isinstance(t, ShardedTensor) else t


def _extremes(func: Any, x: ShardedTensor, dd: bool) -> torch.Tensor:
    """A plain (2, D) tensor (dd) or (2,) of the global minima and maxima (two all-reduces)."""
    dims = list(range(x.ndim - 1)) if dd else []
    out = Layout(((),)) if dd else Layout(())
    lo = _move(func, aten.amin.default(x, dims, False), out)._shards[0]
    hi = _move(func, aten.amax.default(x, dims, False), out)._shards[0]
    return torch.stack([lo, hi])


def _density(hist: torch.Tensor, edges: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch's density: counts over their sum, then over each dim's bin widths."""
    hist = hist / hist.sum()
    for d, e in enumerate(edges):
        shape = [1] * hist.ndim
        shape[d] = -1
        hist = hist / e.diff().view(shape)
    return hist


def _histogram_decomposition(func: Any, kind: str, axes: tuple[str, ...]) -> Callable:
    def decompose(x: ShardedTensor, bins: Any = 100, **kwargs: Any) -> Any:
        b = _bind(func, (x, bins), kwargs)
        mesh, n = x._mesh, len(x._shards)
        dd = kind.startswith("dd")
        if kind in ("counts", "dd_counts", "dd_edges") and b["range"] is None and x.numel():
            ext = _extremes(func, x, dd)
            if kind == "dd_edges":
                edges = aten._histogramdd_bin_edges.default(ext, bins, density=b["density"])
                return [ShardedTensor([e] * n, mesh, Layout(((),)), tuple(e.shape)) for e in edges]
            b["range"] = ext.t().reshape(-1).tolist() if dd else ext.tolist()
        if kind == "dd_edges":  # edges from the given range (or an empty input): local
            per_device = [func(s, bins, range=b["range"]) for s in x._shards]
            return [
                ShardedTensor([d[i] for d in per_device], mesh, Layout(((),)), tuple(e.shape))
                for i, e in enumerate(per_device[0])
            ]
        weight = _blocks(b["weight"], mesh, Layout(x._layout.dims[: x.ndim - dd]))
        extra = {} if kind.endswith("edges_given") else {"range": b["range"]}
        results = [
            func(s, _local(bins, j), weight=_local(weight, j), density=False, **extra)
            for j, s in enumerate(x._shards)
        ]
        hists = [r[0] if isinstance(r, tuple) else r for r in results]
        hist = ShardedTensor(
            hists, mesh, Layout(((),) * hists[0].ndim, axes, "sum"), tuple(hists[0].shape)
        )
        if dd:
            edges = _local(bins, 0) if kind == "dd_edges_given" else None
            if b["density"]:
                if edges is None:
                    ext = x._shards[0].new_zeros((0, x.shape[-1]))
                    edges = aten._histogramdd_bin_edges.default(ext, bins, range=b["range"])
                hist = _move(func, hist, hist._layout.without_partial())
                hist = ShardedTensor(
                    [_density(h, edges) for h in hist._shards],
                    mesh,
                    hist._layout,
                    tuple(hist.shape),
                )
            return hist
        edges = results[0][1]
        if b["density"]:
            hist = _move(func, hist, hist._layout.without_partial())
            hist = ShardedTensor(
                [_density(h, [edges]) for h in hist._shards], mesh, hist._layout, tuple(hist.shape)
            )
        return hist, ShardedTensor([r[1] for r in results], mesh, Layout(((),)), tuple(edges.shape))

    return decompose


@register_rule(*_HISTOGRAMS)
def histogram_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Counts of each device's points with the global edges: partial-sum over the split axes.

    histogramdd's points are the rows of a (..., D) input: the coordinate dim is whole.
    """
    kind = _HISTOGRAMS[ri.op]
    x = ri.tensors[0]
    src = x.layout.without_partial()
    dd = kind.startswith("dd")
    if dd and x.ndim:
        src = src.with_dim(x.ndim - 1, ())
    axes = tuple(a for dim in src.dims for a in dim)
    weight = _bind(ri.op, ri.args, ri.kwargs)["weight"]
    want = {id(x): src, id(weight): Layout(src.dims[: x.ndim - dd])}
    inputs = tuple(want.get(id(t), Layout(((),) * t.ndim)) for t in ri.tensors)
    yield Strategy(inputs, decompose=_histogram_decomposition(ri.op, kind, axes))


histogram_rule.no_meta = True  # consulted though torch has no meta kernel (see _dispatch)
