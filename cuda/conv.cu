// conv.cu — the data movement around the cuBLAS GEMMs of a stride-1, zero-padded Conv2d
// (host side: src/gpu/conv.rs; CPU twin: src/cpu/conv.rs).
//
// Math. For a chunk of n samples with P = ho·wo output pixels and KK = cin·k·k:
//   col[r][s·P + p]  = x[s][ci][oy + ky − pad][ox + kx − pad]   (0 outside),  r = (ci·k + ky)·k + kx
//   yT  = W · col                      (cuBLAS, [cout][n·P])
//   y[s][co][p]      = yT[co][s·P + p] + b[co]                  (conv_out_f32)
//   dyT[co][s·P + p] = dy[s][co][p]                             (conv_dy_t_f32)
//   dW += dyT · colᵀ, colgrad = Wᵀ · dyT                         (cuBLAS)
//   dx[s][ci][iy][ix] (+)= Σ_{ky,kx} colgrad[r][s·P + (iy+pad−ky)·wo + (ix+pad−kx)]  (col2im_f32, a gather:
//                      every dx element is written by exactly one thread, no atomics)
//   db[co] += Σ_s Σ_p dy[s][co][p]                               (bias_grad_f32, also the linear layer's:
//                      P = 1, cout = out_features)
//   y[i] = bias[(i / P) % cout]                                  (bias_fill_f32, the linear layer's prefill)
// Layout: every tensor row-major as written above; x [n][cin][h][w], y/dy [n][cout][ho][wo].
// Work mapping: one thread per output element (grid-stride loops, 64-bit indices, coordinates
// advanced without division: grid_digits.cuh); bias_grad_f32 is one block per output channel, a
// fixed-order tree reduction in shared memory (deterministic).
#include "common.cuh"
#include "grid_digits.cuh"

extern "C" __global__ void im2col_f32(const float* __restrict__ x, float* __restrict__ col, int n, int cin, int h, int w, int k, int pad, int ho, int wo) {
    const long long P = (long long)ho * wo;
    const long long total = (long long)cin * k * k * n * P;
    GRID_STRIDE_START(total);
    GridDigits<6> g(start, stride, {wo, ho, n, k, k});  // (ox, oy, s, kx, ky, ci)
    for (long long i = start; i < total; i += stride, g.advance()) {
        const int ox = (int)g.d[0], oy = (int)g.d[1], s = (int)g.d[2], kx = (int)g.d[3], ky = (int)g.d[4], ci = (int)g.d[5];
        int iy = oy + ky - pad, ix = ox + kx - pad;
        float v = 0.0f;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = x[(((long long)s * cin + ci) * h + iy) * w + ix];
        col[i] = v;
    }
}

extern "C" __global__ void col2im_f32(const float* __restrict__ col, float* __restrict__ dx, int n, int cin, int h, int w, int k, int pad, int ho, int wo, int accumulate) {
    const long long P = (long long)ho * wo;
    const long long total = (long long)n * cin * h * w;
    GRID_STRIDE_START(total);
    GridDigits<4> g(start, stride, {w, h, cin});  // (ix, iy, ci, s)
    for (long long i = start; i < total; i += stride, g.advance()) {
        const int ix = (int)g.d[0], iy = (int)g.d[1], ci = (int)g.d[2];
        const long long s = g.d[3];
        float acc = 0.0f;
        for (int ky = 0; ky < k; ++ky) {
            int oy = iy + pad - ky;
            if (oy < 0 || oy >= ho) continue;
            for (int kx = 0; kx < k; ++kx) {
                int ox = ix + pad - kx;
                if (ox < 0 || ox >= wo) continue;
                long long r = ((long long)ci * k + ky) * k + kx;
                acc += col[r * (n * P) + s * P + (long long)oy * wo + ox];
            }
        }
        dx[i] = accumulate ? dx[i] + acc : acc;
    }
}

extern "C" __global__ void conv_out_f32(const float* __restrict__ yt, const float* __restrict__ bias, float* __restrict__ y, int n, int cout, int P) {
    const long long total = (long long)n * cout * P;
    GRID_STRIDE_START(total);
    GridDigits<3> g(start, stride, {P, cout});  // (p, co, s)
    for (long long i = start; i < total; i += stride, g.advance()) {
        const long long p = g.d[0], co = g.d[1], s = g.d[2];
        y[i] = yt[co * n * P + s * P + p] + bias[co];
    }
}

extern "C" __global__ void conv_dy_t_f32(const float* __restrict__ dy, float* __restrict__ dyt, int n, int cout, int P) {
    const long long total = (long long)n * cout * P;
    GRID_STRIDE_START(total);
    GridDigits<3> g(start, stride, {P, cout});  // (p, co, s)
    for (long long i = start; i < total; i += stride, g.advance()) {
        const long long p = g.d[0], co = g.d[1], s = g.d[2];
        dyt[co * n * P + s * P + p] = dy[i];
    }
}

extern "C" __global__ void bias_fill_f32(float* __restrict__ y, const float* __restrict__ bias, long long total, int cout, int P) {
    GRID_STRIDE_START(total);
    GridDigits<3> g(start, stride, {P, cout});  // (p, co, the rest)
    for (long long i = start; i < total; i += stride, g.advance()) y[i] = bias[g.d[1]];
}

// blockDim.x must be 256.
extern "C" __global__ void bias_grad_f32(const float* __restrict__ dy, float* __restrict__ db, int n, int cout, int P) {
    __shared__ float part[256];
    const int co = blockIdx.x;
    const long long count = (long long)n * P;
    float acc = 0.0f;
    if (threadIdx.x < count) {
        GridDigits<2> g(threadIdx.x, blockDim.x, {P});  // (p, s)
        for (long long j = threadIdx.x; j < count; j += blockDim.x, g.advance()) acc += dy[(g.d[1] * cout + co) * P + g.d[0]];
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) db[co] += part[0];
}
