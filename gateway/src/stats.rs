//! Counters and gauges shared by the gateway's parts, for `/status` and `/metrics`.
//!
//! Every rejection has a reason from a fixed set, so metric label sets stay bounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fleetline_wire::{DeviceId, FleetId};
use serde::Serialize;

/// Why a device message or login was refused.
pub mod reason {
    pub use fleetline_wire::reason::{AUTH_FAILED, MALFORMED, STALE_EPOCH, UNDECODABLE, UNKNOWN_DEVICE};

    /// Larger than a sealed batch may be.
    pub const OVERSIZED: &str = "oversized";
    /// Not on a device `up` topic.
    pub const BAD_TOPIC: &str = "bad_topic";
    /// The header names another device than the topic.
    pub const TOPIC_MISMATCH: &str = "topic_mismatch";
    /// The device is revoked.
    pub const REVOKED: &str = "revoked";
    /// The disk queue is full under back-pressure (the device keeps the batch).
    pub const QUEUE_FULL: &str = "queue_full";
    /// The disk queue could not write (the device keeps the batch).
    pub const QUEUE_ERROR: &str = "queue_error";
    /// Login: username is not `{fleet}.{device}` or differs from the client id;
    /// wrong password; not MQTT 3.1.1; at the session limit; no CONNECT in time.
    pub use fleetline_broker::reason::{BAD_PASSWORD, BAD_USERNAME, CONNECT_TIMEOUT, PROTOCOL, SERVER_BUSY};
}

/// Last time a device was heard from.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DeviceSeen {
    /// Unix ms of the last accepted batch.
    pub last_seen_ms: u64,
    /// Batches accepted since start.
    pub batches: u64,
}

/// The uplink's state, as `/status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UplinkStatus {
    /// An MQTT session to the cloud is up.
    pub connected: bool,
    /// Sessions established since start.
    pub connects: u64,
    /// Bundles published (first sends).
    pub bundles_sent: u64,
    /// Bundles published again after a timeout or reconnect.
    pub bundles_resent: u64,
    /// Bundles acked by the cloud.
    pub bundles_acked: u64,
    /// Bundles awaiting acks.
    pub in_flight: u64,
    /// Batches forwarded and acked.
    pub batches_acked: u64,
    /// Cloud acks that did not verify.
    pub acks_invalid: u64,
    /// Cloud acks rejected by their counter.
    pub acks_replayed: u64,
    /// The last connection error.
    pub last_error: Option<String>,
}

/// Everything counted.
#[derive(Default)]
pub struct GatewayStats {
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    logins_rejected: Mutex<BTreeMap<&'static str, u64>>,
    packets_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Batches appended to the queue.
    pub batches_accepted: AtomicU64,
    /// Samples in them.
    pub samples_accepted: AtomicU64,
    /// Batches received again after they were durable (re-acked, not stored twice).
    pub duplicates: AtomicU64,
    /// Acks queued for a unit's session.
    pub device_acks_sent: AtomicU64,
    /// Acks with no session to take them (the unit was not connected or not
    /// subscribed); its re-send is acked again.
    pub device_acks_undelivered: AtomicU64,
    /// Batches dropped by the drop-oldest policy.
    pub dropped_batches: AtomicU64,
    /// Samples in them.
    pub dropped_samples: AtomicU64,
    /// Of the dropped batches, those that were already in flight and reached the
    /// cloud after all (so the loss is `dropped_batches - dropped_then_delivered`).
    pub dropped_then_delivered: AtomicU64,
    /// Devices disconnected after revocation.
    pub revocations: AtomicU64,
    /// Sessions ended because the key they opened with is no longer accepted.
    pub sessions_ended_by_keys: AtomicU64,
    /// Provisioning reloads refused (unparsable, or dropping too many entries).
    pub provisioning_refused: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_handshake_failed: AtomicU64,
    /// TLS clients dropped for not finishing the handshake in time.
    pub tls_handshake_timeout: AtomicU64,
    /// TLS sessions established.
    pub tls_sessions: AtomicU64,
    /// Unknown reading kinds seen (kept raw, forwarded).
    pub unknown_kinds: AtomicU64,
    /// Whether the gateway is ready to take data.
    pub ready: AtomicBool,
    /// Most device sessions at once (configured, or lowered to fit the file limit).
    pub session_cap: AtomicU64,
    devices: Mutex<HashMap<(FleetId, DeviceId), DeviceSeen>>,
    /// The uplink's state.
    pub uplink: Mutex<UplinkStatus>,
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, reason: &'static str) {
    if let Ok(mut m) = map.lock() {
        *m.entry(reason).or_default() += 1;
    }
}

impl GatewayStats {
    /// Counts a refused message.
    pub fn reject(&self, reason: &'static str) {
        bump(&self.rejected, reason);
        metrics::counter!("fleetline_gateway_rejected_batches_total", "reason" => reason).increment(1);
    }

    /// Counts a refused login.
    pub fn reject_login(&self, reason: &'static str) {
        bump(&self.logins_rejected, reason);
        metrics::counter!("fleetline_gateway_rejected_logins_total", "reason" => reason).increment(1);
    }

    /// Rejections by reason.
    pub fn rejected(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Sessions ended for a packet outside the unit's grants, by reason.
    pub fn packets_refused(&self) -> BTreeMap<&'static str, u64> {
        self.packets_refused.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Refused logins by reason.
    pub fn logins_rejected(&self) -> BTreeMap<&'static str, u64> {
        self.logins_rejected.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Records an accepted batch from `device` (`fleet/device`).
    pub fn seen(&self, fleet: FleetId, device: DeviceId, now_ms: u64) {
        if let Ok(mut m) = self.devices.lock() {
            let e = m.entry((fleet, device)).or_insert(DeviceSeen { last_seen_ms: now_ms, batches: 0 });
            e.last_seen_ms = now_ms;
            e.batches += 1;
        }
    }

    /// Devices heard from, by `fleet/device`.
    pub fn devices(&self) -> BTreeMap<String, DeviceSeen> {
        self.devices.lock().map(|m| m.iter().map(|((f, d), v)| (format!("{f}/{d}"), *v)).collect()).unwrap_or_default()
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Unix time in milliseconds.
pub use fleetline_service::unix_ms;

impl fleetline_broker::FrontEvents for GatewayStats {
    fn login_refused(&self, reason: &'static str) {
        self.reject_login(reason);
    }

    fn packet_refused(&self, reason: &'static str) {
        bump(&self.packets_refused, reason);
        metrics::counter!("fleetline_gateway_refused_packets_total", "reason" => reason).increment(1);
    }

    fn tls_session(&self) {
        Self::add(&self.tls_sessions, 1);
    }

    fn tls_failed(&self) {
        Self::add(&self.tls_handshake_failed, 1);
        metrics::counter!("fleetline_gateway_tls_handshakes_failed_total").increment(1);
    }

    fn tls_timed_out(&self) {
        Self::add(&self.tls_handshake_timeout, 1);
        metrics::counter!("fleetline_gateway_tls_handshakes_timed_out_total").increment(1);
    }
}
