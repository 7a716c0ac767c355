"""shardlib.cuda: CUDA C++ kernels shipped with shardlib, compiled and cached without a GPU,
launched on torch's streams (DESIGN §10).

`kernels()` maps names to `Kernel` objects: ``extern "C"`` sources under ``kernels/``,
each with its torch reference (which CPU runs use and tests compare with). A kernel
compiles for any architecture NVRTC supports, GPU or not -- ``kernel.compile("sm_90")``
returns a cubin (an ELF image) and ``kernel.compile("sm_90", target="ptx")`` PTX text --
through cuda.core's program cache on disk (`compile_cache()`), keyed by source, arch,
options and NVRTC version. ``kernel.launch(grid, block, *args)`` runs it on torch's
current CUDA stream. `available()` says whether this process can launch.

The kernels need the optional extra, ``pip install "shardlib[cuda]"`` (cuda-core,
cuda-bindings 13 and the NVRTC 13 wheel). Importing shardlib never imports it or compiles
anything: the first `kernels()` call imports it, and raises `CudaNotInstalledError` (an
ImportError naming the pip command) when it is missing.

Examples:
    >>> import shardlib as sl
    >>> q8 = sl.cuda.kernels()["quantize_int8"]
    >>> q8.compile("sm_80")[:4], b".target sm_90" in q8.compile("sm_90", target="ptx")
    (b'\\x7fELF', True)
"""

from ._compile import CompileCache as CompileCache
from ._compile import compile_cache as compile_cache
from ._compile import nvrtc_version as nvrtc_version
from ._compile import supported_archs as supported_archs
from ._errors import ArchError as ArchError
from ._errors import CudaError as CudaError
from ._errors import CudaNotInstalledError as CudaNotInstalledError
from ._errors import KernelArgumentError as KernelArgumentError
from ._errors import KernelCompileError as KernelCompileError
from ._errors import NoGpuError as NoGpuError
from ._kernel import Kernel as Kernel
from ._kernel import Param as Param
from ._kernel import kernels as kernels
from ._launch import available as available
from ._launch import gpu_problem as gpu_problem
