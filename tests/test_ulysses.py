"""Ulysses (heads-split) attention in the SDPA rule (`shardlib/ops/_attention.py`).

Covers, on simulated meshes {dp: 2, x: P} (batch split over dp, the sequence
over x):

- the pinned round trip `snn.attention` does under `snn.ulysses`: q, k, v
  `sl.with_layout`-ed from sequence-split to heads-split, SDPA, the output
  pinned back to sequence-split. Forward ledger: exactly four all-to-alls, no
  all-gather, bytes (P-1)/P^2 * (b/dp)*s*d*(2H + 2H_kv) * elem (the closed form
  of DESIGN §8's Ulysses row, written here); backward: the same four. Values and
  gradients equal unsharded float64 torch at 1e-10, causal and not, plain
  multi-head and grouped-query (`enable_gqa=True`), P = 2 and 4, with an
  attention mask too;
- head counts |A| does not divide: uneven multi-head chunks run, the padding to
  the largest chunk is in the ledger bytes (ceil formula); grouped-query chunks
  that line up unevenly (10 heads, 5 kv heads on 3) run; a sweep over heads,
  kv_heads and P: a pinned heads-split layout either gives the unsharded
  result or raises the LayoutError that names heads, kv_heads, the axis size
  and the fixes, and it raises exactly when torch.chunk's query-head chunks are
  not g times its kv-head chunks (never a silent wrong grouping);
- automatic choice for sequence-split inputs (no pins): the heads-split
  candidate is taken exactly when its moves plus the outputs' moves back cost
  less than gathering K/V, per closed-form byte counts in the test; values and
  gradients exact either way;
- misaligned grouped-query inputs split on the sequence fall back to gathering
  K/V (no all-to-all), still exact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl

P = sl.P
TOL = {"rtol": 1e-10, "atol": 1e-10}
SEQ = P("dp", None, "x", None)
HEADS = P("dp", "x", None, None)
ELEM = 8  # float64


def _randn(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _inputs(b, h, h_kv, s, d):
    return _randn((b, h, s, d), 0), _randn((b, h_kv, s, d), 1), _randn((b, h_kv, s, d), 2)


def _pinned(mesh, q, k, v, **kw):
    """The Ulysses round trip on sequence-split sharded leaves; returns (leaves, output)."""
    leaves = [sl.shard(t, mesh, SEQ).requires_grad_() for t in (q, k, v)]
    moved = [sl.with_layout(t, HEADS) for t in leaves]
    y = F.scaled_dot_product_attention(*moved, enable_gqa=q.shape[1] != k.shape[1], **kw)
    return leaves, sl.with_layout(y, SEQ)


def _reference(q, k, v, go, **kw):
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*ref, enable_gqa=q.shape[1] != k.shape[1], **kw)
    return want, torch.autograd.grad(want, ref, go)


def _a2a_bytes(p, b_local, heads, s, d):
    """One seq <-> heads all-to-all over p devices: (p-1) * the largest piece (ceil chunks)."""
    return (p - 1) * b_local * math.ceil(heads / p) * math.ceil(s / p) * d * ELEM


def _split(records, direction):
    return [r for r in records if r.direction == direction]


# == the pinned round trip =====================================================
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "p,heads,kv_heads",
    [(2, 4, 4), (2, 8, 4), (2, 8, 2), (4, 4, 4), (4, 8, 4), (4, 16, 4)],
    ids=["P2-mha", "P2-gqa2", "P2-gqa4", "P4-mha", "P4-gqa2", "P4-gqa4"],
)
def test_pinned_ulysses_is_four_all_to_alls_each_way(p, causal, heads, kv_heads):
    mesh = sl.Mesh.simulated({"dp": 2, "x": p})
    b, s, d = 4, 8, 3
    q, k, v = _inputs(b, heads, kv_heads, s, d)
    go = _randn(q.shape, 3)
    with sl.comm_ledger() as led:
        leaves, y = _pinned(mesh, q, k, v, is_causal=causal)
        grads = torch.autograd.grad(y, leaves, sl.shard(go, mesh, SEQ))
    # DESIGN §8, Ulysses row: (P-1)/P^2 * b*s*d*(2H + 2H_kv) elements per device (b per dp group).
    formula = (p - 1) * (b // 2) * s * d * (2 * heads + 2 * kv_heads) * ELEM // p**2
    for direction in ("forward", "backward"):
        recs = _split(led.records, direction)
        assert [r.kind for r in recs] == ["all_to_all"] * 4, (direction, recs)
        assert all(r.axes == ("x",) and r.group_size == p for r in recs)
        assert sum(r.bytes for r in recs) == formula, direction
    assert led.total_bytes == 2 * formula
    want, wants = _reference(q, k, v, go, is_causal=causal)
    assert y.spec == SEQ
    torch.testing.assert_close(y.full(), want, **TOL)
    for got, w, name in zip(grads, wants, "qkv"):
        assert got.spec == SEQ, name
        torch.testing.assert_close(got.full(), w, **TOL, msg=f"d{name}")


def test_pinned_ulysses_with_an_attention_mask():
    """A (B, H, L, S) boolean mask, replicated: cut for free like the heads-split query."""
    mesh = sl.Mesh.simulated({"dp": 2, "x": 2})
    q, k, v = _inputs(2, 4, 2, 6, 3)
    mask = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[..., 0] = True
    go = _randn(q.shape, 5)
    masks = sl.shard(mask, mesh, P(None, None, None, None))
    with sl.comm_ledger() as led:
        leaves, y = _pinned(mesh, q, k, v, attn_mask=masks)
        grads = torch.autograd.grad(y, leaves, sl.shard(go, mesh, SEQ))
    assert {r.kind for r in led.records} == {"all_to_all"} and len(led.records) == 8
    want, wants = _reference(q, k, v, go, attn_mask=mask)
    torch.testing.assert_close(y.full(), want, **TOL)
    for got, w in zip(grads, wants):
        torch.testing.assert_close(got.full(), w, **TOL)


# == heads a mesh size does not divide =========================================
@pytest.mark.parametrize(
    "heads,kv_heads,p,s",
    [(3, 3, 2, 6), (5, 5, 4, 7), (10, 5, 3, 6)],
    ids=["3/2", "5/4", "gqa10-5/3"],
)
def test_uneven_heads_are_padded_in_the_ledger(heads, kv_heads, p, s):
    mesh = sl.Mesh.simulated({"dp": 2, "x": p})
    b, d = 2, 2
    q, k, v = _inputs(b, heads, kv_heads, s, d)
    go = _randn(q.shape, 6)
    with sl.comm_ledger() as led:
        leaves, y = _pinned(mesh, q, k, v, is_causal=True)
        grads = torch.autograd.grad(y, leaves, sl.shard(go, mesh, SEQ))
    padded = 2 * _a2a_bytes(p, b // 2, heads, s, d) + 2 * _a2a_bytes(p, b // 2, kv_heads, s, d)
    for direction in ("forward", "backward"):
        recs = _split(led.records, direction)
        assert [r.kind for r in recs] == ["all_to_all"] * 4, (direction, recs)
        assert sum(r.bytes for r in recs) == padded, direction
    want, wants = _reference(q, k, v, go, is_causal=True)
    torch.testing.assert_close(y.full(), want, **TOL)
    for got, w in zip(grads, wants):
        torch.testing.assert_close(got.full(), w, **TOL)


def _chunks(n, p):
    """torch.chunk's pieces of range(n) into p, padded with empty pieces to exactly p."""
    pieces = [c.tolist() for c in torch.arange(n).chunk(p)]
    return pieces + [[]] * (p - len(pieces))


def _lined_up(heads, kv_heads, p):
    """Every device's query heads read exactly its own kv heads, g query heads per kv head."""
    g = heads // kv_heads
    return all(
        qc == [g * j + i for j in kc for i in range(g)]
        for qc, kc in zip(_chunks(heads, p), _chunks(kv_heads, p))
    )


@pytest.mark.parametrize("p", [2, 3, 4])
def test_heads_split_is_exact_or_raises_naming_the_fix(p):
    mesh = sl.Mesh.simulated({"dp": 2, "x": p})
    seen = set()
    for kv_heads in (1, 2, 3, 4, 5):
        for g in (1, 2, 3):
            heads = g * kv_heads
            q, k, v = _inputs(2, heads, kv_heads, 4, 2)
            go = _randn(q.shape, 7)
            case = f"heads={heads} kv_heads={kv_heads} P={p}"
            if _lined_up(heads, kv_heads, p):
                seen.add("ran")
                with sl.comm_ledger() as led:
                    leaves, y = _pinned(mesh, q, k, v, is_causal=True)
                    grads = torch.autograd.grad(y, leaves, sl.shard(go, mesh, SEQ))
                assert {r.kind for r in led.records} == {"all_to_all"}, case
                want, wants = _reference(q, k, v, go, is_causal=True)
                torch.testing.assert_close(y.full(), want, **TOL, msg=case)
                for got, w in zip(grads, wants):
                    torch.testing.assert_close(got.full(), w, **TOL, msg=case)
            else:
                seen.add("raised")
                with pytest.raises(sl.LayoutError) as err:
                    _pinned(mesh, q, k, v, is_causal=True)
                msg = str(err.value)
                for part in (f"heads={heads}", f"kv_heads={kv_heads}", f"(size {p})", "ring"):
                    assert part in msg, (case, part, msg)
                assert "pad" in msg and "divid" in msg, msg
    assert seen == {"ran", "raised"}


def test_misaligned_sequence_split_gathers_kv_and_stays_exact():
    """6 heads / 3 kv heads on 2 devices can't be heads-split: no all-to-all is offered."""
    mesh = sl.Mesh.simulated({"dp": 2, "x": 2})
    q, k, v = _inputs(2, 6, 3, 6, 2)
    with sl.comm_ledger() as led:
        y = F.scaled_dot_product_attention(
            *(sl.shard(t, mesh, SEQ) for t in (q, k, v)), is_causal=True, enable_gqa=True
        )
    assert sorted(r.kind for r in led.records) == ["all_gather", "all_gather"]
    assert y.spec == SEQ
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(y.full(), want, **TOL)


# == automatic choice for sequence-split inputs ================================
@pytest.mark.parametrize(
    "p,heads,kv_heads", [(2, 4, 4), (4, 4, 4), (4, 8, 4), (4, 8, 2), (4, 16, 4)]
)
def test_auto_takes_heads_split_exactly_when_the_round_trip_is_cheaper(p, heads, kv_heads):
    mesh = sl.Mesh.simulated({"dp": 2, "x": p})
    b, s, d = 4, 8, 2
    bl = b // 2
    q, k, v = _inputs(b, heads, kv_heads, s, d)
    # Heads-split: q, k, v in, out and logsumexp (b, H, L) back, each one all-to-all.
    lse = (p - 1) * bl * (heads // p) * (s // p) * ELEM
    ulysses = 2 * _a2a_bytes(p, bl, heads, s, d) + 2 * _a2a_bytes(p, bl, kv_heads, s, d) + lse
    gather = 2 * (p - 1) * bl * kv_heads * (s // p) * d * ELEM  # all-gather of K and V
    leaves = [sl.shard(t, mesh, SEQ).requires_grad_() for t in (q, k, v)]
    with sl.comm_ledger() as led:
        y = F.scaled_dot_product_attention(*leaves, enable_gqa=heads != kv_heads)
    kinds = sorted(r.kind for r in led.records)
    if ulysses < gather:
        assert kinds == ["all_to_all"] * 3 and y.spec == HEADS
    else:
        assert kinds == ["all_gather"] * 2 and y.spec == SEQ
    go = _randn(q.shape, 8)
    grads = torch.autograd.grad(y, leaves, sl.shard(go, mesh, y.spec))
    want, wants = _reference(q, k, v, go)
    torch.testing.assert_close(y.full(), want, **TOL)
    for got, w in zip(grads, wants):
        torch.testing.assert_close(got.full(), w, **TOL)
