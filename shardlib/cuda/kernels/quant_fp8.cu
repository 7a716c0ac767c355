// Blockwise fp8 (e4m3, torch.float8_e4m3fn) quantize / dequantize / dequantize-reduce.
// Needs sm_89 or newer: the conversions are the hardware's cvt ... e4m3x2 instructions
// (round to nearest even, saturating to +-448), written as inline PTX. The math and launch
// shapes are in quant_common.cuh.
#include "quant_common.cuh"

__device__ __forceinline__ unsigned char float_to_e4m3(float v) {
  unsigned short pair;
  // cvt packs its first source into the upper byte, its second into the lower one
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(v));
  return (unsigned char)(pair & 0xffu);
}

__device__ __forceinline__ float e4m3_to_float(unsigned char q) {
  unsigned int halves;
  unsigned short in = q;  // upper byte 0: the upper half comes out +0
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"(in));
  unsigned short low = (unsigned short)(halves & 0xffffu);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(low));  // exact: e4m3 is a subset of f16
  return f;
}

extern "C" __global__ void quantize_fp8(const float* __restrict__ x, unsigned char* __restrict__ q,
                                        float* __restrict__ scales, i64 n, int block) {
  const int lane = threadIdx.x & 31;
  const i64 nblocks = (n + block - 1) / block;
  for (i64 b = global_warp(); b < nblocks; b += grid_warps()) {
    const i64 start = b * block;
    const i64 end = min(start + (i64)block, n);
    const float scale = __fdiv_rn(block_absmax(x, start, end, lane), 448.0f);
    if (lane == 0) scales[b] = scale;
    for (i64 i = start + lane; i < end; i += 32)
      q[i] = scale != 0.0f ? float_to_e4m3(__fdiv_rn(x[i], scale)) : (unsigned char)0;
  }
}

// One warp per quantization block: the block's scale is read once, no index division.
extern "C" __global__ void dequantize_fp8(const unsigned char* __restrict__ q,
                                          const float* __restrict__ scales,
                                          float* __restrict__ y, i64 n, int block) {
  const int lane = threadIdx.x & 31;
  const i64 nblocks = (n + block - 1) / block;
  for (i64 b = global_warp(); b < nblocks; b += grid_warps()) {
    const float scale = scales[b];
    const i64 end = min((b + 1) * block, n);
    for (i64 i = b * block + lane; i < end; i += 32) y[i] = __fmul_rn(e4m3_to_float(q[i]), scale);
  }
}

// q: [k, n] row-major, scales: [k, ceil(n / block)]; one warp per quantization block.
extern "C" __global__ void dequantize_reduce_fp8(const unsigned char* __restrict__ q,
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
        acc = __fadd_rn(acc, __fmul_rn(e4m3_to_float(q[(i64)j * n + i]), scales[(i64)j * nblocks + b]));
      y[i] = acc;
    }
  }
}
