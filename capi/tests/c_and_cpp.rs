//! The C and C++ programs against the built library: they are compiled
//! here with the system's `cc` and `c++` (warnings are errors) and run.
//!
//! * `tests/c/error_paths.c`: every bad input's status and exact message.
//! * `tests/cpp/trtllm_agent_test.cpp`: TensorRT-LLM's agent scenarios, each
//!   agent in its own process, the agents made by `createNixlTransferAgent`
//!   of `cpp/nixl_wrapper.cpp` built as `libtensorrt_llm_nixl_wrapper.so`
//!   and opened with `dlopen`; over UCX and LIBFABRIC, with data through
//!   the backend (`KVXFER_SAME_HOST_CMA=0`) and by cross-memory attach.
//! * `examples/`: the README's C and C++ examples, which must match these
//!   files; the C one also linked with the static library.
//!
//! `KVXFER_CAPI_SANITIZE=address` builds the programs with AddressSanitizer.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// `target/<profile>`, where cargo puts `libkvxfer_capi.so`. `cargo test`
/// builds the crate only as an rlib for its tests, so the shared library
/// is built here (once per run; a no-op when it is current).
fn lib_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(p) => p,
            None => panic!("no profile folder in {}", dir.display()),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The target folder of this run (a host build: target/<profile>).
        let target = dir.parent().expect("target folder");
        cmd.args(["build", "-p", "kvxfer-capi", "--lib", "--profile", profile])
            .arg("--target-dir")
            .arg(target)
            .current_dir(crate_dir());
        if cfg!(feature = "cuda") {
            cmd.args(["--features", "cuda"]);
        }
        let o = cmd.output().expect("run cargo build");
        assert!(
            o.status.success(),
            "{cmd:?} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            dir.join("libkvxfer_capi.so").exists(),
            "{} has no libkvxfer_capi.so",
            dir.display()
        );
        dir.to_path_buf()
    })
    .clone()
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where the programs are built.
fn out_dir() -> PathBuf {
    let d = lib_dir().join("capi-tests");
    std::fs::create_dir_all(&d).expect("create the build folder");
    d
}

fn sanitize() -> Vec<String> {
    match std::env::var("KVXFER_CAPI_SANITIZE") {
        Ok(s) if !s.is_empty() => vec![format!("-fsanitize={s}"), "-fno-omit-frame-pointer".into()],
        _ => Vec::new(),
    }
}

/// Compiles `sources` with `compiler` into `out` against the library.
fn compile(compiler: &str, std: &str, sources: &[&str], extra: &[&str], out: &Path) -> PathBuf {
    let lib = lib_dir();
    let mut cmd = Command::new(compiler);
    cmd.arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .args(sanitize())
        .arg("-I")
        .arg(crate_dir().join("include"))
        .args(sources.iter().map(|s| crate_dir().join(s)))
        .args(extra)
        .arg("-L")
        .arg(&lib)
        .arg("-lkvxfer_capi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-ldl")
        .arg("-o")
        .arg(out);
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out.to_path_buf()
}

/// The wrapper library TensorRT-LLM would load, and the scenario program.
fn scenario_programs() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let d = out_dir();
        let wrapper = compile(
            "c++",
            "c++17",
            &["cpp/nixl_wrapper.cpp"],
            &["-shared", "-fPIC"],
            &d.join("libtensorrt_llm_nixl_wrapper.so"),
        );
        let test = compile(
            "c++",
            "c++17",
            &["tests/cpp/trtllm_agent_test.cpp"],
            &[],
            &d.join("trtllm_agent_test"),
        );
        (wrapper, test)
    })
}

fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `scenario` with the environment `env` (and neither
/// `KVXFER_BACKEND` nor, unless given, `TRTLLM_NIXL_KVCACHE_BACKEND`
/// from ours) and asserts that it passed.
fn scenario(name: &str, env: &[(&str, &str)]) -> Output {
    let (wrapper, test) = scenario_programs();
    let mut cmd = Command::new(test);
    cmd.arg(name)
        .arg(wrapper)
        .env_remove("KVXFER_BACKEND")
        .env_remove("TRTLLM_NIXL_KVCACHE_BACKEND")
        .envs(env.iter().copied());
    let o = cmd.output().expect("run the scenario");
    let out = show(&o);
    assert!(o.status.success(), "{name} {env:?} failed: {out}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout.lines().last(),
        Some(format!("PASS {name}").as_str()),
        "{out}"
    );
    println!("{name} {env:?}: {}", stdout.trim_end());
    o
}

/// Every data-moving scenario over `backend`, through the backend and by
/// cross-memory attach.
fn scenarios_over(backend: &str, name: &str) {
    for cma in ["0", "1"] {
        scenario(
            name,
            &[
                ("TRTLLM_NIXL_KVCACHE_BACKEND", backend),
                ("KVXFER_SAME_HOST_CMA", cma),
            ],
        );
    }
}

#[test]
fn basic_write_over_ucx() {
    scenarios_over("UCX", "Basic");
}

#[test]
fn basic2_read_over_ucx() {
    scenarios_over("UCX", "Basic2");
}

#[test]
fn connect_three_agents_over_ucx() {
    scenarios_over("UCX", "Connect");
}

#[test]
fn agent_desc_over_ucx() {
    scenarios_over("UCX", "AgentDesc");
}

#[test]
fn agent_desc_over_libfabric() {
    scenarios_over("LIBFABRIC", "AgentDesc");
}

#[test]
fn sync_message_over_ucx() {
    scenarios_over("UCX", "SyncMessage");
}

#[test]
fn basic_write_over_libfabric() {
    scenarios_over("LIBFABRIC", "Basic");
}

#[test]
fn basic2_read_over_libfabric() {
    scenarios_over("LIBFABRIC", "Basic2");
}

#[test]
fn connect_three_agents_over_libfabric() {
    scenarios_over("LIBFABRIC", "Connect");
}

#[test]
fn sync_message_over_libfabric() {
    scenarios_over("LIBFABRIC", "SyncMessage");
}

#[test]
fn default_backend_is_ucx() {
    // No backend variable at all: the agents report UCX.
    scenario("Basic", &[]);
}

#[test]
fn side_channel_listens_on_kvxfer_listen() {
    // Basic checks that agent1's connection info is on 127.0.0.2.
    scenario("Basic", &[("KVXFER_LISTEN", "127.0.0.2:0")]);
}

#[test]
fn libfabric_backend_basic_restores_the_variable() {
    // Unset before: unset after. Set before: that value after.
    scenario("LibfabricBackendBasic", &[("KVXFER_SAME_HOST_CMA", "0")]);
    scenario(
        "LibfabricBackendBasic",
        &[
            ("TRTLLM_NIXL_KVCACHE_BACKEND", "ucx"),
            ("KVXFER_SAME_HOST_CMA", "0"),
        ],
    );
}

#[test]
fn unknown_backend_is_named() {
    let o = scenario("UnknownBackend", &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(
        "error: kvxfer_agent_new: unsupported backend \"NOSUCH\"; supported: UCX, LIBFABRIC"
    ));
}

#[test]
#[ignore = "needs a CUDA GPU and the `cuda` feature: cargo test -p kvxfer-capi --features cuda \
            --test c_and_cpp -- --ignored device_memory"]
fn device_memory() {
    scenario("DeviceMemory", &[("KVXFER_SAME_HOST_CMA", "0")]);
}

#[test]
fn c_error_paths() {
    let built_in = if cfg!(feature = "cuda") {
        r#"-DBUILT_IN="UCX, LIBFABRIC, CUDA_IPC""#
    } else {
        r#"-DBUILT_IN="UCX, LIBFABRIC""#
    };
    let exe = compile(
        "cc",
        "c11",
        &["tests/c/error_paths.c"],
        &[built_in],
        &out_dir().join("error_paths"),
    );
    let o = Command::new(exe)
        .env_remove("KVXFER_BACKEND")
        .env_remove("TRTLLM_NIXL_KVCACHE_BACKEND")
        .output()
        .expect("run error_paths");
    let out = show(&o);
    assert!(o.status.success(), "{out}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("PASS error paths: "), "{out}");
    println!("{stdout}");
}

/// The README shows `file` verbatim; it compiles, runs and prints
/// "written".
fn readme_example(file: &str, compiler: &str, std: &str) {
    let text = std::fs::read_to_string(crate_dir().join(file)).expect("read the example");
    let readme = std::fs::read_to_string(crate_dir().join("../README.md")).expect("read README.md");
    assert!(
        readme.contains(&text),
        "README.md does not show {file} as it is; copy the file into its code block"
    );
    let name = Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("name");
    let exe = compile(compiler, std, &[file], &[], &out_dir().join(name));
    let o = Command::new(exe)
        .env_remove("KVXFER_BACKEND")
        .env_remove("TRTLLM_NIXL_KVCACHE_BACKEND")
        .output()
        .expect("run the example");
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "written\n",
        "{}",
        show(&o)
    );
}

#[test]
fn c_example_links_the_static_library() {
    let lib = lib_dir().join("libkvxfer_capi.a");
    let exe = out_dir().join("write_static");
    let o = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join("examples/write.c"))
        .arg(&lib)
        .args([
            "-lucp",
            "-luct",
            "-lucs",
            "-lfabric",
            "-lpthread",
            "-ldl",
            "-lm",
            "-o",
        ])
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(o.status.success(), "{}", show(&o));
    let o = Command::new(&exe)
        .env_remove("KVXFER_BACKEND")
        .env_remove("TRTLLM_NIXL_KVCACHE_BACKEND")
        .output()
        .expect("run the example");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "written\n",
        "{}",
        show(&o)
    );
}

#[test]
fn readme_c_example() {
    readme_example("examples/write.c", "cc", "c11");
}

#[test]
fn readme_cpp_example() {
    readme_example("examples/trtllm_agent.cpp", "c++", "c++17");
}
