"""Shard arithmetic: which global block each device holds under a layout.

Pure integer arithmetic, no tensors. A dim of size n split over axes of total
size k is cut the way `torch.chunk` cuts: with s = ceil(n / k), chunk c covers
``[min(n, c*s), min(n, (c+1)*s))`` (possibly empty). For a dim split over
``("dp", "tp")`` the chunk index is ``i_dp * |tp| + i_tp`` (flat, JAX-style).

The largest chunk of a dim is ``min(n, s)``; uneven chunks are padded to it
inside collectives, and the byte counts of `_planner.py` use it.
"""

from __future__ import annotations

import math

from ._layout import Layout
from ._mesh import AbstractMesh

__all__ = [
    "chunk_bounds",
    "dim_splits",
    "local_bounds",
    "local_shape",
    "max_local_shape",
    "max_local_numel",
    "partial_index",
]


def chunk_bounds(n: int, k: int, c: int) -> tuple[int, int]:
    """Bounds ``[lo, hi)`` of chunk `c` when `n` items are cut into `k` torch.chunk-style chunks."""
    s = -(-n // k)
    return min(n, c * s), min(n, (c + 1) * s)


def max_chunk(n: int, k: int) -> int:
    return min(n, -(-n // k))


def dim_splits(layout: Layout, mesh: AbstractMesh) -> tuple[int, ...]:
    """Number of chunks each dim is cut into."""
    return tuple(mesh.group_size(axes) for axes in layout.dims)


_BOUNDS: dict[tuple, tuple[tuple[int, int], ...]] = {}


def local_bounds(
    shape: tuple[int, ...], layout: Layout, mesh: AbstractMesh, device: int
) -> tuple[tuple[int, int], ...]:
    """Per dim, the global ``[lo, hi)`` that device `device` (flat index) holds (memoized:
    collectives ask it per device per step)."""
    key = (tuple(shape), layout, mesh, device)
    try:
        return _BOUNDS[key]
    except KeyError:
        pass
    out = tuple(
        chunk_bounds(n, mesh.group_size(axes), mesh.index_along(device, axes)) if axes else (0, n)
        for n, axes in zip(shape, layout.dims)
    )
    if len(_BOUNDS) > 65536:
        _BOUNDS.clear()
    _BOUNDS[key] = out
    return out


def local_shape(
    shape: tuple[int, ...], layout: Layout, mesh: AbstractMesh, device: int
) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in local_bounds(shape, layout, mesh, device))


def max_local_shape(shape: tuple[int, ...], layout: Layout, mesh: AbstractMesh) -> tuple[int, ...]:
    """Largest local extent per dim over all devices (what collectives pad to)."""
    return tuple(max_chunk(n, k) for n, k in zip(shape, dim_splits(layout, mesh)))


def max_local_numel(shape: tuple[int, ...], layout: Layout, mesh: AbstractMesh) -> int:
    return math.prod(max_local_shape(shape, layout, mesh))


def partial_index(layout: Layout, mesh: AbstractMesh, device: int) -> int:
    """Index of `device` among the devices holding summands of the same block."""
    return mesh.index_along(device, layout.partial)
