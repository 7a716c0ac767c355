"""Sharded tensors and the dispatch of ops on them."""

from . import _attention as _attention  # registers rules
from . import _contractions as _contractions  # registers rules
from . import _conv as _conv  # registers rules
from . import _fills as _fills  # registers rules
from . import _foreach as _foreach  # registers rules
from . import _indexing as _indexing  # registers rules
from . import _linalg as _linalg  # registers rules
from . import _losses as _losses  # registers rules
from . import _nn as _nn  # registers rules
from . import _norms as _norms  # registers rules
from . import _pointwise as _pointwise  # registers rules
from . import _reductions as _reductions  # registers rules
from . import _scans as _scans  # registers rules
from . import _spectral as _spectral  # registers rules
from . import _views as _views  # registers rules
from ._api import from_local as from_local
from ._api import full as full
from ._api import reshard as reshard
from ._api import shard as shard
from ._api import visualize as visualize
from ._dispatch import allow_replicate_fallback as allow_replicate_fallback
from ._dispatch import strict as strict
from ._rules import ArgSpec as ArgSpec
from ._rules import RuleInput as RuleInput
from ._rules import Strategy as Strategy
from ._rules import register_rule as register_rule
from ._tensor import ShardedTensor as ShardedTensor
