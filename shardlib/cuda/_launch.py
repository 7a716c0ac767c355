"""Launching registry kernels on torch's CUDA streams, and `available()`.

Owns: the driver/GPU probe (`available`, `gpu_problem`), the checks of a launch's
arguments against the kernel's parameters (every problem reported at once: count, tensor
dtypes, CPU or non-contiguous tensors, scalar types; plus "no driver" when there is
none), loading the compiled module once per (source, arch, device), and the launch
itself through cuda.core (``launch(stream, LaunchConfig(grid, block), kernel, *args)``)
on torch's current stream of the tensors' device. Tensors pass as their ``data_ptr()``,
scalars as numpy scalars of the parameter's type.

It does not own compiling (`_compile.py`), the registry (`_kernel.py`) or choosing grid
shapes (the wrappers in `_ops.py` and `_adamw.py`). Nothing here runs at import.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from . import _compile
from ._errors import CudaNotInstalledError, KernelArgumentError, NoGpuError

_NO_GPU_FIX = (
    "Fix: run on a machine with an NVIDIA GPU, its driver (R580 or newer for the CUDA 13 "
    "kernels) and a CUDA build of torch; on CPU, use the torch references "
    "(shardlib.cuda._quant, shardlib.cuda._adamw), which sl.reshard and sl.optim pick "
    "there by themselves."
)


# == availability ===============================================================
def available() -> bool:
    """True when the ``shardlib[cuda]`` extra imports, a CUDA driver and a GPU are present
    and torch can use them: then `shardlib.cuda` kernels launch, and `sl.optim.adamw` and
    compressed `sl.reshard` use them for CUDA tensors.

    Examples:
        >>> import shardlib as sl, torch
        >>> sl.cuda.available() == (torch.cuda.is_available() and sl.cuda.gpu_problem() is None)
        True
    """
    try:
        _compile.require_extra("sl.cuda.available()")
    except CudaNotInstalledError:
        return False
    return gpu_problem() is None


@functools.cache
def gpu_problem() -> str | None:
    """Why kernels cannot launch in this process (no driver, no GPU, a CPU build of torch),
    or None when they can. Needs the extra; probed once per process."""
    _compile.require_extra("sl.cuda.gpu_problem()")
    from cuda.bindings import driver

    try:
        (err,) = driver.cuInit(0)
    except Exception as exc:  # the driver library itself is missing
        return f"no NVIDIA driver found ({type(exc).__name__}: {exc})"
    if err != driver.CUresult.CUDA_SUCCESS:
        return f"the CUDA driver did not initialise (cuInit: {err!r}); no usable GPU"
    err, count = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return "the CUDA driver sees no GPU"
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} cannot use the GPU (a CPU build, or a CUDA version "
            "the driver does not support)"
        )
    return None


# == arguments ==================================================================
def _scalar(value: Any, param: Any, label: str, problems: list[str]) -> Any:
    want = param.dtype
    name = f"np.{want.__name__}"
    if isinstance(value, np.generic):
        if type(value) is not want:
            problems.append(
                f"{label} is a np.{type(value).__name__}, the kernel's parameter is {name} "
                f"(mismatched types). Fix: pass {name}({param.name})"
            )
        return value
    integer = np.issubdtype(want, np.integer)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{label} must be a {name} scalar, got {type(value).__name__}")
        return None
    if integer:
        info = np.iinfo(want)
        if not isinstance(value, int) or not info.min <= value <= info.max:
            problems.append(f"{label} must be an integer in {name}'s range, got {value!r}")
            return None
    return want(value)


def check_args(kernel: Any, args: tuple, where: str) -> tuple[list[Any], set, list[str]]:
    """(the values to pass, the tensors' devices, every problem found)."""
    params = kernel.params
    problems: list[str] = []
    if len(args) != len(params):
        problems.append(
            f"it takes {len(params)} arguments ({', '.join(map(str, params))}), got {len(args)}"
        )
    values: list[Any] = []
    devices: set = set()
    for i, (p, a) in enumerate(zip(params, args)):
        label = f"argument {i} ({p.name!r})"
        if not p.is_tensor:
            values.append(_scalar(a, p, label, problems))
            continue
        if a is None and p.optional:
            values.append(0)  # a null pointer
            continue
        if not isinstance(a, torch.Tensor):
            problems.append(f"{label} must be a torch.Tensor of {p.dtype}, got {type(a).__name__}")
            values.append(None)
            continue
        if a.dtype != p.dtype:
            problems.append(
                f"{label} is {a.dtype}, the kernel's parameter is {p.dtype} (mismatched "
                f"dtypes). Fix: pass {p.name}.to({p.dtype})"
            )
        if a.device.type != "cuda":
            problems.append(
                f"{label} is a {a.device.type} tensor; a CUDA kernel reads GPU memory. "
                f"Fix: pass {p.name}.cuda()"
            )
        else:
            devices.add(a.device)
        if not a.is_contiguous():
            problems.append(
                f"{label} is not contiguous (shape {tuple(a.shape)}, strides {a.stride()}); "
                f"the kernel reads flat memory. Fix: pass {p.name}.contiguous()"
            )
        values.append(a.data_ptr())
    if len(devices) > 1:
        problems.append(
            f"the tensors are on {len(devices)} devices ({', '.join(sorted(map(str, devices)))}); "
            "a launch runs on one. Fix: move them to one device"
        )
    return values, devices, problems


# == launching ==================================================================
class _TorchStream:
    """A torch stream seen through the ``__cuda_stream__`` protocol cuda.core accepts."""

    __slots__ = ("stream",)

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, int(self.stream.cuda_stream))


_loaded: dict[tuple[str, str, int, int], Any] = {}  # (file, source, arch, device) -> function


def _function(kernel: Any, device_index: int) -> Any:
    from cuda.core import Device, ObjectCode

    dev = Device(device_index)
    dev.set_current()  # the primary context, which torch uses too
    major, minor = dev.compute_capability
    cc = major * 10 + minor
    source = kernel.source
    key = (kernel.name, source, cc, device_index)
    fn = _loaded.get(key)
    if fn is None:
        cubin = kernel.compile((major, minor), "cubin")
        module = ObjectCode.from_cubin(cubin, name=kernel.source_file)
        fn = _loaded[key] = module.get_kernel(kernel.entry)
    return fn


def launch(kernel: Any, grid: Any, block: Any, args: tuple, stream: Any) -> None:
    """`Kernel.launch` (see there)."""
    where = f"sl.cuda.kernels()[{kernel.name!r}].launch(grid={grid!r}, block={block!r}, ...)"
    _compile.require_extra(where)
    values, devices, problems = check_args(kernel, args, where)
    gpu = gpu_problem()
    if gpu is not None:
        problems.insert(0, f"no CUDA driver/GPU found: {gpu}")
    if problems:
        fix = f" {_NO_GPU_FIX}" if gpu is not None else ""
        text = "\n  - ".join(problems)
        cls = NoGpuError if gpu is not None else KernelArgumentError
        raise cls(f"{where}: cannot launch:\n  - {text}.{fix}")
    from cuda.core import LaunchConfig
    from cuda.core import launch as cuda_launch

    device = next(iter(devices)) if devices else torch.device("cuda", torch.cuda.current_device())
    index = device.index if device.index is not None else torch.cuda.current_device()
    # torch's device guard: making the device's primary context current (cuda.core's
    # set_current) is then no change for torch, and its current device comes back after
    with torch.cuda.device(index):
        fn = _function(kernel, index)
        torch_stream = stream if stream is not None else torch.cuda.current_stream(index)
        cuda_launch(_TorchStream(torch_stream), LaunchConfig(grid=grid, block=block), fn, *values)
