"""Dispatch overhead and a tensor-parallel MLP: shardlib vs plain torch vs DTensor.

Part 1 (one process): per-op time of small ops on a one-device mesh (add and
relu on 64x64, a 256x256 matmul) for plain torch, shardlib and DTensor, best of
5 runs of N calls, beside the floor of any ``__torch_dispatch__`` subclass: a
minimal wrapper that unwraps its arguments, calls the op and wraps the result
(`_Minimal`), which is what torch's subclass dispatch costs before a library
decides anything. Part 3 (one process, one thread): the reference GPT step
(``benchmarks/schemes.py``'s model: dim 256, 2 layers, seq 128; batch 1, the
local work of one of 4 tp ranks at batch 4) forward + backward, plain torch, on
`_Minimal` tensors, and shardlib's tp1d on a one-device mesh: median thread
CPU ms, the overhead over plain torch, Python function calls per step
(cProfile; deterministic) and subclass dispatches per step. It attributes the
eager step's overhead: the floor is what any eager subclass pays for the
model's op count; the rest is shardlib's. Part 2 (4 local gloo ranks, one thread each): a 2-layer
MLP (1024 -> 4096 -> 1024, 512 tokens, float32) forward + backward: unsharded,
shardlib with Megatron layouts (W1 column-split, W2 row-split, activations
replicated, output and input-gradient all-reduced), DTensor's
ColwiseParallel/RowwiseParallel, and hand-written Megatron (local matmuls plus
explicit all-reduces); median ms of the slowest rank, and ratios.

    python benchmarks/dispatch.py [--reps 10] [--tokens 512] [--gpt-steps 30] [--skip-mlp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import shardlib as sl

P = sl.P


# == part 1: per-op overhead ======================================================
class _Minimal(torch.Tensor):
    """The least a ``__torch_dispatch__`` wrapper subclass can do: unwrap, call, wrap.

    The floor of torch's subclass dispatch (and of its autograd on wrappers), to read
    shardlib's per-op cost against."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=elem.device,
            requires_grad=requires_grad,
        )
        out.elem = elem
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(a):
            if type(a) is _Minimal:
                return a.elem
            if type(a) in (list, tuple):
                return type(a)(unwrap(b) for b in a)
            return a

        def wrap(o):
            if isinstance(o, torch.Tensor) and type(o) is not _Minimal:
                return _Minimal(o)
            if type(o) in (list, tuple):
                return type(o)(wrap(b) for b in o)
            return o

        kwargs = {k: unwrap(v) for k, v in (kwargs or {}).items()}
        return wrap(func(*[unwrap(a) for a in args], **kwargs))


def _best_us(fn, n: int) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def per_op_table() -> list[tuple]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    mesh = sl.Mesh.simulated({"x": 1})
    dmesh = init_device_mesh("cpu", (1,))
    rows = []
    for name, shapes, fn, n in [
        ("add 64x64", [(64, 64), (64, 64)], lambda a, b: a + b, 20000),
        ("relu 64x64", [(64, 64)], torch.relu, 20000),
        ("matmul 256x256", [(256, 256), (256, 256)], torch.matmul, 2000),
    ]:
        xs = [torch.randn(s) for s in shapes]
        ss = [sl.shard(x, mesh, P("x", None)) for x in xs]
        ds = [distribute_tensor(x, dmesh, [Shard(0)]) for x in xs]
        ms = [_Minimal(x) for x in xs]
        t_plain = _best_us(lambda xs=xs, fn=fn: fn(*xs), n)
        t_min = _best_us(lambda ms=ms, fn=fn: fn(*ms), n)
        t_sl = _best_us(lambda ss=ss, fn=fn: fn(*ss), n)
        t_dt = _best_us(lambda ds=ds, fn=fn: fn(*ds), n)
        rows.append((name, t_plain, t_min, t_sl, t_dt))
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# == part 2: the MLP on 4 ranks ===================================================
class _AllReduce(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


class _Copy(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.clone()
        dist.all_reduce(g)
        return g


def mlp_worker(mesh, reps: int, tokens: int, h: int, f: int):
    import logging
    import warnings

    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    rank, k = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, h, generator=g)
    w1 = torch.randn(h, f, generator=g) / h**0.5
    w2 = torch.randn(f, h, generator=g) / f**0.5
    cols = slice(rank * f // k, (rank + 1) * f // k)

    def unsharded():
        xr, a, b = (t.clone().requires_grad_() for t in (x, w1, w2))
        y = F.gelu(xr @ a) @ b
        y.sum().backward()
        return y

    sx = sl.shard(x, mesh, P(None, None))
    s1 = sl.shard(w1, mesh, P(None, "tp"))
    s2 = sl.shard(w2, mesh, P("tp", None))

    def shardlib_megatron():
        xr, a, b = (t.detach().requires_grad_() for t in (sx, s1, s2))
        y = sl.reshard(F.gelu(xr @ a) @ b, P(None, None))  # the forward all-reduce
        y.sum().backward()
        sl.reshard(xr.grad, xr.spec)  # the input gradient's all-reduce
        return y

    dmesh = init_device_mesh("cpu", (k,))
    model = torch.nn.Sequential(
        torch.nn.Linear(h, f, bias=False), torch.nn.GELU(), torch.nn.Linear(f, h, bias=False)
    )
    with torch.no_grad():
        model[0].weight.copy_(w1.t())
        model[2].weight.copy_(w2.t())
    model = parallelize_module(model, dmesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})

    def dtensor():
        xr = x.clone().requires_grad_()
        y = model(xr)
        y.sum().backward()
        return y

    l1, l2 = w1[:, cols].clone(), w2[cols].clone()

    def megatron():
        xr, a, b = (t.clone().requires_grad_() for t in (x, l1, l2))
        y = _AllReduce.apply(F.gelu(_Copy.apply(xr) @ a) @ b)
        y.sum().backward()
        return y

    runs = {
        "unsharded": unsharded,
        "shardlib Megatron layouts": shardlib_megatron,
        "DTensor Colwise/Rowwise": dtensor,
        "hand-written Megatron": megatron,
    }
    times = {name: [] for name in runs}
    outs = {}
    for _ in range(reps + 2):  # interleaved; the first two are warm-up
        for name, fn in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            outs[name] = fn()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    ref = outs["unsharded"]
    torch.testing.assert_close(outs["shardlib Megatron layouts"].full(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["hand-written Megatron"], ref, rtol=1e-4, atol=1e-4)
    with sl.comm_ledger() as led:
        shardlib_megatron()
    med = {name: statistics.median(ts[2:]) for name, ts in times.items()}
    gathered = [None] * k
    dist.all_gather_object(gathered, med)
    return {name: max(m[name] for m in gathered) for name in med}, led.summary()


# == part 3: the GPT step's overhead, attributed ===================================
def gpt_step_table(steps: int) -> list[tuple[str, float, int, int]]:
    """Per variant (name, median thread CPU ms of a step, Python calls per step, subclass
    dispatches per step): plain torch, `_Minimal` tensors, shardlib tp1d on a one-device mesh."""
    import cProfile
    import pstats

    from shardlib import nn as snn
    from shardlib.nn import gpt
    from shardlib.ops import _dispatch

    torch.set_num_threads(1)
    config = gpt.Config(vocab=1024, dim=256, heads=8, layers=2, seq=128)
    raw = gpt.init(config)
    g = torch.Generator().manual_seed(1)
    batch = {
        k: torch.randint(0, config.vocab, (1, config.seq), generator=g)
        for k in ("tokens", "targets")
    }
    mesh = sl.Mesh.simulated({"tp": 1})
    scheme = snn.tp1d("tp")
    sharded = snn.shard_params(raw, mesh, scheme, gpt.DIMS(config))
    for v in sharded.values():
        v.requires_grad_()
    sbatch = scheme.shard_batch(batch, mesh)
    plain = {k: v.clone().requires_grad_() for k, v in raw.items()}
    minimal = {k: _Minimal(v.clone(), True) for k, v in raw.items()}
    mbatch = {k: _Minimal(v) for k, v in batch.items()}

    def plain_step(params=plain, batch=batch):
        for v in params.values():
            v.grad = None
        gpt.loss(params, batch, config).backward()

    def shardlib_step():
        for v in sharded.values():
            v.grad = None
        with snn.use(scheme, mesh):
            gpt.loss(sharded, sbatch, config).backward()

    runs = {
        "plain torch": plain_step,
        "minimal __torch_dispatch__ wrapper": lambda: plain_step(minimal, mbatch),
        "shardlib tp1d, one-device mesh": shardlib_step,
    }
    for fn in runs.values():
        for _ in range(3):
            fn()
    cpu = {name: [] for name in runs}
    for _ in range(steps):  # interleaved, so machine noise hits all alike
        for name, fn in runs.items():
            c0 = time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - c0)
    rows = []
    for name, fn in runs.items():
        profiler = cProfile.Profile()
        profiler.enable()
        fn()
        profiler.disable()
        calls = pstats.Stats(profiler).total_calls
        count = [0]
        inner = _dispatch._dispatch
        minimal_dispatch = _Minimal.__dict__["__torch_dispatch__"]

        def counting(func, args, kwargs, inner=inner, count=count):
            count[0] += 1
            return inner(func, args, kwargs)

        def counting_minimal(
            cls, func, types, args=(), kwargs=None, inner=minimal_dispatch, count=count
        ):
            count[0] += 1
            return inner.__func__(cls, func, types, args, kwargs)

        _dispatch._dispatch = counting
        _Minimal.__torch_dispatch__ = classmethod(counting_minimal)
        try:
            fn()
        finally:
            _dispatch._dispatch = inner
            _Minimal.__torch_dispatch__ = minimal_dispatch
        rows.append((name, statistics.median(cpu[name]) * 1e3, calls, count[0]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--gpt-steps", type=int, default=30, help="timed steps of part 3")
    ap.add_argument("--skip-mlp", action="store_true", help="skip part 2 (4 gloo ranks)")
    args = ap.parse_args()
    print(
        f"# python benchmarks/dispatch.py --reps {args.reps} --tokens {args.tokens} "
        f"--gpt-steps {args.gpt_steps}" + (" --skip-mlp" if args.skip_mlp else "")
    )
    print(f"# torch {torch.__version__}, CPU, 1 thread per process\n")
    print("per-op time, one process, one-device mesh (best of 5 runs):")
    print(
        f"{'op':<16}{'torch us':>10}{'floor us':>10}{'shardlib us':>13}{'DTensor us':>12}"
        f"{'shardlib overhead':>19}{'DTensor overhead':>18}"
    )
    for name, t_plain, t_min, t_sl, t_dt in per_op_table():
        print(
            f"{name:<16}{t_plain:>10.1f}{t_min:>10.1f}{t_sl:>13.1f}{t_dt:>12.1f}"
            f"{t_sl - t_plain:>19.1f}{t_dt - t_plain:>18.1f}"
        )
    print("(floor: a minimal __torch_dispatch__ wrapper subclass: unwrap, call, wrap)")
    print(
        f"\nGPT step (dim 256, 2 layers, seq 128, batch 1), forward+backward, one process "
        f"(median thread CPU of {args.gpt_steps}):"
    )
    print(f"{'variant':<36}{'cpu ms':>9}{'overhead ms':>13}{'py calls':>10}{'dispatches':>12}")
    rows = gpt_step_table(args.gpt_steps)
    base = rows[0][1]
    for name, ms, calls, n in rows:
        print(f"{name:<36}{ms:>9.2f}{ms - base:>13.2f}{calls:>10}{n if n else '-':>12}")
    if args.skip_mlp:
        return
    print(
        f"\nMLP 1024->4096->1024, {args.tokens} tokens, fp32, forward+backward, 4 gloo ranks "
        f"(median of {args.reps}, slowest rank):"
    )
    res, ledger = sl.launch(
        mlp_worker, {"tp": 4}, args=(args.reps, args.tokens, 1024, 4096), timeout=1200
    )[0]
    base = res["hand-written Megatron"]
    print(f"{'variant':<28}{'ms':>10}{'vs hand-written':>17}")
    for name, t in res.items():
        print(f"{name:<28}{t * 1e3:>10.1f}{t / base:>16.2f}x")
    print("\nshardlib ledger for one forward+backward (per device):")
    print(ledger)


if __name__ == "__main__":
    main()
