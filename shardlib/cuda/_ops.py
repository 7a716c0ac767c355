"""The quantization kernels as torch functions on CUDA tensors (shardlib.cuda._quant's fast
path).

`quantize_cuda`, `dequantize_cuda` and `dequantize_reduce_cuda` take and return what the
torch references in ``shardlib.cuda._quant`` do (same signatures, bitwise equal results;
the contract is in ``kernels/quant_common.cuh``): they allocate the outputs, pick the
grid and launch the registry kernel on torch's current stream. They do not decide when
the kernels run -- ``_quant``'s dispatch calls them for CUDA tensors when
`shardlib.cuda.available()` -- and they do not fall back: on CPU tensors or without a GPU
the launch raises.
"""

from __future__ import annotations

import numpy as np
import torch

from ._errors import KernelArgumentError
from ._kernel import kernels
from ._quant import _check_block, _check_piece, _check_pieces, _nblocks

THREADS = 256  # threads per CUDA block: 8 warps
_FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_MAX_GRID = 2**31 - 1


def quantize_cuda(
    x: torch.Tensor, fmt: str = "int8", block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantize `x`'s flat float32 view: ``(q [n], scales [ceil(n/block)])``.

    bf16/fp16 inputs are converted to float32 first. Every kernel here runs one warp per
    quantization block (8 per CUDA block of 256 threads).
    """
    where = f"shardlib.cuda._ops.quantize_cuda(x, fmt={fmt!r}, block={block!r})"
    if fmt not in _FORMATS:
        raise KernelArgumentError(f"{where}: fmt must be one of {sorted(_FORMATS)}.")
    block = _check_block(block, where)
    flat = x.reshape(-1)
    flat = (flat if flat.dtype == torch.float32 else flat.float()).contiguous()
    n = flat.numel()
    nblocks = _nblocks(n, block)
    q = torch.empty(n, dtype=_FORMATS[fmt], device=x.device)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n:
        grid = min(_nblocks(nblocks, THREADS // 32), _MAX_GRID)
        kernels()[f"quantize_{fmt}"].launch(
            grid, THREADS, flat, q, scales, np.int64(n), np.int32(block)
        )
    return q, scales


def dequantize_cuda(
    q: torch.Tensor, scales: torch.Tensor, block: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``y_i = float(q_i) * scales[i // block]`` as a [n] tensor of `dtype`."""
    where = f"shardlib.cuda._ops.dequantize_cuda(q, scales, block={block!r}, dtype={dtype})"
    fmt, block = _check_piece(q, scales, block, where)
    flat = q.reshape(-1).contiguous()
    n = flat.numel()
    y = torch.empty(n, dtype=torch.float32, device=q.device)
    if n:
        grid = min(_nblocks(_nblocks(n, block), THREADS // 32), _MAX_GRID)  # a warp per block
        kernels()[f"dequantize_{fmt}"].launch(
            grid, THREADS, flat, scales.reshape(-1).contiguous(), y, np.int64(n), np.int32(block)
        )
    return y if dtype == torch.float32 else y.to(dtype)


def dequantize_reduce_cuda(
    q: torch.Tensor, scales: torch.Tensor, block: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``y_i = sum_j float(q[j, i]) * scales[j, i // block]`` (float32, j = 0 first) as a
    [n] tensor of `dtype`; `q` is [k, n], `scales` [k, ceil(n/block)]."""
    where = f"shardlib.cuda._ops.dequantize_reduce_cuda(q, scales, block={block!r}, dtype={dtype})"
    fmt, block = _check_pieces(q, scales, block, where)
    k, n = q.shape
    y = torch.empty(n, dtype=torch.float32, device=q.device)
    if n and k:
        grid = min(_nblocks(_nblocks(n, block), THREADS // 32), _MAX_GRID)  # a warp per block
        kernels()[f"dequantize_reduce_{fmt}"].launch(
            grid,
            THREADS,
            q.contiguous(),
            scales.contiguous(),
            y,
            np.int64(n),
            np.int32(block),
            np.int32(k),
        )
    elif n:
        y.zero_()
    return y if dtype == torch.float32 else y.to(dtype)
