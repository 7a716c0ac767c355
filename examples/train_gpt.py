"""Train `shardlib.nn.gpt` on a synthetic sorting task, under any scheme and ZeRO stage.

    python examples/train_gpt.py                                  # {dp: 2, tp: 2}, ZeRO-1, ~1 min
    python examples/train_gpt.py --mesh dp=2,tp=4 --tp 2d --zero 3
    python examples/train_gpt.py --mesh dp=2,sp=2 --sp ring --backend gloo
    torchrun --nproc-per-node 4 examples/train_gpt.py --mesh dp=2,tp=2

The task (generated in code from ``--seed``, nothing downloaded): each
sequence is ``seq/2`` random digits, a separator, then the same digits sorted;
the loss is the next-token cross-entropy on the sorted half only (the other
targets are ``-100``, ignored), so it starts near ln(vocab) and falls as the
model learns to sort. Step ``s`` always trains on the batch drawn from
``(seed, s)``: the data position of a resumed run is just its step.

One step (DESIGN §9), with ``z = sl.optim.zero(stage, "dp")``::

    params = z.place(snn.shard_params(gpt.init(cfg), mesh, scheme, gpt.DIMS(cfg)))
    state = tx.init(z.state(params))
    for mb in micro_batches:           # partial gradients summed locally, no collective
        with snn.use(scheme, mesh):
            (gpt.loss(z.compute(params), scheme.shard_batch(mb, mesh), cfg) / M).backward()
    grads = z.reduce({k: p.grad for k, p in params.items()})   # one reduction per step
    updates, state = tx.update(grads, state, z.state(params))
    params = z.place(sl.optim.apply_updates(z.state(params), updates))

with ``tx = chain(clip_by_global_norm(--clip), adamw(warmup_cosine(...)))``;
``--dtype bf16`` stores and computes the parameters in bfloat16 and wraps `tx`
in ``sl.optim.master_weights`` (float32 master weights in the optimizer
state, split over dp like the rest of it at ZeRO >= 1).

Flags to schemes (`layout_for`). ``--mesh`` names logical axes ``dp``, ``tp``
and ``sp`` with their sizes, in mesh order (row-major), or ``none`` for the
unsharded model on plain tensors (the reference every sharded run is checked
against):

| flag | scheme | mesh axes |
|---|---|---|
| ``dp=N`` | ``snn.dp("dp")`` (``--fsdp``: ``snn.fsdp("dp")``) | dp |
| ``tp=N --tp 1d`` (the default when tp is given) | ``snn.tp1d("tp")`` | tp |
| ``tp=N --tp 1d --sp megatron`` | ``snn.tp1d("tp", sequence=True)`` | tp |
| ``tp=q*q --tp 2d`` | ``snn.tp2d("r", "c")`` | r = c = q |
| ``tp=d*q*q --tp 2.5d`` (q, d >= 2, largest q) | ``snn.tp2p5d("d", "r", "c")`` | d, r = c = q |
| ``tp=q**3 --tp 3d`` | ``snn.tp3d("i", "j", "k")`` | i = j = k = q |
| ``sp=N --sp ulysses`` / ``--sp ring`` | ``snn.ulysses("sp")`` / ``snn.ring("sp")`` | sp |

The parts compose with ``+`` (``dp=2,tp=4 --tp 2d`` is ``dp("dp") + tp2d("r",
"c")`` on {dp: 2, r: 2, c: 2}). ``--zero 0..3`` applies where a dp axis
exists (default 1 there, 0 elsewhere); without one, and under ``--fsdp``
(which is ZeRO-3 written as a scheme), the gradients are finished to their
parameters' layouts by ``sl.reshard`` and ``--zero`` must be 0. A combination
outside this table raises `TrainConfigError` naming the valid ones.

Compressed communication (ZeRO++): ``--comm-dtype int8|fp8|bf16`` sends ZeRO-3's
weight gathers in that format (the stored shards stay exact), ``--grad-comm-dtype``
the gradient reduce-scatters (ZeRO 1-3); ``sl.optim.zero(stage, "dp", comm_dtype=...,
grad_comm_dtype=...)``. The ledger of one step shows the wire dtype and bytes.

Replay: ``--capture`` runs each micro-batch's forward and backward
(`forward_backward`) through `sl.capture`. The first step records each
device's program (one for the first micro-batch, one for those that add to a
``.grad``) and later steps replay it with no layout dispatch, to the same
values and ledger. The optimizer step stays eager: its state counts updates in a
Python int, which would make every step a new program. ``--sp ring`` needs
``--backend gloo`` for it (a simulated mesh runs the ring's devices on threads).

Backends: ``--backend sim`` (default) runs every device in this process;
``--backend gloo`` runs one local process per device through `sl.launch`;
under ``torchrun`` (its environment set) the script runs on
``sl.Mesh.distributed`` directly. Rank 0 prints and plots.

Checkpoints: with ``--ckpt DIR`` the params, optimizer state, step, torch's
RNG state and the data position are saved (`sl.checkpoint.save`) to
``DIR/step_NNNNNN`` every ``--ckpt-every`` steps and at the end.
``--resume`` continues from the newest checkpoint in DIR (``--resume PATH``:
that one) on whatever mesh, scheme, ZeRO stage and backend this run uses
(`sl.checkpoint.load` reshards on read); the model config and --seed must
match, and the learning-rate schedule spans --steps (keep it to continue the
same run: then steps after the checkpoint are the uninterrupted run's).

Output: a tqdm progress bar with the loss and tokens/s (plain lines when tqdm
is missing), the ledger summary of one step (the last), the first and last
ten-step mean loss, a loss-curve PNG (``--out``; matplotlib, skipped with a
note when missing or with ``--no-plot``) and the command that reproduces the
run. ``pip install -c constraints.txt -e ".[examples]"`` installs both.

Importable: `parse_args`, `layout_for`, `build`, `train` (returns a `Result`),
`main`; tests/test_train_gpt.py calls them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.nn import gpt

DIGITS = 10  # tokens 0..9 are digits, SEP separates the digits from their sorted copy
SEP = DIGITS
IGNORE = -100  # cross_entropy's ignore_index: targets on the unsorted half
LOGICAL_AXES = ("dp", "tp", "sp")
TP_KINDS = ("1d", "2d", "2.5d", "3d", "none")
SP_KINDS = ("none", "megatron", "ulysses", "ring")
COMM_DTYPES = ("int8", "fp8", "bf16")  # sl.optim.zero(comm_dtype=, grad_comm_dtype=)


class TrainConfigError(sl.ShardlibError, ValueError):
    """A flag combination the example cannot run (the message lists the valid ones)."""


# == data =========================================================================================
def make_batch(seed: int, step: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Step `step`'s batch of the sorting task: (batch, seq) int64 tokens and targets.

    Row r is ``digits, SEP, sorted(digits)`` (n = ``seq // 2`` digits; an odd seq
    ends with one more SEP), the targets the same shifted by one; the n targets up to
    and including the SEP are ``-100`` (ignored), so every row scores the same
    ``seq - n`` tokens and a micro-batch's mean loss is the batch's. Depends only on
    (seed, step).

    Examples:
        >>> b = make_batch(0, 0, 2, 8)
        >>> b["tokens"][0, 4].item(), b["targets"][0, :4].tolist()
        (10, [-100, -100, -100, -100])
        >>> b["targets"][0, 4:].tolist() == sorted(b["tokens"][0, :4].tolist())
        True
    """
    n = seq // 2
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    digits = torch.randint(0, DIGITS, (batch, n), generator=g)
    sep = torch.full((batch, 1), SEP, dtype=torch.long)
    tail = seq - 2 * n  # raw has seq + 1 tokens: an odd seq gets a trailing SEP
    raw = torch.cat([digits, sep, digits.sort(dim=1).values, sep.expand(batch, tail)], 1)
    tokens, targets = raw[:, :seq].clone(), raw[:, 1 : seq + 1].clone()
    targets[:, :n] = IGNORE
    return {"tokens": tokens, "targets": targets}


# == flags -> mesh and scheme =====================================================================
def parse_mesh(text: str) -> dict[str, int]:
    """``"dp=2,tp=2"`` -> {"dp": 2, "tp": 2} (logical axes, in order); ``"none"`` -> {}.

    Examples:
        >>> parse_mesh("dp=2,tp=4"), parse_mesh("none")
        ({'dp': 2, 'tp': 4}, {})
    """
    if text.strip().lower() in ("none", ""):
        return {}
    out: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if m is None:
            raise TrainConfigError(
                f"--mesh {text!r}: {part!r} is not AXIS=SIZE; write e.g. --mesh dp=2,tp=2 "
                "(axes dp, tp, sp) or --mesh none for the unsharded model."
            )
        axis, size = m.group(1), int(m.group(2))
        if axis not in LOGICAL_AXES:
            raise TrainConfigError(
                f"--mesh {text!r}: unknown axis {axis!r}; the axes are dp (data parallel), tp "
                "(tensor parallel, factored into the --tp grid) and sp (sequence parallel for "
                "--sp ulysses/ring)."
            )
        if axis in out:
            raise TrainConfigError(f"--mesh {text!r}: axis {axis!r} is given twice.")
        if size < 1:
            raise TrainConfigError(f"--mesh {text!r}: {axis}={size}; a size is at least 1.")
        out[axis] = size
    return out


def _root(n: int, k: int) -> int | None:
    q = round(n ** (1.0 / k))
    return next((c for c in (q - 1, q, q + 1) if c >= 1 and c**k == n), None)


def tp_grid(kind: str, n: int) -> dict[str, int]:
    """The mesh axes that replace ``tp=n`` under ``--tp kind`` (see the module table).

    Examples:
        >>> tp_grid("2d", 4), tp_grid("2.5d", 8), tp_grid("3d", 8)
        ({'r': 2, 'c': 2}, {'d': 2, 'r': 2, 'c': 2}, {'i': 2, 'j': 2, 'k': 2})
    """
    if kind == "1d":
        return {"tp": n}
    if kind == "2d":
        q = _root(n, 2)
        if q is not None and q >= 2:
            return {"r": q, "c": q}
        raise TrainConfigError(
            f"--tp 2d with tp={n}: SUMMA's grid is q x q, so tp must be a square >= 4 "
            "(4, 9, 16); or use --tp 1d."
        )
    if kind == "2.5d":
        for q in range(int(math.isqrt(n)), 1, -1):
            if n % (q * q) == 0 and n // (q * q) >= 2:
                return {"d": n // (q * q), "r": q, "c": q}
        raise TrainConfigError(
            f"--tp 2.5d with tp={n}: the grid is d x q x q with d >= 2 and q >= 2, so tp is "
            "one of 8, 12, 16, 18, 24, 27 (not a square like 4: that is --tp 2d)."
        )
    if kind == "3d":
        q = _root(n, 3)
        if q is not None and q >= 2:
            return {"i": q, "j": q, "k": q}
        raise TrainConfigError(
            f"--tp 3d with tp={n}: the grid is q x q x q, so tp must be a cube >= 8 (8, 27)."
        )
    raise TrainConfigError(f"--tp {kind!r}: choose one of {', '.join(TP_KINDS)}.")


def layout_for(
    logical: dict[str, int], tp: str | None, sp: str, fsdp: bool = False
) -> tuple[dict[str, int], snn.Scheme | None]:
    """(mesh axes, scheme) for the logical `--mesh` axes and the --tp / --sp / --fsdp flags.

    `tp` None means the default: ``"1d"`` if the mesh has a tp axis, else ``"none"``.
    An empty `logical` is the unsharded model: ({}, None).

    Examples:
        >>> layout_for({"dp": 2, "tp": 4}, "2d", "none")
        ({'dp': 2, 'r': 2, 'c': 2}, dp('dp') + tp2d('r', 'c'))
        >>> layout_for({"tp": 2}, None, "megatron")[1]
        tp1d('tp', sequence=True)
    """
    has = set(logical)
    tp = tp if tp is not None else ("1d" if "tp" in has else "none")
    problems = []
    if tp not in TP_KINDS:
        problems.append(f"--tp {tp!r} is not one of {', '.join(TP_KINDS)}")
    if sp not in SP_KINDS:
        problems.append(f"--sp {sp!r} is not one of {', '.join(SP_KINDS)}")
    if tp != "none" and "tp" not in has:
        problems.append(f"--tp {tp} needs a tp axis in --mesh (e.g. --mesh dp=2,tp=4)")
    if tp == "none" and "tp" in has:
        problems.append(
            "--tp none with a tp axis in --mesh: drop the axis or pick --tp 1d|2d|2.5d|3d"
        )
    if sp == "megatron" and tp != "1d":
        problems.append(
            "--sp megatron is Megatron's sequence parallelism over the tp axis: it needs --tp 1d"
        )
    if sp in ("ulysses", "ring") and "sp" not in has:
        problems.append(f"--sp {sp} needs an sp axis in --mesh (e.g. --mesh sp=4 or dp=2,sp=2)")
    if "sp" in has and sp not in ("ulysses", "ring"):
        problems.append(
            f"the mesh has an sp axis but --sp is {sp}: pick --sp ulysses or --sp ring "
            "(--sp megatron runs over tp, with no sp axis)"
        )
    if fsdp and "dp" not in has:
        problems.append("--fsdp stores weights split over dp: it needs a dp axis in --mesh")
    if problems:
        raise TrainConfigError(
            f"--mesh {','.join(f'{a}={n}' for a, n in logical.items()) or 'none'}: "
            + "; ".join(problems)
            + "."
        )
    if not logical:
        return {}, None
    axes: dict[str, int] = {}
    parts: list[snn.Scheme] = []
    for axis, n in logical.items():
        if axis == "dp":
            axes["dp"] = n
            parts.append(snn.fsdp("dp") if fsdp else snn.dp("dp"))
        elif axis == "tp":
            grid = tp_grid(tp, n)
            axes.update(grid)
            if tp == "1d":
                parts.append(snn.tp1d("tp", sequence=sp == "megatron"))
            elif tp == "2d":
                parts.append(snn.tp2d("r", "c"))
            elif tp == "2.5d":
                parts.append(snn.tp2p5d("d", "r", "c"))
            else:
                parts.append(snn.tp3d("i", "j", "k"))
        else:
            axes["sp"] = n
            parts.append(snn.ulysses("sp") if sp == "ulysses" else snn.ring("sp"))
    scheme = parts[0]
    for p in parts[1:]:
        scheme = scheme + p
    return axes, scheme


# == the step's policy where ZeRO does not apply ==================================================
class Finish:
    """`zero`'s four calls where ZeRO does not apply (no dp axis, --fsdp, plain tensors).

    ``place``/``state`` detach (the scheme's storage layouts are kept), ``compute``
    is the identity (the scheme moves weights itself), ``reduce`` finishes each
    gradient to its layout without the partial axes (``sl.reshard``: an
    all-reduce or nothing; under fsdp backward already reduce-scattered them).
    """

    stage = 0

    def place(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: p.detach() for k, p in params.items()}

    def compute(self, params: dict[str, Any]) -> dict[str, Any]:
        return params

    def state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: p.detach() for k, p in params.items()}

    def reduce(self, grads: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, g in grads.items():
            if isinstance(g, sl.ShardedTensor) and g.spec.partial:
                g = sl.reshard(g, g.spec.without_partial())
            out[k] = g
        return out


# == build ========================================================================================
@dataclass
class Setup:
    """What a run is made of: the mesh (None: plain tensors), scheme, ZeRO policy, optimizer."""

    args: argparse.Namespace
    config: gpt.Config
    axes: dict[str, int]
    mesh: Any
    scheme: snn.Scheme | None
    zero: Any  # sl.optim.Zero or Finish
    tx: sl.optim.GradientTransformation
    dtype: torch.dtype
    # forward_backward(setup, ...) bound to this setup; under --capture an sl.capture of it
    forward_backward: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        step = functools.partial(forward_backward, self)
        self.forward_backward = sl.capture(step) if self.args.capture else step

    def describe(self) -> str:
        mesh = "none (plain tensors)" if not self.axes else str(self.axes)
        zero = f"ZeRO-{self.zero.stage}" if isinstance(self.zero, sl.optim.Zero) else "no ZeRO"
        for flag, what in ((self.args.comm_dtype, "gathers"), (self.args.grad_comm_dtype, "grads")):
            zero += f" ({flag} {what})" if flag else ""
        return f"mesh {mesh}, scheme {self.scheme!r}, {zero}, {self.args.dtype}"


def resolve_zero(args: argparse.Namespace, logical: dict[str, int]) -> int:
    """--zero's value: the flag, or 1 where a dp axis exists (not --fsdp), else 0."""
    if args.zero is None:
        return 1 if "dp" in logical and not args.fsdp else 0
    if args.zero not in (0, 1, 2, 3):
        raise TrainConfigError(f"--zero {args.zero}: choose 0, 1, 2 or 3.")
    if args.zero and "dp" not in logical:
        raise TrainConfigError(
            f"--zero {args.zero}: ZeRO splits optimizer state (1), gradients (2) and parameters "
            "(3) over the dp axis, and --mesh has none; add one (--mesh dp=2,...) or pass --zero 0."
        )
    if args.zero and args.fsdp:
        raise TrainConfigError(
            f"--zero {args.zero} with --fsdp: fsdp already stores every weight split over dp "
            "(ZeRO-3 as a scheme); pass --zero 0 with --fsdp, or drop --fsdp for ZeRO on dp."
        )
    return args.zero


def compressed_comm(args: argparse.Namespace, stage: int) -> dict[str, Any]:
    """`sl.optim.zero`'s comm_dtype / grad_comm_dtype from --comm-dtype / --grad-comm-dtype."""
    wire = {"int8": "int8", "fp8": "fp8", "bf16": torch.bfloat16, None: None}
    if args.comm_dtype and stage != 3:
        raise TrainConfigError(
            f"--comm-dtype {args.comm_dtype} compresses ZeRO-3's weight gathers; this run is "
            f"ZeRO-{stage}. Pass --zero 3 (with a dp axis, without --fsdp), or "
            f"--grad-comm-dtype {args.comm_dtype} for the gradient reduce-scatters."
        )
    if args.grad_comm_dtype and stage == 0:
        raise TrainConfigError(
            f"--grad-comm-dtype {args.grad_comm_dtype} compresses ZeRO's gradient "
            "reduce-scatters (stages 1-3, a dp axis, no --fsdp); this run has none. Pass "
            "--zero 1, 2 or 3."
        )
    return {"comm_dtype": wire[args.comm_dtype], "grad_comm_dtype": wire[args.grad_comm_dtype]}


def make_config(args: argparse.Namespace) -> gpt.Config:
    if args.vocab < DIGITS + 1:
        raise TrainConfigError(
            f"--vocab {args.vocab}: the task uses {DIGITS} digits and a separator; --vocab >= {DIGITS + 1}."
        )
    if args.seq < 4:
        raise TrainConfigError(
            f"--seq {args.seq}: the task needs --seq >= 4 (digits, SEP, sorted)."
        )
    if args.batch % args.micro_batches:
        raise TrainConfigError(
            f"--batch {args.batch} --micro-batches {args.micro_batches}: the batch is cut into "
            f"equal micro-batches; pick --micro-batches from the divisors of {args.batch}."
        )
    return gpt.Config(
        vocab=args.vocab, dim=args.dim, heads=args.heads, layers=args.layers, seq=args.seq,
        kv_heads=args.kv_heads, mlp=args.mlp, dropout=args.dropout,
    )  # fmt: skip


def make_tx(args: argparse.Namespace, bf16: bool) -> sl.optim.GradientTransformation:
    """clip_by_global_norm(--clip) then adamw on warmup_cosine(--lr/10 -> --lr -> --lr/10)."""
    warmup = min(args.warmup, max(args.steps - 1, 0))
    schedule = sl.optim.warmup_cosine(
        args.lr / 10, args.lr, warmup_steps=warmup, decay_steps=max(args.steps, warmup + 1),
        end_value=args.lr / 10,
    )  # fmt: skip
    tx = sl.optim.chain(
        sl.optim.clip_by_global_norm(args.clip),
        sl.optim.adamw(schedule, weight_decay=args.weight_decay),
    )
    return sl.optim.master_weights(tx) if bf16 else tx


def build(args: argparse.Namespace, mesh: Any = None) -> Setup:
    """Check the flags and build the run: `mesh` (a distributed mesh inside a worker) or a
    simulated one of the flags' axes (none for ``--mesh none``).

    Examples:
        >>> build(parse_args(["--mesh", "dp=2,tp=4", "--tp", "2d", "--zero", "3"])).describe()
        "mesh {'dp': 2, 'r': 2, 'c': 2}, scheme dp('dp') + tp2d('r', 'c'), ZeRO-3, fp32"
    """
    logical = parse_mesh(args.mesh)
    axes, scheme = layout_for(logical, args.tp, args.sp, args.fsdp)
    stage = resolve_zero(args, logical)
    if not axes and args.backend != "sim":
        raise TrainConfigError(
            "--mesh none is the unsharded model in one process: use --backend sim."
        )
    config = make_config(args)
    ring_here = args.sp == "ring" and logical.get("sp", 1) > 1 and mesh is None
    if args.capture and ring_here and args.backend == "sim" and not _under_torchrun():
        raise TrainConfigError(
            "--capture --sp ring: a simulated mesh runs ring attention's devices on threads, "
            "which sl.capture cannot record; add --backend gloo (one process per device), "
            "or drop --capture."
        )
    if mesh is None and axes:
        mesh = sl.Mesh.simulated(axes)
    elif mesh is not None and dict(zip(mesh.axis_names, mesh.shape)) != axes:
        raise TrainConfigError(
            f"build(mesh={mesh!r}): the flags ask for axes {axes}; pass a mesh of those axes "
            "(or mesh=None for a simulated one)."
        )
    bf16 = args.dtype == "bf16"
    uses_zero = "dp" in axes and not args.fsdp
    comm = compressed_comm(args, stage if uses_zero else 0)
    zero = sl.optim.zero(stage, "dp", **comm) if uses_zero else Finish()
    dtype = torch.bfloat16 if bf16 else torch.float32
    return Setup(args, config, axes, mesh, scheme, zero, make_tx(args, bf16), dtype)


def initial_state(setup: Setup) -> tuple[dict[str, Any], Any]:
    """(params in their stored layouts, optimizer state in the state layouts), from gpt.init."""
    params = {k: v.to(setup.dtype) for k, v in gpt.init(setup.config, setup.args.seed).items()}
    if setup.mesh is not None:
        params = snn.shard_params(params, setup.mesh, setup.scheme, gpt.DIMS(setup.config))
    params = _trainable(setup.zero.place(params))
    return params, setup.tx.init(setup.zero.state(params))


def _trainable(params: dict[str, Any]) -> dict[str, Any]:
    """Leaves that require grad (the model passes each linear its weight's dims itself)."""
    for p in params.values():
        p.requires_grad_(True)
    return params


# == one step =====================================================================================
def _value(loss: torch.Tensor) -> float:
    return float((loss.full() if isinstance(loss, sl.ShardedTensor) else loss).item())


def forward_backward(setup: Setup, params: dict[str, Any], mb: dict[str, Any]) -> torch.Tensor:
    """One micro-batch: the loss (detached), its gradient / --micro-batches added to ``.grad``."""
    scheme, mesh = setup.scheme, setup.mesh
    with snn.use(scheme, mesh) if scheme is not None else contextlib.nullcontext():
        loss = gpt.loss(setup.zero.compute(params), mb, setup.config)
        (loss / setup.args.micro_batches).backward()
    return loss.detach()


def train_step(
    setup: Setup, params: dict[str, Any], state: Any, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], Any, float]:
    """One optimizer step on `batch` (cut into --micro-batches): (params, state, mean loss)."""
    z, scheme, mesh, m = setup.zero, setup.scheme, setup.mesh, setup.args.micro_batches
    size = next(iter(batch.values())).shape[0] // m
    total = 0.0
    for i in range(m):
        mb = {k: v[i * size : (i + 1) * size] for k, v in batch.items()}
        if scheme is not None:
            mb = scheme.shard_batch(mb, mesh)
        total += _value(setup.forward_backward(params, mb)) / m
    grads = z.reduce({k: p.grad for k, p in params.items()})
    current = z.state(params)
    updates, state = setup.tx.update(grads, state, current)
    params = _trainable(z.place(sl.optim.apply_updates(current, updates)))
    return params, state, total


# == checkpoints ==================================================================================
def _checkpoint_tree(setup: Setup, params: Any, state: Any, step: int) -> dict[str, Any]:
    return {
        "params": params,
        "opt": state,
        "step": step,
        "data": {"position": step, "seed": setup.args.seed},
        "rng": torch.get_rng_state(),
        "config": asdict(setup.config),
    }


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where step `step`'s checkpoint goes under --ckpt `directory`.

    Examples:
        >>> checkpoint_path("runs/a", 25).as_posix()
        'runs/a/step_000025'
    """
    return Path(directory) / f"step_{step:06d}"


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest ``step_NNNNNN`` checkpoint in `directory` (one a crash left beside its
    name included: `sl.checkpoint.load` finds those), or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    steps = sorted(
        {int(m.group(1)) for p in d.iterdir() if (m := re.match(r"step_(\d{6})(\.|$)", p.name))},
        reverse=True,
    )
    return checkpoint_path(d, steps[0]) if steps else None


def save(setup: Setup, params: Any, state: Any, step: int) -> Path:
    path = checkpoint_path(setup.args.ckpt, step)
    sl.checkpoint.save(path, _checkpoint_tree(setup, params, state, step))
    return path


def restore(setup: Setup, path: Path, params: Any, state: Any) -> tuple[Any, Any, int]:
    """Load `path` onto this run's mesh and layouts (`params`/`state` give them):
    (params, state, step); torch's RNG state is restored."""
    like = _checkpoint_tree(setup, params, state, 0)
    like["data"] = {"position": 0, "seed": 0}
    like["config"] = {k: None for k in like["config"]}
    got = sl.checkpoint.load(path, like)
    if got["config"] != asdict(setup.config):
        diff = {
            k: (v, asdict(setup.config)[k])
            for k, v in got["config"].items()
            if v != asdict(setup.config)[k]
        }
        raise TrainConfigError(
            f"--resume {path}: the checkpoint's model differs from this run's (saved, flags): "
            f"{diff}; pass the model flags it was trained with."
        )
    if got["data"]["seed"] != setup.args.seed:
        raise TrainConfigError(
            f"--resume {path}: the checkpoint's data seed is {got['data']['seed']} but --seed is "
            f"{setup.args.seed}; the resumed run would train on other batches. Pass --seed "
            f"{got['data']['seed']}."
        )
    torch.set_rng_state(got["rng"])
    return _trainable(got["params"]), got["opt"], int(got["data"]["position"])


# == the run ======================================================================================
@dataclass
class Result:
    """A run's outcome: per-step losses (steps numbered from 1), one step's ledger, speed."""

    steps: list[int]
    losses: list[float]
    ledger: str = ""  # the summary of the last step's ledger
    records: list[Any] = field(default_factory=list)  # its CommRecords
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    describe: str = ""
    start: int = 0  # the step resumed from
    checkpoints: list[str] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # final values, plain
    recorded: int = 0  # --capture: the programs sl.capture recorded (every other call replayed)

    def mean_loss(self, first: bool, n: int = 10) -> float:
        part = self.losses[:n] if first else self.losses[-n:]
        return sum(part) / max(len(part), 1)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


class _Progress:
    """tqdm when installed (loss and tokens/s as its postfix), else a line every tenth."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar, self.quiet, self.total, self.done = None, quiet, total, 0
        if quiet:
            return
        try:
            from tqdm import tqdm
        except ModuleNotFoundError:
            print("(tqdm is not installed: plain progress lines; pip install tqdm)")
        else:
            self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.done += 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            self.bar.update(1)
        elif self.done == 1 or self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"step {step}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(setup: Setup) -> Result:
    """Train on `setup` (this process's part of the mesh): the loop, checkpoints, the ledger."""
    args = setup.args
    torch.manual_seed(args.seed)  # every process the same seed (dropout draws torch's stream)
    params, state = initial_state(setup)
    start = 0
    if args.resume:
        path = Path(args.resume) if args.resume is not True else None
        if path is None:
            if not args.ckpt:
                raise TrainConfigError("--resume without a path needs --ckpt DIR to look in.")
            path = latest_checkpoint(args.ckpt)
            if path is None:
                raise TrainConfigError(
                    f"--resume: no step_NNNNNN checkpoint in --ckpt {args.ckpt}; train with "
                    "--ckpt DIR first, or pass --resume PATH."
                )
        params, state, start = restore(setup, path, params, state)
    rank0 = _is_rank0()
    result = Result([], [], describe=setup.describe(), start=start)
    tokens = args.batch * args.seq
    progress = _Progress(max(args.steps - start, 0), args.quiet or not rank0)
    timed, timed_steps, t_run = 0.0, 0, time.perf_counter()
    for step in range(start, args.steps):
        batch = make_batch(args.seed, step, args.batch, args.seq)
        t0 = time.perf_counter()
        last = step == args.steps - 1
        with sl.comm_ledger() if last else contextlib.nullcontext() as led:
            params, state, loss = train_step(setup, params, state, batch)
        dt = time.perf_counter() - t0
        if step > start or last:  # the first step plans every move: not timed
            timed, timed_steps = timed + dt, timed_steps + 1
            result.tokens_per_s = tokens * timed_steps / max(timed, 1e-9)
        result.steps.append(step + 1)
        result.losses.append(loss)
        progress.update(step + 1, loss, result.tokens_per_s or tokens / dt)
        if led is not None:
            result.ledger, result.records = led.summary(), list(led.records)
        if args.ckpt and ((step + 1) % args.ckpt_every == 0 or last):
            result.checkpoints.append(str(save(setup, params, state, step + 1)))
    progress.close()
    result.seconds = time.perf_counter() - t_run
    if args.capture:
        result.recorded = sum(map(len, setup.forward_backward.programs.values()))
    with torch.no_grad():
        result.params = {
            k: (p.full() if isinstance(p, sl.ShardedTensor) else p).detach().clone()
            for k, p in params.items()
        }
    return result


def _run_on_rank(mesh: Any, args: argparse.Namespace) -> Result:
    """A worker's entry (sl.launch, torchrun): the run on this process's part of `mesh`."""
    return run(build(args, mesh))


def train(args: argparse.Namespace, mesh: Any = None) -> Result:
    """Run the training the flags describe and return rank 0's `Result`.

    `mesh` given: run on it (a worker's distributed mesh). Otherwise ``--backend sim``
    builds a simulated mesh here, ``--backend gloo`` launches one local process per
    device (`sl.launch`), and under torchrun each process runs on `sl.Mesh.distributed`.

    Examples:
        >>> tiny = ["--dim", "16", "--layers", "1", "--seq", "8", "--batch", "4", "--quiet"]
        >>> r = train(parse_args([*tiny, "--mesh", "dp=2", "--steps", "2"]))
        >>> r.steps, r.describe, sorted({rec.cause for rec in r.records if "zero" in rec.cause})
        ([1, 2], "mesh {'dp': 2}, scheme dp('dp'), ZeRO-1, fp32", ['zero.place', 'zero.reduce'])
    """
    if mesh is not None:
        return run(build(args, mesh))
    setup = build(args)  # checks every flag before any process starts
    if args.backend == "sim" and not _under_torchrun():
        return run(setup)
    return sl.launch(_run_on_rank, setup.axes, backend="gloo", args=(args,))[0]


def _under_torchrun() -> bool:
    """torchrun's environment is set (the test `sl.launch` makes to run in-process)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    )


# == output =======================================================================================
def plot(result: Result, path: str, title: str) -> bool:
    """The loss curve as a PNG at `path`; False (with a note) when matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("(matplotlib is not installed: no loss-curve PNG; pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(result.steps, result.losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy on the sorted half)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(result: Result, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Print the ledger of one step, the loss summary and speed; write the plot."""
    print(result.describe)
    if not result.losses:
        print(f"nothing to train: resumed at step {result.start}, --steps {args.steps}")
        return
    print(f"\nledger of one step (step {result.steps[-1]}):")
    print(result.ledger or "  no collectives (one device)")
    n = min(10, len(result.losses))
    print(
        f"\nloss: first {n} steps {result.mean_loss(True):.4f} -> last {n} {result.mean_loss(False):.4f}"
        f" (steps {result.steps[0]}..{result.steps[-1]}); {result.tokens_per_s:,.0f} tokens/s, "
        f"{result.seconds:.1f} s"
    )
    if args.capture:
        calls = len(result.losses) * args.micro_batches
        print(
            f"sl.capture: {result.recorded} program(s) recorded, {calls - result.recorded} of "
            f"{calls} forward+backward calls replayed"
        )
    if result.checkpoints:
        print(f"checkpoints: {', '.join(result.checkpoints)}")
    if not args.no_plot and plot(result, args.out, result.describe):
        print(f"loss curve: {args.out}")
    print("reproduce: " + shlex.join(["python", "examples/train_gpt.py", *argv]))


# == command line =================================================================================
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags (see the module docstring); `argv` None reads ``sys.argv``.

    Examples:
        >>> a = parse_args(["--mesh", "tp=8", "--tp", "3d", "--resume"])
        >>> a.mesh, a.tp, a.zero, a.resume, a.steps
        ('tp=8', '3d', None, True, 300)
    """
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    # fmt: off
    a("--mesh", default="dp=2,tp=2", help="logical axes dp, tp, sp with sizes, or none (default dp=2,tp=2)")
    a("--tp", choices=TP_KINDS, default=None, help="tensor-parallel grid the tp axis is factored into (default 1d if tp)")
    a("--sp", choices=SP_KINDS, default="none", help="sequence parallelism (megatron: over tp; ulysses/ring: the sp axis)")
    a("--fsdp", action="store_true", help="store weights split over dp (snn.fsdp) instead of replicated")
    a("--zero", type=int, default=None, help="ZeRO stage 0-3 over dp (default 1 with a dp axis, else 0)")
    a("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: bf16 params and compute, fp32 master weights")
    a("--comm-dtype", choices=COMM_DTYPES, default=None, help="ZeRO-3's weight gathers in this wire format (ZeRO++ qwZ)")
    a("--grad-comm-dtype", choices=COMM_DTYPES, default=None,
      help="ZeRO 1-3's gradient reduce-scatters in this wire format (ZeRO++ qgZ)")
    a("--backend", choices=("sim", "gloo"), default="sim", help="sim: one process; gloo: one local process per device")
    a("--steps", type=int, default=300)
    a("--batch", type=int, default=16, help="sequences per step (global)")
    a("--micro-batches", type=int, default=1, help="gradient accumulation: the batch in this many parts")
    a("--lr", type=float, default=3e-3, help="peak learning rate (warmup then cosine to lr/10)")
    a("--warmup", type=int, default=20, help="warmup steps")
    a("--weight-decay", type=float, default=0.01)
    a("--clip", type=float, default=1.0, help="clip_by_global_norm's max norm")
    a("--seed", type=int, default=0, help="init, data and dropout seed")
    a("--vocab", type=int, default=16)
    a("--dim", type=int, default=64)
    a("--heads", type=int, default=4)
    a("--kv-heads", type=int, default=None)
    a("--layers", type=int, default=2)
    a("--seq", type=int, default=32)
    a("--mlp", type=int, default=None, help="MLP width (default 4 * dim)")
    a("--dropout", type=float, default=0.0)
    a("--ckpt", default=None, help="checkpoint directory (DIR/step_NNNNNN)")
    a("--ckpt-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    a("--resume", nargs="?", const=True, default=None,
      help="continue from the newest checkpoint in --ckpt (or from PATH)")
    a("--out", default="train_gpt.png", help="loss-curve PNG")
    a("--no-plot", action="store_true", help="no PNG")
    a("--quiet", action="store_true", help="no progress bar")
    a("--capture", action="store_true",
      help="replay each micro-batch's forward+backward with sl.capture (recorded on the first step)")
    a("--threads", type=int, default=1,
      help="torch intra-op threads (main() sets it; tiny matrices run fastest on one)")
    # fmt: on
    args = p.parse_args(argv)
    for name in ("steps", "batch", "micro_batches", "ckpt_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> Result:
    """Parse the flags, train, and (on rank 0) print the report and write the plot.

    A bad flag combination exits with status 2 and the message saying what is valid.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = train(args)
    except TrainConfigError as e:
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    if _is_rank0():
        report(result, args, argv)
    return result


if __name__ == "__main__":
    main()
