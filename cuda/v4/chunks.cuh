// v4/chunks.cuh — the work mapping: the chunks of a block's pixel range, and the accumulator
// elements a thread owns in a chunk (with their epilogue inputs loaded ahead). Part of
// backei_v4.cu: included inside its namespace v4, after the module's constants and types (not a
// header of its own).


// The chunks of this block's pixel range, in order: fn(chunk) for each.
template <class F>
__device__ __forceinline__ void for_each_chunk(const LayerDims& d, const V4Dims& vd, F fn) {
    const int HW = DIM_H * DIM_W;
    const long long total = (long long)d.B * HW;
    const int range = blockIdx.x / vd.groups;
    const long long start = total * range / vd.ranges, end = total * (range + 1) / vd.ranges;  // (sync.cuh's range_start)
    for (long long p = start; p < end;) {
        Chunk ch;
        ch.b = (int)(p / HW);
        ch.q0 = (int)(p - (long long)ch.b * HW);
        ch.len = (int)min((long long)P_CH, min(end - p, (long long)(HW - ch.q0)));
        ch.y_first = ch.q0 / DIM_W;
        fn(ch);
        p += ch.len;
    }
}

// fn(mi, ni, i, pixel within the sample, channel) for every accumulator element this thread owns
// in the chunk (pixels past the chunk and channels past C skipped).
template <class F>
__device__ __forceinline__ void for_each_owned(const Chunk& ch, int co0, const LayerDims& d, F fn) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int pm = (warp + WARPS * mi) * 16 + g + 8 * (i >> 1), c = co0 + 8 * ni + 2 * t + (i & 1);
                if (pm < ch.len && c < DIM_C) fn(mi, ni, i, ch.q0 + pm, c);
            }
}

// for_each_owned with the element's inputs loaded ahead: load(q, c) → X for E elements, then
// use(mi, ni, i, q, c, x) for each. The epilogues read several global words per element (the
// input, v_{t−1}, ∂L/∂s, fb, …) and write others; element by element, a load cannot move above
// the previous element's stores (the compiler cannot prove the buffers apart), so each element
// waited for its own round trip (SASS of the fashion L1 forward: load, compute, store, per
// element). E elements' loads are now issued before any store. E divides NT·4.
template <int E, class L, class U>
__device__ __forceinline__ void for_each_owned_loaded(const Chunk& ch, int co0, const LayerDims& d, L load, U use) {
    constexpr int J = NT * 4;  // a thread's elements per m-tile: (n-tile, accumulator register)
    static_assert(J % E == 0, "E divides NT·4");
    typedef decltype(load(0, 0)) X;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int j0 = 0; j0 < J; j0 += E) {
            X x[E];
            bool ok[E];
            int qs[E], cs[E];
#pragma unroll
            for (int k = 0; k < E; ++k) {
                const int ni = (j0 + k) >> 2, i = (j0 + k) & 3;
                const int pm = (warp + WARPS * mi) * 16 + g + 8 * (i >> 1), c = co0 + 8 * ni + 2 * t + (i & 1);
                ok[k] = pm < ch.len && c < DIM_C;
                qs[k] = ch.q0 + pm;
                cs[k] = c;
                x[k] = ok[k] ? load(qs[k], cs[k]) : X{};
            }
#pragma unroll
            for (int k = 0; k < E; ++k)
                if (ok[k]) use(mi, (j0 + k) >> 2, (j0 + k) & 3, qs[k], cs[k], x[k]);
        }
}
