"""Embedding gradient memory (`embedding_dense_backward` in shardlib/ops/_nn.py).

Covers:
- the whole backward of `F.embedding` on a vocab-split table (ids replicated over
  the vocabulary axes) never allocates a V x H tensor on any device: every CPU
  allocation is measured with torch.profiler (profile_memory=True) and the
  largest stays below the V x H table's bytes, on {"tp": 4}, {"dp": 2, "tp": 2}
  and a table split over two axes, with uneven vocabularies (empty chunks
  included); the measurement itself is checked to see a V x H allocation where
  one exists (the unsharded backward, a gather of the gradient to a replicated
  table);
- the gradient lands in the table's vocab-split layout with no collective in
  the embedding's backward, and equals the unsharded float64 gradient, with
  padding_idx and scale_grad_by_freq too;
- a replicated table under pure data parallelism gets exactly today's
  communication: none in backward (the gradient stays partial over dp) and the
  same all-reduce to finish it; on a 2-D mesh with a replicated table the
  vocab-split gradient finishes at or below the all-reduce's bytes (closed
  forms written in the tests).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib import P

from ._memory import largest_allocation

aten = torch.ops.aten
F64 = 8  # bytes per float64 element


_largest_allocation = largest_allocation


def _case(vocab: int, hidden: int, batch: int = 2, seq: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, dtype=torch.float64, generator=g)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    ids[0, 0], ids[-1, -1] = 0, vocab - 1  # both ends of the vocabulary
    dy = torch.randn(batch, seq, hidden, dtype=torch.float64, generator=g)
    return weight, ids, dy


SPLITS = [
    ({"tp": 4}, P("tp", None), P(None, None), 64),
    ({"tp": 4}, P("tp", None), P(None, None), 50),  # chunks 13, 13, 13, 11
    ({"dp": 2, "tp": 2}, P("tp", None), P("dp", None), 64),
    ({"dp": 2, "tp": 2}, P("tp", None), P("dp", None), 13),  # chunks 7, 6
    ({"a": 2, "b": 4}, P(("a", "b"), None), P(None, None), 20),  # chunks 3 x 6, 2, 0
]


@pytest.mark.parametrize("axes, table, ids_layout, vocab", SPLITS, ids=str)
def test_vocab_split_backward_never_holds_the_table(axes, table, ids_layout, vocab):
    hidden = 16
    mesh = sl.Mesh.simulated(axes)
    weight, ids, dy = _case(vocab, hidden)
    t = sl.shard(weight, mesh, table).requires_grad_()
    i = sl.shard(ids, mesh, ids_layout)
    g = sl.shard(dy, mesh, P(*ids_layout.dims, None))
    y = F.embedding(i, t)
    result = {}

    def backward():
        with sl.comm_ledger() as led:
            (result["grad"],) = torch.autograd.grad(y, t, g)
        result["ledger"] = led

    largest = _largest_allocation(backward)
    table_bytes = vocab * hidden * F64
    assert largest < table_bytes, f"a {largest} B allocation: a V x H table is {table_bytes} B"
    # in fact: a vocabulary chunk (plus the dummy row) or the local gradient rows, at most
    chunk = -(-vocab // mesh.abstract.group_size(table.dims[0]))
    tokens = max(s.numel() for s in i.local_shards())
    assert largest <= max(chunk + 1, tokens) * hidden * F64
    grad = result["grad"]
    assert grad.spec.dims == table.dims and result["ledger"].records == []
    (want,) = torch.autograd.grad(F.embedding(ids, weight.requires_grad_()), weight, dy)
    torch.testing.assert_close(grad.full(), want, rtol=1e-12, atol=1e-12)


def test_the_measurement_sees_a_table_sized_allocation():
    vocab, hidden = 64, 16
    weight, ids, dy = _case(vocab, hidden)
    table_bytes = vocab * hidden * F64
    w = weight.clone().requires_grad_()
    y = F.embedding(ids, w)
    assert _largest_allocation(lambda: torch.autograd.grad(y, w, dy)) >= table_bytes
    mesh = sl.Mesh.simulated({"tp": 4})
    t = sl.shard(weight, mesh, P("tp", None)).requires_grad_()
    y = F.embedding(sl.shard(ids, mesh, P(None, None)), t)
    (grad,) = torch.autograd.grad(y, t, sl.shard(dy, mesh, P()))
    # the gradient gathered to a replicated table: every device holds V x H
    assert _largest_allocation(lambda: sl.reshard(grad, P())) >= table_bytes


@pytest.mark.parametrize("padding, by_freq", [(None, True), (0, False), (37, True), (63, False)])
def test_vocab_split_gradient_with_padding_and_frequencies(padding, by_freq):
    vocab, hidden = 64, 5
    weight, ids, dy = _case(vocab, hidden, batch=3, seq=7, seed=2)
    ids[1, :4] = 37  # a repeated id (frequency 4 or more), also a padding candidate
    kw = {"padding_idx": padding, "scale_grad_by_freq": by_freq}
    for axes, table, ids_layout, vocab_axes in [
        ({"tp": 4}, P("tp", None), P(None, None), ("tp",)),
        # ids replicated over dp too: the gradient is split over both free axes
        ({"dp": 2, "tp": 2}, P("tp", None), P(None, None), ("dp", "tp")),
        # scale_grad_by_freq counts every id: ids unsplit, so dp is free as well
        ({"dp": 3, "tp": 2}, P("tp", None), P("dp", None), ("dp", "tp") if by_freq else ("tp",)),
    ]:
        mesh = sl.Mesh.simulated(axes)
        t = sl.shard(weight, mesh, table).requires_grad_()
        y = F.embedding(sl.shard(ids, mesh, ids_layout), t, **kw)
        (grad,) = torch.autograd.grad(y, t, sl.shard(dy, mesh, P(*y.spec.dims)))
        w = weight.clone().requires_grad_()
        (want,) = torch.autograd.grad(F.embedding(ids, w, **kw), w, dy)
        assert grad.spec.dims == (vocab_axes, ()), (axes, grad.spec)
        torch.testing.assert_close(grad.full(), want, rtol=1e-12, atol=1e-12)


def test_backward_rule_splits_over_the_free_axes_only():
    """The rule, called directly: vocab split over the axes grad and ids leave free."""
    mesh = sl.Mesh.simulated({"a": 2, "b": 3, "c": 2})
    weight, ids, dy = _case(11, 4, batch=4, seq=3)
    dense = aten.embedding_dense_backward.default
    want = dense(dy, ids, 11, -1, False)
    for g_layout, i_layout, expected in [
        (P(), P(), P(("a", "b", "c"), None)),
        (P("a", None, None), P("a", None), P(("b", "c"), None, partial="a")),
        (P(None, None, "b"), P(), P(("a", "c"), "b")),
        (P(None, None, None, partial="c"), P("a", None), P("b", None, partial=("a", "c"))),
        (P("a", "b", "c"), P("a", "b"), P(None, "c", partial=("a", "b"))),  # none free
    ]:
        with sl.comm_ledger() as led:
            got = dense(sl.shard(dy, mesh, g_layout), sl.shard(ids, mesh, i_layout), 11, -1, False)
        assert got.spec == expected and led.records == [], (g_layout, got.spec)
        torch.testing.assert_close(got.full(), want, rtol=1e-12, atol=1e-12)
        # every device holds its vocabulary chunk only
        assert all(
            s.shape[0] <= -(-11 // mesh.abstract.group_size(expected.dims[0]))
            for s in got.local_shards()
        )


# == a replicated table: no extra communication ======================================
def _backward_ledger(axes, ids_layout, vocab=48, hidden=8):
    mesh = sl.Mesh.simulated(axes)
    weight, ids, dy = _case(vocab, hidden, batch=4, seq=3)
    t = sl.shard(weight, mesh, P()).requires_grad_()
    y = F.embedding(sl.shard(ids, mesh, ids_layout), t)
    with sl.comm_ledger() as backward:
        (grad,) = torch.autograd.grad(y, t, sl.shard(dy, mesh, P(*ids_layout.dims, None)))
    with sl.comm_ledger() as finish:
        done = sl.reshard(grad, P())
    w = weight.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.embedding(ids, w), w, dy)
    torch.testing.assert_close(done.full(), want, rtol=1e-12, atol=1e-12)
    return grad, backward, finish


@pytest.mark.parametrize("dp", [2, 4])
def test_pure_data_parallel_table_has_todays_communication(dp):
    vocab, hidden = 48, 8
    grad, backward, finish = _backward_ledger({"dp": dp}, P("dp", None), vocab, hidden)
    assert grad.spec == P(None, None, partial="dp")  # as before: a lazy partial gradient
    assert backward.records == []
    all_reduce = 2 * (dp - 1) * (vocab * hidden // dp) * F64  # ring all-reduce of V x H
    assert [r.kind for r in finish.records] == ["all_reduce"]
    assert finish.total_bytes == all_reduce


@pytest.mark.parametrize("dp, tp", [(2, 2), (4, 2), (2, 3)])
def test_replicated_table_on_a_2d_mesh_finishes_at_or_below_the_all_reduce(dp, tp):
    """Grad vocab-split over the free tp axis, partial over dp: reduce over dp on V/tp rows,
    then gather over tp: 2(dp-1)/dp VH/tp + (tp-1)/tp VH <= 2(dp-1)/dp VH for dp >= 2."""
    vocab, hidden = 48, 8
    axes = {"dp": dp, "tp": tp}
    grad, backward, finish = _backward_ledger(axes, P("dp", None), vocab, hidden)
    assert grad.spec == P("tp", None, partial="dp") and backward.records == []
    rows = vocab // tp
    split = (2 * (dp - 1) * (rows * hidden // dp) + (tp - 1) * rows * hidden) * F64
    before = 2 * (dp - 1) * (vocab * hidden // dp) * F64
    assert finish.total_bytes <= split <= before


def test_replicated_table_with_replicated_ids_pays_one_gather():
    """The known cost of the rule not seeing the table: on a tp axis where grad, ids *and*
    the table are replicated, the gradient comes out vocab-split and finishing it to the
    replicated table is one all-gather, (tp-1)/tp VH (it was a free local slice)."""
    vocab, hidden, tp = 48, 8, 4
    grad, backward, finish = _backward_ledger({"tp": tp}, P(None, None), vocab, hidden)
    assert grad.spec == P("tp", None) and backward.records == []
    assert [r.kind for r in finish.records] == ["all_gather"]
    assert finish.total_bytes == (tp - 1) * (vocab // tp) * hidden * F64
