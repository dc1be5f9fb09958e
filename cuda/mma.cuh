// mma.cuh — tensor-core building blocks (sm_80 and later): warp-level mma.sync, ldmatrix,
// cp.async and the f32 → fp16 / bf16 / tf32 conversions, each a thin wrapper around one PTX
// instruction. The CPU emulator (tests/emu/cuda_emu.h, which defines BACKEI_EMU) implements every
// wrapper below with the same signature, following the PTX ISA's fragment layouts, so the kernels
// that use them run in CI without a GPU; tests/gpu_mma.rs checks the layouts on hardware.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 / mma.m16n8k8"), lane = threadIdx.x % 32,
// g = lane / 4 (the "groupID"), t = lane % 4 (the "threadID_in_group"):
//   m16n8k16, .f16 / .bf16 (two 16-bit elements per 32-bit register, the lower column in the low half)
//     A (16×16, row-major):  a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]
//                            a[2] = A[g][2t+8, 2t+9] a[3] = A[g+8][2t+8, 2t+9]
//     B (16×8, "col"):       b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   m16n8k8, .tf32 (one element per register)
//     A (16×8):              a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]
//     B (8×8):               b[0] = B[t][g]  b[1] = B[t+4][g]
//   C/D (16×8, f32), both:   c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
// ldmatrix.m8n8.xN.b16: lanes 8j..8j+7 give the 8 row addresses (16 bytes each, 16-byte aligned) of
// matrix j; register j of a lane then holds row lane/4, elements 2(lane%4) and 2(lane%4)+1 of matrix
// j; with .trans it holds element lane/4 of rows 2(lane%4) and 2(lane%4)+1 (the transpose). Viewed as
// 32-bit elements, a non-transposed 8×8 b16 matrix is an 8×4 tf32 matrix and register j holds row
// lane/4, column lane%4 — exactly the tf32 A fragment when the four matrices are (rows 0–7, k 0–3),
// (rows 8–15, k 0–3), (rows 0–7, k 4–7), (rows 8–15, k 4–7).
#pragma once

#ifndef BACKEI_EMU

// The 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// D = A·B + D, m16n8k16, fp16 operands, f32 accumulate.
__device__ __forceinline__ void mma_f16_m16n8k16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D = A·B + D, m16n8k16, bf16 operands, f32 accumulate.
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D = A·B + D, m16n8k8, tf32 operands (f32 bit patterns rounded by to_tf32), f32 accumulate.
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix: `row` is this lane's row address (see the header comment for which lanes count).
__device__ __forceinline__ void ldmatrix_x1(u32 (&r)[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2(u32 (&r)[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(u32 (&r)[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
}

// The same at a 32-bit shared-memory address (smem_u32): where a hot loop forms its row addresses
// as 32-bit offsets, instead of 64-bit generic pointers converted per instruction (two adds, a
// sign extension and a move per address in the weight-gradient k-loop's SASS).
__device__ __forceinline__ void ldmatrix_x4_trans_at(u32 (&r)[4], u32 row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
}
__device__ __forceinline__ void ldmatrix_x4_at(u32 (&r)[4], u32 row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
}
// 4 bytes of shared memory at a 32-bit address (4-byte aligned): one LDS.
__device__ __forceinline__ u32 lds32_at(u32 addr) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}
// 16 bytes of shared memory at a 32-bit address (16-byte aligned): one LDS.128.
__device__ __forceinline__ uint4 lds128_at(u32 addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}

// cp.async: an asynchronous global → shared copy of 16 bytes (both 16-byte aligned), completed by
// cp_async_wait<N>() (all but the newest N committed groups) or cp_async_wait_all(). The
// destination must not be read before the wait (and, by other threads, a barrier after it).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(smem_dst)), "l"(gmem_src));
}
// 4 bytes (both 4-byte aligned; .ca: only .ca takes sizes under 16) for copies whose rows change
// pitch on the way, element by element.
__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_u32(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;"); }

// prefetch.global.L2: a hint that brings the 128-byte line holding *p into L2 (no register, no
// wait); p points at an element of a global array.
template <class T>
__device__ __forceinline__ void prefetch_l2(const T* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Conversions (bit patterns: fp16 and bf16 in a u16, tf32 in a u32), round to nearest even
// (tf32: nearest, ties away from zero, as cvt.rna.tf32.f32).
__device__ __forceinline__ unsigned short f32_to_f16_bits(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
    float x;
    asm("cvt.f32.f16 %0, %1;" : "=f"(x) : "h"(h));
    return x;
}
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float x) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
__device__ __forceinline__ u32 f32_to_tf32_bits(float x) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
// Two f32 → fp16 in one instruction (cvt.rn.f16x2.f32 puts its first source in the upper half):
// x_lo's bits in the low half, each rounded as f32_to_f16_bits.
__device__ __forceinline__ u32 f32x2_to_f16x2_bits(float x_lo, float x_hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x_hi), "f"(x_lo));
    return r;
}

#endif  // BACKEI_EMU

// bf16 → f32 is exact and needs no instruction: the bf16 bits are the top half of the f32.
__device__ __forceinline__ float bf16_bits_to_f32(unsigned short h) { return __uint_as_float((u32)h << 16); }

// Two 16-bit patterns in one register, `lo` in the low half (the lower column of a fragment).
__device__ __forceinline__ u32 pack2(unsigned short lo, unsigned short hi) { return (u32)lo | ((u32)hi << 16); }

// The error-corrected split of Ootomo & Yokota (2022) for fp16: x ≈ hi + lo with hi = fp16(x) and
// lo = fp16(x − hi). x must be pre-scaled by a power of two into fp16's normal range (|x| < 2^15;
// see the kernels' scaling), so that x − hi is exact in f32 and lo keeps 11 more bits: hi + lo then
// carries ~22 of f32's 24 bits, and A·B ≈ hi_a·hi_b + hi_a·lo_b + lo_a·hi_b (lo·lo is below f32's ulp).
__device__ __forceinline__ void split_f16(float x, unsigned short& hi, unsigned short& lo) {
    hi = f32_to_f16_bits(x);
    lo = f32_to_f16_bits(x - f16_bits_to_f32(hi));
}

// split_f16 of two elements at once, packed as a staged pair is stored (x0 in the low halves): one
// conversion instruction for both hi halves and one for both lo, where two split_f16 and the
// packing take four and a permute (SASS of the v4 staging loops, 2026-12-06). The same bits.
__device__ __forceinline__ void split_f16_pair(float x0, float x1, u32& hi, u32& lo) {
    hi = f32x2_to_f16x2_bits(x0, x1);
    lo = f32x2_to_f16x2_bits(x0 - f16_bits_to_f32((unsigned short)(hi & 0xFFFFu)), x1 - f16_bits_to_f32((unsigned short)(hi >> 16)));
}

// The products of mma_f16_split_rn's k-step (the small ones first, then hi·hi) into `t`, a
// fragment the caller started at zero and adds to its sum with round-to-nearest after a group of
// k-steps. Two k-steps per group halve the FADDs, and keep the
// accuracy under the truncating model of the tensor cores (tests/emu/cuda_emu.h, after Fasi et al.
// 2021): a simulation of that model (K = 288 and 1,024, sums of positive products, 40 draws) put
// two such k-steps per fragment at 0.98× and 0.91× the mean error of one k-step per fragment with
// hi·hi first (v4's order until 2026-12-07), and one k-step with the small products first at 0.60×
// and 0.82×. (Both k-steps' small products before both hi·hi: 0.74× and 0.83×, but it holds two
// k-steps' fragments at once — 928 bytes of spills in the fashion-mnist L1 fp32 backward.)
__device__ __forceinline__ void mma_f16_split_into(float (&t)[4], const u32 (&a)[4], const u32 (&al)[4], bool lo_a, const u32 (&b)[2],
                                                   const u32 (&bl)[2], bool lo_b) {
    if (lo_a) mma_f16_m16n8k16(t, al, b);
    if (lo_b) mma_f16_m16n8k16(t, a, bl);
    mma_f16_m16n8k16(t, a, b);
}

// The fp32 mode's k-step on split operands (split_f16): the small products first — lo·hi, hi·lo
// (where an operand has a lo half), then hi·hi — into a fresh fragment that round-to-nearest
// FADDs add to the sum. The tensor cores align an MMA's terms to the largest and truncate, so a
// long sum kept in their accumulator drifts (an H200 missed the f32 tolerance by 10–90× on the
// step's GEMMs, 2026-12-04); this way each chain's truncation is relative to one k-step's 16
// products, not to the sum (Ootomo & Yokota 2022). 4 registers and 4 FADDs per fragment and k-step.
__device__ __forceinline__ void mma_f16_split_rn(float (&acc)[4], const u32 (&a)[4], const u32 (&al)[4], bool lo_a,
                                                 const u32 (&b)[2], const u32 (&bl)[2], bool lo_b) {
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_f16_split_into(t, a, al, lo_a, b, bl, lo_b);
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[r] += t[r];
}

// The power-of-two scale that puts an operand's largest |x| (its f32 bits: absmax_f32 in
// gemm_tc.cu) in [2^13, 2^14), and its inverse; 1 for an all-zero operand. Both are exact. The
// tensor-core GEMMs scale an fp32-mode operand by it before split_f16.
__device__ __forceinline__ void pow2_scale(u32 maxbits, float& s, float& inv) {
    if (maxbits == 0) {
        s = inv = 1.0f;
        return;
    }
    int e = (int)(maxbits >> 23) - 127;  // max ∈ [2^e, 2^(e+1))
    int sh = 13 - e;
    sh = sh < -120 ? -120 : (sh > 120 ? 120 : sh);
    s = __uint_as_float((u32)(sh + 127) << 23);
    inv = __uint_as_float((u32)(127 - sh) << 23);
}
