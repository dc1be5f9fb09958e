// cuda_emu.h — runs backei's CUDA kernels on the CPU, so that CI (which has no GPU) executes the
// kernels' own code: their index arithmetic, tiling, shared-memory staging, barriers, warp
// shuffles, atomics and the grid barrier of the cooperative (persistent) kernels.
// Rust side: tests/common/emu.rs (rewrites a module's source, compiles it with the system C++
// compiler into a shared library, loads it and launches kernels through `emu_launch`).
//
// Model. Every CUDA thread is a fiber (ucontext) with its own stack; one OS thread runs them
// cooperatively. A fiber runs until it reaches a barrier (__syncthreads, __syncwarp, a warp
// shuffle) or yields (__nanosleep: the spin of a grid barrier); the scheduler then runs the others.
// A block barrier opens when every live thread of the block has reached it; a warp barrier when
// every live lane of the warp has. Ordinary launches run their blocks one at a time, in a shuffled
// order; cooperative launches run all blocks together (the grid barrier needs them co-resident).
// Between barriers the threads run in a new shuffled order every round (seeded), so a read that a
// missing __syncthreads() leaves unordered against a write sees the wrong value in some runs.
// Shared memory (dynamic and static) starts as NaN bytes (0xFF), so reading an element nobody
// wrote poisons the result. Not modelled: memory-model subtleties (fences are no-ops: one OS
// thread is sequentially consistent), FMA contraction, warp-synchronous code without __syncwarp
// (wrong on Volta and later anyway), performance.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- the CUDA dialect, as plain C++ --------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

namespace emu {

enum State : int { RUNNABLE, AT_BLOCK, AT_WARP, DONE };

struct Block;

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    int lin;  // linear thread index in the block
    Block* block;
    State state;
    char* stack;
};

struct Block {
    uint3 bid;
    int first;  // index of its first fiber in Launch::fibers
    std::vector<float4> dyn;
    std::map<int, std::vector<float4>> statics;
    std::vector<unsigned long long> xchg;  // one slot per thread: warp shuffles
};

struct Launch {
    dim3 grid, block;
    unsigned int smem;
    int threads;  // per block
    std::vector<Block> blocks;
    std::vector<Fiber> fibers;  // the running set: one block, or all blocks (cooperative)
    ucontext_t sched;
    Fiber* cur = nullptr;
    std::function<void()> body;
    unsigned long long rng;
    std::string error;
    std::vector<char*> stacks;
};

// One launch at a time per OS thread (test threads run launches independently).
inline thread_local Launch* g = nullptr;

constexpr size_t STACK = 128 * 1024;
constexpr size_t PAGE = 4096;

inline unsigned long long next_rand() {
    unsigned long long z = (g->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline void yield_to_scheduler() {
    Fiber* f = g->cur;
    swapcontext(&f->ctx, &g->sched);
}

inline void block_barrier() {
    g->cur->state = AT_BLOCK;
    yield_to_scheduler();
}

inline void warp_barrier() {
    g->cur->state = AT_WARP;
    yield_to_scheduler();
}

inline void* dyn_smem() { return g->cur->block->dyn.data(); }

template <class T, int ID>
T& shared_static() {
    auto& s = g->cur->block->statics[ID];
    if (s.empty()) {
        s.resize((sizeof(T) + 15) / 16);
        memset(s.data(), 0xFF, s.size() * 16);
    }
    return *reinterpret_cast<T*>(s.data());
}

template <class T>
T shuffle(T v, int src_lane, bool valid) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    Fiber* f = g->cur;
    Block* b = f->block;
    unsigned long long slot = 0;
    memcpy(&slot, &v, sizeof(T));
    b->xchg[f->lin] = slot;
    warp_barrier();
    T r = v;
    const int src = (f->lin & ~31) + src_lane;
    if (valid && src < g->threads) memcpy(&r, &b->xchg[src], sizeof(T));
    warp_barrier();
    return r;
}

inline void fiber_main() {
    Launch* L = g;
    L->body();
    L->cur->state = DONE;
    // returning continues at uc_link: the scheduler
}

inline char* new_stack() {
    void* p = mmap(nullptr, STACK + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, PAGE, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    return static_cast<char*>(p);
}

// Runs the fibers of `blocks` (indices into g->blocks) to completion. Returns false on deadlock.
inline bool run_blocks(const std::vector<int>& blocks) {
    Launch* L = g;
    const int T = L->threads;
    L->fibers.assign(blocks.size() * T, Fiber{});
    size_t need = L->fibers.size();
    while (L->stacks.size() < need) {
        char* s = new_stack();
        if (!s) {
            L->error = "mmap of a fiber stack failed";
            return false;
        }
        L->stacks.push_back(s);
    }
    for (size_t bi = 0; bi < blocks.size(); ++bi) {
        Block& b = L->blocks[blocks[bi]];
        b.first = (int)(bi * T);
        b.dyn.assign((L->smem + 15) / 16, float4{});
        memset(b.dyn.data(), 0xFF, b.dyn.size() * 16);
        b.statics.clear();
        b.xchg.assign(T, 0);
        for (int t = 0; t < T; ++t) {
            Fiber& f = L->fibers[bi * T + t];
            f.lin = t;
            f.tid = uint3{(unsigned)(t % L->block.x), (unsigned)((t / L->block.x) % L->block.y), (unsigned)(t / (L->block.x * L->block.y))};
            f.block = &b;
            f.state = RUNNABLE;
            f.stack = L->stacks[bi * T + t];
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack + PAGE;
            f.ctx.uc_stack.ss_size = STACK;
            f.ctx.uc_link = &L->sched;
            makecontext(&f.ctx, fiber_main, 0);
        }
    }
    std::vector<int> order(L->fibers.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = (int)i;
    unsigned long long rounds = 0;
    for (;;) {
        // one round: every runnable fiber once, in a fresh order
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_rand() % i]);
        bool ran = false;
        for (int i : order) {
            Fiber& f = L->fibers[i];
            if (f.state != RUNNABLE) continue;
            L->cur = &f;
            swapcontext(&L->sched, &f.ctx);
            ran = true;
        }
        // open the barriers every live thread (lane) has reached
        bool opened = false, all_done = true;
        for (size_t bi = 0; bi < blocks.size(); ++bi) {
            Fiber* F = &L->fibers[bi * T];
            int live = 0, at = 0;
            for (int t = 0; t < T; ++t) {
                live += F[t].state != DONE;
                at += F[t].state == AT_BLOCK;
            }
            if (live) all_done = false;
            if (at > 0 && at == live) {
                for (int t = 0; t < T; ++t)
                    if (F[t].state == AT_BLOCK) F[t].state = RUNNABLE;
                opened = true;
            }
            for (int w = 0; w < T; w += 32) {
                int wl = 0, wa = 0;
                for (int t = w; t < std::min(w + 32, T); ++t) {
                    wl += F[t].state != DONE;
                    wa += F[t].state == AT_WARP;
                }
                if (wa > 0 && wa == wl) {
                    for (int t = w; t < std::min(w + 32, T); ++t)
                        if (F[t].state == AT_WARP) F[t].state = RUNNABLE;
                    opened = true;
                }
            }
        }
        if (all_done) return true;
        if (!ran && !opened) {
            char msg[256];
            int ab = 0, aw = 0, dn = 0;
            for (auto& f : L->fibers) {
                ab += f.state == AT_BLOCK;
                aw += f.state == AT_WARP;
                dn += f.state == DONE;
            }
            snprintf(msg, sizeof msg,
                     "deadlock: %d threads wait at __syncthreads, %d at a warp barrier, %d exited "
                     "(a barrier inside divergent code?)",
                     ab, aw, dn);
            L->error = msg;
            return false;
        }
        if (++rounds > 200000000ull) {
            L->error = "more than 2e8 scheduling rounds: a spin loop that never ends?";
            return false;
        }
    }
}

template <class... A, size_t... I>
void bind_args(void (*k)(A...), void** args, std::index_sequence<I...>) {
    auto tup = std::make_tuple(*static_cast<std::decay_t<A>*>(args[I])...);
    g->body = [k, tup]() { std::apply(k, tup); };
}

template <class... A>
void bind_kernel(void (*k)(A...), void** args) {
    bind_args(k, args, std::index_sequence_for<A...>{});
}

}  // namespace emu

// ---- built-ins -------------------------------------------------------------------------------------
#define threadIdx (emu::g->cur->tid)
#define blockIdx (emu::g->cur->block->bid)
#define blockDim (emu::g->block)
#define gridDim (emu::g->grid)

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { emu::warp_barrier(); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __nanosleep(unsigned int) { emu::yield_to_scheduler(); }

template <class T>
inline T __ldcg(const T* p) {
    return *p;
}
template <class T>
inline T __ldg(const T* p) {
    return *p;
}

template <class T>
inline T __shfl_down_sync(unsigned int, T v, unsigned int delta, int width = 32) {
    const int lane = emu::g->cur->lin & 31;
    const int seg = lane & ~(width - 1);
    const int src = lane + (int)delta;
    return emu::shuffle(v, src, src < seg + width);
}
template <class T>
inline T __shfl_up_sync(unsigned int, T v, unsigned int delta, int width = 32) {
    const int lane = emu::g->cur->lin & 31;
    const int seg = lane & ~(width - 1);
    const int src = lane - (int)delta;
    return emu::shuffle(v, src, src >= seg);
}
template <class T>
inline T __shfl_xor_sync(unsigned int, T v, int mask, int width = 32) {
    const int lane = emu::g->cur->lin & 31;
    const int seg = lane & ~(width - 1);
    const int src = lane ^ mask;
    return emu::shuffle(v, src, src >= seg && src < seg + width);
}
template <class T>
inline T __shfl_sync(unsigned int, T v, int src_lane, int width = 32) {
    const int lane = emu::g->cur->lin & 31;
    const int seg = lane & ~(width - 1);
    return emu::shuffle(v, seg + (src_lane & (width - 1)), true);
}

// One OS thread runs every fiber and a fiber is never preempted: a read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
inline unsigned int atomicAdd(unsigned int* p, int v) { return atomicAdd(p, (unsigned int)v); }
template <class T>
inline T atomicMax(T* p, T v) {
    T old = *p;
    *p = old > v ? old : v;
    return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
    T old = *p;
    *p = v;
    return old;
}
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
    T old = *p;
    if (old == cmp) *p = v;
    return old;
}

// ---- the launch entry point ----------------------------------------------------------------------
// Each emulated module defines emu_dispatch (generated: kernel name → emu::bind), then this.
namespace emu {
inline int launch(bool (*dispatch)(const char*, void**), const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                  unsigned by, unsigned bz, unsigned smem, int cooperative, unsigned long long seed, void** args, char* err,
                  size_t errlen) {
    Launch L;
    L.grid = dim3{gx, gy, gz};
    L.block = dim3{bx, by, bz};
    L.smem = smem;
    L.threads = (int)(bx * by * bz);
    L.rng = seed;
    Launch* saved = g;
    g = &L;
    int rc = 0;
    if (L.threads <= 0 || L.threads > 1024 || gx * gy * gz == 0) {
        L.error = "bad launch configuration (block of 1..1024 threads, grid non-empty)";
        rc = 2;
    } else if (!dispatch(name, args)) {
        L.error = std::string("no kernel named ") + name + " in this module";
        rc = 3;
    } else {
        const unsigned nb = gx * gy * gz;
        L.blocks.resize(nb);
        for (unsigned i = 0; i < nb; ++i) L.blocks[i].bid = uint3{i % gx, (i / gx) % gy, i / (gx * gy)};
        std::vector<int> order(nb);
        for (unsigned i = 0; i < nb; ++i) order[i] = (int)i;
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_rand() % i]);
        if (cooperative) {
            if (!run_blocks(order)) rc = 1;
        } else {
            for (int b : order)
                if (!run_blocks(std::vector<int>{b})) {
                    rc = 1;
                    break;
                }
        }
    }
    for (char* s : L.stacks) munmap(s, STACK + PAGE);
    if (rc && err && errlen) snprintf(err, errlen, "%s", L.error.c_str());
    g = saved;
    return rc;
}
}  // namespace emu
