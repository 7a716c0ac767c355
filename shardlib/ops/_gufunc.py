"""`sl.gufunc`: a function that is local under its layouts runs as one op, not one per aten op.

Owns the `gufunc(fn, signature=...)` wrapper, its signature parser, the layout rule of a
generalized ufunc (numpy's term: a function vectorized over leading *loop* dims that mixes
only its trailing *core* dims, e.g. RMSNorm ``(e),(e)->(e)``), and the autograd Function
that runs it on each device's blocks. It does not own what happens when that rule does not
apply: then `fn` is simply called on the ShardedTensors and every aten op inside it goes
through `_dispatch` as usual (moves, ledger records, errors), so wrapping a function never
changes its values or its communication, only its cost.

Why: each aten op on a ShardedTensor costs one Python `__torch_dispatch__` round trip
forward and its autograd nodes' round trips backward (~40 us a forward op on this
machine's GPT step, most of it the floor any wrapper subclass pays; ANCHORS). A chain of
pointwise and last-dim ops whose inputs already line up needs no decisions at all: each
device applies the plain function to its blocks. A gufunc turns RMSNorm's ~17 forward and
backward dispatches into one forward and one backward node; inside, the local ops run at
plain torch's speed (their own autograd graph on the blocks, one per device).

The rule (decided once per input signature, cached):
- every tensor input is a ShardedTensor on one mesh or a plain tensor (a replicated
  constant, which must not require grad); no input is partial;
- core dims are not split;
- the loop dims, right-aligned and broadcast as torch does, agree: every input whose
  extent on a loop dim is the broadcast extent splits it over the same mesh axes, and an
  input with extent 1 there (or without the dim) does not split it;
- the output's loop dims carry those splits, its core dims are not split, and it is
  replicated over every other axis. The gradient of an input replicated over axes that
  split the output is partial (sum) over them: each device's block of it is that device's
  contribution (a replicated norm weight's gradient under data parallel, reduced lazily
  where its layout needs it, as `_tensor`'s leaf hook and the optimizers do).
Any other case calls `fn` on the ShardedTensors (the regular path above), and so does
an input from ``sl.reshard(..., remat=True)`` or ZeRO-3's gathered parameters: the local
graph would keep its gathered blocks until backward, where op by op its gather is redone.

Invariants: `fn` must be a pure function of its tensor arguments (no in-place writes to
them, no random numbers, no collectives, Python control flow that depends only on shapes
of the core dims); `fn` sees the local blocks, so its loop-dim shapes are local. Keyword
arguments are passed through unchanged and must not be tensors. The outputs are fresh
tensors (one aliasing an input is copied). Cotangents whose layout is not the output's
(other splits, or a non-sum partial) are moved to it in backward (ledger cause
``"gufunc"``); a sum-partial cotangent passes through and its partial axes carry over to
the input gradients (the backward is linear in it). Differentiable once. Under
`torch.compile` and `torch.func` transforms, and with no ShardedTensor argument, `fn` is
called directly.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .._errors import ShardlibError
from ..layouts._layout import Layout
from ._accumulate import offer
from ._aliasing import sync
from ._dispatch import _intern_sig, _sig_of
from ._tensor import ShardedTensor

__all__ = ["gufunc"]

_ENGINE = torch.autograd.Variable._execution_engine

_NAME = r"[A-Za-z_][A-Za-z_0-9]*"
_CORE = rf"\(\s*(?:{_NAME}(?:\s*,\s*{_NAME})*)?\s*,?\s*\)"
_LIST = rf"{_CORE}(?:\s*,\s*{_CORE})*"
_SIGNATURE = re.compile(rf"^\s*({_LIST})\s*->\s*({_LIST})\s*$")


@dataclass(frozen=True, eq=False)  # plans are cached per signature object: hash by identity
class Signature:
    """A parsed gufunc signature: per input and per output, the names of its core dims."""

    text: str
    inputs: tuple[tuple[str, ...], ...]
    outputs: tuple[tuple[str, ...], ...]


def parse_signature(text: str) -> Signature:
    """``"(e),(e)->(e)"`` -> `Signature`; a `ShardlibError` with the grammar otherwise.

    Examples:
        >>> parse_signature("(d),(c),(c)->(d)").inputs
        (('d',), ('c',), ('c',))
        >>> parse_signature("(),(n)->(n),()").outputs
        (('n',), ())
    """
    if not isinstance(text, str) or not (m := _SIGNATURE.match(text)):
        raise ShardlibError(
            f"sl.gufunc: signature {text!r} is not of the form '(core dims),...->(core dims),...'"
            ", e.g. '(e),(e)->(e)' for RMSNorm (x, weight) -> y or '(),()->()' for a pointwise "
            "function: one parenthesized, comma-separated list of dim names per tensor argument "
            "and per output"
        )

    def lists(part: str) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(re.findall(_NAME, core)) for core in re.findall(_CORE, part))

    ins, outs = lists(m.group(1)), lists(m.group(2))
    known = {n for core in ins for n in core}
    for core in (*ins, *outs):
        if len(set(core)) != len(core):
            raise ShardlibError(
                f"sl.gufunc: signature {text!r} names a core dim twice in one argument "
                f"{core}; give each dim of an argument its own name"
            )
    unknown = sorted({n for core in outs for n in core} - known)
    if unknown:
        raise ShardlibError(
            f"sl.gufunc: signature {text!r}: output core dims {unknown} appear in no input; "
            f"an output's core dims must be input core dims (known: {sorted(known)})"
        )
    return Signature(text, ins, outs)


def gufunc(fn: Callable | None = None, *, signature: str) -> Callable:
    """Run `fn` as one op on each device's blocks where its layouts allow (see module doc).

    `fn` is a generalized ufunc: vectorized over leading loop dims (broadcast like torch),
    mixing only the trailing core dims that `signature` names per tensor argument and
    output. Where the arguments' layouts line up (core dims unsplit, loop dims split alike,
    nothing partial) each device applies `fn` to its blocks under one autograd node;
    otherwise `fn` runs on the ShardedTensors op by op, with the usual moves in the
    ledger. Values are the same either way. Use as ``sl.gufunc(fn, signature=...)`` or as
    a decorator ``@sl.gufunc(signature=...)``. Tensor arguments are positional, one per
    signature input; keyword arguments pass through (not tensors).

    Examples:
        >>> import shardlib as sl, torch
        >>> @sl.gufunc(signature="(e),(e)->(e)")
        ... def rms_norm(x, w, eps=1e-5):
        ...     return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w
        >>> mesh = sl.Mesh.simulated({"dp": 2})
        >>> x = sl.shard(torch.randn(4, 3, 8, dtype=torch.float64), mesh, sl.P("dp"))
        >>> w = sl.shard(torch.ones(8, dtype=torch.float64), mesh, sl.P()).requires_grad_()
        >>> with sl.comm_ledger() as led:
        ...     y = rms_norm(x, w)
        >>> y.spec, led.count()
        (P('dp', None, None), 0)
        >>> torch.allclose(y.full(), rms_norm(x.full(), w.full()))
        True
        >>> y.sum().backward()
        >>> w.grad.spec                      # each device's contribution: reduced lazily
        P(None, partial='dp')
    """
    sig = parse_signature(signature)

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def mapped(*args: Any, **kwargs: Any) -> Any:
            return _call(f, sig, args, kwargs)

        mapped.signature = sig.text  # type: ignore[attr-defined]
        return mapped

    return wrap if fn is None else wrap(fn)


# == the layout rule =================================================================
@dataclass(frozen=True)
class _Plan:
    out_layouts: tuple[Layout, ...]
    out_shapes: tuple[tuple[int, ...], ...]
    out_cores: tuple[tuple[int, ...], ...]  # each output's core dim sizes
    in_shapes: tuple[tuple[int, ...], ...]
    grad_layouts: tuple[Layout | None, ...]  # None: a plain (constant) input
    where: str  # the wrapper's name in error messages


_PLANS: dict[tuple, _Plan | None] = {}


def _where(fn: Callable, sig: Signature) -> str:
    return f"sl.gufunc({getattr(fn, '__qualname__', fn)!r}, signature={sig.text!r})"


def _call(fn: Callable, sig: Signature, args: tuple, kwargs: dict) -> Any:
    if len(args) != len(sig.inputs):
        raise TypeError(
            f"{_where(fn, sig)}: takes {len(sig.inputs)} positional tensor argument(s), one "
            f"per signature input, got {len(args)}; pass other arguments by keyword"
        )
    if kwargs and any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        raise TypeError(
            f"{_where(fn, sig)}: tensor keyword arguments are not allowed; pass every tensor "
            "positionally, with its core dims in the signature"
        )
    mesh = None
    for a in args:
        if isinstance(a, ShardedTensor):
            mesh = a._mesh
            break
    if mesh is None or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn(*args, **kwargs)
    key = (sig, *(_sig_of(a) if isinstance(a, ShardedTensor) else _plain_sig(a) for a in args))
    if key in _PLANS:
        found = _PLANS[key]
    else:
        found = _PLANS[key] = _decide(sig, args, _where(fn, sig))
        if len(_PLANS) > 16384:
            _PLANS.clear()
    if found is None:
        return fn(*args, **kwargs)
    for a in args:
        if isinstance(a, ShardedTensor):
            if a._mesh is not mesh:
                return fn(*args, **kwargs)  # dispatch names the mismatch
            if a.__dict__.get("_remat") is not None:
                # a gather to be redone in backward (sl.reshard(remat=True), ZeRO-3): the local
                # graph would keep it, so run op by op, where the saved-tensor hooks see it
                return fn(*args, **kwargs)
            if a._root is not None:
                sync(a)
        elif a.requires_grad and torch.is_grad_enabled():
            return fn(*args, **kwargs)  # a differentiable plain tensor: let dispatch decide
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        outs = _Gufunc.apply(fn, kwargs, found, mesh, *args)
    else:
        outs = _wrap(_run(fn, kwargs, args, found, None), mesh, found)
    return outs[0] if len(sig.outputs) == 1 else outs


def _plain_sig(a: Any) -> Any:
    if not isinstance(a, torch.Tensor):
        raise TypeError(
            f"sl.gufunc: positional arguments are the signature's tensors; got {type(a).__name__}"
            " (pass non-tensor arguments by keyword)"
        )
    return _intern_sig(("plain", a.shape, a.dtype, a.device))


def _decide(sig: Signature, args: tuple, where: str) -> _Plan | None:
    """The plan for these arguments, or None where `fn` must run op by op."""
    sizes: dict[str, int] = {}
    loops = []
    for i, (a, core) in enumerate(zip(args, sig.inputs)):
        if a.ndim < len(core):
            raise ShardlibError(
                f"{where}: argument {i} has shape {tuple(a.shape)}, fewer dims than its core "
                f"dims {core}"
            )
        for name, n in zip(core, a.shape[a.ndim - len(core) :]):
            if sizes.setdefault(name, n) != n:
                raise ShardlibError(
                    f"{where}: core dim {name!r} is {sizes[name]} in one argument and {n} in "
                    f"argument {i} (shape {tuple(a.shape)}); equal names need equal sizes"
                )
        loops.append(tuple(a.shape[: a.ndim - len(core)]))
    try:
        loop = tuple(torch.broadcast_shapes(*loops))
    except RuntimeError:
        raise ShardlibError(
            f"{where}: the loop dims (those before the core dims) {loops} do not broadcast"
        ) from None
    splits: list[tuple[str, ...] | None] = [None] * len(loop)
    for a, lp in zip(args, loops):
        if not isinstance(a, ShardedTensor):
            continue
        lay = a._layout
        if lay.partial or any(lay.dims[len(lp) :]):
            return None
        off = len(loop) - len(lp)
        for k, axes in enumerate(lay.dims[: len(lp)]):
            j = off + k
            if lp[k] != loop[j] or loop[j] == 1:  # broadcast (extent 1) or a 1-long dim
                if axes:
                    return None
                continue
            if splits[j] is None:
                splits[j] = axes
            elif splits[j] != axes:
                return None
    for a, lp in zip(args, loops):  # a full-extent dim some inputs split and this one not
        if isinstance(a, ShardedTensor):
            off = len(loop) - len(lp)
            for k, axes in enumerate(a._layout.dims[: len(lp)]):
                if lp[k] == loop[k + off] != 1 and axes != (splits[k + off] or ()):
                    return None
        elif any(splits[len(loop) - len(lp) + k] for k in range(len(lp)) if lp[k] != 1):
            return None  # a plain constant's blocks would have to be cut
    loop_dims = tuple(s or () for s in splits)
    varying = frozenset(a for s in loop_dims for a in s)
    out_layouts = tuple(Layout(loop_dims + ((),) * len(core)) for core in sig.outputs)
    out_shapes = tuple(loop + tuple(sizes[n] for n in core) for core in sig.outputs)
    grads = []
    for a in args:
        if not isinstance(a, ShardedTensor):
            grads.append(None)
            continue
        missing = tuple(sorted(varying - a._layout.used_axes))
        grads.append(a._layout.with_partial(missing, "sum") if missing else a._layout)
    out_cores = tuple(tuple(sizes[n] for n in core) for core in sig.outputs)
    in_shapes = tuple(tuple(a.shape) for a in args)
    return _Plan(out_layouts, out_shapes, out_cores, in_shapes, tuple(grads), where)


# == running it on the blocks ========================================================
def _blocks(a: Any, n: int) -> list[torch.Tensor]:
    return a._shards if isinstance(a, ShardedTensor) else [a] * n


def _run(fn, kwargs, args, plan: _Plan, graphs: list | None) -> list[list]:
    """Per output, its per-device blocks. With `graphs` (a list), each device's local
    autograd graph is built and appended as (leaves, outputs)."""
    n = len(next(a for a in args if isinstance(a, ShardedTensor))._shards)
    per_arg = [_blocks(a, n) for a in args]
    nout = len(plan.out_layouts)
    outs: list[list] = [[] for _ in range(nout)]
    for d in range(n):
        inputs = [blocks[d] for blocks in per_arg]
        if graphs is not None:
            inputs = [
                x.detach().requires_grad_()
                if isinstance(a, ShardedTensor) and a.requires_grad
                else x
                for x, a in zip(inputs, args)
            ]
            with torch.enable_grad():  # the copy of an aliasing output is in the graph too
                got = _check_outputs(fn(*inputs, **kwargs), nout, plan, inputs, d)
        else:
            got = _check_outputs(fn(*inputs, **kwargs), nout, plan, inputs, d)
        if graphs is not None:
            graphs.append((inputs, got))
            got = [g.detach() for g in got]
        for k, g in enumerate(got):
            outs[k].append(g)
    return outs


def _check_outputs(got, nout: int, plan: _Plan, inputs, d: int) -> list:
    got = list(got) if isinstance(got, tuple | list) else [got]
    if len(got) != nout or not all(isinstance(g, torch.Tensor) for g in got):
        raise ShardlibError(
            f"{plan.where}: fn returned {len(got)} value(s) of types "
            f"{[type(g).__name__ for g in got]}; the signature declares {nout} tensor output(s)"
        )
    storages = {x.untyped_storage().data_ptr() for x in inputs}
    for k, g in enumerate(got):
        core = plan.out_cores[k]
        if tuple(g.shape[g.ndim - len(core) :]) != core or g.ndim != len(plan.out_shapes[k]):
            raise ShardlibError(
                f"{plan.where}: output {k} on device {d} has shape {tuple(g.shape)}; the "
                f"signature wants the loop dims then core dims of sizes {core} (rank "
                f"{len(plan.out_shapes[k])})"
            )
        if g.untyped_storage().data_ptr() in storages:
            got[k] = g.clone()  # outputs are fresh tensors, never an input's memory
    return got


def _wrap(outs: list[list], mesh: Any, plan: _Plan) -> tuple[ShardedTensor, ...]:
    return tuple(
        ShardedTensor(blocks, mesh, lay, shape)
        for blocks, lay, shape in zip(outs, plan.out_layouts, plan.out_shapes)
    )


class _Gufunc(torch.autograd.Function):
    """`fn` on each device's blocks, with each device's local autograd graph kept for the
    backward (no recomputation): one node forward, one backward, whatever `fn` contains."""

    @staticmethod
    def forward(ctx, fn, kwargs, plan, mesh, *args):
        graphs: list = []
        outs = _run(fn, kwargs, args, plan, graphs)
        ctx.graphs, ctx.plan, ctx.mesh = graphs, plan, mesh
        ctx.set_materialize_grads(False)
        return _wrap(outs, mesh, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents):
        from ._api import _as_sharded, _reshard_impl

        plan, mesh = ctx.plan, ctx.mesh
        wanted = ctx.needs_input_grad[4:]
        moved = [
            None if g is None else _as_sharded(g, mesh, plan.out_shapes[k])
            for k, g in enumerate(cotangents)
        ]
        # a cotangent in the output's splits and sum-partial passes through (the backward is
        # linear in it) when all share the partial axes; any other is moved to the output
        # layout (ledger cause "gufunc")
        kinds = {
            g._layout.partial
            if g._layout.dims == want.dims and g._layout.reduce_op == "sum"
            else None
            for g, want in zip(moved, plan.out_layouts)
            if g is not None
        }
        partial = kinds.pop() if len(kinds) == 1 else None
        if partial is None:
            partial = ()
            moved = [
                g
                if g is None or g._layout == want
                else _reshard_impl(g, want, "gufunc", "backward")
                for g, want in zip(moved, plan.out_layouts)
            ]
        # the outer backward's retain_graph decides whether the local graphs may be freed
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        if ctx.graphs is None:
            raise ShardlibError(
                "sl.gufunc: a second backward through this call, whose local graphs the first "
                "one freed; pass retain_graph=True to the first backward"
            )
        grads: list[list[torch.Tensor]] = [[] for _ in wanted]
        for d, (leaves, outs) in enumerate(ctx.graphs):
            # an output that does not depend on a differentiable input (e.g. an empty
            # block of an uneven split) has no graph and contributes nothing
            roots, cots = [], []
            for o, g in zip(outs, moved):
                if g is not None and o.requires_grad:
                    roots.append(o)
                    cots.append(g._shards[d])
            need = [x for x, w in zip(leaves, wanted) if w]
            # the engine itself (torch.autograd.grad's checks cost ~20 us and hold here)
            got = (
                _ENGINE.run_backward(
                    tuple(roots), tuple(cots), keep, False, tuple(need), True, False
                )
                if roots
                else ()
            )
            got = iter(got or [None] * len(need))
            for i, w in enumerate(wanted):
                if w:
                    gi = next(got)
                    grads[i].append(torch.zeros_like(leaves[i]) if gi is None else gi)
        if not keep:
            ctx.graphs = None
        out = []
        for i, w in enumerate(wanted):
            if not w:
                out.append(None)
                continue
            lay = plan.grad_layouts[i]
            if partial:
                lay = lay.with_partial(tuple(sorted(set(lay.partial) | set(partial))), "sum")
            out.append(ShardedTensor(grads[i], mesh, lay, plan.in_shapes[i]))
        # fresh gradient blocks may take the engine's sum in place; one that passes a
        # cotangent through (or a view of it) is not offered
        offer(ctx, out, moved)
        return None, None, None, None, *out
