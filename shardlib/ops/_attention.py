"""Rules for attention: `F.scaled_dot_product_attention` as the CPU kernel reaches it.

Split out of `_nn.py` (which keeps embedding, losses, dropout and random ops);
see `sdpa_rule` for the strategies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from .._errors import NoRuleError
from ..layouts._layout import Layout
from ..layouts._shard import local_bounds
from ._nn import Dims, _axes, _bind, _in_order, _kept_partial, _unique
from ._rules import ArgSpec, RuleInput, Strategy, register_rule

aten = torch.ops.aten

# == attention =================================================================
_SDPA = aten._scaled_dot_product_flash_attention_for_cpu.default
_SDPA_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _mask_layout(mask: ArgSpec, bhl: Dims, full: tuple[int, ...]) -> Layout:
    """An attention mask broadcast to (B, H, L, S): cut like the query's B, H, L splits."""
    off = 4 - mask.ndim
    dims = []
    for d, n in enumerate(mask.shape):
        j = d + off
        dims.append(bhl[j] if j < 3 and n == full[j] and n != 1 else ())
    return Layout(tuple(dims))


def _sdpa_choices(q: ArgSpec, k: ArgSpec) -> list[Dims]:
    """Candidate (B, H, L) splits: the query's, the keys', none."""
    same_b, same_h = q.shape[0] == k.shape[0], q.shape[1] == k.shape[1]
    found = []
    for src in (q.layout.dims, k.layout.dims[:2] + ((),)):
        b = src[0] if same_b else ()
        h = src[1] if same_h else ()
        found.append((b, h, src[2]))
    return _unique([*found, ((), (), ())])


def _query_chunk(func: Any, shape: tuple[int, ...], s_len: int, layout: Layout, mesh: Any):
    """`func` on a query chunk: a causal mask is rebuilt from the chunk's global rows
    (top-left aligned, as torch's `is_causal`), and an empty chunk skips the kernel
    (the CPU kernel dies of SIGFPE on zero query rows or heads)."""
    names = [a.name for a in func._schema.arguments if not a.kwarg_only]

    def local(device: int, *args: Any, **kwargs: Any):
        b = _bind(func, args, kwargs)
        q = b["query"]
        if q.numel() == 0:
            if func is _SDPA_BACKWARD:  # no query: no gradient anywhere
                return tuple(torch.zeros_like(b[n]) for n in ("query", "key", "value"))
            metas = {n: b[n].to("meta") for n in ("query", "key", "value")}
            outs = func(metas["query"], metas["key"], metas["value"], scale=b["scale"])
            return tuple(torch.empty(o.shape, dtype=o.dtype, device=q.device) for o in outs)
        if b["is_causal"]:
            lo, hi = local_bounds(shape, layout, mesh, device)[2]
            rows = torch.arange(lo, hi, device=q.device).unsqueeze(1)
            allowed = torch.arange(s_len, device=q.device).unsqueeze(0) <= rows
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            b["is_causal"], b["attn_mask"] = False, mask.masked_fill_(~allowed, -math.inf)
        return func(*(b[n] for n in names), attn_mask=b["attn_mask"], scale=b["scale"])

    return local


@register_rule(_SDPA, _SDPA_BACKWARD)
def sdpa_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Batch/head splits local; query sequence split against replicated K/V; head dim unsplit."""
    backward = ri.op is _SDPA_BACKWARD
    b = _bind(ri.op, ri.args, ri.kwargs)
    q, k = b["query"], b["key"]
    if b["dropout_p"]:
        raise NoRuleError(
            f"{ri.op}: dropout inside the fused attention kernel cannot draw layout-independent "
            "random numbers. Call F.scaled_dot_product_attention with dropout_p=0 and apply "
            "F.dropout to the attention weights yourself (the math path), or use sl.shard_map."
        )
    mask = b["attn_mask"]
    if q.ndim != 4 or k.ndim != 4:  # (B, H, L, E) is what the CPU kernel takes; else replicate
        yield Strategy(
            tuple(Layout(((),) * s.ndim) for s in ri.tensors),
            tuple(Layout(((),) * o.ndim) for o in ri.outputs),
        )
        return
    for bhl in _sdpa_choices(q, k):
        seq = bhl[2]
        q_layout = Layout((*bhl, ()))
        kv_layout = Layout((*bhl[:2], (), ()))
        want = {"query": q_layout, "key": kv_layout, "value": kv_layout}
        grads: tuple[Layout, ...] = ()
        if backward:
            used = _axes(bhl)
            kept = _kept_partial(b["grad_out"].layout, used)
            want["grad_out"] = Layout(q_layout.dims, kept.partial)
            want["out"] = q_layout
            want["logsumexp"] = Layout(bhl)
            kv_grad = Layout(kv_layout.dims, seq + kept.partial)
            grads = (Layout(q_layout.dims, kept.partial), kv_grad, kv_grad)
        if isinstance(mask, ArgSpec):
            full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            want["attn_mask"] = _mask_layout(mask, bhl, full)
        outs = grads or (q_layout, Layout(bhl))
        local = _query_chunk(ri.op, q.shape, k.shape[2], q_layout, ri.mesh)
        yield Strategy(_in_order(ri, want), outs, local=local, local_device=True)


@register_rule(aten._safe_softmax.default)
def safe_softmax_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Local over an unsplit dim (the math attention path's softmax over keys)."""
    x = ri.tensors[0]
    dim = _bind(ri.op, ri.args, ri.kwargs)["dim"] % x.ndim
    dims = list(x.layout.dims)
    dims[dim] = ()
    yield Strategy((Layout(tuple(dims)),), (Layout(tuple(dims)),))
