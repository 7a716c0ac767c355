"""Session fixtures: real gloo worker pools, started once per test session.

`workers4` and `workers8` are `shardlib.collectives.Workers` pools (4 and 8
ranks on 127.0.0.1, one intra-op thread each, process-group timeout 60 s);
they start on first use and stop when the session ends. `one_torch_thread` runs a module
with one intra-op thread (tiny matrices on a loaded 2-core machine, as the examples' main()
sets); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
"""

from __future__ import annotations

import pytest
import torch

from shardlib.collectives import Workers


def _pool(n: int):
    workers = Workers(n, backend="gloo", threads=1, timeout=60.0)
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture(scope="session")
def workers4():
    yield from _pool(4)


@pytest.fixture(scope="session")
def workers8():
    yield from _pool(8)


@pytest.fixture(scope="module")
def one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
