"""The papers' linears found by the contraction search (DESIGN §8, engine items 1-3).

`sl.einsum("ij,jk->ik", x, w, out_layout=Y)` with X, W, Y in the §8 table's layouts must
find SUMMA's (2D), Tesseract's (2.5D) and the 3D algorithm's plans on its own: the ledger's
forward bytes, and forward + backward bytes including finishing both gradients to their
storage layouts, at or below the papers' figures (written below as formulas of b, h, h', q,
d and the element size); with ``remat=True`` gathers, SUMMA's 3x. Values and gradients
equal unsharded float64 at 1e-10. The search is the same one every contraction gets:
nothing here names a scheme.
"""

from __future__ import annotations

import pytest
import torch

import shardlib as sl
from shardlib import P

ELEM = 8  # float64
B, H, H2 = 12, 12, 24  # divisible by every q (and q*d) below


def _case(axes, xl, wl, yl, *, remat=None, seed=0):
    """Run y = x @ w (einsum, out_layout=yl) forward and backward; return bytes and check values."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, H, dtype=torch.float64, generator=gen)
    W = torch.randn(H, H2, dtype=torch.float64, generator=gen)
    G = torch.randn(B, H2, dtype=torch.float64, generator=gen)
    mesh = sl.Mesh.simulated(axes)
    x = sl.shard(X, mesh, xl).requires_grad_()
    w = sl.shard(W, mesh, wl).requires_grad_()
    g = sl.shard(G, mesh, yl)
    with sl.comm_ledger() as led:
        xa, wa = x, w
        if remat is not None:
            xa = sl.reshard(x, remat[0], remat=True)
            wa = sl.reshard(w, remat[1], remat=True)
        y = sl.einsum("ij,jk->ik", xa, wa, out_layout=yl)
        forward = led.total_bytes
        y.backward(g)
        # finish both gradients to their storage layouts (a kept partial is reduced here)
        dx, dw = sl.reshard(x.grad, xl), sl.reshard(w.grad, wl)
    total = led.total_bytes
    assert y.spec == yl
    torch.testing.assert_close(y.full(), X @ W, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx.full(), G @ W.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw.full(), X.T @ G, rtol=1e-10, atol=1e-10)
    # no gradient is left larger than its parameter's block
    for p in (x, w):
        assert [t.shape for t in p.grad.local_shards()] == [t.shape for t in p.local_shards()]
    return forward, total, led


@pytest.mark.parametrize("q", [2, 3, 4])
def test_2d_summa_bytes(q):
    f, total, _ = _case({"r": q, "c": q}, P("r", "c"), P("r", "c"), P("r", "c"))
    summa = (q - 1) / q**2 * (B * H + H * H2) * ELEM  # forward, per device
    assert f <= summa
    assert total <= 2 * summa  # "kept": backward equals forward


@pytest.mark.parametrize("q", [2, 3])
def test_2d_remat_is_summa_three_times(q):
    f, total, led = _case(
        {"r": q, "c": q}, P("r", "c"), P("r", "c"), P("r", "c"), remat=(P("r", None), P(None, "c"))
    )
    summa = (q - 1) / q**2 * (B * H + H * H2) * ELEM
    assert f == summa
    assert total == 3 * summa
    regathers = [r for r in led.records if r.cause == "regather"]
    assert regathers and all(r.direction == "backward" for r in regathers)
    assert sum(r.bytes for r in regathers) == summa


def test_2p5d_tesseract_bytes():
    d = q = 2
    f, total, _ = _case(
        {"d": d, "r": q, "c": q}, P(("d", "r"), "c"), P("r", "c"), P(("d", "r"), "c")
    )
    forward = (q - 1) / q**2 * (B * H / d + H * H2) * ELEM
    dw_all_reduce = 2 * (d - 1) / d * H * H2 / q**2 * ELEM
    assert f <= forward
    assert total <= 2 * forward + dw_all_reduce


def test_3d_bytes():
    q = 2
    axes = {"i": q, "j": q, "k": q}
    f, total, _ = _case(axes, P(("i", "j"), "k"), P(("k", "i"), "j"), P(("i", "k"), "j"))
    forward = (q - 1) / q**3 * (B * H + H * H2 + B * H2) * ELEM
    assert f <= forward
    assert total <= 2 * forward


def test_two_chained_3d_linears_need_no_reshard_between():
    """The first linear's output layout is the second's input layout (j and k swap)."""
    q = 2
    mesh = sl.Mesh.simulated({"i": q, "j": q, "k": q})
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(B, H, dtype=torch.float64, generator=gen)
    W1 = torch.randn(H, H2, dtype=torch.float64, generator=gen)
    W2 = torch.randn(H2, H, dtype=torch.float64, generator=gen)
    x = sl.shard(X, mesh, P(("i", "j"), "k"))
    w1 = sl.shard(W1, mesh, P(("k", "i"), "j")).requires_grad_()
    w2 = sl.shard(W2, mesh, P(("j", "i"), "k")).requires_grad_()
    with sl.comm_ledger() as led:
        h = sl.einsum("ij,jk->ik", x, w1, out_layout=P(("i", "k"), "j"))
        first = led.total_bytes
        y = sl.einsum("ij,jk->ik", h, w2, out_layout=P(("i", "j"), "k"))
    second = led.total_bytes - first
    assert y.spec == x.spec  # back where the residual stream lives
    assert second == (q - 1) / q**3 * (B * H2 + H2 * H + B * H) * ELEM
    assert {r.cause for r in led.records} == {"einsum"}  # no reshard, no with_layout
    torch.testing.assert_close(y.full(), X @ W1 @ W2, rtol=1e-10, atol=1e-10)


def test_one_move_of_dy_serves_both_gradients():
    """3D backward: dY is all-gathered over k once, for dX and dW both."""
    q = 2
    _, _, led = _case(
        {"i": q, "j": q, "k": q}, P(("i", "j"), "k"), P(("k", "i"), "j"), P(("i", "k"), "j")
    )
    gathers = [r for r in led.records if r.direction == "backward" and r.kind == "all_gather"]
    assert len(gathers) == 1


@pytest.mark.parametrize(
    "axes,xl,wl,yl",
    [
        ({"x": 3}, P("x", None), P(None, "x"), P(None, "x")),
        ({"r": 2, "c": 3}, P("r", "c"), P("r", "c"), P("r", "c")),
        ({"i": 2, "j": 2, "k": 2}, P(("i", "j"), "k"), P(("k", "i"), "j"), P(("i", "k"), "j")),
        ({"dp": 2, "tp": 2}, P("dp", None), P(None, "tp"), P("dp", None, partial="tp")),
    ],
)
def test_uneven_shapes_values(axes, xl, wl, yl):
    """Shapes no mesh size divides: the same search, values and gradients exact."""
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    W = torch.randn(5, 11, dtype=torch.float64, generator=gen)
    mesh = sl.Mesh.simulated(axes)
    x = sl.shard(X, mesh, xl).requires_grad_()
    w = sl.shard(W, mesh, wl).requires_grad_()
    y = sl.einsum("ij,jk->ik", x, w, out_layout=yl)
    assert y.spec == yl
    y.full().pow(2).sum().backward()
    torch.testing.assert_close(y.full(), X @ W, rtol=1e-10, atol=1e-10)
    G = 2 * X @ W
    torch.testing.assert_close(sl.reshard(x.grad, xl).full(), G @ W.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sl.reshard(w.grad, wl).full(), X.T @ G, rtol=1e-10, atol=1e-10)


def _brute_force(x_layout, w_layout, target, shapes, mesh):
    """Least bytes over every assignment of mesh axes to the labels i, j, k (each axis to one
    label or none, every order within a label), enumerated here independently of the rule."""
    import itertools

    from shardlib.layouts._planner import plan

    (xs, ws, ys), names = shapes, mesh.axis_names
    best = None
    for choice in itertools.product("ijk-", repeat=len(names)):
        groups = {lab: [a for a, c in zip(names, choice) if c == lab] for lab in "ijk"}
        for orders in itertools.product(*(itertools.permutations(groups[lab]) for lab in "ijk")):
            on = dict(zip("ijk", orders))
            xw, ww = P(on["i"] or None, on["j"] or None), P(on["j"] or None, on["k"] or None)
            out = P(on["i"] or None, on["k"] or None, partial=on["j"] or ())
            cost = (
                plan(x_layout, xw, xs, mesh, torch.float32).total_bytes
                + plan(w_layout, ww, ws, mesh, torch.float32).total_bytes
                + plan(out, target, ys, mesh, torch.float32).total_bytes
            )
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("axes", [{"a": 2, "b": 3}, {"a": 2, "b": 2, "c": 2}])
def test_search_is_cheapest_over_every_assignment(axes):
    """The search's bytes equal a brute force over every assignment, for several targets."""
    from shardlib.ops._contractions import _choose
    from shardlib.ops._rules import ArgSpec

    mesh = sl.Mesh.simulated(axes).abstract
    names = mesh.axis_names
    xl, wl = P(names[0], names[1]), P(names[1], None)
    specs = (ArgSpec((12, 12), torch.float32, xl), ArgSpec((12, 12), torch.float32, wl))
    for target in (P(names[0], names[1]), P(names[1], names[0]), P(None, None), P(None, names)):
        choice = _choose("ij,jk->ik", specs, mesh, target, frozenset())
        assert choice.cost[0] == _brute_force(xl, wl, target, ((12, 12),) * 3, mesh)


def _layouts_2d(names):
    """Every non-partial layout of a matrix over `names` (each axis on dim 0, dim 1 or none)."""
    import itertools

    found = []
    for choice in itertools.product("01-", repeat=len(names)):
        for perm in itertools.permutations(names):
            dims = [tuple(a for a in perm if choice[names.index(a)] == d) for d in "01"]
            lay = P(dims[0] or None, dims[1] or None)
            if lay not in found:
                found.append(lay)
    return found


@pytest.mark.parametrize("axes", [{"a": 2, "b": 3}, {"a": 2, "b": 2, "c": 2}])
def test_search_matches_brute_force_on_many_layouts(axes):
    """Best-first search (planner lower bounds, exact plans only while the bound is below
    the best): over sampled operand and target layouts, uneven shapes included, it finds
    the bytes of planning every assignment."""
    import random

    from shardlib.ops._contractions import _choose
    from shardlib.ops._rules import ArgSpec

    mesh = sl.Mesh.simulated(axes).abstract
    layouts = _layouts_2d(list(mesh.axis_names))
    rng = random.Random(0)
    n = 40 if len(axes) == 3 else 80
    for _ in range(n):
        xl, wl, target = (rng.choice(layouts) for _ in range(3))
        shapes = ((12, 7), (7, 12), (12, 12))
        specs = (ArgSpec(shapes[0], torch.float32, xl), ArgSpec(shapes[1], torch.float32, wl))
        choice = _choose("ij,jk->ik", specs, mesh, target, frozenset())
        assert choice.cost[0] == _brute_force(xl, wl, target, shapes, mesh), (xl, wl, target)
