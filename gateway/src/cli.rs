//! The command line of `fleetline-gateway`, as a library function so other programs (the
//! fleet simulator) can run it as a child process of their own binary.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::app;
use crate::config::GatewayConfig;
use clap::Parser;

/// Fleetline edge gateway: an MQTT broker for vehicle units, a crash-safe disk queue,
/// and an uplink into the Fleetline cloud.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; every setting has a default (see the README).
    /// Given more than once, later files override earlier ones key by key (a
    /// base file and a site's changes).
    #[arg(long, short, env = "FLEETLINE_GATEWAY_CONFIG", value_delimiter = ',')]
    config: Vec<PathBuf>,
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
    let mut cfg: GatewayConfig = fleetline_service::read_config(&args.config)?;
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
    fleetline_service::init_tracing();
    let args = Args::parse_from(args);
    fleetline_service::run("fleetline-gateway", load(&args), args.check_config, |cfg, render, stop| {
        app::run(cfg, Some(render), stop, fleetline_service::print_listening)
    })
}
