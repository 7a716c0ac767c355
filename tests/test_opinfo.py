"""OpInfo conformance tier: every entry of torch's `op_db` on sharded inputs against plain torch.

Covers, per (op, variant) of `torch.testing._internal.common_methods_invocations.op_db`:
its sample inputs in float64 with every tensor turned into a ShardedTensor of a
sampled layout on the simulated meshes {a:2, b:2} and {x:4} (uneven splits,
several axes on one dim, partial sum/avg/max/min inputs with exact non-trivial
summands, plain tensors mixed in as replicated constants), forward values and
gradients compared with the same sample on plain tensors (rtol 1e-7, atol 1e-9
unless `tests/_opinfo.TOLERANCES` names the op and why), and every sharded result,
gradient and written input must report torch's strides (what decides whether a later
``reshape`` is a view; `tests/_opinfo.STRIDE_EXEMPT` lists the six LAPACK-order ops that
do not yet). The harness itself is
tests/_opinfo.py; tools/opinfo_report.py writes the same sweep to docs/opinfo.md.

- fast tier (default suite): every op, ``SHARDLIB_OPINFO_CASES`` cases per mesh
  (default 1: one sample, one layout draw), fixed seed; zero ``wrong`` and zero
  ``crash`` per op. NoRuleError and other clear shardlib errors are allowed
  (they are refusals, not wrong answers).
- slow tier (``-m slow``): every sample of every op, ``SHARDLIB_OPINFO_LAYOUTS``
  layout draws per sample and mesh (default 1), ``SHARDLIB_OPINFO_JOBS`` worker
  processes (default 1).
- regressions: the wrong rules the tier found, each as a small program compared
  with plain torch; and checks that the harness can fail (a wrong op is judged
  ``wrong``, a raw exception ``crash``) and that partial summands are exact.

Both tiers print their counts by verdict. Sweeps run in worker subprocesses, so
a segfaulting op is one ``crash``, not a dead test session.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections import Counter

import pytest
import torch

import shardlib as sl

pytest.importorskip("expecttest", reason="torch's OpInfo database needs expecttest (.[test])")

from tests import _opinfo as H  # noqa: E402
from tests import _reference as ref  # noqa: E402

OPS = H.load_ops()
KEYS = [H.op_key(op) for op in OPS]
CASES = int(os.environ.get("SHARDLIB_OPINFO_CASES", "1"))
LAYOUTS = int(os.environ.get("SHARDLIB_OPINFO_LAYOUTS", "1"))
JOBS = int(os.environ.get("SHARDLIB_OPINFO_JOBS", "1"))


def _params() -> list:
    return list(KEYS)


def _report(request: pytest.FixtureRequest, title: str, results: list) -> None:
    """Print the counts by verdict past pytest's capture (the terminal reporter)."""
    ops = len({r.key for r in results})
    text = f"\nOpInfo {title}: {len(results)} cases over {ops} ops\n"
    text += H.format_counts(results)
    bad = [r for r in results if r.verdict in ("wrong", "crash")]
    text += "".join(f"\n  {r.verdict}: {r.key} on {r.mesh} [{r.layouts}] {r.detail}" for r in bad)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(text)


def _selected(request: pytest.FixtureRequest, test_name: str) -> list[str]:
    """The op keys of `test_name` selected in this session (all of them, unless -k chose)."""
    keys = [
        item.callspec.params["key"]
        for item in request.session.items
        if getattr(item, "originalname", None) == test_name and hasattr(item, "callspec")
    ]
    return keys or KEYS


def _by_key(results: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in results:
        out.setdefault(r.key, []).append(r)
    return out


@pytest.fixture(scope="module")
def fast_results(request: pytest.FixtureRequest) -> dict[str, list]:
    results = H.run_sweep(_selected(request, "test_fast"), layouts=CASES, fast=True, jobs=JOBS)
    _report(request, f"fast tier ({CASES} case(s) per op and mesh)", results)
    return _by_key(results)


@pytest.fixture(scope="module")
def slow_results(request: pytest.FixtureRequest) -> dict[str, list]:
    keys = _selected(request, "test_full_sampling")
    results = H.run_sweep(keys, layouts=LAYOUTS, fast=False, jobs=JOBS, op_timeout=600.0)
    _report(request, f"full sampling ({LAYOUTS} layout draw(s) per sample and mesh)", results)
    return _by_key(results)


def _check(results: list) -> None:
    bad = [r for r in results if r.verdict in ("wrong", "crash")]
    assert not bad, "\n".join(
        f"{r.verdict}: {r.key} sample {r.sample} on {r.mesh} [{r.layouts}]: {r.detail}" for r in bad
    )


# == the tiers =================================================================
@pytest.mark.parametrize("key", _params())
def test_fast(fast_results: dict[str, list], key: str) -> None:
    """One sampled case per mesh: no wrong values, no crash."""
    assert key in fast_results, f"{key}: the sweep reported nothing"
    _check(fast_results[key])


@pytest.mark.slow
@pytest.mark.parametrize("key", _params())
def test_full_sampling(slow_results: dict[str, list], key: str) -> None:
    """Every sample of the op, sampled layouts on both meshes: no wrong values, no crash."""
    assert key in slow_results, f"{key}: the sweep reported nothing"
    _check(slow_results[key])


PASS_RATE = 0.85  # issue 9: at least 85% of the applicable op_db entries pass with gradients


def _pass_rate(results: dict[str, list]) -> tuple[float, list[str]]:
    worst = {k: H.op_verdict(Counter(r.verdict for r in rs)) for k, rs in results.items()}
    applicable = [k for k, v in worst.items() if v != "skip"]
    failing = sorted(k for k in applicable if worst[k] != "pass")
    return 1 - len(failing) / max(1, len(applicable)), failing


def test_fast_pass_rate(fast_results: dict[str, list], request: pytest.FixtureRequest) -> None:
    """At least PASS_RATE of the applicable ops pass every fast-tier case (values and gradients)."""
    if len(fast_results) < len(KEYS):
        pytest.skip("a -k selection ran part of the tier; the rate is over every op")
    rate, failing = _pass_rate(fast_results)
    assert rate >= PASS_RATE, f"{rate:.3f} < {PASS_RATE}; not passing: {', '.join(failing)}"


@pytest.mark.slow
def test_full_pass_rate(slow_results: dict[str, list]) -> None:
    """At least PASS_RATE of the applicable ops pass every sample of the full sampling."""
    if len(slow_results) < len(KEYS):
        pytest.skip("a -k selection ran part of the tier; the rate is over every op")
    rate, failing = _pass_rate(slow_results)
    assert rate >= PASS_RATE, f"{rate:.3f} < {PASS_RATE}; not passing: {', '.join(failing)}"


# == the harness can fail ======================================================
class _FakeOp:
    """An OpInfo stand-in: `fn(x)` on plain tensors, `sharded(x)` on ShardedTensors."""

    name, variant_test_name = "fake", ""
    supports_autograd, has_nondeterministic_output = True, False

    def __init__(self, sharded) -> None:
        self._sharded = sharded

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, sl.ShardedTensor):
            return self._sharded(x)
        return torch.sin(x)


class _Sample:
    def __init__(self, t: torch.Tensor) -> None:
        self.input, self.args, self.kwargs = t, (), {}

    @staticmethod
    def output_process_fn_grad(out):
        return out


@pytest.mark.parametrize(
    ("sharded", "verdict"),
    [
        (torch.sin, "pass"),
        (lambda x: torch.sin(x) * (1 + 1e-6), "wrong"),  # forward off by 1e-6 relative
        (lambda x: torch.sin(x.detach()), "wrong"),  # no gradient: zeros against cos(x)
        (lambda x: torch.cos(x), "wrong"),
        (lambda x: torch.sin(x).t().contiguous().t(), "wrong"),  # right values, torch's strides not
        (lambda x: 1 / 0, "crash"),
        (lambda x: sl.reshard(x, "not a layout"), "error"),
    ],
)
def test_harness_verdicts(sharded, verdict: str) -> None:
    """run_case judges a deliberately wrong op `wrong`, a raw exception `crash`."""
    t = torch.linspace(-2, 2, 15, dtype=torch.float64).reshape(5, 3).requires_grad_()
    for mesh in H.MESHES:
        got = {H.run_case(_FakeOp(sharded), _Sample(t), mesh, case=c).verdict for c in range(6)}
        assert got == {verdict}, (mesh, got)


@pytest.mark.parametrize("op", ["sum", "avg", "max", "min"])
def test_summands_exact_and_nontrivial(op: str) -> None:
    """Partial summands reduce bit for bit to the quantized value, and no device is trivial."""
    gen = torch.Generator().manual_seed(0)
    value = H.quantize(torch.randn(7, 5, dtype=torch.float64, generator=gen) * 10)
    for axes in H.MESHES.values():
        for partial in ([a for a in axes][:1], list(axes)):
            layout = sl.Layout(((), ()), tuple(partial), op)
            shards = H.summands(value, layout, axes, gen)
            for group in ref.partial_groups(layout, axes):
                got = ref.reduce_summands([shards[d] for d in group], op)
                assert torch.equal(got, value), (axes, partial)
                # reduced in another order: still exact
                assert torch.equal(ref.reduce_summands([shards[d] for d in group[::-1]], op), value)
                if op in ("sum", "avg"):
                    assert all(not torch.equal(shards[d], value) for d in group[1:])
                else:  # the extremum sits on different devices for different elements
                    owners = Counter(
                        d
                        for d in group
                        for e in range(value.numel())
                        if shards[d].flatten()[e] == value.flatten()[e]
                    )
                    assert len(owners) > 1


def test_layout_sampler_covers_the_tier() -> None:
    """Sampled layouts include multi-axis dims, partial of every op, and uneven splits."""
    rng = random.Random(0)
    t = torch.zeros(5, 3, dtype=torch.float64)
    seen = Counter()
    for _ in range(400):
        lay = H.sample_layout(rng, t, H.MESHES["a2b2"])
        seen["multi"] += any(len(d) > 1 for d in lay.dims)
        if lay.partial:
            seen[lay.reduce_op] += 1
        seen["uneven"] += any(
            axes and n % math.prod(2 for _ in axes) for n, axes in zip(t.shape, lay.dims)
        )
    assert all(seen[k] > 10 for k in ("multi", "sum", "avg", "max", "min", "uneven")), seen


# == regressions found by the tier =============================================
MESH = sl.Mesh.simulated({"x": 4})


def _partial(value: torch.Tensor, op: str) -> sl.ShardedTensor:
    layout = sl.Layout(((),) * value.ndim, ("x",), op)
    q = H.quantize(value)
    gen = torch.Generator().manual_seed(1)
    return sl.from_local(H.summands(q, layout, MESH.axes, gen), MESH, layout, tuple(q.shape))


@pytest.mark.parametrize("op", ["max", "min"])
def test_negated_partial_extremum(op: str) -> None:
    """-max(summands) is min(-summands): negation flips a partial max/min, forward and backward."""
    v = H.quantize(torch.randn(6, 5, dtype=torch.float64))
    x = _partial(v, op).requires_grad_()
    y = -x
    torch.testing.assert_close(y.full(), -v, rtol=0, atol=0)
    w = torch.randn(6, 5, dtype=torch.float64)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad.full(), -w, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [torch.acos, torch.asin, lambda t: torch.atan2(t, t + 2)])
@pytest.mark.parametrize("op", ["max", "min", "sum"])
def test_backward_through_negation_of_partial(fn, op: str) -> None:
    """acos/asin/atan2 backwards negate a partial gradient; values and grads match torch."""
    v = H.quantize(torch.rand(7, 3, dtype=torch.float64) * 1.6 - 0.8)
    x = _partial(v, op).requires_grad_()
    p = v.clone().requires_grad_()
    w = torch.randn(7, 3, dtype=torch.float64)
    (fn(x) * w).sum().backward()
    (fn(p) * w).sum().backward()
    torch.testing.assert_close(x.grad.full(), p.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("number", [True, False, 1j, 2.5, 3])
@pytest.mark.parametrize("op", ["sum", "avg", "max", "min"])
def test_number_added_to_partial(number, op: str) -> None:
    """`x + c` on a partial x adds c to the value once, whatever kind of number c is."""
    v = H.quantize(torch.randn(5, 3, dtype=torch.float64))
    x = _partial(v, op)
    torch.testing.assert_close((x + number).full(), v + number, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((number + x).full(), number + v, rtol=1e-12, atol=1e-12)
    if not isinstance(number, bool):  # torch refuses `x - True`
        torch.testing.assert_close((x - number).full(), v - number, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 5, 2, 9])
@pytest.mark.parametrize("fn", ["addmv", "addmm", "baddbmm"])
def test_broadcast_bias_on_empty_row_block(fn: str, n: int) -> None:
    """A (1,)-shaped bias over rows split unevenly: every shard is its layout's block."""
    g = torch.Generator().manual_seed(n)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    if fn == "addmv":
        args, split = (r(1), r(n, 3), r(3)), [sl.P(None), sl.P("x", None), sl.P(None)]
    elif fn == "addmm":
        args, split = (r(1), r(n, 3), r(3, 2)), [sl.P(None), sl.P("x", None), sl.P(None, None)]
    else:
        args = (r(1, 1), r(2, n, 3), r(2, 3, 2))
        split = [sl.P(None, None), sl.P(None, "x", None), sl.P(None, None, None)]
    want = getattr(torch, fn)(*args)
    got = getattr(torch, fn)(*(sl.shard(a, MESH, lay) for a, lay in zip(args, split)))
    for dev, s in enumerate(got.local_shards()):
        assert tuple(s.shape) == tuple(ref.block(want, got.spec, MESH.axes, dev).shape)
    torch.testing.assert_close(got.full(), want, rtol=1e-12, atol=1e-12)


def test_equal_and_allclose_give_bools() -> None:
    """torch.equal / torch.allclose on sharded tensors answer as on the global values."""
    v = torch.randn(7, 3, dtype=torch.float64)
    a = sl.shard(v, MESH, sl.P("x", None))
    b = sl.shard(v, MESH, sl.P(None, "x"))
    assert torch.equal(a, b) is torch.equal(v, v)
    assert torch.equal(a, a + 1) is torch.equal(v, v + 1)
    assert torch.allclose(a, b + 1e-9) is torch.allclose(v, v + 1e-9)
    assert torch.allclose(a, b + 1) is torch.allclose(v, v + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_narrowing_cast_of_partial_sum(dtype: torch.dtype) -> None:
    """Casting a partial sum to a less precise dtype reduces first: summands cancel exactly."""
    v = H.quantize(torch.tensor([0.1, -7.3, 2.2], dtype=torch.float64))
    shards = [v + 6, v * 0 - 3, v * 0 - 3, v * 0]  # sums to v exactly; 6.1 rounds in bf16
    x = sl.from_local(shards, MESH, sl.P(None, partial="x"), (3,))
    assert torch.equal(x.to(dtype).full(), v.to(dtype))
    assert torch.equal(x.to(torch.complex128).full(), v.to(torch.complex128))  # widening: kept


@pytest.mark.parametrize(
    "fn",
    [
        lambda t: torch.softmax(t, 2),
        lambda t: torch.log_softmax(t, 2),
        lambda t: torch.logsumexp(t, 2),
        lambda t: torch.linalg.vector_norm(t, dim=2),
        lambda t: torch.std(t, 2, correction=0),
    ],
)
def test_reduction_over_split_empty_dim(fn) -> None:
    """Softmax, logsumexp, norms and var over a split zero-size dim give torch's empty/-inf/0/nan."""
    v = torch.randn(5, 3, 0, dtype=torch.float64)
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    x = sl.shard(v, mesh, sl.P(None, "b", "a")).requires_grad_()
    p = v.clone().requires_grad_()
    with warnings.catch_warnings():  # std of nothing: torch warns about the dof
        warnings.simplefilter("ignore", UserWarning)
        torch.testing.assert_close(fn(x).full(), fn(p), equal_nan=True)
