"""Normalization, loss and activation rules (`shardlib/ops/_norms.py`, `shardlib/ops/_losses.py`).

Covers, on the simulated meshes {a:2, b:2} and {x:4}, against unsharded torch
in float64 (values, gradients of a random-weighted sum of the outputs, and
running statistics after the op; tolerances rtol 1e-9 / atol 1e-10, sums are
reordered):

- batch norm (F.batch_norm, training and eval, running statistics plain or
  sharded, affine or not) with batch, channel (uneven: a device without
  channels), spatial and two-axis splits; the aten variants
  ``_native_batch_norm_legit_functional``, ``_batch_norm_with_update``,
  ``_native_batch_norm_legit_no_training``; instance norm;
- group norm with batch, group-aligned channel, unaligned channel and spatial
  splits;
- the fused losses (mse, huber, smooth_l1, soft_margin, bce, bce with logits
  with weight and pos_weight) for reduction none/mean/sum; multi-margin
  (rows or classes split) and multilabel-margin; ctc (int-list and plain-tensor lengths, 2-d and
  concatenated targets) and its refusal of sharded lengths;
- the activations and backwards torch does not tag pointwise, glu over split
  and unsplit dims, prelu with a sharded per-channel weight, rrelu in
  training (torch's values under the seed, noise included);
- ledger closed forms: batch norm with a split batch moves one all-reduce of
  the 2·C per-channel sums forward and one backward, whatever the batch size
  (never the activation); group norm with a split spatial dim one all-reduce
  of 2·N·G sums; a mean/sum loss moves nothing (a partial scalar; reducing it
  moves one number); multi-margin over split classes moves N target logits,
  not the input; rrelu moves one bool sign mask; a backward keeps a
  partial-sum incoming gradient partial (no collective);
- slow tier: every one-dim-per-axis layout of batch and group norm, and a
  batch norm → rrelu → group norm → mse chain on 4 gloo ranks equal to torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib.layouts._mesh import AbstractMesh
from shardlib.ops._rules import ArgSpec, RuleInput, rule_for

P = sl.P
aten = torch.ops.aten
TOL = {"rtol": 1e-9, "atol": 1e-10}
A2B2 = {"a": 2, "b": 2}
X4 = {"x": 4}
F64 = torch.float64


# == helpers ===================================================================
def _full(t):
    return t.full() if isinstance(t, sl.ShardedTensor) else t


def _outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, tuple | list) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.dtype.is_floating_point]


def _check(
    axes: dict[str, int],
    fn: Callable,
    values: Sequence[torch.Tensor],
    layouts: Sequence[sl.Layout | None],
    *,
    grads: Sequence[bool] | None = None,
    seed: int | None = None,
) -> list:
    """`fn` on sharded `values` (layout None: left plain) equals `fn` on plain ones.

    Compares every float output and the gradient of each input marked in `grads`
    (default: every float input) of a random-weighted sum of the float outputs.
    Returns the sharded inputs (to inspect in-place writes).
    """
    mesh = sl.Mesh.simulated(axes)
    grads = grads or [v.dtype.is_floating_point for v in values]
    plain = [v.clone().requires_grad_(g) for v, g in zip(values, grads)]
    if seed is not None:
        torch.manual_seed(seed)
    want = fn(*plain)
    want_out = _outputs(want)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in want_out]
    want_grads = []
    if any(grads):
        loss = sum((o * w).sum() for o, w in zip(want_out, weights))
        want_grads = torch.autograd.grad(loss, [p for p, g in zip(plain, grads) if g])
    sharded = []
    for v, lay, g in zip(values, layouts, grads):
        t = v.clone() if lay is None else sl.shard(v.clone(), mesh, lay)
        sharded.append(t.requires_grad_(g))
    if seed is not None:
        torch.manual_seed(seed)
    got = fn(*sharded)
    got_out = _outputs(got)
    assert len(got_out) == len(want_out)
    for g, w in zip(got_out, want_out):
        torch.testing.assert_close(_full(g), w.detach(), **TOL)
    if any(grads):
        loss = sum((o * w).sum() for o, w in zip(got_out, weights))
        leaves = [s for s, g in zip(sharded, grads) if g]
        got_grads = torch.autograd.grad(loss, leaves)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(_full(g), w, **TOL)
    return sharded


def _ring_all_reduce_bytes(numel: int, group: int, itemsize: int = 8) -> int:
    """The ledger's bytes of one all-reduce of `numel` elements over `group` devices
    (ring model: 2(k-1) pieces of ceil(numel/k) elements)."""
    return 2 * (group - 1) * -(-numel // group) * itemsize


# == batch norm ================================================================
BN_LAYOUTS = [
    (X4, P("x", None, None)),  # batch split
    (X4, P(None, "x", None)),  # channel split: 3 channels over 4 devices
    (X4, P(None, None, "x")),  # spatial split
    (A2B2, P("a", "b", None)),  # batch and channel
    (A2B2, P("a", None, "b")),  # batch and spatial
    (A2B2, P(("b", "a"), None, None)),  # batch over both axes (uneven: 6 over 4)
]


def _bn_inputs(n: int = 6, c: int = 3, s: int = 5):
    g = torch.Generator().manual_seed(n * 100 + c)
    x = torch.randn(n, c, s, generator=g, dtype=F64) * 3 + 1
    w, b = torch.randn(c, generator=g, dtype=F64), torch.randn(c, generator=g, dtype=F64)
    rm, rv = torch.randn(c, generator=g, dtype=F64), torch.rand(c, generator=g, dtype=F64) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize(
    "axes,layout,training",
    [(*case, True) for case in BN_LAYOUTS] + [(*case, False) for case in BN_LAYOUTS[1::2]],
)
def test_batch_norm_matches_torch(axes, layout, training):
    x, w, b, rm, rv = _bn_inputs()
    for stats_layout in (None, P(None)):  # plain running stats, replicated sharded ones
        stats: list = []

        def fn(x, w, b, stats=stats, stats_layout=stats_layout):
            m, v = rm.clone(), rv.clone()
            if isinstance(x, sl.ShardedTensor) and stats_layout is not None:
                m, v = (sl.shard(t, x.mesh, stats_layout) for t in (m, v))
            stats.append((m, v))
            return F.batch_norm(x, m, v, w, b, training=training, momentum=0.3, eps=1e-3)

        _check(axes, fn, [x, w, b], [layout, P(None), None])
        (m_want, v_want), (m_got, v_got) = stats
        torch.testing.assert_close(_full(m_got), m_want, **TOL)
        torch.testing.assert_close(_full(v_got), v_want, **TOL)


def test_batch_norm_without_affine_or_stats():
    x = _bn_inputs(5, 4, 3)[0]
    fn = lambda x: F.batch_norm(x, None, None, training=True)  # noqa: E731
    for axes, layout in [(X4, P("x", None, None)), (A2B2, P("b", "a", None))]:
        _check(axes, fn, [x], [layout])


def test_batch_norm_sharded_stats_written_in_their_layout():
    """Channel-split running stats stay channel-split; the update equals torch's."""
    x, w, b, rm, rv = _bn_inputs(8, 4, 3)
    mesh = sl.Mesh.simulated(A2B2)
    m, v = rm.clone(), rv.clone()
    F.batch_norm(x, m, v, w, b, training=True, momentum=0.2)
    ms, vs = sl.shard(rm.clone(), mesh, P("b")), sl.shard(rv.clone(), mesh, P("b"))
    xs = sl.shard(x, mesh, P("a", "b", None))
    F.batch_norm(xs, ms, vs, w, b, training=True, momentum=0.2)
    assert ms.spec == P("b") and vs.spec == P("b")
    torch.testing.assert_close(ms.full(), m, **TOL)
    torch.testing.assert_close(vs.full(), v, **TOL)


@pytest.mark.parametrize("n", [8, 40])
def test_batch_norm_batch_split_moves_2c_per_device(n):
    """Forward: one all-reduce of the 2·C channel sums; backward: one of Σdy, Σdy·x̂.

    Closed form (ring ledger model, float64): 2(P-1)·ceil(2C/P)·8 bytes, independent
    of the batch size n: the activation never moves.
    """
    c, p = 3, 4
    x, w, b, rm, rv = _bn_inputs(n, c, 5)
    mesh = sl.Mesh.simulated(X4)
    xs = sl.shard(x, mesh, P("x", None, None)).requires_grad_()
    ws, bs = (sl.shard(t, mesh, P(None)).requires_grad_() for t in (w, b))
    ms, vs = sl.shard(rm, mesh, P(None)), sl.shard(rv, mesh, P(None))
    with sl.comm_ledger() as forward:
        y = F.batch_norm(xs, ms, vs, ws, bs, training=True)
    gy = sl.shard(torch.randn(y.shape, dtype=F64), mesh, P("x", None, None))
    with sl.comm_ledger() as backward:
        y.backward(gy)
    want = _ring_all_reduce_bytes(2 * c, p)
    for led in (forward, backward):
        assert [(r.kind, r.bytes) for r in led.records] == [("all_reduce", want)]
    assert forward.records[0].cause == "native_batch_norm.default"
    assert backward.records[0].cause == "native_batch_norm_backward.default"
    assert ws.grad.spec == P(None) and xs.grad.spec == P("x", None, None)


def test_batch_norm_two_axis_split_bytes_do_not_grow_with_the_batch():
    """On {a:2,b:2} (batch over a, spatial over b) the per-channel sums are all-reduced
    over both axes; the bytes are the same for a batch of 8 and of 64."""
    mesh = sl.Mesh.simulated(A2B2)
    totals = []
    for n in (8, 64):
        x, w, b, rm, rv = _bn_inputs(n, 3, 6)
        xs = sl.shard(x, mesh, P("a", None, "b")).requires_grad_()
        with sl.comm_ledger() as led:
            y = F.batch_norm(xs, None, None, w, b, training=True)
            y.backward(sl.shard(torch.ones(y.shape, dtype=F64), mesh, P("a", None, "b")))
        totals.append(led.total_bytes)
        assert 0 < led.total_bytes <= 2 * _ring_all_reduce_bytes(2 * 3, 4)
    assert totals[0] == totals[1]


def test_batch_norm_aten_variants():
    x, w, b, rm, rv = _bn_inputs(7, 4, 3)
    layouts = [P("x", None, None), P(None), P(None), P(None), P(None)]

    def functional(x, w, b, m, v):
        return aten._native_batch_norm_legit_functional(x, w, b, m, v, True, 0.1, 1e-5)

    def with_update(x, w, b, m, v):
        m, v = m.detach().clone(), v.detach().clone()
        out = aten._batch_norm_with_update(x, w, b, m, v, 0.1, 1e-5)
        return (*out[:3], m, v)

    def no_training(x, w, b, m, v):
        return aten._native_batch_norm_legit_no_training(x, w, b, m, v, 0.1, 1e-5)

    grads = [True, True, True, False, False]
    for fn in (functional, with_update, no_training):
        _check(X4, fn, [x, w, b, rm, rv], layouts, grads=grads)


def test_instance_norm():
    x, _, _, rm, rv = _bn_inputs(4, 3, 7)
    w, b = torch.randn(3, dtype=F64), torch.randn(3, dtype=F64)

    def fn(x, w, b):
        return F.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats=True)

    for axes, layout in [(X4, P("x", None, None)), (A2B2, P("a", None, "b"))]:
        _check(axes, fn, [x, w, b], [layout, None, None])


# == group norm ================================================================
GN_CASES = [
    ((6, 4, 5), 2, A2B2, P("a", "b", None)),  # channel chunks of 2 = one group each
    ((6, 6, 5), 3, A2B2, P("a", "b", None)),  # chunks of 3 cut groups of 2: gathered
    ((6, 4, 5), 2, A2B2, P("a", None, "b")),  # spatial split
    ((5, 8, 3, 2), 4, X4, P(None, "x", None, None)),
    ((5, 8, 3, 2), 2, X4, P(None, None, "x", None)),
    ((5, 3, 7), 1, X4, P("x", None, None)),
    ((3, 6, 7), 3, X4, P(None, "x", None)),  # 6 channels over 4: an empty device
]


@pytest.mark.parametrize("shape,groups,axes,layout", GN_CASES)
def test_group_norm_matches_torch(shape, groups, axes, layout):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, dtype=F64) * 2 + 1
    w, b = torch.randn(shape[1], dtype=F64), torch.randn(shape[1], dtype=F64)
    fn = lambda x, w, b: F.group_norm(x, groups, w, b, eps=1e-3)  # noqa: E731
    _check(axes, fn, [x, w, b], [layout, P(None), None])


def test_group_norm_spatial_split_moves_2ng():
    """One all-reduce of the 2·N·G (sample, group) sums forward, one backward."""
    n, c, groups = 5, 8, 2
    mesh = sl.Mesh.simulated(X4)
    x = torch.randn(n, c, 3, 4, dtype=F64)
    xs = sl.shard(x, mesh, P(None, None, "x", None)).requires_grad_()
    with sl.comm_ledger() as forward:
        y = F.group_norm(xs, groups)
    with sl.comm_ledger() as backward:
        y.backward(sl.shard(torch.randn(y.shape, dtype=F64), mesh, xs.spec))
    want = _ring_all_reduce_bytes(2 * n * groups, 4)
    for led in (forward, backward):
        assert [(r.kind, r.bytes) for r in led.records] == [("all_reduce", want)]


def test_group_norm_without_affine():
    x = torch.randn(5, 8, 3, 2, dtype=F64)
    for axes, layout in [(X4, P(None, None, "x", None)), (A2B2, P("a", "b", None, None))]:
        _check(axes, lambda x: F.group_norm(x, 4), [x], [layout])


def test_group_norm_aligned_channel_split_is_local():
    mesh = sl.Mesh.simulated(A2B2)
    xs = sl.shard(torch.randn(6, 4, 5, dtype=F64), mesh, P("a", "b", None)).requires_grad_()
    with sl.comm_ledger() as led:
        y = F.group_norm(xs, 2)
        y.backward(sl.shard(torch.ones(6, 4, 5, dtype=F64), mesh, xs.spec))
    assert led.records == []


# == losses ====================================================================
ELEMENTWISE_LOSSES = {
    "mse": lambda x, t, r: F.mse_loss(x, t, reduction=r),
    "huber": lambda x, t, r: F.huber_loss(x, t, reduction=r, delta=0.7),
    "smooth_l1": lambda x, t, r: F.smooth_l1_loss(x, t, reduction=r, beta=0.5),
    "soft_margin": lambda x, t, r: F.soft_margin_loss(x, t.sign(), reduction=r),
    "bce": lambda x, t, r: F.binary_cross_entropy(x.sigmoid(), t.sigmoid(), reduction=r),
    "bce_logits": lambda x, t, r: F.binary_cross_entropy_with_logits(x, t.sigmoid(), reduction=r),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE_LOSSES))
def test_elementwise_losses_match_torch(name):
    loss = ELEMENTWISE_LOSSES[name]
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(7, 5, generator=g, dtype=F64), torch.randn(7, 5, generator=g, dtype=F64)
    grads = [True, name not in ("soft_margin", "bce")]  # torch: no target gradient there
    cases = [(X4, [P("x", None), P("x", None)]), (A2B2, [P("a", "b"), P(None, "b")])]
    cases.append((A2B2, [P(("a", "b"), None), None]))
    for reduction, (axes, lays) in zip(["none", "mean", "sum"] * 2, cases * 2):
        _check(axes, lambda x, t, r=reduction: loss(x, t, r), [x, t], lays, grads=grads)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_with_logits_weights(reduction):
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(6, 5, generator=g, dtype=F64), torch.rand(6, 5, generator=g, dtype=F64)
    w, pw = torch.rand(5, dtype=F64), torch.rand(5, dtype=F64) + 0.5

    def fn(x, t, w, pw):
        return F.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw)

    lays = [P("a", "b"), P("a", None), P("b"), None]
    _check(A2B2, fn, [x, t, w, pw], lays, grads=[True, True, False, False])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_losses_move_one_number(reduction):
    """mean/sum: local sums, a partial-sum scalar (forward and backward move nothing);
    reducing the loss is one all-reduce of one element."""
    mesh = sl.Mesh.simulated(X4)
    x = sl.shard(torch.randn(9, 5, dtype=F64), mesh, P("x", None)).requires_grad_()
    t = sl.shard(torch.randn(9, 5, dtype=F64), mesh, P("x", None))
    for fn in (F.mse_loss, F.huber_loss, F.smooth_l1_loss, F.binary_cross_entropy_with_logits):
        x.grad = None
        target = t.sigmoid() if fn is F.binary_cross_entropy_with_logits else t
        with sl.comm_ledger() as led:
            loss = fn(x, target, reduction=reduction)
            loss.backward()
        assert led.records == [], fn
        assert loss.spec.partial == ("x",)
        with sl.comm_ledger() as led:
            loss.full()
        assert led.total_bytes == _ring_all_reduce_bytes(1, 4)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_margin_losses_match_torch(reduction):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 5, generator=g, dtype=F64)
    target = torch.randint(0, 5, (10,), generator=g)
    w = torch.rand(5, generator=g, dtype=F64)
    labels = torch.randint(-1, 5, (10, 5), generator=g)

    def multi(x, t, w):
        return F.multi_margin_loss(x, t, p=2, margin=0.7, weight=w, reduction=reduction)

    def multilabel(x, t):
        return F.multilabel_margin_loss(x, t, reduction=reduction)

    for axes, lay in [(X4, P("x", None)), (A2B2, P(("b", "a"), None)), (A2B2, P("a", "b"))]:
        lays = [lay, P(lay.dims[0]), P(None)]
        _check(axes, multi, [x, target, w], lays, grads=[True, False, False])
        _check(axes, multilabel, [x, labels], [lay, P(lay.dims[0], None)])


def test_multi_margin_split_classes_move_rows_not_logits():
    """Classes split: forward one all-reduce of the N target logits (no gather of the
    (N, C) input); backward that pick again and one of the N row sums."""
    n, c = 10, 7
    mesh = sl.Mesh.simulated(X4)
    x = torch.randn(n, c, dtype=F64)
    t = torch.randint(0, c, (n,))
    xs = sl.shard(x, mesh, P(None, "x")).requires_grad_()
    with sl.comm_ledger() as forward:
        loss = F.multi_margin_loss(xs, t, margin=0.5)
    with sl.comm_ledger() as backward:
        loss.backward()
    one = ("all_reduce", _ring_all_reduce_bytes(n, 4))
    assert [(r.kind, r.bytes) for r in forward.records] == [one]
    assert [(r.kind, r.bytes) for r in backward.records] == [one, one]
    assert loss.spec == P(partial="x") and xs.grad.spec == P(None, "x")
    xr = x.clone().requires_grad_()
    F.multi_margin_loss(xr, t, margin=0.5).backward()
    torch.testing.assert_close(xs.grad.full(), xr.grad, **TOL)


def _ctc_inputs(n: int = 6):
    g = torch.Generator().manual_seed(8)
    lp = torch.randn(12, n, 5, generator=g, dtype=F64).log_softmax(2)
    targets = torch.randint(1, 5, (n, 4), generator=g)
    in_lengths = torch.randint(8, 13, (n,), generator=g)
    tg_lengths = torch.randint(1, 5, (n,), generator=g)
    return lp, targets, in_lengths, tg_lengths


def test_ctc_loss_batched():
    """Int-list lengths with split 2-d targets, plain tensor lengths, concatenated targets."""
    lp, targets, il, tl = _ctc_inputs()
    concatenated = torch.cat([targets[i, : tl[i]] for i in range(len(tl))])

    def lists(lp, t, reduction):
        return F.ctc_loss(lp, t, il.tolist(), tl.tolist(), reduction=reduction)

    def tensors(lp, t, reduction):
        return F.ctc_loss(lp, t, il, tl, reduction=reduction)

    cases = [
        (X4, P(None, "x", None), lists, targets, P("x", None), "none"),
        (A2B2, P(None, ("a", "b"), None), lists, targets, P(("a", "b"), None), "mean"),
        (X4, P(None, "x", None), tensors, targets, None, "sum"),
        (A2B2, P(None, "b", None), tensors, targets, P("b", None), "mean"),
        (A2B2, P(None, ("b", "a"), None), lists, concatenated, None, "sum"),
    ]
    for axes, lay, fn, t, t_lay, red in cases:
        run = lambda lp, t, fn=fn, red=red: fn(lp, t, red)  # noqa: E731
        _check(axes, run, [lp, t], [lay, t_lay], grads=[True, False])


def test_ctc_loss_sharded_lengths_refused_clearly():
    lp, targets, il, tl = _ctc_inputs()
    mesh = sl.Mesh.simulated(X4)
    lps = sl.shard(lp, mesh, P(None, "x", None))
    tls = sl.shard(tl, mesh, P("x"))
    with pytest.raises(sl.ShardlibError, match=r"_ctc_loss\.Tensor.*target_lengths.*plain"):
        F.ctc_loss(lps, targets, il, tls)


# == activations ===============================================================
ACTIVATIONS = {
    "elu": lambda x: F.elu(x, 0.7),
    "celu": lambda x: F.celu(x, 1.3),
    "selu": F.selu,
    "hardtanh": lambda x: F.hardtanh(x, -0.5, 0.8),
    "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "softplus": lambda x: F.softplus(x, 2.0, 1.0),
    "softshrink": lambda x: F.softshrink(x, 0.3),
    "hardshrink": lambda x: F.hardshrink(x, 0.3),
    "logsigmoid": F.logsigmoid,
    "relu6": F.relu6,
    "threshold": lambda x: F.threshold(x, 0.1, -2.0),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "rrelu_eval": lambda x: F.rrelu(x, 0.1, 0.3, training=False),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_match_torch(name):
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(9), dtype=F64) * 4
    _check(X4, ACTIVATIONS[name], [x], [P(None, "x")])
    _check(A2B2, ACTIVATIONS[name], [x], [P("b", "a")])


def test_prelu_with_sharded_channel_weight():
    x = torch.randn(5, 6, 3, dtype=F64)
    w = torch.rand(6, dtype=F64)
    _check(A2B2, F.prelu, [x, w], [P("a", "b", None), P("b")])
    _check(X4, F.prelu, [x, w[:1]], [P(None, None, "x"), None])


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_glu(dim):
    x = torch.randn(6, 8, 4, dtype=F64)
    _check(A2B2, lambda x: F.glu(x, dim), [x], [P("a", "b", None)])
    mesh = sl.Mesh.simulated(X4)
    xs = sl.shard(x, mesh, P(None, "x", None))
    with sl.comm_ledger() as led:
        F.glu(xs, dim)
    assert (led.records != []) == (dim == 1)  # only a split glu dim is gathered


def test_rrelu_training_is_torchs_draw():
    """The same values and noise as the unsharded op under the same seed; one bool mask moved."""
    x = torch.randn(9, 7, dtype=F64)
    mesh = sl.Mesh.simulated(X4)
    torch.manual_seed(11)
    noise = torch.empty_like(x)
    want = aten.rrelu_with_noise(x, noise, 0.1, 0.6, True)
    xs = sl.shard(x, mesh, P(None, "x"))
    ns = sl.shard(torch.zeros_like(x), mesh, P(None, "x"))
    torch.manual_seed(11)
    with sl.comm_ledger() as led:
        got = aten.rrelu_with_noise(xs, ns, 0.1, 0.6, True)
    assert torch.equal(got.full(), want) and torch.equal(ns.full(), noise)
    assert [(r.kind, r.dtype, r.bytes) for r in led.records] == [
        ("all_gather", "bool", 3 * 9 * 2)  # (P-1) · the largest block (9 x 2) · 1 byte
    ]
    fn = lambda x: F.rrelu(x, 0.1, 0.6, training=True)  # noqa: E731
    _check(A2B2, fn, [x], [P("a", "b")], seed=12)


def test_backward_keeps_a_partial_gradient():
    """Activation backwards are linear in the incoming gradient: a partial-sum gradient
    gives a partial-sum result, with no collective."""
    mesh = sl.Mesh.simulated(A2B2)
    x = torch.randn(6, 4, dtype=F64)
    g = torch.randn(6, 4, dtype=F64)
    r = torch.randn(6, 4, dtype=F64)
    summands = [g - r, r]  # over b; rows split over a (flat device order a-major)
    blocks = [summands[dev % 2][3 * (dev // 2) : 3 * (dev // 2) + 3] for dev in range(4)]
    gs = sl.from_local(blocks, mesh, P("a", None, partial="b"), (6, 4))
    xs = sl.shard(x, mesh, P("a", None))
    with sl.comm_ledger() as led:
        out = aten.hardtanh_backward(gs, xs, -0.5, 0.5)
        out2 = aten.gelu_backward(gs, xs)
    assert led.records == []
    assert out.spec == P("a", None, partial="b") and out2.spec == out.spec
    torch.testing.assert_close(out.full(), aten.hardtanh_backward(g, x, -0.5, 0.5), **TOL)
    torch.testing.assert_close(out2.full(), aten.gelu_backward(g, x), **TOL)


def test_rules_as_data():
    """The rules are pure data: a backward offers to keep a partial gradient (with the other
    operand whole); glu never keeps its halved dim split."""
    am = AbstractMesh(("x",), (4,))
    spec = ArgSpec((8, 6), F64, P(None, None, partial="x"))
    x = ArgSpec((8, 6), F64, P(None, "x"))
    out = ArgSpec((8, 6), F64)
    op = aten.softplus_backward.default
    ri = RuleInput(op, am, (spec, x, 1.0, 20.0), {}, (spec, x), (out,))
    kept = [(s.inputs, s.outputs) for s in rule_for(op)(ri) if s.inputs[0].partial]
    assert kept == [((P(None, None, partial="x"), P(None, None)), (P(None, None, partial="x"),))]
    glu = aten.glu.default
    xs = ArgSpec((8, 6), F64, P(None, "x"))
    ri = RuleInput(glu, am, (xs, 1), {}, (xs,), (ArgSpec((8, 3), F64),))
    assert all(s.inputs[0].dims[1] == () for s in rule_for(glu)(ri))


@pytest.mark.slow
@pytest.mark.parametrize("axes", [A2B2, X4])
def test_norm_layout_sweep(axes):
    """Every split of a (6, 4, 5) input (each axis on some dim or unused), batch and group norm."""
    names = list(axes)
    x, w, b, rm, rv = _bn_inputs(6, 4, 5)
    choices = [None, 0, 1, 2]
    for picks in _product(choices, len(names)):
        dims: list[tuple[str, ...]] = [(), (), ()]
        for a, d in zip(names, picks):
            if d is not None:
                dims[d] += (a,)
        layout = sl.Layout(tuple(dims))

        def bn(x, w, b):
            return F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)

        _check(axes, bn, [x, w, b], [layout, P(None), P(None)])
        _check(axes, lambda x, w, b: F.group_norm(x, 2, w, b), [x, w, b], [layout, None, None])


def _product(choices: list, k: int) -> list[tuple]:
    if k == 0:
        return [()]
    return [(c, *rest) for c in choices for rest in _product(choices, k - 1)]


# == real processes ============================================================
def _gloo_case(mesh: sl.Mesh) -> dict[str, torch.Tensor]:
    """Batch norm (batch split, plain running stats), group norm (spatial split), an mse
    mean loss and rrelu in training, on a distributed mesh: global values and gradients."""
    x, w, b, rm, rv = _bn_inputs(8, 3, 5)
    xs = sl.shard(x, mesh, P("x", None, "y")).requires_grad_()
    y = F.batch_norm(xs, rm, rv, w, b, training=True, momentum=0.3)
    torch.manual_seed(13)  # every rank alike (torch's stream, DESIGN §6)
    z = F.group_norm(F.rrelu(y, 0.1, 0.4, training=True), 3)
    loss = F.mse_loss(z, sl.shard(torch.ones(8, 3, 5, dtype=F64), mesh, P("x", None, None)))
    loss.backward()
    return {"loss": loss.full(), "grad": xs.grad.full(), "rm": rm, "rv": rv}


@pytest.mark.slow
def test_gloo_matches_torch(workers4):
    want = _gloo_case_plain()
    for got in workers4.run(_gloo_case, {"x": 2, "y": 2}):
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, **TOL)


def _gloo_case_plain() -> dict[str, torch.Tensor]:
    x, w, b, rm, rv = _bn_inputs(8, 3, 5)
    x.requires_grad_()
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
    torch.manual_seed(13)
    z = F.group_norm(F.rrelu(y, 0.1, 0.4, training=True), 3)
    loss = F.mse_loss(z, torch.ones(8, 3, 5, dtype=F64))
    loss.backward()
    return {"loss": loss.detach(), "grad": x.grad, "rm": rm, "rv": rv}
