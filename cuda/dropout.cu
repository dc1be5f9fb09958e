// dropout.cu — dropout with a new mask at every time step, drawn from the counter-based RNG of
// common.cuh (the twin of crate::rng), so the masks equal the CPU engine's element for element.
// Host side: src/gpu/dropout.rs; CPU twin: src/cpu/dropout.rs.
//
// Math: keep(t, i) = uniform24(key, t, i0 + i) ≥ p, key = dropout_key(seed, iteration, layer) (host),
//       read from device memory (keys[slot], staged by the host before each step, so that one
//       captured CUDA graph serves every step); i0 = the place of the batch's first element in the
//       global batch of a data-parallel run (s·C·H·W for a shard starting at sample s; else 0);
//       y[t][i] = keep ? x[t'][i] · scale : 0,  scale = 1/(1−p) rounded to f32 on the host,
//       t' = 0 when the input has T_in = 1 (direct encoding: one frame broadcast to every step), else t.
//       Backward: dx[t][i] = keep ? dy[t][i] · scale : 0, or with T_in = 1 the sum over t in
//       ascending order (the CPU's order). The mask is not stored: backward draws it again.
// Layout: x [T_in][len], y/dy [T][len], len = B·C·H·W (i is the position inside one step's block).
// Work mapping: forward one thread per output element; backward one thread per input element
// (T_in = 1: the thread loops over t). Grid-stride loops, 64-bit indices.
#include "common.cuh"

__device__ __forceinline__ bool keep_(u64 key, u32 t, u64 i, float p) { return uniform24(key, t, i) >= p; }

extern "C" __global__ void dropout_forward_f32(const float* __restrict__ x, float* __restrict__ y, const u64* __restrict__ keys, int slot, u64 i0, float p, float scale, long long len, int steps, int t_in) {
    const u64 key = keys[slot];
    const long long total = len * steps;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total; j += (long long)gridDim.x * blockDim.x) {
        u32 t = (u32)(j / len);
        long long i = j % len;
        float xv = x[(t_in == 1 ? 0 : (long long)t * len) + i];
        y[j] = keep_(key, t, i0 + (u64)i, p) ? xv * scale : 0.0f;
    }
}

extern "C" __global__ void dropout_backward_f32(const float* __restrict__ dy, float* __restrict__ dx, const u64* __restrict__ keys, int slot, u64 i0, float p, float scale, long long len, int steps, int t_in) {
    const u64 key = keys[slot];
    if (t_in == 1) {
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len; i += (long long)gridDim.x * blockDim.x) {
            float acc = 0.0f;
            for (int t = 0; t < steps; ++t) acc += keep_(key, (u32)t, i0 + (u64)i, p) ? dy[(long long)t * len + i] * scale : 0.0f;
            dx[i] = acc;
        }
    } else {
        const long long total = len * steps;
        for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total; j += (long long)gridDim.x * blockDim.x) {
            u32 t = (u32)(j / len);
            dx[j] = keep_(key, t, i0 + (u64)(j % len), p) ? dy[j] * scale : 0.0f;
        }
    }
}

// Evaluation mode (no dropout): y[t] = x[t'], dx = dy (or Σ_t dy[t] with T_in = 1).
extern "C" __global__ void broadcast_steps_f32(const float* __restrict__ x, float* __restrict__ y, long long len, int steps) {
    const long long total = len * steps;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total; j += (long long)gridDim.x * blockDim.x) y[j] = x[j % len];
}

extern "C" __global__ void sum_steps_f32(const float* __restrict__ dy, float* __restrict__ dx, long long len, int steps) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len; i += (long long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int t = 0; t < steps; ++t) acc += dy[(long long)t * len + i];
        dx[i] = acc;
    }
}
