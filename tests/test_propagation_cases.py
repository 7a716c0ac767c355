"""The issue's propagation cases on a simulated mesh {x:4, y:2}, with ledger counts.

Each case checks the output layout, that the ledger is empty (no collective),
and the value against unsharded float64 torch (rtol 1e-12).
"""

from __future__ import annotations

import torch

import shardlib as sl

P = sl.P
MESH = {"x": 4, "y": 2}


def _val(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _no_comm(fn):
    with sl.comm_ledger() as led:
        out = fn()
    assert led.records == [], led.summary()
    return out


def test_matmul_row_split_times_column_split():
    mesh = sl.Mesh.simulated(MESH)
    a, b = _val(8, 16), _val(16, 4, seed=1)
    c = _no_comm(lambda: sl.shard(a, mesh, P("x", None)) @ sl.shard(b, mesh, P(None, "y")))
    assert c.spec == P("x", "y")
    torch.testing.assert_close(c.full(), a @ b, rtol=1e-12, atol=1e-12)


def test_matmul_over_a_split_contracted_dim_is_partial():
    mesh = sl.Mesh.simulated(MESH)
    a, b = _val(8, 16), _val(16, 4, seed=1)
    c = _no_comm(lambda: sl.shard(a, mesh, P(None, "x")) @ sl.shard(b, mesh, P("x", None)))
    assert c.spec == P(None, None, partial="x")
    torch.testing.assert_close(c.full(), a @ b, rtol=1e-12, atol=1e-12)


def test_add_of_row_and_column_splits():
    mesh = sl.Mesh.simulated(MESH)
    a, b = _val(8, 16), _val(8, 16, seed=1)
    c = _no_comm(lambda: sl.shard(a, mesh, P("x", None)) + sl.shard(b, mesh, P(None, "y")))
    assert c.spec == P("x", "y")
    torch.testing.assert_close(c.full(), a + b, rtol=1e-12, atol=1e-12)


def test_sum_over_a_split_dim_is_partial():
    mesh = sl.Mesh.simulated(MESH)
    a = _val(8, 16)
    x = sl.shard(a, mesh, P("x", None))
    s = _no_comm(lambda: x.sum(0))
    assert s.spec == P(None, partial="x")
    torch.testing.assert_close(s.full(), a.sum(0), rtol=1e-12, atol=1e-12)


def test_reshape_keeps_the_major_split():
    mesh = sl.Mesh.simulated(MESH)
    a = _val(8, 6)
    x = sl.shard(a, mesh, P("x", None))
    flat = _no_comm(lambda: x.reshape(48))
    split = _no_comm(lambda: x.reshape(4, 2, 6))
    assert flat.spec == P("x") and split.spec == P("x", None, None)
    assert torch.equal(flat.full(), a.reshape(48)) and torch.equal(split.full(), a.reshape(4, 2, 6))
