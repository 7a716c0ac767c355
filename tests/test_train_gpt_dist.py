"""examples/train_gpt.py on 4 real gloo ranks (``dist``): the loss curves of issue 8's Training list.

On the session's 4-rank pool (tests/conftest.py `workers4`), the script's
worker entry (`train_gpt._run_on_rank`, what ``--backend gloo`` and torchrun
run) trains the tiny model of tests/test_train_gpt.py for 50 steps under
dp+tp1d with ZeRO-1, tp2d ({r: 2, c: 2}) and dp+ring ({dp: 2, sp: 2}); each
curve equals the unsharded run's (``--mesh none``, in this process) at rtol
1e-5 at every step, every rank reports the same curve, and each rank's ledger
of one step equals the simulated mesh's (kinds, axes, bytes, causes: the
ledger reads the same on both backends). With ``--capture`` the dp+ring run,
whose ppermutes a simulated mesh cannot record, replays after one recording per
rank to the same curve and ledger. A checkpoint the gloo ranks write at
step 25 (each rank its own blocks) resumes on a simulated mesh into steps
26-50 (slow tier, with one ``main(["--backend", "gloo", ...])`` run that
spawns its own processes through `sl.launch`).
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from tests.test_train_gpt import STEPS, TINY, _ledger, tg  # the same tiny model and script module
from tests.test_train_gpt import _assert_curve as _curve

GLOO4 = {
    "dp+tp1d+zero1": ["--mesh", "dp=2,tp=2", "--zero", "1"],
    "tp2d": ["--mesh", "tp=4", "--tp", "2d"],
    "dp+ring": ["--mesh", "dp=2,sp=2", "--sp", "ring"],
}


def _args(*extra: str):
    return tg.parse_args([*TINY, *extra])


@pytest.fixture(scope="module")
def reference() -> tg.Result:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tg.train(_args("--mesh", "none"))
    finally:
        torch.set_num_threads(old)


@pytest.mark.dist
@pytest.mark.parametrize("name", list(GLOO4))
def test_gloo_loss_curve_equals_unsharded(workers4, reference, name):
    args = _args(*GLOO4[name])
    axes = tg.build(args).axes
    ranks = workers4.run(tg._run_on_rank, axes, (args,))
    assert len(ranks) == 4
    for rank, result in enumerate(ranks):
        assert result.steps == list(range(1, STEPS + 1))
        _curve(result.losses, reference.losses, f"{name} rank {rank}")
        assert result.losses == ranks[0].losses, f"{name}: rank {rank} saw another loss"
    simulated = tg.train(tg.parse_args([*TINY, *GLOO4[name], "--steps", "2"]))
    assert _ledger(ranks[0]) == _ledger(simulated), name  # the same step, both backends


@pytest.mark.dist
def test_gloo_capture_replays_ring_attention(workers4, reference):
    """--capture on real processes, where the ring's ppermutes are recorded (a simulated
    mesh refuses): the unsharded curve on every rank, one recorded program per rank, and
    the eager step's ledger."""
    args = _args(*GLOO4["dp+ring"], "--capture", "--backend", "gloo")
    ranks = workers4.run(tg._run_on_rank, tg.build(args).axes, (args,))
    for rank, result in enumerate(ranks):
        _curve(result.losses, reference.losses, f"dp+ring --capture rank {rank}")
        assert result.recorded == 1, (rank, result.recorded)
    assert "ppermute" in {r.kind for r in ranks[0].records}
    eager = tg.train(tg.parse_args([*TINY, *GLOO4["dp+ring"], "--steps", "2"]))  # simulated
    assert _ledger(ranks[0]) == _ledger(eager)  # the replayed step's ledger is the eager one


@pytest.mark.slow  # a 4-process launch of its own (start-up included) and a 25-step resume
@pytest.mark.dist
def test_gloo_checkpoint_resumes_on_a_simulated_mesh(tmp_path, reference):
    ckpt = tmp_path / "h8e_gloo_ckpt"
    argv = [*TINY, *GLOO4["dp+tp1d+zero1"], "--backend", "gloo", "--ckpt", str(ckpt),
            "--ckpt-every", "25"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        launched = tg.main(argv)  # through sl.launch: rank 0's result comes back
    _curve(launched.losses, reference.losses, "main --backend gloo")
    assert launched.checkpoints == [str(ckpt / "step_000025"), str(ckpt / "step_000050")]
    resumed = tg.train(_args("--mesh", "tp=4", "--tp", "2d", "--resume", str(ckpt / "step_000025")))
    _curve(resumed.losses, reference.losses[25:], "gloo checkpoint resumed on {r: 2, c: 2}")
