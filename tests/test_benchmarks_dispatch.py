"""benchmarks/dispatch.py's floor and GPT-step attribution (default tier, a few seconds).

The floor wrapper (`_Minimal`: unwrap, call, wrap) must compute exactly what plain torch
computes, or its timings would measure another model: the GPT loss and every gradient
through it equal plain torch's bit for bit (float64, the same kernels). The attribution
table runs one interleaved step of each variant and counts dispatches: shardlib's and the
floor's are positive and plain torch's are not counted.
"""

from __future__ import annotations

import importlib

import torch

from shardlib.nn import gpt


def _dispatch_bench():
    # as the package module, never with benchmarks/ on sys.path: its file names would
    # shadow installed packages (benchmarks/kernels.py hides the `kernels` transformers imports)
    return importlib.import_module("benchmarks.dispatch")


def test_minimal_wrapper_computes_what_plain_torch_computes():
    minimal = _dispatch_bench()._Minimal
    c = gpt.Config(vocab=24, dim=16, heads=4, layers=2, seq=8, kv_heads=2)
    raw = {k: v.double() for k, v in gpt.init(c, seed=2).items()}
    g = torch.Generator().manual_seed(5)
    batch = {k: torch.randint(0, 24, (3, 8), generator=g) for k in ("tokens", "targets")}
    plain = {k: v.clone().requires_grad_() for k, v in raw.items()}
    wrapped = {k: minimal(v.clone(), True) for k, v in raw.items()}
    want = gpt.loss(plain, batch, c)
    want.backward()
    got = gpt.loss(wrapped, {k: minimal(v) for k, v in batch.items()}, c)
    got.backward()
    assert type(got) is minimal
    torch.testing.assert_close(got.elem, want.detach(), rtol=0, atol=0)
    for k in raw:
        torch.testing.assert_close(wrapped[k].grad.elem, plain[k].grad, rtol=0, atol=0, msg=k)


def test_gpt_step_table_rows():
    rows = _dispatch_bench().gpt_step_table(steps=1)
    names = [r[0] for r in rows]
    assert names == [
        "plain torch",
        "minimal __torch_dispatch__ wrapper",
        "shardlib tp1d, one-device mesh",
    ]
    (_, plain_ms, plain_calls, plain_n), *wrappers = rows
    assert plain_ms > 0 and plain_calls > 0 and plain_n == 0
    for name, ms, calls, n in wrappers:
        assert ms > 0 and calls > plain_calls and n > 0, name
