"""Executing a redistribution plan on local shards, on either backend.

Owns the translation of each planner step (see `layouts/_planner.py` for the
step table) into padded-buffer collectives of the backend, the un-padding
afterwards, and the ledger records. It never decides *which* steps to run:
that is the planner's job.

Invariant: the output shards are fresh tensors (never views of the inputs),
exactly the unpadded blocks `layouts/_shard.py` assigns to each device.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh, Mesh
from ..layouts._planner import (
    AllGather,
    AllReduce,
    AllToAll,
    Plan,
    PPermute,
    ReduceScatter,
    Slice,
    ToPartial,
)
from ..layouts._shard import local_bounds, max_chunk
from ._ledger import record

__all__ = ["execute", "pad_to", "pad_to_shape", "ppermute_sources"]


def pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` zero-padded at the end of `dim` to `size` (returned as is if already that size)."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size
    return pad_to_shape(t, tuple(shape))


def pad_to_shape(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A fresh zero tensor of `shape` with `t` in its leading corner."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


@lru_cache(maxsize=4096)
def ppermute_sources(src: Layout, dst: Layout, mesh: AbstractMesh) -> tuple[int, ...]:
    """For each device t, the device whose block under `src` is t's block under `dst`.

    A permutation: devices already holding their block keep it; the rest are
    matched in flat order among holders of the same block (same chunk indices
    and the same position along the partial axes).
    """

    def key(layout: Layout, dev: int) -> tuple:
        return (
            tuple(mesh.index_along(dev, axes) for axes in layout.dims),
            mesh.index_along(dev, layout.partial),
        )

    holders: dict[tuple, list[int]] = {}
    for dev in range(mesh.size):
        holders.setdefault(key(src, dev), []).append(dev)
    src_of = [-1] * mesh.size
    wanting: dict[tuple, list[int]] = {}
    for dev in range(mesh.size):
        k = key(dst, dev)
        if dev in holders.get(k, ()):
            src_of[dev] = dev
            holders[k].remove(dev)
        else:
            wanting.setdefault(k, []).append(dev)
    for k, devs in wanting.items():
        for dev, s in zip(devs, holders[k]):
            src_of[dev] = s
    return tuple(src_of)


def execute(
    plan: Plan,
    mesh: Mesh,
    shards: list[torch.Tensor],
    *,
    direction: str,
    cause: str,
    donate: bool = False,
) -> list[torch.Tensor]:
    """Run `plan` on this process's `shards` (flat device order); return the new shards.

    `donate`: the caller gives up `shards` (a result nobody else holds, e.g. a contraction's
    partial product): an all-reduce may then reduce in their memory instead of a copy
    (Megatron's in-place all-reduce), and an empty plan returns them as they are."""
    if not plan.steps:
        return list(shards) if donate else [s.clone() for s in shards]
    for i, ps in enumerate(plan.steps):
        shards = _run_step(ps.step, ps.src, ps.dst, plan.shape, mesh, shards, donate and i == 0)
        if ps.step.kind is not None:
            axes, k = _comm_group(ps.step, ps.src, ps.dst, mesh.abstract)
            record(ps.step.kind, axes, k, ps.bytes, plan.dtype, direction, cause, data=shards)
    return shards


def _comm_group(step, src: Layout, dst: Layout, mesh: AbstractMesh) -> tuple[tuple[str, ...], int]:
    if isinstance(step, PPermute):
        src_of = ppermute_sources(src, dst, mesh)
        moved = set()
        for t, s in enumerate(src_of):
            moved.update(
                i for i, (a, b) in enumerate(zip(mesh.coords(t), mesh.coords(s))) if a != b
            )
        axes = tuple(mesh.axis_names[i] for i in sorted(moved))
        return axes, mesh.group_size(axes)
    return step.axes, mesh.group_size(step.axes)


def _run_step(step, src: Layout, dst: Layout, shape, mesh: Mesh, shards, donate: bool = False):
    am, be, devs = mesh.abstract, mesh.backend, mesh.local_devices

    def sb(dev: int):
        return local_bounds(shape, src, am, dev)

    def db(dev: int):
        return local_bounds(shape, dst, am, dev)

    if isinstance(step, Slice):
        d = step.dim
        out = []
        for dev, t in zip(devs, shards):
            (lo0, _), (lo, hi) = sb(dev)[d], db(dev)[d]
            out.append(t.narrow(d, lo - lo0, hi - lo).clone())
        return out

    if isinstance(step, ToPartial):
        if step.op != "sum":
            return [t.clone() for t in shards]
        return [
            t.clone() if am.index_along(dev, step.axes) == 0 else torch.zeros_like(t)
            for dev, t in zip(devs, shards)
        ]

    if isinstance(step, AllGather):
        d, n = step.dim, shape[step.dim]
        size = max_chunk(n, am.group_size(src.dims[d]))
        gathered = be.all_gather(am, [pad_to(t, d, size) for t in shards], step.axes)
        out = []
        for dev, g in zip(devs, gathered):
            members = am.group(dev, step.axes)
            sizes = [hi - lo for lo, hi in (sb(m)[d] for m in members)]
            if d == 0 and all(n == size for n in sizes):
                union = g.reshape(len(sizes) * size, *g.shape[2:])  # no padding: a free view
            else:
                union = torch.cat([g[j].narrow(d, 0, n) for j, n in enumerate(sizes)], d)
            lo0 = sb(members[0])[d][0]
            lo, hi = db(dev)[d]
            out.append(union.narrow(d, lo - lo0, hi - lo))
        return out

    if isinstance(step, ReduceScatter | AllReduce):
        op = "sum" if src.reduce_op == "avg" else src.reduce_op
        k = am.group_size(step.axes)
        if isinstance(step, AllReduce):
            out = be.all_reduce(am, list(shards), step.axes, op, donate=donate)
        else:
            d, n = step.dim, shape[step.dim]
            size = max_chunk(n, am.group_size(dst.dims[d]))
            bufs = []
            for dev, t in zip(devs, shards):
                lo0 = sb(dev)[d][0]
                bounds = [db(m)[d] for m in am.group(dev, step.axes)]
                if (
                    d == 0
                    and t.is_contiguous()
                    and t.shape[0] == k * size
                    and all(hi - lo == size for lo, hi in bounds)
                ):
                    bufs.append(t.view(k, size, *t.shape[1:]))  # no padding: a free view
                    continue
                pieces = []
                for lo, hi in bounds:
                    piece = t.narrow(d, lo - lo0, hi - lo) if hi > lo else t.narrow(d, 0, 0)
                    pieces.append(pad_to(piece, d, size))
                bufs.append(torch.stack(pieces))
            reduced = be.reduce_scatter(am, bufs, step.axes, op)
            out = []
            for dev, r in zip(devs, reduced):
                lo, hi = db(dev)[d]
                out.append(r.narrow(d, 0, hi - lo))
        if src.reduce_op == "avg":
            out = [r / k for r in out]
        return out

    if isinstance(step, AllToAll):
        d1, d2 = step.from_dim, step.to_dim
        s1 = max_chunk(shape[d1], am.group_size(src.dims[d1]))
        s2 = max_chunk(shape[d2], am.group_size(dst.dims[d2]))
        bufs = []
        for dev, t in zip(devs, shards):
            lo2 = sb(dev)[d2][0]
            pieces = []
            for m in am.group(dev, step.axes):
                lo, hi = db(m)[d2]
                piece = t.narrow(d2, lo - lo2, hi - lo) if hi > lo else t.narrow(d2, 0, 0)
                pieces.append(pad_to(pad_to(piece, d2, s2), d1, s1))
            bufs.append(torch.stack(pieces))
        received = be.all_to_all(am, bufs, step.axes)
        out = []
        for dev, r in zip(devs, received):
            members = am.group(dev, step.axes)
            lo2, hi2 = db(dev)[d2]
            parts = []
            for j, m in enumerate(members):
                lo, hi = sb(m)[d1]
                parts.append(r[j].narrow(d1, 0, hi - lo).narrow(d2, 0, hi2 - lo2))
            union = torch.cat(parts, d1)
            lo0 = sb(members[0])[d1][0]
            lo, hi = db(dev)[d1]
            out.append(union.narrow(d1, lo - lo0, hi - lo).contiguous())
        return out

    if isinstance(step, PPermute):
        src_of = ppermute_sources(src, dst, am)
        shapes = [tuple(hi - lo for lo, hi in db(dev)) for dev in devs]
        return be.ppermute(am, list(shards), src_of, shapes)

    raise TypeError(f"unknown plan step {step!r}")
