//! The operations endpoint: liveness, readiness, Prometheus metrics, status JSON,
//! a vehicle's latest state, the schema registry's REST API ([`registry`]), and
//! the writes — flush, rollup, dead-letter replay, schema registration and
//! compatibility modes. One layer (`auth`) decides who may do what: with a
//! token configured, every write needs it, and vehicle reads need it or the
//! read token.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cluster::ClusterState;
use crate::jobs::replay::{ReplayError, replay_all};
use crate::shard::ShardDirectory;
use crate::telemetry::CloudStats;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;

mod auth;
mod cluster;
mod models;
pub mod registry;

use auth::Tokens;

/// Renders the Prometheus exposition text (installed by the binary).
pub use fleetline_service::RenderMetrics;

/// What the endpoint reports on.
#[derive(Clone)]
pub struct Ops {
    /// Node id.
    pub node_id: String,
    /// Shard count.
    pub shard_count: u16,
    /// Counters.
    pub stats: Arc<CloudStats>,
    /// The shards this node owns.
    pub shards: ShardDirectory,
    /// The node's picture of the cluster.
    pub cluster: Arc<ClusterState>,
    /// Prometheus rendering, when the binary installed a recorder.
    pub metrics: Option<RenderMetrics>,
    /// Bearer token for writes (and vehicle reads).
    pub token: Option<String>,
    /// Bearer token for vehicle reads only.
    pub read_token: Option<String>,
    /// The schema registry.
    pub registry: Arc<crate::registry::Registry>,
    /// The model registry.
    pub models: Arc<crate::inference::ModelRegistry>,
    /// The object store (dead letters are read back from it).
    pub store: crate::lake::store::Store,
    /// The rollup job (one run at a time).
    pub rollup: Arc<crate::jobs::rollup::RollupJob>,
}

/// Serves the endpoint on a bound listener.
pub fn serve(listener: tokio::net::TcpListener, ops: Ops) -> impl std::future::Future<Output = ()> {
    let tokens = Tokens { write: ops.token.clone(), read: ops.read_token.clone() };
    let app = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/status", get(status))
        .route("/scaling/load", get(load))
        .route("/vehicles/{fleet}/{device}", get(vehicle))
        .route("/admin/flush", post(flush))
        .route("/deadletter/replay", post(replay))
        .route("/admin/rollup", post(rollup))
        .merge(registry::router())
        .merge(models::router())
        .merge(cluster::router())
        .layer(axum::middleware::from_fn_with_state(tokens, auth::require_token))
        .with_state(ops);
    fleetline_service::http::serve_on(listener, app)
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.stats.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    match &ops.metrics {
        Some(render) => (StatusCode::OK, render()),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed".to_string()),
    }
}

async fn status(State(ops): State<Ops>) -> Json<serde_json::Value> {
    let shards = ops.shards.statuses().await;
    let s = &ops.stats;
    let g = CloudStats::get;
    let last = s.last_commit_ms.load(Ordering::Relaxed);
    Json(json!({
        "node_id": ops.node_id,
        "ready": s.is_ready(),
        "shards_down": s.shards_down(),
        "bundles_shard_down": g(&s.bundles_shard_down),
        "provisioning_refused": g(&s.provisioning_refused),
        "sessions_ended_by_keys": g(&s.sessions_ended_by_keys),
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
        "shard_claims": g(&s.claims),
        "fencing_refusals": g(&s.fencing_refusals),
        "misrouted_bundles": g(&s.misrouted),
        "deadletters": s.deadletters(),
        "deadletters_over_quota": s.deadletters_over_quota(),
        "events": s.events(),
        "aggregates": g(&s.aggregates),
        "late_samples": g(&s.late_samples),
        "analytics_gaps_skipped": g(&s.gaps_skipped),
        "alerts_sent": g(&s.alerts_sent),
        "rollup_last": ops.rollup.last.lock().map(|l| *l).unwrap_or_default(),
        "logins_rejected": s.logins_rejected.lock().map(|m| m.clone()).unwrap_or_default(),
        "packets_refused": s.packets_refused.lock().map(|m| m.clone()).unwrap_or_default(),
        "shards": shards,
    }))
}

/// `GET /scaling/load`: this node's backlog now and averaged over the last
/// [`LOAD_WINDOW`](crate::telemetry::LOAD_WINDOW), the records it took per
/// second, and the oldest uncommitted wait. `?scope=cluster` sums every
/// `ingest` member's (each asked for its own): what an autoscaler reading one
/// URL needs (KEDA `metrics-api`: `ingest_records_per_second` and the backlog
/// with `AverageValue` targets per pod, `oldest_uncommitted_seconds` with a
/// `Value` target).
async fn load(
    State(ops): State<Ops>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    match q.get("scope").map(String::as_str) {
        None | Some("local") => Json(local_load(&ops)).into_response(),
        Some("cluster") => cluster::load(&ops).await,
        Some(other) => {
            (StatusCode::BAD_REQUEST, format!("scope must be local or cluster, not {other:?}")).into_response()
        }
    }
}

/// This node's load as `/scaling/load` reports it.
pub(crate) fn local_load(ops: &Ops) -> LoadReport {
    let loads = ops.shards.loads();
    let oldest = loads.iter().map(|l| l.oldest_wait_ms).max().unwrap_or(0);
    let mean = ops.stats.mean_load();
    LoadReport {
        node: ops.node_id.clone(),
        shards_owned: loads.len(),
        backlog_records: loads.iter().map(|l| l.open_rows).sum(),
        backlog_bytes: loads.iter().map(|l| l.bytes).sum(),
        backlog_bundles_waiting: loads.iter().map(|l| l.inbox_bundles).sum(),
        backlog_records_avg: mean.records,
        backlog_bytes_avg: mean.bytes,
        ingest_records_per_second: (mean.records_per_second * 10.0).round() / 10.0,
        oldest_uncommitted_seconds: oldest as f64 / 1000.0,
    }
}

/// One node's load.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    /// The node.
    pub node: String,
    /// Shards it owns now.
    pub shards_owned: usize,
    /// Records taken but not committed yet (open segments).
    pub backlog_records: u64,
    /// Bytes taken but not committed yet (as received): the open segments'
    /// bundles and those waiting in the shards' mailboxes.
    pub backlog_bytes: u64,
    /// Bundles waiting in the shards' mailboxes (not yet in a segment).
    pub backlog_bundles_waiting: u64,
    /// Records taken but not committed, averaged over the last
    /// [`LOAD_WINDOW`](crate::telemetry::LOAD_WINDOW) (sampled ten times a second).
    pub backlog_records_avg: u64,
    /// Their bytes, averaged the same way.
    pub backlog_bytes_avg: u64,
    /// Records taken per second over the same window.
    pub ingest_records_per_second: f64,
    /// How long the oldest of them has waited.
    pub oldest_uncommitted_seconds: f64,
}

async fn vehicle(
    State(ops): State<Ops>,
    Path((fleet, device)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    let shard = match ops.shards.of_device(&fleet, &device) {
        Ok(s) => s,
        // Asked of a node that does not own the shard: the owner answers.
        Err(e) => return cluster::from_owner(&ops, &fleet, &device, &headers, e).await,
    };
    match shard.vehicle(fleet, device).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no data from this vehicle").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn flush(State(ops): State<Ops>) -> Response {
    let results = ops.shards.flush_all().await;
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).map(|e| e.to_string()).collect();
    if failed.is_empty() {
        Json(json!({"flushed": true})).into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"flushed": false, "errors": failed}))).into_response()
    }
}

async fn rollup(State(ops): State<Ops>) -> Response {
    match ops.rollup.run().await {
        Ok(r) => Json(json!(r)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("rollup failed: {e:#}")).into_response(),
    }
}

/// Body of `POST /deadletter/replay` (all fields optional).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReplayRequest {
    /// Subject to judge by when a row's schema id is in several subjects or unknown
    /// (`fleetline.readings`).
    subject: Option<String>,
}

/// `?scope=local`: this node's shards only (how a cluster's orchestrator asks each member).
#[derive(Debug, Default, serde::Deserialize)]
struct ReplayScope {
    scope: Option<String>,
}

async fn replay(
    State(ops): State<Ops>,
    axum::extract::Query(scope): axum::extract::Query<ReplayScope>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if ops.cluster.mode != crate::cluster::Mode::Single && scope.scope.as_deref() != Some("local") {
        return cluster::replay(&ops, &headers, body).await;
    }
    let req: ReplayRequest = if body.is_empty() {
        ReplayRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("bad request body: {e}")).into_response(),
        }
    };
    let subject = req.subject.unwrap_or_else(|| crate::registry::READINGS_SUBJECT.to_string());
    // A member asked by the orchestrator may not have seen a schema registered a
    // moment ago on another node.
    if ops.registry.latest(&subject).is_none() {
        let _ = ops.registry.refresh().await;
    }
    match replay_all(&ops.store, &ops.registry, &ops.shards, subject).await {
        Ok(report) if report.errors.is_empty() => Json(report).into_response(),
        Ok(report) => (StatusCode::INTERNAL_SERVER_ERROR, Json(report)).into_response(),
        Err(e @ ReplayError::NoSchema(_)) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
