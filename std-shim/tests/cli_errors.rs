//! The last line a user reads when `kvxfer bench` or `kvxfer target`
//! fails names the cause and the value, and the exit status says whether
//! the options were wrong (2) or the run failed (1).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KVXFER: &str = env!("CARGO_BIN_EXE_kvxfer");

/// The backends this build of kvxfer has, as its errors list them.
const BUILT_IN: &str = if cfg!(feature = "cuda") {
    "UCX, LIBFABRIC, CUDA_IPC"
} else {
    "UCX, LIBFABRIC"
};

/// Runs `kvxfer ARGS` with `env` and returns its exit status and the last
/// line of its standard error.
fn last_line(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(KVXFER);
    cmd.args(args)
        .env_remove("KVXFER_BACKEND")
        .env_remove("TRTLLM_NIXL_KVCACHE_BACKEND")
        .env_remove("KVXFER_LIBFABRIC_PROVIDER")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run kvxfer");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default().to_string();
    (out.status.code().unwrap_or(-1), last)
}

#[test]
fn bad_backend_is_named_before_anything_starts() {
    let started = Instant::now();
    let (code, last) = last_line(&["bench"], &[("KVXFER_BACKEND", "FOO")]);
    assert_eq!(
        last,
        format!("kvxfer bench: KVXFER_BACKEND=FOO: no such backend; built in: {BUILT_IN}")
    );
    assert_eq!(code, 2);
    // Refused up front, not after a target was spawned and gave up.
    assert!(started.elapsed() < Duration::from_secs(2));

    let (code, last) = last_line(&["bench", "--backend", "nccl"], &[]);
    assert_eq!(
        last,
        format!("kvxfer bench: --backend=nccl: no such backend; built in: {BUILT_IN}")
    );
    assert_eq!(code, 2);

    let (code, last) = last_line(&["target"], &[("KVXFER_BACKEND", "FOO")]);
    assert_eq!(
        last,
        format!("kvxfer target: KVXFER_BACKEND=FOO: no such backend; built in: {BUILT_IN}")
    );
    assert_eq!(code, 2);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn backend_not_built_in_says_how_to_build_it() {
    let (code, last) = last_line(&["bench"], &[("KVXFER_BACKEND", "CUDA_IPC")]);
    assert_eq!(
        last,
        "kvxfer bench: KVXFER_BACKEND=CUDA_IPC: backend CUDA_IPC is not built into this kvxfer \
         (cargo build --release -p kvxfer --features cuda); built in: UCX, LIBFABRIC"
    );
    assert_eq!(code, 2);
    let (code, last) = last_line(&["bench", "--mem", "vram"], &[]);
    assert_eq!(
        last,
        "kvxfer bench: --mem vram: VRAM needs kvxfer built with the cuda feature (--features cuda)"
    );
    assert_eq!(code, 2);
}

/// A setting only the transport reads fails the spawned target first: the
/// verdict is the target's error and exit status, not the bench protocol.
#[test]
fn spawned_target_that_fails_to_start_is_named_with_its_error() {
    let (code, last) = last_line(
        &["bench"],
        &[("KVXFER_BACKEND", "UCX"), ("KVXFER_UCX_NATIVE_VRAM", "abc")],
    );
    assert_eq!(
        last,
        "kvxfer bench: FAILED: the target exited (exit status: 1) before serving: opening the \
         transport: UCX error -1: KVXFER_UCX_NATIVE_VRAM=\"abc\": expected 0 or 1"
    );
    assert_eq!(code, 1);
}

#[test]
fn provider_not_offered_is_named_with_those_offered() {
    let (code, last) = last_line(
        &["bench"],
        &[
            ("KVXFER_BACKEND", "LIBFABRIC"),
            ("KVXFER_LIBFABRIC_PROVIDER", "verbs;ofi_rxm"),
        ],
    );
    let (head, offered) = last
        .split_once(" does not offer this provider with RDM and RMA here; offered: ")
        .unwrap_or_else(|| panic!("{last}"));
    assert!(
        head.starts_with("kvxfer bench: KVXFER_LIBFABRIC_PROVIDER=verbs;ofi_rxm: libfabric 1.")
            || head
                .starts_with("kvxfer bench: KVXFER_LIBFABRIC_PROVIDER=verbs;ofi_rxm: libfabric 2."),
        "{last}"
    );
    assert!(offered.split(", ").any(|p| p == "tcp;ofi_rxm"), "{last}");
    assert_eq!(code, 2);

    let (code, last) = last_line(
        &["bench", "--backend", "LIBFABRIC", "--provider", "nosuch"],
        &[],
    );
    assert!(
        last.starts_with("kvxfer bench: --provider=nosuch: libfabric ")
            && last.contains(" does not offer this provider with RDM and RMA here; offered: "),
        "{last}"
    );
    assert_eq!(code, 2);
}

#[test]
fn unreachable_peer_is_named() {
    for backend in ["UCX", "LIBFABRIC"] {
        let (code, last) = last_line(
            &["bench", "--peer", "127.0.0.1:1"],
            &[("KVXFER_BACKEND", backend)],
        );
        assert_eq!(
            last,
            "kvxfer bench: FAILED: connecting to the target at 127.0.0.1:1: SIDE_CHANNEL error \
             111: connect to 127.0.0.1:1: Connection refused (os error 111)",
            "{backend}"
        );
        assert_eq!(code, 1, "{backend}");
    }
}

/// A target killed while the bench writes to it: the verdict is the
/// disconnection, within a few seconds.
#[test]
fn peer_that_dies_mid_run_is_named() {
    for backend in ["UCX", "LIBFABRIC"] {
        let mut target = Command::new(KVXFER)
            .args(["target", "--size", "4MiB"])
            .env("KVXFER_BACKEND", backend)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kvxfer target");
        let mut line = String::new();
        BufReader::new(target.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read its address");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .expect(&line)
            .to_string();
        // Killed once the run is under way: opening libfabric alone took
        // about 2 s on a loaded 2-core machine.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(4000));
            target.kill().expect("kill the target");
            target.wait().expect("reap the target");
        });
        let started = Instant::now();
        let (code, last) = last_line(
            &[
                "bench",
                "--peer",
                &addr,
                "--blocks",
                "16",
                "--duration",
                "20s",
            ],
            &[("KVXFER_BACKEND", backend)],
        );
        killer.join().expect("killer");
        assert_eq!(
            last,
            "kvxfer bench: FAILED: WRITE of a request to kvxfer-target: remote agent \
             \"kvxfer-target\" disconnected",
            "{backend}"
        );
        assert_eq!(code, 1, "{backend}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{backend}: {:?}",
            started.elapsed()
        );
    }
}

/// The target the bench spawned killed mid-run: the verdict names the
/// failed transfer and how the target exited.
#[test]
fn spawned_target_that_dies_is_named_with_its_exit() {
    let bench = Command::new(KVXFER)
        .args(["bench", "--blocks", "16", "--duration", "20s"])
        .env("KVXFER_BACKEND", "UCX")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvxfer bench");
    // Its target is its only child; kill it once the run is under way.
    let children = format!("/proc/{0}/task/{0}/children", bench.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let target: i32 = loop {
        let c = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = c.split_whitespace().next() {
            break pid.parse().expect("pid");
        }
        assert!(Instant::now() < deadline, "no target spawned");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(4000));
    // SAFETY: kill(2) on the pid of a child of our child; no memory involved.
    assert_eq!(unsafe { libc::kill(target, libc::SIGKILL) }, 0);
    let out = bench.wait_with_output().expect("bench output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().last().unwrap_or_default(),
        "kvxfer bench: FAILED: WRITE of a request to kvxfer-target (the target exited, signal: \
         9 (SIGKILL)): remote agent \"kvxfer-target\" disconnected",
        "{err}"
    );
    assert_eq!(out.status.code(), Some(1));
}

/// `kvxfer info` reports every backend of the registry: those built in
/// with their library's version, the others with how to build them in.
#[test]
fn info_reports_every_backend() {
    let out = Command::new(KVXFER)
        .arg("info")
        .env("KVXFER_BACKEND", "libfabric")
        .env_remove("TRTLLM_NIXL_KVCACHE_BACKEND")
        .stdin(Stdio::null())
        .output()
        .expect("run kvxfer info");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[1], "selected backend: LIBFABRIC (from KVXFER_BACKEND)",
        "{text}"
    );
    let starting = |p: &str| lines.iter().filter(|l| l.starts_with(p)).count();
    assert_eq!(starting("UCX: built in; libucp "), 1, "{text}");
    assert_eq!(starting("LIBFABRIC: built in; libfabric "), 1, "{text}");
    if cfg!(feature = "cuda") {
        assert_eq!(starting("CUDA_IPC: built in; transport "), 1, "{text}");
    } else {
        assert!(
            lines.contains(&"CUDA_IPC: not built in (build with --features cuda)"),
            "{text}"
        );
    }
    // In the registry's order.
    let at = |p: &str| lines.iter().position(|l| l.starts_with(p)).unwrap();
    assert!(at("UCX:") < at("LIBFABRIC:") && at("LIBFABRIC:") < at("CUDA_IPC:"));
}

/// CUDA support is in the default build; without a driver VRAM and
/// CUDA_IPC are refused up front naming the cause, and `kvxfer info` says
/// there is no GPU. With a driver, `kvxfer info` lists the GPUs.
#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_driver_says_so() {
    let info = Command::new(KVXFER)
        .arg("info")
        .output()
        .expect("kvxfer info");
    let info = String::from_utf8_lossy(&info.stdout);
    if kvxfer_cuda::driver_present() {
        assert!(info.contains("\n  GPU 0: "), "{info}");
        return;
    }
    assert!(
        info.contains(
            "CUDA: no driver (libcuda.so.1 not found): VRAM and CUDA_IPC need an NVIDIA GPU and \
             its driver"
        ),
        "{info}"
    );
    let (code, last) = last_line(&["bench"], &[("KVXFER_BACKEND", "CUDA_IPC")]);
    assert_eq!(
        last,
        "kvxfer bench: backend CUDA_IPC: no CUDA driver found (libcuda.so.1); it needs an \
         NVIDIA GPU and its driver"
    );
    assert_eq!(code, 2);
    let (code, last) = last_line(&["bench", "--mem", "vram"], &[]);
    assert_eq!(
        last,
        "kvxfer bench: --mem vram: no CUDA driver found (libcuda.so.1); VRAM needs an NVIDIA GPU \
         and its driver"
    );
    assert_eq!(code, 2);
}

/// `kvxfer info` with `KVXFER_RAILS=rails`: the lines on rails under each
/// of UCX and LIBFABRIC.
fn rail_lines(rails: &str) -> [Vec<String>; 2] {
    let out = Command::new(KVXFER)
        .arg("info")
        .env("KVXFER_RAILS", rails)
        .env("KVXFER_LIBFABRIC_PROVIDER", "tcp;ofi_rxm")
        .env_remove("UCX_TLS")
        .env_remove("UCX_NET_DEVICES")
        .env_remove("KVXFER_BACKEND")
        .env_remove("TRTLLM_NIXL_KVCACHE_BACKEND")
        .stdin(Stdio::null())
        .output()
        .expect("run kvxfer info");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let section = |name: &str| -> Vec<String> {
        text.lines()
            .skip_while(|l| !l.starts_with(name))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter(|l| l.starts_with("  rail"))
            .map(str::to_string)
            .collect()
    };
    [section("UCX: "), section("LIBFABRIC: ")]
}

/// `kvxfer info` opens the rails `KVXFER_RAILS` names over UCX and over
/// libfabric and lists each with its state, counters and what it runs on.
#[test]
fn info_lists_each_rail() {
    let [ucx, fabric] = rail_lines("lo,lo");
    assert_eq!(
        ucx,
        ["  rail lo: up, 0 bytes, 0 failures, NUMA unknown, PCI unknown, via tcp/lo"; 2]
    );
    assert_eq!(
        fabric,
        ["  rail lo: up, 0 bytes, 0 failures, NUMA unknown, PCI unknown, via tcp;ofi_rxm"; 2]
    );
    let [ucx, fabric] = rail_lines("lo");
    assert_eq!(ucx, ["  rail lo: the only rail (no striping or failover)"]);
    assert_eq!(fabric, ucx);
}

/// A rail that names no interface of this host is refused, named.
#[test]
fn info_names_a_missing_rail() {
    let want = ["  rail nosuch0: no such network interface or RDMA device here"];
    for rails in ["lo,nosuch0", "nosuch0,lo"] {
        let [ucx, fabric] = rail_lines(rails);
        assert_eq!(ucx, want, "{rails}");
        assert_eq!(fabric, want, "{rails}");
    }
}

/// `kvxfer bench` and `kvxfer target` refuse a missing rail up front,
/// over UCX and libfabric, naming it.
#[test]
fn missing_rail_is_refused_before_anything_starts() {
    let why = "rail nosuch0: no such network interface or RDMA device here";
    for backend in ["UCX", "LIBFABRIC"] {
        let env = [("KVXFER_BACKEND", backend), ("KVXFER_RAILS", "lo,nosuch0")];
        for cmd in ["bench", "target"] {
            let started = Instant::now();
            let (code, last) = last_line(&[cmd], &env);
            assert_eq!(
                last,
                format!("kvxfer {cmd}: KVXFER_RAILS=lo,nosuch0: {why}"),
                "{backend}"
            );
            assert_eq!(code, 2);
            assert!(started.elapsed() < Duration::from_secs(2), "{cmd}");
        }
        let (code, last) = last_line(&["bench", "--backend", backend, "--rails", "nosuch0"], &[]);
        assert_eq!(last, format!("kvxfer bench: KVXFER_RAILS=nosuch0: {why}"));
        assert_eq!(code, 2);
    }
}
