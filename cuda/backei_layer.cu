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

// Host twin: LayerDims in src/gpu/backei_layer.rs (#[repr(C)], the same field order).
struct LayerDims {
    long long off_wb, off_bb, off_we, off_be;  // tensor offsets in the flat params / grads
    int C, H, W;                               // layer shape
    int r;                                     // gate radius, k = 2r + 1
    int T, B, t_in;                            // steps, batch, T_in ∈ {1, T}
    int D;                                     // feedback delay ≥ 1
    int back, ei;                              // switches
    int w_smem;                                // gate weights copied to shared memory
    int wgrad_fused;                           // backward: dW accumulated on chip (else saved per step)
};

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
