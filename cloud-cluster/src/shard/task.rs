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
use super::head::Writer;
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

/// Why a shard task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Its mailbox closed (the node is stopping); what it held is committed.
    Stopped,
    /// Handed over: committed and the head released.
    Released,
    /// Another node claimed the shard; nothing this one held was acked.
    Fenced {
        /// Who holds it now, as far as known.
        by: String,
    },
}

/// How a commit inside the task went.
enum Outcome {
    Done,
    /// Failed; the shard recovered from the store.
    Failed(ShardUnavailable),
    /// Another node holds the shard.
    Fenced(String),
}

/// What a shard task needs to open its shard (again) and run it.
#[derive(Clone)]
pub struct ShardSetup {
    /// The lake.
    pub store: Store,
    /// Shards in the keyspace.
    pub shard_count: u16,
    /// This node's id (written into checkpoints and the head).
    pub node: String,
    /// The lease epoch it writes under (0 without leases).
    pub epoch: u64,
    /// When segments commit.
    pub segment: SegmentConfig,
    /// The schema registry.
    pub registry: Arc<Registry>,
    /// The model registry (what scores closed windows).
    pub models: Option<Arc<crate::inference::ModelRegistry>>,
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
    /// Dead-letter bytes per sender, shared by the node's shards.
    pub deadletter_quota: Arc<super::DeadLetterQuota>,
}

impl ShardSetup {
    /// Opens shard `id` with the datasets already listed.
    pub async fn open(&self, id: u16, published: &Published) -> Result<Shard, ShardError> {
        Shard::open_with(
            self.store.clone(),
            id,
            self.shard_count,
            Writer { node: self.node.clone(), epoch: self.epoch },
            self.segment.clone(),
            self.stats.clone(),
            published,
        )
        .await
    }

    /// Runs shard `id` until its mailbox closes, it is released, or another node
    /// claims it, starting from `opened` (the shard, or why it could not be opened);
    /// commits what it holds before it ends (unless fenced out).
    pub async fn run(self, id: u16, opened: Result<Shard, ShardError>, mut inbox: super::Inbox) -> Ended {
        let mut shard = match self.wait_until_open(id, opened, &mut inbox).await {
            Ok(shard) => shard,
            Err(ended) => return ended,
        };
        shard.state.set_registry(self.registry.clone());
        if let Some(models) = &self.models {
            shard.set_models(models.clone());
        }
        shard.state.set_deadletter_quota(self.deadletter_quota.clone());
        shard.state.set_validation(self.validation.clone());
        shard.state.set_analytics(self.analytics.clone());
        // Alerts of the last commit before a restart may not have left: again, same ids.
        for e in shard.state.take_resend() {
            let _ = self.released.send(Released::Alert(e));
        }
        let ended = self.serve(shard, inbox).await;
        let lost_to = match &ended {
            Ended::Fenced { by } => Some(by.as_str()),
            _ => None,
        };
        self.stats.emit(ev::ShardEnded { shard: id, lost_to, released: ended == Ended::Released });
        ended
    }

    /// While the shard is down: answers requests with why, retries with backoff.
    /// Ends when the mailbox closes or is asked to release first, or when another
    /// node claimed the shard.
    async fn wait_until_open(
        &self,
        id: u16,
        mut opened: Result<Shard, ShardError>,
        inbox: &mut super::Inbox,
    ) -> Result<Shard, Ended> {
        let mut backoff = fleetline_service::Backoff::new(Duration::from_secs(1), SHARD_RETRY_MAX);
        loop {
            let why = match opened {
                Ok(shard) => {
                    self.stats.emit(ev::ShardUp(id));
                    return Ok(shard);
                }
                Err(ShardError::Fenced { by, .. }) => {
                    self.stats.emit(ev::ShardUp(id));
                    return Err(Ended::Fenced { by });
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
                    msg = inbox.recv() => match msg.ok_or(Ended::Stopped)? {
                        ShardMsg::Bundle { .. } => self.stats.emit(ev::BundleForDownShard),
                        ShardMsg::Flush { reply } => { let _ = reply.send(Err(down())); }
                        ShardMsg::Release { reply } => {
                            // Never opened, never claimed here beyond the head it could not load.
                            self.stats.emit(ev::ShardUp(id));
                            let _ = reply.send(Ok(()));
                            return Err(Ended::Released);
                        }
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
    async fn serve(&self, mut shard: Shard, mut inbox: super::Inbox) -> Ended {
        let id = shard.id();
        let fenced = |by: String| Ended::Fenced { by };
        loop {
            // What the load signals read: the open segment as it stands now.
            inbox.load().set_open(shard.state.open_rows() as u64, shard.state.open_bytes(), shard.state.opened_at());
            let msg = match shard.state.deadline() {
                Some(d) => tokio::select! {
                    m = inbox.recv() => m,
                    _ = tokio::time::sleep_until(d.into()) => {
                        if let Outcome::Fenced(by) = self.commit(&mut shard).await {
                            return fenced(by);
                        }
                        continue;
                    }
                },
                None => inbox.recv().await,
            };
            let Some(msg) = msg else {
                // Shutting down: make what is held durable and acked.
                return match self.commit(&mut shard).await {
                    Outcome::Fenced(by) => fenced(by),
                    _ => Ended::Stopped,
                };
            };
            match msg {
                ShardMsg::Bundle { payload } => {
                    let now = Instant::now();
                    shard.state.ingest(&payload, &self.keys.snapshot(), now, SystemTime::now());
                    if shard.state.deadline().is_some_and(|d| d <= now)
                        && let Outcome::Fenced(by) = self.commit(&mut shard).await
                    {
                        return fenced(by);
                    }
                }
                ShardMsg::Flush { reply } => match self.commit(&mut shard).await {
                    Outcome::Done => {
                        let _ = reply.send(Ok(()));
                    }
                    Outcome::Failed(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Outcome::Fenced(by) => {
                        let _ = reply.send(Err(ShardUnavailable::NotOwned { shard: id }));
                        return fenced(by);
                    }
                },
                ShardMsg::Release { reply } => {
                    match self.commit(&mut shard).await {
                        Outcome::Done => {}
                        Outcome::Failed(e) => {
                            // Keep it: the handover is tried again.
                            let _ = reply.send(Err(e));
                            continue;
                        }
                        Outcome::Fenced(by) => {
                            let _ = reply.send(Ok(()));
                            return fenced(by);
                        }
                    }
                    return match shard.release().await {
                        Ok(()) => {
                            let _ = reply.send(Ok(()));
                            Ended::Released
                        }
                        Err(ShardError::Fenced { by, .. }) => {
                            let _ = reply.send(Ok(()));
                            fenced(by)
                        }
                        Err(e) => {
                            // Everything held is committed and acked; the head still
                            // names this node, so the next owner takes it over after
                            // its handover timeout (fencing keeps that safe).
                            tracing::warn!(shard = id, error = %e, "could not release the shard's head");
                            let _ = reply.send(Ok(()));
                            Ended::Released
                        }
                    };
                }
                ShardMsg::Status { reply } => {
                    let mut status = shard.state.status();
                    status.oldest_uncommitted_ms = shard.state.opened_at().map(|t| t.elapsed().as_millis() as u64);
                    let _ = reply.send(status);
                }
                ShardMsg::Vehicle { fleet, device, reply } => {
                    let _ = reply.send(Ok(shard.state.vehicle(&fleet, &device)));
                }
                ShardMsg::Replay { items, subject, reply } => {
                    let prov = self.keys.snapshot();
                    let outcome = shard.state.replay(&items, &subject, Some(&prov), Instant::now(), SystemTime::now());
                    match self.commit(&mut shard).await {
                        Outcome::Done => {
                            let _ = reply.send(Ok(outcome));
                        }
                        Outcome::Failed(e) => {
                            let _ = reply.send(Err(e));
                        }
                        Outcome::Fenced(by) => {
                            let _ = reply.send(Err(ShardUnavailable::NotOwned { shard: id }));
                            return fenced(by);
                        }
                    }
                }
            }
        }
    }

    /// Commits and releases acks and alerts; on failure recovers the shard from the
    /// store (retrying while the store is down) and says why the commit failed.
    async fn commit(&self, shard: &mut Shard) -> Outcome {
        let e = match shard.commit().await {
            Ok(released) => {
                for (gateway, ids) in released.acks {
                    let _ = self.released.send(Released::Acks { gateway, ids });
                }
                for e in released.alerts {
                    let _ = self.released.send(Released::Alert(e));
                }
                return Outcome::Done;
            }
            Err(ShardError::Fenced { by, .. }) => return Outcome::Fenced(by),
            Err(e) => e,
        };
        self.stats.emit(ev::CommitFailed { shard: shard.id(), error: &e });
        let mut backoff = fleetline_service::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match shard.recover().await {
                Ok(()) => break,
                Err(ShardError::Fenced { by, .. }) => return Outcome::Fenced(by),
                Err(e) => {
                    tracing::error!(shard = shard.id(), error = %e, "shard recovery failed; retrying");
                    backoff.wait().await;
                }
            }
        }
        for e in shard.state.take_resend() {
            let _ = self.released.send(Released::Alert(e));
        }
        Outcome::Failed(ShardUnavailable::CommitFailed { shard: shard.id(), why: e.to_string() })
    }
}
