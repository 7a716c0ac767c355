"""Slices, splits, cat, flip, roll along a split dim keep the split and move only the rows
each device lacks (shardlib/ops/_rechunk.py, the rules in shardlib/ops/_views.py).

Reference: unsharded float64 torch (values and gradients at 1e-12). Bytes: closed form
from the shapes, the torch.chunk boundaries and the element size, derived in each test's
comment (which device needs which rows from whom, packed into ppermute rounds where every
device sends and receives at most once); the sweep checks every case against bounds
computed independently from the chunk boundaries (at least the most rows any device
lacks, at most the all-gather the rules used to do).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib.ops._rechunk import RowMove

D = torch.float64
X4 = {"x": 4}
A2B2 = {"a": 2, "b": 2}


def _t(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _run(fn, x, layout, axes):
    """fn on plain float64 x and on x sharded in `layout`: the sharded output and the
    forward/backward ledger records of fn (values and the input gradient checked)."""
    mesh = sl.Mesh.simulated(axes)
    plain = x.detach().clone().requires_grad_()
    want = fn(plain)
    want = want if isinstance(want, tuple | list) else (want,)
    cots = [_t(*w.shape, seed=7 + k) for k, w in enumerate(want)]
    sum((w * c).sum() for w, c in zip(want, cots)).backward()
    xs = sl.shard(x.detach().clone(), mesh, layout).requires_grad_()
    with sl.comm_ledger() as led:
        got = fn(xs)
        got = got if isinstance(got, tuple | list) else (got,)
        total = sum(
            (g * sl.shard(c, mesh, g.spec.without_partial())).sum() for g, c in zip(got, cots)
        )
    with sl.comm_ledger() as back:
        total.backward()
    for g, w in zip(got, want):
        torch.testing.assert_close(g.full(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs.grad.full(), plain.grad, rtol=1e-12, atol=1e-12)
    return got, _moves(led.records, ("ppermute", "all_gather")), _moves(back.records)


def _moves(records, kinds=("ppermute", "all_gather", "all_to_all")):
    """(kind, bytes) of the records an op made (the test's own sums and shards excluded)."""
    skip = ("sum", "mul", "full", "shard")
    return sorted(
        (r.kind, r.bytes) for r in records if r.kind in kinds and not r.cause.startswith(skip)
    )


def _chunks(n, p):
    c = -(-n // p)
    return [(min(i * c, n), min((i + 1) * c, n)) for i in range(p)]


# == closed-form bytes ==========================================================================
def test_gpt2_fused_qkv_split_moves_only_the_columns_across_block_boundaries():
    # c_attn's output [B, T, 3D], B=2, T=8, D=32: 96 columns over tp=2 (blocks 0..47, 48..95).
    # q (0..31) in blocks 0..15 | 16..31: device 1 lacks 16..31 (device 0 has them);
    # k (32..63): 32..47 | 48..63, both local; v (64..95): device 0 lacks 64..79 (device 1).
    # One ppermute round (0 -> 1 and 1 -> 0) of 16 columns; a column is B*T float64.
    # The all-gather it replaces moved 48 columns. Backward: the three gradients are cat
    # back into [B, T, 3D] split like c_attn: the same 16 columns the other way.
    col = 2 * 8 * 8
    x = _t(2, 8, 96)
    got, fwd, bwd = _run(lambda x: x.split(32, dim=2), x, sl.P(None, None, "x"), {"x": 2})
    assert [g.spec for g in got] == [sl.P(None, None, "x")] * 3
    assert fwd == [("ppermute", 16 * col)]
    assert bwd == [("ppermute", 16 * col)]
    # the same on {dp: 2, tp: 2} with the batch split over dp: a column is B/dp*T
    got, fwd, bwd = _run(lambda x: x.split(32, dim=2), x, sl.P("a", None, "b"), A2B2)
    assert fwd == bwd == [("ppermute", 16 * col // 2)]


def test_split_over_four_devices_takes_two_rounds():
    # 96 columns over 4 (blocks of 24), pieces of 32 (blocks of 8 per device):
    # device 0 lacks k 32..39 (from 1) and v 64..71 (from 2); device 1 lacks q 8..15 (0) and
    # v 72..79 (3); device 2 lacks q 16..23 (0) and v 80..87 (3); device 3 lacks q 24..31 (1)
    # and k 56..63 (2). Every device sends and receives two 8-column transfers: 2 rounds.
    col = 3 * 8
    got, fwd, bwd = _run(lambda x: x.split(32, dim=1), _t(3, 96), sl.P(None, "x"), X4)
    assert fwd == bwd == [("ppermute", 8 * col)] * 2


def test_slice_uneven_moves_the_rows_past_the_boundary():
    # 10 rows over 4: blocks 0..2, 3..5, 6..8, 9. x[3:9] has 6 rows: blocks 3,4 | 5,6 | 7,8 | -.
    # Device 0 lacks 3, 4 (device 1); device 1 lacks 6 (device 2); device 2 lacks 7, 8
    # (device 2: its own) -- so transfers 1 -> 0 (2 rows) and 2 -> 1 (1 row): one round,
    # 2 rows wide. Backward (slice_backward, zeros elsewhere): device 1 (rows 3..5) gets
    # rows 5 <- output row 2 on device 1 ... i.e. rows 3, 4 come back from device 0 and 6
    # from device 1: one round, 2 rows. A row is 3 float64 (dim 0 of size 3).
    row = 3 * 8
    got, fwd, bwd = _run(lambda x: x[:, 3:9], _t(3, 10), sl.P(None, "x"), X4)
    assert got[0].spec == sl.P(None, "x")
    assert fwd == bwd == [("ppermute", 2 * row)]


def test_flip_moves_whole_blocks_to_the_mirror_device():
    # 12 rows over 4 (blocks of 3): device i's output rows come from device 3-i: one round
    # (0<->3, 1<->2) of a whole block. Backward: flip again, the same.
    row = 5 * 8
    got, fwd, bwd = _run(lambda x: x.flip(0), _t(12, 5), sl.P("x"), X4)
    assert got[0].spec == sl.P("x", None)
    assert fwd == bwd == [("ppermute", 3 * row)]
    # 10 rows (blocks 3, 3, 3, 1): output rows 0..2 are input rows 9, 8, 7 (devices 3, 2),
    # rows 3..5 are 6, 5, 4 (2, 1), rows 6..8 are 3, 2, 1 (1, 0), row 9 is 0 (0).
    # Transfers 3->0 (1), 2->0 (2), 2->1 (1), 1->2 (2), 0->2 (2), 0->3 (1): rounds
    # {2->0, 1->2, 0->3 ...} packed widest first: (0->2: 2, 1->2 no...) -> 2 rounds of 2 + 1.
    got, fwd, bwd = _run(lambda x: x.flip(0), _t(10, 5), sl.P("x"), X4)
    assert fwd == bwd == sorted([("ppermute", 2 * row), ("ppermute", 1 * row)])


def test_cumsum_backward_flips_without_gathering():
    # cumsum's derivative flips the gradient, scans it, flips back: the flips move blocks
    # (12 rows over 4: one round of 3 rows each), the scan only its per-shard totals.
    row = 2 * 8
    _, fwd, bwd = _run(lambda x: x.cumsum(0), _t(12, 2), sl.P("x"), X4)
    kinds = [k for k, _ in bwd]
    assert kinds.count("ppermute") == 2 and bwd.count(("ppermute", 3 * row)) == 2
    gathered = [b for k, b in bwd if k == "all_gather"]
    assert all(b <= 3 * row for b in gathered)  # per-shard totals, not the dim


def test_roll_moves_only_the_wrapped_rows():
    # 12 rows over 4 (blocks of 3), roll by 1: each device's output block starts with the
    # last row of its left neighbour (device 0: the last row of device 3): one round, 1 row.
    row = 4 * 8
    _, fwd, bwd = _run(lambda x: x.roll(1, 0), _t(12, 4), sl.P("x"), X4)
    assert fwd == bwd == [("ppermute", row)]


def test_cat_along_a_split_dim_rechunks():
    # cat of two [3, 8] tensors split on dim 1 over 2 (blocks of 4): the result's 16 columns
    # in blocks of 8 are a's block 0..7 on device 0 (it lacks 4..7, on device 1) and b's on
    # device 1 (it lacks b's 0..3, on device 0): one round of 4 columns of 3 float64.
    mesh = sl.Mesh.simulated({"x": 2})
    a, b = _t(3, 8), _t(3, 8, seed=2)
    sa = sl.shard(a, mesh, sl.P(None, "x"))
    sb = sl.shard(b, mesh, sl.P(None, "x"))
    with sl.comm_ledger() as led:
        c = torch.cat([sa, sb], 1)
    assert c.spec == sl.P(None, "x")
    assert [(r.kind, r.bytes) for r in led.records] == [("ppermute", 4 * 3 * 8)]
    torch.testing.assert_close(c.full(), torch.cat([a, b], 1), rtol=0, atol=0)


def test_a_write_through_a_moved_slice_reaches_its_base():
    mesh = sl.Mesh.simulated(X4)
    x = _t(3, 10)
    xs = sl.shard(x.clone(), mesh, sl.P(None, "x"))
    v = xs[:, 3:9]
    v.mul_(0)
    x[:, 3:9].mul_(0)
    torch.testing.assert_close(xs.full(), x, rtol=0, atol=0)
    xs.add_(1)  # and the view refreshes from its changed base
    torch.testing.assert_close(v.full(), x[:, 3:9] + 1, rtol=0, atol=0)


def test_strict_mode_refuses_a_row_move():
    mesh = sl.Mesh.simulated(X4)
    xs = sl.shard(_t(3, 10), mesh, sl.P(None, "x"))
    with sl.strict(), pytest.raises(sl.LayoutError, match=r"moves rows between devices.*Fix"):
        xs.flip(1)


# == sweep: values, bounds ======================================================================
CASES = [
    ("slice", lambda x: x[:, 2:11]),
    ("slice-step", lambda x: x[:, 1::3]),
    ("slice-neg", lambda x: x[:, -5:]),
    ("narrow", lambda x: x.narrow(1, 4, 6)),
    ("split", lambda x: x.split(5, dim=1)),
    ("split-sizes", lambda x: x.split([2, 7, 4], dim=1)),
    ("flip", lambda x: x.flip(1)),
    ("flip-2", lambda x: x.flip(0, 1)),
    ("roll", lambda x: x.roll(-3, 1)),
    ("roll-2", lambda x: x.roll((2, 5), (0, 1))),
    ("unsplit-slice", lambda x: x[1:3]),
]
LAYOUTS = [
    (X4, sl.P(None, "x")),  # 13 over 4: 4, 4, 4, 1 (uneven)
    (A2B2, sl.P("a", "b")),  # 2-D mesh: dim 0 over a, dim 1 over b
    (A2B2, sl.P(None, ("a", "b"))),  # dim 1 over both axes
    (A2B2, sl.P(None, ("b", "a"))),
]


@pytest.mark.parametrize("name, fn", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("axes, layout", LAYOUTS, ids=["x4", "a-b", "ab", "ba"])
def test_values_grads_and_bounds(name, fn, axes, layout):
    shape = (6, 13)
    got, fwd, _ = _run(fn, _t(*shape), layout, axes)
    for g in got:
        assert g.spec == got[0].spec and g.spec.dims[1] == layout.dims[1]  # the split survives
    assert all(k == "ppermute" for k, _ in fwd)
    moved = sum(b for _, b in fwd)
    # bounds from the chunk boundaries, per split dim e: which source rows each device's
    # output blocks read (fn applied to the row index along e), which it lacks, from whom
    am = sl.Mesh.simulated(axes).abstract
    lower, upper, lacking = 0, 0, False
    for e, axes_e in enumerate(layout.dims):
        if not axes_e:
            continue
        p = am.group_size(axes_e)
        other = 1 - e
        row = max(b - a for a, b in _chunks(shape[other], am.group_size(layout.dims[other]))) * 8
        index = torch.arange(shape[e], dtype=D).reshape([-1 if d == e else 1 for d in (0, 1)])
        outs = fn(index.expand(shape))
        outs = outs if isinstance(outs, tuple | list) else (outs,)
        most = 0
        for i in range(p):
            need = set()
            for o in outs:
                col = o.select(other, 0)
                a, b = _chunks(col.shape[0], p)[i]
                need |= {int(v) for v in col[a:b]}
            lo, hi = _chunks(shape[e], p)[i]
            lack = {q for q in need if not lo <= q < hi}
            lacking |= bool(lack)
            for a, b in _chunks(shape[e], p):
                most = max(most, len({q for q in lack if a <= q < b}))
        lower += most * row
        upper += (p - 1) * math.ceil(shape[e] / p) * row  # the all-gather of dim e
    assert lower <= moved <= upper
    assert (moved > 0) == lacking


def test_row_move_plan_is_pure_data():
    # a slice of rows 3..8 of 10 over 2 devices: device 0 (rows 0..4) lacks row 5
    m = RowMove(0, ("x",), (10,), ((3, 4, 5), (6, 7, 8)))
    assert m.rounds == (((1, 0, (5,)),),) and m.widths == (1,) and m.bytes(8) == 8
    # nothing to move: every row local
    assert RowMove(0, ("x",), (4,), ((0, 1), (2, 3))).rounds == ()


# == real processes ============================================================================
def _program(mesh):
    x = sl.shard(_t(2, 8, 96), mesh, sl.P(None, None, "x")).requires_grad_()
    with sl.comm_ledger() as led:
        q, k, v = x.split(32, dim=2)
        y = (q * 2 + k.flip(2) + v.roll(3, 2))[:, 1:7]
        y.backward(sl.shard(_t(*y.shape, seed=3), mesh, y.spec))
    keep = [q, k, v, y, x.grad]
    return [[s.clone() for s in t.local_shards()] for t in keep], [
        (r.kind, r.axes, r.bytes, r.direction) for r in led.records
    ]


@pytest.mark.dist
def test_row_moves_on_gloo_match_the_simulated_mesh(workers4):
    sim_shards, sim_ledger = _program(sl.Mesh.simulated(X4))
    assert any(k == "ppermute" for k, *_ in sim_ledger)
    ranks = workers4.run(_program, X4)
    for rank, (shards, ledger) in enumerate(ranks):
        assert ledger == sim_ledger
        for got, want in zip(shards, sim_shards):
            torch.testing.assert_close(got[0], want[rank], rtol=1e-12, atol=1e-12)


_ = F  # circular pad: see tests/test_conv.py
