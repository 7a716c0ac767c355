"""The collective each `sl.launch` worker is blocked in, readable by the launcher.

Owns one small shared-memory slot per worker rank (`StatusSlot`) and
`track_inflight`, which wraps the blocking collectives of the distributed
backend so that, while one runs, the slot says which: kind, axes, group size,
reduce op, buffer shape and dtype, the shardlib call that issued it (the aten
op for an implicit move, else the public function: ``reshard``, ``psum``,
``shard``), the user's line that made that call, forward or backward, and when
it started. When the launcher gives up on a rank (a peer failed, or the
timeout passed), it reads the slot and names what the rank waits in.

Invariants:
- Outside `sl.launch` workers no slot is installed and a tracked collective
  costs one global read (torchrun and user-made process groups are untouched).
- The slot is written before the collective starts and cleared when it returns
  or raises; an empty slot means "not in a shardlib collective".
- The slot is a raw byte buffer without a lock: the launcher reads it only
  after the rank has stopped making progress, so a torn read is harmless.

It does not decide what a failure report says; `_launch.py` does.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SLOT_BYTES", "StatusSlot", "describe", "install", "read", "track_inflight"]

SLOT_BYTES = 1024
_SEP = "\x1f"  # between the note's fields: kind, detail, call, site, direction, start time

_slot: Any = None  # this process's shared buffer (a ctypes char array), or None
_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def StatusSlot(ctx: Any) -> Any:  # noqa: N802 (a factory named for what it returns)
    """A fresh zeroed slot in shared memory, made with multiprocessing context `ctx`."""
    return ctx.Array("c", SLOT_BYTES, lock=False)


def install(slot: Any) -> None:
    """Make `slot` this process's in-flight slot (called once in each worker)."""
    global _slot
    _slot = slot
    clear()


def clear() -> None:
    if _slot is not None:
        _slot[0] = b"\0"


_TORCH_DIR = ""


def _torch_dir() -> str:
    global _TORCH_DIR
    if not _TORCH_DIR:
        import torch

        _TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    return _TORCH_DIR


def _caller(frame: Any) -> tuple[str, str]:
    """(shardlib call, user site) for a collective issued from `frame` outward.

    Walks out to the first frame outside shardlib and torch (the user's code);
    the shardlib frame it called is the call. A `__torch_dispatch__` on the way
    names the aten op instead (the outermost one: decompositions nest).
    """
    torch_dir = _torch_dir()
    entry = op = None
    f = frame
    while f is not None:
        path = f.f_code.co_filename
        if path.startswith(_PKG):
            entry = f.f_code.co_name
            if entry == "__torch_dispatch__":
                op = str(f.f_locals.get("func", "?")).removeprefix("aten.")
        elif not path.startswith(torch_dir) and not path.startswith("<"):
            site = f"{os.path.basename(path)}:{f.f_lineno} in {f.f_code.co_name}"
            return op or entry or "?", site
        f = f.f_back
    return op or entry or "?", "autograd's thread" if op or entry else "?"


def _detail(kind: str, args: tuple) -> str:
    """Axes, group, op and buffer of a backend collective's arguments (after `mesh`)."""
    mesh, first = args[0], args[1]
    if kind in ("all_gather", "all_to_all", "reduce_scatter", "all_reduce", "ppermute"):
        b = first[0]
        axes = tuple(args[2]) if kind != "ppermute" else None
        op = args[3] if kind in ("reduce_scatter", "all_reduce") else None
        return _detail_text(kind, mesh, axes, op, b.dtype, tuple(b.shape))
    return _detail_text(kind, mesh, None, None, None, args[2])


@functools.lru_cache(maxsize=1024)
def _detail_text(kind, mesh, axes, op, dtype, shape_or_src) -> str:
    if kind in ("broadcast_object", "broadcast", "scatter"):
        return f"from rank {shape_or_src} to all {mesh.size} ranks"
    buf = f"{str(dtype).removeprefix('torch.')} {shape_or_src}"
    if axes is None:
        return f"over all {mesh.size} ranks ({buf})"
    k = mesh.group_size(axes)
    parts = [f"{k} rank" if k == 1 else f"{k} ranks", *([op] if op else []), buf]
    return f"over {axes!r} ({', '.join(parts)})"


def _direction() -> str:
    import torch

    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


def track_inflight(cls: type) -> type:
    """Wrap the blocking collectives of backend class `cls` so that each notes itself."""
    for kind in (
        "all_gather",
        "all_to_all",
        "reduce_scatter",
        "all_reduce",
        "ppermute",
        "broadcast_object",
        "broadcast",
        "scatter",
    ):
        setattr(cls, kind, _tracked(kind, getattr(cls, kind)))
    return cls


def _tracked(kind: str, method: Callable) -> Callable:
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _slot is None:
            return method(self, *args, **kwargs)
        try:
            call, site = _caller(sys._getframe(1))
            note = _SEP.join(
                (kind, _detail(kind, args), call, site, _direction(), f"{time.monotonic():.3f}")
            )
            _slot.value = note.encode("utf-8", "replace")[: SLOT_BYTES - 1]
        except Exception:  # the note is a diagnostic: never let it break the collective
            _slot.value = kind.encode()
        try:
            return method(self, *args, **kwargs)
        finally:
            _slot[0] = b"\0"

    return run


def read(slot: Any) -> dict[str, Any] | None:
    """The note in `slot` as a dict, or None when the rank is not in a collective (or no slot)."""
    if slot is None:
        return None
    raw = bytes(slot.raw).split(b"\0", 1)[0].decode("utf-8", "replace")
    if not raw:
        return None
    fields = raw.split(_SEP)
    if len(fields) != 6:
        return {"kind": fields[0], "detail": "", "call": "?", "site": "?", "direction": "?"}
    kind, detail, call, site, direction, started = fields
    try:
        start = float(started)
    except ValueError:
        start = None
    return {
        "kind": kind,
        "detail": detail,
        "call": call,
        "site": site,
        "direction": direction,
        "started": start,
    }


def describe(note: dict[str, Any], now: float | None = None) -> str:
    """One phrase for a note: ``all_reduce over ('x',) (2 ranks sum, ...) for reshard at ...``."""
    text = f"{note['kind']} {note['detail']}".rstrip()
    text += f" for {note['call']} at {note['site']}"
    if note.get("direction") == "backward":
        text += " (backward)"
    start = note.get("started")
    if start is not None:
        text += f", for {max((now or time.monotonic()) - start, 0.0):.1f} s"
    return text
