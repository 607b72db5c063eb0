//! The operations endpoint: liveness, readiness, Prometheus metrics, status JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::json;

use crate::queue::QueueHandle;
use crate::stats::{GatewayStats, unix_ms};

/// Renders the Prometheus exposition text (installed by the binary).
pub use fleetline_service::RenderMetrics;

/// What the endpoint reports on.
#[derive(Clone)]
pub struct Ops {
    /// Gateway id.
    pub id: String,
    /// Counters.
    pub stats: Arc<GatewayStats>,
    /// The disk queue.
    pub queue: QueueHandle,
    /// Prometheus rendering, when the binary installed a recorder.
    pub metrics: Option<RenderMetrics>,
    /// Plain device listener.
    pub devices_addr: SocketAddr,
    /// TLS device listener.
    pub tls_addr: Option<SocketAddr>,
    /// The device front's health (failed accepts).
    pub broker: Option<Arc<fleetline_broker::BrokerHealth>>,
    /// The switchboard between unit sessions and the ingest.
    pub board: Option<Arc<fleetline_broker::Switchboard>>,
    /// Device sessions open now (both listeners).
    pub sessions: Arc<std::sync::atomic::AtomicUsize>,
}

/// Binds the endpoint; returns its address and the server future.
pub async fn bind(listen: SocketAddr, ops: Ops) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let app = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/status", get(status))
        .with_state(ops);
    fleetline_service::http::serve(listen, app).await
}

/// Ready while started, the disk queue can append, and the device broker answers.
/// Batches waiting this long with none taken make the gateway unready.
const INGEST_WEDGED_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    if !ops.stats.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting");
    }
    if ops.queue.stats().failing {
        return (StatusCode::SERVICE_UNAVAILABLE, "disk queue cannot append");
    }
    if let Some(health) = &ops.broker
        && !health.healthy()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "device broker not answering");
    }
    if let Some(board) = &ops.board
        && board.wedged(unix_ms(), INGEST_WEDGED_AFTER)
    {
        // Batches wait and the ingest has finished none for a while (a hung disk).
        return (StatusCode::SERVICE_UNAVAILABLE, "ingest not taking batches");
    }
    if ops.sessions.load(Ordering::Relaxed) as u64 >= GatewayStats::get(&ops.stats.session_cap) {
        // Full: a balancer should send new units elsewhere (more are refused, counted).
        return (StatusCode::SERVICE_UNAVAILABLE, "device sessions at capacity");
    }
    (StatusCode::OK, "ready")
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let q = ops.queue.stats();
    metrics::gauge!("fleetline_gateway_queue_records").set(q.records as f64);
    metrics::gauge!("fleetline_gateway_queue_bytes").set(q.bytes as f64);
    metrics::gauge!("fleetline_gateway_queue_lost_records").set(q.lost_records as f64);
    let age = q.oldest_received_at_ms.map_or(0.0, |t| unix_ms().saturating_sub(t) as f64 / 1000.0);
    metrics::gauge!("fleetline_gateway_queue_oldest_age_seconds").set(age);
    match &ops.metrics {
        Some(render) => (StatusCode::OK, render()),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed".to_string()),
    }
}

async fn status(State(ops): State<Ops>) -> Json<serde_json::Value> {
    let s = &ops.stats;
    let q = ops.queue.stats();
    let uplink = s.uplink.lock().map(|u| u.clone()).unwrap_or_default();
    let now = unix_ms();
    Json(json!({
        "id": ops.id,
        "listeners": {"devices": ops.devices_addr.to_string(), "devices_tls": ops.tls_addr.map(|a| a.to_string())},
        "queue": {
            "records": q.records,
            "bytes": q.bytes,
            "segments": q.segments,
            "oldest_age_ms": q.oldest_received_at_ms.map(|t| now.saturating_sub(t)),
            "appended": q.appended,
            "commits": q.commits,
            "acked": q.acked,
            "refused_full": q.refused_full,
            "io_errors": q.io_errors,
            "lost_records": q.lost_records,
            "failing": q.failing,
        },
        "upstream": uplink,
        "accepted": {
            "batches": GatewayStats::get(&s.batches_accepted),
            "samples": GatewayStats::get(&s.samples_accepted),
            "duplicates": GatewayStats::get(&s.duplicates),
            "unknown_kind_series": GatewayStats::get(&s.unknown_kinds),
            "device_acks_sent": GatewayStats::get(&s.device_acks_sent),
            "device_acks_undelivered": GatewayStats::get(&s.device_acks_undelivered),
        },
        "rejected": s.rejected(),
        "logins_rejected": s.logins_rejected(),
        "packets_refused": s.packets_refused(),
        "dropped": {
            "batches": GatewayStats::get(&s.dropped_batches),
            "samples": GatewayStats::get(&s.dropped_samples),
            "then_delivered": GatewayStats::get(&s.dropped_then_delivered),
        },
        "tls": {
            "sessions": GatewayStats::get(&s.tls_sessions),
            "handshake_failed": GatewayStats::get(&s.tls_handshake_failed),
            "handshake_timeout": GatewayStats::get(&s.tls_handshake_timeout),
        },
        "revocations": GatewayStats::get(&s.revocations),
        "sessions_ended_by_keys": GatewayStats::get(&s.sessions_ended_by_keys),
        "provisioning_refused": GatewayStats::get(&s.provisioning_refused),
        "broker": ops.broker.as_ref().map(|b| b.status()),
        "front": ops.board.as_ref().map(|b| serde_json::json!({
            "backlog_bytes": b.backlog_bytes(),
            "held_back": b.held_back.load(Ordering::Relaxed),
            "deliveries": b.delivered.load(Ordering::Relaxed),
            "deliveries_dropped": b.dropped.load(Ordering::Relaxed),
            "filters": b.filters(),
        })),
        "session_cap": GatewayStats::get(&s.session_cap),
        "sessions": ops.sessions.load(Ordering::Relaxed),
        "devices": s.devices(),
    }))
}
