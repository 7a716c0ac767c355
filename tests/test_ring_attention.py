"""Ring attention (`shardlib.nn._ring`): token orders, values, gradients, ledger bytes, balance.

Covers `token_order` (zigzag / stripe / None permutations, checked against the
chunk assignment they promise, and their errors), and `ring_attention` on
simulated meshes: values and gradients of q, k, v equal unsharded float64
`F.scaled_dot_product_attention` on the original token order (1e-10), causal
and not, every token order, grouped-query attention, P = 2, 3, 4, with batch
or heads also split over a second mesh axis, positions passed plain, sharded
or per batch row; the ledger (only ppermutes; forward and backward bytes as
closed-form formulas written here); the zigzag balance (per-device computed
block pairs equal, against a closed form); sequence lengths P does not divide
(padded, the padding visible in the bytes); bad input errors. One small gloo
test (`dist` marker) checks the same on 4 real ranks, sim == real ledger.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib import LayoutError
from shardlib.nn._ring import count_blocks, ring_attention, token_order

F64 = torch.float64


# == helpers ===================================================================
def _rand(shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _reference(q0, k0, v0, do0, causal, scale=None):
    """Unsharded float64 SDPA on the original order: output and grads of q, k, v."""
    q0, k0, v0 = (t.detach().to(F64).requires_grad_() for t in (q0, k0, v0))
    rep = q0.shape[1] // k0.shape[1]
    k_, v_ = k0.repeat_interleave(rep, 1), v0.repeat_interleave(rep, 1)  # GQA: head h -> h//rep
    out = F.scaled_dot_product_attention(q0, k_, v_, is_causal=causal, scale=scale)
    grads = torch.autograd.grad(out, (q0, k0, v0), do0.to(F64))
    return out.detach(), grads


def _run(mesh, layout, q0, k0, v0, do0, *, axis, causal, perm, positions="plain", scale=None):
    """Ring attention on the reordered tensors; results mapped back to the original order."""
    q, k, v, do = (t[:, :, perm] for t in (q0, k0, v0, do0))
    qs, ks, vs = (sl.shard(t, mesh, layout).requires_grad_() for t in (q, k, v))
    b, n = q.shape[0], q.shape[2]
    if positions == "plain":
        pos = perm.clone()
    elif positions == "sharded":
        pos = sl.shard(perm.clone(), mesh, sl.P(axis))
    elif positions == "batch":  # (batch, seq), sharded like q's batch and seq dims
        pos = sl.shard(perm.expand(b, n).clone(), mesh, sl.P(layout.dims[0], axis))
    else:
        pos = None
    with sl.comm_ledger() as led:
        out = ring_attention(qs, ks, vs, axis=axis, causal=causal, positions=pos, scale=scale)
        grads = torch.autograd.grad(out, (qs, ks, vs), sl.shard(do, mesh, layout))
    inv = perm.argsort()
    assert out.spec == layout and out.dtype == q.dtype
    assert [g.spec for g in grads] == [layout] * 3
    return out.full()[:, :, inv], [g.full()[:, :, inv] for g in grads], led


def _close(got, want, tol=1e-10):
    torch.testing.assert_close(got.to(F64), want, rtol=tol, atol=tol)


def _check(mesh, layout, shape_q, shape_kv, *, axis, causal, balance, positions="plain", seed=0):
    q0, k0, v0 = _rand(shape_q, seed), _rand(shape_kv, seed + 1), _rand(shape_kv, seed + 2)
    do0 = _rand(shape_q, seed + 3)
    perm = token_order(shape_q[2], mesh.axes[axis], balance)
    out, grads, led = _run(
        mesh, layout, q0, k0, v0, do0, axis=axis, causal=causal, perm=perm, positions=positions
    )
    ref, ref_grads = _reference(q0, k0, v0, do0, causal)
    _close(out, ref)
    for g, r in zip(grads, ref_grads):
        _close(g, r)
    assert {r.kind for r in led.records} == {"ppermute"}
    return led


# == token_order ===============================================================
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_token_order_assigns_the_promised_tokens(size):
    n = 4 * size * 3
    blk = n // size
    for balance in ("zigzag", "stripe", None):
        perm = token_order(n, size, balance)
        assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(n))
        for i, t in enumerate(perm.tolist()):
            r = i // blk  # the device slot i lands on when the reordered seq is split evenly
            if balance == "zigzag":
                c = n // (2 * size)
                assert t // c in (r, 2 * size - 1 - r)
            elif balance == "stripe":
                assert t % size == r
            else:
                assert t == i
        # within a device, original order is kept
        for r in range(size):
            chunk = perm[r * blk : (r + 1) * blk].tolist()
            assert chunk == sorted(chunk)


def test_token_order_errors():
    with pytest.raises(LayoutError, match=r"'zigzag'.*'stripe'.*None"):
        token_order(8, 2, "zig")
    with pytest.raises(LayoutError, match="Pad the sequence to 12"):
        token_order(10, 2, "zigzag")
    with pytest.raises(LayoutError, match="Pad the sequence to 9"):
        token_order(7, 3, "stripe")
    with pytest.raises(LayoutError, match="size must be an int >= 1"):
        token_order(8, 0, None)
    assert token_order(7, 3, None).tolist() == list(range(7))


# == values and gradients ======================================================
@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("balance", ["zigzag", "stripe", None])
def test_matches_sdpa(p, causal, balance):
    mesh = sl.Mesh.simulated({"cp": p})
    layout = sl.P(None, None, "cp", None)
    _check(mesh, layout, (2, 2, 4 * p, 4), (2, 2, 4 * p, 4), axis="cp", causal=causal,
           balance=balance)  # fmt: skip


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("positions", ["sharded", "batch", "plain"])
def test_grouped_query_with_positions(p, positions):
    mesh = sl.Mesh.simulated({"cp": p})
    layout = sl.P(None, None, "cp", None)
    led = _check(mesh, layout, (2, 6, 4 * p, 4), (2, 2, 4 * p, 4), axis="cp", causal=True,
                 balance="zigzag", positions=positions)  # fmt: skip
    int_records = [r for r in led.records if r.dtype == "int64"]
    if positions == "plain":  # a replicated constant: every device slices it, no traffic
        assert not int_records
    else:  # the K block's positions travel with it, forward only: P-1 sends of b_pos*s/P int64
        b_pos = 2 if positions == "batch" else 1
        assert len(int_records) == p - 1
        assert all(r.direction == "forward" for r in int_records)
        assert sum(r.bytes for r in int_records) == (p - 1) * b_pos * 4 * 8


@pytest.mark.parametrize(
    ("axes", "layout", "shape_q", "shape_kv"),
    [
        ({"dp": 2, "cp": 3}, sl.P("dp", None, "cp", None), (4, 2, 12, 4), (4, 2, 12, 4)),
        ({"cp": 2, "tp": 2}, sl.P(None, "tp", "cp", None), (2, 4, 8, 4), (2, 2, 8, 4)),
        ({"tp": 2, "cp": 4}, sl.P(None, "tp", "cp", None), (1, 4, 16, 4), (1, 4, 16, 4)),
        ({"dp": 3, "cp": 2}, sl.P("dp", None, "cp", None), (2, 2, 8, 4), (2, 2, 8, 4)),  # uneven b
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_second_axis_split(axes, layout, shape_q, shape_kv, causal):
    mesh = sl.Mesh.simulated(axes)
    _check(mesh, layout, shape_q, shape_kv, axis="cp", causal=causal, balance="zigzag",
           positions="sharded" if causal else None)  # fmt: skip


def test_dtype_scale_and_value_head_dim():
    """float32 in, float32 out (fp32 compute); an explicit scale; v's head_dim differs from q's."""
    mesh = sl.Mesh.simulated({"cp": 2})
    layout = sl.P(None, None, "cp", None)
    q0, k0 = _rand((1, 2, 8, 4), 0, torch.float32), _rand((1, 2, 8, 4), 1, torch.float32)
    v0, do0 = _rand((1, 2, 8, 6), 2, torch.float32), _rand((1, 2, 8, 6), 3, torch.float32)
    perm = token_order(8, 2, "zigzag")
    out, grads, _ = _run(mesh, layout, q0, k0, v0, do0, axis="cp", causal=True, perm=perm,
                         scale=0.3)  # fmt: skip
    ref, ref_grads = _reference(q0, k0, v0, do0, True, scale=0.3)
    assert out.dtype == torch.float32
    _close(out, ref, 1e-5)
    for g, r in zip(grads, ref_grads):
        _close(g, r, 1e-5)


def test_bfloat16_sends_gradients_in_float32():
    """bf16 in and out; K and V travel in bf16, dK and dV (fp32 accumulators) in float32."""
    mesh = sl.Mesh.simulated({"cp": 2})
    layout = sl.P(None, None, "cp", None)
    q0, k0, v0, do0 = (_rand((1, 2, 8, 4), i, torch.bfloat16) for i in range(4))
    perm = token_order(8, 2, "zigzag")
    out, grads, led = _run(mesh, layout, q0, k0, v0, do0, axis="cp", causal=True, perm=perm)
    ref, ref_grads = _reference(q0, k0, v0, do0, True)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    _close(out, ref, 2e-2)
    for g, r in zip(grads, ref_grads):
        _close(g, r, 5e-2)
    block = 1 * 2 * 4 * 4  # elements of one local K block
    assert sorted((r.direction, r.dtype, r.bytes) for r in led.records) == sorted(
        [("forward", "bfloat16", block * 2)] * 2
        + [("backward", "bfloat16", block * 2)] * 2
        + [("backward", "float32", block * 4)] * 4
    )


def test_only_q_needs_grad_skips_the_dk_dv_ring():
    mesh = sl.Mesh.simulated({"cp": 3})
    layout = sl.P(None, None, "cp", None)
    q0, k0, v0, do0 = (_rand((1, 2, 6, 4), i) for i in range(4))
    qs = sl.shard(q0, mesh, layout).requires_grad_()
    ks, vs = sl.shard(k0, mesh, layout), sl.shard(v0, mesh, layout)
    with sl.comm_ledger() as led:
        out = ring_attention(qs, ks, vs, axis="cp", causal=True)
        (dq,) = torch.autograd.grad(out, qs, sl.shard(do0, mesh, layout))
    _close(dq.full(), _reference(q0, k0, v0, do0, True)[1][0])
    assert led.count("ppermute", "backward") == 2 * (3 - 1)  # K and V only: no dK, dV


# == ledger ====================================================================
@pytest.mark.parametrize(
    ("axes", "layout", "dtype"),
    [
        ({"cp": 4}, sl.P(None, None, "cp", None), F64),
        ({"cp": 3}, sl.P(None, None, "cp", None), torch.float32),
        ({"dp": 2, "cp": 2}, sl.P("dp", None, "cp", None), F64),
        ({"tp": 2, "cp": 2}, sl.P(None, "tp", "cp", None), torch.float32),
    ],
)
def test_ledger_bytes(axes, layout, dtype):
    """Forward 2(P-1)/P*b*s*H_kv*d*elem per device; backward the same + P sends of dK and dV."""
    mesh = sl.Mesh.simulated(axes)
    p = axes["cp"]
    b, h, hkv, s, d = 2, 4, 2, 6 * p, 4
    q0, k0, v0, do0 = (_rand((b, hh, s, d), i, dtype) for i, hh in enumerate((h, hkv, hkv, h)))
    perm = token_order(s, p, "zigzag")
    _, _, led = _run(mesh, layout, q0, k0, v0, do0, axis="cp", causal=True, perm=perm)
    elem = torch.empty((), dtype=dtype).element_size()
    b_loc = b // axes.get("dp", 1)  # batch split over dp: each device holds b/dp rows
    hkv_loc = hkv // axes.get("tp", 1)  # kv heads split over tp
    kv_block = b_loc * (s // p) * hkv_loc * d * elem  # one K (or V) block, local
    assert {(r.kind, r.axes) for r in led.records} == {("ppermute", ("cp",))}
    fwd = [r for r in led.records if r.direction == "forward"]
    bwd = [r for r in led.records if r.direction == "backward"]
    assert len(fwd) == 2 * (p - 1)
    assert sum(r.bytes for r in fwd) == 2 * (p - 1) * kv_block  # = 2(P-1)/P * b s H_kv d elem
    assert len(bwd) == 2 * (p - 1) + 2 * p
    assert sum(r.bytes for r in bwd) == 2 * (p - 1) * kv_block + 2 * p * kv_block


def test_uneven_sequence_is_padded():
    """n = 10 over P = 4: blocks 3,3,3,1 padded to 3; values right, bytes of the padded blocks."""
    mesh = sl.Mesh.simulated({"cp": 4})
    layout = sl.P(None, None, "cp", None)
    b, h, n, d, p = 2, 2, 10, 4, 4
    for causal in (False, True):
        led = _check(mesh, layout, (b, h, n, d), (b, h, n, d), axis="cp", causal=causal,
                     balance=None, positions=None)  # fmt: skip
        padded_block = b * h * -(-n // p) * d * 8  # ceil(n/P) rows per device, not n/P
        fwd = [r for r in led.records if r.direction == "forward"]
        assert sum(r.bytes for r in fwd) == 2 * (p - 1) * padded_block
        assert 2 * (p - 1) * padded_block > 2 * (p - 1) / p * b * n * h * d * 8
    # sharded positions travel padded too
    led = _check(mesh, layout, (b, h, n, d), (b, h, n, d), axis="cp", causal=True, balance=None,
                 positions="batch")  # fmt: skip
    ints = [r for r in led.records if r.dtype == "int64"]
    assert sum(r.bytes for r in ints) == (p - 1) * b * -(-n // p) * 8
    # fewer tokens than devices: some devices hold only padding
    _check(mesh, layout, (1, 2, 3, 4), (1, 2, 3, 4), axis="cp", causal=True, balance=None,
           positions=None)  # fmt: skip


# == balance ===================================================================
@pytest.mark.parametrize("p", [2, 3, 4])
def test_zigzag_balances_causal_work(p):
    """Zigzag: every device computes 2P+1 of its 4P (query half, key half) pairs, both passes.

    A half-block of a zigzag device is one of its chunks r, 2P-1-r; a chunk pair (a, c) is
    needed iff c <= a, so device r needs (r+1) + (2P-r) = 2P+1 pairs. Contiguous order gives
    device r 4r + 3 (all four halves of each earlier block, three of its own).
    """
    mesh = sl.Mesh.simulated({"cp": p})
    layout = sl.P(None, None, "cp", None)
    n = 4 * p
    x = _rand((1, 2, n, 4), 0)
    per = {}
    for balance in ("zigzag", "stripe", None):
        perm = token_order(n, p, balance)
        xs = sl.shard(x[:, :, perm], mesh, layout).requires_grad_()
        with count_blocks() as c:
            out = ring_attention(xs, xs, xs, axis="cp", causal=True, positions=perm)
            out.sum().backward()
        per[balance] = (c.per_device("forward"), c.per_device("backward"))
    for fwd, bwd in (per["zigzag"], per["stripe"]):
        assert fwd == bwd
        assert max(fwd.values()) - min(fwd.values()) <= 1  # within one block's worth
    assert per["zigzag"][0] == {r: 2 * p + 1 for r in range(p)}
    assert per["stripe"][0] == {r: 3 * p for r in range(p)}  # (first half, second half) never
    assert per[None][0] == {r: 4 * r + 3 for r in range(p)}  # the imbalance zigzag removes


def test_non_causal_computes_every_pair():
    mesh = sl.Mesh.simulated({"cp": 3})
    xs = sl.shard(_rand((1, 1, 12, 4), 0), mesh, sl.P(None, None, "cp", None))
    with count_blocks() as c:
        ring_attention(xs, xs, xs, axis="cp")
    assert c.per_device("forward") == {r: 4 * 3 for r in range(3)}
    assert c.per_device("forward", "elements") == {r: 4 * 4 * 3 for r in range(3)}


# == errors ====================================================================
def test_bad_input_errors():
    mesh = sl.Mesh.simulated({"cp": 2, "tp": 2})
    L = sl.P(None, None, "cp", None)
    x = sl.shard(_rand((2, 4, 8, 4), 0), mesh, L)
    with pytest.raises(LayoutError, match="expected a ShardedTensor"):
        ring_attention(x.full(), x, x, axis="cp")
    with pytest.raises(LayoutError, match="not a mesh axis"):
        ring_attention(x, x, x, axis="sp")
    wrong = sl.shard(_rand((2, 4, 8, 4), 0), mesh, sl.P(None, None, None, "cp"))
    with pytest.raises(LayoutError, match=r"seq dim \(2\) must be split over 'cp'.*sl\.reshard"):
        ring_attention(wrong, x, x, axis="cp")
    kv = sl.shard(_rand((2, 3, 8, 4), 0), mesh, L)
    with pytest.raises(LayoutError, match="not a multiple of kv_heads 3"):
        ring_attention(x, kv, kv, axis="cp")
    q_tp = sl.shard(_rand((2, 4, 8, 4), 0), mesh, sl.P(None, "tp", "cp", None))
    kv1 = sl.shard(_rand((2, 1, 8, 4), 0), mesh, sl.P(None, "tp", "cp", None))
    with pytest.raises(LayoutError, match="divisible by 2 so each device holds whole"):
        ring_attention(q_tp, kv1, kv1, axis="cp")
    with pytest.raises(LayoutError, match="split batch and heads differently"):
        ring_attention(q_tp, x, x, axis="cp")
    with pytest.raises(LayoutError, match=r"positions of shape \(8,\) or \(2, 8\)"):
        ring_attention(x, x, x, axis="cp", causal=True, positions=torch.arange(7))
    with pytest.raises(LayoutError, match="integer global token positions"):
        ring_attention(x, x, x, axis="cp", causal=True, positions=torch.zeros(8))


# == real processes ============================================================
def _gloo_program(mesh):
    """On a {'dp': 2, 'cp': 2} mesh: zigzag causal GQA ring attention, float32."""
    layout = sl.P("dp", None, "cp", None)
    q0, k0, v0, do0 = (_rand((2, hh, 8, 4), i, torch.float32) for i, hh in enumerate((4, 2, 2, 4)))
    perm = token_order(8, 2, "zigzag")
    out, grads, led = _run(mesh, layout, q0, k0, v0, do0, axis="cp", causal=True, perm=perm,
                           positions="batch")  # fmt: skip
    recs = [(r.kind, r.axes, r.bytes, r.dtype, r.direction) for r in led.records]
    return out, grads, recs


@pytest.mark.dist
def test_gloo_matches_sdpa_and_simulated(workers4):
    axes = {"dp": 2, "cp": 2}
    results = workers4.run(_gloo_program, axes)
    sim_out, sim_grads, sim_recs = _gloo_program(sl.Mesh.simulated(axes))
    q0, k0, v0, do0 = (_rand((2, hh, 8, 4), i, torch.float32) for i, hh in enumerate((4, 2, 2, 4)))
    ref, ref_grads = _reference(q0, k0, v0, do0, True)
    assert len(results) == 4
    for out, grads, recs in results:
        assert recs == sim_recs
        assert {r[0] for r in recs} == {"ppermute"}
        _close(out, ref, 1e-5)
        torch.testing.assert_close(out, sim_out, rtol=1e-6, atol=1e-6)
        for g, r, s in zip(grads, ref_grads, sim_grads):
            _close(g, r, 1e-5)
            torch.testing.assert_close(g, s, rtol=1e-6, atol=1e-6)
