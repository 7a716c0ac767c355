"""Rules for linear algebra and structured matrix ops.

Owns the layout rules of the ``torch.linalg`` kernels and their older spellings
(cholesky, lu, qr, svd, eig, solve, inv, det ...), of the structured matrix
ops (tril, triu, diag_embed, diagonal_scatter, trace, cross, cdist, addbmm,
bilinear's ``_trilinear``) and of a few stragglers (slice_scatter, unfold,
as_strided and its copy / scatter forms, tensor-ended linspace / logspace,
hash_tensor). It does not own the views and reductions those ops' backward
formulas emit (`_views.py`, `_reductions.py`), nor contractions
(`_contractions.py`, whose einsum strategies addbmm reuses).

The rules, by op:

- linalg kernels (`_MATRIX`): every operand is a batch of matrices (or of
  vectors, or of scalars: its *core* is its last 2, 1 or 0 dims). Batch dims
  are right-aligned over the dims before the core, so broadcast batch dims
  line up (``solve(A[b, n, n], B[n, k])``). `_batched.batched` makes the
  strategies: batch splits pass through (no communication), a split core dim
  is gathered, in the ledger (strict mode refuses it, naming the op). Solves
  are linear in the right-hand side: a ``sum``-partial B stays partial.
  ``_linalg_check_errors`` checks each device's block of ``info``.
- tril / triu (and in-place): local on every layout: a device whose block
  starts at row r0 and column c0 keeps ``diagonal + r0 - c0`` (no gather).
  Partial inputs stay partial (zeros are every reduction's fixed point).
- diag_embed: the diagonal's dim unsplit, or, at offset 0, split over A with
  the output's row dim split over A (each device writes its rows). diag and
  diagflat decompose into it above dispatch.
- diagonal_scatter: the input keeps any layout; each device writes the part
  of the diagonal inside its block (the source's diagonal dim unsplit).
- slice_scatter: the same, for a slice along a dim.
- trace: each block sums the diagonal entries inside it: a partial sum over
  the split axes (no gather).
- linalg_cross: the dim of size 3 coupled, every other dim batch.
- ``_cdist_forward``: batch and row splits of x1 and x2 are local (the output
  split on both row dims); ``_cdist_backward`` with the other operand's rows
  split gives a ``sum``-partial gradient (its sum over those rows).
- ``_trilinear`` (bilinear): decomposed into an einsum of the three operands.
- addbmm: the einsum rule of ``bij,bjk->ik`` with the bias laid out like the
  output (a split batch gives a partial-sum result, as bmm + sum would).
- unfold: the unfolded dim coupled (windows cross block edges: gathered),
  others batch; a view.
- as_strided, as_strided_copy, as_strided_scatter: strides address the whole
  storage, so they run on replicas only: a split input of a contiguous tensor
  is gathered (ledger); any other is refused with a fix.
- linspace / logspace with tensor ends: the (0-dim) ends replicated, a
  replicated result. hash_tensor: the hashed dims whole, the others batch.

Invariant: every strategy is exact for uneven and empty blocks; an input is
partial only where the op is linear in it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from .._errors import LayoutError
from ..layouts._layout import Layout
from ..layouts._shard import local_bounds
from ._batched import batched
from ._contractions import einsum_strategies
from ._pointwise import _in_dims
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._views import _bind

aten = torch.ops.aten

__all__ = ["matrix_labels"]

Labels = tuple[Hashable | None, ...]


def _wrap(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _lay(dims: Sequence[tuple[str, ...]], like: Layout | None = None) -> Layout:
    """A layout with `dims` and `like`'s partial axes (none without `like`)."""
    if like is None:
        return Layout(tuple(dims))
    return Layout(tuple(dims), like.partial, like.reduce_op)


# == batched matrix kernels =====================================================
def matrix_labels(spec: ArgSpec, core: int) -> Labels:
    """Batch labels of a tensor whose last `core` dims are one matrix (2), vector (1) or scalar (0).

    Labels count from the right of the batch dims, so broadcast batch dims line up
    across operands of different ranks; a placeholder output smaller than its core
    (svd's empty U without ``compute_uv``) has none.

    Examples:
        >>> import torch
        >>> matrix_labels(ArgSpec((4, 2, 3, 3), torch.float64), 2)
        (('batch', -2), ('batch', -1), None, None)
        >>> matrix_labels(ArgSpec((2, 3), torch.float64), 1)
        (('batch', -1), None)
    """
    batch = spec.ndim - core
    if batch < 0:
        return (None,) * spec.ndim
    return tuple(("batch", d - batch) for d in range(batch)) + (None,) * core


# op -> (core dims per tensor input, core dims per tensor output, inputs it is linear in).
# Inputs beyond the listed ones (pinv's optional atol/rtol) repeat the last entry.
_MATRIX: dict[Any, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    aten.linalg_inv_ex.default: ((2,), (2, 0), ()),
    aten._linalg_det.default: ((2,), (0, 2, 1), ()),
    aten._linalg_slogdet.default: ((2,), (0, 0, 2, 1), ()),
    aten._linalg_eigh.default: ((2,), (1, 2), ()),
    aten.linalg_eig.default: ((2,), (1, 2), ()),
    aten._linalg_svd.default: ((2,), (2, 1, 2), ()),
    aten.linalg_cholesky_ex.default: ((2,), (2, 0), ()),
    aten.cholesky.default: ((2,), (2,), ()),
    aten.cholesky_inverse.default: ((2,), (2,), ()),
    aten.cholesky_solve.default: ((2, 2), (2,), (0,)),
    aten.linalg_qr.default: ((2,), (2, 2), ()),
    aten.geqrf.default: ((2,), (2, 1), ()),  # reached once torch has its meta kernel
    aten.linalg_householder_product.default: ((2, 1), (2,), ()),
    aten.ormqr.default: ((2, 1, 2), (2,), (2,)),
    aten.linalg_lu.default: ((2,), (2, 2, 2), ()),
    aten.linalg_lu_factor_ex.default: ((2,), (2, 1, 0), ()),
    aten.linalg_lu_solve.default: ((2, 1, 2), (2,), (2,)),
    aten.lu_unpack.default: ((2, 1), (2, 2, 2), ()),
    aten.linalg_ldl_factor_ex.default: ((2,), (2, 1, 0), ()),
    aten.linalg_ldl_solve.default: ((2, 1, 2), (2,), (2,)),
    aten.linalg_solve_triangular.default: ((2, 2), (2,), (1,)),
    aten.triangular_solve.default: ((2, 2), (2, 2), ()),
    aten.linalg_matrix_exp.default: ((2,), (2,), ()),
    aten.linalg_pinv.atol_rtol_tensor: ((2, 0), (2,), ()),
}


def _solve_cores(ri: RuleInput) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """`_linalg_solve_ex(A, B)`: B is a batch of vectors when torch reads it so."""
    a, b = ri.tensors
    vector = b.ndim == 1 or (b.ndim == a.ndim - 1 and b.shape == a.shape[:-1])
    rhs = 1 if vector else 2
    return (2, rhs), (rhs, 2, 1, 0), ()


def _cores(ri: RuleInput) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    if ri.op is aten._linalg_solve_ex.default:
        return _solve_cores(ri)
    ins, outs, linear = _MATRIX[ri.op]
    n = len(ri.tensors)
    return (*ins, *(ins[-1:] * (n - len(ins))))[:n], outs, linear


@register_rule(*_MATRIX, aten._linalg_solve_ex.default)
def matrix_rule(ri: RuleInput) -> list[Strategy]:
    """Batched matrix kernels: batch splits pass through, matrix dims whole (gathered if split)."""
    ins, outs, linear = _cores(ri)
    return batched(
        ri,
        [matrix_labels(s, c) for s, c in zip(ri.tensors, ins)],
        [matrix_labels(s, c) for s, c in zip(ri.outputs, outs)],
        linear=linear,
    )


def _check_errors(info: Any, api_name: str, *, is_matrix: bool) -> None:
    """torch's error check on each device's block of `info` (no communication)."""
    for block in info._shards:
        aten._linalg_check_errors.default(block, api_name, is_matrix=is_matrix)


@register_rule(aten._linalg_check_errors.default)
def check_errors_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Raise torch's error where a device's block of `info` flags a failure."""
    (info,) = ri.tensors
    yield Strategy((info.layout.without_partial(),), decompose=_check_errors)


# == triangles and diagonals ====================================================
def _block_start(shape: tuple[int, ...], layout: Layout, mesh: Any, dev: int, d: int) -> int:
    """Global index of device `dev`'s first element along dim `d`."""
    return local_bounds(shape, layout, mesh, dev)[d][0]


_TRIANGLES = {
    aten.tril.default: aten.tril.default,
    aten.triu.default: aten.triu.default,
    aten.tril_.default: aten.tril_.default,
    aten.triu_.default: aten.triu_.default,
}


@register_rule(*_TRIANGLES)
def triangle_rule(ri: RuleInput) -> Iterator[Strategy]:
    """tril/triu on any layout: each block shifts the diagonal by its row and column start.

    Partial inputs stay partial with their reduce op (a zeroed summand is zero in every
    reduction of zeros, and kept entries are untouched).
    """
    (x,) = ri.tensors
    lay = x.layout
    if not (lay.dims[-2] or lay.dims[-1]):
        yield Strategy((lay,), (lay,))
        return
    op, shape, mesh = _TRIANGLES[ri.op], x.shape, ri.mesh
    k = _bind(ri.op, ri.args, ri.kwargs)["diagonal"]

    def local(dev: int, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        r0 = _block_start(shape, lay, mesh, dev, x.ndim - 2)
        c0 = _block_start(shape, lay, mesh, dev, x.ndim - 1)
        return op(t, k + r0 - c0)

    yield Strategy((lay,), (lay,), local=local, local_device=True)


@register_rule(aten.diag_embed.default)
def diag_embed_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Vectors along the last dim onto the diagonal of (dim1, dim2); batch dims keep their split.

    At offset 0 a split diagonal stays split: the output's dim1 (rows) is split over the
    same axes and each device writes its rows' diagonal entries (no communication).
    Otherwise the diagonal's dim is gathered (a vector: cheap). Partial inputs stay partial.
    """
    (x,) = ri.tensors
    out = ri.outputs[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    offset = b["offset"]
    d1, d2 = _wrap(b["dim1"], out.ndim), _wrap(b["dim2"], out.ndim)
    lay = x.layout
    others = [d for d in range(out.ndim) if d not in (d1, d2)]
    axes = lay.dims[-1] if x.ndim else ()

    def out_layout(row_axes: tuple[str, ...]) -> Layout:
        dims = [()] * out.ndim
        for d, a in zip(others, lay.dims[:-1]):
            dims[d] = a
        dims[d1] = row_axes
        return _lay(dims, lay)

    if axes and offset == 0:
        shape, mesh = x.shape, ri.mesh

        def local(dev: int, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            lo = _block_start(shape, lay, mesh, dev, x.ndim - 1)
            size = [0] * out.ndim
            for d, n in zip(others, t.shape[:-1]):
                size[d] = n
            size[d1], size[d2] = t.shape[-1], out.shape[d2]
            block = t.new_zeros(size)
            block.diagonal(lo, d1, d2).copy_(t)
            return block

        yield Strategy((lay,), (out_layout(axes),), local=local, local_device=True)
    whole = lay.with_dim(x.ndim - 1, ()) if x.ndim else lay
    yield Strategy((whole,), (out_layout(()),))


def _diagonal_source_layout(inp: Layout, d1: int, d2: int, src: ArgSpec) -> Layout:
    """The source of a diagonal_scatter: batch dims like the input's, the diagonal dim whole."""
    dims = [a for d, a in enumerate(inp.dims) if d not in (d1, d2)] + [()]
    return Layout(tuple(dims[: src.ndim]), inp.partial, inp.reduce_op)


@register_rule(aten.diagonal_scatter.default)
def diagonal_scatter_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The input keeps its layout; each device writes the diagonal entries inside its block.

    The source's diagonal dim is unsplit (a vector per matrix); its batch dims are split
    like the input's. A sum/avg-partial input takes a source partial alike (jointly
    linear); other partial inputs are reduced first.
    """
    x, src = ri.tensors
    b = _bind(ri.op, ri.args, ri.kwargs)
    offset = b["offset"]
    d1, d2 = _wrap(b["dim1"], x.ndim), _wrap(b["dim2"], x.ndim)
    lay = _linear_partial(x.layout)
    want_src = _diagonal_source_layout(lay, d1, d2, src)
    if not (lay.dims[d1] or lay.dims[d2]):
        yield Strategy((lay, want_src), (lay,))
        return
    shape, mesh = x.shape, ri.mesh
    op = ri.op

    def local(dev: int, t: torch.Tensor, s: torch.Tensor, *args: Any, **kwargs: Any):
        r0 = _block_start(shape, lay, mesh, dev, d1)
        c0 = _block_start(shape, lay, mesh, dev, d2)
        k = offset + r0 - c0  # the global diagonal in block coordinates
        count = t.diagonal(k, d1, d2).shape[-1] if t.numel() else 0
        if count == 0:
            return t.clone()
        first_row = r0 + max(0, -k)  # global row of the block's first diagonal entry
        start = first_row - max(0, -offset)  # its index along the global diagonal
        return op(t, s.narrow(-1, start, count), k, d1, d2)

    yield Strategy((lay, want_src), (lay,), local=local, local_device=True)


def _linear_partial(lay: Layout) -> Layout:
    """`lay`, or without its partial axes where the reduction is max/min (not linear)."""
    return lay if not lay.partial or lay.reduce_op in ("sum", "avg") else lay.without_partial()


@register_rule(aten.trace.default)
def trace_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Each block sums the global diagonal's entries inside it: partial-sum over the split axes.

    No communication on any layout. A sum-partial input adds its partial axes (trace is
    linear); an avg-partial one stays avg when nothing is split; other partials are
    reduced first.
    """
    (x,) = ri.tensors
    lay = x.layout
    split = tuple(a for axes in lay.dims for a in axes)
    if not split:
        keep = lay.partial and lay.reduce_op in ("sum", "avg")
        yield Strategy(
            (lay if keep else lay.without_partial(),),
            (Layout((), lay.partial, lay.reduce_op) if keep else Layout(()),),
        )
        return
    want = lay if lay.partial and lay.reduce_op == "sum" else lay.without_partial()
    shape, mesh, dtype = x.shape, ri.mesh, ri.outputs[0].dtype

    def local(dev: int, t: torch.Tensor) -> torch.Tensor:
        r0 = _block_start(shape, want, mesh, dev, 0)
        c0 = _block_start(shape, want, mesh, dev, 1)
        return t.diagonal(r0 - c0).sum(dtype=dtype)  # an empty block sums to 0

    yield Strategy(
        (want,), (Layout((), split + want.partial, "sum"),), local=local, local_device=True
    )


# == products and distances =====================================================
@register_rule(aten.linalg_cross.default)
def cross_rule(ri: RuleInput) -> list[Strategy]:
    """The dim of size 3 coupled, every other dim batch (broadcast); linear in each operand."""
    out = ri.outputs[0]
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], out.ndim)

    def labels(s: ArgSpec) -> Labels:
        off = out.ndim - s.ndim
        return tuple(None if i + off == d else i + off for i in range(s.ndim))

    return batched(ri, [labels(s) for s in ri.tensors], [labels(out)], linear=(0, 1))


def _rows_labels(spec: ArgSpec, rows: str) -> Labels:
    """(batch..., rows, None): a batch of point sets (rows) in a coupled feature dim."""
    return (*matrix_labels(spec, 2)[:-2], rows, None)


@register_rule(aten._cdist_forward.default)
def cdist_rule(ri: RuleInput) -> list[Strategy]:
    """Batch and row splits of both point sets are local: the output splits on both row dims."""
    x1, x2 = ri.tensors
    out = ri.outputs[0]
    return batched(
        ri,
        [_rows_labels(x1, "p"), _rows_labels(x2, "r")],
        [(*matrix_labels(out, 2)[:-2], "p", "r")],
    )


def _cdist_backward_local(grad: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, *args: Any):
    """The kernel on contiguous blocks; on an empty block, zeros of the block's gradient shape
    (the kernel returns x1's unbroadcast shape there)."""
    if grad.numel() == 0 or x1.numel() == 0 or x2.numel() == 0:
        return x1.new_zeros((*grad.shape[:-2], *x1.shape[-2:]))
    *rest, dist = args
    return aten._cdist_backward.default(
        grad.contiguous(), x1.contiguous(), x2.contiguous(), *rest, dist.contiguous()
    )


@register_rule(aten._cdist_backward.default)
def cdist_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """x1's gradient: a sum over x2's rows. With those rows split, a sum-partial gradient.

    Batch and x1-row splits pass through (batched); x2's rows split over axes R (grad,
    x2 and cdist split alike there) leave each device the sum over its rows: partial
    over R, no communication.
    """
    grad, x1, x2, dist = ri.tensors
    out = ri.outputs[0]
    local = _cdist_backward_local
    batch = matrix_labels(out, 2)[:-2]
    pairs = (*batch, "p", None)
    found = batched(
        ri,
        [pairs, _rows_labels(x1, "p"), (*matrix_labels(x2, 2)[:-2], None, None), pairs],
        [_rows_labels(out, "p")],
    )
    rows = grad.layout.dims[-1] or dist.layout.dims[-1] or x2.layout.dims[-2]
    for s in found:
        yield Strategy(s.inputs, s.outputs, local=local)
        used = {a for lay in s.inputs for axes in lay.dims for a in axes}
        if rows and not used & set(rows) and s.inputs[0].dims[-1] == ():
            g, a, b, c = s.inputs
            yield Strategy(
                (
                    g.with_dim(grad.ndim - 1, rows),
                    a,
                    b.with_dim(x2.ndim - 2, rows),
                    c.with_dim(dist.ndim - 1, rows),
                ),
                (s.outputs[0].with_partial(rows, "sum"),),
                local=local,
            )


def _trilinear_equation(ri: RuleInput) -> str:
    """The einsum equation of ``_trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim)``."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    total = ri.tensors[0].ndim + len(b["expand1"])
    letters = "abcdefghijklmnopqrstuvwxyz"[:total]
    terms = [
        "".join(letters[d] for d in range(total) if d not in set(b[f"expand{i}"]))
        for i in (1, 2, 3)
    ]
    out = "".join(letters[d] for d in range(total) if d not in set(b["sumdim"]))
    return ",".join(terms) + "->" + out


@register_rule(aten._trilinear.default)
def trilinear_rule(ri: RuleInput) -> Iterator[Strategy]:
    """bilinear's kernel as an einsum of its three operands (each contraction by its rule)."""
    eq = _trilinear_equation(ri)

    def decompose(i1: Any, i2: Any, i3: Any, *args: Any, **kwargs: Any) -> Any:
        return torch.einsum(eq, i1, i2, i3)

    yield Strategy(tuple(s.layout for s in ri.tensors), decompose=decompose)


def _addbmm_local(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *args: Any, **kwargs: Any):
    """addbmm on blocks, the bias broadcast to the block's product shape first."""
    return aten.addbmm.default(bias.expand(a.shape[1], b.shape[2]), a, b, *args, **kwargs)


@register_rule(aten.addbmm.default)
def addbmm_rule(ri: RuleInput) -> Iterator[Strategy]:
    """``beta * self + alpha * sum_b b1[b] @ b2[b]``: the einsum rule of ``bij,bjk->ik``.

    The bias is laid out like the output, partial where the output is (so it is added
    once): a split batch or inner dim leaves a partial-sum result.
    """
    bias, b1, b2 = ri.tensors
    out = ri.outputs[0]
    for inputs, lay in einsum_strategies("bij,bjk->ik", (b1, b2)):
        want_bias = Layout(_in_dims(lay.dims, bias, out), lay.partial, lay.reduce_op)
        yield Strategy((want_bias, *inputs), (lay,), local=_addbmm_local)


# == scatters into a slice, windows, strided views ==============================
def _slice_range(n: int, start: int | None, step: int) -> int:
    """torch's normalized start of a slice of a dim of size `n`."""
    start = 0 if start is None else start
    if start < 0:
        start += n
    return min(max(start, 0), n)


@register_rule(aten.slice_scatter.default)
def slice_scatter_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The input keeps its layout; each device writes the part of the slice inside its block.

    The source is split like the input on every other dim and unsplit along `dim` (it is
    the slice: no larger than the input). Sum/avg-partial inputs take a source partial
    alike (jointly linear); max/min-partial inputs are reduced first.
    """
    x, src = ri.tensors
    b = _bind(ri.op, ri.args, ri.kwargs)
    d = _wrap(b["dim"], x.ndim)
    lay = _linear_partial(x.layout)
    want_src = Layout(
        tuple(() if i == d else a for i, a in enumerate(lay.dims)), lay.partial, lay.reduce_op
    )
    if not lay.dims[d]:
        yield Strategy((lay, want_src), (lay,))
        return
    step, count = b["step"], src.shape[d]
    start = _slice_range(x.shape[d], b["start"], step)
    shape, mesh, op = x.shape, ri.mesh, ri.op

    def local(dev: int, t: torch.Tensor, s: torch.Tensor, *args: Any, **kwargs: Any):
        lo, hi = local_bounds(shape, lay, mesh, dev)[d]
        first = min(count, max(0, -(-(lo - start) // step)))  # slice entries inside [lo, hi)
        last = min(count, max(0, -(-(hi - start) // step)))
        if last <= first:
            return t.clone()
        begin = start + first * step - lo
        return op(
            t,
            s.narrow(d, first, last - first),
            d,
            begin,
            begin + (last - first - 1) * step + 1,
            step,
        )

    yield Strategy((lay, want_src), (lay,), local=local, local_device=True)


def _unfold_labels(ndim: int, d: int) -> tuple[Labels, Labels]:
    """(input, output) labels of unfold along `d`: `d` and the new window dim coupled."""
    inp = tuple(None if i == d else i for i in range(ndim))
    return inp, (*inp, None) if ndim else (None,)


@register_rule(aten.unfold.default, aten.unfold_copy.default)
def unfold_rule(ri: RuleInput) -> list[Strategy]:
    """Windows along an unsplit dim (a split one is gathered: windows cross block edges)."""
    (x,) = ri.tensors
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dimension"], x.ndim)
    inp, out = _unfold_labels(x.ndim, d)
    return batched(ri, [inp], [out])


@register_rule(aten.unfold_backward.default)
def unfold_backward_rule(ri: RuleInput) -> list[Strategy]:
    """The windows' gradient summed back along the unfolded dim; other dims batch.

    `input_sizes` is global: each device passes its block's sizes.
    """
    (g,) = ri.tensors
    out = ri.outputs[0]
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], out.ndim)
    inp, windows = _unfold_labels(out.ndim, d)
    n = out.shape[d] if out.ndim else 1

    def local(grad: torch.Tensor, sizes: Any, dim: int, size: int, step: int) -> torch.Tensor:
        local_sizes = [n if i == d else grad.shape[i] for i in range(out.ndim)]
        return aten.unfold_backward.default(grad, local_sizes, dim, size, step)

    return [
        Strategy(s.inputs, s.outputs, local=local)
        for s in batched(ri, [windows], [inp], linear=(0,))
    ]


def _contiguous_at_zero(s: ArgSpec) -> bool:
    want = torch.empty(s.shape, device="meta").stride()
    return s.offset == 0 and (
        s.stride is None or all(st == w for n, st, w in zip(s.shape, s.stride, want) if n > 1)
    )


def _strided_refusal(ri: RuleInput, x: ArgSpec) -> LayoutError:
    name = str(ri.op).removeprefix("aten.")
    return LayoutError(
        f"{name}: the input (shape {x.shape}, layout {x.layout!r}) is a strided view "
        f"(strides {x.stride}, storage offset {x.offset}) of a larger storage; as_strided "
        "addresses that storage, which no device holds whole. Call it on the contiguous "
        "tensor the view was taken from, or on x.full()."
    )


def _on_storage(op: Any, spec: ArgSpec, fresh: bool) -> Callable:
    """`op` on each replica, addressed as torch addresses the global tensor's storage.

    A contiguous global tensor at offset 0 starts its storage: a replica is made contiguous
    and offsets count from its first element. Otherwise the replica must have the global
    tensor's own geometry (then its storage is laid out as the global one).
    """
    contiguous = _contiguous_at_zero(spec)

    def local(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if contiguous:
            t = t.clone(memory_format=torch.contiguous_format) if fresh else t.contiguous()
            b = _bind(op, (t, *args), kwargs)
            b["storage_offset"] = t.storage_offset() + (b.get("storage_offset") or 0)
            return op(*(b[a.name] for a in op._schema.arguments))
        if t.stride() != tuple(spec.stride) or t.storage_offset() != spec.offset:
            raise LayoutError(
                f"{op}: a replica's geometry (strides {t.stride()}, offset "
                f"{t.storage_offset()}) differs from the tensor's ({spec.stride}, "
                f"{spec.offset}), so its storage is not laid out as the global one. Call it "
                "on x.full(), or on the contiguous tensor the view was taken from."
            )
        return op(t, *args, **kwargs)

    return local


@register_rule(aten.as_strided.default, aten.as_strided_copy.default)
def as_strided_rule(ri: RuleInput) -> Iterator[Strategy]:
    """On replicas only (gathered if split): strides address the whole storage.

    Partial inputs stay partial (the op only picks elements).
    """
    x = ri.tensors[0]
    replicated = Layout(((),) * x.ndim, x.layout.partial, x.layout.reduce_op)
    if not (x.layout.dims == replicated.dims or _contiguous_at_zero(x)):
        raise _strided_refusal(ri, x)
    out = Layout(((),) * ri.outputs[0].ndim, x.layout.partial, x.layout.reduce_op)
    yield Strategy((replicated,), (out,), local=_on_storage(ri.op, x, False))


@register_rule(aten.as_strided_scatter.default)
def as_strided_scatter_rule(ri: RuleInput) -> Iterator[Strategy]:
    """On replicas only (gathered if split); non-partial."""
    x, src = ri.tensors
    if not (x.layout.is_replicated or _contiguous_at_zero(x)):
        raise _strided_refusal(ri, x)
    yield Strategy(
        (Layout(((),) * x.ndim), Layout(((),) * src.ndim)),
        (Layout(((),) * x.ndim),),
        local=_on_storage(ri.op, x, True),
    )


# == stragglers =================================================================
_SPACES = (
    aten.linspace.Tensor_Tensor,
    aten.linspace.Tensor_Scalar,
    aten.linspace.Scalar_Tensor,
    aten.logspace.Tensor_Tensor,
    aten.logspace.Tensor_Scalar,
    aten.logspace.Scalar_Tensor,
)


@register_rule(*_SPACES)
def space_rule(ri: RuleInput) -> Iterator[Strategy]:
    """linspace / logspace from 0-dim tensor ends: the ends reduced (a partial one), a replica."""
    yield Strategy(
        tuple(Layout(((),) * s.ndim) for s in ri.tensors), (Layout(((),) * ri.outputs[0].ndim),)
    )


@register_rule(aten.hash_tensor.default)
def hash_tensor_rule(ri: RuleInput) -> list[Strategy]:
    """A hash (xor of the bits) over the reduced dims: those dims whole, the others batch."""
    (x,) = ri.tensors
    b = _bind(ri.op, ri.args, ri.kwargs)
    dims = {_wrap(d, x.ndim) for d in b["dim"]} if b["dim"] else set(range(x.ndim))
    labels = tuple(None if d in dims else d for d in range(x.ndim))
    kept = labels if b["keepdim"] else tuple(lab for lab in labels if lab is not None)
    return batched(ri, [labels], [kept])
