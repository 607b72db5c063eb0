//! `fleetline-sim demo`: a single-node cloud, a gateway and a simulated fleet on
//! loopback in one process; live progress; then a drain and a report read back
//! from the `readings` dataset.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use fleetline_cloud::config::CloudConfig;
use fleetline_cloud::keys::Keys;
use fleetline_cloud::telemetry::CloudStats;
use fleetline_gateway::config::GatewayConfig;
use fleetline_wire::provisioning::{DeviceEntry, GatewayEntry, Provisioning};
use fleetline_wire::{DeviceId, DeviceKey, FleetId, GatewayId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::chaos::{Action, ChildProc, Proxy, Step, Target};
use crate::drive::{Drive, DriveParams, Unit};
use crate::html::{Tick, Window};
use crate::model::{Incident, Profile};
use crate::report::{Injected, Latency, OwnersAt, Report, lost, missing_but_queued, read_events, read_readings, score};
use fleetline_device::client::DeviceClient;

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Vehicles.
    pub vehicles: usize,
    /// Wall-clock time of generation.
    pub duration: Duration,
    /// Seed of the fleet.
    pub seed: u64,
    /// Where data goes (default: a new directory under the system's temp dir, kept).
    pub data_dir: Option<PathBuf>,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// Longest wait for everything sent to be acked and stored.
    pub drain_timeout: Duration,
    /// Chaos schedule; non-empty runs the gateway and the cloud as child processes.
    pub chaos: Vec<Step>,
    /// Where to write the HTML report.
    pub report_html: Option<PathBuf>,
    /// Activity profile.
    pub profile: Profile,
    /// Cloud nodes; more than one (or node chaos) runs a cluster sharing a Mosquitto.
    pub cloud_nodes: usize,
    /// Run the cloud as a cluster (child processes, a shared Mosquitto) even with one node.
    pub shared_broker: bool,
    /// Grow and shrink the cluster by the autoscaling rule (starts `cloud_nodes`).
    pub autoscale: Option<AutoscaleOptions>,
    /// Which model deployments the run makes.
    pub models: ModelPlan,
}

/// The model deployments a demo makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModelPlan {
    /// The models committed with the code, version 1 each, alone.
    #[default]
    Committed,
    /// A/B splits and a shadow, then a hot swap halfway: `fuel` and
    /// `speed_next` 50/50 between their two families (the committed model,
    /// version 1, and `alternative.onnx`, version 2); `tire_risk` version 1
    /// live with version 2 (the same trees registered again) in its shadow.
    /// Halfway, `speed_next` moves to 20/80 and `fuel` is rolled back to its
    /// first deployment.
    Ab,
}

/// `--autoscale`: the rule and how often it is applied.
#[derive(Clone, Debug)]
pub struct AutoscaleOptions {
    /// The rule (bounds, target, schedule, stabilization).
    pub rule: crate::autoscale::Rule,
    /// How often the load is read and the rule applied.
    pub poll: Duration,
}

/// The fleet's id.
pub const FLEET: &str = "demo";

/// Device id of vehicle `i`.
pub fn vehicle_id(i: usize) -> String {
    format!("v-{i:05}")
}

/// A key derived from the seed (a demo's keys need not be secret, only distinct).
fn key(seed: u64, domain: u8, i: usize) -> DeviceKey {
    let mut r = crate::rng::Rng::new(seed ^ (u64::from(domain) << 56), i as u64);
    let mut k = [0u8; 32];
    for chunk in k.chunks_mut(8) {
        chunk.copy_from_slice(&r.next_u64().to_le_bytes());
    }
    DeviceKey::from_bytes(k)
}

/// Where a demo fleet's keys come from.
#[derive(Clone, Copy, Debug)]
pub enum KeySource {
    /// From the OS's random source.
    Random,
    /// Derived from a seed: repeatable, and known to anyone who knows the seed.
    Seeded(u64),
}

impl KeySource {
    fn key(self, domain: u8, i: usize) -> DeviceKey {
        match self {
            Self::Seeded(seed) => key(seed, domain, i),
            Self::Random => {
                let mut k = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
                DeviceKey::from_bytes(k)
            }
        }
    }
}

/// The provisioning of a demo fleet: `vehicles` units and one gateway `gw-1`.
pub fn provisioning(keys: KeySource, vehicles: usize) -> anyhow::Result<Provisioning> {
    let mut p = Provisioning::default();
    let fleet = FleetId::new(FLEET)?;
    for i in 0..vehicles {
        p.upsert_device(DeviceEntry {
            fleet,
            device: DeviceId::new(&vehicle_id(i))?,
            key: keys.key(1, i),
            previous: None,
            revoked: false,
        });
    }
    p.upsert_gateway(GatewayEntry { id: GatewayId::new("gw-1")?, key: keys.key(2, 1) });
    Ok(p)
}

/// Sends a request with a JSON body; the status and the body.
async fn http_send(addr: &str, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// Deploys a model through the cloud's REST API.
async fn deploy(addr: &str, model: &str, variants: &[(&str, u32, u32)], shadow: Option<u32>) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "variants": variants.iter().map(|(l, v, w)| serde_json::json!({"label": l, "version": v, "weight": w})).collect::<Vec<_>>(),
        "shadow": shadow,
    });
    let (status, text) = http_send(addr, "PUT", &format!("/models/{model}/deployment"), &body.to_string()).await?;
    anyhow::ensure!(status == 200, "deploying {model}: HTTP {status}: {text}");
    Ok(())
}

/// Registers `bytes` as a version of `model`; its number.
async fn upload(addr: &str, model: &str, bytes: &[u8], card: serde_json::Value) -> anyhow::Result<u32> {
    use base64::Engine;
    let body = serde_json::json!({"onnx": base64::engine::general_purpose::STANDARD.encode(bytes), "card": card});
    let (status, text) = http_send(addr, "POST", &format!("/models/{model}/versions"), &body.to_string()).await?;
    anyhow::ensure!(status == 201, "uploading {model}: HTTP {status}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["version"].as_u64().map(|v| v as u32).context("no version in the answer")
}

/// The committed models' files, as the demo uploads them.
mod files {
    pub(super) const FUEL_ALT: &[u8] = include_bytes!("../../models/fuel/alternative.onnx");
    pub(super) const FUEL_ALT_CARD: &str = include_str!("../../models/fuel/alternative.json");
    pub(super) const SPEED_ALT: &[u8] = include_bytes!("../../models/speed_next/alternative.onnx");
    pub(super) const SPEED_ALT_CARD: &str = include_str!("../../models/speed_next/alternative.json");
    pub(super) const TIRE: &[u8] = include_bytes!("../../models/tire_risk/model.onnx");
}

/// Makes the plan's first deployments; what they are, for the report.
async fn deploy_models(addr: &str, plan: ModelPlan) -> anyhow::Result<Vec<crate::predictions::PlannedDeployment>> {
    use crate::predictions::PlannedDeployment;
    let committed = |model: &str| PlannedDeployment {
        model: model.into(),
        variants: vec![("A".into(), 1, 100)],
        shadow: None,
        from_ms: i64::MIN,
        said: format!("{model}: A=v1 (committed)"),
    };
    let mut out: Vec<PlannedDeployment> = ["tire_risk", "fuel", "speed_next"].map(committed).into();
    if plan == ModelPlan::Committed {
        return Ok(out);
    }
    let card = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
    let fuel2 = upload(addr, "fuel", files::FUEL_ALT, card(files::FUEL_ALT_CARD)).await?;
    let speed2 = upload(addr, "speed_next", files::SPEED_ALT, card(files::SPEED_ALT_CARD)).await?;
    // The same trees registered again (an unknown protobuf field appended):
    // another version whose scores must equal version 1's.
    let mut tire = files::TIRE.to_vec();
    tire.extend_from_slice(&[0xa2, 0x06, 0x01, 0x02]);
    let tire2 = upload(addr, "tire_risk", &tire, serde_json::json!({"note": "version 1 registered again"})).await?;
    deploy(addr, "fuel", &[("A", 1, 50), ("B", fuel2, 50)], None).await?;
    deploy(addr, "speed_next", &[("A", 1, 50), ("B", speed2, 50)], None).await?;
    deploy(addr, "tire_risk", &[("A", 1, 100)], Some(tire2)).await?;
    let split = |model: &str, b: u32, wa: u32, wb: u32, shadow: Option<u32>, said: String| PlannedDeployment {
        model: model.into(),
        variants: if wb == 0 { vec![("A".into(), 1, wa)] } else { vec![("A".into(), 1, wa), ("B".into(), b, wb)] },
        shadow,
        from_ms: i64::MIN,
        said,
    };
    out = vec![
        split("fuel", fuel2, 50, 50, None, format!("fuel: A=v1 (linear) 50, B=v{fuel2} (trees) 50")),
        split("speed_next", speed2, 50, 50, None, format!("speed_next: A=v1 (trees) 50, B=v{speed2} (linear) 50")),
        split("tire_risk", tire2, 100, 0, Some(tire2), format!("tire_risk: A=v1 100, shadow v{tire2}")),
    ];
    Ok(out)
}

/// The plan's hot swap, halfway: `speed_next` to 20/80, `fuel` rolled back.
async fn swap_models(
    addr: &str,
    deployed: &[crate::predictions::PlannedDeployment],
    at_ms: i64,
) -> anyhow::Result<Vec<crate::predictions::PlannedDeployment>> {
    use crate::predictions::PlannedDeployment;
    let speed2 = deployed.iter().find(|d| d.model == "speed_next").and_then(|d| d.variants.get(1)).map_or(2, |v| v.1);
    deploy(addr, "speed_next", &[("A", 1, 20), ("B", speed2, 80)], None).await?;
    let (status, text) = http_send(addr, "POST", "/models/fuel/rollback", "").await?;
    anyhow::ensure!(status == 200, "rolling fuel back: HTTP {status}: {text}");
    Ok(vec![
        PlannedDeployment {
            model: "speed_next".into(),
            variants: vec![("A".into(), 1, 20), ("B".into(), speed2, 80)],
            shadow: None,
            from_ms: at_ms,
            said: format!("speed_next: A=v1 20, B=v{speed2} 80 (hot swap)"),
        },
        PlannedDeployment {
            model: "fuel".into(),
            variants: vec![("A".into(), 1, 100)],
            shadow: None,
            from_ms: at_ms,
            said: "fuel: rolled back to A=v1 (hot swap)".into(),
        },
    ])
}

async fn http_get(addr: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    Ok(serde_json::from_str(body)?)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs the demo; the report says whether anything was lost or duplicated.
pub async fn run(opts: DemoOptions) -> anyhow::Result<Report> {
    let dir = match &opts.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tempfile::Builder::new().prefix("fleetline-demo-").tempdir()?.keep(),
    };
    let lake = dir.join("lake");
    let prov_path = dir.join("provisioning.toml");
    let prov = provisioning(KeySource::Random, opts.vehicles)?;
    prov.save(&prov_path)?;
    let shard_count = 16;
    let silent_after = silent_after(&opts);

    let cluster = opts.cloud_nodes > 1
        || opts.shared_broker
        || opts.autoscale.is_some()
        || opts.chaos.iter().any(|s| s.action.is_cluster());
    if let Some(a) = &opts.autoscale {
        anyhow::ensure!(opts.chaos.is_empty(), "--autoscale runs without --chaos (both would start and stop nodes)");
        anyhow::ensure!(
            a.rule.min <= opts.cloud_nodes.max(1) && opts.cloud_nodes.max(1) <= a.rule.max,
            "--cloud-nodes must lie between the autoscaler's --min-nodes and --max-nodes"
        );
    }
    let services = if opts.chaos.is_empty() && !cluster {
        Services::in_process(&dir, &prov, shard_count, opts.vehicles, silent_after).await?
    } else {
        let added = match &opts.autoscale {
            Some(a) => a.rule.max - opts.cloud_nodes.max(1),
            None => opts.chaos.iter().filter(|s| s.action == Action::AddNode).count(),
        };
        let nodes = if cluster { Some((opts.cloud_nodes.max(1), added)) } else { None };
        Services::children(&dir, shard_count, opts.vehicles, silent_after, nodes).await?
    };
    let devices_port = services.devices_port;
    let cloud_http = services.cloud_http().await.context("the cloud's HTTP address")?;
    let mut deployments = deploy_models(&cloud_http, opts.models).await?;
    let chaos_log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));

    // The fleet.
    let units = units(&prov, opts.vehicles)?;
    let mut drive = Drive::start(DriveParams {
        host: "127.0.0.1".into(),
        port: devices_port,
        tls: None,
        units,
        fleet_size: opts.vehicles,
        seed: opts.seed,
        duration: opts.duration,
        time_scale: opts.time_scale,
        profile: opts.profile,
    })
    .await?;
    let (started, scale, t0_ms, sent) = (drive.started, opts.time_scale.max(0.01), drive.t0_ms, drive.sent.clone());
    let start_unix_ms = unix_ms();
    let incidents = drive.incidents.clone();
    let chaos_task = services.run_chaos(opts.chaos.clone(), started, chaos_log.clone());
    let fleet_clock = move || t0_ms as i64 + (started.elapsed().as_secs_f64() * scale * 1000.0) as i64;
    let autoscaler = opts.autoscale.as_ref().and_then(|a| services.run_autoscaler(a, started, fleet_clock));

    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(opts.duration.as_secs().max(1));
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let progress = async |phase: &str| {
        format!("{phase}: sent {} · stored {}", sent.load(Ordering::Relaxed), services.stored().await)
    };
    let mut ticks: Vec<Tick> = Vec::new();
    let sample = async |ticks: &mut Vec<Tick>| {
        if ticks.last().is_none_or(|t| started.elapsed().as_secs_f64() - t.t >= 1.0) {
            // A process that is down (chaos) reports nothing: keep its last values.
            let last = ticks.last().copied().unwrap_or_default();
            let backlog = services.gateway_status().await["queue"]["records"].as_u64().unwrap_or(last.backlog);
            ticks.push(Tick {
                t: started.elapsed().as_secs_f64(),
                sent: sent.load(Ordering::Relaxed),
                stored: services.stored().await.max(last.stored),
                backlog,
            });
        }
    };
    let mut swapped = opts.models != ModelPlan::Ab;
    while !drive.finished() {
        if !swapped && started.elapsed() >= opts.duration / 2 {
            swapped = true;
            match swap_models(&cloud_http, &deployments, fleet_clock()).await {
                Ok(d) => deployments.extend(d),
                Err(e) => tracing::warn!(error = %e, "the models' hot swap failed"),
            }
        }
        bar.set_position(started.elapsed().as_secs().min(opts.duration.as_secs()));
        bar.set_message(progress("driving").await);
        sample(&mut ticks).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refuels = drive.join().await;
    let generated = started.elapsed();
    // Chaos that outlasts the drive (a stop still running) finishes first.
    if let Some(t) = chaos_task {
        let _ = t.await;
    }

    // Drain: every unit's batches acked by the gateway, the gateway's queue acked by the cloud.
    let deadline = Instant::now() + opts.drain_timeout;
    bar.set_message(progress("draining units").await);
    drive.drain(deadline).await;
    loop {
        let s = services.gateway_status().await;
        if s["queue"]["records"].as_u64() == Some(0) || Instant::now() > deadline {
            break;
        }
        bar.set_message(progress("draining gateway").await);
        sample(&mut ticks).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let autoscale = match autoscaler {
        Some((stop, task)) => {
            let _ = stop.send(true);
            task.await.ok()
        }
        None => None,
    };
    services.flush_cloud().await;
    let run_wall = started.elapsed();
    sample(&mut ticks).await;
    bar.finish_and_clear();

    let totals = UnitTotals::of(&drive.clients);
    // Stop: units, gateway (commits its queue), cloud shards (commit; nothing is open).
    let drained = services.gateway_status().await["queue"]["records"].as_u64() == Some(0);
    for c in std::mem::take(&mut drive.clients) {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.shutdown(Duration::from_millis(100)).await;
        }
    }
    let scale_steps: Vec<(String, u64)> = autoscale.as_ref().map(|a| a.step_times.clone()).unwrap_or_default();
    let cluster = services.cluster_report(&opts.chaos, &scale_steps, run_wall, &lake, shard_count).await?;
    services.stop().await;
    // What the gateway still held when it stopped: acked to its unit, not yet to the cloud.
    let queued = if drained { HashMap::new() } else { still_queued(&dir.join("gw-1").join("queue"))? };

    // Latency is measured on the wall clock: a reading's simulated time maps back to
    // when the model produced it (the same instant when the time scale is 1).
    let wall_start = (t0_ms + drive.sim_secs * 1000) as i64 - opts.duration.as_millis() as i64;
    let to_wall = |ts: i64| wall_start + ((ts - t0_ms as i64) as f64 / scale) as i64;
    let stored = read_readings(&lake.join("readings"), &to_wall)?;
    let truth: Vec<&Incident> = incidents.iter().chain(refuels.iter()).collect();
    let injected = ground_truth(&dir, &truth, t0_ms)?;
    let detected = read_events(&lake.join("events"))?;
    let kinds = crate::model::IncidentKind::ALL.map(crate::model::IncidentKind::name);
    let events = score(&detected, &injected, &kinds);
    let models = crate::predictions::judge(
        &crate::predictions::read_predictions(&lake.join("predictions"))?,
        &crate::predictions::read_minutes(&lake.join("aggregates"))?,
        &injected,
        &detected,
        &deployments,
        0.5,
        // Commits in flight at a swap still score with the deployment before.
        (5_000.0 * scale) as i64,
    );

    let report = Report {
        vehicles: opts.vehicles,
        duration_s: generated.as_secs_f64(),
        time_scale: scale,
        seed: opts.seed,
        samples_sent: totals.recorded,
        samples_acked: totals.acked.values().sum(),
        samples_stored: stored.distinct,
        samples_lost: lost(&totals.acked, &stored, &queued),
        samples_still_queued: missing_but_queued(&totals.acked, &stored, &queued),
        samples_duplicated: stored.rows - stored.distinct,
        throughput_samples_per_s: stored.distinct as f64 / run_wall.as_secs_f64(),
        e2e_latency_ms: stored.e2e,
        ingest_latency_ms: stored.ingest,
        events,
        readings_parquet_glob: format!("{}/readings/**/*.parquet", lake.display()),
        chaos: chaos_log.lock().map(|l| l.clone()).unwrap_or_default(),
        samples_refused: totals.refused,
        parquet_files: stored.files,
        unit_connects: totals.connects,
        unit_connection_errors: totals.connection_errors,
        unit_resends: totals.resends,
        data_dir: dir.display().to_string(),
        cluster,
        autoscale: autoscale.map(|a| a.report),
        models: Some(models),
    };

    if let Some(path) = &opts.report_html {
        write_html(path, &report, &ticks, &stored, start_unix_ms, &opts.chaos)?;
    }

    Ok(report)
}

/// The demo's units, with their keys from the provisioning.
fn units(prov: &Provisioning, vehicles: usize) -> anyhow::Result<Vec<Unit>> {
    let fleet = FleetId::new(FLEET)?;
    (0..vehicles)
        .map(|i| {
            let device = DeviceId::new(&vehicle_id(i))?;
            let key = prov.device(&fleet, &device).map(|d| d.key.clone()).context("unit missing from provisioning")?;
            Ok(Unit { index: i, fleet, device, key })
        })
        .collect()
}

/// What the units saw, summed over the fleet.
struct UnitTotals {
    /// Samples per batch the gateway acked to its unit.
    acked: HashMap<(String, u32, u32), u64>,
    refused: u64,
    recorded: u64,
    connects: u64,
    connection_errors: u64,
    resends: u64,
}

impl UnitTotals {
    fn of(clients: &[Arc<DeviceClient>]) -> Self {
        let mut t =
            Self { acked: HashMap::new(), refused: 0, recorded: 0, connects: 0, connection_errors: 0, resends: 0 };
        for (i, c) in clients.iter().enumerate() {
            for r in c.take_acked() {
                t.acked.insert((vehicle_id(i), r.epoch, r.seq), u64::from(r.samples));
            }
            let s = c.stats();
            t.refused += s.core.readings_refused + s.core.readings_invalid;
            t.recorded += s.core.readings_recorded;
            t.connects += s.connects;
            t.connection_errors += s.connection_errors;
            t.resends += s.core.resends;
        }
        t
    }
}

/// Writes `ground-truth.json` (every incident, by vehicle and start) and returns the
/// incidents as the scoring takes them.
fn ground_truth(dir: &std::path::Path, truth: &[&Incident], t0_ms: u64) -> anyhow::Result<Vec<Injected>> {
    let mut truth = truth.to_vec();
    truth.sort_by_key(|i| (i.vehicle, i.start_s));
    let json: Vec<serde_json::Value> = truth
        .iter()
        .map(|i| {
            serde_json::json!({
                "fleet": FLEET,
                "device_id": vehicle_id(i.vehicle),
                "kind": i.kind,
                "wheel": i.wheel,
                "start_ms": t0_ms + i.start_s * 1000,
                "end_ms": t0_ms + i.end_s * 1000,
                "matures": i.matures,
            })
        })
        .collect();
    std::fs::write(dir.join("ground-truth.json"), serde_json::to_vec_pretty(&json)?)?;
    Ok(truth
        .iter()
        .map(|i| Injected {
            device: vehicle_id(i.vehicle),
            kind: i.kind.name(),
            wheel: i.wheel.map(|w| {
                let wh = crate::model::WHEELS[w];
                fleetline_cloud::analytics::wheel_name(usize::from(wh.row - 1) * 2 + usize::from(wh.right))
            }),
            start_ms: (t0_ms + i.start_s * 1000) as i64,
            end_ms: (t0_ms + i.end_s * 1000) as i64,
            matures: i.matures,
        })
        .collect())
}

/// The HTML report: throughput, latency by commit second, backlog, chaos windows.
fn write_html(
    path: &std::path::Path,
    report: &Report,
    ticks: &[Tick],
    stored: &crate::report::Stored,
    start_unix_ms: u64,
    chaos: &[Step],
) -> anyhow::Result<()> {
    let latency: Vec<(f64, f64, f64)> = stored
        .latency_by_second
        .iter()
        .map(|(sec, v)| {
            let l = Latency::of(v.clone());
            ((sec * 1000 - start_unix_ms as i64) as f64 / 1000.0, l.p50 as f64, l.max as f64)
        })
        .collect();
    let windows: Vec<Window> = chaos
        .iter()
        .map(|s| {
            let d = match s.action {
                Action::Kill(_) => Duration::from_secs(1),
                Action::Stop(_, d) | Action::UplinkOutage(d) | Action::StopNode(_, d) | Action::FreezeNode(_, d) => d,
                Action::KillNode(_, back) => back.unwrap_or(Duration::from_secs(1)),
                Action::AddNode | Action::DrainNode(_) => Duration::from_secs(1),
            };
            Window { from: s.at.as_secs_f64(), to: (s.at + d).as_secs_f64(), label: s.to_string() }
        })
        .collect();
    std::fs::write(path, crate::html::page(report, ticks, &latency, &windows))
        .with_context(|| format!("writing {}", path.display()))
}

/// Starts `role` (a child of this binary) with the config `config(port)` for a
/// freshly picked port. A port picked free can be taken before the child binds it
/// (other processes' outgoing connections use the same range): then it picks again,
/// up to five times.
async fn start_on_free_port(
    exe: &std::path::Path,
    role: &str,
    cfg_path: &std::path::Path,
    log: &std::path::Path,
    config: impl Fn(u16) -> String,
) -> anyhow::Result<(ChildProc, u16)> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port()?;
        std::fs::write(cfg_path, config(port))?;
        let args = vec![role.to_string(), "--config".to_string(), cfg_path.display().to_string()];
        match ChildProc::start(exe, args, log).await {
            Ok(child) => return Ok((child, port)),
            Err(e) if attempt >= ATTEMPTS => return Err(e),
            Err(e) => tracing::warn!(role, error = %e, "child did not start; retrying on another port"),
        }
    }
}

/// Samples per batch (device, epoch, seq) in a stopped gateway's queue, unacked.
fn still_queued(dir: &std::path::Path) -> anyhow::Result<HashMap<(String, u32, u32), u64>> {
    let mut out = HashMap::new();
    let cfg = fleetline_gateway::queue::QueueConfig {
        dir: dir.to_path_buf(),
        budget_bytes: u64::MAX,
        segment_bytes: 16 << 20,
        commit_interval: Duration::from_millis(10),
        policy: fleetline_gateway::queue::FullPolicy::Backpressure,
    };
    let (handle, _, thread) = fleetline_gateway::queue::open(
        cfg,
        |_, meta, batch| {
            if let Ok(h) = fleetline_wire::peek_header(batch) {
                out.insert((h.device.to_string(), h.epoch, h.seq), u64::from(meta.samples));
            }
        },
        None,
    )
    .with_context(|| format!("reading the gateway's queue in {}", dir.display()))?;
    drop(handle);
    let _ = thread.join();
    Ok(out)
}

/// The gateway and the cloud node: in this process, or child processes of this
/// binary (with chaos).
struct Services {
    devices_port: u16,
    inner: Inner,
}

enum Inner {
    InProcess {
        cloud: Box<fleetline_cloud::node::Running>,
        cloud_stats: Arc<CloudStats>,
        gw_http: String,
        gw_stop: watch::Sender<bool>,
        gateway: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
    Children {
        /// Cloud nodes (one without a cluster), the slots of nodes added later included.
        nodes: Vec<Arc<tokio::sync::Mutex<ChildProc>>>,
        gateway: Arc<tokio::sync::Mutex<ChildProc>>,
        proxy: Arc<Proxy>,
        cluster: Option<Box<ClusterRun>>,
    },
}

/// The cluster side of a run: the shared broker, which nodes are live, and what
/// the shards' heads did.
struct ClusterRun {
    broker: crate::chaos::Mosquitto,
    /// Nodes started at the beginning.
    started: usize,
    /// The next slot an `add-node` starts.
    next: Arc<std::sync::atomic::AtomicUsize>,
    /// Indexes of the nodes alive and not frozen.
    live: Arc<std::sync::Mutex<std::collections::BTreeSet<usize>>>,
    /// The heads, polled.
    polls: Arc<std::sync::Mutex<Vec<OwnersAt>>>,
    watcher: tokio::task::JoinHandle<()>,
    /// Every slot's HTTP address.
    http: Vec<String>,
}

/// Polls every shard's head every 100 ms; records the owners whenever they (or
/// the set of live nodes) change.
fn watch_heads(
    lake: PathBuf,
    shard_count: u16,
    started: Instant,
    live: Arc<std::sync::Mutex<std::collections::BTreeSet<usize>>>,
    polls: Arc<std::sync::Mutex<Vec<OwnersAt>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let cfg = fleetline_cloud::lake::store::StorageConfig { url: lake.display().to_string(), ..Default::default() };
        let Ok(store) =
            fleetline_cloud::lake::store::StoreSpec::parse(&cfg).map_err(anyhow::Error::msg).and_then(|s| s.open(&cfg))
        else {
            return;
        };
        loop {
            let mut owners = Vec::with_capacity(usize::from(shard_count));
            for s in 0..shard_count {
                let head = fleetline_cloud::shard::read_head(&store, s, shard_count).await;
                owners.push(head.ok().and_then(|(h, _)| h.owner));
            }
            let live_ids: Vec<String> =
                live.lock().map(|l| l.iter().map(|i| node_id(*i)).collect()).unwrap_or_default();
            let unowned = owners.iter().filter(|o| !o.as_ref().is_some_and(|o| live_ids.contains(o))).count();
            let t_ms = started.elapsed().as_millis() as u64;
            if let Ok(mut p) = polls.lock()
                && p.last().is_none_or(|last| last.owners != owners || last.unowned != unowned)
            {
                p.push(OwnersAt { t_ms, owners, unowned });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// What the autoscaler did, and when each step was taken (for the cluster report).
struct AutoscaleOutcome {
    report: crate::autoscale::AutoscaleReport,
    step_times: Vec<(String, u64)>,
}

/// Node id of cluster node `i`.
fn node_id(i: usize) -> String {
    format!("cloud-{i}")
}

/// The cloud's `analytics.silent_after` for a run: silence is judged on the
/// gateway's (wall) clock, while the model's units fall silent for an eighth of the
/// simulated run (15 s to 30 min of simulated time) and, off duty, report once a
/// simulated minute. Shorter than the one, longer than the other and than a
/// unit's batch interval where the time scale lets it be.
fn silent_after(opts: &DemoOptions) -> Duration {
    let scale = opts.time_scale.max(0.01);
    let simulated = (opts.duration.as_secs_f64() * scale).max(60.0);
    let silent_wall = (simulated / 8.0).clamp(15.0, 1800.0) / scale;
    let off_duty_wall = if opts.profile == Profile::Daily { 60.0 / scale } else { 0.0 };
    Duration::from_secs_f64((silent_wall * 0.6).max(off_duty_wall * 1.5).max(5.0))
}

/// A port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Services {
    async fn in_process(
        dir: &std::path::Path,
        prov: &Provisioning,
        shard_count: u16,
        vehicles: usize,
        silent_after: Duration,
    ) -> anyhow::Result<Self> {
        let prov_path = dir.join("provisioning.toml");
        let lake = dir.join("lake");
        // Cloud node: embedded broker, local lake.
        let mut cloud_cfg = CloudConfig { shard_count, provisioning: prov_path.clone(), ..Default::default() };
        cloud_cfg.broker.listen = "127.0.0.1:0".parse()?;
        cloud_cfg.storage.url = lake.display().to_string();
        cloud_cfg.segment.max_age = Duration::from_secs(1);
        cloud_cfg.analytics.silent_after = silent_after;
        cloud_cfg.http.listen = "127.0.0.1:0".parse()?;
        cloud_cfg.validate().map_err(anyhow::Error::msg)?;
        let spec = fleetline_cloud::lake::store::StoreSpec::parse(&cloud_cfg.storage).map_err(anyhow::Error::msg)?;
        let store = spec.open(&cloud_cfg.storage)?;
        let cloud_stats = Arc::new(CloudStats::default());
        let keys = Arc::new(Keys::fixed(prov.clone()));
        let cloud = fleetline_cloud::node::start(&cloud_cfg, store, keys, cloud_stats.clone(), None)
            .await
            .context("starting the cloud node")?;
        let broker: std::net::SocketAddr =
            cloud.listening.broker.clone().context("embedded broker address")?.parse()?;
        let mut gw_cfg = GatewayConfig {
            id: "gw-1".into(),
            data_dir: dir.join("gw-1"),
            provisioning: prov_path,
            shard_count,
            ..Default::default()
        };
        gw_cfg.devices.listen = "127.0.0.1:0".parse()?;
        gw_cfg.devices.max_connections = vehicles + 64;
        gw_cfg.uplink.host = "127.0.0.1".into();
        gw_cfg.uplink.port = broker.port();
        gw_cfg.http.listen = "127.0.0.1:0".parse()?;
        let (gw_stop, stop_rx) = watch::channel(false);
        let (listen_tx, listen_rx) = tokio::sync::oneshot::channel();
        let gateway = tokio::spawn(fleetline_gateway::app::run(gw_cfg, None, stop_rx, move |l| {
            let _ = listen_tx.send(l.clone());
        }));
        let gw = listen_rx.await.context("gateway did not start")?;
        Ok(Self {
            devices_port: gw.devices.parse::<std::net::SocketAddr>()?.port(),
            inner: Inner::InProcess { cloud: Box::new(cloud), cloud_stats, gw_http: gw.http, gw_stop, gateway },
        })
    }

    /// The gateway and the cloud as child processes. `nodes`: a cluster of that
    /// many nodes plus slots for nodes added later, sharing a Mosquitto; `None`:
    /// one node with its embedded broker.
    async fn children(
        dir: &std::path::Path,
        shard_count: u16,
        vehicles: usize,
        silent_after: Duration,
        nodes: Option<(usize, usize)>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let prov = dir.join("provisioning.toml");
        let common = |broker: &str, http: &str| {
            format!(
                "shard_count = {shard_count}\nprovisioning = \"{}\"\n[broker]\n{broker}\n[storage]\nurl = \"{}\"\n[segment]\nmax_age = \"1s\"\n[analytics]\nsilent_after = \"{}ms\"\n[http]\nlisten = \"{http}\"\n",
                prov.display(),
                dir.join("lake").display(),
                silent_after.as_millis()
            )
        };
        let (cloud_nodes, uplink_port, cluster) = match nodes {
            None => {
                let cloud_cfg = dir.join("cloud.toml");
                let (cloud, broker_port) =
                    start_on_free_port(&exe, "__cloud", &cloud_cfg, &dir.join("cloud.log"), |port| {
                        format!(
                            "node_id = \"cloud-1\"\n{}",
                            common(&format!("listen = \"127.0.0.1:{port}\""), "127.0.0.1:0")
                        )
                    })
                    .await?;
                (vec![Arc::new(tokio::sync::Mutex::new(cloud))], broker_port, None)
            }
            Some((n, added)) => {
                let broker = crate::chaos::Mosquitto::start(dir).await?;
                let ports: Vec<u16> = (0..n + added).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
                let mut procs = Vec::new();
                for (i, port) in ports.iter().enumerate() {
                    let peers: Vec<String> = ports
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, p)| format!("\"127.0.0.1:{p}\""))
                        .collect();
                    let cfg = dir.join(format!("{}.toml", node_id(i)));
                    std::fs::write(
                        &cfg,
                        format!(
                            "node_id = \"{}\"\n{}[cluster]\nmode = \"static\"\npeers = [{}]\nstable_margin = \"2s\"\nprobe_interval = \"500ms\"\ndown_after = \"3s\"\nround_interval = \"500ms\"\nhandover_timeout = \"10s\"\n",
                            node_id(i),
                            common(
                                &format!("url = \"mqtt://127.0.0.1:{}\"", broker.port),
                                &format!("127.0.0.1:{port}")
                            ),
                            peers.join(", ")
                        ),
                    )?;
                    let args = vec!["__cloud".to_string(), "--config".to_string(), cfg.display().to_string()];
                    let mut p = ChildProc::new(&exe, args, &dir.join(format!("{}.log", node_id(i))));
                    if i < n {
                        p.restart().await.with_context(|| format!("starting {}", node_id(i)))?;
                    }
                    procs.push(Arc::new(tokio::sync::Mutex::new(p)));
                }
                let port = broker.port;
                let live = Arc::new(std::sync::Mutex::new((0..n).collect()));
                let polls = Arc::new(std::sync::Mutex::new(Vec::new()));
                let watcher = watch_heads(dir.join("lake"), shard_count, Instant::now(), live.clone(), polls.clone());
                let run = ClusterRun {
                    broker,
                    started: n,
                    next: Arc::new(std::sync::atomic::AtomicUsize::new(n)),
                    live,
                    polls,
                    watcher,
                    http: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
                };
                (procs, port, Some(Box::new(run)))
            }
        };
        let proxy = Proxy::start("127.0.0.1:0".parse()?, format!("127.0.0.1:{uplink_port}").parse()?).await?;
        let gw_cfg = dir.join("gw-1.toml");
        let (gateway, devices_port) = start_on_free_port(&exe, "__gateway", &gw_cfg, &dir.join("gw-1.log"), |port| {
            format!(
                "id = \"gw-1\"\ndata_dir = \"{}\"\nprovisioning = \"{}\"\nshard_count = {shard_count}\n[devices]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = {}\n[uplink]\nhost = \"127.0.0.1\"\nport = {}\nresend_after = \"3s\"\nbackoff_max = \"1s\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
                dir.join("gw-1").display(),
                prov.display(),
                vehicles + 64,
                proxy.addr.port()
            )
        })
        .await?;
        Ok(Self {
            devices_port,
            inner: Inner::Children {
                nodes: cloud_nodes,
                gateway: Arc::new(tokio::sync::Mutex::new(gateway)),
                proxy: Arc::new(proxy),
                cluster,
            },
        })
    }

    /// Runs the schedule in the background (children only); logs what was done.
    fn run_chaos(
        &self,
        steps: Vec<Step>,
        started: Instant,
        log: Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let Inner::Children { nodes, gateway, proxy, cluster } = &self.inner else { return None };
        let (nodes, gateway, proxy) = (nodes.clone(), gateway.clone(), proxy.clone());
        let live = cluster.as_ref().map(|c| c.live.clone());
        let next = cluster.as_ref().map(|c| c.next.clone());
        Some(tokio::spawn(async move {
            let mut running = Vec::new();
            for step in steps {
                tokio::time::sleep_until((started + step.at).into()).await;
                let (nodes, gateway, proxy, log) = (nodes.clone(), gateway.clone(), proxy.clone(), log.clone());
                let (live, next) = (live.clone(), next.clone());
                // Each step runs on its own, so a long stop does not delay the next step.
                running.push(tokio::spawn(async move {
                    let set_live = |i: usize, up: bool| {
                        if let Some(l) = &live
                            && let Ok(mut l) = l.lock()
                        {
                            if up {
                                l.insert(i)
                            } else {
                                l.remove(&i)
                            };
                        }
                    };
                    let node = |i: usize| nodes.get(i).cloned();
                    let t0 = started.elapsed();
                    let note = match step.action {
                        Action::Kill(Target::Gateway) => {
                            gateway.lock().await.kill9().await;
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            restart(&mut *gateway.lock().await).await
                        }
                        Action::Stop(Target::Gateway, d) => {
                            let status = gateway.lock().await.terminate().await;
                            tokio::time::sleep(d).await;
                            format!(
                                "exit {:?}; {}",
                                status.and_then(|s| s.code()),
                                restart(&mut *gateway.lock().await).await
                            )
                        }
                        Action::UplinkOutage(d) => {
                            proxy.set_up(false);
                            tokio::time::sleep(d).await;
                            proxy.set_up(true);
                            "restored".to_string()
                        }
                        Action::Kill(Target::Cloud) | Action::KillNode(..) => {
                            let (i, back) = match step.action {
                                Action::KillNode(i, back) => (i, back),
                                _ => (0, Some(Duration::from_secs(1))),
                            };
                            match node(i) {
                                None => format!("no node {i}"),
                                Some(p) => {
                                    set_live(i, false);
                                    p.lock().await.kill9().await;
                                    match back {
                                        None => "killed".into(),
                                        Some(d) => {
                                            tokio::time::sleep(d).await;
                                            let r = restart(&mut *p.lock().await).await;
                                            set_live(i, true);
                                            r
                                        }
                                    }
                                }
                            }
                        }
                        Action::Stop(Target::Cloud, d) | Action::StopNode(_, d) => {
                            let i = if let Action::StopNode(i, _) = step.action { i } else { 0 };
                            match node(i) {
                                None => format!("no node {i}"),
                                Some(p) => {
                                    set_live(i, false);
                                    let status = p.lock().await.terminate().await;
                                    tokio::time::sleep(d).await;
                                    let r = restart(&mut *p.lock().await).await;
                                    set_live(i, true);
                                    format!("exit {:?}; {r}", status.and_then(|s| s.code()))
                                }
                            }
                        }
                        Action::FreezeNode(i, d) => match node(i) {
                            None => format!("no node {i}"),
                            Some(p) => {
                                set_live(i, false);
                                let stopped = p.lock().await.signal("STOP");
                                tokio::time::sleep(d).await;
                                let resumed = p.lock().await.signal("CONT");
                                set_live(i, true);
                                format!("SIGSTOP {stopped}, SIGCONT {resumed}")
                            }
                        },
                        Action::AddNode => {
                            let i = next.as_ref().map_or(usize::MAX, |n| n.fetch_add(1, Ordering::Relaxed));
                            match node(i) {
                                None => "no slot for another node".into(),
                                Some(p) => {
                                    let r = restart(&mut *p.lock().await).await;
                                    set_live(i, true);
                                    format!("{} {r}", node_id(i))
                                }
                            }
                        }
                        Action::DrainNode(i) => match node(i) {
                            None => format!("no node {i}"),
                            Some(p) => {
                                set_live(i, false);
                                let status = p.lock().await.terminate().await;
                                format!("drained, exit {:?}", status.and_then(|s| s.code()))
                            }
                        },
                    };
                    let line = format!(
                        "{step} (at {:.1}s; {note} at {:.1}s)",
                        t0.as_secs_f64(),
                        started.elapsed().as_secs_f64()
                    );
                    if let Ok(mut l) = log.lock() {
                        l.push(line);
                    }
                }));
            }
            for r in running {
                let _ = r.await;
            }
        }))
    }

    /// Applies the autoscaling rule every `poll` until told to stop: reads the
    /// cluster's backlog from the lowest live node (`/scaling/load?scope=cluster`,
    /// what KEDA reads), starts the lowest stopped slot to grow, drains the highest
    /// live one (SIGTERM: its shards are handed over) to shrink, one drain at a
    /// time. `fleet_clock` is the fleet's time (the schedule's clock).
    fn run_autoscaler(
        &self,
        opts: &AutoscaleOptions,
        started: Instant,
        fleet_clock: impl Fn() -> i64 + Send + 'static,
    ) -> Option<(watch::Sender<bool>, tokio::task::JoinHandle<AutoscaleOutcome>)> {
        let Inner::Children { nodes, cluster: Some(c), .. } = &self.inner else { return None };
        let (nodes, live, http) = (nodes.clone(), c.live.clone(), c.http.clone());
        let mut scaler = crate::autoscale::Scaler::new(opts.rule.clone());
        let poll = opts.poll;
        let (stop_tx, mut stop) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut out = AutoscaleOutcome {
                report: crate::autoscale::AutoscaleReport::for_rule(scaler.rule()),
                step_times: Vec::new(),
            };
            let draining = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let live_now = |live: &Arc<std::sync::Mutex<std::collections::BTreeSet<usize>>>| {
                live.lock().map(|l| l.clone()).unwrap_or_default()
            };
            loop {
                let running = live_now(&live);
                let mut load = None;
                for i in &running {
                    let got = tokio::time::timeout(
                        Duration::from_secs(2),
                        http_get(&http[*i], "/scaling/load?scope=cluster"),
                    )
                    .await;
                    if let Ok(Ok(v)) = got
                        && let Some(b) = v["backlog_bytes_avg"].as_u64()
                    {
                        let records = v["backlog_records_avg"].as_u64().unwrap_or(0);
                        let rate = v["ingest_records_per_second"].as_f64().unwrap_or(0.0);
                        load = Some((b, records, rate, v["oldest_uncommitted_seconds"].as_f64().unwrap_or(0.0)));
                        break;
                    }
                }
                let now_ms = fleet_clock();
                match load {
                    None => out.report.unread_polls += 1,
                    Some((backlog, records, rate, oldest_s)) => {
                        let current = running.len();
                        let wait = Duration::from_secs_f64(oldest_s.clamp(0.0, 86_400.0));
                        let load = crate::autoscale::Load { rate, backlog, wait };
                        let d = scaler.decide(Instant::now(), current, load, now_ms);
                        let t = started.elapsed();
                        out.report.timeline.push(crate::autoscale::Point {
                            t: (t.as_millis() as f64) / 1000.0,
                            fleet_time: jiff::Timestamp::from_millisecond(now_ms)
                                .map(|ts| ts.to_string())
                                .unwrap_or_default(),
                            nodes: current,
                            rate,
                            backlog_bytes: backlog,
                            backlog_records: records,
                            oldest_s,
                            decision: d,
                        });
                        let busy = draining.load(Ordering::Relaxed) > 0;
                        let step = if d.target > current {
                            // Grow: the lowest stopped slots, as a StatefulSet adds ordinals.
                            let free: Vec<usize> =
                                (0..nodes.len()).filter(|i| !running.contains(i)).take(d.target - current).collect();
                            for i in &free {
                                let r = restart(&mut *nodes[*i].lock().await).await;
                                if let Ok(mut l) = live.lock()
                                    && r == "restarted"
                                {
                                    l.insert(*i);
                                }
                            }
                            Some(format!("scale {current} -> {} (add {:?})", current + free.len(), free))
                        } else if d.target < current && !busy {
                            // Shrink: drain the highest live slot.
                            let i = *running.iter().next_back().unwrap_or(&0);
                            if let Ok(mut l) = live.lock() {
                                l.remove(&i);
                            }
                            let (p, draining) = (nodes[i].clone(), draining.clone());
                            draining.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(async move {
                                p.lock().await.terminate().await;
                                draining.fetch_sub(1, Ordering::Relaxed);
                            });
                            Some(format!("scale {current} -> {} (drain {})", current - 1, node_id(i)))
                        } else {
                            None
                        };
                        if let Some(step) = step {
                            let why = format!(
                                "{rate:.0} records/s -> {} node(s), backlog {} KiB -> {} node(s), oldest wait {oldest_s:.1}s -> {} node(s), schedule {} node(s)",
                                d.for_rate,
                                backlog / 1024,
                                d.for_backlog,
                                d.for_wait,
                                d.scheduled
                            );
                            let n = live_now(&live).len();
                            out.report.steps.push(format!("{step} at {:.1}s: {why}", t.as_secs_f64()));
                            out.step_times.push((step, t.as_millis() as u64));
                            if out.report.node_counts.last() != Some(&n) {
                                out.report.node_counts.push(n);
                            }
                        }
                        if out.report.node_counts.is_empty() {
                            out.report.node_counts.push(current);
                        }
                        out.report.peak_nodes = out.report.peak_nodes.max(live_now(&live).len());
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.changed() => break,
                }
            }
            // A drain still running finishes before the run's totals are read.
            while draining.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        });
        Some((stop_tx, task))
    }

    /// The HTTP address of a cloud node.
    async fn cloud_http(&self) -> Option<String> {
        match &self.inner {
            Inner::InProcess { cloud, .. } => Some(cloud.listening.http.clone()),
            Inner::Children { .. } => self.cloud_https().await.into_iter().next(),
        }
    }

    /// The HTTP addresses of the cloud nodes running now.
    async fn cloud_https(&self) -> Vec<String> {
        let Inner::Children { nodes, .. } = &self.inner else { return Vec::new() };
        let mut out = Vec::new();
        for n in nodes {
            let n = n.lock().await;
            if n.running()
                && let Some(h) = n.addr("http")
            {
                out.push(h);
            }
        }
        out
    }

    /// The cluster's part of the report: what each change did, and the check of
    /// every shard's generations.
    async fn cluster_report(
        &self,
        chaos: &[Step],
        scale_steps: &[(String, u64)],
        run_wall: Duration,
        lake: &std::path::Path,
        shard_count: u16,
    ) -> anyhow::Result<Option<crate::report::ClusterReport>> {
        let Inner::Children { cluster: Some(c), .. } = &self.inner else { return Ok(None) };
        let polls = c.polls.lock().map(|p| p.clone()).unwrap_or_default();
        let actions: Vec<(String, u64)> = chaos
            .iter()
            .filter(|s| {
                s.action.is_cluster()
                    || matches!(s.action, Action::Kill(Target::Cloud) | Action::Stop(Target::Cloud, _))
            })
            .map(|s| (s.to_string(), s.at.as_millis() as u64))
            .chain(scale_steps.iter().cloned())
            .collect();
        let changes = crate::report::cluster_changes(&polls, &actions, run_wall.as_millis() as u64);
        let mut lost: Vec<u64> =
            changes.iter().filter(|c| c.unowned_max > 0).filter_map(|c| c.owned_again_ms).collect();
        lost.sort_unstable();
        let cfg = fleetline_cloud::lake::store::StorageConfig { url: lake.display().to_string(), ..Default::default() };
        let store = fleetline_cloud::lake::store::StoreSpec::parse(&cfg).map_err(anyhow::Error::msg)?.open(&cfg)?;
        let check = fleetline_cloud::jobs::generations::check(&store, shard_count).await?;
        Ok(Some(crate::report::ClusterReport {
            nodes: c.started,
            owned_again_ms_p50: lost.get(lost.len() / 2).copied(),
            owned_again_ms_max: lost.last().copied(),
            shard_moves: changes.iter().map(|c| c.shards_moved).sum(),
            changes,
            files_checked: check.files,
            generations_checked: check.generations,
            claims_checked: check.claims,
            generation_violations: check.violations,
        }))
    }

    async fn gateway_status(&self) -> serde_json::Value {
        let http = match &self.inner {
            Inner::InProcess { gw_http, .. } => Some(gw_http.clone()),
            Inner::Children { gateway, .. } => gateway.lock().await.addr("http"),
        };
        match http {
            Some(h) => http_get(&h, "/status").await.unwrap_or_default(),
            None => serde_json::Value::Null,
        }
    }

    /// Readings committed so far (durable totals, which survive restarts).
    async fn stored(&self) -> u64 {
        match &self.inner {
            Inner::InProcess { cloud_stats, .. } => CloudStats::get(&cloud_stats.readings_stored),
            Inner::Children { .. } => {
                let mut total = 0;
                for h in self.cloud_https().await {
                    let s = http_get(&h, "/status").await.unwrap_or_default();
                    total += s["shards"]
                        .as_array()
                        .map_or(0, |a| a.iter().filter_map(|x| x["totals"]["readings"].as_u64()).sum::<u64>());
                }
                total
            }
        }
    }

    async fn flush_cloud(&self) {
        match &self.inner {
            Inner::InProcess { cloud, .. } => {
                cloud.shards.flush_all().await;
            }
            Inner::Children { .. } => {
                for h in self.cloud_https().await {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(&h).await {
                        let req =
                            "POST /admin/flush HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                        let _ = s.write_all(req.as_bytes()).await;
                        let mut out = Vec::new();
                        let _ = s.read_to_end(&mut out).await;
                    }
                }
            }
        }
    }

    async fn stop(self) {
        match self.inner {
            Inner::InProcess { gw_stop, gateway, cloud, .. } => {
                let _ = gw_stop.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(10), gateway).await;
                cloud.shutdown().await;
            }
            Inner::Children { nodes, gateway, cluster, .. } => {
                gateway.lock().await.terminate().await;
                // A frozen node would never stop: wake it first.
                for n in &nodes {
                    n.lock().await.signal("CONT");
                }
                futures::future::join_all(nodes.iter().map(|n| async move { n.lock().await.terminate().await })).await;
                if let Some(c) = cluster {
                    c.watcher.abort();
                    c.broker.stop().await;
                }
            }
        }
    }
}

async fn restart(p: &mut ChildProc) -> String {
    // The port may linger a moment after a kill; retry briefly.
    for _ in 0..20 {
        match p.restart().await {
            Ok(()) => return "restarted".into(),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    "restart FAILED".into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::report::Stored;

    /// The report's split of acked samples missing from `readings`: those a stopped
    /// gateway still holds in its queue (the drain ended first) are "still queued",
    /// the rest "lost". Read from a real queue directory.
    #[test]
    fn missing_samples_are_split_into_still_queued_and_lost() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = fleetline_gateway::queue::QueueConfig {
            dir: dir.path().to_path_buf(),
            budget_bytes: 1 << 30,
            segment_bytes: 1 << 20,
            commit_interval: Duration::from_millis(1),
            policy: fleetline_gateway::queue::FullPolicy::Backpressure,
        };
        let key = DeviceKey::from_bytes([7; 32]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (q, _, thread) = fleetline_gateway::queue::open(cfg, |_, _, _| {}, None).unwrap();
            for seq in [1, 2] {
                let batch = fleetline_testkit::batches::sealed_batch("v-00002", &key, 4, seq, 1_000, 10, None);
                let meta = fleetline_gateway::queue::RecordMeta { shard: 0, samples: 10, received_at_ms: 1 };
                q.append(meta, batch).await.unwrap();
            }
            // Seq 1 was delivered upstream; seq 2 is still held.
            q.ack(vec![fleetline_gateway::queue::RecordId(0)]).await.unwrap();
            q.sync().await.unwrap();
            drop(q);
            thread.join().unwrap();
        });
        let queued = still_queued(dir.path()).unwrap();
        assert_eq!(queued.keys().collect::<Vec<_>>(), [&("v-00002".to_string(), 4, 2)]);
        let mut acked = HashMap::new();
        for (device, seq) in [("v-00001", 1), ("v-00002", 1), ("v-00002", 2), ("v-00003", 9)] {
            acked.insert((device.to_string(), 4, seq), 10);
        }
        let mut stored = Stored::default();
        stored.per_batch.insert(("v-00001".to_string(), 4, 1), 10);
        stored.per_batch.insert(("v-00002".to_string(), 4, 1), 10);
        // v-00002/2 is held at the gateway; v-00003/9 is nowhere: lost.
        assert_eq!(crate::report::missing_but_queued(&acked, &stored, &queued), 10);
        assert_eq!(crate::report::lost(&acked, &stored, &queued), 10);
    }
}
