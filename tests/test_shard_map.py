"""`sl.shard_map` and its named-axis collectives (DESIGN §7).

Covers, on simulated meshes {x:4}, {a:2,b:2} and {a:2,b:2,c:2} with collectives
over one, two (in and out of mesh order) and three axes:
- the forward of every collective (psum, pmean, pmax, pmin, all_gather and
  psum_scatter tiled and untiled on several dims, all_to_all with three dim
  pairs, ppermute full and partial, axis_index, a ppermute ring loop)
  against an independent reference computed with plain torch from the
  global tensor, and its gradient (`torch.autograd.grad` through the
  output's `.full()`) against unsharded float64 torch;
- a Megatron MLP (column- then row-parallel, psum) forward and backward, and
  the same layer returning a partial output (no all-reduce in its backward);
- gradients of replicated inputs (lazy partial sums), uneven in/out layouts,
  pytree outputs, non-tensor arguments;
- ledger records (kind, axes, group size, bytes, direction, cause) for psum,
  all_gather and their backwards;
- errors: collectives outside shard_map, unknown axes, argument / layout
  count mismatches, partial inputs, devices that diverge, unequal shapes,
  indivisible dims, bad perms, nesting, mesh mismatch, strict mode, and an
  exception on one device;
- the same programs on the distributed backend (gloo, 4 ranks, `dist` mark)
  giving the same local shards, gradients and ledgers as the simulated mesh.

Tolerances: float64 against the unsharded reference: rtol 1e-12, atol 1e-12.
Simulated vs distributed (float32): bitwise where data only moves (all_gather,
all_to_all, ppermute, axis_index forwards; all_to_all / ppermute gradients),
rtol 1e-6, atol 1e-6 where a reduction's order may differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl

P = sl.P


# == cases: (fn(axes, k), out layout(axes, rest), reference(X, k), data only moves) ===========
# The input X has shape (k*m, kr*n, p) with layout P(axes, rest, None): dim 0 is split over the
# collective's axes (member j holds X_j = X[j*m:(j+1)*m]), dim 1 over the other mesh axes.
def _blocks(X, k):
    return X.reshape(k, X.shape[0] // k, *X.shape[1:])


def _ring_sum(x, axes, k):
    acc, buf = x, x
    for _ in range(k - 1):
        buf = sl.ppermute(buf, axes, [(i, (i + 1) % k) for i in range(k)])
        acc = acc + buf
    return acc


def _first_to_last(X, k):
    out = torch.zeros_like(_blocks(X, k))
    out[k - 1] = _blocks(X, k)[0]
    return out.reshape(X.shape)


CASES = {
    "psum": (lambda A, k: lambda x: sl.psum(x, A), "R", lambda X, k: _blocks(X, k).sum(0), False),
    "pmean": (
        lambda A, k: lambda x: sl.pmean(x, A),
        "R",
        lambda X, k: _blocks(X, k).mean(0),
        False,
    ),
    "pmax": (lambda A, k: lambda x: sl.pmax(x, A), "R", lambda X, k: _blocks(X, k).amax(0), False),
    "pmin": (lambda A, k: lambda x: sl.pmin(x, A), "R", lambda X, k: _blocks(X, k).amin(0), False),
    "all_gather_dim0": (lambda A, k: lambda x: sl.all_gather(x, A, 0), "R", lambda X, k: X, True),
    "all_gather_dim2": (
        lambda A, k: lambda x: sl.all_gather(x, A, dim=2),
        "R",
        lambda X, k: torch.cat(X.chunk(k, 0), 2),
        True,
    ),
    "all_gather_stack0": (
        lambda A, k: lambda x: sl.all_gather(x, A, 0, tiled=False),
        "new0",
        lambda X, k: _blocks(X, k),
        True,
    ),
    "all_gather_stack_last": (
        lambda A, k: lambda x: sl.all_gather(x, A, -1, tiled=False),
        "new_last",
        lambda X, k: _blocks(X, k).permute(1, 2, 3, 0),
        True,
    ),
    "psum_scatter_dim0": (
        lambda A, k: lambda x: sl.psum_scatter(x, A, 0),
        "S0",
        lambda X, k: _blocks(X, k).sum(0),
        False,
    ),
    "psum_scatter_dim2": (
        lambda A, k: lambda x: sl.psum_scatter(x, A, dim=2),
        "S2",
        lambda X, k: _blocks(X, k).sum(0),
        False,
    ),
    "psum_scatter_untiled": (
        lambda A, k: lambda x: sl.psum_scatter(x, A, 0, tiled=False).unsqueeze(0),
        "S0",
        lambda X, k: _blocks(X, k).sum(0),
        False,
    ),
    "all_to_all_2_0": (
        lambda A, k: lambda x: sl.all_to_all(x, A, 2, 0),
        "S2",
        lambda X, k: X,
        True,
    ),
    "all_to_all_0_0": (
        lambda A, k: lambda x: sl.all_to_all(x, A, 0, 0),
        "S0",
        lambda X, k: X.reshape(k, k, -1, *X.shape[1:]).transpose(0, 1).reshape(X.shape),
        True,
    ),
    "all_to_all_0_2": (
        lambda A, k: lambda x: sl.all_to_all(x, A, split_dim=0, concat_dim=2),
        "S0",
        lambda X, k: torch.cat(X.chunk(k, 0), 2),
        True,
    ),
    "ppermute_shift": (
        lambda A, k: lambda x: sl.ppermute(x, A, [(i, (i + 1) % k) for i in range(k)]),
        "S0",
        lambda X, k: _blocks(X, k).roll(1, 0).reshape(X.shape),
        True,
    ),
    "ppermute_partial": (
        lambda A, k: lambda x: sl.ppermute(x, A, [(0, k - 1)]),
        "S0",
        _first_to_last,
        True,
    ),
    "axis_index": (
        lambda A, k: lambda x: x * (1 + sl.axis_index(A)),
        "S0",
        lambda X, k: X * (1 + torch.arange(k).repeat_interleave(X.shape[0] // k))[:, None, None],
        True,
    ),
    "ring_sum": (
        lambda A, k: lambda x: _ring_sum(x, A, k),
        "R",
        lambda X, k: _blocks(X, k).sum(0),
        False,
    ),
}

CONFIGS = [
    ({"x": 4}, ("x",)),
    ({"a": 2, "b": 2}, ("a",)),
    ({"a": 2, "b": 2}, ("b",)),
    ({"a": 2, "b": 2}, ("a", "b")),
    ({"a": 2, "b": 2}, ("b", "a")),
    ({"a": 2, "b": 2, "c": 2}, ("c",)),
    ({"a": 2, "b": 2, "c": 2}, ("a", "c")),
    ({"a": 2, "b": 2, "c": 2}, ("c", "b", "a")),
]


def _setup(axes: dict, A: tuple, name: str):
    """(mesh, fn, in layout, out layout, global input shape, k) of case `name` over axes A."""
    rest = tuple(a for a in axes if a not in A)
    k = 1
    for a in A:
        k *= axes[a]
    kr = 1
    for a in rest:
        kr *= axes[a]
    R = rest or None
    fn_of, out_kind, _, _ = CASES[name]
    out = {
        "R": P(None, R, None),
        "S0": P(A, R, None),
        "S2": P(None, R, A),
        "new0": P(None, None, R, None),
        "new_last": P(None, R, None, None),
    }[out_kind]
    in_layout = P(A, R, None)
    mesh = sl.Mesh.simulated(axes)
    return mesh, fn_of(A, k), in_layout, out, (k * k, kr * 2, 2 * k), k


def _value(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# == forward and gradients against unsharded torch =============================
@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=lambda c: "".join(f"{a}{n}" for a, n in c[0].items()) + "-" + ",".join(c[1]),
)
@pytest.mark.parametrize("name", list(CASES))
def test_collective_matches_reference(name, config):
    axes, A = config
    mesh, fn, in_layout, out_layout, shape, k = _setup(axes, A, name)
    ref_fn = CASES[name][2]
    X = _value(shape)
    # Alternate between an input already in in_layouts and one shard_map must reshard.
    src = in_layout if len(A) % 2 else P(None, None, None)
    x = sl.shard(X, mesh, src).requires_grad_()
    y = sl.shard_map(fn, mesh, in_layout, out_layout)(x)
    want = ref_fn(X, k)
    assert y.spec == out_layout and tuple(y.shape) == tuple(want.shape)
    torch.testing.assert_close(y.full(), want, rtol=1e-12, atol=1e-12)

    W = _value(tuple(want.shape), seed=1)
    (gx,) = torch.autograd.grad((y.full() * W).sum(), x)
    Xr = X.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad((ref_fn(Xr, k) * W).sum(), Xr)
    torch.testing.assert_close(gx.full(), g_ref, rtol=1e-12, atol=1e-12)


def test_replicated_input_gets_partial_gradient():
    """Each replica's cotangent is a summand of the input's gradient (reduced lazily)."""
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    X = _value((3, 4))
    x = sl.shard(X, mesh, P(None, "b")).requires_grad_()
    f = sl.shard_map(lambda v: sl.pmean(v * (1 + sl.axis_index("a")), "a"), mesh, P(None, "b"),
                     P(None, "b"))  # fmt: skip
    y = f(x)
    torch.testing.assert_close(y.full(), X * 1.5)
    (g,) = torch.autograd.grad(y.full().sum(), x)
    assert g.spec == P(None, "b", partial="a")
    torch.testing.assert_close(g.full(), torch.full((3, 4), 1.5, dtype=torch.float64))


def test_pmax_ties_split_the_gradient_like_amax():
    mesh = sl.Mesh.simulated({"x": 4})
    X = torch.tensor([1.0, 5.0, 5.0, 2.0, 5.0, 0.0, 3.0, 3.0], dtype=torch.float64)
    x = sl.shard(X, mesh, P("x")).requires_grad_()
    y = sl.shard_map(lambda v: sl.pmax(v, "x"), mesh, P("x"), P(None))(x)
    (g,) = torch.autograd.grad(y.full().sum(), x)
    Xr = X.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(Xr.reshape(4, 2).amax(0).sum(), Xr)
    assert g_ref.tolist() == [0.0, 1.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0]  # 5.0 twice in column 0
    torch.testing.assert_close(g.full(), g_ref, rtol=0, atol=0)


# == Megatron MLP ==============================================================
def _mlp_ref(x, w1, b1, w2, b2):
    return F.gelu(x @ w1 + b1) @ w2 + b2


def _mlp_local(x, w1, b1, w2, b2):
    """Column-parallel (w1, b1 split over tp) then row-parallel (w2 split over tp) + psum."""
    h = F.gelu(x @ w1 + b1)
    return sl.psum(h @ w2, "tp") + b2


def _mlp_layouts(batch_axis):
    return (P(batch_axis, None), P(None, "tp"), P("tp"), P("tp", None), P(None))


def _mlp_params(dtype, B=4, H=6, Fh=8):
    shapes = [(B, H), (H, Fh), (Fh,), (Fh, H), (H,)]
    return [_value(s, dtype, seed=i) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("axes", [{"tp": 4}, {"dp": 2, "tp": 2}])
def test_megatron_mlp_matches_unsharded(axes):
    mesh = sl.Mesh.simulated(axes)
    batch_axis = "dp" if "dp" in axes else None
    values = _mlp_params(torch.float64)
    params = [sl.shard(v, mesh, P(*[None] * v.ndim)).requires_grad_() for v in values]
    f = sl.shard_map(_mlp_local, mesh, _mlp_layouts(batch_axis), P(batch_axis, None))
    W = _value((4, 6), seed=9)
    with sl.comm_ledger() as led:
        y = f(*params)
        fwd = [(r.kind, r.axes) for r in led.records if r.cause.startswith("shard_map:")]
        grads = torch.autograd.grad((y.full() * W).sum(), params)
    ref = [v.clone().requires_grad_() for v in values]
    y_ref = _mlp_ref(*ref)
    torch.testing.assert_close(y.full(), y_ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, torch.autograd.grad((y_ref * W).sum(), ref)):
        torch.testing.assert_close(g.full(), r, rtol=1e-12, atol=1e-12)
    inside = [r for r in led.records if r.cause == "shard_map:psum"]
    assert fwd == [("all_reduce", ("tp",))]
    assert [r.direction for r in inside] == ["forward", "backward"]


def test_megatron_partial_output_has_no_backward_all_reduce():
    """Returning the row-parallel summand as partial: Megatron's identity-backward reduction."""
    mesh = sl.Mesh.simulated({"tp": 4})
    values = _mlp_params(torch.float64)
    x, w1, b1, w2, b2 = (sl.shard(v, mesh, P(*[None] * v.ndim)) for v in values)
    for t in (x, w1, b1, w2):
        t.requires_grad_()
    f = sl.shard_map(
        lambda x, w1, b1, w2: F.gelu(x @ w1 + b1) @ w2,
        mesh,
        _mlp_layouts(None)[:4],
        P(None, None, partial="tp"),
    )
    z = f(x, w1, b1, w2)
    assert z.spec == P(None, None, partial="tp")
    y = sl.reshard(z, P(None, None))
    g_y = sl.shard(_value((4, 6), seed=9), mesh, P(None, None))
    with sl.comm_ledger() as led:
        grads = torch.autograd.grad(y, (x, w1, b1, w2), grad_outputs=g_y)
    assert led.count("all_reduce") == 0  # only the lazy partial-x gradient, reduced on .full()
    ref = [v.clone().requires_grad_() for v in values[:4]]
    y_ref = F.gelu(ref[0] @ ref[1] + ref[2]) @ ref[3]
    torch.testing.assert_close(y.full(), y_ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, torch.autograd.grad(y_ref, ref, grad_outputs=g_y.full())):
        torch.testing.assert_close(g.full(), r, rtol=1e-12, atol=1e-12)


# == shapes, pytrees, arguments ================================================
def test_uneven_layouts_and_pytree_outputs():
    mesh = sl.Mesh.simulated({"x": 4})
    X = _value((10, 3))
    x = sl.shard(X, mesh, P("x", None)).requires_grad_()

    def fn(v, scale):
        return {"double": v * scale, "rows": v.sum(1), "total": sl.psum(v.sum(), "x")}

    f = sl.shard_map(fn, mesh, (P("x", None), None), {"double": P("x", None), "rows": P("x"),
                                                       "total": P()})  # fmt: skip
    out = f(x, 2.0)
    assert [tuple(s.shape) for s in out["double"].local_shards()] == [(3, 3)] * 3 + [(1, 3)]
    assert tuple(out["double"].shape) == (10, 3) and tuple(out["rows"].shape) == (10,)
    torch.testing.assert_close(out["double"].full(), X * 2)
    torch.testing.assert_close(out["rows"].full(), X.sum(1))
    torch.testing.assert_close(out["total"].full(), X.sum())
    (g,) = torch.autograd.grad(out["total"].full() + out["double"].full().sum(), x)
    torch.testing.assert_close(g.full(), torch.full((10, 3), 3.0, dtype=torch.float64))

    # One layout for every leaf of a tuple; a plain tensor argument is a replicated constant.
    f2 = sl.shard_map(lambda v: (v + 1, v - 1), mesh, P(None, "x"), P(None, "x"))
    a, b = f2(torch.arange(8.0).reshape(1, 8))
    assert a.full().tolist() == [[float(i + 1) for i in range(8)]] and b.spec == P(None, "x")


def test_zero_argument_fn_and_partial_avg_output():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    f = sl.shard_map(lambda: torch.ones(2) * sl.axis_index("b"), mesh, (),
                     P(None, partial={"b": "avg"}))  # fmt: skip
    assert f().full().tolist() == [0.5, 0.5]
    x = sl.shard(torch.ones(2, dtype=torch.float64), mesh, P(None)).requires_grad_()
    g = sl.shard_map(lambda v: v * (1 + sl.axis_index("b")), mesh, P(None),
                     P(None, partial={"b": "avg"}))  # fmt: skip
    (gx,) = torch.autograd.grad(g(x).full().sum(), x)
    torch.testing.assert_close(gx.full(), torch.full((2,), 1.5, dtype=torch.float64))


# == ledger ====================================================================
@pytest.mark.parametrize("axes,A", [({"x": 4}, ("x",)), ({"a": 2, "b": 2}, ("b", "a"))])
def test_ledger_psum_and_all_gather(axes, A):
    mesh = sl.Mesh.simulated(axes)
    x = sl.shard(torch.ones(16, 6), mesh, P(A, None)).requires_grad_()  # local (4, 6) float32
    local_bytes = 4 * 6 * 4
    for name, fn, out, fwd, bwd in [
        ("psum", lambda v: sl.psum(v, A), P(None, None), ("all_reduce", 2 * 3 * 6 * 4),
         ("all_reduce", 2 * 3 * 6 * 4)),
        ("all_gather", lambda v: sl.all_gather(v, A, 0), P(None, None),
         ("all_gather", 3 * local_bytes), ("reduce_scatter", 3 * local_bytes)),
    ]:  # fmt: skip
        f = sl.shard_map(fn, mesh, P(A, None), out)
        with sl.comm_ledger() as led:
            y = f(x)
            g = sl.shard(torch.ones(tuple(y.shape)), mesh, out)
            torch.autograd.grad(y, x, grad_outputs=g)
        got = [(r.kind, r.axes, r.group_size, r.bytes, r.dtype, r.direction, r.cause)
               for r in led.records]  # fmt: skip
        cause = f"shard_map:{name}"
        assert got == [
            (fwd[0], A, 4, fwd[1], "float32", "forward", cause),
            (bwd[0], A, 4, bwd[1], "float32", "backward", cause),
        ]


def test_ledger_other_collectives_and_entry_reshard():
    mesh = sl.Mesh.simulated({"x": 4})
    x = sl.shard(torch.ones(16, 8), mesh, P(None, None))
    shift = [(i, (i + 1) % 4) for i in range(4)]
    fn = lambda v: (  # noqa: E731
        sl.psum_scatter(v, "x", 1),
        sl.all_to_all(v, "x", 1, 0),
        sl.ppermute(v, "x", shift),
        sl.ppermute(v, "x", [(1, 1)]),
        sl.pmean(v, "x"),
    )
    f = sl.shard_map(fn, mesh, P("x", None), P(None, None, partial="x"))
    with sl.comm_ledger() as led:
        f(x)
    local = 4 * 8 * 4
    assert [(r.kind, r.bytes, r.cause) for r in led.records] == [
        ("reduce_scatter", 3 * local // 4, "shard_map:psum_scatter"),
        ("all_to_all", 3 * local // 4, "shard_map:all_to_all"),
        ("ppermute", local, "shard_map:ppermute"),
        ("all_reduce", 2 * 3 * local // 4, "shard_map:pmean"),
    ]  # the entry reshard R -> S(x) is a local slice: no record
    y = sl.shard(torch.ones(16, 8), mesh, P(None, "x"))
    with sl.comm_ledger() as led:
        sl.shard_map(lambda v: v, mesh, P("x", None), P("x", None))(y)
    assert [(r.kind, r.cause) for r in led.records] == [("all_to_all", "shard_map")]


# == errors ====================================================================
def test_errors_name_the_call_and_a_fix():
    mesh = sl.Mesh.simulated({"x": 4})
    x = sl.shard(torch.ones(8, 4), mesh, P("x", None))

    with pytest.raises(sl.ShardMapError, match="outside sl.shard_map"):
        sl.psum(torch.ones(2), "x")
    with pytest.raises(sl.ShardMapError, match="outside sl.shard_map"):
        sl.axis_index("x")
    with pytest.raises(sl.LayoutError, match=r"unknown mesh axis 'y'.*\{'x': 4\}"):
        sl.shard_map(lambda v: sl.psum(v, "y"), mesh, P("x", None), P(None, None))(x)
    with pytest.raises(sl.LayoutError, match=r"got 2 argument\(s\) but in_layouts has 1"):
        sl.shard_map(lambda v, w: v, mesh, P("x", None), P("x", None))(x, x)
    with pytest.raises(sl.LayoutError, match="returned 2 tensor.*out_layouts has 3 layout"):
        sl.shard_map(lambda v: (v, v), mesh, P("x", None), (P("x", None),) * 3)(x)
    with pytest.raises(sl.LayoutError, match="is partial; fn receives whole values"):
        sl.shard_map(lambda v: v, mesh, P(None, None, partial="x"), P(None, None))
    with pytest.raises(sl.LayoutError, match="partial max"):
        sl.shard_map(lambda v: v, mesh, P("x", None), P(None, None, partial={"x": "max"}))
    with pytest.raises(sl.LayoutError, match="in_layouts"):
        sl.shard_map(lambda v: v, mesh, "x", P(None))
    with pytest.raises(sl.LayoutError, match="None passes non-tensor"):
        sl.shard_map(lambda v: v, mesh, None, P(None))(torch.ones(2))
    with pytest.raises(sl.LayoutError, match="not divisible by the 4 devices"):
        sl.shard_map(lambda v: sl.psum_scatter(v, "x", 1), mesh, P("x", None), P(None, "x"))(
            sl.shard(torch.ones(8, 6), mesh, P("x", None))
        )
    with pytest.raises(sl.LayoutError, match="a destination at most once"):
        sl.shard_map(lambda v: sl.ppermute(v, "x", [(0, 1), (2, 1)]), mesh, P("x", None),
                     P("x", None))(x)  # fmt: skip
    with pytest.raises(sl.LayoutError, match="plain local tensor"):
        sl.shard_map(lambda v: sl.psum(x, "x"), mesh, P("x", None), P(None, None))(x)
    with pytest.raises(sl.MeshMismatchError):
        sl.shard_map(lambda v: v, sl.Mesh.simulated({"y": 4}), P("y", None), P("y", None))(x)


def test_errors_from_devices_that_disagree():
    mesh = sl.Mesh.simulated({"x": 4})
    x = sl.shard(torch.ones(8, 4), mesh, P("x", None))

    def diverge(v):
        return sl.psum(v, "x") if sl.axis_index("x") == 0 else sl.all_gather(v, "x")

    with pytest.raises(sl.ShardMapError, match="different collectives.*devices \\[0\\]"):
        sl.shard_map(diverge, mesh, P("x", None), P(None, None))(x)

    def early(v):
        return v if sl.axis_index("x") == 2 else sl.psum(v, "x")

    with pytest.raises(sl.ShardMapError, match="returned from fn"):
        sl.shard_map(early, mesh, P("x", None), P(None, None))(x)

    uneven = sl.shard(torch.ones(10, 4), mesh, P("x", None))
    with pytest.raises(sl.ShardMapError, match="equal shapes.*pad inside fn"):
        sl.shard_map(lambda v: sl.psum(v, "x"), mesh, P("x", None), P(None, None))(uneven)
    with pytest.raises(sl.LayoutError, match="not the blocks of one global tensor"):
        sl.shard_map(lambda v: v[: 1 + 2 * sl.axis_index("x")], mesh, P("x", None),
                     P("x", None))(uneven)  # fmt: skip

    def fails_on_2(v):
        if sl.axis_index("x") == 2:
            raise ValueError("bad block")
        return sl.psum(v, "x")

    with pytest.raises(ValueError, match="bad block"):
        sl.shard_map(fails_on_2, mesh, P("x", None), P(None, None))(x)

    def grad_inside(v):
        v = v.detach().requires_grad_()
        return torch.autograd.grad(sl.all_gather(v, "x").sum(), v)[0]

    with pytest.raises(sl.ShardMapError, match="backward of sl.all_gather.*inside fn"):
        sl.shard_map(grad_inside, mesh, P("x", None), P("x", None))(x)

    inner = sl.shard_map(lambda v: v, mesh, P("x", None), P("x", None))
    with pytest.raises(sl.ShardMapError, match="nesting is not supported"):
        sl.shard_map(lambda v: inner(v), mesh, P("x", None), P("x", None))(x)

    with sl.strict(), pytest.raises(sl.LayoutError, match=r"sl.reshard\(x, P\(None, 'x'\)\)"):
        sl.shard_map(lambda v: v, mesh, P(None, "x"), P(None, "x"))(x)

    # The lockstep is per call: after all these failures a mapped function still works.
    y = sl.shard_map(lambda v: sl.psum(v, "x"), mesh, P("x", None), P(None, None))(x)
    assert y.full().tolist() == [[4.0] * 4] * 2


def test_errors_are_shardlib_errors():
    assert issubclass(sl.ShardMapError, sl.ShardlibError)
    assert issubclass(sl.ShardMapError, RuntimeError)


# == simulated vs distributed (gloo, 4 ranks) ==================================
DIST_CASES = [
    ("psum", ("x",)),
    ("pmax", ("x",)),
    ("all_gather_dim2", ("x",)),
    ("all_gather_stack0", ("x",)),
    ("psum_scatter_dim2", ("x",)),
    ("all_to_all_2_0", ("x",)),
    ("all_to_all_0_0", ("x",)),
    ("ppermute_shift", ("x",)),
    ("ppermute_partial", ("x",)),
    ("axis_index", ("x",)),
    ("ring_sum", ("x",)),
    ("psum", ("b", "a")),
    ("pmean", ("a",)),
    ("all_gather_dim0", ("b",)),
    ("all_gather_stack_last", ("a", "b")),
    ("psum_scatter_dim0", ("a", "b")),
    ("psum_scatter_untiled", ("b",)),
    ("all_to_all_0_2", ("b", "a")),
    ("ppermute_shift", ("b", "a")),
    ("ring_sum", ("a",)),
]


def _records(led):
    return [(r.kind, r.axes, r.group_size, r.bytes, r.dtype, r.direction, r.cause)
            for r in led.records]  # fmt: skip


def run_programs(mesh, cases):
    """Each case's local output shards, gradient shards and ledger on `mesh` (float32)."""
    axes = mesh.axes
    out = []
    for name, A in cases:
        _, fn, in_layout, out_layout, shape, k = _setup(axes, A, name)
        X = _value(shape, torch.float32)
        x = sl.shard(X, mesh, in_layout).requires_grad_()
        with sl.comm_ledger() as led:
            y = sl.shard_map(fn, mesh, in_layout, out_layout)(x)
            g = sl.shard(_value(tuple(y.shape), torch.float32, seed=1), mesh, y.spec)
            (gx,) = torch.autograd.grad(y, x, grad_outputs=g)
        out.append((y.local_shards(), gx.local_shards(), gx.spec, _records(led)))
    if set(axes) == {"a", "b"}:  # the Megatron MLP on a dp x tp mesh of the same backend
        mlp_axes = {"dp": 2, "tp": 2}
        simulated = mesh.backend.kind == "simulated"
        m = sl.Mesh.simulated(mlp_axes) if simulated else sl.Mesh.distributed(mlp_axes)
        params = [sl.shard(v, m, P(*[None] * v.ndim)).requires_grad_()
                  for v in _mlp_params(torch.float32)]  # fmt: skip
        with sl.comm_ledger() as led:
            y = sl.shard_map(_mlp_local, m, _mlp_layouts("dp"), P("dp", None))(*params)
            g = sl.shard(_value((4, 6), torch.float32, seed=9), m, y.spec)
            grads = torch.autograd.grad(y, params, grad_outputs=g)
        grad_full = [gr.full() for gr in grads]
        out.append((y.local_shards(), grad_full, [gr.spec for gr in grads], _records(led)))
    return out


def _compare(sim, dist_out, names, exact_forward, exact_grad):
    """Case i: (local outputs, gradients, gradient layout(s), ledger) per backend."""
    for rank, per_rank in enumerate(dist_out):
        for i, (s, d) in enumerate(zip(sim, per_rank)):
            what = f"{names[i]} on rank {rank}"
            assert s[2] == d[2], what
            assert s[3] == d[3], f"ledger differs: {what}"
            pairs = [(s[0][rank], d[0][0])]  # this rank's output block
            if isinstance(s[1], list) and len(s[1]) == len(dist_out):  # per-device shards
                pairs.append((s[1][rank], d[1][0]))
            else:  # full gradients, the same on every rank
                pairs += list(zip(s[1], d[1]))
            for j, (a, b) in enumerate(pairs):
                exact = exact_forward[i] if j == 0 else exact_grad[i]
                if exact:
                    assert torch.equal(a, b), what
                else:
                    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=what)


@pytest.mark.dist
@pytest.mark.parametrize("axes", [{"x": 4}, {"a": 2, "b": 2}])
def test_distributed_matches_simulated(workers4, axes):
    cases = [(n, A) for n, A in DIST_CASES if set(A) <= set(axes)]
    sim = run_programs(sl.Mesh.simulated(axes), cases)
    dist_out = workers4.run(run_programs, axes, (cases,))
    exact_fwd = [CASES[n][3] for n, _ in cases] + [False]
    grad_moves = ("all_to_all", "ppermute", "axis_index")
    exact_grad = [n.startswith(grad_moves) for n, _ in cases] + [False]
    names = [f"{n} over {A}" for n, A in cases] + ["megatron MLP"]
    assert len(sim) == len(dist_out[0]) == len(cases) + (len(axes) == 2)
    _compare(sim, dist_out, names, exact_fwd, exact_grad)
