//! rustls configurations (ring provider) from PEM files: a server's certificate and
//! key, a client's trusted CA bundle and optional certificate for mutual TLS.

use std::sync::Arc;

use anyhow::Context;

/// Loads a PEM certificate chain and key into a rustls server config (ring provider).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<Vec<_>, _>>().context("certificate PEM")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the certificate PEM");
    let key =
        rustls_pemfile::private_key(&mut &key_pem[..]).context("key PEM")?.context("no private key in the key PEM")?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    Ok(Arc::new(cfg))
}

/// A rustls client configuration (ring) trusting the CA bundle at `ca`, with a
/// client certificate and key for mutual TLS when both are given.
pub fn client_config(
    ca: &std::path::Path,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
        roots.add(c?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "no CA certificate in {}", ca.display());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
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
    Ok(Arc::new(config))
}

/// Makes ring the process-wide rustls provider, once (clients that build their
/// TLS from the process default — reqwest, kube — need one installed); later
/// calls change nothing.
pub fn install_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
