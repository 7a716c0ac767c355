"""`sl.optim` transformations against torch.optim on sharded parameters of mixed layouts.

Covers issue 8's optimizer Must-show: on one simulated {"dp": 2, "tp": 2}
mesh, a params tree with P("dp", None), P(None, "tp"), P(("dp", "tp")),
replicated P(None), a replicated scalar and a plain tensor, uneven shapes
(5x3, 7, 7), float64:

- `sgd` (momentum 0 and 0.9, nesterov), `adam`, `adamw` for 5 steps equal
  torch.optim.SGD / Adam / AdamW on the global values (rtol = atol = 1e-10),
  also with a learning-rate schedule inside `adamw` against torch's scheduler;
  `chain` of building blocks equals the fused optimizers.
- an update records no collective (`sl.comm_ledger()`); a gradient in the full
  layout against state split over dp (ZeRO stage 1) is moved by a free slice.
- `clip_by_global_norm` (2-norm, inf-norm, 1-norm) equals
  `torch.nn.utils.clip_grad_norm_` on the global gradients, replicated leaves
  counted once, and is exactly one all-reduce of ``K`` float64 power sums
  (``2 (k-1) ceil(K/k) * 8`` bytes, K the number of sharded leaves, k the
  group of axes any leaf is split on).
- `apply_updates`: a bf16 parameter with fp32 updates (promoted, cast back),
  requires_grad kept.
- errors: state built on another mesh (names the key, both meshes, the fix),
  a grads tree that misses or adds a key (names it), a partial gradient (says
  to reduce first), a layout that only communication could fix.
- one gloo test (4 ranks, ``dist``): adamw + clip on `Mesh.distributed` equals
  the simulated run.
- donation and fused steps: with the state and params donated
  (`sl.optim.donate`) sgd/adam/adamw/chain equal torch.optim (1e-10) and the
  undonated run (adam family bitwise); `sl.optim.step` (fused, donated or not,
  with clipping) equals torch.optim.AdamW, is bitwise torch's fused kernel on
  each local block and torch's foreach AdamW on bf16; donated results are new
  objects over the old buffers (requires_grad, dims kept); undonated calls
  never write an input (versions and values); a consumed tensor is refused and
  a pending backward through it fails; tied weights; parameter-sized
  allocations (torch.profiler) against torch's foreach AdamW: donated update +
  apply as many, donated step none, undonated four per block; donation
  through master_weights and a ZeRO stage 0/1 step.
"""

from __future__ import annotations

import math

import pytest
import torch

import shardlib as sl

from ._memory import _allocations

F64 = torch.float64
AXES = {"dp": 2, "tp": 2}
LAYOUTS = {
    "rows": ((5, 3), sl.P("dp", None)),
    "cols": ((5, 3), sl.P(None, "tp")),
    "flat": ((7,), sl.P(("dp", "tp"))),
    "repl": ((7,), sl.P(None)),
    "scalar": ((), sl.P()),
}
STEPS = 5


def _globals(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        k: torch.randn(shape, generator=g, dtype=F64) * scale for k, (shape, _) in LAYOUTS.items()
    }
    out["plain"] = torch.randn(3, 2, generator=g, dtype=F64) * scale
    return out


def _shard(tree: dict[str, torch.Tensor], mesh: sl.Mesh) -> dict:
    return {
        k: sl.shard(v, mesh, LAYOUTS[k][1]) if k in LAYOUTS else v.clone() for k, v in tree.items()
    }


def _value(x) -> torch.Tensor:
    return x.full() if isinstance(x, sl.ShardedTensor) else x


def _run_sharded(tx, mesh, steps=STEPS, clip_led=None):
    params = _shard(_globals(0), mesh)
    state = tx.init(params)
    for step in range(steps):
        grads = _shard(_globals(100 + step), mesh)
        updates, state = tx.update(grads, state, params)
        params = sl.optim.apply_updates(params, updates)
    return params, state


def _run_torch(make_opt, steps=STEPS, make_sched=None, clip=None):
    params = {k: v.clone().requires_grad_() for k, v in _globals(0).items()}
    opt = make_opt(list(params.values()))
    sched = make_sched(opt) if make_sched else None
    for step in range(steps):
        for k, g in _globals(100 + step).items():
            params[k].grad = g
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), *clip)
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach() for k, v in params.items()}


def _assert_close(params, want):
    assert set(params) == set(want)
    for k in want:
        got = params[k]
        if k in LAYOUTS:
            assert isinstance(got, sl.ShardedTensor) and got.spec == LAYOUTS[k][1], k
        torch.testing.assert_close(_value(got), want[k], rtol=1e-10, atol=1e-10, msg=k)


@pytest.fixture(scope="module")
def mesh():
    return sl.Mesh.simulated(AXES)


# == optimizers against torch.optim =============================================
OPTIMIZERS = {
    "sgd": (lambda: sl.optim.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_momentum": (
        lambda: sl.optim.sgd(0.1, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    ),
    "sgd_nesterov": (
        lambda: sl.optim.sgd(0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ),
    "adam": (
        lambda: sl.optim.adam(0.01, b1=0.8, b2=0.99, eps=1e-6),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adamw": (
        lambda: sl.optim.adamw(0.01, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ),
    "adamw_default_decay": (
        lambda: sl.optim.adamw(0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-4),
    ),
    "chain_adamw": (
        lambda: sl.optim.chain(
            sl.optim.scale_by_adam(),
            sl.optim.add_decayed_weights(0.1),
            sl.optim.scale_by_learning_rate(0.01),
        ),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_matches_torch(mesh, name):
    ours, theirs = OPTIMIZERS[name]
    params, _ = _run_sharded(ours(), mesh)
    _assert_close(params, _run_torch(theirs))


def test_adamw_with_schedule_matches_torch_scheduler(mesh):
    peak = 0.05
    sched = sl.optim.linear_schedule(0.0, peak, transition_steps=3)
    tx = sl.optim.adamw(sched, weight_decay=0.1)
    params, state = _run_sharded(tx, mesh)
    want = _run_torch(
        lambda p: torch.optim.AdamW(p, lr=peak, weight_decay=0.1),
        make_sched=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: sched(k) / peak),
    )
    _assert_close(params, want)
    assert state.count == STEPS


def test_update_records_no_collective(mesh):
    params = _shard(_globals(0), mesh)
    grads = _shard(_globals(1), mesh)
    for tx in (sl.optim.adamw(0.01), sl.optim.sgd(0.1, momentum=0.9), sl.optim.adam(0.1)):
        state = tx.init(params)
        with sl.comm_ledger() as led:
            updates, state = tx.update(grads, state, params)
            sl.optim.apply_updates(params, updates)
        assert led.records == []


def test_state_leaves_in_param_layouts(mesh):
    params = _shard(_globals(0), mesh)
    state = sl.optim.adamw(0.1).init(params)
    for k, (shape, layout) in LAYOUTS.items():
        for tree in (state.mu, state.nu):
            assert tree[k].spec == layout and tuple(tree[k].shape) == shape
            assert not tree[k].requires_grad
    assert state.count == 0 and not isinstance(state.mu["plain"], sl.ShardedTensor)


def test_full_gradient_against_split_state_is_a_free_slice(mesh):
    """ZeRO stage 1: gradient in L, state (and params) in L+dp -> moved by a local slice."""
    g = torch.randn(6, 4, dtype=F64)
    p = torch.randn(6, 4, dtype=F64)
    full, split = sl.P(None, "tp"), sl.P("dp", "tp")
    params = {"w": sl.shard(p, mesh, split)}
    tx = sl.optim.adamw(0.01, weight_decay=0.1)
    with sl.comm_ledger() as led:
        updates, _ = tx.update({"w": sl.shard(g, mesh, full)}, tx.init(params), params)
    assert led.records == []
    assert updates["w"].spec == split
    want = _run_torch_one(p, g, lambda q: torch.optim.AdamW(q, lr=0.01, weight_decay=0.1))
    torch.testing.assert_close(p + updates["w"].full(), want, rtol=1e-10, atol=1e-10)


def _run_torch_one(p, g, make_opt):
    q = p.clone().requires_grad_()
    opt = make_opt([q])
    q.grad = g.clone()
    opt.step()
    return q.detach()


def test_apply_updates_promotes_and_keeps_requires_grad(mesh):
    p16 = torch.randn(5, 3).to(torch.bfloat16)
    u32 = torch.randn(5, 3) * 1e-2
    params = {"w": sl.shard(p16, mesh, sl.P("dp", None)).requires_grad_(), "b": p16.clone()}
    new = sl.optim.apply_updates(params, {"w": sl.shard(u32, mesh, sl.P("dp", None)), "b": u32})
    want = (p16.float() + u32).to(torch.bfloat16)
    assert new["w"].dtype == torch.bfloat16 and new["b"].dtype == torch.bfloat16
    assert torch.equal(new["w"].full(), want) and torch.equal(new["b"], want)
    assert new["w"].requires_grad and new["w"].is_leaf and not new["b"].requires_grad


# == clipping ===================================================================
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_matches_torch(mesh, norm_type, max_norm):
    grads = _shard(_globals(7, scale=3.0), mesh)
    tx = sl.optim.clip_by_global_norm(max_norm, norm_type)
    with sl.comm_ledger() as led:
        clipped, _ = tx.update(grads, tx.init(grads))
    want = {k: v.clone().requires_grad_() for k, v in _globals(0).items()}
    for k, g in _globals(7, scale=3.0).items():
        want[k].grad = g
    total = torch.nn.utils.clip_grad_norm_(list(want.values()), max_norm, norm_type)
    norm = sl.optim.global_norm(grads, norm_type)
    torch.testing.assert_close(norm, total, rtol=1e-12, atol=0)
    for k, w in want.items():
        if k in LAYOUTS:
            assert clipped[k].spec == LAYOUTS[k][1]
        torch.testing.assert_close(_value(clipped[k]), w.grad, rtol=1e-10, atol=1e-10, msg=k)
    # one all-reduce over the axes some leaf is split on ({dp, tp}: group of 4) of the
    # K = 5 sharded leaves' float64 power sums (the plain leaf is added locally)
    k_group, n_leaves = 4, len(LAYOUTS)
    assert [(r.kind, r.axes, r.dtype) for r in led.records] == [
        ("all_reduce", ("dp", "tp"), "float64")
    ]
    assert led.total_bytes == 2 * (k_group - 1) * -(-n_leaves // k_group) * 8


def test_clip_of_bf16_gradients_scales_in_float32(mesh):
    g = torch.randn(7, 3, dtype=F64) * 5
    grads = {"w": sl.shard(g.to(torch.bfloat16), mesh, sl.P(None, "tp"))}
    clipped, _ = sl.optim.clip_by_global_norm(1.0).update(grads, sl.optim.EmptyState())
    norm = g.to(torch.bfloat16).double().norm()
    coef = (1.0 / (norm + 1e-6)).float()
    want = (g.to(torch.bfloat16).float() * coef).to(torch.bfloat16)
    assert clipped["w"].dtype == torch.bfloat16 and torch.equal(clipped["w"].full(), want)


def test_clip_of_replicated_leaves_only_has_no_collective(mesh):
    g = {"a": sl.shard(torch.full((3,), 2.0, dtype=F64), mesh, sl.P(None))}
    with sl.comm_ledger() as led:
        norm = sl.optim.global_norm(g)
    assert led.records == [] and norm.item() == pytest.approx(math.sqrt(12.0), rel=1e-14)


def test_clip_then_adamw_one_collective(mesh):
    tx = sl.optim.chain(sl.optim.clip_by_global_norm(1.0), sl.optim.adamw(0.01, weight_decay=0.1))
    params = _shard(_globals(0), mesh)
    state = tx.init(params)
    with sl.comm_ledger() as led:
        for step in range(STEPS):
            updates, state = tx.update(_shard(_globals(100 + step), mesh), state, params)
            params = sl.optim.apply_updates(params, updates)
    assert [r.kind for r in led.records] == ["all_reduce"] * STEPS
    want = _run_torch(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), clip=(1.0,))
    _assert_close(params, want)


# == errors =====================================================================
def test_state_on_another_mesh_raises(mesh):
    other = sl.Mesh.simulated({"dp": 4})
    tx = sl.optim.adamw(0.01)
    state = tx.init({"w": sl.shard(torch.zeros(8), other, sl.P("dp"))})
    params = {"w": sl.shard(torch.zeros(8), mesh, sl.P("dp"))}
    with pytest.raises(sl.MeshMismatchError) as e:
        tx.update({"w": sl.shard(torch.ones(8), mesh, sl.P("dp"))}, state, params)
    msg = str(e.value)
    assert "mu['w']" in msg and repr(other) in msg and repr(mesh) in msg
    assert "tx.init(params)" in msg


def test_grads_tree_with_other_keys_raises(mesh):
    params = _shard(_globals(0), mesh)
    grads = _shard(_globals(1), mesh)
    del grads["cols"]
    grads["extra"] = torch.zeros(1)
    tx = sl.optim.sgd(0.1)
    with pytest.raises(sl.LayoutError) as e:
        tx.update(grads, tx.init(params), params)
    msg = str(e.value)
    assert "['cols']" in msg and "['extra']" in msg and "grads" in msg


def test_partial_gradient_raises_with_fix(mesh):
    params = {"w": sl.shard(torch.zeros(4, 2), mesh, sl.P(None, "tp"))}
    g = sl.shard(torch.ones(4, 2), mesh, sl.P(None, "tp", partial="dp"))
    for tx in (sl.optim.adamw(0.1), sl.optim.clip_by_global_norm(1.0)):
        with pytest.raises(sl.LayoutError) as e:
            tx.update({"w": g}, tx.init(params), params)
        msg = str(e.value)
        assert "grads['w']" in msg and "partial" in msg and ".reduce(grads)" in msg


def test_layout_needing_communication_raises(mesh):
    params = {"w": sl.shard(torch.zeros(4, 4), mesh, sl.P("dp", None))}
    grads = {"w": sl.shard(torch.ones(4, 4), mesh, sl.P(None, "dp"))}
    tx = sl.optim.adam(0.1)
    with pytest.raises(sl.LayoutError, match=r"grads\['w'\].*needs communication"):
        tx.update(grads, tx.init(params), params)


def test_mixed_sharded_and_plain_entries_raise(mesh):
    params = {"w": sl.shard(torch.zeros(4), mesh, sl.P("dp"))}
    tx = sl.optim.adam(0.1)
    with pytest.raises(sl.LayoutError, match=r"grads\['w'\] is a plain tensor"):
        tx.update({"w": torch.ones(4)}, tx.init(params), params)
    with pytest.raises(sl.LayoutError, match=r"is str"):
        tx.update({"w": "grad"}, tx.init(params), params)


def test_none_leaves_pass_through_and_none_gradient_raises(mesh):
    params = {"w": sl.shard(torch.ones(5), mesh, sl.P("dp")), "frozen": None}
    tx = sl.optim.chain(sl.optim.clip_by_global_norm(1.0), sl.optim.adamw(0.1))
    state = tx.init(params)
    grads = {"w": sl.shard(torch.ones(5), mesh, sl.P("dp")), "frozen": None}
    updates, state = tx.update(grads, state, params)
    new = sl.optim.apply_updates(params, updates)
    assert new["frozen"] is None and updates["frozen"] is None and new["w"].spec == sl.P("dp")
    with pytest.raises(sl.LayoutError, match=r"grads\['w'\] is NoneType"):
        tx.update({"w": None, "frozen": None}, state, params)


def test_wrong_state_and_arguments_raise(mesh):
    params = {"w": torch.zeros(2)}
    with pytest.raises(sl.optim.OptimError, match="ScaleByAdamState"):
        sl.optim.adamw(0.1).update(params, sl.optim.sgd(0.1).init(params), params)
    with pytest.raises(sl.optim.OptimError, match="momentum"):
        sl.optim.sgd(0.1, nesterov=True)
    with pytest.raises(sl.optim.OptimError, match="argument 1"):
        sl.optim.chain(sl.optim.sgd(0.1), sl.optim.adam)
    with pytest.raises(sl.optim.OptimError, match="needs params"):
        tx = sl.optim.adamw(0.1)
        tx.update(params, tx.init(params))


# == in a training loop =========================================================
def test_backward_loop_on_dp_tp_matches_torch(mesh):
    """``.backward()`` gives dp-partial gradients; reduced explicitly, then adamw + clip."""
    g = torch.Generator().manual_seed(3)
    w0, b0 = torch.randn(6, 5, dtype=F64, generator=g), torch.randn(5, dtype=F64, generator=g)
    xs = [torch.randn(7, 6, dtype=F64, generator=g) for _ in range(3)]
    tx = sl.optim.chain(sl.optim.clip_by_global_norm(0.5), sl.optim.adamw(0.05, weight_decay=0.1))
    params = {
        "w": sl.shard(w0, mesh, sl.P(None, "tp")).requires_grad_(),
        "b": sl.shard(b0, mesh, sl.P("tp")).requires_grad_(),
    }
    state = tx.init(params)
    for x in xs:
        y = sl.shard(x, mesh, sl.P("dp", None)) @ params["w"] + params["b"]
        (y.tanh() ** 2).sum().backward()
        grads = {k: p.grad for k, p in params.items()}
        assert grads["w"].spec == sl.P(None, "tp", partial="dp")
        grads = {k: sl.reshard(v, v.spec.without_partial()) for k, v in grads.items()}
        updates, state = tx.update(grads, state, params)
        params = sl.optim.apply_updates(params, updates)
        assert all(p.requires_grad and p.grad is None for p in params.values())
    ref = {"w": w0.clone().requires_grad_(), "b": b0.clone().requires_grad_()}
    opt = torch.optim.AdamW(list(ref.values()), lr=0.05, weight_decay=0.1)
    for x in xs:
        ((x @ ref["w"] + ref["b"]).tanh() ** 2).sum().backward()
        torch.nn.utils.clip_grad_norm_(list(ref.values()), 0.5)
        opt.step()
        opt.zero_grad()
    for k in ref:
        assert params[k].spec == (sl.P(None, "tp") if k == "w" else sl.P("tp"))
        torch.testing.assert_close(params[k].full(), ref[k].detach(), rtol=1e-10, atol=1e-10)


def test_low_precision_gradients_against_fp32_state(mesh):
    p = torch.randn(5, 3)
    g = torch.randn(5, 3).to(torch.bfloat16)
    params = {"w": sl.shard(p, mesh, sl.P("dp", None))}
    tx = sl.optim.adam(0.1)
    u, state = tx.update({"w": sl.shard(g, mesh, sl.P("dp", None))}, tx.init(params), params)
    assert u["w"].dtype == torch.float32 and state.mu["w"].dtype == torch.float32
    want = _run_torch_one(p, g.float(), lambda q: torch.optim.Adam(q, lr=0.1))
    torch.testing.assert_close(p + u["w"].full(), want, rtol=1e-6, atol=1e-6)


# == gloo =======================================================================
def adamw_clip_run(mesh):
    """Five steps of clip + adamw on `mesh`: local shards of the params and the ledger."""
    tx = sl.optim.chain(sl.optim.clip_by_global_norm(1.0), sl.optim.adamw(0.01, weight_decay=0.1))
    with sl.comm_ledger() as led:
        params, _ = _run_sharded(tx, mesh)
    records = [(r.kind, r.axes, r.bytes) for r in led.records]
    shards = {
        k: (v.local_shards() if isinstance(v, sl.ShardedTensor) else [v]) for k, v in params.items()
    }
    return shards, records


@pytest.mark.dist
def test_adamw_clip_on_gloo_equals_simulated(workers4):
    results = workers4.run(adamw_clip_run, AXES)
    want, want_records = adamw_clip_run(sl.Mesh.simulated(AXES))
    for rank, (shards, records) in enumerate(results):
        assert records == want_records
        for k, got in shards.items():
            ref = want[k][rank] if k in LAYOUTS else want[k][0]
            torch.testing.assert_close(got[0], ref, rtol=1e-12, atol=1e-12, msg=f"{k} rank {rank}")


def test_apply_updates_keeps_recorded_logical_dims():
    """snn.linear reads a weight's logical dims from shard_params' record; an update makes
    new tensors, which must carry the record (a tp2d step after an update needs it)."""
    from shardlib.nn._use import record_dims, recorded_dims

    mesh = sl.Mesh.simulated({"x": 2})
    w = record_dims(sl.shard(torch.ones(5, 2), mesh, sl.P("x", None)), ("embed", "mlp"))
    params = {"w": w, "plain": torch.ones(3)}
    updates = {
        "w": sl.shard(torch.full((5, 2), 0.5), mesh, sl.P("x", None)),
        "plain": torch.ones(3),
    }
    new = sl.optim.apply_updates(params, updates)
    assert new["w"] is not w and recorded_dims(new["w"]) == ("embed", "mlp")
    assert recorded_dims(new["plain"]) is None


# == donation and fused steps ===================================================
def _donated_run(tx, mesh, steps=STEPS, params=None):
    """`_run_sharded` with the state and the parameters donated every step."""
    params = _shard(_globals(0), mesh) if params is None else params
    state = tx.init(params)
    for step in range(steps):
        grads = _shard(_globals(100 + step), mesh)
        updates, state = tx.update(grads, sl.optim.donate(state), params)
        params = sl.optim.apply_updates(sl.optim.donate(params), updates)
    return params, state


def _stepped_run(tx, mesh, donate, steps=STEPS):
    params = _shard(_globals(0), mesh)
    state = tx.init(params)
    for step in range(steps):
        grads = _shard(_globals(100 + step), mesh)
        params, state = sl.optim.step(tx, grads, state, params, donate=donate)
    return params, state


def _blocks(x) -> list[torch.Tensor]:
    return x.local_shards() if isinstance(x, sl.ShardedTensor) else [x]


def _tensor_leaves(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


DONATED = ["sgd_momentum", "sgd_nesterov", "adam", "adamw", "chain_adamw"]


@pytest.mark.parametrize("name", DONATED)
def test_donated_steps_match_torch_and_the_undonated_run(mesh, name):
    ours, theirs = OPTIMIZERS[name]
    params, state = _donated_run(ours(), mesh)
    _assert_close(params, _run_torch(theirs))
    plain, plain_state = _run_sharded(ours(), mesh)
    for k in plain:  # the same values: the same kernels (sgd's in-place momentum rounds as torch's)
        torch.testing.assert_close(_value(params[k]), _value(plain[k]), rtol=1e-13, atol=1e-13)
        if name.startswith("adam"):
            assert torch.equal(_value(params[k]), _value(plain[k])), k
    for a, b in zip(_tensor_leaves(state), _tensor_leaves(plain_state)):
        torch.testing.assert_close(_value(a), _value(b), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_step_matches_torch(mesh, donate, clip):
    adamw = sl.optim.adamw(0.01, weight_decay=0.1)
    tx = sl.optim.chain(sl.optim.clip_by_global_norm(1.0), adamw) if clip else adamw
    with sl.comm_ledger() as led:
        params, state = _stepped_run(tx, mesh, donate)
    want = _run_torch(
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), clip=(1.0,) if clip else None
    )
    _assert_close(params, want)
    assert [r.kind for r in led.records] == ["all_reduce"] * (STEPS if clip else 0)
    assert (state[1] if clip else state).count == STEPS


def test_step_is_torch_fused_adamw_on_each_local_block(mesh):
    """float64 blocks run torch._fused_adamw_: bitwise torch.optim.AdamW(fused=True) on the
    same local blocks as plain tensors (on the global tensors it agrees to rounding: the
    kernel's vector/tail split depends on the block length)."""
    params, _ = _stepped_run(sl.optim.adamw(0.01, weight_decay=0.1), mesh, donate=True)
    start = _shard(_globals(0), mesh)
    blocks = [b.clone().requires_grad_() for k in start for b in _blocks(start[k])]
    opt = torch.optim.AdamW(blocks, lr=0.01, weight_decay=0.1, fused=True)
    for step in range(STEPS):
        g = _shard(_globals(100 + step), mesh)
        for b, gb in zip(blocks, [gb for k in g for gb in _blocks(g[k])]):
            b.grad = gb.clone()
        opt.step()
    got = [b for k in params for b in _blocks(params[k])]
    assert len(got) == len(blocks)
    for a, b in zip(got, blocks):
        assert torch.equal(a, b.detach())


def test_step_on_16_bit_blocks_is_torch_foreach_bitwise():
    """Blocks the fused kernel does not take (bf16 here) run torch's foreach sequence."""
    mesh = sl.Mesh.simulated({"x": 2})
    g = torch.Generator().manual_seed(5)
    p0 = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    grads = [torch.randn(6, 5, generator=g).to(torch.bfloat16) for _ in range(3)]
    tx = sl.optim.adamw(0.05, weight_decay=0.1)
    params = {"w": sl.shard(p0, mesh, sl.P(None, "x"))}
    state = tx.init(params)
    for gr in grads:
        params, state = sl.optim.step(tx, {"w": sl.shard(gr, mesh, sl.P(None, "x"))}, state, params)
    ref = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.1, foreach=True)
    for gr in grads:
        ref.grad = gr.clone()
        opt.step()
    assert params["w"].dtype == torch.bfloat16 and torch.equal(params["w"].full(), ref.detach())


def test_donated_results_reuse_the_buffers_as_new_objects(mesh):
    from shardlib.nn._use import record_dims, recorded_dims

    params = _shard(_globals(0), mesh)
    params["rows"].requires_grad_()
    params["plain"].requires_grad_()
    record_dims(params["cols"], ("embed", "mlp"))
    tx = sl.optim.adamw(0.01, weight_decay=0.1)
    state = tx.init(params)
    ptrs = {
        name: [[b.data_ptr() for b in _blocks(t)] for t in _tensor_leaves(tree)]
        for name, tree in (("params", params), ("state", state))
    }
    grads = _shard(_globals(1), mesh)
    updates, new_state = tx.update(grads, sl.optim.donate(state), params)
    new = sl.optim.apply_updates(sl.optim.donate(params), updates)
    for name, old, tree in (("params", params, new), ("state", state, new_state)):
        for k, (a, b) in enumerate(zip(_tensor_leaves(old), _tensor_leaves(tree))):
            assert a is not b, (name, k)
            assert [x.data_ptr() for x in _blocks(b)] == ptrs[name][k], (name, k)
    for k, p in new.items():
        assert p.is_leaf and p.requires_grad == (k in ("rows", "plain")), k
    assert recorded_dims(new["cols"]) == ("embed", "mlp") and new["cols"].spec == LAYOUTS["cols"][1]


def _snapshot(*trees):
    """Every block of every tensor leaf: (the tensor, its version, a copy of its value)."""
    return [
        (b, b._version, b.clone())
        for tree in trees
        for t in _tensor_leaves(tree)
        for b in _blocks(t)
    ]


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd_nesterov", "chain_adamw"])
def test_undonated_calls_never_write_their_inputs(mesh, name):
    tx = OPTIMIZERS[name][0]()
    params, grads = _shard(_globals(0), mesh), _shard(_globals(1), mesh)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)  # a state with nonzero moments
    before = _snapshot(params, grads, state)
    updates, _ = tx.update(grads, state, params)
    after_update = _snapshot(updates)
    sl.optim.apply_updates(params, updates)
    sl.optim.step(tx, grads, state, params)
    for b, version, value in before + after_update:
        assert b._version == version and torch.equal(b, value)


def test_a_consumed_tensor_is_refused(mesh):
    tx = sl.optim.adamw(0.01)
    params, grads = _shard(_globals(0), mesh), _shard(_globals(1), mesh)
    old_state = tx.init(params)
    _, state = tx.update(grads, sl.optim.donate(old_state), params)
    with pytest.raises(sl.optim.OptimError) as e:
        tx.update(grads, old_state, params)
    msg = str(e.value)
    assert "mu['rows']" in msg and "consumed by sl.optim.adamw(...).update" in msg
    assert "sl.optim.donate(state)" in msg
    with pytest.raises(sl.optim.OptimError, match=r"tree\.mu\['rows'\]"):
        sl.optim.donate(old_state)
    tx.update(grads, state, params)  # the returned state is fine
    # a parameter donated to the fused step, then used again
    new, _ = sl.optim.step(tx, grads, state, params, donate=True)
    with pytest.raises(sl.optim.OptimError, match=r"params\['rows'\] was donated"):
        sl.optim.apply_updates(params, _shard(_globals(2), mesh))
    sl.optim.apply_updates(new, _shard(_globals(2), mesh))


@pytest.mark.parametrize("sharded", [True, False])
def test_a_pending_backward_through_a_donated_parameter_fails(mesh, sharded):
    w0 = torch.randn(4, 3, dtype=F64)
    w = (sl.shard(w0, mesh, sl.P(None, "tp")) if sharded else w0.clone()).requires_grad_()
    loss = (w * w).sum()  # saves w
    u = (
        sl.shard(torch.ones(4, 3, dtype=F64), mesh, w.spec)
        if sharded
        else torch.ones(4, 3, dtype=F64)
    )
    new = sl.optim.apply_updates(sl.optim.donate({"w": w}), {"w": u})
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    torch.testing.assert_close(_value(new["w"]), w0 + 1, rtol=0, atol=0)


def test_a_parameter_passed_twice_is_written_once(mesh):
    """Tied weights: the same tensor under two keys; donated, each key gets its own result."""
    w = sl.shard(torch.ones(6, dtype=F64), mesh, sl.P("dp"))
    u = {
        k: sl.shard(torch.full((6,), v, dtype=F64), mesh, sl.P("dp"))
        for k, v in (("a", 1.0), ("b", 2.0))
    }
    new = sl.optim.apply_updates(sl.optim.donate({"a": w, "b": w}), u)
    assert new["a"].full().tolist() == [2.0] * 6 and new["b"].full().tolist() == [3.0] * 6


def _allocation_sizes(fn) -> list[int]:
    """Sizes of every CPU allocation made while `fn` runs (frees negative; torch.profiler)."""
    return [e.extra_fields.alloc_size for e in _allocations(fn)]


def test_donated_steps_allocate_no_more_parameter_sized_buffers_than_torch():
    """Blocks of 16 KiB and more: torch's foreach AdamW allocates one per parameter block
    (its denominator); donated update + apply_updates the same (the updates buffer), the
    donated fused step none, the undonated calls four (new moments, updates, new params)."""
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    g = torch.Generator().manual_seed(0)
    shapes = {
        "a": ((128, 96), sl.P("dp", "tp")),
        "b": ((96, 48), sl.P(None, "tp")),
        "c": ((48, 64), sl.P()),
    }
    full = {k: torch.randn(s, generator=g, dtype=F64) for k, (s, _) in shapes.items()}
    grad = {k: torch.randn(s, generator=g, dtype=F64) for k, (s, _) in shapes.items()}

    def tree(values):
        return {k: sl.shard(v, mesh, shapes[k][1]) for k, v in values.items()}

    params, grads = tree(full), tree(grad)
    blocks = [b for p in params.values() for b in p.local_shards()]
    small = min(b.numel() * b.element_size() for b in blocks)
    assert small >= 16 * 1024

    def big(sizes):
        return sum(s >= small for s in sizes)

    tx = sl.optim.adamw(0.01, weight_decay=0.1)
    state = tx.init(params)
    params, state = sl.optim.step(tx, grads, state, params)  # nonzero moments, a warm start
    plain = [b.clone().requires_grad_() for b in blocks]
    for p, gb in zip(plain, [b for x in grads.values() for b in x.local_shards()]):
        p.grad = gb.clone()
    opt = torch.optim.AdamW(plain, lr=0.01, weight_decay=0.1, foreach=True)
    opt.step()
    torch_count = big(_allocation_sizes(opt.step))
    assert torch_count == len(blocks)

    out = {}

    def donated_two_calls():
        updates, out["state"] = tx.update(grads, sl.optim.donate(state), params)
        out["params"] = sl.optim.apply_updates(sl.optim.donate(params), updates)

    assert big(_allocation_sizes(donated_two_calls)) == torch_count
    params, state = out["params"], out["state"]

    def donated_step():
        out["params"], out["state"] = sl.optim.step(tx, grads, state, params, donate=True)

    assert big(_allocation_sizes(donated_step)) == 0
    params, state = out["params"], out["state"]

    def undonated():
        updates, _ = tx.update(grads, state, params)
        sl.optim.apply_updates(params, updates)

    assert big(_allocation_sizes(undonated)) == 4 * len(blocks)


def test_donation_passes_through_master_weights(mesh):
    """No signature change: master_weights' inner update and its apply_updates see the donated
    masters and moments, write them in place and give the undonated run's values bitwise."""
    p0 = torch.randn(8, 4).to(torch.bfloat16)
    gs = [torch.randn(8, 4).to(torch.bfloat16) for _ in range(3)]
    runs = []
    for donate in (False, True):
        tx = sl.optim.master_weights(sl.optim.adamw(0.01, weight_decay=0.1))
        params = {"w": sl.shard(p0, mesh, sl.P("dp", None))}
        state = tx.init(params)
        master_ptr = state.master["w"].local_shards()[0].data_ptr()
        for gr in gs:
            grads = {"w": sl.shard(gr, mesh, sl.P("dp", None))}
            if donate:
                params, state = sl.optim.step(tx, grads, state, params, donate=True)
            else:
                updates, state = tx.update(grads, state, params)
                params = sl.optim.apply_updates(params, updates)
        assert (state.master["w"].local_shards()[0].data_ptr() == master_ptr) == donate
        runs.append((params["w"].full(), state.master["w"].full(), state.inner.mu["w"].full()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [0, 1])
def test_donated_zero_step_equals_the_functional_one(stage):
    """DESIGN §9's ZeRO step with the state and z.state(params) donated (at stage 0
    z.state(params) aliases params, so params' own buffers are updated)."""
    mesh = sl.Mesh.simulated(AXES)
    z = sl.optim.zero(stage)
    full = {"w": torch.randn(6, 4, dtype=F64), "b": torch.randn(5, dtype=F64)}
    lay = {"w": sl.P(None, "tp"), "b": sl.P()}
    results = []
    for how in ("functional", "donated", "step"):
        params = z.place({k: sl.shard(v, mesh, lay[k]) for k, v in full.items()})
        tx = sl.optim.adamw(0.01, weight_decay=0.1)
        state = tx.init(z.state(params))
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            grads = {
                k: sl.shard(torch.randn(v.shape, generator=g, dtype=F64), mesh, lay[k])
                for k, v in full.items()
            }
            grads = z.reduce(grads) if stage else grads
            current = z.state(params)
            if how == "step":
                new, state = sl.optim.step(tx, grads, state, current, donate=True)
            else:
                give = sl.optim.donate if how == "donated" else (lambda tree: tree)
                updates, state = tx.update(grads, give(state), current)
                new = sl.optim.apply_updates(give(current), updates)
            params = z.place(new)
        results.append({k: v.full() for k, v in params.items()})
    for k in full:
        assert torch.equal(results[0][k], results[1][k]), k
        # the fused step: p (1 - lr wd) - s, against p + (-lr wd p - s): equal to rounding
        torch.testing.assert_close(results[2][k], results[0][k], rtol=1e-13, atol=1e-13)
