// Blockwise int8 quantize / dequantize / dequantize-reduce (any arch NVRTC supports).
// The math and launch shapes are in quant_common.cuh.
#include "quant_common.cuh"

extern "C" __global__ void quantize_int8(const float* __restrict__ x, signed char* __restrict__ q,
                                         float* __restrict__ scales, i64 n, int block) {
  const int lane = threadIdx.x & 31;
  const i64 nblocks = (n + block - 1) / block;
  for (i64 b = global_warp(); b < nblocks; b += grid_warps()) {
    const i64 start = b * block;
    const i64 end = min(start + (i64)block, n);
    const float scale = __fdiv_rn(block_absmax(x, start, end, lane), 127.0f);
    if (lane == 0) scales[b] = scale;
    for (i64 i = start + lane; i < end; i += 32) {
      signed char v = 0;
      if (scale != 0.0f) {
        const float r = rintf(__fdiv_rn(x[i], scale));  // round half to even
        v = (signed char)(int)fminf(fmaxf(r, -127.0f), 127.0f);
      }
      q[i] = v;
    }
  }
}

// One warp per quantization block: the block's scale is read once, no index division.
extern "C" __global__ void dequantize_int8(const signed char* __restrict__ q,
                                          const float* __restrict__ scales,
                                          float* __restrict__ y, i64 n, int block) {
  const int lane = threadIdx.x & 31;
  const i64 nblocks = (n + block - 1) / block;
  for (i64 b = global_warp(); b < nblocks; b += grid_warps()) {
    const float scale = scales[b];
    const i64 end = min((b + 1) * block, n);
    for (i64 i = b * block + lane; i < end; i += 32) y[i] = __fmul_rn((float)q[i], scale);
  }
}

// q: [k, n] row-major, scales: [k, ceil(n / block)]; one warp per quantization block.
extern "C" __global__ void dequantize_reduce_int8(const signed char* __restrict__ q,
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
        acc = __fadd_rn(acc, __fmul_rn((float)q[(i64)j * n + i], scales[(i64)j * nblocks + b]));
      y[i] = acc;
    }
  }
}
