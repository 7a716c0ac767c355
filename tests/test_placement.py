"""Exact placement and values of `sl.reshard` between every pair of layouts (simulated mesh).

Covers, on the meshes {x:4}, {a:2,b:2} and {a:3,b:2}, for 1-, 2- and 3-d
tensors in three shape classes, EVERY (src, dst) pair of layouts: each mesh
axis unused, on some dim (every order of the axes sharing a dim), or partial;
partial layouts once per reduce op (sum, avg, max, min) on both the source
and the destination side (no restriction was needed: the exhaustive part,
31,473 pairs over 27 shapes, takes about 45 s on 2 cores). One pytest test
per (mesh, shape):

- ``divisible``: every split of every dim is even;
- ``uneven``: some split leaves unequal chunks, none leaves an empty one;
- ``empty``: some split leaves an empty chunk (n < k, or n = 5 on 4, ...).
  (`test_shape_classes` checks each shape against its class.)

The source is built with `sl.from_local` from shards cut by the independent
reference in `tests/_reference.py` out of an ``arange``-filled float64
global value; partial sources hold non-trivial summands (see
`make_summands`). Each local shard of the result must have exactly the
reference block's shape; values must be bitwise equal to the reference, or,
for a partial destination, their reduction over each partial group must be;
the source must be unchanged and the result shards fresh (no storage shared
with the source or with each other, DESIGN §11).
Tolerance: rtol 1e-12 (float64) only when the source or destination is a
partial ``avg`` (a sum followed by a division); bitwise everywhere else.

A second part samples (src, dst, shape) triples on {a:2,b:2,c:2} with
hypothesis (fixed seed; ``SHARDLIB_HYPOTHESIS_CASES`` cases, default 300; the
``slow`` tier runs ``SHARDLIB_SLOW_CASES``, default 20000).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardlib as sl
from tests._reference import (
    REDUCE_OPS,
    arange_value,
    block,
    check_reshard,
    chunk,
    count_layouts,
    enumerate_layouts,
    make_summands,
    partial_groups,
    reduce_summands,
)

MESHES = {"x4": {"x": 4}, "a2b2": {"a": 2, "b": 2}, "a3b2": {"a": 3, "b": 2}}

SHAPES = {
    "x4": {
        "divisible": [(12,), (8, 4), (4, 8, 4)],
        "uneven": [(7,), (10, 7), (7, 10, 11)],
        "empty": [(2,), (3, 5), (1, 6, 3)],
    },
    "a2b2": {
        "divisible": [(12,), (8, 4), (4, 8, 4)],
        "uneven": [(7,), (10, 7), (7, 10, 11)],
        "empty": [(3,), (3, 5), (1, 6, 3)],
    },
    "a3b2": {
        "divisible": [(12,), (6, 12), (6, 12, 6)],
        "uneven": [(11,), (11, 17), (11, 17, 11)],
        "empty": [(2,), (4, 5), (1, 5, 2)],
    },
}

CASES = [
    pytest.param(mesh_id, cls, shape, id=f"{mesh_id}-{cls}-{'x'.join(map(str, shape))}")
    for mesh_id, classes in SHAPES.items()
    for cls, shapes in classes.items()
    for shape in shapes
]

# Closed form of the enumeration: per (mesh, shape), (number of layouts) ** 2.
EXPECTED_PAIRS = {
    (mesh_id, shape): count_layouts(len(MESHES[mesh_id]), len(shape), len(REDUCE_OPS)) ** 2
    for mesh_id, classes in SHAPES.items()
    for shapes in classes.values()
    for shape in shapes
}
# 3 shapes per rank and mesh: {x:4} has 6, 7, 8 layouts for rank 1, 2, 3; the
# two-axis meshes have 25, 39, 55.
assert sum(EXPECTED_PAIRS.values()) == 3 * (6**2 + 7**2 + 8**2) + 6 * (25**2 + 39**2 + 55**2)
TOTAL_PAIRS = sum(EXPECTED_PAIRS.values())  # 31_473

_checked: dict[tuple, int] = {}


def _split_sizes(axes: dict[str, int]) -> set[int]:
    """Chunk counts a dim can be cut into on this mesh (products of distinct axes)."""
    sizes = {1}
    for k in axes.values():
        sizes |= {s * k for s in sizes}
    return sizes - {1}


def _chunk_lengths(n: int, k: int) -> list[int]:
    return [hi - lo for lo, hi in (chunk(n, k, c) for c in range(k))]


@pytest.mark.parametrize("mesh_id", list(MESHES))
def test_shape_classes(mesh_id):
    """Each shape is in the class it is listed under (guards the test data itself)."""
    splits = _split_sizes(MESHES[mesh_id])
    for cls, shapes in SHAPES[mesh_id].items():
        for shape in shapes:
            lengths = [_chunk_lengths(n, k) for n in shape for k in splits]
            has_empty = any(0 in ls for ls in lengths)
            has_uneven = any(len(set(ls)) > 1 for ls in lengths)
            want = {"divisible": (False, False), "uneven": (True, False), "empty": (True, True)}
            assert (has_uneven, has_empty) == want[cls], (mesh_id, cls, shape)


def test_layout_enumeration_matches_closed_form():
    for naxes in (1, 2, 3):
        axes = {f"m{i}": 2 for i in range(naxes)}
        for ndim in (0, 1, 2, 3):
            for nops in (1, 4):
                layouts = list(enumerate_layouts(axes, ndim, REDUCE_OPS[:nops]))
                assert len(layouts) == len(set(layouts)) == count_layouts(naxes, ndim, nops)


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reference_summands(op):
    """Guard on the reference: summands reduce exactly to the value and are not trivial."""
    axes = {"a": 2, "b": 3}
    value = arange_value((4, 9))
    layout = sl.P(None, "b", partial={"a": op})
    shards = make_summands(value, layout, axes)
    for group in partial_groups(layout, axes):
        ref = block(value, layout, axes, group[0])
        summands = [shards[d] for d in group]
        assert torch.equal(reduce_summands(summands, op), ref)
        for s in summands:  # no summand is the value or the op's identity
            assert not torch.equal(s, ref) and not torch.equal(s, torch.zeros_like(s))
            assert len(set((s - ref).flatten().tolist())) > 1
        if op in ("max", "min"):  # the extremum sits on different devices per element
            hits = [(s == ref).flatten() for s in summands]
            assert all(h.any() and not h.all() for h in hits)


@pytest.mark.parametrize(("mesh_id", "cls", "shape"), CASES)
def test_every_pair(mesh_id, cls, shape, capsys):
    mesh = sl.Mesh.simulated(MESHES[mesh_id])
    layouts = list(enumerate_layouts(mesh.axes, len(shape)))
    n = 0
    for src in layouts:
        for dst in layouts:
            check_reshard(mesh, shape, src, dst)
            n += 1
    assert n == EXPECTED_PAIRS[(mesh_id, shape)]
    _checked[(mesh_id, shape)] = n
    if len(_checked) == len(EXPECTED_PAIRS):
        assert sum(_checked.values()) == TOTAL_PAIRS
        with capsys.disabled():
            print(f"\n[test_placement] checked {TOTAL_PAIRS} (src, dst) pairs exhaustively")


# == sampled: {a:2, b:2, c:2} ==================================================
MESH3 = {"a": 2, "b": 2, "c": 2}
# Sizes that split evenly (8, 4, 16), unevenly (3, 5, 7, 10, 11, 13) and with
# empty chunks on 4 or 8 devices (1, 2, 3, 5, 6, 7, 10, 11, 13), and 0.
DIM_SIZES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16]
_LAYOUTS3 = {ndim: list(enumerate_layouts(MESH3, ndim)) for ndim in (1, 2, 3)}


@st.composite
def _triples(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.sampled_from(DIM_SIZES)) for _ in range(ndim))
    src = draw(st.sampled_from(_LAYOUTS3[ndim]))
    dst = draw(st.sampled_from(_LAYOUTS3[ndim]))
    return shape, src, dst


def _run_sampled(cases: int, capsys, label: str) -> None:
    mesh = sl.Mesh.simulated(MESH3)
    n = 0

    @settings(
        derandomize=True,
        deadline=None,
        max_examples=cases,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(_triples())
    def run(triple):
        nonlocal n
        shape, src, dst = triple
        check_reshard(mesh, shape, src, dst)
        n += 1

    run()
    assert n > 0
    with capsys.disabled():
        print(f"\n[{label}] checked {n} sampled (src, dst, shape) triples on {MESH3}")


def test_sampled_pairs_three_axes(capsys):
    _run_sampled(int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 300)), capsys, "sampled")


@pytest.mark.slow
def test_sampled_pairs_three_axes_slow(capsys):
    _run_sampled(int(os.environ.get("SHARDLIB_SLOW_CASES", 20000)), capsys, "sampled-slow")
