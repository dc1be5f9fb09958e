// gemm_tc.cu — the feed-forward layers' GEMMs on tensor cores: every convolution (forward, data
// gradient, weight gradient) as an implicit GEMM (no column buffer) and every linear layer, in
// the precision of --precision. Host side: src/gpu/gemm_tc.rs (the descriptors of each op, the
// grid, split-K); callers src/gpu/conv.rs, src/gpu/linear.rs; CPU twins src/cpu/conv.rs and
// src/cpu/linear.rs.
//
// One kernel computes C[m][n] = Σ_k A[m][k] · B[k][n] for any of these ops, because each operand's
// element address is SEPARABLE: addr(mn, k) = off(mn) + off(k), with an optional spatial bounds
// check on y(mn) + y(k), x(mn) + x(k) (the zero padding of a convolution). An IndexMap says how an
// index maps to (off, y, x):
//   LINEAR        i → (i·stride, 0, 0)
//   SAMPLE_PIXEL  i = (s, p), p = (y, x) on a map `width` wide → (s·stride + y·row_stride + x, y, x)
//   CHANNEL_TAP   i = (c, tap), tap = (ky, kx) of a k×k kernel → (c·stride + y·row_stride + x, y, x)
//                 with y = sign·(ky − origin), x = sign·(kx − origin)
// so that, for a convolution of geometry (cin, cout, H, W, k, pad, ho, wo) over S samples:
//   forward       C[co][(s,p)]   = Σ_(ci,tap) W[co][ci][tap] · X[s][ci][p + tap − pad]
//   data grad.    C[ci][(s,q)]   = Σ_(co,tap) W[co][ci][tap] · dY[s][co][q + pad − tap]
//   weight grad.  C[co][(ci,tap)] = Σ_(s,p) dY[s][co][p] · X[s][ci][p + tap − pad]
// and for a linear layer (rows r = T·B, W [out][in]): y = x·Wᵀ, dx = dy·W, dW = dyᵀ·x. An operand
// may carry a column of ones after its last index ("ones"): the weight gradients' GEMMs then give
// the bias gradient Σ dY as column N (written to `ones_out`, added).
//
// Tiles: a block of 128 threads (4 warps) computes a 64×64 tile of C (2×2 warps), or a 32×128 one
// (1×4: where M ≤ 32), in k-steps of 32; each warp a 32×32 tile (2 m16 × 4 n8 mma tiles). Or a
// block of 256 threads (8 warps as 2×4) a 128×128 tile, each warp 64×32 (4 m16 × 4 n8): each
// staged element then feeds twice the products (large GEMMs), or a 64×128 tile of 32×32 warps
// (opt-in, both: BIG and MID below). Per
// k-step the block fills tables of the step's 32 k indices (and, once, of its m and n indices)
// in shared memory, loads its A and B tiles
// from global memory through them (coalesced along the operand's contiguous index: `k_fast`), converts
// them to the precision's operands and stores them [mn][k] in shared memory, rows padded so that
// the fragment loads of a warp hit 32 different banks. The weight gradients' K (every pixel of every
// sample) is split over blockIdx.z; each split writes its partial tile to `partial` and
// gemm_tc_reduce_f32 adds the splits in a fixed order: bit-reproducible, no float atomics.
//
// Precision (src/precision.rs); every sum is f32 in every mode:
//   fp32: an operand x is scaled by S = 2^(13 − e), e the exponent of the operand's largest |x|
//         (absmax_f32, before the GEMM), and split into fp16 hi + lo (Ootomo & Yokota 2022; see
//         split_f16): A·B = (hi_a·hi_b + hi_a·lo_b + lo_a·hi_b)/(S_a·S_b), three m16n8k16 products
//         (the dropped lo·lo is below f32's rounding). An operand marked `exact` (spikes, and
//         averages of spikes scaled by powers of two: exact in fp16) is not scaled and has no lo
//         half, so spike × real takes two products.
//   tf32: one m16n8k8 TF32 product (the operand rounded to 10 mantissa bits, f32's range).
//   bf16: one m16n8k16 bf16 product (7 mantissa bits, f32's range).
// Layout: every tensor f32 as the CPU engine's (time-major [T][B][C][H][W], weights [out][in…]).
#include "common.cuh"
#include "grid_digits.cuh"
#include "mma.cuh"

// Block tiles: 4 warps of 32×32, as 2×2 (a 64×64 tile: SQUARE) or 1×4 (32×128: WIDE, for M ≤ 32,
// where a 64-row tile would issue half its MMAs on padding — fashion-mnist's conv2 data gradient
// has M = 32 input channels); or 8 warps of 64×32 as 2×4 (128×128: BIG, for large GEMMs: per
// k-step a thread stages as many elements as on a square tile — 32 — for twice the MMAs), or 8
// warps of 32×32 as 2×4 (64×128: MID, 24 elements a thread for a square tile's MMAs). The host
// picks the shape (src/gpu/gemm_tc.rs TileShape); the sums are the same in every shape (each
// output's products in the same k order), so the bits are too.
#define TC_BK 32
#define TC_THREADS 128
#define TC_THREADS_BIG 256
// blocks per SM the 256-thread kernels (big and mid) are built for: one, so that a thread may hold
// up to 255 registers (src/gpu/gemm_tc.rs TileShape::blocks_per_sm says the same)
#define TC_MIN_BLOCKS_256 1
// shared-memory rows: 16-bit operands 32 + 8 halves (20 words), 32-bit ones 32 + 4 words
#define TC_ROW16 40
#define TC_ROW32 36
// words of an operand's tile buffer of R rows: two 16-bit planes (hi, lo), or one 32-bit plane
#define TC_TILE_WORDS(R) ((R) * TC_ROW16)

#define IDX_LINEAR 0
#define IDX_SAMPLE_PIXEL 1
#define IDX_CHANNEL_TAP 2

#define PREC_FP32 0
#define PREC_TF32 1
#define PREC_BF16 2

// Host twins: the #[repr(C)] structs of src/gpu/gemm_tc.rs, field for field.
struct IndexMap {
    long long stride;  // LINEAR: element stride; SAMPLE_PIXEL: sample stride; CHANNEL_TAP: channel stride
    int kind;          // IDX_*
    int count;         // valid indices are [0, count)
    int per;           // SAMPLE_PIXEL: pixels per sample; CHANNEL_TAP: taps per channel (k²)
    int width;         // SAMPLE_PIXEL: the map's width; CHANNEL_TAP: the kernel's width k
    int row_stride;    // SAMPLE_PIXEL, CHANNEL_TAP: the memory stride of one row
    int origin;        // CHANNEL_TAP: y = sign·(ky − origin)
    int sign;          // CHANNEL_TAP: +1 or −1
    unsigned per_mul, per_shr, width_mul, width_shr;  // fast_div's magic numbers of per and width
    int pad_;          // (keeps the size a multiple of 8)
};

// n / d for 0 ≤ n < 2^31 as a multiply-high and a shift (CUTLASS's FastDivmod; the host computes
// mul and shr: src/gpu/gemm_tc.rs FastDiv, whose `div` is this function's twin): the index tables
// are rebuilt every k-step, on the path between two barriers, where an integer division by a
// run-time value costs a ~20-instruction sequence (the SASS showed 4 of them in the loop).
__device__ __forceinline__ int fast_div(int n, int d, unsigned mul, unsigned shr) {
    return d == 1 ? n : (int)(__umulhi((unsigned)n, mul) >> shr);
}

struct Operand {
    const float* p;
    IndexMap mn, k;
    int sp_h, sp_w;  // spatial bounds of y(mn) + y(k), x(mn) + x(k); 0: no check
    int ones;        // index mn.count of the mn side is a column of ones
    int exact;       // fp32 mode: exact in fp16 unscaled (no lo half, scale 1)
    int k_fast;      // load with consecutive threads along k (k is the contiguous index)
    int scale_slot;  // fp32 mode: maxbits[scale_slot] holds the operand's largest |x| (−1: scale 1)
    int q8;          // p holds one-byte codes c (int8), the element being c · q8_factor (see Q8 below)
    float q8_factor;
};

// Q8 operands: pooled spikes stored as int8 codes (pool.cu, dropout.cu and backei_v4.cu's fused
// pooling write them; src/gpu/memory.rs decides where). The code of a 2×2 average of spikes s ∈
// {−1, 0, 1} is c = Σ s (with a dropout between: Σ over the kept ones) and the f32 value the f32
// kernels write is c · q8_factor exactly (q8_factor = 1/4, or scale/4 with a power-of-two dropout
// scale), so a GEMM reading the codes gets the bits of one reading f32. A loaded code travels as
// its int bits in the f32 register (the load sign-extends; nothing to wait for) and is decoded
// when staged; the ones column as Q8_ONE, a value no code has.
#define Q8_ONE 0x40000000
// The ones column of an f32 operand travels as this NaN (a payload no arithmetic makes: a real NaN
// in the data reaches the result either way), so that staging can tell it from a real 1: fp32
// mode stages it unscaled — an exact 1 in fp16 — and the epilogue unscales its column by the other
// operand's factor alone. (Scaled like the operand, 1 · S overflowed fp16 to inf whenever the
// operand's largest |x| was below 1/4, S = 2^(13 − e) ≥ 2^16: NaN bias gradients, found on an
// H200 in a smooth-mode step whose linear layers' inputs stay below 1/4; and for a largest |x|
// beyond 2^37, 1 · S would have vanished.)
#define F32_ONE 0x7FC00BE1u

struct Output {
    float* p;
    IndexMap m, n;
    const float* bias;  // added per m (bias_on 1) or per n (bias_on 2)
    float* ones_out;    // where column N (the ones column's result) goes, added, per m
    int bias_on;
    int accumulate;     // C is added to the output (else written)
};

struct GemmDesc {
    Operand a, b;
    Output out;
    float* partial;  // [splits][M][ncols] when splits > 1
    int M, N, K;     // N excludes the ones column
    int splits;      // blockIdx.z ranges over them
    int kt_per_split;
    int pad_;
};

#ifdef TC_PIN
// Analysis only (src/gpu/gemm_tc.rs pin_defines, for the static check; never in a module the
// engine loads): one op's operand modes fixed at compile time — TC_PIN_A and TC_PIN_B are
// "k_fast, q8, exact, ones, spatial check, mn map kind, k map kind" — so that the k-tile loop's
// SASS is the path that op runs. The generic kernel's loop holds every path side by side, which
// a static count cannot tell apart.
__device__ __forceinline__ void pin(Operand& o, int k_fast, int q8, int exact, int ones, int spatial, int mn_kind, int k_kind) {
    o.k_fast = k_fast;
    o.q8 = q8;
    o.exact = exact;
    o.ones = ones;
    if (!spatial) o.sp_h = o.sp_w = 0;
    o.mn.kind = mn_kind;
    o.k.kind = k_kind;
}
__device__ __forceinline__ GemmDesc pinned(GemmDesc d) {
    pin(d.a, TC_PIN_A);
    pin(d.b, TC_PIN_B);
    return d;
}
#define TC_DESC(d) pinned(d)
#else
#define TC_DESC(d) (d)
#endif

// One index's place: its offset (which may be negative: a tap left of or above the centre) and
// its (y, x) — 16 bytes, read with one shared load. An index outside [0, count) has y =
// ENT_INVALID_Y, the ones column x = ENT_ONES_X (off 0 for both): no valid entry comes near either
// (the host keeps every map's width and height below 2^27: GemmDesc::validate), so each fails the
// bounds test of `Bounds` on its own (the SASS of the kind-tagged entries this replaced had ~3
// branches and a convergence barrier per element).
struct __align__(16) Ent {
    long long off;
    int y, x;
};

#define ENT_INVALID_Y (-(1 << 29))
#define ENT_ONES_X (1 << 29)

__device__ __forceinline__ Ent index_entry(const IndexMap& im, int i, int ones) {
    Ent e;
    e.off = 0;
    e.y = 0;
    e.x = 0;
    if (i >= im.count) {
        if (ones && i == im.count) e.x = ENT_ONES_X;
        else e.y = ENT_INVALID_Y;
        return e;
    }
    if (im.kind == IDX_LINEAR) {
        e.off = (long long)i * im.stride;
    } else if (im.kind == IDX_SAMPLE_PIXEL) {
        const int s = fast_div(i, im.per, im.per_mul, im.per_shr), p = i - s * im.per;
        e.y = fast_div(p, im.width, im.width_mul, im.width_shr);
        e.x = p - e.y * im.width;
        e.off = (long long)s * im.stride + (long long)e.y * im.row_stride + e.x;
    } else {
        const int c = fast_div(i, im.per, im.per_mul, im.per_shr), t = i - c * im.per;
        const int ky = fast_div(t, im.width, im.width_mul, im.width_shr), kx = t - ky * im.width;
        e.y = im.sign * (ky - im.origin);
        e.x = im.sign * (kx - im.origin);
        e.off = (long long)c * im.stride + (long long)e.y * im.row_stride + e.x;
    }
    return e;
}

// What an operand's pointer points at: f32 elements, or Q8 codes.
template <bool Q8>
struct ElemPtr {
    typedef const float* T;
};
template <>
struct ElemPtr<true> {
    typedef const signed char* T;
};

// The element at `q`: its f32 value, or a Q8 code's int bits (decoded by `decode`).
template <bool Q8>
__device__ __forceinline__ float load_elem(typename ElemPtr<Q8>::T q) {
    return Q8 ? __int_as_float((int)*q) : (float)*q;
}
template <bool Q8>
__device__ __forceinline__ float load_at(const Operand& o, long long at) {
    return load_elem<Q8>(reinterpret_cast<typename ElemPtr<Q8>::T>(o.p) + at);
}

// Where an operand's elements are valid: (unsigned)(y(mn) + y(k) + bias) < span_y, and so for x.
// With a spatial check: bias 0, spans the map's height and width (the zero padding fails it).
// Without: bias 2^28, spans 2^29, a window every valid entry's sum lies in (the host keeps each
// map's width and height below 2^27) and neither sentinel's does — one formula either way, so the
// test is two 3-input adds and two compares, and the load is predicated, not branched around.
struct Bounds {
    int bias;
    unsigned span_y, span_x;
};
__device__ __forceinline__ Bounds bounds_of(const Operand& o) {
    Bounds b;
    b.bias = o.sp_h ? 0 : (1 << 28);
    b.span_y = o.sp_h ? (unsigned)o.sp_h : (1u << 29);
    b.span_x = o.sp_h ? (unsigned)o.sp_w : (1u << 29);
    return b;
}

// The operand's element at (mn entry, k entry): 0 outside the valid indices and the padding, 1 in
// the ones column (where the k index is valid). Q8: the code's int bits (Q8_ONE for the ones
// column), decoded by `decode`. The ones column only ever is an mn entry (k tables have none).
template <bool Q8>
__device__ __forceinline__ float operand_at(const Operand& o, const Bounds& bd, const Ent& em, const Ent& ek) {
    const bool ok = (unsigned)(em.y + ek.y + bd.bias) < bd.span_y & (unsigned)(em.x + ek.x + bd.bias) < bd.span_x;
    float v = ok ? load_at<Q8>(o, em.off + ek.off) : 0.0f;
    const bool one = (o.ones != 0) & (em.x == ENT_ONES_X) & (ek.y != ENT_INVALID_Y);
    return one ? (Q8 ? __int_as_float(Q8_ONE) : __uint_as_float(F32_ONE)) : v;
}

// Whether what operand_at<Q8> loaded is the ones column.
template <bool Q8>
__device__ __forceinline__ bool is_one(float v) {
    return Q8 ? __float_as_int(v) == Q8_ONE : __float_as_uint(v) == F32_ONE;
}

// What operand_at<Q8> loaded, as the operand's f32 value (the bits of the f32 tensor's element).
template <bool Q8>
__device__ __forceinline__ float decode(const Operand& o, float v) {
    if (is_one<Q8>(v)) return 1.0f;
    return Q8 ? (float)__float_as_int(v) * o.q8_factor : v;
}

// Element (m, n) of C into the output: the ones column to ones_out, bias, write or add.
__device__ __forceinline__ void store_c(const GemmDesc& d, int m, int n, float v) {
    const Output& o = d.out;
    if (n == d.N) {
        if (o.ones_out) o.ones_out[m] += v;
        return;
    }
    if (o.bias_on == 1) v += o.bias[m];
    if (o.bias_on == 2) v += o.bias[n];
    const Ent em = index_entry(o.m, m, 0), en = index_entry(o.n, n, 0);
    float* p = o.p + em.off + en.off;
    *p = o.accumulate ? *p + v : v;
}

// Fragments by ldmatrix (cuda/mma.cuh), from tiles stored [mn][k] with rows `pitch` bytes apart —
// TC_ROW16 halves (80 B) or TC_ROW32 words (144 B): 16-byte aligned, and 8 consecutive rows fall
// on 8 different 16-byte bank groups (20 or 36 words apart), so no load conflicts. One instruction
// per A fragment and one per two B fragments, where 32-bit shared loads took 4 and 2: the same
// registers, as the PTX ISA lays the fragments out (m16n8k16 for 16-bit operands; m16n8k8 for
// tf32, whose 32-bit elements ldmatrix moves as pairs of b16).
// A (rows row0..row0+15, the 16 or 8 k columns from byte col): lanes 0–15 address rows 0–15 at col,
// lanes 16–31 rows 0–15 at col + 16 bytes: matrices (rows 0–7, col), (8–15, col), (0–7, col + 16),
// (8–15, col + 16) = a[0], a[1], a[2], a[3].
__device__ __forceinline__ void frag_a(u32 (&a)[4], const unsigned char* tile, int pitch, int row0, int col, int lane) {
    ldmatrix_x4(a, tile + (row0 + (lane & 15)) * pitch + col + (lane >> 4) * 16);
}
// B of two n8 tiles (rows n0..n0+15 of the [n][k] tile): lanes 0–7 address tile 0's rows at col,
// 8–15 at col + 16 bytes, 16–23 tile 1's at col, 24–31 at col + 16: {b0[0], b0[1], b1[0], b1[1]}.
__device__ __forceinline__ void frag_b2(u32 (&b0)[2], u32 (&b1)[2], const unsigned char* tile, int pitch, int n0, int col, int lane) {
    u32 r[4];
    ldmatrix_x4(r, tile + (n0 + ((lane >> 4) << 3) + (lane & 7)) * pitch + col + ((lane >> 3) & 1) * 16);
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// A thread's TILE_ELEMS(R, T) elements of an operand's R×32 tile (R = 32, 64 or 128 rows, T = 128
// or 256 threads, T ≥ R), in pairs of neighbours along k: element j = 2p + h at (mn, k + h), k even —
// so that a pair is stored as one 32-bit word of two 16-bit operands (one conversion instruction
// packs both), where one element at a time took two 16-bit stores per word. Consecutive threads
// along k when k is the contiguous index (k_fast: 16 threads cover a row's 32), else along mn:
// coalesced either way.
#define TILE_ELEMS(R, T) ((R) * TC_BK / (T))
template <int R, int T>
__device__ __forceinline__ void tile_pair(const Operand& o, int tid, int p, int& mn, int& k) {
    static_assert(T >= R && T % R == 0 && T % 16 == 0, "a thread's pairs share one mn (or one k pair)");
    if (o.k_fast) {
        k = 2 * (tid & 15);
        mn = (tid >> 4) + (T / 16) * p;
    } else {
        mn = tid & (R - 1);
        k = 2 * (tid / R + (T / R) * p);
    }
}

// Loads a thread's TILE_ELEMS(R, T) elements of one operand's tile through the index tables — every load issued
// before any is used, so that they are in flight together (and, issued before the previous tile's
// MMAs, behind them: see gemm_tc). Before this split each element was converted and stored as soon
// as it arrived: one memory round trip per element, 32 per k-tile (SASS of gemm_tc_fp32).
// A thread's k indices (k_fast: the two of its pairs) or mn index (otherwise) are the same for all
// its elements: those table entries are read once, not per element (an entry is one 16-byte
// shared load).
template <bool Q8, int R, int T>
__device__ __forceinline__ void load_tile_as(float (&v)[TILE_ELEMS(R, T)], const Operand& o, const Ent* tmn, const Ent* tk, int tid) {
    const Bounds bd = bounds_of(o);
    if (o.k_fast) {
        const Ent ek0 = tk[2 * (tid & 15)], ek1 = tk[2 * (tid & 15) + 1];
#pragma unroll
        for (int p = 0; p < TILE_ELEMS(R, T) / 2; ++p) {
            int mn, k;
            tile_pair<R, T>(o, tid, p, mn, k);
            const Ent em = tmn[mn];
            v[2 * p] = operand_at<Q8>(o, bd, em, ek0);
            v[2 * p + 1] = operand_at<Q8>(o, bd, em, ek1);
        }
    } else {
        const Ent em = tmn[tid & (R - 1)];
#pragma unroll
        for (int p = 0; p < TILE_ELEMS(R, T) / 2; ++p) {
            int mn, k;
            tile_pair<R, T>(o, tid, p, mn, k);
            v[2 * p] = operand_at<Q8>(o, bd, em, tk[k]);
            v[2 * p + 1] = operand_at<Q8>(o, bd, em, tk[k + 1]);
        }
    }
}
// An AFFINE operand — both maps LINEAR, no spatial check: every linear layer's operands and a
// convolution's weights in its forward — has element (mn, k) at p[mn·stride_mn + k·stride_k], so a
// thread's R/4 elements are one base offset plus j times a constant step: no table entries to read
// (a shared load each, and the validity tests), just an address, a compare and a predicated load
// per element (the SASS of fc1's forward in fp32 mode: 857 instructions per k-step before, 518
// now; the table path, without branches since, 732).
__device__ __forceinline__ bool affine(const Operand& o) {
    return o.mn.kind == IDX_LINEAR && o.k.kind == IDX_LINEAR && o.sp_h == 0;
}

// The affine operand's TILE_ELEMS(R, T) elements of the tile at (mn0, k0): the values operand_at<Q8> gives
// through the tables (0 outside [0, count) on either side, the ones column at mn = count). Two
// pointers (a pair's first and second element) walk the pairs (a 64-bit add per pair: a 64-bit
// product per element made ptxas for the fp32 kernel recompute addresses under its register bound).
template <bool Q8, int R, int T>
__device__ __forceinline__ void load_tile_affine(float (&v)[TILE_ELEMS(R, T)], const Operand& o, int mn0, int k0, int tid) {
    typedef typename ElemPtr<Q8>::T Ptr;
    constexpr int PAIRS = TILE_ELEMS(R, T) / 2;
    int mn, k;
    tile_pair<R, T>(o, tid, 0, mn, k);
    mn += mn0;
    k += k0;
    Ptr q0 = reinterpret_cast<Ptr>(o.p) + ((long long)mn * o.mn.stride + (long long)k * o.k.stride);
    Ptr q1 = q0 + o.k.stride;
    const float one = Q8 ? __int_as_float(Q8_ONE) : __uint_as_float(F32_ONE);
    if (o.k_fast) {  // pair p at (mn + (T/16)·p, k), (mn + (T/16)·p, k + 1)
        const bool kin0 = k < o.k.count, kin1 = k + 1 < o.k.count;
        const long long step = (T / 16) * o.mn.stride;
#pragma unroll
        for (int p = 0; p < PAIRS; ++p, q0 += step, q1 += step) {
            const bool mnin = mn + (T / 16) * p < o.mn.count;
            v[2 * p] = (kin0 && mnin) ? load_elem<Q8>(q0) : 0.0f;
            v[2 * p + 1] = (kin1 && mnin) ? load_elem<Q8>(q1) : 0.0f;
        }
        if (o.ones) {
#pragma unroll
            for (int p = 0; p < PAIRS; ++p)
                if (mn + (T / 16) * p == o.mn.count) {
                    if (kin0) v[2 * p] = one;
                    if (kin1) v[2 * p + 1] = one;
                }
        }
    } else {  // pair p at (mn, k + 2·(T/R)·p) and the next k
        const bool mnin = mn < o.mn.count, ones = o.ones && mn == o.mn.count;
        const long long step = 2 * (T / R) * o.k.stride;
#pragma unroll
        for (int p = 0; p < PAIRS; ++p, q0 += step, q1 += step) {
            const int kp = k + 2 * (T / R) * p;
            const bool kin0 = kp < o.k.count, kin1 = kp + 1 < o.k.count;
            v[2 * p] = (kin0 && mnin) ? load_elem<Q8>(q0) : ((kin0 && ones) ? one : 0.0f);
            v[2 * p + 1] = (kin1 && mnin) ? load_elem<Q8>(q1) : ((kin1 && ones) ? one : 0.0f);
        }
    }
}

template <int R, int T>
__device__ __forceinline__ void load_tile(float (&v)[TILE_ELEMS(R, T)], const Operand& o, const Ent* tmn, const Ent* tk, int mn0, int k0, int tid) {
    if (affine(o)) {
        if (o.q8) load_tile_affine<true, R, T>(v, o, mn0, k0, tid);
        else load_tile_affine<false, R, T>(v, o, mn0, k0, tid);
    } else if (o.q8) {
        load_tile_as<true, R, T>(v, o, tmn, tk, tid);
    } else {
        load_tile_as<false, R, T>(v, o, tmn, tk, tid);
    }
}

// Stores the loaded elements as the precision's operands, [mn][k], a pair per 32-bit word (fp32
// mode: the scaled hi halves, and the lo halves in the second plane unless exact; tf32: one
// 64-bit store of the pair's two words).
template <int PREC, bool Q8, int R, int T>
__device__ __forceinline__ void store_tile_as(const float (&v)[TILE_ELEMS(R, T)], const Operand& o, u32* S32, float sc, bool lo_half, int tid) {
    const int plane32 = R * TC_ROW16 / 2;  // words per 16-bit plane
#pragma unroll
    for (int p = 0; p < TILE_ELEMS(R, T) / 2; ++p) {
        int mn, k;
        tile_pair<R, T>(o, tid, p, mn, k);
        const float x0 = decode<Q8>(o, v[2 * p]), x1 = decode<Q8>(o, v[2 * p + 1]);
        if (PREC == PREC_TF32) {
            *reinterpret_cast<uint2*>(S32 + mn * TC_ROW32 + k) = make_uint2(f32_to_tf32_bits(x0), f32_to_tf32_bits(x1));
        } else {
            const int w = (mn * TC_ROW16 + k) >> 1;
            if (PREC == PREC_BF16) {
                S32[w] = pack2(f32_to_bf16_bits(x0), f32_to_bf16_bits(x1));
            } else if (lo_half) {
                unsigned short hi0, lo0, hi1, lo1;
                // (the ones column unscaled: see F32_ONE)
                split_f16(is_one<Q8>(v[2 * p]) ? x0 : x0 * sc, hi0, lo0);
                split_f16(is_one<Q8>(v[2 * p + 1]) ? x1 : x1 * sc, hi1, lo1);
                S32[w] = pack2(hi0, hi1);
                S32[plane32 + w] = pack2(lo0, lo1);
            } else {
                S32[w] = pack2(f32_to_f16_bits(x0), f32_to_f16_bits(x1));
            }
        }
    }
}
template <int PREC, int R, int T>
__device__ __forceinline__ void store_tile(const float (&v)[TILE_ELEMS(R, T)], const Operand& o, u32* S32, float sc, bool lo_half, int tid) {
    if (o.q8) store_tile_as<PREC, true, R, T>(v, o, S32, sc, lo_half, tid);
    else store_tile_as<PREC, false, R, T>(v, o, S32, sc, lo_half, tid);
}

// WM × WN warps of (16·MI)×32: MI m16 tiles × 4 n8 tiles each (see the tile shapes at the top).
template <int PREC, int WM, int WN, int MI>
__device__ __forceinline__ void gemm_tc(const GemmDesc& d, const u32* __restrict__ maxbits) {
    constexpr int T = 32 * WM * WN, WTM = 16 * MI;  // threads; a warp's rows
    constexpr int BM = WTM * WM, BN = 32 * WN;
    __shared__ Ent ta_m[BM];
    __shared__ Ent tb_n[BN];
    __shared__ Ent ta_k[TC_BK];
    __shared__ Ent tb_k[TC_BK];
    __shared__ __align__(16) u32 As[TC_TILE_WORDS(BM)];
    __shared__ __align__(16) u32 Bs[TC_TILE_WORDS(BN)];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int wm = warp / WN, wn = warp % WN;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int ncols = d.N + d.b.ones;
    const int ktiles = (d.K + TC_BK - 1) / TC_BK;
    const int kt0 = blockIdx.z * d.kt_per_split;
    const int kt1 = min(ktiles, kt0 + d.kt_per_split);
    // the operands' scales (fp32 mode; exact operands keep 1)
    float sa = 1.0f, ia = 1.0f, sb = 1.0f, ib = 1.0f;
    if (PREC == PREC_FP32) {
        if (!d.a.exact && d.a.scale_slot >= 0) pow2_scale(maxbits[d.a.scale_slot], sa, ia);
        if (!d.b.exact && d.b.scale_slot >= 0) pow2_scale(maxbits[d.b.scale_slot], sb, ib);
    }
    for (int i = tid; i < BM + BN; i += T) {
        if (i < BM) ta_m[i] = index_entry(d.a.mn, m0 + i, d.a.ones);
        else tb_n[i - BM] = index_entry(d.b.mn, n0 + i - BM, d.b.ones);
    }
    float acc[MI][4][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
    const int plane16_a = BM * TC_ROW16, plane16_b = BN * TC_ROW16;  // halves per 16-bit plane
    const bool lo_a = PREC == PREC_FP32 && !d.a.exact, lo_b = PREC == PREC_FP32 && !d.b.exact;
    // Register double buffering: tile kt + 1's elements are loaded (in flight) while tile kt's
    // MMAs run; the k index tables of a tile are only read by its loads, so they are rebuilt for
    // the next tile as soon as the current one's loads are issued and stored.
    auto k_tables = [&](int kt) {
        if (tid < TC_BK) ta_k[tid] = index_entry(d.a.k, kt * TC_BK + tid, 0);
        else if (tid < 2 * TC_BK) tb_k[tid - TC_BK] = index_entry(d.b.k, kt * TC_BK + tid - TC_BK, 0);
    };
    float va[TILE_ELEMS(BM, T)], vb[TILE_ELEMS(BN, T)];
    if (kt0 < kt1) {
        k_tables(kt0);
        __syncthreads();
        load_tile<BM, T>(va, d.a, ta_m, ta_k, m0, kt0 * TC_BK, tid);
        load_tile<BN, T>(vb, d.b, tb_n, tb_k, n0, kt0 * TC_BK, tid);
    }
    for (int kt = kt0; kt < kt1; ++kt) {
        __syncthreads();  // the last tile's fragments are read
        // stage A and B: BM×32 and BN×32 elements, 32·BM/T and 32·BN/T per thread, as the precision's operands
        store_tile<PREC, BM, T>(va, d.a, As, sa, lo_a, tid);
        store_tile<PREC, BN, T>(vb, d.b, Bs, sb, lo_b, tid);
        if (kt + 1 < kt1) {
            k_tables(kt + 1);  // every thread's loads of tile kt were issued before the barrier above
            __syncthreads();
            load_tile<BM, T>(va, d.a, ta_m, ta_k, m0, (kt + 1) * TC_BK, tid);
            load_tile<BN, T>(vb, d.b, tb_n, tb_k, n0, (kt + 1) * TC_BK, tid);
        } else {
            __syncthreads();
        }
        // the tile's products
        const unsigned char* A8 = reinterpret_cast<const unsigned char*>(As);
        const unsigned char* B8 = reinterpret_cast<const unsigned char*>(Bs);
        if (PREC == PREC_TF32) {
#pragma unroll
            for (int ks = 0; ks < TC_BK; ks += 8) {
                u32 a[MI][4], b[4][2];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) frag_a(a[mi], A8, 4 * TC_ROW32, wm * WTM + mi * 16, 4 * ks, lane);
#pragma unroll
                for (int ni = 0; ni < 4; ni += 2) frag_b2(b[ni], b[ni + 1], B8, 4 * TC_ROW32, wn * 32 + ni * 8, 4 * ks, lane);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) mma_tf32_m16n8k8(acc[mi][ni], a[mi], b[ni]);
            }
        } else {
#pragma unroll
            for (int ks = 0; ks < TC_BK; ks += 16) {
                u32 a[MI][4], al[MI][4], b[4][2], bl[4][2];  // hi and lo halves
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    frag_a(a[mi], A8, 2 * TC_ROW16, wm * WTM + mi * 16, 2 * ks, lane);
                    if (lo_a) frag_a(al[mi], A8 + 2 * plane16_a, 2 * TC_ROW16, wm * WTM + mi * 16, 2 * ks, lane);
                }
#pragma unroll
                for (int ni = 0; ni < 4; ni += 2) {
                    frag_b2(b[ni], b[ni + 1], B8, 2 * TC_ROW16, wn * 32 + ni * 8, 2 * ks, lane);
                    if (lo_b) frag_b2(bl[ni], bl[ni + 1], B8 + 2 * plane16_b, 2 * TC_ROW16, wn * 32 + ni * 8, 2 * ks, lane);
                }
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        if (PREC == PREC_BF16) {
                            mma_bf16_m16n8k16(acc[mi][ni], a[mi], b[ni]);
                        } else {
                            mma_f16_split_rn(acc[mi][ni], a[mi], al[mi], lo_a, b[ni], bl[ni], lo_b);
                        }
                    }
            }
        }
    }
    // epilogue: undo the scales (powers of two: exact), then the split's partial tile or the output
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int m = m0 + wm * WTM + mi * 16 + g + (r >= 2 ? 8 : 0);
                const int n = n0 + wn * 32 + ni * 8 + 2 * t4 + (r & 1);
                if (m >= d.M || n >= ncols) continue;
                // (the ones column, n = N, was staged unscaled: see F32_ONE)
                const float v = acc[mi][ni][r] * ia * (n == d.N ? 1.0f : ib);
                if (d.splits > 1) d.partial[((long long)blockIdx.z * d.M + m) * ncols + n] = v;
                else store_c(d, m, n, v);
            }
}

// At least 3 blocks per SM: the next tile's 32 values in flight take ~160–170 registers a thread
// (65,536 / (170 · 128) = 3). Without the minimum, ptxas for sm_80 chose 128 registers for the
// bf16 and tf32 kernels and spilled.
#define TC_MIN_BLOCKS 3
// The wide tiles hold 40 values in flight (A's 8 and B's 32): within 168 registers ptxas spilled
// (sm_80 bf16: 192 bytes), so 2 blocks per SM, up to 255 registers.
#define TC_MIN_BLOCKS_WIDE 2
// SQUARE tiles (64×64), then WIDE ones (32×128: _m32)
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS) gemm_tc_fp32(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_FP32, 2, 2, 2>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS) gemm_tc_tf32(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_TF32, 2, 2, 2>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS) gemm_tc_bf16(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_BF16, 2, 2, 2>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS_WIDE) gemm_tc_fp32_m32(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_FP32, 1, 4, 2>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS_WIDE) gemm_tc_tf32_m32(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_TF32, 1, 4, 2>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS_WIDE) gemm_tc_bf16_m32(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_BF16, 1, 4, 2>(TC_DESC(d), maxbits);
}
// BIG tiles (128×128, 256 threads: _big). One block per SM: 64 accumulators and 32 values in
// flight a thread, up to 255 registers.
extern "C" __global__ void __launch_bounds__(TC_THREADS_BIG, TC_MIN_BLOCKS_256) gemm_tc_fp32_big(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_FP32, 2, 4, 4>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS_BIG, TC_MIN_BLOCKS_256) gemm_tc_tf32_big(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_TF32, 2, 4, 4>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS_BIG, TC_MIN_BLOCKS_256) gemm_tc_bf16_big(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_BF16, 2, 4, 4>(TC_DESC(d), maxbits);
}
// MID tiles (64×128, 256 threads as 2×4 warps of 32×32: _mid), for the GEMMs with M > 32 and
// N ≥ 128 that the big tiles do not suit (fashion-mnist's conv2 forward and weight gradient: 64
// output channels): a thread stages 24 elements per k-step where a square tile's stages 32 for
// the same MMAs.
// Within 128 registers (two blocks per SM) ptxas spilled (sm_80 fp32 20 bytes, tf32 4; sm_90 bf16
// 20), so one block per SM as the big tiles: ~145–160 registers.
extern "C" __global__ void __launch_bounds__(TC_THREADS_BIG, TC_MIN_BLOCKS_256) gemm_tc_fp32_mid(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_FP32, 2, 4, 2>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS_BIG, TC_MIN_BLOCKS_256) gemm_tc_tf32_mid(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_TF32, 2, 4, 2>(TC_DESC(d), maxbits);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS_BIG, TC_MIN_BLOCKS_256) gemm_tc_bf16_mid(const GemmDesc d, const u32* __restrict__ maxbits) {
    gemm_tc<PREC_BF16, 2, 4, 2>(TC_DESC(d), maxbits);
}

// C = Σ_split partial[split] in ascending split order, into the output (as gemm_tc's epilogue).
// One thread per element of C, grid-stride; (m, n) advanced without division (grid_digits.cuh).
extern "C" __global__ void gemm_tc_reduce_f32(const GemmDesc d) {
    const int ncols = d.N + d.b.ones;
    const long long total = (long long)d.M * ncols;
    GRID_STRIDE_START(total);
    GridDigits<2> g(start, stride, {ncols});  // (n, m)
    for (long long i = start; i < total; i += stride, g.advance()) {
        float v = 0.0f;
        for (int s = 0; s < d.splits; ++s) v += d.partial[(long long)s * total + i];
        store_c(d, (int)g.d[1], (int)g.d[0], v);
    }
}

// *out = max(*out, the f32 bits of max |x|) over x [n] (bits of non-negative floats order as the
// floats); *out must start at 0. Block-wide max through shared memory, one atomicMax per block.
extern "C" __global__ void absmax_f32(const float* __restrict__ x, long long n, u32* __restrict__ out) {
    __shared__ u32 part[8];
    u32 local = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const u32 b = __float_as_uint(fabsf(x[i]));
        local = b > local ? b : local;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const u32 other = __shfl_xor_sync(0xFFFFFFFFu, local, o);
        local = other > local ? other : local;
    }
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = local;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 m = 0;
        for (int w = 0; w < (int)(blockDim.x + 31) / 32; ++w) m = part[w] > m ? part[w] : m;
        atomicMax(out, m);
    }
}

// A probe of the structs' C layout, for the host twins' test: sizes and offsets of every field.
extern "C" __global__ void gemm_tc_layout(long long* out) {
    if (threadIdx.x != 0) return;
    GemmDesc d;
    const char* base = reinterpret_cast<const char*>(&d);
    int i = 0;
    out[i++] = sizeof(IndexMap);
    out[i++] = sizeof(Operand);
    out[i++] = sizeof(Output);
    out[i++] = sizeof(GemmDesc);
    out[i++] = reinterpret_cast<const char*>(&d.a.mn.kind) - base;
    out[i++] = reinterpret_cast<const char*>(&d.a.mn.width_shr) - base;
    out[i++] = reinterpret_cast<const char*>(&d.a.k) - base;
    out[i++] = reinterpret_cast<const char*>(&d.a.sp_h) - base;
    out[i++] = reinterpret_cast<const char*>(&d.a.scale_slot) - base;
    out[i++] = reinterpret_cast<const char*>(&d.a.q8_factor) - base;
    out[i++] = reinterpret_cast<const char*>(&d.b) - base;
    out[i++] = reinterpret_cast<const char*>(&d.out) - base;
    out[i++] = reinterpret_cast<const char*>(&d.out.n) - base;
    out[i++] = reinterpret_cast<const char*>(&d.out.bias_on) - base;
    out[i++] = reinterpret_cast<const char*>(&d.partial) - base;
    out[i++] = reinterpret_cast<const char*>(&d.M) - base;
    out[i++] = reinterpret_cast<const char*>(&d.kt_per_split) - base;
}
