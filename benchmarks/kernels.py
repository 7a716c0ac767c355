"""shardlib.cuda's kernels: compile times everywhere; bandwidth and step times on a GPU.

Reproduce with:

    python benchmarks/kernels.py                 # the issue's sizes: 256 MiB, 20 repeats
    python benchmarks/kernels.py --size-mib 16 --reps 5

Part 1, everywhere (no GPU needed): for each registry kernel, the compile time to a cubin
and to PTX for ``--archs`` in a fresh cache directory (cold: NVRTC runs) and again
(cached: the key is computed and the entry read from disk; goal < 10 ms), medians over
``--reps``. Kernels of one source file share a module: the second of them finds the first
one's entry, so its "cold" is a hit and the table says so.

Part 2, only where `sl.cuda.available()` (else the script prints that it needs a GPU
and the list of what it would run): CUDA-event timings, medians over ``--reps`` after a
warm-up, of

- each quantization kernel's GB/s (bytes read + written) at a ``--size-mib`` float32
  tensor, against a device-to-device copy of the same tensor (goal: quantize and
  dequantize >= 80% of the copy's GB/s); dequantize-reduce sums 4 pieces of a quarter of
  the elements each;
- the fused AdamW step (``adamw_flat``) on one float32 buffer of that size, against
  ``torch.optim.AdamW(fused=True)`` on the same (goal: at least as fast);
- compressed against plain all-gather: ``sl.reshard(x, P(None), comm_dtype="int8")``
  against ``sl.reshard(x, P(None))`` on a simulated ``{dp: 4}`` mesh of CUDA tensors
  (the ledger's bytes and the wall time; the simulated backend copies on one GPU, so the
  time is the quantize/dequantize overhead, the bytes are what a real network would carry).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import shardlib as sl
from shardlib.cuda import _compile

MIB = 1 << 20


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# == part 1: compile times ======================================================
def compile_rows(archs: list[str], reps: int) -> list[dict]:
    """One row per (kernel, arch, target): cold and cached compile ms, cache hit on cold."""
    rows = []
    old = os.environ.get("SHARDLIB_CACHE")
    try:
        with tempfile.TemporaryDirectory(prefix="shardlib_bench_") as tmp:
            os.environ["SHARDLIB_CACHE"] = tmp
            ks = sl.cuda.kernels()
            warm = 'extern "C" __global__ void warm_up() {}'
            _compile.compile_source(warm, "warm_up.cu", 80, "", "ptx")  # load NVRTC first
            for name, k in ks.items():
                for arch in archs:
                    if k.min_arch and int(arch.removeprefix("sm_")) < k.min_arch:
                        continue
                    for target in ("cubin", "ptx"):
                        cache = sl.cuda.compile_cache()
                        hits = cache.hits
                        t = time.perf_counter()
                        k.compile(arch, target)
                        cold = (time.perf_counter() - t) * 1e3
                        shared = cache.hits > hits  # another kernel of its file compiled it
                        cached = _median_ms(lambda k=k, a=arch, tg=target: k.compile(a, tg), reps)
                        rows.append(
                            dict(
                                kernel=name,
                                arch=arch,
                                target=target,
                                cold=cold,
                                cached=cached,
                                shared=shared,
                            )
                        )
    finally:
        if old is None:
            os.environ.pop("SHARDLIB_CACHE", None)
        else:
            os.environ["SHARDLIB_CACHE"] = old
    return rows


def print_compile_table(rows: list[dict]) -> None:
    print(f"# NVRTC {'.'.join(map(str, sl.cuda.nvrtc_version()))}, compile times (ms)")
    header = f"{'kernel':<24}{'arch':<7}{'target':<7}{'cold ms':>10}{'cached ms':>11}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        note = "module compiled by an earlier row" if r["shared"] else ""
        print(
            f"{r['kernel']:<24}{r['arch']:<7}{r['target']:<7}{r['cold']:>10.1f}"
            f"{r['cached']:>11.2f}  {note}"
        )
    worst = max(r["cached"] for r in rows)
    print(f"worst cached compile: {worst:.2f} ms (goal < 10 ms)")


# == part 2: GPU timings ========================================================
GPU_PLAN = [
    "device-to-device copy of a --size-mib float32 tensor (the bandwidth baseline)",
    "quantize_int8 / quantize_fp8: GB/s at --size-mib, ratio to the copy (goal >= 0.8)",
    "dequantize_int8 / dequantize_fp8: GB/s at --size-mib, ratio to the copy (goal >= 0.8)",
    "dequantize_reduce_int8 / _fp8: 4 pieces of a quarter each, GB/s, ratio to the copy",
    "adamw_flat on a --size-mib float32 buffer vs torch.optim.AdamW(fused=True) (goal <= 1x)",
    "sl.reshard all-gather {dp: 4} simulated on CUDA: comm_dtype='int8' vs float32 "
    "(ledger bytes, ms)",
]


def _cuda_ms(fn, reps: int) -> float:
    fn()  # warm-up (and the kernel's module load)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_rows(size_mib: int, reps: int) -> list[tuple[str, float, float, str]]:
    """(name, ms, GB/s or nan, note) rows."""
    from shardlib.cuda import _adamw, _ops

    n = size_mib * MIB // 4
    x = torch.randn(n, device="cuda")
    dst = torch.empty_like(x)
    rows = []
    copy_ms = _cuda_ms(lambda: dst.copy_(x), reps)
    copy_gbs = 2 * 4 * n / copy_ms / 1e6
    rows.append(("copy (float32)", copy_ms, copy_gbs, "baseline"))
    fmts = ["int8"] + (["fp8"] if torch.cuda.get_device_capability() >= (8, 9) else [])
    block = 256
    for fmt in fmts:
        q, s = _ops.quantize_cuda(x, fmt, block)
        nb = s.numel()
        ms = _cuda_ms(lambda fmt=fmt: _ops.quantize_cuda(x, fmt, block), reps)
        gbs = (4 * n + n + 4 * nb) / ms / 1e6
        rows.append((f"quantize_{fmt}", ms, gbs, f"{gbs / copy_gbs:.2f}x copy"))
        ms = _cuda_ms(lambda q=q, s=s: _ops.dequantize_cuda(q, s, block), reps)
        gbs = (n + 4 * nb + 4 * n) / ms / 1e6
        rows.append((f"dequantize_{fmt}", ms, gbs, f"{gbs / copy_gbs:.2f}x copy"))
        k, part = 4, n // 4
        pieces = [_ops.quantize_cuda(x[j * part : (j + 1) * part], fmt, block) for j in range(k)]
        qk, sk = torch.stack([a for a, _ in pieces]), torch.stack([b for _, b in pieces])
        ms = _cuda_ms(lambda qk=qk, sk=sk: _ops.dequantize_reduce_cuda(qk, sk, block), reps)
        gbs = (qk.numel() + 4 * sk.numel() + 4 * part) / ms / 1e6
        rows.append((f"dequantize_reduce_{fmt} (k=4)", ms, gbs, f"{gbs / copy_gbs:.2f}x copy"))
    # fused AdamW against torch's fused AdamW on the same buffer
    hp = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    p, g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ours = _cuda_ms(lambda: _adamw.adamw_flat_cuda(p, g, m, v, step=1, **hp), reps)
    tp = torch.nn.Parameter(torch.randn(n, device="cuda"))
    tp.grad = torch.randn(n, device="cuda")
    opt = torch.optim.AdamW(
        [tp], lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], fused=True,
    )  # fmt: skip
    theirs = _cuda_ms(opt.step, reps)
    adam_bytes = 4 * n * 7  # reads p, g, m, v; writes p, m, v
    rows.append(("torch AdamW(fused=True)", theirs, adam_bytes / theirs / 1e6, "baseline"))
    rows.append(("adamw_flat", ours, adam_bytes / ours / 1e6, f"{ours / theirs:.2f}x torch's ms"))
    rows.extend(_allgather_rows(size_mib, reps))
    return rows


def _allgather_rows(size_mib: int, reps: int) -> list[tuple[str, float, float, str]]:
    mesh = sl.Mesh.simulated({"dp": 4})
    n = size_mib * MIB // 4
    try:
        x = sl.shard(torch.randn(n, device="cuda"), mesh, sl.P("dp"))
        rows = []
        plain_bytes = None
        for label, kw in (("all-gather float32", {}), ("all-gather int8", {"comm_dtype": "int8"})):
            with sl.comm_ledger() as led:
                sl.reshard(x, sl.P(None), **kw)
            nbytes = led.total_bytes()
            ms = _cuda_ms(lambda kw=kw: sl.reshard(x, sl.P(None), **kw), reps)
            plain_bytes = plain_bytes or nbytes
            rows.append((label, ms, float("nan"), f"{nbytes / plain_bytes:.3f}x ledger bytes"))
        return rows
    except Exception as exc:  # the simulated mesh on CUDA, or comm_dtype, is not there
        return [("all-gather int8 vs float32", float("nan"), float("nan"), f"not run: {exc}")]


def print_gpu_table(rows: list[tuple[str, float, float, str]], size_mib: int) -> None:
    print(f"# {torch.cuda.get_device_name()}, {size_mib} MiB float32, CUDA-event medians")
    header = f"{'kernel':<32}{'ms':>10}{'GB/s':>10}  note"
    print(header)
    print("-" * len(header))
    for name, ms, gbs, note in rows:
        print(f"{name:<32}{ms:>10.3f}{gbs:>10.1f}  {note}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--archs", nargs="+", default=["sm_80", "sm_90"])
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.reps < 1:
        raise SystemExit("--size-mib and --reps must be >= 1")
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# python benchmarks/kernels.py {shown}".rstrip())
    print(f"# torch {torch.__version__}, python {sys.version.split()[0]}")
    print_compile_table(compile_rows(args.archs, args.reps))
    print()
    if not sl.cuda.available():
        print(f"GPU part not run: it needs a CUDA GPU and driver ({sl.cuda.gpu_problem()}).")
        print(f"On a GPU it would run, at {args.size_mib} MiB, {args.reps} repeats:")
        for item in GPU_PLAN:
            print(f"  - {item}")
        return
    print_gpu_table(gpu_rows(args.size_mib, args.reps), args.size_mib)


if __name__ == "__main__":
    main()
