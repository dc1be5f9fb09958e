// v4/chunks.cuh — the work mapping: the chunks of a block's pixel range, and the accumulator
// elements a thread owns in a chunk (with their epilogue inputs loaded ahead). Part of
// backei_v4.cu: included inside its namespace v4, after the module's constants and types (not a
// header of its own).


// The pixels of a chunk that starts at pixel q of its sample (at = its index in the batch, end the
// end of the block's range): up to P_CH, within the range, and within the sample — or, under
// CROSS, on into the next samples as far as the chunk's halo fits the planes' vd.halo_rows rows:
// its virtual rows (chunk_vq: R padding rows below each sample and above the next), from R above
// its first row to R below its last. A chunk within one sample always fits (the planes are sized
// for the tallest); one that spans samples ends early where its pixels would need more rows.
__device__ __forceinline__ int chunk_len(long long at, long long end, int q, const LayerDims& d, const V4Dims& vd) {
    const int HW = DIM_H * DIM_W, left = HW - q;
    const int n = (int)min((long long)P_CH, end - at);
    if (n <= left) return n;
    if (!CROSS) return left;
    // the virtual pixels below lim (rows y_first … y_first + halo_rows − 2R − 1) end in sample j,
    // at its pixel o (a virtual sample is (H + 2R)·W pixels, its first H·W its image's)
    const int lim = (q / DIM_W + vd.halo_rows - 2 * R) * DIM_W, vs = (DIM_H + 2 * R) * DIM_W;
    const int j = lim / vs, o = min(lim - j * vs, HW);
    return max(left, min(n, j * HW + o - q));
}

// The chunk that starts at pixel p of the batch (p < end, the end of the block's range).
__device__ __forceinline__ Chunk chunk_at(long long p, long long end, const LayerDims& d, const V4Dims& vd) {
    const int HW = DIM_H * DIM_W;
    Chunk ch;
    ch.b = (int)(p / HW);
    ch.q0 = (int)(p - (long long)ch.b * HW);
    ch.len = chunk_len(p, end, ch.q0, d, vd);
    ch.y_first = ch.q0 / DIM_W;
    const long long p_next = p + ch.len;
    const int q_next = ch.q0 + ch.len, j = q_next / HW;  // (the samples it passed: 0, or 1 at a sample's end unless CROSS)
    ch.next_len = p_next < end ? chunk_len(p_next, end, q_next - j * HW, d, vd) : 0;
    return ch;
}

// The chunks of this block's pixel range, in order: fn(chunk) for each.
template <class F>
__device__ __forceinline__ void for_each_chunk(const LayerDims& d, const V4Dims& vd, F fn) {
    const long long total = (long long)d.B * DIM_H * DIM_W;
    const int range = blockIdx.x / vd.groups;
    const long long start = total * range / vd.ranges, end = total * (range + 1) / vd.ranges;  // (sync.cuh's range_start)
    for (long long p = start; p < end;) {
        const Chunk ch = chunk_at(p, end, d, vd);
        fn(ch);
        p += ch.len;
    }
}

// The chunk after `ch` in this block's range, if there is one (the L2 prefetch of its halo): from
// the chunk's own fields (no division by the range count where the caller holds its registers).
__device__ __forceinline__ bool next_chunk(const Chunk& ch, const LayerDims& d, Chunk& next) {
    if (ch.next_len == 0) return false;
    const int HW = DIM_H * DIM_W, q = ch.q0 + ch.len;  // (past HW: in a later sample, or its start)
    const int j = q / HW;
    next.b = ch.b + j;
    next.q0 = q - j * HW;
    next.len = ch.next_len;
    next.y_first = next.q0 / DIM_W;
    next.next_len = 0;  // (not known here)
    return true;
}

// Whether the epilogues take the whole-tile path (for_each_owned_loaded): not for tiles of 64
// accumulators per thread — cifar10's 64-channel tiles, whose backward holds 249–255 registers
// already: the path's per-row addresses spilled there, and so did phase 2's ∂L/∂I select in the
// build with chunks that span samples (32 bytes, 17 instructions inside the chunk loop).
constexpr bool WHOLE_TILES = MT * NT * 4 <= 32;

// One accumulator element a thread owns in a chunk: its accumulator (acc[mi][ni][i]), its pixel q
// — an offset in sample b's [C][H][W] as elem_q gives it — and channel c, and o = c·H·W + q, its
// word in every [C][H][W] array from the chunk's sample's base (sb): the epilogues index their
// arrays by o from pointers formed once per chunk.
struct Owned {
    int mi, ni, i, q, c, o;
};

// The accumulator elements this thread owns in the chunk (pixels past the chunk and channels past
// C skipped), with their inputs loaded ahead: load(e) → X for E elements, then use(e, x) for each.
// The epilogues read several global words per element (the input, v_{t−1}, ∂L/∂s, fb, …) and write
// others; element by element, a load cannot move above the previous element's stores (the compiler
// cannot prove the buffers apart), so each element waited for its own round trip (SASS of the
// fashion L1 forward: load, compute, store, per element). E elements' loads are now issued before
// any store. E divides NT·4.
//
// Whole m-tiles (the tile's 16 pixels inside the chunk) take a path with no pixel test per element
// (and no channel test where C is a multiple of the channel tile), where `plain` allows (the
// caller's block-uniform choice; load_whole there: the same values as load without the caller's
// per-element branches): an element's o is one of the thread's two pixel rows' offsets plus a
// constant, (8·ni + (i & 1))·H·W, so each array's address is formed once per pixel row and every
// element's load and store takes its offset as an immediate. (SASS of the fashion L1 bf16
// backward, 2026-12-07, fifth session: phase 2's epilogue formed a 64-bit address per element and
// array — a wide multiply, shifts, carries, the array's base reloaded — and branched around each
// element for its bounds and its ∂L/∂s source: ~170 instructions per element, more than the
// chunk's GEMMs and staging together; docs/gpu.md "(i)".) A chunk's last, partial tile keeps the
// tests.
template <int E, class LW, class L, class U>
__device__ __forceinline__ void for_each_owned_loaded(const Chunk& ch, int co0, const LayerDims& d, bool plain, LW load_whole, L load, U use) {
    constexpr int J = NT * 4;  // a thread's elements per m-tile: (n-tile, accumulator register)
    static_assert(J % E == 0, "E divides NT·4");
    typedef decltype(load(Owned{})) X;
    const int HW = DIM_H * DIM_W;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // Where C is not a multiple of the channel tile (mnist's 15 and 40 channels in 16-channel
    // tiles; a constant in the GPU build), the whole path tests each element's channel — a test
    // per (n-tile, column), no pixel test — and nowhere else.
    const bool check_c = DIM_C % CO_T != 0;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
        const int pm0 = (warp + WARPS * mi) * 16 + g;  // the thread's pixels pm0 (h = 0) and pm0 + 8 (h = 1)
        const int cb = co0 + 2 * t;                    // its channels cb + 8·ni + (i & 1)
        if (WHOLE_TILES && plain && pm0 - g + 16 <= ch.len) {
            const int q0 = elem_q(ch.q0 + pm0, d), q1 = elem_q(ch.q0 + pm0 + 8, d);
            const int o0 = cb * HW + q0, o1 = cb * HW + q1;
            // pixel row by pixel row (element j: h = j / 2·NT, n-tile (j / 2) mod NT, i & 1 = j & 1),
            // so that a batch's addresses are one row's (the other row's not yet live: registers);
            // each (ni, i & 1)'s elements still come in the order (mi, h) — the bias sums' order
            auto whole = [&](int j) V4_INLINE_LAMBDA {
                const int h = j / (2 * NT), ni = (j >> 1) % NT, lo = j & 1, dc = 8 * ni + lo;
                return Owned{mi, ni, 2 * h + lo, h ? q1 : q0, cb + dc, (h ? o1 : o0) + dc * HW};
            };
#pragma unroll
            for (int j0 = 0; j0 < J; j0 += E) {
                X x[E];
#pragma unroll
                for (int k = 0; k < E; ++k) {
                    const Owned e = whole(j0 + k);
                    x[k] = !check_c || e.c < DIM_C ? load_whole(e) : X{};
                }
#pragma unroll
                for (int k = 0; k < E; ++k) {
                    const Owned e = whole(j0 + k);
                    if (!check_c || e.c < DIM_C) use(e, x[k]);
                }
            }
            continue;
        }
#pragma unroll
        for (int j0 = 0; j0 < J; j0 += E) {
            X x[E];
            bool ok[E];
            Owned es[E];
#pragma unroll
            for (int k = 0; k < E; ++k) {
                const int ni = (j0 + k) >> 2, i = (j0 + k) & 3;
                const int pm = pm0 + 8 * (i >> 1), c = cb + 8 * ni + (i & 1);
                ok[k] = pm < ch.len && c < DIM_C;
                const int q = elem_q(ch.q0 + pm, d);
                es[k] = Owned{mi, ni, i, q, c, c * HW + q};
                x[k] = ok[k] ? load(es[k]) : X{};
            }
#pragma unroll
            for (int k = 0; k < E; ++k)
                if (ok[k]) use(es[k], x[k]);
        }
    }
}

// The same where the whole tiles load as the others do (every epilogue but phase 2's).
template <int E, class L, class U>
__device__ __forceinline__ void for_each_owned_loaded(const Chunk& ch, int co0, const LayerDims& d, L load, U use) {
    for_each_owned_loaded<E>(ch, co0, d, true, load, load, use);
}

// How many elements the epilogues load ahead (for_each_owned_loaded's E). With one block of 8 warps
// per SM, the loads a thread has in flight are all that hides a trip to L2 or device memory
// (Nsight, 2026-12-04: global loads 29–40 % of the v4 kernels' stall samples). The epilogues take
// LOADS_AHEAD elements — 8 or 16, an m-tile's elements where it has fewer: 16–48 words in flight
// per thread — and the backward's phase 2, with six or seven words per element and the tile's
// accumulators live beside them, LOADS_AHEAD_PHASE2. SASS (sm_90, 2026-12-07, third session): no
// register spilled, no instance above 255 registers; whether it is faster is for a GPU run.
constexpr int LOADS_AHEAD = NT * 4 < 16 ? NT * 4 : 16;  // the forward's two epilogues (3 and 2 words per element)
constexpr int LOADS_AHEAD_PHASE3 = 8;                   // the backward's phase 3 (1 or 3 words per element)
// phase 2's: 8 elements (48–56 words) for tiles of up to 16 accumulators per thread, 4 for 32, 2 for 64
constexpr int LOADS_AHEAD_PHASE2 = MT * NT * 4 <= 16 ? 8 : (MT * NT * 4 <= 32 ? 4 : 2);

// fn(j, lo, hi) for each sample the chunk touches: its j-th (from sample b), pixels [lo, hi) of
// it (one sample unless CROSS).
template <class F>
__device__ __forceinline__ void for_each_sample_part(const Chunk& ch, const LayerDims& d, F fn) {
    const int HW = DIM_H * DIM_W, last_j = chunk_sample(ch.q0 + ch.len - 1, d);
    for (int j = 0; j <= last_j; ++j) fn(j, max(ch.q0 - j * HW, 0), min(ch.q0 + ch.len - j * HW, HW));
}

// The L2 prefetch of a chunk's epilogue inputs (V4_PREFETCH): the 128-byte lines that hold pixels
// q0 … q0 + len − 1 of this block's channels co0 … co0 + CO_T − 1 in a sample's [C][HW] planes at
// `sample`, requested before the chunk's GEMMs so that the epilogue's loads — a batch of elements
// at a time (LOADS_AHEAD…), each batch waiting on device memory otherwise (Nsight, 2026-12-04:
// global-load stalls 29–40 % of the v4 kernels' samples) — find them in L2. A run of len elements
// from any start touches at most ⌈len / per line⌉ + 1 lines; element l·(per line) lies in the run's
// l-th line, and the run's last element in its last: one prefetch each, always at an element of the
// run (never an address outside the array). A hint: no register held past it, nothing waits for it.
template <class T>
__device__ __forceinline__ void prefetch_owned_l2(const T* sample, const Chunk& ch, int co0, const LayerDims& d) {
    if (!V4_PREFETCH) return;
    constexpr int PER_LINE = 128 / sizeof(T);
    constexpr int LINES = (P_CH + PER_LINE - 1) / PER_LINE + 1;
    const int HW = DIM_H * DIM_W;
    const int runs = min(CO_T, DIM_C - co0);
    // the run of n pixels from pixel q in each channel plane of `base`
    auto lines = [&](const T* base, int q, int n) {
        for (int j = threadIdx.x; j < runs * LINES; j += THREADS) {
            const int cc = j / LINES, l = j - cc * LINES;
            if (l * PER_LINE < n + PER_LINE - 1) prefetch_l2(base + (long long)(co0 + cc) * HW + q + min(l * PER_LINE, n - 1));
        }
    };
    for_each_sample_part(ch, d, [&](int j, int lo, int hi) { lines(sample + (long long)j * DIM_C * HW, lo, hi - lo); });
}

// The L2 prefetch of the halo that the chunk after `ch` will stage from `src` (V4_PREFETCH): rows
// y_first − R … y_last + R (inside the image) of every channel of the next chunk's sample, one
// prefetch per 128 bytes of f32 (src.prefetch: each of its arrays' lines at that element; the
// byte-wide arrays get up to four per line), requested before this chunk's GEMMs so that the next
// chunk's staging walk — 16 loads in flight per thread, each a trip to device memory for the state
// the forward saved long before — finds them in L2. `src` addresses ch's sample; the next chunk's
// elements lie (next.b − ch.b)·C·H·W further (and, where it spans samples, the later samples'
// rows a sample further each). A warp per channel, a lane per line: no division.
template <class S>
__device__ __forceinline__ void prefetch_next_halo_l2(const S& src, const Chunk& ch, const LayerDims& d) {
    if (!V4_PREFETCH) return;
    Chunk nx;
    if (!next_chunk(ch, d, nx)) return;
    const int HW = DIM_H * DIM_W, N = DIM_C * HW;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // image rows y0 … y1 of every channel of the sample `at` elements from ch's
    auto rows = [&](int at, int y0, int y1) {
        const int run = (y1 - y0 + 1) * DIM_W;
        at += y0 * DIM_W;
        for (int c = warp; c < DIM_C; c += WARPS)
            for (int l = lane; l * 32 < run + 31; l += 32) src.prefetch(at + c * HW + min(l * 32, run - 1));
    };
    // each sample's rows of the halo: R above and below the rows of its pixels, inside the image
    const int at = (nx.b - ch.b) * N;
    for_each_sample_part(nx, d, [&](int j, int lo, int hi) {
        rows(at + j * N, max(lo / DIM_W - R, 0), min((hi - 1) / DIM_W + R, DIM_H - 1));
    });
}
