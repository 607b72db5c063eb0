#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), no_std)]

#[cfg(all(feature = "std", not(test)))]
extern crate std;

pub mod batch;
#[cfg(feature = "std")]
pub mod bundle;
pub mod control;
#[cfg(feature = "std")]
pub mod decode;
mod error;
pub mod ids;
pub mod key;
#[cfg(feature = "std")]
pub mod provisioning;
pub mod reason;
#[cfg(feature = "std")]
pub mod seqset;
pub mod shard;
pub mod signals;
pub mod topics;
pub mod varint;

pub use batch::{BatchHeader, BatchWriter, OpenBatch, open_batch, peek_header};
pub use control::{AckRange, Command, ControlKind, open_control, seal_ack, seal_command};
pub use error::WireError;
pub use ids::{DeviceId, FleetId, GatewayId};
pub use key::DeviceKey;
pub use signals::{SCHEMA_V1, SignalKind, SignalSpec};
