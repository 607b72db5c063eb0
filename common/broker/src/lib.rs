//! MQTT listeners of our own that check every login and every packet, in front of
//! an embedded broker (rumqttd) or of nothing.
//!
//! [`Front`] accepts plain and TLS connections, reads and checks the CONNECT under
//! a timeout in each connection's own task, answers a refusal with a CONNACK code,
//! and holds every later packet to the login's [`Grants`]. An accepted session is
//! then either spliced into rumqttd's loopback listener with the password rewritten
//! to a per-process secret (the single-node cloud: gateways and alert readers need
//! a broker's fan-out), or served by the front itself through a [`Switchboard`]
//! (the gateway: a unit only talks to the gateway, and a session costs one
//! descriptor and no router work).

pub mod broker;
pub mod direct;
pub mod front;
pub mod grants;
pub mod reload;
pub mod sessions;

pub use broker::{Broker, BrokerHealth, BrokerSettings, free_port, start};
pub use direct::{Inbound, Switchboard};
pub use front::{Backend, Front, FrontEvents, Listening, Logins, TlsFiles};
pub use grants::{Everything, Grants, MAX_FILTERS_PER_SESSION};
pub use reload::{ReloadActions, keep_provisioning};

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
    /// Session: a PUBLISH on a topic the login may not publish to.
    pub const PUBLISH_DENIED: &str = "publish_denied";
    /// Session: a SUBSCRIBE to a filter the login may not read.
    pub const SUBSCRIBE_DENIED: &str = "subscribe_denied";
    /// Session: a retained PUBLISH (nothing in the system retains messages).
    pub const RETAIN_DENIED: &str = "retain_denied";
    /// Session: more topic filters than a session may hold.
    pub const TOO_MANY_FILTERS: &str = "too_many_filters";
    /// Session: a packet that does not parse, is too large, or is one only a
    /// server sends (or a second CONNECT).
    pub const MALFORMED: &str = "malformed";
}

/// A random secret, hex, for the broker's loopback listener.
pub fn new_secret() -> std::sync::Arc<str> {
    let mut raw = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect::<String>().into()
}

/// File descriptors a session served by the front itself holds: its socket.
pub const FDS_PER_DIRECT_SESSION: u64 = 1;

/// The most sessions a listener may take: the configured number, or fewer when the
/// process's file limit (less `headroom` for files, upstream sockets and HTTP)
/// cannot hold that many at `fds_per_session` each. Returns (sessions, whether the
/// limit lowered it).
pub fn session_cap(configured: usize, headroom: u64, fds_per_session: u64) -> (usize, bool) {
    match fleetline_service::open_files_limit() {
        Some(limit) => {
            let fits = (limit.saturating_sub(headroom) / fds_per_session.max(1)) as usize;
            if fits < configured { (fits.max(1), true) } else { (configured, false) }
        }
        None => (configured, false),
    }
}
