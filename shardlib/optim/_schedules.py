"""Learning-rate schedules: pure functions ``count -> value`` (Optax's names and arguments).

Owns `constant_schedule`, `linear_schedule`, `cosine_decay_schedule`,
`join_schedules`, `warmup_cosine` (alias `warmup_cosine_decay_schedule`) and
`exponential_decay`. A schedule is a plain Python callable of the int step
count (the number of updates done before the one it sizes) that returns a
float; any transformation's ``learning_rate`` takes one (`_transform.py`).

It deliberately does no tensor work: a schedule runs on the host once per
update, so reading it never synchronizes a device.

Invariants: a schedule is deterministic and defined for every count >= 0
(past its last transition it holds its final value); arguments are checked
when the schedule is built, not when it is called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ._transform import OptimError

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_schedule",
    "warmup_cosine",
    "warmup_cosine_decay_schedule",
]

Schedule = Callable[[int], float]


def _steps(name: str, arg: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptimError(
            f"sl.optim.{name}({arg}={value!r}): {arg} is an int >= {minimum} (a number of "
            f"updates). Fix: pass e.g. {arg}={max(minimum, 100)}."
        )
    return value


def constant_schedule(value: float) -> Schedule:
    """``count -> value``.

    Examples:
        >>> import shardlib as sl
        >>> sl.optim.constant_schedule(0.1)(1000)
        0.1
    """
    value = float(value)

    def schedule(count: int) -> float:
        return value

    return schedule


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """From `init_value` to `end_value` linearly over `transition_steps` updates, starting
    after `transition_begin`; constant before and after (torch's ``LinearLR`` shape).

    ``lr(c) = init + (end - init) * clip(c - transition_begin, 0, transition_steps) / transition_steps``

    Examples:
        >>> import shardlib as sl
        >>> s = sl.optim.linear_schedule(1.0, 0.0, transition_steps=4, transition_begin=2)
        >>> [s(c) for c in range(8)]
        [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    init_value, end_value = float(init_value), float(end_value)
    transition_steps = _steps("linear_schedule", "transition_steps", transition_steps, 0)
    transition_begin = _steps("linear_schedule", "transition_begin", transition_begin, 0)
    if transition_steps == 0:
        return constant_schedule(init_value)

    def schedule(count: int) -> float:
        c = min(max(count - transition_begin, 0), transition_steps)
        return init_value + (end_value - init_value) * (c / transition_steps)

    return schedule


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Cosine decay from `init_value` to ``alpha * init_value`` over `decay_steps`, then
    constant (torch's ``CosineAnnealingLR`` with ``eta_min = alpha * init_value``).

    ``lr(c) = init * ((1 - alpha) * (0.5 * (1 + cos(pi * min(c, T) / T)))^exponent + alpha)``

    Examples:
        >>> import shardlib as sl
        >>> s = sl.optim.cosine_decay_schedule(1.0, decay_steps=4, alpha=0.1)
        >>> [round(s(c), 4) for c in (0, 2, 4, 9)]
        [1.0, 0.55, 0.1, 0.1]
    """
    init_value, alpha, exponent = float(init_value), float(alpha), float(exponent)
    decay_steps = _steps("cosine_decay_schedule", "decay_steps", decay_steps, 1)

    def schedule(count: int) -> float:
        c = min(max(count, 0), decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * c / decay_steps))
        return init_value * ((1.0 - alpha) * cosine**exponent + alpha)

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init * decay_rate ** ((c - transition_begin) / transition_steps)`` (floored with
    `staircase`), held at `end_value` once it passes it (torch's ``ExponentialLR`` with
    ``gamma = decay_rate`` and ``transition_steps=1``).

    Examples:
        >>> import shardlib as sl
        >>> s = sl.optim.exponential_decay(1.0, transition_steps=1, decay_rate=0.5, end_value=0.2)
        >>> [s(c) for c in range(4)]
        [1.0, 0.5, 0.25, 0.2]
    """
    init_value, decay_rate = float(init_value), float(decay_rate)
    transition_steps = _steps("exponential_decay", "transition_steps", transition_steps, 1)
    transition_begin = _steps("exponential_decay", "transition_begin", transition_begin, 0)

    def schedule(count: int) -> float:
        p = max(count - transition_begin, 0) / transition_steps
        v = init_value * decay_rate ** (math.floor(p) if staircase else p)
        if end_value is not None:
            v = max(v, end_value) if decay_rate < 1 else min(v, end_value)
        return v

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """`schedules[i]` between ``boundaries[i-1]`` and ``boundaries[i]``, each called with
    the count since its own start (torch's ``SequentialLR`` with ``milestones``).

    Examples:
        >>> import shardlib as sl
        >>> s = sl.optim.join_schedules(
        ...     [sl.optim.constant_schedule(1.0), sl.optim.linear_schedule(1.0, 0.0, 2)], [3])
        >>> [s(c) for c in range(6)]
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    schedules, boundaries = list(schedules), [int(b) for b in boundaries]
    if len(schedules) != len(boundaries) + 1 or boundaries != sorted(boundaries):
        raise OptimError(
            f"sl.optim.join_schedules: got {len(schedules)} schedules and boundaries "
            f"{boundaries}; n schedules take n - 1 increasing boundaries. Fix: e.g. "
            "join_schedules([warmup, decay], [warmup_steps])."
        )

    def schedule(count: int) -> float:
        i = sum(1 for b in boundaries if count >= b)
        return schedules[i](count - (boundaries[i - 1] if i else 0))

    return schedule


def warmup_cosine(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from `init_value` to `peak_value` over `warmup_steps`, then cosine
    decay to `end_value`; `decay_steps` counts the whole schedule, warmup included
    (Optax's ``warmup_cosine_decay_schedule``).

    Examples:
        >>> import shardlib as sl
        >>> s = sl.optim.warmup_cosine(0.0, 1.0, warmup_steps=2, decay_steps=6, end_value=0.1)
        >>> [round(s(c), 4) for c in range(8)]
        [0.0, 0.5, 1.0, 0.8682, 0.55, 0.2318, 0.1, 0.1]
    """
    warmup_steps = _steps("warmup_cosine", "warmup_steps", warmup_steps, 0)
    decay_steps = _steps("warmup_cosine", "decay_steps", decay_steps, 1)
    if decay_steps <= warmup_steps:
        raise OptimError(
            f"sl.optim.warmup_cosine(warmup_steps={warmup_steps}, decay_steps={decay_steps}): "
            "decay_steps counts the whole schedule, warmup included, so it must exceed "
            f"warmup_steps. Fix: decay_steps={warmup_steps} + the number of decay updates."
        )
    peak_value, end_value = float(peak_value), float(end_value)
    alpha = end_value / peak_value if peak_value else 0.0
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent),
        ],
        [warmup_steps],
    )


warmup_cosine_decay_schedule = warmup_cosine
