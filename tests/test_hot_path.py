"""The engine's hot path (issue 7's overhead goal): what the fast paths must keep exact.

Covers, on simulated meshes, against unsharded float64 torch:

- the dispatcher's fast path: ops on alias views, on layouts equal but not identical to the
  cached decision's, with plain (replicated-constant) operands, in place on a view family,
  and through per-device local functions (views), give torch's values and aliasing;
- the per-device products of contractions (`_contractions._local_product`): the matmul forms
  (``x @ w``, ``dY @ w.T``, ``x.T @ dY``) and the einsum fallback equal `torch.einsum` on
  random shapes, empty blocks included; a repeated `sl.einsum(..., out_layout=)` step gives
  the same ledger and values every time (its cached plan);
- vocab-parallel cross-entropy's collectives: `F.cross_entropy` on vocab-split logits with
  targets on every device sends two all-reduces of one value per token forward (max and
  sum of exponentials: no total-weight scalar) and nothing backward (the nll gradient
  carries its rows' sums for the log_softmax backward), as Megatron's fused loss; values
  and gradients equal torch's; a gradient written in place before the log_softmax backward
  is summed again (right values, one all-reduce);
- a causal attention over a whole sequence per device keeps torch's `is_causal` kernel
  (no mask): values equal the unsharded op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib.ops._contractions import _local_product

P = sl.P
aten = torch.ops.aten
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _randn(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)


# == the dispatcher's fast path ===================================================
def test_fast_path_views_plain_operands_and_equal_layouts():
    mesh = sl.Mesh.simulated({"x": 2})
    a, b = _randn(4, 6, seed=1), _randn(6, seed=2)
    x = sl.shard(a, mesh, P("x", None))
    for _ in range(2):  # the second run takes the cached decision
        v = x.view(4, 3, 2)  # an alias view (a per-device local function)
        y = v * 2.0 + b.view(3, 2)  # a plain operand, replicated
        torch.testing.assert_close(y.full(), a.view(4, 3, 2) * 2.0 + b.view(3, 2), **TOL)
        # a layout equal to, but not the same object as, the cached decision's
        z = sl.from_local(x.local_shards(), mesh, P(("x",), None), (4, 6))
        torch.testing.assert_close((z * z).full(), a * a, **TOL)
    t = x.t()
    t.mul_(3.0)  # in place through a view: the family sees it
    torch.testing.assert_close(x.full(), a * 3.0, **TOL)
    torch.testing.assert_close(t.full(), (a * 3.0).t(), **TOL)


# == per-device products ===========================================================
@pytest.mark.parametrize(
    "eq, shapes",
    [
        ("abi,io->abo", [(2, 3, 4), (4, 5)]),  # x @ w
        ("abo,io->abi", [(2, 3, 5), (4, 5)]),  # dY @ w.T
        ("abo,abi->io", [(2, 3, 5), (2, 3, 4)]),  # the weight gradient, dY first
        ("abi,abo->io", [(2, 3, 4), (2, 3, 5)]),
        ("ij,jk->ik", [(3, 4), (4, 2)]),
        ("abi,io->abo", [(2, 0, 4), (4, 5)]),  # an empty block
        ("abo,abi->io", [(2, 3, 0), (2, 3, 4)]),
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),  # not a matmul form: einsum
        ("i,i->", [(4,), (4,)]),
    ],
)
def test_local_products_equal_einsum(eq, shapes):
    xs = [_randn(*s, seed=k) for k, s in enumerate(shapes)]
    torch.testing.assert_close(_local_product(eq)(*xs), torch.einsum(eq, *xs), **TOL)


def test_cached_contraction_plan_repeats_ledger_and_values():
    mesh = sl.Mesh.simulated({"r": 2, "c": 2})
    a, w = _randn(4, 6, seed=3, grad=True), _randn(6, 8, seed=4, grad=True)
    want = a @ w
    (ga, gw) = torch.autograd.grad(want.sum(), (a, w))
    ledgers = []
    for _ in range(3):
        x = sl.shard(a.detach(), mesh, P("r", "c")).requires_grad_()
        y_w = sl.shard(w.detach(), mesh, P("r", "c")).requires_grad_()
        with sl.comm_ledger() as led:
            y = sl.einsum("ij,jk->ik", x, y_w, out_layout=P("r", "c"))
            y.backward(sl.shard(torch.ones(4, 8, dtype=torch.float64), mesh, P("r", "c")))
        ledgers.append([(r.kind, r.axes, r.bytes, r.direction) for r in led.records])
        torch.testing.assert_close(y.full(), want.detach(), **TOL)
        torch.testing.assert_close(x.grad.full(), ga, **TOL)
        torch.testing.assert_close(y_w.grad.full(), gw, **TOL)
    assert ledgers[0] == ledgers[1] == ledgers[2]


# == vocab-parallel cross-entropy ===================================================
def test_cross_entropy_vocab_split_needs_megatrons_collectives_only():
    mesh = sl.Mesh.simulated({"tp": 4})
    logits = _randn(2, 10, 3, seed=5, grad=True)  # (batch, vocab, seq): classes on dim 1
    target = torch.tensor([[0, 9, -100], [4, 5, 7]])
    want = F.cross_entropy(logits, target)
    (g_want,) = torch.autograd.grad(want, logits)
    x = sl.shard(logits.detach(), mesh, P(None, "tp", None)).requires_grad_()
    t = sl.shard(target, mesh, P(None, None))
    with sl.comm_ledger() as fwd:
        y = F.cross_entropy(x, t)
    tokens, k = 2 * 3, 4
    padded = -(-tokens // k) * k  # ring all-reduce of one float64 per token, padded to k chunks
    assert [r.kind for r in fwd.records] == ["all_reduce", "all_reduce"]
    assert all(r.bytes == 2 * (k - 1) / k * padded * 8 for r in fwd.records)
    with sl.comm_ledger() as bwd:
        y.backward()
    assert bwd.records == []
    torch.testing.assert_close(y.full(), want.detach(), **TOL)
    torch.testing.assert_close(x.grad.full(), g_want, **TOL)


def test_log_softmax_backward_resums_a_written_nll_gradient():
    mesh = sl.Mesh.simulated({"tp": 2})
    logp = torch.log_softmax(_randn(4, 6, seed=6), 1)
    target = torch.tensor([0, 5, -100, 3])
    total = torch.tensor(3.0, dtype=torch.float64)
    g_out = torch.tensor(1.0, dtype=torch.float64)
    x = sl.shard(logp, mesh, P(None, "tp"))
    t = sl.shard(target, mesh, P(None))
    args = (None, 1, -100)
    want = aten.nll_loss_backward.default(g_out, logp, target, *args, total)
    for written in (False, True):
        g = aten.nll_loss_backward.default(
            sl.shard(g_out, mesh, P()), x, t, *args, sl.shard(total, mesh, P())
        )
        torch.testing.assert_close(g.full(), want, **TOL)
        if written:
            g.mul_(2.0)
        with sl.comm_ledger() as led:
            dx = aten._log_softmax_backward_data.default(g, x, 1, torch.float64)
        ref = aten._log_softmax_backward_data.default(
            want * (2.0 if written else 1.0), logp, 1, torch.float64
        )
        torch.testing.assert_close(dx.full(), ref, **TOL)
        assert len(led.records) == (1 if written else 0)


# == attention ======================================================================
def test_causal_attention_on_whole_sequences_matches_unsharded():
    mesh = sl.Mesh.simulated({"tp": 2})
    q, k, v = (_randn(2, 4, 5, 3, seed=s, grad=True) for s in (7, 8, 9))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads_want = torch.autograd.grad(want.sum(), (q, k, v))
    qs, ks, vs = (
        sl.shard(t.detach(), mesh, P(None, "tp", None, None)).requires_grad_() for t in (q, k, v)
    )
    with sl.comm_ledger() as led:
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        grads = torch.autograd.grad(
            out, (qs, ks, vs), sl.shard(torch.ones_like(want), mesh, P(None, "tp", None, None))
        )
    assert led.records == []
    torch.testing.assert_close(out.full(), want.detach(), **TOL)
    for got, g in zip(grads, grads_want):
        torch.testing.assert_close(got.full(), g, **TOL)
