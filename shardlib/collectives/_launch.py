"""Local worker processes for real distributed runs: `launch` and `Workers`.

Owns process start-up (spawn, a free loopback port, `init_process_group`
with a bounded timeout), running a function on every rank, collecting
results, and turning a worker's exception, death or hang into a `LaunchError`
tagged with its rank. `Workers` keeps the processes alive between calls (test
suites start them once per session); `launch` is the one-shot form.

A failure report reads root cause first: the rank that raised (exception type,
message, traceback) or died (exit code or signal), then one ``knock-on:`` line
per rank whose failure follows from it (a peer's transport error such as gloo's
"Connection closed by peer", or a rank still waiting in a collective for the
failed one, stopped `_GRACE_S` after the first failure). "did not finish
within N s" appears only when N seconds passed without a failure; then the
ranks stuck outside any collective (named by their Python stack, dumped by
faulthandler on SIGUSR1) come first, or, if all are in collectives, each one's
collective. What a rank waits in comes from its in-flight slot
(`_inflight.py`): kind, axes, the call that issued it and the user's line.
Each pool has a temp folder (the stack dumps) that `close` removes.

Under `torchrun` (its environment variables are set) `launch` runs `fn` in the
current process and returns ``[its result]``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import re
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .._errors import LaunchError
from ..layouts._mesh import Mesh, _parse_axes
from . import _inflight
from ._ledger import _count

__all__ = ["Workers", "launch"]

# After the first rank fails, how long the others get to report their own errors before the
# launcher stops them (a peer's knock-on error arrives within milliseconds; one waiting in a
# collective for the failed rank would wait until the process-group timeout).
_GRACE_S = 1.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    )


def _worker_main(
    rank, world, port, backend, threads, pg_timeout, tasks, results, slot, folder
) -> None:
    import faulthandler
    import threading

    import torch
    import torch.distributed as dist

    from . import _inflight

    _inflight.install(slot)
    # On SIGUSR1 (sent by the launcher to a rank it gives up on), dump every thread's Python
    # stack to this rank's file; the first line names the main thread.
    stack_file = open(os.path.join(folder, f"rank{rank}.stack"), "w")  # noqa: SIM115 (kept open)
    stack_file.write(f"{threading.main_thread().ident}\n")
    stack_file.flush()
    if hasattr(signal, "SIGUSR1"):  # POSIX only
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

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
    except BaseException as e:
        results.put((rank, -1, False, _error_payload(e)))
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
        except BaseException as e:
            results.put((rank, call_id, False, _error_payload(e)))
        _inflight.clear()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _error_payload(e: BaseException) -> tuple[str, str, str]:
    return (type(e).__name__, str(e), traceback.format_exc())


# -- failure reports ------------------------------------------------------------------------
# A rank's error is a *knock-on* when it only says that a peer went away or did not answer
# (gloo/NCCL transport errors, process-group timeouts): it follows from another rank's failure.
_PEER_LOSS = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Connection refused|"
    r"Socket Timeout|[Tt]imed out|[Tt]imeout|ECONNRESET|EPIPE|communicator was aborted|"
    r"NCCL communicator|Read error|Connection reset"
)


@dataclass
class _Failure:
    """What happened to one rank that did not return a result."""

    rank: int
    how: str  # "raised", "died" or "unfinished"
    at: float  # time.monotonic() when the launcher saw it
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    exitcode: int | None = None
    note: dict | None = None  # the collective it was in (see _inflight.py)
    stack: str = ""  # an unfinished rank's Python stack, when it is not in a collective

    @property
    def knock_on(self) -> bool:
        return self.how == "raised" and bool(_PEER_LOSS.search(self.message))

    def headline(self) -> str:
        if self.how == "raised":
            first = self.message.strip().splitlines()[0] if self.message.strip() else ""
            if len(first) > 240:
                first = first[:240] + " ..."
            return f"rank {self.rank} raised {self.exc_type}: {first}".rstrip(": ")
        if self.how == "died":
            code = self.exitcode
            if code is not None and code < 0:
                with contextlib.suppress(ValueError):
                    return f"rank {self.rank} died (killed by {signal.Signals(-code).name})"
            return f"rank {self.rank} died (exit code {code})"
        return f"rank {self.rank} did not finish"


def _where(f: _Failure, now: float) -> str:
    if f.note is not None:
        return f"in {_inflight.describe(f.note, now)}"
    return "not in a shardlib collective"


def _report(
    what: str,
    nprocs: int,
    failures: list[_Failure],
    finished: list[int],
    started: float,
    timeout: float,
    now: float,
    timed_out: bool,
    starting: bool = False,
) -> str:
    """The `LaunchError` message: root cause first (rank, type, message, traceback), then
    one ``knock-on:`` line per rank whose failure follows from it."""
    independent = [f for f in failures if f.how == "died" or (f.how == "raised" and not f.knock_on)]
    unfinished = [f for f in failures if f.how == "unfinished"]
    elapsed = now - started
    if independent:
        roots = sorted(independent, key=lambda f: (f.at, f.rank))
    elif timed_out and unfinished:
        # Nothing raised: the ranks stuck outside a collective hold the others up; if all are
        # in collectives, each waits for a collective its peers never issued.
        elsewhere = [f for f in unfinished if f.note is None]
        roots = elsewhere or unfinished
    else:
        roots = sorted(failures, key=lambda f: (f.at, f.rank))[:1]
    root_ranks = {f.rank for f in roots}
    first = roots[0]
    lines = []
    if first.how == "unfinished":
        ranks = ", ".join(str(f.rank) for f in roots)
        lines.append(
            f"sl.launch: {what} did not finish within {timeout:g} s ({elapsed:.1f} s passed) on "
            f"{'rank' if len(roots) == 1 else 'ranks'} {ranks} of {nprocs}."
        )
    else:
        lines.append(
            f"sl.launch: {what} failed on {_count(nprocs, 'rank')}; root cause: {first.headline()}"
        )
    for f in roots:
        if f.how == "raised":
            lines.append(f"--- {f.headline()} ---")
            lines.append(f.traceback.rstrip())
        elif f.how == "died":
            lines.append(f"--- {f.headline()}, {_where(f, f.at)} ---")
            lines.append(
                "(no Python traceback: the process exited without raising, e.g. os._exit, a "
                "crash in native code or the out-of-memory killer; its stderr may say more)"
            )
        else:
            lines.append(f"--- rank {f.rank} did not finish, {_where(f, now)} ---")
            if f.stack:
                lines.append(f.stack.rstrip())
    if finished and first.how == "unfinished":
        lines.append(
            f"rank{'s' if len(finished) > 1 else ''} {', '.join(map(str, finished))} returned."
        )
    for f in sorted(failures, key=lambda f: f.rank):
        if f.rank in root_ranks:
            continue
        if f.how == "unfinished":
            state = f"was still running, {_where(f, now)} (stopped by the launcher)"
        elif f.how == "died":
            state = f"{f.headline().split(' ', 2)[2]}, {_where(f, f.at)}"
        else:
            state = f.headline().split(" ", 2)[2]
        lines.append(f"knock-on: rank {f.rank} {state}")
    if first.how == "died" and starting:
        lines.append(
            "fix: ranks are spawned and re-import the main script; a script that calls "
            'sl.launch at import time needs an `if __name__ == "__main__":` guard (the ranks\' '
            "stderr above says so if that is the cause)."
        )
    elif first.how == "unfinished" and starting:
        lines.append(
            "fix: each worker imports torch and joins the process group on 127.0.0.1; on a "
            "loaded machine that can take long: retry, or raise timeout=."
        )
    elif first.how == "unfinished":
        lines.append(
            "fix: every rank must issue the same collectives in the same order; look for "
            "rank-dependent control flow around the call named above, or raise timeout= if "
            "the work is just slow."
        )
    elif len(failures) > len(roots):
        lines.append(
            f"fix: start from rank {first.rank}'s failure above; the knock-on errors follow "
            "from it (peers waiting for, or losing, that rank)."
        )
    return "\n".join(lines)


def _main_thread_stack(text: str, whole: bool = True) -> str:
    """The main thread's frames from a faulthandler dump (first line: its ident), down to
    a worker's `_worker_main`. With `whole`, "" while the dump ends inside a line or has no
    frame of the main thread yet: the launcher polls the file while faulthandler writes it
    (a frame at a time, in pieces)."""
    if whole and not text.endswith("\n"):
        return ""
    head, _, dump = text.partition("\n")
    try:
        main = int(head)
    except ValueError:
        return ""
    sections = re.split(r"\n?(?=(?:Current thread|Thread) 0x[0-9a-f]+)", dump)
    for sec in sections:
        m = re.match(r"(?:Current thread|Thread) (0x[0-9a-f]+)", sec)
        if m and int(m.group(1), 16) == main:
            frames = []
            for line in sec.splitlines()[1:]:
                if " in _worker_main" in line or not line.strip():
                    break
                frames.append(line)
            if whole and not frames:
                return ""  # the thread's header is written, its frames not yet
            return "Python stack (most recent call first):\n" + "\n".join(frames)
    return ""


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
        self._folder = tempfile.mkdtemp(prefix="shardlib-launch-")
        self._results = ctx.Queue()
        self._tasks = [ctx.SimpleQueue() for _ in range(self.nprocs)]
        self._slots = [_inflight.StatusSlot(ctx) for _ in range(self.nprocs)]
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
                    self._slots[r],
                    self._folder,
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
        failures: dict[int, _Failure] = {}
        started = time.monotonic()
        deadline = started + timeout
        first_failure_at = None
        timed_out = False
        try:
            while len(got) + len(failures) < self.nprocs:
                now = time.monotonic()
                if first_failure_at is not None and now > first_failure_at + _GRACE_S:
                    break  # the others are (most likely) waiting for the failed rank
                if now >= deadline:
                    timed_out = True
                    break
                try:
                    wait = min(0.2, max(deadline - now, 0.01))
                    rank, cid, ok, value = self._results.get(timeout=wait)
                except queue.Empty:
                    pass
                else:
                    if cid != call_id:
                        continue
                    if ok:
                        got[rank] = value
                    else:
                        exc_type, message, tb = value
                        failures[rank] = _Failure(
                            rank, "raised", time.monotonic(), exc_type, message, tb
                        )
                        first_failure_at = first_failure_at or time.monotonic()
                for r, p in enumerate(self._procs):
                    if r not in got and r not in failures and not p.is_alive():
                        note = _inflight.read(self._slots[r])
                        failures[r] = _Failure(
                            r, "died", time.monotonic(), exitcode=p.exitcode, note=note
                        )
                        first_failure_at = first_failure_at or time.monotonic()
        except KeyboardInterrupt:
            self.close(force=True)
            raise
        if failures or len(got) < self.nprocs:
            now = time.monotonic()
            unfinished = [r for r in range(self.nprocs) if r not in got and r not in failures]
            for r in unfinished:
                failures[r] = _Failure(r, "unfinished", now, note=_inflight.read(self._slots[r]))
            self._dump_stacks([failures[r] for r in unfinished if failures[r].note is None])
            self.close(force=True)
            raise LaunchError(
                _report(
                    what,
                    self.nprocs,
                    list(failures.values()),
                    sorted(got),
                    started,
                    timeout,
                    now,
                    timed_out,
                    starting=call_id == -1,
                )
            )
        return [got[r] for r in range(self.nprocs)]

    def _dump_stacks(self, stuck: list[_Failure]) -> None:
        """Fill in the Python stack of each stuck rank (faulthandler, on SIGUSR1)."""
        sent = []
        for f in stuck:
            p = self._procs[f.rank]
            if p.is_alive() and p.pid is not None and hasattr(signal, "SIGUSR1"):
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGUSR1)
                    sent.append(f)
        deadline = time.monotonic() + 2.0
        for f in sent:
            path = os.path.join(self._folder, f"rank{f.rank}.stack")
            seen = None  # faulthandler writes the dump in pieces: take it once it stops growing
            while True:
                late = time.monotonic() > deadline  # then take what was written
                text = ""
                with contextlib.suppress(OSError), open(path) as fh:
                    text = fh.read()
                f.stack = _main_thread_stack(text, whole=not late)
                if late or (f.stack and text == seen):
                    break
                seen = text
                time.sleep(0.05)

    def close(self, force: bool = False) -> None:
        """Stop the workers (politely, then by force)."""
        procs, self._procs = self._procs, []
        procs = [p for p in procs if p.pid is not None]  # a start that failed part way
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
        folder, self._folder = getattr(self, "_folder", None), None
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

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
    that names the root cause first (the rank, its exception and traceback, or
    its exit code), then the knock-on failures of the other ranks; a rank stuck
    in a collective is named with the collective (kind, axes) and the op or
    call that issued it. Under `torchrun`, runs `fn` in this process on
    `Mesh.distributed(axes)` and returns ``[result]``.

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
