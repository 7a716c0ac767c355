"""The torch.distributed backend: one mesh device per process.

Owns process-group setup for a mesh and the padded-buffer collectives of the
backend interface (see `_simulated.py` for the contract). Groups for single
axes come from a `torch.distributed.device_mesh.DeviceMesh`; groups for every
multi-axis subset are created eagerly, in one fixed order on every rank (lazy
creation can deadlock), with `new_group`. Device flat index == global rank.

A process group's members are ordered by global rank, i.e. row-major over
the axes in *mesh* order. Collectives here take `axes` in any order (the
layout's major -> minor order) and permute pieces so results follow `axes`.

Under torch.compile (``torch.compiler.is_compiling()``: dynamo's fake run and
AOTAutograd's trace of our dispatch) every collective is the functional one
of ``torch.distributed._functional_collectives`` followed by ``wait_tensor``
(all_gather_single, reduce_scatter_single, all_reduce, all_to_all_single,
broadcast; a ppermute is an all_to_all_single with zero-sized pieces for the
ranks that exchange nothing), so the traced graph holds them as ops inductor
can schedule. Eager runs use the in-place c10d calls. Both give the same
buffers; the ledger is recorded by the caller, identically.
"""

from __future__ import annotations

import itertools
import math
import os
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import init_device_mesh

from .._errors import DistributedSetupError
from ..layouts._mesh import AbstractMesh
from . import _ledger
from ._inflight import track_inflight  # sl.launch hang reports (see the end of the class)

__all__ = ["DistributedBackend", "distributed_backend"]

# torch 2.13 renamed the tensor-in/tensor-out collectives; keep older releases working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# the traceable (functional) collectives, under their torch 2.13 names where renamed
_fc_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_fc_all_reduce_ = torch.ops._c10d_functional.all_reduce_
_fc_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def _tracing() -> bool:
    """torch.compile or sl.capture is recording: collectives are the functional ops."""
    return torch.compiler.is_compiling() or bool(_ledger.capture_hooks)


def _ensure_initialized() -> None:
    if dist.is_initialized():
        return
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [v for v in needed if v not in os.environ]
    if missing:
        raise DistributedSetupError(
            "sl.Mesh.distributed: no default process group is initialized and the torchrun "
            f"environment is incomplete (missing {', '.join(missing)}). Run under torchrun, "
            "call torch.distributed.init_process_group first, or use sl.launch(fn, axes) to "
            "start local worker processes."
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)


class DistributedBackend:
    """Process groups for every axis subset of one mesh, and the collectives over them."""

    kind = "distributed"

    def __init__(self, mesh: AbstractMesh, device_type: str | None = None):
        _ensure_initialized()
        world = dist.get_world_size()
        if world != mesh.size:
            raise DistributedSetupError(
                f"sl.Mesh.distributed({dict(zip(mesh.axis_names, mesh.shape))!r}): the mesh has "
                f"{mesh.size} devices but the world has {world} processes. Make the axis sizes "
                f"multiply to {world}, or start {mesh.size} processes."
            )
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        self.rank = dist.get_rank()
        self.world = dist.group.WORLD
        self.device_type = device_type
        self.device_mesh = init_device_mesh(device_type, mesh.shape, mesh_dim_names=mesh.axis_names)
        self.groups: dict[tuple[str, ...], dist.ProcessGroup] = {}
        names = mesh.axis_names
        for r in range(1, len(names) + 1):
            for subset in itertools.combinations(names, r):
                if r == 1:
                    self.groups[subset] = self.device_mesh.get_group(subset[0])
                elif r == len(names):
                    self.groups[subset] = self.world
                else:
                    seen = set()
                    for dev in range(mesh.size):
                        ranks = tuple(sorted(mesh.group(dev, subset)))
                        if ranks in seen:
                            continue
                        seen.add(ranks)
                        pg = dist.new_group(list(ranks))
                        if self.rank in ranks:
                            self.groups[subset] = pg

    # Equality: same process world (meshes also compare their axes).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, DistributedBackend) and other.world is self.world

    def __hash__(self) -> int:
        return hash(("distributed", id(self.world)))

    def __deepcopy__(self, memo: dict) -> DistributedBackend:
        # a handle to this process's groups, not a value: a copy is the same backend
        # (torch.compile deep-copies a ShardedTensor's (mesh, layout) for its guards)
        return self

    def local_devices(self, mesh: AbstractMesh) -> tuple[int, ...]:
        return (self.rank,)

    # -- group order ---------------------------------------------------------------
    def _group(self, mesh: AbstractMesh, axes: tuple[str, ...]):
        ordered = tuple(a for a in mesh.axis_names if a in axes)
        return self.groups[ordered], _perm(mesh, self.rank, axes, ordered)

    # -- collectives (bufs is [my_buf]) ------------------------------------------
    def all_gather(self, mesh, bufs, axes):
        (b,) = bufs
        group, perm = self._group(mesh, axes)
        k = len(perm)
        b = b.contiguous()
        if _tracing():
            out = funcol.wait_tensor(_fc_all_gather(b.reshape(-1), 0, group))
        else:
            out = torch.empty((k * b.numel(),), dtype=b.dtype, device=b.device)
            _all_gather_single(out, b.reshape(-1), group=group)
        out = out.view(k, *b.shape)
        return [_reorder(out, perm)]

    def all_to_all(self, mesh, bufs, axes):
        (b,) = bufs
        group, perm = self._group(mesh, axes)
        inp = _reorder(b, _inverse(perm)).contiguous()
        if _tracing():
            out = funcol.wait_tensor(funcol.all_to_all_single(inp, None, None, group))
        else:
            out = torch.empty_like(inp)
            dist.all_to_all_single(out, inp, group=group)
        return [_reorder(out, perm)]

    def reduce_scatter(self, mesh, bufs, axes, op):
        (b,) = bufs
        group, perm = self._group(mesh, axes)
        inp = _reorder(b, _inverse(perm)).reshape(-1)
        if _tracing():
            out = funcol.wait_tensor(_fc_reduce_scatter(inp, op, 0, group))
        else:
            out = torch.empty((inp.numel() // len(perm),), dtype=b.dtype, device=b.device)
            _reduce_scatter_single(out, inp, op=_OPS[op], group=group)
        return [out.view(b.shape[1:])]

    def all_reduce(self, mesh, bufs, axes, op, donate=False):
        (b,) = bufs
        group, _ = self._group(mesh, axes)
        if _tracing():
            if donate and b.is_contiguous() and not torch.compiler.is_compiling():
                # sl.capture: reduced where it lies, as below (the in-place functional op)
                return [funcol.wait_tensor(_fc_all_reduce_(b, op, group.group_name))]
            return [funcol.wait_tensor(funcol.all_reduce(b.contiguous(), op, group))]
        # a donated buffer (see _redistribute.execute) is reduced where it lies
        out = b if donate and b.is_contiguous() else b.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=_OPS[op], group=group)
        return [out]

    def ppermute(self, mesh, bufs, src_of, recv_shapes):
        (b,) = bufs
        me = self.rank
        if _tracing():
            return [self._traced_ppermute(b, src_of, recv_shapes[0])]
        ops = []
        for t, s in enumerate(src_of):
            if s == me and t != me:
                ops.append(dist.P2POp(dist.isend, b.contiguous(), t))
        src = src_of[me]
        if src == me:
            out = b.clone()
        else:
            out = torch.empty(recv_shapes[0], dtype=b.dtype, device=b.device)
            ops.append(dist.P2POp(dist.irecv, out, src))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return [out]

    def _traced_ppermute(self, b: torch.Tensor, src_of, recv_shape) -> torch.Tensor:
        """ppermute as one functional all_to_all_single over the world (traceable): rank me
        sends its buffer to every t with src_of[t] == me, and receives from src_of[me]."""
        me, world = self.rank, len(src_of)
        flat = b.contiguous().reshape(-1)
        sends = [t for t in range(world) if src_of[t] == me and t != me]
        src = src_of[me]
        n_in = [flat.numel() if t in sends else 0 for t in range(world)]
        n_recv = math.prod(recv_shape) if src != me else 0
        n_out = [n_recv if r == src else 0 for r in range(world)]
        inp = torch.cat([flat] * len(sends)) if sends else flat[:0]
        out = funcol.wait_tensor(funcol.all_to_all_single(inp, n_out, n_in, self.world))
        return b.clone() if src == me else out.view(recv_shape)

    def broadcast_object(self, mesh, obj, src):
        if _tracing():
            raise DistributedSetupError(
                "broadcasting a Python object (sl.shard(..., src=r) of a non-tensor, a "
                "checkpoint's metadata) inside torch.compile: it cannot be traced. Do it "
                "before the compiled function, and pass the result in."
            )
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast(self, mesh, tensor, src, shape, dtype):
        device = torch.device(self.device_type)
        buf = (
            tensor.contiguous()
            if self.rank == src
            else torch.empty(shape, dtype=dtype, device=device)
        )
        if _tracing():
            return funcol.wait_tensor(funcol.broadcast(buf, src, self.world))
        dist.broadcast(buf, src=src)
        return buf

    def scatter(self, mesh, pieces, src, shape, dtype):
        if _tracing():
            raise DistributedSetupError(
                "sl.shard(tensor, mesh, layout, src=r) scatters from rank r, which torch.compile "
                "cannot trace (there is no functional scatter). Shard before the compiled "
                "function, or pass the same tensor on every rank (src=None: no communication)."
            )
        device = torch.device(self.device_type)
        out = torch.empty(shape, dtype=dtype, device=device)
        dist.scatter(out, [p.contiguous() for p in pieces] if self.rank == src else None, src=src)
        return [out]


# --- sl.launch hang reports: each collective above notes itself while it blocks (_inflight.py)
track_inflight(DistributedBackend)
# ---


@lru_cache(maxsize=4096)
def _perm(
    mesh: AbstractMesh, rank: int, axes: tuple[str, ...], ordered: tuple[str, ...]
) -> tuple[int, ...]:
    """perm[j] = group-rank position of the member at position j along `axes`."""
    by_axes = mesh.group(rank, axes)
    by_rank = mesh.group(rank, ordered)
    return tuple(by_rank.index(m) for m in by_axes)


def _reorder(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``t[list(order)]`` along dim 0, without a copy when `order` is the identity."""
    return t if order == tuple(range(len(order))) else t[list(order)]


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for j, p in enumerate(perm):
        inv[p] = j
    return tuple(inv)


_BACKENDS: dict[tuple, DistributedBackend] = {}


def distributed_backend(mesh: AbstractMesh, device_type: str | None) -> DistributedBackend:
    """The backend for `mesh` on the current default process group (created once per world)."""
    _ensure_initialized()
    key = (mesh, device_type, id(dist.group.WORLD))
    if key not in _BACKENDS:
        _BACKENDS[key] = DistributedBackend(mesh, device_type)
    return _BACKENDS[key]
