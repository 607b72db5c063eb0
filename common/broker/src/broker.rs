//! The embedded rumqttd broker that the front listeners splice sessions into.
//!
//! rumqttd's router runs on its own thread; its MQTT listener runs as a task on the
//! caller's runtime, on loopback only: clients reach it through the front
//! listeners (`front.rs`), which check their logins. The owner's own link
//! subscribes to its filters before the listener accepts anyone. rumqttd cannot
//! report the port it bound, so a free port is picked and the start retried on a
//! collision.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, SegmentConfig, Server, ServerSettings};
use tokio::task::JoinHandle;

/// The running broker.
pub struct Broker {
    /// The loopback listener's address.
    pub addr: SocketAddr,
    /// The password its listener accepts (from the front only).
    pub secret: Arc<str>,
    /// Live sessions by client id: take-overs and revocation (`kick`) go here.
    pub sessions: Arc<crate::sessions::Sessions>,
    /// Whether the broker answers; panics and restarts counted.
    pub health: Arc<BrokerHealth>,
    /// The supervisor task (it owns the listener task and restarts it).
    pub server: JoinHandle<()>,
    /// Largest packet it takes (the front refuses larger ones first).
    pub max_packet: usize,
}

impl Broker {
    /// Disconnects the session of a client id, if any (revocation).
    pub fn kick(&self, client_id: &str) -> bool {
        self.sessions.kick(client_id)
    }
}

/// The broker's health as its supervisor sees it.
#[derive(Debug, Default)]
pub struct BrokerHealth {
    healthy: AtomicBool,
    /// Panics inside rumqttd seen since start.
    pub panics: AtomicU64,
    /// Listener restarts since start.
    pub restarts: AtomicU64,
    /// Probes that got no CONNACK in time.
    pub probe_failures: AtomicU64,
    /// Connections a front listener could not accept (a full file table).
    pub accept_failures: AtomicU64,
    /// When the last accept failed, ms since the Unix epoch.
    last_accept_failure_ms: AtomicU64,
}

impl BrokerHealth {
    /// Whether new sessions get through now: the broker answers its probes and no
    /// front listener failed to accept a connection in the last few seconds.
    pub fn healthy(&self) -> bool {
        let recent =
            unix_ms().saturating_sub(self.last_accept_failure_ms.load(Ordering::Relaxed)) < ACCEPT_FAILURE_UNHEALTHY_MS;
        self.healthy.load(Ordering::Relaxed) && !recent
    }

    /// Sets whether the broker answers (a front serving sessions itself always does).
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// A front listener failed to accept a connection.
    pub fn accept_failed(&self) {
        self.accept_failures.fetch_add(1, Ordering::Relaxed);
        self.last_accept_failure_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// For status pages.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "healthy": self.healthy(),
            "panics": self.panics.load(Ordering::Relaxed),
            "restarts": self.restarts.load(Ordering::Relaxed),
            "probe_failures": self.probe_failures.load(Ordering::Relaxed),
            "accept_failures": self.accept_failures.load(Ordering::Relaxed),
        })
    }
}

/// Panics whose location is inside rumqttd, counted by a process-wide panic hook.
static RUMQTTD_PANICS: AtomicU64 = AtomicU64::new(0);

/// Installs (once) a panic hook that counts panics inside rumqttd, then calls the
/// hook that was there before.
fn count_rumqttd_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| l.file().contains("rumqttd")) {
                RUMQTTD_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// How long a failed accept keeps the broker unhealthy.
const ACCEPT_FAILURE_UNHEALTHY_MS: u64 = 5_000;

use fleetline_service::unix_ms;

/// How often the supervisor probes the broker with a real login.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// How to run the broker.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// Name in logs.
    pub name: String,
    /// Most client sessions (the owner's link and probes come on top).
    pub max_connections: usize,
    /// Largest MQTT packet.
    pub max_packet: usize,
    /// Memory for one topic filter's log before a slow reader skips ahead.
    pub log_bytes: usize,
    /// Filters whose logs are capped smaller: (filter, bytes).
    pub small_logs: Vec<(String, usize)>,
    /// Client id of the owner's own link; must not be a valid client's id.
    pub link_id: String,
    /// Filters the owner's link subscribes to.
    pub link_filters: Vec<String>,
}

/// Starts the router, the owner's link and the loopback listener, which accepts only
/// connections presenting `secret` as their password (the front listeners' rewrite).
pub async fn start(cfg: &BrokerSettings, secret: Arc<str>) -> anyhow::Result<(Broker, LinkTx, LinkRx)> {
    let listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let segment = (cfg.log_bytes / 8).max(1 << 20);
    let router = Router::new(
        0,
        RouterConfig {
            max_connections: cfg.max_connections + 16,
            max_outgoing_packet_count: 200,
            max_segment_size: segment,
            max_segment_count: 8,
            custom_segment: Some(
                cfg.small_logs
                    .iter()
                    .map(|(f, bytes)| {
                        (f.clone(), SegmentConfig { max_segment_size: (bytes / 2).max(1024), max_segment_count: 2 })
                    })
                    .collect(),
            ),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
    );
    let router_tx = router.spawn();
    let (mut link_tx, link_rx, _ack) =
        LinkBuilder::new(&cfg.link_id, router_tx.clone()).dynamic_filters(true).build().context("owner's link")?;
    for filter in &cfg.link_filters {
        link_tx.subscribe(filter.as_str()).with_context(|| format!("subscribing the owner's link to {filter}"))?;
    }

    count_rumqttd_panics();
    let server_tx = router_tx.clone();
    let make: MakeServer =
        Arc::new(move |settings| Server::new(settings, server_tx.clone(), rumqttd::protocol::v4::V4));
    let mut last_err = None;
    for _ in 0..20 {
        let addr = free_port(listen)?;
        match listen_on(cfg, addr, &make, &secret).await {
            Some(task) => {
                let health = Arc::new(BrokerHealth::default());
                health.healthy.store(true, Ordering::Relaxed);
                let supervisor =
                    tokio::spawn(supervise(cfg.clone(), addr, make.clone(), secret.clone(), task, health.clone()));
                let broker = Broker {
                    addr,
                    secret,
                    sessions: Arc::default(),
                    health,
                    server: supervisor,
                    max_packet: cfg.max_packet,
                };
                return Ok((broker, link_tx, link_rx));
            }
            None => last_err = Some(format!("could not listen on {addr}")),
        }
    }
    bail!(last_err.unwrap_or_else(|| "broker listener did not start".into()))
}

/// Makes a listener bound to the router (rumqttd does not name its channel type).
type MakeServer = Arc<dyn Fn(ServerSettings) -> Server<rumqttd::protocol::v4::V4> + Send + Sync>;

/// Starts rumqttd's listener on `addr`; `None` if it did not come up (port taken).
async fn listen_on(
    cfg: &BrokerSettings,
    addr: SocketAddr,
    make: &MakeServer,
    secret: &Arc<str>,
) -> Option<JoinHandle<()>> {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: cfg.max_packet,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let check = secret.clone();
    connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
        let ok = client_id == user && pass.len() == check.len() && pass.as_bytes() == check.as_bytes();
        async move { ok }
    });
    let settings =
        ServerSettings { name: cfg.name.clone(), listen: addr, tls: None, next_connection_delay_ms: 0, connections };
    let mut server = make(settings);
    let task = tokio::spawn(async move {
        if let Err(e) = server.start(LinkType::Remote).await {
            tracing::error!(error = %e, %addr, "broker listener stopped");
        }
    });
    // Listening, or failed to bind.
    for _ in 0..200 {
        if task.is_finished() {
            return None;
        }
        if probe(addr, secret).await {
            return Some(task);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    None
}

/// Watches the listener: a panic inside rumqttd (which poisons its connection
/// state for every later login), a listener task that ended, or two probes in a
/// row without a CONNACK make the broker unhealthy, and the listener is started
/// again on the same address (the router and live sessions carry on).
async fn supervise(
    cfg: BrokerSettings,
    addr: SocketAddr,
    make: MakeServer,
    secret: Arc<str>,
    mut task: JoinHandle<()>,
    health: Arc<BrokerHealth>,
) {
    let mut panics_seen = RUMQTTD_PANICS.load(Ordering::SeqCst);
    let mut failed_probes = 0u32;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let panics = RUMQTTD_PANICS.load(Ordering::SeqCst);
        let panicked = panics > panics_seen;
        if panicked {
            health.panics.fetch_add(panics - panics_seen, Ordering::Relaxed);
            metrics::counter!("fleetline_broker_panics_total").increment(panics - panics_seen);
            panics_seen = panics;
        }
        let answered = !task.is_finished() && probe(addr, &secret).await;
        if answered {
            failed_probes = 0;
        } else {
            failed_probes += 1;
            health.probe_failures.fetch_add(1, Ordering::Relaxed);
        }
        if !panicked && failed_probes < 2 {
            health.healthy.store(failed_probes == 0, Ordering::Relaxed);
            continue;
        }
        health.healthy.store(false, Ordering::Relaxed);
        tracing::error!(%addr, panicked, failed_probes, "device broker listener wedged; restarting it");
        task.abort();
        // The old listener's port is free once its task is gone; take it again.
        let mut restarted = None;
        for _ in 0..50 {
            if let Some(t) = listen_on(&cfg, addr, &make, &secret).await {
                restarted = Some(t);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match restarted {
            Some(t) => {
                task = t;
                failed_probes = 0;
                health.restarts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleetline_broker_restarts_total").increment(1);
                health.healthy.store(true, Ordering::Relaxed);
                tracing::warn!(%addr, "broker listener restarted");
            }
            None => {
                tracing::error!(%addr, "broker listener could not be restarted; retrying");
                task = tokio::spawn(async {});
            }
        }
    }
}

/// Whether the broker answers an MQTT login on `addr` (a full CONNECT and CONNACK,
/// so the broker sees an ordinary session that ends, not a failed handshake).
async fn probe(addr: SocketAddr, secret: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return false };
    let mut connect = rumqttc::mqttbytes::v4::Connect::new(PROBE_CLIENT);
    connect.set_login(PROBE_CLIENT, secret);
    let mut buf = bytes::BytesMut::new();
    if rumqttc::mqttbytes::v4::Packet::Connect(connect).write(&mut buf, 1024).is_err() {
        return false;
    }
    let mut connack = [0u8; 4];
    s.write_all(&buf).await.is_ok()
        && tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut connack)).await.is_ok_and(|r| r.is_ok())
        && connack == [0x20, 0x02, 0x00, 0x00]
}

/// Client id of the start-up probe.
const PROBE_CLIENT: &str = "fleetline-broker-probe";

/// A port that was free a moment ago on `listen`'s address.
pub fn free_port(listen: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind(SocketAddr::new(listen.ip(), 0)).context("finding a free port")?;
    Ok(l.local_addr()?)
}
