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
/// 65 MiB for UCX and libfabric, 70 MiB for CUDA_IPC.
#[test]
fn default_tables_take_about_65_mib() {
    let caps = crate::config::DEFAULT_CAPACITIES;
    let mib: Vec<f64> = backends::table_bytes(&caps)
        .into_iter()
        .map(|b| b as f64 / f64::from(1 << 20))
        .collect();
    for m in &mib {
        assert!((60.0..=71.0).contains(m), "{mib:.2?} MiB");
    }
}

static MEM: kvxfer_core::transport::loopback::LoopbackMemory<64> =
    kvxfer_core::transport::loopback::LoopbackMemory::new(0x1000);
