"""Dispatch behaviour: strict mode, missing rules, the replicate fallback, bad input, torch.func.

Errors are checked for their type and for naming the op, the layouts and a fix
(STYLE "Errors"). Values are compared with unsharded float64 torch (rtol 1e-12).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

import shardlib as sl

P = sl.P


def _v(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_strict_names_op_layouts_and_fix():
    mesh = sl.Mesh.simulated({"x": 4})
    a, b = sl.shard(_v(8, 8), mesh, P("x", None)), sl.shard(_v(8, 8, seed=1), mesh, P(None, None))
    with sl.strict(), pytest.raises(sl.LayoutError) as info:
        a @ a
    msg = str(info.value)
    assert "mm" in msg and "P('x', None)" in msg and "sl.reshard(x, P(" in msg
    with sl.strict():  # no communication needed: fine
        c = a + a
        d = a @ b  # row split times replicated
    assert c.spec == P("x", None) and d.spec == P("x", None)
    torch.testing.assert_close(d.full(), _v(8, 8) @ _v(8, 8, seed=1), rtol=1e-12, atol=1e-12)


# An op with no rule and no decomposition anywhere: a user's own kernel.
@torch.library.custom_op("shardlib_test::running_max", mutates_args=())
def _running_max(t: torch.Tensor) -> torch.Tensor:
    return torch.cummax(t, 0).values


@_running_max.register_fake
def _(t):
    return torch.empty_like(t)


def test_missing_rule_error_says_how_to_add_one():
    mesh = sl.Mesh.simulated({"x": 2})
    x = sl.shard(_v(6), mesh, P("x"))
    with pytest.raises(sl.NoRuleError) as info:
        _running_max(x)
    msg = str(info.value)
    assert "running_max" in msg and "P('x')" in msg and "register_rule" in msg
    assert "allow_replicate_fallback" in msg


def test_an_op_without_a_rule_runs_on_replicated_inputs_without_communication():
    mesh = sl.Mesh.simulated({"x": 2})
    x = sl.shard(_v(6), mesh, P(None))
    with sl.strict():
        y = _running_max(x)
    assert y.spec == P(None)
    torch.testing.assert_close(y.full(), torch.cummax(_v(6), 0).values, rtol=0, atol=0)


def test_replicate_fallback_gathers_in_the_ledger():
    mesh = sl.Mesh.simulated({"x": 2})
    x = sl.shard(_v(6), mesh, P("x"))
    with sl.allow_replicate_fallback(), sl.comm_ledger() as led:
        y = _running_max(x)
    assert y.spec == P(None) and [r.kind for r in led.records] == ["all_gather"]
    assert led.records[0].cause == "shardlib_test.running_max.default"
    torch.testing.assert_close(y.full(), torch.cummax(_v(6), 0).values, rtol=1e-12, atol=1e-12)


# (h9b) nonzero, unique and x[mask] have rules (`_indexing.py`, `_scans.py`); a user's op
# with a value-dependent shape and no rule still raises.
# (its meta kernel is the composite's, which fails in nonzero as torch's own ops do)
_LIB = torch.library.Library("shardlib_test", "FRAGMENT")
_LIB.define("positives(Tensor t) -> Tensor", tags=(torch.Tag.dynamic_output_shape,))
_LIB.impl("positives", lambda t: t[t > 0], "CompositeExplicitAutograd")


def test_data_dependent_shapes_raise_clearly():
    mesh = sl.Mesh.simulated({"x": 2})
    x = sl.shard(_v(6), mesh, P("x"))
    with pytest.raises(sl.NoRuleError, match="depends on the values.*x.full"):
        torch.ops.shardlib_test.positives(x)


# nonzero's and unique's split input is gathered (x[mask]: the mask's, then a partial
# lookup), in the ledger; strict mode refuses the gather.
@pytest.mark.parametrize(
    "fn, spec",
    [
        (torch.nonzero, P(None, None)),
        (torch.unique, P(None)),
        (lambda t: t[t > 0], P(None, partial="x")),
    ],
)
def test_data_dependent_shapes_gather_visibly(fn, spec):
    mesh = sl.Mesh.simulated({"x": 2})
    x = sl.shard(_v(6), mesh, P("x"))
    with sl.comm_ledger() as led:
        y = fn(x)
    assert [r.kind for r in led.records] == ["all_gather"] and y.spec == spec
    torch.testing.assert_close(y.full(), fn(_v(6)), rtol=0, atol=0)
    with sl.strict(), pytest.raises(sl.LayoutError, match="nonzero|unique"):
        fn(x)


def test_unequal_meshes_raise():
    a = sl.shard(_v(4), sl.Mesh.simulated({"x": 2}), P("x"))
    b = sl.shard(_v(4), sl.Mesh.simulated({"y": 2}), P("y"))
    with pytest.raises(sl.MeshMismatchError, match=r"unequal meshes.*'x'.*'y'"):
        a + b


def test_in_place_op_on_a_partial_value_that_needs_it_reduces_in_place():
    mesh = sl.Mesh.simulated({"x": 2})
    a = sl.from_local([_v(4), _v(4, seed=1)], mesh, P(None, partial={"x": "max"}), (4,))
    ref = torch.maximum(_v(4), _v(4, seed=1))
    with sl.comm_ledger() as led:
        a.mul_(2.0 + a)
    torch.testing.assert_close(a.full(), ref * (2.0 + ref), rtol=0, atol=0)
    assert a.spec == P(None)  # same value, reduced in place: the partial axis is gone
    # one all-reduce of `a` in place, one of the (partial) operand 2 + a
    assert [r.kind for r in led.records] == ["all_reduce", "all_reduce"]


def test_torch_func_grad_over_sharded_leaves():
    mesh = sl.Mesh.simulated({"x": 2, "y": 2})
    w_val, x_val = _v(6, 4), _v(5, 6, seed=1)
    w = sl.shard(w_val, mesh, P(None, "y"))
    x = sl.shard(x_val, mesh, P("x", None))
    g = grad(lambda w: torch.tanh(x @ w).sum())(w)
    wr = w_val.clone().requires_grad_()
    torch.tanh(x_val @ wr).sum().backward()
    assert isinstance(g, sl.ShardedTensor)
    torch.testing.assert_close(g.full(), wr.grad, rtol=1e-12, atol=1e-12)


def test_einsum_out_layout_and_with_layout():
    mesh = sl.Mesh.simulated({"x": 2})
    a, b = sl.shard(_v(4, 6), mesh, P(None, "x")), sl.shard(_v(6, 3, seed=1), mesh, P("x", None))
    with sl.comm_ledger() as led:
        y = sl.einsum("ij,jk->ik", a, b, out_layout=P("x", None))
    assert y.spec == P("x", None) and [r.kind for r in led.records] == ["reduce_scatter"]
    torch.testing.assert_close(y.full(), _v(4, 6) @ _v(6, 3, seed=1), rtol=1e-12, atol=1e-12)
    with sl.comm_ledger() as led:
        z = sl.with_layout(y, P(None, None))
    assert z.spec == P(None, None) and led.records[0].cause == "with_layout"


def test_explain_lists_ops_and_collectives():
    mesh = sl.Mesh.simulated({"x": 2})
    a = sl.shard(_v(4, 6), mesh, P(None, "x"))
    e = sl.explain(lambda: torch.relu(a @ a.t()).sum(), show=False)
    names = [o.op for o in e.ops]
    assert names[:2] == ["t.default", "mm.default"] and "relu.default" in names
    text = str(e)
    assert "partial='x'" in text and "all_reduce" in text  # relu needs the sum


@pytest.mark.parametrize(
    "op, args, layout, shape",
    [
        ("unsqueeze_", (1,), P("a", "b"), (5, 6)),
        ("squeeze_", (1,), P("a", None, "b"), (5, 1, 6)),
        ("squeeze_", (), P(None, None, "b"), (5, 1, 6)),
        ("t_", (), P("a", "b", partial=()), (5, 6)),
        ("transpose_", (0, 1), P(None, ("a", "b")), (5, 6)),
        ("unsqueeze_", (0,), P("a", partial="b"), (5, 6)),
    ],
)
def test_in_place_view_ops_change_the_tensor_itself_as_torch_does(op, args, layout, shape):
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    ref = _v(*shape)
    x = sl.shard(ref.clone(), mesh, layout)
    if layout.partial:
        x = sl.reshard(x, layout)  # (a partial value with exact summands)
        ref = x.full()
    with sl.comm_ledger() as led:
        out = getattr(x, op)(*args)
    getattr(ref, op)(*args)
    assert out is x and not led.records
    assert x.shape == ref.shape and x.stride() == ref.stride()
    torch.testing.assert_close(x.full(), ref, rtol=0, atol=0)


def test_in_place_view_op_on_a_tensor_with_views_is_refused_with_the_rebind_fix():
    mesh = sl.Mesh.simulated({"x": 2})
    x = sl.shard(_v(7, 5), mesh, P("x", None))
    v = x[1:]  # noqa: F841  (a live linked view)
    with pytest.raises(sl.NoRuleError, match=r"x = x.unsqueeze\(\.\.\.\)"):
        x.unsqueeze_(0)
