// v4/gemm.cuh — the chunk's GEMMs on mma.sync: the gate convolutions over the staged slabs
// (conv_gemm, conv_all_slabs) and the weight gradients folded into the block's accumulators
// (wgrad_gemm, wgrad_all_slabs). Part of backei_v4.cu: included inside its namespace v4, after the
// module's constants and types (not a header of its own).

// A k-step's fragments of the convolution GEMM: A of the slab's APL planes for each m-tile (row
// addresses a_at[mi] + a_off), B of the weights' PLANES planes (`wplane` bytes apart) from b_off;
// B of n-tiles ni, ni + 1 in one 16-byte load (build_weight_fragments' pair order: a warp reads
// 512 contiguous bytes, the 4 wavefronts of two 8-byte loads).
template <int APL>
__device__ __forceinline__ void conv_load_step(u32 (&a)[APL][MT][4], u32 (&b)[PLANES][NT][2], const u32 (&a_at)[MT], u32 a_off, u32 b_off, int wplane,
                                               const V4Dims& vd) {
#pragma unroll
    for (int p = 0; p < APL; ++p)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) ldmatrix_x4_at(a[p][mi], a_at[mi] + a_off + p * vd.plane_bytes);
#pragma unroll
    for (int p = 0; p < PLANES; ++p)
#pragma unroll
        for (int ni = 0; ni < NT; ni += 2) {
            const uint4 v = lds128_at(b_off + p * wplane + ni * 256);
            b[p][ni][0] = v.x;
            b[p][ni][1] = v.y;
            b[p][ni + 1][0] = v.z;
            b[p][ni + 1][1] = v.w;
        }
}

// The chunk's convolution GEMM over one staged slab: acc[mi][ni] += A·B over the k² taps × the
// slab's channels, A from the slab (APL planes: 1 exact, PLANES real), B from the weight fragments
// at `wsl` (PLANES planes `wplane` bytes apart; the slab's k-step (tap, ks) at ks_base + tap·ks_slab
// + ks: the slab-major order of build_weight_fragments). Both read at 32-bit shared addresses: a
// k-step's loads are base + constant (generic pointers cost a 64-bit add, a sign extension and a
// move per address; SASS of the fashion L1 fp32 backward, 2026-12-07: ~14 of the k-step's 53
// instructions). A warp whose first m-tile lies past the chunk has nothing to do; one with a
// live first m-tile computes all MT (the rows of a dead one read the chunk's last pixel, and the
// epilogues skip pixels past the chunk): no warp-uniform branch per k-step and m-tile, and the
// block waits for its warps with the most live m-tiles anyway.
// Whether the fp32 mode's convolution adds two k-steps per fresh fragment: where a thread's
// accumulators are at most 32 (the 64-accumulator tiles of cifar10's L2 and L3 would hold 64 more
// registers across a k-step pair: spills in the SASS of both directions, 2026-12-07), else one
// k-step per fragment. (The weight gradient pairs its k-steps in every tile: its fragments are
// MW·NTG_ ≤ 32 accumulators.)
constexpr bool PAIRED_CONV = PREC == PREC_FP32 && MT * NT * 4 <= 32;

template <int APL>
__device__ __forceinline__ void conv_gemm(float (&acc)[MT][NT][4], const char* halo, const char* wsl, int wplane, int ks_base, int nch,
                                          const Chunk& ch, const LayerDims& d, const V4Dims& vd) {
    const int W = DIM_W, HS = W + 2 * R;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ks_slab = nch * EB / 32;  // k-steps: 32 bytes of channels
    if (warp * 16 >= ch.len) return;    // (m-tiles are live in order: m0 grows with mi)
    u32 a_at[MT];
    const u32 halo_at = smem_u32(halo);
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
        const int m0 = (warp + WARPS * mi) * 16;
        const int pm = min(m0 + (lane & 15), ch.len - 1);
        const int q = chunk_vq(ch, pm, d), y = q / W - ch.y_first, x = q - (q / W) * W;
        a_at[mi] = halo_at + (y * HS + x) * vd.pstride + (lane >> 4) * 16;
    }
    // B of k-step s, n-tile pair (ni, ni + 1), plane p: b_at + s·NT·256 + ni·256 + p·wplane
    const u32 b_at = smem_u32(wsl) + ks_base * NT * 256 + lane * 16;
    // taps not unrolled: one k-step already holds MT·NT·(1–3) independent MMAs, and unrolling k²
    // copies of it multiplies the code (and NVRTC's time) for no more parallelism
#pragma unroll 1
    for (int tap = 0; tap < KK; ++tap) {
        const int ky = tap / K, kx = tap - ky * K;
        const u32 a_tap = (ky * HS + kx) * vd.pstride;
        const u32 b_tap = b_at + tap * ks_slab * NT * 256;
        int ks = 0;
        if (PAIRED_CONV) {
            // the split products of two k-steps into one fresh fragment (mma_f16_split_into: half
            // the round-to-nearest FADDs, which were 32 of the loop's 78 instructions per 24 HMMA)
#pragma unroll 1
            for (; ks + 1 < ks_slab; ks += 2) {
                float t[MT][NT][4] = {};
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    u32 a[APL][MT][4];
                    u32 b[PLANES][NT][2];
                    conv_load_step<APL>(a, b, a_at, a_tap + (ks + h) * 32, b_tap + (ks + h) * NT * 256, wplane, vd);
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
                        for (int ni = 0; ni < NT; ++ni)
                            mma_f16_split_into(t[mi][ni], a[0][mi], a[APL - 1][mi], APL == 2, b[0][ni], b[PLANES - 1][ni], true);
                }
#pragma unroll
                for (int mi = 0; mi < MT; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                        for (int r = 0; r < 4; ++r) acc[mi][ni][r] += t[mi][ni][r];
            }
        }
        // (fp32 mode: a tap's odd last k-step, where its slab is 16, 48, … channels, or every
        // k-step where !PAIRED_CONV — not unrolled: unrolled twice, the 64-accumulator tiles
        // spilled 22 and 121 local-memory instructions in the forward and backward, 2026-12-07;
        // bf16: unrolled twice, 2.25 instructions per HMMA in the fashion L1 forward's loop
        // against 2.9 not unrolled; tf32, whose k-steps hold half the channels: four times)
#pragma unroll(PREC == PREC_FP32 ? 1 : (PREC == PREC_TF32 ? 4 : 2))
        for (; ks < ks_slab; ++ks) {
            u32 a[APL][MT][4];
            u32 b[PLANES][NT][2];
            conv_load_step<APL>(a, b, a_at, a_tap + ks * 32, b_tap + ks * NT * 256, wplane, vd);
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
                for (int ni = 0; ni < NT; ++ni) {
                    if (PREC == PREC_TF32) {
                        mma_tf32_m16n8k8(acc[mi][ni], a[0][mi], b[0][ni]);
                    } else if (PREC == PREC_BF16) {
                        mma_bf16_m16n8k16(acc[mi][ni], a[0][mi], b[0][ni]);
                    } else {
                        // the split products into a fresh fragment added with round-to-nearest:
                        // the tensor cores truncate, and a sum kept in their accumulator drifts
                        // (an H200 put this mode at 2–12× the f32 CPU engine's error, 2026-12-04)
                        mma_f16_split_rn(acc[mi][ni], a[0][mi], a[APL - 1][mi], APL == 2, b[0][ni], b[PLANES - 1][ni], true);
                    }
                }
            }
        }
    }
}

// An n-tile of a slab's weight gradient: its tap (ky, kx) and first channel ci within the slab
// (n-tile j: tap j / (nch/8), channels 8·(j % (nch/8)) + 0..7).
struct NTileAt {
    int ky, kx, ci;
    __device__ __forceinline__ void start(int j, int nch) {
        const int per_tap = nch >> 3, tap = (int)((unsigned)j / (unsigned)per_tap);
        ci = (j - tap * per_tap) * 8;
        ky = tap / K;
        kx = tap - ky * K;
    }
    // the n-tile after this one
    __device__ __forceinline__ NTileAt next(int nch) const {
        NTileAt n = *this;
        n.ci += 8;
        if (n.ci == nch) {
            n.ci = 0;
            if (++n.kx == K) {
                n.kx = 0;
                ++n.ky;
            }
        }
        return n;
    }
    // the tap's offset in the halo (pixels)
    __device__ __forceinline__ int halo_offset(const LayerDims& d) const { return ky * (DIM_W + 2 * R) + kx; }
    // its column of dw: tap·c_pad + c0 + ci
    __device__ __forceinline__ int column(int c0, int cpad) const { return (ky * K + kx) * cpad + c0 + ci; }
};

// The chunk's pixel rows for the weight gradient's k-loop (wgrad_tile), in shared memory
// (V4Smem.pix, 2·P_CH words): for each pixel position p < P_CH of the chunk, the byte offset of
// the pixel's row in the own planes (dY, read at the pixel itself: + r rows, + r columns) at [p],
// and in the slab planes (X at tap (0, 0)) at [P_CH + p]. Past the chunk's end dY's row is a
// padding column of the halo (halo row r, column −r: staged as zeros in every plane and channel,
// like every halo pixel outside the image) and X's the chunk's last pixel (staged, finite): their
// products are zero, so the k-loop needs no test of the chunk's end (it selected a zero row per
// load). Written between the barrier that frees the planes and the one that publishes the staged
// operands, by whichever stages the weight gradient's operands (wgrad_all_slabs, or
// conv_all_slabs where dY shares the convolution's slab); one pixel per thread.
__device__ __forceinline__ void fill_pixel_rows(u32* rows, const Chunk& ch, const LayerDims& d, const V4Dims& vd) {
    const int W = DIM_W, HS = W + 2 * R;
    for (int p = threadIdx.x; p < P_CH; p += THREADS) {
        const int q = chunk_vq(ch, min(p, ch.len - 1), d), y = q / W;
        const int h = (y - ch.y_first) * HS + (q - y * W);
        rows[p] = (u32)((p < ch.len ? h + R * HS + R : R * HS) * vd.own_pstride);
        rows[P_CH + p] = (u32)(h * vd.pstride);
    }
}

// A k-step's fragments of the weight gradient (fp16/bf16, ldmatrix.trans; see wgrad_tile): A = dY
// of the YPL own planes at row address arow, B = X of the XPL slab planes at brow + the lane's
// tile offsets x_off (two n-tiles per ldmatrix.x4).
template <int YPL, int XPL, int NTG_>
__device__ __forceinline__ void wgrad_load_step(u32 (&a)[YPL][MW][4], u32 (&b)[XPL][NTG_][2], u32 arow, u32 brow, const int (&x_off)[NTG_],
                                                const V4Dims& vd) {
#pragma unroll
    for (int p = 0; p < YPL; ++p)
#pragma unroll
        for (int mw = 0; mw < MW; ++mw) ldmatrix_x4_trans_at(a[p][mw], arow + p * vd.own_plane_bytes + 16 * mw * EB);
#pragma unroll
    for (int pair = 0; pair < NTG_ / 2; ++pair) {
#pragma unroll
        for (int p = 0; p < XPL; ++p) {
            u32 r4[4];
            ldmatrix_x4_trans_at(r4, brow + p * vd.plane_bytes + x_off[2 * pair]);
            b[p][2 * pair][0] = r4[0];
            b[p][2 * pair][1] = r4[1];
            b[p][2 * pair + 1][0] = r4[2];
            b[p][2 * pair + 1][1] = r4[3];
        }
    }
}

// The weight-gradient register tile of a warp: NTG_ n-tiles (NTG_ / 2 pairs) from tile `tile0` of
// the slab, MW m-tiles, accumulated over the chunk's pixels and folded into dw (see wgrad_gemm).
template <int YPL, int XPL, int NTG_>
__device__ __forceinline__ void wgrad_tile(float* dw, int pitch, float inv, const char* dy_own, const char* x_slab, int c0, int nch, int tile0,
                                           const u32* pix_rows, const Chunk& ch, const LayerDims& d, const V4Dims& vd) {
    const int CPAD = DIM_CPAD;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ksteps = (ch.len + KPIX - 1) / KPIX;
    static_assert(YPL == PLANES, "dY is a real operand");
    static_assert(NTG_ % 2 == 0, "n-tiles come in ldmatrix pairs");
    float acc[MW][NTG_][4];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int j = 0; j < NTG_; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mw][j][i] = 0.0f;
    // the halo offsets and first channels of the tiles this lane reads — tf32: tile j's (tap
    // offset, channel g); else: the ldmatrix pair's (tile 2·(j/2) + lane/16), for this lane. The
    // tiles' taps and channels: tile0's by one division, the next ones by steps (NTileAt)
    int x_off[NTG_];
    {
        NTileAt at;
        at.start(tile0, nch);
#pragma unroll
        for (int j = 0; j < NTG_; ++j) {
            const int xo = at.halo_offset(d) * vd.pstride + at.ci * EB;
            if (PREC == PREC_TF32) {
                x_off[j] = xo + g * EB;
            } else if (j % 2 == 0) {
                x_off[j] = xo;  // the pair's first tile; its second replaces it on lanes 16..31
            } else {
                if (lane >> 4) x_off[j - 1] = xo;
                x_off[j] = x_off[j - 1];
            }
            at = at.next(nch);
        }
    }
    if (PREC == PREC_TF32) {
        // scalar fragments: a = dY[co g (+8)][pixel t (+4)], b = X[pixel t (+4) + tap][ci g], the
        // pixels' rows from the chunk's table (fill_pixel_rows): past the chunk, dY's is a zero
        // padding pixel and X's the chunk's last, whose product with that zero is zero
        const u32* rows_y = pix_rows;
        const u32* rows_x = pix_rows + P_CH;
        for (int kst = 0; kst < ksteps; ++kst) {
            const int p0 = kst * KPIX;
            u32 a[MW][4];
            u32 b[NTG_][2];
            u32 ry[2], rx[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                ry[h] = rows_y[p0 + t + 4 * h];
                rx[h] = rows_x[p0 + t + 4 * h];
            }
#pragma unroll
            for (int mw = 0; mw < MW; ++mw)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int h = j >> 1, co = 16 * mw + g + 8 * (j & 1);
                    a[mw][j] = *reinterpret_cast<const u32*>(dy_own + ry[h] + co * EB);
                }
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < NTG_; ++j) b[j][h] = *reinterpret_cast<const u32*>(x_slab + rx[h] + x_off[j]);
#pragma unroll
            for (int mw = 0; mw < MW; ++mw)
#pragma unroll
                for (int j = 0; j < NTG_; ++j) mma_tf32_m16n8k8(acc[mw][j], a[mw], b[j]);
        }
    } else {
        // ldmatrix.trans, lane l addressing one row (pixel) of matrix l/8. A: matrix j = pixels
        // 8·(j/2) + 0..7, channels 8·(j%2) + 0..7; B (two n-tiles per ldmatrix.x4): matrix j =
        // pixels 8·(j%2) + 0..7 of n-tile 2·pair + j/2. (One pixel per lane for both would need A's
        // registers 1 and 2 swapped, and HMMA takes a fragment in consecutive registers: 4 moves
        // per fragment in the SASS, more than a second row address costs.) A lane's rows are the
        // chunk's pixel rows (fill_pixel_rows: one shared load per operand and k-step, zeros for
        // dY past the chunk), where walking the pixels and testing the chunk's end took ~20
        // instructions per k-step (SASS of the fashion L1 fp32 backward, 2026-12-07)
        const int pa_lane = (lane & 7) + 8 * (lane >> 4), pb_lane = (lane & 7) + 8 * ((lane >> 3) & 1);
        const int ca = 8 * ((lane >> 3) & 1);
        // 32-bit shared addresses (ldmatrix_x4_trans_at)
        const u32 a_base = smem_u32(dy_own) + ca * EB, b_base = smem_u32(x_slab);
        const u32 ta = smem_u32(pix_rows) + pa_lane * 4, tb = smem_u32(pix_rows) + (P_CH + pb_lane) * 4;
        if (PREC == PREC_FP32) {
            // as the gate convolutions: two k-steps' split products into one fresh fragment, added
            // with round-to-nearest (mma_f16_split_into). Where the chunk has an odd number of
            // k-steps, the last pair's second one lies past it: its dY rows are the zero padding
            // pixel (fill_pixel_rows; the table holds P_CH rows, an even number of k-steps), its
            // products zero, and the sums those of one k-step alone
#pragma unroll 1
            for (int kst = 0; kst < ksteps; kst += 2) {
                float t[MW][NTG_][4] = {};
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    u32 a[YPL][MW][4];
                    u32 b[XPL][NTG_][2];
                    wgrad_load_step<YPL, XPL, NTG_>(a, b, a_base + lds32_at(ta + (kst + h) * KPIX * 4), b_base + lds32_at(tb + (kst + h) * KPIX * 4), x_off,
                                                    vd);
#pragma unroll
                    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
                        for (int j = 0; j < NTG_; ++j) mma_f16_split_into(t[mw][j], a[0][mw], a[YPL - 1][mw], true, b[0][j], b[XPL - 1][j], XPL == 2);
                }
#pragma unroll
                for (int mw = 0; mw < MW; ++mw)
#pragma unroll
                    for (int j = 0; j < NTG_; ++j)
#pragma unroll
                        for (int r = 0; r < 4; ++r) acc[mw][j][r] += t[mw][j][r];
            }
        } else {
            for (int kst = 0; kst < ksteps; ++kst) {
                u32 a[YPL][MW][4];
                u32 b[XPL][NTG_][2];
                wgrad_load_step<YPL, XPL, NTG_>(a, b, a_base + lds32_at(ta + kst * KPIX * 4), b_base + lds32_at(tb + kst * KPIX * 4), x_off, vd);
#pragma unroll
                for (int mw = 0; mw < MW; ++mw)
#pragma unroll
                    for (int j = 0; j < NTG_; ++j) mma_bf16_m16n8k16(acc[mw][j], a[0][mw], b[0][j]);
            }
        }
    }
    // fold: this warp owns these dw elements alone (no race, a fixed order). In shared memory
    // (an even pitch: DW_SMEM_PITCH) as float2 — a lane's two columns — so that a half-warp's
    // 16 lanes (rows g = 0..3, column pairs t) fall in 32 different banks; in dw_part
    // (global, pitch n_all + 1: odd) one float at a time.
    NTileAt at;
    at.start(tile0, nch);
#pragma unroll
    for (int j = 0; j < NTG_; ++j, at = at.next(nch)) {
        float* const col = dw + g * pitch + at.column(c0, CPAD) + 2 * t;
#pragma unroll
        for (int mw = 0; mw < MW; ++mw)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float* at = col + (16 * mw + 8 * h) * pitch;
                if ((pitch & 1) == 0) {
                    float2 x = *reinterpret_cast<float2*>(at);
                    x.x += acc[mw][j][2 * h] * inv;
                    x.y += acc[mw][j][2 * h + 1] * inv;
                    *reinterpret_cast<float2*>(at) = x;
                } else {
                    at[0] += acc[mw][j][2 * h] * inv;
                    at[1] += acc[mw][j][2 * h + 1] * inv;
                }
            }
    }
}

// The chunk's weight-gradient GEMM over one staged slab of X (channels [c0, c0 + nch)), folded
// into dw (f32, CO_T rows of k²·c_pad, `pitch` apart):
//   dw[co][tap·c_pad + ci] += inv · Σ_p dY[co0 + co][p] · X[ci][p + off(tap)],  ci ∈ the slab
// dY: the block's own CO_T channels, staged in the own planes (YPL planes, real); X: the slab
// (XPL planes). The slab's k²·nch/8 n-tiles (an even number: nch is a multiple of 16) are split
// into pairs, and warp w takes the balanced contiguous run of pairs [w·P/8, (w+1)·P/8), as register
// tiles of NTG n-tiles (two pairs) and, where the run is odd, one of a single pair. The warps
// finish together: where every warp took whole NTG-tile groups in turn (w, w + 8, …), 9 groups
// (fashion-mnist L1: 36 n-tiles) gave warp 0 twice the work of the others, and the block waited
// for it (8 tiles on the critical path instead of 6). Rows of pixels past the chunk read a zero
// row of dY. Each dw element's sum (its k-steps in order, then one fold) is the same as before,
// whichever warp makes it: the same bits.
template <int YPL, int XPL>
__device__ __forceinline__ void wgrad_gemm(float* dw, int pitch, float inv, const char* dy_own, const char* x_slab, int c0, int nch,
                                           const u32* pix_rows, const Chunk& ch, const LayerDims& d, const V4Dims& vd) {
    static_assert(NTG == 4, "a run's odd pair is one tile of 2");
    const int warp = threadIdx.x >> 5;
    const int pairs = KK * nch / 16;
    const int first = warp * pairs / WARPS, last = (warp + 1) * pairs / WARPS;
    int pr = first;
    if (MW * NTG * 4 > 32 && PLANES == 2) {
        // the 64-channel tiles in fp32 mode (cifar10 L2/L3): 2-n-tile register tiles only — with
        // 4, the tile's 64 accumulators and both planes' fragments pushed ptxas past 255 registers
        // into 31 local-memory instructions of spilled set-up values (48-byte frame; 12 with these)
        for (; pr < last; ++pr) wgrad_tile<YPL, XPL, 2>(dw, pitch, inv, dy_own, x_slab, c0, nch, 2 * pr, pix_rows, ch, d, vd);
        return;
    }
    for (; pr + NTG / 2 <= last; pr += NTG / 2) wgrad_tile<YPL, XPL, NTG>(dw, pitch, inv, dy_own, x_slab, c0, nch, 2 * pr, pix_rows, ch, d, vd);
    if (pr < last) wgrad_tile<YPL, XPL, 2>(dw, pitch, inv, dy_own, x_slab, c0, nch, 2 * pr, pix_rows, ch, d, vd);
}

// A convolution of the chunk over every channel slab: acc += W ⊛ X, X staged slab by slab into the
// slab planes with one scale (`scale`; REAL operands). The weights: `w_smem` holds this block's
// whole slice of the gate (resident), or receives each slab's fragments from `w_global` (the
// slice in wfrag) by cp.async while the slab is staged (streamed from L2). With `x_planes` (the
// backward where dy_shares_slab: one slab, staged into the own planes) the weight gradient's X
// (`xsrc`, scaled by `xscale`) is staged into x_planes in the same walk (stage_slab_pair), and the
// weight gradient then finds both its operands staged (wgrad_all_slabs' staged). Block-uniform.
template <bool REAL, int APL, class Src, bool XREAL = false, class XSrc = NoSrc>
__device__ __forceinline__ void conv_all_slabs(float (&acc)[MT][NT][4], char* halo, char* w_smem, const char* w_global, const Src& src,
                                               float scale, const Chunk& ch, const LayerDims& d, const V4Dims& vd, char* x_planes = nullptr,
                                               const XSrc& xsrc = XSrc{}, float xscale = 1.0f, u32* pix_rows = nullptr) {
    const int full_plane = vd.wslice_bytes / PLANES;
    for (int c0 = 0; c0 < DIM_CPAD; c0 += vd.slab) {
        const int nch = min(vd.slab, DIM_CPAD - c0);
        const int ks_c0 = c0 * EB / 32, slab_plane = KK * (nch * EB / 32) * NT * 256;  // bytes per plane of the slab's fragments
        __syncthreads();  // the previous slab (or chunk) is consumed: its planes and weights
        if (!vd.w_resident) {
            for (int p = 0; p < PLANES; ++p) {
                const char* from = w_global + p * full_plane + KK * ks_c0 * NT * 256;
                for (int j = threadIdx.x * 16; j < slab_plane; j += THREADS * 16) cp_async16(w_smem + p * slab_plane + j, from + j);
            }
            cp_async_commit();
        }
        if constexpr (IsNoSrc<XSrc>::value) stage_slab<REAL>(halo, vd.pstride, vd.plane_bytes, src, ch, c0, nch, slabs_pass_c(d), scale, d);
        else if (x_planes) {
            fill_pixel_rows(pix_rows, ch, d, vd);  // (for the weight gradient that follows: wgrad_all_slabs' staged)
            stage_slab_pair<REAL, XREAL>(halo, x_planes, vd.pstride, vd.plane_bytes, src, scale, xsrc, xscale, ch, c0, nch, slabs_pass_c(d), d);
        } else stage_slab<REAL>(halo, vd.pstride, vd.plane_bytes, src, ch, c0, nch, slabs_pass_c(d), scale, d);
        if (!vd.w_resident) cp_async_wait_all();
        __syncthreads();
        if (vd.w_resident) conv_gemm<APL>(acc, halo, w_smem, full_plane, KK * ks_c0, nch, ch, d, vd);
        else conv_gemm<APL>(acc, halo, w_smem, slab_plane, 0, nch, ch, d, vd);
    }
}

// Whether the backward's convolutions stage their operand (dz, da) into the own planes, where the
// weight gradient then reads it as dY instead of staging it again: when the block's tile is the
// whole padded channel range in one slab (CO_T = slab = c_pad, one channel group: fashion-mnist's
// and mnist's layer 1), the convolution's slab and the weight gradient's own channels are the same
// channels of the same halo with the same scale, and the two plane sets have one geometry — the
// same bytes, staged once instead of twice (dz costs 4–5 loads per element). Block-uniform.
__device__ __forceinline__ bool dy_shares_slab(const V4Dims& vd) {
    const bool fits = vd.groups == 1 && vd.slab == DIM_CPAD && vd.own_pstride == vd.pstride && vd.own_plane_bytes == vd.plane_bytes;
#ifdef V4_DY_ONCE
    // the plan's answer (V4Plan::stages_dy_once) as a constant of the GPU build: an instance that
    // never shares leaves the shared path (and its co-staged X) out of its code
    return V4_DY_ONCE && fits;
#else
    return fits;
#endif
}

// The chunk's weight gradient over every channel slab of X: the block's own dY channels staged once
// into the own planes, X slab by slab into the slab planes — unless `staged`: where dy_shares_slab,
// the convolution staged dY into the own planes and X, its one slab, into the slab planes beside it
// (conv_all_slabs' x_planes) and synced; nothing has written the planes since, so the GEMM reads
// them at once. Block-uniform.
template <bool XREAL, int XPL, class YSrc, class XSrc>
__device__ __forceinline__ void wgrad_all_slabs(float* dw, int pitch, bool staged, const YSrc& ysrc, float yscale, float yinv,
                                                const XSrc& xsrc, float xscale, float xinv, int co0, const V4Smem& sm, const Chunk& ch,
                                                const LayerDims& d, const V4Dims& vd) {
    if (staged) {
        wgrad_gemm<PLANES, XPL>(dw, pitch, yinv * xinv, sm.own, sm.halo, 0, DIM_CPAD, sm.pix, ch, d, vd);
        return;
    }
    __syncthreads();  // the slab and own planes are free (and the pixel rows)
    fill_pixel_rows(sm.pix, ch, d, vd);
    stage_slab<true>(sm.own, vd.own_pstride, vd.own_plane_bytes, ysrc, ch, co0, CO_T, walk_passes_c(d, co0, CO_T), yscale, d);
    for (int c0 = 0; c0 < DIM_CPAD; c0 += vd.slab) {
        const int nch = min(vd.slab, DIM_CPAD - c0);
        if (c0 > 0) __syncthreads();
        stage_slab<XREAL>(sm.halo, vd.pstride, vd.plane_bytes, xsrc, ch, c0, nch, slabs_pass_c(d), xscale, d);
        __syncthreads();
        wgrad_gemm<PLANES, XPL>(dw, pitch, yinv * xinv, sm.own, sm.halo, c0, nch, sm.pix, ch, d, vd);
    }
}
