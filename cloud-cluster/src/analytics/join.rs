//! The event-time join: a device's batches join its prefix in (epoch, seq)
//! order, the watermark follows the prefix, and readings up to the watermark are
//! processed frame by frame (all readings of one time) — windows first, then the
//! detectors (see the module docs of [`super`]).
//!
//! Pure: no I/O and no clock.

use std::collections::BTreeMap;

use fleetline_wire::signals::SignalKind;
use fleetline_wire::signals::kind::{self, TireQuantity};
use serde::{Deserialize, Serialize};

use super::detect::Track;
use super::windows::{WINDOWS, Window, haversine_m};
use super::{AnalyticsConfig, Counts, MINUTE_MS, Output, Pt, WHEELS, Who};

/// One device's analytics state; lives in the shard's checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceAnalytics {
    cursor: Option<(u32, u32)>,
    held: BTreeMap<(u32, u32), Vec<Pt>>,
    frontier: i64,
    watermark: i64,
    pending: Vec<Pt>,
    pub(super) windows: [Option<Window>; 2],
    pub(super) track: Track,
    /// Gateway receipt time of the batch that made the unit silent, while it is.
    pub(super) silent_since: Option<i64>,
    /// Newest reading time of any batch taken (held or not).
    pub(super) newest: i64,
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
                k if k == kind::FUEL_RELATIVE_LEVEL.0 => self.fuel_rel(who, ts, p.value, cfg, out),
                k => match kind::tire_of(SignalKind(k)) {
                    Some((w, TireQuantity::Pressure)) => pressures[w] = Some(p.value),
                    Some((w, TireQuantity::Temperature)) => self.track.tires[w].temp = Some(p.value),
                    None => {}
                },
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
}
