//! Every kernel entry point compiles with NVRTC for sm_75, sm_80, sm_90 and sm_100,
//! without register spills. Needs the NVRTC library but no GPU. Without the library the
//! tests are reported as ignored, unless `CI` is set: then they fail.

use adamax_cuda::{
    cuda::{
        cache::{compile_cached_in, entry_path, CacheOutcome},
        compile, compile_source, nvrtc_version, Arch, ENTRY_POINTS,
    },
    Error,
};
use libtest_mimic::{Arguments, Failed, Trial};

const ARCHS: [Arch; 4] = [
    Arch { major: 7, minor: 5 },
    Arch { major: 8, minor: 0 },
    Arch { major: 9, minor: 0 },
    Arch {
        major: 10,
        minor: 0,
    },
];

fn compiles_every_entry_point(arch: Arch) -> Result<(), Failed> {
    let c = compile(arch).map_err(|e| e.to_string())?;
    if c.is_ptx {
        return Err(format!("NVRTC fell back to PTX for {arch}: it should support it").into());
    }
    for name in ENTRY_POINTS {
        let found = c.image.windows(name.len()).any(|w| w == name.as_bytes());
        if !found {
            return Err(format!("{arch}: entry point {name} missing from the CUBIN").into());
        }
        // ptxas --verbose: "Function properties for NAME" then
        // "N bytes stack frame, N bytes spill stores, N bytes spill loads".
        let props = c
            .log
            .split("Function properties for ")
            .find(|s| s.starts_with(name) && s[name.len()..].starts_with(char::is_whitespace))
            .ok_or_else(|| format!("{arch}: no ptxas report for {name} in log:\n{}", c.log))?;
        let line = props.lines().nth(1).unwrap_or_default();
        if !line.contains(" 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") {
            return Err(format!("{arch}: {name} uses local memory: {line}").into());
        }
    }
    Ok(())
}

/// The training example's kernels (examples/train_mlp/mlp.cu) compile too: CI is the
/// only place their GPU path is checked without a GPU.
fn the_training_examples_kernels_compile() -> Result<(), Failed> {
    let src = include_str!("../examples/train_mlp/mlp.cu");
    for arch in ARCHS {
        let c = compile_source(src, arch).map_err(|e| e.to_string())?;
        for name in [
            "linear_forward_f16",
            "linear_backward_params_f32",
            "softmax_cross_entropy",
        ] {
            if !c.image.windows(name.len()).any(|w| w == name.as_bytes()) {
                return Err(format!("{arch}: {name} missing").into());
            }
        }
    }
    Ok(())
}

fn a_broken_source_is_a_compile_error_carrying_nvrtcs_log() -> Result<(), Failed> {
    let src = "extern \"C\" __global__ void k() { this_is_not_declared = 1; }";
    match compile_source(src, ARCHS[0]) {
        Err(Error::Compile { log, options, .. }) => {
            if !log.contains("this_is_not_declared") {
                return Err(format!("log does not name the error: {log}").into());
            }
            if !options.iter().any(|o| o == "--fmad=false") {
                return Err(format!("options not reported: {options:?}").into());
            }
            Ok(())
        }
        other => Err(format!("expected Error::Compile, got {other:?}").into()),
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("adamax-cache-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn the_cache_misses_then_hits_with_the_same_module() -> Result<(), Failed> {
    let dir = temp_dir("hit");
    let arch = ARCHS[2];
    let (first, o1) = compile_cached_in(Some(&dir), arch).map_err(|e| e.to_string())?;
    let path = entry_path(&dir, arch).map_err(|e| e.to_string())?;
    if o1 != CacheOutcome::Written(path.clone()) {
        return Err(format!("first lookup: {o1:?}").into());
    }
    let (second, o2) = compile_cached_in(Some(&dir), arch).map_err(|e| e.to_string())?;
    if o2 != CacheOutcome::Hit(path) {
        return Err(format!("second lookup: {o2:?}").into());
    }
    if first.image != second.image || first.is_ptx != second.is_ptx || first.log != second.log {
        return Err("a cache hit differs from the compiled module".into());
    }
    let other = entry_path(&dir, ARCHS[1]).map_err(|e| e.to_string())?;
    if other == entry_path(&dir, arch).map_err(|e| e.to_string())? {
        return Err("entries of two architectures share a key".into());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn a_corrupt_cache_entry_is_ignored_and_rebuilt() -> Result<(), Failed> {
    let dir = temp_dir("corrupt");
    let arch = ARCHS[0];
    let (good, _) = compile_cached_in(Some(&dir), arch).map_err(|e| e.to_string())?;
    let path = entry_path(&dir, arch).map_err(|e| e.to_string())?;
    let valid = std::fs::read(&path)?;
    let mut flipped = valid.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    for (what, bytes) in [
        ("truncated", valid[..valid.len() / 3].to_vec()),
        ("flipped byte", flipped),
        ("garbage", b"not a cache entry".to_vec()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&path, &bytes)?;
        let (c, outcome) = compile_cached_in(Some(&dir), arch).map_err(|e| e.to_string())?;
        if outcome != CacheOutcome::Written(path.clone()) || c.image != good.image {
            return Err(format!("{what}: {outcome:?}").into());
        }
        // The rebuilt entry is valid: the next lookup hits. (Its bytes may differ from
        // the first entry's: ptxas's log carries compile times.)
        let (again, outcome) = compile_cached_in(Some(&dir), arch).map_err(|e| e.to_string())?;
        if outcome != CacheOutcome::Hit(path.clone()) || again.image != good.image {
            return Err(format!("{what}: after the rebuild: {outcome:?}").into());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn a_disabled_cache_compiles_and_writes_nothing() -> Result<(), Failed> {
    let (c, outcome) = compile_cached_in(None, ARCHS[0]).map_err(|e| e.to_string())?;
    if outcome != CacheOutcome::Disabled || c.image.is_empty() {
        return Err(format!("{outcome:?}").into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let present = nvrtc_version();
    let in_ci = std::env::var_os("CI").is_some();
    match &present {
        Ok((major, minor)) => eprintln!("NVRTC {major}.{minor}"),
        Err(e) if in_ci => eprintln!("CI is set and NVRTC is missing: the tests will fail ({e})"),
        Err(e) => eprintln!("NVRTC not found, tests ignored: {e}"),
    }
    let ignore = present.is_err() && !in_ci;
    let mut trials: Vec<Trial> = ARCHS
        .iter()
        .map(|&arch| {
            Trial::test(
                format!("nvrtc_compiles_every_entry_point_without_spills_for_{arch}"),
                move || compiles_every_entry_point(arch),
            )
        })
        .collect();
    trials.push(Trial::test(
        "a_broken_source_is_a_compile_error_carrying_nvrtcs_log",
        a_broken_source_is_a_compile_error_carrying_nvrtcs_log,
    ));
    trials.push(Trial::test(
        "the_training_examples_kernels_compile",
        the_training_examples_kernels_compile,
    ));
    trials.push(Trial::test(
        "the_cache_misses_then_hits_with_the_same_module",
        the_cache_misses_then_hits_with_the_same_module,
    ));
    trials.push(Trial::test(
        "a_corrupt_cache_entry_is_ignored_and_rebuilt",
        a_corrupt_cache_entry_is_ignored_and_rebuilt,
    ));
    trials.push(Trial::test(
        "a_disabled_cache_compiles_and_writes_nothing",
        a_disabled_cache_compiles_and_writes_nothing,
    ));
    // CI runs this binary once per supported NVRTC major; make sure it got that one.
    if let Some(want) = std::env::var_os("ADAMAX_EXPECT_NVRTC_MAJOR") {
        let want = want.to_string_lossy().into_owned();
        let got = present.as_ref().ok().map(|(major, _)| major.to_string());
        trials.push(Trial::test(
            "the_loaded_nvrtc_has_the_expected_major",
            move || {
                if got.as_deref() == Some(want.as_str()) {
                    Ok(())
                } else {
                    Err(format!("expected NVRTC {want}.x, loaded {got:?}").into())
                }
            },
        ));
    }
    let trials = trials
        .into_iter()
        .map(|t| t.with_ignored_flag(ignore))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
