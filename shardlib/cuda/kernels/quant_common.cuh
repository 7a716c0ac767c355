// Shared pieces of the blockwise quantization kernels (shardlib.cuda, DESIGN §10).
//
// The contract (torch reference: shardlib/cuda/_quant.py) is bitwise: a tensor is its flat
// float32 view of n elements cut into blocks of `block` elements (the last one may be
// short); block b has
//     absmax_b = max |x_i|,  scale_b = absmax_b / QMAX   (QMAX = 127 for int8, 448 for e4m3)
//     q_i = clamp(rint(x_i / scale_b), -127, 127)         (int8)
//     q_i = e4m3_satfinite_rn(x_i / scale_b)              (fp8 e4m3)
//     q_i = 0 where scale_b == 0 or is not finite (a block holding inf or NaN: its absmax,
//     like torch's amax, is inf or NaN, and it dequantizes to NaN);
//     dequantize: y_i = float(q_i) * scale_b;
//     dequantize-reduce of k pieces: y_i = sum_{j = 0..k-1} float(q_{j,i}) * scale_{j,b},
//     accumulated in float32 from j = 0 up.
// Every division, multiplication and addition is written with the _rn intrinsics, so no
// compiler flag (fast math, FMA contraction) changes a bit. No CUDA header is included:
// NVRTC compiles these sources from the pip wheel alone. shardlib's registry splices this
// file into the sources that `#include` it, so the compile cache key covers it.
//
// Launch shape: one warp per quantization block (the block's absmax is a warp reduction,
// its scale one load), any grid (the warps stride over the blocks), a whole number of
// warps per CUDA block.

typedef long long i64;

// max that propagates NaN, as torch's amax does (fmaxf would drop it)
__device__ __forceinline__ float nan_max(float a, float b) {
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1)
    v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The absmax over x[start, end), on every lane of the warp (NaN if any element is NaN).
__device__ __forceinline__ float block_absmax(const float* __restrict__ x, i64 start, i64 end,
                                              int lane) {
  float m = 0.0f;
  for (i64 i = start + lane; i < end; i += 32) m = nan_max(m, fabsf(x[i]));
  return warp_max(m);
}

// A block is encoded only when its scale is finite and nonzero; otherwise q = 0 (a non-finite
// block then dequantizes to NaN: 0 * inf and 0 * NaN), as the reference does.
__device__ __forceinline__ bool encodable(float scale) {
  return scale != 0.0f && fabsf(scale) <= 3.402823466e38f;  // false for inf and NaN
}

// Index of this thread's warp among all the grid's warps, and their number.
__device__ __forceinline__ i64 global_warp() {
  return (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
}
__device__ __forceinline__ i64 grid_warps() { return (i64)gridDim.x * (blockDim.x >> 5); }

// The three kernels' bodies, for a format F with: F::Q (the stored type), F::QMAX, and
// F::encode (the quotient x_i / scale_b -> Q) and F::decode (Q -> float, exact).
template <class F>
__device__ __forceinline__ void quantize_blocks(const float* __restrict__ x,
                                                typename F::Q* __restrict__ q,
                                                float* __restrict__ scales, i64 n, int block) {
  const int lane = threadIdx.x & 31;
  const i64 nblocks = (n + block - 1) / block;
  for (i64 b = global_warp(); b < nblocks; b += grid_warps()) {
    const i64 start = b * block;
    const i64 end = min(start + (i64)block, n);
    const float scale = __fdiv_rn(block_absmax(x, start, end, lane), F::QMAX);
    if (lane == 0) scales[b] = scale;
    for (i64 i = start + lane; i < end; i += 32)
      q[i] = encodable(scale) ? F::encode(__fdiv_rn(x[i], scale)) : (typename F::Q)0;
  }
}

// One warp per quantization block: the block's scale is read once, no index division.
template <class F>
__device__ __forceinline__ void dequantize_blocks(const typename F::Q* __restrict__ q,
                                                  const float* __restrict__ scales,
                                                  float* __restrict__ y, i64 n, int block) {
  const int lane = threadIdx.x & 31;
  const i64 nblocks = (n + block - 1) / block;
  for (i64 b = global_warp(); b < nblocks; b += grid_warps()) {
    const float scale = scales[b];
    const i64 end = min((b + 1) * block, n);
    for (i64 i = b * block + lane; i < end; i += 32) y[i] = __fmul_rn(F::decode(q[i]), scale);
  }
}

// q: [k, n] row-major, scales: [k, ceil(n / block)]; one warp per quantization block.
template <class F>
__device__ __forceinline__ void dequantize_reduce_blocks(const typename F::Q* __restrict__ q,
                                                         const float* __restrict__ scales,
                                                         float* __restrict__ y, i64 n, int block,
                                                         int k) {
  const int lane = threadIdx.x & 31;
  const i64 nblocks = (n + block - 1) / block;
  for (i64 b = global_warp(); b < nblocks; b += grid_warps()) {
    const i64 end = min((b + 1) * block, n);
    for (i64 i = b * block + lane; i < end; i += 32) {
      float acc = 0.0f;
      for (int j = 0; j < k; ++j)
        acc = __fadd_rn(acc, __fmul_rn(F::decode(q[(i64)j * n + i]), scales[(i64)j * nblocks + b]));
      y[i] = acc;
    }
  }
}
