// v4/sync.cuh — ordering a step's phases across blocks, and the work each block owns outside its
// chunks. Part of backei_v4.cu: included inside its namespace v4, after v4/chunks.cuh (not a
// header of its own).
//
// A phase reads what other blocks wrote in the phases before it — the halos of s_{t−D}, v_t, dz_t
// and da_t, the feedback slot, the row maxima — and overwrites what other blocks read in the phase
// before it: da (one step), the slots of the feedback and dz rings, the row maxima's slots. Two
// ways to order that (V4_SYNC; host: `V4Plan::neighbour_sync`):
//   0  a grid barrier after every phase (backei_common.cuh's grid_sync): every block waits for the
//      slowest of all, and the whole grid's arrivals meet on one word (the H200 profile of
//      2026-12-04 put 19 % of the v4 backward's warp time at barriers, 11.6 % in their spin loops);
//   1  neighbour flags: after each phase a block publishes how many phases it has completed
//      (bar[1 + b], after a fence: a release) and starts its next phase once every block it
//      exchanges data with has published as many (each flag read, then a fence: an acquire).
// Who exchanges data. A chunk reads its halo — whole image rows of its sample (of its two samples
// where it spans them, V4_CROSS), from R rows above the rows its pixels lie on to R rows below,
// every channel — and those rows' maxima; it writes its
// own pixels' elements (in its channel group) and merges into its own rows' maxima. Two blocks
// therefore exchange data only if they own pixels within R rows of each other in one sample: a
// symmetric relation. Waiting for those partners' previous phase orders every read after the write
// it needs (made in an earlier phase) and every overwrite after the reads of what it replaces (made
// in the phase before: the rings' and da's slots are rewritten one phase after their last reader).
// The ranges are contiguous and in order, so a block's partners — every channel group of the ranges
// that meet its rows widened by R within the samples it spans — are one interval of block indices
// (itself included). Blocks further apart may drift apart by a phase per range between them; they
// exchange nothing. What the kernels did grid-stride between two barriers, a block now does for the
// elements it owns: the per-step zeroing of row-max slots (zero_owned_rows) and the fused pooling
// (pool_owned in backei_v4.cu) — the same work, split by ownership, in both modes.
// bar[0] stays the grid barrier of phase 0 (the weight fragments) and of the final reduction.

#ifndef V4_SYNC
#define V4_SYNC 0
#endif
// Tests only (tests/emu_v4.rs): publish the flags but never wait, so that the emulator's stalled
// blocks (EMU_BLOCK_STALLS, tests/emu/cuda_emu.h) show what a missing wait does.
#ifndef V4_SYNC_UNORDERED
#define V4_SYNC_UNORDERED 0
#endif

// The first pixel of range r in the flattened (sample, pixel) space (for_each_chunk's ranges).
__device__ __forceinline__ long long range_start(const LayerDims& d, const V4Dims& vd, int r) {
    return (long long)d.B * DIM_H * DIM_W * r / vd.ranges;
}

// What this block's ordering and owned work need, in shared memory (V4Smem::share), written once
// by block_share_init and read where it is used — a phase's end, the pooling, the zeroing — not
// held in registers across the time loop, where the widest tiles (cifar10 L2/L3, 255 registers)
// have none to spare (held there, the ranges' bounds, hoisted out of the loop by the compiler,
// made ptxas spill the cifar10 L2 forward).
struct BlockShare {
    long long start, end;  // the block's pixel range [start, end)
    int first, count;      // V4_SYNC: the partner blocks [first, first + count) (itself included)
    int pad[2];
};

// Fills `sh` (thread 0; the caller's next __syncthreads publishes it to the block).
__device__ __forceinline__ void block_share_init(BlockShare* sh, const LayerDims& d, const V4Dims& vd) {
    if (threadIdx.x != 0) return;
    const int range = blockIdx.x / vd.groups;
    const long long W = DIM_W, HW = (long long)DIM_H * DIM_W;
    const long long start = range_start(d, vd, range), end = range_start(d, vd, range + 1);
    sh->start = start;
    sh->end = end;
    sh->first = sh->count = 0;
    if (start < end) {  // (an empty range reads and writes nothing: it waits for no one)
        // the pixels its halos and rows reach: r rows either side, clipped to the samples it spans
        const long long lo = max((start / W - R) * W, start / HW * HW);
        const long long hi = min(((end - 1) / W + 1 + R) * W, ((end - 1) / HW + 1) * HW);
        int r0 = range, r1 = range;
        while (r0 > 0 && range_start(d, vd, r0) > lo) --r0;                 // range r0 − 1 ends past lo
        while (r1 + 1 < vd.ranges && range_start(d, vd, r1 + 1) < hi) ++r1;  // range r1 + 1 starts before hi
        sh->first = r0 * vd.groups;
        sh->count = (r1 - r0 + 1) * vd.groups;
    }
}

// The end of a phase: every block that reads or overwrites this phase's data, or wrote or read what
// the next phase overwrites or reads, has completed it too (V4_SYNC: the partners; else all). bar:
// [0] the grid barrier, [1 + b] the phases block b has completed; phase: this block's count.
__device__ __forceinline__ void phase_done(unsigned int* bar, const BlockShare* sh, unsigned int& phase) {
#if V4_SYNC
    ++phase;
    __syncthreads();  // the block's writes of the phase, before the release
    if (threadIdx.x == 0) {
        __threadfence();
        atomicExch(bar + 1 + blockIdx.x, phase);
    }
#if !V4_SYNC_UNORDERED
    const int first = sh->first, count = sh->count;
    for (int j = threadIdx.x; j < count; j += THREADS) {  // (one thread per partner's flag)
        const volatile unsigned int* f = bar + 1 + first + j;
        while (*f < phase) __nanosleep(32);
    }
    __threadfence();
#endif
    __syncthreads();
#else
    (void)sh;
    (void)phase;
    grid_sync(bar);
#endif
}

// Zeroes this block's words of a row-max slot ([B][H] words, word b·H + y: the flattened row): the
// rows whose first pixel lies in its range, by the range's group-0 block — each word by one block,
// a partner of every block that merges into it or reads it (they own pixels of that row or of rows
// within r of it). Ordered like any write: after the previous phase's readers, before the next
// phase's merges.
__device__ __forceinline__ void zero_owned_rows(unsigned int* slot, const BlockShare* sh, const LayerDims& d, const V4Dims& vd) {
    if (blockIdx.x % vd.groups != 0) return;
    const long long start = sh->start, end = sh->end;
    for (long long r = (start + DIM_W - 1) / DIM_W + threadIdx.x; r * DIM_W < end; r += THREADS) slot[r] = 0u;
}
