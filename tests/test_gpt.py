"""The unsharded reference GPT (`shardlib.nn.gpt`) against an independent float64 model.

`reference_per_token` below is the same architecture written with plain torch
and no shardlib: attention as an explicit softmax with a causal mask built from
positions (``pos[key] <= pos[query]``), grouped-query attention by repeating
each kv head over its query heads, rotary positions as complex rotations
(``torch.polar``), RMSNorm and GELU from their formulas, cross-entropy as
``-log_softmax`` gathered at the targets. Covered: loss and every gradient at
rtol 1e-10 (multi-head, grouped-query, one and two layers, given positions);
rotary honours ``batch["positions"]`` (a permuted sequence with permuted
positions gives the permuted per-token losses; shifting all positions changes
nothing, RoPE being relative); grouped-query attention equals multi-head
attention with each kv head's weights repeated; `init` (keys and ranks match
`DIMS`, float32, deterministic, global RNG untouched); dropout (off when not
training, the same mask under one seed); `Config` validation and bad-input
errors.
"""

from __future__ import annotations

import math

import pytest
import torch

import shardlib as sl
from shardlib.nn import gpt

F64 = torch.float64


# ----------------------------------------------------------------------------- reference


def _rms(x, w, eps=gpt.NORM_EPS):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_per_token(p, tokens, targets, c, positions=None):
    """Per-token next-token cross-entropy (batch, seq) of the GPT, plain torch only."""
    b, s = tokens.shape
    hd, half, nh, nk = c.head_dim, c.head_dim // 2, c.heads, c.kv_heads
    pos = torch.arange(s).expand(b, s) if positions is None else positions
    freq = 10000.0 ** (-2.0 * torch.arange(half, dtype=F64) / hd)
    theta = pos[..., None].to(F64) * freq  # (b, s, half)
    turn = torch.polar(torch.ones_like(theta), theta)[:, :, None, :]  # (b, s, 1, half)

    def rope(t):  # (b, s, n, hd): feature j pairs with j + half
        z = torch.complex(t[..., :half], t[..., half:]) * turn
        return torch.cat([z.real, z.imag], -1)

    allowed = pos[:, None, None, :] <= pos[:, None, :, None]  # (b, 1, query, key)
    x = p["wte"][tokens]
    for i in range(c.layers):
        w = {n: p[f"layers.{i}.{n}"] for n in gpt._LAYER}
        h = _rms(x, w["attn_norm"])
        q = rope((h @ w["wq"]).reshape(b, s, nh, hd))
        k = rope((h @ w["wk"]).reshape(b, s, nk, hd)).repeat_interleave(nh // nk, dim=2)
        v = (h @ w["wv"]).reshape(b, s, nk, hd).repeat_interleave(nh // nk, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
        a = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, nh * hd)
        x = x + a @ w["wo"]
        x = x + _gelu(_rms(x, w["mlp_norm"]) @ w["w_up"]) @ w["w_down"]
    logits = _rms(x, p["norm"]) @ p["head"]
    return -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]


# ----------------------------------------------------------------------------- helpers


def params64(c, seed=0):
    """init's params in float64 with the norm weights perturbed (ones would hide bugs)."""
    g = torch.Generator().manual_seed(seed + 100)
    out = {}
    for k, v in gpt.init(c, seed).items():
        v = v.to(F64)
        if k.endswith("norm"):
            v = v + 0.1 * torch.randn(v.shape, generator=g, dtype=F64)
        out[k] = v.requires_grad_()
    return out


def make_batch(c, b, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, c.vocab, (b, s), generator=g),
        "targets": torch.randint(0, c.vocab, (b, s), generator=g),
    }


def _grads(value, params):
    keys = list(params)
    return dict(zip(keys, torch.autograd.grad(value, [params[k] for k in keys])))


CONFIGS = {
    "mha": (gpt.Config(vocab=11, dim=8, heads=2, layers=1, seq=7), 3, 7),
    "gqa": (gpt.Config(vocab=13, dim=12, heads=3, layers=2, seq=8, kv_heads=1, mlp=20), 2, 6),
    "gqa2": (gpt.Config(vocab=12, dim=16, heads=4, layers=1, seq=8, kv_heads=2), 2, 8),
}


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_reference(name):
    c, b, s = CONFIGS[name]
    p = params64(c)
    batch = make_batch(c, b, s)
    got = gpt.loss(p, batch, c)
    want = reference_per_token(p, batch["tokens"], batch["targets"], c).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got, g_want = _grads(got, p), _grads(want, p)
    for k in p:
        assert g_want[k].abs().max() > 0, k  # every parameter takes part
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_given_positions_match_reference():
    """Arbitrary distinct positions (as a reordering scheme passes them) reach rotary and mask."""
    c, b, s = CONFIGS["gqa2"]
    p = params64(c)
    batch = make_batch(c, b, s)
    g = torch.Generator().manual_seed(5)
    batch["positions"] = torch.stack([torch.randperm(s, generator=g) * 2 + 3 for _ in range(b)])
    got = gpt.loss(p, batch, c, reduction="none")
    want = reference_per_token(p, batch["tokens"], batch["targets"], c, batch["positions"])
    assert got.shape == (b, s)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got, g_want = _grads(got.sum(), p), _grads(want.sum(), p)
    for k in p:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_permuted_sequence_with_permuted_positions_gives_the_same_per_token_losses():
    c, b, s = CONFIGS["gqa"]
    p = params64(c)
    batch = make_batch(c, b, s)
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(s))
    permuted = {
        "tokens": batch["tokens"][:, perm],
        "targets": batch["targets"][:, perm],
        "positions": torch.arange(s)[perm].expand(b, s),
    }
    natural = gpt.loss(p, batch, c, reduction="none")
    torch.testing.assert_close(
        gpt.loss(p, permuted, c, reduction="none"), natural[:, perm], rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(gpt.loss(p, permuted, c), gpt.loss(p, batch, c), rtol=1e-12, atol=0)
    # positions are honoured, not ignored: a permuted sequence without them differs
    without = gpt.loss(p, {k: permuted[k] for k in ("tokens", "targets")}, c, reduction="none")
    assert not torch.allclose(without, natural[:, perm])


def test_shifted_positions_change_nothing():
    """RoPE depends on position differences only; the causal mask on their order."""
    c, b, s = CONFIGS["mha"]
    p = params64(c)
    batch = make_batch(c, b, s)
    shifted = dict(batch, positions=torch.arange(s).expand(b, s) + 17)
    torch.testing.assert_close(
        gpt.loss(p, shifted, c, reduction="none"),
        gpt.loss(p, batch, c, reduction="none"),
        rtol=1e-10,
        atol=1e-12,
    )


def test_grouped_query_equals_multi_head_with_repeated_kv_weights():
    """kv_heads < heads: query head h reads kv head h // (heads // kv_heads)."""
    cg = gpt.Config(vocab=11, dim=12, heads=3, layers=1, seq=6, kv_heads=1)
    cm = gpt.Config(vocab=11, dim=12, heads=3, layers=1, seq=6)
    pg = {k: v.detach() for k, v in params64(cg).items()}
    pm = dict(pg)
    for n in ("wk", "wv"):
        w = pg[f"layers.0.{n}"].reshape(cg.dim, cg.kv_heads, cg.head_dim)
        pm[f"layers.0.{n}"] = w.repeat_interleave(cg.heads // cg.kv_heads, dim=1).flatten(1)
    batch = make_batch(cg, 2, 6)
    torch.testing.assert_close(
        gpt.loss(pg, batch, cg, reduction="none"),
        gpt.loss(pm, batch, cm, reduction="none"),
        rtol=1e-10,
        atol=1e-12,
    )


# ----------------------------------------------------------------------------- init, DIMS


def test_init_keys_dims_dtype_and_determinism():
    c = gpt.Config(vocab=11, dim=8, heads=4, layers=2, seq=6, kv_heads=2, mlp=24)
    state = torch.random.get_rng_state()
    p = gpt.init(c, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    dims = gpt.DIMS(c)
    assert list(p) == list(dims)
    sizes = {"vocab": 11, "embed": 8, "heads": 8, "kv_heads": 4, "mlp": 24}
    for k, v in p.items():
        assert v.dtype == torch.float32 and v.device.type == "cpu", k
        assert tuple(v.shape) == tuple(sizes[d] for d in dims[k]), k
        assert gpt.DIMS[k] == dims[k]
    again = gpt.init(c, seed=3)
    assert all(torch.equal(p[k], again[k]) for k in p)
    other = gpt.init(c, seed=4)
    assert not torch.equal(p["wte"], other["wte"])


def test_dims_resolves_any_layer_and_rejects_unknown_keys():
    assert gpt.DIMS["layers.11.wo"] == ("heads", "embed")
    assert "layers.2.w_up" in gpt.DIMS and "layers.2.bias" not in gpt.DIMS
    assert list(gpt.DIMS) == list(gpt.DIMS(gpt.Config(11, 8, 2, 1, 6)))
    with pytest.raises(KeyError, match="layers.<i>.<name>"):
        gpt.DIMS["layers.0.bias"]
    with pytest.raises(KeyError, match="not a GPT parameter"):
        gpt.DIMS["lm_head"]


# ----------------------------------------------------------------------------- dropout


def test_dropout_is_off_when_not_training_and_seeded_when_training():
    c0 = gpt.Config(vocab=11, dim=8, heads=2, layers=1, seq=6)
    c1 = gpt.Config(vocab=11, dim=8, heads=2, layers=1, seq=6, dropout=0.3)
    p = {k: v.to(F64) for k, v in gpt.init(c0).items()}
    batch = make_batch(c0, 2, 6)
    plain = gpt.loss(p, batch, c0)
    torch.testing.assert_close(gpt.loss(p, batch, c1, training=False), plain, rtol=0, atol=0)
    torch.manual_seed(7)
    a = gpt.loss(p, batch, c1)
    torch.manual_seed(7)
    b = gpt.loss(p, batch, c1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, plain)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dim=10, heads=3), r"dim=10 is not divisible by heads=3"),
        (dict(dim=12, heads=4, kv_heads=3), r"heads=4 is not divisible by kv_heads=3"),
        (dict(dim=10, heads=2), r"head_dim = dim // heads = 5 is odd"),
        (dict(dim=0), r"dim=0, mlp=0: every size must be a positive int"),
        (dict(layers=1.5), r"layers=1.5"),
        (dict(dropout=1.0), r"dropout=1.0 must be a probability"),
    ],
)
def test_config_validation(kwargs, match):
    base = dict(vocab=11, dim=8, heads=2, layers=1, seq=6)
    with pytest.raises(sl.LayoutError, match=match):
        gpt.Config(**(base | kwargs))


def test_config_defaults_and_errors_name_fixes():
    c = gpt.Config(vocab=11, dim=8, heads=4, layers=1, seq=6)
    assert (c.kv_heads, c.mlp, c.head_dim, c.dropout) == (4, 32, 2, 0.0)
    assert c == gpt.Config(vocab=11, dim=8, heads=4, layers=1, seq=6, kv_heads=4, mlp=32)
    with pytest.raises(ValueError, match=r"pick heads from \[1, 2, 5, 10\]"):
        gpt.Config(vocab=11, dim=10, heads=3, layers=1, seq=6)
    with pytest.raises(ValueError, match=r"pick kv_heads from \[1, 2, 4\]"):
        gpt.Config(vocab=11, dim=8, heads=4, layers=1, seq=6, kv_heads=3)


def test_bad_batch_and_params_raise():
    c = gpt.Config(vocab=11, dim=8, heads=2, layers=2, seq=6)
    p = gpt.init(c)
    batch = make_batch(c, 2, 6)
    with pytest.raises(sl.ShardlibError, match=r"batch lacks \['targets'\]"):
        gpt.loss(p, {"tokens": batch["tokens"]}, c)
    long = make_batch(c, 2, 7)
    with pytest.raises(ValueError, match=r"seq <= config.seq = 6"):
        gpt.loss(p, long, c)
    with pytest.raises(sl.ShardlibError, match=r"params lack \['layers.1.attn_norm'"):
        gpt.loss({k: v for k, v in p.items() if not k.startswith("layers.1")}, batch, c)
    with pytest.raises(sl.ShardlibError, match=r"reduction='avg'"):
        gpt.loss(p, batch, c, reduction="avg")
