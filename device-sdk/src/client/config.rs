//! Settings of the MQTT client for Linux-class units.

use std::time::Duration;

use crate::device::{BootState, Config};

/// TLS towards the broker (rustls, ring provider).
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// PEM bundle of CA certificates the broker's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and PEM private key for mutual TLS, if the broker asks.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
}

/// Reconnect delays: exponential from `initial` to `max`, each with ±50 % jitter
/// so a depot full of units does not reconnect in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay after a failure.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(30) }
    }
}

/// Everything [`super::DeviceClient`] needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Broker host name or address (the gateway).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS, or `None` for plain TCP (loopback and test setups only).
    pub tls: Option<TlsOptions>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// How often timers (flush age, re-sends) are checked, in wall time.
    pub tick: Duration,
    /// Longest wait for a connection and its CONNACK (and for a write). A gateway
    /// taking thousands of reconnects at once answers slowly; a client that gives
    /// up too early reconnects and takes its own session over, again and again.
    pub connect_timeout: Duration,
    /// The core's settings.
    pub device: Config,
    /// This boot's persisted state.
    pub boot: BootState,
}

impl ClientConfig {
    /// Defaults for everything but the broker and the device.
    pub fn new(host: impl Into<String>, port: u16, device: Config, boot: BootState) -> Self {
        Self {
            host: host.into(),
            port,
            tls: None,
            keep_alive: Duration::from_secs(30),
            backoff: Backoff::default(),
            tick: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(30),
            device,
            boot,
        }
    }
}
