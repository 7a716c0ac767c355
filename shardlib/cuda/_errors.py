"""The errors `shardlib.cuda` raises: one base class, one subclass per kind of problem.

Each also derives from the builtin a caller would expect (a missing extra is an
`ImportError`, a bad argument a `TypeError`, an unsupported arch a `ValueError`), so
``except ImportError`` around optional CUDA code keeps working.
"""

from __future__ import annotations

from .._errors import ShardlibError

INSTALL_HINT = 'pip install "shardlib[cuda]"'


class CudaError(ShardlibError, RuntimeError):
    """Base class of the errors of `shardlib.cuda`."""


class CudaNotInstalledError(CudaError, ImportError):
    """The optional extra (cuda-core, cuda-bindings, the NVRTC wheel) is not importable."""


class NoGpuError(CudaError):
    """A launch needs a CUDA driver and a GPU that this process cannot find."""


class ArchError(CudaError, ValueError):
    """A compile for an architecture NVRTC or the kernel does not support."""


class KernelCompileError(CudaError):
    """NVRTC rejected a kernel source (the message holds its log)."""


class KernelArgumentError(CudaError, TypeError):
    """A launch with arguments that do not fit the kernel's parameters."""
