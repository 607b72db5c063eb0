//! Sensor drivers of a vehicle unit, `no_std` and without allocation, over the
//! `embedded-hal` 1.0 and `embedded-io` traits so any HAL's buses fit:
//!
//! - [`gps`]: NMEA 0183 sentences from a GNSS receiver's UART, assembled from
//!   bytes, checksums verified, `GGA` and `RMC` parsed into a [`gps::Fix`];
//! - [`tpms`]: a tire-pressure receiver on I2C: pressure and temperature per
//!   wheel from its registers;
//! - [`fuel`]: the tank level from an ADC channel through a calibration table;
//! - [`persist`]: the boot epoch and command counter in NOR flash, safe
//!   against power loss at any write or erase.
//!
//! Bad input — a bus error, a garbled sentence, a register value no sensor
//! sends, a reading outside the calibration — is an error the caller sees and a
//! count in the driver's stats, never a panic.

#![no_std]

pub mod fuel;
pub mod gps;
pub mod persist;
pub mod tpms;
