"""kill -9 of a checkpoint writer at random points: a load always gets the whole old or new.

A server process (this file run as a script) imports shardlib once and, on
each request, forks a writer child that saves two alternating contents A and
B to one path as fast as it can. The test SIGKILLs the child after a random
delay (seeded), then loads the path in this process and checks that every
leaf equals A's or every leaf equals B's (several ShardedTensors of different
layouts, a partial one, a plain tensor, the step): never a mix, never an error.
Forking a pre-imported server keeps each round to milliseconds, so the default
tier runs 12 kills; the slow tier runs 60. The deterministic crash points of
the commit protocol (one per step) are in tests/test_checkpoint.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import shardlib as sl

P = sl.P
MESH = {"dp": 2, "tp": 2}
KEYS = ("w", "g", "b", "plain", "step")


def _contents(k: int) -> dict:
    """Content k (0 = A, 1 = B): every leaf differs between A and B."""
    mesh = sl.Mesh.simulated(MESH)
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(257, 129, generator=gen)
    g = torch.randint(-50, 50, (64, 33), generator=gen).double()
    b = torch.randn(130, generator=gen)
    shards = [g / 2 if dev % 2 == 0 else g - g / 2 for dev in range(4)]  # two summands of g
    return {
        "w": sl.shard(w, mesh, P("dp", "tp")),
        "g": sl.from_local(
            [
                s.narrow(1, 0, 17) if dev // 2 == 0 else s.narrow(1, 17, 16)
                for dev, s in enumerate(shards)
            ],
            mesh,
            P(None, "dp", partial="tp"),
            (64, 33),
        ),
        "b": sl.shard(b, mesh, P("tp")),
        "plain": torch.full((9,), float(k)),
        "step": 1000 + k,
    }


def _expected(k: int) -> dict:
    c = _contents(k)
    return {key: (v.full() if isinstance(v, sl.ShardedTensor) else v) for key, v in c.items()}


def _load(path: Path) -> dict:
    mesh = sl.Mesh.simulated({"x": 3})
    like = {
        "w": (mesh, P(None, "x")),
        "g": (mesh, P("x", None)),
        "b": (mesh, P()),
        "plain": torch.empty(9),
        "step": None,
    }
    out = sl.checkpoint.load(path, like)
    return {key: (v.full() if isinstance(v, sl.ShardedTensor) else v) for key, v in out.items()}


def _which(got: dict, candidates: list[dict]) -> list[int]:
    """For each leaf, the candidates it equals."""

    def same(a, b):
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    return [
        frozenset(i for i, c in enumerate(candidates) if same(got[key], c[key])) for key in KEYS
    ]


# == the server (run as a script) ==============================================
def _write_forever(path: Path, contents: list[dict]) -> None:
    k = 1
    while True:
        sl.checkpoint.save(path, contents[k % 2])
        k += 1


def _serve(path: Path) -> None:
    torch.set_num_threads(1)
    contents = [_contents(0), _contents(1)]  # built once: a forked writer starts saving at once
    for line in sys.stdin:
        if line.strip() != "fork":
            return
        pid = os.fork()
        if pid == 0:
            try:
                _write_forever(path, contents)
            finally:
                os._exit(1)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {status}", flush=True)


if __name__ == "__main__":
    _serve(Path(sys.argv[2]))


# == the test ==================================================================
def _kill_rounds(tmp_path: Path, rounds: int, seed: int) -> None:
    path = tmp_path / "h8c-crash" / "ckpt"
    sl.checkpoint.save(path, _contents(0))
    candidates = [_expected(0), _expected(1)]
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
        env=env,
    )
    rng = random.Random(seed)
    seen, mid_save = [], 0
    try:
        for r in range(rounds):
            server.stdin.write("fork\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            delay = rng.uniform(0.0, 0.15)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            reaped = server.stdout.readline()
            assert reaped.startswith("reaped"), reaped
            status = int(reaped.split()[1])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"round {r}: the writer ended by itself (status {status}) before the kill"
            )
            left = sorted(p.name for p in path.parent.iterdir())
            mid_save += any(".tmp-" in n or ".old-" in n or ".del-" in n for n in left)
            got = _load(path)
            which = _which(got, candidates)
            common = frozenset.intersection(*which)
            assert common, (
                f"round {r} (killed after {delay:.3f} s, directory {left}): the load mixes "
                f"checkpoints: per leaf {dict(zip(KEYS, map(sorted, which)))}"
            )
            seen.append(min(common))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
        server.stdout.close()
    assert len(seen) == rounds
    assert mid_save >= 1, "no kill landed inside a save; the test did not test anything"
    sl.checkpoint.save(path, _contents(1))  # the next save cleans up what the kills left
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_kill_9_of_a_writer_never_leaves_a_mix(tmp_path):
    _kill_rounds(tmp_path, rounds=12, seed=8)


@pytest.mark.slow
def test_kill_9_of_a_writer_never_leaves_a_mix_many_times(tmp_path):
    _kill_rounds(tmp_path, rounds=60, seed=9)
