"""Rules for contractions: mm, bmm, addmm, baddbmm, mv, dot — one einsum-equation rule.

Owns the einsum rule: each mesh axis is given to at most one equation label.
An axis on a label both operands carry and the output keeps is a batch split
(no communication); on a label only one operand carries, the other operand is
replicated over it; on a contracted label (both operands, not in the output)
each device multiplies its chunks, and the output is partial (`sum`) over that
axis — no communication until a consumer needs the sum (DESIGN §6).

A partial (`sum`/`avg`) operand stays partial through the contraction when the
other operand is not partial over the same axes (bilinearity); two partial
operands cannot be multiplied summand by summand, so one is reduced first.

Candidates come from each operand's layout read as a label assignment, and
from their merge; the dispatcher prices them with the planner.

Bias ops (addmm, addmv, baddbmm): the bias is laid out like the output (partial
where the output is, so it is added once). A bias that broadcasts over a dim on
which some device's block is empty is expanded to the local product's shape
first (the CPU kernels give addmv of a (1,) bias and a (0, m) block the shape
(1,)); otherwise the op runs as is.
"""

from __future__ import annotations

import torch

from ..layouts._layout import Layout
from ._pointwise import _in_dims
from ._rules import ArgSpec, RuleInput, Strategy, register_rule

aten = torch.ops.aten

EQUATIONS = {
    aten.mm.default: "ij,jk->ik",
    aten.bmm.default: "bij,bjk->bik",
    aten.mv.default: "ij,j->i",
    aten.dot.default: "i,i->",
    aten.addmm.default: "ij,jk->ik",
    aten.baddbmm.default: "bij,bjk->bik",
    aten.addmv.default: "ij,j->i",
}
_WITH_BIAS = {aten.addmm.default, aten.baddbmm.default, aten.addmv.default}


def _label_axes(labels: str, layout: Layout) -> dict[str, tuple[str, ...]]:
    return {lab: axes for lab, axes in zip(labels, layout.dims) if axes}


def _candidates(in_labels: list[str], specs: tuple[ArgSpec, ...]) -> list[dict]:
    each = [_label_axes(lab, s.layout) for lab, s in zip(in_labels, specs)]
    merged: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for assignment in each:
        for lab, axes in assignment.items():
            if lab not in merged and not used & set(axes):
                merged[lab] = axes
                used |= set(axes)
    found: list[dict] = []
    for c in (merged, *each, {}):
        if c not in found:
            found.append(c)
    return found


def einsum_strategies(eq: str, specs: tuple[ArgSpec, ...]):
    """Strategies for a two- (or one-) operand einsum equation over `specs`."""
    lhs, out_labels = eq.split("->")
    in_labels = lhs.split(",")
    if any(len(set(lab)) != len(lab) for lab in in_labels):
        return  # repeated labels (diagonals): no rule
    contracted = {lab for labs in in_labels for lab in labs if lab not in out_labels}
    partial_inputs = [i for i, s in enumerate(specs) if s.layout.partial]
    for assign in _candidates(in_labels, specs):
        used = {a for axes in assign.values() for a in axes}
        summed = tuple(a for lab, axes in assign.items() if lab in contracted for a in axes)
        options: list[int | None] = []
        for i in partial_inputs:  # keep one operand's partial axes; the other is reduced
            keep = specs[i].layout
            linear = keep.reduce_op == "sum" or (keep.reduce_op == "avg" and not summed)
            if linear and not used & set(keep.partial):
                options.append(i)
        options.append(None)
        for keeper in options:
            extra = specs[keeper].layout if keeper is not None else Layout(())
            inputs = tuple(
                Layout(
                    tuple(assign.get(lab, ()) for lab in labs),
                    extra.partial if i == keeper else (),
                    extra.reduce_op if i == keeper else "sum",
                )
                for i, labs in enumerate(in_labels)
            )
            out = Layout(
                tuple(assign.get(lab, ()) for lab in out_labels),
                summed + extra.partial,
                extra.reduce_op if extra.partial else "sum",
            )
            yield inputs, out


def _empty_under_bias(ri: RuleInput, bias: ArgSpec, out: Layout, out_spec: ArgSpec) -> bool:
    """Whether some device's product block is empty on a dim the bias broadcasts over.

    The CPU kernels broadcast such a bias the wrong way round (addmv of a (1,) bias
    and a (0, m) block gives (1,), not (0,)), so those strategies expand the bias to
    the local product's shape first; elsewhere the op runs as is (the hot path).
    """
    off = out_spec.ndim - bias.ndim
    for d, (n, axes) in enumerate(zip(out_spec.shape, out.dims)):
        broadcast = d < off or bias.shape[d - off] != n
        if broadcast and axes:
            k = ri.mesh.group_size(axes)
            if (k - 1) * -(-n // k) >= n:  # the last chunk (at least) is empty
                return True
    return False


def _product_shape(op: object, a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    if op is aten.addmv.default:
        return (a.shape[0],)
    if op is aten.addmm.default:
        return (a.shape[0], b.shape[1])
    return (a.shape[0], a.shape[1], b.shape[2])  # baddbmm


def _expanded_bias(op: object):
    def local(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *args, **kwargs):
        return op(bias.expand(_product_shape(op, a, b)), a, b, *args, **kwargs)

    return local


@register_rule(*EQUATIONS)
def contraction_rule(ri: RuleInput):
    eq = EQUATIONS[ri.op]
    specs = ri.tensors
    out_spec = ri.outputs[0]
    if ri.op in _WITH_BIAS:
        bias, operands = specs[0], specs[1:]
        for inputs, out in einsum_strategies(eq, operands):
            want_bias = Layout(_in_dims(out.dims, bias, out_spec), out.partial, out.reduce_op)
            local = _expanded_bias(ri.op) if _empty_under_bias(ri, bias, out, out_spec) else None
            yield Strategy((want_bias, *inputs), (out,), local=local)
    else:
        for inputs, out in einsum_strategies(eq, specs):
            yield Strategy(inputs, (out,))


def _explicit(eq: str, ndims: list[int]) -> str:
    eq = eq.replace(" ", "")
    if "..." in eq:
        raise NotImplementedError("sl.einsum: '...' is not supported yet; spell the dims out.")
    if "->" in eq:
        return eq
    labels = eq.split(",")
    counts = {c: sum(lab.count(c) for lab in labels) for c in set(eq) - {","}}
    return eq + "->" + "".join(sorted(c for c, n in counts.items() if n == 1))


def einsum(eq: str, *xs: torch.Tensor, out_layout: Layout | None = None) -> torch.Tensor:
    """`torch.einsum` on sharded operands, optionally pinning the output layout.

    Without `out_layout` the contraction picks the cheapest layouts by rule.
    With it, the operands are first moved to the cheapest layouts whose
    contraction gives `out_layout` directly (JAX's `out_sharding`), so an
    ambiguous choice (e.g. keep a partial sum, or reduce-scatter it) is yours.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> a = sl.shard(torch.ones(4, 6), mesh, sl.P(None, "x"))
        >>> b = sl.shard(torch.ones(6, 2), mesh, sl.P("x", None))
        >>> sl.einsum("ij,jk->ik", a, b).spec
        P(None, None, partial='x')
        >>> sl.einsum("ij,jk->ik", a, b, out_layout=sl.P("x", None)).spec
        P('x', None)
    """
    from ..layouts._planner import plan
    from ._api import reshard, with_layout
    from ._tensor import ShardedTensor

    eq = _explicit(eq, [x.ndim for x in xs])
    if out_layout is not None and xs and isinstance(xs[0], ShardedTensor):
        out_layout = out_layout.check(
            xs[0].mesh.abstract, len(eq.split("->")[1]), "sl.einsum(out_layout=...)"
        )
    if (
        out_layout is not None
        and len(xs) in (1, 2)
        and all(isinstance(x, ShardedTensor) for x in xs)
    ):
        specs = tuple(ArgSpec(tuple(x.shape), x.dtype, x.spec) for x in xs)
        mesh = xs[0].mesh
        best, best_cost = None, None
        for inputs, out in einsum_strategies(eq, specs) if len(xs) == 2 else ():
            if out != out_layout:
                continue
            cost = sum(
                plan(s.layout, w, s.shape, mesh, s.dtype).total_bytes for s, w in zip(specs, inputs)
            )
            if best_cost is None or cost < best_cost:
                best, best_cost = inputs, cost
        if best is not None:
            xs = tuple(reshard(x, w) for x, w in zip(xs, best))
    y = torch.einsum(eq, *xs)
    if out_layout is not None:
        y = with_layout(y, out_layout)
    return y
