"""Rules for constant fills and boolean reductions: fill_/fill, any/all.

Owns:
- ``fill_`` / ``fill`` with a number or a 0-d tensor (``t[2:5] = 0``, ``nn.init.constant_``):
  every element becomes the value, whatever the layout. On a partial tensor the value is
  written as summands: for ``sum`` the device with index 0 along the partial axes holds it
  and the others zeros; for ``avg``/``max``/``min`` every device holds it. A sharded 0-d
  value is made replicated first.
- ``any`` / ``all`` (whole tensor, one dim, several dims): a local reduction on each block;
  over split dims the blocks' answers combine as a count (how many elements are true, or
  false), which is a partial sum reduced by the comparison that finishes the op. Partial
  inputs are reduced first (truth is not linear).

Deliberately not here: elementwise comparisons (pointwise rules) and ``equal``/``allclose``
(torch's composites of these).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..layouts._layout import Layout
from ._rules import RuleInput, Strategy, register_rule

aten = torch.ops.aten

__all__: list[str] = []

_FILL = {aten.fill_.Scalar, aten.fill_.Tensor, aten.fill.Scalar, aten.fill.Tensor}


@register_rule(*_FILL)
def fill_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Fill in the tensor's own layout; a partial sum keeps the value on index 0 only."""
    x = ri.tensors[0]
    lay = x.layout
    out = lay if ri.op in (aten.fill_.Scalar, aten.fill_.Tensor) else lay.without_partial()
    value = (Layout(((),) * ri.tensors[1].ndim),) if len(ri.tensors) > 1 else ()
    zero_here = None
    if out.partial and out.reduce_op == "sum":
        mesh, axes = ri.mesh, out.partial
        zero_here = {d for d in range(mesh.size) if mesh.index_along(d, axes)}
    op = ri.op

    def local(dev: int, t: torch.Tensor, v: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if zero_here is not None and dev in zero_here:
            v = torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0
        return op(t, v, *args, **kwargs)

    yield Strategy((lay, *value), (out,), local=local, local_device=True)


_ANY = {aten.any.default, aten.any.dim, aten.any.dims}
_ALL = {aten.all.default, aten.all.dim, aten.all.dims}


def _reduced_dims(ri: RuleInput) -> tuple[int, ...]:
    x = ri.tensors[0]
    dim = ri.args[1] if len(ri.args) > 1 else ri.kwargs.get("dim")
    if dim is None or x.ndim == 0:
        return tuple(range(x.ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted({d % x.ndim for d in dims})) if dims else tuple(range(x.ndim))


@register_rule(*_ANY, *_ALL)
def truth_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Local any/all; split reduced dims are combined by counting (a partial sum)."""
    x = ri.tensors[0]
    lay = x.layout.without_partial()
    dims = _reduced_dims(ri)
    split = [d for d in dims if lay.dims[d]]
    if not split:
        yield Strategy((lay,), (_drop(lay, dims, ri),))
        return
    yield Strategy((lay,), decompose=_counted(ri.op, dims, ri.op in _ANY))


def _keepdim(ri: RuleInput) -> bool:
    if len(ri.args) > 2:
        return bool(ri.args[2])
    return bool(ri.kwargs.get("keepdim", False))


def _drop(lay: Layout, dims: tuple[int, ...], ri: RuleInput) -> Layout:
    """The output layout of a reduction over unsplit `dims` (kept as size 1 with keepdim)."""
    if ri.op in (aten.any.default, aten.all.default) or not _keepdim(ri):
        return Layout(tuple(a for d, a in enumerate(lay.dims) if d not in dims))
    return lay


def _counted(op: Any, dims: tuple[int, ...], is_any: bool) -> Any:
    """any = (count of true elements) > 0, all = (count of false elements) == 0, per device."""

    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        keep = bool(args[1]) if len(args) > 1 else bool(kwargs.get("keepdim", False))
        whole = op in (aten.any.default, aten.all.default)
        hits = aten.ne.Scalar(x, 0) if is_any else aten.eq.Scalar(x, 0)
        count = aten.sum.dim_IntList(hits, list(dims), keep and not whole, dtype=torch.int64)
        out = aten.gt.Scalar(count, 0) if is_any else aten.eq.Scalar(count, 0)
        if x.dtype == torch.uint8:  # torch keeps uint8 for any/all of uint8
            out = aten._to_copy.default(out, dtype=torch.uint8)
        return out

    return run
