//! The kernel's low-byte helpers (`kernels/adamax.cu`: the random stream, stochastic
//! rounding to bf16, the 8-bit codes and block scales), compiled for the host with the
//! system's C++ compiler, against their spec in `src/cpu/lowbit.rs`, on edge cases and
//! random inputs. A check of the CUDA code that needs no GPU: the helpers are plain
//! integer and IEEE f32 arithmetic, which x86-64 (SSE, no contraction) computes as the
//! GPU does; the intrinsics get host definitions with the same rounding. What it cannot
//! reach (the memory traversal, warp shuffles) the GPU tests check.
//!
//! Without a C++ compiler the test is reported as ignored, unless `CI` is set: then it
//! fails.

use std::process::{Command, Stdio};

use adamax_cuda::cpu::lowbit::{self, EXP_AVG_CODE, EXP_INF_CODE};
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
static inline float __shfl_xor_sync(u32, float v, int) { return v; }  // unused here
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

fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    Command::new(&cxx)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| cxx)
}

/// Builds the harness, feeds it `commands`, returns its output lines.
fn run(cxx: &str, commands: &str) -> Result<Vec<u64>, Failed> {
    let dir = std::env::temp_dir().join(format!("adamax-kernel-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (src, exe) = (dir.join("harness.cpp"), dir.join("harness"));
    std::fs::write(&src, source()?)?;
    let built = Command::new(cxx)
        .args([
            "-std=c++17",
            "-O2",
            "-ffp-contract=off",
            "-fno-fast-math",
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
    // From a file: a pipe would fill both ways and deadlock.
    let input = dir.join("commands.txt");
    std::fs::write(&input, commands)?;
    let out = Command::new(&exe)
        .stdin(Stdio::from(std::fs::File::open(&input)?))
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        return Err(format!(
            "the harness failed: {}",
            String::from_utf8_lossy(&out.stdout)
        )
        .into());
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| l.parse::<u64>().map_err(|e| format!("`{l}`: {e}").into()))
        .collect()
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
    let got = run(cxx, &commands)?;
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

fn main() {
    let args = Arguments::from_args();
    let cxx = compiler();
    let in_ci = std::env::var_os("CI").is_some();
    if cxx.is_none() {
        eprintln!(
            "no C++ compiler (`c++` or $CXX): the host check of the kernel's helpers is ignored"
        );
    }
    let trial = Trial::test(
        "kernel_low_byte_helpers_compiled_for_the_host_match_the_spec",
        {
            let cxx = cxx.clone();
            move || match cxx {
                Some(c) => helpers_match_the_spec(&c),
                None => Err("no C++ compiler".into()),
            }
        },
    )
    .with_ignored_flag(cxx.is_none() && !in_ci);
    libtest_mimic::run(&args, vec![trial]).exit();
}
