// Blockwise int8 quantize / dequantize / dequantize-reduce (any arch NVRTC supports).
// The math and launch shapes are in quant_common.cuh.
#include "quant_common.cuh"

struct Int8 {
  typedef signed char Q;
  static constexpr float QMAX = 127.0f;
  static __device__ __forceinline__ Q encode(float v) {  // round half to even, clamp
    return (Q)(int)fminf(fmaxf(rintf(v), -127.0f), 127.0f);
  }
  static __device__ __forceinline__ float decode(Q q) { return (float)q; }
};

extern "C" __global__ void quantize_int8(const float* __restrict__ x, signed char* __restrict__ q,
                                         float* __restrict__ scales, i64 n, int block) {
  quantize_blocks<Int8>(x, q, scales, n, block);
}

extern "C" __global__ void dequantize_int8(const signed char* __restrict__ q,
                                          const float* __restrict__ scales,
                                          float* __restrict__ y, i64 n, int block) {
  dequantize_blocks<Int8>(q, scales, y, n, block);
}

extern "C" __global__ void dequantize_reduce_int8(const signed char* __restrict__ q,
                                                  const float* __restrict__ scales,
                                                  float* __restrict__ y, i64 n, int block,
                                                  int k) {
  dequantize_reduce_blocks<Int8>(q, scales, y, n, block, k);
}
