"""Aliasing fuzzer: random view / in-place programs on ShardedTensors against plain torch.

Each program (`tests/_alias_programs.py`) builds a base tensor with a random
layout on a random simulated mesh ({x:4}, {a:2,b:2}, {x:3}, {a:2,b:2,c:2};
uneven sizes; partial sum/avg/max/min layouts from non-trivial integer
summands, so every value is exact in float64) and runs random steps on any
live tensor:

- views: basic indexing with ints, slices with steps, None and ``...``;
  select, narrow, view/reshape/unflatten, transpose/t/permute/movedim,
  unsqueeze/squeeze, expand, diagonal, split/chunk/split_with_sizes/
  tensor_split/unbind, detach, contiguous;
- in-place: add_/sub_/mul_ (scalar, live or fresh operand, alpha), neg_,
  zero_, fill_, copy_ (live, fresh sharded or plain operand), setitem with
  scalars and tensors, ``x[i] += c``, clamp_, ``torch.add/mul/sub(a, b,
  out=c)``, ``+=``/``*=``, ``x.data = ...``, t_/unsqueeze_;
- reads: clone, binary ops, sum (all, per dim), amax, matmul, torch.equal,
  tolist, item.

The same source lines run on plain torch and on ShardedTensors; after every
step every live name is compared (``.full()``, same shape and dtype, bitwise
equal). Allowed: torch and shardlib both raise; or shardlib raises
`sl.AliasError` / `sl.LayoutError` / `sl.NoRuleError` where torch succeeds
(counted as documented errors per type and op; that program is dropped).
Anything else fails the test: a silent difference, another exception, or
shardlib accepting what torch rejects. Each failure class is printed once as a
minimized, runnable reproducer (the program as Python source).

Cases: ``SHARDLIB_FUZZ_CASES`` programs (default 150) in the fast tier,
``SHARDLIB_FUZZ_CASES_SLOW`` (default 3000) in the ``slow`` tier; hypothesis
with ``derandomize=True`` (a fixed sequence), no example database.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests._alias_programs import Chooser, Stats, minimize, run_program

FAST_CASES = int(os.environ.get("SHARDLIB_FUZZ_CASES", 150))
SLOW_CASES = int(os.environ.get("SHARDLIB_FUZZ_CASES_SLOW", 3000))
MAX_STEPS = 10
# failure classes minimized and printed per run
MAX_REPRODUCERS = int(os.environ.get("SHARDLIB_FUZZ_REPRODUCERS", 12))


def _fuzz(cases: int, label: str, capsys) -> None:
    stats = Stats()

    # Failures are collected, not raised, so one run counts and reports every
    # class; hypothesis therefore never shrinks (minimize() does, by steps).
    @settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=cases,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def one(data):
        run_program(Chooser(data.draw), stats, MAX_STEPS)

    one()
    seen: dict[str, object] = {}
    for f in stats.failures:
        if f.op_class not in seen and len(seen) < MAX_REPRODUCERS:
            seen[f.op_class] = minimize(f)
    report = [f"[{label}] {stats.summary()}"]
    for cls, f in seen.items():
        report.append(f"\n==== {cls} ({stats.failure_classes[cls]} programs) ====")
        report.append(f.reproducer())
    with capsys.disabled():
        print("\n" + report[0])
    if stats.failures:
        pytest.fail(
            f"{len(stats.failures)} of {stats.programs} programs differ from torch or crash "
            f"({len(stats.failure_classes)} classes); one minimized reproducer per class:\n"
            + "\n".join(report[1:]),
            pytrace=False,
        )


def test_aliasing_fuzz(capsys):
    _fuzz(FAST_CASES, "aliasing fuzz", capsys)


@pytest.mark.slow
def test_aliasing_fuzz_slow(capsys):
    _fuzz(SLOW_CASES, "aliasing fuzz (slow)", capsys)
