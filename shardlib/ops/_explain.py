"""`sl.explain`: each op of a function with its layouts and the collectives it caused.

Owns the recorder that the dispatcher consults while an explanation is being
taken, and the printed table. It changes nothing about what runs: the same
decisions, the same collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._format import format_bytes
from ..collectives._ledger import CommRecord, _count, comm_ledger
from . import _dispatch
from ._tensor import ShardedTensor

__all__ = ["Explanation", "explain"]


@dataclass
class OpRecord:
    op: str
    inputs: list[str]
    outputs: list[str]
    comms: list[CommRecord]


@dataclass
class Explanation:
    """The ops a function ran on sharded tensors, in order, and what they communicated."""

    ops: list[OpRecord] = field(default_factory=list)
    result: Any = None

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for o in self.ops for c in o.comms)

    def __str__(self) -> str:
        lines = []
        for i, o in enumerate(self.ops, 1):
            lines.append(f"{i:>3}. {o.op}({', '.join(o.inputs)}) -> {', '.join(o.outputs) or '-'}")
            for c in o.comms:
                lines.append(
                    f"       {c.kind}({','.join(c.axes)}) {format_bytes(c.bytes)} {c.dtype} {c.direction}"
                )
        n = sum(len(o.comms) for o in self.ops)
        lines.append(
            f"{_count(len(self.ops), 'op')}, {_count(n, 'collective')}, {format_bytes(self.total_bytes)}"
        )
        return "\n".join(lines)


def _describe(a: Any) -> str:
    if isinstance(a, ShardedTensor):
        return f"{tuple(a.shape)} {a.spec}"
    if isinstance(a, torch.Tensor):
        return f"{tuple(a.shape)} plain"
    return ""


class _Recorder:
    def __init__(self) -> None:
        self.explanation = Explanation()
        self.depth = 0

    def record(self, func: Any, args: tuple, kwargs: dict, run: Callable) -> Any:
        if self.depth:  # ops inside a decomposition are part of the outer op
            return run(func, args, kwargs)
        self.depth += 1
        try:
            with comm_ledger() as led:
                out = run(func, args, kwargs)
        finally:
            self.depth -= 1
        ins = [d for a in (*args, *kwargs.values()) for d in _flat_describe(a) if d]
        outs = [d for d in _flat_describe(out) if d]
        name = str(func).removeprefix("aten.")
        self.explanation.ops.append(OpRecord(name, ins, outs, list(led.records)))
        return out


def _flat_describe(a: Any) -> list[str]:
    if isinstance(a, list | tuple):
        return [_describe(b) for b in a]
    return [_describe(a)]


def explain(fn: Callable, *args: Any, show: bool = True, **kwargs: Any) -> Explanation:
    """Run ``fn(*args, **kwargs)`` and report each op with its layouts and collectives.

    Returns an `Explanation` (its `.result` is fn's return value); prints it
    unless ``show=False``. Backward passes run inside `fn` are included.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> a = sl.shard(torch.ones(4, 6), mesh, sl.P(None, "x"))
        >>> b = sl.shard(torch.ones(6, 2), mesh, sl.P("x", None))
        >>> e = sl.explain(lambda: sl.reshard(a @ b, sl.P(None, None)))
          1. mm.default((4, 6) P(None, 'x'), (6, 2) P('x', None)) -> (4, 2) P(None, None, partial='x')
          2. [reshard]() -> -
               all_reduce(x) 32 B float32 forward
        2 ops, 1 collective, 32 B
        >>> e.result.full()[0, 0].item()
        6.0
    """
    rec = _Recorder()
    _dispatch._explainers.append(rec)
    try:
        with comm_ledger() as everything:
            rec.explanation.result = fn(*args, **kwargs)
    finally:
        _dispatch._explainers.remove(rec)
    # Collectives issued outside ops (sl.reshard, x.full(), ...) are listed by their cause.
    seen = {id(c) for o in rec.explanation.ops for c in o.comms}
    for c in everything.records:
        if id(c) not in seen:
            rec.explanation.ops.append(OpRecord(f"[{c.cause}]", [], [], [c]))
    if show:
        print(rec.explanation)
    return rec.explanation
