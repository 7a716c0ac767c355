"""Exception types raised by shardlib.

Every error a user can cause is one of these, so callers can catch shardlib's
complaints without catching unrelated bugs. Messages follow one shape: the
public call and argument, the values involved, the rule that was broken, and
one or two concrete fixes.
"""

from __future__ import annotations


class ShardlibError(Exception):
    """Base class of every error shardlib raises on purpose."""


class LayoutError(ShardlibError, ValueError):
    """A layout, mesh or shape that does not fit together."""


class MeshMismatchError(ShardlibError, ValueError):
    """Tensors on unequal meshes were combined."""


class NoRuleError(ShardlibError, NotImplementedError):
    """An operator has no propagation rule for sharded tensors."""


class LaunchError(ShardlibError, RuntimeError):
    """A worker process of `sl.launch` failed, died or timed out."""


class DistributedSetupError(ShardlibError, RuntimeError):
    """`torch.distributed` is not set up the way a distributed mesh needs."""


class AliasError(ShardlibError, RuntimeError):
    """A write or read through a view that torch would alias but shardlib cannot honour.

    The message says which view, why it is not an alias, and what to do
    (reshard the base first, or ``.clone()`` to say a copy is meant).
    """


class ReplicaMismatchError(ShardlibError, RuntimeError):
    """Devices that hold the same block of a tensor hold different values.

    Raised by `sl.check_replicas` (naming the first op, call or `sl.shard_map`
    output where replicas diverge) and by `sl.shard_map` for an output its
    `out_layouts` declare replicated whose devices returned different values.
    """


class ShapeInferenceError(ShardlibError, RuntimeError):
    """torch rejected an op while shardlib inferred its output on the meta device."""
