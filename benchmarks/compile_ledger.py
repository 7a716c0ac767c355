"""What the ledger's graph nodes cost a compiled step (`shardlib::comm_record`).

Under torch.compile every collective's record is a node of the compiled graph
(`shardlib/collectives/_ledger.py`), so each call records. This times the
compiled GPT step (``gpt.loss`` forward + ``.backward()``, simulated tp1d mesh,
one thread) with those nodes and without them (the same step compiled with
`_emit` switched off: the graph of before, which records nothing at run time),
with a ledger open and without, for each backend; median ms over ``--steps``
calls after ``--warmup``, and the records one call made. Last, the op alone:
microseconds per ``comm_record`` call from Python (the dispatcher call and the
empty token; a compiled graph pays about this per record).

    python benchmarks/compile_ledger.py [--steps 30] [--warmup 3] [--tp 2]
        [--backends aot_eager,inductor] [--dim 64 --heads 4 --layers 2 --seq 32 --vocab 128]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

import shardlib as sl
import shardlib.collectives._ledger as ledger
from shardlib import nn as snn
from shardlib.nn import gpt


def step_times(cfg, tp: int, backend: str, nodes: bool, steps: int, warmup: int):
    torch._dynamo.reset()
    mesh, scheme = sl.Mesh.simulated({"tp": tp}), snn.tp1d("tp")
    params = snn.shard_params(gpt.init(cfg, 0), mesh, scheme, gpt.DIMS(cfg))
    for v in params.values():
        v.requires_grad_()
    g = torch.Generator().manual_seed(0)
    raw = {k: torch.randint(0, cfg.vocab, (4, cfg.seq), generator=g) for k in ("tokens", "targets")}
    batch = scheme.shard_batch(raw, mesh)
    fn = torch.compile(lambda p, b: gpt.loss(p, b, cfg), backend=backend, fullgraph=True)
    off = contextlib.nullcontext() if nodes else mock.patch.object(ledger, "_emit", lambda *a: None)
    out = {}
    with snn.use(scheme, mesh):
        with off:
            fn(params, batch).backward()  # compiles
        for open_ledger in (False, True):
            ms = []
            for i in range(warmup + steps):
                with sl.comm_ledger() if open_ledger else contextlib.nullcontext() as led:
                    t = time.perf_counter()
                    fn(params, batch).backward()
                    dt = time.perf_counter() - t
                if i >= warmup:
                    ms.append(dt * 1e3)
            out[open_ledger] = (statistics.median(ms), len(led.records) if open_ledger else None)
    return out


def op_us(reps: int = 20000) -> float:
    index = ledger._intern(ledger.CommRecord("all_gather", ("x",), 2, 8, "float32", "forward", "-"))
    x = torch.ones(4)
    op = torch.ops.shardlib.comm_record.default
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            op([x], index)
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--backends", default="aot_eager,inductor")
    for k, v in dict(dim=64, heads=4, layers=2, seq=32, vocab=128).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = gpt.Config(vocab=a.vocab, dim=a.dim, heads=a.heads, layers=a.layers, seq=a.seq)
    print(f"tp1d on a simulated {a.tp}-device mesh, {cfg}, one thread; median of {a.steps}")
    head = ("backend", "record nodes", "ms (no ledger)", "ms (ledger open)", "records/call")
    rows = []
    for backend in a.backends.split(","):
        for nodes in (False, True):
            r = step_times(cfg, a.tp, backend, nodes, a.steps, a.warmup)
            rows.append(
                (backend, "yes" if nodes else "no", f"{r[False][0]:.2f}", f"{r[True][0]:.2f}",
                 str(r[True][1]))
            )  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"comm_record op alone: {op_us():.1f} us per call (best of 5 x 20000)")


if __name__ == "__main__":
    main()
