"""constrain / linear / attention under a scheme (placeholder: plain torch ops for now)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def use(scheme, mesh):
    yield


def constrain(x: torch.Tensor, dims: tuple[str, ...]) -> torch.Tensor:
    return x


def linear(x: torch.Tensor, w: torch.Tensor, b=None, *, out_dims: tuple[str, ...]) -> torch.Tensor:
    y = torch.matmul(x, w)  # weights are stored (in, out)
    return y if b is None else y + b


def attention(q, k, v, causal: bool = False, positions=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def shard_params(params, mesh, scheme, dims):
    raise NotImplementedError("shardlib.nn.shard_params is being written")
