// The host harness of tests/kernel_host.rs: kernels/adamax.cu, compiled unchanged for
// the host, driven by commands on stdin. The first word picks the check:
//   helpers    one command per line (mix, key, bits, sr, eavg, einf, davg, dinf, limit,
//              scale),
//              one result per line: the low-byte helpers.
//   traversal  cases of one tensor each, stepped by a state format's traversal: the
//              parameters, master and moments (f32 bits, or codes and scale bits).
//   whole      one run of several steps over a list of tensors through the entry
//              points, block by block: every tensor's state and step count, then the
//              optimizer's step, loss scale, growth tracker and skip reason.
// Storage types are numbered 0 f32, 1 bf16, 2 f16; modes are bits: 1 ParamMode::Stochastic,
// 2 StateFormat::Blockwise8.
#include "host.hpp"
#include "adamax.cu"  // the kernel itself, written beside this file by tests/kernel_host.rs

static u64 next() {
    u64 v;
    std::cin >> v;
    return v;
}
static double next_f64() {
    const u64 b = next();
    double d;
    std::memcpy(&d, &b, 8);
    return d;
}

// The code tables an 8-bit update fills per block, filled once here.
static const CodeTables& tables() {
    static CodeTables t;
    static const bool filled = (fill_code_tables(t, 0, 1), true);
    (void)filled;
    return t;
}

static int helpers() {
    std::string op;
    while (std::cin >> op) {
        u64 a, b, c;
        if (op == "mix") { std::cin >> a; std::printf("%llu\n", mix64(a)); }
        else if (op == "key") { std::cin >> a >> b >> c; std::printf("%llu\n", stream_key(a, b, c)); }
        else if (op == "bits") { std::cin >> a >> b; std::printf("%llu\n", element_bits(a, b)); }
        else if (op == "sr") { std::cin >> a >> b; std::printf("%u\n", (u32)round_stochastic(__uint_as_float((u32)a), b, bf16())); }
        else if (op == "eavg") { std::cin >> a >> b >> c; std::printf("%u\n", encode_ratio(__uint_as_float((u32)a), block_scale_of<ExpAvgCode>(__uint_as_float((u32)b)), (u32)c)); }
        else if (op == "einf") { std::cin >> a >> b >> c; std::printf("%u\n", encode_exp_inf(__uint_as_float((u32)a), block_scale_of<ExpInfCode>(__uint_as_float((u32)b)), (u32)c)); }
        else if (op == "davg") { std::cin >> a >> b; std::printf("%u\n", __float_as_uint(decode_exp_avg(tables(), (u32)a, __uint_as_float((u32)b)))); }
        else if (op == "dinf") { std::cin >> a >> b; std::printf("%u\n", __float_as_uint(decode_exp_inf(tables(), (u32)a, __uint_as_float((u32)b)))); }
        else if (op == "limit") {
            std::cin >> a >> b >> c;
            Scalars sc{};
            sc.eps = __uint_as_float((u32)c);
            sc.eps_mode = (c >> 32) ? EPS_DENOMINATOR : EPS_INSIDE_MAX;
            sc.den_eps = (c >> 32) ? sc.eps : 0.0f;
            std::printf("%u\n", __float_as_uint(limited_ratio_scale(sc, __uint_as_float((u32)a), __uint_as_float((u32)b))));
        }
        else if (op == "scale") { std::cin >> a; std::printf("%u\n", __float_as_uint(block_scale_bits((u32)a))); }
        else { std::printf("unknown %s\n", op.c_str()); return 1; }
    }
    return 0;
}

// One tensor through its state format's traversal, as adamax_step walks a unit: 8-bit
// blocks on a warp each; with f32 moments the vector steps where `aligned`, then
// element steps.
template <typename T, ParamMode P, StateFormat S>
static void traverse(const Scalars& sc, const TensorDesc& t, u64 key, bool aligned) {
    if constexpr (S == StateFormat::Blockwise8) {
        warp([&] { step_q8_unit<T, P>(tables(), sc, t, 0, t.len, key, aligned); });
    } else {
        u64 i = 0;
        if (aligned)
            for (; i + Lanes<T>::N <= t.len; i += Lanes<T>::N) step_f32_vector<T, P>(sc, t, i, key);
        for (; i < t.len; ++i) step_f32_element<T, P>(sc, t, i, key);
    }
}
static bool traverse_any(u64 type, u64 mode, const Scalars& sc, const TensorDesc& t, u64 key, bool aligned) {
    constexpr ParamMode M = ParamMode::Master, SR = ParamMode::Stochastic;
    constexpr StateFormat F32 = StateFormat::F32, Q8 = StateFormat::Blockwise8;
    switch (type * 4 + mode) {
        case 0: traverse<float, M, F32>(sc, t, key, aligned); return true;
        case 2: traverse<float, M, Q8>(sc, t, key, aligned); return true;
        case 4: traverse<bf16, M, F32>(sc, t, key, aligned); return true;
        case 5: traverse<bf16, SR, F32>(sc, t, key, aligned); return true;
        case 6: traverse<bf16, M, Q8>(sc, t, key, aligned); return true;
        case 7: traverse<bf16, SR, Q8>(sc, t, key, aligned); return true;
        case 8: traverse<f16, M, F32>(sc, t, key, aligned); return true;
        case 10: traverse<f16, M, Q8>(sc, t, key, aligned); return true;
        default: return false;
    }
}

static int traversal() {
    const u64 cases = next();
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
        sc.den_eps = sc.eps_mode == EPS_DENOMINATOR ? sc.eps : 0.0f;
        const u64 decay = next();
        sc.decay_mode = decay == 0 ? DECAY_NONE : decay == 1 ? DECAY_COUPLED : DECAY_DECOUPLED;
        sc.grad_sign = next() ? 0x80000000u : 0u;
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
        if (!traverse_any(type, mode, sc, t, key, aligned)) {
            std::printf("unsupported case\n");
            return 1;
        }
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

// The entry points (named by src/cuda/entry.rs, defined through ADAMAX_ENTRY_POINTS as
// for NVRTC) of each storage type and mode.
struct Kernels {
    u64 type, mode;
    void (*step)(AdamaxArgs);
    void (*reduce)(AdamaxArgs);
};
static const Kernels KERNELS[] = {
    {0, 0, adamax_step_f32, adamax_reduce_f32},
    {1, 0, adamax_step_bf16, adamax_reduce_bf16},
    {2, 0, adamax_step_f16, adamax_reduce_f16},
    {1, 1, adamax_step_bf16_sr, adamax_reduce_bf16},
    {0, 2, adamax_step_f32_q8, adamax_reduce_f32},
    {1, 2, adamax_step_bf16_q8, adamax_reduce_bf16},
    {2, 2, adamax_step_f16_q8, adamax_reduce_f16},
    {1, 3, adamax_step_bf16_sr_q8, adamax_reduce_bf16},
};

struct Tensor {
    u64 len = 0;
    bool q8 = false;  // 8-bit moments (else f32)
    std::vector<u32> p32, g32, master, m, u;
    std::vector<u16> p16, g16;
    std::vector<unsigned char> cm, cu;
    std::vector<float> sm, su;
};

static void launch_step(const Kernels& k, const AdamaxArgs& a, unsigned grid, bool captured) {
    // With clipping or the overflow check, or in a captured step, the reduction and the
    // decision pass first (src/cuda/launch.rs's decision_passes).
    if (captured || (a.control->params.flags & (FLAG_CHECK | FLAG_CLIP))) {
        if (a.num_chunks > 0)
            for (unsigned b = 0; b < grid; ++b) run_block(ADAMAX_BLOCK, b, grid, [&] { k.reduce(a); });
        run_block(ADAMAX_BLOCK, 0, 1, [&] { adamax_finalize_step(a); });
    }
    // Each update runs blocks of the size it is compiled for (the kernel's step_threads).
    const unsigned threads = (k.mode & 2) ? step_threads<StateFormat::Blockwise8>() : step_threads<StateFormat::F32>();
    for (unsigned b = 0; b < grid; ++b) run_block(threads, b, grid, [&] { k.step(a); });
}

static int whole() {
    const u64 type = next(), mode = next(), nt = next(), steps = next(), grid = next();
    const u64 unit_len = next();
    const u64 num_partials = next();  // chunks of the whole list (a shard's are placed among them)
    const Kernels* kernels = nullptr;
    for (const Kernels& k : KERNELS)
        if (k.type == type && k.mode == mode) kernels = &k;
    if (!kernels) {
        std::printf("unsupported case\n");
        return 1;
    }
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
        // The tensor's own state format (Precision::min_8bit_len): 8 bits only in an
        // 8-bit update, which steps f32-state tensors in the same launch.
        t.q8 = next() != 0 && q8;
        table[k].blockwise8 = t.q8;
        // Where it sits in the whole list (src/shard.rs): stream tensor, first element,
        // first partial sum.
        table[k].stream_tensor = next();
        table[k].element_base = next();
        table[k].partial_begin = next();
        t.p32.resize(n + 8), t.g32.resize(n + 8), t.master.resize(n + 8), t.m.resize(n + 8), t.u.resize(n + 8);
        t.p16.resize(n + 8), t.g16.resize(n + 8), t.cm.resize(n + 8), t.cu.resize(n + 8);
        t.sm.resize(nb + 1), t.su.resize(nb + 1);
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
        d.exp_avg = t.q8 ? (u64)(t.cm.data() + mis) : (u64)(t.m.data() + mis);
        d.exp_inf = t.q8 ? (u64)(t.cu.data() + mis) : (u64)(t.u.data() + mis);
        d.exp_avg_scale = t.q8 ? (u64)t.sm.data() : 0;
        d.exp_inf_scale = t.q8 ? (u64)t.su.data() : 0;
        d.len = n;
        d.unit_begin = units;
        d.chunk_begin = chunks;
        units += (n + a.unit_len - 1) / a.unit_len;
        chunks += (n + ADAMAX_CHUNK - 1) / ADAMAX_CHUNK;
    }
    std::vector<float> partials(num_partials + 1);
    a.tensors = table.data();
    a.num_tensors = nt;
    a.num_units = units;
    a.num_chunks = chunks;
    a.num_partials = num_partials;
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
        launch_step(*kernels, a, (unsigned)grid, captured);
    }
    for (u64 k = 0; k < nt; ++k) {
        const Tensor& t = ts[k];
        const u64 n = t.len, nb = (n + ADAMAX_QBLOCK - 1) / ADAMAX_QBLOCK;
        for (u64 i = 0; i < n; ++i) std::printf("%u ", type == 0 ? t.p32[i] : (u32)t.p16[i]);
        if (has_master) for (u64 i = 0; i < n; ++i) std::printf("%u ", t.master[i]);
        if (t.q8) {
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
    // Which partial sums the last reduction wrote (non-zero): a tensor's go where it sits
    // in the whole list, and nowhere else.
    for (u64 k = 0; k < num_partials; ++k) std::printf("%u ", partials[k] != 0.0f ? 1u : 0u);
    std::printf("\n");
    return 0;
}

int main() {
    std::string what;
    std::cin >> what;
    if (what == "helpers") return helpers();
    if (what == "traversal") return traversal();
    if (what == "whole") return whole();
    std::printf("unknown check %s\n", what.c_str());
    return 1;
}
