"""Functional optimizers over pytrees of ShardedTensors and plain tensors (DESIGN §9).

Owns Optax's shape: a `GradientTransformation` is a pair of pure functions
``init(params) -> state`` and ``update(grads, state, params) -> (updates,
state)``; `chain` composes them; `apply_updates` adds updates to parameters
(Optax's sign convention: updates are *added*). Building blocks
(`scale_by_adam`, `trace`, `add_decayed_weights`, `scale_by_learning_rate`,
`scale`, `identity`, `clip_by_global_norm`) and the optimizers `sgd`, `adam`,
`adamw` made of them. A learning rate is a number or a schedule ``count ->
lr`` (`shardlib/optim/_schedules.py`), called with the number of updates done
before this one.

It does not own ZeRO (`_zero.py`: which layouts gradients, states and
parameters live in), mixed precision (`_precision.py`) or checkpoints.

How an update runs (the hot path): the trees are flattened, every leaf's
gradient, state and parameter are checked to share mesh, layout and global
shape, and the local blocks of *all* leaves on *all* this process's devices
are gathered into flat lists of plain tensors; each step of the math is then
one ``torch._foreach_*`` call over those lists (plain tensors in the same
lists), and the outputs are rebuilt as ShardedTensors with the leaves'
layouts. No op goes through ShardedTensor dispatch, and no update
communicates -- except `clip_by_global_norm`, whose global norm is exactly one
all-reduce per mesh for the whole tree (ledger cause
``"clip_by_global_norm"``). Adam's arithmetic is torch.optim.AdamW's: its fused
kernel (``torch._fused_adamw_``, one pass over parameter, gradient and both
moments) on contiguous float32/float64 blocks, its foreach sequence on the rest.

Buffer donation (JAX's ``donate_argnums``): `donate` marks a tree's tensors as
given up by the caller. `update` then writes the new state into the donated
state's buffers, `apply_updates` adds into donated parameters, and `step` (update
and apply in one call, fused for adam/adamw and a `chain` ending in one) does
both, so a donated AdamW step allocates nothing parameter-sized (torch's AdamW
allocates one buffer). The results are new tensor objects over the donated
storage with the same values a call without donation gives; a donated tensor
that was written is *consumed*: passing it to `sl.optim` again raises
`OptimError`, its autograd version counter is bumped (a pending backward through
it fails), and reading it elsewhere shows the new values. Transformations
declare a fused step by an attribute ``update._step(grads, state, params) ->
(params, state)`` on their update function; `chain` forwards its last one's.

Invariants:

- An update is local: `sl.comm_ledger()` records nothing for it. A gradient
  (or parameter) in another layout than its state is moved to the state's
  layout only when that move is communication-free (a local slice: ZeRO
  stage 1's full gradient L against state in L+dp); any other mismatch raises
  `LayoutError`.
- A *partial* gradient raises `LayoutError`: its value is the sum over devices,
  which a local update cannot see. Finish it first -- ``z.reduce(grads)`` with
  ``z = sl.optim.zero(stage)`` (one collective per layout group) or
  ``sl.reshard(g, g.spec.without_partial())`` -- so the communication is
  explicit and chosen by the planner (a reduce-scatter where the state is
  split, an all-reduce where it is not).
- Every output is a new tensor object with ``requires_grad=False`` (except
  `apply_updates` and `step`, whose new parameters keep their parameter's
  ``requires_grad`` and recorded dims so ``loss.backward()`` loops work).
  Inputs are never written unless donated, and then only the donated trees'
  buffers (state in `update`, params in `apply_updates`, both in `step`), each
  buffer at most once. Runs under ``torch.no_grad()``.
- A leaf that is None in every tree (params, grads, state) stays None (no
  parameter there); None beside a tensor raises, naming the key.
- A state's ``count`` is a Python int (no device sync to read it for a
  schedule or a bias correction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from .._errors import LayoutError, MeshMismatchError, ShardlibError
from .._format import dtype_name
from ..collectives._redistribute import execute
from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ..layouts._planner import AllReduce, Plan, PlanStep, plan, step_bytes
from ..ops._tensor import ShardedTensor

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "OptimError",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "donate",
    "global_norm",
    "identity",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "sgd",
    "step",
    "trace",
]

Schedule = Callable[[int], float]
ScalarOrSchedule = float | Schedule


# == types =======================================================================
class OptimError(ShardlibError, ValueError):
    """A bad argument to an optimizer, schedule or transformation (not a layout problem)."""


class GradientTransformation(NamedTuple):
    """A pair of pure functions (Optax's): ``init(params) -> state`` and
    ``update(grads, state, params=None) -> (updates, new_state)``.

    Examples:
        >>> import shardlib as sl, torch
        >>> tx = sl.optim.sgd(0.25)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> sl.optim.apply_updates(params, updates)["w"].tolist()
        [0.75, 0.75]
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


class TraceState(NamedTuple):
    """`trace`'s state: ``trace``, a tree like params (each leaf its parameter's layout, shape, dtype)."""

    trace: Any


class ScaleByAdamState(NamedTuple):
    """Adam's state: ``count`` (int, updates done), ``mu`` and ``nu`` (first and second
    moments, trees like params: each leaf in its parameter's layout, shape and dtype)."""

    count: int
    mu: Any
    nu: Any


class ScaleByScheduleState(NamedTuple):
    """A schedule's state: ``count`` (int), the number of updates done."""

    count: int


# == leaves and local blocks =====================================================
_Template = tuple[Mesh, Layout, tuple[int, ...]] | str
_ABSENT = "absent"  # the template of a leaf that is None in every tree (no parameter there)


def _describe(x: Any) -> str:
    if isinstance(x, ShardedTensor):
        return f"a ShardedTensor {tuple(x.shape)} {x._layout!r} on {x._mesh!r}"
    if isinstance(x, torch.Tensor):
        return f"a plain tensor {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _keys(tree: Any) -> dict[str, Any]:
    return {pytree.keystr(p): leaf for p, leaf in pytree.tree_flatten_with_path(tree)[0]}


def _structure_error(where: str, ref_name: str, ref: Any, name: str, other: Any) -> LayoutError:
    """Name the keys where `other`'s tree differs from `ref`'s."""
    a, b = _keys(ref), _keys(other)
    missing = [k for k in a if k not in b]
    extra = [k for k in b if k not in a]
    parts = []
    if missing:
        parts.append(
            f"missing from {name}: {', '.join(missing[:6])}" + (" ..." * (len(missing) > 6))
        )
    if extra:
        parts.append(
            f"in {name} but not in {ref_name}: {', '.join(extra[:6])}" + (" ..." * (len(extra) > 6))
        )
    if not parts:
        parts.append(
            f"same keys but different containers ({pytree.tree_structure(other)} vs "
            f"{pytree.tree_structure(ref)})"
        )
    return LayoutError(
        f"{where}: the {name} tree does not have the {ref_name} tree's structure; "
        + "; ".join(parts)
        + f". Every tree an update takes has one leaf per parameter, under the same keys. Fix: "
        f"build {name} from the same params dict (grads of every parameter, a zeros_like where "
        f"one has no gradient; state from tx.init(params))."
    )


# A donated tensor carries this attribute: True while donated, then the name of the call
# that wrote its buffer (consumed). Set by `donate`, read by `_Leaves`.
_MARK = "_sl_donated"


def _consumed_error(where: str, key: str, by: str) -> OptimError:
    return OptimError(
        f"{where}: {key} was donated (sl.optim.donate) and consumed by {by}, which wrote its "
        "result into that tensor's buffer; the tensor no longer holds the value it had. "
        "A donated tensor is used once. Fix: use the tree that call returned (e.g. "
        "`updates, state = tx.update(grads, sl.optim.donate(state), params)` rebinds state, "
        "`params = sl.optim.apply_updates(sl.optim.donate(params), updates)` rebinds params), "
        "or do not donate what you read again."
    )


def _donation_marks(
    where: str, trees: dict[str, Any], ref: str, order: Sequence[str], leaves: dict[str, list]
) -> dict[str, set[int]]:
    """Per tree, the leaves marked donated; a consumed leaf anywhere raises."""
    marked: dict[str, set[int]] = {}
    for name in order:
        for i, x in enumerate(leaves[name]):
            mark = getattr(x, _MARK, None)
            if mark is None:
                continue
            if mark is True:
                marked.setdefault(name, set()).add(i)
                continue
            path = pytree.tree_flatten_with_path(trees[ref])[0][i][0]
            raise _consumed_error(where, f"{name}{pytree.keystr(path)}", mark)
    return marked


def _own_pointers(x: Any, blocks: Sequence[torch.Tensor], seen: set[int]) -> list[int] | None:
    """The data pointers of a donated leaf's `blocks` if they may be written in place (see
    `_Leaves.writable`), else None."""
    if type(x) is ShardedTensor and x._root is not None and x._root._link is not None:
        return None  # a linked copy: its values must be written back to its base
    ptrs: list[int] = []
    for b in blocks:
        if not b.is_contiguous():
            return None
        if b.numel():
            ptr = b.data_ptr()
            if ptr in seen or ptr in ptrs:
                return None
            ptrs.append(ptr)
    return ptrs


class _Leaves:
    """Aligned leaves of several trees of one structure, unpacked to local blocks.

    ``blocks[name]`` is the flat list of plain tensors of tree `name`: leaf-major,
    then this process's devices in flat order (one entry for a plain leaf).
    `rebuild(flat)` turns a flat list of that shape back into a tree like the
    reference, each leaf with its template's mesh, layout and shape.
    """

    __slots__ = ("spec", "templates", "blocks", "where", "leaves", "marked", "moved", "written")

    def __init__(
        self,
        where: str,
        trees: dict[str, Any],
        ref: str,
        order: Sequence[str],
        structure: Any = None,
    ) -> None:
        self.where = where
        leaves: dict[str, list] = {}
        ref_leaves, spec = pytree.tree_flatten(trees[ref])
        # params, compared but not read (a transformation that does not use them)
        if structure is not None and pytree.tree_structure(structure) != spec:
            raise _structure_error(where, "params", structure, ref, trees[ref])
        for name in order:
            if name == ref:
                leaves[name] = ref_leaves
                continue
            ls, s = pytree.tree_flatten(trees[name])
            if s != spec:
                raise _structure_error(where, ref, trees[ref], name, trees[name])
            leaves[name] = ls
        self.spec = spec
        self.leaves = leaves
        self.marked = _donation_marks(where, trees, ref, order, leaves)
        self.moved: set[tuple[str, int]] = set()
        self.written: list[tuple[str, int]] = []
        self.templates: list[_Template | None] = []
        columns = [leaves[name] for name in order]
        blocks: list[list[torch.Tensor]] = [[] for _ in order]
        bad: list[str] = []
        for i in range(len(ref_leaves)):
            column = [c[i] for c in columns]
            first = column[0]
            if type(first) is ShardedTensor and not first._layout.partial:
                # the hot path: every entry a ShardedTensor on one mesh, one layout, one shape
                mesh, layout, shape = first._mesh, first._layout, first.shape
                for x in column:
                    if (
                        type(x) is not ShardedTensor
                        or (x._mesh is not mesh and x._mesh != mesh)
                        or (x._layout is not layout and x._layout != layout)
                        or x.shape != shape
                        or x._root is not None
                    ):
                        break
                else:
                    self.templates.append((mesh, layout, tuple(shape)))
                    for b, x in zip(blocks, column):
                        b.extend(x._shards)
                    continue
            template = self._template(i, order, column, trees, ref, bad)
            self.templates.append(template)
            if template is _ABSENT:
                continue
            if template is None:
                for b, x in zip(blocks, column):
                    b.append(x)
                continue
            layout = template[1]
            target = next(n for n, x in zip(order, column) if isinstance(x, ShardedTensor))
            for name, b, x in zip(order, blocks, column):
                if x._layout != layout:
                    x = self._moved(x, layout, (name, target), i, trees, ref, bad)
                    if x is None:
                        continue
                    self.moved.add((name, i))
                if x._root is not None:
                    x.local_shards()  # brings a linked copy up to date
                b.extend(x._shards)
        if bad:
            raise _bad_error(where, bad)
        self.blocks = dict(zip(order, blocks))

    def _key(self, trees: dict, ref: str, name: str, i: int) -> str:
        paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(trees[ref])[0]]
        return f"{name}{paths[i]}"

    def _template(
        self, i: int, order: Sequence[str], column: list, trees: dict, ref: str, bad: list
    ) -> _Template | None:
        if all(x is None for x in column):
            return _ABSENT
        sharded = [x for x in column if isinstance(x, ShardedTensor)]
        if not sharded:
            for name, x in zip(order, column):
                if not isinstance(x, torch.Tensor):
                    raise LayoutError(
                        f"{self.where}: {self._key(trees, ref, name, i)} is {_describe(x)}; every "
                        "leaf of params, grads and state is a tensor (a ShardedTensor or a plain "
                        "torch.Tensor), or None in every tree. Fix: give every parameter a "
                        "gradient (torch.zeros_like(p) where it has none), or keep non-tensor "
                        "entries out of what the optimizer sees."
                    )
            return None
        first = sharded[0]
        mesh, shape = first._mesh, tuple(first.shape)
        # the target layout: the first sharded entry in `order` (state before params before grads)
        layout = first._layout.without_partial()
        for name, x in zip(order, column):
            if not isinstance(x, ShardedTensor):
                raise LayoutError(
                    f"{self.where}: {self._key(trees, ref, name, i)} is {_describe(x)} but "
                    f"{_describe(first)} stands beside it; a parameter's gradient, state and "
                    "value are all sharded (on one mesh) or all plain. Fix: sl.shard the plain "
                    "one like the others (sl.shard(t, mesh, layout)), or rebuild the state with "
                    "tx.init(params)."
                )
            if x._mesh != mesh:
                k0 = self._key(
                    trees, ref, order[[isinstance(c, ShardedTensor) for c in column].index(True)], i
                )
                raise MeshMismatchError(
                    f"{self.where}: {self._key(trees, ref, name, i)} is on {x._mesh!r} but "
                    f"{k0} is on {mesh!r}; a parameter, its gradient and its optimizer state "
                    "live on one mesh. Fix: build the state on the parameters' mesh "
                    "(state = tx.init(params)), or move a saved state there with "
                    "sl.checkpoint.load(path, like=tx.init(params))."
                )
            if tuple(x.shape) != shape:
                raise LayoutError(
                    f"{self.where}: {self._key(trees, ref, name, i)} has global shape "
                    f"{tuple(x.shape)} but its parameter's is {shape}. Fix: pass gradients and "
                    "state of the same parameters (state = tx.init(params))."
                )
            if x._layout.partial:
                bad.append(f"{self._key(trees, ref, name, i)} {x._layout!r}")
        return mesh, layout, shape

    def _moved(
        self,
        x: ShardedTensor,
        layout: Layout,
        names: tuple[str, str],
        i: int,
        trees: dict,
        ref: str,
        bad: list,
    ) -> ShardedTensor | None:
        """`x` moved to `layout` (that of the entry named ``names[1]``) if that is free."""
        name, target = names
        if x._layout.partial:
            return None  # reported by _bad_error
        p = plan(x._layout, layout, tuple(x.shape), x._mesh, x.dtype)
        am = x._mesh.abstract
        if all(not s.step.kind or am.group_size(s.step.axes) == 1 for s in p.steps):
            from ..ops._api import _reshard_impl

            return _reshard_impl(x, layout, self.where, "forward")  # a local slice: no collective
        steps = ", ".join(str(s.step) for s in p.steps)
        raise LayoutError(
            f"{self.where}: {self._key(trees, ref, name, i)} has layout {x._layout!r} but "
            f"{self._key(trees, ref, target, i)} is in {layout!r}; moving it needs communication "
            f"({steps}) and an update is local. Fix: sl.reshard it to {layout!r} first (for "
            "ZeRO: grads = z.reduce(grads), and pass z.state(params) as params), or build the "
            "state from params in the gradients' layouts (tx.init(params))."
        )

    def writable(self, name: str, always: bool = False) -> list[torch.Tensor] | None:
        """Blocks of tree `name` that an in-place computation may write: a donated leaf's own
        blocks (recorded in `written`; `consume` marks it afterwards), a contiguous copy of
        every other leaf's. None when no leaf of `name` is donated, unless `always`.

        A donated leaf is written only if its blocks are its own storage: not a copy this
        call made to move it (a layout slice), not a linked copy (shardlib/ops/_aliasing.py:
        writing one would skip its write-back), contiguous, and no block already taken in
        this call (a tensor passed twice, tied weights, is written once and copied for its
        second entry). A plain leaf's block is a detached alias, so the result is a new
        tensor object.
        """
        marked = self.marked.get(name)
        if not marked and not always:
            return None
        blocks, column = self.blocks[name], self.leaves[name]
        out: list[torch.Tensor] = []
        seen: set[int] = set()
        o = 0
        for i, t in enumerate(self.templates):
            if t is _ABSENT:
                continue
            n = 1 if t is None else len(t[0].local_devices)
            own = blocks[o : o + n]
            x = column[i]
            ptrs = None
            if marked and i in marked and (name, i) not in self.moved:
                ptrs = _own_pointers(x, own, seen)
            if ptrs is not None:
                seen.update(ptrs)
                self.written.append((name, i))
                out.extend(own if t is not None else [x.detach()])
            else:
                out.extend(b.clone(memory_format=torch.contiguous_format) for b in own)
            o += n
        return out

    def consume(self, where: str) -> None:
        """Mark every donated leaf this call wrote as consumed (by `where`) and bump its
        autograd version (and its alias family root's), so reusing it fails loudly."""
        for name, i in self.written:
            x = self.leaves[name][i]
            setattr(x, _MARK, where)
            if isinstance(x, ShardedTensor):
                torch.autograd.graph.increment_version(x)
                if x._root is not None and x._root is not x:
                    torch.autograd.graph.increment_version(x._root)
        self.written = []

    def rebuild(
        self, flat: Sequence[torch.Tensor], requires_grad: Sequence[bool] | None = None
    ) -> Any:
        out, o = [], 0
        for i, t in enumerate(self.templates):
            rg = bool(requires_grad[i]) if requires_grad is not None else False
            if t is _ABSENT:
                out.append(None)
                continue
            if t is None:
                x = flat[o]
                if rg:
                    x.requires_grad_(True)
                out.append(x)
                o += 1
                continue
            mesh, layout, shape = t
            n = len(mesh.local_devices)
            out.append(ShardedTensor(list(flat[o : o + n]), mesh, layout, shape, rg))
            o += n
        return pytree.tree_unflatten(out, self.spec)


def _bad_error(where: str, bad: list[str]) -> LayoutError:
    return LayoutError(
        f"{where}: partial inputs ({'; '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}). A "
        "partial gradient's value is the sum over devices, which a local update cannot see, and "
        "an update does not communicate. Fix: finish the gradients first with "
        "grads = sl.optim.zero(stage, axis).reduce(grads) (one collective per layout group; "
        "stage 0 all-reduces), or sl.reshard(g, g.spec.without_partial()) per gradient."
    )


def _leaves(where: str, structure: Any = None, **trees: Any) -> _Leaves:
    """Leaves of `trees`, given in priority order (states, then params, then grads).

    ``params`` (else ``grads``) is the reference for structure and error keys; the
    target layout of each leaf is that of the first sharded entry in the order given,
    without partial axes. `structure` (the params, where a transformation does not read
    them) is only checked to have the reference's tree structure.
    """
    names = list(trees)
    ref = "params" if "params" in trees else "grads" if "grads" in trees else names[-1]
    return _Leaves(where, trees, ref, names, structure)


def _learning_rate(lr: ScalarOrSchedule, count: int) -> float:
    return float(lr(count)) if callable(lr) else float(lr)


def _zeros_like_tree(params: Any) -> Any:
    def zeros(p: Any) -> Any:
        if p is None:
            return None
        if isinstance(p, ShardedTensor):
            return ShardedTensor(
                [torch.zeros_like(s) for s in p.local_shards()],
                p._mesh,
                p._layout.without_partial(),
                tuple(p.shape),
            )
        if isinstance(p, torch.Tensor):
            return torch.zeros_like(p, requires_grad=False).detach()
        raise LayoutError(
            f"tx.init(params): a leaf is {_describe(p)}; every parameter is a tensor. Fix: keep "
            "non-tensor entries out of the params tree."
        )

    with torch.no_grad():
        return pytree.tree_map(zeros, params)


def _need_params(where: str, params: Any) -> None:
    if params is None:
        raise OptimError(
            f"{where}: needs params (update(grads, state, params)); got None. Fix: pass the "
            "current parameters (for ZeRO: z.state(params))."
        )


# == building blocks ============================================================
def identity() -> GradientTransformation:
    """Updates are the gradients (no state).

    Examples:
        >>> import shardlib as sl, torch
        >>> sl.optim.identity().update({"w": torch.ones(1)}, sl.optim.EmptyState())[0]["w"].tolist()
        [1.0]
    """

    def init(params: Any) -> EmptyState:
        return EmptyState()

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        return grads, state

    return GradientTransformation(init, update)


def scale(step_size: float) -> GradientTransformation:
    """``updates = step_size * grads``.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> g = {"w": sl.shard(torch.ones(3), mesh, sl.P("x"))}
        >>> u, _ = sl.optim.scale(-2.0).update(g, sl.optim.EmptyState())
        >>> u["w"].spec, u["w"].full().tolist()
        (P('x'), [-2.0, -2.0, -2.0])
    """
    where = f"sl.optim.scale({step_size!r}).update"

    def init(params: Any) -> EmptyState:
        return EmptyState()

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        lv = _leaves(where, params, grads=grads)
        with torch.no_grad():
            out = torch._foreach_mul(lv.blocks["grads"], float(step_size))
        return lv.rebuild(out), state

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """``updates = -lr * grads`` (``+lr`` with ``flip_sign=False``); `learning_rate` a number
    or a schedule ``count -> lr`` (state `ScaleByScheduleState` then).

    Examples:
        >>> import shardlib as sl, torch
        >>> tx = sl.optim.scale_by_learning_rate(lambda count: 0.5 * (count + 1))
        >>> state = tx.init({"w": torch.ones(1)})
        >>> u, state = tx.update({"w": torch.ones(1)}, state)
        >>> u, state = tx.update({"w": torch.ones(1)}, state)
        >>> u["w"].tolist(), state.count
        ([-1.0], 2)
    """
    where = "sl.optim.scale_by_learning_rate(...).update"
    sign = -1.0 if flip_sign else 1.0

    def init(params: Any) -> Any:
        return ScaleByScheduleState(0) if callable(learning_rate) else EmptyState()

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        count = state.count if callable(learning_rate) else 0
        lr = _learning_rate(learning_rate, count)
        lv = _leaves(where, params, grads=grads)
        with torch.no_grad():
            out = torch._foreach_mul(lv.blocks["grads"], sign * lr)
        new = ScaleByScheduleState(count + 1) if callable(learning_rate) else state
        return lv.rebuild(out), new

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float = 0.0) -> GradientTransformation:
    """``updates = grads + weight_decay * params`` (decoupled weight decay, before the
    learning rate scales it).

    Examples:
        >>> import shardlib as sl, torch
        >>> tx = sl.optim.add_decayed_weights(0.5)
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(None), {"w": torch.full((1,), 4.0)})
        >>> u["w"].tolist()
        [3.0]
    """
    where = f"sl.optim.add_decayed_weights({weight_decay!r}).update"

    def init(params: Any) -> EmptyState:
        return EmptyState()

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        _need_params(where, params)
        lv = _leaves(where, params=params, grads=grads)
        with torch.no_grad():
            out = torch._foreach_add(lv.blocks["grads"], lv.blocks["params"], alpha=weight_decay)
        return lv.rebuild(out), state

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``t = grads + decay * t``; ``updates = t`` (``grads + decay * t`` with
    nesterov). Equal to torch.optim.SGD's buffer with dampening 0.

    Examples:
        >>> import shardlib as sl, torch
        >>> tx = sl.optim.trace(0.5)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> _, state = tx.update({"w": torch.ones(1)}, state)
        >>> u, state = tx.update({"w": torch.ones(1)}, state)
        >>> u["w"].tolist()
        [1.5]
    """
    where = f"sl.optim.trace({decay!r}, nesterov={nesterov}).update"

    def init(params: Any) -> TraceState:
        return TraceState(_zeros_like_tree(params))

    def update(grads: Any, state: TraceState, params: Any = None) -> tuple[Any, TraceState]:
        lv = _leaves(where, params, trace=state.trace, grads=grads)
        g, t = lv.blocks["grads"], lv.blocks["trace"]
        with torch.no_grad():
            new_t = lv.writable("trace")
            if new_t is None:
                new_t = torch._foreach_add(g, t, alpha=decay)
            else:  # donated: torch.optim.SGD's buf.mul_(momentum).add_(grad)
                torch._foreach_mul_(new_t, decay)
                torch._foreach_add_(new_t, g)
            out = torch._foreach_add(g, new_t, alpha=decay) if nesterov else new_t
        lv.consume(where)
        new_trace = lv.rebuild(new_t)
        return (lv.rebuild(out) if nesterov else new_trace), TraceState(new_trace)

    return GradientTransformation(init, update)


_FUSED_DTYPES = (torch.float32, torch.float64)


def _adam_kernel(
    target: list[torch.Tensor],
    g: list[torch.Tensor],
    mu: list[torch.Tensor],
    nu: list[torch.Tensor],
    t: int,
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """torch.optim.AdamW's step ``t`` in place on flat blocks (``target`` in the role of the
    parameter, `g` already in the moments' dtype):

    ``mu = lerp(mu, g, 1-b1)``, ``nu = b2 nu + (1-b2) g^2``, ``target = target (1 - lr wd)
    - lr/bc1 * mu / (sqrt(nu)/sqrt(bc2) + eps)`` (bc_i = 1 - b_i^t). Its fused CPU/CUDA
    kernel ``torch._fused_adamw_`` (one pass, no temporary) runs on each (device, dtype)
    group of contiguous float32/float64 blocks -- the arithmetic of
    ``torch.optim.AdamW(fused=True)``; the other blocks (16-bit, strided, other devices)
    take its foreach sequence (``foreach=True``; one temporary, the denominator).

    On CUDA, float32 groups run shardlib's own fused kernel instead (``adamw_flat``,
    `shardlib.cuda._adamw.adamw_flat_cuda`: the same arithmetic in one pass, one launch per
    block) when `shardlib.cuda.available()` -- the ``shardlib[cuda]`` extra, a driver and a
    GPU; otherwise torch's. CPU blocks never take it.
    """
    groups: dict[tuple, list[int]] = {}
    rest: list[int] = []
    for k, (a, gk, m, v) in enumerate(zip(target, g, mu, nu)):
        dtype, device = m.dtype, m.device
        if (
            dtype in _FUSED_DTYPES
            and a.dtype == dtype
            and v.dtype == dtype
            and gk.dtype == dtype
            and device.type in ("cpu", "cuda")
            and a.device == device
            and v.device == device
            and gk.device == device
            and a.is_contiguous()
            and m.is_contiguous()
            and v.is_contiguous()
        ):
            groups.setdefault((device, dtype), []).append(k)
        else:
            rest.append(k)
    for (device, dtype), idx in groups.items():
        if device.type == "cuda" and dtype == torch.float32 and _cuda_adamw_available():
            from ..cuda import _adamw  # the cuda layer: imported only on CUDA

            for k in idx:
                _adamw.adamw_flat_cuda(
                    target[k],
                    g[k].contiguous(),
                    mu[k],
                    nu[k],
                    lr=lr,
                    step=t,
                    b1=b1,
                    b2=b2,
                    eps=eps,
                    weight_decay=weight_decay,
                )
            continue
        step_t = torch.full((), float(t), dtype=torch.float32, device=device)
        torch._fused_adamw_(
            [target[k] for k in idx],
            [g[k].contiguous() for k in idx],
            [mu[k] for k in idx],
            [nu[k] for k in idx],
            [],
            [step_t] * len(idx),
            lr=lr,
            beta1=b1,
            beta2=b2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
    if rest:
        a, gr, m, v = ([x[k] for k in rest] for x in (target, g, mu, nu))
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        if weight_decay:
            torch._foreach_mul_(a, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(m, gr, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, gr, gr, value=1.0 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2**0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(a, m, denom, value=-lr / bc1)


def _cuda_adamw_available() -> bool:
    """Whether shardlib's fused AdamW kernel can run (`shardlib.cuda.available()`)."""
    from ..cuda import _launch

    return _launch.available()


def _adam_grads(lv: _Leaves) -> list[torch.Tensor]:
    """The gradient blocks in the moments' dtype (a 16-bit gradient against fp32 state)."""
    g, mu = lv.blocks["grads"], lv.blocks["mu"]
    if any(a.dtype != b.dtype for a, b in zip(g, mu)):
        g = [a.to(b.dtype) if a.dtype != b.dtype else a for a, b in zip(g, mu)]
    return g


def _moments(lv: _Leaves) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """mu and nu blocks to write: the donated ones themselves, copies of the others."""
    return lv.writable("mu", always=True), lv.writable("nu", always=True)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction: ``mu_hat / (sqrt(nu_hat) + eps)`` with bias-corrected moments
    (torch.optim.Adam's arithmetic). State `ScaleByAdamState`.

    Examples:
        >>> import shardlib as sl, torch
        >>> tx = sl.optim.scale_by_adam()
        >>> u, state = tx.update({"w": torch.full((1,), 3.0)}, tx.init({"w": torch.zeros(1)}))
        >>> round(u["w"].item(), 6), state.count
        (1.0, 1)
    """
    where = "sl.optim.scale_by_adam(...).update"

    def init(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(0, _zeros_like_tree(params), _zeros_like_tree(params))

    def update(grads: Any, state: ScaleByAdamState, params: Any = None) -> tuple[Any, Any]:
        lv = _leaves(where, params, mu=state.mu, nu=state.nu, grads=grads)
        with torch.no_grad():
            g = _adam_grads(lv)
            new_mu, new_nu = _moments(lv)
            # AdamW's step on a zero "parameter" with learning rate -1 leaves the direction
            out = [torch.zeros_like(m) for m in new_mu]
            _adam_kernel(out, g, new_mu, new_nu, state.count + 1, -1.0, b1, b2, eps, 0.0)
        lv.consume(where)
        new = ScaleByAdamState(state.count + 1, lv.rebuild(new_mu), lv.rebuild(new_nu))
        return lv.rebuild(out), new

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply `transforms` in order, each to the previous one's updates; the state is the
    tuple of their states.

    Examples:
        >>> import shardlib as sl, torch
        >>> tx = sl.optim.chain(sl.optim.clip_by_global_norm(1.0), sl.optim.sgd(1.0))
        >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init({"w": torch.zeros(2)}))
        >>> [round(v, 4) for v in u["w"].tolist()]
        [-0.6, -0.8]
    """
    for k, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise OptimError(
                f"sl.optim.chain(...): argument {k} is a {type(t).__name__}, not a "
                "GradientTransformation. Fix: pass transformations such as sl.optim.adamw(1e-3), "
                "not their results or states."
            )

    def init(params: Any) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Any, state: tuple, params: Any = None) -> tuple[Any, tuple]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise OptimError(
                f"sl.optim.chain(...).update: state must be the tuple of {len(transforms)} "
                f"states chain's init returns, got {type(state).__name__}"
                + (f" of length {len(state)}" if isinstance(state, tuple) else "")
                + ". Fix: state = tx.init(params) with this same chain."
            )
        new_states = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    last = getattr(transforms[-1].update, "_step", None) if transforms else None
    if last is not None:

        def fused_step(grads: Any, state: tuple, params: Any) -> tuple[Any, tuple]:
            """The transformations but the last, then the last one's fused step."""
            if not isinstance(state, tuple) or len(state) != len(transforms):
                update(grads, state, params)  # raises update's error
            new_states = []
            for t, s in zip(transforms[:-1], state[:-1]):
                grads, s = t.update(grads, s, params)
                new_states.append(s)
            params, s = last(grads, state[-1], params)
            return params, (*new_states, s)

        update._step = fused_step  # type: ignore[attr-defined]  # read by `step`
    return GradientTransformation(init, update)


# == optimizers =================================================================
def sgd(
    learning_rate: ScalarOrSchedule, momentum: float = 0.0, nesterov: bool = False
) -> GradientTransformation:
    """Stochastic gradient descent, torch.optim.SGD's arithmetic (dampening 0).

    ``t = g + momentum * t`` (the first step's ``t`` is ``g``, as torch's buffer);
    ``updates = -lr * t`` (``-lr * (g + momentum * t)`` with nesterov). State:
    ``(TraceState, lr state)`` with momentum, ``(lr state,)`` without.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> params = {"w": sl.shard(torch.ones(3), mesh, sl.P("x"))}
        >>> tx = sl.optim.sgd(0.5, momentum=0.9)
        >>> state = tx.init(params)
        >>> grads = {"w": sl.shard(torch.tensor([2.0, 0.0, -2.0]), mesh, sl.P("x"))}
        >>> updates, state = tx.update(grads, state, params)
        >>> sl.optim.apply_updates(params, updates)["w"].full().tolist()
        [0.0, 1.0, 2.0]
    """
    if nesterov and not momentum:
        raise OptimError(
            f"sl.optim.sgd(learning_rate={learning_rate!r}, momentum={momentum!r}, "
            "nesterov=True): Nesterov momentum needs a momentum > 0. Fix: pass momentum=0.9 "
            "(for example), or nesterov=False."
        )
    if momentum:
        return chain(trace(momentum, nesterov), scale_by_learning_rate(learning_rate))
    return chain(scale_by_learning_rate(learning_rate))


def _adam_like(
    name: str,
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
) -> GradientTransformation:
    """Adam (and AdamW's decoupled decay) as one transformation: torch.optim.AdamW's
    step (`_adam_kernel`) with the learning rate and decay folded in. `update` runs it
    on an updates buffer that starts as ``-lr * wd * params`` (zeros without decay);
    the fused `step` runs it on the parameters themselves."""
    where = f"sl.optim.{name}(...).update"
    step_where = f"sl.optim.step(sl.optim.{name}(...), ...)"

    def init(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(0, _zeros_like_tree(params), _zeros_like_tree(params))

    def check_state(state: Any, at: str) -> None:
        if not isinstance(state, ScaleByAdamState):
            raise OptimError(
                f"{at}: state must be the ScaleByAdamState its init returns, got "
                f"{type(state).__name__}. Fix: state = tx.init(params) with this optimizer."
            )

    def update(grads: Any, state: ScaleByAdamState, params: Any = None) -> tuple[Any, Any]:
        check_state(state, where)
        if weight_decay:
            _need_params(where, params)
            lv = _leaves(where, mu=state.mu, nu=state.nu, params=params, grads=grads)
        else:
            lv = _leaves(where, params, mu=state.mu, nu=state.nu, grads=grads)
        lr = _learning_rate(learning_rate, state.count)
        with torch.no_grad():
            g = _adam_grads(lv)
            new_mu, new_nu = _moments(lv)
            if weight_decay:
                # updates = -lr * (mu_hat / (sqrt(nu_hat) + eps) + wd * p): torch.optim.AdamW's
                # p * (1 - lr * wd) followed by its Adam step, as a difference
                p = lv.blocks["params"]
                p = [a if a.dtype == m.dtype else a.to(m.dtype) for a, m in zip(p, new_mu)]
                out = torch._foreach_mul(p, -lr * weight_decay)
            else:
                out = [torch.zeros_like(m) for m in new_mu]
            _adam_kernel(out, g, new_mu, new_nu, state.count + 1, lr, b1, b2, eps, 0.0)
        lv.consume(where)
        new = ScaleByAdamState(state.count + 1, lv.rebuild(new_mu), lv.rebuild(new_nu))
        return lv.rebuild(out), new

    def fused_step(grads: Any, state: ScaleByAdamState, params: Any) -> tuple[Any, Any]:
        """`update` then `apply_updates` as one kernel pass on the parameters (no updates
        tree); `update` + `apply_updates` where a parameter's dtype is not its state's."""
        check_state(state, step_where)
        _need_params(step_where, params)
        lv = _leaves(step_where, mu=state.mu, nu=state.nu, params=params, grads=grads)
        if any(a.dtype != m.dtype for a, m in zip(lv.blocks["params"], lv.blocks["mu"])):
            updates, new = update(grads, state, params)
            return apply_updates(params, updates), new
        lr = _learning_rate(learning_rate, state.count)
        with torch.no_grad():
            g = _adam_grads(lv)
            new_mu, new_nu = _moments(lv)
            new_p = lv.writable("params", always=True)
            _adam_kernel(new_p, g, new_mu, new_nu, state.count + 1, lr, b1, b2, eps, weight_decay)
        lv.consume(step_where)
        leaves = pytree.tree_leaves(params)
        out = lv.rebuild(new_p, [x is not None and x.requires_grad for x in leaves])
        new = ScaleByAdamState(state.count + 1, lv.rebuild(new_mu), lv.rebuild(new_nu))
        return _carry_dims(leaves, out), new

    update._step = fused_step  # type: ignore[attr-defined]  # read by `step`
    return GradientTransformation(init, update)


def adam(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """Adam (Kingma & Ba), torch.optim.Adam's arithmetic; state `ScaleByAdamState`.

    ``mu = b1 mu + (1-b1) g``, ``nu = b2 nu + (1-b2) g^2``, ``updates = -lr *
    mu/(1-b1^t) / (sqrt(nu/(1-b2^t)) + eps)``.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> params = {"w": sl.shard(torch.zeros(3), mesh, sl.P("x"))}
        >>> tx = sl.optim.adam(0.1)
        >>> grads = {"w": sl.shard(torch.tensor([1.0, -2.0, 4.0]), mesh, sl.P("x"))}
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> [round(v, 4) for v in updates["w"].full().tolist()], updates["w"].spec
        ([-0.1, 0.1, -0.1], P('x'))
    """
    return _adam_like("adam", learning_rate, b1, b2, eps, 0.0)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter): Adam plus decoupled decay, torch.optim.AdamW's arithmetic.

    ``updates = -lr * (mu_hat / (sqrt(nu_hat) + eps) + weight_decay * params)``, the same
    as AdamW's ``p *= 1 - lr*wd`` then its Adam step. State `ScaleByAdamState`.

    Kernels: contiguous float32/float64 blocks run torch's fused ``_fused_adamw_``; on CUDA,
    float32 blocks run shardlib's ``adamw_flat`` kernel instead (one pass over parameter,
    gradient and both moments; `shardlib.cuda`) when `shardlib.cuda.available()` is True
    (the ``shardlib[cuda]`` extra, a driver and a GPU). The values agree with
    torch.optim.AdamW to float32 rounding either way; CPU runs never use the CUDA kernel.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> params = {"w": sl.shard(torch.ones(2, 3), mesh, sl.P(None, "x"))}
        >>> tx = sl.optim.adamw(0.1, weight_decay=0.5)
        >>> state = tx.init(params)
        >>> grads = {"w": sl.shard(torch.ones(2, 3), mesh, sl.P(None, "x"))}
        >>> with sl.comm_ledger() as led:
        ...     updates, state = tx.update(grads, state, params)
        >>> round(updates["w"].full()[0, 0].item(), 4), led.count()
        (-0.15, 0)
    """
    return _adam_like("adamw", learning_rate, b1, b2, eps, float(weight_decay))


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf, computed in the promoted dtype and cast back to
    each parameter's dtype (a bf16 parameter takes fp32 updates).

    Local: each update must be in its parameter's layout (or a communication-free slice
    away). The new parameters keep each parameter's ``requires_grad``.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> p = {"w": sl.shard(torch.ones(3, dtype=torch.bfloat16), mesh, sl.P("x"))}
        >>> u = {"w": sl.shard(torch.full((3,), 0.5), mesh, sl.P("x"))}
        >>> new = sl.optim.apply_updates(p, u)
        >>> new["w"].dtype, new["w"].full().tolist()
        (torch.bfloat16, [1.5, 1.5, 1.5])
    """
    where = "sl.optim.apply_updates(params, updates)"
    lv = _leaves(where, params=params, updates=updates)
    p, u = lv.blocks["params"], lv.blocks["updates"]
    with torch.no_grad():
        out = lv.writable("params")
        if out is not None:  # donated: in place (a mixed-dtype add_ rounds once, as below)
            torch._foreach_add_(out, u)
        elif all(a.dtype == b.dtype for a, b in zip(p, u)):
            out = torch._foreach_add(p, u)
        else:
            out = [
                torch.add(a, b) if a.dtype == b.dtype else torch.add(a, b).to(a.dtype)
                for a, b in zip(p, u)
            ]
    lv.consume(where)
    leaves = pytree.tree_leaves(params)
    new = lv.rebuild(out, [x is not None and x.requires_grad for x in leaves])
    return _carry_dims(leaves, new)


def _carry_dims(old_leaves: list[Any], new: Any) -> Any:
    """The logical dims `snn.shard_params` recorded on each old parameter, on its new one
    (`snn.linear` reads them where a model passes no ``w_dims``)."""
    from ..nn._use import record_dims, recorded_dims  # nn stands on optim's layer

    for a, b in zip(old_leaves, pytree.tree_leaves(new)):
        dims = recorded_dims(a) if isinstance(a, torch.Tensor) else None
        if dims is not None:
            record_dims(b, dims)
    return new


# == donation and fused steps ===================================================
def donate(tree: Any) -> Any:
    """Mark every tensor of `tree` as donated and return `tree` (the same objects).

    JAX's ``donate_argnums``: the caller gives the tensors up, so the next `sl.optim` call
    that produces a tensor of the same role may write its result into their buffers --
    `update` into a donated *state* (new moments, momentum), `apply_updates` (and `step`)
    into donated *params*; a donated tree in another role (grads, or params passed to
    `update`) is only read. Results are the values a call without donation returns, as
    new tensor objects (new parameters keep ``requires_grad`` and recorded dims); a
    donated tensor that was written is consumed: `sl.optim` refuses it afterwards
    (`OptimError`), a pending backward through it fails (its version is bumped), and
    other code reading it sees the new values -- drop it. A donated view donates what it
    views (at ZeRO stage 0 ``z.state(params)`` is an alias of ``params``). Tensors that
    cannot be written in place (linked copies, strided blocks, a buffer passed twice)
    are copied as without donation.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> params = {"w": sl.shard(torch.ones(4), mesh, sl.P("x"))}
        >>> tx = sl.optim.adamw(0.1, weight_decay=0.0)
        >>> state = tx.init(params)
        >>> grads = {"w": sl.shard(torch.ones(4), mesh, sl.P("x"))}
        >>> mu = state.mu["w"].local_shards()[0]
        >>> updates, new = tx.update(grads, sl.optim.donate(state), params)
        >>> new.mu["w"].local_shards()[0] is mu, mu.tolist()  # written into the old buffer
        (True, [0.10000000149011612, 0.10000000149011612])
        >>> params = sl.optim.apply_updates(sl.optim.donate(params), updates)
        >>> try:
        ...     tx.update(grads, state, params)  # the old state was consumed
        ... except sl.optim.OptimError as e:
        ...     print(str(e)[28:84])
        mu['w'] was donated (sl.optim.donate) and consumed by sl
    """
    return _mark_donated(tree, "sl.optim.donate(tree)", "tree")


def _mark_donated(tree: Any, where: str, name: str) -> Any:
    leaves = pytree.tree_leaves(tree)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        mark = getattr(leaf, _MARK, None)
        if mark is not None and mark is not True:
            path = pytree.tree_flatten_with_path(tree)[0][i][0]
            raise _consumed_error(where, f"{name}{pytree.keystr(path)}", mark)
        setattr(leaf, _MARK, True)
    return tree


def step(
    tx: GradientTransformation, grads: Any, state: Any, params: Any, *, donate: bool = False
) -> tuple[Any, Any]:
    """One optimizer step: ``updates, state = tx.update(grads, state, params)`` then
    ``params = apply_updates(params, updates)``; returns ``(params, state)``.

    Fused where `tx` provides it (`adam`, `adamw`, a `chain` ending in one): the updates
    are never materialized; AdamW's step runs once over parameters, gradients and moments
    (torch's ``_fused_adamw_`` kernel on float32/float64 blocks, the arithmetic of
    ``torch.optim.AdamW(fused=True)``). Other transformations run as the two calls (the
    same values). ``donate=True`` donates `state` and `params` (see `donate`): the step
    writes into their buffers and allocates nothing parameter-sized; without it nothing
    given is written.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> params = {"w": sl.shard(torch.ones(4), mesh, sl.P("x"))}
        >>> tx = sl.optim.chain(sl.optim.clip_by_global_norm(1.0), sl.optim.adamw(0.1))
        >>> state = tx.init(params)
        >>> grads = {"w": sl.shard(torch.ones(4), mesh, sl.P("x"))}
        >>> params, state = sl.optim.step(tx, grads, state, params, donate=True)
        >>> [round(v, 4) for v in params["w"].full().tolist()], state[1].count
        ([0.9, 0.9, 0.9, 0.9], 1)
    """
    if not isinstance(tx, GradientTransformation):
        raise OptimError(
            f"sl.optim.step(tx={tx!r}, ...): tx must be a GradientTransformation such as "
            "sl.optim.adamw(1e-3), not its update function or state."
        )
    if donate:
        where = "sl.optim.step(tx, grads, state, params, donate=True)"
        _mark_donated(state, where, "state")
        _mark_donated(params, where, "params")
    fused = getattr(tx.update, "_step", None)
    if fused is not None:
        return fused(grads, state, params)
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


# == clipping ===================================================================
def _local_power_sums(blocks: list[torch.Tensor], ord: float) -> list[torch.Tensor]:
    """Per block ``sum |x|^ord`` (``max |x|`` for inf), accumulated in float64 by one
    ``_foreach_norm`` call over all blocks; empty blocks contribute 0."""
    out: list[Any] = [None] * len(blocks)
    idx = []
    for k, b in enumerate(blocks):
        if b.numel() == 0:
            out[k] = torch.zeros((), dtype=torch.float64, device=b.device)
        else:
            idx.append(k)
    if idx:
        norms = torch._foreach_norm([blocks[k] for k in idx], ord, dtype=torch.float64)
        if ord not in (math.inf, 1.0):
            norms = torch._foreach_pow(norms, ord)
        for k, v in zip(idx, norms):
            out[k] = v
    return out


def global_norm(
    updates: Any, norm_type: float = 2.0, *, where: str = "sl.optim.global_norm"
) -> torch.Tensor:
    """The norm of all leaves of `updates` together as one vector (float64 0-d plain tensor,
    the same on every process), each element counted once however many devices hold it.

    One all-reduce per mesh (ledger cause ``"clip_by_global_norm"``) of the stacked
    per-leaf local power sums, over the axes any leaf is split on; a leaf replicated over
    some of those axes contributes on the devices with index 0 along them only (for the
    inf-norm the all-reduce takes the max and every device contributes). Partial leaves
    raise `LayoutError` (reduce them first).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> g = {"a": sl.shard(torch.full((3,), 2.0), mesh, sl.P("x")),
        ...      "b": sl.shard(torch.full((4,), 1.0), mesh, sl.P())}
        >>> sl.optim.global_norm(g).item()
        4.0
    """
    return _global_norm(_leaves(where, grads=updates), float(norm_type))


def _global_norm(lv: _Leaves, ord: float) -> torch.Tensor:
    """`global_norm` of the leaves in `lv` (its ``grads`` blocks)."""
    blocks = lv.blocks["grads"]
    with torch.no_grad():
        sums = _local_power_sums(blocks, ord)
        op = "max" if ord == math.inf else "sum"
        totals: list[torch.Tensor] = []
        by_mesh: dict[Mesh, list[tuple[int, Layout, int]]] = {}  # mesh -> (leaf, layout, offset)
        o = 0
        for i, t in enumerate(lv.templates):
            if t is _ABSENT:
                continue
            if t is None:
                totals.append(sums[o])
                o += 1
                continue
            by_mesh.setdefault(t[0], []).append((i, t[1], o))
            o += len(t[0].local_devices)
        for mesh, members in by_mesh.items():
            am = mesh.abstract
            split = [frozenset(a for d in lay.dims for a in d) for _, lay, _ in members]
            union = tuple(a for a in am.axis_names if any(a in s for s in split))
            vectors = []
            for j, dev in enumerate(mesh.local_devices):
                vals = []
                for (_, _, off), axes in zip(members, split):
                    v = sums[off + j]
                    rest = tuple(a for a in union if a not in axes)
                    if op == "sum" and rest and am.index_along(dev, rest) != 0:
                        v = v * 0.0  # replicated here: counted on index 0 along `rest`
                    vals.append(v)
                vectors.append(torch.stack(vals))
            vec = _all_reduce(mesh, vectors, union, op)[0] if union else vectors[0]
            totals.append(vec.amax() if op == "max" else vec.sum())
        if not totals:
            return torch.zeros((), dtype=torch.float64)
        devs = {t.device for t in totals}
        dev = next(iter(devs))
        total = torch.stack([t.to(dev) for t in totals])
        total = total.amax() if op == "max" else total.sum()
        return total if ord in (math.inf, 1.0) else total ** (1.0 / ord)


def _all_reduce(
    mesh: Mesh,
    vectors: list[torch.Tensor],
    axes: tuple[str, ...],
    op: str,
    cause: str = "clip_by_global_norm",
) -> list[torch.Tensor]:
    """One all-reduce (`op`) of this process's 1-d `vectors` over `axes`, in the ledger.

    A one-step plan built here rather than asked of the planner: for a short vector
    the planner may prefer reduce-scatter + all-reduce + all-gather (the ring model's
    rounding on uneven chunks), or one all-reduce per axis; the norm and the loss
    scale's finiteness flag are specified as one collective.
    """
    src, dst = Layout(((),), axes, op), Layout(((),))
    shape, am, dtype = tuple(vectors[0].shape), mesh.abstract, vectors[0].dtype
    step = AllReduce(axes)
    one = PlanStep(step, src, dst, step_bytes(step, src, shape, am, dtype.itemsize))
    p = Plan(src, dst, shape, am, dtype_name(dtype), dtype.itemsize, (one,))
    return execute(p, mesh, vectors, direction="forward", cause=cause)


def clip_by_global_norm(max_norm: float, norm_type: float = 2.0) -> GradientTransformation:
    """Scale all gradients by ``min(1, max_norm / (global_norm + 1e-6))``, torch's
    ``clip_grad_norm_`` (Optax's omits the 1e-6); ``norm_type`` 2.0, any p, or ``inf``.

    The global norm is one all-reduce for the whole tree (per mesh; see `global_norm`);
    the scaling is local. Partial gradients raise `LayoutError`: reduce them first
    (``z.reduce(grads)``).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"dp": 2})
        >>> g = {"w": sl.shard(torch.tensor([3.0, 4.0]), mesh, sl.P("dp"))}
        >>> tx = sl.optim.clip_by_global_norm(1.0)
        >>> with sl.comm_ledger() as led:
        ...     u, _ = tx.update(g, tx.init(g))
        >>> [round(v, 4) for v in u["w"].full().tolist()], [r.kind for r in led.records][:1]
        ([0.6, 0.8], ['all_reduce'])
    """
    where = f"sl.optim.clip_by_global_norm({max_norm!r}).update"
    ord = float(norm_type)

    def init(params: Any) -> EmptyState:
        return EmptyState()

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        lv = _leaves(where, params, grads=grads)
        norm = _global_norm(lv, ord)
        blocks = lv.blocks["grads"]
        with torch.no_grad():
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            groups: dict[tuple, list[int]] = {}
            for k, b in enumerate(blocks):
                groups.setdefault((b.device, b.dtype), []).append(k)
            out: list[Any] = [None] * len(blocks)
            for (device, dtype), idx in groups.items():
                # a 16-bit gradient is scaled by a float32 factor (rounded once, in the product)
                low = dtype in (torch.float16, torch.bfloat16)
                c = coef.to(device=device, dtype=torch.float32 if low else dtype)
                for k, v in zip(idx, torch._foreach_mul([blocks[k] for k in idx], c)):
                    out[k] = v
        return lv.rebuild(out), state

    return GradientTransformation(init, update)
