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

/// TOML configuration files laid over each other in order (a later file's keys
/// replace an earlier one's, tables merge key by key), or the defaults when there
/// are none. Checking the values is the caller's (after its flags are applied).
pub fn read_config<C: serde::de::DeserializeOwned + Default>(paths: &[std::path::PathBuf]) -> anyhow::Result<C> {
    if paths.is_empty() {
        return Ok(C::default());
    }
    let mut merged = toml::Table::new();
    for path in paths {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        merge(&mut merged, table);
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    <C as serde::Deserialize>::deserialize(toml::Value::Table(merged))
        .with_context(|| format!("reading {}", names.join(" + ")))
}

/// Lays `over` on `base`: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
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
        // The flag's output; a reader that stops early (`| head`) is not an error.
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), "{cfg:#?}");
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    #[derive(serde::Deserialize, Default, Debug, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        id: String,
        n: u32,
        inner: Inner,
    }

    #[derive(serde::Deserialize, Default, Debug, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        a: u32,
        b: Vec<u32>,
    }

    #[test]
    fn later_files_override_earlier_ones_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.toml");
        let site = dir.path().join("site.toml");
        std::fs::write(&base, "id = \"x\"\nn = 1\n[inner]\na = 1\nb = [1, 2]\n").unwrap();
        std::fs::write(&site, "n = 2\n[inner]\nb = [3]\n").unwrap();
        let c: Cfg = super::read_config(&[base.clone(), site.clone()]).unwrap();
        assert_eq!(c, Cfg { id: "x".into(), n: 2, inner: Inner { a: 1, b: vec![3] } });
        let none: Cfg = super::read_config(&[]).unwrap();
        assert_eq!(none, Cfg::default());
        // A mistake in either file names the file (or both, for an unknown key).
        std::fs::write(&site, "[inner\n").unwrap();
        let e = super::read_config::<Cfg>(&[base.clone(), site.clone()]).unwrap_err();
        assert!(format!("{e:#}").contains("site.toml"), "{e:#}");
        std::fs::write(&site, "[inner]\nc = 1\n").unwrap();
        let e = super::read_config::<Cfg>(&[base, site]).unwrap_err();
        assert!(format!("{e:#}").contains("unknown field"), "{e:#}");
    }
}
