//! `kvxfer bench --sweep` as a user runs it: a table, the JSON with one
//! verified point per size and backend, and an SVG chart with both axes
//! described and one line per backend.

use std::process::Command;

const KVXFER: &str = env!("CARGO_BIN_EXE_kvxfer");

#[test]
fn sweep_writes_table_json_and_chart() {
    let dir = std::env::temp_dir().join(format!("kvxfer-sweep-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.join("sweep");
    let run = Command::new(KVXFER)
        .args([
            "bench",
            "--sweep",
            "4KiB..8KiB",
            "--backend",
            "UCX,LIBFABRIC:tcp;ofi_rxm",
            "--iters",
            "50",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run kvxfer bench --sweep");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}\n{stdout}{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );

    // The table: a header and one row per backend and size, then the files.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert!(lines[0].starts_with("backend "), "{stdout}");
    let rows: Vec<(String, String)> = lines[1..5]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "LIBFABRIC tcp;ofi_rxm WRITE 4 KiB ..." has one word more.
            let n = f.len();
            assert_eq!(f[n - 7], "WRITE", "{l}");
            (f[..n - 7].join(" "), format!("{} {}", f[n - 6], f[n - 5]))
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("UCX", "4 KiB"),
        ("UCX", "8 KiB"),
        ("LIBFABRIC tcp;ofi_rxm", "4 KiB"),
        ("LIBFABRIC tcp;ofi_rxm", "8 KiB"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(rows, want, "{stdout}");
    let json_path = out.with_extension("json");
    let svg_path = out.with_extension("svg");
    assert_eq!(
        lines[5],
        format!(
            "sweep written to {} and {}",
            json_path.display(),
            svg_path.display()
        )
    );

    // The JSON: four points, each a verified run of 50 requests of one
    // block of its size over its backend.
    let json = std::fs::read_to_string(&json_path).expect("read the JSON");
    assert!(
        json.starts_with("{\"points\":[") && json.ends_with("]}"),
        "{json}"
    );
    let points: Vec<&str> = json.split("{\"label\":").skip(1).collect();
    assert_eq!(points.len(), 4, "{json}");
    for (p, (label, size)) in points.iter().zip(&want) {
        let bytes = if size == "4 KiB" { 4096 } else { 8192 };
        let backend = label.split(' ').next().unwrap_or_default();
        for part in [
            format!("\"{label}\",\"size\":{bytes},"),
            format!("\"backend\":\"{backend}\",\"op\":\"WRITE\""),
            format!("\"block_size\":{bytes},\"blocks\":1,"),
            "\"requests\":50,".to_string(),
            "\"verified\":true".to_string(),
        ] {
            assert!(p.contains(&part), "{part} not in {p}");
        }
    }

    // The chart: both axes described, size labelled in binary units, one
    // line (a polyline) per backend in each of the two panels, a legend
    // entry for each.
    let svg = std::fs::read_to_string(&svg_path).expect("read the SVG");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    let has_text = |t: &str| svg.contains(&format!(">\n{t}\n</text>"));
    for text in [
        "request size (bytes, log scale)",
        "bandwidth (GB/s)",
        "p50 latency (µs, log scale)",
        "4KiB",
        "8KiB",
    ] {
        assert!(has_text(text), "{text} not in the SVG");
    }
    for label in ["UCX", "LIBFABRIC tcp;ofi_rxm"] {
        assert_eq!(
            svg.matches(&format!(">\n{label}\n</text>")).count(),
            2,
            "legend entries of {label}"
        );
    }
    // The series are the polylines of width 2: per backend a colour, with
    // in each panel its line and its legend swatch.
    let mut per_colour = std::collections::BTreeMap::<&str, usize>::new();
    for p in svg.split("<polyline ").skip(1) {
        if !p.contains("stroke-width=\"2\"") {
            continue;
        }
        let colour = p
            .split("stroke=\"")
            .nth(1)
            .and_then(|c| c.split('"').next());
        *per_colour.entry(colour.expect("stroke")).or_default() += 1;
    }
    assert_eq!(per_colour.len(), 2, "{per_colour:?}");
    assert!(per_colour.values().all(|&n| n == 4), "{per_colour:?}");
    std::fs::remove_dir_all(&dir).expect("remove the temp dir");
}

/// A sweep that cannot work is refused before the first point, naming
/// the option and the value.
#[test]
fn sweep_refuses_bad_ranges_and_backends_up_front() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--sweep", "64MiB..4KiB"],
            "kvxfer bench: --sweep 64MiB..4KiB: LOW must be positive and at most HIGH",
        ),
        (
            &["--sweep", "4KiB"],
            "kvxfer bench: --sweep 4KiB: expected LOW..HIGH, e.g. 4KiB..64MiB",
        ),
        (
            // UCX would work: FOO is found before UCX is measured.
            &["--sweep", "4KiB..8KiB", "--backend", "UCX,FOO"],
            "kvxfer bench: --backend=FOO: no such backend; built in: ",
        ),
    ];
    for (args, want) in cases {
        let started = std::time::Instant::now();
        let out = Command::new(KVXFER)
            .arg("bench")
            .args(args)
            .output()
            .expect("run kvxfer bench --sweep");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with(want), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{args:?}"
        );
    }
}
