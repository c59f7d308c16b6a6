//! The crate's layers, checked on its source: every module imports only modules on its
//! own floor or below, so no arrow runs back up and no two modules import each other.
//! The spec (`src/spec`) sits below everything that computes a step; the file format
//! (`src/checkpoint`) below the optimizers; inside `src/cuda`, each module below the ones
//! that use it.
//!
//! An import is a path `crate::m` (or `crate::{m, ..}`), and in a direct child of
//! `src/cuda`, `super::m` or `crate::cuda::m`. Comments, `#[cfg(doc)]` imports (for doc
//! links) and test modules are not imports of the library.

use std::{collections::BTreeSet, fs, path::Path};

/// The crate's top-level modules, lowest floor first.
const FLOORS: &[&str] = &[
    "error",
    "fnv",
    "fsutil",
    "kernels",
    "storage",
    "config",
    "spec",
    "state",
    "fused",
    "shard",
    "checkpoint",
    "optimizer",
    "cpu",
    "cuda",
];

/// `src/cuda`'s modules, lowest first.
const CUDA_FLOORS: &[&str] = &[
    "libs",
    "args",
    "entry",
    "compile",
    "cubin",
    "cache",
    "module",
    "device",
    "control",
    "layout",
    "state",
    "table",
    "launch",
    "optimizer",
    "nccl",
];

/// Top-level items that are not modules (macros, re-exports).
const NOT_MODULES: &[&str] = &["trace"];

/// The library code of a file: comments, `#[cfg(doc)]` imports and the test module
/// removed.
fn library_code(text: &str) -> String {
    let mut code = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        code.push_str(line.split("//").next().unwrap_or(""));
        code.push('\n');
    }
    while let Some(at) = code.find("#[cfg(doc)]") {
        let end = code[at..].find(';').map_or(code.len(), |e| at + e + 1);
        code.replace_range(at..end, "");
    }
    code
}

/// The first segment of every path after `prefix::` (one, or each of a `{..}` group).
fn segments(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let pattern = format!("{prefix}::");
    let bytes = code.as_bytes();
    let ident = |at: usize| -> String {
        code[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut from = 0;
    while let Some(rel) = code[from..].find(&pattern) {
        let at = from + rel;
        from = at + pattern.len();
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if bytes.get(from) != Some(&b'{') {
            found.insert(ident(from));
            continue;
        }
        // A group: the first identifier of each comma-separated item at depth 1.
        let (mut depth, mut start, mut i) = (1, true, from + 1);
        while depth > 0 && i < bytes.len() {
            match bytes[i] {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                b',' if depth == 1 => start = true,
                c if depth == 1 && start && (c.is_ascii_alphabetic() || c == b'_') => {
                    let word = ident(i);
                    i += word.len();
                    found.insert(word);
                    start = false;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn floor(floors: &[&str], module: &str, file: &str) -> usize {
    floors
        .iter()
        .position(|m| *m == module)
        .unwrap_or_else(|| panic!("{file}: module `{module}` has no floor in tests/layers.rs"))
}

#[test]
fn no_import_runs_back_up_the_layers() {
    // The source tree this binary was built from, else the working directory's (a
    // bundle of test binaries runs from a copy of the repository, elsewhere).
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let src = if built_from.is_dir() {
        built_from
    } else {
        Path::new("src").to_path_buf()
    };
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for path in files {
        let rel = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let mut parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
        if parts.last() == Some(&"mod") {
            parts.pop();
        }
        if matches!(parts.first(), Some(&"lib") | Some(&"bin") | None) {
            continue;
        }
        let code = library_code(&fs::read_to_string(&path).unwrap());
        let own = floor(FLOORS, parts[0], &rel);
        for m in segments(&code, "crate") {
            if NOT_MODULES.contains(&m.as_str()) {
                continue;
            }
            checked += 1;
            if floor(FLOORS, &m, &rel) > own {
                wrong.push(format!(
                    "{rel}: `{}` imports `{m}`, a floor above it",
                    parts[0]
                ));
            }
        }
        if parts[0] == "cuda" && parts.len() >= 2 {
            let own = floor(CUDA_FLOORS, parts[1], &rel);
            let mut siblings = segments(&code, "crate::cuda");
            if parts.len() == 2 {
                siblings.extend(segments(&code, "super"));
            }
            for m in siblings {
                checked += 1;
                if floor(CUDA_FLOORS, &m, &rel) > own {
                    wrong.push(format!(
                        "{rel}: `cuda::{}` imports `cuda::{m}`, above it",
                        parts[1]
                    ));
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} imports found: is the parser broken?"
    );
    assert!(
        wrong.is_empty(),
        "imports that run back up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_parser_finds_single_and_grouped_imports_and_skips_comments() {
    let code = library_code(
        "use crate::{\n    a::{X, Y},\n    b,\n    c::z::W,\n};\n// use crate::d;\n#[cfg(doc)]\nuse crate::e;\nfn f() { crate::g::h(); super::i::j(); }\n#[cfg(test)]\nuse crate::k;\n",
    );
    let found: Vec<String> = segments(&code, "crate").into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "g"]);
    let found: Vec<String> = segments(&code, "super").into_iter().collect();
    assert_eq!(found, ["i"]);
}
