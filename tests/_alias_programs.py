"""Random view / in-place programs run twice, on plain torch and on ShardedTensors.

This is the engine of the aliasing fuzzer (`tests/test_aliasing_fuzz.py`). A
*program* is a mesh plus a list of Python source lines; the first line builds
the base tensor ``t0`` with ``mk(value, layout)``, every other line is one step
(a view, an in-place op, a read). The very same lines run in two namespaces:

- the **torch** namespace, where ``mk(value, layout)`` returns ``value``
  (float64, integer-valued: every sum below is exact);
- the **sharded** namespace, where ``mk`` returns ``sl.shard(value, mesh,
  layout)``, or for a partial layout ``sl.from_local`` of non-trivial summands
  (`tests._reference.make_summands`, an implementation independent of
  shardlib's).

After every step every live name of the sharded namespace is compared with
its torch counterpart (``.full()``; same shape, same dtype, bitwise equal
values). The outcome of a step is one of:

- ``ok``: torch and shardlib agree;
- ``both raised``: torch raised and shardlib raised too (any exception); the
  step is a no-op and the program goes on;
- ``documented``: torch succeeded and shardlib raised `sl.AliasError`,
  `sl.LayoutError` or `sl.NoRuleError` (the contract's "cannot honour this,
  here is what to do"); the program is dropped;
- a **failure**: a silent difference, a non-shardlib exception where torch
  succeeded, or shardlib succeeding where torch raised.

Because a program is plain source, a failing one prints as a script that
reproduces it (`Failure.reproducer`), and `minimize` deletes steps while the
same failure (kind, step, exception type) persists.

Generation (`run_program`, `draw_step`) is interactive: each step is drawn from the
shapes of the torch namespace as it stands, so a view's index, a reshape's
target and an operand's shape are valid (mostly: a few steps are drawn to make
torch raise, e.g. an in-place op on an expanded view, a non-viewable
``view``).

This module does not import shardlib internals: only the public API.
"""

from __future__ import annotations

import copy
import math
import re
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import shardlib as sl
from tests._reference import enumerate_layouts, make_summands

__all__ = [
    "A",
    "DOCUMENTED",
    "MESHES",
    "Chooser",
    "Failure",
    "Program",
    "Runner",
    "Stats",
    "draw_base",
    "draw_step",
    "minimize",
    "replay",
    "run_program",
    "sharded_mk",
]

# Simulated meshes: even, odd, two and three axes.
MESHES: tuple[dict[str, int], ...] = (
    {"x": 4},
    {"a": 2, "b": 2},
    {"x": 3},
    {"a": 2, "b": 2, "c": 2},
)
# Sizes that split evenly, unevenly and with empty chunks on 3, 4 and 8 devices.
DIM_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 10)
MAX_NUMEL = 120
DOCUMENTED = (sl.AliasError, sl.LayoutError, sl.NoRuleError)

_LAYOUTS: dict[tuple[tuple[str, int], ...], dict[int, list[sl.Layout]]] = {}


def layouts_for(axes: Mapping[str, int], ndim: int) -> list[sl.Layout]:
    """Every layout of rank `ndim` on `axes` (partial ones with every reduce op), cached."""
    key = tuple(axes.items())
    per_mesh = _LAYOUTS.setdefault(key, {})
    if ndim not in per_mesh:
        per_mesh[ndim] = list(enumerate_layouts(axes, ndim))
    return per_mesh[ndim]


# == the two namespaces ========================================================
def A(*shape: int, start: int = 0) -> torch.Tensor:
    """``arange`` of `shape` in float64 from `start` (integer values: sums are exact)."""
    n = math.prod(shape)
    return torch.arange(start, start + n, dtype=torch.float64).reshape(shape)


PRELUDE = """\
import torch
import shardlib as sl
from shardlib import P
from tests._alias_programs import A, sharded_mk

mesh = sl.Mesh.simulated({axes!r})
mk = sharded_mk(mesh)  # plain torch: mk = lambda value, layout: value
"""


def sharded_mk(mesh: sl.Mesh) -> Callable[[torch.Tensor, sl.Layout], torch.Tensor]:
    """``mk(value, layout)`` of the sharded namespace: `sl.shard`, or `sl.from_local` of summands.

    Partial summands come from `tests._reference.make_summands` (non-trivial:
    no device holds the value and the others zeros).
    """

    def mk(value: torch.Tensor, layout: sl.Layout) -> torch.Tensor:
        if layout.partial:
            shards = make_summands(value, layout, mesh.axes)
            return sl.from_local(shards, mesh, layout, tuple(value.shape))
        return sl.shard(value, mesh, layout)

    return mk


def _torch_namespace() -> dict[str, Any]:
    def mk(value: torch.Tensor, layout: sl.Layout) -> torch.Tensor:
        return value

    return {"torch": torch, "sl": sl, "P": sl.P, "A": A, "mk": mk}


def _sharded_namespace(mesh: sl.Mesh) -> dict[str, Any]:
    return {"torch": torch, "sl": sl, "P": sl.P, "A": A, "mk": sharded_mk(mesh), "mesh": mesh}


# == programs, outcomes ========================================================
@dataclass
class Program:
    """A mesh and the source lines of a program (line 0 builds ``t0``)."""

    axes: dict[str, int]
    lines: list[str] = field(default_factory=list)
    # names each line binds (parallel to `lines`)
    binds: list[tuple[str, ...]] = field(default_factory=list)

    def source(self, upto: int | None = None) -> str:
        body = self.lines if upto is None else self.lines[: upto + 1]
        return PRELUDE.format(axes=self.axes) + "\n".join(body) + "\n"


@dataclass
class Failure:
    """A step where the sharded program silently differs from torch, or crashed."""

    kind: str  # "silent difference" | "crash" | "no error" | "full() crashed"
    program: Program
    step: int  # index into program.lines of the step after which it showed
    detail: str  # what differs / the exception with the shardlib frames
    exc_type: str = ""
    names: tuple[str, ...] = ()  # the live names that differ (silent difference)
    minimized_from: int | None = None  # number of steps before `minimize`

    @property
    def signature(self) -> tuple[str, str, str]:
        """What `minimize` keeps fixed: the kind, the failing line, the exception type."""
        return (self.kind, self.program.lines[self.step], self.exc_type)

    @property
    def op_class(self) -> str:
        """A short class name for grouping: kind, the failing op and (if any) the view it went through."""
        line = self.program.lines[self.step]
        base = " (partial base)" if "partial=" in self.program.lines[0] else ""
        exc = f" [{self.exc_type}]" if self.exc_type else ""
        return f"{self.kind}: {op_name(line)}{exc}{base}"

    def reproducer(self) -> str:
        """The failing program as a runnable script, with what torch and shardlib gave."""
        prog = self.program
        n = len(prog.lines) - 1
        head = f"# {self.kind} at step {self.step} of {n}"
        if self.minimized_from is not None:
            head += f" (minimized from {self.minimized_from} steps)"
        lines = [head, "# run from the repository root (imports tests._alias_programs)"]
        src = prog.source(self.step).rstrip("\n").split("\n")
        src[-1] = f"{src[-1]}  # <-- {self.kind} here"
        lines += src
        for name in self.names:
            lines.append(f"print({name}.full())")
        lines.append("")
        lines.append("# " + "\n# ".join(self.detail.rstrip("\n").split("\n")))
        return "\n".join(lines)


_NAME = re.compile(r"\b([tvr]\d+)\b")


def op_name(line: str) -> str:
    """The op of a source line, for grouping (``v3 = t0[1:3, 2]`` -> ``getitem``)."""
    lhs, _, rhs = line.partition(" = ")
    if "out=" in line:
        return "out="
    if ".data = " in line:
        return ".data ="
    if rhs and "[" in lhs:
        return "setitem"
    for tok in ("+=", "*=", "-="):
        if f" {tok} " in line:
            return ("setitem " if "[" in line.split(tok)[0] else "") + tok
    expr = rhs or line
    if expr.startswith("mk("):
        return "mk"
    m = re.match(r"torch\.(\w+)\(", expr)
    if m:
        return m.group(1)
    if " @ " in expr:
        return "matmul"
    m = re.match(r"[tvr]\d+\.(\w+)", expr)
    if m:
        return m.group(1)
    if re.match(r"[tvr]\d+\[", expr):
        return "getitem"
    return "binary"


@dataclass
class Stats:
    """Counters across programs, printed at the end of a fuzz run."""

    programs: int = 0
    steps: int = 0
    comparisons: int = 0
    both_raised: int = 0
    ok_programs: int = 0
    documented: Counter = field(default_factory=Counter)  # error type -> count
    documented_ops: Counter = field(default_factory=Counter)  # (type, op) -> count
    documented_example: dict = field(default_factory=dict)  # type -> first message
    failures: list[Failure] = field(default_factory=list)
    failure_classes: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)  # op name -> steps run

    def summary(self) -> str:
        out = [
            f"programs {self.programs} (ran to the end: {self.ok_programs}), steps {self.steps}, "
            f"comparisons {self.comparisons}, both raised {self.both_raised}, "
            f"failures {len(self.failures)} in {len(self.failure_classes)} classes",
            "documented errors: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.documented.items())) or "none"),
        ]
        for (kind, op), n in sorted(self.documented_ops.items()):
            out.append(f"  {kind} on {op}: {n}")
        for kind, msg in sorted(self.documented_example.items()):
            out.append(f"  first {kind}: {msg[:300]}")
        if self.failure_classes:
            out.append("failure classes:")
            for cls, n in self.failure_classes.most_common():
                out.append(f"  {n:5d}  {cls}")
        out.append("steps by op: " + ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items())))
        return "\n".join(out)


# == running ===================================================================
def _shardlib_frames(exc: BaseException, limit: int = 6) -> str:
    """The last frames of `exc`'s traceback inside shardlib (where the core engineer looks)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if "shardlib" in f.filename and "/tests/" not in f.filename]
    pick = (mine or frames)[-limit:]
    return "".join(
        f"  {f.filename.split('shardlib/', 1)[-1]}:{f.lineno} in {f.name}: {f.line}\n" for f in pick
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:600]}"


def _exec(line: str, ns: dict[str, Any]) -> BaseException | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exec(line, ns)  # noqa: S102  (the program is generated here)
        except Exception as exc:  # noqa: BLE001  (classified by the caller)
            return exc
    return None


def _values_equal(want: Any, got: Any) -> str | None:
    """None if `got` (sharded side, already `.full()`-ed) equals `want`; else what differs."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"torch gives a tensor, shardlib a {type(got).__name__}: {got!r}"
        if tuple(got.shape) != tuple(want.shape):
            return f"shape: torch {tuple(want.shape)}, shardlib {tuple(got.shape)}"
        if got.dtype != want.dtype:
            return f"dtype: torch {want.dtype}, shardlib {got.dtype}"
        if not torch.equal(got, want):
            where = (got != want).nonzero().tolist()
            if want.numel() <= 24:
                return (
                    f"values differ at {where[:8]}:\n  torch    {want.tolist()}\n"
                    f"  shardlib {got.tolist()}"
                )
            shown = ", ".join(
                f"{tuple(i)}: torch {want[tuple(i)].item()} shardlib {got[tuple(i)].item()}"
                for i in where[:8]
            )
            return f"{len(where)} of {want.numel()} values differ: {shown}"
        return None
    if isinstance(want, (tuple, list)) and isinstance(got, (tuple, list)):
        if len(want) != len(got):
            return f"length: torch {len(want)}, shardlib {len(got)}"
        for w, g in zip(want, got):
            d = _values_equal(w, g)
            if d:
                return d
        return None
    if want != got:
        return f"torch gives {want!r}, shardlib {got!r}"
    return None


class Runner:
    """Runs one program step by step in both namespaces and classifies each step."""

    def __init__(self, axes: Mapping[str, int], stats: Stats | None = None) -> None:
        self.program = Program(dict(axes))
        self.mesh = sl.Mesh.simulated(dict(axes))
        self.tns = _torch_namespace()
        self.sns = _sharded_namespace(self.mesh)
        self.live: list[str] = []  # names bound by some step, in order
        self.stats = stats if stats is not None else Stats()
        self.failure: Failure | None = None
        self.documented: str | None = None

    @property
    def done(self) -> bool:
        return self.failure is not None or self.documented is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live float tensors of the torch namespace (what steps act on)."""
        return {
            n: self.tns[n]
            for n in self.live
            if isinstance(self.tns.get(n), torch.Tensor) and self.tns[n].is_floating_point()
        }

    def _fail(self, kind: str, detail: str, exc: BaseException | None = None, names=()) -> str:
        step = len(self.program.lines) - 1
        if exc is not None:
            detail = f"{detail}\n{_describe(exc)}\n{_shardlib_frames(exc)}"
        self.failure = Failure(
            kind, self.program, step, detail, type(exc).__name__ if exc else "", tuple(names)
        )
        return "failure"

    def _document(self, exc: BaseException, where: str) -> str:
        kind = type(exc).__name__
        self.documented = kind
        self.stats.documented[kind] += 1
        self.stats.documented_ops[(kind, where)] += 1
        self.stats.documented_example.setdefault(kind, str(exc).replace("\n", " "))
        return "documented"

    def step(self, line: str, binds: Sequence[str] = ()) -> str:
        """Run `line` in both namespaces, compare every live name; return the outcome."""
        assert not self.done
        self.program.lines.append(line)
        self.program.binds.append(tuple(binds))
        op = op_name(line)
        self.stats.steps += 1
        self.stats.ops[op] += 1
        t_exc = _exec(line, self.tns)
        s_exc = _exec(line, self.sns)
        if t_exc is not None:
            if s_exc is None:
                return self._fail(
                    "no error",
                    f"torch raised, shardlib did not:\n{_describe(t_exc)}",
                )
            self.stats.both_raised += 1
            outcome = "both raised"
        elif s_exc is not None:
            if isinstance(s_exc, DOCUMENTED):
                return self._document(s_exc, op)
            return self._fail("crash", "torch succeeded, shardlib raised:", s_exc)
        else:
            outcome = "ok"
            for name in binds:
                if name not in self.live:
                    self.live.append(name)
        return self.compare(outcome, op)

    def compare(self, outcome: str, op: str) -> str:
        bad = []
        for name in self.live:
            want = self.tns[name]
            got = self.sns.get(name)
            if isinstance(got, sl.ShardedTensor):
                try:
                    got = got.full()
                except Exception as exc:  # noqa: BLE001
                    if isinstance(exc, DOCUMENTED):
                        return self._document(exc, f"{op} (then {name}.full())")
                    return self._fail("full() crashed", f"{name}.full() raised:", exc)
            self.stats.comparisons += 1
            d = _values_equal(want, got)
            if d:
                bad.append((name, d))
        if bad:
            detail = "\n".join(f"{n}: {d}" for n, d in bad)
            return self._fail("silent difference", detail, names=[n for n, _ in bad])
        return outcome


def replay(program: Program, stats: Stats | None = None) -> Runner:
    """Run a stored program again (for `minimize` and for reproducer checks)."""
    r = Runner(program.axes, stats or Stats())
    for line, binds in zip(program.lines, program.binds):
        r.step(line, binds)
        if r.done:
            break
    return r


def _uses_undefined(program: Program) -> bool:
    """True if some line reads a name no earlier line binds (after deleting steps)."""
    bound: set[str] = set()
    for line, binds in zip(program.lines, program.binds):
        used = set(_NAME.findall(line.partition(" = ")[2] if binds else line))
        if used - bound:
            return True
        bound |= set(binds)
    return False


def minimize(failure: Failure, budget: int = 60) -> Failure:
    """Delete steps (never line 0) while the same failure shows at the same line."""
    want = failure.signature
    prog = Program(
        failure.program.axes,
        failure.program.lines[: failure.step + 1],
        failure.program.binds[: failure.step + 1],
    )
    best = failure
    tries = 0
    changed = True
    while changed and tries < budget:
        changed = False
        i = len(prog.lines) - 2
        while i >= 1 and tries < budget:
            cand = Program(
                prog.axes,
                prog.lines[:i] + prog.lines[i + 1 :],
                prog.binds[:i] + prog.binds[i + 1 :],
            )
            i -= 1
            if _uses_undefined(cand):
                continue
            tries += 1
            r = replay(cand)
            if r.failure is not None and r.failure.signature == want:
                prog = Program(
                    cand.axes, cand.lines[: r.failure.step + 1], cand.binds[: r.failure.step + 1]
                )
                best = r.failure
                changed = True
    best.minimized_from = len(failure.program.lines) - 1
    return best


# == generation ================================================================
# `draw(strategy)` is hypothesis's `data.draw`; the helpers below take simple
# callables so the module does not depend on hypothesis's types.
Draw = Callable[[Any], Any]


class Chooser:
    """Small choices over hypothesis's `data.draw` (integers, picks, coin flips)."""

    def __init__(self, draw: Draw) -> None:
        from hypothesis import strategies as st

        self._draw = draw
        self._st = st

    def int(self, lo: int, hi: int) -> int:
        return self._draw(self._st.integers(lo, hi))

    def pick(self, seq: Sequence[Any]) -> Any:
        return self._draw(self._st.sampled_from(list(seq)))

    def coin(self, p: float = 0.5) -> bool:
        # hypothesis has no biased coin; an integer in [0, 99] shrinks towards True
        return self._draw(self._st.integers(0, 99)) < int(p * 100)

    def weighted(self, table: Sequence[tuple[Any, int]]) -> Any:
        total = sum(w for _, w in table)
        k = self.int(0, total - 1)
        for item, w in table:
            if k < w:
                return item
            k -= w
        raise AssertionError("unreachable")


def _fmt_shape(shape: Sequence[int]) -> str:
    return ", ".join(str(s) for s in shape)


def draw_layout(ch: Chooser, axes: Mapping[str, int], ndim: int) -> sl.Layout:
    """A layout of rank `ndim`: about a third partial (mostly sum), the rest split/replicated."""
    all_layouts = layouts_for(axes, ndim)
    kind = ch.weighted([("plain", 6), ("sum", 3), ("other", 1)])
    if kind == "plain":
        pool = [lay for lay in all_layouts if not lay.partial]
    elif kind == "sum":
        pool = [lay for lay in all_layouts if lay.partial and lay.reduce_op == "sum"]
    else:
        pool = [lay for lay in all_layouts if lay.partial and lay.reduce_op != "sum"]
    return ch.pick(pool or all_layouts)


def draw_base(ch: Chooser) -> tuple[dict[str, int], str]:
    """A mesh and the source line that builds the base tensor ``t0``."""
    axes = ch.pick(MESHES)
    ndim = ch.weighted([(1, 2), (2, 5), (3, 3)])
    shape: list[int] = []
    for _ in range(ndim):
        s = ch.pick(DIM_SIZES)
        if math.prod(shape) * s > MAX_NUMEL:
            s = 1
        shape.append(s)
    layout = draw_layout(ch, axes, ndim)
    start = ch.int(-4, 2)
    a = f"A({_fmt_shape(shape)}" + (f", start={start})" if start else ")")
    return axes, f"t0 = mk({a}, {layout!r})"


def _fresh(runner: Runner, prefix: str, k: int = 1) -> list[str]:
    """`k` names with `prefix` that no line of the program binds yet."""
    used = {n for b in runner.program.binds for n in b}
    out: list[str] = []
    i = 1
    while len(out) < k:
        if f"{prefix}{i}" not in used:
            out.append(f"{prefix}{i}")
        i += 1
    return out


def _index_entries(ch: Chooser, shape: Sequence[int], allow_none: bool = True) -> list[str]:
    """A basic index for `shape`: ints, slices (steps too), None and `...`."""
    entries: list[str] = []
    k = ch.int(1, max(1, len(shape)))
    for d in range(min(k, len(shape))):
        n = shape[d]
        kind = ch.weighted(
            [("full", 2), ("slice", 5), ("int", 3), ("none", 1 if allow_none else 0)]
        )
        if kind == "none":
            entries.append("None")
            kind = "full" if ch.coin() else "slice"
        if kind == "full":
            entries.append(":")
        elif kind == "int" and n > 0:
            i = ch.int(-n, n - 1)
            entries.append(str(i))
        else:
            lo = ch.int(0, max(0, n - 1))
            hi = ch.int(lo, n + 1)
            step = ch.weighted([(1, 4), (2, 2), (3, 1)])
            s = f"{lo if lo else ''}:{hi if hi <= n else ''}"
            if step > 1:
                s += f":{step}"
            entries.append(s)
    if len(shape) == 0 or (len(entries) < len(shape) and ch.coin(0.15)):
        entries.insert(0, "...") if entries and ch.coin() else entries.append("...")
    if ch.coin(0.1) and allow_none:
        entries.insert(ch.int(0, len(entries)), "None")
    return entries


def _reshape_target(ch: Chooser, shape: Sequence[int]) -> list[int]:
    n = math.prod(shape)
    kind = ch.weighted([("flat", 2), ("merge", 3), ("split", 3), ("random", 3)])
    if kind == "flat" or len(shape) == 0:
        return [-1]
    if kind == "merge" and len(shape) >= 2:
        d = ch.int(0, len(shape) - 2)
        return list(shape[:d]) + [shape[d] * shape[d + 1]] + list(shape[d + 2 :])
    if kind == "split":
        d = ch.int(0, len(shape) - 1)
        divs = [f for f in range(1, shape[d] + 1) if shape[d] % f == 0] or [1]
        f = ch.pick(divs)
        return list(shape[:d]) + [f, -1 if ch.coin(0.3) else shape[d] // f] + list(shape[d + 1 :])
    # a random factorization of n into 1..3 dims
    out: list[int] = []
    rest = n
    for _ in range(ch.int(0, 2)):
        divs = [f for f in range(1, rest + 1) if rest % f == 0] if rest else [0, 1, 2]
        f = ch.pick(divs)
        out.append(f)
        rest = rest // f if f else rest
    out.append(rest if not ch.coin(0.3) else -1)
    return out


def _expand_target(ch: Chooser, shape: Sequence[int]) -> list[int]:
    out = [ch.pick((1, 2, 3)) if s == 1 else (-1 if ch.coin() else s) for s in shape]
    if not any(s == 1 for s in shape) or ch.coin(0.4):
        out = [ch.pick((2, 3))] + out
    return out


def _operand(ch: Chooser, runner: Runner, shape: Sequence[int], allow_scalar: bool = True) -> str:
    """An operand broadcastable to `shape`: a scalar, a live tensor, or a fresh one."""
    kinds = [("scalar", 3 if allow_scalar else 0), ("live", 4), ("fresh", 3), ("plain", 1)]
    kind = ch.weighted(kinds)
    if kind == "scalar":
        return str(ch.pick((-2, -1, 0, 1, 2, 3, 0.5)))
    if kind == "live":
        ok = [n for n, t in runner.tensors().items() if _broadcasts(tuple(t.shape), tuple(shape))]
        if ok:
            return ch.pick(ok)
    # fresh: the full shape or a broadcastable suffix / size-1 dims
    shp = list(shape)
    if shp and ch.coin(0.3):
        shp = shp[ch.int(1, len(shp)) :]
    if shp and ch.coin(0.2):
        d = ch.int(0, len(shp) - 1)
        shp[d] = 1
    start = ch.int(-3, 3)
    a = f"A({_fmt_shape(shp)}" + (f", start={start})" if start else ")")
    if kind == "plain":
        return a
    return f"mk({a}, {draw_layout(ch, runner.program.axes, len(shp))!r})"


def _broadcasts(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    if len(src) > len(dst):
        return False
    return all(s in (1, d) for s, d in zip(reversed(src), reversed(dst)))


def _n_outputs(runner: Runner, expr: str) -> int | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return len(eval(expr, dict(runner.tns)))  # noqa: S307
    except Exception:  # noqa: BLE001
        return None


def _shape_of(runner: Runner, expr: str) -> tuple[int, ...] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tuple(eval(expr, dict(runner.tns)).shape)  # noqa: S307
    except Exception:  # noqa: BLE001
        return None


def draw_view(ch: Chooser, runner: Runner, x: str) -> tuple[str, tuple[str, ...]]:
    t = runner.tns[x]
    shape = tuple(t.shape)
    nd = len(shape)
    v = _fresh(runner, "v")[0]
    ops = [
        ("getitem", 6),
        ("slice", 4),
        ("select", 2 if nd else 0),
        ("narrow", 2 if nd else 0),
        ("view", 4),
        ("reshape", 2),
        ("transpose", 2 if nd >= 2 else 0),
        ("t", 1 if nd <= 2 else 0),
        ("permute", 2 if nd >= 2 else 0),
        ("unsqueeze", 2),
        ("squeeze", 1),
        ("expand", 2),
        ("diagonal", 2 if nd >= 2 else 0),
        ("split", 3 if nd else 0),
        ("unbind", 1 if nd and shape[0] <= 4 else 0),
        ("movedim", 1 if nd >= 2 else 0),
        ("detach", 1),
        ("contiguous", 1),
        ("unflatten", 1 if nd else 0),
    ]
    op = ch.weighted(ops)
    d = ch.int(0, nd - 1) if nd else 0
    if op == "getitem":
        return f"{v} = {x}[{', '.join(_index_entries(ch, shape))}]", (v,)
    if op == "slice":
        n = shape[d] if nd else 1
        lo = ch.int(0, max(0, n - 1))
        hi = ch.int(lo, n)
        step = ch.weighted([(1, 3), (2, 2), (3, 1)])
        sl_ = f"{lo}:{hi}" + (f":{step}" if step > 1 else "")
        return f"{v} = {x}[{', '.join([':'] * d + [sl_])}]", (v,)
    if op == "select":
        return f"{v} = {x}.select({d}, {ch.int(-shape[d], shape[d] - 1) if shape[d] else 0})", (v,)
    if op == "narrow":
        start = ch.int(0, shape[d])
        length = ch.int(0, shape[d] - start)
        return f"{v} = {x}.narrow({d}, {start}, {length})", (v,)
    if op in ("view", "reshape"):
        tgt = _reshape_target(ch, shape)
        return f"{v} = {x}.{op}({_fmt_shape(tgt)})", (v,)
    if op == "unflatten":
        divs = [f for f in range(1, shape[d] + 1) if shape[d] % f == 0] or [1]
        f = ch.pick(divs)
        return f"{v} = {x}.unflatten({d}, ({f}, -1))", (v,)
    if op == "transpose":
        d2 = ch.int(0, nd - 1)
        return f"{v} = {x}.transpose({d}, {d2})", (v,)
    if op == "t":
        return f"{v} = {x}.t()", (v,)
    if op == "permute":
        perm = list(range(nd))
        for i in range(nd - 1, 0, -1):
            j = ch.int(0, i)
            perm[i], perm[j] = perm[j], perm[i]
        return f"{v} = {x}.permute({_fmt_shape(perm)})", (v,)
    if op == "movedim":
        return f"{v} = {x}.movedim({d}, {ch.int(-nd, nd - 1)})", (v,)
    if op == "unsqueeze":
        return f"{v} = {x}.unsqueeze({ch.int(-nd - 1, nd)})", (v,)
    if op == "squeeze":
        ones = [i for i, s in enumerate(shape) if s == 1]
        if ones and ch.coin():
            return f"{v} = {x}.squeeze({ch.pick(ones)})", (v,)
        return f"{v} = {x}.squeeze()", (v,)
    if op == "expand":
        return f"{v} = {x}.expand({_fmt_shape(_expand_target(ch, shape))})", (v,)
    if op == "diagonal":
        d2 = ch.int(0, nd - 1)
        if d2 == d:
            d2 = (d + 1) % nd
        return f"{v} = {x}.diagonal({ch.int(-2, 2)}, {d}, {d2})", (v,)
    if op in ("split", "unbind"):
        n = shape[d]
        how = "unbind" if op == "unbind" else ch.pick(("split", "chunk", "sizes", "tensor_split"))
        if how == "unbind":
            expr = f"{x}.unbind({d})"
        elif how == "split":
            expr = f"{x}.split({ch.int(1, max(1, n))}, {d})"
        elif how == "chunk":
            expr = f"{x}.chunk({ch.int(1, 4)}, {d})"
        elif how == "sizes":
            a = ch.int(0, n)
            expr = f"{x}.split([{a}, {n - a}], {d})"
        else:
            expr = f"{x}.tensor_split({ch.int(1, 4)}, {d})"
        k = _n_outputs(runner, expr)
        if k is None or k == 0:
            return f"{v} = {expr}", (v,)  # torch raises; both must
        if k <= 3 and ch.coin(0.6):
            names = _fresh(runner, "v", k)
            return f"{', '.join(names)}{',' if k == 1 else ''} = {expr}", tuple(names)
        return f"{v} = {expr}[{ch.int(-k, k - 1)}]", (v,)
    if op == "detach":
        return f"{v} = {x}.detach()", (v,)
    return f"{v} = {x}.contiguous()", (v,)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _offsets(t: torch.Tensor) -> set[int]:
    """The storage offsets of every element of `t` (small tensors only)."""
    off = torch.tensor(t.storage_offset(), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return set(off.flatten().tolist())


def _overlap_hazard(runner: Runner, line: str, target: str) -> str:
    """`line` with order-dependent live operands replaced by ``name.clone()``.

    An in-place op whose operand overlaps the memory it writes (and is not
    that very view) is either refused by torch ("some elements of the input
    tensor and the written-to tensor refer to a single memory location") —
    kept: shardlib must refuse it too — or computed in torch's memory order, a
    result no sharded implementation can be asked to reproduce (e.g.
    ``x.add_(x.diagonal())``, ``x.mul_(x[:, :1])``). A trial run on a deep copy of the torch namespace
    (which keeps the views' shared storage) tells the two apart. Operands in
    the same storage but disjoint from the written elements are kept.
    """
    lhs, sep, rhs = line.partition(" = ")
    if sep and "[" in lhs:  # setitem: the written elements are lhs's
        try:
            written = eval(lhs, dict(runner.tns))  # noqa: S307  (basic indexing: a view)
        except Exception:  # noqa: BLE001  (an index torch rejects: both must raise)
            return line
        used = list(dict.fromkeys(_NAME.findall(rhs)))
    else:
        lhs, sep, rhs = "", "", line
        written = runner.tns[target]
        used = [n for n in dict.fromkeys(_NAME.findall(line)) if n != target]
    if not isinstance(written, torch.Tensor) or not written.numel():
        return line
    risky = []
    for n in used:
        u = runner.tns.get(n)
        if not isinstance(u, torch.Tensor) or not u.numel() or _same_view(u, written):
            continue
        if u.untyped_storage().data_ptr() != written.untyped_storage().data_ptr():
            continue
        if _offsets(u) & _offsets(written):
            risky.append(n)
    if not risky:
        return line
    tensors = {k: v for k, v in runner.tns.items() if isinstance(v, torch.Tensor)}
    trial = {**runner.tns, **copy.deepcopy(tensors)}
    if _exec(line, trial) is not None:
        return line  # torch refuses: shardlib must too
    for n in risky:
        rhs = re.sub(rf"\b{n}\b(?!\.clone)", f"{n}.clone()", rhs)
    return f"{lhs}{sep}{rhs}"


def draw_inplace(ch: Chooser, runner: Runner, x: str) -> tuple[str, tuple[str, ...]]:
    line, binds = _draw_inplace(ch, runner, x)
    return _overlap_hazard(runner, line, x), binds


def _draw_inplace(ch: Chooser, runner: Runner, x: str) -> tuple[str, tuple[str, ...]]:
    t = runner.tns[x]
    shape = tuple(t.shape)
    nd = len(shape)
    op = ch.weighted(
        [
            ("add_", 4),
            ("sub_", 1),
            ("mul_", 3),
            ("neg_", 1),
            ("zero_", 2),
            ("fill_", 2),
            ("copy_", 3),
            ("setitem", 5),
            ("setitem+=", 2),
            ("clamp_", 2),
            ("out=", 3),
            ("iadd", 2),
            ("imul", 1),
            ("data=", 1),
            ("t_", 1 if nd <= 2 else 0),
            ("unsqueeze_", 1),
        ]
    )
    if op in ("add_", "sub_", "mul_"):
        rhs = _operand(ch, runner, shape)
        alpha = (
            ", alpha=2"
            if op != "mul_" and not rhs.lstrip("-").replace(".", "").isdigit() and ch.coin(0.3)
            else ""
        )
        return f"{x}.{op}({rhs}{alpha})", ()
    if op == "neg_":
        return f"{x}.neg_()", ()
    if op == "zero_":
        return f"{x}.zero_()", ()
    if op == "fill_":
        return f"{x}.fill_({ch.pick((-1, 0, 2, 7))})", ()
    if op == "copy_":
        return f"{x}.copy_({_operand(ch, runner, shape, allow_scalar=False)})", ()
    if op in ("setitem", "setitem+="):
        idx = ", ".join(_index_entries(ch, shape, allow_none=False))
        sub = _shape_of(runner, f"{x}[{idx}]")
        if op == "setitem+=":
            return f"{x}[{idx}] += {ch.pick((1, 2, -3))}", ()
        rhs = (
            str(ch.pick((0, 1, -2, 5)))
            if sub is None or ch.coin(0.4)
            else _operand(ch, runner, sub, allow_scalar=False)
        )
        return f"{x}[{idx}] = {rhs}", ()
    if op == "clamp_":
        lo = ch.int(-3, 3)
        if ch.coin(0.3):
            return f"{x}.clamp_(min={lo})", ()
        return f"{x}.clamp_({lo}, {lo + ch.int(0, 6)})", ()
    if op == "out=":
        # `a` has out's shape: a smaller result would make torch resize `out`
        same = [n for n, u in runner.tensors().items() if tuple(u.shape) == shape]
        a = (
            ch.pick(same)
            if ch.coin(0.6)
            else f"mk(A({_fmt_shape(shape)}), {draw_layout(ch, runner.program.axes, nd)!r})"
        )
        b = _operand(ch, runner, shape)
        fn = ch.pick(("add", "mul", "sub"))
        return f"torch.{fn}({a}, {b}, out={x})", ()
    if op == "iadd":
        return f"{x} += {_operand(ch, runner, shape)}", ()
    if op == "imul":
        return f"{x} *= {ch.pick((-1, 2, 3))}", ()
    if op == "data=":
        return f"{x}.data = {x}.data * {ch.pick((2, 3, -1))}", ()
    if op == "t_":
        return f"{x}.t_()", ()
    return f"{x}.unsqueeze_({ch.int(-nd - 1, nd)})", ()


def draw_read(ch: Chooser, runner: Runner, x: str) -> tuple[str, tuple[str, ...]]:
    t = runner.tns[x]
    shape = tuple(t.shape)
    nd = len(shape)
    r = _fresh(runner, "r")[0]
    op = ch.weighted([
        ("clone", 10), ("binary", 10), ("sum", 10), ("sumdim", 10 if nd else 0),
        ("amax", 3 if nd else 0), ("matmul", 3 if nd == 2 else 0), ("equal", 1), ("tolist", 1),
        ("item", 3 if t.numel() == 1 else 0),
    ])  # fmt: skip
    if op == "clone":
        return f"{r} = {x}.clone()", (r,)
    if op == "binary":
        fn = ch.pick(("+", "*", "-"))
        return f"{r} = {x} {fn} {_operand(ch, runner, shape)}", (r,)
    if op == "sum":
        return f"{r} = {x}.sum()", (r,)
    if op == "sumdim":
        kd = ", keepdim=True" if ch.coin(0.3) else ""
        return f"{r} = {x}.sum({ch.int(-nd, nd - 1)}{kd})", (r,)
    if op == "amax":
        return f"{r} = {x}.amax({ch.int(0, nd - 1)})", (r,)
    if op == "matmul":
        return f"{r} = {x} @ {x}.t()", (r,)
    if op == "equal":
        ok = [n for n, u in runner.tensors().items() if tuple(u.shape) == shape]
        return f"{r} = torch.equal({x}, {ch.pick(ok)})", (r,)
    if op == "item":
        return f"{r} = {x}.item()", (r,)
    return f"{r} = {x}.tolist()", (r,)


def draw_step(ch: Chooser, runner: Runner) -> tuple[str, tuple[str, ...]]:
    """One step on a live tensor: a view (40%), an in-place op (45%) or a read (15%)."""
    tensors = runner.tensors()
    names = list(tensors)
    # prefer recent names a little: views of views are where aliasing gets interesting
    x = ch.pick(names) if ch.coin(0.6) else names[-1]
    kind = ch.weighted([("view", 8), ("inplace", 9), ("read", 3)])
    if len(names) >= 10:
        kind = ch.weighted([("inplace", 9), ("read", 1)])
    if kind == "view":
        return draw_view(ch, runner, x)
    if kind == "inplace":
        return draw_inplace(ch, runner, x)
    return draw_read(ch, runner, x)


def run_program(ch: Chooser, stats: Stats, max_steps: int = 10) -> Runner:
    """Draw and run one program (base + up to `max_steps` steps); record it in `stats`."""
    axes, line = draw_base(ch)
    runner = Runner(axes, stats)
    runner.step(line, ("t0",))
    for _ in range(ch.int(max(1, max_steps // 2), max_steps)):
        if runner.done:
            break
        line, binds = draw_step(ch, runner)
        runner.step(line, binds)
    stats.programs += 1  # counted at the end: hypothesis may abort a draw midway
    if runner.failure is not None:
        stats.failures.append(runner.failure)
        stats.failure_classes[runner.failure.op_class] += 1
    elif runner.documented is None:
        stats.ok_programs += 1
    return runner
