"""Rules for reductions and the ops built on them: sum, mean, extrema, var/std, norms,
logsumexp, softmax and layer norm (forward and backward).

Owns how a reduction treats split and partial inputs. It does not own the
pointwise ops its decompositions call (`_pointwise.py`) nor the views autograd
emits in the backward of a reduction (`_views.py`).

The rules, by op (A = the axes that split the reduced dims, P = the input's
partial axes):

- ``sum``, ``mean``: no communication. A becomes partial-``sum`` on the
  output; a mean divides its local sum by the *global* count (uneven shards
  are right). A partial-``sum`` input stays partial (sum is linear); a
  partial-``avg`` input stays ``avg`` when nothing reduced is split, else each
  summand is divided by its group size so that avg summands become sum
  summands (exact, local). ``max``/``min`` partials are reduced first.
- ``amax``, ``amin``, ``max``/``min`` (no dim): A becomes partial-``max``/``min``;
  a partial input is kept only when its op is the reduction's. A device whose
  block of a reduced dim is empty contributes the op's identity.
- ``max.dim``, ``min.dim``, ``argmax``, ``argmin``, ``prod``: indices and
  products need the whole reduced dim: it is gathered (or its axes moved to
  another dim by an all-to-all, whichever the planner prices lower); other
  dims keep their splits; partial inputs are reduced first.
- ``var``, ``std``, ``var_mean``, ``std_mean``, ``linalg_vector_norm``,
  ``logsumexp``: the local op when no reduced dim is split; otherwise a
  decomposition into sum/mean/amax and pointwise ops, so a split dim costs
  all-reduces of the (small) reduced result only.
- ``_softmax``, ``_log_softmax`` and their backward: local over an unsplit
  dim; over a split dim a decomposition (max -> all-reduce, exp(x - max),
  sum -> all-reduce, divide) that never gathers the logits. The backward is
  linear in the incoming gradient, so a partial-``sum`` gradient stays partial
  on the local path. ``log_softmax``'s backward over a split dim needs the
  gradient's sums over it: an nll-loss gradient carries them (`_nn.py`; also
  seen through a view that only drops or adds size-1 dims), else they are
  summed and all-reduced.
- ``native_layer_norm`` and its backward: normalized dims unsplit -> local,
  weight and bias replicated, grad weight/bias partial-``sum`` over the axes
  splitting the batch dims (reduced lazily, as in data parallelism);
  normalized dims split -> a decomposition (weight and bias split like the
  normalized dims). ``F.rms_norm`` decomposes above dispatch in torch 2.13
  (pow, mean, add_, rsqrt, mul), so its rules are the pointwise ones and
  ``mean``.

Wherever partial inputs must be reduced, the rule also offers layouts where
the partial axes become a split of some dim (a reduce-scatter, half the bytes
of an all-reduce); the dispatcher keeps the cheapest.

A reduction with nothing to combine (a reduced dim of size 0, or an empty
result) runs locally whatever the splits: every device's local result (empty,
-inf, 0 or nan) is already the answer, and the decompositions' amax would fail.

Invariant: every strategy is exact for uneven shapes and every partial
input; when in doubt an input is required non-partial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh
from . import _aliasing
from ._dispatch import _move
from ._pointwise import _cast_commutes
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor

aten = torch.ops.aten

Dims = tuple[tuple[str, ...], ...]


# == helpers ===================================================================
def _arg(ri: RuleInput, i: int, name: str, default: Any = None) -> Any:
    """Argument `i` (or keyword `name`) of the op, `default` when absent."""
    if len(ri.args) > i:
        return ri.args[i]
    return ri.kwargs.get(name, default)


def _norm_dims(dim: Any, ndim: int) -> tuple[int, ...]:
    """Reduced dims, sorted and non-negative; None or [] mean all dims (aten's convention)."""
    if ndim == 0:
        return ()
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    dims = sorted({d % ndim for d in dim})
    return tuple(dims) if dims else tuple(range(ndim))


def _split_axes(dims: Dims, red: Sequence[int]) -> tuple[str, ...]:
    return tuple(a for d in red for a in dims[d])


def _out_dims(dims: Dims, red: Sequence[int], keepdim: bool) -> Dims:
    if keepdim:
        return tuple(() if d in red else axes for d, axes in enumerate(dims))
    return tuple(axes for d, axes in enumerate(dims) if d not in red)


def _group(mesh: AbstractMesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.axis_size(a) for a in axes)


def _variants(
    layout: Layout,
    shape: tuple[int, ...],
    mesh: AbstractMesh,
    clear: Sequence[int] = (),
) -> Iterator[Layout]:
    """Non-partial layouts with the dims in `clear` unsplit, cheapest-first guesses.

    First the layout itself with `clear` emptied and partial dropped (an
    all-gather / all-reduce); then, when something is freed, the same with the
    freed axes appended to one other dim (an all-to-all / reduce-scatter),
    for each dim large enough to give every device an element.
    """
    dims = list(layout.dims)
    freed = _split_axes(layout.dims, clear) + layout.partial
    for d in clear:
        dims[d] = ()
    base = Layout(tuple(dims))
    yield base
    if not freed:
        return
    for e, n in enumerate(shape):
        if e in clear:
            continue
        axes = base.dims[e] + freed
        if n >= _group(mesh, axes):
            yield base.with_dim(e, axes)


def _identity(op: str, dtype: torch.dtype) -> Any:
    """The identity of max/min for `dtype` (what an empty block contributes)."""
    if dtype == torch.bool:
        return op == "min"
    if dtype.is_floating_point:
        return -math.inf if op == "max" else math.inf
    info = torch.iinfo(dtype)
    return info.min if op == "max" else info.max


def _reduced(func: Any, t: ShardedTensor) -> ShardedTensor:
    """`t` with its partial axes reduced (recorded in the ledger with `func` as cause)."""
    want = t._layout.without_partial()
    return t if t._layout == want else _move(func, t, want)


def _squeeze(t: ShardedTensor, red: Sequence[int]) -> ShardedTensor:
    """Drop unsplit size-1 dims `red` of `t` locally (no communication)."""
    if not red:
        return t
    keep = [d for d in range(t.ndim) if d not in red]
    layout = Layout(tuple(t._layout.dims[d] for d in keep), t._layout.partial, t._layout.reduce_op)
    shape = tuple(t.shape[d] for d in keep)
    return ShardedTensor([s.squeeze(tuple(red)) for s in t._shards], t._mesh, layout, shape)


def _nothing_to_combine(x: ArgSpec, red: Sequence[int]) -> bool:
    """Whether a reduction of `x` over `red` is empty (a reduced dim of size 0) or has an
    empty result: then every device's local result is the whole answer (nan, -inf, 0 or
    nothing), and no decomposition over split dims is needed (their amax would fail)."""
    return math.prod(x.shape[d] for d in red) == 0 or math.prod(x.shape) == 0


def _replicated(ndim: int) -> Layout:
    return Layout(((),) * ndim)


# == sum and mean ==============================================================
_SUM = {aten.sum.default, aten.sum.dim_IntList}
_MEAN = {aten.mean.default, aten.mean.dim}


def _sum_local(red: tuple[int, ...], keepdim: bool, dtype: Any, divisor: float) -> Callable:
    def local(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        s = aten.sum.dim_IntList(x, list(red), keepdim, dtype=dtype)
        return s if divisor == 1 else torch.div(s, divisor)

    return local


@register_rule(*_SUM, *_MEAN)
def sum_mean_rule(ri: RuleInput) -> Iterator[Strategy]:
    """sum/mean: split reduced dims become partial-sum axes; no communication."""
    (x,) = ri.tensors[:1]
    layout, mean = x.layout, ri.op in _MEAN
    default_all = ri.op in (aten.sum.default, aten.mean.default)
    red = _norm_dims(None if default_all else _arg(ri, 1, "dim"), x.ndim)
    keepdim = False if default_all else bool(_arg(ri, 2, "keepdim", False))
    dtype = ri.kwargs.get("dtype")
    out_dtype = ri.outputs[0].dtype
    count = math.prod(x.shape[d] for d in red)

    def strategy(src: Layout) -> Strategy:
        split = _split_axes(src.dims, red)
        op = src.reduce_op if src.partial else "sum"
        scale = 1
        if split and op == "avg":  # avg summands / k are sum summands
            scale, op = _group(ri.mesh, src.partial), "sum"
        out = Layout(_out_dims(src.dims, red, keepdim), src.partial + split, op)
        divisor = scale * (count if mean else 1)
        local = None
        if scale != 1 or (mean and split):
            local = _sum_local(red, keepdim, dtype, divisor)
        return Strategy((src,), (out,), local=local)

    if (
        layout.partial
        and layout.reduce_op in ("sum", "avg")
        and _cast_commutes(layout.reduce_op, x.dtype, out_dtype)
    ):
        yield strategy(layout)
        return
    for src in _variants(layout, x.shape, ri.mesh):
        yield strategy(src)


# == amax / amin / max / min (values only) =====================================
_EXTREMUM = {
    aten.amax.default: "max",
    aten.amin.default: "min",
    aten.max.default: "max",
    aten.min.default: "min",
}


def _extremum_local(op: str, red: tuple[int, ...], keepdim: bool) -> Callable:
    reduce = aten.amax.default if op == "max" else aten.amin.default

    def local(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(x.shape[d] == 0 for d in red):  # an empty block: the identity of `op`
            if keepdim:
                shape = [1 if d in red else n for d, n in enumerate(x.shape)]
            else:
                shape = [n for d, n in enumerate(x.shape) if d not in red]
            return x.new_full(shape, _identity(op, x.dtype))
        return reduce(x, list(red), keepdim)

    return local


@register_rule(*_EXTREMUM)
def extremum_rule(ri: RuleInput) -> Iterator[Strategy]:
    """amax/amin/max/min: split reduced dims become partial-max/min axes; no communication."""
    (x,) = ri.tensors[:1]
    op = _EXTREMUM[ri.op]
    whole = ri.op in (aten.max.default, aten.min.default)
    red = _norm_dims(None if whole else _arg(ri, 1, "dim", ()), x.ndim)
    keepdim = False if whole else bool(_arg(ri, 2, "keepdim", False))

    def strategy(src: Layout) -> Strategy:
        split = _split_axes(src.dims, red)
        out = Layout(_out_dims(src.dims, red, keepdim), src.partial + split, op)
        # only a split reduced dim can leave a device an empty block
        local = _extremum_local(op, red, keepdim) if split else None
        return Strategy((src,), (out,), local=local)

    if x.layout.partial and x.layout.reduce_op == op:
        yield strategy(x.layout)
        return
    for src in _variants(x.layout, x.shape, ri.mesh):
        yield strategy(src)


# == max.dim / min.dim / argmax / argmin / prod ================================
_WHOLE_DIM = {
    aten.max.dim,
    aten.min.dim,
    aten.argmax.default,
    aten.argmin.default,
    aten.prod.dim_int,
    aten.prod.default,
}


@register_rule(*_WHOLE_DIM)
def whole_dim_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Indices and products: the reduced dim is gathered (or its axes moved); no partial."""
    (x,) = ri.tensors[:1]
    whole = ri.op is aten.prod.default
    red = _norm_dims(None if whole else _arg(ri, 1, "dim"), x.ndim)
    keepdim = False if whole else bool(_arg(ri, 2, "keepdim", False))
    for src in _variants(x.layout, x.shape, ri.mesh, clear=red):
        out = Layout(_out_dims(src.dims, red, keepdim))
        yield Strategy((src,), (out,) * len(ri.outputs))


# == var / std =================================================================
_VAR = {
    aten.var.correction: ("var", False),
    aten.std.correction: ("std", False),
    aten.var_mean.correction: ("var", True),
    aten.std_mean.correction: ("std", True),
}


def _var_decomposition(func: Any, red: tuple[int, ...], keepdim: bool, correction: float):
    kind, with_mean = _VAR[func]

    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> Any:
        count = math.prod(x.shape[d] for d in red)
        mean = _reduced(func, aten.mean.dim(x, list(red), True))
        centered = aten.sub.Tensor(x, mean)
        squares = aten.sum.dim_IntList(aten.mul.Tensor(centered, centered), list(red), keepdim)
        dof = max(count - correction, 0)
        if dof == 0:  # x/0 is not linear: each summand would give nan, the sum gives inf
            squares = _reduced(func, squares)
        out = aten.div.Scalar(squares, dof)
        if kind == "std":
            out = aten.sqrt.default(out)
        if not with_mean:
            return out
        return out, (mean if keepdim else _squeeze(mean, red))

    return decompose


@register_rule(*_VAR)
def var_rule(ri: RuleInput) -> Iterator[Strategy]:
    """var/std: local over unsplit dims; else mean -> all-reduce, sum of squares -> partial."""
    (x,) = ri.tensors[:1]
    red = _norm_dims(_arg(ri, 1, "dim"), x.ndim)
    keepdim = bool(ri.kwargs.get("keepdim", False))
    correction = ri.kwargs.get("correction")
    correction = 1 if correction is None else correction
    empty = _nothing_to_combine(x, red)
    for src in _variants(x.layout, x.shape, ri.mesh):
        if _split_axes(src.dims, red) and not empty:
            decompose = _var_decomposition(ri.op, red, keepdim, correction)
            yield Strategy((src,), decompose=decompose)
        else:
            out = Layout(_out_dims(src.dims, red, keepdim))
            yield Strategy((src,), (out,) * len(ri.outputs))


# == vector norm ===============================================================
def _norm_decomposition(func: Any, ord: Any, red: tuple[int, ...], keepdim: bool, dtype: Any):
    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> ShardedTensor:
        if dtype is not None and dtype != x.dtype:
            x = aten._to_copy.default(x, dtype=dtype)
        a = aten.abs.default(x)
        if ord == math.inf:
            return aten.amax.default(a, list(red), keepdim)
        if ord == -math.inf:
            return aten.amin.default(a, list(red), keepdim)
        if ord == 0:
            nonzero = aten._to_copy.default(aten.ne.Scalar(a, 0), dtype=a.dtype)
            return aten.sum.dim_IntList(nonzero, list(red), keepdim)
        if ord == 1:
            return aten.sum.dim_IntList(a, list(red), keepdim)
        powered = aten.sum.dim_IntList(aten.pow.Tensor_Scalar(a, ord), list(red), keepdim)
        return aten.pow.Tensor_Scalar(_reduced(func, powered), 1.0 / ord)

    return decompose


_NORMS = {
    aten.linalg_vector_norm.default,
    aten.norm.Scalar,
    aten.norm.ScalarOpt_dim,
    aten.norm.ScalarOpt_dim_dtype,
    aten.norm.ScalarOpt_dtype,
}


@register_rule(*_NORMS)
def vector_norm_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Vector p-norm: local over unsplit dims; else sum(|x|^p) as a partial sum, then the root."""
    (x,) = ri.tensors[:1]
    ord = _arg(ri, 1, "ord" if ri.op is aten.linalg_vector_norm.default else "p", 2)
    whole = ri.op in (aten.norm.Scalar, aten.norm.ScalarOpt_dtype)
    red = _norm_dims(None if whole else _arg(ri, 2, "dim"), x.ndim)
    keepdim = False if whole else bool(_arg(ri, 3, "keepdim", False))
    dtype = ri.kwargs.get("dtype")
    ord = 2.0 if ord is None else float(ord)
    empty = _nothing_to_combine(x, red)
    for src in _variants(x.layout, x.shape, ri.mesh):
        if _split_axes(src.dims, red) and not empty:
            decompose = _norm_decomposition(ri.op, ord, red, keepdim, dtype)
            yield Strategy((src,), decompose=decompose)
        else:
            yield Strategy((src,), (Layout(_out_dims(src.dims, red, keepdim)),))


# == logsumexp =================================================================
def _logsumexp_decomposition(func: Any, red: tuple[int, ...], keepdim: bool):
    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> ShardedTensor:
        top = _reduced(func, aten.amax.default(x, list(red), True))
        # An all -inf row: keep the shift finite so exp gives 0, not nan (as torch does).
        top = aten.where.self(aten.isinf.default(top), aten.zeros_like.default(top), top)
        total = aten.sum.dim_IntList(aten.exp.default(aten.sub.Tensor(x, top)), list(red), True)
        out = aten.add.Tensor(aten.log.default(_reduced(func, total)), top)
        return out if keepdim else _squeeze(out, red)

    return decompose


@register_rule(aten.logsumexp.default)
def logsumexp_rule(ri: RuleInput) -> Iterator[Strategy]:
    """logsumexp: local over unsplit dims; else max and sum-exp as all-reduces of the result."""
    (x,) = ri.tensors[:1]
    red = _norm_dims(_arg(ri, 1, "dim"), x.ndim)
    keepdim = bool(_arg(ri, 2, "keepdim", False))
    empty = _nothing_to_combine(x, red)
    for src in _variants(x.layout, x.shape, ri.mesh):
        if _split_axes(src.dims, red) and not empty:
            yield Strategy((src,), decompose=_logsumexp_decomposition(ri.op, red, keepdim))
        else:
            yield Strategy((src,), (Layout(_out_dims(src.dims, red, keepdim)),))


# == softmax / log_softmax =====================================================
_SOFTMAX = {aten._softmax.default: False, aten._log_softmax.default: True}
_SOFTMAX_BACKWARD = {
    aten._softmax_backward_data.default: False,
    aten._log_softmax_backward_data.default: True,
}


def _softmax_decomposition(func: Any, dim: int, log: bool, out_dtype: torch.dtype):
    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> ShardedTensor:
        if x.dtype != out_dtype:
            x = aten._to_copy.default(x, dtype=out_dtype)
        top = _reduced(func, aten.amax.default(x, [dim], True))
        shifted = aten.sub.Tensor(x, top)
        exp = aten.exp.default(shifted)
        total = _reduced(func, aten.sum.dim_IntList(exp, [dim], True))
        if log:
            return _as_kernel(aten.sub.Tensor(shifted, aten.log.default(total)))
        return _as_kernel(aten.div.Tensor(exp, total))

    return decompose


def _as_kernel(res: ShardedTensor) -> ShardedTensor:
    """Contiguous, as torch's softmax kernels return (forward and backward) whatever their
    input's strides: the decomposition's elementwise ops keep a transposed input's order,
    and strides decide what torch does next (whether ``reshape`` is a view that a write
    goes through, whether ``contiguous()`` copies)."""
    if res.is_contiguous():
        return res
    return aten.clone.default(res, memory_format=torch.contiguous_format)


@register_rule(*_SOFTMAX)
def softmax_rule(ri: RuleInput) -> Iterator[Strategy]:
    """softmax over an unsplit dim: local. Over a split dim: max and sum as all-reduces."""
    (x,) = ri.tensors[:1]
    red = _norm_dims(_arg(ri, 1, "dim"), x.ndim)
    out_dtype = ri.outputs[0].dtype
    for src in _variants(x.layout, x.shape, ri.mesh):
        if _split_axes(src.dims, red) and not _nothing_to_combine(x, red):
            decompose = _softmax_decomposition(ri.op, red[0], _SOFTMAX[ri.op], out_dtype)
            yield Strategy((src,), decompose=decompose)
        else:
            yield Strategy((src,), (Layout(src.dims),))


def _softmax_backward_decomposition(func: Any, dim: int, log: bool, in_dtype: torch.dtype):
    def decompose(grad: ShardedTensor, out: ShardedTensor, *args: Any, **kwargs: Any) -> Any:
        if log:  # d x = g - exp(y) * sum(g)
            total = _class_sums(grad, dim)  # an nll gradient knows its sums (_nn.py)
            if total is None:
                total = _reduced(func, aten.sum.dim_IntList(grad, [dim], True))
            res = aten.sub.Tensor(grad, aten.mul.Tensor(aten.exp.default(out), total))
        else:  # d x = y * (g - sum(g * y))
            total = _reduced(func, aten.sum.dim_IntList(aten.mul.Tensor(grad, out), [dim], True))
            res = aten.mul.Tensor(out, aten.sub.Tensor(grad, total))
        return _as_kernel(
            res if res.dtype == in_dtype else aten._to_copy.default(res, dtype=in_dtype)
        )

    return decompose


def _class_sums(grad: ShardedTensor, dim: int) -> ShardedTensor | None:
    """The sums of `grad` over `dim` where `grad` (or the gradient it is an alias view of, with
    only size-1 dims dropped or added: nll_loss2d's 4-d gradient seen as 3-d) carries them
    and was not written since; else None."""
    source = grad
    hint = getattr(grad, "_class_sums", None)
    if hint is None and grad._root is not None and grad._root._link is None:
        source = grad._root
        hint = getattr(source, "_class_sums", None)
    if hint is None:
        return None
    c, sums, stamp = hint
    if stamp != _aliasing._stamp(source):
        return None
    if source is grad:
        return sums if c == dim else None
    if not _same_but_ones(source, c, grad, dim):
        return None
    shape = list(grad.shape)
    shape[dim] = 1
    return aten.view.default(sums, shape)


def _same_but_ones(a: torch.Tensor, ca: int, b: torch.Tensor, cb: int) -> bool:
    """Whether `b` is `a` with size-1 dims dropped or added, `a`'s dim `ca` being `b`'s `cb`."""
    big_a = [(n, st) for n, st in zip(a.shape, a.stride()) if n != 1]
    big_b = [(n, st) for n, st in zip(b.shape, b.stride()) if n != 1]
    if big_a != big_b or a.storage_offset() != b.storage_offset() or a.shape[ca] == 1:
        return False
    position_a = sum(1 for n in a.shape[:ca] if n != 1)
    position_b = sum(1 for n in b.shape[:cb] if n != 1)
    return position_a == position_b and a.shape[ca] == b.shape[cb]


@register_rule(*_SOFTMAX_BACKWARD)
def softmax_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Linear in the gradient: a partial-sum gradient stays partial over an unsplit dim."""
    grad, out = ri.tensors[:2]
    red = _norm_dims(_arg(ri, 2, "dim"), out.ndim)
    found: list[Dims] = []
    for src in (*_variants(out.layout, out.shape, ri.mesh), grad.layout.without_partial()):
        if src.dims not in found:
            found.append(src.dims)
    g = grad.layout
    for dims in found:
        plain = Layout(dims)
        if _split_axes(dims, red) and math.prod(out.shape):  # empty: nothing to reduce
            log = _SOFTMAX_BACKWARD[ri.op]
            decompose = _softmax_backward_decomposition(ri.op, red[0], log, ri.outputs[0].dtype)
            yield Strategy((plain, plain), decompose=decompose)
            continue
        if g.partial and g.reduce_op in ("sum", "avg") and not plain.used_axes & set(g.partial):
            kept = Layout(dims, g.partial, g.reduce_op)
            yield Strategy((kept, plain), (kept,))
        yield Strategy((plain, plain), (plain,))


# == layer norm ================================================================
def _present(ri: RuleInput, *slots: tuple[int, str]) -> int:
    """How many of the optional tensor arguments (position, name) are given."""
    return sum(isinstance(_arg(ri, i, name), ArgSpec) for i, name in slots)


def _layer_norm_decomposition(func: Any, k: int, eps: float):
    def decompose(x, normalized_shape, weight=None, bias=None, *args: Any, **kwargs: Any):
        nd = list(range(x.ndim - k, x.ndim))
        mean = _reduced(func, aten.mean.dim(x, nd, True))
        centered = aten.sub.Tensor(x, mean)
        var = _reduced(func, aten.mean.dim(aten.mul.Tensor(centered, centered), nd, True))
        rstd = aten.rsqrt.default(aten.add.Scalar(var, eps))
        out = aten.mul.Tensor(centered, rstd)
        if weight is not None:
            out = aten.mul.Tensor(out, weight)
        if bias is not None:
            out = aten.add.Tensor(out, bias)
        return out, mean, rstd

    return decompose


@register_rule(aten.native_layer_norm.default)
def layer_norm_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Normalized dims unsplit: local, weight/bias replicated. Split: a decomposition."""
    x = ri.tensors[0]
    k = len(_arg(ri, 1, "normalized_shape"))
    affines = _present(ri, (2, "weight"), (3, "bias"))
    eps = float(_arg(ri, 4, "eps"))
    nd = tuple(range(x.ndim - k, x.ndim))
    for src in _variants(x.layout, x.shape, ri.mesh):
        if _split_axes(src.dims, nd):
            affine = Layout(src.dims[x.ndim - k :])
            inputs = (src,) + (affine,) * affines
            yield Strategy(inputs, decompose=_layer_norm_decomposition(ri.op, k, eps))
        else:
            stats = Layout(_out_dims(src.dims, nd, True))
            inputs = (src,) + (_replicated(k),) * affines
            yield Strategy(inputs, (src, stats, stats))


def _layer_norm_backward_decomposition(func: Any, k: int, mask: Sequence[bool]):
    def decompose(
        grad, x, normalized_shape, mean, rstd, weight=None, bias=None, *args: Any, **kwargs: Any
    ):
        nd = list(range(x.ndim - k, x.ndim))
        batch = list(range(x.ndim - k))
        xhat = aten.mul.Tensor(aten.sub.Tensor(x, mean), rstd)
        results: list[Any] = [None, None, None]
        if mask[0]:
            g = grad if weight is None else aten.mul.Tensor(grad, weight)
            g_mean = _reduced(func, aten.mean.dim(g, nd, True))
            gx_mean = _reduced(func, aten.mean.dim(aten.mul.Tensor(g, xhat), nd, True))
            inner = aten.sub.Tensor(aten.sub.Tensor(g, g_mean), aten.mul.Tensor(xhat, gx_mean))
            results[0] = aten.mul.Tensor(inner, rstd)
        if mask[1] and weight is not None:
            gx = aten.mul.Tensor(grad, xhat)
            results[1] = aten.sum.dim_IntList(gx, batch, False) if batch else gx
        if mask[2] and bias is not None:
            results[2] = aten.sum.dim_IntList(grad, batch, False) if batch else grad
        return tuple(results)

    return decompose


@register_rule(aten.native_layer_norm_backward.default)
def layer_norm_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Local over unsplit normalized dims: grad weight/bias partial over the batch split axes."""
    grad, x = ri.tensors[:2]
    k = len(_arg(ri, 2, "normalized_shape"))
    affines = _present(ri, (5, "weight"), (6, "bias"))
    mask = list(_arg(ri, 7, "output_mask"))
    nd = tuple(range(x.ndim - k, x.ndim))
    g = grad.layout
    for src in _variants(x.layout, x.shape, ri.mesh):
        dims = src.dims
        stats = Layout(_out_dims(dims, nd, True))
        if _split_axes(dims, nd):
            affine = Layout(dims[x.ndim - k :])
            inputs = (src, src, stats, stats) + (affine,) * affines
            decompose = _layer_norm_backward_decomposition(ri.op, k, mask)
            yield Strategy(inputs, decompose=decompose)
            continue
        batch_axes = _split_axes(dims, range(x.ndim - k))
        options = [()]
        if g.partial and g.reduce_op == "sum" and not src.used_axes & set(g.partial):
            options.insert(0, g.partial)
        for partial in options:
            g_in = Layout(dims, partial)
            outs = [Layout(dims, partial)] if mask[0] else []
            outs += [Layout(((),) * k, partial + batch_axes)] * (len(ri.outputs) - len(outs))
            inputs = (g_in, src, stats, stats) + (_replicated(k),) * affines
            yield Strategy(inputs, tuple(outs))
