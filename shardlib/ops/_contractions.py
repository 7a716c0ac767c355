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

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from .._errors import LayoutError, ShardlibError
from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh
from ._accumulate import offer
from ._aliasing import sync
from ._api import _as_sharded, _reshard_impl
from ._dispatch import _sig_of
from ._pointwise import _in_dims
from ._rules import ArgSpec, RuleInput, Strategy, register_rule
from ._tensor import ShardedTensor

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


def _read_off(in_labels: list[str], specs: tuple[ArgSpec, ...]) -> list[dict]:
    """Assignments read off the operands' layouts, and their merge (no input moves)."""
    each = [_label_axes(lab, s.layout) for lab, s in zip(in_labels, specs)]
    merged: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for assignment in each:
        for lab, axes in assignment.items():
            if lab not in merged and not used & set(axes):
                merged[lab] = axes
                used |= set(axes)
    return [merged, *each, {}]


_FULL_SEARCH_AXES = 3
# Beyond it, exact plans are costly (4-axis states): the best-first order is cut after this
# many exact plans (the cheapest lower bounds first). Up to 3 axes the search is exact.
_PLANS_BEYOND_FULL = 24


def _axes_over_one(mesh: AbstractMesh) -> int:
    return sum(n > 1 for n in mesh.shape)


@lru_cache(maxsize=4096)
def _assignments(options: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[tuple, ...]:
    """Every assignment of axes to labels, each axis to one of its `options` labels or to
    none ("-"), every order within a label (major to minor)."""
    axes = [a for a, _ in options]
    found = []
    for choice in itertools.product(*(labels for _, labels in options)):
        groups: dict[str, list[str]] = {}
        for axis, lab in zip(axes, choice):
            if lab != "-":
                groups.setdefault(lab, []).append(axis)
        names = list(groups)
        for orders in itertools.product(*(itertools.permutations(groups[n]) for n in names)):
            found.append(tuple(zip(names, orders)))
    return tuple(found)


def _candidates(
    in_labels: list[str],
    out_labels: str,
    specs: tuple[ArgSpec, ...],
    mesh: AbstractMesh | None,
    target: Layout | None = None,
) -> list[dict]:
    """Label assignments to try: the read-off ones first (they win ties: no moves), then,
    given a mesh, every assignment of its axes (of size > 1) to the equation's labels: each
    axis to one label or to none, every order within a label.

    That is what finds SUMMA's, Tesseract's and 3D's assignments (an output axis no operand
    carries on that label), for every contraction alike. Pricing is the caller's
    (`_choose`, best first by the planner's lower bound; the dispatcher). On meshes of more
    than `_FULL_SEARCH_AXES` axes (of size > 1) each axis is tried only on the labels an
    operand or the requested output carries it on, or on none: the full product grows as
    (labels + 1) ** axes, and that restriction still holds every scheme's assignment
    (dp + 3D is four axes).
    """
    found: list[dict] = []
    for c in _read_off(in_labels, specs):
        if c not in found:
            found.append(c)
    if mesh is None:
        return found
    labels = tuple(dict.fromkeys(out_labels + "".join(in_labels))) + ("-",)
    axes = [axis for axis, n in zip(mesh.axis_names, mesh.shape) if n > 1]
    if len(axes) <= _FULL_SEARCH_AXES:
        options = [(axis, labels) for axis in axes]
    else:  # (labels + 1) ** axes grows fast: each axis only where something carries it
        contracted = [lab for lab in labels[:-1] if lab not in out_labels]
        options = []
        for axis in axes:
            near = [
                lab
                for labs, s in zip(in_labels, specs)
                for lab, a in zip(labs, s.layout.dims)
                if axis in a
            ]
            if target is not None:
                near += [lab for lab, a in zip(out_labels, target.dims) if axis in a]
                near += contracted if axis in target.partial else []
            options.append((axis, (*dict.fromkeys(near), "-")))
    seen = {tuple(sorted(c.items())) for c in found}
    for pairs in _assignments(tuple(options)):
        key = tuple(sorted(pairs))
        if key not in seen:
            seen.add(key)
            found.append(dict(pairs))
    return found


def einsum_strategies(
    eq: str,
    specs: tuple[ArgSpec, ...],
    mesh: AbstractMesh | None = None,
    target: Layout | None = None,
):
    """Strategies for a two- (or one-) operand einsum equation over `specs`.

    Without `mesh`, only the assignments read off the operands; with it, the search of
    `_candidates` too (towards `target`, when the output layout is known)."""
    lhs, out_labels = eq.split("->")
    in_labels = lhs.split(",")
    if any(len(set(lab)) != len(lab) for lab in in_labels):
        return  # repeated labels (diagonals): no rule
    contracted = {lab for labs in in_labels for lab in labs if lab not in out_labels}
    partial_inputs = [i for i, s in enumerate(specs) if s.layout.partial]
    for assign in _candidates(in_labels, out_labels, specs, mesh, target):
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
        for inputs, out in einsum_strategies(eq, operands, ri.mesh):
            want_bias = Layout(_in_dims(out.dims, bias, out_spec), out.partial, out.reduce_op)
            local = _expanded_bias(ri.op) if _empty_under_bias(ri, bias, out, out_spec) else None
            yield Strategy((want_bias, *inputs), (out,), local=local)
    else:
        for inputs, out in einsum_strategies(eq, specs, ri.mesh):
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


# == contractions that know their output layout =================================
# `sl.einsum(..., out_layout=Y)` (and `snn.linear`, which calls it) prices every label
# assignment by the planner's bytes for the input moves plus the move of its result to Y,
# runs the cheapest on each device's blocks, and keeps the moved operands for backward.
# Its backward is two contractions of the same kind: dX towards x's layout and dW towards
# w's, each searched the same way, with dY moved once where both need it in one layout.
# A gradient may stay partial over the axes its operand is replicated on (same size as
# the operand's block; reduced lazily, as a DDP gradient is).


@dataclass(frozen=True)
class _Choice:
    inputs: tuple[Layout, ...]
    out: Layout  # the layout the local products come out in
    final: Layout  # the layout the result is moved to
    cost: tuple[int, int, int]  # (bytes, collectives, candidate index)


def _out_shape(eq: str, specs: tuple[ArgSpec, ...]) -> tuple[int, ...]:
    lhs, out_labels = eq.split("->")
    size = {lab: n for labs, s in zip(lhs.split(","), specs) for lab, n in zip(labs, s.shape)}
    return tuple(size[lab] for lab in out_labels)


def _finish(target: Layout, free: frozenset[str], out: Layout) -> Layout:
    """Where a candidate's result goes: `target`, keeping partial axes in `free` (gradients)."""
    if not free or out.reduce_op != "sum":
        return target
    kept = tuple(a for a in out.partial if a in free)
    return Layout(target.dims, kept) if kept else target


def _free_axes(target: Layout, mesh) -> frozenset[str]:
    """Mesh axes `target` does not split: where a gradient may stay partial (lazily)."""
    used = {a for axes in target.dims for a in axes}
    return frozenset(a for a in mesh.axis_names if a not in used)


def gradient_layout(layout: Layout, mesh, g_layout: Layout) -> Layout:
    """Where a gradient of a `layout` tensor goes: `layout` without partial axes, keeping the
    gradient's partial axes that `layout` does not split (the same block size; reduced
    lazily, as a DDP gradient). Used by contraction backwards, their moves and leaves."""
    target = layout.without_partial()
    return _finish(target, _free_axes(target, mesh), g_layout)


def _steps(p) -> int:
    return len(p.steps)


_CHOICES: dict[tuple, _Choice | None] = {}


def _choose(
    eq: str,
    specs: tuple[ArgSpec, ...],
    mesh: AbstractMesh,
    target: Layout,
    free: frozenset[str],
    fixed: tuple[int, ...] = (),
) -> _Choice | None:
    """The cheapest assignment of `eq` over `specs` whose result is brought to `target`;
    operands listed in `fixed` are used where they lie (a scheme's weight)."""
    from ..layouts._planner import lower_bound, plan

    key = (eq, specs, mesh, target, free, fixed)
    if key in _CHOICES:
        return _CHOICES[key]
    out_shape = _out_shape(eq, specs)
    dtype = specs[0].dtype
    item = dtype.itemsize
    # Best first: order candidates by a lower bound of their bytes (no search), plan them
    # exactly in that order, and stop once the bound passes the best exact cost; the
    # result is the same as planning all (ties: fewer collectives, then candidate order).
    bounds: dict[tuple, int] = {}

    def bound(src: Layout, want: Layout, shape: tuple[int, ...]) -> int:
        if (src, want, shape) not in bounds:
            bounds[src, want, shape] = lower_bound(src, want, shape, mesh, item)
        return bounds[src, want, shape]

    ranked = []
    for index, (inputs, out) in enumerate(einsum_strategies(eq, specs, mesh, target)):
        if any(inputs[i] != specs[i].layout for i in fixed):
            continue
        final = _finish(target, free, out)
        lb = sum(bound(s.layout, w, s.shape) for s, w in zip(specs, inputs))
        lb += bound(out, final, out_shape)
        ranked.append((lb, index, inputs, out, final))
    ranked.sort(key=lambda r: (r[0], r[1]))
    best: _Choice | None = None
    budget = None if _axes_over_one(mesh) <= _FULL_SEARCH_AXES else _PLANS_BEYOND_FULL
    for lb, index, inputs, out, final in ranked:
        if best is not None and (lb > best.cost[0] or budget is not None and budget <= 0):
            break
        if budget is not None:
            budget -= 1
        nbytes = steps = 0
        for s, want in zip(specs, inputs):
            p = plan(s.layout, want, s.shape, mesh, s.dtype)
            nbytes, steps = nbytes + p.total_bytes, steps + _steps(p)
        p = plan(out, final, out_shape, mesh, dtype)
        cost = (nbytes + p.total_bytes, steps + _steps(p), index)
        if best is None or cost < best.cost:
            best = _Choice(inputs, out, final, cost)
    if len(_CHOICES) > 16384:
        _CHOICES.clear()
    _CHOICES[key] = best
    return best


def _spec(x) -> ArgSpec:
    return ArgSpec(tuple(x.shape), x.dtype, x._layout)


# == the hot path: cached per signature ==========================================
# A linear's forward and backward repeat every step with the same operand signatures
# (`_dispatch._sig_of`: layout, shape, dtype, mesh, strides), so the choice of assignment,
# the result's shape and the local product are looked up once per signature tuple; the
# search (`_choose`) runs on the first step only.


@lru_cache(maxsize=1024)
def _local_product(eq: str) -> Callable:
    """Each device's product for a two-operand equation: a matmul where the equation is one
    (``x @ w``, ``dY @ w.T``, and ``x.T @ dY`` over the flattened leading dims, a linear's
    three products), else torch's einsum."""
    lhs, out = eq.split("->")
    labels = lhs.split(",")
    if len(labels) == 2:
        a, b = labels
        if a and len(b) == 2 and b[0] != b[1]:
            lead, k = a[:-1], a[-1]
            if b[0] == k and b[1] not in a and out == lead + b[1]:  # "Lk,kn->Ln"
                return torch.matmul
            if b[1] == k and b[0] not in a and out == lead + b[0]:  # "Lk,nk->Ln"
                return _times_transposed
        if len(a) == len(b) >= 2 and a[:-1] == b[:-1] and a[-1] != b[-1]:
            if out == b[-1] + a[-1]:  # "Lo,Li->io": the weight gradient, dY first
                return _leading_product_swapped
            if out == a[-1] + b[-1]:  # "Li,Lo->io"
                return _leading_product
    return lambda *xs: torch._VF.einsum(eq, xs)  # torch.einsum without its Python wrapper


def _times_transposed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, w.t())


def _leading_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (L..., i), y (L..., o) -> (i, o): the sum over the leading dims of outer products."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else y.numel() // max(y.shape[-1], 1)
    return torch.mm(x.reshape(m, x.shape[-1]).t(), y.reshape(m, y.shape[-1]))


def _leading_product_swapped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _leading_product(x, y)


_HOT: dict[tuple, tuple] = {}


def _choose_for(
    eq: str, xs: tuple, target: Layout, free: frozenset[str], fixed: tuple[int, ...] = ()
) -> tuple:
    """(`_choose`'s choice, the result's global shape, the local product) for sharded `xs`,
    keyed by their interned signatures: one dict lookup after the first call."""
    key = (eq, *[_sig_of(x) for x in xs], target, free, fixed)
    hit = _HOT.get(key)
    if hit is None:
        specs = tuple(_spec(x) for x in xs)
        choice = _choose(eq, specs, xs[0]._mesh.abstract, target, free, fixed)
        hit = (choice, _out_shape(eq, specs), _local_product(eq))
        if len(_HOT) > 16384:
            _HOT.clear()
        _HOT[key] = hit
    return hit


def _moved(x, layout: Layout, direction: str, memo: dict | None = None, donate: bool = False):
    """`x` in `layout` (the planner's cheapest moves, cause "einsum"); `memo` shares moves.
    `donate`: `x` is a product nobody else holds, so an all-reduce may reuse its memory."""
    if x._layout is layout or x._layout == layout:
        return x
    if memo is not None and (id(x), layout) in memo:
        return memo[id(x), layout]
    y = _reshard_impl(x, layout, "einsum", direction, donate=donate)
    if memo is not None:
        memo[id(x), layout] = y
    return y


def _contract(
    eq: str,
    xs: tuple,
    target: Layout,
    free: frozenset[str],
    direction: str,
    memo=None,
    fixed: tuple[int, ...] = (),
    found: tuple | None = None,
):
    """Run `eq` on sharded `xs` by the cheapest assignment whose result lands in `target`
    (`found`: `_choose_for`'s answer for them, when the caller has it).

    Returns (result, the operands as moved)."""
    mesh = xs[0]._mesh
    choice, out_shape, product = found or _choose_for(eq, xs, target, free, fixed)
    if choice is None:
        raise LayoutError(f"sl.einsum({eq!r}): no label assignment reaches {target!r}.")
    moved = tuple(_moved(x, w, direction, memo) for x, w in zip(xs, choice.inputs))
    for x in moved:
        if x._root is not None:
            sync(x)
    shards = [product(*blocks) for blocks in zip(*(x._shards for x in moved))]
    y = ShardedTensor(shards, mesh, choice.out, out_shape)
    return _moved(y, choice.final, direction, donate=True), moved


def _remat_source(x):
    """(source, layout) when `x` came from `sl.reshard(..., remat=True)`, else None."""
    return getattr(x, "_remat", None)


@lru_cache(maxsize=1024)
def _backward_equations(eq: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """For each operand of `eq`: (its gradient's equation, its labels)."""
    lhs, out_labels = eq.split("->")
    a, b = lhs.split(",")
    return (f"{out_labels},{b}->{a}", a), (f"{out_labels},{a}->{b}", b)


_BACKWARD: dict[tuple, tuple] = {}


class _Contract(torch.autograd.Function):
    """A two-operand contraction whose operands are already in `choice.inputs`: each
    device multiplies its blocks, the result goes to `choice.final` (see the section
    comment). The operand moves are autograd-visible reshards before it (`_shared_move`)."""

    @staticmethod
    def forward(ctx, eq, found, x, w, fixed_w=False):
        choice, out_shape, product = found
        for t in (x, w):
            if t._root is not None:
                sync(t)
        shards = [product(a, b) for a, b in zip(x._shards, w._shards)]
        y = ShardedTensor(shards, x._mesh, choice.out, out_shape)
        ctx.eq, ctx.layouts, ctx.fixed_w = eq, (x._layout, w._layout), fixed_w
        # an operand from `sl.reshard(..., remat=True)` keeps only its source; the move is
        # redone in backward (cause "regather")
        ctx.kept = [
            (src[0], t._layout) if (src := _remat_source(t)) is not None else t for t in (x, w)
        ]
        return _moved(y, choice.final, "forward", donate=True)

    @staticmethod
    def backward(ctx, dy):
        if ctx.kept is None:
            raise ShardlibError(
                "a second backward through a contraction whose kept operands the first "
                "backward freed; pass retain_graph=True to the first backward"
            )
        kept = []
        for item in ctx.kept:
            if isinstance(item, tuple):
                src, layout = item
                if src._layout != layout:
                    item = _reshard_impl(src, layout, "regather", "backward")
                else:
                    item = src
            kept.append(item)
        xm, wm = kept
        dy = _as_sharded(dy, xm._mesh, tuple(dy.shape))
        needs = ctx.needs_input_grad
        key = (ctx.eq, ctx.layouts, ctx.fixed_w, needs[2], needs[3])
        key += (_sig_of(dy), _sig_of(xm), _sig_of(wm))
        steps = _BACKWARD.get(key)
        if steps is None:
            steps = _BACKWARD[key] = _backward_steps(ctx, dy, xm, wm)
            if len(_BACKWARD) > 16384:
                _BACKWARD.clear()
                _BACKWARD[key] = steps
        memo: dict = {}
        grads = []
        for step in steps:
            if step is None:
                grads.append(None)
                continue
            eq, start, other_index, target, free, fixed, found = step
            other = kept[other_index]
            d = dy if start is None else memo[id(dy), start]
            g, _ = _contract(eq, (d, other), target, free, "backward", memo, fixed, found)
            grads.append(g)
        # the operands are freed once used, as torch frees a node's saved tensors: held to
        # the end of backward (while the graph lives) they would pile up, each layer's
        # activations beside the gradients of the layers after it
        if not torch._C._autograd._get_current_graph_task_keep_graph():
            ctx.kept = None
        offer(ctx, grads, (dy, xm, wm))
        return None, None, *grads, None


def _backward_steps(ctx, dy, xm, wm) -> tuple:
    """How `_Contract.backward` computes each gradient, decided once per signature: per
    operand, None (no gradient wanted) or (equation, which dY to start from, the other
    operand's index, target, free axes, fixed operands, `_choose_for`'s answer).

    dX towards x's layout and dW towards w's, each searched as a contraction of its own;
    dY as it came, or as already moved for the other gradient where that is cheaper."""
    steps = []
    moved_dy: list[Layout] = []  # layouts dY is moved to by earlier gradients
    for i, ((eq, _labels), other_index) in enumerate(zip(_backward_equations(ctx.eq), (1, 0))):
        if not ctx.needs_input_grad[2 + i]:
            steps.append(None)
            continue
        other = (xm, wm)[other_index]
        target = ctx.layouts[i].without_partial()
        free = _free_axes(target, xm._mesh)
        fixed = (1,) if i == 0 and ctx.fixed_w else ()  # dX uses the weight where it lies
        options = [(None, dy)]
        for lay in moved_dy:
            options.append((lay, ShardedTensor(dy._shards, dy._mesh, lay, tuple(dy.shape))))
        best = None
        for start, d in options:
            found = _choose_for(eq, (d, other), target, free, fixed)
            if best is None or found[0].cost[:2] < best[1][0].cost[:2]:
                best = (start, found)
        start, found = best
        want = found[0].inputs[0]
        current = dy._layout if start is None else start
        if want != current and want not in moved_dy:
            moved_dy.append(want)
        steps.append((eq, start, other_index, target, free, fixed, found))
    return tuple(steps)


def _stamp(x) -> tuple:
    return (x._version, x._writes, tuple(t._version for t in x._shards))


class _Move(torch.autograd.Function):
    """An operand move of a contraction (cause "einsum"). Its backward brings the gradient
    to the source's layout, keeping partial axes the source is replicated on (reduced
    lazily, as a DDP gradient: Tesseract's dW all-reduce over depth is the optimizer's)."""

    @staticmethod
    def forward(ctx, x, layout):
        from ._api import _reshard_impl

        ctx.src_layout, ctx.mesh = x._layout, x._mesh
        return _reshard_impl(x, layout, "einsum", "forward")

    @staticmethod
    def backward(ctx, g):
        from ._api import _as_sharded

        g = _as_sharded(g, ctx.mesh, tuple(g.shape))
        return _moved(g, gradient_layout(ctx.src_layout, ctx.mesh, g._layout), "backward"), None


_MOVES = ("_MoveBackward", "_ReshardBackward")


def _reduce_at_producer(x) -> None:
    """Reduce the gradient of an activation a contraction consumed, once all its uses have
    added up and before it enters the producer's backward (a hook on the activation, once).

    Contraction backwards leave input gradients partial over the axes the input is
    replicated on, so the q, k and v gradients of one activation are summed first; this
    reduces that sum once (Megatron's one all-reduce), so the producer's backward (a norm's,
    with its per-token statistics and its weight's gradient) runs on the whole gradient.
    """
    if x.is_leaf or not x.requires_grad or x.__dict__.get("_reduce_hooked"):
        return
    if type(x.grad_fn).__name__ in _MOVES:  # a move's backward reduces (reduce-scatters) itself
        return
    x.__dict__["_reduce_hooked"] = True
    want = x._layout.without_partial()

    def reduce(g):
        if not isinstance(g, ShardedTensor) or not g._layout.partial:
            return None
        return _moved(
            g, want if g._layout.dims == want.dims else g._layout.without_partial(), "backward"
        )

    x.register_hook(reduce)


def _shared_move(x, layout: Layout):
    """`x` moved to `layout` by an autograd-visible move (`_Move`), done once per (tensor,
    layout) while the tensor is unchanged: the q, k and v projections of one activation
    gather it once (Megatron-SP), and their three partial gradients are summed before the
    one reduce-scatter of the move's backward."""
    if x._layout == layout:
        return x
    src = _remat_source(x)
    if src is not None or x._root is not None:
        y = _Move.apply(x, layout)
        if src is not None:
            y._remat = (src[0], layout)
        return y
    moves = x.__dict__.setdefault("_shared_moves", {})
    hit = moves.get(layout)
    stamp = _stamp(x)
    if hit is not None and hit[0] == stamp and hit[1].requires_grad == x.requires_grad:
        return hit[1]
    y = _Move.apply(x, layout)
    moves[layout] = (stamp, y)
    return y


def contract_with_fixed_weight(eq: str, x, w, out_layout: Layout):
    """`sl.einsum(eq, x, w, out_layout=...)` with `w` used where it lies (a scheme's linear:
    the weight is in its compute layout, DESIGN §8 "computed as"); only `x` may move.

    Same backward as `sl.einsum`'s. For a plain or unsupported case, `sl.einsum`."""
    if not (isinstance(x, ShardedTensor) and isinstance(w, ShardedTensor)) or not (
        _differentiable_by_parts(eq) and x.dtype == w.dtype and x._mesh == w._mesh
    ):
        return einsum(eq, x, w, out_layout=out_layout)
    out_layout = _checked(out_layout, x._mesh, eq, "snn.linear(out_dims=...)")
    _reduce_at_producer(x)
    found = _choose_for(eq, (x, w), out_layout, _NO_AXES, (1,))
    if found[0] is None:
        return einsum(eq, x, w, out_layout=out_layout)
    return _Contract.apply(eq, found, _shared_move(x, found[0].inputs[0]), w, True)


_NO_AXES: frozenset[str] = frozenset()
_CHECKED: dict[tuple, Layout] = {}


def _checked(layout: Layout, mesh, eq: str, where: str) -> Layout:
    """`layout.check` for the output of `eq` on `mesh`, remembered (a failing check raises
    every time)."""
    ndim = len(eq) - eq.index(">") - 1
    key = (layout, mesh, ndim)
    hit = _CHECKED.get(key)
    if hit is None:
        hit = layout.check(mesh.abstract, ndim, where)
        if len(_CHECKED) > 4096:
            _CHECKED.clear()
        _CHECKED[key] = hit
    return hit


@lru_cache(maxsize=1024)
def _differentiable_by_parts(eq: str) -> bool:
    """Whether each operand's labels all appear in the other operand or the output (then
    its gradient is one contraction of the same kind)."""
    lhs, out_labels = eq.split("->")
    labels = lhs.split(",")
    if (
        len(labels) != 2
        or any(len(set(lab)) != len(lab) for lab in labels)
        or len(set(out_labels)) != len(out_labels)
    ):
        return False
    a, b = labels
    return all(c in b or c in out_labels for c in a) and all(c in a or c in out_labels for c in b)


def einsum(eq: str, *xs: torch.Tensor, out_layout: Layout | None = None) -> torch.Tensor:
    """`torch.einsum` on sharded operands, optionally pinning the output layout.

    Without `out_layout` the contraction picks the cheapest layouts by rule.
    With it (JAX's `out_sharding`), every assignment of mesh axes to the
    equation's labels is priced by the planner's bytes for moving the operands
    plus moving the result to `out_layout`, and the cheapest runs: SUMMA's,
    Tesseract's and 3D's plans come out of this search. Its backward is found
    the same way (dX towards x's layout, dW towards w's; a gradient may stay
    partial over axes its operand is replicated on), using the moved operands
    kept from forward, or re-gathering those that came from
    `sl.reshard(..., remat=True)` (ledger cause ``"regather"``).

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
    from ._api import reshard, with_layout
    from ._tensor import ShardedTensor

    eq = _explicit(eq, [x.ndim for x in xs])
    sharded = bool(xs) and all(isinstance(x, ShardedTensor) for x in xs)
    if out_layout is not None and xs and isinstance(xs[0], ShardedTensor):
        out_layout = out_layout.check(
            xs[0].mesh.abstract, len(eq.split("->")[1]), "sl.einsum(out_layout=...)"
        )
    if out_layout is not None and sharded and len(xs) == 2:
        if len({x._mesh for x in xs}) != 1:
            torch.einsum(eq, *xs)  # raises the mesh-mismatch error
        if _differentiable_by_parts(eq) and xs[0].dtype == xs[1].dtype:
            for x in xs:
                _reduce_at_producer(x)
            found = _choose_for(eq, xs, out_layout, _NO_AXES)
            if found[0] is None:
                raise LayoutError(f"sl.einsum({eq!r}): no label assignment reaches {out_layout!r}.")
            moved = [_shared_move(x, want) for x, want in zip(xs, found[0].inputs)]
            return _Contract.apply(eq, found, *moved)
        specs = tuple(_spec(x) for x in xs)
        choice = _choose(eq, specs, xs[0].mesh.abstract, out_layout, frozenset())
        if choice is not None:
            xs = tuple(reshard(x, w) for x, w in zip(xs, choice.inputs))
    y = torch.einsum(eq, *xs)
    if out_layout is not None:
        y = with_layout(y, out_layout)
    return y
