"""NN op rules (`shardlib/ops/_nn.py`): embedding, nll loss / cross-entropy, dropout and
random ops, scaled-dot-product attention, `.item()`.

Covers, on simulated meshes {x:4,y:2}, {a:2,b:2} and {dp:2,tp:2}:

- values and gradients (`torch.autograd.grad` through `.full()`, float64)
  against unsharded torch for hypothesis-sampled shapes and layouts of every
  operand (partial ones included, built from noisy summands), uneven and
  empty vocabulary / class / sequence chunks (vocab 10 over 4, 2 over 4):
  embedding (padding_idx, scale_grad_by_freq), nll_loss and nll_loss2d
  (reduction mean/sum/none, ignore_index, class weights), attention
  (causal, boolean mask); tolerances rtol 1e-9 / atol 1e-10 (sums reordered);
- ledgers: a vocab-split embedding records no collective in forward and gives
  a partial output; nll_loss over split classes records no all_gather (mean:
  all-reduces of one scalar only); head-split attention records nothing,
  forward and backward;
- random ops are bitwise the unsharded op's values under the same seed, for
  layouts P(None,None), P("x",None), P(None,"y"), P(("x","y"),None) and more:
  F.dropout (and its gradient), native_dropout, rand_like, randn_like,
  randint_like, uniform_, normal_, exponential_, bernoulli (float and tensor p);
- F.cross_entropy end to end on vocab-split logits (skipped with a reason if
  log_softmax over a split dim is not available);
- the rules as pure data (no tensors).

Case counts: SHARDLIB_HYPOTHESIS_CASES (default 100) per sampled test.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib.layouts._mesh import AbstractMesh
from shardlib.layouts._shard import local_bounds
from shardlib.ops._rules import ArgSpec, RuleInput, rule_for
from tests.test_distributed import _layouts

P = sl.P
aten = torch.ops.aten
CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 100))
MESHES = [{"x": 4, "y": 2}, {"a": 2, "b": 2}, {"dp": 2, "tp": 2}]
TOL = {"rtol": 1e-9, "atol": 1e-10}
SAMPLED = settings(derandomize=True, deadline=None, max_examples=CASES)


# == helpers ===================================================================
def _sharded(mesh: sl.Mesh, value: torch.Tensor, layout: sl.Layout) -> sl.ShardedTensor:
    """`value` laid out as `layout`, differentiably; partial layouts get noisy summands.

    Only one copy of each block (index 0 along the replicated and partial axes)
    carries the gradient to `value`; the other copies are constants.
    """
    am = mesh.abstract
    k = am.group_size(layout.partial)
    copies = layout.replicated_axes(am) + layout.partial
    shards = []
    for dev in mesh.local_devices:
        b = value if am.index_along(dev, copies) == 0 else value.detach()
        for d, (lo, hi) in enumerate(local_bounds(tuple(value.shape), layout, am, dev)):
            b = b.narrow(d, lo, hi - lo)
        if layout.partial:
            j = am.index_along(dev, layout.partial)
            noise = (torch.arange(b.numel()).reshape(b.shape) % 5).to(b.dtype)
            if layout.reduce_op == "sum":
                b = (b if j == 0 else b * 0) + noise * ((1 - k) if j == 0 else 1)
            elif layout.reduce_op == "avg":
                b = b + noise * ((1 - k) if j == 0 else 1)
            else:
                b = b + (3 * j if layout.reduce_op == "min" else -3 * j)
        shards.append(b)
    return sl.from_local(shards, mesh, layout, tuple(value.shape))


def _randn(shape, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_(grad)


def _grads(got, want, cotangent, inputs):
    """Gradients of <got, cotangent> (sharded program) and <want, cotangent> (unsharded)."""
    a = torch.autograd.grad((got * cotangent).sum(), inputs)
    b = torch.autograd.grad((want * cotangent).sum(), inputs)
    return a, b


def _kinds(led) -> list[str]:
    return [r.kind for r in led.records]


# == embedding =================================================================
@st.composite
def _embedding_case(draw):
    axes = draw(st.sampled_from(MESHES))
    vocab, hidden = draw(st.integers(1, 12)), draw(st.integers(1, 5))
    ids_shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2)))
    names = tuple(axes)
    table = draw(st.sampled_from(_layouts(names, 2)))
    ids = draw(st.sampled_from([x for x in _layouts(names, len(ids_shape)) if not x.partial]))
    padding = draw(st.sampled_from([None, 0, vocab - 1]))
    by_freq = draw(st.booleans())
    return sl.Mesh.simulated(axes), vocab, hidden, ids_shape, table, ids, padding, by_freq


@SAMPLED
@given(_embedding_case())
def test_embedding_matches_unsharded(case):
    mesh, vocab, hidden, ids_shape, t_layout, i_layout, padding, by_freq = case
    weight = _randn((vocab, hidden), 0)
    ids = torch.randint(0, vocab, ids_shape, generator=torch.Generator().manual_seed(1))
    kw = {"padding_idx": padding, "scale_grad_by_freq": by_freq}
    got = F.embedding(_sharded(mesh, ids, i_layout), _sharded(mesh, weight, t_layout), **kw)
    want = F.embedding(ids, weight, **kw)
    assert got.shape == want.shape
    full = got.full()
    torch.testing.assert_close(full, want, **TOL, msg=f"{t_layout} {i_layout}")
    (a,), (b,) = _grads(full, want, _randn(want.shape, 2, grad=False), (weight,))
    torch.testing.assert_close(a, b, **TOL, msg=f"grad {t_layout} {i_layout}")


@pytest.mark.parametrize("vocab", [10, 2, 8])
def test_embedding_vocab_split_is_partial_with_no_forward_collective(vocab):
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    weight = _randn((vocab, 6), 0)
    ids = torch.tensor([[0, vocab - 1, 1], [vocab // 2, 0, vocab - 1]])
    t = _sharded(mesh, weight, P("tp", None))
    i = sl.shard(ids, mesh, P("dp", None))
    with sl.comm_ledger() as led:
        y = F.embedding(i, t)
    assert led.records == []
    assert y.spec == P("dp", None, None, partial="tp")
    torch.testing.assert_close(y.full(), F.embedding(ids, weight))
    (g,) = torch.autograd.grad(y.full().sum(), weight)
    (want,) = torch.autograd.grad(F.embedding(ids, weight).sum(), weight)
    torch.testing.assert_close(g, want)
    plain = F.embedding(ids, t)  # a plain id tensor is a replicated constant
    assert plain.spec == P(None, None, None, partial="tp")
    torch.testing.assert_close(plain.full(), F.embedding(ids, weight))


def test_embedding_vocab_split_over_two_axes_uneven():
    """Vocab 10 over ("x", "y") = 8 chunks: [0,2) ... [8,10), then empty chunks."""
    mesh = sl.Mesh.simulated({"x": 4, "y": 2})
    weight = _randn((10, 3), 0)
    ids = torch.arange(10).reshape(2, 5)
    with sl.comm_ledger() as led:
        y = F.embedding(
            sl.shard(ids, mesh, P(None, None)), _sharded(mesh, weight, P(("x", "y"), None))
        )
    assert led.records == [] and y.spec == P(None, None, None, partial=("x", "y"))
    torch.testing.assert_close(y.full(), F.embedding(ids, weight))


def test_embedding_hidden_split_and_batch_split():
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    weight, ids = _randn((7, 6), 0), torch.randint(0, 7, (4, 3))
    t, i = _sharded(mesh, weight, P(None, "tp")), sl.shard(ids, mesh, P("dp", None))
    with sl.comm_ledger() as led:
        y = F.embedding(i, t)
    assert led.records == [] and y.spec == P("dp", None, "tp")
    with sl.comm_ledger() as led:
        (g,) = torch.autograd.grad(y, t, _sharded(mesh, _randn(y.shape, 3, False), y.spec))
    assert g.spec == P(None, "tp", partial="dp") and _kinds(led) == []


# == nll loss / cross-entropy ==================================================
@st.composite
def _nll_case(draw):
    axes = draw(st.sampled_from(MESHES))
    names = tuple(axes)
    kind = draw(st.sampled_from(["1d", "2d", "4d"]))
    n, c = draw(st.integers(1, 6)), draw(st.sampled_from([1, 2, 3, 5, 10]))
    shape = {"1d": (c,), "2d": (n, c), "4d": (n, c, draw(st.integers(1, 3)), 2)}[kind]
    x = draw(st.sampled_from(_layouts(names, len(shape))))
    t_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    t = draw(st.sampled_from([q for q in _layouts(names, len(t_shape)) if not q.partial]))
    weight = draw(
        st.sampled_from([None, "plain", *(q for q in _layouts(names, 1) if not q.partial)])
    )
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    ignore = draw(st.sampled_from([-100, 0]))
    return sl.Mesh.simulated(axes), shape, t_shape, x, t, weight, reduction, ignore


@SAMPLED
@given(_nll_case())
def test_nll_loss_matches_unsharded(case):
    mesh, shape, t_shape, x_layout, t_layout, w_layout, reduction, ignore = case
    c = shape[1] if len(shape) > 1 else shape[0]
    logp = _randn(shape, 0)
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, c, t_shape, generator=gen)
    target = torch.where(torch.rand(t_shape, generator=gen) < 0.2, ignore, target)
    weight = torch.rand(c, dtype=torch.float64, generator=gen) + 0.5 if w_layout else None
    w = weight if w_layout in (None, "plain") else _sharded(mesh, weight, w_layout)
    kw = {"weight": w, "reduction": reduction, "ignore_index": ignore}
    got = F.nll_loss(_sharded(mesh, logp, x_layout), _sharded(mesh, target, t_layout), **kw)
    want = F.nll_loss(logp, target, weight=weight, reduction=reduction, ignore_index=ignore)
    full = got.full()
    msg = f"{x_layout} {t_layout} {w_layout} {reduction}"
    torch.testing.assert_close(full, want, **TOL, equal_nan=True, msg=msg)
    (a,), (b,) = _grads(full, want, _randn(want.shape, 2, grad=False), (logp,))
    torch.testing.assert_close(a, b, **TOL, equal_nan=True, msg="grad " + msg)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("x_layout", [P(None, "tp"), P("dp", "tp"), P(None, ("dp", "tp"))])
def test_nll_loss_split_classes_never_gathers(reduction, x_layout):
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    logp = _randn((6, 10), 0)
    target = torch.tensor([0, 9, -100, 4, 5, 3])
    x = _sharded(mesh, logp, x_layout)
    t = sl.shard(target, mesh, P("dp") if "dp" in x_layout.dims[0] else P(None))
    with sl.comm_ledger() as led:
        y = F.nll_loss(x, t, reduction=reduction)
    kinds = _kinds(led)
    assert "all_gather" not in kinds
    if reduction == "mean":  # the global count of non-ignored targets: scalars only
        assert set(kinds) <= {"all_reduce"} and all(r.bytes <= 16 for r in led.records)
        if not x_layout.dims[0]:  # h7p: targets on every device: each counts them, no collective
            assert kinds == []
    else:
        assert kinds == [] and y.spec.partial
    want = F.nll_loss(logp, target, reduction=reduction)
    torch.testing.assert_close(y.full(), want, **TOL)
    with sl.comm_ledger() as led:
        (g,) = torch.autograd.grad(
            y,
            x,
            _sharded(mesh, torch.ones(want.shape, dtype=torch.float64), y.spec.without_partial()),
        )
    assert "all_gather" not in _kinds(led)
    assert g.spec.dims == x_layout.dims


def _log_softmax_over_split_dim_works() -> bool:
    mesh = sl.Mesh.simulated({"x": 2})
    try:
        v = torch.randn(2, 5, dtype=torch.float64)
        y = F.log_softmax(sl.shard(v, mesh, P(None, "x")), 1)
        return torch.allclose(y.full(), F.log_softmax(v, 1))
    except Exception:
        return False


@pytest.mark.skipif(
    not _log_softmax_over_split_dim_works(),
    reason="log_softmax over a split dim (the _reductions.py decomposition) is not available",
)
@pytest.mark.parametrize("axes", MESHES)
def test_cross_entropy_on_vocab_split_logits(axes):
    """The logits are never gathered: every collective moves (N, 1)-sized values or scalars."""
    mesh = sl.Mesh.simulated(axes)
    a0, a1 = tuple(axes)
    logits = _randn((6, 64), 0)
    target = torch.tensor([0, 63, -100, 4, 35, 9])
    for layout in (P(None, a1), P(a0, a1), P(None, (a0, a1))):
        x = _sharded(mesh, logits, layout)
        t = sl.shard(target, mesh, P(a0) if layout.dims[0] else P(None))
        with sl.comm_ledger() as led:
            y = F.cross_entropy(x, t)
            want = F.cross_entropy(logits, target)
            (a,), (b,) = _grads(y.full(), want, torch.tensor(1.0, dtype=torch.float64), (logits,))
        # a gather of the logits over k >= 2 devices moves >= 1536 B
        assert all(r.bytes < 768 for r in led.records), led.summary()
        assert not [r for r in led.records if r.cause.startswith("nll") and r.kind != "all_reduce"]
        torch.testing.assert_close(y.full(), want, **TOL)
        torch.testing.assert_close(a, b, **TOL)


# == dropout and random ops ====================================================
RANDOM_LAYOUTS = [
    P(None, None),
    P("x", None),
    P(None, "y"),
    P(("x", "y"), None),
    P("y", "x"),
    P(None, ("y", "x")),
]


@pytest.mark.parametrize("layout", RANDOM_LAYOUTS)
def test_dropout_is_bitwise_the_unsharded_op(layout):
    mesh = sl.Mesh.simulated({"x": 4, "y": 2})
    value = torch.randn(7, 10, requires_grad=True)
    torch.manual_seed(0)
    y = F.dropout(sl.shard(value, mesh, layout), 0.3)
    torch.manual_seed(0)
    want = F.dropout(value, 0.3)
    assert y.spec == layout and torch.equal(y.full(), want)
    (a,) = torch.autograd.grad(y.full().sum(), value)
    (b,) = torch.autograd.grad(want.sum(), value)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    out, mask = torch.native_dropout(sl.shard(value.detach(), mesh, layout), 0.3, True)
    torch.manual_seed(0)
    w_out, w_mask = torch.native_dropout(value.detach(), 0.3, True)
    assert torch.equal(out.full(), w_out) and torch.equal(mask.full(), w_mask)
    assert mask.spec == layout and mask.dtype == torch.bool


def test_dropout_keeps_partial_and_consumes_the_same_random_numbers():
    mesh = sl.Mesh.simulated({"x": 4, "y": 2})
    value = _randn((5, 6), 0, grad=False)
    for layout in (P(None, None, partial="x"), P("y", None, partial="x")):
        x = _sharded(mesh, value, layout)
        torch.manual_seed(3)
        with sl.comm_ledger() as led:
            y = F.dropout(x, 0.5)
            out, mask = torch.native_dropout(x, 0.5, True)
        after = torch.rand(4)
        torch.manual_seed(3)
        want = F.dropout(value, 0.5)
        w_out, _ = torch.native_dropout(value, 0.5, True)
        assert torch.equal(after, torch.rand(4))  # the same RNG state afterwards
        assert led.records == [] and y.spec == layout and out.spec == layout
        torch.testing.assert_close(y.full(), want, **TOL)
        torch.testing.assert_close(out.full(), w_out, **TOL)
        assert not mask.spec.partial


def test_native_dropout_eval_and_backward():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    value = _randn((4, 3), 0, grad=False)
    x = _sharded(mesh, value, P("a", None, partial="b"))
    out, mask = torch.native_dropout(x, 0.5, False)
    torch.testing.assert_close(out.full(), value, **TOL)
    assert bool(mask.full().all())
    torch.manual_seed(0)
    _, mask = torch.native_dropout(sl.shard(value, mesh, P("a", "b")), 0.25, True)
    g = _sharded(mesh, value, P(None, "b", partial="a"))
    got = aten.native_dropout_backward.default(g, mask, 4 / 3)
    assert got.spec.partial == ("a",)
    torch.testing.assert_close(got.full(), value * mask.full() * (4 / 3), **TOL)


_RANDOM_OPS = {
    "rand_like": lambda x: torch.rand_like(x),
    "randn_like": lambda x: torch.randn_like(x),
    "randint_like": lambda x: torch.randint_like(x, 3, 9),
    "uniform_": lambda x: x.clone().uniform_(-2, 3),
    "normal_": lambda x: x.clone().normal_(1, 2),
    "exponential_": lambda x: x.clone().exponential_(),
    "bernoulli_": lambda x: x.clone().bernoulli_(0.3),
    "bernoulli_p": lambda x: torch.bernoulli(x, 0.6),
    "bernoulli_tensor": lambda x: torch.bernoulli(x.sigmoid()),
    "bernoulli__tensor": lambda x: x.clone().bernoulli_(x.sigmoid()),
}


@pytest.mark.parametrize("name", sorted(_RANDOM_OPS))
def test_random_ops_are_layout_independent(name):
    mesh = sl.Mesh.simulated({"x": 4, "y": 2})
    value = torch.randn(9, 5)
    fn = _RANDOM_OPS[name]
    torch.manual_seed(11)
    want = fn(value)
    for layout in RANDOM_LAYOUTS + [P("x", None, partial="y")]:
        x = _sharded(mesh, value, layout)
        if layout.partial and name.endswith("tensor"):
            x = sl.reshard(x, layout.without_partial())
        torch.manual_seed(11)
        got = fn(x)
        assert got.spec.dims == layout.dims, (name, layout)
        assert torch.equal(got.full(), want), (name, layout)


# == attention =================================================================
@st.composite
def _sdpa_case(draw):
    axes = draw(st.sampled_from(MESHES))
    names = tuple(axes)
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    length, keys, e = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    q, k, v = (draw(st.sampled_from(_layouts(names, 4))) for _ in range(3))
    causal = draw(st.booleans())
    masked = not causal and draw(st.booleans())
    return sl.Mesh.simulated(axes), (b, h, length, keys, e), (q, k, v), causal, masked


@SAMPLED
@given(_sdpa_case())
def test_sdpa_matches_unsharded(case):
    mesh, (b, h, length, keys, e), layouts, causal, masked = case
    q, k, v = _randn((b, h, length, e), 0), _randn((b, h, keys, e), 1), _randn((b, h, keys, e), 2)
    mask = None
    if masked:
        mask = torch.rand(length, keys, generator=torch.Generator().manual_seed(3)) > 0.4
        mask[:, 0] = True
    kw = {"attn_mask": mask, "is_causal": causal}
    got = F.scaled_dot_product_attention(
        *(_sharded(mesh, t, lay) for t, lay in zip((q, k, v), layouts)), **kw
    )
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    full = got.full()
    torch.testing.assert_close(full, want, **TOL, msg=f"{layouts} causal={causal}")
    grads, wants = _grads(full, want, _randn(want.shape, 4, grad=False), (q, k, v))
    for a, w, name in zip(grads, wants, "qkv"):
        torch.testing.assert_close(a, w, **TOL, msg=f"d{name} {layouts} causal={causal}")


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_head_split_records_no_collective(causal):
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    layout = P("dp", "tp", None, None)
    q, k, v = (_randn((2, 4, 5, 3), s) for s in range(3))
    qs, ks, vs = (sl.shard(t, mesh, layout) for t in (q, k, v))
    with sl.comm_ledger() as led:
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        grads = torch.autograd.grad(
            y, (qs, ks, vs), _sharded(mesh, torch.ones(y.shape, dtype=torch.float64), layout)
        )
    assert led.records == [] and y.spec == layout
    assert all(g.spec == layout for g in grads)


def test_sdpa_sequence_split_gathers_kv_and_gives_partial_kv_grads():
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    q, k, v = (_randn((2, 2, 7, 3), s) for s in range(3))
    seq = P("dp", None, "tp", None)
    qs, ks, vs = (sl.shard(t, mesh, seq) for t in (q, k, v))
    with sl.comm_ledger() as led:
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    assert sorted(_kinds(led)) == ["all_gather", "all_gather"] and y.spec == seq
    g = _sharded(mesh, _randn(y.shape, 5, grad=False), seq)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        g,
        qs,
        sl.reshard(ks, P("dp", None, None, None)),
        sl.reshard(vs, P("dp", None, None, None)),
        *aten._scaled_dot_product_flash_attention_for_cpu.default(qs, ks, vs, is_causal=True),
        0.0,
        True,
    )
    assert dq.spec == seq and dk.spec == P("dp", None, None, None, partial="tp")
    torch.testing.assert_close(
        y.full(), F.scaled_dot_product_attention(q, k, v, is_causal=True), **TOL
    )


def test_sdpa_dropout_in_fused_kernel_is_refused():
    mesh = sl.Mesh.simulated({"a": 2})
    q = sl.shard(torch.randn(1, 2, 3, 4), mesh, P(None, "a", None, None))
    with pytest.raises(sl.NoRuleError, match="dropout"):
        aten._scaled_dot_product_flash_attention_for_cpu.default(q, q, q, 0.5)


def test_sdpa_math_path_dropout_and_safe_softmax():
    """dropout_p > 0 takes the math path: bernoulli_ draws the unsharded op's mask."""
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    q = _randn((2, 4, 5, 3), 0)
    for layout in (P("a", "b", None, None), P(None, "a", "b", None)):
        torch.manual_seed(0)
        y = F.scaled_dot_product_attention(*[sl.shard(q, mesh, layout)] * 3, dropout_p=0.3)
        torch.manual_seed(0)
        want = F.scaled_dot_product_attention(q, q, q, dropout_p=0.3)
        torch.testing.assert_close(y.full(), want, **TOL)
        (a,), (b,) = _grads(y.full(), want, torch.ones_like(want), (q,))
        torch.testing.assert_close(a, b, **TOL)
    x = _sharded(mesh, _randn((3, 4, 5), 1, grad=False), P("a", None, "b"))
    got = aten._safe_softmax.default(x, 1)
    assert got.spec == P("a", None, "b")
    torch.testing.assert_close(got.full(), torch.softmax(x.full(), 1), **TOL)


# == backward ops with partial incoming gradients ==============================
def test_backward_ops_keep_a_partial_gradient_partial():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    g = _randn((4, 3, 6), 0, grad=False)
    ids = torch.randint(0, 9, (4, 3), generator=torch.Generator().manual_seed(1))
    with sl.comm_ledger() as led:
        got = aten.embedding_dense_backward.default(
            _sharded(mesh, g, P("a", None, None, partial="b")),
            sl.shard(ids, mesh, P("a", None)),
            9,
            -1,
            False,
        )
    assert led.records == [] and got.spec == P(None, None, partial=("a", "b"))
    want = aten.embedding_dense_backward.default(g, ids, 9, -1, False)
    torch.testing.assert_close(got.full(), want, **TOL)

    logp, target = _randn((6, 10), 2, grad=False), torch.tensor([0, 9, -100, 4, 5, 3])
    gl = _randn((6,), 3, grad=False)
    total = torch.tensor(0.0, dtype=torch.float64)
    with sl.comm_ledger() as led:
        got = aten.nll_loss_backward.default(
            _sharded(mesh, gl, P(None, partial="b")),
            sl.shard(logp, mesh, P(None, "a")),
            target,
            None,
            0,
            -100,
            total,
        )
    assert led.records == [] and got.spec == P(None, "a", partial="b")
    want = aten.nll_loss_backward.default(gl, logp, target, None, 0, -100, total)
    torch.testing.assert_close(got.full(), want, **TOL)

    q, k, v = (_randn((2, 2, 5, 3), s, grad=False) for s in range(3))
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v)
    go = _randn(out.shape, 7, grad=False)
    heads = P(None, "a", None, None)
    with sl.comm_ledger() as led:
        got = aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            _sharded(mesh, go, P(None, "a", None, None, partial="b")),
            *(sl.shard(t, mesh, heads) for t in (q, k, v, out)),
            sl.shard(lse, mesh, P(None, "a", None)),
            0.0,
            False,
        )
    assert led.records == []
    want = aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        go, q, k, v, out, lse, 0.0, False
    )
    for a, w in zip(got, want):
        assert a.spec == P(None, "a", None, None, partial="b")
        torch.testing.assert_close(a.full(), w, **TOL)


# == scalars and rules as data =================================================
def test_item_reduces_a_partial_scalar():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    s = _sharded(mesh, torch.tensor(2.5, dtype=torch.float64), P(partial=("a", "b")))
    with sl.comm_ledger() as led:
        assert s.item() == 2.5
    assert _kinds(led) and set(_kinds(led)) == {"all_reduce"}
    r = sl.shard(torch.tensor(7), mesh, P())
    assert r.item() == 7 and int(r) == 7


def _rule_input(op, args, mesh, outputs):
    tensors = tuple(a for a in args if isinstance(a, ArgSpec))
    return RuleInput(op, mesh, tuple(args), {}, tensors, outputs)


def test_rules_are_pure_data():
    mesh = AbstractMesh(("dp", "tp"), (2, 2))
    table = ArgSpec((10, 4), torch.float32, P("tp", None))
    ids = ArgSpec((3, 5), torch.int64, P("dp", None))
    out = ArgSpec((3, 5, 4), torch.float32)
    first = next(
        iter(
            rule_for(aten.embedding.default)(
                _rule_input(aten.embedding.default, (table, ids), mesh, (out,))
            )
        )
    )
    assert first.inputs == (P("tp", None), P("dp", None))
    assert first.outputs == (P("dp", None, None, partial="tp"),) and first.local_device
    logp = ArgSpec((6, 10), torch.float32, P("dp", "tp"))
    target = ArgSpec((6,), torch.int64, P("dp"))
    outs = (ArgSpec((), torch.float32), ArgSpec((), torch.float32))
    op = aten.nll_loss_forward.default
    first = next(iter(rule_for(op)(_rule_input(op, (logp, target, None, 2, -100), mesh, outs))))
    assert first.inputs == (P("dp", "tp"), P("dp"))
    assert first.outputs == (P(partial=("dp", "tp")), P(partial=("dp", "tp")))
