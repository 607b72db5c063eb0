//! Date math for the datasets' Hive partitions (`dt=YYYY-MM-DD/hour=HH`, UTC), both
//! ways: the hour a time falls in and its directory, and a directory's start.
//!
//! Pure: arithmetic on Unix milliseconds, proleptic Gregorian calendar.

pub use crate::analytics::HOUR_MS;

/// Milliseconds per day.
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// Hours since the Unix epoch; the partition key.
pub fn hour_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(HOUR_MS)
}

/// `dt=YYYY-MM-DD/hour=HH` of an hour since the epoch.
pub fn partition_dir(hour: i64) -> String {
    let days = hour.div_euclid(24);
    let (y, m, d) = civil_from_days(days);
    format!("dt={y:04}-{m:02}-{d:02}/hour={:02}", hour.rem_euclid(24))
}

/// Proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `dt=YYYY-MM-DD[/hour=HH]` → start, Unix ms.
pub fn partition_start(dir: &str) -> Option<i64> {
    let mut parts = dir.split('/');
    let date = parts.next()?.strip_prefix("dt=")?;
    let mut d = date.split('-');
    let (y, m, day): (i64, u32, u32) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let hour: i64 = match parts.next() {
        Some(h) => h.strip_prefix("hour=")?.parse().ok()?,
        None => 0,
    };
    Some(days_from_civil(y, m, day) * DAY_MS + hour * HOUR_MS)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_utc_dates_and_hours() {
        assert_eq!(partition_dir(0), "dt=1970-01-01/hour=00");
        // 2026-11-27T03:15:00Z
        assert_eq!(partition_dir(hour_of(1_795_749_300_000)), "dt=2026-11-27/hour=03");
        // 2024-02-29T23:59:59.999Z (leap day), and the millisecond after.
        assert_eq!(partition_dir(hour_of(1_709_251_199_999)), "dt=2024-02-29/hour=23");
        assert_eq!(partition_dir(hour_of(1_709_251_200_000)), "dt=2024-03-01/hour=00");
        assert_eq!(partition_dir(hour_of(-1)), "dt=1969-12-31/hour=23");
    }

    #[test]
    fn partition_names_give_their_start() {
        assert_eq!(partition_start("dt=1970-01-01/hour=00"), Some(0));
        assert_eq!(partition_start("dt=2026-11-27/hour=03"), Some(1_795_748_400_000));
        assert_eq!(partition_start("dt=2024-03-01"), Some(1_709_251_200_000));
        assert_eq!(partition_start("x=1"), None);
        for days in [-1000, 0, 19_000, 20_500] {
            let dir = partition_dir(days * 24);
            assert_eq!(partition_start(&dir), Some(days * DAY_MS), "{dir}");
        }
    }
}
