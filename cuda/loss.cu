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

extern "C" __global__ void readout_f32(const float* __restrict__ s, float* __restrict__ y, int steps, int bk) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= bk) return;
    float acc = 0.0f;
    for (int t = 0; t < steps; ++t) acc += s[(long long)t * bk + i];
    y[i] = acc * (1.0f / (float)steps);
}

extern "C" __global__ void readout_backward_f32(const float* __restrict__ dy, float* __restrict__ ds, int steps, int bk) {
    long long total = (long long)steps * bk;
    float inv = 1.0f / (float)steps;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total; j += (long long)gridDim.x * blockDim.x) ds[j] = dy[j % bk] * inv;
}

extern "C" __global__ void loss_grad_f32(const float* __restrict__ y, const int* __restrict__ labels, float* __restrict__ dy, float* __restrict__ row_loss, int* __restrict__ pred, int batch, int classes, int kind) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= batch) return;
    const float* yb = y + (long long)b * classes;
    float* db = dy + (long long)b * classes;
    int label = labels[b];
    int best = 0;
    for (int k = 1; k < classes; ++k)
        if (yb[k] > yb[best]) best = k;
    pred[b] = best;
    float total = 0.0f;
    if (kind == 0) {
        float scale = (float)(1.0 / ((double)batch * (double)classes));
        for (int k = 0; k < classes; ++k) {
            float e = yb[k] - (k == label ? 1.0f : 0.0f);
            total += e * e * scale;
            db[k] = 2.0f * e * scale;
        }
    } else {
        float inv_b = (float)(1.0 / (double)batch);
        float m = yb[0];
        for (int k = 0; k < classes; ++k)
            if (yb[k] > m) m = yb[k];
        float z = 0.0f;
        for (int k = 0; k < classes; ++k) z += expf(yb[k] - m);
        float lse = m + (float)log((double)z);
        total = (lse - yb[label]) * inv_b;
        for (int k = 0; k < classes; ++k) {
            float p = expf(yb[k] - lse);
            db[k] = (p - (k == label ? 1.0f : 0.0f)) * inv_b;
        }
    }
    row_loss[b] = total;
}
