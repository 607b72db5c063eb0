//! A plain HTTP/1.1 client for tests: one request per connection, on loopback.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code (0 if the status line did not parse).
    pub status: u16,
    /// The body.
    pub body: String,
}

/// Sends one request; `token` goes in a `Bearer` authorization header, `body`
/// as JSON.
pub async fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    request_with_auth(addr, method, path, auth.as_deref(), body).await
}

/// Like [`request`], with the whole `Authorization` value.
pub async fn request_with_auth(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&str>,
) -> Response {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("HTTP endpoint reachable");
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let body = body.unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("request written");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("response read");
    let out = String::from_utf8_lossy(&raw);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Response { status, body }
}

/// A GET without a token; returns the body.
pub async fn get(addr: SocketAddr, path: &str) -> String {
    request(addr, "GET", path, None, None).await.body
}
