"""`save` and `load`: sharded training state to and from a DCP checkpoint directory.

Owns what each process writes and reads: for a ShardedTensor, the exact block
of every device that holds coordinate 0 on the axes the tensor is replicated
over (each replica written once, partial values reduced first, in the ledger
with cause ``"checkpoint"``); for a plain tensor or a non-tensor value, one
copy by the coordinator. It checks `like` against the checkpoint before
reading anything. File layout and crash safety are `_atomic.py`'s; DCP plan
items are `_planners.py`'s; keys are `_tree.py`'s.

Collective rule: a `save` whose tree holds a ShardedTensor on a
`Mesh.distributed` is collective (every rank calls it with the same tree
structure; each rank writes its own blocks through DCP over the default
process group, rank 0 commits). Otherwise one process writes everything
(DCP's ``no_dist``). A `load` is never collective: each process reads what
its own devices hold.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils._pytree as pytree
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from .._errors import LayoutError
from .._format import dtype_name
from ..layouts._layout import Layout
from ..layouts._mesh import AbstractMesh, Mesh
from ..layouts._shard import local_bounds, partial_index
from ..ops._api import _reshard_impl
from ..ops._tensor import ShardedTensor
from . import _atomic
from ._errors import CheckpointError
from ._planners import Box, BoxLoadPlanner, BoxSavePlanner, SavedTensor
from ._tree import Leaf, flatten, is_target

__all__ = ["load", "save"]

FORMAT = "shardlib.checkpoint"
VERSION = 1


# == shared helpers ============================================================
@contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it runs in one process when asked to (``no_dist``); that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _shown(leaf: Leaf) -> str:
    return "".join(f"[{p!r}]" for p in leaf.path) + f" (key {leaf.key!r})"


def _is_distributed(mesh: Mesh) -> bool:
    return mesh.backend.kind != "simulated"


def _writer_devices(layout: Layout, mesh: AbstractMesh, devices: tuple[int, ...]) -> list[int]:
    """Devices among `devices` with coordinate 0 on every axis `layout` is replicated over."""
    rep = [mesh.axis_index(a) for a in layout.replicated_axes(mesh)]
    return [d for d in devices if not any(mesh.coords(d)[i] for i in rep)]


def _box_of(shape: tuple[int, ...], layout: Layout, mesh: AbstractMesh, dev: int) -> tuple:
    return tuple(local_bounds(shape, layout, mesh, dev))


def _exact(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU owning exactly its elements (DCP's torch.save writes a view's whole storage)."""
    t = t.detach().cpu()
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if t.is_contiguous() and t.storage_offset() == 0 and whole:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _reduced_layout(layout: Layout, shape: tuple[int, ...], mesh: AbstractMesh) -> Layout:
    """Where a partial value is reduced to before saving: each partial axis also splits the
    dim with the largest block (a reduce-scatter; every device then writes a smaller box)."""
    dims = [list(axes) for axes in layout.dims]
    for axis in (a for a in mesh.axis_names if a in layout.partial):
        if not shape:
            break
        extent = [-(-n // mesh.group_size(dims[d])) for d, n in enumerate(shape)]
        d = max(range(len(shape)), key=lambda i: (extent[i], -i))
        dims[d].append(axis)
    return Layout(tuple(tuple(a) for a in dims))


def _serialize(value: Any) -> bytes | None:
    """``torch.save`` bytes of a non-tensor value, or None where `torch.load(weights_only=True)`
    would refuse them (an arbitrary class: loading it would run its pickle code)."""
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception:
        return None
    return buf.getvalue()


# == save ======================================================================
def save(path: str | os.PathLike, tree: Any) -> None:
    """Write `tree` to the directory `path` in torch.distributed.checkpoint's format, atomically.

    `tree` is a pytree (dicts, lists, tuples, NamedTuples) of ShardedTensors, plain
    tensors and non-tensor values (ints, floats, strings, None, tuples of those;
    ``torch.Generator.get_state()`` is a tensor). Its keys are the paths joined by
    ``"."`` (``"params.wq"``), as DCP flattens a state dict.

    - A ShardedTensor: each distinct block written once, by the device with
      coordinate 0 on the axes it is replicated over; exact boxes (uneven shards
      stay uneven, nothing is padded); a partial value is reduced first (a
      reduce-scatter in the ledger, cause ``"checkpoint"``).
    - A plain tensor (the same on every process) and a non-tensor value: one copy.
    - Layouts, meshes and shapes are recorded in ``path/shardlib.json``, beside
      DCP's ``.metadata``; any mesh and layout can load the checkpoint.

    The save is atomic: the files go to a temporary sibling directory, are
    fsynced, and the directory is renamed into place; an older checkpoint at
    `path` is replaced only then. A process killed at any point leaves `path`
    loadable as the whole old or the whole new checkpoint (`load` finds it).
    On a `Mesh.distributed` every rank calls `save` (collective; a shared
    filesystem); each rank writes its own blocks.

    Args:
        path: the checkpoint directory (created; an existing checkpoint there is replaced).
        tree: the training state.

    Examples:
        >>> import shardlib as sl, torch, tempfile, os
        >>> mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
        >>> w = sl.shard(torch.arange(15.0).reshape(5, 3), mesh, sl.P("dp", "tp"))
        >>> path = os.path.join(tempfile.mkdtemp(), "step25")
        >>> sl.checkpoint.save(path, {"params": {"w": w}, "step": 25})
        >>> other = sl.Mesh.simulated({"x": 3})
        >>> back = sl.checkpoint.load(path, {"params": {"w": (other, sl.P(None, "x"))}, "step": 0})
        >>> torch.equal(back["params"]["w"].full(), w.full()), back["step"]
        (True, 25)
    """
    where = "sl.checkpoint.save"
    path = Path(os.fspath(path))
    leaves, _ = flatten(tree, f"{where}(tree=...)")
    distributed = any(
        isinstance(leaf.value, ShardedTensor) and _is_distributed(leaf.value.mesh)
        for leaf in leaves
    )
    if distributed and not dist.is_initialized():  # a distributed mesh implies a process group
        raise CheckpointError(
            f"{where}: a ShardedTensor is on a distributed mesh but no process group is up."
        )
    rank = dist.get_rank() if distributed else 0
    coordinator = rank == 0

    # -- check every leaf before any collective or file ----------------------
    objects: dict[str, bytes] = {}
    problems = []
    for leaf in leaves:
        v = leaf.value
        if isinstance(v, ShardedTensor):
            continue
        if _is_dtensor(v):
            problems.append(
                f"{_shown(leaf)} is a DTensor; save DTensors with torch.distributed.checkpoint.save "
                "(sl.checkpoint.load reads that checkpoint), or convert it to a ShardedTensor"
            )
        elif isinstance(v, torch.Tensor):
            continue
        else:
            data = _serialize(v)
            if data is None:
                problems.append(
                    f"{_shown(leaf)} is a {type(v).__name__}, which torch.load(weights_only=True) "
                    "cannot read back safely; store a tensor (torch.as_tensor(...), "
                    "gen.get_state()), a number, a string or a tuple/list/dict of those"
                )
            elif coordinator:
                objects[leaf.key] = data
    if problems:
        raise CheckpointError(f"{where}(tree=...): " + "; ".join(problems) + ".")

    # -- what this process writes --------------------------------------------
    tensors: dict[str, SavedTensor] = {}
    whole: set[str] = set()
    entries: dict[str, dict[str, Any]] = {}
    for leaf in leaves:
        v = leaf.value
        if isinstance(v, ShardedTensor):
            tensors[leaf.key], entries[leaf.key] = _sharded_boxes(v, coordinator)
        elif isinstance(v, torch.Tensor):
            shape = tuple(v.shape)
            boxes = [Box((0,) * len(shape), _exact(v))] if coordinator else []
            tensors[leaf.key] = SavedTensor(shape, v.dtype, boxes)
            whole.add(leaf.key)
            entries[leaf.key] = {
                "kind": "tensor",
                "shape": list(shape),
                "dtype": dtype_name(v.dtype),
            }
        else:
            entries[leaf.key] = {"kind": "object", "type": type(v).__name__}
    marker = {"format": FORMAT, "version": VERSION, "entries": entries}

    # -- write aside, then commit --------------------------------------------
    status: tuple = ("ok", "")
    if coordinator:
        try:
            _atomic.prepare(path, where)
            status = ("ok", str(_atomic.temporary(path)))
        except (CheckpointError, OSError) as e:
            status = ("error", f"{type(e).__name__}: {e}")
            if not distributed:
                raise
    if distributed:
        status = _broadcast(status)
    if status[0] == "error":
        raise CheckpointError(f"{where}: rank 0 could not prepare {str(path)!r}: {status[1]}")
    tmp = Path(status[1])
    planner = BoxSavePlanner(
        tensors, objects, {leaf.key: leaf.path for leaf in leaves}, frozenset(whole)
    )
    writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, overwrite=False)
    with _quiet():
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=not distributed)
    _atomic._step("data")
    if coordinator:
        try:
            _atomic.write_marker(tmp, marker)
            _atomic.commit(tmp, path)
            status = ("ok", "")
        except OSError as e:
            status = ("error", f"{type(e).__name__}: {e}")
            if not distributed:
                raise
    if distributed:
        status = _broadcast(status)  # the other ranks return once rank 0 has committed
        if status[0] == "error":
            raise CheckpointError(f"{where}: rank 0 could not commit {str(path)!r}: {status[1]}")


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sharded_boxes(x: ShardedTensor, coordinator: bool) -> tuple[SavedTensor, dict[str, Any]]:
    """The exact boxes this process writes of `x` (partials reduced first) and its metadata."""
    mesh, am, shape = x.mesh, x.mesh.abstract, tuple(x.shape)
    source = x.spec
    layout = source
    with torch.no_grad():
        if source.partial:
            layout = _reduced_layout(source, shape, am)
            x = _reshard_impl(x, layout, "checkpoint", "forward")
    shards = x.local_shards()
    entry = {
        "kind": "sharded",
        "shape": list(shape),
        "dtype": dtype_name(x.dtype),
        "mesh": mesh.axes,
        "backend": mesh.backend.kind,
        "layout": repr(source),
        "saved_layout": repr(layout),
    }
    boxes: list[Box] = []
    if math.prod(shape) == 0:  # nothing to split: one empty chunk keeps shape and dtype
        if coordinator:
            boxes.append(Box((0,) * len(shape), torch.empty(shape, dtype=x.dtype)))
        return SavedTensor(shape, x.dtype, boxes), entry
    if _is_distributed(mesh) or coordinator:
        local = dict(zip(mesh.local_devices, shards))
        for dev in _writer_devices(layout, am, mesh.local_devices):
            bounds = _box_of(shape, layout, am, dev)
            if any(hi == lo for lo, hi in bounds):
                continue  # an empty chunk of an uneven split
            boxes.append(Box(tuple(lo for lo, _ in bounds), _exact(local[dev])))
    return SavedTensor(shape, x.dtype, boxes), entry


# == load ======================================================================
def load(path: str | os.PathLike, like: Any) -> Any:
    """Read the checkpoint at `path` into a new tree shaped like `like`.

    Each leaf of `like` says what to build (its value is not read, and `like` is
    not changed):

    - a ShardedTensor: a new one on its mesh and layout, with its shape, dtype
      and ``requires_grad`` (a partial layout gets the value on the devices with
      index 0 along its partial axes, zeros elsewhere, as `sl.shard` does);
    - a ``(mesh, layout)`` pair: a ShardedTensor with the saved shape and dtype;
    - a plain tensor: a plain tensor of the same shape and dtype;
    - any other value (``0``, ``None``, ...): a placeholder for a saved non-tensor value.

    Each process reads only the blocks its own devices hold, intersected with the
    saved chunks by DCP's resharding, so any mesh and layout loads any checkpoint,
    including one that DTensor (torch.distributed.checkpoint.save) wrote. A
    checkpoint that a killed `save` left half-replaced loads as the whole old or
    the whole new one.

    Raises:
        CheckpointNotFoundError: no checkpoint at `path` (the message lists the
            checkpoints next to it).
        CheckpointError: a key of `like` the checkpoint lacks, a saved key `like`
            lacks, or a shape, dtype or kind (tensor or not) that differs; all at once.

    Examples:
        >>> import shardlib as sl, torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> mesh = sl.Mesh.simulated({"x": 2})
        >>> sl.checkpoint.save(path, {"w": sl.shard(torch.arange(5), mesh, sl.P("x")), "pos": 7})
        >>> out = sl.checkpoint.load(path, {"w": (sl.Mesh.simulated({"y": 3}), sl.P("y")), "pos": None})
        >>> [s.tolist() for s in out["w"].local_shards()], out["pos"]
        ([[0, 1], [2, 3], [4]], 7)
    """
    where = "sl.checkpoint.load"
    path = Path(os.fspath(path))
    src = _atomic.resolve(path)
    if src is None:
        raise _atomic.not_found(path, where)
    saved = dcp.FileSystemReader(src).read_metadata().state_dict_metadata
    marker = _atomic.read_marker(src)
    described = marker.get("entries", {}) if marker else {}
    leaves, spec = flatten(like, f"{where}(like=...)")
    _check_like(leaves, saved, described, str(src), where)

    tensors: dict[str, list[Box]] = {}
    objects: list[str] = []
    plans: dict[str, Any] = {}
    for leaf in leaves:
        md = saved[leaf.key]
        if isinstance(md, BytesStorageMetadata):
            objects.append(leaf.key)
            continue
        shape, dtype = tuple(md.size), md.properties.dtype
        if isinstance(leaf.value, ShardedTensor) or is_target(leaf.value):
            mesh, layout = (
                (leaf.value.mesh, leaf.value.spec)
                if isinstance(leaf.value, ShardedTensor)
                else leaf.value
            )
            layout = layout.check(mesh.abstract, len(shape), f"{where}(like=...) at {_shown(leaf)}")
            dest, per_device = _destination(shape, dtype, layout, mesh)
            plans[leaf.key] = ("sharded", mesh, layout, shape, per_device, dest)
        else:
            dest = [Box((0,) * len(shape), torch.empty(shape, dtype=dtype))]
            plans[leaf.key] = ("tensor", dest)
        tensors[leaf.key] = [b for b in dest if b.data.numel()]
    planner = BoxLoadPlanner(tensors, objects)
    with _quiet():
        dcp.load({}, storage_reader=dcp.FileSystemReader(src), planner=planner, no_dist=True)

    values = []
    for leaf in leaves:
        if leaf.key in planner.values:
            values.append(planner.values[leaf.key])
            continue
        plan = plans[leaf.key]
        like_value = leaf.value
        if plan[0] == "tensor":
            t = plan[1][0].data
            if isinstance(like_value, torch.Tensor):
                t = t.to(like_value.device)
                if like_value.requires_grad:
                    t.requires_grad_()
            values.append(t)
            continue
        _, mesh, layout, shape, per_device, dest = plan
        values.append(_assemble(mesh, layout, shape, per_device, dest, like_value))
    return pytree.tree_unflatten(values, spec)


def _destination(
    shape: tuple[int, ...], dtype: torch.dtype, layout: Layout, mesh: Mesh
) -> tuple[list[Box], list[int]]:
    """One buffer per distinct block this process's devices hold (replicas read once), and
    for each local device the index of its buffer."""
    read = layout.without_partial()
    index: dict[tuple, int] = {}
    dest: list[Box] = []
    per_device = []
    for dev in mesh.local_devices:
        bounds = _box_of(shape, read, mesh.abstract, dev)
        if bounds not in index:
            index[bounds] = len(dest)
            sizes = tuple(hi - lo for lo, hi in bounds)
            dest.append(Box(tuple(lo for lo, _ in bounds), torch.empty(sizes, dtype=dtype)))
        per_device.append(index[bounds])
    return dest, per_device


def _assemble(
    mesh: Mesh,
    layout: Layout,
    shape: tuple[int, ...],
    per_device: list[int],
    dest: list[Box],
    like_value: Any,
) -> ShardedTensor:
    device = like_value.device if isinstance(like_value, ShardedTensor) else torch.device("cpu")
    used: set[int] = set()
    shards = []
    for dev, i in zip(mesh.local_devices, per_device):
        block = dest[i].data
        zero = (
            layout.partial
            and layout.reduce_op == "sum"
            and partial_index(layout, mesh.abstract, dev)
        )
        if zero:
            block = torch.zeros_like(block)
        elif i in used:
            block = block.clone()
        else:
            used.add(i)
        shards.append(block.to(device))
    grad = isinstance(like_value, ShardedTensor) and like_value.requires_grad
    return ShardedTensor(shards, mesh, layout, shape, requires_grad=grad)


def _check_like(
    leaves: list[Leaf], saved: dict[str, Any], described: dict[str, Any], src: str, where: str
) -> None:
    """Every problem of `like` against the checkpoint, in one error."""
    problems = []
    keys = {leaf.key for leaf in leaves}
    extra = [leaf for leaf in leaves if leaf.key not in saved]
    missing = sorted(k for k in saved if k not in keys)
    if extra:
        problems.append(
            "like has entries the checkpoint does not hold: "
            + ", ".join(_shown(leaf) for leaf in extra)
        )
    if missing:
        problems.append(
            "the checkpoint holds entries like lacks: "
            + ", ".join(f"{k!r} ({_describe(saved[k])})" for k in missing)
            + " — add them to like (a tensor or (mesh, layout) for a tensor, any "
            "placeholder for a non-tensor value)"
        )
    for leaf in leaves:
        md = saved.get(leaf.key)
        if md is None:
            continue
        v = leaf.value
        wants_tensor = isinstance(v, torch.Tensor) or is_target(v)
        if isinstance(md, BytesStorageMetadata):
            if wants_tensor:
                problems.append(
                    f"like{_shown(leaf)} is a tensor target, but the checkpoint holds a "
                    f"non-tensor value ({described.get(leaf.key, {}).get('type', 'object')}) "
                    "there; pass a placeholder such as None"
                )
            continue
        assert isinstance(md, TensorStorageMetadata)  # DCP stores tensors or bytes
        shape, dtype = tuple(md.size), md.properties.dtype
        if not wants_tensor:
            problems.append(
                f"like{_shown(leaf)} is a {type(v).__name__}, but the checkpoint holds a tensor "
                f"of shape {shape} and dtype {dtype} there; pass a tensor, a ShardedTensor or "
                "a (mesh, layout) pair"
            )
            continue
        if isinstance(v, torch.Tensor):
            if tuple(v.shape) != shape:
                problems.append(
                    f"like{_shown(leaf)} has shape {tuple(v.shape)}, but the checkpoint holds "
                    f"shape {shape}"
                )
            if v.dtype != dtype:
                problems.append(
                    f"like{_shown(leaf)} has dtype {v.dtype}, but the checkpoint holds {dtype} "
                    f"(load with dtype {dtype}, then cast)"
                )
        else:
            mesh, layout = v
            try:
                layout.check(mesh.abstract, len(shape), f"like{_shown(leaf)}")
            except LayoutError as e:
                problems.append(f"{e} (the checkpoint holds shape {shape})")
    if problems:
        raise CheckpointError(
            f"{where}(path={src!r}, like=...): like does not match the checkpoint: "
            + "; ".join(problems)
            + "."
        )


def _describe(md: Any) -> str:
    if isinstance(md, BytesStorageMetadata):
        return "a non-tensor value"
    return f"tensor {tuple(md.size)} {dtype_name(md.properties.dtype)}"
