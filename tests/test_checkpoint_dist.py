"""sl.checkpoint on real gloo ranks (4 processes) and DTensor interop (``dist`` marker).

Covers: a save on `Mesh.distributed({"dp": 2, "tp": 2})` (every rank writes
its own exact boxes, each replica once, by the rank with coordinate 0 on the
replicated axes; a partial source reduced first) loads on simulated meshes
bitwise equal to the unsharded value, and a simulated save loads on the gloo
ranks (each rank's block and full()); DTensor interop both ways: a checkpoint
DTensor wrote with `torch.distributed.checkpoint.save` (uneven Shard,
Replicate, nested dict, step) loads with `sl.checkpoint.load` onto simulated
layouts, and DTensors read a shardlib checkpoint with plain `dcp.load`.
Workers come from tests/conftest.py (`workers4`).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import shardlib as sl
from tests._reference import block, make_summands

P = sl.P
AXES = {"dp": 2, "tp": 2}


def _values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(80)
    return {
        "w": torch.randn(7, 5, generator=g),
        "r": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "i": torch.randint(-99, 99, (6,), generator=g),
        "m": torch.randint(0, 2, (3, 4), generator=g).bool(),
        "g": torch.randint(-9, 9, (5, 3), generator=g).double(),
        "plain": torch.arange(4.0),
    }


SAVE_LAYOUTS = {
    "w": P("dp", "tp"),
    "r": P("tp", None),  # replicated over dp: each row block written once
    "i": P(("tp", "dp")),
    "m": P(None, "dp"),
    "g": P(None, "tp", partial="dp"),
}


# == on the ranks ==============================================================
def save_on_ranks(mesh, path: str):
    """Each rank builds its own blocks (a partial one from exact summands) and saves."""
    v = _values()
    rank = dist.get_rank()
    tree = {"params": {}, "plain": v["plain"], "step": 25, "data": {"pos": 1234}}
    for key, layout in SAVE_LAYOUTS.items():
        layout = layout.check(mesh.abstract, v[key].ndim)
        if layout.partial:
            mine = make_summands(v[key], layout, mesh.axes)[rank].to(v[key].dtype)
        else:
            mine = block(v[key], layout, mesh.axes, rank).contiguous()
        tree["params"][key] = sl.from_local([mine], mesh, layout, tuple(v[key].shape))
    with sl.comm_ledger() as led:
        sl.checkpoint.save(path, tree)
    return [(r.kind, r.axes, r.cause) for r in led.records]


LOAD_LAYOUTS = {
    "w": P(None, ("tp", "dp")),
    "r": P(partial="tp"),
    "i": P(),
    "m": P("tp", "dp"),
    "g": P("dp", None),
}


def load_on_ranks(mesh, path: str):
    like = {
        "params": {k: (mesh, lay) for k, lay in LOAD_LAYOUTS.items()},
        "plain": torch.empty(4),
        "step": 0,
    }
    out = sl.checkpoint.load(path, like)
    params = out["params"]
    return (
        {k: x.local_shards()[0] for k, x in params.items()},
        {k: x.full() for k, x in params.items()},
        out["plain"],
        out["step"],
    )


def dtensor_save_and_load(mesh, write_path: str, read_path: str):
    """DTensor writes a checkpoint with DCP; then DTensors read a shardlib checkpoint."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dmesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    v = _values()
    state = {
        "model": {
            "w": distribute_tensor(v["w"], dmesh, [Shard(0), Shard(1)]),  # 7 x 5: uneven both
            "r": distribute_tensor(v["r"], dmesh, [Replicate(), Shard(0)]),
            "i": distribute_tensor(v["i"], dmesh, [Shard(0), Shard(0)]),
        },
        "step": 3,
    }
    dcp.save(state, checkpoint_id=write_path)
    dist.barrier()
    target = {
        "params": {
            "w": distribute_tensor(torch.zeros(7, 5), dmesh, [Shard(1), Replicate()]),
            "g": distribute_tensor(
                torch.zeros(5, 3, dtype=torch.float64), dmesh, [Shard(0), Shard(1)]
            ),
        },
        "step": 0,
    }
    dcp.load(target, checkpoint_id=read_path)
    return {k: t.full_tensor() for k, t in target["params"].items()}, target["step"]


# == the tests =================================================================
@pytest.mark.dist
def test_save_on_gloo_ranks_load_on_simulated_meshes(workers4, tmp_path):
    path = tmp_path / "h8c-dist-save"
    records = workers4.run(save_on_ranks, AXES, (str(path),))
    for rank_records in records:  # the partial source reduced first: one reduce-scatter
        assert rank_records == [("reduce_scatter", ("dp",), "checkpoint")], rank_records
    v = _values()
    md = dcp.FileSystemReader(path).read_metadata()
    # each replica once, written by the rank with coordinate 0 on the replicated axes
    r_chunks = md.state_dict_metadata["params.r"].chunks
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in r_chunks) == [
        ((0, 0), (3, 3)),
        ((3, 0), (2, 3)),
    ]
    writers = {}
    for index, info in md.storage_data.items():
        if index.fqn == "params.r":
            writers[tuple(index.offset)] = info.relative_path.split("_")[2]
    assert writers == {(0, 0): "0", (3, 0): "1"}  # ranks (dp 0, tp 0) and (dp 0, tp 1)
    for mesh_axes, layouts in [
        ({"x": 3}, {"w": P("x"), "r": P(None, "x"), "i": P("x"), "m": P(None, "x"), "g": P()}),
        ({"x": 1}, {k: P() for k in SAVE_LAYOUTS}),
    ]:
        mesh = sl.Mesh.simulated(mesh_axes)
        like = {
            "params": {k: (mesh, lay) for k, lay in layouts.items()},
            "plain": torch.empty(4),
            "step": 0,
            "data": {"pos": 0},
        }
        out = sl.checkpoint.load(path, like)
        for k in SAVE_LAYOUTS:
            got = out["params"][k]
            assert got.spec == layouts[k].check(mesh.abstract, v[k].ndim), k
            assert torch.equal(got.full(), v[k]), k
        assert torch.equal(out["plain"], v["plain"])
        assert out["step"] == 25 and out["data"] == {"pos": 1234}


@pytest.mark.dist
def test_save_on_simulated_mesh_load_on_gloo_ranks(workers4, tmp_path):
    path = tmp_path / "h8c-dist-load"
    v = _values()
    mesh = sl.Mesh.simulated({"x": 3})
    sl.checkpoint.save(
        path,
        {
            "params": {k: sl.shard(v[k], mesh, P("x")) for k in LOAD_LAYOUTS},
            "plain": v["plain"],
            "step": 25,
        },
    )
    results = workers4.run(load_on_ranks, AXES, (str(path),))
    axes = AXES
    for rank, (local, full, plain, step) in enumerate(results):
        for k, layout in LOAD_LAYOUTS.items():
            layout = layout.check(sl.AbstractMesh(("dp", "tp"), (2, 2)), v[k].ndim)
            want = block(v[k], layout.without_partial(), axes, rank)
            if layout.partial and rank % 2:  # P(partial='tp'): zeros off tp index 0
                want = torch.zeros_like(want)
            assert torch.equal(local[k], want), (rank, k)
            assert torch.equal(full[k], v[k]), (rank, k)
        assert torch.equal(plain, v["plain"]) and step == 25


@pytest.mark.dist
def test_dtensor_interop_both_ways(workers4, tmp_path):
    written_by_dtensor = tmp_path / "h8c-dtensor"
    ours = tmp_path / "h8c-ours"
    v = _values()
    sim = sl.Mesh.simulated({"p": 3, "q": 2})
    sl.checkpoint.save(
        ours,
        {
            "params": {
                "w": sl.shard(v["w"], sim, P("q", "p")),
                "g": sl.shard(v["g"], sim, P(None, "q")),
            },
            "step": 11,
        },
    )
    results = workers4.run(dtensor_save_and_load, AXES, (str(written_by_dtensor), str(ours)))
    for full, step in results:  # DTensor read ours
        assert torch.equal(full["w"], v["w"]) and torch.equal(full["g"], v["g"]) and step == 11
    like = {
        "model": {
            "w": (sim, P("p", "q")),
            "r": (sim, P(("q", "p"))),
            "i": torch.empty(6, dtype=torch.int64),
        },
        "step": 0,
    }
    out = sl.checkpoint.load(written_by_dtensor, like)  # we read DTensor's
    assert torch.equal(out["model"]["w"].full(), v["w"])
    assert torch.equal(out["model"]["r"].full(), v["r"])
    assert torch.equal(out["model"]["i"], v["i"]) and out["step"] == 3
