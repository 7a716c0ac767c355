"""transformers' GPT-2 and Llama, unchanged, under Megatron layouts on {dp: 2, tp: 2}.

Issue 9's real-model Must-show, on the simulated mesh. `GPT2LMHeadModel` and
`LlamaForCausalLM` (grouped-query attention: 2 key/value heads for 4 query
heads; rotary positions) are built from tiny random configs in code (nothing
downloaded) in float64, eval mode (no dropout). Their weights get Megatron
layouts by name through `snn.shard_by_name`: column-parallel q/k/v/gate/up and
GPT-2's fused ``c_attn`` and ``c_fc`` (a Conv1D weight is (in, out), so the
column split is dim 1), row-parallel ``o_proj``/``down_proj``/``c_proj`` over
"tp", the vocabulary split over "tp" (vocabulary-parallel embedding and head)
or replicated; the batch is split over "dp". The step is
``torch.func.functional_call(model, params, (ids,), {"labels": labels})`` and
``out.loss.backward()``: the models' own loss path (``ForCausalLMLoss``: label
shift by ``F.pad``, cross-entropy), with no replicate fallback, under eager
and SDPA attention.

Reference: the same model object, unsharded, on the same batch. Tolerances,
from where transformers computes in float32 whatever the model dtype:
``ForCausalLMLoss`` upcasts the logits (``logits.float()``), so the loss is a
float32 number and its sharded value (a mean over a dp-split batch) differs
from the reference by float32 rounding (rtol 1e-6, a few ulps); the logits are
float64 and equal at 1e-12. With the vocabulary replicated every gradient
equals the reference at rtol 1e-10 (float64 all the way back from the float32
log-softmax, which then runs on whole rows as in the reference). With the
vocabulary split the float32 log-softmax sums each half's exponentials apart,
so gradients carry float32 rounding: atol 1e-6 of the largest reference entry
(measured ~1e-7). Llama's RMSNorm and rotary tables also run in float32 in both
runs, on the same values.

Also: `shard_by_name`'s errors (a pattern matching no name, a layout of the
wrong length), and the ledger of one Llama SDPA step against Megatron's
collectives (one all-reduce over tp per attention and per MLP, forward and
backward, plus the embedding's and the vocabulary-parallel cross-entropy's),
with bytes from the shapes; and the add rule that a tied embedding's two
gradients need (partials over different axes keep the common ones).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.func import functional_call

import shardlib as sl
from shardlib import nn as snn

transformers = pytest.importorskip("transformers")

F64 = torch.float64
VOCAB, DIM, HEADS, KV_HEADS, LAYERS, MLP = 64, 32, 4, 2, 2, 64
BATCH, SEQ = 4, 8
AXES = {"dp": 2, "tp": 2}

# Megatron layouts by parameter name (first match wins; the rest is replicated).
GPT2_LAYOUTS = {
    "*.attn.c_attn.weight": sl.P(None, "tp"),  # Conv1D weight (in, out): column = dim 1
    "*.attn.c_attn.bias": sl.P("tp"),
    "*.mlp.c_fc.weight": sl.P(None, "tp"),
    "*.mlp.c_fc.bias": sl.P("tp"),
    "*.c_proj.weight": sl.P("tp", None),  # row-parallel: the input dim, dim 0 of (in, out)
}
LLAMA_LAYOUTS = {
    "*.self_attn.[qkv]_proj.weight": sl.P("tp", None),  # Linear weight (out, in)
    "*.mlp.gate_proj.weight": sl.P("tp", None),
    "*.mlp.up_proj.weight": sl.P("tp", None),
    "*.self_attn.o_proj.weight": sl.P(None, "tp"),
    "*.mlp.down_proj.weight": sl.P(None, "tp"),
}
VOCAB_SPLIT = {
    "gpt2": {"transformer.wte.weight": sl.P("tp", None)},  # tied to the head
    "llama": {"model.embed_tokens.weight": sl.P("tp", None), "lm_head.weight": sl.P("tp", None)},
}


def build(name: str, attn: str, dtype=F64) -> torch.nn.Module:
    """A tiny random model (seeded), in `dtype`, eval mode."""
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=DIM,
            n_head=HEADS,
            n_layer=LAYERS,
            n_positions=2 * SEQ,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation=attn,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=DIM,
            intermediate_size=MLP,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            num_hidden_layers=LAYERS,
            max_position_embeddings=2 * SEQ,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            attn_implementation=attn,
        )
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype).eval()


def layouts(name: str, vocab: str) -> dict[str, sl.Layout]:
    base = GPT2_LAYOUTS if name == "gpt2" else LLAMA_LAYOUTS
    return {**base, **(VOCAB_SPLIT[name] if vocab == "split" else {})}


def batch(padded: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ids, labels and (`padded`) an attention mask: row 1 right-padded by 3, labels -100 there."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[0, :3] = -100  # ignored positions
    if not padded:
        return ids, labels, None
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0
    labels[1, -3:] = -100
    return ids, labels, mask


def sharded_step(model, mesh, name: str, vocab: str, ids, labels, mask):
    """Loss, logits, {name: gradient} (global values) of one sharded forward and backward,
    and the ledger of that forward and backward."""
    params = snn.shard_by_name(model, mesh, layouts(name, vocab))
    kwargs = {"labels": labels} if mask is None else {"labels": labels, "attention_mask": mask}
    kwargs = {k: sl.shard(t, mesh, sl.P("dp", None)) for k, t in kwargs.items()}
    with sl.comm_ledger() as led:
        out = functional_call(model, params, (sl.shard(ids, mesh, sl.P("dp", None)),), kwargs)
        out.loss.backward()
    grads = {k: v.grad.full() for k, v in params.items()}
    return (out.loss.full(), out.logits.full(), grads), led


@functools.cache
def run(name: str, attn: str, vocab: str, padded: bool) -> tuple:
    """`sharded_step` of a case on {dp: 2, tp: 2} (once per session: two tests read it)."""
    return sharded_step(build(name, attn), sl.Mesh.simulated(AXES), name, vocab, *batch(padded))


@functools.cache
def reference(name: str, attn: str, padded: bool) -> tuple:
    """The unsharded float64 model's loss, logits and gradients on `batch(padded)`."""
    model = build(name, attn)
    ids, labels, mask = batch(padded)
    out = model(ids, labels=labels, attention_mask=mask)
    out.loss.backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    return out.loss.detach(), out.logits.detach(), grads


def compare(got: tuple, want: tuple, vocab: str) -> None:
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = got, want
    assert loss.dtype == ref_loss.dtype == torch.float32  # ForCausalLMLoss upcasts the logits
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for k, g in grads.items():
        scale = ref_grads[k].abs().max().item()
        rtol, atol = (1e-10, 1e-10 * scale) if vocab == "replicated" else (1e-6, 1e-6 * scale)
        torch.testing.assert_close(
            g, ref_grads[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
        )


# (model, attention, vocabulary, padded batch with an attention mask)
CASES = [
    ("gpt2", "sdpa", "split", False),
    ("gpt2", "eager", "replicated", True),
    ("llama", "sdpa", "split", True),
    ("llama", "eager", "replicated", False),
]


def _id(case: tuple) -> str:
    name, attn, vocab, padded = case
    return f"{name}-{attn}-vocab_{vocab}" + ("-masked" if padded else "")


@pytest.mark.parametrize(("name", "attn", "vocab", "padded"), CASES, ids=map(_id, CASES))
def test_labels_loss_and_every_gradient_equal_unsharded_float64(name, attn, vocab, padded):
    got, led = run(name, attn, vocab, padded)
    compare(got, reference(name, attn, padded), vocab)
    assert led.count() > 0  # the tp and dp splits did communicate (a replicated run would not)


def _all_reduce_bytes(numel: int, itemsize: int, size: int) -> int:
    """The ledger's ring all-reduce: a reduce-scatter and an all-gather of ceil(n/P) each."""
    return 2 * (size - 1) * math.ceil(numel / size) * itemsize


def test_llama_step_has_megatrons_collectives():
    """Llama with SDPA (GQA, rotary, a padding mask): Megatron's all-reduces, and the mask's.

    Forward: the vocabulary-parallel embedding's output, then each layer's row-parallel
    o_proj and down_proj outputs: 1 + 2 * LAYERS all-reduces over tp of the (B/dp, S, DIM)
    float64 activation; the vocabulary-parallel cross-entropy's row max and row sum of
    exponentials (one float32 per local row: ForCausalLMLoss upcasts) and the count of
    non-ignored targets over the dp-split batch (one float32). Backward: each layer's
    column-parallel q/k/v and gate/up input gradients and the head's input gradient:
    2 * LAYERS + 1 all-reduces of the activation. No all-gather, no gradient
    reduce-scatter: every weight gradient is born in its weight's layout.

    Beyond Megatron, transformers' mask code asks two global questions of the dp-split
    mask in Python (``fast_all``: ``mask.sum() == mask.numel()``, an int64 all-reduce
    each), and indexes it with plain ``arange`` tensors (``mask[batch_idx, kv_idx]``: the
    index rule cannot know the index is the identity, so the (B, 1, 1, S) result is
    partial over dp and the ``&`` with the causal mask reduces it: B * S bools).
    """
    _, led = run("llama", "sdpa", "split", True)
    dp, tp = AXES["dp"], AXES["tp"]
    act = _all_reduce_bytes(BATCH // dp * SEQ * DIM, 8, tp)
    want = (
        [("forward", "all_reduce", ("tp",), act)] * (1 + 2 * LAYERS)
        + [("forward", "all_reduce", ("tp",), _all_reduce_bytes(BATCH // dp * SEQ, 4, tp))] * 2
        + [("forward", "all_reduce", ("dp",), _all_reduce_bytes(1, 4, dp))]
        + [("backward", "all_reduce", ("tp",), act)] * (2 * LAYERS + 1)
        + [("forward", "all_reduce", ("dp",), _all_reduce_bytes(1, 8, dp))] * 2  # fast_all
        + [("forward", "all_reduce", ("dp",), _all_reduce_bytes(BATCH * SEQ, 1, dp))]  # &
    )
    got = [(r.direction, r.kind, r.axes, r.bytes) for r in led.records]
    assert sorted(got) == sorted(want), led.summary()


def test_shard_by_name_refuses_a_pattern_matching_nothing_and_a_wrong_length():
    mesh = sl.Mesh.simulated(AXES)
    model = build("llama", "sdpa")
    with pytest.raises(sl.LayoutError, match=r"'\*\.c_attn\.weight' match no parameter.*Fix"):
        snn.shard_by_name(model, mesh, {**LLAMA_LAYOUTS, "*.c_attn.weight": sl.P(None, "tp")})
    with pytest.raises(sl.LayoutError, match=r"lm_head.weight \(shape \(64, 32\)\).*needs 2"):
        snn.shard_by_name(model, mesh, {"lm_head.weight": sl.P("tp")})
    params = snn.shard_by_name(model, mesh, {"*_proj.weight": sl.P("tp", None)})
    assert params["model.layers.0.mlp.down_proj.weight"].spec == sl.P("tp", None)  # first match
    assert params["model.norm.weight"].spec == sl.P(None)  # unmatched: replicated
    assert params["lm_head.weight"].requires_grad and params["lm_head.weight"].is_leaf


@pytest.mark.parametrize("op", ["sum", "avg"])
def test_add_of_partials_over_different_axes_keeps_the_common_axes(op):
    """A tied weight's two gradients (the head's, P('tp', None, partial='dp'); the embedding's,
    partial over dp and tp) add with one reduce-scatter over tp, staying partial over dp
    (_pointwise, h9f): before, both were reduced over everything (3 collectives, 3x bytes)."""
    mesh = sl.Mesh.simulated(AXES)
    g = torch.Generator().manual_seed(0)
    a_parts = torch.randn(2, 8, 4, generator=g, dtype=F64)  # one summand per dp index
    b_parts = torch.randn(2, 2, 8, 4, generator=g, dtype=F64)  # one per (dp, tp) device
    a_shards = [a_parts[i].chunk(2)[j].clone() for i in range(2) for j in range(2)]
    a = sl.from_local(a_shards, mesh, sl.P("tp", None, partial={"dp": op}), (8, 4))
    b_shards = [b_parts[i, j].clone() for i in range(2) for j in range(2)]
    b = sl.from_local(b_shards, mesh, sl.P(None, None, partial={"dp": op, "tp": op}), (8, 4))
    with sl.comm_ledger() as led:
        c = a + b
    reduce = (lambda t, dims: t.sum(dims)) if op == "sum" else (lambda t, dims: t.mean(dims))
    torch.testing.assert_close(c.full(), reduce(a_parts, 0) + reduce(b_parts, (0, 1)))
    assert c.spec == sl.P("tp", None, partial={"dp": op})
    assert [(r.kind, r.axes, r.bytes) for r in led.records] == [
        ("reduce_scatter", ("tp",), (AXES["tp"] - 1) * (8 * 4 // AXES["tp"]) * 8)
    ]
