// v4/weights.cuh — the gate weights of a launch: arranged once in the mma B-fragment order
// (phase 0) and copied into shared memory by cp.async. Part of backei_v4.cu: included inside its
// namespace v4, after the module's constants and types (not a header of its own).

// Phase 0 of a launch: the gate weights in the B-fragment order of every channel group, with
// their scales (fp32 mode): wfrag [gate][group][wslice_bytes], winv [gate][group] = 1/S. One
// (gate, group) slice per block (grid-stride), then a grid barrier.
template <bool TRANS>
__device__ __forceinline__ void build_weight_fragments(char* wfrag, float* winv, const float* __restrict__ params, const LayerDims& d,
                                                       const V4Dims& vd, unsigned int* bar, float* red) {
    const int C = DIM_C, CPAD = DIM_CPAD;
    const int ks_all = KK * CPAD / (PREC == PREC_TF32 ? 8 : 16);
    // u32 per plane: [k-step][n-tile pair][lane][n-tile of the pair][2] — a lane's fragments of two
    // neighbouring n-tiles are 16 contiguous bytes, one 16-byte shared load for both (conv_gemm)
    const int words = ks_all * NT * 64;
    const int wplane = vd.wslice_bytes / PLANES;
    for (int job = blockIdx.x; job < 2 * vd.groups; job += gridDim.x) {
        const int gate = job / vd.groups, gi = job - gate * vd.groups;
        if (gate == 0 ? !DIM_BACK : !DIM_EI) continue;  // block-uniform
        const float* w = params + (gate == 0 ? d.off_wb : d.off_we);
        const int n0 = gi * CO_T;
        // B[k][n]: k = tap·c_pad + c (c: the convolution's input channel), n < CO_T
        auto bval = [&](int k, int n) -> float {
            const int tap = k / CPAD, c = k - tap * CPAD, o = n0 + n;
            if (c >= C || o >= C) return 0.0f;
            return TRANS ? w[((long long)c * C + o) * KK + (KK - 1 - tap)] : w[((long long)o * C + c) * KK + tap];
        };
        float scale = 1.0f, inv = 1.0f;
        if (PREC == PREC_FP32) {
            float m = 0.0f;
            for (int j = threadIdx.x; j < KK * CPAD * CO_T; j += THREADS) m = fmaxf(m, fabsf(bval(j / CO_T, j % CO_T)));
            scale = pow2_scale(block_max(m, red), inv);
        }
        char* slice = wfrag + ((long long)gate * vd.groups + gi) * vd.wslice_bytes;
        // slab-major k-step order (so a slab's fragments are one contiguous range, which the
        // streamed mode copies): position = k²·(c0·EB/32) + tap·(nch·EB/32) + ks for slab [c0, c0 + nch)
        const int ks_tap = CPAD * EB / 32, slab_ks = vd.slab * EB / 32, slabs = (ks_tap + slab_ks - 1) / slab_ks;
        for (int j = threadIdx.x; j < words; j += THREADS) {
            const int reg = j & 1, lane = (j >> 2) & 31, ni = 2 * ((j >> 7) % (NT / 2)) + ((j >> 1) & 1), pos = (j >> 6) / NT;
            const int sl = min(pos / (KK * slab_ks), slabs - 1), c0ks = sl * slab_ks, nks = min(slab_ks, ks_tap - c0ks);
            const int rem = pos - KK * c0ks, tap = rem / nks, ks = rem - tap * nks;
            const int kbase = tap * CPAD + (c0ks + ks) * (32 / EB);  // the k-step's first K index
            const int gq = lane >> 2, tq = lane & 3, n = 8 * ni + gq;
            u32 hi, lo = 0;
            if (PREC == PREC_TF32) {
                hi = f32_to_tf32_bits(bval(kbase + tq + 4 * reg, n));
            } else {
                const int k0 = kbase + 2 * tq + 8 * reg;
                const float x0 = bval(k0, n) * scale, x1 = bval(k0 + 1, n) * scale;
                if (PREC == PREC_BF16) {
                    hi = pack2(f32_to_bf16_bits(x0), f32_to_bf16_bits(x1));
                } else {
                    unsigned short h0, l0, h1, l1;
                    split_f16(x0, h0, l0);
                    split_f16(x1, h1, l1);
                    hi = pack2(h0, h1);
                    lo = pack2(l0, l1);
                }
            }
            reinterpret_cast<u32*>(slice)[j] = hi;
            if (PLANES == 2) reinterpret_cast<u32*>(slice + wplane)[j] = lo;
        }
        if (threadIdx.x == 0) winv[gate * vd.groups + gi] = inv;
    }
    grid_sync(bar);
}

// Copies this block's slice of `gate` into shared memory with cp.async (commit; the caller waits).
__device__ __forceinline__ void load_weight_slice(char* dst, const char* wfrag, int gate, const V4Dims& vd) {
    const int gi = blockIdx.x % vd.groups;
    const char* src = wfrag + ((long long)gate * vd.groups + gi) * vd.wslice_bytes;
    for (int j = threadIdx.x * 16; j < vd.wslice_bytes; j += THREADS * 16) cp_async16(dst + j, src + j);
    cp_async_commit();
}
