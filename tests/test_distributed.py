"""Simulated and distributed (gloo) backends give the same shards for the same program.

Covers: every (src, dst) layout pair on a 2-D uneven tensor on {x:4}, {a:2,b:2}
(4 ranks) and sampled pairs on {a:2,b:2,c:2}, {a:2,b:4} (8 ranks), with sum/avg/
max/min partial sources; gradients through `sl.reshard`; `sl.shard(src=0)`;
gradients of uneven leaves (a rank with an empty block decides as the others do);
identical ledgers on both backends; `Mesh.distributed` setup errors.

Tolerances: bitwise where data only moves (no partial source); rtol 1e-6,
atol 1e-6 in float32 where a reduction's order may differ between backends.
Workers are started once per session (see conftest.py).
"""

from __future__ import annotations

import random

import pytest
import torch

import shardlib as sl
from tests._reference import enumerate_layouts

pytestmark = pytest.mark.dist


# == programs run on both backends ============================================
def _layouts(names: tuple[str, ...], ndim: int) -> list[sl.Layout]:
    """Every layout of `names` over a rank-`ndim` tensor, partial ones with op sum."""
    return list(enumerate_layouts(dict.fromkeys(names), ndim, ("sum",)))


def _value(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-50, 50, shape, generator=g).to(dtype)


def _partial_source(mesh, value, layout):
    """Shards whose reduction over the partial axes is `value` (not just value-on-device-0)."""
    shards = []
    ref = sl.Mesh.simulated(mesh.axes)
    blocks = sl.shard(value, ref, layout.without_partial()).local_shards()
    k = ref.group_size(layout.partial)
    for dev in mesh.local_devices:
        j = ref.index_along(dev, layout.partial)
        b = blocks[dev]
        op = layout.reduce_op
        if op in ("sum", "avg"):
            noise = (torch.arange(b.numel()).reshape(b.shape) % 5).to(b.dtype)
            s = (b if op == "avg" or j == 0 else torch.zeros_like(b)) + noise * (
                1 - k if j == 0 else 1
            )
        elif op == "max":
            s = b - 3 * j
        else:
            s = b + 3 * j
        shards.append(s.contiguous())
    return sl.from_local(shards, mesh, layout, tuple(value.shape))


def run_pairs(mesh, shape, pairs, dtype=torch.float32):
    """Reshard a seeded value along each (src, dst) pair; return local shards and ledgers."""
    value = _value(shape, dtype)
    out = []
    for src, dst in pairs:
        x = _partial_source(mesh, value, src) if src.partial else sl.shard(value, mesh, src)
        with sl.comm_ledger() as led:
            y = sl.reshard(x, dst)
        out.append(
            ([s.clone() for s in y.local_shards()], [tuple(vars_of(r)) for r in led.records])
        )
    return out


def vars_of(r):
    return (r.kind, r.axes, r.group_size, r.bytes, r.dtype, r.direction, r.cause)


def run_grad(mesh, shape, cases):
    """Gradient of sum(reshard(x, dst) * w) w.r.t. x, with partial or sharded cotangents."""
    value = _value(shape, torch.float64)
    w = _value(shape, torch.float64, seed=1)
    out = []
    for src, dst, g_layout in cases:
        x = sl.shard(value, mesh, src).requires_grad_()
        y = sl.reshard(x, dst)
        g = _partial_source(mesh, w, g_layout) if g_layout.partial else sl.shard(w, mesh, g_layout)
        with sl.comm_ledger() as led:
            (gx,) = torch.autograd.grad(y, x, grad_outputs=g)
        out.append(
            (
                gx.spec,
                [s.clone() for s in gx.local_shards()],
                gx.full(),
                [vars_of(r) for r in led.records],
            )
        )
    return out


def run_uneven_leaf_grads(mesh):
    """``(a * b).sum()`` backward, `a` split 6 columns over 4 devices (the last holds none)
    and `b` over both dims: each leaf's gradient (its layout, this process's blocks, the
    full value) and the backward ledger."""
    a = sl.shard(_value((4, 6), torch.float64), mesh, sl.P(None, ("a", "b"))).requires_grad_()
    b = sl.shard(_value((4, 6), torch.float64, seed=1), mesh, sl.P("a", "b")).requires_grad_()
    with sl.comm_ledger() as led:
        (a * b).sum().backward()
    return [
        (x.grad.spec, [s.clone() for s in x.grad.local_shards()], x.grad.full()) for x in (a, b)
    ], [vars_of(r) for r in led.records]


def run_shard_src(mesh, shape, layouts):
    value = _value(shape, torch.float32) if 0 in mesh.local_devices else None
    out = []
    for layout in layouts:
        with sl.comm_ledger() as led:
            x = sl.shard(value, mesh, layout, src=0)
        out.append(([s.clone() for s in x.local_shards()], [vars_of(r) for r in led.records]))
    return out


def pickle_on_a_rank(mesh):
    """torch.save / deepcopy of a ShardedTensor on a distributed mesh: a clear error each."""
    import copy
    import io

    x = sl.shard(torch.ones(8, 4), mesh, sl.P("x", None))
    messages = []
    for attempt in (lambda: torch.save(x, io.BytesIO()), lambda: copy.deepcopy(x)):
        try:
            attempt()
            messages.append(None)
        except sl.ShardlibError as e:
            messages.append(str(e))
    return messages


def wrong_world(mesh):
    try:
        sl.Mesh.distributed({"x": mesh.size + 1})
    except sl.ShardlibError as e:
        return str(e)
    return None


# == comparison ================================================================
def _compare(sim_out, dist_outs, pairs, mesh_size):
    for i, (src, dst) in enumerate(pairs):
        sim_shards, sim_led = sim_out[i]
        for rank in range(mesh_size):
            (got,), led = dist_outs[rank][i]
            want = sim_shards[rank]
            assert got.shape == want.shape, (src, dst, rank)
            if src.partial or dst.partial:
                torch.testing.assert_close(
                    got, want, rtol=1e-6, atol=1e-6, msg=f"{src}->{dst} rank {rank}"
                )
            else:
                assert torch.equal(got, want), f"{src!r} -> {dst!r} rank {rank}"
            assert led == sim_led, f"ledger differs for {src!r} -> {dst!r}"


def _check_backends(workers, axes, shape, pairs):
    sim = run_pairs(sl.Mesh.simulated(axes), shape, pairs)
    dist_outs = workers.run(run_pairs, axes, (shape, pairs))
    _compare(sim, dist_outs, pairs, workers.nprocs)


@pytest.mark.parametrize("axes", [{"x": 4}, {"a": 2, "b": 2}])
def test_every_pair_matches_simulated_4_ranks(workers4, axes):
    names = tuple(axes)
    layouts = _layouts(names, 2)
    pairs = [(s, d) for s in layouts for d in layouts if s != d]
    # partial sources with each reduce op
    for op in ("avg", "max", "min"):
        pairs += [(sl.Layout(s.dims, s.partial, op), d) for s, d in pairs if s.partial][:40]
    _check_backends(workers4, axes, (10, 5), pairs)


@pytest.mark.parametrize("axes", [{"a": 2, "b": 2, "c": 2}, {"a": 2, "b": 4}])
def test_sampled_pairs_match_simulated_8_ranks(workers8, axes):
    rng = random.Random(0)
    for shape in [(8, 6, 4), (9, 5, 3)]:
        layouts = _layouts(tuple(axes), len(shape))
        pairs = [tuple(rng.sample(layouts, 2)) for _ in range(60)]
        _check_backends(workers8, axes, shape, pairs)


def test_dtypes_match_simulated(workers4):
    axes = {"a": 2, "b": 2}
    pairs = [
        (sl.P("a", "b"), sl.P("b", "a")),
        (sl.P(("a", "b"), None), sl.P(None, ("a", "b"))),
        (sl.P("a", None), sl.P(None, None)),
        (sl.P(None, None, partial="a"), sl.P("a", "b")),
    ]
    for dtype in (torch.float64, torch.bfloat16, torch.int64):
        sim = run_pairs(sl.Mesh.simulated(axes), (7, 6), pairs, dtype)
        dist_outs = workers4.run(run_pairs, axes, ((7, 6), pairs, dtype))
        _compare(sim, dist_outs, pairs, 4)


def test_gradients_match_simulated(workers4):
    axes = {"a": 2, "b": 2}
    P = sl.P
    cases = [
        (P("a", None), P(None, None), P(None, None, partial="a")),  # backward reduce_scatter
        (P("a", None), P(None, None), P(None, None)),  # replicated cotangent: slice only
        (P("a", "b"), P("b", "a"), P("b", "a")),
        (P(None, "b"), P("a", None), P(None, None, partial=("a", "b"))),
    ]
    sim = run_grad(sl.Mesh.simulated(axes), (6, 5), cases)
    dist_outs = workers4.run(run_grad, axes, ((6, 5), cases))
    w = _value((6, 5), torch.float64, seed=1)
    for i, (src, _, _g) in enumerate(cases):
        layout, sim_shards, sim_full, sim_led = sim[i]
        assert layout == src.without_partial()
        torch.testing.assert_close(sim_full, w, rtol=1e-12, atol=0)
        assert all(r[5] == "backward" for r in sim_led)
        for rank in range(4):
            d_layout, (got,), d_full, d_led = dist_outs[rank][i]
            assert d_layout == layout and d_led == sim_led
            torch.testing.assert_close(got, sim_shards[rank], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(d_full, w, rtol=1e-12, atol=0)
    kinds = [[r[0] for r in s[3]] for s in sim]
    assert kinds[0] == ["reduce_scatter"] and kinds[1] == []


def test_uneven_leaf_gradients_take_the_same_decisions_on_every_rank(workers4):
    """Whether a leaf's gradient is moved to the leaf's layout is decided on the largest
    block any device holds, never on this process's own: with the rank holding an empty
    block deciding differently, the other ranks waited in the move's all-to-all forever."""
    axes = {"a": 2, "b": 2}
    sim_grads, sim_led = run_uneven_leaf_grads(sl.Mesh.simulated(axes))
    want = [_value((4, 6), torch.float64, seed=1), _value((4, 6), torch.float64)]  # d(a*b)
    for (_, _, full), w in zip(sim_grads, want, strict=True):
        torch.testing.assert_close(full, w, rtol=0, atol=0)
    for rank, (grads, led) in enumerate(workers4.run(run_uneven_leaf_grads, axes, ())):
        assert led == sim_led, rank
        for (layout, (got,), full), (s_layout, s_shards, _), w in zip(grads, sim_grads, want):
            assert layout == s_layout, rank
            assert torch.equal(got, s_shards[rank]) and torch.equal(full, w), rank


def test_shard_from_source_rank(workers4):
    axes = {"a": 2, "b": 2}
    layouts = [
        sl.P(None, None),
        sl.P("a", "b"),
        sl.P(("a", "b"), None),
        sl.P(None, "a", partial="b"),
    ]
    sim = run_shard_src(sl.Mesh.simulated(axes), (9, 6), layouts)
    dist_outs = workers4.run(run_shard_src, axes, ((9, 6), layouts))
    for i, layout in enumerate(layouts):
        shards, led = sim[i]
        assert led and led[0][0] == ("broadcast" if not any(layout.dims) else "scatter")
        for rank in range(4):
            (got,), d_led = dist_outs[rank][i]
            assert torch.equal(got, shards[rank]) and d_led == led


def test_pickling_on_a_distributed_mesh_points_to_checkpoint(workers4):
    for messages in workers4.run(pickle_on_a_rank, {"x": 4}):
        assert messages[0] and "sl.checkpoint" in messages[0]
        assert messages[1] is None  # deepcopy clones this rank's shards, no pickling


def test_mesh_size_must_match_world(workers4):
    messages = workers4.run(wrong_world, {"x": 4})
    assert all(m and "world has 4 processes" in m and "5 devices" in m for m in messages)
