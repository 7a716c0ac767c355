"""Rules for losses and for the activation ops torch does not tag pointwise (forward and backward).

Owns the layouts of the fused loss kernels `F.mse_loss`, `F.huber_loss`,
`F.smooth_l1_loss`, `F.soft_margin_loss`, `F.binary_cross_entropy`,
`F.binary_cross_entropy_with_logits`, `F.multi_margin_loss`,
`F.multilabel_margin_loss` and `F.ctc_loss` reach in torch 2.13, and of the
activations whose aten ops carry no ``pointwise`` tag (``hardswish``,
``log_sigmoid_forward``, ``_prelu_kernel``, ``glu``, ``rrelu_with_noise``)
and the activation backwards (``elu_backward``, ``hardtanh_backward``, ...;
traced with a `TorchDispatchMode`). It does not own the losses torch writes
in Python from other ops (``l1_loss``, ``kl_div``, ``poisson_nll_loss``,
``gaussian_nll_loss``, ``margin_ranking_loss``, ``hinge_embedding_loss``,
``cosine_embedding_loss``, ``triplet_margin_loss``,
``multilabel_soft_margin_loss``: their parts' rules apply), nor ``nll_loss``
(`_nn.py`), nor the activations tagged pointwise (`_pointwise.py`).

The rules, by op (A = the mesh axes that split the op's input):

- Elementwise activations (`_ELEMENTWISE`, `_LINEAR_IN_GRAD`; listed by hand,
  since "elementwise" is not in the schema: every tensor argument broadcasts
  to the output's shape and the op computes per element): the inputs' split
  dims (merged, each one's, replicated), the outputs split alike, no
  communication. The backwards are linear in the incoming gradient, so a
  partial-``sum``/``avg`` gradient stays partial (the other operands whole).
  ``threshold_backward``, ``gelu_backward`` and ``silu_backward`` are tagged
  pointwise but listed here for that linearity.
- ``_prelu_kernel`` and its backward: elementwise with the weight broadcast
  (F.prelu views the per-channel weight as ``(C, 1, ...)``); the backward's
  weight gradient is elementwise too (autograd sums it to the weight's shape).
- ``glu`` / ``glu_backward``: the halved dim is coupled (a split one is
  gathered by the planner, in the ledger); every other dim is a batch dim.
- ``rrelu_with_noise`` (`F.rrelu`): eval mode is elementwise. Training draws
  one uniform number per non-positive element in memory order, so the draws
  depend on the values: the sign mask (a bool per element) is made replicated
  (in the ledger, 1/8 of the float64 input), the global noise is drawn once
  under torch's generator exactly as the unsharded op draws it, and each
  device scales its block by its block of the noise. The noise tensor is
  written like the unsharded op writes it. (Counter mode refuses the op:
  `_rng.py`.)
- Elementwise losses (``mse_loss``, ``huber_loss``, ``smooth_l1_loss``,
  ``soft_margin_loss``, ``binary_cross_entropy``,
  ``binary_cross_entropy_with_logits``; weights broadcast): ``none`` ->
  elementwise; ``sum`` -> each device's loss summed over its block, the
  scalar partial-``sum`` over A; ``mean`` -> the same divided by the *global*
  element count. No gather of the inputs, no collective at all: the partial
  scalar is reduced where it is consumed (one scalar). Their backwards: the
  gradient of a ``sum``/``mean`` loss is a replicated scalar (divided by the
  global count for ``mean``) times the local elementwise gradient.
- ``multi_margin_loss``, ``multilabel_margin_loss_forward`` and their
  backwards: rows are independent (a batch dim), the class dim is coupled;
  ``sum``/``mean`` as above (``mean`` over the global row count). A 2-d
  multi-margin input split over its classes is not gathered: each row needs
  only its target's logit (and class weight), picked in the owning chunk and
  all-reduced (N numbers, 2·N with weights); the margins are local and the
  loss is partial-``sum`` over the class axes. Its backward: the same pick,
  the local margins' gradient, and one more all-reduce of the N row sums
  (the target's entry is minus its row's sum) -- as vocabulary-parallel
  cross-entropy (`_nn.py`).
- ``_ctc_loss`` (int-list and tensor lengths) and its backward: batched over
  the batch dim (the time and class dims coupled); each device gets its
  samples' lengths (and, for concatenated 1-d targets, its samples' targets).

Meta kernels: ``multi_margin_loss_backward``, ``multilabel_margin_loss_backward``,
``_ctc_loss.Tensor`` and ``_ctc_loss_backward`` have none in torch 2.13, and the
dispatcher infers output shapes on the meta device; this module registers
them (`_register_meta_kernels`). ``_ctc_loss.Tensor``'s output shape depends on
the target lengths' values: its meta kernel needs them as plain tensors.

Invariant: every strategy is exact for uneven shapes (empty blocks included);
a partial input is kept only where the op is linear in it (the gradient of a
backward), and reduced first otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..layouts._layout import Layout
from ..layouts._shard import local_bounds
from ._api import _local_blocks
from ._batched import batched
from ._dispatch import _move
from ._nn import _in_order
from ._pointwise import _broadcast_partial, _in_dims, candidate_dims
from ._rng import _bind
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor

aten = torch.ops.aten

_NONE, _MEAN, _SUM = 0, 1, 2  # torch's reduction enum


# == helpers ===================================================================
def _call(op: Any, b: dict[str, Any]) -> Any:
    """`op` called with the arguments bound by name (`_bind`'s dict)."""
    args, kwargs = [], {}
    for a in op._schema.arguments:
        if a.kwarg_only:
            kwargs[a.name] = b[a.name]
        else:
            args.append(b[a.name])
    return op(*args, **kwargs)


def _with_sharded(func: Any, want: dict[str, Layout], decompose: Callable) -> Callable:
    """`decompose` called with the plain tensors among the arguments named in `want` made
    ShardedTensors in their layouts there (a plain tensor is a replicated constant: cut
    locally, no communication), so a decomposition sees only sharded tensors there."""

    def run(*args: Any, **kwargs: Any) -> Any:
        b = _bind(func, args, kwargs)
        mesh = next(v._mesh for v in b.values() if isinstance(v, ShardedTensor))
        for name, layout in want.items():
            v = b.get(name)
            if isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor):
                b[name] = _local_blocks(v, mesh, layout)
        return decompose(*(b[a.name] for a in func._schema.arguments))

    return run


def _full(specs: Sequence[ArgSpec], dtype: torch.dtype) -> ArgSpec:
    """The broadcast shape of `specs`, as an output-like spec."""
    return ArgSpec(tuple(torch.broadcast_shapes(*(s.shape for s in specs))), dtype)


def _replicated(spec: ArgSpec) -> Layout:
    return Layout(((),) * spec.ndim)


def _used(dims: tuple) -> tuple[str, ...]:
    return tuple(a for axes in dims for a in axes)


def _linear_partial(grad: ArgSpec, others: Sequence[ArgSpec], full: ArgSpec) -> Layout | None:
    """`grad`'s partial part, when an op linear in `grad` may keep it (else None).

    Kept for ``sum``/``avg`` (a linear map commutes with both), when `grad` is not a
    broadcast (reducing its compact data first is cheaper) and no other operand is partial.
    """
    lay = grad.layout
    if not lay.partial or lay.reduce_op not in ("sum", "avg") or _broadcast_partial(grad, full):
        return None
    if grad.shape != full.shape or any(s.layout.partial for s in others):
        return None
    return Layout((), lay.partial, lay.reduce_op)


def _elementwise(ri: RuleInput, specs: Sequence[ArgSpec], linear: bool) -> Iterator[Strategy]:
    """Strategies of an elementwise op over `specs` (its tensor inputs, flat order).

    Outputs of the broadcast shape are split like it; others (an empty buffer) replicated.
    With `linear`, the op is linear in its first tensor (a gradient), which may stay partial.
    """
    full = _full(specs, ri.outputs[0].dtype)
    keep = _linear_partial(specs[0], specs[1:], full) if linear else None
    for dims in candidate_dims(tuple(specs), full):
        ins = [Layout(_in_dims(dims, s, full)) for s in specs]
        outs = [Layout(dims) if o.shape == full.shape else _replicated(o) for o in ri.outputs]
        if keep is not None and not set(_used(dims)) & set(keep.partial):
            p, op = keep.partial, keep.reduce_op
            yield Strategy(
                (Layout(ins[0].dims, p, op), *ins[1:]),
                tuple(Layout(o.dims, p, op) for o in outs),
            )
        yield Strategy(tuple(ins), tuple(outs))


# == elementwise activations ===================================================
_ELEMENTWISE = [
    aten.hardswish.default,
    aten.log_sigmoid_forward.default,
    aten._prelu_kernel.default,
]
# Backwards: linear in their first tensor argument, the incoming gradient.
_LINEAR_IN_GRAD = [
    aten.elu_backward.default,
    aten.hardtanh_backward.default,
    aten.hardsigmoid_backward.default,
    aten.hardswish_backward.default,
    aten.leaky_relu_backward.default,
    aten.softplus_backward.default,
    aten.softshrink_backward.default,
    aten.hardshrink_backward.default,
    aten.log_sigmoid_backward.default,
    aten.mish_backward.default,
    aten.threshold_backward.default,
    aten.gelu_backward.default,
    aten.silu_backward.default,
    aten._prelu_kernel_backward.default,
    aten.rrelu_with_noise_backward.default,
]


@register_rule(*_ELEMENTWISE)
def elementwise_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Same split dims in and out (broadcast operands unsplit on their broadcast dims)."""
    yield from _elementwise(ri, ri.tensors, linear=False)


@register_rule(*_LINEAR_IN_GRAD)
def linear_in_grad_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Elementwise; a partial-sum/avg incoming gradient stays partial."""
    yield from _elementwise(ri, ri.tensors, linear=True)


# == glu =======================================================================
def _glu_labels(ri: RuleInput) -> tuple:
    x = ri.tensors[-1]  # glu(self, dim), glu_backward(grad_output, self, dim)
    dim = _bind(ri.op, ri.args, ri.kwargs)["dim"] % x.ndim
    return tuple(None if d == dim else d for d in range(x.ndim))


@register_rule(aten.glu.default)
def glu_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The halved dim coupled (gathered if split), every other dim a batch dim."""
    labels = _glu_labels(ri)
    yield from batched(ri, [labels], [labels])


@register_rule(aten.glu_backward.default)
def glu_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """As glu; linear in the gradient (a partial-sum gradient stays partial)."""
    labels = _glu_labels(ri)
    yield from batched(ri, [labels, labels], [labels], linear=(0,))


# == rrelu =====================================================================
def _rrelu_eval(x: torch.Tensor, noise: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # eval mode reads no noise (leaky relu with the mean slope); torch checks its shape only
    return aten.rrelu_with_noise.default(x, torch.empty_like(x), *args, **kwargs)


def _rrelu_train(
    x: ShardedTensor,
    noise: torch.Tensor,
    lower: float = 0.125,
    upper: float = 1.0 / 3.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> ShardedTensor:
    """Torch's draws for the global sign pattern; each device scales its block by its noise."""
    func = aten.rrelu_with_noise.default
    mesh, shape, dims = x._mesh, tuple(x.shape), x._layout.dims
    whole = Layout(((),) * x.ndim)
    negative = _move(func, aten.le.Scalar(x, 0), whole)._shards[0]  # the global sign mask
    # The kernel computes in the op math type (float for half and bfloat16).
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    probe = torch.where(negative, -1.0, 1.0).to(work)
    drawn = torch.empty_like(probe)
    aten.rrelu_with_noise.default(probe, drawn, lower, upper, True, generator)
    blocks = _local_blocks(drawn, mesh, Layout(dims))._shards
    outs = [(s.to(work) * r).to(x.dtype) for s, r in zip(x._shards, blocks)]
    if isinstance(noise, ShardedTensor):
        value = ShardedTensor([r.to(noise.dtype) for r in blocks], mesh, Layout(dims), shape)
        aten.copy_.default(noise, value)
    else:
        noise.copy_(drawn)
    return ShardedTensor(outs, mesh, x._layout.without_partial(), shape)


@register_rule(aten.rrelu_with_noise.default)
def rrelu_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Eval: elementwise. Training: the sign mask replicated, torch's global draw, cut."""
    x, noise = ri.tensors[:2]
    b = _bind(ri.op, ri.args, ri.kwargs)
    if not b["training"] or math.prod(x.shape) == 0:  # nothing drawn
        for dims in candidate_dims((x,), x):
            yield Strategy((Layout(dims), noise.layout), (Layout(dims),), local=_rrelu_eval)
        return
    want = {"self": x.layout.without_partial()}
    decompose = _with_sharded(ri.op, want, _rrelu_train)
    yield Strategy((want["self"], noise.layout), decompose=decompose)


# == reductions of a loss ======================================================
def _summed(op: Any, count: int | None) -> Callable:
    """The local loss with ``reduction=sum`` (divided by the global `count` for a mean)."""

    def local(*args: Any, **kwargs: Any) -> torch.Tensor:
        b = _bind(op, args, kwargs)
        b["reduction"] = _SUM
        out = _call(op, b)
        if count is None:
            return out
        if isinstance(out, tuple):  # (loss, buffers...): the loss is divided
            return (out[0] / count, *out[1:])
        return out / count

    return local


def _summed_grad(op: Any, count: int, grad_name: str) -> Callable:
    """The local backward of a mean loss: the gradient over the global `count`, as a sum."""

    def local(*args: Any, **kwargs: Any) -> torch.Tensor:
        b = _bind(op, args, kwargs)
        b["reduction"] = _SUM
        b[grad_name] = b[grad_name] / count
        return _call(op, b)

    return local


def _reduced_outputs(
    ri: RuleInput, strategy: Strategy, batch: tuple[str, ...], reduction: int, count: int
) -> Strategy:
    """A strategy of a loss's ``none`` form made ``sum``/``mean``: partial-sum over `batch`."""
    if reduction == _NONE or not batch:
        return strategy
    loss = Layout((), batch)
    local = _summed(ri.op, count if reduction == _MEAN else None)
    return Strategy(strategy.inputs, (loss, *strategy.outputs[1:]), local=local)


def _reduced_grad(
    ri: RuleInput, strategy: Strategy, batch: tuple[str, ...], reduction: int, count: int
) -> Strategy:
    """A backward strategy of a ``mean`` loss over split rows: the gradient over the global count."""
    if reduction != _MEAN or not batch:
        return strategy
    name = ri.op._schema.arguments[0].name
    local = _summed_grad(ri.op, count, name)
    return Strategy(strategy.inputs, strategy.outputs, local=local)


# == elementwise losses ========================================================
_ELEMENTWISE_LOSSES = [
    aten.mse_loss.default,
    aten.huber_loss.default,
    aten.smooth_l1_loss.default,
    aten.soft_margin_loss.default,
    aten.binary_cross_entropy.default,
    aten.binary_cross_entropy_with_logits.default,
]
_ELEMENTWISE_LOSS_BACKWARDS = [
    aten.mse_loss_backward.default,
    aten.huber_loss_backward.default,
    aten.smooth_l1_loss_backward.default,
    aten.soft_margin_loss_backward.default,
    aten.binary_cross_entropy_backward.default,
]


@register_rule(*_ELEMENTWISE_LOSSES)
def elementwise_loss_rule(ri: RuleInput) -> Iterator[Strategy]:
    """none: elementwise. sum/mean: local sums, a partial-sum scalar (mean over the global count)."""
    reduction = _bind(ri.op, ri.args, ri.kwargs)["reduction"]
    full = _full(ri.tensors, ri.outputs[0].dtype)
    count = math.prod(full.shape)
    for dims in candidate_dims(ri.tensors, full):
        ins = tuple(Layout(_in_dims(dims, s, full)) for s in ri.tensors)
        out = Layout(dims) if reduction == _NONE else Layout(())
        yield _reduced_outputs(ri, Strategy(ins, (out,)), _used(dims), reduction, count)


@register_rule(*_ELEMENTWISE_LOSS_BACKWARDS)
def elementwise_loss_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """none: elementwise, linear in the gradient. sum/mean: a replicated scalar gradient."""
    reduction = _bind(ri.op, ri.args, ri.kwargs)["reduction"]
    grad, rest = ri.tensors[0], ri.tensors[1:]
    out = ri.outputs[0]
    if reduction == _NONE:
        yield from _elementwise(ri, ri.tensors, linear=True)
        return
    full = _full(rest, out.dtype)
    if out.shape != full.shape:  # the input broadcasts against the target: whole tensors
        yield Strategy(tuple(_replicated(s) for s in ri.tensors), (_replicated(out),))
        return
    count = math.prod(full.shape)
    for dims in candidate_dims(rest, full):
        ins = (_replicated(grad), *(Layout(_in_dims(dims, s, full)) for s in rest))
        strategy = Strategy(ins, (Layout(dims),))
        yield _reduced_grad(ri, strategy, _used(dims), reduction, count)


# == row losses: multi-margin, multilabel-margin ==============================
def _rows(spec: ArgSpec) -> tuple:
    """Labels of a loss input: a 2-d input's rows are a batch dim, its classes coupled."""
    return ("n", None) if spec.ndim == 2 else (None,) * spec.ndim


def _batch_axes(strategy: Strategy, i: int = 0) -> tuple[str, ...]:
    """The axes splitting the rows of the strategy's input `i` (the loss input)."""
    dims = strategy.inputs[i].dims
    return tuple(dims[0]) if len(dims) == 2 else ()


def _row_count(x: ArgSpec) -> int:
    return x.shape[0] if x.ndim == 2 else 1


def _per_row(x: ArgSpec, spec: ArgSpec | None) -> tuple:
    """Labels of a per-row tensor (target, unreduced loss or its gradient) of loss input `x`."""
    if spec is None:
        return ()
    return ("n",) * spec.ndim if x.ndim == 2 else (None,) * spec.ndim


# A 2-d multi-margin input split over its classes needs, per row, only the target's
# logit (and class weight) from the chunk that owns it: one all-reduce of N numbers, not a
# gather of the (N, C) input (as vocabulary-parallel cross-entropy, `_nn.py`).
def _blocks(t: torch.Tensor | None, mesh: Any, layout: Layout) -> list:
    """Per local device, `t`'s block in `layout` (a plain tensor is cut; None stays None)."""
    if t is None:
        return [None] * len(mesh.local_devices)
    if isinstance(t, ShardedTensor):
        return t._shards
    return _local_blocks(t, mesh, layout)._shards


def _at_target(func: Any, x: ShardedTensor, target: Any, weight: Any) -> list[tuple]:
    """Per device: (its class bounds, is-target mask, x[n, y_n], w[y_n] or None) for its
    rows, the picks all-reduced over the class axes (one collective of N or 2·N numbers)."""
    mesh, dims = x._mesh, x._layout.dims
    rows, classes = dims
    ys = _blocks(target, mesh, Layout((rows,)))
    ws = _blocks(weight, mesh, Layout((classes,)))
    picks, found = [], []
    for j, dev in enumerate(mesh.local_devices):
        lo, hi = local_bounds(tuple(x.shape), Layout(dims), mesh.abstract, dev)[1]
        xj, yj = x._shards[j], ys[j]
        if bool(((yj < 0) | (yj >= x.shape[1])).any()):
            raise IndexError(f"{func}: a target is out of range for {x.shape[1]} classes")
        mask = torch.arange(lo, hi, device=xj.device)[None, :] == yj[:, None]
        rows_ = [torch.where(mask, xj, 0).sum(1)]  # (not x * mask: inf * 0 is nan)
        if ws[j] is not None:
            rows_.append(torch.where(mask, ws[j][None, :].to(xj.dtype), 0).sum(1))
        picks.append(torch.stack(rows_))
        found.append(((lo, hi), mask))
    shape = (len(picks[0]), x.shape[0])
    whole = ShardedTensor(picks, mesh, Layout(((), rows), classes), shape)
    summed = _move(func, whole, Layout(((), rows)))._shards
    return [
        (bounds, mask, pick[0], pick[1] if len(pick) > 1 else None)
        for (bounds, mask), pick in zip(found, summed)
    ]


def _margins(xj: torch.Tensor, mask: torch.Tensor, picked: torch.Tensor, margin: float):
    """z = margin - x[n, y] + x[n, c], and where it counts (z > 0, c != y)."""
    z = margin - picked[:, None] + xj
    return z, (z > 0) & ~mask


def _multi_margin_split(func: Any) -> Callable:
    """multi_margin_loss over split classes: local margins, loss partial over the class axes."""

    def decompose(x, target, p=1, margin=1, weight=None, reduction=_MEAN):
        mesh, dims = x._mesh, x._layout.dims
        rows, classes = dims
        n, c = x.shape
        losses = []
        for xj, (_, mask, picked, wy) in zip(x._shards, _at_target(func, x, target, weight)):
            z, active = _margins(xj, mask, picked, margin)
            h = torch.where(active, z if p == 1 else z * z, 0)
            if wy is not None:
                h = h * wy[:, None]
            loss = h.sum(1) / c
            losses.append(
                loss if reduction == _NONE else loss.sum() / (n if reduction == _MEAN else 1)
            )
        if reduction == _NONE:
            return ShardedTensor(losses, mesh, Layout((rows,), classes), (n,))
        return ShardedTensor(losses, mesh, Layout((), tuple(rows) + tuple(classes)), ())

    return decompose


def _multi_margin_backward_split(func: Any) -> Callable:
    """Its backward: d/dx[n, c] local for c != y; the target's entry is minus the row's sum
    (one more all-reduce of N numbers)."""

    def decompose(grad_output, x, target, p, margin, weight=None, reduction=_MEAN):
        mesh, dims = x._mesh, x._layout.dims
        rows, classes = dims
        n, c = x.shape
        gs = _blocks(grad_output, mesh, Layout((rows,) if reduction == _NONE else ()))
        parts, sums = [], []
        for j, (xj, (_, mask, picked, wy)) in enumerate(
            zip(x._shards, _at_target(func, x, target, weight))
        ):
            z, active = _margins(xj, mask, picked, margin)
            d = torch.where(active, 1.0 if p == 1 else 2 * z, 0).to(xj.dtype) / c
            if wy is not None:
                d = d * wy[:, None]
            g = gs[j] if reduction == _NONE else gs[j] / (n if reduction == _MEAN else 1)
            d = d * (g[:, None] if reduction == _NONE else g)
            parts.append((d, mask))
            sums.append(d.sum(1))
        whole = ShardedTensor(sums, mesh, Layout((rows,), classes), (n,))
        totals = _move(func, whole, Layout((rows,)))._shards
        grads = [d - mask * total[:, None] for (d, mask), total in zip(parts, totals)]
        return ShardedTensor(grads, mesh, Layout(dims), (n, c))

    return decompose


@register_rule(aten.multi_margin_loss.default)
def multi_margin_loss_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Rows independent, classes coupled; sum/mean: a partial-sum scalar over the row split."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    x, reduction = b["self"], b["reduction"]
    labels = [_rows(x), _per_row(x, b["target"])]
    if isinstance(b["weight"], ArgSpec):
        labels.append((None,))
    if x.ndim == 2 and x.layout.dims[1]:  # split classes: the target's logit, not the row
        rows, classes = x.layout.dims
        want = {"self": Layout((rows, classes)), "target": Layout((rows,))}
        want["weight"] = Layout((classes,))
        yield Strategy(_in_order(ri, want), decompose=_multi_margin_split(ri.op))
    for s in batched(ri, labels, [_per_row(x, ri.outputs[0])]):
        yield _reduced_outputs(ri, s, _batch_axes(s), reduction, _row_count(x))


@register_rule(aten.multi_margin_loss_backward.default)
def multi_margin_loss_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Rows independent, classes coupled; linear in the gradient of an unreduced loss."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    x, reduction = b["self"], b["reduction"]
    labels = [_per_row(x, b["grad_output"]), _rows(x), _per_row(x, b["target"])]
    if isinstance(b["weight"], ArgSpec):
        labels.append((None,))
    if x.ndim == 2 and x.layout.dims[1]:  # split classes: two all-reduces of N numbers
        rows, classes = x.layout.dims
        want = {"self": Layout((rows, classes)), "target": Layout((rows,))}
        want["grad_output"] = Layout((rows,) if reduction == _NONE else ())
        want["weight"] = Layout((classes,))
        yield Strategy(_in_order(ri, want), decompose=_multi_margin_backward_split(ri.op))
    linear = (0,) if reduction == _NONE else ()
    for s in batched(ri, labels, [_rows(x)], linear=linear):
        yield _reduced_grad(ri, s, _batch_axes(s, 1), reduction, _row_count(x))


@register_rule(aten.multilabel_margin_loss_forward.default)
def multilabel_margin_loss_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Rows independent, classes coupled; sum/mean: a partial-sum scalar over the row split."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    x, reduction = b["self"], b["reduction"]
    outs = [_per_row(x, ri.outputs[0]), _rows(ri.outputs[1])]
    for s in batched(ri, [_rows(x), _rows(b["target"])], outs):
        yield _reduced_outputs(ri, s, _batch_axes(s), reduction, _row_count(x))


@register_rule(aten.multilabel_margin_loss_backward.default)
def multilabel_margin_loss_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Rows independent, classes coupled; linear in the gradient of an unreduced loss."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    x, reduction = b["self"], b["reduction"]
    labels = [_per_row(x, b["grad_output"]), _rows(x), _rows(b["target"]), _rows(b["is_target"])]
    linear = (0,) if reduction == _NONE else ()
    for s in batched(ri, labels, [_rows(x)], linear=linear):
        yield _reduced_grad(ri, s, _batch_axes(s, 1), reduction, _row_count(x))


# == ctc =======================================================================
_CTC = [aten._ctc_loss.default, aten._ctc_loss.Tensor]
_CTC_BACKWARD = [aten._ctc_loss_backward.default, aten._ctc_loss_backward.Tensor]


def _ctc_labels(b: dict[str, Any], names: Sequence[str]) -> list[tuple]:
    """Batch labels of the ctc tensors among `names` (log_probs is (T, N, C) or (T, C)).

    Concatenated 1-d targets cannot be cut by the batch split alone: they and the
    lengths stay whole, and each device picks its samples' targets (`_ctc_local`).
    """
    batched_ = b["log_probs"].ndim == 3
    concatenated = b["targets"].ndim == 1
    labels = {
        "log_probs": (None, "n", None) if batched_ else (None, None),
        "targets": (None,) if concatenated or not batched_ else ("n", None),
        "neg_log_likelihood": ("n",) if batched_ else (),
        "log_alpha": ("n", None, None) if batched_ else (None, None),
        "grad": ("n",) if batched_ else (),
    }
    lengths = (None,) if concatenated or not batched_ else ("n",)
    out = []
    for name in names:
        v = b[name]
        if isinstance(v, ArgSpec):
            out.append(labels.get(name, lengths[: v.ndim]))
    return out


def _ctc_local(
    op: Any, shape: tuple[int, ...], layout: Layout, mesh: Any, outputs: Sequence[ArgSpec]
) -> Callable:
    """The ctc op on one device's samples: list lengths (and concatenated targets) cut to them.

    The forward's log_alpha is sized by the device's longest target: it is padded to the
    global size with -inf (log 0; the backward reads only each sample's own extent).
    A device without samples returns empty blocks (torch refuses an empty batch).
    """

    def local(device: int, *args: Any, **kwargs: Any) -> Any:
        b = _bind(op, args, kwargs)
        lo, hi = local_bounds(shape, layout, mesh, device)[1]
        lp = b["log_probs"]
        if hi == lo:
            blocks = [
                lp.new_empty((*o.shape[:d], 0, *o.shape[d + 1 :])) for o, d in _batch_dims(outputs)
            ]
            return tuple(blocks) if len(blocks) > 1 else blocks[0]
        lengths = {n: b[n] for n in ("input_lengths", "target_lengths")}
        if b["targets"].ndim == 1:  # whole concatenated targets: this device's samples'
            sizes = [int(n) for n in lengths["target_lengths"]]
            start = sum(sizes[:lo])
            b["targets"] = b["targets"][start : start + sum(sizes[lo:hi])]
            for n, v in lengths.items():
                b[n] = v[lo:hi]
        else:
            for n, v in lengths.items():
                if not isinstance(v, torch.Tensor):  # int lists are not cut by the dispatcher
                    b[n] = v[lo:hi]
        out = _call(op, b)
        if not isinstance(out, tuple):
            return out
        nll, alpha = out
        extent = outputs[1].shape[2]
        pad = alpha.new_full((*alpha.shape[:2], extent - alpha.shape[2]), -math.inf)
        return nll, torch.cat([alpha, pad], 2)

    return local


def _batch_dims(outputs: Sequence[ArgSpec]) -> list[tuple[ArgSpec, int]]:
    """Each ctc output with its batch dim (dim 1 of a (T, N, C) gradient, else dim 0)."""
    return [(o, 1 if o.ndim == 3 and len(outputs) == 1 else 0) for o in outputs]


def _ctc_strategies(ri: RuleInput, names: Sequence[str], outs: list[tuple]) -> Iterator[Strategy]:
    b = _bind(ri.op, ri.args, ri.kwargs)
    lp = b["log_probs"]
    for s in batched(ri, _ctc_labels(b, names), outs):
        lp_layout = s.inputs[[n for n in names if isinstance(b[n], ArgSpec)].index("log_probs")]
        if lp.ndim == 3 and lp_layout.dims[1]:
            local = _ctc_local(ri.op, lp.shape, lp_layout, ri.mesh, ri.outputs)
            yield Strategy(s.inputs, s.outputs, local=local, local_device=True)
        else:
            yield s


@register_rule(*_CTC)
def ctc_loss_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Batched over the batch dim (time and classes coupled); lengths cut per device."""
    names = ["log_probs", "targets", "input_lengths", "target_lengths"]
    three = ri.tensors[0].ndim == 3
    outs = [("n",) if three else (), ("n", None, None) if three else (None, None)]
    yield from _ctc_strategies(ri, names, outs)


@register_rule(*_CTC_BACKWARD)
def ctc_loss_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Batched over the batch dim, as the forward."""
    names = [
        "grad",
        "log_probs",
        "targets",
        "input_lengths",
        "target_lengths",
        "neg_log_likelihood",
        "log_alpha",
    ]
    three = ri.outputs[0].ndim == 3
    yield from _ctc_strategies(ri, names, [(None, "n", None) if three else (None, None)])


# == meta kernels ==============================================================
def _like_self(*args: Any, **kwargs: Any) -> torch.Tensor:
    """A backward whose result has its `self` argument's shape (the second argument)."""
    return torch.empty_like(args[1])


def _ctc_backward_meta(grad: torch.Tensor, log_probs: torch.Tensor, *args: Any, **kwargs: Any):
    return torch.empty_like(log_probs)


def _ctc_tensor_meta(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    zero_infinity: bool = False,
):
    """`_ctc_loss.Tensor` on meta: its log_alpha's size is the longest target's (a value)."""
    if input_lengths.is_meta or target_lengths.is_meta:
        # (not NotImplementedError: torch reads that from a Python kernel as "no kernel")
        raise RuntimeError(
            "aten._ctc_loss.Tensor: the shape of its log_alpha output depends on the values "
            "of target_lengths, and sharded lengths have no values on the meta device. Pass "
            "input_lengths and target_lengths as plain tensors or int lists (they are small)"
        )
    return aten._ctc_loss.default(
        log_probs, targets, input_lengths.tolist(), target_lengths.tolist(), blank, zero_infinity
    )


_META_LIB: Any = None


def _register_meta_kernels() -> None:
    """Meta kernels for the loss ops that lack one in torch 2.13 (shape inference only)."""
    kernels = {
        aten.multi_margin_loss_backward.default: _like_self,
        aten.multilabel_margin_loss_backward.default: _like_self,
        aten._ctc_loss_backward.default: _ctc_backward_meta,
        aten._ctc_loss_backward.Tensor: _ctc_backward_meta,
        aten._ctc_loss.Tensor: _ctc_tensor_meta,
    }
    global _META_LIB
    for op, kernel in kernels.items():
        name = op.name()
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"):
            continue
        if _META_LIB is None:
            _META_LIB = torch.library.Library("aten", "IMPL", "Meta")  # noqa: TOR901
        _META_LIB.impl(name.removeprefix("aten::"), kernel)


_register_meta_kernels()
