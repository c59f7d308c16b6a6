//! Embeds the CUDA sources of `kernels/` into the crate, with a content hash that the
//! runtime uses as part of its compile-cache key. Never calls nvcc: the kernels are
//! compiled at run time by NVRTC.

use std::{env, fs, path::Path};

include!("src/fnv.rs");

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=src/fnv.rs");
    let src_path = Path::new("kernels/adamax.cu");
    println!("cargo:rerun-if-changed={}", src_path.display());
    let source = match fs::read_to_string(src_path) {
        Ok(s) => s,
        Err(e) => panic!("build.rs: cannot read {}: {e}", src_path.display()),
    };
    let out = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.rs");
    let generated = format!(
        "/// CUDA source of `kernels/adamax.cu`, embedded at build time.\n\
         pub const ADAMAX_CU: &str = {source:?};\n\
         /// FNV-1a hash of [`ADAMAX_CU`], a cache key for compiled modules.\n\
         pub const ADAMAX_CU_HASH: u64 = {:#018x};\n",
        fnv1a64(source.as_bytes())
    );
    if let Err(e) = fs::write(&out, generated) {
        panic!("build.rs: cannot write {}: {e}", out.display());
    }
}
