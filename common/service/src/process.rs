//! What every Fleetline server binary does around its own work: logging to
//! stderr, `--check-config`, a runtime, the Prometheus recorder, SIGTERM/Ctrl-C as
//! a stop signal, SIGXFSZ turned into write errors, exit codes.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

/// Renders the Prometheus exposition text.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// A TOML configuration file, or the defaults when there is none. Checking the
/// values is the caller's (after its flags are applied).
pub fn read_config<C: serde::de::DeserializeOwned + Default>(path: Option<&std::path::Path>) -> anyhow::Result<C> {
    let Some(path) = path else { return Ok(C::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Logs to stderr, filtered by `RUST_LOG` (default: info, the MQTT crates at warn).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Runs `serve` with the loaded configuration until SIGTERM or Ctrl-C turns the
/// stop signal true. Exit codes: 0 after a clean stop (or `--check-config`), 2 for
/// a configuration that does not load, 1 for a failure while running.
pub fn run<C, F, Fut>(program: &str, cfg: anyhow::Result<C>, check_config: bool, serve: F) -> ExitCode
where
    C: std::fmt::Debug,
    F: FnOnce(C, RenderMetrics, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            return ExitCode::from(2);
        }
    };
    if check_config {
        #[allow(clippy::print_stdout)] // The flag's output.
        {
            println!("{cfg:#?}");
        }
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .context("installing the metrics recorder")?;
        let render: RenderMetrics = Arc::new(move || recorder.render());
        // A file-size limit (SIGXFSZ) must surface as a write error the program
        // handles, not end the process.
        let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ))
            .context("handling SIGXFSZ")?;
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = stop_tx.send(true);
        });
        serve(cfg, render, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The start-up line: one JSON object on stdout, for supervisors and tests that
/// listen on port 0.
pub fn print_listening(line: &impl serde::Serialize) {
    #[allow(clippy::print_stdout)] // The program's start-up line.
    {
        println!("{}", serde_json::to_string(line).unwrap_or_default());
    }
}
