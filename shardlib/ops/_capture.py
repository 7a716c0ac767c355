"""`sl.capture`: record a step's per-device program once, replay it without layout dispatch.

Owns the recorder (a dispatch mode that sees only the plain-tensor ops shardlib runs on
each device's blocks, its collectives included), the program (those ops in order, with
dead ones dropped and every intermediate freed after its last use), its replay, and the
guard that re-records when the arguments' layouts or shapes change. It owns no op rule:
the first call runs the function eagerly, through the same dispatch, autograd and
planner as any eager call, and the program is what that call did on this process.

Replay runs the recorded aten ops and collectives on the new arguments' blocks, with no
subclass dispatch, no rule lookup and no autograd graph (the backward was recorded as
ops). The collectives are the functional ones of ``torch.distributed`` (as under
torch.compile); every ledger record the recording made is made again, in the same place.

What a captured function may do (as ``jax.jit`` or a CUDA graph): compute from its
arguments, write their blocks in place, call ``backward`` and leave gradients in the
``.grad`` of arguments (replay sets them), and return tensors and constants. What the
recording refuses, naming the fix: reading a tensor's value into Python (``.item()``,
``bool(t)``: replay could not take another branch), gradients arriving at a leaf that
is not an argument (replay could not set its ``.grad``), a counter-mode `sl.rng`
opened outside the function (replay would repeat its keys), and a simulated
`sl.shard_map` over several devices (its devices run on threads). Python state the
function changes other than these (a list it appends to, an optimizer's state it
creates) is not replayed. The range checks shardlib makes on indices and class targets
(eager raises IndexError) are assertion ops in the program, so every replay checks its own
values (a RuntimeError naming the bound).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from .._errors import ShardlibError
from ..collectives import _ledger
from . import _dispatch, _rng, _tensor
from ._tensor import ShardedTensor

__all__ = ["CaptureError", "capture", "capturing"]

_aten = torch.ops.aten
# Ops that read a tensor's value into Python: a replay could not follow another branch.
_DATA_READS = {_aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default}
_active: list[_Program] = []  # the program being recorded on this process (one at a time)


class CaptureError(ShardlibError, RuntimeError):
    """A captured function did something its replay could not repeat."""


def capturing() -> bool:
    """Whether `sl.capture` is recording now (blocks are real; their values must not be read)."""
    return bool(_ledger.capture_hooks)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Run ops outside the recording: for tensors made from shapes and layouts only, never
    from a block's values. What they make is a constant of the program (made once, free to
    read into Python); an op inside on an argument's blocks would replay stale values."""
    if not _active:
        yield
        return
    with _disable_current_modes():
        yield


def capture(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Record what `fn` does on this process's blocks on its first call; replay it after.

    The first call with given argument layouts, shapes, dtypes and ``requires_grad`` runs
    `fn` eagerly (same values, same ledger) and records its per-device program: every
    local op and collective shardlib ran, forward and backward. Later calls with the same
    signature replay that program on the new arguments' blocks: no layout dispatch, no
    rule lookups, no autograd graph, so a small model's step costs what a hand-written
    one does. Another signature records again (each is kept). Numbers and other
    non-tensor arguments are constants of a program: another value records again, so
    pass a value that changes every step (a learning rate) as a tensor.

    A replay returns what `fn` returned (tensors detached), sets the ``.grad`` of every
    argument `fn` left one on, applies `fn`'s in-place writes to its arguments, and
    records `fn`'s collectives in the open ledgers. See the module docs for what `fn` may
    not do; the recording raises `CaptureError` for each.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> w = sl.shard(torch.ones(4, 3), mesh, sl.P("x", None)).requires_grad_()
        >>> @sl.capture
        ... def step(w, x):
        ...     w.grad = None
        ...     loss = (x @ w).sum()
        ...     loss.backward()
        ...     return loss
        >>> x = sl.shard(torch.ones(2, 4), mesh, sl.P(None, "x"))
        >>> float(step(w, x).full()), float(step(w, 2 * x).full())  # recorded, then replayed
        (24.0, 48.0)
        >>> w.grad.spec, w.grad.full()[0].tolist()
        (P('x', None), [4.0, 4.0, 4.0])
    """
    programs: dict[Any, list[_Program]] = {}
    recorded: list[Any] = []  # the keys of the recordings, in order

    @functools.wraps(fn)
    def captured(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = tree_flatten((args, kwargs))
        key = (treedef, _signature(leaves))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        for program in programs.get(key, ()):
            if all(_grad_sig(tensors[pos]) == sig for pos, sig in program.entry_grads):
                return program.replay(tensors)
        out, program = _record(fn, args, kwargs, tensors)
        programs.setdefault(key, []).append(program)
        recorded.append(key)
        if len(recorded) == _WARN_AFTER:
            _warn_rerecording(fn, recorded)
        return out

    captured.programs = programs  # type: ignore[attr-defined]  # for inspection and tests
    return captured


_WARN_AFTER = 8  # recordings of one function before it says which argument keeps changing


def _warn_rerecording(fn: Callable, keys: list[Any]) -> None:
    (tree_a, (sig_a, *_)), (tree_b, (sig_b, *_)) = keys[-2], keys[-1]
    if tree_a != tree_b:
        what = "the arguments' structure (their pytree) changes between calls"
    else:
        changed = [i for i, (a, b) in enumerate(zip(sig_a, sig_b)) if a != b]
        kinds = sorted({sig_b[i][0].__name__ for i in changed})
        what = f"flattened argument(s) {changed} ({', '.join(kinds)}) change between calls"
    warnings.warn(
        f"sl.capture: {getattr(fn, '__qualname__', fn)!r} has recorded {len(keys)} programs: "
        f"{what}, so each call records again and runs eagerly. Pass a number that changes "
        "every step (a step count, a learning rate) as a tensor, and keep shapes and layouts "
        "fixed.",
        stacklevel=3,
    )


# == signature: what a program is valid for =========================================
def _tensor_sig(t: torch.Tensor) -> tuple:
    if isinstance(t, ShardedTensor):
        blocks = tuple((b.stride(), b.storage_offset()) for b in t._shards)
        return (t._layout, t._mesh, t.shape, t.dtype, t.stride(), t.storage_offset(), blocks)
    return (t.shape, t.dtype, t.device, t.stride(), t.storage_offset())


def _signature(leaves: list[Any]) -> tuple:
    first: dict[int, int] = {}
    sig = []
    for i, x in enumerate(leaves):
        alias = first.setdefault(id(x), i)  # the same tensor passed twice stays one value
        if isinstance(x, torch.Tensor):  # (its .grad: `_Program.entry_grads`)
            sig.append((type(x), alias, _tensor_sig(x), x.requires_grad))
        else:
            try:
                hash(x)
            except TypeError:
                x = ("id", id(x))
            sig.append((type(x), x))
    return (tuple(sig), torch.is_grad_enabled(), tuple(_dispatch._state.values()))


def _grad_sig(t: torch.Tensor) -> tuple | None:
    g = t.grad if t.requires_grad else None
    return None if g is None else _tensor_sig(g)


def _blocks(t: torch.Tensor) -> list[torch.Tensor]:
    return t.local_shards() if isinstance(t, ShardedTensor) else [t]


# == recording =====================================================================
class _Recorder(TorchDispatchMode):
    """Sees the plain-tensor ops below shardlib's dispatch (a ShardedTensor op is passed
    on to the subclass, whose local ops then come back here)."""

    def __init__(self, program: _Program) -> None:
        super().__init__()
        self.program = program

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, ShardedTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        if func in _DATA_READS:
            raise CaptureError(
                f"sl.capture: the function reads a tensor's value into Python ({func}: "
                ".item(), bool(t), float(t), t == u as a condition, ...), so its replay "
                "could not take another branch. Read it after the captured call (on what "
                "it returns), or pass it in as an argument."
            )
        out = func(*args, **kwargs)
        if func.name() == _WRAP_ASYNC:  # funcol's eager AsyncCollectiveTensor: the wrapped one
            self.program.alias(out, args[0])
        elif not _on_meta(out, args):  # shape inference: no values, nothing to replay
            self.program.add(func, args, kwargs, out)
        return out


_WRAP_ASYNC = "_c10d_functional::_wrap_tensor_autograd"


def _on_meta(out: Any, args: tuple) -> bool:
    """Whether an op ran on the meta device (its first tensor result, else argument)."""
    for x in (out, *args):
        if isinstance(x, torch.Tensor):
            return x.is_meta
        if isinstance(x, (list, tuple)):
            for t in x:
                if isinstance(t, torch.Tensor):
                    return t.is_meta
    return False


def _record(fn, args, kwargs, arg_leaves) -> tuple[Any, _Program]:
    if _active:
        raise CaptureError(
            "sl.capture: a captured function called another one while recording; "
            "capture the outer function only."
        )
    program = _Program()
    program.take_inputs(arg_leaves)
    counter = _rng._stack[-1] if _rng._stack else None
    count = None if counter is None else counter.count
    _active.append(program)
    _tensor.grad_watchers.append(program)
    _ledger.capture_hooks.append(program.note_record)
    try:
        with _Recorder(program):
            out = fn(*args, **kwargs)
    finally:
        _active.pop()
        _tensor.grad_watchers.pop()
        _ledger.capture_hooks.pop()
    if counter is not None and counter.count != count:
        raise CaptureError(
            "sl.capture: the function draws from an sl.rng('counter') context opened "
            "outside it, so a replay would repeat the same keys. Open the context inside "
            "the captured function (each call then draws the same stream, as eager does) "
            "or pass a seed in and open sl.rng('counter', seed) inside."
        )
    program.finish(out, arg_leaves)
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in tree_flatten(out)[0]]
    return tree_unflatten(detached, program.out_spec), program  # as a replay returns it


class _Program:
    """The ops of one recording, as instructions over numbered values."""

    def __init__(self) -> None:
        self.ids: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> value number
        self.n = 0
        self.consts: list[tuple[int, torch.Tensor]] = []
        self.code: list[tuple] = []  # (kind, ...) see `add` and `note_record`
        self.inputs: list[tuple[int, list[int], list[int] | None]] = []
        self.leaf_records: dict[int, int] = {}  # id(record) -> argument position
        self.reached: set[int] = set()  # positions a gradient reached
        self.reset: set[int] = set()  # positions whose .grad was assigned before one did
        self.entry_sigs: list[tuple | None] = []  # each argument's .grad when recorded

    # -- values ------------------------------------------------------------------
    def _new(self, t: torch.Tensor) -> int:
        v = self.ids[t] = self.n
        self.n += 1
        return v

    def _ref(self, t: torch.Tensor) -> int:
        v = self.ids.get(t)
        if v is None:  # made before the recording and not an argument: held as it is
            v = self._new(t)
            self.consts.append((v, t))
        return v

    def _input(self, t: torch.Tensor) -> int:
        v = self.ids.get(t)
        return self._new(t) if v is None else v

    def take_inputs(self, tensors: list[torch.Tensor]) -> None:
        for pos, t in enumerate(tensors):
            if isinstance(t, ShardedTensor):
                # moves and reductions kept from before the recording are not in it: its
                # replays must make them again from the new values
                t._kept = None
                t.__dict__.pop("_shared_moves", None)
                if t.requires_grad:
                    self.leaf_records[id(_tensor.record_of(t))] = pos
            blocks = [self._input(b) for b in _blocks(t)]
            g = t.grad if t.requires_grad else None
            grad = None if g is None else [self._input(b) for b in _blocks(g)]
            self.entry_sigs.append(_grad_sig(t))
            self.inputs.append((pos, blocks, grad))

    def assigned(self, record: Any) -> None:
        """A ShardedTensor's ``.grad`` was assigned while recording."""
        pos = self.leaf_records.get(id(record))
        if pos is not None and pos not in self.reached:
            self.reset.add(pos)  # (``p.grad = None`` first): the .grad it came with is unread

    def arrived(self, record: Any) -> None:
        """A gradient reached a ShardedTensor leaf while recording."""
        pos = self.leaf_records.get(id(record))
        if pos is not None:
            self.reached.add(pos)
        else:
            layout = record.attrs.get("_layout")
            raise CaptureError(
                f"sl.capture: a gradient reached a leaf ShardedTensor {layout!r} that is not "
                "an argument of the captured function, so a replay could not set its "
                ".grad. Pass every parameter the function differentiates in its arguments "
                "(a dict of them is fine)."
            )

    # -- instructions --------------------------------------------------------------
    def add(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        flat, refs, nested = list(args), [], []
        for i, a in enumerate(flat):
            if isinstance(a, torch.Tensor):
                refs.append((i, self._ref(a)))
                flat[i] = None
            elif isinstance(a, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in a):
                flat[i] = list(a)  # a tensor list (cat, stack, collectives): refs per item
                for j, e in enumerate(a):
                    if isinstance(e, torch.Tensor):
                        nested.append((i, j, self._ref(e)))
                        flat[i][j] = None
        kw = dict(kwargs)
        kw_refs = [(k, self._ref(a)) for k, a in kw.items() if isinstance(a, torch.Tensor)]
        for k, _ in kw_refs:
            kw[k] = None
        if isinstance(out, torch.Tensor):
            outs = None if out in self.ids else self._new(out)  # in place: its argument
        else:
            flat_tuple = isinstance(out, (tuple, list)) and not any(
                isinstance(o, (tuple, list, dict)) for o in out
            )
            leaves = list(out) if flat_tuple else tree_flatten(out)[0]
            outs = []
            for j, o in enumerate(leaves):
                if isinstance(o, torch.Tensor):
                    if o not in self.ids:  # a leaf of a nested result: ("leaf", j)
                        outs.append((j if flat_tuple else ("leaf", j), self._new(o)))
                elif o is not None and not isinstance(o, (int, float, bool, torch.dtype)):
                    raise CaptureError(
                        f"sl.capture: {func} returned a {type(o).__name__}, which a replay "
                        "cannot stand in for (a collective issued outside shardlib's "
                        "backend?). Issue it through shardlib or call it after the "
                        "captured function."
                    )
        placed = len(refs) + len(nested) + len(kw_refs)
        if placed != sum(isinstance(x, torch.Tensor) for x in tree_flatten((args, kwargs))[0]):
            raise CaptureError(  # a replay would hold the recording's tensors as constants
                f"sl.capture: {func} takes tensors nested deeper than one list; the recording "
                "cannot follow them. Call it outside the captured function."
            )
        self.code.append(("op", func, flat, refs, nested, kw, kw_refs, outs))

    def alias(self, t: torch.Tensor, same_as: torch.Tensor) -> None:
        """`t` stands for `same_as`'s value (a wrapper of it that a replay does not need)."""
        self.ids[t] = self._ref(same_as)

    def note_record(self, rec: Any) -> None:
        self.code.append(("record", rec))

    # -- the end of the recording: outputs, dead code, frees ---------------------------
    def finish(self, out: Any, arg_leaves: list[torch.Tensor]) -> None:
        leaves, self.out_spec = tree_flatten(out)
        self.outs = [self._describe(x) for x in leaves]
        self.grads = []
        for (pos, _, before), t in zip(self.inputs, arg_leaves):
            if not t.requires_grad:
                continue
            g = t.grad
            if g is None:
                self.grads.append((pos, None))
            elif before is not None and [self.ids.get(b) for b in _blocks(g)] == before:
                continue  # the same blocks (written in place, if at all): nothing to set
            else:
                self.grads.append((pos, self._describe(g)))
        self._prune()
        used = {v for ins in self.code if ins[0] == "op" for v in _uses(ins)}
        used |= {v for d in [*self.outs, *(g for _, g in self.grads)] for v in _values(d)}
        self.entry_grads = [  # what a replay needs the arguments' .grad to be
            (pos, self.entry_sigs[pos])
            for (pos, _, grad), t in zip(self.inputs, arg_leaves)
            if t.requires_grad and (pos not in self.reset or used.intersection(grad or ()))
        ]
        needed = {pos for pos, _ in self.entry_grads}
        self.inputs = [  # a .grad the program does not read is not an input
            (pos, blocks, grad if pos in needed else None) for pos, blocks, grad in self.inputs
        ]
        self._compile()

    def _describe(self, x: Any) -> tuple:
        if isinstance(x, ShardedTensor):
            blocks = [self._ref(b) for b in x._shards]
            return ("sharded", blocks, x._mesh, x._layout, tuple(x.shape))
        if isinstance(x, torch.Tensor):
            return ("plain", self._ref(x))
        return ("const", x)

    def _prune(self) -> None:
        """Drop ops nothing needs (wrapper metadata, unused views), let a detach or alias
        stand for its input, and free every value after its last use."""
        self._forward_aliases()
        live = {v for d in [*self.outs, *(g for _, g in self.grads)] for v in _values(d)}
        kept: list[tuple] = []
        for ins in reversed(self.code):
            if ins[0] == "op":
                func, uses, made = ins[1], _uses(ins), _made(ins)
                if not (_effectful(func) or any(v in live for v in made)):
                    continue
                live.update(uses)
            kept.append(ins)
        kept.reverse()
        keep = {v for d in [*self.outs, *(g for _, g in self.grads)] for v in _values(d)}
        keep |= {v for v, _ in self.consts}
        last: dict[int, int] = {}
        for i, ins in enumerate(kept):
            if ins[0] == "op":
                for v in _uses(ins):
                    last[v] = i
                for v in _made(ins):
                    last.setdefault(v, i)
        frees: list[list[int]] = [[] for _ in kept]
        for v, i in last.items():
            if v not in keep:
                frees[i].append(v)
        self.ops = [str(ins[1] if ins[0] == "op" else "ledger record") for ins in kept]
        self.code = [
            (*ins[:1], getattr(ins[1], "_op", ins[1]), *ins[2:], tuple(f))
            if ins[0] == "op"
            else ins
            for ins, f in zip(kept, frees)
        ]
        self.ids = WeakIdKeyDictionary()  # no more weak references to the blocks

    def _forward_aliases(self) -> None:
        """``detach(x)`` and ``alias(x)`` become `x` itself (a replay builds no autograd graph,
        so a new tensor object over the same storage changes nothing), unless some op of
        the program changes a tensor's metadata in place (``t_``, ``resize_``, ...)."""
        if any(
            ins[0] == "op" and getattr(ins[1], "_opname", "") in _META_WRITES for ins in self.code
        ):
            return
        same: dict[int, int] = {}
        code = []
        for ins in self.code:
            if ins[0] == "op":
                _, func, flat, refs, nested, kw, kw_refs, outs = ins
                refs = [(i, same.get(v, v)) for i, v in refs]
                nested = [(i, j, same.get(v, v)) for i, j, v in nested]
                kw_refs = [(k, same.get(v, v)) for k, v in kw_refs]
                if func in _ALIASES and isinstance(outs, int) and len(refs) == 1 and not kw_refs:
                    same[outs] = refs[0][1]
                    continue
                ins = ("op", func, flat, refs, nested, kw, kw_refs, outs)
            code.append(ins)
        self.code = code

        def rename(d: tuple | None) -> tuple | None:
            if d is None or d[0] == "const":
                return d
            if d[0] == "sharded":
                return (*d[:1], [same.get(v, v) for v in d[1]], *d[2:])
            return ("plain", same.get(d[1], d[1]))

        self.outs = [rename(d) for d in self.outs]
        self.grads = [(pos, rename(g)) for pos, g in self.grads]

    # -- replay ------------------------------------------------------------------------
    def _compile(self) -> None:
        """The program as one straight-line Python function (a local per value, ``del`` after
        its last use): a replay then costs the ops and little else."""
        consts = {v for v, _ in self.consts}
        env: dict[str, Any] = {"_open": _ledger._open, "_append": _ledger._append}
        env["_leaves"] = lambda t: tree_flatten(t)[0]
        env.update({f"c{v}": t for v, t in self.consts})
        name = lambda v: f"c{v}" if v in consts else f"v{v}"  # noqa: E731

        def lit(x: Any) -> str:
            if x is None or isinstance(x, (bool, int, str)):
                return repr(x)
            if isinstance(x, (list, tuple)) and all(
                e is None or isinstance(e, (bool, int)) for e in x
            ):
                return repr(list(x) if isinstance(x, list) else tuple(x))
            key = f"k{len(env)}"
            env[key] = x
            return key

        self.input_vids = [v for _, blocks, grad in self.inputs for v in [*blocks, *(grad or [])]]
        self.result_vids = sorted(
            {v for d in [*self.outs, *(g for _, g in self.grads)] for v in _values(d)}
        )
        body = [f"    {', '.join(f'v{v}' for v in self.input_vids)}, = inputs"]
        if not self.input_vids:
            body = []
        for i, ins in enumerate(self.code):
            if ins[0] == "record":
                env[f"r{i}"] = ins[1]
                body.append(f"    if _open: _append(r{i})")
                continue
            _, call, flat, refs, nested, kw, kw_refs, outs, frees = ins
            env[f"o{i}"] = call
            args: list[str] = [lit(a) for a in flat]
            for j, v in refs:
                args[j] = name(v)
            for j in {j for j, _, _ in nested}:
                items = [lit(e) for e in flat[j]]
                for jj, k, v in nested:
                    if jj == j:
                        items[k] = name(v)
                args[j] = f"[{', '.join(items)}]"
            named = {k: lit(a) for k, a in kw.items()}
            for k, v in kw_refs:
                named[k] = name(v)
            expr = f"o{i}({', '.join([*args, *(f'{k}={a}' for k, a in named.items())])})"
            if isinstance(outs, int):
                body.append(f"    v{outs} = {expr}")
            elif outs:
                body.append(f"    _t = {expr}")
                for j, v in outs:
                    pick = f"_t[{j}]" if isinstance(j, int) else f"_leaves(_t)[{j[1]}]"
                    body.append(f"    v{v} = {pick}")
            else:
                body.append(f"    {expr}")
            gone = [f"v{v}" for v in frees if v not in consts]
            if gone:
                body.append(f"    del {', '.join(gone)}")
        results = ", ".join(name(v) for v in self.result_vids)
        body.append(f"    return ({results}{',' if self.result_vids else ''})")
        source = "def _replay(inputs):\n" + "\n".join(body) + "\n"
        exec(compile(source, "<sl.capture program>", "exec"), env)  # noqa: S102
        self.source, self.run = source, env["_replay"]

    def replay(self, tensors: list[torch.Tensor]) -> Any:
        """Run the program on `tensors` (the arguments' tensors, in flattened order)."""
        inputs = []
        for pos, _, grad in self.inputs:
            t = tensors[pos]
            inputs += _blocks(t)
            if grad is not None:
                inputs += _blocks(t.grad)
        with torch.no_grad():
            vals = dict(zip(self.result_vids, self.run(inputs)))
        for pos, g in self.grads:
            tensors[pos].grad = None if g is None else _build(g, vals)
        return tree_unflatten([_build(d, vals) for d in self.outs], self.out_spec)


def _uses(ins: tuple) -> list[int]:
    return [v for _, v in ins[3]] + [v for _, _, v in ins[4]] + [v for _, v in ins[6]]


def _made(ins: tuple) -> list[int]:
    outs = ins[7]
    return [outs] if isinstance(outs, int) else [v for _, v in outs or ()]


_ALIASES = {_aten.detach.default, _aten.alias.default}
_META_WRITES = {  # in-place ops that change a tensor's metadata (any overload)
    "t_",
    "transpose_",
    "unsqueeze_",
    "squeeze_",
    "as_strided_",
    "resize_",
    "resize_as_",
    "swapdims_",
    "swapaxes_",
    "set_",
    "detach_",
    "_coalesced_",
    "squeeze_copy_",
}


def _values(d: tuple | None) -> list[int]:
    if d is None or d[0] == "const":
        return []
    return d[1] if d[0] == "sharded" else [d[1]]


def _build(d: tuple, vals: dict[int, Any]) -> Any:
    if d[0] == "sharded":
        _, blocks, mesh, layout, shape = d
        return ShardedTensor([vals[v] for v in blocks], mesh, layout, shape)
    return vals[d[1]] if d[0] == "plain" else d[1]


@functools.cache
def _effectful(func: Any) -> bool:
    """Whether dropping `func` when its result is unused would change anything: it writes
    an argument, draws random numbers, returns nothing (an assertion such as the range
    checks shardlib makes while recording), or is not an aten op (collectives, ledger)."""
    if getattr(func, "namespace", "aten") != "aten":
        return True
    if not func._schema.returns:
        return True
    if torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()):
        return True
    return bool(func._schema.is_mutable)
