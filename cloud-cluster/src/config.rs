//! The cloud node's TOML configuration. Every field has a default that runs a
//! single node on a laptop: an embedded ingest broker on 127.0.0.1:1884, datasets
//! under `./fleetline-data`, every shard owned here. Durations are human (`"2s"`),
//! sizes too (`"16 MiB"`).

use fleetline_service::ConfigError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::lake::store::StorageConfig;
pub use crate::shard::{DeadLetterConfig, SegmentConfig, ValidationConfig};
pub use fleetline_service::ByteSize;
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// This node's name: the sender of its acks, its MQTT client id.
    pub node_id: String,
    /// Number of shards; must match the gateways'.
    pub shard_count: u16,
    /// The provisioning file (gateways and devices with their keys).
    pub provisioning: PathBuf,
    /// How often the provisioning file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub provisioning_reload: Duration,
    /// Largest share of entries one reload may drop from the file (see the gateway's
    /// setting of the same name); more is refused and the loaded file stays.
    pub provisioning_max_removal: f64,
    /// Where bundles come from.
    pub broker: BrokerConfig,
    /// Where the datasets go.
    pub storage: StorageConfig,
    /// When a shard's open segment is committed.
    pub segment: SegmentConfig,
    /// The operations endpoint.
    pub http: HttpConfig,
    /// Clock sanity checks on readings.
    pub validation: ValidationConfig,
    /// How much dead-letter data one sender may have stored.
    pub deadletters: DeadLetterConfig,
    /// Per-vehicle windows and event detection.
    pub analytics: crate::analytics::AnalyticsConfig,
    /// Hourly compacted readings and daily per-vehicle rollups.
    pub rollup: crate::jobs::rollup::RollupConfig,
    /// Membership, roles and shard placement.
    pub cluster: crate::cluster::ClusterConfig,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            node_id: "cloud-1".into(),
            shard_count: 64,
            provisioning: "provisioning.toml".into(),
            provisioning_reload: Duration::from_secs(5),
            provisioning_max_removal: 0.25,
            broker: BrokerConfig::default(),
            storage: StorageConfig::default(),
            segment: SegmentConfig::default(),
            http: HttpConfig::default(),
            validation: ValidationConfig::default(),
            deadletters: DeadLetterConfig::default(),
            analytics: Default::default(),
            rollup: Default::default(),
            cluster: Default::default(),
        }
    }
}

/// The ingest broker: embedded (gateways connect here) or an external one.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// External broker, `mqtt://host:port` or `mqtts://host:port`; unset runs the
    /// embedded broker.
    pub url: Option<String>,
    /// External broker: username (and password) of this node, if it asks for one.
    pub username: Option<String>,
    /// External broker: password.
    pub password: Option<String>,
    /// External broker over TLS: PEM CA bundle.
    pub ca: Option<PathBuf>,
    /// External broker, mutual TLS: PEM client certificate chain.
    pub cert: Option<PathBuf>,
    /// External broker, mutual TLS: PEM client key.
    pub key: Option<PathBuf>,
    /// Embedded broker: plain MQTT listener for gateways.
    pub listen: SocketAddr,
    /// Embedded broker: TLS listener for gateways.
    pub tls: Option<ListenerTls>,
    /// Embedded broker: most gateway sessions.
    pub max_connections: usize,
    /// Largest MQTT packet (a bundle).
    pub max_packet: ByteSize,
    /// MQTT keep-alive of this node's session.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Embedded broker: logins of alert subscribers (besides gateways). Usernames
    /// must contain a dot (gateway ids cannot), e.g. `ops.alerts`.
    pub subscribers: Vec<SubscriberLogin>,
}

/// A login for a client that takes alerts from the embedded broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberLogin {
    /// Username (and client id prefix).
    pub username: String,
    /// Password.
    pub password: String,
    /// The fleets whose alerts it may read (`"*"`: every fleet).
    pub fleets: Vec<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password: None,
            ca: None,
            cert: None,
            key: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 1884)),
            tls: None,
            max_connections: 1000,
            max_packet: ByteSize(16 << 20),
            keep_alive: Duration::from_secs(30),
            subscribers: Vec::new(),
        }
    }
}

/// A TLS listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Listen address.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Longest a client may take to finish its handshake.
    #[serde(with = "humantime_serde", default = "default_handshake_timeout")]
    pub handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The operations endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Bearer token required on anything that writes, and on reads of vehicle
    /// data unless `read_token` is set (unset: no token needed).
    pub token: Option<String>,
    /// Bearer token for reads of vehicle data (`GET /vehicles/...`) only, for
    /// dashboards that must not write. Needs `token`.
    pub read_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9580)), token: None, read_token: None }
    }
}

impl CloudConfig {
    /// Parses TOML text and checks it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // A DNS label, as a pod's name is (Kubernetes mode: the node id is the pod's name).
        let id_ok = (1..=63).contains(&self.node_id.len())
            && self.node_id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(ConfigError::invalid(format!("node_id {:?} must match [a-z0-9-]{{1,63}}", self.node_id)));
        }
        if self.shard_count == 0 {
            return Err(ConfigError::invalid("shard_count must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.provisioning_max_removal) {
            return Err(ConfigError::invalid("provisioning_max_removal must be between 0 and 1"));
        }
        if self.broker.max_connections == 0 {
            return Err(ConfigError::invalid("broker.max_connections must be at least 1"));
        }
        for (name, t) in [("http.token", &self.http.token), ("http.read_token", &self.http.read_token)] {
            if t.as_ref().is_some_and(|t| t.trim().len() < 12) {
                return Err(ConfigError::invalid(format!(
                    "{name} must be 12 characters or more (an empty token would let anyone in)"
                )));
            }
        }
        if self.http.read_token.is_some() && self.http.token.is_none() {
            return Err(ConfigError::invalid("http.read_token needs http.token (without it nothing is protected)"));
        }
        if self.deadletters.quota.0 == 0 || self.deadletters.per.is_zero() {
            return Err(ConfigError::invalid("deadletters.quota and deadletters.per must be positive"));
        }
        if self.segment.max_rows == 0 || self.segment.dedupe_epochs == 0 {
            return Err(ConfigError::invalid("segment.max_rows and segment.dedupe_epochs must be positive"));
        }
        if self.broker.max_packet.0 < 64 << 10 {
            return Err(ConfigError::invalid("broker.max_packet must be at least 64 KiB"));
        }
        if let Some(url) = &self.broker.url {
            let (tls, _, _) = crate::ingest::parse_broker_url(url).map_err(|e| ConfigError::invalid(e.to_string()))?;
            if tls && self.broker.ca.is_none() {
                return Err(ConfigError::invalid(format!("broker.url {url:?} is mqtts:// but broker.ca is not set")));
            }
        }
        crate::lake::store::StoreSpec::parse(&self.storage).map_err(|e| ConfigError::invalid(e.to_string()))?;
        self.analytics.check().map_err(|e| ConfigError::invalid(e.to_string()))?;
        self.cluster.check().map_err(ConfigError::invalid)?;
        if self.cluster.mode != crate::cluster::Mode::Single && self.broker.url.is_none() {
            return Err(ConfigError::invalid(
                "a cluster needs a shared broker: set broker.url (the embedded broker serves one node)",
            ));
        }
        if self.rollup.interval.is_zero() {
            return Err(ConfigError::invalid("rollup.interval must be positive"));
        }
        for s in &self.broker.subscribers {
            if !s.username.contains('.') || s.password.len() < 12 {
                return Err(ConfigError::invalid(format!(
                    "broker.subscribers: {:?} needs a dot in its username and a password of 12 characters or more",
                    s.username
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_fields_rejected() {
        CloudConfig::default().validate().unwrap();
        let cfg = CloudConfig::from_toml(
            "node_id = \"c-2\"\n[segment]\nmax_age = \"500ms\"\n[storage]\nurl = \"s3://bucket/data\"\n",
        )
        .unwrap();
        assert_eq!(cfg.segment.max_age, Duration::from_millis(500));
        let v =
            CloudConfig::from_toml("[validation]\nmax_future_skew = \"1m\"\nepoch_floor = \"2024-01-01T00:00:00Z\"\n")
                .unwrap();
        assert_eq!((v.validation.max_future_skew.as_secs(), v.validation.floor_ms()), (60, 1_704_067_200_000));
        assert!(CloudConfig::from_toml("nodeid = \"x\"").unwrap_err().to_string().contains("unknown field"));
        assert!(CloudConfig::from_toml("node_id = \"C\"").is_err());
        assert!(CloudConfig::from_toml("[broker]\nurl = \"http://x\"").is_err());
        assert!(CloudConfig::from_toml("[storage]\nurl = \"gs://x\"").is_err());
        // Values that parse but cannot work.
        for bad in [
            "[http]\ntoken = \"\"",
            "[http]\ntoken = \"short\"",
            "[http]\nread_token = \"only-a-read-token\"",
            "[broker]\nmax_connections = 0",
            "[broker]\nurl = \"mqtts://broker:8883\"",
            "provisioning_max_removal = -0.1",
        ] {
            assert!(CloudConfig::from_toml(bad).is_err(), "{bad} accepted");
        }
    }

    /// The README's configuration block parses, and shows the defaults: a reader
    /// who copies it gets exactly the node that runs without a file.
    #[test]
    fn the_readme_block_parses_and_shows_the_defaults() {
        let readme = include_str!("../README.md");
        let block = readme.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("a toml block");
        let cfg = CloudConfig::from_toml(block).unwrap_or_else(|e| panic!("the README block does not parse: {e}"));
        assert_eq!(format!("{cfg:#?}"), format!("{:#?}", CloudConfig::default()));
    }
}
