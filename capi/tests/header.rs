//! `include/kvxfer.h` is what cbindgen generates from the crate now: a
//! header left stale by a change to the C functions or types fails here.
//! `KVXFER_UPDATE_HEADER=1` writes the generated header instead.

use std::path::Path;

#[test]
fn checked_in_header_matches_the_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = dir.join("include/kvxfer.h");
    if std::env::var_os("KVXFER_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/kvxfer.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or(
                checked_in.lines().count().min(generated.lines().count()),
                |i| i,
            )
            + 1;
        panic!(
            "include/kvxfer.h is stale (first difference at line {line}); regenerate it with \
             KVXFER_UPDATE_HEADER=1 cargo test -p kvxfer-capi --test header"
        );
    }
}
