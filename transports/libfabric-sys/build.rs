//! Finds libfabric, generates bindings with bindgen and compiles the C shim.
//!
//! The library is found with pkg-config (`libfabric`), unless `LIBFABRIC_DIR`
//! is set: then headers come from `$LIBFABRIC_DIR/include` and the library
//! from `$LIBFABRIC_DIR/lib`. An rpath to that directory is added to this
//! crate's own test binaries; programs that link libfabric-sys from such a
//! prefix need it on `LD_LIBRARY_PATH` (or their own rpath) at run time.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBFABRIC_DIR");
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/wrapper.h");

    let include_paths: Vec<PathBuf> = match env::var_os("LIBFABRIC_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            let lib = dir.join("lib");
            let include = dir.join("include");
            if !include.join("rdma").join("fabric.h").exists() {
                panic!(
                    "LIBFABRIC_DIR={} has no include/rdma/fabric.h; point it at a libfabric install prefix",
                    dir.display()
                );
            }
            println!("cargo:rustc-link-search=native={}", lib.display());
            println!("cargo:rustc-link-lib=fabric");
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
            println!("cargo:root={}", dir.display());
            vec![include]
        }
        None => match pkg_config::Config::new().atleast_version("1.9").probe("libfabric") {
            Ok(lib) => lib.include_paths,
            Err(e) => panic!(
                "libfabric not found with pkg-config ({e}); install libfabric-dev or set LIBFABRIC_DIR to its prefix"
            ),
        },
    };

    let mut build = cc::Build::new();
    build.file("shim/shim.c").include("shim").warnings(true);
    for p in &include_paths {
        build.include(p);
    }
    build.compile("kvxfer_fi_shim");

    let mut builder = bindgen::Builder::default()
        .header("shim/wrapper.h")
        .clang_arg("-Ishim")
        .allowlist_function("fi_.*|kvxfer_fi_.*")
        .allowlist_type("fi_.*|fid_.*|fid")
        .allowlist_var("FI_.*")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for p in &include_paths {
        builder = builder.clang_arg(format!("-I{}", p.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen failed on the libfabric headers");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("cannot write bindings.rs");

    // The header's API version, for crates whose code differs between
    // libfabric 1.x and 2.x: DEP_FABRIC_API_MAJOR / DEP_FABRIC_API_MINOR in
    // their build scripts.
    let text = bindings.to_string();
    let major = header_const(&text, "FI_MAJOR_VERSION");
    let minor = header_const(&text, "FI_MINOR_VERSION");
    println!("cargo:api_major={major}");
    println!("cargo:api_minor={minor}");
}

/// The value of `pub const NAME: u32 = N;` in the generated bindings.
fn header_const(bindings: &str, name: &str) -> u32 {
    let prefix = format!("pub const {name}: u32 = ");
    bindings
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&prefix)?
                .strip_suffix(';')?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("the libfabric headers define no {name}"))
}
