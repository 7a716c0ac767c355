"""Mixed precision (issue 8 Deliver 3, DESIGN §9): `sl.reshard(dtype=)`, master weights,
gradient accumulation, dynamic loss scaling.

- `sl.reshard(x, layout, dtype=torch.bfloat16)` casts each block before it moves: the
  values are ``x.full().to(bf16)`` bitwise, the ledger's bytes are the bf16 ones (the ring
  formula, half of fp32's), the gradient comes back in x's dtype and equals the float64
  reference within bf16 tolerance, `remat` re-gathers in bf16, ``layout == x.spec`` only
  casts, a partial source is summed in bf16, float -> int of a partial raises.
- `sl.optim.master_weights(adamw)`: bf16 params with float32 masters; after several steps
  the masters equal plain float32 AdamW bitwise (and torch.optim.AdamW at float32
  tolerance) and the params equal the masters cast, bitwise. The float64 updates make
  ``apply_updates`` exact on values of every magnitude (a float32 update can't: shown).
- Under ZeRO-1 (dp=4) the fp32 masters are split over dp, the step moves bf16 only
  (reduce-scatter, all-gather), and the masters equal stage 0's bitwise.
- A bf16 GPT (`shardlib.nn.gpt`) trained under dp+tp1d with master weights follows the fp32
  run's losses (rel 2e-2); fp32 params fed to compute by ``reshard(dtype=bf16)`` give the
  fp32 loss at that tolerance and float32 gradients.
- Accumulation over 4 micro-batches on ``snn.dp("dp")`` (dp=4, float64): no collective
  during the micro-batches' backward, one all-reduce per gradient per step (the ring
  bytes; ``zero(0).reduce`` coalesces them into one), and the step equals the unsharded
  full-batch step at 1e-10.
- `sl.optim.dynamic_loss_scale`: its scale trajectory equals torch.amp.GradScaler's on a
  scripted sequence of finite / inf steps; finiteness is one all-reduce for a whole tree
  of mixed layouts (a partial summand's inf is seen); a non-finite step leaves params and
  state unchanged; on 4 gloo ranks an inf on one rank is seen by all (``dist``).
"""

from __future__ import annotations

import math

import pytest
import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ============================================================================ reshard(dtype=)
def test_reshard_dtype_casts_before_the_move_values_and_bytes():
    mesh = sl.Mesh.simulated({"x": 4})
    g = torch.Generator().manual_seed(0)
    full = torch.randn(8, 6, generator=g)
    x = sl.shard(full, mesh, sl.P("x", None))
    with sl.comm_ledger() as led32:
        sl.reshard(x, sl.P(None, None))
    with sl.comm_ledger() as led:
        y = sl.reshard(x, sl.P(None, None), dtype=BF16)
    assert y.dtype == BF16 and y.spec == sl.P(None, None)
    assert _bits_equal(y.full(), full.to(BF16))
    (r,) = led.records
    n = 4  # an all-gather: each device sends its block to the N-1 others (ring)
    assert (r.kind, r.dtype) == ("all_gather", "bfloat16")
    assert r.bytes == (n - 1) * (8 * 6 // n) * 2 == led32.records[0].bytes // 2


def test_reshard_dtype_uneven_shape_is_half_the_fp32_bytes():
    mesh = sl.Mesh.simulated({"x": 4})
    full = torch.randn(10, 7, generator=torch.Generator().manual_seed(1))
    x = sl.shard(full, mesh, sl.P("x", None))
    with sl.comm_ledger() as led32:
        sl.reshard(x, sl.P(None, "x"))
    with sl.comm_ledger() as led:
        y = sl.reshard(x, sl.P(None, "x"), dtype=BF16)
    assert _bits_equal(y.full(), full.to(BF16))
    assert [r.dtype for r in led.records] == ["bfloat16"] * len(led32.records)
    assert led.total_bytes * 2 == led32.total_bytes > 0


def test_reshard_dtype_same_layout_only_casts():
    mesh = sl.Mesh.simulated({"x": 2})
    full = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    x = sl.shard(full, mesh, sl.P("x", None))
    with sl.comm_ledger() as led:
        y = sl.reshard(x, x.spec, dtype=BF16)
    assert led.records == [] and y.spec == x.spec
    assert all(_bits_equal(a, b.to(BF16)) for a, b in zip(y.local_shards(), x.local_shards()))


def test_reshard_dtype_backward_returns_source_dtype_near_float64_reference():
    """dW of x @ W with W fp32 gathered as bf16 (remat) and x bf16 split by rows: the
    cotangent of W is partial, reduce-scattered in bf16, then cast to fp32.

    Tolerance: the inputs, dY and the reduced gradient are each rounded to bf16 once
    (relative 2**-9 each) and the local products accumulate in bf16: rtol = atol = 2**-5
    on values of order 1 (the float64 reference uses the unrounded inputs)."""
    mesh = sl.Mesh.simulated({"x": 4})
    g = torch.Generator().manual_seed(3)
    xf, wf, dyf = (
        torch.randn(8, 6, generator=g),
        torch.randn(6, 4, generator=g),
        torch.randn(8, 4, generator=g),
    )
    x = sl.shard(xf, mesh, sl.P("x", None)).requires_grad_()
    w = sl.shard(wf, mesh, sl.P(None, "x")).requires_grad_()
    with sl.comm_ledger() as led:
        wb = sl.reshard(w, sl.P(None, None), dtype=BF16, remat=True)
        xb = sl.reshard(x, x.spec, dtype=BF16)
        out = sl.einsum("ij,jk->ik", xb, wb, out_layout=sl.P("x", None))
        (out.to(F64) * sl.shard(dyf.double(), mesh, sl.P("x", None))).sum().backward()
    assert w.grad.dtype == F32 and x.grad.dtype == F32
    assert w.grad.spec == w.spec and x.grad.spec == x.spec
    tol = 2.0**-5
    torch.testing.assert_close(
        w.grad.full().double(), xf.double().T @ dyf.double(), rtol=tol, atol=tol
    )
    torch.testing.assert_close(
        x.grad.full().double(), dyf.double() @ wf.double().T, rtol=tol, atol=tol
    )
    gather = 3 * (6 * 4 // 4) * 2  # bf16 all-gather of W (6 x 4) over 4: (N-1) blocks of 6
    assert [(r.kind, r.dtype, r.direction, r.cause, r.bytes) for r in led.records] == [
        ("all_gather", "bfloat16", "forward", "reshard", gather),
        ("all_gather", "bfloat16", "backward", "regather", gather),  # remat: again in bf16
        ("reduce_scatter", "bfloat16", "backward", "reshard", gather),  # dW, partial over x
    ]


def test_reshard_dtype_of_a_partial_sums_in_the_target_dtype():
    """Summands are cast, then all-reduced in bf16: within bf16 rounding of the exact sum
    (4 summands of order 1: each cast and each of the 3 adds rounds by 2**-9 relative)."""
    mesh = sl.Mesh.simulated({"x": 4})
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(6, generator=g) for _ in range(4)]
    x = sl.from_local(parts, mesh, sl.P(None, partial="x"), (6,))
    with sl.comm_ledger() as led:
        y = sl.reshard(x, sl.P(None), dtype=BF16)
    assert [(r.kind, r.dtype) for r in led.records] == [("all_reduce", "bfloat16")]
    exact = torch.stack([p.double() for p in parts]).sum(0)
    torch.testing.assert_close(y.full().double(), exact, rtol=0, atol=8 * 2.0**-9 * 4)
    with pytest.raises(sl.LayoutError, match=r"partial.*Reduce first"):
        sl.reshard(x, sl.P(None), dtype=torch.int32)


def test_reshard_comm_dtype_moves_in_it_and_returns_x_dtype():
    # issue 10 built comm_dtype (tests/test_compressed.py); unlike dtype=, the result keeps x's
    mesh = sl.Mesh.simulated({"x": 2})
    x = sl.shard(torch.ones(4), mesh, sl.P("x"))
    with sl.comm_ledger() as led:
        y = sl.reshard(x, sl.P(None), comm_dtype=BF16)
    assert y.dtype == torch.float32 and [(r.dtype, r.bytes) for r in led.records] == [
        ("bfloat16", 4)
    ]


# ============================================================================ master weights
def _mixed_params(mesh, dtype, seed=0):
    """Uneven shapes in several layouts plus a plain tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": ((5, 3), sl.P("dp", "tp")), "b": ((7,), sl.P("tp")), "c": ((3, 2), None)}
    out = {}
    for k, (shape, layout) in shapes.items():
        v = torch.randn(shape, generator=g).to(dtype)
        out[k] = v if layout is None else sl.shard(v, mesh, layout)
    return out


def _full(t):
    return t.full() if isinstance(t, sl.ShardedTensor) else t


def test_master_weights_adamw_masters_bitwise_fp32_params_bitwise_cast():
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    params = _mixed_params(mesh, BF16)
    ref = {k: _full(v).float() for k, v in params.items()}  # plain float32 AdamW's params
    make = lambda: sl.optim.adamw(1e-2, weight_decay=0.1)  # noqa: E731
    tx, ref_tx = sl.optim.master_weights(make()), make()
    state, ref_state = tx.init(params), ref_tx.init(ref)
    assert state.inner.mu["a"].dtype == F32 and state.master["a"].spec == params["a"].spec
    torch_p = {k: v.clone().requires_grad_() for k, v in ref.items()}
    torch_opt = torch.optim.AdamW(torch_p.values(), lr=1e-2, weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        grads_full = {k: torch.randn(v.shape, generator=g).to(BF16) for k, v in ref.items()}
        grads = {
            k: sl.shard(v, mesh, params[k].spec) if isinstance(params[k], sl.ShardedTensor) else v
            for k, v in grads_full.items()
        }
        updates, state = tx.update(grads, state, params)
        params = sl.optim.apply_updates(params, updates)
        ref_updates, ref_state = ref_tx.update(
            {k: v.float() for k, v in grads_full.items()}, ref_state, ref
        )
        ref = sl.optim.apply_updates(ref, ref_updates)
        for k, p in torch_p.items():
            p.grad = grads_full[k].float()
        torch_opt.step()
    for k in ref:
        assert _bits_equal(_full(state.master[k]), ref[k]), k
        assert _bits_equal(_full(params[k]), ref[k].to(BF16)), k
        assert params[k].dtype == BF16
        torch.testing.assert_close(ref[k], torch_p[k].detach(), rtol=1e-6, atol=1e-6)


def _exactness_values(n: int, seed: int):
    """Old params (bf16) and new masters (fp32) over many magnitudes: small steps, sign
    crossings, shrinking and growing by up to 2**40 in one step, exact zeros."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, generator=g) * torch.exp2(
        torch.randint(-40, 40, (n,), generator=g).float()
    )
    kind = torch.randint(0, 4, (n,), generator=g)
    small = old * (1 + 1e-3 * torch.randn(n, generator=g))
    across = -old * torch.rand(n, generator=g)
    scaled = (
        old
        * torch.randn(n, generator=g)
        * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float())
    )
    new = torch.where(kind == 0, small, torch.where(kind == 1, across, scaled))
    new[:16] = 0.0
    return old, new


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_master_weights_updates_apply_exactly(dtype):
    """``apply_updates(p, u) == new_master.to(p.dtype)`` bitwise on 200k elements.

    The inner transformation adds ``new - old`` to the master (sl.optim.identity), so the
    new master is whatever float32 value that gives; the check is on the cast."""
    mesh = sl.Mesh.simulated({"x": 4})
    old, new = _exactness_values(200_000, seed=11 if dtype == BF16 else 12)
    if dtype == torch.float16:  # fp16's range
        old, new = old.clamp(-6e4, 6e4), new.clamp(-6e4, 6e4)
    p = {"w": sl.shard(old.to(dtype), mesh, sl.P("x")), "v": old[:1000].to(dtype)}
    tx = sl.optim.master_weights(sl.optim.identity())
    state = tx.init(p)
    grads = {
        "w": sl.shard(new - old.to(dtype).float(), mesh, sl.P("x")),
        "v": new[:1000] - old[:1000].to(dtype).float(),
    }
    updates, state = tx.update(grads, state, p)
    out = sl.optim.apply_updates(p, updates)
    for k in p:
        want = _full(state.master[k]).to(dtype)
        got = _full(out[k])
        assert torch.equal(got, want), k  # values (-0 == +0) ...
        differ = got.view(torch.int16) != want.view(torch.int16)
        assert not differ[want != 0].any(), k  # ... and bits, but for the sign of a zero
    # where the master rounds to -0 from a nonzero param, p + u is +0 (IEEE x + -x = +0):
    # no update of any dtype gives -0, so a zero's sign is the one thing not reproduced


def test_float32_updates_cannot_be_exact_so_updates_are_float64():
    """p = 1 (bf16), new value 2**-30: 1 + u in float32 is 0 or >= 2**-24 for every float32 u
    near -1, so no float32 update gives 2**-30; master_weights' float64 update does."""
    p, new = torch.tensor([1.0], dtype=BF16), torch.tensor([2.0**-30])
    u32 = new.to(BF16).float() - p.float()
    assert sl.optim.apply_updates({"p": p}, {"p": u32})["p"].item() != 2.0**-30
    tx = sl.optim.master_weights(sl.optim.identity())
    state = tx.init({"p": p})._replace(master={"p": new})  # a master that moved to 2**-30
    updates, state = tx.update({"p": torch.zeros(1)}, state, {"p": p})
    assert updates["p"].dtype == F64
    assert (
        sl.optim.apply_updates({"p": p}, updates)["p"].item()
        == 2.0**-30
        == state.master["p"].item()
    )


def test_master_weights_split_state_layouts_and_errors():
    """Built on dp-split (ZeRO's L+dp) params, the masters are split the same way (each
    device holds 1/N); params in another layout, or no params, raise naming the fix."""
    mesh = sl.Mesh.simulated({"dp": 4})
    p = {"w": sl.shard(torch.randn(8, 3).to(BF16), mesh, sl.P("dp", None))}
    tx = sl.optim.master_weights(sl.optim.sgd(0.1))
    state = tx.init(p)
    assert [tuple(s.shape) for s in state.master["w"].local_shards()] == [(2, 3)] * 4
    assert state.master["w"].dtype == F32
    g = {"w": sl.shard(torch.ones(8, 3, dtype=BF16), mesh, sl.P("dp", None))}
    other = {"w": sl.reshard(p["w"], sl.P(None, None))}
    with pytest.raises(sl.LayoutError, match=r"master copy lives in the layout.*Fix"):
        tx.update(g, state, other)
    with pytest.raises(sl.LayoutError, match=r"needs params.*Fix"):
        tx.update(g, state)
    with pytest.raises(sl.LayoutError, match="GradientTransformation"):
        sl.optim.master_weights("adamw")


# ============================================================================ bf16 GPT
CFG = gpt.Config(vocab=12, dim=16, heads=4, layers=1, seq=8, kv_heads=2)


def _batch(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, CFG.vocab, (b, CFG.seq), generator=g),
        "targets": torch.randint(0, CFG.vocab, (b, CFG.seq), generator=g),
    }


def _finish(grads):
    """A gradient partial over dp reduced to its parameter's layout (one all-reduce each)."""
    return {k: sl.reshard(v, v.spec.without_partial()) for k, v in grads.items()}


def _train(mesh, scheme, dtype, steps):
    params = {k: v.to(dtype) for k, v in gpt.init(CFG, 0).items()}
    params = snn.shard_params(params, mesh, scheme, gpt.DIMS(CFG))
    tx = sl.optim.adamw(3e-2, weight_decay=0.0)
    if dtype != F32:
        tx = sl.optim.master_weights(tx)
    state, losses = tx.init(params), []
    for step in range(steps):
        for v in params.values():
            v.requires_grad_()
        with snn.use(scheme, mesh):
            loss = gpt.loss(params, scheme.shard_batch(_batch(step), mesh), CFG)
        loss.backward()
        losses.append(loss.full().item())
        grads = _finish({k: v.grad for k, v in params.items()})
        updates, state = tx.update(grads, state, params)
        params = sl.optim.apply_updates({k: v.detach() for k, v in params.items()}, updates)
    return losses, params, state


def test_bf16_gpt_with_master_weights_follows_fp32_run():
    """dp+tp1d on {dp: 2, tp: 2}: bf16 params and compute, fp32 masters; each of 3 steps'
    loss within rel 2e-2 of the fp32 run's (bf16 keeps 8 bits: 2**-8 = 4e-3 per rounding,
    a handful of roundings per layer); the params stay bf16 and equal the masters cast."""
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    scheme = snn.dp("dp") + snn.tp1d("tp")
    want, _, _ = _train(mesh, scheme, F32, 3)
    got, params, state = _train(mesh, scheme, BF16, 3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=0)
    for k, p in params.items():
        assert p.dtype == BF16 and p.spec == state.master[k].spec
        assert _bits_equal(p.full(), state.master[k].full().to(BF16)), k


def test_fp32_params_computed_in_bf16_via_reshard_dtype():
    """fp32 params cast to bf16 for compute by ``reshard(p, p.spec, dtype=bf16)``: the loss
    is the fp32 loss within rel 2e-2 and every gradient arrives in float32 in its
    parameter's layout (partial over dp), within 5e-2 of the fp32 gradient's scale."""
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    scheme = snn.dp("dp") + snn.tp1d("tp")
    params = snn.shard_params(gpt.init(CFG, 0), mesh, scheme, gpt.DIMS(CFG))
    batch = scheme.shard_batch(_batch(0), mesh)
    out = {}
    for dtype in (F32, BF16):
        for v in params.values():
            v.grad = None
            v.requires_grad_()
        with snn.use(scheme, mesh):
            compute = {k: sl.reshard(v, v.spec, dtype=dtype) for k, v in params.items()}
            loss = gpt.loss(compute, batch, CFG)
        loss.backward()
        out[dtype] = loss.full().item(), {k: v.grad.full() for k, v in params.items()}
        assert all(v.grad.dtype == F32 for v in params.values())
        assert all(v.grad.spec.without_partial() == v.spec for v in params.values())
    assert math.isclose(out[BF16][0], out[F32][0], rel_tol=2e-2)
    for k, g32 in out[F32][1].items():
        scale = g32.abs().max().item()
        torch.testing.assert_close(out[BF16][1][k], g32, rtol=0, atol=5e-2 * scale, msg=k)


# ============================================================================ accumulation
def test_accumulation_is_local_then_one_reduction_and_equals_full_batch():
    mesh = sl.Mesh.simulated({"dp": 4})
    scheme = snn.dp("dp")
    plain = {k: v.double() for k, v in gpt.init(CFG, 0).items()}
    params = snn.shard_params(plain, mesh, scheme, gpt.DIMS(CFG))
    for v in params.values():
        v.requires_grad_()
    full_batch, micro = _batch(5, b=16), 4
    with sl.comm_ledger() as led:
        for m in range(micro):
            mb = {k: v[4 * m : 4 * m + 4] for k, v in full_batch.items()}
            with snn.use(scheme, mesh):
                loss = gpt.loss(params, scheme.shard_batch(mb, mesh), CFG) / micro
            loss.backward()
    assert led.count(direction="backward") == 0, led.summary()
    assert all(v.grad.spec == v.spec.with_partial(("dp",)) for v in params.values())
    with sl.comm_ledger() as led:
        grads = _finish({k: v.grad for k, v in params.items()})
    assert led.count() == led.count("all_reduce") == len(params)
    n = 4  # ring all-reduce: each device sends 2 (N-1)/N of the gradient's bytes
    assert led.total_bytes == sum(2 * (n - 1) * v.numel() * 8 // n for v in plain.values())
    with sl.comm_ledger() as led:  # ZeRO-0's reduce: the same, coalesced into one all-reduce
        coalesced = sl.optim.zero(0, "dp").reduce({k: v.grad for k, v in params.items()})
    assert [r.kind for r in led.records] == ["all_reduce"]
    assert all(torch.equal(coalesced[k].full(), grads[k].full()) for k in grads)
    # the unsharded float64 model on the whole batch
    ref = {k: v.clone().requires_grad_() for k, v in plain.items()}
    gpt.loss(ref, full_batch, CFG).backward()
    for k in ref:
        torch.testing.assert_close(grads[k].full(), ref[k].grad, rtol=1e-10, atol=1e-10, msg=k)
    tx = sl.optim.sgd(0.1, momentum=0.9)
    updates, _ = tx.update(grads, tx.init(params), params)
    stepped = sl.optim.apply_updates(params, updates)
    ref_upd, _ = tx.update({k: v.grad for k, v in ref.items()}, tx.init(plain), plain)
    ref_stepped = sl.optim.apply_updates(plain, ref_upd)
    for k in ref:
        torch.testing.assert_close(stepped[k].full(), ref_stepped[k], rtol=1e-10, atol=1e-10, msg=k)


# ============================================================================ loss scaling
SCRIPT = [True, True, True, False, True, True, True, True, False, False, True, True, True, True]


def _grad_scaler_trajectory(script, init, growth, backoff, interval):
    """torch.amp.GradScaler driving a real SGD step: the scale after each update."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=init,
        growth_factor=growth,
        backoff_factor=backoff,
        growth_interval=interval,
    )
    scales, steps = [], []
    for finite in script:
        opt.zero_grad()
        scaler.scale(w.sum()).backward()
        if not finite:
            w.grad[1] = float("inf")
        before = w.detach().clone()
        scaler.step(opt)
        scaler.update()
        steps.append(not torch.equal(before, w.detach()))
        scales.append(scaler.get_scale())
    return scales, steps


def test_loss_scale_trajectory_matches_grad_scaler_and_inf_skips_the_update():
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    init, growth, backoff, interval = 2.0**10, 2.0, 0.5, 3
    want_scales, want_steps = _grad_scaler_trajectory(SCRIPT, init, growth, backoff, interval)
    ls = sl.optim.dynamic_loss_scale(init, growth, backoff, interval)
    params = {"w": sl.shard(torch.ones(4, 2), mesh, sl.P("dp", "tp")), "b": torch.ones(3)}
    tx = sl.optim.sgd(0.1, momentum=0.9)
    state = tx.init(params)
    scales, steps = [], []
    for finite in SCRIPT:
        gw = torch.full((4, 2), ls.loss_scale)
        if not finite:
            gw[3, 1] = float("inf")
        grads = {"w": sl.shard(gw, mesh, sl.P("dp", "tp")), "b": torch.full((3,), ls.loss_scale)}
        before = (params["w"].full().clone(), params["b"].clone(), state)
        with sl.comm_ledger() as led:
            params, state, ls, ok = ls.step(tx, grads, state, params)
        assert ok == finite and led.count() == led.count("all_reduce") == 1
        if not finite:  # skipped: the very same params and state
            assert torch.equal(params["w"].full(), before[0]) and torch.equal(
                params["b"], before[1]
            )
            assert state is before[2]
        steps.append(not torch.equal(params["w"].full(), before[0]))
        scales.append(ls.loss_scale)
    assert scales == want_scales
    assert steps == want_steps == SCRIPT


def test_unscale_one_all_reduce_for_a_tree_sees_a_partial_summands_inf():
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    ls = sl.optim.dynamic_loss_scale(init_scale=4.0)
    parts = [torch.ones(3, dtype=torch.float16) * 4 for _ in range(2)]
    grads = {
        "a": sl.shard(torch.full((5, 3), 8.0, dtype=torch.float16), mesh, sl.P("dp", "tp")),
        "b": sl.shard(torch.full((7,), 8.0), mesh, sl.P("tp")),
        "c": sl.from_local(parts * 2, mesh, sl.P(None, partial="dp"), (3,)),
        "d": torch.full((2,), 8.0),
    }
    with sl.comm_ledger() as led:
        out, finite = ls.unscale(grads)
    assert finite and led.count() == led.count("all_reduce") == 1
    assert out["a"].dtype == F32 and out["a"].spec == grads["a"].spec
    assert torch.equal(out["a"].full(), torch.full((5, 3), 2.0))
    assert out["c"].spec == grads["c"].spec and torch.equal(out["c"].full(), torch.full((3,), 2.0))
    parts[1] = torch.tensor([1.0, float("inf"), 1.0], dtype=torch.float16)  # one summand
    grads["c"] = sl.from_local(
        [parts[0], parts[0], parts[1], parts[0]], mesh, sl.P(None, partial="dp"), (3,)
    )
    with sl.comm_ledger() as led:
        _, finite = ls.unscale(grads)
    assert not finite and led.count() == 1


def test_dynamic_loss_scale_bad_arguments():
    with pytest.raises(sl.LayoutError, match="backoff"):
        sl.optim.dynamic_loss_scale(backoff=2.0)
    with pytest.raises(sl.LayoutError, match="interval"):
        sl.optim.dynamic_loss_scale(interval=0)


def _unscale_on_rank(mesh):
    rank = torch.distributed.get_rank()
    g = torch.ones(8, 2) * 4
    if rank == 2:  # only rank 2's block holds the inf
        g[4, 0] = float("inf")
    grads = {"w": sl.shard(torch.ones(8, 2) * 4, mesh, sl.P("dp", None))}
    blocks = grads["w"].local_shards()
    blocks[0].copy_(g[2 * rank : 2 * rank + 2])
    ls = sl.optim.dynamic_loss_scale(init_scale=4.0)
    with sl.comm_ledger() as led:
        _, finite = ls.unscale(grads)
        _, clean = ls.unscale({"w": sl.shard(torch.ones(8, 2), mesh, sl.P("dp", None))})
    return finite, clean, [(r.kind, r.axes) for r in led.records]


@pytest.mark.dist
def test_unscale_on_gloo_an_inf_on_one_rank_is_seen_by_all(workers4):
    results = workers4.run(_unscale_on_rank, {"dp": 4})
    assert [r[:2] for r in results] == [(False, True)] * 4
    assert all(r[2] == [("all_reduce", ("dp",))] * 2 for r in results)


# ============================================================================ with ZeRO
def _zero_bf16_run(stage, steps=2):
    mesh = sl.Mesh.simulated({"dp": 4})
    scheme, z = snn.dp("dp"), sl.optim.zero(stage, "dp")
    plain = {k: v.to(BF16) for k, v in gpt.init(CFG, 0).items()}
    params = z.place(snn.shard_params(plain, mesh, scheme, gpt.DIMS(CFG)))
    tx = sl.optim.master_weights(sl.optim.adamw(3e-2, weight_decay=0.1))
    state = tx.init(z.state(params))
    records = []
    for step in range(steps):
        for v in params.values():
            v.requires_grad_()
        with snn.use(scheme, mesh):
            loss = gpt.loss(z.compute(params), scheme.shard_batch(_batch(step), mesh), CFG)
        loss.backward()
        with sl.comm_ledger() as led:
            grads = z.reduce({k: v.grad for k, v in params.items()})
            updates, state = tx.update(grads, state, z.state(params))
            params = z.place(sl.optim.apply_updates(z.state(params), updates))
        records.append(led.records)
    return plain, params, state, records


def test_master_weights_under_zero1_split_masters_bf16_traffic_and_stage0_values():
    """ZeRO-1 on dp=4 with bf16 params: the fp32 masters (and AdamW's moments) are split over
    dp (4 bytes x Psi / 4 per device for the masters), the step's traffic is a bf16
    reduce-scatter plus a bf16 all-gather, and after 2 steps the masters equal stage 0's
    (all-reduce, replicated masters) and the params are the masters cast, bitwise."""
    plain, params1, state1, records = _zero_bf16_run(1)
    _, params0, state0, _ = _zero_bf16_run(0)
    psi = sum(v.numel() for v in plain.values())
    per_device = [0] * 4
    for m in state1.master.values():
        assert m.dtype == F32
        for d, s in enumerate(m.local_shards()):
            per_device[d] += s.numel()
    assert max(per_device) <= math.ceil(psi / 4) + 4 * len(plain)  # uneven blocks: a row each
    assert sum(per_device) == psi
    kinds = sorted({(r.kind, r.dtype) for r in records[-1]})
    assert kinds == [("all_gather", "bfloat16"), ("reduce_scatter", "bfloat16")], kinds
    for k in plain:
        assert _bits_equal(state1.master[k].full(), state0.master[k].full()), k
        assert _bits_equal(params1[k].full(), state1.master[k].full().to(BF16)), k
        assert params1[k].spec == params0[k].spec
