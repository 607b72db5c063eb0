//! `/cluster/*`: what this node knows of the cluster, and the answers that come
//! from another node.
//!
//! - `GET /cluster/health`: this node as peers probe it (id, roles, version, where
//!   it is reached, whether it is leaving).
//! - `GET /cluster/members`: the stable member set acted on, since when, and the
//!   raw set being discovered.
//! - `GET /cluster/shards`: every shard's head (owner, lease epoch, claim,
//!   generation) as the lake has it, and where it stands on this node.
//! - `GET /scaling/load?scope=cluster`: the backlog summed over the `ingest`
//!   members, and per member.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

use super::Ops;
use crate::cluster::discovery::Health;
use crate::shard::{ShardUnavailable, read_head};

/// Marks a request one node passed to another (never passed on again).
const FORWARDED: &str = "x-fleetline-forwarded-by";

pub(super) fn router() -> Router<Ops> {
    Router::new()
        .route("/cluster/health", get(health))
        .route("/cluster/members", get(members))
        .route("/cluster/shards", get(shards))
}

async fn health(State(ops): State<Ops>) -> Json<Health> {
    let me = &ops.cluster.me;
    Json(Health {
        node: me.id.clone(),
        roles: me.roles.iter().copied().collect(),
        version: me.version.clone(),
        http: me.http.clone(),
        leaving: ops.cluster.leaving(),
    })
}

async fn members(State(ops): State<Ops>) -> Json<serde_json::Value> {
    let c = &ops.cluster;
    let view = c.view();
    let since = view.as_ref().map(|(_, t)| *t);
    Json(json!({
        "node": c.me.id,
        "mode": format!("{:?}", c.mode).to_lowercase(),
        "leaving": c.leaving(),
        "members": view.map(|(v, _)| v),
        "members_since_ms": since,
        "ms_since_change": since.map(|t| fleetline_service::unix_ms() as i64 - t),
        "discovered": c.raw(),
        "view_changes": c.view_changes.load(Ordering::Relaxed),
        "shards_acquired": c.acquired.load(Ordering::Relaxed),
        "shards_released": c.released.load(Ordering::Relaxed),
        "shards_lost": c.lost.load(Ordering::Relaxed),
    }))
}

async fn shards(State(ops): State<Ops>) -> Response {
    let heads =
        futures::future::join_all((0..ops.shard_count).map(|s| read_head(&ops.store, s, ops.shard_count))).await;
    let locals = ops.cluster.locals();
    let mut out = Vec::with_capacity(heads.len());
    for (s, head) in heads.into_iter().enumerate() {
        let s = s as u16;
        let here = locals.get(&s);
        out.push(match head {
            Ok((h, _)) => json!({
                "shard": s,
                "owner": h.owner,
                "epoch": h.epoch,
                "claim": h.claim,
                "generation": h.generation,
                "head_changed_ms": h.at_ms,
                "here": here,
            }),
            Err(e) => json!({"shard": s, "error": e.to_string(), "here": here}),
        });
    }
    Json(json!({"node": ops.cluster.me.id, "shards": out})).into_response()
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        fleetline_service::tls::install_ring_provider();
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    })
}

/// A request passed on to `member`: marked as passed on (never passed on again),
/// with the caller's credentials.
fn passed_on(
    ops: &Ops,
    headers: &HeaderMap,
    method: reqwest::Method,
    member: &crate::cluster::Member,
    path: &str,
) -> reqwest::RequestBuilder {
    let mut req =
        client().request(method, format!("http://{}{path}", member.http)).header(FORWARDED, ops.cluster.me.id.as_str());
    if let Some(auth) = headers.get("authorization") {
        req = req.header("authorization", auth.as_bytes());
    }
    req
}

/// A vehicle asked of a node that does not own its shard: asks the owner (as the
/// shard's head names it, if it is a member) and passes its answer on.
pub(super) async fn from_owner(
    ops: &Ops,
    fleet: &str,
    device: &str,
    headers: &HeaderMap,
    not_here: ShardUnavailable,
) -> Response {
    let misdirected = |why: String| (StatusCode::MISDIRECTED_REQUEST, why).into_response();
    if headers.contains_key(FORWARDED) || ops.cluster.mode == crate::cluster::Mode::Single {
        return misdirected(not_here.to_string());
    }
    let shard = ops.shards.shard_of(fleet, device);
    let owner = match read_head(&ops.store, shard, ops.shard_count).await {
        Ok((h, _)) => h.owner,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let member = owner.as_deref().and_then(|o| ops.cluster.view().and_then(|(v, _)| v.get(o).cloned()));
    let Some(member) = member.filter(|m| m.id != ops.cluster.me.id) else {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("shard {shard} has no live owner right now; try again"))
            .into_response();
    };
    let req = passed_on(ops, headers, reqwest::Method::GET, &member, &format!("/vehicles/{fleet}/{device}"));
    match req.send().await {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let kind =
                resp.headers().get("content-type").and_then(|v| axum::http::HeaderValue::from_bytes(v.as_bytes()).ok());
            let body = resp.bytes().await.unwrap_or_default();
            let mut r = (status, body).into_response();
            if let Some(kind) = kind {
                r.headers_mut().insert("content-type", kind);
            }
            if let Ok(v) = axum::http::HeaderValue::from_str(&member.id) {
                r.headers_mut().insert("x-fleetline-answered-by", v);
            }
            r
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("shard {shard}'s owner {} did not answer: {e}", member.id))
            .into_response(),
    }
}

/// `POST /deadletter/replay` in a cluster: orchestrated by the `jobs` singleton (a
/// request to another node is passed to it), which asks every `ingest` member to
/// replay into its own shards (`?scope=local`) and sums their reports.
pub(super) async fn replay(ops: &Ops, headers: &HeaderMap, body: axum::body::Bytes) -> Response {
    let Some((view, _)) = ops.cluster.view() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no member set yet; try again").into_response();
    };
    let post = |member: &crate::cluster::Member, query: &str| {
        passed_on(ops, headers, reqwest::Method::POST, member, &format!("/deadletter/replay{query}"))
            .timeout(std::time::Duration::from_secs(600))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    };
    if !ops.cluster.runs_singleton(crate::cluster::Role::Jobs) {
        let holder = view.singleton(crate::cluster::Role::Jobs).and_then(|id| view.get(id)).cloned();
        let Some(holder) = holder.filter(|_| !headers.contains_key(FORWARDED)) else {
            return (StatusCode::SERVICE_UNAVAILABLE, "no jobs member runs the replay right now; try again")
                .into_response();
        };
        return match post(&holder, "").await {
            Ok(resp) => {
                let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                (status, resp.bytes().await.unwrap_or_default()).into_response()
            }
            Err(e) => {
                (StatusCode::BAD_GATEWAY, format!("the jobs member {} did not answer: {e}", holder.id)).into_response()
            }
        };
    }
    let members: Vec<crate::cluster::Member> =
        view.members().iter().filter(|m| m.has(crate::cluster::Role::Ingest)).cloned().collect();
    let answers = futures::future::join_all(members.iter().map(|m| async move {
        let r = async {
            let resp = post(m, "?scope=local").await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
            if status.as_u16() == 404 {
                return Err(String::from_utf8_lossy(&bytes).into_owned());
            }
            serde_json::from_slice::<crate::jobs::replay::ReplayReport>(&bytes)
                .map_err(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)))
        }
        .await;
        (m.id.clone(), r)
    }))
    .await;
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    let mut subject = None;
    for (id, r) in answers {
        match r {
            Ok(rep) => {
                subject.get_or_insert_with(|| rep.subject.clone());
                reports.push(rep);
            }
            Err(e) => failed.push(format!("{id}: {e}")),
        }
    }
    let report = crate::jobs::replay::ReplayReport::merge(
        subject.unwrap_or_else(|| crate::registry::READINGS_SUBJECT.to_string()),
        reports,
        failed,
    );
    let status = if report.errors.is_empty() { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR };
    (status, Json(report)).into_response()
}

/// `GET /scaling/load?scope=cluster`: every `ingest` member's load (this node's
/// own without a request), summed, and per member. `backlog_records_per_pod` is
/// the averaged backlog summed over the members that answered, divided by the
/// number of members; a
/// member that did not answer is named under `unanswered` (its backlog is then
/// missing from the sum: the figure errs low for one poll, never high).
pub(super) async fn load(ops: &Ops) -> Response {
    let members: Vec<crate::cluster::Member> = match ops.cluster.view() {
        Some((view, _)) if ops.cluster.mode != crate::cluster::Mode::Single => {
            view.members().iter().filter(|m| m.has(crate::cluster::Role::Ingest)).cloned().collect()
        }
        _ => Vec::new(),
    };
    let me = ops.cluster.me.id.clone();
    let answers = futures::future::join_all(members.iter().filter(|m| m.id != me).map(|m| async move {
        let r = async {
            let resp = passed_on(ops, &HeaderMap::new(), reqwest::Method::GET, m, "/scaling/load?scope=local")
                .timeout(std::time::Duration::from_secs(2))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
            serde_json::from_slice::<super::LoadReport>(&bytes).map_err(|e| e.to_string())
        }
        .await;
        (m.id.clone(), r)
    }))
    .await;
    let mut nodes = Vec::new();
    if members.is_empty() || members.iter().any(|m| m.id == me) {
        nodes.push(super::local_load(ops));
    }
    let mut unanswered = Vec::new();
    for (id, r) in answers {
        match r {
            Ok(l) => nodes.push(l),
            Err(e) => unanswered.push(json!({"node": id, "error": e})),
        }
    }
    let pods = members.len().max(1) as u64;
    let records: u64 = nodes.iter().map(|n| n.backlog_records).sum();
    let records_avg: u64 = nodes.iter().map(|n| n.backlog_records_avg).sum();
    let bytes_avg: u64 = nodes.iter().map(|n| n.backlog_bytes_avg).sum();
    Json(json!({
        "scope": "cluster",
        "ingest_members": members.len().max(nodes.len()),
        "backlog_records": records,
        "backlog_bytes": nodes.iter().map(|n| n.backlog_bytes).sum::<u64>(),
        "backlog_bundles_waiting": nodes.iter().map(|n| n.backlog_bundles_waiting).sum::<u64>(),
        "backlog_records_avg": records_avg,
        "ingest_records_per_second": nodes.iter().map(|n| n.ingest_records_per_second).sum::<f64>(),
        "backlog_bytes_avg": bytes_avg,
        "backlog_bytes_per_pod": bytes_avg.div_ceil(pods),
        "backlog_records_per_pod": records_avg.div_ceil(pods),
        "oldest_uncommitted_seconds": nodes.iter().map(|n| n.oldest_uncommitted_seconds).fold(0.0, f64::max),
        "shards_owned": nodes.iter().map(|n| n.shards_owned).sum::<usize>(),
        "nodes": nodes,
        "unanswered": unanswered,
    }))
    .into_response()
}
