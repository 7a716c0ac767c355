"""`sl.launch` and `Workers`: results per rank, and failures that surface fast and clearly.

Covers: per-rank return values and args; failure reports that name the root
cause first and knock-on errors after it -- a rank that raises while its peer
waits in a collective for it, a rank that dies (os._exit) while its peer is in
a collective with it, a rank stuck in a collective its peer never issued
(named by kind, axes and the call that issued it: `sl.reshard`, or the aten op
of an implicit move), a rank stuck outside any collective (named by its Python
stack) -- and "did not finish within N s" only when N seconds passed; the
report builder on synthetic failures (a knock-on error that arrives before the
root cause is still listed after it); an unpicklable function; a mesh whose
size differs from the number of processes; processes and the launcher's temp
folder cleaned up after a failure; the pool restarting itself after a failure.
"""

from __future__ import annotations

import faulthandler
import math
import os
import threading
import time

import pytest
import torch

import shardlib as sl
from shardlib.collectives import Workers, _inflight
from shardlib.collectives._launch import _Failure, _main_thread_stack, _report

pytestmark = pytest.mark.dist
P = sl.P


def rank_and_arg(mesh, arg):
    return (mesh.local_devices[0], mesh.axis_names, mesh.shape, arg)


def _gather_rows(mesh):
    """An all-gather over 'x' issued by sl.reshard (every rank must take part)."""
    x = sl.shard(torch.ones(4, 2), mesh, P("x", None))
    return sl.reshard(x, P(None, None)).local_shards()[0].shape


def raise_on_rank1(mesh):
    if mesh.local_devices[0] == 1:
        raise ValueError("boom on purpose")
    return _gather_rows(mesh)  # waits for rank 1, which never comes


def die_on_rank1(mesh):
    if mesh.local_devices[0] == 1:
        os._exit(3)
    return _gather_rows(mesh)  # the peer vanishes under it


def _relu_of_sum(mesh):
    x = sl.shard(torch.ones(4, 2), mesh, P("x", None)).sum(0)  # partial over x
    return torch.relu(x).local_shards()[0]  # relu needs the sum: an implicit all-reduce


def skip_collective_on_rank1(mesh):
    if mesh.local_devices[0] == 1:
        return "skipped"
    return _relu_of_sum(mesh)


def hang_on_rank0(mesh):
    if mesh.local_devices[0] == 0:
        time.sleep(3600)
    return _gather_rows(mesh)


@pytest.fixture(scope="module")
def small_pool():
    workers = Workers(2, timeout=8.0)
    yield workers
    workers.close()


def _fails(pool, fn, timeout=None):
    start = time.monotonic()
    with pytest.raises(sl.LaunchError) as info:
        pool.run(fn, {"x": 2}, timeout=timeout)
    return str(info.value), time.monotonic() - start


def _before(msg: str, first: str, second: str) -> bool:
    return first in msg and second in msg and msg.index(first) < msg.index(second)


def test_launch_returns_per_rank_results():
    out = sl.launch(rank_and_arg, {"dp": 2}, args=("hello",))
    assert out == [(0, ("dp",), (2,), "hello"), (1, ("dp",), (2,), "hello")]


def test_raising_rank_is_the_root_cause_and_its_waiting_peer_a_knock_on(small_pool):
    small_pool.run(_gather_rows, {"x": 2})  # warm: the process groups exist before the clock runs
    msg, took = _fails(small_pool, raise_on_rank1)
    lines = msg.splitlines()
    assert lines[0].endswith("root cause: rank 1 raised ValueError: boom on purpose"), msg
    assert "Traceback (most recent call last)" in msg and "raise_on_rank1" in msg
    assert _before(msg, "ValueError: boom on purpose\n", "knock-on: rank 0")
    knock = next(line for line in lines if line.startswith("knock-on: rank 0"))
    assert "all_gather over ('x',)" in knock and "for reshard at test_launch.py" in knock
    assert "_gather_rows" in knock
    assert "did not finish" not in msg and took < 8.0  # no timeout happened, none claimed
    # The pool restarts itself for the next call.
    assert small_pool.run(rank_and_arg, {"x": 2}, ("again",))[1][3] == "again"


def test_dead_rank_is_the_root_cause_even_if_its_peer_reports_first(small_pool):
    small_pool.run(_gather_rows, {"x": 2})
    folder = small_pool._folder
    msg, took = _fails(small_pool, die_on_rank1)
    assert msg.splitlines()[0].endswith("root cause: rank 1 died (exit code 3)"), msg
    assert _before(
        msg, "rank 1 died (exit code 3), not in a shardlib collective", "knock-on: rank 0"
    )
    assert "did not finish" not in msg and took < 8.0
    assert not os.path.exists(folder)  # the launcher's temp folder is removed


def test_rank_stuck_in_a_collective_names_the_op_and_the_collective(small_pool):
    small_pool.run(_relu_of_sum, {"x": 2})  # warm: groups and rules ready before the clock runs
    msg, took = _fails(small_pool, skip_collective_on_rank1, timeout=2.0)
    assert took >= 2.0
    head = msg.splitlines()[0]
    assert "did not finish within 2 s" in head and "on rank 0 of 2" in head, msg
    assert "in all_reduce over ('x',) (2 ranks, sum, float32 (2,)) for relu.default" in msg, msg
    assert "at test_launch.py" in msg and "in _relu_of_sum" in msg, msg
    assert "rank 1 returned." in msg and "same collectives in the same order" in msg, msg
    assert small_pool._procs == []  # killed, not left running


def test_rank_stuck_outside_collectives_is_named_by_its_stack(small_pool):
    small_pool.run(_gather_rows, {"x": 2})
    msg, took = _fails(small_pool, hang_on_rank0, timeout=2.0)
    assert took >= 2.0 and took < 20
    assert "did not finish within 2 s" in msg.splitlines()[0] and "on rank 0 of 2" in msg
    assert _before(msg, "rank 0 did not finish, not in a shardlib collective", "knock-on: rank 1")
    assert "in hang_on_rank0" in msg, msg  # its Python stack
    assert "all_gather over ('x',)" in msg.split("knock-on: rank 1")[1], msg


def test_report_puts_root_cause_before_an_earlier_knock_on():
    peer = _Failure(
        0,
        "raised",
        1.0,
        "DistBackendError",
        "[pair.cc:534] Connection closed by peer [127.0.0.1]:5000",
        "tb0",
    )
    dead = _Failure(1, "died", 1.3, exitcode=-11)
    msg = _report("f", 3, [peer, dead], [2], 0.0, 60.0, 1.5, timed_out=False)
    assert msg.splitlines()[0] == (
        "sl.launch: f failed on 3 ranks; root cause: rank 1 died (killed by SIGSEGV)"
    )
    assert _before(msg, "rank 1 died", "knock-on: rank 0 raised DistBackendError: [pair.cc:534]")
    assert "tb0" not in msg and "did not finish" not in msg
    # Two independent errors are both root causes, earliest first, each with its traceback.
    a = _Failure(2, "raised", 2.0, "KeyError", "'w'", "tb2")
    b = _Failure(0, "raised", 1.0, "ValueError", "bad", "tb0")
    msg = _report("f", 3, [a, b], [1], 0.0, 60.0, 2.5, timed_out=False)
    assert _before(msg, "tb0", "tb2") and "knock-on" not in msg
    # Only a timeout is reported as one, with the time that passed.
    stuck = _Failure(0, "unfinished", 3.0)
    msg = _report("f", 2, [stuck], [1], 0.0, 3.0, 3.02, timed_out=True)
    assert "did not finish within 3 s (3.0 s passed) on rank 0 of 2" in msg


class _FakeBackend:
    """Each collective returns the note its rank shows while it runs."""

    def all_gather(self, mesh, bufs, axes):
        return _inflight.read(_inflight._slot)

    all_to_all = all_gather

    def reduce_scatter(self, mesh, bufs, axes, op):
        return _inflight.read(_inflight._slot)

    all_reduce = reduce_scatter

    def ppermute(self, mesh, bufs, src_of, recv_shapes):
        return _inflight.read(_inflight._slot)

    def broadcast_object(self, mesh, obj, src):
        return _inflight.read(_inflight._slot)

    def broadcast(self, mesh, tensor, src, shape, dtype):
        return _inflight.read(_inflight._slot)

    scatter = broadcast


_inflight.track_inflight(_FakeBackend)


def test_every_tracked_collective_notes_itself_while_it_runs(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(_inflight, "_slot", None)
    am = sl.AbstractMesh(("a", "b"), (2, 3))
    be, buf = _FakeBackend(), torch.zeros(2, 5, dtype=torch.float64)
    assert be.all_reduce(am, [buf], ("b",), "max") is None  # no slot: nothing noted
    _inflight.install(_inflight.StatusSlot(multiprocessing.get_context("spawn")))
    calls = {
        "all_gather": (am, [buf], ("b", "a")),
        "all_to_all": (am, [buf], ("a",)),
        "reduce_scatter": (am, [buf], ("b",), "sum"),
        "all_reduce": (am, [buf], ("a", "b"), "max"),
        "ppermute": (am, [buf], (1, 0, 2, 3, 4, 5), [(2, 5)]),
        "broadcast_object": (am, ("meta",), 2),
        "broadcast": (am, buf, 1, (2, 5), torch.float64),
        "scatter": (am, [buf] * 6, 0, (2, 5), torch.float64),
    }
    for kind, args in calls.items():
        note = getattr(be, kind)(*args)
        assert note["kind"] == kind and note["direction"] == "forward"
        assert note["site"].startswith("test_launch.py:")
        assert note["site"].endswith("in test_every_tracked_collective_notes_itself_while_it_runs")
        if len(args) > 2 and isinstance(args[2], tuple) and isinstance(args[2][0], str):
            k = math.prod(am.shape[am.axis_names.index(a)] for a in args[2])
            assert note["detail"].startswith(f"over {args[2]!r} ({k} ranks"), note
            assert "float64 (2, 5)" in note["detail"]
        text = _inflight.describe(note)
        assert text.startswith(f"{kind} ") and " at test_launch.py:" in text
        assert _inflight.read(_inflight._slot) is None  # cleared when it returns
    monkeypatch.setattr(_inflight, "_slot", None)


def test_main_thread_stack_is_read_from_a_faulthandler_dump(tmp_path):
    path = tmp_path / "dump"
    with open(path, "w") as f:
        f.write(f"{threading.main_thread().ident}\n")
        f.flush()
        faulthandler.dump_traceback(f, all_threads=True)
    stack = _main_thread_stack(path.read_text())
    assert stack.startswith("Python stack") and "test_main_thread_stack_is_read" in stack


def test_unpicklable_function_is_rejected_before_start():
    with pytest.raises(sl.LaunchError, match="picklable") as info:
        sl.launch(lambda mesh: 0, {"x": 2})
    assert "top level of a module" in str(info.value)


def test_mesh_size_must_match_processes(small_pool):
    with pytest.raises(sl.LaunchError, match="3 devices but there are 2 worker processes"):
        small_pool.run(rank_and_arg, {"x": 3}, ("a",))


def test_bad_axes_are_rejected():
    with pytest.raises(sl.LayoutError, match="positive ints"):
        sl.launch(rank_and_arg, {"x": 0}, args=("a",))


_CTRL_C_SCRIPT = """
import os, sys, time
import shardlib as sl

def sleeper(mesh, folder):
    with open(os.path.join(folder, f"{os.getpid()}.pid"), "w") as f:
        f.write("up")
    time.sleep(3600)

if __name__ == "__main__":
    try:
        sl.launch(sleeper, {"x": 2}, args=(sys.argv[1],), timeout=600)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not running
        return f.read().split(")")[-1].split()[0] != "Z"


def test_ctrl_c_stops_worker_processes(tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2, "workers did not start"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in out
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "worker processes outlived Ctrl-C"


def test_a_stack_dump_read_while_it_is_written_is_not_taken():
    """The launcher polls the dump file while faulthandler writes it: a dump cut inside a
    line, or before the main thread's first frame, reads as nothing until more is written,
    or the deadline passes."""
    ident = threading.main_thread().ident
    whole = (
        f"{ident}\nCurrent thread 0x{ident:016x} (most recent call first):\n"
        '  File "/x/test_launch.py", line 70 in hang_on_rank0\n'
        '  File "/x/_launch.py", line 99 in _worker_main\n'
    )
    cut = whole[: whole.index("hang_on_rank0")]  # "... line 70 in"
    assert _main_thread_stack(cut) == ""
    header_only = whole[: whole.index("  File")]  # the thread's header, no frame yet
    assert _main_thread_stack(header_only) == ""
    assert "line 70 in" in _main_thread_stack(cut, whole=False)
    assert "in hang_on_rank0" in _main_thread_stack(whole)
    assert "_worker_main" not in _main_thread_stack(whole)


def test_script_without_main_guard_names_the_fix(tmp_path):
    """Spawned ranks re-import the main script: one that calls sl.launch at import time
    makes every rank die while starting. The error says so, and the launcher's clean-up
    of the half-started workers does not mask it (it used to raise "can only join a
    started process")."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(
        "import shardlib as sl\n\ndef f(mesh):\n    return 1\n\nprint(sl.launch(f, {'x': 2}))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert 'needs an `if __name__ == "__main__":` guard' in last
    assert "can only join a started process" not in done.stderr
    assert "LaunchError: sl.launch: starting the process group failed on 2 ranks" in done.stderr
