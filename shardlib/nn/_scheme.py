"""Parallel schemes: values that map a model's logical dims to layouts (DESIGN §8).

Owns `Scheme`, its composition (`+`), `Scheme.from_config`, `shard_batch`,
`explain`, and the presets `dp`, `fsdp`, `tp1d`, `tp2d`, `tp2p5d`, `tp3d`,
`ulysses`, `ring`. It deliberately owns no communication: a scheme is three
maps from logical dims to layouts (storage, compute, activations) plus which
attention to run; every byte comes from the op rules and the planner when
`snn.linear`, `snn.constrain` and `snn.attention` (``_use.py``) apply them.

Logical dims (the names models use): activations ``batch``, ``seq``,
``tokens`` (flattened batch×seq: batch's axes then seq's), ``embed``,
``heads`` (the query-head dim; in a weight, the flattened heads×head_dim dim),
``kv_heads``, ``head_dim``, ``mlp``, ``vocab``. Weights are stored (in, out):
``linear(x, w) = x @ w``.

Invariants:
- a scheme is frozen and hashable; equal schemes give equal layouts;
- each map is a name map (logical name -> mesh axes) or a rule (a function of
  the dims tuple, e.g. 3D gives a weight's in and out dims different axes);
- a scheme's `axes` are the mesh axes it claims; `a + b` needs disjoint claims
  and splits a dim both map over both axes, left operand major, except that in
  storage an axis a part splits only in storage (FSDP's) goes minor, so the
  move to the compute layout is a plain all-gather;
- an unknown logical name raises (no silent replication, unlike Flax).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import LayoutError
from ..layouts._layout import Layout
from ..layouts._shard import local_shape

__all__ = [
    "KNOWN_DIMS",
    "Scheme",
    "dp",
    "fsdp",
    "ring",
    "tp1d",
    "tp2d",
    "tp2p5d",
    "tp3d",
    "ulysses",
]

KNOWN_DIMS = ("batch", "seq", "tokens", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")
ATTENTIONS = ("local", "ulysses", "ring")
BALANCES = ("zigzag", "stripe", None)
_WIDE = ("heads", "kv_heads", "mlp", "vocab")  # the dims tensor parallelism splits

Axes = tuple[str, ...]
Dims = tuple[str | None, ...]


# == maps: logical dims -> per-dim mesh axes ====================================
def _axes_of(value: Any, where: str) -> Axes:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, tuple | list) and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise LayoutError(
        f"{where}: {value!r} is not a mesh axis; give an axis name, a tuple of names "
        '(major -> minor), or None, e.g. {"batch": ("dp", "r")}.'
    )


@dataclass(frozen=True, slots=True)
class _NameMap:
    """A map logical name -> mesh axes (hashable; prints as the dict that built it)."""

    items: tuple[tuple[str, Axes], ...]

    @staticmethod
    def of(mapping: Mapping[str, Any], where: str) -> _NameMap:
        items = []
        for name, value in mapping.items():
            if not isinstance(name, str):
                raise LayoutError(f"{where}: logical dim names are strings, got {name!r}.")
            items.append((name, _axes_of(value, f"{where}[{name!r}]")))
        return _NameMap(tuple(sorted(items)))

    def __call__(self, dims: Dims) -> tuple[Axes, ...]:
        table = dict(self.items)
        if "tokens" not in table:  # flattened (batch, seq), batch major
            table["tokens"] = table.get("batch", ()) + table.get("seq", ())
        return tuple(table.get(d, ()) if d is not None else () for d in dims)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items)

    @property
    def used_axes(self) -> Axes:
        return tuple(dict.fromkeys(a for _, axes in self.items for a in axes))

    def __repr__(self) -> str:
        def one(axes: Axes) -> str:
            return repr(axes[0]) if len(axes) == 1 else repr(axes)

        return "{" + ", ".join(f"{n!r}: {one(a)}" for n, a in self.items) + "}"


@dataclass(frozen=True, slots=True)
class _Rule:
    """A preset's map that depends on the whole dims tuple: ``fn(dims, *args)``.

    Module-level `fn` and plain `args` keep it a value (equal presets compare equal).
    """

    fn: Callable[..., tuple[Axes, ...]]
    args: tuple[Any, ...] = ()

    def __call__(self, dims: Dims) -> tuple[Axes, ...]:
        return self.fn(dims, *self.args)

    def __repr__(self) -> str:
        return f"{self.fn.__name__}{self.args!r}"


@dataclass(frozen=True, slots=True)
class _Composed:
    """The per-dim union of several schemes' maps (see the module invariants)."""

    parts: tuple[Scheme, ...]
    kind: str  # "params" | "compute" | "acts" | "inputs"

    def __call__(self, dims: Dims) -> tuple[Axes, ...]:
        if self.kind == "acts":
            per = [p._entries("acts", dims) for p in self.parts]
            return tuple(sum((e[d] for e in per), ()) for d in range(len(dims)))
        if self.kind in ("compute", "inputs"):
            per = [p._entries(self.kind, dims) for p in self.parts]
            return tuple(sum((e[d] for e in per), ()) for d in range(len(dims)))
        stored = [p._entries("params", dims) for p in self.parts]
        used = [p._entries("compute", dims) for p in self.parts]
        out = []
        for d in range(len(dims)):
            kept = tuple(a for s, c in zip(stored, used) for a in s[d] if a in c[d])
            only = tuple(a for s, c in zip(stored, used) for a in s[d] if a not in c[d])
            out.append(kept + only)
        return tuple(out)


def _as_map(value: Any, where: str) -> Any:
    if value is None or isinstance(value, _NameMap | _Rule | _Composed):
        return value
    if isinstance(value, Mapping):
        return _NameMap.of(value, where)
    if callable(value):
        return value
    raise LayoutError(
        f"{where}: expected a mapping logical name -> mesh axes (e.g. {{'batch': 'dp'}}) or a "
        f"callable dims -> sl.Layout, got {type(value).__name__} {value!r}."
    )


# == the scheme =================================================================
@dataclass(frozen=True)
class Scheme:
    """A parallel scheme: logical dims -> layouts for weights and activations.

    Fields (each map is a mapping logical name -> mesh axis or tuple of axes,
    or a callable dims tuple -> `sl.Layout`):

    - ``params``: a weight's storage layout;
    - ``compute``: the layout a weight is used in where it differs from
      storage (FSDP: stored split, computed replicated); None: as stored;
    - ``acts``: an activation's layout at a constraint point;
    - ``inputs``: the layout an activation is used in at a linear's input, where
      it differs from ``acts`` (Megatron-SP: the sequence-split residual stream
      is gathered once for the q, k, v projections, §8 table "X gathered");
      None: as at the constraint point;
    - ``attention``: ``"local"``, ``"ulysses"`` or ``"ring"``, with
      ``attention_axis`` (the sequence-parallel axis) and ``balance`` (ring's
      token order: ``"zigzag"``, ``"stripe"`` or None);
    - ``remat``: re-gather weights moved to their compute layout in backward
      instead of keeping the gathered copy;
    - ``axes``: the mesh axes the scheme claims (derived from name maps; give
      it when a map is a callable).

    Read the maps through `param_layout`, `compute_layout` and `act_layout`.

    Examples:
        >>> from shardlib import nn as snn
        >>> s = snn.dp("dp") + snn.tp2d("r", "c")
        >>> s
        dp('dp') + tp2d('r', 'c')
        >>> s.act_layout(("batch", "seq", "embed")), s.param_layout(("embed", "mlp"))
        (P(('dp', 'r'), None, 'c'), P('r', 'c'))
        >>> snn.Scheme(acts={"batch": "x"}).act_layout(("batch", "embed"))
        P('x', None)
    """

    params: Any = field(default_factory=dict)
    compute: Any = None
    acts: Any = field(default_factory=dict)
    inputs: Any = None
    attention: str = "local"
    balance: str | None = None
    remat: bool = False
    axes: tuple[str, ...] = ()
    attention_axis: str | None = None
    label: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("params", "compute", "acts", "inputs"):
            object.__setattr__(self, name, _as_map(getattr(self, name), f"snn.Scheme({name}=...)"))
        if self.params is None:
            object.__setattr__(self, "params", _NameMap(()))
        if self.acts is None:
            object.__setattr__(self, "acts", _NameMap(()))
        if self.attention not in ATTENTIONS:
            raise LayoutError(
                f"snn.Scheme(attention={self.attention!r}): unknown attention; use one of "
                f"{', '.join(map(repr, ATTENTIONS))}."
            )
        if self.balance not in BALANCES:
            raise LayoutError(
                f"snn.Scheme(balance={self.balance!r}): unknown token order; use one of "
                f"{', '.join(map(repr, BALANCES))}."
            )
        if self.attention != "local" and not isinstance(self.attention_axis, str):
            raise LayoutError(
                f"snn.Scheme(attention={self.attention!r}): sequence-parallel attention needs "
                "attention_axis=<the mesh axis the sequence is split over>, e.g. "
                "snn.ulysses('sp')."
            )
        axes = list(_axes_of(self.axes, "snn.Scheme(axes=...)"))
        twice = sorted({a for a in axes if axes.count(a) > 1})
        if twice:
            raise LayoutError(
                f"{self.label or 'snn.Scheme'}: mesh axis {', '.join(map(repr, twice))} is given "
                f"more than once ({tuple(axes)}); each role of a scheme needs its own mesh axis."
            )
        for m in (self.params, self.compute, self.acts, self.inputs):
            if isinstance(m, _NameMap):
                axes += m.used_axes
            elif isinstance(m, _Composed):
                axes += [a for p in m.parts for a in p.axes]
            elif m is not None and not isinstance(m, _Rule) and not self.axes:
                raise LayoutError(
                    "snn.Scheme(...): a map given as a callable needs axes=(...) naming the mesh "
                    "axes it uses, so `snn.use` can check them against the mesh and `+` can "
                    "check claims."
                )
        if self.attention_axis is not None:
            axes.append(self.attention_axis)
        object.__setattr__(self, "axes", tuple(dict.fromkeys(axes)))

    # -- reading the maps ----------------------------------------------------------
    @property
    def known_dims(self) -> tuple[str, ...]:
        """The logical names this scheme accepts: the standard ones plus its maps' own keys."""
        extra: list[str] = []
        for m in (self.params, self.compute, self.acts):
            if isinstance(m, _NameMap):
                extra += [n for n in m.names if n not in KNOWN_DIMS]
            elif isinstance(m, _Composed):
                extra += [n for p in m.parts for n in p.known_dims if n not in KNOWN_DIMS]
        return KNOWN_DIMS + tuple(dict.fromkeys(extra))

    def _check_dims(self, dims: Any, where: str) -> Dims:
        if isinstance(dims, str) or not isinstance(dims, tuple | list):
            raise LayoutError(
                f"{where}: dims is {dims!r}; give a tuple of logical names, one per tensor dim, "
                'e.g. ("batch", "seq", "embed").'
            )
        dims = tuple(dims)
        known = self.known_dims
        unknown = [d for d in dims if d is not None and d not in known]
        if unknown:
            raise LayoutError(
                f"{where}: unknown logical dim {', '.join(map(repr, unknown))} in {dims!r}; the "
                f"known names are {', '.join(known)} (None: a dim never split). Add a name with "
                "a map key, e.g. snn.Scheme(acts={'expert': 'ep'})."
            )
        return dims

    def _entries(self, kind: str, dims: Dims) -> tuple[Axes, ...]:
        m = getattr(self, kind)
        if m is None:  # compute as stored; linear inputs as at their constraint point
            m = self.acts if kind == "inputs" else self.params
        if isinstance(m, _NameMap | _Rule | _Composed):
            return m(dims)
        layout = m(dims)
        if not isinstance(layout, Layout) or layout.partial or layout.ndim > len(dims):
            raise LayoutError(
                f"snn.Scheme({kind}=<callable>): for dims {dims!r} it returned {layout!r}; it must "
                f"return an sl.Layout without partial axes and at most {len(dims)} entries."
            )
        return layout.dims + ((),) * (len(dims) - layout.ndim)

    def _layout(self, kind: str, dims: Any, where: str) -> Layout:
        dims = self._check_dims(dims, where)
        return Layout(self._entries(kind, dims))

    def param_layout(self, dims: Dims) -> Layout:
        """Storage layout of a weight with logical `dims`.

        Examples:
            >>> from shardlib import nn as snn
            >>> snn.tp1d("tp").param_layout(("embed", "mlp"))
            P(None, 'tp')
        """
        return self._layout("params", dims, f"{self!r}.param_layout({dims!r})")

    def compute_layout(self, dims: Dims) -> Layout:
        """Layout a weight with logical `dims` is used in (its storage layout unless the scheme says).

        Examples:
            >>> from shardlib import nn as snn
            >>> s = snn.fsdp("dp")
            >>> s.param_layout(("embed", "mlp")), s.compute_layout(("embed", "mlp"))
            (P(None, 'dp'), P(None, None))
        """
        return self._layout("compute", dims, f"{self!r}.compute_layout({dims!r})")

    def input_layout(self, dims: Dims) -> Layout:
        """Layout an activation with logical `dims` is used in at a linear's input.

        Examples:
            >>> from shardlib import nn as snn
            >>> snn.tp1d("tp", sequence=True).input_layout(("batch", "seq", "embed"))
            P(None, None, None)
        """
        return self._layout("inputs", dims, f"{self!r}.input_layout({dims!r})")

    def act_layout(self, dims: Dims) -> Layout:
        """Layout of an activation with logical `dims` at a constraint point.

        Examples:
            >>> from shardlib import nn as snn
            >>> snn.tp1d("tp", sequence=True).act_layout(("batch", "seq", "embed"))
            P(None, 'tp', None)
        """
        return self._layout("acts", dims, f"{self!r}.act_layout({dims!r})")

    @property
    def moves_weights(self) -> bool:
        """Whether some weight's compute layout may differ from its storage layout."""
        if isinstance(self.compute, _Composed):
            return any(p.moves_weights for p in self.compute.parts)
        return self.compute is not None

    # -- composition -----------------------------------------------------------------
    def __add__(self, other: Scheme) -> Scheme:
        if not isinstance(other, Scheme):
            return NotImplemented
        both = [a for a in self.axes if a in other.axes]
        if both:
            raise LayoutError(
                f"({self!r}) + ({other!r}): mesh axis {', '.join(map(repr, both))} is claimed "
                f"by both (the left claims {self.axes}, the right {other.axes}); a mesh axis "
                "serves one purpose. Give each scheme its own axis, e.g. dp('dp') + tp1d('tp')."
            )
        sp = [s for s in (self, other) if s.attention != "local"]
        if len(sp) > 1:
            raise LayoutError(
                f"({self!r}) + ({other!r}): both run sequence-parallel attention "
                f"({self.attention!r} and {other.attention!r}); combine at most one of "
                "ulysses and ring with other schemes."
            )
        parts = tuple(
            q
            for s in (self, other)
            for q in (s.acts.parts if isinstance(s.acts, _Composed) else (s,))
        )
        attn = sp[0] if sp else self
        return Scheme(
            params=_Composed(parts, "params"),
            compute=_Composed(parts, "compute") if any(p.moves_weights for p in parts) else None,
            acts=_Composed(parts, "acts"),
            inputs=_Composed(parts, "inputs") if any(p.inputs is not None for p in parts) else None,
            attention=attn.attention,
            balance=attn.balance,
            remat=self.remat or other.remat,
            axes=self.axes + other.axes,
            attention_axis=attn.attention_axis,
            label=f"{self!r} + {other!r}",
        )

    def __repr__(self) -> str:
        if self.label is not None:
            return self.label
        args = [f"params={self.params!r}"]
        if self.compute is not None:
            args.append(f"compute={self.compute!r}")
        args.append(f"acts={self.acts!r}")
        if self.attention != "local":
            args += [f"attention={self.attention!r}", f"attention_axis={self.attention_axis!r}"]
        if self.balance is not None:
            args.append(f"balance={self.balance!r}")
        if self.remat:
            args.append("remat=True")
        return f"Scheme({', '.join(args)})"

    # -- configuration ---------------------------------------------------------------
    @staticmethod
    def from_config(
        cfg: Mapping[str, Any] | str | os.PathLike, *, section: str | None = None
    ) -> Scheme:
        """A scheme from a dict or a TOML file, composed in the order dp + fsdp + tp + sp.

        Keys: ``"dp"`` (an axis), ``"fsdp"`` (an axis, or ``{"axis", "remat"}``),
        ``"tp"`` (``{"kind": "1d", "axis", "sequence"}``, ``"2d"`` row/col,
        ``"2.5d"`` depth/row/col, ``"3d"`` i/j/k), ``"sp"`` (``{"kind":
        "ulysses", "axis"}`` or ``{"kind": "ring", "axis", "balance"}``; TOML
        has no null: write ``balance = "none"``). `section` picks a (dotted)
        table of the file, e.g. ``"train.parallel"``.

        Examples:
            >>> from shardlib import nn as snn
            >>> cfg = {"dp": "dp", "tp": {"kind": "2d", "row": "r", "col": "c"}}
            >>> snn.Scheme.from_config(cfg)
            dp('dp') + tp2d('r', 'c')
            >>> snn.Scheme.from_config(cfg) == snn.dp("dp") + snn.tp2d("r", "c")
            True
        """
        where = "snn.Scheme.from_config"
        if isinstance(cfg, str | os.PathLike):
            where = f"snn.Scheme.from_config({os.fspath(cfg)!r})"
            cfg = _read_toml(cfg, where)
        if section is not None:
            for key in section.split("."):
                if not isinstance(cfg, Mapping) or key not in cfg:
                    have = sorted(cfg) if isinstance(cfg, Mapping) else []
                    raise LayoutError(
                        f"{where}: no table {section!r} (missing {key!r}; there are {have})."
                    )
                cfg = cfg[key]
        if not isinstance(cfg, Mapping):
            raise LayoutError(
                f"{where}: expected a dict (or TOML table) of parallelism keys, got "
                f"{type(cfg).__name__}."
            )
        unknown = [k for k in cfg if k not in _CONFIG_KEYS]
        if unknown:
            raise LayoutError(
                f"{where}: unknown key {', '.join(map(repr, unknown))}; the valid keys are "
                f"{', '.join(map(repr, _CONFIG_KEYS))}."
            )
        parts = [_config_part(key, cfg[key], where) for key in _CONFIG_KEYS if key in cfg]
        if not parts:
            raise LayoutError(
                f"{where}: the config names no parallelism; give at least one of "
                f"{', '.join(map(repr, _CONFIG_KEYS))}, e.g. {{'dp': 'dp'}}."
            )
        scheme = parts[0]
        for p in parts[1:]:
            scheme = scheme + p
        return scheme

    # -- data and inspection -----------------------------------------------------------
    def shard_batch(self, batch: Mapping[str, torch.Tensor], mesh: Any) -> dict[str, Any]:
        """A dict of plain (batch, seq) tensors -> sharded in ``act_layout(("batch", "seq"))``.

        Under ring attention with a balance, every entry is reordered along seq
        by ``token_order(seq, ring size, balance)`` (slot i holds token
        perm[i]) and, unless the batch has one, a ``"positions"`` entry is
        added: the global positions in that order as a (batch, seq) int64
        tensor (the model's rotary and causal mask read it). Entries that are
        not (batch, seq) tensors pass through unchanged.

        Examples:
            >>> import shardlib as sl, torch
            >>> from shardlib import nn as snn
            >>> mesh = sl.Mesh.simulated({"dp": 2})
            >>> b = snn.dp("dp").shard_batch({"tokens": torch.zeros(4, 6, dtype=torch.long)}, mesh)
            >>> b["tokens"].spec
            P('dp', None)
        """
        from ..ops._api import shard
        from ._use import check_mesh

        check_mesh(self, mesh, f"{self!r}.shard_batch(mesh=...)")
        if not isinstance(batch, Mapping):
            raise LayoutError(
                f"{self!r}.shard_batch(batch=...): expected a dict of (batch, seq) tensors, got "
                f"{type(batch).__name__}."
            )
        layout = self.act_layout(("batch", "seq"))
        tensors = {k: t for k, t in batch.items() if isinstance(t, torch.Tensor) and t.ndim == 2}
        perm = None
        if tensors and self.attention == "ring" and self.balance is not None:
            from ._ring import token_order

            shapes = {k: tuple(t.shape) for k, t in tensors.items()}
            if len(set(shapes.values())) > 1:
                raise LayoutError(
                    f"{self!r}.shard_batch: the (batch, seq) entries differ in shape ({shapes}); "
                    "reordering the sequence needs one shape for all of them."
                )
            b, s = next(iter(shapes.values()))
            perm = token_order(s, mesh.axis_size(self.attention_axis), self.balance)
            if "positions" not in tensors:  # the global position of each reordered slot
                tensors["positions"] = torch.arange(s).expand(b, -1)
        out: dict[str, Any] = {k: t for k, t in batch.items() if k not in tensors}
        for name, t in tensors.items():
            out[name] = shard((t if perm is None else t[:, perm]).contiguous(), mesh, layout)
        return out

    def explain(
        self,
        params: Mapping[str, Any],
        dims: Mapping[str, Any],
        mesh: Any = None,
        *,
        show: bool = True,
    ) -> str:
        """Print and return a table: every weight's storage and compute layout and bytes per device.

        `params` may be plain tensors (give `mesh`, or call inside `snn.use`)
        or the ShardedTensors `shard_params` made. Bytes are the largest
        device's storage block; the last line sums them against the model's bytes.

        Examples:
            >>> import shardlib as sl, torch
            >>> from shardlib import nn as snn
            >>> mesh = sl.Mesh.simulated({"r": 2, "c": 2})
            >>> t = snn.tp2d("r", "c").explain({"w": torch.zeros(8, 8)}, {"w": ("embed", "mlp")}, mesh)
            param  dims          shape   storage      compute       bytes/device
            w      (embed, mlp)  (8, 8)  P('r', 'c')  P(None, 'c')  64
            total                                                   64 of 256 (1/4.0)
        """
        from ._use import _flatten, _lookup_dims, current

        leaves = [(path, p) for path, p in _flatten(params) if isinstance(p, torch.Tensor)]
        if mesh is None:
            mesh = next((p.mesh for _, p in leaves if hasattr(p, "mesh")), None)
        if mesh is None and current() is not None:
            mesh = current()[1]
        if mesh is None:
            raise LayoutError(
                f"{self!r}.explain(params, dims): plain tensors need a mesh for per-device bytes; "
                "pass mesh=sl.Mesh.simulated({...}) or call it inside snn.use(scheme, mesh)."
            )
        rows = [("param", "dims", "shape", "storage", "compute", "bytes/device")]
        total = whole = 0
        for path, p in leaves:
            d = _lookup_dims(dims, path)
            if d is None or len(d) != p.ndim:
                raise LayoutError(
                    f"{self!r}.explain: param {path!r} (shape {tuple(p.shape)}) has dims {d!r}; "
                    "give one logical name per dim in dims[path]."
                )
            store, comp = self.param_layout(d), self.compute_layout(d)
            shape, elem = tuple(p.shape), p.element_size()
            n = max(
                math.prod(local_shape(shape, store, mesh.abstract, dev)) for dev in range(mesh.size)
            )
            total += n * elem
            whole += math.prod(shape) * elem
            dims_text = "(" + ", ".join(map(str, d)) + ")"
            rows.append((path, dims_text, str(shape), repr(store), repr(comp), str(n * elem)))
        ratio = f" (1/{whole / total:.1f})" if total else ""
        rows.append(("total", "", "", "", "", f"{total} of {whole}{ratio}"))
        widths = [max(len(r[c]) for r in rows) for c in range(6)]
        text = "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows
        )
        if show:
            print(text)
        return text


# == configuration ================================================================
_CONFIG_KEYS = ("dp", "fsdp", "tp", "sp")


def _read_toml(path: Any, where: str) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise LayoutError(
                f"{where}: reading TOML on Python < 3.11 needs the tomli package "
                "(`pip install tomli`), or pass the config as a dict."
            ) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise LayoutError(f"{where}: no such file; pass a TOML path or a dict.") from None
    except tomllib.TOMLDecodeError as e:
        raise LayoutError(f"{where}: not valid TOML ({e}).") from None


def _config_part(key: str, value: Any, where: str) -> Scheme:
    if key == "dp":
        fields = _fields(value, where, "dp", {"axis": str}, required=("axis",))
        return dp(fields["axis"])
    if key == "fsdp":
        fields = _fields(value, where, "fsdp", {"axis": str, "remat": bool}, required=("axis",))
        return fsdp(fields["axis"], remat=fields.get("remat", True))
    kinds = _TP_KINDS if key == "tp" else _SP_KINDS
    if not isinstance(value, Mapping) or "kind" not in value:
        raise LayoutError(
            f"{where}: {key!r} takes a table with a 'kind' (one of "
            f"{', '.join(map(repr, kinds))}), e.g. {key} = {{kind = {next(iter(kinds))!r}, ...}}; "
            f"got {value!r}."
        )
    kind = value["kind"]
    if kind not in kinds:
        raise LayoutError(
            f"{where}: unknown {key} kind {kind!r}; the valid kinds are "
            f"{', '.join(map(repr, kinds))}."
        )
    make, types, required = kinds[kind]
    rest = {k: v for k, v in value.items() if k != "kind"}
    fields = _fields(rest, where, f"{key} kind {kind!r}", types, required)
    if fields.get("balance") == "none":
        fields["balance"] = None
    return make(**fields)


def _fields(
    value: Any, where: str, what: str, types: dict[str, type], required: tuple[str, ...]
) -> dict[str, Any]:
    if isinstance(value, str) and "axis" in types:
        value = {"axis": value}
    if not isinstance(value, Mapping):
        raise LayoutError(f"{where}: {what} takes a table of {', '.join(types)}; got {value!r}.")
    unknown = [k for k in value if k not in types]
    if unknown:
        raise LayoutError(
            f"{where}: unknown field {', '.join(map(repr, unknown))} for {what}; the valid "
            f"fields are {', '.join(map(repr, types))}."
        )
    missing = [k for k in required if k not in value]
    if missing:
        raise LayoutError(
            f"{where}: {what} needs {', '.join(map(repr, missing))} (fields: "
            f"{', '.join(map(repr, types))})."
        )
    for k, v in value.items():
        ok = isinstance(v, types[k]) or (k == "balance" and v is None)
        if not ok:
            raise LayoutError(
                f"{where}: {what} field {k!r} is {v!r}; expected a {types[k].__name__}."
            )
    return dict(value)


# == rules the presets use ==========================================================
def _wide_names(axis: str) -> dict[str, str]:
    return {name: axis for name in _WIDE}


def _megatron_sp(dims: Dims, axis: str) -> tuple[Axes, ...]:
    """tp1d(sequence=True) activations: wide dims over axis; the residual stream on seq."""
    residual = dims[-1:] == ("embed",) and "seq" in dims
    return tuple((axis,) if d in _WIDE or (residual and d == "seq") else () for d in dims)


def _matrix(dims: Dims, row: str, col: str) -> tuple[Axes, ...]:
    """2D/2.5D weights: any (in, out) matrix P(row, col); vectors (norms, biases) split over
    col like the activations' last dim, so they are used where they lie and their
    gradients come out in their layout."""
    if len(dims) == 2:
        return ((row,), (col,))
    return tuple((col,) if i == len(dims) - 1 else () for i in range(len(dims)))


def _matrix_compute(dims: Dims, row: str, col: str) -> tuple[Axes, ...]:
    """2D/2.5D weights are used gathered over row (SUMMA's P(None, col)); vectors as stored."""
    if len(dims) == 2:
        return ((), (col,))
    return _matrix(dims, row, col)


def _tp3d_compute(dims: Dims, i: str, j: str, k: str) -> tuple[Axes, ...]:
    """3D weights are used gathered over i: (embed, out) P(k, j), (in, embed) P(j, k)."""
    return tuple(tuple(a for a in axes if a != i) for axes in _tp3d_weight(dims, i, j, k))


def _tp3d_weight(dims: Dims, i: str, j: str, k: str) -> tuple[Axes, ...]:
    """3D weights: (embed, out) -> P((k, i), j); (in, embed) and others -> P((j, i), k)."""
    if len(dims) == 1:  # norms, biases: split like the activations' last dim
        return ((j,),) if dims[0] in _WIDE else ((k,),)
    if len(dims) != 2:
        return ((),) * len(dims)
    if dims[0] == "embed" and dims[1] != "embed":
        return ((k, i), (j,))
    return ((j, i), (k,))


def _tp3d_act(dims: Dims, i: str, j: str, k: str) -> tuple[Axes, ...]:
    """3D activations: with a wide dim: batch (i, k), wide j; else batch (i, j), embed k."""
    if any(d in _WIDE for d in dims):
        return tuple(
            (i, k) if d in ("batch", "tokens") else (j,) if d in _WIDE else () for d in dims
        )
    return tuple((i, j) if d in ("batch", "tokens") else (k,) if d == "embed" else () for d in dims)


_FSDP_ORDER = ("vocab", "mlp", "embed", "heads", "kv_heads")  # a model's usual size order


def _largest_dim(dims: Dims, axis: str) -> tuple[Axes, ...]:
    """FSDP storage: a matrix split over axis on its largest dim (by name); vectors replicated."""
    if len(dims) < 2:
        return ((),) * len(dims)
    rank = {name: len(_FSDP_ORDER) - n for n, name in enumerate(_FSDP_ORDER)}
    rank["heads"] = rank["embed"]  # equal sizes: the first dim wins, as in FSDP
    best = max(range(len(dims)), key=lambda d: (rank.get(dims[d], 0), -d))
    return tuple((axis,) if d == best else () for d in range(len(dims)))


# == presets =======================================================================
def dp(axis: str) -> Scheme:
    """Data parallel: the batch split over `axis`, every weight replicated.

    Layouts: acts ``batch`` -> axis; weights, norms and biases replicated.
    Bytes per linear: none forward; backward the weight gradient's all-reduce
    over axis, 2(P-1)/P·hh'.

    Examples:
        >>> from shardlib import nn as snn
        >>> s = snn.dp("dp")
        >>> s.act_layout(("batch", "seq", "embed")), s.param_layout(("embed", "mlp"))
        (P('dp', None, None), P(None, None))
    """
    return Scheme(acts={"batch": axis}, axes=(axis,), label=f"dp({axis!r})")


def fsdp(axis: str, remat: bool = True) -> Scheme:
    """FSDP / ZeRO-3: the batch split over `axis`, weights stored split over it, computed whole.

    Layouts: acts ``batch`` -> axis; a matrix stored split over axis on its
    largest dim (vocab > mlp > embed = heads > kv_heads, ties the first dim),
    computed replicated over axis; norms and biases (vectors) replicated.
    Bytes per linear: forward all-gather of W, (P-1)/P·hh'; backward the
    re-gather with `remat` (another (P-1)/P·hh', cause "regather") plus the
    reduce-scatter of dW, (P-1)/P·hh' (ZeRO-3's 3Ψ in all).

    Examples:
        >>> from shardlib import nn as snn
        >>> s = snn.fsdp("dp")
        >>> s.param_layout(("vocab", "embed")), s.param_layout(("embed",))
        (P('dp', None), P(None))
    """
    label = f"fsdp({axis!r})" if remat else f"fsdp({axis!r}, remat=False)"
    return Scheme(
        params=_Rule(_largest_dim, (axis,)),
        compute={},
        acts={"batch": axis},
        remat=remat,
        axes=(axis,),
        label=label,
    )


def tp1d(axis: str, sequence: bool = False) -> Scheme:
    """Megatron tensor parallel over `axis`; `sequence=True` is Megatron-SP.

    Layouts: ``heads``, ``kv_heads``, ``mlp``, ``vocab`` split over axis in
    weights (column linears P(None, tp), row linears P(tp, None), the embedding
    table vocab-split) and in activations; ``embed`` never split; norms and
    ``embed`` biases replicated, biases of a split dim split. With `sequence`,
    the residual stream (..., ``seq``, ``embed``) is split on seq.
    Bytes per MLP: forward one all-reduce 2(P-1)/P·bsh (SP: all-gather +
    reduce-scatter, the same total); backward the same.

    Examples:
        >>> from shardlib import nn as snn
        >>> s = snn.tp1d("tp")
        >>> s.param_layout(("embed", "mlp")), s.param_layout(("mlp", "embed"))
        (P(None, 'tp'), P('tp', None))
        >>> s.act_layout(("batch", "seq", "embed")), s.act_layout(("batch", "seq", "mlp"))
        (P(None, None, None), P(None, None, 'tp'))
    """
    acts = _Rule(_megatron_sp, (axis,)) if sequence else _wide_names(axis)
    label = f"tp1d({axis!r}, sequence=True)" if sequence else f"tp1d({axis!r})"
    # SP: a linear's input is the residual stream gathered over seq (once for q, k, v)
    inputs = _wide_names(axis) if sequence else None
    return Scheme(params=_wide_names(axis), acts=acts, inputs=inputs, axes=(axis,), label=label)


def tp2d(row: str, col: str) -> Scheme:
    """2D tensor parallel (SUMMA) on a q×q grid of `row` × `col`.

    Layouts: every weight (in, out) P(row, col); activations (batch, seq, last)
    P(row, None, col) (tokens on batch, so attention stays local), attention
    tensors (batch, heads, seq, head_dim) P(row, col, None, None); norms and
    biases split over col (as the activations' last dim). Bytes per linear: forward (q-1)/q²·(bsh + hh'); backward
    the same with kept operands (2x with remat).

    Examples:
        >>> from shardlib import nn as snn
        >>> s = snn.tp2d("r", "c")
        >>> s.param_layout(("heads", "embed")), s.act_layout(("batch", "heads", "seq", "head_dim"))
        (P('r', 'c'), P('r', 'c', None, None))
    """
    return Scheme(
        params=_Rule(_matrix, (row, col)),
        compute=_Rule(_matrix_compute, (row, col)),
        acts={"batch": row, **_wide_names(col), "embed": col},
        axes=(row, col),
        label=f"tp2d({row!r}, {col!r})",
    )


def tp2p5d(depth: str, row: str, col: str) -> Scheme:
    """2.5D tensor parallel (Tesseract): d stacked q×q grids of `row` × `col`.

    Layouts: every weight P(row, col), replicated over depth; activations
    batch -> (depth, row), last dim -> col; attention heads -> col; norms and
    biases split over col. Bytes per linear: forward (q-1)/q²·(bsh/d + hh');
    backward the same plus the all-reduce of dW over depth, 2(d-1)/d·hh'/q².

    Examples:
        >>> from shardlib import nn as snn
        >>> snn.tp2p5d("d", "r", "c").act_layout(("batch", "seq", "embed"))
        P(('d', 'r'), None, 'c')
    """
    return Scheme(
        params=_Rule(_matrix, (row, col)),
        compute=_Rule(_matrix_compute, (row, col)),
        acts={"batch": (depth, row), **_wide_names(col), "embed": col},
        axes=(depth, row, col),
        label=f"tp2p5d({depth!r}, {row!r}, {col!r})",
    )


def tp3d(i: str, j: str, k: str) -> Scheme:
    """3D tensor parallel on a q×q×q cube `i` × `j` × `k`.

    Layouts: a weight (embed, out) P((k, i), j), a weight (in, embed)
    P((j, i), k); activations ending in embed: batch (i, j), embed k; with
    mlp/heads/kv_heads/vocab: batch (i, k), that dim j — so the next linear
    swaps j and k and two chained linears need no reshard between them;
    norms and biases split like the activations' last dim (embed k, others j).
    Bytes per linear: forward
    (q-1)/q³·(bsh + hh' + bsh'); backward the same.

    Examples:
        >>> from shardlib import nn as snn
        >>> s = snn.tp3d("i", "j", "k")
        >>> s.param_layout(("embed", "mlp")), s.param_layout(("mlp", "embed"))
        (P(('k', 'i'), 'j'), P(('j', 'i'), 'k'))
        >>> s.act_layout(("batch", "seq", "embed")), s.act_layout(("batch", "seq", "mlp"))
        (P(('i', 'j'), None, 'k'), P(('i', 'k'), None, 'j'))
    """
    return Scheme(
        params=_Rule(_tp3d_weight, (i, j, k)),
        compute=_Rule(_tp3d_compute, (i, j, k)),
        acts=_Rule(_tp3d_act, (i, j, k)),
        axes=(i, j, k),
        label=f"tp3d({i!r}, {j!r}, {k!r})",
    )


def ulysses(axis: str) -> Scheme:
    """DeepSpeed-Ulysses sequence parallel over `axis`.

    Layouts: activations ``seq`` -> axis; weights, norms and biases
    replicated. `snn.attention` moves q, k, v to heads-split (heads and
    kv_heads over axis, seq whole) and its output back to seq-split.
    Bytes per attention: 4 all-to-alls, (P-1)/P²·bs·d·(2H + 2H_kv) forward,
    the same backward; weight gradients all-reduced over axis as in dp.

    Examples:
        >>> from shardlib import nn as snn
        >>> snn.ulysses("sp").act_layout(("batch", "heads", "seq", "head_dim"))
        P(None, None, 'sp', None)
    """
    return Scheme(
        acts={"seq": axis},
        attention="ulysses",
        attention_axis=axis,
        axes=(axis,),
        label=f"ulysses({axis!r})",
    )


def ring(axis: str, balance: str | None = "zigzag") -> Scheme:
    """Ring attention (context parallel) over `axis`, tokens in `balance` order.

    Layouts: activations ``seq`` -> axis; weights, norms and biases
    replicated. `snn.attention` runs the ring kernel (K/V passed around);
    `shard_batch` reorders tokens ("zigzag": device r holds chunks r and
    2P-1-r of 2P; "stripe": token t on device t % P; None: in order) and adds
    global positions. Bytes per attention: forward (P-1) ppermutes of K and
    V, 2(P-1)/P·bs·H_kv·d; backward K, V again plus P sends of dK, dV.

    Examples:
        >>> from shardlib import nn as snn
        >>> snn.ring("cp")
        ring('cp')
        >>> snn.ring("cp", balance=None).act_layout(("batch", "seq"))
        P(None, 'cp')
    """
    if balance not in BALANCES:
        raise LayoutError(
            f"snn.ring({axis!r}, balance={balance!r}): unknown token order; use one of "
            f"{', '.join(map(repr, BALANCES))}."
        )
    label = f"ring({axis!r})" if balance == "zigzag" else f"ring({axis!r}, balance={balance!r})"
    return Scheme(
        acts={"seq": axis},
        attention="ring",
        balance=balance,
        attention_axis=axis,
        axes=(axis,),
        label=label,
    )


_TP_KINDS: dict[str, tuple[Callable[..., Scheme], dict[str, type], tuple[str, ...]]] = {
    "1d": (tp1d, {"axis": str, "sequence": bool}, ("axis",)),
    "2d": (tp2d, {"row": str, "col": str}, ("row", "col")),
    "2.5d": (tp2p5d, {"depth": str, "row": str, "col": str}, ("depth", "row", "col")),
    "3d": (tp3d, {"i": str, "j": str, "k": str}, ("i", "j", "k")),
}
_SP_KINDS: dict[str, tuple[Callable[..., Scheme], dict[str, type], tuple[str, ...]]] = {
    "ulysses": (ulysses, {"axis": str}, ("axis",)),
    "ring": (ring, {"axis": str, "balance": str}, ("axis",)),
}
