"""Blockwise quantization in torch: the references of the quantization kernels, and the
functions compressed collectives call (DESIGN §10).

Owns `quantize`, `dequantize` and `dequantize_reduce`. Each runs the CUDA kernel
(``shardlib.cuda._ops.*_cuda``) when its tensors are on CUDA and `shardlib.cuda.available()`
(fp8: on sm_89 or newer), and the torch code below otherwise; the two are bitwise equal on finite input (the GPU
tier checks it). It does not own moving the pieces (``shardlib.collectives``) or choosing
blocks that line up with destination chunks (the caller quantizes each chunk by itself).

The contract, for a tensor's flat float32 view ``x`` of n elements cut into blocks of
`block` elements (the last one may be short), block b:

    absmax_b = max |x_i|;  scale_b = absmax_b / QMAX  (float32; QMAX 127 int8, 448 e4m3)
    int8:  q_i = clamp(rint(x_i / scale_b), -127, 127)   (round half to even)
    fp8:   q_i = e4m3(clamp(x_i / scale_b, -448, 448))   (round to nearest even)
    q_i = 0 where scale_b == 0
    dequantize:         y_i = float(q_i) * scale_b
    dequantize-reduce:  y_i = sum_j float(q_ji) * scale_jb, float32, j = 0 first

Error bounds (finite input):
- int8: ``|x_i - y_i| <= absmax_b / 254`` (half a step of ``absmax_b / 127``; the float32
  rounding of the scale, quotient and product adds a few ulps of absmax_b on top).
- fp8 e4m3: the quotient ``v = x_i / scale_b`` lies in [-448, 448]; e4m3 has 3 mantissa
  bits, so rounding to nearest moves a normal v (|v| >= 2^-6) by at most 2^-4 |v| and a
  subnormal one by at most half its spacing 2^-9 / 2 = 2^-10. Scaled back:
  ``|x_i - y_i| <= 2^-4 |x_i| + 2^-10 * scale_b`` (``scale_b = absmax_b / 448``).

Non-finite input propagates, it does not raise (one rank raising inside a collective would
leave the others waiting): a block holding inf or NaN has a non-finite scale, its q are 0,
and every element of it dequantizes to NaN (``0 * inf`` and ``0 * NaN`` are NaN), so a
compressed gradient with an overflow still reads as non-finite to a loss-scaler. The
bitwise contract with the kernels covers finite input only.
"""

from __future__ import annotations

import torch

from ._errors import KernelArgumentError

_QMAX = {"int8": 127.0, "fp8": 448.0}


def _qdtype(fmt: str, where: str) -> torch.dtype:
    if fmt == "int8":
        return torch.int8
    if fmt == "fp8":
        dtype = getattr(torch, "float8_e4m3fn", None)
        if dtype is None:
            raise KernelArgumentError(
                f"{where}: this torch ({torch.__version__}) has no torch.float8_e4m3fn. "
                "Fix: use fmt='int8', or a torch with float8 dtypes (2.1 or newer)."
            )
        return dtype
    raise KernelArgumentError(f"{where}: fmt must be 'int8' or 'fp8', got {fmt!r}.")


def _fmt_of(q: torch.Tensor, where: str) -> str:
    if q.dtype == torch.int8:
        return "int8"
    if q.dtype == getattr(torch, "float8_e4m3fn", None):
        return "fp8"
    raise KernelArgumentError(
        f"{where}: q is {q.dtype}; quantized pieces are torch.int8 or torch.float8_e4m3fn. "
        "Fix: pass the q that quantize returned."
    )


def _check_block(block: object, where: str) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or not 0 < block < 2**31:
        raise KernelArgumentError(f"{where}: block must be a positive int, got {block!r}.")
    return block


def _nblocks(n: int, block: int) -> int:
    return -(-n // block)


def _check_piece(q: torch.Tensor, scales: torch.Tensor, block: object, where: str) -> tuple:
    """dequantize's arguments: `q` of a quantized dtype, one scale per block; returns
    (fmt, block)."""
    fmt = _fmt_of(q, where)
    block = _check_block(block, where)
    n = q.numel()
    if scales.numel() != _nblocks(n, block):
        raise KernelArgumentError(
            f"{where}: q has {n} elements, which is {_nblocks(n, block)} blocks of {block}, "
            f"but scales has {scales.numel()}. Fix: pass the scales quantize returned with "
            "this q, and the same block."
        )
    return fmt, block


def _check_pieces(q: torch.Tensor, scales: torch.Tensor, block: object, where: str) -> tuple:
    """dequantize-reduce's arguments: `q` [k, n] of a quantized dtype, `scales` [k, blocks];
    returns (fmt, block)."""
    fmt = _fmt_of(q, where)
    block = _check_block(block, where)
    if q.dim() != 2:
        raise KernelArgumentError(
            f"{where}: q must be [k, n] (k pieces of n elements), got shape {tuple(q.shape)}."
        )
    k, n = q.shape
    if tuple(scales.shape) != (k, _nblocks(n, block)):
        raise KernelArgumentError(
            f"{where}: q is {tuple(q.shape)}, so scales must be {(k, _nblocks(n, block))} "
            f"(blocks of {block}), got {tuple(scales.shape)}. Fix: stack the scales quantize "
            "returned for each piece, with the same block."
        )
    return fmt, block


def _on_gpu(fmt: str, *tensors: torch.Tensor) -> bool:
    """Whether the kernels run: CUDA tensors, `available()`, and for fp8 an sm_89+ GPU (the
    e4m3 conversions are hardware instructions; older GPUs run the torch code, bitwise
    the same)."""
    if not all(t.is_cuda for t in tensors):
        return False
    from . import _launch

    if fmt == "fp8" and torch.cuda.get_device_capability(tensors[0].device) < (8, 9):
        return False
    return _launch.available()


def _as_blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """``flat`` [..., n] as [..., nblocks, block], the last block zero-padded."""
    n = flat.shape[-1]
    pad = _nblocks(n, block) * block - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(*flat.shape[:-1], -1, block)


# == quantize ===================================================================
def quantize(
    x: torch.Tensor, fmt: str = "int8", block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantize `x`'s flat float32 view: ``(q [n], scales [ceil(n/block)])``.

    Args:
        x: a floating tensor of any shape (bf16/fp16/fp64 are converted to float32 first).
        fmt: ``"int8"`` (q is torch.int8) or ``"fp8"`` (torch.float8_e4m3fn).
        block: elements per scale; the last block may be short.

    Examples:
        >>> import torch
        >>> from shardlib.cuda._quant import quantize, dequantize
        >>> q, s = quantize(torch.tensor([1.0, -0.5, 0.25, 127.0]), block=2)
        >>> q.tolist(), s.tolist()
        ([127, -64, 0, 127], [0.007874015718698502, 1.0])
        >>> dequantize(q, s, block=2).tolist()
        [1.0, -0.5039370059967041, 0.0, 127.0]
    """
    where = f"quantize(x, fmt={fmt!r}, block={block!r})"
    qdtype = _qdtype(fmt, where)
    block = _check_block(block, where)
    if not x.is_floating_point():
        raise KernelArgumentError(
            f"{where}: x is {x.dtype}; only floating tensors are quantized. "
            "Fix: move integer or bool tensors uncompressed."
        )
    if _on_gpu(fmt, x):
        from ._ops import quantize_cuda

        return quantize_cuda(x, fmt, block)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = _as_blocks(flat, block)  # [nb, block]
    scales = blocks.abs().amax(dim=1) / _QMAX[fmt] if n else flat.new_zeros(0)
    ok = torch.isfinite(scales) & (scales != 0)
    quotient = blocks / torch.where(ok, scales, 1.0).unsqueeze(1)
    if fmt == "int8":
        coded = quotient.round_().clamp_(-127.0, 127.0)
    else:  # torch's e4m3fn cast turns |v| >= 480 into NaN: saturate first (satfinite)
        coded = quotient.clamp_(-448.0, 448.0)
    coded = torch.where(ok.unsqueeze(1), coded, 0.0)
    q = coded.reshape(-1)[:n].to(qdtype)
    return q, scales


# == dequantize =================================================================
def dequantize(
    q: torch.Tensor, scales: torch.Tensor, block: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``y_i = float(q_i) * scales[i // block]`` (one float32 multiply) as a [n] tensor of
    `dtype`.

    Examples:
        >>> import torch
        >>> from shardlib.cuda._quant import quantize, dequantize
        >>> x = torch.linspace(-1, 1, 5)
        >>> bool(((dequantize(*quantize(x, "fp8")) - x).abs() <= x.abs() / 16).all())
        True
    """
    where = f"dequantize(q, scales, block={block!r}, dtype={dtype})"
    fmt, block = _check_piece(q, scales, block, where)
    n = q.numel()
    if _on_gpu(fmt, q, scales):
        from ._ops import dequantize_cuda

        return dequantize_cuda(q, scales, block, dtype)
    blocks = _as_blocks(q.reshape(-1).float(), block)
    y = (blocks * scales.reshape(-1, 1).float()).reshape(-1)[:n]
    return y if dtype == torch.float32 else y.to(dtype)


def dequantize_reduce(
    q: torch.Tensor, scales: torch.Tensor, block: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The sum of k dequantized pieces: ``y_i = sum_j float(q[j, i]) * scales[j, i // block]``,
    accumulated in float32 in j order (j = 0 first, no fused multiply-add), as a [n]
    tensor of `dtype`. `q` is [k, n], `scales` [k, ceil(n/block)].

    Examples:
        >>> import torch
        >>> from shardlib.cuda._quant import quantize, dequantize_reduce
        >>> (q0, s0), (q1, s1) = quantize(torch.ones(3)), quantize(torch.full((3,), 2.0))
        >>> dequantize_reduce(torch.stack([q0, q1]), torch.stack([s0, s1])).tolist()
        [3.0, 3.0, 3.0]
    """
    where = f"dequantize_reduce(q, scales, block={block!r}, dtype={dtype})"
    fmt, block = _check_pieces(q, scales, block, where)
    k, n = q.shape
    if _on_gpu(fmt, q, scales):
        from ._ops import dequantize_reduce_cuda

        return dequantize_reduce_cuda(q, scales, block, dtype)
    blocks = _as_blocks(q.float(), block)  # [k, nb, block]
    scales = scales.float().unsqueeze(-1)  # [k, nb, 1]
    acc = torch.zeros(blocks.shape[1:], dtype=torch.float32, device=q.device)
    for j in range(k):
        acc = acc + blocks[j] * scales[j]  # two roundings, like __fadd_rn(acc, __fmul_rn(..))
    y = acc.reshape(-1)[:n]
    return y if dtype == torch.float32 else y.to(dtype)
