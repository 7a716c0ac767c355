"""Parallel schemes as layout presets (DESIGN §8): `from shardlib import nn as snn`.

A scheme maps the logical dims a model names (``("batch", "seq", "embed")``) to
layouts; the model calls `constrain`, `linear` and `attention`, which follow the
scheme inside ``with snn.use(scheme, mesh):`` and are the plain torch ops
outside it. Every byte a scheme moves comes from the layouts, the op rules and
the planner: no scheme has its own autograd functions or process groups.
"""

from . import gpt as gpt  # noqa: E402  (the reference model uses the names above)
from ._hf import shard_by_name as shard_by_name  # h9f: parameters of an existing model, by name
from ._scheme import Scheme as Scheme
from ._scheme import dp as dp
from ._scheme import fsdp as fsdp
from ._scheme import ring as ring
from ._scheme import tp1d as tp1d
from ._scheme import tp2d as tp2d
from ._scheme import tp2p5d as tp2p5d
from ._scheme import tp3d as tp3d
from ._scheme import ulysses as ulysses
from ._use import attention as attention
from ._use import constrain as constrain
from ._use import linear as linear
from ._use import shard_params as shard_params
from ._use import use as use
