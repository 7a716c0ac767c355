"""The GPT training step per parallel scheme on gloo ranks, beside DTensor and hand-written Megatron.

For each rank count (``--ranks 4 8``, one process per rank, one intra-op
thread each, loopback gloo) one ``sl.launch`` runs every variant in the same
processes, interleaved round-robin (barrier, step, barrier) so machine noise
hits all alike:

- shardlib: ``gpt.loss`` forward + backward of ``shardlib.nn.gpt`` under each
  scheme (``snn.shard_params``, ``scheme.shard_batch``, ``snn.use``), then every
  gradient finished to its parameter's layout (the lazily partial gradients,
  e.g. replicated norm weights' or data parallel's, all-reduced together as a
  foreach optimizer step does: one flat buffer per group, as Megatron's norm
  gradients; `finish_grads`);
- DTensor: the same model as a torch ``nn.Module`` (benchmarks/_megatron_ref.py)
  under ``parallelize_module`` with ColwiseParallel/RowwiseParallel (vocab-split
  embedding and head, ``loss_parallel``), and with SequenceParallel for SP;
- Megatron: hand-written, plain per-rank tensors holding the tp shards and
  explicit ``torch.distributed`` collectives as autograd Functions (f/g, the
  SP all-gather/reduce-scatter pair, vocab-parallel cross-entropy);
- shardlib through ``sl.capture`` (``--capture``; by default tp1d and tp1d SP, the
  ``[sl.capture]`` rows): the same step function, recorded on its first call and
  replayed after: the same local ops and collectives (bytes, collective count and loss
  are the eager row's), without subclass dispatch, rule lookups or an autograd graph.

Columns: median ms of a step (after the first step and ``--warmup`` more;
each rank's median, the slowest rank's reported), the first step's time
(shardlib's layout decisions and plan caches are made there), ratios of
shardlib's tp1d (and tp1d SP) to Megatron and DTensor of the same flavour
(other schemes against the non-SP ones), the step's CPU time on its own
thread (``time.thread_time``; each rank's median, the largest reported) and
its ratios (the robust comparison on a small shared machine: with more ranks
than cores the wall time is mostly scheduling, and it inflates Python-heavy
steps more than BLAS-heavy ones), bytes sent per device forward and
backward (shardlib's ledger; the same ring-model formulas counted for
Megatron's collectives and for DTensor's ``_c10d_functional`` ops), the
step's peak memory per rank (see below), parameter bytes per rank, and the
loss (every variant's is checked against the unsharded model's before the
table prints).

Peak memory: over one extra untimed step, the high-water mark of the bytes
torch's CPU allocator handed out during the step and had not yet taken back
(every allocation and free of the step, from ``torch.profiler`` with
``profile_memory=True``). Memory live before the step (parameters, the
batch, the previous step's gradients) is not in it, nor are its frees, so
dropping old gradients never lowers the figure; the param column has the
parameters. Buffers gloo allocates outside torch are not counted. The
largest rank's figure is shown.

Reading it on a small machine: with more ranks than cores (8 ranks on 2
cores) every collective waits for the other ranks to be scheduled, so a
step's time follows its collective count (``colls``) more than its bytes;
cProfile one variant's steps on rank 0 with ``--profile PATH``. Eager tp1d
sends Megatron's collectives (counts and bytes) and copies; its gap to the
hand-written step is per-op ``__torch_dispatch__`` cost times the model's op
count (~100 subclass dispatches a step, forward and backward, since RMSNorm and
rotary are `sl.gufunc` nodes; ~300 before), most of it the floor any wrapper
subclass pays: ``benchmarks/dispatch.py`` attributes it.

Then the 1D TP goal's comparison at a compute-bound size (``--scale-dim 1024
--scale-heads 16 --scale-seq 256``, the other model flags as given; ``--skip-scale``
skips it): tp1d (and tp1d SP when asked for) beside the baselines, the same columns.
At the small default model a step is ~100 subclass dispatches of ~40 us each against
matmuls of tens of microseconds, so the table above measures per-op overhead; this one
measures what a training step at a realistic width pays for it.

Last, the 64-device simulated 3D step (``{i: 4, j: 4, k: 4}``,
``sl.Mesh.simulated``, this process, one thread): the first step (layout
decisions) and the median of the following steps; ``--batch3d`` sets its
batch (3D splits the batch 16 ways).

    python benchmarks/schemes.py [--ranks 4 8] [--steps 3] [--warmup 0] [--schemes tp1d,tp1d_sp]
        [--dim 256 --heads 8 --layers 2 --seq 128 --batch 4 --vocab 1024]
        [--baselines megatron,megatron_sp,dtensor,dtensor_sp] [--skip-dtensor] [--skip-megatron]
        [--skip-3d] [--steps3d 3 --batch3d 16] [--profile PATH]
        [--skip-scale] [--scale-dim 1024 --scale-heads 16 --scale-seq 256 --scale-steps 5]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

if __package__ in (None, ""):  # run as a script: benchmarks/ is not a package on the path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _megatron_ref as ref
    from _gpt_args import add_model_args, check_losses, model_config, model_flags
else:
    from . import _megatron_ref as ref
    from ._gpt_args import add_model_args, check_losses, model_config, model_flags

MiB = 2**20


# == the variants ====================================================================
def _square(n: int) -> int | None:
    q = math.isqrt(n)
    return q if q * q == n and q > 1 else None


def _cube(n: int) -> int | None:
    q = round(n ** (1 / 3))
    return q if q**3 == n and q > 1 else None


def _mesh_tp1d(p):
    return {"tp": p}


def _mesh_dp(p):
    return {"dp": p}


def _mesh_sp(p):
    return {"sp": p}


def _mesh_dp_tp(p):
    return {"dp": 2, "tp": p // 2} if p % 2 == 0 and p >= 4 else None


def _mesh_tp2d(p):
    q = _square(p)
    if q:
        return {"r": q, "c": q}
    q = _square(p // 2) if p % 2 == 0 else None
    return {"dp": 2, "r": q, "c": q} if q else None


def _mesh_tp2p5d(p):
    for d in range(2, p + 1):
        q = _square(p // d) if p % d == 0 else None
        if q:
            return {"d": d, "r": q, "c": q}
    return None


def _mesh_tp3d(p):
    q = _cube(p)
    return {"i": q, "j": q, "k": q} if q else None


def _scheme_tp2d(axes):
    s = snn.tp2d("r", "c")
    return snn.dp("dp") + s if "dp" in axes else s


# name -> (scheme from the mesh axes, mesh axes for P ranks or None where the scheme can't use P)
SCHEMES: dict[str, tuple[Callable[[dict], snn.Scheme], Callable[[int], dict | None]]] = {
    "tp1d": (lambda a: snn.tp1d("tp"), _mesh_tp1d),
    "tp1d_sp": (lambda a: snn.tp1d("tp", sequence=True), _mesh_tp1d),
    "dp": (lambda a: snn.dp("dp"), _mesh_dp),
    "fsdp": (lambda a: snn.fsdp("dp"), _mesh_dp),
    "dp+tp1d": (lambda a: snn.dp("dp") + snn.tp1d("tp"), _mesh_dp_tp),
    "tp2d": (_scheme_tp2d, _mesh_tp2d),
    "tp2p5d": (lambda a: snn.tp2p5d("d", "r", "c"), _mesh_tp2p5d),
    "tp3d": (lambda a: snn.tp3d("i", "j", "k"), _mesh_tp3d),
    "ulysses": (lambda a: snn.ulysses("sp"), _mesh_sp),
    "ring": (lambda a: snn.ring("sp"), _mesh_sp),
}
BASELINES = ("megatron", "megatron_sp", "dtensor", "dtensor_sp")


@dataclass
class Measured:
    """One variant on one rank."""

    first_s: float
    times_s: list[float]
    cpu_s: list[float]  # this rank's thread CPU time of each timed step (time.thread_time)
    fwd_bytes: float
    bwd_bytes: float
    collectives: int
    peak_bytes: int
    param_bytes: int
    loss: float


def make_batch(config: gpt.Config, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randint(0, config.vocab, (batch, seq), generator=g) for k in ("tokens", "targets")
    }


class _ShardlibVariant:
    def __init__(self, name: str, config, params, batch, ranks: int):
        build, axes_of = SCHEMES[name]
        axes = axes_of(ranks)
        self.mesh = sl.Mesh.distributed(axes)
        self.scheme = build(axes)
        self.config = config
        self.params = snn.shard_params(params, self.mesh, self.scheme, gpt.DIMS(config))
        for v in self.params.values():
            v.requires_grad_()
        self.batch = self.scheme.shard_batch(batch, self.mesh)
        self.label = f"{self.scheme!r} {axes}"

    def forward(self):
        for v in self.params.values():
            v.grad = None
        with snn.use(self.scheme, self.mesh):
            return gpt.loss(self.params, self.batch, self.config)

    def backward(self, loss) -> float:
        with snn.use(self.scheme, self.mesh):
            loss.backward()
        finish_grads(self.params.values())
        return float(loss.detach().full())

    def measure(self) -> tuple[float, float, int, int]:
        """One step's forward bytes, backward bytes (gradient finishing included), collectives
        and peak memory."""
        with PeakMemory() as pm:
            with sl.comm_ledger() as fwd:
                loss = self.forward()
            with sl.comm_ledger() as bwd:
                self.backward(loss)
        return fwd.total_bytes, bwd.total_bytes, len(fwd.records) + len(bwd.records), pm.peak

    def param_bytes(self) -> int:
        return ref.param_bytes(self.params.values())


class _CapturedVariant(_ShardlibVariant):
    """The same step as `_ShardlibVariant`'s, through `sl.capture`: recorded on the first
    call, replayed after (the same aten ops and collectives, no layout dispatch)."""

    def __init__(self, name: str, config, params, batch, ranks: int):
        super().__init__(name, config, params, batch, ranks)
        self.label += " [sl.capture]"
        self.step = sl.capture(train_step(self.scheme, self.mesh, config))

    def run(self) -> float:
        return float(self.step(self.params, self.batch).full())

    def measure(self) -> tuple[float, float, int, int]:
        with PeakMemory() as pm, sl.comm_ledger() as led:
            self.run()
        records = led.records
        first_bwd = next(
            (i for i, r in enumerate(records) if r.direction == "backward"), len(records)
        )
        fwd = sum(r.bytes for r in records[:first_bwd])
        return fwd, led.total_bytes - fwd, len(records), pm.peak


def train_step(scheme, mesh, config) -> Callable:
    """``step(params, batch) -> loss``: grads reset, forward and backward under `scheme`,
    gradients finished (`finish_grads`)."""

    def step(params, batch):
        for v in params.values():
            v.grad = None
        with snn.use(scheme, mesh):
            loss = gpt.loss(params, batch, config)
            loss.backward()
        finish_grads(params.values())
        return loss

    return step


def finish_grads(params) -> None:
    """Every gradient in its parameter's layout, as an optimizer needs it: the lazily partial
    ones that differ only by their partial axes (a replicated norm weight's under SP, data
    parallel's) reduced in place together, one all-reduce of a flat buffer per (partial
    axes, op, dtype) group (what a foreach optimizer step does; Megatron's one flat
    all-reduce of the norm gradients); any other one resharded."""
    from shardlib.ops._foreach import reduce_in_place

    lazy = [v.grad for v in params if v.grad.spec != v.spec and v.grad.spec.dims == v.spec.dims]
    reduce_in_place("grad_finish", lazy)
    for v in params:
        if v.grad.spec != v.spec:
            v.grad = sl.reshard(v.grad, v.spec)


class _MegatronVariant:
    def __init__(self, config, params, batch, sequence: bool):
        self.model = ref.MegatronGPT(config, params, sequence=sequence)
        self.batch = batch
        self.label = "hand-written Megatron-SP" if sequence else "hand-written Megatron"

    def forward(self):
        self.model.zero_grads()
        return self.model.loss(self.batch["tokens"], self.batch["targets"])

    def backward(self, loss) -> float:
        loss.backward()
        self.model.finish_grads()
        return float(loss)

    def measure(self) -> tuple[float, float, int, int]:
        sent = self.model.sent
        sent.bytes, sent.count = 0.0, 0
        with PeakMemory() as pm:
            loss = self.forward()
            fwd = sent.bytes
            self.backward(loss)
        return fwd, sent.bytes - fwd, sent.count, pm.peak

    def param_bytes(self) -> int:
        return ref.param_bytes(self.model.params.values())


class _DTensorVariant:
    def __init__(self, config, params, batch, sequence: bool):
        self.model = ref.dtensor_model(config, params, sequence=sequence)
        self.batch = batch
        self.label = "DTensor Colwise/Rowwise" + (" + SequenceParallel" if sequence else "")

    def step(self) -> float:
        return float(ref.dtensor_step(self.model, self.batch["tokens"], self.batch["targets"]))

    def measure(self) -> tuple[float, float, int, int]:
        import torch.distributed as dist

        with PeakMemory() as pm, ref.CommBytes(dist.get_world_size()) as counter:
            ref.dtensor_step(self.model, self.batch["tokens"], self.batch["targets"], counter)
        sent = counter.sent
        return counter.forward, sent - counter.forward, sum(counter.counts.values()), pm.peak

    def param_bytes(self) -> int:
        return ref.param_bytes(self.model.parameters())


def _step_of(v) -> Callable[[], float]:
    if isinstance(v, _DTensorVariant):
        return v.step
    if isinstance(v, _CapturedVariant):
        return v.run
    return lambda: v.backward(v.forward())


class PeakMemory:
    """``with PeakMemory() as pm:`` -> ``pm.peak``: the high-water mark, over the block, of the
    bytes torch's CPU allocator handed out inside it and had not taken back (torch.profiler
    ``profile_memory`` events; blocks allocated before it and their frees are not seen)."""

    def __enter__(self) -> PeakMemory:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        now = self.peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            now += e.nbytes()
            self.peak = max(self.peak, now)


def bench_rank(mesh, spec: dict) -> dict[str, tuple[str, Measured]]:
    """Every variant of `spec` on this rank, interleaved; per variant (label, Measured)."""
    import logging
    import warnings

    import torch.distributed as dist

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # no profiler start/stop lines per step
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")  # DTensor's experimental-API notices
    torch.set_num_threads(1)
    ranks = dist.get_world_size()
    config = gpt.Config(**spec["config"])
    params = gpt.init(config)
    batch = make_batch(config, spec["batch"], config.seq)
    variants = {}
    for name in spec["schemes"]:
        variants[name] = _ShardlibVariant(name, config, params, batch, ranks)
    for name in spec.get("captured", ()):
        variants[f"{name}+capture"] = _CapturedVariant(name, config, params, batch, ranks)
    for name in spec["baselines"]:
        sequence = name.endswith("_sp")
        if name.startswith("megatron"):
            variants[name] = _MegatronVariant(config, params, batch, sequence)
        else:
            variants[name] = _DTensorVariant(config, params, batch, sequence)
    steps = {name: _step_of(v) for name, v in variants.items()}

    def timed(fn) -> tuple[float, float, float]:
        """(wall seconds between barriers, this thread's CPU seconds in the step, loss)."""
        dist.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = fn()
        c1 = time.thread_time()
        dist.barrier()
        return time.perf_counter() - t0, c1 - c0, loss

    first, losses = {}, {}
    for name, fn in steps.items():
        first[name], _, losses[name] = timed(fn)
    for _ in range(spec["warmup"]):
        for fn in steps.values():
            timed(fn)
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(spec["steps"]):
        for name, fn in steps.items():
            wall, used, _ = timed(fn)
            times[name].append(wall)
            cpu[name].append(used)
    for name in spec.get("profile_variants", ()):
        if name not in steps:
            continue
        import cProfile

        profiler = cProfile.Profile()
        dist.barrier()
        profiler.enable()
        for _ in range(spec["profile_steps"]):
            timed(steps[name])
        profiler.disable()
        if dist.get_rank() == 0:
            profiler.dump_stats(f"{spec['profile']}.{name}")
    out = {}
    for name, v in variants.items():
        dist.barrier()
        fwd, bwd, n, peak = v.measure()
        dist.barrier()
        held = v.param_bytes()
        out[name] = (
            v.label,
            Measured(first[name], times[name], cpu[name], fwd, bwd, n, peak, held, losses[name]),
        )
    return out


# == the 64-device simulated 3D step ===================================================
def simulated_3d(
    config: gpt.Config, batch: int, steps: int, q: int = 4
) -> tuple[float, list[float], float]:
    """First step's seconds, the following steps' seconds, and the loss, on ``{i,j,k: q}``."""
    torch.set_num_threads(1)
    mesh = sl.Mesh.simulated({"i": q, "j": q, "k": q})
    scheme = snn.tp3d("i", "j", "k")
    params = snn.shard_params(gpt.init(config), mesh, scheme, gpt.DIMS(config))
    for v in params.values():
        v.requires_grad_()
    sbatch = scheme.shard_batch(make_batch(config, batch, config.seq), mesh)

    run = train_step(scheme, mesh, config)

    def step() -> float:
        return float(run(params, sbatch).detach().full())

    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, times, loss


# == the table =========================================================================
def _merge(per_rank: Sequence[dict]) -> dict[str, tuple[str, dict]]:
    """Per variant: slowest rank's median and first step, the largest peak, rank 0's bytes."""
    out = {}
    for name, (label, m0) in per_rank[0].items():
        ms = [r[name][1] for r in per_rank]
        out[name] = (
            label,
            {
                "first_s": max(m.first_s for m in ms),
                "median_s": max(statistics.median(m.times_s) for m in ms),
                "cpu_s": max(statistics.median(m.cpu_s) for m in ms),
                "fwd": m0.fwd_bytes,
                "bwd": m0.bwd_bytes,
                "colls": m0.collectives,
                "peak": max(m.peak_bytes for m in ms),
                "params": max(m.param_bytes for m in ms),
                "loss": m0.loss,
            },
        )
    return out


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def format_table(ranks: int, merged: dict) -> list[str]:
    head = (
        f"{'variant':<44}{'ms':>9}{'first s':>9}{'/Megatron':>11}{'/DTensor':>10}"
        f"{'cpu ms':>8}{'cpu/Meg':>9}{'cpu/DT':>8}"
        f"{'fwd MiB':>9}{'bwd MiB':>9}{'colls':>7}{'peak MiB':>10}{'param MiB':>11}{'loss':>9}"
    )
    lines = [f"{ranks} gloo ranks:", head]
    base = {name: merged[name][1] for name in BASELINES if name in merged}
    for name, (label, m) in merged.items():
        scheme = name.removesuffix("+capture")
        sp = scheme.endswith("_sp")
        meg = dt = {}
        if scheme in SCHEMES:
            meg = base.get("megatron_sp" if sp else "megatron", {})
            dt = base.get("dtensor_sp" if sp else "dtensor", {})
        fwd, bwd = f"{m['fwd'] / MiB:.2f}", f"{m['bwd'] / MiB:.2f}"
        lines.append(
            f"{label:<44.44}{m['median_s'] * 1e3:>9.1f}{m['first_s']:>9.2f}"
            f"{_ratio(m['median_s'], meg.get('median_s')):>11}"
            f"{_ratio(m['median_s'], dt.get('median_s')):>10}"
            f"{m['cpu_s'] * 1e3:>8.1f}{_ratio(m['cpu_s'], meg.get('cpu_s')):>9}"
            f"{_ratio(m['cpu_s'], dt.get('cpu_s')):>8}"
            f"{fwd:>9}{bwd:>9}{m['colls']:>7}{m['peak'] / MiB:>10.2f}{m['params'] / MiB:>11.2f}"
            f"{m['loss']:>9.4f}"
        )
    return lines


def _batch_split(name: str, ranks: int) -> int:
    """How many ways scheme `name` splits the batch on `ranks` ranks."""
    build, axes_of = SCHEMES[name]
    axes = axes_of(ranks)
    split = build(axes).act_layout(("batch", "seq", "embed")).dims[0]
    return math.prod(axes[a] for a in split)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8], help="gloo rank counts (<= 8)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps after the first")
    ap.add_argument(
        "--schemes",
        default="tp1d,tp1d_sp,dp,fsdp,tp2d,tp2p5d,tp3d,ulysses,ring",
        help=f"comma-separated subset of {','.join(SCHEMES)}",
    )
    add_model_args(ap, layers=2, seq=128, batch=4)
    ap.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma-separated subset of {','.join(BASELINES)}",
    )
    ap.add_argument(
        "--capture",
        default=None,
        help="comma-separated schemes (of --schemes) also timed through sl.capture (the step "
        "recorded once, replayed after); default: tp1d and tp1d_sp where in --schemes; '' "
        "for none",
    )
    ap.add_argument("--skip-dtensor", action="store_true")
    ap.add_argument("--skip-megatron", action="store_true")
    ap.add_argument("--skip-3d", action="store_true", help="skip the 64-device simulated 3D step")
    ap.add_argument("--steps3d", type=int, default=3)
    ap.add_argument("--batch3d", type=int, default=16)
    ap.add_argument(
        "--profile",
        default=None,
        help="cProfile rank 0's steps of --profile-variants (after the timed ones) "
        "into PROFILE.<variant>",
    )
    ap.add_argument(
        "--skip-scale",
        action="store_true",
        help="skip the tp1d/Megatron/DTensor comparison at the compute-bound size",
    )
    ap.add_argument("--scale-dim", type=int, default=1024)
    ap.add_argument("--scale-heads", type=int, default=16)
    ap.add_argument("--scale-seq", type=int, default=256)
    ap.add_argument("--scale-steps", type=int, default=5)
    ap.add_argument("--profile-variants", default="tp1d,megatron")
    ap.add_argument("--profile-steps", type=int, default=3)
    args = ap.parse_args(argv)
    names = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in names if s not in SCHEMES]
    if unknown:
        ap.error(f"--schemes: unknown {unknown}; choose from {','.join(SCHEMES)}")
    bases = [s for s in args.baselines.split(",") if s]
    unknown = [s for s in bases if s not in BASELINES]
    if unknown:
        ap.error(f"--baselines: unknown {unknown}; choose from {','.join(BASELINES)}")
    args.baseline_names = [
        b
        for b in bases
        if not (args.skip_dtensor and b.startswith("dtensor"))
        and not (args.skip_megatron and b.startswith("megatron"))
    ]
    if any(r < 1 or r > 8 for r in args.ranks):
        ap.error(f"--ranks {args.ranks}: between 1 and 8 local gloo ranks")
    args.scheme_names = names
    if args.capture is None:
        args.capture = ",".join(s for s in ("tp1d", "tp1d_sp") if s in names)
    captured = [s for s in args.capture.split(",") if s]
    unknown = [s for s in captured if s not in names]
    if unknown:
        ap.error(f"--capture: {unknown} not in --schemes ({','.join(names)})")
    args.captured_names = captured
    return args


def command_line(args: argparse.Namespace) -> str:
    parts = [
        "python benchmarks/schemes.py",
        f"--ranks {' '.join(map(str, args.ranks))}",
        f"--steps {args.steps} --warmup {args.warmup}",
        f"--schemes {','.join(args.scheme_names)} --baselines {','.join(args.baseline_names)}",
        f"--capture '{','.join(args.captured_names)}'",
        model_flags(args),
    ]
    if args.skip_3d:
        parts.append("--skip-3d")
    if not args.skip_3d:
        parts.append(f"--steps3d {args.steps3d} --batch3d {args.batch3d}")
    if args.skip_scale:
        parts.append("--skip-scale")
    else:
        parts.append(
            f"--scale-dim {args.scale_dim} --scale-heads {args.scale_heads} "
            f"--scale-seq {args.scale_seq} --scale-steps {args.scale_steps}"
        )
    if args.profile:
        parts.append(
            f"--profile {args.profile} --profile-steps {args.profile_steps} "
            f"--profile-variants {args.profile_variants}"
        )
    return " ".join(parts)


@dataclass
class Report:
    """What `main` printed (`lines`), per rank count the merged rows, and the 3D step."""

    lines: list[str]
    tables: dict[int, dict[str, tuple[str, dict]]]
    sim3d: dict[str, float] | None
    scale: dict[int, dict[str, tuple[str, dict]]] = field(default_factory=dict)


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark, print the table (each rank count's as it completes), return a `Report`."""
    args = parse_args(argv)
    config, cfg = model_config(args)
    want = ref.sanity_loss(config, gpt.init(config), make_batch(config, args.batch, args.seq))
    report = Report([], {}, None)

    def emit(new: list[str]) -> None:
        report.lines.extend(new)
        print("\n".join(new), flush=True)

    emit(
        [
            f"# {command_line(args)}",
            f"# torch {torch.__version__}, CPU, {os.cpu_count()} cores, 1 thread per rank, gloo loopback",
            f"# model: {config}, batch {args.batch}, float32; unsharded loss {want:.4f}",
            "# ms: median step (forward+backward+gradients finished), slowest rank; first s: first step;",
            "# cpu ms: median CPU time of the step's own thread (time.thread_time: what the step",
            "# computes, without the time spent descheduled or waiting for peers; gloo's threads are",
            "# not in it), largest rank; the wall ratios follow it, amplified, when ranks outnumber cores;",
            "# fwd/bwd MiB: bytes sent per device (ring model: shardlib's ledger, the same formulas for the",
            "# references' collectives); colls: collectives per step; peak MiB: high-water mark of",
            "# the bytes torch's CPU allocator handed out in one step, not yet freed (torch.profiler",
            "# profile_memory), largest rank; param MiB: parameters per rank",
            "",
        ]
    )
    for ranks in args.ranks:
        names = [n for n in args.scheme_names if SCHEMES[n][1](ranks) is not None]
        baselines = args.baseline_names
        spec = {
            "config": cfg,
            "batch": args.batch,
            "schemes": names,
            "captured": [n for n in args.captured_names if n in names],
            "baselines": baselines,
            "steps": args.steps,
            "warmup": args.warmup,
            "profile": args.profile,
            "profile_steps": args.profile_steps,
            "profile_variants": args.profile_variants.split(",") if args.profile else (),
        }
        print(
            f"[schemes.py] {ranks} ranks: {', '.join(names + baselines)} ...",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.perf_counter()
        per_rank = sl.launch(bench_rank, {"tp": ranks}, args=(spec,), timeout=3600)
        merged = _merge(per_rank)
        check_losses(merged, want, f"{ranks} ranks", "benchmarks/schemes.py")
        report.tables[ranks] = merged
        skipped = [n for n in args.scheme_names if n not in names]
        table = format_table(ranks, merged)
        if skipped:
            table.append(f"(not on {ranks} ranks: {', '.join(skipped)}: no mesh of that size fits)")
        uneven = [n for n in names if args.batch % _batch_split(n, ranks)]
        if uneven:
            table.append(
                f"(batch {args.batch} is split unevenly by {', '.join(uneven)} "
                f"({', '.join(str(_batch_split(n, ranks)) for n in uneven)} ways): some ranks "
                "hold no tokens; --batch a multiple for a balanced run)"
            )
        emit([*table, f"({time.perf_counter() - t0:.0f} s)", ""])
    if not args.skip_scale:
        _scale_section(args, emit, report)
    if not args.skip_3d:
        print("[schemes.py] 64-device simulated 3D step ...", file=sys.stderr, flush=True)
        first, times, loss = simulated_3d(config, args.batch3d, args.steps3d)
        want3 = ref.sanity_loss(
            config, gpt.init(config), make_batch(config, args.batch3d, args.seq)
        )
        if not abs(loss - want3) <= 1e-4 * max(1.0, abs(want3)):
            raise AssertionError(
                f"benchmarks/schemes.py: the simulated 3D loss {loss} differs from the unsharded "
                f"model's {want3} by more than 1e-4 relative"
            )
        median = statistics.median(times)
        report.sim3d = {"first_s": first, "median_s": median, "loss": loss}
        emit(
            [
                f"64-device simulated 3D step (tp3d on {{i: 4, j: 4, k: 4}}, batch {args.batch3d}, "
                f"one process, one thread): median {median:.2f} s of {len(times)} steps; "
                f"first step {first:.2f} s (layout decisions, plan caches, lazy imports: "
                f"~{first - median:.2f} s over a step); loss {loss:.4f}"
            ]
        )
    return report


def _scale_section(args: argparse.Namespace, emit, report: Report) -> None:
    """tp1d (and SP) beside Megatron and DTensor on a model whose matmuls, not the per-op
    overhead, set the step time: the goal's comparison (the small model above is dominated
    by the ~100 subclass dispatches a step, ~40 us each, mostly the floor of any wrapper
    subclass)."""
    scaled = {"dim": args.scale_dim, "heads": args.scale_heads, "seq": args.scale_seq}
    config, cfg = model_config(argparse.Namespace(**{**vars(args), **scaled}))
    want = ref.sanity_loss(config, gpt.init(config), make_batch(config, args.batch, config.seq))
    emit([f"# the 1D TP goal at a compute-bound size: {config}, batch {args.batch}", ""])
    names = [n for n in ("tp1d", "tp1d_sp") if n in args.scheme_names] or ["tp1d"]
    for ranks in args.ranks:
        spec = {
            "config": cfg,
            "batch": args.batch,
            "schemes": names,
            "captured": [n for n in args.captured_names if n in names],
            "baselines": args.baseline_names,
            "steps": args.scale_steps,
            "warmup": 1,
        }
        print(f"[schemes.py] scale, {ranks} ranks ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        merged = _merge(sl.launch(bench_rank, {"tp": ranks}, args=(spec,), timeout=3600))
        check_losses(merged, want, f"scale, {ranks} ranks", "benchmarks/schemes.py")
        report.scale[ranks] = merged
        emit([*format_table(ranks, merged), f"({time.perf_counter() - t0:.0f} s)", ""])


if __name__ == "__main__":
    main()
