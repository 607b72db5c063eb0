//! Fleetline's fleet simulator: deterministic vehicles on the real device SDK, the
//! one-command demo (single-node cloud, a gateway and a fleet on loopback), and the
//! load-test report.

pub mod autoscale;
pub mod chaos;
pub mod demo;
pub mod drive;
pub mod fleet;
pub mod html;
pub mod model;
pub mod predictions;
pub mod report;
pub mod rng;
