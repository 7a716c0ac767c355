"""Storage families without weak references to tensors (`_aliasing`, `_tensor.Record`).

`Module._apply` (module.double(), .to(dtype), .half()) converts a sharded parameter with
`torch.utils.swap_tensors`, which refuses a tensor that has a weak reference. Families
therefore reference their members' records weakly, never the tensors. Covered here:
no ShardedTensor (views, roots, parameters, linked copies) is weakly referenced; a
dropped view or root frees its shards by reference counting alone (the garbage
collector is disabled while it is checked, and a weak reference to a *plain shard
tensor* tells whether the storage is gone); a converted parameter behaves exactly as a
Parameter made from the converted tensor (writes through it and its views, in-place
reduction of a partial family, `.data =`, the gradient's layout), the reference being
the same program on plain torch in float64 with integer values (exact comparisons);
and `.data =` re-points what the old storage's family needs (views kept after a
partial family was reduced, a linked copy's link), again against plain torch.
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

import shardlib as sl
from shardlib import P
from shardlib.ops._tensor import record_of

MESH = sl.Mesh.simulated({"x": 4})


def sh(t: torch.Tensor, layout: sl.Layout) -> sl.ShardedTensor:
    return sl.shard(t, MESH, layout)


def _ints(*shape: int) -> torch.Tensor:
    return torch.arange(float(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)


def _partial_sum(value: torch.Tensor) -> sl.ShardedTensor:
    """Integer-valued, non-trivial summands of `value` over "x" (exact sums)."""
    parts = [torch.full_like(value, float(i + 1)) for i in range(3)]
    parts.append(value - sum(parts))
    layout = P(*([None] * value.ndim), partial="x")
    return sl.from_local(parts, MESH, layout, tuple(value.shape))


@contextmanager
def _no_gc() -> Iterator[None]:
    """Only reference counting frees objects inside (a cycle would survive)."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# == lifetime ====================================================================
_ALIAS_VIEWS: dict[str, Callable[[sl.ShardedTensor], sl.ShardedTensor]] = {
    "slice of an unsplit dim": lambda x: x[:, 1:3],
    "view": lambda x: x.view(8, 4),
    "detach": lambda x: x.detach(),
    "Parameter": lambda x: torch.nn.Parameter(x),
    "view of a view": lambda x: x.t()[1:3],
}


@pytest.mark.parametrize("drop_view_first", [True, False])
@pytest.mark.parametrize("make", list(_ALIAS_VIEWS.values()), ids=list(_ALIAS_VIEWS))
def test_a_dropped_view_and_root_free_their_shards_by_refcount(make, drop_view_first):
    with _no_gc():
        x = sh(_ints(8, 4), P("x", None))
        v = make(x)
        assert v._root is x  # an alias view: it shares x's storage
        assert weakref.getweakrefs(x) == [] and weakref.getweakrefs(v) == []
        shard = weakref.ref(x._shards[0])  # a plain tensor: its storage lives while x does
        if drop_view_first:
            del v
            assert shard() is not None
            assert all(r() is None for r in x._views)  # the registry holds no dead view
            del x
        else:
            del x
            assert shard() is not None  # the view keeps its root alive
            del v
        assert shard() is None


def test_a_linked_copy_is_not_weakly_referenced():
    x = sh(_ints(8, 4), P("x", None))
    c = x[1:5]  # a slice across the split dim: a copy, linked to x
    assert c._link is not None and x._linked
    assert weakref.getweakrefs(x) == [] and weakref.getweakrefs(c) == []
    x.mul_(2)
    assert torch.equal(c.full(), 2 * _ints(8, 4)[1:5])


def test_many_dropped_views_leave_a_pruned_registry():
    x = sh(_ints(8, 4), P("x", None))
    keep = [x[:, 1:3] for _ in range(3)]
    for _ in range(200):
        x.view(32)
    assert len(x._views) < 64  # pruned when it doubles
    assert sum(r() is not None for r in x._views) == len(keep)


# == module conversion ===========================================================
def _pair(
    weight_layout: sl.Layout, partial: bool = False
) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """A plain Linear(4, 8) with integer weights and its copy with sharded parameters."""
    plain = torch.nn.Linear(4, 8)
    with torch.no_grad():
        plain.weight.copy_(_ints(8, 4) - 13)
        plain.bias.copy_(torch.arange(8.0) - 3)
    sharded = copy.deepcopy(plain)
    w = plain.weight.detach().clone()
    sharded.weight = torch.nn.Parameter(_partial_sum(w) if partial else sh(w, weight_layout))
    sharded.bias = torch.nn.Parameter(sh(plain.bias.detach().clone(), P("x")))
    return plain, sharded


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64)])
def test_a_converted_parameter_is_as_one_made_from_the_converted_tensor(convert):
    plain, sharded = _pair(P("x", None))
    x = torch.arange(12.0).reshape(3, 4) - 5
    plain(x).sum().backward()
    sharded(sh(x, P())).sum().backward()  # gradients are converted too
    made = torch.nn.Parameter(sharded.weight.detach().double())  # the reference Parameter
    convert(plain)
    convert(sharded)
    p, ref = sharded.weight, plain.weight
    assert isinstance(p, torch.nn.Parameter) and p.dtype == torch.float64 == p.grad.dtype
    assert (p.spec, p._root is not None, p.requires_grad) == (
        made.spec,
        made._root is not None,
        made.requires_grad,
    )
    assert torch.equal(p.full(), ref) and torch.equal(p.grad.full(), ref.grad)
    for q in sharded.parameters():
        assert weakref.getweakrefs(q) == [] and all(s.dtype == torch.float64 for s in q._shards)
    # writes through the parameter and through its views
    v, v_ref = p[:, 1:3], ref[:, 1:3]
    with torch.no_grad():
        p.mul_(2)
        ref.mul_(2)
        v.add_(1)
        v_ref.add_(1)
    assert torch.equal(p.full(), ref) and torch.equal(v.full(), v_ref)
    # the gradient hook follows the swap: a full-size partial gradient arriving at the
    # parameter is reduce-scattered to its blocks, as at a Parameter made from the tensor
    for q in (p, made):
        cotangent = _partial_sum(_ints(8, 4))
        with sl.comm_ledger() as led:
            (g,) = torch.autograd.grad(sl.reshard(q, q.spec), q, grad_outputs=cotangent)
        assert g.spec == q.spec == P("x", None) and torch.equal(g.full(), _ints(8, 4))
        assert [(r.kind, r.cause) for r in led.records] == [("reduce_scatter", "grad")]
    # `.data =` after the swap: views taken before keep the old storage, as in torch
    with torch.no_grad():
        p.data = p.data * 3
        ref.data = ref.data * 3
        v.mul_(-1)
        v_ref.mul_(-1)
    assert torch.equal(p.full(), ref) and torch.equal(v.full(), v_ref)


def test_conversion_frees_the_old_shards_by_refcount():
    with _no_gc():
        plain, sharded = _pair(P("x", None))
        old = [weakref.ref(s) for p in sharded.parameters() for s in (*p._shards, *p._root._shards)]
        sharded.double()
        assert all(r() is None for r in old)
        assert all(s.dtype == torch.float64 for p in sharded.parameters() for s in p._shards)


def test_a_converted_partial_parameter_reduces_its_family_in_place():
    plain, sharded = _pair(P(), partial=True)
    sharded.double()
    plain.double()
    p, ref = sharded.weight, plain.weight
    assert p.spec.partial == ("x",) and weakref.getweakrefs(p) == []
    v, v_ref = p[2:5], ref[2:5]
    with torch.no_grad(), sl.comm_ledger() as led:
        p.relu_()  # needs the value: the family is reduced in place first
        ref.relu_()
    assert [r.kind for r in led.records] == ["all_reduce"]
    assert not p.spec.partial and not v.spec.partial
    assert torch.equal(p.full(), ref) and torch.equal(v.full(), v_ref)


# == `.data =` and what the old storage's family needs ==============================
def test_data_assignment_after_a_reduction_keeps_views_on_the_old_storage():
    ref = _ints(8, 4) - 10
    t = _partial_sum(ref.clone())
    v, v_ref = t[0:4], ref[0:4]
    t.relu_()  # reduces the family in place: t and v drop the partial axis
    ref.relu_()
    t.data = t.data * 3
    ref.data = ref.data * 3
    w, w_ref = t[2:6], ref[2:6]
    w.add_(v)  # v is on the old storage: no overlap with w (torch does not refuse it)
    w_ref.add_(v_ref)
    v.mul_(-1)
    v_ref.mul_(-1)
    for got, want in ((t, ref), (v, v_ref), (w, w_ref)):
        assert torch.equal(got.full(), want)


def test_data_assignment_of_a_linked_copy_and_then_of_its_base():
    ref = _ints(8, 4)
    b = sh(ref.clone(), P("x", None))
    c, c_ref = b[1:5], ref[1:5]  # across the split dim: a copy linked to b
    v, v_ref = c[0:2], c_ref[0:2]  # an alias of c's storage
    c.data = c.data * 3  # v keeps c's old storage, which is b's
    c_ref.data = c_ref.data * 3
    b.data = b.data * 5  # v keeps b's old storage
    ref.data = ref.data * 5
    v.mul_(10)
    v_ref.mul_(10)
    for got, want in ((b, ref), (c, c_ref), (v, v_ref)):
        assert torch.equal(got.full(), want)


def test_a_record_names_the_attributes_of_the_tensor_that_holds_it():
    x, y = sh(_ints(8, 4), P("x", None)), sh(_ints(8, 4) + 1, P(None, "x"))
    rx, ry = record_of(x), record_of(y)
    assert record_of(x) is rx and rx.attrs is x.__dict__
    torch.utils.swap_tensors(x, y)  # exchanges dicts and slots together
    assert record_of(x) is ry and ry.attrs is x.__dict__ and x.spec == P(None, "x")
    z = sh(_ints(8, 4), P())
    z.__dict__.update(x.__dict__)  # a copied dict carries the flag but not the slot
    assert record_of(z).attrs is z.__dict__ and record_of(z) is not ry
