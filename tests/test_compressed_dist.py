"""Compressed `sl.reshard(comm_dtype=...)` on 4 real gloo ranks equals the simulated mesh
bit for bit, with the same ledger.

Each rank runs the same moves (gather, uneven gather, reduce-scatter, partial ->
replicated, all-to-all, and a gather's compressed backward) in int8, fp8 and bf16 on
`Mesh.distributed({"dp": 4})` and returns its local shards and ledger; the simulated run
of the same program must give device r's shards identically (``torch.equal``: the same
local quantization, the same bytes moved, the same float32 reduction order) and the same
records (kind, axes, bytes, dtype, scale bytes). A ppermute ({a: 2, b: 2}) likewise. That the values are within the format's
bound is tests/test_compressed.py's (simulated) check, which therefore holds here too.
"""

from __future__ import annotations

import pytest
import torch

import shardlib as sl

FORMATS = ("int8", "fp8", torch.bfloat16)


def _program(mesh) -> tuple[list[list[torch.Tensor]], list[tuple]]:
    """The moves, on `mesh` ({dp: 4}); (per move, this process's shards), the records."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 300, generator=g) * 10
    parts = [torch.randn(8, 300, generator=g) * (j + 1) for j in range(4)]
    a = torch.randn(8, 10, generator=g)
    out = []
    with sl.comm_ledger() as led:
        for fmt in FORMATS:
            xs = sl.shard(x, mesh, sl.P("dp", None))  # uneven: 3, 3, 2, 2 rows
            xe = sl.shard(x[:8], mesh, sl.P(None, "dp"))
            mine = [parts[d] for d in mesh.local_devices]
            xp = sl.from_local(mine, mesh, sl.P(partial="dp"), (8, 300))
            out.append(sl.reshard(xs, sl.P(), comm_dtype=fmt).local_shards())
            out.append(sl.reshard(xe, sl.P(), comm_dtype=fmt).local_shards())
            out.append(sl.reshard(xp, sl.P("dp", None), comm_dtype=fmt).local_shards())
            out.append(sl.reshard(xp, sl.P(), comm_dtype=fmt).local_shards())
            out.append(sl.reshard(xs, sl.P(None, "dp"), comm_dtype=fmt).local_shards())
            w = sl.shard(x, mesh, sl.P("dp", None)).requires_grad_()
            batch = sl.shard(a, mesh, sl.P("dp", None))
            (batch @ sl.reshard(w, sl.P(), comm_dtype=fmt)).sum().backward()
            out.append(w.grad.local_shards())
    records = [(r.kind, r.axes, r.bytes, r.dtype, r.scale_bytes) for r in led.records]
    return out, records


def _on_rank(mesh):
    return _program(mesh)


@pytest.mark.dist
def test_gloo_equals_simulated_bitwise(workers4):
    results = workers4.run(_on_rank, {"dp": 4})
    sim_out, sim_records = _program(sl.Mesh.simulated({"dp": 4}))
    assert {r[3] for r in sim_records} == {"int8", "float8_e4m3fn", "bfloat16"}
    for rank, (out, records) in enumerate(results):
        assert records == sim_records, rank
        for i, (got, want) in enumerate(zip(out, sim_out)):
            (shard,) = got
            assert torch.equal(shard, want[rank]), (rank, i)


def _ppermute_on_rank(mesh):
    x = torch.randn(10, 70, generator=torch.Generator().manual_seed(1))
    with sl.comm_ledger() as led:
        y = sl.reshard(sl.shard(x, mesh, sl.P("a", "b")), sl.P("b", "a"), comm_dtype="int8")
    return y.local_shards(), [(r.kind, r.bytes, r.dtype) for r in led.records]


@pytest.mark.dist
def test_gloo_ppermute_equals_simulated_bitwise(workers4):
    results = workers4.run(_ppermute_on_rank, {"a": 2, "b": 2})
    sim, sim_records = _ppermute_on_rank(sl.Mesh.simulated({"a": 2, "b": 2}))
    assert [r[0] for r in sim_records] == ["ppermute"]
    for rank, (shards, records) in enumerate(results):
        assert records == sim_records and torch.equal(shards[0], sim[rank]), rank
