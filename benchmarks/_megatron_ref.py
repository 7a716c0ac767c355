"""References for benchmarks/schemes.py: a torch nn.Module GPT for DTensor, and hand-written Megatron.

Owns three things, all the same model as ``shardlib.nn.gpt`` (pre-norm
decoder: token embedding, per layer RMSNorm -> causal grouped-query attention
with rotary positions -> residual, RMSNorm -> GELU MLP -> residual; final
RMSNorm, untied head, mean next-token cross-entropy; weights stored (in, out)
in ``gpt.init``'s dict, no biases, no dropout):

- `TorchGPT`: a plain ``torch.nn.Module`` (``nn.Linear`` stores (out, in), so
  `TorchGPT.load` transposes ``gpt.init``'s weights), plus `dtensor_plan`, the
  ``parallelize_module`` plan of torch's own tensor-parallel tutorial:
  ColwiseParallel q/k/v/up/head, RowwiseParallel o/down and the vocab-split
  embedding, and with ``sequence=True`` SequenceParallel norms with
  PrepareModuleInput gathering the attention/MLP inputs (Megatron-SP).
- `MegatronGPT`: hand-written Megatron on plain per-rank tensors holding the
  tp shards (column-split q/k/v/up/head, row-split o/down, vocab-split
  embedding) with explicit ``torch.distributed`` collectives as autograd
  Functions: f (identity forward, all-reduce backward) and g (all-reduce
  forward, identity backward), and for ``sequence=True`` the SP pair
  (all-gather on seq forward / reduce-scatter backward, and the reverse), the
  vocab-parallel cross-entropy (max, sum-exp and target-logit all-reduces),
  and SP's all-reduce of the norm weights' gradients in one flat buffer
  (`MegatronGPT.finish_grads`).
  Every collective adds its bytes (ring model, the busiest device's sent
  bytes, as shardlib's ledger counts) to `MegatronGPT.sent`.
- `CommBytes`: a ``TorchDispatchMode`` that adds up the ring-model bytes of
  the ``_c10d_functional`` collectives DTensor issues, the same measure.

Invariants: the process group is the default one (every rank is in the tp
group); sizes the tp degree does not divide (heads, kv_heads, mlp, vocab, and
seq under SP) raise `ValueError` naming the size; the values depend only on
the ``gpt.init`` dict passed in, so every reference's loss equals
``gpt.loss`` on the same params up to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CommBytes",
    "MegatronGPT",
    "TorchGPT",
    "dtensor_model",
    "dtensor_plan",
    "dtensor_step",
    "param_bytes",
    "sanity_loss",
]

ROPE_BASE = 10000.0
NORM_EPS = 1e-5


# == shared math =================================================================
def rotary(seq: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of ``arange(seq) * inv_freq``, shaped (seq, 1, head_dim/2) (gpt.py's rotary)."""
    half = head_dim // 2
    inv_freq = ROPE_BASE ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(seq).to(dtype)[:, None] * inv_freq.to(dtype)
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def rotate(x_bshd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x_bshd.shape[-1] // 2
    x1, x2 = x_bshd[..., :half], x_bshd[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + NORM_EPS) * w


def attend(q_bshd, k_bskd, v_bskd, cos, sin) -> torch.Tensor:
    """Rotary on q, k, causal SDPA (grouped-query when fewer kv heads); (b, s, h*d) out."""
    q = rotate(q_bshd, cos, sin).transpose(1, 2)
    k = rotate(k_bskd, cos, sin).transpose(1, 2)
    v = v_bskd.transpose(1, 2)
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    return out.transpose(1, 2).flatten(-2)


def _check_divisible(config, tp: int, sequence: bool, seq: int, where: str) -> None:
    sizes = {
        "heads": config.heads,
        "kv_heads": config.kv_heads,
        "mlp": config.mlp,
        "vocab": config.vocab,
    }
    if sequence:
        sizes["seq"] = seq
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        raise ValueError(
            f"{where}: {bad} not divisible by the tensor-parallel degree {tp}; this reference "
            f"splits them evenly (pick sizes that are multiples of {tp})"
        )


# == (a) torch nn.Module GPT for DTensor ===========================================
class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.head_dim = c.head_dim
        self.wq = nn.Linear(c.dim, c.dim, bias=False)
        self.wk = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)

    def forward(self, x, cos, sin):
        # -1 heads: after ColwiseParallel the local q/k/v hold this rank's heads
        q = self.wq(x).unflatten(-1, (-1, self.head_dim))
        k = self.wk(x).unflatten(-1, (-1, self.head_dim))
        v = self.wv(x).unflatten(-1, (-1, self.head_dim))
        return self.wo(attend(q, k, v, cos, sin))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w_up = nn.Linear(config.dim, config.mlp, bias=False)
        self.w_down = nn.Linear(config.mlp, config.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.gelu(self.w_up(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TorchGPT(nn.Module):
    """``shardlib.nn.gpt`` as a torch ``nn.Module`` (for ``parallelize_module``).

    Examples:
        >>> import torch
        >>> from shardlib.nn import gpt
        >>> c = gpt.Config(vocab=11, dim=8, heads=2, layers=1, seq=6)
        >>> params = gpt.init(c)
        >>> g = torch.Generator().manual_seed(0)
        >>> batch = {k: torch.randint(0, 11, (2, 6), generator=g) for k in ("tokens", "targets")}
        >>> m = TorchGPT(c).load(params)
        >>> ref = gpt.loss(params, batch, c)
        >>> bool(torch.allclose(m.loss(batch["tokens"], batch["targets"]), ref, atol=1e-5))
        True
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)

    @torch.no_grad()
    def load(self, params: Mapping[str, torch.Tensor]) -> TorchGPT:
        """Copy ``gpt.init``'s (in, out) weights in (nn.Linear stores (out, in))."""
        self.wte.weight.copy_(params["wte"])
        self.norm.weight.copy_(params["norm"])
        self.head.weight.copy_(params["head"].t())
        for i, blk in enumerate(self.layers):
            p = {n: params[f"layers.{i}.{n}"] for n in ("attn_norm", "mlp_norm")}
            blk.attn_norm.weight.copy_(p["attn_norm"])
            blk.mlp_norm.weight.copy_(p["mlp_norm"])
            for n in ("wq", "wk", "wv", "wo"):
                getattr(blk.attn, n).weight.copy_(params[f"layers.{i}.{n}"].t())
            for n in ("w_up", "w_down"):
                getattr(blk.mlp, n).weight.copy_(params[f"layers.{i}.{n}"].t())
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(tokens.shape[1], self.config.head_dim, self.wte.weight.dtype)
        x = self.wte(tokens)
        for blk in self.layers:
            x = blk(x, cos, sin)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def dtensor_plan(config, sequence: bool = False) -> dict:
    """The ``parallelize_module`` plan for `TorchGPT` (torch's TP tutorial; SP with `sequence`)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan: dict = {}
    if sequence:
        plan["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        plan["norm"] = SequenceParallel()
        plan["head"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
        )
    else:
        plan["wte"] = RowwiseParallel(input_layouts=Replicate())
        plan["head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    for i in range(config.layers):
        pre = f"layers.{i}."
        for n in ("attn.wq", "attn.wk", "attn.wv", "mlp.w_up"):
            plan[pre + n] = ColwiseParallel()
        out = Shard(1) if sequence else Replicate()
        plan[pre + "attn.wo"] = RowwiseParallel(output_layouts=out)
        plan[pre + "mlp.w_down"] = RowwiseParallel(output_layouts=out)
        if sequence:
            plan[pre + "attn_norm"] = SequenceParallel()
            plan[pre + "mlp_norm"] = SequenceParallel()
            plan[pre + "attn"] = PrepareModuleInput(
                input_layouts=(Shard(1), None, None),
                desired_input_layouts=(Replicate(), None, None),
            )
            plan[pre + "mlp"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
    return plan


def dtensor_model(config, params, sequence: bool = False):
    """`TorchGPT` loaded with `params`, parallelized over the default group (1D device mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    tp = dist.get_world_size()
    _check_divisible(config, tp, sequence, config.seq, "dtensor_model")
    mesh = init_device_mesh("cpu", (tp,))
    model = TorchGPT(config).load(params)
    return parallelize_module(model, mesh, dtensor_plan(config, sequence))


def dtensor_step(model, tokens, targets, counter: CommBytes | None = None) -> torch.Tensor:
    """One forward+backward under ``loss_parallel`` (vocab-split cross-entropy); grads finished.

    With `counter` (a `CommBytes` entered around the call), its ``forward``
    is set to the bytes sent up to the end of the forward.

    A gradient whose placements differ from its parameter's (a replicated
    norm weight used on seq-split activations is Partial under SP) is
    redistributed to the parameter's placements, as an optimizer would need.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    for p in model.parameters():
        p.grad = None
    with loss_parallel():
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if counter is not None:
            counter.forward = counter.sent
        loss.backward()
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(placements=p.placements)
    return loss.detach()


_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


class CommBytes(TorchDispatchMode):
    """Ring-model bytes sent per device by the ``_c10d_functional`` collectives run inside.

    all_reduce 2(P-1)/P·n, all_gather (P-1)·n_in, reduce_scatter (P-1)/P·n_in,
    all_to_all (P-1)/P·n (n in bytes), as shardlib's ledger counts them.
    """

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = group_size
        self.sent = 0.0
        self.forward = 0.0
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor for t in types):
            return (
                NotImplemented  # a DTensor op: let DTensor run it; its collectives come back here
            )
        name = str(func)
        kind = func.overloadpacket.__name__
        if "c10d_functional" in name and kind not in _NOT_COLLECTIVES:
            t = args[0]
            if isinstance(t, (list, tuple)):
                n = sum(x.numel() * x.element_size() for x in t)
            else:
                n = t.numel() * t.element_size()
            p = self.group_size
            if kind.startswith("all_reduce"):
                self.sent += 2 * (p - 1) / p * n
            elif kind.startswith("all_gather"):
                self.sent += (p - 1) * n
            elif kind.startswith(("reduce_scatter", "all_to_all")):
                self.sent += (p - 1) / p * n
            else:
                raise NotImplementedError(
                    f"CommBytes: no byte formula for {name}; add one beside all_reduce's"
                )
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))


# == (b) hand-written Megatron =======================================================
class _Sent:
    """A per-model byte counter the autograd Functions below add to."""

    def __init__(self, p: int):
        self.p = p
        self.bytes = 0.0
        self.count = 0

    def all_reduce(self, t: torch.Tensor) -> None:
        self.count += 1
        self.bytes += 2 * (self.p - 1) / self.p * t.numel() * t.element_size()

    def gather(self, t_local: torch.Tensor) -> None:
        self.count += 1
        self.bytes += (self.p - 1) * t_local.numel() * t_local.element_size()

    def scatter(self, t_full: torch.Tensor) -> None:
        self.count += 1
        self.bytes += (self.p - 1) / self.p * t_full.numel() * t_full.element_size()


def _all_reduce(x: torch.Tensor, sent: _Sent, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous().clone()
    sent.all_reduce(x)
    dist.all_reduce(x, op=op)
    return x


def _all_gather_seq(x_bsh: torch.Tensor, sent: _Sent) -> torch.Tensor:
    x = x_bsh.transpose(0, 1).contiguous()  # seq first: gather along dim 0
    out = x.new_empty((x.shape[0] * sent.p, *x.shape[1:]))
    sent.gather(x)
    dist.all_gather_into_tensor(out, x)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x_bsh: torch.Tensor, sent: _Sent) -> torch.Tensor:
    x = x_bsh.transpose(0, 1).contiguous()
    out = x.new_empty((x.shape[0] // sent.p, *x.shape[1:]))
    sent.scatter(x)
    dist.reduce_scatter_tensor(out, x)
    return out.transpose(0, 1)


class Copy(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, sent):
        ctx.sent = sent
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.sent), None


class Reduce(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, sent):
        return _all_reduce(x, sent)

    @staticmethod
    def backward(ctx, g):
        return g, None


class GatherSeq(torch.autograd.Function):
    """Megatron-SP's g: all-gather on seq forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, sent):
        ctx.sent = sent
        return _all_gather_seq(x, sent)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_seq(g, ctx.sent), None


class ScatterSeq(torch.autograd.Function):
    """Megatron-SP's g-bar: reduce-scatter on seq forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, sent):
        ctx.sent = sent
        return _reduce_scatter_seq(x, sent)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_seq(g, ctx.sent), None


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from vocab-split logits (Megatron's vocab_parallel_cross_entropy)."""

    @staticmethod
    def forward(ctx, logits_nv, targets_n, v0, sent):
        m = _all_reduce(logits_nv.max(-1).values, sent, dist.ReduceOp.MAX)
        shifted = logits_nv - m[:, None]
        exp = shifted.exp()
        total = _all_reduce(exp.sum(-1), sent)
        local = targets_n - v0
        inside = (local >= 0) & (local < logits_nv.shape[-1])
        idx = local.clamp(0, logits_nv.shape[-1] - 1)
        picked = shifted.gather(-1, idx[:, None])[:, 0] * inside
        picked = _all_reduce(picked, sent)
        ctx.save_for_backward(exp, total, idx, inside)
        return total.log() - picked

    @staticmethod
    def backward(ctx, g_n):
        exp, total, idx, inside = ctx.saved_tensors
        grad = exp / total[:, None]
        grad.scatter_add_(-1, idx[:, None], -inside.to(grad.dtype)[:, None])
        return grad * g_n[:, None], None, None, None


class MegatronGPT:
    """Hand-written Megatron(-SP) GPT on this rank's tp shards of ``gpt.init`` params.

    ``loss(tokens, targets)`` is the mean next-token cross-entropy; call
    ``backward()`` on it, then `finish_grads` (SP's norm-gradient
    all-reduce). `params` holds the local shards (leaves, requires_grad).
    """

    def __init__(self, config, params: Mapping[str, torch.Tensor], sequence: bool = False):
        self.config = c = config
        self.p = dist.get_world_size()
        self.rank = dist.get_rank()
        self.sequence = sequence
        self.sent = _Sent(self.p)
        _check_divisible(c, self.p, sequence, c.seq, "MegatronGPT")
        r, p = self.rank, self.p

        def cols(w):  # column-parallel: split the out dim
            n = w.shape[1] // p
            return w[:, r * n : (r + 1) * n]

        def rows(w):  # row-parallel: split the in dim
            n = w.shape[0] // p
            return w[r * n : (r + 1) * n]

        local = {}
        for key, w in params.items():
            name = key.rsplit(".", 1)[-1]
            if name in ("wq", "wk", "wv", "w_up", "head"):
                w = cols(w)
            elif name in ("wo", "w_down", "wte"):
                w = rows(w)
            local[key] = w.detach().clone().contiguous().requires_grad_()
        self.params = local
        self.v0 = r * (c.vocab // p)

    def _embed(self, tokens_bs):
        w = self.params["wte"]
        local = tokens_bs - self.v0
        inside = (local >= 0) & (local < w.shape[0])
        x = F.embedding(local.clamp(0, w.shape[0] - 1), w) * inside[..., None].to(w.dtype)
        if self.sequence:
            return ScatterSeq.apply(x, self.sent)
        return Reduce.apply(x, self.sent)

    def _enter(self, h):  # the input of a column-parallel linear
        return GatherSeq.apply(h, self.sent) if self.sequence else Copy.apply(h, self.sent)

    def _leave(self, y):  # the output of a row-parallel linear
        return ScatterSeq.apply(y, self.sent) if self.sequence else Reduce.apply(y, self.sent)

    def loss(self, tokens_bs: torch.Tensor, targets_bs: torch.Tensor) -> torch.Tensor:
        c, prm = self.config, self.params
        cos, sin = rotary(tokens_bs.shape[1], c.head_dim, prm["wte"].dtype)
        x = self._embed(tokens_bs)
        for i in range(c.layers):
            w = {n: prm[f"layers.{i}.{n}"] for n in _LAYER}
            h = self._enter(rms_norm(x, w["attn_norm"]))
            q = (h @ w["wq"]).unflatten(-1, (-1, c.head_dim))
            k = (h @ w["wk"]).unflatten(-1, (-1, c.head_dim))
            v = (h @ w["wv"]).unflatten(-1, (-1, c.head_dim))
            x = x + self._leave(attend(q, k, v, cos, sin) @ w["wo"])
            h = self._enter(rms_norm(x, w["mlp_norm"]))
            x = x + self._leave(F.gelu(h @ w["w_up"]) @ w["w_down"])
        h = self._enter(rms_norm(x, prm["norm"]))
        logits = h @ prm["head"]  # (b, s, V/P)
        per_token = VocabParallelCrossEntropy.apply(
            logits.flatten(0, 1), targets_bs.flatten(), self.v0, self.sent
        )
        return per_token.mean()

    def zero_grads(self) -> None:
        for t in self.params.values():
            t.grad = None

    def finish_grads(self) -> None:
        """SP: the norm weights saw only this rank's tokens; all-reduce their gradients, all in
        one flat buffer (Megatron's ``_allreduce_layernorm_grads``)."""
        if not self.sequence:
            return
        norms = [t for key, t in self.params.items() if key.endswith("norm") and t.grad is not None]
        if not norms:
            return
        flat = _all_reduce(torch.cat([t.grad.flatten() for t in norms]), self.sent)
        for t, g in zip(norms, flat.split([t.numel() for t in norms])):
            t.grad = g.view_as(t)


_LAYER = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_up", "w_down")


def param_bytes(tensors) -> int:
    """Local bytes of plain tensors, DTensors (their local shard) or shardlib tensors (this rank)."""
    total = 0
    for t in tensors:
        local = getattr(t, "_local_tensor", None)
        if local is None and hasattr(t, "local_shards"):
            shards = t.local_shards()
            local = shards[0] if len(shards) == 1 else None
            if local is None:  # a simulated mesh: per device
                total += sum(s.numel() * s.element_size() for s in shards) // len(shards)
                continue
        if local is None:
            local = t
        total += local.numel() * local.element_size()
    return total


def sanity_loss(config, params, batch) -> float:
    """The unsharded reference loss (``shardlib.nn.gpt.loss`` on plain tensors)."""
    from shardlib.nn import gpt

    return float(gpt.loss(params, batch, config))
