"""`sl.launch` and `Workers`: results per rank, and failures that surface fast and clearly.

Covers: per-rank return values and args; a worker that raises (error tagged with
its rank and traceback), dies (exit code), or hangs (reported within the
timeout); an unpicklable function; a mesh whose size differs from the number
of processes; processes cleaned up after a failure; the pool restarting itself
after a failure.
"""

from __future__ import annotations

import os
import time

import pytest

import shardlib as sl
from shardlib.collectives import Workers

pytestmark = pytest.mark.dist


def rank_and_arg(mesh, arg):
    return (mesh.local_devices[0], mesh.axis_names, mesh.shape, arg)


def raise_on_rank1(mesh):
    if mesh.local_devices[0] == 1:
        raise ValueError("boom on purpose")
    return "fine"


def die_on_rank1(mesh):
    if mesh.local_devices[0] == 1:
        os._exit(3)
    return "fine"


def hang_on_rank0(mesh):
    if mesh.local_devices[0] == 0:
        time.sleep(3600)
    return "fine"


@pytest.fixture(scope="module")
def small_pool():
    workers = Workers(2, timeout=8.0)
    yield workers
    workers.close()


def test_launch_returns_per_rank_results():
    out = sl.launch(rank_and_arg, {"dp": 2}, args=("hello",))
    assert out == [(0, ("dp",), (2,), "hello"), (1, ("dp",), (2,), "hello")]


def test_worker_exception_names_rank_and_traceback(small_pool):
    with pytest.raises(sl.LaunchError) as info:
        small_pool.run(raise_on_rank1, {"x": 2})
    msg = str(info.value)
    assert "rank 1" in msg and "ValueError: boom on purpose" in msg and "raise_on_rank1" in msg
    # The pool restarts itself for the next call.
    assert small_pool.run(rank_and_arg, {"x": 2}, ("again",))[1][3] == "again"


def test_worker_death_is_reported(small_pool):
    with pytest.raises(sl.LaunchError, match=r"rank 1 ---\nworker process died \(exit code 3\)"):
        small_pool.run(die_on_rank1, {"x": 2})


def test_worker_hang_is_reported_within_timeout(small_pool):
    start = time.monotonic()
    with pytest.raises(sl.LaunchError, match=r"did not finish within 3 s"):
        small_pool.run(hang_on_rank0, {"x": 2}, timeout=3.0)
    assert time.monotonic() - start < 20
    procs_after = small_pool._procs
    assert procs_after == []  # killed, not left running


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
