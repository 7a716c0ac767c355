"""examples/train_gpt.py (issue 8 deliverable 5): the training run's numbers and its flags.

What it covers, on simulated meshes, with a tiny model (vocab 16, dim 32, 4 heads,
1 layer, seq 16, batch 8) for 50 steps of adamw + clip_by_global_norm +
warmup_cosine:

- the loss curve of every scheme preset (dp, fsdp, tp1d, tp1d + Megatron SP,
  tp2d, tp2p5d, tp3d, ulysses, ring) and of dp composed with them under each
  ZeRO stage 0-3 equals the unsharded run's (``--mesh none``: the same script
  on plain tensors), fp32, rtol 1e-5 at every step; each run's ledger shows the
  collectives its ZeRO stage is made of (so a run that silently fell back to
  no ZeRO fails). Default tier: dp+tp1d at ZeRO 0-3, tp2d, ring; the full
  matrix is ``slow``;
- the unsharded run itself equals an independent loop written here with
  torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and a LambdaLR of the
  warmup-cosine formula (rtol 1e-5), so the reference is not the code under test;
- gradient accumulation: 2 micro-batches give the 1-micro-batch curve, with
  one gradient reduction per step (the ledger's ``zero.reduce`` count);
- bf16 (bf16 params and compute, fp32 master weights): every step after step
  10 within 5% of the fp32 loss, the last-10-step mean below 0.6x the first-10
  mean, and the step's gradient reduce-scatter and parameter all-gather carry
  exactly half the fp32 bytes, which equal the ring formula (N-1)/N * Psi * 4
  with Psi the parameter elements a dp group splits, written here from the
  scheme's layouts;
- resume: a checkpoint written at step 25 (dropout on, so torch's RNG state
  matters) on {dp: 2, tp: 2} with ZeRO-1, resumed on {dp: 2, sp: 2} under
  Ulysses with ZeRO-3, reproduces steps 26-50 (rtol 1e-5) and the final
  parameters; a resume with another model config raises naming the field;
  ``--resume`` without a path picks the newest checkpoint;
- the flag conventions (tp factored into 2D/2.5D/3D grids, sp axes, fsdp,
  ZeRO without dp) and every bad combination's error naming the valid ones;
- ``--capture`` (dp+tp1d with ZeRO-1, ZeRO-3 with 2 micro-batches, tp2d, fsdp
  with dropout): the eager run's losses and final parameters bit for bit, its
  ledger, and one recorded program per micro-batch position for all 50 steps;
  with ``--sp ring`` on the simulated mesh it is a flag error naming
  ``--backend gloo``;
- `main`'s report: the ledger of one step, the loss summary, the PNG, the
  reproducing command; the plain-print fallbacks without tqdm and matplotlib;
- the default run (``slow``, about a minute): its loss visibly falls.

The gloo runs are in tests/test_train_gpt_dist.py.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import math
import pathlib
import sys

import pytest
import torch

from shardlib.nn import gpt

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # spawned gloo workers inherit sys.path

import train_gpt as tg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 50
TINY = [
    "--vocab", "16", "--dim", "32", "--heads", "4", "--layers", "1", "--seq", "16",
    "--batch", "8", "--steps", str(STEPS), "--quiet", "--no-plot",
]  # fmt: skip

# preset -> --mesh and scheme flags; "dp+" ones take every ZeRO stage
PRESETS = {
    "dp": ["--mesh", "dp=2"],
    "fsdp": ["--mesh", "dp=2", "--fsdp"],
    "tp1d": ["--mesh", "tp=2"],
    "tp1d_sp": ["--mesh", "tp=2", "--sp", "megatron"],
    "tp2d": ["--mesh", "tp=4", "--tp", "2d"],
    "tp2p5d": ["--mesh", "tp=8", "--tp", "2.5d"],
    "tp3d": ["--mesh", "tp=8", "--tp", "3d"],
    "ulysses": ["--mesh", "sp=2", "--sp", "ulysses"],
    "ring": ["--mesh", "sp=2", "--sp", "ring"],
    "dp+tp1d": ["--mesh", "dp=2,tp=2"],
    "dp+tp1d_sp": ["--mesh", "dp=2,tp=2", "--sp", "megatron"],
    "dp+tp2d": ["--mesh", "dp=2,tp=4", "--tp", "2d"],
    "dp+tp2p5d": ["--mesh", "dp=2,tp=8", "--tp", "2.5d"],
    "dp+tp3d": ["--mesh", "dp=2,tp=8", "--tp", "3d"],
    "dp+ulysses": ["--mesh", "dp=2,sp=2", "--sp", "ulysses"],
    "dp+ring": ["--mesh", "dp=2,sp=2", "--sp", "ring"],
}
DEFAULT_TIER = {("dp+tp1d", 0), ("dp+tp1d", 1), ("dp+tp1d", 2), ("dp+tp1d", 3),
                ("tp2d", None), ("ring", None)}  # fmt: skip


def _cases():
    out = []
    for name in PRESETS:
        stages = (0, 1, 2, 3) if name == "dp" or name.startswith("dp+") else (None,)
        for z in stages:
            marks = () if (name, z) in DEFAULT_TIER else (pytest.mark.slow,)
            out.append(pytest.param(name, z, marks=marks, id=f"{name}-zero{z}"))
    return out


def _args(*extra: str):
    return tg.parse_args([*TINY, *extra])


_RUNS: dict[tuple[str, ...], tg.Result] = {}


def _train(*extra: str) -> tg.Result:
    """One run per flag set in this module (the bf16 test reuses the fp32 run)."""
    if extra not in _RUNS:
        _RUNS[extra] = tg.train(_args(*extra))
    return _RUNS[extra]


@pytest.fixture(scope="module")
def reference() -> tg.Result:
    return _train("--mesh", "none")


def _assert_curve(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), what
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=1e-5,
        atol=0.0,
        msg=lambda m: f"{what}: {m}",
    )


# ZeRO stage -> (kind, cause, direction) records its step must contain / causes it must not
# have over the dp axis
ZERO_RECORDS = {
    0: ({("all_reduce", "zero.reduce", "forward")}, {"zero.place", "zero.grad", "zero.gather"}),
    1: (
        {("reduce_scatter", "zero.reduce", "forward"), ("all_gather", "zero.place", "forward")},
        {"zero.grad", "zero.gather"},
    ),
    2: (
        {("reduce_scatter", "zero.grad", "backward"), ("all_gather", "zero.place", "forward")},
        {"zero.reduce", "zero.gather"},
    ),
    3: (
        {
            ("all_gather", "zero.gather", "forward"),
            ("all_gather", "regather", "backward"),
            ("reduce_scatter", "zero.grad", "backward"),
        },
        {"zero.place"},
    ),
}


# == the loss curves ===========================================================================
@pytest.mark.parametrize(("name", "stage"), _cases())
def test_loss_curve_equals_unsharded(reference, name, stage):
    flags = [*PRESETS[name], *(["--zero", str(stage)] if stage is not None else [])]
    result = _train(*flags)
    assert result.steps == list(range(1, STEPS + 1))
    _assert_curve(result.losses, reference.losses, f"{name} zero {stage}")
    assert result.records, f"{name}: a sharded step with no collective"
    causes = {r.cause for r in result.records}
    if stage is None:
        assert not any(c.startswith("zero.") for c in causes), (name, causes)
    else:
        must, must_not = ZERO_RECORDS[stage]
        got = {(r.kind, r.cause, r.direction) for r in result.records}
        assert must <= got, (name, stage, sorted(got))
        # over dp only: a gradient also partial over sp (or a tp axis) is finished by
        # z.reduce at every stage, an all-reduce over that axis
        over_dp = {r.cause for r in result.records if "dp" in r.axes}
        assert not over_dp & must_not, (name, stage, over_dp & must_not)


def test_the_reference_is_torch_optim_on_plain_tensors(reference):
    """The unsharded run equals a loop written with torch.optim (not sl.optim)."""
    a = _args("--mesh", "none")
    cfg = tg.make_config(a)
    params = {k: v.clone().requires_grad_() for k, v in gpt.init(cfg, a.seed).items()}
    opt = torch.optim.AdamW(
        params.values(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay
    )
    peak, end, w, total = a.lr, a.lr / 10, a.warmup, a.steps

    def lr_at(c: int) -> float:  # linear warmup lr/10 -> lr, then cosine to lr/10
        if c < w:
            return peak / 10 + (peak - peak / 10) * c / w
        frac = min(c - w, total - w) / (total - w)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda c: lr_at(c) / peak)
    torch.manual_seed(a.seed)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = gpt.loss(params, tg.make_batch(a.seed, step, a.batch, a.seq), cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), a.clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    _assert_curve(reference.losses, losses, "sl.optim on plain tensors vs torch.optim")
    assert losses[-1] < 0.5 * losses[0]  # the task is learnable at these sizes


def test_micro_batches_accumulate_with_one_reduction_per_step(reference):
    one = _train("--mesh", "dp=2,tp=2", "--zero", "1")
    two = _train("--mesh", "dp=2,tp=2", "--zero", "1", "--micro-batches", "2")
    _assert_curve(two.losses, one.losses, "2 micro-batches vs 1")
    _assert_curve(two.losses, reference.losses, "2 micro-batches vs unsharded")
    reductions = [r for r in two.records if r.cause == "zero.reduce"]
    assert [r.kind for r in reductions] == ["reduce_scatter"]  # one for both micro-batches


# == --capture ================================================================================
CAPTURED = {  # flags -> programs each micro-batch position records (first, accumulating)
    "dp+tp1d-zero1": ["--mesh", "dp=2,tp=2", "--zero", "1"],
    "dp+tp1d-zero3-micro2": ["--mesh", "dp=2,tp=2", "--zero", "3", "--micro-batches", "2"],
    "tp2d": ["--mesh", "tp=4", "--tp", "2d"],
    "fsdp-dropout": ["--mesh", "dp=2", "--fsdp", "--dropout", "0.1"],
}


def _ledger(result: tg.Result) -> list[tuple]:
    return [(r.kind, r.axes, r.bytes, r.dtype, r.direction, r.cause) for r in result.records]


@pytest.mark.parametrize("name", list(CAPTURED))
def test_capture_replays_the_eager_run(reference, name):
    """--capture: the same losses and final parameters as the eager run, bit for bit (a
    replay runs the ops the recording ran, in its order), the same ledger, and one
    recording per micro-batch position for the whole run (so later steps replayed)."""
    flags = CAPTURED[name]
    eager = _train(*flags)
    setup = tg.build(_args(*flags, "--capture"))
    captured = tg.run(setup)
    assert captured.losses == eager.losses, name
    for k, want in eager.params.items():
        assert torch.equal(captured.params[k], want), (name, k)
    assert _ledger(captured) == _ledger(eager), name
    if "--dropout" not in flags:  # the unsharded run has none
        _assert_curve(captured.losses, reference.losses, f"{name} --capture vs unsharded")
    assert captured.recorded == setup.args.micro_batches, (name, captured.recorded)
    assert eager.recorded == 0


def _psi_split(scheme, cfg) -> int:
    """Parameter elements per device under the scheme's layouts (every size here divides)."""
    mesh = {"dp": 2, "tp": 2}
    total = 0
    for k, t in gpt.init(cfg).items():
        layout = scheme.param_layout(gpt.DIMS[k])
        total += t.numel() // math.prod(mesh[a] for d in layout.dims for a in d)
    return total


def test_bf16_loss_falls_like_fp32():
    fp32 = _train("--mesh", "dp=2,tp=2", "--zero", "1")
    bf16 = _train("--mesh", "dp=2,tp=2", "--zero", "1", "--dtype", "bf16")
    for step, (lo, hi) in enumerate(zip(bf16.losses, fp32.losses), 1):
        if step > 10:
            assert abs(lo - hi) <= 0.05 * hi, (step, lo, hi)
    assert bf16.mean_loss(False) < 0.6 * bf16.mean_loss(True)
    a = _args("--mesh", "dp=2,tp=2")
    _, scheme = tg.layout_for({"dp": 2, "tp": 2}, None, "none")
    psi = _psi_split(scheme, tg.make_config(a))
    n = 2
    for result, e in ((fp32, 4), (bf16, 2)):
        moved = {
            (r.kind, r.cause): (r.bytes, r.dtype)
            for r in result.records
            if r.cause in ("zero.reduce", "zero.place")
        }
        want_dtype = "float32" if e == 4 else "bfloat16"
        assert moved == {
            ("reduce_scatter", "zero.reduce"): ((n - 1) * psi * e // n, want_dtype),
            ("all_gather", "zero.place"): ((n - 1) * psi * e // n, want_dtype),
        }


# == resume ====================================================================================
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """50 steps on {dp: 2, tp: 2}, ZeRO-1, dropout 0.1, checkpoints at 25 and 50."""
    ckpt = tmp_path_factory.mktemp("h8e_ckpt")
    flags = ("--mesh", "dp=2,tp=2", "--zero", "1", "--dropout", "0.1")
    full = tg.train(_args(*flags, "--ckpt", str(ckpt), "--ckpt-every", "25"))
    return ckpt, full


def test_resume_on_another_mesh_and_scheme_reproduces_the_run(interrupted):
    ckpt, full = interrupted
    assert full.checkpoints == [str(ckpt / "step_000025"), str(ckpt / "step_000050")]
    resumed = tg.train(
        _args("--mesh", "dp=2,sp=2", "--sp", "ulysses", "--zero", "3", "--dropout", "0.1",
              "--resume", str(ckpt / "step_000025"))
    )  # fmt: skip
    assert resumed.start == 25 and resumed.steps == list(range(26, STEPS + 1))
    assert "ulysses" in resumed.describe and "ZeRO-3" in resumed.describe
    _assert_curve(resumed.losses, full.losses[25:], "resumed at 25 vs uninterrupted")
    for k, v in full.params.items():
        torch.testing.assert_close(resumed.params[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_resume_without_a_path_takes_the_newest_checkpoint(interrupted):
    ckpt, _ = interrupted
    assert tg.latest_checkpoint(ckpt) == ckpt / "step_000050"
    done = tg.train(_args("--mesh", "tp=2", "--dropout", "0.1", "--ckpt", str(ckpt), "--resume"))
    assert done.start == STEPS and done.losses == []


def test_resume_with_another_model_config_names_the_field(interrupted):
    ckpt, _ = interrupted
    with pytest.raises(tg.TrainConfigError, match=r"'dropout': \(0\.1, 0\.2\)"):
        tg.train(_args("--mesh", "dp=2", "--dropout", "0.2", "--resume", str(ckpt / "step_000025")))


# == flags =====================================================================================
@pytest.mark.parametrize(
    ("logical", "tp", "sp", "fsdp", "axes", "scheme"),
    [
        ({"dp": 2, "tp": 2}, None, "none", False, {"dp": 2, "tp": 2}, "dp('dp') + tp1d('tp')"),
        ({"tp": 4}, "2d", "none", False, {"r": 2, "c": 2}, "tp2d('r', 'c')"),
        ({"tp": 8}, "2.5d", "none", False, {"d": 2, "r": 2, "c": 2}, "tp2p5d('d', 'r', 'c')"),
        ({"tp": 16}, "2.5d", "none", False, {"d": 4, "r": 2, "c": 2}, "tp2p5d('d', 'r', 'c')"),
        ({"tp": 8}, "3d", "none", False, {"i": 2, "j": 2, "k": 2}, "tp3d('i', 'j', 'k')"),
        ({"tp": 2}, "1d", "megatron", False, {"tp": 2}, "tp1d('tp', sequence=True)"),
        ({"dp": 2, "sp": 4}, None, "ulysses", False, {"dp": 2, "sp": 4}, "dp('dp') + ulysses('sp')"),
        ({"dp": 4}, None, "none", True, {"dp": 4}, "fsdp('dp')"),
        ({}, None, "none", False, {}, "None"),
    ],
)  # fmt: skip
def test_flags_map_to_meshes_and_schemes(logical, tp, sp, fsdp, axes, scheme):
    got_axes, got_scheme = tg.layout_for(logical, tp, sp, fsdp)
    assert got_axes == axes and list(got_axes) == list(axes)
    assert repr(got_scheme).startswith(scheme)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mesh", "dp=2,pp=2"], r"unknown axis 'pp'.*dp.*tp.*sp"),
        (["--mesh", "dp2"], r"not AXIS=SIZE"),
        (["--mesh", "tp=2", "--tp", "2d"], r"tp must be a square >= 4"),
        (["--mesh", "tp=4", "--tp", "2.5d"], r"8, 12, 16"),
        (["--mesh", "tp=4", "--tp", "3d"], r"cube >= 8"),
        (["--mesh", "dp=2", "--tp", "1d"], r"needs a tp axis"),
        (["--mesh", "dp=2,tp=4", "--tp", "2d", "--sp", "megatron"], r"megatron.*needs --tp 1d"),
        (["--mesh", "dp=2", "--sp", "ring"], r"needs an sp axis"),
        (["--mesh", "dp=2,sp=2"], r"pick --sp ulysses or --sp ring"),
        (["--mesh", "tp=2", "--zero", "1"], r"--zero 1: ZeRO splits.*--mesh has none"),
        (["--mesh", "dp=2", "--fsdp", "--zero", "2"], r"--zero 0 with --fsdp"),
        (["--mesh", "tp=2", "--fsdp"], r"--fsdp.*needs a dp axis"),
        (["--mesh", "none", "--backend", "gloo"], r"--backend sim"),
        (["--batch", "8", "--micro-batches", "3"], r"divisors of 8"),
        (["--vocab", "8"], r"--vocab >= 11"),
        (["--mesh", "sp=2", "--sp", "ring", "--capture"], r"--capture --sp ring.*--backend gloo"),
    ],
)  # fmt: skip
def test_bad_combinations_say_what_is_valid(argv, message, capsys):
    with pytest.raises(tg.TrainConfigError, match=message):
        tg.build(tg.parse_args(argv))
    with pytest.raises(SystemExit) as exit_info:  # main: status 2 and the message, no traceback
        tg.main([*argv, "--steps", "1", "--no-plot", "--quiet"])
    assert exit_info.value.code == 2
    assert "train_gpt.py: error:" in capsys.readouterr().err


def test_module_examples():
    result = doctest.testmod(tg, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0


# == main's report ============================================================================
def test_main_prints_the_ledger_the_losses_and_writes_the_png(tmp_path):
    out = tmp_path / "h8e_curve.png"
    text = io.StringIO()
    argv = [*TINY[:-2], "--steps", "4", "--out", str(out)]  # progress and plot on
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        result = tg.main(argv)
    lines = text.getvalue().splitlines()
    assert (
        lines[0]
        == result.describe
        == "mesh {'dp': 2, 'tp': 2}, scheme dp('dp') + tp1d('tp'), ZeRO-1, fp32"
    )
    assert "ledger of one step (step 4):" in lines
    assert any(line.startswith("total ") and "collectives" in line for line in lines)
    assert any(line.startswith("loss: first 4 steps") for line in lines)
    assert lines[-1] == "reproduce: python examples/train_gpt.py " + " ".join(argv)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.tokens_per_s > 0 and len(result.losses) == 4


def test_without_tqdm_and_matplotlib_it_prints_plain_lines(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "h8e_none.png"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tg.main(["--mesh", "none", *TINY[:-2], "--steps", "3", "--out", str(out)])
    printed = text.getvalue()
    assert "(tqdm is not installed" in printed and "step 3: loss" in printed
    assert "(matplotlib is not installed" in printed and not out.exists()


@pytest.mark.slow  # about a minute: the README's first command, 300 steps on {dp: 2, tp: 2}
def test_default_run_loss_visibly_falls(tmp_path):
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        result = tg.main(["--out", str(tmp_path / "h8e_default.png"), "--quiet"])
    assert len(result.losses) == 300
    assert result.mean_loss(False) < 0.5 * result.mean_loss(True), (
        result.mean_loss(True), result.mean_loss(False))  # fmt: skip
    assert (tmp_path / "h8e_default.png").exists()
