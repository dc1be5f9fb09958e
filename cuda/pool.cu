// pool.cu — 2×2 average pooling, stride 2, floor on odd sizes (PyTorch's AvgPool2d(2)).
// Host side: src/gpu/pool.rs; CPU twin: src/cpu/pool.rs.
//
// Math:  y[m][oy][ox] = (x[m][2oy][2ox] + x[m][2oy][2ox+1] + x[m][2oy+1][2ox] + x[m][2oy+1][2ox+1]) · 0.25
//        dx[m][iy][ix] = dy[m][iy/2][ix/2] · 0.25 if iy < 2·ho and ix < 2·wo, else 0 (rows/columns
//        dropped by the floor get no gradient).
// Layout: x [m][h][w], y [m][ho][wo], m = samples·channels (every plane is independent); x in f32,
// or int8 spikes (avgpool2_forward_s8); y in f32, or as int8 codes c, y = c · 0.25 (_s8_q8).
// Work mapping: one thread per output element (forward) / per input element (backward, a gather:
// no atomics, every element written exactly once); grid-stride loops whose coordinates advance
// without division (grid_digits.cuh).
#include "grid_digits.cuh"

// Y = float: the average; Y = signed char (int8 spikes in, Q8 out): the code c = the sum of the
// four spikes, whose value c · 0.25 is the f32 kernel's exactly (gemm_tc.cu's Q8 operands).
template <class T, class Y>
__device__ __forceinline__ void avgpool2_forward(const T* __restrict__ x, Y* __restrict__ y, long long planes, int h, int w) {
    const int ho = h / 2, wo = w / 2;
    const long long total = planes * ho * wo;
    GRID_STRIDE_START(total);
    GridDigits<3> g(start, stride, {wo, ho});  // (ox, oy, plane)
    for (long long i = start; i < total; i += stride, g.advance()) {
        const int ox = (int)g.d[0], oy = (int)g.d[1];
        const T* r0 = x + (g.d[2] * h + 2 * oy) * w;
        const T* r1 = r0 + w;
        if (sizeof(Y) == 1) {
            y[i] = (Y)((int)r0[2 * ox] + (int)r0[2 * ox + 1] + (int)r1[2 * ox] + (int)r1[2 * ox + 1]);
        } else {
            y[i] = ((float)r0[2 * ox] + (float)r0[2 * ox + 1] + (float)r1[2 * ox] + (float)r1[2 * ox + 1]) * 0.25f;
        }
    }
}

extern "C" __global__ void avgpool2_forward_f32(const float* __restrict__ x, float* __restrict__ y, long long planes, int h, int w) {
    avgpool2_forward(x, y, planes, h, w);
}

// The input as int8 spikes (a BackEI layer's compact output: backei_v4.cu with V4_S8): the same
// values (s ∈ {−1, 0, 1} is exact in both), summed in the same order, so the bits of the f32 kernel.
extern "C" __global__ void avgpool2_forward_s8(const signed char* __restrict__ x, float* __restrict__ y, long long planes, int h, int w) {
    avgpool2_forward(x, y, planes, h, w);
}

// int8 spikes in, the pooled spikes as int8 codes out (src/gpu/memory.rs pooled_as_codes: where
// only the tensor-core GEMMs read them): a quarter of the f32 output's bytes.
extern "C" __global__ void avgpool2_forward_s8_q8(const signed char* __restrict__ x, signed char* __restrict__ y, long long planes, int h, int w) {
    avgpool2_forward(x, y, planes, h, w);
}

extern "C" __global__ void avgpool2_backward_f32(const float* __restrict__ dy, float* __restrict__ dx, long long planes, int h, int w) {
    const int ho = h / 2, wo = w / 2;
    const long long total = planes * h * w;
    GRID_STRIDE_START(total);
    GridDigits<3> g(start, stride, {w, h});  // (ix, iy, plane)
    for (long long i = start; i < total; i += stride, g.advance()) {
        const int oy = (int)g.d[1] >> 1, ox = (int)g.d[0] >> 1;
        dx[i] = (oy < ho && ox < wo) ? dy[(g.d[2] * ho + oy) * wo + ox] * 0.25f : 0.0f;
    }
}
