//! From a device's publish to its ack: check, store durably, acknowledge.
//!
//! A batch is checked (size, topic, header, provisioning, seal, decoding), appended
//! to the disk queue, and only once the queue says it is durable is the device sent
//! an ack naming it. Anything refused is counted by reason and not acked, so the
//! device keeps it (a bad batch) or re-sends it (a full queue). A batch that is
//! already durable is not stored again, only acked again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fleetline_wire::control::{MAX_ACK_LEN, control_nonce, ranges_from, seal_ack};
use fleetline_wire::provisioning::Provisioning;
use fleetline_wire::seqset::SeqSet;
use fleetline_wire::shard::shard_of;
use fleetline_wire::topics::{self, Channel};
use fleetline_wire::{DeviceId, DeviceKey, FleetId, peek_header};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use crate::queue::{QueueError, QueueHandle, RecordMeta};
use crate::stats::{GatewayStats, reason, unix_ms};

use super::registry::Registry;

/// A batch that passed every check.
#[derive(Clone, Debug)]
pub struct Checked {
    /// Fleet.
    pub fleet: FleetId,
    /// Device.
    pub device: DeviceId,
    /// Boot epoch.
    pub epoch: u32,
    /// Seq.
    pub seq: u32,
    /// Samples of known kinds.
    pub samples: u32,
    /// Series of kinds this gateway does not know (forwarded as they are).
    pub unknown_series: u32,
    /// The key that opened it; acks are sealed with the same key.
    pub key: DeviceKey,
}

/// Checks one publish from the `up` filter. Pure: no I/O, no clock but `now`.
pub fn check(topic: &[u8], payload: &[u8], p: &Provisioning, now: SystemTime) -> Result<Checked, &'static str> {
    if payload.len() > fleetline_wire::batch::MAX_SEALED_LEN {
        return Err(reason::OVERSIZED);
    }
    let topic = std::str::from_utf8(topic).map_err(|_| reason::BAD_TOPIC)?;
    let (fleet, device, channel) = topics::parse_device_topic(topic).ok_or(reason::BAD_TOPIC)?;
    if channel != Channel::Up {
        return Err(reason::BAD_TOPIC);
    }
    let header = peek_header(payload).map_err(|_| reason::MALFORMED)?;
    if header.fleet != fleet.as_str() || header.device != device.as_str() {
        return Err(reason::TOPIC_MISMATCH);
    }
    let entry = p.device(&fleet, &device).ok_or(reason::UNKNOWN_DEVICE)?;
    if entry.revoked {
        return Err(reason::REVOKED);
    }
    let counted = entry.open_batch(payload, now, |opened, key| {
        let mut samples = 0u32;
        let mut unknown_series = 0u32;
        for series in opened.series() {
            let series = series.map_err(|_| reason::UNDECODABLE)?;
            match series.samples() {
                Some(iter) => {
                    for s in iter {
                        s.map_err(|_| reason::UNDECODABLE)?;
                        samples += 1;
                    }
                }
                None => unknown_series += 1,
            }
        }
        Ok::<_, &'static str>((samples, unknown_series, key.clone()))
    });
    let (samples, unknown_series, key) = counted.map_err(|_| reason::AUTH_FAILED)??;
    Ok(Checked { fleet, device, epoch: header.epoch, seq: header.seq, samples, unknown_series, key })
}

/// A batch that is durable and must be acked to its device.
#[derive(Clone, Debug)]
pub struct Durable {
    /// Fleet.
    pub fleet: FleetId,
    /// Device.
    pub device: DeviceId,
    /// Boot epoch.
    pub epoch: u32,
    /// Seq.
    pub seq: u32,
    /// Key to seal the ack with.
    pub key: DeviceKey,
}

/// Boot epochs per device the gateway remembers for dedupe.
const DEDUPE_EPOCHS: usize = 16;

/// Whether a device's batch is new here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not durable here yet.
    New,
    /// Durable already: ack it again, store nothing.
    Durable,
    /// From a boot epoch older than every epoch remembered: a replay of a captured
    /// batch (units do not go back to old epochs), refused.
    BelowFloor,
}

/// What every device has durable here, for dedupe: its (epoch, seq) set and its
/// epoch floor (every epoch below it was forgotten, so batches from it are refused).
#[derive(Default)]
pub struct Durables {
    by_device: Mutex<HashMap<(FleetId, DeviceId), (SeqSet, u32)>>,
}

impl Durables {
    /// Records (epoch, seq) of a device as durable.
    pub fn insert(&self, fleet: FleetId, device: DeviceId, epoch: u32, seq: u32) {
        if let Ok(mut m) = self.by_device.lock() {
            let (set, floor) = m.entry((fleet, device)).or_default();
            set.insert(epoch, seq);
            if let Some(forgot) = set.retain_epochs(DEDUPE_EPOCHS) {
                *floor = (*floor).max(forgot.saturating_add(1));
            }
        }
    }

    /// Whether a batch is new, durable already, or below the device's epoch floor.
    pub fn seen(&self, fleet: FleetId, device: DeviceId, epoch: u32, seq: u32) -> Seen {
        let Ok(m) = self.by_device.lock() else { return Seen::New };
        match m.get(&(fleet, device)) {
            Some((_, floor)) if epoch < *floor => Seen::BelowFloor,
            Some((set, _)) if set.contains(epoch, seq) => Seen::Durable,
            _ => Seen::New,
        }
    }
}

/// The device side's shared state.
pub struct Ingest {
    /// Provisioning.
    pub registry: Arc<Registry>,
    /// The disk queue.
    pub queue: QueueHandle,
    /// Counters.
    pub stats: Arc<GatewayStats>,
    /// Durable batches per device.
    pub durables: Arc<Durables>,
    /// Shard count.
    pub shard_count: u16,
    /// Durable batches to ack.
    pub acks: mpsc::UnboundedSender<Durable>,
    /// Records the queue dropped (drop-oldest), for the uplink.
    pub dropped: mpsc::UnboundedSender<Vec<crate::queue::RecordId>>,
}

impl Ingest {
    /// Takes what unit sessions hand over until the front is gone.
    pub async fn run(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<fleetline_broker::Inbound>) {
        // Appends become durable in the order they were queued: one task waits for
        // them in that order (no task per batch).
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        let waiter = tokio::spawn(self.clone().settle(pending_rx));
        while let Some(msg) = rx.recv().await {
            self.handle(msg.topic.as_bytes(), &msg.payload, &pending_tx).await;
        }
        drop(pending_tx);
        let _ = waiter.await;
    }

    /// Waits for each queued append in turn and acks what became durable.
    async fn settle(self: Arc<Self>, mut pending: mpsc::UnboundedReceiver<Pending>) {
        while let Some(p) = pending.recv().await {
            let result = p.rx.await;
            self.settled(p.durable, p.samples, p.received_ms, result);
        }
    }

    /// Handles one publish; a queued append goes to `pending` to be waited for.
    async fn handle(&self, topic: &[u8], payload: &[u8], pending_tx: &mpsc::UnboundedSender<Pending>) {
        let checked = match check(topic, payload, &self.registry.snapshot(), SystemTime::now()) {
            Ok(c) => c,
            Err(why) => {
                self.stats.reject(why);
                tracing::debug!(topic = %String::from_utf8_lossy(topic), reason = why, "batch refused");
                return;
            }
        };
        let Checked { fleet, device, epoch, seq, samples, unknown_series, key } = checked;
        let durable = Durable { fleet, device, epoch, seq, key };
        match self.durables.seen(fleet, device, epoch, seq) {
            Seen::New => {}
            Seen::Durable => {
                GatewayStats::add(&self.stats.duplicates, 1);
                let _ = self.acks.send(durable);
                return;
            }
            Seen::BelowFloor => {
                self.stats.reject(reason::STALE_EPOCH);
                tracing::warn!(%fleet, %device, epoch, seq, "batch from a forgotten boot epoch refused (a replay?)");
                return;
            }
        }
        GatewayStats::add(&self.stats.unknown_kinds, u64::from(unknown_series));
        let now = unix_ms();
        let meta = RecordMeta {
            shard: shard_of(fleet.as_str(), device.as_str(), self.shard_count).0,
            samples,
            received_at_ms: now,
        };
        let pending = match self.queue.append_start(meta, payload.to_vec()).await {
            Ok(rx) => rx,
            Err(_) => {
                self.stats.reject(reason::QUEUE_ERROR);
                return;
            }
        };
        let _ = pending_tx.send(Pending { rx: pending, durable, samples, received_ms: now });
    }

    /// What became of one append.
    fn settled(&self, durable: Durable, samples: u32, received_ms: u64, result: AppendResult) {
        let stats = &self.stats;
        match result {
            Ok(Ok(appended)) => {
                self.durables.insert(durable.fleet, durable.device, durable.epoch, durable.seq);
                GatewayStats::add(&stats.batches_accepted, 1);
                GatewayStats::add(&stats.samples_accepted, u64::from(samples));
                metrics::counter!("fleetline_gateway_batches_accepted_total").increment(1);
                metrics::counter!("fleetline_gateway_samples_accepted_total").increment(u64::from(samples));
                stats.seen(durable.fleet, durable.device, received_ms);
                if !appended.dropped.is_empty() {
                    let samples: u64 = appended.dropped.iter().map(|d| u64::from(d.meta.samples)).sum();
                    GatewayStats::add(&stats.dropped_batches, appended.dropped.len() as u64);
                    GatewayStats::add(&stats.dropped_samples, samples);
                    metrics::counter!("fleetline_gateway_dropped_batches_total")
                        .increment(appended.dropped.len() as u64);
                    metrics::counter!("fleetline_gateway_dropped_samples_total").increment(samples);
                    tracing::warn!(
                        batches = appended.dropped.len(),
                        samples,
                        first = appended.dropped[0].id.0,
                        "queue full: dropped the oldest batches (drop-oldest policy)"
                    );
                    let _ = self.dropped.send(appended.dropped.iter().map(|d| d.id).collect());
                }
                let _ = self.acks.send(durable);
            }
            Ok(Err(QueueError::Full)) => stats.reject(reason::QUEUE_FULL),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "batch not stored; the device will re-send it");
                stats.reject(reason::QUEUE_ERROR);
            }
            Err(_) => stats.reject(reason::QUEUE_ERROR),
        }
    }
}

/// The queue's answer to one append.
type AppendResult = Result<Result<crate::queue::Appended, QueueError>, tokio::sync::oneshot::error::RecvError>;

/// An append queued and not yet durable.
struct Pending {
    rx: tokio::sync::oneshot::Receiver<Result<crate::queue::Appended, QueueError>>,
    durable: Durable,
    samples: u32,
    received_ms: u64,
}

/// Durable (epoch, seq) pairs per device, with the key to seal their ack.
type AcksByDevice = HashMap<(FleetId, DeviceId), (DeviceKey, Vec<(u32, u32)>)>;

/// Publishes acks to devices, grouping whatever became durable together into one
/// ack per device.
pub async fn run_acker(
    board: Arc<fleetline_broker::Switchboard>,
    mut rx: mpsc::UnboundedReceiver<Durable>,
    gateway_id: String,
    stats: Arc<GatewayStats>,
    counter: Arc<fleetline_service::counter::PersistentCounter>,
) {
    let mut buf = vec![0u8; MAX_ACK_LEN];
    // A cryptographic generator seeded from the system once, not a system call per ack.
    let mut rng = rand::rngs::StdRng::from_entropy();
    while let Some(first) = rx.recv().await {
        let mut group: AcksByDevice = HashMap::new();
        let mut add = |d: Durable| {
            group.entry((d.fleet, d.device)).or_insert_with(|| (d.key.clone(), Vec::new())).1.push((d.epoch, d.seq));
        };
        add(first);
        while let Ok(d) = rx.try_recv() {
            add(d);
        }
        for ((fleet, device), (key, seqs)) in group {
            let topic = topics::device_topic(&fleet, &device, Channel::Ack);
            for chunk in ranges_from(seqs).chunks(fleetline_wire::control::MAX_ACK_RANGES) {
                let nonce = control_nonce(rng.r#gen());
                let c = match counter.next() {
                    Ok(c) => c,
                    Err(e) => {
                        // The device re-sends and is acked once the mark can be written.
                        tracing::error!(error = %e, "cannot raise the ack counter's mark; ack withheld");
                        continue;
                    }
                };
                let Ok(n) = seal_ack(&mut buf, &key, &gateway_id, c, nonce, chunk) else { continue };
                // Queued for the unit's session if it is connected and subscribed;
                // otherwise the unit re-sends and is acked again.
                // Acks are idempotent and sessions clean: QoS 0 (a lost one is
                // answered by the unit's re-send).
                let payload = bytes::Bytes::copy_from_slice(&buf[..n]);
                if board.publish(topic.as_str(), payload, rumqttc::QoS::AtMostOnce) > 0 {
                    GatewayStats::add(&stats.device_acks_sent, 1);
                } else {
                    GatewayStats::add(&stats.device_acks_undelivered, 1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetline_wire::provisioning::DeviceEntry;
    use fleetline_wire::signals::kind;
    use fleetline_wire::{BatchHeader, BatchWriter, SCHEMA_V1};
    use std::time::Duration;

    fn key(b: u8) -> DeviceKey {
        DeviceKey::from_bytes([b; 32])
    }

    fn sealed(device: &str, k: &DeviceKey, unknown: bool) -> Vec<u8> {
        let header = BatchHeader {
            format: fleetline_wire::batch::BATCH_FORMAT,
            schema: SCHEMA_V1,
            fleet: "acme",
            device,
            epoch: 2,
            seq: 5,
            base_time_ms: 1_790_000_000_000,
        };
        let mut buf = vec![0u8; 512];
        let mut w = BatchWriter::new(&mut buf, &header).expect("header fits");
        w.begin_series(kind::SPEED).expect("known kind");
        w.push(0, 100).expect("fits");
        w.push(1000, 101).expect("fits");
        if unknown {
            w.raw_series(999, &[1, 2]).expect("fits");
        }
        let n = w.seal(k).expect("seals");
        buf.truncate(n);
        buf
    }

    fn provisioning(now: SystemTime) -> Provisioning {
        let mut p = Provisioning::default();
        let fleet = FleetId::new("acme").expect("id");
        // Rotated: key 2 is current, key 1 valid for another hour.
        p.upsert_device(DeviceEntry {
            fleet,
            device: DeviceId::new("a").expect("id"),
            key: key(2),
            previous: Some((key(1), now + Duration::from_secs(3600))),
            revoked: false,
        });
        p.upsert_device(DeviceEntry {
            fleet,
            device: DeviceId::new("r").expect("id"),
            key: key(3),
            previous: None,
            revoked: true,
        });
        p
    }

    #[test]
    fn accepts_current_and_previous_keys_within_the_window_only() {
        let now = SystemTime::now();
        let p = provisioning(now);
        let topic = b"fleetline/v1/acme/a/up";
        let c = check(topic, &sealed("a", &key(2), false), &p, now).expect("current key");
        assert_eq!((c.epoch, c.seq, c.samples, c.unknown_series), (2, 5, 2, 0));
        assert_eq!(c.key, key(2));
        let c = check(topic, &sealed("a", &key(1), true), &p, now).expect("previous key in its window");
        assert_eq!((c.key, c.unknown_series), (key(1), 1));
        let later = now + Duration::from_secs(3601);
        assert_eq!(check(topic, &sealed("a", &key(1), false), &p, later).unwrap_err(), reason::AUTH_FAILED);
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let now = SystemTime::now();
        let p = provisioning(now);
        let good = sealed("a", &key(2), false);
        let cases: Vec<(&[u8], Vec<u8>, &str)> = vec![
            (b"fleetline/v1/acme/a/up", vec![0; 70 * 1024], reason::OVERSIZED),
            (b"fleetline/v1/acme/a/ack", good.clone(), reason::BAD_TOPIC),
            (b"elsewhere", good.clone(), reason::BAD_TOPIC),
            (b"fleetline/v1/acme/a/up", b"garbage".to_vec(), reason::MALFORMED),
            (b"fleetline/v1/acme/b/up", good.clone(), reason::TOPIC_MISMATCH),
            (b"fleetline/v1/acme/x/up", sealed("x", &key(2), false), reason::UNKNOWN_DEVICE),
            (b"fleetline/v1/acme/r/up", sealed("r", &key(3), false), reason::REVOKED),
            (b"fleetline/v1/acme/a/up", sealed("a", &key(9), false), reason::AUTH_FAILED),
        ];
        for (topic, payload, why) in cases {
            assert_eq!(check(topic, &payload, &p, now).unwrap_err(), why, "{}", String::from_utf8_lossy(topic));
        }
    }
}
