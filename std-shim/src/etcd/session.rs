//! The background thread: one etcd session at a time, publishing, fetching and watching.

use super::*;

/// What the background task needs besides the shared state.
pub(super) struct Settings {
    pub(super) endpoints: Vec<String>,
    pub(super) ttl: i64,
    pub(super) timeout: Duration,
    pub(super) republish: Duration,
}

/// The background thread: a current-thread runtime running [`Session`].
pub(super) fn background(
    inner: Arc<DiscoveryInner>,
    settings: Settings,
    commands: mpsc::UnboundedReceiver<Command>,
    stop: oneshot::Receiver<()>,
    ready: std::sync::mpsc::SyncSender<Result<(), Error>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(etcd_err(
                i64::from(e.raw_os_error().unwrap_or(-1)),
                &format!("tokio runtime for etcd: {e}"),
            )));
            return;
        }
    };
    rt.block_on(async move {
        let mut session = match Session::open(Arc::clone(&inner), settings).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let end = session.run(commands, stop).await;
        if let Some(e) = end {
            log::warn!("agent {}: etcd discovery stopped: {e}", inner.name);
            inner.lock().stopped = Some(e);
        } else {
            inner.lock().stopped = Some(etcd_err(-1, "etcd discovery was shut down"));
        }
        inner.changed.notify_all();
    });
}

/// The connection to etcd and what hangs on it.
struct Session {
    inner: Arc<DiscoveryInner>,
    settings: Settings,
    client: Client,
    lease: i64,
    keeper: LeaseKeeper,
    keepalive: LeaseKeepAliveStream,
    watch: WatchStream,
    /// The metadata last written.
    published: Vec<u8>,
}

impl Session {
    async fn timed<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        timed(&self.settings, &self.inner, what, f).await
    }

    /// Connects, publishes and starts following the prefix.
    async fn open(inner: Arc<DiscoveryInner>, settings: Settings) -> Result<Session, Error> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(settings.timeout)
            .with_timeout(settings.timeout);
        let mut client = timed(
            &settings,
            &inner,
            "connect",
            Client::connect(settings.endpoints.clone(), Some(opts)),
        )
        .await?;
        let (lease, keeper, keepalive) = grant(&settings, &inner, &mut client).await?;
        let published = inner.agent.local_metadata()?;
        let mut c = client.clone();
        timed(
            &settings,
            &inner,
            &format!("put {}", inner.key),
            c.put(
                inner.key.clone(),
                seal(inner.auth.as_deref(), &inner.name, &published),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        inner.lock().publications += 1;
        let watch = follow(&settings, &inner, &mut client).await?;
        Ok(Session {
            inner,
            settings,
            client,
            lease,
            keeper,
            keepalive,
            watch,
            published,
        })
    }

    /// Serves until stopped; returns why it ended on its own, if it did.
    async fn run(
        &mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut stop: oneshot::Receiver<()>,
    ) -> Option<Error> {
        let renew_every = Duration::from_millis(
            (u64::try_from(self.settings.ttl).unwrap_or(1) * 1000 / 3).max(100),
        );
        let mut renew = tokio::time::interval(renew_every);
        let mut republish = tokio::time::interval(self.settings.republish);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        loop {
            let healthy = tokio::select! {
                _ = &mut stop => {
                    self.withdraw().await;
                    return None;
                }
                _ = renew.tick() => {
                    self.keeper.keep_alive().await.map_err(|e| client_err("lease keep-alive", &e))
                }
                m = self.keepalive.message() => match m {
                    Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                    Ok(Some(_)) => Err(etcd_err(-1, &format!("lease {:x} expired", self.lease))),
                    Ok(None) => Err(etcd_err(-1, "lease keep-alive stream closed")),
                    Err(e) => Err(client_err("lease keep-alive", &e)),
                },
                m = self.watch.message() => match m {
                    Ok(Some(r)) => self.on_watch(&r).await,
                    Ok(None) => Err(etcd_err(-1, &format!("watch of {} closed", self.inner.prefix))),
                    Err(e) => Err(client_err(&format!("watch of {}", self.inner.prefix), &e)),
                },
                _ = republish.tick() => self.republish(false).await,
                c = commands.recv(), if commands_open => match c {
                    Some(Command::Fetch(name)) => self.fetch(&name).await,
                    Some(Command::Publish(reply)) => {
                        let r = self.republish(false).await;
                        let _ = reply.send(r.clone());
                        r
                    }
                    None => {
                        commands_open = false;
                        Ok(())
                    }
                },
            };
            match healthy {
                Ok(()) => {}
                Err(Error::ShutDown) => {
                    // The agent is gone: so is its entry.
                    self.withdraw().await;
                    return Some(Error::ShutDown);
                }
                Err(e) => {
                    log::warn!(
                        "agent {}: etcd at {}: {e}; reconnecting",
                        self.inner.name,
                        self.inner.endpoints
                    );
                    if let Some(end) = self.recover(&mut stop).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Applies one watch response.
    async fn on_watch(&mut self, r: &etcd_client::WatchResponse) -> Result<(), Error> {
        if r.canceled() {
            return Err(etcd_err(
                -1,
                &format!(
                    "watch of {} cancelled: {} (compacted at {})",
                    self.inner.prefix,
                    r.cancel_reason(),
                    r.compact_revision()
                ),
            ));
        }
        let mut ours_deleted = false;
        for ev in r.events() {
            let Some(kv) = ev.kv() else { continue };
            if kv.key() == self.inner.key.as_bytes() {
                ours_deleted |= ev.event_type() == EventType::Delete;
                continue;
            }
            let Some(name) = self.inner.peer_of(kv.key()) else {
                continue;
            };
            match ev.event_type() {
                EventType::Put => self.inner.apply_put(name, kv.value(), kv.mod_revision()),
                EventType::Delete => self.inner.apply_delete(name, kv.mod_revision()),
            }
        }
        if ours_deleted {
            log::warn!(
                "agent {}: its entry {} was deleted; publishing again",
                self.inner.name,
                self.inner.key
            );
            self.republish(true).await?;
        }
        Ok(())
    }

    /// Writes the agent's metadata if it changed (or if `force`).
    async fn republish(&mut self, force: bool) -> Result<(), Error> {
        let now = self.inner.agent.local_metadata()?;
        if !force && now == self.published {
            return Ok(());
        }
        let mut c = self.client.clone();
        self.timed(
            &format!("put {}", self.inner.key),
            c.put(
                self.inner.key.clone(),
                seal(self.inner.auth.as_deref(), &self.inner.name, &now),
                Some(PutOptions::new().with_lease(self.lease)),
            ),
        )
        .await?;
        log::info!(
            "agent {}: re-published its metadata ({} bytes)",
            self.inner.name,
            now.len()
        );
        self.published = now;
        self.inner.lock().publications += 1;
        Ok(())
    }

    /// Gets `name`'s entry and applies it.
    async fn fetch(&mut self, name: &str) -> Result<(), Error> {
        let key = format!("{}{name}", self.inner.prefix);
        let mut c = self.client.clone();
        let r = self.timed(&format!("get {key}"), c.get(key, None)).await?;
        if let Some(kv) = r.kvs().first() {
            self.inner.apply_put(name, kv.value(), kv.mod_revision());
        }
        Ok(())
    }

    /// Reconnects after a failure: a new lease, the entry written again, a
    /// fresh listing and watch. Retries until it works or `stop` fires;
    /// returns `Some` when the session must end.
    async fn recover(&mut self, stop: &mut oneshot::Receiver<()>) -> Option<Option<Error>> {
        loop {
            tokio::select! {
                _ = &mut *stop => {
                    self.withdraw().await;
                    return Some(None);
                }
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
            match self.reopen().await {
                Ok(()) => {
                    log::info!(
                        "agent {}: back in etcd at {}",
                        self.inner.name,
                        self.inner.endpoints
                    );
                    return None;
                }
                Err(Error::ShutDown) => return Some(Some(Error::ShutDown)),
                Err(e) => log::warn!("agent {}: etcd still failing: {e}", self.inner.name),
            }
        }
    }

    async fn reopen(&mut self) -> Result<(), Error> {
        let old = self.lease;
        let (lease, keeper, keepalive) =
            grant(&self.settings, &self.inner, &mut self.client).await?;
        self.lease = lease;
        self.keeper = keeper;
        self.keepalive = keepalive;
        self.republish(true).await?;
        let mut c = self.client.clone();
        // The old lease may still live (a broken stream, not a dead etcd).
        let _ = self.timed("revoke old lease", c.lease_revoke(old)).await;
        self.watch = follow(&self.settings, &self.inner, &mut self.client).await?;
        Ok(())
    }

    /// Revokes the lease, so the entry disappears now.
    async fn withdraw(&mut self) {
        let mut c = self.client.clone();
        match self
            .timed(
                &format!("revoke lease of {}", self.inner.key),
                c.lease_revoke(self.lease),
            )
            .await
        {
            Ok(_) => log::info!(
                "agent {}: withdrawn from etcd ({})",
                self.inner.name,
                self.inner.key
            ),
            Err(e) => log::warn!(
                "agent {}: withdrawing from etcd: {e}; the entry expires with its lease",
                self.inner.name
            ),
        }
    }
}

/// Runs `f` with the request timeout; errors name the endpoints and `what`.
async fn timed<T>(
    settings: &Settings,
    inner: &DiscoveryInner,
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(settings.timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(client_err(
            &format!("etcd at {}: {what}", inner.endpoints),
            &e,
        )),
        Err(_) => Err(etcd_err(
            -1,
            &format!(
                "etcd at {}: {what}: no answer within {} ms",
                inner.endpoints,
                settings.timeout.as_millis()
            ),
        )),
    }
}

/// Grants a lease and opens its keep-alive stream.
async fn grant(
    settings: &Settings,
    inner: &DiscoveryInner,
    client: &mut Client,
) -> Result<(i64, LeaseKeeper, LeaseKeepAliveStream), Error> {
    let mut c = client.clone();
    let what = format!("grant a lease of {} s", settings.ttl);
    let lease = timed(settings, inner, &what, c.lease_grant(settings.ttl, None))
        .await?
        .id();
    let mut c = client.clone();
    let (keeper, stream) = timed(
        settings,
        inner,
        "lease keep-alive",
        c.lease_keep_alive(lease),
    )
    .await?;
    Ok((lease, keeper, stream))
}

/// Lists the prefix, applies the listing and watches from the revision
/// after it.
async fn follow(
    settings: &Settings,
    inner: &DiscoveryInner,
    client: &mut Client,
) -> Result<WatchStream, Error> {
    let mut c = client.clone();
    let what = format!("list {}", inner.prefix);
    let listing = timed(
        settings,
        inner,
        &what,
        c.get(inner.prefix.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = listing.header().map_or(0, |h| h.revision());
    inner.apply_listing(listing.kvs(), revision);
    let mut c = client.clone();
    let what = format!("watch {}", inner.prefix);
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    timed(
        settings,
        inner,
        &what,
        c.watch(inner.prefix.clone(), Some(opts)),
    )
    .await
}
