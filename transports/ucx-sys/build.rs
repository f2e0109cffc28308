//! Generates bindings to UCX's `ucp/api/ucp.h` and links libucp and libucs.
//!
//! The headers and libraries are found with pkg-config (`ucx`), or under
//! `$UCX_DIR/include` and `$UCX_DIR/lib` when `UCX_DIR` is set.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=UCX_DIR");
    println!("cargo:rerun-if-changed=wrapper.h");

    let mut include_dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = env::var_os("UCX_DIR") {
        let dir = PathBuf::from(dir);
        let inc = dir.join("include");
        let lib = dir.join("lib");
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-lib=ucp");
        println!("cargo:rustc-link-lib=ucs");
        println!("cargo:include={}", inc.display());
        include_dirs.push(inc);
    } else {
        match pkg_config::Config::new()
            .cargo_metadata(false)
            .atleast_version("1.10")
            .probe("ucx")
        {
            Ok(lib) => {
                for p in &lib.link_paths {
                    println!("cargo:rustc-link-search=native={}", p.display());
                }
                println!("cargo:rustc-link-lib=ucp");
                println!("cargo:rustc-link-lib=ucs");
                include_dirs.extend(lib.include_paths);
            }
            Err(e) => {
                panic!(
                    "UCX not found with pkg-config ({e}); install libucx-dev or set UCX_DIR \
                     to a UCX installation prefix (with include/ and lib/)"
                );
            }
        }
    }

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("ucp_.*|ucs_.*")
        .allowlist_type("ucp_.*|ucs_.*")
        .allowlist_var("UCP_.*|UCS_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .use_core()
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for dir in &include_dirs {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder.generate().expect("bindgen failed on ucp/api/ucp.h");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("cannot write bindings.rs");
}
