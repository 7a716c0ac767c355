"""Convolution, pooling, padding and resampling on sharded tensors (shardlib/ops/_conv.py).

Covers: values and gradients equal unsharded float64 torch on {a:2, b:2} and {x:4} for
conv1d/2d/3d and transposed convs under batch, output-channel, input-channel (partial
output), group and spatial splits (uneven and empty blocks included), pools, pads and
resampling; the ledger: a spatially split conv moves only its halo rows by ppermute,
forward and backward, in closed form from the shapes; batch and channel splits move
nothing; a padded split dim moves only the rows that cross a block boundary (closed
form) and GPT-2's pad on an unsplit dim is local; strict mode refuses a halo exchange;
the row-exchange plan as pure data. The sweep over more ops and layouts is
tools/opinfo_report.py's (and the slow test at the end).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib.ops._conv import _Rows

D = torch.float64
A2B2 = {"a": 2, "b": 2}
X4 = {"x": 4}


def _run(fn, tensors, layouts, axes, *, split_grad=True):
    """fn on plain float64 tensors and on sharded ones: outputs, input grads, ledger records.

    `layouts[i]` None leaves tensor i plain (a replicated constant). The upstream gradient
    arrives in the output's own layout (partials reduced) when `split_grad`.
    """
    mesh = sl.Mesh.simulated(axes)
    gen = torch.Generator().manual_seed(0)
    plain = [t.detach().clone().requires_grad_() for t in tensors]
    want = fn(*plain)
    weight = torch.randn(want.shape, generator=gen, dtype=D)
    (want * weight).sum().backward()
    sharded = [
        t.detach().clone().requires_grad_()
        if lay is None
        else sl.shard(t.detach().clone(), mesh, lay).requires_grad_()
        for t, lay in zip(tensors, layouts)
    ]
    with sl.comm_ledger() as led:
        got = fn(*sharded)
        w = sl.shard(weight, mesh, got.spec.without_partial()) if split_grad else weight
        (got * w).sum().backward()
    torch.testing.assert_close(got.full(), want, rtol=1e-10, atol=1e-10)
    for s, p in zip(sharded, plain):
        g = s.grad.full() if isinstance(s.grad, sl.ShardedTensor) else s.grad
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-10)
    return got, led.records


def _t(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _kinds(records, direction=None):
    return [(r.kind, r.bytes) for r in records if direction is None or r.direction == direction]


def _during(records, direction):
    """Records of the op's forward or backward (the final .full() of the test excluded)."""
    return [r for r in records if r.direction == direction and r.cause != "full"]


# == convolution: values and gradients ============================================
CONVS = [
    # (name, fn, shapes of input / weight / bias)
    ("conv1d", lambda x, w, b: F.conv1d(x, w, b, padding=2, dilation=2), (2, 4, 11), (6, 4, 3)),
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=(1, 2)), (2, 4, 9, 7), (6, 4, 3, 3)),
    ("conv3d", lambda x, w, b: F.conv3d(x, w, b, padding=1), (3, 2, 5, 4, 3), (4, 2, 3, 2, 2)),
    ("conv2d-groups", lambda x, w, b: F.conv2d(x, w, b, groups=2, padding=1), (2, 4, 7, 7), (6, 2, 3, 3)),
    ("convT2d", lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1), (2, 4, 5, 6), (4, 6, 3, 3)),
]  # fmt: skip
LAYOUTS = {
    "a2b2": [
        (sl.P("a", None, "b"), None),  # batch + spatial (halo)
        (sl.P(None, ("a", "b")), None),  # input channels over both axes
        (sl.P(None, None, "a", "b"), None),  # two spatial dims: the corners come along
    ],
    "x4": [
        (sl.P(None, None, "x"), None),  # spatial, uneven blocks
        (sl.P(None, "x"), sl.P(None, "x")),  # input channels (groups: whole groups or moved)
        (sl.P("x"), sl.P("x")),  # batch (an empty block) and weight dim 0 (moved or not)
    ],
}


@pytest.mark.parametrize("mesh", ["a2b2", "x4"])
@pytest.mark.parametrize("name, fn, xs, ws", CONVS, ids=[c[0] for c in CONVS])
def test_conv_values_and_grads(mesh, name, fn, xs, ws):
    axes = A2B2 if mesh == "a2b2" else X4
    cout = ws[1] * (2 if "groups" in name else 1) if name.startswith("convT") else ws[0]
    x, w, b = _t(*xs), _t(*ws, seed=2), _t(cout, seed=3)
    for xl, wl in LAYOUTS[mesh]:
        xl = xl if xl is None or xl.ndim <= len(xs) else None
        if xl is not None and xl.ndim < len(xs):
            xl = sl.Layout((*xl.dims, *((),) * (len(xs) - xl.ndim)))
        if wl is not None:
            wl = sl.Layout((*wl.dims, *((),) * (len(ws) - wl.ndim)))
        if xl is None and wl is None:
            continue
        _run(fn, [x, w, b], [xl, wl, None], axes)


def test_conv_partial_input_stays_partial_and_bias_is_added_once():
    mesh = sl.Mesh.simulated(X4)
    x, w, b = _t(2, 3, 8, 8), _t(5, 3, 3, 3, seed=2), _t(5, seed=3)
    rest = [torch.full_like(x, float(i)) for i in (1, -2, 3)]  # summands adding up to x
    parts = [x - sum(rest), *rest]
    xs = sl.from_local(parts, mesh, sl.P(None, None, None, None, partial="x"), tuple(x.shape))
    with sl.comm_ledger() as led:
        y = F.conv2d(xs, w, b, padding=1)
    assert y.spec.partial == ("x",) and led.records == []
    torch.testing.assert_close(y.full(), F.conv2d(x, w, b, padding=1))


def test_conv_uneven_and_empty_spatial_blocks():
    # H = 5 over 4 devices: blocks of 2, 2, 1, 0 rows; output blocks follow the output size
    x, w, b = _t(2, 3, 5, 6), _t(4, 3, 3, 3, seed=2), _t(4, seed=3)
    for fn in (
        lambda x, w, b: F.conv2d(x, w, b, padding=1),
        lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=(2, 0), dilation=(2, 1)),
        lambda x, w, b: F.conv2d(x, w, b),  # output height 3 over 4: an empty output block
    ):
        got, _ = _run(fn, [x, w, b], [sl.P(None, None, "x"), None, None], X4)
        assert got.spec == sl.P(None, None, "x", None)


# == convolution: what moves ========================================================
def test_spatial_split_moves_only_halo_rows():
    # x [N, C, H, W] with H = 16 split over 4 devices (4 rows each), a 3x3 kernel, padding 1:
    # each output block needs 1 row from each neighbour: (k-1)*dilation = 2 rows per device,
    # split 1 left / 1 right by the padding. A row is N*C*W float64 = 2*3*9*8 bytes.
    n, c, h, wd = 2, 3, 16, 9
    row = n * c * wd * 8
    x, w, b = _t(n, c, h, wd), _t(5, c, 3, 3, seed=2), _t(5, seed=3)
    got, records = _run(
        lambda x, w, b: F.conv2d(x, w, b, padding=1),
        [x, w, b],
        [sl.P(None, None, "x"), None, None],
        X4,
    )
    assert got.spec == sl.P(None, None, "x", None)
    forward, backward = _during(records, "forward"), _during(records, "backward")
    assert sorted(_kinds(forward)) == [("ppermute", row), ("ppermute", row)]
    # backward: the input's halo rows again (for grad_weight), then grad_input's halo rows
    # back to their owners (the transpose); grad_weight/grad_bias stay partial (no collective)
    assert sorted(_kinds(backward)) == [("ppermute", row)] * 4
    assert all(r.axes == ("x",) for r in forward + backward)


def test_strided_halo_rows_follow_the_output_blocks():
    # H = 16 over 4, kernel 5, stride 2, padding 2: output height 8, blocks of 2 rows;
    # device i's outputs 2i, 2i+1 read input rows [4i-2, 4i+5): 2 rows from the left
    # neighbour (the padding) and 1 from the right ((2-1)*2 + 4 - 2 - 3 = 1).
    n, c, h, wd = 2, 3, 16, 4
    row = n * c * wd * 8
    x, w = _t(n, c, h, wd), _t(4, c, 5, 1, seed=2)
    _, records = _run(
        lambda x, w: F.conv2d(x, w, stride=(2, 1), padding=(2, 0)),
        [x, w],
        [sl.P(None, None, "x"), None],
        X4,
    )
    assert sorted(_kinds(_during(records, "forward"))) == [("ppermute", row), ("ppermute", 2 * row)]


def test_grad_input_only_skips_the_input_halo():
    # A frozen weight: backward needs grad_input only, so only grad_input's halos move.
    n, c, h, wd = 2, 3, 16, 9
    row = n * c * wd * 8
    mesh = sl.Mesh.simulated(X4)
    x = sl.shard(_t(n, c, h, wd), mesh, sl.P(None, None, "x")).requires_grad_()
    w = _t(5, c, 3, 3, seed=2)
    y = F.conv2d(x, w, padding=1)
    with sl.comm_ledger() as led:
        y.backward(sl.shard(_t(*y.shape, seed=4), mesh, y.spec))
    assert sorted(_kinds(led.records)) == [("ppermute", row), ("ppermute", row)]


@pytest.mark.parametrize(
    "xl, wl, bl, out",
    [
        (sl.P("x"), None, None, sl.P("x", None, None, None)),  # batch
        (None, sl.P("x"), sl.P("x"), sl.P(None, "x", None, None)),  # output channels
        (sl.P(None, "x"), sl.P(None, "x"), None, sl.P(None, None, None, None, partial="x")),  # C_in
    ],
    ids=["batch", "out-channels", "in-channels"],
)
def test_batch_and_channel_splits_move_nothing(xl, wl, bl, out):
    x, w, b = _t(4, 8, 6, 6), _t(8, 8, 3, 3, seed=2), _t(8, seed=3)
    got, records = _run(lambda x, w, b: F.conv2d(x, w, b, padding=1), [x, w, b], [xl, wl, bl], X4)
    assert got.spec == out
    # gradients of replicated leaves stay partial (reduced lazily, like DDP's): nothing moves
    assert _during(records, "forward") == [] and _during(records, "backward") == []


def test_group_split_runs_whole_groups_locally():
    # 4 groups over 4 devices: each device convolves its own group
    x, w = _t(2, 8, 6, 6), _t(12, 2, 3, 3, seed=2)
    got, records = _run(
        lambda x, w: F.conv2d(x, w, groups=4), [x, w], [sl.P(None, "x"), sl.P("x")], X4
    )
    assert got.spec == sl.P(None, "x", None, None)
    assert _during(records, "forward") == [] and _during(records, "backward") == []


def test_strict_mode_refuses_a_halo_exchange():
    mesh = sl.Mesh.simulated(X4)
    x = sl.shard(_t(2, 3, 16, 9), mesh, sl.P(None, None, "x"))
    w = _t(5, 3, 3, 3, seed=2)
    with sl.strict(), pytest.raises(sl.LayoutError, match="ppermute"):
        F.conv2d(x, w, padding=1)
    with sl.strict():  # a batch split needs nothing
        F.conv2d(sl.shard(_t(4, 3, 8, 8), mesh, sl.P("x")), w, padding=1)


# == pads ===========================================================================
@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("mesh", ["a2b2", "x4"])
def test_pad_values_and_grads(mode, mesh):
    axes = A2B2 if mesh == "a2b2" else X4
    x = _t(3, 13, 6)
    layouts = (
        [sl.P(None, "a", "b"), sl.P(("b", "a")), sl.P(None, ("a", "b"))]
        if mesh == "a2b2"
        else [sl.P(None, "x"), sl.P(None, None, "x"), sl.P("x")]
    )
    for lay in layouts:
        _run(lambda x: F.pad(x, (1, 2, 3, 2), mode=mode), [x], [lay], axes)


def test_padding_a_split_dim_moves_only_boundary_rows():
    # x [3, 16, 5] split on dim 1 over 4 (4 rows each), padded (3, 2): 21 rows, output blocks
    # 6, 6, 6, 3. Device 1's output rows 6..11 read input rows 3..8: row 3 from device 0,
    # row 8 from device 2; device 2's (input 9..14) rows 12..14 from device 3. So one
    # ppermute of 1 row (rightwards) and one of 3 rows (leftwards); a row is 3*5 float64.
    row = 3 * 5 * 8
    x = _t(3, 16, 5)
    for mode in ("constant", "replicate"):

        def pad(x, mode=mode):
            return F.pad(x, (0, 0, 3, 2), mode=mode)

        got, records = _run(pad, [x], [sl.P(None, "x")], X4)
        assert got.spec == sl.P(None, "x", None)
        assert sorted(_kinds(_during(records, "forward"))) == [
            ("ppermute", row),
            ("ppermute", 3 * row),
        ]
        # the backward sends each received row's gradient back to its owner: the same sizes
        assert sorted(_kinds(_during(records, "backward"))) == [
            ("ppermute", row),
            ("ppermute", 3 * row),
        ]


def test_cropping_and_a_fill_value_on_a_split_dim():
    x = _t(3, 16, 5)
    _run(lambda x: F.pad(x, (0, 0, -3, -2)), [x], [sl.P(None, "x")], X4)
    _run(lambda x: F.pad(x, (1, 0, -3, 2), value=1.5), [x], [sl.P(None, "x")], X4)


def test_circular_pad_under_inference_mode_moves_only_wrapped_rows():
    # torch reaches _pad_circular whole only under inference_mode. x [3, 2, 10], the last
    # dim over 4 (blocks 0..2, 3..5, 6..8, 9), padded (2, 1): 13 rows in blocks of 4, 4, 4, 1
    # reading rows (8, 9, 0, 1), (2..5), (6..9), (0). Device 0 lacks 8 (device 2) and 9
    # (device 3), device 1 lacks 2 (device 0), device 2 lacks 9 (device 3), device 3 lacks 0
    # (device 0): device 0 receives twice, so two ppermute rounds of 1 row (3*2 float64).
    row = 3 * 2 * 8
    x = _t(3, 2, 10)
    for axes, lay in ((X4, sl.P(None, None, "x")), (A2B2, sl.P("a", None, "b"))):
        mesh = sl.Mesh.simulated(axes)
        xs = sl.shard(x, mesh, lay)
        with torch.inference_mode(), sl.comm_ledger() as led:
            y = F.pad(xs, (2, 1), mode="circular")
            z = F.pad(xs, (3, 3, 1, 1), mode="circular")  # two padded dims, one split
        assert y.spec == lay and z.spec == lay
        torch.testing.assert_close(y.full(), F.pad(x, (2, 1), mode="circular"), rtol=0, atol=0)
        want = F.pad(x, (3, 3, 1, 1), mode="circular")
        torch.testing.assert_close(z.full(), want, rtol=0, atol=0)
        kinds = {r.kind for r in led.records if r.cause.startswith("_pad_circular")}
        assert kinds == {"ppermute"}
        if axes is X4:
            y_records = [(r.kind, r.bytes) for r in led.records][:2]
            assert y_records == [("ppermute", row)] * 2


def test_pad_on_an_unsplit_dim_is_local():
    # GPT-2's attention pads the last dim of a tensor split on its batch (and head) dims
    x = _t(4, 6, 8)
    got, records = _run(lambda x: F.pad(x, (0, 3), value=-1.0), [x], [sl.P("x", None, None)], X4)
    assert got.spec == sl.P("x", None, None)
    assert _during(records, "forward") == [] and _during(records, "backward") == []


# == pools and resampling ==========================================================
OTHERS = [
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, 2, padding=1)),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)),
    ("adaptive_avg", lambda x: F.adaptive_avg_pool2d(x, (3, 2))),
    ("adaptive_max", lambda x: F.adaptive_max_pool2d(x, 3)),
    ("bilinear", lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear")),
    ("nearest", lambda x: F.interpolate(x, size=(7, 4), mode="nearest")),
    ("bicubic_aa", lambda x: F.interpolate(x, size=(3, 4), mode="bicubic", antialias=True)),
    ("pixel_shuffle", lambda x: F.pixel_shuffle(x, 2)),
    ("unfold", lambda x: F.unfold(x, 2, padding=1)),
]


@pytest.mark.parametrize("name, fn", OTHERS, ids=[o[0] for o in OTHERS])
def test_pools_and_resampling(name, fn):
    x = _t(3, 8, 6, 5)
    for axes, lay in [
        (X4, sl.P("x")),
        (A2B2, sl.P("a", "b")),
        (A2B2, sl.P(None, None, "a", "b")),  # spatial: gathered (in the ledger), still exact
    ]:
        if name == "unfold" and lay.dims[1:2] != ((),):
            continue  # unfold merges C into its output's dim 1: only the batch is independent
        got, records = _run(fn, [x], [lay], axes)
        if not any(lay.dims[2:]) and name not in ("pixel_shuffle",):
            assert _during(records, "forward") == [], (name, lay)


POOL_HALOS = [
    ("max", lambda x: F.max_pool2d(x, 3, 2, padding=1)),
    ("max-dilated-ceil", lambda x: F.max_pool2d(x, 3, 2, padding=1, dilation=2, ceil_mode=True)),
    ("avg", lambda x: F.avg_pool2d(x, 3, 2, padding=1)),
    ("avg-excl-ceil", lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)),
    ("avg-divisor", lambda x: F.avg_pool2d(x, 3, 1, padding=1, divisor_override=2)),
    ("max3d", lambda x: F.max_pool3d(x, 2, 2)),
]


@pytest.mark.parametrize("name, fn", POOL_HALOS, ids=[p[0] for p in POOL_HALOS])
def test_pools_over_a_split_spatial_dim_keep_the_split(name, fn):
    shape = (2, 3, 13, 11) if "3d" not in name else (2, 2, 7, 6, 5)
    x = _t(*shape)
    for axes, lay in [
        (X4, sl.P(None, None, "x")),
        (A2B2, sl.P(None, "a", "b")),
        (A2B2, sl.P(None, None, "a", "b")),
    ]:
        got, records = _run(fn, [x], [lay], axes)
        assert got.spec.dims == lay.dims + ((),) * (x.ndim - lay.ndim)
        assert {r.kind for r in _during(records, "forward")} <= {"ppermute"}


def test_max_pool_halo_moves_one_row_and_gives_global_indices():
    # H = 16 over 4 (4 rows each), kernel 3, stride 2, padding 1: output height 8, blocks of
    # 2; device i's windows read input rows [4i - 1, 4i + 3): one row from the left neighbour.
    n, c, h, w = 2, 3, 16, 9
    row = n * c * w * 8
    x = _t(n, c, h, w)
    got, records = _run(
        lambda x: F.max_pool2d(x, 3, 2, padding=1), [x], [sl.P(None, None, "x")], X4
    )
    assert _kinds(_during(records, "forward")) == [("ppermute", row)]
    assert _kinds(_during(records, "backward")) == [("ppermute", row)]  # grads of that row back
    mesh = sl.Mesh.simulated(X4)
    xs = sl.shard(x, mesh, sl.P(None, None, "x"))
    _, idx = F.max_pool2d(xs, 3, 2, padding=1, return_indices=True)
    assert torch.equal(idx.full(), F.max_pool2d(x, 3, 2, padding=1, return_indices=True)[1])


def test_grid_sample_splits_channels_or_output_positions():
    x, grid = _t(2, 4, 5, 6), torch.rand(2, 3, 7, 2, dtype=D) * 2 - 1
    fn = lambda x, g: F.grid_sample(x, g, align_corners=False)  # noqa: E731
    got, records = _run(fn, [x, grid], [sl.P(None, "x"), None], X4)
    assert got.spec == sl.P(None, "x", None, None) and _during(records, "forward") == []
    got, records = _run(fn, [x, grid], [None, sl.P(None, None, "x")], X4)
    assert got.spec == sl.P(None, None, None, "x") and _during(records, "forward") == []


# == real processes ================================================================
def _halo_program(mesh):
    """A halo conv, a pool and a pad over a split spatial dim, forward and backward:
    this process's shards of every result and gradient, and the ledger."""
    x = sl.shard(_t(2, 3, 13, 6), mesh, sl.P(None, None, "x")).requires_grad_()
    w = sl.shard(_t(4, 3, 3, 3, seed=2), mesh, sl.P()).requires_grad_()
    with sl.comm_ledger() as led:
        y = F.conv2d(x, w, padding=1)
        z = F.pad(F.max_pool2d(y, 3, 2, padding=1), (0, 0, 2, 1), mode="replicate")
        z.backward(sl.shard(_t(*z.shape, seed=3), mesh, z.spec))
    keep = [y, z, x.grad, w.grad]
    return [[s.clone() for s in t.local_shards()] for t in keep], [
        (r.kind, r.axes, r.bytes, r.direction) for r in led.records
    ]


@pytest.mark.dist
def test_halos_on_gloo_match_the_simulated_mesh(workers4):
    sim_shards, sim_ledger = _halo_program(sl.Mesh.simulated(X4))
    ranks = workers4.run(_halo_program, X4)
    for rank, (shards, ledger) in enumerate(ranks):
        assert ledger == sim_ledger
        for got, want in zip(shards, sim_shards):
            torch.testing.assert_close(got[0], want[rank], rtol=1e-12, atol=1e-12)


# == the row plan (pure data) ======================================================
def test_row_plan_of_a_halo():
    # 8 rows over 4 devices, each output block of 2 rows reads one row beyond each side
    srcs = ((-1, 0, 1, 2), (1, 2, 3, 4), (3, 4, 5, 6), (5, 6, 7, -1))
    plan = _Rows(0, ("x",), 8, srcs)
    assert plan.shifts == (-1, 1) and plan.width == {-1: 1, 1: 1}
    assert plan.need[1] == ((), (1,), (3,), (5,))  # from the left neighbour
    assert plan.need[-1] == ((2,), (4,), (6,), ())  # from the right neighbour


def test_row_plan_with_tiny_blocks_reaches_past_the_neighbour():
    # 4 rows over 4 devices (one each): a 5-row window needs rows two devices away
    srcs = tuple(tuple(q if 0 <= q < 4 else -1 for q in range(i - 2, i + 3)) for i in range(4))
    plan = _Rows(0, ("x",), 4, srcs)
    assert plan.shifts == (-2, -1, 1, 2)


@pytest.mark.slow
def test_opinfo_sweep_of_this_family():
    from tests import _opinfo as H

    keys = [
        k
        for k in (H.op_key(op) for op in H.load_ops())
        if any(
            s in k
            for s in ("conv", "pool", "nn.functional.pad", "constant_pad", "interpolate",
                      "upsample", "nn.functional.unfold", "shuffle", "grid_sample")
        )
    ]  # fmt: skip
    results = H.run_sweep(keys, samples_per_op=6)
    bad = [r for r in results if r.verdict in ("wrong", "crash")]
    assert not bad, bad[:5]
