//! `fleetline-sim`: the fleet simulator.
#![allow(clippy::print_stdout)] // A command-line program: stdout carries the report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleetline_sim::demo::{self, DemoOptions};
use fleetline_sim::model::Profile;

/// Fleetline fleet simulator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A cloud (one node, or a cluster), a gateway and a simulated fleet on loopback; prints a report.
    Demo {
        /// Vehicles.
        #[arg(long, default_value_t = 1000)]
        vehicles: usize,
        /// How long the fleet drives (wall clock), e.g. `60s`, `2m`.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Seed of the fleet (routes, incidents, noise).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Data directory (default: a new one under the system's temp dir, kept).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Simulated seconds per wall-clock second. The default 10 gives 60 s of
        /// driving ten simulated minutes: long enough for every detector, a slow
        /// leak's included.
        #[arg(long, default_value_t = 10.0)]
        time_scale: f64,
        /// Also write the report (JSON) here.
        #[arg(long)]
        report_json: Option<PathBuf>,
        /// Write a self-contained HTML report with charts here.
        #[arg(long)]
        report_html: Option<PathBuf>,
        /// Longest wait, after the drive, for everything sent to be acked and stored.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
        /// Chaos schedule, times from the start: `kill-gateway@20s,uplink-outage@30s+15s,
        /// kill-cloud@45s,stop-gateway@50s+10s` (`kill-*`: SIGKILL, restart after 1 s;
        /// `stop-*@T+D`: SIGTERM, down for D; `uplink-outage@T+D`: gateway ↔ cloud cut
        /// for D). With chaos the gateway and the cloud run as child processes.
        #[arg(long)]
        chaos: Option<fleetline_sim::chaos::Schedule>,
        /// Activity profile.
        #[arg(long, value_enum, default_value_t = Profile::Steady)]
        profile: Profile,
        /// Cloud nodes. More than one runs a cluster of child processes sharing a
        /// Mosquitto broker (installed: `apt-get install mosquitto`), with static
        /// membership; chaos can then `kill-node@T:i[+D]`, `stop-node@T:i+D`,
        /// `freeze-node@T:i+D` (SIGSTOP, SIGCONT after D), `add-node@T`,
        /// `drain-node@T:i`.
        #[arg(long, default_value_t = 1)]
        cloud_nodes: usize,
        /// Run the cloud as a cluster (child processes sharing a Mosquitto) even with
        /// one node: the baseline a cluster's figures compare with.
        #[arg(long)]
        shared_broker: bool,
        /// Grow and shrink the cloud cluster as the chart's KEDA rule would:
        /// nodes = max(schedule(t), ceil(records per second / --target-rate),
        /// ceil(backlog / --target-backlog), ceil(nodes · oldest wait /
        /// --target-wait)) within
        /// --min-nodes..--max-nodes, scale-down held by the stabilization window
        /// and done one drain at a time. Starts --cloud-nodes.
        #[arg(long)]
        autoscale: bool,
        /// Model deployments: `committed` (the committed models alone) or `ab`
        /// (A/B splits of fuel and speed_next between their two model families,
        /// tire_risk with a shadow, and a hot swap halfway; the report checks each
        /// split over vehicles and that no window went unscored).
        #[arg(long, default_value = "committed", value_parser = ["committed", "ab"])]
        models: String,
        /// Fewest cloud nodes with --autoscale.
        #[arg(long, default_value_t = 1)]
        min_nodes: usize,
        /// Most cloud nodes with --autoscale.
        #[arg(long, default_value_t = 3)]
        max_nodes: usize,
        /// Records per second one node is meant to take.
        #[arg(long, default_value_t = 20000.0)]
        target_rate: f64,
        /// Backlog (bytes taken, not yet committed) one node is meant to carry.
        #[arg(long, default_value = "4 MiB", value_parser = parse_bytes)]
        target_backlog: u64,
        /// The oldest uncommitted record's wait (since its gateway received it)
        /// the cluster aims under: nodes = ceil(nodes · wait / target).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        target_wait: Duration,
        /// Follow-the-sun windows on the fleet's clock, comma-separated:
        /// `08:00-20:00@Europe/Berlin=3,07:00-19:00@America/Chicago=2`.
        #[arg(long, value_delimiter = ',')]
        schedule: Vec<fleetline_sim::autoscale::Window>,
        /// A scale-down goes only to the highest recommendation of this long.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        scale_down_stabilization: Duration,
        /// At most one node is drained per this long.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        scale_down_every: Duration,
        /// How often the autoscaler reads the load.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        scale_poll: Duration,
    },
    /// Drives simulated vehicles against a real gateway and reports what the units see.
    Fleet {
        /// Gateway address, `host:port`.
        #[arg(long)]
        gateway: String,
        /// PEM CA bundle: connect with TLS.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// PEM client certificate and key for mutual TLS.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// PEM client key.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Provisioning file holding the units' keys (e.g. from `provision`).
        #[arg(long)]
        provisioning: PathBuf,
        /// Units to simulate (the first ones of the file, by fleet and device id).
        #[arg(long, default_value_t = 100)]
        vehicles: usize,
        /// How long the fleet drives.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated seconds per wall second.
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Activity profile.
        #[arg(long, value_enum, default_value_t = Profile::Steady)]
        profile: Profile,
        /// Longest wait for the units' batches to be acked at the end.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Writes the provisioning file of a demo fleet (units and gateway `gw-1`)
    /// with random keys.
    Provision {
        /// Vehicles.
        #[arg(long, default_value_t = 1000)]
        vehicles: usize,
        /// Derive the keys from this seed instead (repeatable test fleets only:
        /// anyone who knows the seed knows every key).
        #[arg(long)]
        insecure_seed: Option<u64>,
        /// Output file.
        #[arg(long, default_value = "provisioning.toml")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    // With chaos, the demo runs the gateway and the cloud node as child processes
    // of this binary, so `cargo run -p fleetline-sim` alone is enough.
    let mut raw = std::env::args_os();
    let program = raw.next();
    let rest: Vec<std::ffi::OsString> = raw.collect();
    match rest.first().and_then(|a| a.to_str()) {
        Some("__gateway") => {
            return fleetline_gateway::cli::main_with_args(
                std::iter::once("fleetline-gateway".into()).chain(rest[1..].iter().cloned()),
            );
        }
        Some("__cloud") => {
            return fleetline_cloud::cli::main_with_args(
                std::iter::once("fleetline-cloud".into()).chain(rest[1..].iter().cloned()),
            );
        }
        _ => {}
    }
    let _ = program;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=off,rumqttc=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match args.command {
        Cmd::Provision { vehicles, insecure_seed, out } => {
            let keys = match insecure_seed {
                Some(seed) => {
                    eprintln!(
                        "fleetline-sim: WARNING: keys derived from seed {seed}: anyone who knows the seed knows \
                         every key in {}. For test fleets only; leave out --insecure-seed for random keys.",
                        out.display()
                    );
                    demo::KeySource::Seeded(seed)
                }
                None => demo::KeySource::Random,
            };
            match demo::provisioning(keys, vehicles).and_then(|p| Ok(p.save(&out)?)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fleetline-sim: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Fleet {
            gateway,
            ca,
            cert,
            key,
            provisioning,
            vehicles,
            duration,
            seed,
            time_scale,
            profile,
            drain_timeout,
        } => {
            let Some(runtime) = runtime() else { return ExitCode::from(1) };
            let opts = fleetline_sim::fleet::FleetOptions {
                gateway,
                ca,
                client_auth: cert.zip(key),
                provisioning,
                vehicles,
                duration,
                seed,
                time_scale,
                profile,
                drain_timeout,
            };
            match runtime.block_on(fleetline_sim::fleet::run(opts)) {
                Ok(r) => {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    if r.samples_acked == r.samples_sent { ExitCode::SUCCESS } else { ExitCode::from(3) }
                }
                Err(e) => {
                    eprintln!("fleetline-sim: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Demo {
            vehicles,
            duration,
            seed,
            data_dir,
            time_scale,
            report_json,
            report_html,
            drain_timeout,
            chaos,
            profile,
            cloud_nodes,
            shared_broker,
            autoscale,
            models,
            min_nodes,
            max_nodes,
            target_rate,
            target_backlog,
            target_wait,
            schedule,
            scale_down_stabilization,
            scale_down_every,
            scale_poll,
        } => {
            let Some(runtime) = runtime() else { return ExitCode::from(1) };
            let opts = DemoOptions {
                vehicles,
                duration,
                seed,
                data_dir,
                time_scale,
                progress: true,
                drain_timeout,
                chaos: chaos.map(|c| c.0).unwrap_or_default(),
                report_html,
                profile,
                cloud_nodes,
                shared_broker,
                models: if models == "ab" { demo::ModelPlan::Ab } else { demo::ModelPlan::Committed },
                autoscale: autoscale.then(|| demo::AutoscaleOptions {
                    rule: fleetline_sim::autoscale::Rule {
                        min: min_nodes.max(1),
                        max: max_nodes.max(min_nodes).max(1),
                        target_rate: target_rate.max(1.0),
                        target_per_pod: target_backlog.max(1),
                        target_wait,
                        schedule,
                        stabilization: scale_down_stabilization,
                        scale_down_every,
                    },
                    poll: scale_poll,
                }),
            };
            let report = match runtime.block_on(demo::run(opts)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("fleetline-sim: {e:#}");
                    return ExitCode::from(1);
                }
            };
            let json = serde_json::to_string_pretty(&report).unwrap_or_default();
            println!("{json}");
            if let Some(p) = report_json
                && let Err(e) = std::fs::write(&p, &json)
            {
                eprintln!("fleetline-sim: writing {}: {e}", p.display());
                return ExitCode::from(1);
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "fleetline-sim: {} acked samples lost, {} still queued at the gateway when the drain ended, {} duplicated",
                    report.samples_lost, report.samples_still_queued, report.samples_duplicated
                );
                if let Some(c) = &report.cluster {
                    for ch in c.changes.iter().filter(|ch| ch.owned_again_ms.is_none()) {
                        eprintln!(
                            "fleetline-sim: after {} not every shard had a live owner again before the next change",
                            ch.action
                        );
                    }
                    for v in &c.generation_violations {
                        eprintln!("fleetline-sim: generation check: {v}");
                    }
                }
                if let Some(m) = report.models.as_ref().filter(|m| !m.ok()) {
                    eprintln!(
                        "fleetline-sim: models: {} windows unscored, {} scored twice, {} predictions of a version no deployment ran, splits off by up to {:.1} points (see the report's allowance)",
                        m.missing,
                        m.duplicated,
                        m.mislabelled,
                        m.splits.iter().map(|s| s.worst_pp).fold(0.0, f64::max)
                    );
                }
                ExitCode::from(3)
            }
        }
    }
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    fleetline_service::ByteSize::parse(s).map(|b| b.0).map_err(|e| e.to_string())
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("fleetline-sim: cannot start the runtime: {e}");
            None
        }
    }
}
