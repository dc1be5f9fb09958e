// backei_v4.cu — the fused BackEI layer on tensor cores (v4). Host side: src/gpu/backei_v4.rs
// (the plan: tiles, shared memory, buffers; the launches); the math is that of backei_layer.cu
// (v1, whose header gives the equations) and of the CPU twin src/cpu/backei_layer.rs. Its parts,
// included below: v4/halo.cuh (staging a chunk's halo into shared memory), v4/gemm.cuh (the
// convolution and weight-gradient GEMMs on mma.sync), v4/chunks.cuh (the work mapping),
// v4/weights.cuh (the weight fragments), v4/rowmax.cuh (the fp32 mode's scales from row maxima),
// v4/sync.cuh (the phases' order across blocks: grid barriers or neighbour flags); here: the
// constants, the element readers, the forward and backward time loops and the kernels.
//
// What v4 changes. Every gate convolution of a step — W_b ⊛ s_{t−D} and W_e ⊛ v_t forward, their
// adjoints W_eᵀ ⊛ dz_t and W_bᵀ ⊛ da_t backward — is an implicit GEMM on mma.sync, and the weight
// gradients dW_e += dz_t ⋆ v_t, dW_b += da_t ⋆ s_{t−D} are GEMMs fused into the backward's time loop
// (no T-sized dz/da buffers, no second pass, no float atomics: bit-reproducible by construction).
//
// Implicit GEMM of a convolution (no im2col buffer). For a chunk of P ≤ 128·MT pixels of one sample:
//   out[p][n] = Σ_{tap, c} X[c][p + off(tap)] · Wt[tap·c_pad + c][n],   p < P, n < CO_T,
// M = pixels, N = the block's CO_T output channels, K = k²·c_pad (taps outer, 16-channel slabs inner).
// A = the input's halo, staged CHANNEL-LAST in shared memory (pixel (hy, hx) → 16-byte rows of
// channels, so ldmatrix.x4 reads an A fragment with one instruction: lane l addresses pixel
// p0 + l%16, channels k0 + 8·(l/16)); a pixel's stride is c_pad·EB + 16 bytes, which puts the 8 rows
// of every ldmatrix matrix in 8 different 4-bank groups (conflict-free). B = the weights,
// pre-arranged in global memory at the start of each launch in the mma B-fragment order
// [plane][k-step][n-tile pair][lane][2 n-tiles × 2 × u32] (one 16-byte shared load per lane for two
// n-tiles' fragments) and copied into shared memory with cp.async.
//   forward:   Wt[tap·c_pad + ci][n] = W[co0 + n][ci][tap]
//   backward:  Wt[tap·c_pad + co][n] = W[co][ci0 + n][k² − 1 − tap]   (the adjoint: transposed, flipped)
// Weight gradient of a chunk (M = the block's CO_T channels of dY, N = k²·c_pad (tap, ci), K = P pixels):
//   dW[co][tap·c_pad + ci] += Σ_p dY[co][p] · X[ci][p + off(tap)]
// both operands read from the same channel-last halos with ldmatrix.trans (fp16/bf16) or scalar
// loads (tf32), accumulated per chunk in registers and folded into per-block f32 accumulators
// (shared memory, or the block's slice of dw_part when they do not fit); at the end every block's
// partial sums are added in a fixed order (range 0, 1, …) into the gradient buffer.
//
// Precision (V4_PREC; src/precision.rs): state, gradients and every sum are f32 in every mode.
//   PREC_FP32: fp16 operands split into hi + lo (Ootomo & Yokota 2022) after a power-of-two scaling
//     that puts the largest |x| of the staged operand at [2^13, 2^14): x·S ≈ hi + lo carries ~22
//     bits; real × real = hi·hi + hi·lo + lo·hi (3 MMAs), spike × real = s·hi + s·lo (2: s ∈ {−1,0,1}
//     is exact). Scales: per launch, gate and channel group for the weights; per chunk for the
//     activations and gradients (a block-wide max); the results are multiplied by the inverse
//     scales (powers of two: exact).
//   PREC_TF32: one m16n8k8 TF32 product (10-bit mantissa, f32 range: no scaling).
//   PREC_BF16: one m16n8k16 bf16 product (7-bit mantissa, f32 range: no scaling).
//
// Work mapping. A persistent cooperative kernel (grid = groups · ranges blocks, all co-resident;
// block (range r, group gi) = blockIdx.x (r · groups + gi)): the block owns output channels
// [gi·CO_T, (gi+1)·CO_T) and the pixels [r·B·HW/ranges, (r+1)·B·HW/ranges) of the flattened
// (sample, pixel) space — a balanced contiguous range — for the whole launch, in chunks that do not
// cross samples (or, with V4_CROSS, span them: v4/chunks.cuh chunk_len). 256 threads = 8 warps;
// warp w owns the chunk's m-tiles w, w+8, … (MT of them) and all CO_T channels, so a thread owns
// the same neurons at every step (its own dv, grad_in, u chains need no barrier). Phases are
// separated by phase_done (v4/sync.cuh: a grid barrier, or with V4_SYNC a wait for the blocks
// whose pixels lie within R rows):
//   forward  step t:  A (back: stage s_{t−D}, a = W_b ⊛ s; every t: g, v_t, and s_t when ei is off) | sync |
//                     B (ei: stage v_t, z = W_e ⊛ v_t, s_t) | sync
//   backward step t:  2 (stage dz_t = (∂L/∂s + fb)·H(v−θ)·sign′(z) — from the ring phase 3 of step
//                     t + D filled (V4_DZ_RING), else computed on the fly — and v_t;
//                     dv = … + W_eᵀ ⊛ dz, ∂I, da_t → da; dW_e, db_e, db_b) | sync |
//                     3 (back, t ≥ D: stage da_t and s_{t−D}; fb_{t−D} = W_bᵀ ⊛ da, stored as
//                     ∂L/∂s_{t−D} + fb_{t−D}, the sum phase 2 of step t − D wants, and with it
//                     (V4_DZ_RING) dz_{t−D}; dW_b) | sync
// Saved by the forward (the backward's contract with v1–v3): s, v, g (back), z (ei), f32 [T][B][N];
// z as a one-byte code instead (V4_ZCODE = 1, common.cuh's z_code: sign and surrogate window)
// where that is exact — exact firing and the rectangle surrogate, which the host decides
// (backei_layer.rs apply_compact) — a quarter of the bytes, the same bits everywhere else; s as
// int8 (V4_S8 = 1: exact firing, s ∈ {−1, 0, 1}; where the layer's consumer reads int8: the
// network's pooling, pool.cu / dropout.cu);
// with --recompute K, v, g, z only for a window of K steps, and v at every window's end (V4Window).
// Buffers written inside a launch and read by other blocks (s, v, da, fb) are read through L2
// (__ldcg), never a stale L1 line.
#include "common.cuh"
#include "mma.cuh"
#include "backei_common.cuh"

#ifndef V4_ZCODE
#define V4_ZCODE 0
#endif

// The saved z of the E/I gate: f32, or its one-byte code (V4_ZCODE). save_z stores, saved_sign
// and saved_sign_grad return what sign_ and sign_grad return for the z it was saved from.
#if V4_ZCODE
typedef unsigned char V4Z;
__device__ __forceinline__ V4Z save_z(const NeuronParams& np, float z) { return z_code(np, z); }
__device__ __forceinline__ float saved_sign(const NeuronParams&, V4Z c) { return sign_of_code(c); }
__device__ __forceinline__ float saved_sign_grad(const NeuronParams& np, V4Z c) { return sign_grad_of_code(np, c); }
#else
typedef float V4Z;
__device__ __forceinline__ V4Z save_z(const NeuronParams&, float z) { return z; }
__device__ __forceinline__ float saved_sign(const NeuronParams& np, V4Z z) { return sign_(np, z); }
__device__ __forceinline__ float saved_sign_grad(const NeuronParams& np, V4Z z) { return sign_grad(np, z); }
#endif

#ifndef V4_S8
#define V4_S8 0
#endif

// The saved spikes s (the layer's output): f32, or int8 (V4_S8) — the spikes' values exactly.
#if V4_S8
typedef signed char V4S;
#else
typedef float V4S;
#endif

#define PREC_FP32 0
#define PREC_TF32 1
#define PREC_BF16 2

// A module instance is specialised at NVRTC compile time (src/gpu/backei_v4.rs passes -D…): the
// radius, the precision, the channel tile and the m-tiles per warp always; C, H and W when the
// shape is known (the GPU), else read from LayerDims at run time (the emulator, one build for
// every shape). These defaults make the module compile on its own (kernels_compile, emulator).
#ifndef V4_R
#define V4_R 1
#endif
#ifndef V4_PREC
#define V4_PREC PREC_FP32
#endif
#ifndef V4_CO_T
#define V4_CO_T 32
#endif
#ifndef V4_MT
#define V4_MT 2
#endif
// The backward's bias partial sums in db_carry between phase 2's epilogues instead of registers
// across the whole loop (the host sets it for tiles of 64 accumulators per thread, where ptxas
// otherwise kept them in local memory with a load and a store per element: backei_v4.rs
// `V4Plan::carry_bias_sums`); the same additions in the same order, so the same bits.
#ifndef V4_DB_CARRIED
#define V4_DB_CARRIED 0
#endif
// dz_t stored once, by phase 3 of step t + D (which forms it for dz's row maxima anyway), in a ring
// of min(D, T) [B][N] slots beside the feedback slot (dzr, slot t mod D), and staged by phase 2 with
// one load per element instead of the slot, v and z and their product (V4Dz) per halo element. The
// host sets it where dz's row maxima are formed (backei_v4.rs `V4Plan::stores_dz`); steps whose
// phase 3 of t + D did not run in the launch (t + D ≥ T, or past the window) keep V4Dz. The same
// product of the same f32 values: the same bits.
#ifndef V4_DZ_RING
#define V4_DZ_RING 0
#endif
// The phase lambdas (a chunk's staging, GEMMs and epilogue, the body of for_each_chunk) forced
// inline: NVRTC outlines a lambda it finds too big, and the call's ABI then spills what is live
// across it (phase 2 of the fashion L1 fp32 backward grew by a prefetch: a CALL to the lambda, a
// 928-byte stack frame, 690 local-memory instructions, 2026-12-07). GCC (the emulator's build)
// takes the same attribute.
#define V4_INLINE_LAMBDA __attribute__((always_inline))
// Each chunk's epilogue inputs prefetched into L2 before the chunk's GEMMs (v4/chunks.cuh
// prefetch_owned_l2; the host sets it for BACKEI_V4_PREFETCH=l2): a hint that changes no value.
// Opt-in until a GPU run shows it faster.
#ifndef V4_PREFETCH
#define V4_PREFETCH 0
#endif
// Chunks that span samples (v4/chunks.cuh chunk_len; the host sets it for BACKEI_V4_CHUNKS=span):
// a block's chunks run on across a sample's end instead of stopping there, so that a range of
// ~4.6 chunks' pixels takes 5 chunks instead of 6 (fashion-mnist L1) or 7 (L2), and maps smaller
// than a chunk fill it with several samples. Opt-in until a GPU run shows it faster.
#ifndef V4_CROSS
#define V4_CROSS 0
#endif
#ifdef V4_C
#define DIM_C V4_C
#define DIM_CPAD ((V4_C + 15) / 16 * 16)
#else
#define DIM_C d.C
#define DIM_CPAD vd.c_pad
#endif
#ifdef V4_H
#define DIM_H V4_H
#else
#define DIM_H d.H
#endif
#ifdef V4_W
#define DIM_W V4_W
#else
#define DIM_W d.W
#endif
// The layer's feedback paths (the back gate, the E/I sign), constants in the GPU build like the
// shape: every epilogue then holds only its layer's code, without a branch per element around
// each path's loads, stores and sums (SASS of the fashion L1 backward, 2026-12-07, fifth session).
#ifdef V4_BACK
#define DIM_BACK V4_BACK
#else
#define DIM_BACK d.back
#endif
#ifdef V4_EI
#define DIM_EI V4_EI
#else
#define DIM_EI d.ei
#endif

// The neuron's firing mode and surrogate (NeuronParams.smooth, .surrogate) as compile-time
// constants when the host knows them (the GPU build: every epilogue then holds one surrogate's
// code instead of all of them, unrolled over a thread's 8·MT·NT/… elements), else read at run time.
__device__ __forceinline__ NeuronParams v4_neuron(NeuronParams np) {
#ifdef V4_SMOOTH
    np.smooth = V4_SMOOTH;
#endif
#ifdef V4_SURR
    np.surrogate = V4_SURR;
#endif
    return np;
}

namespace v4 {
constexpr int R = V4_R, K = 2 * R + 1, KK = K * K;
constexpr int PREC = V4_PREC;
constexpr int CO_T = V4_CO_T;  // output channels of a block: 16, 32 or 64
constexpr int MT = V4_MT;      // m-tiles (16 pixels) per warp: a chunk is 128·MT pixels
constexpr int NT = CO_T / 8;   // n-tiles of the convolution GEMMs
constexpr bool DB_CARRIED = V4_DB_CARRIED;
constexpr bool DZ_RING = V4_DZ_RING;
constexpr bool CROSS = V4_CROSS;  // chunks may span samples (v4/chunks.cuh)
constexpr int MW = CO_T / 16;  // m-tiles of the weight-gradient GEMM
constexpr int WARPS = 8, THREADS = 32 * WARPS;
constexpr int P_CH = 16 * WARPS * MT;
constexpr int EB = PREC == PREC_TF32 ? 4 : 2;      // bytes per operand element
constexpr int PLANES = PREC == PREC_FP32 ? 2 : 1;  // a real operand: hi and lo (fp32 mode)
constexpr int KPIX = PREC == PREC_TF32 ? 8 : 16;   // pixels per k-step of the weight gradient
constexpr int NTG = 4;                             // n-tiles per weight-gradient register tile
static_assert(CO_T % 16 == 0 && CO_T <= 64, "CO_T is 16, 32 or 64");
}  // namespace v4

// Host twin: V4Dims in src/gpu/backei_v4.rs (#[repr(C)], the same field order).
struct V4Dims {
    int c_pad;         // C rounded up to 16 (whole 16-channel K slabs)
    int groups;        // channel groups: ceil(C / CO_T)
    int ranges;        // pixel ranges (blocks per group); grid = groups · ranges
    int halo_rows;     // rows of the tallest chunk halo
    int slab;          // channels staged at a time (a multiple of 16; c_pad when the halo fits whole)
    int pstride;       // bytes per pixel of a staged slab: slab·EB + 16
    int plane_bytes;   // one plane of a slab (halo_rows·(W + 2r)·pstride, a multiple of 16)
    int own_pstride;   // the block's own CO_T channels (the weight gradient's dY): CO_T·EB + 16
    int own_plane_bytes;
    int wslice_bytes;  // one gate's weight slice, every plane (k²·c_pad·CO_T·EB·PLANES)
    int w_resident;    // both gates' slices stay in shared memory (else one, reloaded per phase)
    int dw_smem;       // the weight-gradient accumulators in shared memory (else in dw_part)
    int smem_dw;       // byte offsets in dynamic shared memory: dW accumulators,
    int smem_halo;     //   the slab planes (PLANES),
    int smem_own;      //   the own-channel planes (PLANES),
    int smem_misc;     //   the reduction scratch, the BlockShare (v4/sync.cuh), the pixel rows (v4/gemm.cuh)
};

// Host twin: V4Window in src/gpu/backei_v4.rs. The steps [t0, t1) a launch runs (0 and T: the
// whole loop). v, g and z are then the window's own buffers, step t at (t − t0)·B·N; s, ∂L/∂s and
// ∂L/∂I stay indexed by the absolute t, the input by t − in_t0. This is `--recompute K` (activation checkpointing
// over time): the forward runs window after window and keeps v_{t1−1} of each (v_last); the
// backward runs the windows in reverse, each after recomputing its window's v, g, z from the
// kept v_{t0−1} (v_prev) with this same code — the same bits, so the gradients are those of
// storing everything. The backward's carried state lives in global memory between its launches:
// dv, the feedback ring and ∂L/∂I (indexed by the absolute t), the weight-gradient accumulators
// (dw_part) and each thread's bias partial sums (db_carry); only the launch that ends at t0 = 0
// reduces them into the gradients.
// in_t0: the step the input buffer starts at — 0 when it holds every step, t0 when it holds this
// window's steps alone (a convolution before the layer recomputed per window by the network, so
// that its [T][B][N] output is never stored: memory::conv_output_window).
struct V4Window {
    int t0, t1;
    int in_t0;
    int pool_q8;  // the fused pooling writes int8 codes c (the value c · 0.25: gemm_tc.cu's Q8), not f32
};

namespace v4 {

// A chunk: pixels q0 … q0 + len − 1 counted from sample b's first pixel — under CROSS those from
// j·H·W on are sample b + j's (pixel q − j·H·W there: chunk_sample). Every per-sample array is
// [B][…] with the sample's words contiguous, so a pixel index past H·W reaches the next samples
// from sample b's base where the sample's stride is H·W (the row maxima: row q / W), and a
// [C][H][W] element offset (the state) needs the pixel as elem_q gives it. The halo is staged as
// one "virtual image": each sample's rows with R padding rows above and below — virtual row
// j·(H + 2R) + y is sample b + j's row y (chunk_vq).
struct Chunk {
    int b, q0, len;  // sample, first pixel (within the sample), pixels
    int y_first;     // first image row of the chunk
    int next_len;    // pixels of the block's next chunk (0: this is its last; v4/chunks.cuh next_chunk)
};

// The sample, counted from the chunk's first, of its relative pixel q (q0 + pm): 0 unless CROSS.
__device__ __forceinline__ int chunk_sample(int q, const LayerDims& d) {
    return CROSS ? q / (DIM_H * DIM_W) : 0;
}

// The chunk's pixel pm in the virtual image (its column is q % W, its virtual row q / W): q0 + pm,
// 2R rows further per sample boundary before it.
__device__ __forceinline__ int chunk_vq(const Chunk& ch, int pm, const LayerDims& d) {
    const int q = ch.q0 + pm;
    return q + chunk_sample(q, d) * (2 * R * DIM_W);
}

// The chunk's pixel q = q0 + pm as an offset in sample b's [C][H][W] (channel c's element at
// c·H·W + elem_q): q itself in sample b, (C − 1)·H·W further per sample after it.
__device__ __forceinline__ int elem_q(int q, const LayerDims& d) {
    return q + chunk_sample(q, d) * ((DIM_C - 1) * DIM_H * DIM_W);
}

// A virtual row gy of the halo (counted from sample b's row 0: R padding rows between samples) as
// sample b + j's image row y, and the words from gy's place in sample b's [C][H][W] to y's in
// sample b + j's (j·C·H·W − j·(H + 2R)·W): the row's load offset. y outside [0, H): padding.
__device__ __forceinline__ int virtual_row(int gy, int& shift, const LayerDims& d) {
    shift = 0;
    if (!CROSS) return gy;
    const int H = DIM_H, j = (gy + R) / (H + 2 * R);  // (gy ≥ −R)
    shift = j * (DIM_C * H * DIM_W - (H + 2 * R) * DIM_W);
    return gy - j * (H + 2 * R);
}

// Inverse of the power of two that puts max|x| at [2^13, 2^14) (1 when max is 0 or not finite).
__device__ __forceinline__ float pow2_scale(float maxabs, float& inv) {
    if (!(maxabs > 0.0f) || !(maxabs < 3.0e38f)) {
        inv = 1.0f;
        return 1.0f;
    }
    int e;
    frexpf(maxabs, &e);               // maxabs = m·2^e, m ∈ [0.5, 1)
    const int s = min(14 - e, 100);   // maxabs·2^s ∈ [2^13, 2^14)
    inv = ldexpf(1.0f, -s);
    return ldexpf(1.0f, s);
}

// Block-wide max (every thread gets it). red: WARPS floats of shared memory.
__device__ __forceinline__ float block_max(float x, float* red) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    __syncthreads();  // red is free
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float m = red[0];
    for (int w = 1; w < WARPS; ++w) m = fmaxf(m, red[w]);
    return m;
}

// An element's operand bits: exact operands (spikes) as fp16 in one plane; real ones scaled and
// split into hi and lo fp16 halves (fp32 mode) or rounded (tf32, bf16: hi alone).
template <bool REAL>
__device__ __forceinline__ void operand_bits(float x, float scale, u32& hi, u32& lo) {
    lo = 0u;
    if (PREC == PREC_TF32) {
        hi = f32_to_tf32_bits(x);
    } else if (PREC == PREC_BF16) {
        hi = f32_to_bf16_bits(x);
    } else if (REAL) {
        unsigned short h, l;
        split_f16(x * scale, h, l);
        hi = h;
        lo = l;
    } else {
        hi = f32_to_f16_bits(x);
    }
}

// Whether an operand fills a second (lo) plane: a real one in fp32 mode.
template <bool REAL>
__device__ __forceinline__ constexpr bool has_lo_plane() {
    return REAL && PREC == PREC_FP32;
}

// One element into the staged planes (EB bytes each, the lo plane `plane_bytes` after the hi one).
template <bool REAL>
__device__ __forceinline__ void store_operand(char* p0, int plane_bytes, float x, float scale) {
    u32 hi, lo;
    operand_bits<REAL>(x, scale, hi, lo);
    if (PREC == PREC_TF32) {
        *reinterpret_cast<u32*>(p0) = hi;
    } else {
        *reinterpret_cast<unsigned short*>(p0) = (unsigned short)hi;
        if (has_lo_plane<REAL>()) *reinterpret_cast<unsigned short*>(p0 + plane_bytes) = (unsigned short)lo;
    }
}

// store_operand for channels c and c + 1 of one pixel (p0 at channel c, c even): one 4-byte store
// per plane (8 for tf32), channel c in the low half — the bytes two store_operand calls would write.
template <bool REAL>
__device__ __forceinline__ void store_operand_pair(char* p0, int plane_bytes, float x0, float x1, float scale) {
    if (PREC == PREC_FP32) {  // both halves of both elements packed by two conversions each (split_f16_pair)
        u32 hi, lo = 0u;
        if (REAL) split_f16_pair(x0 * scale, x1 * scale, hi, lo);
        else hi = f32x2_to_f16x2_bits(x0, x1);
        *reinterpret_cast<u32*>(p0) = hi;
        if (has_lo_plane<REAL>()) *reinterpret_cast<u32*>(p0 + plane_bytes) = lo;
        return;
    }
    u32 hi0, lo0, hi1, lo1;
    operand_bits<REAL>(x0, scale, hi0, lo0);
    operand_bits<REAL>(x1, scale, hi1, lo1);
    if (PREC == PREC_TF32) {
        *reinterpret_cast<uint2*>(p0) = make_uint2(hi0, hi1);
    } else {
        *reinterpret_cast<u32*>(p0) = hi0 | hi1 << 16;
        if (has_lo_plane<REAL>()) *reinterpret_cast<u32*>(p0 + plane_bytes) = lo0 | lo1 << 16;
    }
}

// The row pitch (floats) of the weight-gradient accumulators in shared memory: k²·c_pad + 8. A
// warp's fold (wgrad_gemm) updates rows g = 0..7 at columns 2t, 2t + 1 of an n-tile; with the
// pitch unpadded (k²·c_pad ≡ 0 or 16 mod 32: c_pad is a multiple of 16) those rows fall in the same
// 4 or 8 banks — an 8-way (4-way) conflict on every load and store of the fold, as many shared
// wavefronts per chunk as the weight gradient's MMAs have cycles (fashion L1: ~4,600 per gate). A
// pitch ≡ 8 or 24 (mod 32) puts a half-warp's float2 accesses in 32 different banks.
// Host twin: backei_v4.rs `dw_smem_pitch`.
#define DW_SMEM_PITCH(n_all) ((n_all) + 8)

struct BlockShare;  // (v4/sync.cuh)

// The shared-memory regions of a launch.
struct V4Smem {
    char* wb;  // W_b's slice (forward or adjoint layout)
    char* we;  // W_e's slice (the same address as wb when the slices are not resident)
    float* dw; // [2][CO_T][DW_SMEM_PITCH(k²·c_pad)] accumulators (dw_smem), else null
    char* halo;      // the slab planes
    char* own;       // the own-channel planes (the weight gradient's dY)
    float* red;      // reduction scratch: WARPS·CO_T floats
    BlockShare* share;  // the block's pixel range and partner blocks (v4/sync.cuh), 32 bytes
    u32* pix;           // the chunk's pixel rows for the weight gradient: 2·P_CH words (v4/gemm.cuh fill_pixel_rows)
};

// Whether the weight-gradient accumulators live in shared memory (else in dw_part): the plan's
// placement (V4Plan: dw=smem|l2) as a constant of the GPU build (V4_DW_SMEM), so that the fold
// of every weight-gradient tile reads and writes them with shared loads and stores at a constant
// pitch — with the placement read at run time it took generic 64-bit loads and stores, and both
// pitch parities' code (SASS of the fashion L1 fp32 backward, 2026-12-07); the emulator's build
// (tile_defines leaves it out) reads it at run time and runs both placements.
__device__ __forceinline__ bool dw_on_chip(const V4Dims& vd) {
#ifdef V4_DW_SMEM
    return V4_DW_SMEM;
#else
    return vd.dw_smem;
#endif
}

__device__ __forceinline__ V4Smem v4_smem(char* base, const LayerDims& d, const V4Dims& vd) {
    V4Smem s;
    s.wb = base;
    s.we = base + (vd.w_resident && DIM_BACK ? vd.wslice_bytes : 0);
    s.dw = dw_on_chip(vd) ? reinterpret_cast<float*>(base + vd.smem_dw) : nullptr;
    s.halo = base + vd.smem_halo;
    s.own = base + vd.smem_own;
    s.red = reinterpret_cast<float*>(base + vd.smem_misc);
    s.share = reinterpret_cast<BlockShare*>(base + vd.smem_misc + 4 * WARPS * CO_T);
    s.pix = reinterpret_cast<u32*>(base + vd.smem_misc + 4 * WARPS * CO_T + 32);
    return s;
}

// the parts, in order (each uses those before it)
#include "v4/halo.cuh"
#include "v4/rowmax.cuh"
#include "v4/gemm.cuh"
#include "v4/chunks.cuh"
#include "v4/sync.cuh"
#include "v4/weights.cuh"

}  // namespace v4

using namespace v4;

// The element reader of a staged tensor: one sample's plane of a buffer written earlier in this
// launch (read through L2).
struct V4Plain {
    const float* p;
    __device__ __forceinline__ float operator()(unsigned idx) const { return __ldcg(p + idx); }
    __device__ __forceinline__ void prefetch(int idx) const { prefetch_l2(p + idx); }  // (V4_PREFETCH)
};

// The same for the saved spikes (f32, or int8 under V4_S8).
struct V4Spikes {
    const V4S* p;
    __device__ __forceinline__ float operator()(unsigned idx) const { return (float)__ldcg(p + idx); }
    __device__ __forceinline__ void prefetch(int idx) const { prefetch_l2(p + idx); }
};

// The row walk's position in one array: a pointer (ArrayCursor, v4/halo.cuh), the pixel's address
// once per batch, channel c + 1 and the batch's other items at constant offsets.
__device__ __forceinline__ ArrayCursor<float> halo_cursor(const V4Plain& src, int at) {
    return ArrayCursor<float>{src.p + at};
}
__device__ __forceinline__ ArrayCursor<V4S> halo_cursor(const V4Spikes& src, int at) {
    return ArrayCursor<V4S>{src.p + at};
}

// How the backward reads ∂L/∂s (host twin: V4GradIn in src/gpu/backei_v4.rs).
struct V4GradIn {
    int pooled;   // 0: grad_out is ∂L/∂s [T][B][N]; 1: the output gradient of the network's 2×2
                  // pooling after the layer, [T][B][C][H/2][W/2]
    int dropout;  // pooled: a dropout between the layer and the pooling (its mask drawn again)
    float p, scale;                   // the dropout's probability and 1/(1−p) (host-rounded)
    unsigned long long index0;        // the batch's first element in the global batch
    const unsigned long long* keys;   // the step's dropout keys (device memory): keys[slot]
    int slot;
};

// ∂L/∂s_t of one sample's element idx = c·HW + q: the layer's output gradient g [C][H][W], or
// (pooled) the gradient of the network's 2×2 average pooling after the layer, g [C][H/2][W/2],
// taken through the pooling's backward on the fly — pool.cu's avgpool2_backward: dy·0.25 inside
// the pooled rows and columns, 0 on those the floor dropped; with a dropout between, dropout.cu's
// dropout_avgpool2_backward: that, then ·scale where the step's mask keeps the element — so ∂L/∂s
// is never stored.
struct V4Grad {
    const float* g;
    int pooled;
    int H, W;
    int dropout;
    float p, scale;
    unsigned long long key, i0;  // the mask's key; the sample's first element in the step's block
    unsigned int t;
    // the layer's map: constants in the GPU build (divisions by them compile to multiplications)
    __device__ __forceinline__ int height() const {
#ifdef V4_H
        return V4_H;
#else
        return H;
#endif
    }
    __device__ __forceinline__ int width() const {
#ifdef V4_W
        return V4_W;
#else
        return W;
#endif
    }
    __device__ __forceinline__ float operator()(int idx) const {
        if (!pooled) return g[idx];
        const int hw = height() * width(), c = idx / hw;
        return pooled_at(c, idx - c * hw);
    }
    // The same for channel c, pixel q (the epilogues, which know both: no division by H·W; q an
    // offset from the sample's [C][H][W] as elem_q gives it — past H·W, the next sample's pixel,
    // whose channel and pixel the element index's division finds: channel c + C, counted from
    // this sample, which the pooled map's and the mask's indices take as the next sample's)
    __device__ __forceinline__ float at(int c, int q) const {
        const int hw = height() * width();
        if (!pooled) return g[c * hw + q];
        if (CROSS && q >= hw) return (*this)(c * hw + q);
        return pooled_at(c, q);
    }
    // at(c, q) where o = c·H·W + q is the element's offset (the epilogues' whole m-tiles, where q
    // is one of the thread's two pixel rows'): no branch but the dropout's — the pooled word's row,
    // column and bounds are the pixel's alone (the same for the thread's elements of a pixel row,
    // formed once for them), both words' addresses formed and one loaded, where at() branched on
    // `pooled` around a per-element division. The same value: dy·0.25 inside the pooled rows and
    // columns, 0 outside, the mask's scale or 0. (Not CROSS: q past H·W there is a later sample's.)
    __device__ __forceinline__ float at_row(int c, int q, int o) const {
        bool inside;
        const float* pw = pooled_word(c, q, inside);
        const float* src = pooled ? pw : g + o;
        float ds = !pooled || inside ? *src : 0.0f;
        if (pooled) ds = __fmul_rn(ds, 0.25f);
        return masked(ds, o);
    }
    // (pooled) channel c, pixel q < H·W
    __device__ __forceinline__ float pooled_at(int c, int q) const {
        bool inside;
        const float* pw = pooled_word(c, q, inside);
        if (!inside) return 0.0f;
        // __fmul_rn: the products the pooling kernels store, never contracted into a later add
        return masked(__fmul_rn(*pw, 0.25f), c * (height() * width()) + q);
    }
    // The pooled word of channel c, pixel q < H·W, and whether the pooling's floor kept its row and
    // column (`inside`; the word's address is formed either way, never read outside).
    __device__ __forceinline__ const float* pooled_word(int c, int q, bool& inside) const {
        const int h = height(), w = width(), ho = h / 2, wo = w / 2;
        const int y = q / w, x = q - y * w;
        inside = y / 2 < ho && x / 2 < wo;
        return g + ((long long)c * ho + y / 2) * wo + x / 2;
    }
    // The dropout's mask on element idx of the sample (·scale where the step's mask keeps it, else 0).
    __device__ __forceinline__ float masked(float ds, int idx) const {
        if (!dropout) return ds;
        return uniform24(key, t, i0 + (unsigned long long)idx) >= p ? __fmul_rn(ds, scale) : 0.0f;
    }
};

// The reader of ∂L/∂s for sample b at step t: grad_out [T][B][C][H][W], or (pooled) the pooling's
// output gradient [T][B][C][H/2][W/2].
__device__ __forceinline__ V4Grad v4_grad(const float* grad_out, const V4GradIn& gi, int t, int b, const LayerDims& d) {
    const long long n = (long long)DIM_C * DIM_H * DIM_W;
    const long long plane = gi.pooled ? (long long)DIM_C * (DIM_H / 2) * (DIM_W / 2) : n;
    const unsigned long long key = gi.pooled && gi.dropout ? gi.keys[gi.slot] : 0ull;
    return V4Grad{grad_out + ((long long)t * d.B + b) * plane, gi.pooled, DIM_H, DIM_W, gi.pooled && gi.dropout, gi.p, gi.scale,
                  key, gi.index0 + (unsigned long long)b * n, (unsigned int)t};
}

// dz = (∂L/∂s + fb)·H(v − θ)·sign′(z), pointwise from the saved tensors (the backward's phase 2).
struct V4Dz {
    V4Grad gout;
    const float* fb;  // this step's feedback slot (∂L/∂s + fb, phase 3 of step t + D), or null
    const float* v;
    const V4Z* z;
    NeuronParams np;
    __device__ __forceinline__ float operator()(int idx) const {
        const float ds = fb ? __ldcg(fb + idx) : gout(idx);
        return ds * fire(np, v[idx] - np.threshold) * saved_sign_grad(np, z[idx]);
    }
    // (V4_PREFETCH: the slot or ∂L/∂s, and z; v is vt_src's array, prefetched as the weight
    // gradient's X; ∂L/∂s through the pooling's backward is not prefetched)
    __device__ __forceinline__ void prefetch(int idx) const {
        if (fb) prefetch_l2(fb + idx);
        else if (!gout.pooled) prefetch_l2(gout.g + idx);
        prefetch_l2(z + idx);
    }
};

// dz loads three or four words per element (see StageBatch): half the elements in flight.
namespace v4 {
template <>
struct StageBatch<V4Dz> {
    static constexpr int U = 4;
};
}  // namespace v4

// The network's 2×2 average pooling of one step's spikes s_t [B][C][H][W] into y_t [B][C][H/2][W/2]
// (pool.cu's avgpool2_forward: the same sum in the same order, the same bits; floor on odd sizes),
// after the step's last phase: nothing later in the launch writes s_t, and y is read only after the
// launch, so it needs no ordering of its own. The layer's output is then read from L2 while it is
// hot, and the pooling needs no launch. A block pools the outputs it owns (v4/sync.cuh): those of
// its channels whose top-left pixel lies in its range; the row below belongs to it or to the next
// range, a partner (R ≥ 1), which has completed the step. Four outputs per thread and pass, their
// 16 loads issued before any sum: one block per SM (8 warps) cannot hide a round trip per output
// (SASS: 4 loads, then the store, per iteration). Y = signed char (V4Window::pool_q8, int8
// spikes): the int8 code c = the sum of the four spikes, whose value c · 0.25 is the f32 output's
// exactly (pool.cu's avgpool2_forward_s8_q8).
template <class Y>
__device__ __forceinline__ void pool_owned(const V4S* s_t, Y* y_t, const LayerDims& d, const V4Dims& vd, const BlockShare* sh) {  // (DIM_*: d's or constants)
    const int ho = DIM_H / 2, wo = DIM_W / 2;
    const int co0 = (blockIdx.x % vd.groups) * CO_T;
    const long long start = sh->start, end = sh->end;
    if (start >= end || wo == 0) return;
    // items (channel of the group, image row of the range, pooled column): the even rows' pixels 2·ox
    const long long row0 = start / DIM_W, rows = (end - 1) / DIM_W - row0 + 1, total = CO_T * rows * wo;
    constexpr int U = 4;
    for (long long j0 = threadIdx.x; j0 < total; j0 += U * THREADS) {
        float x[U][4];
        long long at[U];  // the output's index, or −1 (not this block's, or past the map)
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long long j = j0 + u * THREADS;
            at[u] = -1;
            if (j >= total) continue;
            const long long k = j / wo, cl = k / rows, gr = row0 + (k - cl * rows);
            const int ox = (int)(j - k * wo), c = co0 + (int)cl, b = (int)(gr / DIM_H), y = (int)(gr - (long long)b * DIM_H);
            const long long q = gr * DIM_W + 2 * ox;
            if (c >= DIM_C || (y & 1) || y / 2 >= ho || q < start || q >= end) continue;
            const V4S* r0 = s_t + ((long long)b * DIM_C + c) * DIM_H * DIM_W + (long long)y * DIM_W + 2 * ox;
            const V4S* r1 = r0 + DIM_W;
            x[u][0] = (float)__ldcg(r0);
            x[u][1] = (float)__ldcg(r0 + 1);
            x[u][2] = (float)__ldcg(r1);
            x[u][3] = (float)__ldcg(r1 + 1);
            at[u] = (((long long)b * DIM_C + c) * ho + y / 2) * wo + ox;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (at[u] < 0) continue;
            const float sum = x[u][0] + x[u][1] + x[u][2] + x[u][3];  // exact: spikes are −1, 0, 1
            if (sizeof(Y) == 1) y_t[at[u]] = (Y)(int)sum;
            else y_t[at[u]] = sum * 0.25f;
        }
    }
}

// Forward. Cooperative launch: grid = groups · ranges, 256 threads, dynamic smem as V4Dims says.
// bar: one zeroed u32. wfrag/winv: the weight-fragment scratch (rebuilt by every launch).
// v_prev: v_{t0−1} [B][N] (read when t0 > 0); v_last: where v_{t1−1} is also written (or null).
// pooled: the 2×2 average pooling of every step's s, [T][B][C][H/2][W/2] (the network's pooling
// layer after this one, fused; f32, or int8 codes with win.pool_q8), or null (the backward's recomputing launches pass null).
__device__ __forceinline__ void forward_v4(const float* __restrict__ params, const float* __restrict__ input, V4S* out, float* v,
                                           float* __restrict__ g, V4Z* z, const float* __restrict__ v_prev, float* v_last, float* pooled,
                                           unsigned int* rowmax, unsigned int* bar, char* wfrag, float* winv, const LayerDims& d,
                                           const NeuronParams& np, const V4Dims& vd, const V4Window& win) {
    extern __shared__ float4 smem4[];
    const V4Smem sm = v4_smem(reinterpret_cast<char*>(smem4), d, vd);
    const int HW = DIM_H * DIM_W, N = DIM_C * HW;
    const long long BN = (long long)d.B * N;
    const int gi = blockIdx.x % vd.groups, co0 = gi * CO_T;
    const float* bb = params + d.off_bb;
    const float* be = params + d.off_be;
    // the window's slots of v's row maxima start at zero (build_weight_fragments' grid barrier
    // orders this before phase A's atomics)
    if (ROWMAX && DIM_EI) rowmax_zero(rowmax_v(rowmax, d, win.t0), win.t1 - win.t0, d);
    build_weight_fragments<false>(wfrag, winv, params, d, vd, bar, sm.red);
    block_share_init(sm.share, d, vd);  // (the phases' order and the owned work: v4/sync.cuh)
    unsigned int phase = 0;             // phases completed (V4_SYNC)
    const char* wg_b = wfrag + (long long)gi * vd.wslice_bytes;  // this block's slices in wfrag
    const char* wg_e = wfrag + ((long long)vd.groups + gi) * vd.wslice_bytes;
    const float winv_b = DIM_BACK ? __ldcg(winv + gi) : 1.0f, winv_e = DIM_EI ? __ldcg(winv + vd.groups + gi) : 1.0f;
    if (vd.w_resident) {
        if (DIM_BACK) load_weight_slice(sm.wb, wfrag, 0, vd);
        if (DIM_EI) load_weight_slice(sm.we, wfrag, 1, vd);
        cp_async_wait_all();
        __syncthreads();
    }
    for (int t = win.t0; t < win.t1; ++t) {
        const long long ot = (long long)t * BN;            // s: every step
        const long long wt = (long long)(t - win.t0) * BN;  // v, g, z: the window's steps
        const float* in_t = input + (d.t_in == 1 ? 0 : (long long)(t - win.in_t0) * BN);
        // phase A: a = W_b ⊛ s_{t−D} + b_b, g, v_t (and s_t when ei is off)
        const bool conv_b = DIM_BACK && t >= d.D;
        for_each_chunk(d, vd, [&](const Chunk& ch) V4_INLINE_LAMBDA {
            const long long sb = (long long)ch.b * N;
            float acc[MT][NT][4] = {};
            float inv_s = 1.0f;
            if (V4_PREFETCH) {
                prefetch_owned_l2(in_t + sb, ch, co0, d);
                if (t > 0) prefetch_owned_l2((t > win.t0 ? v + wt - BN : v_prev) + sb, ch, co0, d);
            }
            if (conv_b) {
                // spikes are exact in every format; the smooth mode's s (gradient checks) is real
                const V4Spikes s_past{out + ot - (long long)d.D * BN + sb};
                if (np.smooth) {
                    const float scale = halo_scale<true>(s_past, ch, d, sm.red, inv_s);
                    conv_all_slabs<true, PLANES>(acc, sm.halo, sm.wb, wg_b, s_past, scale, ch, d, vd);
                } else {
                    conv_all_slabs<false, 1>(acc, sm.halo, sm.wb, wg_b, s_past, 1.0f, ch, d, vd);
                }
            }
            const float sc_b = winv_b * inv_s;
            // the input, this thread's own v_{t−1} (the window's previous step, or the checkpoint)
            // and the gate's bias; the chunk's sample's words of each array (Owned::o from here)
            struct InVp {
                float in, vp, b;
            };
            const float* in_c = in_t + sb;
            const float* vp_c = t == 0 ? nullptr : (t > win.t0 ? v + wt - BN : v_prev) + sb;  // (v_prev: null when t0 = 0)
            float* g_c = g + wt + sb;
            float* v_c = v + wt + sb;
            V4S* out_c = out + ot + sb;
            auto load = [&](const Owned& e) { return InVp{in_c[e.o], t == 0 ? 0.0f : vp_c[e.o], DIM_BACK ? bb[e.c] : 0.0f}; };
            PixelMax vmax;  // (fp32 mode with ei: v_t's row maxima, for phase B's and the backward's scales)
            for_each_owned_loaded<LOADS_AHEAD>(ch, co0, d, load, [&](const Owned& e, const InVp& x) {
                float cur = x.in;
                if (DIM_BACK) {
                    const float gt = sigmoidf_(x.b + acc[e.mi][e.ni][e.i] * sc_b);
                    g_c[e.o] = gt;
                    cur = gt * cur;
                }
                float u = 0.0f;
                if (t > 0) u = x.vp * (1.0f - fire(np, x.vp - np.threshold));
                const float vt = np.leak * u + cur;
                v_c[e.o] = vt;
                if (ROWMAX) vmax.add(e.mi, e.i, vt);
                if (v_last && t == win.t1 - 1) v_last[sb + e.o] = vt;
                if (!DIM_EI) out_c[e.o] = (V4S)fire(np, vt - np.threshold);
            });
            if (ROWMAX && DIM_EI) vmax.commit(rowmax_v(rowmax, d, t) + ch.b * DIM_H, ch, d);
        });
        phase_done(bar, sm.share, phase);  // v_t (and s_t) are written
        if (DIM_EI) {
            // phase B: z = W_e ⊛ v_t + b_e, s_t = sign(z)·H(v_t − θ)
            for_each_chunk(d, vd, [&](const Chunk& ch) V4_INLINE_LAMBDA {
                const long long sb = (long long)ch.b * N;
                float acc[MT][NT][4] = {};
                const V4Plain vt_src{v + wt + sb};
                float inv_v;
                const float scale = ROWMAX ? rowmax_scale(rowmax_v(rowmax, d, t) + ch.b * DIM_H, ch, d, inv_v)
                                           : halo_scale<true>(vt_src, ch, d, sm.red, inv_v);
                conv_all_slabs<true, PLANES>(acc, sm.halo, sm.we, wg_e, vt_src, scale, ch, d, vd);
                const float sc = winv_e * inv_v;
                const float* v_c = v + wt + sb;
                V4Z* z_c = z + wt + sb;
                V4S* out_c = out + ot + sb;
                auto load_v = [&](const Owned& e) { return make_float2(v_c[e.o], be[e.c]); };
                for_each_owned_loaded<LOADS_AHEAD>(ch, co0, d, load_v, [&](const Owned& e, float2 vb) {
                    const float vt = vb.x;
                    const float zt = vb.y + acc[e.mi][e.ni][e.i] * sc;
                    z_c[e.o] = save_z(np, zt);
                    out_c[e.o] = (V4S)(sign_(np, zt) * fire(np, vt - np.threshold));
                });
            });
            phase_done(bar, sm.share, phase);  // s_t is written before a later step's gate and the pooling read it
        }
        if (pooled) {
            const long long at = (long long)t * d.B * DIM_C * (DIM_H / 2) * (DIM_W / 2);
            if (win.pool_q8) pool_owned(out + ot, reinterpret_cast<signed char*>(pooled) + at, d, vd, sm.share);
            else pool_owned(out + ot, pooled + at, d, vd, sm.share);
        }
    }
}

// Backward (BPTT). Cooperative launch as the forward. Scratch: dvbuf [B][N], fb [min(D,T)][B][N]
// (slot t mod D: ∂L/∂s_t + fb_t, written by phase 3 of step t + D),
// da [B][N] (one step), dw_part [ranges][2][groups·CO_T][k²·c_pad + 1] (each block's partial
// weight and bias gradients: its accumulators themselves when dw_smem is 0), db_carry
// [grid][4·NT][THREADS] (each thread's bias partial sums between the launches of a windowed
// backward; unused when the window is the whole loop).
__device__ __forceinline__ void backward_v4(const float* __restrict__ params, float* grads, const float* __restrict__ input,
                                            const V4S* __restrict__ out, const float* __restrict__ v, const float* __restrict__ g,
                                            const V4Z* __restrict__ z, const float* __restrict__ grad_out, const V4GradIn& grad_in_of, float* grad_in, float* dvbuf,
                                            float* fb, float* dzr, float* da, float* dw_part, float* db_carry, unsigned int* rowmax, unsigned int* bar,
                                            char* wfrag, float* winv, const LayerDims& d, const NeuronParams& np, const V4Dims& vd,
                                            const V4Window& win) {
    extern __shared__ float4 smem4[];
    const V4Smem sm = v4_smem(reinterpret_cast<char*>(smem4), d, vd);
    const int HW = DIM_H * DIM_W, N = DIM_C * HW, CPAD = DIM_CPAD;
    const long long BN = (long long)d.B * N;
    const int gi = blockIdx.x % vd.groups, range = blockIdx.x / vd.groups, co0 = gi * CO_T;
    const int n_all = KK * CPAD;
    // this block's accumulators: rows co0 … co0 + CO_T − 1 of each gate's [groups·CO_T][n_all + 1]
    // slab (the last column: the bias) in dw_part's slice of this range
    const long long slab = (long long)vd.groups * CO_T * (n_all + 1);
    float* part = dw_part + (long long)range * 2 * slab;
    float* dw_b;
    float* dw_e;
    // the smem accumulators have no bias column, and rows padded to DW_SMEM_PITCH (bank spread)
    const int dw_pitch = dw_on_chip(vd) ? DW_SMEM_PITCH(n_all) : n_all + 1;
    if (dw_on_chip(vd)) {
        dw_b = sm.dw;
        dw_e = sm.dw + CO_T * dw_pitch;
    } else {
        dw_b = part + (long long)co0 * (n_all + 1);
        dw_e = part + slab + (long long)co0 * (n_all + 1);
    }
    // the accumulators start at zero in the launch that begins at the last step; a later window's
    // launch continues the sums where the previous one left them (dw_part, db_carry): the same
    // additions in the same order as one launch over the whole loop
    const bool first_launch = win.t1 == d.T, last_launch = win.t0 == 0;
    if (first_launch) {
        for (int j = threadIdx.x; j < CO_T * n_all; j += THREADS) {
            const int row = j / n_all, n = j - row * n_all;
            dw_b[row * dw_pitch + n] = 0.0f;
            dw_e[row * dw_pitch + n] = 0.0f;
        }
    } else if (dw_on_chip(vd)) {
        // a later window's launch takes the sums up from dw_part by cp.async, 4 bytes each (the
        // rows' pitches differ: n_all + 1 there, DW_SMEM_PITCH here): every element's copy in
        // flight at once and no registers held; waited for here, before the barrier that precedes
        // the first fold (build_weight_fragments)
        for (int j = threadIdx.x; j < CO_T * n_all; j += THREADS) {
            const int row = j / n_all, n = j - row * n_all;
            cp_async4(dw_b + row * dw_pitch + n, part + (long long)(co0 + row) * (n_all + 1) + n);
            cp_async4(dw_e + row * dw_pitch + n, part + slab + (long long)(co0 + row) * (n_all + 1) + n);
        }
        cp_async_wait_all();
    }
    // the thread's bias partial sums, per (n-tile, column pair half): in registers across the whole
    // loop, or (DB_CARRIED) in db_carry between phase 2's epilogues
    float db_b[NT][2] = {}, db_e[NT][2] = {};
    // (formed where it is used, at both ends of the loop: an address held across the loop took
    // two of the fashion L1 fp32 backward's 255 registers)
    auto thread_carry = [&]() { return db_carry + (long long)blockIdx.x * 4 * NT * THREADS + threadIdx.x; };
    auto load_db = [&]() {
        const float* carry = thread_carry();
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                db_b[ni][h] = carry[(2 * ni + h) * THREADS];
                db_e[ni][h] = carry[(2 * NT + 2 * ni + h) * THREADS];
            }
    };
    auto store_db = [&]() {
        float* carry = thread_carry();
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                carry[(2 * ni + h) * THREADS] = db_b[ni][h];
                carry[(2 * NT + 2 * ni + h) * THREADS] = db_e[ni][h];
            }
    };
    if (DB_CARRIED && first_launch) store_db();  // the sums start at zero in db_carry
    else if (!DB_CARRIED && !first_launch) load_db();
    // da's two slots of row maxima start at zero (ordered before phase 2's atomics by the barrier
    // in build_weight_fragments); dz's are zeroed in the loop, each before phase 3 fills it
    if (ROWMAX && DIM_BACK) rowmax_zero(rowmax_da(rowmax, d, 0), 2, d);
    build_weight_fragments<true>(wfrag, winv, params, d, vd, bar, sm.red);
    block_share_init(sm.share, d, vd);  // (the phases' order and the owned work: v4/sync.cuh)
    unsigned int phase = 0;             // phases completed (V4_SYNC)
    // dz and da staged once, where the weight gradient reads them (dy_shares_slab), and then the
    // weight gradient's X (v_t, s_{t−D}) staged in the same walk, into x_planes
    const bool y_staged = dy_shares_slab(vd);
    char* const dy_planes = y_staged ? sm.own : sm.halo;
    char* const x_planes = y_staged ? sm.halo : nullptr;
    const char* wg_b = wfrag + (long long)gi * vd.wslice_bytes;
    const char* wg_e = wfrag + ((long long)vd.groups + gi) * vd.wslice_bytes;
    const float winv_b = DIM_BACK ? __ldcg(winv + gi) : 1.0f, winv_e = DIM_EI ? __ldcg(winv + vd.groups + gi) : 1.0f;
    if (vd.w_resident) {
        if (DIM_BACK) load_weight_slice(sm.wb, wfrag, 0, vd);
        if (DIM_EI) load_weight_slice(sm.we, wfrag, 1, vd);
        cp_async_wait_all();
    }
    __syncthreads();
    for (int t = win.t1 - 1; t >= win.t0; --t) {
        const long long ot = (long long)t * BN;            // s, ∂L/∂s, ∂L/∂I, the input: every step
        const long long wt = (long long)(t - win.t0) * BN;  // v, g, z: the window's steps
        const float* in_t = input + (d.t_in == 1 ? 0 : (long long)(t - win.in_t0) * BN);
        const bool has_fb = DIM_BACK && t + d.D < d.T;
        const float* fb_t = has_fb ? fb + (long long)(t % d.D) * BN : nullptr;
        // dz_t was formed by phase 3 of step t + D in this launch (the step ran: t + D < t1, and it
        // had the slot); this step's phase 3 forms dz_{t−D} (its v and z are in the window). Where
        // dz is formed, the kernel keeps its row maxima (DZ_ROWMAX, v4/rowmax.cuh) and stores it in
        // the ring (DZ_RING); da_t's maxima are filled by this phase and read by phase 3
        const bool dz_formed = DIM_EI && has_fb && t + d.D < win.t1;
        const bool forms_dz = DIM_BACK && DIM_EI && t - d.D >= win.t0;
        const bool dz_rows = DZ_ROWMAX && dz_formed, fill_dz_rows = DZ_ROWMAX && forms_dz;
        const bool dz_saved = DZ_RING && dz_formed, store_dz = DZ_RING && forms_dz;
        const bool fill_da_rows = ROWMAX && DIM_BACK && t >= d.D;
        if (ROWMAX && DIM_BACK) {
            zero_owned_rows(rowmax_da(rowmax, d, t + 1), sm.share, d, vd);  // read by phase 3 of step t + 1, filled by phase 2 of step t − 1
            if (fill_dz_rows) zero_owned_rows(rowmax_dz(rowmax, d, t - d.D), sm.share, d, vd);
        }
        // phase 2: dz (staged on the fly), dv = … + W_eᵀ ⊛ dz, ∂I, da; dW_e += dz ⋆ v_t
        for_each_chunk(d, vd, [&](const Chunk& ch) V4_INLINE_LAMBDA {
            const long long sb = (long long)ch.b * N;
            float acc[MT][NT][4] = {};
            float inv_dz = 1.0f, inv_v = 1.0f, sc_dz = 1.0f, sc_v = 1.0f;
            const V4Grad ds_src = v4_grad(grad_out, grad_in_of, t, ch.b, d);
            const V4Dz dz_src{ds_src, has_fb ? fb_t + sb : nullptr, v + wt + sb, z + wt + sb, np};  // (ds from the slot when it has one)
            const V4Plain vt_src{v + wt + sb};
            const V4Plain dz_ring{dz_saved ? dzr + (long long)(t % d.D) * BN + sb : nullptr};  // (dz_t stored: V4_DZ_RING)
            if (V4_PREFETCH) {
                // the epilogue's inputs but v, which the halo walk stages (fb and z are staged too
                // where dz is formed on the fly: prefetched anyway, a line each)
                if (has_fb) prefetch_owned_l2(fb_t + sb, ch, co0, d);
                else if (!ds_src.pooled) prefetch_owned_l2(ds_src.g, ch, co0, d);
                if (t != d.T - 1) prefetch_owned_l2(dvbuf + sb, ch, co0, d);
                if (DIM_BACK) {
                    prefetch_owned_l2(g + wt + sb, ch, co0, d);
                    prefetch_owned_l2(in_t + sb, ch, co0, d);
                }
                if (DIM_EI) prefetch_owned_l2(z + wt + sb, ch, co0, d);
                if (d.t_in == 1 && t != d.T - 1) prefetch_owned_l2(grad_in + sb, ch, co0, d);  // (added to)
                // and the next chunk's halo: v_t (the weight gradient's X, and V4Dz's v) and dz_t's
                // sources (the ring, or the slot and z where dz is formed on the fly)
                if (DIM_EI) {
                    prefetch_next_halo_l2(vt_src, ch, d);
                    if (dz_saved) prefetch_next_halo_l2(dz_ring, ch, d);
                    else prefetch_next_halo_l2(dz_src, ch, d);
                }
            }
            if (DIM_EI) {
                if (dz_rows) {  // (both scales from row maxima: one walk over the rows)
                    sc_dz = rowmax_scale_pair(rowmax_dz(rowmax, d, t) + ch.b * DIM_H, rowmax_v(rowmax, d, t) + ch.b * DIM_H, ch, d, inv_dz, sc_v, inv_v);
                } else {
                    sc_dz = halo_scale<true>(dz_src, ch, d, sm.red, inv_dz);
                    sc_v = ROWMAX ? rowmax_scale(rowmax_v(rowmax, d, t) + ch.b * DIM_H, ch, d, inv_v) : halo_scale<true>(vt_src, ch, d, sm.red, inv_v);
                }
                // dz_t from the ring where phase 3 stored it, else formed on the fly (two readers)
                // (and v_t, the weight gradient's X, in the same walk where dz is its dY: x_planes)
                if (dz_saved) conv_all_slabs<true, PLANES, V4Plain, true>(acc, dy_planes, sm.we, wg_e, dz_ring, sc_dz, ch, d, vd, x_planes, vt_src, sc_v, sm.pix);
                else conv_all_slabs<true, PLANES, V4Dz, true>(acc, dy_planes, sm.we, wg_e, dz_src, sc_dz, ch, d, vd, x_planes, vt_src, sc_v, sm.pix);
            }
            const float sc = winv_e * inv_dz;
            // the element's saved state and carried gradients, loaded ahead (for_each_owned_loaded)
            // (gin: ∂L/∂I's sum over the later steps where one input serves every step (t_in = 1),
            // loaded with the rest: added to in the update, its load came after the element's first
            // stores, which it could not move above — a round trip per element, none in flight)
            struct Saved {
                float vt, ds, dv_next, gt, in, gin;
                V4Z zt;
            };
            // the chunk's sample's words of each array (Owned::o from here); ∂L/∂s_t (+ fb_t: the
            // slot holds both) from one array where it is one (the slot, or ∂L/∂s not through the
            // pooling's backward): then whole m-tiles read it with no branch (ds_c)
            const float* v_c = v + wt + sb;
            const float* fb_c = has_fb ? fb_t + sb : nullptr;
            const float* ds_c = has_fb ? fb_c : (ds_src.pooled ? nullptr : ds_src.g);
            float* dv_c = dvbuf + sb;
            const float* g_c = g + wt + sb;
            const float* in_c = in_t + sb;
            const V4Z* z_c = z + wt + sb;
            float* gin_c = grad_in + (d.t_in == 1 ? 0 : ot) + sb;
            float* da_c = da + sb;
            // dv_{t+1} and ∂L/∂I's running sum are loaded whatever the step and selected away where
            // it has none: a load under the step's condition formed its address per element (the
            // buffer's base reloaded from the kernel's parameters, a 64-bit add and shift: five
            // instructions each), where an unconditional one takes its offset from the pixel row's
            // pointer as an immediate. Where the step has no running sum (with T_in = T, every
            // step) the sum's load reads dv's word again, already on its way, rather than a word of
            // grad_in that the store below overwrites (a device-memory read per element). The
            // 64-accumulator tiles, which form every element's addresses anyway (no whole-tile
            // path), keep the sum's load under the condition: the second pointer spilled there
            const bool has_dv_next = t != d.T - 1, has_gin = d.t_in == 1 && t != d.T - 1;
            const float* gin_ld = has_gin ? gin_c : dv_c;
            auto load_rest = [&](const Owned& e, float ds) {
                Saved x;
                x.vt = v_c[e.o];
                x.ds = ds;
                const float dvn = dv_c[e.o], gin = WHOLE_TILES ? gin_ld[e.o] : (has_gin ? gin_c[e.o] : 0.0f);
                x.dv_next = has_dv_next ? dvn : 0.0f;
                x.gt = DIM_BACK ? g_c[e.o] : 1.0f;
                x.in = DIM_BACK ? in_c[e.o] : 0.0f;
                x.zt = DIM_EI ? z_c[e.o] : V4Z{};
                x.gin = has_gin ? gin : 0.0f;
                return x;
            };
            auto load = [&](const Owned& e) { return load_rest(e, has_fb ? __ldcg(fb_c + e.o) : ds_src.at(e.c, e.q)); };
            auto load_whole = [&](const Owned& e) { return load_rest(e, __ldcg(ds_c + e.o)); };
            // 8, 4 or 2 elements' loads ahead by the tile's accumulators (v4/chunks.cuh
            // LOADS_AHEAD_PHASE2; 2 and 1 until 2026-12-07: 12 words in flight per thread, none
            // beyond the element at hand on the 32- and 64-accumulator tiles)
            constexpr int E = LOADS_AHEAD_PHASE2;
            PixelMax damax;  // (fp32 mode, back: da_t's row maxima, phase 3's scale)
            auto update = [&](const Owned& e, const Saved& sv) {
                const int mi = e.mi, ni = e.ni, i = e.i;
                const float vt = sv.vt;
                const float x = vt - np.threshold;
                const float o = fire(np, x);
                const float ds = sv.ds;
                const float du = t == d.T - 1 ? 0.0f : np.leak * sv.dv_next;
                float d_o = ds;
                if (DIM_EI) {
                    const V4Z zt = sv.zt;
                    d_o = ds * saved_sign(np, zt);
                    db_e[ni][i & 1] += ds * o * saved_sign_grad(np, zt);
                }
                d_o -= du * vt;
                float dv = du * (1.0f - o) + d_o * fire_grad(np, x);
                if (DIM_EI) dv += acc[mi][ni][i] * sc;
                dv_c[e.o] = dv;
                const float gt = sv.gt;
                const float dcur = dv * gt;
                // (one store of a selected value: two stores, one per case, each formed its own
                // address, and the element branched between them; the 64-accumulator tiles branch
                // on T_in first, where the select alone spilled in the span build)
                if (WHOLE_TILES || d.t_in == 1) gin_c[e.o] = has_gin ? sv.gin + dcur : dcur;
                else gin_c[e.o] = dcur;
                if (DIM_BACK) {
                    const float a_grad = dv * sv.in * gt * (1.0f - gt);
                    da_c[e.o] = a_grad;
                    if (ROWMAX) damax.add(mi, i, a_grad);
                    db_b[ni][i & 1] += a_grad;
                }
            };
            if (DB_CARRIED) load_db();
            for_each_owned_loaded<E>(ch, co0, d, ds_c != nullptr, load_whole, load, update);
            if (DB_CARRIED) store_db();
            if (fill_da_rows) damax.commit(rowmax_da(rowmax, d, t) + ch.b * DIM_H, ch, d);
            if (DIM_EI) {
                if (dz_saved) wgrad_all_slabs<true, PLANES>(dw_e, dw_pitch, y_staged, dz_ring, sc_dz, inv_dz, vt_src, sc_v, inv_v, co0, sm, ch, d, vd);
                else wgrad_all_slabs<true, PLANES>(dw_e, dw_pitch, y_staged, dz_src, sc_dz, inv_dz, vt_src, sc_v, inv_v, co0, sm, ch, d, vd);
            }
        });
        phase_done(bar, sm.share, phase);  // da_t is written; the fb and dz slots of step t are read
        if (!(DIM_BACK && t >= d.D)) continue;
        // phase 3: fb_{t−D} = W_bᵀ ⊛ da_t, stored with ∂L/∂s_{t−D} added (the slot's contract);
        // dW_b += da_t ⋆ s_{t−D}
        float* fb_slot = fb + (long long)((t - d.D) % d.D) * BN;
        float* dz_slot = store_dz ? dzr + (long long)((t - d.D) % d.D) * BN : nullptr;  // (the same ring index)
        for_each_chunk(d, vd, [&](const Chunk& ch) V4_INLINE_LAMBDA {
            const long long sb = (long long)ch.b * N;
            const V4Grad ds_past = v4_grad(grad_out, grad_in_of, t - d.D, ch.b, d);
            float acc[MT][NT][4] = {};
            const V4Plain da_src{da + sb};
            const V4Spikes s_past{out + ot - (long long)d.D * BN + sb};
            if (V4_PREFETCH) {
                prefetch_next_halo_l2(s_past, ch, d);  // (da_t was written by phase 2 just before: in L2)
                if (!ds_past.pooled) prefetch_owned_l2(ds_past.g, ch, co0, d);
                if (fill_dz_rows || store_dz) {
                    const long long wp = (long long)(t - d.D - win.t0) * BN + sb;  // v, z of step t − D
                    prefetch_owned_l2(v + wp, ch, co0, d);
                    prefetch_owned_l2(z + wp, ch, co0, d);
                }
            }
            float inv_da, inv_s = 1.0f;
            const float sc_da = ROWMAX ? rowmax_scale(rowmax_da(rowmax, d, t) + ch.b * DIM_H, ch, d, inv_da)
                                       : halo_scale<true>(da_src, ch, d, sm.red, inv_da);
            const float sc_s = np.smooth ? halo_scale<true>(s_past, ch, d, sm.red, inv_s) : 1.0f;
            // (and s_{t−D}, the weight gradient's X, in the same walk where da is its dY: x_planes)
            if (np.smooth) conv_all_slabs<true, PLANES, V4Plain, true>(acc, dy_planes, sm.wb, wg_b, da_src, sc_da, ch, d, vd, x_planes, s_past, sc_s, sm.pix);
            else conv_all_slabs<true, PLANES, V4Plain, false>(acc, dy_planes, sm.wb, wg_b, da_src, sc_da, ch, d, vd, x_planes, s_past, 1.0f, sm.pix);
            const float sc = winv_b * inv_da;
            float* fb_c = fb_slot + sb;  // (Owned::o from the chunk's sample's words)
            float* dz_c = store_dz ? dz_slot + sb : nullptr;
            // ∂L/∂s_{t−D} on the whole m-tiles (at_row; under CROSS a pixel row may lie in a later
            // sample: at)
            auto ds_whole = [&](const Owned& e) { return CROSS ? ds_past.at(e.c, e.q) : ds_past.at_row(e.c, e.q, e.o); };
            // ∂L/∂s_{t−D} + fb_{t−D}: the sum phase 2 of step t − D formed from the two (the
            // product rounded first, as when it was stored: the same bits), formed here once per
            // element instead of in each of phase 2's passes over the halo (the pooled gradient's
            // index arithmetic, the dropout's mask) and its epilogue
            if (fill_dz_rows || store_dz) {
                // and dz_{t−D} = (∂L/∂s + fb)·H(v − θ)·sign′(z), V4Dz's product: its row maxima,
                // and (V4_DZ_RING) the value itself in the ring
                const long long wp = (long long)(t - d.D - win.t0) * BN + sb;  // v, z of step t − D
                struct DsVz {
                    float ds, v;
                    V4Z z;
                };
                PixelMax dzmax;
                const float* v_p = v + wp;
                const V4Z* z_p = z + wp;
                for_each_owned_loaded<LOADS_AHEAD_PHASE3>(
                    ch, co0, d, true, [&](const Owned& e) { return DsVz{ds_whole(e), v_p[e.o], z_p[e.o]}; },
                    [&](const Owned& e) { return DsVz{ds_past.at(e.c, e.q), v_p[e.o], z_p[e.o]}; },
                    [&](const Owned& e, const DsVz& x) {
                        const float sum = __fadd_rn(x.ds, __fmul_rn(acc[e.mi][e.ni][e.i], sc));
                        fb_c[e.o] = sum;
                        const float dzv = sum * fire(np, x.v - np.threshold) * saved_sign_grad(np, x.z);
                        if (store_dz) dz_c[e.o] = dzv;
                        if (fill_dz_rows) dzmax.add(e.mi, e.i, dzv);
                    });
                if (fill_dz_rows) dzmax.commit(rowmax_dz(rowmax, d, t - d.D) + ch.b * DIM_H, ch, d);
            } else {
                for_each_owned_loaded<LOADS_AHEAD_PHASE3>(
                    ch, co0, d, true, ds_whole, [&](const Owned& e) { return ds_past.at(e.c, e.q); },
                    [&](const Owned& e, float ds) { fb_c[e.o] = __fadd_rn(ds, __fmul_rn(acc[e.mi][e.ni][e.i], sc)); });
            }
            if (np.smooth) wgrad_all_slabs<true, PLANES>(dw_b, dw_pitch, y_staged, da_src, sc_da, inv_da, s_past, sc_s, inv_s, co0, sm, ch, d, vd);
            else wgrad_all_slabs<false, 1>(dw_b, dw_pitch, y_staged, da_src, sc_da, inv_da, s_past, 1.0f, 1.0f, co0, sm, ch, d, vd);
        });
        phase_done(bar, sm.share, phase);  // the fb slot is written before step t − D reads it; da_t is read
    }
    if (!last_launch) {
        // an earlier window follows: keep the sums as they are (no reduction yet)
        if (!DB_CARRIED) store_db();
        if (dw_on_chip(vd)) {
            __syncthreads();
            for (int j = threadIdx.x; j < CO_T * n_all; j += THREADS) {
                const int row = j / n_all, n = j - row * n_all;
                part[(long long)(co0 + row) * (n_all + 1) + n] = dw_b[row * dw_pitch + n];
                part[slab + (long long)(co0 + row) * (n_all + 1) + n] = dw_e[row * dw_pitch + n];
            }
        }
        return;
    }
    // the bias partials: lanes of one t share channels (xor over g), then the warps in order
    if (DB_CARRIED) load_db();
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int gate = 0; gate < 2; ++gate) {
        float(&db)[NT][2] = gate == 0 ? db_b : db_e;
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x = db[ni][h];
                for (int o = 4; o < 32; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
                if (lane < 4) sm.red[warp * CO_T + 8 * ni + 2 * lane + h] = x;
            }
        __syncthreads();
        if (threadIdx.x < CO_T) {
            float s = 0.0f;
            for (int w = 0; w < WARPS; ++w) s += sm.red[w * CO_T + threadIdx.x];
            part[gate * slab + (long long)(co0 + threadIdx.x) * (n_all + 1) + n_all] = s;
        }
        __syncthreads();
    }
    if (dw_on_chip(vd)) {
        for (int j = threadIdx.x; j < CO_T * n_all; j += THREADS) {
            const int row = j / n_all, n = j - row * n_all;
            part[(long long)(co0 + row) * (n_all + 1) + n] = dw_b[row * dw_pitch + n];
            part[slab + (long long)(co0 + row) * (n_all + 1) + n] = dw_e[row * dw_pitch + n];
        }
    }
    grid_sync(bar);  // every block's partial sums are written
    // the fixed-order reduction: element j of both slabs, summed over the ranges 0, 1, …
    const int C = DIM_C;
    for (long long j = blockIdx.x * (long long)THREADS + threadIdx.x; j < 2 * slab; j += (long long)gridDim.x * THREADS) {
        const int gate = (int)(j / slab);
        if (gate == 0 ? !DIM_BACK : !DIM_EI) continue;
        const long long e = j - gate * slab;
        const int co = (int)(e / (n_all + 1)), n = (int)(e - (long long)co * (n_all + 1));
        if (co >= C) continue;
        int tap = 0, ci = 0;
        if (n < n_all) {
            tap = n / CPAD;
            ci = n - tap * CPAD;
            if (ci >= C) continue;
        }
        float s = 0.0f;
        for (int r = 0; r < vd.ranges; ++r) s += __ldcg(dw_part + (long long)r * 2 * slab + j);
        if (n == n_all) grads[(gate == 0 ? d.off_bb : d.off_be) + co] += s;
        else grads[(gate == 0 ? d.off_wb : d.off_we) + ((long long)co * C + ci) * KK + tap] += s;
    }
}

// The kernels: one radius and one precision per module instance (V4_R, V4_PREC; the names say
// which), so the host asks for exactly the name its plan compiled.
#if V4_R == 1 && V4_PREC == PREC_FP32
#define V4_FORWARD backei_forward_v4_r1_fp32
#define V4_BACKWARD backei_backward_v4_r1_fp32
#elif V4_R == 1 && V4_PREC == PREC_TF32
#define V4_FORWARD backei_forward_v4_r1_tf32
#define V4_BACKWARD backei_backward_v4_r1_tf32
#elif V4_R == 1 && V4_PREC == PREC_BF16
#define V4_FORWARD backei_forward_v4_r1_bf16
#define V4_BACKWARD backei_backward_v4_r1_bf16
#elif V4_R == 2 && V4_PREC == PREC_FP32
#define V4_FORWARD backei_forward_v4_r2_fp32
#define V4_BACKWARD backei_backward_v4_r2_fp32
#elif V4_R == 2 && V4_PREC == PREC_TF32
#define V4_FORWARD backei_forward_v4_r2_tf32
#define V4_BACKWARD backei_backward_v4_r2_tf32
#elif V4_R == 2 && V4_PREC == PREC_BF16
#define V4_FORWARD backei_forward_v4_r2_bf16
#define V4_BACKWARD backei_backward_v4_r2_bf16
#else
#error "v4 is built for radius 1 and 2 and the precisions fp32, tf32, bf16"
#endif

extern "C" __global__ void __launch_bounds__(256, 1)
V4_FORWARD(const float* __restrict__ params, const float* __restrict__ input, float* out, float* v, float* __restrict__ g, float* z,
           const float* __restrict__ v_prev, float* v_last, float* pooled, unsigned int* rowmax, unsigned int* bar, char* wfrag, float* winv,
           LayerDims d, NeuronParams np, V4Dims vd, V4Window win) {
    // z: f32 words, or (V4_ZCODE) the same buffer as bytes
    // s and z: f32 words, or (V4_S8, V4_ZCODE) the same buffers as bytes
    forward_v4(params, input, reinterpret_cast<V4S*>(out), v, g, reinterpret_cast<V4Z*>(z), v_prev, v_last, pooled, rowmax, bar, wfrag, winv, d, v4_neuron(np), vd, win);
}

extern "C" __global__ void __launch_bounds__(256, 1)
V4_BACKWARD(const float* __restrict__ params, float* grads, const float* __restrict__ input, const float* __restrict__ out,
            const float* __restrict__ v, const float* __restrict__ g, const float* __restrict__ z, const float* __restrict__ grad_out, V4GradIn grad_in_of,
            float* grad_in, float* dvbuf, float* fb, float* dzr, float* da, float* dw_part, float* db_carry, unsigned int* rowmax, unsigned int* bar,
            char* wfrag, float* winv, LayerDims d, NeuronParams np, V4Dims vd, V4Window win) {
    backward_v4(params, grads, input, reinterpret_cast<const V4S*>(out), v, g, reinterpret_cast<const V4Z*>(z), grad_out, grad_in_of, grad_in, dvbuf, fb, dzr, da, dw_part, db_carry, rowmax, bar, wfrag, winv, d,
                v4_neuron(np), vd, win);
}
