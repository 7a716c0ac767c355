"""In-place accumulation of shardlib's own fresh gradients (shardlib/ops/_accumulate.py).

Each case compares the gradients with unsharded float64 torch (rtol 1e-12) and, where
the rule applies, counts that the engine's sum ran in place (one ``add_`` per device
block, no extra out-of-place add); where it must not apply (a hook keeps the gradient,
create_graph, a gufunc that passes its cotangent through, a gradient routed on by a
torch node) the values still match and what a hook kept is unchanged.
"""

from __future__ import annotations

import contextlib

import torch

import shardlib as sl

P = sl.P
MESH = {"x": 2, "y": 2}


def _val(shape, seed):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _count_add_():
    """Counts ``Tensor.add_`` calls on plain tensors (the local blocks)."""
    calls = []
    orig = torch.Tensor.add_

    def add_(self, *a, **k):
        if type(self) is torch.Tensor:
            calls.append(tuple(self.shape))
        return orig(self, *a, **k)

    torch.Tensor.add_ = add_
    try:
        yield calls
    finally:
        torch.Tensor.add_ = orig


def _lin(x, w):
    return sl.einsum("ij,jk->ik", x, w, out_layout=P("x", None))


def _shared_operand(mesh, hook=None):
    """x feeds two contractions: its gradient is their two fresh dX summed."""
    vals = [_val((4, 6), 1), _val((6, 3), 2), _val((6, 3), 3)]
    x0 = sl.shard(vals[0], mesh, P("x", None)).requires_grad_()
    w1 = sl.shard(vals[1], mesh, P(None, None)).requires_grad_()
    w2 = sl.shard(vals[2], mesh, P(None, None)).requires_grad_()
    x = x0 * 1.5
    a, b = _lin(x, w1), _lin(x, w2)
    if hook is not None:
        a.grad_fn.register_hook(hook)
        b.grad_fn.register_hook(hook)
    loss = (a * 2.0 + b).sum()
    ref = [v.clone().requires_grad_() for v in vals]
    xr = ref[0] * 1.5
    want = torch.autograd.grad(((xr @ ref[1]) * 2.0 + xr @ ref[2]).sum(), ref)
    return (x0, w1, w2), loss, want


def _check(leaves, want, factor=1.0):
    for t, g in zip(leaves, want):
        torch.testing.assert_close(t.grad.full(), factor * g, rtol=1e-12, atol=1e-12)


def test_shared_operand_gradients_sum_in_place():
    mesh = sl.Mesh.simulated(MESH)
    leaves, loss, want = _shared_operand(mesh)
    with _count_add_() as calls:
        loss.backward()
    _check(leaves, want)
    # x's two (2, 6) blocks per device pair: the sum ran as new += old on each of 4 devices
    assert calls.count((2, 6)) == 4, calls


def test_a_hook_that_keeps_the_gradient_sees_it_unchanged():
    """A node hook holding a contraction's dX: the engine's sum must not write into it."""
    mesh = sl.Mesh.simulated(MESH)
    kept = []
    leaves, loss, want = _shared_operand(mesh, hook=lambda gi, go: kept.append(gi[0]))
    with _count_add_() as calls:
        loss.backward()
    _check(leaves, want)
    assert calls.count((2, 6)) == 0, calls
    w1, w2 = (t.full().detach() for t in leaves[1:])
    ones = torch.ones(4, 3, dtype=torch.float64)
    wanted = {"a": (2.0 * ones) @ w1.T, "b": ones @ w2.T}  # each contraction's own dX
    got = sorted((g.full() for g in kept), key=lambda g: float(g.sum()))
    expect = sorted(wanted.values(), key=lambda g: float(g.sum()))
    assert len(got) == 2
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_retain_graph_twice_and_create_graph():
    mesh = sl.Mesh.simulated(MESH)
    leaves, loss, want = _shared_operand(mesh)
    loss.backward(retain_graph=True)
    loss.backward()
    _check(leaves, want, 2.0)
    # create_graph: the sum is part of a graph (grad mode on), never in place
    leaves, loss, want = _shared_operand(mesh)
    with _count_add_() as calls:
        (gx,) = torch.autograd.grad(loss, leaves[0], create_graph=True)
    assert calls.count((2, 6)) == 0, calls
    torch.testing.assert_close(gx.full(), want[0], rtol=1e-12, atol=1e-12)


def test_a_gradient_a_torch_node_routes_on_is_not_mutated():
    """t = u + v gets one fresh dT; torch's AddBackward hands that same tensor to u and v,
    each of which sums it with another gradient: neither sum may write into it."""
    mesh = sl.Mesh.simulated(MESH)
    vals = [_val((4, 6), 4), _val((6, 3), 5), _val((6, 3), 6)]
    x0 = sl.shard(vals[0], mesh, P("x", None)).requires_grad_()
    w1 = sl.shard(vals[1], mesh, P(None, None)).requires_grad_()
    w2 = sl.shard(vals[2], mesh, P(None, None)).requires_grad_()

    def f(x, w1, w2, lin):
        u, v = x * 1.0, x * 3.0
        t = u + v
        return (lin(t, w1) + lin(u, w2) * 2.0 + lin(v, w2) * 5.0).sum()

    f(x0, w1, w2, _lin).backward()
    ref = [v.clone().requires_grad_() for v in vals]
    want = torch.autograd.grad(f(*ref, lambda a, b: a @ b), ref)
    _check((x0, w1, w2), want)


def test_gufunc_passing_its_cotangent_through_is_not_offered():
    """fn(a, b) = a + b: both local gradients are the cotangent itself."""
    mesh = sl.Mesh.simulated(MESH)
    add = sl.gufunc(lambda a, b: a + b, signature="(e),(e)->(e)")
    vals = [_val((4, 6), 7), _val((4, 6), 8), _val((6, 3), 9)]
    a0 = sl.shard(vals[0], mesh, P("x", None)).requires_grad_()
    b0 = sl.shard(vals[1], mesh, P("x", None)).requires_grad_()
    w = sl.shard(vals[2], mesh, P(None, None)).requires_grad_()

    def f(a, b, w, lin, add):
        a1, b1 = a * 2.0, b * 3.0
        return (lin(add(a1, b1), w) + lin(a1, w) * 7.0 + lin(b1, w) * 11.0).sum()

    f(a0, b0, w, _lin, add).backward()
    ref = [v.clone().requires_grad_() for v in vals]
    want = torch.autograd.grad(f(*ref, lambda x, y: x @ y, lambda x, y: x + y), ref)
    _check((a0, b0, w), want)
