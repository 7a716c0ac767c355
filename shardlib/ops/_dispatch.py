"""Dispatch of aten ops on `ShardedTensor`s: rule lookup, local execution, wrapping.

Owns the handler registry (`register`) and the error for ops without a rule.
For now it carries the ops autograd itself issues on sharded tensors (detach,
alias, *_like, add/add_ of equal layouts, copy_, clone, dtype casts); the
rule families of DESIGN §6 register into the same table as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._errors import LayoutError, MeshMismatchError, NoRuleError
from ._tensor import ShardedTensor

__all__ = ["dispatch", "register"]

aten = torch.ops.aten
Handler = Callable[[Any, tuple, dict], Any]
_HANDLERS: dict[Any, Handler] = {}


def register(*ops: Any) -> Callable[[Handler], Handler]:
    """Register `handler(func, args, kwargs)` for the given aten overloads."""

    def deco(fn: Handler) -> Handler:
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return deco


def dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    handler = _HANDLERS.get(func)
    if handler is None:
        raise NoRuleError(_no_rule_message(func, args, kwargs))
    return handler(func, args, kwargs)


def _no_rule_message(func: Any, args: tuple, kwargs: dict) -> str:
    layouts = [
        f"{a._layout!r} {tuple(a.shape)}"
        for a in (*args, *kwargs.values())
        if isinstance(a, ShardedTensor)
    ]
    return (
        f"shardlib has no layout rule for {func} (inputs: {', '.join(layouts) or 'none sharded'}). "
        "Fixes: compute on the global value with x.full(), or on local blocks with "
        "x.local_shards() / sl.from_local; to teach shardlib the op, register a handler with "
        "shardlib.ops.register(torch.ops.aten.<op>.<overload>) that maps input layouts to "
        "output layouts."
    )


def _sharded(args: tuple, kwargs: dict) -> list[ShardedTensor]:
    found = [a for a in (*args, *kwargs.values()) if isinstance(a, ShardedTensor)]
    meshes = {a._mesh for a in found}
    if len(meshes) > 1:
        raise MeshMismatchError(
            "tensors on unequal meshes were combined: "
            + ", ".join(f"{a._layout!r} on {a._mesh!r}" for a in found)
            + ". Put them on one mesh (sl.shard / sl.from_local with the same sl.Mesh)."
        )
    return found


def _wrap(shards: list[torch.Tensor], like: ShardedTensor, layout=None) -> ShardedTensor:
    return ShardedTensor(shards, like._mesh, layout or like._layout, tuple(like.shape))


@register(aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default)
def _same_layout_unary(func, args, kwargs):
    x = args[0]
    shards = [func(s, *args[1:], **kwargs) for s in x._shards]
    op = x._layout.reduce_op
    if x._layout.partial and not _cast_commutes(op, x.dtype, shards[0].dtype):
        raise LayoutError(
            f"{func}: casting a partial-{op} tensor {x._layout!r} from {x.dtype} to "
            f"{shards[0].dtype} is wrong summand by summand (the cast of a {op} is not the "
            f"{op} of the casts, e.g. int(0.5) + int(0.5) != int(1.0)); reduce first with "
            f"sl.reshard(x, {x._layout.without_partial()!r}), then cast."
        )
    return _wrap(shards, x)


def _cast_commutes(op: str, src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting every summand, then reducing with `op`, equals reducing, then casting."""
    if src == dst:
        return True
    src_float = src.is_floating_point or src.is_complex
    dst_float = dst.is_floating_point or dst.is_complex
    if op in ("sum", "avg"):
        # Linear casts only: into a float (up to rounding), or integer -> integer (modular).
        # A bool partial sum reduces as logical or, which no cast preserves.
        return src != torch.bool and (dst_float or (not src_float and dst != torch.bool))
    # max / min commute with monotone casts: into a float, float -> int (truncation), from bool.
    return dst != torch.bool and (dst_float or src_float or src == torch.bool)


@register(
    aten.ones_like.default,
    aten.zeros_like.default,
    aten.empty_like.default,
    aten.full_like.default,
)
def _like(func, args, kwargs):
    x = args[0]
    # The result is a fresh global value, replicated over the partial axes.
    return _wrap([func(s, *args[1:], **kwargs) for s in x._shards], x, x._layout.without_partial())


def _check_same_layout(func, a: Any, b: Any) -> None:
    _sharded((a, b), {})
    if not isinstance(b, ShardedTensor) or not isinstance(a, ShardedTensor):
        raise NoRuleError(
            f"{func}: mixing a ShardedTensor with a {type(b if isinstance(a, ShardedTensor) else a).__name__} "
            "has no rule yet; sl.shard the other operand with the same layout first."
        )
    if a.shape != b.shape:
        # Broadcasting would run per shard, where the blocks of a size-1 dim and of a
        # size-n dim do not line up, and the result would keep `a`'s global shape.
        raise NoRuleError(
            f"{func}: operands have shapes {tuple(a.shape)} and {tuple(b.shape)}; broadcasting "
            "sharded tensors has no rule yet. Fix: shard both operands at one global shape, "
            "e.g. sl.shard(t.expand(shape).contiguous(), mesh, layout) for the smaller one."
        )
    if a._layout != b._layout:
        raise NoRuleError(
            f"{func}: operands have layouts {a._layout!r} and {b._layout!r}; only equal layouts "
            f"are supported so far. Fix: sl.reshard(other, {a._layout!r}) first."
        )
    if (
        a._layout.partial
        and a._layout.reduce_op in ("max", "min")
        and func is not aten.copy_.default
    ):
        raise LayoutError(
            f"{func}: adding two partial-{a._layout.reduce_op} tensors is not their "
            f"{a._layout.reduce_op} of sums; reduce first with sl.reshard(x, "
            f"{a._layout.without_partial()!r})."
        )


@register(aten.add.Tensor, aten.add_.Tensor)
def _add(func, args, kwargs):
    a, b = args[0], args[1]
    _check_same_layout(func, a, b)
    shards = [func(x, y, *args[2:], **kwargs) for x, y in zip(a._shards, b._shards)]
    return a if func is aten.add_.Tensor else _wrap(shards, a)


@register(aten.copy_.default)
def _copy(func, args, kwargs):
    dst, src = args[0], args[1]
    _check_same_layout(func, dst, src)
    for x, y in zip(dst._shards, src._shards):
        x.copy_(y, *args[2:], **kwargs)
    return dst
