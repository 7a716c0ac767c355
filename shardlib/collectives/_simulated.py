"""The simulated backend: every device of the mesh lives in this process.

A collective computes its exact result from all shards, group by group, in a
fixed order (member order along the collective's axes), so results are
deterministic. Every output is a fresh tensor: replicas never alias, so an
in-place op on one device's shard cannot leak into another's.

Interface shared with `_distributed.DistributedBackend` (`bufs` is the list of
this process's local buffers in flat device order; `axes` is major -> minor
and fixes the member order; padding to equal shapes is the caller's job):

- ``all_gather(mesh, bufs, axes)``: each buf ``[*s]`` -> ``[k, *s]`` (member j's buf at j)
- ``all_to_all(mesh, bufs, axes)``: ``[k, *s]`` -> ``[k, *s]`` (out[j] = member j's in[me])
- ``reduce_scatter(mesh, bufs, axes, op)``: ``[k, *s]`` -> ``[*s]`` (reduce of members' in[me])
- ``all_reduce(mesh, bufs, axes, op)``: ``[*s]`` -> ``[*s]``
- ``ppermute(mesh, bufs, src_of, recv_shapes)``: device t receives device src_of[t]'s buf
- ``broadcast_object(mesh, obj, src)``, ``broadcast(mesh, tensor, src, shape, dtype)``,
  ``scatter(mesh, pieces, src, shape, dtype)`` (pieces: every device's padded block, in flat order)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..layouts._mesh import AbstractMesh

__all__ = ["SimulatedBackend", "reduce_tensors"]

_REDUCE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


def reduce_tensors(tensors: list[torch.Tensor], op: str) -> torch.Tensor:
    """Reduce equal-shaped tensors left to right with `op` (sum, max or min), keeping dtype."""
    if len(tensors) == 1:
        return tensors[0].clone()
    return functools.reduce(_REDUCE[op], tensors)


@dataclass(frozen=True, slots=True)
class SimulatedBackend:
    """All devices in one process. Stateless: all instances are equal."""

    kind = "simulated"

    def local_devices(self, mesh: AbstractMesh) -> tuple[int, ...]:
        return tuple(range(mesh.size))

    def all_gather(self, mesh, bufs, axes):
        return [torch.stack([bufs[m] for m in mesh.group(dev, axes)]) for dev in range(mesh.size)]

    def all_to_all(self, mesh, bufs, axes):
        out = []
        for dev in range(mesh.size):
            me = mesh.index_along(dev, axes)
            out.append(torch.stack([bufs[m][me] for m in mesh.group(dev, axes)]))
        return out

    def reduce_scatter(self, mesh, bufs, axes, op):
        out = []
        for dev in range(mesh.size):
            me = mesh.index_along(dev, axes)
            out.append(reduce_tensors([bufs[m][me] for m in mesh.group(dev, axes)], op))
        return out

    def all_reduce(self, mesh, bufs, axes, op, donate=False):
        if donate and mesh.group_size(axes) == 1:  # nothing to reduce: the donated blocks
            return list(bufs)
        return [
            reduce_tensors([bufs[m] for m in mesh.group(dev, axes)], op) for dev in range(mesh.size)
        ]

    def ppermute(self, mesh, bufs, src_of, recv_shapes):
        return [bufs[src_of[dev]].clone() for dev in range(mesh.size)]

    def broadcast_object(self, mesh, obj, src):
        return obj

    def broadcast(self, mesh, tensor, src, shape, dtype):
        return tensor

    def scatter(self, mesh, pieces, src, shape, dtype):
        return [p.clone() for p in pieces]
