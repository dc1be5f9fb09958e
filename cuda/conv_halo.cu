// conv_halo.cu — stride-1 convolutions (forward and data gradient) on tensor cores with each
// input element staged ONCE per block and channel chunk: the block's input window (its output
// pixels' rows plus the kernel's halo) sits channel-last in shared memory and every tap reads it
// at a shifted row address through ldmatrix (implicit GEMM, the FlashAttention trade: on chip,
// not re-gathered). Host side: src/gpu/conv_halo.rs (plans, descriptors, launches); CPU twins
// src/cpu/conv.rs forward and backward_data; the generic path it stands beside: gemm_tc.cu.
//
// Why. gemm_tc gathers a convolution's B operand per k-step through index tables: every input
// element is loaded, bounds-checked, converted and stored once per TAP (25 times for a 5×5 kernel)
// and feeds only M products each time — at M = 32 (fashion-mnist's conv2 data gradient) that
// staging is ~2/3 of the k-step's 993 instructions (fp32 mode, SASS). Here a block stages its
// window once per 32 input channels and runs all k² taps over it: per tap only the weights' slice
// (BM × 32, pre-arranged by conv_halo_weights, copied by cp.async, double-buffered) moves.
//
// Math (one op; the host fills HaloDesc for the forward or the data gradient):
//   out[s][m][p] = Σ_c Σ_(ky,kx) A[m][c][ky][kx] · in[s][c][p_y + off(ky)][p_x + off(kx)] (+ bias[m])
//   off(j) = sign·(j − origin); in = 0 outside [0, IH) × [0, IW).
//   forward:        m = co, c = ci, A[co][ci][tap] = W[co][ci][tap], in = x, sign +1, origin = pad
//   data gradient:  m = ci, c = co, A[ci][co][tap] = W[co][ci][tap], in = dy, sign −1, origin = pad
//                   (dx[ci][y][x] = Σ W[co][ci][ky][kx] · dy[co][y + pad − ky][x + pad − kx])
// GEMM view: M = output channels, N = the block's output pixels, K = (channel chunk, tap, 16 or 8
// channels); sums f32, per output in the order chunk → tap → channel step (each block owns whole
// outputs: no split-K, no atomics, the same bits for a sample whatever the batch).
//
// Block tile: WM × WN warps, each 32 output channels (2 m16 tiles) × NI n8 tiles of pixels; the
// block's pixels are BN = 8·NI·WN consecutive output pixels (row-major) of one sample, spanning
// `rows` output rows; its window holds rows + k − 1 input rows × halo_w = OW + k − 1 columns.
// Shared memory (dynamic): window [halo pixel][32 channels] (16-bit operands: 40 halves a row, one
// or two planes; tf32: 36 words), then two weight buffers [plane][BM][row]. Rows of 80 or 144
// bytes put 8 consecutive pixels on 8 different 16-byte bank groups for ldmatrix.
//
// Precision (as gemm_tc.cu): fp32 splits both operands into fp16 hi + lo after power-of-two scales
// (maxbits[0]: the weights' largest |w|, maxbits[1]: the input's; an exact input — spikes, int8
// codes of pooled spikes — is unscaled with no lo half): lo·hi, hi·lo, hi·hi per MMA tile; tf32 one
// m16n8k8 product; bf16 one m16n8k16 product.
#include "common.cuh"
#include "grid_digits.cuh"
#include "mma.cuh"

#define PREC_FP32 0
#define PREC_TF32 1
#define PREC_BF16 2

#define HALO_CC 32     // input channels per chunk (a window's row)
#define HALO_ROW16 40  // halves per row of a 16-bit plane (32 + 8: 80 bytes)
#define HALO_ROW32 36  // words per row of the tf32 plane (32 + 4: 144 bytes)

// Host twin: src/gpu/conv_halo.rs HaloDesc, field for field.
struct HaloDesc {
    const float* in;   // [S][CI][IH][IW] f32, or int8 codes (q8)
    const u32* wprep;  // conv_halo_weights' output: [mblock][chunk][tap][plane][bm][row words]
    const float* bias;  // [MO] or null
    float* out;         // [S][MO][OH][OW]
    const float* w;     // W [cout][cin][k][k] (conv_halo_weights' input)
    int S, CI, MO, IH, IW, OH, OW, k;
    int sign, origin, lo;  // off(j) = sign·(j − origin); lo = min over j of off(j)
    int halo_w;            // OW + k − 1
    int tiles;             // pixel tiles per sample: ⌈OH·OW / BN⌉
    int chunks;            // ⌈CI / HALO_CC⌉
    int bm;                // the kernel's BM (conv_halo_weights' row blocks)
    int transposed;        // A[m][c] = W[c][m] (the data gradient), else W[m][c]
    int exact;             // fp32 mode: the input is exact in fp16 (unscaled, no lo half)
    int q8;                // the input is int8 codes c, the value c · q8_factor
    float q8_factor;
    int accumulate;        // add to out instead of writing
};

// Words of one tap's weight slice for a block: planes × BM rows.
template <int PREC>
__device__ __forceinline__ int halo_row_words() {
    return PREC == PREC_TF32 ? HALO_ROW32 : HALO_ROW16 / 2;
}
template <int PREC>
__device__ __forceinline__ int halo_planes_a() {
    return PREC == PREC_FP32 ? 2 : 1;
}

// wprep = the weights as the kernels' A tiles, scaled (fp32 mode: by maxbits[0]'s power of two)
// and converted, zero-padded to whole blocks and chunks: word (mblock, chunk, tap, plane, m, cw)
// holds channels 2cw, 2cw + 1 (16-bit: plane 0 hi or bf16, plane 1 lo) or channel cw (tf32) of
// row m, both of the chunk; pad columns zero. Once per GEMM (the weights are small); the grid-stride
// walk keeps its digits without division (grid_digits.cuh).
template <int PREC>
__device__ __forceinline__ void conv_halo_weights(const HaloDesc d, u32* __restrict__ wprep, const u32* __restrict__ maxbits) {
    constexpr int RW = PREC == PREC_TF32 ? HALO_ROW32 : HALO_ROW16 / 2;
    constexpr int PLANES = PREC == PREC_FP32 ? 2 : 1;
    const int taps = d.k * d.k;
    const int mblocks = (d.MO + d.bm - 1) / d.bm;
    const long long total = (long long)mblocks * d.chunks * taps * PLANES * d.bm * RW;
    GRID_STRIDE_START(total);
    float sa = 1.0f, ia = 1.0f;
    if (PREC == PREC_FP32) pow2_scale(maxbits[0], sa, ia);
    // digits: cw, m, plane, tap, chunk, mblock
    GridDigits<6> g(start, stride, {RW, d.bm, PLANES, taps, d.chunks});
    for (long long i = start; i < total; i += stride, g.advance()) {
        const int cw = (int)g.d[0], ml = (int)g.d[1], plane = (int)g.d[2], tap = (int)g.d[3];
        const int m = (int)g.d[5] * d.bm + ml, c0 = (int)g.d[4] * HALO_CC;
        // W[co][ci][tap] of (m, c): forward (co, ci) = (m, c); data gradient (c, m)
        auto weight = [&](int c) -> float {
            if (m >= d.MO || c >= d.CI) return 0.0f;
            const long long co = d.transposed ? c : m, ci = d.transposed ? m : c;
            const long long cin = d.transposed ? d.MO : d.CI;
            return d.w[(co * cin + ci) * taps + tap];
        };
        u32 word = 0;
        if (PREC == PREC_TF32) {
            if (cw < HALO_CC) word = f32_to_tf32_bits(weight(c0 + cw));
        } else if (2 * cw < HALO_CC) {
            const float x0 = weight(c0 + 2 * cw), x1 = weight(c0 + 2 * cw + 1);
            if (PREC == PREC_BF16) {
                word = pack2(f32_to_bf16_bits(x0), f32_to_bf16_bits(x1));
            } else {
                unsigned short h0, l0, h1, l1;
                split_f16(x0 * sa, h0, l0);
                split_f16(x1 * sa, h1, l1);
                word = plane == 0 ? pack2(h0, h1) : pack2(l0, l1);
            }
        }
        wprep[i] = word;
    }
}

// The element of the input at (c, iy, ix) of sample `s` as loaded: f32, or a code's int bits.
__device__ __forceinline__ float halo_load(const HaloDesc& d, long long plane_off, bool ok) {
    if (!ok) return 0.0f;
    if (d.q8) return __int_as_float((int)reinterpret_cast<const signed char*>(d.in)[plane_off]);
    return d.in[plane_off];
}
__device__ __forceinline__ float halo_decode(const HaloDesc& d, float v) {
    return d.q8 ? (float)__float_as_int(v) * d.q8_factor : v;
}

template <int PREC, int WM, int WN, int NI>
__device__ __forceinline__ void conv_halo(const HaloDesc& d, const u32* __restrict__ maxbits) {
    constexpr int T = 32 * WM * WN, BM = 32 * WM, BN = 8 * NI * WN;
    constexpr int RW = PREC == PREC_TF32 ? HALO_ROW32 : HALO_ROW16 / 2;  // words per smem row
    constexpr int PITCH = 4 * RW;                                         // bytes per smem row
    constexpr int PLANES_A = PREC == PREC_FP32 ? 2 : 1;
    constexpr int WTAP = PLANES_A * BM * RW;  // words of one tap's weight slice
    extern __shared__ float4 smem4[];
    u32* smem = reinterpret_cast<u32*>(smem4);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int wm = warp / WN, wn = warp % WN;
    const int s = blockIdx.x / d.tiles, tile = blockIdx.x - s * d.tiles;
    const int mb = blockIdx.y;
    const int ohw = d.OH * d.OW, p0 = tile * BN;
    const int y_first = p0 / d.OW;
    const int y_last = (min(p0 + BN, ohw) - 1) / d.OW;
    const int hrows = y_last - y_first + d.k;  // the window's input rows
    const int hpix = hrows * d.halo_w;
    const bool lo_b = PREC == PREC_FP32 && !d.exact;
    const int planes_b = lo_b ? 2 : 1;
    u32* win = smem;                                    // [plane][hpix][RW]
    u32* wbuf = smem + planes_b * hpix * RW;            // [2][WTAP]
    float sa = 1.0f, ia = 1.0f, sb = 1.0f, ib = 1.0f;
    if (PREC == PREC_FP32) {
        pow2_scale(maxbits[0], sa, ia);
        if (!d.exact) pow2_scale(maxbits[1], sb, ib);
    }
    const int taps = d.k * d.k;
    // this block's weight slices: chunk-major, tap-minor, WTAP words each
    const u32* wsrc = d.wprep + (long long)mb * d.chunks * taps * WTAP;
    auto copy_weights = [&](int it) {  // slice `it` (= chunk · taps + tap) into buffer it & 1
        const u32* from = wsrc + (long long)it * WTAP;
        u32* to = wbuf + (it & 1) * WTAP;
        // a compile-time trip count, unrolled: no loop inside the tap loop (whose MMAs are the hot loop)
#pragma unroll
        for (int q = 0; q < (WTAP / 4 + T - 1) / T; ++q) {
            const int j = 4 * (tid + q * T);
            if (WTAP % (4 * T) == 0 || j < WTAP) cp_async16(to + j, from + j);
        }
        cp_async_commit();
    };
    // each lane's ldmatrix rows for B: pixel n of n8 tile (2j + lane/16), row lane % 8; its base
    // window offset (the tap adds its shift); pixels past the map read row 0 (results dropped)
    int base[NI / 2];
#pragma unroll
    for (int j = 0; j < NI / 2; ++j) {
        const int n = p0 + wn * 8 * NI + (2 * j + (lane >> 4)) * 8 + (lane & 7);
        const int y = n / d.OW, x = n - y * d.OW;
        base[j] = n < ohw ? (y - y_first) * d.halo_w + x : 0;
    }
    const int bcol = ((lane >> 3) & 1) * 16;  // bytes: the second 8×8 matrix of each n8 tile
    float acc[2][NI][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
    const long long in_plane = (long long)d.IH * d.IW;
    const long long in_sample = (long long)d.CI * in_plane;
    const int iy0 = y_first + d.lo, ix0 = d.lo;  // the window's first input row and column
    copy_weights(0);
    int it = 0;
    for (int chunk = 0; chunk < d.chunks; ++chunk) {
        const int c0 = chunk * HALO_CC;
        __syncthreads();  // the last chunk's window is read
        // Stage the window: a thread per window pixel, its 32 channels' loads issued before any
        // is converted (32 in flight); consecutive threads read consecutive columns (coalesced).
        for (int hp = tid; hp < hpix; hp += T) {
            const int hr = hp / d.halo_w, hc = hp - hr * d.halo_w;
            const int iy = iy0 + hr, ix = ix0 + hc;
            const bool inside = (unsigned)iy < (unsigned)d.IH && (unsigned)ix < (unsigned)d.IW;
            const long long at = (long long)s * in_sample + (long long)c0 * in_plane + (long long)iy * d.IW + ix;
            float v[HALO_CC];
#pragma unroll
            for (int c = 0; c < HALO_CC; ++c) v[c] = halo_load(d, at + c * in_plane, inside && c0 + c < d.CI);
            u32* row = win + hp * RW;
            if (PREC == PREC_TF32) {
#pragma unroll
                for (int c = 0; c < HALO_CC; c += 4)
                    *reinterpret_cast<uint4*>(row + c) =
                        make_uint4(f32_to_tf32_bits(halo_decode(d, v[c])), f32_to_tf32_bits(halo_decode(d, v[c + 1])),
                                   f32_to_tf32_bits(halo_decode(d, v[c + 2])), f32_to_tf32_bits(halo_decode(d, v[c + 3])));
            } else {
#pragma unroll
                for (int c = 0; c < HALO_CC; c += 2) {
                    const float x0 = halo_decode(d, v[c]), x1 = halo_decode(d, v[c + 1]);
                    if (PREC == PREC_BF16) {
                        row[c / 2] = pack2(f32_to_bf16_bits(x0), f32_to_bf16_bits(x1));
                    } else if (lo_b) {
                        unsigned short h0, l0, h1, l1;
                        split_f16(x0 * sb, h0, l0);
                        split_f16(x1 * sb, h1, l1);
                        row[c / 2] = pack2(h0, h1);
                        row[hpix * RW + c / 2] = pack2(l0, l1);
                    } else {
                        row[c / 2] = pack2(f32_to_f16_bits(x0), f32_to_f16_bits(x1));
                    }
                }
            }
        }
        for (int ky = 0; ky < d.k; ++ky) {
            const int dy = d.sign * (ky - d.origin) - d.lo;
            for (int kx = 0; kx < d.k; ++kx, ++it) {
                const int shift = dy * d.halo_w + d.sign * (kx - d.origin) - d.lo;
                cp_async_wait_all();  // this thread's copies of slice `it`
                __syncthreads();      // everyone's: slice `it` and the window are in place, slice it − 1 is read
                if (it + 1 < d.chunks * taps) copy_weights(it + 1);
                const unsigned char* A8 = reinterpret_cast<const unsigned char*>(wbuf + (it & 1) * WTAP);
                const unsigned char* W8 = reinterpret_cast<const unsigned char*>(win);
                const int plane_b = hpix * PITCH, plane_a = BM * PITCH;
                if (PREC == PREC_TF32) {
#pragma unroll
                    for (int ks = 0; ks < HALO_CC; ks += 8) {
                        u32 a[2][4], b[NI][2];
#pragma unroll
                        for (int mi = 0; mi < 2; ++mi)
                            ldmatrix_x4(a[mi], A8 + (wm * 32 + mi * 16 + (lane & 15)) * PITCH + 4 * ks + (lane >> 4) * 16);
#pragma unroll
                        for (int j = 0; j < NI / 2; ++j) {
                            u32 r[4];
                            ldmatrix_x4(r, W8 + (base[j] + shift) * PITCH + 4 * ks + bcol);
                            b[2 * j][0] = r[0], b[2 * j][1] = r[1], b[2 * j + 1][0] = r[2], b[2 * j + 1][1] = r[3];
                        }
#pragma unroll
                        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                            for (int ni = 0; ni < NI; ++ni) mma_tf32_m16n8k8(acc[mi][ni], a[mi], b[ni]);
                    }
                } else {
#pragma unroll
                    for (int ks = 0; ks < HALO_CC; ks += 16) {
                        u32 a[2][4], al[2][4];
#pragma unroll
                        for (int mi = 0; mi < 2; ++mi) {
                            const unsigned char* ra = A8 + (wm * 32 + mi * 16 + (lane & 15)) * PITCH + 2 * ks + (lane >> 4) * 16;
                            ldmatrix_x4(a[mi], ra);
                            if (PREC == PREC_FP32) ldmatrix_x4(al[mi], ra + plane_a);
                        }
                        // B two n8 tiles at a time, each used at once: 8 fragment registers live
                        // instead of 4·NI (the fp32 n256 tiles spilled on sm_80 at 255 registers)
#pragma unroll
                        for (int j = 0; j < NI / 2; ++j) {
                            const unsigned char* rb = W8 + (base[j] + shift) * PITCH + 2 * ks + bcol;
                            u32 b[2][2], bl[2][2], r[4];
                            ldmatrix_x4(r, rb);
                            b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
                            if (lo_b) {
                                ldmatrix_x4(r, rb + plane_b);
                                bl[0][0] = r[0], bl[0][1] = r[1], bl[1][0] = r[2], bl[1][1] = r[3];
                            }
#pragma unroll
                            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                                for (int h = 0; h < 2; ++h) {
                                    float(&c)[4] = acc[mi][2 * j + h];
                                    if (PREC == PREC_BF16) {
                                        mma_bf16_m16n8k16(c, a[mi], b[h]);
                                    } else {
                                        // the weights always have a lo half (128 FADDs a tap on the
                                        // n256 tiles: 303 -> 430 instructions)
                                        mma_f16_split_rn(c, a[mi], al[mi], true, b[h], bl[h], lo_b);
                                    }
                                }
                        }
                    }
                }
            }
        }
    }
    // epilogue: undo the scales (powers of two: exact), the bias, write or add
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int m = mb * BM + wm * 32 + mi * 16 + g + (r >= 2 ? 8 : 0);
                const int n = p0 + wn * 8 * NI + ni * 8 + 2 * t4 + (r & 1);
                if (m >= d.MO || n >= ohw) continue;
                float v = acc[mi][ni][r] * ia * ib;
                if (d.bias) v += d.bias[m];
                float* o = d.out + ((long long)s * d.MO + m) * ohw + n;
                *o = d.accumulate ? *o + v : v;
            }
}

extern "C" __global__ void conv_halo_weights_fp32(const HaloDesc d, u32* __restrict__ wprep, const u32* __restrict__ maxbits) {
    conv_halo_weights<PREC_FP32>(d, wprep, maxbits);
}
extern "C" __global__ void conv_halo_weights_tf32(const HaloDesc d, u32* __restrict__ wprep, const u32* __restrict__ maxbits) {
    conv_halo_weights<PREC_TF32>(d, wprep, maxbits);
}
extern "C" __global__ void conv_halo_weights_bf16(const HaloDesc d, u32* __restrict__ wprep, const u32* __restrict__ maxbits) {
    conv_halo_weights<PREC_BF16>(d, wprep, maxbits);
}

// Tiles (src/gpu/conv_halo.rs HaloShape): m64n256 (2×4 warps of 32 × 64 pixels, 256 threads) for
// maps of more than 96 pixels, m32n256 (1×4 warps, 128 threads) where M ≤ 32, m128n64 (4×2 warps
// of 32 × 32, 256 threads) for small maps (cifar10's 8×8). A warp of 64 pixels holds 64
// accumulators and a k-step's 12 fragments in flight: ~200–255 registers (within 128, two
// 256-thread blocks per SM, ptxas spilled in the tap loop: 6 local loads a tap), so one such block
// per SM, or two of 128 threads; 32 pixels a warp fit 128 registers (two blocks of 256).
#define HALO_MIN_BLOCKS_WIDE 1
#define HALO_MIN_BLOCKS 2
// m128n64: within 128 registers (two blocks per SM) ptxas spilled — sm_80 up to 240 bytes a
// thread, sm_90 up to 172 with the pip wheel's ptxas, though NVRTC's own cubin for sm_90 had no
// local memory — so one block per SM, 220–226 registers (the H200 timed it at two blocks:
// bench/RESULTS.md, 2026-12-04; one block is untimed)
#define HALO_MIN_BLOCKS_M128 1
// One entry point per (precision, tile), written out, not generated by a macro: the emulator's
// loader finds kernels by their declarations in the source text.
extern "C" __global__ void __launch_bounds__(256, HALO_MIN_BLOCKS_WIDE) conv_halo_fp32_m64n256(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_FP32, 2, 4, 8>(d, maxbits);
}
extern "C" __global__ void __launch_bounds__(256, HALO_MIN_BLOCKS_WIDE) conv_halo_tf32_m64n256(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_TF32, 2, 4, 8>(d, maxbits);
}
extern "C" __global__ void __launch_bounds__(256, HALO_MIN_BLOCKS_WIDE) conv_halo_bf16_m64n256(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_BF16, 2, 4, 8>(d, maxbits);
}
extern "C" __global__ void __launch_bounds__(128, HALO_MIN_BLOCKS) conv_halo_fp32_m32n256(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_FP32, 1, 4, 8>(d, maxbits);
}
extern "C" __global__ void __launch_bounds__(128, HALO_MIN_BLOCKS) conv_halo_tf32_m32n256(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_TF32, 1, 4, 8>(d, maxbits);
}
extern "C" __global__ void __launch_bounds__(128, HALO_MIN_BLOCKS) conv_halo_bf16_m32n256(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_BF16, 1, 4, 8>(d, maxbits);
}
extern "C" __global__ void __launch_bounds__(256, HALO_MIN_BLOCKS_M128) conv_halo_fp32_m128n64(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_FP32, 4, 2, 4>(d, maxbits);
}
extern "C" __global__ void __launch_bounds__(256, HALO_MIN_BLOCKS_M128) conv_halo_tf32_m128n64(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_TF32, 4, 2, 4>(d, maxbits);
}
extern "C" __global__ void __launch_bounds__(256, HALO_MIN_BLOCKS_M128) conv_halo_bf16_m128n64(const HaloDesc d, const u32* __restrict__ maxbits) {
    conv_halo<PREC_BF16, 4, 2, 4>(d, maxbits);
}

// A probe of HaloDesc's C layout, for the host twin's test: its size and the offsets of some fields.
extern "C" __global__ void conv_halo_layout(int* out) {
    if (threadIdx.x != 0) return;
    HaloDesc d;
    const char* base = reinterpret_cast<const char*>(&d);
    int i = 0;
    out[i++] = sizeof(HaloDesc);
    out[i++] = reinterpret_cast<const char*>(&d.w) - base;
    out[i++] = reinterpret_cast<const char*>(&d.S) - base;
    out[i++] = reinterpret_cast<const char*>(&d.sign) - base;
    out[i++] = reinterpret_cast<const char*>(&d.halo_w) - base;
    out[i++] = reinterpret_cast<const char*>(&d.q8_factor) - base;
    out[i++] = reinterpret_cast<const char*>(&d.accumulate) - base;
}
