"""torch's training utilities on sharded parameters with partial gradients.

Covers `torch.optim` (SGD with momentum / nesterov, Adam, Adam with amsgrad,
AdamW; each with foreach=False, foreach=True and fused=True),
`torch.nn.utils.clip_grad_value_` and `clip_grad_norm_` (foreach off and on,
several norm types), `Module.zero_grad` / `Optimizer.zero_grad` (set_to_none
both ways), and the `aten._foreach_*` / `_fused_*` rules under them
(shardlib/ops/_foreach.py).

The model is two linears in plain torch ops whose parameters are replicated,
column-split and row-split on {dp: 2, tp: 2} and {x: 4} (uneven there), with
the batch split over dp (or x), so gradients come out partial. Every parameter
and every optimizer state after every step is compared with the same program
on plain float64 tensors. Ledger checks: grouped norms (one reduce-scatter and
one all-reduce for all tensors) and grouped in-place reductions (one
all-reduce per partial group, not per tensor).
"""

from __future__ import annotations

import math

import pytest
import torch

import shardlib as sl
from tests._reference import make_summands

U = torch.nn.utils
OPT = torch.optim
TOL = dict(rtol=1e-9, atol=1e-12)
BATCH, IN, HIDDEN, OUT = 8, 5, 6, 3  # HIDDEN=6 over 4 devices is uneven (2, 2, 2, 0)
STEPS = 3

MESHES = {
    "dp2xtp2": (
        {"dp": 2, "tp": 2},
        {"w1": sl.P(None, "tp"), "b1": sl.P("tp"), "w2": sl.P("tp", None), "b2": sl.P()},
        sl.P("dp", None),
    ),
    "x4": (
        {"x": 4},
        {"w1": sl.P(None, "x"), "b1": sl.P("x"), "w2": sl.P("x", None), "b2": sl.P()},
        sl.P("x", None),
    ),
}


def _init() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"w1": (IN, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, OUT), "b2": (OUT,)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, IN, generator=g, dtype=torch.float64),
            torch.randn(BATCH, OUT, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def _loss(p: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ p["w1"] + p["b1"])
    return ((h @ p["w2"] + p["b2"]) - t).pow(2).mean()


class _Model(torch.nn.Module):
    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for k, v in params.items():
            setattr(self, k, torch.nn.Parameter(v))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _loss(dict(self.named_parameters()), x, t)


def _models(mesh_name: str):
    axes, layouts, batch = MESHES[mesh_name]
    mesh = sl.Mesh.simulated(axes)
    init = _init()
    ref = _Model({k: v.clone() for k, v in init.items()})
    sharded = _Model({k: sl.shard(v.clone(), mesh, layouts[k]) for k, v in init.items()})
    return mesh, batch, ref, sharded


def _value(v):
    return v.full() if isinstance(v, sl.ShardedTensor) else v


def _compare(ref: torch.nn.Module, sharded: torch.nn.Module, ro=None, so=None, what=""):
    for (name, r), (_, s) in zip(ref.named_parameters(), sharded.named_parameters()):
        torch.testing.assert_close(
            s.full(), r.detach(), **TOL, msg=lambda m, name=name: f"{what} {name}: {m}"
        )
        if r.grad is not None or s.grad is not None:
            torch.testing.assert_close(_value(s.grad), r.grad, **TOL)
        if ro is None:
            continue
        rs, ss = ro.state[r], so.state[s]
        assert rs.keys() == ss.keys()
        for key in rs:
            torch.testing.assert_close(
                _value(ss[key]),
                rs[key],
                **TOL,
                msg=lambda m, name=name, key=key: f"{what} {name}.{key}: {m}",
            )


def _train(mesh_name: str, make_opt, util=None, zero=None):
    """STEPS steps of the same program on sharded and on plain float64 params, compared each step."""
    mesh, batch, ref, sharded = _models(mesh_name)
    ro, so = make_opt(ref.parameters()), make_opt(sharded.parameters())
    for step, (x, t) in enumerate(_data()):
        for model, opt, xs, ts in (
            (ref, ro, x, t),
            (sharded, so, sl.shard(x, mesh, batch), sl.shard(t, mesh, batch)),
        ):
            (zero or (lambda m, o: o.zero_grad()))(model, opt)
            model(xs, ts).backward()
            if util is not None:
                out = util(list(model.parameters()))
                if step == 0 and out is not None:
                    model._util_out = out
            opt.step()
        if util is not None and getattr(ref, "_util_out", None) is not None:
            torch.testing.assert_close(_value(sharded._util_out), ref._util_out, **TOL)
        _compare(ref, sharded, ro, so, what=f"step {step}")
    return sharded, so


# == optimizers ===================================================================
OPTIMIZERS = {
    "sgd_momentum": lambda p, **k: OPT.SGD(p, lr=0.1, momentum=0.9, **k),
    "sgd_nesterov": lambda p, **k: OPT.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, **k
    ),
    "adam": lambda p, **k: OPT.Adam(p, lr=0.05, weight_decay=0.01, **k),
    "adam_amsgrad": lambda p, **k: OPT.Adam(p, lr=0.05, amsgrad=True, **k),
    "adamw": lambda p, **k: OPT.AdamW(p, lr=0.05, weight_decay=0.1, **k),
}
VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_optimizer_matches_plain_torch(mesh_name, opt, variant):
    make = OPTIMIZERS[opt]
    _train(mesh_name, lambda p: make(p, **VARIANTS[variant]))


# == utilities ====================================================================
UTILS = {
    "clip_value": lambda ps: U.clip_grad_value_(ps, 0.02, foreach=False),
    "clip_value_foreach": lambda ps: U.clip_grad_value_(ps, 0.02, foreach=True),
    "clip_norm": lambda ps: U.clip_grad_norm_(ps, 0.3, foreach=False),
    "clip_norm_foreach": lambda ps: U.clip_grad_norm_(ps, 0.3, foreach=True),
    "clip_norm_inf_foreach": lambda ps: U.clip_grad_norm_(
        ps, 0.05, norm_type=math.inf, foreach=True
    ),
    "clip_norm_1_foreach": lambda ps: U.clip_grad_norm_(ps, 0.3, norm_type=1.0, foreach=True),
    "clip_norm_3_foreach": lambda ps: U.clip_grad_norm_(ps, 0.3, norm_type=3.0, foreach=True),
}


@pytest.mark.parametrize("util", UTILS)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_grad_utility_matches_plain_torch(mesh_name, util):
    _train(mesh_name, lambda p: OPT.SGD(p, lr=0.1, momentum=0.5), util=UTILS[util])


ZEROS = {
    "module_none": lambda m, o: m.zero_grad(set_to_none=True),
    "module_zeros": lambda m, o: m.zero_grad(set_to_none=False),
    "optimizer_zeros_foreach": lambda m, o: o.zero_grad(set_to_none=False),
    "never": lambda m, o: None,  # gradients accumulate over the steps
}


@pytest.mark.parametrize("zero", ZEROS)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_zero_grad_matches_plain_torch(mesh_name, zero):
    _train(mesh_name, lambda p: OPT.Adam(p, lr=0.05, foreach=True), zero=ZEROS[zero])


# == ledger: grouped collectives ==================================================
def _with_partial_grads(mesh_name: str = "dp2xtp2"):
    mesh, batch, ref, sharded = _models(mesh_name)
    x, t = _data()[0]
    ref(x, t).backward()
    sharded(sl.shard(x, mesh, batch), sl.shard(t, mesh, batch)).backward()
    assert all(p.grad.spec.partial for p in sharded.parameters())
    return ref, sharded


def test_clip_grad_norm_foreach_is_one_reduce_scatter_and_one_all_reduce():
    ref, sharded = _with_partial_grads()
    want = U.clip_grad_norm_(ref.parameters(), 0.3, foreach=True)
    with sl.comm_ledger() as led:
        got = U.clip_grad_norm_(sharded.parameters(), 0.3, foreach=True)
    norm = [r for r in led.records if r.cause == "_foreach_norm.Scalar"]
    # every gradient is partial over dp: one flat reduce-scatter over dp, then one
    # all-reduce of the 4 stacked power sums over (dp, tp)
    assert [(r.kind, r.axes) for r in norm] == [
        ("reduce_scatter", ("dp",)),
        ("all_reduce", ("dp", "tp")),
    ]
    local = sum(p.grad.local_shards()[0].numel() for p in sharded.parameters())  # 30, even
    assert norm[0].bytes == (2 - 1) * (local // 2) * 8  # (k-1) chunks of the flat buffer
    torch.testing.assert_close(_value(got), want, **TOL)
    _compare(ref, sharded)
    # a norm only reads: the gradients stay partial
    assert all(p.grad.spec.partial for p in sharded.parameters())


def test_clip_grad_norm_loop_communicates_per_tensor():
    """The foreach=False path for contrast: per-tensor norms, several collectives each."""
    ref, sharded = _with_partial_grads()
    want = U.clip_grad_norm_(ref.parameters(), 0.3, foreach=False)
    with sl.comm_ledger() as led:
        got = U.clip_grad_norm_(sharded.parameters(), 0.3, foreach=False)
    assert len(led.records) > 2
    torch.testing.assert_close(_value(got), want, **TOL)


def test_clip_grad_value_foreach_reduces_in_place_once_per_group():
    ref, sharded = _with_partial_grads()
    U.clip_grad_value_(ref.parameters(), 0.02, foreach=True)
    with sl.comm_ledger() as led:
        U.clip_grad_value_(sharded.parameters(), 0.02, foreach=True)
    assert [(r.kind, r.axes) for r in led.records] == [("all_reduce", ("dp",))]
    assert led.records[0].cause == "_foreach_clamp_min_.Scalar"
    assert not any(p.grad.spec.partial for p in sharded.parameters())
    _compare(ref, sharded)


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd_momentum"])
def test_fused_step_reduces_gradients_in_place_once_per_group(opt):
    ref, sharded = _with_partial_grads()
    ro, so = (OPTIMIZERS[opt](m.parameters(), fused=True) for m in (ref, sharded))
    ro.step()
    with sl.comm_ledger() as led:
        so.step()
    assert [(r.kind, r.axes) for r in led.records] == [("all_reduce", ("dp",))]
    layouts = {k: p.spec for k, p in sharded.named_parameters()}
    for k, p in sharded.named_parameters():
        assert p.grad.spec == layouts[k]  # reduced in place: the parameter's layout
    _compare(ref, sharded, ro, so)


def test_foreach_adam_reduces_each_read_gradient_list_in_one_collective():
    ref, sharded = _with_partial_grads()
    ro, so = (OPT.Adam(m.parameters(), lr=0.05, foreach=True) for m in (ref, sharded))
    ro.step()
    with sl.comm_ledger() as led:
        so.step()
    # lerp_ and addcmul_ each read the partial gradients: one grouped all-reduce each
    assert [r.cause for r in led.records] == ["_foreach_lerp_.Scalar", "_foreach_addcmul_.Scalar"]
    assert all(r.kind == "all_reduce" for r in led.records)
    _compare(ref, sharded, ro, so)


# == foreach ops on sampled layouts ===============================================
LAYOUTS_4 = [
    sl.P("x", None),
    sl.P(None, "x"),
    sl.P(),
    sl.P(None, None, partial="x"),
    sl.P("x", None, partial={}),
]
SHAPES = [(6, 3), (3, 5), (4, 4), (2, 3), (7, 2)]


def _operands(seed: int, partial_first: bool = True):
    """Sharded and plain float64 lists on {x: 4}, uneven, with exact non-trivial partial summands."""
    mesh = sl.Mesh.simulated({"x": 4})
    g = torch.Generator().manual_seed(seed)
    plain, sharded = [], []
    for i, shape in enumerate(SHAPES):
        v = torch.randn(shape, generator=g, dtype=torch.float64) + 2.0
        layout = LAYOUTS_4[(i + seed) % len(LAYOUTS_4)]
        if layout.partial and not partial_first:
            layout = layout.without_partial()
        if layout.partial:
            s = sl.from_local(make_summands(v, layout, mesh.axes), mesh, layout, shape)
        else:
            s = sl.shard(v, mesh, layout)
        plain.append(v)
        sharded.append(s)
    return plain, sharded


A = torch.ops.aten
FOREACH_CASES = {
    "add.List": lambda a, b: A._foreach_add.List(a, b, alpha=0.5),
    "add_.Scalar": lambda a, b: A._foreach_add_.Scalar(a, 1.5),
    "mul_.ScalarList": lambda a, b: A._foreach_mul_.ScalarList(a, [0.5, 2, -1, 3, 0.25]),
    "mul.Tensor": lambda a, b: A._foreach_mul.Tensor(a, torch.tensor(0.5, dtype=torch.float64)),
    "div_.List": lambda a, b: A._foreach_div_.List(a, b),
    "sub.Scalar": lambda a, b: A._foreach_sub.Scalar(a, 0.25),
    "sqrt": lambda a, b: A._foreach_sqrt.default([x.abs() for x in a]),
    "sign_": lambda a, b: A._foreach_sign_.default(a),
    "neg": lambda a, b: A._foreach_neg.default(a),
    "zero_": lambda a, b: A._foreach_zero_.default(a),
    "lerp_.Scalar": lambda a, b: A._foreach_lerp_.Scalar(a, b, 0.3),
    "lerp.List": lambda a, b: A._foreach_lerp.List(a, b, b),
    "addcmul_.Scalar": lambda a, b: A._foreach_addcmul_.Scalar(a, b, b, 0.5),
    "addcdiv_.ScalarList": lambda a, b: A._foreach_addcdiv_.ScalarList(a, b, b, [1, 2, 3, 4, 5]),
    "addcmul_.Tensor": lambda a, b: A._foreach_addcmul_.Tensor(
        a, b, b, torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64)
    ),
    "maximum_.List": lambda a, b: A._foreach_maximum_.List(a, b),
    "maximum.Scalar": lambda a, b: A._foreach_maximum.Scalar(a, 2.0),
    "clamp_max_.Scalar": lambda a, b: A._foreach_clamp_max_.Scalar(a, 2.0),
    "pow.Scalar": lambda a, b: A._foreach_pow.Scalar(a, 2.0),
    "pow.ScalarAndTensor": lambda a, b: A._foreach_pow.ScalarAndTensor(1.5, a),
    "max": lambda a, b: A._foreach_max.default(a),
    "copy_": lambda a, b: A._foreach_copy_.default(a, b),
    "norm2": lambda a, b: A._foreach_norm.Scalar(a, 2),
    "norm1": lambda a, b: A._foreach_norm.Scalar(a, 1),
    "norm3": lambda a, b: A._foreach_norm.Scalar(a, 3),
    "norm0": lambda a, b: A._foreach_norm.Scalar(a, 0),
    "norm_inf": lambda a, b: A._foreach_norm.Scalar(a, math.inf),
    "norm_neg_inf": lambda a, b: A._foreach_norm.Scalar(a, -math.inf),
    "norm_to_float64": lambda a, b: A._foreach_norm.Scalar(
        [x.float() for x in a], 2, dtype=torch.float64
    ),
}


CASE_PARAMS = list(FOREACH_CASES)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_foreach_op_matches_plain_torch(case, seed):
    fn = FOREACH_CASES[case]
    a_ref, a_sh = _operands(seed)
    b_ref, b_sh = _operands(seed + 7, partial_first=seed != 1)
    want = fn(a_ref, b_ref)
    got = fn(a_sh, b_sh)
    if want is None:  # in place: the first list holds the result
        want, got = a_ref, a_sh
    assert len(got) == len(want)
    # float32 summands round one by one: float32's tolerance there
    tol = dict(rtol=1e-6, atol=1e-6) if case == "norm_to_float64" else TOL
    for g, w in zip(got, want):
        torch.testing.assert_close(_value(g), w, **tol)
    for g, w in zip(b_sh, b_ref):  # read operands keep their values
        torch.testing.assert_close(_value(g), w, **TOL)


def test_foreach_norm_mixes_plain_and_sharded_tensors():
    a_ref, a_sh = _operands(3)
    mixed = [a_sh[0], a_ref[1], a_sh[2]]
    got = torch._foreach_norm(mixed, 2)
    want = torch._foreach_norm([a_ref[0], a_ref[1], a_ref[2]], 2)
    assert not isinstance(got[1], sl.ShardedTensor)
    for g, w in zip(got, want):
        torch.testing.assert_close(_value(g), w, **TOL)


def test_foreach_norm_in_strict_mode_names_the_communication():
    _, a_sh = _operands(0)
    with sl.strict(), pytest.raises(sl.LayoutError, match="_foreach_norm"):
        torch._foreach_norm(a_sh, 2)


def test_fused_step_with_plain_state_for_a_sharded_parameter_raises_with_fix():
    mesh = sl.Mesh.simulated({"x": 4})
    p = sl.shard(torch.randn(8, 2, dtype=torch.float64), mesh, sl.P("x", None))
    g = sl.shard(torch.randn(8, 2, dtype=torch.float64), mesh, sl.P("x", None))
    state = torch.zeros(8, 2, dtype=torch.float64)
    with pytest.raises(sl.LayoutError, match="zeros_like"):
        A._fused_adam_.default(
            [p],
            [g],
            [state],
            [state.clone()],
            [],
            [torch.tensor(1.0, dtype=torch.float64)],
            lr=0.1,
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.0,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )


def test_grouped_reductions_of_tensors_split_over_an_axis_they_are_not_partial_over():
    """A group of partial tensors (same partial axes) where some are split over a third
    axis and some replicated there: the flat bucket of the group must not claim to be
    replicated over that axis (the planner would then take one device's buffer for
    another's). In-place reduction (`_foreach_add_`) and `_foreach_norm` on
    {dp: 2, r: 2, c: 2} equal float64 torch on the global values; uneven sizes."""
    axes = {"dp": 2, "r": 2, "c": 2}
    mesh = sl.Mesh.simulated(axes)
    gen = torch.Generator().manual_seed(7)
    cases = [
        ((7,), sl.P("c", partial=("dp", "r"))),
        ((5, 3), sl.P(None, None, partial=("dp", "r"))),
        ((6, 4), sl.P(None, "c", partial=("dp", "r"))),
        ((9,), sl.P("c", partial="dp")),
    ]
    values = [torch.randn(*s, generator=gen, dtype=torch.float64) for s, _ in cases]

    def sharded():
        return [
            sl.from_local(make_summands(v, lay, axes), mesh, lay, tuple(v.shape))
            for v, (_, lay) in zip(values, cases)
        ]

    norms = torch._foreach_norm(sharded())
    for n, v in zip(norms, values):
        torch.testing.assert_close(n.full(), torch.linalg.vector_norm(v), rtol=1e-12, atol=1e-12)
    xs = sharded()
    with sl.comm_ledger() as led:
        torch._foreach_exp_(xs)
    assert len(led.records) == 2  # one all-reduce per partial group: (dp, r) and (dp,)
    for x, v in zip(xs, values):
        assert not x.spec.partial
        torch.testing.assert_close(x.full(), v.exp(), rtol=1e-12, atol=1e-12)
