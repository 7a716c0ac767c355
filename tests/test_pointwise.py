"""Pointwise partial semantics beyond the validator: numbers added to partial values, scalars.

`x + c` on a partial x stays partial with no collective (each summand gets c/k
for a sum over k devices, c for avg/max/min), in place too; values equal the
unsharded float64 result (rtol 1e-12). Integer partial sums are reduced first.
"""

from __future__ import annotations

import pytest
import torch

import shardlib as sl

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
    assert led.records == [] and y.layout == x.layout and w.layout == x.layout
    for got, want in ((y, ref + 2.5), (z, ref - 1.0), (w, ref + 0.5)):
        torch.testing.assert_close(got.full(), want, rtol=1e-12, atol=1e-12)


def test_integer_partial_sum_plus_number_reduces_first():
    mesh = sl.Mesh.simulated({"x": 4})
    x = _partial("sum", mesh, torch.int64)
    with sl.comm_ledger() as led:
        y = x + 3
    assert [r.kind for r in led.records] == ["all_reduce"] and not y.layout.partial
    assert torch.equal(y.full(), x.full() + 3)
