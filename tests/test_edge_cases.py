"""Edge cases of shard / from_local / reshard / full / visualize and the ledger (simulated mesh).

Covers: 0-d tensors (``P()`` and ``P(partial="x")`` with every reduce op),
zero-size dims, empty shards, non-contiguous inputs, dtypes (float32,
float64, bfloat16, int64, bool; a partial ``avg`` or a truncating cast of an
integer partial raises `sl.LayoutError`), ``sl.shard(..., src=0)`` (broadcast
or scatter in the ledger), `sl.visualize` output, 64 simulated devices,
replicas that must not alias, bad inputs (error type, the offending value and
a fix in the message), the ledger's record fields, ``total_bytes`` and
``summary()``, and the DESIGN byte figures for a 4096x4096 float32 tensor
measured on an actual `sl.reshard` (bytes per device).

Values are integers, so comparisons are exact (``torch.equal``), except where
an average is involved: rtol 1e-12 in float64 (via `check_reshard`).
"""

from __future__ import annotations

import pytest
import torch

import shardlib as sl
from tests._reference import (
    arange_value,
    block,
    check_reshard,
    enumerate_layouts,
)

P = sl.P
MiB = 2**20


# == 0-d tensors ===============================================================
@pytest.mark.parametrize("axes", [{"x": 4}, {"a": 2, "b": 3}])
def test_zero_dim_every_pair(axes):
    """All 0-d layouts (P() and partial with each op) into each other, summand-built."""
    mesh = sl.Mesh.simulated(axes)
    layouts = list(enumerate_layouts(axes, 0))
    assert P() in layouts and P(partial={next(iter(axes)): "max"}) in layouts
    for src in layouts:
        for dst in layouts:
            check_reshard(mesh, (), src, dst)


@pytest.mark.parametrize("op", ["sum", "avg", "max", "min"])
def test_zero_dim_shard_full(op):
    mesh = sl.Mesh.simulated({"x": 4})
    t = torch.tensor(3.5, dtype=torch.float64)
    x = sl.shard(t, mesh, P(partial={"x": op}))
    assert x.shape == () and x.spec == P(partial={"x": op})
    want = [3.5, 0.0, 0.0, 0.0] if op == "sum" else [3.5] * 4
    assert [s.item() for s in x.local_shards()] == want
    assert all(s.shape == () for s in x.local_shards())
    assert torch.equal(x.full(), t)
    y = sl.reshard(x, P())
    assert [s.item() for s in y.local_shards()] == [3.5] * 4
    # Differentiable: the gradient of a 0-d value.
    leaf = sl.shard(t, mesh, P()).requires_grad_()
    (g,) = torch.autograd.grad(sl.reshard(leaf, x.spec).full() * 2, leaf)
    assert g.spec == P() and torch.equal(g.full(), torch.tensor(2.0, dtype=torch.float64))


# == zero-size dims and empty shards ===========================================
@pytest.mark.parametrize(
    ("axes", "shape"), [({"a": 2, "b": 2}, (0, 5)), ({"x": 4}, (3, 0)), ({"x": 4}, (2, 0, 3))]
)
def test_zero_size_dims_every_pair(axes, shape):
    mesh = sl.Mesh.simulated(axes)
    layouts = list(enumerate_layouts(axes, len(shape)))
    for src in layouts:
        for dst in layouts:
            check_reshard(mesh, shape, src, dst)


def test_zero_size_shard_full_grad():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    t = torch.zeros(0, 5, requires_grad=True)
    x = sl.shard(t, mesh, P("a", "b"))
    assert [tuple(s.shape) for s in x.local_shards()] == [(0, 3), (0, 2), (0, 3), (0, 2)]
    y = sl.reshard(x, P(None, ("a", "b")))
    assert [tuple(s.shape) for s in y.local_shards()] == [(0, 2), (0, 2), (0, 1), (0, 0)]
    assert y.full().shape == (0, 5)
    (g,) = torch.autograd.grad(y.full().sum(), t)
    assert g.shape == (0, 5)


def test_empty_shards():
    """n < k: trailing devices hold (0,)-shaped shards, exactly (not padded)."""
    mesh = sl.Mesh.simulated({"x": 4})
    v = torch.tensor([1.0, 2.0])
    x = sl.shard(v, mesh, P("x"))
    assert [tuple(s.shape) for s in x.local_shards()] == [(1,), (1,), (0,), (0,)]
    assert torch.equal(x.full(), v)
    y = sl.reshard(x, P(None, partial="x"))
    assert torch.equal(y.full(), v)
    z = sl.reshard(sl.shard(torch.arange(3.0).reshape(3, 1), mesh, P(None, "x")), P("x", None))
    assert [tuple(s.shape) for s in z.local_shards()] == [(1, 1), (1, 1), (1, 1), (0, 1)]
    assert torch.equal(z.full(), torch.arange(3.0).reshape(3, 1))
    # from_local accepts exact empty blocks and rejects padded ones.
    w = sl.from_local(
        [torch.ones(1), torch.ones(1), torch.ones(0), torch.ones(0)], mesh, P("x"), (2,)
    )
    assert torch.equal(w.full(), torch.ones(2))
    with pytest.raises(sl.LayoutError, match=r"device 2: got \(1,\).*want \(0,\)"):
        sl.from_local([torch.ones(1)] * 4, mesh, P("x"), (2,))


# == non-contiguous inputs =====================================================
def test_transposed_input_to_shard():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    v = arange_value((4, 6)).t()  # (6, 4), strides (1, 6)
    assert not v.is_contiguous()
    x = sl.shard(v, mesh, P("a", "b"))
    for dev, s in enumerate(x.local_shards()):
        assert torch.equal(s, block(v, P("a", "b"), mesh.axes, dev))
    for dst in enumerate_layouts(mesh.axes, 2):
        assert torch.equal(sl.reshard(x, dst).full(), v), dst
    # Non-contiguous shards through from_local (every device's block of a transposed value).
    shards = [block(v, P(None, ("b", "a")), mesh.axes, d) for d in range(4)]
    y = sl.from_local(shards, mesh, P(None, ("b", "a")), (6, 4))
    for dst in enumerate_layouts(mesh.axes, 2):
        assert torch.equal(sl.reshard(y, dst).full(), v), dst


def test_strided_slice_input():
    mesh = sl.Mesh.simulated({"x": 4})
    v = arange_value((10, 9))[::2, 1::3]  # (5, 3), non-contiguous
    x = sl.shard(v, mesh, P("x", None))
    assert torch.equal(sl.reshard(x, P(None, "x")).full(), v)


# == dtypes ====================================================================
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]
DTYPE_LAYOUTS = [
    P("a", "b"),
    P(("b", "a"), None),
    P(None, None, partial="a"),
    P(None, "b", partial={"a": "max"}),
    P("b", None, partial={"a": "min"}),
    P(None, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_through_shard_reshard_full(dtype):
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    v = (torch.arange(30).reshape(5, 6) % 3).to(dtype)
    for src in DTYPE_LAYOUTS:
        x = sl.shard(v, mesh, src)
        assert x.dtype == dtype and all(s.dtype == dtype for s in x.local_shards())
        for dst in DTYPE_LAYOUTS:
            y = sl.reshard(x, dst)
            assert y.dtype == dtype and all(s.dtype == dtype for s in y.local_shards())
            out = y.full()
            assert out.dtype == dtype and torch.equal(out, v), (src, dst)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_float_avg_partial(dtype):
    mesh = sl.Mesh.simulated({"x": 4})
    v = torch.arange(8.0).to(dtype)
    shards = [v + (j - 1.5) for j in range(4)]  # mean of the offsets is 0
    x = sl.from_local(shards, mesh, P(None, partial={"x": "avg"}), (8,))
    assert x.full().dtype == dtype
    torch.testing.assert_close(x.full(), v, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_integer_avg_partial_raises(dtype):
    mesh = sl.Mesh.simulated({"x": 4})
    layout = P(None, partial={"x": "avg"})
    t = torch.ones(4, dtype=dtype)
    with pytest.raises(sl.LayoutError, match=rf"partial average.*{dtype}.*(floating|'sum')"):
        sl.shard(t, mesh, layout)
    with pytest.raises(sl.LayoutError, match="partial average"):
        sl.from_local([t.clone() for _ in range(4)], mesh, layout, (4,))
    with pytest.raises(sl.LayoutError, match="partial average"):
        sl.reshard(sl.shard(t, mesh, P("x")), layout)


def test_partial_casts():
    """A cast of a partial tensor is only done summand by summand when that is exact."""
    mesh = sl.Mesh.simulated({"x": 2})
    x = sl.from_local([torch.tensor([0.5, 1.5])] * 2, mesh, P(None, partial="x"), (2,))
    assert torch.equal(x.to(torch.float64).full(), torch.tensor([1.0, 3.0], dtype=torch.float64))
    # int(0.5) + int(0.5) = 0 != int(1.0): the cast is nonlinear, so the partial sum is
    # reduced first (an all_reduce in the ledger) and the result is exact, not [0, 2].
    # The reduction is kept with x (dispatch's `move`): the second nonlinear cast reuses it.
    for dtype, reductions in ((torch.int64, ["all_reduce"]), (torch.bool, [])):
        with sl.comm_ledger() as led:
            y = x.to(dtype)
        assert y.spec == P(None)
        assert torch.equal(y.full(), torch.tensor([1.0, 3.0]).to(dtype))
        assert [r.kind for r in led.records] == reductions
    x = sl.from_local([torch.tensor([0.5, 1.5])] * 2, mesh, P(None, partial="x"), (2,))
    with sl.strict(), pytest.raises(sl.LayoutError, match=r"sl\.reshard\(x, P\(None\)\)"):
        x.to(torch.int64)  # (a fresh x: nothing kept, so the cast would communicate)
    avg = sl.from_local([torch.tensor([0.5])] * 2, mesh, P(None, partial={"x": "avg"}), (1,))
    assert avg.to(torch.int64).full().tolist() == [0]
    # Integer partial sums cast between integer types, and max casts truncation, exactly.
    i = sl.from_local([torch.tensor([3]), torch.tensor([4])], mesh, P(None, partial="x"), (1,))
    assert i.to(torch.int32).full().tolist() == [7] and i.double().full().tolist() == [7.0]
    m = sl.from_local(
        [torch.tensor([-1.5]), torch.tensor([0.5])], mesh, P(None, partial={"x": "max"}), (1,)
    )
    assert m.to(torch.int64).full().tolist() == [0]


# == src= on the simulated mesh ================================================
@pytest.mark.parametrize(
    ("layout", "kind"),
    [
        (P(None, None), "broadcast"),
        (P(None, None, partial="b"), "broadcast"),
        (P("a", None), "scatter"),
        (P(("a", "b"), None, partial=()), "scatter"),
        (P("b", "a"), "scatter"),
    ],
    ids=str,
)
def test_shard_from_src(layout, kind):
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    v = arange_value((5, 6)).float()
    with sl.comm_ledger() as led:
        x = sl.shard(v, mesh, layout, src=0)
    assert [(r.kind, r.axes, r.group_size, r.direction, r.cause) for r in led.records] == [
        (kind, ("a", "b"), 4, "forward", "shard")
    ]
    assert led.records[0].bytes > 0 and led.records[0].dtype == "float32"
    assert x.spec == layout and torch.equal(x.full(), v)
    ref = sl.shard(v, mesh, layout)
    for a, b in zip(x.local_shards(), ref.local_shards()):
        assert torch.equal(a, b)


def test_shard_from_src_errors():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    with pytest.raises(sl.LayoutError, match=r"src=7.*\[0, 4\)"):
        sl.shard(torch.ones(4), mesh, P("a"), src=7)
    with pytest.raises(sl.LayoutError, match=r"rank 0 must pass a torch\.Tensor, got NoneType"):
        sl.shard(None, mesh, P("a"), src=0)


# == visualize =================================================================
def test_visualize_2d():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    text = sl.visualize(sl.shard(torch.zeros(5, 6), mesh, P("a", "b")), show=False)
    assert "P('a', 'b')" in text and "(5, 6)" in text
    for rows, cols, dev in [
        ("0:3", "0:3", 0),
        ("0:3", "3:6", 1),
        ("3:5", "0:3", 2),
        ("3:5", "3:6", 3),
    ]:
        assert f"rows {rows} cols {cols}" in text
        assert f"dev {dev}" in text


def test_visualize_partial_1d_3d_and_prints(capsys):
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    text = sl.visualize(sl.shard(torch.zeros(5, 6), mesh, P("b", None, partial="a")))
    assert capsys.readouterr().out.strip() == text.strip()
    assert "rows 0:3" in text and "rows 3:5" in text
    assert "dev 0*,2*" in text and "dev 1*,3*" in text and "partial sum over a" in text
    text = sl.visualize(sl.shard(torch.zeros(7), mesh, P(("b", "a"))), show=False)
    for rows, dev in [("0:2", 0), ("2:4", 2), ("4:6", 1), ("6:7", 3)]:
        assert f"rows {rows}" in text and f"dev {dev}" in text
    text = sl.visualize(sl.shard(torch.zeros(4, 5, 6), mesh, P("b", None, "a")), show=False)
    assert "[2:4, 0:5, 0:3] on devices 1" in text and "[0:2, 0:5, 3:6] on devices 2" in text
    text = sl.visualize(sl.shard(torch.tensor(1.0), mesh, P(partial={"a": "max"})), show=False)
    assert "0*,1*,2*,3*" in text and "partial max over a" in text


# == 64 devices ================================================================
MESH64 = {"a": 4, "b": 4, "c": 4}
PAIRS64 = [
    (P(("a", "b", "c"), None), P(None, ("a", "b", "c"))),  # one all_to_all over 64
    (P(("a", "b"), "c"), P(("c", "b"), "a")),
    (P(None, None, partial=("a", "b", "c")), P(("c", "a"), "b")),
    (P("a", None, partial={"b": "max", "c": "max"}), P(None, ("b", "a"), partial={"c": "max"})),
    (P("c", "b", partial={"a": "avg"}), P(None, None)),
    (P(None, ("a", "b", "c")), P(None, None, partial="b")),
    (P("b", None), P(("a", "b", "c"), None)),
    (P(None, None), P("c", ("b", "a"))),
    (P("a", "b", partial={"c": "min"}), P("b", "a", partial={"c": "min"})),
]


@pytest.mark.parametrize("shape", [(64, 16), (10, 17), (3, 70)])
def test_64_devices(shape):
    mesh = sl.Mesh.simulated(MESH64)
    assert mesh.size == 64
    for src, dst in PAIRS64:
        check_reshard(mesh, shape, src, dst)
        check_reshard(mesh, shape, dst, src)


def test_64_devices_single_all_to_all():
    mesh = sl.Mesh.simulated(MESH64)
    x = sl.shard(torch.zeros(128, 128), mesh, P(("a", "b", "c"), None))
    with sl.comm_ledger() as led:
        sl.reshard(x, P(None, ("a", "b", "c")))
    assert [(r.kind, r.axes, r.group_size) for r in led.records] == [
        ("all_to_all", ("a", "b", "c"), 64)
    ]
    assert led.total_bytes == 63 * 2 * 2 * 4  # (k-1) pieces of 2x2 float32


# == replicas must not alias ===================================================
def _shard_sums(x: sl.ShardedTensor) -> list[float]:
    return [s.sum().item() for s in x.local_shards()]


def test_replicas_do_not_alias():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    v = arange_value((4, 6))
    total = v.sum().item()
    made = {
        "shard": sl.shard(v, mesh, P(None, None)),
        "shard src=0": sl.shard(v, mesh, P(None, None), src=0),
        "from_local [v]*4": sl.from_local([v] * 4, mesh, P(None, None), (4, 6)),
        "all_gather": sl.reshard(sl.shard(v, mesh, P("a", "b")), P(None, None)),
        "all_reduce": sl.reshard(sl.shard(v, mesh, P(None, None, partial="a")), P(None, None)),
        "to_partial max": sl.reshard(
            sl.shard(v, mesh, P(None, None)), P(None, None, partial={"a": "max"})
        ),
        "half gathered": sl.reshard(sl.shard(v, mesh, P("a", "b")), P("a", None)),
        "ones_like": torch.ones_like(sl.shard(v, mesh, P(None, None))),
    }
    for name, x in made.items():
        before = _shard_sums(x)
        x.local_shards()[1].add_(100.0)
        after = _shard_sums(x)
        assert after[1] == before[1] + 100.0 * x.local_shards()[1].numel(), name
        assert after[:1] + after[2:] == before[:1] + before[2:], name
    assert torch.equal(v.sum(), torch.tensor(total, dtype=torch.float64))  # input untouched


def test_in_place_add_on_replicated_tensor():
    """add_ of two replicated tensors adds once per device, not once per replica."""
    mesh = sl.Mesh.simulated({"x": 4})
    v = arange_value((3, 2))
    a = sl.from_local([v] * 4, mesh, P(None, None), (3, 2))
    a.add_(sl.shard(v, mesh, P(None, None)))
    assert all(torch.equal(s, 2 * v) for s in a.local_shards())
    assert torch.equal(v, arange_value((3, 2)))


# == bad inputs ================================================================
def test_shard_non_tensor():
    mesh = sl.Mesh.simulated({"x": 4})
    for bad, name in [([1.0, 2.0], "list"), (3.0, "float"), (None, "NoneType")]:
        with pytest.raises(sl.LayoutError) as info:
            sl.shard(bad, mesh, P(None) if name == "list" else P())
        msg = str(info.value)
        assert "sl.shard(tensor=...)" in msg and name in msg and "torch.tensor(" in msg


def test_unequal_meshes():
    m4, m22 = sl.Mesh.simulated({"x": 4}), sl.Mesh.simulated({"a": 2, "b": 2})
    a = sl.shard(torch.ones(4, 4), m4, P("x", None))
    b = sl.shard(torch.ones(4, 4), m22, P("a", None))
    for fn in (lambda: a + b, lambda: a.add_(b), lambda: a.copy_(b)):
        with pytest.raises(sl.MeshMismatchError) as info:
            fn()
        msg = str(info.value)
        assert "{'x': 4}" in msg and "{'a': 2, 'b': 2}" in msg and "same sl.Mesh" in msg
    # Equal axes and backend: equal meshes, no error.
    c = sl.shard(torch.ones(4, 4), sl.Mesh.simulated({"x": 4}), P("x", None))
    assert torch.equal((a + c).full(), 2 * torch.ones(4, 4))


def test_from_local_wrong_shapes():
    mesh = sl.Mesh.simulated({"x": 4})
    with pytest.raises(sl.LayoutError) as info:
        sl.from_local([torch.ones(2, 4)] * 4, mesh, P("x", None), (5, 4))
    msg = str(info.value)
    assert "device 2: got (2, 4)" in msg and "want (1, 4)" in msg and "device 3" in msg
    assert "(5, 4)" in msg and "P('x', None)" in msg and "sl.visualize" in msg
    with pytest.raises(sl.LayoutError, match=r"got 3 shards.*owns 4 devices.*one block per device"):
        sl.from_local([torch.ones(2, 4)] * 3, mesh, P("x", None), (8, 4))
    with pytest.raises(sl.LayoutError, match=r"list of torch.Tensor.*pass \[t\]"):
        sl.from_local(torch.ones(2, 4), mesh, P("x", None), (8, 4))


def test_spec_longer_than_rank():
    mesh = sl.Mesh.simulated({"x": 4})
    with pytest.raises(sl.LayoutError) as info:
        sl.shard(torch.ones(4, 4), mesh, P("x", None, None))
    msg = str(info.value)
    assert "P('x', None, None)" in msg and "3 entries for a 2-d tensor" in msg
    assert "one entry per tensor dim" in msg
    with pytest.raises(sl.LayoutError, match=r"P\(None, None\)"):  # did you mean
        sl.reshard(sl.shard(torch.ones(4, 4), mesh, P("x", None)), P(None, None, None))
    # Shorter is fine (JAX): trailing dims are unsplit, P() is replicated at any rank.
    y = sl.reshard(sl.shard(torch.ones(4, 4), mesh, P("x")), P())
    assert y.spec == P(None, None) and torch.equal(y.full(), torch.ones(4, 4))
    with pytest.raises(sl.LayoutError, match=r"0-d tensor takes P\(\)"):
        sl.shard(torch.tensor(1.0), mesh, P(None))
    with pytest.raises(sl.LayoutError, match=r"unknown mesh axis 'y'.*\{'x': 4\}"):
        sl.shard(torch.ones(4), mesh, P("y"))
    with pytest.raises(sl.LayoutError, match=r"did you mean sl\.P\(\*\('x', None\)\)"):
        sl.shard(torch.ones(4, 4), mesh, ("x", None))


# == ledger ====================================================================
def test_ledger_records_fields_summary():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    x = sl.shard(torch.zeros(8, 4), mesh, P("a", "b"))
    with sl.comm_ledger() as outer, sl.comm_ledger() as led:
        y = sl.reshard(x, P(None, None))
        z = sl.reshard(sl.shard(torch.zeros(8, 4), mesh, P(None, None, partial="a")), P("a", None))
        y.full()  # replicated already: no collective
        sl.reshard(x, P("b", "a")).full()
    assert outer.records == led.records  # ledgers nest
    kinds = [r.kind for r in led.records]
    assert "all_gather" in kinds and "reduce_scatter" in kinds and "ppermute" in kinds
    for r in led.records:
        assert isinstance(r, sl.CommRecord)
        assert r.kind in ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "ppermute")
        assert isinstance(r.axes, tuple) and all(a in ("a", "b") for a in r.axes)
        assert r.group_size == 2 ** len(r.axes) and r.bytes > 0
        assert r.dtype == "float32" and r.direction == "forward"
        assert r.cause in ("reshard", "full")
    assert led.records[-1].cause == "full"
    assert led.total_bytes == sum(r.bytes for r in led.records)
    text = led.summary()
    for kind in set(kinds):
        assert kind in text
    assert "total" in text and "reshard" in text and "full" in text
    assert z.spec == P("a", None)
    with sl.comm_ledger() as empty:
        pass
    assert empty.records == [] and empty.total_bytes == 0 and "total" in empty.summary()


DESIGN_FIGURES = [
    # mesh, src, dst, expected [(kind, axes, group_size)], bytes per device (exact or bound)
    ({"x": 4}, P("x", None), P(None, "x"), [("all_to_all", ("x",), 4)], 12 * MiB),
    ({"x": 4}, P("x", None), P(None, None), [("all_gather", ("x",), 4)], 48 * MiB),
    (
        {"x": 4},
        P(None, None, partial="x"),
        P("x", None),
        [("reduce_scatter", ("x",), 4)],
        48 * MiB,
    ),
    ({"x": 4}, P(None, None), P("x", None), [], 0),
    ({"a": 2, "b": 2}, P("a", "b"), P("b", "a"), None, ("<=", 16 * MiB)),
    ({"a": 2, "b": 2}, P(None, None, partial=("a", "b")), P(None, None), None, ("<=", 96 * MiB)),
    (
        {"a": 2, "b": 2},
        P(("a", "b"), None),
        P(None, ("a", "b")),
        [("all_to_all", ("a", "b"), 4)],
        12 * MiB,
    ),
]


@pytest.mark.parametrize(("axes", "src", "dst", "kinds", "nbytes"), DESIGN_FIGURES, ids=str)
def test_design_figures_4096(axes, src, dst, kinds, nbytes):
    mesh = sl.Mesh.simulated(axes)
    x = sl.shard(torch.empty(4096, 4096), mesh, src)
    with sl.comm_ledger() as led:
        y = sl.reshard(x, dst)
    assert y.spec == dst
    if kinds is not None:
        assert [(r.kind, r.axes, r.group_size) for r in led.records] == kinds, led.summary()
    if isinstance(nbytes, tuple):
        assert 0 < led.total_bytes <= nbytes[1], led.summary()
    else:
        assert led.total_bytes == nbytes, led.summary()
    assert all(r.dtype == "float32" and r.direction == "forward" for r in led.records)
    assert led.total_bytes == sl.plan(src, dst, (4096, 4096), mesh, torch.float32).total_bytes
