"""Ring attention: a `sl.shard_map` kernel over a sequence-split mesh axis (DESIGN §8 item 4).

Owns `token_order` (the load-balancing token orders of causal ring attention:
zigzag, stripe, none) and, below it, the ring-attention kernel. It does not own
the scheme that chooses the order (`_scheme.py`, `scheme.shard_batch`) or the
dispatch of `snn.attention` (`_use.py`).

Invariant of `token_order`: ``perm`` is a permutation of ``range(seq_len)``;
slot i of the reordered sequence holds original token ``perm[i]``, and cutting
the reordered sequence into ``size`` equal blocks gives device r exactly the
tokens the balance assigns it.
"""

from __future__ import annotations

import torch

from .._errors import LayoutError

__all__ = ["BALANCES", "token_order"]

BALANCES: tuple[str | None, ...] = ("zigzag", "stripe", None)


# == token orders ==============================================================
def token_order(seq_len: int, size: int, balance: str | None) -> torch.Tensor:
    """The token permutation of a causal-balancing order: slot i holds original token ``perm[i]``.

    - ``"zigzag"``: the sequence is cut into ``2*size`` equal chunks; device r
      holds chunks r and ``2*size-1-r`` (an early and a late one), so every
      device does the same causal work. Needs ``seq_len % (2*size) == 0``.
    - ``"stripe"``: token t goes to device ``t % size``, in order. Needs
      ``seq_len % size == 0``.
    - ``None``: the identity (contiguous blocks; causal work grows with r).

    Apply it once at data loading to tokens, targets and positions
    (``x[:, perm]``); undo it with ``perm.argsort()``. A length the order
    cannot cut raises (no silent padding: pad the batch to the multiple named
    in the error, with targets the loss ignores).

    Args:
        seq_len: the global sequence length.
        size: the number of devices of the sequence-split mesh axis.
        balance: ``"zigzag"``, ``"stripe"`` or ``None``.

    Returns:
        An int64 tensor of shape ``(seq_len,)``, a permutation of ``range(seq_len)``.

    Examples:
        >>> from shardlib.nn._ring import token_order
        >>> token_order(8, 2, "zigzag").tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
        >>> token_order(6, 3, "stripe").tolist()
        [0, 3, 1, 4, 2, 5]
        >>> token_order(5, 2, None).tolist()
        [0, 1, 2, 3, 4]
    """
    where = f"token_order(seq_len={seq_len!r}, size={size!r}, balance={balance!r})"
    for name, v in (("seq_len", seq_len), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seq_len" else 1):
            raise LayoutError(
                f"{where}: {name} must be an int >= {0 if name == 'seq_len' else 1}, got {v!r}."
            )
    if balance not in BALANCES:
        raise LayoutError(
            f"{where}: unknown balance {balance!r}; the valid ones are 'zigzag' (device r holds "
            "chunks r and 2*size-1-r of 2*size), 'stripe' (token t on device t % size) and None "
            "(contiguous blocks)."
        )
    if balance is None:
        return torch.arange(seq_len, dtype=torch.int64)
    multiple = 2 * size if balance == "zigzag" else size
    if seq_len % multiple:
        up = -(-seq_len // multiple) * multiple
        raise LayoutError(
            f"{where}: {balance} order needs seq_len divisible by "
            f"{'2*size' if balance == 'zigzag' else 'size'} = {multiple} (equal chunks per "
            f"device), and {seq_len} is not. Pad the sequence to {up} tokens (targets of the "
            "padding ignored by the loss), or use balance=None (contiguous blocks; uneven "
            "lengths are padded inside ring_attention)."
        )
    if balance == "stripe":
        return torch.arange(seq_len, dtype=torch.int64).reshape(-1, size).T.reshape(-1)
    c = seq_len // multiple
    chunks = torch.arange(seq_len, dtype=torch.int64).reshape(multiple, c)
    order = [i for r in range(size) for i in (r, multiple - 1 - r)]
    return chunks[order].reshape(-1)
