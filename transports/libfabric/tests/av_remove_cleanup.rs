//! `FI_AV_REMOVE_CLEANUP=1` is in the environment from the start of a
//! process that links kvxfer-libfabric (libfabric reads it on its first
//! call), unless the environment already sets it.

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
    // Keep the crate linked in, as any user of it is.
    assert!(kvxfer_libfabric::version().0 >= 1);
}

fn child_value(set: Option<&str>) -> String {
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
        .find_map(|l| l.split_once("@VALUE ").map(|(_, v)| v.to_string()))
        .unwrap_or_else(|| panic!("no value printed: {text}"))
}

#[test]
fn set_before_main_unless_the_environment_sets_it() {
    assert_eq!(child_value(None), "1");
    assert_eq!(child_value(Some("0")), "0");
}
