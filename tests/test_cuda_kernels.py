"""shardlib.cuda without a GPU: the registry, NVRTC compiles and their cache, launch errors,
the missing-extra message, and the fused AdamW reference against torch.optim.AdamW.

Every kernel compiles for sm_80 and sm_90 to a cubin (an ELF image naming the kernel) and
to PTX (``.target sm_90``, the entry point); the fp8 kernels for sm_89 and sm_90, with an
error for sm_80. The kernels' C signatures (parsed from the shipped sources) match the
registry's parameters. Compiles go through a temporary cache directory (one per module,
so each kernel compiles once per session); the cache tests use their own directory and
count hits and misses. GPU launches are tests/test_cuda_gpu.py's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import shardlib as sl
from shardlib.cuda import _kernel
from shardlib.cuda._adamw import adamw_flat_cuda, adamw_flat_reference

pytest.importorskip(
    "cuda.core", reason='the cuda extra is not installed (pip install "shardlib[cuda]")'
)

NAMES = {
    "quantize_int8",
    "dequantize_int8",
    "dequantize_reduce_int8",
    "quantize_fp8",
    "dequantize_fp8",
    "dequantize_reduce_fp8",
    "adamw_flat",
}
FP8 = sorted(n for n in NAMES if n.endswith("fp8"))
NO_GPU = pytest.mark.skipif(
    sl.cuda.available(), reason="a GPU is present: launches are tests/test_cuda_gpu.py's"
)


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    """One compile cache for the module: each (kernel file, arch, target) compiles once."""
    old = os.environ.get("SHARDLIB_CACHE")
    path = tmp_path_factory.mktemp("h10a_cuda_cache")
    os.environ["SHARDLIB_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["SHARDLIB_CACHE"]
    else:
        os.environ["SHARDLIB_CACHE"] = old


# == registry ===================================================================
def test_registry_names_files_and_references():
    ks = sl.cuda.kernels()
    assert set(ks) == NAMES
    for name, k in ks.items():
        assert isinstance(k, sl.cuda.Kernel) and k.name == k.entry == name
        assert (_kernel.KERNEL_DIR / k.source_file).is_file()
        assert k.min_arch == (89 if name.endswith("fp8") else 80 if name == "adamw_flat" else None)
    from shardlib.cuda._adamw import adamw_flat_reference

    assert ks["adamw_flat"].reference is adamw_flat_reference


_C_TYPES = {
    "const float*": torch.float32,
    "float*": torch.float32,
    "const signed char*": torch.int8,
    "signed char*": torch.int8,
    "const unsigned char*": torch.float8_e4m3fn,
    "unsigned char*": torch.float8_e4m3fn,
    "unsigned short*": torch.bfloat16,
    "i64": np.int64,
    "int": np.int32,
    "float": np.float32,
}


def _c_signature(source: str, entry: str) -> list[tuple[str, str]]:
    m = re.search(r'extern "C" __global__ void ' + entry + r"\((.*?)\)\s*\{", source, re.S)
    assert m, f"no extern C entry point {entry}"
    out = []
    for decl in m.group(1).split(","):
        decl = " ".join(decl.replace("__restrict__", "").split())
        ctype, _, pname = decl.rpartition(" ")
        out.append((ctype.replace(" *", "*"), pname))
    return out


@pytest.mark.parametrize("name", sorted(NAMES))
def test_registry_parameters_match_the_c_signature(name):
    k = sl.cuda.kernels()[name]
    sig = _c_signature(k.source, name)
    assert [p for _, p in sig] == [p.name for p in k.params]
    assert [_C_TYPES[c] for c, _ in sig] == [p.dtype for p in k.params]


def test_sources_splice_local_includes():
    src = sl.cuda.kernels()["quantize_int8"].source
    assert not re.search(r"^#include", src, re.M) and "block_absmax" in src  # quant_common.cuh


# == compiling ==================================================================
def _elf_names(cubin: bytes) -> bytes:
    assert cubin[:4] == b"\x7fELF"
    return cubin


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", sorted(NAMES - set(FP8)))
def test_compiles_to_cubin_and_ptx(name, arch):
    k = sl.cuda.kernels()[name]
    cubin = k.compile(arch)
    assert cubin[:4] == b"\x7fELF" and name.encode() in cubin
    ptx = k.compile(arch, target="ptx").decode()
    assert re.search(r"^\.version \d+\.\d+$", ptx, re.M)
    assert re.search(rf"^\.target {arch}$", ptx, re.M)
    assert f".visible .entry {name}(" in ptx


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
@pytest.mark.parametrize("name", FP8)
def test_fp8_compiles_from_sm89(name, arch):
    k = sl.cuda.kernels()[name]
    assert k.compile(arch)[:4] == b"\x7fELF"
    ptx = k.compile(arch, target="ptx").decode()
    assert f".target {arch}" in ptx and "e4m3x2" in ptx
    with pytest.raises(sl.cuda.ArchError, match=r"sm_80 is below this kernel's minimum sm_89"):
        k.compile("sm_80")


def test_arch_spellings_and_errors():
    k = sl.cuda.kernels()["dequantize_int8"]
    assert k.compile(90) == k.compile((9, 0)) == k.compile("sm_90")
    supported = sl.cuda.supported_archs()
    assert 80 in supported and 90 in supported
    unsupported = next(a for a in (70, 60, 52, 35) if a not in supported)
    with pytest.raises(sl.cuda.ArchError) as e:
        k.compile(f"sm_{unsupported}")
    msg = str(e.value)
    assert f"does not compile for sm_{unsupported}" in msg
    assert ", ".join(f"sm_{a}" for a in supported) in msg  # the supported list, from NVRTC
    with pytest.raises(sl.cuda.ArchError, match="not an architecture name"):
        k.compile("hopper")
    with pytest.raises(sl.cuda.ArchError, match="target must be one of"):
        k.compile("sm_90", target="sass")


def test_compile_error_shows_the_nvrtc_log(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void bad(float* x) { x[0] = undefined_name; }\n')
    k = sl.cuda.Kernel("bad", str(bad), (_kernel.Param("x", torch.float32),), None, "x:y")
    for target in ("cubin", "ptx"):
        with pytest.raises(sl.cuda.KernelCompileError, match="undefined_name"):
            k.compile("sm_90", target=target)


# == the cache ==================================================================
def _tmp_kernel(path, body="x[0] = 1.0f;"):
    path.write_text(f'extern "C" __global__ void tmp_kernel(float* x) {{ {body} }}\n')
    return sl.cuda.Kernel("tmp_kernel", str(path), (_kernel.Param("x", torch.float32),), None, "")


def test_second_compile_hits_and_a_source_change_misses(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDLIB_CACHE", str(tmp_path / "cache"))
    cache = sl.cuda.compile_cache()
    assert cache.path == tmp_path / "cache" / "cuda" and len(cache) == 0
    k = _tmp_kernel(tmp_path / "k.cu")
    first = k.compile("sm_90")
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    assert k.compile("sm_90") == first
    assert (cache.hits, cache.misses) == (1, 1)
    k.compile("sm_90", target="ptx")  # another target: another entry
    k.compile("sm_80")  # another arch: another entry
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 3)
    _tmp_kernel(tmp_path / "k.cu", body="x[0] = 2.0f;")  # the source changes
    changed = k.compile("sm_90")
    assert (cache.hits, cache.misses, len(cache)) == (1, 4, 4)
    assert changed != first
    # a registry kernel whose source is monkeypatched misses too
    real = sl.cuda.kernels()["dequantize_int8"]
    real.compile("sm_90")
    misses = cache.misses
    monkeypatch.setattr(
        _kernel, "_read_source", lambda path, _real=_kernel._read_source: _real(path) + "\n// x"
    )
    real.compile("sm_90")
    assert cache.misses == misses + 1


def test_cache_key_covers_the_nvrtc_version(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDLIB_CACHE", str(tmp_path))
    cache = sl.cuda.compile_cache()
    k = _tmp_kernel(tmp_path / "k.cu")
    k.compile("sm_90")
    k.compile("sm_90")
    assert (cache.hits, cache.misses) == (1, 1)
    from cuda.core.utils._program_cache import _keys

    major, minor = _keys._nvrtc_version()
    monkeypatch.setattr(_keys, "_nvrtc_version", lambda: (major, minor + 1))
    k.compile("sm_90")
    assert (cache.hits, cache.misses) == (1, 2)


def test_cache_without_cuda_core_s_program_cache(tmp_path, monkeypatch):
    """A cuda.core older than 1.2 has no FileStreamProgramCache: the directory cache keys on
    the same inputs (a second compile hits, another arch or a source change misses)."""
    import cuda.core.utils

    monkeypatch.delattr(cuda.core.utils, "FileStreamProgramCache")
    monkeypatch.delattr(cuda.core.utils, "make_program_cache_key")
    monkeypatch.setenv("SHARDLIB_CACHE", str(tmp_path))
    cache = sl.cuda.compile_cache()
    k = _tmp_kernel(tmp_path / "k.cu")
    first = k.compile("sm_90")
    assert k.compile("sm_90") == first and first[:4] == b"\x7fELF"
    k.compile("sm_80")
    _tmp_kernel(tmp_path / "k.cu", body="x[0] = 3.0f;")
    k.compile("sm_90")
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 3)


def test_import_compiles_nothing_and_the_cache_persists(module_cache):
    """In a fresh process: `import shardlib` imports no cuda.core and creates no cache;
    without the extra `sl.cuda.kernels()` names the pip command; with it, a kernel this
    session compiled comes from the disk cache (a hit, no miss)."""
    sl.cuda.kernels()["quantize_int8"].compile("sm_90")
    fresh = module_cache.parent / "h10a_fresh_cache"
    code = textwrap.dedent(
        f"""
        import os, sys
        os.environ["SHARDLIB_CACHE"] = {str(fresh)!r}
        import shardlib as sl
        assert "cuda.core" not in sys.modules, "import shardlib imported cuda.core"
        assert not os.path.exists({str(fresh)!r}), "import shardlib created a cache"
        for m in ("cuda.core", "cuda.core.utils", "cuda.bindings.nvrtc"):
            sys.modules[m] = None  # the extra is missing
        try:
            sl.cuda.kernels()
        except ImportError as e:
            print("ERROR", type(e).__name__, e)
        assert not sl.cuda.available()
        for m in ("cuda.core", "cuda.core.utils", "cuda.bindings.nvrtc"):
            del sys.modules[m]
        os.environ["SHARDLIB_CACHE"] = {str(module_cache)!r}
        sl.cuda.kernels()["quantize_int8"].compile("sm_90")
        c = sl.cuda.compile_cache()
        print("CACHE", c.hits, c.misses)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "ERROR CudaNotInstalledError sl.cuda.kernels(): " in out
    assert 'Fix: pip install "shardlib[cuda]"' in out
    assert "CACHE 1 0" in out


def test_without_the_extra_kernels_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.core", None)
    with pytest.raises(ImportError, match=re.escape('pip install "shardlib[cuda]"')) as e:
        sl.cuda.kernels()
    assert isinstance(e.value, sl.cuda.CudaNotInstalledError)
    assert sl.cuda.available() is False
    k = _kernel._KERNELS["quantize_int8"]
    with pytest.raises(sl.cuda.CudaNotInstalledError, match="shardlib.cuda"):
        k.compile("sm_90")
    with pytest.raises(sl.cuda.CudaNotInstalledError):
        k.launch(1, 32)


def test_an_nvrtc_library_that_does_not_load_says_what_to_install(monkeypatch):
    from shardlib.cuda import _compile

    monkeypatch.setattr(_compile, "_nvrtc_load_problem", lambda: "the NVRTC library does not load")
    with pytest.raises(sl.cuda.CudaNotInstalledError) as e:
        sl.cuda.kernels()
    msg = str(e.value)
    assert "the NVRTC library does not load" in msg and "nvidia-cuda-nvrtc" in msg
    assert 'Fix: pip install "shardlib[cuda]"' in msg
    assert sl.cuda.available() is False


# == launching ==================================================================
def _launch_error_type():
    return sl.cuda.KernelArgumentError if sl.cuda.available() else sl.cuda.NoGpuError


def test_launch_lists_every_argument_problem():
    k = sl.cuda.kernels()["quantize_int8"]
    x = torch.randn(8)
    with pytest.raises(sl.cuda.CudaError) as e:
        k.launch(1, 32, x, torch.empty(8), torch.empty(1), np.int64(8), np.float64(256.0))
    assert type(e.value) is _launch_error_type()
    msg = str(e.value)
    assert "argument 0 ('x') is a cpu tensor" in msg and "Fix: pass x.cuda()" in msg
    assert "argument 1 ('q') is torch.float32, the kernel's parameter is torch.int8" in msg
    assert "argument 4 ('block') is a np.float64, the kernel's parameter is np.int32" in msg
    with pytest.raises(sl.cuda.CudaError, match=r"it takes 5 arguments \(x: torch.float32,"):
        k.launch(1, 32, x)
    with pytest.raises(sl.cuda.CudaError, match=r"argument 0 \('x'\) is not contiguous"):
        k.launch(1, 32, torch.randn(4, 4).t(), None, None, 16, 256)


@NO_GPU
def test_launch_without_a_driver_says_so():
    assert not sl.cuda.available()
    problem = sl.cuda.gpu_problem()
    assert problem is not None
    with pytest.raises(sl.cuda.NoGpuError) as e:
        sl.cuda.kernels()["dequantize_int8"].launch(
            1, 32, torch.zeros(4, dtype=torch.int8), torch.ones(1), torch.empty(4), 4, 256
        )
    msg = str(e.value)
    assert f"no CUDA driver/GPU found: {problem}" in msg
    assert "Fix: run on a machine with an NVIDIA GPU" in msg
    with pytest.raises(sl.cuda.NoGpuError):
        adamw_flat_cuda(*(torch.zeros(3) for _ in range(4)), lr=0.1, step=1)
    from shardlib.cuda import _ops

    with pytest.raises(sl.cuda.NoGpuError):
        _ops.quantize_cuda(torch.randn(300), "int8", 256)


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:0 (only the launch glue reads its memory)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """The launch path with a pretend sm_90 GPU: the driver-facing cuda.core calls (Device,
    ObjectCode, launch) and torch's stream are stand-ins that record what they are given."""
    import cuda.core

    from shardlib.cuda import _launch

    launches = []

    class Device:
        compute_capability = (9, 0)

        def __init__(self, index):
            self.index = index

        def set_current(self):
            launches.append(("set_current", self.index))

    class ObjectCode:
        @staticmethod
        def from_cubin(cubin, name):
            launches.append(("load", name))
            return ObjectCode(cubin, name)

        def __init__(self, cubin, name):
            self.cubin, self.name = cubin, name

        def get_kernel(self, entry):
            return ("function", self.name, entry, self.cubin)

    class Stream:
        cuda_stream = 0xABC

    def launch(stream, config, fn, *args):
        launches.append((stream.__cuda_stream__(), config.grid, config.block, fn, args))

    monkeypatch.setattr(_launch, "gpu_problem", lambda: None)
    monkeypatch.setattr(_launch, "_loaded", {})
    monkeypatch.setattr(cuda.core, "Device", Device)
    monkeypatch.setattr(cuda.core, "ObjectCode", ObjectCode)
    monkeypatch.setattr(cuda.core, "launch", launch)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: Stream())

    class DeviceGuard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            launches.append(("torch.cuda.device", self.index))

        def __exit__(self, *exc):
            launches.append(("torch.cuda.device exit", self.index))

    monkeypatch.setattr(torch.cuda, "device", DeviceGuard)
    real_empty = torch.empty
    monkeypatch.setattr(
        torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k).as_subclass(_FakeCuda)
    )
    return launches


def test_launch_glue_with_a_pretend_gpu(fake_gpu):
    """What reaches cuda.core: the sm_90 cubin of the kernel's file and its entry point, the
    grid, torch's current stream, pointers and typed scalars (a null pointer for None),
    all inside torch's device guard; the module is loaded once."""
    from shardlib.cuda import _ops
    from shardlib.cuda._adamw import adamw_flat_cuda

    x = torch.randn(3000).as_subclass(_FakeCuda)
    q, scales = _ops.quantize_cuda(x, "int8", 256)
    guard, (_, dev), load, (stream, grid, block, fn, args), guard_exit = fake_gpu
    assert guard == ("torch.cuda.device", 0) and guard_exit == ("torch.cuda.device exit", 0)
    assert load == ("load", "quant_int8.cu")
    assert dev == 0 and stream == (0, 0xABC) and grid == (2, 1, 1) and block == (256, 1, 1)
    cubin = sl.cuda.kernels()["quantize_int8"].compile("sm_90")
    assert fn == ("function", "quant_int8.cu", "quantize_int8", cubin)
    assert args[:3] == (x.data_ptr(), q.data_ptr(), scales.data_ptr())
    assert args[3:] == (3000, 256) and type(args[3]) is np.int64 and type(args[4]) is np.int32
    assert q.dtype == torch.int8 and q.shape == (3000,) and scales.shape == (12,)
    _ops.dequantize_reduce_cuda(torch.stack([q, q]), torch.stack([scales, scales]), 256)
    stream, grid, _, fn, args = fake_gpu[-2]
    assert fn[2] == "dequantize_reduce_int8" and grid == (2, 1, 1) and args[3:] == (3000, 256, 2)
    p, g, m, v = (torch.zeros(10).as_subclass(_FakeCuda) for _ in range(4))
    adamw_flat_cuda(p, g, m, v, lr=0.5, step=2, b1=0.5, weight_decay=0.1, clip=0.25)
    *_, fn, args = fake_gpu[-2]
    assert fn[1:3] == ("adamw.cu", "adamw_flat") and args[4] == 0  # no bf16 copy: null
    floats = dict(zip([p.name for p in sl.cuda.kernels()["adamw_flat"].params[6:]], args[6:]))
    assert all(type(a) is np.float32 for a in floats.values())
    assert floats["decay"] == np.float32(0.95) and floats["clip"] == np.float32(0.25)
    assert floats["step_size"] == np.float32(0.5 / 0.75)  # lr / (1 - b1^2)
    _ops.quantize_cuda(x, "int8", 256)
    assert sum(1 for e in fake_gpu if e[0] == "set_current") == 4  # once per launch
    assert sum(1 for e in fake_gpu if e[0] == "load") == 3  # once per (kernel, arch, device)


def test_wrappers_check_shapes_before_launching():
    from shardlib.cuda import _ops

    q = torch.zeros(300, dtype=torch.int8)
    with pytest.raises(sl.cuda.KernelArgumentError, match="which is 2 blocks of 256"):
        _ops.dequantize_cuda(q, torch.ones(3), 256)
    with pytest.raises(sl.cuda.KernelArgumentError, match="torch.int8 or torch.float8_e4m3fn"):
        _ops.dequantize_cuda(q.float(), torch.ones(2), 256)
    with pytest.raises(sl.cuda.KernelArgumentError, match=r"scales must be \(2, 2\)"):
        _ops.dequantize_reduce_cuda(torch.zeros(2, 300, dtype=torch.int8), torch.ones(2, 3))
    with pytest.raises(sl.cuda.KernelArgumentError, match="fmt must be one of"):
        _ops.quantize_cuda(torch.ones(3), "int4")


# == fused AdamW: the reference =================================================
def _adamw_torch(p0, grads, dtype, **hp):
    """torch.optim.AdamW (for-loop implementation) over `grads`, in `dtype`."""
    p = torch.nn.Parameter(p0.to(dtype).clone())
    opt = torch.optim.AdamW(
        [p], lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], foreach=False,
    )  # fmt: skip
    for g in grads:
        p.grad = (g * hp.get("clip", 1.0)).to(dtype)
        opt.step()
    st = opt.state[p]
    return p.detach(), st["exp_avg"], st["exp_avg_sq"]


def _adamw_ours(p0, grads, clip=1.0, **hp):
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        adamw_flat_reference(p, g, m, v, step=t, clip=clip, **hp)
    return p, m, v


HP = {"lr": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.1}


@pytest.mark.parametrize("clip", [1.0, 0.37])
def test_adamw_reference_equals_torch_adamw(clip):
    """Against torch.optim.AdamW in float32 (10 steps): within rtol 1e-6 (float32 rounding:
    torch forms exp_avg by lerp and steps by addcdiv, one rounding apart), with an absolute
    floor of 1e-8 for parameters that pass near zero (|p| ~ 1: 1e-8 is a tenth of an ulp at
    1) and 1e-7 for exp_avg, which changes sign; against torch.optim.AdamW in float64:
    within rtol 2e-6 + atol 1e-7 (10 steps of float32 rounding), the bound torch's own
    float32 run meets too."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4099, generator=gen)
    grads = [torch.randn(4099, generator=gen) for _ in range(10)]
    p, m, v = _adamw_ours(p0, grads, clip=clip, **HP)
    tp, tm, tv = _adamw_torch(p0, grads, torch.float32, clip=clip, **HP)
    torch.testing.assert_close(p, tp, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v, tv, rtol=1e-6, atol=0)
    torch.testing.assert_close(m, tm, rtol=1e-6, atol=1e-7)
    dp, dm, dv = _adamw_torch(
        p0.double(), [g.double() for g in grads], torch.float64, clip=clip, **HP
    )
    for ours in ((p, m, v), (tp, tm, tv)):
        for a, b in zip(ours, (dp, dm, dv)):
            torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=1e-7)


def test_adamw_reference_bf16_copy_and_errors():
    gen = torch.Generator().manual_seed(1)
    p, g = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    m, v, out = torch.zeros(100), torch.zeros(100), torch.empty(100, dtype=torch.bfloat16)
    adamw_flat_reference(p, g, m, v, lr=1e-3, step=1, param_bf16=out)
    assert torch.equal(out, p.bfloat16())
    with pytest.raises(sl.cuda.KernelArgumentError, match="grad is torch.float64") as e:
        adamw_flat_reference(p, g.double(), m, v[:3], lr=1e-3, step=0)
    assert "exp_avg_sq has 3 elements, param 100" in str(e.value)
    assert "step must be the 1-based step count, got 0" in str(e.value)


def test_sl_optim_adamw_on_cpu_does_not_touch_the_kernel(monkeypatch):
    """On CPU tensors sl.optim.adamw keeps torch's fused CPU kernel (same values as
    torch.optim.AdamW); the CUDA path is never asked."""
    from shardlib.cuda import _adamw

    def boom(*a, **k):
        raise AssertionError("the CUDA AdamW ran for CPU tensors")

    monkeypatch.setattr(_adamw, "adamw_flat_cuda", boom)
    monkeypatch.setattr(sl.cuda._launch, "available", lambda: True)
    gen = torch.Generator().manual_seed(2)
    p0, g = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    tx = sl.optim.adamw(1e-2, weight_decay=0.1)
    params = {"w": p0.clone()}
    new, _ = sl.optim.step(tx, {"w": g}, tx.init(params), params)
    tp, _, _ = _adamw_torch(p0, [g], torch.float32, **HP)
    torch.testing.assert_close(new["w"], tp, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_every_kernel_compiles_for_every_supported_arch():
    """The full sweep: each kernel file for every arch this NVRTC supports, cubin and PTX;
    archs below a kernel's minimum raise ArchError."""
    for name, k in sl.cuda.kernels().items():
        for cc in sl.cuda.supported_archs():
            if k.min_arch and cc < k.min_arch:
                with pytest.raises(sl.cuda.ArchError, match=f"sm_{cc} is below"):
                    k.compile(cc)
                continue
            assert k.compile(cc)[:4] == b"\x7fELF", (name, cc)
            assert f".target sm_{cc}" in k.compile(cc, target="ptx").decode(), (name, cc)
