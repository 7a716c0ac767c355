"""`sl.capture` on random programs: a replay equals an eager call, bit for bit.

Hypothesis writes short programs over 2-D float64 tensors on the simulated mesh
{x: 2, y: 2}: elementwise ops, broadcasting against reductions, reductions over a split dim
left as partial sums, softmax, gelu, where, matmuls, transposes, reshapes (a
reshape that is not a transpose moves data between devices), slices and
concatenations, layer norm, log-softmax, max, cumsum, index gathers, pads, flips,
rolls, expands, clamps, ``sl.einsum`` to a sampled output layout, reshards to layouts 4 and 6 do not always divide, detach, in-place
adds into intermediates, and in-place writes through views (transpose, flatten,
slices) that must reach their base. Each program's leaves take random layouts; the program
sums everything into a loss and calls ``backward``.

The captured program is recorded on one set of values and replayed on another.
The replay's result, its loss and every leaf's ``.grad`` must equal an eager call
on the same values exactly (a replay runs the recorded ops in the recorded order,
so there is no tolerance to give), the ledger must list the eager call's records,
and the eager call itself must equal the same program on plain float64 tensors
(rtol 1e-10: shardlib's own Numerics bar), so the comparison is not of two wrong
answers. The same check runs on 4 gloo ranks for 40 programs drawn with a fixed
seed, where a replay's collectives are torch's functional ones.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib import P

from .test_capture import _rows  # the ledger rows replay and eager must share

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MESH = {"x": 2, "y": 2}
SHAPE = (4, 6)
LAYOUTS = [P(), P("x"), P(None, "y"), P("x", "y"), P("y", "x"), P(("x", "y")), P(None, ("x", "y"))]
OPS = ["add", "mul", "tanh", "scale", "t", "mm", "center", "softmax", "reshard", "detach",
       "inplace", "reshape", "slice", "cat", "where", "rowsum", "gelu", "viewwrite",
       "layernorm", "logsoftmax", "amax", "cumsum", "gather", "pad", "flip", "roll", "expand",
       "clamp", "einsum"]  # fmt: skip


def _apply(op: str, a, b, k: int):
    """One step of a program; `a`, `b` are earlier values, `k` a free choice."""
    if op in ("add", "mul", "inplace"):
        other = b if a.shape == b.shape else b.sum()
        if op == "add":
            return a + other
        if op == "mul":
            return a * other
        out = a * 1.0  # an intermediate, so the in-place add is legal under autograd
        return out.add_(other)
    if op == "tanh":
        return torch.tanh(a)
    if op == "scale":
        return a * 0.5
    if op == "t":
        return a.t()
    if op == "mm":
        if a.shape[1] == b.shape[0]:
            return (a @ b) / a.shape[1]
        if a.shape[1] == b.shape[1]:
            return (a @ b.t()) / a.shape[1]
        return (a @ a.t()) / a.shape[1]
    if op == "center":
        return a - a.mean(dim=k % 2, keepdim=True)
    if op == "softmax":
        return torch.softmax(a, dim=k % 2)
    if op == "reshard":
        return sl.reshard(a, LAYOUTS[k % len(LAYOUTS)]) if isinstance(a, sl.ShardedTensor) else a
    if op == "detach":
        return a * b.detach() if a.shape == b.shape else a * b.detach().sum()
    if op == "reshape":
        return a.reshape(a.shape[1], a.shape[0])
    if op == "slice":  # rows from 1, or every other column
        return a[1:] if k % 2 or a.shape[1] < 2 else a[:, ::2]
    if op == "cat":
        d = k % 2
        if a.shape[1 - d] == b.shape[1 - d]:
            return torch.cat([a, b], dim=d)
        return torch.cat([a, a], dim=d)
    if op == "where":
        return torch.where(a > 0, a, b) if a.shape == b.shape else torch.where(a > 0, a, -a)
    if op == "rowsum":  # a partial sum over a split dim, left unreduced for later ops
        return a.sum(dim=k % 2, keepdim=True)
    if op == "gelu":
        return torch.nn.functional.gelu(a)
    if op == "layernorm":
        return torch.nn.functional.layer_norm(a, a.shape[-1:])
    if op == "logsoftmax":
        return torch.log_softmax(a, dim=k % 2)
    if op == "amax":  # a max over a split dim, broadcast back
        return a - a.amax(dim=k % 2, keepdim=True)
    if op == "cumsum":
        return a.cumsum(dim=k % 2) / a.shape[k % 2]
    if op == "gather":  # rows picked by an index (advanced indexing)
        return a[torch.tensor([k % a.shape[0], 0, a.shape[0] - 1])]
    if op == "pad":
        return torch.nn.functional.pad(a, (1, 0, 0, 1))
    if op == "flip":
        return a.flip(k % 2)
    if op == "roll":
        return a.roll(1 + k % 3, dims=k % 2)
    if op == "expand":
        return a * a[:, :1].expand_as(a)
    if op == "clamp":
        return a.clamp(-0.5, 0.5)
    if op == "einsum":  # the contraction engine, to a chosen output layout
        other = b if b.shape[1] == a.shape[1] else a
        if not isinstance(a, sl.ShardedTensor):
            return torch.einsum("ij,kj->ik", a, other) / a.shape[1]
        return sl.einsum("ij,kj->ik", a, other, out_layout=LAYOUTS[k % len(LAYOUTS)]) / a.shape[1]
    if op == "viewwrite":  # an in-place write through a view reaches its base
        out = a * 1.0
        view = (out.t(), out.reshape(-1), out[1:], out[:, ::2])[k % 4]
        view.mul_(2.0)
        return out
    raise AssertionError(op)


def _program(ops):
    def fn(leaves):
        for leaf in leaves:
            leaf.grad = None
        values = list(leaves)
        for op, i, j, k in ops:
            values.append(_apply(op, values[i % len(values)], values[j % len(values)], k))
        loss = sum(v.sum() for v in values[len(leaves) :]) + sum(v.sum() for v in leaves)
        loss.backward()
        return loss, values[-1]

    return fn


def _full(t):
    return t.full() if isinstance(t, sl.ShardedTensor) else t


def _leaves(mesh, layouts, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for lay in layouts:
        x = sl.shard(torch.randn(SHAPE, generator=g, dtype=torch.float64), mesh, lay)
        out.append(x.requires_grad_())
    return out


op_steps = st.tuples(st.sampled_from(OPS), st.integers(0, 9), st.integers(0, 9), st.integers(0, 13))


def replay_and_eager(mesh, layouts: list[int], ops) -> dict:
    """Record on one set of values, replay on another, and run eagerly on those: the
    replay's values and the eager ones (full tensors: result, loss, every ``.grad``),
    whether the ledgers agree and how many programs were recorded."""
    lays = [LAYOUTS[i] for i in layouts]
    fn = _program(ops)
    captured = sl.capture(fn)
    captured(_leaves(mesh, lays, seed=1))  # recorded (an eager call)

    leaves = _leaves(mesh, lays, seed=2)
    with sl.comm_ledger() as replayed:
        loss, last = captured(leaves)
    got = [_full(loss), _full(last), *(_full(x.grad) for x in leaves)]

    leaves = _leaves(mesh, lays, seed=2)
    with sl.comm_ledger() as eager:
        loss, last = fn(leaves)
    want = [_full(loss.detach()), _full(last.detach()), *(_full(x.grad) for x in leaves)]
    return {
        "got": got,
        "want": want,
        "same_ledger": _rows(replayed) == _rows(eager),
        "programs": sum(map(len, captured.programs.values())),
        "inputs": [_full(x).detach() for x in leaves],
    }


def check(run: dict, ops, where: str = "") -> None:
    """The replay equals eager exactly; eager equals the plain float64 program."""
    assert run["programs"] == 1, (where, ops)  # the second call replayed
    for i, (g, w) in enumerate(zip(run["got"], run["want"], strict=True)):
        assert torch.equal(g, w), (where, i, ops, (g - w).abs().max())
    assert run["same_ledger"], (where, ops)
    plain = [x.clone().requires_grad_() for x in run["inputs"]]
    loss, last = _program(ops)(plain)
    reference = [loss.detach(), last.detach(), *(x.grad for x in plain)]
    for i, (w, r) in enumerate(zip(run["want"], reference, strict=True)):
        torch.testing.assert_close(
            w, r, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"{where} {i} {ops}: {m}"
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layouts=st.lists(st.sampled_from(range(len(LAYOUTS))), min_size=1, max_size=3),
    ops=st.lists(op_steps, min_size=1, max_size=7),
)
def test_a_replayed_random_program_equals_eager(layouts, ops):
    check(replay_and_eager(sl.Mesh.simulated(MESH), layouts, ops), ops)


def _random_programs(n: int, seed: int) -> list[tuple[list[int], list[tuple]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        layouts = [rng.randrange(len(LAYOUTS)) for _ in range(rng.randint(1, 3))]
        ops = [
            (rng.choice(OPS), rng.randrange(10), rng.randrange(10), rng.randrange(14))
            for _ in range(rng.randint(1, 7))
        ]
        out.append((layouts, ops))
    return out


def replay_programs_on_rank(mesh, programs) -> list[dict]:
    return [replay_and_eager(mesh, layouts, ops) for layouts, ops in programs]


@pytest.mark.dist
def test_replayed_random_programs_on_gloo_4_ranks(workers4):
    """The same check on real processes, where a replay's collectives are torch's
    functional ones: 40 programs drawn with a fixed seed, every rank."""
    programs = _random_programs(40, seed=0)
    ranks = workers4.run(replay_programs_on_rank, MESH, (programs,))
    for rank, runs in enumerate(ranks):
        for (_, ops), run in zip(programs, runs, strict=True):
            check(run, ops, f"rank {rank}")
