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
use std::time::Duration;

use anyhow::{Context, bail};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, SegmentConfig, Server, ServerSettings};
use tokio::task::JoinHandle;

/// Disconnects a client id, in the background.
pub type KickFn = Arc<dyn Fn(String) + Send + Sync>;

/// The running broker.
pub struct Broker {
    /// The loopback listener's address.
    pub addr: SocketAddr,
    /// Disconnects a client by client id (revocation).
    pub kick: KickFn,
    /// The listener task.
    pub server: JoinHandle<()>,
}

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

    let mut last_err = None;
    for _ in 0..20 {
        let addr = free_port(listen)?;
        let mut connections = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: cfg.max_packet,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let secret_probe = secret.clone();
        let secret = secret.clone();
        connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let ok = client_id == user && pass.len() == secret.len() && pass.as_bytes() == secret.as_bytes();
            async move { ok }
        });
        let settings = ServerSettings {
            name: cfg.name.clone(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let mut server = Server::new(settings, router_tx.clone(), rumqttd::protocol::v4::V4);
        let task = tokio::spawn(async move {
            if let Err(e) = server.start(LinkType::Remote).await {
                tracing::error!(error = %e, %addr, "broker listener stopped");
            }
        });
        // Listening, or failed to bind (then pick another port if we may).
        for _ in 0..200 {
            if task.is_finished() {
                break;
            }
            if probe(addr, &secret_probe).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !task.is_finished() {
            let kick_tx = router_tx.clone();
            let kick: KickFn = Arc::new(move |client_id: String| {
                let router_tx = kick_tx.clone();
                // Building a link waits for the router, so it runs off the async workers.
                tokio::task::spawn_blocking(move || {
                    // Taking over the client id makes the router drop the client's
                    // connection; then the placeholder link disconnects itself.
                    let built = LinkBuilder::new(&client_id, router_tx).clean_session(true).build();
                    let result = built.map_err(|e| e.to_string()).and_then(|(mut tx, _rx, _)| {
                        let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
                        tokio::runtime::Handle::current()
                            .block_on(tx.send(Packet::Disconnect(bye, None)))
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    });
                    if let Err(e) = result {
                        tracing::warn!(client_id, error = %e, "could not disconnect client");
                    }
                });
            });
            return Ok((Broker { addr, kick, server: task }, link_tx, link_rx));
        }
        last_err = Some(format!("could not listen on {addr}"));
    }
    bail!(last_err.unwrap_or_else(|| "broker listener did not start".into()))
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
