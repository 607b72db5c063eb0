//! The model registry's REST API (writes pass the node's bearer-token layer
//! in [`super`]).
//!
//! ```text
//! GET    /models                              every model: versions, deployment, load errors here
//! GET    /models/{model}                      one model
//! GET    /models/{model}/versions/{v}/onnx    the file (needs the read or write token)
//! POST   /models/{model}/versions             {"onnx": base64, "card": {...}} → the version
//! PUT    /models/{model}/deployment           {"variants": [{"label","version","weight"}], "shadow", "threshold"}
//! POST   /models/{model}/rollback             the deployment before the current one
//! DELETE /models/{model}/deployment           stop scoring the model
//! POST   /models/{model}/rescore              {"versions": [1, 2], "from_ms", "to_ms", "threshold"}: the
//!                                             versions over history (nodes with the `inference` role)
//! ```

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post, put};
use base64::Engine;
use serde_json::json;

use super::Ops;
use crate::cluster::Role;
use crate::inference::registry::MAX_MODEL_BYTES;
use crate::inference::{Deployment, ModelRegistryError};
use crate::jobs::rescore::{RescoreError, RescoreRequest};

/// The routes.
pub(super) fn router() -> Router<Ops> {
    Router::new()
        .route("/models", get(list))
        .route("/models/{model}", get(one))
        .route("/models/{model}/versions/{version}/onnx", get(file))
        .route(
            "/models/{model}/versions",
            // Base64 makes a file a third larger, and the card comes along.
            post(upload).layer(DefaultBodyLimit::max(MAX_MODEL_BYTES / 3 * 4 + (1 << 20))),
        )
        .route("/models/{model}/deployment", put(deploy).delete(undeploy))
        .route("/models/{model}/rollback", post(rollback))
        .route("/models/{model}/rescore", post(rescore))
}

fn error(e: ModelRegistryError) -> Response {
    let status = match &e {
        ModelRegistryError::UnknownModel(..) => StatusCode::NOT_FOUND,
        ModelRegistryError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ModelRegistryError::Conflict(_) => StatusCode::CONFLICT,
        ModelRegistryError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ModelRegistryError::Contended => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(json!({"error": e.to_string()}))).into_response()
}

fn unprocessable(message: String) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": message}))).into_response()
}

async fn list(State(ops): State<Ops>) -> Response {
    let errors = ops.models.load_errors();
    let models: serde_json::Map<String, serde_json::Value> = ops
        .models
        .models()
        .into_iter()
        .map(|(name, entry)| {
            let error = errors.get(&name).cloned();
            (
                name,
                json!({"versions": entry.versions, "deployment": entry.deployment,
                          "earlier_deployments": entry.history.len(), "load_error": error}),
            )
        })
        .collect();
    Json(models).into_response()
}

async fn one(State(ops): State<Ops>, Path(model): Path<String>) -> Response {
    match ops.models.model(&model) {
        Ok(entry) => Json(json!({
            "versions": entry.versions,
            "deployment": entry.deployment,
            "history": entry.history,
            "load_error": ops.models.load_errors().get(&model),
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

async fn file(State(ops): State<Ops>, Path((model, version)): Path<(String, u32)>) -> Response {
    match ops.models.file(&model, version).await {
        Ok(bytes) => ([("content-type", "application/octet-stream")], bytes).into_response(),
        Err(e) => error(e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Upload {
    /// The ONNX file, base64.
    onnx: String,
    /// The card (features, training data, metrics).
    #[serde(default)]
    card: serde_json::Value,
}

async fn upload(
    State(ops): State<Ops>,
    Path(model): Path<String>,
    body: Result<Json<Upload>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return unprocessable(format!("body: {e}")),
    };
    let onnx = match base64::engine::general_purpose::STANDARD.decode(body.onnx.trim()) {
        Ok(b) => b,
        Err(e) => return unprocessable(format!("onnx is not base64: {e}")),
    };
    match ops.models.register(&model, onnx.into(), body.card, "upload").await {
        Ok(v) => (StatusCode::CREATED, Json(json!({"model": model, "version": v.version, "sha256": v.sha256})))
            .into_response(),
        Err(e) => error(e),
    }
}

async fn deploy(
    State(ops): State<Ops>,
    Path(model): Path<String>,
    body: Result<Json<Deployment>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let d = match body {
        Ok(Json(d)) => d,
        Err(e) => return unprocessable(format!("body: {e}")),
    };
    match ops.models.deploy(&model, d).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => error(e),
    }
}

async fn rollback(State(ops): State<Ops>, Path(model): Path<String>) -> Response {
    match ops.models.rollback(&model).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => error(e),
    }
}

async fn rescore(
    State(ops): State<Ops>,
    Path(model): Path<String>,
    body: Result<Json<RescoreRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return unprocessable(format!("body: {e}")),
    };
    if !ops.cluster.me.has(Role::Inference) {
        let msg = format!("{} does not have the inference role; ask a node that does", ops.node_id);
        return (StatusCode::CONFLICT, Json(json!({"error": msg}))).into_response();
    }
    match crate::jobs::rescore::rescore(&ops.store, &ops.models, &model, &req).await {
        Ok(r) => Json(r).into_response(),
        Err(e @ RescoreError::Invalid(_)) => unprocessable(e.to_string()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))).into_response(),
    }
}

async fn undeploy(State(ops): State<Ops>, Path(model): Path<String>) -> Response {
    match ops.models.undeploy(&model).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(e),
    }
}
