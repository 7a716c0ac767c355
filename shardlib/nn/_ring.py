"""Ring attention: a `sl.shard_map` kernel over a sequence-split mesh axis (DESIGN §8 item 4).

Owns `token_order` (the load-balancing token orders of causal ring attention:
zigzag, stripe, none), `ring_attention` (the kernel: forward, custom backward)
and `count_blocks` (a test hook counting the attention blocks each device
computes). It does not own the scheme that chooses the order (`_scheme.py`,
`scheme.shard_batch`), the dispatch of `snn.attention` (`_use.py`), or the
collectives (`sl.ppermute` in `shardlib/ops/_named.py`).

The algorithm (P devices along the ring axis, device r holding query, key and
value block r of the sequence):

- forward: P steps; at step t device r holds the K/V block of device
  ``(r - t) mod P``, computes its local queries against it with an fp32
  online-softmax merge (running max m, running sum l, rescaled accumulator),
  and, for t < P-1, passes K and V on to device r+1 (``sl.ppermute``): P-1
  sends of K and of V, ``2 (P-1)/P * b s H_kv d * elem`` bytes per device.
  It keeps the logsumexp ``m + log l`` per query row for backward.
- backward (a `torch.autograd.Function`, not autograd through the loop, which
  would keep every visiting K/V): the same P steps; each block's
  probabilities are recomputed from the saved logsumexp, dQ accumulates
  locally, and the partial dK, dV of the visiting block travel with it; after
  the last step one more send brings each dK, dV home: P-1 sends of K and V
  again plus P sends of dK and dV (in the compute dtype).
- causal masks come from global token positions (``pos_k <= pos_q``), so any
  token order works (zigzag, stripe, packed positions); every local block is
  cut into two halves, and a (query half, key half) pair with nothing allowed
  is skipped. Under the zigzag order a half is one of the device's two chunks,
  so every device computes the same number of pairs (2P+1 of the 4P it sees).
- a sequence length P does not divide is padded inside the kernel to
  ``ceil(n/P)`` per device (the torch.chunk blocks of the input); padded keys
  and queries are masked, and the ppermute bytes in the ledger are those of
  the padded blocks.

Invariants: the only communication is ``sl.ppermute`` along the ring axis
(plus ``sl.shard_map``'s own reshards of inputs not already in the layouts
it documents, in the ledger with cause ``"shard_map"``); the output is in q's
layout and dtype; the computation runs in float32 (float64 for float64 inputs).

Invariant of `token_order`: ``perm`` is a permutation of ``range(seq_len)``;
slot i of the reordered sequence holds original token ``perm[i]``, and cutting
the reordered sequence into ``size`` equal blocks gives device r exactly the
tokens the balance assigns it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from .._errors import LayoutError, MeshMismatchError
from ..collectives._ledger import capture_hooks  # sl.capture: every block computed
from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ..ops._named import axis_index, ppermute
from ..ops._shard_map import shard_map
from ..ops._tensor import ShardedTensor

__all__ = ["BALANCES", "BlockCounts", "count_blocks", "ring_attention", "token_order"]

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


# == block counter (test hook) =================================================
@dataclass
class BlockCounts:
    """What each device computed inside `ring_attention` while `count_blocks` was open.

    ``pairs[(phase, device)]``: (query half-block, key half-block) pairs
    computed (skipped pairs are not counted); ``elements[(phase, device)]``:
    the query-key score entries of those pairs (``sq * sk`` per pair, for one
    batch element and head). `phase` is ``"forward"`` or ``"backward"`` (the
    kernel's, not autograd's), `device` the flat mesh index.
    """

    pairs: dict[tuple[str, int], int] = field(default_factory=dict)
    elements: dict[tuple[str, int], int] = field(default_factory=dict)

    def per_device(self, phase: str = "forward", what: str = "pairs") -> dict[int, int]:
        """``{device: count}`` for one phase (`what` is ``"pairs"`` or ``"elements"``)."""
        table = self.pairs if what == "pairs" else self.elements
        return {dev: n for (ph, dev), n in sorted(table.items()) if ph == phase}


_counting: list[BlockCounts] = []
_count_lock = threading.Lock()


@contextlib.contextmanager
def count_blocks() -> Iterator[BlockCounts]:
    """Count the attention blocks every device computes in `ring_attention` inside the block.

    Examples:
        >>> import shardlib as sl, torch
        >>> from shardlib.nn._ring import count_blocks, ring_attention
        >>> mesh = sl.Mesh.simulated({"cp": 2})
        >>> q = sl.shard(torch.randn(1, 1, 8, 4), mesh, sl.P(None, None, "cp", None))
        >>> with count_blocks() as c:
        ...     _ = ring_attention(q, q, q, axis="cp", causal=True)
        >>> c.per_device("forward")   # contiguous order: device 1 sees more of the past
        {0: 3, 1: 7}
    """
    counts = BlockCounts()
    with _count_lock:
        _counting.append(counts)
    try:
        yield counts
    finally:
        with _count_lock:
            _counting.remove(counts)


def _count(phase: str, device: int, elements: int) -> None:
    if not _counting:
        return
    with _count_lock:
        for c in _counting:
            c.pairs[(phase, device)] = c.pairs.get((phase, device), 0) + 1
            c.elements[(phase, device)] = c.elements.get((phase, device), 0) + elements


# == configuration =============================================================
@dataclass(frozen=True)
class _Ring:
    """Everything the per-device kernels need besides the tensors (same on every device)."""

    mesh: Mesh
    axis: str
    size: int  # P
    seq: int  # global sequence length n
    block: int  # padded local block, ceil(n / P)
    causal: bool
    scale: float
    positions: str  # "default" (0..n-1), "global" (every device has all), "travel" (sharded)
    compute: torch.dtype
    q_layout: Layout
    k_layout: Layout
    v_layout: Layout
    pos_layout: Layout | None

    @property
    def padded(self) -> bool:
        return self.seq % self.size != 0

    def valid(self, src: int, device: torch.device) -> torch.Tensor:
        """Which slots of source block `src` (padded to `block`) are real tokens."""
        n_valid = min(max(self.seq - src * self.block, 0), self.block)
        return torch.arange(self.block, device=device) < n_valid

    def halves(self) -> list[tuple[int, int]]:
        """The (start, stop) of the two half-blocks a local block is cut into for skipping."""
        if self.block < 2:
            return [(0, self.block)]
        h = -(-self.block // 2)
        return [(0, h), (h, self.block)]


def _pad_seq(t: torch.Tensor, block: int, dim: int = 2, value: float = 0) -> torch.Tensor:
    short = block - t.shape[dim]
    if short == 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [0, short]
    return torch.nn.functional.pad(t, pad, value=value)


def _block_positions(cfg: _Ring, src: int, pos: torch.Tensor | None, device) -> torch.Tensor:
    """Positions (bp, block) of source block `src` (default or "global" mode)."""
    if cfg.positions == "default":
        return (src * cfg.block + torch.arange(cfg.block, device=device)).unsqueeze(0)
    lo = min(src * cfg.block, cfg.seq)
    return _pad_seq(pos[:, lo : lo + cfg.block], cfg.block, dim=1)


def _mask(
    cfg: _Ring, q_pos, q_valid, k_pos, k_valid, qs: tuple[int, int], ks: tuple[int, int]
) -> torch.Tensor | None:
    """Allowed (query, key) entries of one half-pair, shape (bp, 1, 1, sq, sk); None: all."""
    m = None
    if cfg.causal:
        m = k_pos[:, None, ks[0] : ks[1]] <= q_pos[:, qs[0] : qs[1], None]
    if cfg.padded:
        v = q_valid[qs[0] : qs[1], None] & k_valid[None, ks[0] : ks[1]]
        m = v.unsqueeze(0) if m is None else m & v
    return None if m is None else m[:, None, None]


def _shift(x: torch.Tensor, cfg: _Ring) -> torch.Tensor:
    """Send `x` to the next device along the ring (device r -> r+1)."""
    p = cfg.size
    return ppermute(x, cfg.axis, [(i, (i + 1) % p) for i in range(p)])


# == per-device kernels ========================================================
def _forward_kernel(cfg: _Ring, store: dict, q, k, v, *pos_arg):
    """One device's forward: P steps of online softmax over the visiting K/V blocks."""
    p, r = cfg.size, axis_index(cfg.axis)
    dev = axis_index(cfg.mesh.axis_names)
    n_loc, ct = q.shape[2], cfg.compute
    b, hq, _, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    q5 = _pad_seq(q, cfg.block).to(ct).reshape(b, hk, g, cfg.block, d)
    k_blk, v_blk = _pad_seq(k, cfg.block), _pad_seq(v, cfg.block)
    pos = pos_arg[0] if pos_arg else None
    if pos is not None and pos.ndim == 1:
        pos = pos.unsqueeze(0)
    if cfg.positions == "travel":
        pos_blk = _pad_seq(pos, cfg.block, dim=1)
        q_pos = pos_blk
    else:
        q_pos = _block_positions(cfg, r, pos, q.device)
    q_valid = cfg.valid(r, q.device)
    halves = cfg.halves()
    shape = (b, hk, g)
    m = [torch.full((*shape, e - s), -math.inf, dtype=ct, device=q.device) for s, e in halves]
    l_ = [torch.zeros((*shape, e - s), dtype=ct, device=q.device) for s, e in halves]
    acc = [torch.zeros((*shape, e - s, v.shape[3]), dtype=ct, device=q.device) for s, e in halves]
    seen_pos = {}
    for step in range(p):
        src = (r - step) % p
        if cfg.positions == "travel":
            k_pos = pos_blk
        else:
            k_pos = _block_positions(cfg, src, pos, q.device)
        seen_pos[src] = k_pos
        k_valid = cfg.valid(src, q.device)
        kf, vf = k_blk.to(ct), v_blk.to(ct)
        for i, qs in enumerate(halves):
            qi = q5[:, :, :, qs[0] : qs[1]]
            for ks in halves:
                mask = _mask(cfg, q_pos, q_valid, k_pos, k_valid, qs, ks)
                if mask is not None and not capture_hooks and not bool(mask.any()):
                    continue  # nothing allowed: no kernel call (sl.capture: no value reads)
                _count("forward", dev, (qs[1] - qs[0]) * (ks[1] - ks[0]))
                s = torch.einsum("bkgqd,bkjd->bkgqj", qi, kf[:, :, ks[0] : ks[1]]) * cfg.scale
                if mask is not None:
                    s = s.masked_fill(~mask, -math.inf)
                m_new = torch.maximum(m[i], s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                e = torch.exp(s - m_safe[..., None])
                alpha = torch.exp(m[i] - m_safe)
                l_[i] = l_[i] * alpha + e.sum(-1)
                acc[i] = acc[i] * alpha[..., None] + torch.einsum(
                    "bkgqj,bkjd->bkgqd", e, vf[:, :, ks[0] : ks[1]]
                )
                m[i] = m_new
        if step < p - 1:
            k_blk, v_blk = _shift(k_blk, cfg), _shift(v_blk, cfg)
            if cfg.positions == "travel":
                pos_blk = _shift(pos_blk, cfg)
    m_all, l_all, acc_all = torch.cat(m, -1), torch.cat(l_, -1), torch.cat(acc, -2)
    empty = l_all == 0  # rows with no allowed key (padding): output 0, probabilities 0
    out = acc_all / torch.where(empty, torch.ones_like(l_all), l_all)[..., None]
    lse = torch.where(empty, torch.full_like(m_all, math.inf), m_all + torch.log(l_all))
    store[dev] = (lse, seen_pos if cfg.causal else None)
    out = out.reshape(b, hq, cfg.block, v.shape[3])[:, :, :n_loc]
    return out.to(q.dtype)


def _backward_kernel(cfg: _Ring, store: dict, need_kv: bool, q, k, v, out, dout):
    """One device's backward: recompute each block from the logsumexp; dK, dV travel with K, V."""
    p, r = cfg.size, axis_index(cfg.axis)
    dev = axis_index(cfg.mesh.axis_names)
    lse, seen_pos = store[dev]
    n_loc, ct = q.shape[2], cfg.compute
    b, hq, _, d = q.shape
    hk, dv_ = k.shape[1], v.shape[3]
    g = hq // hk
    q5 = _pad_seq(q, cfg.block).to(ct).reshape(b, hk, g, cfg.block, d)
    do5 = _pad_seq(dout, cfg.block).to(ct).reshape(b, hk, g, cfg.block, dv_)
    o5 = _pad_seq(out, cfg.block).to(ct).reshape(b, hk, g, cfg.block, dv_)
    delta = (do5 * o5).sum(-1)  # D_i = rowsum(dO * O)
    k_blk, v_blk = _pad_seq(k, cfg.block), _pad_seq(v, cfg.block)
    dk = torch.zeros(k_blk.shape, dtype=ct, device=q.device)
    dvv = torch.zeros(v_blk.shape, dtype=ct, device=q.device)
    dq = torch.zeros_like(q5)
    q_valid = cfg.valid(r, q.device)
    q_pos = seen_pos[r] if cfg.causal else None
    halves = cfg.halves()
    for step in range(p):
        src = (r - step) % p
        k_pos = seen_pos[src] if cfg.causal else None
        k_valid = cfg.valid(src, q.device)
        kf, vf = k_blk.to(ct), v_blk.to(ct)
        for qs in halves:
            qi, doi = q5[:, :, :, qs[0] : qs[1]], do5[:, :, :, qs[0] : qs[1]]
            lse_i, delta_i = lse[..., qs[0] : qs[1]], delta[..., qs[0] : qs[1]]
            for ks in halves:
                mask = _mask(cfg, q_pos, q_valid, k_pos, k_valid, qs, ks)
                if mask is not None and not capture_hooks and not bool(mask.any()):
                    continue
                _count("backward", dev, (qs[1] - qs[0]) * (ks[1] - ks[0]))
                kj, vj = kf[:, :, ks[0] : ks[1]], vf[:, :, ks[0] : ks[1]]
                s = torch.einsum("bkgqd,bkjd->bkgqj", qi, kj) * cfg.scale
                pr = torch.exp(s - lse_i[..., None])
                if mask is not None:
                    pr = pr.masked_fill(~mask, 0)
                dp = torch.einsum("bkgqd,bkjd->bkgqj", doi, vj)
                ds = pr * (dp - delta_i[..., None]) * cfg.scale
                dq[:, :, :, qs[0] : qs[1]] += torch.einsum("bkgqj,bkjd->bkgqd", ds, kj)
                if need_kv:
                    dvv[:, :, ks[0] : ks[1]] += torch.einsum("bkgqj,bkgqd->bkjd", pr, doi)
                    dk[:, :, ks[0] : ks[1]] += torch.einsum("bkgqj,bkgqd->bkjd", ds, qi)
        if step < p - 1:
            k_blk, v_blk = _shift(k_blk, cfg), _shift(v_blk, cfg)
        if need_kv:  # dK, dV travel with their block; the P-th send brings them home
            dk, dvv = _shift(dk, cfg), _shift(dvv, cfg)
    dq = dq.reshape(b, hq, cfg.block, d)[:, :, :n_loc].to(q.dtype)
    if not need_kv:
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    return dq, dk[:, :, :n_loc].to(k.dtype), dvv[:, :, :n_loc].to(v.dtype)


# == autograd ==================================================================
class _RingAttention(torch.autograd.Function):
    """ShardedTensors q, k, v (and positions) -> the attention output, in q's layout.

    Forward and backward each run one `sl.shard_map` of a per-device kernel;
    what the backward needs besides q, k, v and the output (the logsumexp and
    the positions of every block) is kept per device in `ctx.store`.
    """

    @staticmethod
    def forward(ctx, cfg: _Ring, q, k, v, pos):
        store: dict = {}
        args, layouts = [q, k, v], [cfg.q_layout, cfg.k_layout, cfg.v_layout]
        if pos is not None:
            args.append(pos)
            layouts.append(cfg.pos_layout)
        fn = functools.partial(_forward_kernel, cfg, store)
        fn.__name__ = "ring_attention"  # type: ignore[attr-defined]
        out = shard_map(fn, cfg.mesh, tuple(layouts), cfg.q_layout)(*args)
        ctx.cfg, ctx.store = cfg, store
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        cfg = ctx.cfg
        q, k, v, out = ctx.saved_tensors
        need_kv = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        fn = functools.partial(_backward_kernel, cfg, ctx.store, need_kv)
        fn.__name__ = "ring_attention_backward"  # type: ignore[attr-defined]
        ql, kl, vl = cfg.q_layout, cfg.k_layout, cfg.v_layout
        mapped = shard_map(fn, cfg.mesh, (ql, kl, vl, ql, ql), (ql, kl, vl))
        dq, dk, dv = mapped(q, k, v, out, dout)
        if not torch._C._autograd._get_current_graph_task_keep_graph():
            ctx.store = None  # freed with the saved tensors, not when the graph dies
        return None, dq, dk, dv, None


# == public entry ==============================================================
def ring_attention(
    q: ShardedTensor,
    k: ShardedTensor,
    v: ShardedTensor,
    *,
    axis: str,
    causal: bool = False,
    positions: torch.Tensor | None = None,
    scale: float | None = None,
) -> ShardedTensor:
    """Ring attention over mesh axis `axis`: ``softmax(q k^T * scale + mask) v``, SDPA's convention.

    ``q``: (batch, heads, seq, head_dim); ``k``, ``v``: (batch, kv_heads, seq,
    head_dim) (v's last dim may differ). Their seq dim must be split over
    `axis` alone and head_dim not split; batch and heads may be split over
    other mesh axes (the same way in q, k and v): that work is local. With
    ``kv_heads < heads`` (grouped-query attention) query head h uses kv head
    ``h // (heads // kv_heads)``.

    Communication (ledger, cause ``"shard_map:ppermute"``): forward P-1
    ppermutes each of K and V, ``2 (P-1)/P * b s H_kv d * elem`` bytes per
    device; backward the same again plus P ppermutes each of dK and dV
    (compute dtype). With sharded `positions` their block travels with K
    (P-1 more int64 ppermutes forward, none backward).

    Causal masking compares global positions, ``pos_k <= pos_q``, so the
    token order is free (`token_order`'s zigzag and stripe balance the work);
    a pair of half-blocks with nothing allowed is skipped.

    Args:
        q, k, v: ShardedTensors on one mesh, as above.
        axis: the mesh axis the sequence is split over (the ring).
        causal: mask future positions.
        positions: int64 global positions of the tokens in the current
            (possibly reordered) order, shape (seq,) or (batch, seq): a plain
            tensor (a replicated constant) or a ShardedTensor (its seq dim
            split over `axis` like q's); ``None``: ``0..seq-1`` in order.
            Used only when `causal`.
        scale: the score scale; ``None``: ``1/sqrt(head_dim)``.

    Returns:
        A ShardedTensor (batch, heads, seq, v's head_dim) in q's layout and
        dtype; computed in float32 (float64 for float64 inputs).

    Raises:
        LayoutError: shapes, dtypes or layouts that do not fit (the message
            names the `sl.reshard` that fixes them).

    Examples:
        >>> import shardlib as sl, torch, torch.nn.functional as F
        >>> from shardlib.nn._ring import ring_attention
        >>> mesh = sl.Mesh.simulated({"cp": 4})
        >>> q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.float64) for _ in range(3))
        >>> sh = lambda t: sl.shard(t, mesh, sl.P(None, None, "cp", None))
        >>> out = ring_attention(sh(q), sh(k), sh(v), axis="cp", causal=True)
        >>> out.spec, torch.allclose(out.full(), F.scaled_dot_product_attention(
        ...     q, k, v, is_causal=True))
        (P(None, None, 'cp', None), True)
    """
    cfg = _configure(q, k, v, axis, causal, positions, scale)
    pos = positions if cfg.causal and positions is not None else None
    return _RingAttention.apply(cfg, q, k, v, pos)


def _configure(q, k, v, axis, causal, positions, scale) -> _Ring:
    where = "snn ring_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, ShardedTensor):
            raise LayoutError(
                f"{where}({name}=...): expected a ShardedTensor whose seq dim is split over "
                f"axis {axis!r}, got {type(t).__name__}. Shard it first, e.g. "
                f"sl.shard({name}, mesh, sl.P(None, None, {axis!r}, None)); for unsharded "
                "tensors use F.scaled_dot_product_attention."
            )
        if t.ndim != 4:
            raise LayoutError(
                f"{where}({name}=...): expected 4 dims (batch, heads, seq, head_dim) as in "
                f"F.scaled_dot_product_attention, got shape {tuple(t.shape)}."
            )
    mesh = q._mesh
    if k._mesh != mesh or v._mesh != mesh:
        raise MeshMismatchError(
            f"{where}: q, k and v live on {mesh!r}, {k._mesh!r}, {v._mesh!r}; build them on "
            "one mesh."
        )
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        raise LayoutError(
            f"{where}(axis={axis!r}): not a mesh axis; the mesh has axes "
            f"{dict(zip(mesh.axis_names, mesh.shape))!r}. Pass the axis the seq dim is split over."
        )
    b, hq, n, d = q.shape
    problems = []
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        problems.append(
            f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: all three must be one floating dtype"
        )
    if k.shape[0] != b or v.shape[0] != b or k.shape[2] != n or v.shape[2] != n:
        problems.append(
            f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and seq "
            "(dims 0 and 2) must agree"
        )
    if k.shape[3] != d or k.shape[1] != v.shape[1]:
        problems.append(
            f"k {tuple(k.shape)} must have q's head_dim {d} and v's kv_heads {v.shape[1]}"
        )
    hk = k.shape[1]
    if hk == 0 or hq % hk:
        problems.append(
            f"heads {hq} is not a multiple of kv_heads {hk} (grouped-query attention gives "
            "each kv head heads // kv_heads query heads)"
        )
    ql, kl, vl = (t._layout.without_partial() for t in (q, k, v))
    want = Layout((ql.dims[0], ql.dims[1], (axis,), ()))
    for name, lay in (("q", ql), ("k", kl), ("v", vl)):
        if lay.dims[2] != (axis,) or lay.dims[3] != ():
            problems.append(
                f"{name} has layout {lay!r}: its seq dim (2) must be split over {axis!r} alone "
                f"and head_dim (3) not split"
            )
    if kl.dims[:2] != ql.dims[:2] or vl.dims[:2] != ql.dims[:2]:
        problems.append(
            f"q, k, v split batch and heads differently ({ql!r}, {kl!r}, {vl!r}); k and v "
            "must split dims 0 and 1 like q"
        )
    if not problems and ql.dims[1] and hq != hk:
        t_ = mesh.abstract.group_size(ql.dims[1])
        if hq % t_ or hk % t_:
            problems.append(
                f"heads {hq} and kv_heads {hk} are split over {ql.dims[1]!r} ({t_} devices) "
                f"with grouped-query attention: both must be divisible by {t_} so each device "
                "holds whole query-head groups with their kv head; pad the heads, or leave the "
                "heads dim unsplit"
            )
    if problems:
        raise LayoutError(
            f"{where}(q, k, v, axis={axis!r}): "
            + "; ".join(problems)
            + f". Fix: bring them to one layout, e.g. q = sl.reshard(q, {want!r}) and the same "
            "for k and v (batch and heads may stay split over other axes)."
        )
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    pos_mode, pos_layout = "default", None
    if causal and positions is not None:
        pos_mode, pos_layout = _positions_layout(positions, q, ql, axis, where)
    p = mesh.abstract.axis_size(axis)
    return _Ring(
        mesh=mesh,
        axis=axis,
        size=p,
        seq=n,
        block=-(-n // p) if n else 0,
        causal=bool(causal),
        scale=float(scale),
        positions=pos_mode,
        compute=torch.float64 if q.dtype == torch.float64 else torch.float32,
        q_layout=ql,
        k_layout=kl,
        v_layout=vl,
        pos_layout=pos_layout,
    )


def _positions_layout(positions, q, ql: Layout, axis: str, where: str) -> tuple[str, Layout]:
    """How positions reach the kernel: "travel" (seq split over axis) or "global"."""
    b, _, n, _ = q.shape
    if not isinstance(positions, torch.Tensor):
        raise LayoutError(
            f"{where}(positions=...): expected an int64 tensor of shape ({n},) or ({b}, {n}), "
            f"got {type(positions).__name__}."
        )
    shape = tuple(positions.shape)
    if (
        shape not in ((n,), (b, n))
        or positions.dtype.is_floating_point
        or (positions.dtype == torch.bool or positions.is_complex())
    ):
        raise LayoutError(
            f"{where}(positions=...): expected integer global token positions of shape ({n},) "
            f"or ({b}, {n}) (seq, or batch x seq, in the current token order), got shape "
            f"{shape} {positions.dtype}. E.g. positions = token_order({n}, P, 'zigzag') for a "
            "zigzag-ordered batch."
        )
    batch = (ql.dims[0],) if len(shape) == 2 else ()
    if isinstance(positions, ShardedTensor):
        if positions._mesh != q._mesh:
            raise MeshMismatchError(
                f"{where}(positions=...): positions live on {positions._mesh!r}, q on "
                f"{q._mesh!r}; build them on one mesh."
            )
        if positions._layout.dims[-1] == (axis,):
            return "travel", Layout((*batch, (axis,)))
    return "global", Layout((*batch, ()))
