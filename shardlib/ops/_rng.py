"""Random numbers: torch's stream (the default) or a counter-based generator (`sl.rng`).

Owns the random-number *mode* and the counter-based generator. The layout rules
of the random ops (which device draws which block, partial inputs, dropout's
mask) live in `_nn.py`; they ask this module, when they run, which mode is on.

Two modes (DESIGN §6):

- ``sl.rng("torch")`` (the default): every random op gives the values of the
  unsharded op under the same seed, whatever the layout. Each device draws the
  *global* tensor with torch's generator and keeps its block: O(global) memory
  and time per device, torch's RNG consumption, every rank seeded alike.
- ``sl.rng("counter", seed=None)``: every random op draws from a counter-based
  generator. An element's value is a function of (the mode's key, the op's
  counter, the element's global index) only, so each device computes its own
  block directly: O(local) memory and time, no communication, and the same
  values for every layout and every mesh (a one-device mesh included). Plain
  tensors inside the context draw the same way (a `TorchDispatchMode` active
  only inside the context intercepts their random ops), so sharded == unsharded
  still holds within the mode. The values are **not** torch's stream, and
  torch's generator is not advanced by the ops (only once, at entry, when
  `seed` is None).

The generator (splitmix64, Steele et al. 2014, computed with wrapping int64
torch ops; right shifts made logical with a mask):

    key_n    = mix(key + (n + 1)·G)                        one per random op, n = 0, 1, ...
    bits(i, s) = mix(key_n + (2i + s + 1)·G)               i: the element's global index
    mix(z)   = z ^= z >>> 30; z *= C1; z ^= z >>> 27; z *= C2; z ^= z >>> 31   (mod 2^64)

with ``G = 0x9E3779B97F4A7C15``, ``C1 = 0xBF58476D1CE4E5B9``,
``C2 = 0x94D049BB133111EB``. The global index is the element's row-major
position in the tensor's global shape (its logical position, not its memory
order: a transposed tensor draws the same values as a contiguous one). ``key``
is `seed` run through ``mix``, or, when `seed` is None, one draw from torch's
default generator at entry (so ``torch.manual_seed`` controls it; every rank
must seed alike, as in the default mode). The op counter advances once per
random op that draws (identically on every rank, since every rank runs the
same ops); ``native_dropout`` in eval mode or on an empty tensor draws nothing.

From the bits (stream s = 0, and s = 1 for the second uniform of Box–Muller):

- uniform [0, 1): the top m bits · 2^-m, m = the dtype's significand bits
  (53 float64, 24 float32, 11 float16, 8 bfloat16): exact in the dtype;
- ``uniform_(a, b)``: a + (b − a)·u; ``rand_like``/``rand``: u;
- ``normal_(mean, std)``, ``randn_like``/``randn``: Box–Muller,
  mean + std·sqrt(−2 ln(1 − u₀))·cos(2π u₁) (53-bit u, in float64);
- ``bernoulli_(p)`` (float or tensor p), ``bernoulli(p)``, ``bernoulli(probs)``:
  u < p; ``native_dropout(x, p)``: keep where u < 1 − p, x·keep/(1 − p) — the
  same mask as `F.dropout`'s CPU path (``bernoulli_(1 − p)``), so dropout gives
  one mask on CPU and on accelerators;
- ``exponential_(λ)``: −ln(1 − u)/λ; ``cauchy_(m, σ)``: m + σ·tan(π(u − ½));
  ``log_normal_(μ, σ)``: exp(μ + σ·z); ``geometric_(p)``: max(1, ⌈ln(1 − u)/ln(1 − p)⌉);
- ``randint_like(x, [low,] high)``, ``random_(from, to)``, ``random_(to)``,
  ``randint``: low + (bits >>> 1) mod (high − low).

Covered ops: those above (with the factory ``rand``, ``randn``, ``randint`` on
plain tensors). Any other op that draws (``random_()`` without bounds,
``multinomial``, ``randperm``, ``poisson``, ``normal(mean_tensor, ...)``, fused
attention with ``dropout_p > 0``, ``rrelu`` in training, ``out=`` variants)
raises `NoRuleError` in counter mode, naming the op and saying to leave the
mode for it. Complex dtypes raise the same way. A call with an explicit
``generator=`` asks for that generator's stream and gets it, as outside the
mode (on sharded tensors: the default mode's global draw).

Values are bitwise equal across layouts and meshes on one device type. Across
device types (CPU and CUDA) the integer bits and everything derived from them
by exact arithmetic (uniform, bernoulli, dropout's mask, randint) are equal
too; values that pass through ``log``/``cos``/``tan``/``exp`` (normal,
exponential, cauchy, log-normal) may differ in the last bits, as libm does.

Invariants: a block's values depend only on (key, op counter, global index,
the op's arguments, dtype); no function here allocates more than a few int64 /
float64 buffers of the block's size (nothing of the global size).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .._errors import LayoutError, NoRuleError
from ._tensor import ShardedTensor

__all__ = ["counter_key", "dropout_keep", "is_counter", "rng", "sample", "tensor_params"]

aten = torch.ops.aten

# == the generator ================================================================
_M64 = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _signed(u: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits."""
    u &= _M64
    return u - (1 << 64) if u >> 63 else u


def _mix_int(z: int) -> int:
    """splitmix64's finalizer on a Python integer (unsigned 64-bit)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    t = torch.bitwise_right_shift(z, s)
    return t.bitwise_and_((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer, in place on int64 (multiplication wraps mod 2^64)."""
    z.bitwise_xor_(_shr(z, 30)).mul_(_signed(_C1))
    z.bitwise_xor_(_shr(z, 27)).mul_(_signed(_C2))
    return z.bitwise_xor_(_shr(z, 31))


def _index(
    shape: tuple[int, ...], bounds: tuple[tuple[int, int], ...], device: Any
) -> torch.Tensor:
    """Row-major global indices of the block `bounds` of a tensor of global `shape` (int64)."""
    local = [hi - lo for lo, hi in bounds]
    idx = torch.zeros(local, dtype=torch.int64, device=device)
    stride = 1
    for d in reversed(range(len(shape))):
        lo, hi = bounds[d]
        if hi - lo > 1 or lo:  # a dim of one element at 0 adds nothing
            r = torch.arange(lo, hi, dtype=torch.int64, device=device).mul_(stride)
            idx += r.view([-1 if e == d else 1 for e in range(len(shape))])
        stride *= shape[d]
    return idx


def _bits(key: int, idx: torch.Tensor, stream: int) -> torch.Tensor:
    """64 random bits (as int64) per element: mix(key + (2i + stream + 1)·G)."""
    z = idx * 2
    z.add_(stream + 1).mul_(_signed(_G)).add_(key)
    return _mix_(z)


def _unit(bits: torch.Tensor, digits: int = 53) -> torch.Tensor:
    """Uniform in [0, 1) from the top `digits` bits, as float64 (exact)."""
    return _shr(bits, 64 - digits).to(torch.float64).mul_(2.0**-digits)


def _digits(dtype: torch.dtype) -> int:
    if not dtype.is_floating_point:
        return 53
    return 1 - round(math.log2(torch.finfo(dtype).eps))  # significand bits, the implicit one too


def _standard_normal(key: int, idx: torch.Tensor) -> torch.Tensor:
    """Box–Muller on streams 0 and 1: sqrt(-2 ln(1 - u0)) cos(2 pi u1), float64."""
    radius = _unit(_bits(key, idx, 0)).neg_().log1p_().mul_(-2.0).sqrt_()
    angle = _unit(_bits(key, idx, 1)).mul_(2 * math.pi).cos_()
    return radius.mul_(angle)


# == the mode =====================================================================
@dataclass(slots=True)
class _Counter:
    """One `sl.rng("counter")` context: its key and how many random ops it has run."""

    key: int
    count: int = 0

    def next_key(self) -> int:
        self.count += 1
        return _signed(_mix_int(self.key + self.count * _G))


# The open `sl.rng` contexts, innermost last: a `_Counter`, or None for "torch".
_stack: list[_Counter | None] = []
_modes = [0]  # how many `_CounterMode`s are entered (one at most: nested contexts share it)


def is_counter(kwargs: dict | None = None) -> bool:
    """Whether the innermost `sl.rng` context is the counter mode (and, given an op's
    keyword arguments, the op draws from it: an explicit ``generator=`` is torch's)."""
    if not _stack or _stack[-1] is None:
        return False
    return kwargs is None or kwargs.get("generator") is None


def counter_key() -> int:
    """The next random op's key in counter mode (advances the op counter once)."""
    state = _stack[-1] if _stack else None
    if state is None:
        raise RuntimeError("counter_key() outside sl.rng('counter')")  # an internal misuse
    return state.next_key()


@contextlib.contextmanager
def rng(kind: str = "torch", seed: int | None = None) -> Iterator[None]:
    """Choose how random ops draw inside the block: torch's stream or counter-based.

    ``"torch"`` (the default outside any context): values equal torch's
    unsharded op under the same seed, at O(global) work per device.
    ``"counter"``: each device generates its block directly from the global
    element indices (splitmix64; see this module's docstring): O(local), the
    same values on every layout and mesh and for plain tensors inside the
    block, but not torch's stream. The key is `seed`, or one draw from torch's
    default generator at entry when `seed` is None. Contexts nest; the
    innermost decides.

    Args:
        kind: ``"torch"`` or ``"counter"``.
        seed: the counter mode's key (an int); None draws it from torch's generator.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 4})
        >>> with sl.rng("counter", seed=0):
        ...     a = torch.empty(6, 5).uniform_()
        >>> with sl.rng("counter", seed=0):
        ...     b = sl.shard(torch.empty(6, 5), mesh, sl.P(None, "x")).uniform_()
        >>> torch.equal(a, b.full())
        True
    """
    if kind not in ("torch", "counter"):
        raise LayoutError(
            f"sl.rng(kind={kind!r}): unknown random-number mode. Valid kinds: 'torch' "
            "(torch's stream, the default) and 'counter' (counter-based, O(local) per device)."
        )
    if kind == "torch":
        if seed is not None:
            raise LayoutError(
                f"sl.rng('torch', seed={seed!r}): the torch mode uses torch's own generator "
                "and takes no seed. Seed it with torch.manual_seed, or use sl.rng('counter', "
                "seed=...)."
            )
        _stack.append(None)
        try:
            yield
        finally:
            _stack.pop()
        return
    if seed is None:
        key = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    elif isinstance(seed, int) and not isinstance(seed, bool):
        key = _mix_int(seed)
    else:
        raise LayoutError(
            f"sl.rng('counter', seed={seed!r}): the seed must be an int (or None to draw one "
            "from torch's generator)."
        )
    _stack.append(_Counter(key))
    try:
        if _modes[0]:  # an outer counter context's mode is on: it reads the innermost state
            yield
        else:
            _modes[0] += 1
            try:
                with _CounterMode():
                    yield
            finally:
                _modes[0] -= 1
    finally:
        _stack.pop()


# == the covered ops ==============================================================
# op -> (kind, names of its parameters in the schema).
_SPECS: dict[Any, tuple[str, tuple[str, ...]]] = {
    aten.bernoulli_.float: ("bernoulli", ("p",)),
    aten.bernoulli_.Tensor: ("bernoulli", ("p",)),
    aten.bernoulli.p: ("bernoulli", ("p",)),
    aten.bernoulli.default: ("bernoulli", ("self",)),
    aten.uniform_.default: ("uniform", ("from", "to")),
    aten.normal_.default: ("normal", ("mean", "std")),
    aten.exponential_.default: ("exponential", ("lambd",)),
    aten.cauchy_.default: ("cauchy", ("median", "sigma")),
    aten.log_normal_.default: ("log_normal", ("mean", "std")),
    aten.geometric_.default: ("geometric", ("p",)),
    getattr(aten.random_, "from"): ("randint", ("from", "to")),
    aten.random_.to: ("randint", ("to",)),
    aten.rand_like.default: ("uniform", ()),
    aten.rand_like.generator: ("uniform", ()),
    aten.randn_like.default: ("normal", ()),
    aten.randn_like.generator: ("normal", ()),
    aten.randint_like.default: ("randint", ("high",)),
    aten.randint_like.generator: ("randint", ("high",)),
    aten.randint_like.low_dtype: ("randint", ("low", "high")),
    aten.randint_like.low_generator_dtype: ("randint", ("low", "high")),
    aten.rand.default: ("uniform", ()),
    aten.rand.generator: ("uniform", ()),
    aten.randn.default: ("normal", ()),
    aten.randn.generator: ("normal", ()),
    aten.randint.default: ("randint", ("high",)),
    aten.randint.generator: ("randint", ("high",)),
    aten.randint.low: ("randint", ("low", "high")),
    aten.randint.low_generator: ("randint", ("low", "high")),
}
_FACTORIES = {
    aten.rand.default,
    aten.rand.generator,
    aten.randn.default,
    aten.randn.generator,
    aten.randint.default,
    aten.randint.generator,
    aten.randint.low,
    aten.randint.low_generator,
}
_COVERED = ", ".join(
    sorted({str(op).removeprefix("aten.").split(".")[0] for op in _SPECS} | {"native_dropout"})
)


def _bind(op: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of an aten call by schema name (defaults filled in)."""
    out = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _uncovered(func: Any, why: str = "") -> NoRuleError:
    return NoRuleError(
        f"sl.rng('counter'): {func} draws random numbers{why} and has no counter-based "
        f"implementation (counter mode covers {_COVERED}). Leave the counter mode for this op "
        "(wrap it in `with sl.rng('torch'):`, giving torch's stream and, on sharded tensors, "
        "O(global) work per device), or express it with the covered ops."
    )


def tensor_params(func: Any) -> tuple[str, ...]:
    """The parameters of `func` that may be tensors read elementwise (bernoulli's p)."""
    if func in (aten.bernoulli_.Tensor, aten.bernoulli.default):
        return _SPECS[func][1]
    return ()


def _check(func: Any, b: dict[str, Any], dtype: torch.dtype) -> tuple[str, tuple[str, ...]]:
    spec = _SPECS.get(func)
    if spec is None:
        raise _uncovered(func)
    if dtype.is_complex:
        raise _uncovered(func, f" in the complex dtype {dtype}")
    return spec


def sample(
    func: Any,
    b: dict[str, Any],
    shape: tuple[int, ...],
    bounds: tuple[tuple[int, int], ...],
    dtype: torch.dtype,
    device: Any,
    key: int,
) -> torch.Tensor:
    """The block `bounds` of the values op `func` gives in counter mode, with key `key`.

    `b` holds the op's arguments by schema name; a tensor parameter (``p`` of
    ``bernoulli_.Tensor``, the probabilities of ``bernoulli``) must already be
    its block (broadcastable to the block's shape). Returns a fresh tensor of
    the block's shape in `dtype`. O(block) memory.

    Examples:
        >>> import torch
        >>> from shardlib.ops._rng import sample
        >>> op = torch.ops.aten.rand_like.default
        >>> whole = sample(op, {}, (4, 6), ((0, 4), (0, 6)), torch.float64, "cpu", 7)
        >>> block = sample(op, {}, (4, 6), ((1, 3), (2, 5)), torch.float64, "cpu", 7)
        >>> torch.equal(whole[1:3, 2:5], block)
        True
    """
    kind, names = _check(func, b, dtype)
    params = [b[n] for n in names]
    idx = _index(shape, bounds, device)
    if kind == "randint":
        if params[-1] is None:  # random_(from, None)
            raise _uncovered(func, " with to=None (the dtype's whole range)")
        low, high = (0, *params) if len(params) == 1 else params
        bits = _shr(_bits(key, idx, 0), 1)
        return bits.remainder_(max(1, high - low)).add_(low).to(dtype)
    if kind == "normal":
        z = _standard_normal(key, idx)
        mean, std = params or (0.0, 1.0)
        return z.mul_(std).add_(mean).to(dtype)
    if kind == "log_normal":
        mean, std = params
        return _standard_normal(key, idx).mul_(std).add_(mean).exp_().to(dtype)
    digits = _digits(dtype) if kind == "uniform" else 53
    u = _unit(_bits(key, idx, 0), digits)
    if kind == "uniform":
        lo, hi = params or (0.0, 1.0)
        return u.mul_(hi - lo).add_(lo).to(dtype) if params else u.to(dtype)
    if kind == "bernoulli":
        (p,) = params
        return torch.lt(u, p.to(torch.float64) if isinstance(p, torch.Tensor) else p).to(dtype)
    if kind == "exponential":
        return u.neg_().log1p_().div_(-params[0]).to(dtype)
    if kind == "cauchy":
        median, sigma = params
        return u.sub_(0.5).mul_(math.pi).tan_().mul_(sigma).add_(median).to(dtype)
    if kind == "geometric":
        return u.neg_().log1p_().div_(math.log1p(-params[0])).ceil_().clamp_min_(1).to(dtype)
    raise AssertionError(kind)  # every kind of _SPECS is handled above


def dropout_keep(
    key: int,
    shape: tuple[int, ...],
    bounds: tuple[tuple[int, int], ...],
    device: Any,
    p: float,
) -> torch.Tensor:
    """Dropout's keep mask (bool) on the block `bounds`: u < 1 − p (``bernoulli_(1 − p)``'s)."""
    return torch.lt(_unit(_bits(key, _index(shape, bounds, device), 0)), 1.0 - p)


# == plain tensors inside the counter mode =========================================
def _full_bounds(shape: Any) -> tuple[tuple[int, int], ...]:
    return tuple((0, int(n)) for n in shape)


def _draws(func: Any, b: dict[str, Any]) -> bool:
    """Whether a call of a (possibly) random op draws random numbers at all."""
    if func is aten.native_dropout.default:
        return b["train"] is not False and b["input"].numel() > 0
    if "dropout_p" in b:  # fused attention
        return bool(b["dropout_p"])
    if "dropout" in b and "train" in b:  # fused RNNs
        return bool(b["dropout"]) and bool(b["train"])
    if "training" in b:  # rrelu
        return bool(b["training"])
    return True


_RANDOM: dict[Any, bool] = {}


def _is_random(func: Any) -> bool:
    hit = _RANDOM.get(func)
    if hit is None:
        hit = _RANDOM[func] = (
            func in _SPECS
            or func is aten.native_dropout.default
            or func.overloadpacket is aten.random_
            or torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
        )
    return hit


def _on_meta(func: Any, args: tuple, kwargs: dict) -> Any:
    """`func` on meta stand-ins: torch's own argument checks, the result's shape and dtype."""

    def meta(a: Any) -> Any:
        return (
            torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
            if (isinstance(a, torch.Tensor))
            else a
        )

    m_kwargs = {k: meta(v) for k, v in kwargs.items()}
    if func in _FACTORIES or "device" in m_kwargs:
        m_kwargs["device"] = torch.device("meta")
    return func(*map(meta, args), **m_kwargs)


def _plain(func: Any, args: tuple, kwargs: dict) -> Any:
    """A random op on plain tensors in counter mode: the whole tensor as one block."""
    b = _bind(func, args, kwargs)
    if func is aten.native_dropout.default:
        _on_meta(func, args, kwargs)
        x, p = b["input"], b["p"]
        keep = dropout_keep(counter_key(), tuple(x.shape), _full_bounds(x.shape), x.device, p)
        scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
        return x.mul(keep).mul_(scale), keep
    meta = _on_meta(func, args, kwargs)
    if func in _FACTORIES:
        device = b["device"] if b["device"] is not None else torch.get_default_device()
    else:
        device = b["self"].device
    _check(func, b, meta.dtype)
    if func is aten.bernoulli_.Tensor:
        b["p"] = b["p"].expand(b["self"].shape)
    shape = tuple(meta.shape)
    values = sample(func, b, shape, _full_bounds(shape), meta.dtype, device, counter_key())
    if func._schema.arguments[0].alias_info is not None:  # an in-place fill
        return b["self"].copy_(values)
    out = torch.empty_strided(shape, meta.stride(), dtype=meta.dtype, device=device)
    return out.copy_(values)


class _CounterMode(TorchDispatchMode):
    """Inside `sl.rng("counter")`: plain tensors' random ops draw counter-based values.

    Ops on ShardedTensors pass through to their rules (`_nn.py`), which read the
    mode when they run; a drawing op that counter mode does not cover raises.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if not is_counter() or not _is_random(func):
            return func(*args, **kwargs)
        b = _bind(func, args, kwargs)
        if not _draws(func, b) or b.get("generator") is not None:  # torch's, as asked
            return func(*args, **kwargs)
        if func not in _SPECS and func is not aten.native_dropout.default:
            raise _uncovered(func)
        if ShardedTensor in types:  # the rules in _nn.py draw each device's block
            return func(*args, **kwargs)
        return _plain(func, args, kwargs)
