"""The communication ledger: a record of every collective shardlib issues.

Owns `CommRecord`, `CommLedger` and `comm_ledger()`. Records are computed from
shapes (the ring model of the planner), so both backends log identical numbers.
Ledgers nest: a record goes to every ledger open at the time. The set of open
ledgers is process-wide (not per thread) so collectives that autograd runs on
its own threads are still recorded. Under torch.compile a compiled function's
collectives are recorded once, while it is traced (its first call), by the
tracing pass whose graph runs (`_tracing_the_graph`); later calls record
nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .._format import format_bytes

__all__ = ["CommLedger", "CommRecord", "comm_ledger", "record"]

KINDS = (
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "all_reduce",
    "ppermute",
    "broadcast",
    "scatter",
)


@dataclass(frozen=True, slots=True)
class CommRecord:
    """One collective: what, over which axes, how many bytes the busiest device sent.

    `dtype` is what travelled (the wire format of a compressed move: ``"int8"``,
    ``"float8_e4m3fn"``, ``"bfloat16"``); `scale_bytes` is the part of `bytes` that is
    quantization scales (0 for uncompressed moves).
    """

    kind: str
    axes: tuple[str, ...]
    group_size: int
    bytes: int
    dtype: str
    direction: str
    cause: str
    scale_bytes: int = 0


@dataclass(eq=False)  # ledgers nest: identity, not contents, tells them apart
class CommLedger:
    """Collectives recorded while a `comm_ledger()` block was open.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 4})
        >>> x = sl.shard(torch.ones(8, 8), mesh, sl.P("x", None))
        >>> with sl.comm_ledger() as led:
        ...     y = sl.reshard(x, sl.P(None, None))
        >>> [(r.kind, r.axes, r.bytes) for r in led.records]
        [('all_gather', ('x',), 192)]
    """

    records: list[CommRecord] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    def count(self, kind: str | None = None, direction: str | None = None) -> int:
        return sum(
            1
            for r in self.records
            if (kind is None or r.kind == kind) and (direction is None or r.direction == direction)
        )

    def bytes_by(self, kind: str | None = None, direction: str | None = None) -> int:
        return sum(
            r.bytes
            for r in self.records
            if (kind is None or r.kind == kind) and (direction is None or r.direction == direction)
        )

    def summary(self) -> str:
        """A table of the records, then totals per kind.

        Columns: ``#``, ``kind``, ``axes``, ``group`` (ranks in the group),
        ``bytes`` (sent by the busiest device), ``dtype``, ``direction``
        (``forward`` or ``backward``), ``cause``. The last line counts with
        the right number: ``in 1 collective``, ``in 2 collectives``.

        Examples:
            >>> import shardlib as sl, torch
            >>> mesh = sl.Mesh.simulated({"x": 4})
            >>> x = sl.shard(torch.ones(8, 8), mesh, sl.P("x", None))
            >>> with sl.comm_ledger() as led:
            ...     y = sl.reshard(x, sl.P(None, None))
            >>> print(led.summary())
            #  kind        axes  group  bytes  dtype    direction  cause
            -  ----------  ----  -----  -----  -------  ---------  -------
            1  all_gather  x     4      192 B  float32  forward    reshard
            total 192 B in 1 collective (all_gather x1 192 B)
        """
        head = ("#", "kind", "axes", "group", "bytes", "dtype", "direction", "cause")
        rows = [
            (
                str(i),
                r.kind,
                ",".join(r.axes),
                str(r.group_size),
                format_bytes(r.bytes),
                r.dtype,
                r.direction,
                r.cause,
            )
            for i, r in enumerate(self.records, 1)
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        kinds = sorted({r.kind for r in self.records})
        totals = ", ".join(f"{k} x{self.count(k)} {format_bytes(self.bytes_by(k))}" for k in kinds)
        out.append(
            f"total {format_bytes(self.total_bytes)} in {_count(len(self.records), 'collective')}"
            + (f" ({totals})" if totals else "")
        )
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary()


def _count(n: int, noun: str) -> str:
    """``1 collective``, ``2 collectives``, ``0 collectives``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def current_direction() -> str:
    """``"backward"`` while autograd runs a backward pass, else ``"forward"``."""
    import torch

    inherited = getattr(_inherited, "direction", None)  # set by `inherit_direction`
    if inherited is not None:
        return inherited
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


# -- direction of helper threads (h2, issue 7: shard_map called inside a backward) --
_inherited = threading.local()


@contextmanager
def inherit_direction(direction: str) -> Iterator[None]:
    """Make `current_direction` answer `direction` on this thread (a worker started by a
    thread that knew it, e.g. a simulated shard_map device thread started in a backward)."""
    before = getattr(_inherited, "direction", None)
    _inherited.direction = direction
    try:
        yield
    finally:
        _inherited.direction = before


# -- end h2 --


_lock = threading.Lock()
_open: list[CommLedger] = []


@contextmanager
def comm_ledger() -> Iterator[CommLedger]:
    """Record every collective issued inside the block (forward and backward)."""
    led = CommLedger()
    with _lock:
        _open.append(led)
    try:
        yield led
    finally:
        with _lock:
            _open.remove(led)


def record(
    kind: str,
    axes: tuple[str, ...],
    group_size: int,
    nbytes: int,
    dtype: str,
    direction: str,
    cause: str,
    scale_bytes: int = 0,
) -> None:
    if not _open:
        return
    if _compiling() and not _tracing_the_graph():
        return  # (h9g) see `_tracing_the_graph`
    rec = CommRecord(
        kind, tuple(axes), group_size, int(nbytes), dtype, direction, cause, int(scale_bytes)
    )
    with _lock:
        for led in _open:
            led.records.append(rec)


# -- torch.compile (h9g): which tracing pass records ------------------------------
def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _tracing_the_graph() -> bool:
    """Whether this is the pass of torch.compile whose graph will run: AOTAutograd's
    forward+backward trace (a proxy mode is active). Dynamo's run on fake shards and
    AOTAutograd's metadata passes run our dispatch too, but their collectives never run:
    recording only this pass puts each collective of a compiled function in the ledger once,
    as eager would record it (at its first, compiling call; later calls record nothing)."""
    import torch

    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None


# -- end torch.compile --
