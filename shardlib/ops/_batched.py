"""Batch-dim rules: ops that treat some dims independently and couple the others.

Most ops that are not pointwise still run independently along some dims:
``linalg.inv`` on every matrix of a batch, ``sort`` along one dim for every
other index, ``fft`` over some dims, a convolution for every sample. Such an
op runs locally on shards split the same way along those *batch* dims, and
needs every *coupled* dim whole. `batched` turns that description into the
rule's candidate strategies; the dispatcher prices them, so the cheapest
placement wins and any gather of a coupled dim is a ledgered move (strict mode
refuses it, naming the op).

A rule describes each tensor by a tuple of *labels*, one per dim: a hashable
batch label (the same label on several tensors means "split alike"), or
``None`` for a dim the op couples. A labelled dim of size 1 where another
tensor has the label's full size is a broadcast dim and stays unsplit.

Candidates, in preference order: each input's own batch splits (made
consistent over all tensors), the union of all inputs' batch splits where they
do not collide, and the replicated placement. Inputs are never partial unless
the rule says the op is linear in them (`linear`): then a ``sum`` partial of
that one input passes through to every output.

Examples:
    >>> import torch
    >>> from shardlib.layouts._layout import P
    >>> from shardlib.layouts._mesh import AbstractMesh
    >>> from shardlib.ops._rules import ArgSpec, RuleInput
    >>> x = ArgSpec((8, 3, 3), torch.float64, P("x", "y"))
    >>> ri = RuleInput(None, AbstractMesh(("x", "y"), (2, 2)), (x,), {}, (x,), (ArgSpec((8, 3, 3), torch.float64),))
    >>> [s.inputs[0] for s in batched(ri, [("b", None, None)], [("b", None, None)])]
    [P('x', None, None), P(None, None, None)]
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from ..layouts._layout import Layout
from ._rules import ArgSpec, RuleInput, Strategy

__all__ = ["batched", "leading_batch"]

Labels = Sequence[Hashable | None]


def _sizes(specs: Sequence[ArgSpec], labels: Sequence[Labels]) -> dict[Hashable, int]:
    size: dict[Hashable, int] = {}
    for spec, labs in zip(specs, labels):
        for n, lab in zip(spec.shape, labs):
            if lab is not None:
                size[lab] = max(size.get(lab, 1), n)
    return size


def _layout(spec: ArgSpec, labs: Labels, assign: dict, size: dict, partial: tuple = ()) -> Layout:
    dims = tuple(
        assign.get(lab, ()) if lab is not None and n == size[lab] else ()
        for n, lab in zip(spec.shape, labs)
    )
    return Layout(dims, partial)


def batched(
    ri: RuleInput,
    labels_in: Sequence[Labels],
    labels_out: Sequence[Labels],
    *,
    linear: Sequence[int] = (),
) -> list[Strategy]:
    """Strategies for an op that runs independently along its labelled dims.

    `labels_in` has one label tuple per tensor input (``ri.tensors`` order),
    `labels_out` one per tensor output (``ri.outputs`` order). `linear` lists
    inputs the op is linear in: one of them may stay ``sum``-partial (the
    others then replicated over those axes), and the outputs are partial alike.
    """
    specs, outs = ri.tensors, ri.outputs
    size = _sizes([*specs, *outs], [*labels_in, *labels_out])
    own: list[dict] = []
    for spec, labs in zip(specs, labels_in):
        assign = {}
        for n, lab, axes in zip(spec.shape, labs, spec.layout.dims):
            if lab is not None and axes and n == size[lab]:
                assign[lab] = axes
        own.append(assign)
    merged: dict = {}
    used: set[str] = set()
    for assign in sorted(own, key=len, reverse=True):
        for lab, axes in assign.items():
            if lab not in merged and not used.intersection(axes):
                merged[lab] = axes
                used.update(axes)
    choices, seen = [], set()
    for assign in [*own, merged, {}]:
        key = tuple(sorted(assign.items(), key=repr))
        if key not in seen:
            seen.add(key)
            choices.append(assign)
    strategies = []
    for assign in choices:
        axes_used = {a for axes in assign.values() for a in axes}
        partial = ()
        for i in linear:
            lay = specs[i].layout
            if lay.partial and lay.reduce_op == "sum" and not axes_used.intersection(lay.partial):
                partial = lay.partial
                break
        ins = tuple(
            _layout(
                s,
                labs,
                assign,
                size,
                partial if i in linear and s.layout.partial == partial else (),
            )
            for i, (s, labs) in enumerate(zip(specs, labels_in))
        )
        if partial and sum(1 for lay in ins if lay.partial) != 1:
            ins = tuple(lay.without_partial() for lay in ins)
            partial = ()
        outputs = tuple(
            _layout(o, labs, assign, size, partial) for o, labs in zip(outs, labels_out)
        )
        strategies.append(Strategy(ins, outputs))
        if partial:  # the same placement with the partial reduced first
            strategies.append(
                Strategy(
                    tuple(lay.without_partial() for lay in ins),
                    tuple(lay.without_partial() for lay in outputs),
                )
            )
    return strategies


def leading_batch(ndim: int, core: int) -> tuple[Hashable | None, ...]:
    """Labels of a tensor whose last `core` dims are coupled, right-aligned batch labels before.

    Right alignment makes broadcast batch dims (``linalg.solve(A[b, n, n], B[n, k])``) line up.

    Examples:
        >>> leading_batch(4, 2)
        (-4, -3, None, None)
    """
    return tuple(d - ndim if d < ndim - core else None for d in range(ndim))
