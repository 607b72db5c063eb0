//! Per-vehicle streaming analytics on event time: 1-minute and 1-hour windows
//! (the `aggregates` dataset) and events (the `events` dataset and alerts).
//!
//! # Event time, not arrival time
//!
//! Everything here is a function of a device's own batches, taken in the order of
//! their (epoch, seq), never of when they arrive. A device's batches join its
//! **prefix** one by one: seq 0 of an epoch starts it (or a new epoch's seq 0
//! follows the last seq of the one before), and each next seq extends it. A batch
//! whose predecessors have not come yet is held. When a batch joins the prefix:
//!
//! 1. its samples dated at or before the **watermark** are *late* (counted, stored
//!    in `readings`, left out of analytics); the others wait in `pending`;
//! 2. the watermark moves to the newest sample time of the prefix minus
//!    `analytics.reorder` (room for readings that cross a batch boundary out of order);
//! 3. pending samples up to the watermark are processed in time order, and windows
//!    ending at or before it close.
//!
//! Because the prefix grows in seq order whatever order batches arrive in, a
//! gateway backlog released hours later gives exactly the rows the same batches give
//! in order — gateways send fresh data first and drain a backlog beside it, so the
//! fresh batches wait, held, until the backlog before them has come. A batch that
//! never comes (a unit that lost it) holds the prefix until the unbroken run of held
//! batches right after it spans `analytics.gap_timeout` of event time, or the held
//! batches number `analytics.max_held`; then the gap is skipped and counted. A new boot epoch is treated the same way (the old
//! epoch's last batches may still be in a backlog; not counted as a gap), and so is
//! a device's first batch when it is not seq 0. So the equivalence holds for backlogs drained
//! within `gap_timeout` of fresh data; after that, what comes is counted late.
//!
//! Device silence is the one thing judged against another clock: a unit is silent
//! when its gateway, as this shard hears it, has received other units' data for
//! `analytics.silent_after` since it last received this one's. A unit behind a
//! disconnected gateway is not silent: the gateway's clock, as seen here, stops too.
//!
//! - `join`: the event-time join (prefix, watermark, gaps) and each frame of readings;
//! - `windows`: 1-minute and 1-hour aggregate windows;
//! - `detect`: the detectors, one file per family (speed, fuel, tires, silence);
//! - [`kinds`]: the event kinds.
//!
//! Pure: no I/O and no clock; time is the readings' own (event time).

use std::time::Duration;

use fleetline_wire::shard::fnv1a64;
use serde::{Deserialize, Serialize};

mod detect;
mod join;
pub mod kinds;
mod windows;

pub use fleetline_wire::signals::kind::WHEELS;
pub use join::DeviceAnalytics;
pub use kinds::EventKind;
pub use windows::{WINDOWS, haversine_m};

/// One minute in ms.
pub const MINUTE_MS: i64 = 60_000;
/// One hour in ms.
pub const HOUR_MS: i64 = 3_600_000;
/// Standard atmosphere, kPa (tire pressures are gauge pressures).
pub const ATMOSPHERE_KPA: f64 = 101.325;

/// Analytics settings (`[analytics]` in the node's TOML).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    /// How far readings may cross batch boundaries out of time order.
    #[serde(with = "humantime_serde")]
    pub reorder: Duration,
    /// Event time the batches held behind a missing one must span before it is skipped.
    #[serde(with = "humantime_serde")]
    pub gap_timeout: Duration,
    /// Batches held behind a missing one before it is skipped regardless.
    pub max_held: usize,
    /// Overspeed above this, km/h.
    pub speed_limit_kmh: f64,
    /// ... held this long.
    #[serde(with = "humantime_serde")]
    pub overspeed_hold: Duration,
    /// Low pressure: a tire below this fraction of the mean of the vehicle's other tires.
    pub low_pressure_ratio: f64,
    /// Puncture: that fraction falling by at least this much between two readings.
    pub puncture_drop: f64,
    /// Slow leak: temperature-compensated pressure falling at least this fast, kPa/h.
    pub leak_kpa_per_h: f64,
    /// ... over this much event time (the trend is a Theil–Sen slope over it).
    #[serde(with = "humantime_serde")]
    pub leak_window: Duration,
    /// Fuel theft: the level falling by this much, litres, while the vehicle stands …
    pub theft_litres: f64,
    /// … within this much time (slower falls are an idling engine).
    #[serde(with = "humantime_serde")]
    pub theft_window: Duration,
    /// Refuel: the relative level rising by this many percentage points between readings.
    pub refuel_percent: f64,
    /// Silent: its gateway received nothing from it for this long while receiving others.
    #[serde(with = "humantime_serde")]
    pub silent_after: Duration,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            reorder: Duration::from_secs(5),
            gap_timeout: Duration::from_secs(900),
            max_held: 4096,
            speed_limit_kmh: 90.0,
            overspeed_hold: Duration::from_secs(5),
            low_pressure_ratio: 0.85,
            puncture_drop: 0.15,
            leak_kpa_per_h: 20.0,
            leak_window: Duration::from_secs(600),
            theft_litres: 2.0,
            theft_window: Duration::from_secs(600),
            refuel_percent: 5.0,
            silent_after: Duration::from_secs(120),
        }
    }
}

impl AnalyticsConfig {
    /// Checks the settings make sense.
    pub fn check(&self) -> Result<(), InvalidSettings> {
        let ratios = [self.low_pressure_ratio, self.puncture_drop];
        if ratios.iter().any(|r| !(*r > 0.0 && *r < 1.0)) {
            return Err(InvalidSettings("analytics.low_pressure_ratio and puncture_drop must be between 0 and 1"));
        }
        let positive = [self.speed_limit_kmh, self.leak_kpa_per_h, self.theft_litres, self.refuel_percent];
        if positive.iter().any(|v| !(*v > 0.0 && v.is_finite())) {
            return Err(InvalidSettings("analytics thresholds must be positive"));
        }
        if self.leak_window.is_zero() || self.silent_after.is_zero() || self.theft_window.is_zero() {
            return Err(InvalidSettings("analytics.leak_window, theft_window and silent_after must be positive"));
        }
        Ok(())
    }
}

/// Analytics settings that cannot work; the message names them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSettings(pub &'static str);

/// One reading as analytics sees it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pt {
    /// Reading time (the unit's clock), Unix ms.
    pub ts: i64,
    /// Reading kind.
    pub kind: u16,
    /// Engineering value.
    pub value: f64,
}

/// One row of `aggregates`.
#[derive(Clone, Debug, PartialEq)]
pub struct AggregateRow {
    /// `1m` or `1h`.
    pub window: &'static str,
    /// Window start, Unix ms (inclusive).
    pub start: i64,
    /// Window end, Unix ms (exclusive).
    pub end: i64,
    /// Readings in the window.
    pub samples: u64,
    /// Distance driven, m (haversine between fixes while moving).
    pub distance_m: f64,
    /// Speed readings in the window.
    pub speed_readings: u64,
    /// Mean of the speed readings, km/h.
    pub avg_speed_kmh: Option<f64>,
    /// Highest speed reading, km/h.
    pub max_speed_kmh: Option<f64>,
    /// Fuel that left the tank, l (falls of the absolute level; rises are refuels).
    pub fuel_used_l: Option<f64>,
    /// Fuel used per 100 km (when at least 100 m were driven).
    pub fuel_l_per_100km: Option<f64>,
    /// Tire pressure readings in the window (every tire).
    pub tire_readings: u64,
    /// Lowest tire pressure reading, kPa.
    pub tire_pressure_min_kpa: Option<f64>,
    /// Mean tire pressure reading, kPa.
    pub tire_pressure_mean_kpa: Option<f64>,
    /// Highest tire pressure reading, kPa.
    pub tire_pressure_max_kpa: Option<f64>,
    /// Fastest loss of temperature-compensated pressure of any tire, kPa/h
    /// (least-squares slope in the window; negative means gaining).
    pub leak_rate_kpa_h: Option<f64>,
}

/// One event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable id: the same condition detected again (a replay, a restart) has the same id.
    pub id: String,
    /// Fleet.
    pub fleet: String,
    /// Device.
    pub device: String,
    /// What was found.
    pub kind: EventKind,
    /// When the condition began, Unix ms (unit clock; for `silent`, the unit's last
    /// reading).
    pub ts_ms: i64,
    /// Event time at which it was recognized, Unix ms.
    pub detected_ms: i64,
    /// Wheel (`row1.left`, …) for tire events.
    pub wheel: Option<String>,
    /// The figure that tripped it (km/h, kPa, kPa/h, l, %).
    pub value: Option<f64>,
    /// In words.
    pub detail: String,
}

/// What processing produced: closed windows and new events, for the caller to
/// stamp with fleet and device.
#[derive(Debug, Default)]
pub struct Output {
    /// Closed windows.
    pub aggregates: Vec<AggregateRow>,
    /// New events.
    pub events: Vec<Event>,
}

/// Counts of one device's analytics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Samples that joined the prefix at or below the watermark.
    pub late_samples: u64,
    /// Missing batches skipped after the gap timeout.
    pub gaps_skipped: u64,
}

/// A wheel index's name.
pub fn wheel_name(i: usize) -> String {
    format!("row{}.{}", i / 2 + 1, if i.is_multiple_of(2) { "left" } else { "right" })
}

/// The id of an event: a hash of what identifies the condition.
pub fn event_id(fleet: &str, device: &str, kind: EventKind, wheel: Option<usize>, ts_ms: i64) -> String {
    let w = wheel.map_or(-1, |w| w as i64);
    format!("{:016x}", fnv1a64(format!("{fleet}/{device}/{kind}/{w}/{ts_ms}").as_bytes()))
}

/// Who the rows are about.
pub struct Who<'a> {
    /// Fleet.
    pub fleet: &'a str,
    /// Device.
    pub device: &'a str,
}

impl Who<'_> {
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        out: &mut Output,
        kind: EventKind,
        ts_ms: i64,
        detected_ms: i64,
        wheel: Option<usize>,
        value: Option<f64>,
        detail: String,
    ) {
        out.events.push(Event {
            id: event_id(self.fleet, self.device, kind, wheel, ts_ms),
            fleet: self.fleet.into(),
            device: self.device.into(),
            kind,
            ts_ms,
            detected_ms,
            wheel: wheel.map(wheel_name),
            value,
            detail,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetline_wire::signals::kind;

    const T0: i64 = 1_795_000_000_000 - 1_795_000_000_000 % HOUR_MS;

    fn who() -> Who<'static> {
        Who { fleet: "f", device: "d" }
    }

    /// `secs` seconds of a vehicle at `kmh` going north, one batch per 10 s.
    fn drive(secs: i64, kmh: impl Fn(i64) -> f64) -> Vec<Vec<Pt>> {
        let mut batches = Vec::new();
        let mut lat = 52.0;
        let mut batch = Vec::new();
        for s in 0..secs {
            let ts = T0 + s * 1000;
            let v = kmh(s);
            lat += v / 3.6 / 111_195.0;
            batch.push(Pt { ts, kind: kind::LATITUDE.0, value: lat });
            batch.push(Pt { ts, kind: kind::LONGITUDE.0, value: 13.0 });
            batch.push(Pt { ts, kind: kind::SPEED.0, value: v });
            if s % 10 == 9 {
                batches.push(std::mem::take(&mut batch));
            }
        }
        batches.push(batch);
        batches
    }

    fn run(batches: &[Vec<Pt>], order: &[usize]) -> Output {
        let cfg = AnalyticsConfig::default();
        let mut a = DeviceAnalytics::default();
        let mut out = Output::default();
        for &i in order {
            a.offer(&who(), (1, i as u32), batches[i].clone(), &cfg, &mut out);
        }
        out
    }

    #[test]
    fn windows_close_on_event_time_and_measure_distance_and_speed() {
        let batches = drive(200, |_| 72.0);
        let out = run(&batches, &(0..batches.len()).collect::<Vec<_>>());
        // 200 s: minutes 0, 1 and 2 close (watermark 194 s); minute 3 stays open.
        let mins: Vec<_> = out.aggregates.iter().filter(|r| r.window == "1m").collect();
        assert_eq!(mins.len(), 3);
        assert_eq!(mins[0].start, T0);
        assert_eq!(mins[0].samples, 180);
        // 72 km/h = 20 m/s; the first fix only starts the count.
        assert!((mins[0].distance_m - 59.0 * 20.0).abs() < 1.0, "{}", mins[0].distance_m);
        assert!((mins[1].distance_m - 60.0 * 20.0).abs() < 1.0);
        assert_eq!(mins[0].avg_speed_kmh, Some(72.0));
        assert!(out.aggregates.iter().all(|r| r.window != "1h"));
    }

    #[test]
    fn any_arrival_order_gives_the_same_rows() {
        let batches = drive(400, |s| if (100..140).contains(&s) { 110.0 } else { 60.0 });
        let n = batches.len();
        let in_order = run(&batches, &(0..n).collect::<Vec<_>>());
        // Every run of 8 batches (80 s) reversed, well inside the gap timeout.
        let order: Vec<usize> = (0..n).collect::<Vec<_>>().chunks(8).flat_map(|c| c.iter().rev().copied()).collect();
        let reversed = run(&batches, &order);
        assert_eq!(in_order.aggregates, reversed.aggregates);
        assert_eq!(in_order.events, reversed.events);
        assert_eq!(in_order.events.len(), 1, "{:?}", in_order.events);
        assert_eq!(in_order.events[0].kind, EventKind::Overspeed);
        assert_eq!(in_order.events[0].ts_ms, T0 + 100_000);
    }

    #[test]
    fn a_missing_batch_holds_analytics_until_the_gap_timeout() {
        let batches = drive(1200, |_| 50.0);
        let n = batches.len();
        let cfg = AnalyticsConfig::default();
        let mut a = DeviceAnalytics::default();
        let mut out = Output::default();
        for i in (0..n).filter(|i| *i != 3) {
            a.offer(&who(), (1, i as u32), batches[i].clone(), &cfg, &mut out);
            // Held from batch 4 (40 s): skipped once they span more than 900 s.
            if (i as i64) * 10 < 40 + 900 {
                assert!(out.aggregates.is_empty(), "closed a window across a gap at batch {i}");
            }
        }
        assert_eq!(a.counts.gaps_skipped, 1);
        assert!(!out.aggregates.is_empty());
        // The missing batch, arriving now, is late.
        a.offer(&who(), (1, 3), batches[3].clone(), &cfg, &mut out);
        assert_eq!(a.counts.late_samples, batches[3].len() as u64);
    }

    #[test]
    fn haversine_matches_a_known_distance() {
        // Berlin TV tower to Brandenburg Gate, about 2.2 km.
        let d = haversine_m(52.520_8, 13.409_4, 52.516_3, 13.377_7);
        assert!((d - 2_207.0).abs() < 15.0, "{d}");
    }
}
