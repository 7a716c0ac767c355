"""Smoke run of examples/parallel_schemes.py (issue 7 deliverable 5) and what its table claims.

One `main()` run on tiny sizes (float64, the simulated backend, every scheme)
into a temp folder: the bar chart PNG exists, the printed table has a row for
every scheme and ends with the reproducing command, each scheme's loss and
gradients equal the unsharded float64 model, dp's ledger equals the closed-form
ring all-reduce of every gradient (written here from the parameter count),
and, per scheme, our bytes forward and backward are at or below the paper's
figure (the engine cross-check). Schemes where the engine is known to send
more than the textbook plan are strict xfails that name the gap (they fail
once it is fixed, so the mark gets removed). A `dist` run on 4 gloo ranks
measures the same bytes as the simulated mesh (slow tier: two launches).
"""

from __future__ import annotations

import contextlib
import io
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # spawned gloo workers inherit sys.path

import parallel_schemes as ps  # noqa: E402

from shardlib.nn import gpt  # noqa: E402

TINY = [
    "--vocab", "128", "--dim", "32", "--heads", "4", "--kv-heads", "4", "--layers", "1",
    "--seq", "16", "--batch", "4", "--devices", "4", "--dtype", "float64", "--quiet",
]  # fmt: skip

# Known engine/model gaps against the textbook plan, measured on TINY (bytes over the paper):
EMBED_LOOKUP = (
    "the embedding lookup on an FSDP-split table (vocabulary also split over dp) makes a partial "
    "over dp that is reduce-scattered, where gathering the table shard (the paper's plan) is "
    "slightly cheaper: the lookup's rule prices its input moves only (about 0.3% over at the "
    "example's default sizes)"
)
TINY_3D = (
    "at these tiny sizes the 3D embedding's table gradient (vocab split over (j, i)) is reduced "
    "where the paper gathers the gradient instead; at the example's default sizes tp3d is below "
    "the paper"
)
GAPS = {
    "tp3d": TINY_3D,
    "fsdp+tp1d": EMBED_LOOKUP,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("h6_examples") / "schemes.png"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rows = ps.main([*TINY, "--out", str(out)])
    return {r.scheme: r for r in rows}, text.getvalue(), out


def test_chart_is_written(run):
    _, _, out = run
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_has_every_scheme_and_the_command(run):
    rows, text, out = run
    assert set(rows) == set(ps.BY_NAME)
    table_names = {line.split()[0] for line in text.splitlines()[2:] if line[:1].isalpha()}
    assert set(ps.BY_NAME) <= table_names
    assert (
        text.rstrip().splitlines()[-1].startswith("reproduce: python examples/parallel_schemes.py")
    )
    assert str(out) in text.rstrip().splitlines()[-1]


def test_meshes_follow_the_device_count(run):
    rows, _, _ = run
    assert rows["tp1d"].mesh == {"tp": 4} and rows["tp2d"].mesh == {"r": 2, "c": 2}
    assert rows["tp2p5d"].mesh == {"d": 2, "r": 2, "c": 2}
    assert rows["tp3d"].mesh == {"i": 2, "j": 2, "k": 2}


def test_loss_and_gradients_equal_unsharded_float64(run):
    rows, _, _ = run
    bad = {
        n: (r.loss_err, r.grad_err)
        for n, r in rows.items()
        if r.loss_err > 1e-12 or r.grad_err > 1e-9
    }
    assert not bad


def test_dp_ledger_is_the_ring_all_reduce_of_every_gradient(run):
    """Forward: the loss scalar (one element a step); backward: 2(P-1)/P of the gradients."""
    rows, _, _ = run
    c = gpt.Config(vocab=128, dim=32, heads=4, layers=1, seq=16, kv_heads=4)
    p, e = 4, 8
    params = gpt.init(c).values()
    assert rows["dp"].fwd == 2 * (p - 1) * e
    assert rows["dp"].bwd == sum(2 * (p - 1) * -(-t.numel() // p) * e for t in params)


def test_memory_per_device(run):
    """Matrices 1/P for 2D, 2.5D, 3D and fsdp, plus the norms as the scheme stores them;
    dp holds everything; activations 1/q² for 2D, 1/(d·q²) for 2.5D."""
    rows, _, _ = run
    c = gpt.Config(vocab=128, dim=32, heads=4, layers=1, seq=16, kv_heads=4)
    e = 8
    params = gpt.init(c)
    whole = sum(t.numel() for t in params.values()) * e
    for name, p in (("tp2d", 4), ("tp2p5d", 4), ("tp3d", 8), ("fsdp", 4)):
        scheme, mesh = ps.BY_NAME[name].scheme(), rows[name].mesh
        norms = 0
        for k, t in params.items():
            if t.ndim == 1:  # split over the mesh axes the scheme's layout names, else whole
                axes = [a for d in scheme.param_layout(gpt.DIMS[k]).dims for a in d]
                norms += t.numel() * e // math.prod(mesh[a] for a in axes)
        matrices = sum(t.numel() for t in params.values() if t.ndim == 2) * e
        assert rows[name].param_bytes == matrices / p + norms, name
    assert rows["dp"].param_bytes == whole
    assert rows["tp2d"].act_bytes == 4 * 16 * 32 * e / 4
    assert rows["tp2p5d"].act_bytes == 4 * 16 * 32 * e / 8


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=GAPS[n])) if n in GAPS else n
        for n in ps.BY_NAME
    ],
)
def test_bytes_at_or_below_the_paper(run, name):
    r = run[0][name]
    assert r.fwd <= r.paper_fwd and r.bwd <= r.paper_bwd, (
        f"{name}: forward {r.fwd} (paper {r.paper_fwd}), backward {r.bwd} (paper {r.paper_bwd})"
    )


@pytest.mark.slow  # ~60-90 s: two 4-rank launches on top of the simulated run
@pytest.mark.dist
def test_gloo_measures_what_the_simulated_mesh_does(run, tmp_path):
    sim = run[0]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rows = ps.main([*TINY, "--schemes", "tp1d,ulysses", "--backend", "gloo",
                        "--out", str(tmp_path / "h6_gloo.png")])  # fmt: skip
    assert [r.scheme for r in rows] == ["tp1d", "ulysses"]
    for r in rows:
        assert r.mesh == sim[r.scheme].mesh
        assert (r.fwd, r.bwd) == (sim[r.scheme].fwd, sim[r.scheme].bwd), r.scheme
        assert r.loss_err <= 1e-12 and r.grad_err <= 1e-9, r.scheme
    assert (tmp_path / "h6_gloo.png").exists()
