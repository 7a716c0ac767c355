"""Smoke run of benchmarks/kernels.py (issue 10 deliverable 4) with one repeat.

The compile table prints with the command that made it: a row per (kernel, arch,
target) -- the fp8 kernels only for archs from sm_89 -- with positive cold and cached
times, and the worst cached time. Without a GPU the script says it needs one and lists
every measurement it would make; with one (the GPU tier), the bandwidth table has a row
per kernel and the copy baseline. Bad flags raise.
"""

from __future__ import annotations

import importlib
import re

import pytest

import shardlib as sl

pytest.importorskip(
    "cuda.core", reason='the cuda extra is not installed (pip install "shardlib[cuda]")'
)


def _bench():
    return importlib.import_module("benchmarks.kernels")


def test_kernels_benchmark_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDLIB_CACHE", str(tmp_path))  # the benchmark uses its own anyway
    bench = _bench()
    argv = ["--reps", "1", "--archs", "sm_80", "sm_90", "--size-mib", "4"]
    bench.main(argv)
    out = capsys.readouterr().out
    assert out.startswith(f"# python benchmarks/kernels.py {' '.join(argv)}\n")
    rows = re.findall(r"^(\w+)\s+(sm_\d+)\s+(cubin|ptx)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    expected = {
        (name, arch, target)
        for name in sl.cuda.kernels()
        for arch in ("sm_80", "sm_90")
        for target in ("cubin", "ptx")
        if not (name.endswith("fp8") and arch == "sm_80")
    }
    assert {r[:3] for r in rows} == expected and len(rows) == len(expected)
    assert all(float(r[3]) >= 0 and float(r[4]) > 0 for r in rows)
    assert re.search(r"^worst cached compile: [\d.]+ ms \(goal < 10 ms\)$", out, re.M)
    if sl.cuda.available():
        for name in ("copy (float32)", "quantize_int8", "dequantize_int8", "adamw_flat"):
            assert re.search(rf"^{re.escape(name)}\s+[\d.]+\s+[\d.]+", out, re.M), name
    else:
        assert "GPU part not run: it needs a CUDA GPU and driver" in out
        for item in bench.GPU_PLAN:
            assert f"  - {item}\n" in out


def test_kernels_benchmark_rejects_bad_flags():
    with pytest.raises(SystemExit):
        _bench().main(["--reps", "0"])
