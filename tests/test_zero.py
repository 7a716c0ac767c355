"""ZeRO as layouts (`sl.optim.zero`, DESIGN §9) on simulated meshes.

Covers, against independent references:
- the L+dp rule (`split_layout`): sampled shapes x layouts, every L block tiled
  exactly by its N L+dp blocks (checked with torch.chunk-style bounds written
  here), the largest such dim, None when nothing fits; the stage table
  (`z.layouts`);
- numerics: 3 AdamW steps of every stage on dp=4 (uneven GPT sizes) and on
  dp=2 x tp2d(r=2, c=2) equal torch.optim.AdamW on the unsharded float64
  model (1e-10), with ``loss.backward()`` and with `torch.func.grad` (stages 2
  and 3 on dp=4 by default; stages 0-1 and dp x tp2d in the slow tier);
- bytes per device per step from the ledger against closed forms written from
  the parameter shapes: stages 0-2 2Ψ(N-1)/N, stage 3 3Ψ(N-1)/N (uneven: each
  collective pads to its largest chunk, as the ring model counts). On dp=4
  under `snn.dp` every record but the loss's own (`nll_loss`, a few bytes) is
  ZeRO's; the embedding table is not re-gathered (its backward needs only the
  token ids). On dp x tp2d only records over the dp axis are counted;
- coalescing: one reduce-scatter / all-gather / all-reduce per (mesh, dtype)
  for a whole pytree of mixed shapes;
- optimizer-state bytes per device: Ψ_state/N at stages >= 1 (local shards);
- memory (peak live CPU bytes from torch.profiler's allocation events): stage 2
  holds at most about one parameter's full gradient during backward, stage 3
  one gathered parameter during forward;
- stage 3 equals snn.fsdp (values and bytes);
- bad input: an axis the mesh lacks, a stage not in 0..3, a parameter already
  split over the axis, a partial parameter.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt
from shardlib.nn._use import record_dims
from shardlib.optim._zero import split_layout
from tests._memory import peak_live_bytes

F64 = torch.float64
LR, B1, B2, EPS, WD = 0.05, 0.9, 0.999, 1e-8, 1e-4
STEPS = 3
CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 100))

# (mesh, scheme, config, batch): dp=4 on sizes dp does not divide (vocab 11, mlp 18);
# dp x tp2d on sizes every axis divides.
SETUPS = {
    "dp4": (
        {"dp": 4},
        lambda: snn.dp("dp"),
        gpt.Config(vocab=11, dim=12, heads=3, layers=1, seq=7, mlp=18),
        (4, 7),
    ),
    "dp2_tp2d": (
        {"dp": 2, "r": 2, "c": 2},
        lambda: snn.dp("dp") + snn.tp2d("r", "c"),
        gpt.Config(vocab=12, dim=8, heads=4, layers=1, seq=8, kv_heads=2),
        (4, 8),
    ),
}


# == helpers ===========================================================================
def chunk_len(n: int, k: int, c: int) -> int:
    """Length of torch.chunk-style chunk c of n items cut in k (ceil-sized, possibly empty)."""
    s = -(-n // k)
    return max(0, min(n, (c + 1) * s) - min(n, c * s))


def make_params(c: gpt.Config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for k, v in gpt.init(c, seed=3).items():
        if k.endswith("norm"):
            v = v + 0.1 * torch.randn(v.shape, generator=g)
        out[k] = v.to(F64)
    return out


def make_batches(c: gpt.Config, b: int, s: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        {k: torch.randint(0, c.vocab, (b, s), generator=g) for k in ("tokens", "targets")}
        for _ in range(STEPS)
    ]


@functools.cache
def reference_training(setup: str) -> tuple[dict, list[float]]:
    """torch.optim.AdamW on the unsharded float64 model: the final params and the losses."""
    _, _, c, (b, s) = SETUPS[setup]
    batches = make_batches(c, b, s)
    params = {k: v.clone().requires_grad_() for k, v in make_params(c).items()}
    opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = gpt.loss(params, batch, c)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.detach() for k, v in params.items()}, losses


def with_dims(params: dict, c: gpt.Config) -> dict:
    """Record gpt's logical dims on new parameter tensors (snn.linear reads them under tp2d;
    apply_updates returns fresh tensors without the record shard_params made)."""
    for k, v in params.items():
        record_dims(v, gpt.DIMS[k])
    return params


@functools.cache
def train(setup: str, stage: int, mode: str = "backward"):
    """STEPS AdamW steps of `stage` on `setup`'s simulated mesh (see `run_training`)."""
    return run_training(sl.Mesh.simulated(SETUPS[setup][0]), setup, stage, mode)


def run_training(mesh, setup: str, stage: int, mode: str = "backward"):
    """STEPS AdamW steps of `stage` on `setup`: (final full params, losses, last step's
    ledger records, the placed params of the last step, the optimizer state)."""
    _, make_scheme, c, (b, s) = SETUPS[setup]
    scheme = make_scheme()
    z = sl.optim.zero(stage, axis="dp")
    tx = sl.optim.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    params = z.place(snn.shard_params(make_params(c), mesh, scheme, gpt.DIMS(c)))
    state = tx.init(z.state(params))

    def loss_of(p, sbatch):
        with snn.use(scheme, mesh):
            return gpt.loss(p, sbatch, c)

    losses, records = [], []
    for batch in make_batches(c, b, s):
        sbatch = scheme.shard_batch(batch, mesh)
        with sl.comm_ledger() as led:
            if mode == "backward":
                for p in params.values():
                    p.requires_grad_()
                with sl.remat_saves():
                    loss = loss_of(z.compute(params), sbatch)
                loss.backward()
                grads = {k: p.grad for k, p in params.items()}
            else:
                grads = torch.func.grad(lambda p, b=sbatch: loss_of(z.compute(p), b))(params)
            grads = z.reduce(grads)
            updates, state = tx.update(grads, state, z.state(params))
            params = z.place(with_dims(sl.optim.apply_updates(z.state(params), updates), c))
        records = list(led.records)
        if mode == "backward":
            losses.append(loss.full().item())  # outside the step's ledger
    full = {k: v.full() for k, v in params.items()}
    return full, losses, records, params, state


def stored_layouts(
    setup: str, stage: int
) -> dict[str, tuple[tuple[int, ...], sl.Layout, sl.Layout]]:
    """Per param: (shape, L, L+dp) as zero 3 stores it (independent of the run)."""
    axes, make_scheme, c, _ = SETUPS[setup]
    mesh, scheme = sl.Mesh.simulated(axes), make_scheme()
    out = {}
    for k, v in make_params(c).items():
        L = scheme.param_layout(gpt.DIMS[k])
        S = sl.optim.zero(3).layouts(sl.shard(v, mesh, L)).stored
        out[k] = (tuple(v.shape), L, S)
    return out


def pieces(
    shape, L: sl.Layout, S: sl.Layout, axes: dict[str, int], block_coords: dict
) -> list[int]:
    """Element counts of the N dp-pieces of one L block (`block_coords`: the tp coordinates)."""
    n_dp = axes["dp"]
    d = S.dim_of("dp")
    sizes = []
    for i in range(n_dp):
        numel = 1
        for e, (n, ax) in enumerate(zip(shape, L.dims)):
            k = math.prod(axes[a] for a in ax)
            c = 0
            for a in ax:  # flat chunk index, major -> minor
                c = c * axes[a] + block_coords[a]
            numel *= chunk_len(n, k * n_dp, c * n_dp + i) if e == d else chunk_len(n, k, c)
        sizes.append(numel)
    return sizes


def tp_coords(axes: dict[str, int]) -> list[dict[str, int]]:
    """Every combination of coordinates on the non-dp axes."""
    names = [a for a in axes if a != "dp"]
    out = [{}]
    for a in names:
        out = [dict(o, **{a: i}) for o in out for i in range(axes[a])]
    return out


# == the L+dp rule and the table ======================================================
@settings(derandomize=True, deadline=None, max_examples=CASES, database=None)
@given(
    shape=st.lists(st.integers(0, 13), min_size=0, max_size=3),
    tp_dims=st.lists(st.integers(-1, 2), min_size=2, max_size=2),
    n_dp=st.sampled_from([2, 3, 4]),
)
def test_split_layout_tiles_every_block_on_the_largest_dim(shape, tp_dims, n_dp):
    axes = {"dp": n_dp, "a": 2, "b": 3}
    am = sl.Mesh.simulated(axes).abstract
    dims = [[] for _ in shape]
    for name, d in zip(("a", "b"), tp_dims):
        if 0 <= d < len(shape):
            dims[d].append(name)
    L = sl.P(*[tuple(x) if x else None for x in dims]) if shape else sl.P()
    L = L.check(am, len(shape))
    S = split_layout(L, tuple(shape), am, "dp")

    def tiles(d: int) -> bool:
        """Each L block of dim d is exactly n_dp consecutive chunks of the finer cut."""
        n, ax = shape[d], L.dims[d]
        k = math.prod(axes[a] for a in ax)
        s = -(-n // k)
        for c in range(k):
            lo, hi = min(n, c * s), min(n, (c + 1) * s)
            pos = lo
            for i in range(n_dp):
                pos += chunk_len(n, k * n_dp, c * n_dp + i)
            fine = -(-n // (k * n_dp))
            if min(n, c * n_dp * fine) != lo or pos != hi:
                return False
        return True

    def extent(d: int) -> int:
        k = math.prod(axes[a] for a in L.dims[d])
        return chunk_len(shape[d], k, 0)

    ok = [d for d in range(len(shape)) if extent(d) >= n_dp and tiles(d)]
    if not ok:
        assert S is None
        return
    best = max(ok, key=lambda d: (extent(d), -d))
    assert S.dims[best] == L.dims[best] + ("dp",)
    assert all(S.dims[d] == L.dims[d] for d in range(len(shape)) if d != best)


def test_split_layout_examples_and_the_stage_table():
    mesh = sl.Mesh.simulated({"dp": 4, "tp": 2})
    w = sl.shard(torch.zeros(6, 16), mesh, sl.P(None, "tp"))  # blocks 6 x 8: dim 1 is wider
    split = sl.P(None, ("tp", "dp"))
    L = sl.P(None, "tp")
    rows = {0: (L, L, L, L), 1: (L, L, split, L), 2: (L, split, split, L), 3: (split,) * 3 + (L,)}
    for stage, want in rows.items():
        assert tuple(sl.optim.zero(stage).layouts(w)) == want, stage
    tiny = sl.shard(torch.zeros(3), mesh, sl.P())  # 3 < 4: stays L in every role
    assert set(sl.optim.zero(3).layouts(tiny)) == {sl.P(None)}
    scalar = sl.shard(torch.tensor(2.0), mesh, sl.P())
    assert set(sl.optim.zero(3).layouts(scalar)) == {sl.P()}


# == numerics ============================================================================
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_steps_equal_single_device_adamw(setup, stage):
    ref, ref_losses = reference_training(setup)
    full, losses, _, params, _ = train(setup, stage)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for k in ref:
        torch.testing.assert_close(full[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    layouts = stored_layouts(setup, stage)
    for k, p in params.items():  # stored where the table says: L+dp at stage 3, else L
        _, L, S = layouts[k]
        assert p.spec == (S if stage == 3 else L), k


@pytest.mark.parametrize(
    "stage",
    [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow), 2, 3],
)
def test_func_grad_steps_equal_single_device_adamw(stage):
    """Stages 0 and 1 compute on the params themselves (slow tier); 2 and 3 move them."""
    ref, _ = reference_training("dp4")
    full, _, records, _, _ = train("dp4", stage, "func")
    for k in ref:
        torch.testing.assert_close(full[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    if stage == 2:  # the gradient's reduce-scatter runs inside torch.func's backward too
        assert {r.cause for r in records if r.kind == "reduce_scatter"} == {"zero.grad"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_func_grad_steps_on_dp2_tp2d_equal_single_device_adamw(stage):
    ref, _ = reference_training("dp2_tp2d")
    full, *_ = train("dp2_tp2d", stage, "func")
    for k in ref:
        torch.testing.assert_close(full[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)


# == bytes =================================================================================
def _zero_records(records):
    """ZeRO's records, after checking that the rest is only the loss value's all-reduce."""
    others = [r for r in records if not (r.cause.startswith("zero.") or r.cause == "regather")]
    assert all(r.cause.startswith("nll_loss") and r.bytes < 100 for r in others), others
    return [r for r in records if r not in others]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bytes_per_step_on_dp4_equal_the_formula(stage):
    axes = SETUPS["dp4"][0]
    n, item = axes["dp"], 8
    layouts = stored_layouts("dp4", stage)
    per = {k: pieces(shape, L, S, axes, {}) for k, (shape, L, S) in layouts.items()}
    psi = sum(sum(p) for p in per.values())  # parameter elements (each once)
    longest = max(sum(p[i] for p in per.values()) for i in range(n))  # the bucket's segment
    _, _, records, _, _ = train("dp4", stage)
    got = sum(r.bytes for r in _zero_records(records))
    if stage == 0:  # one all-reduce of all gradients: 2(N-1) * ceil(Ψ/N)
        want = 2 * (n - 1) * -(-psi // n) * item
    elif stage == 1:  # one reduce-scatter + one all-gather of the flat buffer
        want = 2 * (n - 1) * longest * item
    elif stage == 2:  # a reduce-scatter per gradient in backward + the place all-gather
        want = sum((n - 1) * max(p) for p in per.values()) * item + (n - 1) * longest * item
    else:  # gather, re-gather (not the embedding table), reduce-scatter: per tensor
        want = sum((2 if k == "wte" else 3) * (n - 1) * max(p) for k, p in per.items()) * item
    assert got == want
    assert want == pytest.approx((3 if stage == 3 else 2) * psi * item * (n - 1) / n, rel=0.2)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bytes_per_step_on_dp2_tp2d_equal_the_formula(stage):
    """Records over the dp axis; Ψ is one dp group's parameter bytes (its L blocks).

    Norm weights are replicated over r (tp2d splits them over c only) and their
    gradients come partial over dp and r: at stage 0 the one all-reduce of that
    group runs over (dp, r). At stage 3 the forward gather and the gradient's
    reduce-scatter are Ψ(N-1)/N each; a linear weight is re-gathered in backward
    from L+dp straight to tp2d's compute layout: (k-1) x its L+dp block, k the size
    of every axis it gathers (the dp share plus tp2d's own weight gather, redone,
    over (r, dp) at once or one after the other); the embedding table is not.
    """
    axes, make_scheme, c, _ = SETUPS["dp2_tp2d"]
    n, item = axes["dp"], 8
    scheme = make_scheme()
    layouts = stored_layouts("dp2_tp2d", stage)
    coords = tp_coords(axes)
    per = {k: pieces(shape, L, S, axes, coords[0]) for k, (shape, L, S) in layouts.items()}
    for co in coords:  # even sizes: every tp block cuts the same
        assert per == {k: pieces(sh, L, S, axes, co) for k, (sh, L, S) in layouts.items()}
    psi = sum(sum(p) for p in per.values())
    _, _, records, _, _ = train("dp2_tp2d", stage)
    over_dp = [r for r in records if "dp" in r.axes]
    got = sum(r.bytes for r in over_dp if not r.cause.startswith("nll_loss"))
    if stage == 0:
        groups: dict[tuple, int] = {}
        for k, (_, L, _) in layouts.items():
            free = tuple(a for a in ("r", "c") if a not in L.used_axes)
            groups[free] = groups.get(free, 0) + sum(per[k])
        want = 0
        for free, numel in groups.items():
            k_ = n * math.prod(axes[a] for a in free)
            want += 2 * (k_ - 1) * -(-numel // k_) * item
    elif stage in (1, 2):
        want = 2 * (n - 1) * (psi // n) * item
        assert {r.axes for r in over_dp if not r.cause.startswith("nll")} == {("dp",)}
    else:
        gather = sum(r.bytes for r in over_dp if r.cause == "zero.gather")
        scatter = sum(r.bytes for r in over_dp if r.cause == "zero.grad")
        assert gather == scatter == (n - 1) * (psi // n) * item  # Ψ(N-1)/N each
        regather = 0
        for k, (_, L, S) in layouts.items():
            if k == "wte":
                continue
            computed = scheme.compute_layout(gpt.DIMS[k]) if len(L.dims) == 2 else L
            gathered = S.used_axes - computed.used_axes
            regather += (math.prod(axes[a] for a in gathered) - 1) * (sum(per[k]) // n) * item
        assert sum(r.bytes for r in records if r.cause == "regather") == regather
        want = gather + scatter + sum(r.bytes for r in over_dp if r.cause == "regather")
    assert got == want


def _mlp_params(shapes):
    g = torch.Generator().manual_seed(5)
    return {f"w{i}": torch.randn(s, generator=g, dtype=F64) / 3 for i, s in enumerate(shapes)}


def _layer(h, w):
    return torch.tanh(h @ w) if w.ndim == 2 else h * w


def _mlp_loss(c, x):
    """Reads each weight where it is used (no name keeps the previous one alive)."""
    h = x
    for i in range(len(c)):
        h = _layer(h, c[f"w{i}"])
    return h.sum()


def test_mlp_bytes_are_exactly_the_gradient_traffic_for_every_stage():
    """A model whose only dp traffic is ZeRO's: every record counts. Uneven shapes, a vector."""
    n = 4
    shapes = [(10, 7), (7, 9), (9,), (9, 5)]
    mesh = sl.Mesh.simulated({"dp": n})
    x = sl.shard(torch.randn(6, 10, dtype=F64), mesh, sl.P("dp", None)).requires_grad_()
    for stage in range(4):
        z = sl.optim.zero(stage)
        params = z.place({k: sl.shard(v, mesh, sl.P()) for k, v in _mlp_params(shapes).items()})
        with sl.comm_ledger() as led:
            for p in params.values():
                p.requires_grad_()
            with sl.remat_saves():
                loss = _mlp_loss(z.compute(params), x)
            loss.backward()
            grads = z.reduce({k: p.grad for k, p in params.items()})
            z.place({k: v - 0.1 * grads[k] for k, v in z.state(params).items()})
        # dp on dim 0 (the largest dim >= 4 for each): pieces of 3,3,3,1 / 2,2,2,1 / 3,3,3,0 ...
        per = []
        for s in shapes:
            d = max(range(len(s)), key=lambda e: (s[e], -e))
            rest = math.prod(s) // s[d]
            per.append([chunk_len(s[d], n, i) * rest for i in range(n)])
        psi = sum(map(sum, per))
        longest = max(sum(p[i] for p in per) for i in range(n))
        each = sum((n - 1) * max(p) for p in per)
        want = {
            0: 2 * (n - 1) * -(-psi // n),
            1: 2 * (n - 1) * longest,
            2: each + (n - 1) * longest,
            3: 3 * each,
        }[stage]
        assert led.total_bytes == want * 8, stage
        kinds = {0: ["all_reduce"], 1: ["reduce_scatter", "all_gather"]}
        if stage in kinds:  # coalesced: one collective for the four tensors
            assert [r.kind for r in led.records] == kinds[stage]


def test_reduce_and_place_coalesce_per_dtype():
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    z = sl.optim.zero(1)
    shapes = {"a": (7, 4), "b": (4,), "c": (3, 8)}  # dp on dim 0 (uneven), 0, 1
    grads = {}
    for k, s in shapes.items():
        for dt in (torch.float32, F64):
            v = torch.randn(s, dtype=dt)
            grads[f"{k}_{dt}"] = (
                v,
                sl.shard(v, mesh, sl.P(*([None] * (len(s) - 1)), "tp", partial="dp")),
            )
    with sl.comm_ledger() as led:
        out = z.reduce({k: g for k, (_, g) in grads.items()})
    assert sorted((r.kind, r.dtype) for r in led.records) == [
        ("reduce_scatter", "float32"),
        ("reduce_scatter", "float64"),
    ]
    for k, (v, _) in grads.items():  # a 'sum' partial from sl.shard: the value on dp=0
        assert "dp" in out[k].spec.used_axes and not out[k].spec.partial
        torch.testing.assert_close(out[k].full(), v, rtol=0, atol=0)
    with sl.comm_ledger() as led:
        placed = z.place(out)
    assert sorted((r.kind, r.dtype) for r in led.records) == [
        ("all_gather", "float32"),
        ("all_gather", "float64"),
    ]
    for k, (v, g) in grads.items():
        assert placed[k].spec == g.spec.without_partial()
        torch.testing.assert_close(placed[k].full(), v, rtol=0, atol=0)


# == optimizer-state bytes ================================================================
@pytest.mark.parametrize("setup", list(SETUPS))
def test_optimizer_state_bytes_per_device_are_psi_state_over_n(setup):
    axes = SETUPS[setup][0]
    n = axes["dp"]
    layouts = stored_layouts(setup, 0)
    coords = tp_coords(axes)
    for stage in (0, 1, 2, 3):
        *_, state = train(setup, stage)
        moments = [  # mu and nu (not the step count)
            t
            for t in torch.utils._pytree.tree_leaves(state)
            if isinstance(t, sl.ShardedTensor) and t.ndim > 0
        ]
        per_device = [0] * math.prod(axes.values())
        for t in moments:
            for dev, block in enumerate(t.local_shards()):
                per_device[dev] += block.numel() * block.element_size()
        for dev, got in enumerate(per_device):
            co = sl.Mesh.simulated(axes).abstract.coords(dev)
            named = dict(zip(axes, co))
            want = 0
            for shape, L, S in layouts.values():
                p = pieces(shape, L, S, axes, {a: named[a] for a in axes if a != "dp"})
                want += p[named["dp"]] if stage >= 1 else sum(p)
            assert got == 2 * want * 8, (stage, dev)  # mu and nu
        if stage >= 1 and setup == "dp2_tp2d":  # even sizes: exactly Ψ_state / N
            psi_state = 2 * 8 * sum(sum(pieces(*v, axes, coords[0])) for v in layouts.values())
            assert set(per_device) == {psi_state // n}


# == memory ====================================================================================
def _mlp_setup(n=4, h=64, layers=6, rows=4):
    mesh = sl.Mesh.simulated({"dp": n})
    shapes = [(h, h)] * layers
    x = sl.shard(torch.randn(rows, h, dtype=F64), mesh, sl.P("dp", None))
    return mesh, _mlp_params(shapes), x


def test_stage2_holds_about_one_full_gradient_and_stage3_one_gathered_weight():
    """Peak live bytes (all simulated devices together) against bounds from the shapes.

    p = one weight's bytes, N devices, Ψ = all weights' bytes. Backward at stage 2:
    gradient shards Ψ (N devices x Ψ/N) + at most one full gradient per device with
    the collective's buffers (2Np) + activations; stage 0 holds every full gradient
    (NΨ) and must exceed that bound. Forward at stage 3: one gathered weight per
    device (Np) + activations; keeping all would be NΨ.
    """
    n, h, layers, rows = 4, 64, 6, 4
    mesh, w0, x = _mlp_setup(n, h, layers, rows)
    p = h * h * 8
    psi = layers * p
    acts = 4 * layers * rows * h * 8  # a generous bound on the saved activations

    def peaks(stage):
        z = sl.optim.zero(stage)
        params = z.place({k: sl.shard(v, mesh, sl.P()) for k, v in w0.items()})
        for q in params.values():
            q.requires_grad_()
        box = {}

        def forward():
            with sl.remat_saves():
                box["loss"] = _mlp_loss(z.compute(params), x)

        fwd = peak_live_bytes(forward)
        bwd = peak_live_bytes(lambda: box.pop("loss").backward())
        return fwd, bwd

    fwd0, bwd0 = peaks(0)
    _, bwd2 = peaks(2)
    fwd3, _ = peaks(3)
    bound2 = psi + 2 * n * p + acts
    assert bwd2 <= bound2 < bwd0, (bwd2, bound2, bwd0)
    bound3 = n * p + acts
    assert fwd3 <= bound3 < n * psi, (fwd3, bound3)
    assert fwd0 <= acts  # stage 0 gathers nothing


def test_gpt_stage3_forward_holds_one_gathered_weight_at_a_time():
    """gpt reads each weight where it uses it: stage 3's forward peak is the plain forward's
    plus about one gathered weight per device (2x for the gather's buffers)."""
    n = 4
    mesh = sl.Mesh.simulated({"dp": n})
    c = gpt.Config(vocab=64, dim=32, heads=2, layers=3, seq=4)
    p0 = make_params(c)
    largest = max(v.numel() * 8 for v in p0.values())
    psi = sum(v.numel() * 8 for v in p0.values())
    scheme = snn.dp("dp")
    sbatch = scheme.shard_batch(make_batches(c, 4, 4)[0], mesh)

    def forward_peak(stage):
        z = sl.optim.zero(stage)
        params = z.place(snn.shard_params(p0, mesh, scheme, gpt.DIMS(c)))
        for q in params.values():
            q.requires_grad_()

        def forward():
            with snn.use(scheme, mesh), sl.remat_saves():
                gpt.loss(z.compute(params), sbatch, c)

        return peak_live_bytes(forward)

    plain, zero3 = forward_peak(0), forward_peak(3)
    assert zero3 - plain <= 2 * n * largest < n * psi // 2, (plain, zero3, largest, psi)


# == snn.fsdp ====================================================================================
def test_stage3_equals_fsdp_values_and_bytes():
    """The same values after 3 AdamW steps; weight bytes by the same 3(N-1)/N formula.

    snn.fsdp stores matrices split over dp by dim name (vocab > mlp > embed), zero 3 by
    size, and keeps vectors replicated (their gradients all-reduced here, 2(N-1)/N).
    Its vocab-split table is never gathered: the lookup is vocab-parallel (token ids
    and activations move instead, causes ``embedding*`` / ``with_layout``), so fsdp's
    weight traffic (causes ``reshard``, ``regather``) is the formula without ``wte``."""
    axes, _, c, (b, s) = SETUPS["dp4"]
    n, item = axes["dp"], 8
    mesh = sl.Mesh.simulated(axes)
    scheme = snn.fsdp("dp")
    tx = sl.optim.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    params = snn.shard_params(make_params(c), mesh, scheme, gpt.DIMS(c))
    state = tx.init(params)
    for batch in make_batches(c, b, s):
        for p in params.values():
            p.requires_grad_()
        with sl.comm_ledger() as led:
            with snn.use(scheme, mesh), sl.remat_saves():
                loss = gpt.loss(params, scheme.shard_batch(batch, mesh), c)
            loss.backward()
            grads = {
                k: sl.reshard(p.grad, p.grad.spec.without_partial())
                if p.grad.spec.partial
                else p.grad
                for k, p in params.items()
            }
        updates, state = tx.update(grads, state, params)
        params = with_dims(sl.optim.apply_updates(params, updates), c)
    full, _, records, _, _ = train("dp4", 3)
    for k in full:
        torch.testing.assert_close(params[k].full(), full[k], rtol=1e-10, atol=1e-12, msg=k)
    want = 0
    for k, v in make_params(c).items():
        layout = scheme.param_layout(gpt.DIMS[k])
        d = layout.dim_of("dp")
        if d is None:  # a replicated vector: its gradient's all-reduce
            want += 2 * (n - 1) * -(-v.numel() // n) * item
        else:
            block = chunk_len(v.shape[d], n, 0) * (v.numel() // v.shape[d])
            want += (0 if k == "wte" else 3) * (n - 1) * block * item
    fsdp_bytes = sum(r.bytes for r in led.records if r.cause in ("reshard", "regather"))
    assert fsdp_bytes == want
    # both at 3Ψ'(N-1)/N for the weights but the table (uneven sizes pad both a little)
    psi = sum(v.numel() for k, v in make_params(c).items() if k != "wte") * item
    zero_bytes = sum(r.bytes for r in _zero_records(records))
    zero_bytes -= 2 * (n - 1) * max(pieces(*stored_layouts("dp4", 3)["wte"], axes, {})) * item
    for got in (fsdp_bytes, zero_bytes):
        assert got == pytest.approx(3 * psi * (n - 1) / n, rel=0.1)


# == errors ======================================================================================
def test_bad_input_errors():
    mesh = sl.Mesh.simulated({"x": 4})
    w = {"w": sl.shard(torch.zeros(8, 4), mesh, sl.P())}
    with pytest.raises(sl.LayoutError, match=r"axis='dp'.*\('x',\).*no axis 'dp'.*axis='x'"):
        sl.optim.zero(2).place(w)
    for bad in (4, -1, True, "1", 1.0):
        with pytest.raises(sl.LayoutError, match=r"stage is one of 0, 1, 2, 3"):
            sl.optim.zero(bad)
    with pytest.raises(sl.LayoutError, match=r"axis is the name"):
        sl.optim.zero(1, axis=0)
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    split_wrong = {"w": sl.shard(torch.zeros(8, 4), mesh, sl.P(None, "dp"))}  # dim 0 is larger
    with pytest.raises(sl.LayoutError, match=r"params\['w'\].*already split over 'dp'.*snn.dp"):
        sl.optim.zero(1).place(split_wrong)
    major = {"w": sl.shard(torch.zeros(8, 4), mesh, sl.P(("dp", "tp"), None))}  # dp not minor
    with pytest.raises(sl.LayoutError, match=r"already split over 'dp'"):
        sl.optim.zero(3).compute(major)["w"]
    partial = {"w": sl.shard(torch.zeros(8, 4), mesh, sl.P(partial="tp"))}
    with pytest.raises(sl.LayoutError, match=r"partial.*sl.reshard"):
        sl.optim.zero(0).state(partial)
    # a parameter stored as zero makes it (L+dp) is accepted: a resumed stage-3 run
    ok = {"w": sl.shard(torch.ones(8, 4), mesh, sl.P("dp", None))}
    assert sl.optim.zero(3).place(ok)["w"].spec == sl.P("dp", None)
    assert sl.optim.zero(1).place(ok)["w"].spec == sl.P(None, None)


@pytest.mark.parametrize("stage", [0, 1])
def test_reduce_coalesces_gradients_partial_over_dp_and_another_axis(stage):
    """Under dp + a sequence or tensor-parallel axis, norm gradients are partial over both
    axes: `reduce` still moves the whole tree in one collective per axis group (stage 0: one
    all-reduce over both; stage 1: one reduce-scatter over dp, then one all-reduce over sp
    of the scattered bucket), not one per tensor; values equal the float64 sums."""
    mesh = sl.Mesh.simulated({"dp": 2, "sp": 2})
    gen = torch.Generator().manual_seed(3)
    shapes = {"a": (6, 3), "b": (5,), "c": (4, 7)}
    parts = [
        {k: torch.randn(*s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
        for _ in range(4)
    ]
    grads = {
        k: sl.from_local(
            [p[k] for p in parts], mesh, sl.P(*([None] * len(s)), partial=("dp", "sp")), s
        )
        for k, s in shapes.items()
    }
    with sl.comm_ledger() as led:
        out = sl.optim.zero(stage, "dp").reduce(grads)
    want = (
        [("all_reduce", ("dp", "sp"))]
        if stage == 0
        else [("reduce_scatter", ("dp",)), ("all_reduce", ("sp",))]
    )
    assert [(r.kind, r.axes) for r in led.records] == want
    for k in shapes:
        assert not out[k].spec.partial
        torch.testing.assert_close(out[k].full(), sum(p[k] for p in parts), rtol=1e-12, atol=1e-12)
