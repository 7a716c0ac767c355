"""The planner against an independent brute-force search over the same step table.

Covers `sl.plan` (tier 1, pure data, no tensors):

- optimality: for every (src, dst) pair of layouts on the meshes {a:2, b:2}
  and {a:3, b:2} with 2-D shapes (even and uneven, with partial sources and
  sum/avg/max/min partial destinations), and for hypothesis-sampled pairs on
  {a:2, b:2, c:2} with 1-3-D shapes, the plan's total bytes equal the least
  total bytes found by Bellman-Ford over every layout state of the mesh;
- validity: every returned plan applies step by step from src to dst, each
  step is one the brute force allows (aligned, in the table) and its bytes
  equal the brute force's cost formula;
- the worked figures of DESIGN.md §4 (4096x4096 float32, bytes per device);
- caching (same object for the same key) and determinism (same plan after a
  cache clear and in a fresh interpreter with another hash seed).

Tolerances: none. Byte counts are integers and must match exactly.

The brute force below shares no code with `shardlib.layouts._planner`: it
derives device blocks from its own chunk rule, decides alignment by checking
every device's new block against what its group holds, prices each step from
the table in the planner's module docstring, and searches with Bellman-Ford
(not Dijkstra). It is deliberately more permissive than the planner where the
table allows it: `to_partial` may make ANY replicated axes partial with any
reduce op (the planner only makes the destination's partial axes partial, with
the destination's op), and `ppermute` may target any layout whose blocks are a
permutation of the source's. Equal minima show the planner's restrictions lose
nothing.

Environment: ``SHARDLIB_HYPOTHESIS_CASES`` sets the number of sampled pairs
(default 200).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib.layouts import (
    AllGather,
    AllReduce,
    AllToAll,
    PPermute,
    ReduceScatter,
    Slice,
    ToPartial,
    _planner,
)

P = sl.P
MiB = 2**20
CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", "200"))


# == The brute force ===========================================================
# A state is ``(dims, partial, op)``: per tensor dim the tuple of mesh axes it
# is split over (major -> minor), the sorted tuple of partial axes, and the
# reduce op ("sum" when nothing is partial).


def chunk(n: int, k: int, c: int) -> tuple[int, int]:
    """Chunk c of n items cut into k pieces: s = ceil(n/k), [min(n, c*s), min(n, (c+1)*s))."""
    s = (n + k - 1) // k
    return min(n, c * s), min(n, (c + 1) * s)


def volume(box) -> int:
    return math.prod(hi - lo for lo, hi in box)


def overlap(a, b) -> int:
    """Number of elements two boxes share."""
    v = 1
    for (alo, ahi), (blo, bhi) in zip(a, b):
        v *= max(0, min(ahi, bhi) - max(alo, blo))
    return v


def covered(iv: tuple[int, int], ivs) -> bool:
    """Whether interval `iv` lies inside the union of intervals `ivs`."""
    lo, hi = iv
    if hi <= lo:
        return True
    reach = lo
    for a, b in sorted(ivs):
        if b <= a:
            continue
        if a > reach:
            break
        reach = max(reach, b)
        if reach >= hi:
            return True
    return False


class BruteForce:
    """Every layout state of one (mesh, shape, itemsize, reduce ops), every step, every cost."""

    def __init__(self, axes: dict[str, int], shape: tuple[int, ...], itemsize: int, ops):
        self.names = tuple(axes)
        self.size = dict(axes)
        self.shape = shape
        self.itemsize = itemsize
        self.ops = tuple(ops)
        # Row-major devices: the first axis is the major one.
        self.coords = [
            dict(zip(self.names, c))
            for c in itertools.product(*(range(axes[a]) for a in self.names))
        ]
        self.devices = range(len(self.coords))
        self._blocks: dict = {}
        self._groups: dict = {}
        self.states = self._enumerate_states()
        self.edges = {s: self._steps(s) for s in self.states}

    # -- geometry --------------------------------------------------------------
    def k(self, axes) -> int:
        return math.prod(self.size[a] for a in axes)

    def blocks(self, dims) -> tuple:
        """Per device, the global box (one interval per dim) it holds under `dims`."""
        if dims not in self._blocks:
            out = []
            for c in self.coords:
                box = []
                for n, axes in zip(self.shape, dims):
                    idx = 0
                    for a in axes:  # flat chunk index, first axis major
                        idx = idx * self.size[a] + c[a]
                    box.append(chunk(n, self.k(axes), idx))
                out.append(tuple(box))
            self._blocks[dims] = tuple(out)
        return self._blocks[dims]

    def largest(self, dims) -> int:
        return max(volume(b) for b in self.blocks(dims))

    def group(self, dev: int, axes) -> tuple[int, ...]:
        """Devices equal to `dev` on every axis outside `axes`."""
        key = (dev, frozenset(axes))
        if key not in self._groups:
            me = self.coords[dev]
            self._groups[key] = tuple(
                d
                for d, c in enumerate(self.coords)
                if all(c[a] == me[a] for a in self.names if a not in axes)
            )
        return self._groups[key]

    def aligned(self, old_dims, new_dims, axes) -> bool:
        """Every device's new block lies inside what its group (over `axes`) holds before."""
        # Group members differ only on `axes`, so their boxes differ only in dims split
        # over one of them; with at most one such dim, a per-dim cover is exact.
        assert sum(bool(set(a) & set(axes)) for a in old_dims) <= 1
        changed = [d for d in range(len(self.shape)) if old_dims[d] != new_dims[d]]
        old, new = self.blocks(old_dims), self.blocks(new_dims)
        for dev in self.devices:
            group = self.group(dev, axes)
            for d in changed:
                if not covered(new[dev][d], [old[m][d] for m in group]):
                    return False
        return True

    # -- states ----------------------------------------------------------------
    def _enumerate_states(self) -> list:
        ndim = len(self.shape)
        states = []
        for where in itertools.product(["unused", "partial", *range(ndim)], repeat=len(self.names)):
            partial = tuple(sorted(a for a, w in zip(self.names, where) if w == "partial"))
            per_dim = [[a for a, w in zip(self.names, where) if w == d] for d in range(ndim)]
            for dims in itertools.product(*(itertools.permutations(p) for p in per_dim)):
                for op in self.ops if partial else ("sum",):
                    states.append((tuple(dims), partial, op))
        assert len(set(states)) == len(states)
        return states

    def replicated(self, state) -> tuple[str, ...]:
        dims, partial, _ = state
        used = {a for axes in dims for a in axes} | set(partial)
        return tuple(a for a in self.names if a not in used)

    def _ppermute_signature(self, state):
        """Blocks held per partial coordinate, as a multiset: equal for states a permutation links."""
        dims, partial, op = state
        held = sorted(
            (tuple(self.coords[d][a] for a in partial), b) for d, b in enumerate(self.blocks(dims))
        )
        return partial, op, tuple(held)

    # -- steps -----------------------------------------------------------------
    def _steps(self, state) -> dict:
        """label -> (next state, bytes) for every step the table allows from `state`."""
        dims, partial, op = state
        out = {}
        item = self.itemsize
        rep = self.replicated(state)

        def set_dim(ds, d, axes):
            return ds[:d] + (tuple(axes),) + ds[d + 1 :]

        def ordered_subsets(axes):
            for r in range(1, len(axes) + 1):
                yield from itertools.permutations(axes, r)

        for d, cur in enumerate(dims):
            # slice: replicated axes become the minor-most split of d; free.
            for seq in ordered_subsets(rep):
                nd = set_dim(dims, d, cur + seq)
                if self.aligned(dims, nd, seq):
                    out[("slice", seq, d)] = ((nd, partial, op), 0)
            for i in range(len(cur)):
                suffix, keep = cur[i:], cur[:i]
                k = self.k(suffix)
                nd = set_dim(dims, d, keep)
                # all_gather: (k-1) * largest source block.
                if self.aligned(dims, nd, suffix):
                    cost = (k - 1) * self.largest(dims) * item
                    out[("all_gather", suffix, d)] = ((nd, partial, op), cost)
                # all_to_all: (k-1) * largest piece one device sends one peer.
                for d2 in range(len(dims)):
                    if d2 == d:
                        continue
                    nd2 = set_dim(nd, d2, nd[d2] + suffix)
                    if not self.aligned(dims, nd2, suffix):
                        continue
                    old, new = self.blocks(dims), self.blocks(nd2)
                    piece = max(
                        overlap(old[dev], new[peer])
                        for dev in self.devices
                        for peer in self.group(dev, suffix)
                    )
                    out[("all_to_all", suffix, d, d2)] = (
                        (nd2, partial, op),
                        (k - 1) * piece * item,
                    )
            # reduce_scatter: partial axes become the minor-most split of d; (k-1) * largest dst block.
            for seq in ordered_subsets(partial):
                nd = set_dim(dims, d, cur + seq)
                if self.aligned(dims, nd, seq):
                    rest = tuple(a for a in partial if a not in seq)
                    cost = (self.k(seq) - 1) * self.largest(nd) * item
                    out[("reduce_scatter", seq, d)] = ((nd, rest, op if rest else "sum"), cost)
        # all_reduce: partial axes become replicated; 2 (k-1) ceil(B/k).
        for r in range(1, len(partial) + 1):
            for sub in itertools.combinations(partial, r):
                rest = tuple(a for a in partial if a not in sub)
                k = self.k(sub)
                cost = 2 * (k - 1) * -(-self.largest(dims) // k) * item
                out[("all_reduce", frozenset(sub))] = ((dims, rest, op if rest else "sum"), cost)
        # to_partial: ANY replicated axes, any op when nothing is partial yet; free.
        for r in range(1, len(rep) + 1):
            for sub in itertools.combinations(rep, r):
                new = tuple(sorted(partial + sub))
                for new_op in (op,) if partial else self.ops:
                    out[("to_partial", frozenset(sub), new_op)] = ((dims, new, new_op), 0)
        return out

    def add_ppermutes(self) -> None:
        """ppermute: same blocks per partial coordinate, moved between devices; local buffer."""
        by_sig: dict = {}
        for s in self.states:
            by_sig.setdefault(self._ppermute_signature(s), []).append(s)
        for group in by_sig.values():
            for s, t in itertools.permutations(group, 2):
                self.edges[s][("ppermute", t)] = (t, self.largest(s[0]) * self.itemsize)

    # -- search ----------------------------------------------------------------
    def distances(self, src) -> dict:
        """Least total bytes from `src` to every state (Bellman-Ford)."""
        edges = [(u, v, c) for u, out in self.edges.items() for v, c in out.values()]
        dist = dict.fromkeys(self.states, math.inf)
        dist[src] = 0
        for _ in range(len(self.states) - 1):
            changed = False
            for u, v, c in edges:
                if dist[u] + c < dist[v]:
                    dist[v] = dist[u] + c
                    changed = True
            if not changed:
                break
        return dist


@lru_cache(maxsize=64)
def brute_force(axes_items: tuple, shape: tuple[int, ...], itemsize: int, ops: tuple) -> BruteForce:
    bf = BruteForce(dict(axes_items), shape, itemsize, ops)
    bf.add_ppermutes()
    return bf


@lru_cache(maxsize=4096)
def distances(axes_items: tuple, shape: tuple[int, ...], itemsize: int, ops: tuple, src) -> dict:
    return brute_force(axes_items, shape, itemsize, ops).distances(src)


def to_layout(state) -> sl.Layout:
    dims, partial, op = state
    spec = [None if not axes else axes[0] if len(axes) == 1 else axes for axes in dims]
    return P(*spec, partial={a: op for a in partial} or None)


def to_state(layout: sl.Layout):
    return (layout.dims, tuple(sorted(layout.partial)), layout.reduce_op)


def label(step):
    """The brute force's name for one of the planner's steps."""
    if isinstance(step, Slice):
        return ("slice", step.axes, step.dim)
    if isinstance(step, AllGather):
        return ("all_gather", step.axes, step.dim)
    if isinstance(step, AllToAll):
        return ("all_to_all", step.axes, step.from_dim, step.to_dim)
    if isinstance(step, ReduceScatter):
        return ("reduce_scatter", step.axes, step.dim)
    if isinstance(step, AllReduce):
        return ("all_reduce", frozenset(step.axes))
    if isinstance(step, ToPartial):
        return ("to_partial", frozenset(step.axes), step.op)
    if isinstance(step, PPermute):
        return ("ppermute", to_state(step.layout))
    raise AssertionError(f"unknown step {step!r}")


def check_pair(axes: dict, shape, src, dst, ops, itemsize: int = 4) -> str | None:
    """None when the plan for src -> dst is valid and optimal, else what is wrong."""
    key = tuple(axes.items())
    bf = brute_force(key, shape, itemsize, ops)
    best = distances(key, shape, itemsize, ops, src)[dst]
    mesh = sl.Mesh.simulated(axes)
    src_l, dst_l = to_layout(src), to_layout(dst)
    p = sl.plan(src_l, dst_l, shape, mesh, itemsize)
    where = f"{src_l!r} -> {dst_l!r} shape={shape} mesh={axes}"
    if p.total_bytes != best:
        return f"{where}: plan costs {p.total_bytes} B, brute force finds {best} B\n{p}"
    cur = src
    for i, s in enumerate(p.steps):
        lab = label(s.step)
        if to_state(s.src) != cur:
            return f"{where}: step {i} starts at {s.src}, expected {to_layout(cur)}\n{p}"
        if lab not in bf.edges[cur]:
            return f"{where}: step {i} {s.step} is not an aligned step of the table\n{p}"
        nxt, cost = bf.edges[cur][lab]
        if to_state(s.dst) != nxt or s.bytes != cost:
            return (
                f"{where}: step {i} {s.step} gives {s.dst} for {s.bytes} B, "
                f"brute force gives {to_layout(nxt)} for {cost} B\n{p}"
            )
        cur = nxt
    if cur != dst:
        return f"{where}: plan ends at {to_layout(cur)}\n{p}"
    return None


def steps(p) -> list[str]:
    return [type(s.step).__name__ for s in p.steps]


# == Every pair on two-axis meshes =============================================
ALL_OPS = ("sum", "avg", "max", "min")


def _assert_every_pair_optimal(axes: dict, shape: tuple[int, ...], ops: tuple[str, ...]) -> None:
    bf = brute_force(tuple(axes.items()), shape, 4, ops)
    failures = []
    for src, dst in itertools.product(bf.states, repeat=2):
        problem = check_pair(axes, shape, src, dst, ops)
        if problem:
            failures.append(problem)
    assert not failures, f"{len(failures)} of {len(bf.states) ** 2} pairs fail:\n" + "\n".join(
        failures[:5]
    )


@pytest.mark.parametrize("axes", [{"a": 2, "b": 2}, {"a": 3, "b": 2}], ids=["2x2", "3x2"])
@pytest.mark.parametrize("shape", [(10, 5), (9, 5), (3, 5), (1, 7), (12, 12), (4096, 4096)])
def test_every_pair_is_optimal_on_two_axes(axes, shape):
    _assert_every_pair_optimal(axes, shape, ALL_OPS)


def test_brute_force_sees_the_uneven_detour():
    """n=10 on 2x2: dropping the minor axis of ("a", "b") is not aligned; the detour costs more."""
    axes = {"a": 2, "b": 2}
    bf = brute_force(tuple(axes.items()), (10, 5), 4, ("sum",))
    src = ((("a", "b"), ()), (), "sum")
    assert ("all_gather", ("b",), 0) not in bf.edges[src]
    assert ("all_gather", ("a", "b"), 0) in bf.edges[src]
    even = brute_force(tuple(axes.items()), (12, 5), 4, ("sum",))
    assert ("all_gather", ("b",), 0) in even.edges[src]
    assert check_pair(axes, (10, 5), src, ((("a",), ()), (), "sum"), ("sum",)) is None


def test_to_partial_on_an_axis_the_destination_does_not_reduce():
    """Regression: making a replicated axis partial can beat an all_reduce.

    P(partial="b") -> P(("a", "b")) with n=10 on 2x2: all_reduce(b) then a slice
    costs 2 * ceil(50/2) * 4 = 200 B; to_partial(a) then one reduce_scatter over
    (a, b) costs 3 * (3*5) * 4 = 180 B. The planner used to offer to_partial only
    on the destination's partial axes and returned the 200 B plan.
    """
    axes = {"a": 2, "b": 2}
    mesh = sl.Mesh.simulated(axes)
    for op in ALL_OPS:
        p = sl.plan(P(None, None, partial={"b": op}), P(("a", "b"), None), (10, 5), mesh, 4)
        assert steps(p) == ["ToPartial", "ReduceScatter"] and p.total_bytes == 180
    bf = brute_force(tuple(axes.items()), (10, 5), 4, ALL_OPS)
    start = (((), ()), ("b",), "max")
    assert ("to_partial", frozenset({"a"}), "max") in bf.edges[start]
    assert ("to_partial", frozenset({"a"}), "sum") not in bf.edges[start]  # ops never mix
    assert check_pair(axes, (10, 5), start, ((("a", "b"), ()), (), "sum"), ALL_OPS) is None


# == Sampled pairs on three axes ===============================================
AXES3 = {"a": 2, "b": 2, "c": 2}
OPS3 = ("sum", "max")
SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16]


@lru_cache(maxsize=4)
def states3(ndim: int) -> list:
    return brute_force(tuple(AXES3.items()), (1,) * ndim, 4, OPS3).states


@st.composite
def three_axis_pairs(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.sampled_from(SIZES)) for _ in range(ndim))
    states = states3(ndim)
    return shape, draw(st.sampled_from(states)), draw(st.sampled_from(states))


@settings(
    max_examples=CASES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(three_axis_pairs())
def test_sampled_pairs_are_optimal_on_three_axes(case):
    shape, src, dst = case
    assert check_pair(AXES3, shape, src, dst, OPS3) is None


# == Worked figures (DESIGN.md §4) =============================================
N = (4096, 4096)


def test_figures_on_one_axis():
    mesh = sl.Mesh.simulated({"x": 4})
    p = sl.plan(P("x", None), P(None, "x"), N, mesh, torch.float32)
    assert steps(p) == ["AllToAll"] and p.total_bytes == 12 * MiB
    p = sl.plan(P("x", None), P(None, None), N, mesh, torch.float32)
    assert steps(p) == ["AllGather"] and p.total_bytes == 48 * MiB
    p = sl.plan(P(None, None, partial="x"), P("x", None), N, mesh, torch.float32)
    assert steps(p) == ["ReduceScatter"] and p.total_bytes == 48 * MiB
    p = sl.plan(P(None, None), P("x", None), N, mesh, torch.float32)
    assert p.total_bytes == 0 and steps(p) == ["Slice"]


def test_figures_on_two_axes():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    assert sl.plan(P("a", "b"), P("b", "a"), N, mesh, torch.float32).total_bytes <= 16 * MiB
    p = sl.plan(P(None, None, partial=("a", "b")), P(None, None), N, mesh, torch.float32)
    assert p.total_bytes <= 96 * MiB
    p = sl.plan(P(("a", "b"), None), P(None, ("a", "b")), N, mesh, torch.float32)
    assert steps(p) == ["AllToAll"] and p.steps[0].step.axes == ("a", "b")
    assert p.total_bytes == 12 * MiB


def test_reduce_before_gather_and_no_gather_then_slice():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    p = sl.plan(P(None, None, partial="a"), P("a", None), N, mesh, torch.float32)
    assert steps(p) == ["ReduceScatter"]
    p = sl.plan(P("a", None), P(None, "a"), N, mesh, torch.float32)
    assert "AllGather" not in steps(p)


# == Cache and determinism =====================================================
def test_plans_are_cached_by_key():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    p1 = sl.plan(P("a", "b"), P(None, ("b", "a")), (9, 5), mesh, torch.float32)
    p2 = sl.plan(
        P("a", "b"), P(None, ("b", "a")), (9, 5), sl.Mesh.simulated({"a": 2, "b": 2}), torch.float32
    )
    assert p1 is p2
    assert sl.plan(P("a", "b"), P(None, ("b", "a")), (9, 5), mesh, torch.float16) is not p1
    assert sl.plan(P("a", "b"), P(None, ("b", "a")), (9, 6), mesh, torch.float32) is not p1
    other = sl.Mesh.simulated({"a": 2, "b": 3})
    assert sl.plan(P("a", "b"), P(None, ("b", "a")), (9, 5), other, torch.float32).mesh != p1.mesh


PAIRS = [
    (P("a", "b", None), P(None, ("b", "a"), "c")),
    (P(None, None, None, partial=("a", "c")), P("c", "b", None)),
    (P(("a", "b", "c"), None, None), P(None, None, ("c", "a"), partial={"b": "max"})),
    (P("c", None, "a", partial="b"), P("a", "c", None)),
]


def test_plans_are_deterministic():
    mesh = sl.Mesh.simulated(AXES3)
    first = [str(sl.plan(s, d, (9, 5, 7), mesh, torch.float32)) for s, d in PAIRS]
    _planner._CACHE.clear()
    again = [str(sl.plan(s, d, (9, 5, 7), mesh, torch.float32)) for s, d in PAIRS]
    assert first == again
    code = (
        "import shardlib as sl, torch\n"
        "from shardlib import P\n"
        f"mesh = sl.Mesh.simulated({AXES3!r})\n"
        f"for s, d in [{', '.join(f'({s!r}, {d!r})' for s, d in PAIRS)}]:\n"
        "    print(sl.plan(s, d, (9, 5, 7), mesh, torch.float32))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout == "".join(f"{s}\n" for s in first)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(9, 5), (6, 4)])
def test_every_pair_is_optimal_on_three_axes(shape):
    """Exhaustive on {a:2, b:2, c:2} for 2-D shapes (about 18k pairs each; slow tier)."""
    _assert_every_pair_optimal(AXES3, shape, OPS3)
