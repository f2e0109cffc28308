//! Unit tests of the metrics' tables and encoding.

use super::*;

#[test]
fn histogram_buckets_and_sum() {
    let h = Histogram::default();
    h.observe(500);
    h.observe(1_000);
    h.observe(1_001);
    h.observe(20_000_000_000);
    let s = h.snapshot();
    assert_eq!(s.count, 4);
    assert_eq!(s.sum_ns, 500 + 1_000 + 1_001 + 20_000_000_000);
    assert_eq!(s.buckets[0], 2);
    assert_eq!(s.buckets[1], 1);
    assert_eq!(s.buckets.iter().sum::<u64>(), 3, "one above the last bound");
}

#[test]
fn encoding_escapes_labels_and_counts_cumulative_buckets() {
    let m = AgentMetrics::new("a\"b", "UCX", true);
    let p = m.peer_series("p\\q\n");
    p.completed(1, 4096, 1_500);
    p.completed(1, 4096, 3_000_000);
    p.failed(&Error::TimedOut { after_ms: 5 });
    m.error(Op::Prepare, &Error::unknown_peer("x"));
    let text = m.encode();
    let base = r#"agent="a\"b",backend="UCX",peer="p\\q\n""#;
    for want in [
        format!("kvxfer_transferred_bytes_total{{{base},direction=\"write\"}} 8192"),
        format!("kvxfer_transfers_total{{{base},direction=\"write\"}} 2"),
        format!("kvxfer_transfers_total{{{base},direction=\"read\"}} 0"),
        format!("kvxfer_transfer_failures_total{{{base},kind=\"timed_out\"}} 1"),
        format!("kvxfer_transfer_timeouts_total{{{base}}} 1"),
        format!(
            "kvxfer_transfer_latency_seconds_bucket{{{base},direction=\"write\",le=\"0.000002\"}} 1"
        ),
        format!(
            "kvxfer_transfer_latency_seconds_bucket{{{base},direction=\"write\",le=\"0.005\"}} 2"
        ),
        format!("kvxfer_transfer_latency_seconds_sum{{{base},direction=\"write\"}} 0.0030015"),
        format!("kvxfer_transfer_latency_seconds_count{{{base},direction=\"write\"}} 2"),
        r#"kvxfer_errors_total{agent="a\"b",backend="UCX",op="prepare",kind="unknown_peer"} 1"#
            .to_string(),
        r#"kvxfer_peers{agent="a\"b",backend="UCX"} 1"#.to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing {want:?} in\n{text}"
        );
    }
}

#[test]
fn rails_are_read_at_each_snapshot_and_told_apart_by_index() {
    let m = AgentMetrics::new("r", "LIBFABRIC", true);
    assert!(m.snapshot().rails.is_empty());
    assert!(!m.encode().contains("kvxfer_rail_bytes_total{"));
    let bytes = Arc::new(AtomicU64::new(4096));
    let read = Arc::clone(&bytes);
    m.read_rails_from(move || {
        let rail = |state, bytes, failures| RailStats {
            name: "lo".to_string(),
            state,
            bytes,
            failures,
            ..RailStats::default()
        };
        vec![
            rail(RailState::Up, read.load(Ordering::Relaxed), 0),
            RailStats {
                renewals: 1,
                ..rail(RailState::Probing, 7, 2)
            },
        ]
    });
    bytes.store(1 << 20, Ordering::Relaxed);
    let snap = m.snapshot();
    assert_eq!(
        snap.rails[0].bytes,
        1 << 20,
        "read when the snapshot is taken"
    );
    let text = m.encode();
    let r0 = r#"agent="r",backend="LIBFABRIC",rail="lo",index="0""#;
    let r1 = r#"agent="r",backend="LIBFABRIC",rail="lo",index="1""#;
    for want in [
        "# TYPE kvxfer_rail_bytes_total counter".to_string(),
        "# TYPE kvxfer_rail_up gauge".to_string(),
        format!("kvxfer_rail_bytes_total{{{r0}}} 1048576"),
        format!("kvxfer_rail_bytes_total{{{r1}}} 7"),
        format!("kvxfer_rail_failures_total{{{r0}}} 0"),
        format!("kvxfer_rail_failures_total{{{r1}}} 2"),
        format!("kvxfer_rail_renewals_total{{{r0}}} 0"),
        format!("kvxfer_rail_renewals_total{{{r1}}} 1"),
        format!("kvxfer_rail_up{{{r0}}} 1"),
        format!("kvxfer_rail_up{{{r1}}} 0"),
        format!("kvxfer_rail_state{{{r0},state=\"up\"}} 1"),
        format!("kvxfer_rail_state{{{r0},state=\"probing\"}} 0"),
        format!("kvxfer_rail_state{{{r1},state=\"up\"}} 0"),
        format!("kvxfer_rail_state{{{r1},state=\"down\"}} 0"),
        format!("kvxfer_rail_state{{{r1},state=\"probing\"}} 1"),
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing {want:?} in\n{text}"
        );
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("kvxfer_rail_state{"))
            .count(),
        2 * RAIL_STATES.len()
    );
}
