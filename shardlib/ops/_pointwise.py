"""Rules for pointwise ops (everything tagged `torch.Tag.pointwise`) and their kin.

Owns elementwise propagation with broadcasting, and the partial semantics of
elementwise ops:

- add/sub (and copy_): linear in all operands together; partial-`sum`/`avg`
  operands stay partial when every partial operand has the same partial axes,
  and the others become partial for free (`to_partial`). A Python number
  (int, float, bool or complex) would be added once per summand, so it forbids
  this; `x + c` alone is exact by a local shift instead (c/k per summand of a
  floating or complex sum, c per summand of avg/max/min).
- mul/div: linear in one operand; one partial-`sum`/`avg` operand (the
  numerator, for div) keeps its partial axes if the others are not partial.
  (IEEE corner: a replicated factor holding inf, or a zero divisor, turns
  summands of opposite sign into nan where the reduced value gives inf.)
- neg, clone, detach, alias, positive, zero_: keep the input's partial axes
  and op, except that negation swaps max and min (-max(a, b) = min(-a, -b)).
- dtype casts keep partial axes only where they commute with the reduction
  (`_cast_commutes`: widening float casts for sums, monotone casts for max/min;
  a cast to bfloat16 of a partial sum reduces first).
- anything else is nonlinear: partial inputs are reduced first.
- a partial operand that broadcasts (smaller than the result, or an expanded view) is
  reduced first too, on its compact data: cheaper than reducing the broadcast result.

Also here: the `*_like` and `new_*` fresh-tensor rules, and `torch.equal` /
`torch.allclose` (a decomposition into an elementwise test, a count and
`.item()`).

Output layouts are taken from the inputs (each input's split dims mapped
through broadcasting, and their merge); the dispatcher keeps the cheapest.
"""

from __future__ import annotations

import math

import torch

from ..layouts._layout import Layout
from ._rules import ArgSpec, RuleInput, Strategy, register_rule, register_tag_rule

aten = torch.ops.aten

_ADD = {
    aten.add.Tensor,
    aten.add_.Tensor,
    aten.sub.Tensor,
    aten.sub_.Tensor,
    aten.add.Scalar,
    aten.add_.Scalar,
    aten.sub.Scalar,
    aten.sub_.Scalar,
}
_MUL = {aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.mul_.Scalar}
_DIV = {aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar, aten.div_.Scalar}
_MASKED_FILL = {
    aten.masked_fill.Scalar,
    aten.masked_fill_.Scalar,
    aten.masked_fill.Tensor,
    aten.masked_fill_.Tensor,
}
_UNARY = {
    aten.neg.default,
    aten.neg_.default,
    aten.clone.default,
    aten.detach.default,
    aten.alias.default,
    aten.zero_.default,
    aten.positive.default,
}
_LIKE = {
    aten.ones_like.default,
    aten.zeros_like.default,
    aten.empty_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
}


def _out_dims(s: ArgSpec, out: ArgSpec) -> tuple[tuple[str, ...], ...]:
    """`s`'s split axes placed on the output dims (broadcast dims carry none)."""
    dims = [()] * out.ndim
    off = out.ndim - s.ndim
    for di, axes in enumerate(s.layout.dims):
        if s.shape[di] == out.shape[di + off]:
            dims[di + off] = axes
    return tuple(dims)


def _in_dims(dims: tuple, s: ArgSpec, out: ArgSpec) -> tuple[tuple[str, ...], ...]:
    off = out.ndim - s.ndim
    return tuple(
        dims[di + off] if s.shape[di] == out.shape[di + off] else () for di in range(s.ndim)
    )


def candidate_dims(specs: tuple[ArgSpec, ...], out: ArgSpec) -> list[tuple]:
    """Output dim layouts worth trying: the merge of all inputs', each input's, replicated."""
    each = [_out_dims(s, out) for s in specs]
    merged, used = [()] * out.ndim, set()
    for dims in each:
        for d, axes in enumerate(dims):
            if axes and not merged[d] and not used & set(axes):
                merged[d] = axes
                used |= set(axes)
    found = []
    for dims in (tuple(merged), *each, ((),) * out.ndim):
        if dims not in found:
            found.append(dims)
    return found


def _cast_commutes(op: str, src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting each summand then reducing with `op` equals reducing then casting.

    sum/avg: a cast to a float dtype at least as precise and wide as a float source
    (rounding each summand to bfloat16 and adding in bfloat16 loses what cancels in
    the sum: 6.1 - 3 - 3 becomes 0.09375), integers to floats or to other integers
    (two's-complement wrap-around commutes with addition); never from bool or from a
    float to an integer. max/min: monotone casts (float rounding, float to int
    truncation, bool); not integer narrowing (it wraps) nor to bool.
    """
    if src == dst:
        return True
    src_float = src.is_floating_point or src.is_complex
    dst_float = dst.is_floating_point or dst.is_complex
    if op in ("sum", "avg"):
        if src == torch.bool or dst == torch.bool or (src_float and not dst_float):
            return False
        if src_float:  # float -> float: only widening is exact
            a, b = torch.finfo(src), torch.finfo(dst)
            return b.eps <= a.eps and b.max >= a.max
        return True
    return dst != torch.bool and (dst_float or src_float or src == torch.bool)


def _is_number(a: object) -> bool:
    """A Python scalar operand: int, float, bool or complex (each added once per summand)."""
    return isinstance(a, int | float | complex)


# Unary ops that keep a partial value's axes, and the reduce op of their result per input
# op: negation turns a max of summands into a min of their negations (-max(a, b) is
# min(-a, -b)); copies keep the op; zeroing every summand zeroes the value for every op.
_NEGATING = {aten.neg.default, aten.neg_.default}


def _unary_out_op(op: object, reduce_op: str) -> str:
    if op in _NEGATING:
        return {"max": "min", "min": "max"}.get(reduce_op, reduce_op)
    return reduce_op


def _partial_options(ri: RuleInput) -> list[tuple[tuple[str, ...], str, tuple[bool, ...], str]]:
    """(partial axes, input op, which inputs carry them, output op) choices exact for this op."""
    op, specs = ri.op, ri.tensors
    partial = [s for s in specs if s.layout.partial]
    if not partial:
        return []
    first = partial[0].layout
    same = all(
        s.layout.partial == first.partial and s.layout.reduce_op == first.reduce_op for s in partial
    )
    # -- h9f (issue 9): partial operands of an add over different axes keep the common ones --
    # (a tied embedding's two gradients, P('tp', partial='dp') + P(partial=('dp', 'tp')): the
    # tp partial is reduced into the sum's layout and dp stays partial, one reduce-scatter,
    # instead of reducing both over everything.) a + b = sum_C (a_c + b_c) when each is a
    # sum (or each an average) over the common axes C of values reduced over their others.
    if not same and op in _ADD and not any(_is_number(a) for a in ri.args[:2]):
        common = set(first.partial).intersection(*(s.layout.partial for s in partial))
        if common and all(s.layout.reduce_op == first.reduce_op in ("sum", "avg") for s in partial):
            axes = tuple(a for a in first.partial if a in common)
            return [(axes, first.reduce_op, (True,) * len(specs), first.reduce_op)]
    # -- end h9f ------------------------------------------------------------------------------
    if not same or first.reduce_op not in ("sum", "avg"):
        if op in _UNARY and len(specs) == 1:
            out_op = _unary_out_op(op, first.reduce_op)
            return [(first.partial, first.reduce_op, (True,), out_op)]
        return []
    keep = first.reduce_op
    if op in _ADD:
        # add(x, 2), x + True, x + 1j: the number would be added once per summand
        # (_partial_plus_number handles a lone number exactly).
        if any(_is_number(a) for a in ri.args[:2]):
            return []
        return [(first.partial, keep, tuple(True for _ in specs), keep)]
    if op in _MASKED_FILL:  # filling summands with 0 fills the sum with 0
        if len(partial) != 1 or not specs[0].layout.partial or len(ri.args) < 3 or ri.args[2] != 0:
            return []
        return [(first.partial, keep, (True,) + (False,) * (len(specs) - 1), keep)]
    if op in _MUL or op in _DIV:
        if len(partial) != 1 or (op in _DIV and not specs[0].layout.partial):
            return []
        return [(first.partial, keep, tuple(bool(s.layout.partial) for s in specs), keep)]
    if op in _UNARY or op is aten._to_copy.default:
        out = ri.outputs[0]
        if op is aten._to_copy.default and not _cast_commutes(keep, specs[0].dtype, out.dtype):
            return []
        return [(first.partial, keep, (True,) * len(specs), keep)]
    return []


def _broadcast_partial(s: ArgSpec, out: ArgSpec) -> bool:
    """A partial operand that is a broadcast: smaller than the result, or an expanded view
    (a stride-0 dim of size > 1). It is reduced before the op: reducing its compact data
    now is cheaper than reducing the broadcast result later (the dispatcher moves an
    expanded view's compact data, `_dispatch.move`)."""
    if not s.layout.partial:
        return False
    if math.prod(s.shape) < math.prod(out.shape):
        return True
    return s.stride is not None and any(n > 1 and st == 0 for n, st in zip(s.shape, s.stride))


@register_tag_rule(torch.Tag.pointwise)
@register_rule(*_ADD, *_UNARY, *_MASKED_FILL, aten._to_copy.default)
def pointwise_rule(ri: RuleInput):
    out = ri.outputs[0]
    specs = ri.tensors
    options = [] if any(_broadcast_partial(s, out) for s in specs) else _partial_options(ri)
    shifted = _partial_plus_number(ri)
    for dims in candidate_dims(specs, out):
        if shifted is not None and not {a for axes in dims for a in axes} & set(
            specs[0].layout.partial
        ):
            lay = Layout(
                _in_dims(dims, specs[0], out), specs[0].layout.partial, specs[0].layout.reduce_op
            )
            yield Strategy(
                (lay,),
                (Layout(dims, lay.partial, lay.reduce_op),),
                local=shifted,
                local_device=lay.reduce_op == "sum",
            )
        used = {a for axes in dims for a in axes}
        for axes, op, carries, out_op in options:
            if used & set(axes):
                continue
            yield Strategy(
                tuple(
                    Layout(_in_dims(dims, s, out), axes if c else (), op)
                    for s, c in zip(specs, carries)
                ),
                (Layout(dims, axes, out_op),) * len(ri.outputs),
            )
        yield Strategy(
            tuple(Layout(_in_dims(dims, s, out)) for s in specs),
            (Layout(dims),) * len(ri.outputs),
        )


def _partial_plus_number(ri: RuleInput):
    """`x + c` / `x - c` on a partial x, exact without reducing.

    `c` is any Python number (bool and complex included). For a partial sum the summand
    of the device with index 0 along the partial axes gets c and the others nothing (a
    `local_device` function; exact, integers included, where c/k per summand would
    round); for avg, max and min every summand gets c (a shift commutes with the mean and
    with max/min of reals; a complex number never meets max/min). A result dtype other
    than x's (a float added to an int partial) or a number not in x's kind (complex added
    to a real max) is left to the reduce-first strategy. Returns the local function, or
    None.
    """
    if ri.op not in _ADD or len(ri.tensors) != 1 or not ri.tensors[0].layout.partial:
        return None
    x = ri.tensors[0]
    numbers = [i for i, a in enumerate(ri.args) if _is_number(a)]
    if numbers != [1] or not ri.outputs or ri.outputs[0].dtype != x.dtype:
        return None
    c = ri.args[1]
    if isinstance(c, complex) and not x.dtype.is_complex:
        return None
    if x.layout.reduce_op != "sum":
        return ri.op
    mesh, axes, op = ri.mesh, x.layout.partial, ri.op
    keeps = {d for d in range(mesh.size) if not mesh.index_along(d, axes)}

    def local(dev, t, c, *rest, **kwargs):
        return op(t, c if dev in keeps else 0, *rest, **kwargs)

    return local


@register_rule(*_LIKE)
def like_rule(ri: RuleInput):
    """A fresh value of the input's shape: same split dims, never partial."""
    (x,) = ri.tensors
    yield Strategy((x.layout,), (x.layout.without_partial(),))


@register_rule(aten.copy_.default)
def copy_rule(ri: RuleInput):
    """`dst.copy_(src)`: dst keeps its layout; src is brought to it (partial included, any op)."""
    dst, src = ri.tensors[0], ri.tensors[1]
    want = Layout(_in_dims(dst.layout.dims, src, dst), dst.layout.partial, dst.layout.reduce_op)
    yield Strategy((dst.layout, want, *(s.layout for s in ri.tensors[2:])), (dst.layout,))


@register_rule(aten.new_empty_strided.default, aten.new_ones.default, aten.new_full.default)
def new_tensor_rule(ri: RuleInput):
    """A fresh tensor of a given size (autograd's gradient buffers): replicated, input as is.

    The input's values are unused, so it is not moved; every device builds the whole
    tensor (new_empty_strided's strides describe that whole tensor). `new_zeros` and
    `new_empty`, which keep split dims of an equal-shaped model, are view rules.
    """
    out = ri.outputs[0]
    # -- h9e (issue 9): a buffer of the model's own shape keeps the model's splits ----------
    # (autograd's AccumulateGrad re-lays a gradient whose strides differ from its leaf's
    # into `grad.new_empty_strided(size, leaf strides)` + copy_: replicated, that copy_
    # gathered every such gradient, e.g. any linalg gradient made from LAPACK's column-major
    # results.) Each block is dense in the requested strides' dim order.
    x = ri.tensors[0]
    if ri.op is aten.new_empty_strided.default and x.shape == out.shape and any(x.layout.dims):
        lay = x.layout.without_partial()
        yield Strategy((x.layout,), (lay,), local=_blocks_in_stride_order(out), local_device=True)
    # -- end h9e --------------------------------------------------------------------------
    yield Strategy(tuple(s.layout for s in ri.tensors), (Layout(((),) * out.ndim),))


def _blocks_in_stride_order(out: ArgSpec):
    """new_empty_strided per device: the device's block shape, dense in the order of `out`'s
    strides (outermost = largest stride), as torch's empty_like keeps a dim order. (h9e)"""
    order = sorted(range(out.ndim), key=lambda d: (-out.stride[d], -d))

    def local(dev: int, t: torch.Tensor, size, stride, *args, **kwargs) -> torch.Tensor:
        shape = t.shape
        strides = [0] * len(shape)
        step = 1
        for d in reversed(order):
            strides[d] = step
            step *= max(shape[d], 1)
        return aten.new_empty_strided.default(t, list(shape), strides, *args, **kwargs)

    return local


# == whole-tensor comparisons ===================================================
def _mismatch_count(a, b, *, close: tuple | None = None):
    """How many elements of `a` and `b` differ (`close`: isclose's rtol, atol, equal_nan)."""
    if close is None:
        differ = aten.ne.Tensor(a, b)
    else:
        differ = aten.logical_not.default(aten.isclose.default(a, b, *close))
    count = aten.sum.default(aten._to_copy.default(differ, dtype=torch.int64))
    return aten._local_scalar_dense.default(count)


def _equal(a, b) -> bool:
    if tuple(a.shape) != tuple(b.shape):
        return False
    return _mismatch_count(a, b) == 0


def _allclose(a, b, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = False) -> bool:
    return _mismatch_count(a, b, close=(rtol, atol, equal_nan)) == 0


@register_rule(aten.equal.default, aten.allclose.default)
def comparison_rule(ri: RuleInput):
    """`torch.equal` / `torch.allclose`: a Python bool from an elementwise test and a count.

    A decomposition: `ne` (or `isclose`) by the pointwise rules, a sum of the
    mismatches (partial over split axes) and `.item()` (an all-reduce of one number);
    every rank gets the same answer.
    """
    yield Strategy(
        tuple(s.layout for s in ri.tensors),
        decompose=_equal if ri.op is aten.equal.default else _allclose,
    )
