// spiking.cu — the plain spiking layer (a BackEI layer with back and ei off), fused over all T
// steps, and the spike statistics reduction shared with the BackEI layer.
// CPU twin: src/cpu/backei_layer.rs with FeedbackConfig { back: false, ei: false }.
//
// Forward, per neuron, t = 0..T−1, u_{−1} = 0:
//   v_t = λ·u_{t−1} + I_t,  o_t = H(v_t − θ),  u_t = v_t·(1 − o_t),  s_t = o_t
// Backward (BPTT), t = T−1..0, dv_T = 0:
//   du = λ·dv_{t+1},  do = ds_t − du·v_t,  dv_t = du·(1 − o_t) + do·H′(v_t − θ),  dI_t = dv_t
//   (with T_in = 1 the single dI is Σ_t dv_t, summed from t = T−1 down, as the CPU does).
// Saved by forward: v_t only (o_t is recomputed from it); s_t is the layer's f32 output that the
// next layer consumes.
//
// Layout: time-major, n = B·C·H·W neurons per step: x[t·n + i]; the input has T_in ∈ {1, T}.
// Work mapping: one thread per neuron (grid-stride), the time loop inside the thread; every
// access is coalesced (consecutive threads, consecutive neurons), so the kernels run at memory
// bandwidth: forward reads I (T_in·n) and writes s and v (2·T·n floats), backward reads ds and v
// and writes dI.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
spiking_forward_v1_f32(const float* __restrict__ input, float* __restrict__ out, float* __restrict__ v,
                       long long n, int steps, int t_in, NeuronParams np) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float u = 0.0f;
        for (int t = 0; t < steps; ++t) {
            const float cur = input[(t_in == 1 ? 0 : (long long)t * n) + i];
            const float vt = np.leak * u + cur;
            const float o = fire(np, vt - np.threshold);
            u = vt * (1.0f - o);
            out[(long long)t * n + i] = o;
            v[(long long)t * n + i] = vt;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
spiking_backward_v1_f32(const float* __restrict__ grad_out, const float* __restrict__ v, float* __restrict__ grad_in,
                        long long n, int steps, int t_in, NeuronParams np) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float dv_next = 0.0f;  // dv_{t+1}
        float acc = 0.0f;      // Σ_t dI_t when T_in = 1
        for (int t = steps - 1; t >= 0; --t) {
            const long long at = (long long)t * n + i;
            const float vt = v[at];
            const float x = vt - np.threshold;
            const float o = fire(np, x);
            const float du = np.leak * dv_next;
            float d_o = grad_out[at];
            d_o -= du * vt;
            const float dv = du * (1.0f - o) + d_o * fire_grad(np, x);
            if (t_in == 1) acc += dv;
            else grad_in[at] = dv;
            dv_next = dv;
        }
        if (t_in == 1) grad_in[i] = acc;
    }
}

// counts[0] += #(s ≠ 0), counts[1] += #(s < 0) over n outputs (block reduction, one atomic each).
extern "C" __global__ void __launch_bounds__(256)
spike_counts_f32(const float* __restrict__ s, long long n, unsigned long long* counts) {
    unsigned long long fired = 0, inh = 0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = s[i];
        fired += x != 0.0f;
        inh += x < 0.0f;
    }
    for (int o = 16; o > 0; o >>= 1) {
        fired += __shfl_down_sync(0xffffffffu, fired, o);
        inh += __shfl_down_sync(0xffffffffu, inh, o);
    }
    __shared__ unsigned long long part[2][8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        part[0][warp] = fired;
        part[1][warp] = inh;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long a = 0, b = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
            a += part[0][w];
            b += part[1][w];
        }
        atomicAdd(&counts[0], a);
        atomicAdd(&counts[1], b);
    }
}
