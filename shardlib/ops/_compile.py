"""`torch.compile` of sharded code: what dynamo traces, what AOTAutograd traces, what runs.

Owns the marks that make shardlib's Python entry points single graph nodes
(`in_graph`), the list of those entry points, and `tracing()`, the test rules
and backends use to skip work that needs values (there are none while
tracing). The protocol methods dynamo and AOTAutograd call on a ShardedTensor
(`__tensor_flatten__`, `__tensor_unflatten__`, `__coerce_tangent_metadata__`,
`__coerce_same_metadata_as_tangent__`) live on the class (`_tensor.py`); the
distributed backend's traceable collectives live in
`collectives/_distributed.py`.

How a compiled function runs (``torch.compile(fn, fullgraph=True)``):

1. **Dynamo** traces `fn`'s Python. A ShardedTensor is a tensor to it (a
   traceable wrapper subclass): an aten op on one becomes one graph node, whose
   example value dynamo gets by running our `__torch_dispatch__` on a
   ShardedTensor of fake shards. Reading ``x.spec`` / ``x.mesh`` gives
   constants. shardlib calls that build ShardedTensors in Python
   (`sl.reshard`, `sl.with_layout`, `sl.einsum`, `x.full()`, `sl.shard`,
   `sl.from_local`, `snn.constrain` / `linear` / `attention`) are not traced
   line by line: each is one node (`in_graph`), run on fakes for its example
   value. Guards: every ShardedTensor input's (mesh, layout), shape and
   strides, and the active `snn.use` scheme (`shardlib.nn._use`), so a call
   under another layout or scheme recompiles.
2. **AOTAutograd** traces that graph forward and backward with functional
   inner tensors: our dispatch, rules, planner and collectives run *at trace
   time* and leave only their per-device aten ops and collectives in the
   graph, which has plain tensors in and out (the shards). Backward is traced
   with a tangent in the output's layout minus its partial axes
   (`__coerce_tangent_metadata__`: a summand's gradient is the whole
   gradient); an incoming gradient in another layout is moved there
   (`__coerce_same_metadata_as_tangent__`).
3. **The backend** (aot_eager, inductor) compiles that plain graph. At run
   time no shardlib Python runs between ops: the shards go in, the shards come
   out, and are wrapped back into ShardedTensors by `__tensor_unflatten__`.

Consequences (documented in the README):

- The ledger: each collective's record is a node of the compiled graph
  (``shardlib::comm_record``, `collectives/_ledger.py`), placed after the
  collective, in the forward or backward graph that runs it. Every call of a
  compiled function records, into the ledgers open then, what the eager call
  records, in the same order; tracing itself records nothing.
- Checks that need values (an nll target out of range) are skipped while
  tracing (`tracing()`); the compiled step does what torch's compiled kernel
  does with such input.
- `with snn.use(scheme, mesh):` must enclose the compiled call (dynamo cannot
  trace the context variable it sets; inside, `use` raises naming that fix); `sl.strict()` and the other mode
  contexts likewise apply when they are open at the first (tracing) call.
- Not traceable (a graph break, or an error under ``fullgraph=True``):
  `sl.shard_map` (its collectives are for plain tensors in eager code),
  `sl.comm_ledger()` and `sl.explain` inside the compiled function,
  `.item()` / `.tolist()` of a sharded value, and `sl.shard(..., src=r)`.

Invariant: nothing here changes eager behaviour; `in_graph` only registers a
function with dynamo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["in_graph", "tracing"]

F = TypeVar("F", bound=Callable[..., Any])


def tracing() -> bool:
    """Whether torch.compile is tracing now (dynamo, or AOTAutograd running our dispatch).

    Shards are fake or functional then: code must not read their values.

    Examples:
        >>> from shardlib.ops._compile import tracing
        >>> tracing()
        False
    """
    return torch.compiler.is_compiling()


def in_graph(fn: F) -> F:
    """Make calls of `fn` inside a compiled function one graph node (not traced by dynamo).

    AOTAutograd then runs `fn` itself on ShardedTensors of traced shards, so `fn` may
    build ShardedTensors, call autograd Functions and issue collectives. Its arguments
    must be tensors or constants dynamo can put in a graph (numbers, strings, tuples,
    `sl.P(...)` layouts). Returns `fn` unchanged (eager calls are untouched).

    Examples:
        >>> import torch
        >>> from shardlib.ops._compile import in_graph
        >>> @in_graph
        ... def double(x):
        ...     return 2 * x
        >>> double(torch.ones(2)).tolist()  # eager calls are untouched
        [2.0, 2.0]
        >>> torch._dynamo.trace_rules.is_callable_allowed(double)  # compiled: one graph node
        True
    """
    return torch.compiler.allow_in_graph(fn)


def _register_value_types() -> None:
    """`Layout` and `Mesh` as constants of a traced graph (torch's opaque *value* types).

    Dynamo then guards on them by equality, bakes them into its graph (rebuilt from
    `__fx_repr__`), and lets traced code read their public members (evaluated on the real
    object at trace time): `x.spec` of an intermediate, ``sl.P(...)`` built inside the
    compiled function, a mesh passed to `sl.shard`.
    """
    from torch._library.opaque_object import MemberType, register_opaque_type

    from ..layouts._layout import Layout
    from ..layouts._mesh import Mesh

    def layout_fx_repr(self: Layout) -> tuple[str, dict[str, type]]:
        return f"Layout({self.dims!r}, {self.partial!r}, {self.reduce_op!r})", {"Layout": Layout}

    def mesh_fx_repr(self: Mesh) -> tuple[str, dict[str, type]]:
        kind = self.backend.kind
        extra = f", {self.backend.device_type!r}" if kind == "distributed" else ""
        return f"Mesh.{kind}({self.axes!r}{extra})", {"Mesh": Mesh}

    Layout.__fx_repr__ = layout_fx_repr  # type: ignore[attr-defined]
    Mesh.__fx_repr__ = mesh_fx_repr  # type: ignore[attr-defined]
    use_real = MemberType.USE_REAL
    layout_members = (
        "dims partial reduce_op ndim used_axes replicated_axes dim_of is_replicated "
        "without_partial with_dim with_partial check"
    )
    mesh_members = (
        "abstract backend axis_names shape size axes local_devices axis_size axis_index "
        "group_size coords flat_index index_along group"
    )
    register_opaque_type(
        Layout, typ="value", members=dict.fromkeys(layout_members.split(), use_real)
    )
    register_opaque_type(Mesh, typ="value", members=dict.fromkeys(mesh_members.split(), use_real))


def _register_entry_points() -> None:
    """The public calls that build ShardedTensors in Python: one graph node each."""
    from . import _api, _contractions

    for fn in (
        _api.shard,
        _api.from_local,
        _api.reshard,
        _api.with_layout,
        _api.full,
        _contractions.einsum,
    ):
        in_graph(fn)


_register_value_types()
_register_entry_points()
