"""View and shape op rules (`shardlib/ops/_views.py`) on simulated meshes.

Covers, on the meshes {x:4, y:2}, {a:2, b:2} and {a:2, b:2, c:2}:

- rule level (no devices): `reshape_groups`, and the carry test of a split
  through a merge/split group against a brute-force block comparison for
  every group of up to 24 elements and up to 8 chunks (uneven included);
- forward and backward of every op family, sampled with hypothesis (cases ×
  meshes × one layout per input drawn from every layout of that rank,
  partial ones with every reduce op, uneven and zero-size shapes, 0-d):
  reshape/view/flatten/unflatten (also of a transposed tensor), transpose/t/
  permute/movedim, expand/expand_as/repeat, squeeze/unsqueeze/indexing with
  None, split/chunk/split_with_sizes/unbind/tensor_split, cat/stack (also
  with a plain tensor operand), slicing/select/narrow, index_select/
  index_add/new_zeros + index_add_, flip/roll/diagonal, and einops
  rearrange/repeat (reduce when a rule for sums exists). For each: the output shape, every local shard is exactly the
  torch.chunk block of the unsharded result under the output layout (for a
  partial output, the reduction of each partial group is); the gradient of
  ``(y.full() * w).sum()`` w.r.t. each ShardedTensor input equals the
  unsharded gradient; and the gradient with an explicit cotangent built in
  the output's own layout (non-trivial summands when partial), which drives
  the backward ops (view, slice_backward, select_backward, cat, stack,
  index_add_, ...) through the rules with sharded and partial operands;
- slow tier (``-m slow``): every case with every layout of each input on
  {a:2, b:2} (exhaustive);
- index_select with a sharded index (every layout pair);
- torch.func.functionalize, which emits the ``*_copy`` variants;
- communication (ledger and `sl.strict`): reshape (8, 6) P("x", None) on
  {x:4, y:2} to (48,) and to (4, 2, 6) records nothing and gives P("x") and
  P("x", None, None), backward included; transpose/permute/t record nothing;
  einops rearrange "b (h d) -> b h d" of a head-split tensor records nothing;
  a non-major split and an uneven split that does not line up gather exactly
  the axes they must (one all_gather each); partial layouts pass unchanged.

Tolerances: values are integers in float64, so every comparison is bitwise
(``torch.equal``), except a partial ``avg`` output (the reduction divides):
rtol 1e-12. Case count: SHARDLIB_HYPOTHESIS_CASES (default 100) per family.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import einops
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib.layouts._shard import chunk_bounds
from shardlib.ops._rules import rule_for
from shardlib.ops._views import _carries, reshape_groups
from tests._reference import (
    arange_value,
    block,
    enumerate_layouts,
    make_summands,
    partial_groups,
    reduce_summands,
)

P = sl.P
aten = torch.ops.aten
CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 100))
MESHES = ({"x": 4, "y": 2}, {"a": 2, "b": 2}, {"a": 2, "b": 2, "c": 2})
HAS_SUM = rule_for(aten.sum.dim_IntList) is not None


# == rule level ================================================================
def test_reshape_groups():
    assert reshape_groups((8, 6), (48,)) == [((0, 1), (0,))]
    assert reshape_groups((8, 6), (4, 2, 6)) == [((0,), (0, 1)), ((1,), (2,))]
    assert reshape_groups((6, 10), (4, 15)) == [((0, 1), (0, 1))]
    assert reshape_groups((2, 1, 6), (12,)) == [((0, 2), (0,))]
    assert reshape_groups((3, 4), (3, 1, 4)) == [((0,), (0,)), ((1,), (2,))]
    assert reshape_groups((1, 1), (1,)) == []


def _brute_carries(n_in: int, n_out: int, total: int, k: int) -> bool:
    """Whether chunking the major input dim gives the chunks of the major output dim."""
    flat = torch.arange(total)
    x = flat.reshape(n_in, -1)
    y = flat.reshape(n_out, -1)
    for c in range(k):
        lo, hi = chunk_bounds(n_in, k, c)
        lo2, hi2 = chunk_bounds(n_out, k, c)
        if not torch.equal(x[lo:hi].reshape(-1), y[lo2:hi2].reshape(-1)):
            return False
    return True


def test_carries_matches_brute_force():
    checked = 0
    for total in range(2, 25):
        divisors = [d for d in range(2, total + 1) if total % d == 0]
        for n_in in divisors:
            for n_out in divisors:
                for k in range(1, 9):
                    want = _brute_carries(n_in, n_out, total, k)
                    assert _carries(n_in, n_out, total, k) == want, (n_in, n_out, total, k)
                    checked += 1
    assert checked > 1000


# == the generic check =========================================================
@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    shapes: tuple[tuple[int, ...], ...]

    def __repr__(self) -> str:
        return self.name


def _value(shape, i: int) -> torch.Tensor:
    return arange_value(shape) + 100 * i


def _weight(shape, i: int) -> torch.Tensor:
    return ((arange_value(shape) * 3 + i) % 7) - 3


def _leaf(mesh: sl.Mesh, value: torch.Tensor, layout: sl.Layout) -> sl.ShardedTensor:
    shards = make_summands(value, layout, mesh.axes)
    return sl.from_local(shards, mesh, layout, tuple(value.shape)).requires_grad_()


def _as_list(y) -> list:
    return list(y) if isinstance(y, list | tuple) else [y]


def _check_output(y, ref: torch.Tensor, mesh: sl.Mesh, where: str) -> None:
    assert isinstance(y, sl.ShardedTensor), f"{where}: got {type(y).__name__}"
    assert tuple(y.shape) == tuple(ref.shape), f"{where}: shape {tuple(y.shape)}"
    y.spec.check(mesh.abstract, y.ndim, where)
    axes = mesh.axes
    shards = y.local_shards()
    plain = y.spec.without_partial()
    for dev, s in enumerate(shards):
        want = tuple(block(ref, plain, axes, dev).shape)
        assert tuple(s.shape) == want, f"{where}: device {dev} holds {tuple(s.shape)}, want {want}"
    groups = partial_groups(y.spec, axes) if y.spec.partial else [[d] for d in range(mesh.size)]
    for group in groups:
        got = reduce_summands([shards[d] for d in group], y.spec.reduce_op)
        want = block(ref.detach(), plain, axes, group[0])
        if y.spec.partial and y.spec.reduce_op == "avg":
            ok = torch.allclose(got, want, rtol=1e-12, atol=0)
        else:
            ok = torch.equal(got, want)
        assert ok, f"{where}: devices {group} hold\n{got}\nexpected\n{want}"


def _grad_context():
    """expand/repeat backward is a sum: use the replicate fallback until reductions exist."""
    return contextlib.nullcontext() if HAS_SUM else sl.allow_replicate_fallback()


def check_case(case: Case, axes: dict, layouts: list[sl.Layout]) -> None:
    """Forward blocks, gradient through full(), gradient from a cotangent in the output layout."""
    mesh = sl.Mesh.simulated(axes)
    where = f"{case.name} with {layouts} on {axes}"
    values = [_value(s, i).requires_grad_() for i, s in enumerate(case.shapes)]
    refs = _as_list(case.fn(*values))
    xs = [_leaf(mesh, v.detach(), lay) for v, lay in zip(values, layouts)]
    ys = _as_list(case.fn(*xs))
    assert len(ys) == len(refs), where
    for j, (y, ref) in enumerate(zip(ys, refs)):
        _check_output(y, ref, mesh, f"{where}, output {j}")

    ws = [_weight(r.shape, j) for j, r in enumerate(refs)]
    loss = sum((r * w).sum() for r, w in zip(refs, ws))
    ref_grads = torch.autograd.grad(loss, values, allow_unused=True)
    with _grad_context():
        loss = sum((y.full() * w).sum() for y, w in zip(ys, ws))
        grads = torch.autograd.grad(loss, xs, allow_unused=True)
        for i, (g, want) in enumerate(zip(grads, ref_grads)):
            if want is None:  # an input only its shape is taken from (view_as)
                assert g is None, f"{where}: input {i} got a gradient"
                continue
            assert torch.equal(g.full(), want), f"{where}: gradient of input {i} via full()"

        ys = _as_list(case.fn(*xs))
        cotangents = [
            sl.from_local(make_summands(w, y.spec, axes), mesh, y.spec, tuple(w.shape))
            for y, w in zip(ys, ws)
        ]
        grads = torch.autograd.grad(ys, xs, grad_outputs=cotangents, allow_unused=True)
        for i, (g, want) in enumerate(zip(grads, ref_grads)):
            if want is None:
                continue
            assert isinstance(g, sl.ShardedTensor), f"{where}: gradient {i} is plain"
            got = g.full()
            avg = any(c.spec.partial and c.spec.reduce_op == "avg" for c in cotangents)
            ok = torch.allclose(got, want, rtol=1e-12, atol=0) if avg else torch.equal(got, want)
            assert ok, f"{where}: gradient of input {i} from a cotangent in {ys[0].spec!r}"


@functools.cache
def _layouts(axes_items: tuple, ndim: int) -> list[sl.Layout]:
    return list(enumerate_layouts(dict(axes_items), ndim))


# == cases, by family ==========================================================
CONST = torch.arange(8.0, dtype=torch.float64).reshape(2, 4) - 3
IDX = torch.tensor([4, 0, 0, 2])

FAMILIES: dict[str, list[Case]] = {
    "reshape": [
        Case("view (8,6)->(48,)", lambda x: x.view(48), ((8, 6),)),
        Case("view (8,6)->(4,2,6)", lambda x: x.view(4, 2, 6), ((8, 6),)),
        Case("reshape (8,6)->(4,12)", lambda x: x.reshape(4, 12), ((8, 6),)),
        Case("reshape (6,4)->(4,6)", lambda x: x.reshape(4, 6), ((6, 4),)),
        Case("reshape (5,6)->(-1,)", lambda x: x.reshape(-1), ((5, 6),)),
        Case("reshape (7,6)->(42,)", lambda x: x.reshape(42), ((7, 6),)),
        Case("reshape (10,3)->(5,2,3)", lambda x: x.reshape(5, 2, 3), ((10, 3),)),
        Case("reshape (12,)->(3,4)", lambda x: x.reshape(3, 4), ((12,),)),
        Case("reshape (9,)->(3,3)", lambda x: x.reshape(3, 3), ((9,),)),
        Case("reshape (2,1,6)->(12,)", lambda x: x.reshape(12), ((2, 1, 6),)),
        Case("reshape (3,4)->(3,1,4)", lambda x: x.reshape(3, 1, 4), ((3, 4),)),
        Case("reshape (4,6)->(2,2,3,2)", lambda x: x.reshape(2, 2, 3, 2), ((4, 6),)),
        Case("reshape (3,4,5)->(12,5)", lambda x: x.reshape(12, 5), ((3, 4, 5),)),
        Case("reshape (3,20)->(3,4,5)", lambda x: x.reshape(3, 4, 5), ((3, 20),)),
        Case("reshape (6,10)->(4,15)", lambda x: x.reshape(4, 15), ((6, 10),)),
    ],
    "reshape-api": [
        Case("reshape (0,6)->(2,0,3)", lambda x: x.reshape(2, 0, 3), ((0, 6),)),
        Case("reshape ()->(1,)", lambda x: x.reshape(1), ((),)),
        Case("reshape (1,1)->()", lambda x: x.reshape(()), ((1, 1),)),
        Case("flatten(1)", lambda x: x.flatten(1), ((2, 3, 4),)),
        Case("unflatten(1, (2,3))", lambda x: x.unflatten(1, (2, 3)), ((4, 6),)),
        Case("t().reshape(-1)", lambda x: x.t().reshape(-1), ((4, 6),)),
        Case("view_as", lambda x, y: x.view_as(y), ((4, 6), (24,))),
        Case(
            "rearrange b (h d) -> b h d",
            lambda x: einops.rearrange(x, "b (h d) -> b h d", h=4),
            ((3, 8),),
        ),
        Case(
            "rearrange b h d -> b (h d)",
            lambda x: einops.rearrange(x, "b h d -> b (h d)"),
            ((3, 4, 2),),
        ),
        Case(
            "rearrange b s (h d) -> b h s d",
            lambda x: einops.rearrange(x, "b s (h d) -> b h s d", h=2),
            ((2, 3, 4),),
        ),
        Case(
            "rearrange (b s) d -> b s d",
            lambda x: einops.rearrange(x, "(b s) d -> b s d", b=2),
            ((6, 3),),
        ),
    ],
    "permute": [
        Case("transpose(0,1)", lambda x: x.transpose(0, 1), ((3, 5),)),
        Case("t", lambda x: x.t(), ((4, 6),)),
        Case("t 1-d", lambda x: x.t(), ((5,),)),
        Case("permute(2,0,1)", lambda x: x.permute(2, 0, 1), ((2, 3, 5),)),
        Case("movedim(0,-1)", lambda x: x.movedim(0, -1), ((2, 3, 5),)),
        Case("swapaxes(-1,-2)", lambda x: x.swapaxes(-1, -2), ((2, 3, 4),)),
        Case("mT", lambda x: x.mT, ((2, 5, 3),)),
        Case(
            "rearrange b h d -> d b h",
            lambda x: einops.rearrange(x, "b h d -> d b h"),
            ((3, 2, 5),),
        ),
    ],
    "expand": [
        Case("expand (1,4)->(3,4)", lambda x: x.expand(3, 4), ((1, 4),)),
        Case("expand (3,5)->(2,3,5)", lambda x: x.expand(2, 3, 5), ((3, 5),)),
        Case("expand (5,1,3)->(5,4,3)", lambda x: x.expand(5, 4, 3), ((5, 1, 3),)),
        Case("expand (5,1,3)->(-1,4,-1)", lambda x: x.expand(-1, 4, -1), ((5, 1, 3),)),
        Case("expand (1,3)->(2,1,3)", lambda x: x.expand(2, 1, 3), ((1, 3),)),
        Case("expand_as", lambda x, y: x.expand_as(y) * y, ((1, 4), (3, 4))),
    ],
    "repeat": [
        Case("repeat(2,1)", lambda x: x.repeat(2, 1), ((3, 4),)),
        Case("repeat(2,1,1)", lambda x: x.repeat(2, 1, 1), ((3, 5),)),
        Case(
            "einops repeat b d -> b r d", lambda x: einops.repeat(x, "b d -> b r d", r=3), ((3, 4),)
        ),
        Case(
            "einops repeat b d -> (r b) d",
            lambda x: einops.repeat(x, "b d -> (r b) d", r=2),
            ((3, 4),),
        ),
    ],
    "squeeze": [
        Case("squeeze()", lambda x: x.squeeze(), ((1, 4, 1),)),
        Case("squeeze(0)", lambda x: x.squeeze(0), ((1, 5),)),
        Case("squeeze(1) of a size-4 dim", lambda x: x.squeeze(1), ((3, 4),)),
        Case("squeeze((0,2))", lambda x: x.squeeze((0, 2)), ((1, 4, 1),)),
        Case("squeeze 0-d", lambda x: x.squeeze(0), ((),)),
        Case("unsqueeze(1)", lambda x: x.unsqueeze(1), ((3, 4),)),
        Case("unsqueeze(-1)", lambda x: x.unsqueeze(-1), ((3, 4),)),
        Case("x[None]", lambda x: x[None], ((5,),)),
        Case("x[..., None, :]", lambda x: x[..., None, :], ((3, 4),)),
    ],
    "split": [
        Case("split(2, 1)", lambda x: x.split(2, dim=1), ((3, 5),)),
        Case("split([2,3], 1)", lambda x: x.split([2, 3], dim=1), ((3, 5),)),
        Case("split(3, 0)", lambda x: x.split(3, dim=0), ((7, 3),)),
        Case("split(5, 0) one piece", lambda x: x.split(5, dim=0), ((5, 3),)),
        Case("chunk(2, 0)", lambda x: x.chunk(2, 0), ((5, 3),)),
        Case("unbind(1)", lambda x: x.unbind(1), ((3, 2),)),
        Case("tensor_split(2, 1)", lambda x: x.tensor_split(2, 1), ((3, 5),)),
    ],
    "cat": [
        Case("cat dim 1", lambda x, y: torch.cat([x, y], 1), ((3, 2), (3, 4))),
        Case("cat dim 0", lambda x, y: torch.cat([x, y], 0), ((2, 5), (3, 5))),
        Case("cat three", lambda x, y, z: torch.cat([x, y, z], -1), ((4, 1), (4, 3), (4, 2))),
        Case("cat with a plain tensor", lambda x: torch.cat([x, CONST], 0), ((3, 4),)),
        Case("stack dim 1", lambda x, y: torch.stack([x, y], 1), ((3, 4), (3, 4))),
        Case("stack dim -1", lambda x, y: torch.stack([x, y], -1), ((5,), (5,))),
    ],
    "slice": [
        Case("x[1:3]", lambda x: x[1:3], ((5, 4),)),
        Case("x[:, ::2]", lambda x: x[:, ::2], ((3, 5),)),
        Case("x[:, :]", lambda x: x[:, :], ((3, 5),)),
        Case("x[:, 1]", lambda x: x[:, 1], ((3, 5),)),
        Case("x[..., -1]", lambda x: x[..., -1], ((2, 3, 4),)),
        Case("x[None, :, 0]", lambda x: x[None, :, 0], ((3, 3),)),
        Case("narrow(0, 1, 2)", lambda x: x.narrow(0, 1, 2), ((5, 4),)),
    ],
    "index": [
        Case("index_select(-1) 3-d", lambda x: x.index_select(-1, IDX), ((2, 3, 5),)),
        Case("index_add(0)", lambda x, s: x.index_add(0, IDX, s), ((6, 3), (4, 3))),
        Case(
            "index_add(1, alpha=2)", lambda x, s: x.index_add(1, IDX, s, alpha=2), ((3, 5), (3, 4))
        ),
        Case(
            "new_zeros + index_add_", lambda x: x.new_zeros(6, 3).index_add_(0, IDX, x), ((4, 3),)
        ),
        Case("index_select(1)", lambda x: x.index_select(1, IDX), ((3, 5),)),
        Case("index_select(0)", lambda x: x.index_select(0, IDX), ((6, 3),)),
    ],
    "misc": [
        Case("flip(0)", lambda x: x.flip(0), ((5, 3),)),
        Case("flip((0,1))", lambda x: x.flip((0, 1)), ((5, 3),)),
        Case("roll(1, 0)", lambda x: x.roll(1, 0), ((5, 3),)),
        Case("roll(2) flat", lambda x: x.roll(2), ((5, 3),)),
        Case("diagonal()", lambda x: x.diagonal(), ((3, 3),)),
        Case("diagonal(1, 0, 2)", lambda x: x.diagonal(1, 0, 2), ((3, 2, 4),)),
    ],
}
if HAS_SUM:
    FAMILIES["misc"].append(
        Case("einops reduce", lambda x: einops.reduce(x, "b (h d) -> b h", "sum", h=2), ((3, 4),))
    )


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(data=st.data())
def test_family(family, data):
    case = data.draw(st.sampled_from(FAMILIES[family]), label="case")
    axes = data.draw(st.sampled_from(MESHES), label="mesh")
    layouts = [
        data.draw(st.sampled_from(_layouts(tuple(axes.items()), len(s))), label=f"layout {i}")
        for i, s in enumerate(case.shapes)
    ]
    check_case(case, axes, layouts)


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in FAMILIES["reshape"]
        if c.name.startswith(("view (8,6)", "reshape (6,4)", "rearrange b (h d)"))
    ],
    ids=repr,
)
def test_reshape_every_layout(case):
    """Key reshapes with every layout on {a:2, b:2} (exhaustive, not sampled)."""
    axes = MESHES[1]
    for layout in _layouts(tuple(axes.items()), len(case.shapes[0])):
        check_case(case, axes, [layout])


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for cases in FAMILIES.values() for c in cases], ids=repr)
def test_every_case_every_layout(case):
    """Slow tier: every case with every layout of each input (others replicated) on {a:2, b:2}."""
    axes = MESHES[1]
    ranks = [len(s) for s in case.shapes]
    replicated = [P(*([None] * r)) for r in ranks]
    for i, r in enumerate(ranks):
        for layout in _layouts(tuple(axes.items()), r):
            layouts = list(replicated)
            layouts[i] = layout
            check_case(case, axes, layouts)
            if len(set(ranks)) == 1 and i == 0 and len(ranks) > 1:
                check_case(case, axes, [layout] * len(ranks))


# == index_select with a sharded index =========================================
@pytest.mark.parametrize("dim", [0, 1])
def test_index_select_sharded_index(dim):
    axes = {"a": 2, "b": 2}
    mesh = sl.Mesh.simulated(axes)
    value = _value((6, 5), 0)
    index = torch.tensor([4, 0, 3, 3, 1])
    ref = value.index_select(dim, index)
    for xl in _layouts(tuple(axes.items()), 2):
        for il in enumerate_layouts(axes, 1, ops=()):
            x = _leaf(mesh, value, xl)
            idx = sl.shard(index, mesh, il)
            y = x.index_select(dim, idx)
            _check_output(y, ref, mesh, f"index_select({dim}) {xl!r}, index {il!r}")
    # a split index and a replicated dim: the output dim takes the index's split, no communication
    x = _leaf(mesh, value, P(None, "b") if dim == 0 else P("b", None))
    idx = sl.shard(index, mesh, P("a"))
    with sl.comm_ledger() as led:
        y = x.index_select(dim, idx)
    assert led.records == []
    assert y.spec == (P("a", "b") if dim == 0 else P("b", "a"))


# == communication =============================================================
MESH_XY = {"x": 4, "y": 2}


def _x86(layout: sl.Layout | None = None) -> sl.ShardedTensor:
    """An (8, 6) leaf on {x:4, y:2}, P("x", None) unless told."""
    mesh = sl.Mesh.simulated(MESH_XY)
    return _leaf(mesh, arange_value((8, 6)), layout or P("x", None))


def test_reshape_major_split_needs_no_collective():
    """DESIGN issue 3: reshape (8,6) P("x",None) to (48,) and to (4,2,6) needs no collective."""
    x = _x86()
    with sl.comm_ledger() as led, sl.strict():
        flat = x.reshape(48)
        split = x.reshape(4, 2, 6)
        viewed = x.view(-1)
        back = flat.view(8, 6)
    assert led.records == []
    assert flat.spec == P("x") and viewed.spec == P("x")
    assert split.spec == P("x", None, None)
    assert back.spec == P("x", None)
    assert torch.equal(flat.full(), arange_value((48,)))
    assert torch.equal(split.full(), arange_value((4, 2, 6)))
    # backward with a cotangent in the output layout: a view back, no collective either
    y = x.reshape(4, 2, 6)
    g = sl.shard(arange_value((4, 2, 6)), x.mesh, P("x", None, None))
    with sl.comm_ledger() as led, sl.strict():
        (gx,) = torch.autograd.grad(y, x, grad_outputs=g)
    assert led.records == [] and gx.spec == P("x", None)
    assert torch.equal(gx.full(), arange_value((8, 6)))


def test_reshape_partial_passes_through():
    for op in ("sum", "avg", "max", "min"):
        x = _x86(P("x", None, partial={"y": op}))
        with sl.comm_ledger() as led, sl.strict():
            y = x.reshape(48)
            z = x.t()
        assert led.records == []
        assert y.spec == P("x", partial={"y": op})
        assert z.spec == P(None, "x", partial={"y": op})


def test_reshape_gathers_only_what_it_must():
    # a non-major split: only y is gathered, x carries over
    x = _x86(P("x", "y"))
    with sl.comm_ledger() as led:
        y = x.reshape(48)
    assert y.spec == P("x")
    assert [(r.kind, r.axes) for r in led.records] == [("all_gather", ("y",))]
    # a two-axis major split carries whole when blocks line up: (8,6) over 8 chunks -> 48
    x = _x86(P(("x", "y"), None))
    with sl.comm_ledger() as led:
        y = x.reshape(48)
    assert led.records == [] and y.spec == P(("x", "y"))
    # uneven: (6,4) rows over 4 are [0,2) [2,4) [4,6) [6,6) -> elements 8c, but 24 over 4
    # chunks 6c: the split must be gathered first
    mesh = sl.Mesh.simulated(MESH_XY)
    x = _leaf(mesh, arange_value((6, 4)), P("x", None))
    with sl.comm_ledger() as led:
        y = x.reshape(24)
    assert y.spec == P(None)
    assert [(r.kind, r.axes) for r in led.records] == [("all_gather", ("x",))]
    # (6,4) -> (4,6) over 2 lines up (elements 12c both ways)
    x = _leaf(mesh, arange_value((6, 4)), P("y", None))
    with sl.comm_ledger() as led:
        y = x.reshape(4, 6)
    assert led.records == [] and y.spec == P("y", None)
    with pytest.raises(sl.LayoutError, match="sl.reshard"), sl.strict():
        _leaf(mesh, arange_value((6, 4)), P("x", None)).reshape(4, 6)


def test_permutes_need_no_collective():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2, "c": 2})
    x = _leaf(mesh, arange_value((4, 6, 3)), P("a", ("c", "b"), None))
    with sl.comm_ledger() as led, sl.strict():
        t = x.transpose(0, 2)
        p = x.permute(1, 2, 0)
        m = x[:, :, 0].t()
        s = x.swapaxes(-1, -2)
    assert led.records == []
    assert t.spec == P(None, ("c", "b"), "a")
    assert p.spec == P(("c", "b"), None, "a")
    assert m.spec == P(("c", "b"), "a")
    assert s.spec == P("a", None, ("c", "b"))


def test_einops_rearrange_heads_needs_no_collective():
    """A head-split (b, h*d) tensor: rearrange to (b, h, d) and back keeps the head split."""
    mesh = sl.Mesh.simulated(MESH_XY)
    x = _leaf(mesh, arange_value((3, 8 * 5)), P(None, "x"))
    with sl.comm_ledger() as led, sl.strict():
        y = einops.rearrange(x, "b (h d) -> b h d", h=8)
        z = einops.rearrange(y, "b h d -> b (h d)")
        w = einops.rearrange(y, "b h d -> h b d")
    assert led.records == []
    assert y.spec == P(None, "x", None)
    assert z.spec == P(None, "x")
    assert w.spec == P("x", None, None)
    assert torch.equal(y.full(), arange_value((3, 40)).reshape(3, 8, 5))


def test_views_of_unsplit_dims_need_no_collective():
    mesh = sl.Mesh.simulated(MESH_XY)
    x = _leaf(mesh, arange_value((8, 6)), P("x", None, partial="y"))
    with sl.comm_ledger() as led, sl.strict():
        a = x[:, 1:4]
        b = x[:, 2]
        c = x.split(2, dim=1)
        d = torch.cat([x, x], 1)
        e = x.unsqueeze(1).expand(8, 3, 6)
        f = x.index_select(1, torch.tensor([5, 0]))
    assert led.records == []
    assert a.spec == d.spec == f.spec == P("x", None, partial="y")
    assert b.spec == P("x", partial="y")
    assert all(t.spec == x.spec for t in c)
    assert e.spec == P("x", None, None, partial="y")


# == functionalization: the *_copy variants ====================================
def test_functionalize_uses_copy_variants():
    """torch.func.functionalize turns views into view_copy, t_copy, ...: same layouts and values."""

    def f(x):
        a = x.view(4, 2, 6).transpose(1, 2).unsqueeze(0).squeeze(0)
        b = a[:, 1].expand(2, 4, 2)
        c = torch.split(x, 2, dim=1)[1].t()
        d = x.select(1, 2).unbind(0)[0]
        e = x.split(8, dim=0)[0].permute(1, 0)
        return a, b, c, d, e

    mesh = sl.Mesh.simulated(MESH_XY)
    value = arange_value((8, 6))
    x = _leaf(mesh, value, P("x", None)).detach()
    with sl.comm_ledger() as led:
        outs = torch.func.functionalize(f, remove="mutations_and_views")(x)
    refs = f(value)
    assert [o.spec for o in outs] == [
        P("x", None, None),
        P(None, "x", None),
        P(None, "x"),
        P(),
        P(None, "x"),
    ]
    for o, r in zip(outs, refs):
        _check_output(o, r, mesh, "functionalize")
    assert [r.kind for r in led.records] == [
        "all_gather"
    ]  # select(1, 2) then unbind(0) of a split dim
