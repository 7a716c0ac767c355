"""The communication ledger: nesting, totals, and the summary table.

Nested ledgers each receive every record issued while they are open and close
independently (two ledgers with equal contents are still different ledgers).
Byte counts are checked against the ring-model formula by hand.
"""

from __future__ import annotations

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
