"""Counter-based random numbers (`sl.rng("counter")`, shardlib/ops/_rng.py) and the default mode.

Covers:
- the generator against an independent pure-Python splitmix64 (the values of the
  first ops of a context, bit for bit, from the formula in _rng.py's docstring);
- layout and mesh independence: dropout masks (`F.dropout`, `native_dropout`)
  and init values (`uniform_`, `normal_`, `bernoulli_`, `exponential_`,
  `rand_like`, `randn_like`, `randint_like`, `torch.nn.init.*`) equal across
  layouts P(), P("x"), P(None, "x"), two-axis splits, uneven shapes, meshes of
  1, 2, 3, 4 devices and 2-D meshes, partial inputs, and plain tensors in the
  mode (a sequence of ops, so the op counter advances alike everywhere);
  transposed plain tensors draw by logical index; one run on 4 gloo ranks;
- statistics: uniform / normal mean and variance, dropout keep rate and scale,
  lag-1 and op-to-op correlation, each within 5 sigma;
- memory: the largest allocation during a counter-mode dropout / init on a
  split tensor, measured with torch.profiler (every CPU allocation), is at most
  one int64 buffer of the local block, while the default mode's is >= the
  global tensor (the measurement sees it);
- the default mode is unchanged: values equal torch's unsharded op under the
  same seed (also inside `sl.rng("torch")` nested in a counter context);
  seeding: `seed=` fixes the values and leaves torch's generator alone,
  `seed=None` draws the key from torch's generator once;
- errors: uncovered drawing ops, bad kinds and seeds raise
  shardlib errors naming the op and the fix; ops that draw nothing
  (eval-mode dropout, attention without dropout) pass; an explicit
  `generator=` draws torch's stream from it, as outside the mode.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import shardlib as sl
from shardlib import P

from ._memory import largest_allocation

aten = torch.ops.aten

# == an independent splitmix64 (Steele, Lea, Flood 2014; Vigna's reference code) ==========
MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def _finalize(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


class SplitMix64:
    def __init__(self, state: int):
        self.state = state & MASK

    def next(self) -> int:
        self.state = (self.state + GAMMA) & MASK
        return _finalize(self.state)


def _reference_uniform(seed: int, op: int, n: int) -> list[float]:
    """float64 uniforms of the `op`-th random op (0-based) of a context seeded `seed`."""
    keys = SplitMix64(_finalize(seed & MASK))
    for _ in range(op + 1):
        key = keys.next()
    elements = SplitMix64(key)
    out = []
    for _ in range(n):
        out.append((elements.next() >> 11) * 2.0**-53)  # stream 0 of element i
        elements.next()  # stream 1 (Box-Muller's second uniform)
    return out


def test_generator_is_splitmix64():
    with sl.rng("counter", seed=12345):
        first = torch.rand(9, dtype=torch.float64)
        second = torch.empty(3, 3, dtype=torch.float64).uniform_()
    assert first.tolist() == _reference_uniform(12345, 0, 9)
    assert second.flatten().tolist() == _reference_uniform(12345, 1, 9)
    # float32: the top 24 bits, exactly representable
    with sl.rng("counter", seed=-7):
        got = torch.rand(6)
    keys = SplitMix64(_finalize(-7 & MASK))
    elements = SplitMix64(keys.next())
    want = []
    for _ in range(6):
        want.append((elements.next() >> 40) * 2.0**-24)
        elements.next()
    assert got.tolist() == want


# == layout and mesh independence ================================================
ALLOWED = {"full", "bernoulli.default", "bernoulli_.Tensor"}
MESHES = [{"x": 1}, {"x": 2}, {"x": 3}, {"x": 4}, {"a": 2, "b": 2}, {"a": 3, "b": 2}]


def _layouts(axes: dict) -> list:
    names = tuple(axes)
    out = [P(), P(names[0]), P(None, names[-1])]
    if len(names) == 2:
        out += [P(names, None), P(names[1], names[0]), P(None, names[::-1])]
    return out


def _program(make):
    """A sequence of random ops on tensors made by `make(plain)`; returns plain results.

    `make` turns a plain tensor into the operand (identity, or a sharding): every op of
    the sequence advances the op counter, so later ops check the counter too.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 10, generator=g)
    probs = torch.rand(7, 10, generator=g)
    xs = make(x)
    outs = [
        F.dropout(xs, 0.3),
        *torch.native_dropout(xs, 0.4, True),
        make(torch.empty(7, 10)).uniform_(-2, 3),
        make(torch.empty(7, 10)).normal_(1.5, 2),
        make(torch.empty(7, 10)).bernoulli_(0.25),
        make(torch.empty(7, 10)).bernoulli_(make(probs)),
        torch.bernoulli(make(probs)),
        make(torch.empty(7, 10)).exponential_(2.0),
        torch.rand_like(xs),
        torch.randn_like(xs),
        torch.randint_like(xs, 3, 9),
        torch.randint_like(xs, 5),
        make(torch.empty(7, 10, dtype=torch.float64)).normal_(),
        make(torch.empty(7, 10, dtype=torch.bfloat16)).uniform_(),
    ]
    w = make(torch.empty(7, 10))
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    outs.append(w)
    w = make(torch.empty(7, 10))
    torch.nn.init.trunc_normal_(w, std=0.02)
    outs.append(w)
    w = make(torch.empty(7, 10))
    torch.nn.init.xavier_normal_(w)
    outs.append(w)
    return [o.full() if isinstance(o, sl.ShardedTensor) else o for o in outs]


def _equal_lists(got, want, what):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: op {k} differs"


@pytest.mark.parametrize("axes", MESHES, ids=str)
def test_same_values_on_every_layout_and_mesh(axes):
    with sl.rng("counter", seed=3):
        want = _program(lambda t: t)
    mesh = sl.Mesh.simulated(axes)
    for layout in _layouts(axes):
        with sl.rng("counter", seed=3), sl.comm_ledger() as led:
            got = _program(lambda t, layout=layout: sl.shard(t, mesh, layout))
        # the only collectives: x.full() of the results, bernoulli's probabilities (made
        # replicated) and trunc_normal_'s `pending.any()` (a scalar); never a random tensor
        others = [r for r in led.records if r.cause not in ALLOWED]
        assert all(r.kind == "all_reduce" and r.bytes <= 64 for r in others), others
        _equal_lists(got, want, f"{axes} {layout}")
    # the values are not a constant: a different seed gives different values everywhere
    with sl.rng("counter", seed=4):
        other = _program(lambda t: t)
    assert all(not torch.equal(a, b) for a, b in zip(other, want))


def test_partial_input_and_gradient_of_dropout():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    with sl.rng("counter", seed=9):
        y = F.dropout(x.requires_grad_(), 0.5)
        (gx,) = torch.autograd.grad(y, x, dy)
    xs = sl.shard(x.detach(), mesh, P("a", "b")).requires_grad_()
    with sl.rng("counter", seed=9):
        ys = F.dropout(xs, 0.5)
        (gxs,) = torch.autograd.grad(ys, xs, sl.shard(dy, mesh, P("a", "b")))
    assert torch.equal(ys.full(), y.detach()) and torch.equal(gxs.full(), gx)
    # a partial input stays partial: every summand gets the same mask
    layout = P(None, "b", partial="a")
    shards = [torch.randn(6, 3 if dev % 2 == 0 else 2, generator=g) for dev in range(4)]
    xp = sl.from_local(shards, mesh, layout, (6, 5))
    with sl.rng("counter", seed=2):
        out, mask = torch.native_dropout(xp, 0.3, True)
    assert out.spec == layout
    with sl.rng("counter", seed=2):
        w_out, w_mask = torch.native_dropout(xp.full(), 0.3, True)
    torch.testing.assert_close(out.full(), w_out)
    assert torch.equal(mask.full(), w_mask)
    # an in-place fill of a partial-sum tensor: one summand holds the values, the rest 0
    with sl.rng("counter", seed=2):
        filled = sl.from_local([s.clone() for s in shards], mesh, layout, (6, 5)).uniform_()
    with sl.rng("counter", seed=2):
        w_filled = torch.empty(6, 5).uniform_()
    assert not filled.local_shards()[0].eq(0).all() and filled.local_shards()[2].eq(0).all()
    assert filled.spec == layout and torch.equal(filled.full(), w_filled)


def test_cpu_dropout_and_native_dropout_share_one_mask():
    x = torch.randn(40, 30)
    with sl.rng("counter", seed=5):
        y = F.dropout(x, 0.3)  # CPU: empty_like + bernoulli_(0.7) + div_ + mul
    with sl.rng("counter", seed=5):
        _, mask = torch.native_dropout(x, 0.3, True)  # what accelerators reach
    assert torch.equal(y != 0, mask)


def test_plain_tensors_draw_by_logical_index():
    base = torch.empty(6, 8)
    with sl.rng("counter", seed=1):
        a = torch.rand_like(base.t())  # (8, 6), transposed strides
        b = torch.empty(6, 8).t().uniform_()
    with sl.rng("counter", seed=1):
        c = torch.rand(8, 6)
        d = torch.empty(8, 6).uniform_()
    assert a.stride() == base.t().stride()  # memory format preserved, as torch
    assert torch.equal(a, c) and torch.equal(b, d)


def _distributed_program(mesh):
    with sl.rng("counter", seed=11):
        return _program(lambda t: sl.shard(t, mesh, P("x", None)))


@pytest.mark.dist
def test_same_values_on_four_gloo_ranks(workers4):
    with sl.rng("counter", seed=11):
        want = _program(lambda t: t)
    for rank_result in workers4.run(_distributed_program, {"x": 4}):
        _equal_lists(rank_result, want, "gloo")


# == statistics ===================================================================
ROWS, COLS = 200, 300
N = ROWS * COLS


def _within(value: float, mean: float, sigma: float, what: str):
    assert abs(value - mean) <= 5 * sigma, f"{what}: {value} vs {mean} +- 5*{sigma}"


def test_statistics():
    mesh = sl.Mesh.simulated({"x": 4})
    with sl.rng("counter", seed=0):
        u = sl.shard(torch.empty(ROWS, COLS, dtype=torch.float64), mesh, P("x")).uniform_().full()
        u2 = sl.shard(torch.empty(ROWS, COLS, dtype=torch.float64), mesh, P("x")).uniform_().full()
        z = torch.randn(N, dtype=torch.float64)
        ones = sl.shard(torch.ones(ROWS, COLS), mesh, P(None, "x"))
        kept = F.dropout(ones, 0.3).full()
        e = torch.empty(N, dtype=torch.float64).exponential_(2.0)
    u, u2 = u.flatten(), u2.flatten()
    _within(u.mean().item(), 0.5, math.sqrt(1 / 12 / N), "uniform mean")
    var_sigma = math.sqrt((1 / 80 - 1 / 144) / N)
    _within(((u - 0.5) ** 2).mean().item(), 1 / 12, var_sigma, "uniform variance")
    assert u.min() >= 0 and u.max() < 1
    _within(z.mean().item(), 0.0, math.sqrt(1 / N), "normal mean")
    _within((z**2).mean().item(), 1.0, math.sqrt(2 / N), "normal variance")
    _within((z**4).mean().item(), 3.0, math.sqrt(96 / N), "normal kurtosis")
    _within(e.mean().item(), 0.5, 0.5 / math.sqrt(N), "exponential mean")
    rate = (kept != 0).double().mean().item()
    _within(rate, 0.7, math.sqrt(0.7 * 0.3 / N), "dropout keep rate")
    assert torch.allclose(kept[kept != 0], torch.tensor(1 / 0.7))
    c = (u - 0.5) * 12**0.5
    _within((c[1:] * c[:-1]).mean().item(), 0.0, 1 / math.sqrt(N), "lag-1 correlation")
    c2 = (u2 - 0.5) * 12**0.5
    _within((c * c2).mean().item(), 0.0, 1 / math.sqrt(N), "op-to-op correlation")


# == memory =======================================================================
_largest_allocation = largest_allocation


@pytest.mark.parametrize(
    "name", ["dropout", "native_dropout", "normal_", "uniform_", "kaiming", "rand_like"]
)
def test_largest_allocation_is_local(name):
    mesh = sl.Mesh.simulated({"x": 8})
    shape = (64, 512)  # float32: 128 KiB global, 4096 elements per device
    local = math.prod(shape) // 8
    x = sl.shard(torch.randn(shape), mesh, P("x", None))
    w = sl.shard(torch.empty(shape), mesh, P(None, "x"))
    ops = {
        "dropout": lambda: F.dropout(x, 0.2),
        "native_dropout": lambda: torch.native_dropout(x, 0.2, True),
        "normal_": lambda: w.normal_(0, 0.02),
        "uniform_": lambda: w.uniform_(-1, 1),
        "kaiming": lambda: torch.nn.init.kaiming_uniform_(w),
        "rand_like": lambda: torch.rand_like(x),
    }
    fn = ops[name]
    fn()  # decisions cached first (a decision runs the op on meta tensors only)
    with sl.rng("counter", seed=0):
        counter = _largest_allocation(fn)
    default = _largest_allocation(fn)
    # one int64 / float64 buffer of the local block at most (the index and hash buffers)
    assert counter <= 8 * local, f"{name}: {counter} B > one 8-byte local block ({8 * local} B)"
    assert default >= 4 * math.prod(shape), f"{name}: the default mode draws the global tensor"


# == the default mode, nesting and seeding =========================================
def test_default_mode_is_torch_unsharded_stream():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    x = torch.randn(7, 10)
    for context in (None, "nested"):
        torch.manual_seed(42)
        if context is None:
            got = [F.dropout(sl.shard(x, mesh, P("a", "b")), 0.3).full()]
            got.append(sl.shard(torch.empty(7, 10), mesh, P(None, "b")).normal_().full())
        else:
            with sl.rng("counter", seed=0), sl.rng("torch"):
                got = [F.dropout(sl.shard(x, mesh, P("a", "b")), 0.3).full()]
                got.append(sl.shard(torch.empty(7, 10), mesh, P(None, "b")).normal_().full())
        torch.manual_seed(42)
        want = [F.dropout(x, 0.3), torch.empty(7, 10).normal_()]
        _equal_lists(got, want, f"default mode ({context})")


def test_seeding():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with sl.rng("counter", seed=1):
        a = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)  # a seed leaves torch's generator alone
    torch.manual_seed(0)
    with sl.rng("counter"):
        b = torch.rand(5)
    torch.manual_seed(0)
    with sl.rng("counter"):
        c = torch.rand(5)
    with sl.rng("counter"):  # the generator moved on: another key
        d = torch.rand(5)
    assert torch.equal(b, c) and not torch.equal(b, d) and not torch.equal(a, b)
    with sl.rng("counter", seed=1):
        with sl.rng("counter", seed=1):  # an inner context has its own counter
            inner = torch.rand(5)
        outer = torch.rand(5)
    assert torch.equal(inner, a) and torch.equal(outer, a)


# == errors and ops that draw nothing ===============================================
def test_uncovered_ops_raise_naming_the_op_and_the_fix():
    mesh = sl.Mesh.simulated({"x": 2})
    cases = [
        ("random_", lambda: torch.empty(4).random_()),
        ("multinomial", lambda: torch.multinomial(torch.ones(4), 2)),
        ("randperm", lambda: torch.randperm(5)),
        ("random_", lambda: sl.shard(torch.empty(4), mesh, P("x")).random_()),
        ("normal", lambda: torch.normal(torch.zeros(3), torch.ones(3))),
    ]
    for name, fn in cases:
        with sl.rng("counter", seed=0), pytest.raises(sl.NoRuleError) as info:
            fn()
        message = str(info.value)
        assert name in message and "sl.rng('torch')" in message, message
    with sl.rng("counter", seed=0), sl.rng("torch"):
        torch.empty(4).random_()  # leaving the mode is the fix
    with pytest.raises(sl.LayoutError, match="'counter'"), sl.rng("philox"):
        pass
    with pytest.raises(sl.LayoutError, match="int"), sl.rng("counter", seed=1.5):
        pass
    with pytest.raises(sl.LayoutError, match="manual_seed"), sl.rng("torch", seed=1):
        pass


def test_ops_that_draw_nothing_pass_through():
    q = torch.randn(2, 3, 4, 5)
    x = torch.randn(4, 5)
    with sl.rng("counter", seed=0):
        out = F.scaled_dot_product_attention(q, q, q)  # tagged seeded, dropout_p = 0
        y = F.dropout(x, 0.5, training=False)
        z, mask = torch.native_dropout(x, 0.5, False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    assert torch.equal(y, x) and torch.equal(z, x) and bool(mask.all())


def test_an_explicit_generator_is_torchs_stream():
    mesh = sl.Mesh.simulated({"x": 3})

    def draws():
        a = torch.rand(4, 5, generator=torch.Generator().manual_seed(8))
        s = sl.shard(torch.empty(4, 5), mesh, P(None, "x"))
        b = s.uniform_(generator=torch.Generator().manual_seed(8)).full()
        return [a, b]

    want = draws()
    with sl.rng("counter", seed=0):
        got = draws()
    _equal_lists(got, want, "generator=")
    assert torch.equal(want[0], want[1])
