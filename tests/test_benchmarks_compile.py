"""Smoke run of benchmarks/compile.py (issue 9 deliverable 6) at tiny sizes.

One timed step of each variant (shardlib tp1d, the plain model, hand-written
Megatron), eager and compiled (aot_eager: the benchmark's default inductor
would spend the test's time in a C++ compiler), on 4 gloo ranks (``dist``)
and on the simulated mesh: the table prints with the command that made it,
a row per variant with its eager and compiled times and the compiled tp1d
step's ratio to the compiled Megatron step; every time is positive and every
loss equals the unsharded float64 model's at 1e-4. Bad flags raise.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from shardlib.nn import gpt

TINY = dict(dim=32, heads=4, layers=1, seq=16, batch=2, vocab=64)


def _bench():
    # as the package module, never with benchmarks/ on sys.path: its file names would
    # shadow installed packages (benchmarks/kernels.py hides the `kernels` transformers imports)
    return importlib.import_module("benchmarks.compile")


def _f64_loss() -> float:
    bench = _bench()
    c = gpt.Config(**{k: v for k, v in TINY.items() if k != "batch"})
    params = {k: v.double() for k, v in gpt.init(c).items()}
    return float(gpt.loss(params, bench.make_batch(c, TINY["batch"], c.seq), c))


def _argv(*extra: str) -> list[str]:
    sizes = [f"--{k}={v}" for k, v in TINY.items()]
    return ["--steps", "1", "--warmup", "0", "--backend", "aot_eager", "--sim-tp", "2", *sizes]


def _check_rows(rows: dict, names: set[str], out: str) -> None:
    want = _f64_loss()
    assert set(rows) == {f"{n}/{mode}" for n in names for mode in ("eager", "compiled")}
    for key, (label, m) in rows.items():
        assert label in out, key
        assert m["median_s"] > 0 and m["first_s"] > 0, key
        assert math.isclose(m["loss"], want, rel_tol=1e-4), key


def test_bad_flags_raise():
    bench = _bench()
    for argv in (["--ranks", "16"], ["--sim-tp", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_smoke_table_on_the_simulated_mesh(capsys):
    bench = _bench()
    old = torch.get_num_threads()
    try:
        report = bench.main([*_argv(), "--skip-gloo"])
    finally:
        torch.set_num_threads(old)
    out = capsys.readouterr().out
    assert out.startswith("# python benchmarks/compile.py --ranks 4 --steps 1 --warmup 0")
    assert "--skip-gloo" in out.splitlines()[0]
    assert report.gloo is None
    _check_rows(report.sim, {"tp1d", "plain"}, out)
    assert "simulated mesh (tp1d on {tp: 2}" in out


@pytest.mark.dist
def test_smoke_table_on_4_gloo_ranks(capsys):
    bench = _bench()
    report = bench.main([*_argv(), "--skip-sim"])
    out = capsys.readouterr().out
    rows = report.gloo
    _check_rows(rows, {"tp1d", "plain", "megatron"}, out)
    line = next(x for x in out.splitlines() if x.startswith(rows["tp1d/eager"][0][:40]))
    ratio = rows["tp1d/compiled"][1]["median_s"] / rows["megatron/compiled"][1]["median_s"]
    assert f"{ratio:.2f}x" in line  # the compiled tp1d step against compiled Megatron
