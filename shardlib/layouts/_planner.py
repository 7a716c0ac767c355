"""The redistribution planner: the cheapest sequence of collectives between two layouts.

Owns the step table, the byte cost of each step, and a shortest-path search
over layout states. Pure: no tensors, no `torch.distributed`; executing a plan
is `shardlib.collectives._redistribute`'s job.

Step table (k = product of the sizes of the step's axes; bytes are what the
busiest device sends, ring model, uneven chunks padded to the largest; B is
the largest local buffer of the source layout):

====================================  =====================================================  ========================
step                                  effect                                                 bytes
====================================  =====================================================  ========================
``Slice(axes, dim)``                  replicated axes become the minor-most split of `dim`   0
``AllGather(axes, dim)``              the minor-most split axes of `dim` become replicated   (k-1) * largest src chunk
``ReduceScatter(axes, dim)``          partial axes become the minor-most split of `dim`      (k-1) * largest dst chunk
``AllReduce(axes)``                   partial axes become replicated                         2 (k-1) * ceil(B/k)
``AllToAll(axes, from_dim, to_dim)``  minor-most axes of one dim move to minor of another    (k-1) * largest piece
``PPermute(layout)``                  same local shapes, blocks move between devices         B
``ToPartial(axes, op)``               replicated axes become partial (no data moves)         0
====================================  =====================================================  ========================

A step over several axes is one collective over their combined group (ranks in
flat order of `axes`, major -> minor).

Uneven sizes: a step is offered only when it is *aligned*: every device's new
block lies inside what its group holds before the step. With ``n = 10`` on a
2x2 split, dropping the minor axis of ``("a", "b")`` is not aligned (device
``a=1`` would need row 5, which sits in the other ``a`` group), so the search
reaches ``P("a")`` through a gather of both axes and a slice instead; the
bytes of that detour are what the plan reports.

The search is A* (Dijkstra with a consistent lower bound) over layouts with path cost ``(bytes, number of steps,
step keys)``: least bytes, then fewest steps, then a fixed canonical order, so
plans are deterministic. `plan` caches by ``(src, dst, shape, mesh, dtype)``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .._errors import LayoutError
from .._format import dtype_name, format_bytes
from ._layout import Layout
from ._mesh import AbstractMesh, Mesh
from ._shard import chunk_bounds, max_chunk, max_local_numel

__all__ = [
    "AllGather",
    "AllReduce",
    "AllToAll",
    "PPermute",
    "Plan",
    "PlanStep",
    "ReduceScatter",
    "Slice",
    "ToPartial",
    "plan",
    "step_bytes",
]


# == Steps =====================================================================
@dataclass(frozen=True, slots=True)
class Slice:
    axes: tuple[str, ...]
    dim: int
    kind = None

    def apply(self, src: Layout) -> Layout:
        return src.with_dim(self.dim, src.dims[self.dim] + self.axes)

    def __str__(self) -> str:
        return f"slice({','.join(self.axes)} -> dim {self.dim})"


@dataclass(frozen=True, slots=True)
class AllGather:
    axes: tuple[str, ...]
    dim: int
    kind = "all_gather"

    def apply(self, src: Layout) -> Layout:
        return src.with_dim(self.dim, src.dims[self.dim][: -len(self.axes)])

    def __str__(self) -> str:
        return f"all_gather({','.join(self.axes)}, dim {self.dim})"


@dataclass(frozen=True, slots=True)
class ReduceScatter:
    axes: tuple[str, ...]
    dim: int
    kind = "reduce_scatter"

    def apply(self, src: Layout) -> Layout:
        rest = tuple(a for a in src.partial if a not in self.axes)
        return Layout(
            tuple(a + self.axes if d == self.dim else a for d, a in enumerate(src.dims)),
            rest,
            src.reduce_op,
        )

    def __str__(self) -> str:
        return f"reduce_scatter({','.join(self.axes)} -> dim {self.dim})"


@dataclass(frozen=True, slots=True)
class AllReduce:
    axes: tuple[str, ...]
    kind = "all_reduce"

    def apply(self, src: Layout) -> Layout:
        rest = tuple(a for a in src.partial if a not in self.axes)
        return Layout(src.dims, rest, src.reduce_op)

    def __str__(self) -> str:
        return f"all_reduce({','.join(self.axes)})"


@dataclass(frozen=True, slots=True)
class AllToAll:
    axes: tuple[str, ...]
    from_dim: int
    to_dim: int
    kind = "all_to_all"

    def apply(self, src: Layout) -> Layout:
        mid = src.with_dim(self.from_dim, src.dims[self.from_dim][: -len(self.axes)])
        return mid.with_dim(self.to_dim, mid.dims[self.to_dim] + self.axes)

    def __str__(self) -> str:
        return f"all_to_all({','.join(self.axes)}, dim {self.from_dim} -> dim {self.to_dim})"


@dataclass(frozen=True, slots=True)
class PPermute:
    """Move whole blocks between devices so the placement becomes `layout`.

    Stores the destination as raw fields (the planner creates many of these).
    """

    dims: tuple[tuple[str, ...], ...]
    partial: tuple[str, ...] = ()
    reduce_op: str = "sum"
    kind = "ppermute"

    @property
    def axes(self) -> tuple[str, ...]:
        return ()

    @property
    def layout(self) -> Layout:
        return Layout(self.dims, self.partial, self.reduce_op)

    def apply(self, src: Layout) -> Layout:
        return self.layout

    def __str__(self) -> str:
        return f"ppermute(-> {self.layout})"


@dataclass(frozen=True, slots=True)
class ToPartial:
    axes: tuple[str, ...]
    op: str = "sum"
    kind = None

    def apply(self, src: Layout) -> Layout:
        return Layout(src.dims, src.partial + self.axes, self.op)

    def __str__(self) -> str:
        return f"to_partial({','.join(self.axes)}, {self.op})"


Step = Slice | AllGather | ReduceScatter | AllReduce | AllToAll | PPermute | ToPartial
_ORDER = {Slice: 0, ToPartial: 1, AllToAll: 2, ReduceScatter: 3, AllGather: 4, AllReduce: 5}


def _step_key(step: Step) -> tuple:
    if isinstance(step, PPermute):
        return (6, step.dims)
    return (_ORDER[type(step)], *(getattr(step, f) for f in step.__dataclass_fields__))


# == Costs =====================================================================
def step_bytes(
    step: Step, src: Layout, shape: tuple[int, ...], mesh: AbstractMesh, itemsize: int
) -> int:
    """Bytes the busiest device sends for `step` applied to `src` (see the module table)."""
    if isinstance(step, Slice | ToPartial):
        return 0
    dst = step.apply(src)
    if isinstance(step, PPermute):
        return max_local_numel(shape, src, mesh) * itemsize
    k = mesh.group_size(step.axes)
    if isinstance(step, AllGather):
        return (k - 1) * max_local_numel(shape, src, mesh) * itemsize
    if isinstance(step, ReduceScatter):
        return (k - 1) * max_local_numel(shape, dst, mesh) * itemsize
    if isinstance(step, AllReduce):
        return 2 * (k - 1) * -(-max_local_numel(shape, src, mesh) // k) * itemsize
    # AllToAll: a piece is the source block cut along to_dim as the destination cuts it.
    piece = 1
    for d, n in enumerate(shape):
        layout = dst if d == step.to_dim else src
        piece *= max_chunk(n, mesh.group_size(layout.dims[d]))
    return (k - 1) * piece * itemsize


# == Alignment (uneven sizes) ==================================================
@lru_cache(maxsize=65536)
def _refines(n: int, k_major: int, k_minor: int) -> bool:
    """Whether cutting each of `k_major` chunks of n into `k_minor` stays inside it."""
    if n == 0 or k_minor == 1:
        return True
    for m in range(k_major):
        lo, hi = chunk_bounds(n, k_major, m)
        for j in range(k_minor):
            clo, chi = chunk_bounds(n, k_major * k_minor, m * k_minor + j)
            if chi > clo and (clo < lo or chi > hi):
                return False
    return True


# == Search ====================================================================
@lru_cache(maxsize=1024)
def _placements(mesh: AbstractMesh, ndim: int, axes: tuple[str, ...]) -> dict:
    """All per-dim axis assignments of `axes` (each axis on one dim or unused), by split sizes."""
    out: dict[tuple[int, ...], list[tuple[tuple[str, ...], ...]]] = {}

    def rec(i: int, dims: list[list[str]]) -> None:
        if i == len(axes):
            for perm in itertools.product(*(itertools.permutations(d) for d in dims)):
                sig = tuple(mesh.group_size(p) for p in perm)
                out.setdefault(sig, []).append(tuple(perm))
            return
        rec(i + 1, dims)
        for d in range(ndim):
            dims[d].append(axes[i])
            rec(i + 1, dims)
            dims[d].pop()

    rec(0, [[] for _ in range(ndim)])
    return out


def _ordered_subsets(axes: tuple[str, ...]):
    for r in range(1, len(axes) + 1):
        yield from itertools.permutations(axes, r)


class _Search:
    """Dijkstra over raw states ``(dims, partial, op)``; byte costs mirror `step_bytes`."""

    def __init__(self, dst: Layout, shape: tuple[int, ...], mesh: AbstractMesh, itemsize: int):
        self.dst, self.shape, self.mesh, self.itemsize = dst, shape, mesh, itemsize
        self.size = dict(zip(mesh.axis_names, mesh.shape))
        self._k: dict[tuple[str, ...], int] = {}
        self._numel: dict[tuple, int] = {}

    def k(self, axes: tuple[str, ...]) -> int:
        try:
            return self._k[axes]
        except KeyError:
            v = self._k[axes] = math.prod(self.size[a] for a in axes)
            return v

    def numel(self, dims: tuple) -> int:
        try:
            return self._numel[dims]
        except KeyError:
            v = math.prod(max_chunk(n, self.k(a)) for n, a in zip(self.shape, dims))
            self._numel[dims] = v
            return v

    def aligned(self, n: int, major: tuple[str, ...], minor: tuple[str, ...]) -> bool:
        return _refines(n, self.k(major), self.k(minor))

    def neighbors(self, dims: tuple, partial: tuple[str, ...], op: str):
        """Yield ``(step, next_state, bytes)`` for every aligned step from a state."""
        item, shape, k = self.itemsize, self.shape, self.k
        used = {a for axes in dims for a in axes} | set(partial)
        replicated = tuple(a for a in self.mesh.axis_names if a not in used)
        numel = self.numel(dims)
        for d, n in enumerate(shape):
            cur = dims[d]
            for seq in _ordered_subsets(replicated):
                if self.aligned(n, cur, seq):
                    nd = dims[:d] + (cur + seq,) + dims[d + 1 :]
                    yield Slice(seq, d), (nd, partial, op), 0
            for i in range(len(cur)):
                suffix, keep = cur[i:], cur[:i]
                if not self.aligned(n, keep, suffix):
                    continue
                gk = k(suffix)
                nd = dims[:d] + (keep,) + dims[d + 1 :]
                yield AllGather(suffix, d), (nd, partial, op), (gk - 1) * numel * item
                for d2, n2 in enumerate(shape):
                    if d2 != d and self.aligned(n2, nd[d2], suffix):
                        nd2 = nd[:d2] + (nd[d2] + suffix,) + nd[d2 + 1 :]
                        piece = self._piece(dims, nd2, d2)
                        yield AllToAll(suffix, d, d2), (nd2, partial, op), (gk - 1) * piece * item
            for seq in _ordered_subsets(partial):
                if self.aligned(n, cur, seq):
                    nd = dims[:d] + (cur + seq,) + dims[d + 1 :]
                    rest = tuple(a for a in partial if a not in seq)
                    cost = (k(seq) - 1) * self.numel(nd) * item
                    yield ReduceScatter(seq, d), (nd, rest, op if rest else "sum"), cost
        for r in range(1, len(partial) + 1):
            for sub in itertools.combinations(partial, r):
                rest = tuple(a for a in partial if a not in sub)
                gk = k(sub)
                cost = 2 * (gk - 1) * -(-numel // gk) * item
                yield AllReduce(sub), (dims, rest, op if rest else "sum"), cost
        # Any replicated axes, not only the destination's partial ones: making an
        # extra axis partial lets one reduce_scatter over the combined group replace
        # an all_reduce (P(partial="b") -> P(("a", "b")) with n=10 on 2x2: 180 B, not
        # 200 B). The op is the state's, or the destination's when nothing is partial.
        to_op = op if partial else self.dst.reduce_op
        for r in range(1, len(replicated) + 1):
            for sub in itertools.combinations(replicated, r):
                new = tuple(sorted(partial + sub))
                yield ToPartial(sub, to_op), (dims, new, to_op), 0
        free = tuple(a for a in self.mesh.axis_names if a not in partial)
        sig = tuple(k(a) for a in dims)
        for other in _placements(self.mesh, len(shape), free).get(sig, ()):
            if other != dims:
                yield PPermute(other, partial, op), (other, partial, op), numel * item

    def _piece(self, src_dims: tuple, dst_dims: tuple, to_dim: int) -> int:
        piece = 1
        for d, n in enumerate(self.shape):
            piece *= max_chunk(n, self.k((dst_dims if d == to_dim else src_dims)[d]))
        return piece

    def lower_bound(self, dims: tuple, partial: tuple[str, ...], op: str) -> int:
        """A consistent lower bound on the bytes still needed to reach the destination (A*).

        Three facts, with q = numel * itemsize / devices:
        - every reduction over axes S costs at least (|S| - 1) q, so partial
          axes the destination does not keep cost at least sum(|a| - 1) q;
        - no step grows the largest local block by more than it sends (a
          gather of k sends (k-1) B and grows B to at most k B; all-to-all
          likewise; the others never grow it), so reaching a bigger
          destination block costs at least the growth;
        - a split axis (|a| > 1) not where the destination wants it moves
          only by a gather (>= q), an all-to-all (>= q/2) or a permute (>= q).
        Reductions never grow blocks or move split axes, and gathers,
        all-to-alls and permutes never reduce, so the first bound adds to the
        larger of the other two. Zero-cost steps never lower any of them.
        """
        q = self.q
        dst = self.dst
        h = 0
        if partial:
            keep = set(dst.partial) if op == dst.reduce_op else set()
            h = q * sum(self.size[a] - 1 for a in partial if a not in keep)
        growth = self.dst_block - self.numel(dims) * self.itemsize
        for axes, target in zip(dims, dst.dims):
            for i, a in enumerate(axes):
                if self.size[a] > 1 and axes[: i + 1] != target[: i + 1]:
                    return h + max(growth, q // 2)
        return h + max(growth, 0)

    def run(self, src: Layout) -> tuple[Step, ...]:
        """A* with `lower_bound`: Dijkstra on reduced costs, so the same plan and tie-breaks."""
        start = (src.dims, src.partial, src.reduce_op)
        goal = (self.dst.dims, self.dst.partial, self.dst.reduce_op)
        self.q = math.prod(self.shape) * self.itemsize // self.mesh.size
        self.dst_block = self.numel(self.dst.dims) * self.itemsize
        h = self.lower_bound
        best: dict[tuple, tuple] = {start: (0, 0, ())}
        heap: list = [(h(*start), 0, (), 0, 0, start, ())]
        tie = itertools.count(1)
        inf = (math.inf,)
        while heap:
            _, nsteps, keys, _, cost, state, path = heapq.heappop(heap)
            if state == goal:
                return path
            if best.get(state, inf) < (cost, nsteps, keys):
                continue
            for step, nxt, c in self.neighbors(*state):
                new = (cost + c, nsteps + 1)
                old = best.get(nxt, inf)
                if new > old[:2]:
                    continue
                full = (*new, (*keys, _step_key(step)))
                if full < old:
                    best[nxt] = full
                    f = new[0] + h(*nxt)
                    heapq.heappush(
                        heap, (f, new[1], full[2], next(tie), new[0], nxt, (*path, step))
                    )
        raise LayoutError(f"sl.plan: no sequence of steps leads from {src!r} to {self.dst!r}.")


def lower_bound(
    src_layout: Layout,
    dst_layout: Layout,
    shape: tuple[int, ...],
    mesh: AbstractMesh,
    itemsize: int,
) -> int:
    """A lower bound on `plan(src, dst, ...).total_bytes`, without searching (the A* bound
    of `_Search.lower_bound`): for callers that price many candidates and plan only the
    promising ones (the contraction search)."""
    if src_layout == dst_layout:
        return 0
    search = _Search(dst_layout, tuple(shape), mesh, itemsize)
    search.q = math.prod(shape) * itemsize // mesh.size
    search.dst_block = search.numel(dst_layout.dims) * itemsize
    return search.lower_bound(src_layout.dims, src_layout.partial, src_layout.reduce_op)


# == Plans =====================================================================
@dataclass(frozen=True, slots=True)
class PlanStep:
    """One step of a plan with the layouts around it and the bytes it sends."""

    step: Step
    src: Layout
    dst: Layout
    bytes: int


@dataclass(frozen=True, slots=True)
class Plan:
    """An ordered list of redistribution steps from `src` to `dst`.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 4})
        >>> p = sl.plan(sl.P("x", None), sl.P(None, "x"), (4096, 4096), mesh, torch.float32)
        >>> [str(s.step) for s in p.steps], p.total_bytes // 2**20
        (['all_to_all(x, dim 0 -> dim 1)'], 12)
    """

    src: Layout
    dst: Layout
    shape: tuple[int, ...]
    mesh: AbstractMesh
    dtype: str
    itemsize: int
    steps: tuple[PlanStep, ...]

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.steps)

    def __str__(self) -> str:
        head = (
            f"plan {self.src!r} -> {self.dst!r}  shape={self.shape} {self.dtype} on "
            f"{dict(zip(self.mesh.axis_names, self.mesh.shape))}"
        )
        if not self.steps:
            return head + "\n  (no steps: same layout)"
        rows = [head]
        width = max(len(str(s.step)) for s in self.steps)
        for i, s in enumerate(self.steps, 1):
            rows.append(f"  {i}. {str(s.step):<{width}}  {format_bytes(s.bytes):>12}   -> {s.dst}")
        rows.append(f"  total {format_bytes(self.total_bytes)}")
        return "\n".join(rows)


def _dtype_info(dtype: Any) -> tuple[str, int]:
    if isinstance(dtype, int):
        return f"{dtype}-byte", dtype
    itemsize = getattr(dtype, "itemsize", None)
    if itemsize is None:
        raise LayoutError(f"sl.plan: dtype {dtype!r} is not a torch.dtype (e.g. torch.float32).")
    return dtype_name(dtype), itemsize


_CACHE: dict[tuple, Plan] = {}
_CACHE_LIMIT = 16384


def plan(
    src_layout: Layout,
    dst_layout: Layout,
    shape: tuple[int, ...],
    mesh: Mesh | AbstractMesh,
    dtype: Any,
) -> Plan:
    """The least-bytes plan that turns `src_layout` into `dst_layout`.

    Args:
        src_layout, dst_layout: layouts of a tensor of global `shape`.
        shape: the global shape.
        mesh: a `Mesh` or `AbstractMesh` (only axis names and sizes matter).
        dtype: a `torch.dtype` (or an item size in bytes).

    Returns:
        A `Plan`; `print(plan)` shows the steps, bytes per step and the total.
    """
    abstract = mesh.abstract if isinstance(mesh, Mesh) else mesh
    key = (src_layout, dst_layout, shape, abstract, dtype)
    try:
        return _CACHE[key]
    except (KeyError, TypeError):
        pass
    shape = tuple(int(n) for n in shape)
    if not isinstance(abstract, AbstractMesh):
        raise LayoutError(f"sl.plan: mesh must be a sl.Mesh, got {type(mesh).__name__}.")
    for name, lay in (("src_layout", src_layout), ("dst_layout", dst_layout)):
        if not isinstance(lay, Layout):
            raise LayoutError(
                f"sl.plan: {name} must be a layout built with sl.P(...), got {lay!r}."
            )
    src_layout = src_layout.check(abstract, len(shape), "sl.plan(src_layout=...)")
    dst_layout = dst_layout.check(abstract, len(shape), "sl.plan(dst_layout=...)")
    dtype_name, itemsize = _dtype_info(dtype)
    path = _Search(dst_layout, shape, abstract, itemsize).run(src_layout)
    steps, cur = [], src_layout
    for step in path:
        nxt = step.apply(cur)
        steps.append(PlanStep(step, cur, nxt, step_bytes(step, cur, shape, abstract, itemsize)))
        cur = nxt
    result = Plan(src_layout, dst_layout, shape, abstract, dtype_name, itemsize, tuple(steps))
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.clear()
    try:
        _CACHE[key] = result
    except TypeError:
        pass
    return result
