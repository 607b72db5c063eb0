//! The schema registry's REST API, shaped like Confluent's (writes pass the
//! node's bearer-token layer in [`super`]).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::Ops;
use crate::registry::{Compatibility, RegistryError};

/// The registry's routes.
pub fn router() -> Router<Ops> {
    Router::new()
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}/versions", get(subject_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(subject_version))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/compatibility/subjects/{subject}/versions/latest", post(test_compatibility))
        .route("/config", get(get_config).put(put_config))
        .route("/config/{subject}", get(get_subject_config).put(put_subject_config))
}

/// A Confluent-shaped error.
pub fn reg_error(code: u16, message: String) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!({"error_code": code, "message": message}))).into_response()
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
    Path(subject): Path<String>,
    body: Result<Json<SchemaBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match schema_body(body) {
        Ok(b) => b,
        Err((code, message)) => return reg_error(code, message),
    };
    match ops.registry.register(&subject, &body.schema).await {
        Ok(v) => Json(json!({"id": v.id, "version": v.version})).into_response(),
        Err(RegistryError::Invalid(m)) => reg_error(422, m),
        Err(e @ RegistryError::Incompatible(_)) => reg_error(409, e.to_string()),
        Err(e @ RegistryError::Contended) => reg_error(503, e.to_string()),
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
    body: Result<Json<ConfigBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    set_config(ops, None, body).await
}

async fn put_subject_config(
    State(ops): State<Ops>,
    Path(subject): Path<String>,
    body: Result<Json<ConfigBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    set_config(ops, Some(subject), body).await
}

async fn set_config(
    ops: Ops,
    subject: Option<String>,
    body: Result<Json<ConfigBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
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
