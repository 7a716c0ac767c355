"""Optimizers, ZeRO and mixed precision (DESIGN §9): `import shardlib as sl; sl.optim`.

Optax's shape: a `GradientTransformation` is a pair of pure functions
``init(params) -> state`` and ``update(grads, state, params) -> (updates,
state)`` over pytrees of ShardedTensors and plain tensors; `apply_updates`
adds the updates. ZeRO is a layout policy (`zero`), not a wrapper class.
"""

from ._precision import DynamicLossScale as DynamicLossScale
from ._precision import MasterWeightsState as MasterWeightsState
from ._precision import dynamic_loss_scale as dynamic_loss_scale
from ._precision import master_weights as master_weights
from ._schedules import constant_schedule as constant_schedule
from ._schedules import cosine_decay_schedule as cosine_decay_schedule
from ._schedules import exponential_decay as exponential_decay
from ._schedules import join_schedules as join_schedules
from ._schedules import linear_schedule as linear_schedule
from ._schedules import warmup_cosine as warmup_cosine
from ._schedules import warmup_cosine_decay_schedule as warmup_cosine_decay_schedule
from ._transform import EmptyState as EmptyState
from ._transform import GradientTransformation as GradientTransformation
from ._transform import OptimError as OptimError
from ._transform import ScaleByAdamState as ScaleByAdamState
from ._transform import ScaleByScheduleState as ScaleByScheduleState
from ._transform import TraceState as TraceState
from ._transform import adam as adam
from ._transform import adamw as adamw
from ._transform import add_decayed_weights as add_decayed_weights
from ._transform import apply_updates as apply_updates
from ._transform import chain as chain
from ._transform import clip_by_global_norm as clip_by_global_norm
from ._transform import donate as donate
from ._transform import global_norm as global_norm
from ._transform import identity as identity
from ._transform import scale as scale
from ._transform import scale_by_adam as scale_by_adam
from ._transform import scale_by_learning_rate as scale_by_learning_rate
from ._transform import sgd as sgd
from ._transform import step as step
from ._transform import trace as trace
from ._zero import Zero as Zero
from ._zero import ZeroLayouts as ZeroLayouts
from ._zero import zero as zero
