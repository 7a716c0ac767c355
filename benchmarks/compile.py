"""The GPT training step eager vs torch.compile: sharded (tp1d), plain, and hand-written Megatron.

On ``--ranks`` gloo ranks (one process per rank, one intra-op thread each,
loopback gloo, one ``sl.launch``) every variant runs in the same processes,
interleaved round-robin (barrier, step, barrier) so machine noise hits all
alike:

- shardlib tp1d: ``gpt.loss`` forward + backward of ``shardlib.nn.gpt`` under
  ``snn.tp1d("tp")`` (``snn.shard_params``, ``scheme.shard_batch``,
  ``snn.use``), then every gradient finished to its parameter's layout
  (benchmarks/schemes.py's `finish_grads`); compiled: the same ``gpt.loss``
  under ``torch.compile(fullgraph=True)`` (the backward is AOTAutograd's
  compiled one), the same finishing;
- plain: the unsharded model (``gpt.loss`` on plain tensors, every rank the
  whole model), eager and compiled;
- Megatron: hand-written Megatron (benchmarks/_megatron_ref.py's
  `MegatronGPT`: per-rank tp shards, explicit ``torch.distributed``
  collectives as autograd Functions), eager and compiled (dynamo turns its
  in-place collectives into functional ones; its byte counter is switched off
  for the compiled run, whose Python side effects would break the graph).

Then the simulated mesh (``--sim-tp``, default 4 devices in this process, one
thread): shardlib tp1d and the plain model, eager and compiled.

Columns: median ms of a step (after the first and ``--warmup`` more; each
rank's median, the slowest rank's reported), the first call's seconds (the
compiled variants compile there), compiled/eager, and for the compiled tp1d
step its ratio to the compiled Megatron step (goal: within 5%, i.e. <=
1.05x); last the loss, checked against the unsharded model's before the table
prints. ``--backend`` picks the compile backend (inductor by default;
aot_eager compiles faster and runs the traced aten graph as is).

    python benchmarks/compile.py [--ranks 4] [--steps 5] [--warmup 1] [--backend inductor]
        [--dim 256 --heads 8 --layers 2 --seq 128 --batch 4 --vocab 1024] [--sim-tp 4]
        [--skip-gloo] [--skip-sim] [--skip-megatron]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

if __package__ in (None, ""):  # run as a script: benchmarks/ is not a package on the path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _megatron_ref as ref
    from _gpt_args import add_model_args, check_losses, model_config, model_flags
    from schemes import finish_grads, make_batch
else:
    from . import _megatron_ref as ref
    from ._gpt_args import add_model_args, check_losses, model_config, model_flags
    from .schemes import finish_grads, make_batch

VARIANTS = ("tp1d", "plain", "megatron")


# == the variants ====================================================================
class _Variant:
    """A step (forward + backward + gradients finished) in eager and in compiled form."""

    label: str

    def step(self, compiled: bool) -> float:
        raise NotImplementedError


class _Sharded(_Variant):
    def __init__(self, config, params, batch, mesh, backend: str):
        self.mesh, self.scheme, self.config = mesh, snn.tp1d("tp"), config
        self.params = snn.shard_params(params, mesh, self.scheme, gpt.DIMS(config))
        for v in self.params.values():
            v.requires_grad_()
        self.batch = self.scheme.shard_batch(batch, mesh)
        self.loss = {False: self._loss, True: _compile(self._loss, backend)}
        self.label = f"shardlib {self.scheme!r} {mesh.axes}"

    def _loss(self, params, batch):
        return gpt.loss(params, batch, self.config)

    def step(self, compiled: bool) -> float:
        for v in self.params.values():
            v.grad = None
        with snn.use(self.scheme, self.mesh):
            loss = self.loss[compiled](self.params, self.batch)
            loss.backward()
        finish_grads(self.params.values())
        return float(loss.detach().full())


class _Plain(_Variant):
    def __init__(self, config, params, batch, backend: str):
        self.config, self.batch = config, batch
        self.params = {k: v.clone().requires_grad_() for k, v in params.items()}
        self.loss = {False: self._loss, True: _compile(self._loss, backend)}
        self.label = "plain (unsharded model)"

    def _loss(self, params, batch):
        return gpt.loss(params, batch, self.config)

    def step(self, compiled: bool) -> float:
        for v in self.params.values():
            v.grad = None
        loss = self.loss[compiled](self.params, self.batch)
        loss.backward()
        return float(loss.detach())


class _QuietSent(ref._Sent):
    """Megatron's byte counter with the counting off (a compiled graph has no Python side
    effects; the bytes are benchmarks/schemes.py's business)."""

    def all_reduce(self, t: torch.Tensor) -> None:
        pass

    def gather(self, t: torch.Tensor) -> None:
        pass

    def scatter(self, t: torch.Tensor) -> None:
        pass


class _Megatron(_Variant):
    def __init__(self, config, params, batch, backend: str):
        self.models = {c: ref.MegatronGPT(config, params) for c in (False, True)}
        self.models[True].sent = _QuietSent(self.models[True].p)
        self.batch = batch
        self.loss = {
            False: self.models[False].loss,
            True: _compile(self.models[True].loss, backend),
        }
        self.label = "hand-written Megatron"

    def step(self, compiled: bool) -> float:
        model = self.models[compiled]
        model.zero_grads()
        loss = self.loss[compiled](self.batch["tokens"], self.batch["targets"])
        loss.backward()
        model.finish_grads()
        return float(loss.detach())


def _compile(fn: Callable, backend: str) -> Callable:
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)


@dataclass
class Measured:
    """One variant (eager or compiled) on one rank or the simulated mesh."""

    first_s: float
    times_s: list[float]
    loss: float


def _measure(
    steps: dict[str, Callable[[], float]], n: int, warmup: int, sync: Callable[[], None]
) -> dict[str, Measured]:
    """First call, `warmup` untimed rounds, then `n` timed rounds, all variants interleaved."""

    def timed(fn) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        loss = fn()
        sync()
        return time.perf_counter() - t0, loss

    first = {name: timed(fn) for name, fn in steps.items()}
    for _ in range(warmup):
        for fn in steps.values():
            timed(fn)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, fn in steps.items():
            times[name].append(timed(fn)[0])
    return {name: Measured(first[name][0], times[name], first[name][1]) for name in steps}


def _quiet() -> None:
    import logging
    import warnings

    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)


def bench_rank(mesh, spec: dict) -> dict[str, tuple[str, Measured]]:
    """Every variant of `spec`, eager and compiled, on this gloo rank."""
    import torch.distributed as dist

    _quiet()
    config = gpt.Config(**spec["config"])
    params = gpt.init(config)
    batch = make_batch(config, spec["batch"], config.seq)
    backend = spec["backend"]
    made: dict[str, _Variant] = {"tp1d": _Sharded(config, params, batch, mesh, backend)}
    made["plain"] = _Plain(config, params, batch, backend)
    if "megatron" in spec["variants"]:
        made["megatron"] = _Megatron(config, params, batch, backend)
    return _run_variants(made, spec, dist.barrier)


def _run_variants(made: dict[str, _Variant], spec: dict, sync) -> dict[str, tuple[str, Measured]]:
    steps = {}
    for name, v in made.items():
        steps[f"{name}/eager"] = lambda v=v: v.step(False)
        steps[f"{name}/compiled"] = lambda v=v: v.step(True)
    measured = _measure(steps, spec["steps"], spec["warmup"], sync)
    return {key: (made[key.split("/")[0]].label, m) for key, m in measured.items()}


def bench_simulated(
    config, batch_size: int, tp: int, spec: dict
) -> dict[str, tuple[str, Measured]]:
    """tp1d on ``{tp: tp}`` simulated in this process, and the plain model, eager and compiled."""
    _quiet()
    mesh = sl.Mesh.simulated({"tp": tp})
    params = gpt.init(config)
    batch = make_batch(config, batch_size, config.seq)
    made: dict[str, _Variant] = {
        "tp1d": _Sharded(config, params, batch, mesh, spec["backend"]),
        "plain": _Plain(config, params, batch, spec["backend"]),
    }
    return _run_variants(made, spec, lambda: None)


# == the table =========================================================================
def _merge(per_rank: Sequence[dict]) -> dict[str, tuple[str, dict]]:
    """Per variant: the slowest rank's median and first call; rank 0's loss."""
    out = {}
    for key, (label, m0) in per_rank[0].items():
        ms = [r[key][1] for r in per_rank]
        out[key] = (
            label,
            {
                "first_s": max(m.first_s for m in ms),
                "median_s": max(statistics.median(m.times_s) for m in ms),
                "loss": m0.loss,
            },
        )
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(title: str, merged: dict) -> list[str]:
    head = (
        f"{'variant':<40}{'eager ms':>10}{'compiled ms':>13}{'comp/eager':>12}"
        f"{'first s (e/c)':>16}{'comp/Megatron comp':>20}{'loss':>9}"
    )
    lines = [title, head]
    meg = merged.get("megatron/compiled", (None, {}))[1].get("median_s")
    for name in VARIANTS:
        if f"{name}/eager" not in merged:
            continue
        label, e = merged[f"{name}/eager"]
        c = merged[f"{name}/compiled"][1]
        vs = _ratio(c["median_s"], meg) if name == "tp1d" else "-"
        first = f"{e['first_s']:.2f}/{c['first_s']:.1f}"
        lines.append(
            f"{label:<40.40}{e['median_s'] * 1e3:>10.1f}{c['median_s'] * 1e3:>13.1f}"
            f"{_ratio(c['median_s'], e['median_s']):>12}{first:>16}{vs:>20}{c['loss']:>9.4f}"
        )
    return lines


# == the command line ===================================================================
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4, help="gloo ranks (the tp degree, <= 8)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    add_model_args(ap, layers=2, seq=128, batch=4)
    ap.add_argument("--sim-tp", type=int, default=4, help="devices of the simulated tp1d mesh")
    ap.add_argument("--skip-gloo", action="store_true")
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--skip-megatron", action="store_true")
    args = ap.parse_args(argv)
    if not 1 <= args.ranks <= 8:
        ap.error(f"--ranks {args.ranks}: between 1 and 8 local gloo ranks")
    if args.sim_tp < 1:
        ap.error(f"--sim-tp {args.sim_tp}: a positive device count")
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps {args.steps} --warmup {args.warmup}: steps >= 1, warmup >= 0")
    return args


def command_line(args: argparse.Namespace) -> str:
    parts = [
        "python benchmarks/compile.py",
        f"--ranks {args.ranks} --steps {args.steps} --warmup {args.warmup}",
        f"--backend {args.backend}",
        f"{model_flags(args)} --sim-tp {args.sim_tp}",
    ]
    parts += [
        f"--{f}"
        for f in ("skip-gloo", "skip-sim", "skip-megatron")
        if getattr(args, f.replace("-", "_"))
    ]
    return " ".join(parts)


@dataclass
class Report:
    """What `main` printed (`lines`) and the merged rows of the gloo and simulated tables."""

    lines: list[str]
    gloo: dict[str, tuple[str, dict]] | None
    sim: dict[str, tuple[str, dict]] | None


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark, print the tables as they complete, return a `Report`."""
    args = parse_args(argv)
    config, cfg = model_config(args)
    want = ref.sanity_loss(config, gpt.init(config), make_batch(config, args.batch, args.seq))
    spec = {
        "config": cfg,
        "batch": args.batch,
        "backend": args.backend,
        "steps": args.steps,
        "warmup": args.warmup,
        "variants": [v for v in VARIANTS if not (args.skip_megatron and v == "megatron")],
    }
    report = Report([], None, None)

    def emit(new: list[str]) -> None:
        report.lines.extend(new)
        print("\n".join(new), flush=True)

    emit(
        [
            f"# {command_line(args)}",
            f"# torch {torch.__version__}, CPU, {os.cpu_count()} cores, 1 thread per rank, "
            f"torch.compile(backend={args.backend!r}, fullgraph=True, dynamic=False)",
            f"# model: {config}, batch {args.batch}, float32; unsharded loss {want:.4f}",
            "# ms: median step (forward+backward+gradients finished), slowest rank; first s: the",
            "# first call, eager/compiled (compiled: tracing and compiling); comp/Megatron comp: the",
            "# compiled tp1d step over the compiled hand-written Megatron step (goal <= 1.05x)",
            "",
        ]
    )
    if not args.skip_gloo:
        print(f"[compile.py] {args.ranks} gloo ranks ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        per_rank = sl.launch(bench_rank, {"tp": args.ranks}, args=(spec,), timeout=3600)
        report.gloo = _merge(per_rank)
        check_losses(report.gloo, want, f"{args.ranks} gloo ranks", "benchmarks/compile.py")
        table = format_table(
            f"{args.ranks} gloo ranks (tp1d on {{tp: {args.ranks}}}):", report.gloo
        )
        emit([*table, f"({time.perf_counter() - t0:.0f} s)", ""])
    if not args.skip_sim:
        print(f"[compile.py] simulated {{tp: {args.sim_tp}}} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        report.sim = _merge([bench_simulated(config, args.batch, args.sim_tp, spec)])
        check_losses(report.sim, want, "simulated", "benchmarks/compile.py")
        title = f"simulated mesh (tp1d on {{tp: {args.sim_tp}}}, one process, one thread):"
        emit([*format_table(title, report.sim), f"({time.perf_counter() - t0:.0f} s)", ""])
    return report


if __name__ == "__main__":
    main()
