"""The AdamW step beside torch.optim.AdamW, and ZeRO's bytes and memory against the formulas.

Part 1, the optimizer step (``--ranks 1 4``: one ``sl.launch`` per rank count,
one process per rank, one intra-op thread each, loopback gloo). The parameters
are ``shardlib.nn.gpt``'s at the configured size (many tensors of mixed
shapes) in their ``snn.dp("dp") + snn.tp1d("tp")`` layouts on ``{dp: 2, tp:
P/2}`` (``{dp: 1, tp: P}`` where P is odd or 2): column-split, row-split and
replicated tensors side by side. The gradients are fixed random tensors in
the parameters' layouts (what ``z.reduce`` hands an optimizer), the same every
step. Variants, run in the same processes, interleaved round-robin (barrier,
step) so machine noise hits all alike:

- ``plain``: ``torch.optim.AdamW(foreach=True)`` on plain tensors, each this
  rank's local blocks (the same shapes and element count as the sharded ones);
- ``plain_fused``: ``torch.optim.AdamW(fused=True)`` on the same plain tensors
  (torch's one-pass kernel, which sl.optim's Adam runs on float32 blocks);
- ``shardlib``: ``sl.optim.adamw``'s ``update`` then ``sl.optim.apply_updates``
  on ShardedTensors (functional: new moments and parameters every step);
- ``shardlib_donated``: the same two calls with the state and the parameters
  donated (``tx.update(grads, sl.optim.donate(state), params)``,
  ``sl.optim.apply_updates(sl.optim.donate(params), updates)``: written in place);
- ``shardlib_step``: ``sl.optim.step(tx, grads, state, params, donate=True)``
  (update and apply fused: one kernel pass, nothing allocated);
- ``torch_sharded``: ``torch.optim.AdamW(foreach=True)`` on ShardedTensor
  parameters (shardlib's ``_foreach_*`` rules, shardlib/ops/_foreach.py);
- ``dtensor``: ``torch.optim.AdamW(foreach=True)`` on DTensor parameters of
  the same placements (``torch.distributed.tensor``; DTensor issue #109477
  reports ~9x slower than plain tensors).

Columns: median ms of a step (each rank's median over ``--steps`` after the
first step and ``--warmup`` more, the slowest rank's), ns per LOCAL element
(the rank's elements, not the global ones), and that figure's ratio to
``plain`` (issue 8's goal: ``shardlib`` within 1.5x). After the timed steps
every variant's parameters are checked against ``plain``'s (the same
arithmetic, float32: atol 1e-6 + rtol 1e-5), so the rows time the same computation.

Part 2, ZeRO stages 0-3 on ``{dp: N}`` (``--zero-ranks 4``; simulated in this
process, and on N gloo ranks in the launch whose rank count is N): GPT under
``snn.dp("dp")``, ``z = sl.optim.zero(stage)``, ``sl.optim.adamw``, one
DESIGN §9 step (place, compute under ``sl.remat_saves()``, backward, reduce,
update, apply, place). Per device:

- ZeRO bytes per step from the ledger (records caused by ``zero.*`` and
  ``regather``) against 2Ψ(N−1)/N at stages 0–2 and 3Ψ(N−1)/N at stage 3
  (Ψ the fp32 parameter bytes); ``other B``: the rest of the step's ledger
  (the loss's all-reduce);
- optimizer-state bytes (AdamW's mu and nu, local blocks) against Ψ_state/N
  (Ψ_state = 2Ψ; Ψ_state at stage 0);
- model bytes: stored parameters + gradients as backward left them + state,
  local blocks, against the ZeRO paper's per-device model memory stated for
  fp32 AdamW (parameters 4, gradients 4, K = 8 bytes per element for mu and
  nu: no separate master copy), i.e. in Ψ = 4 bytes/element units
  stage 0 Ψ+Ψ+2Ψ, stage 1 Ψ+Ψ+2Ψ/N, stage 2 Ψ+(Ψ+2Ψ)/N, stage 3 (Ψ+Ψ+2Ψ)/N;
- peak per rank (gloo only; simulated devices share one process): the bytes
  live at the step's start (parameters, state; local blocks) plus the
  high-water mark of what torch's CPU allocator handed out during the step
  and had not taken back (``PeakMemory`` of benchmarks/schemes.py: every
  allocation and free of the step, from ``torch.profiler``), largest rank.
  It includes activations and the functional optimizer's new moments and
  parameters, allocated while the old ones are alive;
- ms per step (median of ``--zero-steps``; gloo: slowest rank) and the loss
  (the first step's is checked against the unsharded model's, and every
  stage's last loss against stage 0's: ZeRO changes no number).

    python benchmarks/optim.py [--ranks 1 4] [--steps 20] [--warmup 3]
        [--variants plain,plain_fused,shardlib,shardlib_donated,shardlib_step,torch_sharded,dtensor]
        [--dim 256 --heads 8 --layers 4 --vocab 1024 --mlp M --kv-heads K]
        [--zero-ranks 4] [--stages 0,1,2,3] [--seq 64 --batch 8] [--zero-steps 3]
        [--zero-on simulated,gloo] [--skip-optim] [--skip-zero]
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
from typing import Any

import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

if __package__ in (None, ""):  # run as a script: benchmarks/ is not a package on the path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gpt_args import add_model_args, model_config, model_flags
    from schemes import PeakMemory
else:
    from ._gpt_args import add_model_args, model_config, model_flags
    from .schemes import PeakMemory

MiB = 2**20
VARIANTS = (
    "plain",
    "plain_fused",
    "shardlib",
    "shardlib_donated",
    "shardlib_step",
    "torch_sharded",
    "dtensor",
)
ZERO_ON = ("simulated", "gloo")
LABELS = {
    "plain": "torch AdamW(foreach) on plain tensors",
    "plain_fused": "torch AdamW(fused) on plain tensors",
    "shardlib": "sl.optim.adamw update + apply_updates",
    "shardlib_donated": "  the same, state and params donated",
    "shardlib_step": "sl.optim.step(adamw, donate=True)",
    "torch_sharded": "torch AdamW(foreach) on ShardedTensors",
    "dtensor": "torch AdamW(foreach) on DTensor",
}
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 1e-2
ATOL, RTOL = 1e-6, 1e-5  # every variant's parameters against plain's after the timed steps
STATE_BYTES_PER_ELEMENT = 8  # K for fp32 AdamW: mu and nu, 4 bytes each


# == shared helpers ===================================================================
def optim_axes(ranks: int) -> dict[str, int]:
    """The dp x tp mesh of the optimizer-step part for `ranks` processes."""
    if ranks % 2 == 0 and ranks >= 4:
        return {"dp": 2, "tp": ranks // 2}
    return {"dp": 1, "tp": ranks}


def device_bytes(tree: Any) -> list[int]:
    """Per local device of the trees' mesh, the bytes of the tensors' local blocks."""
    out: list[int] = []
    for t in torch.utils._pytree.tree_leaves(tree):
        if isinstance(t, sl.ShardedTensor):
            blocks = t.local_shards()
        elif isinstance(t, torch.Tensor):
            blocks = [t]
        else:
            continue
        if len(out) < len(blocks):
            out += [0] * (len(blocks) - len(out))
        for j, b in enumerate(blocks):
            out[j] += b.numel() * b.element_size()
    return out


def _local_numel(params: dict[str, sl.ShardedTensor]) -> int:
    return sum(p.local_shards()[0].numel() for p in params.values())


# == part 1: the optimizer step ======================================================
def _dtensor_placements(layout: sl.P, axis_names: Sequence[str]) -> list:
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for a in axis_names:
        dims = [d for d, axes in enumerate(layout.dims) if a in axes]
        if not dims:
            out.append(Replicate())
        elif len(layout.dims[dims[0]]) > 1:
            raise ValueError(
                f"benchmarks/optim.py: layout {layout!r} splits dim {dims[0]} over several axes; "
                "the DTensor variant maps one mesh axis to one Shard(dim). Use a scheme whose "
                "parameters split each dim over at most one axis (dp + tp1d)."
            )
        else:
            out.append(Shard(dims[0]))
    return out


class _Plain:
    """torch.optim.AdamW(foreach=True) on plain tensors: this rank's local blocks."""

    fused = False

    def __init__(self, params: dict, grads: dict, mesh: Any) -> None:
        self.params = [
            p.local_shards()[0].detach().clone().requires_grad_() for p in params.values()
        ]
        for p, g in zip(self.params, grads.values()):
            p.grad = g.local_shards()[0].clone()
        kind = {"fused": True} if self.fused else {"foreach": True}
        self.opt = torch.optim.AdamW(
            self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kind
        )

    def step(self) -> None:
        self.opt.step()

    def local(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.params]


class _Shardlib:
    """sl.optim.adamw: ``update`` then ``apply_updates`` (functional)."""

    def __init__(self, params: dict, grads: dict, mesh: Any) -> None:
        self.tx = sl.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
        self.params = {k: p.detach() for k, p in params.items()}
        self.grads = grads
        self.state = self.tx.init(self.params)

    def step(self) -> None:
        updates, self.state = self.tx.update(self.grads, self.state, self.params)
        self.params = sl.optim.apply_updates(self.params, updates)

    def local(self) -> list[torch.Tensor]:
        return [p.local_shards()[0] for p in self.params.values()]


class _PlainFused(_Plain):
    """torch.optim.AdamW(fused=True) on plain tensors: this rank's local blocks."""

    fused = True


def _own_copy(params: dict) -> dict:
    """ShardedTensors with blocks of their own (a donated step writes into its parameters)."""
    return {
        k: sl.from_local([s.clone() for s in p.local_shards()], p.mesh, p.spec, tuple(p.shape))
        for k, p in params.items()
    }


class _ShardlibDonated(_Shardlib):
    """sl.optim.adamw's two calls with the state and the parameters donated."""

    def __init__(self, params: dict, grads: dict, mesh: Any) -> None:
        super().__init__(_own_copy(params), grads, mesh)

    def step(self) -> None:
        donate = sl.optim.donate
        updates, self.state = self.tx.update(self.grads, donate(self.state), self.params)
        self.params = sl.optim.apply_updates(donate(self.params), updates)


class _ShardlibStep(_Shardlib):
    """sl.optim.step(adamw, donate=True): update and apply fused, in place."""

    def __init__(self, params: dict, grads: dict, mesh: Any) -> None:
        super().__init__(_own_copy(params), grads, mesh)

    def step(self) -> None:
        self.params, self.state = sl.optim.step(
            self.tx, self.grads, self.state, self.params, donate=True
        )


class _TorchOnSharded:
    """torch.optim.AdamW(foreach=True) on ShardedTensor parameters (the _foreach rules)."""

    def __init__(self, params: dict, grads: dict, mesh: Any) -> None:
        self.params = [p.detach().clone().requires_grad_() for p in params.values()]
        for p, g in zip(self.params, grads.values()):
            p.grad = g.clone()
        self.opt = torch.optim.AdamW(
            self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=True
        )

    def step(self) -> None:
        self.opt.step()

    def local(self) -> list[torch.Tensor]:
        return [p.detach().local_shards()[0] for p in self.params]


class _DTensor:
    """torch.optim.AdamW(foreach=True) on DTensor parameters of the same placements."""

    def __init__(self, params: dict, grads: dict, mesh: Any) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        names = tuple(mesh.axis_names)
        dmesh = init_device_mesh(
            "cpu", tuple(mesh.abstract.axis_size(a) for a in names), mesh_dim_names=names
        )

        def dt(t: sl.ShardedTensor, requires_grad: bool) -> Any:
            shape = tuple(t.shape)
            stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
            local = t.detach().local_shards()[0].clone()
            out = DTensor.from_local(
                local,
                dmesh,
                _dtensor_placements(t.spec, names),
                run_check=False,
                shape=shape,
                stride=stride,
            )
            return out.requires_grad_() if requires_grad else out

        self.params = [dt(p, True) for p in params.values()]
        for p, g in zip(self.params, grads.values()):
            p.grad = dt(g, False)
        self.opt = torch.optim.AdamW(
            self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=True
        )

    def step(self) -> None:
        self.opt.step()

    def local(self) -> list[torch.Tensor]:
        return [p.detach().to_local() for p in self.params]


OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "plain": _Plain,
    "plain_fused": _PlainFused,
    "shardlib": _Shardlib,
    "shardlib_donated": _ShardlibDonated,
    "shardlib_step": _ShardlibStep,
    "torch_sharded": _TorchOnSharded,
    "dtensor": _DTensor,
}


def optim_params(mesh: Any, config: gpt.Config) -> tuple[dict, dict]:
    """GPT's parameters in their dp+tp1d layouts on `mesh`, and fixed random gradients."""
    scheme = snn.dp("dp") + snn.tp1d("tp")
    raw = gpt.init(config)
    params = snn.shard_params(raw, mesh, scheme, gpt.DIMS(config))
    g = torch.Generator().manual_seed(7)
    grads = {
        k: sl.shard(torch.randn(p.shape, generator=g), mesh, p.spec) for k, p in params.items()
    }
    return params, grads


@dataclass
class OptimMeasured:
    """One variant on one rank: the step times, local elements, how far from plain it ended."""

    first_s: float
    times_s: list[float]
    local_elements: int
    tensors: int
    mismatch: float  # max over elements of |x - plain| / (ATOL + RTOL |plain|): <= 1 agrees


def optim_rank(mesh: Any, spec: dict) -> dict[str, OptimMeasured]:
    """Every optimizer variant of `spec` on this rank, interleaved; per variant its figures."""
    import torch.distributed as dist

    mesh = sl.Mesh.distributed(optim_axes(dist.get_world_size()))
    config = gpt.Config(**spec["config"])
    params, grads = optim_params(mesh, config)
    runs = {name: OPTIMIZERS[name](params, grads, mesh) for name in spec["variants"]}
    n_local, n_tensors = _local_numel(params), len(params)

    def timed(fn: Callable[[], None]) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    first = {name: timed(r.step) for name, r in runs.items()}
    for _ in range(spec["warmup"]):
        for r in runs.values():
            timed(r.step)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(spec["steps"]):
        for name, r in runs.items():
            times[name].append(timed(r.step))
    dist.barrier()
    out = {}
    want = runs["plain"].local() if "plain" in runs else None
    for name, r in runs.items():
        diff = 0.0
        if want is not None:
            for a, b in zip(r.local(), want):
                diff = max(diff, float(((a - b).abs() / (ATOL + RTOL * b.abs())).max()))
        out[name] = OptimMeasured(first[name], times[name], n_local, n_tensors, diff)
    return out


# == part 2: ZeRO ======================================================================
def zero_batch(config: gpt.Config, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randint(0, config.vocab, (batch, seq), generator=g) for k in ("tokens", "targets")
    }


def is_zero_cause(cause: str) -> bool:
    """Whether a ledger record is ZeRO's (its place/reduce/gather/grad moves, backward re-gathers)."""
    return cause.startswith("zero.") or cause == "regather"


class ZeroRun:
    """One ZeRO stage on `mesh` (an axis "dp"): GPT under snn.dp, AdamW, DESIGN §9's step."""

    def __init__(self, stage: int, mesh: Any, config: gpt.Config, batch: dict) -> None:
        self.scheme = snn.dp("dp")
        self.mesh, self.config = mesh, config
        self.z = sl.optim.zero(stage, axis="dp")
        params = snn.shard_params(gpt.init(config), mesh, self.scheme, gpt.DIMS(config))
        self.params = self.z.place(params)
        self.tx = sl.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
        self.state = self.tx.init(self.z.state(self.params))
        self.batch = self.scheme.shard_batch(batch, mesh)
        self.grad_bytes: list[int] = []

    def step(self) -> Any:
        """One training step; returns the loss (a ShardedTensor, detached)."""
        z, params = self.z, self.params
        for p in params.values():
            p.requires_grad_()
        with snn.use(self.scheme, self.mesh):
            with sl.remat_saves():
                loss = gpt.loss(z.compute(params), self.batch, self.config)
            loss.backward()
        grads = {k: p.grad for k, p in params.items()}
        self.grad_bytes = device_bytes(grads)
        for p in params.values():
            p.grad = None
        grads = z.reduce(grads)
        updates, self.state = self.tx.update(grads, self.state, z.state(params))
        del grads
        self.params = z.place(sl.optim.apply_updates(z.state(params), updates))
        return loss.detach()

    def resident_bytes(self) -> list[int]:
        """Per local device, the stored parameters' and the optimizer state's bytes."""
        return [a + b for a, b in zip(device_bytes(self.params), device_bytes(self.state))]


@dataclass
class ZeroMeasured:
    """One stage on one process (per device figures: the largest local device's)."""

    zero_bytes: float
    other_bytes: float
    collectives: int
    param_bytes: int
    grad_bytes: int
    state_bytes: int
    peak_bytes: int | None
    times_s: list[float]
    first_loss: float
    last_loss: float
    kinds: dict[str, int] = field(default_factory=dict)


def zero_stage(stage: int, mesh: Any, spec: dict, peak: bool) -> ZeroMeasured:
    """Run `stage` on `mesh`: a first step (loss checked), one measured step (ledger, memory),
    then ``spec["zero_steps"]`` timed steps."""
    config = gpt.Config(**spec["config"])
    run = ZeroRun(stage, mesh, config, zero_batch(config, spec["batch"], config.seq))
    barrier = _barrier(mesh)
    first_loss = float(run.step().full())
    barrier()
    resident = max(run.resident_bytes())
    if peak:
        with PeakMemory() as pm, sl.comm_ledger() as led:
            run.step()
        peak_bytes: int | None = resident + pm.peak
    else:
        with sl.comm_ledger() as led:
            run.step()
        peak_bytes = None
    times, loss = [], None
    for _ in range(spec["zero_steps"]):
        barrier()
        t0 = time.perf_counter()
        loss = run.step()
        times.append(time.perf_counter() - t0)
    last = float((loss if loss is not None else run.step()).full())
    kinds: dict[str, int] = {}
    for r in led.records:
        if is_zero_cause(r.cause):
            kinds[f"{r.kind}:{r.cause}"] = kinds.get(f"{r.kind}:{r.cause}", 0) + 1
    return ZeroMeasured(
        zero_bytes=sum(r.bytes for r in led.records if is_zero_cause(r.cause)),
        other_bytes=sum(r.bytes for r in led.records if not is_zero_cause(r.cause)),
        collectives=len(led.records),
        param_bytes=max(device_bytes(run.params)),
        grad_bytes=max(run.grad_bytes),
        state_bytes=max(device_bytes(run.state)),
        peak_bytes=peak_bytes,
        times_s=times,
        first_loss=first_loss,
        last_loss=last,
        kinds=kinds,
    )


def _barrier(mesh: Any) -> Callable[[], None]:
    import torch.distributed as dist

    if len(mesh.local_devices) == mesh.abstract.size or not dist.is_initialized():
        return lambda: None
    return dist.barrier


def zero_rank(mesh: Any, spec: dict) -> dict[int, ZeroMeasured]:
    """Every ZeRO stage of `spec` on ``Mesh.distributed({"dp": world})``, on this rank."""
    import torch.distributed as dist

    mesh = sl.Mesh.distributed({"dp": dist.get_world_size()})
    return {stage: zero_stage(stage, mesh, spec, peak=True) for stage in spec["stages"]}


def bench_rank(mesh: Any, spec: dict) -> dict[str, Any]:
    """The optimizer step (unless skipped) and, where asked, ZeRO, on this gloo rank."""
    import logging
    import warnings

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # no profiler start/stop lines per step
    torch.set_num_threads(1)
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    out: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DTensor's experimental-API notices
            if spec["variants"]:
                out["optim"] = optim_rank(mesh, spec)
            if spec["zero"]:
                out["zero"] = zero_rank(mesh, spec)
    finally:
        torch_log.setLevel(level)
    return out


# == the formulas ======================================================================
def param_bytes(config: gpt.Config) -> int:
    """Ψ: the model's fp32 parameter bytes."""
    return sum(t.numel() * t.element_size() for t in gpt.init(config).values())


def zero_bytes_formula(psi: float, n: int, stage: int) -> float:
    """Bytes per device per step: 2Ψ(N−1)/N at stages 0–2, 3Ψ(N−1)/N at stage 3."""
    return (3 if stage == 3 else 2) * psi * (n - 1) / n


def model_memory(psi: float, n: int, stage: int) -> float:
    """The ZeRO paper's per-device model memory for fp32 AdamW (Ψ = fp32 parameter bytes):
    parameters Ψ, gradients Ψ, state 2Ψ (K = 8 bytes/element), split over N per stage."""
    params, grads, state = psi, psi, STATE_BYTES_PER_ELEMENT / 4 * psi
    if stage >= 1:
        state /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        params /= n
    return params + grads + state


# == the tables ========================================================================
def _merge_optim(per_rank: Sequence[dict]) -> dict[str, dict]:
    out = {}
    for name, m0 in per_rank[0].items():
        ms = [r[name] for r in per_rank]
        median = max(statistics.median(m.times_s) for m in ms)
        out[name] = {
            "median_s": median,
            "first_s": max(m.first_s for m in ms),
            "local": max(m.local_elements for m in ms),
            "tensors": m0.tensors,
            "ns_per_element": median * 1e9 / max(m.local_elements for m in ms),
            "mismatch": max(m.mismatch for m in ms),
        }
    return out


def format_optim(ranks: int, rows: dict[str, dict]) -> list[str]:
    axes = optim_axes(ranks)
    any_row = next(iter(rows.values()))
    lines = [
        f"AdamW step, {ranks} rank{'s' if ranks > 1 else ''} ({axes}, dp+tp1d layouts, "
        f"{any_row['tensors']} tensors, {any_row['local']:,} local elements per rank)",
        f"{'variant':<44} {'ms':>8} {'first ms':>9} {'ns/elem':>8} {'vs plain':>9}",
    ]
    base = rows.get("plain")
    for name, r in rows.items():
        ratio = f"{r['ns_per_element'] / base['ns_per_element']:.2f}x" if base else "-"
        lines.append(
            f"{LABELS[name]:<44} {r['median_s'] * 1e3:>8.2f} {r['first_s'] * 1e3:>9.1f} "
            f"{r['ns_per_element']:>8.2f} {ratio:>9}"
        )
    return lines


def _merge_zero(per_rank: Sequence[dict[int, ZeroMeasured]]) -> dict[int, dict]:
    out = {}
    for stage, m0 in per_rank[0].items():
        ms = [r[stage] for r in per_rank]
        peaks = [m.peak_bytes for m in ms if m.peak_bytes is not None]
        out[stage] = {
            "zero_bytes": max(m.zero_bytes for m in ms),
            "other_bytes": max(m.other_bytes for m in ms),
            "collectives": m0.collectives,
            "param_bytes": max(m.param_bytes for m in ms),
            "grad_bytes": max(m.grad_bytes for m in ms),
            "state_bytes": max(m.state_bytes for m in ms),
            "model_bytes": max(m.param_bytes + m.grad_bytes + m.state_bytes for m in ms),
            "peak_bytes": max(peaks) if peaks else None,
            "median_s": max(statistics.median(m.times_s) for m in ms) if m0.times_s else None,
            "first_loss": m0.first_loss,
            "last_loss": m0.last_loss,
            "kinds": m0.kinds,
        }
    return out


def format_zero(where: str, n: int, psi: int, rows: dict[int, dict]) -> list[str]:
    lines = [
        f"ZeRO on {{dp: {n}}} ({where}); Ψ = {psi / MiB:.2f} MiB fp32 parameters, AdamW "
        f"(Ψ_state = 2Ψ); MiB per device",
        f"{'stage':<5} {'ZeRO MiB':>9} {'formula':>9} {'ratio':>6} {'other B':>8} {'colls':>5} "
        f"{'state':>7} {'Ψst/N':>7} {'model':>7} {'paper':>7} {'peak':>7} {'ms':>8} {'loss':>8}",
    ]
    for stage, r in rows.items():
        formula = zero_bytes_formula(psi, n, stage)
        state_formula = 2 * psi / (n if stage >= 1 else 1)
        peak = f"{r['peak_bytes'] / MiB:>7.2f}" if r["peak_bytes"] is not None else f"{'-':>7}"
        ms = f"{r['median_s'] * 1e3:>8.1f}" if r["median_s"] is not None else f"{'-':>8}"
        lines.append(
            f"{stage:<5} {r['zero_bytes'] / MiB:>9.3f} {formula / MiB:>9.3f} "
            f"{r['zero_bytes'] / formula:>6.3f} {r['other_bytes']:>8.0f} {r['collectives']:>5} "
            f"{r['state_bytes'] / MiB:>7.2f} {state_formula / MiB:>7.2f} "
            f"{r['model_bytes'] / MiB:>7.2f} {model_memory(psi, n, stage) / MiB:>7.2f} "
            f"{peak} {ms} {r['last_loss']:>8.4f}"
        )
    return lines


def zero_notes(config: gpt.Config, n: int, rows: dict[int, dict]) -> list[str]:
    """ZeRO's collectives per stage, and where the measured bytes differ from the formula, why."""
    notes = [
        "(ZeRO's collectives per step: "
        + "; ".join(
            f"stage {s}: " + ", ".join(f"{k} x{c}" for k, c in sorted(r["kinds"].items()))
            for s, r in rows.items()
        )
        + ")"
    ]
    if 3 in rows:
        psi = param_bytes(config)
        wte = config.vocab * config.dim * 4
        short = zero_bytes_formula(psi, n, 3) - rows[3]["zero_bytes"]
        if short > 0:
            notes.append(
                f"(stage 3 is {short / MiB:.3f} MiB under 3Ψ(N−1)/N; the embedding table's "
                f"re-gather would be Ψ_wte(N−1)/N = {wte * (n - 1) / n / MiB:.3f} MiB: an "
                "embedding's backward reads only the token ids, so backward does not re-gather it)"
            )
    return notes


def _check_zero_losses(rows: dict[int, dict], want: float, where: str) -> None:
    bad = {
        s: r["first_loss"]
        for s, r in rows.items()
        if not math.isclose(r["first_loss"], want, rel_tol=1e-4)
    }
    if bad:
        raise AssertionError(
            f"benchmarks/optim.py ({where}): first-step losses {bad} differ from the unsharded "
            f"model's {want:.6f} by more than 1e-4 relative: a stage computes another model"
        )
    if 0 in rows:
        ref = rows[0]["last_loss"]
        bad = {
            s: r["last_loss"]
            for s, r in rows.items()
            if not math.isclose(r["last_loss"], ref, rel_tol=1e-4)
        }
        if bad:
            raise AssertionError(
                f"benchmarks/optim.py ({where}): last losses {bad} differ from stage 0's {ref:.6f} "
                "by more than 1e-4 relative: ZeRO changed the training"
            )


def _check_optim(rows: dict[str, dict], ranks: int) -> None:
    bad = {n: r["mismatch"] for n, r in rows.items() if r["mismatch"] > 1}
    if bad:
        raise AssertionError(
            f"benchmarks/optim.py on {ranks} ranks: variants {bad} ended with parameters that "
            f"differ from plain torch AdamW's by more than atol {ATOL} + rtol {RTOL} (the figures "
            "are the largest |x - plain| / (atol + rtol |plain|)): they time another update"
        )


# == command line ======================================================================
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4], help="gloo rank counts (<= 8)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps after the first")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}"
    )
    add_model_args(
        ap,
        layers=4,
        seq=64,
        batch=8,
        seq_help="ZeRO part: tokens per sequence",
        batch_help="ZeRO part: global batch (split over dp)",
    )
    ap.add_argument("--zero-ranks", type=int, default=4, help="N, the dp size of the ZeRO part")
    ap.add_argument("--stages", default="0,1,2,3", help="ZeRO stages, comma-separated")
    ap.add_argument("--zero-steps", type=int, default=3, help="timed ZeRO steps per stage")
    ap.add_argument("--skip-optim", action="store_true", help="skip the optimizer-step part")
    ap.add_argument("--skip-zero", action="store_true", help="skip the ZeRO part")
    ap.add_argument(
        "--zero-on",
        default="simulated,gloo",
        help="where the ZeRO part runs: simulated, gloo or both",
    )
    args = ap.parse_args(argv)
    names = [s for s in args.variants.split(",") if s]
    unknown = [s for s in names if s not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants: unknown {unknown or 'none given'}; choose from {','.join(VARIANTS)}")
    args.variant_names = names
    if any(r < 1 or r > 8 for r in args.ranks):
        ap.error(f"--ranks {args.ranks}: between 1 and 8 local gloo ranks")
    try:
        stages = [int(s) for s in args.stages.split(",") if s]
    except ValueError:
        ap.error(f"--stages {args.stages!r}: comma-separated integers among 0,1,2,3")
    if not stages or any(s not in (0, 1, 2, 3) for s in stages):
        ap.error(f"--stages {args.stages!r}: comma-separated stages among 0,1,2,3")
    args.stage_list = stages
    if args.zero_ranks < 2 or args.zero_ranks > 8:
        ap.error(f"--zero-ranks {args.zero_ranks}: a dp size between 2 and 8")
    for flag in ("steps", "zero_steps", "batch", "seq"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: at least 1")
    if args.warmup < 0:
        ap.error(f"--warmup {args.warmup}: at least 0")
    where = [s for s in args.zero_on.split(",") if s]
    if not where or any(s not in ZERO_ON for s in where):
        ap.error(f"--zero-on {args.zero_on!r}: comma-separated among {','.join(ZERO_ON)}")
    args.zero_where = [s for s in ZERO_ON if s in where]
    if args.skip_optim and args.skip_zero:
        ap.error("--skip-optim with --skip-zero leaves nothing to run")
    return args


def command_line(args: argparse.Namespace) -> str:
    parts = [
        "python benchmarks/optim.py",
        f"--ranks {' '.join(map(str, args.ranks))}",
        f"--steps {args.steps} --warmup {args.warmup} --variants {','.join(args.variant_names)}",
        model_flags(args),
        f"--zero-ranks {args.zero_ranks} --stages {','.join(map(str, args.stage_list))} "
        f"--zero-steps {args.zero_steps} "
        f"--zero-on {','.join(args.zero_where)}",
    ]
    parts += [f"--{f}" for f in ("skip-optim", "skip-zero") if getattr(args, f.replace("-", "_"))]
    return " ".join(parts)


@dataclass
class Report:
    """What `main` printed (`lines`), the optimizer rows per rank count, the ZeRO rows per
    backend ("simulated", "gloo"), and the ZeRO Ψ and N."""

    lines: list[str]
    optim: dict[int, dict[str, dict]]
    zero: dict[str, dict[int, dict]]
    psi: int = 0
    n: int = 0


def main(argv: Sequence[str] | None = None, launch: Callable | None = None) -> Report:
    """Run the benchmark, print the tables (each as it completes), return a `Report`.

    `launch` (``launch(fn, axes, args) -> per-rank results``) runs the gloo parts on a
    pool already started, e.g. a ``shardlib.collectives.Workers``' ``run``; default: a
    fresh ``sl.launch`` per rank count.
    """
    args = parse_args(argv)
    config, cfg = model_config(args)
    psi, n = param_bytes(config), args.zero_ranks
    report = Report([], {}, {}, psi, n)

    def emit(new: list[str]) -> None:
        report.lines.extend(new)
        print("\n".join(new), flush=True)

    emit(
        [
            f"# {command_line(args)}",
            f"# torch {torch.__version__}, CPU, {os.cpu_count()} cores, 1 thread per rank, gloo loopback",
            f"# model: {config}; {psi // 4:,} parameters; AdamW lr {LR}, betas {BETAS}, eps {EPS}, "
            f"weight_decay {WEIGHT_DECAY}, float32",
            "# AdamW: ms median step (slowest rank), ns per LOCAL element, ratio to plain per local",
            "# element (goal: shardlib within 1.5x). ZeRO: bytes per device per step (ledger) against",
            "# 2Ψ(N−1)/N (stages 0-2) / 3Ψ(N−1)/N (stage 3); state against Ψ_state/N; model (params +",
            "# grads + state) against the ZeRO paper's fp32 model (Ψ+Ψ+2Ψ split per stage); peak: live",
            "# at step start + the step's allocator high-water mark (torch.profiler), largest rank",
            "",
        ]
    )
    zero_spec = {
        "config": cfg,
        "batch": args.batch,
        "stages": args.stage_list,
        "zero_steps": args.zero_steps,
    }
    want = float(gpt.loss(gpt.init(config), zero_batch(config, args.batch, args.seq), config))
    if not args.skip_zero and "simulated" in args.zero_where:
        print(f"[optim.py] ZeRO on simulated {{dp: {n}}} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        mesh = sl.Mesh.simulated({"dp": n})
        rows = _merge_zero(
            [{s: zero_stage(s, mesh, zero_spec, peak=False) for s in args.stage_list}]
        )
        _check_zero_losses(rows, want, "simulated")
        report.zero["simulated"] = rows
        emit(
            [
                *format_zero(f"simulated, one process, {n} devices", n, psi, rows),
                *zero_notes(config, n, rows),
                f"({time.perf_counter() - t0:.0f} s)",
                "",
            ]
        )
    gloo_zero = not args.skip_zero and "gloo" in args.zero_where
    ranks_list = [] if args.skip_optim else list(args.ranks)
    if gloo_zero and n not in ranks_list:
        ranks_list.append(n)
    for ranks in ranks_list:
        optim = not args.skip_optim and ranks in args.ranks
        zero = gloo_zero and ranks == n
        spec = {
            **zero_spec,
            "variants": args.variant_names if optim else [],
            "steps": args.steps,
            "warmup": args.warmup,
            "zero": zero,
        }
        print(
            f"[optim.py] {ranks} gloo ranks: {'AdamW ' if optim else ''}{'ZeRO' if zero else ''} ...",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.perf_counter()
        if launch is None:
            per_rank = sl.launch(bench_rank, {"world": ranks}, args=(spec,), timeout=3600)
        else:
            per_rank = launch(bench_rank, {"world": ranks}, (spec,))
        if optim:
            rows = _merge_optim([r["optim"] for r in per_rank])
            _check_optim(rows, ranks)
            report.optim[ranks] = rows
            emit([*format_optim(ranks, rows), f"({time.perf_counter() - t0:.0f} s)", ""])
        if zero:
            zrows = _merge_zero([r["zero"] for r in per_rank])
            _check_zero_losses(zrows, want, "gloo")
            report.zero["gloo"] = zrows
            emit(
                [
                    *format_zero(f"gloo, {n} ranks", n, psi, zrows),
                    *zero_notes(config, n, zrows),
                    f"({time.perf_counter() - t0:.0f} s)",
                    "",
                ]
            )
    return report


if __name__ == "__main__":
    main()
