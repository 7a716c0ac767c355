"""Rules for fft ops and complex views: ``_fft_r2c``, ``_fft_c2r``, ``_fft_c2c``, conj,
view_as_real / view_as_complex, complex, polar.

Owns how spectral kernels and complex dtypes meet layouts. It does not own the
pads, flips and reshapes that ``torch.fft`` wraps around its kernels (`_views.py`
and the padding rules), nor pointwise complex arithmetic (`_pointwise.py`).

The rules, by op:

- ``_fft_r2c``, ``_fft_c2r``, ``_fft_c2c``: the transformed dims (``dim``) are
  coupled, every other dim is a batch dim (`_batched.batched`): batch splits
  pass through with no communication; a split transformed dim is gathered (in
  the ledger; strict mode refuses it, naming the op). The transforms are linear,
  so a ``sum``-partial input stays partial.
- ``_conj`` and ``_neg_view`` (the lazy conjugate / negative views behind
  ``x.conj()``, ``x.mH`` and autograd's complex formulas) are computed
  eagerly per block (``conj_physical``, ``neg``). Inside ``__torch_dispatch__``
  torch excludes its Conjugate and Negative keys, so a block carrying a lazy
  bit would be read as its raw memory by the next op: shards never carry one.
  The result is therefore a linked copy of its input (`_aliasing.py`), not an
  alias. Partial sums stay partial (both maps are real-linear); negation swaps
  max and min.
- view_as_real: every dim keeps its split; the new trailing dim of 2 is
  unsplit. view_as_complex: the trailing dim of 2 must be unsplit (gathered
  otherwise); the others keep their split. Both are views (aliases per block)
  and keep ``sum``/``avg`` partials (real and imaginary parts add separately).
- complex(real, imag), polar(abs, angle): elementwise, by the pointwise rule
  (non-partial inputs: they are not linear in one operand alone).

Invariant: every shard of a complex result is a plain (resolved) complex
tensor holding exactly its block.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..layouts._layout import Layout
from ._batched import batched
from ._pointwise import pointwise_rule
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._views import _bind

aten = torch.ops.aten

__all__: list[str] = []


# == fft kernels ================================================================
_FFT = (aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default)


@register_rule(*_FFT)
def fft_rule(ri: RuleInput) -> list[Strategy]:
    """Transformed dims coupled, other dims batch; linear (a sum-partial input stays partial)."""
    (x,) = ri.tensors
    dims = {d % x.ndim for d in _bind(ri.op, ri.args, ri.kwargs)["dim"]} if x.ndim else set()
    labels = tuple(None if d in dims else d for d in range(x.ndim))
    local = _empty_safe(ri.op, dims, ri.outputs[0])
    return [
        Strategy(s.inputs, s.outputs, local=local)
        for s in batched(ri, [labels], [labels], linear=(0,))
    ]


def _empty_safe(op: object, dims: set[int], out: ArgSpec):
    """The kernel, except on an empty block (MKL refuses it): an empty block of the output."""

    def local(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if t.numel():
            return op(t, *args, **kwargs)
        shape = [out.shape[d] if d in dims else n for d, n in enumerate(t.shape)]
        return t.new_empty(shape, dtype=out.dtype)

    return local


# == lazy conjugate and negative views ==========================================
_EAGER = {aten._conj.default: aten.conj_physical.default, aten._neg_view.default: aten.neg.default}


@register_rule(*_EAGER)
def math_bit_rule(ri: RuleInput) -> Iterator[Strategy]:
    """`_conj` / `_neg_view` computed per block (conj_physical / neg): no lazy bit on a shard."""
    (x,) = ri.tensors
    lay = x.layout
    out = lay
    if lay.partial and lay.reduce_op not in ("sum", "avg"):
        if ri.op is aten._neg_view.default:  # -max(a, b) = min(-a, -b)
            out = Layout(lay.dims, lay.partial, {"max": "min", "min": "max"}[lay.reduce_op])
        else:  # conj of a real max/min is the identity: keep it
            out = lay
    yield Strategy((lay,), (out,), local=_EAGER[ri.op])


# == complex views ==============================================================
def _linear_partial(lay: Layout) -> Layout:
    """`lay`, or without partial axes where the reduction is not linear (max/min)."""
    return lay if not lay.partial or lay.reduce_op in ("sum", "avg") else lay.without_partial()


@register_rule(aten.view_as_real.default, aten.view_as_real_copy.default)
def view_as_real_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Every dim keeps its split; the trailing (real, imag) dim is unsplit."""
    (x,) = ri.tensors
    lay = _linear_partial(x.layout)
    yield Strategy((lay,), (Layout((*lay.dims, ()), lay.partial, lay.reduce_op),))


@register_rule(aten.view_as_complex.default, aten.view_as_complex_copy.default)
def view_as_complex_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The trailing dim of 2 unsplit (gathered if split); the other dims keep their split."""
    (x,) = ri.tensors
    lay = _linear_partial(x.layout)
    want = Layout((*lay.dims[:-1], ()), lay.partial, lay.reduce_op)
    yield Strategy((want,), (Layout(lay.dims[:-1], lay.partial, lay.reduce_op),))


register_rule(aten.complex.default, aten.polar.default)(pointwise_rule)
