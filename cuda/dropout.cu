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
// (T_in = 1: the thread loops over t). Grid-stride loops, 64-bit indices, their coordinates
// advanced without division (grid_digits.cuh).
#include "common.cuh"
#include "grid_digits.cuh"

__device__ __forceinline__ bool keep_(u64 key, u32 t, u64 i, float p) { return uniform24(key, t, i) >= p; }

extern "C" __global__ void dropout_forward_f32(const float* __restrict__ x, float* __restrict__ y, const u64* __restrict__ keys, int slot, u64 i0, float p, float scale, long long len, int steps, int t_in) {
    const u64 key = keys[slot];
    const long long total = len * steps;
    GRID_STRIDE_START(total);
    GridDigits<2> g(start, stride, {len});  // (i, t)
    for (long long j = start; j < total; j += stride, g.advance()) {
        const u32 t = (u32)g.d[1];
        const long long i = g.d[0];
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
        GRID_STRIDE_START(total);
        GridDigits<2> g(start, stride, {len});  // (i, t)
        for (long long j = start; j < total; j += stride, g.advance())
            dx[j] = keep_(key, (u32)g.d[1], i0 + (u64)g.d[0], p) ? dy[j] * scale : 0.0f;
    }
}

// Evaluation mode (no dropout): y[t] = x[t'], dx = dy (or Σ_t dy[t] with T_in = 1).
extern "C" __global__ void broadcast_steps_f32(const float* __restrict__ x, float* __restrict__ y, long long len, int steps) {
    const long long total = len * steps;
    GRID_STRIDE_START(total);
    GridDigits<2> g(start, stride, {len});  // (i, t)
    for (long long j = start; j < total; j += stride, g.advance()) y[j] = x[g.d[0]];
}

extern "C" __global__ void sum_steps_f32(const float* __restrict__ dy, float* __restrict__ dx, long long len, int steps) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len; i += (long long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int t = 0; t < steps; ++t) acc += dy[(long long)t * len + i];
        dx[i] = acc;
    }
}

// Dropout then 2×2 average pooling in one pass (the GPU engine fuses a dropout layer into the
// pooling layer after it; CPU twins: src/cpu/dropout.rs then src/cpu/pool.rs, whose rounding this
// repeats: each kept element x·scale rounded on its own, then pool.cu's sum and · 0.25):
//   y[t][m][oy][ox] = (d(2oy, 2ox) + d(2oy, 2ox+1) + d(2oy+1, 2ox) + d(2oy+1, 2ox+1)) · 0.25,
//   d(iy, ix) = keep(t, i) ? x[t][m][iy][ix] · scale : 0, i = (m·h + iy)·w + ix inside step t's block;
//   backward dx[t][m][iy][ix] = keep(t, i) ? (dy[t][m][iy/2][ix/2] · 0.25) · scale : 0 (0 on the
//   rows/columns the floor dropped). `apply` = 0 (evaluation): no mask, plain pooling. As above,
//   the mask of element i is that of index0 + i (a data-parallel shard's place in the batch).
// Layout: x [T][B·C][h][w] (planes_per_step = B·C; f32, or int8 spikes: _s8), y [T][B·C][h/2][w/2];
// T_in = T only.
// The dropout's output and the pooling's input gradient are never stored.
// mul_rn: a product rounded on its own, never fused into an add (the CPU's order of rounding).
#ifdef BACKEI_EMU
inline float mul_rn(float a, float b) { return a * b; }
#else
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
#endif

// Y = float: the pooled value; Y = signed char (int8 spikes in, Q8 out): the code c = the sum of the
// kept spikes, whose value c · (scale · 0.25) (c · 0.25 when !apply) is the f32 kernel's exactly
// where scale is a power of two (each kept x·scale and every partial sum exact): gemm_tc.cu's Q8
// operands; src/gpu/memory.rs pooled_as_codes asks for it only then.
template <class T, class Y>
__device__ __forceinline__ void dropout_avgpool2_forward(const T* __restrict__ x, Y* __restrict__ y, const u64* __restrict__ keys, int slot, u64 index0, int apply, float p, float scale, long long planes_per_step, int steps, int h, int w) {
    const int ho = h / 2, wo = w / 2;
    const u64 key = apply ? keys[slot] : 0;  // (evaluation passes no table)
    const long long per_step = planes_per_step * ho * wo, total = per_step * steps;
    GRID_STRIDE_START(total);
    GridDigits<4> g(start, stride, {wo, ho, planes_per_step});  // (ox, oy, plane, t)
    for (long long j = start; j < total; j += stride, g.advance()) {
        const u32 t = (u32)g.d[3];
        const int ox = (int)g.d[0], oy = (int)g.d[1];
        const long long m = g.d[2];
        const long long i0 = (m * h + 2 * oy) * w + 2 * ox;  // inside the step's block
        const T* xs = x + (long long)t * planes_per_step * h * w;
        const long long at[4] = {i0, i0 + 1, i0 + w, i0 + w + 1};
        if (sizeof(Y) == 1) {
            int c = 0;
            for (int q = 0; q < 4; ++q) {
                const int xq = (int)xs[at[q]];
                c += (!apply || keep_(key, t, index0 + (u64)at[q], p)) ? xq : 0;
            }
            y[j] = (Y)c;
        } else {
            float d[4];
            for (int q = 0; q < 4; ++q) {
                const float xq = (float)xs[at[q]];
                d[q] = !apply ? xq : (keep_(key, t, index0 + (u64)at[q], p) ? mul_rn(xq, scale) : 0.0f);
            }
            y[j] = (d[0] + d[1] + d[2] + d[3]) * 0.25f;
        }
    }
}

extern "C" __global__ void dropout_avgpool2_forward_f32(const float* __restrict__ x, float* __restrict__ y, const u64* __restrict__ keys, int slot, u64 index0, int apply, float p, float scale, long long planes_per_step, int steps, int h, int w) {
    dropout_avgpool2_forward(x, y, keys, slot, index0, apply, p, scale, planes_per_step, steps, h, w);
}

// The input as int8 spikes (a BackEI layer's compact output: backei_v4.cu with V4_S8): the same
// values, so the bits of the f32 kernel.
extern "C" __global__ void dropout_avgpool2_forward_s8(const signed char* __restrict__ x, float* __restrict__ y, const u64* __restrict__ keys, int slot, u64 index0, int apply, float p, float scale, long long planes_per_step, int steps, int h, int w) {
    dropout_avgpool2_forward(x, y, keys, slot, index0, apply, p, scale, planes_per_step, steps, h, w);
}

// int8 spikes in, the pooled spikes as int8 codes out (see the template above).
extern "C" __global__ void dropout_avgpool2_forward_s8_q8(const signed char* __restrict__ x, signed char* __restrict__ y, const u64* __restrict__ keys, int slot, u64 index0, int apply, float p, float scale, long long planes_per_step, int steps, int h, int w) {
    dropout_avgpool2_forward(x, y, keys, slot, index0, apply, p, scale, planes_per_step, steps, h, w);
}

extern "C" __global__ void dropout_avgpool2_backward_f32(const float* __restrict__ dy, float* __restrict__ dx, const u64* __restrict__ keys, int slot, u64 index0, int apply, float p, float scale, long long planes_per_step, int steps, int h, int w) {
    const int ho = h / 2, wo = w / 2;
    const u64 key = apply ? keys[slot] : 0;
    const long long per_step = planes_per_step * h * w, total = per_step * steps;
    GRID_STRIDE_START(total);
    GridDigits<4> g(start, stride, {w, h, planes_per_step});  // (ix, iy, plane, t)
    for (long long j = start; j < total; j += stride, g.advance()) {
        const u32 t = (u32)g.d[3];
        const long long m = g.d[2];
        const long long i = (m * h + g.d[1]) * w + g.d[0];  // inside the step's block
        const int oy = (int)g.d[1] >> 1, ox = (int)g.d[0] >> 1;
        float g = 0.0f;
        if (oy < ho && ox < wo) {
            g = mul_rn(dy[((long long)t * planes_per_step + m) * ho * wo + (long long)oy * wo + ox], 0.25f);
            if (apply) g = keep_(key, t, index0 + (u64)i, p) ? mul_rn(g, scale) : 0.0f;
        }
        dx[j] = g;
    }
}
