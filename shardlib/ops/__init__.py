"""Sharded tensors and the dispatch of ops on them."""

from ._api import from_local as from_local
from ._api import full as full
from ._api import reshard as reshard
from ._api import shard as shard
from ._api import visualize as visualize
from ._dispatch import register as register
from ._tensor import ShardedTensor as ShardedTensor
