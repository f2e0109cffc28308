//! Finding and publishing agents through etcd (feature `etcd`).

use super::*;

/// The etcd presence of a bench agent (feature `etcd`).
#[cfg(feature = "etcd")]
pub(super) type Discovery = crate::etcd::EtcdDiscovery;
/// Without the `etcd` feature there is none.
#[cfg(not(feature = "etcd"))]
pub(super) enum Discovery {}

/// Withdrawing from etcd is what dropping a discovery means; keep the
/// `drop` calls that order it meaningful in builds without etcd too.
#[cfg(not(feature = "etcd"))]
impl Drop for Discovery {
    fn drop(&mut self) {
        match *self {}
    }
}

/// Publishes `agent` in the etcd at `endpoints`, if given.
#[cfg(feature = "etcd")]
pub(super) fn join_etcd(
    agent: &Agent,
    endpoints: &Option<String>,
    prefix: &Option<String>,
) -> Result<Option<Discovery>, Error> {
    let Some(endpoints) = endpoints else {
        return Ok(None);
    };
    let mut cfg = crate::etcd::EtcdConfig::new(endpoints);
    if let Some(p) = prefix {
        cfg = cfg.with_prefix(p.as_str());
    }
    crate::etcd::EtcdDiscovery::start(agent, cfg).map(Some)
}

/// Without the `etcd` feature, asking for etcd is an error.
#[cfg(not(feature = "etcd"))]
pub(super) fn join_etcd(
    _agent: &Agent,
    endpoints: &Option<String>,
    _prefix: &Option<String>,
) -> Result<Option<Discovery>, Error> {
    match endpoints {
        None => Ok(None),
        Some(e) => Err(Error::backend(
            "ETCD",
            -1,
            &format!("etcd {e:?} asked, but kvxfer was built without the `etcd` feature"),
        )),
    }
}

/// Finds and loads the target `name` through etcd.
#[cfg(feature = "etcd")]
pub(super) fn etcd_fetch(d: &Discovery, name: &str, timeout: Duration) -> Result<String, Error> {
    d.fetch(name, timeout)
}

#[cfg(not(feature = "etcd"))]
pub(super) fn etcd_fetch(d: &Discovery, _name: &str, _timeout: Duration) -> Result<String, Error> {
    match *d {}
}

/// Notifies `peer`; a peer found through etcd whose metadata has not
/// arrived yet is fetched first.
pub(super) fn reply_to(
    agent: &Agent,
    discovery: Option<&Discovery>,
    peer: &str,
    msg: &[u8],
) -> Result<(), Error> {
    match (agent.notify(peer, msg), discovery) {
        #[cfg(feature = "etcd")]
        (Err(Error::UnknownPeer { .. }), Some(d)) => {
            d.fetch(peer, Duration::from_secs(5))?;
            agent.notify(peer, msg)
        }
        (r, _) => r,
    }
}
