"""Contraction rules (mm, bmm, addmm, baddbmm, mv, dot): values, layouts, ledger.

Every sampled pair of operand layouts (including partial operands and uneven
shapes) on simulated meshes {x:4,y:2}, {a:2,b:2}, {a:2,b:2,c:2} gives the
unsharded float64 result (rtol 1e-10, atol 1e-10; sums may be reordered). The
issue's layout cases are checked exactly, with their ledgers: a split
contracted dim gives a partial output and no collective.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from tests.test_distributed import _layouts, _partial_source

P = sl.P
CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 100))
MESHES = [{"x": 4, "y": 2}, {"a": 2, "b": 2}, {"a": 2, "b": 2, "c": 2}]


def _make(mesh, value, layout):
    return _partial_source(mesh, value, layout) if layout.partial else sl.shard(value, mesh, layout)


def _value(shape, seed):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@st.composite
def _case(draw, op):
    axes = draw(st.sampled_from(MESHES))
    mesh = sl.Mesh.simulated(axes)
    if op == "mm":
        m, k, n = (draw(st.integers(1, 9)) for _ in range(3))
        shapes = [(m, k), (k, n)]
    elif op == "bmm":
        b, m, k, n = (draw(st.integers(1, 6)) for _ in range(4))
        shapes = [(b, m, k), (b, k, n)]
    elif op == "addmm":
        m, k, n = (draw(st.integers(1, 9)) for _ in range(3))
        shapes = [draw(st.sampled_from([(m, n), (n,), (1, n)])), (m, k), (k, n)]
    else:  # mv
        m, k = (draw(st.integers(1, 9)) for _ in range(2))
        shapes = [(m, k), (k,)]
    layouts = [draw(st.sampled_from(_layouts(tuple(axes), len(s)))) for s in shapes]
    return mesh, shapes, layouts


def _check(op, fn, data):
    mesh, shapes, layouts = data
    values = [_value(s, i) for i, s in enumerate(shapes)]
    xs = [_make(mesh, v, lay) for v, lay in zip(values, layouts)]
    want = fn(*values)
    got = fn(*xs)
    assert got.shape == want.shape
    torch.testing.assert_close(got.full(), want, rtol=1e-10, atol=1e-10, msg=f"{op} {layouts}")


@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(_case("mm"))
def test_mm_matches_unsharded(data):
    _check("mm", torch.mm, data)


@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(_case("bmm"))
def test_bmm_matches_unsharded(data):
    _check("bmm", torch.bmm, data)


@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(_case("addmm"))
def test_addmm_matches_unsharded(data):
    _check("addmm", lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0), data)


@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(_case("mv"))
def test_mv_matches_unsharded(data):
    _check("mv", torch.mv, data)


@pytest.mark.parametrize(
    ("la", "lb", "out"),
    [
        (P("x", None), P(None, "y"), P("x", "y")),
        (P(None, "x"), P("x", None), P(None, None, partial="x")),
        (P("x", "y"), P("y", None), P("x", None, partial="y")),
        (P(None, None, partial="y"), P("x", None), P(None, None, partial=("x", "y"))),
    ],
    ids=str,
)
def test_issue_layouts_need_no_collective(la, lb, out):
    mesh = sl.Mesh.simulated({"x": 4, "y": 2})
    a_val, b_val = _value((8, 16), 0), _value((16, 4), 1)
    a, b = _make(mesh, a_val, la), _make(mesh, b_val, lb)
    with sl.comm_ledger() as led:
        c = a @ b
    assert c.spec == out and led.records == []
    torch.testing.assert_close(c.full(), a_val @ b_val, rtol=1e-10, atol=1e-10)


def test_partial_output_reduces_by_reduce_scatter_when_consumer_wants_a_split():
    mesh = sl.Mesh.simulated({"x": 4})
    a_val, b_val = _value((8, 16), 0), _value((16, 4), 1)
    c = sl.shard(a_val, mesh, P(None, "x")) @ sl.shard(b_val, mesh, P("x", None))
    with sl.comm_ledger() as led:
        d = sl.reshard(c, P("x", None))
    assert [r.kind for r in led.records] == ["reduce_scatter"]
    torch.testing.assert_close(d.full(), a_val @ b_val, rtol=1e-10, atol=1e-10)


def test_two_partial_operands_reduce_one_first():
    mesh = sl.Mesh.simulated({"x": 2})
    a_val, b_val = _value((4, 6), 0), _value((6, 3), 1)
    a = _partial_source(mesh, a_val, P(None, None, partial="x"))
    b = _partial_source(mesh, b_val, P(None, None, partial="x"))
    with sl.comm_ledger() as led:
        c = a @ b
    assert led.count("all_reduce") == 1 and c.spec.partial == ("x",)
    torch.testing.assert_close(c.full(), a_val @ b_val, rtol=1e-10, atol=1e-10)


@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(
    st.sampled_from(["mm", "bmm", "addmm", "mv"]).flatmap(
        lambda op: _case(op).map(lambda c: (op, c))
    )
)
def test_contraction_gradients_match_unsharded(op_case):
    """Gradients through `.full()` of every operand (partial operands included), float64."""
    op, (mesh, shapes, layouts) = op_case
    fn = {
        "mm": torch.mm,
        "bmm": torch.bmm,
        "mv": torch.mv,
        "addmm": lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0),
    }[op]
    values = [_value(s, i) for i, s in enumerate(shapes)]
    xs = [_make(mesh, v, lay).requires_grad_() for v, lay in zip(values, layouts)]
    refs = [v.clone().requires_grad_() for v in values]
    w = _value(fn(*values).shape, 99)
    grads = torch.autograd.grad((fn(*xs).full() * w).sum(), xs)
    ref_grads = torch.autograd.grad((fn(*refs) * w).sum(), refs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.full(), want, rtol=1e-10, atol=1e-10, msg=f"{op} {layouts}")


def _linear_case(mesh):
    """An activation (a non-leaf, as in a model) times a row-split weight, and its weakref."""
    import weakref

    x0 = sl.shard(_value((6, 5), 1), mesh, P("x", None)).requires_grad_()
    w = sl.shard(_value((5, 4), 2), mesh, P(None, "y")).requires_grad_()
    x = x0 * 2.0
    ref = weakref.ref(x._shards[0])
    loss = (_linear(x, w) * 3.0).sum()
    return x0, w, loss, ref


def _linear(x, w):
    """The contraction whose operands are kept for backward (`sl.einsum` with out_layout,
    as `snn.linear` runs it); torch.mm's are saved by torch's own MmBackward."""
    return sl.einsum("ij,jk->ik", x, w, out_layout=P("x", "y"))


def test_contraction_frees_its_operands_after_backward():
    """Like a torch node's saved tensors, the operands a contraction keeps for backward are
    freed once its backward ran (retain_graph=False), not held as long as the graph lives:
    otherwise every layer's activations stay beside the gradients until the step ends. A
    second backward then raises an error naming retain_graph."""
    mesh = sl.Mesh.simulated({"x": 2, "y": 2})
    x0, w, loss, ref = _linear_case(mesh)
    assert ref() is not None  # kept for backward
    loss.backward()
    assert ref() is None, "the activation outlived its contraction's backward"
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()  # torch's error: the graph's other nodes were freed too
    # a graph of the contraction alone reaches shardlib's own error
    loss = _linear(x0, w).sum()
    loss.backward()
    with pytest.raises(sl.ShardlibError, match="retain_graph=True"):
        loss.backward()


def test_contraction_keeps_its_operands_with_retain_graph():
    """retain_graph=True keeps them: the second backward adds the same gradients again."""
    mesh = sl.Mesh.simulated({"x": 2, "y": 2})
    x0, w, loss, ref = _linear_case(mesh)
    loss.backward(retain_graph=True)
    first = (x0.grad.full().clone(), w.grad.full().clone())
    assert ref() is not None
    loss.backward()
    x, wv = _value((6, 5), 1).requires_grad_(), _value((5, 4), 2).requires_grad_()
    y = torch.mm(x * 2.0, wv)
    want = torch.autograd.grad((y * 3.0).sum(), (x, wv))
    for got, once, ref_g in zip((x0.grad.full(), w.grad.full()), first, want):
        torch.testing.assert_close(once, ref_g, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got, 2 * ref_g, rtol=1e-10, atol=1e-10)
