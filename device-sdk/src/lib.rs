#![doc = include_str!("../README.md")]
#![cfg_attr(not(any(test, feature = "std")), no_std)]

mod batcher;
pub mod device;
mod outbox;

#[cfg(feature = "std")]
pub mod client;

pub use device::{
    AckOutcome, BootState, Config, ConfigError, ControlError, Device, FlushPolicy, OutboxFull, Reading, RecordError,
    Stats, Transmit,
};
pub use fleetline_wire as wire;
pub use outbox::Released;

#[cfg(test)]
mod tests;
