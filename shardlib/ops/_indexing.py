"""Rules for indexing ops: gather/scatter, index/index_put, index_select/add/copy/fill/reduce,
take/put, masked_scatter, embedding_renorm_, and the dynamic-shape nonzero/masked_select.

Owns how an op that reads or writes a tensor at positions given by index tensors
treats split and partial operands, forward and backward (the backward ops autograd
emits for these ops are these ops again: gather <-> scatter_add, index <-> index_put,
take <-> put, index_select <-> index_add, masked_scatter_backward). It does not own
embedding lookups (`_nn.py`), masked_fill / where (pointwise), nor the views
(`_views.py`) that basic indexing (``x[1:3]``, ``x[:, 0]``) reaches.

Terms: *self* is the tensor read or written, *index* the tensors saying where,
*src* (source, values, value) what is written. Every rule describes its tensors by
per-dim labels, as `_batched` does: a label shared by several tensors means "split
alike, each device works on its blocks"; ``None`` means the dim must be whole.

- *batch* dims (a self dim the op does not index, lined up with the same dim of
  index, src and the output): split alike, no communication.
- *index* dims (dims of the index tensors and the src/output dims that follow them):
  a read op (gather, index, take, index_select) gives the output the index's split;
  an accumulating write (scatter_add, scatter_reduce sum with include_self,
  index_add, index_put / put with accumulate, ``_unsafe_masked_index_put_accumulate``)
  lets each device add its part into a partial-``sum`` self: the output is
  partial-``sum`` over those axes (self's value sits on one device of each group);
  any other write needs them whole (duplicate indices on two devices would race).
- *indexed* dims of self, split over axes A with the index replicated over A:
  a read op looks up, on every device, the indices inside its chunk (shifted by the
  chunk's start; other positions read zero) and the output is partial-``sum`` over
  A (the vocabulary-split embedding's algorithm: the table never moves, the output
  is reduced once where it is consumed); a write op writes, on every device, only the
  indices inside its chunk (the others go to a dummy slot past its end, dropped):
  the output keeps self's split, no communication. Uneven and empty chunks are exact.

Rules by op: gather (and take_along_dim, which torch composes from it), scatter
(.src, .value, .reduce, .value_reduce), scatter_add, scatter_reduce: dim-wise
(self and index of one rank; a dim where the index is shorter than self is an index
dim the device reads or writes at its block's rows of a whole self). index_select,
index_add/copy/fill/reduce: along a dim with a 1-d index. index / _unsafe_index and
index_put / index_put_ / _unsafe_index_put / _index_put_impl_ (hacked_twin overloads
too): advanced indexing, None entries are batch dims. take / put: a flat index into
every dim of self. ``_unsafe_masked_index`` and ``_unsafe_masked_index_put_accumulate``
have no rule: torch's decompositions (clamp, _unsafe_index / _unsafe_index_put,
masked_fill) run on these rules. In-place forms write each device's shard.

Candidates are each tensor's own splits, their union where axes do not collide,
and the replicated placement; the dispatcher prices the implied moves and keeps the
cheapest, so an index that collides with a split table is gathered when that costs
less than gathering the table, and the other way round.

Partial operands: a read is linear in self: any partial passes (``sum`` only when an
indexed dim is split, the output then being ``sum``-partial anyway). Writes are
jointly linear in (self, src): both take the same partial layout (the planner makes
a replicated one partial for free): ``sum``/``avg`` for accumulating ops, any op for
pure selections (scatter, index_copy, index_put, put, masked_scatter: every output
element is one of the summands' elements), ``max`` for amax and ``min`` for amin
reductions, none for prod (except ``sum``/``avg`` of self alone when include_self).
A scalar fill value passes ``avg``/``max``/``min`` partials (``sum`` when it is 0).

Duplicate indices in non-accumulating writes: each device writes its indices in
torch's order, so a device-local write matches the unsharded CPU kernel; index dims
of such writes are never split (see above).

Boolean indices (``x[mask]``, ``x[mask] = v``): a read has a value-dependent shape:
the mask becomes long indices by ``nonzero`` and the op runs on those. A write whose
values do not span the selected elements (``x[mask] = 0``) is pointwise: the mask's
dims are batch dims of self. Other boolean writes go through ``nonzero`` too.
``nonzero``, ``masked_select`` and ``_unique`` have value-dependent output shapes that
no layout can describe: their inputs are gathered (in the ledger; strict mode
refuses) and every device computes the replicated result. ``masked_scatter`` needs
the global positions of the mask's True elements: the mask is made replicated (one
byte per element) and self keeps any split.

``embedding_renorm_``: rows split -> each device renormalizes its rows; the hidden
dim split -> the rows' partial norms are all-reduced (one number per looked-up row).

Invariant: every strategy gives exactly the torch.chunk block of the global result
for uneven shapes and every partial input it keeps; out-of-range indices raise
IndexError on CPU as torch does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..collectives._ledger import capture_hooks  # sl.capture: no value reads
from ..layouts._layout import Layout
from ..layouts._shard import local_bounds
from ._dispatch import _functional_of, _is_inplace, _locally, _move
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor
from ._views import _bind, _call, _wrap

aten = torch.ops.aten

__all__: list[str] = []

ALL = ("sum", "avg", "max", "min")
LINEAR = ("sum", "avg")
Labels = tuple[Hashable | None, ...]


# == the engine ================================================================
@dataclass(frozen=True, slots=True)
class _Lineup:
    """How an op's tensors line up: per-dim labels, summed labels, partial semantics.

    `ins` has one label tuple per tensor input (``ri.tensors`` order), `outs` one per
    output. A label on an input but on no output is a *summed* label when it is in
    `summed` (splitting it makes the output partial-``sum`` over its axes), else it is
    treated as ``None``. `values` are the inputs that carry a partial jointly, with
    reduce ops `ops`; every other input is required non-partial.
    """

    ins: tuple[Labels, ...]
    outs: tuple[Labels, ...]
    summed: frozenset = frozenset()
    values: tuple[int, ...] = ()
    ops: tuple[str, ...] = ()


def _sizes(ri: RuleInput, lu: _Lineup) -> dict[Hashable, int]:
    size: dict[Hashable, int] = {}
    for spec, labs in zip((*ri.tensors, *ri.outputs), (*lu.ins, *lu.outs)):
        for n, lab in zip(spec.shape, labs):
            if lab is not None:
                size[lab] = max(size.get(lab, 1), n)
    return size


def _assignments(ri: RuleInput, lu: _Lineup, size: dict) -> list[dict]:
    """Label -> axes: each input's own splits, their union, none (preference order)."""
    on_out = {lab for labs in lu.outs for lab in labs if lab is not None}
    own: list[dict] = []
    for spec, labs in zip(ri.tensors, lu.ins):
        assign = {}
        for n, lab, axes in zip(spec.shape, labs, spec.layout.dims):
            if lab is None or not axes or n != size[lab]:
                continue
            if lab in on_out or lab in lu.summed:
                assign[lab] = axes
        own.append(assign)
    merged: dict = {}
    used: set[str] = set()
    for assign in sorted(own, key=len, reverse=True):
        for lab, axes in assign.items():
            if lab not in merged and not used.intersection(axes):
                merged[lab] = axes
                used.update(axes)
    found: list[dict] = []
    for assign in [*own, merged, {}]:
        if assign not in found:
            found.append(assign)
    return found


def _dims(spec: ArgSpec, labs: Labels, assign: dict, size: dict) -> tuple[tuple[str, ...], ...]:
    return tuple(
        assign.get(lab, ()) if lab is not None and n == size[lab] else ()
        for n, lab in zip(spec.shape, labs)
    )


def _strategies(
    ri: RuleInput, lu: _Lineup, local: Callable[[tuple[Layout, ...]], Callable | None] | None = None
) -> list[Strategy]:
    """The candidates of `lu`: one per assignment and kept partial (none last).

    `local(inputs)`, when given, returns the per-device function for a candidate
    (called as ``fn(device, *args, **kwargs)``), or None for the op itself.
    """
    size = _sizes(ri, lu)
    out: list[Strategy] = []
    for assign in _assignments(ri, lu, size):
        used = {a for axes in assign.values() for a in axes}
        summed = tuple(a for lab, axes in assign.items() if lab in lu.summed for a in axes)
        kept: list[tuple[tuple[str, ...], str]] = []
        for i in lu.values:
            lay = ri.tensors[i].layout
            if (
                lay.partial
                and lay.reduce_op in lu.ops
                and not used.intersection(lay.partial)
                and (lay.reduce_op == "sum" or not summed)
                and (lay.partial, lay.reduce_op) not in kept
            ):
                kept.append((lay.partial, lay.reduce_op))
        for partial, op in [*kept, ((), "sum")]:
            ins = []
            for i, (spec, labs) in enumerate(zip(ri.tensors, lu.ins)):
                dims = _dims(spec, labs, assign, size)
                if i in lu.values:
                    mine = {a for axes in dims for a in axes}
                    extra = tuple(a for a in summed if a not in mine)
                    ins.append(Layout(dims, partial + extra, op))
                else:
                    ins.append(Layout(dims))
            outs = tuple(
                Layout(_dims(o, labs, assign, size), partial + summed, op)
                for o, labs in zip(ri.outputs, lu.outs)
            )
            fn = local(tuple(ins)) if local is not None else None
            out.append(Strategy(tuple(ins), outs, local=fn, local_device=fn is not None))
    return out


def _replicated(ri: RuleInput) -> Strategy:
    """Every input whole and not partial; every output replicated."""
    return Strategy(
        tuple(Layout(((),) * s.ndim) for s in ri.tensors),
        tuple(Layout(((),) * o.ndim) for o in ri.outputs),
    )


# == per-device helpers ========================================================
def _check_range(op: Any, idx: torch.Tensor, n: int, negative: bool) -> None:
    """Raise as torch does for an index outside ``[0, n)`` (``[-n, n)`` if `negative`).

    CPU only: on accelerators it would cost a host sync (torch's kernels check there).
    """
    if idx.device.type != "cpu" or idx.numel() == 0:
        return
    bad = (idx < (-n if negative else 0)) | (idx >= n)
    if capture_hooks:  # sl.capture: no value read, the check is an op its replays run too
        torch._assert_async(
            ~bad.any(), f"{op}: an index is out of bounds for dimension with size {n}"
        )
        return
    if bool(bad.any()):
        raise IndexError(
            f"{op}: index {int(idx[bad][0])} is out of bounds for dimension with size {n}"
        )


def _normalized(idx: torch.Tensor, n: int, negative: bool) -> torch.Tensor:
    return torch.where(idx < 0, idx + n, idx) if negative else idx


def _with_slot(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """A fresh copy of `x` with one zero slot past the end of each dim in `dims`."""
    shape = list(x.shape)
    for d in dims:
        shape[d] += 1
    buf = x.new_zeros(shape)
    buf[tuple(slice(0, n) for n in x.shape)] = x
    return buf


def _without_slot(buf: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return buf[tuple(slice(0, n) for n in shape)]


def _finish(op: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An in-place op writes its local result back into the shard."""
    if _is_inplace(op):
        return x.copy_(out)
    return out


def _functional(op: Any) -> Any:
    """The out-of-place form of an in-place op (``hacked_twin`` overloads: the default one)."""
    if not _is_inplace(op):
        return op
    name = op._schema.name.split("::")[-1][:-1]
    return _functional_of(op) or getattr(aten, name).default


def _split_dims(layout: Layout, dims: Sequence[int]) -> list[int]:
    return [d for d in dims if layout.dims[d]]


# == gather / scatter (an index of self's rank, one indexed dim) ================
def _dimwise(x: ArgSpec, d0: int, follow: Sequence[ArgSpec]) -> tuple[Labels, list[Labels]]:
    """Labels of self and of the tensors that follow the index (index, src) along dim `d0`.

    Other dims are batch dims where every tensor has self's size, else index dims of
    the followers (when they agree in size) that self holds whole.
    """
    if any(t.ndim != x.ndim for t in follow):
        return (None,) * x.ndim, [(None,) * t.ndim for t in follow]
    xl, fl = [], []
    for d in range(x.ndim):
        sizes = {t.shape[d] for t in follow}
        same = len(sizes) == 1
        if d == d0:
            xl.append(("m", d))
            fl.append(("i", d) if same else None)
        elif same and x.shape[d] in sizes:
            xl.append(("b", d))
            fl.append(("b", d))
        else:
            xl.append(None)
            fl.append(("i", d) if same else None)
    return tuple(xl), [tuple(fl)] * len(follow)


def _index_rows(
    x: ArgSpec, index: ArgSpec, d0: int, ins: tuple[Layout, ...], mesh: Any, device: int
) -> dict[int, tuple[int, int]]:
    """Dims other than `d0` that split the index but not self: the index block's bounds.

    Self's coordinate there is the index's (gather reads ``self[i][index[i][j]]``), so the
    device works on those rows of its whole self."""
    bounds = None
    rows = {}
    for d in range(x.ndim):
        if d != d0 and ins[1].dims[d] and not ins[0].dims[d]:
            if bounds is None:
                bounds = local_bounds(index.shape, ins[1], mesh, device)
            rows[d] = bounds[d]
    return rows


def _narrow(t: torch.Tensor, rows: dict[int, tuple[int, int]]) -> torch.Tensor:
    for d, (lo, hi) in rows.items():
        t = t.narrow(d, lo, hi - lo)
    return t


def _needs_rows(x: ArgSpec, d0: int, ins: tuple[Layout, ...]) -> bool:
    return any(d != d0 and ins[1].dims[d] and not ins[0].dims[d] for d in range(x.ndim))


def _gather_local(op: Any, x: ArgSpec, index: ArgSpec, d0: int, mesh: Any) -> Callable:
    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        masked = bool(layout.dims[d0])
        if not masked and not _needs_rows(x, d0, ins):
            return None

        def local(device: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            src = _narrow(b["self"], _index_rows(x, index, d0, ins, mesh, device))
            b["self"] = src
            if not masked:
                return _call(op, b)
            lo, hi = local_bounds(x.shape, layout, mesh, device)[d0]
            idx = b["index"]
            _check_range(op, idx, x.shape[d0], False)
            inside = (idx >= lo) & (idx < hi)
            if hi == lo:  # an empty chunk: read zeros from a one-slot stand-in
                shape = list(src.shape)
                shape[d0] = 1
                b["self"], b["index"] = src.new_zeros(shape), torch.zeros_like(idx)
            else:
                b["index"] = torch.where(inside, idx - lo, 0)
            return _call(op, b).masked_fill_(~inside, 0)

        return local

    return make


@register_rule(aten.gather.default)
def gather_rule(ri: RuleInput) -> Iterator[Strategy]:
    """out[i][j] = self[index[i][j]][j] (dim 0): self's split ``dim`` -> partial-sum output.

    Batch dims (self and index of one size) split alike; the index's other dims give
    the output their split; self split along ``dim`` -> each device reads the indices in
    its chunk, the output is partial-``sum`` over those axes (the table never moves).
    """
    x, index = ri.tensors[:2]
    d0 = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], x.ndim)
    if x.ndim == 0:
        yield _replicated(ri)
        return
    xl, (il,) = _dimwise(x, d0, [index])
    lu = _Lineup((xl, il), (il,), frozenset({("m", d0)}), (0,), ALL)
    yield from _strategies(ri, lu, _gather_local(ri.op, x, index, d0, ri.mesh))


_SCATTERS = {
    aten.scatter.src: "src",
    aten.scatter_.src: "src",
    aten.scatter.value: "value",
    aten.scatter_.value: "value",
    aten.scatter.reduce: "reduce",
    aten.scatter_.reduce: "reduce",
    aten.scatter.value_reduce: "value_reduce",
    aten.scatter_.value_reduce: "value_reduce",
    aten.scatter_add.default: "add",
    aten.scatter_add_.default: "add",
    aten.scatter_reduce.two: "two",
    aten.scatter_reduce_.two: "two",
}


def _fill_ops(value: Any) -> tuple[str, ...]:
    """Partial ops a scalar fill passes: avg/max/min, and sum when the value is 0."""
    return ALL if isinstance(value, int | float | bool) and value == 0 else ("avg", "max", "min")


def _reduce_semantics(reduce: str, include_self: bool, has_src: bool) -> tuple[bool, tuple, tuple]:
    """(accumulates, value inputs, partial ops) of a scatter/index reduction (self = input 0)."""
    src = (0, 2) if has_src else (0,)
    if reduce in ("sum", "add"):
        return include_self, src, LINEAR
    if reduce == "mean":
        return False, src, LINEAR
    if reduce == "amax":
        return False, src, ("max",)
    if reduce == "amin":
        return False, src, ("min",)
    # prod / multiply: linear in self alone, and only when self takes part
    return False, (0,), (LINEAR if include_self else ())


def _dim_write_local(
    op: Any, x: ArgSpec, index: ArgSpec, d0: int, mesh: Any, negative: bool, rows: bool
) -> Callable:
    """Each device writes the indices inside its chunk of dim `d0` (the others go to a
    slot past its end), into the rows its index block covers (`rows`: a dim-wise op)."""

    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        masked = bool(x.ndim and layout.dims[d0])
        narrowed = rows and _needs_rows(x, d0, ins)
        if not masked and not narrowed:
            return None
        functional = _functional(op)

        def local(device: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            shard = b["self"]
            buf = None
            if masked:
                lo, hi = local_bounds(x.shape, layout, mesh, device)[d0]
                idx = b["index"]
                _check_range(op, idx, x.shape[d0], negative)
                idx = _normalized(idx, x.shape[d0], negative)
                inside = (idx >= lo) & (idx < hi)
                b["index"] = torch.where(inside, idx - lo, hi - lo)
                buf = _with_slot(shard, [d0])
            target = buf = shard.clone() if buf is None else buf
            if narrowed:
                target = _narrow(buf, _index_rows(x, index, d0, ins, mesh, device))
            b["self"] = target
            target.copy_(_call(functional, b))
            return _finish(op, shard, _without_slot(buf, shard.shape))

        return local

    return make


@register_rule(*_SCATTERS)
def scatter_rule(ri: RuleInput) -> Iterator[Strategy]:
    """self[index[i][j]][j] = src[i][j] (dim 0), and the add/reduce forms.

    Self split along ``dim`` -> each device writes the indices in its chunk (no
    communication); batch dims split alike; the index's other dims split only for
    accumulating forms (output partial-``sum``).
    """
    b = _bind(ri.op, ri.args, ri.kwargs)
    x = ri.tensors[0]
    kind = _SCATTERS[ri.op]
    if x.ndim == 0:
        yield _replicated(ri)
        return
    d0 = _wrap(b["dim"], x.ndim)
    has_src = kind in ("src", "reduce", "add", "two")
    if kind == "src":
        acc, values, ops = False, (0, 2), ALL
    elif kind == "value":
        acc, values, ops = False, (0,), _fill_ops(b["value"])
    elif kind == "add":
        acc, values, ops = True, (0, 2), LINEAR
    elif kind == "reduce":
        acc, values, ops = _reduce_semantics(b["reduce"], True, True)
    elif kind == "value_reduce":
        if b["reduce"] == "add":
            acc, values, ops = False, (0,), _fill_ops(b["value"])
        else:
            acc, values, ops = False, (0,), LINEAR
    else:
        acc, values, ops = _reduce_semantics(b["reduce"], b["include_self"], True)
    follow = list(ri.tensors[1:3] if has_src else ri.tensors[1:2])
    xl, fl = _dimwise(x, d0, follow)
    summed = frozenset(lab for lab in fl[0] if acc and lab is not None and lab[0] == "i")
    lu = _Lineup((xl, *fl), (xl,), summed, values, ops)
    yield from _strategies(
        ri, lu, _dim_write_local(ri.op, x, ri.tensors[1], d0, ri.mesh, False, True)
    )


# == along one dim with a 1-d index: index_select/add/copy/fill/reduce ==========
def _along(x: ArgSpec, d0: int, index: ArgSpec, other: ArgSpec | None) -> tuple[Labels, ...]:
    """Labels of self, the index and (if any) the source/output that follows the index."""
    xl = tuple(("m", d) if d == d0 else ("b", d) for d in range(x.ndim))
    il = (("i", 0),) if index.ndim == 1 else ((None,) * index.ndim)
    if other is None:
        return xl, il
    if other.ndim != x.ndim:
        return xl, il, (None,) * other.ndim
    ol = []
    for d in range(x.ndim):
        if d == d0:
            ol.append(("i", 0) if index.ndim == 1 and other.shape[d] == index.shape[0] else None)
        else:
            ol.append(("b", d) if other.shape[d] == x.shape[d] else None)
    return xl, il, tuple(ol)


def _select_local(op: Any, x: ArgSpec, d0: int, mesh: Any) -> Callable:
    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        if not x.ndim or not layout.dims[d0]:
            return None

        def local(device: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            lo, hi = local_bounds(x.shape, layout, mesh, device)[d0]
            idx = b["index"]
            _check_range(op, idx, x.shape[d0], False)
            inside = (idx >= lo) & (idx < hi)
            src = b["self"]
            if hi == lo:
                shape = list(src.shape)
                shape[d0] = 1
                b["self"], b["index"] = src.new_zeros(shape), torch.zeros_like(idx)
            else:
                b["index"] = torch.where(inside, idx - lo, 0)
            out = _call(op, b)
            view = [1] * out.ndim
            view[d0] = -1
            return out.masked_fill_(~inside.reshape(view), 0)

        return local

    return make


@register_rule(aten.index_select.default)
def index_select_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Select along ``dim``: batch dims split alike, the index's split goes to the output dim;
    self split along ``dim`` -> each device selects the indices in its chunk, partial-sum out."""
    x, index = ri.tensors[:2]
    if x.ndim == 0:
        yield _replicated(ri)
        return
    d0 = _wrap(_bind(ri.op, ri.args, ri.kwargs)["dim"], x.ndim)
    xl, il, ol = _along(x, d0, index, ri.outputs[0])
    lu = _Lineup((xl, il), (ol,), frozenset({("m", d0)}), (0,), ALL)
    yield from _strategies(ri, lu, _select_local(ri.op, x, d0, ri.mesh))


_ALONG_WRITES = {
    aten.index_add.default: "add",
    aten.index_add_.default: "add",
    aten.index_copy.default: "copy",
    aten.index_copy_.default: "copy",
    aten.index_fill.int_Scalar: "fill",
    aten.index_fill_.int_Scalar: "fill",
    aten.index_fill.int_Tensor: "fill_tensor",
    aten.index_fill_.int_Tensor: "fill_tensor",
    aten.index_reduce.default: "reduce",
    aten.index_reduce_.default: "reduce",
}


@register_rule(*_ALONG_WRITES)
def index_write_rule(ri: RuleInput) -> Iterator[Strategy]:
    """index_add / index_copy / index_fill / index_reduce along ``dim`` with a 1-d index.

    Self split along ``dim`` -> each device writes the indices in its chunk (no
    communication); batch dims split alike with the source; the index split only for
    index_add (output partial-``sum``).
    """
    b = _bind(ri.op, ri.args, ri.kwargs)
    kind = _ALONG_WRITES[ri.op]
    x, index = ri.tensors[:2]
    if x.ndim == 0:
        yield _replicated(ri)
        return
    d0 = _wrap(b["dim"], x.ndim)
    if kind == "add":
        acc, values, ops = True, (0, 2), LINEAR
    elif kind == "copy":
        acc, values, ops = False, (0, 2), ALL
    elif kind == "fill":
        acc, values, ops = False, (0,), _fill_ops(b["value"])
    elif kind == "fill_tensor":
        acc, values, ops = False, (0, 2), ALL
    else:
        acc, values, ops = _reduce_semantics(b["reduce"], b["include_self"], True)
    if kind in ("fill", "fill_tensor"):
        xl, il = _along(x, d0, index, None)
        labels = (xl, il) + (((),) if kind == "fill_tensor" else ())
    else:
        labels = _along(x, d0, index, ri.tensors[2])
    summed = frozenset({("i", 0)}) if acc else frozenset()
    lu = _Lineup(labels, (labels[0],), summed, values, ops)
    negative = kind in ("fill", "fill_tensor")
    yield from _strategies(ri, lu, _dim_write_local(ri.op, x, index, d0, ri.mesh, negative, False))


# == take / put (flat indices into self) =======================================
def _flat_position(
    op: Any, idx: torch.Tensor, shape: Sequence[int], bounds: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, local flat index) of global flat indices `idx` in this device's block."""
    n = math.prod(shape)
    _check_range(op, idx, n, True)
    inside = torch.ones_like(idx, dtype=torch.bool)
    local = torch.zeros_like(idx)
    if n == 0:
        return inside & False, local
    rem = _normalized(idx, n, True)
    step = 1
    for d in reversed(range(len(shape))):
        c, rem = rem % shape[d], rem // shape[d]
        lo, hi = bounds[d]
        inside &= (c >= lo) & (c < hi)
        local += (c - lo) * step
        step *= hi - lo
    return inside, local


def _take_local(op: Any, x: ArgSpec, mesh: Any) -> Callable:
    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        if not any(layout.dims):
            return None

        def local(device: int, shard: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            bounds = local_bounds(x.shape, layout, mesh, device)
            inside, pos = _flat_position(op, index, x.shape, bounds)
            if shard.numel() == 0:
                return shard.new_zeros(index.shape)
            out = aten.take.default(shard, torch.where(inside, pos, 0))
            return out.masked_fill_(~inside, 0)

        return local

    return make


@register_rule(aten.take.default)
def take_rule(ri: RuleInput) -> Iterator[Strategy]:
    """self.flatten()[index]: the output takes the index's split; a split self -> each device
    reads the indices in its block, partial-sum output (self never moves)."""
    x, index = ri.tensors[:2]
    xl = tuple(("m", d) for d in range(x.ndim))
    il = tuple(("i", j) for j in range(index.ndim))
    lu = _Lineup((xl, il), (il,), frozenset(xl), (0,), ALL)
    yield from _strategies(ri, lu, _take_local(ri.op, x, ri.mesh))


def _put_local(op: Any, x: ArgSpec, mesh: Any) -> Callable:
    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        if not any(layout.dims):
            return None
        functional = _functional(op)

        def local(device: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            shard = b["self"]
            bounds = local_bounds(x.shape, layout, mesh, device)
            inside, pos = _flat_position(op, b["index"], x.shape, bounds)
            n = shard.numel()
            b["self"] = torch.cat([shard.reshape(-1), shard.new_zeros(1)])
            b["index"] = torch.where(inside, pos, n)
            return _finish(op, shard, _call(functional, b)[:n].view(shard.shape))

        return local

    return make


@register_rule(aten.put.default, aten.put_.default)
def put_rule(ri: RuleInput) -> Iterator[Strategy]:
    """self.flatten()[index] = source (+= with accumulate): a split self -> each device writes
    the indices in its block (no communication); index and source split only to accumulate."""
    x, index, source = ri.tensors[:3]
    acc = bool(_bind(ri.op, ri.args, ri.kwargs)["accumulate"])
    xl = tuple(("m", d) for d in range(x.ndim))
    same = index.shape == source.shape
    il = tuple(("i", j) if same else None for j in range(index.ndim))
    sl_ = tuple(("i", j) if same else None for j in range(source.ndim))
    summed = frozenset(lab for lab in il if acc and lab is not None)
    lu = _Lineup((xl, il, sl_), (xl,), summed, (0, 2), LINEAR if acc else ALL)
    yield from _strategies(ri, lu, _put_local(ri.op, x, ri.mesh))


# == advanced indexing: index, index_put =======================================
_BOOLS = (torch.bool, torch.uint8)


@dataclass(frozen=True, slots=True)
class _Advanced:
    """Where the index tensors of ``x[indices]`` put their broadcast shape B in the result."""

    dims: tuple[int, ...]  # self dims indexed by a tensor (long indices: one dim each)
    shape: tuple[int, ...]  # B
    pos: int  # where B starts in the result
    index_labels: tuple[Labels, ...]
    self_labels: Labels
    result_labels: Labels
    result_shape: tuple[int, ...]


def _advanced(x: ArgSpec, indices: Sequence[ArgSpec | None]) -> _Advanced:
    ents = [(k, t) for k, t in enumerate(indices) if t is not None]
    dims = tuple(k for k, _ in ents)
    shape = tuple(torch.broadcast_shapes(*(t.shape for _, t in ents)))
    contiguous = list(dims) == list(range(dims[0], dims[-1] + 1))
    pos = dims[0] if contiguous else 0
    nb = len(shape)
    index_labels = tuple(
        tuple(
            ("i", nb - t.ndim + j) if t.shape[j] == shape[nb - t.ndim + j] else None
            for j in range(t.ndim)
        )
        for _, t in ents
    )
    rest = [d for d in range(x.ndim) if d not in dims]
    b_labels = [("i", j) for j in range(nb)]
    rest_labels = [("b", d) for d in rest]
    rest_shape = [x.shape[d] for d in rest]
    labels = rest_labels[:pos] + b_labels + rest_labels[pos:]
    result = rest_shape[:pos] + list(shape) + rest_shape[pos:]
    self_labels = tuple(("m", d) if d in dims else ("b", d) for d in range(x.ndim))
    return _Advanced(dims, shape, pos, index_labels, self_labels, tuple(labels), tuple(result))


def _index_list(ri: RuleInput) -> list:
    return list(_bind(ri.op, ri.args, ri.kwargs)["indices"])


def _has_bool(indices: Sequence) -> bool:
    return any(t is not None and t.dtype in _BOOLS for t in indices)


def _long_indices(indices: Sequence) -> list:
    """Boolean index tensors replaced by the long indices of their True elements (nonzero)."""
    out: list = []
    for t in indices:
        if t is None or t.dtype not in _BOOLS:
            out.append(t)
            continue
        nz = aten.nonzero.default(t)
        out += [aten.select.int(nz, 1, j) for j in range(t.ndim)]
    return out


def _via_nonzero(op: Any) -> Callable:
    """Decomposition of `op` with boolean indices: the same op on their nonzero positions."""

    def decompose(*args: Any, **kwargs: Any) -> Any:
        b = _bind(op, args, kwargs)
        b["indices"] = _long_indices(b["indices"])
        return _call(op, b)

    decompose.writes_through_dispatch = True  # the inner op records its own write
    return decompose


def _keep_all(ri: RuleInput, decompose: Callable) -> Strategy:
    return Strategy(tuple(s.layout for s in ri.tensors), decompose=decompose)


def _index_local(op: Any, x: ArgSpec, adv: _Advanced, mesh: Any) -> Callable:
    """Per device: indices of split indexed dims shifted into the chunk, others read zero."""

    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        split = _split_dims(layout, adv.dims)
        if not split:
            return None

        def local(device: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            bounds = local_bounds(x.shape, layout, mesh, device)
            indices = list(b["indices"])
            src, inside = b["self"], None
            for d in split:
                lo, hi = bounds[d]
                idx = indices[d]
                _check_range(op, idx, x.shape[d], True)
                idx = _normalized(idx, x.shape[d], True)
                ok = (idx >= lo) & (idx < hi)
                inside = ok if inside is None else inside & ok
                if hi == lo:
                    shape = list(src.shape)
                    shape[d] = 1
                    src, indices[d] = src.new_zeros(shape), torch.zeros_like(idx)
                else:
                    indices[d] = torch.where(ok, idx - lo, 0)
            b["self"], b["indices"] = src, indices
            out = _call(op, b)
            nb = len(adv.shape)
            view = [1] * adv.pos + [1] * (nb - inside.ndim) + list(inside.shape)
            view += [1] * (out.ndim - len(view))
            return out.masked_fill_(~inside.reshape(view), 0)

        return local

    return make


@register_rule(
    aten.index.Tensor,
    aten.index.Tensor_hacked_twin,
    aten._unsafe_index.Tensor,
    aten._unsafe_index.Tensor_hacked_twin,
)
def index_rule(ri: RuleInput) -> Iterator[Strategy]:
    """x[indices] with long index tensors (None = a whole dim).

    Unindexed dims are batch dims; the index tensors' split goes to the result's
    advanced dims; a split indexed dim of self -> each device reads the indices in its
    chunk, partial-``sum`` result. Boolean indices give a value-dependent shape:
    they become long indices by ``nonzero`` (replicated) first.
    """
    indices = _index_list(ri)
    if not ri.outputs or _has_bool(indices):
        yield _keep_all(ri, _via_nonzero(ri.op))
        return
    x = ri.tensors[0]
    adv = _advanced(x, indices)
    if adv.result_shape != ri.outputs[0].shape:  # not a layout this rule understands
        yield _replicated(ri)
        return
    lu = _Lineup(
        (adv.self_labels, *adv.index_labels),
        (adv.result_labels,),
        frozenset(("m", d) for d in adv.dims),
        (0,),
        ALL,
    )
    yield from _strategies(ri, lu, _index_local(ri.op, x, adv, ri.mesh))


def _index_put_local(op: Any, x: ArgSpec, adv: _Advanced, mesh: Any) -> Callable:
    """Per device: writes inside its chunk of the split indexed dims; the others to a slot."""

    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        split = _split_dims(layout, adv.dims)
        if not split:
            return None
        functional = _functional(op)

        def local(device: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            bounds = local_bounds(x.shape, layout, mesh, device)
            indices = list(b["indices"])
            shard, inside, shifted = b["self"], None, {}
            for d in split:
                lo, hi = bounds[d]
                _check_range(op, indices[d], x.shape[d], True)
                idx = _normalized(indices[d], x.shape[d], True)
                ok = (idx >= lo) & (idx < hi)
                inside = ok if inside is None else inside & ok
                shifted[d] = idx - lo
            for d in split:
                lo, hi = bounds[d]
                indices[d] = torch.where(inside, shifted[d], hi - lo)
            b["self"], b["indices"] = _with_slot(shard, split), indices
            return _finish(op, shard, _without_slot(_call(functional, b), shard.shape))

        return local

    return make


_INDEX_PUTS = (
    aten.index_put.default,
    aten.index_put.hacked_twin,
    aten.index_put_.default,
    aten.index_put_.hacked_twin,
    aten._unsafe_index_put.default,
    aten._unsafe_index_put.hacked_twin,
    aten._index_put_impl_.default,
    aten._index_put_impl_.hacked_twin,
    aten._index_put_impl.default,
)


def _values_labels(v: ArgSpec, labels: Labels, shape: tuple[int, ...]) -> Labels:
    """Labels of values broadcast (right-aligned) to a result of `shape` with `labels`."""
    r = len(shape) - v.ndim
    return tuple(
        labels[r + j] if r + j >= 0 and v.shape[j] == shape[r + j] else None for j in range(v.ndim)
    )


def _bool_put_lineup(ri: RuleInput, indices: list, acc: bool) -> _Lineup | None:
    """``x[mask] = v`` with values that do not span the selection: a pointwise write.

    The mask's dims are batch dims of self. None when the values follow the selection
    (one value per True element: the positions depend on the values of the mask).
    """
    ents = [(k, t) for k, t in enumerate(indices) if t is not None]
    if len(ents) != 1 or ents[0][1].dtype not in _BOOLS:
        return None
    x, v = ri.tensors[0], ri.tensors[-1]
    k0, m = ents[0]
    post = x.ndim - k0 - m.ndim
    if v.ndim > post and v.shape[v.ndim - post - 1] != 1:
        return None
    xl = tuple(("b", d) for d in range(x.ndim))
    ml = tuple(("b", k0 + j) for j in range(m.ndim))
    # values line up with (pre dims, one selection dim, post dims)
    r_labels = xl[:k0] + (None,) + xl[k0 + m.ndim :]
    r_shape = x.shape[:k0] + (1,) + x.shape[k0 + m.ndim :]
    vl = _values_labels(v, r_labels, r_shape)
    return _Lineup((xl, ml, vl), (xl,), frozenset(), (0, 2), LINEAR if acc else ALL)


@register_rule(*_INDEX_PUTS)
def index_put_rule(ri: RuleInput) -> Iterator[Strategy]:
    """x[indices] = values (+= with accumulate), long or boolean indices.

    Unindexed dims are batch dims shared with the values; a split indexed dim of self ->
    each device writes the indices in its chunk (no communication); the index tensors
    split only to accumulate (output partial-``sum``). ``x[mask] = v`` with values not
    following the selection is pointwise (mask split like self); other boolean indices
    go through ``nonzero``.
    """
    b = _bind(ri.op, ri.args, ri.kwargs)
    indices = list(b["indices"])
    acc = bool(b["accumulate"])
    if _has_bool(indices):
        lu = _bool_put_lineup(ri, indices, acc)
        if lu is None:
            yield _keep_all(ri, _via_nonzero(ri.op))
        else:
            yield from _strategies(ri, lu)
        return
    x, v = ri.tensors[0], ri.tensors[-1]
    if not any(t is not None for t in indices):
        yield _replicated(ri)
        return
    adv = _advanced(x, indices)
    vl = _values_labels(v, adv.result_labels, adv.result_shape)
    summed = frozenset(("i", j) for j in range(len(adv.shape))) if acc else frozenset()
    lu = _Lineup(
        (adv.self_labels, *adv.index_labels, vl),
        (adv.self_labels,),
        summed,
        (0, len(ri.tensors) - 1),
        LINEAR if acc else ALL,
    )
    yield from _strategies(ri, lu, _index_put_local(ri.op, x, adv, ri.mesh))


# == masked_scatter ============================================================
def _mask_positions(
    mask: torch.Tensor, shape: tuple[int, ...], bounds: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """This block of the (broadcast) mask and of each True element's rank in row-major order."""
    full = mask.expand(shape)
    rank = full.reshape(-1).cumsum(0).sub_(1).view(shape)
    for d, (lo, hi) in enumerate(bounds):
        full, rank = full.narrow(d, lo, hi - lo), rank.narrow(d, lo, hi - lo)
    return full, rank


def _masked_scatter_local(op: Any, x: ArgSpec, mesh: Any) -> Callable:
    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        if not any(layout.dims):
            return None

        def local(device: int, shard: torch.Tensor, mask: torch.Tensor, source: torch.Tensor):
            bounds = local_bounds(x.shape, layout, mesh, device)
            m, rank = _mask_positions(mask, x.shape, bounds)
            flat = source.reshape(-1)
            if flat.numel() == 0:
                flat = source.new_zeros(1)
            out = torch.where(m, flat[rank.clamp(0, flat.numel() - 1)], shard)
            return _finish(op, shard, out)

        return local

    return make


@register_rule(aten.masked_scatter.default, aten.masked_scatter_.default)
def masked_scatter_rule(ri: RuleInput) -> Iterator[Strategy]:
    """self's True positions (row-major) take source's elements in order.

    Self keeps any split; the mask (one byte per element) and the source are made
    replicated, so every device knows the rank of each of its True positions.
    """
    x, mask, source = ri.tensors[:3]
    if ri.outputs and ri.outputs[0].shape != x.shape:  # self broadcast by the mask
        yield _replicated(ri)
        return
    xl = tuple(("b", d) for d in range(x.ndim))
    lu = _Lineup((xl, (None,) * mask.ndim, (None,) * source.ndim), (xl,), frozenset(), (0, 2), ALL)
    yield from _strategies(ri, lu, _masked_scatter_local(ri.op, x, ri.mesh))


def _masked_scatter_backward_local(grad: ArgSpec, mesh: Any) -> Callable:
    def make(ins: tuple[Layout, ...]) -> Callable | None:
        layout = ins[0]
        if not any(layout.dims):
            return None

        def local(device: int, shard: torch.Tensor, mask: torch.Tensor, sizes: Sequence[int]):
            bounds = local_bounds(grad.shape, layout, mesh, device)
            m, rank = _mask_positions(mask, grad.shape, bounds)
            out = shard.new_zeros(math.prod(sizes))
            out[rank[m]] = shard[m]
            return out.view(list(sizes))

        return local

    return make


@register_rule(aten.masked_scatter_backward.default)
def masked_scatter_backward_rule(ri: RuleInput) -> Iterator[Strategy]:
    """grad.masked_select(mask) padded to source's size: a split grad -> each device places
    its block's selected elements at their global ranks, partial-sum output."""
    grad, mask = ri.tensors[:2]
    if tuple(torch.broadcast_shapes(grad.shape, mask.shape)) != grad.shape:
        yield _replicated(ri)
        return
    gl = tuple(("m", d) for d in range(grad.ndim))
    out = ri.outputs[0]
    lu = _Lineup((gl, (None,) * mask.ndim), ((None,) * out.ndim,), frozenset(gl), (0,), ALL)
    yield from _strategies(ri, lu, _masked_scatter_backward_local(grad, ri.mesh))


# == embedding_renorm_ =========================================================
def _row_part(block: torch.Tensor, p: float, op: str) -> torch.Tensor:
    """Each row's part of its p-norm reduction over this device's columns (``op``-partial)."""
    if block.shape[1] == 0:  # an empty column chunk: the reduction's identity
        return block.new_full((block.shape[0],), math.inf if op == "min" else 0.0)
    if op == "max":
        return block.amax(1)
    if op == "min":
        return block.amin(1)
    return (block != 0).sum(1) if p == 0 else block.pow(p).sum(1)


def _renorm_decomposition(x_spec: ArgSpec, layout: Layout) -> Callable:
    """Rows scaled to max_norm where their norm exceeds it; a split hidden dim all-reduces
    the looked-up rows' partial norms (one number per distinct id)."""
    rows, hidden = layout.dims

    def decompose(
        x: ShardedTensor, indices: Any, max_norm: float, norm_type: float
    ) -> ShardedTensor:
        mesh = x._mesh
        ids = indices._shards[0] if isinstance(indices, ShardedTensor) else indices
        n = x_spec.shape[0]
        _check_range(aten.embedding_renorm_.default, ids, n, True)
        ids = torch.unique(_normalized(ids.reshape(-1), n, True))
        p = float(norm_type)
        op = "max" if p == math.inf else "min" if p == -math.inf else "sum"
        parts, chosen = [], []
        for shard, dev in zip(x._shards, mesh.local_devices):
            lo, hi = local_bounds(x_spec.shape, layout, mesh.abstract, dev)[0]
            mine = (ids >= lo) & (ids < hi)
            block = shard[ids[mine] - lo].abs()
            value = ids.new_zeros(
                ids.shape, dtype=shard.dtype if shard.is_floating_point() else torch.float64
            )
            value[mine] = _row_part(block, p, op).to(value.dtype)
            parts.append(value)
            chosen.append((mine, ids[mine] - lo))
        norms = ShardedTensor(parts, mesh, Layout(((),), hidden, op), (ids.numel(),))
        if hidden:
            norms = _move(aten.embedding_renorm_.default, norms, Layout(((),)))
        for shard, total, (mine, local_ids) in zip(x._shards, norms._shards, chosen):
            norm = total[mine] if op != "sum" or p in (0, 1) else total[mine].pow(1.0 / p)
            scale = torch.where(norm > max_norm, max_norm / (norm + 1e-7), torch.ones_like(norm))
            shard[local_ids] *= scale.to(shard.dtype).unsqueeze(1)
        return x

    return decompose


@register_rule(aten.embedding_renorm_.default)
def embedding_renorm_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Rows of self at indices scaled to max_norm in place: rows split -> each device its own
    rows; hidden split -> the partial norms of the looked-up rows are all-reduced."""
    x, ids = ri.tensors[:2]
    if x.ndim != 2:
        yield _replicated(ri)
        return
    layout = Layout(x.layout.dims)
    yield Strategy(
        (layout, Layout(((),) * ids.ndim)), (layout,), decompose=_renorm_decomposition(x, layout)
    )


# == value-dependent shapes ====================================================
_DYNAMIC = (
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique.default,
)


@register_rule(*_DYNAMIC, aten.nonzero_static.default)
def gathered_rule(ri: RuleInput) -> Iterator[Strategy]:
    """Output shapes that depend on the values: inputs made replicated (in the ledger; strict
    mode refuses), every device computes the replicated result."""
    yield Strategy(tuple(Layout(((),) * s.ndim) for s in ri.tensors), decompose=_locally(ri.op))
