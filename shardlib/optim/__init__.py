"""Optimizers, ZeRO and mixed precision (DESIGN §9): `import shardlib as sl; sl.optim`.

Optax's shape: a `GradientTransformation` is a pair of pure functions
``init(params) -> state`` and ``update(grads, state, params) -> (updates,
state)`` over pytrees of ShardedTensors and plain tensors; `apply_updates`
adds the updates. ZeRO is a layout policy (`zero`), not a wrapper class.
"""

# -- transformations, clipping, schedules (shardlib/optim/_transform.py, _schedules.py) --
# -- ZeRO as layouts (shardlib/optim/_zero.py) --
# -- mixed precision: master weights, loss scaling, accumulation (shardlib/optim/_precision.py) --
