// mma_probe.cu — small kernels that pin down the tensor-core wrappers of mma.cuh: the fragment
// layouts of mma.sync (A, B, C as the PTX ISA documents them), ldmatrix with and without .trans,
// cp.async, the conversions and the hi/lo split. The same kernels run on a GPU
// (tests/gpu_mma.rs: the hardware agrees with the documented layouts) and on the CPU emulator
// (tests/emu_mma.rs: the emulator agrees with them), so the emulator that checks the BackEI v4
// kernels in CI is itself checked against the hardware. Also the tensor-core ceiling of the
// kernel bench (mma_peak_*): a register-only loop of independent mma.sync.
#include "common.cuh"
#include "mma.cuh"

// The precision kinds of the probes (PREC_* of backei_v4.cu).
#define PROBE_F16 0
#define PROBE_BF16 1
#define PROBE_TF32 2

__device__ __forceinline__ u32 probe_pack(int kind, float lo, float hi) {
    return kind == PROBE_F16 ? pack2(f32_to_f16_bits(lo), f32_to_f16_bits(hi)) : pack2(f32_to_bf16_bits(lo), f32_to_bf16_bits(hi));
}

// D = A·B + C for one warp. a: [16][K] row-major, b: [K][8] row-major, c and d: [16][8] f32; K = 16
// (f16, bf16) or 8 (tf32). Every lane builds its fragments from the documented layout, element by
// element, so a wrong layout (in the wrapper, the emulator or this comment) gives a wrong D.
extern "C" __global__ void mma_probe(const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ c,
                                     float* __restrict__ d, int kind) {
    const int lane = threadIdx.x & 31, g = lane / 4, t = lane % 4;
    u32 ra[4], rb[2];
    float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    if (kind == PROBE_TF32) {
        ra[0] = f32_to_tf32_bits(a[g * 8 + t]);
        ra[1] = f32_to_tf32_bits(a[(g + 8) * 8 + t]);
        ra[2] = f32_to_tf32_bits(a[g * 8 + t + 4]);
        ra[3] = f32_to_tf32_bits(a[(g + 8) * 8 + t + 4]);
        rb[0] = f32_to_tf32_bits(b[t * 8 + g]);
        rb[1] = f32_to_tf32_bits(b[(t + 4) * 8 + g]);
        mma_tf32_m16n8k8(acc, ra, rb);
    } else {
        ra[0] = probe_pack(kind, a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]);
        ra[1] = probe_pack(kind, a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]);
        ra[2] = probe_pack(kind, a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]);
        ra[3] = probe_pack(kind, a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9]);
        rb[0] = probe_pack(kind, b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]);
        rb[1] = probe_pack(kind, b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]);
        if (kind == PROBE_F16) mma_f16_m16n8k16(acc, ra, rb);
        else mma_bf16_m16n8k16(acc, ra, rb);
    }
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// A lane's n registers of a probe into out (o[0..3]), the unused ones 0.
__device__ __forceinline__ void probe_put(u32* o, const u32 (&r)[4], int n) {
    for (int j = 0; j < 4; ++j) o[j] = j < n ? r[j] : 0u;
}

// ldmatrix: shared memory holds the 16-bit values 0, 1, 2, … (32 rows of 8, 16 bytes each); lane l
// addresses row rows[l]. out: [10][32][4] u32 — x1, x2, x4, x2.trans, x4.trans, then at 32-bit
// shared addresses (smem_u32): x4, x4.trans, ld.shared.v4 of the lane's row and ld.shared.u32 of
// its word l % 4, then the lane's row copied word by word by 4-byte cp.async in reverse order —
// the registers of every lane (unused registers 0). 16-byte cp.async stages the rows (with a wait
// and a barrier) first. The tile is dynamic shared memory (1,024 bytes at launch: the rows, then
// the 4-byte copies), where the v4 kernels' 32-bit addresses point (the emulator maps those to the
// dynamic segment).
extern "C" __global__ void ldmatrix_probe(const unsigned short* __restrict__ src, const int* __restrict__ rows, u32* __restrict__ out) {
    extern __shared__ float4 tile4[];
    unsigned short* tile = reinterpret_cast<unsigned short*>(tile4);
    const int lane = threadIdx.x & 31;
    cp_async16(tile + 8 * lane, src + 8 * lane);
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
    const unsigned short* row = tile + 8 * rows[lane];
    const u32 row_at = smem_u32(row);
    u32* o = out + lane * 4;
    u32 r[4];
    ldmatrix_x1(reinterpret_cast<u32(&)[1]>(r), row);
    probe_put(o, r, 1);
    ldmatrix_x2(reinterpret_cast<u32(&)[2]>(r), row);
    probe_put(o + 128, r, 2);
    ldmatrix_x4(r, row);
    probe_put(o + 2 * 128, r, 4);
    ldmatrix_x2_trans(reinterpret_cast<u32(&)[2]>(r), row);
    probe_put(o + 3 * 128, r, 2);
    ldmatrix_x4_trans(r, row);
    probe_put(o + 4 * 128, r, 4);
    ldmatrix_x4_at(r, row_at);
    probe_put(o + 5 * 128, r, 4);
    ldmatrix_x4_trans_at(r, row_at);
    probe_put(o + 6 * 128, r, 4);
    const uint4 v = lds128_at(row_at);
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
    probe_put(o + 7 * 128, r, 4);
    r[0] = lds32_at(row_at + 4 * (lane % 4));
    probe_put(o + 8 * 128, r, 1);
    // cp.async of 4 bytes: the lane's row, words reversed, into the tile's second half (words
    // 128 + 4·lane …), read back after the wait
    u32* gather = reinterpret_cast<u32*>(tile4) + 128 + 4 * lane;
    for (int k = 0; k < 4; ++k) cp_async4(gather + k, src + 8 * rows[lane] + 2 * (3 - k));
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
    for (int k = 0; k < 4; ++k) r[k] = gather[k];
    probe_put(o + 9 * 128, r, 4);
}

// The conversions and the fp16 split, element-wise: out[8][n] = f16 bits, bf16 bits, tf32 bits,
// split hi, split lo (each as a u32), the packed split of the pair (x[i], x[(i + 1) % n]):
// hi, lo (split_f16_pair, x[i] in the low halves), and the bits of rcp_rn_unit(x[i]) (common.cuh:
// the sigmoid's reciprocal, meant for x ≥ 1).
extern "C" __global__ void convert_probe(const float* __restrict__ x, u32* __restrict__ out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned short hi, lo;
        split_f16(x[i], hi, lo);
        out[i] = f32_to_f16_bits(x[i]);
        out[n + i] = f32_to_bf16_bits(x[i]);
        out[2 * n + i] = f32_to_tf32_bits(x[i]);
        out[3 * n + i] = hi;
        out[4 * n + i] = lo;
        u32 hi2, lo2;
        split_f16_pair(x[i], x[i + 1 < n ? i + 1 : 0], hi2, lo2);
        out[5 * n + i] = hi2;
        out[6 * n + i] = lo2;
        out[7 * n + i] = __float_as_uint(rcp_rn_unit(x[i]));
    }
}

// The tensor-core ceiling: every warp runs `iters` rounds of 8 independent m16n8k16 (or m16n8k8)
// MMAs on register operands (no memory traffic), so the loop is bound by the tensor cores alone.
// One round is 8 · 2·16·8·K flops. sink keeps the results alive.
template <int KIND>
__device__ __forceinline__ void mma_peak(float* sink, int iters) {
    u32 a[4] = {threadIdx.x, threadIdx.x ^ 5u, threadIdx.x * 3u, 7u};
    u32 b[2] = {threadIdx.x + 1u, 9u};
    if (KIND == PROBE_TF32) {
        for (int j = 0; j < 4; ++j) a[j] = f32_to_tf32_bits(1e-3f * (float)(a[j] & 255u));
        for (int j = 0; j < 2; ++j) b[j] = f32_to_tf32_bits(1e-3f * (float)(b[j] & 255u));
    } else {
        for (int j = 0; j < 4; ++j) a[j] &= 0x3C003C00u;  // small finite halves
        for (int j = 0; j < 2; ++j) b[j] &= 0x3C003C00u;
    }
    float acc[8][4] = {};
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (KIND == PROBE_F16) mma_f16_m16n8k16(acc[j], a, b);
            else if (KIND == PROBE_BF16) mma_bf16_m16n8k16(acc[j], a, b);
            else mma_tf32_m16n8k8(acc[j], a, b);
        }
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) s += acc[j][0] + acc[j][1] + acc[j][2] + acc[j][3];
    if (s == 12345.678f) sink[blockIdx.x] = s;  // practically never: keeps the MMAs from being removed
}

extern "C" __global__ void __launch_bounds__(256) mma_peak_f16(float* sink, int iters) { mma_peak<PROBE_F16>(sink, iters); }
extern "C" __global__ void __launch_bounds__(256) mma_peak_bf16(float* sink, int iters) { mma_peak<PROBE_BF16>(sink, iters); }
extern "C" __global__ void __launch_bounds__(256) mma_peak_tf32(float* sink, int iters) { mma_peak<PROBE_TF32>(sink, iters); }
