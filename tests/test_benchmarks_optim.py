"""Smoke run of benchmarks/optim.py (issue 8 deliverable 6) at tiny sizes, one step.

Without processes: ZeRO stages 0-3 on a simulated ``{dp: 4}`` -- the table
prints, and per device the ZeRO bytes per step equal the closed forms written
here from the parameter shapes (2Ψ(N−1)/N at stages 0-2; at stage 3
3Ψ(N−1)/N less the embedding table's re-gather, Ψ_wte(N−1)/N, since an
embedding's backward reads only the token ids), the optimizer state equals
Ψ_state/N (Ψ_state = 2Ψ for AdamW's mu and nu; Ψ_state at stage 0), the
model memory (stored parameters + gradients + state) equals the ZeRO paper's
split for fp32 AdamW, and the losses equal the unsharded float64 model's.
Bad flags raise.

On 4 gloo ranks (the session's ``workers4`` pool, ~15 s once it is up): the
AdamW table (plain foreach and fused, shardlib functional, donated and fused
`sl.optim.step`, torch on ShardedTensors, DTensor) with positive times, every
variant's parameters equal to plain's after the steps, ns per local element
equal to the time over the local elements counted here from the dp+tp1d block
shapes, and the ratio column;
the gloo ZeRO table with the same byte formulas and peak memory
per rank at least the model memory (the gradients are allocated inside the step).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from shardlib.nn import gpt

TINY = dict(dim=32, heads=4, layers=1, vocab=64, seq=16, batch=4)
N = 4
ONE_STEP = ["--steps", "1", "--warmup", "0", "--zero-steps", "1", "--zero-ranks", str(N)]


def _optim():
    # As the package module: the session's worker pool may have started before this file put
    # anything on sys.path, and it unpickles `bench_rank` by its module's name.
    return importlib.import_module("benchmarks.optim")


def _config() -> gpt.Config:
    return gpt.Config(
        vocab=TINY["vocab"],
        dim=TINY["dim"],
        heads=TINY["heads"],
        layers=TINY["layers"],
        seq=TINY["seq"],
    )


def _argv(*extra: str) -> list[str]:
    return [*ONE_STEP, *[f"--{k}={v}" for k, v in TINY.items()], *extra]


def _shapes() -> dict[str, tuple[int, ...]]:
    """The GPT parameters' shapes, written out (vocab V, dim D, mlp M = 4D, kv = D here)."""
    v, d = TINY["vocab"], TINY["dim"]
    m = 4 * d
    shapes = {"wte": (v, d), "norm": (d,), "head": (d, v)}
    for i in range(TINY["layers"]):
        for name, shape in {
            "attn_norm": (d,),
            "wq": (d, d),
            "wk": (d, d),
            "wv": (d, d),
            "wo": (d, d),
            "mlp_norm": (d,),
            "w_up": (d, m),
            "w_down": (m, d),
        }.items():
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


def _psi() -> int:
    return sum(4 * math.prod(s) for s in _shapes().values())


def _want_zero_bytes(stage: int) -> float:
    psi, wte = _psi(), 4 * math.prod(_shapes()["wte"])
    moved = 2 * psi if stage < 3 else 3 * psi - wte
    return moved * (N - 1) / N


def _want_model_bytes(stage: int) -> float:
    """ZeRO paper, fp32 AdamW: parameters Ψ, gradients Ψ, mu+nu 2Ψ; split per stage."""
    psi = _psi()
    params = psi / N if stage >= 3 else psi
    grads = psi / N if stage >= 2 else psi
    state = 2 * psi / N if stage >= 1 else 2 * psi
    return params + grads + state


def _f64_loss() -> float:
    c = _config()
    params = {k: v.double() for k, v in gpt.init(c).items()}
    g = torch.Generator().manual_seed(1)
    batch = {
        k: torch.randint(0, c.vocab, (TINY["batch"], c.seq), generator=g)
        for k in ("tokens", "targets")
    }
    return float(gpt.loss(params, batch, c))


def _check_zero_rows(rows: dict[int, dict]) -> None:
    assert sorted(rows) == [0, 1, 2, 3]
    psi = _psi()
    want_loss = _f64_loss()
    for stage, r in rows.items():
        assert r["zero_bytes"] == pytest.approx(_want_zero_bytes(stage), rel=1e-12), stage
        assert r["state_bytes"] == pytest.approx(2 * psi / (N if stage >= 1 else 1), rel=1e-12), (
            stage
        )
        assert r["model_bytes"] == pytest.approx(_want_model_bytes(stage), rel=1e-12), stage
        assert r["other_bytes"] > 0 and r["collectives"] > 0, stage  # the loss's all-reduce
        assert math.isclose(r["first_loss"], want_loss, rel_tol=1e-4), stage
        assert r["median_s"] > 0, stage


def test_bad_flags_raise():
    optim = _optim()
    for argv in (
        ["--variants", "plain,nope"],
        ["--ranks", "16"],
        ["--stages", "0,4"],
        ["--stages", "x"],
        ["--zero-ranks", "1"],
        ["--zero-on", "tpu"],
        ["--steps", "0"],
        ["--skip-optim", "--skip-zero"],
    ):
        with pytest.raises(SystemExit):
            optim.parse_args(argv)


def test_zero_simulated_bytes_and_memory_equal_the_formulas(capsys):
    optim = _optim()
    report = optim.main(_argv("--skip-optim", "--zero-on", "simulated"))
    out = capsys.readouterr().out
    assert out.startswith("# python benchmarks/optim.py --ranks 1 4 --steps 1 --warmup 0")
    assert "--zero-on simulated --skip-optim" in out.splitlines()[0]
    assert f"ZeRO on {{dp: {N}}} (simulated" in out
    assert report.psi == _psi() and report.n == N
    assert set(report.zero) == {"simulated"} and not report.optim
    rows = report.zero["simulated"]
    _check_zero_rows(rows)
    for stage in rows:
        assert rows[stage]["peak_bytes"] is None  # devices share one process: no per-rank peak
    assert "embedding table's re-gather" in out


@pytest.mark.dist
def test_smoke_tables_on_4_gloo_ranks(capsys, workers4):
    optim = _optim()
    report = optim.main(
        _argv("--ranks", "4", "--zero-on", "gloo"),
        launch=lambda fn, axes, args: workers4.run(fn, axes, args),
    )
    out = capsys.readouterr().out
    assert out.startswith("# python benchmarks/optim.py --ranks 4 --steps 1 --warmup 0")
    assert set(report.optim) == {4} and set(report.zero) == {"gloo"}
    rows = report.optim[4]
    assert list(rows) == list(optim.VARIANTS)
    # local elements on {dp: 2, tp: 2}: tp-split weights hold half, norms all of theirs
    tp = 2
    split = {k: s for k, s in _shapes().items() if len(s) == 2}
    local = sum(math.prod(s) // tp for s in split.values()) + sum(
        math.prod(s) for k, s in _shapes().items() if k not in split
    )
    assert "AdamW step, 4 ranks ({'dp': 2, 'tp': 2}" in out
    plain = rows["plain"]["ns_per_element"]
    for name, r in rows.items():
        assert r["local"] == local, name
        assert r["median_s"] > 0 and r["first_s"] > 0, name
        assert r["ns_per_element"] == pytest.approx(r["median_s"] * 1e9 / local), name
        assert r["mismatch"] <= 1, name  # parameters agree with plain's (atol 1e-6 + rtol 1e-5)
        line = next(x for x in out.splitlines() if x.startswith(optim.LABELS[name]))
        assert line.endswith(f"{r['ns_per_element'] / plain:.2f}x"), name
    zrows = report.zero["gloo"]
    _check_zero_rows(zrows)
    for stage, r in zrows.items():
        assert r["peak_bytes"] >= r["model_bytes"], stage  # the step's gradients on top
    assert f"ZeRO on {{dp: {N}}} (gloo, {N} ranks)" in out
