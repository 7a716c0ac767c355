"""Donated buffers: a contraction's partial product is all-reduced in its own memory.

Megatron all-reduces a row-parallel matmul's output in place; shardlib used to copy it first
(one activation-sized clone per all-reduce, ten a GPT step). `execute(..., donate=True)`
lets the all-reduce step reuse the caller's blocks, and the contraction paths donate the
products they just made (nobody else holds them).

Covers: the executor on a simulated mesh (a one-device group returns the donated blocks; a
real group computes fresh ones and leaves the inputs alone), on 4 gloo ranks (the donated
block is the result, summed in place; without donating the input is untouched), and a
row-parallel `sl.einsum` forward and backward whose values equal unsharded float64 torch and
whose ledger is unchanged by donation (one all-reduce of b*o elements each way).

Tolerances: float64 against the unsharded reference: rtol 1e-12, atol 1e-12; gloo sums of
float32 are exact here (small integers).
"""

from __future__ import annotations

import math

import pytest
import torch

import shardlib as sl
from shardlib.collectives._redistribute import execute

P = sl.P
TOL = dict(rtol=1e-12, atol=1e-12)


def _partial_to_replicated(mesh, blocks, donate: bool):
    p = sl.plan(P(None, partial="x"), P(None), (3,), mesh, torch.float32)
    return execute(p, mesh, blocks, direction="forward", cause="test", donate=donate)


def test_simulated_one_device_group_returns_the_donated_blocks():
    mesh = sl.Mesh.simulated({"x": 1})
    blocks = [torch.tensor([1.0, 2.0, 3.0])]
    out = _partial_to_replicated(mesh, blocks, donate=True)
    assert out[0] is blocks[0]
    kept = _partial_to_replicated(mesh, blocks, donate=False)
    assert kept[0] is not blocks[0] and torch.equal(kept[0], blocks[0])


def test_simulated_group_sums_and_leaves_inputs():
    mesh = sl.Mesh.simulated({"x": 4})
    blocks = [torch.full((3,), float(d + 1)) for d in range(4)]
    before = [b.clone() for b in blocks]
    out = _partial_to_replicated(mesh, blocks, donate=True)
    for o in out:
        assert torch.equal(o, torch.full((3,), 10.0))
    for b, want in zip(blocks, before):
        assert torch.equal(b, want)
    assert len({o.untyped_storage().data_ptr() for o in out}) == 4  # distinct replicas


def donated_all_reduce(mesh, donate: bool):
    """This rank's block before and after, and whether the result is the donated memory."""
    rank = mesh.local_devices[0]
    block = torch.full((3,), float(rank + 1))
    (out,) = _partial_to_replicated(mesh, [block], donate)
    return (
        block.tolist(),
        out.tolist(),
        out.untyped_storage().data_ptr() == (block.untyped_storage().data_ptr()),
    )


@pytest.mark.dist
@pytest.mark.parametrize("donate", [True, False])
def test_distributed_all_reduce_in_place_when_donated(workers4, donate):
    for rank, (block, out, same) in enumerate(
        workers4.run(donated_all_reduce, {"x": 4}, (donate,))
    ):
        assert out == [10.0] * 3, rank
        assert same is donate, rank
        assert block == ([10.0] * 3 if donate else [float(rank + 1)] * 3), rank


def row_parallel(mesh):
    """A row-parallel linear (x split on its contracted dim, w on its rows) forward and
    backward in float64: y, dx, dw as full tensors and the ledger's (kind, bytes) records."""
    g = torch.Generator().manual_seed(0)
    X, W = (
        torch.randn(5, 8, generator=g, dtype=torch.float64),
        torch.randn(8, 3, generator=g, dtype=torch.float64),
    )
    x = sl.shard(X, mesh, P(None, "x")).requires_grad_()
    w = sl.shard(W, mesh, P("x", None)).requires_grad_()
    with sl.comm_ledger() as led:
        y = sl.einsum("ik,kj->ij", x, w, out_layout=P(None, None))
        y.sum().backward()
    return (
        y.full(),
        x.grad.full(),
        w.grad.full(),
        [(r.kind, r.bytes) for r in led.records],
        X,
        W,
    )


def test_row_parallel_values_and_ledger():
    y, dx, dw, records, X, W = row_parallel(sl.Mesh.simulated({"x": 4}))
    Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
    (Xr @ Wr).sum().backward()
    torch.testing.assert_close(y, X @ W, **TOL)
    torch.testing.assert_close(dx, Xr.grad, **TOL)
    torch.testing.assert_close(dw, Wr.grad, **TOL)
    # ring model on 15 float64 elements in 4 chunks of ceil(15 / 4): 2 (P - 1) chunks sent
    assert records[0] == ("all_reduce", 2 * 3 * math.ceil(5 * 3 / 4) * 8)


def rank_row_parallel(mesh):
    y, dx, dw, records, _, _ = row_parallel(mesh)
    return y, dx, dw, records


@pytest.mark.dist
def test_row_parallel_on_gloo_equals_simulated(workers4):
    sim = rank_row_parallel(sl.Mesh.simulated({"x": 4}))
    for rank, got in enumerate(workers4.run(rank_row_parallel, {"x": 4})):
        for a, b in zip(got[:3], sim[:3]):
            torch.testing.assert_close(a, b, **TOL)
        assert got[3] == sim[3], rank
