"""Re-chunking along one split dim: each device gets its output rows from their owners (ppermute).

Owns the row move behind the rules for ops that place every output row of a split dim
from at most one input row: slices, splits and their backwards, ``cat``, ``flip``,
``roll`` (`_views.py`) and circular pads (`_conv.py`). The output stays split over the
same axes, in the standard torch.chunk blocks of its own size; device i needs the source
rows of its output block, and gets the ones it does not hold from the devices that do.

A `RowMove` is pure data computed from shapes alone (every process derives the same
plan): the inputs' sizes along the dim (``cat`` has several; their blocks are
concatenated in input order), each device's source rows, and the transfers between
devices packed into *rounds*: one ``ppermute`` per round, in which every device sends at
most one buffer and receives at most one. A round's buffers are as wide as its widest
transfer (zero-padded), so the ledger records ``width * row bytes`` per round, and
`RowMove.bytes` is that sum: what the rules compare with gathering the dim (they take
the move only when it costs no more than the gather; never worse than the all-gather,
since a device receives each row at most once and at most one block from each peer).

Examples: a slice of rows 3..8 of 10 rows over 2 devices (blocks 0..4 and 5..9) gives
output blocks 3..5 and 6..8: device 0 needs row 5 from device 1, one round of 1 row.
A flip of an evenly split dim moves whole blocks, device i's to device P-1-i: one round.

Strict mode refuses a move that communicates, naming the op, the dim, the axes and the fix.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import LayoutError
from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh, Mesh
from ..layouts._shard import chunk_bounds, max_chunk
from . import _dispatch
from ._named import _Call
from ._named import _run as _collective

Axes = tuple[str, ...]

__all__ = ["RowMove", "row_bytes"]


@dataclass(frozen=True)
class RowMove:
    """Output rows along a split dim, each from one source row (or the fill value).

    `sizes` are the sizes along `dim` of the inputs (one, or several for ``cat``), each
    split over `axes` in torch.chunk blocks; a source row is an index into their
    concatenation. ``srcs[i]`` lists, for device index i along `axes`, the source row of
    each row of its output block (-1: the fill value).

    Examples:
        >>> m = RowMove(0, ("x",), (10,), ((3, 4, 5), (6, 7, 8)))
        >>> m.rounds
        (((1, 0, (5,)),),)
        >>> m.widths, m.pos
        ((1,), ((3, 4, 5), (1, 2, 3)))
    """

    dim: int
    axes: Axes
    sizes: tuple[int, ...]
    srcs: tuple[tuple[int, ...], ...]
    # derived in __post_init__: per round, its transfers (sender, receiver, source rows);
    # each round's buffer width; each output row's position in its device's pool (own
    # blocks of every input in order, then the rows received round by round, then one fill row)
    rounds: tuple[tuple[tuple[int, int, tuple[int, ...]], ...], ...] = field(
        init=False, compare=False, repr=False
    )
    widths: tuple[int, ...] = field(init=False, compare=False, repr=False)
    pos: tuple[tuple[int, ...], ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        p = len(self.srcs)
        offsets = [0]
        for n in self.sizes:
            offsets.append(offsets[-1] + n)
        # where each source row lives: (owner, position in the owner's pool of own rows)
        own_start = [[0] * len(self.sizes) for _ in range(p)]
        for j in range(p):
            at = 0
            for k, n in enumerate(self.sizes):
                own_start[j][k] = at
                lo, hi = chunk_bounds(n, p, j)
                at += hi - lo

        def owner(q: int) -> tuple[int, int]:
            k = bisect.bisect_right(offsets, q) - 1
            local = q - offsets[k]
            c = -(-self.sizes[k] // p)
            j = local // c
            return j, own_start[j][k] + local - j * c

        self._set("owner_of", owner)
        transfers: dict[tuple[int, int], set[int]] = {}
        for i, src in enumerate(self.srcs):
            for q in src:
                if q >= 0:
                    j, _ = owner(q)
                    if j != i:
                        transfers.setdefault((j, i), set()).add(q)
        # pack transfers into rounds (each device sends and receives at most once per
        # round), widest first so that wide buffers share rounds
        order = sorted(transfers, key=lambda ji: (-len(transfers[ji]), ji))
        rounds: list[list[tuple[int, int, tuple[int, ...]]]] = []
        busy: list[tuple[set[int], set[int]]] = []
        for j, i in order:
            free = (r for r, (snd, rcv) in enumerate(busy) if j not in snd and i not in rcv)
            r = next(free, len(rounds))
            if r == len(rounds):
                rounds.append([])
                busy.append((set(), set()))
            rounds[r].append((j, i, tuple(sorted(transfers[(j, i)]))))
            busy[r][0].add(j)
            busy[r][1].add(i)
        widths = tuple(max(len(rows) for _, _, rows in rnd) for rnd in rounds)
        pos = []
        for i, src in enumerate(self.srcs):
            n_own = sum(hi - lo for lo, hi in (chunk_bounds(n, p, i) for n in self.sizes))
            where, k = {}, n_own
            for rnd in rounds:
                for _, dst, rows in rnd:
                    if dst == i:
                        for q in rows:
                            where[q] = k
                            k += 1
            row_pos = []
            for q in src:
                if q < 0:
                    row_pos.append(k)  # the fill row, after everything received
                elif q in where:
                    row_pos.append(where[q])
                else:
                    row_pos.append(owner(q)[1])
            pos.append(tuple(row_pos))
        self._set("rounds", tuple(tuple(rnd) for rnd in rounds))
        self._set("widths", widths)
        self._set("pos", tuple(pos))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def bytes(self, row: int) -> int:
        """What the ledger records for the move: each round's width times `row` bytes."""
        return sum(self.widths) * row

    def run(self, op: Any, mesh: Mesh, blocks: Sequence[list], fill: Any = 0) -> list:
        """Per local device, its output block (fresh tensors).

        `blocks[k]` holds input k's local blocks, one per local device (flat order).
        """
        if _dispatch._state["strict"] and self.rounds:
            raise LayoutError(
                f"sl.strict: {op} on a tensor whose dim {self.dim} is split over "
                f"{self.axes!r} moves rows between devices ({len(self.rounds)} ppermute(s) of "
                f"{', '.join(map(str, self.widths))} row(s)). Fix: leave strict mode for this "
                "op, or sl.reshard the input so that dim is not split."
            )
        am, d = mesh.abstract, self.dim
        idx = [am.index_along(dev, self.axes) for dev in mesh.local_devices]
        pools = [torch.cat([b[j] for b in blocks], d) for j in range(len(idx))]
        cause = _dispatch._cause(op)
        got: list[list[torch.Tensor]] = [[] for _ in idx]
        for rnd, width in zip(self.rounds, self.widths):
            sending = {j: rows for j, _, rows in rnd}
            receiving = {i: len(rows) for _, i, rows in rnd}
            bufs = []
            for pool, i in zip(pools, idx):
                rows = [self.owner_of(q)[1] for q in sending.get(i, ())]
                bufs.append(take_rows(pool, d, rows, width))
            pairs = tuple(sorted((j, i) for j, i, _ in rnd))
            out = _collective(_Call("ppermute", self.axes, (pairs,), cause), mesh, bufs)
            for j, (o, i) in enumerate(zip(out, idx)):
                if i in receiving:
                    got[j].append(o.narrow(d, 0, receiving[i]))
        result = []
        for j, (pool, i) in enumerate(zip(pools, idx)):
            parts = [pool, *got[j]]
            if any(q < 0 for q in self.srcs[i]):
                shape = list(pool.shape)
                shape[d] = 1
                parts.append(pool.new_full(shape, fill))
            full = torch.cat(parts, d) if len(parts) > 1 else pool
            result.append(select_rows(full, d, self.pos[i], copy=True))
        return result


def take_rows(x: torch.Tensor, dim: int, rows: Sequence[int], width: int) -> torch.Tensor:
    """Rows `rows` of `x` along `dim`, zero-padded to `width` rows (a fixed-size buffer)."""
    piece = x.index_select(dim, torch.as_tensor(rows, dtype=torch.long, device=x.device))
    if len(rows) < width:
        shape = list(x.shape)
        shape[dim] = width - len(rows)
        piece = torch.cat([piece, x.new_zeros(shape)], dim)
    return piece


def select_rows(
    pool: torch.Tensor, dim: int, pos: tuple[int, ...], *, copy: bool = False
) -> torch.Tensor:
    """Rows `pos` of `pool` along `dim`: a narrow view when they are consecutive (a copy
    with ``copy=True``), else an index_select."""
    n = len(pos)
    if n and pos == tuple(range(pos[0], pos[0] + n)):
        rows = pool.narrow(dim, pos[0], n)
        return rows.clone() if copy else rows
    return pool.index_select(dim, torch.as_tensor(pos, dtype=torch.long, device=pool.device))


def row_bytes(shape: Sequence[int], layout: Layout, dim: int, am: AbstractMesh, dtype) -> int:
    """Bytes of one row along `dim` of the largest local block (what a move's buffer row holds)."""
    numel = math.prod(
        max_chunk(n, am.group_size(axes))
        for e, (n, axes) in enumerate(zip(shape, layout.dims))
        if e != dim
    )
    return numel * torch.empty((), dtype=dtype).element_size()


def block_srcs(m: int, p: int, source: Any) -> tuple[tuple[int, ...], ...]:
    """Per device index, `source(q)` of each output row q of its torch.chunk block of `m` rows."""
    return tuple(tuple(source(q) for q in range(*chunk_bounds(m, p, i))) for i in range(p))
