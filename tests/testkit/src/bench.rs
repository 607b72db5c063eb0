//! The gateway as benchmarks run it: its configuration, and the release binary
//! next to the running benchmark started as its own process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A gateway configuration for benchmarks: everything on loopback, 16 shards,
/// devices on `devices_port`, the uplink to a broker on `upstream_port`; `extra`
/// goes into the `[devices]` table.
pub fn bench_gateway_config(
    dir: &Path,
    provisioning: &Path,
    devices_port: u16,
    upstream_port: u16,
    extra: &str,
) -> PathBuf {
    let path = dir.join("gw.toml");
    let text = format!(
        "id = \"gw-0\"\ndata_dir = \"{}\"\nprovisioning = \"{}\"\nshard_count = 16\n[devices]\nlisten = \"127.0.0.1:{devices_port}\"\n{extra}\n[uplink]\nhost = \"127.0.0.1\"\nport = {upstream_port}\n[http]\nlisten = \"127.0.0.1:0\"\n",
        dir.join("data").display(),
        provisioning.display(),
    );
    std::fs::write(&path, text).expect("writing the gateway configuration");
    path
}

/// A running gateway process.
pub struct BenchGateway {
    /// The process (killed when dropped).
    pub child: Child,
    /// Its process id.
    pub pid: u32,
    /// Its HTTP endpoint.
    pub http: SocketAddr,
}

impl BenchGateway {
    /// Starts `fleetline-gateway` from the directory above the running benchmark
    /// (`target/release/` for `target/release/examples/…`) with `config`, logging
    /// at `BENCH_GATEWAY_LOG` (default `warn`); returns once it listens.
    pub async fn start(config: &Path) -> Self {
        let exe = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.join("fleetline-gateway")))
            .filter(|e| e.exists())
            .expect("build the gateway first: cargo build --release -p fleetline-gateway");
        let mut child = Command::new(exe)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", std::env::var("BENCH_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the gateway");
        let stdout = child.stdout.take().expect("piped stdout");
        let line =
            BufReader::new(stdout).lines().next_line().await.ok().flatten().expect("the gateway's start-up line");
        let listening: serde_json::Value = serde_json::from_str(&line).expect("a JSON start-up line");
        let http = listening["http"].as_str().and_then(|a| a.parse().ok()).expect("an HTTP address");
        let pid = child.id().expect("a running gateway");
        Self { child, pid, http }
    }

    /// Its `/status`, or null if it did not answer with JSON.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&crate::http::get(self.http, "/status").await).unwrap_or_default()
    }

    /// SIGKILL, and waits for the exit.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
