// grid_digits.cuh — the coordinates of a grid-stride loop's index, kept without division.
// CPU twin: none needed (it is index bookkeeping); tests/emu_kernels.rs launches every kernel that
// uses it on grids whose stride carries into every digit and compares the bits with one thread per
// element.
//
// Math. An elementwise kernel walks a row-major index space i = ((d[N−1]·r[N−2] + …)·r[1] + d[1])·r[0]
// + d[0] with i, i + S, i + 2S, … (S = the grid's thread count) and needs the digits d (a pixel's
// x and y, its plane, its time step). `i % r0`, `i / r0 % r1`, … are 64-bit divisions: a call of
// ~70 instructions each in SASS (`backei kernels --sass`, column idiv), several per element of a
// memory-bound loop. GridDigits divides once, when the loop starts, and then adds S's own digits:
// every digit and every step digit is below its radix, so digit + step + carry < 2·radix and one
// conditional subtraction restores it, a carry of at most 1 into the next digit. The last digit
// is unbounded (the quotient of everything else).
// Use: `GridDigits<3> g(start, stride, {wo, ho});` then `g.advance()` once per loop pass. Every
// radix must be > 0: construct it only when the loop runs at least once (start < total, and a
// zero radix makes total 0).
#pragma once

// A grid-stride loop's first index `start` and its `stride`; returns from the kernel when this
// thread has no element of `total` (so a GridDigits built after it never sees a zero radix).
#define GRID_STRIDE_START(total)                                              \
    const long long start = blockIdx.x * (long long)blockDim.x + threadIdx.x; \
    const long long stride = (long long)gridDim.x * blockDim.x;               \
    if (start >= (total)) return

template <int N>
struct GridDigits {
    long long d[N];         // d[0] the fastest digit, d[N−1] the slowest (unbounded)
    long long step[N];      // the stride's digits
    long long radix[N - 1];

    __device__ __forceinline__ GridDigits(long long i, long long stride, const long long (&r)[N - 1]) {
#pragma unroll
        for (int k = 0; k < N - 1; ++k) {
            radix[k] = r[k];
            d[k] = i % r[k];
            i /= r[k];
            step[k] = stride % r[k];
            stride /= r[k];
        }
        d[N - 1] = i;
        step[N - 1] = stride;
    }

    __device__ __forceinline__ void advance() {
        long long carry = 0;
#pragma unroll
        for (int k = 0; k < N - 1; ++k) {
            const long long x = d[k] + step[k] + carry;
            carry = x >= radix[k] ? 1 : 0;
            d[k] = carry ? x - radix[k] : x;
        }
        d[N - 1] += step[N - 1] + carry;
    }
};
