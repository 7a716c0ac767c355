"""Fused AdamW over flat float32 buffers: the torch reference and the CUDA kernel's wrapper.

One step of torch.optim.AdamW (decoupled weight decay) on a parameter buffer, its
gradient and both moments, in place, with a gradient multiplier ``clip`` (the factor a
global-norm clip computed) and, optionally, a bfloat16 copy of the new parameters
written in the same pass:

    g = grad * clip
    param = param * (1 - lr * weight_decay)
    exp_avg = b1 * exp_avg + (1 - b1) * g
    exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * (g * g)
    param = param - (lr / (1 - b1^t) * exp_avg) / (sqrt(exp_avg_sq) / sqrt(1 - b2^t) + eps)

The scalars are computed in float64 and rounded once to float32; every tensor operation
is one float32 operation, in this order, in both `adamw_flat_reference` and the kernel
(``kernels/adamw.cu``), so on the same inputs they agree bit for bit. Against
torch.optim.AdamW (which forms ``exp_avg`` by ``lerp`` and applies the step by
``addcdiv``) they agree to float32 rounding.

`adamw_flat` picks the kernel for CUDA tensors when `shardlib.cuda.available()`, the
reference otherwise. `sl.optim.adamw` (``shardlib/optim/_transform.py``) calls
`adamw_flat_cuda` for its contiguous float32 blocks on CUDA.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._errors import KernelArgumentError

THREADS = 256
_MAX_GRID = 2**31 - 1


def _scalars(
    lr: float, step: int, b1: float, b2: float, eps: float, weight_decay: float, clip: float
) -> dict[str, np.float32]:
    """The kernel's float32 scalars, each computed in float64 and rounded once."""
    return {
        "clip": np.float32(clip),
        "decay": np.float32(1.0 - lr * weight_decay),
        "b1": np.float32(b1),
        "one_minus_b1": np.float32(1.0 - b1),
        "b2": np.float32(b2),
        "one_minus_b2": np.float32(1.0 - b2),
        "step_size": np.float32(lr / (1.0 - b1**step)),
        "bc2_sqrt": np.float32(math.sqrt(1.0 - b2**step)),
        "eps": np.float32(eps),
    }


def _check(
    where: str,
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    param_bf16: torch.Tensor | None,
    step: int,
) -> None:
    problems = []
    named = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in named.items():
        if t.dtype != torch.float32:
            problems.append(f"{name} is {t.dtype}, not torch.float32")
        if t.numel() != param.numel():
            problems.append(f"{name} has {t.numel()} elements, param {param.numel()}")
        if t.device != param.device:
            problems.append(f"{name} is on {t.device}, param on {param.device}")
    if param_bf16 is not None and (
        param_bf16.dtype != torch.bfloat16 or param_bf16.numel() != param.numel()
    ):
        problems.append(
            f"param_bf16 must be a torch.bfloat16 tensor of {param.numel()} elements, got "
            f"{param_bf16.dtype} with {param_bf16.numel()}"
        )
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        problems.append(f"step must be the 1-based step count, got {step!r}")
    if problems:
        raise KernelArgumentError(
            f"{where}: " + "; ".join(problems) + ". Fix: pass float32 buffers of one size on "
            "one device (the optimizer state's dtype) and the step number t >= 1."
        )


def adamw_flat_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    step: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    param_bf16: torch.Tensor | None = None,
) -> None:
    """AdamW step `step` (1-based) in place on float32 `param`, `exp_avg`, `exp_avg_sq`
    (any device; the module docstring has the math); writes ``param.bfloat16()`` into
    `param_bf16` when given.

    Examples:
        >>> import torch
        >>> from shardlib.cuda._adamw import adamw_flat_reference
        >>> p, g = torch.ones(3), torch.tensor([1.0, -1.0, 0.0])
        >>> m, v = torch.zeros(3), torch.zeros(3)
        >>> adamw_flat_reference(p, g, m, v, lr=0.1, step=1, weight_decay=0.0)
        >>> [round(x, 4) for x in p.tolist()]
        [0.9, 1.1, 1.0]
    """
    _check("adamw_flat_reference(...)", param, grad, exp_avg, exp_avg_sq, param_bf16, step)
    s = {k: float(v) for k, v in _scalars(lr, step, b1, b2, eps, weight_decay, clip).items()}
    with torch.no_grad():
        g = torch.mul(grad, s["clip"])
        p = torch.mul(param, s["decay"])
        m = torch.add(torch.mul(exp_avg, s["b1"]), torch.mul(g, s["one_minus_b1"]))
        v = torch.add(torch.mul(exp_avg_sq, s["b2"]), torch.mul(torch.mul(g, g), s["one_minus_b2"]))
        denom = torch.add(torch.div(torch.sqrt(v), s["bc2_sqrt"]), s["eps"])
        p = torch.sub(p, torch.div(torch.mul(m, s["step_size"]), denom))
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        param.copy_(p)
        if param_bf16 is not None:
            param_bf16.copy_(p.reshape(param_bf16.shape))


def adamw_flat_cuda(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    step: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    param_bf16: torch.Tensor | None = None,
) -> None:
    """`adamw_flat_reference` as one launch of the ``adamw_flat`` kernel (contiguous CUDA
    tensors; one thread per element). Raises where the kernel cannot run (no GPU, CPU
    tensors) rather than falling back."""
    from ._kernel import kernels

    _check("adamw_flat_cuda(...)", param, grad, exp_avg, exp_avg_sq, param_bf16, step)
    n = param.numel()
    if n == 0:
        return
    s = _scalars(lr, step, b1, b2, eps, weight_decay, clip)
    grid = min(-(-n // THREADS), _MAX_GRID)
    kernels()["adamw_flat"].launch(
        grid,
        THREADS,
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        param_bf16,
        np.int64(n),
        *(s[name] for name in SCALARS),
    )


# The kernel's float scalars, in its parameter order (after the tensors and n).
SCALARS = (
    "clip",
    "decay",
    "b1",
    "one_minus_b1",
    "b2",
    "one_minus_b2",
    "step_size",
    "bc2_sqrt",
    "eps",
)


def adamw_flat(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    **kwargs: object,
) -> None:
    """`adamw_flat_cuda` for CUDA tensors when `shardlib.cuda.available()`, else
    `adamw_flat_reference` (same arguments, same results)."""
    from ._launch import available

    if param.device.type == "cuda" and available():
        adamw_flat_cuda(param, grad, exp_avg, exp_avg_sq, **kwargs)  # type: ignore[arg-type]
    else:
        adamw_flat_reference(param, grad, exp_avg, exp_avg_sq, **kwargs)  # type: ignore[arg-type]
