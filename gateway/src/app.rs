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
use tokio::task::JoinSet;

use crate::config::GatewayConfig;
use crate::devices::ingest::{Durables, Ingest, run_acker};
use crate::devices::registry::Registry;
use crate::http::{self, RenderMetrics};
use crate::queue::{self, QueueConfig, RecordId};
use crate::stats::GatewayStats;
use crate::uplink::Uplink;
use fleetline_broker::{Front, ReloadActions, Switchboard, TlsFiles, keep_provisioning};
use fleetline_service::provisioning::Reloaded;
use fleetline_wire::provisioning::ProvisioningError;

/// File descriptors kept free of device sessions: queue segments, the uplink, HTTP.
const FD_HEADROOM: u64 = 1024;

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
    cfg.validate()?;
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
    let (queue, first_unacked, queue_thread) = open_queue(&cfg, &durables, feed_tx)?;

    let mut fronts = JoinSet::new();
    let devices = start_devices(&cfg, &registry, &stats, &mut fronts).await?;

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
    let ingest_task = tokio::spawn(ingest.run(devices.inbound));
    let counter = Arc::new(fleetline_service::counter::PersistentCounter::open(&cfg.data_dir.join("ack-counter"))?);
    let acker_task = tokio::spawn(run_acker(devices.board.clone(), acks_rx, cfg.id.clone(), stats.clone(), counter));

    let (uplink_stop_tx, uplink_stop) = watch::channel(false);
    let uplink = Uplink {
        cfg: cfg.uplink.clone(),
        gateway: cfg.id.clone(),
        key: gateway_key,
        queue: queue.clone(),
        stats: stats.clone(),
        first_unacked,
    };
    let uplink_task = tokio::spawn(uplink.run(feed_rx, dropped_rx, uplink_stop));
    let logins: Arc<dyn fleetline_broker::Logins> = registry.clone();
    let reload_task = tokio::spawn(keep_provisioning(
        registry.file(),
        cfg.provisioning_reload,
        cfg.provisioning_max_removal,
        Some((devices.sessions.clone(), logins)),
        GatewayReloads { sessions: devices.sessions.clone(), stats: stats.clone() },
    ));

    let ops = http::Ops {
        id: cfg.id.clone(),
        stats: stats.clone(),
        queue: queue.clone(),
        metrics,
        devices_addr: devices.listening.plain,
        tls_addr: devices.listening.tls,
        broker: Some(devices.health.clone()),
        board: Some(devices.board.clone()),
        sessions: devices.sessions_active,
    };
    let (http_addr, http_server) = http::bind(cfg.http.listen, ops).await?;
    let http_task = tokio::spawn(http_server);
    stats.ready.store(true, Ordering::Relaxed);
    on_listening(&Listening {
        event: "listening",
        devices: devices.listening.plain.to_string(),
        devices_tls: devices.listening.tls.map(|a| a.to_string()),
        http: http_addr.to_string(),
    });

    let _ = stop.wait_for(|s| *s).await;

    // Stop taking data, let what was taken become durable and acked, then stop.
    tracing::info!("shutting down");
    stats.ready.store(false, Ordering::Relaxed);
    fronts.shutdown().await;
    // The ingest task ends, and with it the last sender of durable
    // batches: the acker sends what the queue made durable, then ends.
    ingest_task.abort();
    let _ = ingest_task.await;
    let _ = queue.sync().await;
    if tokio::time::timeout(Duration::from_secs(5), acker_task).await.is_err() {
        tracing::warn!("device acks still pending at shutdown; units will re-send those batches");
    }
    reload_task.abort();
    let _ = uplink_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), uplink_task).await;
    http_task.abort();
    drop(queue);
    let _ = tokio::task::spawn_blocking(move || queue_thread.join()).await;
    Ok(())
}

/// Opens the disk queue; its recovery tells `durables` what units have durable
/// here and gives the first record the cloud has not acked.
fn open_queue(
    cfg: &GatewayConfig,
    durables: &Arc<Durables>,
    feed: mpsc::Sender<queue::StoredRecord>,
) -> anyhow::Result<(queue::QueueHandle, RecordId, std::thread::JoinHandle<()>)> {
    let qcfg = QueueConfig {
        dir: cfg.data_dir.join("queue"),
        budget_bytes: cfg.queue.budget.0,
        segment_bytes: cfg.queue.segment.0,
        commit_interval: cfg.queue.commit_interval,
        policy: cfg.queue.when_full,
    };
    let mut first_unacked: Option<RecordId> = None;
    let (queue, report, queue_thread) = queue::open(
        qcfg,
        |id, _meta, batch| {
            first_unacked.get_or_insert(id);
            if let Ok(h) = fleetline_wire::peek_header(batch)
                && let (Ok(f), Ok(d)) = (h.fleet.parse(), h.device.parse())
            {
                durables.insert(f, d, h.epoch, h.seq);
            }
        },
        Some(feed),
    )
    .context("opening the disk queue")?;
    tracing::info!(?report, "disk queue recovered");
    Ok((queue, first_unacked.unwrap_or(RecordId(0)), queue_thread))
}

/// The device side: the front listeners that check logins and serve unit sessions
/// themselves, and the switchboard between those sessions and the ingest.
struct Devices {
    board: Arc<Switchboard>,
    inbound: mpsc::UnboundedReceiver<fleetline_broker::Inbound>,
    health: Arc<fleetline_broker::BrokerHealth>,
    sessions: Arc<fleetline_broker::sessions::Sessions>,
    listening: fleetline_broker::Listening,
    sessions_active: Arc<std::sync::atomic::AtomicUsize>,
}

async fn start_devices(
    cfg: &GatewayConfig,
    registry: &Arc<Registry>,
    stats: &Arc<GatewayStats>,
    fronts: &mut JoinSet<()>,
) -> anyhow::Result<Devices> {
    // What units hand over and the ingest has not yet taken is bounded; past it
    // the front stops reading from units until the ingest catches up.
    let (board, inbound) = Switchboard::new(cfg.devices.ingest_buffer.0 as usize);
    // Sessions the file table can hold: one descriptor each, with headroom for
    // queue segments, the uplink and HTTP. Past that, units are refused at once
    // ("server busy", counted) instead of failing accepts for everyone.
    let (max_sessions, lowered) = fleetline_broker::session_cap(
        cfg.devices.max_connections,
        FD_HEADROOM,
        fleetline_broker::FDS_PER_DIRECT_SESSION,
    );
    if lowered {
        tracing::warn!(
            configured = cfg.devices.max_connections,
            max_sessions,
            limit = fleetline_service::open_files_limit(),
            "devices.max_connections is more than this process's open-file limit holds; capped"
        );
    }
    stats.session_cap.store(max_sessions as u64, Ordering::Relaxed);
    let front =
        Front::direct(registry.clone(), stats.clone(), board.clone(), max_sessions, cfg.devices.max_packet.0 as usize);
    let sessions_active = front.active.clone();
    let health = front.health.clone();
    let sessions = front.sessions.clone();
    let tls = cfg.devices.tls.as_ref().map(|t| TlsFiles {
        listen: t.listen,
        cert: &t.cert,
        key: &t.key,
        handshake_timeout: t.handshake_timeout,
    });
    let listening = front.listen(cfg.devices.listen, tls, fronts).await?;
    Ok(Devices { board, inbound, health, sessions, listening, sessions_active })
}

/// Provisioning reloads at the gateway: revoked units are disconnected; sessions
/// opened with a key that is no longer accepted end (the shared loop rechecks them)
/// and the unit reconnects with its new key.
struct GatewayReloads {
    sessions: Arc<fleetline_broker::sessions::Sessions>,
    stats: Arc<GatewayStats>,
}

impl ReloadActions for GatewayReloads {
    fn reloaded(&self, change: &Reloaded) {
        let revoked = Registry::revoked(change);
        tracing::info!(revoked = revoked.len(), "provisioning reloaded");
        for (fleet, device) in revoked {
            GatewayStats::add(&self.stats.revocations, 1);
            self.sessions.kick(device_username(&fleet, &device).as_str());
        }
    }

    fn refused(&self, error: &ProvisioningError) {
        GatewayStats::add(&self.stats.provisioning_refused, 1);
        tracing::error!(error = %error, "provisioning file rejected; keeping the loaded one");
    }

    fn session_ended(&self, client_id: &str) {
        GatewayStats::add(&self.stats.sessions_ended_by_keys, 1);
        tracing::info!(client_id, "session ended: its login is no longer accepted");
    }
}
