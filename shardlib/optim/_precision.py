"""Mixed precision (DESIGN §9): fp32 master weights, dynamic loss scaling, accumulation.

Owns `master_weights` (a wrapper transformation whose state keeps a
high-precision copy of every parameter, in the layouts of the params it was
built on: with ZeRO that is ``z.state(params)``, L+dp, so the master copy is
split over dp as in the ZeRO paper) and `dynamic_loss_scale` (fp16's loss
scaling, torch.amp.GradScaler's rules, finiteness in one all-reduce). The cast
that feeds low-precision compute is `sl.reshard(x, layout, dtype=...)`
(shardlib/ops/_api.py): it casts before it communicates.

Gradient accumulation needs no helper: ``loss.backward()`` once per
micro-batch on sharded leaves adds each micro-batch's gradient into ``.grad``
where it lies. Under data parallelism that gradient is partial over dp
(``P(..., partial='dp')``) and partial + partial is a local add, so the
micro-batches communicate nothing for the gradients; finishing them is one
reduction per step::

    for mb in micro_batches:                      # no gradient collective here
        with snn.use(scheme, mesh):
            (gpt.loss(params, mb, cfg) / len(micro_batches)).backward()
    grads = z.reduce({k: p.grad for k, p in params.items()})   # or sl.reshard(g, layout)

Invariants:

- `master_weights`: the master copy is updated exactly as the inner
  transformation updates float32 parameters (bitwise: the same code on the
  same float32 values), and ``apply_updates(params, updates)`` gives exactly
  ``new_master.to(params.dtype)``. The updates are float64 differences of two
  values of the params' dtype (``new_master.to(p.dtype) - p``): exact whenever
  that difference fits float64's 53 bits -- always for float16 params, and for
  bfloat16 unless an element's magnitude changes by more than 2**44 in one step
  -- so ``p + u`` is the new value exactly, but for the sign of a zero (a nonzero
  p whose new value is -0 comes out +0: IEEE's ``x + -x = +0``; no update gives
  -0). float32 updates cannot be exact (p = 1, new value 2**-30: no float32 u
  has ``1 + u`` = 2**-30). The float64 updates are transient (8 bytes per
  element while `apply_updates` runs).
- `dynamic_loss_scale`: a `DynamicLossScale` value (`scale`, `unscale`, `adjust`,
  and `step`, which skips the update of a non-finite step). `unscale` is local
  except its finiteness flag, which is
  one all-reduce (max of each device's flag) per mesh for the whole tree
  (ledger cause ``"loss_scale"``). A partial gradient's summands are checked: a
  non-finite summand makes the sum non-finite; finite float32 summands of
  unscaled gradients do not overflow when summed in practice.
- Nothing here writes its inputs; updates, masters and unscaled gradients carry
  ``requires_grad=False`` (`step`'s new params keep theirs, as `apply_updates`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from .._errors import LayoutError, MeshMismatchError
from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ..ops._tensor import ShardedTensor
from ._transform import GradientTransformation, _all_reduce, apply_updates

__all__ = ["DynamicLossScale", "MasterWeightsState", "dynamic_loss_scale", "master_weights"]


# == leaf helpers ================================================================
def _blocks(x: torch.Tensor) -> list[torch.Tensor]:
    """The local blocks of a leaf (a plain tensor is its own block)."""
    return x.local_shards() if isinstance(x, ShardedTensor) else [x]


def _like(
    x: torch.Tensor, blocks: list[torch.Tensor], layout: Layout | None = None
) -> torch.Tensor:
    """A leaf like `x` (mesh, layout, global shape) made of `blocks`."""
    if isinstance(x, ShardedTensor):
        return ShardedTensor(
            blocks, x._mesh, x._layout if layout is None else layout, tuple(x.shape)
        )
    return blocks[0]


def _check_tensor(where: str, key: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise LayoutError(
            f"{where}: {key} is {type(x).__name__} {x!r}; every leaf is a tensor (a "
            "ShardedTensor or a plain torch.Tensor). Fix: keep non-tensor entries out of the tree."
        )
    return x


def _cast_leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, each block cast where it lies (layout kept, partial included: only
    used for widening casts, which commute with the sum), detached, always a fresh copy."""
    with torch.no_grad():
        return _like(x, [b.detach().to(dtype, copy=True) for b in _blocks(x)])


def _same_place(
    where: str, key: str, a: torch.Tensor, what: str, b: torch.Tensor, fix: str
) -> None:
    """`a` and `b` are both plain or both sharded on one mesh in one layout and shape."""
    if isinstance(a, ShardedTensor) != isinstance(b, ShardedTensor):
        raise LayoutError(
            f"{where}: {key} is {'sharded' if isinstance(a, ShardedTensor) else 'plain'} but its "
            f"{what} is {'sharded' if isinstance(b, ShardedTensor) else 'plain'}. Fix: {fix}"
        )
    if tuple(a.shape) != tuple(b.shape):
        raise LayoutError(
            f"{where}: {key} has shape {tuple(a.shape)} but its {what} has {tuple(b.shape)}. "
            f"Fix: {fix}"
        )
    if isinstance(a, ShardedTensor):
        if a._mesh != b._mesh:
            raise MeshMismatchError(
                f"{where}: {key} is on {a._mesh!r} but its {what} on {b._mesh!r}. Fix: {fix}"
            )
        if a._layout.without_partial() != b._layout.without_partial():
            raise LayoutError(
                f"{where}: {key} is in {a._layout!r} but its {what} in {b._layout!r}; the master "
                f"copy lives in the layout of the params it was built on. Fix: {fix}"
            )


# == master weights ==============================================================
class MasterWeightsState(NamedTuple):
    """`master_weights`' state: ``master`` (a tree like params: each leaf the parameter in the
    master dtype, in its layout) and ``inner`` (the wrapped transformation's state, built on
    ``master``)."""

    master: Any
    inner: Any


def master_weights(
    tx: GradientTransformation, dtype: torch.dtype = torch.float32
) -> GradientTransformation:
    """Run `tx` on a `dtype` (float32) master copy of low-precision (bf16/fp16) params.

    ``init(params)`` keeps ``params`` cast to `dtype` in the state (each leaf in its
    layout: built on ``z.state(params)``, the master copy is split over dp like the
    optimizer state) and ``tx.init`` of that copy. ``update(grads, state, params)``
    casts the gradients to `dtype` (locally; a partial gradient stays partial, so
    finish it first as `tx` requires), runs ``tx.update`` on the masters, adds its
    updates to the masters in `dtype`, and returns float64 updates with which
    ``sl.optim.apply_updates(params, updates)`` is exactly the new master cast to each
    parameter's dtype (see the module docstring). Where a parameter already has
    `dtype`, its updates are `tx`'s. No communication beyond `tx`'s.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"dp": 2})
        >>> p = {"w": sl.shard(torch.ones(4, dtype=torch.bfloat16), mesh, sl.P("dp"))}
        >>> tx = sl.optim.master_weights(sl.optim.sgd(1e-3))
        >>> state = tx.init(p)
        >>> g = {"w": sl.shard(torch.ones(4, dtype=torch.bfloat16), mesh, sl.P("dp"))}
        >>> updates, state = tx.update(g, state, p)
        >>> p = sl.optim.apply_updates(p, updates)
        >>> state.master["w"].full()[0].item(), p["w"].full()[0].item()  # bf16 can't hold 0.999
        (0.9990000128746033, 1.0)
        >>> bool((p["w"].full() == state.master["w"].full().to(torch.bfloat16)).all())
        True
    """
    if not isinstance(tx, GradientTransformation):
        raise LayoutError(
            f"sl.optim.master_weights(tx={tx!r}): tx must be a GradientTransformation, e.g. "
            "sl.optim.adamw(1e-3)."
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LayoutError(
            f"sl.optim.master_weights(dtype={dtype!r}): the master dtype must be a floating "
            "torch.dtype (torch.float32)."
        )
    where = "sl.optim.master_weights(...).update"

    def init(params: Any) -> MasterWeightsState:
        def cast(path: Any, p: Any) -> torch.Tensor:
            key = "params" + pytree.keystr(path)
            _check_tensor("sl.optim.master_weights(...).init", key, p)
            if isinstance(p, ShardedTensor) and p._layout.partial:
                raise LayoutError(
                    f"sl.optim.master_weights(...).init: {key} is {p._layout!r}; a parameter is "
                    f"not partial. Fix: sl.reshard(p, {p._layout.without_partial()!r}) first."
                )
            return _cast_leaf(p, dtype)

        master = pytree.tree_map_with_path(cast, params)
        return MasterWeightsState(master, tx.init(master))

    def update(
        grads: Any, state: MasterWeightsState, params: Any = None
    ) -> tuple[Any, MasterWeightsState]:
        if not isinstance(state, MasterWeightsState):
            raise LayoutError(
                f"{where}: state must be the MasterWeightsState its init returns, got "
                f"{type(state).__name__}. Fix: state = tx.init(params) with this transformation."
            )
        if params is None:
            raise LayoutError(
                f"{where}: needs params (update(grads, state, params)): the updates are "
                "relative to them. Fix: pass the current low-precision params (for ZeRO: "
                "z.state(params))."
            )
        g32 = pytree.tree_map(lambda g: _cast_leaf(g, dtype), grads)
        inner_updates, inner = tx.update(g32, state.inner, state.master)
        new_master = apply_updates(state.master, inner_updates)
        m_leaves, m_spec = pytree.tree_flatten(new_master)
        p_paths, p_spec = pytree.tree_flatten_with_path(params)
        if p_spec != m_spec:
            raise LayoutError(
                f"{where}: params has structure {p_spec} but the master copy {m_spec}. Fix: pass "
                "the params the state was built on (state = tx.init(params))."
            )
        fix = "pass the params the state was built on (state = tx.init(params))."
        u_leaves = pytree.tree_leaves(inner_updates)
        out = []
        with torch.no_grad():
            for (path, p), m, u in zip(p_paths, m_leaves, u_leaves):
                key = "params" + pytree.keystr(path)
                _same_place(where, key, _check_tensor(where, key, p), "master", m, fix)
                if p.dtype == m.dtype:
                    out.append(u)
                    continue
                wide = torch.float64
                blocks = [
                    mb.to(p.dtype).to(wide).sub_(pb.to(wide))
                    for mb, pb in zip(_blocks(m), _blocks(p))
                ]
                out.append(_like(m, blocks, m._layout if isinstance(m, ShardedTensor) else None))
        return pytree.tree_unflatten(out, m_spec), MasterWeightsState(new_master, inner)

    return GradientTransformation(init, update)


# == dynamic loss scaling ========================================================
class DynamicLossScale(NamedTuple):
    """fp16 loss scaling with torch.amp.GradScaler's rules, as an immutable value (JMP's shape).

    ``loss_scale`` is the current factor, ``counter`` the clean steps since it last
    changed. `scale` multiplies the loss; `unscale` divides the gradients and tells
    whether all are finite (one all-reduce); `adjust` returns the next value: after a
    non-finite step (whose update is skipped) ``loss_scale * backoff`` and counter 0,
    else counter + 1, and after ``interval`` clean steps in a row ``loss_scale *
    growth`` (if finite) and counter 0. `step` does unscale, the skip-or-update and
    adjust in one call.
    """

    loss_scale: float
    counter: int = 0
    growth: float = 2.0
    backoff: float = 0.5
    interval: int = 2000

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale`` (differentiable; call ``.backward()`` on it)."""
        return loss * self.loss_scale

    def unscale(self, grads: Any) -> tuple[Any, bool]:
        """The gradients divided by the scale (in at least float32, each block where it lies)
        and whether every element of every gradient is finite: each device's flag, then one
        all-reduce (max) per mesh for the whole tree."""
        inv = torch.tensor(1.0 / self.loss_scale, dtype=torch.float64).to(torch.float32).item()
        flags: dict[int, list[torch.Tensor]] = {}  # flat device index (-1: plain) -> flags
        meshes: list[Mesh] = []

        def one(path: Any, g: Any) -> torch.Tensor:
            _check_tensor("DynamicLossScale.unscale", "grads" + pytree.keystr(path), g)
            dtype = torch.promote_types(g.dtype, torch.float32)
            with torch.no_grad():
                blocks = [b.detach().to(dtype) * inv for b in _blocks(g)]
            devices = g._mesh.local_devices if isinstance(g, ShardedTensor) else (-1,)
            if isinstance(g, ShardedTensor) and g._mesh not in meshes:
                meshes.append(g._mesh)
            for d, b in zip(devices, blocks):
                flags.setdefault(d, []).append(torch.isfinite(b).all().logical_not())
            return _like(g, blocks)

        out = pytree.tree_map_with_path(one, grads)
        return out, _all_finite(flags, meshes)

    def step(
        self, tx: GradientTransformation, grads: Any, state: Any, params: Any
    ) -> tuple[Any, Any, DynamicLossScale, bool]:
        """One loss-scaled optimizer step: `unscale` (its one all-reduce), then
        ``tx.update`` and `apply_updates` only if every gradient is finite; a non-finite
        step is skipped (`params` and `state` come back as given). Returns ``(params,
        state, next loss scale, finite)``."""
        grads, finite = self.unscale(grads)
        if finite:
            updates, state = tx.update(grads, state, params)
            params = apply_updates(params, updates)
        return params, state, self.adjust(finite), finite

    def adjust(self, finite: bool) -> DynamicLossScale:
        """The loss scale for the next step (GradScaler's ``update``)."""
        if not finite:
            return self._replace(loss_scale=self.loss_scale * self.backoff, counter=0)
        if self.counter + 1 >= self.interval:
            grown = self.loss_scale * self.growth
            return self._replace(
                loss_scale=grown if math.isfinite(grown) else self.loss_scale, counter=0
            )
        return self._replace(counter=self.counter + 1)


def _all_finite(flags: dict[int, list[torch.Tensor]], meshes: list[Mesh]) -> bool:
    """No flag set on any device of any process: per mesh one all-reduce (max over all its
    axes) of each device's flag; plain tensors' flags count on every device."""
    plain = torch.stack(flags.pop(-1)).any() if -1 in flags else torch.tensor(False)
    bad = plain
    for mesh in meshes:
        blocks = []
        for d in mesh.local_devices:
            here = torch.stack(flags[d]).any() if d in flags else torch.tensor(False)
            blocks.append((here | bad.to(here.device)).reshape(1).to(torch.float32))
        bad = _all_reduce(mesh, blocks, mesh.axis_names, "max", "loss_scale")[0].reshape(()) > 0
    return not bool(bad)


def dynamic_loss_scale(
    init_scale: float = 2.0**16,
    growth: float = 2.0,
    backoff: float = 0.5,
    interval: int = 2000,
) -> DynamicLossScale:
    """A `DynamicLossScale` for fp16 training (torch.amp.GradScaler's defaults and rules).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"dp": 2})
        >>> ls = sl.optim.dynamic_loss_scale(init_scale=8.0, interval=2)
        >>> g = {"w": sl.shard(torch.tensor([8.0, float("inf")]), mesh, sl.P("dp"))}
        >>> with sl.comm_ledger() as led:
        ...     g, finite = ls.unscale(g)
        >>> finite, led.count("all_reduce"), g["w"].full().tolist()
        (False, 1, [1.0, inf])
        >>> ls = ls.adjust(finite)  # skip this step's update
        >>> ls.loss_scale, ls.adjust(True).adjust(True).loss_scale
        (4.0, 8.0)
    """
    for name, v in (("init_scale", init_scale), ("growth", growth)):
        if not (math.isfinite(v) and v > 0):
            raise LayoutError(
                f"sl.optim.dynamic_loss_scale({name}={v!r}): must be a finite number > 0."
            )
    if not 0 < backoff < 1:
        raise LayoutError(
            f"sl.optim.dynamic_loss_scale(backoff={backoff!r}): must be in (0, 1), e.g. 0.5, so "
            "an overflow lowers the scale."
        )
    if not (isinstance(interval, int) and interval >= 1):
        raise LayoutError(
            f"sl.optim.dynamic_loss_scale(interval={interval!r}): must be an int >= 1 (clean "
            "steps before the scale grows; GradScaler's growth_interval, 2000 by default)."
        )
    return DynamicLossScale(float(init_scale), 0, float(growth), float(backoff), interval)
