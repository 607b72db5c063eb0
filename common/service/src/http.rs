//! The operations endpoint's listener: every server binds its router the same way.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;

/// Binds `listen` for `app`; returns the bound address (port 0 picks one) and the
/// server future, which logs and ends if the server fails.
pub async fn serve(listen: SocketAddr, app: axum::Router) -> anyhow::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the HTTP listener {listen}"))?;
    let addr = listener.local_addr()?;
    Ok((addr, async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    }))
}

/// Serves `app` on a listener bound beforehand (when the address must be known
/// before the app is built).
pub async fn serve_on(listener: tokio::net::TcpListener, app: axum::Router) {
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}
