"""OpInfo conformance harness: torch's `op_db` samples on sharded inputs against unsharded torch.

Owns the sweep behind tests/test_opinfo.py and tools/opinfo_report.py: for an
entry of torch's OpInfo database (`torch.testing._internal.common_methods_
invocations.op_db`) and one of its sample inputs, it turns the sample's
tensors into ShardedTensors with a sampled layout on a simulated mesh, runs
the op, and compares forward values (`.full()`) and gradients (`.grad.full()`)
with the same sample on plain tensors, in float64. It does not own any rule
or fix: a wrong verdict is a bug in shardlib.

Layouts are sampled per tensor: each mesh axis is unused, splits some dim
(several axes may share a dim: ``P(("a", "b"), None)``), or is partial with
one reduce op of ``sum``/``avg``/``max``/``min`` (all partial axes of a tensor
share it). Op_db sizes are odd, so splits are uneven (empty blocks included).
A tensor other than the first is left plain sometimes (a replicated constant,
DESIGN §6). Partial summands are exact and non-trivial (`summands`): the
value is rounded to a multiple of 2**-24 (the plain reference uses the same
rounded value) and every device holds a nonzero integer offset, so any
reduction order gives the value bit for bit. Gradients are taken of a random
weighting of the outputs; in half the cases each sharded output's weight (its
cotangent) is sharded in the output's own layout, so backward rules also meet
split cotangents, as they do inside a model.

Verdicts per case (`VERDICTS`):

- ``pass``: outputs (and gradients, where the op supports autograd) agree with
  plain torch within the tolerances, shapes and dtypes included, and every
  shard of every sharded output has exactly the block its layout promises;
- ``wrong``: values, shapes or dtypes differ, or a shard is not its block;
- ``norule``: `sl.NoRuleError` (the op, or a backward op, has no rule);
- ``error``: another `sl.ShardlibError` (a clear refusal naming a fix);
- ``crash``: any other exception escaping shardlib, a dead process
  (segfault) or a timeout;
- ``skip``: plain torch raises on the sample, or nothing can be sharded.

Invariants: a case is deterministic given (seed, op key, sample index, mesh,
case index); random ops are compared under the same `torch.manual_seed`
(shardlib's random ops promise torch's values under the same seed); ops whose
plain output is not reproducible under a seed (uninitialized memory:
``empty_like``...) are compared by shape and dtype only. The sweep runs ops
in a subprocess (`run_sweep`), restarted after a crash, so a segfault costs
one op, not the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import selectors
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

import shardlib as sl
from tests import _reference as ref

__all__ = [
    "MESHES",
    "VERDICTS",
    "CaseResult",
    "family",
    "load_ops",
    "op_key",
    "run_case",
    "run_sweep",
    "summarize",
]

MESHES: dict[str, dict[str, int]] = {"a2b2": {"a": 2, "b": 2}, "x4": {"x": 4}}
VERDICTS = ("pass", "wrong", "norule", "error", "crash", "skip")
RTOL, ATOL = 1e-7, 1e-9
SEED = 20240606
QUANTUM = 2.0**-24  # partial values are multiples of this: integer summands add exactly

# Looser tolerances, by op key, with the reason (reductions over a split dim add in
# another order; that is rounding, not a wrong rule).
TOLERANCES: dict[str, tuple[float, float, str]] = {
    "cov": (
        1e-4,
        1e-5,
        "samples with float32 aweights: float32 sums taken in another order, amplified by a "
        "near-zero denominator (correction close to the weight sum); torch's own result "
        "moves by 2.6e-5 relative between float32 and float64 weights on such a sample",
    ),
}
# Some samples carry lower-precision tensors (cov's float32 aweights, the bfloat16 cast):
# a sample with such an input, and any lower-precision output, is compared at
# torch.testing.assert_close's default tolerances for the least precise dtype.
DTYPE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1.3e-6, 1e-5),
    torch.complex64: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


# == ops =======================================================================
def load_ops() -> list[Any]:
    """torch's OpInfo entries (`op_db`), in database order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.testing._internal.common_methods_invocations import op_db
    return list(op_db)


def op_key(op: Any) -> str:
    """``name`` or ``name.variant`` (the unique (op, variant) key of an OpInfo entry)."""
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def sample_dtype(op: Any) -> torch.dtype | None:
    """float64 where the op supports it on CPU, else the first of int64, bool, complex128."""
    supported = op.supported_dtypes("cpu")
    for dt in (torch.float64, torch.int64, torch.bool, torch.complex128, torch.float32):
        if dt in supported:
            return dt
    return None


_CONTRACTIONS = {
    "mm", "bmm", "matmul", "mv", "dot", "vdot", "inner", "outer", "ger", "addmm", "addmv",
    "addbmm", "baddbmm", "addr", "einsum", "tensordot", "kron", "chain_matmul", "__rmatmul__",
    "nn.functional.linear", "nn.functional.bilinear", "linalg.multi_dot", "linalg.vecdot",
    "addmm.decomposed", "_addmm_activation",
}  # fmt: skip
_LINALG = {
    "cholesky", "cholesky_inverse", "cholesky_solve", "det", "logdet", "slogdet", "inverse",
    "lu", "lu_solve", "lu_unpack", "qr", "svd", "svd_lowrank", "pca_lowrank", "pinverse",
    "triangular_solve", "symeig", "eig", "geqrf", "ormqr", "householder_product", "matrix_exp",
    "cross", "trace", "tril", "triu", "diag_embed", "cov", "corrcoef", "cdist", "renorm",
}  # fmt: skip
_SHAPE = {
    "view", "reshape", "view_as", "reshape_as", "transpose", "permute", "squeeze", "unsqueeze",
    "expand", "expand_as", "flatten", "unflatten", "narrow", "narrow_copy", "select", "split",
    "split_with_sizes", "chunk", "unbind", "cat", "stack", "hstack", "vstack", "dstack",
    "column_stack", "row_stack", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "mT",
    "mH", "T", "H", "adjoint", "ravel", "flip", "fliplr", "flipud", "roll", "rot90", "repeat",
    "tile", "broadcast_to", "broadcast_tensors", "atleast_1d", "atleast_2d", "atleast_3d",
    "diagonal", "diag", "as_strided", "as_strided_scatter", "contiguous", "clone",
    "tensor_split", "hsplit", "vsplit", "dsplit", "unfold", "unfold_copy", "view_as_complex",
    "view_as_real", "real", "imag", "conj", "conj_physical", "resolve_conj", "resolve_neg",
    "block_diag", "concat", "concatenate", "split_with_sizes_copy", "unsafe_split",
    "unsafe_chunk", "select_scatter", "slice_scatter", "diagonal_scatter", "slice", "alias_copy",
    "expand_copy", "permute_copy", "t_copy", "transpose_copy", "unbind_copy", "view_copy",
    "squeeze_copy", "unsqueeze_copy", "diagonal_copy", "_unsafe_masked_index",
}  # fmt: skip
_INDEXING = {
    "gather", "scatter", "scatter_add", "scatter_reduce", "index_select", "index_add",
    "index_copy", "index_fill", "index_put", "index_reduce", "take", "take_along_dim", "put",
    "masked_fill", "masked_scatter", "masked_select", "__getitem__", "nonzero", "nonzero_static",
    "argwhere", "where", "searchsorted", "bucketize", "unique", "unique_consecutive", "bincount",
    "histc", "histogram", "histogramdd", "sort", "argsort", "msort", "topk", "kthvalue",
    "median", "nanmedian", "mode", "cummax", "cummin", "cumsum", "cumprod", "logcumsumexp",
    "cumulative_trapezoid", "trapezoid", "trapz", "diff", "combinations", "cartesian_prod",
    "unravel_index", "tril_indices", "triu_indices", "_unsafe_index", "_unsafe_index_put",
}  # fmt: skip
_RANDOM = {
    "bernoulli", "multinomial", "normal", "uniform", "log_normal", "rand_like", "randn_like",
    "randint_like", "randn", "randint", "nn.functional.dropout", "nn.functional.dropout2d",
    "nn.functional.dropout3d", "nn.functional.alpha_dropout", "nn.functional.rrelu",
    "nn.functional.feature_alpha_dropout", "cauchy", "exponential", "geometric",
}  # fmt: skip


def family(op: Any) -> str:
    """The op's family for the report: pointwise, reduction, view, contraction, linalg, ..."""
    from torch.testing._internal.opinfo.core import (
        BinaryUfuncInfo,
        ReductionOpInfo,
        ShapeFuncInfo,
        SpectralFuncInfo,
        UnaryUfuncInfo,
    )

    name = op.name
    if name in _RANDOM:
        return "random"
    if op.is_factory_function or name in ("empty", "empty_strided", "empty_permuted"):
        return "factory"
    if isinstance(op, SpectralFuncInfo) or name.startswith("fft.") or name in ("stft", "istft"):
        return "spectral"
    if name in _CONTRACTIONS:
        return "contraction"
    if name.startswith("linalg.") or name in _LINALG:
        return "linalg"
    if name.startswith("masked."):
        return "masked"
    if isinstance(op, ShapeFuncInfo) or name in _SHAPE:
        return "view"
    if isinstance(op, ReductionOpInfo):
        return "reduction"
    if name in _INDEXING:
        return "indexing/sort/scan"
    if name.startswith("nn.functional.") or name.startswith("torch.ops.aten._"):
        return "nn"
    if isinstance(op, UnaryUfuncInfo | BinaryUfuncInfo) or name.startswith("special."):
        return "pointwise"
    if name.startswith(("sparse.", "_refs", "_native")):
        return "other"
    return "other"


# == samples and layouts ========================================================
def _crc(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def samples(op: Any, requires_grad: bool, limit: int | None = None) -> list[Any]:
    """The op's sample inputs on CPU (first `limit` of them), made deterministically."""
    dtype = sample_dtype(op)
    if dtype is None:
        return []
    grad = requires_grad and op.supports_autograd and (dtype.is_floating_point or dtype.is_complex)
    torch.manual_seed(_crc("samples", op_key(op)))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in op.sample_inputs("cpu", dtype, requires_grad=grad):
            out.append(s)
            if limit is not None and len(out) >= limit:
                break
    return out


def _reduce_ops(dtype: torch.dtype) -> tuple[str, ...]:
    if dtype == torch.bool:
        return ()
    if dtype.is_complex:
        return ("sum", "avg")
    if dtype.is_floating_point:
        return ("sum", "avg", "max", "min")
    return ("sum", "max", "min")


def sample_layout(rng: random.Random, t: torch.Tensor, axes: dict[str, int]) -> sl.Layout:
    """A random layout of `t` on a mesh with `axes`: each axis unused, on a dim, or partial."""
    ops = _reduce_ops(t.dtype)
    dims: list[list[str]] = [[] for _ in range(t.ndim)]
    partial = []
    for a in rng.sample(list(axes), len(axes)):  # a random major -> minor order
        r = rng.random()
        if r < 0.2 and ops:
            partial.append(a)
        elif r < 0.75 and t.ndim:
            dims[rng.randrange(t.ndim)].append(a)
    op = rng.choice(ops) if partial else "sum"
    return sl.Layout(tuple(tuple(d) for d in dims), tuple(partial), op)


def quantize(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to a multiple of `QUANTUM` (floats; others unchanged): integers add exactly."""
    if t.dtype.is_complex:
        return torch.complex(quantize(t.real), quantize(t.imag))
    if not t.dtype.is_floating_point:
        return t.clone()
    big = t.abs() >= 2.0**28  # already coarser than the quantum (or inf/nan): keep
    return torch.where(big, t, torch.round(t / QUANTUM) * QUANTUM)


def summands(
    value: torch.Tensor, layout: sl.Layout, axes: dict[str, int], gen: torch.Generator
) -> list[torch.Tensor]:
    """Per device, the shard whose reduction over the partial axes is exactly `value`.

    With k the partial group size and R_j random nonzero integers (j = 1..k-1):
    sum: device j holds R_j, device 0 ``value - sum R_j``; avg: ``value + R_j`` and
    ``value - sum R_j`` (their mean is `value`, k a power of two); max (min): per
    element one random device holds `value`, the others `value` minus (plus) a random
    integer in [0, 3]. `value` must be `quantize`d (for floats). Replicas (devices that
    differ only in unused axes) hold identical shards.
    """
    k = math.prod(axes[a] for a in layout.partial)
    shape = tuple(value.shape)

    def ints(lo: int, hi: int) -> torch.Tensor:
        r = torch.randint(lo, hi, shape, generator=gen)
        if value.dtype.is_complex:
            r = torch.complex(r.double(), torch.randint(lo, hi, shape, generator=gen).double())
        return r.to(value.dtype)

    if not layout.partial:
        parts = [value]
    elif layout.reduce_op in ("sum", "avg"):
        offsets = []
        for _ in range(k - 1):
            r = ints(1, 4) * (1 - 2 * torch.randint(0, 2, shape, generator=gen)).to(value.dtype)
            offsets.append(r)
        rest = sum(offsets) if offsets else torch.zeros_like(value)
        base = value if layout.reduce_op == "avg" else torch.zeros_like(value)
        parts = [value - rest] + [base + r for r in offsets]
    else:
        owner = torch.randint(0, k, shape, generator=gen)
        sign = -1 if layout.reduce_op == "max" else 1
        parts = [torch.where(owner == j, value, value + sign * ints(0, 4)) for j in range(k)]
    shards = []
    for dev in range(math.prod(axes.values())):
        j = ref.partial_index(layout, axes, dev)
        shards.append(ref.block(parts[j], layout, axes, dev).contiguous().clone())
    return shards


# == running one case ===========================================================
@dataclasses.dataclass
class CaseResult:
    """One (op, sample, mesh, layouts) case: its verdict and what decided it."""

    key: str
    mesh: str
    sample: int
    case: int
    verdict: str
    detail: str = ""
    layouts: str = ""
    seconds: float = 0.0


class _Mismatch(Exception):
    """A forward or gradient difference from plain torch (the `wrong` verdict)."""


def _leaves(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)


def _map(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list | tuple):
        mapped = [_map(o, fn) for o in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _plain(t: Any) -> Any:
    """A sharded value's global plain value (`.full()`), or `t` itself."""
    if isinstance(t, sl.ShardedTensor):
        return t.full()
    return t


def _check_blocks(t: sl.ShardedTensor, where: str) -> None:
    """Every shard has the dtype of the wrapper and exactly the block its layout promises."""
    axes = t.mesh.axes
    shape = tuple(t.shape)
    for dev, s in enumerate(t.local_shards()):
        want = tuple(hi - lo for lo, hi in ref.bounds(shape, t.spec, axes, dev))
        if tuple(s.shape) != want or s.dtype != t.dtype:
            raise _Mismatch(
                f"{where}: device {dev} holds a {tuple(s.shape)} {s.dtype} shard; "
                f"{t.spec!r} of {shape} {t.dtype} says {want}"
            )


# Ops whose results torch returns in LAPACK's column-major order and shardlib in row-major:
# the values are right, but a reshape of them is a copy where torch's is a view. Every other
# op's results, gradients and written inputs report torch's strides (`_check_strides`).
STRIDE_EXEMPT = {
    "linalg.eig": "eigenvectors column-major",
    "linalg.ldl_solve": "writes its column-major input back row-major",
    "linalg.lu_solve": "the LU factors' gradient column-major",
    "lu_solve": "the LU factors' gradient column-major",
    "lu_unpack": "the LU factors' gradient column-major",
    "ormqr": "the reflectors' gradient column-major",
}


def _check_strides(got: sl.ShardedTensor, want: torch.Tensor, where: str) -> None:
    """The sharded result reports torch's strides (over dims of size > 1: torch leaves a
    size-1 dim's stride free)."""
    if want.layout is not torch.strided or tuple(got.shape) != tuple(want.shape):
        return
    g = [st for n, st in zip(got.shape, got.stride()) if n > 1]
    w = [st for n, st in zip(want.shape, want.stride()) if n > 1]
    if g != w:
        raise _Mismatch(f"{where}: strides {got.stride()}, torch {want.stride()}")


def _close(
    got: Any,
    want: Any,
    rtol: float,
    atol: float,
    where: str,
    values: bool = True,
    strides: bool = False,
) -> None:
    """Raise `_Mismatch` unless `got` (plain or sharded) matches `want` (plain)."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise _Mismatch(f"{where}: got {type(got).__name__}, torch gives a tensor")
        if isinstance(got, sl.ShardedTensor):
            _check_blocks(got, where)
            if strides:
                _check_strides(got, want, where)
            got = got.full()
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise _Mismatch(
                f"{where}: {tuple(got.shape)} {got.dtype}, torch {tuple(want.shape)} {want.dtype}"
            )
        if not values:
            return
        got, want = got.detach(), want.detach()
        if want.dtype.is_floating_point or want.dtype.is_complex:
            low_rtol, low_atol = DTYPE_TOLERANCES.get(want.dtype, (0.0, 0.0))
            rtol, atol = max(rtol, low_rtol), max(atol, low_atol)
            ok = torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        else:
            ok = torch.equal(got, want)
        if not ok:
            diff = (got.double() - want.double()).abs() if not want.is_complex() else None
            worst = (
                f" (max abs diff {diff.nan_to_num(nan=math.inf).max().item():.3g})"
                if (diff is not None and diff.numel())
                else ""
            )
            raise _Mismatch(f"{where}: values differ from torch{worst}")
        return
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            raise _Mismatch(f"{where}: got {type(got).__name__}, torch {type(want).__name__}")
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, rtol, atol, f"{where}[{i}]", values, strides)
        return
    if isinstance(got, torch.Tensor):
        got = _plain(got).item() if got.numel() == 1 else _plain(got).tolist()
    if isinstance(want, float) and isinstance(got, int | float):
        if not (
            math.isclose(got, want, rel_tol=rtol, abs_tol=atol)
            or got == want
            or (math.isnan(want) and math.isnan(got))
        ):
            raise _Mismatch(f"{where}: {got!r}, torch {want!r}")
        return
    if values and got != want:
        raise _Mismatch(f"{where}: {got!r}, torch {want!r}")


def _float_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in _leaves(out) if t.dtype.is_floating_point and t.requires_grad and t.numel()]


def _reproducible(op: Any, sample: Any, seed: int) -> bool:
    """Whether plain torch gives the same output twice under one seed."""
    outs = []
    for _ in range(2):
        args = _map((sample.input, sample.args, sample.kwargs), lambda t: t.detach().clone())
        torch.manual_seed(seed)
        outs.append(op(args[0], *args[1], **args[2]))
    try:
        _close(outs[0], outs[1], 0.0, 0.0, "rerun")
    except _Mismatch:
        return False
    return True


def run_case(
    op: Any,
    sample: Any,
    mesh_name: str,
    *,
    sample_index: int = 0,
    case: int = 0,
    seed: int = SEED,
    grads: bool = True,
) -> CaseResult:
    """Run one sample of `op` on sharded inputs (layouts drawn from the case's seed) and judge it."""
    key = op_key(op)
    axes = MESHES[mesh_name]
    mesh = sl.Mesh.simulated(axes)
    case_seed = _crc(seed, key, sample_index, mesh_name, case)
    rng = random.Random(case_seed)
    gen = torch.Generator().manual_seed(case_seed)
    rtol, atol = TOLERANCES.get(key, (RTOL, ATOL, ""))[:2]
    for t in _leaves((sample.input, sample.args, sample.kwargs)):
        low_rtol, low_atol = DTYPE_TOLERANCES.get(t.dtype, (0.0, 0.0))
        rtol, atol = max(rtol, low_rtol), max(atol, low_atol)
    result = CaseResult(key, mesh_name, sample_index, case, "pass")
    start = time.perf_counter()

    # Layouts per distinct tensor (the same tensor object twice gets one layout).
    originals: dict[int, torch.Tensor] = {}
    for t in _leaves((sample.input, sample.args, sample.kwargs)):
        originals.setdefault(id(t), t)
    plans: dict[int, sl.Layout | None] = {}
    for i, (tid, t) in enumerate(originals.items()):
        shardable = t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized
        keep_plain = not shardable or (i > 0 and rng.random() < 0.25)
        plans[tid] = None if keep_plain else sample_layout(rng, t, axes)
    if not any(p is not None for p in plans.values()):
        result.verdict, result.detail = "skip", "no strided tensor input to shard"
        return result
    values = {
        tid: (quantize(t.detach()) if plans[tid] is not None and plans[tid].partial else t.detach())
        for tid, t in originals.items()
    }
    result.layouts = ", ".join("plain" if p is None else repr(p) for p in plans.values())

    def fresh(tid: int) -> torch.Tensor:
        t = values[tid].clone()
        return t.requires_grad_(originals[tid].requires_grad and grads)

    plain_inputs = {tid: fresh(tid) for tid in originals}
    compare_values = True
    strides = key not in STRIDE_EXEMPT
    if op.has_nondeterministic_output:
        compare_values = _reproducible(op, sample, case_seed)

    def call(inputs: dict[int, torch.Tensor]) -> Any:
        a, args, kwargs = _map((sample.input, sample.args, sample.kwargs), lambda t: inputs[id(t)])
        torch.manual_seed(case_seed)
        return op(a, *args, **kwargs)

    # Plain torch first: a sample it rejects is skipped.
    try:
        want = call(plain_inputs)
        want = sample.output_process_fn_grad(want)
        want_floats = _float_outputs(want) if grads and op.supports_autograd else []
        weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in want_floats]
        want_grads: dict[int, Any] = {}
        if want_floats:
            loss = sum((t * w).sum() for t, w in zip(want_floats, weights))
            loss.backward()
            want_grads = {tid: t.grad for tid, t in plain_inputs.items() if t.requires_grad}
    except Exception as e:  # noqa: BLE001  (any torch error: not a sample we can judge)
        result.verdict = "skip"
        result.detail = f"torch raises: {type(e).__name__}: {str(e)[:120]}"
        result.seconds = time.perf_counter() - start
        return result

    phase = "forward"
    try:
        sharded: dict[int, torch.Tensor] = {}
        for tid in originals:
            layout = plans[tid]
            if layout is None:
                sharded[tid] = fresh(tid)
            elif layout.partial:
                x = sl.from_local(
                    summands(values[tid], layout, axes, gen), mesh, layout, tuple(values[tid].shape)
                )
                sharded[tid] = x.requires_grad_(plain_inputs[tid].requires_grad)
            else:
                x = sl.shard(values[tid].clone(), mesh, layout)
                sharded[tid] = x.requires_grad_(plain_inputs[tid].requires_grad)
        got = call(sharded)
        got = sample.output_process_fn_grad(got)
        _close(got, want, rtol, atol, "output", compare_values, strides)
        # In-place ops (and ops that write an input) must write the sharded input too.
        for tid, t in sharded.items():
            if isinstance(t, sl.ShardedTensor) and not plain_inputs[tid].requires_grad:
                _close(
                    t,
                    plain_inputs[tid],
                    rtol,
                    atol,
                    f"input {list(originals).index(tid)} after the op",
                    compare_values,
                    strides,
                )
        if want_floats:
            phase = "backward"
            got_floats = _float_outputs(got)
            if len(got_floats) != len(want_floats):
                raise _Mismatch(
                    f"backward: {len(got_floats)} differentiable outputs, torch {len(want_floats)}"
                )
            # Half the cases weight each sharded output by a cotangent in its own layout (a
            # model's next op would hand back one), so backward rules see split cotangents.
            if rng.random() < 0.5:
                weights = [_like(w, t, mesh) for t, w in zip(got_floats, weights)]
            loss = sum((t * w).sum() for t, w in zip(got_floats, weights))
            loss.backward()
            for i, (tid, w) in enumerate(want_grads.items()):
                g = sharded[tid].grad
                if w is None and g is None:
                    continue
                w = torch.zeros_like(values[tid]) if w is None else w
                g = torch.zeros_like(values[tid]) if g is None else g
                _close(g, w, rtol, atol, f"grad of input {i}", compare_values, strides)
    except _Mismatch as e:
        result.verdict, result.detail = "wrong", str(e)
    except sl.NoRuleError as e:
        result.verdict, result.detail = "norule", f"{phase}: {_first_line(e)}"
    except sl.ShardlibError as e:
        result.verdict, result.detail = "error", f"{phase}: {type(e).__name__}: {_first_line(e)}"
    except Exception as e:  # noqa: BLE001  (anything else escaping shardlib is a crash)
        result.verdict = "crash"
        result.detail = f"{phase}: {type(e).__name__}: {_first_line(e)} @ {_where(e)}"
    result.seconds = time.perf_counter() - start
    return result


def _like(w: torch.Tensor, t: torch.Tensor, mesh: sl.Mesh) -> torch.Tensor:
    """`w` sharded in `t`'s layout without its partial axes (plain when `t` is plain)."""
    if not isinstance(t, sl.ShardedTensor):
        return w
    return sl.shard(w, mesh, t.spec.without_partial())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]


def _where(e: BaseException) -> str:
    """The innermost traceback frame inside shardlib (or the innermost one)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    inside = [f for f in frames if "shardlib" in f.filename]
    f = (inside or frames or [None])[-1]
    if f is None:
        return "?"
    path = f.filename.split("site-packages/")[-1]
    path = path[path.index("shardlib/") :] if "shardlib/" in path else path
    return f"{path}:{f.lineno} {f.name}"


# == sweeps ====================================================================
def sweep_ops(
    keys: Iterable[str],
    meshes: Sequence[str],
    samples_per_op: int | None,
    layouts: int,
    fast: bool,
    seed: int = SEED,
) -> Iterator[CaseResult | tuple[str, str]]:
    """Run the cases of each op in `keys` in this process (yields ("start", key) markers).

    fast: `layouts` cases per mesh; case c runs the first sample from index c on that
    plain torch accepts (a sample torch rejects is not a case). Otherwise every sample
    (or the first `samples_per_op`) with `layouts` layouts per mesh, skips included.
    """
    by_key = {op_key(op): op for op in load_ops()}
    for key in keys:
        op = by_key[key]
        yield ("start", key)
        if sample_dtype(op) is None:
            yield CaseResult(key, "-", 0, 0, "skip", "no CPU dtype")
            continue
        try:
            found = samples(op, True, limit=layouts + 8 if fast else samples_per_op)
        except Exception as e:  # noqa: BLE001  (sample generation itself failed)
            yield CaseResult(key, "-", 0, 0, "skip", f"samples raise: {type(e).__name__}: {e}")
            continue
        if not found:
            yield CaseResult(key, "-", 0, 0, "skip", "no sample inputs on CPU")
            continue
        for mesh in meshes:
            for c in range(layouts):
                for i in range(c % len(found), len(found)) if fast else range(len(found)):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = run_case(op, found[i], mesh, sample_index=i, case=c, seed=seed)
                    if not fast:
                        yield r
                    elif r.verdict != "skip" or i == len(found) - 1:
                        yield r
                        break


def _worker(argv: list[str]) -> None:
    """`python -m tests._opinfo worker CONFIG_JSON`: run a sweep, one JSON line per event."""
    cfg = json.loads(argv[0])
    torch.set_num_threads(1)
    out = sys.stdout
    for item in sweep_ops(
        cfg["keys"], cfg["meshes"], cfg["samples"], cfg["layouts"], cfg["fast"], cfg["seed"]
    ):
        if isinstance(item, tuple):
            out.write(json.dumps({"start": item[1]}) + "\n")
        else:
            out.write(json.dumps(dataclasses.asdict(item)) + "\n")
        out.flush()


def run_sweep(
    keys: Sequence[str],
    *,
    meshes: Sequence[str] = tuple(MESHES),
    samples_per_op: int | None = None,
    layouts: int = 1,
    fast: bool = False,
    seed: int = SEED,
    op_timeout: float = 120.0,
    jobs: int = 1,
    progress: Any = None,
) -> list[CaseResult]:
    """Run the sweep over `keys` in worker subprocesses; a dead or stuck worker costs one op.

    `jobs` workers each take a contiguous chunk of `keys`. An op whose worker dies
    (segfault) or runs past `op_timeout` seconds is a ``crash``; the worker restarts
    with the op after it.
    """
    chunks = [list(keys[i::jobs]) for i in range(jobs)] if jobs > 1 else [list(keys)]
    results: list[CaseResult] = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")

    def spawn(todo: list[str]) -> subprocess.Popen:
        cfg = dict(
            keys=todo,
            meshes=list(meshes),
            samples=samples_per_op,
            layouts=layouts,
            fast=fast,
            seed=seed,
        )
        return subprocess.Popen(
            [sys.executable, "-m", "tests._opinfo", "worker", json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=root,
            env=env,
            text=True,
        )

    state = {}  # proc -> [remaining keys, current key, last progress time, buffer]
    sel = selectors.DefaultSelector()
    for chunk in chunks:
        if chunk:
            p = spawn(chunk)
            state[p] = [chunk, None, time.monotonic(), ""]
            sel.register(p.stdout, selectors.EVENT_READ, p)
    while state:
        events = sel.select(timeout=1.0)
        for skey, _ in events:
            p = skey.data
            st = state[p]
            line = p.stdout.readline()
            if line:
                st[2] = time.monotonic()
                msg = json.loads(line)
                if "start" in msg:
                    st[1] = msg["start"]
                    st[0] = st[0][st[0].index(st[1]) + 1 :]
                else:
                    r = CaseResult(**msg)
                    results.append(r)
                    if progress:
                        progress(r)
                continue
            sel.unregister(p.stdout)
            p.stdout.close()
            rc = p.wait()
            del state[p]
            if rc != 0 and st[1] is not None:
                why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                r = CaseResult(st[1], "-", 0, 0, "crash", f"worker process died ({why})")
                results.append(r)
                if progress:
                    progress(r)
            if rc != 0 and st[0]:
                q = spawn(st[0])
                state[q] = [st[0], None, time.monotonic(), ""]
                sel.register(q.stdout, selectors.EVENT_READ, q)
        for p, st in list(state.items()):
            if time.monotonic() - st[2] > op_timeout:
                p.kill()  # a stuck op: the read loop above sees the death next round
                st[2] = time.monotonic()
    sel.close()
    return results


def summarize(results: Sequence[CaseResult]) -> dict[str, Counter]:
    """Verdict counts per op key."""
    per: dict[str, Counter] = {}
    for r in results:
        per.setdefault(r.key, Counter())[r.verdict] += 1
    return per


def op_verdict(counts: Counter) -> str:
    """One word per op: the worst verdict it got (crash > wrong > error > norule > pass > skip)."""
    for v in ("crash", "wrong", "error", "norule", "pass"):
        if counts.get(v):
            return v
    return "skip"


def format_counts(results: Sequence[CaseResult]) -> str:
    c = Counter(r.verdict for r in results)
    per_op = Counter(op_verdict(v) for v in summarize(results).values())
    cases = ", ".join(f"{v} {c.get(v, 0)}" for v in VERDICTS)
    ops = ", ".join(f"{v} {per_op.get(v, 0)}" for v in VERDICTS)
    return f"cases: {cases}\nops (worst verdict): {ops}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        with contextlib.suppress(BrokenPipeError):
            _worker(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m tests._opinfo worker CONFIG_JSON")
