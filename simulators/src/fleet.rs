//! `fleetline-sim fleet`: simulated vehicles against a real deployment's gateway,
//! with the keys of a provisioning file; reports what the units can see.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetline_device::client::TlsOptions;
use fleetline_wire::provisioning::Provisioning;
use serde::Serialize;

use crate::drive::{Drive, DriveParams, Unit};
use crate::model::Profile;

/// What to run.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Gateway `host:port`.
    pub gateway: String,
    /// CA bundle for TLS.
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_auth: Option<(PathBuf, PathBuf)>,
    /// Provisioning file with the units' keys.
    pub provisioning: PathBuf,
    /// Units to simulate.
    pub vehicles: usize,
    /// Wall-clock time of the drive.
    pub duration: Duration,
    /// Seed.
    pub seed: u64,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Activity profile.
    pub profile: Profile,
    /// Longest wait for acks at the end.
    pub drain_timeout: Duration,
}

/// What the units saw.
#[derive(Clone, Debug, Serialize)]
pub struct FleetReport {
    /// Units simulated.
    pub vehicles: usize,
    /// Wall-clock seconds of the drive.
    pub duration_s: f64,
    /// Readings taken into batches.
    pub samples_sent: u64,
    /// Samples in batches the gateway acked.
    pub samples_acked: u64,
    /// Readings refused by back-pressure or as invalid.
    pub samples_refused: u64,
    /// Batches sealed and acked.
    pub batches_sealed: u64,
    /// Batches acked.
    pub batches_acked: u64,
    /// Re-sends after a timeout or reconnect.
    pub resends: u64,
    /// MQTT sessions established, and connection failures or drops.
    pub connects: u64,
    /// Connection failures and drops.
    pub connection_errors: u64,
    /// Acked samples per wall second of drive and drain.
    pub acked_samples_per_s: f64,
}

/// Drives the fleet and drains it.
pub async fn run(opts: FleetOptions) -> anyhow::Result<FleetReport> {
    let prov =
        Provisioning::load(&opts.provisioning).with_context(|| format!("reading {}", opts.provisioning.display()))?;
    let mut devices: Vec<_> = prov.devices().filter(|d| !d.revoked).collect();
    devices.sort_by(|a, b| (a.fleet.as_str(), a.device.as_str()).cmp(&(b.fleet.as_str(), b.device.as_str())));
    anyhow::ensure!(
        devices.len() >= opts.vehicles,
        "the provisioning file has {} units, {} asked",
        devices.len(),
        opts.vehicles
    );
    let units = devices
        .iter()
        .take(opts.vehicles)
        .enumerate()
        .map(|(index, d)| Unit { index, fleet: d.fleet, device: d.device, key: d.key.clone() })
        .collect();
    let (host, port) = opts.gateway.rsplit_once(':').context("--gateway must be host:port")?;
    let tls = match &opts.ca {
        Some(ca) => Some(TlsOptions {
            ca_pem: std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            client_auth: match &opts.client_auth {
                Some((c, k)) => Some((std::fs::read(c)?, std::fs::read(k)?)),
                None => None,
            },
        }),
        None => None,
    };
    let mut drive = Drive::start(DriveParams {
        host: host.trim_matches(['[', ']']).to_string(),
        port: port.parse().context("gateway port")?,
        tls,
        units,
        fleet_size: opts.vehicles,
        seed: opts.seed,
        duration: opts.duration,
        time_scale: opts.time_scale,
        profile: opts.profile,
    })
    .await?;
    drive.join().await;
    let drove = drive.started.elapsed();
    drive.drain(Instant::now() + opts.drain_timeout).await;
    let total = drive.started.elapsed();
    let mut r = FleetReport {
        vehicles: opts.vehicles,
        duration_s: drove.as_secs_f64(),
        samples_sent: 0,
        samples_acked: 0,
        samples_refused: 0,
        batches_sealed: 0,
        batches_acked: 0,
        resends: 0,
        connects: 0,
        connection_errors: 0,
        acked_samples_per_s: 0.0,
    };
    for c in &drive.clients {
        let s = c.stats();
        r.samples_sent += s.core.readings_recorded;
        r.samples_acked += s.core.samples_acked;
        r.samples_refused += s.core.readings_refused + s.core.readings_invalid;
        r.batches_sealed += s.core.batches_sealed;
        r.batches_acked += s.core.batches_acked;
        r.resends += s.core.resends;
        r.connects += s.connects;
        r.connection_errors += s.connection_errors;
    }
    r.acked_samples_per_s = r.samples_acked as f64 / total.as_secs_f64();
    Ok(r)
}
