// Fused AdamW over flat float32 buffers: one pass reads param, grad and both moments and
// writes param, both moments and (optionally) a bfloat16 copy of the new param.
// torch reference: shardlib/cuda/_adamw.py `adamw_flat_reference`, which runs the same
// float32 operations in the same order (so the two agree bit for bit):
//     g  = grad * clip
//     p  = p * decay                               decay = 1 - lr * weight_decay
//     m  = b1 * m + (1 - b1) * g
//     v  = b2 * v + (1 - b2) * (g * g)
//     p  = p - (step_size * m) / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed by the caller in
// float64 and rounded once to float32 -- torch.optim.AdamW's arithmetic. Every operation is
// an _rn intrinsic (no FMA contraction). Needs sm_80+ (the bf16 conversion instruction).
// Launch shape: one thread per element, any grid (threads stride over the buffer).

typedef long long i64;

extern "C" __global__ void adamw_flat(float* __restrict__ param, const float* __restrict__ grad,
                                      float* __restrict__ exp_avg,
                                      float* __restrict__ exp_avg_sq,
                                      unsigned short* __restrict__ param_bf16, i64 n,
                                      float clip, float decay, float b1, float one_minus_b1,
                                      float b2, float one_minus_b2, float step_size,
                                      float bc2_sqrt, float eps) {
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = __fmul_rn(grad[i], clip);
    const float p = __fmul_rn(param[i], decay);
    const float m = __fadd_rn(__fmul_rn(b1, exp_avg[i]), __fmul_rn(one_minus_b1, g));
    const float v =
        __fadd_rn(__fmul_rn(b2, exp_avg_sq[i]), __fmul_rn(one_minus_b2, __fmul_rn(g, g)));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
    const float out = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, m), denom));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = out;
    if (param_bf16 != 0) {
      unsigned short h;
      asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(out));
      param_bf16[i] = h;
    }
  }
}
