"""Small formatting helpers shared by plans, the ledger and benchmarks."""

from __future__ import annotations

from typing import Any

__all__ = ["dtype_name", "format_bytes"]


def format_bytes(n: int) -> str:
    """``12.00 MiB``, ``3.50 KiB`` or ``36 B``."""
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.2f} KiB"
    return f"{n} B"


def dtype_name(dtype: Any) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")
