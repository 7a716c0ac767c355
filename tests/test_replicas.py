"""Replica checks: `sl.check_replicas`, `SHARDLIB_CHECK_REPLICAS`, shard_map's replicated outputs.

Covers, on simulated meshes {x:4}, {a:2,b:2}, {x:2} and on gloo (4 ranks, `dist`):
- a divergent replica is caught and named: an op whose rule computes different
  values per device (a test-only custom op), a replica edited in place before
  the op ("already disagreed"), `sl.from_local` with unequal replicated blocks,
  `sl.shard` of rank-dependent tensors, random ops (`torch.rand_like`,
  `F.dropout`) under per-rank seeds (replicated layouts: replicas differ; a
  fully split layout: the generator states differ), and `sl.shard_map`
  outputs declared replicated whose devices returned different values (always
  on a simulated mesh; rounding-only differences under the check only; under
  the check on gloo). Messages name the op or call, layouts, devices, the axis,
  the largest difference (compared with the difference computed here) and a fix;
- zero false alarms: a small MLP forward and backward (column/row split
  weights: partial outputs and partial gradients; uneven dims; dropout) under
  the check on both backends, equal to unsharded float64 torch (rtol 1e-12)
  and with the same ledger as without the check (the checks are not in it);
- hypothesis (fixed seed, case count from SHARDLIB_HYPOTHESIS_CASES): sampled
  layouts and ops raise nothing under the check and match torch; a one-ULP edit
  of any replica is caught naming its device; the distributed digest changes
  under any single-bit flip, for every dtype, and does not depend on strides;
- nesting, uninstalling the hook, the environment variable (a subprocess).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib.ops import Strategy, _api, _dispatch, register_rule
from shardlib.ops._replicas import digest, enabled
from tests._reference import enumerate_layouts

P = sl.P
CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 60))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests of what happens with the check off cannot run under SHARDLIB_CHECK_REPLICAS=1.
NEEDS_CHECK_OFF = pytest.mark.skipif(
    enabled(), reason="SHARDLIB_CHECK_REPLICAS is set: the check is on outside the blocks too"
)


# == a deliberately wrong op: its local kernel adds the device index ===========
@torch.library.custom_op("shardlib_replicas_test::noisy", mutates_args=())
def _noisy(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_noisy.register_fake
def _(x):
    return torch.empty_like(x)


NOISY = torch.ops.shardlib_replicas_test.noisy.default


@register_rule(NOISY)
def _noisy_rule(ri):
    (x,) = ri.tensors
    yield Strategy((x.layout,), (x.layout,), local=lambda dev, t: t + dev, local_device=True)


def _error(fn, *args):
    with pytest.raises(sl.ReplicaMismatchError) as info:
        fn(*args)
    return str(info.value)


# == simulated: divergence is caught and named =================================
def test_op_that_diverges_is_named_with_devices_axis_and_difference():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    value = torch.arange(6.0).reshape(3, 2)
    x = sl.shard(value, mesh, P("a", None))
    if not enabled():  # no check: silently wrong (device 1 holds block 0 + 1)
        y = NOISY(x)
        assert not torch.equal(y.local_shards()[1], y.local_shards()[0])
    with sl.check_replicas():
        msg = _error(NOISY, x)
    assert msg.startswith("sl.check_replicas: shardlib_replicas_test.noisy.default")
    assert "input 0 P('a', None) (3, 2)" in msg and "layout P('a', None)" in msg
    # along b (replicated): device 1 vs 0 (rows 0:2) and device 3 vs 2 (row 2); diff = 1
    assert "along axis 'b'" in msg and "along axis 'a'" not in msg
    assert "device 1 differs from device 0 (4 of 4 elements, max abs difference 1)" in msg
    assert "device 3 differs from device 2 (2 of 2 elements, max abs difference 1)" in msg
    assert "inputs' replicas agreed" in msg


def test_replica_edited_in_place_is_reported_at_the_next_op_as_earlier():
    mesh = sl.Mesh.simulated({"x": 4})
    x = sl.shard(torch.ones(5, 3, dtype=torch.float64), mesh, P(None, None))
    x.local_shards()[2][1, 1] += 0.5
    with sl.check_replicas():
        msg = _error(lambda: x * 2)
    assert "aten.mul.Tensor" in msg and "device 2 differs from device 0" in msg
    assert "1 of 15 elements, max abs difference 1" in msg  # 2 * 0.5
    assert "input 0 already disagreed before this op" in msg


def test_from_local_with_unequal_replicated_blocks():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    blocks = [torch.full((2,), float(d % 2)) for d in range(4)]  # differ along b
    with sl.check_replicas():
        msg = _error(sl.from_local, blocks, mesh, P("a"), (4,))
        # summands may differ: declared partial over b, no complaint
        y = sl.from_local(blocks, mesh, P("a", partial="b"), (4,))
    assert "sl.from_local" in msg and "along axis 'b'" in msg
    assert "P('a', partial='b')" in msg  # the suggested fix, which is accepted
    torch.testing.assert_close(y.full(), torch.ones(4))


def test_shard_map_replicated_output_that_differs_is_always_caught():
    mesh = sl.Mesh.simulated({"tp": 4})
    x, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)

    def summand(x_local, w_local):  # forgot sl.psum: each device holds a summand
        return x_local @ w_local

    layouts = (P(None, "tp"), P("tp", None))
    xs, ws = sl.shard(x, mesh, layouts[0]), sl.shard(w, mesh, layouts[1])
    wrong = sl.shard_map(summand, mesh, layouts, out_layouts=P(None, None))
    msg = _error(wrong, xs, ws)
    assert (
        "sl.shard_map: output leaf 0 of summand is declared replicated over mesh axis 'tp'" in msg
    )
    diff = (x[:, 2:4] @ w[2:4] - x[:, :2] @ w[:2]).abs().max().item()
    assert (
        f"device 1 differs from device 0 (15 of 15 elements, max abs difference {diff:.3g})" in msg
    )
    assert "sl.psum(y, 'tp')" in msg and "out_layouts=P(None, None, partial='tp')" in msg
    # both fixes give the unsharded value
    fixed = sl.shard_map(summand, mesh, layouts, out_layouts=P(None, None, partial="tp"))
    psum = sl.shard_map(lambda a, b: sl.psum(a @ b, "tp"), mesh, layouts, P(None, None))
    with sl.check_replicas():
        torch.testing.assert_close(fixed(xs, ws).full(), x @ w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(psum(xs, ws).full(), x @ w, rtol=1e-12, atol=1e-12)


def test_shard_map_names_the_leaf_and_only_the_axis_that_differs():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})

    def fn(v):  # leaf 0 fine; leaf 1 depends on the index along b
        return v * 2, v + sl.axis_index("b")

    f = sl.shard_map(fn, mesh, P("a", None), out_layouts=(P("a", None), P("a", None)))
    msg = _error(f, sl.shard(torch.zeros(5, 3), mesh, P("a", None)))
    assert "output leaf 1 of fn" in msg and "over mesh axis 'b'" in msg
    assert "along axis 'b'" in msg and "along axis 'a'" not in msg
    assert "device 3 differs from device 2 (6 of 6 elements, max abs difference 1)" in msg


@NEEDS_CHECK_OFF
def test_shard_map_rounding_only_difference_is_caught_under_the_check():
    mesh = sl.Mesh.simulated({"x": 2})

    def fn(v):  # the same sum in two orders: equal up to rounding
        if sl.axis_index("x") == 0:
            return (v[0] + v[1]) + v[2]
        return v[0] + (v[1] + v[2])

    f = sl.shard_map(fn, mesh, P(None), out_layouts=P())
    v = sl.shard(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), mesh, P(None))
    y = f(v)  # accepted: not a wrong value, only rounding
    assert y.full().item() == pytest.approx(0.6, rel=1e-15)
    with sl.check_replicas():
        msg = _error(f, v)
    assert "differ by rounding only" in msg and "bitwise-equal" in msg


def test_random_ops_on_one_process_agree_and_match_torch():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    value = torch.randn(7, 6, dtype=torch.float64)
    x = sl.shard(value, mesh, P("a", None))
    with sl.check_replicas():
        torch.manual_seed(5)
        d = F.dropout(x, 0.5)
        r = torch.rand_like(x)
    torch.manual_seed(5)
    torch.testing.assert_close(d.full(), F.dropout(value, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(r.full(), torch.rand_like(value), rtol=0, atol=0)


# == simulated: agreeing programs raise nothing ================================
MLP_CASES = [
    # (mesh axes, x, w1, b1, w2): dp x tp (partial y, partial grads), dp, tp; uneven dims
    ({"a": 2, "b": 2}, P("a", None), P(None, "b"), P("b"), P("b", None)),
    ({"x": 4}, P("x", None), P(None, None), P(None), P(None, None)),
    ({"x": 4}, P(None, None), P(None, "x"), P("x"), P("x", None)),
]


def _mlp_values():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(s, generator=g, dtype=torch.float64) for s in [(10, 6), (6, 7), (7,), (7, 5)]
    ]


def _mlp(x, w1, b1, w2):
    h = torch.relu(x @ w1 + b1)
    torch.manual_seed(1)
    h = F.dropout(h, 0.25)
    y = torch.tanh(h @ w2)
    return (y * y).mean() + y.sum(0).softmax(0)[0]


def run_mlp(mesh, layouts, check=True):
    """The MLP's loss and gradients (global values) and the ledger records, on `mesh`."""
    values = _mlp_values()
    params = [sl.shard(v, mesh, lay).requires_grad_() for v, lay in zip(values, layouts)]
    ctx = sl.check_replicas() if check else contextlib.nullcontext()
    with ctx, sl.comm_ledger() as led:
        loss = _mlp(*params)
        grads = torch.autograd.grad(loss, params[1:])
        out = [loss.full()] + [g.full() for g in grads]
    records = [(r.kind, r.axes, r.bytes, r.direction, r.cause) for r in led.records]
    return out, records


def _reference_mlp():
    values = _mlp_values()
    params = [v.clone().requires_grad_(i > 0) for i, v in enumerate(values)]
    loss = _mlp(*params)
    return [loss.detach()] + [g for g in torch.autograd.grad(loss, params[1:])]


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: str(c) if isinstance(c, dict) else None)
def test_mlp_forward_backward_under_the_check_has_no_false_alarm(case):
    axes, *layouts = case
    mesh = sl.Mesh.simulated(axes)
    got, records = run_mlp(mesh, layouts)
    for a, b in zip(got, _reference_mlp()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    _, unchecked = run_mlp(mesh, layouts, check=False)
    assert records == unchecked  # the check adds nothing to the ledger


@NEEDS_CHECK_OFF
def test_check_nests_and_uninstalls():
    assert _replicas_hooks() == (0, 0)
    with sl.check_replicas():
        with sl.check_replicas():
            assert _replicas_hooks() == (1, 1)
        assert _replicas_hooks() == (1, 1)  # still on in the outer block
        mesh = sl.Mesh.simulated({"x": 2})
        x = sl.from_local([torch.ones(2), torch.ones(2)], mesh, P(None), (2,))
        x.local_shards()[1].zero_()
        _error(lambda: x + 1)
    assert _replicas_hooks() == (0, 0)
    assert (x + 1).local_shards()[1].tolist() == [1.0, 1.0]  # off again: no check


def _replicas_hooks():
    from shardlib.ops import _replicas

    return (
        _dispatch._observers.count(_replicas._observe),
        _api._entry_checks.count(_replicas._check_entry),
    )


def test_environment_variable_turns_the_check_on_for_the_process():
    script = (
        "import torch, shardlib as sl\n"
        "mesh = sl.Mesh.simulated({'x': 2})\n"
        "x = sl.shard(torch.ones(3), mesh, sl.P(None))\n"
        "x.local_shards()[1][0] = 7.0\n"
        "try:\n"
        "    torch.exp(x)\n"
        "except sl.ReplicaMismatchError as e:\n"
        "    print('CAUGHT', str(e).splitlines()[0][:60])\n"
    )
    env = dict(os.environ, SHARDLIB_CHECK_REPLICAS="1", PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "CAUGHT sl.check_replicas: aten.exp.default" in out.stdout


def test_environment_variable_with_an_unknown_value_raises(monkeypatch):
    from shardlib.ops import _replicas

    monkeypatch.setenv("SHARDLIB_CHECK_REPLICAS", "maybe")
    with pytest.raises(sl.ShardlibError, match="SHARDLIB_CHECK_REPLICAS='maybe': set it to 1"):
        _replicas._read_env()
    before = _replicas.enabled()
    monkeypatch.setenv("SHARDLIB_CHECK_REPLICAS", "0")
    _replicas._read_env()  # off: no error, nothing turned on
    assert _replicas.enabled() == before


# == hypothesis ================================================================
LAYOUTS_2D = list(enumerate_layouts({"a": 2, "b": 2}, 2, ("sum", "max")))
OPS = {
    "mul": lambda t: t * 3,
    "add_self": lambda t: t + t,
    "exp_sum": lambda t: t.exp().sum(0),
    "transpose_mm": lambda t: t.transpose(0, 1) @ t,
    "softmax": lambda t: t.softmax(-1),
    "mean": lambda t: t.mean(),
}


@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(
    layout=st.sampled_from(LAYOUTS_2D),
    shape=st.sampled_from([(5, 3), (4, 4), (3, 1)]),
    op=st.sampled_from(sorted(OPS)),
    victim=st.integers(0, 3),
)
def test_sampled_ops_agree_and_any_one_ulp_edit_is_caught(layout, shape, op, victim):
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    value = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if layout.partial and layout.reduce_op == "max":
        value = value.abs()
    x = sl.shard(value, mesh, layout)
    with sl.check_replicas():
        y = OPS[op](x)
    torch.testing.assert_close(y.full(), OPS[op](value), rtol=1e-12, atol=1e-12)
    replicated = layout.replicated_axes(mesh.abstract)
    block = x.local_shards()[victim]
    if not replicated or block.numel() == 0:
        return
    block.view(-1)[0] = torch.nextafter(
        block.view(-1)[0], torch.tensor(math.inf, dtype=block.dtype)
    )
    with sl.check_replicas():
        msg = _error(lambda: x * 1)
    assert f"device {victim} differs" in msg or f"differs from device {victim} " in msg
    assert "already disagreed" in msg


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool, torch.uint8]


@settings(derandomize=True, deadline=None, max_examples=CASES)
@given(
    dtype=st.sampled_from(DTYPES + [torch.complex64]),
    shape=st.sampled_from([(), (0,), (1,), (3, 5), (7, 300), (2, 4100)]),
    where=st.integers(0, 2**31),
    bit=st.integers(0, 7),
)
def test_digest_sees_every_single_bit_flip_and_ignores_strides(dtype, shape, where, bit):
    g = torch.Generator().manual_seed(where % 97)
    t = (torch.randn(shape, generator=g) * 100).to(dtype)
    d = digest(t)
    if t.ndim == 2:  # same values, other strides
        assert torch.equal(digest(t.t().contiguous().t()), d)
        assert torch.equal(digest(torch.stack([t, t], -1)[..., 0]), d)
    if t.numel() == 1:  # a size-1 dim with stride 0 (as reductions return)
        assert torch.equal(digest(t.reshape(1).as_strided((1,), (0,))), digest(t.reshape(1)))
    if t.numel() == 0:
        assert torch.equal(digest(torch.stack([t, t], -1)[..., 0]), d)  # an empty strided view
        return
    flipped = t.clone()
    raw = flipped.reshape(-1).view(torch.uint8)
    i = where % raw.numel()
    raw[i] ^= 1 << bit
    assert not torch.equal(digest(flipped), d)


# == distributed (gloo, 4 ranks) ==============================================
def dist_divergent(mesh, names):
    """Per case name: the ReplicaMismatchError message this rank raised (None if none).

    Each case prepares its inputs outside the check (rank-dependent seeds, an
    edited replica) and runs the call that must be caught inside it.
    """
    rank = mesh.local_devices[0]
    last = mesh.axis_names[-1]
    # replicated over the last axis (on {a:2,b:2}: split over a)
    part = P(None, None) if len(mesh.axis_names) == 1 else P(mesh.axis_names[0], None)

    def seeded(x):
        torch.manual_seed(rank)  # the bug: a per-rank seed
        return x

    def edited():
        x = sl.shard(torch.ones(4), mesh, P(None))
        x.local_shards()[0].add_(rank)
        return x

    cases = {
        "rand_like": lambda: (torch.rand_like, seeded(sl.shard(torch.ones(6, 5), mesh, part))),
        "dropout": lambda: (
            lambda x: F.dropout(x, 0.5),
            seeded(sl.shard(torch.ones(6, 5), mesh, part)),
        ),
        "rand_split": lambda: (  # nothing replicated
            torch.rand_like,
            seeded(sl.shard(torch.ones(6, 5), mesh, P(tuple(mesh.axis_names), None))),
        ),
        "shard": lambda: (
            lambda t: sl.shard(t, mesh, P(None, None)),
            seeded(torch.randn(4, 3)),
        ),
        "from_local": lambda: (
            lambda t: sl.from_local([t], mesh, P(None), (3,)),
            torch.full((3,), float(rank)),
        ),
        "shard_map": lambda: (
            sl.shard_map(lambda v: v * (1 + sl.axis_index(last)), mesh, P(None), P(None)),
            sl.shard(torch.ones(3), mesh, P(None)),
        ),
        "edited": lambda: (lambda x: x + 1, edited()),
    }
    out = []
    for name in names:
        call, arg = cases[name]()
        with sl.check_replicas():
            try:
                call(arg)
                out.append(None)
            except sl.ReplicaMismatchError as e:
                out.append(str(e))
    return out


@pytest.mark.dist
def test_divergence_on_gloo_is_caught_on_every_rank_and_named(workers4):
    names = ["rand_like", "dropout", "rand_split", "shard", "from_local", "shard_map", "edited"]
    for axes in ({"x": 4}, {"a": 2, "b": 2}):
        per_rank = workers4.run(dist_divergent, axes, (names,))
        for i, name in enumerate(names):
            msgs = [r[i] for r in per_rank]
            assert msgs[0] is not None, (axes, name)
            assert all(m == msgs[0] for m in msgs), (axes, name)  # every rank raises the same
            msg = msgs[0]
            if name == "rand_like":
                assert msg.startswith("sl.check_replicas: aten.rand_like.default"), msg
                assert "random generators are in different states" in msg
            elif name == "dropout":
                assert "aten.bernoulli_" in msg or "dropout" in msg, msg
                assert "torch.manual_seed" in msg
            elif name == "rand_split":  # no replica: caught by the generator states
                assert "aten.rand_like.default" in msg and "ranks {0} vs {1} vs {2} vs {3}" in msg
            elif name == "shard":
                assert "sl.shard(tensor=...)" in msg and "ranks 1, 2, 3 passed a different" in msg
                assert "src=0" in msg
            elif name == "from_local":
                assert "sl.from_local" in msg and "max abs difference 1" in msg
            elif name == "shard_map":
                last = list(axes)[-1]
                assert (
                    f"output leaf 0 of <lambda> is declared replicated over mesh axis '{last}'"
                    in msg
                )
            elif name == "edited":
                assert "aten.add.Tensor" in msg and "already disagreed" in msg


@pytest.mark.dist
def test_mlp_on_gloo_under_the_check_matches_simulated_and_torch(workers4):
    reference = _reference_mlp()
    for axes, *layouts in MLP_CASES:
        sim, sim_records = run_mlp(sl.Mesh.simulated(axes), layouts)
        per_rank = workers4.run(run_mlp, axes, (layouts,))
        for got, records in per_rank:
            assert records == sim_records  # same ledger; the check's gathers are not in it
            for a, b, c in zip(got, sim, reference):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
