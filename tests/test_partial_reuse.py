"""A partial value that several ops read is reduced once (dispatch's `move`).

A partial tensor (the output of a row-parallel linear, a sum over a split dim) read
by ops that need its value — transformers' RMSNorm reads its input three times, a
residual stream feeds a norm and the next add — would otherwise be all-reduced once
per reading op. Dispatch keeps the reduced copy with the partial tensor (until the
tensor or its storage changes) and hands it to every later op that wants the same
layout. Only reductions are kept: a split tensor gathered by two ops is gathered
twice, so FSDP's weights are not held whole (the kept copy of a partial tensor is
no larger than the partial tensor itself).

Reference: the same ops on the unsharded float64 value; ledgers counted against
the number of reductions that must happen.
"""

from __future__ import annotations

import pytest
import torch

import shardlib as sl

F64 = torch.float64


def partial(mesh: sl.Mesh, value: torch.Tensor) -> sl.ShardedTensor:
    """`value` as a sum over "x": device i holds value * (i + 1) / (1 + 2 + ...)."""
    n = mesh.shape[0]
    total = n * (n + 1) / 2
    parts = [value * (i + 1) / total for i in range(n)]
    return sl.from_local(parts, mesh, sl.P(*(None,) * value.ndim, partial="x"), tuple(value.shape))


@pytest.fixture
def mesh():
    return sl.Mesh.simulated({"x": 4})


def test_two_nonlinear_reads_reduce_once(mesh):
    v = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = partial(mesh, v)
    with sl.comm_ledger() as led:
        a = x.exp()
        b = torch.relu(x)
        c = x.pow(2)
    assert [r.kind for r in led.records] == ["all_reduce"]
    for got, want in ((a, v.exp()), (b, v.relu()), (c, v.pow(2))):
        torch.testing.assert_close(got.full(), want, rtol=1e-12, atol=1e-12)
    assert x.spec.partial, "x itself is unchanged: still partial"


def test_a_write_to_the_partial_tensor_reduces_again(mesh):
    v = torch.randn(8, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = partial(mesh, v)
    x.exp()
    with sl.comm_ledger() as led:
        x.mul_(3.0)  # linear: stays partial, but its value changed
        y = x.exp()
    assert [r.kind for r in led.records] == ["all_reduce"]
    torch.testing.assert_close(y.full(), (3 * v).exp(), rtol=1e-12, atol=1e-12)
    # a write to a shard behind shardlib's back (torch's version counter) counts too
    x.exp()
    with torch.no_grad():
        x.local_shards()[0].add_(1.0)
    with sl.comm_ledger() as led:
        y = x.exp()
    assert [r.kind for r in led.records] == ["all_reduce"]
    torch.testing.assert_close(y.full(), (3 * v + 1).exp(), rtol=1e-12, atol=1e-12)


def test_a_view_of_the_partial_tensor_sees_the_write(mesh):
    v = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    x = partial(mesh, v)
    view = x[1:3]
    view.exp()
    x.mul_(2.0)
    torch.testing.assert_close(view.exp().full(), (2 * v[1:3]).exp(), rtol=1e-12, atol=1e-12)


def test_gathers_are_not_kept(mesh):
    """A split tensor read whole by two ops is gathered twice: nothing whole is held."""
    w = sl.shard(torch.randn(8, 4, dtype=F64), mesh, sl.P("x", None))
    with sl.comm_ledger() as led:
        w.exp()  # keeps w split: no gather
        sl.reshard(w, sl.P()).sum()
        sl.reshard(w, sl.P()).sum()
    assert [r.kind for r in led.records].count("all_gather") == 2


def test_gradients_through_the_kept_reduction(mesh):
    v = torch.randn(5, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    ref = v.clone().requires_grad_()
    want = (ref.exp() * ref.sin()).sum() + torch.relu(ref).pow(2).sum()
    want.backward()
    x = partial(mesh, v).requires_grad_()
    with sl.comm_ledger() as led:
        got = (x.exp() * x.sin()).sum() + torch.relu(x).pow(2).sum()
    fwd_reductions = [r for r in led.records if r.kind == "all_reduce" and r.bytes > 8]
    assert len(fwd_reductions) == 1, led.summary()
    got.backward()
    torch.testing.assert_close(got.full(), want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad.full(), ref.grad, rtol=1e-12, atol=1e-12)


def test_strict_mode_refuses_the_first_implicit_reduction(mesh):
    x = partial(mesh, torch.ones(4, dtype=F64))
    with sl.strict(), pytest.raises(sl.LayoutError, match="sl.reshard"):
        x.exp()


def test_later_linear_reads_use_the_kept_reduction(mesh):
    """RMSNorm's shape: after the value is needed once (pow), the linear ops that follow
    (x * rsqrt(var), weight * ...) read the kept reduction, so the result is not partial and
    the next op that needs it does not reduce again."""
    v = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    x = partial(mesh, v)
    var = x.pow(2).mean(-1, keepdim=True)
    with sl.comm_ledger() as led:
        y = x * torch.rsqrt(var + 1e-6)
        z = y.exp()
    assert led.records == [], led.summary()
    assert not y.spec.partial
    want = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)).exp()
    torch.testing.assert_close(z.full(), want, rtol=1e-12, atol=1e-12)
