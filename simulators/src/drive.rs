//! Drives a fleet of simulated vehicles, each a real SDK client on its own MQTT
//! connection, in simulated time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetline_device::client::{ClientConfig, DeviceClient, SystemClock, TlsOptions};
use fleetline_device::{BootState, Config, FlushPolicy, OutboxFull};
use fleetline_wire::{DeviceId, DeviceKey, FleetId};
use tokio::task::JoinHandle;

use crate::model::{Incident, Profile, Vehicle, VehicleSpec};

/// One unit to simulate.
#[derive(Clone, Debug)]
pub struct Unit {
    /// Index in the fleet (the model's stream).
    pub index: usize,
    /// Fleet.
    pub fleet: FleetId,
    /// Device.
    pub device: DeviceId,
    /// Key.
    pub key: DeviceKey,
}

/// What to drive and where to.
#[derive(Clone, Debug)]
pub struct DriveParams {
    /// Gateway host.
    pub host: String,
    /// Gateway port.
    pub port: u16,
    /// TLS towards the gateway.
    pub tls: Option<TlsOptions>,
    /// Units.
    pub units: Vec<Unit>,
    /// Fleet size (depots are laid out by it).
    pub fleet_size: usize,
    /// Seed.
    pub seed: u64,
    /// Wall-clock time of the drive.
    pub duration: Duration,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Activity profile.
    pub profile: Profile,
}

/// A running fleet.
pub struct Drive {
    /// The units' clients, in `units` order.
    pub clients: Vec<Arc<DeviceClient>>,
    /// Readings taken into batches so far.
    pub sent: Arc<AtomicU64>,
    /// Injected incidents (ground truth).
    pub incidents: Vec<Incident>,
    /// Simulated seconds of the drive.
    pub sim_secs: u64,
    /// Unix ms of simulated second 0.
    pub t0_ms: u64,
    /// When the drive started.
    pub started: Instant,
    tasks: Vec<JoinHandle<Vec<Incident>>>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Drive {
    /// Connects every unit and starts driving. Simulated time ends when the drive
    /// does, so no reading is dated in the future. Units come up in waves of 200
    /// every 50 ms, as a fleet's units do, not all in the same instant.
    pub async fn start(p: DriveParams) -> anyhow::Result<Self> {
        let scale = p.time_scale.max(0.01);
        let sim_secs = (p.duration.as_secs_f64() * scale).ceil() as u64;
        let t0_ms = unix_ms() + p.duration.as_millis() as u64 - sim_secs * 1000;
        let flush = FlushPolicy { max_samples: 120, max_bytes: 1024, max_age_ms: 2_000 };
        let started = Instant::now();
        let sent = Arc::new(AtomicU64::new(0));
        let (mut clients, mut tasks, mut incidents) = (Vec::new(), Vec::new(), Vec::new());
        for (n, u) in p.units.into_iter().enumerate() {
            if n > 0 && n % 200 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let device = Config {
                fleet: u.fleet,
                device: u.device,
                key: u.key,
                flush,
                resend_after_ms: 10_000,
                when_full: OutboxFull::Block,
            };
            let mut cfg =
                ClientConfig::new(p.host.clone(), p.port, device, BootState { epoch: 1, last_command_counter: 0 });
            cfg.tls = p.tls.clone();
            cfg.backoff.max = Duration::from_secs(2);
            let client = Arc::new(DeviceClient::spawn(cfg, SystemClock::new())?);
            clients.push(client.clone());
            let spec = VehicleSpec::generate(p.seed, u.index, p.fleet_size, sim_secs, p.profile);
            incidents.extend(spec.incidents.clone());
            let mut vehicle = Vehicle::new(spec, p.seed);
            let sent = sent.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let due = ((started.elapsed().as_secs_f64() * scale) as u64).min(sim_secs);
                    while vehicle.elapsed_s() < due {
                        vehicle.step(t0_ms, &mut out);
                    }
                    if !out.is_empty() {
                        let n = out.len() as u64;
                        if client.record_all(std::mem::take(&mut out)).await.is_err() {
                            break;
                        }
                        sent.fetch_add(n, Ordering::Relaxed);
                    }
                    if vehicle.elapsed_s() >= sim_secs {
                        break;
                    }
                    let next = Duration::from_secs_f64((vehicle.elapsed_s() + 1) as f64 / scale);
                    let wait = next
                        .saturating_sub(started.elapsed())
                        .max(Duration::from_millis(20))
                        .min(Duration::from_millis(250));
                    tokio::time::sleep(wait).await;
                }
                vehicle.refuels
            }));
        }
        Ok(Self { clients, sent, incidents, sim_secs, t0_ms, started, tasks })
    }

    /// Whether every vehicle finished its drive.
    pub fn finished(&self) -> bool {
        self.tasks.iter().all(JoinHandle::is_finished)
    }

    /// Waits for the drive to end; returns the refuels (ground truth).
    pub async fn join(&mut self) -> Vec<Incident> {
        let mut refuels = Vec::new();
        for t in self.tasks.drain(..) {
            refuels.extend(t.await.unwrap_or_default());
        }
        refuels
    }

    /// Flushes every unit and waits (until `deadline`) for all of them to be acked.
    pub async fn drain(&self, deadline: Instant) {
        for c in &self.clients {
            let _ = c.flush().await;
        }
        for c in &self.clients {
            c.wait_for(deadline.saturating_duration_since(Instant::now()), |s| s.is_idle()).await;
        }
    }
}
