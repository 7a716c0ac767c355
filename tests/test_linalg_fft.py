"""Linear algebra, fft, complex views and structured matrix ops on sharded tensors.

Covers `shardlib/ops/_linalg.py` and `shardlib/ops/_spectral.py`:

- Values and gradients against unsharded float64 torch on {a:2, b:2} and {x:4}
  with uneven batch splits (empty blocks included): inv, det, slogdet, solve
  (matrix, vector and broadcast right-hand sides), cholesky, qr, svd (through
  invariant functions of U, S, Vh), eigvalsh, eig (eigenvalues), lu_factor +
  lu_solve, solve_triangular, matrix_exp, pinv, householder_product; fft,
  rfft, irfft, fft2, hfft and ifftn with real and complex inputs; view_as_real,
  view_as_complex, conj; tril/triu (in-place too), diag_embed,
  diagonal_scatter, slice_scatter, trace, cross, cdist, bilinear, addbmm,
  unfold.
- Ledger: batch-split linalg and fft move nothing (forward and backward); a
  split matrix (or transformed) dim gathers exactly that operand, closed form
  ``(k - 1) * largest block`` bytes; strict mode refuses it naming the op;
  tril/triu/diag_embed/diagonal_scatter/slice_scatter/trace on split matrices
  move nothing; cdist with both row dims split moves nothing and its x1 gradient
  with x2's rows split is a partial sum (no collective in backward).
- The lazy conjugate bit: `x.conj()` of a sharded complex tensor followed by
  any op gives the conjugate's values (shards never carry the bit).
- Refusals: as_strided of a split non-contiguous view raises a LayoutError
  naming the op and the fix.
- Rule tests (pure data): the matrix rule's strategies for a batch split and a
  broadcast right-hand side.

Tolerances: float64, rtol 1e-9, atol 1e-10 (matrix kernels on blocks run the
same LAPACK calls as on the whole batch; fft on blocks the same transforms).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import shardlib as sl
from shardlib.layouts._mesh import AbstractMesh
from shardlib.ops import ArgSpec, RuleInput
from shardlib.ops._linalg import matrix_rule
from tests._reference import block, make_summands

P = sl.P
aten = torch.ops.aten
TOL = {"rtol": 1e-9, "atol": 1e-10}
MESHES = {"a2b2": {"a": 2, "b": 2}, "x4": {"x": 4}}
F64, C128 = torch.float64, torch.complex128


# == helpers ===================================================================
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _well_conditioned(*shape: int, seed: int = 0) -> torch.Tensor:
    n = shape[-1]
    return torch.randn(shape, generator=_gen(seed), dtype=F64) + n * torch.eye(n, dtype=F64)


def _spd(*shape: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(shape, generator=_gen(seed), dtype=F64)
    return a @ a.mT + shape[-1] * torch.eye(shape[-1], dtype=F64)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=dtype)


def _outputs(out) -> list[torch.Tensor]:
    leaves = out if isinstance(out, list | tuple) else [out]
    return [
        t
        for t in leaves
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
    ]


def _loss(outs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]):
    total = 0
    for t, w in zip(outs, weights):
        total = total + ((torch.view_as_real(t) if t.is_complex() else t) * w).sum()
    return total


def _weights(outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [
        _randn(*(torch.view_as_real(t) if t.is_complex() else t).shape, seed=7 + i)
        for i, t in enumerate(outs)
    ]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if isinstance(got, sl.ShardedTensor):
        got = got.full()
    torch.testing.assert_close(got.detach(), want.detach(), **TOL, msg=lambda m: f"{what}: {m}")


def run(
    fn: Callable,
    values: Sequence[torch.Tensor],
    layouts: Sequence[sl.Layout | None],
    axes: dict[str, int],
    grads: bool = True,
) -> tuple[list, list]:
    """`fn` on plain tensors and on sharded ones (None: left plain); compare values and grads.

    Returns the forward and backward ledger records as (kind, axes, bytes).
    """
    mesh = sl.Mesh.simulated(axes)
    plain = [v.clone().requires_grad_(grads) for v in values]
    want = fn(*plain)
    want_outs = _outputs(want)
    weights = _weights(want_outs)
    if grads:
        _loss(want_outs, weights).backward()
    sharded = []
    for v, lay in zip(values, layouts):
        if lay is None:
            sharded.append(v.clone().requires_grad_(grads))
        elif lay.partial:
            s = sl.from_local(make_summands(v, lay, axes), mesh, lay, tuple(v.shape))
            sharded.append(s.requires_grad_(grads))
        else:
            sharded.append(sl.shard(v.clone(), mesh, lay).requires_grad_(grads))
    with sl.comm_ledger() as fwd:
        got = fn(*sharded)
        got_outs = _outputs(got)
        loss = _loss(got_outs, weights) if grads else None
    assert len(got_outs) == len(want_outs)
    for i, (g, w) in enumerate(zip(got_outs, want_outs)):
        _close(g, w, f"output {i}")
        if isinstance(g, sl.ShardedTensor) and not g.spec.partial:
            for dev, shard in enumerate(g.local_shards()):
                torch.testing.assert_close(shard, block(w.detach(), g.spec, axes, dev), **TOL)
    bwd_records = []
    if grads:
        with sl.comm_ledger() as bwd:
            loss.backward()
        bwd_records = [(r.kind, r.axes, r.bytes) for r in bwd.records]
        for i, (s, p) in enumerate(zip(sharded, plain)):
            if p.grad is not None:
                _close(s.grad, p.grad, f"grad of input {i}")
    fwd_records = [(r.kind, r.axes, r.bytes) for r in fwd.records if r.cause != "full"]
    return fwd_records, bwd_records


# Batch-split inputs: 5 matrices on 4 devices (blocks 2, 2, 1, 0) or on 2x2.
BATCH = {"a2b2": P(("a", "b"), None, None), "x4": P("x", None, None)}
BATCH4 = {"a2b2": P("a", "b", None, None), "x4": P(None, "x", None, None)}


def _linalg_cases():
    a = _well_conditioned(5, 4, 4, seed=1)
    spd = _spd(5, 4, 4, seed=2)
    b = _randn(5, 4, 3, seed=3)
    tall = _randn(5, 6, 4, seed=4)
    tri = torch.triu(a)
    return {
        "inv": (torch.linalg.inv, [a]),
        "det": (torch.linalg.det, [a]),
        "slogdet": (lambda x: torch.linalg.slogdet(x).logabsdet, [a]),
        "solve": (torch.linalg.solve, [a, b]),
        "solve_vector": (torch.linalg.solve, [a, _randn(5, 4, seed=5)]),
        "cholesky": (torch.linalg.cholesky, [spd]),
        "qr": (lambda x: torch.linalg.qr(x).R.abs(), [tall]),
        "svd": (
            lambda x: (lambda u, s, vh: (s, (u * s.unsqueeze(-2)) @ vh))(
                *torch.linalg.svd(x, full_matrices=False)
            ),
            [tall],
        ),
        "eigvalsh": (torch.linalg.eigvalsh, [spd]),
        "eigvals": (lambda x: torch.linalg.eigvals(x + x.mT), [a]),
        "lu_solve": (lambda x, y: torch.linalg.lu_solve(*torch.linalg.lu_factor(x), y), [a, b]),
        "solve_triangular": (
            lambda x, y: torch.linalg.solve_triangular(x, y, upper=True),
            [tri, b],
        ),
        "matrix_exp": (lambda x: torch.linalg.matrix_exp(x / 8), [a]),
        "pinv": (torch.linalg.pinv, [tall]),
        "householder": (
            lambda x: torch.linalg.householder_product(x, _randn(5, 3, seed=6)),
            [tall],
        ),
    }


LINALG = _linalg_cases()


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("name", list(LINALG))
def test_batch_split_linalg_matches_torch_and_moves_nothing(name: str, mesh: str):
    fn, values = LINALG[name]
    layouts = [BATCH[mesh] if v.ndim == 3 else P(BATCH[mesh].dims[0], None) for v in values]
    fwd, bwd = run(fn, values, layouts, MESHES[mesh])
    assert fwd == [] and bwd == [], (fwd, bwd)


def test_broadcast_batch_solve_moves_nothing():
    """A[2, 1, n, n] split on its leading batch dim against B[3, n, k] split on its batch dim."""
    axes = {"a": 2, "b": 2}
    a = _well_conditioned(2, 1, 4, 4, seed=8)
    b = _randn(3, 4, 2, seed=9)
    fwd, _ = run(torch.linalg.solve, [a, b], [P("a", None, None, None), P("b", None, None)], axes)
    assert fwd == []


def test_split_matrix_dim_gathers_exactly_that_operand():
    """inv of A[3, 6, 6] with rows split over x (blocks 2, 2, 2, 0): one all-gather of A.

    Closed form: (k - 1) * largest block = 3 * (3 * 2 * 6) * 8 bytes; B batch-split moves nothing.
    """
    axes = {"x": 4}
    a = _well_conditioned(3, 6, 6, seed=10)
    fwd, _ = run(torch.linalg.inv, [a], [P(None, "x", None)], axes, grads=False)
    assert fwd == [("all_gather", ("x",), 3 * (3 * 2 * 6) * 8)]
    b = _randn(3, 6, 2, seed=11)
    fwd, _ = run(torch.linalg.solve, [a, b], [P(None, None, None), P(None, "x", None)], axes, False)
    assert fwd == [("all_gather", ("x",), 3 * (3 * 2 * 2) * 8)]  # only B's rows


def test_strict_mode_names_the_linalg_op():
    mesh = sl.Mesh.simulated({"x": 4})
    a = sl.shard(_well_conditioned(3, 6, 6), mesh, P(None, None, "x"))
    with sl.strict(), pytest.raises(sl.LayoutError, match="linalg_inv_ex"):
        torch.linalg.inv(a)


def test_solve_is_linear_in_a_partial_right_hand_side():
    """solve(A, B) with B partial-sum over b stays partial: no collective."""
    axes = {"a": 2, "b": 2}
    a, b = _well_conditioned(4, 3, 3, seed=12), _randn(4, 3, 2, seed=13)
    mesh = sl.Mesh.simulated(axes)
    lay = P("a", None, None, partial="b")
    bs = sl.from_local(make_summands(b, lay, axes), mesh, lay, tuple(b.shape))
    with sl.comm_ledger() as led:
        x = torch.linalg.solve_triangular(
            sl.shard(torch.triu(a), mesh, P("a", None, None)), bs, upper=True
        )
    assert led.records == [] and x.spec == P("a", None, None, partial="b")
    _close(x, torch.linalg.solve_triangular(torch.triu(a), b, upper=True), "solve_triangular")


# == fft ========================================================================
def _fft_cases():
    r = _randn(5, 6, 7, seed=20)
    c = torch.complex(_randn(5, 6, 7, seed=21), _randn(5, 6, 7, seed=22))
    return {
        "fft_real": (lambda x: torch.fft.fft(x, dim=-1), r),
        "fft_complex": (lambda x: torch.fft.fft(x, dim=-1, norm="ortho"), c),
        "rfft": (lambda x: torch.fft.rfft(x, dim=2), r),
        "irfft": (lambda x: torch.fft.irfft(x, dim=-1), c),
        "hfft": (lambda x: torch.fft.hfft(x, dim=-1), c),
        "fft2": (lambda x: torch.fft.fft2(x, dim=(1, 2)), c),
        "ifftn": (lambda x: torch.fft.ifftn(x, dim=(1, 2), norm="forward"), c),
        "rfft2": (lambda x: torch.fft.rfft2(x), r),
    }


FFT = _fft_cases()


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("name", list(FFT))
def test_fft_along_unsplit_dims_matches_torch_and_moves_nothing(name: str, mesh: str):
    fn, x = FFT[name]
    fwd, bwd = run(fn, [x], [BATCH[mesh]], MESHES[mesh])
    assert fwd == [] and bwd == [], (fwd, bwd)


def test_fft_of_a_partial_sum_stays_partial():
    axes = {"a": 2, "b": 2}
    x = _randn(4, 8, seed=23)
    mesh = sl.Mesh.simulated(axes)
    lay = P("a", None, partial="b")
    xs = sl.from_local(make_summands(x, lay, axes), mesh, lay, tuple(x.shape))
    with sl.comm_ledger() as led:
        y = aten._fft_r2c.default(xs, [1], 0, True)
    assert led.records == [] and y.spec == lay
    _close(y, torch.fft.rfft(x), "rfft")


def test_fft_along_a_split_dim_gathers_that_dim():
    """fft over dim 1 of x[3, 8] complex split over x on dim 1 (blocks of 2): one all-gather.

    Closed form: (4 - 1) * (3 * 2) * 16 bytes (complex128).
    """
    x = torch.complex(_randn(3, 8, seed=24), _randn(3, 8, seed=25))
    fwd, _ = run(lambda t: torch.fft.fft(t, dim=1), [x], [P(None, "x")], {"x": 4}, grads=False)
    assert fwd == [("all_gather", ("x",), 3 * (3 * 2) * 16)]


def test_conjugate_view_is_resolved_on_every_block():
    """x.conj() then any op reads the conjugate (torch skips lazy bits inside dispatch)."""
    mesh = sl.Mesh.simulated({"x": 4})
    x = torch.complex(_randn(5, 3, seed=26), _randn(5, 3, seed=27))
    xs = sl.shard(x, mesh, P("x", None))
    c = xs.conj()
    assert not any(s.is_conj() for s in c.local_shards())
    _close(c * 2, x.conj() * 2, "conj * 2")
    _close(torch.view_as_real(c), torch.view_as_real(x.conj().resolve_conj()), "view_as_real(conj)")
    _close(xs.mH @ xs, x.mH @ x, "x^H x")
    # writes through a conjugate view reach the base conjugated, as in torch
    c.mul_(2j)
    want = x.clone()
    want.conj().mul_(2j)
    _close(xs, want, "base after a write through its conj view")
    xs.add_(1)
    _close(c, (want + 1).conj(), "conj view after a write to its base")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_complex_views_match_torch(mesh: str):
    x = torch.complex(_randn(5, 3, seed=28), _randn(5, 3, seed=29))
    lay = P(BATCH[mesh].dims[0], None)
    fwd, bwd = run(lambda t: torch.view_as_real(t * 1j).sin(), [x], [lay], MESHES[mesh])
    assert fwd == [] and bwd == []
    r = _randn(5, 3, 2, seed=30)
    fwd, bwd = run(lambda t: torch.view_as_complex(t).exp(), [r], [BATCH[mesh]], MESHES[mesh])
    assert fwd == [] and bwd == []


# == structured matrix ops ======================================================
SPLIT_MATRIX = [P("a", "b"), P(("a", "b"), None), P(None, ("b", "a")), P("b", None)]


@pytest.mark.parametrize("layout", SPLIT_MATRIX, ids=str)
@pytest.mark.parametrize("k", [0, 2, -3])
def test_tril_triu_on_split_matrices_move_nothing(layout: sl.Layout, k: int):
    axes = {"a": 2, "b": 2}
    x = _randn(7, 5, seed=31)
    for fn in (lambda t: torch.tril(t, k), lambda t: torch.triu(t, k)):
        fwd, bwd = run(fn, [x], [layout], axes)
        assert fwd == [] and bwd == []
    # in place, on a partial value too (zeros are every reduction's fixed point)
    mesh = sl.Mesh.simulated(axes)
    lay = sl.Layout(layout.dims, ("a",) if "a" not in layout.used_axes else (), "max")
    xs = sl.from_local(make_summands(x, lay, axes), mesh, lay, tuple(x.shape))
    with sl.comm_ledger() as led:
        xs.tril_(k)
    assert led.records == [] and xs.spec == lay
    _close(xs, torch.tril(x, k), "tril_")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_diagonal_ops_on_split_matrices_move_nothing(mesh: str):
    axes = MESHES[mesh]
    split = BATCH[mesh].dims[0]
    v = _randn(3, 6, seed=32)
    # diag_embed at offset 0 with a split diagonal: rows split alike
    fwd, bwd = run(torch.diag_embed, [v], [P(None, split)], axes, grads=False)
    assert fwd == []
    m = _randn(2, 6, 5, seed=33)
    src = _randn(2, 5, seed=34)
    for off in (0, 1, -2):
        n = torch.diagonal(m, off, 1, 2).shape[-1]
        fwd, _ = run(
            lambda t, s, n=n, off=off: torch.diagonal_scatter(t, s[:, :n], off, 1, 2),
            [m, src],
            [P(None, split, None), P()],
            axes,
        )
        assert fwd == []
    s = _randn(2, 3, 5, seed=35)
    fwd, _ = run(
        lambda t, u: torch.slice_scatter(t, u, 1, 1, 6, 2),
        [m, s],
        [P(None, split, None), P()],
        axes,
    )
    assert fwd == []


@pytest.mark.parametrize("mesh", list(MESHES))
def test_structured_ops_match_torch(mesh: str):
    axes = MESHES[mesh]
    split = BATCH[mesh].dims[0]
    for lay in (P(split, None), P(None, split)):  # a block sums its diagonal entries
        fwd, _ = run(torch.trace, [_randn(5, 6, seed=40)], [lay], axes)
        assert fwd == []
    run(
        lambda a, b: torch.linalg.cross(a, b),
        [_randn(5, 3, seed=41), _randn(1, 3, seed=42)],
        [P(split, None), None],
        axes,
    )
    run(
        lambda x, w, b: torch.addbmm(x, w, b, beta=0.5, alpha=2.0),
        [_randn(3, 4, seed=43), _randn(5, 3, 2, seed=44), _randn(5, 2, 4, seed=45)],
        [P(), P(split, None, None), P(split, None, None)],
        axes,
    )
    run(
        torch.nn.functional.bilinear,
        [
            _randn(5, 3, seed=46),
            _randn(5, 2, seed=47),
            _randn(4, 3, 2, seed=48),
            _randn(4, seed=49),
        ],
        [P(split, None), P(split, None), P(), None],
        axes,
    )
    run(lambda t: t.unfold(1, 3, 2).sin(), [_randn(5, 8, seed=50)], [P(split, None)], axes)


def test_cdist_row_splits_are_local():
    """x1 rows over a, x2 rows over b: the output splits on both, no collective forward or
    backward (x1's gradient is partial over b, x2's over a, reduced lazily)."""
    axes = {"a": 2, "b": 2}
    x1, x2 = _randn(2, 5, 3, seed=51), _randn(2, 7, 3, seed=52)
    for p in (2.0, 1.0, float("inf")):
        fwd, bwd = run(
            lambda a, b, p=p: torch.cdist(a, b, p=p),
            [x1, x2],
            [P(None, "a", None), P(None, "b", None)],
            axes,
        )
        assert fwd == [] and bwd == [], (p, fwd, bwd)


def test_as_strided_needs_a_contiguous_or_replicated_input():
    mesh = sl.Mesh.simulated({"x": 4})
    x = _randn(6, 4, seed=53)
    fwd, _ = run(lambda t: t.as_strided((3, 3), (4, 1), 2), [x], [P("x", None)], {"x": 4}, False)
    assert fwd == [("all_gather", ("x",), 3 * 2 * 4 * 8)]
    view = sl.shard(x, mesh, P("x", None)).t()
    with pytest.raises(sl.LayoutError, match="as_strided"):
        view.as_strided((2, 2), (1, 1))


def test_hash_tensor_and_tensor_linspace():
    """hash_tensor over an unsplit dim of a batch-split tensor moves nothing; linspace from
    a partial 0-dim end reduces that end (one small all-reduce) and gives torch's values."""
    axes = {"x": 4}
    mesh = sl.Mesh.simulated(axes)
    x = _randn(5, 6, seed=54)
    with sl.comm_ledger() as led:
        h = torch.ops.aten.hash_tensor(sl.shard(x, mesh, P("x", None)), [1])
    assert led.records == []
    assert torch.equal(h.full(), torch.ops.aten.hash_tensor(x, [1]))
    lay = P(partial="x")
    end = sl.from_local(make_summands(torch.tensor(3.0, dtype=F64), lay, axes), mesh, lay, ())
    with sl.comm_ledger() as led:
        y = torch.linspace(torch.tensor(-1.0, dtype=F64), end, 7)
    assert [r.kind for r in led.records] == ["all_reduce"]
    want = torch.linspace(torch.tensor(-1.0, dtype=F64), torch.tensor(3.0, dtype=F64), 7)
    _close(y, want, "linspace")


# == rules (pure data) ==========================================================
def _ri(op, specs: Sequence[ArgSpec], outs: Sequence[ArgSpec]) -> RuleInput:
    return RuleInput(
        op, AbstractMesh(("a", "b"), (2, 2)), tuple(specs), {}, tuple(specs), tuple(outs)
    )


def test_matrix_rule_keeps_batch_splits_and_clears_matrix_dims():
    a = ArgSpec((4, 3, 3), F64, P("a", "b", None))
    inv = ArgSpec((4, 3, 3), F64)
    info = ArgSpec((4,), torch.int32)
    found = list(matrix_rule(_ri(aten.linalg_inv_ex.default, [a], [inv, info])))
    assert found[0].inputs == (P("a", None, None),)
    assert found[0].outputs == (P("a", None, None), P("a"))
    assert found[-1].inputs == (P(None, None, None),)


def test_matrix_rule_lines_up_broadcast_batch_dims():
    """solve(A[2, 1, n, n], B[3, n, k]): A's batch dim -1 (size 1) broadcasts against B's."""
    a = ArgSpec((2, 1, 3, 3), F64, P("a", None, None, None))
    b = ArgSpec((3, 3, 2), F64, P("b", None, None))
    outs = [
        ArgSpec((2, 3, 3, 2), F64),
        ArgSpec((2, 1, 3, 3), F64),
        ArgSpec((2, 1, 3), torch.int32),
        ArgSpec((2, 1), torch.int32),
    ]
    found = list(matrix_rule(_ri(aten._linalg_solve_ex.default, [a, b], outs)))
    merged = [s for s in found if s.inputs == (P("a", None, None, None), P("b", None, None))]
    assert merged and merged[0].outputs[0] == P("a", "b", None, None)
    assert merged[0].outputs[1] == P("a", None, None, None)
