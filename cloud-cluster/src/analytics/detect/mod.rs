//! The detectors, one file per family; each reads one kind of reading as its
//! frame is processed and raises events into the output. Their state lives in
//! [`Track`], part of a device's analytics state (and so of the checkpoint).
//!
//! Pure: no I/O and no clock.

use serde::{Deserialize, Serialize};

use super::WHEELS;

mod fuel;
mod silence;
mod speed;
mod tires;

/// One tire's detector state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Tire {
    /// Latest temperature, °C.
    pub(super) temp: Option<f64>,
    /// Latest compensated pressure, kPa at 20 °C.
    pub(super) comp: Option<f64>,
    /// Latest ratio to the other tires, and when.
    pub(super) ratio: Option<(i64, f64)>,
    /// Compensated pressures within the leak window.
    pub(super) recent: Vec<(i64, f64)>,
    pub(super) low: bool,
    pub(super) punctured: bool,
    pub(super) leaking: bool,
}

/// Continuity and detector state across windows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Track {
    pub(super) last_fix: Option<(i64, f64, f64)>,
    pub(super) speed: Option<f64>,
    pub(super) fuel_abs: Option<f64>,
    pub(super) fuel_rel: Option<f64>,
    /// Fuel levels read while standing, within the theft window.
    pub(super) parked_fuel: Vec<(i64, f64)>,
    pub(super) theft_raised: bool,
    pub(super) over_since: Option<i64>,
    pub(super) over_raised: bool,
    pub(super) tires: [Tire; WHEELS],
}
