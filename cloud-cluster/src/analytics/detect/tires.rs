//! Tires: the windows' pressure figures and leak slope, and `puncture` (a large
//! drop against the vehicle's other tires between two readings), `low_pressure`
//! (well below the others) and `slow_leak` (temperature-compensated pressure
//! falling steadily, by a robust slope over the leak window).
//!
//! Pure: no I/O and no clock.

use crate::analytics::{
    ATMOSPHERE_KPA, AnalyticsConfig, DeviceAnalytics, EventKind, HOUR_MS, MINUTE_MS, Output, WHEELS, Who,
};

/// Most points the slow-leak slope is taken over.
const LEAK_POINTS: usize = 40;

impl DeviceAnalytics {
    pub(in crate::analytics) fn tires(
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
                who.event(out, EventKind::Puncture, ts, ts, Some(i), Some(p), detail);
            }
            if ratio < cfg.low_pressure_ratio && !tire.low {
                tire.low = true;
                let detail = format!("{p:.0} kPa, {:.0} % of the other tires", ratio * 100.0);
                who.event(out, EventKind::LowPressure, ts, ts, Some(i), Some(p), detail);
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
                    who.event(out, EventKind::SlowLeak, ts, ts, Some(i), Some(loss), detail);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theil_sen_ignores_a_single_step() {
        let mut pts: Vec<(i64, f64)> = (0..20).map(|i| (i * 30_000, 800.0)).collect();
        pts[19].1 = 740.0;
        assert_eq!(theil_sen_per_h(&pts), Some(0.0));
        let leak: Vec<(i64, f64)> = (0..20).map(|i| (i * 30_000, 800.0 - i as f64 * 0.75)).collect();
        assert!((theil_sen_per_h(&leak).unwrap_or(f64::NAN) + 90.0).abs() < 1e-6);
    }
}
