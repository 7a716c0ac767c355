"""sl.checkpoint.save / load (DESIGN §9 "Checkpoints", issue 8 Deliver 4) in one process.

Covers: save on mesh A in layout LA and load on mesh B in layout LB, bitwise
equal to the unsharded value (uneven shapes, empty chunks, 0-d and empty
tensors, partial sources reduced before saving, float32/float64/bf16, integer
and bool dtypes, 1-device meshes, plain tensors on either side; a hypothesis
sweep over random meshes and layouts); each replica written once as an exact
box (DCP metadata chunks against torch.chunk boxes computed here); the
partial reduction's ledger record against its closed-form bytes; non-tensor
state (step, RNG states, data position, NamedTuple optimizer state)
round-tripping; interop with plain torch.distributed.checkpoint in both
directions (a plain-tensor `dcp.load` reads ours, we read a checkpoint DCP's
default planner wrote, `dcp_to_torch_save` rebuilds the nesting); atomic
replacement at every step of the commit protocol (a crash injected at each,
then load and the next save); bad input errors (shape, dtype, kind, missing
and extra keys, no checkpoint at the path, unsupported values, key clashes).

Random kill -9 of a writer process is tests/test_checkpoint_crash.py; saving
and loading on gloo ranks and DTensor interop are tests/test_checkpoint_dist.py.
"""

from __future__ import annotations

import collections
import math
import os
import random
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib.checkpoint import CheckpointError, CheckpointNotFoundError, _atomic
from tests._reference import block, make_summands, partial_index

CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 100))
P = sl.P


# == helpers ===================================================================
def _value(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if not dtype.is_floating_point:
        return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _source(value: torch.Tensor, mesh: sl.Mesh, layout: sl.Layout) -> sl.ShardedTensor:
    """`value` on `mesh` as `layout`; a partial layout gets nontrivial summands (exact in
    float64 and integer dtypes) so a save that skipped or doubled a summand is caught."""
    if not layout.partial:
        return sl.shard(value, mesh, layout)
    layout = layout.check(mesh.abstract, value.ndim)
    summands = make_summands(value.to(torch.float64), layout, mesh.axes)
    return sl.from_local([s.to(value.dtype) for s in summands], mesh, layout, tuple(value.shape))


def _check_sharded(out, value: torch.Tensor, mesh: sl.Mesh, layout: sl.Layout, where: str) -> None:
    """`out` is `value` on `mesh` as `layout`: metadata, every device's block, and full()."""
    layout = layout.check(mesh.abstract, value.ndim)
    assert isinstance(out, sl.ShardedTensor), where
    assert out.mesh == mesh and out.spec == layout, (where, out.mesh, out.spec)
    assert tuple(out.shape) == tuple(value.shape) and out.dtype == value.dtype, where
    plain = layout.without_partial()
    for dev, s in enumerate(out.local_shards()):
        want = block(value, plain, mesh.axes, dev)
        if layout.partial and layout.reduce_op == "sum" and partial_index(layout, mesh.axes, dev):
            want = torch.zeros_like(want)
        assert torch.equal(s, want), f"{where}: device {dev} holds {s}, expected {want}"
    assert torch.equal(out.full(), value), where


def _sim(axes: dict[str, int]) -> sl.Mesh:
    return sl.Mesh.simulated(axes)


@pytest.fixture
def ckpt(tmp_path):
    return tmp_path / "h8c-ckpt"


# == save on A/LA, load on B/LB ================================================
PAIRS = [  # (mesh A, layout A, mesh B, layout B); None = a plain tensor
    ({"dp": 2, "tp": 2}, P("dp", "tp"), {"x": 3}, P(None, "x")),
    ({"x": 4}, P("x", None), {"x": 1}, P()),
    ({"x": 1}, P(), {"a": 2, "b": 3}, P(("a", "b"), None)),
    ({"dp": 2, "tp": 2}, P("tp", None), {"a": 3, "b": 2}, P("b", "a")),
    ({"dp": 2, "tp": 2}, P(("tp", "dp"), None), None, None),
    (None, None, {"x": 3}, P(None, "x")),
    ({"x": 4}, P(None, "x"), {"y": 2, "z": 2}, P("y", partial="z")),
    ({"x": 8}, P("x", None), {"y": 3}, P("y", None)),  # 8 chunks of 5 rows: 3 empty
]
SHAPES = [(5, 7), (3, 2)]


@pytest.mark.parametrize("case", range(len(PAIRS)))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_save_on_a_load_on_b_bitwise(ckpt, case, shape):
    a_axes, la, b_axes, lb = PAIRS[case]
    value = _value(shape, torch.float32, seed=case)
    x = value.clone() if a_axes is None else _source(value, _sim(a_axes), la)
    sl.checkpoint.save(ckpt, {"w": x})
    if b_axes is None:
        out = sl.checkpoint.load(ckpt, {"w": torch.empty(shape)})["w"]
        assert type(out) is torch.Tensor and torch.equal(out, value)
    else:
        mesh = _sim(b_axes)
        out = sl.checkpoint.load(ckpt, {"w": (mesh, lb)})["w"]
        _check_sharded(out, value, mesh, lb, f"case {case} {shape}")


DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_round_trip_bitwise(ckpt, dtype):
    a, b = _sim({"dp": 2, "tp": 2}), _sim({"x": 3})
    value = _value((7, 5), dtype, seed=3)
    scalar = _value((), dtype, seed=4)
    sl.checkpoint.save(
        ckpt, {"w": sl.shard(value, a, P("tp", "dp")), "s": sl.shard(scalar, a, P()), "p": value}
    )
    like = {
        "w": sl.shard(torch.zeros(7, 5, dtype=dtype), b, P(None, "x")),
        "s": (b, P()),
        "p": value,
    }
    out = sl.checkpoint.load(ckpt, like)
    _check_sharded(out["w"], value, b, P(None, "x"), str(dtype))
    _check_sharded(out["s"], scalar, b, P(), str(dtype))
    assert out["p"].dtype == dtype and torch.equal(out["p"], value)


@pytest.mark.parametrize(
    "src",
    [
        P(None, "tp", partial="dp"),
        P(partial=("dp", "tp")),
        P("dp", None, partial={"tp": "max"}),
        P(None, partial={"tp": "min"}),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64], ids=str)
def test_partial_sources_are_reduced_before_saving(ckpt, src, dtype):
    mesh = _sim({"dp": 2, "tp": 2})
    value = _value((5, 3), torch.int64, seed=5).to(dtype)  # integers: summands add up exactly
    x = _source(value, mesh, src)
    assert not torch.equal(x.local_shards()[0], block(value, src.without_partial(), mesh.axes, 0))
    sl.checkpoint.save(ckpt, {"g": x})
    out = sl.checkpoint.load(ckpt, {"g": (_sim({"x": 3}), P("x", None))})["g"]
    _check_sharded(out, value, _sim({"x": 3}), P("x", None), str(src))
    plain = sl.checkpoint.load(ckpt, {"g": torch.empty(5, 3, dtype=dtype)})["g"]
    assert torch.equal(plain, value)


def test_partial_reduction_is_one_reduce_scatter_in_the_ledger(ckpt):
    """P(None, 'tp', partial='dp') on dp=2 x tp=2 is reduced by a reduce-scatter over dp onto
    blocks (ceil(5/2), ceil(3/2)): the busiest device sends (N-1) padded blocks."""
    mesh = _sim({"dp": 2, "tp": 2})
    x = _source(_value((5, 3), torch.float32), mesh, P(None, "tp", partial="dp"))
    with sl.comm_ledger() as led:
        sl.checkpoint.save(ckpt, {"g": x})
    n, block_numel = 2, math.ceil(5 / 2) * math.ceil(3 / 2)
    assert [(r.kind, r.axes, r.bytes, r.cause) for r in led.records] == [
        ("reduce_scatter", ("dp",), (n - 1) * block_numel * 4, "checkpoint")
    ]
    with sl.comm_ledger() as led:  # nothing partial: a save communicates nothing
        sl.checkpoint.save(ckpt, {"g": sl.shard(torch.ones(5, 3), mesh, P("dp", None))})
    assert led.records == []


def _torch_chunks(n: int, k: int) -> list[tuple[int, int]]:
    """(offset, size) of the k torch.chunk-style chunks of n items (trailing ones empty)."""
    pieces = torch.arange(n).chunk(k)
    out, at = [], 0
    for c in range(k):
        size = len(pieces[c]) if c < len(pieces) else 0
        out.append((at, size))
        at += size
    return out


def test_each_replica_written_once_as_an_exact_box(ckpt):
    """P('tp', None) on dp=2 x tp=3, shape (7, 4): three exact row chunks (3, 3, 1), each
    written once although two devices hold each; P(None, ('dp','tp')) on 4 columns over 6
    devices: 4 chunks of one column, the two empty ones not written."""
    mesh = _sim({"dp": 2, "tp": 3})
    value = _value((7, 4), torch.float32)
    sl.checkpoint.save(
        ckpt,
        {
            "r": sl.shard(value, mesh, P("tp", None)),
            "c": sl.shard(value, mesh, P(None, ("dp", "tp"))),
        },
    )
    md = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    got_r = sorted((tuple(c.offsets), tuple(c.sizes)) for c in md["r"].chunks)
    want_r = sorted(((o, 0), (s, 4)) for o, s in _torch_chunks(7, 3))
    assert got_r == want_r
    got_c = sorted((tuple(c.offsets), tuple(c.sizes)) for c in md["c"].chunks)
    want_c = sorted(((0, o), (7, s)) for o, s in _torch_chunks(4, 6) if s)
    assert got_c == want_c and len(got_c) == 4
    for key in ("r", "c"):
        assert tuple(md[key].size) == (7, 4) and md[key].properties.dtype == torch.float32
    # no padding on disk: the data file is not larger than the values plus per-chunk headers
    data = sum(f.stat().st_size for f in ckpt.iterdir() if f.suffix == ".distcp")
    assert data < 2 * value.numel() * 4 + 7 * 1600
    assert (ckpt / "shardlib.json").is_file()


def test_views_save_only_their_elements(ckpt):
    """A block that is a view of a larger storage is written at its own size."""
    mesh = _sim({"x": 2})
    big = torch.arange(4000.0).reshape(1000, 4)
    x = sl.from_local([big[:2, :1], big[2:3, 1:2]], mesh, P("x", None), (3, 1))
    sl.checkpoint.save(ckpt, {"x": x, "view": big[5:7, 2]})
    data = sum(f.stat().st_size for f in ckpt.iterdir() if f.suffix == ".distcp")
    assert data < 8000  # the 16000-byte storage is not written
    out = sl.checkpoint.load(ckpt, {"x": (mesh, P()), "view": torch.empty(2)})
    assert torch.equal(out["x"].full(), torch.tensor([[0.0], [4.0], [9.0]]))
    assert torch.equal(out["view"], big[5:7, 2])


@pytest.mark.parametrize("shape", [(), (0, 3), (4, 0)], ids=str)
def test_scalars_and_empty_tensors(ckpt, shape):
    a, b = _sim({"x": 2, "y": 2}), _sim({"z": 3})
    value = _value(shape, torch.float64, seed=9)
    la = P() if not shape else P("x", "y")
    lb = P() if not shape else P(None, "z")
    sl.checkpoint.save(ckpt, {"t": sl.shard(value, a, la)})
    _check_sharded(sl.checkpoint.load(ckpt, {"t": (b, lb)})["t"], value, b, lb, str(shape))


def test_load_keeps_like_values_and_requires_grad(ckpt):
    mesh = _sim({"x": 2})
    value = _value((4, 3), torch.float32)
    sl.checkpoint.save(ckpt, {"w": sl.shard(value, mesh, P("x"))})
    like_w = sl.shard(torch.full((4, 3), 7.0), mesh, P(None, "x")).requires_grad_()
    before = [s.clone() for s in like_w.local_shards()]
    out = sl.checkpoint.load(ckpt, {"w": like_w})["w"]
    assert out is not like_w and out.requires_grad and out.is_leaf
    assert all(torch.equal(s, b) for s, b in zip(like_w.local_shards(), before))
    assert torch.equal(out.full(), value)


def test_replacing_a_checkpoint_drops_the_old_one(ckpt):
    mesh = _sim({"x": 2})
    sl.checkpoint.save(ckpt, {"w": sl.shard(torch.zeros(3), mesh, P("x")), "step": 1})
    sl.checkpoint.save(ckpt, {"w": sl.shard(torch.ones(3), mesh, P("x")), "step": 2})
    out = sl.checkpoint.load(ckpt, {"w": (mesh, P()), "step": None})
    assert out["step"] == 2 and torch.equal(out["w"].full(), torch.ones(3))
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]


# == hypothesis: random meshes and layouts =====================================
@st.composite
def _mesh_and_layout(draw, ndim: int, partial_ok: bool):
    n_axes = draw(st.integers(1, 3))
    names = [f"m{i}" for i in range(n_axes)]
    axes = {a: draw(st.integers(1, 3)) for a in names}
    slots = [None, *range(ndim)] + (["partial"] if partial_ok else [])
    choice = {a: draw(st.sampled_from(slots)) for a in names}
    dims = tuple(tuple(a for a in names if choice[a] == d) for d in range(ndim))
    partial = tuple(a for a in names if choice[a] == "partial")
    op = draw(st.sampled_from(["sum", "max"])) if partial else "sum"
    return axes, sl.Layout(dims, partial, op)


@st.composite
def _case(draw):
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    src = draw(_mesh_and_layout(len(shape), partial_ok=True))
    dst = draw(_mesh_and_layout(len(shape), partial_ok=True))
    return shape, src, dst


@settings(derandomize=True, deadline=None, max_examples=max(1, CASES // 2), database=None)
@given(case=_case())
def test_any_mesh_and_layout_loads_any_checkpoint(tmp_path_factory, case):
    shape, (a_axes, la), (b_axes, lb) = case
    path = tmp_path_factory.mktemp("h8c-hyp") / "ckpt"
    value = _value(shape, torch.int64, seed=len(shape))
    sl.checkpoint.save(path, {"t": _source(value, _sim(a_axes), la)})
    mesh = _sim(b_axes)
    out = sl.checkpoint.load(path, {"t": (mesh, lb)})["t"]
    _check_sharded(out, value, mesh, lb, f"{shape} {a_axes} {la} -> {b_axes} {lb}")


# == non-tensor state ==========================================================
Adam = collections.namedtuple("Adam", "count mu nu")


def test_non_tensor_state_round_trips(ckpt):
    mesh = _sim({"dp": 2})
    rng = torch.Generator().manual_seed(99)
    torch.randn(3, generator=rng)
    py = random.Random(5)
    py.random()
    mu = sl.shard(_value((3, 2), torch.float32), mesh, P("dp"))
    tree = {
        "step": 25,
        "lr": 3e-4,
        "name": "run-α",
        "done": False,
        "nothing": None,
        "rng": {"torch": rng.get_state(), "python": py.getstate()},
        "data": {"pos": 1234, "epoch": 2, "order": [3, 1, 2]},
        "opt": Adam(torch.tensor(25), mu, [mu, torch.ones(2)]),
    }
    sl.checkpoint.save(ckpt, tree)
    like = {
        "step": 0,
        "lr": 0.0,
        "name": "",
        "done": True,
        "nothing": "placeholder",
        "rng": {"torch": torch.empty_like(rng.get_state()), "python": None},
        "data": {"pos": 0, "epoch": 0, "order": None},
        "opt": Adam(torch.tensor(0), (mesh, P()), [(mesh, P("dp")), torch.empty(2)]),
    }
    out = sl.checkpoint.load(ckpt, like)
    assert (out["step"], out["lr"], out["name"], out["done"], out["nothing"]) == (
        25,
        3e-4,
        "run-α",
        False,
        None,
    )
    assert out["data"] == {"pos": 1234, "epoch": 2, "order": [3, 1, 2]}
    assert type(out["opt"]) is Adam and torch.equal(out["opt"].count, torch.tensor(25))
    assert torch.equal(out["opt"].mu.full(), mu.full()) and out["opt"].mu.spec == P(None, None)
    assert torch.equal(out["opt"].nu[0].full(), mu.full()) and torch.equal(
        out["opt"].nu[1], torch.ones(2)
    )
    resumed = torch.Generator()
    resumed.set_state(out["rng"]["torch"])
    assert torch.equal(torch.randn(4, generator=resumed), torch.randn(4, generator=rng))
    py2 = random.Random()
    py2.setstate(out["rng"]["python"])
    assert py2.random() == py.random()


# == interop with plain torch.distributed.checkpoint ===========================
def _dcp_quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return ctx


def test_plain_dcp_load_reads_a_shardlib_checkpoint(ckpt):
    mesh = _sim({"dp": 2, "tp": 2})
    w, b = _value((5, 7), torch.float32, 1), _value((3,), torch.int64, 2)
    g = _value((4, 3), torch.int64, 3).double()  # integers: the summands add up exactly
    sl.checkpoint.save(
        ckpt,
        {
            "model": {"w": sl.shard(w, mesh, P("dp", "tp")), "b": sl.shard(b, mesh, P("tp"))},
            "grads": [_source(g, mesh, P(None, "tp", partial="dp"))],
            "step": 25,
        },
    )
    state = {
        "model": {"w": torch.empty(5, 7), "b": torch.empty(3, dtype=torch.int64)},
        "grads": [torch.empty(4, 3, dtype=torch.float64)],
        "step": 0,
    }
    ctx = _dcp_quiet()
    try:
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    finally:
        ctx.__exit__(None, None, None)
    assert torch.equal(state["model"]["w"], w) and torch.equal(state["model"]["b"], b)
    assert torch.equal(state["grads"][0], g) and state["step"] == 25
    # DCP's converter rebuilds the nesting from our planner_data
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out_file = ckpt.parent / "h8c-full.pt"
    ctx = _dcp_quiet()
    try:
        dcp_to_torch_save(str(ckpt), str(out_file))
    finally:
        ctx.__exit__(None, None, None)
    full = torch.load(out_file, weights_only=True)
    assert torch.equal(full["model"]["w"], w) and torch.equal(full["grads"][0], g)


def test_shardlib_loads_a_checkpoint_dcp_wrote(ckpt):
    """A checkpoint written by DCP's default planner (no shardlib.json) loads onto any layout."""
    w, s = _value((6, 5), torch.bfloat16, 4), _value((2, 2), torch.int32, 5)
    ctx = _dcp_quiet()
    try:
        dcp.save({"model": {"w": w, "s": s}, "step": 7}, checkpoint_id=str(ckpt), no_dist=True)
    finally:
        ctx.__exit__(None, None, None)
    mesh = _sim({"a": 2, "b": 2})
    out = sl.checkpoint.load(ckpt, {"model": {"w": (mesh, P("b", "a")), "s": s}, "step": 0})
    _check_sharded(out["model"]["w"], w, mesh, P("b", "a"), "dcp-written")
    assert torch.equal(out["model"]["s"], s) and out["step"] == 7


# == atomicity: a crash at every step of the protocol ==========================
class _Crash(Exception):
    pass


def _crash_at(step: str):
    def hook(name: str) -> None:
        if name == step:
            raise _Crash(step)

    return hook


def _contents(mesh, k: int) -> dict:
    return {"w": sl.shard(torch.full((5, 3), float(k)), mesh, P("x")), "step": k}


def _loaded_step(path, mesh) -> int:
    out = sl.checkpoint.load(path, {"w": (mesh, P()), "step": None})
    k = out["step"]
    assert torch.equal(out["w"].full(), torch.full((5, 3), float(k))), "a mix of two checkpoints"
    return k


@pytest.mark.parametrize(
    "step,expect",
    [("data", 1), ("written", 1), ("aside", 2), ("committed", 2), ("trashed", 2)],
)
def test_a_crash_at_any_step_leaves_old_or_new(ckpt, monkeypatch, step, expect):
    mesh = _sim({"x": 2})
    sl.checkpoint.save(ckpt, _contents(mesh, 1))
    monkeypatch.setattr(_atomic, "_STEP_HOOK", _crash_at(step))
    with pytest.raises(_Crash):
        sl.checkpoint.save(ckpt, _contents(mesh, 2))
    monkeypatch.setattr(_atomic, "_STEP_HOOK", None)
    assert _loaded_step(ckpt, mesh) == expect
    # the next save recovers what a load saw, then replaces it and leaves no sibling behind
    sl.checkpoint.save(ckpt, _contents(mesh, 3))
    assert _loaded_step(ckpt, mesh) == 3
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]


def test_a_crash_during_recovery_still_loads(ckpt, monkeypatch):
    mesh = _sim({"x": 2})
    sl.checkpoint.save(ckpt, _contents(mesh, 1))
    monkeypatch.setattr(_atomic, "_STEP_HOOK", _crash_at("aside"))
    with pytest.raises(_Crash):
        sl.checkpoint.save(ckpt, _contents(mesh, 2))
    assert not ckpt.exists()  # only the siblings: old (1) and a complete tmp (2)
    monkeypatch.setattr(_atomic, "_STEP_HOOK", _crash_at("recovered"))
    with pytest.raises(_Crash):
        sl.checkpoint.save(ckpt, _contents(mesh, 3))
    monkeypatch.setattr(_atomic, "_STEP_HOOK", None)
    assert _loaded_step(ckpt, mesh) == 2


def test_a_first_save_killed_before_commit_loads_or_reports(ckpt, monkeypatch):
    mesh = _sim({"x": 2})
    monkeypatch.setattr(_atomic, "_STEP_HOOK", _crash_at("data"))
    with pytest.raises(_Crash):
        sl.checkpoint.save(ckpt, _contents(mesh, 1))
    monkeypatch.setattr(_atomic, "_STEP_HOOK", None)
    with pytest.raises(CheckpointNotFoundError):  # an incomplete tmp is never read
        sl.checkpoint.load(ckpt, {"w": (mesh, P()), "step": None})
    sl.checkpoint.save(ckpt, _contents(mesh, 4))
    assert _loaded_step(ckpt, mesh) == 4
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]


# == bad input =================================================================
def _saved(ckpt):
    mesh = _sim({"x": 2})
    sl.checkpoint.save(
        ckpt,
        {
            "params": {"wq": sl.shard(torch.ones(4, 6), mesh, P("x")), "b": torch.zeros(3)},
            "step": 1,
        },
    )
    return mesh


def test_error_like_shape_differs(ckpt):
    mesh = _saved(ckpt)
    like = {
        "params": {"wq": sl.shard(torch.ones(4, 8), mesh, P("x")), "b": torch.zeros(3)},
        "step": 0,
    }
    with pytest.raises(CheckpointError) as e:
        sl.checkpoint.load(ckpt, like)
    msg = str(e.value)
    assert "'params.wq'" in msg and "(4, 8)" in msg and "(4, 6)" in msg


def test_error_like_dtype_differs(ckpt):
    mesh = _saved(ckpt)
    like = {
        "params": {"wq": (mesh, P()), "b": torch.zeros(3, dtype=torch.float64)},
        "step": 0,
    }
    with pytest.raises(CheckpointError) as e:
        sl.checkpoint.load(ckpt, like)
    msg = str(e.value)
    assert "'params.b'" in msg and "torch.float64" in msg and "torch.float32" in msg


def test_error_missing_and_extra_keys_all_at_once(ckpt):
    mesh = _saved(ckpt)
    like = {"params": {"wq": (mesh, P()), "wk": (mesh, P())}, "step": 0}
    with pytest.raises(CheckpointError) as e:
        sl.checkpoint.load(ckpt, like)
    msg = str(e.value)
    assert "'params.wk'" in msg and "does not hold" in msg  # extra in like
    assert "'params.b'" in msg and "lacks" in msg and "(3,)" in msg  # saved, missing in like


def test_error_tensor_versus_value_kinds(ckpt):
    mesh = _saved(ckpt)
    like = {"params": {"wq": 0, "b": torch.zeros(3)}, "step": (mesh, P())}
    with pytest.raises(CheckpointError) as e:
        sl.checkpoint.load(ckpt, like)
    msg = str(e.value)
    assert "'params.wq'" in msg and "(4, 6)" in msg and "'step'" in msg and "non-tensor" in msg


def test_error_target_layout_does_not_fit(ckpt):
    _saved(ckpt)
    other = _sim({"y": 2})
    like = {"params": {"wq": (other, P("x")), "b": torch.zeros(3)}, "step": 0}
    with pytest.raises(CheckpointError, match="unknown mesh axis 'x'"):
        sl.checkpoint.load(ckpt, like)


def test_error_path_does_not_exist_names_neighbours(tmp_path):
    mesh = _sim({"x": 2})
    sl.checkpoint.save(tmp_path / "step10", {"w": sl.shard(torch.ones(2), mesh, P("x"))})
    sl.checkpoint.save(tmp_path / "step20", {"w": sl.shard(torch.ones(2), mesh, P("x"))})
    missing = tmp_path / "step30"
    with pytest.raises(CheckpointNotFoundError) as e:
        sl.checkpoint.load(missing, {"w": (mesh, P())})
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg and "step10, step20" in msg
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
        sl.checkpoint.load(tmp_path / "nowhere" / "c", {"w": (mesh, P())})
    assert isinstance(e.value, FileNotFoundError)


def test_error_unsupported_values(ckpt):
    class Opaque:
        pass

    with pytest.raises(CheckpointError) as e:
        sl.checkpoint.save(ckpt, {"gen": torch.Generator(), "obj": Opaque(), "ok": 1})
    msg = str(e.value)
    assert "['gen']" in msg and "Generator" in msg and "['obj']" in msg and "get_state()" in msg
    assert not ckpt.exists() and list(ckpt.parent.iterdir()) == []  # nothing written


def test_error_key_clash_and_single_leaf(ckpt):
    with pytest.raises(CheckpointError, match="same checkpoint key"):
        sl.checkpoint.save(ckpt, {"a.b": torch.ones(1), "a": {"b": torch.ones(1)}})
    with pytest.raises(CheckpointError, match="single leaf"):
        sl.checkpoint.save(ckpt, torch.ones(1))


def test_error_path_is_other_data(tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        sl.checkpoint.save(target, {"x": torch.ones(1)})
    assert (target / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory (tempfile.mkdtemp()) is a fine place
    sl.checkpoint.save(empty, {"x": torch.ones(1)})
    assert torch.equal(sl.checkpoint.load(empty, {"x": torch.empty(1)})["x"], torch.ones(1))
