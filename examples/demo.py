"""shardlib demo: a mesh, a few layouts, printed plans, and the communication ledger.

Runs on a simulated 2x2 mesh in this process, then the same program on 4 local
gloo processes started by `sl.launch`, and checks both give the same shards
and the same ledger.

    python examples/demo.py
"""

from __future__ import annotations

import time

import torch

import shardlib as sl

P = sl.P


def program(mesh: sl.Mesh):
    """Move a (12, 8) matrix through a few layouts; return local shards, a sum, and the ledger."""
    value = torch.arange(96.0).reshape(12, 8)
    x = sl.shard(value, mesh, P(("dp", "tp"), None))
    with sl.comm_ledger() as led:
        y = sl.reshard(x, P(None, ("dp", "tp")))  # one all-to-all over all 4 devices
        z = sl.reshard(sl.shard(value, mesh, P("dp", "tp")), P("tp", "dp"))  # a permute
        # Each device holds a summand of ones: the value is 2 everywhere (sum over tp).
        ones = [torch.ones(12, 8) for _ in mesh.local_devices]
        partial = sl.from_local(ones, mesh, P(None, None, partial="tp"), (12, 8))
        summed = sl.reshard(partial, P("tp", None))  # a reduce-scatter, not all-reduce + slice
    return y.local_shards() + z.local_shards(), summed.full(), led


def main() -> None:
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    print(f"mesh: {mesh}  ({mesh.size} devices, axes {mesh.axis_names})\n")

    x = sl.shard(torch.arange(60.0).reshape(10, 6), mesh, P(("dp", "tp"), None))
    sl.visualize(x)  # uneven: 10 rows over 4 devices -> 3, 3, 3, 1
    print()
    sl.visualize(sl.reshard(x, P("tp", "dp")))
    print()

    for src, dst in [
        (P(("dp", "tp"), None), P(None, ("dp", "tp"))),
        (P("dp", "tp"), P("tp", "dp")),
        (P(None, None, partial=("dp", "tp")), P(None, None)),
        (P(None, None, partial="tp"), P("tp", None)),
    ]:
        print(sl.plan(src, dst, (4096, 4096), mesh, torch.float32), "\n")

    print("simulated mesh: running the program ...")
    shards, summed, led = program(mesh)
    print(led.summary(), "\n")
    assert torch.equal(summed, torch.full((12, 8), 2.0))

    print("4 gloo processes (sl.launch): running the same program ...")
    t0 = time.perf_counter()
    results = sl.launch(program, {"dp": 2, "tp": 2})
    print(f"  done in {time.perf_counter() - t0:.1f} s (process start-up included)")
    same = all(
        all(torch.equal(a, b) for a, b in zip(r_shards, shards[rank :: mesh.size]))
        and torch.equal(r_sum, summed)
        and r_led.records == led.records
        for rank, (r_shards, r_sum, r_led) in enumerate(results)
    )
    print(f"  same shards and same ledger as the simulated mesh: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
