// v4/halo.cuh — the chunk's halo staged channel-last in shared memory: the walks over its
// elements (the row walk where a halo row fits in 32 columns, else the flat walk), the fp32 mode's
// scale pass, the slab staging. Part of backei_v4.cu: included inside its namespace v4, after the
// module's constants and types (not a header of its own).

// The chunk's halo: rows y_first − r … y_last + r, columns −r … W + r − 1 (zero outside the image
// and beyond C). src(idx) reads element idx of the sample's [C][H][W] (idx past C·H·W: a later
// sample's, where a chunk spans samples — CROSS: the halo's rows are the virtual image's, chunk_vq).
template <class Src>
__device__ __forceinline__ float halo_value(const Src& src, const Chunk& ch, const LayerDims& d, int c, int hy, int hx) {
    const int W = DIM_W, H = DIM_H;
    int shift;
    const int vy = ch.y_first + hy - R, gy = virtual_row(vy, shift, d), gx = hx - R;
    if (c >= DIM_C || gy < 0 || gy >= H || gx < 0 || gx >= W) return 0.0f;
    return src(c * (H * W) + vy * W + gx + shift);
}

// The rows of the chunk's halo (virtual rows, chunk_vq: 2R more per sample boundary it spans).
__device__ __forceinline__ int halo_rows_of(const Chunk& ch, const LayerDims& d) {
    return chunk_vq(ch, ch.len - 1, d) / DIM_W - ch.y_first + 1 + 2 * R;
}

// Staging is latency-bound unless many loads are in flight: a warp that loads one element and
// converts and stores it at once waits one L2 round trip (~600 cycles) per element — 32 per warp
// for a fashion-mnist chunk, several times the chunk's GEMM (SASS of the fashion L1 forward before
// this walk: one load per halo row, used by the next instruction, after a division by the runtime
// halo height). So every thread issues the loads of U elements before it uses any, and the
// walk over (channel, halo pixel) advances without division. The spike and v/da sources load one
// word per element; dz (phase 2) loads three or four (the feedback slot — ∂L/∂s + fb — or ∂L/∂s or
// the pooled gradient where the step has no slot, v, z), so it keeps
// fewer elements in flight (registers: the backward holds its accumulators across the slabs).
// U = 16 (8 until 2026-12-06, fourth session): with one block of 8 warps per SM, 16 KB in flight
// per SM instead of 8; the registers it takes stay below 255 without spills in every instance (the
// v4 kernels run one block per SM, so registers up to 255 cost no occupancy).
template <class Src>
struct StageBatch {
    static constexpr int U = 16;
};

// fn(off, x) for every element of channels [c0, c0 + nch) of the chunk's halo, x its value
// (halo_value) and off = e·pstride + c·EB its byte in a channel-last staging plane (c relative to
// c0, e = hy·(W + 2r) + hx its pixel within the halo; pstride 0 where the caller needs no place):
// the block's
// threads stride over the nch·hr·(W + 2r) elements plane-major (consecutive threads along a halo
// row: coalesced), each with StageBatch<Src>::U loads in flight. No barrier inside.
// (The general walk, for halo rows wider than 32 columns; for_each_halo_element takes the row
// walk below where a row fits.)
template <class Src, class F>
__device__ __forceinline__ void for_each_halo_element_flat(const Src& src, const Chunk& ch, const LayerDims& d, int c0, int nch, int pstride, F fn) {
    constexpr int U = StageBatch<Src>::U;
    const int HS = DIM_W + 2 * R, pl = halo_rows_of(ch, d) * HS, total = nch * pl;
    // the walk's divisions, once: where a thread starts, and a stride of THREADS as whole planes
    // (dc) and a remainder (de)
    int c = threadIdx.x / pl, e = threadIdx.x - c * pl;
    const int dc = THREADS / pl, de = THREADS - dc * pl;
    for (int j = threadIdx.x; j < total; j += U * THREADS) {
        float x[U];
        int cs[U], es[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            cs[u] = c;
            es[u] = e;
            const int hy = e / HS, hx = e - hy * HS;  // HS: a constant in the GPU build
            x[u] = j + u * THREADS < total ? halo_value(src, ch, d, c0 + c, hy, hx) : 0.0f;
            e += de;
            c += dc;
            if (e >= pl) {  // (a select, not a branch)
                e -= pl;
                ++c;
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (j + u * THREADS < total) fn(es[u] * pstride + cs[u] * EB, x[u]);
    }
}

// Whether a walk over channels [c0, c0 + nch) meets channels at and past C (zeros, never loaded):
// an own-plane walk of a channel group wider than the channels left, or any walk where C is not a
// multiple of 16. Slab walks and the scale pass end at c_pad, which is C where C is a multiple of
// 16 (slabs_pass_c: a constant in the GPU build, so the row walk drops its channel tests there).
__device__ __forceinline__ bool slabs_pass_c(const LayerDims& d) {
    return DIM_C % 16 != 0;
}
__device__ __forceinline__ bool walk_passes_c(const LayerDims& d, int c0, int nch) {
    return slabs_pass_c(d) || c0 + nch > DIM_C;
}

// Both elements of a row-walk item, channels c and c + 1 of one pixel (element `at` of the sample's
// [C][H][W] and the one HW words on), each where its flag says, else 0: the general form
// (IndexCursor's), which calls src twice; readers of one array (V4Plain, V4Spikes) read through
// ArrayCursor instead.
template <class Src>
__device__ __forceinline__ float2 src_pair(const Src& src, unsigned at, int HW, bool ok0, bool ok1) {
    return make_float2(ok0 ? src(at) : 0.0f, ok1 ? src(at + (unsigned)HW) : 0.0f);
}

// Where the row walk reads a batch of items: a position in the sample's [C][H][W] and the items'
// offsets from it (compile-time constants in the GPU build: rows rpp·W words apart, channel
// octets 8·HW). The general form keeps the element index and reads through src_pair; readers of one
// array (V4Plain, V4Spikes: halo_cursor's overloads beside them in backei_v4.cu) keep a pointer,
// so that an item's loads take their offsets as the load instruction's immediate (ArrayCursor),
// where the walk of 2026-12-06 formed each item's address from the source's base: the kernel
// parameter reloaded, the sample's 64-bit offset added, then scaled — five instructions per item.
template <class Src>
struct IndexCursor {
    const Src& src;
    unsigned at;
    __device__ __forceinline__ float2 pair(int delta, int HW, bool ok0, bool ok1) const {
        return src_pair(src, at + (unsigned)delta, HW, ok0, ok1);
    }
};
template <class Src>
__device__ __forceinline__ IndexCursor<Src> halo_cursor(const Src& src, int at) {
    return IndexCursor<Src>{src, (unsigned)at};
}
// A pointer into one array of T (f32, or the int8 spikes), read with __ldcg (L2: the layer's own
// writes of this launch, never a stale L1 line).
template <class T>
struct ArrayCursor {
    const T* q;
    __device__ __forceinline__ float2 pair(int delta, int HW, bool ok0, bool ok1) const {
        const T* p = q + delta;
        return make_float2(ok0 ? (float)__ldcg(p) : 0.0f, ok1 ? (float)__ldcg(p + HW) : 0.0f);
    }
};

// No second operand: the one-source walks' partner in for_each_halo_row_items (loads nothing;
// the compiler drops it).
struct NoSrc {};
struct NoCursor {
    __device__ __forceinline__ float2 pair(int, int, bool, bool) const { return make_float2(0.0f, 0.0f); }
};
__device__ __forceinline__ NoCursor halo_cursor(const NoSrc&, int) { return NoCursor{}; }
template <class S>
struct IsNoSrc {
    static constexpr bool value = false;
};
template <>
struct IsNoSrc<NoSrc> {
    static constexpr bool value = true;
};

// The same walk by halo rows, where a row (W + 2r ≤ 32) fits in four warps' lanes (row walk).
// A warp's 32 lanes take 8 neighbouring halo columns × 4 channel pairs (lane = 8·pair + column):
// a staging store of the warp then falls in 32 different banks (a pixel's stride, pstride, is an
// odd multiple of 16 bytes, so 8 neighbouring pixels start in 8 different 4-bank groups, and the
// 4 pairs take the 4 banks of each), where one lane per column and one channel per warp (the
// first row walk, and the flat walk) put 4 lanes on each bank: 4 shared wavefronts per store (the
// 2026-12-04 profile: 80 % of the bf16 backward's shared-store wavefronts were conflicts). The
// loads stay whole 32-byte sectors (8 columns of one channel). A row of 8 channels takes 1, 2 or
// 4 warps (8·nb ≥ W + 2r columns); each thread keeps its halo column and channel pair for the
// whole walk and takes its halo rows (rpp apart: the rows the block covers at once) and, in each,
// the two channel octets of a 16-channel group, RB rows per batch: an item — two elements, channels
// c and c + 1 of one pixel — costs two loads at constant offsets from the batch's pointer (the
// loads' immediates), a share of its row's bounds test, and one store per plane, where the flat
// walk divides by the row's width, tests five bounds and multiplies out both addresses per
// element. nch is a multiple of 16 (slabs, CO_T). Same elements, same values, the same pair calls:
// only the order in which the block's threads make them differs. pair(off, x0, x1) takes both
// elements of an item at once (one store per plane: store_operand_pair); with a second source b
// (not NoSrc) of the same halo geometry, pair(off, a0, a1, b0, b1) takes both sources' items and
// both sources' loads of a batch are in flight together — the backward's convolution operand and
// its weight gradient's X, staged before one barrier (stage_slab_pair).
//
// check_c: whether channels at or past C can occur (a walk that ends past C: an own-plane walk of a
// channel group wider than the channels left, or any walk where C is not a multiple of 16); where
// the GPU build knows it cannot (a constant false after inlining) the channel index and its tests
// drop out of the loop, and both elements of an item load under one predicate — from one address
// (the second a constant offset away, HW words, folded into the load instruction).
template <class SrcA, class SrcB, class G>
__device__ __forceinline__ void for_each_halo_row_items(const SrcA& a, const SrcB& b, const Chunk& ch, const LayerDims& d, int c0, int nch,
                                                        int pstride, bool check_c, G pair) {
    // halo rows per batch: 2·RB items (two channel octets of each row) of each source
    constexpr int RA = StageBatch<SrcA>::U / 4 > 0 ? StageBatch<SrcA>::U / 4 : 1;
    constexpr int RBB = StageBatch<SrcB>::U / 4 > 0 ? StageBatch<SrcB>::U / 4 : 1;
    constexpr int RB = IsNoSrc<SrcB>::value || RA < RBB ? RA : RBB;
    const int W = DIM_W, H = DIM_H, HS = W + 2 * R, HW = H * W;
    const int hr = halo_rows_of(ch, d);
    const int lnb = HS <= 8 ? 0 : (HS <= 16 ? 1 : 2);  // log2 of the warps per row
    const int rpp = WARPS >> lnb;                      // rows the block covers at once: a thread's rows are rpp apart
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hx = (lane & 7) + 8 * (warp & ((1 << lnb) - 1)), gx = hx - R, cp = 2 * (lane >> 3);
    const bool lane_on = hx < HS;                  // columns past the row's end: no element
    const bool in_x = (unsigned)gx < (unsigned)W;  // else the zero padding's column
    // this thread's halo rows row0, row0 + rpp, … below hr (rpp: a power of two, a constant in the
    // GPU build: the walk's only division is a shift)
    const int row0 = warp >> lnb;
    const int mine = row0 < hr ? (hr - row0 + rpp - 1) / rpp : 0;
    const int gy0 = ch.y_first - R + row0;  // the image row of its first
    // an item's byte in the staging plane, (hy·HS + hx)·pstride + c·EB
    const int row_bytes = HS * pstride, drow = rpp * row_bytes;
    const int off0 = row0 * row_bytes + hx * pstride + cp * EB;
    for (int c16 = 0; c16 < nch; c16 += 16) {
        for (int i = 0; i < mine; i += RB) {
            // channel c0 + c16 + cp (+ 8 for the second octet), image row gy0 + (i + u)·rpp
            const int at = (c0 + c16 + cp) * HW + (gy0 + i * rpp) * W + gx;
            const auto ca = halo_cursor(a, at);
            const auto cb = halo_cursor(b, at);
            float x[RB][2][2], y[RB][2][2];
#pragma unroll
            for (int u = 0; u < RB; ++u) {
                // image row gy of sample b, or (CROSS) virtual row gy: an image row of a later
                // sample, whose words lie `next` further than gy's would in sample b's
                int next;
                const int gy = virtual_row(gy0 + (i + u) * rpp, next, d);
                const bool ok = in_x & (i + u < mine) & ((unsigned)gy < (unsigned)H);
#pragma unroll
                for (int o = 0; o < 2; ++o) {
                    const int c = c0 + c16 + 8 * o + cp;
                    const bool ok0 = ok & (!check_c | (c < DIM_C)), ok1 = ok & (!check_c | (c + 1 < DIM_C));
                    const float2 xa = ca.pair(u * rpp * W + 8 * o * HW + next, HW, ok0, ok1);
                    x[u][o][0] = xa.x;
                    x[u][o][1] = xa.y;
                    const float2 xb = cb.pair(u * rpp * W + 8 * o * HW + next, HW, ok0, ok1);  // (NoCursor: zeros)
                    y[u][o][0] = xb.x;
                    y[u][o][1] = xb.y;
                }
            }
            if (lane_on) {
                const int off = off0 + i * drow + c16 * EB;
                if (i + RB <= mine) {  // a whole batch: no tests
#pragma unroll
                    for (int u = 0; u < RB; ++u)
#pragma unroll
                        for (int o = 0; o < 2; ++o) pair(off + u * drow + 8 * o * EB, x[u][o][0], x[u][o][1], y[u][o][0], y[u][o][1]);
                } else {
#pragma unroll
                    for (int u = 0; u < RB; ++u)
                        if (i + u < mine)
#pragma unroll
                            for (int o = 0; o < 2; ++o) pair(off + u * drow + 8 * o * EB, x[u][o][0], x[u][o][1], y[u][o][0], y[u][o][1]);
                }
            }
        }
    }
}

// The row walk over one source: pair(off, x0, x1).
template <class Src, class G>
__device__ __forceinline__ void for_each_halo_row_element(const Src& src, const Chunk& ch, const LayerDims& d, int c0, int nch, int pstride,
                                                          bool check_c, G pair) {
    for_each_halo_row_items(src, NoSrc{}, ch, d, c0, nch, pstride, check_c, [&](int off, float x0, float x1, float, float) { pair(off, x0, x1); });
}

// Whether a halo row fits the row walk's four warps of lanes (W + 2r ≤ 32; a constant in the GPU
// build), else the flat walk.
__device__ __forceinline__ bool row_walk_fits(const LayerDims& d) {
    return DIM_W + 2 * R <= 32;
}

// fn(off, x) for every element, or pair(off, x0, x1) for channels c, c + 1 of a pixel at once:
// the row walk where a halo row fits (row_walk_fits), else the flat walk.
// check_c: the walk may meet channels past C (walk_passes_c, slabs_pass_c).
template <class Src, class F, class G>
__device__ __forceinline__ void for_each_halo_element(const Src& src, const Chunk& ch, const LayerDims& d, int c0, int nch, int pstride,
                                                      bool check_c, F fn, G pair) {
    // (every caller's nch is a multiple of 16: a slab, CO_T, c_pad)
    if (row_walk_fits(d)) {
        for_each_halo_row_element(src, ch, d, c0, nch, pstride, check_c, pair);
    } else {
        for_each_halo_element_flat(src, ch, d, c0, nch, pstride, fn);
    }
}

// The scale of a real operand in fp32 mode: the power of two for the largest |x| of the chunk's
// whole halo (every channel: one scale for all the slabs one accumulator sums). Returns it, its
// inverse in `inv`; 1 for exact operands and in the other modes. Block-uniform (barriers inside).
// (The max is exact and the same in any order: the walk's order does not change the scale.)
template <bool REAL, class Src>
__device__ __forceinline__ float halo_scale(const Src& src, const Chunk& ch, const LayerDims& d, float* red, float& inv) {
    inv = 1.0f;
    if (!(REAL && PREC == PREC_FP32)) return 1.0f;
    float m = 0.0f;
    // (c_pad channels: a multiple of 16, as the row walk wants; those past C are zeros)
    const int cpad = (DIM_C + 15) / 16 * 16;
    for_each_halo_element(
        src, ch, d, 0, cpad, 0, slabs_pass_c(d), [&](int, float x) { m = fmaxf(m, fabsf(x)); },
        [&](int, float x0, float x1) { m = fmaxf(m, fmaxf(fabsf(x0), fabsf(x1))); });
    return pow2_scale(block_max(m, red), inv);
}

// Stages channels [c0, c0 + nch) of the chunk's halo channel-last into `planes` (channel c0 at
// byte 0 of a pixel's row of `pstride` bytes; REAL operands in fp32 mode as hi and lo planes
// `plane_bytes` apart, scaled by `scale`). The caller syncs before the planes are read. check_c:
// the walk may meet channels past C (walk_passes_c; slabs_pass_c for a slab of c_pad's).
template <bool REAL, class Src>
__device__ __forceinline__ void stage_slab(char* planes, int pstride, int plane_bytes, const Src& src, const Chunk& ch, int c0, int nch,
                                           bool check_c, float scale, const LayerDims& d) {
    for_each_halo_element(
        src, ch, d, c0, nch, pstride, check_c, [&](int off, float x) { store_operand<REAL>(planes + off, plane_bytes, x, scale); },
        [&](int off, float x0, float x1) { store_operand_pair<REAL>(planes + off, plane_bytes, x0, x1, scale); });
}

// Stages two operands of the chunk's halo, channels [c0, c0 + nch) of each, in one walk: A into
// `planes_a`, B into `planes_b`, with one geometry (pstride, plane_bytes; hi and lo planes where
// an operand is REAL in fp32 mode), both loads of a batch in flight together. The backward stages
// its convolution's operand (dz, da: the weight gradient's dY too, dy_shares_slab) and the weight
// gradient's X (v_t, s_{t−D}) so, before one barrier, where it staged them a GEMM and an epilogue
// apart, each walk waiting on its own loads. Where a halo row is wider than 32 columns (the flat
// walk) the two walks run one after the other. The caller syncs before the planes are read.
template <bool AREAL, bool BREAL, class SrcA, class SrcB>
__device__ __forceinline__ void stage_slab_pair(char* planes_a, char* planes_b, int pstride, int plane_bytes, const SrcA& a, float scale_a,
                                                const SrcB& b, float scale_b, const Chunk& ch, int c0, int nch, bool check_c,
                                                const LayerDims& d) {
    if (row_walk_fits(d)) {
        for_each_halo_row_items(a, b, ch, d, c0, nch, pstride, check_c, [&](int off, float a0, float a1, float b0, float b1) {
            store_operand_pair<AREAL>(planes_a + off, plane_bytes, a0, a1, scale_a);
            store_operand_pair<BREAL>(planes_b + off, plane_bytes, b0, b1, scale_b);
        });
    } else {
        stage_slab<AREAL>(planes_a, pstride, plane_bytes, a, ch, c0, nch, check_c, scale_a, d);
        stage_slab<BREAL>(planes_b, pstride, plane_bytes, b, ch, c0, nch, check_c, scale_b, d);
    }
}
