// backei_layer.cu — the fused BackEI layer: ONE launch runs the whole time loop forward, ONE runs
// BPTT backward. CPU twin: src/cpu/backei_layer.rs (the reference); host side:
// src/gpu/backei_layer.rs (which shape takes which path).
//
// Forward, per sample, t = 0..T−1 (u_{−1} = 0, s_{t−D} = 0 for t < D):
//   a_t = W_b ⊛ s_{t−D} + b_b,  g_t = σ(a_t)             (back on; else g_t = 1)
//   v_t = λ·u_{t−1} + g_t·I_t                              (integrate)
//   o_t = H(v_t − θ)                                       (fire)
//   z_t = W_e ⊛ v_t + b_e,  e_t = sign(z_t)                (ei on; else e_t = 1)
//   u_t = v_t·(1 − o_t),  s_t = e_t·o_t                    (reset, output)
// ⊛: C→C convolution, k = 2r+1, stride 1, zero padding r, weight [Cout][Cin][k][k].
// Saved: s_t (the output), v_t, g_t (back), z_t (ei). u_{t−1} is not stored: the thread that owns
// a neuron recomputes it from its own v_{t−1} (u = v·(1 − H(v − θ)), the same expression).
//
// Backward, t = T−1..0, ds_t = ∂L/∂s_t + fb_t (fb_t = W_bᵀ ⊛ da_{t+D}, the feedback), du = λ·dv_{t+1}:
//   do = ds·e − du·v,  dz = ds·o·sign′(z),  dv = du·(1 − o) + do·H′(v − θ) + W_eᵀ ⊛ dz
//   dI_t = dv·g,  da_t = dv·I_t·g·(1 − g),  fb_{t−D} = W_bᵀ ⊛ da_t
//   dW_e += dz ⋆ v_t, db_e += Σ dz, dW_b += da ⋆ s_{t−D} (t ≥ D), db_b += Σ da
// (W ᵀ⊛: the adjoint convolution, dX[ci][y][x] = Σ_{c,ky,kx} W[c][ci][ky][kx]·dY[c][y−ky+r][x−kx+r];
//  ⋆: the weight gradient, dW[c][ci][ky][kx] = Σ_{y,x} dY[c][y][x]·X[ci][y+ky−r][x+kx−r].)
//
// Layout: every tensor time-major [T][B][C][H][W] f32, N = C·H·W per sample, BN = B·N per step;
// the input current has T_in ∈ {1, T}. Parameters and gradients are one flat buffer each, the
// four gate tensors at the offsets of LayerDims (CPU network's slots).
//
// Work mapping (v1, the reference version): ONE THREAD BLOCK PER SAMPLE. A block owns its
// sample's whole state, so the steps need only __syncthreads(), never a grid sync; its threads
// loop over the sample's N neurons (neuron i = c·HW + y·W + x). Every saved tensor is written to
// global memory and the convolutions read their neighbours from there (L1/L2 resident: a sample's
// step is at most 512 KiB); __syncthreads() orders those global accesses within the block. The
// buffers that are both written and read inside a kernel are therefore NOT __restrict__ (no
// non-coherent loads). The gate weights are copied to shared memory when they fit
// (LayerDims.w_smem). Per step: forward 1 sync (back only) or 2 (ei); backward 3.
// Weight gradients: with wgrad_fused the block accumulates its sample's dW/db in shared memory
// over all T (each thread owns whole weight elements, no shared atomics) and adds them to the
// gradient buffer with one atomicAdd pass at the end; otherwise the kernel saves da_t and dz_t for
// every step and backei_wgrad_v1_f32 reduces them over (t, b, pixel) afterwards.
#include "common.cuh"
#include "backei_common.cuh"


// (W ⊛ X)[c][y][x] without bias; X one sample [C][H][W].
__device__ __forceinline__ float conv_at(const float* w, const float* X, int C, int H, int W, int r, int c, int y, int x) {
    const int k = 2 * r + 1;
    float acc = 0.0f;
    for (int ci = 0; ci < C; ++ci) {
        const float* wc = w + ((long long)c * C + ci) * k * k;
        const float* xc = X + (long long)ci * H * W;
        for (int ky = 0; ky < k; ++ky) {
            const int iy = y + ky - r;
            if (iy < 0 || iy >= H) continue;
            for (int kx = 0; kx < k; ++kx) {
                const int ix = x + kx - r;
                if (ix < 0 || ix >= W) continue;
                acc += wc[ky * k + kx] * xc[iy * W + ix];
            }
        }
    }
    return acc;
}

// (Wᵀ ⊛ dY)[ci][y][x]: the adjoint of conv_at; dY one sample [C][H][W].
__device__ __forceinline__ float conv_t_at(const float* w, const float* dY, int C, int H, int W, int r, int ci, int y, int x) {
    const int k = 2 * r + 1;
    float acc = 0.0f;
    for (int c = 0; c < C; ++c) {
        const float* wc = w + ((long long)c * C + ci) * k * k;
        const float* dc = dY + (long long)c * H * W;
        for (int ky = 0; ky < k; ++ky) {
            const int oy = y - ky + r;
            if (oy < 0 || oy >= H) continue;
            for (int kx = 0; kx < k; ++kx) {
                const int ox = x - kx + r;
                if (ox < 0 || ox >= W) continue;
                acc += wc[ky * k + kx] * dc[oy * W + ox];
            }
        }
    }
    return acc;
}

// Σ_{y,x} dY[c][y][x]·X[ci][y+ky−r][x+kx−r] for weight element j = ((c·C + ci)·k + ky)·k + kx.
__device__ __forceinline__ float wgrad_at(const float* dY, const float* X, int C, int H, int W, int r, int j) {
    const int k = 2 * r + 1;
    const int kx = j % k, ky = (j / k) % k, ci = (j / (k * k)) % C, c = j / (k * k * C);
    const float* dc = dY + (long long)c * H * W;
    const float* xc = X + (long long)ci * H * W;
    const int y0 = max(0, r - ky), y1 = min(H, H + r - ky);
    const int x0 = max(0, r - kx), x1 = min(W, W + r - kx);
    float acc = 0.0f;
    for (int y = y0; y < y1; ++y)
        for (int x = x0; x < x1; ++x) acc += dc[y * W + x] * xc[(y + ky - r) * W + (x + kx - r)];
    return acc;
}

// Copies n floats global → shared (block-wide; the caller syncs).
__device__ __forceinline__ void copy_to_smem(float* dst, const float* __restrict__ src, int n) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) dst[j] = src[j];
}

// Forward. grid = B (one block per sample), block = plan's threads, dynamic smem = the gate
// weights when w_smem: [W_b (back)][W_e (ei)].
extern "C" __global__ void __launch_bounds__(1024)
backei_forward_v1_f32(const float* __restrict__ params, const float* __restrict__ input, float* out, float* v,
                      float* __restrict__ g, float* z, LayerDims d, NeuronParams np) {
    extern __shared__ float smem[];
    const int b = blockIdx.x;
    const int HW = d.H * d.W, N = d.C * HW, k = 2 * d.r + 1, wlen = d.C * d.C * k * k;
    const long long BN = (long long)d.B * N, base = (long long)b * N;
    const float* wb = params + d.off_wb;
    const float* bb = params + d.off_bb;
    const float* we = params + d.off_we;
    const float* be = params + d.off_be;
    if (d.w_smem) {
        float* p = smem;
        if (d.back) {
            copy_to_smem(p, wb, wlen);
            wb = p;
            p += wlen;
        }
        if (d.ei) {
            copy_to_smem(p, we, wlen);
            we = p;
        }
        __syncthreads();
    }
    for (int t = 0; t < d.T; ++t) {
        const long long ot = (long long)t * BN + base;
        const float* in_t = input + (d.t_in == 1 ? 0 : (long long)t * BN) + base;
        // integrate (and, without ei, fire and output)
        for (int i = threadIdx.x; i < N; i += blockDim.x) {
            const int c = i / HW, p = i - c * HW, y = p / d.W, x = p - y * d.W;
            float cur = in_t[i];
            if (d.back) {
                float a = bb[c];
                if (t >= d.D) a += conv_at(wb, out + (long long)(t - d.D) * BN + base, d.C, d.H, d.W, d.r, c, y, x);
                const float gt = sigmoidf_(a);
                g[ot + i] = gt;
                cur = gt * cur;
            }
            float u = 0.0f;
            if (t > 0) {
                const float vp = v[ot - BN + i];
                u = vp * (1.0f - fire(np, vp - np.threshold));
            }
            const float vt = np.leak * u + cur;
            v[ot + i] = vt;
            if (!d.ei) out[ot + i] = fire(np, vt - np.threshold);
        }
        if (d.ei) {
            __syncthreads();  // v_t of every neuron is written
            for (int i = threadIdx.x; i < N; i += blockDim.x) {
                const int c = i / HW, p = i - c * HW, y = p / d.W, x = p - y * d.W;
                const float zt = be[c] + conv_at(we, v + ot, d.C, d.H, d.W, d.r, c, y, x);
                z[ot + i] = zt;
                const float o = fire(np, v[ot + i] - np.threshold);
                out[ot + i] = sign_(np, zt) * o;
            }
        }
        __syncthreads();  // s_t is complete before a later step's gate reads it
    }
}

// Backward (BPTT). grid = B, block = plan's threads. Scratch (global): dvbuf [B][N] (dv_{t+1},
// then dv_t), fb [min(D,T)][B][N] (the feedback ring: slot t mod D holds W_bᵀ ⊛ da_{t+D}),
// dz and da: [B][N] when wgrad_fused, else [T][B][N] (kept for backei_wgrad_v1_f32).
// Dynamic smem: [acc W_b, acc b_b (back)][acc W_e, acc b_e (ei)] when wgrad_fused, then the gate
// weights [W_b][W_e] when w_smem.
extern "C" __global__ void __launch_bounds__(1024, 1)
backei_backward_v1_f32(const float* __restrict__ params, float* grads, const float* __restrict__ input,
                       const float* __restrict__ out, const float* __restrict__ v, const float* __restrict__ g,
                       const float* __restrict__ z, const float* __restrict__ grad_out, float* grad_in,
                       float* dvbuf, float* fb, float* dz, float* da, LayerDims d, NeuronParams np) {
    extern __shared__ float smem[];
    const int b = blockIdx.x;
    const int HW = d.H * d.W, N = d.C * HW, k = 2 * d.r + 1, wlen = d.C * d.C * k * k;
    const long long BN = (long long)d.B * N, base = (long long)b * N;
    const float* wb = params + d.off_wb;
    const float* we = params + d.off_we;
    float* acc_wb = nullptr;
    float* acc_bb = nullptr;
    float* acc_we = nullptr;
    float* acc_be = nullptr;
    float* p = smem;
    if (d.wgrad_fused) {
        if (d.back) {
            acc_wb = p;
            acc_bb = p + wlen;
            p += wlen + d.C;
        }
        if (d.ei) {
            acc_we = p;
            acc_be = p + wlen;
            p += wlen + d.C;
        }
        for (int j = threadIdx.x; j < (int)(p - smem); j += blockDim.x) smem[j] = 0.0f;
    }
    if (d.w_smem) {
        if (d.back) {
            copy_to_smem(p, wb, wlen);
            wb = p;
            p += wlen;
        }
        if (d.ei) {
            copy_to_smem(p, we, wlen);
            we = p;
        }
    }
    __syncthreads();
    float* dv_s = dvbuf + base;
    for (int t = d.T - 1; t >= 0; --t) {
        const long long ot = (long long)t * BN + base;
        float* dz_t = dz + (d.wgrad_fused ? 0 : (long long)t * BN) + base;
        float* da_t = da + (d.wgrad_fused ? 0 : (long long)t * BN) + base;
        const bool has_fb = d.back && t + d.D < d.T;
        // 1. ds, dz, and dv without the E/I adjoint term
        for (int i = threadIdx.x; i < N; i += blockDim.x) {
            const float vt = v[ot + i];
            const float x = vt - np.threshold;
            const float o = fire(np, x);
            float ds = grad_out[ot + i];
            if (has_fb) ds += fb[(long long)(t % d.D) * BN + base + i];
            const float du = t == d.T - 1 ? 0.0f : np.leak * dv_s[i];
            float d_o = ds;
            if (d.ei) {
                const float zt = z[ot + i];
                d_o = ds * sign_(np, zt);
                dz_t[i] = ds * o * sign_grad(np, zt);
            }
            d_o -= du * vt;
            dv_s[i] = du * (1.0f - o) + d_o * fire_grad(np, x);
        }
        if (d.ei) __syncthreads();  // dz_t complete
        // 2. dv += W_eᵀ ⊛ dz; dI; da. With wgrad_fused: dW_e += dz ⋆ v_t, db_e += Σ dz.
        for (int i = threadIdx.x; i < N; i += blockDim.x) {
            float dv = dv_s[i];
            if (d.ei) {
                const int c = i / HW, q = i - c * HW, y = q / d.W, x = q - y * d.W;
                dv += conv_t_at(we, dz_t, d.C, d.H, d.W, d.r, c, y, x);
                dv_s[i] = dv;
            }
            const float gi = d.back ? g[ot + i] : 1.0f;
            const float dcur = d.back ? dv * gi : dv;
            if (d.t_in == 1) {
                if (t == d.T - 1) grad_in[base + i] = dcur;
                else grad_in[base + i] += dcur;
            } else {
                grad_in[ot + i] = dcur;
            }
            if (d.back) {
                const float cur = input[(d.t_in == 1 ? 0 : (long long)t * BN) + base + i];
                da_t[i] = dv * cur * gi * (1.0f - gi);
            }
        }
        if (d.ei && d.wgrad_fused) {
            for (int j = threadIdx.x; j < wlen; j += blockDim.x) acc_we[j] += wgrad_at(dz_t, v + ot, d.C, d.H, d.W, d.r, j);
            for (int c = threadIdx.x; c < d.C; c += blockDim.x) {
                float s = 0.0f;
                for (int q = 0; q < HW; ++q) s += dz_t[c * HW + q];
                acc_be[c] += s;
            }
        }
        if (d.back) {
            __syncthreads();  // da_t complete
            // 3. the feedback to step t − D, and (wgrad_fused) dW_b += da ⋆ s_{t−D}, db_b += Σ da
            if (t >= d.D) {
                float* fb_slot = fb + (long long)((t - d.D) % d.D) * BN + base;
                for (int i = threadIdx.x; i < N; i += blockDim.x) {
                    const int c = i / HW, q = i - c * HW, y = q / d.W, x = q - y * d.W;
                    fb_slot[i] = conv_t_at(wb, da_t, d.C, d.H, d.W, d.r, c, y, x);
                }
            }
            if (d.wgrad_fused) {
                if (t >= d.D) {
                    const float* s_past = out + (long long)(t - d.D) * BN + base;
                    for (int j = threadIdx.x; j < wlen; j += blockDim.x) acc_wb[j] += wgrad_at(da_t, s_past, d.C, d.H, d.W, d.r, j);
                }
                for (int c = threadIdx.x; c < d.C; c += blockDim.x) {
                    float s = 0.0f;
                    for (int q = 0; q < HW; ++q) s += da_t[c * HW + q];
                    acc_bb[c] += s;
                }
            }
        }
        __syncthreads();  // dv_s, dz_t, da_t and the fb slot are reused by the next step
    }
    if (d.wgrad_fused) {
        if (d.back) {
            for (int j = threadIdx.x; j < wlen; j += blockDim.x) atomicAdd(grads + d.off_wb + j, acc_wb[j]);
            for (int c = threadIdx.x; c < d.C; c += blockDim.x) atomicAdd(grads + d.off_bb + c, acc_bb[c]);
        }
        if (d.ei) {
            for (int j = threadIdx.x; j < wlen; j += blockDim.x) atomicAdd(grads + d.off_we + j, acc_we[j]);
            for (int c = threadIdx.x; c < d.C; c += blockDim.x) atomicAdd(grads + d.off_be + c, acc_be[c]);
        }
    }
}

// The separate weight-gradient reduction (shapes whose dW does not fit in shared memory):
//   dW[c][ci][ky][kx] += Σ_{t ≥ t0} Σ_b Σ_{y,x} dY_t[b][c][y][x]·X_{t−shift}[b][ci][y+ky−r][x+kx−r]
//   db[c] += Σ_{t ≥ 0} Σ_b Σ_{y,x} dY_t[b][c][y][x]                       (only blocks with ci = 0)
// W_e: dY = dz, X = v, shift = 0. W_b: dY = da, X = s, shift = D (t0 = D). dW and db are at
// grads + off_w and grads + off_b (the layer's slots in the flat gradient buffer).
// grid = (C_in, C_out): block (ci, c) owns the k² weights of one (c, ci) pair, so it writes them
// with a plain read-add-write (no atomics). block = 256 threads = 8 warps; warp w handles taps
// w, w+8, ...; its lanes stride over the pixels of every (t, b) plane (coalesced), then a warp
// shuffle reduces. Biases: the ci = 0 blocks, all warps, reduced through shared memory.
extern "C" __global__ void __launch_bounds__(256)
backei_wgrad_v1_f32(float* __restrict__ grads, long long off_w, long long off_b, const float* __restrict__ dY,
                    const float* __restrict__ X, int shift, LayerDims d) {
    float* grad_w = grads + off_w;
    float* grad_b = grads + off_b;
    const int ci = blockIdx.x, c = blockIdx.y;
    const int HW = d.H * d.W, N = d.C * HW, k = 2 * d.r + 1, kk = k * k;
    const long long BN = (long long)d.B * N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int tap = warp; tap < kk; tap += warps) {
        const int ky = tap / k, kx = tap - ky * k;
        float acc = 0.0f;
        for (int t = shift; t < d.T; ++t) {
            for (int b = 0; b < d.B; ++b) {
                const float* dc = dY + (long long)t * BN + (long long)b * N + (long long)c * HW;
                const float* xc = X + (long long)(t - shift) * BN + (long long)b * N + (long long)ci * HW;
                for (int q = lane; q < HW; q += 32) {
                    const int y = q / d.W, x = q - y * d.W;
                    const int iy = y + ky - d.r, ix = x + kx - d.r;
                    if (iy >= 0 && iy < d.H && ix >= 0 && ix < d.W) acc += dc[q] * xc[iy * d.W + ix];
                }
            }
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
        if (lane == 0) {
            float* gw = grad_w + ((long long)c * d.C + ci) * kk + tap;
            *gw += acc;
        }
    }
    if (ci != 0) return;
    __shared__ float part[32];
    float acc = 0.0f;
    const long long planes = (long long)d.T * d.B;
    for (long long tb = warp; tb < planes; tb += warps) {
        const float* dc = dY + tb * N + (long long)c * HW;
        for (int q = lane; q < HW; q += 32) acc += dc[q];
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < warps; ++w) s += part[w];
        grad_b[c] += s;
    }
}

// ================================================================================================
// v2: the same computation as v1, spread over the whole GPU (host: `KernelVersion::V2` in
// src/gpu/backei_layer.rs, opt-in with BACKEI_BACKEI_KERNEL=v2 until validated on a GPU).
//
// Forward and backward are PERSISTENT kernels launched with cuLaunchCooperativeKernel (the driver
// then guarantees that every block is co-resident, or refuses the launch), grid ≤ co-resident
// blocks. Each step is split into phases; between two phases every block passes grid_sync()
// (below), so a phase may read anything the previous phases wrote, anywhere in the batch.
// Within a phase the work is a list of TILE JOBS over the whole batch (job = (sample b, output
// channel group, row group), td.jobs of them), handed out round-robin: job = blockIdx.x +
// k·gridDim.x. The job → block → thread mapping is the same in every phase and step, so a thread
// also owns the same neurons throughout (own-element chains such as dv_{t+1} → dv_t need no sync,
// though there is one anyway).
//
// Tile (tile_conv): 256 threads compute td.co_t output channels (16, 32 or 64) × td.rows full
// image rows (rows·W ≤ 1024·CPT/co_t pixels) of one sample. Thread (tc, tp), tc < co_t/CPT,
// tp < NP = 256·CPT/co_t, owns channels co0 + CPT·tc + [0, CPT) and pixels tp + j·NP, j < 4, i.e.
// CPT·4 accumulators; CPT (channels per thread) is 4 in v2 and 8 in v3 (below). The input
// channels are consumed in chunks of V2_CI = 8: the chunk's halo
// (rows + 2r) × (W + 2r) per channel (zero outside the image: the zero padding) and the matching
// weights [ci][tap][co] are staged in shared memory, then per (ci, tap) a thread does CPT/4 float4
// weight loads (broadcast within the warp), 4 input loads and 4·CPT FMAs. The adjoint convolution
// Wᵀ ⊛ dY is the same loop with the weights staged transposed and flipped:
//   w_s[i][tap][o] = W[i][o][k²−1−tap]  (tap (ky, kx) ↦ (2r−ky, 2r−kx)).
// Every conv output is summed over ci ascending, taps ascending (the CPU's order for W ⊛ X; the
// adjoint runs the taps in the opposite order of v1/CPU: rounding-level differences only).
//
// Weights: phase 0 of every launch writes the two gates' weights into the scratch ws in the
// staging layout [i][tap][o] over the whole layer (forward: W; backward: Wᵀ with the taps flipped;
// build_staging_layout), then a grid_sync, so the per-chunk staging is a coalesced copy.
// Forward, step t:  phase A (all tiles): a = b_b + W_b ⊛ s_{t−D} (back), g, v_t, and s_t when ei
//                   is off; grid_sync; phase B (ei): z = b_e + W_e ⊛ v_t, s_t; grid_sync.
// Backward, step t: phase 2 (all tiles): the v1 phases 1 and 2 in one: the tile's halo of dz_t is
//                   computed on the fly from the saved tensors (dz = ds·o·sign′(z), pointwise, with
//                   ds = ∂L/∂s + fb), so no sync is needed between them; the epilogue stores dz_t,
//                   dv_t, ∂I_t, da_t of the tile's own neurons; grid_sync;
//                   phase 3 (back, t ≥ D): fb_{t−D} = W_bᵀ ⊛ da_t; grid_sync.
// Weight gradients: the backward kernel keeps da_t and dz_t for every step ([T][B][N]) and
// backei_wgrad_tiled_r{1,2}_f32 reduces them afterwards (an ordinary launch): block (group of
// 16·cw output channels, group of 16 input channels, K split) stages 16·cw planes of dY and 16 halo
// planes of X per (t, b, row group) chunk; a thread owns all k² taps of its cw weight pairs in
// registers (a sliding k×k window along x) and adds them to the gradient buffer with one atomicAdd
// per weight at the end (v2: cw = 1; v3: cw = 1, 2 or 4).
//
// Coherence: every buffer that the kernel itself writes and another thread later reads (s, v in
// the forward; fb, da, dv in the backward) is read with __ldcg (L2, never a stale L1 line).
// ================================================================================================

#define V2_THREADS 256
#define V2_CI 8

// Host twin: TileDims in src/gpu/backei_layer.rs (#[repr(C)], the same field order).
struct TileDims {
    int co_t;           // output channels per tile: 16, 32 or 64
    int rows;           // image rows per tile (full width), rows·W ≤ 4096 / co_t
    int row_groups;     // ceil(H / rows)
    int ch_groups;      // ceil(C / co_t)
    int jobs;           // B · ch_groups · row_groups
    int wg_rows;        // weight gradient: rows per chunk (wg_rows·W ≤ 256)
    int wg_row_groups;  // ceil(H / wg_rows)
    int wg_split;       // weight gradient: blocks along the (t, b, row group) chunks (grid.y)
    int cpt;            // channels per thread: 4 (v2) or 8 (v3); the kernels' template parameter
    int wg_cw;          // weight gradient: output channels per thread (v2: 1; v3: 1, 2 or 4; at most 2 for r = 2)
};


// Sources of a tile's input planes; idx is an element of one sample's [C][H][W].
struct PlainSrc {
    const float* p;  // the sample's plane base (written earlier in the same kernel: read from L2)
    __device__ __forceinline__ float operator()(long long idx) const { return __ldcg(p + idx); }
};

// dz = (∂L/∂s + fb)·H(v − θ)·sign′(z), evaluated where it is staged (v1's phase 1, pointwise).
struct DzSrc {
    const float* gout;  // the sample's ∂L/∂s_t
    const float* fb;    // the sample's feedback slot of step t, or null
    const float* v;
    const float* z;
    NeuronParams np;
    __device__ __forceinline__ float operator()(long long idx) const {
        float ds = gout[idx];
        if (fb) ds += __ldcg(fb + idx);
        const float o = fire(np, v[idx] - np.threshold);
        return ds * o * sign_grad(np, z[idx]);
    }
};

// Dynamic shared memory of tile_conv (floats): the input halo chunk (padded to a float4
// boundary), then the weight chunk [V2_CI][k²][co_t]. Host twin: v2_tile_smem_bytes.
__device__ __forceinline__ int tile_in_floats(const LayerDims& d, const TileDims& td, int r) {
    return (V2_CI * (td.rows + 2 * r) * (d.W + 2 * r) + 3) & ~3;
}

// acc[i][j] += Σ_ci Σ_tap w_s[ci][tap][4·tc + i] · X[ci][halo of pixel j]. Block-uniform call
// (contains __syncthreads). base[j]: the halo index of pixel j's tap (0, 0).
template <int K, int CPT, class Src>
__device__ __forceinline__ void tile_conv(float (&acc)[CPT][4], float* smem, const float* ws, const Src& src,
                                          const LayerDims& d, const TileDims& td, int co0, int y0, const int (&base)[4], int tc) {
    constexpr int R = K / 2, KK = K * K;
    const int HS = d.W + 2 * R, HSZ = (td.rows + 2 * R) * HS, HW = d.H * d.W;
    const int in_len = V2_CI * HSZ, w_len = V2_CI * KK * td.co_t;
    float* in_s = smem;
    float* w_s = smem + tile_in_floats(d, td, R);
    for (int ci0 = 0; ci0 < d.C; ci0 += V2_CI) {
        __syncthreads();  // the previous chunk (or job) is consumed
        for (int j = threadIdx.x; j < in_len; j += V2_THREADS) {
            const int ci = j / HSZ, q = j - ci * HSZ, hy = q / HS, hx = q - hy * HS;
            const int gc = ci0 + ci, gy = y0 + hy - R, gx = hx - R;
            float val = 0.0f;
            if (gc < d.C && gy >= 0 && gy < d.H && gx >= 0 && gx < d.W) val = src((long long)gc * HW + gy * d.W + gx);
            in_s[j] = val;
        }
        for (int j = threadIdx.x; j < w_len; j += V2_THREADS) {
            // consecutive j: consecutive output channels, consecutive floats of ws (coalesced)
            const int co = j % td.co_t, rest = j / td.co_t, tap = rest % KK, ci = rest / KK;
            const int gi = ci0 + ci, go = co0 + co;
            float val = 0.0f;
            if (gi < d.C && go < d.C) val = __ldcg(ws + ((long long)gi * KK + tap) * d.C + go);
            w_s[j] = val;
        }
        __syncthreads();
        const int nci = min(V2_CI, d.C - ci0);
        for (int ci = 0; ci < nci; ++ci) {
            const float* xin = in_s + ci * HSZ;
            const float* wc = w_s + ci * KK * td.co_t + CPT * tc;
#pragma unroll
            for (int ky = 0; ky < K; ++ky) {
#pragma unroll
                for (int kx = 0; kx < K; ++kx) {
                    float4 w4[CPT / 4];
#pragma unroll
                    for (int q = 0; q < CPT / 4; ++q) w4[q] = *reinterpret_cast<const float4*>(wc + (ky * K + kx) * td.co_t + 4 * q);
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float xv = xin[base[j] + ky * HS + kx];
#pragma unroll
                        for (int q = 0; q < CPT / 4; ++q) {
                            acc[4 * q + 0][j] += w4[q].x * xv;
                            acc[4 * q + 1][j] += w4[q].y * xv;
                            acc[4 * q + 2][j] += w4[q].z * xv;
                            acc[4 * q + 3][j] += w4[q].w * xv;
                        }
                    }
                }
            }
        }
    }
}

// The gate weights in the staging layout ws[(i·k² + tap)·C + o] (i: the convolution's input
// channel, o: its output channel), built by all blocks at the start of a launch (then a grid_sync),
// so that staging a tile's chunk reads consecutive floats and stores them to consecutive banks;
// staging straight from W[o][i][tap] would read one float per 32-byte sector, C·k² floats apart.
//   forward (W ⊛ X):        ws[(i·k² + tap)·C + o] = W[o][i][tap]
//   backward (Wᵀ ⊛ dY):     ws[(i·k² + tap)·C + o] = W[i][o][k² − 1 − tap]  (transposed, taps flipped)
template <bool TRANS>
__device__ __forceinline__ void build_staging_layout(float* ws, const float* __restrict__ w, const LayerDims& d, int KK) {
    const long long len = (long long)d.C * d.C * KK;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < len; j += (long long)gridDim.x * blockDim.x) {
        const int o = (int)(j % d.C);
        const long long rest = j / d.C;
        const int tap = (int)(rest % KK), i = (int)(rest / KK);
        ws[j] = TRANS ? w[((long long)i * d.C + o) * KK + (KK - 1 - tap)] : w[((long long)o * d.C + i) * KK + tap];
    }
}

// Phase 0 of a v2/v3 launch: both gates' weights into ws = [W_b][W_e] (C²k² each), then a grid
// barrier (every block must pass it).
template <bool TRANS, int K>
__device__ __forceinline__ void stage_gate_weights(float* ws, const float* __restrict__ params, const LayerDims& d, unsigned int* bar) {
    const long long wlen = (long long)d.C * d.C * K * K;
    if (d.back) build_staging_layout<TRANS>(ws, params + d.off_wb, d, K * K);
    if (d.ei) build_staging_layout<TRANS>(ws + wlen, params + d.off_we, d, K * K);
    grid_sync(bar);
}

// The job's place: sample b, first channel co0, first row y0; and this thread's pixels: pix[j]
// (index within the image, −1 when past the tile) and base[j] (halo index, 0 when past it).
struct TileJob {
    int b, co0, y0;
    int pix[4];
    int base[4];
};

__device__ __forceinline__ TileJob tile_job(int job, const LayerDims& d, const TileDims& td, int tp, int np_threads, int r) {
    TileJob J;
    const int rg = job % td.row_groups, rest = job / td.row_groups;
    J.b = rest / td.ch_groups;
    J.co0 = (rest - J.b * td.ch_groups) * td.co_t;
    J.y0 = rg * td.rows;
    const int npix = min(td.rows, d.H - J.y0) * d.W;
    const int HS = d.W + 2 * r;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int p = tp + j * np_threads;
        const bool ok = p < npix;
        const int py = ok ? p / d.W : 0, px = ok ? p - py * d.W : 0;
        J.pix[j] = ok ? J.y0 * d.W + p : -1;
        J.base[j] = py * HS + px;
    }
    return J;
}

template <int K, int CPT>
__device__ __forceinline__ void forward_v2(const float* __restrict__ params, const float* __restrict__ input, float* out, float* v,
                                           float* __restrict__ g, float* z, unsigned int* bar, float* ws, const LayerDims& d,
                                           const NeuronParams& np, const TileDims& td) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    constexpr int R = K / 2;
    const int NPT = V2_THREADS / (td.co_t / CPT);  // pixel threads
    const int tc = threadIdx.x / NPT, tp = threadIdx.x - tc * NPT;
    const int HW = d.H * d.W, N = d.C * HW;
    const long long BN = (long long)d.B * N;
    const float* bb = params + d.off_bb;
    const float* be = params + d.off_be;
    // phase 0: the gate weights in the staging layout, [W_b][W_e]
    stage_gate_weights<false, K>(ws, params, d, bar);
    const float* wsb = ws;
    const float* wse = ws + (long long)d.C * d.C * K * K;
    for (int t = 0; t < d.T; ++t) {
        const long long ot = (long long)t * BN;
        const float* in_t = input + (d.t_in == 1 ? 0 : ot);
        // phase A: gate, integrate (and fire when ei is off)
        for (int job = blockIdx.x; job < td.jobs; job += gridDim.x) {
            const TileJob J = tile_job(job, d, td, tp, NPT, R);
            const long long sb = (long long)J.b * N;
            float acc[CPT][4] = {};
            if (d.back && t >= d.D) tile_conv<K, CPT>(acc, smem, wsb, PlainSrc{out + (long long)(t - d.D) * BN + sb}, d, td, J.co0, J.y0, J.base, tc);
#pragma unroll
            for (int i = 0; i < CPT; ++i) {
                const int c = J.co0 + CPT * tc + i;
                if (c >= d.C) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    if (J.pix[j] < 0) continue;
                    const long long e = sb + (long long)c * HW + J.pix[j];
                    float cur = in_t[e];
                    if (d.back) {
                        const float gt = sigmoidf_(bb[c] + acc[i][j]);
                        g[ot + e] = gt;
                        cur = gt * cur;
                    }
                    float u = 0.0f;
                    if (t > 0) {
                        const float vp = __ldcg(v + ot - BN + e);
                        u = vp * (1.0f - fire(np, vp - np.threshold));
                    }
                    const float vt = np.leak * u + cur;
                    v[ot + e] = vt;
                    if (!d.ei) out[ot + e] = fire(np, vt - np.threshold);
                }
            }
        }
        grid_sync(bar);  // v_t (and s_t) of the whole batch are written
        if (d.ei) {
            // phase B: z = b_e + W_e ⊛ v_t, s_t = sign(z)·H(v_t − θ)
            for (int job = blockIdx.x; job < td.jobs; job += gridDim.x) {
                const TileJob J = tile_job(job, d, td, tp, NPT, R);
                const long long sb = (long long)J.b * N;
                float acc[CPT][4] = {};
                tile_conv<K, CPT>(acc, smem, wse, PlainSrc{v + ot + sb}, d, td, J.co0, J.y0, J.base, tc);
#pragma unroll
                for (int i = 0; i < CPT; ++i) {
                    const int c = J.co0 + CPT * tc + i;
                    if (c >= d.C) continue;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        if (J.pix[j] < 0) continue;
                        const long long e = sb + (long long)c * HW + J.pix[j];
                        const float zt = be[c] + acc[i][j];
                        z[ot + e] = zt;
                        const float o = fire(np, __ldcg(v + ot + e) - np.threshold);
                        out[ot + e] = sign_(np, zt) * o;
                    }
                }
            }
            grid_sync(bar);  // s_t complete before a later step's gate reads it
        }
    }
}

// Forward v2. Cooperative launch: grid ≤ co-resident blocks, block = 256, dynamic smem =
// v2_tile_smem_bytes. bar: one zeroed u32 (the host zeroes it before every launch).
extern "C" __global__ void __launch_bounds__(V2_THREADS, 2)
backei_forward_v2_r1_f32(const float* __restrict__ params, const float* __restrict__ input, float* out, float* v,
                         float* __restrict__ g, float* z, unsigned int* bar, float* ws, LayerDims d, NeuronParams np, TileDims td) {
    forward_v2<3, 4>(params, input, out, v, g, z, bar, ws, d, np, td);
}
extern "C" __global__ void __launch_bounds__(V2_THREADS, 2)
backei_forward_v2_r2_f32(const float* __restrict__ params, const float* __restrict__ input, float* out, float* v,
                         float* __restrict__ g, float* z, unsigned int* bar, float* ws, LayerDims d, NeuronParams np, TileDims td) {
    forward_v2<5, 4>(params, input, out, v, g, z, bar, ws, d, np, td);
}

template <int K, int CPT>
__device__ __forceinline__ void backward_v2(const float* __restrict__ params, const float* __restrict__ input, const float* __restrict__ out,
                                            const float* __restrict__ v, const float* __restrict__ g, const float* __restrict__ z,
                                            const float* __restrict__ grad_out, float* grad_in, float* dvbuf, float* fb, float* dz,
                                            float* da, unsigned int* bar, float* ws, const LayerDims& d, const NeuronParams& np,
                                            const TileDims& td) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    constexpr int R = K / 2;
    const int NPT = V2_THREADS / (td.co_t / CPT);
    const int tc = threadIdx.x / NPT, tp = threadIdx.x - tc * NPT;
    const int HW = d.H * d.W, N = d.C * HW;
    const long long BN = (long long)d.B * N;
    // phase 0: the gate weights in the adjoint's staging layout, [W_bᵀ][W_eᵀ]
    stage_gate_weights<true, K>(ws, params, d, bar);
    const float* wsb = ws;
    const float* wse = ws + (long long)d.C * d.C * K * K;
    (void)out;
    for (int t = d.T - 1; t >= 0; --t) {
        const long long ot = (long long)t * BN;
        const bool has_fb = d.back && t + d.D < d.T;
        float* fb_t = has_fb ? fb + (long long)(t % d.D) * BN : nullptr;
        // phase 2: dz (on the fly), dv = … + W_eᵀ ⊛ dz, ∂I, da
        for (int job = blockIdx.x; job < td.jobs; job += gridDim.x) {
            const TileJob J = tile_job(job, d, td, tp, NPT, R);
            const long long sb = (long long)J.b * N;
            float acc[CPT][4] = {};
            if (d.ei) {
                const DzSrc src{grad_out + ot + sb, has_fb ? fb_t + sb : nullptr, v + ot + sb, z + ot + sb, np};
                tile_conv<K, CPT>(acc, smem, wse, src, d, td, J.co0, J.y0, J.base, tc);
            }
#pragma unroll
            for (int i = 0; i < CPT; ++i) {
                const int c = J.co0 + CPT * tc + i;
                if (c >= d.C) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    if (J.pix[j] < 0) continue;
                    const long long e = sb + (long long)c * HW + J.pix[j];
                    const float vt = v[ot + e];
                    const float x = vt - np.threshold;
                    const float o = fire(np, x);
                    float ds = grad_out[ot + e];
                    if (has_fb) ds += __ldcg(fb_t + e);
                    const float du = t == d.T - 1 ? 0.0f : np.leak * __ldcg(dvbuf + e);
                    float d_o = ds;
                    if (d.ei) {
                        const float zt = z[ot + e];
                        d_o = ds * sign_(np, zt);
                        dz[ot + e] = ds * o * sign_grad(np, zt);
                    }
                    d_o -= du * vt;
                    float dv = du * (1.0f - o) + d_o * fire_grad(np, x);
                    if (d.ei) dv += acc[i][j];
                    dvbuf[e] = dv;
                    const float gi = d.back ? g[ot + e] : 1.0f;
                    const float dcur = d.back ? dv * gi : dv;
                    if (d.t_in == 1) {
                        if (t == d.T - 1) grad_in[e] = dcur;
                        else grad_in[e] = __ldcg(grad_in + e) + dcur;
                    } else {
                        grad_in[ot + e] = dcur;
                    }
                    if (d.back) {
                        const float cur = input[(d.t_in == 1 ? 0 : ot) + e];
                        da[ot + e] = dv * cur * gi * (1.0f - gi);
                    }
                }
            }
        }
        grid_sync(bar);  // da_t, dv_t of the whole batch are written; the fb slot of step t is read
        if (d.back && t >= d.D) {
            // phase 3: the feedback to step t − D
            float* fb_slot = fb + (long long)((t - d.D) % d.D) * BN;
            for (int job = blockIdx.x; job < td.jobs; job += gridDim.x) {
                const TileJob J = tile_job(job, d, td, tp, NPT, R);
                const long long sb = (long long)J.b * N;
                float acc[CPT][4] = {};
                tile_conv<K, CPT>(acc, smem, wsb, PlainSrc{da + ot + sb}, d, td, J.co0, J.y0, J.base, tc);
#pragma unroll
                for (int i = 0; i < CPT; ++i) {
                    const int c = J.co0 + CPT * tc + i;
                    if (c >= d.C) continue;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        if (J.pix[j] < 0) continue;
                        fb_slot[sb + (long long)c * HW + J.pix[j]] = acc[i][j];
                    }
                }
            }
            grid_sync(bar);  // the fb slot is complete before step t − D reads it
        }
    }
}

// Backward v2 (BPTT). Cooperative launch as the forward. Scratch: dvbuf [B][N], fb
// [min(D,T)][B][N], dz and da [T][B][N] (all steps: backei_wgrad_tiled reads them afterwards).
// grads is not touched here (the argument list mirrors v1's).
extern "C" __global__ void __launch_bounds__(V2_THREADS, 2)
backei_backward_v2_r1_f32(const float* __restrict__ params, float* grads, const float* __restrict__ input, const float* __restrict__ out,
                          const float* __restrict__ v, const float* __restrict__ g, const float* __restrict__ z,
                          const float* __restrict__ grad_out, float* grad_in, float* dvbuf, float* fb, float* dz, float* da,
                          unsigned int* bar, float* ws, LayerDims d, NeuronParams np, TileDims td) {
    (void)grads;
    backward_v2<3, 4>(params, input, out, v, g, z, grad_out, grad_in, dvbuf, fb, dz, da, bar, ws, d, np, td);
}
extern "C" __global__ void __launch_bounds__(V2_THREADS, 2)
backei_backward_v2_r2_f32(const float* __restrict__ params, float* grads, const float* __restrict__ input, const float* __restrict__ out,
                          const float* __restrict__ v, const float* __restrict__ g, const float* __restrict__ z,
                          const float* __restrict__ grad_out, float* grad_in, float* dvbuf, float* fb, float* dz, float* da,
                          unsigned int* bar, float* ws, LayerDims d, NeuronParams np, TileDims td) {
    (void)grads;
    backward_v2<5, 4>(params, input, out, v, g, z, grad_out, grad_in, dvbuf, fb, dz, da, bar, ws, d, np, td);
}

// v3: the v2 kernels with 8-channel register tiles (CPT = 8: a thread owns 8 channels × 4 pixels,
// 32 accumulators; per (ci, tap) two float4 weight loads and 4 input loads feed 32 FMAs instead of
// 5 loads for 16, so the inner loop is bound by the FMA rate, not by shared-memory loads). A tile
// then holds 1024·8/co_t pixels. Same arguments, launch and weight-gradient kernels as v2.
extern "C" __global__ void __launch_bounds__(V2_THREADS, 2)
backei_forward_v3_r1_f32(const float* __restrict__ params, const float* __restrict__ input, float* out, float* v,
                         float* __restrict__ g, float* z, unsigned int* bar, float* ws, LayerDims d, NeuronParams np, TileDims td) {
    forward_v2<3, 8>(params, input, out, v, g, z, bar, ws, d, np, td);
}
extern "C" __global__ void __launch_bounds__(V2_THREADS, 2)
backei_forward_v3_r2_f32(const float* __restrict__ params, const float* __restrict__ input, float* out, float* v,
                         float* __restrict__ g, float* z, unsigned int* bar, float* ws, LayerDims d, NeuronParams np, TileDims td) {
    forward_v2<5, 8>(params, input, out, v, g, z, bar, ws, d, np, td);
}
extern "C" __global__ void __launch_bounds__(V2_THREADS, 2)
backei_backward_v3_r1_f32(const float* __restrict__ params, float* grads, const float* __restrict__ input, const float* __restrict__ out,
                          const float* __restrict__ v, const float* __restrict__ g, const float* __restrict__ z,
                          const float* __restrict__ grad_out, float* grad_in, float* dvbuf, float* fb, float* dz, float* da,
                          unsigned int* bar, float* ws, LayerDims d, NeuronParams np, TileDims td) {
    (void)grads;
    backward_v2<3, 8>(params, input, out, v, g, z, grad_out, grad_in, dvbuf, fb, dz, da, bar, ws, d, np, td);
}
extern "C" __global__ void __launch_bounds__(V2_THREADS, 2)
backei_backward_v3_r2_f32(const float* __restrict__ params, float* grads, const float* __restrict__ input, const float* __restrict__ out,
                          const float* __restrict__ v, const float* __restrict__ g, const float* __restrict__ z,
                          const float* __restrict__ grad_out, float* grad_in, float* dvbuf, float* fb, float* dz, float* da,
                          unsigned int* bar, float* ws, LayerDims d, NeuronParams np, TileDims td) {
    (void)grads;
    backward_v2<5, 8>(params, input, out, v, g, z, grad_out, grad_in, dvbuf, fb, dz, da, bar, ws, d, np, td);
}

// Weight gradient of v2 and v3 (an ordinary launch after the backward; partials = null: atomicAdd
// into grads, else each block writes its sums to partials[blockIdx.y] for backei_wgrad_reduce_f32):
//   dW[c][ci][tap] += Σ_{t ≥ shift} Σ_b Σ_p dY_t[b][c][p]·X_{t−shift}[b][ci][p + tap − r],  db[c] += Σ_{t ≥ 0} Σ_b Σ_p dY_t[b][c][p]
// Blocks walk the chunks (t, b, row group) blockIdx.y, + gridDim.y, …; block = 256 threads. The
// mapping of (c, ci) to blocks and threads: wgrad_tiled below.
__device__ __forceinline__ int wg_plane(const LayerDims& d, const TileDims& td, int r) {
    return ((td.wg_rows + 2 * r) * (d.W + 2 * r)) | 1;  // odd: the 16 ci planes fall in 16 banks
}

// Deterministic reduction of the weight gradient's slices: grads[W][j] += Σ_{s < splits} slice_s[j] and
// grads[b][c] += Σ_s slice_s[C²k² + c], s ascending (a fixed order: bit-reproducible). One thread
// per weight or bias element, grid-stride. partials: [splits][C·C·k² + C].
extern "C" __global__ void __launch_bounds__(256)
backei_wgrad_reduce_f32(float* __restrict__ grads, long long off_w, long long off_b, const float* __restrict__ partials, int splits,
                        long long wlen, int C) {
    const long long len = wlen + C;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < len; j += (long long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int s2 = 0; s2 < splits; ++s2) acc += partials[(long long)s2 * len + j];
        float* dst = j < wlen ? grads + off_w + j : grads + off_b + (j - wlen);
        *dst += acc;
    }
}

// The tiled weight gradient, generalised to td.wg_cw output channels per thread (v2: 1; v3: 1, 2 or 4,
// the most that C fills): a block owns 16·cw output channels × 16 input channels, thread
// (tcc = tid / 16, tci = tid % 16) the channels c0 + cw·tcc + [0, cw) against ci = i0 + tci. Per
// pixel a thread loads cw values of dY (broadcast within the warp) and one new window column of X,
// for cw·k² FMAs: with cw = 4 and k = 3, 7 shared loads feed 36 FMAs (cw = 1: 4 feed 9).
// grid = (ceil(C / (16·cw)) · ceil(C / 16), td.wg_split); dynamic smem: dY [16·cw][wg_rows·W], X halo
// [16][odd plane stride] (host twin: v2_wgrad_smem_bytes). partials: as described above.
template <int K>
__device__ __forceinline__ void wgrad_tiled(float* __restrict__ grads, long long off_w, long long off_b, const float* __restrict__ dY,
                                         const float* __restrict__ X, int shift, const LayerDims& d, const TileDims& td,
                                         float* __restrict__ partials) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    constexpr int R = K / 2, KK = K * K, CWMAX = K == 3 ? 4 : 2;
    const int cw = min(td.wg_cw, CWMAX);
    const int GI = (d.C + 15) / 16;
    const int c0 = (blockIdx.x / GI) * 16 * cw, i0 = (blockIdx.x % GI) * 16;
    const int tcc = threadIdx.x / 16, tci = threadIdx.x % 16;
    const int HW = d.H * d.W, N = d.C * HW;
    const long long BN = (long long)d.B * N;
    const int HS = d.W + 2 * R, HR = td.wg_rows + 2 * R, PW = td.wg_rows * d.W, PL = wg_plane(d, td, R);
    const int NC = 16 * cw;
    float* dy_s = smem;
    float* x_s = smem + NC * PW;
    float acc[CWMAX][K][K] = {};
    float accb[CWMAX] = {};
    const bool bias_thread = i0 == 0 && tci == 0;
    const long long chunks = (long long)d.T * d.B * td.wg_row_groups;
    for (long long ch = blockIdx.y; ch < chunks; ch += gridDim.y) {
        const int rg = (int)(ch % td.wg_row_groups);
        const long long tb = ch / td.wg_row_groups;
        const int t = (int)(tb / d.B), b = (int)(tb % d.B);
        const int y0 = rg * td.wg_rows, rows_here = min(td.wg_rows, d.H - y0);
        const bool with_x = t >= shift;
        __syncthreads();  // the previous chunk is consumed
        const float* dyb = dY + (long long)t * BN + (long long)b * N;
        for (int j = threadIdx.x; j < NC * PW; j += V2_THREADS) {
            const int cc = j / PW, q = j - cc * PW;
            float val = 0.0f;
            if (c0 + cc < d.C && q < rows_here * d.W) val = dyb[(long long)(c0 + cc) * HW + y0 * d.W + q];
            dy_s[j] = val;
        }
        if (with_x) {
            const float* xb = X + (long long)(t - shift) * BN + (long long)b * N;
            for (int j = threadIdx.x; j < 16 * HR * HS; j += V2_THREADS) {
                const int cc = j / (HR * HS), q = j - cc * (HR * HS), hy = q / HS, hx = q - hy * HS;
                const int gy = y0 + hy - R, gx = hx - R;
                float val = 0.0f;
                if (i0 + cc < d.C && gy >= 0 && gy < d.H && gx >= 0 && gx < d.W) val = xb[(long long)(i0 + cc) * HW + gy * d.W + gx];
                x_s[cc * PL + q] = val;
            }
        }
        __syncthreads();
        const float* dyc = dy_s + tcc * cw * PW;
        if (bias_thread) {
#pragma unroll
            for (int u = 0; u < CWMAX; ++u)
                if (u < cw)
                    for (int q = 0; q < rows_here * d.W; ++q) accb[u] += dyc[u * PW + q];
        }
        if (with_x) {
            const float* xc = x_s + tci * PL;
            for (int py = 0; py < rows_here; ++py) {
                float win[K][K];
#pragma unroll
                for (int ky = 0; ky < K; ++ky)
#pragma unroll
                    for (int kx = 0; kx < K - 1; ++kx) win[ky][kx] = xc[(py + ky) * HS + kx];
                for (int px = 0; px < d.W; ++px) {
#pragma unroll
                    for (int ky = 0; ky < K; ++ky) win[ky][K - 1] = xc[(py + ky) * HS + px + K - 1];
#pragma unroll
                    for (int u = 0; u < CWMAX; ++u) {
                        if (u < cw) {
                            const float dyv = dyc[u * PW + py * d.W + px];
#pragma unroll
                            for (int ky = 0; ky < K; ++ky)
#pragma unroll
                                for (int kx = 0; kx < K; ++kx) acc[u][ky][kx] += dyv * win[ky][kx];
                        }
                    }
#pragma unroll
                    for (int ky = 0; ky < K; ++ky)
#pragma unroll
                        for (int kx = 0; kx < K - 1; ++kx) win[ky][kx] = win[ky][kx + 1];
                }
            }
        }
    }
    const int ci = i0 + tci;
    float* slice = partials ? partials + (long long)blockIdx.y * ((long long)d.C * d.C * KK + d.C) : nullptr;
#pragma unroll
    for (int u = 0; u < CWMAX; ++u) {
        const int c = c0 + tcc * cw + u;
        if (u >= cw || c >= d.C) continue;
        if (ci < d.C) {
            const long long at = ((long long)c * d.C + ci) * KK;
#pragma unroll
            for (int ky = 0; ky < K; ++ky)
#pragma unroll
                for (int kx = 0; kx < K; ++kx) {
                    if (slice) slice[at + ky * K + kx] = acc[u][ky][kx];
                    else atomicAdd(grads + off_w + at + ky * K + kx, acc[u][ky][kx]);
                }
        }
        if (bias_thread) {
            if (slice) slice[(long long)d.C * d.C * KK + c] = accb[u];
            else atomicAdd(grads + off_b + c, accb[u]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(V2_THREADS)
backei_wgrad_tiled_r1_f32(float* __restrict__ grads, long long off_w, long long off_b, const float* __restrict__ dY,
                       const float* __restrict__ X, int shift, LayerDims d, TileDims td, float* __restrict__ partials) {
    wgrad_tiled<3>(grads, off_w, off_b, dY, X, shift, d, td, partials);
}
extern "C" __global__ void __launch_bounds__(V2_THREADS)
backei_wgrad_tiled_r2_f32(float* __restrict__ grads, long long off_w, long long off_b, const float* __restrict__ dY,
                       const float* __restrict__ X, int shift, LayerDims d, TileDims td, float* __restrict__ partials) {
    wgrad_tiled<5>(grads, off_w, off_b, dY, X, shift, d, td, partials);
}
