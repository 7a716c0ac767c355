"""Rules for neural-network ops: embedding, nll loss, dropout and random ops (attention: `_attention.py`).

Owns the layouts of the aten ops that `F.embedding`, `F.cross_entropy` /
`F.nll_loss`, `F.dropout` and the random initializers reach in torch 2.13
(forward and backward, traced with a `TorchDispatchMode`), and `.item()`. It
does not own `log_softmax` (the first half of `F.cross_entropy`:
`_reductions.py`), nor attention (`F.scaled_dot_product_attention`: its rules
and their strategies are in `_attention.py`).

The rules, by op (A = mesh axes):

- ``embedding(table, ids)``: table split on the vocabulary dim over A -> each
  device looks up the ids inside its vocabulary chunk (shifted by the chunk's
  start; other ids give zero rows) and the output is partial-``sum`` over A:
  no gather of the table (uneven chunks, empty chunks included). Table split on
  the hidden dim -> output split on its last dim. ids split -> output split
  the same way. A partial table stays partial (a lookup is linear).
- ``embedding_dense_backward(grad, ids, ...)``: first, the gradient split on
  the vocabulary dim over every mesh axis on which grad and ids are both
  replicated (and not partial): each device scatter-adds only the ids inside
  its vocabulary chunk into a chunk-sized buffer, O(V/P x H) instead of the
  whole V x H table (uneven and empty chunks included). Then today's
  candidates: each device scatter-adds its own ids' rows: ids split over A ->
  table gradient partial-``sum`` over A; grad split on the hidden dim ->
  gradient split on dim 1; a partial-``sum`` grad stays partial. The rule
  sees (grad, ids, num_weights), not the table: a vocabulary split over an
  axis the table is replicated on is all-gathered by whoever consumes it.
  That costs nothing extra when the gradient is also reduced over data axes
  of size >= 2 (all-reduce = reduce-scatter + all-gather: 2(d-1)/d VH/P +
  (P-1)/P VH <= 2(d-1)/d VH for d >= 2) and (P-1)/P x V x H when it is not
  (a replicated table with replicated ids on a mesh axis P).
  ``scale_grad_by_freq`` needs every id: ids unsplit (ids outside a chunk go
  to a dummy row, so they count for no id of the chunk).
- ``nll_loss_forward`` / ``nll_loss2d_forward`` (`F.cross_entropy` = log_softmax
  + nll_loss): class dim split over A -> each device picks the target's
  log-prob only where the target is in its class chunk; output and
  total_weight partial-``sum`` over A (and over the axes splitting the batch
  dims, for ``sum``/``mean``). ``mean`` divides by the *global* weight of the
  non-ignored targets: a decomposition into the ``sum`` loss and the total
  weight, which without class weights is the count of non-ignored targets,
  counted by every device holding them (an all-reduce over the batch splits
  only: none when the batch is whole), and with class weights an all-reduce
  of the chunks' scalar. The class weight is split like the classes. No
  logits gather.
- ``nll_loss_backward`` / ``nll_loss2d_backward``: -weight * grad (divided by
  the total weight for ``mean``) at the target's position in the owning chunk
  only; the class and batch splits of the input are kept. Split over the
  classes without class weights, the gradient also carries its rows' sums over
  the class dim (every device holding a row's target knows its one nonzero),
  so a ``log_softmax`` backward after it needs no all-reduce (Megatron's fused
  vocab-parallel cross-entropy: two per-token all-reduces forward, none
  backward).
- Random ops (DESIGN §6), in two modes (`_rng.py`, ``sl.rng``). Default
  (``sl.rng("torch")``): the same values as the unsharded op with the same
  seed, whatever the layout: the op runs once on a plain tensor of the
  *global* shape under the current RNG state (same RNG consumption as the
  unsharded op), and each device keeps its block. ``native_dropout`` draws its
  mask that way (``native_dropout(ones)``) and scales the local input by it, so
  a partial input stays partial. `F.dropout` on CPU decomposes above dispatch
  into ``empty_like`` + ``bernoulli_`` + ``div_`` + ``mul``: ``bernoulli_`` is
  one of the in-place fills handled here (``bernoulli_``, ``uniform_``,
  ``normal_``, ``exponential_``, ``random_``, ``cauchy_``, ``log_normal_``,
  ``geometric_``), as are ``rand_like``, ``randn_like``, ``randint_like``,
  ``bernoulli(x, p)`` and ``bernoulli(p_tensor)`` (its probabilities are
  gathered first). On the distributed backend every rank draws the global
  tensor, so **every rank must seed identically** (as with DTensor) and holds
  the global tensor transiently. Counter mode (``with sl.rng("counter"):``):
  the same rules and layouts, but each device computes its own block from the
  global element indices (`_rng.sample`, `_rng.dropout_keep`): O(local)
  memory and time, no communication, the same values for every layout and
  mesh and for plain tensors inside the mode -- not torch's stream. It covers
  the ops above except ``random_()`` without bounds, which raises `NoRuleError`
  there (so does any other op that draws); a call with an explicit
  ``generator=`` draws from it as in the default mode. Dropout's mask is the same on CPU (``bernoulli_(1 - p)``) and on
  accelerators (``native_dropout``). The mode is read when an op runs, so one
  cached decision serves both modes.
- ``_local_scalar_dense`` (``.item()``): the value made replicated, then the
  Python number of the local replica.

Invariant: every strategy is exact for uneven shapes (empty chunks included)
and for every partial input it keeps; anything else is reduced first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..collectives._ledger import capture_hooks  # sl.capture: no value reads
from ..layouts._layout import Layout
from ..layouts._shard import local_bounds
from . import (
    _aliasing,
    _pointwise,  # noqa: F401  (registers first: the `_like` rules below replace its own)
    _rng,
)
from ._api import _local_blocks
from ._dispatch import _move
from ._rng import _bind
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor

aten = torch.ops.aten

Dims = tuple[tuple[str, ...], ...]


# == helpers ===================================================================
def _in_order(ri: RuleInput, want: dict[str, Layout]) -> tuple[Layout, ...]:
    """`want` (by argument name) as `Strategy.inputs`: tensor arguments in flat order."""
    names = [a.name for a in ri.op._schema.arguments]
    order = [names[i] for i, a in enumerate(ri.args) if isinstance(a, ArgSpec)]
    order += [k for k, v in ri.kwargs.items() if isinstance(v, ArgSpec)]
    return tuple(want[n] for n in order)


def _axes(dims: Dims) -> set[str]:
    return {a for axes in dims for a in axes}


def _drop(dims: Dims, used: set[str]) -> Dims:
    """`dims` without the axes in `used` (a dim keeps its major axes up to the first dropped)."""
    out = []
    for axes in dims:
        kept: tuple[str, ...] = ()
        for a in axes:
            if a in used:
                break
            kept += (a,)
        out.append(kept)
    return tuple(out)


def _kept_partial(layout: Layout, used: set[str], ops: tuple[str, ...] = ("sum",)) -> Layout:
    """The partial part of `layout` kept by a linear op (empty when `used` or its op forbid)."""
    if layout.partial and layout.reduce_op in ops and not used & set(layout.partial):
        return Layout((), layout.partial, layout.reduce_op)
    return Layout(())


def _unique(items: list) -> list:
    found = []
    for item in items:
        if item not in found:
            found.append(item)
    return found


def _global(a: Any) -> Any:
    """The global value of a replicated ShardedTensor (its local replica), or `a` itself."""
    return a._shards[0] if isinstance(a, ShardedTensor) else a


# == embedding =================================================================
def _vocab_lookup(shape: tuple[int, ...], table_layout: Layout, mesh: Any) -> Callable:
    """Local lookup in a vocabulary chunk: ids outside it give zero rows."""

    def local(device: int, weight: torch.Tensor, ids: torch.Tensor, *args: Any, **kwargs: Any):
        lo, hi = local_bounds(shape, table_layout, mesh, device)[0]
        if hi == lo:
            return weight.new_zeros((*ids.shape, weight.shape[1]))
        inside = (ids >= lo) & (ids < hi)
        out = aten.embedding.default(weight, torch.where(inside, ids - lo, 0))
        return out.masked_fill_(~inside.unsqueeze(-1), 0)

    return local


@register_rule(aten.embedding.default)
def embedding_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Vocab split -> partial-sum output (no gather); hidden split -> last dim; ids split -> same."""
    table, ids = ri.tensors[:2]
    t_dims, i_dims = table.layout.dims, ids.layout.dims
    choices = [
        (t_dims, _drop(i_dims, _axes(t_dims) | set(table.layout.partial))),  # table-driven
        (_drop(t_dims, _axes(i_dims)), i_dims),  # ids-driven
        (((),) * 2, ((),) * ids.ndim),
    ]
    for td, idd in _unique(choices):
        vocab, hidden = td
        used = _axes(td) | _axes(idd)
        ops = ("sum",) if vocab else ("sum", "avg", "max", "min")  # a lookup commutes with each
        kept = _kept_partial(table.layout, used, ops)
        out = Layout((*idd, hidden), tuple(vocab) + kept.partial, kept.reduce_op)
        local = _vocab_lookup(table.shape, Layout(td), ri.mesh) if vocab else None
        yield Strategy(
            (Layout(td, kept.partial, kept.reduce_op), Layout(idd)),
            (out,),
            local=local,
            local_device=bool(vocab),
        )


def _vocab_scatter(num_weights: int, vocab: tuple[str, ...], mesh: Any) -> Callable:
    """Local embedding backward into this device's vocabulary chunk only: O(chunk x H).

    Ids outside the chunk go to a dummy row past its end (dropped), so they add to no row
    and, with ``scale_grad_by_freq``, count for no id of the chunk.
    """
    layout = Layout((vocab, ()))

    def local(
        device: int, grad: torch.Tensor, ids: torch.Tensor, n_weights: int, pad: int, by_freq: bool
    ):
        lo, hi = local_bounds((num_weights, 1), layout, mesh, device)[0]
        n = hi - lo
        inside = (ids >= lo) & (ids < hi)
        local_ids = torch.where(inside, ids - lo, n)
        pad = pad - lo if lo <= pad < hi else -1
        out = aten.embedding_dense_backward.default(grad, local_ids, n + 1, pad, by_freq)
        return out[:n]  # rows [0, n) of a contiguous buffer: contiguous, no copy

    return local


@register_rule(aten.embedding_dense_backward.default)
def embedding_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Vocab split over the axes grad and ids leave free first; then each device's own ids."""
    grad, ids = ri.tensors[:2]
    b = _bind(ri.op, ri.args, ri.kwargs)
    by_freq = bool(b["scale_grad_by_freq"])
    g_dims = grad.layout.dims
    choices = [
        g_dims,  # grad-driven
        (*ids.layout.dims, *_drop(g_dims[-1:], _axes(ids.layout.dims))),  # ids-driven
        ((),) * grad.ndim,
    ]
    plain, split = [], []
    g_used = _axes(g_dims) | set(grad.layout.partial)
    for dims in _unique(choices):
        idd, hidden = dims[:-1], dims[-1]
        if by_freq and _axes(idd):  # frequencies count every id
            idd = ((),) * len(idd)
            dims = (*idd, hidden)
        batch = tuple(a for axes in idd for a in axes)
        ops = ("sum",) if batch else ("sum", "avg")
        kept = _kept_partial(grad.layout, _axes(dims), ops)
        inputs = (Layout(dims, kept.partial, kept.reduce_op), Layout(idd))
        out = Layout(((), hidden), batch + kept.partial, kept.reduce_op)
        # a partial table gradient over axes the grad is replicated on only comes from
        # slicing that grad: gathering the ids instead (one int per token) and splitting the
        # vocabulary is cheaper whenever the ids are smaller than the table's block
        made = tuple(a for a in batch if a not in g_used)
        plain.append((Strategy(inputs, (out,)), made))
        # grad and ids replicated over `vocab`: each device keeps only its vocabulary chunk
        taken = _axes(dims) | set(kept.partial)
        vocab = tuple(a for a in ri.mesh.axis_names if a not in taken)
        if vocab:
            local = _vocab_scatter(b["num_weights"], vocab, ri.mesh)
            out = Layout((vocab, hidden), batch + kept.partial, kept.reduce_op)
            split.append(Strategy(inputs, (out,), local=local, local_device=True))
    yield from split
    for strategy, made in plain:
        if split and made and _ids_cheaper(ids, b["num_weights"], grad, made, ri.mesh):
            continue
        yield strategy


def _ids_cheaper(ids: ArgSpec, vocab: int, grad: ArgSpec, axes: tuple, mesh: Any) -> bool:
    """Whether gathering the ids over `axes` costs less than reducing a (vocab, hidden) block."""
    n = mesh.group_size(axes)
    hidden = grad.shape[-1]
    ids_bytes = (n - 1) * -(-math.prod(ids.shape) // n) * ids.dtype.itemsize
    table_bytes = (n - 1) * -(-vocab // n) * hidden * grad.dtype.itemsize
    return ids_bytes < table_bytes


# == nll loss ==================================================================
_NLL_FORWARD = {aten.nll_loss_forward.default, aten.nll_loss2d_forward.default}
_NLL_BACKWARD = {aten.nll_loss_backward.default, aten.nll_loss2d_backward.default}
_NONE, _MEAN, _SUM = 0, 1, 2


def _class_dim(ndim: int) -> int:
    return 1 if ndim >= 2 else 0


def _nll_choices(x: ArgSpec, target: ArgSpec, extra: list[Dims]) -> list[Dims]:
    """Candidate dims for the input (N, C, *rest): its own, the target's, the extras', none."""
    c = _class_dim(x.ndim)
    t_dims = list(target.layout.dims)
    classes = _drop((x.layout.dims[c],), _axes(tuple(t_dims)))[0]
    from_target = (*t_dims[:c], classes, *t_dims[c:])
    return _unique([x.layout.dims, from_target, *extra, ((),) * x.ndim])


def _target_dims(dims: Dims) -> Dims:
    c = _class_dim(len(dims))
    return tuple(axes for d, axes in enumerate(dims) if d != c)


def _in_chunk(func: Any, shape: tuple[int, ...], layout: Layout, mesh: Any) -> Callable:
    """The op on a class chunk: targets outside it (or ignored) become ignore_index -1."""
    c = _class_dim(len(shape))
    names = [a.name for a in func._schema.arguments]

    def local(device: int, *args: Any, **kwargs: Any):
        b = _bind(func, args, kwargs)
        x, target = b["self"], b["target"]
        # as the unsharded op: no silent zero for a bad target (not while torch.compile traces:
        # the shards have no values then; h9g)
        if target.device.type == "cpu" and not torch.compiler.is_compiling():
            bad = (target != b["ignore_index"]) & ((target < 0) | (target >= shape[c]))
            if capture_hooks:  # sl.capture: no value read, an op its replays run too
                torch._assert_async(~bad.any(), f"A target is out of bounds ({shape[c]} classes).")
            elif bool(bad.any()):  # (not on accelerators: it would cost a host sync)
                raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
        lo, hi = local_bounds(shape, layout, mesh, device)[c]
        if hi == lo:  # an empty class chunk: nothing to pick
            if func in _NLL_BACKWARD:
                return torch.zeros_like(x)
            zero = x.new_zeros(())
            return (x.new_zeros(target.shape) if b["reduction"] == _NONE else zero), zero
        ok = (target != b["ignore_index"]) & (target >= lo) & (target < hi)
        b["target"] = torch.where(ok, target - lo, -1)  # local class ids never equal -1
        b["ignore_index"] = -1
        return func(*(b[n] for n in names))  # `weight` is already the chunk's block

    return local


def _nll_mean_decomposition(func: Any) -> Callable:
    """mean = (sum loss, partial) / (total weight, replicated).

    Without class weights the total weight is the count of non-ignored targets, which every
    device holding a target can count whatever its class chunk: a sum over the batch splits
    only (no collective when the batch is whole, as in Megatron's vocab-parallel loss). With
    class weights each device counts the weights of its chunk's targets and the scalar is
    all-reduced."""

    def decompose(*args: Any, **kwargs: Any) -> tuple[ShardedTensor, ShardedTensor]:
        b = _bind(func, args, kwargs)
        loss, total = func(b["self"], b["target"], b["weight"], _SUM, b["ignore_index"])
        target = b["target"]
        if b["weight"] is None and isinstance(target, ShardedTensor):
            valid = aten.ne.Scalar(target, b["ignore_index"])
            total = aten.sum.default(valid, dtype=total.dtype)
        if total._layout != _SCALAR:
            total = _move(func, total, _SCALAR)
        return aten.div.Tensor(loss, total), total

    return decompose


_SCALAR = Layout(())


# The gradient of ``nll_loss`` has one nonzero per row of the class dim: ``-w[t] * g`` (over
# the total weight for ``mean``) at the target t. Split over the classes, each device holds
# only its chunk, but every device holding a row's target can tell that row's sum over the
# classes. A ``log_softmax`` backward (``g - exp(y) * sum(g)``, `_reductions.py`) needs that
# sum: the nll gradient carries it (``_class_sums``: (class dim, the sums split like the
# rows, the gradient's write stamp)), so the pair needs no collective (Megatron's fused
# vocab-parallel cross-entropy backward). A gradient written since (its stamp changed) is
# summed as usual.
def _row_value(g: torch.Tensor, total: torch.Tensor, reduction: int) -> torch.Tensor:
    """The nonzero of a row of the nll gradient without class weights (the kernel's value)."""
    return -(g / total) if reduction == _MEAN else -g


def _nll_backward_with_sums(func: Any, local: Callable, want: dict[str, Layout], c: int):
    """The class-split nll backward run per device (as `local`), its result carrying the sums
    of its rows over the class dim (`_class_sums`). `want`: the strategy's input layouts by
    argument name (a plain tensor argument is cut to its layout here, as dispatch would)."""
    out = want["self"].without_partial()
    sums_layout = Layout(tuple(() if d == c else axes for d, axes in enumerate(out.dims)))

    def decompose(*args: Any, **kwargs: Any) -> ShardedTensor:
        b = _bind(func, args, kwargs)
        mesh = next(v._mesh for v in b.values() if isinstance(v, ShardedTensor))
        for name, layout in want.items():
            v = b[name]
            if isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor):
                b[name] = _local_blocks(v, mesh, layout)
        x = b["self"]
        blocks, sums = [], []
        for j, dev in enumerate(mesh.local_devices):
            d = {k: (v._shards[j] if isinstance(v, ShardedTensor) else v) for k, v in b.items()}
            block = local(dev, **d)
            value = _row_value(d["grad_output"], d["total_weight"], d["reduction"])
            row = torch.where(d["target"] != d["ignore_index"], value, value.new_zeros(()))
            blocks.append(block)
            sums.append(row.unsqueeze(c).to(block.dtype))
        grad = ShardedTensor(blocks, mesh, out, tuple(x.shape))
        rows = tuple(1 if d == c else n for d, n in enumerate(x.shape))
        grad._class_sums = (c, ShardedTensor(sums, mesh, sums_layout, rows), _aliasing._stamp(grad))
        return grad

    return decompose


@register_rule(*_NLL_FORWARD)
def nll_loss_forward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Class dim split -> pick in the owning chunk, partial-sum output; mean -> all-reduce a scalar."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    x, target, reduction = b["self"], b["target"], b["reduction"]
    c = _class_dim(x.ndim)
    for dims in _nll_choices(x, target, []):
        classes = dims[c]
        batch = tuple(a for d, axes in enumerate(dims) if d != c for a in axes)
        kept = _kept_partial(
            x.layout, _axes(dims), ("sum",) if batch or classes else ("sum", "avg")
        )
        want = {
            "self": Layout(dims, kept.partial, kept.reduce_op),
            "target": Layout(_target_dims(dims)),
            "weight": Layout((classes,)),
        }
        inputs = _in_order(ri, want)
        if reduction == _MEAN and (batch or classes):
            yield Strategy(inputs, decompose=_nll_mean_decomposition(ri.op))
            continue
        summed = classes if reduction == _NONE else batch + classes
        out_dims = _target_dims(dims) if reduction == _NONE else ()
        outs = (
            Layout(out_dims, summed + kept.partial, kept.reduce_op),
            # the total weight is counted where the target's class lives: a partial sum over
            # the class axes (and, when reduced, over the batch axes too)
            Layout((), classes if reduction == _NONE else batch + classes),
        )
        local = _in_chunk(ri.op, x.shape, Layout(dims), ri.mesh) if classes else None
        yield Strategy(inputs, outs, local=local, local_device=bool(classes))


@register_rule(*_NLL_BACKWARD)
def nll_loss_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """-weight * grad at the target, written only in the chunk that owns the target's class."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    grad, x, target = b["grad_output"], b["self"], b["target"]
    total, reduction = b["total_weight"], b["reduction"]
    c = _class_dim(x.ndim)
    extra = [tuple((*g[:c], (), *g[c:])) for g in [grad.layout.dims] if reduction == _NONE]
    for dims in _nll_choices(x, target, extra):
        used = _axes(dims)
        kept = _kept_partial(grad.layout, used, ("sum", "avg"))
        g_dims = _target_dims(dims) if reduction == _NONE else ()
        x_keep = _kept_partial(x.layout, used, ("sum", "avg", "max", "min"))  # values unused
        want = {
            "grad_output": Layout(g_dims, kept.partial, kept.reduce_op),
            "self": Layout(dims, x_keep.partial, x_keep.reduce_op),
            "target": Layout(_target_dims(dims)),
            "weight": Layout((dims[c],)),
            # the global total weight divides a mean; other reductions ignore it
            "total_weight": Layout(()) if reduction == _MEAN else total.layout,
        }
        local = _in_chunk(ri.op, x.shape, Layout(dims), ri.mesh) if dims[c] else None
        out = Layout(dims, kept.partial, kept.reduce_op)
        sums = (  # the gradient can tell its rows' sums (see `_nll_backward_with_sums`)
            local is not None
            and b["weight"] is None
            and not kept.partial
            and all(isinstance(b[n], ArgSpec) for n in ("grad_output", "target", "total_weight"))
        )
        if sums:
            decompose = _nll_backward_with_sums(ri.op, local, want, c)
            yield Strategy(_in_order(ri, want), (out,), decompose=decompose)
            continue
        yield Strategy(_in_order(ri, want), (out,), local=local, local_device=bool(dims[c]))


# == random ops ================================================================
# In-place fills whose values depend on the shape only, and `_like` ops whose values
# depend on the input's shape only. `bernoulli_.Tensor` and `bernoulli.default` read
# probabilities from a tensor: that tensor is made replicated first.
_FILLS = [
    aten.bernoulli_.float,
    aten.bernoulli_.Tensor,
    aten.uniform_.default,
    aten.normal_.default,
    aten.exponential_.default,
    aten.random_.default,
    getattr(aten.random_, "from"),
    aten.random_.to,
    aten.cauchy_.default,
    aten.log_normal_.default,
    aten.geometric_.default,
]
_LIKES = [
    aten.rand_like.default,
    aten.rand_like.generator,
    aten.randn_like.default,
    aten.randn_like.generator,
    aten.randint_like.default,
    aten.randint_like.low_dtype,
    aten.randint_like.generator,
    aten.randint_like.low_generator_dtype,
    aten.bernoulli.p,
]


def _draw(func: Any, x: ShardedTensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """`func` run once on a plain tensor of `x`'s global shape and strides (the unsharded
    op's RNG use: torch fills in memory order, so a transposed tensor draws transposed)."""
    blank = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return func(blank, *map(_global, args), **{k: _global(v) for k, v in kwargs.items()})


def _counter_blocks(
    func: Any, x: ShardedTensor, layout: Layout, b: dict, dtype: torch.dtype
) -> list[torch.Tensor | None]:
    """Counter mode: each device's block of `func`'s values under `layout` (O(local)).

    One key per op (the op counter advances once, on every rank alike). None for a device
    that holds a zero summand of a partial-``sum`` layout (it draws nothing).
    """
    key = _rng.counter_key()
    shape, mesh = tuple(x.shape), x._mesh
    reads = _rng.tensor_params(func)  # probabilities read from a (replicated) tensor
    probs = {n: _global(b[n]) for n in reads if isinstance(b[n], torch.Tensor)}
    blocks: list[torch.Tensor | None] = []
    for shard, dev in zip(x._shards, mesh.local_devices):
        if layout.partial and layout.reduce_op == "sum" and mesh.index_along(dev, layout.partial):
            blocks.append(None)
            continue
        bounds = local_bounds(shape, layout, mesh.abstract, dev)
        local = dict(b)
        for n, full in probs.items():  # replicated probabilities: this block of them
            view = full.expand(shape)
            for d, (lo, hi) in enumerate(bounds):
                view = view.narrow(d, lo, hi - lo)
            local[n] = view
        blocks.append(_rng.sample(func, local, shape, bounds, dtype, shard.device, key))
    return blocks


def _fill_decomposition(func: Any) -> Callable:
    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> ShardedTensor:
        if _rng.is_counter(kwargs):
            b = _bind(func, (x, *args), kwargs)
            for shard, block in zip(x._shards, _counter_blocks(func, x, x._layout, b, x.dtype)):
                if block is None:
                    shard.zero_()
                else:
                    shard.copy_(block)
            return x
        value = _draw(func, x, args, kwargs)
        for shard, block in zip(x._shards, _local_blocks(value, x._mesh, x._layout)._shards):
            shard.copy_(block)
        return x

    return decompose


def _like_decomposition(func: Any, layout: Layout, out: ArgSpec) -> Callable:
    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> ShardedTensor:
        if _rng.is_counter(kwargs):
            b = _bind(func, (x, *args), kwargs)
            blocks = _counter_blocks(func, x, layout, b, out.dtype)
            return ShardedTensor(blocks, x._mesh, layout, tuple(x.shape))
        return _local_blocks(_draw(func, x, args, kwargs), x._mesh, layout)

    return decompose


@register_rule(*_FILLS)
def fill_rule(ri: RuleInput) -> Iterator[Strategy]:
    """In place, layout kept: every device keeps its block of the globally drawn tensor."""
    x = ri.tensors[0]
    others = tuple(Layout(((),) * s.ndim) for s in ri.tensors[1:])  # probabilities: replicated
    yield Strategy((x.layout, *others), decompose=_fill_decomposition(ri.op))


@register_rule(*_LIKES)
def random_like_rule(ri: RuleInput) -> Iterator[Strategy]:
    """A fresh random tensor with the input's split dims, drawn globally and cut."""
    x = ri.tensors[0]
    layout = Layout(x.layout.dims)
    yield Strategy((x.layout,), decompose=_like_decomposition(ri.op, layout, ri.outputs[0]))


@register_rule(aten.bernoulli.default)
def bernoulli_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Probabilities made replicated, drawn globally, cut back to their split dims."""
    p = ri.tensors[0]
    layout = Layout(p.layout.dims)

    def decompose(probs: ShardedTensor, **kwargs: Any) -> ShardedTensor:
        if _rng.is_counter(kwargs):
            b = _bind(aten.bernoulli.default, (probs,), kwargs)
            blocks = _counter_blocks(aten.bernoulli.default, probs, layout, b, probs.dtype)
            return ShardedTensor(blocks, probs._mesh, layout, tuple(probs.shape))
        value = aten.bernoulli.default(_global(probs), **kwargs)
        return _local_blocks(value, probs._mesh, layout)

    yield Strategy((Layout(((),) * p.ndim),), decompose=decompose)


def _dropout_decomposition(x: ShardedTensor, p: float, train: bool | None):
    if _rng.is_counter():  # each device's mask from the global indices: O(local)
        key, layout = _rng.counter_key(), Layout(x._layout.dims)
        scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
        outs, masks = [], []
        for shard, dev in zip(x._shards, x._mesh.local_devices):
            bounds = local_bounds(tuple(x.shape), layout, x._mesh.abstract, dev)
            masks.append(_rng.dropout_keep(key, tuple(x.shape), bounds, shard.device, p))
            outs.append(shard.mul(masks[-1]).mul_(scale))
        shape = tuple(x.shape)
        return (
            ShardedTensor(outs, x._mesh, x._layout, shape),
            ShardedTensor(masks, x._mesh, layout, shape),
        )
    # The mask of the unsharded op on this shape: same RNG use, same values.
    ones = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).fill_(1)
    mask = aten.native_dropout.default(ones, p, train)[1]
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)  # as torch: input.mul(mask).mul_(scale)
    masks = _local_blocks(mask, x._mesh, Layout(x._layout.dims))
    outs = [s.mul(m).mul_(scale) for s, m in zip(x._shards, masks._shards)]
    return ShardedTensor(outs, x._mesh, x._layout, tuple(x.shape)), masks


@register_rule(aten.native_dropout.default)
def native_dropout_rule(ri: RuleInput) -> Iterator[Strategy]:
    """The global mask, cut; input * mask * scale is linear, so a partial input stays partial."""
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    mask = Layout(x.layout.dims)
    if b["train"] is False or math.prod(x.shape) == 0:  # no random numbers drawn
        yield Strategy((x.layout,), (x.layout, mask))
    else:
        yield Strategy((x.layout,), decompose=_dropout_decomposition)


@register_rule(aten.native_dropout_backward.default)
def native_dropout_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """grad * mask * scale: linear in the gradient (partial kept), mask cut like it."""
    grad, mask = ri.tensors[:2]
    for dims in _unique([grad.layout.dims, mask.layout.dims, ((),) * grad.ndim]):
        kept = _kept_partial(grad.layout, _axes(dims), ("sum", "avg", "max", "min"))
        g = Layout(dims, kept.partial, kept.reduce_op)
        yield Strategy((g, Layout(dims)), (g,))


# == scalars ===================================================================
@register_rule(aten._local_scalar_dense.default)
def item_rule(ri: RuleInput) -> Iterator[Strategy]:
    """`.item()`: the value made replicated, then the local replica's number."""
    x = ri.tensors[0]
    yield Strategy((Layout(((),) * x.ndim),), decompose=lambda t: t._shards[0].item())
