// smoke.cu — the smallest kernels: a device self-test for `backei info` and the RNG twin check.
//   fill_f32: y[i] = value
//   rng_uniform24: y[i] = uniform24(key, t, i)  (must equal crate::rng::uniform24 bit for bit)
#include "common.cuh"

extern "C" __global__ void fill_f32(float* y, float value, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = value;
}

extern "C" __global__ void rng_uniform24(float* y, u64 key, u32 t, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = uniform24(key, t, (u64)i);
}
