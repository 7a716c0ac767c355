"""`sl.gufunc`: a function local under its layouts runs as one op per device.

Covers, on simulated meshes {x:4}, {a:2,b:2} and {a:2,b:2,c:2}:
- the fast path (core dims unsplit, loop dims split alike, nothing partial): forward
  values (`.full()`), input gradients (`.grad.full()`), output layouts and gradient
  layouts (a replicated input's gradient is sum-partial over the axes that split the
  output), and no collective forward or backward (`sl.comm_ledger()` empty), for RMSNorm
  ``(e),(e)->(e)`` split on batch, on (batch, seq) over two axes, on a dim split over a
  tuple of axes, with uneven splits (5 and 3 rows over 4 devices: an empty block), with a
  plain / non-differentiable weight and a keyword argument; a rotary-like
  ``(d),(c),(c)->(d)`` with cos/sin of shape (s, 1, c) as plain tensors, as replicated
  ShardedTensors and split on seq like x; a two-output ``(n)->(n),()``, also with one
  cotangent only; a pointwise ``(),()->()`` with a broadcast second input; the decorator
  form; a function returning its input (the output never aliases it);
- that the fast path is one autograd node: no `ShardedTensor.__torch_dispatch__` call
  inside the gufunc's forward (the unwrapped function makes many), fewer in backward;
- the fallback path (layouts that do not line up: core dim split, loop dims split
  differently or by only one full-extent input, an extent-1 dim split, a partial input, a
  plain tensor full-extent on a split dim, a differentiable plain tensor): values and
  gradients equal the reference, and the ledger (forward and backward) equals the one of
  the unwrapped function on the same inputs;
- cotangents in another layout than the output (moved in the gufunc's backward, ledger
  cause ``"gufunc"``), after a reshard of the output, and a sum-partial cotangent that
  passes through (no collective; its partial axes carry to the gradients), also mixed
  with a non-partial cotangent of a second output; retain_graph and a second backward;
- the same RMSNorm on 4 gloo ranks (`dist` mark) equal to the simulated mesh;
- errors, each naming the problem: malformed signatures, argument count, non-tensor
  positional and tensor keyword arguments, too few dims, core-size mismatch, loop dims
  that do not broadcast, fn returning the wrong number of outputs or core shape, and a
  second-order gradient (once differentiable);
- passthrough: no ShardedTensor argument calls `fn` directly; under `torch.no_grad()` no
  graph is built and the outputs are ShardedTensors.
The module's docstring example runs in tests/test_docs.py (doctests of every module).

References are the same functions on unsharded float64 torch tensors, gradients by
torch.autograd. Tolerances: float64 against the reference: rtol 1e-12, atol 1e-12.
Simulated vs distributed (float32): rtol 1e-6, atol 1e-6.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import pytest
import torch

import shardlib as sl

P = sl.P
TOL = {"rtol": 1e-12, "atol": 1e-12}
_tensor_mod = importlib.import_module("shardlib.ops._tensor")


# == the functions under test and their references (the same Python functions) ===============
def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _center(x):
    m = x.mean(-1, keepdim=True)
    return x - m, m.squeeze(-1)


def _pointwise(a, b):
    return a * torch.sin(b) + b * b


def _ident(x):
    return x


rms = sl.gufunc(_rms, signature="(e),(e)->(e)")
rotate = sl.gufunc(_rotate, signature="(d),(c),(c)->(d)")
center = sl.gufunc(signature="(n)->(n),()")(_center)  # the decorator form
pointwise = sl.gufunc(_pointwise, signature="(),()->()")
ident = sl.gufunc(_ident, signature="(n)->(n)")


# == helpers =================================================================================
def _value(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64, generator=g)


def _tuple(x):
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _records(led):
    return [(r.kind, r.axes, r.group_size, r.bytes, r.dtype, r.direction, r.cause)
            for r in led.records]  # fmt: skip


def _make(mesh, specs, seed=0):
    """Sharded arguments (fresh leaves) and float64 reference leaves for `specs`, each
    (shape, layout or None for a plain tensor, requires_grad)."""
    args, refs = [], []
    for i, (shape, layout, grad) in enumerate(specs):
        v = _value(shape, seed + i)
        if layout is None:
            args.append(v.clone().requires_grad_(grad))
        else:
            a = sl.shard(v, mesh, layout)
            args.append(a.requires_grad_() if grad else a)
        refs.append(v.clone().requires_grad_(grad))
    return args, refs


def _reference(fn, refs, cots, kwargs=None):
    """The unsharded outputs and gradients (of the refs that require grad)."""
    outs = _tuple(fn(*refs, **(kwargs or {})))
    leaves = [r for r in refs if r.requires_grad]
    grads = torch.autograd.grad(outs, leaves, cots) if leaves else ()
    return [o.detach() for o in outs], list(grads)


def _partial(pieces, mesh, dims, axis):
    """A sum-partial ShardedTensor over `axis` (a mesh axis) with split `dims`: the device
    at coordinate j along `axis` holds its block of pieces[j]; the value is sum(pieces)."""
    names, sizes = list(mesh.axes), list(mesh.axes.values())
    stride = 1
    for n in sizes[names.index(axis) + 1 :]:
        stride *= n
    blocks = [sl.shard(p, mesh, P(*dims)).local_shards() for p in pieces]
    shards = [blocks[(d // stride) % mesh.axes[axis]][d] for d in range(mesh.size)]
    lay = P(*dims, partial=axis)
    t = sl.from_local(shards, mesh, lay, tuple(pieces[0].shape))
    torch.testing.assert_close(t.full(), sum(pieces), **TOL)  # the helper's own check
    return t


class Case(NamedTuple):
    fn: object  # the gufunc
    ref: object  # the plain function
    axes: dict
    inputs: list  # (shape, layout or None, requires_grad)
    out_specs: list
    grad_specs: list  # of the inputs that require grad, in order
    kwargs: dict = {}


X4, AB, ABC = {"x": 4}, {"a": 2, "b": 2}, {"a": 2, "b": 2, "c": 2}
FAST = {
    "rms_batch_x4": Case(
        rms, _rms, X4, [((8, 3, 16), P("x", None, None), True), ((16,), P(None), True)],
        [P("x", None, None)], [P("x", None, None), P(None, partial="x")],
    ),
    "rms_batch_seq_ab": Case(
        rms, _rms, AB, [((4, 6, 8), P("a", "b", None), True), ((8,), P(None), True)],
        [P("a", "b", None)], [P("a", "b", None), P(None, partial=("a", "b"))],
    ),
    "rms_seq_batch_ba": Case(
        rms, _rms, AB, [((4, 6, 8), P("b", "a", None), True), ((8,), P(None), True)],
        [P("b", "a", None)], [P("b", "a", None), P(None, partial=("a", "b"))],
    ),
    "rms_tuple_axes_ab": Case(
        rms, _rms, AB, [((4, 3, 8), P(("a", "b"), None, None), True), ((8,), P(None), True)],
        [P(("a", "b"), None, None)], [P(("a", "b"), None, None), P(None, partial=("a", "b"))],
    ),
    "rms_tuple_axes_abc": Case(
        rms, _rms, ABC, [((4, 6, 8), P(("a", "b"), "c", None), True), ((8,), P(None), True)],
        [P(("a", "b"), "c", None)],
        [P(("a", "b"), "c", None), P(None, partial=("a", "b", "c"))],
    ),
    "rms_tuple_axes_abc_c_unused": Case(
        rms, _rms, ABC, [((8, 3, 8), P(("c", "a"), None, None), True), ((8,), P(None), True)],
        [P(("c", "a"), None, None)], [P(("c", "a"), None, None), P(None, partial=("a", "c"))],
    ),
    "rms_uneven_5_over_4": Case(
        rms, _rms, X4, [((5, 3, 8), P("x", None, None), True), ((8,), P(None), True)],
        [P("x", None, None)], [P("x", None, None), P(None, partial="x")],
    ),
    "rms_uneven_3_over_4_empty_block": Case(
        rms, _rms, X4, [((3, 8), P("x", None), True), ((8,), P(None), True)],
        [P("x", None)], [P("x", None), P(None, partial="x")],
    ),
    "rms_plain_weight": Case(
        rms, _rms, X4, [((8, 3, 16), P("x", None, None), True), ((16,), None, False)],
        [P("x", None, None)], [P("x", None, None)],
    ),
    "rms_weight_without_grad": Case(
        rms, _rms, AB, [((4, 6, 8), P("a", "b", None), True), ((8,), P(None), False)],
        [P("a", "b", None)], [P("a", "b", None)],
    ),
    "rms_only_weight_grad_eps_kwarg": Case(
        rms, _rms, X4, [((8, 3, 16), P("x", None, None), False), ((16,), P(None), True)],
        [P("x", None, None)], [P(None, partial="x")], {"eps": 0.25},
    ),
    "rotary_plain_cos_sin_heads_x4": Case(
        rotate, _rotate, X4,
        [((2, 4, 4, 8), P(None, None, "x", None), True), ((4, 1, 4), None, False),
         ((4, 1, 4), None, False)],
        [P(None, None, "x", None)], [P(None, None, "x", None)],
    ),
    "rotary_replicated_cos_sin_heads_x4": Case(
        rotate, _rotate, X4,
        [((2, 4, 4, 8), P(None, None, "x", None), True), ((4, 1, 4), P(None, None, None), True),
         ((4, 1, 4), P(None, None, None), True)],
        [P(None, None, "x", None)],
        [P(None, None, "x", None), P(None, None, None, partial="x"),
         P(None, None, None, partial="x")],
    ),
    "rotary_batch_heads_ab": Case(
        rotate, _rotate, AB,
        [((2, 4, 4, 8), P("a", None, "b", None), True), ((4, 1, 4), P(None, None, None), True),
         ((4, 1, 4), None, False)],
        [P("a", None, "b", None)],
        [P("a", None, "b", None), P(None, None, None, partial=("a", "b"))],
    ),
    "rotary_seq_split_alike_x4": Case(
        rotate, _rotate, X4,
        [((2, 4, 3, 8), P(None, "x", None, None), True), ((4, 1, 4), P("x", None, None), True),
         ((4, 1, 4), P("x", None, None), True)],
        [P(None, "x", None, None)],
        [P(None, "x", None, None), P("x", None, None), P("x", None, None)],
    ),
    "center_two_outputs_uneven_x4": Case(
        center, _center, X4, [((6, 5, 8), P("x", None, None), True)],
        [P("x", None, None), P("x", None)], [P("x", None, None)],
    ),
    "center_two_outputs_ba": Case(
        center, _center, AB, [((4, 6, 8), P("b", "a", None), True)],
        [P("b", "a", None), P("b", "a")], [P("b", "a", None)],
    ),
    "pointwise_broadcast_ab": Case(
        pointwise, _pointwise, AB, [((4, 6), P("a", "b"), True), ((6,), P("b"), True)],
        [P("a", "b")], [P("a", "b"), P("b", partial="a")],
    ),
    "pointwise_extent1_abc": Case(
        pointwise, _pointwise, ABC, [((2, 4, 6), P("c", "a", "b"), True),
                                     ((1, 6), P(None, "b"), True)],
        [P("c", "a", "b")], [P("c", "a", "b"), P(None, "b", partial=("a", "c"))],
    ),
}  # fmt: skip


# == 1. the fast path ========================================================================
@pytest.mark.parametrize("name", FAST)
def test_fast_path_values_grads_layouts_and_no_communication(name):
    case = FAST[name]
    mesh = sl.Mesh.simulated(case.axes)
    args, refs = _make(mesh, case.inputs)
    with sl.comm_ledger() as fwd:
        outs = _tuple(case.fn(*args, **case.kwargs))
    assert fwd.count() == 0, fwd.summary()
    assert [o.spec for o in outs] == case.out_specs
    assert all(isinstance(o, sl.ShardedTensor) for o in outs)

    cot_full = [_value(tuple(o.shape), 100 + k) for k, o in enumerate(outs)]
    cots = [sl.shard(c, mesh, o.spec) for c, o in zip(cot_full, outs)]
    with sl.comm_ledger() as bwd:
        torch.autograd.backward(outs, cots)
    assert bwd.count() == 0, bwd.summary()

    ref_outs, ref_grads = _reference(case.ref, refs, cot_full, case.kwargs)
    for o, r in zip(outs, ref_outs):
        assert tuple(o.shape) == tuple(r.shape)
        torch.testing.assert_close(o.full(), r, **TOL)
    leaves = [a for a in args if a.requires_grad]
    assert len(leaves) == len(ref_grads) == len(case.grad_specs)
    for a, r, spec in zip(leaves, ref_grads, case.grad_specs):
        assert a.grad.spec == spec
        torch.testing.assert_close(a.grad.full(), r, **TOL)
    for a in args:
        if not a.requires_grad and isinstance(a, sl.ShardedTensor):
            assert a.grad is None


def test_empty_block_gets_zero_gradient_block():
    """3 rows over 4 devices: device 3 holds an empty block, of x and of its gradient."""
    mesh = sl.Mesh.simulated(X4)
    (x, w), _ = _make(mesh, [((3, 8), P("x", None), True), ((8,), P(None), True)])
    y = rms(x, w)
    assert [tuple(b.shape) for b in y.local_shards()] == [(1, 8)] * 3 + [(0, 8)]
    y.sum().backward()
    assert [tuple(b.shape) for b in x.grad.local_shards()] == [(1, 8)] * 3 + [(0, 8)]
    assert torch.equal(w.grad.local_shards()[3], torch.zeros(8, dtype=torch.float64))


def test_sum_backward_matches_reference():
    """The usual `y.sum().backward()` (the cotangent from sum's own backward)."""
    mesh = sl.Mesh.simulated(AB)
    (x, w), (xr, wr) = _make(mesh, [((4, 6, 8), P("a", "b", None), True), ((8,), P(None), True)])
    with sl.comm_ledger() as led:
        y = rms(x, w)
    assert led.count() == 0
    y.sum().backward()
    _rms(xr, wr).sum().backward()
    torch.testing.assert_close(x.grad.full(), xr.grad, **TOL)
    torch.testing.assert_close(w.grad.full(), wr.grad, **TOL)
    assert w.grad.spec == P(None, partial=("a", "b"))


def test_two_outputs_one_cotangent():
    mesh = sl.Mesh.simulated(X4)
    (x,), (xr,) = _make(mesh, [((6, 5, 8), P("x", None, None), True)])
    y0, y1 = center(x)
    G = _value(tuple(y1.shape), 7)
    with sl.comm_ledger() as led:
        torch.autograd.backward([y1], [sl.shard(G, mesh, y1.spec)])
    assert led.count() == 0
    (gr,) = torch.autograd.grad(_center(xr)[1], xr, G)
    torch.testing.assert_close(x.grad.full(), gr, **TOL)


def test_view_inputs_are_synced_and_differentiable():
    """An input that is a view of another ShardedTensor sees in-place writes to its base,
    and its gradient flows to the base; the output does not follow later writes."""
    mesh = sl.Mesh.simulated(X4)
    B, W, G = _value((8, 16), 0), _value((8,), 1), _value((8, 8), 2)
    base = sl.shard(B, mesh, P("x", None))
    x = base[:, :8]
    with torch.no_grad():
        base.mul_(2)
    w = sl.shard(W, mesh, P(None))
    with sl.comm_ledger() as led:
        y = rms(x, w)
    assert led.count() == 0
    torch.testing.assert_close(y.full(), _rms(2 * B[:, :8], W), **TOL)
    with torch.no_grad():
        base.mul_(3)
    torch.testing.assert_close(y.full(), _rms(2 * B[:, :8], W), **TOL)

    b = sl.shard(B, mesh, P("x", None)).requires_grad_()
    y = rms(b[:, 4:12], w)
    torch.autograd.backward(y, sl.shard(G, mesh, y.spec))
    br = B.clone().requires_grad_()
    (gr,) = torch.autograd.grad(_rms(br[:, 4:12], W), br, G)
    torch.testing.assert_close(b.grad.full(), gr, **TOL)


def test_decorator_keeps_name_and_signature():
    assert center.__name__ == "_center" and center.signature == "(n)->(n),()"
    assert rms.__wrapped__ is _rms


@pytest.mark.parametrize("grad", [False, True])
def test_output_returning_an_input_does_not_alias_it(grad):
    mesh = sl.Mesh.simulated(X4)
    X = _value((8, 4), 0)
    x = sl.shard(X, mesh, P("x", None)).requires_grad_(grad)
    y = ident(x)
    assert y is not x and y.spec == x.spec
    torch.testing.assert_close(y.full(), X, **TOL)
    for yb, xb in zip(y.local_shards(), x.local_shards()):
        assert yb.untyped_storage().data_ptr() != xb.untyped_storage().data_ptr()
    with torch.no_grad():
        y.mul_(2)
    assert torch.equal(x.full(), X)  # the input is untouched
    torch.testing.assert_close(y.full(), 2 * X, **TOL)


@pytest.mark.parametrize("fn", [_ident, lambda x: x[..., :]], ids=["identity", "view"])
def test_output_returning_an_input_gradient(fn):
    mesh = sl.Mesh.simulated(X4)
    X, G = _value((8, 4), 0), _value((8, 4), 1)
    x = sl.shard(X, mesh, P("x", None)).requires_grad_()
    y = sl.gufunc(fn, signature="(n)->(n)")(x)
    torch.autograd.backward(y, sl.shard(G, mesh, y.spec))
    torch.testing.assert_close(x.grad.full(), G, **TOL)  # d(identity) = the cotangent


# == 2. one node: no subclass dispatch inside the fast path =================================
def test_fast_path_is_one_node(monkeypatch):
    mesh = sl.Mesh.simulated(AB)
    specs = [((4, 6, 8), P("a", "b", None), True), ((8,), P(None), True)]
    (x, w), _ = _make(mesh, specs)
    (x2, w2), _ = _make(mesh, specs)
    (x * 1).full()  # binds _tensor._dispatch to the dispatcher (it rebinds itself on first use)
    real = _tensor_mod._dispatch
    calls = [0]

    def counting(func, args, kwargs):
        calls[0] += 1
        return real(func, args, kwargs)

    monkeypatch.setattr(_tensor_mod, "_dispatch", counting)
    G = sl.shard(_value((4, 6, 8), 5), mesh, P("a", "b", None))
    counts = {}
    for name, f, a in (("fast", rms, (x, w)), ("unwrapped", _rms, (x2, w2))):
        calls[0] = 0
        y = f(*a)
        counts[name] = calls[0]
        calls[0] = 0
        torch.autograd.backward(y, G)
        counts[name + "_backward"] = calls[0]
    monkeypatch.undo()
    assert _tensor_mod._dispatch is real
    assert counts["fast"] == 0, counts
    assert counts["unwrapped"] > 5, counts
    assert counts["fast_backward"] < counts["unwrapped_backward"], counts
    torch.testing.assert_close(x.grad.full(), x2.grad.full(), **TOL)


# == 3. the fallback path: op by op, the same values and ledger as the unwrapped fn ========
FALLBACK = {
    "core_dim_split": Case(
        rms, _rms, X4, [((2, 3, 8), P(None, None, "x"), True), ((8,), P(None), True)], [], [],
    ),
    "loop_dims_split_differently": Case(
        pointwise, _pointwise, AB, [((4, 6), P("a", "b"), True), ((4, 6), P("b", "a"), True)],
        [], [],
    ),
    "one_input_does_not_split_a_full_extent_dim": Case(
        pointwise, _pointwise, AB, [((4, 6), P("a", None), True), ((4, 6), P(None, None), True)],
        [], [],
    ),
    "rotary_cos_unsplit_on_split_seq": Case(
        rotate, _rotate, X4,
        [((2, 4, 3, 8), P(None, "x", None, None), True), ((4, 1, 4), P(None, None, None), True),
         ((4, 1, 4), P(None, None, None), True)],
        [], [],
    ),
    "extent1_dim_split": Case(
        pointwise, _pointwise, AB, [((4, 6), P("a", None), True), ((1, 6), P("a", None), True)],
        [], [],
    ),
    "plain_tensor_full_extent_on_split_dim": Case(
        pointwise, _pointwise, X4, [((4, 6), P("x", None), True), ((4, 6), None, False)], [], [],
    ),
    "differentiable_plain_tensor": Case(
        pointwise, _pointwise, X4, [((4, 6), P("x", None), True), ((6,), None, True)], [], [],
    ),
}  # fmt: skip


def _run_and_record(fn, args, mesh, cot_full, kwargs=None):
    with sl.comm_ledger() as fwd:
        outs = _tuple(fn(*args, **(kwargs or {})))
    cots = [sl.shard(c, mesh, o.spec) if isinstance(o, sl.ShardedTensor) else c
            for c, o in zip(cot_full, outs)]  # fmt: skip
    with sl.comm_ledger() as bwd:
        torch.autograd.backward(outs, cots)
    return outs, fwd, bwd


def _check_against_unwrapped(case, mesh, args, args2, refs):
    shapes = [tuple(o.shape) for o in _tuple(case.ref(*refs))]
    cot_full = [_value(s, 100 + k) for k, s in enumerate(shapes)]
    outs, fwd, bwd = _run_and_record(case.fn, args, mesh, cot_full)
    outs2, fwd2, bwd2 = _run_and_record(case.ref, args2, mesh, cot_full)
    ref_outs, ref_grads = _reference(case.ref, refs, cot_full)
    for o, o2, r in zip(outs, outs2, ref_outs):
        assert o.spec == o2.spec
        torch.testing.assert_close(o.full(), r, **TOL)
    leaves = [a for a in args if a.requires_grad]
    leaves2 = [a for a in args2 if a.requires_grad]
    for a, a2, r in zip(leaves, leaves2, ref_grads, strict=True):
        full = a.grad.full() if isinstance(a.grad, sl.ShardedTensor) else a.grad
        torch.testing.assert_close(full, r, **TOL)
        assert type(a.grad) is type(a2.grad)
        if isinstance(a.grad, sl.ShardedTensor):
            assert a.grad.spec == a2.grad.spec
    assert _records(fwd) == _records(fwd2)
    assert _records(bwd) == _records(bwd2)
    assert (fwd.count(), fwd.total_bytes) == (fwd2.count(), fwd2.total_bytes)
    assert (bwd.count(), bwd.total_bytes) == (bwd2.count(), bwd2.total_bytes)
    return fwd, bwd


@pytest.mark.parametrize("name", FALLBACK)
def test_fallback_matches_reference_and_unwrapped_ledger(name):
    case = FALLBACK[name]
    mesh = sl.Mesh.simulated(case.axes)
    args, refs = _make(mesh, case.inputs)
    args2, _ = _make(mesh, case.inputs)
    _check_against_unwrapped(case, mesh, args, args2, refs)


def test_fallback_sends_what_the_ops_send():
    """The core-dim-split RMSNorm must communicate (its mean over e): the fallback is real."""
    case = FALLBACK["core_dim_split"]
    mesh = sl.Mesh.simulated(case.axes)
    args, refs = _make(mesh, case.inputs)
    args2, _ = _make(mesh, case.inputs)
    fwd, _ = _check_against_unwrapped(case, mesh, args, args2, refs)
    assert fwd.count() > 0


def test_fallback_partial_input():
    mesh = sl.Mesh.simulated(X4)
    pieces = [_value((4, 3, 8), 10 + j) for j in range(4)]
    W = _value((8,), 20)

    def make():
        x = _partial(pieces, mesh, (None, None, None), "x").requires_grad_()
        return [x, sl.shard(W, mesh, P(None)).requires_grad_()]

    args, args2 = make(), make()
    assert args[0].spec == P(None, None, None, partial="x")
    refs = [sum(pieces).requires_grad_(), W.clone().requires_grad_()]
    case = Case(rms, _rms, X4, [], [], [])
    _check_against_unwrapped(case, mesh, args, args2, refs)


# == 4. cotangent layouts ====================================================================
@pytest.mark.parametrize(
    "cot_layout",
    [P(None, "a", "b"), P(None, None, None), P("b", None, None), P("a", None, "b")],
    ids=str,
)
def test_cotangent_in_another_layout(cot_layout):
    mesh = sl.Mesh.simulated(AB)
    (x, w), (xr, wr) = _make(mesh, [((4, 6, 8), P("a", None, None), True), ((8,), P(None), True)])
    y = rms(x, w)
    G = _value((4, 6, 8), 50)
    g = sl.shard(G, mesh, cot_layout)
    with sl.comm_ledger() as led:
        torch.autograd.backward(y, g)
    assert all(r.cause == "gufunc" and r.direction == "backward" for r in led.records), (
        led.summary()
    )
    gx, gw = torch.autograd.grad(_rms(xr, wr), (xr, wr), G)
    torch.testing.assert_close(x.grad.full(), gx, **TOL)
    torch.testing.assert_close(w.grad.full(), gw, **TOL)
    assert x.grad.spec == P("a", None, None)
    assert w.grad.spec == P(None, partial="a")


def test_cotangent_through_a_reshard_of_the_output():
    mesh = sl.Mesh.simulated(AB)
    (x, w), (xr, wr) = _make(mesh, [((4, 6, 8), P("a", "b", None), True), ((8,), P(None), True)])
    G = _value((4, 6, 8), 51)
    z = sl.reshard(rms(x, w), P(None, "a", "b"))
    (z * sl.shard(G, mesh, P(None, "a", "b"))).sum().backward()
    (_rms(xr, wr) * G).sum().backward()
    torch.testing.assert_close(x.grad.full(), xr.grad, **TOL)
    torch.testing.assert_close(w.grad.full(), wr.grad, **TOL)


def test_sum_partial_cotangent_passes_through():
    mesh = sl.Mesh.simulated(AB)
    specs = [((4, 6, 8), P("a", None, None), True), ((8,), P(None), True)]
    pieces = [_value((4, 6, 8), 60), _value((4, 6, 8), 61)]
    results = {}
    for name, f in (("gufunc", rms), ("unwrapped", _rms)):
        (x, w), (xr, wr) = _make(mesh, specs)
        y = f(x, w)
        g = _partial(pieces, mesh, (("a",), None, None), "b")
        with sl.comm_ledger() as led:
            torch.autograd.backward(y, g)
        results[name] = led
        gx, gw = torch.autograd.grad(_rms(xr, wr), (xr, wr), sum(pieces))
        torch.testing.assert_close(x.grad.full(), gx, **TOL)
        torch.testing.assert_close(w.grad.full(), gw, **TOL)
        if name == "gufunc":  # the partial axis carries over to the gradients
            assert x.grad.spec == P("a", None, None, partial="b")
            assert w.grad.spec == P(None, partial=("a", "b"))
    assert results["gufunc"].count() == 0, results["gufunc"].summary()
    assert results["gufunc"].count() <= results["unwrapped"].count()


def test_max_partial_cotangent_is_reduced_in_backward():
    """A non-sum partial cotangent is not linear to pass through: one all-reduce, cause
    "gufunc", the same bytes as the unwrapped function's backward."""
    mesh = sl.Mesh.simulated(AB)
    specs = [((4, 6, 8), P("a", None, None), True), ((8,), P(None), True)]
    G0 = _value((4, 6, 8), 62)
    G1 = G0 - _value((4, 6, 8), 63).abs()  # max(G0, G1) = G0
    blocks = [sl.shard(G, mesh, P("a", None, None)).local_shards() for G in (G0, G1)]
    lay = P("a", None, None).with_partial(("b",), "max")
    leds = []
    for f in (rms, _rms):
        (x, w), (xr, wr) = _make(mesh, specs)
        y = f(x, w)
        g = sl.from_local([blocks[d % 2][d] for d in range(4)], mesh, lay, (4, 6, 8))
        torch.testing.assert_close(g.full(), G0, **TOL)
        with sl.comm_ledger() as led:
            torch.autograd.backward(y, g)
        leds.append(led)
        gx, gw = torch.autograd.grad(_rms(xr, wr), (xr, wr), G0)
        torch.testing.assert_close(x.grad.full(), gx, **TOL)
        torch.testing.assert_close(w.grad.full(), gw, **TOL)
    assert [(r.kind, r.axes, r.cause) for r in leds[0].records] == [
        ("all_reduce", ("b",), "gufunc")
    ]
    assert (leds[0].count(), leds[0].total_bytes) == (leds[1].count(), leds[1].total_bytes)


@pytest.mark.parametrize("partial_first", [True, False])
def test_partial_and_plain_cotangents_of_two_outputs(partial_first):
    """One output's cotangent sum-partial, the other's not: both end right."""
    mesh = sl.Mesh.simulated(AB)
    (x,), (xr,) = _make(mesh, [((4, 6), P("a", None), True)])
    y0, y1 = center(x)
    if partial_first:
        p = [_value((4, 6), 70), _value((4, 6), 71)]
        cots = [_partial(p, mesh, (("a",), None), "b"), None]
        full = [sum(p), _value((4,), 72)]
        cots[1] = sl.shard(full[1], mesh, y1.spec)
    else:
        p = [_value((4,), 73), _value((4,), 74)]
        full = [_value((4, 6), 75), sum(p)]
        cots = [sl.shard(full[0], mesh, y0.spec), _partial(p, mesh, (("a",),), "b")]
    torch.autograd.backward([y0, y1], cots)
    (gr,) = torch.autograd.grad(_center(xr), xr, full)
    torch.testing.assert_close(x.grad.full(), gr, **TOL)


def test_retain_graph_and_a_second_backward():
    mesh = sl.Mesh.simulated(X4)
    (x, w), (xr, wr) = _make(mesh, [((8, 3, 16), P("x", None, None), True), ((16,), P(None), True)])
    y = rms(x, w)
    G = _value((8, 3, 16), 80)
    g = sl.shard(G, mesh, y.spec)
    torch.autograd.backward(y, g, retain_graph=True)
    torch.autograd.backward(y, g)
    gx, gw = torch.autograd.grad(_rms(xr, wr), (xr, wr), G)
    torch.testing.assert_close(x.grad.full(), 2 * gx, **TOL)
    torch.testing.assert_close(w.grad.full(), 2 * gw, **TOL)
    with pytest.raises(sl.ShardlibError, match="a second backward through this call.*retain_graph"):
        torch.autograd.backward(y, g)


# == 5. distributed (gloo, 4 ranks) =========================================================
DIST_LAYOUTS = {"x4": ({"x": 4}, ("x", None, None)), "ab": ({"a": 2, "b": 2}, ("a", "b", None))}


def run_rms(mesh, dims):
    """RMSNorm forward and backward on `mesh` (float32): local blocks, gradient layouts and
    full gradients, and the ledger."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 6, 8, generator=g)
    W = torch.randn(8, generator=g)
    G = torch.randn(4, 6, 8, generator=g)
    x = sl.shard(X, mesh, P(*dims)).requires_grad_()
    w = sl.shard(W, mesh, P(None)).requires_grad_()
    with sl.comm_ledger() as led:
        y = rms(x, w)
        torch.autograd.backward(y, sl.shard(G, mesh, y.spec))
    records = _records(led)
    return (y.local_shards(), x.grad.local_shards(), w.grad.local_shards(), y.spec,
            x.grad.spec, w.grad.spec, w.grad.full(), records)  # fmt: skip


@pytest.mark.dist
@pytest.mark.parametrize("name", DIST_LAYOUTS)
def test_distributed_matches_simulated(workers4, name):
    axes, dims = DIST_LAYOUTS[name]
    sim = run_rms(sl.Mesh.simulated(axes), dims)
    dist_out = workers4.run(run_rms, axes, (dims,))
    assert len(dist_out) == 4
    assert sim[7] == []
    for rank, d in enumerate(dist_out):
        assert d[3:6] == sim[3:6], rank
        assert d[7] == [], rank
        for k in range(3):  # this rank's block of y, x.grad, w.grad (partial: its own part)
            assert len(d[k]) == 1
            torch.testing.assert_close(d[k][0], sim[k][rank], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d[6], sim[6], rtol=1e-6, atol=1e-6)


# == 6. errors ===============================================================================
@pytest.mark.parametrize(
    ("signature", "match"),
    [
        ("e->e", "is not of the form"),
        ("(e)(e)->(e)", "is not of the form"),
        ("(e)->", "is not of the form"),
        (3, "is not of the form"),
        ("(e,e)->(e)", "names a core dim twice"),
        ("(e)->(e,e)", "names a core dim twice"),
        ("(e)->(f)", r"output core dims \['f'\] appear in no input"),
    ],
)
def test_bad_signature(signature, match):
    with pytest.raises(sl.ShardlibError, match=match):
        sl.gufunc(_rms, signature=signature)
    with pytest.raises(sl.ShardlibError, match=match):
        sl.gufunc(signature=signature)


def test_signature_grammar_accepts_spaces_and_empty_cores():
    g = sl.gufunc(lambda a, b: a * b, signature=" ( ) , ( ) -> ( ) ")
    mesh = sl.Mesh.simulated(X4)
    A, B = _value((8,), 1), _value((8,), 2)
    y = g(sl.shard(A, mesh, P("x")), sl.shard(B, mesh, P("x")))
    torch.testing.assert_close(y.full(), A * B, **TOL)


def _sharded(mesh, shape, layout, seed=0):
    return sl.shard(_value(shape, seed), mesh, layout)


def test_argument_errors():
    mesh = sl.Mesh.simulated(X4)
    x = _sharded(mesh, (8, 8), P("x", None))
    w = _sharded(mesh, (8,), P(None))
    with pytest.raises(TypeError, match=r"takes 2 positional tensor argument\(s\).*got 1"):
        rms(x)
    with pytest.raises(TypeError, match=r"takes 2 positional tensor argument\(s\).*got 3"):
        rms(x, w, 1e-5)
    with pytest.raises(
        TypeError, match="positional arguments are the signature's tensors; got float"
    ):
        rms(x, 2.0)
    with pytest.raises(TypeError, match="tensor keyword arguments are not allowed"):
        rms(x, w, eps=torch.tensor(1e-5))


def test_shape_errors():
    mesh = sl.Mesh.simulated(X4)
    x = _sharded(mesh, (8, 8), P("x", None))
    with pytest.raises(sl.ShardlibError, match="fewer dims than its core dims"):
        sl.gufunc(lambda a, b: a @ b, signature="(m,n),(n)->(m)")(_sharded(mesh, (8,), P("x")), x)
    with pytest.raises(sl.ShardlibError, match=r"core dim 'e' is 8 in one argument and 6"):
        rms(x, _sharded(mesh, (6,), P(None)))
    with pytest.raises(sl.ShardlibError, match="do not broadcast"):
        pointwise(x, _sharded(mesh, (8, 3), P(None, None)))


def test_wrong_outputs():
    mesh = sl.Mesh.simulated(X4)
    x = _sharded(mesh, (8, 8), P("x", None))
    one = sl.gufunc(lambda a: a * 2, signature="(n)->(n),()")
    with pytest.raises(sl.ShardlibError, match=r"returned 1 value\(s\).*declares 2 tensor output"):
        one(x)
    not_tensor = sl.gufunc(lambda a: (a * 2, 3.0), signature="(n)->(n),()")
    with pytest.raises(sl.ShardlibError, match=r"types \['Tensor', 'float'\]"):
        not_tensor(x)
    core = sl.gufunc(lambda a: a[..., :4], signature="(n)->(n)")
    with pytest.raises(sl.ShardlibError, match=r"output 0 on device 0 has shape \(2, 4\)"):
        core(x)
    rank = sl.gufunc(lambda a: a.sum(-1), signature="(n)->()")
    rank_bad = sl.gufunc(lambda a: a.sum(), signature="(n)->()")
    rank(x)  # fine
    with pytest.raises(sl.ShardlibError, match=r"\(rank 1\)"):
        rank_bad(x)
    with pytest.raises(sl.ShardlibError, match="declares 2 tensor output"):  # with grad too
        one(x.detach().requires_grad_())


def test_second_order_gradient_raises():
    mesh = sl.Mesh.simulated(X4)
    (x, w), _ = _make(mesh, [((8, 3, 16), P("x", None, None), True), ((16,), P(None), True)])
    y = rms(x, w)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice.*once_differentiable"):
        gx.sum().backward()
    v = _sharded(mesh, (8, 3, 16), P("x", None, None), seed=4).requires_grad_()
    (gx,) = torch.autograd.grad(rms(x, w), x, v, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice.*once_differentiable"):
        gx.sum().backward()


# == 7. passthrough ==========================================================================
def test_plain_tensors_call_fn_directly():
    X = _value((4, 8), 0)
    assert ident(X) is X  # fn itself, on the very objects
    seen = []

    def spy(a, b):
        seen.append((a, b))
        return a + b

    A, B = _value((3,), 1), _value((3,), 2)
    out = sl.gufunc(spy, signature="(),()->()")(A, B)
    assert seen[0][0] is A and seen[0][1] is B
    assert type(out) is torch.Tensor
    # no ShardedTensor: not even the positional-argument check (fn decides)
    assert sl.gufunc(lambda a, s: a * s, signature="(),()->()")(A, 2.0).tolist() == (A * 2).tolist()
    Xr = X.clone().requires_grad_()
    y = rms(Xr, _value((8,), 3))
    assert y.grad_fn is not None and not isinstance(y, sl.ShardedTensor)


def test_no_grad_builds_no_graph():
    mesh = sl.Mesh.simulated(AB)
    (x, w), (xr, wr) = _make(mesh, [((4, 6, 8), P("a", "b", None), True), ((8,), P(None), True)])
    with torch.no_grad(), sl.comm_ledger() as led:
        y = rms(x, w)
        y0, y1 = center(x)
    assert led.count() == 0
    for o in (y, y0, y1):
        assert isinstance(o, sl.ShardedTensor)
        assert not o.requires_grad and o.grad_fn is None
        assert all(not b.requires_grad for b in o.local_shards())
    torch.testing.assert_close(y.full(), _rms(xr, wr).detach(), **TOL)
    torch.testing.assert_close(y1.full(), _center(xr)[1].detach(), **TOL)


def test_inputs_without_grad_give_outputs_without_graph():
    mesh = sl.Mesh.simulated(X4)
    (x, w), (xr, wr) = _make(mesh, [((8, 3, 16), P("x", None, None), False),
                                    ((16,), P(None), False)])  # fmt: skip
    y = rms(x, w)
    assert isinstance(y, sl.ShardedTensor) and y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y.full(), _rms(xr, wr), **TOL)


def test_mixed_meshes_fall_back_to_dispatch():
    """Inputs on two different meshes do not take the fast path (dispatch decides)."""
    m1, m2 = sl.Mesh.simulated(X4), sl.Mesh.simulated({"y": 4})
    x = _sharded(m1, (8, 8), P("x", None))
    w = _sharded(m2, (8,), P(None))
    try:
        unwrapped = _rms(x, w).full()
    except Exception as e:  # the regular path rejects it: the gufunc must say the same
        with pytest.raises(type(e)):
            rms(x, w)
    else:
        torch.testing.assert_close(rms(x, w).full(), unwrapped, **TOL)


# == 9. remat inputs keep their remat semantics ============================================
def test_remat_input_runs_op_by_op_and_is_regathered_in_backward():
    """An input from sl.reshard(..., remat=True) (ZeRO-3's gathered parameters too), under
    sl.remat_saves(), is regathered in backward, not kept by a local graph: the gufunc runs
    op by op, and its ledger equals the unwrapped function's, a backward "regather" included."""
    mesh = sl.Mesh.simulated(X4)
    W = _value((8,), 7)
    (x,), (xr,) = _make(mesh, [((4, 6, 8), P("x", None, None), True)])

    def run(fn):
        w = sl.shard(W, mesh, P("x")).requires_grad_()
        with sl.comm_ledger() as led:
            with sl.remat_saves():  # saves of remat results keep only their source
                y = fn(x, sl.reshard(w, P(None), remat=True))
            torch.autograd.backward(y, sl.shard(_value((4, 6, 8), 8), mesh, y.spec))
        return y, w, [(r.kind, r.cause, r.direction, r.bytes) for r in led.records]

    y, w, records = run(sl.gufunc(_rms, signature="(e),(e)->(e)"))
    grad_x = x.grad.full()
    x.grad = None
    y0, w0, records0 = run(_rms)
    assert records == records0
    assert any(c == "regather" and d == "backward" for _, c, d, _ in records)
    wr = W.clone().requires_grad_()
    yr, grads = _reference(_rms, [xr, wr], [_value((4, 6, 8), 8)])
    torch.testing.assert_close(y.full(), yr[0], **TOL)
    torch.testing.assert_close(grad_x, grads[0], **TOL)
    torch.testing.assert_close(w.grad.full(), grads[1], **TOL)
