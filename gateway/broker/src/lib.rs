//! An embedded MQTT broker (rumqttd) that clients reach only through listeners of
//! our own, which check every login before the broker sees it.
//!
//! The gateway runs one for its devices, a single-node cloud one for its gateways.
//! rumqttd's router runs on its own thread, its listener on loopback with a
//! per-process secret; [`Front`] accepts plain and TLS connections, reads and
//! checks the CONNECT under a timeout in each connection's own task, answers a
//! refusal with a CONNACK code, and splices accepted sessions through with the
//! password rewritten to the secret.

pub mod broker;
pub mod counter;
pub mod front;
pub mod service;
pub mod sessions;
mod size;

pub use broker::{Broker, BrokerHealth, BrokerSettings, free_port, start};
pub use front::{Front, FrontEvents, Logins, tls_config};
pub use size::ByteSize;

/// Reasons a connection is refused before or at login.
pub mod reason {
    /// Login: username malformed or differs from the client id.
    pub const BAD_USERNAME: &str = "bad_username";
    /// Login: wrong password.
    pub const BAD_PASSWORD: &str = "bad_password";
    /// Connection: not MQTT 3.1.1, or the first packet was not a CONNECT.
    pub const PROTOCOL: &str = "protocol";
    /// Connection: the listener is at its session limit.
    pub const SERVER_BUSY: &str = "server_busy";
    /// Connection: no CONNECT within the timeout.
    pub const CONNECT_TIMEOUT: &str = "connect_timeout";
    /// Connection: an MQTT 3.1 or 5 CONNECT (answered with its CONNACK code).
    pub const PROTOCOL_VERSION: &str = "protocol_version";
    /// Session: the client id reconnects faster than the front allows.
    pub const RECONNECT_RATE: &str = "reconnect_rate";
    /// Session: the previous session of the client id did not close in time.
    pub const TAKEOVER_STUCK: &str = "takeover_stuck";
    /// A listener could not accept a connection (out of file descriptors and the like).
    pub const ACCEPT_FAILED: &str = "accept_failed";
}

/// A random secret, hex, for the broker's loopback listener.
pub fn new_secret() -> std::sync::Arc<str> {
    let mut raw = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect::<String>().into()
}

/// A rustls client configuration (ring) trusting the CA bundle at `ca`, with a
/// client certificate and key for mutual TLS when both are given.
pub fn client_tls(
    ca: &std::path::Path,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use anyhow::Context;
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
        roots.add(c?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "no CA certificate in {}", ca.display());
    let builder =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let config = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut read(cert)?.as_slice()).collect::<Result<Vec<_>, _>>()?;
            let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())?.context("no private key")?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => anyhow::bail!("a client certificate and its key go together"),
    };
    Ok(std::sync::Arc::new(config))
}
