//! What the node reports about itself: counters and state for `/status`, the
//! Prometheus metrics, and log lines. Every happening is a typed event
//! ([`events`]) whose `emit` is the one place that writes its log line, its
//! counter and its status entry, so the three never disagree.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

pub mod events;

pub use events::InternalEvent;

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
    /// Shards claimed (taken over or picked up) by this node.
    pub claims: AtomicU64,
    /// Commits refused because another node had claimed the shard (this node was
    /// fenced out and dropped the shard).
    pub fencing_refusals: AtomicU64,
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
    /// Embedded broker sessions ended for a packet outside the login's grants, by reason.
    pub packets_refused: Mutex<BTreeMap<&'static str, u64>>,
    pub(crate) deadletters: Mutex<BTreeMap<&'static str, u64>>,
    pub(crate) deadletters_over_quota: Mutex<BTreeMap<&'static str, u64>>,
    pub(crate) events: Mutex<BTreeMap<&'static str, u64>>,
    /// The node's backlog (open records, open bytes), sampled every
    /// [`LOAD_SAMPLE_EVERY`] over the last [`LOAD_WINDOW`]: an autoscaler's steady
    /// signal (the instant backlog swings between a segment's fill and zero at
    /// each commit).
    pub(crate) load_window: Mutex<std::collections::VecDeque<LoadPoint>>,
}

/// Counts one more under `key`.
pub(crate) fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key).or_default() += 1;
    }
}

/// One sample of the node's load.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoadPoint {
    at: std::time::Instant,
    records: u64,
    bytes: u64,
    /// `samples_received` then.
    taken: u64,
}

/// The node's load over the last [`LOAD_WINDOW`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MeanLoad {
    /// Records in open segments, mean.
    pub records: u64,
    /// Bytes taken and not committed, mean.
    pub bytes: u64,
    /// Records taken per second.
    pub records_per_second: f64,
}

/// How long the backlog is averaged over for `/scaling/load`.
pub const LOAD_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the backlog is sampled.
pub const LOAD_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl CloudStats {
    /// Emits an event: its log line, counter and status entry.
    #[inline]
    pub fn emit(&self, event: impl InternalEvent) {
        event.emit(self);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Events by kind.
    pub fn events(&self) -> BTreeMap<&'static str, u64> {
        self.events.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Dead letters by reason.
    pub fn deadletters(&self) -> BTreeMap<&'static str, u64> {
        self.deadletters.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Dead letters over their sender's allowance (dropped), by reason.
    pub fn deadletters_over_quota(&self) -> BTreeMap<&'static str, u64> {
        self.deadletters_over_quota.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Owned shards that are down, and why.
    pub fn shards_down(&self) -> BTreeMap<u16, String> {
        self.shards_down.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Adds a backlog sample (open records, bytes taken and not committed),
    /// dropping those older than the window.
    pub fn sample_load(&self, records: u64, bytes: u64) {
        let taken = Self::get(&self.samples_received);
        if let Ok(mut w) = self.load_window.lock() {
            w.push_back(LoadPoint { at: std::time::Instant::now(), records, bytes, taken });
            let keep = (LOAD_WINDOW.as_millis() / LOAD_SAMPLE_EVERY.as_millis()) as usize;
            while w.len() > keep {
                w.pop_front();
            }
        }
    }

    /// The load over the window; zero before the first samples.
    pub fn mean_load(&self) -> MeanLoad {
        let Ok(w) = self.load_window.lock() else { return MeanLoad::default() };
        let (Some(first), Some(last)) = (w.front(), w.back()) else { return MeanLoad::default() };
        let n = w.len() as u64;
        let (r, b) = w.iter().fold((0u64, 0u64), |(r, b), x| (r + x.records, b + x.bytes));
        let secs = last.at.duration_since(first.at).as_secs_f64();
        let records_per_second = if secs > 0.0 { last.taken.saturating_sub(first.taken) as f64 / secs } else { 0.0 };
        MeanLoad { records: r.div_ceil(n), bytes: b.div_ceil(n), records_per_second }
    }

    /// Ready: recovered, subscribed, and no owned shard down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.shards_down().is_empty()
    }
}

impl fleetline_broker::FrontEvents for CloudStats {
    fn login_refused(&self, reason: &'static str) {
        metrics::counter!("fleetline_cloud_rejected_logins_total", "reason" => reason).increment(1);
        bump(&self.logins_rejected, reason);
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

    fn packet_refused(&self, reason: &'static str) {
        metrics::counter!("fleetline_cloud_refused_packets_total", "reason" => reason).increment(1);
        bump(&self.packets_refused, reason);
    }
}
