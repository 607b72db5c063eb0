//! The node's ingest broker: the embedded one (rumqttd behind the login-checking
//! front, plain and TLS listeners) or a session with an external broker.

use std::net::SocketAddr;
use std::sync::Arc;

use fleetline_broker::{BrokerSettings, Front, Logins, TlsFiles};
use tokio::task::JoinSet;

use crate::config::CloudConfig;
use crate::ingest::{self, Session};
use crate::keys::Keys;
use crate::telemetry::CloudStats;

/// The embedded broker's sessions and the login check they passed, to end
/// sessions whose key is no longer accepted.
pub type BrokerSessions = (Arc<fleetline_broker::sessions::Sessions>, Arc<dyn Logins>);

/// Where the node takes bundles from.
pub(super) struct Ingest {
    /// The MQTT session the node opens.
    pub session: Session,
    /// Embedded broker, plain.
    pub plain: Option<SocketAddr>,
    /// Embedded broker, TLS.
    pub tls: Option<SocketAddr>,
    /// The embedded broker's sessions.
    pub sessions: Option<BrokerSessions>,
}

/// Opens the session with an external broker, or starts the embedded one (its
/// listeners join `tasks`).
pub(super) async fn start(
    cfg: &CloudConfig,
    keys: &Arc<Keys>,
    stats: &Arc<CloudStats>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Ingest> {
    match &cfg.broker.url {
        Some(url) => external(cfg, url),
        None => embedded(cfg, keys, stats, tasks).await,
    }
}

fn external(cfg: &CloudConfig, url: &str) -> anyhow::Result<Ingest> {
    let (tls, host, port) = ingest::parse_broker_url(url)?;
    let tls = match (tls, &cfg.broker.ca) {
        (false, _) => None,
        (true, Some(ca)) => {
            Some(fleetline_service::tls::client_config(ca, cfg.broker.cert.as_deref(), cfg.broker.key.as_deref())?)
        }
        (true, None) => anyhow::bail!("broker.url is mqtts:// but broker.ca is not set"),
    };
    let login = cfg.broker.username.clone().map(|u| (u, cfg.broker.password.clone().unwrap_or_default()));
    let session = Session {
        host,
        port,
        client_id: format!("fleetline-cloud-{}", cfg.node_id),
        login,
        tls,
        max_packet: cfg.broker.max_packet.0 as usize,
        keep_alive: cfg.broker.keep_alive,
    };
    Ok(Ingest { session, plain: None, tls: None, sessions: None })
}

async fn embedded(
    cfg: &CloudConfig,
    keys: &Arc<Keys>,
    stats: &Arc<CloudStats>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Ingest> {
    let secret = fleetline_broker::new_secret();
    // Dots keep the node's own ids apart from gateway ids (`[a-z0-9-]`).
    let client_id = format!("cloud.{}", cfg.node_id);
    let settings = BrokerSettings {
        name: "gateways".into(),
        max_connections: cfg.broker.max_connections,
        max_packet: cfg.broker.max_packet.0 as usize,
        log_bytes: 256 << 20,
        small_logs: vec![(fleetline_wire::topics::BUNDLE_ACK_FILTER.into(), 256 * 1024)],
        link_id: format!("cloud.{}.link", cfg.node_id),
        link_filters: Vec::new(),
    };
    let (broker, link_tx, link_rx) = fleetline_broker::start(&settings, secret.clone()).await?;
    // The node takes bundles over MQTT like any client; its local link stays idle.
    tasks.spawn(async move {
        let _idle = (link_tx, link_rx);
        std::future::pending::<()>().await;
    });
    let logins: Arc<dyn Logins> =
        Arc::new(NodeLogins { keys: keys.clone(), subscribers: cfg.broker.subscribers.clone() });
    let front = Front::new(logins.clone(), stats.clone(), &broker, cfg.broker.max_connections);
    let tls = cfg.broker.tls.as_ref().map(|t| TlsFiles {
        listen: t.listen,
        cert: &t.cert,
        key: &t.key,
        handshake_timeout: t.handshake_timeout,
    });
    let listening = front.listen(cfg.broker.listen, tls, tasks).await?;
    let session = Session {
        host: "127.0.0.1".into(),
        port: broker.addr.port(),
        client_id: client_id.clone(),
        login: Some((client_id, secret.to_string())),
        tls: None,
        max_packet: cfg.broker.max_packet.0 as usize,
        keep_alive: cfg.broker.keep_alive,
    };
    Ok(Ingest {
        session,
        plain: Some(listening.plain),
        tls: listening.tls,
        sessions: Some((broker.sessions.clone(), logins)),
    })
}

/// Who may log in to the embedded broker: provisioned gateways, and the
/// configured alert subscribers.
struct NodeLogins {
    keys: Arc<Keys>,
    subscribers: Vec<crate::config::SubscriberLogin>,
}

impl fleetline_broker::Logins for NodeLogins {
    fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str> {
        if let Some(s) = self.subscribers.iter().find(|s| s.username == username) {
            if !client_id.starts_with(username) {
                return Err(fleetline_broker::reason::BAD_USERNAME);
            }
            return if fleetline_service::constant_time_eq(s.password.as_bytes(), password.as_bytes()) {
                Ok(())
            } else {
                Err(fleetline_broker::reason::BAD_PASSWORD)
            };
        }
        self.keys.check_login(client_id, username, password)
    }

    fn grants(&self, client_id: &str, username: &str) -> Arc<dyn fleetline_broker::Grants> {
        match self.subscribers.iter().find(|s| s.username == username) {
            Some(s) => Arc::new(AlertGrants { fleets: s.fleets.clone() }),
            None => self.keys.grants(client_id, username),
        }
    }
}

/// An alert subscriber's topics: its fleets' alerts, nothing to publish.
struct AlertGrants {
    fleets: Vec<String>,
}

impl fleetline_broker::Grants for AlertGrants {
    fn may_publish(&self, _: &str) -> bool {
        false
    }

    /// `fleetline/v1/alerts/{fleet}`, then `#`, `+` or a device id; with `"*"`
    /// also any fleet, `+` or `#` in the fleet's place.
    fn may_subscribe(&self, filter: &str) -> bool {
        let Some(rest) = filter.strip_prefix("fleetline/v1/alerts/") else { return false };
        let (fleet, device) = rest.split_once('/').map_or((rest, None), |(f, d)| (f, Some(d)));
        let device_ok = match device {
            None => fleet == "#",
            Some(d) => d == "#" || d == "+" || (!d.is_empty() && !d.contains(['/', '+', '#'])),
        };
        let any = self.fleets.iter().any(|f| f == "*");
        let fleet_ok = if any {
            fleet == "+" || fleet == "#" || (!fleet.is_empty() && !fleet.contains(['+', '#']))
        } else {
            self.fleets.iter().any(|f| f == fleet)
        };
        fleet_ok && device_ok
    }
}

#[cfg(test)]
mod tests {
    use fleetline_broker::Grants;

    #[test]
    fn alert_readers_read_only_their_fleets() {
        let acme = super::AlertGrants { fleets: vec!["acme".into()] };
        for ok in ["fleetline/v1/alerts/acme/#", "fleetline/v1/alerts/acme/+", "fleetline/v1/alerts/acme/truck-1"] {
            assert!(acme.may_subscribe(ok), "{ok}");
        }
        for bad in [
            "fleetline/v1/alerts/#",
            "fleetline/v1/alerts/+/truck-1",
            "fleetline/v1/alerts/globex/#",
            "fleetline/v1/alerts/acme/truck-1/#",
            "fleetline/v1/ingest/#",
            "#",
            "fleetline/v1/gw/gw-1/ack",
        ] {
            assert!(!acme.may_subscribe(bad), "{bad}");
        }
        assert!(!acme.may_publish("fleetline/v1/alerts/acme/truck-1"));
        let all = super::AlertGrants { fleets: vec!["*".into()] };
        assert!(all.may_subscribe("fleetline/v1/alerts/#") && all.may_subscribe("fleetline/v1/alerts/globex/+"));
        assert!(!all.may_subscribe("fleetline/v1/#") && !all.may_subscribe("fleetline/v1/ingest/3"));
    }
}
