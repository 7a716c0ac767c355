"""Rule validator: every layout combination of an op's inputs against the unsharded result.

For each op in `CASES` and every assignment of layouts to its tensor inputs on
a simulated mesh (each mesh axis unused, on a dim, or partial-sum), run the op
on sharded inputs and compare `.full()` with the op on the global float64
values (rtol 1e-9, atol 1e-9). Outcomes per combination:

- ok: equal values;
- wrong: different values or shapes (a wrong rule: must never happen);
- missing: `sl.NoRuleError` (no rule for the op);
- refused: another shardlib error that names a fix (an in-place op asked to
  change its operand's layout, say), counted separately.

    python tools/validate_rules.py [--mesh a=2,b=2] [--ops add,mm,...] [--limit N]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

import shardlib as sl

# name -> (function of tensors, input shapes); inputs are float64 unless the name says ints
CASES: dict[str, tuple[Callable, list[tuple[int, ...]]]] = {
    "add": (torch.add, [(6, 5), (6, 5)]),
    "add_broadcast": (torch.add, [(6, 5), (5,)]),
    "sub": (torch.sub, [(6, 5), (6, 5)]),
    "mul": (torch.mul, [(6, 5), (6, 5)]),
    "div": (torch.div, [(6, 5), (6, 5)]),
    "neg": (torch.neg, [(6, 5)]),
    "exp": (torch.exp, [(6, 5)]),
    "relu": (torch.relu, [(6, 5)]),
    "gelu": (F.gelu, [(6, 5)]),
    "tanh": (torch.tanh, [(6, 5)]),
    "maximum": (torch.maximum, [(6, 5), (6, 5)]),
    "where": (lambda a, b: torch.where(a > 0, a, b), [(6, 5), (6, 5)]),
    "add_scalar": (lambda a: a + 2.0, [(6, 5)]),
    "mul_scalar": (lambda a: a * 3.0, [(6, 5)]),
    "mm": (torch.mm, [(6, 5), (5, 4)]),
    "matmul_3d": (torch.matmul, [(3, 6, 5), (5, 4)]),
    "bmm": (torch.bmm, [(3, 4, 5), (3, 5, 2)]),
    "addmm": (torch.addmm, [(4,), (6, 5), (5, 4)]),
    "linear": (F.linear, [(6, 5), (4, 5), (4,)]),
    "einsum": (lambda a, b: torch.einsum("ij,kj->ik", a, b), [(6, 5), (4, 5)]),
    "sum": (torch.sum, [(6, 5)]),
    "sum_dim0": (lambda a: a.sum(0), [(6, 5)]),
    "sum_dim1_keepdim": (lambda a: a.sum(1, keepdim=True), [(6, 5)]),
    "mean_dim0": (lambda a: a.mean(0), [(6, 5)]),
    "amax_dim1": (lambda a: a.amax(1), [(6, 5)]),
    "var_dim0": (lambda a: a.var(0), [(6, 5)]),
    "softmax_dim1": (lambda a: torch.softmax(a, 1), [(6, 5)]),
    "log_softmax_dim0": (lambda a: torch.log_softmax(a, 0), [(6, 5)]),
    "layer_norm": (lambda a: F.layer_norm(a, (5,)), [(6, 5)]),
    "transpose": (lambda a: a.t(), [(6, 5)]),
    "reshape_merge": (lambda a: a.reshape(30), [(6, 5)]),
    "reshape_split": (lambda a: a.reshape(3, 2, 5), [(6, 5)]),
    "unsqueeze": (lambda a: a.unsqueeze(1), [(6, 5)]),
    "expand": (lambda a: a.unsqueeze(0).expand(3, 6, 5), [(6, 5)]),
    "cat": (lambda a, b: torch.cat([a, b], 0), [(6, 5), (6, 5)]),
    "stack": (lambda a, b: torch.stack([a, b], 1), [(6, 5), (6, 5)]),
    "slice": (lambda a: a[1:4], [(6, 5)]),
    "select": (lambda a: a[:, 2], [(6, 5)]),
    "split": (lambda a: torch.split(a, 2, 1)[1], [(6, 5)]),
}


def layouts(axes: tuple[str, ...], ndim: int, partial: bool = True) -> list[sl.Layout]:
    roles = range(ndim + (2 if partial else 1))
    out = []
    for assign in itertools.product(roles, repeat=len(axes)):
        dims = [[a for a, r in zip(axes, assign) if r == d] for d in range(ndim)]
        part = tuple(a for a, r in zip(axes, assign) if r == ndim + 1)
        for perm in itertools.product(*(itertools.permutations(d) for d in dims)):
            out.append(sl.Layout(tuple(perm), part))
    return out


def _summands(mesh: sl.Mesh, value: torch.Tensor, layout: sl.Layout) -> sl.ShardedTensor:
    """Partial-sum shards that are not simply value-on-one-device (so a wrong rule shows)."""
    blocks = sl.shard(value, mesh, layout.without_partial()).local_shards()
    k = mesh.group_size(layout.partial)
    shards = []
    for dev, b in enumerate(blocks):
        j = mesh.index_along(dev, layout.partial)
        noise = torch.arange(b.numel(), dtype=b.dtype).reshape(b.shape) % 3
        shards.append(b / k + noise * (1 - k if j == 0 else 1))
    return sl.from_local(shards, mesh, layout, tuple(value.shape))


def validate(axes: dict[str, int], ops: list[str] | None = None, limit: int | None = None):
    mesh = sl.Mesh.simulated(axes)
    names = tuple(axes)
    report: dict[str, Counter] = {}
    examples: dict[str, list[str]] = {}
    for name in ops or list(CASES):
        fn, shapes = CASES[name]
        g = torch.Generator().manual_seed(0)
        values = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
        want = fn(*values)
        combos = list(itertools.product(*(layouts(names, len(s)) for s in shapes)))
        if limit:
            combos = combos[:: max(1, len(combos) // limit)]
        counts: Counter = Counter()
        for combo in combos:
            xs = [
                _summands(mesh, v, lay) if lay.partial else sl.shard(v, mesh, lay)
                for v, lay in zip(values, combo)
            ]
            try:
                got = fn(*xs).full()
            except sl.NoRuleError:
                counts["missing"] += 1
                continue
            except sl.ShardlibError:
                counts["refused"] += 1
                continue
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-9, atol=1e-9):
                counts["ok"] += 1
            else:
                counts["wrong"] += 1
                examples.setdefault(name, []).append(" , ".join(map(repr, combo)))
        report[name] = counts
    return report, examples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default="a=2,b=2")
    ap.add_argument("--ops", default=None)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    axes = {k: int(v) for k, v in (p.split("=") for p in args.mesh.split(","))}
    t0 = time.perf_counter()
    report, examples = validate(axes, args.ops.split(",") if args.ops else None, args.limit)
    print(
        f"# python tools/validate_rules.py --mesh {args.mesh}"
        + (f" --limit {args.limit}" if args.limit else "")
    )
    print(f"{'op':<20}{'combos':>8}{'ok':>8}{'wrong':>8}{'missing':>9}{'refused':>9}")
    total: Counter = Counter()
    for name, c in report.items():
        total += c
        print(
            f"{name:<20}{sum(c.values()):>8}{c['ok']:>8}{c['wrong']:>8}{c['missing']:>9}{c['refused']:>9}"
        )
    print(
        f"{'total':<20}{sum(total.values()):>8}{total['ok']:>8}{total['wrong']:>8}"
        f"{total['missing']:>9}{total['refused']:>9}   ({time.perf_counter() - t0:.1f} s)"
    )
    for name, ex in examples.items():
        print(f"WRONG {name}: e.g. {ex[0]}")
    return 1 if total["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
