//! UCX prints no configuration warning for the options kvxfer sets, whatever
//! the transport list: each case starts a transport in a child process (UCX
//! writes its warnings straight to the process's output) and reads what the
//! child printed.

use std::process::Command;

use kvxfer_ucx::{UcxConfig, UcxTransport};

const ROLE_ENV: &str = "KVXFER_UCX_CONFIG_CHILD";

/// Entry point of the child process; does nothing unless spawned below.
#[test]
#[ignore = "child role of start_prints_no_configuration_warning; spawned by it"]
fn child_starts_a_transport() {
    let Some(tls) = std::env::var_os(ROLE_ENV) else {
        return;
    };
    let tls = tls.to_string_lossy().into_owned();
    let mut cfg = UcxConfig::default();
    cfg.tls = (tls != "-").then_some(tls);
    // The shared-memory transports of UCX 1.13 cannot watch a peer.
    cfg.peer_failure_detection = false;
    let t = UcxTransport::new(&cfg).expect("transport");
    println!("@STARTED {}", t.resources().join(" "));
}

#[test]
fn start_prints_no_configuration_warning() {
    for tls in ["-", "tcp", "posix", "sm,self", "^tcp", "tcp,posix,self"] {
        let out = Command::new(std::env::current_exe().expect("current exe"))
            .args(["--ignored", "--exact", "child_starts_a_transport"])
            .args(["--nocapture", "--test-threads=1"])
            .env(ROLE_ENV, tls)
            .env_remove("UCX_TLS")
            // A build-time setting; UCX 1.22 warns about unknown UCX_ variables.
            .env_remove("UCX_DIR")
            .env_remove("UCX_TCP_TX_SEG_SIZE")
            .env_remove("UCX_TCP_RX_SEG_SIZE")
            .output()
            .expect("spawn child");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "UCX_TLS={tls}: child failed:\n{text}");
        assert!(
            text.contains("@STARTED "),
            "UCX_TLS={tls}: no start:\n{text}"
        );
        assert!(
            !text.contains("UCX  WARN") && !text.contains("invalid configuration"),
            "UCX_TLS={tls}: UCX warned at start:\n{text}"
        );
    }
}
