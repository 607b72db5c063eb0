//! The node's internal events. Each type is one happening; its `emit` writes the
//! log line (if the happening deserves one), adds to the counter `/status` shows,
//! and to the Prometheus metric of the same meaning. Metric names live here and
//! nowhere else.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::CloudStats;

/// Something the node reports.
pub trait InternalEvent {
    /// Logs, counts and records it.
    fn emit(self, stats: &CloudStats);
}

#[inline]
fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A bundle taken from the broker by its shard.
pub struct BundleReceived;

impl InternalEvent for BundleReceived {
    #[inline]
    fn emit(self, s: &CloudStats) {
        add(&s.bundles_received, 1);
        metrics::counter!("fleetline_cloud_bundles_received_total").increment(1);
    }
}

/// Readings of new batches that passed validation.
pub struct SamplesAccepted(pub u64);

impl InternalEvent for SamplesAccepted {
    #[inline]
    fn emit(self, s: &CloudStats) {
        add(&s.samples_received, self.0);
        metrics::counter!("fleetline_cloud_samples_received_total").increment(self.0);
    }
}

/// A batch (or an unauthenticated dead letter) seen before: dropped, its bundle
/// still acked.
pub struct Duplicate;

impl InternalEvent for Duplicate {
    #[inline]
    fn emit(self, s: &CloudStats) {
        add(&s.duplicates, 1);
        metrics::counter!("fleetline_cloud_dedupe_hits_total").increment(1);
    }
}

/// Something that cannot be used, kept in the `deadletter` dataset.
pub struct DeadLettered<'a> {
    /// Shard.
    pub shard: u16,
    /// One of `crate::lake::reason`.
    pub reason: &'static str,
    /// In words.
    pub detail: &'a str,
}

impl InternalEvent for DeadLettered<'_> {
    fn emit(self, s: &CloudStats) {
        super::bump(&s.deadletters, self.reason);
        metrics::counter!("fleetline_cloud_deadletters_total", "reason" => self.reason).increment(1);
        tracing::debug!(shard = self.shard, reason = self.reason, detail = self.detail, "dead letter");
    }
}

/// A dead letter over its sender's allowance: counted, not kept.
pub struct DeadLetterOverQuota {
    /// Shard.
    pub shard: u16,
    /// One of `crate::lake::reason`.
    pub reason: &'static str,
    /// Its size.
    pub bytes: u64,
}

impl InternalEvent for DeadLetterOverQuota {
    fn emit(self, s: &CloudStats) {
        super::bump(&s.deadletters_over_quota, self.reason);
        metrics::counter!("fleetline_cloud_deadletters_over_quota_total", "reason" => self.reason).increment(1);
        metrics::counter!("fleetline_cloud_deadletter_bytes_over_quota_total").increment(self.bytes);
        tracing::debug!(
            shard = self.shard,
            reason = self.reason,
            bytes = self.bytes,
            "dead letter over quota, dropped"
        );
    }
}

/// Analytics processed a batch: windows closed, readings that came late, gaps skipped.
pub struct AnalyticsAdvanced {
    /// Aggregate rows produced.
    pub aggregates: u64,
    /// Readings that reached analytics behind their device's watermark.
    pub late_samples: u64,
    /// Missing batches skipped after the gap timeout.
    pub gaps_skipped: u64,
}

impl InternalEvent for AnalyticsAdvanced {
    #[inline]
    fn emit(self, s: &CloudStats) {
        add(&s.aggregates, self.aggregates);
        add(&s.late_samples, self.late_samples);
        add(&s.gaps_skipped, self.gaps_skipped);
        metrics::counter!("fleetline_cloud_aggregates_total").increment(self.aggregates);
        metrics::counter!("fleetline_cloud_late_samples_total").increment(self.late_samples);
        metrics::counter!("fleetline_cloud_analytics_gaps_skipped_total").increment(self.gaps_skipped);
    }
}

/// A detector raised an event.
pub struct EventRaised<'a> {
    /// Event kind.
    pub kind: &'static str,
    /// Fleet.
    pub fleet: &'a str,
    /// Device.
    pub device: &'a str,
}

impl InternalEvent for EventRaised<'_> {
    fn emit(self, s: &CloudStats) {
        super::bump(&s.events, self.kind);
        metrics::counter!("fleetline_cloud_events_total", "kind" => self.kind).increment(1);
        tracing::debug!(kind = self.kind, fleet = self.fleet, device = self.device, "event raised");
    }
}

/// Dead letters taken in again by a replay.
pub struct Replayed(pub u64);

impl InternalEvent for Replayed {
    fn emit(self, s: &CloudStats) {
        add(&s.replayed, self.0);
        metrics::counter!("fleetline_cloud_deadletters_replayed_total").increment(self.0);
        tracing::info!(replayed = self.0, "dead letters taken in again");
    }
}

/// A shard committed a segment.
pub struct Committed {
    /// Shard.
    pub shard: u16,
    /// Its new generation.
    pub generation: u64,
    /// Readings rows it stored.
    pub readings: u64,
    /// Batches it stored.
    pub batches: u64,
    /// Files it published.
    pub files: u64,
    /// Parquet bytes written.
    pub bytes: u64,
    /// When, Unix ms.
    pub at_ms: i64,
    /// How long the commit took.
    pub took: Duration,
}

impl InternalEvent for Committed {
    fn emit(self, s: &CloudStats) {
        add(&s.commits, 1);
        add(&s.readings_stored, self.readings);
        add(&s.batches_stored, self.batches);
        add(&s.bytes_written, self.bytes);
        s.last_commit_ms.store(self.at_ms, Ordering::Relaxed);
        metrics::counter!("fleetline_cloud_commits_total").increment(1);
        metrics::counter!("fleetline_cloud_readings_stored_total").increment(self.readings);
        metrics::counter!("fleetline_cloud_batches_stored_total").increment(self.batches);
        metrics::counter!("fleetline_cloud_bytes_written_total").increment(self.bytes);
        metrics::histogram!("fleetline_cloud_commit_seconds").record(self.took.as_secs_f64());
        tracing::debug!(shard = self.shard, generation = self.generation, files = self.files, "committed");
    }
}

/// A commit failed; the shard recovers from the store and acks nothing of it.
pub struct CommitFailed<'a> {
    /// Shard.
    pub shard: u16,
    /// Why.
    pub error: &'a dyn Display,
}

impl InternalEvent for CommitFailed<'_> {
    fn emit(self, s: &CloudStats) {
        add(&s.commit_failures, 1);
        metrics::counter!("fleetline_cloud_commit_failures_total").increment(1);
        tracing::error!(shard = self.shard, error = %self.error, "commit failed; recovering the shard from the store");
    }
}

/// Recovery removed a file staged by a segment that never reached its checkpoint.
pub struct OrphanRemoved<'a> {
    /// Shard.
    pub shard: u16,
    /// The staged object.
    pub file: &'a str,
}

impl InternalEvent for OrphanRemoved<'_> {
    fn emit(self, s: &CloudStats) {
        add(&s.orphans_removed, 1);
        metrics::counter!("fleetline_cloud_orphans_removed_total").increment(1);
        tracing::info!(shard = self.shard, file = self.file, "removed a file staged by an uncommitted segment");
    }
}

/// This node claimed a shard's head: from now on only it can commit for the shard.
pub struct ShardClaimed<'a> {
    /// Shard.
    pub shard: u16,
    /// The claim number.
    pub claim: u64,
    /// Lease epoch.
    pub epoch: u64,
    /// Who held it before (`None`: released, or never held).
    pub from: Option<&'a str>,
    /// The committed generation it starts from.
    pub generation: u64,
}

impl InternalEvent for ShardClaimed<'_> {
    fn emit(self, s: &CloudStats) {
        add(&s.claims, 1);
        metrics::counter!("fleetline_cloud_shard_claims_total").increment(1);
        tracing::info!(
            shard = self.shard,
            claim = self.claim,
            epoch = self.epoch,
            from = self.from.unwrap_or("-"),
            generation = self.generation,
            "claimed the shard"
        );
    }
}

/// A commit lost the swap of its shard's head: another node claimed the shard.
/// Nothing of the segment was acked; the shard is dropped here.
pub struct FencedOut<'a> {
    /// Shard.
    pub shard: u16,
    /// This node's claim, now stale.
    pub claim: u64,
    /// The generation it tried to commit.
    pub generation: u64,
    /// Who holds the shard now.
    pub by: &'a str,
}

impl InternalEvent for FencedOut<'_> {
    fn emit(self, s: &CloudStats) {
        add(&s.fencing_refusals, 1);
        metrics::counter!("fleetline_cloud_fencing_refusals_total").increment(1);
        tracing::warn!(
            shard = self.shard,
            claim = self.claim,
            generation = self.generation,
            by = self.by,
            "fenced out: another node claimed the shard; dropping it, nothing of this segment acked"
        );
    }
}

/// A shard's task ended (the node stopping, a handover, or fenced out).
pub struct ShardEnded<'a> {
    /// Shard.
    pub shard: u16,
    /// Handed over (`None`: stopped with the node), or lost to whom (`Some`).
    pub lost_to: Option<&'a str>,
    /// Released its head (a graceful handover).
    pub released: bool,
}

impl InternalEvent for ShardEnded<'_> {
    fn emit(self, _: &CloudStats) {
        match (self.lost_to, self.released) {
            (Some(by), _) => tracing::warn!(shard = self.shard, by, "shard lost to another node"),
            (None, true) => tracing::info!(shard = self.shard, "shard handed over: committed and released"),
            (None, false) => tracing::debug!(shard = self.shard, "shard stopped"),
        }
    }
}

/// The node acts on a new stable member set.
pub struct MembershipChanged<'a> {
    /// Members now.
    pub members: &'a [&'a str],
    /// Members before (`None`: the first view).
    pub before: Option<&'a [&'a str]>,
    /// Members of more than one version: live shards stay put.
    pub rollout: bool,
}

impl InternalEvent for MembershipChanged<'_> {
    fn emit(self, _: &CloudStats) {
        metrics::counter!("fleetline_cloud_membership_changes_total").increment(1);
        metrics::gauge!("fleetline_cloud_members").set(self.members.len() as f64);
        // `time() - this` is the time since the last change.
        metrics::gauge!("fleetline_cloud_membership_changed_timestamp_seconds")
            .set(fleetline_service::unix_ms() as f64 / 1000.0);
        let joined: Vec<&str> =
            self.members.iter().copied().filter(|m| !self.before.is_some_and(|b| b.contains(m))).collect();
        let left: Vec<&str> =
            self.before.unwrap_or_default().iter().copied().filter(|m| !self.members.contains(m)).collect();
        tracing::info!(
            members = ?self.members,
            joined = ?joined,
            left = ?left,
            rollout = self.rollout,
            "membership changed"
        );
    }
}

/// The backlog of the shards this node runs, sampled: what an autoscaler reads.
/// Per node it falls as nodes are added (each runs fewer shards).
pub struct Backlog<'a> {
    /// Shards in the keyspace (the gauges of shards not run here go to zero).
    pub shard_count: u16,
    /// Per shard run here: (shard, open records, open bytes, oldest uncommitted seconds).
    pub shards: &'a [(u16, u64, u64, f64)],
}

impl InternalEvent for Backlog<'_> {
    fn emit(self, _: &CloudStats) {
        let (mut records, mut bytes, mut oldest) = (0u64, 0u64, 0f64);
        for s in 0..self.shard_count {
            let (r, b, age) = self.shards.iter().find(|x| x.0 == s).map_or((0, 0, 0.0), |&(_, r, b, age)| (r, b, age));
            let shard = s.to_string();
            metrics::gauge!("fleetline_cloud_shard_backlog_records", "shard" => shard.clone()).set(r as f64);
            metrics::gauge!("fleetline_cloud_shard_backlog_bytes", "shard" => shard.clone()).set(b as f64);
            metrics::gauge!("fleetline_cloud_shard_oldest_uncommitted_seconds", "shard" => shard).set(age);
            records += r;
            bytes += b;
            oldest = oldest.max(age);
        }
        metrics::gauge!("fleetline_cloud_backlog_records").set(records as f64);
        metrics::gauge!("fleetline_cloud_backlog_bytes").set(bytes as f64);
        metrics::gauge!("fleetline_cloud_oldest_uncommitted_seconds").set(oldest);
    }
}

/// How many shards this node runs now, by state.
pub struct ShardsHeld {
    /// Owned (taking bundles).
    pub owned: usize,
    /// Being taken (claiming, recovering).
    pub acquiring: usize,
    /// Being handed over.
    pub draining: usize,
}

impl InternalEvent for ShardsHeld {
    fn emit(self, _: &CloudStats) {
        for (state, n) in [("owned", self.owned), ("acquiring", self.acquiring), ("draining", self.draining)] {
            metrics::gauge!("fleetline_cloud_shards", "state" => state).set(n as f64);
        }
    }
}

/// This node took a shard (claimed, recovered, subscribed).
pub struct ShardTaken<'a> {
    /// Shard.
    pub shard: u16,
    /// Why it could take it.
    pub why: &'a str,
    /// From when the shard was placed here to subscribed.
    pub took: Duration,
}

impl InternalEvent for ShardTaken<'_> {
    fn emit(self, _: &CloudStats) {
        metrics::counter!("fleetline_cloud_shards_taken_total").increment(1);
        metrics::histogram!("fleetline_cloud_shard_take_seconds").record(self.took.as_secs_f64());
        tracing::info!(shard = self.shard, why = self.why, took_ms = self.took.as_millis() as u64, "shard taken");
    }
}

/// This node handed a shard over (committed, acked, released its head).
pub struct ShardHandedOver<'a> {
    /// Shard.
    pub shard: u16,
    /// The member it goes to (`None`: nobody, the node is draining alone).
    pub to: Option<&'a str>,
    /// How long the commit and release took.
    pub took: Duration,
}

impl InternalEvent for ShardHandedOver<'_> {
    fn emit(self, _: &CloudStats) {
        metrics::counter!("fleetline_cloud_handovers_total").increment(1);
        tracing::info!(
            shard = self.shard,
            to = self.to.unwrap_or("-"),
            took_ms = self.took.as_millis() as u64,
            "shard handed over"
        );
    }
}

/// A shard cannot be opened; readiness is false while it is down.
pub struct ShardDown<'a> {
    /// Shard.
    pub shard: u16,
    /// Why.
    pub why: &'a str,
}

impl InternalEvent for ShardDown<'_> {
    fn emit(self, s: &CloudStats) {
        let down = s.shards_down.lock().map(|mut m| {
            m.insert(self.shard, self.why.to_string());
            m.len()
        });
        metrics::gauge!("fleetline_cloud_shards_down").set(down.unwrap_or_default() as f64);
        tracing::error!(shard = self.shard, error = self.why, "shard is down");
    }
}

/// A shard is open (again).
pub struct ShardUp(pub u16);

impl InternalEvent for ShardUp {
    fn emit(self, s: &CloudStats) {
        let (was_down, down) =
            s.shards_down.lock().map(|mut m| (m.remove(&self.0).is_some(), m.len())).unwrap_or_default();
        metrics::gauge!("fleetline_cloud_shards_down").set(down as f64);
        if was_down {
            tracing::info!(shard = self.0, "shard is up again");
        }
    }
}

/// A bundle for a shard that is down, left unacked (the gateway sends it again).
pub struct BundleForDownShard;

impl InternalEvent for BundleForDownShard {
    fn emit(self, s: &CloudStats) {
        add(&s.bundles_shard_down, 1);
        metrics::counter!("fleetline_cloud_bundles_shard_down_total").increment(1);
    }
}

/// A message on a topic of no shard owned here.
pub struct Misrouted<'a> {
    /// Its topic.
    pub topic: &'a str,
}

impl InternalEvent for Misrouted<'_> {
    fn emit(self, s: &CloudStats) {
        add(&s.misrouted, 1);
        metrics::counter!("fleetline_cloud_misrouted_bundles_total").increment(1);
        // Expected around handovers (a message in flight as the shard left): the
        // bundle is left unacked and its gateway sends it again, to the new owner.
        tracing::debug!(topic = self.topic, "message on a topic of no shard owned here");
    }
}

/// The session with the ingest broker is up.
pub struct BrokerConnected<'a> {
    /// Broker host.
    pub host: &'a str,
    /// Broker port.
    pub port: u16,
    /// Shards subscribed.
    pub shards: usize,
}

impl InternalEvent for BrokerConnected<'_> {
    fn emit(self, s: &CloudStats) {
        s.broker_connected.store(true, Ordering::Relaxed);
        metrics::gauge!("fleetline_cloud_broker_connected").set(1.0);
        tracing::info!(host = self.host, port = self.port, shards = self.shards, "connected to the ingest broker");
    }
}

/// The session with the ingest broker failed, or could not be opened.
pub struct BrokerLost<'a> {
    /// Why.
    pub error: &'a dyn Display,
}

impl InternalEvent for BrokerLost<'_> {
    fn emit(self, s: &CloudStats) {
        metrics::gauge!("fleetline_cloud_broker_connected").set(0.0);
        if s.broker_connected.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %self.error, "ingest broker connection lost");
        } else {
            tracing::debug!(error = %self.error, "ingest broker unreachable");
        }
    }
}

/// The node left the broker on purpose (stopping).
pub struct BrokerLeft;

impl InternalEvent for BrokerLeft {
    fn emit(self, s: &CloudStats) {
        s.broker_connected.store(false, Ordering::Relaxed);
        metrics::gauge!("fleetline_cloud_broker_connected").set(0.0);
        tracing::info!("disconnected from the ingest broker");
    }
}

/// Bundle ids acked to a gateway.
pub struct AcksSent(pub u64);

impl InternalEvent for AcksSent {
    #[inline]
    fn emit(self, s: &CloudStats) {
        add(&s.acks_sent, self.0);
        metrics::counter!("fleetline_cloud_acks_sent_total").increment(self.0);
    }
}

/// An alert published for a stored event.
pub struct AlertSent;

impl InternalEvent for AlertSent {
    fn emit(self, s: &CloudStats) {
        add(&s.alerts_sent, 1);
        metrics::counter!("fleetline_cloud_alerts_sent_total").increment(1);
    }
}

/// An alert that could not be published (broker gone); the event stays in `events`.
pub struct AlertFailed;

impl InternalEvent for AlertFailed {
    fn emit(self, s: &CloudStats) {
        add(&s.alerts_failed, 1);
        metrics::counter!("fleetline_cloud_alerts_failed_total").increment(1);
        tracing::warn!("an alert could not be published; the event is stored");
    }
}

/// A changed provisioning file was refused; the previous keys stay.
pub struct ProvisioningRefused<'a> {
    /// Why.
    pub error: &'a dyn Display,
}

impl InternalEvent for ProvisioningRefused<'_> {
    fn emit(self, s: &CloudStats) {
        add(&s.provisioning_refused, 1);
        metrics::counter!("fleetline_cloud_provisioning_reloads_refused_total").increment(1);
        tracing::error!(error = %self.error, "provisioning file rejected; keeping the previous keys");
    }
}

/// A broker session ended because the key it opened with is no longer accepted.
pub struct SessionEndedByKeys<'a> {
    /// Its client id.
    pub client_id: &'a str,
}

impl InternalEvent for SessionEndedByKeys<'_> {
    fn emit(self, s: &CloudStats) {
        add(&s.sessions_ended_by_keys, 1);
        metrics::counter!("fleetline_cloud_sessions_ended_by_keys_total").increment(1);
        tracing::info!(client_id = self.client_id, "session ended: its login is no longer accepted");
    }
}

/// A model's deployment could not be loaded on this node (it keeps what it
/// ran before).
pub struct ModelLoadFailed<'a> {
    /// Model.
    pub model: &'static str,
    /// Why.
    pub error: &'a str,
}

impl InternalEvent for ModelLoadFailed<'_> {
    fn emit(self, _s: &CloudStats) {
        metrics::counter!("fleetline_cloud_model_load_failures_total", "model" => self.model).increment(1);
        tracing::error!(
            model = self.model,
            error = self.error,
            "cannot load the deployed model; keeping what ran before"
        );
    }
}

/// This node now scores with a new deployment.
pub struct ModelsDeployed<'a> {
    /// What changed, in words.
    pub models: &'a str,
}

impl InternalEvent for ModelsDeployed<'_> {
    fn emit(self, _s: &CloudStats) {
        metrics::counter!("fleetline_cloud_model_deployments_total").increment(1);
        tracing::info!(models = self.models, "models deployed");
    }
}

/// Predictions stored by a commit, per model and variant.
pub struct Predicted<'a> {
    /// Model.
    pub model: &'static str,
    /// Variant label or `shadow`.
    pub variant: &'a str,
    /// How many.
    pub n: u64,
}

impl InternalEvent for Predicted<'_> {
    fn emit(self, _s: &CloudStats) {
        metrics::counter!("fleetline_cloud_predictions_total", "model" => self.model, "variant" => self.variant.to_string())
            .increment(self.n);
    }
}

/// Feature rows not scored, by reason (`not_deployed`, `model_error`).
pub struct PredictionsSkipped {
    /// Model.
    pub model: &'static str,
    /// Why.
    pub reason: &'static str,
    /// How many.
    pub n: u64,
}

impl InternalEvent for PredictionsSkipped {
    fn emit(self, _s: &CloudStats) {
        metrics::counter!("fleetline_cloud_predictions_skipped_total", "model" => self.model, "reason" => self.reason)
            .increment(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_updates_its_status_entry() {
        let s = CloudStats::default();
        s.emit(DeadLettered { shard: 1, reason: "malformed", detail: "x" });
        s.emit(DeadLettered { shard: 1, reason: "malformed", detail: "y" });
        s.emit(ShardDown { shard: 3, why: "damaged" });
        assert!(!s.shards_down().is_empty());
        s.emit(ShardUp(3));
        s.emit(Committed {
            shard: 0,
            generation: 1,
            readings: 5,
            batches: 1,
            files: 1,
            bytes: 10,
            at_ms: 7,
            took: Duration::ZERO,
        });
        assert_eq!(s.deadletters().get("malformed"), Some(&2));
        assert!(s.shards_down().is_empty());
        assert_eq!(CloudStats::get(&s.readings_stored), 5);
        assert_eq!(s.last_commit_ms.load(Ordering::Relaxed), 7);
    }
}
