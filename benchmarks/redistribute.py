"""Redistribution on 4 local gloo ranks: shardlib vs DTensor, side by side.

For each case, both libraries move the same 4096x4096 float32 tensor between
the same layouts, interleaved repetition by repetition (after one warm-up, in
alternating order). Time is the slowest
rank's wall time between barriers (median over repetitions); bytes are per
device, busiest device, ring model: shardlib's from its ledger, DTensor's from
the c10d functional collectives it issues (intercepted with a dispatch mode
and costed with the same formulas).

    python benchmarks/redistribute.py [--n 4096] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import shardlib as sl

P = sl.P


def _cases():
    # (name, mesh axes, shardlib src, shardlib dst, DTensor src placements, dst placements)
    return [
        ("{x:4} S0 -> S1", {"x": 4}, P("x", None), P(None, "x"), "S0", "S1"),
        ("{x:4} S0 -> R", {"x": 4}, P("x", None), P(None, None), "S0", "R"),
        ("{x:4} Partial -> S0", {"x": 4}, P(None, None, partial="x"), P("x", None), "P", "S0"),
        ("{x:4} R -> S0", {"x": 4}, P(None, None), P("x", None), "R", "S0"),
        (
            "{a:2,b:2} [S0,S1] -> [S1,S0]",
            {"a": 2, "b": 2},
            P("a", "b"),
            P("b", "a"),
            "S0,S1",
            "S1,S0",
        ),
        (
            "{a:2,b:2} [P,P] -> [R,R]",
            {"a": 2, "b": 2},
            P(None, None, partial=("a", "b")),
            P(None, None),
            "P,P",
            "R,R",
        ),
        (
            "{a:2,b:2} S0(a,b) -> S1(a,b)",
            {"a": 2, "b": 2},
            P(("a", "b"), None),
            P(None, ("a", "b")),
            "S0,S0",
            "S1,S1",
        ),
    ]


def _placements(spec: str):
    from torch.distributed.tensor import Partial, Replicate, Shard

    table = {"S0": Shard(0), "S1": Shard(1), "R": Replicate(), "P": Partial()}
    return [table[s] for s in spec.split(",")]


class _DTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Ring-model bytes of the c10d functional collectives DTensor issues."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.kinds: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.distributed_c10d import _resolve_process_group

        name = str(func)
        if "_c10d_functional" in name:
            t = args[0]
            nbytes = t.numel() * t.element_size()
            if "all_gather_into_tensor" in name:  # (input, group_size, group_name)
                k = args[1]
                self.bytes += (k - 1) * nbytes
            elif "reduce_scatter_tensor" in name:  # (input, op, group_size, group_name)
                k = args[2]
                self.bytes += (k - 1) * nbytes // k
            elif "all_reduce" in name:  # (input, op, group_name)
                k = _resolve_process_group(args[2]).size()
                self.bytes += 2 * (k - 1) * nbytes // k
            elif "all_to_all_single" in name:  # (input, out_splits, in_splits, group_name)
                k = _resolve_process_group(args[3]).size()
                self.bytes += (k - 1) * nbytes // k
            if any(c in name for c in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")):
                self.kinds.append(name.split(".")[1])
        return func(*args, **(kwargs or {}))


def _time(fn, reps_out: list[float]):
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    reps_out.append(time.perf_counter() - t0)
    return out


def worker(mesh_unused, n: int, reps: int):
    import logging
    import warnings

    import torch.distributed as dist

    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor

    rows = []
    value = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    for name, axes, src, dst, dsrc, ddst in _cases():
        mesh = sl.Mesh.distributed(axes)
        dmesh = init_device_mesh("cpu", mesh.shape, mesh_dim_names=mesh.axis_names)
        if src.partial:
            k = mesh.group_size(src.partial)
            x = sl.from_local([value / k], mesh, src, (n, n))
            dx = DTensor.from_local(value / k, dmesh, _placements(dsrc), run_check=False)
        else:
            x = sl.shard(value, mesh, src)
            dx = distribute_tensor(value, dmesh, _placements(dsrc))
        t_sl, t_dt = [], []
        sl_bytes = dt_bytes = 0
        for rep in range(reps + 1):  # rep 0 warms up; the order alternates so neither goes first
            for lib in ("sl", "dt") if rep % 2 else ("dt", "sl"):
                if lib == "sl":
                    with sl.comm_ledger() as led:
                        y = _time(lambda x=x, dst=dst: sl.reshard(x, dst), t_sl)
                    sl_bytes = led.total_bytes
                else:
                    with _DTensorBytes() as mode:
                        dy = _time(
                            lambda dx=dx, m=dmesh, d=ddst: dx.redistribute(m, _placements(d)), t_dt
                        )
                    dt_bytes, dt_kinds = mode.bytes, mode.kinds
        t_sl, t_dt = t_sl[1:], t_dt[1:]
        torch.testing.assert_close(y.local_shards()[0], dy.to_local(), rtol=1e-5, atol=1e-5)
        rows.append(
            (
                name,
                statistics.median(t_sl),
                sl_bytes,
                [str(s.step.kind) for s in sl.plan(src, dst, (n, n), mesh, torch.float32).steps],
                statistics.median(t_dt),
                dt_bytes,
                dt_kinds,
            )
        )
    # slowest rank decides the time
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return [
        (
            r[0],
            max(g[i][1] for g in gathered),
            r[2],
            r[3],
            max(g[i][4] for g in gathered),
            r[5],
            r[6],
        )
        for i, r in enumerate(gathered[0])
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"# python benchmarks/redistribute.py --n {args.n} --reps {args.reps}")
    print(
        f"# torch {torch.__version__}, 4 gloo ranks on 127.0.0.1, 1 thread each, "
        f"{args.n}x{args.n} float32, median of {args.reps}\n"
    )
    rows = sl.launch(worker, {"x": 4}, args=(args.n, args.reps), timeout=1800)[0]
    head = (
        "case",
        "shardlib ms",
        "shardlib MiB",
        "shardlib steps",
        "DTensor ms",
        "DTensor MiB",
        "DTensor collectives",
        "time ratio",
        "bytes ratio",
    )
    table = []
    for name, t_sl, b_sl, steps, t_dt, b_dt, kinds in rows:
        table.append(
            (
                name,
                f"{t_sl * 1e3:.1f}",
                f"{b_sl / 2**20:.1f}",
                "+".join(s for s in steps if s != "None") or "local slice",
                f"{t_dt * 1e3:.1f}",
                f"{b_dt / 2**20:.1f}",
                "+".join(kinds) or "local",
                f"{t_dt / t_sl:.2f}x",
                f"{b_dt / max(b_sl, 1):.2f}x" if b_sl else ("-" if not b_dt else "inf"),
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in table:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("\nratios are DTensor / shardlib (higher = shardlib better)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
