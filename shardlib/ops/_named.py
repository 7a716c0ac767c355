"""Named-axis collectives for per-device code: psum, all_gather, ppermute, ... (DESIGN §7).

Owns the collectives used inside `sl.shard_map` (`psum`, `pmean`, `pmax`,
`pmin`, `all_gather`, `psum_scatter`, `all_to_all`, `ppermute`,
`axis_index`), their autograd rules, and the per-device context and lockstep
that let a simulated mesh run one Python call of fn per device. Running fn,
entering and leaving it, is `_shard_map.py`'s job; the semantics (threads,
autodiff convention, limits) are documented there.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .._errors import LayoutError, ShardlibError
from .._format import dtype_name
from ..collectives._ledger import current_direction, record
from ..layouts._mesh import AbstractMesh, Mesh
from ._tensor import ShardedTensor

__all__ = [
    "ShardMapError",
    "all_gather",
    "all_to_all",
    "axis_index",
    "pmax",
    "pmean",
    "pmin",
    "ppermute",
    "psum",
    "psum_scatter",
]


# == errors ====================================================================
class ShardMapError(ShardlibError, RuntimeError):
    """A collective outside `sl.shard_map`, or devices that disagree inside it."""


class _Aborted(BaseException):
    """Stops a device thread because another device failed; never reaches the caller."""


# == per-device context ========================================================
_tls = threading.local()


@dataclass(frozen=True, slots=True)
class _Device:
    """What a collective needs to know about the device whose `fn` call is running."""

    mesh: Mesh
    device: int  # flat index on the mesh
    pos: int  # position among this process's devices
    sync: _Lockstep | None  # None: the only local device, call the backend directly


def _current(name: str) -> _Device:
    dev = getattr(_tls, "device", None)
    if dev is None:
        raise ShardMapError(
            f"{name} was called outside sl.shard_map: named-axis collectives act on the "
            "per-device shards of a function mapped with sl.shard_map(fn, mesh, in_layouts, "
            "out_layouts). Call it inside fn; on a whole ShardedTensor use sl.reshard instead "
            "(e.g. sl.reshard(x, sl.P(None)) reduces partial axes and gathers split ones)."
        )
    return dev


class _Lockstep:
    """Barrier-with-exchange for the per-device threads of one simulated `fn` run.

    Used only where this process owns every device, so a thread's position is
    its flat device index.
    """

    def __init__(self, n: int):
        self._n = n
        self._cond = threading.Condition()
        self._items: list[Any] = [None] * n
        self._arrived = 0
        self._round = 0
        self._results: list[torch.Tensor] = []
        self._failed = False
        self._returned: list[int] = []

    def exchange(self, pos: int, call: _Call, x: torch.Tensor, compute: Callable) -> torch.Tensor:
        with self._cond:
            if self._failed:
                raise _Aborted
            if self._returned:
                self._fail()
                raise ShardMapError(
                    f"sl.shard_map: device(s) {self._returned} returned from fn while another "
                    f"device called {call.describe()}. Every device must issue the same "
                    "collectives in the same order; keep control flow around collectives the "
                    "same on every device (branch on data with torch.where, not on sl.axis_index)."
                )
            self._items[pos] = (call, x)
            self._arrived += 1
            my_round = self._round
            if self._arrived == self._n:
                items, self._items, self._arrived = self._items, [None] * self._n, 0
                try:
                    self._results = compute(items)
                except BaseException:
                    self._fail()
                    raise
                self._round += 1
                self._cond.notify_all()
                return self._results[pos]
            while self._round == my_round and not self._failed:
                self._cond.wait()
            if self._round == my_round:
                raise _Aborted
            return self._results[pos]

    def returned(self, pos: int) -> None:
        with self._cond:
            self._returned.append(pos)
            if self._arrived:
                waiting = [i for i, it in enumerate(self._items) if it is not None]
                self._fail()
                raise ShardMapError(
                    f"sl.shard_map: device {pos} returned from fn while device(s) {waiting} "
                    "called "
                    f"{self._items[waiting[0]][0].describe()}. Every device must issue the same "
                    "collectives in the same order; keep control flow around collectives the "
                    "same on every device (branch on data with torch.where, not on sl.axis_index)."
                )

    def _fail(self) -> None:
        self._failed = True
        self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._fail()


# == collective calls ==========================================================
@dataclass(frozen=True, slots=True)
class _Call:
    """One collective as every device of a group issues it (compared across devices).

    `op` is ``psum`` (params: reduce op), ``all_gather`` / ``psum_scatter``
    (dim, tiled), ``all_to_all`` (split_dim, concat_dim) or ``ppermute``
    (the (src, dst) pairs); `cause` is what the user called.
    """

    op: str
    axes: tuple[str, ...]
    params: tuple
    cause: str

    def describe(self) -> str:
        names = {
            "psum": ("reduce",),
            "all_gather": ("dim", "tiled"),
            "psum_scatter": ("dim", "tiled"),
            "all_to_all": ("split_dim", "concat_dim"),
            "ppermute": ("perm",),
        }[self.op]
        args = ", ".join(f"{n}={v!r}" for n, v in zip(names, self.params))
        return f"sl.{self.cause.removeprefix('shard_map:')}(x, axes={self.axes!r}, {args})"

    def transpose(self) -> _Call:
        """The collective that is this one's transpose (its backward), same cause."""
        if self.op == "psum":
            return self
        if self.op == "all_gather":
            return _Call("psum_scatter", self.axes, self.params, self.cause)
        if self.op == "psum_scatter":
            return _Call("all_gather", self.axes, self.params, self.cause)
        if self.op == "all_to_all":
            return _Call("all_to_all", self.axes, self.params[::-1], self.cause)
        return _Call("ppermute", self.axes, (tuple((d, s) for s, d in self.params[0]),), self.cause)


@functools.lru_cache(maxsize=1024)
def _ppermute_sources(
    mesh: AbstractMesh, axes: tuple[str, ...], pairs: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, ...], frozenset[int]]:
    """For each flat device, the device it receives from (itself if none); and the receivers."""
    src_at = {d: s for s, d in pairs}
    src_of, receivers = [], set()
    for dev in range(mesh.size):
        i = mesh.index_along(dev, axes)
        if i in src_at:
            src_of.append(mesh.group(dev, axes)[src_at[i]])
            receivers.add(dev)
        else:
            src_of.append(dev)
    return tuple(src_of), frozenset(receivers)


def _run(call: _Call, mesh: Mesh, bufs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run `call` on this process's local buffers (flat device order); record it in the ledger."""
    am, be, axes = mesh.abstract, mesh.backend, call.axes
    k = am.group_size(axes)
    bufs = [b.contiguous() for b in bufs]
    itemsize, numel = bufs[0].element_size(), max(b.numel() for b in bufs)
    if call.op == "psum":
        outs = be.all_reduce(am, bufs, axes, call.params[0])
        kind, nbytes = "all_reduce", 2 * (k - 1) * -(-numel // k) * itemsize
    elif call.op == "all_gather":
        dim, tiled = call.params
        gathered = be.all_gather(am, bufs, axes)  # [k, *s]
        outs = []
        for g in gathered:
            g = g.movedim(0, dim)
            if tiled:
                shape = list(g.shape)
                g = g.reshape(shape[:dim] + [shape[dim] * shape[dim + 1]] + shape[dim + 2 :])
            outs.append(g.contiguous())
        kind, nbytes = "all_gather", (k - 1) * numel * itemsize
    elif call.op == "psum_scatter":
        dim, tiled = call.params
        if tiled:
            bufs = [_split_dim(b, dim, k).movedim(dim, 0).contiguous() for b in bufs]
        else:
            bufs = [b.movedim(dim, 0).contiguous() for b in bufs]
        outs = be.reduce_scatter(am, bufs, axes, "sum")
        kind, nbytes = "reduce_scatter", (k - 1) * (numel // k) * itemsize
    elif call.op == "all_to_all":
        split, concat = call.params
        bufs = [_split_dim(b, split, k).movedim(split, 0).contiguous() for b in bufs]
        received = be.all_to_all(am, bufs, axes)  # r[j]: member j's piece for me
        outs = []
        for r in received:
            piece = list(r.shape[1:])
            shape = piece[:concat] + [k * piece[concat]] + piece[concat + 1 :]
            outs.append(r.movedim(0, concat).reshape(shape).contiguous())
        kind, nbytes = "all_to_all", (k - 1) * (numel // k) * itemsize
    else:
        src_of, receivers = _ppermute_sources(am, axes, call.params[0])
        got = be.ppermute(am, bufs, src_of, [tuple(b.shape) for b in bufs])
        outs = [
            g if dev in receivers else torch.zeros_like(g)
            for dev, g in zip(mesh.local_devices, got)
        ]
        if all(s == d for s, d in call.params[0]):
            return outs  # nothing moved: no communication to record
        kind, nbytes = "ppermute", numel * itemsize
    record(
        kind, axes, k, nbytes, dtype_name(bufs[0].dtype), current_direction(), call.cause, data=outs
    )
    return outs


def _split_dim(t: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """View `t` with `dim` of size n split into (k, n/k), k major."""
    shape = list(t.shape)
    return t.reshape(shape[:dim] + [k, shape[dim] // k] + shape[dim + 1 :])


class _Collective(torch.autograd.Function):
    """One linear collective over all of this process's devices: one autograd node per call.

    The backward is the transpose (`_Call.transpose`), applied through this same
    Function. On a simulated mesh the node is shared by all devices, so a
    backward started inside fn (one device's ``torch.autograd.grad``) would see
    only that device's cotangent; it raises instead (differentiate the mapped
    function from outside).
    """

    @staticmethod
    def forward(ctx, call, mesh, *bufs):
        ctx.call, ctx.mesh = call, mesh
        return tuple(_run(call, mesh, list(bufs)))

    @staticmethod
    def backward(ctx, *grads):
        _check_not_in_device_thread(ctx.call)
        return (None, None, *_Collective.apply(ctx.call.transpose(), ctx.mesh, *grads))


class _Extremum(torch.autograd.Function):
    """pmax / pmin: the summed cotangent goes to the devices holding the extremum.

    Ties split it evenly (as `torch.amax` does); the cotangent and the tie count
    travel in one all-reduce. Differentiable once.
    """

    @staticmethod
    def forward(ctx, call, mesh, *bufs):
        ctx.call, ctx.mesh = call, mesh
        outs = _run(call, mesh, list(bufs))
        ctx.save_for_backward(*bufs, *outs)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        _check_not_in_device_thread(ctx.call)
        n = len(grads)
        xs, ys = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        masks = [(x == y).to(g.dtype) for x, y, g in zip(xs, ys, grads)]
        both = [torch.stack([g, m]) for g, m in zip(grads, masks)]
        summed = _run(_Call("psum", ctx.call.axes, ("sum",), ctx.call.cause), ctx.mesh, both)
        return (None, None, *(m * s[0] / s[1] for m, s in zip(masks, summed)))


def _check_not_in_device_thread(call: _Call) -> None:
    dev = getattr(_tls, "device", None)
    if dev is not None and dev.sync is not None:
        raise ShardMapError(
            f"the backward of {call.describe()} was started inside fn on a simulated mesh "
            "(torch.autograd.grad or .backward() within sl.shard_map): there one autograd node "
            "serves all devices, so one device's backward would miss the others' cotangents. "
            "Differentiate the mapped function from outside, e.g. "
            "torch.autograd.grad(mapped(x).full().sum(), x)."
        )


def _check_same_everywhere(mesh: Mesh, items: list) -> None:
    """On a simulated mesh: every device made the same call with group-wise equal tensors."""
    calls = [c for c, _ in items]
    if any(c != calls[0] for c in calls):
        by: dict[str, list[int]] = {}
        for dev, c in enumerate(calls):
            by.setdefault(c.describe(), []).append(dev)
        raise ShardMapError(
            "sl.shard_map: devices called different collectives at the same point: "
            + "; ".join(f"devices {devs}: {d}" for d, devs in by.items())
            + ". Every device must issue the same collectives in the same order (SPMD); keep "
            "control flow around collectives the same on every device (branch on data with "
            "torch.where, not on sl.axis_index)."
        )
    call, am = calls[0], mesh.abstract
    for dev, (_, x) in enumerate(items):
        for m in am.group(dev, call.axes):
            y = items[m][1]
            if y.shape != x.shape or y.dtype != x.dtype:
                raise ShardMapError(
                    f"{call.describe()} inside sl.shard_map: devices {dev} and {m} of one group "
                    f"hold {tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}; a "
                    "collective needs equal shapes and dtypes on every device of its group. "
                    "Uneven shards (a global size not divisible by the axis size) reach fn with "
                    "unequal shapes: pad inside fn to the largest block, or use a divisible size."
                )


def _collective(name: str, op: str, x: Any, axes: Any, params: tuple) -> torch.Tensor:
    dev = _current(f"sl.{name}")
    call = _Call(op, axes, params, f"shard_map:{name}")
    function = _Collective if op != "psum" or params[0] == "sum" else _Extremum
    if dev.sync is None:
        return function.apply(call, dev.mesh, x)[0]

    def compute(items):
        _check_same_everywhere(dev.mesh, items)
        return function.apply(call, dev.mesh, *(t for _, t in items))

    return dev.sync.exchange(dev.pos, call, x, compute)


# == argument checks ===========================================================
def _axes_arg(axes: Any, name: str) -> tuple[tuple[str, ...], _Device]:
    dev = _current(f"sl.{name}")
    am = dev.mesh.abstract
    where = f"sl.{name}(axes={axes!r})"
    if isinstance(axes, str):
        axes = (axes,)
    if not isinstance(axes, tuple | list) or not axes or not all(isinstance(a, str) for a in axes):
        raise LayoutError(
            f"{where}: axes is a mesh axis name or a non-empty tuple of names (major -> minor), "
            f"e.g. {am.axis_names[0]!r} or {am.axis_names!r}."
        )
    unknown = [a for a in axes if a not in am.axis_names]
    if unknown:
        raise LayoutError(
            f"{where}: unknown mesh axis {', '.join(map(repr, unknown))}; the shard_map mesh "
            f"has axes {dict(zip(am.axis_names, am.shape))!r}. Use one of {am.axis_names!r}."
        )
    if len(set(axes)) != len(axes):
        raise LayoutError(f"{where}: an axis appears twice; name each mesh axis once.")
    return tuple(axes), dev


def _tensor_arg(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, ShardedTensor) or not isinstance(x, torch.Tensor):
        raise LayoutError(
            f"sl.{name}(x=...): expected the plain local tensor of this device, got "
            f"{type(x).__name__}. Inside sl.shard_map, fn's arguments are plain tensors; a "
            "ShardedTensor must be passed as an argument of the mapped function (with a layout "
            "in in_layouts), not captured from outside."
        )
    return x


def _dim_arg(x: torch.Tensor, dim: Any, name: str, arg: str, extra: int = 0) -> int:
    n = x.ndim + extra
    if isinstance(dim, bool) or not isinstance(dim, int) or not -n <= dim < n:
        raise LayoutError(
            f"sl.{name}({arg}={dim!r}): a dim of the local tensor of shape {tuple(x.shape)} "
            f"is an int in [{-n}, {n})."
        )
    return dim % n


def _divisible(x: torch.Tensor, dim: int, k: int, name: str, arg: str, axes) -> None:
    if x.shape[dim] % k:
        raise LayoutError(
            f"sl.{name}: dim {dim} ({arg}) of the local tensor of shape {tuple(x.shape)} has "
            f"size {x.shape[dim]}, not divisible by the {k} devices of axes {axes!r}. Pad it "
            f"to a multiple of {k} inside fn, or choose a divisible size."
        )


# == collectives (public) ======================================================
def psum(x: torch.Tensor, axes: str | tuple[str, ...]) -> torch.Tensor:
    """Sum of `x` over the devices of `axes`; every member gets the result.

    ``psum: x_i varies over axes -> sum_j x_j on every member   backward: psum``

    The backward is psum of the cotangent (JAX's untyped rule; see the module
    docstring: a replicated output hands each replica 1/k of its cotangent,
    so the sum restores the whole). To get Megatron's identity-backward
    all-reduce, return the summand with a partial out_layout instead.
    Ledger: ``all_reduce``, ``2 (k-1) ceil(numel/k) * itemsize`` bytes.

    Args:
        x: this device's local tensor (same shape and dtype on every member).
        axes: a mesh axis name or a tuple of names.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 4})
        >>> f = sl.shard_map(lambda v: sl.psum(v, "x"), mesh, sl.P("x"), sl.P(None))
        >>> f(sl.shard(torch.arange(8.0), mesh, sl.P("x"))).full().tolist()
        [12.0, 16.0]
    """
    axes, _ = _axes_arg(axes, "psum")
    return _collective("psum", "psum", _tensor_arg(x, "psum"), axes, ("sum",))


def pmean(x: torch.Tensor, axes: str | tuple[str, ...]) -> torch.Tensor:
    """Mean of `x` over the devices of `axes` (a psum, then a division by the group size).

    ``pmean: x_i varies over axes -> mean_j x_j on every member   backward: pmean``

    Ledger: one ``all_reduce`` (cause ``shard_map:pmean``). Integer inputs
    give a floating result (true division).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> f = sl.shard_map(lambda v: sl.pmean(v, "x"), mesh, sl.P("x"), sl.P(None))
        >>> f(sl.shard(torch.tensor([1.0, 3.0]), mesh, sl.P("x"))).full().tolist()
        [2.0]
    """
    axes, dev = _axes_arg(axes, "pmean")
    s = _collective("pmean", "psum", _tensor_arg(x, "pmean"), axes, ("sum",))
    return s / dev.mesh.abstract.group_size(axes)


def pmax(x: torch.Tensor, axes: str | tuple[str, ...]) -> torch.Tensor:
    """Elementwise maximum of `x` over the devices of `axes`; every member gets it.

    ``pmax: x_i varies over axes -> max_j x_j on every member``
    ``backward: psum of the cotangent, routed to the devices holding the maximum``
    (split evenly between ties, like `torch.amax`; one ``all_reduce`` of the
    cotangent and the tie count together).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> f = sl.shard_map(lambda v: sl.pmax(v, "x"), mesh, sl.P("x"), sl.P(None))
        >>> f(sl.shard(torch.tensor([5.0, 1.0, 2.0, 7.0]), mesh, sl.P("x"))).full().tolist()
        [5.0, 7.0]
    """
    axes, _ = _axes_arg(axes, "pmax")
    return _collective("pmax", "psum", _tensor_arg(x, "pmax"), axes, ("max",))


def pmin(x: torch.Tensor, axes: str | tuple[str, ...]) -> torch.Tensor:
    """Elementwise minimum of `x` over the devices of `axes` (see `pmax`).

    ``pmin: x_i -> min_j x_j on every member   backward: cotangent to the minimum's devices``
    """
    axes, _ = _axes_arg(axes, "pmin")
    return _collective("pmin", "psum", _tensor_arg(x, "pmin"), axes, ("min",))


def all_gather(
    x: torch.Tensor, axes: str | tuple[str, ...], dim: int = 0, tiled: bool = True
) -> torch.Tensor:
    """Every member's `x`, in member order along `axes`, on every member.

    ``all_gather: S(d) -> R   backward: psum_scatter``

    With ``tiled=True`` the pieces are concatenated along `dim` (size
    ``k * x.shape[dim]``); with ``tiled=False`` they are stacked in a new dim
    at position `dim` (size k). Member j is the device with
    ``sl.axis_index(axes) == j`` (flat, major -> minor over `axes`). The
    backward sums the cotangents of all members and gives each its own piece.
    Ledger: ``all_gather``, ``(k-1) * local bytes``.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> f = sl.shard_map(lambda v: sl.all_gather(v, "x", 0), mesh, sl.P("x"), sl.P(None))
        >>> f(sl.shard(torch.arange(4.0), mesh, sl.P("x"))).full().tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    axes, _ = _axes_arg(axes, "all_gather")
    x = _tensor_arg(x, "all_gather")
    dim = _dim_arg(x, dim, "all_gather", "dim", extra=0 if tiled else 1)
    return _collective("all_gather", "all_gather", x, axes, (dim, bool(tiled)))


def psum_scatter(
    x: torch.Tensor, axes: str | tuple[str, ...], dim: int = 0, tiled: bool = True
) -> torch.Tensor:
    """Sum of `x` over the devices of `axes`, cut along `dim`; member j keeps piece j.

    ``psum_scatter: partial -> S(d)   backward: all_gather``

    With ``tiled=True``, ``x.shape[dim]`` must be divisible by the group size
    k and the result has ``x.shape[dim] // k`` there; with ``tiled=False``,
    ``x.shape[dim]`` must equal k and that dim is removed. Ledger:
    ``reduce_scatter``, ``(k-1) * output bytes``.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> f = sl.shard_map(lambda v: sl.psum_scatter(v, "x"), mesh, sl.P(None), sl.P("x"))
        >>> f(sl.shard(torch.tensor([1.0, 2.0]), mesh, sl.P(None))).full().tolist()
        [2.0, 4.0]
    """
    axes, dev = _axes_arg(axes, "psum_scatter")
    x = _tensor_arg(x, "psum_scatter")
    dim = _dim_arg(x, dim, "psum_scatter", "dim")
    k = dev.mesh.abstract.group_size(axes)
    if tiled:
        _divisible(x, dim, k, "psum_scatter", "dim", axes)
    elif x.shape[dim] != k:
        raise LayoutError(
            f"sl.psum_scatter(dim={dim}, tiled=False): dim {dim} of the local tensor of shape "
            f"{tuple(x.shape)} must have size {k}, the number of devices of axes {axes!r} "
            "(one slice per device). Use tiled=True to cut a larger dim into k pieces."
        )
    return _collective("psum_scatter", "psum_scatter", x, axes, (dim, bool(tiled)))


def all_to_all(
    x: torch.Tensor, axes: str | tuple[str, ...], split_dim: int, concat_dim: int
) -> torch.Tensor:
    """Cut `x` along `split_dim` into k pieces, send piece j to member j, concatenate along `concat_dim`.

    ``all_to_all: S(concat_dim) -> S(split_dim)   backward: all_to_all(split_dim <-> concat_dim)``

    ``x.shape[split_dim]`` must be divisible by the group size k; the pieces
    received are concatenated in member order. Ledger: ``all_to_all``,
    ``(k-1) * piece bytes``.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> f = sl.shard_map(lambda v: sl.all_to_all(v, "x", 1, 0), mesh,
        ...                  sl.P("x", None), sl.P(None, "x"))
        >>> x = torch.arange(8.0).reshape(2, 4)
        >>> torch.equal(f(sl.shard(x, mesh, sl.P("x", None))).full(), x)
        True
    """
    axes, dev = _axes_arg(axes, "all_to_all")
    x = _tensor_arg(x, "all_to_all")
    split = _dim_arg(x, split_dim, "all_to_all", "split_dim")
    concat = _dim_arg(x, concat_dim, "all_to_all", "concat_dim")
    _divisible(x, split, dev.mesh.abstract.group_size(axes), "all_to_all", "split_dim", axes)
    return _collective("all_to_all", "all_to_all", x, axes, (split, concat))


def ppermute(
    x: torch.Tensor, axes: str | tuple[str, ...], perm: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Send `x` from member `src` to member `dst` for each pair; members no one sends to get zeros.

    ``ppermute: block i -> block perm(i)   backward: ppermute with the pairs reversed``

    `perm` is a list of ``(src, dst)`` indices along `axes` (as
    `sl.axis_index(axes)` numbers the members); each index is a source at most
    once and a destination at most once. Ledger: ``ppermute``, local bytes
    (nothing is recorded when every pair is ``(i, i)``).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 3})
        >>> shift = [(i, (i + 1) % 3) for i in range(3)]
        >>> f = sl.shard_map(lambda v: sl.ppermute(v, "x", shift), mesh, sl.P("x"), sl.P("x"))
        >>> f(sl.shard(torch.tensor([0.0, 1.0, 2.0]), mesh, sl.P("x"))).full().tolist()
        [2.0, 0.0, 1.0]
    """
    axes, dev = _axes_arg(axes, "ppermute")
    x = _tensor_arg(x, "ppermute")
    k = dev.mesh.abstract.group_size(axes)
    try:
        pairs = tuple((int(s), int(d)) for s, d in perm)
        ok = all(
            not isinstance(v, bool) and isinstance(v, int) and 0 <= v < k
            for pair in perm
            for v in pair
        )
    except (TypeError, ValueError):
        pairs, ok = (), False
    srcs, dsts = [s for s, _ in pairs], [d for _, d in pairs]
    if not ok or len(set(srcs)) != len(srcs) or len(set(dsts)) != len(dsts):
        raise LayoutError(
            f"sl.ppermute(perm={perm!r}): perm is a list of (src, dst) pairs of indices in "
            f"[0, {k}) along axes {axes!r}, each index a source at most once and a destination "
            f"at most once; e.g. a cyclic shift [(i, (i + 1) % {k}) for i in range({k})]."
        )
    return _collective("ppermute", "ppermute", x, axes, (tuple(sorted(pairs)),))


def axis_index(axes: str | tuple[str, ...]) -> int:
    """This device's index along `axes` (flat, major -> minor), as a Python int.

    No communication. Inside `sl.shard_map` only.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"a": 2, "b": 3})
        >>> f = sl.shard_map(lambda: torch.tensor([float(sl.axis_index(("b", "a")))]),
        ...                  mesh, (), sl.P(("a", "b")))
        >>> f().full().tolist()
        [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]
    """
    axes, dev = _axes_arg(axes, "axis_index")
    return dev.mesh.abstract.index_along(dev.device, axes)
