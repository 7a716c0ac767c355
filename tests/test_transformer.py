"""A 2-layer transformer written with plain torch ops, sharded by layouts only.

The model (embedding, pre-LayerNorm attention with SDPA, GELU MLP, dropout,
tied-free LM head, cross-entropy) is one function of a parameter dict; the
sharded run passes ShardedTensors. Loss and every parameter gradient must equal
the unsharded float64 model's (rtol 1e-9, atol 1e-10; dropout masks are the
same because random ops are layout-independent under one seed).

Layouts: data parallel over `dp` (batch), Megatron tensor parallel over `tp`
(QKV and W1 column-split, WO and W2 row-split, vocabulary-split embedding and
head), and with `sp` the sequence dim of the residual stream split too.
Simulated meshes {dp:2,tp:2} and {dp:2,tp:2,sp:2}; the same program on 4 and
8 gloo ranks (marked `dist`). The Megatron-MLP byte budget check uses the
ledger: forward + backward + finishing the input gradient move no more bytes
over tp than two all-reduces of the activation, and nothing is gathered whole.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl

P = sl.P
B, S, H, NH, V, FF = 4, 8, 16, 4, 10, 32


def init_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(shape, dtype=torch.float64, generator=g) / shape[0] ** 0.5

    p = {"wte": w(V, H), "head": w(H, V), "lnf_w": 1 + 0.1 * w(H), "lnf_b": 0.1 * w(H)}
    for i in range(2):
        p |= {
            f"ln1_w{i}": 1 + 0.1 * w(H),
            f"ln1_b{i}": 0.1 * w(H),
            f"wq{i}": w(H, H),
            f"wk{i}": w(H, H),
            f"wv{i}": w(H, H),
            f"wo{i}": w(H, H),
            f"ln2_w{i}": 1 + 0.1 * w(H),
            f"ln2_b{i}": 0.1 * w(H),
            f"w1{i}": w(H, FF),
            f"w2{i}": w(FF, H),
        }
    return p


def model(p: dict, ids_bs: torch.Tensor, targets_bs: torch.Tensor, drop: float = 0.1):
    """Legend: b batch, s sequence, h hidden, n heads, d head dim, v vocabulary, f MLP."""
    x_bsh = F.embedding(ids_bs, p["wte"])
    for i in range(2):
        h_bsh = F.layer_norm(x_bsh, (H,), p[f"ln1_w{i}"], p[f"ln1_b{i}"])
        q, k, v = (
            (h_bsh @ p[f"w{n}{i}"]).unflatten(-1, (NH, H // NH)).transpose(1, 2)
            for n in ("q", "k", "v")
        )
        a_bnsd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a_bsh = a_bnsd.transpose(1, 2).flatten(-2) @ p[f"wo{i}"]
        x_bsh = x_bsh + F.dropout(a_bsh, drop, training=True)
        h_bsh = F.layer_norm(x_bsh, (H,), p[f"ln2_w{i}"], p[f"ln2_b{i}"])
        m_bsh = F.gelu(h_bsh @ p[f"w1{i}"]) @ p[f"w2{i}"]
        x_bsh = x_bsh + F.dropout(m_bsh, drop, training=True)
    x_bsh = F.layer_norm(x_bsh, (H,), p["lnf_w"], p["lnf_b"])
    logits_bsv = x_bsh @ p["head"]
    return F.cross_entropy(logits_bsv.flatten(0, 1), targets_bs.flatten())


def layouts(seq: bool) -> tuple[dict, sl.Layout]:
    """Parameter layouts (Megatron over tp) and the token layout (batch over dp[, seq over sp])."""
    col, row, rep = P(None, "tp"), P("tp", None), P(None)
    out = {"wte": P("tp", None), "head": col, "lnf_w": rep, "lnf_b": rep}
    for i in range(2):
        out |= {
            f"ln1_w{i}": rep,
            f"ln1_b{i}": rep,
            f"ln2_w{i}": rep,
            f"ln2_b{i}": rep,
            f"wq{i}": col,
            f"wk{i}": col,
            f"wv{i}": col,
            f"wo{i}": row,
            f"w1{i}": col,
            f"w2{i}": row,
        }
    return out, P("dp", "sp" if seq else None)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def run_sharded(mesh, seq: bool):
    """Loss and full gradients of the sharded model (runs on either backend)."""
    params = init_params()
    ids, targets = _data()
    lay, tok = layouts(seq)
    sp = {k: sl.shard(v, mesh, lay[k]).requires_grad_() for k, v in params.items()}
    torch.manual_seed(0)
    loss = model(sp, sl.shard(ids, mesh, tok), sl.shard(targets, mesh, tok))
    loss.backward()
    return loss.full(), {k: v.grad.full() for k, v in sp.items()}


def run_reference():
    params = {k: v.clone().requires_grad_() for k, v in init_params().items()}
    ids, targets = _data()
    torch.manual_seed(0)
    loss = model(params, ids, targets)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in params.items()}


def _compare(got, want):
    loss, grads = got
    ref_loss, ref_grads = want
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-9, atol=1e-10, msg=k)


@pytest.mark.parametrize(
    ("axes", "seq"), [({"dp": 2, "tp": 2}, False), ({"dp": 2, "tp": 2, "sp": 2}, True)]
)
def test_transformer_matches_unsharded(axes, seq):
    _compare(run_sharded(sl.Mesh.simulated(axes), seq), run_reference())


@pytest.mark.dist
def test_transformer_on_gloo_4_ranks(workers4):
    want = run_reference()
    for got in workers4.run(run_sharded, {"dp": 2, "tp": 2}, (False,)):
        _compare(got, want)


@pytest.mark.dist
def test_transformer_on_gloo_8_ranks(workers8):
    want = run_reference()
    for got in workers8.run(run_sharded, {"dp": 2, "tp": 2, "sp": 2}, (True,)):
        _compare(got, want)


def test_megatron_mlp_moves_no_more_than_two_all_reduces():
    """Column-then-row MLP with replicated activations: bytes over tp <= Megatron's."""
    mesh = sl.Mesh.simulated({"tp": 4})
    g = torch.Generator().manual_seed(0)
    x_v, w1_v, w2_v = (
        torch.randn(s, dtype=torch.float64, generator=g) for s in [(16, 8), (8, 32), (32, 8)]
    )
    x = sl.shard(x_v, mesh, P(None, None)).requires_grad_()
    w1 = sl.shard(w1_v, mesh, P(None, "tp")).requires_grad_()
    w2 = sl.shard(w2_v, mesh, P("tp", None)).requires_grad_()
    with sl.comm_ledger() as led:
        y = sl.reshard(F.gelu(x @ w1) @ w2, P(None, None))  # activations replicated over tp
        loss = (y * y).sum()
        loss.backward()
        gx = sl.reshard(x.grad, x.spec)  # finish the input gradient
    xr, w1r, w2r = (t.clone().requires_grad_() for t in (x_v, w1_v, w2_v))
    ((F.gelu(xr @ w1r) @ w2r) ** 2).sum().backward()
    torch.testing.assert_close(gx.full(), xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1.grad.full(), w1r.grad, rtol=1e-10, atol=1e-12)
    assert [r.kind for r in led.records] == ["all_reduce", "all_reduce"], led.summary()
    activation = 16 * 8 * 8  # bytes of the (tokens, hidden) activation
    budget = 2 * (2 * (4 - 1) * activation // 4)  # two ring all-reduces over tp=4
    assert led.total_bytes <= budget, led.summary()
    full_gathers = [r for r in led.records if r.kind == "all_gather" and r.bytes >= 3 * activation]
    assert not full_gathers, led.summary()
