"""Every parallel scheme on one GPT: bytes per device from the ledger beside the papers' figures.

For a model size and a device count from flags, runs one forward+backward of
`shardlib.nn.gpt` under each scheme (dp, fsdp, tp1d, tp1d+sp, tp2d, tp2p5d,
tp3d, ulysses, ring zigzag, dp+tp1d, fsdp+tp1d, dp+tp2d) on a simulated mesh
(or on local gloo processes with ``--backend gloo``) and prints one row per
scheme:

- bytes per device forward and backward from `sl.comm_ledger()` (the records'
  ``direction``; backward includes finishing every gradient to its parameter's
  layout: a data-parallel gradient the engine keeps lazily partial is
  all-reduced here, so dp's backward shows its all-reduce);
- the paper's figure beside each: DESIGN §8's bytes per linear / attention
  summed over the model's linears, plus the model's own terms the table leaves
  out (embedding lookup, RMSNorm statistics, the cross-entropy's reductions,
  the loss's scalar, data-parallel gradient all-reduces), each a small
  function below (`paper_bytes`); element size = the dtype's;
- parameter bytes per device (the largest local block of every parameter,
  summed) and activation bytes per device at the residual-stream constraint
  point ``("batch", "seq", "embed")``;
- the loss's and the gradients' largest relative error against the unsharded
  float64 model, and a check column: ours <= paper, forward and backward.

It writes a grouped bar chart (ours vs paper per scheme, forward and backward
stacked) to ``--out`` and prints the command that reproduces the run.

    pip install -c constraints.txt -e ".[examples]"
    python examples/parallel_schemes.py --devices 4 --out /tmp/schemes.png
    python examples/parallel_schemes.py --schemes tp1d,tp2d --backend gloo

Meshes come from the device count P: each scheme takes the smallest device
count >= P it can be laid out on (tp2d needs q*q, tp2p5d d*q*q with d >= 2,
tp3d q**3, the compositions a dp axis of 2), so P=4 gives tp1d {tp: 4}, tp2d
{r: 2, c: 2}, ulysses {sp: 4}, and tp2p5d {d: 2, r: 2, c: 2}, tp3d {i: 2, j: 2,
k: 2} on 8. Under gloo at most 8 ranks (loopback only); a scheme needing more
is skipped with a note.

Ring model (DESIGN §4): over a group of p devices, all-gather and
reduce-scatter of an n-element tensor send (p-1)·ceil(n/p) elements per
device, all-reduce twice that, an all-to-all (p-1)/p of the local block.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

import shardlib as sl
from shardlib import nn as snn
from shardlib.layouts._shard import local_shape
from shardlib.nn import gpt

RESIDUAL = ("batch", "seq", "embed")
INT64 = 8  # bytes of a token id / position / target


# == sizes and the ring model ==================================================================
@dataclass(frozen=True)
class Sizes:
    """The model and batch sizes the formulas read (T = b·s tokens; e = element size)."""

    b: int
    s: int
    h: int
    kv: int  # kv_heads * head_dim
    f: int
    V: int
    L: int
    e: int

    @property
    def T(self) -> int:
        return self.b * self.s

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear: per layer wq, wk, wv, wo, w_up, w_down; then the head."""
        h, kv, f = self.h, self.kv, self.f
        layer = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (f, h)]
        return layer * self.L + [(h, self.V)]

    @property
    def matrices(self) -> int:
        """Elements of every weight matrix (the embedding table included)."""
        return self.V * self.h + sum(i * o for i, o in self.linears())

    @property
    def vectors(self) -> int:
        """Elements of the norm weights (2 per layer and the final norm)."""
        return (2 * self.L + 1) * self.h

    @property
    def norms(self) -> int:
        return 2 * self.L + 1


def _chunk(n: float, p: int) -> int:
    """Elements per device of an n-element tensor cut in p chunks (the last ones padded)."""
    return math.ceil(n / p - 1e-9)


def ag(n: float, p: int, e: int) -> float:
    """All-gather (or reduce-scatter) of an n-element tensor over p devices: bytes per device."""
    return 0 if p <= 1 else (p - 1) * _chunk(n, p) * e


rs = ag


def ar(n: float, p: int, e: int) -> float:
    """All-reduce of n elements over p devices (reduce-scatter + all-gather)."""
    return 2 * ag(n, p, e)


def a2a(n_local: float, p: int, e: int) -> float:
    """All-to-all of an n_local-element block over p devices."""
    return 0 if p <= 1 else (p - 1) / p * n_local * e


# == the papers' figures per scheme (forward, backward), bytes per device =========================
# Each returns (forward, backward) for one forward+backward of the whole model. Terms named after
# DESIGN §8's table; the model's own terms (embedding, norms, cross-entropy, loss, gradient
# all-reduces) follow what a hand-written implementation of the scheme must send.


def _ce(z: Sizes, tokens: float, v: int) -> tuple[float, float]:
    """log_softmax over a vocab split over v devices: max and sum-exp per token all-reduced;
    backward: the sum of dy per token all-reduced."""
    return 2 * ar(tokens, v, z.e), ar(tokens, v, z.e)


def _loss(z: Sizes, group: int) -> float:
    """The mean's scalar, partial over every axis splitting tokens or vocab: one all-reduce."""
    return ar(1, group, z.e)


def dp_bytes(z: Sizes, a: int) -> tuple[float, float]:
    """dp: nothing forward but the loss; backward every gradient all-reduced, 2(P-1)/P·Ψ."""
    return _loss(z, a), ar(z.matrices + z.vectors, a, z.e)


def fsdp_bytes(z: Sizes, a: int) -> tuple[float, float]:
    """FSDP/ZeRO-3 (remat): all-gather every matrix forward; backward re-gather it and
    reduce-scatter its gradient (3Ψ in all); the replicated norms' gradients all-reduced."""
    fwd = ag(z.matrices, a, z.e) + _loss(z, a)
    bwd = 2 * ag(z.matrices, a, z.e) + ar(z.vectors, a, z.e)
    return fwd, bwd


def tp1d_bytes(z: Sizes, t: int, a: int = 1) -> tuple[float, float]:
    """Megatron over t (tokens split a ways by dp): per layer 2 all-reduces of bsh each way;
    vocab-parallel embedding (all-reduce forward) and head (dX all-reduced backward);
    vocab-parallel cross-entropy."""
    T = z.T / a
    ce_f, ce_b = _ce(z, T, t)
    fwd = (2 * z.L + 1) * ar(T * z.h, t, z.e) + ce_f + _loss(z, a * t)
    bwd = (2 * z.L + 1) * ar(T * z.h, t, z.e) + ce_b
    return fwd, bwd


def tp1d_sp_bytes(z: Sizes, t: int, a: int = 1) -> tuple[float, float]:
    """Megatron-SP: per layer 2 x (all-gather + reduce-scatter of bsh) each way; the embedding
    reduce-scattered (dY all-gathered back), the head's input all-gathered (dX
    reduce-scattered); norm gradients all-reduced over the sequence split."""
    T = z.T / a
    ce_f, ce_b = _ce(z, T, t)
    per = 2 * z.L * (ag(T * z.h, t, z.e) + rs(T * z.h, t, z.e))
    fwd = per + rs(T * z.h, t, z.e) + ag(T * z.h, t, z.e) + ce_f + _loss(z, a * t)
    bwd = per + ag(T * z.h, t, z.e) + rs(T * z.h, t, z.e) + ce_b + ar(z.vectors, a * t, z.e)
    return fwd, bwd


def _vector_grads(z: Sizes, tokens_group: int, c: int) -> float:
    """Norm weights under 2D/2.5D/3D, stored split over the c devices splitting embed (like the
    activations' last dim): each gradient block (h/c) all-reduced over the devices splitting
    tokens."""
    return z.norms * ar(z.h / c, tokens_group, z.e)


def tp2d_bytes(z: Sizes, q: int, a: int = 1) -> tuple[float, float]:
    """SUMMA on q x q (tokens also split a ways): per linear (q-1)/q²·(bsh + hh') each way
    (kept operands); vocab-parallel embedding over r; RMSNorm statistics over c."""
    T = z.T / a
    lin = sum(ag(T / q * i, q, z.e) + ag(i * o / q, q, z.e) for i, o in z.linears())
    emb_f = ag(T, q, INT64) + rs(T * z.h / q, q, z.e)
    emb_b = ag(T * z.h / q, q, z.e)
    norms = z.norms * ar(T / q, q, z.e)
    ce_f, ce_b = _ce(z, T / q, q)
    fwd = lin + emb_f + norms + ce_f + _loss(z, a * q * q)
    bwd = lin + emb_b + norms + ce_b + _vector_grads(z, a * q, q)
    if a > 1:  # data parallel: every matrix block's gradient all-reduced over dp
        bwd += ar(z.matrices / (q * q), a, z.e)
    return fwd, bwd


def tp2p5d_bytes(z: Sizes, d: int, q: int) -> tuple[float, float]:
    """Tesseract, d x q x q: per linear (q-1)/q²·(bsh/d + hh') each way, plus dW all-reduced
    over d, 2(d-1)/d·hh'/q² (the table's row); embedding, norms, cross-entropy as in 2D
    within each depth slice."""
    T = z.T / d
    lin = sum(ag(T / q * i, q, z.e) + ag(i * o / q, q, z.e) for i, o in z.linears())
    dw = sum(ar(i * o / (q * q), d, z.e) for i, o in z.linears()) + ar(z.V * z.h / (q * q), d, z.e)
    emb_f = ag(T, q, INT64) + rs(T * z.h / q, q, z.e)
    emb_b = ag(T * z.h / q, q, z.e)
    norms = z.norms * ar(T / q, q, z.e)
    ce_f, ce_b = _ce(z, T / q, q)
    fwd = lin + emb_f + norms + ce_f + _loss(z, d * q * q)
    bwd = lin + dw + emb_b + norms + ce_b + _vector_grads(z, d * q, q)
    return fwd, bwd


def tp3d_bytes(z: Sizes, q: int, a: int = 1) -> tuple[float, float]:
    """3D on q³: per linear (q-1)/q³·(bsh + hh' + bsh') each way; the embedding's table split
    over (j, i) (token ids all-gathered over them, the lookup reduce-scattered); RMSNorm
    statistics over k; the targets permuted to the logits' token layout ((i, j) -> (i, k))."""
    T = z.T / a
    lin = sum(
        ag(T / q * i / q, q, z.e) + ag(i * o / (q * q), q, z.e) + rs(T * o / (q * q), q, z.e)
        for i, o in z.linears()
    )
    emb_f = ag(T, q * q, INT64) + rs(T * z.h / q, q * q, z.e)
    emb_b = ag(T * z.h / q, q * q, z.e)
    norms = z.norms * ar(T / (q * q), q, z.e)
    ce_f, ce_b = _ce(z, T / (q * q), q)
    targets = T / (q * q) * INT64  # one permute of each device's block
    fwd = lin + emb_f + norms + ce_f + targets + _loss(z, a * q**3)
    bwd = lin + emb_b + norms + ce_b + _vector_grads(z, a * q * q, q)
    if a > 1:
        bwd += ar(z.matrices / q**3, a, z.e)
    return fwd, bwd


def ulysses_bytes(z: Sizes, p: int, heads: int, kv_heads: int, d: int) -> tuple[float, float]:
    """Ulysses: per attention 4 all-to-alls, (P-1)/P²·bs·d·(2H + 2H_kv), each way; weight
    gradients all-reduced over the sequence split as in dp."""
    per = 2 * a2a(z.T / p * heads * d, p, z.e) + 2 * a2a(z.T / p * kv_heads * d, p, z.e)
    return z.L * per + _loss(z, p), z.L * per + ar(z.matrices + z.vectors, p, z.e)


def ring_bytes(z: Sizes, p: int) -> tuple[float, float]:
    """Ring: per attention (P-1) ppermutes of K and V, 2(P-1)/P·bs·H_kv·d (and the block's global
    positions, which travel with K/V for the causal mask); backward K, V again plus P sends of
    dK, dV; weight gradients all-reduced over the sequence split."""
    kv_block = z.T / p * z.kv * z.e
    fwd = z.L * (p - 1) * (2 * kv_block + z.T / p * INT64) + _loss(z, p)
    bwd = z.L * ((p - 1) * 2 * kv_block + p * 2 * kv_block) + ar(z.matrices + z.vectors, p, z.e)
    return fwd, bwd


def fsdp_tp1d_bytes(z: Sizes, a: int, t: int) -> tuple[float, float]:
    """FSDP over a on top of Megatron over t: tp1d's bytes on T/a tokens plus FSDP's gathers of
    each tp shard (1/t of the matrices) over a; norm gradients all-reduced over a."""
    f1, b1 = tp1d_bytes(z, t, a)
    shard = z.matrices / t
    return f1 + ag(shard, a, z.e), b1 + 2 * ag(shard, a, z.e) + ar(z.vectors, a, z.e)


def dp_tp1d_bytes(z: Sizes, a: int, t: int) -> tuple[float, float]:
    """dp over a on top of Megatron over t: tp1d's bytes on T/a tokens plus the all-reduce over
    a of each device's gradients (1/t of the matrices, the whole norms)."""
    f1, b1 = tp1d_bytes(z, t, a)
    return f1, b1 + ar(z.matrices / t + z.vectors, a, z.e)


# == the schemes: name -> (mesh from a device count, scheme, paper figure) ========================
Axes = dict[str, int]


def _flat(axis: str) -> Callable[[int], Axes | None]:
    return lambda n: {axis: n} if n >= 2 else None


def _square(n: int) -> int | None:
    q = math.isqrt(n)
    return q if q >= 2 and q * q == n else None


def _cube(n: int) -> int | None:
    q = round(n ** (1 / 3))
    return q if q >= 2 and q**3 == n else None


def _tp2p5d_mesh(n: int) -> Axes | None:
    for q in range(math.isqrt(n), 1, -1):  # the largest grid with depth >= 2
        if n % (q * q) == 0 and n // (q * q) >= 2:
            return {"d": n // (q * q), "r": q, "c": q}
    return None


def _dp_square(n: int) -> Axes | None:
    q = _square(n // 2) if n % 2 == 0 else None
    return {"dp": 2, "r": q, "c": q} if q else None


@dataclass(frozen=True)
class Case:
    """One row of the table: how to lay the mesh out, the scheme, its paper figure."""

    name: str
    mesh: Callable[[int], Axes | None]  # device count -> mesh axes, None if it cannot
    scheme: Callable[[], snn.Scheme]
    paper: Callable[[Sizes, Axes, gpt.Config], tuple[float, float]]
    doc: str = field(default="")


CASES: tuple[Case, ...] = (
    Case("dp", _flat("dp"), lambda: snn.dp("dp"), lambda z, m, c: dp_bytes(z, m["dp"])),
    Case("fsdp", _flat("dp"), lambda: snn.fsdp("dp"), lambda z, m, c: fsdp_bytes(z, m["dp"])),
    Case("tp1d", _flat("tp"), lambda: snn.tp1d("tp"), lambda z, m, c: tp1d_bytes(z, m["tp"])),
    Case(
        "tp1d+sp",
        _flat("tp"),
        lambda: snn.tp1d("tp", sequence=True),
        lambda z, m, c: tp1d_sp_bytes(z, m["tp"]),
    ),
    Case(
        "tp2d",
        lambda n: {"r": q, "c": q} if (q := _square(n)) else None,
        lambda: snn.tp2d("r", "c"),
        lambda z, m, c: tp2d_bytes(z, m["r"]),
    ),
    Case(
        "tp2p5d",
        _tp2p5d_mesh,
        lambda: snn.tp2p5d("d", "r", "c"),
        lambda z, m, c: tp2p5d_bytes(z, m["d"], m["r"]),
    ),
    Case(
        "tp3d",
        lambda n: {"i": q, "j": q, "k": q} if (q := _cube(n)) else None,
        lambda: snn.tp3d("i", "j", "k"),
        lambda z, m, c: tp3d_bytes(z, m["i"]),
    ),
    Case(
        "ulysses",
        _flat("sp"),
        lambda: snn.ulysses("sp"),
        lambda z, m, c: ulysses_bytes(z, m["sp"], c.heads, c.kv_heads, c.head_dim),
    ),
    Case(
        "ring",
        _flat("sp"),
        lambda: snn.ring("sp", balance="zigzag"),
        lambda z, m, c: ring_bytes(z, m["sp"]),
    ),
    Case(
        "dp+tp1d",
        lambda n: {"dp": 2, "tp": n // 2} if n % 2 == 0 and n >= 4 else None,
        lambda: snn.dp("dp") + snn.tp1d("tp"),
        lambda z, m, c: dp_tp1d_bytes(z, m["dp"], m["tp"]),
    ),
    Case(
        "fsdp+tp1d",
        lambda n: {"dp": 2, "tp": n // 2} if n % 2 == 0 and n >= 4 else None,
        lambda: snn.fsdp("dp") + snn.tp1d("tp"),
        lambda z, m, c: fsdp_tp1d_bytes(z, m["dp"], m["tp"]),
    ),
    Case(
        "dp+tp2d",
        _dp_square,
        lambda: snn.dp("dp") + snn.tp2d("r", "c"),
        lambda z, m, c: tp2d_bytes(z, m["r"], m["dp"]),
    ),
)
BY_NAME = {c.name: c for c in CASES}


def mesh_for(case: Case, devices: int, limit: int = 64) -> Axes | None:
    """The smallest mesh >= `devices` devices (at most `limit`) the case can be laid out on."""
    for n in range(devices, limit + 1):
        axes = case.mesh(n)
        if axes is not None:
            return axes
    return None


# == one measurement ==============================================================================
@dataclass
class Row:
    """One scheme's measurement (bytes per device)."""

    scheme: str
    mesh: Axes
    fwd: int
    bwd: int
    paper_fwd: float
    paper_bwd: float
    param_bytes: int
    act_bytes: int
    loss_err: float
    grad_err: float
    seconds: float

    @property
    def ok(self) -> bool:
        """Ours at or below the paper's figure, forward and backward."""
        return self.fwd <= self.paper_fwd and self.bwd <= self.paper_bwd


def make_batch(config: gpt.Config, batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randint(0, config.vocab, (batch, config.seq), generator=g)
        for k in ("tokens", "targets")
    }


def reference(config: gpt.Config, batch: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the unsharded float64 model."""
    params = {k: v.double().requires_grad_() for k, v in gpt.init(config).items()}
    value = gpt.loss(params, make_batch(config, batch), config)
    value.backward()
    return value.item(), {k: v.grad for k, v in params.items()}


def measure(
    mesh: sl.Mesh, name: str, config: gpt.Config, batch: int, dtype: torch.dtype, ref
) -> Row:
    """One forward+backward of the GPT under scheme `name` on `mesh`: ledger bytes and errors.

    Runs on every rank under gloo (each measures its own devices; the ledger
    records the busiest device's bytes, the same on every rank).
    """
    t0 = time.perf_counter()
    case = BY_NAME[name]
    scheme = case.scheme()
    params = {k: v.to(dtype) for k, v in gpt.init(config).items()}
    sparams = snn.shard_params(params, mesh, scheme, gpt.DIMS(config))
    for v in sparams.values():
        v.requires_grad_()
    sbatch = scheme.shard_batch(make_batch(config, batch), mesh)
    with sl.comm_ledger() as led, snn.use(scheme, mesh):
        value = gpt.loss(sparams, sbatch, config)
        value.backward()
    with sl.comm_ledger() as finish:  # gradients a dp axis left lazily partial: all-reduced now
        for v in sparams.values():
            if v.grad.spec != v.spec:
                v.grad = sl.reshard(v.grad, v.spec)
    fwd = led.bytes_by(direction="forward")
    bwd = led.bytes_by(direction="backward") + finish.total_bytes

    ref_loss, ref_grads = ref
    loss_err = abs(value.full().item() - ref_loss) / abs(ref_loss)
    grad_err = max(
        ((v.grad.full().double() - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item()
        for k, v in sparams.items()
    )
    e = torch.empty((), dtype=dtype).element_size()
    param_bytes = sum(
        max(
            math.prod(local_shape(tuple(p.shape), p.spec, mesh.abstract, d))
            for d in range(mesh.size)
        )
        * e
        for p in sparams.values()
    )
    shape = (batch, config.seq, config.dim)
    act = scheme.act_layout(RESIDUAL)
    act_bytes = (
        max(math.prod(local_shape(shape, act, mesh.abstract, d)) for d in range(mesh.size)) * e
    )
    z = sizes(config, batch, e)
    paper_fwd, paper_bwd = case.paper(z, dict(mesh.axes), config)
    return Row(
        name, dict(mesh.axes), fwd, bwd, paper_fwd, paper_bwd, param_bytes, act_bytes,
        loss_err, grad_err, time.perf_counter() - t0,
    )  # fmt: skip


def _measure_rank(mesh: sl.Mesh, name, config, batch, dtype, ref) -> Row:
    """`measure` on one gloo rank (top level, so `sl.launch` can pickle it)."""
    torch.set_num_threads(1)
    return measure(mesh, name, config, batch, dtype, ref)


def sizes(config: gpt.Config, batch: int, e: int) -> Sizes:
    return Sizes(
        b=batch, s=config.seq, h=config.dim, kv=config.kv_heads * config.head_dim,
        f=config.mlp, V=config.vocab, L=config.layers, e=e,
    )  # fmt: skip


# == output =======================================================================================
def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def format_table(rows: Sequence[Row]) -> str:
    """The table as text (KiB per device; `ok`: ours <= paper forward and backward)."""
    head = (
        "scheme", "mesh", "fwd KiB", "paper", "bwd KiB", "paper", "params KiB", "acts KiB",
        "loss rel err", "grad rel err", "ok", "s",
    )  # fmt: skip
    lines = [head]
    for r in rows:
        mesh = "{" + ",".join(f"{a}:{n}" for a, n in r.mesh.items()) + "}"
        lines.append((
            r.scheme, mesh, _kib(r.fwd), _kib(r.paper_fwd), _kib(r.bwd), _kib(r.paper_bwd),
            _kib(r.param_bytes), _kib(r.act_bytes), f"{r.loss_err:.1e}", f"{r.grad_err:.1e}",
            "yes" if r.ok else "NO", f"{r.seconds:.1f}",
        ))  # fmt: skip
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    return "\n".join(
        "  ".join(cell.rjust(w) if c > 1 else cell.ljust(w) for c, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )  # fmt: skip


def plot(rows: Sequence[Row], path: str, title: str) -> None:
    """Grouped bars per scheme: ours and the paper's figure, forward and backward stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    kib = [[v / 1024 for v in vals] for vals in (
        [r.fwd for r in rows], [r.bwd for r in rows],
        [r.paper_fwd for r in rows], [r.paper_bwd for r in rows],
    )]  # fmt: skip
    left = [i - width / 2 for i in x]
    right = [i + width / 2 for i in x]
    ax.bar(left, kib[0], width, label="ours forward", color="#1f77b4")
    ax.bar(left, kib[1], width, bottom=kib[0], label="ours backward", color="#9ecae1")
    ax.bar(right, kib[2], width, label="paper forward", color="#d62728")
    ax.bar(right, kib[3], width, bottom=kib[2], label="paper backward", color="#f4a6a6")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r.scheme for r in rows], rotation=30, ha="right")
    ax.set_ylabel("KiB sent per device (forward + backward)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _Progress:
    """tqdm when installed, else one printed line per step (with a note once)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None
        self.quiet = quiet
        self.total = total
        self.done = 0
        try:
            from tqdm import tqdm
        except ModuleNotFoundError:
            if not quiet:
                print("(tqdm is not installed: plain progress lines; pip install tqdm)")
        else:
            self.bar = tqdm(total=total, unit="scheme", disable=quiet, file=sys.stderr)

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
        elif not self.quiet:
            print(f"[{self.done + 1}/{self.total}] {label} ...", flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# == command line =================================================================================
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--devices",
        "--mesh-size",
        type=int,
        default=4,
        dest="devices",
        help="device count P each scheme's mesh is built from (default 4)",
    )
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mlp", type=int, default=None, help="MLP width (default 4 * dim)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--schemes",
        default=",".join(BY_NAME),
        help=f"comma-separated subset of {','.join(BY_NAME)}",
    )
    p.add_argument("--out", default="parallel_schemes.png", help="bar chart PNG path")
    p.add_argument("--backend", choices=("sim", "gloo"), default="sim")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run every chosen scheme, print the table and the reproducing command, write the chart.

    Returns the rows (one per scheme run); an unknown scheme name raises
    SystemExit with the valid names.
    """
    args = parse_args(argv)
    names = [n.strip() for n in args.schemes.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(
            f"--schemes: unknown scheme {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(BY_NAME)}"
        )
    config = gpt.Config(
        vocab=args.vocab, dim=args.dim, heads=args.heads, layers=args.layers, seq=args.seq,
        kv_heads=args.kv_heads, mlp=args.mlp,
    )  # fmt: skip
    dtype = getattr(torch, args.dtype)
    limit = 8 if args.backend == "gloo" else 64
    plan = []
    for name in names:
        axes = mesh_for(BY_NAME[name], args.devices, limit)
        if axes is None:
            print(f"skipping {name}: no mesh of {args.devices}..{limit} devices fits it")
            continue
        plan.append((name, axes))
    print(f"model: {config}, batch {args.batch}, {args.dtype}; backend {args.backend}")
    ref = reference(config, args.batch)
    rows: list[Row] = []
    progress = _Progress(len(plan), args.quiet)
    for name, axes in plan:
        progress.step(f"{name} {axes}")
        if args.backend == "sim":
            rows.append(measure(sl.Mesh.simulated(axes), name, config, args.batch, dtype, ref))
        else:
            t0 = time.perf_counter()
            per_rank = sl.launch(
                _measure_rank, axes, backend="gloo", args=(name, config, args.batch, dtype, ref)
            )
            row = per_rank[0]
            row.seconds = time.perf_counter() - t0  # process start-up included
            rows.append(row)
        progress.advance()
    progress.close()

    print()
    print(format_table(rows))
    bad = [r.scheme for r in rows if not r.ok]
    print(f"\nok: ours <= paper forward and backward ({len(rows) - len(bad)} of {len(rows)})"
          + (f"; above the paper: {', '.join(bad)}" if bad else ""))  # fmt: skip
    title = (f"GPT vocab={config.vocab} dim={config.dim} heads={config.heads}/{config.kv_heads} "
             f"layers={config.layers} seq={config.seq} batch={args.batch} ({args.backend})")  # fmt: skip
    plot(rows, args.out, title)
    print(f"chart: {args.out}")
    command = [
        "python",
        "examples/parallel_schemes.py",
        *(argv if argv is not None else sys.argv[1:]),
    ]
    print("reproduce: " + shlex.join(command))
    return rows


if __name__ == "__main__":
    main()
