"""Independent reference for placement tests: blocks, summands and layout enumeration.

This module deliberately does not import shardlib's shard arithmetic
(`shardlib.layouts._shard`) or the planner: it recomputes, from the rules of
DESIGN §1 alone, which global block each simulated device holds, so the tests
compare shardlib against a second implementation rather than against itself.

- a dim of size n split over axes of total size k is cut like `torch.chunk`:
  s = ceil(n / k), chunk c covers ``[min(n, c*s), min(n, (c+1)*s))``;
- the chunk index over a multi-axis split ``(a, b)`` is ``i_a * |b| + i_b``;
- the flat device index is row-major over the mesh axes (first axis major).

Partial summands (`make_summands`) reduce exactly to the value but are never
the trivial "value on index 0, identity elsewhere" split, so a redistribution
that drops or duplicates a summand is caught.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence

import torch

import shardlib as sl

__all__ = [
    "REDUCE_OPS",
    "arange_value",
    "block",
    "bounds",
    "check_reshard",
    "chunk",
    "coords",
    "count_layouts",
    "enumerate_layouts",
    "flat_chunk_index",
    "make_summands",
    "partial_groups",
    "partial_index",
    "reduce_summands",
]

REDUCE_OPS = ("sum", "avg", "max", "min")


# == arithmetic ================================================================
def chunk(n: int, k: int, c: int) -> tuple[int, int]:
    """``[lo, hi)`` of chunk `c` of `n` items cut into `k` torch.chunk-style chunks."""
    s = -(-n // k) if n else 0
    return min(n, c * s), min(n, (c + 1) * s)


def coords(axes: Mapping[str, int], dev: int) -> dict[str, int]:
    """Coordinates of flat device `dev` (row-major, first axis major)."""
    out = {}
    for name, size in reversed(list(axes.items())):
        dev, out[name] = divmod(dev, size)
    return out


def flat_chunk_index(axes: Mapping[str, int], dev: int, split: Sequence[str]) -> int:
    """Flat chunk index of `dev` over the split axes `split` (major -> minor)."""
    c = coords(axes, dev)
    idx = 0
    for a in split:
        idx = idx * axes[a] + c[a]
    return idx


def bounds(
    shape: Sequence[int], layout: sl.Layout, axes: Mapping[str, int], dev: int
) -> tuple[tuple[int, int], ...]:
    """Per dim, the global ``[lo, hi)`` that device `dev` holds."""
    out = []
    for n, split in zip(shape, layout.dims):
        k = math.prod(axes[a] for a in split)
        out.append(chunk(n, k, flat_chunk_index(axes, dev, split)))
    return tuple(out)


def block(value: torch.Tensor, layout: sl.Layout, axes: Mapping[str, int], dev: int):
    """The reference block of the global `value` that device `dev` holds (a view)."""
    b = value
    for d, (lo, hi) in enumerate(bounds(tuple(value.shape), layout, axes, dev)):
        b = b[(slice(None),) * d + (slice(lo, hi),)]
    return b


def partial_index(layout: sl.Layout, axes: Mapping[str, int], dev: int) -> int:
    """Index j of `dev` along the partial axes (0 when nothing is partial)."""
    return flat_chunk_index(axes, dev, layout.partial)


def partial_groups(layout: sl.Layout, axes: Mapping[str, int]) -> list[list[int]]:
    """Devices grouped by everything but their coordinates on the partial axes."""
    groups: dict[tuple, list[int]] = {}
    for dev in range(math.prod(axes.values())):
        c = coords(axes, dev)
        key = tuple(v for a, v in c.items() if a not in layout.partial)
        groups.setdefault(key, []).append(dev)
    return list(groups.values())


# == partial summands ==========================================================
def _pattern(shape: Sequence[int], salt: int) -> torch.Tensor:
    """A deterministic integer-valued float64 pattern in [-3, 3]."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.int64)
    return (((i * 3 + salt * 5 + 1) % 7) - 3).to(torch.float64).reshape(tuple(shape))


def make_summands(
    value: torch.Tensor, layout: sl.Layout, axes: Mapping[str, int]
) -> list[torch.Tensor]:
    """Per device (flat order), the local shard whose reduction over the partial axes is `value`.

    With j the device's index along the partial axes and k their group size:
    - sum: ``v*[j==0] + R * (-(k-1) if j == 0 else 1)`` with R an integer pattern
      (so every summand is nonzero, and the sum is exact in float64);
    - avg: ``v + R * (-(k-1) if j == 0 else 1)`` (zero-mean noise);
    - max: ``v - ((j + p) mod k) * c`` with p a per-element offset and c >= 1,
      so the maximum sits on a different device for different elements;
    - min: ``v + ((j + p) mod k) * c``.
    Devices differing only in replicated axes get identical summands; every
    shard is a fresh contiguous tensor.
    """
    ndev = math.prod(axes.values())
    k = math.prod(axes[a] for a in layout.partial)
    shards = []
    for dev in range(ndev):
        b = block(value, layout, axes, dev).contiguous()
        if not layout.partial:
            shards.append(b.clone())
            continue
        j = partial_index(layout, axes, dev)
        # The pattern depends on the block position (via its bounds) but not on j.
        lo = sum(lo for lo, _ in bounds(tuple(value.shape), layout, axes, dev))
        R = _pattern(b.shape, lo)
        op = layout.reduce_op
        if op in ("sum", "avg"):
            noise = R * (-(k - 1) if j == 0 else 1)
            base = b if (op == "avg" or j == 0) else torch.zeros_like(b)
            shards.append((base + noise).contiguous())
        else:
            p = (R + 3).to(torch.int64)
            c = R.abs() + 1
            off = ((j + p) % k).to(torch.float64) * c
            shards.append((b - off if op == "max" else b + off).contiguous())
    return shards


def reduce_summands(tensors: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    """Reduce equal-shaped summands the way a partial layout's op says."""
    stacked = torch.stack(list(tensors))
    if op == "sum":
        return stacked.sum(0)
    if op == "avg":
        return stacked.sum(0) / len(tensors)
    if op == "max":
        return stacked.amax(0)
    return stacked.amin(0)


# == layout enumeration ========================================================
def enumerate_layouts(
    axes: Mapping[str, int], ndim: int, ops: Sequence[str] = REDUCE_OPS
) -> Iterator[sl.Layout]:
    """Every layout of a rank-`ndim` tensor on a mesh with `axes`.

    Each mesh axis is unused, on some dim (every order of the axes sharing a
    dim), or partial; a layout with partial axes comes once per op in `ops`.
    """
    names = list(axes)
    slots = [None, "partial", *range(ndim)]
    for choice in itertools.product(slots, repeat=len(names)):
        partial = tuple(a for a, s in zip(names, choice) if s == "partial")
        per_dim = [[a for a, s in zip(names, choice) if s == d] for d in range(ndim)]
        for dims in itertools.product(*(itertools.permutations(p) for p in per_dim)):
            for op in ops if partial else ("sum",):
                yield sl.Layout(tuple(dims), partial, op)


def count_layouts(naxes: int, ndim: int, nops: int) -> int:
    """Closed form of ``len(list(enumerate_layouts(...)))``.

    Choose the partial subset (size p, C(m, p) ways, times `nops` if p > 0),
    then place the other m - p axes as ordered lists on `ndim` dims or leave
    them unused: sum over u unused of C(m-p, u) * L(m-p-u, ndim), where
    L(r, D) = r! * C(r + D - 1, D - 1) counts r labeled axes in D ordered lists.
    """

    def lists(r: int, d: int) -> int:
        if d == 0:
            return 1 if r == 0 else 0
        return math.factorial(r) * math.comb(r + d - 1, d - 1)

    total = 0
    for p in range(naxes + 1):
        rest = naxes - p
        placed = sum(math.comb(rest, u) * lists(rest - u, ndim) for u in range(rest + 1))
        total += math.comb(naxes, p) * placed * (nops if p else 1)
    return total


# == the placement check =======================================================
def arange_value(shape: Sequence[int]) -> torch.Tensor:
    """The global test value: ``arange`` in float64 (integers, so sums are exact)."""
    return torch.arange(math.prod(shape), dtype=torch.float64).reshape(tuple(shape))


def _storages(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [t.untyped_storage().data_ptr() for t in tensors if t.numel()]


def check_reshard(mesh: sl.Mesh, shape: Sequence[int], src: sl.Layout, dst: sl.Layout) -> None:
    """Reshard a summand-built `src` tensor to `dst` and compare with the reference blocks.

    Checks: the result's layout, shape and dtype; every local shard's shape is
    exactly the reference block's; values are bitwise equal to the reference
    (rtol 1e-12 when an average is involved) — for a partial `dst`, the
    reduction of the shards over each partial group is; the source shards are
    unchanged; result shards are fresh (no storage shared with the source or
    with each other).
    """
    axes = mesh.axes
    shape = tuple(shape)
    value = arange_value(shape)
    summands = make_summands(value, src, axes)
    x = sl.from_local([s.clone() for s in summands], mesh, src, shape)
    y = sl.reshard(x, dst)
    where = f"{src!r} -> {dst!r}, shape {shape} on {mesh!r}"
    assert isinstance(y, sl.ShardedTensor), where
    assert y.spec == dst and tuple(y.shape) == shape and y.dtype == torch.float64, where
    shards = y.local_shards()
    assert len(shards) == mesh.size, where
    for dev, s in enumerate(shards):
        want = tuple(block(value, dst, axes, dev).shape)
        assert tuple(s.shape) == want, f"{where}: device {dev} shape {tuple(s.shape)} != {want}"
    inexact = (src.partial and src.reduce_op == "avg") or (dst.partial and dst.reduce_op == "avg")
    groups = partial_groups(dst, axes) if dst.partial else [[d] for d in range(mesh.size)]
    for group in groups:
        got = reduce_summands([shards[d] for d in group], dst.reduce_op)
        ref = block(value, dst, axes, group[0])
        ok = torch.allclose(got, ref, rtol=1e-12, atol=0) if inexact else torch.equal(got, ref)
        assert ok, f"{where}: devices {group} hold\n{got}\nexpected\n{ref}"
    if src != dst:
        for s, before in zip(x.local_shards(), summands):
            assert torch.equal(s, before), f"{where}: the source was modified"
        mine = _storages(shards)
        assert len(set(mine)) == len(mine), f"{where}: result shards alias each other"
        assert not set(mine) & set(_storages(x.local_shards())), f"{where}: result aliases source"
