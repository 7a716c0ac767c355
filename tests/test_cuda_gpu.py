"""GPU tier of shardlib.cuda: every kernel launched on a CUDA device against its torch
reference; skipped, with the reason, where no GPU and driver are present.

- Quantization kernels against the references (run on CPU copies) BITWISE: q bytes and
  scales as raw bits, for lengths around the block size, several block sizes, all-zero
  blocks (scale 0), negative zeros, exact ties (x/scale = k + 1/2), fp8 saturation; a
  grid smaller than the work (the kernels' stride loops); a side stream.
- ``adamw_flat`` against ``adamw_flat_reference`` on CPU bitwise (same float32 operations
  in the same order), with and without the bf16 copy, over several steps; and
  `sl.optim.adamw` on CUDA float32 runs it (one launch per block) and stays within
  float32 rounding of ``torch.optim.AdamW(fused=True)``.
- Bad input on a GPU: a CPU tensor among CUDA ones, a wrong dtype (each named), fp8 on a
  GPU older than sm_89.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import shardlib as sl


def _why_skip() -> str:
    try:
        return sl.cuda.gpu_problem() or ""
    except sl.cuda.CudaNotInstalledError as e:
        return str(e)


pytestmark = pytest.mark.skipif(
    not sl.cuda.available(), reason=f"needs a CUDA GPU and driver: {_why_skip()}"
)

FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 != 0.0 and NaN payloads count."""
    t = t.detach().cpu().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _needs_fp8(fmt: str) -> None:
    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 kernels need sm_89+")


def _inputs(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    if n >= 600:
        x[256:512] = 0.0  # an all-zero block: scale 0
        x[520] = -0.0
    return x


def _quant_ref(x, fmt, block):
    return sl.cuda.kernels()[f"quantize_{fmt}"].reference(x.cpu(), block=block)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("n,block", [(1, 256), (255, 256), (257, 256), (4099, 256), (1000, 64),
                                     (70001, 1024), (513, 33)])  # fmt: skip
def test_quantize_bitwise(fmt, n, block):
    _needs_fp8(fmt)
    from shardlib.cuda import _ops

    x = _inputs(n, seed=n)
    q, s = _ops.quantize_cuda(x.cuda(), fmt, block)
    rq, rs = _quant_ref(x, fmt, block)
    assert q.dtype == FORMATS[fmt] and q.shape == (n,) and s.shape == (-(-n // block),)
    assert torch.equal(_bits(s), _bits(rs))
    assert torch.equal(_bits(q), _bits(rq))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantize_ties_and_saturation(fmt):
    """Quotients exactly at k + 1/2 round to even; the absmax element maps to +-qmax."""
    _needs_fp8(fmt)
    from shardlib.cuda import _ops

    qmax = 127.0 if fmt == "int8" else 448.0
    x = torch.tensor([qmax, 0.5, 1.5, 2.5, -2.5, -qmax, 3.5, 100.5] * 32)
    q, s = _ops.quantize_cuda(x.cuda(), fmt, 256)
    rq, rs = _quant_ref(x, fmt, 256)
    assert torch.equal(_bits(q), _bits(rq)) and torch.equal(_bits(s), _bits(rs))
    assert s.item() == 1.0 and q[0].float().item() == qmax


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantize_non_finite_blocks(fmt):
    """A block holding inf or NaN: a non-finite scale (NaN wins over inf, as torch's amax),
    every q 0, so it dequantizes to NaN; the finite blocks beside it are unaffected."""
    _needs_fp8(fmt)
    from shardlib.cuda import _ops

    x = _inputs(4 * 256, seed=7)
    x[3], x[300], x[600], x[601] = float("nan"), float("inf"), float("-inf"), float("nan")
    q, s = _ops.quantize_cuda(x.cuda(), fmt, 256)
    rq, rs = _quant_ref(x, fmt, 256)
    assert torch.equal(_bits(q), _bits(rq))
    torch.testing.assert_close(s.cpu(), rs, rtol=0, atol=0, equal_nan=True)
    assert s[0].isnan() and s[1].isinf() and s[2].isnan() and s[3].isfinite()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_bitwise(fmt, dtype):
    _needs_fp8(fmt)
    from shardlib.cuda import _ops

    x = _inputs(5000, seed=3)
    q, s = _quant_ref(x, fmt, 128)
    y = _ops.dequantize_cuda(q.cuda(), s.cuda(), 128, dtype)
    ref = sl.cuda.kernels()[f"dequantize_{fmt}"].reference(q, s, block=128, dtype=dtype)
    assert y.dtype == dtype and torch.equal(_bits(y), _bits(ref))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("k", [1, 2, 5])
def test_dequantize_reduce_bitwise(fmt, k):
    _needs_fp8(fmt)
    from shardlib.cuda import _ops

    pieces = [_quant_ref(_inputs(3001, seed=10 + j), fmt, 256) for j in range(k)]
    q = torch.stack([p[0] for p in pieces])
    s = torch.stack([p[1] for p in pieces])
    y = _ops.dequantize_reduce_cuda(q.cuda(), s.cuda(), 256, torch.float32)
    ref = sl.cuda.kernels()[f"dequantize_reduce_{fmt}"].reference(q, s, block=256)
    assert torch.equal(_bits(y), _bits(ref))
    # and it is the sum of the dequantized pieces, in order
    acc = torch.zeros(3001)
    for j in range(k):
        acc = acc + sl.cuda.kernels()[f"dequantize_{fmt}"].reference(q[j], s[j], block=256)
    assert torch.equal(_bits(y), _bits(acc))


def test_small_grid_and_side_stream():
    """A grid smaller than the work (every kernel strides), launched on a side stream."""
    ks = sl.cuda.kernels()
    n, block = 10_000, 256
    x = _inputs(n, seed=7).cuda()
    q = torch.empty(n, dtype=torch.int8, device="cuda")
    s = torch.empty(-(-n // block), device="cuda")
    y = torch.empty(n, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ks["quantize_int8"].launch(2, 64, x, q, s, np.int64(n), np.int32(block))
        ks["dequantize_int8"].launch(3, 128, q, s, y, np.int64(n), np.int32(block))
    side.synchronize()
    rq, rs = _quant_ref(x, "int8", block)
    assert torch.equal(_bits(q), _bits(rq)) and torch.equal(_bits(s), _bits(rs))
    ref = ks["dequantize_int8"].reference(rq, rs, block=block)
    assert torch.equal(_bits(y), _bits(ref))


# == fused AdamW ================================================================
@pytest.mark.parametrize("bf16", [False, True])
def test_adamw_flat_bitwise_against_reference(bf16):
    from shardlib.cuda._adamw import adamw_flat_cuda, adamw_flat_reference

    gen = torch.Generator().manual_seed(0)
    n = 100_003
    p = torch.randn(n, generator=gen)
    m, v = torch.zeros(n), torch.zeros(n)
    cp, cm, cv = p.cuda(), m.cuda(), v.cuda()
    out = torch.empty(n, dtype=torch.bfloat16, device="cuda") if bf16 else None
    ref_out = torch.empty(n, dtype=torch.bfloat16) if bf16 else None
    hp = dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=0.5)
    for t in range(1, 6):
        g = torch.randn(n, generator=gen)
        adamw_flat_reference(p, g, m, v, step=t, param_bf16=ref_out, **hp)
        adamw_flat_cuda(cp, g.cuda(), cm, cv, step=t, param_bf16=out, **hp)
    for a, b in ((cp, p), (cm, m), (cv, v)):
        assert torch.equal(_bits(a), _bits(b))
    if bf16:
        assert torch.equal(_bits(out), _bits(ref_out)) and torch.equal(out.cpu(), p.bfloat16())


def test_sl_optim_adamw_uses_the_kernel_on_cuda(monkeypatch):
    from shardlib.cuda import _adamw

    calls = []
    real = _adamw.adamw_flat_cuda
    monkeypatch.setattr(_adamw, "adamw_flat_cuda", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(1)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    params = {f"w{i}": torch.randn(s, generator=gen).cuda() for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=gen).cuda() for k, v in params.items()}
    tx = sl.optim.adamw(1e-2, weight_decay=0.1)
    state = tx.init(params)
    ours = params
    for _ in range(3):
        ours, state = sl.optim.step(tx, grads, state, ours)
    assert len(calls) == 3 * len(shapes)
    tparams = [torch.nn.Parameter(v.clone()) for v in params.values()]
    opt = torch.optim.AdamW(tparams, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(3):
        for tp, g in zip(tparams, grads.values()):
            tp.grad = g.clone()
        opt.step()
    for tp, k in zip(tparams, params):
        torch.testing.assert_close(ours[k], tp.detach(), rtol=1e-6, atol=1e-8)


# == bad input ==================================================================
def test_bad_input_names_the_argument():
    k = sl.cuda.kernels()["dequantize_int8"]
    q = torch.zeros(8, dtype=torch.int8, device="cuda")
    with pytest.raises(sl.cuda.KernelArgumentError) as e:
        k.launch(1, 32, q, torch.ones(1), torch.empty(8, device="cuda"), 8, 256)
    assert "argument 1 ('scales') is a cpu tensor" in str(e.value)
    with pytest.raises(sl.cuda.KernelArgumentError) as e:
        k.launch(
            1, 32, q.float(), torch.ones(1, device="cuda"), torch.empty(8, device="cuda"), 8, 8
        )
    assert "argument 0 ('q') is torch.float32, the kernel's parameter is torch.int8" in str(e.value)


def test_fp8_on_an_older_gpu_is_refused():
    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has fp8 (sm_89+)")
    with pytest.raises(sl.cuda.ArchError, match="below this kernel's minimum sm_89"):
        sl.cuda.kernels()["quantize_fp8"].launch(
            1,
            32,
            torch.ones(4, device="cuda"),
            torch.empty(4, dtype=torch.float8_e4m3fn, device="cuda"),
            torch.empty(1, device="cuda"),
            4,
            256,
        )
