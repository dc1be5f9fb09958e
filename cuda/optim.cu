// optim.cu — fused optimizers over ONE flat parameter buffer: one launch updates every parameter
// of the network (host side: src/gpu/optim.rs; CPU twin: src/optim.rs, whose f64 per-element
// expressions are repeated here, so both engines round the same way).
//
// Adam (torch.optim.Adam), step t, bias corrections from the host:
//   g = grad + wd·p;  m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²      (f64, stored as f32)
//   p = p − step_size · m / (sqrt(v)/bc2_sqrt + eps),  step_size = lr/(1−β1^t), bc2_sqrt = sqrt(1−β2^t)
// SGD with momentum (dampening 0, not Nesterov):
//   g = grad + wd·p;  buf = first ? g : μ·buf + g (μ ≠ 0; buf stored as f32);  p = p − lr·buf
// count_nonfinite_f32: *count += number of NaN/Inf in x (the host's gradient check).
// Layout: p, grad, m, v flat [n] f32. Work mapping: one thread per element, grid-stride loop.

extern "C" __global__ void adam_f32(float* __restrict__ p, const float* __restrict__ grad, float* __restrict__ m, float* __restrict__ v, long long n, double beta1, double beta2, double eps, double weight_decay, double step_size, double bc2_sqrt) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        double pv = (double)p[i];
        double g = (double)grad[i] + weight_decay * pv;
        double mi = beta1 * (double)m[i] + (1.0 - beta1) * g;
        double vi = beta2 * (double)v[i] + (1.0 - beta2) * g * g;
        m[i] = (float)mi;
        v[i] = (float)vi;
        double denom = sqrt(vi) / bc2_sqrt + eps;
        p[i] = (float)(pv - step_size * mi / denom);
    }
}

extern "C" __global__ void sgd_f32(float* __restrict__ p, const float* __restrict__ grad, float* __restrict__ buf, long long n, double lr, double momentum, double weight_decay, int first) {
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
