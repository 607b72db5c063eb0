//! Speed: the windows' speed figures and the `overspeed` detector (over the limit
//! for longer than the hold time, raised once per episode).
//!
//! Pure: no I/O and no clock.

use crate::analytics::{AnalyticsConfig, DeviceAnalytics, EventKind, Output, Who};

impl DeviceAnalytics {
    pub(in crate::analytics) fn speed(
        &mut self,
        who: &Who<'_>,
        ts: i64,
        v: f64,
        cfg: &AnalyticsConfig,
        out: &mut Output,
    ) {
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
                who.event(out, EventKind::Overspeed, since, ts, None, Some(v), detail);
            }
        } else if v <= cfg.speed_limit_kmh - 2.0 {
            t.over_since = None;
            t.over_raised = false;
        }
    }
}
