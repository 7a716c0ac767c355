"""Planner speed: cached `sl.plan` lookups and uncached (warm and cold) planning.

Reproduce with:

    python benchmarks/planner.py

Prints one row per (mesh, shape, src -> dst): the median time of a cached
lookup (goal < 5 us), of an uncached plan with the planner's helper caches
warm (plan cache cleared before each run; goal < 5 ms on 3 axes, DTensor's
optimal planner takes ~19 ms), and of a cold plan (the helper lru caches
`_placements` and `_refines` cleared too, as in a fresh process). Finishes in
well under a minute on a 2-core CPU machine.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import shardlib as sl
from shardlib.layouts import _planner

P = sl.P

# (mesh axes, shape, src, dst)
CASES = [
    ({"x": 8}, (4096, 4096), P("x", None), P(None, "x")),
    ({"x": 8}, (4096, 4096), P(None, None, partial="x"), P("x", None)),
    ({"x": 8}, (1000, 30, 7), P("x", None, None), P(None, None, "x")),
    ({"a": 2, "b": 4}, (4096, 4096), P("a", "b"), P("b", "a")),
    ({"a": 2, "b": 4}, (4096, 4096), P(None, None, partial=("a", "b")), P(("a", "b"), None)),
    ({"a": 2, "b": 4}, (10, 30, 7), P(("a", "b"), None, None), P(None, "a", "b")),
    ({"a": 2, "b": 2, "c": 2}, (4096, 4096), P(("a", "b"), "c"), P("c", ("b", "a"))),
    ({"a": 2, "b": 2, "c": 2}, (4096, 4096), P(None, None, partial=("a", "b", "c")), P("a", "b")),
    ({"a": 2, "b": 2, "c": 2}, (9, 5, 7), P("a", "b", "c"), P(None, None, None, partial="a")),
    ({"a": 2, "b": 2, "c": 2}, (64, 128, 256), P(("a", "b", "c"), None, None), P("c", "b", "a")),
]

CACHED_REPEATS = 20000
UNCACHED_REPEATS = 30
COLD_REPEATS = 10
BATCH = 100


def _median_us(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def _clear_plans() -> None:
    _planner._CACHE.clear()


def _clear_all() -> None:
    _planner._CACHE.clear()
    _planner._placements.cache_clear()
    _planner._refines.cache_clear()


def main() -> None:
    print("# python benchmarks/planner.py")
    print(f"# torch {torch.__version__}, python {sys.version.split()[0]}, medians over repeats")
    print(
        f"# cached: {CACHED_REPEATS} lookups per row (goal < 5 us); uncached: {UNCACHED_REPEATS} "
        f"plans, plan cache cleared; cold: {COLD_REPEATS} plans, lru caches cleared too"
    )
    print("# goal: uncached < 5 ms on 3 axes (DTensor's optimal planner: ~19 ms)")
    header = (
        f"{'mesh':<26} {'shape':<14} {'src -> dst':<58} {'steps':>5} "
        f"{'cached us':>10} {'uncached ms':>12} {'cold ms':>9}"
    )
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    worst: dict[int, float] = {}
    for axes, shape, src, dst in CASES:
        mesh = sl.Mesh.simulated(axes)

        def run(src=src, dst=dst, shape=shape, mesh=mesh):
            return sl.plan(src, dst, shape, mesh, torch.float32)

        cold = _median_us(run, COLD_REPEATS, _clear_all) / 1e3
        uncached = _median_us(run, UNCACHED_REPEATS, _clear_plans) / 1e3
        n_steps = len(run().steps)
        # Time BATCH lookups per sample so the timer's own cost does not dominate.
        cached = _median_us(lambda: [run() for _ in range(BATCH)], CACHED_REPEATS // BATCH) / BATCH
        worst[len(axes)] = max(worst.get(len(axes), 0.0), uncached)
        print(
            f"{str(axes):<26} {str(shape):<14} {f'{src!r} -> {dst!r}':<58} {n_steps:>5} "
            f"{cached:>10.2f} {uncached:>12.3f} {cold:>9.3f}"
        )
    print("-" * len(header))
    for n_axes, ms in sorted(worst.items()):
        goal = f"  (goal < 5 ms: {'met' if ms < 5 else 'MISSED'})" if n_axes == 3 else ""
        print(f"worst uncached plan on {n_axes} axes: {ms:.3f} ms{goal}")
    print(f"total benchmark time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
