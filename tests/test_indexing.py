"""Indexing op rules (`shardlib/ops/_indexing.py`): gather/scatter, index/index_put,
index_select/add/copy/fill/reduce, take/put, masked_scatter, embedding_renorm_, and the
value-dependent shapes (nonzero, masked_select, ``x[mask]``).

Covers, on simulated meshes {a:2, b:2} and {x:4} with uneven sizes (dims of 7, 5 and 3
over 2 and 4 devices: chunks 2,2,2,1 and 2,1,0,0 included):

- values and gradients (through `.full()`, float64) of every op of the family against
  unsharded torch, for layouts drawn per operand with a fixed seed: splits of the
  indexed dim, of batch dims and of the index tensors, partial sum/avg/max/min operands
  (and partial-sum indices), plain index tensors; in-place forms on a clone;
- ledgers in closed form: a read (gather, index_select, ``x[idx]``, take) from a table
  split along the indexed dim with replicated indices records nothing and gives a
  partial-sum output, reduced by one all-reduce of the *output*, 2 (k-1) ceil(n/k) * 8
  bytes, never the table; its backward records nothing; a write (scatter, scatter_add,
  scatter_reduce, index_add/copy/fill, index_put, put) into a self split along the
  written dim with replicated indices records nothing and keeps self's layout; an
  accumulating write with split indices gives a partial-sum output, no collective;
- strict mode: those cases pass; a non-accumulating scatter whose index rows are split
  needs the index gathered and refuses, naming the op;
- nonzero / masked_select of a split input: one all_gather of the input;
- embedding_renorm_: rows split -> no collective; hidden split -> one all-reduce of one
  number per distinct id (closed form);
- out-of-range indices on a split table raise IndexError as torch does;
- slow tier: every layout of self for every case; the no-communication paths and the
  gathers on 4 gloo ranks equal the simulated mesh (values and ledger kinds).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import shardlib as sl
from tests._reference import enumerate_layouts
from tests.test_nn_ops import _sharded

P = sl.P
aten = torch.ops.aten
MESHES = [{"a": 2, "b": 2}, {"x": 4}]
TOL = {"rtol": 1e-10, "atol": 1e-12}
DRAWS = 3  # layout draws per case and mesh


def _f(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _i(high, *shape, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _perm(n, k, seed=0):
    """k distinct indices below n (a non-accumulating write with no duplicates)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def _rows(n, k, cols, seed=0):
    """A (k, cols) index with distinct entries down each column."""
    return torch.stack([_perm(n, k, seed + c) for c in range(cols)], 1)


X = _f(7, 5)
MASK = X > 0.2


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    inputs: tuple
    grad: bool = True  # torch has a derivative

    def __repr__(self) -> str:
        return self.name


def _clone_then(method: str, *a, **k) -> Callable:
    return lambda x, *t: getattr(x.clone(), method)(*a, *t, **k)


CASES = [
    # -- reads ---------------------------------------------------------------
    Case("gather 0", lambda x, i: torch.gather(x, 0, i), (X, _i(7, 4, 5))),
    Case("gather 1", lambda x, i: torch.gather(x, 1, i), (X, _i(5, 7, 3))),
    Case("gather small index", lambda x, i: torch.gather(x, 0, i), (X, _i(7, 3, 2))),
    Case("take_along_dim", lambda x, i: torch.take_along_dim(x, i, 1), (X, _i(5, 7, 2))),
    Case("index_select 0", lambda x, i: x.index_select(0, i), (X, _i(7, 6))),
    Case("index_select 1", lambda x, i: x.index_select(1, i), (X, _i(5, 3))),
    Case("x[idx]", lambda x, i: x[i], (X, _i(7, 3, 2))),
    Case("x[:, idx]", lambda x, i: x[:, i], (X, _i(5, 4))),
    Case("x[i, j] broadcast", lambda x, i, j: x[i, j], (X, _i(7, 3, 1), _i(5, 1, 2, seed=1))),
    Case("x[-idx]", lambda x, i: x[i - 7], (X, _i(7, 4))),
    Case("x[mask]", lambda x, m: x[m], (X, MASK)),
    Case("x[:, mask]", lambda x, m: x[:, m], (X, MASK[0])),
    Case("take", lambda x, i: torch.take(x, i - 20), (X, _i(35, 3, 3))),
    Case("_unsafe_index", lambda x, i: aten._unsafe_index(x, [None, i]), (X, _i(5, 3, 2))),
    Case(
        "masked_fill tensor value",
        lambda x, m, v: x.masked_fill(m, v),
        (X, MASK, torch.tensor(-0.5, dtype=torch.float64)),
    ),
    Case(
        "embedding max_norm",
        lambda i, w: torch.nn.functional.embedding(i, w.clone(), max_norm=1.0),
        (_i(7, 3, 4), X * 2),
    ),
    Case(
        "_unsafe_masked_index",
        lambda x, m, i: aten._unsafe_masked_index(x, m, [i], 0.0),
        (X, _i(2, 4, 1).bool(), _i(7, 4)),
    ),
    # -- writes --------------------------------------------------------------
    Case("scatter src", lambda x, i, s: x.scatter(0, i, s), (X, _rows(7, 3, 5), _f(3, 5, seed=1))),
    Case("scatter value", lambda x, i: x.scatter(1, i, -2.0), (X, _i(5, 7, 2))),
    Case(
        "scatter_ in place",
        lambda x, i, s: x.clone().scatter_(0, i, s),
        (X, _rows(7, 2, 5), _f(2, 5, seed=1)),
    ),
    Case(
        "scatter reduce add",
        lambda x, i, s: x.scatter(0, i, s, reduce="add"),
        (X, _i(7, 6, 5), _f(6, 5, seed=1)),
        grad=False,
    ),
    Case(
        "scatter reduce multiply",
        lambda x, i, s: x.scatter(0, i, s, reduce="multiply"),
        (X, _i(7, 6, 5), _f(6, 5, seed=1)),
        grad=False,
    ),
    Case(
        "scatter value_reduce add",
        lambda x, i: x.scatter(1, i, 2.0, reduce="add"),
        (X, _i(5, 7, 3)),
        grad=False,
    ),
    Case(
        "scatter value_reduce multiply",
        lambda x, i: x.scatter(1, i, 2.0, reduce="multiply"),
        (X, _i(5, 7, 3)),
        grad=False,
    ),
    Case("scatter_add", lambda x, i, s: x.scatter_add(0, i, s), (X, _i(7, 6, 5), _f(6, 5, seed=1))),
    Case(
        "scatter_add_ small index",
        lambda x, i, s: x.clone().scatter_add_(1, i, s),
        (X, _i(5, 4, 3), _f(4, 3, seed=1)),
    ),
    Case(
        "index_add", lambda x, i, s: x.index_add(0, i, s, alpha=2), (X, _i(7, 6), _f(6, 5, seed=1))
    ),
    Case("index_copy", lambda x, i, s: x.index_copy(1, i, s), (X, _perm(5, 3), _f(7, 3, seed=1))),
    Case("index_fill", lambda x, i: x.index_fill(0, i, -1.5), (X, _i(7, 3) - 3)),
    Case("index_fill_ in place", lambda x, i: x.clone().index_fill_(1, i, 2.0), (X, _i(5, 3))),
    Case(
        "index_fill tensor",
        lambda x, i, v: x.index_fill(1, i, v),
        (X, _i(5, 2), torch.tensor(0.5, dtype=torch.float64)),
    ),
    Case("put acc", lambda x, i, s: x.put(i, s, accumulate=True), (X, _i(35, 6), _f(6, seed=1))),
    Case("put", lambda x, i, s: x.put(i, s), (X, _perm(35, 6), _f(6, seed=1))),
    Case(
        "index_put acc",
        lambda x, i, v: x.index_put((i,), v, accumulate=True),
        (X, _i(7, 6), _f(6, 5, seed=1)),
    ),
    Case(
        "index_put_ 2 tensors",
        lambda x, i, j, v: x.clone().index_put_((i, j), v),
        (X, _perm(7, 4), _perm(5, 4, seed=1), _f(4, seed=2)),
    ),
    Case(
        "_index_put_impl_",
        lambda x, i, v: aten._index_put_impl_(x.clone(), [i], v, True, False),
        (X, _i(7, 6), _f(6, 5, seed=1)),
    ),
    Case("x[mask] = 0", lambda x, m: x.clone().index_put_((m,), torch.tensor(0.0)), (X, MASK)),
    Case(
        "x[mask] = values",
        lambda x, m, v: x.index_put((m,), v),
        (X, MASK, _f(int(MASK.sum()), seed=1)),
    ),
    Case(
        "masked_scatter",
        lambda x, m, s: x.masked_scatter(m, s),
        (X, _i(2, 1, 5).bool(), _f(40, seed=1)),
    ),
    Case(
        "_unsafe_masked_index_put_accumulate",
        lambda x, m, i, v: aten._unsafe_masked_index_put_accumulate(x, m, [i], v),
        (X, _i(2, 4, 1).bool(), _i(7, 4), _f(4, 5, seed=1)),
    ),
]
for reduce, include in [
    ("sum", True),
    ("sum", False),
    ("prod", True),
    ("mean", False),
    ("amax", True),
    ("amin", False),
]:
    CASES.append(
        Case(
            f"scatter_reduce {reduce} {include}",
            lambda x, i, s, r=reduce, inc=include: x.scatter_reduce(0, i, s, r, include_self=inc),
            (X, _i(7, 6, 5), _f(6, 5, seed=1)),
        )
    )
for reduce, include in [("prod", False), ("mean", True), ("amax", False), ("amin", True)]:
    CASES.append(
        Case(
            f"index_reduce {reduce} {include}",
            lambda x, i, s, r=reduce, inc=include: x.index_reduce(1, i, s, r, include_self=inc),
            (X, _i(5, 4), _f(7, 4, seed=1)),
        )
    )


def _layouts_of(t: torch.Tensor, axes: dict) -> list[sl.Layout]:
    """Every layout of `t`: partial with each op for floats, sum for ints, none for bools."""
    ops = ("sum", "avg", "max", "min") if t.is_floating_point() else ("sum",)
    return list(enumerate_layouts(axes, t.ndim, () if t.dtype == torch.bool else ops))


def _draw(rng: random.Random, t: torch.Tensor, axes: dict) -> sl.Layout:
    return rng.choice(_layouts_of(t, axes))


def _run(case: Case, axes: dict, layouts: list) -> None:
    mesh = sl.Mesh.simulated(axes)
    plain = [t.clone().requires_grad_(t.is_floating_point() and case.grad) for t in case.inputs]
    want = case.fn(*plain)
    sharded = [t if lay is None else _sharded(mesh, t, lay) for t, lay in zip(plain, layouts)]
    got = case.fn(*sharded)
    where = f"{case.name} on {axes} {layouts}"
    assert got.shape == want.shape and got.dtype == want.dtype, where
    full = got.full()
    torch.testing.assert_close(full, want, **TOL, msg=where)
    floats = [t for t in plain if t.requires_grad]
    if not want.is_floating_point() or not floats:
        return
    w = _f(*want.shape, seed=3)
    a = torch.autograd.grad((full * w).sum(), floats, allow_unused=True)
    b = torch.autograd.grad((want * w).sum(), floats, allow_unused=True)
    for ga, gb in zip(a, b):
        ga = torch.zeros_like(gb) if ga is None else ga
        torch.testing.assert_close(ga, gb, **TOL, msg=f"grad of {where}")


# torch's own warnings for index_reduce (beta) and scatter(reduce=) with a tensor src (deprecated)
BETA = pytest.mark.filterwarnings(
    "ignore:index_reduce\\(\\) is in beta", "ignore:The reduce argument of torch.scatter"
)


@BETA
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_values_and_gradients_match_torch(case):
    rng = random.Random(f"{case.name}")
    for axes in MESHES:
        for _ in range(DRAWS):
            layouts = [
                None if i and rng.random() < 0.2 else _draw(rng, t, axes)
                for i, t in enumerate(case.inputs)
            ]
            _run(case, axes, layouts)


@BETA
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_every_self_layout(case):
    """Slow tier: every layout of self on {a:2, b:2} and {x:4}, the others drawn."""
    rng = random.Random(f"every {case.name}")
    for axes in MESHES:
        for layout in _layouts_of(case.inputs[0], axes):
            rest = [_draw(rng, t, axes) for t in case.inputs[1:]]
            _run(case, axes, [layout, *rest])


# == communication =============================================================
def _all_reduce_bytes(numel: int, k: int, itemsize: int = 8) -> int:
    """One ring all-reduce of `numel` elements over k devices: 2 (k-1) ceil(numel/k) items."""
    return 2 * (k - 1) * -(-numel // k) * itemsize


READS = {
    "gather": lambda t, i: torch.gather(t, 0, i),
    "index_select": lambda t, i: t.index_select(0, i.reshape(-1)),
    "x[idx]": lambda t, i: t[i],
    "take": lambda t, i: torch.take(t, i * 6),
}


@pytest.mark.parametrize("read", READS, ids=str)
@pytest.mark.parametrize("axes, split", [({"x": 4}, "x"), ({"a": 2, "b": 2}, ("a", "b"))])
def test_read_from_split_table_reduces_the_output_once(read, axes, split):
    """Table (10, 6) split 3,3,3,1 on rows, ids (4, 6) replicated: no forward or backward
    collective; `.full()` is one all-reduce of the output, never the table."""
    mesh = sl.Mesh.simulated(axes)
    table, ids = _f(10, 6, seed=4), _i(10, 4, 6, seed=5)
    t = sl.shard(table, mesh, P(split, None)).requires_grad_()
    fn = READS[read]
    with sl.comm_ledger() as led, sl.strict():
        y = fn(t, ids)
    assert led.records == [] and y.spec.partial == tuple(sorted(P(split).dims[0]))
    with sl.comm_ledger() as led:
        full = y.full()
    numel = full.numel()
    assert [(r.kind, r.bytes) for r in led.records] == [("all_reduce", _all_reduce_bytes(numel, 4))]
    torch.testing.assert_close(full, fn(table, ids), **TOL)
    with sl.comm_ledger() as led:
        (g,) = torch.autograd.grad((full * _f(*full.shape, seed=6)).sum(), t)
    assert led.records == []
    plain = table.clone().requires_grad_()
    (want,) = torch.autograd.grad((fn(plain, ids) * _f(*full.shape, seed=6)).sum(), plain)
    torch.testing.assert_close(g.full(), want, **TOL)


WRITES = {
    "scatter": lambda t, i, s: t.scatter(0, i[:1], s[:1]),
    "scatter_add": lambda t, i, s: t.scatter_add(0, i, s),
    "scatter_reduce amax": lambda t, i, s: t.scatter_reduce(0, i, s, "amax", include_self=False),
    "index_add": lambda t, i, s: t.index_add(0, i[:, 0], s),
    "index_copy": lambda t, i, s: t.index_copy(0, torch.arange(4) * 2, s),
    "index_fill": lambda t, i, s: t.index_fill(0, i[:, 0], 3.0),
    "index_put acc": lambda t, i, s: t.index_put((i[:, 0],), s, accumulate=True),
    "put acc": lambda t, i, s: t.put(i * 6, s, accumulate=True),
    "index_put_ in place": lambda t, i, s: t.clone().index_put_((i[:, 0],), s[:, 0:1] * 0 + 1),
}


@pytest.mark.parametrize("write", WRITES, ids=str)
@pytest.mark.parametrize("axes, split", [({"x": 4}, "x"), ({"a": 2, "b": 2}, ("a", "b"))])
def test_write_into_split_self_needs_no_collective(write, axes, split):
    """Self (10, 6) split on rows, replicated indices and source: each device writes its
    chunk's indices; forward and backward record nothing; the output keeps self's split."""
    mesh = sl.Mesh.simulated(axes)
    base, ids, src = _f(10, 6, seed=4), _i(10, 4, 6, seed=5), _f(4, 6, seed=7)
    x = sl.shard(base, mesh, P(split, None)).requires_grad_()
    s = sl.shard(src, mesh, P(None, None)).requires_grad_()
    fn = WRITES[write]
    with sl.comm_ledger() as led, sl.strict():
        y = fn(x, ids, s)
        loss = (y * sl.shard(_f(10, 6, seed=8), mesh, y.spec)).sum()
    assert led.records == [] and y.spec == P(split, None)
    px, ps = base.clone().requires_grad_(), src.clone().requires_grad_()
    want = fn(px, ids, ps)
    torch.testing.assert_close(y.full(), want, **TOL)
    with sl.comm_ledger() as led:
        grads = torch.autograd.grad(loss, (x, s), allow_unused=True)
    assert all(r.cause.startswith("full") or r.kind == "all_reduce" for r in led.records)
    want_grads = torch.autograd.grad((want * _f(10, 6, seed=8)).sum(), (px, ps), allow_unused=True)
    for g, w in zip(grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g.full(), w, **TOL)


def test_accumulate_with_split_indices_gives_a_partial_sum():
    """scatter_add / index_add / index_put(accumulate) with index rows split over x: each
    device adds its rows into a partial-sum self, no collective."""
    mesh = sl.Mesh.simulated({"x": 4})
    base, src = _f(7, 5), _f(6, 5, seed=1)
    ids = _i(7, 6, 5, seed=2)
    x = sl.shard(base, mesh, P(None, None))
    i, s = sl.shard(ids, mesh, P("x", None)), sl.shard(src, mesh, P("x", None))
    with sl.comm_ledger() as led, sl.strict():
        a = x.scatter_add(0, i, s)
        b = x.index_add(0, i[:, 0], s)
        c = x.index_put((i[:, 0],), s, accumulate=True)
    assert led.records == []
    assert a.spec == b.spec == c.spec == P(None, None, partial="x")
    torch.testing.assert_close(a.full(), base.scatter_add(0, ids, src), **TOL)
    torch.testing.assert_close(b.full(), base.index_add(0, ids[:, 0], src), **TOL)
    torch.testing.assert_close(c.full(), base.index_put((ids[:, 0],), src, accumulate=True), **TOL)


def test_strict_refuses_a_non_accumulating_write_with_split_index_rows():
    mesh = sl.Mesh.simulated({"x": 4})
    x = sl.shard(_f(7, 5), mesh, P(None, None))
    i = sl.shard(_rows(7, 4, 5), mesh, P("x", None))
    s = sl.shard(_f(4, 5, seed=1), mesh, P("x", None))
    with sl.strict(), pytest.raises(sl.LayoutError, match=r"scatter.*sl\.reshard"):
        x.scatter(0, i, s)
    y = x.scatter(0, i, s)  # auto mode: the index and source gathered, in the ledger
    torch.testing.assert_close(y.full(), _f(7, 5).scatter(0, _rows(7, 4, 5), _f(4, 5, seed=1)))


def test_batch_split_alike_needs_no_collective():
    """gather / scatter_add / x[:, idx] with self and index split alike on a batch dim."""
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    base, ids = _f(6, 7), _i(7, 6, 4)
    x, i = sl.shard(base, mesh, P("a", None)), sl.shard(ids, mesh, P("a", None))
    with sl.comm_ledger() as led, sl.strict():
        g = torch.gather(x, 1, i)
        s = x.scatter_add(1, i, g)
        c = x[:, sl.shard(ids[0], mesh, P("b"))]
    assert led.records == [] and g.spec == s.spec == P("a", None) and c.spec == P("a", "b")
    torch.testing.assert_close(s.full(), base.scatter_add(1, ids, torch.gather(base, 1, ids)))
    torch.testing.assert_close(c.full(), base[:, ids[0]])


# == value-dependent shapes ====================================================
@pytest.mark.parametrize(
    "fn", [torch.nonzero, lambda t: torch.masked_select(t, t > 0)], ids=["nonzero", "masked_select"]
)
def test_value_dependent_shapes_gather_their_input(fn):
    mesh = sl.Mesh.simulated({"x": 4})
    value = _f(7, 5)
    with sl.comm_ledger() as led:
        y = fn(sl.shard(value, mesh, P("x", None)))
    assert [r.kind for r in led.records] == ["all_gather"] * len(led.records) and led.records
    assert y.spec.is_replicated
    torch.testing.assert_close(y.full(), fn(value), rtol=0, atol=0)


# == embedding_renorm_ =========================================================
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("layout", [P("x", None), P(None, "x"), P(None, None)], ids=str)
def test_embedding_renorm(layout, norm_type):
    mesh = sl.Mesh.simulated({"x": 4})
    table, ids = _f(9, 6, seed=2) * 3, torch.tensor([[0, 8, 3], [3, 5, -1]])
    t = sl.shard(table, mesh, layout)
    with sl.comm_ledger() as led:
        torch.embedding_renorm_(t, ids, 1.5, norm_type)
    want = torch.embedding_renorm_(table.clone(), ids, 1.5, norm_type)
    torch.testing.assert_close(t.full(), want, **TOL)
    assert t.spec == layout
    if layout.dims[1]:  # 4 distinct ids (-1 is 8): one all-reduce of 4 numbers
        assert [(r.kind, r.bytes) for r in led.records] == [("all_reduce", _all_reduce_bytes(4, 4))]
    else:
        assert led.records == []


# == errors ====================================================================
def test_out_of_range_index_on_a_split_table_raises_like_torch():
    mesh = sl.Mesh.simulated({"x": 4})
    t = sl.shard(_f(10, 6), mesh, P("x", None))
    with pytest.raises(IndexError, match="out of bounds"):
        torch.gather(t, 0, torch.full((2, 6), 10))
    with pytest.raises(IndexError, match="out of bounds"):
        t[torch.tensor([-11])]


# == real processes ============================================================
def _programs(mesh: sl.Mesh) -> list:
    """The family's no-communication paths and its gathers, as (value, ledger kinds) pairs."""
    table, ids, src = _f(10, 6, seed=4), _i(10, 4, 6, seed=5), _f(4, 6, seed=7)
    t = sl.shard(table, mesh, P("x", None))
    h = sl.shard(table, mesh, P(None, "x"))
    i = sl.shard(ids, mesh, P("x", None))
    runs = [
        lambda: torch.gather(t, 0, ids),
        lambda: t[ids[:, 0]],
        lambda: t.scatter_add(0, ids, src),
        lambda: t.index_put((ids[:, 0],), src, accumulate=True),
        lambda: t.masked_scatter(t > 0, _f(60, seed=8)),
        lambda: sl.shard(table, mesh, P(None, None)).scatter_add(0, i, src),
        lambda: torch.nonzero(t > 0),
        lambda: torch.embedding_renorm_(h.clone(), ids, 1.0, 2.0),
    ]
    out = []
    for run in runs:
        with sl.comm_ledger() as led:
            y = run()
        out.append((y.full(), [r.kind for r in led.records]))
    return out


@pytest.mark.slow
@pytest.mark.dist
def test_four_gloo_ranks_match_the_simulated_mesh(workers4):
    """Slow tier (worker start-up): the same values and ledgers on 4 gloo ranks."""
    sim = _programs(sl.Mesh.simulated({"x": 4}))
    for rank_out in workers4.run(_programs, {"x": 4}, ()):
        for (got, kinds), (want, sim_kinds) in zip(rank_out, sim):
            torch.testing.assert_close(got, want, **TOL)
            assert kinds == sim_kinds
    gathers = [["all_gather"], [], ["all_gather"], ["all_reduce"]]  # the split mask, ..., renorm
    assert [k for _, k in sim] == [[]] * 4 + gathers
