"""torch.distributed.checkpoint planners that write and read exact boxes.

Owns the translation between shardlib's blocks and DCP's plan vocabulary: a
box (global offsets and sizes of one device's block) is a `WriteItem` with a
`ChunkStorageMetadata` on save, and a destination chunk handed to DCP's own
resharding (`create_read_items_for_chunk_list`, which intersects it with
every saved chunk) on load. It does not decide which boxes a process writes
or reads (that is `_api.py`) and never pads: a box is written at its exact
size, so uneven shards stay uneven on disk.

The checkpoint is plain DCP: `.metadata` lists, per key, the global size,
dtype and chunks, and `planner_data` maps each key to its path in the tree
(what DCP's own planner records), so `torch.distributed.checkpoint.load`
into a nested dict of full tensors, DTensor programs and
`format_utils.dcp_to_torch_save` read it.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, NamedTuple

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

__all__ = ["Box", "BoxLoadPlanner", "BoxSavePlanner", "SavedTensor"]


class Box(NamedTuple):
    """A block of a global tensor: where it starts and its data (sizes are ``data.shape``)."""

    offsets: tuple[int, ...]
    data: torch.Tensor


class SavedTensor(NamedTuple):
    """What one process writes of one tensor: its global shape, dtype and boxes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    boxes: list[Box]


def _chunk(box: Box) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(box.offsets), sizes=box.data.size())


class BoxSavePlanner(DefaultSavePlanner):
    """A SavePlanner whose local plan is exactly the given boxes and serialized objects.

    Args:
        tensors: key -> `SavedTensor` (this process's boxes; may be none).
        objects: key -> ``torch.save`` bytes of a non-tensor value (coordinator only).
        paths: key -> path in the tree (DCP's ``planner_data``).
        whole: keys written as one whole tensor (DCP's ``TENSOR`` items) rather than shards.
    """

    def __init__(
        self,
        tensors: dict[str, SavedTensor],
        objects: dict[str, bytes],
        paths: dict[str, tuple[str | int, ...]],
        whole: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = tensors
        self._objects = objects
        self._paths = paths
        self._whole = whole
        self._data = {
            (key, tuple(box.offsets)): box.data
            for key, saved in tensors.items()
            for box in saved.boxes
        }

    def set_up_planner(
        self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False
    ) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, saved in self._tensors.items():
            kind = WriteItemType.TENSOR if key in self._whole else WriteItemType.SHARD
            for box in saved.boxes:
                items.append(
                    WriteItem(
                        index=MetadataIndex(key, torch.Size(box.offsets)),
                        type=kind,
                        tensor_data=TensorWriteData(
                            chunk=_chunk(box),
                            properties=TensorProperties(dtype=saved.dtype),
                            size=torch.Size(saved.shape),
                        ),
                    )
                )
        for key in self._objects:
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        plans, metadata = super().create_global_plan(all_plans)
        metadata = dataclasses.replace(metadata, planner_data=dict(self._paths))
        self.metadata = metadata
        return plans, metadata

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        key = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[key])
        return self._data[(key, tuple(write_item.index.offset))]


class BoxLoadPlanner(DefaultLoadPlanner):
    """A LoadPlanner that fills the given destination boxes and reads the named objects.

    DCP's resharding turns each destination box into reads of the saved chunks it
    overlaps (any saved layout, any mesh, uneven or not).

    Args:
        tensors: key -> destination boxes (buffers to fill, global offsets).
        objects: keys of non-tensor values to read; `values` holds them afterwards.
    """

    def __init__(self, tensors: dict[str, list[Box]], objects: list[str]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = tensors
        self._objects = objects
        self.values: dict[str, Any] = {}

    def set_up_planner(
        self, state_dict: Any, metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        self.original_state_dict = self.state_dict = {}
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None  # set by DCP before planning (not user input)
        reads: list[ReadItem] = []
        for key, boxes in self._tensors.items():
            md = self.metadata.state_dict_metadata[key]
            reads += create_read_items_for_chunk_list(key, md, [_chunk(b) for b in boxes])
        for key in self._objects:
            reads.append(
                ReadItem(
                    type=LoadItemType.BYTE_IO,
                    dest_index=MetadataIndex(key),
                    dest_offsets=torch.Size((0,)),
                    storage_index=MetadataIndex(key),
                    storage_offsets=torch.Size((0,)),
                    lengths=torch.Size((0,)),
                )
            )
        return LoadPlan(reads)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.values[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        box = self._tensors[read_item.dest_index.fqn][read_item.dest_index.index]
        return narrow_tensor_by_index(box.data, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: already in place
