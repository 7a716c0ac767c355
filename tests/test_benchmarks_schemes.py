"""Smoke run of benchmarks/schemes.py (issue 7 deliverable 6) on 4 gloo ranks at tiny sizes.

One timed step of shardlib's tp1d beside hand-written Megatron and DTensor,
plus the 64-device simulated 3D step (default tier, ~1 min); the same for
tp1d SP against Megatron-SP and DTensor's SequenceParallel (slow tier). The
table prints (the command line, a row per variant with its ratio columns, the
3D line), every time, peak, parameter and collective figure is positive,
every loss equals the unsharded float64 model's at 1e-4, and the bytes the
benchmark counts for hand-written Megatron equal Megatron's closed form
(written below: per layer two all-reduces of b·s·h each way, the
embedding's and the head input's, the vocab-parallel cross-entropy's three
per-token all-reduces, SP's norm-gradient all-reduces). shardlib's tp1d moves
at most that plus the small per-token and norm-gradient all-reduces its rules
add (DESIGN §8: "1D, per MLP: all-reduce 2(P-1)/P·bsh, the same backward").

Also, without processes: the reference torch module (`TorchGPT`, what DTensor
parallelizes) computes ``gpt.loss``'s value in float64, and bad flags raise.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from shardlib.nn import gpt


def _schemes():
    # as the package module, never with benchmarks/ on sys.path: its file names would
    # shadow installed packages (benchmarks/kernels.py hides the `kernels` transformers imports)
    return importlib.import_module("benchmarks.schemes")


TINY = dict(dim=32, heads=4, layers=1, seq=16, batch=2, vocab=64)
FLAVOURS = {  # (shardlib scheme, Megatron, DTensor) of one flavour
    "plain": ("tp1d", "megatron", "dtensor"),
    "sp": ("tp1d_sp", "megatron_sp", "dtensor_sp"),
}


def _argv(flavour: str) -> list[str]:
    scheme, *baselines = FLAVOURS[flavour]
    argv = [
        "--ranks",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--schemes",
        scheme,
        "--baselines",
        ",".join(baselines),
        *[f"--{k}={v}" for k, v in TINY.items()],
    ]
    if flavour != "plain":
        return [*argv, "--skip-3d", "--skip-scale"]
    # the compute-bound section at a tiny "scale" (its own model: another dim, heads and seq)
    scale = ["--scale-dim", "24", "--scale-heads", "4", "--scale-seq", "6", "--scale-steps", "1"]
    return [*argv, "--steps3d", "1", "--batch3d", "16", *scale]


def _f64_loss(batch_size: int) -> float:
    schemes = _schemes()
    c = gpt.Config(
        vocab=TINY["vocab"],
        dim=TINY["dim"],
        heads=TINY["heads"],
        layers=TINY["layers"],
        seq=TINY["seq"],
    )
    params = {k: v.double() for k, v in gpt.init(c).items()}
    return float(gpt.loss(params, schemes.make_batch(c, batch_size, c.seq), c))


def test_torch_reference_module_equals_gpt_loss():
    _schemes()
    ref = importlib.import_module("benchmarks._megatron_ref")
    c = gpt.Config(vocab=24, dim=16, heads=4, layers=2, seq=8, kv_heads=2)
    params = {k: v.double() for k, v in gpt.init(c, seed=3).items()}
    g = torch.Generator().manual_seed(4)
    tokens, targets = (torch.randint(0, 24, (3, 8), generator=g) for _ in range(2))
    want = gpt.loss(params, {"tokens": tokens, "targets": targets}, c)
    model = ref.TorchGPT(c).double().load(params)
    torch.testing.assert_close(model.loss(tokens, targets), want, rtol=1e-12, atol=0)


def test_bad_flags_raise():
    schemes = _schemes()
    with pytest.raises(SystemExit):
        schemes.parse_args(["--schemes", "tp1d,nope"])
    with pytest.raises(SystemExit):
        schemes.parse_args(["--ranks", "16"])


def _megatron_bytes(sequence: bool) -> tuple[float, float]:
    """Megatron's closed form (float32, P = 4): forward the embedding's all-reduce and two per
    layer of b*s*h (SP: the same bytes as all-gathers and reduce-scatters, the head input's
    gather included), plus the cross-entropy's max, sum-exp and target-logit all-reduces of b*s;
    backward f's all-reduce before each column-parallel group (2 per layer) and the head's (SP:
    the same bytes, plus the norm weights' gradient all-reduces, h each, 2 per layer + 1)."""
    p, b, s, h, layers = 4, TINY["batch"], TINY["seq"], TINY["dim"], TINY["layers"]
    ring = 2 * (p - 1) / p * 4
    fwd = ring * (b * s * h * (1 + 2 * layers) + 3 * b * s)
    bwd = ring * b * s * h * (2 * layers + 1)
    if sequence:
        bwd += ring * h * (2 * layers + 1)
    return fwd, bwd


def _smoke(capsys, flavour: str):
    schemes = _schemes()
    scheme, megatron, dtensor = FLAVOURS[flavour]
    report = schemes.main(_argv(flavour))
    out = capsys.readouterr().out
    assert out.startswith(
        f"# python benchmarks/schemes.py --ranks 4 --steps 1 --warmup 0 --schemes {scheme}"
    )
    rows = report.tables[4]
    captured = f"{scheme}+capture"  # the same step through sl.capture (the default for tp1d)
    assert set(rows) == {scheme, captured, megatron, dtensor}
    for key in ("fwd", "bwd", "colls", "loss"):  # replayed: eager's collectives and loss
        assert rows[captured][1][key] == rows[scheme][1][key], key
    want = _f64_loss(TINY["batch"])
    for name, (label, m) in rows.items():
        assert label in out, name
        assert m["median_s"] > 0 and m["first_s"] > 0 and m["cpu_s"] > 0, name
        assert m["peak"] > 0 and m["params"] > 0 and m["colls"] > 0, name
        assert m["fwd"] > 0 and m["bwd"] > 0, name
        assert math.isclose(m["loss"], want, rel_tol=1e-4), name
    # the table's ratio columns: shardlib's row against this flavour's references
    row = next(line for line in out.splitlines() if line.startswith(rows[scheme][0][:40]))
    ms = rows[scheme][1]["median_s"]
    assert f"{ms / rows[megatron][1]['median_s']:.2f}x" in row
    assert f"{ms / rows[dtensor][1]['median_s']:.2f}x" in row
    cpu = rows[scheme][1]["cpu_s"]
    assert f"{cpu / rows[megatron][1]['cpu_s']:.2f}x" in row

    fwd, bwd = _megatron_bytes(flavour == "sp")
    assert rows[megatron][1]["fwd"] == pytest.approx(fwd)
    assert rows[megatron][1]["bwd"] == pytest.approx(bwd)
    # shardlib: at most Megatron's bytes plus the small all-reduces its rules add, which Megatron
    # avoids by all-reducing dX before the norms (per-token statistics of each norm's and the
    # cross-entropy's backward, b*s each; without SP the norm weights' gradients, h each)
    b, s, h, layers = TINY["batch"], TINY["seq"], TINY["dim"], TINY["layers"]
    extra = 2 * 3 / 4 * 4 * (b * s * (2 * layers + 2) + h * (2 * layers + 1))
    mine = rows[scheme][1]
    assert mine["fwd"] + mine["bwd"] <= fwd + bwd + extra
    return report, out


@pytest.mark.dist
def test_smoke_table_on_4_ranks(capsys):
    report, out = _smoke(capsys, "plain")
    assert "64-device simulated 3D step (tp3d on {i: 4, j: 4, k: 4}, batch 16" in out
    assert report.sim3d["median_s"] > 0 and report.sim3d["first_s"] > 0
    assert math.isclose(report.sim3d["loss"], _f64_loss(16), rel_tol=1e-4)
    # the scale section: its own model, the same variants, losses checked by main itself
    assert "# the 1D TP goal at a compute-bound size: Config(vocab=" in out
    assert "dim=24" in out.split("# the 1D TP goal")[1].splitlines()[0]
    scale = report.scale[4]
    assert set(scale) == set(report.tables[4])
    for name, (_, m) in scale.items():
        assert m["median_s"] > 0 and m["cpu_s"] > 0 and m["colls"] > 0, name
    assert scale["tp1d"][1]["loss"] != report.tables[4]["tp1d"][1]["loss"]


@pytest.mark.dist
@pytest.mark.slow
def test_smoke_table_sequence_parallel_on_4_ranks(capsys):
    _smoke(capsys, "sp")
