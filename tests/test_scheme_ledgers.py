"""One GPT block's communication under every preset, against DESIGN §8's bytes table.

For each preset the block's ledger (forward and backward, per device) must be at or
below the figure composed from §8's per-linear and per-attention formulas, summed over
the block's six linears (wq, wk, wv, wo, w_up, w_down) and its attention. One block's
bytes are measured as the ledger of a 2-layer model minus that of a 1-layer model (the
embedding, the head and the loss cancel). Shapes are divisible; elements are float64.

Terms beyond the papers' linears, written out where they appear:
- 2D/2.5D/3D: RMSNorm's mean of squares over the split embed dim is one all-reduce of
  the block's token count (per device) per norm, forward and backward;
- ring: the key positions travel with K (int64, forward).
Gradients of replicated parameters stay partial (DDP's lazy reduction; the optimizer
reduces them), so dp's backward is 0 here and 2.5D's dW all-reduce over depth is not
in the block.
"""

from __future__ import annotations

import pytest
import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

E = 8  # float64
SIZES = dict(vocab=32, dim=16, heads=4, kv_heads=4, seq=8, mlp=32, batch=4)


def _linears(s: dict) -> list[tuple[int, int]]:
    """(in, out) of the block's linears."""
    h, hd = s["dim"], s["dim"]
    kd = s["kv_heads"] * (s["dim"] // s["heads"])
    return [(h, hd), (h, kd), (h, kd), (hd, h), (h, s["mlp"]), (s["mlp"], h)]


def _ledger(scheme, axes, sizes, layers):
    mesh = sl.Mesh.simulated(axes)
    cfg = gpt.Config(
        vocab=sizes["vocab"],
        dim=sizes["dim"],
        heads=sizes["heads"],
        layers=layers,
        seq=sizes["seq"],
        kv_heads=sizes["kv_heads"],
        mlp=sizes["mlp"],
    )
    params = {k: v.double() for k, v in gpt.init(cfg, seed=0).items()}
    g = torch.Generator().manual_seed(1)
    batch = {
        k: torch.randint(0, cfg.vocab, (sizes["batch"], cfg.seq), generator=g)
        for k in ("tokens", "targets")
    }
    with snn.use(scheme, mesh):
        p = snn.shard_params(params, mesh, scheme, gpt.DIMS)
        for t in p.values():
            t.requires_grad_()
        b = scheme.shard_batch(batch, mesh)
        with sl.comm_ledger() as led:
            gpt.loss(p, b, cfg).backward()
    return led


def _block(scheme, axes, sizes=SIZES):
    """(forward records, backward records) of one block."""
    one, two = (_ledger(scheme, axes, sizes, n).records for n in (1, 2))
    out = []
    for direction in ("forward", "backward"):
        a = [r for r in one if r.direction == direction]
        b = [r for r in two if r.direction == direction]
        out.append((sum(r.bytes for r in b) - sum(r.bytes for r in a), a, b))
    return out


def _extra_kinds(one, two) -> dict[str, int]:
    """Collectives the second block adds, by kind."""
    from collections import Counter

    extra = Counter(r.kind for r in two)
    extra.subtract(Counter(r.kind for r in one))
    return {k: n for k, n in extra.items() if n}


def _tokens(s):
    return s["batch"] * s["seq"]


def _norm_stats(tokens_per_device, k):
    """All-reduce of one statistic per token over a group of k (per norm)."""
    return 2 * (k - 1) * -(-tokens_per_device // k) * E


# == the presets =================================================================
def test_tp1d_megatron():
    P = 4
    (f, *_), (b, *_) = _block(snn.tp1d("tp"), {"tp": P})
    paper = 2 * (2 * (P - 1) / P * _tokens(SIZES) * SIZES["dim"] * E)  # attention + MLP
    assert f == paper and b == paper  # Megatron's plan exactly


def test_tp1d_sequence_parallel():
    P = 4
    (f, *_), (b, *_) = _block(snn.tp1d("tp", sequence=True), {"tp": P})
    # per attention and per MLP: all-gather + reduce-scatter, (P-1)/P·bsh each
    paper = 2 * (2 * (P - 1) / P * _tokens(SIZES) * SIZES["dim"] * E)
    assert f <= paper and b <= paper


@pytest.mark.parametrize("q", [2])
def test_tp2d_summa(q):
    (f, *_), (b, *_) = _block(snn.tp2d("r", "c"), {"r": q, "c": q})
    t = _tokens(SIZES)
    paper = sum((q - 1) / q**2 * (t * i + i * o) * E for i, o in _linears(SIZES))
    paper += 2 * _norm_stats(t // q, q)
    assert f <= paper and b <= paper


def test_tp2p5d_tesseract():
    d = q = 2
    (f, *_), (b, *_) = _block(snn.tp2p5d("d", "r", "c"), {"d": d, "r": q, "c": q})
    t = _tokens(SIZES)
    paper = sum((q - 1) / q**2 * (t * i / d + i * o) * E for i, o in _linears(SIZES))
    paper += 2 * _norm_stats(t // (d * q), q)
    assert f <= paper and b <= paper


def test_tp3d():
    q = 2
    (f, *_), (b, *_) = _block(snn.tp3d("i", "j", "k"), {"i": q, "j": q, "k": q})
    t = _tokens(SIZES)
    paper = sum((q - 1) / q**3 * (t * i + i * o + t * o) * E for i, o in _linears(SIZES))
    paper += 2 * _norm_stats(t // q**2, q)
    assert f <= paper and b <= paper


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (8, 4, 32)])
def test_ulysses_four_all_to_alls(heads, kv_heads, dim):
    P = 4
    sizes = {**SIZES, "heads": heads, "kv_heads": kv_heads, "dim": dim}
    (f, fa, fb), (b, *_) = _block(snn.ulysses("sp"), {"sp": P}, sizes)
    d = dim // heads
    paper = (P - 1) / P**2 * _tokens(sizes) * d * (2 * heads + 2 * kv_heads) * E
    assert f <= paper and b <= paper
    assert _extra_kinds(fa, fb) == {"all_to_all": 4}  # exactly four, nothing else
    assert "all_gather" not in {r.kind for r in fb}


@pytest.mark.parametrize("balance", ["zigzag", "stripe", None])
def test_ring_only_ppermutes(balance):
    P = 4
    (f, fa, fb), (b, ba, bb) = _block(snn.ring("sp", balance=balance), {"sp": P})
    t, kd = _tokens(SIZES), SIZES["kv_heads"] * (SIZES["dim"] // SIZES["heads"])
    kv = 2 * (P - 1) / P * t * kd * E
    positions = (P - 1) * (t // P) * 8  # int64 key positions travel with K
    assert f <= kv + positions
    assert b <= kv + 2 * t * kd * E  # K, V again plus P sends of dK, dV
    assert set(_extra_kinds(fa, fb)) == {"ppermute"}
    assert set(_extra_kinds(ba, bb)) == {"ppermute"}


def test_dp_block_sends_nothing():
    (f, *_), (b, *_) = _block(snn.dp("dp"), {"dp": 4})
    assert f == 0 and b == 0  # gradients stay partial over dp until the optimizer


def test_fsdp_gathers_weights_once_and_regathers():
    P = 4
    (f, *_), (b, *_) = _block(snn.fsdp("dp"), {"dp": P})
    weights = sum(i * o for i, o in _linears(SIZES)) * E
    assert f <= (P - 1) / P * weights
    assert b <= 2 * (P - 1) / P * weights  # re-gather + reduce-scatter of the gradients


def test_dp_plus_tp1d():
    dp, tp = 2, 2
    (f, *_), (b, *_) = _block(snn.dp("dp") + snn.tp1d("tp"), {"dp": dp, "tp": tp})
    paper = 2 * (2 * (tp - 1) / tp * _tokens(SIZES) / dp * SIZES["dim"] * E)
    assert f <= paper and b <= paper


def test_dp_plus_tp2d():
    dp, q = 2, 2
    (f, *_), (b, *_) = _block(snn.dp("dp") + snn.tp2d("r", "c"), {"dp": dp, "r": q, "c": q})
    t = _tokens(SIZES) // dp
    paper = sum((q - 1) / q**2 * (t * i + i * o) * E for i, o in _linears(SIZES))
    paper += 2 * _norm_stats(t // q, q)
    assert f <= paper and b <= paper


# == activation memory at the constraint points ====================================
@pytest.mark.parametrize(
    "scheme,axes,divisor",
    [
        (snn.tp1d("tp"), {"tp": 4}, 1),  # Megatron keeps the residual stream replicated
        (snn.tp1d("tp", sequence=True), {"tp": 4}, 4),
        (snn.tp2d("r", "c"), {"r": 2, "c": 2}, 4),  # 1/q²
        (snn.tp2p5d("d", "r", "c"), {"d": 2, "r": 2, "c": 2}, 8),  # 1/(d q²)
        (snn.tp3d("i", "j", "k"), {"i": 2, "j": 2, "k": 2}, 8),  # 1/q³
        (snn.ulysses("sp"), {"sp": 4}, 4),
        (snn.ring("sp"), {"sp": 4}, 4),
        (snn.dp("dp"), {"dp": 4}, 4),
        (snn.fsdp("dp"), {"dp": 4}, 4),
    ],
    ids=repr,
)
def test_residual_stream_bytes_per_device(scheme, axes, divisor, monkeypatch):
    """Every residual-stream constraint point holds 1/divisor of (batch, seq, embed) per device."""
    from shardlib.nn import _use

    seen = []
    plain = _use.constrain

    def spy(x, dims):
        y = plain(x, dims)
        if tuple(dims) == ("batch", "seq", "embed"):
            seen.append(max(t.numel() for t in y.local_shards()))
        return y

    monkeypatch.setattr(_use, "constrain", spy)
    _ledger(scheme, axes, SIZES, 1)
    whole = SIZES["batch"] * SIZES["seq"] * SIZES["dim"]
    assert seen and set(seen) == {whole // divisor}
