"""The communication ledger: nesting, totals, and the summary table.

Nested ledgers each receive every record issued while they are open and close
independently (two ledgers with equal contents are still different ledgers).
Byte counts are checked against the ring-model formula by hand. The summary
table is read back cell by cell against the records it prints (full-word
columns: ``direction`` is ``forward``/``backward``), and counts print in the
singular for one (``1 collective``, in the ledger and in `sl.explain`).
"""

from __future__ import annotations

import re

import torch

import shardlib as sl

P = sl.P


def test_nested_ledgers_with_equal_contents_close_independently():
    mesh = sl.Mesh.simulated({"x": 4})
    x = sl.shard(torch.zeros(8, 8), mesh, P("x", None))
    with sl.comm_ledger() as outer:
        with sl.comm_ledger() as inner:  # both empty: equal contents
            pass
        assert inner.records == [] and outer.records == []
        with sl.comm_ledger() as inner2:
            sl.reshard(x, P(None, None))
    # all_gather over 4 devices of a (2, 8) float32 chunk: 3 * 64 B
    assert [r.bytes for r in inner2.records] == [3 * 2 * 8 * 4]
    assert outer.records == inner2.records and outer.total_bytes == 192
    sl.reshard(x, P(None, "x"))  # after closing: recorded nowhere
    assert len(outer.records) == 1


def test_summary_lists_kinds_and_totals():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    x = sl.shard(torch.zeros(8, 8), mesh, P("a", "b"))
    with sl.comm_ledger() as led:
        sl.reshard(x, P("b", "a"))
        sl.reshard(x, P(None, None))
    text = led.summary()
    assert "ppermute" in text and "all_gather" in text and "total" in text
    assert led.count("ppermute") == 1 and led.bytes_by("ppermute") == 4 * 4 * 4


_HEAD = ("#", "kind", "axes", "group", "bytes", "dtype", "direction", "cause")


def _table(text: str) -> tuple[list[str], list[list[str]], str]:
    """(header cells, row cells, total line) of a summary; cells are 2+ spaces apart."""
    lines = text.splitlines()
    cells = [re.split(r" {2,}", line.strip()) for line in lines[:-1]]
    assert set(lines[1].replace(" ", "")) <= {"-"}
    return cells[0], cells[2:], lines[-1]


def test_summary_columns_are_full_words_and_match_the_records():
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    w = sl.shard(torch.randn(8, 4, dtype=torch.float64), mesh, P("a", None)).requires_grad_()
    with sl.comm_ledger() as led:
        y = sl.reshard(w, P(None, "b"))
        y.pow(2).sum().backward()
    head, rows, _ = _table(led.summary())
    assert tuple(head) == _HEAD
    assert {r.direction for r in led.records} == {"forward", "backward"}
    assert len(rows) == len(led.records)
    for i, (row, r) in enumerate(zip(rows, led.records), 1):
        want = [str(i), r.kind, ",".join(r.axes), str(r.group_size)]
        assert row[:4] == want and row[5:] == [r.dtype, r.direction, r.cause], row


def test_counts_print_singular_for_one():
    mesh = sl.Mesh.simulated({"x": 4})
    x = sl.shard(torch.ones(8, 8), mesh, P("x", None))
    for n in (0, 1, 2):
        with sl.comm_ledger() as led:
            for _ in range(n):
                sl.reshard(x, P(None, None))
        assert len(led.records) == n
        total = _table(led.summary())[2]
        assert total.startswith("total ")
        assert f" in {n} collective{'' if n == 1 else 's'}" in total, total
    e = sl.explain(lambda: sl.reshard(x, P(None, None)), show=False)
    n_ops, n_comms = len(e.ops), sum(len(o.comms) for o in e.ops)
    assert n_comms == 1
    assert (
        str(e).splitlines()[-1].startswith(f"{n_ops} op{'' if n_ops == 1 else 's'}, 1 collective, ")
    )
