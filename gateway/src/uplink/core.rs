//! The uplink's decisions without I/O: what to bundle, when to send, what to resend,
//! how fast to drain a backlog, and what an ack releases.
//!
//! Records reach the uplink two ways. Fresh ones come from the queue's feed right
//! after they become durable (`live`); anything else — a backlog after an outage or
//! a restart, or records the feed skipped — is read back from disk from
//! `scan_cursor` up to the first live record. Live records are bundled first; the
//! backlog is drained at `backlog_rate` bytes per second and may use at most half of
//! the in-flight window, so fresh readings are never stuck behind hours of backlog.
//! A bundle stays in flight, in memory, until the cloud acks its id, and is re-sent
//! after `resend_after` and after every reconnect.
//!
//! Pure: no I/O, no clock, no runtime.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use fleetline_wire::DeviceKey;
use fleetline_wire::bundle::{BundleEntry, BundleId, Codec, seal_bundle};

use crate::queue::{RecordId, StoredRecord};

/// Limits of the uplink.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most batches per bundle.
    pub max_batches: usize,
    /// Most batch bytes per bundle.
    pub max_bytes: usize,
    /// Longest a batch waits for its bundle to fill, ms.
    pub max_age_ms: u64,
    /// Most bundles awaiting acks.
    pub max_in_flight: usize,
    /// Re-send a bundle after this long without an ack, ms.
    pub resend_after_ms: u64,
    /// Backlog drain rate, bytes per second.
    pub backlog_rate: u64,
    /// Send fresh data first.
    pub live_first: bool,
    /// Most bytes of fresh records held in memory (more are read back from disk).
    pub live_bytes: usize,
}

struct Pending {
    records: Vec<(RecordId, BundleEntry)>,
    bytes: usize,
    opened_ms: u64,
}

struct InFlight {
    shard: u16,
    records: Vec<RecordId>,
    payload: Vec<u8>,
    due_ms: u64,
    backlog: bool,
}

/// A bundle to publish on `fleetline/v1/ingest/{shard}`.
#[derive(Clone, Debug)]
pub struct Publish {
    /// Bundle id.
    pub id: BundleId,
    /// Shard.
    pub shard: u16,
    /// Sealed bundle.
    pub payload: Vec<u8>,
    /// Whether this is a re-send.
    pub resend: bool,
}

/// What an ack released.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Records to mark acknowledged in the queue.
    pub records: Vec<RecordId>,
    /// Bundles released.
    pub bundles: u64,
    /// Records that the queue had already dropped (drop-oldest) but that were in
    /// flight and reached the cloud after all.
    pub dropped_but_delivered: u64,
}

/// The uplink state machine.
pub struct UplinkCore {
    limits: Limits,
    gateway: String,
    key: DeviceKey,
    next_bundle: u64,
    live: VecDeque<StoredRecord>,
    live_bytes: usize,
    /// Next id expected on the feed; a different id means the feed skipped some.
    live_next: Option<RecordId>,
    scan_cursor: RecordId,
    scan_pending: bool,
    pending_live: BTreeMap<u16, Pending>,
    pending_backlog: BTreeMap<u16, Pending>,
    in_flight: HashMap<BundleId, InFlight>,
    /// Records in pending bundles or in flight: never read back from disk again.
    claimed: HashSet<RecordId>,
    dropped_in_flight: HashSet<RecordId>,
    tokens: f64,
    last_refill_ms: u64,
    connected: bool,
}

impl UplinkCore {
    /// A core starting with `first_unacked` as the backlog's beginning.
    pub fn new(limits: Limits, gateway: String, key: DeviceKey, first_unacked: RecordId, bundle_base: u64) -> Self {
        Self {
            limits,
            gateway,
            key,
            next_bundle: bundle_base,
            live: VecDeque::new(),
            live_bytes: 0,
            live_next: None,
            scan_cursor: first_unacked,
            scan_pending: false,
            pending_live: BTreeMap::new(),
            pending_backlog: BTreeMap::new(),
            in_flight: HashMap::new(),
            claimed: HashSet::new(),
            dropped_in_flight: HashSet::new(),
            tokens: 0.0,
            last_refill_ms: 0,
            connected: false,
        }
    }

    /// Bundles awaiting acks.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Fresh records held in memory.
    pub fn live_len(&self) -> usize {
        self.live.len()
    }

    /// A record just made durable.
    pub fn on_live(&mut self, rec: StoredRecord) {
        if !self.connected {
            // Nothing can be sent now: what arrives during an outage is backlog, read
            // back from disk (at the backlog rate) once the cloud is reachable again.
            self.live_next = Some(RecordId(rec.id.0 + 1));
            return;
        }
        if self.live_next.is_some_and(|next| next != rec.id) {
            // The feed skipped records: forget the in-memory copies below this one;
            // the backlog scan reads them from disk.
            self.live.clear();
            self.live_bytes = 0;
        }
        self.live_next = Some(RecordId(rec.id.0 + 1));
        self.live_bytes += rec.batch.len();
        self.live.push_back(rec);
        while self.live_bytes > self.limits.live_bytes {
            if let Some(r) = self.live.pop_front() {
                self.live_bytes -= r.batch.len();
            }
        }
    }

    /// Records deleted from the queue unacknowledged (drop-oldest): not sent any more
    /// unless already in flight.
    pub fn on_dropped(&mut self, ids: &[RecordId]) {
        let set: HashSet<RecordId> = ids.iter().copied().collect();
        self.live.retain(|r| !set.contains(&r.id));
        self.live_bytes = self.live.iter().map(|r| r.batch.len()).sum();
        for p in self.pending_live.values_mut().chain(self.pending_backlog.values_mut()) {
            for (id, _) in p.records.iter().filter(|(id, _)| set.contains(id)) {
                self.claimed.remove(id);
            }
            p.records.retain(|(id, _)| !set.contains(id));
            p.bytes = p.records.iter().map(|(_, e)| e.batch.len()).sum();
        }
        for f in self.in_flight.values() {
            self.dropped_in_flight.extend(f.records.iter().filter(|id| set.contains(id)));
        }
    }

    /// Where the backlog scan stops: the first fresh record, or the end of the feed.
    fn scan_limit(&self) -> Option<RecordId> {
        self.live.front().map(|r| r.id).or(self.live_next)
    }

    /// A backlog read to issue now, if any: (from, max records, max bytes).
    pub fn backlog_request(&mut self, now_ms: u64) -> Option<(RecordId, usize, usize)> {
        if !self.connected || self.scan_pending {
            return None;
        }
        if self.scan_limit().is_some_and(|limit| self.scan_cursor >= limit) {
            return None;
        }
        let backlog_in_flight = self.in_flight.values().filter(|f| f.backlog).count();
        let cap =
            if self.limits.live_first { (self.limits.max_in_flight / 2).max(1) } else { self.limits.max_in_flight };
        if backlog_in_flight >= cap
            || self.pending_backlog.values().map(|p| p.bytes).sum::<usize>() > self.limits.max_bytes * 4
        {
            return None;
        }
        self.refill(now_ms);
        if self.tokens < 1.0 {
            return None;
        }
        self.scan_pending = true;
        let bytes = (self.tokens as usize).clamp(1, self.limits.max_bytes);
        Some((self.scan_cursor, self.limits.max_batches, bytes))
    }

    fn refill(&mut self, now_ms: u64) {
        let rate = self.limits.backlog_rate as f64;
        let elapsed = now_ms.saturating_sub(self.last_refill_ms) as f64 / 1000.0;
        self.last_refill_ms = now_ms;
        // At most one second of burst.
        self.tokens = (self.tokens + elapsed * rate).min(rate);
    }

    /// Records read back from disk, and where the next read continues.
    pub fn on_backlog(&mut self, now_ms: u64, records: Vec<StoredRecord>, next: RecordId) {
        self.scan_pending = false;
        let limit = self.scan_limit();
        let mut cursor = next.max(self.scan_cursor);
        for rec in records {
            if limit.is_some_and(|l| rec.id >= l) {
                // From here on the feed has (or will have) the records.
                cursor = rec.id;
                break;
            }
            if self.claimed.contains(&rec.id) {
                continue;
            }
            self.tokens -= rec.batch.len() as f64;
            self.claimed.insert(rec.id);
            push(&mut self.pending_backlog, now_ms, rec);
        }
        if let Some(l) = limit {
            cursor = cursor.min(l);
        }
        self.scan_cursor = cursor;
    }

    /// Reading the backlog failed; retry later.
    pub fn on_backlog_failed(&mut self) {
        self.scan_pending = false;
    }

    /// A new MQTT session: nothing is in flight on the wire any more.
    pub fn on_connected(&mut self, now_ms: u64) {
        self.connected = true;
        for f in self.in_flight.values_mut() {
            f.due_ms = now_ms;
        }
    }

    /// The session dropped.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.live.clear();
        self.live_bytes = 0;
    }

    /// The next bundle to publish, if any: re-sends first, then fresh bundles, then backlog.
    pub fn poll_publish(&mut self, now_ms: u64) -> Option<Publish> {
        if !self.connected {
            return None;
        }
        // Re-sends.
        if let Some((id, f)) = self.in_flight.iter_mut().filter(|(_, f)| f.due_ms <= now_ms).min_by_key(|(id, _)| **id)
        {
            f.due_ms = now_ms + self.limits.resend_after_ms;
            return Some(Publish { id: *id, shard: f.shard, payload: f.payload.clone(), resend: true });
        }
        if self.in_flight.len() >= self.limits.max_in_flight {
            return None;
        }
        // Move fresh records into per-shard bundles. With no backlog behind them,
        // the scan has nothing to look at up to the end of the feed.
        let caught_up = self.live.front().is_some_and(|r| self.scan_cursor >= r.id);
        while let Some(rec) = self.live.pop_front() {
            self.live_bytes -= rec.batch.len();
            self.claimed.insert(rec.id);
            push(&mut self.pending_live, now_ms, rec);
        }
        if caught_up && let Some(next) = self.live_next {
            self.scan_cursor = self.scan_cursor.max(next);
        }
        if let Some(p) = self.take_ready(now_ms, false) {
            return Some(p);
        }
        let backlog_in_flight = self.in_flight.values().filter(|f| f.backlog).count();
        let cap =
            if self.limits.live_first { (self.limits.max_in_flight / 2).max(1) } else { self.limits.max_in_flight };
        if backlog_in_flight < cap {
            return self.take_ready(now_ms, true);
        }
        None
    }

    fn take_ready(&mut self, now_ms: u64, backlog: bool) -> Option<Publish> {
        let limits = self.limits.clone();
        let pending = if backlog { &mut self.pending_backlog } else { &mut self.pending_live };
        let shard = pending
            .iter()
            .find(|(_, p)| {
                !p.records.is_empty()
                    && (backlog
                        || p.records.len() >= limits.max_batches
                        || p.bytes >= limits.max_bytes
                        || now_ms.saturating_sub(p.opened_ms) >= limits.max_age_ms)
            })
            .map(|(s, _)| *s)?;
        let p = pending.get_mut(&shard)?;
        // Take a prefix within the bundle limits (always at least one batch).
        let mut n = 0;
        let mut bytes = 0;
        while n < p.records.len() && n < limits.max_batches {
            let len = p.records[n].1.batch.len();
            if n > 0 && bytes + len > limits.max_bytes {
                break;
            }
            bytes += len;
            n += 1;
        }
        let taken: Vec<(RecordId, BundleEntry)> = p.records.drain(..n).collect();
        p.bytes -= bytes;
        if p.records.is_empty() {
            pending.remove(&shard);
        }
        let id = BundleId(self.next_bundle);
        self.next_bundle += 1;
        let (records, entries): (Vec<RecordId>, Vec<BundleEntry>) = taken.into_iter().unzip();
        let payload = match seal_bundle(&self.key, &self.gateway, id, shard, Codec::Lz4, &entries) {
            Ok(p) => p,
            Err(e) => {
                // Only an invalid gateway id gets here; the records stay claimed and
                // are retried after a restart.
                tracing::error!(error = %e, "could not seal a bundle");
                return None;
            }
        };
        self.in_flight.insert(
            id,
            InFlight {
                shard,
                records,
                payload: payload.clone(),
                due_ms: now_ms + self.limits.resend_after_ms,
                backlog,
            },
        );
        Some(Publish { id, shard, payload, resend: false })
    }

    /// When something next needs doing (bundle age or a re-send), ms.
    pub fn next_deadline(&self) -> Option<u64> {
        let ages = self.pending_live.values().map(|p| p.opened_ms + self.limits.max_age_ms);
        let resends = self.in_flight.values().map(|f| f.due_ms);
        ages.chain(resends).min()
    }

    /// The cloud acked these bundles.
    pub fn on_ack(&mut self, ids: &[BundleId]) -> Released {
        let mut out = Released::default();
        for id in ids {
            if let Some(f) = self.in_flight.remove(id) {
                out.bundles += 1;
                for r in &f.records {
                    self.claimed.remove(r);
                    if self.dropped_in_flight.remove(r) {
                        out.dropped_but_delivered += 1;
                    }
                }
                out.records.extend(f.records);
            }
        }
        out
    }
}

fn push(pending: &mut BTreeMap<u16, Pending>, now_ms: u64, rec: StoredRecord) {
    let p =
        pending.entry(rec.meta.shard).or_insert_with(|| Pending { records: Vec::new(), bytes: 0, opened_ms: now_ms });
    if p.records.is_empty() {
        p.opened_ms = now_ms;
    }
    p.bytes += rec.batch.len();
    p.records.push((rec.id, BundleEntry { received_at_ms: rec.meta.received_at_ms, batch: rec.batch }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::RecordMeta;
    use fleetline_wire::bundle::open_bundle;

    fn limits() -> Limits {
        Limits {
            max_batches: 3,
            max_bytes: 1000,
            max_age_ms: 50,
            max_in_flight: 4,
            resend_after_ms: 1000,
            backlog_rate: 200,
            live_first: true,
            live_bytes: 10_000,
        }
    }

    fn rec(id: u64, shard: u16) -> StoredRecord {
        StoredRecord {
            id: RecordId(id),
            meta: RecordMeta { shard, samples: 1, received_at_ms: id },
            batch: vec![id as u8; 100],
        }
    }

    fn core(first: u64) -> UplinkCore {
        UplinkCore::new(limits(), "gw-1".into(), DeviceKey::from_bytes([1; 32]), RecordId(first), 1)
    }

    fn ids(p: &Publish) -> Vec<u64> {
        let (_, entries) = open_bundle(&p.payload, &DeviceKey::from_bytes([1; 32])).expect("opens");
        entries.iter().map(|e| e.received_at_ms).collect()
    }

    #[test]
    fn bundles_per_shard_within_limits_and_releases_on_ack() {
        let mut c = core(0);
        c.on_connected(0);
        for id in 0..5 {
            c.on_live(rec(id, (id % 2) as u16));
        }
        // Shard 0 has 3 records: full bundle now; shard 1 waits for its age.
        let p = c.poll_publish(0).expect("a full bundle");
        assert_eq!((p.shard, ids(&p)), (0, vec![0, 2, 4]));
        assert!(c.poll_publish(10).is_none());
        let q = c.poll_publish(50).expect("aged bundle");
        assert_eq!((q.shard, ids(&q)), (1, vec![1, 3]));
        assert_eq!(c.in_flight(), 2);
        // Unacked: re-sent after the timeout, same id and bytes.
        let r = c.poll_publish(1000).expect("re-send");
        assert!(r.resend && r.id == p.id && r.payload == p.payload);
        let released = c.on_ack(&[p.id, p.id, BundleId(999)]);
        assert_eq!((released.bundles, released.records.len()), (1, 3));
        assert_eq!(c.in_flight(), 1);
    }

    #[test]
    fn an_outage_becomes_rate_limited_backlog_behind_fresh_records() {
        let mut c = core(0);
        c.on_connected(0);
        c.on_disconnected();
        for id in 0..6 {
            c.on_live(rec(id, 0));
        }
        assert_eq!(c.live_len(), 0, "nothing kept in memory while disconnected");
        assert!(c.backlog_request(0).is_none(), "no reads while disconnected");
        c.on_connected(1000);
        c.on_live(rec(6, 0));
        // Fresh record 6 goes out first (once its bundle's age is up), without waiting
        // for the backlog.
        assert!(c.poll_publish(1100).is_none());
        let fresh = c.poll_publish(1150).expect("fresh bundle");
        assert_eq!(ids(&fresh), vec![6]);
        // The backlog is read from 0 up to the fresh record, at most 200 bytes per second.
        let (from, _, bytes) = c.backlog_request(2000).expect("backlog read");
        assert_eq!((from, bytes), (RecordId(0), 200));
        c.on_backlog(2000, (0..2).map(|i| rec(i, 0)).collect(), RecordId(2));
        assert!(c.backlog_request(2000).is_none(), "tokens spent");
        let b = c.poll_publish(2000).expect("backlog bundle");
        assert_eq!(ids(&b), vec![0, 1]);
        let (from, _, _) = c.backlog_request(3000).expect("next read");
        assert_eq!(from, RecordId(2));
        // A read that runs into the fresh records stops there.
        c.on_backlog(3000, (2..8).map(|i| rec(i, 0)).collect(), RecordId(8));
        assert!(c.backlog_request(10_000).is_none(), "caught up with the feed");
    }

    #[test]
    fn dropped_records_are_not_sent_and_in_flight_ones_are_counted_when_delivered() {
        let mut c = core(0);
        c.on_connected(0);
        for id in 0..4 {
            c.on_live(rec(id, 0));
        }
        let p = c.poll_publish(0).expect("bundle of 0..3");
        c.on_dropped(&[RecordId(0), RecordId(3)]);
        assert!(c.poll_publish(100).is_none(), "record 3 was dropped before it was sent");
        let released = c.on_ack(&[p.id]);
        assert_eq!((released.records.len(), released.dropped_but_delivered), (3, 1));
    }
}
