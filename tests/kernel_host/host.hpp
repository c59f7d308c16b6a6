// Host definitions of what kernels/adamax.cu takes from CUDA, so that the file compiles
// unchanged as C++ for the host (tests/kernel_host.rs builds main.cpp, which includes
// this and then the kernel, with the -D layout defines adamax-cuda gives NVRTC).
//
// The arithmetic is plain integer and IEEE f32/f64, which x86-64 (SSE, built with
// -ffp-contract=off) computes as the GPU does: each intrinsic below is one operation
// with the same rounding. A block runs as host threads (256, or 128 for the 8-bit
// updates, as launched on the GPU): barriers for
// __syncthreads, warps of 32 whose shuffles and votes meet at a barrier, std::atomic_ref
// for the atomics. Blocks run one at a time, so __shared__ variables can be statics.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

// The kernel's hooks (see its header): the f16 conversions below instead of PTX, offsetof,
// and the C++ forms of its PTX multiply-add, REDUX and paired narrowing.
#define ADAMAX_HOST_EMULATION
#define ADAMAX_OFFSETOF(T, field) __builtin_offsetof(T, field)

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// CUDA's alignments, which the sanitizer the harness is built with checks on every
// vector access (a misaligned one is an error on the GPU).
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
template <typename A> static inline A min(A a, A b) { return a < b ? a : b; }
template <typename A> static inline A max(A a, A b) { return a < b ? b : a; }
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}

static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
// Rounded toward +infinity, for finite positive operands: to nearest, stepped up where
// that went down (the products of two f32 are exact in double).
static inline float __frcp_ru(float a) {
    const float r = 1.0f / a;
    return (double)r * (double)a < 1.0 ? std::nextafterf(r, INFINITY) : r;
}
static inline float __frcp_rd(float a) {
    const float r = 1.0f / a;
    return (double)r * (double)a > 1.0 ? std::nextafterf(r, 0.0f) : r;
}
static inline float __fmul_rd(float a, float b) {
    const double e = (double)a * (double)b;
    const float p = (float)e;
    return (double)p > e ? std::nextafterf(p, 0.0f) : p;
}
static inline float __fmul_ru(float a, float b) {
    const double e = (double)a * (double)b;
    const float p = (float)e;
    return (double)p < e ? std::nextafterf(p, INFINITY) : p;
}
// Rounded toward zero: the sum to nearest, stepped back towards zero where that rounding
// went away from it (the exact error of the sum by TwoSum, Knuth).
static inline float __fadd_rz(float a, float b) {
    const float s = a + b, bb = s - a, err = (a - (s - bb)) + (b - bb);
    return (s > 0.0f && err < 0.0f) || (s < 0.0f && err > 0.0f) ? std::nextafterf(s, 0.0f) : s;
}
static inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
// a * b + c rounded toward zero (for the encoders: a >= 0, b and c > 0): the product exact in double, the sum to nearest in
// double and its exact error (TwoSum), then to float toward zero: stepped back where the
// float to nearest lies beyond the double sum, or on it with the exact sum short of it.
static inline float __fmaf_rz(float a, float b, float c) {
    const double p = (double)a * (double)b, s = p + (double)c;
    if (!std::isfinite(s)) return (float)s;
    const double back = s - p, err = (p - (s - back)) + ((double)c - back);
    float f = (float)s;
    if (s > 0.0 && ((double)f > s || ((double)f == s && err < 0.0))) f = std::nextafterf(f, 0.0f);
    if (s < 0.0 && ((double)f < s || ((double)f == s && err > 0.0))) f = std::nextafterf(f, 0.0f);
    return f;
}
// Clamped to [0, 1], NaN to 0, as PTX's .sat.
static inline float __saturatef(float x) { return x != x || x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
static inline unsigned __float2uint_rz(float f) { return (unsigned)f; }  // only for 0 <= f < 2^32
static inline float __uint2float_rn(unsigned u) { return (float)u; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsqrt_rn(double d) { return std::sqrt(d); }
static inline float __double2float_rn(double d) { return (float)d; }
// Through _Float16: round to nearest even, as cvt.f32.f16 and cvt.rn.f16.f32.
static inline float host_f16_to_f32(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
static inline unsigned short host_f32_to_f16(float x) {
    const _Float16 h = (_Float16)x;
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}

// A block of threads: ids per thread, a barrier per block and per warp, shuffles and
// votes through shared slots.
struct Dim { unsigned x; };
static Dim blockIdx{0}, blockDim{32}, gridDim{1};
static thread_local unsigned g_tid = 0;
struct ThreadIdx { unsigned x; };
#define threadIdx (ThreadIdx{g_tid})
static std::barrier<>* g_block = nullptr;
static std::barrier<>* g_warps[8] = {};
static float g_slots_f[256];
static double g_slots_d[256];
static int g_slots_i[256];
static inline void warp_sync() { g_warps[g_tid / 32]->arrive_and_wait(); }
static inline unsigned partner(int off) { return (g_tid & ~31u) | ((g_tid & 31u) ^ (unsigned)off); }
static inline float __shfl_xor_sync(unsigned, float v, int off) {
    g_slots_f[g_tid] = v;
    warp_sync();
    const float r = g_slots_f[partner(off)];
    warp_sync();
    return r;
}
static inline double __shfl_xor_sync(unsigned, double v, int off) {
    g_slots_d[g_tid] = v;
    warp_sync();
    const double r = g_slots_d[partner(off)];
    warp_sync();
    return r;
}
static inline float __shfl_sync(unsigned, float v, int src) {
    g_slots_f[g_tid] = v;
    warp_sync();
    const float r = g_slots_f[(g_tid & ~31u) | ((unsigned)src & 31u)];
    warp_sync();
    return r;
}
static inline bool __any_sync(unsigned, bool p) {
    g_slots_i[g_tid] = p;
    warp_sync();
    bool any = false;
    for (unsigned l = 0; l < 32; ++l) any |= g_slots_i[(g_tid & ~31u) | l] != 0;
    warp_sync();
    return any;
}
static inline unsigned __reduce_max_sync(unsigned, unsigned v) {
    g_slots_i[g_tid] = (int)v;
    warp_sync();
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l) m = std::max(m, (unsigned)g_slots_i[(g_tid & ~31u) | l]);
    warp_sync();
    return m;
}
static inline void __syncthreads() { g_block->arrive_and_wait(); }
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
static inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }

// Runs `f` as block `block` of `threads` threads (a multiple of 32) of a grid of `grid`.
template <typename F>
static void run_block(unsigned threads, unsigned block, unsigned grid, F f) {
    std::barrier<> whole(threads);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned w = 0; w < threads / 32; ++w) {
        warps.push_back(std::make_unique<std::barrier<>>(32));
        g_warps[w] = warps.back().get();
    }
    g_block = &whole;
    blockIdx.x = block;
    blockDim.x = threads;
    gridDim.x = grid;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) ts.emplace_back([=] { g_tid = t; f(); });
    for (auto& t : ts) t.join();
}
// One warp: a block of 32 threads.
template <typename F>
static void warp(F f) { run_block(32, 0, 1, f); }
