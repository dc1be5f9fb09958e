// optim.cu — fused optimizers over ONE flat parameter buffer: one launch updates every parameter
// of the network (host side: src/gpu/optim.rs; CPU twin: src/optim.rs, whose f64 per-element
// expressions are repeated here, so both engines round the same way).
//
// Adam (torch.optim.Adam), step t, bias corrections from the host:
//   g = grad + wd·p;  m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²      (f64, stored as f32)
//   p = p·decay − step_size · m / (sqrt(v)/bc2_sqrt + eps),  step_size = lr/(1−β1^t), bc2_sqrt = sqrt(1−β2^t)
// AdamW (torch.optim.AdamW) is the same with wd = 0 in g and decay = 1 − lr·weight_decay (the
// decoupled weight decay); for Adam decay = 1, and p·1 changes no bit.
// SGD with momentum (dampening 0, not Nesterov):
//   g = grad + wd·p;  buf = first ? g : μ·buf + g (μ ≠ 0; buf stored as f32);  p = p − lr·buf
// The per-step scalars come from device memory (`scalars`: Adam [step_size, bc2_sqrt, decay], SGD
// [lr, first, unused]), written by the host before each step, so that one captured CUDA graph serves
// every step. `status` holds the step's non-finite counts (count_nonfinite_f32 below): when any
// of its `nstatus` words is non-zero the update is skipped, so a step whose loss or gradients
// are NaN/Inf never reaches the parameters, although the host learns of it only afterwards.
// count_nonfinite_f32: *count += number of NaN/Inf in x.
// Layout: p, grad, m, v flat [n] f32. Work mapping: one thread per element, grid-stride loop.

__device__ __forceinline__ bool step_is_bad(const unsigned* __restrict__ status, int nstatus) {
    unsigned any = 0;
    for (int i = 0; i < nstatus; ++i) any |= status[i];
    return any != 0;
}

extern "C" __global__ void adam_f32(float* __restrict__ p, const float* __restrict__ grad, float* __restrict__ m, float* __restrict__ v, long long n, double beta1, double beta2, double eps, double weight_decay, const double* __restrict__ scalars, const unsigned* __restrict__ status, int nstatus) {
    if (step_is_bad(status, nstatus)) return;
    const double step_size = scalars[0], bc2_sqrt = scalars[1], decay = scalars[2];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        double pv = (double)p[i];
        double g = (double)grad[i] + weight_decay * pv;
        double mi = beta1 * (double)m[i] + (1.0 - beta1) * g;
        double vi = beta2 * (double)v[i] + (1.0 - beta2) * g * g;
        m[i] = (float)mi;
        v[i] = (float)vi;
        double denom = sqrt(vi) / bc2_sqrt + eps;
        p[i] = (float)(pv * decay - step_size * mi / denom);
    }
}

extern "C" __global__ void sgd_f32(float* __restrict__ p, const float* __restrict__ grad, float* __restrict__ buf, long long n, double momentum, double weight_decay, const double* __restrict__ scalars, const unsigned* __restrict__ status, int nstatus) {
    if (step_is_bad(status, nstatus)) return;
    const double lr = scalars[0];
    const bool first = scalars[1] != 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        double pv = (double)p[i];
        double g = (double)grad[i] + weight_decay * pv;
        double d = g;
        if (momentum != 0.0) {
            d = first ? g : momentum * (double)buf[i] + g;
            buf[i] = (float)d;
        }
        p[i] = (float)(pv - lr * d);
    }
}

extern "C" __global__ void count_nonfinite_f32(const float* __restrict__ x, long long n, unsigned int* __restrict__ count) {
    unsigned int local = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        if (!isfinite(x[i])) ++local;
    if (local) atomicAdd(count, local);
}
