//! Our own listeners in front of the embedded broker.
//!
//! Every connection, plain or TLS, is accepted here first. Its TLS handshake
//! (under a timeout) and its MQTT CONNECT (under a timeout, parsed with rumqttc's
//! codec) are handled in the connection's own task, so a client that connects and
//! says nothing delays nobody else. Credentials are checked by [`Logins`] here: a refused login gets a CONNACK with a reason code and is counted by
//! reason; an accepted one is passed to the broker's loopback listener with its
//! password replaced by a per-process secret, and the rest of the connection is
//! relayed: every packet the client sends is parsed (rumqttc's codec) and held
//! to the login's [`Grants`] — the topics it may publish to and the filters it
//! may subscribe to, no retained messages, a cap on filters — before its bytes go
//! on unchanged; a packet outside them ends the session and is counted by
//! reason. What the broker sends the client is copied as it comes.
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

use crate::grants::{Grants, check_packet};
use crate::reason;

/// A TLS listener's address and PEM files.
#[derive(Clone, Copy, Debug)]
pub struct TlsFiles<'a> {
    /// Listen address.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: &'a std::path::Path,
    /// PEM private key.
    pub key: &'a std::path::Path,
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
}

/// Where a front listens.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    /// Plain MQTT.
    pub plain: SocketAddr,
    /// MQTT over TLS, when configured.
    pub tls: Option<SocketAddr>,
}

/// Longest a client may take to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest CONNECT accepted (ids, credentials and a will fit easily).
const MAX_CONNECT: usize = 8 * 1024;
/// Keep-alive given to clients that ask for none (rumqttd refuses zero).
const DEFAULT_KEEP_ALIVE: u16 = 3600;
/// Back-off of an accept loop after a failed accept (a full file table), doubling.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A repeated error is logged at most once per this interval.
pub const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Checks a login (client id, username, password); the error is a reason to count.
pub trait Logins: Send + Sync + 'static {
    /// `Ok` to let the session through.
    fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str>;

    /// What a session that passed [`check_login`](Self::check_login) may do.
    fn grants(&self, client_id: &str, username: &str) -> Arc<dyn Grants>;
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
    /// A session ended for a packet outside its grants, by reason.
    fn packet_refused(&self, reason: &'static str);
}

/// Where a front sends the sessions it lets in.
#[derive(Clone)]
pub enum Backend {
    /// Spliced into the embedded broker's loopback listener (one socket pair each).
    Splice {
        /// The broker's loopback listener.
        broker: SocketAddr,
        /// Password the broker accepts from the front only.
        secret: Arc<str>,
    },
    /// Served by the front itself (one socket each).
    Direct(Arc<crate::direct::Switchboard>),
}

/// What each connection needs.
#[derive(Clone)]
pub struct Front {
    /// Login check.
    pub logins: Arc<dyn Logins>,
    /// Counters.
    pub events: Arc<dyn FrontEvents>,
    /// Where accepted sessions go.
    pub backend: Backend,
    /// Sessions spliced to the broker now.
    pub active: Arc<std::sync::atomic::AtomicUsize>,
    /// Most sessions; more get CONNACK "server unavailable" here, before the
    /// broker's router would refuse them (which rumqttd handles badly, see above).
    pub max_sessions: usize,
    /// One session per client id (take-overs and revocation happen here).
    pub sessions: Arc<crate::sessions::Sessions>,
    /// Failed accepts make the broker unhealthy for a while.
    pub health: Arc<crate::BrokerHealth>,
    /// Largest packet a client may send.
    pub max_packet: usize,
}

impl Front {
    /// A front for `broker`, checking logins with `logins`.
    pub fn new(
        logins: Arc<dyn Logins>,
        events: Arc<dyn FrontEvents>,
        broker: &crate::Broker,
        max_sessions: usize,
    ) -> Self {
        Self {
            logins,
            events,
            backend: Backend::Splice { broker: broker.addr, secret: broker.secret.clone() },
            active: Default::default(),
            max_sessions,
            sessions: broker.sessions.clone(),
            health: broker.health.clone(),
            max_packet: broker.max_packet,
        }
    }

    /// A front that serves sessions itself through `board` (see [`crate::direct`]).
    pub fn direct(
        logins: Arc<dyn Logins>,
        events: Arc<dyn FrontEvents>,
        board: Arc<crate::direct::Switchboard>,
        max_sessions: usize,
        max_packet: usize,
    ) -> Self {
        let health = crate::BrokerHealth::default();
        health.set_healthy(true);
        Self {
            logins,
            events,
            backend: Backend::Direct(board),
            active: Default::default(),
            max_sessions,
            sessions: Arc::default(),
            health: Arc::new(health),
            max_packet,
        }
    }

    /// Binds the plain listener and, when given, the TLS one (certificate and key
    /// read from their PEM files); their accept loops join `tasks`.
    pub async fn listen(
        self,
        plain: SocketAddr,
        tls: Option<TlsFiles<'_>>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> anyhow::Result<Listening> {
        let (plain_addr, accept) = self.clone().bind(plain, None).await?;
        tasks.spawn(accept);
        let tls_addr = match tls {
            Some(t) => {
                let cert = std::fs::read(t.cert).with_context(|| format!("reading {}", t.cert.display()))?;
                let key = std::fs::read(t.key).with_context(|| format!("reading {}", t.key.display()))?;
                let server = fleetline_service::tls::server_config(&cert, &key)?;
                let (addr, accept) = self.bind(t.listen, Some((server, t.handshake_timeout))).await?;
                tasks.spawn(accept);
                Some(addr)
            }
            None => None,
        };
        Ok(Listening { plain: plain_addr, tls: tls_addr })
    }

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
            let mut backoff = ACCEPT_BACKOFF_MIN;
            let mut failures = RepeatedError::default();
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => {
                        backoff = ACCEPT_BACKOFF_MIN;
                        c
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off (up to a second)
                        // instead of spinning, and log once per interval with a count.
                        self.events.login_refused(reason::ACCEPT_FAILED);
                        self.health.accept_failed();
                        failures.note("accept failed", &e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
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
                                Box::pin(front.serve(tls, peer)).await;
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
            Ok(Err(ConnectError::Refused(why))) => {
                self.events.login_refused(why);
                tracing::debug!(%peer, reason = why, "connection refused before login");
                return;
            }
            Ok(Err(ConnectError::Version(level))) => {
                // MQTT 3.1 and 5 get an answer they understand, then the door.
                self.events.login_refused(reason::PROTOCOL_VERSION);
                tracing::debug!(%peer, level, "MQTT protocol level not supported");
                let answer: &[u8] =
                    if level == 5 { &[0x20, 0x03, 0x00, 0x84, 0x00] } else { &[0x20, 0x02, 0x00, 0x01] };
                let _ = client.write_all(answer).await;
                let _ = client.shutdown().await;
                return;
            }
            Err(_) => {
                self.events.login_refused(reason::CONNECT_TIMEOUT);
                return;
            }
        };
        let (user, pass) = connect.login.as_ref().map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
        if let Err(why) = self.logins.check_login(&connect.client_id, user, pass) {
            self.events.login_refused(why);
            tracing::info!(%peer, client_id = connect.client_id, reason = why, "login refused");
            // One answer for every failed login, whatever the reason (counted above):
            // 4 = bad user name or password. A stranger learns nothing about which
            // ids exist, are revoked, or have which key.
            let _ = client.write_all(&[0x20, 0x02, 0x00, 4]).await;
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
        struct Active(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Active {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _active = Active(self.active.clone());
        // One session per id: the previous one is closed before this one reaches the broker.
        let mut session = match self.sessions.begin(&connect.client_id).await {
            Ok(g) => g,
            Err(refused) => {
                let why = match refused {
                    crate::sessions::Refused::TooFast => reason::RECONNECT_RATE,
                    crate::sessions::Refused::TakeoverStuck => reason::TAKEOVER_STUCK,
                };
                self.events.login_refused(why);
                tracing::debug!(%peer, client_id = connect.client_id, reason = why, "session refused");
                let _ = client.write_all(&[0x20, 0x02, 0x00, 3]).await;
                let _ = client.shutdown().await;
                return;
            }
        };
        if let Some(l) = &connect.login {
            session.remember_login(&l.username, &l.password);
        }
        let grants = self.logins.grants(&connect.client_id, user);
        let mut connect = connect;
        if connect.keep_alive == 0 {
            connect.keep_alive = DEFAULT_KEEP_ALIVE;
        }
        // Each path's state lives in its own allocation: a depot's thousands of
        // idle direct sessions do not each carry the splice path's buffers.
        match &self.backend {
            Backend::Direct(board) => {
                let login = crate::direct::Login {
                    client_id: &connect.client_id,
                    grants: &*grants,
                    keep_alive: connect.keep_alive,
                    max_packet: self.max_packet,
                };
                let ended = Box::pin(crate::direct::serve(board, client, login, buf, &mut session.stop)).await;
                if let crate::direct::Ended::Refused(why) = ended {
                    self.events.packet_refused(why);
                    tracing::info!(%peer, client_id = connect.client_id, reason = why, "session ended: packet refused");
                }
            }
            Backend::Splice { broker, secret } => {
                let to = (*broker, secret.clone());
                Box::pin(self.splice(client, connect, buf, &*grants, session, to, peer)).await;
            }
        }
    }

    /// An accepted session spliced into the broker's loopback listener.
    #[allow(clippy::too_many_arguments)]
    async fn splice<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: S,
        mut connect: rumqttc::mqttbytes::v4::Connect,
        buf: BytesMut,
        grants: &dyn Grants,
        mut session: crate::sessions::SessionGuard<'_>,
        (broker_addr, secret): (SocketAddr, Arc<str>),
        peer: SocketAddr,
    ) {
        let client_id = connect.client_id.clone();
        let username = connect.client_id.clone();
        connect.set_login(username, secret.to_string());
        // What the system does not use is not passed on: wills (a unit could
        // publish anywhere on disconnect) and persistent sessions.
        connect.last_will = None;
        connect.clean_session = true;
        let mut out = BytesMut::new();
        if Packet::Connect(connect).write(&mut out, MAX_CONNECT * 2).is_err() {
            return;
        }
        let Ok(mut broker) = TcpStream::connect(broker_addr).await else {
            tracing::error!(broker = %broker_addr, "broker listener unreachable");
            return;
        };
        let _ = broker.set_nodelay(true);
        // The rewritten CONNECT; what the client already sent after it is relayed
        // (and checked) below.
        if broker.write_all(&out).await.is_err() {
            return;
        }
        // The broker's CONNACK is awaited here, whatever the client or a take-over
        // does meanwhile: rumqttd 0.20 leaves a stale will handler behind when a
        // connection closes between its CONNECT and its CONNACK, and the next
        // login of that id then panics its accept path (see `sessions.rs`). So a
        // broker connection is never closed before its CONNACK has come back.
        let mut connack = [0u8; 4];
        match tokio::time::timeout(CONNECT_TIMEOUT, broker.read_exact(&mut connack)).await {
            Ok(Ok(_)) => {}
            _ => {
                tracing::warn!(broker = %broker_addr, "broker sent no CONNACK");
                return;
            }
        }
        if client.write_all(&connack).await.is_err() {
            return;
        }
        {
            let (mut from_client, mut to_client) = tokio::io::split(client);
            let (mut from_broker, mut to_broker) = broker.split();
            let up = relay_checked(&mut from_client, &mut to_broker, buf, grants, self.max_packet);
            tokio::select! {
                ended = up => {
                    if let Relayed::Refused(why) = ended {
                        self.events.packet_refused(why);
                        tracing::info!(%peer, client_id, reason = why, "session ended: packet refused");
                    }
                }
                _ = tokio::io::copy(&mut from_broker, &mut to_client) => {}
                _ = session.stop.wait_for(|s| *s) => {}
            }
        }
        // The session is over for the broker only once rumqttd has closed its end:
        // it does that after queueing the disconnect for its router, so the next
        // session of this id reaches the router after that disconnect. (A CONNECT
        // of an id the router still holds makes it take the old connection over,
        // which in rumqttd 0.20 can fail the new link and, on the login after it,
        // panic the accept path.)
        close_broker_side(&mut broker).await;
        drop(session);
    }
}

/// How a relay from the client ended.
#[derive(Debug, PartialEq, Eq)]
enum Relayed {
    /// The client or the broker closed, or a write failed.
    Closed,
    /// A packet outside the grants (or not a client's packet); nothing of it was passed on.
    Refused(&'static str),
}

/// Relays the client's packets to the broker, `pending` first: each whole packet
/// is parsed and checked against `grants`; its bytes go on unchanged. Packets
/// read together are written together.
async fn relay_checked<R, W>(
    from: &mut R,
    to: &mut W,
    mut pending: BytesMut,
    grants: &dyn Grants,
    max_packet: usize,
) -> Relayed
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut filters = 0usize;
    loop {
        // The whole packets at the front of `pending`, each checked, go on as one write.
        let mut checked = 0;
        loop {
            let rest = &pending[checked..];
            let n = match rumqttc::mqttbytes::check(rest.iter(), max_packet) {
                Ok(header) => header.frame_length(),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(_) => return Relayed::Refused(reason::MALFORMED),
            };
            let mut frame = BytesMut::from(&rest[..n]);
            let Ok(packet) = Packet::read(&mut frame, max_packet) else { return Relayed::Refused(reason::MALFORMED) };
            if let Err(why) = check_packet(&packet, grants, &mut filters) {
                return Relayed::Refused(why);
            }
            checked += n;
        }
        if checked > 0 && to.write_all(&pending.split_to(checked)).await.is_err() {
            return Relayed::Closed;
        }
        pending.reserve(16 * 1024);
        match from.read_buf(&mut pending).await {
            Ok(0) | Err(_) => return Relayed::Closed,
            Ok(_) => {}
        }
    }
}

/// Half-closes the front's connection to the broker and waits (bounded) until the
/// broker closes its end.
async fn close_broker_side(broker: &mut TcpStream) {
    let _ = broker.shutdown().await;
    let mut sink = [0u8; 4096];
    let drained = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match broker.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("broker did not close a finished session in time");
    }
}

/// Why a connection ended before its CONNECT could be checked.
enum ConnectError {
    /// Not a usable MQTT 3.1.1 CONNECT (reason to count).
    Refused(&'static str),
    /// A CONNECT of another protocol level (3 = MQTT 3.1, 5 = MQTT 5).
    Version(u8),
}

/// The protocol level of a buffered CONNECT, if its variable header is there.
fn protocol_level(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    // Skip the remaining length (1–4 bytes).
    let mut i = 1;
    while *buf.get(i)? & 0x80 != 0 {
        i += 1;
        if i > 4 {
            return None;
        }
    }
    i += 1;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    buf.get(i + 2 + name_len).copied()
}

/// Logs an error that repeats (a full file table, say) once per interval with how
/// many times it happened, instead of once per occurrence.
#[derive(Default)]
pub struct RepeatedError {
    count: u64,
    last_log: Option<std::time::Instant>,
}

impl RepeatedError {
    /// Counts one occurrence; logs if the interval since the last log has passed.
    pub fn note(&mut self, what: &str, error: &dyn std::fmt::Display) {
        self.count += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= REPEAT_LOG_INTERVAL) {
            tracing::warn!(error = %error, times = self.count, "{what}");
            self.count = 0;
            self.last_log = Some(std::time::Instant::now());
        }
    }
}

/// Reads until one whole packet is buffered; it must be a CONNECT.
async fn read_connect<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
) -> Result<rumqttc::mqttbytes::v4::Connect, ConnectError> {
    loop {
        match Packet::read(buf, MAX_CONNECT) {
            Ok(Packet::Connect(c)) => return Ok(c),
            Ok(_) => return Err(ConnectError::Refused(reason::PROTOCOL)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => {
                return Err(match protocol_level(buf) {
                    Some(level @ (3 | 5)) => ConnectError::Version(level),
                    _ => ConnectError::Refused(reason::PROTOCOL),
                });
            }
        }
        if let Some(level @ (3 | 5)) = protocol_level(buf) {
            return Err(ConnectError::Version(level));
        }
        if buf.len() > MAX_CONNECT {
            return Err(ConnectError::Refused(reason::PROTOCOL));
        }
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ConnectError::Refused(reason::PROTOCOL)),
            Ok(_) => {}
        }
    }
}
