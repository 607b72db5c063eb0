//! Wires the gateway together: queue recovery, the device broker (and TLS in front
//! of it), ingest and acks, the uplink, provisioning reloads and the HTTP endpoint;
//! then runs until told to stop, and stops without losing anything.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use fleetline_wire::GatewayId;
use fleetline_wire::topics::device_username;
use tokio::sync::{mpsc, watch};

use crate::config::GatewayConfig;
use crate::devices::ingest::{Durables, Ingest, run_acker};
use crate::devices::registry::Registry;
use crate::http::{self, RenderMetrics};
use crate::queue::{self, QueueConfig, RecordId};
use crate::stats::GatewayStats;
use crate::uplink::Uplink;
use fleetline_broker::{BrokerSettings, Front};

/// File descriptors kept free of device sessions: queue segments, the uplink, HTTP.
const FD_HEADROOM: u64 = 1024;

/// Filter the ingest link subscribes to.
pub use fleetline_wire::topics::UP_FILTER;

/// Addresses the gateway listens on, printed at start-up as one JSON line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listening {
    /// Always `"listening"`.
    pub event: &'static str,
    /// Plain MQTT for devices.
    pub devices: String,
    /// TLS MQTT for devices.
    pub devices_tls: Option<String>,
    /// HTTP operations endpoint.
    pub http: String,
}

/// Runs the gateway until `stop` turns true. `on_listening` is called once every
/// listener is up.
pub async fn run(
    cfg: GatewayConfig,
    metrics: Option<RenderMetrics>,
    mut stop: watch::Receiver<bool>,
    on_listening: impl FnOnce(&Listening),
) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let stats = Arc::new(GatewayStats::default());
    let registry = Arc::new(Registry::load(&cfg.provisioning).context("loading the provisioning file")?);
    let gateway_id = GatewayId::new(&cfg.id).map_err(|_| anyhow::anyhow!("invalid gateway id"))?;
    let gateway_key = registry
        .snapshot()
        .gateway(&gateway_id)
        .map(|g| g.key.clone())
        .with_context(|| format!("gateway {} is not in the provisioning file", cfg.id))?;

    // Queue recovery rebuilds what devices have durable here.
    let durables = Arc::new(Durables::default());
    let (feed_tx, feed_rx) = mpsc::channel(16_384);
    let qcfg = QueueConfig {
        dir: cfg.data_dir.join("queue"),
        budget_bytes: cfg.queue.budget.0,
        segment_bytes: cfg.queue.segment.0,
        commit_interval: cfg.queue.commit_interval,
        policy: cfg.queue.when_full,
    };
    let mut first_unacked: Option<RecordId> = None;
    let recovering = durables.clone();
    let (queue, report, queue_thread) = queue::open(
        qcfg,
        |id, _meta, batch| {
            first_unacked.get_or_insert(id);
            if let Ok(h) = fleetline_wire::peek_header(batch)
                && let (Ok(f), Ok(d)) = (h.fleet.parse(), h.device.parse())
            {
                recovering.insert(f, d, h.epoch, h.seq);
            }
        },
        Some(feed_tx),
    )
    .context("opening the disk queue")?;
    tracing::info!(?report, "disk queue recovered");

    // The broker on loopback, and the front listeners that check logins.
    let secret = fleetline_broker::new_secret();
    let settings = BrokerSettings {
        name: "devices".into(),
        max_connections: cfg.devices.max_connections,
        max_packet: cfg.devices.max_packet.0 as usize,
        log_bytes: cfg.devices.broker_log.0 as usize,
        // Each device's ack and command topic gets a log of its own; keep those
        // small (32 KiB, about 300 acks), or memory grows with every device ever
        // connected. A device that falls that far behind on acks just re-sends
        // and is acked again.
        small_logs: [fleetline_wire::topics::ACK_FILTER, fleetline_wire::topics::CMD_FILTER]
            .map(|f| (f.to_string(), 32 * 1024))
            .to_vec(),
        // Devices' client ids are `{fleet}.{device}`: no clash possible.
        link_id: "fleetline-gateway-ingest".into(),
        link_filters: vec![UP_FILTER.into()],
    };
    let (device_broker, link_tx, link_rx) = fleetline_broker::start(&settings, secret).await?;
    // Sessions the file table can hold: three descriptors each, with headroom for
    // queue segments, the uplink and HTTP. Past that, units are refused at once
    // ("server busy", counted) instead of failing accepts for everyone.
    let (max_sessions, lowered) = fleetline_broker::session_cap(cfg.devices.max_connections, FD_HEADROOM);
    if lowered {
        tracing::warn!(
            configured = cfg.devices.max_connections,
            max_sessions,
            limit = fleetline_service::open_files_limit(),
            "devices.max_connections is more than this process's open-file limit holds; capped"
        );
    }
    stats.session_cap.store(max_sessions as u64, Ordering::Relaxed);
    let front = Front::new(registry.clone(), stats.clone(), &device_broker, max_sessions);
    let sessions_active = front.active.clone();
    let (devices_addr, plain) = front.clone().bind(cfg.devices.listen, None).await?;
    let mut front_tasks = vec![tokio::spawn(plain)];
    let tls_addr = match &cfg.devices.tls {
        Some(t) => {
            let cert = std::fs::read(&t.cert).with_context(|| format!("reading {}", t.cert.display()))?;
            let key = std::fs::read(&t.key).with_context(|| format!("reading {}", t.key.display()))?;
            let server = fleetline_service::tls::server_config(&cert, &key)?;
            let (addr, accept) = front.bind(t.listen, Some((server, t.handshake_timeout))).await?;
            front_tasks.push(tokio::spawn(accept));
            Some(addr)
        }
        None => None,
    };

    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let (dropped_tx, dropped_rx) = mpsc::unbounded_channel();
    let ingest = Arc::new(Ingest {
        registry: registry.clone(),
        queue: queue.clone(),
        stats: stats.clone(),
        durables,
        shard_count: cfg.shard_count,
        acks: acks_tx,
        dropped: dropped_tx,
    });
    let ingest_task = tokio::spawn(ingest.clone().run(link_rx));
    let counter = Arc::new(fleetline_service::counter::PersistentCounter::open(&cfg.data_dir.join("ack-counter"))?);
    let acker_task = tokio::spawn(run_acker(link_tx, acks_rx, cfg.id.clone(), stats.clone(), counter));

    let (uplink_stop_tx, uplink_stop) = watch::channel(false);
    let uplink = Uplink {
        cfg: cfg.uplink.clone(),
        gateway: cfg.id.clone(),
        key: gateway_key,
        queue: queue.clone(),
        stats: stats.clone(),
        first_unacked: first_unacked.unwrap_or(RecordId(0)),
    };
    let uplink_task = tokio::spawn(uplink.run(feed_rx, dropped_rx, uplink_stop));

    // Provisioning reloads: revoked devices are disconnected.
    let reload_registry = registry.clone();
    let sessions = device_broker.sessions.clone();
    let reload_stats = stats.clone();
    let period = cfg.provisioning_reload;
    let max_removal = cfg.provisioning_max_removal;
    let reload_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match reload_registry.reload_if_changed(max_removal) {
                Ok(Some(diff)) => {
                    tracing::info!(revoked = diff.revoked.len(), "provisioning reloaded");
                    for (fleet, device) in diff.revoked {
                        GatewayStats::add(&reload_stats.revocations, 1);
                        sessions.kick(device_username(&fleet, &device).as_str());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    GatewayStats::add(&reload_stats.provisioning_refused, 1);
                    tracing::error!(error = %e, "provisioning file rejected; keeping the loaded one");
                }
            }
            // Sessions opened with a key that is no longer accepted (rotated past its
            // window, or the unit revoked) end now; the unit reconnects with its new key.
            for id in sessions.recheck(|c, u, p| reload_registry.check_login(c, u, p)) {
                GatewayStats::add(&reload_stats.sessions_ended_by_keys, 1);
                tracing::info!(client_id = id, "session ended: its login is no longer accepted");
            }
        }
    });

    let ops = http::Ops {
        id: cfg.id.clone(),
        stats: stats.clone(),
        queue: queue.clone(),
        metrics,
        devices_addr,
        tls_addr,
        broker: Some(device_broker.health.clone()),
        sessions: sessions_active,
    };
    let (http_addr, http_server) = http::bind(cfg.http.listen, ops).await?;
    let http_task = tokio::spawn(http_server);
    stats.ready.store(true, Ordering::Relaxed);
    on_listening(&Listening {
        event: "listening",
        devices: devices_addr.to_string(),
        devices_tls: tls_addr.map(|a| a.to_string()),
        http: http_addr.to_string(),
    });

    let _ = stop.wait_for(|s| *s).await;

    // Stop taking data, let what was taken become durable and acked, then stop.
    tracing::info!("shutting down");
    stats.ready.store(false, Ordering::Relaxed);
    for t in &front_tasks {
        t.abort();
    }
    device_broker.server.abort();
    ingest_task.abort();
    let _ = queue.sync().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    acker_task.abort();
    reload_task.abort();
    let _ = uplink_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), uplink_task).await;
    http_task.abort();
    drop(queue);
    drop(ingest);
    let _ = tokio::task::spawn_blocking(move || queue_thread.join()).await;
    Ok(())
}
