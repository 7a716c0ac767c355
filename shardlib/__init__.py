"""shardlib: JAX-style sharding for PyTorch.

A tensor carries an explicit layout over a named device mesh; layouts change by
the cheapest redistribution, and every collective is recorded in a ledger.

Examples:
    >>> import shardlib as sl, torch
    >>> mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    >>> x = sl.shard(torch.randn(8, 8), mesh, sl.P("dp", "tp"))
    >>> with sl.comm_ledger() as led:
    ...     y = sl.reshard(x, sl.P(None, None))
    >>> torch.equal(y.full(), x.full()), led.count()
    (True, 2)
"""

from ._errors import AliasError as AliasError
from ._errors import LaunchError as LaunchError
from ._errors import LayoutError as LayoutError
from ._errors import MeshMismatchError as MeshMismatchError
from ._errors import NoRuleError as NoRuleError
from ._errors import ReplicaMismatchError as ReplicaMismatchError
from ._errors import ShardlibError as ShardlibError
from .collectives._compressed import CompressionError as CompressionError
from .collectives._launch import launch as launch
from .collectives._ledger import CommLedger as CommLedger
from .collectives._ledger import CommRecord as CommRecord
from .collectives._ledger import comm_ledger as comm_ledger
from .layouts._layout import Layout as Layout
from .layouts._layout import P as P
from .layouts._mesh import AbstractMesh as AbstractMesh
from .layouts._mesh import Mesh as Mesh
from .layouts._planner import Plan as Plan
from .layouts._planner import plan as plan
from .ops import _pointwise as _pointwise  # noqa: F401  (registers rules)
from .ops._api import from_local as from_local
from .ops._api import full as full
from .ops._api import remat_saves as remat_saves
from .ops._api import reshard as reshard
from .ops._api import shard as shard
from .ops._api import visualize as visualize
from .ops._api import with_layout as with_layout
from .ops._capture import CaptureError as CaptureError
from .ops._capture import capture as capture
from .ops._contractions import einsum as einsum
from .ops._dispatch import allow_replicate_fallback as allow_replicate_fallback
from .ops._dispatch import strict as strict
from .ops._dtensor import from_dtensor as from_dtensor  # h9h: the DTensor bridge
from .ops._explain import explain as explain
from .ops._gufunc import gufunc as gufunc
from .ops._named import ShardMapError as ShardMapError
from .ops._named import all_gather as all_gather
from .ops._named import all_to_all as all_to_all
from .ops._named import axis_index as axis_index
from .ops._named import pmax as pmax
from .ops._named import pmean as pmean
from .ops._named import pmin as pmin
from .ops._named import ppermute as ppermute
from .ops._named import psum as psum
from .ops._named import psum_scatter as psum_scatter
from .ops._replicas import check_replicas as check_replicas
from .ops._rng import rng as rng  # h4: counter-based random numbers (DESIGN §6)
from .ops._rules import register_rule as register_rule
from .ops._shard_map import shard_map as shard_map
from .ops._tensor import ShardedTensor as ShardedTensor

__version__ = "0.1.0"
from . import checkpoint as checkpoint  # noqa: E402
from . import cuda as cuda  # noqa: E402  (kernels; imports no cuda-python until used)
from . import nn as nn  # noqa: E402  (schemes stand on everything above)
from . import optim as optim  # noqa: E402  (optimizers and ZeRO stand on the ops)
