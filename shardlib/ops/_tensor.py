"""`ShardedTensor`: a torch.Tensor wrapper subclass that carries a layout over a mesh.

Owns the subclass itself: construction, metadata (global shape and dtype),
printing, the `.grad` guard, and the hand-off of every aten op to
`_dispatch.dispatch`. It does not decide anything about ops: rules live in the
op-family modules, redistribution in `collectives`.

Invariants: `_shards` holds exactly the unpadded blocks of this process's
devices (flat order) under `_layout`; all shards share dtype and device; the
wrapper's shape is the global shape and its strides are contiguous.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .._errors import LayoutError
from ..layouts._layout import Layout
from ..layouts._mesh import Mesh
from ..layouts._shard import max_local_numel

__all__ = ["Record", "ShardedTensor", "record_of"]

_grad_descriptor = torch.Tensor.grad
_data_descriptor = torch.Tensor.data


class ShardedTensor(torch.Tensor):
    """A tensor with a global shape whose data is split over a device mesh.

    Create with `sl.shard` (from a global tensor) or `sl.from_local` (from
    per-device shards). `x.spec` is its `Layout`, `x.mesh` its `Mesh`,
    `x.local_shards()` the blocks this process holds, `x.full()` the global
    value as a plain tensor.

    Examples:
        >>> import shardlib as sl, torch
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> x = sl.shard(torch.arange(6.0).reshape(3, 2), mesh, sl.P("x", None))
        >>> x
        ShardedTensor(shape=(3, 2), dtype=torch.float32, spec=P('x', None), mesh=Mesh.simulated({'x': 2}))
        >>> [s.tolist() for s in x.local_shards()]
        [[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0]]]
    """

    _shards: list[torch.Tensor]
    _mesh: Mesh
    _layout: Layout
    _sig: int | None = None  # interned (layout, shape, dtype, mesh): see _dispatch._sig_of
    # Storage families and linked copies (see _aliasing.py): class defaults, set per instance.
    _root: ShardedTensor | None = None
    _link: Any = None
    _views: Any = None
    _linked: Any = None
    _writes: int = 0
    _grad_hooked: bool = False
    # A partial tensor's kept reduction (_dispatch.move) and a compressed regather
    # source's wire (_api.compressed_source): class defaults, set per instance.
    _kept: Any = None
    _comm_wire: Any = None
    # Outside the attribute dict: the tensor's `Record`, made on first use by `record_of`.
    # Family registries and the gradient hook reference it weakly instead of the tensor.
    __slots__ = ("_record",)
    _recorded: bool = False  # whether `_record` is set (reading an unset slot raises)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(
        cls,
        shards: list[torch.Tensor],
        mesh: Mesh,
        layout: Layout,
        shape: tuple[int, ...],
        requires_grad: bool = False,
        strides: tuple[int, ...] | None = None,
        storage_offset: int = 0,
    ) -> ShardedTensor:
        ref = shards[0]
        geometry = {} if strides is None else {"strides": strides, "storage_offset": storage_offset}
        out = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=ref.dtype, device=ref.device, requires_grad=requires_grad, **geometry
        )
        out._shards = shards
        out._mesh = mesh
        out._layout = layout
        if requires_grad:
            _hook_leaf(out)
        return out

    # -- gradients land in the leaf's layout -------------------------------------
    # A leaf's incoming gradient whose blocks are larger than the leaf's is moved to the
    # leaf's own layout before it accumulates (a hook on the leaf), so `.grad` is never
    # larger than the leaf's block: a full-size partial gradient is reduce-scattered as it
    # arrives (ledger cause "grad"). Partial axes the leaf is replicated on stay partial
    # (same size; reduced lazily, as a DDP gradient is). A gradient no larger than the
    # leaf's blocks is left as it came: gathering it would only add communication (a
    # vocab-split gradient of a replicated table is cheaper to finish later).
    def requires_grad_(self, requires_grad: bool = True) -> ShardedTensor:
        super().requires_grad_(requires_grad)
        if requires_grad:
            _hook_leaf(self)
        return self

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return _REQUIRES_GRAD.__get__(self)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        _REQUIRES_GRAD.__set__(self, value)
        if value:
            _hook_leaf(self)

    # -- metadata --------------------------------------------------------------
    @property
    def spec(self) -> Layout:
        """The `Layout` (`x.layout` stays torch's `torch.strided`, which torch's own code reads)."""
        return self._layout

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    def local_shards(self) -> list[torch.Tensor]:
        """The exact, unpadded blocks of the devices this process owns, in flat device order.

        They are this tensor's storage: an in-place edit of a block edits the tensor.
        """
        if self._root is not None:
            from ._aliasing import sync

            sync(self)
        return list(self._shards)

    def full(self) -> torch.Tensor:
        """The global value (partials reduced) as a plain tensor; collective, differentiable."""
        from ._api import full

        return full(self)

    @property
    def grad(self) -> Any:  # type: ignore[override]
        return _grad_descriptor.__get__(self)

    @grad.setter
    def grad(self, value: Any) -> None:
        if value is not None and not isinstance(value, ShardedTensor):
            raise LayoutError(
                f"setting .grad of a ShardedTensor {self._layout!r} to a plain "
                f"{type(value).__name__}: the gradient must be sharded too. Use "
                "sl.shard(g, x.mesh, x.layout) (or sl.from_local) to build it."
            )
        if grad_watchers:
            grad_watchers[-1].assigned(record_of(self))
        _grad_descriptor.__set__(self, value)

    @grad.deleter
    def grad(self) -> None:
        _grad_descriptor.__delete__(self)

    # -- .data, copies, serialization -----------------------------------------
    @property
    def data(self) -> Any:  # type: ignore[override]
        return _data_descriptor.__get__(self)

    @data.setter
    def data(self, value: Any) -> None:
        """``x.data = y``: x now holds y's shards, layout and metadata (as torch's set_data).

        `Module.to/double/half/...` convert parameters this way.
        """
        if not isinstance(value, ShardedTensor):
            raise LayoutError(
                f"setting .data of a ShardedTensor {self._layout!r} to a plain "
                f"{type(value).__name__}: the data must be sharded too. Use "
                "sl.shard(t, x.mesh, x.spec) (or sl.from_local) to build it."
            )
        from ._aliasing import rebind_data, sync

        if value._root is not None:
            sync(value)
        _data_descriptor.__set__(self, value)
        rebind_data(self, value)  # x now shares y's storage; x's old views keep the old one

    def __deepcopy__(self, memo: dict) -> ShardedTensor:
        if id(self) in memo:
            return memo[id(self)]
        if not self.is_leaf:
            raise RuntimeError(
                "Only Tensors created explicitly by the user (graph leaves) support the deepcopy "
                "protocol at the moment. If you were attempting to deepcopy a module, this may "
                "be because of a torch.nn.utils.weight_norm usage."
            )
        with torch.no_grad():
            new = ShardedTensor(
                [s.clone() for s in self.local_shards()],
                self._mesh,
                self._layout,
                tuple(self.shape),
                self.requires_grad,
            )
        memo[id(self)] = new
        if self.grad is not None:
            new.grad = self.grad.__deepcopy__(memo)
        return new

    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickle (torch.save, copy, multiprocessing): the shards, axes, layout and shape.

        Only simulated meshes are pickled: on a distributed mesh each process holds only its
        own shards, so saving is a collective job for `sl.checkpoint`.
        """
        if self._mesh.backend.kind != "simulated":
            raise LayoutError(
                f"pickling a ShardedTensor on {self._mesh!r} (torch.save, copy.deepcopy, "
                "multiprocessing): each process holds only its own shards. Save with "
                "sl.checkpoint.save(path, tree) (issue 8), or save "
                "(x.local_shards(), x.spec, tuple(x.shape)) per rank yourself and rebuild with "
                "sl.from_local."
            )
        lay = self._layout
        shards = [s.detach().clone() for s in self.local_shards()]
        return (
            _rebuild,
            (
                shards,
                self._mesh.axes,
                lay.dims,
                lay.partial,
                lay.reduce_op,
                tuple(self.shape),
                self.requires_grad,
            ),
        )

    # -- host memory and conversions ------------------------------------------
    def share_memory_(self) -> ShardedTensor:
        """Move every local shard to shared memory (for torch.multiprocessing)."""
        for s in self.local_shards():
            s.share_memory_()
        return self

    def is_shared(self) -> bool:
        return all(s.is_shared() for s in self.local_shards())

    def pin_memory(self, device: Any = None) -> ShardedTensor:  # type: ignore[override]
        """A copy with every local shard in pinned memory (torch's error where that is impossible)."""
        args = () if device is None else (device,)
        return ShardedTensor(
            [s.pin_memory(*args) for s in self.local_shards()],
            self._mesh,
            self._layout,
            tuple(self.shape),
        )

    def is_pinned(self, device: Any = None) -> bool:  # type: ignore[override]
        args = () if device is None else (device,)
        return all(s.is_pinned(*args) for s in self.local_shards())

    # -- DTensor bridge (h9h): the conversion lives in ops/_dtensor.py --
    def to_dtensor(self, device_mesh: Any = None) -> Any:
        """This tensor as a DTensor over `device_mesh` (mesh axes = its ``mesh_dim_names``);
        no communication where the blocks agree. See `sl.from_dtensor`, the inverse."""
        from ._dtensor import to_dtensor

        return to_dtensor(self, device_mesh)

    # -- end DTensor bridge --

    def tolist(self) -> Any:  # type: ignore[override]
        """The global value as nested lists (collective: `x.full().tolist()`)."""
        return self.full().tolist()

    def numpy(self, *, force: bool = False) -> Any:  # type: ignore[override]
        """The global value as a NumPy array (collective: `x.full().numpy()`)."""
        return self.full().numpy(force=force)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        value = self.full().detach().numpy()
        return value if dtype is None else value.astype(dtype, copy=False)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        grad = f", grad_fn={type(self.grad_fn).__name__}" if self.grad_fn is not None else ""
        if self.requires_grad and self.grad_fn is None:
            grad = ", requires_grad=True"
        return (
            f"ShardedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"spec={self._layout!r}, mesh={self._mesh!r}{grad})"
        )

    # -- dispatch --------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or _NO_KWARGS)

    # -- torch.compile (traceable wrapper subclass protocol) -------------------
    # Dynamo and AOTAutograd take a ShardedTensor apart into its shards (one attribute per
    # shard: `_s0`, `_s1`, ... in flat device order; a simulated tensor holds a list) and a
    # hashable context (mesh, layout), and rebuild it around traced or fake shards. The
    # global shape and strides travel as torch's outer size and stride.
    def __tensor_flatten__(self) -> tuple[list[str], tuple[Mesh, Layout]]:
        if self._root is not None:
            from ._aliasing import sync

            sync(self)
        return [f"_s{i}" for i in range(len(self._shards))], (self._mesh, self._layout)

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], ctx: tuple[Mesh, Layout], outer_size: Any, outer_stride: Any
    ) -> ShardedTensor:
        mesh, layout = ctx
        shards = [inner[f"_s{i}"] for i in range(len(inner))]
        return ShardedTensor(shards, mesh, layout, tuple(outer_size), False, tuple(outer_stride))

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: `_s<i>` names shard i (for __tensor_flatten__)
        if name.startswith("_s") and name[2:].isdigit():
            shards = self.__dict__.get("_shards")
            i = int(name[2:])
            if shards is not None and i < len(shards):
                return shards[i]
        raise AttributeError(f"'ShardedTensor' object has no attribute {name!r}")

    def __coerce_tangent_metadata__(self) -> ShardedTensor:
        """A forward output's tangent as AOTAutograd traces it: partial axes reduced.

        A gradient arriving for a partial output is never partial itself (the gradient of
        a summand is the whole gradient), so the traced backward expects the same layout
        without partial axes.
        """
        if not self._layout.partial:
            return self
        from ._api import _reshard_impl

        return _reshard_impl(self, self._layout.without_partial(), "tangent", "backward")

    def __coerce_same_metadata_as_tangent__(
        self, expected: tuple[Mesh, Layout], expected_type: Any = None
    ) -> ShardedTensor | None:
        """The incoming gradient moved to the layout the compiled backward was traced with."""
        if expected_type is not None and expected_type is not ShardedTensor:
            return None
        mesh, layout = expected
        if mesh != self._mesh:
            return None
        if layout == self._layout:
            return self
        from ._api import _reshard_impl

        return _reshard_impl(self, layout, "tangent", "backward")


_NO_KWARGS: dict = {}  # shared and never written: ops receive it read-only


def _rebuild(
    shards: list[torch.Tensor],
    axes: dict[str, int],
    dims: tuple,
    partial: tuple,
    reduce_op: str,
    shape: tuple[int, ...],
    requires_grad: bool,
) -> ShardedTensor:
    """Inverse of `ShardedTensor.__reduce_ex__` (allowed by torch.load(weights_only=True))."""
    mesh = Mesh.simulated(axes)
    layout = Layout(tuple(tuple(d) for d in dims), tuple(partial), reduce_op)
    return ShardedTensor(list(shards), mesh, layout, tuple(shape), requires_grad)


torch.serialization.add_safe_globals([_rebuild])


# == torch functions that read an argument's data before dispatch ================
# `tensor_split(x, indices)` with a tensor of indices reads that tensor's memory in C++
# (CompositeImplicitAutograd) before any dispatch, and a ShardedTensor has no memory of its
# own. The indices are a host-side list of split points: a sharded one is read out with
# `.tolist()` (a collective `full`, in the ledger). Plain calls are passed straight through.
_tensor_split = torch.tensor_split
_tensor_split_method = torch.Tensor.tensor_split


def _split_points(indices_or_sections: Any) -> Any:
    if isinstance(indices_or_sections, ShardedTensor):
        return indices_or_sections.tolist()
    return indices_or_sections


def tensor_split(input: Any, indices_or_sections: Any, dim: int = 0) -> Any:
    return _tensor_split(input, _split_points(indices_or_sections), dim)


tensor_split.__doc__ = _tensor_split.__doc__
torch.tensor_split = tensor_split


def _tensor_split_of(self: Any, indices_or_sections: Any, dim: int = 0) -> Any:
    return _tensor_split_method(self, _split_points(indices_or_sections), dim)


ShardedTensor.tensor_split = _tensor_split_of  # type: ignore[method-assign]


def _dispatch(func, args, kwargs):
    """Bound to `_dispatch.dispatch` on first use (the modules import each other)."""
    global _dispatch
    from ._dispatch import dispatch

    _dispatch = dispatch
    return dispatch(func, args, kwargs)


_REQUIRES_GRAD = torch._C.TensorBase.requires_grad


# == records: what is referenced weakly instead of a tensor =======================
# `torch.utils.swap_tensors` refuses a tensor that has weak references, and
# `Module._apply` (module.double(), .to(dtype), .half()) swaps every parameter that is a
# traceable wrapper subclass, as a ShardedTensor is. So nothing references a ShardedTensor
# weakly: whoever must reach a tensor without keeping it alive (its family's registries
# in `_aliasing`, the gradient hook below) references its record weakly.
class Record:
    """A ShardedTensor's attributes, for whoever must reach them without keeping it alive.

    The tensor holds its record in the `_record` slot; the record holds the tensor's
    attribute dict, not the tensor. So there is no cycle: tensor, record and dict are
    freed together by reference counting. `swap_tensors` exchanges the two tensors'
    dicts and slots together, so a record always holds the attributes of the tensor
    that holds it.

    Examples:
        >>> import shardlib as sl, torch
        >>> from shardlib.ops._tensor import record_of
        >>> x = sl.shard(torch.zeros(4), sl.Mesh.simulated({"x": 2}), sl.P("x"))
        >>> record_of(x).attrs["_layout"] is x.spec
        True
    """

    __slots__ = ("attrs", "__weakref__")

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs


def record_of(t: ShardedTensor) -> Record:
    """`t`'s record, made on first use (a fresh tensor's costs no exception: the view hot path)."""
    if t._recorded:  # set with the slot; a dict copied onto another tensor carries it alone
        try:
            record = t._record
        except AttributeError:
            record = None
        if record is not None and record.attrs is t.__dict__:
            return record
    record = t._record = Record(t.__dict__)
    t._recorded = True
    return record


# `sl.capture`'s recording (ops/_capture.py), if any: told of every leaf a gradient reaches
# and of every `.grad` assignment.
grad_watchers: list = []


def _hook_leaf(t: ShardedTensor) -> None:
    if t._grad_hooked or not t.is_leaf:
        return
    t._grad_hooked = True
    ref = weakref.ref(record_of(t))  # the hook must not keep its tensor alive

    def to_own_layout(g: torch.Tensor) -> torch.Tensor | None:
        record = ref()
        if record is None or not isinstance(g, ShardedTensor):
            return None
        if grad_watchers:
            grad_watchers[-1].arrived(record)
        leaf = record.attrs
        layout, mesh = leaf["_layout"], leaf["_mesh"]
        if g._layout is layout or g._layout == layout:
            return None  # already the leaf's blocks (the common case: nothing to do)
        want = layout.without_partial()
        reordered = g._layout.dims != want.dims and all(
            set(a) == set(b) for a, b in zip(g._layout.dims, want.dims)
        )  # the same axes per dim in another order: a permute puts it in the leaf's blocks
        shape, am = tuple(g.shape), mesh.abstract
        # decided on the largest block any device holds, never this process's own: on real
        # processes an uneven split gives ranks blocks of different sizes, and a decision
        # one rank takes differently leaves the others waiting in the reshard's collective
        if not reordered and max_local_numel(shape, g._layout, am) <= max_local_numel(
            shape, want, am
        ):
            return None  # no larger than the leaf's blocks: left as it came (no communication)
        from ._api import _reshard_impl
        from ._contractions import gradient_layout

        return _reshard_impl(g, gradient_layout(layout, mesh, g._layout), "grad", "backward")

    t.register_hook(to_own_layout)
