"""Sharding an existing model's parameters by name: `shard_by_name`.

Owns one call for models shardlib did not write (transformers' GPT-2, Llama,
any `torch.nn.Module`): layouts given as ``{glob pattern: layout}`` over the
parameter names of ``module.named_parameters()``, the first matching pattern
winning, every unmatched parameter replicated. The result feeds
``torch.func.functional_call(module, params, args)``, which runs the module's
own code on the sharded tensors; each op then follows its rule. It does not
own the layouts of activations (they follow from the ops) nor any scheme
(`snn.tp1d` and friends are for `snn.gpt`-style code that names its dims).

Invariants: every pattern matches at least one name (a typo is an error, not
a silently replicated weight); a layout has one entry per dim of the tensor it
is given to; the results are fresh leaves (``requires_grad`` as asked), never
views of the module's own tensors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch

from .._errors import LayoutError
from ..layouts._layout import Layout
from ..ops._api import shard
from ..ops._tensor import ShardedTensor

__all__ = ["shard_by_name"]


def shard_by_name(
    params: Mapping[str, torch.Tensor] | torch.nn.Module,
    mesh,
    layouts: Mapping[str, Layout],
    *,
    requires_grad: bool = True,
) -> dict[str, ShardedTensor]:
    """Shard named parameters: the first glob pattern of `layouts` that matches a name wins.

    Args:
        params: a name -> tensor mapping, or a module (its ``named_parameters()``).
        mesh: the `sl.Mesh`.
        layouts: ``{pattern: layout}``, patterns in `fnmatch` syntax (``*`` spans
            dots: ``"*.c_attn.weight"`` matches every layer's). Unmatched
            parameters are replicated.
        requires_grad: whether the results are leaves that take gradients.

    Returns:
        ``{name: ShardedTensor}`` in the order of `params`.

    Raises:
        LayoutError: a pattern matches no parameter (listing the names), or a
            layout's length differs from its parameter's ndim.

    Examples:
        >>> import shardlib as sl, torch
        >>> from shardlib import nn as snn
        >>> mesh = sl.Mesh.simulated({"tp": 2})
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
        >>> column, row = {"0.weight": sl.P("tp", None), "0.bias": sl.P("tp")}, {"1.weight": sl.P(None, "tp")}
        >>> ps = snn.shard_by_name(model, mesh, {**column, **row})
        >>> {k: v.spec for k, v in ps.items()}
        {'0.weight': P('tp', None), '0.bias': P('tp'), '1.weight': P(None, 'tp'), '1.bias': P(None)}
        >>> snn.shard_by_name(model, mesh, {"*.c_fc.weight": sl.P(None, "tp")})
        Traceback (most recent call last):
        ...
        shardlib._errors.LayoutError: snn.shard_by_name(layouts=...): pattern(s) '*.c_fc.weight' match no parameter name; ...
    """
    named = dict(params.named_parameters() if isinstance(params, torch.nn.Module) else params)
    unused = [p for p in layouts if not any(fnmatch.fnmatchcase(n, p) for n in named)]
    if unused:
        shown = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
        raise LayoutError(
            f"snn.shard_by_name(layouts=...): pattern(s) {', '.join(map(repr, unused))} match no "
            f"parameter name; every pattern must match one. The names are: {shown}. Fix the "
            "pattern (fnmatch syntax, e.g. '*.attn.c_attn.weight') or drop it."
        )
    out = {}
    for name, value in named.items():
        layout = _layout_of(name, value, layouts)
        tensor = shard(value.detach(), mesh, layout)
        out[name] = tensor.requires_grad_(requires_grad)
    return out


def _layout_of(name: str, value: torch.Tensor, layouts: Mapping[str, Layout]) -> Layout:
    """The first matching pattern's layout (checked against the tensor), else replicated."""
    for pattern, layout in layouts.items():
        if fnmatch.fnmatchcase(name, pattern):
            if len(layout.dims) != value.dim():
                raise LayoutError(
                    f"snn.shard_by_name: pattern {pattern!r} gives {name} (shape "
                    f"{tuple(value.shape)}) the layout {layout!r} with {len(layout.dims)} entries; "
                    f"it needs {value.dim()}, one per dim. Fix the layout, or make the pattern "
                    "more specific so it does not match this parameter."
                )
            return layout
    return Layout(((),) * value.dim())
