//! A fleet of real device clients (the std SDK) recording readings against a
//! gateway, and small helpers for process-level tests.
#![allow(clippy::unwrap_used)] // Test support: a failed unwrap is a failed test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleetline_device::client::{ClientConfig, DeviceClient, SystemClock};
use fleetline_device::wire::FleetId;
use fleetline_device::wire::signals::kind;
use fleetline_device::{BootState, Config, FlushPolicy, OutboxFull, Reading};

use crate::provisioning::{device_id, device_key};

pub use crate::http::get as http_get;

/// Client settings of device `i` against a gateway on `port`: small, quick batches.
pub fn device_config(i: usize, port: u16, when_full: OutboxFull) -> ClientConfig {
    let device = Config {
        fleet: FleetId::new("acme").unwrap(),
        device: device_id(i),
        key: device_key(i),
        flush: FlushPolicy { max_samples: 30, max_bytes: 1024, max_age_ms: 100 },
        resend_after_ms: 1_000,
        when_full,
    };
    let mut cfg = ClientConfig::new("127.0.0.1", port, device, BootState { epoch: 1, last_command_counter: 0 });
    cfg.backoff.initial = Duration::from_millis(50);
    cfg.backoff.max = Duration::from_millis(300);
    cfg
}

/// A fleet of device clients recording readings until told to stop.
pub struct Fleet {
    /// The clients, by device index.
    pub clients: Vec<Arc<DeviceClient>>,
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

impl Fleet {
    /// Starts `devices` clients against `port`, each recording three readings every `every`.
    pub fn start(devices: usize, port: u16, every: Duration, when_full: OutboxFull) -> Self {
        Self::start_with(devices, |_| port, every, when_full)
    }

    /// Like `start`, with each device's gateway port chosen by `port_of`.
    pub fn start_with(devices: usize, port_of: impl Fn(usize) -> u16, every: Duration, when_full: OutboxFull) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let mut clients = vec![];
        let mut tasks = vec![];
        for i in 0..devices {
            let client =
                Arc::new(DeviceClient::spawn(device_config(i, port_of(i), when_full), SystemClock::new()).unwrap());
            clients.push(client.clone());
            let running = running.clone();
            tasks.push(tokio::spawn(async move {
                let mut t = 1_790_000_000_000u64 + i as u64;
                let mut refused = 0;
                while running.load(Ordering::Relaxed) {
                    t += 1000;
                    let readings = vec![
                        Reading { kind: kind::SPEED, time_ms: t, value: (t % 900) as f64 / 10.0 },
                        Reading { kind: kind::LATITUDE, time_ms: t, value: 52.0 + (t % 1000) as f64 * 1e-5 },
                        Reading { kind: kind::LONGITUDE, time_ms: t, value: 13.0 + (t % 1000) as f64 * 1e-5 },
                    ];
                    let s = client.record_all(readings).await.unwrap();
                    refused += u64::from(s.refused);
                    tokio::time::sleep(every).await;
                }
                refused
            }));
        }
        Self { clients, running, tasks }
    }

    /// Stops recording; returns readings refused by back-pressure.
    pub async fn stop(&mut self) -> u64 {
        self.running.store(false, Ordering::Relaxed);
        let mut refused = 0;
        for t in self.tasks.drain(..) {
            refused += t.await.unwrap();
        }
        for c in &self.clients {
            c.flush().await.unwrap();
        }
        refused
    }

    /// Waits until every device has every batch acked; returns the acked batches.
    pub async fn drain(&self, timeout: Duration) -> BTreeMap<(String, u32, u32), u16> {
        let deadline = Instant::now() + timeout;
        for c in &self.clients {
            let left = deadline.saturating_duration_since(Instant::now());
            let s = c.wait_for(left, |s| s.is_idle()).await;
            assert!(s.is_idle(), "device did not drain: {s:?}");
        }
        self.acked()
    }

    /// Batches acked so far (taken: each is reported once).
    pub fn acked(&self) -> BTreeMap<(String, u32, u32), u16> {
        let mut out = BTreeMap::new();
        for (i, c) in self.clients.iter().enumerate() {
            for r in c.take_acked() {
                out.insert((device_id(i).to_string(), r.epoch, r.seq), r.samples);
            }
        }
        out
    }
}

/// Small deterministic generator for kill times.
pub struct Lcg(pub u64);
impl Lcg {
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}
