"""Layouts: how a tensor's dims are split over mesh axes, and where it is partial.

Owns `Layout` and its builder `P`. A layout is pure data: it knows nothing of
shapes or devices (see `_shard.py` for the arithmetic) and is validated
against a mesh and a tensor rank only when used with them (`check`).

Invariants (enforced in `__post_init__`):
- `dims[d]` is a tuple of axis names, major -> minor; `()` means not split.
- a mesh axis appears at most once across all dims and `partial`;
- `partial` is sorted (the set of axes over which the value is a reduction's
  operand), `reduce_op` is one of `sum`, `avg`, `max`, `min`, and is `"sum"`
  when nothing is partial, so equal placements compare equal.

Printing: one notation. `str` and `repr` are both the `P(...)` call that
builds the layout (``P('dp', None)``, ``P(None, partial={'tp': 'max'})``), so
what `print`, error messages, `sl.plan`, `sl.explain` and the README show
pastes back as code: ``eval(str(layout), {"P": sl.P}) == layout``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import LayoutError
from ._mesh import AbstractMesh

__all__ = ["REDUCE_OPS", "Layout", "P"]

REDUCE_OPS = ("sum", "avg", "max", "min")


def _spec_entry(entry: Any, d: int) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, tuple | list) and all(isinstance(a, str) for a in entry):
        return tuple(entry)
    raise LayoutError(
        f"P(...): entry {d} is {entry!r}; each entry is None, an axis name, or a tuple "
        'of axis names (major -> minor), e.g. P("dp", None) or P(("dp", "tp"), None).'
    )


def _partial_arg(partial: Any) -> tuple[tuple[str, ...], str]:
    if partial is None:
        return (), "sum"
    if isinstance(partial, str):
        return (partial,), "sum"
    if isinstance(partial, Mapping):
        ops = set(partial.values())
        bad = sorted(str(o) for o in ops if o not in REDUCE_OPS)
        if bad:
            raise LayoutError(
                f"P(partial={dict(partial)!r}): unknown reduce op {', '.join(bad)}; "
                f"use one of {', '.join(REDUCE_OPS)}."
            )
        if len(ops) > 1:
            raise LayoutError(
                f"P(partial={dict(partial)!r}): all partial axes of one layout share one "
                "reduce op (max over one axis then sum over another is not sum then max). "
                "Reduce one of them first with sl.reshard, or use a single op."
            )
        return tuple(partial), (ops.pop() if ops else "sum")
    if isinstance(partial, tuple | list | set | frozenset) and all(
        isinstance(a, str) for a in partial
    ):
        return tuple(partial), "sum"
    raise LayoutError(
        f"P(partial={partial!r}): partial takes an axis name, a tuple of names (all 'sum'), "
        'or a dict such as {"tp": "max"}.'
    )


@dataclass(frozen=True, slots=True, eq=False)
class Layout:
    """Placement of a tensor over a mesh: per-dim split axes plus partial axes.

    Build with `P`. Mesh axes used by no dim and not partial are replicated.

    Examples:
        >>> from shardlib import P
        >>> P("dp", None, "tp")
        P('dp', None, 'tp')
        >>> P("x", None) == P(("x",), None)
        True
        >>> print(P(("dp", "tp"), None, partial={"sp": "max"}))
        P(('dp', 'tp'), None, partial={'sp': 'max'})
    """

    dims: tuple[tuple[str, ...], ...]
    partial: tuple[str, ...] = ()
    reduce_op: str = "sum"
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __hash__(self) -> int:  # layouts key plans and dispatch decisions: hash once
        return self._hash

    def __reduce__(self) -> tuple:
        # rebuilt, not copied: the cached hash of strings differs between processes
        return (type(self), (self.dims, self.partial, self.reduce_op))

    def __eq__(self, other: object) -> bool:
        # the hot path compares layouts per op: identity first, then the cached hash
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        return (
            self._hash == other._hash
            and self.dims == other.dims
            and self.partial == other.partial
            and self.reduce_op == other.reduce_op
        )

    def __post_init__(self) -> None:
        dims = tuple(tuple(d) for d in self.dims)
        partial = tuple(sorted(self.partial))
        op = self.reduce_op if partial else "sum"
        if op not in REDUCE_OPS:
            raise LayoutError(
                f"Layout: unknown reduce op {op!r}; use one of {', '.join(REDUCE_OPS)}."
            )
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "partial", partial)
        object.__setattr__(self, "reduce_op", op)
        object.__setattr__(self, "_hash", hash((dims, partial, op)))
        seen: dict[str, str] = {}
        twice = []
        for d, axes in enumerate(dims):
            for a in axes:
                if a in seen:
                    twice.append(f"{a!r} ({seen[a]} and dim {d})")
                seen[a] = f"dim {d}"
        for a in partial:
            if a in seen:
                twice.append(f"{a!r} ({seen[a]} and partial)")
            seen[a] = "partial"
        if twice:
            raise LayoutError(
                f"{self!r}: a mesh axis appears at most once in a layout, but "
                f"{', '.join(twice)} repeat. Split a dim over several axes with a tuple, "
                'e.g. P(("dp", "tp"), None).'
            )

    # -- queries ---------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.dims)

    @property
    def used_axes(self) -> frozenset[str]:
        return frozenset(a for axes in self.dims for a in axes) | frozenset(self.partial)

    def replicated_axes(self, mesh: AbstractMesh) -> tuple[str, ...]:
        used = self.used_axes
        return tuple(a for a in mesh.axis_names if a not in used)

    def dim_of(self, axis: str) -> int | None:
        for d, axes in enumerate(self.dims):
            if axis in axes:
                return d
        return None

    @property
    def is_replicated(self) -> bool:
        return not self.partial and not any(self.dims)

    # -- derived layouts -------------------------------------------------------
    def without_partial(self) -> Layout:
        return Layout(self.dims)

    def with_dim(self, d: int, axes: Iterable[str]) -> Layout:
        dims = list(self.dims)
        dims[d] = tuple(axes)
        return Layout(tuple(dims), self.partial, self.reduce_op)

    def with_partial(self, axes: Iterable[str], op: str | None = None) -> Layout:
        return Layout(self.dims, tuple(axes), op or self.reduce_op)

    # -- validation ------------------------------------------------------------
    def check(self, mesh: AbstractMesh, ndim: int, where: str = "layout") -> Layout:
        """This layout for `mesh` and a rank-`ndim` tensor, or a `LayoutError`.

        As in JAX, a spec shorter than the rank leaves the trailing dims unsplit
        (``P()`` is replicated for any rank, ``P("x")`` on a matrix is
        ``P("x", None)``): the padded layout is returned. A longer spec raises.
        """
        problems = []
        unknown = sorted(a for a in self.used_axes if a not in mesh.axis_names)
        if unknown:
            problems.append(
                f"unknown mesh axis {', '.join(map(repr, unknown))} (the mesh has "
                f"{dict(zip(mesh.axis_names, mesh.shape))!r})"
            )
        if self.ndim > ndim:
            fix = (
                f"did you mean P({', '.join(['None'] * ndim)})?"
                if ndim and not any(self.dims)
                else "give at most one entry per tensor dim"
            )
            if ndim == 0:
                fix = "a 0-d tensor takes P() (optionally with partial=)"
            problems.append(f"it has {self.ndim} entries for a {ndim}-d tensor ({fix})")
        if problems:
            raise LayoutError(f"{where}: {self!r} does not fit: " + "; ".join(problems) + ".")
        if self.ndim < ndim:
            return Layout(self.dims + ((),) * (ndim - self.ndim), self.partial, self.reduce_op)
        return self

    # -- printing --------------------------------------------------------------
    def __repr__(self) -> str:
        parts = []
        for axes in self.dims:
            if not axes:
                parts.append("None")
            elif len(axes) == 1:
                parts.append(repr(axes[0]))
            else:
                parts.append("(" + ", ".join(map(repr, axes)) + ")")
        if self.partial:
            if self.reduce_op != "sum":
                p = "{" + ", ".join(f"{a!r}: {self.reduce_op!r}" for a in self.partial) + "}"
            elif len(self.partial) == 1:
                p = repr(self.partial[0])
            else:
                p = "(" + ", ".join(map(repr, self.partial)) + ")"
            parts.append(f"partial={p}")
        return f"P({', '.join(parts)})"

    __str__ = __repr__  # one notation everywhere (module docstring)


def P(*spec: Any, partial: Any = None) -> Layout:
    """Build a `Layout`: one entry per tensor dim, plus the partial axes.

    Args:
        *spec: per tensor dim, `None` (not split), an axis name, or a tuple of
            axis names (split over all of them, major -> minor, flat chunking).
        partial: an axis name, a tuple of names (reduce op `sum`), or a dict
            `{axis: op}` with op in `sum`, `avg`, `max`, `min` (one op for all).

    Examples:
        >>> from shardlib import P
        >>> P("dp", None, partial="tp")
        P('dp', None, partial='tp')
        >>> P(None, partial={"tp": "max"}).reduce_op
        'max'
    """
    dims = tuple(_spec_entry(e, d) for d, e in enumerate(spec))
    axes, op = _partial_arg(partial)
    return Layout(dims, axes, op)
