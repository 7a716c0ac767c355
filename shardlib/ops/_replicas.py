"""Replica checks: `sl.check_replicas()` verifies that the replicas of every value agree.

Owns `check_replicas` (a context manager; the environment variable
``SHARDLIB_CHECK_REPLICAS=1`` turns it on for a whole process, read when
shardlib is imported), the comparison of replicas on both backends, and
`check_shard_map_outputs`, which `sl.shard_map` calls on its outputs. It does
not own any op or collective: it watches ops through the `_dispatch._observers`
hook and values entering through the `_api._entry_checks` hook.

What must agree. Under a layout, the devices that differ only along its
*replicated* axes (axes neither splitting a dim nor partial) hold the same
block, and must hold bitwise-equal values. Along split axes blocks differ by
design; along partial axes each device holds a summand, which legitimately
differ, so neither is compared. A divergent replica is a silent wrong result:
``x.full()`` returns one device's copy, and later ops mix the copies.

When it is checked (while on):
- after every op dispatched on ShardedTensors, forward and backward (the ops
  inside a rule's decomposition too), each tensor output; the error names the
  first op whose output replicas disagree, its input layouts, the output
  layout, which devices disagree along which axis and by how much, and whether
  an input already disagreed (then the divergence happened before: outside
  the check, or by editing ``x.local_shards()`` in place). Ops whose output is
  uninitialized memory (``empty_like``, ``new_empty``, ...) are skipped;
- after a random op (``torch.Tag.nondeterministic_seeded``) on the distributed
  backend, the ranks' torch generator states, so that differently seeded ranks
  are caught even when no dim is replicated (then no replica disagrees, but
  the blocks are cut from different global tensors);
- `sl.shard(tensor, ...)` on the distributed backend: every rank must pass the
  same global tensor (the classic bug: ranks that create it with different
  seeds); `sl.from_local` outputs; `sl.shard_map` outputs.

How. Simulated backend: the shards are compared directly, byte for byte.
Distributed backend: one all-gather over the whole mesh per checked op of a
per-shard digest (3 int64 per output: a hash, the element count and a code of
the shape), so that every rank sees every group's verdict and all ranks raise
the same error (none is left waiting in a collective). The hash is a weighted
sum, modulo 2**64, of the shard's bytes read as 32-bit words with odd
pseudo-random weights: a difference confined to one 32-bit word (one float32
element, or half a float64) is always detected; any other difference is missed
only if two 64-bit sums collide (about 2**-64 for data that is not built to
collide). Bitwise means bitwise: ``-0.0`` differs from ``0.0`` and NaN payloads
count. Only on a mismatch (the error path) are the disagreeing shards gathered,
to report exact differences.

The checking collectives are not user communication and are not in the
ledger: a ledger reads the same with the check on or off, and on both
backends (the simulated backend needs no collective to check).

`sl.shard_map` on a simulated mesh checks its declared-replicated outputs
always (it has every device's output at hand): values that differ beyond
rounding (more than sqrt(eps) of the largest magnitude) raise; differences
of rounding only (devices that summed in different orders) raise under the
check, which is bitwise. On a distributed mesh it checks under the check only.

Limits: the generator check reads torch's default generators; a random op
given its own ``generator=`` is covered by the replica comparison only. On a
GPU, ops tagged ``nondeterministic_bitwise`` (atomics) may round
differently per replica; their outputs are not checked unless
``torch.use_deterministic_algorithms(True)`` is on. Costs: simulated, one
comparison per replica of every output (O(data) per op); distributed, O(local)
hashing and one small all-gather per op. A debugging mode, not for production
runs.

Seeding rule (README "Random numbers and seeding"): every process seeds torch
identically; shardlib's random ops then give layout-independent values (the
unsharded op's, cut to each device's block), and this check catches ranks that
did not.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .._errors import ReplicaMismatchError, ShardlibError
from ..collectives._redistribute import pad_to_shape
from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh, Mesh
from ..layouts._shard import local_shape, max_local_shape
from . import _api, _dispatch
from ._tensor import ShardedTensor

__all__ = ["check_replicas", "check_shard_map_outputs", "enabled"]

_ENV = "SHARDLIB_CHECK_REPLICAS"
_lock = threading.Lock()
_state = {"depth": 0, "env": False}


# == switching on and off ======================================================
def enabled() -> bool:
    """Whether replica checks are on (a `check_replicas` block is open, or the env var)."""
    return _state["depth"] > 0 or _state["env"]


@contextlib.contextmanager
def check_replicas() -> Iterator[None]:
    """Verify after each op that the replicas of every output agree, bitwise.

    Devices that differ only along a layout's replicated axes hold the same
    block and must hold the same bits; the first op (or `sl.shard`,
    `sl.from_local`, `sl.shard_map` output) where they don't raises
    `sl.ReplicaMismatchError` naming the op, its input layouts, the output
    layout, the devices that disagree and the largest difference. Re-entrant;
    blocks nest. ``SHARDLIB_CHECK_REPLICAS=1`` turns it on for a whole process.
    On the distributed backend every rank must enter the block (it adds a small
    all-gather per op, not recorded in the ledger).

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> x = sl.shard(torch.ones(4), mesh, sl.P(None))
        >>> x.local_shards()[1].add_(1)  # a replica edited by hand  # doctest: +ELLIPSIS
        tensor(...)
        >>> with sl.check_replicas():
        ...     y = x * 2
        Traceback (most recent call last):
        ...
        shardlib._errors.ReplicaMismatchError: sl.check_replicas: aten.mul.Tensor ...
    """
    with _lock:
        _state["depth"] += 1
        _install()
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if not enabled():
                _uninstall()


def _install() -> None:
    if _observe not in _dispatch._observers:
        _dispatch._observers.append(_observe)
    if _check_entry not in _api._entry_checks:
        _api._entry_checks.append(_check_entry)


def _uninstall() -> None:
    if _observe in _dispatch._observers:
        _dispatch._observers.remove(_observe)
    if _check_entry in _api._entry_checks:
        _api._entry_checks.remove(_check_entry)


def _read_env() -> None:
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return
    if value not in ("1", "true", "yes", "on"):
        raise ShardlibError(
            f"{_ENV}={os.environ[_ENV]!r}: set it to 1 to check replicas after every op in "
            "this process (sl.check_replicas everywhere), or to 0 / unset it to turn it off."
        )
    _state["env"] = True
    _install()


# == digests (distributed backend) =============================================
_ROW = 4096  # words per row of the two-level weighted sum
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _row_weights(device: torch.device) -> torch.Tensor:
    w = _WEIGHTS.get(device)
    if w is None:
        g = torch.Generator().manual_seed(0x5EED)
        w = torch.randint(-(2**62), 2**62, (_ROW,), generator=g, dtype=torch.int64) | 1
        w = _WEIGHTS[device] = w.to(device)
    return w


def digest(t: torch.Tensor) -> torch.Tensor:
    """Three int64: a 64-bit hash of `t`'s bytes, its element count, a code of its shape.

    The hash is ``sum_rows w2[r] * sum_c w1[c] * word[r, c]`` modulo 2**64 over the
    bytes read as int32 words (zero-padded), with odd weights: a change in one word
    always changes it. Deterministic across processes (fixed weights, no Python hash).
    """
    b = _bits(t)
    words = -(-b.numel() // 4)
    cols = min(_ROW, max(words, 1))
    pad = cols * -(-max(words, 1) // cols) * 4 - b.numel()
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    grid = b.view(torch.int32).reshape(-1, cols).to(torch.int64)
    rows = (grid * _row_weights(b.device)[:cols]).sum(1)
    w2 = torch.arange(rows.numel(), dtype=torch.int64, device=b.device)
    w2 = (w2 * 0x2545F4914F6CDD1D + 0x632BE59BD9B4E019) | 1
    code = 0
    for n in t.shape:
        code = (code * 1000003 + n + 1) % (2**61 - 1)
    meta = torch.tensor([t.numel(), code], dtype=torch.int64, device=b.device)
    return torch.cat([(rows * w2).sum().reshape(1), meta])


def _rng_digest(device: torch.device) -> torch.Tensor:
    d = digest(torch.get_rng_state())
    if device.type == "cuda":
        d = d + digest(torch.cuda.get_rng_state(device)).to(d.device) * 3
    return d.to(device)


def _gather_rows(mesh: Mesh, rows: torch.Tensor) -> torch.Tensor:
    """Every device's `rows` (an all-gather over the whole mesh; not in the ledger)."""
    am = mesh.abstract
    (out,) = mesh.backend.all_gather(am, [rows.contiguous()], am.axis_names)
    return out.cpu()


# == finding disagreements =====================================================
class _Value:
    """What is compared: a tensor's layout, global shape, and this process's blocks."""

    __slots__ = ("mesh", "layout", "shape", "shards")

    def __init__(self, mesh: Mesh, layout: Layout, shape: tuple[int, ...], shards: list):
        self.mesh, self.layout, self.shape, self.shards = mesh, layout, tuple(shape), shards

    @staticmethod
    def of(x: ShardedTensor) -> _Value:
        return _Value(x._mesh, x._layout, tuple(x.shape), x._shards)


def _simulated(mesh: Mesh) -> bool:
    return len(mesh.local_devices) == mesh.abstract.size


def _bits(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elements' bytes, flat, in row-major order (whatever its strides)."""
    flat = t.detach().reshape(-1)
    if flat.stride(0) != 1:  # a strided view, a size-1 dim with stride 0, an empty slice
        flat = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device).copy_(flat)
    return flat.view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _pairs(am: AbstractMesh, axes: tuple[str, ...], same: Callable[[int, int], bool]):
    """Per replicated axis, the (leader, device) pairs along it that disagree."""
    out = {}
    for a in axes:
        bad = []
        for dev in range(am.size):
            leader = am.group(dev, (a,))[0]
            if dev != leader and not same(leader, dev):
                bad.append((leader, dev))
        if bad:
            out[a] = bad
    return out


def _find(values: Sequence[_Value], rng: bool = False):
    """Per value, ``{axis: [(leader, device), ...]}`` of disagreeing replicas; and the
    rank groups of equal generator states when `rng` and they differ (else None).

    Collective on a distributed mesh (one all-gather, when anything needs checking).
    """
    if not values:
        return [], None
    mesh = values[0].mesh
    am = mesh.abstract
    axes = [v.layout.replicated_axes(am) for v in values]
    if _simulated(mesh):
        found = [
            _pairs(am, ax, lambda i, j, v=v: _same_bits(v.shards[i], v.shards[j])) if ax else {}
            for v, ax in zip(values, axes)
        ]
        return found, None
    need = [i for i, ax in enumerate(axes) if ax]
    if not need and not rng:
        return [{} for _ in values], None
    device = values[0].shards[0].device
    parts = [digest(values[i].shards[0]).to(device) for i in need]
    if rng:
        parts.append(_rng_digest(device))
    table = _gather_rows(mesh, torch.stack(parts))  # [device, part, 3]
    found: list[dict] = [{} for _ in values]
    for k, i in enumerate(need):
        found[i] = _pairs(am, axes[i], lambda a, b, k=k: torch.equal(table[a, k], table[b, k]))
    groups = None
    if rng:
        states: dict[tuple, list[int]] = {}
        for dev in range(am.size):
            states.setdefault(tuple(table[dev, -1].tolist()), []).append(dev)
        if len(states) > 1:
            groups = list(states.values())
    return found, groups


def _all_blocks(v: _Value, devices: set[int]) -> dict[int, torch.Tensor]:
    """Every listed device's block of `v` (error path; collective on a distributed mesh)."""
    mesh, am = v.mesh, v.mesh.abstract
    if _simulated(mesh):
        return {d: v.shards[d] for d in devices}
    pad = max_local_shape(v.shape, v.layout, am)
    (got,) = mesh.backend.all_gather(am, [pad_to_shape(v.shards[0].detach(), pad)], am.axis_names)
    got = got.cpu()
    out = {}
    for d in devices:
        block = got[d]
        for dim, n in enumerate(local_shape(v.shape, v.layout, am, d)):
            block = block.narrow(dim, 0, n)
        out[d] = block
    return out


def _difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float, float]:
    """(elements whose bits differ, max abs difference, max magnitude) of two blocks."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.numel() == 0:
        return 0, 0.0, 0.0
    wide = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    x, y = a.to(wide), b.to(wide)
    if a.element_size() == b.element_size():
        ba, bb = _bits(a).reshape(a.numel(), -1), _bits(b).reshape(b.numel(), -1)
        n = int((ba != bb).any(1).sum())
    else:
        n = int((x != y).sum())
    nan_x, nan_y = torch.isnan(x), torch.isnan(y)
    diff = (x - y).abs()
    diff = torch.where(nan_x & nan_y, torch.zeros_like(diff), diff)
    dmax = float(diff.max().real)  # nan where only one side is NaN
    scale = float(torch.where(nan_x, 0, x.abs()).max().real)
    scale = max(scale, float(torch.where(nan_y, 0, y.abs()).max().real))
    return n, dmax, scale


def _describe(v: _Value, found: dict, limit: int = 6) -> tuple[str, float, float]:
    """Text naming the disagreeing devices per axis; the largest difference and magnitude."""
    devices = {d for pairs in found.values() for p in pairs for d in p}
    blocks = _all_blocks(v, devices)
    worst, scale, parts = 0.0, 0.0, []
    for axis, pairs in found.items():
        shown = []
        for leader, dev in pairs:
            n, d, s = _difference(blocks[leader], blocks[dev])
            worst = math.nan if math.isnan(d) or math.isnan(worst) else max(worst, d)
            scale = max(scale, s)
            if len(shown) < limit:
                shown.append(
                    f"device {dev} differs from device {leader} ({n} of "
                    f"{blocks[dev].numel()} elements, max abs difference {d:.3g})"
                )
        more = f", and {len(pairs) - limit} more pairs" if len(pairs) > limit else ""
        parts.append(f"along axis {axis!r}: " + "; ".join(shown) + more)
    return "; ".join(parts), worst, scale


def _where(v: _Value) -> str:
    return f"shape {v.shape}, layout {v.layout!r} on {v.mesh!r}"


# == the op observer ===========================================================
# Ops whose output is uninitialized memory: its replicas differ and nobody reads them.
_UNINITIALIZED = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "empty_permuted",
        "new_empty",
        "new_empty_strided",
        "resize_",
        "resize_as_",
        "set_",
    }
)


def _leaves(out: Any) -> list[ShardedTensor]:
    if isinstance(out, ShardedTensor):
        return [out]
    if isinstance(out, list | tuple):
        return [t for o in out for t in _leaves(o)]
    return []


def _sharded_inputs(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    items = [(f"input {i}", a) for i, a in enumerate(args)]
    items += [(f"input {k}=", a) for k, a in kwargs.items()]
    out = []
    for name, a in items:
        if isinstance(a, list | tuple):
            out += [(f"{name}[{j}]", b) for j, b in enumerate(a) if isinstance(b, torch.Tensor)]
        elif isinstance(a, torch.Tensor):
            out.append((name, a))
    return out


def _input_text(inputs: list[tuple[str, Any]]) -> str:
    if not inputs:
        return "no tensor inputs"
    return ", ".join(
        f"{name} {a._layout!r} {tuple(a.shape)}"
        if isinstance(a, ShardedTensor)
        else f"{name} plain {tuple(a.shape)}"
        for name, a in inputs
    )


def _skip(func: Any, outs: list[ShardedTensor]) -> bool:
    if getattr(func, "_opname", None) in _UNINITIALIZED:
        return True
    return bool(
        torch.Tag.nondeterministic_bitwise in getattr(func, "tags", ())
        and outs[0]._shards
        and outs[0]._shards[0].device.type != "cpu"
        and not torch.are_deterministic_algorithms_enabled()
    )


def _observe(func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    outs = _leaves(out)
    if not outs or _skip(func, outs):
        return
    seeded = torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
    values = [_Value.of(t) for t in outs]
    found, rng_groups = _find(values, rng=seeded and not _simulated(outs[0]._mesh))
    if not any(found) and rng_groups is None:
        return
    inputs = _sharded_inputs(args, kwargs)
    name = str(func)
    lines = []
    for k, (v, f) in enumerate(zip(values, found)):
        if f:
            text, _, _ = _describe(v, f)
            lines.append(
                f"{'' if lines else f'sl.check_replicas: {name} (inputs: {_input_text(inputs)}) '}"
                f"made the replicas of output {k} ({_where(v)}) disagree: {text}. Devices that "
                "differ only along a replicated axis hold the same block and must hold "
                "bitwise-equal values."
            )
    if not lines:
        lines.append(f"sl.check_replicas: {name} (inputs: {_input_text(inputs)}):")
    # Did an input already disagree? (in-place ops: input 0 is the output, skip it)
    checked = [
        (n, a)
        for n, a in inputs
        if isinstance(a, ShardedTensor)
        and a._mesh == outs[0]._mesh
        and not any(a is o for o in outs)
    ]
    earlier, _ = _find([_Value.of(a) for _, a in checked])
    already = [n for (n, _), f in zip(checked, earlier) if f]
    if already:
        lines.append(
            f"But {', '.join(already)} already disagreed before this op, so the divergence "
            "happened earlier: outside the check (turn it on from the start with "
            f"{_ENV}=1), by editing x.local_shards() in place, or in a value built with "
            "sl.from_local / sl.shard_map / sl.shard before the check was on."
        )
    elif rng_groups is not None:
        ranks = " vs ".join("{" + ",".join(map(str, g)) + "}" for g in rng_groups)
        lines.append(
            f"This is a random op, and the ranks' torch random generators are in different "
            f"states (ranks {ranks}), so the ranks drew from different global tensors. "
            "Fix: seed every process identically (torch.manual_seed(s) with the same s on "
            "every rank, before the first random op); shardlib's random ops then give the "
            "unsharded op's values whatever the layout (README: 'Random numbers and seeding')."
        )
    elif seeded:
        lines.append(
            "This is a random op: seed every process identically (torch.manual_seed(s), the "
            "same s on every rank); shardlib's random ops draw the global tensor and cut it."
        )
    else:
        lines.append(
            "The inputs' replicas agreed, so this op's rule or local kernel computed "
            "different values on devices holding the same block (a shardlib bug or a "
            "non-deterministic kernel): please report it with this message; meanwhile "
            "compute the op on x.full() or in sl.shard_map."
        )
    raise ReplicaMismatchError("\n".join(lines))


# == values entering: sl.shard, sl.from_local ====================================
def _check_entry(call: str, given: Any, out: ShardedTensor) -> None:
    mesh = out._mesh
    if call == "sl.shard":
        if _simulated(mesh):
            return  # one tensor for every device
        _check_same_on_every_rank(mesh, given)
        return
    v = _Value.of(out)
    found, _ = _find([v])
    if found[0]:
        text, _, _ = _describe(v, found[0])
        raise ReplicaMismatchError(
            f"sl.from_local(shards=...): the blocks of devices that hold the same block under "
            f"{out._layout!r} (global shape {tuple(out.shape)}, {mesh!r}) differ: {text}. "
            "Replicated axes need equal blocks. Fixes: pass equal blocks for devices that "
            "differ only along replicated axes; or, if each device holds a summand, declare "
            f"it: sl.P(..., partial=axes), e.g. "
            f"{out._layout.with_partial(out._layout.partial + tuple(found[0]))!r}."
        )


def _check_same_on_every_rank(mesh: Mesh, given: torch.Tensor) -> None:
    am = mesh.abstract
    device = torch.device(getattr(mesh.backend, "device_type", "cpu"))
    table = _gather_rows(mesh, digest(given).to(device).reshape(1, 3))
    odd = [d for d in range(am.size) if not torch.equal(table[d], table[0])]
    if not odd:
        return
    shapes_equal = all(torch.equal(table[d, 0, 1:], table[0, 0, 1:]) for d in range(am.size))
    detail = "some passed a tensor of a different shape"
    if shapes_equal:
        (got,) = mesh.backend.all_gather(am, [given.detach().contiguous()], am.axis_names)
        got = got.cpu()
        diffs = [f"rank {d}: max abs difference {_difference(got[0], got[d])[1]:.3g}" for d in odd]
        detail = "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
    raise ReplicaMismatchError(
        f"sl.check_replicas: sl.shard(tensor=...) of shape {tuple(given.shape)} "
        f"{given.dtype} on {mesh!r}: ranks {', '.join(map(str, odd))} passed a different "
        f"tensor than rank 0 ({detail}). Without src=, every rank must pass the same global "
        "value. Fixes: create it identically on every rank (seed torch identically before "
        "drawing it: torch.manual_seed(s) with the same s everywhere), or pass src=0 to take "
        "rank 0's tensor (a broadcast or scatter, in the ledger)."
    )


# == shard_map outputs =========================================================
def check_shard_map_outputs(
    mesh: Mesh,
    layouts: Sequence[Layout],
    shapes: Sequence[tuple[int, ...]],
    per_leaf: Sequence[list[torch.Tensor]],
    name: str,
) -> None:
    """Raise if an output declared replicated over some axes differs along them.

    Simulated mesh: always; differences beyond rounding raise, rounding-level ones
    only under the check. Distributed mesh: under the check (collective).
    """
    if not _simulated(mesh) and not enabled():
        return
    am = mesh.abstract
    idx = [j for j, layout in enumerate(layouts) if layout.replicated_axes(am)]
    if not idx:
        return
    values = [_Value(mesh, layouts[j], shapes[j], per_leaf[j]) for j in idx]
    found, _ = _find(values)
    strict = enabled()
    for j, v, f in zip(idx, values, found):
        if not f:
            continue
        text, worst, scale = _describe(v, f)
        dtype = v.shards[0].dtype
        tol = math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
        rounding = not math.isnan(worst) and worst <= tol * scale and dtype.is_floating_point
        if rounding and not strict:
            continue
        axes = tuple(f)
        partial = v.layout.with_partial(v.layout.partial + axes, "sum")
        head = (
            f"sl.shard_map: output leaf {j} of {name} is declared replicated over mesh "
            f"ax{'es' if len(axes) > 1 else 'is'} {', '.join(map(repr, axes))} by out_layouts "
            f"{v.layout!r} (global shape {v.shape}), but the devices returned different values "
            f"{text}."
        )
        if rounding:
            raise ReplicaMismatchError(
                head + " They differ by rounding only (the devices computed the value in "
                "different orders), and sl.check_replicas requires bitwise-equal replicas. "
                f"Fixes: compute it in one order on every device (sl.psum(y, {axes[0]!r}) "
                f"reduces in a fixed order), or return the summands with out_layouts={partial!r}."
            )
        raise ReplicaMismatchError(
            head + " x.full() would silently return one device's copy. Fixes: reduce inside "
            f"fn with sl.psum(y, {axes if len(axes) > 1 else axes[0]!r}) (or sl.pmean for a "
            f"mean), or, if each device returns a summand, declare it: out_layouts={partial!r} "
            "(shardlib reduces it outside fn when a later op needs the value)."
        )


_read_env()
