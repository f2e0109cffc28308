//! `FI_AV_REMOVE_CLEANUP=1` is in the environment from the start of a
//! process that links kvxfer-libfabric (libfabric reads it on its first
//! call), unless the environment already sets it; turned off, a transport
//! refuses to start, naming it.

use std::process::Command;

const CHILD_ENV: &str = "KVXFER_AV_CLEANUP_CHILD";

/// Prints the variable as this process found it before any other code ran.
#[test]
#[ignore = "child role of this file's test; it spawns it"]
fn child_prints_the_variable() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let v = std::env::var("FI_AV_REMOVE_CLEANUP").unwrap_or_else(|_| "<unset>".into());
    println!("@VALUE {v}");
    // A transport starts only with the variable on.
    let cfg = kvxfer_libfabric::FabricConfig::default().with_provider("tcp;ofi_rxm");
    match kvxfer_libfabric::FabricTransport::new(&cfg) {
        Ok(_) => println!("@TRANSPORT ok"),
        Err(e) => println!("@TRANSPORT {e}"),
    }
}

/// What the child printed for `tag`.
fn child_line(set: Option<&str>, tag: &str) -> String {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args([
        "--ignored",
        "--exact",
        "child_prints_the_variable",
        "--nocapture",
    ])
    .env(CHILD_ENV, "1")
    .env_remove("FI_AV_REMOVE_CLEANUP");
    if let Some(v) = set {
        cmd.env("FI_AV_REMOVE_CLEANUP", v);
    }
    let out = cmd.output().expect("spawn child");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "child failed: {text}");
    text.lines()
        .find_map(|l| l.split_once(tag).map(|(_, v)| v.to_string()))
        .unwrap_or_else(|| panic!("no {tag} printed: {text}"))
}

#[test]
fn set_before_main_unless_the_environment_sets_it() {
    assert_eq!(child_line(None, "@VALUE "), "1");
    assert_eq!(child_line(None, "@TRANSPORT "), "ok");
    assert_eq!(child_line(Some("0"), "@VALUE "), "0");
    // Turned off, the transport refuses to start, naming the variable.
    assert_eq!(
        child_line(Some("0"), "@TRANSPORT "),
        "LIBFABRIC error -22: FI_AV_REMOVE_CLEANUP=\"0\"; set FI_AV_REMOVE_CLEANUP=1 before the \
         process starts"
    );
}
