//! The command line of `fleetline-gateway`, as a library function so other programs (the
//! fleet simulator) can run it as a child process of their own binary.
#![allow(clippy::print_stdout)] // A command-line program: stdout carries its start-up line and --check-config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::app;
use crate::config::GatewayConfig;
use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;

/// Fleetline edge gateway: an MQTT broker for vehicle units, a crash-safe disk queue,
/// and an uplink into the Fleetline cloud.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; every setting has a default (see the README).
    #[arg(long, short, env = "FLEETLINE_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `id`.
    #[arg(long, env = "FLEETLINE_GATEWAY_ID")]
    id: Option<String>,
    /// Overrides `data_dir`.
    #[arg(long, env = "FLEETLINE_GATEWAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides `provisioning`.
    #[arg(long, env = "FLEETLINE_PROVISIONING")]
    provisioning: Option<PathBuf>,
    /// Overrides `devices.listen`.
    #[arg(long, env = "FLEETLINE_GATEWAY_DEVICES_LISTEN")]
    devices_listen: Option<std::net::SocketAddr>,
    /// Overrides `http.listen`.
    #[arg(long, env = "FLEETLINE_GATEWAY_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// Overrides `uplink.host`.
    #[arg(long, env = "FLEETLINE_GATEWAY_UPLINK_HOST")]
    uplink_host: Option<String>,
    /// Overrides `uplink.port`.
    #[arg(long, env = "FLEETLINE_GATEWAY_UPLINK_PORT")]
    uplink_port: Option<u16>,
    /// Prints the effective configuration and exits.
    #[arg(long)]
    check_config: bool,
}

fn load(args: &Args) -> anyhow::Result<GatewayConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => GatewayConfig::default(),
    };
    if let Some(v) = &args.id {
        cfg.id = v.clone();
    }
    if let Some(v) = &args.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = &args.provisioning {
        cfg.provisioning = v.clone();
    }
    if let Some(v) = args.devices_listen {
        cfg.devices.listen = v;
    }
    if let Some(v) = args.http_listen {
        cfg.http.listen = v;
    }
    if let Some(v) = &args.uplink_host {
        cfg.uplink.host = v.clone();
    }
    if let Some(v) = args.uplink_port {
        cfg.uplink.port = v;
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(cfg)
}

/// Runs the binary with `args` (the first is the program name): what `main` does.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse_from(args);
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetline-gateway: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{cfg:#?}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetline-gateway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .context("installing the metrics recorder")?;
        let render: crate::http::RenderMetrics = Arc::new(move || recorder.render());
        // A file-size limit (SIGXFSZ) must surface as a write error the disk queue
        // handles, not end the process.
        let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ))
            .context("handling SIGXFSZ")?;
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = stop_tx.send(true);
        });
        app::run(cfg, Some(render), stop, |l| {
            // One JSON line on stdout, for supervisors and tests that use port 0.
            println!("{}", serde_json::to_string(l).unwrap_or_default());
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetline-gateway: {e:#}");
            ExitCode::from(1)
        }
    }
}
