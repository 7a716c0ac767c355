"""Pointwise rules: sampled conformance (forward and gradients) and partial + number.

`x + c` on a partial x stays partial with no collective (each summand gets c/k
for a sum over k devices, c for avg/max/min), in place too; values equal the
unsharded float64 result (rtol 1e-12). Integer partial sums are reduced first.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from tests.test_distributed import _layouts, _partial_source

P = sl.P


def _partial(op: str, mesh: sl.Mesh, dtype=torch.float64) -> sl.ShardedTensor:
    shards = [(torch.arange(6, dtype=dtype) + 3 * i).reshape(2, 3) for i in range(mesh.size)]
    return sl.from_local(shards, mesh, P(None, None, partial={"x": op}), (2, 3))


@pytest.mark.parametrize("op", ["sum", "avg", "max", "min"])
def test_number_plus_partial_stays_partial(op):
    mesh = sl.Mesh.simulated({"x": 4})
    x = _partial(op, mesh)
    ref = x.full()
    with sl.comm_ledger() as led:
        y, z = x + 2.5, x - 1.0
        w = _partial(op, mesh)
        w.add_(0.5)
    assert led.records == [] and y.spec == x.spec and w.spec == x.spec
    for got, want in ((y, ref + 2.5), (z, ref - 1.0), (w, ref + 0.5)):
        torch.testing.assert_close(got.full(), want, rtol=1e-12, atol=1e-12)


def test_number_plus_partial_sum_is_exact():
    """The number goes to one summand (index 0 along the partial axes): exact for integers
    and for sizes like 3 where c/3 per summand would round."""
    for axes, dtype in (({"x": 4}, torch.int64), ({"x": 3}, torch.float64)):
        mesh = sl.Mesh.simulated(axes)
        x = _partial("sum", mesh, dtype)
        with sl.comm_ledger() as led:
            y, z = x + 3, x - 2
        assert led.records == [] and y.spec == x.spec
        assert torch.equal(y.full(), x.full() + 3) and torch.equal(z.full(), x.full() - 2)


# == sampled conformance: forward and gradients =================================


CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 100))
MESHES = [{"x": 4, "y": 2}, {"a": 2, "b": 2}, {"a": 2, "b": 2, "c": 2}]
UNARY = {
    "exp": torch.exp,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "neg": torch.neg,
    "sigmoid": torch.sigmoid,
    "square": lambda t: t * t,
    "scale": lambda t: 3.0 * t - 1.0,
}
BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": lambda a, b: a / (b * b + 1),
    "maximum": torch.maximum,
    "where": lambda a, b: torch.where(a > b, a, 2 * b),
}


@st.composite
def _pointwise_case(draw):
    axes = draw(st.sampled_from(MESHES))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    binary = draw(st.booleans())
    name = draw(st.sampled_from(sorted(BINARY if binary else UNARY)))
    shapes = [shape]
    if binary:  # the second operand may broadcast: drop leading dims, or set some to 1
        k = draw(st.integers(0, len(shape) - 1))
        shapes.append(tuple(1 if draw(st.booleans()) else n for n in shape[k:]))
    names = tuple(axes)
    lays = [draw(st.sampled_from(_layouts(names, len(s)))) for s in shapes]
    return axes, name, shapes, lays


@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(_pointwise_case())
def test_pointwise_forward_and_gradients_match_unsharded(case):
    """Sampled op x shapes (broadcasting) x layouts (partial included); float64, rtol 1e-10."""
    axes, name, shapes, lays = case
    fn = BINARY.get(name) or UNARY[name]
    mesh = sl.Mesh.simulated(axes)
    g = torch.Generator().manual_seed(0)
    vals = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    xs = [
        (_partial_source(mesh, v, lay) if lay.partial else sl.shard(v, mesh, lay)).requires_grad_()
        for v, lay in zip(vals, lays)
    ]
    refs = [v.clone().requires_grad_() for v in vals]
    w = torch.randn(fn(*vals).shape, dtype=torch.float64, generator=g)
    out, ref = fn(*xs), fn(*refs)
    torch.testing.assert_close(out.full(), ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((out.full() * w).sum(), xs)
    ref_grads = torch.autograd.grad((ref * w).sum(), refs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.full(), want, rtol=1e-10, atol=1e-10)
