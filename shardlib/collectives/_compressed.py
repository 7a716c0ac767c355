"""Compressed moves: a redistribution plan executed with a cheaper wire format.

Owns `Wire` (what travels: blockwise int8 or fp8 e4m3 with float32 scales, or bfloat16),
`wire_of` (the argument check of ``comm_dtype=``) and `execute_compressed`, the
compressed twin of `_redistribute.execute`. It does not own planning (the same plan as
the uncompressed move) or the quantization math (``shardlib.cuda._quant``; its CUDA
kernels where the tensors are on a GPU).

Each communicating step encodes what a device sends, moves the bytes (one uint8 buffer
per piece: the payload, then the scales) and decodes what arrives:

- ``all_gather``: each device encodes its block once; every device, its own block
  included, decodes all of them (so replicas agree bit for bit).
- ``reduce_scatter`` (ZeRO++'s qgZ): each device cuts its summand into the destination
  chunks and encodes each chunk once (blocks never straddle two chunks); one all-to-all
  moves chunk j to member j, who dequantize-reduces the k pieces in member order, in
  float32. Never requantized per ring hop.
- ``all_reduce``: the reduce-scatter above over ceil(B/k)-element chunks of the flat
  block, the reduced chunk encoded again and all-gathered (two encodings in all).
- ``all_to_all`` and ``ppermute``: each piece (block) encoded, moved, decoded.
- partial max and min raise (`CompressionError`): their reduction is not a sum of
  dequantized pieces. Local steps (slices, to-partial) run as they are.

Invariants: results come back in the source dtype; the ledger records, per step, the
bytes the busiest device sends on the wire (payload + scales, the ring model of the
planner, padded to the largest piece), the wire dtype and the scale bytes
(`CommRecord.scale_bytes`); both backends compute the same bytes, so gloo results equal
simulated ones bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import LayoutError
from ..cuda import _quant
from ..layouts._mesh import Mesh
from ..layouts._planner import AllGather, AllReduce, AllToAll, Plan, PPermute, ReduceScatter
from ..layouts._shard import local_bounds, max_chunk, max_local_numel
from ._ledger import record
from ._redistribute import _comm_group, _run_step, pad_to, ppermute_sources

__all__ = ["BLOCK", "CompressionError", "Wire", "execute_compressed", "wire_of"]

BLOCK = 256  # elements per scale


class CompressionError(LayoutError):
    """A move or an argument that compressed communication does not support."""


@dataclass(frozen=True, slots=True)
class Wire:
    """A wire format: ``"int8"`` / ``"fp8"`` (blockwise, float32 scales) or ``"bf16"``."""

    fmt: str

    @property
    def dtype_name(self) -> str:
        return {"int8": "int8", "fp8": "float8_e4m3fn", "bf16": "bfloat16"}[self.fmt]

    def scale_bytes(self, n: int) -> int:
        return 0 if self.fmt == "bf16" else 4 * -(-n // BLOCK)

    def nbytes(self, n: int) -> int:
        """Bytes on the wire for `n` elements: payload + scales."""
        return 2 * n if self.fmt == "bf16" else n + self.scale_bytes(n)

    # -- encode / decode (flat pieces) ----------------------------------------
    def encode(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (any shape, floating) as ``nbytes(t.numel())`` uint8: payload then scales."""
        if self.fmt == "bf16":
            return t.reshape(-1).to(torch.bfloat16).view(torch.uint8)
        q, scales = _quant.quantize(t, self.fmt, BLOCK)
        return torch.cat([q.view(torch.uint8), scales.view(torch.uint8)])

    def _split(self, b: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bytes ``[..., nbytes(n)]`` -> (q ``[..., n]``, scales ``[..., nblocks]``)."""
        qdtype = torch.int8 if self.fmt == "int8" else torch.float8_e4m3fn
        q = b[..., :n].contiguous().view(qdtype)
        scales = b[..., n:].clone(memory_format=torch.contiguous_format)  # (aligned for the view)
        scales = scales.view(torch.float32)
        return q, scales

    def decode(self, b: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        """One piece's bytes back to `n` elements of `dtype`."""
        if self.fmt == "bf16":
            return b.contiguous().view(torch.bfloat16).to(dtype)
        q, scales = self._split(b, n)
        return _quant.dequantize(q, scales, BLOCK, dtype)

    def decode_sum(self, b: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        """The sum of k pieces (bytes ``[k, nbytes(n)]``), float32 in member order."""
        if self.fmt == "bf16":
            vals = b.contiguous().view(torch.bfloat16)
            acc = torch.zeros(n, dtype=torch.float32, device=b.device)
            for j in range(vals.shape[0]):
                acc = acc + vals[j].float()
            return acc.to(dtype)
        q, scales = self._split(b, n)
        return _quant.dequantize_reduce(q, scales, BLOCK, dtype)


_NAMES = {"int8": "int8", "fp8": "fp8", "bf16": "bf16", "bfloat16": "bf16"}


def wire_of(comm_dtype: Any, x_dtype: torch.dtype, where: str) -> Wire:
    """The `Wire` for ``comm_dtype=`` (``"int8"``, ``"fp8"``, ``torch.bfloat16``; also
    ``torch.int8``, ``torch.float8_e4m3fn``, ``"bf16"``) for a tensor of `x_dtype`."""
    fmt = None
    if isinstance(comm_dtype, str):
        fmt = _NAMES.get(comm_dtype)
    elif comm_dtype == torch.int8:
        fmt = "int8"
    elif comm_dtype == torch.bfloat16:
        fmt = "bf16"
    elif comm_dtype is not None and comm_dtype == getattr(torch, "float8_e4m3fn", None):
        fmt = "fp8"
    if fmt is None:
        raise CompressionError(
            f"{where}: comm_dtype={comm_dtype!r} is not a wire format. Valid: 'int8' "
            "(blockwise int8 + float32 scales per 256 elements), 'fp8' (float8 e4m3, same "
            "scales) or torch.bfloat16; None moves in the tensor's own dtype."
        )
    if fmt == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise CompressionError(
            f"{where}: comm_dtype='fp8' needs torch.float8_e4m3fn, which this torch "
            f"({torch.__version__}) lacks. Use comm_dtype='int8', or torch 2.1 or newer."
        )
    if not x_dtype.is_floating_point:
        raise CompressionError(
            f"{where}: x is {x_dtype}; comm_dtype compresses floating tensors only (it rounds "
            "values). Move it with comm_dtype=None."
        )
    return Wire(fmt)


# == execution =======================================================================
def check_plan(plan: Plan, where: str) -> None:
    """Raise before anything moves if `plan` has a step compression cannot do."""
    for ps in plan.steps:
        if isinstance(ps.step, ReduceScatter | AllReduce) and ps.src.reduce_op not in (
            "sum",
            "avg",
        ):
            raise CompressionError(
                f"{where}: {ps.src!r} is a partial {ps.src.reduce_op}; comm_dtype reduces "
                "sums (and averages) of dequantized pieces only. Reduce with comm_dtype=None."
            )


def execute_compressed(
    plan: Plan,
    mesh: Mesh,
    shards: list[torch.Tensor],
    wire: Wire,
    *,
    direction: str,
    cause: str,
    where: str = "sl.reshard(comm_dtype=...)",
) -> list[torch.Tensor]:
    """Run `plan` on this process's `shards`, each communicating step through `wire`."""
    check_plan(plan, where)
    if not plan.steps:
        return [s.clone() for s in shards]
    for ps in plan.steps:
        if ps.step.kind is None:
            shards = _run_step(ps.step, ps.src, ps.dst, plan.shape, mesh, shards)
            continue
        shards, piece, pieces_sent = _STEPS[type(ps.step)](
            ps.step, ps, plan.shape, mesh, shards, wire
        )
        axes, k = _comm_group(ps.step, ps.src, ps.dst, mesh.abstract)
        record(
            ps.step.kind,
            axes,
            k,
            pieces_sent * wire.nbytes(piece),
            wire.dtype_name,
            direction,
            cause,
            scale_bytes=pieces_sent * wire.scale_bytes(piece),
            data=shards,
        )
    return shards


def _all_gather(step, ps, shape, mesh: Mesh, shards, wire: Wire):
    am, be, devs = mesh.abstract, mesh.backend, mesh.local_devices
    src, dst = ps.src, ps.dst
    d = step.dim
    size = max_chunk(shape[d], am.group_size(src.dims[d]))
    padded = [pad_to(t, d, size) for t in shards]
    n = padded[0].numel() if padded else 0
    gathered = be.all_gather(am, [wire.encode(t) for t in padded], step.axes)
    out = []
    for dev, t, g in zip(devs, padded, gathered):
        members = am.group(dev, step.axes)
        sizes = [hi - lo for lo, hi in (local_bounds(shape, src, am, m)[d] for m in members)]
        parts = [wire.decode(g[j], n, t.dtype).view(t.shape) for j in range(len(members))]
        union = torch.cat([p.narrow(d, 0, s) for p, s in zip(parts, sizes)], d)
        lo0 = local_bounds(shape, src, am, members[0])[d][0]
        lo, hi = local_bounds(shape, dst, am, dev)[d]
        out.append(union.narrow(d, lo - lo0, hi - lo).contiguous())
    return out, n, am.group_size(step.axes) - 1


def _chunks_for(t: torch.Tensor, dev: int, step, ps, shape, am) -> list[torch.Tensor]:
    """Device `dev`'s block `t` cut as the destination cuts `step.dim` over the group,
    each piece padded to the largest destination chunk."""
    d = step.dim
    size = max_chunk(shape[d], am.group_size(ps.dst.dims[d]))
    lo0 = local_bounds(shape, ps.src, am, dev)[d][0]
    pieces = []
    for m in am.group(dev, step.axes):
        lo, hi = local_bounds(shape, ps.dst, am, m)[d]
        piece = t.narrow(d, lo - lo0, hi - lo) if hi > lo else t.narrow(d, 0, 0)
        pieces.append(pad_to(piece, d, size))
    return pieces


def _exchange(pieces_of: list[list[torch.Tensor]], step, mesh: Mesh, wire: Wire):
    """Each device's pieces (one per group member, equal shapes) encoded and all-to-all'd:
    (what each device received, [k, nbytes] per device; each device's piece shape; the
    elements per piece)."""
    bufs = [torch.stack([wire.encode(p) for p in pieces]) for pieces in pieces_of]
    received = mesh.backend.all_to_all(mesh.abstract, bufs, step.axes)
    piece_shapes = [pieces[0].shape for pieces in pieces_of]
    return received, piece_shapes, math.prod(piece_shapes[0]) if piece_shapes else 0


def _reduce_scatter(step, ps, shape, mesh: Mesh, shards, wire: Wire):
    am, devs = mesh.abstract, mesh.local_devices
    k = am.group_size(step.axes)
    d = step.dim
    pieces_of = [_chunks_for(t, dev, step, ps, shape, am) for dev, t in zip(devs, shards)]
    received, piece_shapes, n = _exchange(pieces_of, step, mesh, wire)
    out = []
    for dev, t, r, pshape in zip(devs, shards, received, piece_shapes):
        summed = wire.decode_sum(r, n, t.dtype).view(pshape)
        if ps.src.reduce_op == "avg":
            summed = summed / k
        lo, hi = local_bounds(shape, ps.dst, am, dev)[d]
        out.append(summed.narrow(d, 0, hi - lo).contiguous())
    return out, n, k - 1


def _all_reduce(step, ps, shape, mesh: Mesh, shards, wire: Wire):
    am, be = mesh.abstract, mesh.backend
    k = am.group_size(step.axes)
    flats = [t.reshape(-1) for t in shards]
    c = -(-flats[0].numel() // k) if flats else 0
    bufs = [torch.stack([wire.encode(p) for p in pad_to(f, 0, k * c).view(k, c)]) for f in flats]
    received = be.all_to_all(am, bufs, step.axes)
    mine = [wire.decode_sum(r, c, torch.float32) for r in received]
    gathered = be.all_gather(am, [wire.encode(m) for m in mine], step.axes)
    out = []
    for t, g in zip(shards, gathered):
        whole = torch.cat([wire.decode(g[j], c, t.dtype) for j in range(k)])
        whole = whole[: t.numel()].view(t.shape)
        out.append(whole / k if ps.src.reduce_op == "avg" else whole)
    return out, c, 2 * (k - 1)


def _all_to_all(step, ps, shape, mesh: Mesh, shards, wire: Wire):
    am, devs = mesh.abstract, mesh.local_devices
    src, dst = ps.src, ps.dst
    d1, d2 = step.from_dim, step.to_dim
    s1 = max_chunk(shape[d1], am.group_size(src.dims[d1]))
    s2 = max_chunk(shape[d2], am.group_size(dst.dims[d2]))
    pieces_of = []
    for dev, t in zip(devs, shards):
        lo2 = local_bounds(shape, src, am, dev)[d2][0]
        pieces = []
        for m in am.group(dev, step.axes):
            lo, hi = local_bounds(shape, dst, am, m)[d2]
            piece = t.narrow(d2, lo - lo2, hi - lo) if hi > lo else t.narrow(d2, 0, 0)
            pieces.append(pad_to(pad_to(piece, d2, s2), d1, s1))
        pieces_of.append(pieces)
    received, piece_shapes, n = _exchange(pieces_of, step, mesh, wire)
    out = []
    for dev, t, r, pshape in zip(devs, shards, received, piece_shapes):
        members = am.group(dev, step.axes)
        lo2, hi2 = local_bounds(shape, dst, am, dev)[d2]
        parts = []
        for j, m in enumerate(members):
            lo, hi = local_bounds(shape, src, am, m)[d1]
            part = wire.decode(r[j], n, t.dtype).view(pshape)
            parts.append(part.narrow(d1, 0, hi - lo).narrow(d2, 0, hi2 - lo2))
        union = torch.cat(parts, d1)
        lo0 = local_bounds(shape, src, am, members[0])[d1][0]
        lo, hi = local_bounds(shape, dst, am, dev)[d1]
        out.append(union.narrow(d1, lo - lo0, hi - lo).contiguous())
    return out, n, am.group_size(step.axes) - 1


def _ppermute(step, ps, shape, mesh: Mesh, shards, wire: Wire):
    am, be, devs = mesh.abstract, mesh.backend, mesh.local_devices
    src_of = ppermute_sources(ps.src, ps.dst, am)
    shapes = [tuple(hi - lo for lo, hi in local_bounds(shape, ps.dst, am, dev)) for dev in devs]
    recv = [(wire.nbytes(math.prod(s)),) for s in shapes]
    received = be.ppermute(am, [wire.encode(t) for t in shards], src_of, recv)
    out = [
        wire.decode(r, math.prod(s), t.dtype).view(s) for t, r, s in zip(shards, received, shapes)
    ]
    return out, max_local_numel(shape, ps.src, am), 1


_STEPS = {
    AllGather: _all_gather,
    ReduceScatter: _reduce_scatter,
    AllReduce: _all_reduce,
    AllToAll: _all_to_all,
    PPermute: _ppermute,
}
