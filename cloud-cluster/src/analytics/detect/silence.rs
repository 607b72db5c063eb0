//! Silence: a unit is `silent` when its gateway, as this shard hears it, has
//! received other units' data for `analytics.silent_after` since it last received
//! this one's (the one judgement made on a gateway's clock, not event time).
//!
//! Pure: no I/O and no clock; the gateway's receipt times come in.

use crate::analytics::{AnalyticsConfig, DeviceAnalytics, EventKind, Output, Who, event_id};

impl DeviceAnalytics {
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
                EventKind::Silent,
                ts,
                counted_from_ms + after,
                None,
                None,
                format!("its gateway heard others but not this unit for {} s", after / 1000),
            );
            // One silence, one id: keyed by the receipt it began after (the unit's
            // last reading may be the same across two silences).
            if let Some(e) = out.events.last_mut() {
                e.id = event_id(who.fleet, who.device, EventKind::Silent, None, last_received_ms);
            }
        }
    }
}
