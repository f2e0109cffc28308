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
