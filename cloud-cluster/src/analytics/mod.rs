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
//! Pure: no I/O and no clock; time is the readings' own (event time).

use std::collections::BTreeMap;
use std::time::Duration;

use fleetline_wire::shard::fnv1a64;
use fleetline_wire::signals::kind;
use serde::{Deserialize, Serialize};

/// One minute in ms.
pub const MINUTE_MS: i64 = 60_000;
/// One hour in ms.
pub const HOUR_MS: i64 = 3_600_000;
/// Wheel positions the signal table has (four axle rows, left and right).
pub const WHEELS: usize = 8;
/// Standard atmosphere, kPa (tire pressures are gauge pressures).
pub const ATMOSPHERE_KPA: f64 = 101.325;
/// Most points the slow-leak slope is taken over.
const LEAK_POINTS: usize = 40;
/// Window lengths, with their names in the `window` column.
pub const WINDOWS: [(&str, i64); 2] = [("1m", MINUTE_MS), ("1h", HOUR_MS)];

/// Event kinds (the `kind` column of `events`).
pub mod event {
    /// A tire well below the vehicle's other tires.
    pub const LOW_PRESSURE: &str = "low_pressure";
    /// A tire losing pressure steadily (temperature-compensated).
    pub const SLOW_LEAK: &str = "slow_leak";
    /// A tire losing a large part of its pressure between two readings.
    pub const PUNCTURE: &str = "puncture";
    /// Fuel leaving the tank while the vehicle stands.
    pub const FUEL_THEFT: &str = "fuel_theft";
    /// The tank level rising.
    pub const REFUEL: &str = "refuel";
    /// Speed above the limit for longer than the hold time.
    pub const OVERSPEED: &str = "overspeed";
    /// A unit its gateway no longer hears while it hears others.
    pub const SILENT: &str = "silent";
}

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
    pub fn check(&self) -> Result<(), String> {
        let ratios = [self.low_pressure_ratio, self.puncture_drop];
        if ratios.iter().any(|r| !(*r > 0.0 && *r < 1.0)) {
            return Err("analytics.low_pressure_ratio and puncture_drop must be between 0 and 1".into());
        }
        let positive = [self.speed_limit_kmh, self.leak_kpa_per_h, self.theft_litres, self.refuel_percent];
        if positive.iter().any(|v| !(*v > 0.0 && v.is_finite())) {
            return Err("analytics thresholds must be positive".into());
        }
        if self.leak_window.is_zero() || self.silent_after.is_zero() || self.theft_window.is_zero() {
            return Err("analytics.leak_window, theft_window and silent_after must be positive".into());
        }
        Ok(())
    }
}

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
    /// One of [`event`].
    pub kind: String,
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

/// Least-squares accumulator of (hours since window start, kPa).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Ols {
    n: u32,
    st: f64,
    sp: f64,
    stt: f64,
    stp: f64,
}

impl Ols {
    fn add(&mut self, t: f64, p: f64) {
        self.n += 1;
        self.st += t;
        self.sp += p;
        self.stt += t * t;
        self.stp += t * p;
    }

    fn slope(&self) -> Option<f64> {
        let n = f64::from(self.n);
        let den = n * self.stt - self.st * self.st;
        (self.n >= 2 && den > 1e-12).then(|| (n * self.stp - self.st * self.sp) / den)
    }
}

/// An open window's accumulators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Window {
    start: i64,
    len: i64,
    samples: u64,
    distance_m: f64,
    speed_n: u64,
    speed_sum: f64,
    speed_max: f64,
    fuel_seen: bool,
    fuel_used: f64,
    tire_n: u64,
    tire_sum: f64,
    tire_min: f64,
    tire_max: f64,
    leak: [Ols; WHEELS],
}

impl Window {
    fn new(start: i64, len: i64) -> Self {
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

    fn end(&self) -> i64 {
        self.start + self.len
    }

    fn row(&self, name: &'static str) -> AggregateRow {
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

/// One tire's detector state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Tire {
    /// Latest temperature, °C.
    temp: Option<f64>,
    /// Latest compensated pressure, kPa at 20 °C.
    comp: Option<f64>,
    /// Latest ratio to the other tires, and when.
    ratio: Option<(i64, f64)>,
    /// Compensated pressures within the leak window.
    recent: Vec<(i64, f64)>,
    low: bool,
    punctured: bool,
    leaking: bool,
}

/// Continuity and detector state across windows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Track {
    last_fix: Option<(i64, f64, f64)>,
    speed: Option<f64>,
    fuel_abs: Option<f64>,
    fuel_rel: Option<f64>,
    /// Fuel levels read while standing, within the theft window.
    parked_fuel: Vec<(i64, f64)>,
    theft_raised: bool,
    over_since: Option<i64>,
    over_raised: bool,
    tires: [Tire; WHEELS],
}

/// One device's analytics state; lives in the shard's checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceAnalytics {
    cursor: Option<(u32, u32)>,
    held: BTreeMap<(u32, u32), Vec<Pt>>,
    frontier: i64,
    watermark: i64,
    pending: Vec<Pt>,
    windows: [Option<Window>; 2],
    track: Track,
    /// Gateway receipt time of the batch that made the unit silent, while it is.
    silent_since: Option<i64>,
    /// Newest reading time of any batch taken (held or not).
    newest: i64,
    /// Counts.
    pub counts: Counts,
}

impl Default for DeviceAnalytics {
    fn default() -> Self {
        Self {
            cursor: None,
            held: BTreeMap::new(),
            frontier: i64::MIN,
            watermark: i64::MIN,
            pending: Vec::new(),
            windows: [None, None],
            track: Track::default(),
            silent_since: None,
            newest: i64::MIN,
            counts: Counts::default(),
        }
    }
}

/// A wheel index's name.
pub fn wheel_name(i: usize) -> String {
    format!("row{}.{}", i / 2 + 1, if i.is_multiple_of(2) { "left" } else { "right" })
}

/// The id of an event: a hash of what identifies the condition.
pub fn event_id(fleet: &str, device: &str, kind: &str, wheel: Option<usize>, ts_ms: i64) -> String {
    let w = wheel.map_or(-1, |w| w as i64);
    format!("{:016x}", fnv1a64(format!("{fleet}/{device}/{kind}/{w}/{ts_ms}").as_bytes()))
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

/// Median of pairwise slopes (kPa per hour) of (ms, kPa) points.
fn theil_sen_per_h(points: &[(i64, f64)]) -> Option<f64> {
    let mut slopes = Vec::with_capacity(points.len() * points.len() / 2);
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            if b.0 != a.0 {
                slopes.push((b.1 - a.1) / ((b.0 - a.0) as f64 / HOUR_MS as f64));
            }
        }
    }
    if slopes.is_empty() {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let m = slopes.len() / 2;
    Some(if slopes.len() % 2 == 1 { slopes[m] } else { (slopes[m - 1] + slopes[m]) / 2.0 })
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
        kind: &str,
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
            kind: kind.into(),
            ts_ms,
            detected_ms,
            wheel: wheel.map(wheel_name),
            value,
            detail,
        });
    }
}

impl DeviceAnalytics {
    /// Takes one new batch of the device (each (epoch, seq) exactly once; `pts` may
    /// be empty) and processes whatever that makes ready.
    pub fn offer(&mut self, who: &Who<'_>, key: (u32, u32), pts: Vec<Pt>, cfg: &AnalyticsConfig, out: &mut Output) {
        self.newest = pts.iter().map(|p| p.ts).fold(self.newest, i64::max);
        match self.cursor {
            Some(c) if key <= c => {
                // Behind the prefix: its place was skipped as a gap.
                self.join(pts, cfg);
                self.drain(who, cfg, out);
                return;
            }
            _ => {
                self.held.insert(key, pts);
            }
        }
        self.advance(who, cfg, out);
    }

    /// State for a device whose batches up to `key` were stored before analytics
    /// existed for it (an upgrade): analytics continue from the next batch.
    pub fn resume_after(key: (u32, u32)) -> Self {
        Self { cursor: Some(key), ..Self::default() }
    }

    /// Whether the unit is currently flagged silent.
    pub fn is_silent(&self) -> bool {
        self.silent_since.is_some()
    }

    /// Batches held behind a missing one.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A new batch of the unit, received at `received_ms` by the gateway that
    /// found it silent (`moved`: a newer batch through another gateway). Only
    /// a receipt after the silence began ends it: older batches drained from a
    /// backlog do not.
    pub fn heard(&mut self, received_ms: i64, moved: bool) {
        if moved || self.silent_since.is_some_and(|s| received_ms > s) {
            self.silent_since = None;
        }
    }

    /// Its gateway's clock, as this shard hears it, reads `gateway_now_ms` and has
    /// run without a pause since `counted_from_ms` (at least the unit's last receipt,
    /// `last_received_ms`). Raises `silent` once per silence.
    pub fn check_silent(
        &mut self,
        who: &Who<'_>,
        last_received_ms: i64,
        counted_from_ms: i64,
        gateway_now_ms: i64,
        cfg: &AnalyticsConfig,
        out: &mut Output,
    ) {
        let after = cfg.silent_after.as_millis() as i64;
        if self.silent_since.is_none() && gateway_now_ms - counted_from_ms > after {
            self.silent_since = Some(last_received_ms);
            // Dated by the unit's newest reading taken so far (its clock; whether or
            // not analytics has processed it yet), else by its last receipt.
            let ts = if self.newest == i64::MIN { last_received_ms } else { self.newest };
            who.event(
                out,
                event::SILENT,
                ts,
                counted_from_ms + after,
                None,
                None,
                format!("its gateway heard others but not this unit for {} s", after / 1000),
            );
            // One silence, one id: keyed by the receipt it began after (the unit's
            // last reading may be the same across two silences).
            if let Some(e) = out.events.last_mut() {
                e.id = event_id(who.fleet, who.device, event::SILENT, None, last_received_ms);
            }
        }
    }

    fn advance(&mut self, who: &Who<'_>, cfg: &AnalyticsConfig, out: &mut Output) {
        let gap = cfg.gap_timeout.as_millis() as i64;
        while let Some((&first, _)) = self.held.first_key_value() {
            let next = match self.cursor {
                // A device's first batch: seq 0 of an epoch starts it.
                None => first.1 == 0,
                Some((e, s)) => first == (e, s.wrapping_add(1)),
            };
            if !next {
                // A missing batch (or a new epoch, or a first batch after seq 0): skip
                // once the unbroken run of held batches right after it spans the gap
                // timeout (a batch that is coming would have come within it; fresh data
                // held further ahead while a backlog drains does not count), or the
                // held batches are too many.
                let mut run = self.held.iter();
                let (mut lo, mut hi, mut prev) = (i64::MAX, i64::MIN, None::<(u32, u32)>);
                for (k, pts) in run.by_ref() {
                    if prev.is_some_and(|(e, s)| *k != (e, s.wrapping_add(1))) {
                        break;
                    }
                    prev = Some(*k);
                    for p in pts {
                        (lo, hi) = (lo.min(p.ts), hi.max(p.ts));
                    }
                }
                let spanned = hi != i64::MIN && hi.saturating_sub(lo) > gap;
                if !spanned && self.held.len() <= cfg.max_held {
                    break;
                }
                let new_epoch = self.cursor.is_some_and(|(e, _)| first.0 > e && first.1 == 0);
                if !new_epoch {
                    self.counts.gaps_skipped += 1;
                }
            }
            let pts = self.held.remove(&first).unwrap_or_default();
            self.cursor = Some(first);
            self.join(pts, cfg);
            self.drain(who, cfg, out);
        }
    }

    /// A batch joins: late samples counted, the rest pending; the watermark moves.
    fn join(&mut self, pts: Vec<Pt>, cfg: &AnalyticsConfig) {
        let mut newest = i64::MIN;
        for p in pts {
            newest = newest.max(p.ts);
            if p.ts <= self.watermark {
                self.counts.late_samples += 1;
            } else {
                self.pending.push(p);
            }
        }
        if newest > self.frontier {
            self.frontier = newest;
            self.watermark = self.watermark.max(newest - cfg.reorder.as_millis() as i64);
        }
    }

    /// Processes pending samples up to the watermark, in time order, and closes windows.
    fn drain(&mut self, who: &Who<'_>, cfg: &AnalyticsConfig, out: &mut Output) {
        if self.pending.is_empty() {
            return;
        }
        self.pending.sort_by(|a, b| a.ts.cmp(&b.ts).then(a.kind.cmp(&b.kind)).then(a.value.total_cmp(&b.value)));
        let ready = self.pending.partition_point(|p| p.ts <= self.watermark);
        let rest = self.pending.split_off(ready);
        let ready = std::mem::replace(&mut self.pending, rest);
        let mut i = 0;
        while i < ready.len() {
            let ts = ready[i].ts;
            let mut j = i;
            while j < ready.len() && ready[j].ts == ts {
                j += 1;
            }
            self.frame(who, ts, &ready[i..j], cfg, out);
            i = j;
        }
        self.close(self.watermark, out);
    }

    /// Closes windows that end at or before `t`.
    fn close(&mut self, t: i64, out: &mut Output) {
        for (slot, (name, _)) in self.windows.iter_mut().zip(WINDOWS) {
            if slot.as_ref().is_some_and(|w| w.end() <= t)
                && let Some(w) = slot.take()
            {
                out.aggregates.push(w.row(name));
            }
        }
    }

    /// Readings that share one time.
    fn frame(&mut self, who: &Who<'_>, ts: i64, frame: &[Pt], cfg: &AnalyticsConfig, out: &mut Output) {
        self.close(ts, out);
        for (slot, (_, len)) in self.windows.iter_mut().zip(WINDOWS) {
            if slot.is_none() {
                *slot = Some(Window::new(ts.div_euclid(len) * len, len));
            }
        }
        let (mut lat, mut lon) = (None, None);
        let mut pressures: [Option<f64>; WHEELS] = [None; WHEELS];
        for p in frame {
            for w in self.windows.iter_mut().flatten() {
                w.samples += 1;
            }
            match p.kind {
                k if k == kind::LATITUDE.0 => lat = Some(p.value),
                k if k == kind::LONGITUDE.0 => lon = Some(p.value),
                k if k == kind::SPEED.0 => self.speed(who, ts, p.value, cfg, out),
                k if k == kind::FUEL_ABSOLUTE_LEVEL.0 => self.fuel_abs(who, ts, p.value, cfg, out),
                k if k == kind::FUEL_RELATIVE_LEVEL.0 => {
                    if let Some(prev) = self.track.fuel_rel
                        && p.value - prev >= cfg.refuel_percent
                    {
                        let detail = format!("tank level rose from {prev:.1} % to {:.1} %", p.value);
                        who.event(out, event::REFUEL, ts, ts, None, Some(p.value - prev), detail);
                    }
                    self.track.fuel_rel = Some(p.value);
                }
                k @ 32..=47 => {
                    let w = usize::from(k - 32) / 2;
                    if k % 2 == 0 {
                        pressures[w] = Some(p.value);
                    } else {
                        self.track.tires[w].temp = Some(p.value);
                    }
                }
                _ => {}
            }
        }
        if let (Some(lat), Some(lon)) = (lat, lon) {
            if let Some((t0, lat0, lon0)) = self.track.last_fix {
                let dt = ts - t0;
                let d = haversine_m(lat0, lon0, lat, lon);
                let moving = self.track.speed.is_some_and(|s| s >= 3.0);
                // Fixes while moving, not across long gaps, not implying > 300 km/h.
                if moving && dt > 0 && dt <= 5 * MINUTE_MS && d / (dt as f64 / 1000.0) <= 300.0 / 3.6 {
                    for w in self.windows.iter_mut().flatten() {
                        w.distance_m += d;
                    }
                }
            }
            self.track.last_fix = Some((ts, lat, lon));
        }
        if pressures.iter().any(Option::is_some) {
            self.tires(who, ts, &pressures, cfg, out);
        }
    }

    fn speed(&mut self, who: &Who<'_>, ts: i64, v: f64, cfg: &AnalyticsConfig, out: &mut Output) {
        for w in self.windows.iter_mut().flatten() {
            w.speed_n += 1;
            w.speed_sum += v;
            w.speed_max = w.speed_max.max(v);
        }
        let t = &mut self.track;
        t.speed = Some(v);
        if v >= 3.0 {
            t.parked_fuel.clear();
            t.theft_raised = false;
        }
        if v > cfg.speed_limit_kmh {
            let since = *t.over_since.get_or_insert(ts);
            if !t.over_raised && ts - since >= cfg.overspeed_hold.as_millis() as i64 {
                t.over_raised = true;
                let detail = format!("{v:.1} km/h, limit {:.0} km/h", cfg.speed_limit_kmh);
                who.event(out, event::OVERSPEED, since, ts, None, Some(v), detail);
            }
        } else if v <= cfg.speed_limit_kmh - 2.0 {
            t.over_since = None;
            t.over_raised = false;
        }
    }

    fn fuel_abs(&mut self, who: &Who<'_>, ts: i64, v: f64, cfg: &AnalyticsConfig, out: &mut Output) {
        let used = self.track.fuel_abs.map_or(0.0, |prev| (prev - v).max(0.0));
        for w in self.windows.iter_mut().flatten() {
            // Fuel used is counted between readings; the first reading only starts the count.
            if self.track.fuel_abs.is_some() {
                w.fuel_seen = true;
                w.fuel_used += used;
            }
        }
        self.track.fuel_abs = Some(v);
        let t = &mut self.track;
        let standing = t.speed.is_some_and(|s| s < 1.0);
        if !standing {
            return;
        }
        if t.parked_fuel.last().is_some_and(|(_, prev)| v > *prev) {
            // Refuelled while standing: a new baseline, and a new theft can be told.
            t.parked_fuel.clear();
            t.theft_raised = false;
        }
        let window = cfg.theft_window.as_millis() as i64;
        t.parked_fuel.retain(|(at, _)| ts - *at <= window);
        t.parked_fuel.push((ts, v));
        // The highest level within the window (the first of equals), and the fall since.
        let (since, base) = t.parked_fuel.iter().fold((ts, v), |m, p| if p.1 > m.1 { *p } else { m });
        if !t.theft_raised && base - v >= cfg.theft_litres {
            t.theft_raised = true;
            let minutes = (ts - since) as f64 / MINUTE_MS as f64;
            let detail = format!("{:.1} l left the tank in {minutes:.1} min while standing", base - v);
            who.event(out, event::FUEL_THEFT, since, ts, None, Some(base - v), detail);
        }
    }

    fn tires(
        &mut self,
        who: &Who<'_>,
        ts: i64,
        pressures: &[Option<f64>; WHEELS],
        cfg: &AnalyticsConfig,
        out: &mut Output,
    ) {
        // Update every tire first: each is compared with the others at this time.
        for (i, p) in pressures.iter().enumerate() {
            let Some(p) = *p else { continue };
            let tire = &mut self.track.tires[i];
            // Gauge pressure to 20 °C by the gas law on absolute pressure.
            let temp = tire.temp.unwrap_or(20.0);
            let comp = (p + ATMOSPHERE_KPA) * 293.15 / (temp + 273.15) - ATMOSPHERE_KPA;
            tire.comp = Some(comp);
            for w in self.windows.iter_mut().flatten() {
                w.tire_n += 1;
                w.tire_sum += p;
                w.tire_min = w.tire_min.min(p);
                w.tire_max = w.tire_max.max(p);
                w.leak[i].add((ts - w.start) as f64 / HOUR_MS as f64, comp);
            }
        }
        let window = cfg.leak_window.as_millis() as i64;
        for (i, p) in pressures.iter().enumerate() {
            let Some(p) = *p else { continue };
            let others: Vec<f64> = (0..WHEELS).filter(|j| *j != i).filter_map(|j| self.track.tires[j].comp).collect();
            let tire = &mut self.track.tires[i];
            let Some(comp) = tire.comp else { continue };
            tire.recent.retain(|(t, _)| ts - *t <= window);
            // At most LEAK_POINTS points over the window (the slope's cost is quadratic).
            if tire.recent.last().is_none_or(|(t, _)| ts - *t >= window / LEAK_POINTS as i64) {
                tire.recent.push((ts, comp));
            }
            let Some(mean) = (!others.is_empty()).then(|| others.iter().sum::<f64>() / others.len() as f64) else {
                continue;
            };
            if mean <= 0.0 {
                continue;
            }
            let ratio = comp / mean;
            let step = tire.ratio.filter(|(t, _)| ts - *t <= 10 * MINUTE_MS).map(|(_, r)| r - ratio);
            tire.ratio = Some((ts, ratio));
            if step.is_some_and(|d| d >= cfg.puncture_drop) && !tire.punctured {
                tire.punctured = true;
                let detail = format!("{p:.0} kPa, {:.0} % of the other tires", ratio * 100.0);
                who.event(out, event::PUNCTURE, ts, ts, Some(i), Some(p), detail);
            }
            if ratio < cfg.low_pressure_ratio && !tire.low {
                tire.low = true;
                let detail = format!("{p:.0} kPa, {:.0} % of the other tires", ratio * 100.0);
                who.event(out, event::LOW_PRESSURE, ts, ts, Some(i), Some(p), detail);
            } else if ratio >= cfg.low_pressure_ratio + 0.05 && tire.low {
                // Re-inflated.
                tire.low = false;
                tire.punctured = false;
                tire.leaking = false;
            }
            let span = tire.recent.last().map_or(0, |l| l.0) - tire.recent.first().map_or(0, |f| f.0);
            if !tire.leaking && !tire.punctured && tire.recent.len() >= 5 && span * 10 >= window * 6 {
                // Steps (punctures) are left to the puncture rule; a robust slope ignores them.
                let loss = theil_sen_per_h(&tire.recent).map(|s| -s);
                if let Some(loss) = loss
                    && loss >= cfg.leak_kpa_per_h
                {
                    tire.leaking = true;
                    let detail = format!("losing {loss:.0} kPa/h (temperature-compensated)");
                    // When it began is not known better than "within the window": dated at recognition.
                    who.event(out, event::SLOW_LEAK, ts, ts, Some(i), Some(loss), detail);
                }
            } else if tire.leaking
                && tire.recent.len() >= 5
                && theil_sen_per_h(&tire.recent).is_some_and(|s| -s < cfg.leak_kpa_per_h / 2.0)
            {
                tire.leaking = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(in_order.events[0].kind, event::OVERSPEED);
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
    fn theil_sen_ignores_a_single_step() {
        let mut pts: Vec<(i64, f64)> = (0..20).map(|i| (i * 30_000, 800.0)).collect();
        pts[19].1 = 740.0;
        assert_eq!(theil_sen_per_h(&pts), Some(0.0));
        let leak: Vec<(i64, f64)> = (0..20).map(|i| (i * 30_000, 800.0 - i as f64 * 0.75)).collect();
        assert!((theil_sen_per_h(&leak).unwrap() + 90.0).abs() < 1e-6);
    }

    #[test]
    fn haversine_matches_a_known_distance() {
        // Berlin TV tower to Brandenburg Gate, about 2.2 km.
        let d = haversine_m(52.520_8, 13.409_4, 52.516_3, 13.377_7);
        assert!((d - 2_207.0).abs() < 15.0, "{d}");
    }
}
