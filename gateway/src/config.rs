//! The gateway's TOML configuration: every field has a default that runs on a
//! laptop, durations are human (`"5ms"`, `"10s"`), sizes too (`"16 MiB"`).

use fleetline_service::ConfigError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::queue::FullPolicy;

pub use fleetline_service::ByteSize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// This gateway's id; it must be listed in the provisioning file.
    pub id: String,
    /// Where the disk queue and state live.
    pub data_dir: PathBuf,
    /// The provisioning file (devices, gateways, keys).
    pub provisioning: PathBuf,
    /// How often the provisioning file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub provisioning_reload: Duration,
    /// Largest share of entries (units and gateways) one reload may drop from the
    /// file; a file that drops more (cut short while being copied) is refused and
    /// the loaded one stays. Revoking entries (`revoked = true`) is not dropping
    /// them. One entry may always go; 1.0 turns the guard off.
    pub provisioning_max_removal: f64,
    /// Number of shards; must match the cloud's.
    pub shard_count: u16,
    /// The MQTT side facing devices.
    pub devices: DevicesConfig,
    /// The disk queue.
    pub queue: QueueSection,
    /// The connection into the cloud.
    pub uplink: UplinkConfig,
    /// Health, metrics and status.
    pub http: HttpConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            id: "gw-local".into(),
            data_dir: PathBuf::from("./fleetline-gateway-data"),
            provisioning: PathBuf::from("./provisioning.toml"),
            provisioning_reload: Duration::from_secs(5),
            provisioning_max_removal: 0.25,
            shard_count: 64,
            devices: DevicesConfig::default(),
            queue: QueueSection::default(),
            uplink: UplinkConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

/// The devices' MQTT listeners (MQTT 3.1.1, sessions served by the gateway itself).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// Plain MQTT listener. With `tls` set, keep this on loopback or leave it out
    /// (`listen = ""` is not valid; omit the TLS section to serve plain MQTT only).
    /// Port 0 picks a free port (printed at start-up).
    pub listen: SocketAddr,
    /// TLS listener, terminated by the gateway with a handshake timeout.
    pub tls: Option<DevicesTls>,
    /// Most concurrent device connections.
    pub max_connections: usize,
    /// Largest MQTT packet accepted from a device.
    pub max_packet: ByteSize,
    /// Batches units have handed over and the ingest has not yet checked, at most
    /// (all sessions together); past it the gateway stops reading from units until
    /// the ingest catches up. `broker_log` is the old name.
    #[serde(alias = "broker_log")]
    pub ingest_buffer: ByteSize,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            tls: None,
            max_connections: 10_000,
            max_packet: ByteSize(72 * 1024),
            ingest_buffer: ByteSize(16 << 20),
        }
    }
}

/// TLS for devices.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesTls {
    /// TLS listener address.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// A client that has not finished its handshake by then is dropped.
    #[serde(with = "humantime_serde", default = "default_handshake_timeout")]
    pub handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}

/// The disk queue.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// Most bytes on disk.
    pub budget: ByteSize,
    /// Size of one segment file.
    pub segment: ByteSize,
    /// Longest wait for a group commit's fsync.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// `backpressure` (devices keep their data) or `drop-oldest` (counted).
    pub when_full: FullPolicy,
}

impl Default for QueueSection {
    fn default() -> Self {
        Self {
            budget: ByteSize(1 << 30),
            segment: ByteSize(16 << 20),
            commit_interval: Duration::from_millis(5),
            when_full: FullPolicy::Backpressure,
        }
    }
}

/// The cloud connection.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Cloud ingest broker host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// TLS (and mutual TLS when `cert` and `key` are given).
    pub tls: Option<UplinkTls>,
    /// Most device batches in one bundle.
    pub bundle_max_batches: usize,
    /// Most bytes of device batches in one bundle (before compression).
    pub bundle_max_bytes: ByteSize,
    /// Longest a batch waits for its bundle to fill.
    #[serde(with = "humantime_serde")]
    pub bundle_max_age: Duration,
    /// A bundle not acked by then is sent again.
    #[serde(with = "humantime_serde")]
    pub resend_after: Duration,
    /// Most bundles awaiting acks.
    pub max_in_flight: usize,
    /// Bytes per second for draining a backlog (fresh data is not limited).
    pub backlog_rate: ByteSize,
    /// Send fresh data before backlog.
    pub live_first: bool,
    /// MQTT keep-alive.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// First reconnect delay (doubles, with jitter).
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1884,
            tls: None,
            bundle_max_batches: 500,
            bundle_max_bytes: ByteSize(256 << 10),
            bundle_max_age: Duration::from_millis(100),
            resend_after: Duration::from_secs(10),
            max_in_flight: 256,
            backlog_rate: ByteSize(8 << 20),
            live_first: true,
            keep_alive: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// TLS towards the cloud.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkTls {
    /// PEM CA bundle for the broker's certificate.
    pub ca: PathBuf,
    /// PEM client certificate chain (mutual TLS).
    pub cert: Option<PathBuf>,
    /// PEM client key (mutual TLS).
    pub key: Option<PathBuf>,
}

/// The operations endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9480)) }
    }
}

impl GatewayConfig {
    /// Parses TOML text and checks it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fleetline_wire::GatewayId::new(&self.id)
            .map_err(|_| ConfigError::invalid(format!("id {:?} must match [a-z0-9-]{{1,32}}", self.id)))?;
        if self.shard_count == 0 {
            return Err(ConfigError::invalid("shard_count must be at least 1"));
        }
        if self.provisioning_reload < Duration::from_millis(10) {
            return Err(ConfigError::invalid("provisioning_reload must be at least 10ms (revocations depend on it)"));
        }
        if !(0.0..=1.0).contains(&self.provisioning_max_removal) {
            return Err(ConfigError::invalid("provisioning_max_removal must be between 0 and 1"));
        }
        if self.devices.max_connections == 0 {
            return Err(ConfigError::invalid("devices.max_connections must be at least 1"));
        }
        if self.uplink.backlog_rate.0 == 0 {
            return Err(ConfigError::invalid("uplink.backlog_rate must be positive (0 would never send a backlog)"));
        }
        if self.queue.segment.0 < 64 << 10 {
            return Err(ConfigError::invalid("queue.segment must be at least 64 KiB"));
        }
        if self.queue.budget.0 < 2 * self.queue.segment.0 {
            return Err(ConfigError::invalid("queue.budget must hold at least two segments"));
        }
        if self.uplink.max_in_flight == 0 || self.uplink.bundle_max_batches == 0 {
            return Err(ConfigError::invalid("uplink.max_in_flight and uplink.bundle_max_batches must be positive"));
        }
        if self.devices.max_packet.0 < (fleetline_wire::batch::MAX_SEALED_LEN + 512) as u64 {
            return Err(ConfigError::invalid(format!(
                "devices.max_packet must hold the largest batch ({} bytes plus topic)",
                fleetline_wire::batch::MAX_SEALED_LEN
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_fields_rejected() {
        GatewayConfig::default().validate().unwrap();
        let cfg = GatewayConfig::from_toml("id = \"gw-2\"\n[queue]\nbudget = \"2 GiB\"\nwhen_full = \"drop-oldest\"\n")
            .unwrap();
        assert_eq!(cfg.queue.budget.0, 2 << 30);
        assert_eq!(cfg.queue.when_full, FullPolicy::DropOldest);
        assert!(GatewayConfig::from_toml("idd = \"x\"").unwrap_err().to_string().contains("unknown field"));
        assert!(GatewayConfig::from_toml("id = \"GW\"").is_err());
        assert!(GatewayConfig::from_toml("[queue]\ncommit_interval = \"soon\"").is_err());
        // Values that parse but cannot work.
        for bad in [
            "provisioning_reload = \"0s\"",
            "provisioning_max_removal = 1.5",
            "[devices]\nmax_connections = 0",
            "[uplink]\nbacklog_rate = \"0 B\"",
        ] {
            assert!(GatewayConfig::from_toml(bad).is_err(), "{bad} accepted");
        }
    }

    /// The README's configuration block parses, and every line not marked `site`
    /// shows the default.
    #[test]
    fn the_readme_block_parses_and_shows_the_defaults() {
        let readme = include_str!("../README.md");
        let block = readme.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("a toml block");
        GatewayConfig::from_toml(block).unwrap_or_else(|e| panic!("the README block does not parse: {e}"));
        let defaults: String = block.lines().filter(|l| !l.contains("# site")).map(|l| format!("{l}\n")).collect();
        let cfg = GatewayConfig::from_toml(&defaults).unwrap_or_else(|e| panic!("the default lines do not parse: {e}"));
        assert_eq!(format!("{cfg:#?}"), format!("{:#?}", GatewayConfig::default()));
    }
}
