//! The rule the chart's KEDA `ScaledObject` applies, run against cloud nodes the
//! simulator starts as processes:
//!
//! `desired = clamp(max(schedule(t), ceil(backlog / target_per_pod)), min, max)`
//!
//! where `schedule(t)` is the highest replica count of the follow-the-sun windows
//! open at `t` in their own time zones (KEDA's `cron` triggers) and `backlog` is
//! the cluster's backlog (`GET /scaling/load?scope=cluster`, KEDA's
//! `metrics-api` trigger). As the HPA behind KEDA does, a scale-up is applied at
//! once; a scale-down only to the highest recommendation of the stabilization
//! window, one node per step period, and each one is a drain.

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A follow-the-sun window: `HH:MM-HH:MM@Area/City=N`, N nodes while the local
/// time in that zone is inside the window (a window may wrap past midnight).
#[derive(Clone, Debug)]
pub struct Window {
    /// Start, minutes after local midnight.
    pub start_min: u32,
    /// End (exclusive), minutes after local midnight.
    pub end_min: u32,
    /// IANA time zone.
    pub zone: jiff::tz::TimeZone,
    /// Its name, as given.
    pub zone_name: String,
    /// Nodes while open.
    pub replicas: usize,
}

fn hhmm(s: &str) -> Result<u32, String> {
    let (h, m) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected HH:MM"))?;
    let (h, m): (u32, u32) =
        (h.parse().map_err(|_| format!("{s:?}: bad hour"))?, m.parse().map_err(|_| format!("{s:?}: bad minute"))?);
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(format!("{s:?} is not a time of day"));
    }
    Ok(h * 60 + m)
}

impl FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("schedule window {s:?}: {why} (e.g. 08:00-20:00@Europe/Berlin=3)");
        let (times, rest) = s.split_once('@').ok_or_else(|| bad("missing @zone"))?;
        let (zone_name, n) = rest.split_once('=').ok_or_else(|| bad("missing =nodes"))?;
        let (a, b) = times.split_once('-').ok_or_else(|| bad("expected START-END"))?;
        let (start_min, end_min) = (hhmm(a).map_err(|e| bad(&e))?, hhmm(b).map_err(|e| bad(&e))?);
        if start_min == end_min {
            return Err(bad("an empty window"));
        }
        let zone = jiff::tz::TimeZone::get(zone_name).map_err(|e| bad(&format!("unknown time zone: {e}")))?;
        let replicas = n.parse().map_err(|_| bad("nodes must be a number"))?;
        Ok(Self { start_min, end_min, zone, zone_name: zone_name.to_string(), replicas })
    }
}

impl std::fmt::Display for Window {
    /// As parsed: `HH:MM-HH:MM@Area/City=N`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = (self.start_min, self.end_min);
        write!(f, "{:02}:{:02}-{:02}:{:02}@{}={}", a / 60, a % 60, b / 60, b % 60, self.zone_name, self.replicas)
    }
}

impl Window {
    /// Whether the window is open at Unix milliseconds `unix_ms`.
    pub fn open_at(&self, unix_ms: i64) -> bool {
        let Ok(ts) = jiff::Timestamp::from_millisecond(unix_ms) else { return false };
        let local = ts.to_zoned(self.zone.clone());
        let m = local.hour() as u32 * 60 + local.minute() as u32;
        if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&m)
        } else {
            m >= self.start_min || m < self.end_min
        }
    }
}

/// The rule's settings.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Fewest nodes.
    pub min: usize,
    /// Most nodes.
    pub max: usize,
    /// Records per second one node is meant to take.
    pub target_rate: f64,
    /// Backlog bytes one node is meant to carry.
    pub target_per_pod: u64,
    /// The oldest uncommitted record's wait the cluster aims under.
    pub target_wait: Duration,
    /// Follow-the-sun windows.
    pub schedule: Vec<Window>,
    /// A scale-down goes only to the highest recommendation of this long.
    pub stabilization: Duration,
    /// At most one node is removed per this long.
    pub scale_down_every: Duration,
}

impl Rule {
    /// `schedule(t)`: the most nodes any open window asks for (0: none open).
    pub fn scheduled(&self, unix_ms: i64) -> usize {
        self.schedule.iter().filter(|w| w.open_at(unix_ms)).map(|w| w.replicas).max().unwrap_or(0)
    }

    /// `ceil(rate / target_rate)`.
    pub fn for_rate(&self, rate: f64) -> usize {
        (rate.max(0.0) / self.target_rate.max(1.0)).ceil() as usize
    }

    /// `ceil(backlog / target_per_pod)`.
    pub fn for_backlog(&self, backlog: u64) -> usize {
        backlog.div_ceil(self.target_per_pod.max(1)) as usize
    }

    /// `ceil(current · wait / target_wait)`.
    pub fn for_wait(&self, current: usize, wait: Duration) -> usize {
        let target = self.target_wait.as_secs_f64().max(0.001);
        (current as f64 * wait.as_secs_f64() / target).ceil() as usize
    }
}

/// The cluster's load as the rule reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Records taken per second.
    pub rate: f64,
    /// Bytes taken and not committed.
    pub backlog: u64,
    /// The oldest of them's wait.
    pub wait: Duration,
}

/// One decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The schedule's nodes now.
    pub scheduled: usize,
    /// The rate's nodes now.
    pub for_rate: usize,
    /// The backlog's nodes now.
    pub for_backlog: usize,
    /// The wait's nodes now.
    pub for_wait: usize,
    /// The rule's recommendation now, bounded.
    pub recommended: usize,
    /// What to run: the recommendation, held up by the stabilization window and
    /// the scale-down pace.
    pub target: usize,
}

/// The rule with its memory (the stabilization window, the last scale-down).
#[derive(Debug)]
pub struct Scaler {
    rule: Rule,
    recent: VecDeque<(Instant, usize)>,
    last_down: Option<Instant>,
}

impl Scaler {
    /// A scaler applying `rule`.
    pub fn new(rule: Rule) -> Self {
        Self { rule, recent: VecDeque::new(), last_down: None }
    }

    /// The rule.
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// Decides at `now` with `current` nodes running and the cluster's load,
    /// on the clock the fleet lives on (`unix_ms`, for the schedule).
    pub fn decide(&mut self, now: Instant, current: usize, load: Load, unix_ms: i64) -> Decision {
        let r = &self.rule;
        let scheduled = r.scheduled(unix_ms);
        let for_rate = r.for_rate(load.rate);
        let for_backlog = r.for_backlog(load.backlog);
        let for_wait = r.for_wait(current, load.wait);
        let recommended = scheduled.max(for_rate).max(for_backlog).max(for_wait).clamp(r.min, r.max);
        self.recent.push_back((now, recommended));
        while self.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > r.stabilization) {
            self.recent.pop_front();
        }
        let stable = self.recent.iter().map(|(_, n)| *n).max().unwrap_or(recommended);
        let target = if stable >= current {
            stable
        } else if self.last_down.is_none_or(|t| now.duration_since(t) >= r.scale_down_every) {
            self.last_down = Some(now);
            current - 1
        } else {
            current
        };
        Decision { scheduled, for_rate, for_backlog, for_wait, recommended, target: target.clamp(r.min, r.max) }
    }
}

/// A point of the autoscaler's timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Seconds since the run started.
    pub t: f64,
    /// The fleet's clock then (RFC 3339, UTC).
    pub fleet_time: String,
    /// Nodes running (not draining) before the decision.
    pub nodes: usize,
    /// Records the cluster took per second (averaged over the nodes' last seconds).
    pub rate: f64,
    /// The cluster's backlog, bytes (taken, not committed; averaged the same way).
    pub backlog_bytes: u64,
    /// The same in records of open segments.
    pub backlog_records: u64,
    /// The oldest uncommitted record's wait, seconds.
    pub oldest_s: f64,
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
}

/// What the autoscaler did over a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AutoscaleReport {
    /// Bounds and target, as run.
    pub min: usize,
    /// Most nodes.
    pub max: usize,
    /// Records per second per node aimed at.
    pub target_rate: f64,
    /// Backlog bytes per node aimed at.
    pub target_per_pod: u64,
    /// The oldest wait aimed under, seconds.
    pub target_wait_s: f64,
    /// The windows, as given.
    pub schedule: Vec<String>,
    /// Node counts reached, in order (each change once: `[1, 2, 3, 2, 1]`).
    pub node_counts: Vec<usize>,
    /// The most nodes run at once.
    pub peak_nodes: usize,
    /// Each scale step: when, from, to, why.
    pub steps: Vec<String>,
    /// Readings of the signals and decisions, one per poll.
    pub timeline: Vec<Point>,
    /// Polls whose backlog could not be read (no live node answered).
    pub unread_polls: u64,
}

impl AutoscaleReport {
    /// An empty report of a run under `rule`.
    pub fn for_rule(rule: &Rule) -> Self {
        Self {
            min: rule.min,
            max: rule.max,
            target_rate: rule.target_rate,
            target_per_pod: rule.target_per_pod,
            target_wait_s: rule.target_wait.as_secs_f64(),
            schedule: rule.schedule.iter().map(Window::to_string).collect(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
    use super::*;

    fn rule(schedule: &[&str]) -> Rule {
        Rule {
            min: 1,
            max: 4,
            target_rate: 500.0,
            target_per_pod: 1000,
            target_wait: Duration::from_secs(5),
            schedule: schedule.iter().map(|s| s.parse().unwrap()).collect(),
            stabilization: Duration::from_secs(10),
            scale_down_every: Duration::from_secs(5),
        }
    }

    impl Load {
        fn backlog(backlog: u64) -> Self {
            Self { backlog, ..Self::default() }
        }
    }

    fn ms(rfc3339: &str) -> i64 {
        rfc3339.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn windows_open_in_their_own_time_zone() {
        let r = rule(&["08:00-20:00@Europe/Berlin=3", "07:00-19:00@America/Chicago=2"]);
        // 07:30 UTC in January: 08:30 in Berlin (UTC+1), 01:30 in Chicago.
        assert_eq!(r.scheduled(ms("2026-01-15T07:30:00Z")), 3);
        // 06:30 UTC in July: 08:30 in Berlin (summer time, UTC+2).
        assert_eq!(r.scheduled(ms("2026-07-15T06:30:00Z")), 3);
        // 19:30 UTC in January: 20:30 Berlin (closed), 13:30 Chicago (open).
        assert_eq!(r.scheduled(ms("2026-01-15T19:30:00Z")), 2);
        // 03:00 UTC: both closed.
        assert_eq!(r.scheduled(ms("2026-01-15T03:00:00Z")), 0);
        // The highest open window wins where they overlap: 14:00 UTC.
        assert_eq!(r.scheduled(ms("2026-01-15T14:00:00Z")), 3);
        // A night shift wraps past midnight.
        let night = rule(&["22:00-06:00@Asia/Tokyo=2"]);
        assert_eq!(night.scheduled(ms("2026-01-15T14:00:00Z")), 2, "23:00 in Tokyo");
        assert_eq!(night.scheduled(ms("2026-01-15T20:00:00Z")), 2, "05:00 in Tokyo");
        assert_eq!(night.scheduled(ms("2026-01-15T22:00:00Z")), 0, "07:00 in Tokyo");
    }

    #[test]
    fn a_window_prints_as_it_is_written() {
        for w in ["08:00-20:00@Europe/Berlin=3", "22:00-06:00@Asia/Tokyo=2", "00:00-24:00@UTC=1"] {
            assert_eq!(w.parse::<Window>().unwrap().to_string(), w);
        }
    }

    #[test]
    fn bad_windows_are_refused_with_the_reason() {
        for (s, why) in [
            ("08:00-20:00@Mars/Olympus=3", "unknown time zone"),
            ("08:00-20:00=3", "missing @zone"),
            ("08:00-20:00@Europe/Berlin", "missing =nodes"),
            ("25:00-20:00@Europe/Berlin=3", "not a time of day"),
            ("08:00-08:00@Europe/Berlin=3", "empty window"),
            ("08:00-20:00@Europe/Berlin=x", "must be a number"),
        ] {
            let e = s.parse::<Window>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn the_backlog_asks_for_ceil_backlog_over_target_within_bounds() {
        let r = rule(&[]);
        assert_eq!(r.for_backlog(0), 0);
        assert_eq!(r.for_backlog(1000), 1);
        assert_eq!(r.for_backlog(1001), 2);
        let mut s = Scaler::new(r);
        let t = Instant::now();
        assert_eq!(s.decide(t, 1, Load::backlog(0), 0).target, 1, "never below min");
        assert_eq!(s.decide(t, 1, Load::backlog(99_000), 0).target, 4, "never above max, and up at once");
    }

    #[test]
    fn scale_up_is_at_once_and_scale_down_waits_and_steps_one_at_a_time() {
        let mut s = Scaler::new(rule(&[]));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(s.decide(at(0), 1, Load::backlog(2500), 0).target, 3);
        // The surge is over, but the window still remembers 3.
        assert_eq!(s.decide(at(1), 3, Load::backlog(100), 0).target, 3);
        assert_eq!(s.decide(at(10), 3, Load::backlog(100), 0).target, 3);
        // Past the window: one node down, then the pace holds the next one back.
        let d = s.decide(at(12), 3, Load::backlog(100), 0);
        assert_eq!((d.recommended, d.target), (1, 2));
        assert_eq!(s.decide(at(14), 2, Load::backlog(100), 0).target, 2);
        assert_eq!(s.decide(at(17), 2, Load::backlog(100), 0).target, 1);
        // A new surge goes up at once again, pace or not.
        assert_eq!(s.decide(at(18), 1, Load::backlog(3900), 0).target, 4);
    }

    #[test]
    fn a_long_wait_asks_for_more_nodes_in_proportion() {
        let r = rule(&[]);
        assert_eq!(r.for_wait(2, Duration::from_secs(5)), 2, "at the target: as many as now");
        assert_eq!(r.for_wait(2, Duration::from_secs(12)), 5);
        assert_eq!(r.for_wait(3, Duration::from_millis(900)), 1);
        let mut s = Scaler::new(r);
        let d = s.decide(Instant::now(), 1, Load { wait: Duration::from_secs(11), ..Load::default() }, 0);
        assert_eq!((d.for_backlog, d.for_wait, d.target), (0, 3, 3));
    }

    #[test]
    fn the_rate_asks_for_ceil_rate_over_target() {
        let r = rule(&[]);
        assert_eq!((r.for_rate(0.0), r.for_rate(500.0), r.for_rate(501.0), r.for_rate(1400.0)), (0, 1, 2, 3));
        let mut s = Scaler::new(r);
        let d = s.decide(Instant::now(), 1, Load { rate: 1200.0, backlog: 10, wait: Duration::from_secs(1) }, 0);
        assert_eq!((d.for_rate, d.for_backlog, d.for_wait, d.target), (3, 1, 1, 3));
    }

    #[test]
    fn the_schedule_and_the_backlog_take_the_higher() {
        let mut s = Scaler::new(rule(&["00:00-24:00@UTC=2"]));
        let t = Instant::now();
        let d = s.decide(t, 1, Load::backlog(0), 0);
        assert_eq!((d.scheduled, d.for_backlog, d.target), (2, 0, 2));
        let d = s.decide(t, 2, Load::backlog(3500), 0);
        assert_eq!((d.scheduled, d.for_backlog, d.target), (2, 4, 4));
    }
}
