"""`torch.compile` of sharded code: the GPT training step and shardlib's entry points.

The Must-show of issue 9 (Deliver 4): ``torch.compile(fullgraph=True)`` of the
GPT step (`gpt.loss` under ``with snn.use(scheme, mesh):``, forward, then
``.backward()`` on the compiled loss, which runs AOTAutograd's compiled
backward) under tp1d and dp+tp2d:

- has zero graph breaks (`torch._dynamo.explain`: one graph, no break);
- with the aot_eager and inductor backends gives the eager sharded step's loss
  and every gradient (rtol 1e-5), in the same layouts as eager leaves them,
  on the simulated mesh and on 4 gloo ranks (`dist`); a second call reuses the
  compiled graph (one compilation, counted by a wrapping backend);
- every call (the first, which traces, and the second, which only runs the
  compiled graph) records exactly the eager step's collectives in the ledger,
  in eager's order (forward and backward);
- the eager step it is compared with equals the unsharded float64 model
  (rtol 1e-5), so the comparison is against an independent reference.

Entry points that build ShardedTensors in Python (`sl.reshard`,
`sl.with_layout`, `sl.einsum`, `x.full()`, `sl.shard`, `sl.from_local`,
`x.local_shards()`, ``x.spec`` of an intermediate) are one graph node or a
traced constant: a function using them compiles with ``fullgraph=True`` and
its value and gradient equal eager's. The active scheme is guarded: the same
compiled function called under another scheme recompiles (and follows it),
and under an equal scheme again reuses its graph; `snn.use` inside the
compiled function is refused with the fix (enter it around the call).

Tiers (compiling is slow on a small shared machine): the default tier runs
tp1d under aot_eager, dp+tp2d's graph-break check, and inductor on a small
sharded graph; the GPT step under inductor (simulated tp1d and dp+tp2d, gloo
tp1d) and dp+tp2d under aot_eager are in the slow tier.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny: every size divides 2 and 4 (tp=4 on gloo must align heads and kv heads)
CONFIG = gpt.Config(vocab=12, dim=16, heads=4, layers=1, seq=8)
SCHEMES = {
    "tp1d": (lambda: snn.tp1d("tp"), {"tp": 2}),
    "dp+tp2d": (lambda: snn.dp("dp") + snn.tp2d("r", "c"), {"dp": 2, "r": 2, "c": 2}),
}
RTOL, ATOL = 1e-5, 1e-6


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randint(0, CONFIG.vocab, (4, CONFIG.seq), generator=g)
        for k in ("tokens", "targets")
    }


def loss_fn(params, batch):
    return gpt.loss(params, batch, CONFIG)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given, then runs `inner`."""

    def __init__(self, inner: str):
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)


def sharded(mesh, scheme, dtype=torch.float32):
    params = snn.shard_params(
        {k: v.to(dtype) for k, v in gpt.init(CONFIG, 0).items()}, mesh, scheme, gpt.DIMS(CONFIG)
    )
    for v in params.values():
        v.requires_grad_()
    return params, scheme.shard_batch(make_batch(), mesh)


def step(fn, params, batch, scheme, mesh):
    """One forward + backward: the loss and every gradient (global values and layouts), and
    the ledger of the step itself (the read-outs by `.full()` after it are not in it)."""
    for v in params.values():
        v.grad = None
    with snn.use(scheme, mesh), sl.comm_ledger() as led:
        loss = fn(params, batch)
        loss.backward()
    records = [(r.kind, r.axes, r.bytes, r.direction, r.cause) for r in led.records]
    return loss.full(), {k: (v.grad.full(), v.grad.spec) for k, v in params.items()}, records


def compare(got, want) -> None:
    (loss, grads, _), (ref_loss, ref_grads, _) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    for k, (g, spec) in ref_grads.items():
        torch.testing.assert_close(grads[k][0], g, rtol=RTOL, atol=ATOL, msg=k)
        assert grads[k][1] == spec, f"{k}: compiled grad in {grads[k][1]!r}, eager in {spec!r}"


def compiled_matches_eager(mesh, name: str, backend: str) -> int:
    """Eager vs compiled (two calls) on `mesh`; returns the number of graphs compiled.

    The first compiled call (it traces) and the second (it only runs the graph) each record
    exactly the eager step's collectives, in eager's order."""
    torch._dynamo.reset()
    make_scheme, _ = SCHEMES[name]
    scheme = make_scheme()
    params, batch = sharded(mesh, scheme)
    eager = step(loss_fn, params, batch, scheme, mesh)
    counting = CountingBackend(backend)
    fn = torch.compile(loss_fn, backend=counting, fullgraph=True, dynamic=False)
    first = step(fn, params, batch, scheme, mesh)
    compare(first, eager)
    assert eager[2] and first[2] == eager[2], "the first call's ledger differs from eager's"
    second = step(fn, params, batch, scheme, mesh)  # the compiled graph, reused
    compare(second, eager)
    assert second[2] == eager[2], "a call that only runs the compiled graph records otherwise"
    return counting.graphs


# ----------------------------------------------------------------------------- simulated


def test_eager_tp1d_step_equals_unsharded_float64():
    """The eager step the compiled one is held to is itself the unsharded model's."""
    scheme, axes = SCHEMES["tp1d"][0](), SCHEMES["tp1d"][1]
    mesh = sl.Mesh.simulated(axes)
    params, batch = sharded(mesh, scheme)
    loss, grads, _ = step(loss_fn, params, batch, scheme, mesh)
    ref = {k: v.double().requires_grad_() for k, v in gpt.init(CONFIG, 0).items()}
    ref_loss = loss_fn(ref, make_batch())
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=RTOL, atol=ATOL)
    for k, v in ref.items():
        torch.testing.assert_close(grads[k][0].double(), v.grad, rtol=RTOL, atol=ATOL, msg=k)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_gpt_step_has_no_graph_breaks(name):
    torch._dynamo.reset()
    make_scheme, axes = SCHEMES[name]
    mesh, scheme = sl.Mesh.simulated(axes), make_scheme()
    params, batch = sharded(mesh, scheme)
    with snn.use(scheme, mesh):
        explained = torch._dynamo.explain(loss_fn)(params, batch)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize(
    "name, backend",
    [
        ("tp1d", "aot_eager"),
        pytest.param("dp+tp2d", "aot_eager", marks=pytest.mark.slow),
        pytest.param("tp1d", "inductor", marks=pytest.mark.slow),
        pytest.param("dp+tp2d", "inductor", marks=pytest.mark.slow),
    ],
)
def test_compiled_gpt_step_equals_eager(name, backend):
    graphs = compiled_matches_eager(sl.Mesh.simulated(SCHEMES[name][1]), name, backend)
    assert graphs == 1  # fullgraph, and the second call reused it


def test_entry_points_are_graph_nodes():
    """reshard, with_layout, einsum, full, shard and from_local inside one compiled graph."""
    torch._dynamo.reset()
    mesh = sl.Mesh.simulated({"x": 2, "y": 2})
    a = sl.shard(
        torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), mesh, sl.P("x", "y")
    )
    a.requires_grad_()
    b = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))

    def fn(a, b):
        bs = sl.shard(b, mesh, sl.P("y", None))
        y = sl.einsum("ij,jk->ik", sl.reshard(a, sl.P("x", "y")), bs, out_layout=sl.P("x", None))
        y = sl.with_layout(y.relu() * 2, sl.P(None, "y"))
        z = sl.from_local([s + 1 for s in y.local_shards()], mesh, y.spec, tuple(y.shape))
        return (y.full() ** 2).sum() + z.full().sum()

    want = fn(a, b)
    want.backward()
    want_grad, a.grad = a.grad.full(), None
    counting = CountingBackend("aot_eager")
    got = torch.compile(fn, backend=counting, fullgraph=True, dynamic=False)(a, b)
    got.backward()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(a.grad.full(), want_grad, rtol=RTOL, atol=ATOL)
    assert counting.graphs == 1


def test_another_scheme_recompiles_and_is_followed():
    """Same params (tp1d and Megatron-SP store them alike), other activation layouts."""
    torch._dynamo.reset()
    mesh = sl.Mesh.simulated({"tp": 2})
    plain, sp = snn.tp1d("tp"), snn.tp1d("tp", sequence=True)
    params, batch = sharded(mesh, plain)
    counting = CountingBackend("eager")
    fn = torch.compile(
        lambda p, b: gpt.logits(p, b, CONFIG), backend=counting, fullgraph=True, dynamic=False
    )
    spec = {}
    for name, scheme in (("plain", plain), ("sp", sp), ("plain again", snn.tp1d("tp"))):
        with snn.use(scheme, mesh), sl.comm_ledger() as led:
            spec[name] = fn(params, batch).spec
        spec[name + " gathers"] = led.count("all_gather")
    assert counting.graphs == 2  # tp1d, SP; an equal tp1d scheme reuses the first graph
    with snn.use(sp, mesh), sl.comm_ledger() as led:
        eager_sp = gpt.logits(params, batch, CONFIG)
    assert spec["sp"] == eager_sp.spec
    assert spec["sp gathers"] == led.count("all_gather") > 0  # SP gathers the sequence
    assert spec["plain gathers"] == 0


def test_use_inside_the_compiled_function_names_the_fix():
    """`snn.use` sets a context variable dynamo cannot trace: the error says to enter it
    around the compiled call (without fullgraph it is a graph break, and runs eagerly)."""
    torch._dynamo.reset()
    make_scheme, axes = SCHEMES["tp1d"]
    mesh, scheme = sl.Mesh.simulated(axes), make_scheme()
    params, batch = sharded(mesh, scheme)

    def inside(p, b):
        with snn.use(scheme, mesh):
            return loss_fn(p, b)

    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"snn.use.*around the compiled call"):
        torch.compile(inside, backend="eager", fullgraph=True)(params, batch)


def test_inductor_compiles_a_sharded_contraction():
    """Inductor on a small sharded graph (the GPT step's inductor runs are in the slow tier):
    a column-split matmul, a reshard to rows, a vocab-parallel-style softmax reduction.
    Every call records eager's collectives into the ledgers open when it runs (the first
    call, which compiles, runs with none open)."""
    torch._dynamo.reset()
    mesh = sl.Mesh.simulated({"tp": 2})
    g = torch.Generator().manual_seed(0)
    x = sl.shard(torch.randn(4, 6, generator=g), mesh, sl.P())
    w = sl.shard(torch.randn(6, 8, generator=g), mesh, sl.P(None, "tp")).requires_grad_()

    def fn(x, w):
        y = sl.reshard(torch.nn.functional.gelu(x @ w), sl.P("tp", None))
        return torch.log_softmax(y, -1).sum()

    with sl.comm_ledger() as eager:
        want = fn(x, w)
        want.backward()
    assert eager.count("all_to_all", "forward") == eager.count("all_to_all", "backward") == 1
    want_grad, w.grad = w.grad.full(), None
    counting = CountingBackend("inductor")
    compiled = torch.compile(fn, backend=counting, fullgraph=True, dynamic=False)
    for call in range(3):
        w.grad = None
        with contextlib.ExitStack() as ledgers:
            open_now = [ledgers.enter_context(sl.comm_ledger()) for _ in range(min(call, 2))]
            got = compiled(x, w)
            got.backward()
        for led in open_now:  # none on the first call, then one, then two nested
            assert led.records == eager.records, f"call {call}"
        torch.testing.assert_close(got.full(), want.full(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(w.grad.full(), want_grad, rtol=RTOL, atol=ATOL)
        assert w.grad.spec == w.spec
    assert counting.graphs == 1


# ----------------------------------------------------------------------------- gloo


def _on_rank(mesh, name: str, backend: str) -> int:
    torch.set_num_threads(1)
    return compiled_matches_eager(mesh, name, backend)


@pytest.mark.dist
@pytest.mark.parametrize(
    "name, axes, backend",
    [
        ("tp1d", {"tp": 4}, "aot_eager"),
        pytest.param("tp1d", {"tp": 4}, "inductor", marks=pytest.mark.slow),
    ],
)
def test_compiled_gpt_step_equals_eager_on_gloo_4_ranks(workers4, name, axes, backend):
    # each rank compiles the step (a minute or more on a shared machine): a longer call
    # timeout than the pool's 60 s; the ranks compile side by side, so no collective waits long
    assert workers4.run(_on_rank, axes, (name, backend), timeout=900) == [1, 1, 1, 1]
