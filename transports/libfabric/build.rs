//! Sets `cfg(libfabric_v2)` when libfabric-sys was built against the headers
//! of libfabric 2.0 or newer (whose `fi_domain_attr` differs from 1.x).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(libfabric_v2)");
    let major: u32 = std::env::var("DEP_FABRIC_API_MAJOR")
        .expect("libfabric-sys passes DEP_FABRIC_API_MAJOR")
        .parse()
        .expect("DEP_FABRIC_API_MAJOR is a number");
    if major >= 2 {
        println!("cargo:rustc-cfg=libfabric_v2");
    }
}
