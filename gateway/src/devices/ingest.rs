//! From a device's publish to its ack: check, store durably, acknowledge.
//!
//! A batch is checked (size, topic, header, provisioning, seal, decoding), appended
//! to the disk queue, and only once the queue says it is durable is the device sent
//! an ack naming it. Anything refused is counted by reason and not acked, so the
//! device keeps it (a bad batch) or re-sends it (a full queue). A batch that is
//! already durable is not stored again, only acked again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fleetline_wire::control::{MAX_ACK_LEN, random_nonce, ranges_from, seal_ack};
use fleetline_wire::provisioning::Provisioning;
use fleetline_wire::seqset::SeqSet;
use fleetline_wire::shard::shard_of;
use fleetline_wire::topics::{self, Channel};
use fleetline_wire::{DeviceId, DeviceKey, FleetId, open_batch, peek_header};
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
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
    let mut buf = payload.to_vec();
    for key in entry.keys_at(now) {
        buf.copy_from_slice(payload);
        let Ok(opened) = open_batch(&mut buf, key) else { continue };
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
        return Ok(Checked {
            fleet,
            device,
            epoch: header.epoch,
            seq: header.seq,
            samples,
            unknown_series,
            key: key.clone(),
        });
    }
    Err(reason::AUTH_FAILED)
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

/// What every device has durable here, for dedupe.
#[derive(Default)]
pub struct Durables {
    by_device: Mutex<HashMap<(FleetId, DeviceId), SeqSet>>,
}

impl Durables {
    /// Records (epoch, seq) of a device as durable.
    pub fn insert(&self, fleet: FleetId, device: DeviceId, epoch: u32, seq: u32) {
        if let Ok(mut m) = self.by_device.lock() {
            let set = m.entry((fleet, device)).or_default();
            set.insert(epoch, seq);
            set.retain_epochs(4);
        }
    }

    /// Whether it is durable already.
    pub fn contains(&self, fleet: FleetId, device: DeviceId, epoch: u32, seq: u32) -> bool {
        self.by_device.lock().is_ok_and(|m| m.get(&(fleet, device)).is_some_and(|s| s.contains(epoch, seq)))
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
    /// Reads the ingest link until the broker goes away.
    pub async fn run(self: Arc<Self>, mut rx: LinkRx) {
        loop {
            match rx.next().await {
                Ok(Some(Notification::Forward(f))) => self.handle(&f.publish.topic, &f.publish.payload).await,
                Ok(Some(Notification::Unschedule)) => {
                    // The router paused this link because its buffer filled; resume it.
                    if let Err(e) = rx.wake().await {
                        tracing::error!(error = %e, "ingest link could not resume");
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "ingest link closed");
                    return;
                }
            }
        }
    }

    /// Handles one publish.
    pub async fn handle(&self, topic: &[u8], payload: &[u8]) {
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
        if self.durables.contains(fleet, device, epoch, seq) {
            GatewayStats::add(&self.stats.duplicates, 1);
            let _ = self.acks.send(durable);
            return;
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
        let stats = self.stats.clone();
        let durables = self.durables.clone();
        let acks = self.acks.clone();
        let dropped_tx = self.dropped.clone();
        tokio::spawn(async move {
            match pending.await {
                Ok(Ok(appended)) => {
                    durables.insert(fleet, device, epoch, seq);
                    GatewayStats::add(&stats.batches_accepted, 1);
                    GatewayStats::add(&stats.samples_accepted, u64::from(samples));
                    metrics::counter!("fleetline_gateway_batches_accepted_total").increment(1);
                    metrics::counter!("fleetline_gateway_samples_accepted_total").increment(u64::from(samples));
                    stats.seen(&format!("{fleet}/{device}"), now);
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
                        let _ = dropped_tx.send(appended.dropped.iter().map(|d| d.id).collect());
                    }
                    let _ = acks.send(durable);
                }
                Ok(Err(QueueError::Full)) => stats.reject(reason::QUEUE_FULL),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "batch not stored; the device will re-send it");
                    stats.reject(reason::QUEUE_ERROR);
                }
                Err(_) => stats.reject(reason::QUEUE_ERROR),
            }
        });
    }
}

/// Counter for acks: above every earlier one, across restarts, as long as the wall
/// clock does not step back by more than the gateway's downtime.
pub struct AckCounter {
    last: Mutex<u64>,
}

impl AckCounter {
    /// Starts from the clock.
    pub fn new() -> Self {
        Self { last: Mutex::new(0) }
    }

    /// The next counter: microseconds since the Unix epoch, or one more than the last.
    pub fn next(&self) -> u64 {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        let Ok(mut last) = self.last.lock() else { return now };
        *last = (*last + 1).max(now);
        *last
    }
}

impl Default for AckCounter {
    fn default() -> Self {
        Self::new()
    }
}

/// Durable (epoch, seq) pairs per device, with the key to seal their ack.
type AcksByDevice = HashMap<(FleetId, DeviceId), (DeviceKey, Vec<(u32, u32)>)>;

/// Publishes acks to devices, grouping whatever became durable together into one
/// ack per device.
pub async fn run_acker(
    mut link: LinkTx,
    mut rx: mpsc::UnboundedReceiver<Durable>,
    gateway_id: String,
    stats: Arc<GatewayStats>,
) {
    let counter = AckCounter::new();
    let mut buf = vec![0u8; MAX_ACK_LEN];
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
                let Ok(nonce) = random_nonce() else { continue };
                let Ok(n) = seal_ack(&mut buf, &key, &gateway_id, counter.next(), nonce, chunk) else { continue };
                let mut tries = 0;
                while let Err(e) = link.try_publish(topic.as_str().to_string(), buf[..n].to_vec()) {
                    tries += 1;
                    if tries > 200 {
                        // The device re-sends; its next batch or re-send gets acked.
                        tracing::warn!(error = %e, device = %device, "could not publish ack");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if tries <= 200 {
                    GatewayStats::add(&stats.device_acks_sent, 1);
                }
            }
        }
    }
}
