"""Compiling kernel sources: NVRTC through cuda.core and cuda.bindings, and the disk cache.

Owns: the import of the optional extra (`require_extra`: the one place that says what to
install), architecture names (`parse_arch`, the architectures this NVRTC supports), the
compile of a source to a cubin (cuda.core's ``Program(src, "c++", ProgramOptions(arch=
sm_XY)).compile("cubin")``) or to PTX (``cuda.bindings.nvrtc`` with ``compute_XY``), and
the persistent cache in front of both. It does not own the registry (`_kernel.py`) or
launches (`_launch.py`), and it never needs a driver or a GPU.

The cache is cuda.core's own (`cuda.core.utils.FileStreamProgramCache`: one file per
entry, atomic writes, safe across processes) keyed by
`cuda.core.utils.make_program_cache_key`, which digests the source text, the target, the
options (the arch among them) and the NVRTC version. Its directory is ``$SHARDLIB_CACHE/
cuda`` when that is set, else ``$XDG_CACHE_HOME/shardlib/cuda`` (``~/.cache/shardlib/
cuda``). `compile_cache()` returns the cache of the current directory, whose ``hits`` and
``misses`` count this process's lookups. (A cuda.core older than 1.2 has no program
cache: a directory of atomically written files keyed by a digest of the same inputs
stands in.)

Invariants: nothing here runs at import (importing shardlib never imports cuda-python);
equal inputs give equal keys in every process; a cache entry is exactly the bytes NVRTC
returned.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import tempfile
from typing import Any

from ._errors import INSTALL_HINT, ArchError, CudaNotInstalledError, KernelCompileError

CXX_STANDARD = "c++17"
TARGETS = ("cubin", "ptx")


# == the optional extra =========================================================
def require_extra(where: str) -> Any:
    """The `cuda.core` module, or `CudaNotInstalledError` saying what to install."""
    try:
        import cuda.bindings.nvrtc  # noqa: F401
        import cuda.core
        import cuda.core.utils  # noqa: F401
    except ImportError as exc:  # a wheel is missing, or built for another CUDA major
        raise CudaNotInstalledError(_missing(where, f"it does not import here ({exc})")) from exc
    problem = _nvrtc_load_problem()
    if problem is not None:
        raise CudaNotInstalledError(_missing(where, problem))
    return cuda.core


def _missing(where: str, why: str) -> str:
    return (
        f"{where}: shardlib's CUDA kernels need the optional extra (cuda-core, "
        f"cuda-bindings 13 and the NVRTC 13 wheel, nvidia-cuda-nvrtc); {why}. "
        f"Fix: {INSTALL_HINT}. The torch references (shardlib.cuda._quant, "
        "shardlib.cuda._adamw) work without it."
    )


@functools.cache
def _nvrtc_load_problem() -> str | None:
    """Why the NVRTC library does not load (cuda.bindings finds it only when called), or
    None; probed once per process."""
    from cuda.bindings import nvrtc

    try:
        err, *_ = nvrtc.nvrtcVersion()
    except Exception as exc:  # the library is missing or of another major
        return f"the NVRTC library does not load ({type(exc).__name__}: {exc})"
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return f"nvrtcVersion failed ({err!r})"
    return None


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library in use."""
    require_extra("sl.cuda nvrtc_version()")
    from cuda.bindings import nvrtc

    return tuple(_nvrtc_check(nvrtc.nvrtcVersion(), "nvrtcVersion"))  # type: ignore[return-value]


def supported_archs() -> tuple[int, ...]:
    """The compute capabilities this NVRTC compiles for, as ints (80 for sm_80)."""
    require_extra("sl.cuda supported_archs()")
    from cuda.bindings import nvrtc

    return tuple(_nvrtc_check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


def _nvrtc_check(result: tuple, call: str) -> Any:
    from cuda.bindings import nvrtc

    err, *values = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelCompileError(f"sl.cuda: {call} failed: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# == architectures ==============================================================
_ARCH = re.compile(r"^(?:sm_|compute_)?(\d{2,3})([af]?)$")


def parse_arch(arch: Any, where: str) -> tuple[int, str]:
    """``"sm_90"``, ``"sm_90a"``, ``90``, ``"90"`` or ``(9, 0)`` -> ``(90, "a" or "")``."""
    if isinstance(arch, tuple) and len(arch) == 2 and all(isinstance(a, int) for a in arch):
        return arch[0] * 10 + arch[1], ""
    if isinstance(arch, int) and not isinstance(arch, bool):
        arch = str(arch)
    m = _ARCH.match(arch) if isinstance(arch, str) else None
    if m is None:
        raise ArchError(
            f"{where}: arch={arch!r} is not an architecture name. Fix: pass 'sm_80', "
            "'sm_90' (or 80, 90, or torch.cuda.get_device_capability()'s (9, 0))."
        )
    return int(m.group(1)), m.group(2)


def check_arch(arch: Any, where: str, *, min_arch: int | None = None) -> tuple[int, str]:
    """`parse_arch`, then `ArchError` if NVRTC or the kernel (``min_arch``) cannot do it."""
    cc, suffix = parse_arch(arch, where)
    if min_arch is not None and cc < min_arch:
        raise ArchError(
            f"{where}: arch sm_{cc} is below this kernel's minimum sm_{min_arch} (its "
            f"instructions exist from sm_{min_arch} on). Fix: compile for sm_{min_arch} or "
            "newer, or use the int8 kernels on older GPUs."
        )
    archs = supported_archs()
    if cc not in archs:
        major, minor = nvrtc_version()
        raise ArchError(
            f"{where}: NVRTC {major}.{minor} does not compile for sm_{cc}; it supports "
            f"{', '.join(f'sm_{a}' for a in archs)}. Fix: pick one of those, or install "
            "an NVRTC wheel whose CUDA version supports your GPU."
        )
    return cc, suffix


# == the cache ==================================================================
def cache_dir() -> pathlib.Path:
    """Where compiled kernels are kept (see the module docstring)."""
    root = os.environ.get("SHARDLIB_CACHE")
    if root:
        return pathlib.Path(root) / "cuda"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "shardlib" / "cuda"


class _Files:
    """A directory of entries named by their key's digest, written atomically: the cache
    for a cuda.core older than 1.2, which has no `FileStreamProgramCache`."""

    def __init__(self, path: pathlib.Path) -> None:
        self.root = path / "entries"
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, key: bytes) -> pathlib.Path:
        return self.root / hashlib.sha256(key).hexdigest()

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._file(key).read_bytes()
        except FileNotFoundError:
            return None

    def __setitem__(self, key: bytes, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self._file(key))

    def clear(self) -> None:
        for f in self.root.iterdir():
            f.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for f in self.root.iterdir() if not f.name.startswith(".tmp"))


def _cache_key(source: str, options: Any, target: str) -> bytes:
    """cuda.core's `make_program_cache_key` (source, options with the arch, target, NVRTC
    version), or the same inputs digested here on a cuda.core without it."""
    try:
        from cuda.core.utils import make_program_cache_key
    except ImportError:
        parts = [source.encode(), target.encode(), *options.as_bytes("nvrtc")]
        parts.append(".".join(map(str, nvrtc_version())).encode())
        return hashlib.sha256(b"\0".join(parts)).digest()
    return make_program_cache_key(code=source, code_type="c++", options=options, target_type=target)


class CompileCache:
    """cuda.core's `FileStreamProgramCache` at `path`, counting this process's lookups.

    ``hits`` and ``misses`` count `get` calls that found / did not find an entry. (On a
    cuda.core older than 1.2, which has none, a directory of atomically written files.)
    """

    def __init__(self, path: pathlib.Path) -> None:
        require_extra("sl.cuda compile cache")
        self.path = path
        self.hits = 0
        self.misses = 0
        try:
            from cuda.core.utils import FileStreamProgramCache
        except ImportError:
            self._files: Any = _Files(path)
        else:
            self._files = FileStreamProgramCache(path)

    def get(self, key: bytes) -> bytes | None:
        data = self._files.get(key)
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    def put(self, key: bytes, data: bytes) -> None:
        self._files[key] = data

    def clear(self) -> None:
        """Remove every entry (the counters stay)."""
        self._files.clear()

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"CompileCache({str(self.path)!r}, hits={self.hits}, misses={self.misses})"


_caches: dict[pathlib.Path, CompileCache] = {}  # one per directory, keyed by its path


def compile_cache() -> CompileCache:
    """The cache of the current `cache_dir()` (``$SHARDLIB_CACHE`` is read on every call).

    Examples:
        >>> import shardlib as sl
        >>> cache = sl.cuda.compile_cache()
        >>> cache.path.name
        'cuda'
    """
    path = cache_dir()
    cache = _caches.get(path)
    if cache is None:
        cache = _caches[path] = CompileCache(path)
    return cache


# == compiling ==================================================================
def program_options(cc: int, suffix: str, target: str) -> Any:
    """cuda.core `ProgramOptions` for ``sm_XY`` (cubin) or ``compute_XY`` (PTX)."""
    from cuda.core import ProgramOptions

    prefix = "sm" if target == "cubin" else "compute"
    return ProgramOptions(arch=f"{prefix}_{cc}{suffix}", std=CXX_STANDARD)


def compile_source(source: str, name: str, cc: int, suffix: str, target: str) -> bytes:
    """`source` compiled for ``sm_{cc}{suffix}`` to `target`, through the cache."""
    options = program_options(cc, suffix, target)
    key = _cache_key(source, options, target)
    cache = compile_cache()
    data = cache.get(key)
    if data is None:
        data = (
            _compile_cubin(source, name, options)
            if target == "cubin"
            else _compile_ptx(source, name, options)
        )
        cache.put(key, data)
    return data


def _compile_cubin(source: str, name: str, options: Any) -> bytes:
    from cuda.core import Program

    try:
        obj = Program(source, "c++", options).compile("cubin")
    except Exception as exc:  # cuda.core raises its nvrtc error with the log attached
        raise KernelCompileError(
            f"sl.cuda: NVRTC could not compile {name} for {options.arch}:\n{exc}"
        ) from exc
    return bytes(obj.code)


def _compile_ptx(source: str, name: str, options: Any) -> bytes:
    from cuda.bindings import nvrtc

    prog = _nvrtc_check(
        nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram"
    )
    try:
        opts = options.as_bytes("nvrtc")
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _nvrtc_check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            _nvrtc_check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise KernelCompileError(
                f"sl.cuda: NVRTC could not compile {name} to PTX for {options.arch} "
                f"({err!r}):\n{log.decode(errors='replace').rstrip(chr(0))}"
            )
        size = _nvrtc_check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        ptx = b" " * size
        _nvrtc_check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx.rstrip(b"\0")
