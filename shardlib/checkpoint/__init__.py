"""Sharded checkpoints (DESIGN §9): `sl.checkpoint.save(path, tree)`, `sl.checkpoint.load(path, like)`.

A checkpoint is a torch.distributed.checkpoint (DCP) directory: DCP's
``.metadata`` (per key: global size, dtype, the exact saved chunks) and data
files, plus ``shardlib.json`` (layouts, meshes, kinds; written last, it marks
the directory complete). Any mesh and layout loads any checkpoint, DTensor's
included, and plain `torch.distributed.checkpoint.load` reads ours.
Saves are atomic (`_atomic.py`).
"""

from ._api import load as load
from ._api import save as save
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointNotFoundError as CheckpointNotFoundError
