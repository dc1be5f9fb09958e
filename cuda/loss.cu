// loss.cu — readout, losses and their gradients, predictions (host side: src/gpu/loss.rs; CPU
// twin: src/cpu/loss.rs, whose expressions and summation orders are repeated here).
//
// Math:  readout    y[b][k] = (Σ_{t=0..T−1} s[t][b][k]) · (1/T)   (sum in ascending t, as the CPU)
//        readout_backward ds[t][b][k] = dy[b][k] · (1/T) for every t
//        MSE (kind 0): L = Σ_{b,k} (y − onehot)² · 1/(B·K),  dy = 2·(y − onehot) · 1/(B·K)
//        CE  (kind 1): L = Σ_b (lse_b − y[b][label]) / B, lse = m + log Σ_k exp(y − m), m = max_k y,
//                      dy = (exp(y − lse) − onehot) / B
//        pred[b] = argmax_k y[b][k], ties to the lowest k.
// The per-row loss is written to row_loss[b]; the host sums the B rows (in f64).
// Layout: s [T][B][K], y/dy [B][K], labels int [B].
// Work mapping: readout one thread per (b, k); the loss one thread per row b (K is small: 10).
// The row's expressions live in loss_row.cuh, shared with the last spiking layer's fused backward
// (spiking.cu), which computes the same bits; these kernels serve the paths without that fusion.
#include "grid_digits.cuh"
#include "loss_row.cuh"

extern "C" __global__ void readout_f32(const float* __restrict__ s, float* __restrict__ y, int steps, int bk) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= bk) return;
    float acc = 0.0f;
    for (int t = 0; t < steps; ++t) acc += s[(long long)t * bk + i];
    y[i] = acc * (1.0f / (float)steps);
}

extern "C" __global__ void readout_backward_f32(const float* __restrict__ dy, float* __restrict__ ds, int steps, int bk) {
    const long long total = (long long)steps * bk;
    const float inv = 1.0f / (float)steps;
    GRID_STRIDE_START(total);
    GridDigits<2> g(start, stride, {bk});  // (row element, t)
    for (long long j = start; j < total; j += stride, g.advance()) ds[j] = dy[g.d[0]] * inv;
}

extern "C" __global__ void loss_grad_f32(const float* __restrict__ y, const int* __restrict__ labels, float* __restrict__ dy, float* __restrict__ row_loss, int* __restrict__ pred, int batch, int classes, int kind) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= batch) return;
    const float* yb = y + (long long)b * classes;
    const int label = labels[b];
    const LossScales sc = loss_scales(batch, classes);
    const LossRow r = loss_row(yb, label, sc, classes, kind);
    pred[b] = r.pred;
    for (int k = 0; k < classes; ++k) dy[(long long)b * classes + k] = loss_row_grad(yb, r, label, k, sc, kind);
    row_loss[b] = r.total;
}
