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

struct E4M3 {
  typedef unsigned char Q;
  static constexpr float QMAX = 448.0f;
  static __device__ __forceinline__ Q encode(float v) { return float_to_e4m3(v); }
  static __device__ __forceinline__ float decode(Q q) { return e4m3_to_float(q); }
};

extern "C" __global__ void quantize_fp8(const float* __restrict__ x, unsigned char* __restrict__ q,
                                        float* __restrict__ scales, i64 n, int block) {
  quantize_blocks<E4M3>(x, q, scales, n, block);
}

extern "C" __global__ void dequantize_fp8(const unsigned char* __restrict__ q,
                                          const float* __restrict__ scales,
                                          float* __restrict__ y, i64 n, int block) {
  dequantize_blocks<E4M3>(q, scales, y, n, block);
}

extern "C" __global__ void dequantize_reduce_fp8(const unsigned char* __restrict__ q,
                                                 const float* __restrict__ scales,
                                                 float* __restrict__ y, i64 n, int block,
                                                 int k) {
  dequantize_reduce_blocks<E4M3>(q, scales, y, n, block, k);
}
