// smoke.cu — the smallest kernels: a device self-test for `backei info` and the RNG twin check.
//   fill_f32: y[i] = value
//   rng_uniform24: y[i] = uniform24(key, t, i)  (must equal crate::rng::uniform24 bit for bit)
//   fma_loop_f32: the FP32 FMA-rate ceiling of the kernel benchmark
#include "common.cuh"

extern "C" __global__ void fill_f32(float* y, float value, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = value;
}

extern "C" __global__ void rng_uniform24(float* y, u64 key, u32 t, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = uniform24(key, t, (u64)i);
}

// fma_loop_f32: the FP32 FMA ceiling for benches/kernels.rs — 8 independent chains per thread,
// `iters` rounds of 8 FMAs each (2 flops each); the result is written so nothing is optimised away.
extern "C" __global__ void fma_loop_f32(float* y, int iters, float a, float b) {
    float x0 = threadIdx.x, x1 = x0 + 1.0f, x2 = x0 + 2.0f, x3 = x0 + 3.0f;
    float x4 = x0 + 4.0f, x5 = x0 + 5.0f, x6 = x0 + 6.0f, x7 = x0 + 7.0f;
    for (int i = 0; i < iters; ++i) {
        x0 = fmaf(x0, a, b); x1 = fmaf(x1, a, b); x2 = fmaf(x2, a, b); x3 = fmaf(x3, a, b);
        x4 = fmaf(x4, a, b); x5 = fmaf(x5, a, b); x6 = fmaf(x6, a, b); x7 = fmaf(x7, a, b);
    }
    y[blockIdx.x * blockDim.x + threadIdx.x] = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
}
