//! The operations endpoint: liveness, readiness, Prometheus metrics, status JSON,
//! a vehicle's latest state, and a flush (the only write, behind the bearer token
//! when one is configured).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::node::ShardMsg;
use crate::stats::CloudStats;

/// Renders the Prometheus exposition text (installed by the binary).
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// What the endpoint reports on.
#[derive(Clone)]
pub struct Ops {
    /// Node id.
    pub node_id: String,
    /// Shard count.
    pub shard_count: u16,
    /// Counters.
    pub stats: Arc<CloudStats>,
    /// Shard inboxes.
    pub shards: Arc<Vec<Option<mpsc::Sender<ShardMsg>>>>,
    /// Prometheus rendering, when the binary installed a recorder.
    pub metrics: Option<RenderMetrics>,
    /// Bearer token for writes.
    pub token: Option<String>,
}

/// Binds the endpoint; returns its address and the server future.
pub async fn bind(listen: SocketAddr, ops: Ops) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let app = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/status", get(status))
        .route("/vehicles/{fleet}/{device}", get(vehicle))
        .route("/admin/flush", post(flush))
        .with_state(ops);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    Ok((addr, async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    }))
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.stats.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    ops.stats.export();
    match &ops.metrics {
        Some(render) => (StatusCode::OK, render()),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed".to_string()),
    }
}

async fn status(State(ops): State<Ops>) -> Json<serde_json::Value> {
    let mut waits = Vec::new();
    for s in ops.shards.iter().flatten() {
        let (tx, rx) = oneshot::channel();
        if s.send(ShardMsg::Status(tx)).await.is_ok() {
            waits.push(rx);
        }
    }
    let mut shards = Vec::new();
    for w in waits {
        if let Ok(s) = w.await {
            shards.push(s);
        }
    }
    let s = &ops.stats;
    let g = CloudStats::get;
    let last = s.last_commit_ms.load(Ordering::Relaxed);
    Json(json!({
        "node_id": ops.node_id,
        "ready": s.ready.load(Ordering::Relaxed),
        "broker_connected": s.broker_connected.load(Ordering::Relaxed),
        "shard_count": ops.shard_count,
        "shards_owned": shards.len(),
        "segments_open": shards.iter().filter(|s| s.open_rows > 0 || s.pending_acks > 0).count(),
        "rows_open": shards.iter().map(|s| s.open_rows).sum::<usize>(),
        "last_commit_ms": (last > 0).then_some(last),
        "bundles_received": g(&s.bundles_received),
        "samples_received": g(&s.samples_received),
        "batches_stored": g(&s.batches_stored),
        "readings_stored": g(&s.readings_stored),
        "dedupe_hits": g(&s.duplicates),
        "acks_sent": g(&s.acks_sent),
        "commits": g(&s.commits),
        "commit_failures": g(&s.commit_failures),
        "bytes_written": g(&s.bytes_written),
        "orphans_removed": g(&s.orphans_removed),
        "misrouted_bundles": g(&s.misrouted),
        "deadletters": s.deadletters(),
        "logins_rejected": s.logins_rejected.lock().map(|m| m.clone()).unwrap_or_default(),
        "shards": shards,
    }))
}

async fn vehicle(State(ops): State<Ops>, Path((fleet, device)): Path<(String, String)>) -> Response {
    let shard = fleetline_wire::shard::shard_of(&fleet, &device, ops.shard_count).0 as usize;
    let Some(Some(inbox)) = ops.shards.get(shard) else {
        return (StatusCode::MISDIRECTED_REQUEST, "vehicle's shard is not owned by this node").into_response();
    };
    let (tx, rx) = oneshot::channel();
    if inbox.send(ShardMsg::Vehicle(fleet, device, tx)).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shard stopped").into_response();
    }
    match rx.await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no data from this vehicle").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shard stopped").into_response(),
    }
}

fn authorized(ops: &Ops, headers: &HeaderMap) -> bool {
    let Some(token) = &ops.token else { return true };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given
        .is_some_and(|g| g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0)
}

async fn flush(State(ops): State<Ops>, headers: HeaderMap) -> Response {
    if !authorized(&ops, &headers) {
        return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
    }
    let results = crate::node::flush_all(&ops.shards).await;
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        Json(json!({"flushed": true})).into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"flushed": false, "errors": failed}))).into_response()
    }
}
