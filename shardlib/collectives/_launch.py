"""Local worker processes for real distributed runs: `launch` and `Workers`.

Owns process start-up (spawn, a free loopback port, `init_process_group`
with a bounded timeout), running a function on every rank, collecting
results, and turning a worker's exception, death or hang into a `LaunchError`
tagged with its rank. `Workers` keeps the processes alive between calls (test
suites start them once per session); `launch` is the one-shot form.

Under `torchrun` (its environment variables are set) `launch` runs `fn` in the
current process and returns ``[its result]``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from .._errors import LaunchError
from ..layouts._mesh import Mesh, _parse_axes

__all__ = ["Workers", "launch"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    )


def _worker_main(rank, world, port, backend, threads, pg_timeout, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=pg_timeout),
        )
    except BaseException:
        results.put((rank, -1, False, traceback.format_exc()))
        return
    results.put((rank, -1, True, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        call_id, payload = task
        try:
            fn, axes, args = pickle.loads(payload)
            mesh = Mesh.distributed(axes)
            out = pickle.dumps(fn(mesh, *args))
            results.put((rank, call_id, True, out))
        except BaseException:
            results.put((rank, call_id, False, traceback.format_exc()))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


class Workers:
    """`nprocs` local worker processes with a process group, reused across calls.

    Args:
        nprocs: number of ranks (one mesh device each).
        backend: "gloo" (CPU) or "nccl" (one GPU per rank).
        threads: intra-op threads per worker.
        timeout: seconds a call may take before it is reported as hung; also the
            process-group timeout, so a rank stuck in a collective errors out.

    Examples:
        >>> import shardlib as sl
        >>> from shardlib.collectives import Workers
        >>> def rank_of(mesh):
        ...     return mesh.local_devices[0]
        >>> with Workers(2) as w:                      # doctest: +SKIP
        ...     w.run(rank_of, {"x": 2})
        [0, 1]
    """

    def __init__(self, nprocs: int, backend: str = "gloo", threads: int = 1, timeout: float = 60.0):
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise LaunchError(f"Workers(nprocs={nprocs!r}): nprocs is a positive int.")
        self.nprocs, self.backend, self.threads, self.timeout = nprocs, backend, threads, timeout
        self._procs: list = []
        self._calls = 0
        self._start()

    def _start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = _free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.SimpleQueue() for _ in range(self.nprocs)]
        pg_timeout = max(int(self.timeout), 10)
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(
                    r,
                    self.nprocs,
                    port,
                    self.backend,
                    self.threads,
                    pg_timeout,
                    self._tasks[r],
                    self._results,
                ),
                daemon=True,
            )
            for r in range(self.nprocs)
        ]
        try:
            for p in self._procs:
                p.start()
            self._collect(-1, self.timeout + 30, "starting the process group")
        except BaseException:
            self.close(force=True)
            raise

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(
        self,
        fn: Callable,
        axes: Mapping[str, int],
        args: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> list[Any]:
        """Call ``fn(mesh, *args)`` on every rank with ``mesh = Mesh.distributed(axes)``."""
        _parse_axes(axes, "sl.launch(axes=...)")
        axes = dict(axes)
        size = 1
        for n in axes.values():
            size *= n
        if size != self.nprocs:
            raise LaunchError(
                f"sl.launch(axes={axes!r}): the mesh has {size} devices but there are "
                f"{self.nprocs} worker processes; make the axis sizes multiply to {self.nprocs}."
            )
        try:
            payload = pickle.dumps((fn, axes, tuple(args)))
        except Exception as e:
            raise LaunchError(
                f"sl.launch(fn={getattr(fn, '__qualname__', fn)!r}): fn and args must be picklable "
                f"to reach the worker processes ({type(e).__name__}: {e}). Define fn at the top "
                "level of a module (not a lambda or a nested function) and pass plain data in args."
            ) from None
        if not self.alive:
            self.close(force=True)
            self._start()
        self._calls += 1
        for q in self._tasks:
            q.put((self._calls, payload))
        out = self._collect(self._calls, timeout or self.timeout, getattr(fn, "__qualname__", "fn"))
        return [pickle.loads(b) for b in out]

    def _collect(self, call_id: int, timeout: float, what: str) -> list[Any]:
        got: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        first_error_at = None
        try:
            while len(got) + len(errors) < self.nprocs:
                now = time.monotonic()
                if first_error_at is not None and now > first_error_at + 5:
                    break
                if now > deadline:
                    break
                try:
                    rank, cid, ok, value = self._results.get(timeout=0.2)
                except queue.Empty:
                    dead = [
                        r
                        for r, p in enumerate(self._procs)
                        if not p.is_alive() and r not in got and r not in errors
                    ]
                    for r in dead:
                        errors[r] = f"worker process died (exit code {self._procs[r].exitcode})"
                        first_error_at = first_error_at or time.monotonic()
                    continue
                if cid != call_id:
                    continue
                if ok:
                    got[rank] = value
                else:
                    errors[rank] = value
                    first_error_at = first_error_at or time.monotonic()
        except KeyboardInterrupt:
            self.close(force=True)
            raise
        if errors or len(got) < self.nprocs:
            missing = [r for r in range(self.nprocs) if r not in got and r not in errors]
            self.close(force=True)
            parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
            if missing:
                parts.append(
                    f"--- rank(s) {', '.join(map(str, missing))} ---\n"
                    f"did not finish within {timeout:.0f} s (hung, or waiting in a collective "
                    "for a rank that failed)"
                )
            raise LaunchError(
                f"sl.launch: {what} failed on {self.nprocs} ranks "
                f"(failed: {sorted(errors) or 'none'}, unfinished: {missing or 'none'}):\n"
                + "\n".join(parts)
            )
        return [got[r] for r in range(self.nprocs)]

    def close(self, force: bool = False) -> None:
        """Stop the workers (politely, then by force)."""
        procs, self._procs = self._procs, []
        if not force:
            for q in self._tasks:
                with contextlib.suppress(Exception):
                    q.put(None)
            for p in procs:
                p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(force=exc[0] is not None)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close(force=True)


def launch(
    fn: Callable,
    axes: Mapping[str, int],
    backend: str = "gloo",
    args: Sequence[Any] = (),
    *,
    threads: int = 1,
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(mesh, *args)`` on one local process per mesh device; return per-rank results.

    Starts the workers (spawn, a free port on 127.0.0.1, 1 intra-op thread
    each unless `threads` says otherwise), runs `fn`, stops them. A rank that
    raises, dies or hangs (past `timeout` seconds) surfaces as a `LaunchError`
    naming the rank, with its traceback. Under `torchrun`, runs `fn` in this
    process on `Mesh.distributed(axes)` and returns ``[result]``.

    Examples:
        >>> import shardlib as sl
        >>> def ranks(mesh):
        ...     return mesh.local_devices
        >>> sl.launch(ranks, {"dp": 2})               # doctest: +SKIP
        [(0,), (1,)]
    """
    if _under_torchrun():
        return [fn(Mesh.distributed(axes), *args)]
    names, shape = _parse_axes(axes, "sl.launch(axes=...)")
    size = 1
    for n in shape:
        size *= n
    try:
        pickle.dumps((fn, tuple(args)))
    except Exception as e:
        raise LaunchError(
            f"sl.launch(fn={getattr(fn, '__qualname__', fn)!r}): fn and args must be picklable to "
            f"reach the worker processes ({type(e).__name__}: {e}). Define fn at the top level of "
            "a module (not a lambda or a nested function) and pass plain data in args."
        ) from None
    with Workers(size, backend=backend, threads=threads, timeout=timeout) as workers:
        return workers.run(fn, dict(zip(names, shape)), args)
