// loss_row.cuh — one row's loss, prediction and loss gradient, shared by the loss kernel
// (loss.cu) and the last spiking layer's fused backward (spiking.cu), so that both compute the
// same bits. CPU twin: src/cpu/loss.rs, whose expressions and summation orders these repeat.
//
// Math (a row b: readout y[0..K), label l, batch B):
//   MSE (kind 0): L_b = Σ_k (y_k − [k = l])² · 1/(B·K)   (summed in ascending k),
//                 ∂L/∂y_k = 2·(y_k − [k = l]) · 1/(B·K)
//   CE  (kind 1): L_b = (lse − y_l)/B, lse = m + log Σ_k exp(y_k − m), m = max_k y_k,
//                 ∂L/∂y_k = (exp(y_k − lse) − [k = l])/B
//   pred_b = argmax_k y_k, ties to the lowest k.
#pragma once

// The loss's constant factors: 1/(B·K) (MSE) and 1/B (CE), each the f32 rounding of the f64
// quotient. The fused kernel takes them from the host (the same IEEE quotients), because a
// division on the device calls a slow path whose saved registers ptxas counts as spills.
struct LossScales {
    float mse;    // (float)(1.0 / ((double)B · (double)K))
    float inv_b;  // (float)(1.0 / (double)B)
};

__device__ __forceinline__ LossScales loss_scales(int batch, int classes) {
    LossScales s;
    s.mse = (float)(1.0 / ((double)batch * (double)classes));
    s.inv_b = (float)(1.0 / (double)batch);
    return s;
}

struct LossRow {
    float total;  // L_b
    float lse;    // CE only: the row's log-sum-exp
    int pred;
};

// The row's loss and prediction; O(K) work, K is small (10).
__device__ __forceinline__ LossRow loss_row(const float* yb, int label, const LossScales& sc, int classes, int kind) {
    LossRow r;
    r.pred = 0;
    for (int k = 1; k < classes; ++k)
        if (yb[k] > yb[r.pred]) r.pred = k;
    r.total = 0.0f;
    r.lse = 0.0f;
    if (kind == 0) {
        for (int k = 0; k < classes; ++k) {
            const float e = yb[k] - (k == label ? 1.0f : 0.0f);
            r.total += e * e * sc.mse;
        }
    } else {
        float m = yb[0];
        for (int k = 0; k < classes; ++k)
            if (yb[k] > m) m = yb[k];
        float z = 0.0f;
        for (int k = 0; k < classes; ++k) z += expf(yb[k] - m);
        r.lse = m + (float)log((double)z);
        r.total = (r.lse - yb[label]) * sc.inv_b;
    }
    return r;
}

// ∂L/∂y_k of the row (`r` from loss_row on the same row).
__device__ __forceinline__ float loss_row_grad(const float* yb, const LossRow& r, int label, int k, const LossScales& sc, int kind) {
    const float onehot = k == label ? 1.0f : 0.0f;
    if (kind == 0) return 2.0f * (yb[k] - onehot) * sc.mse;
    return (expf(yb[k] - r.lse) - onehot) * sc.inv_b;
}
