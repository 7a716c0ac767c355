"""Torch's aliasing semantics on sharded tensors: views, writes through them, partial families.

Owns what makes ``v = x[2:5]; v.mul_(0)`` and ``v = x.view(-1); x.add_(1)`` behave as they do
on plain tensors, whatever the layouts:

- **Alias views.** A view op whose per-device results are views of the input's shards (no
  communication was needed) is a true alias: it joins the input's *storage family*, whose
  root tensor is ``v._root``. Writes through any member land in the shared storage.
- **Linked copies.** A view op that needed communication (a slice across a split dim, a
  reshape that gathered) returns shards of its own. Its family root carries a `_Link` to the
  base it was taken from: reading a member after the base changed recomputes the view
  (*refresh*), and writing a member writes the new values back into the base (*write-back*,
  a local scatter after the copy is brought to the base's partial axes). So no write is lost
  and no read is stale; both are collectives in the ledger, with causes
  ``"refresh:<op>"`` and ``"write-back:<op>"``.
- **Partial families.** An in-place op on a partial value that needs the value (``relu_``,
  ``clamp_``) reduces the family in place first: the shards are all-reduced into their own
  storage, and the root and every live alias view drop the partial axes from their layouts.
  The global value is unchanged; the ledger shows the reduction.

Deliberately not here: which layouts an op needs (the rules) and running ops (`_dispatch`).

Invariants:
- ``t._root`` is None for a tensor that is its own family root and has no link; an alias
  view's ``_root`` is its family root; a linked root's ``_root`` is itself. So the hot path
  only has to test ``a._root is not None``.
- A family's *stamp* (its write count and its shards' version counters) changes whenever any
  member's storage is written; a link remembers the base family's stamp it last agreed with.
- No ShardedTensor is referenced weakly (``torch.utils.swap_tensors``, which
  ``Module._apply`` uses to convert sharded parameters, refuses such a tensor): a root's
  ``_views`` and a base's ``_linked`` are lists of weak references to the members' records
  (`_tensor.Record`), which reach the members' attributes. Members reference their root
  (``_root``) and base (``_link.base``) strongly and nothing references them back
  strongly, so a dropped alias view or root is freed by reference counting. (A linked
  copy is its own ``_root``: a cycle, freed by the garbage collector.)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import AliasError
from ..layouts._layout import Layout
from ..layouts._shard import local_bounds
from ._tensor import ShardedTensor, record_of

__all__ = [
    "after_write",
    "check_overlap",
    "drop_partial",
    "family_root",
    "link_view",
    "rebind_data",
    "reduce_in_place",
    "sync",
]


def _shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether `view` is a view of `base`'s storage (an empty `view` always is)."""
    try:
        same = view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    except RuntimeError:  # (h9g) traced (fake, functional) shards have no data: same storage?
        same = torch._C._is_alias_of(view, base)
    return same or view.numel() == 0


def _stamp(root: ShardedTensor) -> tuple:
    """Changes whenever the family's storage is written (by dispatch, or by torch on the shards)."""
    try:
        return (root._writes, *(s._version for s in root._shards))
    except RuntimeError:  # inference tensors keep no version counter: dispatch writes still count
        return (root._writes,)


def _family_root(t: ShardedTensor) -> ShardedTensor:
    return t._root if t._root is not None else t


@dataclass(eq=False)
class _Link:
    """How a linked copy was taken from its base: ``func(base, *args, **kwargs)[index]``."""

    base: ShardedTensor
    func: Any
    args: tuple  # the op's arguments with the base at position 0
    kwargs: dict
    index: int | None  # which output of a multi-output view (split, unbind)
    stamp: tuple
    coords: torch.Tensor | None = field(
        default=None
    )  # (base.ndim, numel) base position of each element

    def base_coords(self) -> torch.Tensor:
        """For each element of the view (flat, row-major), its coordinates in the base."""
        if self.coords is None:
            base = self.base
            flat = torch.arange(base.numel(), dtype=torch.int64).view(tuple(base.shape))
            if self.func in _MATH_BIT_VIEWS:  # h9e: conj / neg views keep every position
                out = flat
            else:
                out = self.func(flat, *self.args[1:], **self.kwargs)
            if self.index is not None:
                out = out[self.index]
            self.coords = torch.stack(torch.unravel_index(out.reshape(-1), tuple(base.shape)))
        return self.coords


# -- h9e (issue 9): the lazy conjugate / negative views are linked copies computed eagerly
# (`_spectral.py`: shards never carry a lazy bit); a write through one writes back the
# conjugate / negation of the written values, at the same positions.
_MATH_BIT_VIEWS = {
    torch.ops.aten._conj.default: torch.ops.aten.conj_physical.default,
    torch.ops.aten._neg_view.default: torch.ops.aten.neg.default,
}
# -- end h9e


def _op_name(func: Any) -> str:
    return str(func).removeprefix("aten.")


# == creating views ============================================================
def link_view(func: Any, args: tuple, kwargs: dict, base: ShardedTensor, out: Any, moved: bool):
    """Make the outputs of view op `func` on `base` aliases of it, or linked copies."""
    many = isinstance(out, (list, tuple))  # (a tuple of types: faster than list | tuple)
    root = base._root if base._root is not None else base
    for i, o in enumerate(out if many else (out,)):
        if not isinstance(o, ShardedTensor):
            continue
        if not moved and all(map(_shares_storage, o._shards, base._shards)):
            o._root = root
            views = root._views  # `_register(root, "_views", o)`, inlined: the view hot path
            if views is None:
                root._views = [_weakref(record_of(o))]
            else:
                views.append(_weakref(record_of(o)))
                if len(views) >= 64 and len(views) & (len(views) - 1) == 0:
                    views[:] = [r for r in views if r() is not None]
        else:
            o._root = o
            index = i if many else None
            o._link = _Link(
                base, func, tuple(args), dict(kwargs), index, _stamp(_family_root(base))
            )
            _register(base, "_linked", o)


_weakref = weakref.ref


def _register(owner: ShardedTensor, name: str, member: ShardedTensor) -> None:
    """Remember `member` weakly on `owner` (a family's alias views; copies linked to a base).

    A list of weak references to the members' records (cheap on the view hot path),
    pruned of dead ones whenever it doubles. So ``owner._views`` / ``owner._linked`` is
    truthy while it has members (or had them, until the next pruning).
    """
    refs = getattr(owner, name)
    if refs is None:
        setattr(owner, name, [weakref.ref(record_of(member))])
        return
    refs.append(weakref.ref(record_of(member)))
    if len(refs) >= 64 and len(refs) & (len(refs) - 1) == 0:
        refs[:] = [r for r in refs if r() is not None]


def _unregister(owner: ShardedTensor, name: str, member: ShardedTensor) -> None:
    """Forget `member` on `owner` (and the dead members)."""
    record = record_of(member)
    live = [r for r in getattr(owner, name) or () if r() not in (None, record)]
    setattr(owner, name, live or None)


def _members(refs: list | None) -> list[dict[str, Any]]:
    """The attributes (``__dict__``) of the live members of a registry made by `_register`."""
    return [m.attrs for m in (r() for r in refs or ()) if m is not None]


def rebind_data(t: ShardedTensor, value: ShardedTensor) -> None:
    """``t.data = value``: t takes value's storage; t's old views keep the old storage.

    As in torch, views taken from t before the assignment still see (and write) t's old
    storage: that storage moves to a new hidden tensor, which inherits t's family role
    (its alias views, the copies linked to it, its own link), and t joins value's family.
    """
    old = ShardedTensor(
        t._shards, t._mesh, t._layout, tuple(t.shape), False, t.stride(), t.storage_offset()
    )
    if t._root is None or t._root is t:  # t was a family root: its views now belong to `old`
        old._link, old._views, old._writes = t._link, t._views, t._writes
        old._root = old if old._link is not None else None
        for v in _members(old._views):
            v["_root"] = old
        if old._link is not None:  # t was a linked copy: `old` is linked to the base instead
            _unregister(old._link.base, "_linked", t)
            _register(old._link.base, "_linked", old)
    else:  # t was an alias view: `old` takes its place in that family
        old._root = t._root
        _unregister(t._root, "_views", t)
        _register(old._root, "_views", old)
    for c in _members(t._linked):
        link = c.get("_link")
        if link is not None and link.base is t:
            link.base = old
    old._linked = t._linked
    root = _family_root(value)
    t._shards, t._mesh, t._layout, t._sig = list(value._shards), value._mesh, value._layout, None
    t._link = t._views = t._linked = None
    t._writes = 0
    t._root = root
    _register(root, "_views", t)


# == reading: refresh ==========================================================
def sync(t: ShardedTensor) -> None:
    """Bring `t`'s family up to date with the base it was copied from (no-op for aliases)."""
    root = t._root
    if root is None or root._link is None:
        return
    link = root._link
    base = link.base
    sync(base)
    stamp = _stamp(_family_root(base))
    if stamp == link.stamp:
        return
    from ._dispatch import cause_prefix, move

    with torch.no_grad(), cause_prefix("refresh:"):
        fresh = link.func(base, *link.args[1:], **link.kwargs)
        if link.index is not None:
            fresh = fresh[link.index]
        if fresh._layout != root._layout:
            fresh = move(link.func, fresh, root._layout)
        for s, new in zip(root._shards, fresh._shards):
            _overwrite(s, new)
    link.stamp = _stamp(_family_root(base))


def _overwrite(shard: torch.Tensor, new: torch.Tensor) -> None:
    """Copy `new` into `shard`; an expanded shard (stride 0) is written once per element."""
    for d in range(shard.ndim):
        if shard.stride(d) == 0 and shard.shape[d] > 1:  # equal along d in both: write one
            shard, new = shard.narrow(d, 0, 1), new.narrow(d, 0, 1)
    if torch._debug_has_internal_overlap(shard) == 1:
        raise AliasError(
            "refreshing a view whose base changed: its blocks overlap in memory and cannot be "
            "rewritten. Take the view again after changing its base, or .clone() it to keep a "
            "copy."
        )
    shard.copy_(new)


# == writing: write-back =======================================================
def after_write(t: ShardedTensor) -> None:
    """Record a write to `t`'s family and write it back into the base it was copied from."""
    root = _family_root(t)
    root._writes += 1
    if root._link is not None:
        _write_back(root)


def _write_back(root: ShardedTensor) -> None:
    link = root._link
    base = link.base
    # Elements of an expanded view share base positions; only same-value writes (fill_,
    # zero_) get here with one (check_overlap refuses the others), so any of them may land.
    from ._capture import unrecorded
    from ._dispatch import cause_prefix, move

    am = base._mesh.abstract
    shape = tuple(base.shape)
    with unrecorded():  # positions only (shapes, layouts): constants of a captured program
        coords = link.base_coords()
        where = []
        for dev in base._mesh.local_devices:
            bounds = local_bounds(shape, base._layout, am, dev)
            lo = torch.tensor([lo for lo, _ in bounds], dtype=torch.int64).unsqueeze(1)
            hi = torch.tensor([hi for _, hi in bounds], dtype=torch.int64).unsqueeze(1)
            inside = ((coords >= lo) & (coords < hi)).all(0) if coords.numel() else None
            hit = inside is not None and bool(inside.any())
            where.append((inside, coords[:, inside] - lo) if hit else None)

    # Every device needs the view's values at the positions it holds: all of the view, with
    # the base's partial axes (each device scatters its summand into its own summand).
    want = Layout(((),) * root.ndim, base._layout.partial, base._layout.reduce_op)
    src = root
    if src._layout != want:
        with cause_prefix("write-back:"):
            src = move(link.func, root, want)
    with torch.no_grad():
        for hit, b, s in zip(where, base._shards, src._shards):
            if hit is None:
                continue
            inside, local = hit
            values = s.reshape(-1)[inside]
            if link.func in _MATH_BIT_VIEWS:  # h9e: conj / neg are their own inverses
                values = _MATH_BIT_VIEWS[link.func](values)
            b.index_put_(tuple(local), values.to(b.dtype))
    base_root = _family_root(base)
    base_root._writes += 1
    link.stamp = _stamp(base_root)
    if base_root._link is not None:
        _write_back(base_root)


# == partial families ==========================================================
def reduce_in_place(t: ShardedTensor, func: Any) -> None:
    """Reduce `t`'s partial family in place: same global value, partial axes dropped.

    The all-reduce is in the ledger with `func` as cause; strict mode refuses it.
    """
    from ._dispatch import move

    root = _family_root(t)
    sync(root)
    target = root._layout.without_partial()
    reduced = move(func, root, target)
    with torch.no_grad():
        for s, new in zip(root._shards, reduced._shards):
            s.copy_(new)
    drop_partial(root)


def family_root(t: ShardedTensor) -> ShardedTensor:
    """The root of `t`'s storage family (`t` itself when it is not an alias view)."""
    return _family_root(t)


def drop_partial(root: ShardedTensor) -> None:
    """After `root`'s shards were reduced in place: it and its live alias views drop partial axes."""
    root._views = [r for r in root._views or () if r() is not None] or None  # pruned
    for m in (root.__dict__, *_members(root._views)):
        if m["_layout"].partial:
            m["_layout"], m["_sig"] = m["_layout"].without_partial(), None


# == overlap checks ============================================================
# torch refuses in-place writes whose target has internally overlapping memory (an expanded
# view), or whose operand partially overlaps the target. Shards are separate tensors, so the
# check is made on the global geometry (sizes, strides, offset) that every ShardedTensor
# reports, within one storage: the family root reached by following links to the base.
def _storage(t: ShardedTensor) -> ShardedTensor:
    root = _family_root(t)
    while root._link is not None:
        root = _family_root(root._link.base)
    return root


def _dense(t: torch.Tensor) -> bool:
    expected = 1
    for st, n in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if st != expected:
            return False
        expected *= n
    return True


def _partially_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch's MemOverlapStatus::Partial for two dense views of one storage."""
    if a.numel() == 0 or b.numel() == 0 or not (_dense(a) and _dense(b)):
        return False  # no overlap, or torch's "too hard" (it does not refuse those)
    a0, b0 = a.storage_offset(), b.storage_offset()
    a1, b1 = a0 + a.numel(), b0 + b.numel()
    if (a0, a1) == (b0, b1):
        return a.stride() != b.stride()
    return a0 < b1 and b0 < a1


# writes of one value everywhere: torch allows them on expanded views (every alias of an
# element gets the same value)
_SAME_VALUE_WRITES = {
    torch.ops.aten.fill_.Scalar,
    torch.ops.aten.fill_.Tensor,
    torch.ops.aten.zero_.default,
}


def check_overlap(func: Any, target: ShardedTensor, operands: list) -> None:
    """Raise as torch does for an in-place write to `target` with these operands."""
    expanded = any(st == 0 and n > 1 for n, st in zip(target.shape, target.stride()))
    if expanded and target.numel() and not _dense(target) and func not in _SAME_VALUE_WRITES:
        raise AliasError(
            f"{_op_name(func)}: unsupported operation: more than one element of the "
            "written-to tensor refers to a single memory location (it is an expanded "
            "view). Please clone() the tensor before performing the operation."
        )
    storage = None
    for b in operands:
        if (
            not isinstance(b, ShardedTensor)
            or b is target
            or (b._root is None and target._root is None)
        ):
            continue
        if storage is None:
            storage = _storage(target)
        if _storage(b) is storage and _partially_overlap(target, b):
            raise AliasError(
                f"{_op_name(func)}: unsupported operation: some elements of the input tensor "
                "and the written-to tensor refer to a single memory location. Please clone() "
                "the tensor before performing the operation."
            )
