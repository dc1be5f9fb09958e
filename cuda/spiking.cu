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
// The network's last layer (a plain spiking layer in all four networks) runs the fused variants
// at the end of this file: the readout in its forward, the loss and the readout's gradient in its
// backward — two launches where there were five, and no [T][B][K] readout gradient.
//
// Layout: time-major, n = B·C·H·W neurons per step: x[t·n + i]; the input has T_in ∈ {1, T}.
// Work mapping: one thread per neuron (grid-stride), the time loop inside the thread; every
// access is coalesced (consecutive threads, consecutive neurons), so the kernels run at memory
// bandwidth: forward reads I (T_in·n) and writes s and v (2·T·n floats), backward reads ds and v
// and writes dI.
#include "common.cuh"
#include "loss_row.cuh"

// One neuron's forward over all T steps; READOUT also sums its spikes into the network's readout
// y[i] = (Σ_t s_t) · (1/T), in ascending t and with the very expression of readout_f32 (loss.cu),
// so the fused readout gives the bits of the separate kernel. 1/T (`inv_steps`) comes from the
// host: the same IEEE quotient as readout_f32's 1.0f/T, without a device division, whose
// slow-path call makes ptxas save registers (counted as spills).
template <bool READOUT>
__device__ __forceinline__ void spiking_forward_neuron(const float* __restrict__ input, float* __restrict__ out, float* __restrict__ v,
                                                       float* __restrict__ y, float inv_steps, long long i, long long n, int steps,
                                                       int t_in, const NeuronParams& np) {
    float u = 0.0f;
    for (int t = 0; t < steps; ++t) {
        const float cur = input[(t_in == 1 ? 0 : (long long)t * n) + i];
        const float vt = np.leak * u + cur;
        const float o = fire(np, vt - np.threshold);
        u = vt * (1.0f - o);
        out[(long long)t * n + i] = o;
        v[(long long)t * n + i] = vt;
    }
    if (READOUT) {
        // the thread's own spikes read back (cached, just written) rather than summed in the loop
        // above: a counter live across the smooth mode's division (a slow-path call) makes ptxas
        // save registers on sm_80 (counted as spills); the sum is the same, in the same order
        float count = 0.0f;
        for (int t = 0; t < steps; ++t) count += out[(long long)t * n + i];
        y[i] = count * inv_steps;
    }
}

// One neuron's BPTT; ∂L/∂s_t is grad_out[t·n + i], or with FROM_READOUT the readout's gradient
// dy_i · (1/T) at every step (readout_backward_f32's value, never stored).
template <bool FROM_READOUT>
__device__ __forceinline__ void spiking_backward_neuron(const float* __restrict__ grad_out, float dy, float inv_steps,
                                                        const float* __restrict__ v, float* __restrict__ grad_in, long long i, long long n,
                                                        int steps, int t_in, const NeuronParams& np) {
    // __fmul_rn: never contracted into the FMA of `d_o -= du * vt` below (the stored value of
    // readout_backward_f32 cannot be, so a contraction here would change the bits)
    const float ds_readout = __fmul_rn(dy, inv_steps);
    float dv_next = 0.0f;  // dv_{t+1}
    float acc = 0.0f;      // Σ_t dI_t when T_in = 1
    for (int t = steps - 1; t >= 0; --t) {
        const long long at = (long long)t * n + i;
        const float vt = v[at];
        const float x = vt - np.threshold;
        const float o = fire(np, x);
        const float du = np.leak * dv_next;
        float d_o = FROM_READOUT ? ds_readout : grad_out[at];
        d_o -= du * vt;
        const float dv = du * (1.0f - o) + d_o * fire_grad(np, x);
        if (t_in == 1) acc += dv;
        else grad_in[at] = dv;
        dv_next = dv;
    }
    if (t_in == 1) grad_in[i] = acc;
}

extern "C" __global__ void __launch_bounds__(256)
spiking_forward_v1_f32(const float* __restrict__ input, float* __restrict__ out, float* __restrict__ v,
                       long long n, int steps, int t_in, NeuronParams np) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        spiking_forward_neuron<false>(input, out, v, nullptr, 0.0f, i, n, steps, t_in, np);
}

extern "C" __global__ void __launch_bounds__(256)
spiking_backward_v1_f32(const float* __restrict__ grad_out, const float* __restrict__ v, float* __restrict__ grad_in,
                        long long n, int steps, int t_in, NeuronParams np) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        spiking_backward_neuron<false>(grad_out, 0.0f, 0.0f, v, grad_in, i, n, steps, t_in, np);
}

// ---- the network's last layer: readout and loss fused (host: GpuBackEiLayer::forward_with with
// Epilogue::Readout, backward_from_loss). n = B·K neurons, one per (sample b, class k), i = b·K + k.
//
// inv_steps = 1.0f/T and the loss's scales (loss_row.cuh) are computed by the host.
// Forward: the plain forward, plus y[i] = (Σ_t s_t)/T (replaces readout_f32).
extern "C" __global__ void __launch_bounds__(256)
spiking_readout_forward_v1_f32(const float* __restrict__ input, float* __restrict__ out, float* __restrict__ v, float* __restrict__ y,
                               float inv_steps, long long n, int steps, int t_in, NeuronParams np) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        spiking_forward_neuron<true>(input, out, v, y, inv_steps, i, n, steps, t_in, np);
}

// Backward from the loss (replaces loss_grad_f32, count_nonfinite_f32 on the row losses and
// readout_backward_f32): each thread computes its row's loss from y (K reads; the row's K threads
// compute the same value, loss_row.cuh), writes dy[i] = ∂L/∂y_i, and the row's k = 0 thread writes
// the row's loss and prediction and, when loss_status is not null, adds 1 to it for a NaN/Inf loss
// (an integer atomic: the count is exact whatever the order). Then BPTT with ∂L/∂s_t = dy_i/T.
extern "C" __global__ void __launch_bounds__(256)
spiking_loss_backward_v1_f32(const float* __restrict__ y, const int* __restrict__ labels, float* __restrict__ dy,
                             float* __restrict__ row_loss, int* __restrict__ pred, unsigned int* __restrict__ loss_status,
                             const float* __restrict__ v, float* __restrict__ grad_in, int batch, int classes, int kind,
                             LossScales sc, float inv_steps, int steps, int t_in, NeuronParams np) {
    const long long n = (long long)batch * classes;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        // 32-bit division (the host keeps B·K below 2^31): a 64-bit one is a slow-path call
        const int b = (int)i / classes, k = (int)i - b * classes;
        const float* yb = y + (long long)b * classes;
        const int label = labels[b];
        const LossRow r = loss_row(yb, label, sc, classes, kind);
        const float dyi = loss_row_grad(yb, r, label, k, sc, kind);
        dy[i] = dyi;
        if (k == 0) {
            row_loss[b] = r.total;
            pred[b] = r.pred;
            if (loss_status && !isfinite(r.total)) atomicAdd(loss_status, 1u);
        }
        spiking_backward_neuron<true>(nullptr, dyi, inv_steps, v, grad_in, i, n, steps, t_in, np);
    }
}

// counts[0] += #(s ≠ 0), counts[1] += #(s < 0) over n outputs (block reduction, one atomic each);
// s in f32, or int8 (a BackEI layer's compact output: backei_v4.cu with V4_S8).
template <class T>
__device__ __forceinline__ void spike_counts(const T* __restrict__ s, long long n, unsigned long long* counts) {
    unsigned long long fired = 0, inh = 0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const T x = s[i];
        fired += x != 0;
        inh += x < 0;
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

extern "C" __global__ void __launch_bounds__(256)
spike_counts_f32(const float* __restrict__ s, long long n, unsigned long long* counts) {
    spike_counts(s, n, counts);
}

extern "C" __global__ void __launch_bounds__(256)
spike_counts_s8(const signed char* __restrict__ s, long long n, unsigned long long* counts) {
    spike_counts(s, n, counts);
}
