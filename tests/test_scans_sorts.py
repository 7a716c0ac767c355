"""Scans, sorts and selection along a dim (`shardlib/ops/_scans.py`): values, gradients, ledger.

Covers cumsum, cumprod, cummax, cummin, logcumsumexp, sort/argsort, topk, kthvalue,
median and nanmedian (along a dim and over all elements), mode, searchsorted, bucketize,
histc and bincount.

- Values and gradients against unsharded torch in float64 on {a:2, b:2} and {x:4}: a
  (5, 6, 3) tensor whose op dim (0 or 1) is split over one axis, over both
  (``("a", "b")``), or unsplit with another dim split. Every split is uneven with an
  empty chunk (5 and 6 over 4 devices: 2,2,1,0 and 2,2,2,0). Extrema and medians get
  NaN inputs. Indices compare exactly: the values are random (no ties; among equal
  values torch's choice is implementation-defined).
- Selection with sampling rounds (rows of 301 and 4096 elements, NaN-heavy rows,
  integer ties) against torch.
- Ledger, closed forms from the shapes (P = 4 devices, B rows per device, 8-byte
  elements; all-gather = (P-1)·block, all-reduce = 2(P-1)·ceil(m/P) elements): a scan
  along a split dim all-gathers one total per chunk and row, (P-1)·B elements per
  device (cummax/cummin: values and indices); a sum/avg-partial cumsum stays partial
  with that one gather; topk and kthvalue all-gather k candidates per device and row;
  median of 4096 elements runs two sampling rounds (written out below); each is a
  small fraction of gathering the dim, (P-1)·n/P·B elements.
- sort along a split dim with a batch dim large enough: one all-to-all.
- Strict mode: a scan, sort, topk or median along a split dim raises naming the op;
  along an unsplit dim nothing is moved.
- searchsorted/bucketize with split boundaries and histc (explicit range): partial-sum
  outputs with no collective; histc over the data's range: scalar all-reduces of the
  min and max (one per split axis);
  bincount: one scalar all-reduce (the max), partial-sum counts; histogram and
  histogramdd: partial-sum counts with the global edges (density and data ranges
  included).
- unique / unique_consecutive: gathered (one all-gather), refused by strict mode.
"""

from __future__ import annotations

import math

import pytest
import torch

import shardlib as sl
from shardlib.ops import _scans
from tests._reference import make_summands

P = sl.P
NAN = float("nan")
MESHES = {"a2b2": {"a": 2, "b": 2}, "x4": {"x": 4}}
TOL = {"rtol": 1e-10, "atol": 1e-10, "equal_nan": True}


def _x(nan: bool = False) -> torch.Tensor:
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    if nan:
        x[1, 2, 0] = x[4, 5, 1] = x[0, 0, 2] = NAN
    return x


def _layouts(mesh: str, d: int) -> list[sl.Layout]:
    other = 1 - d
    spec = [None, None, None]

    def lay(at_d, at_other):
        s = list(spec)
        s[d], s[other] = at_d, at_other
        return P(*s)

    if mesh == "x4":
        return [lay("x", None), lay(None, "x")]
    return [lay("a", "b"), lay(("a", "b"), None), lay(None, ("b", "a"))]


OPS = {
    "cumsum": (lambda t, d: t.cumsum(d), False),
    "cumprod": (lambda t, d: t.cumprod(d), False),
    "cummax": (lambda t, d: tuple(t.cummax(d)), True),
    "cummin": (lambda t, d: tuple(t.cummin(d)), True),
    "logcumsumexp": (lambda t, d: t.logcumsumexp(d), False),
    "sort": (lambda t, d: tuple(t.sort(d, descending=True)), True),
    "argsort_stable": (lambda t, d: torch.argsort(t, stable=True, dim=d), True),
    "topk": (lambda t, d: tuple(t.topk(2, d)), True),
    "topk_smallest": (lambda t, d: tuple(t.topk(3, d, largest=False)), True),
    "kthvalue": (lambda t, d: tuple(t.kthvalue(2, d, keepdim=True)), True),
    "median": (lambda t, d: tuple(t.median(d)), True),
    "nanmedian": (lambda t, d: tuple(t.nanmedian(d, keepdim=True)), True),
    "mode": (lambda t, d: tuple(t.mode(d)), False),
    "median_all": (lambda t, d: t.median(), False),
    "nanmedian_all": (lambda t, d: t.nanmedian(), True),
}
CASES = [
    (mesh, name, d, lay)
    for mesh in MESHES
    for name in OPS
    for d in ((0, 1) if name in ("cumsum", "cummax", "topk", "median") else (1,))
    for lay in _layouts(mesh, d)
]


def _leaves(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("mesh,name,d,layout", CASES, ids=lambda v: str(v))
def test_values_and_gradients(mesh, name, d, layout):
    fn, nan = OPS[name]
    m = sl.Mesh.simulated(MESHES[mesh])
    x = _x(nan).requires_grad_()
    xs = sl.shard(x.detach(), m, layout).requires_grad_()
    want, got = _leaves(fn(x, d)), _leaves(fn(xs, d))
    weights = [torch.randn(w.shape, dtype=torch.float64) for w in want]
    for g, w in zip(got, want):
        assert isinstance(g, sl.ShardedTensor)
        full = g.full()
        assert full.shape == w.shape and full.dtype == w.dtype
        if w.dtype.is_floating_point:
            torch.testing.assert_close(full, w.detach(), **TOL)
        else:
            assert torch.equal(full, w)
    floats = [(g, w, c) for g, w, c in zip(got, want, weights) if w.dtype.is_floating_point]
    if not floats:
        return
    sum((w * c).nansum() for _, w, c in floats).backward()
    sum((g * c).nansum() for g, _, c in floats).backward()
    torch.testing.assert_close(xs.grad.full(), x.grad, **TOL)


@pytest.mark.parametrize("mesh", MESHES)
def test_selection_with_sampling_rounds(mesh):
    """Rows of 301 (one sampling round) and 4096 (two) elements, NaN-heavy rows, int ties."""
    m = sl.Mesh.simulated(MESHES[mesh])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 301, dtype=torch.float64, generator=g)
    x[0, 7] = NAN
    x[1, ::3] = NAN
    x[2, 100:] = NAN
    xs = sl.shard(x, m, P(None, tuple(MESHES[mesh])))
    for fn in (lambda t: t.median(1), lambda t: t.nanmedian(1)):
        for got, want in zip(fn(xs), fn(x)):
            assert torch.equal(got.full().nan_to_num(9.0), want.nan_to_num(9.0))
    # rows 1 and 2 hold 100 and 201 ties (NaN -> 0.5) around rank 150, and the slice keeps
    # the dim split (its blocks re-chunked): torch's index among equal values is its
    # kernel's, ours the tie of rank t by global index; both point at the k-th value
    y = x[:, 1:].nan_to_num(0.5)
    (vals, idx), (want, _) = xs[:, 1:].nan_to_num(0.5).kthvalue(150, 1), y.kthvalue(150, 1)
    assert torch.equal(vals.full(), want)
    assert torch.equal(y.gather(1, idx.full()[:, None])[:, 0], want)
    torch.testing.assert_close(xs.nanmedian().full(), x.nanmedian(), **TOL)
    big = torch.randn(4096, dtype=torch.float64, generator=g)
    bs = sl.shard(big, m, P(tuple(MESHES[mesh])))
    assert torch.equal(bs.median().full(), big.median())
    for got, want in zip(bs.kthvalue(1000), big.kthvalue(1000)):
        assert torch.equal(got.full(), want)
    ints = torch.randint(0, 40, (4, 301), generator=g)  # many ties: values only
    assert torch.equal(
        sl.shard(ints, m, P(None, tuple(MESHES[mesh]))).median(1).values.full(),
        ints.median(1).values,
    )


# == ledger ====================================================================
def _records(fn, *args):
    with sl.comm_ledger() as led:
        out = fn(*args)
    return out, [(r.kind, r.axes, r.bytes) for r in led.records]


PX, B, N = 4, 3, 4096  # devices, rows, dim size
DIM_GATHER = (PX - 1) * (N // PX) * B * 8  # all-gathering the dim: 73728 bytes per device


@pytest.mark.parametrize("name", ["cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"])
def test_scan_moves_one_total_per_chunk(name):
    m = sl.Mesh.simulated({"x": PX})
    x = torch.randn(B, N, dtype=torch.float64)
    xs = sl.shard(x, m, P(None, "x"))
    out, records = _records(lambda t: getattr(torch, name)(t, 1), xs)
    totals = ("all_gather", ("x",), (PX - 1) * B * 8)  # P-1 totals per row, 72 bytes
    want = [totals, totals] if name in ("cummax", "cummin") else [totals]
    assert records == want
    assert sum(r[2] for r in records) * 100 < DIM_GATHER
    out = out[0] if isinstance(out, tuple) else out
    assert out.spec == P(None, "x")


def test_scan_over_two_axes_and_partial_cumsum():
    m = sl.Mesh.simulated({"a": 2, "b": 2})
    x = torch.randn(B, 1000, dtype=torch.float64)
    xs = sl.shard(x, m, P(None, ("a", "b")))
    out, records = _records(lambda t: t.cumsum(1), xs)
    assert records == [("all_gather", ("a", "b"), 3 * B * 8)]  # 4 chunks: 3 totals per row
    torch.testing.assert_close(out.full(), x.cumsum(1), **TOL)
    for op in ("sum", "avg"):
        layout = P(None, "a", partial={"b": op})
        xp = sl.from_local(make_summands(x, layout, m.axes), m, layout, tuple(x.shape))
        out, records = _records(lambda t: t.cumsum(1), xp)
        assert out.spec == layout  # linear: the partial stays
        assert records == [("all_gather", ("a",), 1 * B * 8)]  # summands' totals, 2 chunks
        torch.testing.assert_close(out.full(), x.cumsum(1), **TOL)


def test_topk_and_kthvalue_move_k_candidates():
    m = sl.Mesh.simulated({"x": PX})
    x = torch.randn(B, N, dtype=torch.float64)
    xs = sl.shard(x, m, P(None, "x"))
    for k in (1, 5):
        out, records = _records(lambda t, k=k: t.topk(k, 1), xs)
        per = ("all_gather", ("x",), (PX - 1) * B * k * 8)  # k values, then k indices
        assert records == [per, per]
        assert 2 * per[2] * 100 < DIM_GATHER
        assert out.values.spec == P(None, None)
        for got, want in zip(out, x.topk(k, 1)):
            assert torch.equal(got.full(), want)
    # kthvalue k=3: a device's ranks that can hold rank 2 are its first 3 (no rounds)
    out, records = _records(lambda t: t.kthvalue(3, 1), xs)
    per = ("all_gather", ("x",), (PX - 1) * B * 3 * 8)
    assert records == [per, per]
    for got, want in zip(out, x.kthvalue(3, 1)):
        assert torch.equal(got.full(), want)


@pytest.mark.parametrize("whole", [False, True])
def test_median_moves_samples_not_the_dim(whole):
    """median of 4096 elements on 4 devices (1024 each), s = 8 samples per round.

    The per-row NaN count: an all-reduce of one int64, 2·3·1·8 = 48 bytes. Two rounds:
    all-gathers of 8 values and 8 indices (3·8·8 = 192 bytes each) and an all-reduce of
    the 32 samples' counts (2·3·8·8 = 384). Windows then hold at most
    ceil(ceil(1024/8)/8) = 16 candidates: two all-gathers of 3·16·8 = 384 bytes.
    """
    assert _scans._SAMPLES == 8
    m = sl.Mesh.simulated({"x": PX})
    x = torch.randn(64, 64, dtype=torch.float64) if whole else torch.randn(N, dtype=torch.float64)
    xs = sl.shard(x, m, P("x", None) if whole else P("x"))
    out, records = _records(lambda t: t.median() if whole else t.median(0), xs)
    rnd = [("all_gather", ("x",), 192), ("all_gather", ("x",), 192), ("all_reduce", ("x",), 384)]
    final = [("all_gather", ("x",), 384)] * 2  # values, and indices (they order ties)
    assert records == [("all_reduce", ("x",), 48), *rnd, *rnd, *final]
    assert sum(r[2] for r in records) * 10 < (PX - 1) * (N // PX) * 8
    value = out if whole else out.values
    assert torch.equal(value.full(), x.median() if whole else x.median(0).values)


def test_sort_moves_the_split_to_a_batch_dim():
    m = sl.Mesh.simulated({"x": PX})
    x = torch.randn(8, 1024, dtype=torch.float64)
    out, records = _records(lambda t: t.sort(1), sl.shard(x, m, P(None, "x")))
    assert records == [("all_to_all", ("x",), (PX - 1) * 2 * 256 * 8)]  # pieces of 2 x 256
    assert out.values.spec == P("x", None)
    for got, want in zip(out, x.sort(1)):
        assert torch.equal(got.full(), want)


# == strict mode ===============================================================
@pytest.mark.parametrize(
    "name,fn",
    [
        ("cumsum", lambda t, d: t.cumsum(d)),
        ("sort", lambda t, d: t.sort(d)),
        ("topk", lambda t, d: t.topk(2, d)),
        ("median", lambda t, d: t.median(d)),
    ],
)
def test_strict_mode_names_the_op(name, fn):
    m = sl.Mesh.simulated({"x": PX})
    xs = sl.shard(torch.randn(6, 10, dtype=torch.float64), m, P(None, "x"))
    with sl.strict():
        with pytest.raises(sl.LayoutError, match=rf"sl\.strict: aten\.{name}\."):
            fn(xs, 1)
        with sl.comm_ledger() as led:
            fn(xs, 0)  # along the unsplit dim: local
    assert led.records == []


# == searches and histograms ===================================================
def test_search_and_histogram_are_partial_sums():
    m = sl.Mesh.simulated({"a": 2, "b": 2})
    g = torch.Generator().manual_seed(5)
    bounds = torch.sort(torch.randn(9, dtype=torch.float64, generator=g)).values
    v = torch.randn(4, 3, dtype=torch.float64, generator=g)
    bs = sl.shard(bounds, m, P(("a", "b")))
    vs = sl.shard(v, m, P(None, None))
    for fn in (
        lambda s, t: torch.searchsorted(s, t),
        lambda s, t: torch.searchsorted(s, t, right=True),
        lambda s, t: torch.bucketize(t, s),
        lambda s, t: torch.bucketize(t, s, right=True, out_int32=True),
    ):
        out, records = _records(fn, bs, vs)
        assert records == [] and out.spec == P(None, None, partial=("a", "b"))
        assert torch.equal(out.full(), fn(bounds, v))
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    xs = sl.shard(x, m, P("a", "b"))
    out, records = _records(lambda t: torch.histc(t, 6, -1.0, 1.0), xs)
    assert records == [] and out.spec == P(None, partial=("a", "b"))
    assert torch.equal(out.full(), torch.histc(x, 6, -1.0, 1.0))
    out, records = _records(lambda t: torch.histc(t, 6), xs)  # the data's range
    assert records == [("all_reduce", (a,), 2 * 1 * 8) for _ in "mM" for a in "ab"]  # scalars
    assert torch.equal(out.full(), torch.histc(x, 6))


def test_bincount_is_a_partial_sum_of_local_counts():
    m = sl.Mesh.simulated({"x": PX})
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 9, (11,), generator=g)
    w = torch.randn(11, dtype=torch.float64, generator=g)
    ids_s, w_s = sl.shard(ids, m, P("x")), sl.shard(w, m, P("x"))
    out, records = _records(lambda t: torch.bincount(t), ids_s)
    assert records == [("all_reduce", ("x",), 2 * (PX - 1) * 8)]  # the max: one int64
    assert out.spec == P(None, partial="x")
    assert torch.equal(out.full(), torch.bincount(ids))
    out = torch.bincount(ids_s, w_s, minlength=12)
    torch.testing.assert_close(out.full(), torch.bincount(ids, w, minlength=12), **TOL)
    assert math.prod(out.shape) == 12
    short, short_w = ids[:5], w[:5]  # 5 over 4 devices: the last block is empty
    out = torch.bincount(sl.shard(short, m, P("x")), short_w)  # plain weights: a constant
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.full(), torch.bincount(short, short_w), **TOL)


def test_unique_is_gathered_and_refused_by_strict_mode():
    m = sl.Mesh.simulated({"x": PX})
    x = torch.randint(0, 5, (3, 10), generator=torch.Generator().manual_seed(8))
    xs = sl.shard(x, m, P(None, "x"))
    for fn in (
        lambda t: torch.unique(t, return_inverse=True, return_counts=True),
        lambda t: torch.unique_consecutive(t, return_counts=True, dim=1),
    ):
        out, records = _records(fn, xs)
        assert [r[0] for r in records] == ["all_gather"]
        for got, want in zip(out, fn(x)):
            assert torch.equal(got.full(), want)
        with sl.strict(), pytest.raises(sl.LayoutError, match="unique"):
            fn(xs)


def test_histograms_count_locally_with_global_edges():
    m = sl.Mesh.simulated({"a": 2, "b": 2})
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    w = torch.rand(7, 5, dtype=torch.float64, generator=g)
    xs, ws = sl.shard(x, m, P("a", "b")), sl.shard(w, m, P("a", "b"))
    out, records = _records(lambda t: torch.histogram(t, 6, range=(-1.0, 1.0), weight=ws), xs)
    assert records == [] and out.hist.spec == P(None, partial=("a", "b"))
    for got, want in zip(out, torch.histogram(x, 6, range=(-1.0, 1.0), weight=w)):
        torch.testing.assert_close(got.full(), want, **TOL)  # weights summed in another order
    for kw in ({}, {"density": True}):  # the data's range; density reduces first
        for got, want in zip(torch.histogram(xs, 6, **kw), torch.histogram(x, 6, **kw)):
            torch.testing.assert_close(got.full(), want, **TOL)
    pts = torch.randn(9, 3, dtype=torch.float64, generator=g)
    ps = sl.shard(pts, m, P("a", "b"))  # the coordinate dim is gathered
    got, want = (
        torch.histogramdd(ps, [2, 3, 4], density=True),
        torch.histogramdd(pts, [2, 3, 4], density=True),
    )
    torch.testing.assert_close(got.hist.full(), want.hist, **TOL)
    for e, f in zip(got.bin_edges, want.bin_edges):
        torch.testing.assert_close(e.full(), f, **TOL)
