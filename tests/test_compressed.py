"""Compressed communication (issue 10 item 3): the quantization references, compressed
`sl.reshard(comm_dtype=...)` on the simulated mesh, and `sl.optim.zero(comm_dtype=...)`.

References (``shardlib.cuda._quant``), checked against independent numpy float32/float64
code written here (hypothesis over lengths, blocks and values with zeros and mixed
magnitudes, SHARDLIB_HYPOTHESIS_CASES cases):
- int8 round trip: ``|x - y| <= absmax_b / 254 * (1 + 2e-5)`` per element (half a step;
  the slack covers the float32 roundings of the scale, the quotient and the product:
  254 * 2^-24 < 2e-5 relative), scales ``absmax_b / 127`` exactly, all-zero blocks q = 0;
- fp8 e4m3 round trip: ``|x - y| <= |x| / 16 + absmax_b / 458752`` (+ the same float32
  slack): 3 mantissa bits give 2^-4 relative on a normal quotient, half the subnormal
  spacing 2^-10 of ``scale = absmax / 448`` below 2^-6;
- dequantize-reduce equals numpy's sequential float32 sum of the dequantized pieces
  bitwise; non-finite blocks come out NaN (the rest of the tensor is untouched).
Reshards on {dp: 4} (and {dp: 2, tp: 2}): gather, reduce-scatter, partial -> replicated,
all-to-all, even and uneven, int8 / fp8 / bf16, values against float64 torch within the
format's bound per block (computed here from the pieces each device sends), ledger bytes
equal to the closed forms ``(P-1) * (m + 4 ceil(m/256))`` (int8, fp8), ``(P-1) * 2m``
(bf16) with m the elements of a piece, at most 0.27x and exactly 0.5x of float32;
gradients against the uncompressed reshard's; errors. ZeRO-3 with int8 weight gathers
trains the GPT example 50 steps within 1% of the uncompressed loss at every step
(measured: 0.35% at most; fp8 3% (measured 1.0%), bf16 0.5% (measured 0.11%)).
The gloo runs are in tests/test_compressed_dist.py.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib.cuda import KernelArgumentError
from shardlib.cuda._quant import dequantize, dequantize_reduce, quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 100))
BLOCK = 256
SLACK = 2e-5  # float32 roundings of scale, quotient and product, relative to the bound
FP8_FLOOR = 448 * 1024  # absmax / FP8_FLOOR: half the subnormal spacing, scaled back


# == independent helpers =========================================================
def _blocks_absmax(x: np.ndarray, block: int) -> np.ndarray:
    """Per element, the float32 absmax of its block (numpy, a loop over blocks)."""
    out = np.empty_like(x, dtype=np.float32)
    for lo in range(0, x.size, block):
        out[lo : lo + block] = np.abs(x[lo : lo + block]).max()
    return out


def _bound(fmt: str, x: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    absmax = absmax.astype(np.float64)
    if fmt == "int8":
        return absmax / 254 * (1 + SLACK)
    return (np.abs(x.astype(np.float64)) / 16 + absmax / FP8_FLOOR) * (1 + SLACK)


@st.composite
def _vectors(draw):
    n = draw(st.integers(0, 1200))
    block = draw(st.sampled_from([1, 3, 32, 100, 256, 1000]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    x = g.standard_normal(n).astype(np.float32)
    x *= np.float32(10.0) ** g.integers(-30, 30, size=n).astype(np.float32)  # mixed magnitudes
    x[g.random(n) < 0.2] = 0.0  # zeros, and whole zero blocks below
    if n and draw(st.booleans()):
        lo = int(g.integers(0, n))
        x[lo : lo + block] = 0.0
    return x, block


# == references ===================================================================
@settings(derandomize=True, deadline=None, max_examples=CASES, database=None)
@given(_vectors(), st.sampled_from(["int8", "fp8"]))
def test_round_trip_within_the_formats_bound(case, fmt):
    x, block = case
    q, scales = quantize(torch.from_numpy(x), fmt, block)
    assert q.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    assert q.shape == (x.size,) and scales.shape == (-(-x.size // block),)
    absmax = _blocks_absmax(x, block)
    qmax = np.float32(127.0 if fmt == "int8" else 448.0)
    np.testing.assert_array_equal(scales.numpy(), absmax[::block] / qmax if x.size else [])
    y = dequantize(q, scales, block).numpy()
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert (err <= _bound(fmt, x, absmax)).all(), err.max()
    zero_blocks = np.repeat(scales.numpy() == 0, block)[: x.size]
    assert (q.float().numpy()[zero_blocks] == 0).all()
    if fmt == "int8":
        assert q.abs().max().item() <= 127 if x.size else True


@settings(derandomize=True, deadline=None, max_examples=max(1, CASES // 2), database=None)
@given(
    st.integers(1, 5),
    st.integers(0, 700),
    st.sampled_from([7, 256]),
    st.sampled_from(["int8", "fp8"]),
    st.integers(0, 2**31 - 1),
)
def test_dequantize_reduce_is_the_sequential_float32_sum(k, n, block, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    pieces = [quantize(torch.randn(n, generator=g) * 10 ** (j - 2), fmt, block) for j in range(k)]
    q = torch.stack([p[0] for p in pieces])
    s = torch.stack([p[1] for p in pieces])
    got = dequantize_reduce(q, s, block).numpy()
    acc = np.zeros(n, dtype=np.float32)  # numpy float32: IEEE single ops, no fused multiply-add
    for j in range(k):
        scale_j = np.repeat(s[j].numpy(), block)[:n]
        acc = acc + q[j].float().numpy() * scale_j
    np.testing.assert_array_equal(got, acc)
    summed = torch.zeros(n)  # reducing the dequantized pieces, j = 0 first
    for j in range(k):
        summed = summed + dequantize(q[j], s[j], block)
    np.testing.assert_array_equal(got, summed.numpy())


def test_half_inputs_and_output_dtypes():
    x = torch.randn(600, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        q, s = quantize(x.to(dtype))
        q32, s32 = quantize(x.to(dtype).float())
        assert torch.equal(q, q32) and torch.equal(s, s32)
    q, s = quantize(x)
    y = dequantize(q, s, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, dequantize(q, s).to(torch.bfloat16))
    r = dequantize_reduce(torch.stack([q, q]), torch.stack([s, s]), dtype=torch.float64)
    assert r.dtype == torch.float64


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_non_finite_blocks_come_out_nan(fmt):
    """Decision: propagate, do not raise (a rank raising inside a collective would leave the
    others waiting); the block's scale is inf/NaN, its q 0, so it dequantizes to NaN."""
    x = torch.randn(4 * BLOCK)
    x[3] = float("nan")
    x[BLOCK + 5] = float("inf")
    x[2 * BLOCK + 7] = -float("inf")
    y = dequantize(*quantize(x, fmt))
    assert y[: 3 * BLOCK].isnan().all()
    ok = y[3 * BLOCK :]
    assert (
        ok.isfinite().all() and (ok - x[3 * BLOCK :]).abs().max() <= x[3 * BLOCK :].abs().max() / 16
    )


def test_fp8_saturates_instead_of_nan():
    # a subnormal absmax makes the scale coarse: quotients beyond 448 saturate (satfinite)
    x = torch.tensor([1e-45, -1e-45, 3e-45, 0.0])
    q, s = quantize(x, "fp8", 4)
    assert q.float().abs().max() <= 448 and not q.float().isnan().any()


def test_reference_errors():
    x = torch.randn(10)
    with pytest.raises(KernelArgumentError, match="fmt must be 'int8' or 'fp8'"):
        quantize(x, "int4")
    with pytest.raises(KernelArgumentError, match="block must be a positive int"):
        quantize(x, "int8", 0)
    with pytest.raises(KernelArgumentError, match="only floating tensors"):
        quantize(torch.arange(10), "int8")
    q, s = quantize(x, "int8", 4)
    with pytest.raises(KernelArgumentError, match="scales has 3"):
        dequantize(q, s, 8)
    with pytest.raises(KernelArgumentError, match="quantized pieces are torch.int8"):
        dequantize(q.float(), s, 4)
    with pytest.raises(KernelArgumentError, match=r"must be \[k, n\]"):
        dequantize_reduce(q, s, 4)
    with pytest.raises(KernelArgumentError, match="scales must be"):
        dequantize_reduce(q[None], s, 4)


def test_the_registry_names_these_references():
    try:
        ks = sl.cuda.kernels()
    except sl.cuda.CudaNotInstalledError as e:
        pytest.skip(f"shardlib[cuda] not installed: {e}")
    x = torch.randn(1000)
    for fmt in ("int8", "fp8"):
        q, s = ks[f"quantize_{fmt}"].reference(x, block=128)
        rq, rs = quantize(x, fmt, 128)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
        assert torch.equal(
            ks[f"dequantize_{fmt}"].reference(q, s, block=128), dequantize(q, s, 128)
        )


# == sl.reshard(comm_dtype=...) ====================================================
FORMATS = ["int8", "fp8", torch.bfloat16]
WIRE = {"int8": "int8", "fp8": "float8_e4m3fn", torch.bfloat16: "bfloat16"}


def _name(fmt) -> str:
    return fmt if isinstance(fmt, str) else "bf16"


def _wire_bytes(fmt, m: int) -> int:
    """Bytes one piece of m elements takes on the wire (closed form)."""
    return 2 * m if fmt == torch.bfloat16 else m + 4 * math.ceil(m / BLOCK)


def _piece_bound(fmt, exact: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """Per-element bound for values that travelled as `piece` (a tensor of the same
    shape as `exact`, whose flat 256-blocks are the quantization blocks)."""
    flat = piece.reshape(-1).double()
    n = flat.numel()
    pad = -n % BLOCK
    absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, BLOCK).amax(1)
    absmax = absmax.repeat_interleave(BLOCK)[:n].view(piece.shape)
    if fmt == "int8":
        return absmax / 254 * (1 + SLACK)
    if fmt == "fp8":
        return (piece.double().abs() / 16 + absmax / FP8_FLOOR) * (1 + SLACK)
    return piece.double().abs() / 256


def _mesh():
    return sl.Mesh.simulated({"dp": 4})


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
@pytest.mark.parametrize("rows", [8, 10], ids=["even", "uneven"])
def test_all_gather_values_and_ledger(fmt, rows):
    torch.manual_seed(0)
    x = torch.randn(rows, BLOCK) * torch.logspace(-3, 3, rows)[:, None]
    xs = sl.shard(x, _mesh(), sl.P("dp", None))
    with sl.comm_ledger() as led:
        y = sl.reshard(xs, sl.P(), comm_dtype=fmt)
    with sl.comm_ledger() as ref:
        sl.reshard(xs, sl.P())
    assert y.dtype == x.dtype and y.spec == sl.P(None, None)
    bound = torch.cat([_piece_bound(fmt, s, s) for s in xs.local_shards()])  # a row is a block
    for shard in y.local_shards():  # every replica the same, bit for bit
        assert torch.equal(shard, y.local_shards()[0])
        assert ((shard.double() - x.double()).abs() <= bound).all()
    (r,), (f,) = led.records, ref.records
    m = math.ceil(rows / 4) * BLOCK  # elements of the largest (padded) shard
    assert (r.kind, r.dtype, r.cause) == ("all_gather", WIRE[fmt], "reshard")
    assert r.bytes == 3 * _wire_bytes(fmt, m) and f.bytes == 3 * m * 4
    assert r.scale_bytes == (0 if fmt == torch.bfloat16 else 3 * 4 * math.ceil(m / BLOCK))
    assert r.bytes <= (0.27 if isinstance(fmt, str) else 0.5) * f.bytes


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_reduce_scatter_quantizes_each_summand_once(fmt):
    torch.manual_seed(1)
    parts = [torch.randn(8, BLOCK) * 10.0 ** (j - 1) for j in range(4)]
    xp = sl.from_local(parts, _mesh(), sl.P(partial="dp"), (8, BLOCK))
    with sl.comm_ledger() as led:
        y = sl.reshard(xp, sl.P("dp", None), comm_dtype=fmt)
    exact = sum(p.double() for p in parts)
    # device d's rows 2d..2d+1 are the sum of each summand's chunk, each quantized once
    bound = sum(_piece_bound(fmt, p, p) for p in parts) + 4 * 2**-24 * sum(p.abs() for p in parts)
    got = y.full().double()
    assert y.dtype == torch.float32 and ((got - exact).abs() <= bound).all()
    (r,) = led.records
    assert (r.kind, r.dtype) == ("reduce_scatter", WIRE[fmt])
    m = 2 * BLOCK
    assert r.bytes == 3 * _wire_bytes(fmt, m)
    assert r.bytes <= (0.27 if isinstance(fmt, str) else 0.5) * 3 * m * 4


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_partial_to_replicated_is_a_compressed_reduce_scatter_and_gather(fmt):
    torch.manual_seed(2)
    parts = [torch.randn(8, BLOCK) for _ in range(4)]
    xp = sl.from_local(parts, _mesh(), sl.P(partial="dp"), (8, BLOCK))
    with sl.comm_ledger() as led:
        y = sl.reshard(xp, sl.P(), comm_dtype=fmt)
    exact = sum(p.double() for p in parts)
    stage1 = sum(_piece_bound(fmt, p, p) for p in parts)  # the flat chunks are whole rows
    reduced = sl.reshard(xp, sl.P("dp", None), comm_dtype=fmt).full()
    bound = stage1 + _piece_bound(fmt, reduced, reduced + stage1.float()) + 1e-6
    for shard in y.local_shards():
        assert torch.equal(shard, y.local_shards()[0])
        assert ((shard.double() - exact).abs() <= bound).all()
    (r,) = led.records
    c = 8 * BLOCK // 4
    assert (r.kind, r.dtype, r.bytes) == ("all_reduce", WIRE[fmt], 2 * 3 * _wire_bytes(fmt, c))


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_all_to_all_and_a_2d_mesh(fmt):
    torch.manual_seed(3)
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 2})
    x = torch.randn(12, 10, 9)
    xs = sl.shard(x, mesh, sl.P("dp", "tp"))
    with sl.comm_ledger() as led:
        y = sl.reshard(xs, sl.P("tp", "dp", None), comm_dtype=fmt)  # a ppermute
        v = sl.reshard(xs, sl.P("dp", None, "tp"), comm_dtype=fmt)  # an all-to-all
    z = sl.reshard(xs, sl.P(None, None, None), comm_dtype=fmt)
    amax = x.abs().max().double()  # a loose bound: the largest block absmax of any piece
    loose = {"int8": amax / 254, "fp8": x.abs().double() / 16 + amax / FP8_FLOOR}
    tol = loose.get(fmt, x.abs().double() / 256)
    tol = tol * (1 + SLACK) * 2  # z moves through two steps (two quantizations)
    for moved in (y, v, z):
        assert ((moved.full().double() - x.double()).abs() <= tol).all()
    assert [(r.kind, r.dtype) for r in led.records] == [
        ("ppermute", WIRE[fmt]),
        ("all_to_all", WIRE[fmt]),
    ]
    block = 6 * 5 * 9  # every local block is (6, 5, 9); an all-to-all piece (6, 5, 5)
    assert [r.bytes for r in led.records] == [_wire_bytes(fmt, block), _wire_bytes(fmt, 150)]


def test_dtype_of_the_result_is_the_inputs():
    x = torch.randn(8, 300, dtype=torch.float64)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        xs = sl.shard(x.to(dtype), _mesh(), sl.P("dp", None))
        y = sl.reshard(xs, sl.P(), comm_dtype="int8")
        assert y.dtype == dtype
    xs = sl.shard(x.float(), _mesh(), sl.P("dp", None))
    y = sl.reshard(xs, sl.P(), dtype=torch.bfloat16, comm_dtype="int8")  # cast, then compress
    assert y.dtype == torch.bfloat16
    assert sl.reshard(xs, sl.P("dp", None), comm_dtype="int8") is xs  # no move: nothing sent


def test_non_finite_values_propagate_through_a_reshard():
    x = torch.randn(8, BLOCK)
    x[5, 3] = float("nan")
    y = sl.reshard(sl.shard(x, _mesh(), sl.P("dp", None)), sl.P(), comm_dtype="int8").full()
    assert y[5].isnan().all() and y[[0, 1, 2, 3, 4, 6, 7]].isfinite().all()


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_gradients_go_back_compressed_within_the_bound(fmt):
    """y = gather(w) used against a dp-split batch: the cotangent of y arrives partial over
    dp, so backward is a reduce-scatter, compressed in the same format."""
    torch.manual_seed(4)
    mesh = _mesh()
    a = torch.randn(16, 64)
    w = torch.randn(64, BLOCK)
    grads, ledgers = {}, {}
    for comm in (None, fmt):
        ws = sl.shard(w, mesh, sl.P("dp", None)).requires_grad_()
        xa = sl.shard(a, mesh, sl.P("dp", None))
        with sl.comm_ledger() as led:
            y = sl.reshard(ws, sl.P(), comm_dtype=comm)
            sl.einsum("bi,ij->bj", xa, y).sum().backward()
        grads[comm], ledgers[comm] = ws.grad.full().double(), led.records
    # the summands device d reduces: a_d^T @ ones, float64 here
    summands = [
        a[4 * d : 4 * d + 4].double().T @ torch.ones(4, BLOCK, dtype=torch.float64)
        for d in range(4)
    ]
    exact = sum(summands)
    torch.testing.assert_close(grads[None], exact, rtol=1e-6, atol=1e-5)
    bound = sum(_piece_bound(fmt, s, s) for s in summands) + 1e-5
    assert ((grads[fmt] - exact).abs() <= bound).all()
    back = [r for r in ledgers[fmt] if r.direction == "backward"]
    assert [(r.kind, r.dtype) for r in back] == [("reduce_scatter", WIRE[fmt])]


def test_remat_regathers_compressed():
    mesh = _mesh()
    ws = sl.shard(torch.randn(64, 32), mesh, sl.P("dp", None)).requires_grad_()
    xa = sl.shard(torch.randn(16, 64), mesh, sl.P("dp", None)).requires_grad_()  # dx needs w
    with sl.comm_ledger() as led:
        with sl.remat_saves():
            loss = (xa @ sl.reshard(ws, sl.P(), remat=True, comm_dtype="int8")).tanh().sum()
        loss.backward()
    assert [(r.kind, r.cause, r.dtype, r.direction) for r in led.records] == [
        ("all_gather", "reshard", "int8", "forward"),
        ("all_gather", "regather", "int8", "backward"),
        ("reduce_scatter", "reshard", "int8", "backward"),
    ]


def test_bad_comm_dtype_errors(monkeypatch):
    xs = sl.shard(torch.randn(8, 8), _mesh(), sl.P("dp", None))
    with pytest.raises(sl.CompressionError, match=r"Valid: 'int8'.*'fp8'.*torch.bfloat16"):
        sl.reshard(xs, sl.P(), comm_dtype="int4")
    with pytest.raises(sl.CompressionError, match="floating tensors only"):
        sl.reshard(sl.shard(torch.arange(8), _mesh(), sl.P("dp")), sl.P(), comm_dtype="int8")
    xmax = sl.from_local([torch.randn(8)] * 4, _mesh(), sl.P(partial={"dp": "max"}), (8,))
    with pytest.raises(sl.CompressionError, match="partial max"):
        sl.reshard(xmax, sl.P(), comm_dtype="int8")
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(sl.CompressionError, match="needs torch.float8_e4m3fn"):
        sl.reshard(xs, sl.P(), comm_dtype="fp8")


# == ZeRO ========================================================================
def test_zero3_compressed_gathers_and_grads_ledger():
    """Each compressed record is the closed form of its float32 twin: (P-1) pieces of m
    elements, m = float32 bytes / (4 (P-1))."""
    mesh = _mesh()
    torch.manual_seed(5)
    x = sl.shard(torch.randn(8, 512), mesh, sl.P("dp", None)).requires_grad_()  # dx needs w
    w0 = torch.randn(512, 256) / 20
    records, losses = {}, {}
    for kw in ({}, {"comm_dtype": "int8", "grad_comm_dtype": "int8"}):
        z = sl.optim.zero(3, **kw)
        params = z.place({"w": sl.shard(w0, mesh, sl.P())})
        for p in params.values():
            p.requires_grad_()
        with sl.comm_ledger() as led:
            with sl.remat_saves():
                loss = (x @ z.compute(params)["w"]).tanh().sum()
            loss.backward()
        records[bool(kw)], losses[bool(kw)] = led.records, loss.full().item()
    causes = [r.cause for r in records[True]]
    assert causes == [r.cause for r in records[False]]
    assert causes == ["zero.gather", "regather", "zero.grad"]
    for r, f in zip(records[True], records[False]):
        if r.cause in ("zero.gather", "regather", "zero.grad"):
            m = f.bytes // (4 * 3)
            assert (r.dtype, r.bytes) == ("int8", 3 * (m + 4 * math.ceil(m / BLOCK))), r
    assert abs(losses[True] - losses[False]) <= 0.01 * abs(losses[False])


def test_zero_comm_dtype_errors():
    with pytest.raises(sl.LayoutError, match="stage 3's weight gathers"):
        sl.optim.zero(1, comm_dtype="int8")
    with pytest.raises(sl.LayoutError, match="stage 0 reduces gradients by all-reduce"):
        sl.optim.zero(0, grad_comm_dtype="int8")
    with pytest.raises(sl.CompressionError, match="Valid"):
        sl.optim.zero(3, comm_dtype="int3")
    assert sl.optim.zero(3) == sl.optim.zero(3, "dp")  # the plain policy is unchanged


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_gpt as tg  # noqa: E402

TINY = [
    "--vocab", "16", "--dim", "32", "--heads", "4", "--layers", "1", "--seq", "16",
    "--batch", "8", "--steps", "50", "--quiet", "--no-plot", "--zero", "3",
]  # fmt: skip
# |loss - uncompressed loss| / uncompressed loss at every one of the 50 steps, chosen
# about 3x above what was measured on {dp: 4} and {dp: 2, tp: 2}: int8 0.35%, fp8 0.96%,
# bf16 0.11%, int8 gathers + int8 gradient reduce-scatters 0.35%
TOLERANCE = {"int8": 0.01, "fp8": 0.03, "bf16": 0.005}
_BASE: dict[str, tg.Result] = {}


@pytest.mark.parametrize(
    "mesh, flags",
    [
        ("dp=4", ["--comm-dtype", "int8"]),
        ("dp=2,tp=2", ["--comm-dtype", "int8", "--grad-comm-dtype", "int8"]),
        pytest.param("dp=4", ["--comm-dtype", "fp8"], marks=pytest.mark.slow),
        pytest.param("dp=4", ["--comm-dtype", "bf16"], marks=pytest.mark.slow),
        pytest.param("dp=2,tp=2", ["--grad-comm-dtype", "fp8"], marks=pytest.mark.slow),
    ],
)
def test_gpt_zero3_compressed_stays_near_the_uncompressed_loss(mesh, flags):
    if mesh not in _BASE:
        _BASE[mesh] = tg.train(tg.parse_args([*TINY, "--mesh", mesh]))
    base = _BASE[mesh]
    run = tg.train(tg.parse_args([*TINY, "--mesh", mesh, *flags]))
    tol = max(TOLERANCE[f] for f in flags[1::2])
    for step, (got, want) in enumerate(zip(run.losses, base.losses), 1):
        assert abs(got - want) <= tol * want, (step, got, want)
    assert run.mean_loss(False) < 0.6 * run.mean_loss(True)  # it still learns
    wire = {"int8": "int8", "fp8": "float8_e4m3fn", "bf16": "bfloat16"}
    causes = {"--comm-dtype": ("zero.gather", "regather"), "--grad-comm-dtype": ("zero.grad",)}
    for flag, fmt in zip(flags[::2], flags[1::2]):
        recs = [r for r in run.records if r.cause in causes[flag] and "dp" in r.axes]
        assert {r.cause for r in recs} == set(causes[flag]), flag  # snn.linear re-gathers
        assert {r.dtype for r in recs} == {wire[fmt]}, flag


def test_train_gpt_comm_flags_errors():
    with pytest.raises(tg.TrainConfigError, match="--comm-dtype int8 compresses ZeRO-3"):
        tg.build(tg.parse_args(["--mesh", "dp=2", "--zero", "1", "--comm-dtype", "int8"]))
    with pytest.raises(tg.TrainConfigError, match="--grad-comm-dtype fp8"):
        tg.build(tg.parse_args(["--mesh", "tp=2", "--grad-comm-dtype", "fp8"]))
    setup = tg.build(tg.parse_args(["--mesh", "dp=2", "--zero", "3", "--comm-dtype", "bf16"]))
    assert setup.zero.comm_dtype == torch.bfloat16 and "(bf16 gathers)" in setup.describe()
