"""The GPT model's command-line flags, shared by the benchmarks that time a GPT step.

`add_model_args` adds ``--dim --heads --kv-heads --layers --seq --batch --vocab --mlp``;
`model_flags` writes them back for the printed reproduce command; `model_config` builds the
`gpt.Config`; `check_losses` refuses a table whose variants computed another model.
"""

from __future__ import annotations

import argparse
import math

from shardlib.nn import gpt

CONFIG_FIELDS = ("vocab", "dim", "heads", "layers", "seq", "kv_heads", "mlp")


def add_model_args(
    ap: argparse.ArgumentParser,
    *,
    layers: int,
    seq: int,
    batch: int,
    seq_help: str | None = None,
    batch_help: str | None = None,
) -> None:
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--seq", type=int, default=seq, help=seq_help)
    ap.add_argument("--batch", type=int, default=batch, help=batch_help)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=None, help="MLP width (default 4 * dim)")


def model_flags(args: argparse.Namespace) -> str:
    """The flags `add_model_args` added, as they were given (the defaults of the optional ones
    left out)."""
    return (
        f"--dim {args.dim} --heads {args.heads}"
        + (f" --kv-heads {args.kv_heads}" if args.kv_heads else "")
        + f" --layers {args.layers} --seq {args.seq} --batch {args.batch} --vocab {args.vocab}"
        + (f" --mlp {args.mlp}" if args.mlp else "")
    )


def model_config(args: argparse.Namespace) -> tuple[gpt.Config, dict]:
    """The model the flags describe, and its fields as a plain dict (what workers rebuild it
    from)."""
    config = gpt.Config(**{f: getattr(args, f) for f in CONFIG_FIELDS})
    return config, {f: getattr(config, f) for f in CONFIG_FIELDS}


def check_losses(merged: dict, want: float, where: str, script: str) -> None:
    """Raise if a variant's loss is not the unsharded model's `want` (1e-4 relative)."""
    bad = {
        name: m["loss"]
        for name, (_, m) in merged.items()
        if not math.isfinite(m["loss"]) or abs(m["loss"] - want) > 1e-4 * max(1.0, abs(want))
    }
    if bad:
        raise AssertionError(
            f"{script} ({where}): losses {bad} differ from the unsharded model's {want:.6f} "
            "by more than 1e-4 relative: a variant computes another model"
        )
