//! Wires a node together: recovers every owned shard, starts one task per shard,
//! the ingest broker (embedded, behind login-checking listeners) or a session
//! with an external one, the HTTP endpoint and provisioning reloads; runs until
//! told to stop, then commits what it holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use fleetline_broker::{BrokerSettings, Front};
use tokio::sync::{mpsc, watch};

use crate::config::CloudConfig;
use crate::http::{self, Ops, RenderMetrics};
use crate::ingest::{self, Session};
use crate::keys::Keys;
use crate::lake::store::{Store, StoreSpec};
use crate::shard::task::ShardSetup;
use crate::shard::{Published, ShardDirectory, ShardHandle};
use crate::telemetry::CloudStats;

/// Addresses the node listens on, printed at start-up as one JSON line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listening {
    /// Always `"listening"`.
    pub event: &'static str,
    /// Embedded broker, plain MQTT for gateways.
    pub broker: Option<String>,
    /// Embedded broker, TLS.
    pub broker_tls: Option<String>,
    /// HTTP.
    pub http: String,
}

/// Handles of a running node, for tests and embedding.
pub struct Running {
    /// What it listens on.
    pub listening: Listening,
    /// The shards this node owns.
    pub shards: ShardDirectory,
    /// Counters.
    pub stats: Arc<CloudStats>,
    /// The embedded broker's sessions and the login check they passed, to end
    /// sessions whose key is no longer accepted.
    pub broker_sessions: Option<(Arc<fleetline_broker::sessions::Sessions>, Arc<dyn fleetline_broker::Logins>)>,
}

/// Runs a node until `stop` turns true.
pub async fn run(
    cfg: CloudConfig,
    render: Option<RenderMetrics>,
    mut stop: watch::Receiver<bool>,
    on_listening: impl FnOnce(&Listening),
) -> anyhow::Result<()> {
    let stats = Arc::new(CloudStats::default());
    let keys =
        Arc::new(Keys::load(&cfg.provisioning).with_context(|| format!("loading {}", cfg.provisioning.display()))?);
    let spec = StoreSpec::parse(&cfg.storage).map_err(anyhow::Error::msg)?;
    let store = spec.open(&cfg.storage).context("opening the object store")?;
    let running = start(&cfg, store, keys.clone(), stats.clone(), render).await?;
    on_listening(&running.listening);

    let mut reload = tokio::time::interval(cfg.provisioning_reload.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = reload.tick() => {
                match keys.reload_if_changed(cfg.provisioning_max_removal) {
                    Ok(true) => tracing::info!("provisioning reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        stats.count(&stats.provisioning_refused, 1);
                        tracing::error!(error = %e, "provisioning file rejected; keeping the previous keys");
                    }
                }
                // Gateway sessions opened with a key no longer accepted end now.
                if let Some((sessions, logins)) = &running.broker_sessions {
                    for id in sessions.recheck(|c, u, p| logins.check_login(c, u, p)) {
                        stats.count(&stats.sessions_ended_by_keys, 1);
                        tracing::info!(client_id = id, "session ended: its login is no longer accepted");
                    }
                }
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    tracing::info!("stopping: committing open segments");
    stats.ready.store(false, Ordering::Relaxed);
    running.shards.flush_all().await;
    // Give the acks of that last commit a moment to leave.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// Recovers the shards and starts every task; returns once the node takes data.
pub async fn start(
    cfg: &CloudConfig,
    store: Store,
    keys: Arc<Keys>,
    stats: Arc<CloudStats>,
    render: Option<RenderMetrics>,
) -> anyhow::Result<Running> {
    let registry =
        Arc::new(crate::registry::Registry::open(store.clone()).await.context("opening the schema registry")?);
    // Single node: every shard is owned here. The datasets are listed once, so
    // each shard can tell whether they hold files beyond its checkpoint.
    let owned: Vec<u16> = (0..cfg.shard_count).collect();
    let published = Published::list(&store).await.context("listing the datasets")?;
    let (released_tx, released_rx) = mpsc::unbounded_channel();
    let setup = ShardSetup {
        store: store.clone(),
        shard_count: cfg.shard_count,
        node: cfg.node_id.clone(),
        segment: cfg.segment.clone(),
        registry: registry.clone(),
        validation: cfg.validation.clone(),
        analytics: cfg.analytics.clone(),
        keys: keys.clone(),
        released: released_tx,
        stats: stats.clone(),
    };
    let opened = futures::future::join_all(owned.iter().map(|id| setup.open(*id, &published))).await;
    let mut shards = ShardDirectory::new(cfg.shard_count);
    for (id, opened) in owned.iter().copied().zip(opened) {
        let (handle, inbox) = ShardHandle::channel(id, 64);
        shards.insert(handle);
        tokio::spawn(setup.clone().run(id, opened, inbox));
    }

    let mut broker_sessions = None;
    let (session, broker_addr, broker_tls) = match &cfg.broker.url {
        Some(url) => {
            let (tls, host, port) = ingest::parse_broker_url(url).map_err(anyhow::Error::msg)?;
            let tls = match (tls, &cfg.broker.ca) {
                (false, _) => None,
                (true, Some(ca)) => Some(fleetline_service::tls::client_config(
                    ca,
                    cfg.broker.cert.as_deref(),
                    cfg.broker.key.as_deref(),
                )?),
                (true, None) => anyhow::bail!("broker.url is mqtts:// but broker.ca is not set"),
            };
            let login = cfg.broker.username.clone().map(|u| (u, cfg.broker.password.clone().unwrap_or_default()));
            let session = Session {
                host,
                port,
                client_id: format!("fleetline-cloud-{}", cfg.node_id),
                login,
                tls,
                max_packet: cfg.broker.max_packet.0 as usize,
                keep_alive: cfg.broker.keep_alive,
            };
            (session, None, None)
        }
        None => {
            let secret = fleetline_broker::new_secret();
            // Dots keep the node's own ids apart from gateway ids (`[a-z0-9-]`).
            let client_id = format!("cloud.{}", cfg.node_id);
            let settings = BrokerSettings {
                name: "gateways".into(),
                max_connections: cfg.broker.max_connections,
                max_packet: cfg.broker.max_packet.0 as usize,
                log_bytes: 256 << 20,
                small_logs: vec![(fleetline_wire::topics::BUNDLE_ACK_FILTER.into(), 256 * 1024)],
                link_id: format!("cloud.{}.link", cfg.node_id),
                link_filters: Vec::new(),
            };
            let (broker, link_tx, link_rx) = fleetline_broker::start(&settings, secret.clone()).await?;
            // The node takes bundles over MQTT like any client; its local link stays idle.
            tokio::spawn(async move {
                let _idle = (link_tx, link_rx);
                std::future::pending::<()>().await;
            });
            let logins: Arc<dyn fleetline_broker::Logins> =
                Arc::new(NodeLogins { keys: keys.clone(), subscribers: cfg.broker.subscribers.clone() });
            broker_sessions = Some((broker.sessions.clone(), logins.clone()));
            let front = Front::new(logins, stats.clone(), &broker, cfg.broker.max_connections);
            let (plain_addr, plain) = front.clone().bind(cfg.broker.listen, None).await?;
            tokio::spawn(plain);
            let tls_addr = match &cfg.broker.tls {
                Some(t) => {
                    let cert = std::fs::read(&t.cert).with_context(|| format!("reading {}", t.cert.display()))?;
                    let key = std::fs::read(&t.key).with_context(|| format!("reading {}", t.key.display()))?;
                    let server = fleetline_service::tls::server_config(&cert, &key)?;
                    let (addr, accept) = front.bind(t.listen, Some((server, t.handshake_timeout))).await?;
                    tokio::spawn(accept);
                    Some(addr)
                }
                None => None,
            };
            let session = Session {
                host: "127.0.0.1".into(),
                port: broker.addr.port(),
                client_id: client_id.clone(),
                login: Some((client_id, secret.to_string())),
                tls: None,
                max_packet: cfg.broker.max_packet.0 as usize,
                keep_alive: cfg.broker.keep_alive,
            };
            (session, Some(plain_addr), tls_addr)
        }
    };
    let counter = ingest::AckCounter::open(store.clone(), &cfg.node_id).await?;
    tokio::spawn(ingest::run(
        session,
        shards.clone(),
        released_rx,
        keys.clone(),
        cfg.node_id.clone(),
        stats.clone(),
        counter,
    ));

    let rollup = Arc::new(crate::jobs::rollup::RollupJob::new(store.clone(), &cfg.rollup));
    if cfg.rollup.enabled {
        // Single node: the job runs here (a cluster elects one node for it).
        tokio::spawn(rollup.clone().periodic(cfg.rollup.interval));
    }
    let ops = Ops {
        rollup,
        store: store.clone(),
        registry,
        node_id: cfg.node_id.clone(),
        shard_count: cfg.shard_count,
        stats: stats.clone(),
        shards: shards.clone(),
        metrics: render,
        token: cfg.http.token.clone(),
        read_token: cfg.http.read_token.clone(),
    };
    let (http_addr, server) = http::bind(cfg.http.listen, ops).await?;
    tokio::spawn(server);
    // Ready once the broker session is up (every shard is recovered already).
    let ready_stats = stats.clone();
    tokio::spawn(async move {
        while !ready_stats.broker_connected.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ready_stats.ready.store(true, Ordering::Relaxed);
    });
    let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    Ok(Running {
        listening: Listening {
            event: "listening",
            broker: addr(broker_addr),
            broker_tls: addr(broker_tls),
            http: http_addr.to_string(),
        },
        shards,
        stats,
        broker_sessions,
    })
}

/// Who may log in to the embedded broker: provisioned gateways, and the
/// configured alert subscribers.
struct NodeLogins {
    keys: Arc<Keys>,
    subscribers: Vec<crate::config::SubscriberLogin>,
}

impl fleetline_broker::Logins for NodeLogins {
    fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str> {
        if let Some(s) = self.subscribers.iter().find(|s| s.username == username) {
            if !client_id.starts_with(username) {
                return Err(fleetline_broker::reason::BAD_USERNAME);
            }
            return if fleetline_service::constant_time_eq(s.password.as_bytes(), password.as_bytes()) {
                Ok(())
            } else {
                Err(fleetline_broker::reason::BAD_PASSWORD)
            };
        }
        self.keys.check_login(client_id, username, password)
    }
}

impl fleetline_broker::FrontEvents for CloudStats {
    fn login_refused(&self, reason: &'static str) {
        metrics::counter!("fleetline_cloud_rejected_logins_total", "reason" => reason).increment(1);
        if let Ok(mut m) = self.logins_rejected.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    fn tls_session(&self) {
        metrics::counter!("fleetline_cloud_tls_sessions_total").increment(1);
    }

    fn tls_failed(&self) {
        metrics::counter!("fleetline_cloud_tls_handshakes_failed_total").increment(1);
    }

    fn tls_timed_out(&self) {
        metrics::counter!("fleetline_cloud_tls_handshakes_timed_out_total").increment(1);
    }
}
