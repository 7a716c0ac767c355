"""Rules for view and shape ops: reshape, permutes, expand, squeeze, split/cat, slicing.

Owns the layout propagation of every op that only moves elements around (and
of the backward ops autograd emits for them):

- view / reshape: JAX reshape semantics. Input and output dims are grouped
  into merge/split groups of equal products (size-1 dims stand alone). In a
  group only the major input dim may stay split; its split carries over to the
  major output dim when every device's block is then exactly the torch.chunk
  block of that dim (with uneven sizes it may not be: then its minor axes, or
  all of them, are gathered first). Other split dims of a group are gathered.
- transpose / t / permute: the layout's dims are permuted, no communication.
- expand / repeat: expanded or repeated dims are replicated, others keep their split.
- squeeze / unsqueeze: a size-1 dim (never split) is removed or inserted.
- split / split_with_sizes / slice (narrow) / cat / flip / roll and
  slice_backward along a split dim: the output stays split over the same axes
  (standard chunks of its own size); each device gets the rows of its block it
  does not hold from their owners by ppermute (`_rechunk.RowMove`: GPT-2's
  fused q/k/v split moves the columns across block boundaries, a flip moves
  device i's block to device P-1-i, a roll the wrapped rows), taken when its
  bytes are no more than gathering the dim (it never costs more than the
  all-gather; else the dim is gathered first). Their view ops' outputs are
  linked copies (`_aliasing`). cat moves its operands to one operand's layout
  first when that, plus the move, is cheapest.
- unbind / stack / select / diagonal, and the backward ops select_backward /
  diagonal_backward / new_zeros: the dim the op works along must not be split
  (it is gathered first); every other dim keeps its split. (index_select /
  index_add: `_indexing.py`.)
- the ``*_copy`` variants (functionalization) follow their view op.

Every op here places each output element from exactly one input element (or
zero), so partial layouts pass through with their reduce op, except
new_zeros/new_empty (fresh values: new_zeros keeps partial sum/avg axes,
new_empty none).

Shape arguments of these ops are global; rules whose local call needs local
sizes give a `Strategy.local` that recomputes them from the device's own
input shard, so one decision serves every device. Local shards of a view are
views of the input's shards, except a reshape of a non-contiguous shard (the
wrapper always reports contiguous strides, the shard of a transpose is not),
which copies as `torch.reshape` does: an in-place write through such a
reshape does not reach its base.

Invariant: the local result of every strategy is exactly the torch.chunk
block of the global result under the output layout (checked bitwise in
tests/test_views.py). Deliberately not here: reductions (expand's backward is
a sum), advanced indexing (`aten.index.Tensor`, gather/scatter), as_strided.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh
from ..layouts._planner import plan
from ..layouts._shard import chunk_bounds
from . import _aliasing, _dispatch
from ._rechunk import RowMove, block_srcs, row_bytes
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor

aten = torch.ops.aten

__all__ = ["reshape_groups"]


# == helpers ===================================================================
def _bind(op: Any, args: Sequence, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    bound = {}
    for i, a in enumerate(op._schema.arguments):
        if not a.kwarg_only and i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


def _call(op: Any, bound: dict[str, Any]) -> Any:
    pos, kw = [], {}
    for a in op._schema.arguments:
        if a.name in bound:
            if a.kwarg_only:
                kw[a.name] = bound[a.name]
            else:
                pos.append(bound[a.name])
    return op(*pos, **kw)


def _rewrite(op: Any, name: str, compute: Callable[[dict], Any]) -> Callable:
    """A `Strategy.local` calling `op` with argument `name` recomputed from the local arguments."""

    def local(*args: Any, **kwargs: Any) -> Any:
        bound = _bind(op, args, kwargs)
        bound[name] = compute(bound)
        return _call(op, bound)

    return local


def _wrap(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _lay(dims: Sequence[tuple[str, ...]], like: Layout, keep_partial: bool = True) -> Layout:
    """`dims` with `like`'s partial axes and reduce op (or none)."""
    if keep_partial:
        return Layout(tuple(dims), like.partial, like.reduce_op)
    return Layout(tuple(dims))


def _cleared(layout: Layout, *ds: int) -> Layout:
    """`layout` with dims `ds` not split (partial kept)."""
    dims = list(layout.dims)
    for d in ds:
        dims[d] = ()
    return _lay(dims, layout)


def _alias(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return aten.alias.default(x)


def _fresh(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x.clone()


_COPIES = {
    aten.view_copy.default,
    aten._reshape_copy.default,
    aten.transpose_copy.int,
    aten.t_copy.default,
    aten.permute_copy.default,
    aten.expand_copy.default,
    aten.squeeze_copy.default,
    aten.squeeze_copy.dim,
    aten.squeeze_copy.dims,
    aten.unsqueeze_copy.default,
    aten.split_copy.Tensor,
    aten.split_with_sizes_copy.default,
    aten.unbind_copy.int,
    aten.slice_copy.Tensor,
    aten.select_copy.int,
    aten.diagonal_copy.default,
}


# == row moves along a split dim (`_rechunk.py`) ===============================
def _moves_pay(
    moves: Sequence[RowMove], x: ArgSpec, want: Layout, am: AbstractMesh, layout: Layout
) -> bool:
    """Whether `moves` (rows of `x` in `layout`) cost no more bytes than moving `x` to `want`.

    At equal bytes the move wins: its output stays split (O(local) memory, nothing to
    slice again later).
    """
    moved = sum(m.bytes(row_bytes(x.shape, layout, m.dim, am, x.dtype)) for m in moves)
    return moved <= plan(x.layout, want, x.shape, am, x.dtype).total_bytes


def _as_blocks(t: Any, mesh: Any, layout: Layout) -> list:
    if isinstance(t, ShardedTensor):
        return list(t._shards)
    return _dispatch._constant_blocks(t, mesh, layout)


def _moved(
    op: Any,
    move: RowMove,
    layout: Layout,
    outs: Sequence[ArgSpec],
    *,
    sources: Callable[..., list] = lambda x, *a, **k: [x],
    view: bool = False,
    fill: Any = 0,
) -> Callable:
    """A decomposition: `move` on the tensors `sources(*args)`, its output cut into `outs`.

    Every output is split along ``move.dim`` like `layout` (each device's block of every
    output, in order, is its block of the move's output). A view op's outputs are
    linked copies of its input (`_aliasing`: writes go back, reads refresh).
    """
    p = len(move.srcs)

    def decompose(*args: Any, **kwargs: Any) -> Any:
        ins = sources(*args, **kwargs)
        mesh = next(t._mesh for t in ins if isinstance(t, ShardedTensor))
        blocks = move.run(op, mesh, [_as_blocks(t, mesh, layout) for t in ins], fill)
        am, d = mesh.abstract, move.dim
        results = []
        for k, o in enumerate(outs):
            shards = []
            for j, dev in enumerate(mesh.local_devices):
                i = am.index_along(dev, move.axes)
                at = sum(_block_len(q.shape[d], p, i) for q in outs[:k])
                shards.append(blocks[j].narrow(d, at, _block_len(o.shape[d], p, i)))
            results.append(ShardedTensor(shards, mesh, layout, o.shape, False, o.stride, o.offset))
        out = results if len(outs) > 1 or op in _MULTI else results[0]
        if view:
            _aliasing.link_view(op, args, kwargs, args[0], out, True)
        return out

    return decompose


def _block_len(n: int, p: int, i: int) -> int:
    lo, hi = chunk_bounds(n, p, i)
    return hi - lo


def _slice_start_step(b: dict, n: int) -> tuple[int, int]:
    start = b["start"] if b["start"] is not None else 0
    end = b["end"] if b["end"] is not None else n
    first, _, step = slice(start, end, b["step"]).indices(n)
    return first, step


_MULTI = {
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.split_copy.Tensor,
    aten.split_with_sizes_copy.default,
}


# == reshape / view ============================================================
def reshape_groups(
    in_shape: Sequence[int], out_shape: Sequence[int]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Merge/split groups of a reshape: (input dims, output dims) with equal products.

    Size-1 dims belong to no group (they hold no position in the flat order).
    Requires equal, non-zero element counts.

    Examples:
        >>> reshape_groups((8, 6), (4, 2, 6))
        [((0,), (0, 1)), ((1,), (2,))]
        >>> reshape_groups((2, 1, 3), (6,))
        [((0, 2), (0,))]
    """
    ins = [d for d, n in enumerate(in_shape) if n != 1]
    outs = [d for d, n in enumerate(out_shape) if n != 1]
    groups, i, j = [], 0, 0
    while i < len(ins):
        gi, go = [ins[i]], [outs[j]]
        pi, po = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                gi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            else:
                go.append(outs[j])
                po *= out_shape[outs[j]]
                j += 1
        groups.append((tuple(gi), tuple(go)))
    return groups


def _carries(n_in: int, n_out: int, total: int, k: int) -> bool:
    """Whether k torch.chunk blocks of the major input dim are those of the major output dim.

    Input block c covers flat elements ``[lo*R, hi*R)`` of the group (R = total/n_in),
    output block c covers ``[lo'*R', hi'*R')``; they must agree for every c.
    """
    r_in, r_out = total // n_in, total // n_out
    return all(
        chunk_bounds(n_in, k, c)[0] * r_in == chunk_bounds(n_out, k, c)[0] * r_out
        for c in range(1, k)
    )


_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


@register_rule(*_RESHAPES, aten.view_copy.default, aten._reshape_copy.default)
def reshape_rule(ri: RuleInput) -> Iterator[Strategy]:
    """JAX reshape: a split survives on the major dim of its group when blocks line up.

    (8, 6) P("x", None) -> (48,) gives P("x"), -> (4, 2, 6) gives P("x", None, None).
    """
    x, out = ri.tensors[0], ri.outputs[0]
    lay = x.layout
    if math.prod(x.shape) == 0:  # nothing to place: every shard is empty either way
        yield Strategy((_lay(((),) * x.ndim, lay),), (_lay(((),) * out.ndim, lay),))
        return
    groups = reshape_groups(x.shape, out.shape)
    in_dims, out_dims = [()] * x.ndim, [()] * out.ndim
    for gi, go in groups:
        axes = lay.dims[gi[0]]
        total = math.prod(x.shape[i] for i in gi)
        while axes and not _carries(
            x.shape[gi[0]], out.shape[go[0]], total, ri.mesh.group_size(axes)
        ):
            axes = axes[:-1]  # keep the major axes that still line up, gather the minor ones
        in_dims[gi[0]] = out_dims[go[0]] = axes
    yield Strategy(
        (_lay(in_dims, lay),),
        (_lay(out_dims, lay),),
        local=_reshape_local(ri.op, groups, out.shape),
    )


def _reshape_local(op: Any, groups: list, out_shape: tuple[int, ...]) -> Callable:
    rest = [math.prod(out_shape[o] for o in go[1:]) for _, go in groups]

    def local(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = list(out_shape)
        for (gi, go), r in zip(groups, rest):
            shape[go[0]] = math.prod(x.shape[i] for i in gi) // r
        if op in _RESHAPES:  # local shards may be non-contiguous (the wrapper never is)
            return x.reshape(shape)
        return op(x, shape)

    return local


# == transpose / permute =======================================================
def _permutation(ri: RuleInput) -> list[int]:
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    perm = list(range(x.ndim))
    if ri.op in (aten.permute.default, aten.permute_copy.default):
        return [_wrap(d, x.ndim) for d in b["dims"]]
    if ri.op in (aten.transpose.int, aten.transpose_copy.int):
        d0, d1 = _wrap(b["dim0"], x.ndim), _wrap(b["dim1"], x.ndim)
    else:  # t: swaps the two dims of a matrix, leaves 0-d and 1-d alone
        d0, d1 = (0, 1) if x.ndim == 2 else (0, 0)
    if x.ndim:
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


@register_rule(
    aten.transpose.int,
    aten.t.default,
    aten.permute.default,
    aten.transpose_copy.int,
    aten.t_copy.default,
    aten.permute_copy.default,
)
def permute_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Output dim i has the layout of input dim perm[i]; no communication."""
    lay = ri.tensors[0].layout
    perm = _permutation(ri)
    yield Strategy((lay,), (_lay([lay.dims[p] for p in perm], lay),))


# == expand / repeat ===========================================================
@register_rule(aten.expand.default, aten.expand_copy.default)
def expand_rule(ri: RuleInput) -> Iterator[Strategy]:
    """New leading dims and expanded (1 -> n) dims are replicated; the others keep their split."""
    x, out = ri.tensors[0], ri.outputs[0]
    lead = out.ndim - x.ndim
    grown = [d for d in range(x.ndim) if x.shape[d] == 1 and out.shape[lead + d] != 1]
    want = _cleared(x.layout, *grown)
    local = (
        _rewrite(ri.op, "size", _expand_size(out.shape, lead, grown)) if any(want.dims) else None
    )
    yield Strategy((want,), (_lay([()] * lead + list(want.dims), want),), local=local)


def _expand_size(out_shape: tuple[int, ...], lead: int, grown: list[int]) -> Callable:
    """Local expand sizes: global for new and grown dims, -1 (keep the local size) elsewhere."""
    size = [*out_shape[:lead], *(-1 for _ in range(len(out_shape) - lead))]
    for d in grown:
        size[lead + d] = out_shape[lead + d]
    return lambda bound: size


@register_rule(aten.repeat.default)
def repeat_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Tiled dims (repeat count != 1) and new leading dims are replicated."""
    x = ri.tensors[0]
    reps = list(_bind(ri.op, ri.args, ri.kwargs)["repeats"])
    lead = len(reps) - x.ndim
    want = _cleared(x.layout, *(d for d in range(x.ndim) if reps[lead + d] != 1))
    yield Strategy((want,), (_lay([()] * lead + list(want.dims), want),))


# == squeeze / unsqueeze =======================================================
_SQUEEZES = {
    aten.squeeze.default: aten.squeeze.dims,
    aten.squeeze.dim: aten.squeeze.dims,
    aten.squeeze.dims: aten.squeeze.dims,
    aten.squeeze_copy.default: aten.squeeze_copy.dims,
    aten.squeeze_copy.dim: aten.squeeze_copy.dims,
    aten.squeeze_copy.dims: aten.squeeze_copy.dims,
}


@register_rule(*_SQUEEZES)
def squeeze_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Removed size-1 dims must not be split; locally exactly those dims are removed.

    (A dim of global size > 1 can be 1 long on a device; squeezing it there
    would be wrong, so the local call names the removed dims.)
    """
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    if "dim" not in b:
        asked = range(x.ndim)
    elif isinstance(b["dim"], int):
        asked = [b["dim"]]
    else:
        asked = b["dim"]
    removed = sorted({_wrap(d, x.ndim) for d in asked if x.ndim and x.shape[_wrap(d, x.ndim)] == 1})
    want = _cleared(x.layout, *removed)
    dims = [a for d, a in enumerate(want.dims) if d not in removed]
    op = _SQUEEZES[ri.op]
    yield Strategy((want,), (_lay(dims, want),), local=lambda t, *args, **kwargs: op(t, removed))


@register_rule(aten.unsqueeze.default, aten.unsqueeze_copy.default)
def unsqueeze_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Insert an unsplit dim."""
    lay = ri.tensors[0].layout
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], lay.ndim + 1)
    dims = list(lay.dims)
    dims.insert(d, ())
    yield Strategy((lay,), (_lay(dims, lay),))


# == split / unbind / cat / stack ==============================================
@register_rule(
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.split_copy.Tensor,
    aten.split_with_sizes_copy.default,
)
def split_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Split along an unsplit dim locally; along a split dim every piece stays split.

    A split dim: each device gets the rows of its block of every piece (a `RowMove`,
    GPT-2's fused q/k/v: only the columns across the block boundaries move), unless
    gathering the dim is cheaper. A split into one piece (the whole tensor) keeps any layout.
    """
    x = ri.tensors[0]
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], x.ndim)
    n = len(ri.outputs)
    if n == 1 and ri.outputs[0].shape == x.shape:
        piece = _fresh if ri.op in _COPIES else _alias
        yield Strategy((x.layout,), (x.layout,), local=lambda t, *a, **k: [piece(t)])
        return
    want = _cleared(x.layout, d) if x.ndim else x.layout
    axes = x.layout.dims[d] if x.ndim else ()
    if axes:
        p, srcs, at = ri.mesh.group_size(axes), [() for _ in range(ri.mesh.group_size(axes))], 0
        for o in ri.outputs:
            for i, rows in enumerate(block_srcs(o.shape[d], p, lambda q, at=at: at + q)):
                srcs[i] += rows
            at += o.shape[d]
        move = RowMove(d, axes, (x.shape[d],), tuple(srcs))
        if _moves_pay([move], x, want, ri.mesh, x.layout):
            view = ri.op not in _COPIES
            decompose = _moved(ri.op, move, x.layout, ri.outputs, view=view)
            yield Strategy((x.layout,), (x.layout,) * n, decompose=decompose)
            return
    yield Strategy((want,), (want,) * n)


@register_rule(aten.unbind.int, aten.unbind_copy.int)
def unbind_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Unbind along an unsplit dim (a split one is gathered first); outputs drop it."""
    x = ri.tensors[0]
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], x.ndim)
    want = _cleared(x.layout, d)
    out = _lay([a for i, a in enumerate(want.dims) if i != d], want)
    yield Strategy((want,), (out,) * len(ri.outputs))


def _skipped_by_cat(s: ArgSpec, out: ArgSpec) -> bool:
    """torch.cat ignores 1-d empty tensors whatever the other operands' rank."""
    return s.ndim == 1 and s.shape[0] == 0 and out.ndim != 1


def _joint_candidates(specs: Sequence[ArgSpec], clear: int | None) -> list[Layout]:
    """Common input layouts worth trying: each input's (dim `clear` unsplit), then replicated."""
    found: list[Layout] = []
    ndim = specs[0].ndim if specs else 0
    for s in specs:
        cand = _cleared(s.layout, clear) if clear is not None else s.layout
        if cand not in found:
            found.append(cand)
    replicated = Layout(((),) * ndim)
    if replicated not in found:
        found.append(replicated)
    return found


@register_rule(aten.cat.default)
def cat_rule(ri: RuleInput) -> Iterator[Strategy]:
    """All operands in one layout; partial if they share it. Along a split dim: a `RowMove`.

    Candidates take each operand's layout in turn (the planner turns replicated
    operands partial for free); the dispatcher keeps the cheapest. Where an operand's
    cat dim is split, the candidate keeping that split (every operand moved to it, then
    each device takes the rows of its block of the result from their owners: split's
    backward, GPT-2's fused q/k/v gradients) is offered alone when its bytes, moves
    included, are no more than the cheapest candidate gathering the dim.
    """
    out = ri.outputs[0]
    specs = ri.tensors
    kept = [s for s in specs if not _skipped_by_cat(s, out)]
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], out.ndim)

    def strategy(cand: Layout, **kw: Any) -> Strategy:
        ins = tuple(_lay(((),), cand) if _skipped_by_cat(s, out) else cand for s in specs)
        return Strategy(ins, (cand,), **kw)

    cleared = _joint_candidates(kept, d)
    split = [s.layout for s in kept if s.layout.dims[d]]
    if split:
        am = ri.mesh

        def moving(cand: Layout) -> int:
            return sum(plan(s.layout, cand, s.shape, am, s.dtype).total_bytes for s in kept)

        best = min(cleared, key=moving)
        cand = min(_unique_layouts(split), key=moving)
        axes = cand.dims[d]
        p = am.group_size(axes)
        sizes = tuple(s.shape[d] for s in kept)
        move = RowMove(d, axes, sizes, block_srcs(out.shape[d], p, lambda q: q))
        row = max(row_bytes(s.shape, cand, d, am, s.dtype) for s in kept)
        if moving(cand) + move.bytes(row) <= moving(best):
            yield strategy(
                cand,
                decompose=_moved(
                    ri.op, move, cand, (out,), sources=lambda ts, *a, **k: _kept(ts, out)
                ),
            )
            return
    for cand in cleared:
        yield strategy(cand)


def _unique_layouts(layouts: Sequence[Layout]) -> list[Layout]:
    found: list[Layout] = []
    for lay in layouts:
        if lay not in found:
            found.append(lay)
    return found


def _kept(tensors: Sequence[Any], out: ArgSpec) -> list:
    """cat's operands without the 1-d empty ones it ignores."""
    return [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0 and out.ndim != 1)]


@register_rule(aten.stack.default)
def stack_rule(ri: RuleInput) -> Iterator[Strategy]:
    """All operands in one layout; the new dim is unsplit."""
    out = ri.outputs[0]
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], out.ndim)
    for cand in _joint_candidates(ri.tensors, None):
        dims = list(cand.dims)
        dims.insert(d, ())
        yield Strategy((cand,) * len(ri.tensors), (_lay(dims, cand),))


# == slicing and indexing along a dim ==========================================
@register_rule(aten.slice.Tensor, aten.slice_copy.Tensor)
def slice_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Slice an unsplit dim locally; a split dim stays split (a `RowMove`, unless gathering
    is cheaper: then it is gathered first). A full slice keeps any layout."""
    x, out = ri.tensors[0], ri.outputs[0]
    if x.ndim == 0:
        yield Strategy((x.layout,), (x.layout,))
        return
    b = _bind(ri.op, ri.args, ri.kwargs)
    d = _wrap(b["dim"], x.ndim)
    if out.shape == x.shape and b["step"] == 1:  # the whole dim, start 0
        yield Strategy((x.layout,), (x.layout,), local=_fresh if ri.op in _COPIES else _alias)
        return
    want = _cleared(x.layout, d)
    axes = x.layout.dims[d]
    if axes:
        start, step = _slice_start_step(b, x.shape[d])
        srcs = block_srcs(out.shape[d], ri.mesh.group_size(axes), lambda q: start + q * step)
        move = RowMove(d, axes, (x.shape[d],), srcs)
        if _moves_pay([move], x, want, ri.mesh, x.layout):
            view = ri.op not in _COPIES
            yield Strategy(
                (x.layout,), (x.layout,), decompose=_moved(ri.op, move, x.layout, (out,), view=view)
            )
            return
    yield Strategy((want,), (want,))


@register_rule(aten.select.int, aten.select_copy.int)
def select_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Select from an unsplit dim locally (a split dim is gathered first); the dim is dropped."""
    x = ri.tensors[0]
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], x.ndim)
    want = _cleared(x.layout, d)
    yield Strategy((want,), (_lay([a for i, a in enumerate(want.dims) if i != d], want),))


@register_rule(aten.flip.default)
def flip_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Flip unsplit dims locally; a split dim stays split (device i's rows go to device P-1-i
    when blocks are even, re-chunked when not: a `RowMove`), unless gathering is cheaper."""
    x = ri.tensors[0]
    dims = sorted({_wrap(d, x.ndim) for d in _bind(ri.op, ri.args, ri.kwargs)["dims"]})
    if x.ndim == 0:
        yield Strategy((x.layout,), (x.layout,))
        return
    split = [d for d in dims if x.layout.dims[d]]
    want = _cleared(x.layout, *dims)
    if split:
        moves = [_reindexed(x, d, ri.mesh, lambda q, n=x.shape[d]: n - 1 - q) for d in split]
        if _moves_pay(moves, x, want, ri.mesh, x.layout):
            local = [d for d in dims if d not in split]
            yield Strategy(
                (x.layout,),
                (x.layout,),
                decompose=_moved_along(ri.op, moves, x.layout, local, ri.outputs[0]),
            )
            return
    yield Strategy((want,), (want,))


@register_rule(aten.roll.default)
def roll_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Roll unsplit dims locally; a split dim stays split (a `RowMove` of the rows that wrap
    across block boundaries), unless gathering is cheaper. A roll of the flattened tensor
    needs it unsplit."""
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    dims, shifts = list(b["dims"]), list(b["shifts"])
    if not dims or x.ndim == 0:
        want = _cleared(x.layout, *range(x.ndim))
        yield Strategy((want,), (want,))
        return
    total: dict[int, int] = {}
    for d, s in zip(dims, shifts):
        total[_wrap(d, x.ndim)] = total.get(_wrap(d, x.ndim), 0) + s
    want = _cleared(x.layout, *total)
    split = [d for d in sorted(total) if x.layout.dims[d] and x.shape[d]]
    if split:
        moves = [
            _reindexed(x, d, ri.mesh, lambda q, n=x.shape[d], s=total[d]: (q - s) % n)
            for d in split
        ]
        if _moves_pay(moves, x, want, ri.mesh, x.layout):
            rest = [d for d in sorted(total) if d not in split]
            local = _rolled(rest, [total[d] for d in rest])
            yield Strategy(
                (x.layout,),
                (x.layout,),
                decompose=_moved_along(ri.op, moves, x.layout, local, ri.outputs[0]),
            )
            return
    yield Strategy((want,), (want,))


def _rolled(dims: list[int], shifts: list[int]) -> Callable:
    return lambda t: torch.roll(t, shifts, dims) if dims else t


def _reindexed(x: ArgSpec, d: int, am: AbstractMesh, source: Callable[[int], int]) -> RowMove:
    """Output row q of dim d (same size) is input row source(q)."""
    axes = x.layout.dims[d]
    return RowMove(d, axes, (x.shape[d],), block_srcs(x.shape[d], am.group_size(axes), source))


def _moved_along(
    op: Any, moves: list[RowMove], layout: Layout, local: Any, out: ArgSpec
) -> Callable:
    """A same-shape decomposition: a local op on every shard (flipped dims, or a function),
    then each move in turn."""

    def decompose(x: ShardedTensor, *args: Any, **kwargs: Any) -> ShardedTensor:
        mesh = x._mesh
        if callable(local):
            shards = [local(s) for s in x._shards]
        else:
            shards = [torch.flip(s, local) if local else s for s in x._shards]
        for m in moves:
            shards = m.run(op, mesh, [shards])
        return ShardedTensor(shards, mesh, layout, out.shape, False, out.stride, out.offset)

    return decompose


@register_rule(aten.diagonal.default, aten.diagonal_copy.default)
def diagonal_rule(ri: RuleInput) -> Iterator[Strategy]:
    """dim1 and dim2 unsplit; the other dims keep their split; the new last dim is unsplit."""
    x = ri.tensors[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    d1, d2 = _wrap(b["dim1"], x.ndim), _wrap(b["dim2"], x.ndim)
    want = _cleared(x.layout, d1, d2)
    dims = [a for i, a in enumerate(want.dims) if i not in (d1, d2)] + [()]
    yield Strategy((want,), (_lay(dims, want),))


# == backward ops ==============================================================
@register_rule(aten.slice_backward.default)
def slice_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Zeros of the input's shape with the gradient placed in the slice; along a split dim
    each device takes its rows of the result from their owners (a `RowMove` with zero
    fill), unless gathering the dim is cheaper."""
    g, out = ri.tensors[0], ri.outputs[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    d = _wrap(b["dim"], g.ndim)
    if out.shape == g.shape and b["step"] == 1:  # the slice was the whole dim
        yield Strategy((g.layout,), (g.layout,), local=_fresh)
        return
    want = _cleared(g.layout, d)
    axes = g.layout.dims[d]
    if axes:
        n, m = out.shape[d], g.shape[d]
        start, step = _slice_start_step(b, n)

        def source(r: int) -> int:
            q, off = divmod(r - start, step)
            return q if r >= start and off == 0 and q < m else -1

        move = RowMove(d, axes, (m,), block_srcs(n, ri.mesh.group_size(axes), source))
        if _moves_pay([move], g, want, ri.mesh, g.layout):
            yield Strategy(
                (g.layout,), (g.layout,), decompose=_moved(ri.op, move, g.layout, (out,))
            )
            return
    sizes = _local_sizes_keeping(d, out.shape[d])
    yield Strategy((want,), (want,), local=_rewrite(ri.op, "input_sizes", sizes))


def _local_sizes_keeping(d: int, n: int) -> Callable[[dict], list[int]]:
    """input_sizes for a backward op: the local gradient's shape with dim d set to n."""

    def sizes(bound: dict) -> list[int]:
        s = list(bound["grad_output"].shape)
        s[d] = n
        return s

    return sizes


@register_rule(aten.select_backward.default)
def select_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Zeros of the input's shape with the gradient at the index; the inserted dim is unsplit."""
    g, out = ri.tensors[0], ri.outputs[0]
    d = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], out.ndim)
    dims = list(g.layout.dims)
    dims.insert(d, ())
    n = out.shape[d]

    def sizes(bound: dict) -> list[int]:
        s = list(bound["grad_output"].shape)
        s.insert(d, n)
        return s

    yield Strategy(
        (g.layout,), (_lay(dims, g.layout),), local=_rewrite(ri.op, "input_sizes", sizes)
    )


@register_rule(aten.diagonal_backward.default)
def diagonal_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Zeros with the gradient on the diagonal; the diagonal's dims are unsplit."""
    g, out = ri.tensors[0], ri.outputs[0]
    b = _bind(ri.op, ri.args, ri.kwargs)
    d1, d2 = _wrap(b["dim1"], out.ndim), _wrap(b["dim2"], out.ndim)
    want = _cleared(g.layout, g.ndim - 1)
    others = [i for i in range(out.ndim) if i not in (d1, d2)]
    dims = [()] * out.ndim
    for i, a in zip(others, want.dims[:-1]):
        dims[i] = a

    def sizes(bound: dict) -> list[int]:
        s = list(out.shape)
        for i, n in zip(others, bound["grad_output"].shape[:-1]):
            s[i] = n
        return s

    yield Strategy((want,), (_lay(dims, want),), local=_rewrite(ri.op, "input_sizes", sizes))


@register_rule(aten.new_zeros.default, aten.new_empty.default)
def new_zeros_rule(ri: RuleInput) -> Iterator[Strategy]:
    """A fresh tensor: dims whose size equals the model's keep its split, others are unsplit.

    new_zeros keeps the model's partial sum/avg axes (zero summands add up to
    zero), so a backward that accumulates a partial gradient into it
    (index_select's: new_zeros + index_add_) stays partial.
    """
    x, out = ri.tensors[0], ri.outputs[0]
    same = [x.ndim == out.ndim and x.shape[d] == out.shape[d] for d in range(out.ndim)]
    dims = [x.layout.dims[d] if same[d] else () for d in range(out.ndim)]
    keep = ri.op is aten.new_zeros.default and x.layout.reduce_op in ("sum", "avg")
    out_layout = _lay(dims, x.layout, keep_partial=keep)

    def size(bound: dict) -> list[int]:
        local = bound["self"].shape
        return [local[d] if same[d] else n for d, n in enumerate(out.shape)]

    yield Strategy((x.layout,), (out_layout,), local=_rewrite(ri.op, "size", size))
