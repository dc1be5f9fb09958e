// v4/rowmax.cuh — the fp32 mode's operand scales from row maxima. Part of backei_v4.cu: included
// inside its namespace v4, after v4/halo.cuh (not a header of its own).
//
// In fp32 mode every real operand a chunk stages (v_t, dz_t, da_t) is scaled by the power of two
// of the largest |x| of the chunk's halo (halo_scale): a walk over every halo element — as many
// loads and nearly as many instructions as staging it (SASS, sm_90: 18–20 per element against
// 31–33), and for dz, computed on the fly, three or four loads per element. A halo is whole image
// rows (rows y_first − r … y_last + r, every column, every channel; zeros outside), so its max is
// the max of its rows' maxima. The kernel that writes a tensor therefore also writes, per
// (sample, image row), the max |x| over the row's channels and columns — the epilogue already
// holds each value — and a chunk's scale reads 2r + 1 + (rows of the chunk) words instead of
// walking the halo: the same max, so the same scale and the same bits (max is exact and does not
// depend on order; NaN is skipped as fmaxf skips it in the walk; +0 for no element, as the walk's
// zero padding gives). A row's maximum is the f32 bits of a non-negative float (they order as the
// floats), merged by atomicMax from every block holding a part of the row (a chunk's pixels, a
// channel group): the result does not depend on their order.
//
// Where the maxima live, `rowmax` [T + 2 + 2D][B][H] words (host twin: backei_v4.rs `rowmax_words`):
//   v_t     slot t           written by the forward's phase A of step t (every launch zeroes its
//                            window's slots first), read by phase B and by the backward's phase 2
//   da_t    slot T + t mod 2 written by phase 2 of step t, read by phase 3 of step t; phase 2 of
//                            step t zeroes the other slot, which phase 3 of step t + 1 has read and
//                            phase 2 of step t − 1 fills
//   dz_t    slot T + 2 + t mod 2D
//                            written by phase 3 of step t + D (with the feedback slot: dz_t =
//                            (∂L/∂s_t + fb_t)·H(v_t − θ)·sign′(z_t)), read by phase 2 of step t;
//                            phase 2 of step t zeroes slot (t − D) mod 2D, which phase 3 of step t
//                            fills and whose last reader was phase 2 of step t + D (two slots per
//                            delay step: the one being read and the one being filled differ)
// dz_t's maxima exist only where phase 3 of step t + D ran in the same launch (t + D < t1, and
// t ≥ t0 for its v and z): a step without them (the last D steps, back off, a window's edge)
// walks its halo as before. Nor do they exist where a thread's tile holds 64 accumulators (MT·NT·4
// > 32: cifar10 L2/L3): forming them keeps each element's ∂L/∂s, v and z in flight beside the tile
// in phase 3's epilogue, and ptxas then spilled per element (sm_90 fp32 backward, stack frame 72 B
// with them against 32 B without, 2026-12-05); those tiles walk dz's halo and keep v's and da's maxima.

#ifndef V4_ROWMAX
#define V4_ROWMAX 1
#endif
// (V4_ROWMAX = 0: every scale from the walk — what the emulator compares the maxima with)
constexpr bool ROWMAX = V4_ROWMAX && PREC == PREC_FP32;
constexpr bool DZ_ROWMAX = ROWMAX && MT * NT * 4 <= 32;  // dz's maxima (above)

// The [B][H] words of a tensor-step's row maxima.
__device__ __forceinline__ unsigned int* rowmax_v(unsigned int* base, const LayerDims& d, int t) {
    return base + (long long)t * d.B * DIM_H;
}
__device__ __forceinline__ unsigned int* rowmax_da(unsigned int* base, const LayerDims& d, int t) {
    return base + ((long long)d.T + (t & 1)) * d.B * DIM_H;
}
__device__ __forceinline__ unsigned int* rowmax_dz(unsigned int* base, const LayerDims& d, int t) {
    const int slots = 2 * d.D;
    return base + ((long long)d.T + 2 + ((t % slots) + slots) % slots) * d.B * DIM_H;
}

// Zeroes `slots` consecutive [B][H] slots from p, by every block (grid-stride), at a launch's
// start: phase 0's grid barrier orders it before the atomics. (Inside the time loop a slot is
// zeroed by its rows' owners: sync.cuh's zero_owned_rows.)
__device__ __forceinline__ void rowmax_zero(unsigned int* p, int slots, const LayerDims& d) {
    const long long n = (long long)slots * d.B * DIM_H;
    for (long long j = (long long)blockIdx.x * THREADS + threadIdx.x; j < n; j += (long long)gridDim.x * THREADS) p[j] = 0u;
}

// A thread's running max |x| of its owned elements in a chunk, per owned pixel: the accumulator
// layout gives lane (g, t) pixels g and g + 8 of each of its m-tiles (for_each_owned_loaded's i >> 1).
struct PixelMax {
    float m[MT][2];
    __device__ __forceinline__ PixelMax() {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) m[mi][0] = m[mi][1] = 0.0f;
    }
    __device__ __forceinline__ void add(int mi, int i, float x) { m[mi][i >> 1] = fmaxf(m[mi][i >> 1], fabsf(x)); }
    // Merges into the rows of the chunk's sample (rows: its [H] words; a chunk that spans samples
    // (CROSS) counts on into the later samples' rows, row (q0 + pm) / W): the 4 lanes of a pixel
    // (t = 0..3: its channels) first, then one atomicMax per pixel. Every lane of the warp calls it.
    __device__ __forceinline__ void commit(unsigned int* rows, const Chunk& ch, const LayerDims& d) const {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x = m[mi][h];
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
                const int pm = (warp + WARPS * mi) * 16 + g + 8 * h;
                if ((lane & 3) == 0 && pm < ch.len && x > 0.0f) atomicMax(rows + (ch.q0 + pm) / DIM_W, __float_as_uint(x));
            }
    }
};

// The largest row maximum of the chunk's halo rows (rows [y0, y0 + halo rows) inside the image) in
// each of N row arrays (rows[i]: a sample's [H] words, complete: written before the last grid
// barrier), with RB rows' loads per array in flight at once: a chunk's halo spans at most
// ⌈128·MT / W⌉ + 1 + 2R rows (8 at fashion-mnist L1), one batch, where the loop of one load per row
// took three round trips (NVRTC unrolled it by 4 after a remainder of up to 3, each remainder load
// waited for: SASS of the fashion L1 fp32 backward, 2026-12-07). Rows past the halo read as 0, which
// no maximum of magnitudes changes: the same maxima as one row at a time.
// A chunk that spans samples (CROSS) reads sample b's rows from y_first − R to its last, the next
// samples' rows, and its last sample's to y_last + R: one run of the [B][H] words, which hold no
// padding rows (row q / W of the chunk's pixel q counts on into the later samples' rows).
template <int N>
__device__ __forceinline__ void halo_rows_max(const unsigned int* const (&rows)[N], const Chunk& ch, const LayerDims& d, float (&m)[N]) {
    constexpr int RB = 8;
    const int H = DIM_H, last = (ch.q0 + ch.len - 1) / DIM_W;  // (≥ H: a row of a later sample)
    const int y0 = max(ch.y_first - R, 0), hi = min((CROSS ? last / H + 1 : 1) * H, last + R + 1) - y0;
#pragma unroll
    for (int i = 0; i < N; ++i) m[i] = 0.0f;
    for (int hy0 = 0; hy0 < hi; hy0 += RB) {
        unsigned int u[N][RB];
#pragma unroll
        for (int k = 0; k < RB; ++k)
#pragma unroll
            for (int i = 0; i < N; ++i) u[i][k] = hy0 + k < hi ? __ldcg(rows[i] + y0 + hy0 + k) : 0u;
#pragma unroll
        for (int k = 0; k < RB; ++k)
#pragma unroll
            for (int i = 0; i < N; ++i) m[i] = fmaxf(m[i], __uint_as_float(u[i][k]));
    }
}

// halo_scale from the rows of the chunk's halo. No barrier inside: every thread reads the few
// words itself.
__device__ __forceinline__ float rowmax_scale(const unsigned int* rows, const Chunk& ch, const LayerDims& d, float& inv) {
    const unsigned int* r[1] = {rows};
    float m[1];
    halo_rows_max<1>(r, ch, d, m);
    return pow2_scale(m[0], inv);
}

// Two tensors' rowmax_scale in one walk (phase 2: dz_t's and v_t's): the scale of a, and b's in
// sc_b, inv_b.
__device__ __forceinline__ float rowmax_scale_pair(const unsigned int* rows_a, const unsigned int* rows_b, const Chunk& ch, const LayerDims& d,
                                                   float& inv_a, float& sc_b, float& inv_b) {
    const unsigned int* r[2] = {rows_a, rows_b};
    float m[2];
    halo_rows_max<2>(r, ch, d, m);
    sc_b = pow2_scale(m[1], inv_b);
    return pow2_scale(m[0], inv_a);
}
