//! A shard's task (the actor): owns its [`Shard`], takes its mailbox, commits on
//! the segment's deadline and releases acks and alerts. While the shard cannot be
//! opened it is down: listed in `/status`, readiness false, its bundles left
//! unacked (gateways keep and resend them), every request answered with why; it
//! tries again now and then.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::commit::{Published, Shard};
use super::error::ShardError;
use super::handle::{Released, ShardMsg, ShardUnavailable};
use super::state::SegmentConfig;
use super::validate::ValidationConfig;
use crate::analytics::AnalyticsConfig;
use crate::keys::Keys;
use crate::lake::store::Store;
use crate::registry::Registry;
use crate::telemetry::{CloudStats, events as ev};

/// How often a shard that is down tries to open again (after a repair, or once
/// the store answers), at most.
const SHARD_RETRY_MAX: Duration = Duration::from_secs(30);

/// What a shard task needs to open its shard (again) and run it.
#[derive(Clone)]
pub struct ShardSetup {
    /// The lake.
    pub store: Store,
    /// Shards in the keyspace.
    pub shard_count: u16,
    /// This node's id (written into checkpoints).
    pub node: String,
    /// When segments commit.
    pub segment: SegmentConfig,
    /// The schema registry.
    pub registry: Arc<Registry>,
    /// Clock sanity limits.
    pub validation: ValidationConfig,
    /// Analytics settings.
    pub analytics: AnalyticsConfig,
    /// Device and gateway keys.
    pub keys: Arc<Keys>,
    /// Where acks and alerts go.
    pub released: mpsc::UnboundedSender<Released>,
    /// Counters.
    pub stats: Arc<CloudStats>,
}

impl ShardSetup {
    /// Opens shard `id` with the datasets already listed.
    pub async fn open(&self, id: u16, published: &Published) -> Result<Shard, ShardError> {
        Shard::open_with(
            self.store.clone(),
            id,
            self.shard_count,
            &self.node,
            self.segment.clone(),
            self.stats.clone(),
            published,
        )
        .await
    }

    /// Runs shard `id` until its mailbox closes, starting from `opened` (the
    /// shard, or why it could not be opened); commits what it holds before it ends.
    pub async fn run(self, id: u16, opened: Result<Shard, ShardError>, mut inbox: mpsc::Receiver<ShardMsg>) {
        let Some(mut shard) = self.wait_until_open(id, opened, &mut inbox).await else { return };
        shard.state.set_registry(self.registry.clone());
        shard.state.set_validation(self.validation.clone());
        shard.state.set_analytics(self.analytics.clone());
        // Alerts of the last commit before a restart may not have left: again, same ids.
        for e in shard.state.take_resend() {
            let _ = self.released.send(Released::Alert(e));
        }
        self.serve(shard, inbox).await;
    }

    /// While the shard is down: answers requests with why, retries with backoff.
    /// `None` when the mailbox closed first.
    async fn wait_until_open(
        &self,
        id: u16,
        mut opened: Result<Shard, ShardError>,
        inbox: &mut mpsc::Receiver<ShardMsg>,
    ) -> Option<Shard> {
        let mut backoff = fleetline_service::Backoff::new(Duration::from_secs(1), SHARD_RETRY_MAX);
        loop {
            let why = match opened {
                Ok(shard) => {
                    self.stats.emit(ev::ShardUp(id));
                    return Some(shard);
                }
                Err(e) => e.to_string(),
            };
            self.stats.emit(ev::ShardDown { shard: id, why: &why });
            let down = || ShardUnavailable::Down { shard: id, why: why.clone() };
            let retry = tokio::time::sleep(backoff.next_delay());
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    _ = &mut retry => break,
                    msg = inbox.recv() => match msg? {
                        ShardMsg::Bundle { .. } => self.stats.emit(ev::BundleForDownShard),
                        ShardMsg::Flush { reply } => { let _ = reply.send(Err(down())); }
                        ShardMsg::Status { .. } => {}
                        ShardMsg::Vehicle { reply, .. } => { let _ = reply.send(Err(down())); }
                        ShardMsg::Replay { reply, .. } => { let _ = reply.send(Err(down())); }
                    },
                }
            }
            opened = match Published::list(&self.store).await {
                Ok(published) => self.open(id, &published).await,
                Err(e) => Err(ShardError::Store(e)),
            };
        }
    }

    /// The actor loop: takes bundles, commits on the segment's deadline, answers
    /// requests; when the mailbox closes, commits what it holds and ends.
    async fn serve(&self, mut shard: Shard, mut inbox: mpsc::Receiver<ShardMsg>) {
        loop {
            let msg = match shard.state.deadline() {
                Some(d) => tokio::select! {
                    m = inbox.recv() => m,
                    _ = tokio::time::sleep_until(d.into()) => {
                        let _ = self.commit(&mut shard).await;
                        continue;
                    }
                },
                None => inbox.recv().await,
            };
            let Some(msg) = msg else {
                // Shutting down: make what is held durable and acked.
                let _ = self.commit(&mut shard).await;
                return;
            };
            match msg {
                ShardMsg::Bundle { payload } => {
                    let now = Instant::now();
                    shard.state.ingest(&payload, &self.keys.snapshot(), now, SystemTime::now());
                    if shard.state.deadline().is_some_and(|d| d <= now) {
                        let _ = self.commit(&mut shard).await;
                    }
                }
                ShardMsg::Flush { reply } => {
                    let _ = reply.send(self.commit(&mut shard).await);
                }
                ShardMsg::Status { reply } => {
                    let _ = reply.send(shard.state.status());
                }
                ShardMsg::Vehicle { fleet, device, reply } => {
                    let _ = reply.send(Ok(shard.state.vehicle(&fleet, &device)));
                }
                ShardMsg::Replay { items, subject, reply } => {
                    let prov = self.keys.snapshot();
                    let outcome = shard.state.replay(&items, &subject, Some(&prov), Instant::now(), SystemTime::now());
                    let _ = reply.send(self.commit(&mut shard).await.map(|()| outcome));
                }
            }
        }
    }

    /// Commits and releases acks and alerts; on failure recovers the shard from the
    /// store (retrying while the store is down) and says why the commit failed.
    async fn commit(&self, shard: &mut Shard) -> Result<(), ShardUnavailable> {
        let e = match shard.commit().await {
            Ok(released) => {
                for (gateway, ids) in released.acks {
                    let _ = self.released.send(Released::Acks { gateway, ids });
                }
                for e in released.alerts {
                    let _ = self.released.send(Released::Alert(e));
                }
                return Ok(());
            }
            Err(e) => e,
        };
        self.stats.emit(ev::CommitFailed { shard: shard.id(), error: &e });
        let mut backoff = fleetline_service::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while let Err(e) = shard.recover().await {
            tracing::error!(shard = shard.id(), error = %e, "shard recovery failed; retrying");
            backoff.wait().await;
        }
        for e in shard.state.take_resend() {
            let _ = self.released.send(Released::Alert(e));
        }
        Err(ShardUnavailable::CommitFailed { shard: shard.id(), why: e.to_string() })
    }
}
