"""Running a model under a scheme: `use`, `constrain`, `linear`, `attention`, `shard_params`.

Owns the active-scheme context and the four calls model code makes. Outside
``with snn.use(scheme, mesh):``, or on plain tensors, each is the plain torch
op, so one model function runs unsharded and under every scheme. Inside, they
only pin layouts the scheme names (`sl.with_layout`, `sl.einsum(out_layout=)`,
`sl.reshard`) and pick the attention kernel: no communication of their own.

Invariants:
- the active scheme is per context (a `contextvars` stack), never a global;
- a weight's logical dims are recorded when `shard_params` creates it (a weak
  table keyed by the tensor: `record_dims` / `recorded_dims`), so `linear`
  finds its compute layout; a new tensor made from a weight (an optimizer
  step that returns fresh tensors) has none recorded: pass ``w_dims=`` or
  call `record_dims` on it;
- every error names the call, the param or tensor, and a fix.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .._errors import LayoutError, MeshMismatchError
from ..layouts._layout import Layout
from ..ops._api import reshard, shard, with_layout
from ..ops._compile import in_graph
from ..ops._contractions import _shared_move, contract_with_fixed_weight
from ..ops._tensor import ShardedTensor
from ._scheme import Scheme

__all__ = [
    "attention",
    "constrain",
    "current",
    "linear",
    "record_dims",
    "recorded_dims",
    "shard_params",
    "use",
]

Q_DIMS = ("batch", "heads", "seq", "head_dim")
KV_DIMS = ("batch", "kv_heads", "seq", "head_dim")

_ACTIVE: contextvars.ContextVar[tuple[tuple[Scheme, Any], ...]] = contextvars.ContextVar(
    "shardlib_nn_scheme", default=()
)


# == the active scheme ===========================================================
def check_mesh(scheme: Any, mesh: Any, where: str) -> None:
    """Raise unless `scheme` is a Scheme and every axis it claims is an axis of `mesh`."""
    if not isinstance(scheme, Scheme):
        raise LayoutError(
            f"{where}: expected an snn.Scheme (e.g. snn.tp1d('tp')), got {type(scheme).__name__}."
        )
    names = getattr(mesh, "axis_names", None)
    if names is None:
        raise LayoutError(
            f"{where}: expected an sl.Mesh, got {type(mesh).__name__}; build one with "
            "sl.Mesh.simulated({...})."
        )
    missing = [a for a in scheme.axes if a not in names]
    if missing:
        raise LayoutError(
            f"{where}: scheme {scheme!r} uses mesh axis {', '.join(map(repr, missing))}, but the "
            f"mesh has axes {mesh.axes!r}. Build the mesh with those axes (e.g. "
            f"sl.Mesh.simulated({{{', '.join(f'{a!r}: 2' for a in scheme.axes)}}})) or name the "
            "scheme's axes after the mesh's."
        )


@contextlib.contextmanager
def use(scheme: Scheme, mesh: Any) -> Iterator[Scheme]:
    """Run `constrain`, `linear` and `attention` under `scheme` on `mesh` (nests; inner wins).

    Examples:
        >>> import shardlib as sl, torch
        >>> from shardlib import nn as snn
        >>> mesh = sl.Mesh.simulated({"dp": 2})
        >>> x = sl.shard(torch.ones(4, 3, 8), mesh, sl.P())
        >>> with snn.use(snn.dp("dp"), mesh):
        ...     snn.constrain(x, ("batch", "seq", "embed")).spec
        P('dp', None, None)
    """
    if torch.compiler.is_dynamo_compiling():  # (h9g) dynamo cannot set a context variable
        raise LayoutError(
            "snn.use(scheme, mesh) inside a function torch.compile traces: the active scheme "
            "is a context variable, which dynamo cannot set. Enter it around the compiled "
            "call instead: `with snn.use(scheme, mesh): loss = compiled_step(params, batch)` "
            "(the compiled step is guarded on the scheme and recompiles under another)."
        )
    check_mesh(scheme, mesh, "snn.use(scheme, mesh)")
    token = _ACTIVE.set(_ACTIVE.get() + ((scheme, mesh),))
    global _USE_KEY  # (h9g) torch.compile's guard on the active scheme
    outer, _USE_KEY = _USE_KEY, _use_key(scheme, mesh)
    try:
        yield scheme
    finally:
        _ACTIVE.reset(token)
        _USE_KEY = outer


# -- torch.compile (h9g): the active scheme as a guard ----------------------------
# Dynamo cannot read a context variable, so `use` also mirrors the innermost (scheme, mesh)
# as a short string, equal for equal schemes and meshes. `constrain`, `linear` and
# `attention` are one graph node each under torch.compile (the end of this module), and
# pass that string to the node: dynamo guards on it, so a compiled function called under
# another scheme recompiles. (Threads that compile under different schemes at once share
# the mirror: compile each outside the others' `use`.)
_USE_KEY = ""
_KEYS_BY_ID: dict[tuple[int, int], tuple[Scheme, Any, str]] = {}
_KEYS: dict[tuple[Scheme, Any], str] = {}


def _use_key(scheme: Scheme, mesh: Any) -> str:
    hit = _KEYS_BY_ID.get((id(scheme), id(mesh)))
    if hit is not None and hit[0] is scheme and hit[1] is mesh:
        return hit[2]
    if len(_KEYS_BY_ID) > 4096:
        _KEYS_BY_ID.clear()
    try:
        key = _KEYS.setdefault((scheme, mesh), f"use{len(_KEYS)}")
    except TypeError:  # an unhashable scheme (a user's dict field): keyed by identity
        key = f"use-id{id(scheme)}-{id(mesh)}"
    _KEYS_BY_ID[(id(scheme), id(mesh))] = (scheme, mesh, key)  # holds both: ids stay theirs
    return key


# -- end torch.compile --


def current() -> tuple[Scheme, Any] | None:
    """The innermost ``(scheme, mesh)`` of `use`, or None outside every `use`."""
    stack = _ACTIVE.get()
    return stack[-1] if stack else None


def _active_for(xs: tuple[Any, ...], where: str) -> tuple[Scheme, Any] | None:
    """The active scheme if some tensor of `xs` is sharded (on its mesh), else None."""
    active = current()
    sharded = [x for x in xs if isinstance(x, ShardedTensor)]
    if active is None or not sharded:
        return None
    mesh = active[1]
    for x in sharded:
        if x.mesh != mesh:
            raise MeshMismatchError(
                f"{where}: a tensor lives on {x.mesh!r} but snn.use runs {active[0]!r} on "
                f"{mesh!r}; shard the model's tensors on the mesh given to snn.use."
            )
    return active


def _check_rank(x: torch.Tensor, dims: Any, where: str) -> tuple[Any, ...]:
    if isinstance(dims, str) or not isinstance(dims, tuple | list):
        raise LayoutError(
            f"{where}: dims is {dims!r}; give a tuple of logical names, one per dim of the "
            f"{x.ndim}-d tensor, e.g. ('batch', 'seq', 'embed')."
        )
    if len(dims) != x.ndim:
        raise LayoutError(
            f"{where}: dims {tuple(dims)!r} name {len(dims)} dims but the tensor has shape "
            f"{tuple(x.shape)} ({x.ndim} dims); give one logical name per dim."
        )
    return tuple(dims)


# == layouts per scheme, remembered ==============================================
# A scheme is frozen and gives equal layouts for equal dims, and a model asks the same few
# (scheme, dims) every step: each is computed once (errors are raised every time).
_LAYOUTS: dict[int, tuple[Scheme, dict]] = {}


def _scheme_layout(scheme: Scheme, kind: str, dims: tuple[Any, ...]) -> Layout:
    """``getattr(scheme, kind)(dims)`` (kind: act_layout, compute_layout, input_layout)."""
    entry = _LAYOUTS.get(id(scheme))
    if entry is None or entry[0] is not scheme:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        entry = _LAYOUTS[id(scheme)] = (scheme, {})  # holds the scheme: its id stays its own
    memo = entry[1]
    key = (kind, dims)
    try:
        layout = memo.get(key)
    except TypeError:  # unhashable names: not remembered
        return getattr(scheme, kind)(dims)
    if layout is None:
        layout = memo[key] = getattr(scheme, kind)(dims)
    return layout


# == recorded weight dims ======================================================
_DIMS: dict[int, tuple[weakref.ref, tuple[Any, ...]]] = {}


def record_dims(t: torch.Tensor, dims: tuple[Any, ...]) -> torch.Tensor:
    """Remember `t`'s logical dims (weakly: dropped with the tensor); returns `t`.

    Examples:
        >>> import torch
        >>> from shardlib import nn as snn
        >>> from shardlib.nn._use import record_dims, recorded_dims
        >>> w = record_dims(torch.zeros(2, 3), ("embed", "mlp"))
        >>> recorded_dims(w)
        ('embed', 'mlp')
    """
    key = id(t)
    _DIMS[key] = (weakref.ref(t, lambda _, key=key: _DIMS.pop(key, None)), tuple(dims))
    return t


def recorded_dims(t: torch.Tensor) -> tuple[Any, ...] | None:
    """The logical dims `record_dims` (or `shard_params`) gave `t`, or None."""
    entry = _DIMS.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else None


# == constrain / linear / attention ============================================
def constrain(x: torch.Tensor, dims: tuple[str, ...]) -> torch.Tensor:
    """Pin activation `x` to the active scheme's layout for logical `dims` (else the identity).

    Under `use` and on a ShardedTensor this is ``sl.with_layout(x,
    scheme.act_layout(dims))``; on plain tensors or outside `use` it returns
    `x`. `dims` must name every dim of `x`.

    Examples:
        >>> import torch
        >>> from shardlib import nn as snn
        >>> x = torch.ones(2, 3)
        >>> snn.constrain(x, ("tokens", "embed")) is x
        True
    """
    dims = _check_rank(x, dims, f"snn.constrain(x, dims={dims!r})")
    active = _active_for((x,), "snn.constrain")
    if active is None:
        return x
    return with_layout(x, _scheme_layout(active[0], "act_layout", dims))


def _labels(n: int) -> str:
    letters = "abcdefghjklmnpqrstuvwxyz"  # i and o are the weight's (in, out)
    if n > len(letters):
        raise LayoutError(
            f"snn.linear: x has {n + 1} dims; at most {len(letters) + 1} are supported."
        )
    return letters[:n]


def _to_compute(w: torch.Tensor, scheme: Scheme, dims: Any, what: str) -> torch.Tensor:
    """`w` moved to its compute layout (re-gathered in backward if the scheme remats)."""
    if not isinstance(w, ShardedTensor) or not scheme.moves_weights:
        return w
    dims = dims if dims is not None else recorded_dims(w)
    if dims is None:
        raise LayoutError(
            f"snn.linear: {what} (shape {tuple(w.shape)}, {w.spec!r}) has no recorded logical "
            f"dims, and {scheme!r} computes weights in a layout other than their storage, so "
            "linear must know them. Create weights with snn.shard_params(params, mesh, scheme, "
            "dims) (it records them), call shardlib.nn._use.record_dims(w, dims) on a new "
            "tensor, or pass w_dims=(...)."
        )
    _check_rank(w, dims, f"snn.linear: {what} dims")
    target = _scheme_layout(scheme, "compute_layout", tuple(dims))
    if target == w.spec:
        return w
    # remat: re-gathered in backward, whose reduce-scatter finishes the gradient; else the
    # contraction's own move (its gradient kept partial over axes the weight is replicated on)
    return reshard(w, target, remat=True) if scheme.remat else _shared_move(w, target)


def _to_input(x: torch.Tensor, w: torch.Tensor, scheme: Scheme, out_dims: Any, w_dims: Any):
    """`x` in the scheme's linear-input layout where it has one (Megatron-SP's gather), moved
    once per activation and layout (`sl.einsum`'s shared move: q, k, v share one gather)."""
    if scheme.inputs is None or not isinstance(x, ShardedTensor):
        return x
    dims = w_dims if w_dims is not None else recorded_dims(w)
    if dims is None:
        return x
    want = _scheme_layout(scheme, "input_layout", (*out_dims[:-1], dims[0]))
    return x if want == x.spec else _shared_move(x, want)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    out_dims: tuple[str, ...],
    w_dims: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """``x @ w + b`` with `w` stored (in, out); under a scheme, a contraction that knows its output.

    Under `use` (and a sharded operand): `w` (and `b`) move to their compute
    layout where the scheme's differs from storage (``sl.reshard(..., remat=
    scheme.remat)``; the weight's logical dims come from `shard_params`'s
    record, or `w_dims`), then ``sl.einsum("...i,io->...o", x, w,
    out_layout=scheme.act_layout(out_dims))`` picks the cheapest plan for that
    output, plus `b`. Outside, the plain ops.

    Args:
        x: (..., in) activations.
        w: (in, out) weight.
        b: optional (out,) bias.
        out_dims: logical dims of the result, one per dim of x.
        w_dims: the weight's logical dims, where no record exists.

    Examples:
        >>> import torch
        >>> from shardlib import nn as snn
        >>> x, w = torch.ones(2, 3, 4), torch.ones(4, 5)
        >>> snn.linear(x, w, out_dims=("batch", "seq", "mlp")).shape
        torch.Size([2, 3, 5])
    """
    out_dims = _check_rank(x, out_dims, f"snn.linear(x, w, out_dims={out_dims!r})")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise LayoutError(
            f"snn.linear: x has shape {tuple(x.shape)} and w {tuple(w.shape)}; w is stored "
            "(in, out) with in = x.shape[-1] (linear(x, w) = x @ w; transpose a torch "
            "nn.Linear weight)."
        )
    active = _active_for((x, w, b), "snn.linear")
    if active is None:
        y = torch.matmul(x, w)
        return y if b is None else y + b
    scheme = active[0]
    x = _to_input(x, w, scheme, out_dims, w_dims)
    w = _to_compute(w, scheme, w_dims, "the weight")
    if b is not None:
        b = _to_compute(b, scheme, None if w_dims is None else w_dims[1:], "the bias")
    lead = _labels(x.ndim - 1)
    # the weight is used in its compute layout ("computed as", DESIGN §8): only x may move
    eq = f"{lead}i,io->{lead}o"
    y = contract_with_fixed_weight(eq, x, w, _scheme_layout(scheme, "act_layout", out_dims))
    return y if b is None else y + b


def _heads_split(layout: Layout, axis: str) -> Layout:
    """`layout` of a (batch, heads, seq, head_dim) tensor with `axis` moved from seq to heads."""
    dims = list(layout.dims)
    dims[2] = tuple(a for a in dims[2] if a != axis)
    dims[1] = tuple(a for a in dims[1] if a != axis) + (axis,)
    return Layout(tuple(dims))


def _causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """Boolean (…, 1, seq, seq) mask: query i may see key j iff positions[j] <= positions[i]."""
    allowed = positions.unsqueeze(-2) <= positions.unsqueeze(-1)
    return allowed.unsqueeze(-3) if positions.ndim == 2 else allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, q (batch, heads, seq, head_dim), k, v (batch, kv_heads, ...).

    Grouped-query attention when kv_heads < heads (query head h uses kv head
    h // (heads // kv_heads)). With `causal`, `positions` ((seq,) or (batch,
    seq) global token positions in the current order) decide the mask: query
    i sees key j iff positions[j] <= positions[i]; without them, the order is
    the position. Under the active scheme: ``"local"`` pins q, k, v to the
    scheme's layouts and runs SDPA; ``"ulysses"`` moves them to heads-split
    (4 all-to-alls with the output's move back); ``"ring"`` runs the ring
    kernel of ``shardlib.nn._ring``. Outside `use`, plain SDPA.

    Examples:
        >>> import torch
        >>> from shardlib import nn as snn
        >>> q = torch.randn(1, 4, 5, 2)
        >>> kv = torch.randn(1, 2, 5, 2)
        >>> snn.attention(q, kv, kv, causal=True).shape
        torch.Size([1, 4, 5, 2])
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise LayoutError(
                f"snn.attention: {name} has shape {tuple(t.shape)}; q, k, v are (batch, heads, "
                "seq, head_dim) as in F.scaled_dot_product_attention (transpose(1, 2) a "
                "(batch, seq, heads, head_dim) tensor)."
            )
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise LayoutError(
            f"snn.attention: q has {q.shape[1]} heads, k {k.shape[1]}, v {v.shape[1]}; k and v "
            "have kv_heads heads, and kv_heads must divide heads (grouped-query attention)."
        )
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    active = _active_for((q, k, v), "snn.attention")
    scheme = active[0] if active is not None else None
    if scheme is not None and scheme.attention == "ring":
        from ._ring import ring_attention

        q = with_layout(q, _scheme_layout(scheme, "act_layout", Q_DIMS))
        k = with_layout(k, _scheme_layout(scheme, "act_layout", KV_DIMS))
        v = with_layout(v, _scheme_layout(scheme, "act_layout", KV_DIMS))
        return ring_attention(
            q, k, v, axis=scheme.attention_axis, causal=causal, positions=positions
        )
    with_mask = causal and positions is not None
    if scheme is None:
        mask = _causal_mask(positions) if with_mask else None
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and not with_mask, **gqa
        )
    q_at = _scheme_layout(scheme, "act_layout", Q_DIMS)
    kv_at = _scheme_layout(scheme, "act_layout", KV_DIMS)
    back = None
    if scheme.attention == "ulysses":
        back = q_at
        q_at, kv_at = (
            _heads_split(q_at, scheme.attention_axis),
            _heads_split(kv_at, scheme.attention_axis),
        )
    q, k, v = with_layout(q, q_at), with_layout(k, kv_at), with_layout(v, kv_at)
    mask = None
    if with_mask:
        if isinstance(positions, ShardedTensor):  # split like q's batch, whole along seq
            batch = (q_at.dims[0],) if positions.ndim == 2 else ()
            positions = with_layout(positions, Layout(batch + ((),)))
        mask = _causal_mask(positions)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and not with_mask, **gqa
    )
    return out if back is None else with_layout(out, back)


# == parameters ================================================================
def _flatten(tree: Any, keys: tuple[Any, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf) of a pytree of dicts, lists and tuples."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, keys + (k,))
    elif isinstance(tree, list | tuple) and not isinstance(tree, torch.Tensor):
        for n, v in enumerate(tree):
            yield from _flatten(v, keys + (n,))
    else:
        yield ".".join(map(str, keys)), tree


def _is_dims(d: Any) -> bool:
    return isinstance(d, tuple | list) and all(isinstance(n, str) or n is None for n in d)


def _lookup_dims(dims: Any, path: str) -> tuple[Any, ...] | None:
    """`path`'s logical dims in `dims`: walked like the params, or a flat dotted key."""
    if isinstance(dims, Mapping):
        try:
            d = dims[path]
            if _is_dims(d):
                return tuple(d)
        except (KeyError, IndexError, TypeError):
            pass
    node = dims
    for key in path.split(".") if path else ():
        try:
            if isinstance(node, Mapping):
                node = node[key] if key in node else node[int(key)]
            elif isinstance(node, list | tuple) and not _is_dims(node):
                node = node[int(key)]
            else:
                return None
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return tuple(node) if _is_dims(node) else None


def _rebuild(tree: Any, leaves: Iterator[Any]) -> Any:
    if isinstance(tree, Mapping):
        return {k: _rebuild(v, leaves) for k, v in tree.items()}
    if isinstance(tree, list | tuple) and not isinstance(tree, torch.Tensor):
        return type(tree)(_rebuild(v, leaves) for v in tree)
    return next(leaves)


def shard_params(params: Any, mesh: Any, scheme: Scheme, dims: Any) -> Any:
    """A pytree of plain tensors -> the same pytree of ShardedTensors in storage layouts.

    Each param's layout is ``scheme.param_layout(dims[path])``; `dims` is a
    matching pytree, or a mapping keyed by dotted paths (``"layers.0.wq"``,
    e.g. ``gpt.DIMS``). The new tensors keep `requires_grad` and have their
    logical dims recorded (`recorded_dims`) for `linear`. Non-tensor leaves
    pass through. Every param without dims or with dims of the wrong rank is
    named in one error.

    Examples:
        >>> import shardlib as sl, torch
        >>> from shardlib import nn as snn
        >>> mesh = sl.Mesh.simulated({"tp": 2})
        >>> p = snn.shard_params({"w": torch.ones(4, 6)}, mesh, snn.tp1d("tp"), {"w": ("embed", "mlp")})
        >>> p["w"].spec
        P(None, 'tp')
    """
    check_mesh(scheme, mesh, "snn.shard_params(params, mesh, scheme, dims)")
    leaves = list(_flatten(params))
    problems, out = [], []
    for path, p in leaves:
        if not isinstance(p, torch.Tensor):
            out.append(p)
            continue
        if isinstance(p, ShardedTensor):
            problems.append(f"{path!r} is already sharded ({p.spec!r}); pass plain tensors")
            continue
        d = _lookup_dims(dims, path)
        if d is None:
            problems.append(
                f"{path!r} (shape {tuple(p.shape)}) has no logical dims; add "
                f"dims[{path!r}] = (...), one name per dim"
            )
            continue
        if len(d) != p.ndim:
            problems.append(
                f"{path!r} has shape {tuple(p.shape)} ({p.ndim} dims) but its dims {d!r} name "
                f"{len(d)}; give one logical name per dim"
            )
            continue
        layout = scheme.param_layout(d)
        t = shard(p.detach(), mesh, layout)
        if p.requires_grad:
            t.requires_grad_(True)
        out.append(record_dims(t, d))
    if problems:
        raise LayoutError(
            f"snn.shard_params(..., scheme={scheme!r}): " + "; ".join(problems) + ". The known "
            f"logical names are {', '.join(scheme.known_dims)}."
        )
    return _rebuild(params, iter(out))


# == torch.compile (h9g) ========================================================
def _compiled_as_one_node(fn: Any) -> Any:
    """`fn`, which dynamo puts in its graph as one node (run by AOTAutograd, not traced).

    The node also takes the active scheme's key (`_use_key`), which dynamo guards on.
    """

    def node(use_key: str, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    node.__name__ = node.__qualname__ = f"snn_{fn.__name__}"
    in_graph(node)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            return node(_USE_KEY, *args, **kwargs)
        return fn(*args, **kwargs)

    return call


constrain = _compiled_as_one_node(constrain)
linear = _compiled_as_one_node(linear)
attention = _compiled_as_one_node(attention)
# -- end torch.compile --
