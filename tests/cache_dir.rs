//! Where the kernel cache lives, from the environment (no NVRTC needed).

use std::{collections::HashMap, ffi::OsString, path::PathBuf};

use adamax_cuda::cuda::cache::cache_dir_from;

fn dir(vars: &[(&str, &str)]) -> Option<PathBuf> {
    let env: HashMap<String, OsString> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    cache_dir_from(|k| env.get(k).cloned())
}

#[test]
fn the_override_wins_then_xdg_then_home() {
    let all = [
        ("ADAMAX_CUDA_CACHE_DIR", "/o"),
        ("XDG_CACHE_HOME", "/x"),
        ("HOME", "/h"),
    ];
    assert_eq!(dir(&all), Some(PathBuf::from("/o")));
    assert_eq!(dir(&all[1..]), Some(PathBuf::from("/x/adamax-cuda")));
    assert_eq!(dir(&all[2..]), Some(PathBuf::from("/h/.cache/adamax-cuda")));
    assert_eq!(
        dir(&[("LOCALAPPDATA", "C:/L")]),
        Some(PathBuf::from("C:/L/adamax-cuda"))
    );
    assert_eq!(dir(&[]), None, "no home: no cache");
    assert_eq!(
        dir(&[("XDG_CACHE_HOME", ""), ("HOME", "/h")]),
        Some(PathBuf::from("/h/.cache/adamax-cuda"))
    );
}

#[test]
fn the_cache_can_be_switched_off() {
    for off in ["0", "off", "OFF", "false", "False", "no", "disabled"] {
        assert_eq!(
            dir(&[
                ("ADAMAX_CUDA_CACHE", off),
                ("ADAMAX_CUDA_CACHE_DIR", "/o"),
                ("HOME", "/h")
            ]),
            None,
            "{off}"
        );
    }
    assert_eq!(
        dir(&[("ADAMAX_CUDA_CACHE", "1"), ("HOME", "/h")]),
        Some(PathBuf::from("/h/.cache/adamax-cuda"))
    );
}

/// Values as a shell user writes them: padded, upper case, with a newline from a
/// file; a blank directory is no directory (it used to create one named " " in the
/// working directory); a relative XDG_CACHE_HOME is ignored (the XDG Base Directory
/// specification: "If an implementation encounters a relative path in any of these
/// variables it should consider the path invalid and ignore it").
#[test]
fn padded_blank_and_relative_values_are_read_as_meant() {
    for off in [" off", "off ", "OFF\n", "\t0", " disabled "] {
        assert_eq!(
            dir(&[("ADAMAX_CUDA_CACHE", off), ("HOME", "/h")]),
            None,
            "{off:?}"
        );
    }
    for blank in [" ", "\t", " \n "] {
        assert_eq!(
            dir(&[("ADAMAX_CUDA_CACHE_DIR", blank), ("HOME", "/h")]),
            Some(PathBuf::from("/h/.cache/adamax-cuda")),
            "{blank:?}"
        );
        assert_eq!(
            dir(&[("ADAMAX_CUDA_CACHE", blank), ("HOME", "/h")]),
            Some(PathBuf::from("/h/.cache/adamax-cuda")),
            "a blank switch leaves the cache on: {blank:?}"
        );
    }
    for relative in ["cache", "./x", "x/y"] {
        assert_eq!(
            dir(&[("XDG_CACHE_HOME", relative), ("HOME", "/h")]),
            Some(PathBuf::from("/h/.cache/adamax-cuda")),
            "{relative}"
        );
    }
    assert_eq!(dir(&[("HOME", "rel")]), None, "a relative HOME is no home");
    assert_eq!(
        dir(&[("ADAMAX_CUDA_CACHE_DIR", "rel")]),
        Some(PathBuf::from("rel")),
        "the user's own directory is taken as given"
    );
}

#[cfg(unix)]
#[test]
fn a_non_utf8_directory_is_kept_as_the_os_gave_it() {
    use std::os::unix::ffi::OsStringExt;
    let raw = OsString::from_vec(b"/tmp/caf\xe9".to_vec());
    let got = cache_dir_from(|k| (k == "ADAMAX_CUDA_CACHE_DIR").then(|| raw.clone()));
    assert_eq!(
        got,
        Some(PathBuf::from(raw)),
        "not replaced by a lossy conversion"
    );
}
