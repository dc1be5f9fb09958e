// backei_unfused.cu — the pointwise kernels of the UNFUSED BackEI layer, the baseline that shows
// what fusion buys: a few launches per time step, the gate convolutions through cuBLAS
// (src/gpu/conv.rs: im2col + SGEMM). Host side: src/gpu/backei_unfused.rs (the schedule of
// launches); CPU twin: src/cpu/backei_layer.rs (the reference); fused twin: backei_layer.cu.
//
// Forward, per step t (u_{−1} = 0, s_{t−D} = 0 for t < D):
//   [conv]  a_t = W_b ⊛ s_{t−D} + b_b  into g_t      (back, t ≥ D; for t < D the kernel uses b_b)
//   unfused_integrate_f32:  g_t = σ(a_t),  v_t = λ·u_{t−1} + g_t·I_t   (back off: v_t = λ·u + I_t)
//                           and, when ei is off (`finish`), o_t = H(v_t − θ), s_t = o_t,
//                           u_t = v_t·(1 − o_t)
//   [conv]  z_t = W_e ⊛ v_t + b_e                      (ei)
//   unfused_fire_f32:       o_t = H(v_t − θ), s_t = sign(z_t)·o_t, u_t = v_t·(1 − o_t)   (ei)
// Backward, t = T−1..0, ds_t = ∂L/∂s_t + fb_t (fb_t = W_bᵀ ⊛ da_{t+D}, present when back and
// t + D < T), du = λ·dv_{t+1} (0 at t = T−1):
//   unfused_bwd_point_f32:  do = ds·e − du·v,  dz = ds·o·sign′(z),  dvp = du·(1 − o) + do·H′(v − θ)
//                           and, when ei is off (`finish`), everything unfused_bwd_input_f32 does
//   [conv]  dvc = W_eᵀ ⊛ dz,  dW_e += dz ⋆ v_t,  db_e += Σ dz            (ei)
//   unfused_bwd_input_f32:  dv = dvp + dvc,  dI_t (+)= dv·g,  du = λ·dv,  da = dv·I_t·g·(1 − g)
//   [conv]  fb_{t−D} = W_bᵀ ⊛ da,  dW_b += da ⋆ s_{t−D},  db_b += Σ da   (back, t ≥ D; else db_b only)
// The expressions, their order and the helpers (fire, sign_, fire_grad, sign_grad, sigmoidf_ of
// common.cuh) are those of the CPU reference and of the fused kernels, so the three agree to
// rounding (only the convolutions sum in another order).
//
// Layout: every per-step tensor is one step's slice [B][C][H][W] f32 (BN = B·N elements, neuron
// i = (b·C + c)·HW + pixel); the host passes pointers already offset to step t. T_in = 1 input
// currents are the same slice at every step; their gradient is summed over t (`accumulate`).
// Work mapping: one thread per element, grid-stride loops with 64-bit indices; every element is
// read and written by its own thread only, so the in-place buffers (u, g_t, du) need no syncs.
#include "common.cuh"

// One step of the integration. g_t holds a_t on entry when a_ready (the W_b conv ran), and
// receives g_t = σ(a_t) (back). u is read when has_u (t > 0) and, with finish, overwritten by u_t.
extern "C" __global__ void unfused_integrate_f32(const float* __restrict__ input_t, const float* __restrict__ b_b, float* g_t,
                                                 float* __restrict__ v_t, float* u, float* __restrict__ s_t, long long bn, int C,
                                                 int HW, int back, int a_ready, int has_u, int finish, NeuronParams np) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < bn; i += (long long)gridDim.x * blockDim.x) {
        float cur = input_t[i];
        if (back) {
            const float a = a_ready ? g_t[i] : b_b[(i / HW) % C];
            const float gt = sigmoidf_(a);
            g_t[i] = gt;
            cur = gt * cur;
        }
        const float u0 = has_u ? u[i] : 0.0f;
        const float v = np.leak * u0 + cur;
        v_t[i] = v;
        if (finish) {
            const float o = fire(np, v - np.threshold);
            u[i] = v * (1.0f - o);
            s_t[i] = o;
        }
    }
}

// The E/I output and the reset (ei on): z_t is the W_e conv's output.
extern "C" __global__ void unfused_fire_f32(const float* __restrict__ v_t, const float* __restrict__ z_t, float* __restrict__ u,
                                            float* __restrict__ s_t, long long bn, NeuronParams np) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < bn; i += (long long)gridDim.x * blockDim.x) {
        const float v = v_t[i];
        const float o = fire(np, v - np.threshold);
        u[i] = v * (1.0f - o);
        s_t[i] = sign_(np, z_t[i]) * o;
    }
}

// dv = dvp (+ dvc) → ∂I, du, da for one element (shared by the two backward kernels).
__device__ __forceinline__ void bwd_input_at(long long i, float dv, const float* __restrict__ input_t, const float* __restrict__ g_t,
                                             float* di_t, float* du, float* __restrict__ da, int back, int accumulate, int first,
                                             const NeuronParams& np) {
    const float dcur = back ? dv * g_t[i] : dv;
    if (accumulate && !first) {
        di_t[i] += dcur;
    } else if (accumulate) {
        di_t[i] = 0.0f + dcur;
    } else {
        di_t[i] = dcur;
    }
    du[i] = np.leak * dv;
    if (back) {
        const float g = g_t[i];
        da[i] = dv * input_t[i] * g * (1.0f - g);
    }
}

// Backward, first half: the output's gradient through the E/I gate, the fire and the reset.
// fb (the feedback ring's slot of step t) is read when has_fb; du (λ·dv_{t+1}) when has_du.
// With finish (ei off), also the second half (dv = dvp): ∂I, du, da.
extern "C" __global__ void unfused_bwd_point_f32(const float* __restrict__ gout_t, const float* __restrict__ fb, const float* __restrict__ v_t,
                                                 const float* __restrict__ z_t, float* du, float* __restrict__ dz, float* __restrict__ dvp,
                                                 const float* __restrict__ input_t, const float* __restrict__ g_t, float* di_t,
                                                 float* __restrict__ da, long long bn, int back, int ei, int has_fb, int has_du, int finish,
                                                 int accumulate, int first, NeuronParams np) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < bn; i += (long long)gridDim.x * blockDim.x) {
        const float v = v_t[i];
        const float x = v - np.threshold;
        const float o = fire(np, x);
        const float ds = has_fb ? gout_t[i] + fb[i] : gout_t[i];
        const float dui = has_du ? du[i] : 0.0f;
        float d_o = ds;
        if (ei) {
            const float z = z_t[i];
            d_o = ds * sign_(np, z);
            dz[i] = ds * o * sign_grad(np, z);
        }
        d_o -= dui * v;
        const float dv = dui * (1.0f - o) + d_o * fire_grad(np, x);
        if (finish) {
            bwd_input_at(i, dv, input_t, g_t, di_t, du, da, back, accumulate, first, np);
        } else {
            dvp[i] = dv;
        }
    }
}

// Backward, second half (ei on): dv = dvp + dvc (dvc = W_eᵀ ⊛ dz from the conv), then ∂I, du, da.
extern "C" __global__ void unfused_bwd_input_f32(const float* __restrict__ dvp, const float* __restrict__ dvc,
                                                 const float* __restrict__ input_t, const float* __restrict__ g_t, float* di_t, float* du,
                                                 float* __restrict__ da, long long bn, int back, int accumulate, int first,
                                                 NeuronParams np) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < bn; i += (long long)gridDim.x * blockDim.x) {
        bwd_input_at(i, dvp[i] + dvc[i], input_t, g_t, di_t, du, da, back, accumulate, first, np);
    }
}
