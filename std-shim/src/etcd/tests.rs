use super::*;

fn text(e: Error) -> String {
    match e {
        Error::Backend { backend, text, .. } => {
            assert_eq!(backend, ETCD);
            text.as_str().to_string()
        }
        other => panic!("expected an ETCD backend error, got {other:?}"),
    }
}

#[test]
fn config_parses_endpoints_and_normalises_prefix() {
    let c = EtcdConfig::new(" http://a:2379, b:2379 ,,").with_prefix("/ns");
    assert_eq!(c.endpoints, vec!["http://a:2379", "b:2379"]);
    assert_eq!(c.validate().unwrap(), ("/ns/".to_string(), 5));
    let c = c.with_lease_ttl(Duration::from_millis(1500));
    assert_eq!(c.validate().unwrap().1, 2);
}

#[test]
fn config_rejects_bad_values_by_name() {
    assert!(text(EtcdConfig::new(" , ").validate().unwrap_err()).contains("no etcd endpoint"));
    let bad_ttl = EtcdConfig::new("a:1").with_lease_ttl(Duration::from_millis(999));
    assert!(text(bad_ttl.validate().unwrap_err()).contains("lease TTL 999 ms"));
    let no_prefix = EtcdConfig::new("a:1").with_prefix("");
    assert!(text(no_prefix.validate().unwrap_err()).contains("prefix is empty"));
    let zero = EtcdConfig::new("a:1").with_timeout(Duration::ZERO);
    assert!(text(zero.validate().unwrap_err()).contains("timeout is zero"));
    let zero = EtcdConfig::new("a:1").with_republish_interval(Duration::ZERO);
    assert!(text(zero.validate().unwrap_err()).contains("republish interval is zero"));
    let mut spaced = EtcdConfig::new("a:1");
    spaced.endpoints.push("b :2".into());
    assert!(text(spaced.validate().unwrap_err()).contains("\"b :2\""));
}
