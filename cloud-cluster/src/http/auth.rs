//! The one bearer-token layer in front of every route. With a write token
//! configured, every request that changes something needs it; a vehicle's data
//! and a model's file need it or the read token; everything else (health, metrics, status, schema
//! reads and compatibility checks) is open. Without a token nothing is checked.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The tokens the layer checks against.
#[derive(Clone, Debug)]
pub(super) struct Tokens {
    /// Writes (and vehicle reads).
    pub write: Option<String>,
    /// Vehicle reads only.
    pub read: Option<String>,
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    Nothing,
    Read,
    Write,
}

fn need(method: &Method, path: &str) -> Need {
    let reading = matches!(*method, Method::GET | Method::HEAD);
    if reading && (path.starts_with("/vehicles/") || (path.starts_with("/models/") && path.ends_with("/onnx"))) {
        Need::Read
    } else if reading || path.starts_with("/compatibility/") {
        // A compatibility check posts a schema but changes nothing.
        Need::Nothing
    } else {
        Need::Write
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

impl Tokens {
    fn allows(&self, need: Need, headers: &HeaderMap) -> bool {
        let given = bearer(headers);
        match need {
            _ if self.write.is_none() => true,
            Need::Nothing => true,
            Need::Write => token_is(given, self.write.as_ref()),
            Need::Read => token_is(given, self.write.as_ref()) || token_is(given, self.read.as_ref()),
        }
    }
}

/// Whether a path belongs to the schema registry (its errors are Confluent-shaped).
fn is_registry(path: &str) -> bool {
    ["/subjects", "/schemas/", "/compatibility/", "/config"].iter().any(|p| path.starts_with(p))
}

/// The middleware: refuses with 401 what the request's token does not allow.
pub(super) async fn require_token(State(tokens): State<Tokens>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if tokens.allows(need(req.method(), path), req.headers()) {
        return next.run(req).await;
    }
    if is_registry(path) {
        super::registry::reg_error(401, "bearer token required".into())
    } else {
        (StatusCode::UNAUTHORIZED, "bearer token required").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", auth.parse().unwrap_or_else(|_| unreachable!()));
        h
    }

    #[test]
    fn writes_need_the_write_token_vehicle_reads_either_token() {
        let t = Tokens { write: Some("w".into()), read: Some("r".into()) };
        let none = HeaderMap::new();
        assert_eq!(need(&Method::POST, "/admin/flush"), Need::Write);
        assert_eq!(need(&Method::PUT, "/config/x"), Need::Write);
        assert_eq!(need(&Method::POST, "/subjects/x/versions"), Need::Write);
        assert_eq!(need(&Method::POST, "/compatibility/subjects/x/versions/latest"), Need::Nothing);
        assert_eq!(need(&Method::GET, "/vehicles/a/b"), Need::Read);
        assert_eq!(need(&Method::GET, "/status"), Need::Nothing);
        assert!(!t.allows(Need::Write, &none));
        assert!(!t.allows(Need::Write, &headers("Bearer r")));
        assert!(t.allows(Need::Write, &headers("bearer w")));
        assert!(t.allows(Need::Read, &headers("Bearer r")));
        assert!(!t.allows(Need::Read, &headers("Bearer x")));
        assert!(!t.allows(Need::Read, &headers("Basic w")));
        assert!(t.allows(Need::Nothing, &none));
        // No token configured: open.
        assert!(Tokens { write: None, read: None }.allows(Need::Write, &none));
    }
}
