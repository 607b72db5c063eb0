//! The command line of `fleetline-cloud`, as a library function so other programs (the
//! fleet simulator) can run it as a child process of their own binary.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::CloudConfig;
use crate::node;
use anyhow::Context;
use clap::Parser;

/// Fleetline cloud node: takes gateway bundles from the ingest broker, stores
/// readings as Parquet in an object store, acks what is durable.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; every setting has a default (see the README).
    /// Given more than once, later files override earlier ones key by key (a
    /// base file and a site's changes).
    #[arg(long, short, env = "FLEETLINE_CLOUD_CONFIG", value_delimiter = ',')]
    config: Vec<PathBuf>,
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
    /// Overrides `broker.username` (an external broker's login of this node).
    #[arg(long, env = "FLEETLINE_CLOUD_BROKER_USERNAME")]
    broker_username: Option<String>,
    /// Overrides `broker.password`.
    #[arg(long, env = "FLEETLINE_CLOUD_BROKER_PASSWORD", hide_env_values = true)]
    broker_password: Option<String>,
    /// Overrides `cluster.roles` (`ingest,jobs`; dots or commas between names).
    #[arg(long, env = "FLEETLINE_CLOUD_ROLES")]
    roles: Option<String>,
    /// Prints the effective configuration and exits.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Rebuilds a shard's checkpoint from its datasets (after its checkpoint was
    /// lost, damaged or restored from an older copy; the node then keeps the
    /// shard down and says so). Prints what it found and did as JSON.
    Repair {
        /// The shard to repair.
        #[arg(long)]
        shard: u16,
    },
    /// Proves from the lake that every shard had one writer per generation and
    /// never forked (reads every published file's writer stamp and every head).
    /// Prints the report as JSON; exits 3 when it found a violation.
    CheckGenerations,
    /// Prints `gateway:password` for every gateway in the provisioning file: the
    /// MQTT logins gateways use, for an external broker's password file
    /// (`mosquitto_passwd -U`) or user store. Sorted by gateway id.
    BrokerLogins,
}

fn load(args: &Args) -> anyhow::Result<CloudConfig> {
    let mut cfg: CloudConfig = fleetline_service::read_config(&args.config)?;
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
    if let Some(v) = &args.broker_username {
        cfg.broker.username = Some(v.clone());
    }
    if let Some(v) = &args.broker_password {
        cfg.broker.password = Some(v.clone());
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
    if let Some(v) = &args.roles {
        let (roles, unknown) = crate::cluster::Role::parse_list(v);
        if !unknown.is_empty() {
            anyhow::bail!("--roles: unknown role(s) {unknown:?} (roles: ingest, jobs, api, inference)");
        }
        cfg.cluster.roles = roles.into_iter().collect();
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
    match args.command {
        Some(Command::Repair { shard }) => return repair(load(&args), shard),
        Some(Command::CheckGenerations) => return check_generations(load(&args)),
        Some(Command::BrokerLogins) => return broker_logins(load(&args)),
        None => {}
    }
    fleetline_service::run("fleetline-cloud", load(&args), args.check_config, |cfg, render, stop| {
        node::run(cfg, Some(render), stop, fleetline_service::print_listening)
    })
}

/// Runs a one-shot command against the configured store: exit 0 with its JSON
/// report (`fail` says when the report itself is a failure: exit 3), 2 on a bad
/// configuration, 1 when it could not run.
fn one_shot<R, F>(
    name: &str,
    cfg: anyhow::Result<CloudConfig>,
    fail: impl Fn(&R) -> bool,
    job: impl FnOnce(crate::lake::store::Store, CloudConfig) -> F,
) -> ExitCode
where
    R: serde::Serialize,
    F: std::future::Future<Output = anyhow::Result<R>>,
{
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetline-cloud {name}: {e:#}");
            return ExitCode::from(2);
        }
    };
    let run = async {
        let spec = crate::lake::store::StoreSpec::parse(&cfg.storage).map_err(anyhow::Error::msg)?;
        let store = spec.open(&cfg.storage).context("opening the object store")?;
        job(store, cfg).await
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run));
    match result {
        Ok(report) => {
            #[allow(clippy::print_stdout)] // The command's output.
            {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            }
            if fail(&report) { ExitCode::from(3) } else { ExitCode::SUCCESS }
        }
        Err(e) => {
            eprintln!("fleetline-cloud {name}: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `repair --shard N`.
fn repair(cfg: anyhow::Result<CloudConfig>, shard: u16) -> ExitCode {
    one_shot(
        &format!("repair --shard {shard}"),
        cfg,
        |_| false,
        |store, cfg| async move {
            crate::jobs::repair::repair(&store, shard, cfg.shard_count, &cfg.node_id, &cfg.segment).await
        },
    )
}

/// `check-generations`.
fn check_generations(cfg: anyhow::Result<CloudConfig>) -> ExitCode {
    one_shot(
        "check-generations",
        cfg,
        |r: &crate::jobs::generations::GenerationReport| !r.ok(),
        |store, cfg| async move { crate::jobs::generations::check(&store, cfg.shard_count).await },
    )
}

/// `broker-logins`.
fn broker_logins(cfg: anyhow::Result<CloudConfig>) -> ExitCode {
    let lines = cfg.and_then(|cfg| {
        let p = fleetline_wire::provisioning::Provisioning::load(&cfg.provisioning)
            .with_context(|| format!("reading {}", cfg.provisioning.display()))?;
        Ok(logins(&p))
    });
    match lines {
        Ok(lines) => {
            #[allow(clippy::print_stdout)] // The command's output.
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetline-cloud broker-logins: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `gateway:password` per gateway, sorted.
fn logins(p: &fleetline_wire::provisioning::Provisioning) -> Vec<String> {
    let mut out: Vec<String> = p
        .gateways()
        .map(|g| {
            let id = g.id.as_str();
            format!("{id}:{}", String::from_utf8_lossy(&g.key.mqtt_password(id)))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    #[test]
    fn roles_and_broker_logins_come_from_flags_and_bad_roles_are_refused() {
        use clap::Parser;
        let args = super::Args::parse_from(["fleetline-cloud", "--roles", "ingest.jobs", "--broker-username", "n1"]);
        let cfg = super::load(&args).unwrap();
        let roles: Vec<&str> = cfg.cluster.roles.iter().map(|r| r.as_str()).collect();
        assert_eq!(roles, ["ingest", "jobs"]);
        assert_eq!(cfg.broker.username.as_deref(), Some("n1"));
        let bad = super::Args::parse_from(["fleetline-cloud", "--roles", "ingest,gardening"]);
        let e = super::load(&bad).unwrap_err().to_string();
        assert!(e.contains("gardening"), "{e}");
        let long = super::Args::parse_from(["fleetline-cloud", "--node-id", &"a".repeat(64)]);
        assert!(super::load(&long).is_err(), "a node id longer than a DNS label");
        let pod = super::Args::parse_from(["fleetline-cloud", "--node-id", "fleet-fleetline-cloud-inference-0"]);
        assert!(super::load(&pod).is_ok(), "a StatefulSet pod's name");
    }

    #[test]
    fn broker_logins_are_what_the_embedded_broker_accepts() {
        use fleetline_broker::Logins;
        let text = "format = 1\n[[gateways]]\nid = \"gw-b\"\nkey = \"".to_string()
            + &"22".repeat(32)
            + "\"\n[[gateways]]\nid = \"gw-a\"\nkey = \""
            + &"11".repeat(32)
            + "\"\n";
        let p = fleetline_wire::provisioning::Provisioning::from_toml_str(&text).unwrap();
        let lines = super::logins(&p);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("gw-a:") && lines[1].starts_with("gw-b:"), "{lines:?}");
        let keys = crate::keys::Keys::fixed(p);
        for l in &lines {
            let (user, password) = l.split_once(':').unwrap();
            assert_eq!(password.len(), 32, "a 128-bit tag in hex");
            keys.check_login(user, user, password).unwrap();
            let other = if password.starts_with('0') { "1" } else { "0" };
            assert!(keys.check_login(user, user, &format!("{other}{}", &password[1..])).is_err());
        }
    }
}
