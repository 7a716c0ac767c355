"""Gradients through `sl.reshard` and the aten ops autograd issues on sharded tensors.

DESIGN §4, last paragraph: the cotangent of ``sl.reshard(x, dst)`` is resharded
to ``x.spec`` with its partial axes made replicated (the gradient of a
summand is the whole gradient). Covered here, on simulated meshes:

- for every (src, dst) pair on {a:2,b:2} (2-d, uneven) and {a:3,b:2} (1-d),
  partial sources with every reduce op included: the gradient of
  ``(sl.reshard(x, dst).full() * w).sum()`` w.r.t. the ShardedTensor leaf is a
  ShardedTensor in ``src`` without partial whose value is ``w``;
- with ``grad_outputs`` given as replicated, partial (non-trivial summands)
  and sharded ShardedTensors: the value, the layout, and that the ledger shows
  exactly the plan from the cotangent's layout to the target, every record
  with ``direction == "backward"`` (e.g. a gather's partial cotangent gives
  one backward reduce_scatter, a replicated one gives no collective);
- gradients into `sl.shard`'s plain input and into `sl.from_local`'s shards;
- the aten ops autograd itself issues: detach, alias, ones_like / zeros_like /
  empty_like, add / add_ of equal layouts (a leaf used twice accumulates),
  copy_; and the ``.grad`` guard against plain tensors.

Values are integers in float64, so every comparison is bitwise (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch

import shardlib as sl
from tests._reference import arange_value, block, enumerate_layouts, make_summands

P = sl.P


def _weights(shape) -> torch.Tensor:
    """An integer-valued float64 weight with both signs (distinct from the value)."""
    return (arange_value(shape) * 3 % 7) - 2


def _leaf(mesh: sl.Mesh, shape, layout: sl.Layout) -> sl.ShardedTensor:
    shards = make_summands(arange_value(shape), layout, mesh.axes)
    return sl.from_local(shards, mesh, layout, tuple(shape)).requires_grad_()


def _sharded(mesh: sl.Mesh, value: torch.Tensor, layout: sl.Layout) -> sl.ShardedTensor:
    """`value` as a ShardedTensor of `layout`, partial ones with non-trivial summands."""
    return sl.from_local(make_summands(value, layout, mesh.axes), mesh, layout, tuple(value.shape))


def _assert_is(g, value: torch.Tensor, layout: sl.Layout, mesh: sl.Mesh, where: str) -> None:
    assert isinstance(g, sl.ShardedTensor), f"{where}: gradient is a {type(g).__name__}"
    assert g.spec == layout, f"{where}: gradient layout {g.spec!r}, want {layout!r}"
    if layout.partial:
        assert torch.equal(g.full(), value), where
        return
    for dev, s in enumerate(g.local_shards()):
        assert torch.equal(s, block(value, layout, mesh.axes, dev)), f"{where}: device {dev}"


# == every pair, plain cotangent through full() ================================
@pytest.mark.parametrize(
    ("axes", "shape"), [({"a": 2, "b": 2}, (5, 3)), ({"a": 3, "b": 2}, (7,)), ({"x": 4}, (2, 3, 5))]
)
def test_grad_every_pair(axes, shape):
    mesh = sl.Mesh.simulated(axes)
    w = _weights(shape)
    layouts = list(enumerate_layouts(axes, len(shape)))
    for src in layouts:
        for dst in layouts:
            x = _leaf(mesh, shape, src)
            loss = (sl.reshard(x, dst).full() * w).sum()
            with sl.comm_ledger() as led:
                (g,) = torch.autograd.grad(loss, x)
            where = f"{src!r} -> {dst!r}"
            _assert_is(g, w, src.without_partial(), mesh, where)
            assert all(r.direction == "backward" for r in led.records), where


# == explicit cotangents =======================================================
MESH22 = {"a": 2, "b": 2}
SHAPE = (5, 3)
# Cotangent layouts: every non-partial layout and every partial-sum layout.
COTANGENTS = list(enumerate_layouts(MESH22, 2, ("sum",)))
DSTS = [P(None, None), P("a", "b"), P(None, ("b", "a")), P("b", None, partial="a")]


@pytest.mark.parametrize("dst", DSTS, ids=str)
def test_grad_outputs_any_layout(dst):
    """grad_outputs in every layout: value, layout, and the backward ledger = one plan."""
    mesh = sl.Mesh.simulated(MESH22)
    w = _weights(SHAPE)
    n = 0
    for src in enumerate_layouts(MESH22, 2):
        target = src.without_partial()
        for cot in COTANGENTS:
            x = _leaf(mesh, SHAPE, src)
            y = sl.reshard(x, dst)
            gy = _sharded(mesh, w, cot)
            with sl.comm_ledger() as led:
                (g,) = torch.autograd.grad(y, x, grad_outputs=gy)
            where = f"{src!r} -> {dst!r}, cotangent {cot!r}"
            if src == dst:  # reshard is the identity: the cotangent reaches the leaf ...
                reordered = cot.dims != target.dims and all(
                    set(a) == set(b) for a, b in zip(cot.dims, target.dims)
                )
                if not reordered and max(t.numel() for t in gy.local_shards()) <= max(
                    t.numel() for t in x.local_shards()
                ):
                    assert g is gy and not led.records, where  # ... no larger: as it came
                    continue
                # ... larger than the leaf's blocks, or its axes in another order: moved to
                # its layout by the leaf's hook, partial axes it is replicated on kept
                used = {a for axes in target.dims for a in axes}
                keep = tuple(a for a in cot.partial if a not in used)
                final = sl.Layout(target.dims, keep) if keep else target
                assert g.spec == final, where
                want = sl.plan(cot, final, SHAPE, mesh, torch.float64)
                assert led.total_bytes == want.total_bytes, where
                torch.testing.assert_close(g.full(), w, rtol=1e-12, atol=1e-12)
                continue
            _assert_is(g, w, target, mesh, where)
            want = sl.plan(cot, target, SHAPE, mesh, torch.float64)
            steps = [(s.step.kind, s.bytes) for s in want.steps if s.step.kind is not None]
            assert [(r.kind, r.bytes) for r in led.records] == steps, where
            assert led.total_bytes == want.total_bytes, where
            assert all(r.direction == "backward" and r.cause == "reshard" for r in led.records)
            n += 1
    assert n == 38 * len(COTANGENTS)  # every source but dst itself


def _backward_records(mesh, src, dst, cot, shape=(8, 4)):
    w = _weights(shape)
    x = _leaf(mesh, shape, src)
    with sl.comm_ledger() as led:
        y = sl.reshard(x, dst)
        (g,) = torch.autograd.grad(y, x, grad_outputs=_sharded(mesh, w, cot))
    _assert_is(g, w, src.without_partial(), mesh, f"{src!r} -> {dst!r}")
    fwd = [(r.kind, r.axes) for r in led.records if r.direction == "forward"]
    bwd = [(r.kind, r.axes, r.group_size) for r in led.records if r.direction == "backward"]
    return fwd, bwd


def test_gather_backward_by_cotangent():
    """all_gather P("x", None) -> P(None, None): backward depends on the cotangent's layout."""
    mesh = sl.Mesh.simulated({"x": 4})
    src, dst = P("x", None), P(None, None)
    fwd, bwd = _backward_records(mesh, src, dst, P(None, None, partial="x"))
    assert fwd == [("all_gather", ("x",))]
    assert bwd == [("reduce_scatter", ("x",), 4)]  # ZeRO: gather forward, reduce-scatter back
    assert _backward_records(mesh, src, dst, P(None, None))[1] == []  # replicated: a slice
    assert _backward_records(mesh, src, dst, P(None, "x"))[1] == [("all_to_all", ("x",), 4)]
    assert _backward_records(mesh, src, dst, P("x", None))[1] == []  # already in place


def test_partial_source_backward():
    """A partial source's gradient is replicated over the partial axes (sum, max, avg alike)."""
    mesh = sl.Mesh.simulated({"x": 4})
    for op in ("sum", "avg", "max", "min"):
        src = P(None, None, partial={"x": op})
        fwd, bwd = _backward_records(mesh, src, P("x", None), P(None, None, partial="x"))
        assert fwd == [("reduce_scatter", ("x",))], op
        assert bwd == [("all_reduce", ("x",), 4)], op
        assert _backward_records(mesh, src, P("x", None), P("x", None))[1] == [
            ("all_gather", ("x",), 4)
        ]


def test_two_axis_group_backward():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    src, dst = P(("a", "b"), None), P(None, None)
    fwd, bwd = _backward_records(mesh, src, dst, P(None, None, partial=("a", "b")))
    assert fwd == [("all_gather", ("a", "b"))]
    assert bwd == [("reduce_scatter", ("a", "b"), 4)]


def test_full_after_reshard_backward_is_free():
    """The cotangent of ``x.full()`` is the same plain tensor on every device.

    Regression: x = P("x", None) on {x: 4}; ``(sl.reshard(x, P(None, "x")).full() * w).sum()``
    -> backward all_to_all(x); from P(None, None, partial="x") via P("x", None) ->
    backward all_gather(x). A replicated cotangent only needs slicing to reach x.layout.
    """
    mesh = sl.Mesh.simulated({"x": 4})
    w = _weights((8, 4))
    for src, dst in [(P("x", None), P(None, "x")), (P(None, None, partial="x"), P("x", None))]:
        x = _leaf(mesh, (8, 4), src)
        loss = (sl.reshard(x, dst).full() * w).sum()
        with sl.comm_ledger() as led:
            (g,) = torch.autograd.grad(loss, x)
        _assert_is(g, w, src.without_partial(), mesh, str(src))
        assert led.records == [], led.summary()


# == into plain tensors: sl.shard and sl.from_local ============================
@pytest.mark.parametrize(
    "src", [P("a", "b"), P(None, None, partial="a"), P("b", None, partial={"a": "max"})], ids=str
)
def test_grad_into_shard_input(src):
    mesh = sl.Mesh.simulated(MESH22)
    w = _weights(SHAPE)
    t = arange_value(SHAPE).requires_grad_()
    x = sl.shard(t, mesh, src)
    loss = (sl.reshard(x, P(None, ("b", "a"))).full() * w).sum()
    with sl.comm_ledger() as led:
        (g,) = torch.autograd.grad(loss, t)
    assert type(g) is torch.Tensor and torch.equal(g, w)
    assert all(r.direction == "backward" for r in led.records)


@pytest.mark.parametrize(
    "src", [P("a", None, partial="b"), P(None, ("b", "a")), P(None, None)], ids=str
)
def test_grad_into_from_local_shards(src):
    """Each device's shard (a summand, for partial layouts) gets its block of the gradient."""
    mesh = sl.Mesh.simulated(MESH22)
    w = _weights(SHAPE)
    shards = [s.requires_grad_() for s in make_summands(arange_value(SHAPE), src, MESH22)]
    x = sl.from_local(shards, mesh, src, SHAPE)
    grads = torch.autograd.grad((sl.reshard(x, P("b", "a")).full() * w).sum(), shards)
    for dev, g in enumerate(grads):
        assert torch.equal(g, block(w, src.without_partial(), MESH22, dev)), dev


# == ops autograd issues =======================================================
def test_detach_and_alias():
    mesh = sl.Mesh.simulated(MESH22)
    x = _leaf(mesh, SHAPE, P("a", "b", partial=()))
    d = x.detach()
    assert isinstance(d, sl.ShardedTensor) and d.spec == x.spec and not d.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(d.local_shards(), x.local_shards()))
    a = torch.ops.aten.alias(x)
    assert isinstance(a, sl.ShardedTensor) and a.spec == x.spec and a.requires_grad
    w = _weights(SHAPE)
    (g,) = torch.autograd.grad((sl.reshard(a, P(None, "a")).full() * w).sum(), x)
    _assert_is(g, w, x.spec, mesh, "alias")


@pytest.mark.parametrize("fn", [torch.ones_like, torch.zeros_like, torch.empty_like])
@pytest.mark.parametrize(
    "layout", [P("a", "b"), P(None, "b", partial="a"), P("b", None, partial={"a": "max"})], ids=str
)
def test_like_ops(fn, layout):
    """The result is a fresh value: same splits, replicated over the input's partial axes."""
    mesh = sl.Mesh.simulated(MESH22)
    x = _sharded(mesh, arange_value(SHAPE), layout)
    y = fn(x)
    assert isinstance(y, sl.ShardedTensor) and y.spec == layout.without_partial()
    for dev, s in enumerate(y.local_shards()):
        assert s.shape == block(arange_value(SHAPE), layout, MESH22, dev).shape
    if fn is not torch.empty_like:
        assert torch.equal(y.full(), torch.full(SHAPE, float(fn is torch.ones_like)).double())


def test_leaf_used_twice_accumulates():
    """Two reshards of one leaf: autograd sums the two gradients with aten.add."""
    mesh = sl.Mesh.simulated(MESH22)
    src = P(None, "a", partial="b")
    x = _leaf(mesh, SHAPE, src)
    w1, w2 = _weights(SHAPE), arange_value(SHAPE) - 4
    loss = (sl.reshard(x, P("a", "b")).full() * w1).sum() + (
        sl.reshard(x, P(None, None)).full() * w2
    ).sum()
    (g,) = torch.autograd.grad(loss, x)
    _assert_is(g, w1 + w2, src.without_partial(), mesh, "used twice")
    # The same through .backward(): first into an empty .grad, then accumulated (add_).
    x.grad = None
    (sl.reshard(x, P("a", "b")).full() * w1).sum().backward()
    _assert_is(x.grad, w1, src.without_partial(), mesh, "first backward")
    (sl.reshard(x, P(None, None)).full() * w2).sum().backward()
    _assert_is(x.grad, w1 + w2, src.without_partial(), mesh, "accumulated")


def test_partial_cotangents_accumulate():
    """Two uses with partial cotangents: each is reduced to the source layout, then added."""
    mesh = sl.Mesh.simulated(MESH22)
    x = _leaf(mesh, SHAPE, P("a", None))
    w1, w2 = _weights(SHAPE), arange_value(SHAPE)
    y1, y2 = sl.reshard(x, P(None, None)), sl.reshard(x, P(None, "b"))
    g1 = _sharded(mesh, w1, P(None, None, partial=("a", "b")))
    g2 = _sharded(mesh, w2, P(None, "b", partial="a"))
    with sl.comm_ledger() as led:
        (g,) = torch.autograd.grad([y1, y2], x, grad_outputs=[g1, g2])
    _assert_is(g, w1 + w2, P("a", None), mesh, "two partial cotangents")
    assert led.records and all(r.direction == "backward" for r in led.records)


def test_add_and_add_inplace():
    mesh = sl.Mesh.simulated(MESH22)
    v = arange_value(SHAPE)
    for layout in [P("a", "b"), P(None, "b", partial="a"), P("b", None, partial={"a": "avg"})]:
        a, b = _sharded(mesh, v, layout), _sharded(mesh, 2 * v, layout)
        c = a + b
        assert c.spec == layout and torch.equal(c.full(), 3 * v), layout
        a.add_(b)
        assert a.spec == layout and torch.equal(a.full(), 3 * v), layout
    # A partial-max sum is not linear: both operands are reduced first, and the result is exact.
    a = _sharded(mesh, v, P("a", None, partial={"b": "max"}))
    with sl.comm_ledger() as led:
        c = a + a
    assert c.spec == P("a", None) and torch.equal(c.full(), 2 * v)
    assert [r.kind for r in led.records] == ["all_reduce"]  # one reduction, used twice
    # Unequal layouts: the cheaper operand moves (one permute), the result is exact.
    x, y = _sharded(mesh, v, P("a", "b")), _sharded(mesh, v, P("b", "a"))
    with sl.comm_ledger() as led:
        z = x + y
    assert torch.equal(z.full(), 2 * v) and [r.kind for r in led.records] == ["ppermute"]


def test_add_broadcasting_is_exact():
    """Broadcast operands follow the output's split dims; a size-1 dim is never split.

    (Before op rules, per-shard broadcasting returned a (4, 1) wrapper around
    (2, 4) shards.) In-place ops whose result would not fit raise torch's error.
    """
    mesh = sl.Mesh.simulated({"x": 2})
    for small, big, a_layout, b_layout in [
        ((4, 1), (4, 4), P("x", None), P("x", None)),
        ((1,), (4,), P(None), P("x")),
    ]:
        ts = torch.arange(float(small[0])).reshape(small)
        tb = torch.ones(big)
        a, b = sl.shard(ts, mesh, a_layout), sl.shard(tb, mesh, b_layout)
        for x, y, want in ((a, b, ts + tb), (b, a, tb + ts)):
            with sl.comm_ledger() as led:
                out = x + y
            assert out.shape == want.shape and torch.equal(out.full(), want)
            assert led.records == []
        b.add_(a)
        assert torch.equal(b.full(), tb + ts)
        with pytest.raises(RuntimeError, match="broadcast"):
            a.add_(b)


def test_copy_():
    mesh = sl.Mesh.simulated(MESH22)
    v = arange_value(SHAPE)
    for layout in [P("a", "b"), P(None, "b", partial="a"), P("b", None, partial={"a": "min"})]:
        dst = _sharded(mesh, torch.zeros(SHAPE, dtype=torch.float64), layout)
        before = [s.data_ptr() for s in dst.local_shards()]
        out = dst.copy_(_sharded(mesh, v, layout))
        assert out is dst and torch.equal(dst.full(), v), layout
        assert [s.data_ptr() for s in dst.local_shards()] == before  # in place
    # A source in another layout is moved to the destination's (one permute here).
    dst = _sharded(mesh, torch.zeros(SHAPE, dtype=torch.float64), P("a", "b"))
    with sl.comm_ledger() as led:
        dst.copy_(_sharded(mesh, v, P("b", "a")))
    assert dst.spec == P("a", "b") and torch.equal(dst.full(), v)
    assert [r.kind for r in led.records] == ["ppermute"]


def test_grad_setter_rejects_plain_tensor():
    mesh = sl.Mesh.simulated({"x": 4})
    x = _leaf(mesh, (8, 4), P("x", None))
    with pytest.raises(sl.ShardlibError, match=r"plain Tensor.*sl\.shard") as info:
        x.grad = torch.zeros(8, 4, dtype=torch.float64)
    assert isinstance(info.value, ValueError | TypeError)
    assert "P('x', None)" in str(info.value)
    assert x.grad is None
    x.grad = _sharded(mesh, torch.ones(8, 4, dtype=torch.float64), P("x", None))
    assert isinstance(x.grad, sl.ShardedTensor)
    x.grad = None
    assert x.grad is None
