"""Learning-rate schedules (`sl.optim.*_schedule`, `warmup_cosine`) against torch.optim.lr_scheduler.

Each schedule's value at counts 0..99 equals the learning rate torch's
equivalent scheduler gives an optimizer at that step (read before each
``scheduler.step()``), rtol 1e-12: `constant_schedule` ~ ``ConstantLR(factor=1)``,
`linear_schedule` ~ ``LinearLR`` (and with a ``transition_begin``, ``SequentialLR``
of a constant and a ``LinearLR``), `cosine_decay_schedule` ~ ``CosineAnnealingLR``,
`exponential_decay` ~ ``ExponentialLR``, `warmup_cosine` (and its Optax alias) ~
``SequentialLR(LinearLR, CosineAnnealingLR)``, `join_schedules` ~ ``SequentialLR``.
Also: a schedule holds its final value past its last transition, bad arguments
raise `sl.optim.OptimError` naming the argument, and `sgd` with a schedule equals
torch.optim.SGD driven by ``LambdaLR``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as lrs

import shardlib as sl

STEPS = 100


def _torch_lrs(base_lr: float, make_sched, steps: int = STEPS) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = make_sched(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _ours(schedule, steps: int = STEPS) -> list[float]:
    return [schedule(c) for c in range(steps)]


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for c, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"count {c}: {a} vs torch {b}"


def test_constant():
    _close(
        _ours(sl.optim.constant_schedule(0.3)), _torch_lrs(0.3, lambda o: lrs.ConstantLR(o, 1.0))
    )


def test_linear():
    s = sl.optim.linear_schedule(0.02, 0.1, transition_steps=40)
    _close(_ours(s), _torch_lrs(0.1, lambda o: lrs.LinearLR(o, 0.2, 1.0, total_iters=40)))


def test_linear_decay_with_transition_begin():
    s = sl.optim.linear_schedule(0.1, 0.01, transition_steps=50, transition_begin=20)

    def make(o):
        hold = lrs.ConstantLR(o, 1.0, total_iters=0)
        decay = lrs.LinearLR(o, 1.0, 0.1, total_iters=50)
        return lrs.SequentialLR(o, [hold, decay], milestones=[20])

    _close(_ours(s), _torch_lrs(0.1, make))


def test_cosine_decay():
    s = sl.optim.cosine_decay_schedule(0.1, decay_steps=STEPS, alpha=0.05)
    want = _torch_lrs(0.1, lambda o: lrs.CosineAnnealingLR(o, T_max=STEPS, eta_min=0.005))
    _close(_ours(s), want)


def test_exponential_decay():
    s = sl.optim.exponential_decay(0.1, transition_steps=1, decay_rate=0.97)
    _close(_ours(s), _torch_lrs(0.1, lambda o: lrs.ExponentialLR(o, gamma=0.97)))


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_cosine_decay_schedule"])
def test_warmup_cosine(name):
    init, peak, end, warmup = 1e-3, 0.1, 1e-3, 10
    s = getattr(sl.optim, name)(init, peak, warmup_steps=warmup, decay_steps=STEPS, end_value=end)

    def make(o):
        up = lrs.LinearLR(o, init / peak, 1.0, total_iters=warmup)
        down = lrs.CosineAnnealingLR(o, T_max=STEPS - warmup, eta_min=end)
        return lrs.SequentialLR(o, [up, down], milestones=[warmup])

    _close(_ours(s), _torch_lrs(peak, make))
    assert s(warmup) == peak and s(STEPS) == pytest.approx(end) and s(10 * STEPS) == s(STEPS)


def test_join_schedules():
    s = sl.optim.join_schedules(
        [sl.optim.constant_schedule(0.1), sl.optim.exponential_decay(0.1, 1, 0.9)], [30]
    )

    def make(o):
        return lrs.SequentialLR(
            o, [lrs.ConstantLR(o, 1.0, total_iters=0), lrs.ExponentialLR(o, 0.9)], milestones=[30]
        )

    _close(_ours(s), _torch_lrs(0.1, make))


def test_schedules_hold_after_their_end():
    lin = sl.optim.linear_schedule(1.0, 0.5, transition_steps=10)
    cos = sl.optim.cosine_decay_schedule(1.0, decay_steps=10, alpha=0.2)
    assert [lin(c) for c in (10, 11, 1000)] == [0.5] * 3
    assert all(cos(c) == pytest.approx(0.2, rel=1e-15) for c in (10, 11, 1000))
    assert sl.optim.linear_schedule(0.7, 0.1, transition_steps=0)(5) == 0.7


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: sl.optim.warmup_cosine(0.0, 1.0, warmup_steps=10, decay_steps=10), "decay_steps"),
        (lambda: sl.optim.cosine_decay_schedule(1.0, decay_steps=0), "decay_steps"),
        (lambda: sl.optim.linear_schedule(1.0, 0.0, transition_steps=-1), "transition_steps"),
        (lambda: sl.optim.linear_schedule(1.0, 0.0, 5, transition_begin=1.5), "transition_begin"),
        (lambda: sl.optim.join_schedules([sl.optim.constant_schedule(1.0)], [3]), "boundaries"),
    ],
)
def test_bad_arguments_raise(build, arg):
    with pytest.raises(sl.optim.OptimError, match=arg):
        build()


def test_sgd_with_schedule_matches_torch():
    s = sl.optim.warmup_cosine(0.0, 0.5, warmup_steps=3, decay_steps=8)
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, dtype=torch.float64, generator=g)
    grads = [torch.randn(5, dtype=torch.float64, generator=g) for _ in range(8)]
    tx = sl.optim.sgd(s, momentum=0.9)
    params = {"w": p0.clone()}
    state = tx.init(params)
    for gr in grads:
        updates, state = tx.update({"w": gr}, state, params)
        params = sl.optim.apply_updates(params, updates)
    q = p0.clone().requires_grad_()
    opt = torch.optim.SGD([q], lr=0.5, momentum=0.9)
    sched = lrs.LambdaLR(opt, lambda k: s(k) / 0.5)
    for gr in grads:
        q.grad = gr.clone()
        opt.step()
        sched.step()
    torch.testing.assert_close(params["w"], q.detach(), rtol=1e-12, atol=1e-12)
    assert math.isfinite(params["w"].sum().item())
