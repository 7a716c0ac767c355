"""Session fixtures: real gloo worker pools, started once per test session.

`workers4` and `workers8` are `shardlib.collectives.Workers` pools (4 and 8
ranks on 127.0.0.1, one intra-op thread each, process-group timeout 60 s);
they start on first use and stop when the session ends.
"""

from __future__ import annotations

import pytest

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
