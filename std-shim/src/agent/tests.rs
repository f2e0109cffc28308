use super::*;

#[test]
fn agent_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Agent>();
    check::<XferRequest>();
}

#[test]
fn engine_tables_are_sized_from_the_config() {
    use kvxfer_core::Capacities;
    let caps = Capacities {
        xfers: 3,
        prepared_entries: 5,
        ..crate::config::DEFAULT_CAPACITIES
    };
    let cfg = AgentConfig::default().with_capacities(caps);
    let t = kvxfer_core::transport::loopback::Loopback::new(&MEM, 1);
    let e = backends::boxed_engine("sized", t, &cfg, None).unwrap();
    assert_eq!(*e.capacities(), caps);
}

/// The default tables take what `DEFAULT_CAPACITIES` documents: about
/// 65 MiB for every backend.
#[test]
fn default_tables_take_about_65_mib() {
    let caps = crate::config::DEFAULT_CAPACITIES;
    let sizes = backends::table_bytes(&caps);
    for b in sizes {
        let mib = b as f64 / f64::from(1 << 20);
        assert!((60.0..=70.0).contains(&mib), "{mib:.1} MiB");
    }
}

static MEM: kvxfer_core::transport::loopback::LoopbackMemory<64> =
    kvxfer_core::transport::loopback::LoopbackMemory::new(0x1000);
