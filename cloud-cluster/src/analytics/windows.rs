//! Aggregate windows: 1-minute and 1-hour tumbling windows on event time, the
//! rows of the `aggregates` dataset.
//!
//! Pure: accumulators only.

use serde::{Deserialize, Serialize};

use super::{AggregateRow, HOUR_MS, MINUTE_MS, WHEELS};

/// Window lengths, with their names in the `window` column.
pub const WINDOWS: [(&str, i64); 2] = [("1m", MINUTE_MS), ("1h", HOUR_MS)];

/// Least-squares accumulator of (hours since window start, kPa).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Ols {
    n: u32,
    st: f64,
    sp: f64,
    stt: f64,
    stp: f64,
}

impl Ols {
    #[inline]
    pub(super) fn add(&mut self, t: f64, p: f64) {
        self.n += 1;
        self.st += t;
        self.sp += p;
        self.stt += t * t;
        self.stp += t * p;
    }

    pub(super) fn slope(&self) -> Option<f64> {
        let n = f64::from(self.n);
        let den = n * self.stt - self.st * self.st;
        (self.n >= 2 && den > 1e-12).then(|| (n * self.stp - self.st * self.sp) / den)
    }
}

/// An open window's accumulators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct Window {
    pub(super) start: i64,
    pub(super) len: i64,
    pub(super) samples: u64,
    pub(super) distance_m: f64,
    pub(super) speed_n: u64,
    pub(super) speed_sum: f64,
    pub(super) speed_max: f64,
    pub(super) fuel_seen: bool,
    pub(super) fuel_used: f64,
    pub(super) tire_n: u64,
    pub(super) tire_sum: f64,
    pub(super) tire_min: f64,
    pub(super) tire_max: f64,
    pub(super) leak: [Ols; WHEELS],
}

impl Window {
    pub(super) fn new(start: i64, len: i64) -> Self {
        Self {
            start,
            len,
            samples: 0,
            distance_m: 0.0,
            speed_n: 0,
            speed_sum: 0.0,
            speed_max: f64::MIN,
            fuel_seen: false,
            fuel_used: 0.0,
            tire_n: 0,
            tire_sum: 0.0,
            tire_min: f64::MAX,
            tire_max: f64::MIN,
            leak: [Ols::default(); WHEELS],
        }
    }

    #[inline]
    pub(super) fn end(&self) -> i64 {
        self.start + self.len
    }

    pub(super) fn row(&self, name: &'static str) -> AggregateRow {
        let km = self.distance_m / 1000.0;
        AggregateRow {
            window: name,
            start: self.start,
            end: self.end(),
            samples: self.samples,
            distance_m: self.distance_m,
            speed_readings: self.speed_n,
            tire_readings: self.tire_n,
            avg_speed_kmh: (self.speed_n > 0).then(|| self.speed_sum / self.speed_n as f64),
            max_speed_kmh: (self.speed_n > 0).then_some(self.speed_max),
            fuel_used_l: self.fuel_seen.then_some(self.fuel_used),
            fuel_l_per_100km: (self.fuel_seen && km >= 0.1).then(|| self.fuel_used / km * 100.0),
            tire_pressure_min_kpa: (self.tire_n > 0).then_some(self.tire_min),
            tire_pressure_mean_kpa: (self.tire_n > 0).then(|| self.tire_sum / self.tire_n as f64),
            tire_pressure_max_kpa: (self.tire_n > 0).then_some(self.tire_max),
            leak_rate_kpa_h: self.leak.iter().filter_map(Ols::slope).map(|s| -s).reduce(f64::max),
        }
    }
}

/// Great-circle distance in metres.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const R: f64 = 6_371_008.8;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * R * a.sqrt().min(1.0).asin()
}
