"""The kernel registry: `Kernel` (one ``extern "C"`` entry point of a shipped ``.cu`` file)
and `kernels()` (name -> Kernel).

Owns what each kernel is: its source file under ``shardlib/cuda/kernels/`` (a local
``#include "x.cuh"`` is spliced in, so the source text -- and the cache key -- covers it),
its entry point, its parameters (names, tensor dtypes, scalar types: what `launch`
checks), the oldest architecture it compiles for, and its torch reference. Compiling is
`_compile.py`'s, launching `_launch.py`'s; the thin torch-facing wrappers are `_ops.py`
and `_adamw.py`.

Kernels sharing a file share one compiled module: compiling ``quantize_int8`` also builds
``dequantize_int8`` (one cache entry).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pathlib
import re
from typing import Any

import numpy as np
import torch

from . import _adamw, _compile
from ._errors import ArchError

KERNEL_DIR = pathlib.Path(__file__).with_name("kernels")
_INCLUDE = re.compile(r'^#include "([^"]+)"$', flags=re.M)


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    """One kernel parameter: a tensor pointer of `dtype` (``optional``: None passes a null
    pointer) or a scalar of the numpy type `dtype`."""

    name: str
    dtype: Any  # torch.dtype for tensors, a numpy scalar type for scalars
    optional: bool = False

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.dtype, torch.dtype)

    def __str__(self) -> str:
        kind = str(self.dtype) if self.is_tensor else f"np.{self.dtype.__name__}"
        return f"{self.name}: {kind}{' | None' if self.optional else ''}"


@dataclasses.dataclass(frozen=True, slots=True)
class Kernel:
    """A CUDA kernel shipped with shardlib, with its torch reference.

    Attributes:
        name: the registry name (also the ``extern "C"`` entry point).
        source_file: the ``.cu`` file under ``shardlib/cuda/kernels/``.
        params: the entry point's parameters, in order.
        min_arch: the oldest compute capability it compiles for (89 means sm_89), or None.
        reference_path: the torch reference, ``"module:function"`` (with `reference_kwargs`).

    Examples:
        >>> import shardlib as sl
        >>> k = sl.cuda.kernels()["quantize_fp8"]
        >>> k.source_file, k.min_arch, [p.name for p in k.params]
        ('quant_fp8.cu', 89, ['x', 'q', 'scales', 'n', 'block'])
        >>> k.compile("sm_90")[:4]
        b'\\x7fELF'
    """

    name: str
    source_file: str
    params: tuple[Param, ...]
    min_arch: int | None
    reference_path: str
    reference_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def entry(self) -> str:
        return self.name

    @property
    def source(self) -> str:
        """The CUDA C++ source NVRTC compiles (local includes spliced in)."""
        return _read_source(KERNEL_DIR / self.source_file)

    @property
    def reference(self) -> Any:
        """The torch function computing what the kernel computes (CPU or CUDA tensors)."""
        module, _, attr = self.reference_path.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        return functools.partial(fn, **dict(self.reference_kwargs)) if self.reference_kwargs else fn

    def compile(self, arch: Any, target: str = "cubin") -> bytes:
        """The kernel's module compiled for `arch`: a cubin (an ELF image, through cuda.core's
        ``Program``) or PTX text (through ``cuda.bindings.nvrtc``), from the disk cache when
        an equal compile (source, arch, options, NVRTC version) ran before. Needs no GPU.

        Args:
            arch: ``"sm_90"``, ``90`` or ``(9, 0)``.
            target: ``"cubin"`` or ``"ptx"``.

        Raises:
            ArchError: `arch` is below `min_arch` or not one NVRTC supports (the message
                lists those it does).
            CudaNotInstalledError: without the ``shardlib[cuda]`` extra.
        """
        where = f"sl.cuda.kernels()[{self.name!r}].compile(arch={arch!r}, target={target!r})"
        if target not in _compile.TARGETS:
            raise ArchError(f"{where}: target must be one of {_compile.TARGETS}.")
        _compile.require_extra(where)
        cc, suffix = _compile.check_arch(arch, where, min_arch=self.min_arch)
        return _compile.compile_source(self.source, self.source_file, cc, suffix, target)

    def launch(self, grid: Any, block: Any, *args: Any, stream: Any = None) -> None:
        """Launch on `stream` (default: torch's current CUDA stream of the tensors' device).

        Args:
            grid, block: ints or tuples of up to 3 ints (blocks in the grid, threads per
                block).
            *args: one per `params` entry: contiguous CUDA tensors of the parameter's dtype
                (their ``data_ptr()`` is passed), and scalars (numpy scalars of the
                parameter's type, or Python numbers, converted).
            stream: a ``torch.cuda.Stream``.

        Raises:
            NoGpuError: no CUDA driver or GPU (every argument problem is listed too).
            KernelArgumentError: CPU tensors, wrong dtypes or scalar types, a wrong count.
        """
        from ._launch import launch

        launch(self, grid, block, args, stream)

    def __repr__(self) -> str:
        return f"Kernel({self.name!r}, {self.source_file!r})"

    def __str__(self) -> str:
        arch = f", sm_{self.min_arch}+" if self.min_arch else ""
        return f"{self.name}({', '.join(map(str, self.params))}) [{self.source_file}{arch}]"


@functools.cache
def _parsed(path: pathlib.Path, mtime_ns: int) -> tuple[str, tuple[str, ...]]:
    """A file's text and the local files it includes (``mtime_ns`` in the key only: an
    edited file is read again)."""
    del mtime_ns
    text = path.read_text()
    return text, tuple(_INCLUDE.findall(text))


@functools.cache
def _splice(text: str, included: tuple[str, ...]) -> str:
    parts = iter(included)
    return _INCLUDE.sub(lambda m: next(parts), text)


def _read_source(path: pathlib.Path) -> str:
    """`path`'s text with each ``#include "x.cuh"`` line replaced by that file's source
    (recursively); one stat per file per call, the rest cached."""
    text, includes = _parsed(path, path.stat().st_mtime_ns)
    if not includes:
        return text
    return _splice(text, tuple(_read_source(path.with_name(name)) for name in includes))


# == the registry ===============================================================
_QUANT = "shardlib.cuda._quant"


def _quant_kernels(fmt: str, qdtype: torch.dtype, min_arch: int | None) -> list[Kernel]:
    f32, i64, i32 = torch.float32, np.int64, np.int32
    src = f"quant_{fmt}.cu"
    fmt_kw = (("fmt", fmt),)
    return [
        Kernel(
            f"quantize_{fmt}",
            src,
            (Param("x", f32), Param("q", qdtype), Param("scales", f32))
            + (Param("n", i64), Param("block", i32)),
            min_arch,
            f"{_QUANT}:quantize",
            fmt_kw,
        ),
        Kernel(
            f"dequantize_{fmt}",
            src,
            (Param("q", qdtype), Param("scales", f32), Param("y", f32))
            + (Param("n", i64), Param("block", i32)),
            min_arch,
            f"{_QUANT}:dequantize",
        ),
        Kernel(
            f"dequantize_reduce_{fmt}",
            src,
            (Param("q", qdtype), Param("scales", f32), Param("y", f32))
            + (Param("n", i64), Param("block", i32), Param("k", i32)),
            min_arch,
            f"{_QUANT}:dequantize_reduce",
        ),
    ]


def _registry() -> dict[str, Kernel]:
    f32 = np.float32
    adamw = Kernel(
        "adamw_flat",
        "adamw.cu",
        (
            Param("param", torch.float32),
            Param("grad", torch.float32),
            Param("exp_avg", torch.float32),
            Param("exp_avg_sq", torch.float32),
            Param("param_bf16", torch.bfloat16, optional=True),
            Param("n", np.int64),
        )
        + tuple(Param(name, f32) for name in _adamw.SCALARS),
        80,  # cvt.rn.bf16.f32
        "shardlib.cuda._adamw:adamw_flat_reference",
    )
    ks = _quant_kernels("int8", torch.int8, None) + _quant_kernels("fp8", torch.float8_e4m3fn, 89)
    return {k.name: k for k in [*ks, adamw]}


_KERNELS = _registry()  # pure data: no CUDA import, no compile


def kernels() -> dict[str, Kernel]:
    """shardlib's CUDA kernels by name: blockwise int8 / fp8 quantize, dequantize and
    dequantize-reduce (compressed collectives) and ``adamw_flat`` (the fused optimizer).

    Raises `CudaNotInstalledError` (an ImportError) naming ``pip install "shardlib[cuda]"``
    when the optional extra is missing. Nothing is compiled until a kernel's `compile` or
    `launch` runs.

    Examples:
        >>> import shardlib as sl
        >>> sorted(sl.cuda.kernels())  # doctest: +NORMALIZE_WHITESPACE
        ['adamw_flat', 'dequantize_fp8', 'dequantize_int8', 'dequantize_reduce_fp8',
         'dequantize_reduce_int8', 'quantize_fp8', 'quantize_int8']
    """
    _compile.require_extra("sl.cuda.kernels()")
    return dict(_KERNELS)
