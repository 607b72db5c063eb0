//! Our own listeners in front of the embedded broker.
//!
//! Every connection, plain or TLS, is accepted here first. Its TLS handshake
//! (under a timeout) and its MQTT CONNECT (under a timeout, parsed with rumqttc's
//! codec) are handled in the connection's own task, so a client that connects and
//! says nothing delays nobody else. Credentials are checked by [`Logins`] here: a refused login gets a CONNACK with a reason code and is counted by
//! reason; an accepted one is passed to the broker's loopback listener with its
//! password replaced by a per-process secret, and the rest of the connection is
//! spliced through.
//!
//! Checking logins here, not only in rumqttd's auth hook, also keeps the broker
//! away from a failure mode of rumqttd 0.20: a failed login leaves a stale will
//! handler behind, and the same client id connecting again then panics the
//! accept path while it holds a lock, stopping every later connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::reason;

/// Longest a client may take to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest CONNECT accepted (ids, credentials and a will fit easily).
const MAX_CONNECT: usize = 8 * 1024;
/// Keep-alive given to clients that ask for none (rumqttd refuses zero).
const DEFAULT_KEEP_ALIVE: u16 = 3600;

/// Checks a login (client id, username, password); the error is a reason to count.
pub trait Logins: Send + Sync + 'static {
    /// `Ok` to let the session through.
    fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str>;
}

/// Where the front reports what it refused and what TLS did.
pub trait FrontEvents: Send + Sync + 'static {
    /// A connection refused before or at login, by reason.
    fn login_refused(&self, reason: &'static str);
    /// A TLS session established.
    fn tls_session(&self);
    /// A TLS handshake that failed.
    fn tls_failed(&self);
    /// A TLS client that did not finish its handshake in time.
    fn tls_timed_out(&self);
}

/// What each connection needs.
#[derive(Clone)]
pub struct Front {
    /// Login check.
    pub logins: Arc<dyn Logins>,
    /// Counters.
    pub events: Arc<dyn FrontEvents>,
    /// The broker's loopback listener.
    pub broker: SocketAddr,
    /// Password the broker accepts from the front only.
    pub secret: Arc<str>,
    /// Sessions spliced to the broker now.
    pub active: Arc<std::sync::atomic::AtomicUsize>,
    /// Most sessions; more get CONNACK "server unavailable" here, before the
    /// broker's router would refuse them (which rumqttd handles badly, see above).
    pub max_sessions: usize,
}

/// Loads a PEM certificate chain and key into a rustls server config (ring provider).
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
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

impl Front {
    /// Binds a listener, plain or TLS; returns its address and the accept loop.
    pub async fn bind(
        self,
        listen: SocketAddr,
        tls: Option<(Arc<rustls::ServerConfig>, Duration)>,
    ) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("binding listener {listen}"))?;
        let addr = listener.local_addr()?;
        let acceptor = tls.map(|(cfg, timeout)| (TlsAcceptor::from(cfg), timeout));
        let run = async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let front = self.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => front.serve(tcp, peer).await,
                        Some((acceptor, timeout)) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                front.events.tls_session();
                                front.serve(tls, peer).await;
                            }
                            Ok(Err(e)) => {
                                front.events.tls_failed();
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                front.events.tls_timed_out();
                                tracing::debug!(%peer, "TLS handshake timed out");
                            }
                        },
                    }
                });
            }
        };
        Ok((addr, run))
    }

    /// One connection: read and check the CONNECT, then splice to the broker.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut client: S, peer: SocketAddr) {
        let mut buf = BytesMut::with_capacity(512);
        let connect = match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut client, &mut buf)).await {
            Ok(Ok(c)) => c,
            Ok(Err(why)) => {
                self.events.login_refused(why);
                tracing::debug!(%peer, reason = why, "connection refused before login");
                return;
            }
            Err(_) => {
                self.events.login_refused(reason::CONNECT_TIMEOUT);
                return;
            }
        };
        let mut connect = connect;
        let (user, pass) = connect.login.as_ref().map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
        if let Err(why) = self.logins.check_login(&connect.client_id, user, pass) {
            self.events.login_refused(why);
            tracing::info!(%peer, client_id = connect.client_id, reason = why, "login refused");
            // CONNACK: 4 = bad user name or password, 5 = not authorized.
            let code = if why == reason::BAD_PASSWORD || why == reason::BAD_USERNAME { 4 } else { 5 };
            let _ = client.write_all(&[0x20, 0x02, 0x00, code]).await;
            let _ = client.shutdown().await;
            return;
        }
        use std::sync::atomic::Ordering;
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.max_sessions {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.events.login_refused(reason::SERVER_BUSY);
            let _ = client.write_all(&[0x20, 0x02, 0x00, 3]).await;
            let _ = client.shutdown().await;
            return;
        }
        struct Session(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Session {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _session = Session(self.active.clone());
        let username = connect.client_id.clone();
        connect.set_login(username, self.secret.to_string());
        if connect.keep_alive == 0 {
            connect.keep_alive = DEFAULT_KEEP_ALIVE;
        }
        let mut out = BytesMut::new();
        if Packet::Connect(connect).write(&mut out, MAX_CONNECT * 2).is_err() {
            return;
        }
        let Ok(mut broker) = TcpStream::connect(self.broker).await else {
            tracing::error!(broker = %self.broker, "broker listener unreachable");
            return;
        };
        let _ = broker.set_nodelay(true);
        // The rewritten CONNECT, then whatever the client already sent after it.
        out.extend_from_slice(&buf);
        if broker.write_all(&out).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
    }
}

/// Reads until one whole packet is buffered; it must be a CONNECT.
async fn read_connect<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
) -> Result<rumqttc::mqttbytes::v4::Connect, &'static str> {
    loop {
        match Packet::read(buf, MAX_CONNECT) {
            Ok(Packet::Connect(c)) => return Ok(c),
            Ok(_) => return Err(reason::PROTOCOL),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return Err(reason::PROTOCOL),
        }
        if buf.len() > MAX_CONNECT {
            return Err(reason::PROTOCOL);
        }
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(reason::PROTOCOL),
            Ok(_) => {}
        }
    }
}
