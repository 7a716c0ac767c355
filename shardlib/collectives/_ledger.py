"""The communication ledger: a record of every collective shardlib issues.

Owns `CommRecord`, `CommLedger` and `comm_ledger()`. Records are computed from
shapes (the ring model of the planner), so both backends log identical numbers.
Ledgers nest: a record goes to every ledger open at the time. The set of open
ledgers is process-wide (not per thread) so collectives that autograd runs on
its own threads are still recorded. Under torch.compile a record is a node of
the compiled graph (``shardlib::comm_record``, `_emit`), so every call of a
compiled function, forward and backward, records what eager records, in
eager's order, into the ledgers open when it runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch._library.effects import EffectType

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
# The recording `sl.capture` (ops/_capture.py), if any: it takes every record made.
# Non-empty also tells the backends to issue traceable (functional) collectives.
capture_hooks: list = []


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
    *,
    data: Sequence[torch.Tensor],
) -> None:
    """Put one collective in every open ledger.

    `data` is what the collective produced on this process (its output shards). Under
    torch.compile the record is not made now but put in the traced graph as a node that
    reads `data` (`_emit`): the compiled function then records it on every call, after
    the collective, in eager's order."""
    compiling = torch.compiler.is_compiling()
    if not (_open or compiling or capture_hooks):
        return
    rec = CommRecord(
        kind, tuple(axes), group_size, int(nbytes), dtype, direction, cause, int(scale_bytes)
    )
    if compiling:
        _emit(rec, data)
    else:
        _append(rec)
        if capture_hooks:  # sl.capture: the replay records it again, in this place
            capture_hooks[-1](rec)


def _append(rec: CommRecord) -> None:
    with _lock:
        for led in _open:
            led.records.append(rec)


# -- torch.compile (h9l): a record is a node of the compiled graph --------------------
# ``shardlib::comm_record(data, index) -> token`` appends record `index` (interned at trace
# time) to the open ledgers when the graph runs. It is an ORDERED effectful op, so
# AOTAutograd threads an effect token through it: DCE keeps it, and the partitioner puts
# each record in the graph (forward or backward) whose trace made it, in trace order.
# Inductor (torch 2.13) loses the ordering edge between effectful extern kernels
# (pytorch/pytorch#188301) and may reorder them, so each record also reads the previous
# record's token (a 0-element tensor) of the same trace and direction: a data edge that
# every backend keeps. Reading `data` puts it after its collective. Cost per record and
# call: one dispatcher call and an empty allocation (see the report of h9l).
_interned: dict[CommRecord, int] = {}
_by_index: list[CommRecord] = []  # interned records: the graph holds their indices
_chain: list = [None, None]  # ((modes of the trace, direction), its last token)


def _intern(rec: CommRecord) -> int:
    with _lock:
        i = _interned.get(rec)
        if i is None:
            i = _interned[rec] = len(_by_index)
            _by_index.append(rec)
        return i


def _emit(rec: CommRecord, data: Sequence[torch.Tensor]) -> None:
    """Put `rec` in the graph being traced (dynamo's run on fakes and AOTAutograd's
    metadata passes call the op too; only AOTAutograd's joint trace keeps it)."""
    if not data:
        raise AssertionError(f"record({rec.kind!r}, ...) under torch.compile needs its data")
    keys = torch._C._TorchDispatchModeKey
    functional = torch._C._get_dispatch_mode(keys.FUNCTIONAL)
    trace = (functional, torch._C._get_dispatch_mode(keys.PROXY), rec.direction)
    args = list(data)
    if functional is not None and _chain[0] is not None and _same(_chain[0], trace):
        args.append(_chain[1])
    token = torch.ops.shardlib.comm_record(args, _intern(rec))
    _chain[:] = (trace, token) if functional is not None else (None, None)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] is b[1] and a[2] == b[2]


def _comm_record(data: list[torch.Tensor], index: int) -> torch.Tensor:
    if _open:
        _append(_by_index[index])
    return data[0].new_empty(0)


def _comm_record_fake(data: list[torch.Tensor], index: int) -> torch.Tensor:
    return data[0].new_empty(0)


_lib = torch.library.Library("shardlib", "FRAGMENT")  # noqa: TOR901
_lib.define("comm_record(Tensor[] data, int index) -> Tensor")
_lib.impl("comm_record", _comm_record, "CompositeExplicitAutograd")
torch.library.register_fake("shardlib::comm_record", _comm_record_fake, lib=_lib)
torch.library._register_effectful_op("shardlib::comm_record", EffectType.ORDERED, lib=_lib)
# -- end torch.compile --
