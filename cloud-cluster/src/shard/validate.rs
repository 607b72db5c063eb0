//! Pure: whether one reading may be stored, judged by the clock-sanity limits and,
//! when a registry is in use, by the schema its batch names. No I/O, no clock:
//! the gateway's receipt time is the reference.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::lake::reason;
use crate::registry::model::{Schema, SignalDef};

/// Clock sanity: readings dated too far after their gateway received them, or
/// before a floor (units whose clocks read 1970), go to dead letters. Late data is
/// never refused: backlogs are normal.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Largest allowed `ts − received_at`.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Earliest allowed reading time (RFC 3339).
    #[serde(with = "humantime_serde")]
    pub epoch_floor: SystemTime,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_future_skew: Duration::from_secs(300),
            // 2020-01-01T00:00:00Z
            epoch_floor: UNIX_EPOCH + Duration::from_secs(1_577_836_800),
        }
    }
}

impl ValidationConfig {
    /// The floor in Unix ms.
    #[inline]
    pub fn floor_ms(&self) -> i64 {
        self.epoch_floor.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }

    /// The latest reading time accepted from an entry received at `received_at_ms`.
    #[inline]
    pub fn latest_ms(&self, received_at_ms: i64) -> i64 {
        received_at_ms.saturating_add(self.max_future_skew.as_millis() as i64)
    }

    /// Why a reading taken at `ts_ms`, received at `received_at_ms`, has an
    /// impossible time, if it has one.
    pub fn check_time(&self, ts_ms: i64, received_at_ms: i64) -> Result<(), Refusal> {
        self.window(received_at_ms).check(ts_ms)
    }

    /// The times accepted from one entry received at `received_at_ms` (worked out
    /// once per batch, checked per reading).
    #[inline]
    pub fn window(&self, received_at_ms: i64) -> TimeWindow {
        TimeWindow { received_at_ms, floor_ms: self.floor_ms(), latest_ms: self.latest_ms(received_at_ms) }
    }
}

/// The reading times one batch may hold.
#[derive(Clone, Copy, Debug)]
pub struct TimeWindow {
    received_at_ms: i64,
    floor_ms: i64,
    latest_ms: i64,
}

impl TimeWindow {
    /// Why a reading taken at `ts_ms` has an impossible time, if it has one.
    #[inline]
    pub fn check(&self, ts_ms: i64) -> Result<(), Refusal> {
        if ts_ms > self.latest_ms {
            let detail = format!("dated {} ms after its gateway received it", ts_ms - self.received_at_ms);
            return Err(Refusal { reason: reason::FUTURE_TIMESTAMP, detail });
        }
        if ts_ms < self.floor_ms {
            let detail = format!("dated {ts_ms} ms, before the epoch floor");
            return Err(Refusal { reason: reason::BEFORE_EPOCH_FLOOR, detail });
        }
        Ok(())
    }
}

/// Why a reading goes to dead letters: a reason from [`reason`] and a sentence.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// The dead-letter reason.
    pub reason: &'static str,
    /// What exactly is wrong.
    pub detail: String,
}

/// Whether `value` of signal `kind` fits schema `schema` (id `schema_id`): the
/// schema lists the kind, and the value lies within its range. Returns the
/// signal's definition.
#[inline]
pub fn check_value(schema: &Schema, schema_id: u16, kind: u16, value: f64) -> Result<&SignalDef, Refusal> {
    match schema.signal(kind) {
        None => {
            Err(Refusal { reason: reason::NOT_IN_SCHEMA, detail: format!("kind {kind} is not in schema {schema_id}") })
        }
        Some(def) if !def.accepts(value) => Err(Refusal {
            reason: reason::OUT_OF_RANGE,
            detail: format!("{} = {value} outside {}..{}", def.path, def.min, def.max),
        }),
        Some(def) => Ok(def),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_after_the_skew_or_before_the_floor_are_refused_late_ones_are_not() {
        let v = ValidationConfig::default();
        let received = 1_800_000_000_000;
        assert!(v.check_time(received, received).is_ok());
        assert!(v.check_time(received + 300_000, received).is_ok());
        assert_eq!(v.check_time(received + 300_001, received).unwrap_err().reason, reason::FUTURE_TIMESTAMP);
        // A week late is a backlog, not an error.
        assert!(v.check_time(received - 7 * 86_400_000, received).is_ok());
        assert_eq!(v.check_time(0, received).unwrap_err().reason, reason::BEFORE_EPOCH_FLOOR);
        assert!(v.check_time(v.floor_ms(), received).is_ok());
        // A receipt time near the end of time does not overflow.
        assert!(v.check_time(i64::MAX, i64::MAX).is_ok());
    }

    #[test]
    fn values_are_judged_by_the_batchs_schema() {
        let schema = Schema::signal_table();
        let speed = fleetline_wire::signals::kind::SPEED.0;
        assert!(check_value(&schema, 1, speed, 80.0).is_ok());
        assert_eq!(check_value(&schema, 1, speed, -5.0).unwrap_err().reason, reason::OUT_OF_RANGE);
        assert_eq!(check_value(&schema, 1, 0xFFF0, 1.0).unwrap_err().reason, reason::NOT_IN_SCHEMA);
        assert!(check_value(&schema, 1, speed, f64::NAN).is_err(), "NaN is in no range");
    }
}
