//! The kernel's low-byte code compiled for the host with the system's C++ compiler,
//! against its spec in `src/cpu/lowbit.rs` and `src/cpu/mod.rs`. A check of CUDA code
//! that needs no GPU: the arithmetic is plain integer and IEEE f32/f64, which x86-64
//! (SSE, no contraction) computes as the GPU does, and the intrinsics get host
//! definitions with the same rounding.
//!
//! - The helpers (the random stream, stochastic rounding to bf16, the 8-bit codes and
//!   block scales) on edge cases and random inputs.
//! - The element traversal of the low-byte update entry points: a whole 8-bit block
//!   (`step_q8_block`) on a warp of 32 host threads whose shuffles meet at a barrier,
//!   and the stochastic-rounding path with f32 moments (`step8_sr`, `step1_sr`), for f32,
//!   f16 and bf16, whole and partial blocks, vector and element paths, three
//!   configurations; parameters, masters, codes and scales compared bit for bit with
//!   `cpu::step_tensor`.
//!
//! - The whole update kernel (`adamax_step`) over a list of tensors, launched block by
//!   block as blocks of 256 host threads (barriers for `__syncthreads`, warps for the
//!   shuffles, `std::atomic_ref` for the atomics): several steps with a tensor missing
//!   its gradient in some, a parameter group, one block walking 8,192-element units and
//!   three walking 1,024-element ones, in every mode, and with clipping, a loss scaler
//!   and an overflow (the reduction and the decision pass before the update);
//!   parameters, state, every step count and the loss scale compared bit for bit with
//!   `CpuAdamax::step_some`. A deadlock among the emulated threads fails the test.
//!
//! What it cannot reach (real device memory and the GPU's own scheduling, the host side
//! of `CudaAdamax`) the GPU tests check.
//! Without a C++ compiler the tests are reported as ignored, unless `CI` is set: then
//! they fail.

use std::process::{Command, Stdio};

use adamax_cuda::spec::lowbit::{self, EXP_AVG_CODE, EXP_INF_CODE};
use libtest_mimic::{Arguments, Failed, Trial};
use rand::{rngs::StdRng, Rng, SeedableRng};

const KERNEL: &str = include_str!("../kernels/adamax.cu");

/// Host definitions of what the extracted CUDA needs: the qualifiers, the bit casts and
/// the IEEE intrinsics (one rounding each; the file is compiled without contraction).
const SHIM: &str = r#"
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#define __device__
#define __forceinline__ inline
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
struct bf16 { u16 bits; };
static inline float __uint_as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline u32 __float_as_uint(float f) { u32 u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline u32 __float2uint_rz(float f) { return (u32)f; }  // only for 0 <= f < 2^32
static inline float __uint2float_rn(u32 u) { return (float)u; }
"#;

/// The helpers' harness has no warp: `warp_absmax` compiles against a stub it never
/// calls.
const NO_WARP: &str = r#"
static inline float __shfl_xor_sync(u32, float v, int) { return v; }
"#;

/// Reads commands from stdin, one per line, and prints one result per line.
const MAIN: &str = r#"
int main() {
    std::string op;
    while (std::cin >> op) {
        u64 a, b, c;
        if (op == "mix") { std::cin >> a; std::printf("%llu\n", mix64(a)); }
        else if (op == "key") { std::cin >> a >> b >> c; std::printf("%llu\n", stream_key(a, b, c)); }
        else if (op == "bits") { std::cin >> a >> b; std::printf("%llu\n", element_bits(a, b)); }
        else if (op == "sr") { std::cin >> a >> b; std::printf("%u\n", (u32)round_bf16_stochastic(__uint_as_float((u32)a), b)); }
        else if (op == "eavg") { std::cin >> a >> b >> c; std::printf("%u\n", encode_exp_avg(__uint_as_float((u32)a), __uint_as_float((u32)b), (u32)c)); }
        else if (op == "einf") { std::cin >> a >> b >> c; std::printf("%u\n", encode_exp_inf(__uint_as_float((u32)a), __uint_as_float((u32)b), (u32)c)); }
        else if (op == "davg") { std::cin >> a >> b; std::printf("%u\n", __float_as_uint(decode_exp_avg((u32)a, __uint_as_float((u32)b)))); }
        else if (op == "dinf") { std::cin >> a >> b; std::printf("%u\n", __float_as_uint(decode_exp_inf((u32)a, __uint_as_float((u32)b)))); }
        else if (op == "scale") { std::cin >> a; std::printf("%u\n", __float_as_uint(block_scale(__uint_as_float((u32)a)))); }
        else { std::printf("unknown %s\n", op.c_str()); return 1; }
    }
    return 0;
}
"#;

/// The text of `kernels/adamax.cu` from the line containing `start` up to (not
/// including) the line containing `end`, or through the first line that is `end` when
/// `inclusive`.
fn section(start: &str, end: &str, inclusive: bool) -> Result<String, Failed> {
    let from = KERNEL
        .find(start)
        .ok_or_else(|| format!("kernels/adamax.cu has no `{start}`"))?;
    let rest = &KERNEL[from..];
    let to = rest
        .find(end)
        .ok_or_else(|| format!("kernels/adamax.cu has no `{end}` after `{start}`"))?;
    Ok(rest[..to + if inclusive { end.len() } else { 0 }].to_owned())
}

/// The harness's source: the shim, the bf16 narrowing and the NaN-propagating max the
/// helpers use, the low-byte section, and the command loop.
fn source() -> Result<String, Failed> {
    Ok([
        SHIM.to_owned(),
        NO_WARP.to_owned(),
        section(
            "__device__ __forceinline__ u16 narrow(float x, bf16) {",
            "\n}\n",
            true,
        )?,
        section(
            "__device__ __forceinline__ float max_propagating_nan(",
            "\n}\n",
            true,
        )?,
        section("// ---- Low-byte modes", "// ---- Memory traversal", false)?,
        MAIN.to_owned(),
    ]
    .concat())
}

/// Host definitions for the traversal: the vector types, the f64 intrinsics, f16
/// conversions through `_Float16` (round to nearest even, as the PTX instructions), and
/// a warp of 32 threads whose shuffles meet at a barrier.
const WARP_SHIM: &str = r#"
#include <atomic>
#include <barrier>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>
#define ADAMAX_LAYOUT_CHECKS
#define ADAMAX_ENTRY_POINTS
#define ADAMAX_CHUNK 8192
#define ADAMAX_BLOCK 256
#define ADAMAX_QBLOCK 256
#define ADAMAX_FLAG_UNSCALE 1
#define ADAMAX_FLAG_CLIP 2
#define ADAMAX_FLAG_CHECK 4
#define ADAMAX_FLAG_SCALER 8
#define ADAMAX_SKIP_NONFINITE 1
#define ADAMAX_SKIP_COUNTER_FULL 2
#define ADAMAX_SKIP_STALE_GRAPH 3
#define ADAMAX_EPS_INSIDE_MAX 0
#define ADAMAX_EPS_DENOMINATOR 1
#define ADAMAX_DECAY_COUPLED 1
#define ADAMAX_DECAY_DECOUPLED 2
#define ADAMAX_MODE_SR 1
#define ADAMAX_MODE_Q8 2
#define __INTADDR__(x) 0
// CUDA's alignments, which the sanitizer the harness is built with checks on every
// vector access (a misaligned one is an error on the GPU).
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
static inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline float __double2float_rn(double d) { return (float)d; }
template <typename A> static inline A min(A a, A b) { return a < b ? a : b; }
static inline float host_f16_to_f32(u16 bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
static inline u16 host_f32_to_f16(float x) { _Float16 h = (_Float16)x; u16 b; std::memcpy(&b, &h, 2); return b; }
static inline double __dsqrt_rn(double d) { return std::sqrt(d); }
// A block of threads: ids per thread, a barrier per block and per warp, shuffles and
// votes through shared slots, atomics through std::atomic_ref. Blocks run one at a
// time, so `__shared__` variables can be statics.
struct Dim { unsigned x; };
static Dim blockIdx{0}, blockDim{32}, gridDim{1};
static thread_local unsigned g_tid = 0;
struct ThreadIdx { unsigned x; };
#define threadIdx (ThreadIdx{g_tid})
#define __shared__ static
static std::barrier<>* g_block = nullptr;
static std::barrier<>* g_warps[8] = {};
static float g_slots_f[256];
static double g_slots_d[256];
static int g_slots_i[256];
static inline void warp_sync() { g_warps[g_tid / 32]->arrive_and_wait(); }
static inline unsigned partner(int off) { return (g_tid & ~31u) | ((g_tid & 31u) ^ (unsigned)off); }
static inline float __shfl_xor_sync(unsigned, float v, int off) {
    g_slots_f[g_tid] = v; warp_sync();
    const float r = g_slots_f[partner(off)]; warp_sync();
    return r;
}
static inline double __shfl_xor_sync(unsigned, double v, int off) {
    g_slots_d[g_tid] = v; warp_sync();
    const double r = g_slots_d[partner(off)]; warp_sync();
    return r;
}
static inline bool __any_sync(unsigned, bool p) {
    g_slots_i[g_tid] = p; warp_sync();
    bool any = false;
    for (unsigned l = 0; l < 32; ++l) any |= g_slots_i[(g_tid & ~31u) | l] != 0;
    warp_sync();
    return any;
}
static inline void __syncthreads() { g_block->arrive_and_wait(); }
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline u32 atomicAdd(u32* p, u32 v) { return std::atomic_ref<u32>(*p).fetch_add(v); }
static inline u32 atomicOr(u32* p, u32 v) { return std::atomic_ref<u32>(*p).fetch_or(v); }
// Runs `f` as block `block` of `threads` threads (a multiple of 32) of a grid of `grid`.
template <typename F> static void run_block(unsigned threads, unsigned block, unsigned grid, F f) {
    std::barrier<> whole(threads);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned w = 0; w < threads / 32; ++w) {
        warps.push_back(std::make_unique<std::barrier<>>(32));
        g_warps[w] = warps.back().get();
    }
    g_block = &whole;
    blockIdx.x = block; blockDim.x = threads; gridDim.x = grid;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) ts.emplace_back([=] { g_tid = t; f(); });
    for (auto& t : ts) t.join();
}
template <typename F> static void warp(F f) { run_block(32, 0, 1, f); }
"#;

/// Reads one case (see [`traversal_case`]), steps it with the kernel's code, prints the
/// parameters, the master, and the moments (f32 bits, or codes and scale bits).
const WARP_MAIN: &str = r#"
static u64 next() { u64 v; std::cin >> v; return v; }
template <typename T, int MODE>
static void step(const Scalars& sc, TensorDesc t, u64 key, bool aligned) {
    if constexpr ((MODE & MODE_Q8) != 0) {
        for (u64 b = 0; b * ADAMAX_QBLOCK < t.len; ++b)
            warp([&] { step_q8_block<T, MODE>(sc, t, b, key, aligned); });
    } else {
        u64 i = 0;
        if (aligned)
            for (; i + 8 <= t.len; i += 8) step8_sr<T, MODE>(sc, t, i, key);
        for (; i < t.len; ++i) step1_sr<T, MODE>(sc, t, i, key);
    }
}
int main() {
    u64 cases = next();
    for (u64 c = 0; c < cases; ++c) {
        const u64 type = next(), mode = next(), n = next(), key = next(), aligned = next();
        Scalars sc{};
        sc.beta1 = __uint_as_float((u32)next());
        sc.one_minus_beta1 = __uint_as_float((u32)next());
        sc.beta2 = __uint_as_float((u32)next());
        sc.eps = __uint_as_float((u32)next());
        sc.step_size = __uint_as_float((u32)next());
        sc.decay = __uint_as_float((u32)next());
        sc.eps_mode = next() ? EPS_DENOMINATOR : EPS_INSIDE_MAX;
        const u64 decay = next();
        sc.decay_mode = decay == 0 ? DECAY_NONE : decay == 1 ? DECAY_COUPLED : DECAY_DECOUPLED;
        sc.maximize = (u32)next();
        sc.flags = 0;
        const u64 nb = (n + ADAMAX_QBLOCK - 1) / ADAMAX_QBLOCK;
        // 16-byte aligned storage; an unaligned case starts one element in.
        const u64 off = aligned ? 0 : 1;
        std::vector<u32> p32(n + 8), g32(n + 8), master(n + 8), m(n + 8), u(n + 8);
        std::vector<u16> p16(n + 8), g16(n + 8);
        std::vector<unsigned char> cm(n + 8), cu(n + 8);
        std::vector<float> sm(nb + 1), su(nb + 1);
        const bool q8 = (mode & 2) != 0, has_master = type != 0 && (mode & 1) == 0;
        for (u64 i = 0; i < n; ++i) { if (type == 0) p32[off + i] = (u32)next(); else p16[off + i] = (u16)next(); }
        for (u64 i = 0; i < n; ++i) { if (type == 0) g32[off + i] = (u32)next(); else g16[off + i] = (u16)next(); }
        if (has_master) for (u64 i = 0; i < n; ++i) master[i] = (u32)next();
        if (q8) {
            for (u64 i = 0; i < n; ++i) cm[i] = (unsigned char)next();
            for (u64 b = 0; b < nb; ++b) sm[b] = __uint_as_float((u32)next());
            for (u64 i = 0; i < n; ++i) cu[i] = (unsigned char)next();
            for (u64 b = 0; b < nb; ++b) su[b] = __uint_as_float((u32)next());
        } else {
            for (u64 i = 0; i < n; ++i) m[i] = (u32)next();
            for (u64 i = 0; i < n; ++i) u[i] = (u32)next();
        }
        TensorDesc t{};
        t.param = type == 0 ? (u64)(p32.data() + off) : (u64)(p16.data() + off);
        t.grad = type == 0 ? (u64)(g32.data() + off) : (u64)(g16.data() + off);
        t.master = has_master ? (u64)master.data() : 0;
        t.exp_avg = q8 ? (u64)cm.data() : (u64)m.data();
        t.exp_inf = q8 ? (u64)cu.data() : (u64)u.data();
        t.exp_avg_scale = q8 ? (u64)sm.data() : 0;
        t.exp_inf_scale = q8 ? (u64)su.data() : 0;
        t.len = n;
        t.has_grad = 1;
        if (type == 0 && mode == 2) step<float, 2>(sc, t, key, aligned);
        else if (type == 1 && mode == 2) step<bf16, 2>(sc, t, key, aligned);
        else if (type == 1 && mode == 3) step<bf16, 3>(sc, t, key, aligned);
        else if (type == 1 && mode == 1) step<bf16, 1>(sc, t, key, aligned);
        else if (type == 2 && mode == 2) step<f16, 2>(sc, t, key, aligned);
        else { std::printf("unsupported case\n"); return 1; }
        for (u64 i = 0; i < n; ++i) std::printf("%u ", type == 0 ? p32[off + i] : (u32)p16[off + i]);
        if (has_master) for (u64 i = 0; i < n; ++i) std::printf("%u ", master[i]);
        if (q8) {
            for (u64 i = 0; i < n; ++i) std::printf("%u ", (u32)cm[i]);
            for (u64 b = 0; b < nb; ++b) std::printf("%u ", __float_as_uint(sm[b]));
            for (u64 i = 0; i < n; ++i) std::printf("%u ", (u32)cu[i]);
            for (u64 b = 0; b < nb; ++b) std::printf("%u ", __float_as_uint(su[b]));
        } else {
            for (u64 i = 0; i < n; ++i) std::printf("%u ", m[i]);
            for (u64 i = 0; i < n; ++i) std::printf("%u ", u[i]);
        }
        std::printf("\n");
    }
    return 0;
}
"#;

/// The whole update kernel (`adamax_step`) over a list of tensors, launched block by
/// block: reads one run (see [`whole_step_run`]), prints every tensor's parameters,
/// master and moments, each tensor's step count and the optimizer's.
const STEP_MAIN: &str = r#"
static u64 next() { u64 v; std::cin >> v; return v; }
static double next_f64() { u64 b = next(); double d; std::memcpy(&d, &b, 8); return d; }
struct Tensor {
    u64 len = 0;
    std::vector<u32> p32, g32, master, m, u;
    std::vector<u16> p16, g16;
    std::vector<unsigned char> cm, cu;
    std::vector<float> sm, su;
};
template <typename T, int MODE>
static void launch_step(const AdamaxArgs& a, unsigned grid, bool captured) {
    // With clipping or the overflow check, or in a captured step, the reduction and the
    // decision pass first (src/cuda/launch.rs's decision_passes).
    if (captured || (a.control->params.flags & (FLAG_CHECK | FLAG_CLIP))) {
        if (a.num_chunks > 0)
            for (unsigned b = 0; b < grid; ++b) run_block(ADAMAX_BLOCK, b, grid, [&] { adamax_reduce<T>(a); });
        run_block(ADAMAX_BLOCK, 0, 1, [&] { adamax_finalize(a); });
    }
    for (unsigned b = 0; b < grid; ++b) run_block(ADAMAX_BLOCK, b, grid, [&] { adamax_step<T, MODE>(a); });
}
int main() {
    const u64 type = next(), mode = next(), nt = next(), steps = next(), grid = next();
    const u64 unit_len = next();
    const bool q8 = (mode & 2) != 0, has_master = type != 0 && (mode & 1) == 0;
    AdamaxArgs a{};
    Control control{};
    control.params.lr = next_f64();
    control.params.beta1 = next_f64();
    control.params.inv_scale = 1.0f;
    control.state.step_inv_scale = 1.0f;
    control.state.clip_coef = 1.0f;
    a.seed = next();
    a.beta1 = __uint_as_float((u32)next());
    a.one_minus_beta1 = __uint_as_float((u32)next());
    a.beta2 = __uint_as_float((u32)next());
    a.eps = __uint_as_float((u32)next());
    a.eps_mode = next() ? EPS_DENOMINATOR : EPS_INSIDE_MAX;
    a.decay_mode = next() ? DECAY_DECOUPLED : DECAY_COUPLED;
    a.maximize = (u32)next();
    // The fused passes: flags, clipping threshold, loss scaler.
    control.params.flags = (u32)next();
    control.params.max_norm = __uint_as_float((u32)next());
    control.params.growth_factor = next_f64();
    control.params.backoff_factor = next_f64();
    control.params.growth_interval = (u32)next();
    control.scaler.scale = __uint_as_float((u32)next());
    control.params.min_scale = __uint_as_float((u32)next());
    // A captured step (the passes always enqueued); the step from which the flags are
    // on (set after the capture); a launch whose by-value arguments are stale.
    const bool captured = next() != 0;
    const u64 fused_from = next();
    a.generation = (u32)next();
    // The moments one element (one code) off a 16-byte boundary: the update must check
    // every buffer it reads with vector accesses, not only the parameters'.
    const u64 mis = next();
    const u32 fused_flags = control.params.flags;
    std::vector<Tensor> ts(nt);
    std::vector<TensorDesc> table(nt);
    std::vector<u64> tensor_steps(nt, 0);
    a.unit_len = unit_len;
    u64 units = 0, chunks = 0;
    for (u64 k = 0; k < nt; ++k) {
        Tensor& t = ts[k];
        t.len = next();
        const u64 n = t.len, nb = (n + ADAMAX_QBLOCK - 1) / ADAMAX_QBLOCK;
        table[k].lr_scale = next_f64();
        table[k].weight_decay = next_f64();
        t.p32.resize(n + 8); t.g32.resize(n + 8); t.master.resize(n + 8); t.m.resize(n + 8); t.u.resize(n + 8);
        t.p16.resize(n + 8); t.g16.resize(n + 8); t.cm.resize(n + 8); t.cu.resize(n + 8);
        t.sm.resize(nb + 1); t.su.resize(nb + 1);
        for (u64 i = 0; i < n; ++i) {
            const u64 v = next();
            if (type == 0) t.p32[i] = (u32)v; else t.p16[i] = (u16)v;
        }
        if (has_master)
            for (u64 i = 0; i < n; ++i)
                t.master[i] = __float_as_uint(type == 1 ? widen(t.p16[i], bf16()) : widen(t.p16[i], f16()));
        TensorDesc& d = table[k];
        d.param = type == 0 ? (u64)t.p32.data() : (u64)t.p16.data();
        d.grad = type == 0 ? (u64)t.g32.data() : (u64)t.g16.data();
        d.master = has_master ? (u64)t.master.data() : 0;
        d.exp_avg = q8 ? (u64)(t.cm.data() + mis) : (u64)(t.m.data() + mis);
        d.exp_inf = q8 ? (u64)(t.cu.data() + mis) : (u64)(t.u.data() + mis);
        d.exp_avg_scale = q8 ? (u64)t.sm.data() : 0;
        d.exp_inf_scale = q8 ? (u64)t.su.data() : 0;
        d.len = n;
        d.unit_begin = units;
        d.chunk_begin = chunks;
        units += (n + a.unit_len - 1) / a.unit_len;
        chunks += (n + ADAMAX_CHUNK - 1) / ADAMAX_CHUNK;
    }
    std::vector<float> partials(chunks + 1);
    a.tensors = table.data();
    a.num_tensors = nt;
    a.num_units = units;
    a.num_chunks = chunks;
    a.control = &control;
    a.partials = partials.data();
    a.tensor_steps = tensor_steps.data();
    for (u64 s = 0; s < steps; ++s) {
        control.params.flags = s >= fused_from ? fused_flags : 0u;
        for (u64 k = 0; k < nt; ++k) {
            table[k].has_grad = next();
            if (table[k].has_grad)
                for (u64 i = 0; i < ts[k].len; ++i) {
                    const u64 v = next();
                    if (type == 0) ts[k].g32[i] = (u32)v; else ts[k].g16[i] = (u16)v;
                }
        }
        if (type == 0 && mode == 0) launch_step<float, 0>(a, (unsigned)grid, captured);
        else if (type == 0 && mode == 2) launch_step<float, 2>(a, (unsigned)grid, captured);
        else if (type == 1 && mode == 0) launch_step<bf16, 0>(a, (unsigned)grid, captured);
        else if (type == 1 && mode == 1) launch_step<bf16, 1>(a, (unsigned)grid, captured);
        else if (type == 1 && mode == 2) launch_step<bf16, 2>(a, (unsigned)grid, captured);
        else if (type == 1 && mode == 3) launch_step<bf16, 3>(a, (unsigned)grid, captured);
        else if (type == 2 && mode == 2) launch_step<f16, 2>(a, (unsigned)grid, captured);
        else { std::printf("unsupported case\n"); return 1; }
    }
    for (u64 k = 0; k < nt; ++k) {
        const Tensor& t = ts[k];
        const u64 n = t.len, nb = (n + ADAMAX_QBLOCK - 1) / ADAMAX_QBLOCK;
        for (u64 i = 0; i < n; ++i) std::printf("%u ", type == 0 ? t.p32[i] : (u32)t.p16[i]);
        if (has_master) for (u64 i = 0; i < n; ++i) std::printf("%u ", t.master[i]);
        if (q8) {
            for (u64 i = 0; i < n; ++i) std::printf("%u ", (u32)t.cm[mis + i]);
            for (u64 b = 0; b < nb; ++b) std::printf("%u ", __float_as_uint(t.sm[b]));
            for (u64 i = 0; i < n; ++i) std::printf("%u ", (u32)t.cu[mis + i]);
            for (u64 b = 0; b < nb; ++b) std::printf("%u ", __float_as_uint(t.su[b]));
        } else {
            for (u64 i = 0; i < n; ++i) std::printf("%u ", t.m[mis + i]);
            for (u64 i = 0; i < n; ++i) std::printf("%u ", t.u[mis + i]);
        }
        std::printf("%llu\n", tensor_steps[k]);
    }
    std::printf("%llu %u %u %u\n", control.state.step, __float_as_uint(control.scaler.scale),
                control.scaler.growth_tracker, control.state.skipped);
    return 0;
}
"#;

/// The kernel through the last device function (every kernel body, no entry points).
fn whole_kernel_source() -> Result<String, Failed> {
    let body = section(
        "typedef unsigned long long u64;",
        "// ---- Entry points ----",
        false,
    )?;
    Ok([SHIM, WARP_SHIM, &host_body(body)?, STEP_MAIN].concat())
}

/// A storage value as the harness reads and prints it: the f32 bits, or the 16 bits.
fn storage_bits<T: adamax_cuda::Storage>(x: &T) -> u64 {
    match T::TYPE {
        adamax_cuda::StorageType::F16 => u64::from(half::f16::from_f32(x.to_f32()).to_bits()),
        adamax_cuda::StorageType::Bf16 => u64::from(x.to_f32().to_bits() >> 16),
        adamax_cuda::StorageType::F32 => u64::from(x.to_f32().to_bits()),
    }
}

/// The harness's number for a storage type and its mode bits (1: stochastic rounding,
/// 2: 8-bit state).
fn case_kind<T: adamax_cuda::Storage>(precision: &adamax_cuda::Precision) -> (u64, u64) {
    let type_id = match T::TYPE {
        adamax_cuda::StorageType::F32 => 0,
        adamax_cuda::StorageType::Bf16 => 1,
        adamax_cuda::StorageType::F16 => 2,
    };
    let sr = u64::from(precision.params == adamax_cuda::ParamMode::Stochastic);
    let q8 = u64::from(precision.state == adamax_cuda::StateFormat::Blockwise8);
    (type_id, sr | q8 << 1)
}

/// One tensor's state in the harness's print order: master, then the moments (f32
/// bits, or codes and scale bits).
fn state_bits(out: &mut Vec<u64>, state: &adamax_cuda::TensorState, q8: bool) {
    let f32_bits = |v: &[f32]| v.iter().map(|x| u64::from(x.to_bits())).collect::<Vec<_>>();
    out.extend(f32_bits(&state.master));
    if q8 {
        for m in [&state.exp_avg_q8, &state.exp_inf_q8] {
            out.extend(m.codes.iter().map(|&c| u64::from(c)));
            out.extend(f32_bits(&m.scales));
        }
    } else {
        out.extend(f32_bits(&state.exp_avg));
        out.extend(f32_bits(&state.exp_inf));
    }
}

/// How the emulated steps are launched.
#[derive(Clone, Copy, Debug)]
struct Launch {
    /// As a captured CUDA graph replays them: the reduction and the decision pass are
    /// enqueued in every step, whatever the flags.
    captured: bool,
    /// The step from which the fused options and the loss scaler are on (set after a
    /// capture, for a captured launch).
    fused_from: usize,
    /// The launch carries by-value arguments of an older generation (a graph captured
    /// before a restore that changed them): nothing may change.
    stale: bool,
    /// The moments start one element (one code) off a 16-byte boundary.
    misaligned_state: bool,
}

const EAGER: Launch = Launch {
    captured: false,
    fused_from: 0,
    stale: false,
    misaligned_state: false,
};

/// `StepState::skipped` of a stale launch (src/cuda/args.rs).
const SKIP_STALE_GRAPH: u64 = 3;

/// Several steps of a list of tensors (some without a gradient in some steps) in one
/// storage type and mode, from fresh state, on the emulated kernel and with
/// `CpuAdamax::step_some`: the input for the harness and the reference's output.
fn whole_step_run<T: adamax_cuda::Storage>(
    rng: &mut StdRng,
    config: adamax_cuda::AdamaxConfig,
    lens: &[usize],
    steps: usize,
    (grid, unit_len): (u32, u64),
    fused: Option<(adamax_cuda::StepOptions, adamax_cuda::LossScaler)>,
    launch: Launch,
) -> Result<(Vec<u64>, Vec<u64>), Failed> {
    use adamax_cuda::{cpu::CpuAdamax, EpsilonMode, Optimizer, StateFormat, WeightDecayMode};
    let precision = config.precision;
    let q8 = precision.state == StateFormat::Blockwise8;
    let (type_id, mode) = case_kind::<T>(&precision);
    let value = |rng: &mut StdRng, scale: f32| {
        rng.random_range(-1.0..1.0f32) * scale * 10f32.powf(rng.random_range(-3.0..0.0))
    };
    let mut params: Vec<Vec<T>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| T::from_f32(value(rng, 1.0))).collect())
        .collect();
    let refs: Vec<&[T]> = params.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::new(config, &refs)?;
    // A parameter group with its own learning rate and no decay.
    let group = adamax_cuda::TensorHyper {
        lr_scale: 0.5,
        weight_decay: 0.0,
    };
    cpu.set_tensor_hyper(lens.len() - 1, group)?;
    // The fused passes as CudaAdamax sets them (src/cuda/optimizer.rs, params_with):
    // unscale (1), clip (2), check (4), scaler (8).
    let (flags, max_norm, scaler) = match fused {
        Some((options, scaler)) => {
            let clip = options.max_norm.map_or(0, |_| 2);
            (1 | clip | 4 | 8, options.max_norm.unwrap_or(0.0), scaler)
        }
        None => (0, 0.0, adamax_cuda::LossScaler::default()),
    };
    let s = adamax_cuda::spec::StepScalars::new(&config, 1);
    let mut input = vec![
        type_id,
        mode,
        lens.len() as u64,
        steps as u64,
        u64::from(grid),
        unit_len,
    ];
    input.extend([config.lr.to_bits(), config.beta1.to_bits(), precision.seed]);
    input.extend([s.beta1, s.one_minus_beta1, s.beta2, s.eps].map(|x| u64::from(x.to_bits())));
    input.extend([
        u64::from(config.eps_mode == EpsilonMode::Denominator),
        u64::from(config.weight_decay_mode == WeightDecayMode::Decoupled),
        u64::from(config.maximize),
    ]);
    input.extend([
        flags,
        u64::from(max_norm.to_bits()),
        scaler.growth_factor.to_bits(),
        scaler.backoff_factor.to_bits(),
        u64::from(scaler.growth_interval),
        u64::from(scaler.scale.to_bits()),
        u64::from(scaler.min_scale.to_bits()),
        u64::from(launch.captured),
        launch.fused_from as u64,
        u64::from(launch.stale),
        u64::from(launch.misaligned_state),
    ]);
    for (i, p) in params.iter().enumerate() {
        let h = cpu.tensor_hypers()[i];
        input.extend([
            p.len() as u64,
            h.lr_scale.to_bits(),
            h.weight_decay.to_bits(),
        ]);
        input.extend(p.iter().map(storage_bits));
    }
    for step in 0..steps {
        if let (Some((options, scaler)), true) = (fused, step == launch.fused_from) {
            cpu.set_options(options)?;
            cpu.set_loss_scaler(Some(scaler))?;
        }
        let grads: Vec<Option<Vec<T>>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                // Tensor 1 has no gradient in odd steps.
                (i != 1 || step % 2 == 0).then(|| {
                    // Scaled by the loss scale of this step; an overflow two steps
                    // after the fused passes are on.
                    let scale = cpu.loss_scaler().ok().flatten().map_or(1.0, |s| s.scale);
                    let mut g: Vec<T> = (0..n)
                        .map(|_| T::from_f32(value(rng, 0.1) * scale))
                        .collect();
                    if fused.is_some() && step == launch.fused_from + 2 && i == 0 {
                        g[7] = T::from_f32(f32::INFINITY);
                    }
                    g
                })
            })
            .collect();
        for g in &grads {
            match g {
                Some(g) => {
                    input.push(1);
                    input.extend(g.iter().map(storage_bits));
                }
                None => input.push(0),
            }
        }
        if !launch.stale {
            let mut p: Vec<&mut [T]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
            let g: Vec<Option<&[T]>> = grads.iter().map(|g| g.as_deref()).collect();
            cpu.step_some(&mut p, &g)?;
        }
    }
    let mut expected = Vec::new();
    for (p, t) in params.iter().zip(cpu.tensor_states()) {
        expected.extend(p.iter().map(storage_bits));
        state_bits(&mut expected, t, q8);
        expected.push(t.step);
    }
    expected.push(cpu.step_count()?);
    let s = cpu.loss_scaler()?.unwrap_or(scaler);
    let skipped = if launch.stale {
        SKIP_STALE_GRAPH
    } else {
        u64::from(cpu.last_report()?.skipped)
    };
    expected.extend([
        u64::from(s.scale.to_bits()),
        u64::from(s.growth_tracker),
        skipped,
    ]);
    Ok((input, expected))
}

fn whole_steps_match_the_cpu(cxx: &str) -> Result<(), Failed> {
    use adamax_cuda::{
        bf16, f16, AdamaxConfig, LossScaler, ParamMode as P, Precision, StateFormat as S,
        StepOptions, WeightDecayMode,
    };
    let mut rng = StdRng::seed_from_u64(0x57E9);
    let harness = Harness::build(cxx, "whole", &whole_kernel_source()?)?;
    let lens = [3000usize, 700, 0, 5, 1300];
    let config = |params, state| AdamaxConfig {
        weight_decay: 0.05,
        weight_decay_mode: WeightDecayMode::Decoupled,
        lr: 1e-2,
        precision: Precision {
            params,
            state,
            seed: 0xA11CE,
        },
        ..AdamaxConfig::default()
    };
    // Clipping, a loss scaler that grows and backs off, the overflow skip.
    let fused = Some((
        StepOptions {
            max_norm: Some(0.5),
            ..Default::default()
        },
        LossScaler {
            scale: 1024.0,
            growth_interval: 2,
            ..Default::default()
        },
    ));
    // One block walking 8,192-element units (more 8-bit blocks than warps), and three
    // blocks walking 1,024-element units (the grid stride); then the fused passes.
    // Then as a captured graph replays (issue #17, items 1 and 2): the passes in every
    // step, with no flags, with the flags turned on after two steps, and a stale launch.
    let captured = |fused_from, stale| Launch {
        captured: true,
        fused_from,
        stale,
        ..EAGER
    };
    let shapes = [
        ((1u32, 8192u64), 4, None, EAGER),
        ((3, 1024), 4, None, EAGER),
        ((3, 1024), 6, fused, EAGER),
        ((3, 1024), 3, None, captured(0, false)),
        ((3, 1024), 7, fused, captured(2, false)),
        ((3, 1024), 3, fused, captured(0, true)),
        (
            (1, 8192),
            2,
            None,
            Launch {
                stale: true,
                ..EAGER
            },
        ),
        // Issue #17, item 3: the low-byte paths checked the alignment of the parameters
        // only, then read misaligned moments with vector accesses.
        (
            (3, 1024),
            2,
            None,
            Launch {
                misaligned_state: true,
                ..EAGER
            },
        ),
    ];
    let mut runs = Vec::new();
    for (grid, steps, fused, launch) in shapes {
        macro_rules! add {
            ($what:literal, $t:ty, $params:expr, $state:expr) => {
                runs.push((
                    format!("{} {grid:?} fused {} {launch:?}", $what, fused.is_some()),
                    whole_step_run::<$t>(
                        &mut rng,
                        config($params, $state),
                        &lens,
                        steps,
                        grid,
                        fused,
                        launch,
                    )?,
                ))
            };
        }
        add!("f32", f32, P::Master, S::F32);
        add!("f32 q8", f32, P::Master, S::Blockwise8);
        add!("bf16", bf16, P::Master, S::F32);
        add!("bf16 sr", bf16, P::Stochastic, S::F32);
        add!("bf16 q8", bf16, P::Master, S::Blockwise8);
        add!("bf16 sr q8", bf16, P::Stochastic, S::Blockwise8);
        add!("f16 q8", f16, P::Master, S::Blockwise8);
    }
    for (what, (input, expected)) in &runs {
        let text: Vec<String> = input.iter().map(u64::to_string).collect();
        let got = harness.run(&text.join(" "))?;
        if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
            return Err(format!(
                "{what}: value {i} is {} on the kernel, {} on the CPU",
                got[i], expected[i]
            )
            .into());
        }
        if got.len() != expected.len() {
            return Err(format!(
                "{what}: {} values from the kernel, {} expected",
                got.len(),
                expected.len()
            )
            .into());
        }
    }
    eprintln!(
        "{} multi-step runs of the whole update kernel equal CpuAdamax",
        runs.len()
    );
    Ok(())
}

/// The kernel from its first type to the end of the element traversal (no kernels, no
/// shared memory or atomics), with the f16 conversions' PTX replaced by host ones.
fn traversal_source() -> Result<String, Failed> {
    let body = section(
        "typedef unsigned long long u64;",
        "// Elements per vector call",
        false,
    )?;
    Ok([SHIM, WARP_SHIM, &host_body(body)?, WARP_MAIN].concat())
}

/// Kernel text made host C++: the f16 conversions' PTX replaced by host ones, the types
/// the shim already declares removed.
fn host_body(body: String) -> Result<String, Failed> {
    let f16_in = r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));"#;
    let f16_out = r#"asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));"#;
    if !body.contains(f16_in) || !body.contains(f16_out) {
        return Err("the kernel's f16 conversions changed: update tests/kernel_host.rs".into());
    }
    let body = body
        .replace(f16_in, "f = host_f16_to_f32(bits);")
        .replace(f16_out, "h = host_f32_to_f16(x);")
        .replace("typedef unsigned long long u64;\ntypedef unsigned int u32;\ntypedef unsigned short u16;", "")
        .replace("struct bf16 { u16 bits; };", "");
    Ok(body)
}

fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    Command::new(&cxx)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| cxx)
}

/// How long one harness run may take (the largest takes about a second).
const HARNESS_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A harness built from a source, in a directory removed when dropped.
struct Harness {
    dir: std::path::PathBuf,
    exe: std::path::PathBuf,
}

impl Harness {
    fn build(cxx: &str, name: &str, source: &str) -> Result<Self, Failed> {
        let dir =
            std::env::temp_dir().join(format!("adamax-kernel-host-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (src, exe) = (dir.join("harness.cpp"), dir.join("harness"));
        std::fs::write(&src, source)?;
        let built = Command::new(cxx)
            .args([
                "-std=c++20",
                "-O2",
                "-ffp-contract=off",
                "-fno-fast-math",
                "-pthread",
                // Every vector access must be aligned as on the GPU (a misaligned one
                // aborts the harness).
                "-fsanitize=alignment",
                "-fno-sanitize-recover=alignment",
                "-o",
            ])
            .arg(&exe)
            .arg(&src)
            .output()?;
        if !built.status.success() {
            return Err(format!(
                "the extracted kernel code does not compile for the host:\n{}",
                String::from_utf8_lossy(&built.stderr)
            )
            .into());
        }
        Ok(Self { dir, exe })
    }

    /// Feeds `commands` to the harness; returns its output numbers (whitespace-separated).
    fn run(&self, commands: &str) -> Result<Vec<u64>, Failed> {
        // From a file: a pipe would fill both ways and deadlock.
        let input = self.dir.join("commands.txt");
        std::fs::write(&input, commands)?;
        let output = self.dir.join("output.txt");
        let mut child = Command::new(&self.exe)
            .stdin(Stdio::from(std::fs::File::open(&input)?))
            .stdout(Stdio::from(std::fs::File::create(&output)?))
            .stderr(Stdio::piped())
            .spawn()?;
        // A barrier that some emulated threads never reach hangs the harness: a
        // deadlock in the kernel's synchronisation, reported as such.
        let start = std::time::Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > HARNESS_LIMIT {
                let _ = child.kill();
                return Err(format!(
                    "the harness did not finish in {HARNESS_LIMIT:?}: its threads deadlocked (a barrier or shuffle that some threads of a block never reach)"
                )
                .into());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut out = child.wait_with_output()?;
        out.stdout = std::fs::read(&output)?;
        if !out.status.success() {
            return Err(format!(
                "the harness failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        String::from_utf8(out.stdout)?
            .split_whitespace()
            .map(|l| l.parse::<u64>().map_err(|e| format!("`{l}`: {e}").into()))
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Builds a harness from `source`, feeds it `commands` once.
fn run(cxx: &str, name: &str, source: &str, commands: &str) -> Result<Vec<u64>, Failed> {
    Harness::build(cxx, name, source)?.run(commands)
}

/// f32 values that exercise every path: zeros, subnormals, the codes' boundaries,
/// exact codes, values near 1, the largest finite values, infinities and NaNs.
fn interesting(rng: &mut StdRng) -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-45,
        f32::MAX,
        -f32::MAX,
        3.389e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7FFF_FFFF),
        f32::from_bits(0xFFC0_0001),
        1.0f32.next_down(),
        2f32.powi(-14),
        2f32.powi(-14).next_down(),
        2f32.powi(-17),
        2f32.powi(-18),
        2f32.powi(-19),
    ];
    for code in [EXP_AVG_CODE, EXP_INF_CODE] {
        for c in 0..=code.max_magnitude_code() {
            let x = code.decode_magnitude(c);
            v.extend([x, x.next_up(), x.next_down().max(0.0)]);
        }
    }
    for _ in 0..3000 {
        let x: f32 = rng.random_range(-1.0..1.0) * 10f32.powf(rng.random_range(-12.0..1.0));
        v.push(x);
    }
    v
}

fn helpers_match_the_spec(cxx: &str) -> Result<(), Failed> {
    let mut rng = StdRng::seed_from_u64(0xC0DE5);
    let mut commands = String::new();
    let mut expected: Vec<(String, u64)> = Vec::new();
    let mut add = |cmd: String, want: u64| {
        commands.push_str(&cmd);
        commands.push('\n');
        expected.push((cmd, want));
    };
    for _ in 0..2000 {
        let (a, b, c): (u64, u64, u64) = (rng.random(), rng.random(), rng.random());
        add(format!("mix {a}"), lowbit::mix64(a));
        add(format!("key {a} {b} {c}"), lowbit::stream_key(a, b, c));
        add(format!("bits {a} {b}"), lowbit::element_bits(a, b));
    }
    let values = interesting(&mut rng);
    for &x in &values {
        for r in [
            0u32,
            1,
            0x7FFF,
            0x8000,
            0xFFFF,
            rng.random::<u32>() & 0xFFFF,
        ] {
            let want = lowbit::round_bf16_stochastic(x, r).to_bits();
            add(format!("sr {} {r}", x.to_bits()), u64::from(want));
        }
    }
    // Encoding takes a value of magnitude at most the block's scale (its largest), so
    // each value is encoded against scales at and above its magnitude.
    let finite: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    for &x in &finite {
        let a = x.abs();
        if a == 0.0 {
            continue;
        }
        for scale in [a, a * 1.5, a * 1000.0, 1.0f32.max(a)] {
            if !scale.is_finite() {
                continue;
            }
            for r in [0u32, 0x80_0000, 0xFF_FFFF, rng.random::<u32>() & 0xFF_FFFF] {
                let (xb, sb) = (x.to_bits(), scale.to_bits());
                add(
                    format!("eavg {xb} {sb} {r}"),
                    u64::from(EXP_AVG_CODE.encode(x, scale, r)),
                );
                add(
                    format!("einf {} {sb} {r}", a.to_bits()),
                    u64::from(EXP_INF_CODE.encode(a, scale, r)),
                );
            }
        }
    }
    for code in 0..=255u8 {
        for scale in [0.0f32, 1.0, 3.7e-3, 1e30, f32::NAN, 2e-40] {
            let sb = scale.to_bits();
            if EXP_AVG_CODE.is_valid(code) {
                let want = EXP_AVG_CODE.decode(code, scale).to_bits();
                add(format!("davg {code} {sb}"), u64::from(want));
            }
            if EXP_INF_CODE.is_valid(code) {
                let want = EXP_INF_CODE.decode(code, scale).to_bits();
                add(format!("dinf {code} {sb}"), u64::from(want));
            }
        }
    }
    for &x in &values {
        // The spec's encode_block: 0 stays 0, a non-finite largest magnitude marks the
        // block NaN (f32::NAN's bits), else the largest magnitude is the scale.
        let a = x.abs();
        let want = if a == 0.0 {
            0.0f32
        } else if a.is_finite() {
            a
        } else {
            f32::NAN
        };
        add(format!("scale {}", a.to_bits()), u64::from(want.to_bits()));
    }
    let got = run(cxx, "helpers", &source()?, &commands)?;
    if got.len() != expected.len() {
        return Err(format!("{} results for {} commands", got.len(), expected.len()).into());
    }
    let wrong: Vec<String> = expected
        .iter()
        .zip(&got)
        .filter(|((_, want), got)| want != *got)
        .take(10)
        .map(|((cmd, want), got)| format!("{cmd}: kernel {got}, spec {want}"))
        .collect();
    if !wrong.is_empty() {
        return Err(format!(
            "{} of {} differ, e.g.:\n{}",
            expected
                .iter()
                .zip(&got)
                .filter(|((_, w), g)| w != *g)
                .count(),
            expected.len(),
            wrong.join("\n")
        )
        .into());
    }
    eprintln!("{} kernel helper results equal the spec", expected.len());
    Ok(())
}

/// One traversal case for the harness and the spec's result for it.
struct Case {
    input: Vec<u64>,
    expected: Vec<u64>,
    what: String,
}

/// A tensor of `n` elements of storage `T` in `precision`, with random parameters,
/// gradients (some zero), master and moments (valid codes and scales), stepped once by
/// the spec as tensor 3 at its step 5; the harness gets the same inputs.
fn traversal_case<T: adamax_cuda::Storage>(
    rng: &mut StdRng,
    precision: adamax_cuda::Precision,
    config: adamax_cuda::AdamaxConfig,
    n: usize,
    aligned: bool,
) -> Case {
    use adamax_cuda::{spec::Decay, EpsilonMode, StateFormat, TensorState};
    let config = adamax_cuda::AdamaxConfig {
        precision,
        ..config
    };
    let (tensor, t) = (3usize, 5u64);
    let s = adamax_cuda::spec::StepScalars::new(&config, t);
    let key = lowbit::stream_key(precision.seed, t, tensor as u64);
    let value = |rng: &mut StdRng, scale: f32| {
        if rng.random::<f32>() < 0.05 {
            0.0
        } else {
            rng.random_range(-1.0..1.0f32) * scale * 10f32.powf(rng.random_range(-3.0..0.0))
        }
    };
    let mut param: Vec<T> = (0..n).map(|_| T::from_f32(value(rng, 1.0))).collect();
    let grad: Vec<T> = (0..n).map(|_| T::from_f32(value(rng, 0.1))).collect();
    let mut state = TensorState::with_precision(&param, &precision);
    state.step = t - 1;
    for x in state.master.iter_mut() {
        *x += value(rng, 1e-3);
    }
    let q8 = precision.state == StateFormat::Blockwise8;
    if q8 {
        for c in state.exp_avg_q8.codes.iter_mut() {
            *c = rng.random_range(0..=120u8) | if rng.random() { 0x80 } else { 0 };
        }
        for c in state.exp_inf_q8.codes.iter_mut() {
            *c = rng.random_range(0..=240u8);
        }
        for sc in state
            .exp_avg_q8
            .scales
            .iter_mut()
            .chain(&mut state.exp_inf_q8.scales)
        {
            *sc = value(rng, 0.1).abs();
        }
    } else {
        for (m, u) in state.exp_avg.iter_mut().zip(state.exp_inf.iter_mut()) {
            (*m, *u) = (value(rng, 0.1), value(rng, 0.1).abs());
        }
    }
    let (type_id, mode) = case_kind::<T>(&precision);
    let (decay, decay_mode) = match s.decay {
        Decay::None => (0.0, 0),
        Decay::Coupled { weight_decay } => (weight_decay, 1),
        Decay::Decoupled { lr_wd } => (lr_wd, 2),
    };
    let mut input = vec![type_id, mode, n as u64, key, u64::from(aligned)];
    input.extend(
        [
            s.beta1,
            s.one_minus_beta1,
            s.beta2,
            s.eps,
            s.step_size,
            decay,
        ]
        .map(|x| u64::from(x.to_bits())),
    );
    input.extend([
        u64::from(s.eps_mode == EpsilonMode::Denominator),
        decay_mode,
        u64::from(s.maximize),
    ]);
    let dump = |out: &mut Vec<u64>, param: &[T], state: &TensorState, grad: Option<&[T]>| {
        out.extend(param.iter().map(storage_bits));
        out.extend(grad.into_iter().flatten().map(storage_bits));
        state_bits(out, state, q8);
    };
    dump(&mut input, &param, &state, Some(&grad));
    adamax_cuda::cpu::step_tensor(&s, &precision, tensor, &mut param, &grad, &mut state)
        .unwrap_or_else(|e| panic!("the spec refused a case: {e}"));
    let mut expected = Vec::new();
    dump(&mut expected, &param, &state, None);
    Case {
        input,
        expected,
        what: format!(
            "{} {precision:?} n {n} aligned {aligned} {config:?}",
            T::NAME
        ),
    }
}

fn traversal_matches_the_spec(cxx: &str) -> Result<(), Failed> {
    use adamax_cuda::{
        bf16, f16, AdamaxConfig, EpsilonMode, ParamMode as P, Precision, StateFormat as S,
        WeightDecayMode,
    };
    let mut rng = StdRng::seed_from_u64(0x7A5E);
    let p = |params, state| Precision {
        params,
        state,
        seed: 0x5EED,
    };
    let configs = [
        AdamaxConfig::default(),
        AdamaxConfig {
            weight_decay: 0.1,
            weight_decay_mode: WeightDecayMode::Decoupled,
            eps_mode: EpsilonMode::Denominator,
            lr: 1e-2,
            ..AdamaxConfig::default()
        },
        AdamaxConfig {
            weight_decay: 0.05,
            maximize: true,
            eps: 0.0,
            ..AdamaxConfig::default()
        },
    ];
    let mut cases = Vec::new();
    for config in configs {
        for n in [1usize, 7, 8, 256, 300, 1000] {
            for aligned in [true, false] {
                let q8 = p(P::Master, S::Blockwise8);
                cases.push(traversal_case::<f32>(&mut rng, q8, config, n, aligned));
                cases.push(traversal_case::<bf16>(&mut rng, q8, config, n, aligned));
                cases.push(traversal_case::<f16>(&mut rng, q8, config, n, aligned));
                let sr = p(P::Stochastic, S::F32);
                cases.push(traversal_case::<bf16>(&mut rng, sr, config, n, aligned));
                let lean = p(P::Stochastic, S::Blockwise8);
                cases.push(traversal_case::<bf16>(&mut rng, lean, config, n, aligned));
            }
        }
    }
    let mut input = vec![cases.len() as u64];
    for c in &cases {
        input.extend(&c.input);
    }
    let text: Vec<String> = input.iter().map(u64::to_string).collect();
    let got = run(cxx, "traversal", &traversal_source()?, &text.join(" "))?;
    let mut at = 0;
    for c in &cases {
        let mine = got
            .get(at..at + c.expected.len())
            .ok_or_else(|| format!("{}: the harness printed too little", c.what))?;
        if let Some(i) = mine.iter().zip(&c.expected).position(|(a, b)| a != b) {
            return Err(format!(
                "{}: output {i} is {} on the kernel, {} in the spec",
                c.what, mine[i], c.expected[i]
            )
            .into());
        }
        at += c.expected.len();
    }
    eprintln!(
        "{} traversal cases ({at} values) equal the spec",
        cases.len()
    );
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let cxx = compiler();
    let in_ci = std::env::var_os("CI").is_some();
    if cxx.is_none() {
        eprintln!(
            "no C++ compiler (`c++` or $CXX): the host check of the kernel's helpers is ignored"
        );
    }
    let ignored = cxx.is_none() && !in_ci;
    let trial = |name: &str, f: fn(&str) -> Result<(), Failed>| {
        let cxx = cxx.clone();
        Trial::test(name, move || match cxx {
            Some(c) => f(&c),
            None => Err("no C++ compiler".into()),
        })
        .with_ignored_flag(ignored)
    };
    let trials = vec![
        trial(
            "kernel_low_byte_helpers_compiled_for_the_host_match_the_spec",
            helpers_match_the_spec,
        ),
        trial(
            "kernel_8_bit_blocks_and_stochastic_rounding_on_an_emulated_warp_match_the_spec",
            traversal_matches_the_spec,
        ),
        trial(
            "kernel_update_over_tensor_lists_on_emulated_blocks_matches_cpuadamax",
            whole_steps_match_the_cpu,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}
