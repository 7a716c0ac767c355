"""shardlib.nn schemes: presets, composition, configuration, bad input, parameter memory.

Covers (simulated meshes only, fast tier):

- every preset's storage, compute and activation layouts against DESIGN §8's
  table, written out here by hand for the GPT's logical dims;
- composition (`+`): left-major splits, FSDP's storage axis minor, and the
  errors for a mesh axis claimed twice and two sequence-parallel attentions;
  `repr` pastes back as code;
- `Scheme.from_config` from a dict and a TOML file equals the composed
  presets; unknown keys, kinds, fields, wrong types and a twice-claimed axis
  raise naming them and the valid choices;
- bad input: scheme axes the mesh lacks (in `use`, `shard_params`,
  `shard_batch`), a param without logical dims, dims of the wrong rank, an
  unknown logical name, a weight without recorded dims under FSDP — each
  error names the param or value and a fix;
- parameter bytes per device (read from the local shards) are 1/P of the
  GPT's matrices for tp2d, tp3d, fsdp and 1/q² for tp2p5d (replicated over
  depth), plus the replicated norms the presets state; `explain` agrees;
- outside `use` (and on plain tensors inside it) constrain / linear /
  attention equal the torch ops and an own float64 attention (causal,
  grouped-query, positions-driven mask);
- under tp2d, tp2p5d, tp3d, fsdp (remat), dp+tp1d, Megatron-SP and
  fsdp+tp1d, two chained `snn.linear`s and their gradients equal plain
  float64 at 1e-10; FSDP's remat re-gathers in backward (ledger cause);
- `shard_batch` (layouts; ring's zigzag order and positions) and
  `snn.attention` under local tp2d, Ulysses (four all-to-alls) and ring
  attention against plain attention.
"""

from __future__ import annotations

import math

import pytest
import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

P = sl.P
TOL = {"rtol": 1e-10, "atol": 1e-10}

# -- DESIGN §8's layouts, written out for the GPT's params and activations -------------
PARAMS = {
    "wte": ("vocab", "embed"),
    "norm": ("embed",),
    "wq": ("embed", "heads"),
    "wk": ("embed", "kv_heads"),
    "wo": ("heads", "embed"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    "head": ("embed", "vocab"),
}
ACTS = {
    "tokens": ("batch", "seq"),
    "resid": ("batch", "seq", "embed"),
    "q_flat": ("batch", "seq", "heads"),
    "hidden": ("batch", "seq", "mlp"),
    "logits": ("batch", "seq", "vocab"),
    "q": ("batch", "heads", "seq", "head_dim"),
    "kv": ("batch", "kv_heads", "seq", "head_dim"),
}
R1, R2, R3, R4 = P(None), P(None, None), P(None, None, None), P(None, None, None, None)
REPLICATED = {k: (R1 if len(d) == 1 else R2) for k, d in PARAMS.items()}
COL, ROW = P(None, "tp"), P("tp", None)

EXPECTED = {
    "dp": (
        snn.dp("dp"),
        REPLICATED,
        None,
        {
            "tokens": P("dp", None),
            "resid": P("dp", None, None),
            "q_flat": P("dp", None, None),
            "hidden": P("dp", None, None),
            "logits": P("dp", None, None),
            "q": P("dp", None, None, None),
            "kv": P("dp", None, None, None),
        },
    ),
    "fsdp": (
        snn.fsdp("dp"),
        {
            "wte": P("dp", None),
            "norm": R1,
            "wq": P("dp", None),
            "wk": P("dp", None),
            "wo": P("dp", None),
            "w_up": P(None, "dp"),
            "w_down": P("dp", None),
            "head": P(None, "dp"),
        },
        REPLICATED,
        {"tokens": P("dp", None), "resid": P("dp", None, None), "q": P("dp", None, None, None)},
    ),
    "tp1d": (
        snn.tp1d("tp"),
        {
            "wte": ROW,
            "norm": R1,
            "wq": COL,
            "wk": COL,
            "wo": ROW,
            "w_up": COL,
            "w_down": ROW,
            "head": COL,
        },
        None,
        {
            "tokens": R2,
            "resid": R3,
            "q_flat": P(None, None, "tp"),
            "hidden": P(None, None, "tp"),
            "logits": P(None, None, "tp"),
            "q": P(None, "tp", None, None),
            "kv": P(None, "tp", None, None),
        },
    ),
    "tp1d_sp": (
        snn.tp1d("tp", sequence=True),
        {
            "wte": ROW,
            "norm": R1,
            "wq": COL,
            "wk": COL,
            "wo": ROW,
            "w_up": COL,
            "w_down": ROW,
            "head": COL,
        },
        None,
        {
            "tokens": R2,
            "resid": P(None, "tp", None),
            "hidden": P(None, None, "tp"),
            "logits": P(None, None, "tp"),
            "q": P(None, "tp", None, None),
        },
    ),
    "tp2d": (
        snn.tp2d("r", "c"),
        {k: (P("c") if len(d) == 1 else P("r", "c")) for k, d in PARAMS.items()},
        {k: (P("c") if len(d) == 1 else P(None, "c")) for k, d in PARAMS.items()},  # SUMMA's W
        {
            "tokens": P("r", None),
            "resid": P("r", None, "c"),
            "q_flat": P("r", None, "c"),
            "hidden": P("r", None, "c"),
            "logits": P("r", None, "c"),
            "q": P("r", "c", None, None),
            "kv": P("r", "c", None, None),
        },
    ),
    "tp2p5d": (
        snn.tp2p5d("d", "r", "c"),
        {k: (P("c") if len(d) == 1 else P("r", "c")) for k, d in PARAMS.items()},
        {k: (P("c") if len(d) == 1 else P(None, "c")) for k, d in PARAMS.items()},
        {
            "tokens": P(("d", "r"), None),
            "resid": P(("d", "r"), None, "c"),
            "hidden": P(("d", "r"), None, "c"),
            "q": P(("d", "r"), "c", None, None),
        },
    ),
    "tp3d": (
        snn.tp3d("i", "j", "k"),
        {
            "wte": P(("j", "i"), "k"),
            "norm": P("k"),
            "wq": P(("k", "i"), "j"),
            "wk": P(("k", "i"), "j"),
            "wo": P(("j", "i"), "k"),
            "w_up": P(("k", "i"), "j"),
            "w_down": P(("j", "i"), "k"),
            "head": P(("k", "i"), "j"),
        },
        {  # computed gathered over i (the 3D table's P(k, j) / P(j, k))
            "wte": P("j", "k"),
            "norm": P("k"),
            "wq": P("k", "j"),
            "wk": P("k", "j"),
            "wo": P("j", "k"),
            "w_up": P("k", "j"),
            "w_down": P("j", "k"),
            "head": P("k", "j"),
        },
        {
            "tokens": P(("i", "j"), None),
            "resid": P(("i", "j"), None, "k"),
            "q_flat": P(("i", "k"), None, "j"),
            "hidden": P(("i", "k"), None, "j"),
            "logits": P(("i", "k"), None, "j"),
            "q": P(("i", "k"), "j", None, None),
            "kv": P(("i", "k"), "j", None, None),
        },
    ),
    "ulysses": (
        snn.ulysses("sp"),
        REPLICATED,
        None,
        {
            "tokens": P(None, "sp"),
            "resid": P(None, "sp", None),
            "q": P(None, None, "sp", None),
            "kv": P(None, None, "sp", None),
        },
    ),
    "ring": (
        snn.ring("cp"),
        REPLICATED,
        None,
        {"tokens": P(None, "cp"), "resid": P(None, "cp", None), "q": P(None, None, "cp", None)},
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_layouts_match_design_table(name):
    scheme, params, compute, acts = EXPECTED[name]
    for key, dims in PARAMS.items():
        assert scheme.param_layout(dims) == params[key], (name, key)
        assert scheme.compute_layout(dims) == (compute or params)[key], (name, key)
    for key, layout in acts.items():
        assert scheme.act_layout(ACTS[key]) == layout, (name, key)


def test_tp3d_chained_linears_need_no_reshard_between_them():
    # Y of (embed -> mlp) is P((i,k), j): the next linear's X, contracted over j with
    # W (mlp, embed) = P((j,i), k) gathered over i to P(j, k); its Y is P((i,j), k) again.
    s = snn.tp3d("i", "j", "k")
    y1 = s.act_layout(ACTS["hidden"])
    w2 = s.param_layout(PARAMS["w_down"])
    assert y1.dims[-1] == ("j",) and w2.dims[0][0] == "j"
    assert s.act_layout(ACTS["resid"]).dims[-1] == w2.dims[1] == ("k",)


def test_attention_kind_and_axis():
    assert snn.tp2d("r", "c").attention == "local"
    u, r = snn.ulysses("sp"), snn.ring("cp", balance="stripe")
    assert (u.attention, u.attention_axis) == ("ulysses", "sp")
    assert (r.attention, r.attention_axis, r.balance) == ("ring", "cp", "stripe")
    assert snn.ring("cp").balance == "zigzag" and snn.ring("cp", balance=None).balance is None
    assert snn.fsdp("dp").remat and not snn.fsdp("dp", remat=False).remat


# -- composition --------------------------------------------------------------------------
def test_compose_splits_a_shared_dim_left_major():
    s = snn.dp("dp") + snn.tp2d("r", "c")
    assert s.act_layout(ACTS["resid"]) == P(("dp", "r"), None, "c")
    assert s.param_layout(PARAMS["w_up"]) == P("r", "c")
    assert s.axes == ("dp", "r", "c")
    s = snn.dp("dp") + snn.ulysses("sp")
    assert s.act_layout(ACTS["q"]) == P("dp", None, "sp", None)
    assert (s.attention, s.attention_axis) == ("ulysses", "sp")
    s = snn.dp("dp") + snn.tp3d("i", "j", "k")
    assert s.act_layout(ACTS["resid"]) == P(("dp", "i", "j"), None, "k")


def test_compose_fsdp_storage_axis_goes_minor():
    # Stored P(None, ("tp", "dp")): the move to the compute layout P(None, "tp") is a
    # plain all-gather over dp (dp minor); left-major would make it a permutation.
    s = snn.fsdp("dp") + snn.tp1d("tp")
    assert s.param_layout(("embed", "mlp")) == P(None, ("tp", "dp"))
    assert s.compute_layout(("embed", "mlp")) == P(None, "tp")
    assert s.param_layout(("heads", "embed")) == P(("tp", "dp"), None)
    assert s.compute_layout(("heads", "embed")) == P("tp", None)
    assert s.param_layout(("embed", "kv_heads")) == P("dp", "tp")  # embed is larger
    assert s.compute_layout(("embed", "kv_heads")) == P(None, "tp")
    assert s.remat and s.moves_weights
    assert not (snn.dp("dp") + snn.tp1d("tp")).moves_weights


def test_compose_rejects_an_axis_claimed_twice():
    with pytest.raises(sl.LayoutError) as e:
        snn.dp("x") + snn.tp2d("r", "x")
    msg = str(e.value)
    assert "'x'" in msg and "dp('x')" in msg and "tp2d('r', 'x')" in msg and "both" in msg


def test_a_preset_with_one_axis_in_two_roles_raises():
    with pytest.raises(sl.LayoutError, match=r"tp2d\('r', 'r'\): mesh axis 'r'"):
        snn.tp2d("r", "r")
    with pytest.raises(sl.LayoutError, match="'x'"):
        snn.Scheme.from_config({"tp": {"kind": "3d", "i": "x", "j": "x", "k": "k"}})


def test_compose_rejects_two_sequence_parallel_attentions():
    with pytest.raises(sl.LayoutError, match="ulysses.*ring|sequence-parallel"):
        snn.ulysses("a") + snn.ring("b")


def test_repr_pastes_back():
    names = {n: getattr(snn, n) for n in ("dp", "fsdp", "tp1d", "tp2d", "tp2p5d", "tp3d")}
    names.update(ulysses=snn.ulysses, ring=snn.ring)
    schemes = [s for s, *_ in EXPECTED.values()] + [
        snn.dp("dp") + snn.tp2d("r", "c"),
        snn.fsdp("dp", remat=False) + snn.tp1d("tp", sequence=True),
        snn.dp("dp") + snn.tp1d("tp") + snn.ring("cp", balance=None),
    ]
    assert repr(snn.dp("dp") + snn.tp2d("r", "c")) == "dp('dp') + tp2d('r', 'c')"
    for s in schemes:
        back = eval(repr(s), names)
        assert back == s and hash(back) == hash(s), repr(s)
    hand = snn.Scheme(params={"mlp": "tp"}, acts={"batch": "dp"})
    assert eval(repr(hand), {"Scheme": snn.Scheme}) == hand


def test_unknown_logical_name_raises_with_known_names():
    with pytest.raises(sl.LayoutError) as e:
        snn.tp1d("tp").act_layout(("batch", "sequence", "embed"))
    msg = str(e.value)
    assert "'sequence'" in msg and "seq" in msg and "kv_heads" in msg
    # a scheme's own map keys extend the known names
    s = snn.Scheme(acts={"expert": "ep"})
    assert s.act_layout(("expert", "embed")) == P("ep", None)


def test_callable_maps():
    def acts(dims):
        return P(*("x" if d == "batch" else None for d in dims))

    s = snn.Scheme(acts=acts, axes=("x",))
    assert s.act_layout(("batch", "seq")) == P("x", None)
    assert (s + snn.tp1d("tp")).act_layout(("batch", "seq", "mlp")) == P("x", None, "tp")
    with pytest.raises(sl.LayoutError, match="axes="):
        snn.Scheme(acts=acts)


# -- configuration ------------------------------------------------------------------------
CONFIGS = [
    ({"dp": "dp"}, snn.dp("dp")),
    (
        {
            "dp": "dp",
            "tp": {"kind": "2d", "row": "r", "col": "c"},
            "sp": {"kind": "ring", "axis": "cp"},
        },
        snn.dp("dp") + snn.tp2d("r", "c") + snn.ring("cp"),
    ),
    (
        {
            "fsdp": {"axis": "dp", "remat": False},
            "tp": {"kind": "1d", "axis": "tp", "sequence": True},
        },
        snn.fsdp("dp", remat=False) + snn.tp1d("tp", sequence=True),
    ),
    ({"fsdp": "dp", "tp": {"kind": "1d", "axis": "tp"}}, snn.fsdp("dp") + snn.tp1d("tp")),
    ({"tp": {"kind": "2.5d", "depth": "d", "row": "r", "col": "c"}}, snn.tp2p5d("d", "r", "c")),
    (
        {"dp": {"axis": "dp"}, "tp": {"kind": "3d", "i": "i", "j": "j", "k": "k"}},
        snn.dp("dp") + snn.tp3d("i", "j", "k"),
    ),
    ({"sp": {"kind": "ulysses", "axis": "sp"}}, snn.ulysses("sp")),
    ({"sp": {"kind": "ring", "axis": "cp", "balance": "stripe"}}, snn.ring("cp", balance="stripe")),
]


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_from_config_dict_equals_presets(index):
    cfg, expected = CONFIGS[index]
    got = snn.Scheme.from_config(cfg)
    assert got == expected and repr(got) == repr(expected)
    for dims in ACTS.values():
        assert got.act_layout(dims) == expected.act_layout(dims)


def test_from_config_toml_file(tmp_path):
    path = tmp_path / "h1_parallel.toml"
    path.write_text(
        'dp = "dp"\n'
        '[tp]\nkind = "2d"\nrow = "r"\ncol = "c"\n'
        '[sp]\nkind = "ring"\naxis = "cp"\nbalance = "none"\n'
    )
    expected = snn.dp("dp") + snn.tp2d("r", "c") + snn.ring("cp", balance=None)
    assert snn.Scheme.from_config(path) == expected
    assert snn.Scheme.from_config(str(path)) == expected
    nested = tmp_path / "h1_train.toml"
    nested.write_text('[model]\ndim = 8\n[train.parallel]\nfsdp = "dp"\n')
    assert snn.Scheme.from_config(nested, section="train.parallel") == snn.fsdp("dp")


BAD_CONFIGS = [
    ({"dq": "dp"}, ["'dq'", "'dp'", "'fsdp'", "'tp'", "'sp'"]),
    ({"tp": {"kind": "4d", "axis": "t"}}, ["'4d'", "'1d'", "'2d'", "'2.5d'", "'3d'"]),
    ({"sp": {"kind": "zigzag", "axis": "t"}}, ["'zigzag'", "'ulysses'", "'ring'"]),
    ({"tp": {"kind": "2d", "row": "r", "column": "c"}}, ["'column'", "'row'", "'col'"]),
    ({"tp": {"kind": "2d", "row": "r"}}, ["'col'"]),
    ({"tp": {"axis": "t"}}, ["'kind'", "'1d'"]),
    ({"fsdp": {"axis": "dp", "reshard": True}}, ["'reshard'", "'remat'"]),
    ({"fsdp": {"axis": "dp", "remat": "yes"}}, ["'remat'", "bool"]),
    (
        {"sp": {"kind": "ring", "axis": "cp", "balance": "spiral"}},
        ["'spiral'", "'zigzag'", "'stripe'"],
    ),
    ({"dp": "x", "tp": {"kind": "1d", "axis": "x"}}, ["'x'", "dp('x')", "tp1d('x')", "both"]),
    ({}, ["'dp'", "'tp'"]),
]


@pytest.mark.parametrize("index", range(len(BAD_CONFIGS)))
def test_from_config_errors_name_the_problem_and_the_choices(index):
    cfg, needles = BAD_CONFIGS[index]
    with pytest.raises(sl.LayoutError) as e:
        snn.Scheme.from_config(cfg)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_from_config_bad_files(tmp_path):
    with pytest.raises(sl.LayoutError, match="no such file"):
        snn.Scheme.from_config(tmp_path / "h1_missing.toml")
    bad = tmp_path / "h1_bad.toml"
    bad.write_text("dp = \n")
    with pytest.raises(sl.LayoutError, match="not valid TOML"):
        snn.Scheme.from_config(bad)
    with pytest.raises(sl.LayoutError, match="no table 'parallel'"):
        snn.Scheme.from_config({"dp": "dp"}, section="parallel")


# -- bad input ----------------------------------------------------------------------------
def test_use_checks_scheme_axes_against_the_mesh():
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    with pytest.raises(sl.LayoutError) as e, snn.use(snn.dp("dp") + snn.tp2d("r", "c"), mesh):
        pass
    msg = str(e.value)
    assert "dp('dp') + tp2d('r', 'c')" in msg and "'r'" in msg and "'c'" in msg
    assert "{'dp': 2, 'tp': 2}" in msg
    with pytest.raises(sl.LayoutError, match="tp2d"):
        snn.shard_params({"w": torch.ones(2, 2)}, mesh, snn.tp2d("r", "c"), {"w": PARAMS["w_up"]})
    with pytest.raises(sl.LayoutError, match="'cp'"):
        snn.ring("cp").shard_batch({"tokens": torch.zeros(2, 4, dtype=torch.long)}, mesh)


def test_shard_params_names_every_bad_param():
    mesh = sl.Mesh.simulated({"tp": 2})
    params = {"wq": torch.ones(4, 4), "extra": torch.ones(3), "w_up": torch.ones(4, 8)}
    dims = {"wq": ("embed", "heads"), "w_up": ("embed",)}
    with pytest.raises(sl.LayoutError) as e:
        snn.shard_params(params, mesh, snn.tp1d("tp"), dims)
    msg = str(e.value)
    assert "'extra'" in msg and "no logical dims" in msg and "dims['extra']" in msg
    assert "'w_up'" in msg and "(4, 8)" in msg and "('embed',)" in msg
    assert "'wq'" not in msg


def test_shard_params_nested_trees_and_flat_dims():
    mesh = sl.Mesh.simulated({"tp": 2})
    params = {"layers": [{"w_up": torch.ones(4, 8)}], "norm": torch.ones(4), "step": 3}
    out = snn.shard_params(
        params, mesh, snn.tp1d("tp"), {"layers.0.w_up": ("embed", "mlp"), "norm": ("embed",)}
    )
    assert out["layers"][0]["w_up"].spec == COL and out["norm"].spec == R1 and out["step"] == 3
    nested_dims = {"layers": [{"w_up": ("embed", "mlp")}], "norm": ("embed",)}
    out = snn.shard_params(params, mesh, snn.tp1d("tp"), nested_dims)
    assert out["layers"][0]["w_up"].spec == COL
    assert snn._use.recorded_dims(out["layers"][0]["w_up"]) == ("embed", "mlp")
    w = torch.ones(4, 8, requires_grad=True)
    assert snn.shard_params({"w": w}, mesh, snn.tp1d("tp"), {"w": ("embed", "mlp")})[
        "w"
    ].requires_grad


def test_constrain_and_linear_check_ranks():
    with pytest.raises(sl.LayoutError, match=r"\(2, 3\)"):
        snn.constrain(torch.ones(2, 3), ("batch", "seq", "embed"))
    with pytest.raises(sl.LayoutError, match="one logical name per dim"):
        snn.linear(torch.ones(2, 3), torch.ones(3, 4), out_dims=("batch", "seq", "mlp"))
    with pytest.raises(sl.LayoutError, match=r"\(in, out\)"):
        snn.linear(torch.ones(2, 3), torch.ones(4, 3), out_dims=("tokens", "mlp"))


def test_linear_without_recorded_dims_under_fsdp_names_the_fix():
    mesh = sl.Mesh.simulated({"dp": 2})
    x = sl.shard(torch.ones(4, 6), mesh, P("dp", None))
    w = sl.shard(torch.ones(6, 8), mesh, P(None, "dp"))
    with snn.use(snn.fsdp("dp"), mesh):
        with pytest.raises(sl.LayoutError) as e:
            snn.linear(x, w, out_dims=("tokens", "mlp"))
        assert "shard_params" in str(e.value) and "w_dims=" in str(e.value)
        y = snn.linear(x, w, out_dims=("tokens", "mlp"), w_dims=("embed", "mlp"))
    torch.testing.assert_close(y.full(), torch.full((4, 8), 6.0))


def test_use_nests_and_restores():
    m2, m4 = sl.Mesh.simulated({"dp": 2}), sl.Mesh.simulated({"tp": 4})
    assert snn._use.current() is None
    with snn.use(snn.dp("dp"), m2):
        with snn.use(snn.tp1d("tp"), m4) as inner:
            assert snn._use.current() == (inner, m4)
            x = sl.shard(torch.ones(2, 4), m4, P())
            assert snn.constrain(x, ("tokens", "mlp")).spec == P(None, "tp")
            with pytest.raises(sl.MeshMismatchError):
                snn.constrain(sl.shard(torch.ones(2, 4), m2, P()), ("tokens", "mlp"))
        assert snn._use.current()[0] == snn.dp("dp")
    assert snn._use.current() is None


# -- parameter memory -----------------------------------------------------------------
CFG = gpt.Config(vocab=16, dim=16, heads=4, layers=2, seq=8, kv_heads=2, mlp=32)


@pytest.mark.parametrize(
    "scheme, axes, divisor, norm_divisor",
    [
        (snn.tp2d("r", "c"), {"r": 2, "c": 2}, 4, 2),  # norms split over col
        (snn.tp2p5d("d", "r", "c"), {"d": 2, "r": 2, "c": 2}, 4, 2),  # 1/q², replicated over d
        (snn.tp3d("i", "j", "k"), {"i": 2, "j": 2, "k": 2}, 8, 2),  # norms split over k
        (snn.fsdp("dp"), {"dp": 4}, 4, 1),  # norms replicated
        (snn.fsdp("dp") + snn.tp1d("tp"), {"dp": 2, "tp": 2}, 4, 1),
    ],
    ids=repr,
)
def test_parameter_bytes_per_device(scheme, axes, divisor, norm_divisor):
    mesh = sl.Mesh.simulated(axes)
    params = gpt.init(CFG)
    dims = gpt.DIMS(CFG)
    sharded = snn.shard_params(params, mesh, scheme, dims)
    matrices = sum(p.numel() * 4 for p in params.values() if p.ndim == 2)
    norms = sum(p.numel() * 4 for p in params.values() if p.ndim == 1) // norm_divisor  # as stated
    per_device = [0] * mesh.size
    for p in sharded.values():
        for dev, s in enumerate(p.local_shards()):
            per_device[dev] += s.numel() * s.element_size()
    assert per_device == [matrices // divisor + norms] * mesh.size
    text = scheme.explain(sharded, dims, show=False)
    whole = matrices + sum(p.numel() * 4 for p in params.values() if p.ndim == 1)
    assert "total" in text and f"{matrices // divisor + norms} of {whole}" in text
    for key in ("wte", "layers.1.w_down", "head"):
        assert key in text and repr(scheme.param_layout(dims[key])) in text


def test_explain_needs_a_mesh_for_plain_params():
    with pytest.raises(sl.LayoutError, match="mesh"):
        snn.tp2d("r", "c").explain({"w": torch.ones(2, 2)}, {"w": ("embed", "mlp")}, show=False)


# -- outside a scheme: the plain ops ------------------------------------------------------
def _attention_reference(q, k, v, causal, positions=None):
    """Own float64 attention: softmax(q kᵀ/√d + mask) v, kv heads repeated for GQA."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        pos = positions if positions is not None else torch.arange(q.shape[2])
        allowed = pos[..., None, :] <= pos[..., :, None]
        scores = scores.masked_fill(
            ~(allowed[:, None] if allowed.ndim == 3 else allowed), -math.inf
        )
    return scores.softmax(-1) @ v


def test_outside_use_the_plain_ops():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    assert snn.constrain(x, ("batch", "seq", "embed")) is x
    torch.testing.assert_close(
        snn.linear(x, w, b, out_dims=("batch", "seq", "mlp")), x @ w + b, **TOL
    )
    mesh = sl.Mesh.simulated({"tp": 2})
    with snn.use(snn.tp1d("tp"), mesh):  # plain tensors under a scheme stay plain
        y = snn.linear(x, w, out_dims=("batch", "seq", "mlp"))
        assert type(y) is torch.Tensor
        assert snn.constrain(x, ("batch", "seq", "embed")) is x
    q = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    kv = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64)
    for causal in (False, True):
        got = snn.attention(q, kv, kv * 2, causal=causal)
        torch.testing.assert_close(got, _attention_reference(q, kv, kv * 2, causal), **TOL)


def test_outside_use_attention_follows_positions():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    perm = torch.tensor([0, 5, 1, 4, 2, 3])
    want = _attention_reference(q, k, v, True)[:, :, perm]
    for positions in (perm, perm.expand(2, -1)):
        got = snn.attention(
            q[:, :, perm], k[:, :, perm], v[:, :, perm], causal=True, positions=positions
        )
        torch.testing.assert_close(got, want, **TOL)


# -- under a scheme: values equal plain float64 -----------------------------------------------
LINEAR_CASES = [
    (snn.tp2d("r", "c"), {"r": 2, "c": 2}),
    (snn.tp2p5d("d", "r", "c"), {"d": 2, "r": 2, "c": 2}),
    (snn.tp3d("i", "j", "k"), {"i": 2, "j": 2, "k": 2}),
    (snn.fsdp("dp"), {"dp": 2}),
    (snn.dp("dp") + snn.tp1d("tp"), {"dp": 2, "tp": 2}),
    (snn.tp1d("tp", sequence=True), {"tp": 2}),
    (snn.fsdp("dp") + snn.tp1d("tp"), {"dp": 2, "tp": 2}),
]


@pytest.mark.parametrize("scheme, axes", LINEAR_CASES, ids=repr)
def test_linear_values_and_grads_equal_plain_float64(scheme, axes):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)  # (batch, seq, embed)
    w1 = torch.randn(8, 12, generator=g, dtype=torch.float64)
    b1 = torch.randn(12, generator=g, dtype=torch.float64)
    w2 = torch.randn(12, 8, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (x, w1, b1, w2)]
    want = (ref[0] @ ref[1] + ref[2]).tanh() @ ref[3]
    want.square().sum().backward()

    mesh = sl.Mesh.simulated(axes)
    plain = {"w1": w1, "b1": b1, "w2": w2}
    dims = {"w1": ("embed", "mlp"), "b1": ("mlp",), "w2": ("mlp", "embed")}
    p = snn.shard_params(
        {k: v.clone().requires_grad_() for k, v in plain.items()}, mesh, scheme, dims
    )
    xs = sl.shard(x, mesh, P()).requires_grad_()
    with snn.use(scheme, mesh):
        h = snn.constrain(xs, ("batch", "seq", "embed"))
        u = snn.linear(h, p["w1"], p["b1"], out_dims=("batch", "seq", "mlp"))
        y = snn.linear(u.tanh(), p["w2"], out_dims=("batch", "seq", "embed"))
        assert y.spec == scheme.act_layout(("batch", "seq", "embed"))
        with sl.comm_ledger() as led:
            y.full().square().sum().backward()
    torch.testing.assert_close(y.full(), want.detach(), **TOL)
    torch.testing.assert_close(xs.grad.full(), ref[0].grad, **TOL)
    for (name, t), r in zip(p.items(), ref[1:]):
        torch.testing.assert_close(t.grad.full(), r.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    if scheme.remat:  # FSDP re-gathers the weights in backward instead of keeping them
        assert any(r.cause == "regather" and r.direction == "backward" for r in led.records)


# -- data and attention under schemes ------------------------------------------------------
def test_shard_batch_layouts_and_ring_order():
    tokens = torch.arange(24).reshape(2, 12)
    batch = {"tokens": tokens, "targets": tokens + 100}
    mesh = sl.Mesh.simulated({"dp": 2, "cp": 3})
    got = (snn.dp("dp") + snn.ring("cp", balance=None)).shard_batch(batch, mesh)
    assert set(got) == {"tokens", "targets"} and got["tokens"].spec == P("dp", "cp")
    torch.testing.assert_close(got["tokens"].full(), tokens)
    got = (snn.dp("dp") + snn.ring("cp")).shard_batch(batch, mesh)
    # zigzag on 3 devices: 6 chunks of 2 tokens; device r holds chunks r and 5 - r
    chunks = [[0, 5], [1, 4], [2, 3]]
    perm = torch.tensor([2 * c + t for dev in chunks for c in dev for t in range(2)])
    assert got["tokens"].spec == got["positions"].spec == P("dp", "cp")
    torch.testing.assert_close(got["tokens"].full(), tokens[:, perm])
    torch.testing.assert_close(got["targets"].full(), tokens[:, perm] + 100)
    torch.testing.assert_close(got["positions"].full(), perm.expand(2, -1))
    # positions of its own (packed sequences) are reordered, not replaced
    own = {**batch, "positions": tokens % 5, "meta": "kept"}
    got = snn.ring("cp").shard_batch(own, sl.Mesh.simulated({"cp": 3}))
    torch.testing.assert_close(got["positions"].full(), (tokens % 5)[:, perm])
    assert got["meta"] == "kept"
    with pytest.raises(sl.LayoutError, match="differ in shape"):
        snn.ring("cp").shard_batch({"tokens": tokens, "targets": tokens[:, :6]}, mesh)


def _qkv(heads=4, kv_heads=2, seq=8):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, heads, seq, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, seq, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, seq, 4, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize(
    "scheme, axes",
    [
        (snn.tp2d("r", "c"), {"r": 2, "c": 2}),
        (snn.dp("dp") + snn.ulysses("sp"), {"dp": 2, "sp": 2}),
        (snn.ring("cp", balance=None), {"cp": 2}),
    ],
    ids=repr,
)
def test_attention_under_schemes_equals_plain(scheme, axes):
    q, k, v = _qkv()
    mesh = sl.Mesh.simulated(axes)
    qs, ks, vs = (sl.shard(t, mesh, P()) for t in (q, k, v))
    with snn.use(scheme, mesh):
        qs = snn.constrain(qs, ("batch", "heads", "seq", "head_dim"))
        ks = snn.constrain(ks, ("batch", "kv_heads", "seq", "head_dim"))
        vs = snn.constrain(vs, ("batch", "kv_heads", "seq", "head_dim"))
        with sl.comm_ledger() as led:
            out = snn.attention(qs, ks, vs, causal=True)
    assert out.spec == scheme.act_layout(("batch", "heads", "seq", "head_dim"))
    if scheme.attention == "ulysses":
        assert led.count("all_to_all") == 4 and led.count("all_gather") == 0
    if scheme.attention == "ring":
        assert {r.kind for r in led.records} <= {"ppermute"}
    torch.testing.assert_close(out.full(), _attention_reference(q, k, v, True), **TOL)


@pytest.mark.parametrize(
    "scheme, axes",
    [
        (snn.tp2d("r", "c"), {"r": 2, "c": 2}),
        (snn.dp("dp") + snn.ulysses("sp"), {"dp": 2, "sp": 2}),
        (snn.dp("dp") + snn.ring("cp", balance=None), {"dp": 2, "cp": 2}),
    ],
    ids=repr,
)
def test_attention_under_schemes_follows_positions(scheme, axes):
    # tokens in a shuffled order with their global positions: the output is the
    # in-order causal attention, shuffled the same way
    q, k, v = _qkv()
    perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    want = _attention_reference(q, k, v, True)[:, :, perm]
    mesh = sl.Mesh.simulated(axes)
    positions = sl.shard(perm.expand(2, -1).contiguous(), mesh, scheme.act_layout(ACTS["tokens"]))
    qs, ks, vs = (
        sl.shard(t[:, :, perm].contiguous(), mesh, scheme.act_layout(ACTS[d]))
        for t, d in ((q, "q"), (k, "kv"), (v, "kv"))
    )
    with snn.use(scheme, mesh), sl.comm_ledger() as led:
        out = snn.attention(qs, ks, vs, causal=True, positions=positions)
    # only the (batch, seq) positions are gathered along seq for the mask, never the mask
    gathers = [r for r in led.records if r.kind == "all_gather"]
    assert all(r.bytes <= positions.numel() * 8 for r in gathers), led
    torch.testing.assert_close(out.full(), want, **TOL)
