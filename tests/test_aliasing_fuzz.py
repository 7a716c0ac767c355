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

Also here: the issue's own cases (``t[2:5].mul_(0)``, ``t[:, 1].zero_()``,
``v = t.view(-1)`` with 10 rows on 4 devices then ``t.add_(1)``, ``.data =``,
``out=``, ``fill_``/setitem, ``torch.equal``, an in-place op on an expanded
view) through the same runner; and tests of the harness itself (each outcome
is classified as documented above, `minimize` drops the steps a failure does
not need, a reproducer runs and prints shardlib's value).

Cases: ``SHARDLIB_FUZZ_CASES`` programs (default 150) in the fast tier,
``SHARDLIB_FUZZ_CASES_SLOW`` (default 3000) in the ``slow`` tier; hypothesis
with ``derandomize=True`` (a fixed sequence), no example database.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import shardlib as sl
from tests._alias_programs import A, Chooser, Runner, Stats, _overlap_hazard, minimize, run_program

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


# == the issue's cases, through the same runner ================================
# (mesh, source lines, names each line binds, whether a documented error is
# acceptable). "strict" cases are writes through true aliases and plain ops:
# the contract leaves no room for an error there.
ISSUE_CASES = {
    "slice across split dim, mul_": (
        {"x": 4}, ["t0 = mk(A(8, 4), P('x', None))", "t0[2:5].mul_(0)"], True),
    "column across split dim, zero_": (
        {"x": 4}, ["t0 = mk(A(8, 4), P(None, 'x'))", "t0[:, 1].zero_()"], True),
    "strided slice, write both ways": (
        {"x": 4},
        ["t0 = mk(A(8, 4), P('x', None))", "v1 = t0[1:7:2]", "t0.mul_(2)", "v1.add_(1)"], True),
    "uneven view(-1), then base add_": (
        {"x": 4}, ["t0 = mk(A(10, 4), P('x', None))", "v1 = t0.view(-1)", "t0.add_(1)"], False),
    "reshape that regroups, write through it": (
        {"x": 4},
        ["t0 = mk(A(10, 4), P('x', None))", "v1 = t0.reshape(4, 10)", "v1[0] = 0", "t0.add_(1)"],
        False),
    "partial base, view, both written": (
        {"a": 2, "b": 2},
        ["t0 = mk(A(6, 4), P('a', None, partial='b'))", "v1 = t0[2:5]", "t0.add_(1)",
         "v1.mul_(2)"], False),
    ".data set": ({"x": 4}, ["t0 = mk(A(8, 4), P('x', None))", "t0.data = t0.data * 3"], True),
    "out=": (
        {"x": 4},
        ["t0 = mk(A(6, 4), P('x', None))", "r1 = t0.clone()", "torch.add(t0, t0, out=r1)"], True),
    "setitem scalar on a replicated tensor": (
        {"x": 4}, ["t0 = mk(A(8, 4), P(None, None))", "t0[2:5] = 0"], True),
    "fill_": ({"x": 3}, ["t0 = mk(A(7, 2), P('x', None))", "t0.fill_(3)"], True),
    "torch.equal": ({"x": 4}, ["t0 = mk(A(6), P('x'))", "r1 = torch.equal(t0, t0)"], True),
    "expanded view, in-place (torch raises)": (
        {"x": 4}, ["t0 = mk(A(4, 1), P('x', None))", "v1 = t0.expand(4, 3)", "v1.add_(1)"], True),
}  # fmt: skip


def _binds(line: str) -> tuple[str, ...]:
    lhs, sep, _ = line.partition(" = ")
    if not sep or "[" in lhs or "." in lhs:
        return ()
    return tuple(n.strip() for n in lhs.split(",") if n.strip())


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_issue_case(case):
    axes, lines, strict = ISSUE_CASES[case]
    runner = Runner(axes)
    for line in lines:
        runner.step(line, _binds(line))
        if runner.done:
            break
    if runner.failure is not None:
        pytest.fail(runner.failure.reproducer(), pytrace=False)
    if strict and runner.documented is not None:
        pytest.fail(
            f"{case}: shardlib raised {runner.documented} where the contract requires torch's "
            f"result:\n{runner.program.source()}# {runner.stats.documented_example}",
            pytrace=False,
        )


# == the harness itself ========================================================
# A line that means something different in the two namespaces makes a
# deterministic "shardlib bug" for testing the classifier and the minimizer.
BUG = "r9 = t0 + isinstance(t0, sl.ShardedTensor)"  # torch adds 0, shardlib 1


def test_runner_reports_a_silent_difference_with_a_runnable_reproducer(capsys):
    runner = Runner({"a": 2, "b": 2})
    assert runner.step("t0 = mk(A(5, 3), P('a', partial='b'))", ("t0",)) == "ok"
    assert runner.step("v1 = t0[1:4:2]", ("v1",)) == "ok"
    assert runner.step(BUG, ("r9",)) == "failure"
    f = runner.failure
    assert f.kind == "silent difference" and f.names == ("r9",) and f.step == 2
    text = f.reproducer()
    assert BUG + "  # <-- silent difference here" in text
    exec(compile(text, "<reproducer>", "exec"), {})  # noqa: S102
    # the script reruns the sharded program and prints shardlib's (here: wrong) value
    assert capsys.readouterr().out == f"{A(5, 3) + 1}\n"


def test_minimize_keeps_only_the_steps_the_failure_needs():
    runner = Runner({"x": 3})
    for line, binds in [
        ("t0 = mk(A(4, 3), P('x', None))", ("t0",)),
        ("v1 = t0.t()", ("v1",)),
        ("v1.mul_(2)", ()),
        ("r1 = v1.sum(0)", ("r1",)),
        (BUG, ("r9",)),
    ]:
        runner.step(line, binds)
    assert runner.failure is not None
    small = minimize(runner.failure)
    assert small.program.lines == ["t0 = mk(A(4, 3), P('x', None))", BUG]
    assert small.minimized_from == 4 and small.signature == runner.failure.signature


def _raiser(exc: type[BaseException]):
    def f(*_):
        raise exc("raised on purpose by the harness test")

    return f


@pytest.mark.parametrize(
    ("torch_fn", "sharded_fn", "outcome", "kind"),
    [
        (_raiser(RuntimeError), _raiser(ValueError), "both raised", None),
        (_raiser(RuntimeError), lambda x: x, "failure", "no error"),
        (lambda x: x, _raiser(IndexError), "failure", "crash"),
        (lambda x: x, _raiser(sl.AliasError), "documented", None),
        (lambda x: x, _raiser(sl.NoRuleError), "documented", None),
        (lambda x: x, lambda x: x * 2, "failure", "silent difference"),
        (lambda x: x, lambda x: x.full()[:1], "failure", "silent difference"),  # shape
    ],
)
def test_runner_classifies_each_outcome(torch_fn, sharded_fn, outcome, kind):
    runner = Runner({"x": 4})
    runner.step("t0 = mk(A(6), P('x'))", ("t0",))
    runner.tns["f"], runner.sns["f"] = torch_fn, sharded_fn
    assert runner.step("r1 = f(t0)", ("r1",)) == outcome
    assert (runner.failure.kind if runner.failure else None) == kind
    if outcome == "documented":
        assert sum(runner.stats.documented.values()) == 1
    if outcome == "both raised":
        assert runner.stats.both_raised == 1 and "r1" not in runner.live


@pytest.mark.parametrize(
    ("setup", "line", "want"),
    [
        # torch computes these in its memory order: the operand is read as a copy
        (["v1 = t0.diagonal()"], "t0.add_(v1)", "t0.add_(v1.clone())"),
        (["v1 = t0[:, :1]"], "t0.mul_(v1)", "t0.mul_(v1.clone())"),
        (["v1 = t0.t()"], "t0[1:] = v1[1:]", "t0[1:] = v1.clone()[1:]"),
        # torch refuses (partial overlap): kept, shardlib must refuse too
        (["v1 = t0[1:3]"], "t0[0:2].copy_(v1)", "t0[0:2].copy_(v1)"),
        (["v1 = t0.t()"], "t0.add_(v1)", "t0.add_(v1)"),
        # same storage, disjoint elements, or the very same view: kept
        (["v1 = t0[0:2]", "v2 = t0[2:4]"], "v2.add_(v1)", "v2.add_(v1)"),
        (["v1 = t0.view(4, 4)"], "torch.add(t0, v1, out=t0)", "torch.add(t0, v1, out=t0)"),
    ],
)
def test_overlapping_operands_are_cloned_only_where_torch_order_decides(setup, line, want):
    runner = Runner({"x": 4})
    runner.step("t0 = mk(A(4, 4), P('x', None))", ("t0",))
    for s in setup:
        runner.step(s, (s.split(" = ")[0],))
    assert _overlap_hazard(runner, line, line.split(".")[0].split("[")[0]) == want
