"""The DTensor bridge: `sl.from_dtensor(dt, mesh=None)` and `x.to_dtensor(device_mesh=None)`.

Owns the translation between shardlib's layouts and DTensor's placements, the
check that a DeviceMesh is the same device grid as a `Mesh`, and the data
movement when the two libraries cut a dim differently. It does not own either
library's collectives: shardlib's moves go through the planner or a backend
collective recorded in the ledger; DTensor's own `redistribute` is the user's.

Mapping (per DeviceMesh dim, matched to a mesh axis *by name*, not position):

============================  =================================================
shardlib                      DTensor
============================  =================================================
axis unused                   ``Replicate()``
``partial={axis: op}``        ``Partial(op)`` for op in sum, avg, max, min
dim d split over (x1, .., xk) ``Shard(d)`` on each, or ``_StridedShard(d, sf)``
                              where the split order is not the DeviceMesh order
============================  =================================================

A dim split over several axes: shardlib's tuple is the split order, major ->
minor (``P(("a", "b"))``: by a, then by b within each a-chunk). DTensor splits
along its placements left to right (DeviceMesh order), each split torch.chunk
style *within the previous chunk*; an order that is not the DeviceMesh order
is encoded with ``_StridedShard(d, split_factor=sf)``, sf being the product of
the sizes of the axes split earlier but placed later (DTensor's shard-order
encoding, ``DTensorSpec._convert_shard_order_to_StridedShard``); decoding
tries every order of that dim's axes. shardlib cuts the dim flat into |x1|..|xk|
chunks. The blocks agree whenever the sizes divide, and in many uneven cases
(n=7 over 2x2: both give [0,2) [2,4) [4,6) [6,7)); where they differ (n=6:
shardlib [0,2) [2,4) [4,6) [6,6), DTensor [0,2) [2,3) [3,5) [5,6)) data moves
on shardlib's side, in the ledger (cause ``"to_dtensor"`` / ``"from_dtensor"``):
`to_dtensor` reshards (planner) to the longest prefix of the dim's axes whose
blocks contain DTensor's, then cuts locally; `from_dtensor` all-gathers over
the fewest minor axes whose group's DTensor blocks cover each device's block,
then cuts locally. `sl.strict` refuses either move, naming both cuts.
Every shardlib layout has placements, but `to_dtensor` refuses (LayoutError
naming the fix) a dim split in an order other than the DeviceMesh's whose size
the axes do not divide: that is an uneven ``_StridedShard``, whose rank blocks
are not even nested chunks (13 over c=2 then b=3: a rank holds {6, 11}) and
which torch 2.13's DTensor mis-assembles (``full_tensor`` wrong or failing on
a 2x3x2 mesh). `from_dtensor` converts any ``_StridedShard`` it is given. A
DTensor converts unless it has a placement shardlib has no layout for: ``Partial("product")`` and the bitwise
partials, or partials of mixed ops over several mesh dims (LayoutError with a
fix). A ``_StridedShard`` that no split order produces (DTensor view
propagation makes them: a genuinely strided split) converts by the same move
to the split in DeviceMesh order. `_MaskPartial` (DTensor's embedding output)
is a sum partial.

Backends. Distributed mesh: the DeviceMesh spans the same world with rank r at
device r's coordinates (``init_device_mesh(..., mesh_dim_names=...)``, the
mesh's own ``mesh.backend.device_mesh`` by default); each rank's local tensor
*is* its shard. Simulated mesh: torch's ``LocalTensorMode`` (one process
simulating every rank, over a ``"fake"`` process group of the mesh's size);
the DTensor's local tensor is a ``LocalTensor`` whose rank-r tensor is device
r's shard. Getting one::

    dist.init_process_group("fake", rank=0, world_size=4)
    with LocalTensorMode(4):
        dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
        dt = distribute_tensor(t, dm, [Shard(0), Replicate()])
    x = sl.from_dtensor(dt)  # Mesh.simulated({"a": 2, "b": 2}), spec P('a', None)

Invariants: where the blocks agree nothing moves and nothing is copied (the
shards and the DTensor's local tensors share storage: an in-place write to one
shows in the other; simulated replicas that share one storage are cloned so no
two devices alias, DESIGN §14); both conversions are differentiable, the
cotangent going back to the source's placements with partial axes made
replicated (as `sl.reshard` and DTensor's `from_local`); both run with
``LocalTensorMode`` disabled for their own work.
"""

from __future__ import annotations

import itertools
import math
import weakref
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from .._errors import LayoutError, MeshMismatchError
from .._format import dtype_name
from ..collectives._ledger import record
from ..collectives._redistribute import pad_to_shape
from ..layouts._layout import REDUCE_OPS, Layout
from ..layouts._mesh import Mesh
from ..layouts._shard import chunk_bounds, local_bounds
from ._api import _as_sharded, _check_layout, _check_sharded, _reshard_impl
from ._tensor import ShardedTensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["from_dtensor", "to_dtensor"]

# A placement as data, per DeviceMesh dim: ("R",) | ("P", op) | ("S", tensor_dim, split_factor).
Key = tuple
# Global indices a device holds along one dim, as ordered disjoint runs [lo, hi).
Runs = tuple[tuple[int, int], ...]


# == DTensor's chunking, as index runs =========================================
def _length(runs: Runs) -> int:
    return sum(b - a for a, b in runs)


def _merge(runs: list[tuple[int, int]]) -> Runs:
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def _take(runs: Runs, lo: int, hi: int) -> Runs:
    """Elements ``[lo, hi)`` of the sequence `runs` describes."""
    out, pos = [], 0
    for a, b in runs:
        s, e = max(lo - pos, 0), min(hi - pos, b - a)
        if s < e:
            out.append((a + s, a + e))
        pos += b - a
    return _merge(out)


def _split(runs: Runs, k: int, c: int, split_factor: int) -> Runs:
    """Chunk `c` of `k` (torch.chunk style) of `runs`; a `_StridedShard` first cuts
    `split_factor` pieces and keeps chunk `c` of each (DTensor's ``_split_tensor``)."""
    n = _length(runs)
    if split_factor == 1:
        return _take(runs, *chunk_bounds(n, k, c))
    out: list[tuple[int, int]] = []
    for j in range(split_factor):
        piece = _take(runs, *chunk_bounds(n, split_factor, j))
        out.extend(_take(piece, *chunk_bounds(_length(piece), k, c)))
    return _merge(out)


@lru_cache(maxsize=65536)
def _dtensor_runs(
    shape: tuple[int, ...], keys: tuple[Key, ...], dm_sizes: tuple[int, ...], coord: tuple[int, ...]
) -> tuple[Runs, ...]:
    """Per dim, the global indices the device at DeviceMesh `coord` holds under `keys`
    (DTensor's left-to-right splitting, as ``compute_local_shape_and_global_offset``)."""
    runs = [_merge([(0, n)]) for n in shape]
    for i, key in enumerate(keys):
        if key[0] == "S":
            runs[key[1]] = _split(runs[key[1]], dm_sizes[i], coord[i], key[2])
    return tuple(runs)


def _block_runs(bounds: tuple[tuple[int, int], ...]) -> tuple[Runs, ...]:
    return tuple(_merge([b]) for b in bounds)


# == meshes ======================================================================
class _Grid:
    """A shardlib mesh matched to a DeviceMesh: the axis of each DeviceMesh dim."""

    def __init__(self, mesh: Mesh, dm: Any, where: str) -> None:
        self.mesh, self.dm = mesh, dm
        self.names = tuple(dm.mesh_dim_names or ())
        self.sizes = tuple(int(s) for s in dm.shape)
        self.perm = _match(mesh, dm, self.names, self.sizes, where)

    def coord(self, dev: int) -> tuple[int, ...]:
        """DeviceMesh coordinate of shardlib device `dev`."""
        c = self.mesh.abstract.coords(dev)
        return tuple(c[a] for a in self.perm)

    def runs(self, shape: tuple[int, ...], keys: tuple[Key, ...], dev: int) -> tuple[Runs, ...]:
        return _dtensor_runs(shape, keys, self.sizes, self.coord(dev))


_GRIDS: dict[tuple[int, Mesh], tuple[Any, _Grid]] = {}


def _grid(mesh: Mesh, dm: Any, where: str) -> _Grid:
    """`_Grid(mesh, dm)`, remembered per DeviceMesh (reading ``dm.mesh`` costs ~20 ms under
    LocalTensorMode); a weak reference tells a reused id from the same DeviceMesh."""
    key = (id(dm), mesh)
    hit = _GRIDS.get(key)
    if hit is not None and hit[0]() is dm:
        return hit[1]
    grid = _Grid(mesh, dm, where)
    if len(_GRIDS) > 256:
        _GRIDS.clear()
    _GRIDS[key] = (weakref.ref(dm), grid)
    return grid


def _mesh_tensor(dm: Any) -> torch.Tensor:
    """The DeviceMesh's rank grid as a plain tensor (a LocalTensor under LocalTensorMode)."""
    t = dm.mesh
    locals_ = getattr(t, "_local_tensors", None)
    if locals_ is not None:
        values = list(locals_.values())
        if any(not torch.equal(v, values[0]) for v in values):
            raise MeshMismatchError(
                f"the DeviceMesh {dm!r} shows different rank grids to different simulated ranks "
                "(a sub-mesh); convert on the whole DeviceMesh the sub-mesh was sliced from."
            )
        t = values[0]
    return t


def _match(
    mesh: Mesh, dm: Any, names: tuple[str, ...], sizes: tuple[int, ...], where: str
) -> tuple[int, ...]:
    """The shardlib axis index of each DeviceMesh dim, or a MeshMismatchError naming why not."""
    am = mesh.abstract
    ours = dict(zip(am.axis_names, am.shape))
    if not names:
        raise MeshMismatchError(
            f"{where}: the DeviceMesh of shape {sizes} has no mesh_dim_names; shardlib matches "
            f"DeviceMesh dims to mesh axes by name ({mesh!r}). Build it with "
            f"init_device_mesh(device_type, {am.shape}, mesh_dim_names={am.axis_names!r})."
        )
    theirs = dict(zip(names, sizes))
    if theirs != ours:
        raise MeshMismatchError(
            f"{where}: the DeviceMesh has dims {theirs!r}, the mesh {mesh!r} has axes {ours!r}; "
            "they must have the same names and sizes (in any order). Pass the matching mesh "
            f"(sl.Mesh.{mesh.backend.kind}({theirs!r})), or build the DeviceMesh with "
            f"init_device_mesh(device_type, {am.shape}, mesh_dim_names={am.axis_names!r})."
        )
    perm = tuple(am.axis_index(n) for n in names)
    grid = _mesh_tensor(dm).tolist()
    wrong = []
    for dev in range(am.size):
        c = am.coords(dev)
        rank = grid
        for a in perm:
            rank = rank[c[a]]
        if rank != dev:
            wrong.append(f"{dict(zip(am.axis_names, c))} is rank {rank}, not {dev}")
    if wrong:
        raise MeshMismatchError(
            f"{where}: the DeviceMesh orders its ranks differently from {mesh!r} (device i of "
            f"the mesh is rank i, row-major over {am.axis_names!r}): "
            + "; ".join(wrong[:4])
            + (" ..." if len(wrong) > 4 else "")
            + f". Build it with init_device_mesh(device_type, {am.shape}, mesh_dim_names="
            f"{am.axis_names!r}) (ranks in row-major order)."
        )
    return perm


def _check_backend(mesh: Mesh, simulated_local: bool, where: str) -> None:
    kind = mesh.backend.kind
    if simulated_local and kind != "simulated":
        raise MeshMismatchError(
            f"{where}: the DTensor's local tensor is a LocalTensor (every rank simulated in this "
            f"process, LocalTensorMode), but the target mesh is {mesh!r}. Convert onto "
            f"sl.Mesh.simulated({mesh.axes!r}) (or pass mesh=None)."
        )
    if not simulated_local and kind != "distributed":
        raise MeshMismatchError(
            f"{where}: the DTensor holds one rank's shard (a real process group), but the target "
            f"mesh is {mesh!r}, whose devices all live in this process. Convert onto "
            f"sl.Mesh.distributed({mesh.axes!r}) (or pass mesh=None); for a DTensor over "
            "simulated ranks, build it under torch.distributed._local_tensor.LocalTensorMode."
        )


_DEFAULT_DM: dict[tuple, tuple[Any, Any]] = {}


def _default_device_mesh(x: ShardedTensor) -> Any:
    """The mesh's own DeviceMesh (distributed), or one over this process's fake world."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    mesh = x._mesh
    if mesh.backend.kind == "distributed":
        return mesh.backend.device_mesh
    am = mesh.abstract
    if not (
        dist.is_initialized() and dist.get_backend() == "fake" and dist.get_world_size() == am.size
    ):
        raise LayoutError(
            f"x.to_dtensor(): x is on {mesh!r}; a DTensor over simulated ranks needs a "
            f"single-process 'fake' world of {am.size} ranks and LocalTensorMode: "
            f'torch.distributed.init_process_group("fake", rank=0, world_size={am.size}); '
            f"with torch.distributed._local_tensor.LocalTensorMode({am.size}): dm = "
            f'init_device_mesh("cpu", {am.shape}, mesh_dim_names={am.axis_names!r}); '
            "x.to_dtensor(dm). For real ranks, run on sl.Mesh.distributed (sl.launch(fn, axes))."
        )
    world = dist.group.WORLD
    key = (am, x.device.type)
    hit = _DEFAULT_DM.get(key)
    if hit is None or hit[0] is not world:
        grid = torch.arange(am.size).reshape(am.shape)
        hit = (world, DeviceMesh(x.device.type, grid, mesh_dim_names=am.axis_names))
        _DEFAULT_DM[key] = hit
    return hit[1]


# == placements <-> layouts ======================================================
def _split_factors(order: tuple[int, ...], sizes: tuple[int, ...]) -> dict[int, int]:
    """DeviceMesh dim -> split factor when a tensor dim is split over `order` (in that order)."""
    return {m: math.prod(sizes[o] for o in order[:j] if o > m) for j, m in enumerate(order)}


def _keys_of_layout(layout: Layout, grid: _Grid) -> tuple[Key, ...]:
    index = {n: i for i, n in enumerate(grid.names)}
    keys: list[Key] = []
    for name in grid.names:
        d = layout.dim_of(name)
        if name in layout.partial:
            keys.append(("P", layout.reduce_op))
        elif d is None:
            keys.append(("R",))
        else:
            order = tuple(index[a] for a in layout.dims[d])
            keys.append(("S", d, _split_factors(order, grid.sizes)[index[name]]))
    return tuple(keys)


def _placements(keys: tuple[Key, ...]) -> tuple[Any, ...]:
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    out = []
    for key in keys:
        if key[0] == "R":
            out.append(Replicate())
        elif key[0] == "P":
            out.append(Partial(key[1]))
        elif key[2] == 1:
            out.append(Shard(key[1]))
        else:
            out.append(_StridedShard(key[1], split_factor=key[2]))
    return tuple(out)


def _keys_of_placements(placements: Any, ndim: int, names: tuple[str, ...], where: str) -> tuple:
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    keys, bad = [], []
    for i, p in enumerate(placements):
        if isinstance(p, _StridedShard):
            keys.append(("S", p.dim % ndim, int(p.split_factor)))
        elif isinstance(p, Shard):
            keys.append(("S", p.dim % ndim, 1))
        elif isinstance(p, Replicate):
            keys.append(("R",))
        elif isinstance(p, Partial) and p.reduce_op in REDUCE_OPS:
            keys.append(("P", p.reduce_op))
        else:
            bad.append(f"{p!r} on mesh dim {names[i]!r}")
    if bad:
        raise LayoutError(
            f"{where}: placements {tuple(placements)} have {', '.join(bad)}, which no shardlib "
            f"layout expresses (partials reduce by {', '.join(REDUCE_OPS)}). Reduce first: "
            "dt.redistribute(dt.device_mesh, [Replicate() if p.is_partial() else p for p in "
            "dt.placements])."
        )
    ops = sorted({k[1] for k in keys if k[0] == "P"})
    if len(ops) > 1:
        raise LayoutError(
            f"{where}: placements {tuple(placements)} are partial with different ops ({ops}); "
            "a shardlib layout has one reduce op for all its partial axes (max over one axis "
            "then sum over another is not sum then max). Reduce all but one kind first with "
            "dt.redistribute(...)."
        )
    return tuple(keys)


def _layout_of_keys(keys: tuple[Key, ...], grid: _Grid, ndim: int) -> Layout:
    """The layout with the same blocks: each split order decoded from its split factors
    (the DeviceMesh order where none fits: a strided split, converted by a move)."""
    per_dim: dict[int, dict[int, int]] = {}
    for i, key in enumerate(keys):
        if key[0] == "S":
            per_dim.setdefault(key[1], {})[i] = key[2]
    dims: list[tuple[str, ...]] = [()] * ndim
    for d, want in per_dim.items():
        mesh_dims = tuple(sorted(want))
        order = next(
            (o for o in itertools.permutations(mesh_dims) if _split_factors(o, grid.sizes) == want),
            mesh_dims,
        )
        dims[d] = tuple(grid.names[i] for i in order)
    partial = tuple(grid.names[i] for i, k in enumerate(keys) if k[0] == "P")
    op = next((k[1] for k in keys if k[0] == "P"), "sum")
    return Layout(tuple(dims), partial, op)


# == where the two cuts differ ===================================================
def _bad_dims(shape: tuple[int, ...], layout: Layout, keys: tuple, grid: _Grid) -> list[int]:
    """Dims whose DTensor block differs from `layout`'s on some device."""
    am = grid.mesh.abstract
    return sorted(
        {
            d
            for dev in range(am.size)
            for d, (r, b) in enumerate(
                zip(grid.runs(shape, keys, dev), _block_runs(local_bounds(shape, layout, am, dev)))
            )
            if r != b
        }
    )


def _coarse_for_dtensor(shape, layout: Layout, keys: tuple, grid: _Grid, bad: list[int]) -> Layout:
    """`layout` with each bad dim cut to the longest prefix of its axes whose blocks contain
    the DTensor block on every device (to_dtensor moves there, then cuts locally)."""
    am = grid.mesh.abstract
    dims = list(layout.dims)
    for d in bad:
        for j in range(len(dims[d]) - 1, -1, -1):
            pre = layout.with_dim(d, dims[d][:j])
            if all(
                lo <= a and b <= hi
                for dev in range(am.size)
                for lo, hi in [local_bounds(shape, pre, am, dev)[d]]
                for a, b in grid.runs(shape, keys, dev)[d]
            ):
                dims[d] = dims[d][:j]
                break
    return Layout(tuple(dims), layout.partial, layout.reduce_op)


def _gather_axes(shape, layout: Layout, keys: tuple, grid: _Grid, bad: list[int]) -> tuple:
    """The fewest minor axes of each bad dim whose group's DTensor blocks cover every
    device's `layout` block (from_dtensor gathers over them, then cuts locally)."""
    am = grid.mesh.abstract
    chosen: set[str] = set()
    for d in bad:
        axes = layout.dims[d]
        for j in range(len(axes) - 1, -1, -1):
            suffix = axes[j:]
            if all(
                _covers(
                    [grid.runs(shape, keys, m)[d] for m in am.group(dev, suffix)],
                    local_bounds(shape, layout, am, dev)[d],
                )
                for dev in range(am.size)
            ):
                chosen.update(suffix)
                break
    return tuple(a for a in am.axis_names if a in chosen)


def _covers(runs: list[Runs], bounds: tuple[int, int]) -> bool:
    lo, hi = bounds
    held = sorted((max(a, lo), min(b, hi)) for r in runs for a, b in r if min(b, hi) > max(a, lo))
    pos = lo
    for a, b in held:
        if a > pos:
            return False
        pos = max(pos, b)
    return pos >= hi


def _refuse_in_strict(where: str, layout: Layout, keys: tuple, grid: _Grid, shape, d: int) -> None:
    from ._dispatch import _state

    if not _state["strict"]:
        return
    am = grid.mesh.abstract
    ours = [local_bounds(shape, layout, am, dev)[d] for dev in range(am.size)]
    theirs = [grid.runs(shape, keys, dev)[d] for dev in range(am.size)]
    raise LayoutError(
        f"sl.strict: {where}: {layout!r} of shape {tuple(shape)} on {grid.mesh!r} and placements "
        f"{_placements(keys)} cut dim {d} (size {shape[d]}) differently: shardlib's flat chunks "
        f"per device {ours}, DTensor's nested chunks {list(theirs)}; converting moves data. Make "
        f"dim {d} divisible by the product of its axes' sizes, split it over one axis, or leave "
        "sl.strict."
    )


# == conversions (no autograd) ===================================================
def _refuse_uneven_strided(shape, layout: Layout, keys: tuple, grid: _Grid) -> None:
    """torch 2.13 DTensor mis-assembles some uneven `_StridedShard`s (``full_tensor`` and
    ``redistribute`` return wrong values or fail on a 2x3x2 mesh): refuse to make one."""
    for d in sorted({k[1] for k in keys if k[0] == "S" and k[2] > 1}):
        axes = layout.dims[d]
        k = grid.mesh.abstract.group_size(axes)
        if shape[d] % k:
            mesh_order = tuple(a for a in grid.names if a in axes)
            raise LayoutError(
                f"x.to_dtensor(): {layout!r} splits dim {d} (size {shape[d]}) over {axes!r}, "
                f"an order other than the DeviceMesh's {mesh_order!r}; DTensor encodes it as "
                f"_StridedShard ({_placements(keys)}), which torch's DTensor reassembles "
                f"correctly only when the size is divisible by {k}. Reshard first to "
                f"{layout.with_dim(d, mesh_order)!r} (the DeviceMesh order), or pad dim {d} to "
                f"a multiple of {k}."
            )


def _to_dtensor_impl(
    x: ShardedTensor, grid: _Grid, cause: str, direction: str, *, user: bool = True
) -> DTensor:
    from torch.distributed._local_tensor import LocalTensor
    from torch.distributed.tensor import DTensor

    shape, layout, am = tuple(x.shape), x._layout, grid.mesh.abstract
    keys = _keys_of_layout(layout, grid)
    if user:  # a gradient goes back in its DTensor input's own placements, whatever they are
        _refuse_uneven_strided(shape, layout, keys, grid)
    bad = _bad_dims(shape, layout, keys, grid)
    shards = x.local_shards()
    if bad:
        _refuse_in_strict("x.to_dtensor()", layout, keys, grid, shape, bad[0])
        coarse = _coarse_for_dtensor(shape, layout, keys, grid, bad)
        moved = _reshard_impl(x, coarse, cause, direction)
        shards = [
            _cut(t, grid.runs(shape, keys, dev), local_bounds(shape, coarse, am, dev), bad)
            for dev, t in zip(grid.mesh.local_devices, moved._shards)
        ]
    if grid.mesh.backend.kind == "simulated":
        local: torch.Tensor = LocalTensor(dict(zip(grid.mesh.local_devices, shards)))
    else:
        (local,) = shards
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, grid.dm, _placements(keys), run_check=False, shape=torch.Size(shape), stride=stride
    )


def _cut(t: torch.Tensor, runs: tuple[Runs, ...], bounds, dims: list[int]) -> torch.Tensor:
    """The DTensor block (`runs`) out of the coarser block `t` (global `bounds`): local."""
    for d in dims:
        lo = bounds[d][0]
        r = runs[d]
        if len(r) == 1:
            t = t.narrow(d, r[0][0] - lo, r[0][1] - r[0][0])
        else:
            t = t.index_select(d, _indices(r, lo).to(t.device))
    return t.contiguous()


def _indices(runs: Runs, lo: int) -> torch.Tensor:
    if not runs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(a - lo, b - lo) for a, b in runs])


def _local_tensors(dt: Any, mesh: Mesh) -> list[torch.Tensor]:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    local = dt._local_tensor
    if isinstance(local, AsyncCollectiveTensor):  # a collective DTensor has not waited on yet
        local = local.wait()
    per_rank = getattr(local, "_local_tensors", None)
    if per_rank is None:
        return [local.detach()]
    missing = sorted(set(mesh.local_devices) - set(per_rank))
    if missing:
        raise MeshMismatchError(
            f"sl.from_dtensor: the DTensor's LocalTensor holds ranks {sorted(per_rank)}, but "
            f"{mesh!r} has devices 0..{mesh.size - 1} (missing {missing}). Build it under "
            f"LocalTensorMode({mesh.size})."
        )
    return [per_rank[dev].detach() for dev in mesh.local_devices]


def _own_storage(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous tensors, no two sharing a storage (simulated replicas must not alias)."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out.append(t)
    return out


def _from_dtensor_impl(dt: Any, grid: _Grid, cause: str, direction: str) -> ShardedTensor:
    where = "sl.from_dtensor(dt=...)"
    mesh = grid.mesh
    shape = tuple(int(n) for n in dt.shape)
    keys = _keys_of_placements(dt.placements, max(len(shape), 1), grid.names, where)
    layout = _check_layout(
        _layout_of_keys(keys, grid, len(shape)), mesh, len(shape), dt.dtype, where
    )
    shards = _local_tensors(dt, mesh)
    wrong = []
    for dev, t in zip(mesh.local_devices, shards):
        want = tuple(_length(r) for r in grid.runs(shape, keys, dev))
        if tuple(t.shape) != want:
            wrong.append(f"rank {dev}: {tuple(t.shape)}, want {want}")
    if wrong:
        raise LayoutError(
            f"{where}: the local tensors do not match placements {tuple(dt.placements)} of global "
            f"shape {shape} ({'; '.join(wrong[:4])}). DTensor.from_local(..., run_check=False) "
            "with a wrong shape= builds such a DTensor; rebuild it with the right shape."
        )
    bad = _bad_dims(shape, layout, keys, grid)
    if not bad:
        simulated = mesh.backend.kind == "simulated"
        shards = _own_storage(shards) if simulated else [shards[0].contiguous()]
        return ShardedTensor(shards, mesh, layout, shape)
    _refuse_in_strict(where, layout, keys, grid, shape, bad[0])
    axes = _gather_axes(shape, layout, keys, grid, bad)
    blocks = _gather_blocks(shards, shape, keys, grid, layout, axes, cause, direction)
    return ShardedTensor(blocks, mesh, layout, shape)


def _gather_blocks(shards, shape, keys, grid: _Grid, layout, axes, cause, direction):
    """`layout`'s blocks from DTensor's: one all-gather over `axes` (ledgered, DESIGN §4
    bytes), then each device copies its block out of its group's pieces."""
    mesh, am = grid.mesh, grid.mesh.abstract
    pad = tuple(
        max(_length(grid.runs(shape, keys, dev)[d]) for dev in range(am.size))
        for d in range(len(shape))
    )
    k = am.group_size(axes)
    dtype = shards[0].dtype
    gathered = mesh.backend.all_gather(am, [pad_to_shape(t, pad) for t in shards], axes)
    record(
        "all_gather",
        axes,
        k,
        (k - 1) * math.prod(pad) * dtype.itemsize,
        dtype_name(dtype),
        direction,
        cause,
        data=gathered,
    )
    out = []
    for dev, g in zip(mesh.local_devices, gathered):
        bounds = local_bounds(shape, layout, am, dev)
        block = g.new_zeros(tuple(hi - lo for lo, hi in bounds))
        for j, m in enumerate(am.group(dev, axes)):
            pairs = [_overlap(r, b) for r, b in zip(grid.runs(shape, keys, m), bounds)]
            if all(len(src) for src, _ in pairs):
                n = len(pairs)
                src = tuple(_open_index(i, p, n).to(g.device) for p, (i, _) in enumerate(pairs))
                dst = tuple(_open_index(i, p, n).to(g.device) for p, (_, i) in enumerate(pairs))
                block.index_put_(dst, g[j][src])
        out.append(block)
    return out


def _overlap(runs: Runs, bounds: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `runs` meets ``[lo, hi)``: positions in the runs' own sequence, and in the block."""
    lo, hi = bounds
    src, dst, pos = [], [], 0
    for a, b in runs:
        s, e = max(a, lo), min(b, hi)
        if s < e:
            src.append(torch.arange(pos + s - a, pos + e - a))
            dst.append(torch.arange(s - lo, e - lo))
        pos += b - a
    if not src:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(src), torch.cat(dst)


def _open_index(index: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """`index` shaped to broadcast along `dim` of an `ndim`-d advanced index (numpy's ix_)."""
    return index.view([-1 if q == dim else 1 for q in range(ndim)])


# == autograd ====================================================================
def _no_local_mode() -> Any:
    from torch.distributed._local_tensor import maybe_disable_local_tensor_mode

    return maybe_disable_local_tensor_mode()


class _ToDTensor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid):
        ctx.grid, ctx.layout, ctx.mesh = grid, x._layout, x._mesh
        return _to_dtensor_impl(x, grid, "to_dtensor", "forward")

    @staticmethod
    def backward(ctx, g):
        with _no_local_mode():
            target = ctx.layout.without_partial()
            if _is_dtensor(g):
                gx = _from_dtensor_impl(g, ctx.grid, "to_dtensor", "backward")
            else:
                gx = _as_sharded(g, ctx.mesh, tuple(g.shape))
            if gx._layout != target:
                gx = _reshard_impl(gx, target, "to_dtensor", "backward")
            return gx, None


class _FromDTensor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, grid):
        ctx.grid = grid
        out = _from_dtensor_impl(dt, grid, "from_dtensor", "forward")
        ctx.layout = out._layout
        return out

    @staticmethod
    def backward(ctx, g):
        with _no_local_mode():
            g = _as_sharded(g, ctx.grid.mesh, tuple(g.shape))
            target = ctx.layout.without_partial()
            if g._layout != target:
                g = _reshard_impl(g, target, "from_dtensor", "backward")
            return _to_dtensor_impl(g, ctx.grid, "from_dtensor", "backward", user=False), None


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# == public ======================================================================
def from_dtensor(dt: DTensor, mesh: Mesh | None = None) -> ShardedTensor:
    """A ShardedTensor holding `dt`'s shards: no communication where the blocks agree.

    DeviceMesh dims map to mesh axes by name; ``Shard``/``_StridedShard`` become
    split dims, ``Partial(op)`` partial axes, ``Replicate`` unused axes (see the
    module docstring for the table and for uneven sizes, where the two
    libraries' chunks may differ and data moves, cause ``"from_dtensor"``).
    Differentiable; the shards share storage with ``dt``'s local tensors.

    Args:
        dt: a DTensor over real ranks (its local tensor is this rank's shard)
            or over simulated ranks (a ``LocalTensor``, ``LocalTensorMode``).
        mesh: the target `sl.Mesh`; by default ``Mesh.distributed`` or
            ``Mesh.simulated`` with the DeviceMesh's names and sizes. It must
            have the same axes (names and sizes) and device i must be rank i.

    Examples:
        >>> import shardlib as sl, torch, torch.distributed as dist
        >>> from torch.distributed._local_tensor import LocalTensorMode
        >>> from torch.distributed.tensor import Shard, Replicate, distribute_tensor
        >>> dist.init_process_group("fake", rank=0, world_size=4)
        >>> with LocalTensorMode(4):
        ...     dm = dist.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
        ...     dt = distribute_tensor(torch.arange(8.0).reshape(4, 2), dm, [Shard(0), Replicate()])
        >>> with sl.comm_ledger() as led:
        ...     x = sl.from_dtensor(dt)
        >>> x.spec, x.mesh, led.count()
        (P('a', None), Mesh.simulated({'a': 2, 'b': 2}), 0)
        >>> x.to_dtensor(dm).placements
        (Shard(dim=0), Replicate())
        >>> dist.destroy_process_group()
    """
    where = "sl.from_dtensor(dt=...)"
    if not _is_dtensor(dt):
        hint = (
            " For a plain global tensor use sl.shard(t, mesh, layout)."
            if isinstance(dt, torch.Tensor)
            else ""
        )
        raise LayoutError(f"{where}: expected a DTensor, got {type(dt).__name__}.{hint}")
    with _no_local_mode():
        dm = dt.device_mesh
        simulated = hasattr(dt._local_tensor, "_local_tensors")
        if mesh is None:
            names = tuple(dm.mesh_dim_names or ())
            if not names:
                raise MeshMismatchError(
                    f"{where}: the DeviceMesh of shape {tuple(dm.shape)} has no mesh_dim_names, "
                    "and shardlib names its axes. Pass mesh=sl.Mesh...({...}) (matched to the "
                    "DeviceMesh dims by name) after naming them: init_device_mesh(..., "
                    "mesh_dim_names=(...))."
                )
            axes = dict(zip(names, (int(s) for s in dm.shape)))
            mesh = Mesh.simulated(axes) if simulated else Mesh.distributed(axes, dm.device_type)
        if not isinstance(mesh, Mesh):
            raise LayoutError(f"sl.from_dtensor(mesh=...): expected a sl.Mesh, got {mesh!r}.")
        _check_backend(mesh, simulated, where)
        return _FromDTensor.apply(dt, _grid(mesh, dm, where))


def to_dtensor(x: ShardedTensor, device_mesh: Any = None) -> DTensor:
    """`x` as a DTensor over `device_mesh`: no communication where the blocks agree.

    The inverse of `from_dtensor` (``sl.from_dtensor(x.to_dtensor())`` has
    ``x``'s spec and shards). Mesh axes map to DeviceMesh dims by name.
    Differentiable; the DTensor's local tensors share storage with `x`'s shards.

    Args:
        x: a ShardedTensor.
        device_mesh: a DeviceMesh with the mesh's axes as ``mesh_dim_names``,
            rank i at device i's coordinates. Default: on a distributed mesh its
            own DeviceMesh; on a simulated mesh one over this process's
            ``"fake"`` world of the mesh's size (use the DTensor under
            ``LocalTensorMode``), else an error saying how to set that up.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> x = sl.shard(torch.ones(4), mesh, sl.P("x"))
        >>> x.to_dtensor()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        shardlib._errors.LayoutError: x.to_dtensor(): x is on Mesh.simulated({'x': 2}); a DTensor over simulated ranks needs ...
    """
    where = "x.to_dtensor(device_mesh=...)"
    x = _check_sharded(x, where)
    with _no_local_mode():
        dm = _default_device_mesh(x) if device_mesh is None else device_mesh
        from torch.distributed.device_mesh import DeviceMesh

        if not isinstance(dm, DeviceMesh):
            raise LayoutError(
                f"{where}: expected a torch.distributed DeviceMesh, got {type(dm).__name__}. "
                f"Build one with init_device_mesh(device_type, {x._mesh.shape}, "
                f"mesh_dim_names={x._mesh.axis_names!r})."
            )
        return _ToDTensor.apply(x, _grid(x._mesh, dm, where))
