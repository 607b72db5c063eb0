//! Counters of the cloud node, for `/status` and, mirrored, `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// Counters, shared by every task of the node.
#[derive(Debug, Default)]
pub struct CloudStats {
    /// Bundles taken from the broker.
    pub bundles_received: AtomicU64,
    /// Samples decoded from new batches.
    pub samples_received: AtomicU64,
    /// Batches (or unauthenticated dead letters) seen before: dedupe hits.
    pub duplicates: AtomicU64,
    /// Readings rows committed.
    pub readings_stored: AtomicU64,
    /// Batches committed.
    pub batches_stored: AtomicU64,
    /// Commits.
    pub commits: AtomicU64,
    /// Commits that failed (the shard recovered from the store).
    pub commit_failures: AtomicU64,
    /// Parquet bytes written.
    pub bytes_written: AtomicU64,
    /// Staged files of uncommitted segments removed at recovery.
    pub orphans_removed: AtomicU64,
    /// Bundle acks published.
    pub acks_sent: AtomicU64,
    /// Bundles for shards this node does not own, or unparsable topics.
    pub misrouted: AtomicU64,
    /// Last commit of any shard, Unix ms.
    pub last_commit_ms: AtomicI64,
    /// Connected to the broker.
    pub broker_connected: AtomicBool,
    /// Every shard recovered and the broker subscription in place.
    pub ready: AtomicBool,
    /// Samples that reached analytics after their device's watermark (stored, not aggregated).
    pub late_samples: AtomicU64,
    /// Missing batches analytics skipped after the gap timeout.
    pub gaps_skipped: AtomicU64,
    /// Aggregate rows produced.
    pub aggregates: AtomicU64,
    /// Dead letters taken in again by a replay.
    pub replayed: AtomicU64,
    /// Alerts published.
    pub alerts_sent: AtomicU64,
    /// Alerts that could not be published (broker gone); they stay in `events`.
    pub alerts_failed: AtomicU64,
    /// Shards owned here that are down, and why (a damaged checkpoint, files
    /// beyond the checkpoint, a store that cannot be read). Readiness is false
    /// while any is.
    pub shards_down: Mutex<BTreeMap<u16, String>>,
    /// Bundles for a shard that is down, left unacked (the gateway sends them again).
    pub bundles_shard_down: AtomicU64,
    /// Provisioning reloads refused (unparsable, or dropping too many entries).
    pub provisioning_refused: AtomicU64,
    /// Broker sessions ended because the key they opened with is no longer accepted.
    pub sessions_ended_by_keys: AtomicU64,
    /// Refused gateway logins (embedded broker), by reason.
    pub logins_rejected: Mutex<BTreeMap<&'static str, u64>>,
    deadletters: Mutex<BTreeMap<&'static str, u64>>,
    events: Mutex<BTreeMap<String, u64>>,
}

impl CloudStats {
    /// Adds to a counter and to its Prometheus twin.
    pub fn count(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Counts a dead letter by reason.
    pub fn deadletter(&self, reason: &'static str) {
        if let Ok(mut m) = self.deadletters.lock() {
            *m.entry(reason).or_default() += 1;
        }
        metrics::counter!("fleetline_cloud_deadletters_total", "reason" => reason).increment(1);
    }

    /// Counts an event by kind.
    pub fn event(&self, kind: &str) {
        if let Ok(mut m) = self.events.lock() {
            *m.entry(kind.to_string()).or_default() += 1;
        }
        metrics::counter!("fleetline_cloud_events_total", "kind" => kind.to_string()).increment(1);
    }

    /// Events by kind.
    pub fn events(&self) -> BTreeMap<String, u64> {
        self.events.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Dead letters by reason.
    pub fn deadletters(&self) -> BTreeMap<&'static str, u64> {
        self.deadletters.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Shard `shard` is down, for `why`.
    pub fn shard_down(&self, shard: u16, why: &str) {
        if let Ok(mut down) = self.shards_down.lock() {
            down.insert(shard, why.to_string());
        }
    }

    /// Shard `shard` is up.
    pub fn shard_up(&self, shard: u16) {
        if let Ok(mut down) = self.shards_down.lock() {
            down.remove(&shard);
        }
    }

    /// Owned shards that are down, and why.
    pub fn shards_down(&self) -> BTreeMap<u16, String> {
        self.shards_down.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Ready: recovered, subscribed, and no owned shard down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.shards_down().is_empty()
    }

    /// Sets the Prometheus gauges and counters from the atomics (before a scrape).
    pub fn export(&self) {
        let pairs: [(&str, &AtomicU64); 20] = [
            ("fleetline_cloud_provisioning_reloads_refused_total", &self.provisioning_refused),
            ("fleetline_cloud_sessions_ended_by_keys_total", &self.sessions_ended_by_keys),
            ("fleetline_cloud_bundles_shard_down_total", &self.bundles_shard_down),
            ("fleetline_cloud_deadletters_replayed_total", &self.replayed),
            ("fleetline_cloud_late_samples_total", &self.late_samples),
            ("fleetline_cloud_analytics_gaps_skipped_total", &self.gaps_skipped),
            ("fleetline_cloud_aggregates_total", &self.aggregates),
            ("fleetline_cloud_alerts_sent_total", &self.alerts_sent),
            ("fleetline_cloud_alerts_failed_total", &self.alerts_failed),
            ("fleetline_cloud_bundles_received_total", &self.bundles_received),
            ("fleetline_cloud_samples_received_total", &self.samples_received),
            ("fleetline_cloud_dedupe_hits_total", &self.duplicates),
            ("fleetline_cloud_readings_stored_total", &self.readings_stored),
            ("fleetline_cloud_batches_stored_total", &self.batches_stored),
            ("fleetline_cloud_commits_total", &self.commits),
            ("fleetline_cloud_commit_failures_total", &self.commit_failures),
            ("fleetline_cloud_bytes_written_total", &self.bytes_written),
            ("fleetline_cloud_orphans_removed_total", &self.orphans_removed),
            ("fleetline_cloud_acks_sent_total", &self.acks_sent),
            ("fleetline_cloud_misrouted_bundles_total", &self.misrouted),
        ];
        for (name, c) in pairs {
            metrics::counter!(name).absolute(Self::get(c));
        }
        metrics::gauge!("fleetline_cloud_shards_down").set(self.shards_down().len() as f64);
        metrics::gauge!("fleetline_cloud_broker_connected")
            .set(f64::from(u8::from(self.broker_connected.load(Ordering::Relaxed))));
    }
}

impl fleetline_broker::FrontEvents for CloudStats {
    fn login_refused(&self, reason: &'static str) {
        metrics::counter!("fleetline_cloud_rejected_logins_total", "reason" => reason).increment(1);
        if let Ok(mut m) = self.logins_rejected.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    fn tls_session(&self) {
        metrics::counter!("fleetline_cloud_tls_sessions_total").increment(1);
    }

    fn tls_failed(&self) {
        metrics::counter!("fleetline_cloud_tls_handshakes_failed_total").increment(1);
    }

    fn tls_timed_out(&self) {
        metrics::counter!("fleetline_cloud_tls_handshakes_timed_out_total").increment(1);
    }
}
