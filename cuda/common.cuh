// common.cuh — helpers shared by every backei kernel; the CPU twins are src/cpu/neuron.rs and
// src/rng.rs, which evaluate the same expressions.
#pragma once

typedef unsigned long long u64;
typedef unsigned int u32;

// Surrogate kinds (crate::spec::Surrogate) and firing modes (crate::spec::FiringMode).
#define SURR_RECT 0
#define SURR_SIGMOID 1
#define SURR_ATAN 2

// The neuron's constants, passed by value to every spiking kernel.
struct NeuronParams {
    float leak;       // λ
    float threshold;  // θ
    int surrogate;    // SURR_*
    float width;      // rectangle width, or alpha of sigmoid / atan
    int smooth;       // 1: H → sigmoid(k·x), sign → tanh(k·x) (gradient checks only)
    float k;          // steepness of the smooth mode
};

// 1/y for y ≥ 1 (or NaN), rounded to nearest wherever y < 2^126, 0 from there on (where 1/y is
// below 2^−126: subnormal or 0): the fast path of CUDA's own rcp.rn.f32 — the approximate
// reciprocal and one Newton step, r + r·(1 − y·r), which that routine takes for every y of this
// range and which rounds correctly there (tests/gpu_mma.rs compares it with 1/y on the
// hardware) — without its exponent test and branch to the outlined slow path. That branch
// cut each element's epilogue into blocks of its own (a branch, a CALL and two convergence
// barriers per sigmoid: the v4 forward's 16 sigmoids of a thread could not overlap their MUFU
// latencies). NaN stays NaN (the comparison fails for it, the approximation passes it on).
// The CPU emulator's twin (tests/emu/cuda_emu.h) divides.
#ifndef BACKEI_EMU
__device__ __forceinline__ float rcp_rn_unit(float y) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
    const float e = fmaf(y, r, -1.0f);
    r = fmaf(r, -e, r);
    return y >= 0x1p126f ? 0.0f : r;
}
#endif

// 1 / (1 + e^−x): the rounded quotient of the division it replaces for every x above −87.3
// (1 + e^−x < 2^126), and 0 below, where that quotient is a subnormal.
__device__ __forceinline__ float sigmoidf_(float x) { return rcp_rn_unit(1.0f + expf(-x)); }

// o = H(x), x = v − θ; strictly greater than zero fires.
__device__ __forceinline__ float fire(const NeuronParams& p, float x) {
    if (p.smooth) return sigmoidf_(p.k * x);
    return x > 0.0f ? 1.0f : 0.0f;
}

__device__ __forceinline__ float surrogate_grad(const NeuronParams& p, float x) {
    if (p.surrogate == SURR_RECT) return fabsf(x) < 0.5f * p.width ? 1.0f / p.width : 0.0f;
    if (p.surrogate == SURR_SIGMOID) {
        float s = sigmoidf_(p.width * x);
        return p.width * s * (1.0f - s);
    }
    float y = 1.57079632679489661923f * p.width * x;
    return p.width * 0.5f / (1.0f + y * y);
}

// dH/dx in the backward pass.
__device__ __forceinline__ float fire_grad(const NeuronParams& p, float x) {
    if (p.smooth) {
        float s = sigmoidf_(p.k * x);
        return p.k * s * (1.0f - s);
    }
    return surrogate_grad(p, x);
}

// e = sign(z), sign(0) = 0.
__device__ __forceinline__ float sign_(const NeuronParams& p, float z) {
    if (p.smooth) return tanhf(p.k * z);
    return z > 0.0f ? 1.0f : (z < 0.0f ? -1.0f : 0.0f);
}

// d sign/dz in the backward pass (the same height-1 rectangle as H' in the reference).
__device__ __forceinline__ float sign_grad(const NeuronParams& p, float z) {
    if (p.smooth) {
        float t = tanhf(p.k * z);
        return p.k * (1.0f - t * t);
    }
    return surrogate_grad(p, z);
}

// The E/I gate's z as one byte, where that is exact: with the exact step functions and the
// rectangle surrogate the backward reads only sign(z) and whether z lies inside the rectangle.
// Bits 0–1: sign(z) + 1; bit 2: d sign/dz ≠ 0. CPU twin: Neuron::z_code, sign_of_code,
// sign_grad_of_code (src/cpu/neuron.rs); the decoders return the very values sign_ and sign_grad
// return for z.
__device__ __forceinline__ unsigned char z_code(const NeuronParams& p, float z) {
    const unsigned char sign = z > 0.0f ? 2 : (z < 0.0f ? 0 : 1);
    return sign | ((sign_grad(p, z) != 0.0f ? 1 : 0) << 2);
}

__device__ __forceinline__ float sign_of_code(unsigned char c) {
    return (c & 3) == 2 ? 1.0f : ((c & 3) == 0 ? -1.0f : 0.0f);
}

// the rectangle's height (the surrogate at 0, inside the window) or 0
__device__ __forceinline__ float sign_grad_of_code(const NeuronParams& p, unsigned char c) {
    return (c & 4) ? surrogate_grad(p, 0.0f) : 0.0f;
}

// SplitMix64 finaliser — crate::rng::mix64.
__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// crate::rng::uniform24: a uniform number in [0, 1) for (key, step t, element index).
__device__ __forceinline__ float uniform24(u64 key, u32 t, u64 index) {
    u64 r = mix64(key ^ mix64(((u64)t << 40) ^ index));
    return (float)(r >> 40) * (1.0f / 16777216.0f);
}
