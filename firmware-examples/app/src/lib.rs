//! A vehicle unit's firmware logic, the same on a microcontroller and on a
//! host: [`mqtt`], a sans-IO MQTT 3.1.1 client of the packets a unit needs;
//! [`unit`](mod@unit), the main loop that reads the sensors through their
//! drivers, batches and seals through the device SDK, publishes over a
//! [`unit::Link`], keeps its boot epoch and command counter in flash and feeds
//! a watchdog; [`modem`], a [`unit::Link`] over a cellular modem's AT
//! socket interface behind a UART; and [`sim`], a vehicle's peripherals for
//! boards that lack them.
//!
//! Why a client of its own: the maintained `no_std` MQTT clients speak MQTT 5
//! only, the gateway's embedded broker speaks 3.1.1, and what a unit needs of
//! 3.1.1 (CONNECT, SUBSCRIBE, QoS 1 PUBLISH and PUBACK, PINGREQ) is a few
//! hundred lines that allocate nothing, copy a sealed batch nowhere (it is
//! written to the link from the SDK's outbox) and leave I/O and time to the
//! loop, so the same code runs under a test, on a host socket and on a
//! modem's UART.

#![no_std]

pub mod modem;
pub mod mqtt;
pub mod sim;
pub mod unit;
