//! The command line of `fleetline-cloud`, as a library function so other programs (the
//! fleet simulator) can run it as a child process of their own binary.
#![allow(clippy::print_stdout)] // A command-line program: stdout carries its start-up line and --check-config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::CloudConfig;
use crate::node;
use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;

/// Fleetline cloud node: takes gateway bundles from the ingest broker, stores
/// readings as Parquet in an object store, acks what is durable.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; every setting has a default (see the README).
    #[arg(long, short, env = "FLEETLINE_CLOUD_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `node_id`.
    #[arg(long, env = "FLEETLINE_CLOUD_NODE_ID")]
    node_id: Option<String>,
    /// Overrides `provisioning`.
    #[arg(long, env = "FLEETLINE_PROVISIONING")]
    provisioning: Option<PathBuf>,
    /// Overrides `storage.url` (`file:///dir`, a directory, or `s3://bucket/prefix`).
    #[arg(long, env = "FLEETLINE_CLOUD_STORAGE")]
    storage: Option<String>,
    /// Overrides `broker.url` (an external broker instead of the embedded one).
    #[arg(long, env = "FLEETLINE_CLOUD_BROKER_URL")]
    broker_url: Option<String>,
    /// Overrides `broker.listen` (the embedded broker's listener for gateways).
    #[arg(long, env = "FLEETLINE_CLOUD_BROKER_LISTEN")]
    broker_listen: Option<std::net::SocketAddr>,
    /// Overrides `http.listen`.
    #[arg(long, env = "FLEETLINE_CLOUD_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// Overrides `http.token` (bearer token for writes).
    #[arg(long, env = "FLEETLINE_CLOUD_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<String>,
    /// Overrides `shard_count`.
    #[arg(long, env = "FLEETLINE_SHARD_COUNT")]
    shard_count: Option<u16>,
    /// Prints the effective configuration and exits.
    #[arg(long)]
    check_config: bool,
}

fn load(args: &Args) -> anyhow::Result<CloudConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => CloudConfig::default(),
    };
    if let Some(v) = &args.node_id {
        cfg.node_id = v.clone();
    }
    if let Some(v) = &args.provisioning {
        cfg.provisioning = v.clone();
    }
    if let Some(v) = &args.storage {
        cfg.storage.url = v.clone();
    }
    if let Some(v) = &args.broker_url {
        cfg.broker.url = Some(v.clone());
    }
    if let Some(v) = args.broker_listen {
        cfg.broker.listen = v;
    }
    if let Some(v) = args.http_listen {
        cfg.http.listen = v;
    }
    if let Some(v) = &args.http_token {
        cfg.http.token = Some(v.clone());
    }
    if let Some(v) = args.shard_count {
        cfg.shard_count = v;
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
            eprintln!("fleetline-cloud: {e:#}");
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
            eprintln!("fleetline-cloud: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .context("installing the metrics recorder")?;
        let render: crate::http::RenderMetrics = Arc::new(move || recorder.render());
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
        node::run(cfg, Some(render), stop, |l| {
            // One JSON line on stdout, for supervisors and tests that use port 0.
            println!("{}", serde_json::to_string(l).unwrap_or_default());
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetline-cloud: {e:#}");
            ExitCode::from(1)
        }
    }
}
