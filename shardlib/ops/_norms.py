"""Rules for batch and group normalization (forward and backward); instance norm reaches batch norm.

Owns the layouts of the aten ops `F.batch_norm`, `F.instance_norm` and
`F.group_norm` reach in torch 2.13 on the CPU (traced with a
`TorchDispatchMode`): ``native_batch_norm``, ``_native_batch_norm_legit``
(and ``.no_stats``, ``_functional``, ``_no_training``),
``_batch_norm_with_update`` (and ``_functional``), ``_batch_norm_no_update``,
``native_batch_norm_backward``, ``batch_norm_backward``, ``native_group_norm``
and ``native_group_norm_backward``. It does not own layer norm (``native_layer_norm``:
`_reductions.py`), nor the ops ``F.instance_norm`` wraps around batch norm
(a view of ``(N, C, ...)`` as ``(1, N·C, ...)``, ``repeat`` and ``mean`` of the
running statistics: their own rules), nor ``F.local_response_norm`` (a
composition of ``constant_pad_nd``, ``avg_pool2d``/``avg_pool3d`` and pointwise
ops: their rules). Input layout: ``(N, C, *spatial)``; the *reduced* dims of batch
norm are all but the channel dim, of group norm the spatial dims (and the
channels of a group).

The rules, by op (A_c = the axes splitting the channel dim, A_r = the axes
splitting a reduced dim):

- Batch norm, eval mode: elementwise; weight, bias and running statistics
  split like the channels (A_c). No communication beyond moving those (C numbers).
- Batch norm, training, nothing reduced split: each device normalizes its
  channels with torch's kernel. Reduced dims split: a decomposition in the
  manner of SyncBatchNorm: each device sums x and x² over its block (float64
  for inputs of at most float32 precision), **one all-reduce of the 2·C
  per-channel sums** over A_r, mean = Σx/n and var = Σx²/n − mean² (clamped at 0),
  then each device normalizes its block. Never the activation. The running
  statistics are updated from those values (momentum, unbiased variance
  n/(n−1)) identically on every replica and written into the caller's tensors
  in their own layouts (``copy_``; a plain tensor gets the replicated value);
  the ``_functional`` forms return them instead.
- Batch norm backward, eval mode: elementwise (grad input) and, for grad
  weight and bias, local sums that are partial-``sum`` over A_r (reduced
  lazily, as data-parallel gradients). Linear in the incoming gradient: a
  partial-``sum`` gradient stays partial. Training, nothing reduced split:
  torch's kernel per device (the same partial rule). Reduced dims split:
  each device sums dy and dy·x̂ per channel, **one all-reduce of the 2·C
  sums**, then ``dx = w·invstd·(dy − Σdy/n − x̂·Σdy·x̂/n)`` locally; grad
  weight and bias are those sums (partial over A_r, no collective, when grad
  input is not asked for).
- Group norm: the batch dim is independent; a channel split is local when
  every device's channel block is a whole number of groups (chunk boundaries
  on group boundaries), else the channel axes are gathered or moved onto the
  batch dim (the planner prices both); the spatial dims are reduced: split,
  the per-(sample, group) sums of x and x² (2·N·G numbers) are all-reduced
  once, as for batch norm. Backward: local when no spatial dim is split
  (grad weight/bias partial over the batch split); otherwise one all-reduce
  of the 2·N·G sums of g = dy·w and g·x̂, ``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``.

Invariant: every strategy is exact for uneven shapes (empty blocks, devices
without channels included); partial inputs are reduced first except the
incoming gradient of a local backward (linear in it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh
from ..layouts._shard import chunk_bounds
from ._api import _local_blocks
from ._dispatch import _move
from ._losses import _call, _with_sharded
from ._nn import _in_order
from ._rng import _bind
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor

aten = torch.ops.aten

Dims = tuple[tuple[str, ...], ...]


# == helpers ===================================================================
def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype the statistics are summed in: float64 for float32 and narrower."""
    return torch.float64 if dtype in (torch.float32, torch.float16, torch.bfloat16) else dtype


def _flat(dims: Dims, skip: Sequence[int]) -> tuple[str, ...]:
    """The axes splitting the dims not in `skip`, in dim order."""
    return tuple(a for d, axes in enumerate(dims) if d not in skip for a in axes)


def _mesh_of(*values: Any) -> Any:
    return next(v._mesh for v in values if isinstance(v, ShardedTensor))


def _cut(func: Any, t: torch.Tensor | None, mesh: Any, layout: Layout) -> list:
    """Per local device, the block of `t` in `layout` (moved if sharded, cut if plain)."""
    n = len(mesh.local_devices)
    if t is None:
        return [None] * n
    if isinstance(t, ShardedTensor):
        return (t if t._layout == layout else _move(func, t, layout))._shards
    return _local_blocks(t, mesh, layout)._shards


def _write(func: Any, dst: torch.Tensor, value: ShardedTensor) -> None:
    """`value` written into `dst` in `dst`'s own layout (a plain `dst`: the replicated value)."""
    if isinstance(dst, ShardedTensor):
        aten.copy_.default(dst, value)
        return
    whole = Layout(((),) * value.ndim)
    if value._layout != whole:
        value = _move(func, value, whole)
    dst.copy_(value._shards[0])


def _per_channel(t: torch.Tensor, ndim: int, dim: int = 1) -> torch.Tensor:
    """A (C,) block viewed to broadcast along `dim` of a rank-`ndim` block."""
    shape = [1] * ndim
    shape[dim] = t.shape[0]
    return t.reshape(shape)


def _all_reduced(
    func: Any, blocks: list[torch.Tensor], mesh: Any, dims: Dims, axes: tuple, shape: tuple
) -> list[torch.Tensor]:
    """Per-device partial sums (over `axes`) of one tensor of global `shape` and split
    `dims`, all-reduced: one collective, in the ledger (none when `axes` is empty)."""
    if not axes:
        return blocks
    partial = ShardedTensor(blocks, mesh, Layout(dims, axes), shape)
    return _move(func, partial, Layout(dims))._shards


# == batch norm forward ========================================================
@dataclass(frozen=True)
class _Variant:
    """A batch-norm forward overload: training mode (None: its `training` argument),
    whether it returns the new running statistics, and whether it returns a reserve."""

    training: bool | None = None
    functional: bool = False
    reserve: bool = False


_BATCH_NORM = {
    aten.native_batch_norm.default: _Variant(),
    aten._native_batch_norm_legit.default: _Variant(),
    aten._native_batch_norm_legit.no_stats: _Variant(),
    aten._native_batch_norm_legit_functional.default: _Variant(functional=True),
    aten._native_batch_norm_legit_no_training.default: _Variant(training=False),
    aten._batch_norm_with_update.default: _Variant(training=True, reserve=True),
    aten._batch_norm_with_update_functional.default: _Variant(True, True, True),
    aten._batch_norm_no_update.default: _Variant(training=False, reserve=True),
}


def _bn_training_kernel(
    func: Any,
    x: ShardedTensor,
    w: list,
    b: list,
    rm: list,
    rv: list,
    momentum: float,
    eps: float,
) -> tuple[list, list, list, list, list]:
    """Torch's training kernel per device (nothing reduced is split): whole channels each."""
    outs, means, invstds, new_rm, new_rv = [], [], [], [], []
    for j, xj in enumerate(x._shards):
        m = None if rm[j] is None else rm[j].clone()
        v = None if rv[j] is None else rv[j].clone()
        if xj.shape[1] == 0:  # a device without channels (torch refuses an empty input)
            o, mean, invstd = xj.clone(), xj.new_empty((0,)), xj.new_empty((0,))
        else:
            o, mean, invstd = aten.native_batch_norm.default(
                xj, w[j], b[j], m, v, True, momentum, eps
            )
        outs.append(o)
        means.append(mean)
        invstds.append(invstd)
        new_rm.append(m)
        new_rv.append(v)
    return outs, means, invstds, new_rm, new_rv


def _bn_training_sums(
    func: Any,
    x: ShardedTensor,
    w: list,
    b: list,
    rm: list,
    rv: list,
    momentum: float,
    eps: float,
) -> tuple[list, list, list, list, list]:
    """Reduced dims split: local Σx, Σx², one all-reduce of the 2·C sums, local normalize."""
    mesh, dims = x._mesh, x._layout.dims
    acc = _acc(x.dtype)
    red = [d for d in range(x.ndim) if d != 1]
    n = math.prod(x.shape) // x.shape[1] if x.shape[1] else 0
    sums = []
    for xj in x._shards:
        xa = xj.to(acc)
        sums.append(torch.stack([xa.sum(red), (xa * xa).sum(red)]))
    shape = (2, x.shape[1])
    sums = _all_reduced(func, sums, mesh, ((), dims[1]), _flat(dims, (1,)), shape)
    outs, means, invstds, new_rm, new_rv = [], [], [], [], []
    for j, xj in enumerate(x._shards):
        mean = sums[j][0] / n
        var = (sums[j][1] / n - mean * mean).clamp_min(0)
        invstd = (var + eps).rsqrt()
        y = (xj.to(acc) - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
        if w[j] is not None:
            y = y * _per_channel(w[j], x.ndim)
        if b[j] is not None:
            y = y + _per_channel(b[j], x.ndim)
        outs.append(y.to(x.dtype))
        means.append(mean.to(x.dtype))
        invstds.append(invstd.to(x.dtype))
        if rm[j] is not None:
            new_rm.append((momentum * mean + (1 - momentum) * rm[j]).to(rm[j].dtype))
        if rv[j] is not None:
            unbiased = var * n / (n - 1) if n > 1 else var * math.nan
            new_rv.append((momentum * unbiased + (1 - momentum) * rv[j]).to(rv[j].dtype))
    return outs, means, invstds, new_rm or [None] * len(outs), new_rv or [None] * len(outs)


def _bn_training(func: Any, variant: _Variant) -> Callable:
    """Training-mode batch norm on any layout of the input (see the module docstring)."""

    def decompose(*args: Any, **kwargs: Any) -> tuple:
        bound = _bind(func, args, kwargs)
        x = bound["input"]
        mesh, dims, channels = x._mesh, x._layout.dims, x.shape[1]
        chan = Layout((dims[1],))
        w, b = (_cut(func, bound[k], mesh, chan) for k in ("weight", "bias"))
        stats_in = [bound.get("running_mean"), bound.get("running_var")]
        rm, rv = (_cut(func, t, mesh, chan) for t in stats_in)
        run = _bn_training_sums if _flat(dims, (1,)) else _bn_training_kernel
        outs, means, invstds, new_rm, new_rv = run(
            func, x, w, b, rm, rv, bound["momentum"], bound["eps"]
        )
        out = ShardedTensor(outs, mesh, Layout(dims), tuple(x.shape))
        results = [out] + [ShardedTensor(s, mesh, chan, (channels,)) for s in (means, invstds)]
        if variant.reserve:
            reserve = [torch.empty(0, dtype=torch.uint8, device=x.device) for _ in outs]
            results.append(ShardedTensor(reserve, mesh, Layout(((),)), (0,)))
        new = [
            None if s[0] is None else ShardedTensor(s, mesh, chan, (channels,))
            for s in (new_rm, new_rv)
        ]
        if variant.functional:
            results += new
        else:
            for dst, value in zip(stats_in, new):
                if dst is not None and value is not None:
                    _write(func, dst, value)
        return tuple(results)

    return decompose


@register_rule(*_BATCH_NORM)
def batch_norm_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Eval: elementwise. Training: the kernel per device, or one all-reduce of 2·C sums."""
    variant = _BATCH_NORM[ri.op]
    b = _bind(ri.op, ri.args, ri.kwargs)
    x = b["input"]
    if x.ndim < 2:  # no channel dim: torch's own checks decide, on whole tensors
        yield Strategy(
            tuple(Layout(((),) * s.ndim) for s in ri.tensors),
            tuple(Layout(((),) * o.ndim) for o in ri.outputs),
        )
        return
    training = b["training"] if variant.training is None else variant.training
    dims = x.layout.dims
    chan = Layout((dims[1],))
    stats = ("running_mean", "running_var")
    if not training:
        want = {"input": Layout(dims), "weight": chan, "bias": chan, stats[0]: chan, stats[1]: chan}
        yield Strategy(_in_order(ri, want), decompose=_with_sharded(ri.op, want, _bn_eval(ri.op)))
        return
    want = {"input": Layout(dims), "weight": chan, "bias": chan}
    for name in stats:  # written in place: taken as they are (the decomposition moves them)
        if isinstance(b.get(name), ArgSpec):
            want[name] = b[name].layout
    values = {k: v for k, v in want.items() if k not in stats}  # (stats: written in place)
    decompose = _with_sharded(ri.op, values, _bn_training(ri.op, variant))
    yield Strategy(_in_order(ri, want), decompose=decompose)


# == batch norm backward =======================================================
def _bn_backward_args(b: dict[str, Any]) -> tuple[bool, str]:
    """(training, the name of the saved inverse std) of either backward overload."""
    if "update" in b:  # batch_norm_backward
        return bool(b["update"]), "save_var"
    return bool(b["train"]), "save_invstd"


def _bn_backward_local(func: Any, training: bool) -> Callable:
    """The backward per device. Training: the running statistics are not read (so not moved).
    An empty block gives zeros (torch's kernel divides by its channel count)."""

    def local(*args: Any, **kwargs: Any) -> Any:
        b = _bind(func, args, kwargs)
        if training:
            b["running_mean"] = b["running_var"] = None
        x = b["input"]
        if x.numel() == 0:
            outs = [torch.zeros_like(b["grad_out"]), *(x.new_zeros((x.shape[1],)),) * 2]
            return tuple(o if m else None for o, m in zip(outs, b["output_mask"]))
        return _call(func, b)

    return local


def _bn_eval(func: Any) -> Callable:
    """Eval-mode batch norm: torch's kernel per device (elementwise), no communication.

    Its saved statistics are empty (0,) tensors on the CPU and the running statistics
    elsewhere (as torch's kernels give them; the meta kernel says (C,) for both), so the
    result is assembled from what the kernel returns. An empty block skips the kernel.
    """

    def decompose(*args: Any, **kwargs: Any) -> tuple:
        b = _bind(func, args, kwargs)
        x = b["input"]
        mesh, dims, channels = x._mesh, x._layout.dims, x.shape[1]
        chan = Layout((dims[1],))
        for name in ("weight", "bias", "running_mean", "running_var"):
            if b.get(name) is not None:
                b[name] = _cut(func, b[name], mesh, chan)
        cpu = x.device.type == "cpu"
        results = []
        for j, xj in enumerate(x._shards):
            bj = {k: (v[j] if isinstance(v, list) else v) for k, v in b.items()}
            bj["input"] = xj
            if xj.numel():
                results.append(_call(func, bj))
                continue
            rm = bj["running_mean"]
            stat = xj.new_empty((0,)) if cpu else rm.clone()
            extra = [torch.empty(0, dtype=torch.uint8, device=xj.device)] * (
                len(func._schema.returns) - 3
            )
            results.append((xj.clone(), stat, stat.clone(), *extra))
        outs = [ShardedTensor([r[0] for r in results], mesh, Layout(dims), tuple(x.shape))]
        for i in range(1, len(results[0])):
            blocks = [r[i] for r in results]
            whole = blocks[0].dtype == torch.uint8 or cpu
            layout, shape = (Layout(((),)), (blocks[0].shape[0],)) if whole else (chan, (channels,))
            outs.append(ShardedTensor(blocks, mesh, layout, shape))
        return tuple(outs)

    return decompose


def _bn_backward_sums(func: Any, mask: Sequence[bool]) -> Callable:
    """Training backward with reduced dims split: one all-reduce of Σdy and Σdy·x̂ (2·C)."""

    def decompose(*args: Any, **kwargs: Any) -> tuple:
        b = _bind(func, args, kwargs)
        _, invstd_name = _bn_backward_args(b)
        dy, x = b["grad_out"], b["input"]
        mesh, dims, channels = x._mesh, x._layout.dims, x.shape[1]
        chan = Layout((dims[1],))
        w = _cut(func, b["weight"], mesh, chan)
        mean, invstd = (_cut(func, b[k], mesh, chan) for k in ("save_mean", invstd_name))
        acc, red = _acc(x.dtype), [d for d in range(x.ndim) if d != 1]
        n = math.prod(x.shape) // channels if channels else 0
        sums, xhats = [], []
        for j, (dyj, xj) in enumerate(zip(dy._shards, x._shards)):
            xhat = (xj.to(acc) - _per_channel(mean[j], x.ndim)) * _per_channel(invstd[j], x.ndim)
            g = dyj.to(acc)
            sums.append(torch.stack([g.sum(red), (g * xhat).sum(red)]))
            xhats.append(xhat)
        axes = _flat(dims, (1,))
        results: list[Any] = []
        if mask[0]:
            sums = _all_reduced(func, sums, mesh, ((), dims[1]), axes, (2, channels))
            grads = []
            for j, dyj in enumerate(dy._shards):
                total, dot = (_per_channel(s, x.ndim) for s in sums[j])
                scale = _per_channel(invstd[j].to(acc), x.ndim)
                if w[j] is not None:
                    scale = scale * _per_channel(w[j].to(acc), x.ndim)
                gi = (dyj.to(acc) - total / n - xhats[j] * dot / n) * scale
                grads.append(gi.to(x.dtype))
            results.append(ShardedTensor(grads, mesh, Layout(dims), tuple(x.shape)))
            per_channel, layout = sums, chan
        else:  # grad weight / bias only: the local sums, partial over the reduced splits
            per_channel, layout = sums, Layout((dims[1],), axes)
        # grad weight = Σdy·x̂ (row 1 of the sums), grad bias = Σdy (row 0)
        if mask[1]:
            blocks = [s[1].to(x.dtype) for s in per_channel]
            results.append(ShardedTensor(blocks, mesh, layout, (channels,)))
        if mask[2]:
            blocks = [s[0].to(x.dtype) for s in per_channel]
            results.append(ShardedTensor(blocks, mesh, layout, (channels,)))
        return tuple(results) + (None,) * (3 - len(results))

    return decompose


@register_rule(aten.native_batch_norm_backward.default, aten.batch_norm_backward.default)
def batch_norm_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Eval or nothing reduced split: local, partial grad weight/bias. Else one all-reduce."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    dy, x = b["grad_out"], b["input"]
    training, invstd_name = _bn_backward_args(b)
    mask = list(b["output_mask"])
    if x.ndim < 2:
        yield Strategy(
            tuple(Layout(((),) * s.ndim) for s in ri.tensors),
            tuple(Layout(((),) * o.ndim) for o in ri.outputs),
        )
        return
    dims = x.layout.dims
    chan = Layout((dims[1],))
    red = _flat(dims, (1,))
    current = {n: v.layout for n, v in b.items() if isinstance(v, ArgSpec)}
    if training and red:  # the reduced dims are split: statistics need one all-reduce
        want = {**current, "grad_out": Layout(dims), "input": Layout(dims), "weight": chan}
        want.update({"save_mean": chan, invstd_name: chan})
        decompose = _with_sharded(ri.op, want, _bn_backward_sums(ri.op, mask))
        yield Strategy(_in_order(ri, want), decompose=decompose)
        return
    g = dy.layout
    options: list[tuple[str, ...]] = [()]
    if (
        g.partial
        and g.reduce_op == "sum"
        and not set(g.partial) & x.layout.without_partial().used_axes
    ):
        options.insert(0, g.partial)
    for partial in options:
        want = {**current, "grad_out": Layout(dims, partial), "input": Layout(dims), "weight": chan}
        if training:
            want.update({"save_mean": chan, invstd_name: chan})
        else:
            want.update({"running_mean": chan, "running_var": chan})
        summed = partial + red
        outs = [Layout(dims, partial)] if mask[0] else []
        outs += [Layout((dims[1],), summed)] * (len(ri.outputs) - len(outs))
        local = _bn_backward_local(ri.op, training)
        yield Strategy(_in_order(ri, want), tuple(outs), local=local)


# == group norm ================================================================
def _groups_aligned(channels: int, groups: int, axes: tuple[str, ...], mesh: AbstractMesh) -> bool:
    """Whether every device's channel block (split over `axes`) is a whole number of groups."""
    if not axes:
        return True
    if groups == 0 or channels % groups:
        return False
    per = channels // groups
    k = mesh.group_size(axes)
    return all(
        chunk_bounds(channels, k, c) == tuple(per * v for v in chunk_bounds(groups, k, c))
        for c in range(k)
    )


def _gn_dims(x: ArgSpec, groups: int, mesh: AbstractMesh) -> list[Dims]:
    """Input dims to try: x's own (channel split aligned with groups), else the channel
    axes gathered, or moved onto the batch dim."""
    dims = x.layout.dims
    if _groups_aligned(x.shape[1], groups, dims[1], mesh):
        return [dims]
    cleared = (dims[0], (), *dims[2:])
    moved = (dims[0] + dims[1], (), *dims[2:])
    return [cleared, moved]


def _gn_shapes(xj: torch.Tensor, per: int) -> tuple[int, int, int, int]:
    """(N, C, HxW, groups) of one device's block."""
    n, c = xj.shape[0], xj.shape[1]
    return n, c, math.prod(xj.shape[2:]), (c // per if per else 0)


def _gn_local(per: int) -> Callable:
    """native_group_norm on one device's block (its own N, C, HxW and group count)."""

    def local(xj, w, b, n_, c_, hw_, group, eps):
        n, c, hw, g = _gn_shapes(xj, per)
        if xj.numel() == 0 or g == 0:
            empty = xj.new_empty((n, g))
            return xj.clone(), empty, empty.clone()
        return aten.native_group_norm.default(xj, w, b, n, c, hw, g, eps)

    return local


def _gn_backward_local(per: int) -> Callable:
    def local(dy, xj, mean, rstd, w, n_, c_, hw_, group, mask):
        n, c, hw, g = _gn_shapes(xj, per)
        if xj.numel() == 0 or g == 0:
            zeros = xj.new_zeros((c,))
            outs = [dy.new_zeros(xj.shape), zeros, zeros.clone()]
            return tuple(o if m else None for o, m in zip(outs, mask))
        return aten.native_group_norm_backward.default(dy, xj, mean, rstd, w, n, c, hw, g, mask)

    return local


def _gn_forward_sums(func: Any, groups: int, channels: int, hw: int) -> Callable:
    """Spatial dims split: one all-reduce of the per-(sample, group) Σx and Σx²."""
    per = channels // groups

    def decompose(x, weight, bias, n_, c_, hw_, group, eps):
        mesh, dims = x._mesh, x._layout.dims
        chan = Layout((dims[1],))
        w, b = _cut(func, weight, mesh, chan), _cut(func, bias, mesh, chan)
        acc, count = _acc(x.dtype), per * hw
        sums = []
        for xj in x._shards:
            n, c, hwj, g = _gn_shapes(xj, per)
            xr = xj.to(acc).reshape(n, g, per * hwj)
            sums.append(torch.stack([xr.sum(-1), (xr * xr).sum(-1)]))
        shape = (2, x.shape[0], groups)
        sums = _all_reduced(func, sums, mesh, ((), dims[0], dims[1]), _flat(dims, (0, 1)), shape)
        outs, means, rstds = [], [], []
        for j, xj in enumerate(x._shards):
            n, c, hwj, g = _gn_shapes(xj, per)
            mean = sums[j][0] / count
            var = (sums[j][1] / count - mean * mean).clamp_min(0)
            rstd = (var + eps).rsqrt()
            xr = xj.to(acc).reshape(n, g, per * hwj)
            y = ((xr - mean[..., None]) * rstd[..., None]).reshape(xj.shape)
            if w[j] is not None:
                y = y * _per_channel(w[j], xj.ndim)
            if b[j] is not None:
                y = y + _per_channel(b[j], xj.ndim)
            outs.append(y.to(x.dtype))
            means.append(mean.to(x.dtype))
            rstds.append(rstd.to(x.dtype))
        stats = Layout((dims[0], dims[1]))
        shape = (x.shape[0], groups)
        return (
            ShardedTensor(outs, mesh, Layout(dims), tuple(x.shape)),
            ShardedTensor(means, mesh, stats, shape),
            ShardedTensor(rstds, mesh, stats, shape),
        )

    return decompose


def _gn_backward_sums(func: Any, groups: int, channels: int, hw: int, mask: Sequence[bool]):
    """Spatial dims split: one all-reduce of Σg and Σg·x̂ per (sample, group), g = dy·w."""
    per = channels // groups

    def decompose(dy, x, mean, rstd, weight, n_, c_, hw_, group, output_mask):
        mesh, dims = x._mesh, x._layout.dims
        w = _cut(func, weight, mesh, Layout((dims[1],)))
        acc, count = _acc(x.dtype), per * hw
        sums, parts = [], []
        for j, (dyj, xj, mj, rj) in enumerate(
            zip(dy._shards, x._shards, mean._shards, rstd._shards)
        ):
            n, c, hwj, g = _gn_shapes(xj, per)
            shape4 = (n, g, per, hwj)
            xhat = (xj.to(acc).reshape(shape4) - mj.to(acc)[..., None, None]) * rj.to(acc)[
                ..., None, None
            ]
            d = dyj.to(acc).reshape(shape4)
            gw = d if w[j] is None else d * w[j].to(acc).reshape(1, g, per, 1)
            sums.append(torch.stack([gw.sum((2, 3)), (gw * xhat).sum((2, 3))]))
            parts.append((xhat, d, gw))
        results: list[Any] = []
        if mask[0]:
            shape = (2, x.shape[0], groups)
            sums = _all_reduced(
                func, sums, mesh, ((), dims[0], dims[1]), _flat(dims, (0, 1)), shape
            )
            grads = []
            for j, (xhat, _, gw) in enumerate(parts):
                total, dot = (s[..., None, None] for s in sums[j])
                r = rstd._shards[j].to(acc)[..., None, None]
                gi = r * (gw - total / count - xhat * dot / count)
                grads.append(gi.reshape(x._shards[j].shape).to(x.dtype))
            results.append(ShardedTensor(grads, mesh, Layout(dims), tuple(x.shape)))
        summed = Layout((dims[1],), _flat(dims, (1,)))
        for k, value in ((1, lambda xh, d: d * xh), (2, lambda xh, d: d)):
            if mask[k]:
                blocks = [value(xh, d).sum((0, 3)).reshape(-1).to(x.dtype) for xh, d, _ in parts]
                results.append(ShardedTensor(blocks, mesh, summed, (channels,)))
        return tuple(results) + (None,) * (3 - len(results))

    return decompose


@register_rule(aten.native_group_norm.default)
def group_norm_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Batch and group-aligned channel splits local; a spatial split: one all-reduce of 2·N·G."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    x, groups = b["input"], b["group"]
    channels, hw = x.shape[1], math.prod(x.shape[2:])
    per = channels // groups if groups else 0
    for dims in _gn_dims(x, groups, ri.mesh):
        chan = Layout((dims[1],))
        want = {"input": Layout(dims), "weight": chan, "bias": chan}
        inputs = _in_order(ri, want)
        if _flat(dims, (0, 1)) and math.prod(x.shape):
            decompose = _with_sharded(ri.op, want, _gn_forward_sums(ri.op, groups, channels, hw))
            yield Strategy(inputs, decompose=decompose)
            continue
        stats = Layout((dims[0], dims[1]))
        yield Strategy(inputs, (Layout(dims), stats, stats), local=_gn_local(per))


@register_rule(aten.native_group_norm_backward.default)
def group_norm_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Local without a spatial split (grad weight/bias partial over the batch split)."""
    b = _bind(ri.op, ri.args, ri.kwargs)
    dy, x, groups = b["grad_out"], b["input"], b["group"]
    mask = list(b["output_mask"])
    channels, hw = x.shape[1], math.prod(x.shape[2:])
    per = channels // groups if groups else 0
    for dims in _gn_dims(x, groups, ri.mesh):
        chan, stats = Layout((dims[1],)), Layout((dims[0], dims[1]))
        want = {"input": Layout(dims), "mean": stats, "rstd": stats, "weight": chan}
        if _flat(dims, (0, 1)) and math.prod(x.shape):
            want["grad_out"] = Layout(dims)
            decompose = _gn_backward_sums(ri.op, groups, channels, hw, mask)
            decompose = _with_sharded(ri.op, dict(want), decompose)
            yield Strategy(_in_order(ri, want), decompose=decompose)
            continue
        g = dy.layout
        options: list[tuple[str, ...]] = [()]
        if g.partial and g.reduce_op == "sum" and not set(g.partial) & Layout(dims).used_axes:
            options.insert(0, g.partial)
        for partial in options:
            want["grad_out"] = Layout(dims, partial)
            outs = [Layout(dims, partial)] if mask[0] else []
            summed = Layout((dims[1],), partial + tuple(dims[0]))
            outs += [summed] * (len(ri.outputs) - len(outs))
            yield Strategy(_in_order(ri, dict(want)), tuple(outs), local=_gn_backward_local(per))
