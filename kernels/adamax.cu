// AdaMax step (Kingma & Ba 2015, sec. 7.1) over a list of tensors in one launch.
//
// Compiled at run time by NVRTC through adamax-cuda (src/cuda/compile.rs), which passes
// the layout constants below with -D. Self-contained on purpose: no #include, so NVRTC
// needs no CUDA headers on the user's machine; the 16-bit conversions are written here.
// tests/kernel_host/ compiles this same file for the host (ADAMAX_HOST_EMULATION; its
// hooks: the two f16 conversions, offsetof, the PTX multiply-add of the 8-bit encoders'
// random bits, the warp maximum's REDUX, and two PTX instructions of sm_80 and later that
// the host replaces with what they equal but for a NaN's payload: the rule's max.NaN.f32
// and the paired cvt.rn.{bf16,f16}x2 narrowing) and compares it with the spec.
//
// The element update `adamax_update` is the line-by-line twin of `update` in
// src/spec/mod.rs, the crate's spec, after two lines that unscale and clip the gradient
// in crate::fused's order. Every f32 operation is pinned with an IEEE intrinsic
// (__fmaf_rn, __fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn) and the module is compiled
// with --fmad=false, so the compiler contracts nothing and f32 results equal the CPU
// reference bit for bit.

#if !defined(ADAMAX_LAYOUT_CHECKS) || !defined(ADAMAX_ENTRY_POINTS) || !defined(ADAMAX_CHUNK) || \
    !defined(ADAMAX_BLOCK) || !defined(ADAMAX_QBLOCK) || !defined(ADAMAX_Q8_THREADS)
#error "compile through adamax-cuda: it defines the ADAMAX_* layout, checks and entry points"
#endif

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// Storage types of 16-bit parameters: distinct types over the raw bits so that the
// overloads below pick the right conversion.
struct f16 { u16 bits; };
struct bf16 { u16 bits; };

// ---- Argument layout, mirrored by src/cuda/args.rs ----
// NOTE: src/cuda/args.rs is the one source of the layout. It passes the size of every
// struct below and the offset of every field as static_asserts (ADAMAX_LAYOUT_CHECKS,
// expanded after the structs), and the mode and flag values as -D defines.

// One tensor of the list. The optimizer's own buffers (exp_avg, exp_inf, master, the
// scales) are allocated 256-byte aligned, and each tensor's part starts 64 elements
// aligned; param and grad belong to the caller and may be views at any element offset.
struct TensorDesc {
    u64 param;        // T*: the parameter (the 16-bit copy when master != 0)
    u64 grad;         // const T*
    u64 exp_avg;      // float*: m; with 8-bit state (blockwise8 below), unsigned char*: the codes of m's ratio to the step's denominator
    u64 exp_inf;      // float*: u; with 8-bit state, unsigned char*: u's codes
    u64 master;       // float*: f32 master weights of a 16-bit parameter, else 0
    u64 exp_avg_scale;  // float*: one scale of m's ratio per ADAMAX_QBLOCK elements (8-bit state), else 0
    u64 exp_inf_scale;  // float*: the same for u
    u64 len;          // elements
    u64 chunk_begin;  // index of this tensor's first reduction chunk (ADAMAX_CHUNK elements)
    u64 unit_begin;   // index of this tensor's first work unit of the update (unit_len)
    u64 has_grad;     // 0: no gradient this step, the tensor is skipped (grad unused)
    u64 blockwise8;   // 1: 8-bit moments (StateFormat::Blockwise8); 0: f32 (see [per-tensor state])
    // Where the tensor sits in the whole list it is a piece of (a rank's shard, src/shard.rs;
    // for a whole tensor k: k, 0 and chunk_begin): the random stream's tensor and first
    // element, and where its chunks' partial sums go in the whole list's reduction.
    u64 stream_tensor;
    u64 element_base;  // a multiple of ADAMAX_CHUNK
    u64 partial_begin;
    double lr_scale;      // this tensor's learning rate is lr * lr_scale
    double weight_decay;  // this tensor's weight decay (0: none)
};

enum { EPS_INSIDE_MAX = ADAMAX_EPS_INSIDE_MAX, EPS_DENOMINATOR = ADAMAX_EPS_DENOMINATOR };
enum { DECAY_NONE = 0, DECAY_COUPLED = ADAMAX_DECAY_COUPLED, DECAY_DECOUPLED = ADAMAX_DECAY_DECOUPLED };
enum {
    FLAG_UNSCALE = ADAMAX_FLAG_UNSCALE,  // multiply gradients by an inverse loss scale
    FLAG_CLIP = ADAMAX_FLAG_CLIP,        // clip to a global L2 norm
    FLAG_CHECK = ADAMAX_FLAG_CHECK,      // skip the step on a non-finite gradient
    FLAG_SCALER = ADAMAX_FLAG_SCALER,    // dynamic loss scale (ScalerState)
};
enum {
    SKIP_NONFINITE = ADAMAX_SKIP_NONFINITE,        // a non-finite gradient (the overflow check)
    SKIP_COUNTER_FULL = ADAMAX_SKIP_COUNTER_FULL,  // the step counter is at u64::MAX
    SKIP_STALE_GRAPH = ADAMAX_SKIP_STALE_GRAPH,    // a launch whose by-value arguments are stale
};
// The axes of an update entry point, named as the Rust enums adamax_cuda::ParamMode and
// StateFormat: a 16-bit parameter with an f32 master, or rounded stochastically without
// one (bf16 only; the host refuses the others); moments in f32, or in 8-bit blocks.
enum class ParamMode { Master, Stochastic };
enum class StateFormat { F32, Blockwise8 };

// The optimizer's state that lives on the device, so that a step needs no host value
// and can be captured in a CUDA graph. The host writes ControlParams whole whenever a
// setting changes; the kernels own ScalerState and StepState (the host writes them only
// when it sets a scaler or restores a checkpoint, ordered on the optimizer's stream).
struct ControlParams {
    double lr;              // global learning rate
    double beta1;           // for the bias correction
    double growth_factor;   // loss scaler
    double backoff_factor;  // loss scaler
    float inv_scale;        // fixed inverse loss scale (no scaler); 1 when unset
    float max_norm;         // clipping threshold
    u32 growth_interval;    // loss scaler
    u32 flags;              // FLAG_*
    float min_scale;        // loss scaler: the floor a backoff stops at
    u32 generation;         // of the by-value AdamaxArgs; a launch with another is stale
};
struct ScalerState {
    float scale;            // the loss scale of the step in flight's gradients
    u32 growth_tracker;     // good steps since the last change
};
struct StepState {
    u64 step;               // steps taken; the update's last block counts the step
    float step_inv_scale;   // finalize: what this step's gradients are unscaled by
    float clip_coef;        // finalize: min(1, max_norm / (norm + 1e-6))
    float total_norm;       // finalize: global L2 norm of the unscaled gradients
    u32 found_inf;          // reduce: set on a non-finite gradient; finalize clears it
    u32 skipped;            // SKIP_* when the step in flight changes nothing, else 0
    u32 blocks_done;        // update: blocks finished; the last one resets it to 0
    u32 clipped;            // 1 when the last step computed total_norm and clip_coef
};
struct Control { ControlParams params; ScalerState scaler; StepState state; };

struct AdamaxArgs {
    const TensorDesc* tensors;
    u64 num_tensors;
    u64 num_chunks;         // sum over tensors of ceil(len / ADAMAX_CHUNK): the reduction
    u64 num_partials;       // chunks of the whole list (num_chunks but for a shard): finalize
    u64 num_units;          // sum over tensors of ceil(len / unit_len): the update
    u64 unit_len;           // elements per work unit, a power of two in [1024, ADAMAX_CHUNK]
    Control* control;
    float* partials;        // one f32 sum of squares per chunk (reduce -> finalize)
    u64* tensor_steps;      // each tensor's own step count (PyTorch's per-parameter step)
    u64 seed;               // the random stream's seed (ParamMode::Stochastic, Blockwise8)
    float beta1;
    float one_minus_beta1;  // f32(1 - beta1), from f64
    float beta2;
    float eps;
    u32 eps_mode;
    u32 decay_mode;         // DECAY_COUPLED or DECAY_DECOUPLED (per tensor: none when 0)
    u32 maximize;
    // NOTE: [stale launches] A captured CUDA graph replays these arguments as they were
    // at capture. Everything a setting changes is read from Control instead, except the
    // configuration above, which only a restore changes: the host then counts a new
    // generation in ControlParams, and a launch that carries an older one changes
    // nothing and says so (SKIP_STALE_GRAPH).
    u32 generation;
};

// Master-weight initialisation of one 16-bit tensor: master[i] = float(param[i]).
struct InitArgs {
    u64 param;   // const T*
    u64 master;  // float*
    u64 len;
};

// EDG's offsetof primitive: NVRTC has no <cstddef>, and __builtin_offsetof is not
// available there, but __INTADDR__ gives a constant expression.
#ifndef ADAMAX_HOST_EMULATION
#define ADAMAX_OFFSETOF(T, field) __INTADDR__(&((T*)0)->field)
#endif
ADAMAX_LAYOUT_CHECKS
static_assert(ADAMAX_BLOCK == 256, "the reduction order is specified for 256 threads");
static_assert(ADAMAX_CHUNK % 8 == 0, "chunks must start on a 16-byte boundary for every type");
static_assert(ADAMAX_QBLOCK == 32 * 8, "an 8-bit state block is one warp of 8 elements per lane");
static_assert(ADAMAX_Q8_THREADS % 32 == 0 && ADAMAX_Q8_THREADS <= ADAMAX_BLOCK, "the 8-bit updates run whole warps");

// The inverse loss scale of the step in flight, before finalize moves the scaler on:
// f32(1 / f64(scale)) with a scaler (torch.amp.GradScaler's arithmetic), else the
// fixed one. Reduce reads it directly; the update reads finalize's copy.
__device__ __forceinline__ float current_inv_scale(const Control& c) {
    if (c.params.flags & FLAG_SCALER) return __double2float_rn(__ddiv_rn(1.0, (double)c.scaler.scale));
    return c.params.inv_scale;
}

// beta^t by repeated squaring: the twin of spec::powi_exact (src/spec/mod.rs).
__device__ double powi_exact(double base, u64 exp) {
    double acc = 1.0, b = base;
    while (exp > 0) {
        if (exp & 1) acc = __dmul_rn(acc, b);
        b = __dmul_rn(b, b);
        exp >>= 1;
    }
    return acc;
}

// The f32 scalars of one tensor for one step: the twin of StepScalars::for_tensor in
// src/spec/mod.rs, with the same f64 operations and the same rounding to f32.
struct Scalars {
    float beta1, one_minus_beta1, beta2, eps, step_size, decay;
    u32 eps_mode, decay_mode;
    u32 grad_sign;  // the f32 sign bit when maximizing, else 0: see lane()
    float den_eps;  // what a denominator adds to u: eps with EPS_DENOMINATOR, else 0
    float inv_scale, clip_coef;  // gradient multipliers, applied when the flag is set
    u32 flags;
};

__device__ __forceinline__ Scalars tensor_scalars(const AdamaxArgs& a, const Control& c, const TensorDesc& t,
                                                  u64 tensor_step) {
    // 1 - beta1^t of this tensor's step t (the twin of spec::bias_correction).
    const double bias_correction = __dsub_rn(1.0, powi_exact(c.params.beta1, tensor_step + 1));
    Scalars s;
    s.beta1 = a.beta1;
    s.one_minus_beta1 = a.one_minus_beta1;
    s.beta2 = a.beta2;
    s.eps = a.eps;
    s.eps_mode = a.eps_mode;
    s.den_eps = a.eps_mode == EPS_DENOMINATOR ? a.eps : 0.0f;
    s.grad_sign = a.maximize ? 0x80000000u : 0u;
    s.flags = c.params.flags;
    s.inv_scale = c.state.step_inv_scale;
    s.clip_coef = c.state.clip_coef;
    const double lr = __dmul_rn(c.params.lr, t.lr_scale);
    s.step_size = __double2float_rn(__ddiv_rn(lr, bias_correction));
    if (t.weight_decay == 0.0) {
        s.decay_mode = DECAY_NONE;
        s.decay = 0.0f;
    } else if (a.decay_mode == DECAY_COUPLED) {
        s.decay_mode = DECAY_COUPLED;
        s.decay = __double2float_rn(t.weight_decay);
    } else {
        s.decay_mode = DECAY_DECOUPLED;
        s.decay = __double2float_rn(__dmul_rn(lr, t.weight_decay));
    }
    return s;
}

// A value held in a register where it is made: opaque to the compiler, which recomputed
// the 8-bit update's hash (nine instructions) after the warp maximum rather than keep it.
__device__ __forceinline__ void pin_register(u32& x) {
#ifndef ADAMAX_HOST_EMULATION
    asm volatile("" : "+r"(x));
#endif
}

// The scalars the rule multiplies by, moved to ordinary registers (a shuffle of lane 0's:
// the same value): read from the argument space, ptxas reloaded them into uniform
// registers for every element of the 8-bit update (sm_90).
__device__ __forceinline__ float held(float x) { return __shfl_sync(0xffffffffu, x, 0); }
__device__ __forceinline__ Scalars held(Scalars s) {
    s.beta1 = held(s.beta1);
    s.one_minus_beta1 = held(s.one_minus_beta1);
    s.beta2 = held(s.beta2);
    s.eps = held(s.eps);
    return s;
}

// ---- Conversions: exact widening, round-to-nearest-even narrowing ----
// On raw bits, so the vector path can pack lanes with shifts instead of addressing
// 16-bit fields (which made ptxas put them in local memory on sm_90).

__device__ __forceinline__ float widen(u16 bits, f16) {
#ifdef ADAMAX_HOST_EMULATION
    return host_f16_to_f32(bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
#endif
}
__device__ __forceinline__ float widen(u16 bits, bf16) { return __uint_as_float((u32)bits << 16); }

__device__ __forceinline__ u16 narrow(float x, f16) {
#ifdef ADAMAX_HOST_EMULATION
    return host_f32_to_f16(x);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#endif
}
// Integer rounding instead of cvt.rn.bf16.f32, which needs sm_80: correct on sm_75 too,
// and identical to the `half` crate's bf16::from_f32 (NaN kept quiet, RNE otherwise).
__device__ __forceinline__ u16 narrow(float x, bf16) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x0040u);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// ---- The rule (twin of `update` in src/spec/mod.rs) ----

// max that returns NaN when either side is NaN, like torch.maximum, with +0 above -0
// (equal values give their common bits: the AND of +0's and -0's is +0's). On sm_80 and
// later one max.NaN.f32, whose semantics are exactly these (PTX ISA: "+0.0 > -0.0");
// its NaN is the canonical 0x7fffffff, a payload the crate does not compare.
__device__ __forceinline__ float max_propagating_nan(float a, float b) {
#if !defined(ADAMAX_HOST_EMULATION) && __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    if (a != a || b != b) return __uint_as_float(0x7fc00000u);
    if (a == b) return __uint_as_float(__float_as_uint(a) & __float_as_uint(b));
    return a > b ? a : b;
#endif
}

// g comes negated when maximizing (lane(), load_grads(), grad_element()): the spec negates it after
// the unscale and clip products, whose results only change sign with it. D: the decay
// mode when the caller has branched on it (DECAY_ANY: read from a).
enum { DECAY_ANY = -1 };
template <int D = DECAY_ANY>
__device__ __forceinline__ float adamax_update(const Scalars& a, float& p, float g, float& m,
                                               float& u) {
    const u32 decay_mode = D == DECAY_ANY ? a.decay_mode : (u32)D;
    // Unscale, then clip (crate::fused): the gradient the rule sees.
    if (a.flags & FLAG_UNSCALE) g = __fmul_rn(g, a.inv_scale);
    if (a.flags & FLAG_CLIP) g = __fmul_rn(g, a.clip_coef);
    if (decay_mode == DECAY_COUPLED) g = __fmaf_rn(a.decay, p, g);
    m = __fmaf_rn(a.beta1, m, __fmul_rn(a.one_minus_beta1, g));
    const float decayed = __fmul_rn(a.beta2, u);
    float den;
    if (a.eps_mode == EPS_INSIDE_MAX) {
        u = max_propagating_nan(decayed, __fadd_rn(fabsf(g), a.eps));
        den = u;
    } else {
        u = max_propagating_nan(decayed, fabsf(g));
        den = __fadd_rn(u, a.eps);
    }
    // Divided in every case and then selected: a branch around the division cost the
    // 8-bit updates 5 instructions per parameter (sm_90). A 0 denominator (eps 0 and a
    // history of zero gradients) takes the division's slow path, out of the hot path.
    const float quotient = __fdiv_rn(m, den);
    const float step = den == 0.0f ? 0.0f : quotient;
    if (decay_mode == DECAY_DECOUPLED)
        p = __fsub_rn(p, __fmaf_rn(a.decay, p, __fmul_rn(a.step_size, step)));
    else
        p = __fmaf_rn(-a.step_size, step, p);
    return step;
}

// ---- Low-byte modes (twins in src/spec/lowbit/) ----

// splitmix64's and lowbias32's output functions, and the counter-based stream of (seed,
// step, tensor, element): twins of lowbit::mix64, mix32, stream_key and element_bits.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ u32 mix32(u32 x) {
    x = (x ^ (x >> 16)) * 0x21F0AAADu;
    x = (x ^ (x >> 15)) * 0x735A2D97u;
    return x ^ (x >> 15);
}
__device__ __forceinline__ u64 stream_key(u64 seed, u64 t, u64 tensor) {
    return mix64(mix64(seed ^ (t * 0xD1B54A32D192ED03ull)) ^ (tensor * 0xAEF17502108EF2D9ull));
}
#define ADAMAX_WEYL_A 0x9E3779B9u
#define ADAMAX_WEYL_HIGH 0x85EBCA6Bu
// The Weyl term at element i (the stream hashes it at each group's first element).
__device__ __forceinline__ u32 weyl_at(u64 key, u64 i) {
    return (u32)key + (u32)i * ADAMAX_WEYL_A + (u32)(i >> 32) * ADAMAX_WEYL_HIGH;
}
// The odd multiplier of element k of a group (lowbit::SPREAD): a switch, so that a
// constant k (the unrolled traversals) folds to an immediate.
__device__ __forceinline__ u32 spread(u32 k) {
    switch (k & 7u) {
        case 0: return 0x00000001u;
        case 1: return 0x8DBA9E15u;
        case 2: return 0xF70FCF31u;
        case 3: return 0x6CE69E19u;
        case 4: return 0x4CDE2F85u;
        case 5: return 0x91E36855u;
        case 6: return 0x5089190Fu;
        default: return 0x91E16095u;
    }
}
// Element i's word, from its group's hash h = mix32(weyl_at(key, i & ~7)).
__device__ __forceinline__ u32 element_word(u32 h, u64 i) { return h * spread((u32)i); }
// Element i's word in bits 32 to 63, and in bits 0 to 15 the high half of its pair
// partner's (lowbit::element_bits).
__device__ __forceinline__ u64 element_bits(u64 key, u64 i) {
    const u32 h = mix32(weyl_at(key, i & ~7ull));
    return ((u64)element_word(h, i) << 32) | (element_word(h, i ^ 1) >> 16);
}

// Stochastic rounding, for bf16 only: 16 random bits added below the kept half.
// The result is the high half of the word returned; a NaN's is what narrow() gives (made
// quiet, no bits added, so that nothing carries out of it).
__device__ __forceinline__ u32 round_stochastic_high(float x, u32 bits, bf16) {
    const u32 b = __float_as_uint(x), s = b + (bits & 0xffffu);
    return x != x ? b | 0x00400000u : s;
}
__device__ __forceinline__ u16 round_stochastic(float x, u32 bits, bf16) { return (u16)(round_stochastic_high(x, bits, bf16()) >> 16); }

// The 8-bit codes (lowbit::Code): E exponent and M mantissa bits of a magnitude q in
// [0, 1], stored as the float t = q + 2^F, F = 1 - 2^E, in [2^F, 1]: the code is the top
// bits of t's f32 pattern less OFFSET. m's ratio: sign, E4, M3; u: E4, M4 (F = -15 for
// both). Twins of Code::encode_magnitude and Code::decode_magnitude.
template <int E, int M>
struct Code {
    static constexpr int F = 1 - (1 << E);
    static constexpr u32 OFFSET = (u32)(127 + F) << M;
    static constexpr float FLOOR = (float)(1.0 / (1ull << -F));  // 2^F
    static constexpr float SPAN = (float)(1.0 - 1.0 / (1ull << -F));  // 1 - 2^F, rounded to nearest
};
typedef Code<4, 3> ExpAvgCode;
typedef Code<4, 4> ExpInfCode;

// (t - 2^F) / (1 - 2^F) in f64, rounded once: only to fill the tables below.
template <typename C, int M>
__device__ __forceinline__ float decode_magnitude(u32 code) {
    const float t = __uint_as_float((code + C::OFFSET) << (23 - M));
    return __double2float_rn(__ddiv_rn(__dsub_rn((double)t, (double)C::FLOOR), __dsub_rn(1.0, (double)C::FLOOR)));
}
// r * factor + x as one multiply-add (in PTX, so that the compiler does not turn it into
// a shift and an add: one instruction per code more).
__device__ __forceinline__ u32 add_shifted(u32 r, u32 factor, u32 x) {
#ifdef ADAMAX_HOST_EMULATION
    return r * factor + x;
#else
    u32 y;
    asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(y) : "r"(r), "r"(factor), "r"(x));
    return y;
#endif
}
// Encoding t (in [2^F, 1]) with 16 random bits r added at the top of the 23 - M bits of
// its pattern the code drops (Code::encode_magnitude), made so that the code comes out
// as the top byte of a word and four are packed by byte permutes: the pattern shifted
// left by M + 1 (the code's lowest bit, 23 - M, to bit 24) plus r << 8 (dither()), in
// one multiply-add. Its top byte is the code plus OFFSET, modulo 256: the code itself for
// u (OFFSET 7 * 256), the code with bit 7 set for m's ratio (OFFSET 3.5 * 256; t's
// exponent bit 4 is always set), where the sign then goes (encode_ratio_word).
template <int M>
__device__ __forceinline__ u32 encode_offset_word(float t, u32 r8) {
    return add_shifted(__float_as_uint(t), 1u << (M + 1), r8);
}
// 16 random bits of a word, the low half (HIGH false) or the high one, at bits 8 to 23.
template <bool HIGH>
__device__ __forceinline__ u32 dither(u32 word) { return __byte_perm(word, 0u, HIGH ? 0x4324u : 0x4104u); }

// Decoding goes through tables of every code's value (m's with its sign), which an
// 8-bit update fills once per block in shared memory: a load instead of building it.
struct CodeTables { float m[256], u[256]; };
__device__ __forceinline__ void fill_code_tables(CodeTables& t, u32 first, u32 stride) {
    for (u32 c = first; c < 256; c += stride) {
        const float v = decode_magnitude<ExpAvgCode, 3>(c & 0x7fu);
        t.m[c] = (c & 0x80u) ? -v : v;
        t.u[c] = decode_magnitude<ExpInfCode, 4>(c);
    }
}
// code < 256 (a byte of the state).
__device__ __forceinline__ float decode_exp_avg(const CodeTables& t, u32 code, float scale) { return __fmul_rn(t.m[code], scale); }
__device__ __forceinline__ float decode_exp_inf(const CodeTables& t, u32 code, float scale) { return __fmul_rn(t.u[code], scale); }
// A block's scale as its encoder uses it (twin of lowbit::BlockScale): the reciprocal
// times 1 - 2^F, both rounded up, so that the block's largest magnitude gives t = 1.
struct BlockScale { float inv; };
template <typename C>
__device__ __forceinline__ BlockScale block_scale_of(float scale) { return BlockScale{__fmul_ru(__frcp_ru(scale), C::SPAN)}; }
// t = min(|x| * inv + 2^F, 1) rounded once toward zero (BlockScale::offset_fraction):
// one FFMA.RZ.SAT (a NaN gives 0, whose codes the block's mask clears).
template <typename C>
__device__ __forceinline__ float offset_fraction(float x, const BlockScale& s) {
    return __saturatef(__fmaf_rz(fabsf(x), s.inv, C::FLOOR));
}
// The words whose top bytes are the codes (encode_offset_word): m's ratio with its f32
// sign bit in bit 31 (in place of t's exponent bit 4, always set), and u.
__device__ __forceinline__ u32 encode_ratio_word(float x, const BlockScale& s, u32 r8) {
    return encode_offset_word<3>(offset_fraction<ExpAvgCode>(x, s), r8) ^ (~__float_as_uint(x) & 0x80000000u);
}
__device__ __forceinline__ u32 encode_exp_inf_word(float x, const BlockScale& s, u32 r8) {
    return encode_offset_word<4>(offset_fraction<ExpInfCode>(x, s), r8);
}
// The codes alone, with 16 random bits r (the host emulation checks these against
// Code::encode_scaled for finite x: a NaN's code differs, and is masked in its block).
__device__ __forceinline__ u32 encode_ratio(float x, const BlockScale& s, u32 r) { return encode_ratio_word(x, s, r << 8) >> 24; }
__device__ __forceinline__ u32 encode_exp_inf(float x, const BlockScale& s, u32 r) { return encode_exp_inf_word(x, s, r << 8) >> 24; }
// The top bytes of four words, packed in order.
__device__ __forceinline__ u32 pack_top_bytes(const u32* w) {
    return __byte_perm(__byte_perm(w[0], w[1], 0x0073u), __byte_perm(w[2], w[3], 0x0073u), 0x5410u);
}
// A block's scale from the bits of its largest magnitude (twin of Code::block_scale): the
// bits of non-negative floats order as their values, and a NaN's above infinity's; 0
// and f32 subnormals give 0 (codes 0), a non-finite one marks the block NaN.
__device__ __forceinline__ float block_scale_bits(u32 absmax) {
    if (absmax < 0x00800000u) return 0.0f;
    return absmax <= 0x7f7fffffu ? __uint_as_float(absmax) : __uint_as_float(0x7fc00000u);
}
// A ratio block's scale lowered where its ratios times their denominators could pass
// f32's largest value: to the float below 2^(127 - e), den in [2^e, 2^(e + 1)) the
// block's largest denominator, from the exponent's bits (twin of
// lowbit::ratio_scale_limit; a NaN scale stays NaN).
__device__ __forceinline__ float limited_ratio_scale(const Scalars& sc, float scale, float scale_u) {
    // (+ 0 with eps inside the max: the same exponent; min(0x7f7fffff, K - e), written
    // as K - max(e, K - 0x7f7fffff) with K = (381 << 23) - 1 so that both constants are
    // immediates.)
    const float den = __fadd_rn(scale_u, sc.den_eps);
    const float limit = __uint_as_float(0xbe7fffffu - max(__float_as_uint(den) & 0x7f800000u, 0x3f000000u));
    return scale > limit ? limit : scale;
}
// The largest of a warp's values (REDUX on sm_80 and later, shuffles before).
__device__ __forceinline__ u32 warp_max_bits(u32 v) {
#if defined(ADAMAX_HOST_EMULATION) || __CUDA_ARCH__ >= 800
    return __reduce_max_sync(0xffffffffu, v);
#else
    for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
#endif
}

// ---- Memory traversal ----
// Loads of N values of storage T at element i, widened to f32, and f32 stores; the
// vector forms move 16 bytes at a time (see [alignment]). Gradients are read only
// through these, by the update (negated when maximizing: lane()'s sign, load_grads,
// grad_element) and the reduction alike.

// Half k & 1 of w widened, its sign bit flipped by `sign` (0, or the f32 sign bit). For
// bf16 the flip is free: the high half masked and flipped by one LOP3, the low half
// shifted and flipped by one multiply-add (adding the sign bit flips it).
__device__ __forceinline__ float signed_half(u32 w, int k, u32 sign, bf16) {
    return __uint_as_float((k & 1) ? (w & 0xffff0000u) ^ sign : (w << 16) + sign);
}
__device__ __forceinline__ float signed_half(u32 w, int k, u32 sign, f16) {
    return widen((u16)((w >> (16 * (k & 1))) ^ (sign >> 16)), f16());
}
// 16 bytes of storage T (16 / sizeof(T) values), and its lane k widened (sign: as above).
template <typename T>
__device__ __forceinline__ uint4 load16(u64 base, u64 i) { return *(const uint4*)((const T*)base + i); }
template <typename T>
__device__ __forceinline__ float lane(uint4 v, int k, u32 sign = 0u) {
    const int j = k * (int)sizeof(T) / 4;
    const u32 w = j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
    if constexpr (sizeof(T) == 4) return __uint_as_float(w ^ sign);
    else return signed_half(w, k, sign, T());
}
template <typename T, int N>
__device__ __forceinline__ void load_vector(u64 base, u64 i, float* x) {
#pragma unroll
    for (int k = 0; k < N; k += 16 / (int)sizeof(T)) {
        if constexpr (sizeof(T) == 4) {  // as float4: through lane() the reductions took more registers
            const float4 v = *(const float4*)((const float*)base + i + k);
            x[k] = v.x, x[k + 1] = v.y, x[k + 2] = v.z, x[k + 3] = v.w;
        } else {
            const uint4 v = load16<T>(base, i + k);
#pragma unroll
            for (int j = 0; j < 8; ++j) x[k + j] = lane<T>(v, j);
        }
    }
}
template <typename T>
__device__ __forceinline__ float load_element(u64 base, u64 i) {
    if constexpr (sizeof(T) == 4) return ((const float*)base)[i];
    else return widen(((const u16*)base)[i], T());
}
// Gradients as the rule takes them: widened, and negated when maximizing (sign: the f32
// sign bit then, else 0; see adamax_update).
template <typename T, int N>
__device__ __forceinline__ void load_grads(u64 base, u64 i, u32 sign, float* g) {
    if constexpr (sizeof(T) == 4) {
        load_vector<float, N>(base, i, g);
#pragma unroll
        for (int k = 0; k < N; ++k) g[k] = __uint_as_float(__float_as_uint(g[k]) ^ sign);
    } else {
#pragma unroll
        for (int k = 0; k < N; k += 8) {
            const uint4 v = load16<T>(base, i + k);
#pragma unroll
            for (int j = 0; j < 8; ++j) g[k + j] = lane<T>(v, j, sign);
        }
    }
}
template <typename T>
__device__ __forceinline__ float grad_element(u64 base, u64 i, u32 sign) {
    return __uint_as_float(__float_as_uint(load_element<T>(base, i)) ^ sign);
}
template <int N>
__device__ __forceinline__ void store_vector(u64 base, u64 i, const float* x) {
#pragma unroll
    for (int k = 0; k < N; k += 4) *(float4*)((float*)base + i + k) = make_float4(x[k], x[k + 1], x[k + 2], x[k + 3]);
}
__device__ __forceinline__ void store_element(u64 base, u64 i, float x) { ((float*)base)[i] = x; }

// Parameters as the rule reads and writes them: f32 ones are their own master; a 16-bit
// one is read from its master (ParamMode::Master) or widened from its storage
// (ParamMode::Stochastic), and written back rounded to nearest beside its master, or
// rounded stochastically with its element's 16 random bits h (lowbit::param_bits, in the
// low half of h: the high half of its pair partner's word).
template <ParamMode P>
__device__ __forceinline__ u32 param_bits(u64 key, const TensorDesc& t, u64 i) {
    // The piece's first element is read only where bits are drawn: taking it for every
    // mode cost the f32 update 5 instructions per parameter (sm_90), the loads held.
    if constexpr (P == ParamMode::Stochastic) return (u32)element_bits(key, t.element_base + i);
    else return 0;
}
// The same for the 8 elements of a group, from their words w (the vector traversals'
// groups start at multiples of 8 elements, and the pieces' element bases, multiples of
// ADAMAX_CHUNK, keep them whole).
template <ParamMode P, int N>
__device__ __forceinline__ void param_bits_vector(const u32* w, u32* h) {
    static_assert(P != ParamMode::Stochastic || N == 8, "a vector of random bits is one group of the stream");
#pragma unroll
    for (int k = 0; k < N; ++k) h[k] = P == ParamMode::Stochastic ? w[k ^ 1] >> 16 : 0u;
}
// The words of the 8 elements of a group from its hash.
__device__ __forceinline__ void group_words(u32 hash, u32* w) {
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = element_word(hash, k);
}
template <typename T, ParamMode P>
__device__ __forceinline__ u16 narrow_param(float p, u32 h) {
    if constexpr (P == ParamMode::Stochastic) return round_stochastic(p, h, T());
    else return narrow(p, T());
}
// Whether the update reads a parameter from its f32 master (a 16-bit one beside a master,
// whose 16-bit copy is then only written) rather than from its storage.
template <typename T, ParamMode P>
__host__ __device__ constexpr bool reads_master() { return sizeof(T) == 2 && P == ParamMode::Master; }
template <typename T, ParamMode P, int N>
__device__ __forceinline__ void load_params(const TensorDesc& t, u64 i, float* p) {
    if constexpr (reads_master<T, P>()) load_vector<float, N>(t.master, i, p);
    else load_vector<T, N>(t.param, i, p);
}
template <typename T, ParamMode P>
__device__ __forceinline__ float load_param(const TensorDesc& t, u64 i) {
    if constexpr (reads_master<T, P>()) return load_element<float>(t.master, i);
    else return load_element<T>(t.param, i);
}
#if !defined(ADAMAX_HOST_EMULATION) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ u32 narrow_pair(float lo, float hi, bf16) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 narrow_pair(float lo, float hi, f16) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif
// Two parameters narrowed and packed. Rounded to nearest on sm_80 and later, one
// cvt.rn.{bf16,f16}x2.f32 does both: the same bits as narrow() but for a NaN's payload
// (the canonical NaN; the crate's checks compare NaN as NaN).
template <typename T, ParamMode P>
__device__ __forceinline__ u32 narrow2(const float* p, const u32* h) {
#if !defined(ADAMAX_HOST_EMULATION) && __CUDA_ARCH__ >= 800
    if constexpr (P == ParamMode::Master) return narrow_pair(p[0], p[1], T());
#endif
    // Rounded stochastically: the high halves of the two sums, by one byte permute.
    if constexpr (P == ParamMode::Stochastic)
        return __byte_perm(round_stochastic_high(p[0], h[0], T()), round_stochastic_high(p[1], h[1], T()), 0x7632u);
    return (u32)narrow_param<T, P>(p[0], h[0]) | ((u32)narrow_param<T, P>(p[1], h[1]) << 16);
}
template <typename T, ParamMode P, int N>
__device__ __forceinline__ void store_params(const TensorDesc& t, u64 i, const float* p, const u32* h) {
    if constexpr (sizeof(T) == 4) {
        store_vector<N>(t.param, i, p);
    } else {
#pragma unroll
        for (int k = 0; k < N; k += 8)
            *(uint4*)((u16*)t.param + i + k) =
                make_uint4(narrow2<T, P>(p + k, h + k), narrow2<T, P>(p + k + 2, h + k + 2),
                           narrow2<T, P>(p + k + 4, h + k + 4), narrow2<T, P>(p + k + 6, h + k + 6));
        if constexpr (P == ParamMode::Master) store_vector<N>(t.master, i, p);
    }
}
template <typename T, ParamMode P>
__device__ __forceinline__ void store_param(const TensorDesc& t, u64 i, float p, u32 h) {
    if constexpr (sizeof(T) == 4) {
        store_element(t.param, i, p);
    } else {
        ((u16*)t.param)[i] = narrow_param<T, P>(p, h);
        if constexpr (P == ParamMode::Master) store_element(t.master, i, p);
    }
}

// Elements per vector step of the f32-state traversal: 16 bytes of the storage type
// (4 f32, 8 16-bit), so that each buffer moves in 16-byte accesses and f32 stays within
// its register budget (see [register budget]).
template <typename T>
struct Lanes { static constexpr int N = 16 / sizeof(T); };

// The rule on lanes k.. of a vector step, written out four at a time, each gradient
// widened where it is used: a loop here let NVVM unswitch the traversal's loop on the
// rule's modes, and widening them all first made ptxas spill 16-bit updates on NVRTC
// 12.x and 13.0.
template <typename T, int N, int k = 0>
__device__ __forceinline__ void update_lanes(const Scalars& sc, float* p, uint4 g, float* m, float* u) {
    adamax_update(sc, p[k], lane<T>(g, k, sc.grad_sign), m[k], u[k]);
    adamax_update(sc, p[k + 1], lane<T>(g, k + 1, sc.grad_sign), m[k + 1], u[k + 1]);
    adamax_update(sc, p[k + 2], lane<T>(g, k + 2, sc.grad_sign), m[k + 2], u[k + 2]);
    adamax_update(sc, p[k + 3], lane<T>(g, k + 3, sc.grad_sign), m[k + 3], u[k + 3]);
    if constexpr (k + 4 < N) update_lanes<T, N, k + 4>(sc, p, g, m, u);
}

// StateFormat::F32: Lanes<T>::N elements from i (vector path), or one element.
template <typename T, ParamMode P>
__device__ __forceinline__ void step_f32_vector(const Scalars& sc, const TensorDesc& t, u64 i, u64 key) {
    constexpr int N = Lanes<T>::N;
    float p[N], m[N], u[N];
    u32 h[N];
    load_params<T, P, N>(t, i, p);
    load_vector<float, N>(t.exp_avg, i, m);
    load_vector<float, N>(t.exp_inf, i, u);
    update_lanes<T, N>(sc, p, load16<T>(t.grad, i), m, u);
    // The piece's first element is read only where bits are drawn (see param_bits).
    u32 w[8];
    if constexpr (P == ParamMode::Stochastic) group_words(mix32(weyl_at(key, t.element_base + i)), w);
    param_bits_vector<P, N>(w, h);
    store_params<T, P, N>(t, i, p, h);
    store_vector<N>(t.exp_avg, i, m);
    store_vector<N>(t.exp_inf, i, u);
}
template <typename T, ParamMode P>
__device__ __forceinline__ void step_f32_element(const Scalars& sc, const TensorDesc& t, u64 i, u64 key) {
    float p = load_param<T, P>(t, i), m = load_element<float>(t.exp_avg, i), u = load_element<float>(t.exp_inf, i);
    adamax_update(sc, p, grad_element<T>(t.grad, i, sc.grad_sign), m, u);
    store_param<T, P>(t, i, p, param_bits<P>(key, t, i));
    store_element(t.exp_avg, i, m);
    store_element(t.exp_inf, i, u);
}

// The rule on one lane's 8 elements of a block, their codes decoded; decay mode D: the
// new ratios r and u, and the bits of their largest magnitudes (0 past `valid`).
template <bool WHOLE, int D>
__device__ __forceinline__ void q8_rule(const CodeTables& tables, const Scalars& sc, const u32* cm, const u32* cu,
                                        float sr, float su, u32 valid, float* p, const float* g, float* r,
                                        float* u, u32& amax_r, u32& amax_u) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        u[k] = decode_exp_inf(tables, cu[k], su);
        const float den = sc.eps_mode == EPS_INSIDE_MAX ? u[k] : __fadd_rn(u[k], sc.eps);
        float m = __fmul_rn(decode_exp_avg(tables, cm[k], sr), den);
        r[k] = adamax_update<D>(sc, p[k], g[k], m, u[k]);
        if (!WHOLE && (u32)k >= valid) r[k] = u[k] = 0.0f;
        // |r| by max.NaN (one instruction with its operand's abs; a NaN's bits are above
        // infinity's either way), u by the integer max of its bits (u >= +0 or NaN).
        amax_r = __float_as_uint(max_propagating_nan(__uint_as_float(amax_r), fabsf(r[k])));
        amax_u = max(amax_u, __float_as_uint(u[k]));
    }
}

// One lane's 8 elements of a block, before the block's new scales are known: load,
// decode, update, store the parameters; the lane's new ratios and u, and the bits of
// their largest magnitudes. A lane at the end or an odd offset loads element by
// element, zeros past the end.
template <typename T, ParamMode P, bool WHOLE>
__device__ __forceinline__ void q8_update(const CodeTables& tables, const Scalars& sc,
                                          const TensorDesc& t, u32 i0, u32 end, const u32* w, float sr,
                                          float su, float* r, float* u, u32& amax_r, u32& amax_u) {
    const unsigned char *codes_m = (const unsigned char*)t.exp_avg, *codes_u = (const unsigned char*)t.exp_inf;
    float p[8], g[8];
    u32 cm[8], cu[8];
    if constexpr (WHOLE) {
        load_grads<T, 8>(t.grad, i0, sc.grad_sign, g);
        load_params<T, P, 8>(t, i0, p);
        const uint2 a = *(const uint2*)(codes_m + i0), b = *(const uint2*)(codes_u + i0);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            cm[k] = __byte_perm(k < 4 ? a.x : a.y, 0u, 0x4440u + (k & 3));
            cu[k] = __byte_perm(k < 4 ? b.x : b.y, 0u, 0x4440u + (k & 3));
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const bool in = i0 + k < end;
            g[k] = in ? grad_element<T>(t.grad, i0 + k, sc.grad_sign) : 0.0f;
            p[k] = in ? load_param<T, P>(t, i0 + k) : 0.0f;
            cm[k] = in ? codes_m[i0 + k] : 0u;
            cu[k] = in ? codes_u[i0 + k] : 0u;
        }
    }
    const u32 valid = WHOLE ? 8 : (end > i0 ? end - i0 : 0);
    u32 h[8];
    param_bits_vector<P, 8>(w, h);
    // The rule, its decay mode branched on once (uniform across the warp) rather than
    // predicated per element: both sides of each decay test took issue slots.
    if (sc.decay_mode == DECAY_NONE)
        q8_rule<WHOLE, DECAY_NONE>(tables, sc, cm, cu, sr, su, valid, p, g, r, u, amax_r, amax_u);
    else if (sc.decay_mode == DECAY_COUPLED)
        q8_rule<WHOLE, DECAY_COUPLED>(tables, sc, cm, cu, sr, su, valid, p, g, r, u, amax_r, amax_u);
    else
        q8_rule<WHOLE, DECAY_DECOUPLED>(tables, sc, cm, cu, sr, su, valid, p, g, r, u, amax_r, amax_u);
    if constexpr (WHOLE) {
        store_params<T, P, 8>(t, i0, p, h);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (i0 + k < end) store_param<T, P>(t, i0 + k, p[k], h[k]);
    }
}

// The lane's codes once the block's new scales nsr, nsu are known: encoded against their
// reciprocals and stored, packed as they are made.
template <bool WHOLE>
__device__ __forceinline__ void q8_store(const TensorDesc& t, u32 i0, u32 end, float nsr, float nsu,
                                         const float* r, const float* u, const u32* w) {
    unsigned char *codes_m = (unsigned char*)t.exp_avg, *codes_u = (unsigned char*)t.exp_inf;
    u32 cm[8], cu[8];  // code words; w: each element's word, its moments' bits
    // A block of scale 0 (all zero) or NaN stores codes 0: encoded against scale 1 (no
    // slow path in the reciprocal), then masked; no branch, no zeros to set.
    const u32 keep_u = nsu > 0.0f ? ~0u : 0u, keep_r = nsr > 0.0f ? ~0u : 0u;
    const BlockScale bu = block_scale_of<ExpInfCode>(keep_u ? nsu : 1.0f);
    const BlockScale br = block_scale_of<ExpAvgCode>(keep_r ? nsr : 1.0f);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        cu[k] = encode_exp_inf_word(u[k], bu, dither<true>(w[k]));
        cm[k] = encode_ratio_word(r[k], br, dither<false>(w[k]));
    }
    if constexpr (WHOLE) {
        *(uint2*)(codes_m + i0) = make_uint2(pack_top_bytes(cm) & keep_r, pack_top_bytes(cm + 4) & keep_r);
        *(uint2*)(codes_u + i0) = make_uint2(pack_top_bytes(cu) & keep_u, pack_top_bytes(cu + 4) & keep_u);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if (i0 + k < end) {
                codes_m[i0 + k] = (unsigned char)((cm[k] & keep_r) >> 24);
                codes_u[i0 + k] = (unsigned char)((cu[k] & keep_u) >> 24);
            }
        }
    }
}

// StateFormat::Blockwise8. NOTE: [8-bit blocks] One warp steps one block of
// ADAMAX_QBLOCK elements, 8 per lane: decode, update in f32 (the parameter moves by the
// f32 values), a warp-wide largest magnitude of the new ratios and u (the block's new
// scales), then encode. Every lane of the warp takes part in the reductions (outside the
// lanes' paths), also those past the tensor's end. Twin of cpu::step_tensor_with's blocks.
template <typename T, ParamMode P>
__device__ void step_q8_block(const CodeTables& tables, const Scalars& sc, const TensorDesc& t, u32 block,
                              u32 unit_weyl, bool aligned) {
    const u32 begin = block * (u32)ADAMAX_QBLOCK, i0 = begin + (threadIdx.x & 31) * 8;
    const u32 end = min(begin + (u32)ADAMAX_QBLOCK, (u32)t.len);
    const bool whole = aligned && i0 + 8 <= end;
    float *scale_m = (float*)t.exp_avg_scale, *scale_u = (float*)t.exp_inf_scale;
    float r[8], u[8];
    u32 amax_r = 0u, amax_u = 0u;
    const float sr = scale_m[block], su = scale_u[block];
    // The hash of the lane's group (its 8 elements), from the Weyl term of its first
    // element (a unit never crosses a multiple of 2^32 elements, so its high part is the
    // unit's), and the elements' words from it. Stochastic rounding takes the words before
    // the warp maximum and the moments after it: they are then made once and held (a
    // product each); otherwise only the hash is held, and the words made where used.
    u32 hash = mix32(unit_weyl + i0 * ADAMAX_WEYL_A), w[8];
    pin_register(hash);
    group_words(hash, w);
    if constexpr (P == ParamMode::Stochastic) {
#pragma unroll
        for (int k = 0; k < 8; ++k) pin_register(w[k]);
    }
    if (whole) q8_update<T, P, true>(tables, sc, t, i0, end, w, sr, su, r, u, amax_r, amax_u);
    else q8_update<T, P, false>(tables, sc, t, i0, end, w, sr, su, r, u, amax_r, amax_u);
    const float nsu = block_scale_bits(warp_max_bits(amax_u));
    const float nsr = limited_ratio_scale(sc, block_scale_bits(warp_max_bits(amax_r)), nsu);
    if (whole) q8_store<true>(t, i0, end, nsr, nsu, r, u, w);
    else q8_store<false>(t, i0, end, nsr, nsu, r, u, w);
    if ((threadIdx.x & 31) == 0) scale_m[block] = nsr, scale_u[block] = nsu;
}

// NOTE: [prefetch] Before a warp steps an 8-bit block it asks L2 for the bytes its next
// block reads, each lane for its own 8 elements: what it reads the parameter from
// (reads_master), the gradient, and,
// from every fourth lane (32 bytes of codes), both moments' codes. The 8-bit updates
// held 16 warps per multiprocessor (2 blocks of 256 threads, their registers), too few
// loads in flight for the memory system (Nsight Compute on an H200: issue slots 40-46%
// busy, DRAM 28-42%); the hints put a block's worth more in flight at no register cost,
// and stepped f32_q8 and bf16_sr_q8 7-8% faster there (BENCHMARKS.md). A prefetch changes
// no value. Asking a whole work unit ahead instead was slower in every mode (its lines
// were evicted before use).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifndef ADAMAX_HOST_EMULATION
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}
template <typename T, ParamMode P>
__device__ __forceinline__ void prefetch_q8_block(const TensorDesc& t, u32 block) {
    const u32 lane = threadIdx.x & 31, j = block * (u32)ADAMAX_QBLOCK + lane * 8;
    if (j >= (u32)t.len) return;  // a unit's length is 32-bit (step_q8_unit)
    if constexpr (reads_master<T, P>()) prefetch_l2((const float*)t.master + j);
    else prefetch_l2((const T*)t.param + j);
    prefetch_l2((const T*)t.grad + j);
    if ((lane & 3) == 0) {
        prefetch_l2((const unsigned char*)t.exp_avg + j);
        prefetch_l2((const unsigned char*)t.exp_inf + j);
    }
}

// The two traversals of a work unit [begin, end) of one tensor, by its state format.
// Units of 8-bit tensors are whole blocks (unit_len is a multiple of ADAMAX_QBLOCK). The
// 8-bit one sees the unit as a tensor of its own (its buffers and element base moved to
// the unit's start), so that indices within it are 32-bit.
template <typename T, ParamMode P>
__device__ __forceinline__ void step_q8_unit(const CodeTables& tables, const Scalars& sc, const TensorDesc& t,
                                             u64 begin, u64 end, u64 key, bool aligned) {
    TensorDesc v = t;
    v.param = t.param + begin * sizeof(T);
    v.grad = t.grad + begin * sizeof(T);
    v.master = t.master + begin * sizeof(float);
    v.exp_avg = t.exp_avg + begin;
    v.exp_inf = t.exp_inf + begin;
    v.exp_avg_scale = t.exp_avg_scale + begin / ADAMAX_QBLOCK * sizeof(float);
    v.exp_inf_scale = t.exp_inf_scale + begin / ADAMAX_QBLOCK * sizeof(float);
    v.element_base = t.element_base + begin;
    v.len = end - begin;
    const u32 warps = blockDim.x / 32;
    const u32 blocks = ((u32)v.len + ADAMAX_QBLOCK - 1) / ADAMAX_QBLOCK;
    // The stream's Weyl term at the unit's first element, held rather than the key: with
    // the key, ptxas recomputed its last mix64 on every block (sm_90).
    const u32 unit_weyl = weyl_at(key, v.element_base);
    for (u32 b = threadIdx.x / 32; b < blocks; b += warps) {
        if (b + warps < blocks) prefetch_q8_block<T, P>(v, b + warps);
        step_q8_block<T, P>(tables, sc, v, b, unit_weyl, aligned);
    }
}
template <typename T, ParamMode P>
__device__ __forceinline__ void step_f32_unit(const Scalars& sc, const TensorDesc& t, u64 begin, u64 end, u64 key,
                                              bool aligned) {
    constexpr u64 N = Lanes<T>::N;
    u64 element_from = begin;
    if (aligned) {
        const u64 vec_end = begin + (end - begin) / N * N;
        for (u64 i = begin + threadIdx.x * N; i < vec_end; i += (u64)blockDim.x * N) step_f32_vector<T, P>(sc, t, i, key);
        element_from = vec_end;
    }
    for (u64 i = element_from + threadIdx.x; i < end; i += blockDim.x) step_f32_element<T, P>(sc, t, i, key);
}

// NOTE: [alignment] A vector path runs only where every buffer it reads or writes starts
// 16 bytes aligned. Vector accesses then stay aligned: units and reduction chunks start
// at multiples of 8 elements (16 bytes of 16-bit values, 32 of f32), and 8-bit blocks'
// code accesses are 8 bytes at multiples of 8. Anything else (a caller's view at an odd
// element offset) takes the element path.
__device__ __forceinline__ bool aligned16(u64 addresses) { return (addresses & 15) == 0; }

// Index of the tensor that owns global chunk (or unit) `index`: the last one whose first
// chunk (unit), given by `begin`, is <= index (empty tensors share their successor's
// begin and are never chosen).
template <typename Begin>
__device__ __forceinline__ u64 find_tensor(const AdamaxArgs& a, u64 index, Begin begin) {
    u64 lo = 0, hi = a.num_tensors - 1;
    while (lo < hi) {
        const u64 mid = (lo + hi + 1) / 2;
        if (begin(a.tensors[mid]) <= index) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}
__device__ __forceinline__ u64 chunk_begin(const TensorDesc& t) { return t.chunk_begin; }
__device__ __forceinline__ u64 unit_begin(const TensorDesc& t) { return t.unit_begin; }

// NOTE: [one launch per common step] The update counts the step itself, so a step
// without clipping or the overflow check is this one launch. Every block reads the
// counters (the optimizer's, and each tensor's own, from which the tensor's bias
// correction comes) before it counts itself as done; the last block to finish then
// writes the new counts: the optimizer's step + 1, and + 1 for every tensor that had a
// gradient. It knows it is last only after every block has counted itself, so no
// block sees a new value. With clipping or the check, finalize has decided before
// this launch whether the step happens (StepState::skipped); without them, a counter
// at u64::MAX is found here.
//
// NOTE: [captured steps] An eager step enqueues the reduction and finalize only when
// the flags need them. A step captured in a CUDA graph always carries both, so that
// clipping, the overflow check or a loss scaler turned on after capture work on
// replay: the flags are read from Control when the kernels run, and without them the
// two passes return at once and the update decides alone, as in an eager step.
//
// Blocks walk the work units of all tensors with a grid stride: a unit never spans two
// tensors, units start at multiples of unit_len (a multiple of 8), the unit index is
// 32-bit (see below) and element indices 64-bit. The grid is sized from this kernel's
// own occupancy.
template <typename T, ParamMode P, StateFormat S>
__device__ void adamax_step(const AdamaxArgs& a) {
    static_assert(P == ParamMode::Master || sizeof(T) == 2, "stochastic rounding is for 16-bit parameters");
    Control& c = *a.control;
    StepState& st = c.state;
    if (a.generation != c.params.generation) {
        if (blockIdx.x == 0 && threadIdx.x == 0) st.skipped = SKIP_STALE_GRAPH;
        return;  // see [stale launches]: nothing changes, and the step is not counted
    }
    const bool decided = (c.params.flags & (FLAG_CHECK | FLAG_CLIP)) != 0;
    if (decided ? st.skipped != 0 : st.step == ~0ull) {
        if (!decided && blockIdx.x == 0 && threadIdx.x == 0) st.skipped = SKIP_COUNTER_FULL;
        return;  // nothing changes, and the step is not counted
    }
    __shared__ CodeTables tables;  // 8-bit state only (compiled away otherwise)
    __shared__ Control* shared_control;  // see [control in shared memory]
    if constexpr (S == StateFormat::Blockwise8) {
        if (threadIdx.x == 0) shared_control = a.control;
        fill_code_tables(tables, threadIdx.x, blockDim.x);
        __syncthreads();
    }
    // NOTE: [control in shared memory] The 8-bit updates read the control block through
    // a pointer in shared memory, loaded where used (once per unit, and at the end):
    // ptxas held &control->state in registers across the unit loop (not rematerialised
    // from the argument), and it was among what spilled under the 8-bit updates'
    // register budget (see [register budget]).
    const auto control = [&]() -> Control& {
        if constexpr (S == StateFormat::Blockwise8) return **(Control* volatile*)&shared_control;
        else return *a.control;
    };
    // The unit index is 32-bit: StateLayout::new refuses a list of 2^31 units or more
    // (TooLarge), so adding the grid never wraps it; a 64-bit one held a register more,
    // which spilled in the 8-bit updates.
    for (u32 unit = blockIdx.x; unit < (u32)a.num_units; unit += gridDim.x) {
        const u64 k = find_tensor(a, unit, unit_begin);
        const TensorDesc t = a.tensors[k];
        if (!t.has_grad) continue;  // no gradient this step: the tensor is not touched
        const u64 tensor_step = a.tensor_steps[k];
        const Scalars sc = tensor_scalars(a, control(), t, tensor_step);
        const u64 begin = (unit - t.unit_begin) * a.unit_len;
        const u64 end = min(begin + a.unit_len, t.len);
        const bool aligned = aligned16(t.param | t.grad | t.exp_avg | t.exp_inf | t.master);
        // The random stream of this tensor in its step (lowbit::stream_key); unused (and
        // compiled away) with a master and f32 moments.
        const u64 key = stream_key(a.seed, tensor_step + 1, t.stream_tensor);
        // NOTE: [per-tensor state] An optimizer with 8-bit state keeps small (or chosen)
        // tensors in f32 state (Precision::min_8bit_len): its update steps both kinds in
        // this one launch, choosing the traversal per unit (a unit is one tensor's), so
        // the branch is uniform across the block. An optimizer whose tensors are all in
        // f32 state launches the f32-state update instead.
        if constexpr (S == StateFormat::Blockwise8) {
            if (t.blockwise8) step_q8_unit<T, P>(tables, held(sc), t, begin, end, key, aligned);
            else step_f32_unit<T, P>(sc, t, begin, end, key, aligned);
        } else {
            step_f32_unit<T, P>(sc, t, begin, end, key, aligned);
        }
    }
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&control().state.blocks_done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    for (u64 k = threadIdx.x; k < a.num_tensors; k += blockDim.x)
        if (a.tensors[k].has_grad) a.tensor_steps[k] += 1;
    if (threadIdx.x == 0) {
        Control& done = control();
        done.state.blocks_done = 0;
        done.state.skipped = 0;
        // Else finalize has said; the flags (fixed during a launch) re-read, not held.
        if (!(*(volatile u32*)&done.params.flags & (FLAG_CHECK | FLAG_CLIP))) done.state.clipped = 0;
        done.state.step = *(volatile u64*)&done.state.step + 1;  // re-read, not held: registers (sm_100)
    }
}

// ---- Reduction: non-finite check and sum of squares (crate::fused gives the order) ----

__device__ __forceinline__ float unscaled(float g, u32 flags, float inv_scale) {
    return (flags & FLAG_UNSCALE) ? __fmul_rn(g, inv_scale) : g;
}
// The xor butterfly of a warp: every lane ends with the same sum; lane 0's is used.
template <typename F>
__device__ __forceinline__ F warp_sum(F v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Per chunk: thread t accumulates fma(u, u, acc) over elements (j*256 + t)*N + k, then
// warp butterflies, then warp sums in order by thread 0: partials[chunk]. Any non-finite
// unscaled gradient sets control->found_inf.
template <typename T>
__device__ void adamax_reduce(const AdamaxArgs& a) {
    constexpr u64 N = Lanes<T>::N;
    __shared__ float warp_sums[ADAMAX_BLOCK / 32];
    const u32 flags = a.control->params.flags;
    // Enqueued in every captured step (see [captured steps]): without the flags that
    // need it, or in a stale launch, it has nothing to do.
    if (!(flags & (FLAG_CHECK | FLAG_CLIP)) || a.generation != a.control->params.generation) return;
    const float inv_scale = current_inv_scale(*a.control);
    for (u64 chunk = blockIdx.x; chunk < a.num_chunks; chunk += gridDim.x) {
        const TensorDesc t = a.tensors[find_tensor(a, chunk, chunk_begin)];
        const u64 begin = (chunk - t.chunk_begin) * (u64)ADAMAX_CHUNK;
        // A tensor without a gradient adds a zero partial (its chunks keep their numbers).
        const u64 end = t.has_grad ? min(begin + (u64)ADAMAX_CHUNK, t.len) : begin;
        const bool aligned = aligned16(t.grad);
        float acc = 0.0f;
        bool bad = false;
        // One 16-byte load per thread and round where the gradient is aligned (see
        // [alignment]) and the round is whole; element by element otherwise. Either way
        // the values enter the sum in the order crate::fused specifies (k = 0..N within a
        // thread's group).
        for (u64 base = begin + threadIdx.x * N; base < end; base += (u64)blockDim.x * N) {
            float g[N];
            if (aligned && base + N <= end) {
                load_vector<T, N>(t.grad, base, g);
            } else {
#pragma unroll
                for (u64 k = 0; k < N; ++k) g[k] = base + k < end ? load_element<T>(t.grad, base + k) : 0.0f;
            }
#pragma unroll
            for (u64 k = 0; k < N; ++k) {
                if (base + k < end) {
                    const float v = unscaled(g[k], flags, inv_scale);
                    bad |= !(fabsf(v) <= 3.402823466e38f);
                    acc = __fmaf_rn(v, v, acc);
                }
            }
        }
        if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(&a.control->state.found_inf, 1u);
        acc = warp_sum(acc);
        if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            float s = warp_sums[0];
            for (int w = 1; w < ADAMAX_BLOCK / 32; ++w) s = __fadd_rn(s, warp_sums[w]);
            a.partials[t.partial_begin + (chunk - t.chunk_begin)] = s;
        }
        __syncthreads();
    }
}

// One block, only with clipping or the overflow check: decides whether the step
// happens, the clip coefficient and the loss scale, on the device, before the update.
// Twin of the decision part of CpuAdamax::step.
__device__ void adamax_finalize(const AdamaxArgs& a) {
    __shared__ double warp_totals[ADAMAX_BLOCK / 32];
    Control& c = *a.control;
    const ControlParams& p = c.params;
    StepState& st = c.state;
    // Enqueued in every captured step (see [captured steps]): without clipping or the
    // check the update decides alone; a stale launch changes nothing but says so.
    if (!(p.flags & (FLAG_CHECK | FLAG_CLIP))) return;
    if (a.generation != p.generation) {
        if (threadIdx.x == 0) {
            st.skipped = SKIP_STALE_GRAPH;
            st.found_inf = 0;
        }
        return;
    }
    const bool nonfinite = (p.flags & FLAG_CHECK) && st.found_inf;
    // Every thread has read found_inf before thread 0 clears it below: without this a
    // warp that reads late sees 0, takes the clipping branch alone and waits at its
    // barrier for threads that never come (found by tests/kernel_host.rs, whose host
    // threads interleave freely).
    __syncthreads();
    if ((p.flags & FLAG_CLIP) && !nonfinite) {
        double acc = 0.0;
        for (u64 k = threadIdx.x; k < a.num_partials; k += blockDim.x) acc = __dadd_rn(acc, (double)a.partials[k]);
        acc = warp_sum(acc);
        if ((threadIdx.x & 31) == 0) warp_totals[threadIdx.x / 32] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            double total = warp_totals[0];
            for (int w = 1; w < ADAMAX_BLOCK / 32; ++w) total = __dadd_rn(total, warp_totals[w]);
            const double norm = __dsqrt_rn(total);
            double coef = __ddiv_rn((double)p.max_norm, __dadd_rn(norm, 1e-6));
            if (coef > 1.0) coef = 1.0;
            st.total_norm = __double2float_rn(norm);
            st.clip_coef = __double2float_rn(coef);
        }
    }
    if (threadIdx.x != 0) return;
    // The update unscales by the scale these gradients were made with: captured here,
    // before the scaler below moves on to the next step's scale.
    st.step_inv_scale = current_inv_scale(c);
    st.found_inf = 0;
    st.clipped = 0;
    if (nonfinite) {
        st.skipped = SKIP_NONFINITE;
    } else if (st.step == ~0ull) {
        // The host refuses an eager step here; a replayed graph lands here instead and
        // changes nothing (the scaler too stays as it is).
        st.skipped = SKIP_COUNTER_FULL;
        return;
    } else {
        st.skipped = 0;  // the update counts the step
        st.clipped = (p.flags & FLAG_CLIP) ? 1u : 0u;
    }
    if (p.flags & FLAG_SCALER) {
        // torch.amp.GradScaler's update: products in f64, rounded to f32.
        ScalerState& sc = c.scaler;
        if (nonfinite) {
            // Twin of LossScaler::update: never below the floor.
            const float backed_off = __double2float_rn(__dmul_rn((double)sc.scale, p.backoff_factor));
            sc.scale = backed_off < p.min_scale ? p.min_scale : backed_off;
            sc.growth_tracker = 0;
        } else if (sc.growth_tracker >= p.growth_interval - 1) {  // twin of LossScaler::update
            const float grown = __double2float_rn(__dmul_rn((double)sc.scale, p.growth_factor));
            if (fabsf(grown) <= 3.402823466e38f) sc.scale = grown;
            sc.growth_tracker = 0;
        } else {
            sc.growth_tracker += 1;
        }
    }
}

template <typename T>
__device__ void init_master(const InitArgs& a) {
    const T* param = (const T*)a.param;
    float* master = (float*)a.master;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.len; i += (u64)gridDim.x * blockDim.x)
        master[i] = load_element<T>((u64)param, i);
}

// ---- Entry points ----
// NOTE: the list of entry points (their names and storage types) comes from
// src/cuda/entry.rs as ADAMAX_ENTRY_POINTS, e.g. ADAMAX_STEP(adamax_step_bf16_sr_q8,
// bf16, ParamMode::Stochastic, StateFormat::Blockwise8): this file says what each kind
// does, Rust names them, and the loader looks up the same names.

// NOTE: [register budget] Each update is compiled for the blocks per multiprocessor it
// should reach (65,536 registers / (threads x blocks), allocated in steps of 8).
// f32-state updates run blocks of 256 threads (40 registers a thread for 6 blocks, 48
// for 5): f32 6, the other f32-state modes 5 (the bf16-with-master update took 50
// registers, and so 4 blocks, without it); on sm_100 the 16-bit ones get 4: NVRTC 12.x
// and 13.0 spill the f16 update there at 48 registers. The 8-bit updates run blocks of
// ADAMAX_Q8_THREADS = 128 threads (one warp a block of state, 4 per block of threads),
// 5 of them (96 registers, 20 warps a multiprocessor): as blocks of 256 they could hold
// 2 (117-125 registers, 16 warps) and spilled at 3 (80 registers), and the H200 showed
// them waiting on memory with too few warps to cover it (BENCHMARKS.md, issue #19). On
// sm_100 they get 4 (128 registers, the 16 warps of before): NVRTC 13.x spills them
// there at 96. Checked, with no spills, by tests/nvrtc_compile.rs. (sm_75 holds at most
// 1,024 threads; the bound is moot there for blocks of 256.)
template <StateFormat S>
__host__ __device__ constexpr int step_threads() {
    return S == StateFormat::Blockwise8 ? ADAMAX_Q8_THREADS : ADAMAX_BLOCK;
}
template <typename T, StateFormat S>
__host__ __device__ constexpr int step_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
    constexpr int sixteen_bit = 4, eight_bit = 4;
#else
    constexpr int sixteen_bit = 5, eight_bit = 5;
#endif
    return S == StateFormat::Blockwise8 ? eight_bit : (sizeof(T) == 4 ? 6 : sixteen_bit);
}
#define ADAMAX_STEP(name, T, P, S) \
    extern "C" __global__ void __launch_bounds__(step_threads<S>(), (step_blocks<T, S>())) name(const AdamaxArgs args) { adamax_step<T, P, S>(args); }
#define ADAMAX_REDUCE(name, T) \
    extern "C" __global__ void __launch_bounds__(ADAMAX_BLOCK) name(const AdamaxArgs args) { adamax_reduce<T>(args); }
#define ADAMAX_FINALIZE(name) \
    extern "C" __global__ void __launch_bounds__(ADAMAX_BLOCK) name(const AdamaxArgs args) { adamax_finalize(args); }
#define ADAMAX_INIT_MASTER(name, T) \
    extern "C" __global__ void __launch_bounds__(ADAMAX_BLOCK) name(const InitArgs args) { init_master<T>(args); }

ADAMAX_ENTRY_POINTS
