"""Torch's semantics on sharded tensors: every case of issue 6's "What was found".

Each test runs the same program on plain torch and on ShardedTensors (simulated
mesh {x: 4} unless stated) and compares values exactly (integer-valued or
float64 data; tolerances stated where a reduction order may differ):
aliasing views and in-place writes, `.data`, module dtype conversion, the
dropped move cache, DTensor input, serialization and host-memory methods,
partial semantics, `out=`, random ops under the same seed and strides, casts
and `.to` with gradients, `torch.masked`, shape-inference errors, shard_map
edge cases, in-place ops inside torch's own decompositions, partial gradients
with torch utilities, `inference_mode`, and fills.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib import P

MESH = sl.Mesh.simulated({"x": 4})


def sh(t: torch.Tensor, layout: sl.Layout, mesh: sl.Mesh = MESH) -> sl.ShardedTensor:
    return sl.shard(t, mesh, layout)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _ints(*shape: int) -> torch.Tensor:
    return torch.arange(float(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)


def _partial_sum(value: torch.Tensor, mesh: sl.Mesh = MESH, axis: str = "x") -> sl.ShardedTensor:
    """Integer-valued, non-trivial summands of `value` over `axis` (exact sums)."""
    k = mesh.axes[axis]
    parts = [torch.full_like(value, float(i + 1)) for i in range(k - 1)]
    parts.append(value - sum(parts))
    layout = P(*([None] * value.ndim), partial=axis)
    return sl.from_local(
        [parts[mesh.index_along(d, (axis,))] for d in range(mesh.size)],
        mesh,
        layout,
        tuple(value.shape),
    )


# == 1, 2: views and in-place writes ===========================================
def test_in_place_write_through_a_slice_across_a_split_dim_lands_in_the_base():
    ref = torch.ones(8, 4)
    ref[2:5].mul_(0)
    t = sh(torch.ones(8, 4), P("x", None))
    t[2:5].mul_(0)
    assert torch.equal(t.full(), ref) and t.full().sum() == 20
    ref2 = torch.ones(8, 4)
    ref2[:, 1].zero_()
    t2 = sh(torch.ones(8, 4), P(None, "x"))
    t2[:, 1].zero_()
    assert torch.equal(t2.full(), ref2)


def test_a_view_that_needed_communication_sees_later_writes_to_its_base():
    ref = _ints(10, 4)
    t = sh(ref.clone(), P("x", None))  # 10 rows over 4 devices: 3, 3, 3, 1
    v, v_ref = t.view(-1), ref.view(-1)
    s, s_ref = t[2:7], ref[2:7]
    r, r_ref = t.reshape(5, 8), ref.reshape(5, 8)
    t.add_(1)
    ref.add_(1)
    with sl.comm_ledger() as led:
        got = [v.full(), s.full(), r.full()]
    assert all(torch.equal(g, w) for g, w in zip(got, (v_ref, s_ref, r_ref)))
    assert any(rec.cause.startswith("refresh:") for rec in led.records)


def test_writes_through_a_communicated_view_reach_the_base_and_other_views():
    ref = _ints(10, 4)
    t = sh(ref.clone(), P("x", None))
    v, v_ref = t.view(-1), ref.view(-1)
    s, s_ref = t[2:7], ref[2:7]
    v[5:20].mul_(-1)
    v_ref[5:20].mul_(-1)
    s[:, 2] = 7.0
    s_ref[:, 2] = 7.0
    for got, want in ((t, ref), (v, v_ref), (s, s_ref)):
        assert torch.equal(got.full(), want)


def test_in_place_ops_on_views_of_partial_values():
    ref = _ints(6, 4)
    t = _partial_sum(ref.clone())
    v = t[1:4]
    t.mul_(-1)
    ref.mul_(-1)
    assert torch.equal(v.full(), ref[1:4])
    v.relu_()  # needs the value: the family is reduced in place, then clamped
    ref[1:4].relu_()
    assert torch.equal(t.full(), ref) and torch.equal(v.full(), ref[1:4])
    assert not t.spec.partial and not v.spec.partial


def test_strides_and_contiguity_are_torch_s():
    ref = _ints(8, 4)
    t = sh(ref.clone(), P("x", None))
    for f in (
        lambda a: a.t(),
        lambda a: a[:, 1:3],
        lambda a: a.expand(2, 8, 4),
        lambda a: a.t().contiguous(),
        lambda a: a.transpose(0, 1)[1:],
    ):
        got, want = f(t), f(ref)
        assert got.stride() == want.stride() and got.is_contiguous() == want.is_contiguous()
        assert got.storage_offset() == want.storage_offset()
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        ref.t().view(-1)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        t.t().view(-1)


# == 3, 4: .data and module conversion =========================================
def test_data_assignment_replaces_the_value():
    ref = _ints(8, 4)
    ref.data = ref.data * 3
    t = sh(_ints(8, 4), P("x", None))
    t.data = t.data * 3
    assert torch.equal(t.full(), ref)
    with pytest.raises(sl.LayoutError, match="must be sharded too"):
        t.data = torch.zeros(8, 4)


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.double(),
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.float(),
        lambda m: m.to(torch.float64),
        lambda m: m.type(torch.float64),
    ],
)
def test_module_dtype_conversion_keeps_shards_and_wrapper_in_step(convert):
    torch.manual_seed(0)
    plain = torch.nn.Linear(4, 8)
    sharded = copy.deepcopy(plain)
    sharded.weight = torch.nn.Parameter(sh(plain.weight.detach().clone(), P("x", None)))
    sharded.bias = torch.nn.Parameter(sh(plain.bias.detach().clone(), P("x")))
    convert(plain)
    convert(sharded)
    for name, p in sharded.named_parameters():
        assert p.dtype == getattr(plain, name).dtype
        assert all(s.dtype == p.dtype for s in p.local_shards())
        assert isinstance(p, torch.nn.Parameter)
    x = torch.randn(3, 4).to(plain.weight.dtype)
    # the same math blocked differently: torch's default tolerances for the dtype
    torch.testing.assert_close(sharded(sh(x, P())).full(), plain(x))


# == 5: the move cache is gone ===================================================
def test_implicit_moves_see_shard_edits_and_ledgers_repeat():
    a = sh(_rand(8, 8), P(None, "x"))
    w = sh(_rand(8, 4, seed=1), P())
    ledgers = []
    for _ in range(2):
        with sl.comm_ledger() as led:
            y = a @ sl.reshard(w, P("x", None))
            _ = y.full()
        ledgers.append([(r.kind, r.bytes, r.cause) for r in led.records])
    assert ledgers[0] == ledgers[1]
    b = sh(_rand(8, 8, seed=2), P("x", None))
    first = (b @ w).full()
    for s in b.local_shards():
        s.mul_(2)  # edit the shards in place
    torch.testing.assert_close((b @ w).full(), 2 * first, rtol=1e-12, atol=1e-12)
    with sl.comm_ledger() as l1:
        (b @ w).full()
    with sl.comm_ledger() as l2:
        (b @ w).full()
    assert [r.kind for r in l1.records] == [r.kind for r in l2.records] != []


def test_no_gathered_copy_outlives_the_op():
    w = sh(torch.ones(64, 64), P(None, "x"))  # the op below needs it gathered
    x = sh(torch.ones(4, 64), P())
    gc.collect()
    before = sum(type(o) is sl.ShardedTensor for o in gc.get_objects())
    y = x @ w.t()
    del y
    gc.collect()
    after = sum(type(o) is sl.ShardedTensor for o in gc.get_objects())
    assert after <= before


# == 7: DTensor input ==========================================================
def test_shard_of_a_dtensor_names_the_bridge():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.tensor import DTensor, Replicate
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        dmesh = dist.device_mesh.init_device_mesh("cpu", (1,))
        dt = DTensor.from_local(torch.ones(4), dmesh, [Replicate()])
        with pytest.raises(sl.LayoutError, match="from_dtensor"):
            sl.shard(dt, MESH, P("x"))
    finally:
        dist.destroy_process_group()


# == 8: serialization and host memory ===========================================
def test_save_load_deepcopy_and_pickle_round_trip():
    x = _partial_sum(_ints(5, 3))
    y = sh(_ints(7, 2), P("x", None)).requires_grad_()
    for t in (x, y):
        buf = io.BytesIO()
        torch.save(t, buf)
        for weights_only in (False, True):
            buf.seek(0)
            back = torch.load(buf, weights_only=weights_only)
            assert back.spec == t.spec and back.mesh == t.mesh
            assert torch.equal(back.full(), t.full()) and back.requires_grad == t.requires_grad
        c = copy.deepcopy(t)
        assert torch.equal(c.full(), t.full()) and c.spec == t.spec
        assert c.local_shards()[0].data_ptr() != t.local_shards()[0].data_ptr()
        p = pickle.loads(pickle.dumps(t))
        assert torch.equal(p.full(), t.full())
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(y * 2)


def test_host_memory_and_conversions():
    ref = _ints(5, 3)
    x = sh(ref.clone(), P("x", None))
    assert x.share_memory_() is x and x.is_shared()
    assert not x.is_pinned()
    assert x.tolist() == ref.tolist()
    assert (x.numpy() == ref.numpy()).all()
    assert torch.equal(x, sh(ref.clone(), P(None, "x"))) and not torch.equal(x, sh(ref + 1, P()))
    assert torch.allclose(x, sh(ref.clone(), P()))
    assert torch.equal(x.any(), ref.any()) and torch.equal(x.all(1), ref.all(1))


# == 9: partial semantics, out=, random ops, casts ================================
def test_negated_partial_max_and_scalars_on_partial_sums():
    value = _rand(8, 3)
    x = sh(value, P("x", None))
    torch.testing.assert_close((-x.amax(0)).full(), -value.amax(0), rtol=0, atol=0)
    torch.testing.assert_close((-x.amin(0)).full(), -value.amin(0), rtol=0, atol=0)
    s = _partial_sum(_ints(3, 2))
    for f in (lambda a: a + True, lambda a: a + 1j, lambda a: a - 2, lambda a: 3 + a):
        assert torch.equal(f(s).full(), f(_ints(3, 2)))


def test_addmv_with_a_broadcast_bias_on_an_uneven_row_split():
    a, v, b = _rand(3, 4), _rand(4, seed=1), _rand(1, seed=2)
    got = torch.addmv(sh(b, P()), sh(a, P("x", None)), sh(v, P()))
    for dev, s in enumerate(got.local_shards()):
        assert s.shape[0] == (1 if dev < 3 else 0)
    torch.testing.assert_close(got.full(), torch.addmv(b, a, v), rtol=1e-12, atol=1e-12)


def test_out_variants_write_their_out_argument():
    a, b = _ints(8, 4), _ints(8, 4) + 1
    for lay_out in (P("x", None), P(None, "x"), P()):
        out = sh(torch.zeros(8, 4, dtype=torch.float64), lay_out)
        before = out.spec
        got = torch.add(sh(a, P("x", None)), sh(b, P()), out=out)
        assert got is out and out.spec == before and torch.equal(out.full(), a + b)
    with pytest.raises(sl.LayoutError, match="cannot be resized"):
        torch.add(sh(a, P()), sh(b, P()), out=sh(torch.zeros(2, 4, dtype=torch.float64), P()))


@pytest.mark.parametrize(
    "draw",
    [
        lambda t: torch.randn_like(t, device="cpu"),
        lambda t: torch.rand_like(t.t()),
        lambda t: F.dropout(t.t(), 0.5),
        lambda t: t.t().uniform_(),
        lambda t: torch.rand_like(t),
    ],
)
def test_random_ops_match_torch_under_the_same_seed(draw):
    value = _ints(6, 5)
    for layout in (P("x", None), P(None, "x"), P()):
        torch.manual_seed(7)
        want = draw(value.clone())
        torch.manual_seed(7)
        got = draw(sh(value.clone(), layout))
        assert torch.equal(got.full(), want)


@pytest.mark.parametrize(
    "f",
    [
        lambda x: x.float().sum(),
        lambda x: x.half().float().sum(),
        lambda x: x.to(torch.float32).sum(),
        lambda x: F.softmax(x, -1, dtype=torch.float32).pow(2).sum(),
        lambda x: x.to("cpu", torch.float32).sum(),
        lambda x: x.to(torch.ones(1, dtype=torch.float32)).sum(),
    ],
)
def test_casts_and_to_in_forward_and_backward(f):
    value = _rand(8, 6)
    x = sh(value, P("x", None)).requires_grad_()
    f(x).backward()
    xr = value.clone().requires_grad_()
    f(xr).backward()
    torch.testing.assert_close(x.grad.full(), xr.grad, rtol=1e-3, atol=1e-3)  # fp16/fp32 casts


def test_torch_masked_and_empty_softmax_and_layout_attribute():
    value = _rand(8, 6)
    x, m = sh(value, P("x", None)), sh(value > 0, P("x", None))
    assert x.layout == torch.strided and x.spec == P("x", None)
    torch.testing.assert_close(
        torch.masked.sum(x, 1, mask=m).full(), torch.masked.sum(value, 1, mask=value > 0)
    )
    e = torch.randn(0, 4)
    assert torch.equal(F.softmax(sh(e, P("x", None)), 0).full(), F.softmax(e, 0))


def test_shape_inference_errors_are_shardlib_errors_and_runtime_errors():
    x = sh(_rand(4, 6), P("x", None))
    with pytest.raises(sl.ShardlibError, match="rejected the call") as info:
        x @ sh(_rand(5, 2), P())
    assert isinstance(info.value, RuntimeError)


def test_shard_map_pads_short_out_layouts_and_refuses_second_order():
    f = sl.shard_map(lambda a: a * 2, MESH, in_layouts=(P(),), out_layouts=P())
    y = f(sh(torch.ones(4), P()))
    assert y.spec == P(None) and torch.equal(y.full(), torch.full((4,), 2.0))
    g = sl.shard_map(lambda a: sl.psum(a * a, "x"), MESH, in_layouts=(P("x"),), out_layouts=P())
    x = sh(_rand(8), P("x")).requires_grad_()
    with pytest.raises(sl.ShardMapError, match="second-order"):
        torch.autograd.grad(g(x).sum(), x, create_graph=True)


def test_in_place_ops_inside_torch_decompositions_and_backward_formulas():
    a = _rand(8, 5)
    y = torch.sign(_rand(8, seed=3))
    cases = [
        lambda u, w, t: F.margin_ranking_loss(u[:, 0], w[:, 1], t),
        lambda u, w, t: F.cosine_embedding_loss(u, w, t),
        lambda u, w, t: u.index_select(1, torch.tensor([0, 3, 4])).pow(2).sum() + w.sum(),
    ]
    for f in cases:
        u, w = sh(a, P("x", None)).requires_grad_(), sh(a.flip(0), P("x", None)).requires_grad_()
        loss = f(u, w, sh(y, P("x")))
        loss.backward()
        ur, wr = a.clone().requires_grad_(), a.flip(0).clone().requires_grad_()
        ref = f(ur, wr, y)
        ref.backward()
        torch.testing.assert_close(loss.full(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(u.grad.full(), ur.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w.grad.full(), wr.grad, rtol=1e-12, atol=1e-12)


def test_in_place_op_on_a_partial_result_reduces_in_place():
    a, w = _rand(8, 4), _rand(4, 4, seed=1)
    y = sh(a, P(None, "x")) @ sh(w, P("x", None))
    assert y.spec.partial
    with sl.comm_ledger() as led:
        y.relu_()
    assert [r.kind for r in led.records] == ["all_reduce"] and not y.spec.partial
    torch.testing.assert_close(y.full(), (a @ w).relu(), rtol=1e-12, atol=1e-12)


# == also seen ====================================================================
def test_clip_grad_value_on_a_partial_gradient():
    w_val, x_val = _rand(4, 3), _rand(8, 4, seed=1)
    w = sh(w_val, P()).requires_grad_()
    (sh(x_val, P("x", None)) @ w).pow(2).sum().backward()
    assert w.grad.spec.partial
    wr = w_val.clone().requires_grad_()
    (x_val @ wr).pow(2).sum().backward()
    torch.nn.utils.clip_grad_value_([w], 1.0)
    torch.nn.utils.clip_grad_value_([wr], 1.0)
    torch.testing.assert_close(w.grad.full(), wr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_composite_ops_run_under_inference_mode_and_no_grad(mode):
    a, w = _rand(8, 6), _rand(6, 4, seed=1)
    with mode():
        x, y = sh(a, P("x", None)), sh(w, P(None, "x"))
        got = [x @ y, F.linear(x, y.t()), torch.einsum("ij,jk->ik", x, y), F.layer_norm(x, (6,))]
        want = [a @ w, F.linear(a, w.t()), a @ w, F.layer_norm(a, (6,))]
        for g, r in zip(got, want):
            torch.testing.assert_close(g.full(), r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", [P(), P("x", None), P(None, "x"), P(None, None, partial="x")])
def test_fills_and_setitem(layout):
    for program in (
        lambda t: t.__setitem__(slice(2, 5), 0),
        lambda t: t.__setitem__((slice(None), 1), 7.0),
        lambda t: t.__setitem__(1, torch.arange(4.0, dtype=torch.float64)),
        lambda t: torch.nn.init.constant_(t, 2.5),
        lambda t: t.fill_(torch.tensor(3.0, dtype=torch.float64)),
        lambda t: t.zero_(),
    ):
        ref = _ints(10, 4)
        t = sh(ref.clone(), layout)
        before = t.spec
        with torch.no_grad():
            program(ref)
            program(t)
        assert torch.equal(t.full(), ref) and t.spec == before


def test_nll_loss_total_weight_over_a_split_class_dim():
    """Found by sl.check_replicas: the owning device alone counted the target's weight."""
    mesh = sl.Mesh.simulated({"y": 2})
    x = _rand(4)
    for target in (0, 3):
        for reduction in (0, 1, 2):
            got = torch.ops.aten.nll_loss_forward(
                sh(x, P("y"), mesh), torch.tensor(target), None, reduction, -100
            )
            want = torch.ops.aten.nll_loss_forward(x, torch.tensor(target), None, reduction, -100)
            for g, w in zip(got, want):
                torch.testing.assert_close(g.full(), w, rtol=1e-12, atol=1e-12)


def test_tensor_split_with_sharded_split_points():
    """torch reads a tensor of split points in C++ before dispatch: shardlib reads it out."""
    x, points = _rand(7, 3), torch.tensor([1, 4])
    for args in ((sh(x, P("x", None)), sh(points, P("x"))), (x, sh(points, P("x")))):
        got = torch.tensor_split(*args)
        for g, w in zip(got, torch.tensor_split(x, points)):
            assert torch.equal(g.full() if isinstance(g, sl.ShardedTensor) else g, w)
    got = sh(x, P("x", None)).tensor_split(sh(torch.tensor(3), P()))
    assert all(torch.equal(g.full(), w) for g, w in zip(got, x.tensor_split(3)))
