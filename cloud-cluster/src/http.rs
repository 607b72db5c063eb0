//! The operations endpoint: liveness, readiness, Prometheus metrics, status JSON,
//! a vehicle's latest state (behind a token when one is configured), the schema
//! registry's REST API, and the writes — flush, rollup, dead-letter replay, schema
//! registration and compatibility modes — behind the bearer token when one is
//! configured.

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

use crate::shard::ShardMsg;
use crate::stats::CloudStats;

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
    /// Shard inboxes.
    pub shards: Arc<Vec<Option<mpsc::Sender<ShardMsg>>>>,
    /// Prometheus rendering, when the binary installed a recorder.
    pub metrics: Option<RenderMetrics>,
    /// Bearer token for writes (and vehicle reads).
    pub token: Option<String>,
    /// Bearer token for vehicle reads only.
    pub read_token: Option<String>,
    /// The schema registry.
    pub registry: Arc<crate::registry::Registry>,
    /// The object store (dead letters are read back from it).
    pub store: crate::store::Store,
    /// The rollup job (one run at a time).
    pub rollup: Arc<crate::rollup::RollupJob>,
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
        .route("/deadletter/replay", post(replay))
        .route("/admin/rollup", post(rollup))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}/versions", get(subject_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(subject_version))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/compatibility/subjects/{subject}/versions/latest", post(test_compatibility))
        .route("/config", get(get_config).put(put_config))
        .route("/config/{subject}", get(get_subject_config).put(put_subject_config))
        .with_state(ops);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the HTTP listener {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    Ok((addr, async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    }))
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.stats.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
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
        "misrouted_bundles": g(&s.misrouted),
        "deadletters": s.deadletters(),
        "events": s.events(),
        "aggregates": g(&s.aggregates),
        "late_samples": g(&s.late_samples),
        "analytics_gaps_skipped": g(&s.gaps_skipped),
        "alerts_sent": g(&s.alerts_sent),
        "rollup_last": ops.rollup.last.lock().map(|l| *l).unwrap_or_default(),
        "logins_rejected": s.logins_rejected.lock().map(|m| m.clone()).unwrap_or_default(),
        "shards": shards,
    }))
}

async fn vehicle(
    State(ops): State<Ops>,
    headers: HeaderMap,
    Path((fleet, device)): Path<(String, String)>,
) -> Response {
    if !may_read(&ops, &headers) {
        return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
    }
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

/// The bearer token of a request; the scheme is case-insensitive (RFC 9110).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn token_is(given: Option<&str>, token: Option<&String>) -> bool {
    matches!((given, token), (Some(g), Some(t)) if fleetline_service::constant_time_eq(g.as_bytes(), t.as_bytes()))
}

/// May write: the admin token, when one is set.
fn authorized(ops: &Ops, headers: &HeaderMap) -> bool {
    ops.token.is_none() || token_is(bearer(headers), ops.token.as_ref())
}

/// May read vehicle data: the admin or the read token, when a token is set.
fn may_read(ops: &Ops, headers: &HeaderMap) -> bool {
    let given = bearer(headers);
    ops.token.is_none() || token_is(given, ops.token.as_ref()) || token_is(given, ops.read_token.as_ref())
}

async fn flush(State(ops): State<Ops>, headers: HeaderMap) -> Response {
    if !authorized(&ops, &headers) {
        return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
    }
    let results = crate::shard::flush_all(&ops.shards).await;
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        Json(json!({"flushed": true})).into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"flushed": false, "errors": failed}))).into_response()
    }
}

async fn rollup(State(ops): State<Ops>, headers: HeaderMap) -> Response {
    if !authorized(&ops, &headers) {
        return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
    }
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

async fn replay(State(ops): State<Ops>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if !authorized(&ops, &headers) {
        return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
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
    if ops.registry.latest(&subject).is_none() {
        return (StatusCode::NOT_FOUND, format!("subject {subject} has no schema")).into_response();
    }
    let files = match crate::replay::candidate_files(&ops.store).await {
        Ok(f) => f,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("listing dead letters: {e}")).into_response(),
    };
    let mut total = crate::replay::ReplayOutcome::default();
    let mut errors = Vec::new();
    let mut not_owned = 0u64;
    // In steps: a step's dead letters go to their shards, which commit before the next.
    let mut items = Vec::new();
    let mut files = files.into_iter().peekable();
    while let Some(path) = files.next() {
        if let Err(e) = crate::replay::read_file(&ops.store, &path, &mut items).await {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("reading dead letters: {e}")).into_response();
        }
        if items.len() < crate::replay::REPLAY_STEP && files.peek().is_some() {
            continue;
        }
        let mut per_shard: Vec<Vec<crate::replay::ReplayItem>> = vec![Vec::new(); ops.shard_count as usize];
        for item in items.drain(..) {
            let s = fleetline_wire::shard::shard_of(&item.fleet, &item.device, ops.shard_count).0 as usize;
            per_shard[s].push(item);
        }
        let mut waits = Vec::new();
        for (s, items) in per_shard.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let Some(Some(inbox)) = ops.shards.get(s) else {
                not_owned += items.len() as u64;
                continue;
            };
            let (tx, rx) = oneshot::channel();
            if inbox.send(ShardMsg::Replay(items, subject.clone(), tx)).await.is_ok() {
                waits.push(rx);
            }
        }
        for w in waits {
            match w.await {
                Ok(Ok(o)) => total += o,
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("shard task gone".into()),
            }
        }
    }
    let body = json!({"subject": subject, "outcome": total, "not_owned_here": not_owned, "errors": errors});
    if errors.is_empty() {
        Json(body).into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
    }
}

// --- Schema registry, shaped like Confluent's.

use crate::registry::{Compatibility, RegistryError};

fn reg_error(code: u16, message: String) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!({"error_code": code, "message": message}))).into_response()
}

fn unauthorized() -> Response {
    reg_error(401, "bearer token required".into())
}

#[derive(serde::Deserialize)]
struct SchemaBody {
    schema: String,
}

#[derive(serde::Deserialize)]
struct ConfigBody {
    compatibility: Compatibility,
}

async fn subjects(State(ops): State<Ops>) -> Json<Vec<String>> {
    Json(ops.registry.subjects())
}

async fn subject_versions(State(ops): State<Ops>, Path(subject): Path<String>) -> Response {
    match ops.registry.versions(&subject) {
        Some(v) => Json(v).into_response(),
        None => reg_error(404, format!("subject {subject} not found")),
    }
}

async fn subject_version(State(ops): State<Ops>, Path((subject, version)): Path<(String, String)>) -> Response {
    let v = match version.as_str() {
        "latest" => None,
        n => match n.parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => return reg_error(422, format!("version {n:?} is not a number or latest")),
        },
    };
    match ops.registry.version(&subject, v) {
        Some(v) => Json(v).into_response(),
        None => reg_error(404, format!("subject {subject} has no version {version}")),
    }
}

async fn schema_by_id(State(ops): State<Ops>, Path(id): Path<u32>) -> Response {
    match ops.registry.schema(id) {
        Some(s) => Json(json!({"schema": s.canonical()})).into_response(),
        None => reg_error(404, format!("schema {id} not found")),
    }
}

async fn register(
    State(ops): State<Ops>,
    headers: HeaderMap,
    Path(subject): Path<String>,
    body: Result<Json<SchemaBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !authorized(&ops, &headers) {
        return unauthorized();
    }
    let body = match schema_body(body) {
        Ok(b) => b,
        Err((code, message)) => return reg_error(code, message),
    };
    match ops.registry.register(&subject, &body.schema).await {
        Ok(v) => Json(json!({"id": v.id, "version": v.version})).into_response(),
        Err(RegistryError::Invalid(m)) => reg_error(422, m),
        Err(e @ RegistryError::Incompatible(_)) => reg_error(409, e.to_string()),
        Err(e) => reg_error(500, e.to_string()),
    }
}

/// A schema body, or the answer to a bad one: 413 over the size limit, 422 otherwise.
fn schema_body(
    body: Result<Json<SchemaBody>, axum::extract::rejection::JsonRejection>,
) -> Result<SchemaBody, (u16, String)> {
    match body {
        Ok(Json(b)) => Ok(b),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err((413, e.body_text())),
        Err(_) => Err((422, "body must be {\"schema\": \"...\"}".into())),
    }
}

async fn test_compatibility(
    State(ops): State<Ops>,
    Path(subject): Path<String>,
    body: Result<Json<SchemaBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match schema_body(body) {
        Ok(b) => b,
        Err((code, message)) => return reg_error(code, message),
    };
    match ops.registry.test(&subject, &body.schema) {
        Ok(problems) => Json(json!({"is_compatible": problems.is_empty(), "messages": problems})).into_response(),
        Err(e) => reg_error(422, e.to_string()),
    }
}

async fn get_config(State(ops): State<Ops>) -> Json<serde_json::Value> {
    Json(json!({"compatibilityLevel": ops.registry.compatibility(None)}))
}

async fn get_subject_config(State(ops): State<Ops>, Path(subject): Path<String>) -> Json<serde_json::Value> {
    Json(json!({"compatibilityLevel": ops.registry.compatibility(Some(&subject))}))
}

async fn put_config(
    State(ops): State<Ops>,
    headers: HeaderMap,
    body: Result<Json<ConfigBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    set_config(ops, headers, None, body).await
}

async fn put_subject_config(
    State(ops): State<Ops>,
    headers: HeaderMap,
    Path(subject): Path<String>,
    body: Result<Json<ConfigBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    set_config(ops, headers, Some(subject), body).await
}

async fn set_config(
    ops: Ops,
    headers: HeaderMap,
    subject: Option<String>,
    body: Result<Json<ConfigBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !authorized(&ops, &headers) {
        return unauthorized();
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return reg_error(413, e.body_text()),
        Err(_) => return reg_error(422, "body must be {\"compatibility\": \"BACKWARD|FORWARD|FULL|…|NONE\"}".into()),
    };
    match ops.registry.set_compatibility(subject.as_deref(), body.compatibility).await {
        Ok(()) => Json(json!({"compatibility": body.compatibility})).into_response(),
        Err(e) => reg_error(500, e.to_string()),
    }
}
