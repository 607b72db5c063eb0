//! Fuel: fuel used per window, `fuel_theft` (the absolute level falling while the
//! vehicle stands, faster than an idling engine) and `refuel` (the relative level
//! rising).
//!
//! Pure: no I/O and no clock.

use crate::analytics::{AnalyticsConfig, DeviceAnalytics, EventKind, MINUTE_MS, Output, Who};

impl DeviceAnalytics {
    pub(in crate::analytics) fn fuel_abs(
        &mut self,
        who: &Who<'_>,
        ts: i64,
        v: f64,
        cfg: &AnalyticsConfig,
        out: &mut Output,
    ) {
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
            who.event(out, EventKind::FuelTheft, since, ts, None, Some(base - v), detail);
        }
    }

    /// A relative tank level: a rise of `refuel_percent` points or more is a refuel.
    pub(in crate::analytics) fn fuel_rel(
        &mut self,
        who: &Who<'_>,
        ts: i64,
        v: f64,
        cfg: &AnalyticsConfig,
        out: &mut Output,
    ) {
        if let Some(prev) = self.track.fuel_rel
            && v - prev >= cfg.refuel_percent
        {
            let detail = format!("tank level rose from {prev:.1} % to {v:.1} %");
            who.event(out, EventKind::Refuel, ts, ts, None, Some(v - prev), detail);
        }
        self.track.fuel_rel = Some(v);
    }
}
