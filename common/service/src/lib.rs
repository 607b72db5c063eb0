//! What every Fleetline server process needs around its own work, shared by the
//! gateway and the cloud node: the process lifecycle (logging, `--check-config`,
//! the runtime, the metrics recorder, stop signals, exit codes), configuration
//! files, the provisioning file as it is reloaded, retry backoff with jitter, byte sizes in settings, TLS configurations from PEM files, counters that
//! survive restarts, and the process's own limits. Nothing here knows MQTT.

pub mod backoff;
pub mod counter;
pub mod http;
pub mod limits;
pub mod process;
pub mod provisioning;
mod size;
pub mod tls;

pub use backoff::Backoff;
pub use limits::open_files_limit;
pub use process::{RenderMetrics, init_tracing, print_listening, read_config, run};
pub use provisioning::ProvisioningFile;
pub use size::{ByteSize, SizeError};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML does not parse into the configuration (syntax, an unknown field,
    /// a wrong type).
    #[error(transparent)]
    Parse(#[from] toml::de::Error),
    /// A value that parses but cannot work; the message names the setting.
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// A value that cannot work.
    pub fn invalid(why: impl Into<String>) -> Self {
        Self::Invalid(why.into())
    }
}

/// The wall clock in Unix milliseconds (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
