"""Pure layout algebra: meshes, layouts, shard arithmetic and the redistribution planner.

Nothing here touches tensors' data or `torch.distributed`.
"""

from ._layout import REDUCE_OPS as REDUCE_OPS
from ._layout import Layout as Layout
from ._layout import P as P
from ._mesh import AbstractMesh as AbstractMesh
from ._mesh import Mesh as Mesh
from ._planner import AllGather as AllGather
from ._planner import AllReduce as AllReduce
from ._planner import AllToAll as AllToAll
from ._planner import Plan as Plan
from ._planner import PlanStep as PlanStep
from ._planner import PPermute as PPermute
from ._planner import ReduceScatter as ReduceScatter
from ._planner import Slice as Slice
from ._planner import ToPartial as ToPartial
from ._planner import plan as plan
from ._planner import step_bytes as step_bytes
from ._shard import chunk_bounds as chunk_bounds
from ._shard import local_bounds as local_bounds
from ._shard import local_shape as local_shape
from ._shard import max_local_shape as max_local_shape
