//! TLS for devices, terminated by the gateway in front of the broker.
//!
//! rumqttd performs TLS handshakes inside its accept loop with no timeout, so one
//! client that connects and says nothing would stop every other device from
//! connecting. Here each connection's handshake runs in its own task under a
//! timeout; only finished handshakes are spliced to the broker's loopback listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::stats::GatewayStats;

/// Loads a PEM certificate chain and key into a rustls server config (ring provider).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<Vec<_>, _>>().context("certificate PEM")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the certificate PEM");
    let key = rustls_pemfile::private_key(&mut &key_pem[..]).context("key PEM")?.context("no private key in the key PEM")?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    Ok(Arc::new(cfg))
}

/// Binds the TLS listener; returns its address and the accept loop to spawn.
pub async fn bind(
    listen: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    broker: SocketAddr,
    handshake_timeout: Duration,
    stats: Arc<GatewayStats>,
) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding TLS listener {listen}"))?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(config);
    let run = async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "TLS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        GatewayStats::add(&stats.tls_handshake_failed, 1);
                        metrics::counter!("fleetline_gateway_tls_handshakes_failed_total").increment(1);
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        GatewayStats::add(&stats.tls_handshake_timeout, 1);
                        metrics::counter!("fleetline_gateway_tls_handshakes_timed_out_total").increment(1);
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                GatewayStats::add(&stats.tls_sessions, 1);
                let Ok(mut plain) = TcpStream::connect(broker).await else {
                    tracing::warn!(%broker, "broker listener unreachable");
                    return;
                };
                let mut tls = tls;
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    };
    Ok((addr, run))
}
