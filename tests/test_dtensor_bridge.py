"""The DTensor bridge: `sl.from_dtensor(dt, mesh=None)` and `x.to_dtensor(device_mesh=None)`.

Covers, against torch's own DTensor code as the reference (its placements'
``_split_tensor`` on index tensors and ``_compute_local_shape_and_global_offset``
for which indices a rank holds, ``DTensorSpec._convert_shard_order_to_StridedShard``
for the placements of a split order, DTensor's ``full_tensor`` and
``redistribute`` for values):

- pure data: the bridge's model of DTensor's chunking (Shard, _StridedShard,
  uneven) equals torch's splitting of an index tensor; layouts encode to
  torch's placements and decode back;
- simulated mesh (LocalTensorMode over a one-process "fake" world of 4 ranks):
  every layout of a 2-d tensor on {a: 2, b: 2} and {x: 4} (partials with each
  reduce op included), even and uneven shapes, both ways: values bitwise, the
  ledger empty and the storage shared exactly where torch's blocks equal
  shardlib's, a ledgered move (closed-form bytes) where they differ, and
  `sl.strict` refusing that move; DTensors built by DTensor itself
  (distribute_tensor, from_local with partial summands) convert;
  `dt.redistribute(placements)` equals `sl.reshard` (a fixed sample of pairs;
  every pair under ``-m slow``); autograd through both conversions;
- a sample of layouts on a 2x3x2 mesh (a 12-rank fake world, in a subprocess;
  ``-m slow``), where uneven _StridedShards hold non-block index sets;
- bad input: a DeviceMesh of other sizes, names or rank order, no names, the
  wrong backend, placements with no layout (product, mixed partial ops);
- the refusal of an uneven split in a non-DeviceMesh order (torch 2.13 DTensor
  mis-assembles uneven _StridedShards: wrong full_tensor on 2x3x2);
- 4 gloo ranks (``dist``): the same round trips with each rank's local tensor
  its shard, zero-copy, and redistribute against reshard.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random

import pytest
import torch
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, ShardOrderEntry
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

import shardlib as sl
from shardlib.layouts._shard import local_bounds
from shardlib.ops import _dtensor

MESHES = [{"a": 2, "b": 2}, {"x": 4}]
SHAPES = [(4, 8), (6, 5), (3, 1), (0, 2)]  # even, uneven (moves on 2x2), short, empty


# == helpers (shared with the gloo workers) ======================================
def all_layouts(axes: dict[str, int], ndim: int) -> list[sl.Layout]:
    """Every layout of a rank-`ndim` tensor: each axis on a dim (every order), partial
    (each reduce op), or unused."""
    names, out = list(axes), []
    for assign in itertools.product([*range(ndim), "P", None], repeat=len(names)):
        per_dim = [[n for n, a in zip(names, assign) if a == d] for d in range(ndim)]
        partial = tuple(n for n, a in zip(names, assign) if a == "P")
        for orders in itertools.product(*(itertools.permutations(p) for p in per_dim)):
            for op in ("sum", "avg", "max", "min") if partial else ("sum",):
                out.append(sl.Layout(tuple(orders), partial, op))
    return out


class _Sizes:
    """What torch's shard-order encoding reads of a DeviceMesh: `size(i)`."""

    def __init__(self, sizes):
        self.sizes = sizes

    def size(self, i):
        return self.sizes[i]


def torch_placements(layout: sl.Layout, names, sizes) -> tuple:
    """The placements torch itself gives the split orders of `layout` (its shard order)."""
    base = []
    for n in names:
        d = layout.dim_of(n)
        if n in layout.partial:
            base.append(Partial(layout.reduce_op))
        else:
            base.append(Replicate() if d is None else Shard(d))
    order = tuple(
        ShardOrderEntry(d, tuple(names.index(a) for a in axes))
        for d, axes in enumerate(layout.dims)
        if axes
    )
    return DTensorSpec._convert_shard_order_to_StridedShard(order, tuple(base), _Sizes(sizes))


def _torch_indices(n, placements, sizes, coord, dim=0) -> list[int]:
    """Global indices of `dim` the rank holds, by DTensor's own splitting of an index tensor."""
    idx = torch.arange(n)
    for i, p in enumerate(placements):
        if isinstance(p, Shard | _StridedShard) and p.dim == dim:
            one_d = Shard(0) if type(p) is Shard else _StridedShard(0, split_factor=p.split_factor)
            idx = one_d._split_tensor(idx, sizes[i], with_padding=False, contiguous=False)[0][
                coord[i]
            ]
    return idx.tolist()


def torch_indices(shape, sizes, coord, placements) -> list[list[int]]:
    """Per dim, the global indices the rank at `coord` holds (DTensor's own splitting)."""
    return [_torch_indices(n, placements, sizes, coord, d) for d, n in enumerate(shape)]


def blocks_agree(shape, layout, mesh, placements) -> bool:
    """Whether DTensor's indices equal shardlib's block on every device (not the bridge's)."""
    for dev in range(mesh.size):
        ours = [list(range(lo, hi)) for lo, hi in local_bounds(shape, layout, mesh.abstract, dev)]
        if ours != torch_indices(shape, tuple(mesh.shape), mesh.coords(dev), placements):
            return False
    return True


def local_tensors(dt) -> dict[int, torch.Tensor]:
    """Rank -> local tensor of a DTensor (or of a LocalTensor itself)."""
    local = dt if isinstance(dt, LocalTensor) else dt._local_tensor
    if isinstance(local, LocalTensor):
        return dict(local._local_tensors)
    return {dist.get_rank(): local}


def _mode(mesh):
    return (
        LocalTensorMode(mesh.size) if mesh.backend.kind == "simulated" else contextlib.nullcontext()
    )


def _integer_values(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, shape, generator=g).double()  # sums and /2, /4 are exact


def reference_local(t, layout, mesh, dev, placements) -> torch.Tensor:
    """What rank `dev` of a DTensor of `t` holds: DTensor's indices; a sum partial's
    summands are sl.shard's (the value at index 0 of the partial axes, zeros elsewhere)."""
    value = t
    for d, idx in enumerate(
        torch_indices(tuple(t.shape), tuple(mesh.shape), mesh.coords(dev), placements)
    ):
        value = value.index_select(d, torch.tensor(idx, dtype=torch.long))
    if layout.reduce_op == "sum" and mesh.index_along(dev, layout.partial):
        return torch.zeros_like(value)
    return value


def uneven_strided(shape, placements, sizes) -> bool:
    """A _StridedShard on a dim its mesh dims do not divide (to_dtensor refuses these)."""

    def splits(d):
        return [sizes[i] for i, q in enumerate(placements) if _is_shard(q) and q.dim == d]

    return any(
        isinstance(p, _StridedShard) and shape[p.dim] % math.prod(splits(p.dim)) for p in placements
    )


def _is_shard(p) -> bool:
    return isinstance(p, Shard | _StridedShard)


def dtensor_of_reference(t, layout, mesh, dm, placements):
    """A DTensor of `t` built with DTensor.from_local from `reference_local` blocks."""
    locs = {dev: reference_local(t, layout, mesh, dev, placements) for dev in mesh.local_devices}
    local = LocalTensor(locs) if mesh.backend.kind == "simulated" else locs[dist.get_rank()]
    dm = dm or mesh.backend.device_mesh
    return DTensor.from_local(
        local, dm, placements, run_check=False, shape=t.shape, stride=t.stride()
    )


def check_round_trips(mesh, dm, shapes, full_check_shapes) -> list[str]:
    """Every layout both ways on `mesh` (either backend); the failures as text."""
    bad = []
    names, sizes = tuple(mesh.axis_names), tuple(mesh.shape)
    for shape in shapes:
        t = _integer_values(shape)
        for layout in all_layouts(mesh.axes, len(shape)):
            want = torch_placements(layout, names, sizes)
            agree = blocks_agree(shape, layout, mesh, want)
            x = sl.shard(t, mesh, layout)
            tag = f"{layout!r} {shape}"
            if uneven_strided(shape, want, sizes):  # refused; DTensors of it still convert
                try:
                    x.to_dtensor(dm)
                    bad.append(f"{tag}: to_dtensor makes an uneven _StridedShard")
                except sl.LayoutError as e:
                    if "_StridedShard" not in str(e):
                        bad.append(f"{tag}: to_dtensor refuses with {e}")
                dt = dtensor_of_reference(t, layout, mesh, dm, want)
            else:
                with sl.comm_ledger() as led:
                    dt = x.to_dtensor(dm)
                bad += _check_to(dt, x, t, mesh, want, agree, led, tag, shape in full_check_shapes)
            with sl.comm_ledger() as led:
                y = sl.from_dtensor(dt, mesh)
            bad += _check_from(y, dt, x, mesh, agree, led, tag)
    return bad


def _check_to(dt, x, t, mesh, want, agree, led, tag, full_check) -> list[str]:
    bad = []
    if tuple(dt.placements) != tuple(want):
        bad.append(f"{tag}: placements {dt.placements}, torch gives {want}")
    locs = local_tensors(dt)
    for dev, shard in zip(mesh.local_devices, x.local_shards()):
        if not torch.equal(locs[dev], reference_local(t, x.spec, mesh, dev, want)):
            bad.append(f"{tag}: rank {dev} holds {locs[dev].tolist()}")
        shares = locs[dev].untyped_storage().data_ptr() == shard.untyped_storage().data_ptr()
        if agree and shard.numel() and not shares:
            bad.append(f"{tag}: blocks agree but rank {dev}'s local tensor is a copy")
    if full_check:
        with _mode(mesh):
            full = dt.full_tensor()
        fulls = local_tensors(full) if isinstance(full, LocalTensor) else {0: full}
        if not all(torch.equal(v, t) for v in fulls.values()):
            bad.append(f"{tag}: DTensor's full_tensor differs")
    return bad + _check_ledger(led, agree, "to_dtensor", tag)


def _check_from(y, dt, x, mesh, agree, led, tag) -> list[str]:
    bad = []
    if y.spec != x.spec or not all(
        torch.equal(a, b) for a, b in zip(y.local_shards(), x.local_shards())
    ):
        bad.append(f"{tag}: from_dtensor gives {y.spec!r} or other shards")
    locs = local_tensors(dt)
    for dev, shard in zip(mesh.local_devices, y.local_shards()):
        shares = shard.untyped_storage().data_ptr() == locs[dev].untyped_storage().data_ptr()
        if agree and shard.numel() and not shares:
            bad.append(f"{tag}: blocks agree but device {dev}'s shard is a copy")
    return bad + _check_ledger(led, agree, "from_dtensor", tag)


def _check_ledger(led, agree, cause, tag) -> list[str]:
    if agree and led.count():
        return [f"{tag}: blocks agree but {cause} communicates"]
    if not agree and (not led.count() or {r.cause for r in led.records} != {cause}):
        return [f"{tag}: blocks differ; {cause} ledger {led.records}"]
    return []


def redistribute_pairs(mesh, shapes, count: int | None, seed: int = 0) -> list[tuple]:
    """(shape, src, dst) triples DTensor can redistribute: it never makes an axis partial,
    and uneven _StridedShards (which to_dtensor refuses) are left out."""
    pairs = []
    for shape in shapes:
        lays = all_layouts(mesh.axes, len(shape))
        for src, dst in itertools.product(lays, lays):
            if set(dst.partial) <= set(src.partial) and (
                not dst.partial or dst.reduce_op == src.reduce_op
            ):
                pairs.append((shape, src, dst))
    names, sizes = tuple(mesh.axis_names), tuple(mesh.shape)
    pairs = [
        (shape, src, dst)
        for shape, src, dst in pairs
        if not any(
            uneven_strided(shape, torch_placements(x, names, sizes), sizes) for x in (src, dst)
        )
    ]
    if count is not None:
        pairs = random.Random(seed).sample(pairs, count)
    return pairs


def check_redistribute(mesh, dm, pairs) -> list[str]:
    bad = []
    for shape, src, dst in pairs:
        t = _integer_values(shape, seed=1)
        x = sl.shard(t, mesh, src)
        want = sl.reshard(x, dst)
        with _mode(mesh):
            moved = x.to_dtensor(dm).redistribute(
                dm, torch_placements(dst, mesh.axis_names, mesh.shape)
            )
        got = sl.from_dtensor(moved, mesh)
        same_shards = all(
            torch.equal(a, b) for a, b in zip(got.local_shards(), want.local_shards())
        )
        if got.spec != dst or not torch.equal(got.full(), want.full()):
            bad.append(f"{src!r} -> {dst!r} {shape}: DTensor gives {got.spec!r}, other values")
        elif not dst.partial and not same_shards:
            bad.append(f"{src!r} -> {dst!r} {shape}: shards differ")
    return bad


# == pure data: the bridge's model of DTensor's chunking ==========================
@pytest.mark.parametrize("sizes", [(2, 2), (2, 3), (3, 2, 2)])
def test_chunk_model_equals_dtensors_splitting(sizes):
    """Every split order of dim 0 over every subset of mesh dims, n = 0..13 (0..8 on 3)."""
    for r in range(1, len(sizes) + 1):
        for order in itertools.permutations(range(len(sizes)), r):
            sf = _dtensor._split_factors(order, sizes)
            keys = tuple(("S", 0, sf[i]) if i in sf else ("R",) for i in range(len(sizes)))
            placements = _dtensor._placements(keys)
            for n in range(14 if len(sizes) < 3 else 9):
                for coord in itertools.product(*map(range, sizes)):
                    runs = _dtensor._dtensor_runs((n,), keys, sizes, coord)[0]
                    ours = [i for a, b in runs for i in range(a, b)]
                    assert ours == _torch_indices(n, placements, sizes, coord), (order, n, coord)
                    local, offset = _compute_local_shape_and_global_offset(
                        (n,), sizes, list(coord), placements
                    )
                    assert local == (len(ours),) and (not ours or offset == (ours[0],))


@pytest.mark.parametrize("axes", MESHES + [{"a": 2, "b": 3, "c": 2}])
def test_layouts_encode_as_torch_and_decode_back(axes):
    mesh = sl.Mesh.simulated(axes)
    names, sizes = tuple(axes), tuple(axes.values())

    class FakeDM:  # what _Grid reads of a DeviceMesh
        mesh_dim_names, shape = names, sizes

    FakeDM.mesh = torch.arange(mesh.size).reshape(sizes)

    grid = _dtensor._Grid(mesh, FakeDM(), "test")
    for layout in all_layouts(axes, 2):
        keys = _dtensor._keys_of_layout(layout, grid)
        assert _dtensor._placements(keys) == torch_placements(layout, names, sizes), layout
        assert _dtensor._layout_of_keys(keys, grid, 2) == layout


# == simulated mesh: LocalTensorMode over a fake world ===========================
def test_to_dtensor_without_a_fake_world_says_how_to_get_one():
    assert not dist.is_initialized(), "runs before the fake-world fixture"
    x = sl.shard(torch.ones(4, 2), sl.Mesh.simulated({"a": 2, "b": 2}), sl.P("a", None))
    with pytest.raises(sl.LayoutError, match=r'init_process_group\("fake".*LocalTensorMode\(4\)'):
        x.to_dtensor()


@pytest.fixture(scope="module")
def fake_world():
    """A one-process 'fake' world of 4 ranks and a DeviceMesh per test mesh."""
    assert not dist.is_initialized()
    dist.init_process_group("fake", rank=0, world_size=4)
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    with LocalTensorMode(4):
        dms = {
            tuple(axes): init_device_mesh("cpu", tuple(axes.values()), mesh_dim_names=tuple(axes))
            for axes in MESHES
        }
    yield dms
    dist.destroy_process_group()


@pytest.mark.parametrize("axes", MESHES, ids=["2x2", "4"])
def test_every_layout_round_trips_both_ways(fake_world, axes):
    mesh = sl.Mesh.simulated(axes)
    assert check_round_trips(mesh, fake_world[tuple(axes)], SHAPES, [(6, 5)]) == []


def test_default_device_mesh_is_one_over_the_fake_world(fake_world):
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    x = sl.shard(_integer_values((6, 5)), mesh, sl.P("b", "a"))
    dt = x.to_dtensor()
    assert dt.device_mesh.mesh_dim_names == ("a", "b") and dt.placements == (Shard(1), Shard(0))
    assert sl.from_dtensor(dt).mesh == mesh  # mesh=None: Mesh.simulated of the names and sizes


def test_dtensors_built_by_dtensor_convert(fake_world):
    """distribute_tensor's blocks and from_local's partial summands, onto mesh=None."""
    dm = fake_world[("a", "b")]
    t = _integer_values((6, 5))
    cases = [
        ([Shard(0), Replicate()], sl.P("a", None)),
        ([Shard(1), Shard(0)], sl.P("b", "a")),
        ([Replicate(), Replicate()], sl.P(None, None)),
        ([Shard(0), Shard(0)], sl.P(("a", "b"), None)),  # uneven: DTensor's nested blocks move
    ]
    for placements, layout in cases:
        with LocalTensorMode(4):
            dt = distribute_tensor(t, dm, placements)
        y = sl.from_dtensor(dt)
        want = sl.shard(t, y.mesh, layout)
        assert y.spec == layout
        assert all(torch.equal(a, b) for a, b in zip(y.local_shards(), want.local_shards()))
    for op, reduce in (("sum", sum), ("max", lambda v: torch.stack(v).amax(0))):
        summands = [_integer_values((3, 4), seed=r) for r in range(4)]
        lt = LocalTensor({r: s.clone() for r, s in enumerate(summands)})
        with LocalTensorMode(4):
            dt = DTensor.from_local(lt, dm, [Partial(op), Partial(op)], run_check=False)
        y = sl.from_dtensor(dt)
        assert y.spec == sl.P(None, None, partial={"a": op, "b": op})
        assert all(torch.equal(a, b) for a, b in zip(y.local_shards(), summands))
        assert torch.equal(y.full(), reduce(summands))


def test_replicas_sharing_one_storage_are_cloned(fake_world):
    dm = fake_world[("x",)]
    one = torch.arange(6.0).reshape(3, 2)
    lt = LocalTensor({r: one for r in range(4)})  # every rank's tensor is the same object
    dt = DTensor.from_local(lt, dm, [Replicate()], run_check=False, shape=(3, 2), stride=(2, 1))
    y = sl.from_dtensor(dt)
    ptrs = {s.untyped_storage().data_ptr() for s in y.local_shards()}
    assert len(ptrs) == 4 and one.untyped_storage().data_ptr() in ptrs
    y.add_(1)  # one write per device: each replica once
    assert torch.equal(y.full(), torch.arange(6.0).reshape(3, 2) + 1)


def test_uneven_two_axis_split_moves_in_the_ledger_with_closed_form_bytes(fake_world):
    """n=6 over 2x2: shardlib [0,2) [2,4) [4,6) [6,6), DTensor [0,2) [2,3) [3,5) [5,6)."""
    dm, mesh = fake_world[("a", "b")], sl.Mesh.simulated({"a": 2, "b": 2})
    t = _integer_values((6, 5))
    with LocalTensorMode(4):
        dt = distribute_tensor(t, dm, [Shard(0), Shard(0)])
    with sl.comm_ledger() as led:
        y = sl.from_dtensor(dt, mesh)
    # device (0, 1) needs rows [2, 4); over b its group holds [0, 2) [2, 3): not enough, so one
    # all-gather over (a, b) of DTensor's blocks, padded to 2 rows x 5 cols of float64
    assert [(r.kind, r.axes, r.bytes, r.cause) for r in led.records] == [
        ("all_gather", ("a", "b"), (4 - 1) * 2 * 5 * 8, "from_dtensor")
    ]
    assert y.spec == sl.P(("a", "b"), None) and torch.equal(y.full(), t)
    with sl.comm_ledger() as led:
        back = y.to_dtensor(dm)
    # shardlib's blocks [0,2) [2,4) [4,6) [6,6) contain DTensor's only once gathered over (a, b)
    assert [(r.kind, r.axes, r.bytes, r.cause) for r in led.records] == [
        ("all_gather", ("a", "b"), (4 - 1) * 2 * 5 * 8, "to_dtensor")
    ]
    assert all(
        torch.equal(a, b) for a, b in zip(local_tensors(back).values(), local_tensors(dt).values())
    )


def test_strided_placements_of_views_convert_by_one_gather(fake_world):
    """DTensor's view propagation makes _StridedShards no split order encodes (a strided,
    non-block split): they convert to the split in DeviceMesh order by one all-gather."""
    dm = fake_world[("a", "b")]
    t = torch.arange(24.0).reshape(4, 6)
    with LocalTensorMode(4):
        flat = distribute_tensor(t, dm, [Shard(0), Shard(1)]).view(-1)
        flat_cols = distribute_tensor(t, dm, [Shard(1), Replicate()]).view(24)
    assert flat.placements == (Shard(0), _StridedShard(0, split_factor=2))
    assert flat_cols.placements == (_StridedShard(0, split_factor=4), Replicate())
    # each device holds 2 rows x 3 cols = 6 floats of the 24 (12 for the column split)
    for dt, layout, axes, nbytes in (
        (flat, sl.P(("a", "b")), ("b",), (2 - 1) * 6 * 4),
        (flat_cols, sl.P("a"), ("a",), (2 - 1) * 12 * 4),
    ):
        with sl.comm_ledger() as led:
            y = sl.from_dtensor(dt)
        assert [(r.kind, r.axes, r.bytes) for r in led.records] == [("all_gather", axes, nbytes)]
        assert y.spec == layout and torch.equal(y.full(), t.reshape(-1))


def test_strict_refuses_a_moving_conversion_and_allows_an_agreeing_one(fake_world):
    dm, mesh = fake_world[("a", "b")], sl.Mesh.simulated({"a": 2, "b": 2})
    uneven = sl.shard(_integer_values((6, 5)), mesh, sl.P(("a", "b"), None))
    even = sl.shard(_integer_values((8, 5)), mesh, sl.P(("a", "b"), None))
    with sl.strict():
        with pytest.raises(sl.LayoutError, match=r"x.to_dtensor\(\).*cut dim 0 \(size 6\)"):
            uneven.to_dtensor(dm)
        assert sl.from_dtensor(even.to_dtensor(dm), mesh).spec == even.spec


def test_a_transposed_device_mesh_maps_by_name(fake_world):
    """DeviceMesh dims ("b", "a") with rank 2*i_a + i_b at [i_b][i_a]: the same devices."""
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    with LocalTensorMode(4):
        dm = DeviceMesh("cpu", torch.tensor([[0, 2], [1, 3]]), mesh_dim_names=("b", "a"))
    t = _integer_values((4, 6))
    x = sl.shard(t, mesh, sl.P("a", "b"))
    dt = x.to_dtensor(dm)
    assert dt.placements == (Shard(1), Shard(0))
    with LocalTensorMode(4):
        full = dt.full_tensor()
    assert all(torch.equal(v, t) for v in local_tensors(full).values())
    assert sl.from_dtensor(dt, mesh).spec == x.spec


def test_redistribute_agrees_with_reshard(fake_world):
    for axes, count in ((MESHES[0], 40), (MESHES[1], 12)):
        mesh = sl.Mesh.simulated(axes)
        pairs = redistribute_pairs(mesh, [(4, 8), (6, 5)], count)
        assert check_redistribute(mesh, fake_world[tuple(axes)], pairs) == []


@pytest.mark.slow
@pytest.mark.parametrize("axes", MESHES, ids=["2x2", "4"])
def test_redistribute_agrees_with_reshard_every_pair(fake_world, axes):
    mesh = sl.Mesh.simulated(axes)
    pairs = redistribute_pairs(mesh, [(6, 5), (3, 1)], None)
    assert check_redistribute(mesh, fake_world[tuple(axes)], pairs) == []


_THREE_AXES = """
import logging, random, sys
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensorMode
from torch.distributed.device_mesh import init_device_mesh
import shardlib as sl
import tests.test_dtensor_bridge as T
logging.disable(logging.WARNING)
dist.init_process_group("fake", rank=0, world_size=12)
axes = {"a": 2, "b": 3, "c": 2}
with LocalTensorMode(12):
    dm = init_device_mesh("cpu", (2, 3, 2), mesh_dim_names=tuple(axes))
layouts = random.Random(0).sample(T.all_layouts(axes, 2), 48)
T.all_layouts = lambda axes, ndim: layouts
bad = T.check_round_trips(sl.Mesh.simulated(axes), dm, [(12, 4), (7, 13)], [(7, 13)])
print(bad)
sys.exit(1 if bad else 0)
"""


@pytest.mark.slow
def test_a_sample_of_layouts_round_trips_on_a_2x3x2_mesh():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", _THREE_AXES], cwd=root, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_gradients_flow_through_both_conversions(fake_world):
    dm, mesh = fake_world[("a", "b")], sl.Mesh.simulated({"a": 2, "b": 2})
    t, w = _integer_values((6, 5)), _integer_values((6, 5), seed=3)
    # shardlib leaf -> DTensor: d/dx sum(dt * w) = w, back in x's layout
    x = sl.shard(t, mesh, sl.P(("a", "b"), None)).requires_grad_()
    with LocalTensorMode(4):
        wd = distribute_tensor(w, dm, [Shard(1), Replicate()])
        (x.to_dtensor(dm) * wd).sum().backward()
    assert x.grad.spec == x.spec and torch.equal(x.grad.full(), w)
    # DTensor leaf -> shardlib: d/dd sum(y ** 2) = 2 d, a DTensor gradient
    lt = LocalTensor({r: torch.full((2, 3), float(r)) for r in range(4)})
    with LocalTensorMode(4):
        d = DTensor.from_local(lt, dm, [Shard(0), Partial()], run_check=False).detach()
        d.requires_grad_()
    y = sl.from_dtensor(d, mesh)
    assert y.spec == sl.P("a", None, partial="b")
    (y * y).sum().backward()
    with LocalTensorMode(4):
        got = d.grad.full_tensor()
        want = (d.detach() * 2).full_tensor()
    assert torch.equal(got._local_tensors[0], want._local_tensors[0])


# == bad input ===================================================================
def test_mesh_mismatches_raise_naming_the_difference(fake_world):
    dm = fake_world[("a", "b")]
    x = sl.shard(torch.ones(4, 4), sl.Mesh.simulated({"a": 2, "b": 2}), sl.P("a", None))
    dt = x.to_dtensor(dm)
    cases = [
        (sl.Mesh.simulated({"x": 4}), r"dims \{'a': 2, 'b': 2\}.*axes \{'x': 4\}"),
        (sl.Mesh.simulated({"a": 2, "c": 2}), r"same names and sizes"),
        (
            sl.Mesh.simulated({"b": 2, "a": 2}),
            r"orders its ranks differently.*\{'b': 0, 'a': 1\} is rank 2",
        ),
    ]
    for mesh, match in cases:
        with pytest.raises(sl.MeshMismatchError, match=match):
            sl.from_dtensor(dt, mesh)
    with LocalTensorMode(4):
        swapped = DeviceMesh("cpu", torch.tensor([[0, 2], [1, 3]]), mesh_dim_names=("a", "b"))
        unnamed = DeviceMesh("cpu", torch.arange(4).reshape(2, 2))
    with pytest.raises(sl.MeshMismatchError, match="orders its ranks differently"):
        x.to_dtensor(swapped)
    with pytest.raises(
        sl.MeshMismatchError, match="no mesh_dim_names.*mesh_dim_names=\\('a', 'b'\\)"
    ):
        x.to_dtensor(unnamed)
    with pytest.raises(sl.MeshMismatchError, match="LocalTensor.*sl.Mesh.simulated"):
        sl.from_dtensor(dt, _fake_distributed_mesh(x.mesh))
    with pytest.raises(sl.LayoutError, match="expected a torch.distributed DeviceMesh"):
        x.to_dtensor("cpu")
    with pytest.raises(sl.LayoutError, match="expected a DTensor, got Tensor.*sl.shard"):
        sl.from_dtensor(torch.ones(2))


def _fake_distributed_mesh(mesh):
    """A mesh whose backend says "distributed" (no process group needed to be refused)."""

    class Backend:
        kind = "distributed"

    return sl.Mesh(mesh.abstract, Backend())


def test_an_uneven_split_in_a_non_mesh_order_is_refused_naming_the_fix(fake_world):
    """P(("b", "a")) is _StridedShard in DTensor; torch mis-assembles uneven ones."""
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    x = sl.shard(_integer_values((6, 5)), mesh, sl.P(("b", "a"), None))
    match = r"dim 0 \(size 6\).*_StridedShard.*divisible by 4.*P\(\('a', 'b'\), None\)"
    with pytest.raises(sl.LayoutError, match=match):
        x.to_dtensor(fake_world[("a", "b")])
    even = sl.shard(_integer_values((8, 5)), mesh, sl.P(("b", "a"), None))
    assert even.to_dtensor(fake_world[("a", "b")]).placements == (
        _StridedShard(0, split_factor=2),
        Shard(0),
    )


def test_placements_without_a_layout_raise_with_a_fix(fake_world):
    dm = fake_world[("a", "b")]
    lt = LocalTensor({r: torch.ones(2) for r in range(4)})
    cases = [
        ([Partial("product"), Replicate()], r"Partial\(product\) on mesh dim 'a'.*redistribute"),
        # DTensor allows sum with avg (they commute); a shardlib layout has one op
        ([Partial("sum"), Partial("avg")], r"different ops \(\['avg', 'sum'\]\).*one reduce op"),
    ]
    for placements, match in cases:
        with LocalTensorMode(4):
            dt = DTensor.from_local(lt, dm, placements, run_check=False)
        with pytest.raises(sl.LayoutError, match=match):
            sl.from_dtensor(dt)


# == 4 gloo ranks ================================================================
def gloo_round_trips(mesh) -> list[str]:
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    dm = mesh.backend.device_mesh
    bad = check_round_trips(mesh, None, [(4, 8), (6, 5), (3, 1)], [(6, 5)])
    x = sl.shard(_integer_values((6, 5)), mesh, all_layouts(mesh.axes, 2)[0])
    if x.to_dtensor().device_mesh is not dm:
        bad.append("the default DeviceMesh is not the mesh's own")
    count = 24 if len(mesh.shape) == 2 else 8
    return bad + check_redistribute(mesh, dm, redistribute_pairs(mesh, [(6, 5)], count))


@pytest.mark.dist
@pytest.mark.parametrize("axes", MESHES, ids=["2x2", "4"])
def test_round_trips_and_redistribute_on_gloo_4_ranks(workers4, axes):
    assert workers4.run(gloo_round_trips, axes) == [[]] * 4
