"""The reference GPT: one model function for every scheme (DESIGN §8).

Owns `Config`, `init`, `DIMS`, `logits` and `loss`: a pre-norm decoder-only
transformer written once against `snn.constrain`, `snn.linear` and
`snn.attention`. On plain tensors (or outside ``with snn.use(scheme, mesh):``)
those are the plain torch ops, so the same function is the unsharded model;
under a scheme they follow the scheme's layouts. The model never names a mesh
axis and never branches on a scheme.

The model: token embedding (``F.embedding``; vocab-split under tensor-parallel
schemes by the embedding rule), per layer RMSNorm -> causal grouped-query
attention with rotary positions -> residual, RMSNorm -> GELU MLP -> residual;
final RMSNorm, an untied output head and mean next-token cross-entropy
(vocab-parallel when the logits are vocab-split: ``log_softmax`` over a split
dim and ``nll_loss`` over a split class dim are rules). Dropout
(``config.dropout``) sits on both residual branches; random ops are
layout-independent, so sharded and unsharded runs draw the same mask under one
seed.

Invariants:
- Weights are stored (in, out): ``linear(x, w) = x @ w``. No biases.
- `init` returns plain float32 tensors whose values depend only on the config
  and the seed (a local ``torch.Generator``; the global RNG is untouched).
- Keys and logical dims (`DIMS`): ``"wte": ("vocab", "embed")``; per layer i,
  ``f"layers.{i}.attn_norm": ("embed",)``, ``.wq: ("embed", "heads")``,
  ``.wk``/``.wv: ("embed", "kv_heads")``, ``.wo: ("heads", "embed")``,
  ``.mlp_norm: ("embed",)``, ``.w_up: ("embed", "mlp")``,
  ``.w_down: ("mlp", "embed")``; ``"norm": ("embed",)``;
  ``"head": ("embed", "vocab")``. In a weight "heads"/"kv_heads" name the
  flattened heads*head_dim dim.
- Rotary positions come from ``batch["positions"]`` when present (a scheme
  that reorders tokens, e.g. a zigzag ring, passes the global positions), else
  ``arange(seq)``; the same positions go to `snn.attention`, whose causal mask
  is ``position(key) <= position(query)``.
- Constraint points (what a scheme pins): the residual stream after the
  embedding and after each block ``("batch", "seq", "embed")``; q/k/v in SDPA
  layout ``("batch", "heads" | "kv_heads", "seq", "head_dim")``; the logits
  ``("batch", "seq", "vocab")``; every linear names its ``out_dims``.

Legend for shape suffixes: b batch, s sequence, e embed, h heads, k kv_heads,
d head_dim, f mlp, v vocab.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._errors import LayoutError, ShardlibError
from ..ops._gufunc import gufunc
from ..ops._tensor import ShardedTensor
from . import _use as snn

__all__ = ["Config", "init", "DIMS", "logits", "loss"]

ROPE_BASE = 10000.0
NORM_EPS = 1e-5

ACT = ("batch", "seq", "embed")  # the residual stream
Q = ("batch", "heads", "seq", "head_dim")
KV = ("batch", "kv_heads", "seq", "head_dim")
LOGITS = ("batch", "seq", "vocab")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class Config:
    """Sizes of the reference GPT.

    Args:
        vocab: vocabulary size V.
        dim: model width (embed) H; ``dim % heads == 0``.
        heads: attention (query) heads; head_dim = dim // heads, even (rotary).
        layers: decoder blocks.
        seq: the longest sequence the model is run on.
        kv_heads: key/value heads for grouped-query attention
            (``heads % kv_heads == 0``); None means ``heads`` (multi-head).
        mlp: MLP width; None means ``4 * dim``.
        dropout: dropout probability on both residual branches, in [0, 1).

    Examples:
        >>> from shardlib.nn import gpt
        >>> c = gpt.Config(vocab=11, dim=8, heads=4, layers=1, seq=6, kv_heads=2)
        >>> (c.head_dim, c.kv_heads, c.mlp)
        (2, 2, 32)
    """

    vocab: int
    dim: int
    heads: int
    layers: int
    seq: int
    kv_heads: int | None = None
    mlp: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.mlp is None:
            object.__setattr__(self, "mlp", 4 * self.dim)
        bad = [
            f"{name}={getattr(self, name)!r}"
            for name in ("vocab", "dim", "heads", "layers", "seq", "kv_heads", "mlp")
            if not isinstance(getattr(self, name), int)
            or isinstance(getattr(self, name), bool)
            or getattr(self, name) < 1
        ]
        if bad:
            raise LayoutError(
                f"gpt.Config: {', '.join(bad)}: every size must be a positive int; "
                f"pass e.g. gpt.Config(vocab=11, dim=8, heads=2, layers=1, seq=6)"
            )
        problems = []
        if self.dim % self.heads:
            problems.append(
                f"dim={self.dim} is not divisible by heads={self.heads} (head_dim = dim // heads); "
                f"pick heads from {_divisors(self.dim)} or a dim that is a multiple of {self.heads}"
            )
        elif (self.dim // self.heads) % 2:
            problems.append(
                f"head_dim = dim // heads = {self.dim // self.heads} is odd, and rotary positions "
                f"rotate pairs of features; pick an even head_dim, e.g. dim={2 * self.dim}"
            )
        if self.heads % self.kv_heads:
            problems.append(
                f"heads={self.heads} is not divisible by kv_heads={self.kv_heads} (each kv head "
                f"serves heads // kv_heads query heads); pick kv_heads from {_divisors(self.heads)}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout!r} must be a probability in [0, 1)")
        if problems:
            raise LayoutError("gpt.Config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        """Features per head, ``dim // heads``."""
        return self.dim // self.heads


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------- dims

_TOP = {"wte": ("vocab", "embed"), "norm": ("embed",), "head": ("embed", "vocab")}
_LAYER = {
    "attn_norm": ("embed",),
    "wq": ("embed", "heads"),
    "wk": ("embed", "kv_heads"),
    "wv": ("embed", "kv_heads"),
    "wo": ("heads", "embed"),
    "mlp_norm": ("embed",),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
}
_LAYER_KEY = re.compile(r"layers\.(0|[1-9][0-9]*)\.([a-z_]+)")


class _Dims(Mapping):
    """Logical dims of every GPT parameter, for any number of layers.

    ``DIMS[key]`` resolves ``"wte"``, ``"norm"``, ``"head"`` and
    ``f"layers.{i}.{name}"`` for every layer index i. A concrete config's keys
    in order: ``DIMS(config)`` (a dict). Iterating `DIMS` itself lists the keys
    of a one-layer model; use ``DIMS(config)`` for more layers.

    Examples:
        >>> from shardlib.nn import gpt
        >>> gpt.DIMS["layers.3.wk"]
        ('embed', 'kv_heads')
        >>> list(gpt.DIMS(gpt.Config(vocab=11, dim=8, heads=2, layers=2, seq=6)))[:3]
        ['wte', 'layers.0.attn_norm', 'layers.0.wq']
    """

    def __getitem__(self, key: str) -> tuple[str, ...]:
        if key in _TOP:
            return _TOP[key]
        m = _LAYER_KEY.fullmatch(key) if isinstance(key, str) else None
        if m and m.group(2) in _LAYER:
            return _LAYER[m.group(2)]
        raise KeyError(
            f"gpt.DIMS[{key!r}]: not a GPT parameter; keys are {sorted(_TOP)} and "
            f"'layers.<i>.<name>' with name in {list(_LAYER)}"
        )

    def __iter__(self) -> Iterator[str]:
        return iter(_keys(1))

    def __len__(self) -> int:
        return len(_keys(1))

    def __call__(self, config: Config) -> dict[str, tuple[str, ...]]:
        """The logical dims of ``init(config)``'s params, in the same key order."""
        return {k: self[k] for k in _keys(config.layers)}

    def __repr__(self) -> str:
        return "gpt.DIMS"


def _keys(layers: int) -> list[str]:
    keys = ["wte"]
    for i in range(layers):
        keys += [f"layers.{i}.{name}" for name in _LAYER]
    return keys + ["norm", "head"]


DIMS = _Dims()


# ----------------------------------------------------------------------------- init


def init(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plain float32 parameters of the model (keys and dims as `DIMS`).

    Embedding N(0, 1); every linear N(0, 1/fan_in), the residual-branch outputs
    (wo, w_down) further scaled by 1/sqrt(2 * layers); norms ones. The values
    depend only on ``config`` and ``seed`` (a local generator, drawn in key
    order), never on a scheme or the global RNG.

    Examples:
        >>> from shardlib.nn import gpt
        >>> c = gpt.Config(vocab=11, dim=8, heads=2, layers=1, seq=6, kv_heads=1)
        >>> p = gpt.init(c)
        >>> p["wte"].shape, p["layers.0.wk"].shape, p["head"].dtype
        (torch.Size([11, 8]), torch.Size([8, 4]), torch.float32)
    """
    g = torch.Generator().manual_seed(seed)
    c = config
    kv = c.kv_heads * c.head_dim
    shapes = {
        "wte": (c.vocab, c.dim),
        "attn_norm": (c.dim,),
        "wq": (c.dim, c.dim),
        "wk": (c.dim, kv),
        "wv": (c.dim, kv),
        "wo": (c.dim, c.dim),
        "mlp_norm": (c.dim,),
        "w_up": (c.dim, c.mlp),
        "w_down": (c.mlp, c.dim),
        "norm": (c.dim,),
        "head": (c.dim, c.vocab),
    }
    out = {}
    for key in _keys(c.layers):
        name = key.rsplit(".", 1)[-1]
        shape = shapes[name]
        if name.endswith("norm"):
            out[key] = torch.ones(shape, dtype=torch.float32)
            continue
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if name != "wte":
            t = t / math.sqrt(shape[0])
        if name in ("wo", "w_down"):
            t = t / math.sqrt(2 * c.layers)
        out[key] = t
    return out


# ----------------------------------------------------------------------------- model


# Both are gufuncs: where the layouts line up (the normalized / rotated dim unsplit) each
# device runs them on its blocks as one op forward and one backward, instead of one
# subclass dispatch per aten op (~17 for RMSNorm); values and communication are the same.
@gufunc(signature="(e),(e)->(e)")
def _rms_norm(x_bse: torch.Tensor, w_e: torch.Tensor) -> torch.Tensor:
    return x_bse * torch.rsqrt((x_bse * x_bse).mean(-1, keepdim=True) + NORM_EPS) * w_e


def _rotary(positions: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """cos and sin of ``positions * inv_freq``, shaped to broadcast over (b, s, heads, d/2)."""
    half = head_dim // 2
    inv_freq = ROPE_BASE ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(dtype)[..., None] * inv_freq.to(dtype)  # (b, s, d/2) or (s, d/2)
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


@gufunc(signature="(d),(c),(c)->(d)")
def _rotate(x_bshd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x_bshd.shape[-1] // 2
    x1, x2 = x_bshd[..., :half], x_bshd[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training=True) if training and p > 0 else x


def _check_batch(params: Mapping, batch: Mapping, config: Config, call: str) -> None:
    missing = [k for k in ("tokens", "targets") if k not in batch]
    if call == "gpt.logits":
        missing = [k for k in missing if k == "tokens"]
    if missing:
        raise ShardlibError(
            f"{call}: batch lacks {missing} (has {sorted(batch)}); pass a dict with (batch, seq) "
            f"int64 'tokens' and 'targets' (and optional 'positions')"
        )
    tokens = batch["tokens"]
    if tokens.dim() != 2 or tokens.shape[1] > config.seq:
        raise LayoutError(
            f"{call}: batch['tokens'] has shape {tuple(tokens.shape)}; the model takes "
            f"(batch, seq) with seq <= config.seq = {config.seq}; pass shorter sequences or "
            f"a Config with a larger seq"
        )
    absent = [k for k in _keys(config.layers) if k not in params]
    if absent:
        raise ShardlibError(
            f"{call}: params lack {absent[:4]}{' ...' if len(absent) > 4 else ''} for "
            f"{config}; build them with gpt.init(config)"
        )


def logits(
    params: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    config: Config,
    *,
    training: bool = True,
) -> torch.Tensor:
    """Next-token logits (batch, seq, vocab) of the model.

    Args:
        params: `init`'s keys, plain tensors or sharded by ``snn.shard_params``.
        batch: ``"tokens"`` (batch, seq) int64, optional ``"positions"``
            (batch, seq) int64 global positions (default ``arange(seq)``).
        config: the sizes.
        training: apply dropout (when ``config.dropout > 0``).

    Examples:
        >>> import torch
        >>> from shardlib.nn import gpt
        >>> c = gpt.Config(vocab=11, dim=8, heads=2, layers=1, seq=6)
        >>> tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
        >>> gpt.logits(gpt.init(c), {"tokens": tokens}, c).shape
        torch.Size([2, 6, 11])
    """
    _check_batch(params, batch, config, "gpt.logits")
    c = config
    tokens_bs = batch["tokens"]
    positions = batch.get("positions")
    dtype = params["wte"].dtype
    seq = tokens_bs.shape[1]
    pos = positions if positions is not None else torch.arange(seq)
    cos, sin = _rotary(pos, c.head_dim, dtype)

    def linear(x: torch.Tensor, key: str, out_dims: tuple[str, ...]) -> torch.Tensor:
        # the weight's dims from DIMS, not from a record on the tensor: a functional update
        # (sl.optim.apply_updates, z.place, a checkpoint load) makes new tensors
        return snn.linear(x, params[key], out_dims=out_dims, w_dims=DIMS[key])

    # each weight is read from `params` where it is used, not all at a layer's start: a lazy
    # `params` (ZeRO-3's `z.compute`) then gathers one weight at a time
    x_bse = snn.constrain(F.embedding(tokens_bs, params["wte"]), ACT)
    for i in range(c.layers):
        p = f"layers.{i}."
        h_bse = _rms_norm(x_bse, params[p + "attn_norm"])
        q_bshd = linear(h_bse, p + "wq", ("batch", "seq", "heads"))
        k_bskd = linear(h_bse, p + "wk", ("batch", "seq", "kv_heads"))
        v_bskd = linear(h_bse, p + "wv", ("batch", "seq", "kv_heads"))
        # .view, not .unflatten: the same view without torch's Python wrapper (per step)
        q_bshd = _rotate(q_bshd.view(*q_bshd.shape[:-1], c.heads, c.head_dim), cos, sin)
        k_bskd = _rotate(k_bskd.view(*k_bskd.shape[:-1], c.kv_heads, c.head_dim), cos, sin)
        v_bskd = v_bskd.view(*v_bskd.shape[:-1], c.kv_heads, c.head_dim)
        q_bhsd = snn.constrain(q_bshd.transpose(1, 2), Q)
        k_bksd = snn.constrain(k_bskd.transpose(1, 2), KV)
        v_bksd = snn.constrain(v_bskd.transpose(1, 2), KV)
        a_bhsd = snn.attention(q_bhsd, k_bksd, v_bksd, causal=True, positions=positions)
        a_bse = a_bhsd.transpose(1, 2).flatten(-2)
        o_bse = linear(a_bse, p + "wo", ACT)
        x_bse = x_bse + _dropout(o_bse, c.dropout, training)
        h_bse = _rms_norm(x_bse, params[p + "mlp_norm"])
        u_bsf = linear(h_bse, p + "w_up", ("batch", "seq", "mlp"))
        m_bse = linear(F.gelu(u_bsf), p + "w_down", ACT)
        x_bse = snn.constrain(x_bse + _dropout(m_bse, c.dropout, training), ACT)
    x_bse = _rms_norm(x_bse, params["norm"])
    return snn.constrain(linear(x_bse, "head", LOGITS), LOGITS)


def loss(
    params: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    config: Config,
    *,
    reduction: str = "mean",
    training: bool = True,
) -> torch.Tensor:
    """Next-token cross-entropy of the model: ``batch["targets"]`` against `logits`.

    Args:
        params: `init`'s keys (plain or sharded).
        batch: ``"tokens"`` and ``"targets"`` (batch, seq) int64, optional
            ``"positions"`` (batch, seq) int64.
        config: the sizes.
        reduction: ``"mean"`` (a scalar, the default), ``"sum"`` or ``"none"``
            (per-token losses, shaped (batch, seq)).
        training: apply dropout (when ``config.dropout > 0``).

    Examples:
        >>> import torch
        >>> from shardlib.nn import gpt
        >>> c = gpt.Config(vocab=11, dim=8, heads=2, layers=1, seq=6)
        >>> g = torch.Generator().manual_seed(0)
        >>> batch = {k: torch.randint(0, 11, (2, 6), generator=g) for k in ("tokens", "targets")}
        >>> value = gpt.loss(gpt.init(c), batch, c)
        >>> value.shape, bool(value > 0)
        (torch.Size([]), True)
    """
    _check_batch(params, batch, config, "gpt.loss")
    if reduction not in ("mean", "sum", "none"):
        raise ShardlibError(f"gpt.loss: reduction={reduction!r}; use 'mean', 'sum' or 'none'")
    logits_bsv = logits(params, batch, config, training=training)
    targets_bs = batch["targets"]
    if _rows_merge_locally(logits_bsv) and _rows_merge_locally(targets_bs):
        # (tokens, classes): every block stays vocab-last
        b, s, v = logits_bsv.shape
        rows_nv, targets_n = logits_bsv.reshape(b * s, v), targets_bs.reshape(b * s)
        per = F.cross_entropy(rows_nv, targets_n, reduction=reduction)
        return per.reshape(b, s) if reduction == "none" else per
    # classes on dim 1 (merging a split seq dim into the batch would gather)
    return F.cross_entropy(logits_bsv.transpose(1, 2), targets_bs, reduction=reduction)


def _rows_merge_locally(x_bs: torch.Tensor) -> bool:
    """Whether merging (batch, seq) of `x_bs` is a view of every device's own block: the seq
    dim whole and the batch split evenly (or a plain tensor).

    The loss then runs on (tokens, vocab) rows, vocab-last as the head made them. With the
    classes moved to dim 1 instead, torch's cross-entropy makes its input contiguous (a copy
    of the logits), its gradient comes back token-major and the head's backward copies it
    again (about a third of a small model's loss time; the token order is the same)."""
    if torch.compiler.is_compiling():  # traced, the backend owns the copies (and dynamo's
        return False  # read of the layout here trips torch's non-leaf .grad warning)
    if not isinstance(x_bs, ShardedTensor):
        return True
    batch_axes, seq_axes = x_bs.spec.dims[0], x_bs.spec.dims[1]
    ways = math.prod(x_bs.mesh.abstract.axis_size(a) for a in batch_axes)
    return not seq_axes and x_bs.shape[0] % ways == 0
