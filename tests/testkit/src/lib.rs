//! Real peers and stand-ins for Fleetline's tests.
//!
//! - [`Mosquitto`]: a real Mosquitto broker on a free loopback port, stopped on drop;
//!   [`Sub`] and [`publish`] wrap `mosquitto_sub` and `mosquitto_pub`.
//! - [`Pki`]: a CA with server and client certificates.
//! - [`provisioning`]: deterministic provisioning files.
//! - [`cloud::FakeCloud`]: consumes gateway bundles from a broker, opens every batch,
//!   records what arrived and acks bundles (tests of the gateway alone).
//! - [`fleet`]: real device clients recording against a gateway.
//! - [`batches`]: sealed batches and bundles built directly with the wire format.
//! - [`raw`]: hand-made MQTT CONNECTs and reconnect loops for attack tests.

pub mod batches;
pub mod bench;
pub mod cloud;
pub mod fleet;
pub mod http;
mod mosquitto;
mod pki;
pub mod procfs;
pub mod provisioning;
mod proxy;
pub mod raw;

pub use mosquitto::{Mosquitto, Sub, free_port, publish};
pub use pki::Pki;
pub use proxy::SwitchProxy;

/// The Python with the test packages (duckdb, pyarrow, moto): `FLEETLINE_PYTHON`,
/// or the venv `scripts/test.sh` makes at the workspace root.
pub fn python() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("FLEETLINE_PYTHON") {
        return p.into();
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(venv.exists(), "no Python with the test packages: run scripts/test.sh once, or set FLEETLINE_PYTHON");
    venv
}
