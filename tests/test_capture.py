"""`sl.capture`: a recorded step replays to the same numbers, ledger and gradient layouts.

A GPT training step (zero the grads, ``gpt.loss`` under the scheme, ``.backward()``) is
captured under every preset on simulated meshes: recorded on one batch, then replayed on
another. The replay's loss and every gradient must equal the unsharded float64 model on
the replayed batch (rtol 1e-9, the Numerics bar of tests/test_gpt_schemes.py: dropout
included, the masks drawn from torch's generator in eager's order), every ``.grad`` must
have its parameter's local shapes, and the ledger must list the eager step's records
(kind, axes, bytes, direction, cause) of the recording, an eager step, in its order. A step that updates its arguments
in place (SGD) follows eager's trajectory over three steps; another argument shape records
a second program. The same replay runs on 4 gloo ranks in float32 (rtol 1e-5 against the
float64 reference; the replay equals the rank's eager step to 1e-6).

What a replay could not repeat raises `CaptureError` naming the fix: a value read into
Python, a gradient reaching a leaf that is not an argument, a counter-mode `sl.rng`
opened outside the function, a simulated multi-device `sl.shard_map` (ring attention on
a simulated mesh).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

from .test_gpt_schemes import (
    CONFIGS,
    F64,
    MESHES,
    SCHEMES,
    _compare,
    _config_for,
    make_batch,
    make_params,
    reference,
)

SIMULATED = [n for n in SCHEMES if not n.startswith("ring")]  # ring: threads (see below)


def _rows(led) -> list[tuple]:
    return [(r.kind, r.axes, r.bytes, r.direction, r.cause) for r in led.records]


def _setup(mesh, name: str, shape: str, dtype):
    c, b, s = CONFIGS[_config_for(name, shape)]
    scheme = SCHEMES[name]()
    params = snn.shard_params(make_params(c, dtype), mesh, scheme, gpt.DIMS(c))
    for v in params.values():
        v.requires_grad_()

    def step(params, batch):
        for v in params.values():
            v.grad = None
        with snn.use(scheme, mesh):
            value = gpt.loss(params, batch, c)
            value.backward()
        return value

    def batch(seed: int):
        return scheme.shard_batch(make_batch(c, b, s, seed=seed), mesh)

    return params, step, batch


def run_captured(mesh, name: str, shape: str, dtype=F64):
    """Replayed loss, full gradients, the plain batch, the replay's ledger rows and the
    recording's (an eager step), gradient local-shape mismatches and the replay's largest
    difference from an eager step on the same batch."""
    params, step, batch = _setup(mesh, name, shape, dtype)
    captured = sl.capture(step)
    torch.manual_seed(0)
    with sl.comm_ledger() as recorded:  # an eager step, on other tokens
        captured(params, batch(seed=7))
    replayed = batch(seed=1)
    torch.manual_seed(0)
    with sl.comm_ledger() as led:
        value = captured(params, replayed)
    assert len(captured.programs) == 1, "the same signature recorded twice"
    assert not value.requires_grad
    grads = {k: v.grad.full() for k, v in params.items()}
    mismatched = sorted(
        k
        for k, v in params.items()
        if [t.shape for t in v.grad.local_shards()] != [t.shape for t in v.local_shards()]
    )
    torch.manual_seed(0)
    eager = step(params, replayed)
    diff = max(
        [(eager.detach().full() - value.full()).abs().max().item()]
        + [(v.grad.full() - grads[k]).abs().max().item() for k, v in params.items()]
    )
    plain = {k: v.full() if isinstance(v, sl.ShardedTensor) else v for k, v in replayed.items()}
    return value.full(), grads, plain, _rows(led), _rows(recorded), mismatched, diff


@pytest.mark.parametrize("shape", ["even", "uneven"])
@pytest.mark.parametrize("name", SIMULATED)
def test_replay_matches_unsharded_float64_and_eager_ledger(name, shape):
    mesh = sl.Mesh.simulated(MESHES[name])
    loss, grads, plain, rows, eager_rows, mismatched, _ = run_captured(mesh, name, shape)
    _compare((loss, grads), reference(name, shape, plain), rtol=1e-9, atol=1e-12)
    assert not mismatched, f"grad local shapes != param local shapes: {mismatched}"
    assert rows == eager_rows


def test_replay_applies_in_place_updates_of_its_arguments():
    """Three SGD steps inside the captured function follow eager's trajectory."""
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    trajectories = []
    for use_capture in (False, True):
        params, step, batch = _setup(mesh, "dp+tp1d", "even", F64)

        def sgd_step(params, batch, step=step):
            value = step(params, batch)
            with torch.no_grad():
                for v in params.values():
                    v.sub_(0.5 * v.grad)
            return value

        run = sl.capture(sgd_step) if use_capture else sgd_step
        losses = []
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            losses.append(run(params, batch(seed)).detach().full())
        trajectories.append((losses, {k: v.detach().full() for k, v in params.items()}))
    (eager_losses, eager_params), (losses, got) = trajectories
    assert len({float(x) for x in eager_losses}) == 3  # the steps moved the parameters
    for a, b in zip(losses, eager_losses):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for k in eager_params:
        torch.testing.assert_close(got[k], eager_params[k], rtol=1e-12, atol=0, msg=k)


def test_another_argument_shape_records_again():
    mesh = sl.Mesh.simulated({"tp": 2})
    c, _, s = CONFIGS["even"]
    scheme = SCHEMES["tp1d"]()
    params, step, _ = _setup(mesh, "tp1d", "even", F64)
    captured = sl.capture(step)
    for b in (4, 2, 4):
        sb = scheme.shard_batch(make_batch(c, b, s), mesh)
        torch.manual_seed(0)
        value = captured(params, sb)
        grads = {k: v.grad.full() for k, v in params.items()}
        plain = {k: v.full() for k, v in sb.items()}
        want = _reference_for(c, plain)
        _compare((value.full(), grads), want, rtol=1e-9, atol=1e-12)
    assert len(captured.programs) == 2


def _reference_for(c, batch):
    params = {k: v.requires_grad_() for k, v in make_params(c, F64).items()}
    torch.manual_seed(0)
    value = gpt.loss(params, batch, c)
    keys = list(params)
    return value.detach(), dict(zip(keys, torch.autograd.grad(value, [params[k] for k in keys])))


def test_plain_tensors_are_captured_too():
    """No mesh at all: a plain step's replay equals its eager run (float64, exact)."""
    w = torch.randn(5, 3, dtype=F64, requires_grad=True)

    def step(w, x):
        w.grad = None
        value = torch.tanh(x @ w).square().sum()
        value.backward()
        return value

    captured = sl.capture(step)
    captured(w, torch.randn(4, 5, dtype=F64))
    x = torch.randn(4, 5, dtype=F64)
    got, got_grad = captured(w, x), w.grad.clone()
    want = step(w, x)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(got_grad, w.grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------- refusals


def _tp_linear():
    mesh = sl.Mesh.simulated({"x": 2})
    w = sl.shard(torch.randn(4, 3, dtype=F64), mesh, sl.P("x", None)).requires_grad_()
    x = sl.shard(torch.randn(2, 4, dtype=F64), mesh, sl.P(None, "x"))
    return mesh, w, x


def test_reading_a_value_into_python_raises_naming_the_fix():
    _, w, x = _tp_linear()

    def step(w, x):
        value = (x @ w).sum()
        return float(value.full())

    with pytest.raises(sl.CaptureError, match=r"reads a tensor's value.*after the captured call"):
        sl.capture(step)(w, x)


def test_a_gradient_at_a_leaf_that_is_not_an_argument_raises():
    _, w, x = _tp_linear()

    def step(x):
        (x @ w).sum().backward()

    with pytest.raises(sl.CaptureError, match=r"not an argument.*Pass every parameter"):
        sl.capture(step)(x)


def test_a_counter_rng_opened_outside_raises():
    _, _, x = _tp_linear()

    def step(x):
        return F.dropout(x, 0.5)

    with sl.rng("counter", seed=0), pytest.raises(sl.CaptureError, match=r"counter.*inside"):
        sl.capture(step)(x)
    with sl.rng("counter", seed=0):  # opened inside: every call draws the same stream
        pass

    def inside(x):
        with sl.rng("counter", seed=3):
            return F.dropout(x, 0.5)

    captured = sl.capture(inside)
    first, second = captured(x).full(), captured(x).full()
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(second, inside(x).full(), rtol=0, atol=0)


def test_ring_attention_on_a_simulated_mesh_raises_naming_the_fix():
    mesh = sl.Mesh.simulated(MESHES["ring_zigzag"])
    params, step, batch = _setup(mesh, "ring_zigzag", "even", F64)
    with pytest.raises(sl.CaptureError, match=r"shard_map over 2 devices.*sl.launch"):
        sl.capture(step)(params, batch(1))


# ----------------------------------------------------------------------------- gloo

GLOO4 = ["dp+tp1d", "dp+tp1d_sp", "fsdp+tp1d", "ring_zigzag"]


def replay_on_rank(mesh, name: str):
    loss, grads, plain, rows, eager_rows, mismatched, diff = run_captured(
        mesh, name, "even", dtype=torch.float32
    )
    return loss, grads, plain, rows == eager_rows, mismatched, diff


@pytest.mark.dist
@pytest.mark.parametrize("name", GLOO4)
def test_replay_on_gloo_4_ranks_float32(workers4, name):
    axes = dict(MESHES[name])
    if len(axes) == 1:
        axes = {next(iter(axes)): 4}
    for loss, grads, plain, same_ledger, mismatched, diff in workers4.run(
        replay_on_rank, axes, (name,)
    ):
        _compare((loss, grads), reference(name, "even", plain), rtol=1e-5, atol=1e-6)
        assert same_ledger
        assert not mismatched
        assert diff <= 1e-6


def test_gradients_at_entry_are_read_only_where_the_function_accumulates_into_them():
    """A step that resets ``.grad`` replays whether or not grads are there; one that
    accumulates records a program per gradient state and adds into the existing grads."""
    _, w, x = _tp_linear()

    def reset(w, x):
        w.grad = None
        (x @ w).sum().backward()

    def accumulate(w, x):
        (x @ w).sum().backward()

    want = sl.shard(x.full().sum(0)[:, None].expand(4, 3), w.mesh, w.spec).full()
    captured = sl.capture(reset)
    for _ in range(3):  # recorded without a .grad, replayed with one
        captured(w, x)
        torch.testing.assert_close(w.grad.full(), want, rtol=0, atol=1e-12)
    assert len(captured.programs) == 1 and len(next(iter(captured.programs.values()))) == 1
    captured = sl.capture(reset)
    captured(w, x)  # recorded with a .grad (which it does not read), replayed without one
    w.grad = None
    captured(w, x)
    torch.testing.assert_close(w.grad.full(), want, rtol=0, atol=1e-12)
    assert len(next(iter(captured.programs.values()))) == 1
    w.grad = None
    captured = sl.capture(accumulate)
    for k in range(1, 4):
        captured(w, x)
        torch.testing.assert_close(w.grad.full(), k * want, rtol=0, atol=1e-12)
    assert len(next(iter(captured.programs.values()))) == 2  # without a .grad, then with
    w.grad = None
    captured(w, x)  # replays the first program again
    torch.testing.assert_close(w.grad.full(), want, rtol=0, atol=1e-12)


def test_unused_results_are_dropped_and_metadata_writes_replay_exactly():
    mesh, w, x = _tp_linear()

    def unused(w, x):
        _ = (x @ w).sum()  # computed, never used: not replayed
        return x.detach() * 2

    captured = sl.capture(unused)
    captured(w, x)
    x2 = sl.shard(torch.randn(2, 4, dtype=F64), mesh, sl.P(None, "x"))
    torch.testing.assert_close(captured(w, x2).full(), 2 * x2.full(), rtol=0, atol=0)
    (program,) = next(iter(captured.programs.values()))
    assert not any("mm" in op for op in program.ops), program.ops

    def transposed(x):  # t_ changes a block's metadata in place: detach is not forwarded
        y = x.detach().clone()
        y.t_()
        return y * 3

    captured = sl.capture(transposed)
    captured(x)
    torch.testing.assert_close(captured(x2).full(), 3 * x2.full().t(), rtol=0, atol=0)


def test_a_write_through_a_linked_copy_replays_its_write_back():
    """Flattening a tensor split over both dims is a linked copy (its blocks are not views
    of the base's); a write into it is written back, which places each element by its
    coordinates, made from shapes and layouts alone: constants of the program, so
    recording needs no value read and a replay writes back the new values."""
    mesh = sl.Mesh.simulated({"x": 2, "y": 2})

    def write(x):
        out = x * 1.0
        out.reshape(-1)[1:5].mul_(10.0)
        return out

    def value(seed):
        return torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(seed))

    def want(t):
        t = t.clone()
        t.view(-1)[1:5] *= 10.0
        return t

    captured = sl.capture(write)
    captured(sl.shard(value(0), mesh, sl.P("x", "y")))
    got = captured(sl.shard(value(1), mesh, sl.P("x", "y")))
    torch.testing.assert_close(got.full(), want(value(1)), rtol=0, atol=0)
    (program,) = next(iter(captured.programs.values()))
    assert any("index_put" in op for op in program.ops), program.ops


def test_index_and_target_range_checks_run_in_every_replay():
    """Eager raises for an index or a class target out of range; recording cannot read the
    check's value, so the check is an assertion op in the program and every replay makes
    it on its own values."""
    mesh = sl.Mesh.simulated({"x": 2})
    g = torch.Generator().manual_seed(0)
    x = sl.shard(torch.randn(6, 4, dtype=F64, generator=g), mesh, sl.P("x"))
    pick = sl.capture(lambda x, idx: x[idx])
    pick(x, torch.tensor([0, 5]))
    got = pick(x, torch.tensor([1, 2]))
    torch.testing.assert_close(got.full(), x.full()[[1, 2]], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="out of bounds"):
        pick(x, torch.tensor([1, 6]))

    logits = sl.shard(torch.randn(4, 10, dtype=F64, generator=g), mesh, sl.P(None, "x"))
    loss = sl.capture(lambda z, t: F.cross_entropy(z, t))
    loss(logits, torch.tensor([0, 1, 2, 3]))
    t = torch.tensor([9, 1, 5, 3])
    torch.testing.assert_close(
        loss(logits, t).full(), F.cross_entropy(logits.full(), t), rtol=1e-12, atol=0
    )
    with pytest.raises(RuntimeError, match="out of bounds"):
        loss(logits, torch.tensor([10, 1, 2, 3]))


def test_an_argument_that_changes_every_call_warns_naming_it():
    _, w, x = _tp_linear()

    def step(w, x, k):
        return x @ w * k

    captured = sl.capture(step)
    with pytest.warns(
        UserWarning, match=r"recorded 8 programs: flattened argument\(s\) \[2\] \(int\)"
    ):
        for k in range(8):
            torch.testing.assert_close(captured(w, x, k).full(), (x @ w * k).detach().full())
