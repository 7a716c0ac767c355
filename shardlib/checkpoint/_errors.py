"""Errors of `sl.checkpoint`: subclasses of shardlib's own `ShardlibError`.

Messages name the call, the checkpoint key, both values (saved and asked
for) and a fix, and list every problem of one call at once.
"""

from __future__ import annotations

from .._errors import ShardlibError

__all__ = ["CheckpointError", "CheckpointNotFoundError"]


class CheckpointError(ShardlibError, ValueError):
    """A checkpoint and the tree given to `save` or `load` do not fit together."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """`sl.checkpoint.load(path, ...)` found no complete checkpoint at `path`."""
