// backei_common.cuh — what every fused BackEI kernel version shares: the layer's dimensions
// (host twin: LayerDims in src/gpu/backei_layer.rs) and the grid-wide barrier of the cooperative
// (persistent) kernels. Used by backei_layer.cu (v1–v3) and backei_v4.cu (v4).
#pragma once

// Host twin: LayerDims in src/gpu/backei_layer.rs (#[repr(C)], the same field order).
struct LayerDims {
    long long off_wb, off_bb, off_we, off_be;  // tensor offsets in the flat params / grads
    int C, H, W;                               // layer shape
    int r;                                     // gate radius, k = 2r + 1
    int T, B, t_in;                            // steps, batch, T_in ∈ {1, T}
    int D;                                     // feedback delay ≥ 1
    int back, ei;                              // switches
    int w_smem;                                // gate weights copied to shared memory
    int wgrad_fused;                           // backward: dW accumulated on chip (else saved per step)
};

// Grid-wide barrier, valid only under a cooperative launch (all blocks co-resident). The scheme of
// cooperative_groups' grid sync (NVRTC here ships without <cooperative_groups.h>): one counter;
// block 0 adds 2^31 − (nblocks − 1), every other block adds 1, so each barrier adds exactly 2^31:
// bit 31 flips once all blocks have arrived, the low bits return to their value (0 when the host
// zeroes the word before the launch). Every block must call it the same number of times.
__device__ __forceinline__ void grid_sync(unsigned int* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;
        __threadfence();  // this block's writes (ordered before by __syncthreads) before arriving
        const unsigned int old = atomicAdd(bar, add);
        volatile unsigned int* vb = bar;
        while (((old ^ *vb) & 0x80000000u) == 0u) __nanosleep(32);
        __threadfence();
    }
    __syncthreads();
}
