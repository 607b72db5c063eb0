//! The run's report: what was sent, acknowledged and stored, read back from the
//! `readings` dataset itself.

use fleetline_cloud::analytics::EventKind;
use fleetline_cloud::lake::schema::col as c;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMillisecondType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

#[cfg(test)]
mod cluster_tests {
    use super::*;

    fn at(t_ms: u64, owners: &[Option<&str>], unowned: usize) -> OwnersAt {
        OwnersAt { t_ms, owners: owners.iter().map(|o| o.map(str::to_string)).collect(), unowned }
    }

    #[test]
    fn changes_are_measured_from_the_polls() {
        let polls = vec![
            at(0, &[Some("a"), Some("b")], 0),
            at(1000, &[Some("a"), Some("b")], 1),
            at(1500, &[Some("a"), None], 1),
            at(2500, &[Some("a"), Some("a")], 0),
            at(5000, &[Some("c"), Some("a")], 0),
        ];
        let c = cluster_changes(&polls, &[("kill b".into(), 1000), ("add c".into(), 4000)], 9000);
        assert_eq!(c[0].owned_again_ms, Some(1500));
        assert_eq!((c[0].shards_moved, c[0].settled_ms, c[0].unowned_max), (1, 1500, 1));
        assert_eq!((c[1].owned_again_ms, c[1].shards_moved, c[1].settled_ms), (Some(0), 1, 1000));
        let c = cluster_changes(&polls[..3], &[("kill b".into(), 1000)], 9000);
        assert_eq!(c[0].owned_again_ms, None, "never recovered");
    }
}

/// p50 / p99 / max of a latency, milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: i64,
    /// 99th percentile.
    pub p99: i64,
    /// Largest.
    pub max: i64,
}

impl Latency {
    /// Percentiles of `v`.
    pub fn of(mut v: Vec<i64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Self { p50: at(0.5), p99: at(0.99), max: v[v.len() - 1] }
    }
}

/// What the dataset holds, read back.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    /// Rows.
    pub rows: u64,
    /// Distinct (device_id, epoch, seq, signal, ts).
    pub distinct: u64,
    /// Distinct rows per batch (device_id, epoch, seq).
    pub per_batch: HashMap<(String, u32, u32), u64>,
    /// stored_at − ts.
    pub e2e: Latency,
    /// stored_at − received_at.
    pub ingest: Latency,
    /// Files read.
    pub files: usize,
    /// End-to-end latencies by the Unix second of their commit.
    pub latency_by_second: BTreeMap<i64, Vec<i64>>,
}

pub(crate) fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            parquet_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads every file under `readings` (what a reader globbing the dataset sees);
/// `to_wall` maps a reading time to the wall-clock instant it was taken.
pub fn read_readings(readings: &Path, to_wall: &dyn Fn(i64) -> i64) -> anyhow::Result<Stored> {
    let mut files = Vec::new();
    parquet_files(readings, &mut files)?;
    let mut seen: HashSet<(String, u32, u32, String, i64)> = HashSet::new();
    let mut s = Stored { files: files.len(), ..Default::default() };
    let mut ingest = Vec::new();
    for f in &files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f)?)?.build()?;
        for b in reader {
            let b = b?;
            let col = |n: &str| b.column_by_name(n).ok_or_else(|| anyhow::anyhow!("{} has no column {n}", f.display()));
            let dev = col(c::DEVICE_ID)?.as_string::<i32>().clone();
            let epoch = col(c::EPOCH)?.as_primitive::<Int64Type>().clone();
            let seq = col(c::SEQ)?.as_primitive::<Int64Type>().clone();
            let signal = col(c::SIGNAL)?.as_string::<i32>().clone();
            let ts = col(c::TS)?.as_primitive::<TimestampMillisecondType>().clone();
            let recv = col(c::RECEIVED_AT)?.as_primitive::<TimestampMillisecondType>().clone();
            let stored = col(c::STORED_AT)?.as_primitive::<TimestampMillisecondType>().clone();
            for i in 0..b.num_rows() {
                s.rows += 1;
                let key = (dev.value(i).to_string(), epoch.value(i) as u32, seq.value(i) as u32);
                if seen.insert((key.0.clone(), key.1, key.2, signal.value(i).to_string(), ts.value(i))) {
                    *s.per_batch.entry(key).or_default() += 1;
                }
                s.latency_by_second
                    .entry(stored.value(i).div_euclid(1000))
                    .or_default()
                    .push(stored.value(i) - to_wall(ts.value(i)));
                ingest.push(stored.value(i) - recv.value(i));
            }
        }
    }
    s.distinct = seen.len() as u64;
    s.e2e = Latency::of(s.latency_by_second.values().flatten().copied().collect());
    s.ingest = Latency::of(ingest);
    Ok(s)
}

/// One row of the cloud's `events` dataset, as the scoring needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Detected {
    /// Device id.
    pub device: String,
    /// Event kind.
    pub kind: String,
    /// When the condition began (unit clock), Unix ms.
    pub ts_ms: i64,
    /// Event time at which it was recognized, Unix ms.
    pub detected_ms: i64,
    /// Wheel name (`row1.left` …) for tire events.
    pub wheel: Option<String>,
}

/// Reads every row of an `events` dataset directory (none yet: empty).
pub fn read_events(events: &Path) -> anyhow::Result<Vec<Detected>> {
    let mut files = Vec::new();
    if events.exists() {
        parquet_files(events, &mut files)?;
    }
    let mut out = Vec::new();
    for f in &files {
        for b in ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f)?)?.build()? {
            let b = b?;
            let col = |n: &str| b.column_by_name(n).ok_or_else(|| anyhow::anyhow!("{} has no column {n}", f.display()));
            let dev = col(c::DEVICE_ID)?.as_string::<i32>().clone();
            let kind = col(c::KIND)?.as_string::<i32>().clone();
            let wheel = col(c::WHEEL)?.as_string::<i32>().clone();
            let ts = col(c::TS)?.as_primitive::<TimestampMillisecondType>().clone();
            let detected = col(c::DETECTED_TS)?.as_primitive::<TimestampMillisecondType>().clone();
            for i in 0..b.num_rows() {
                out.push(Detected {
                    device: dev.value(i).to_string(),
                    kind: kind.value(i).to_string(),
                    ts_ms: ts.value(i),
                    detected_ms: detected.value(i),
                    wheel: (!wheel.is_null(i)).then(|| wheel.value(i).to_string()),
                });
            }
        }
    }
    Ok(out)
}

/// An injected incident, as the scoring needs it.
#[derive(Clone, Debug)]
pub struct Injected {
    /// Device id.
    pub device: String,
    /// Incident kind, named as the cloud names events.
    pub kind: &'static str,
    /// Wheel name for tire incidents.
    pub wheel: Option<String>,
    /// Start and end, Unix ms of simulated time.
    pub start_ms: i64,
    /// End.
    pub end_ms: i64,
    /// Whether the run was long enough after its start for it to be detectable.
    pub matures: bool,
}

/// How far outside an incident's time an event still counts as finding it
/// (readings come every 10 to 30 s; detectors need a few).
pub const MATCH_SLACK_MS: i64 = 120_000;

/// Precision and recall per kind. An event finds an incident of its kind on the same
/// vehicle (and wheel) when it begins within the incident's time, give or take
/// [`MATCH_SLACK_MS`]; `low_pressure` has no incident of its own and finds a
/// puncture or slow leak of its wheel (it has a precision, no recall).
pub fn score(detected: &[Detected], injected: &[Injected], kinds: &[&str]) -> BTreeMap<String, EventScore> {
    let matches = |d: &Detected, i: &Injected| {
        let tire = [EventKind::Puncture.as_str(), EventKind::SlowLeak.as_str()];
        let kind_ok = d.kind == i.kind || (d.kind == EventKind::LowPressure.as_str() && tire.contains(&i.kind));
        kind_ok
            && d.device == i.device
            && (i.wheel.is_none() || d.wheel == i.wheel)
            && d.ts_ms >= i.start_ms - MATCH_SLACK_MS
            && d.ts_ms <= i.end_ms.max(i.start_ms + 1000) + MATCH_SLACK_MS
    };
    let mut out = BTreeMap::new();
    for kind in kinds.iter().copied().chain([EventKind::LowPressure.as_str()]) {
        let ds: Vec<&Detected> = detected.iter().filter(|d| d.kind == kind).collect();
        let all: Vec<&Injected> = injected.iter().filter(|i| i.kind == kind).collect();
        // Recall is over the incidents that could be seen within the run; one that
        // started too late is counted apart, and found only as a bonus.
        let is: Vec<&Injected> = all.iter().copied().filter(|i| i.matures).collect();
        let true_pos = ds.iter().filter(|d| injected.iter().any(|i| matches(d, i))).count();
        let found = is.iter().filter(|i| ds.iter().any(|d| matches(d, i))).count();
        out.insert(
            kind.to_string(),
            EventScore {
                expected: is.len() as u64,
                unmatured: (all.len() - is.len()) as u64,
                detected: Some(ds.len() as u64),
                precision: (!ds.is_empty()).then(|| true_pos as f64 / ds.len() as f64),
                recall: (kind != EventKind::LowPressure.as_str() && !is.is_empty())
                    .then(|| found as f64 / is.len() as f64),
            },
        );
    }
    out
}

/// Expected and detected events of one kind, scored against the ground truth.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EventScore {
    /// Injected (ground truth) early enough in the run to be detectable: recall is over these.
    pub expected: u64,
    /// Injected too late in the run for the detectors to see them: listed, not scored.
    pub unmatured: u64,
    /// Detected by the cloud.
    pub detected: Option<u64>,
    /// Of the detected, the share that were real.
    pub precision: Option<f64>,
    /// Of the real, the share detected.
    pub recall: Option<f64>,
}

/// The report (JSON).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Vehicles simulated.
    pub vehicles: usize,
    /// Wall-clock seconds of generation.
    pub duration_s: f64,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Seed.
    pub seed: u64,
    /// Readings the units took into batches.
    pub samples_sent: u64,
    /// Samples in batches the gateway acked to their device.
    pub samples_acked: u64,
    /// Distinct (device_id, epoch, seq, signal, ts) rows of `readings`.
    pub samples_stored: u64,
    /// Acked samples neither in `readings` nor in the gateway's queue when it
    /// stopped: lost.
    pub samples_lost: u64,
    /// Acked samples not in `readings` but still in the gateway's queue when the
    /// drain ended (the drain timed out): not lost, not delivered either.
    pub samples_still_queued: u64,
    /// Rows beyond the distinct ones.
    pub samples_duplicated: u64,
    /// Samples stored per wall second of the run (generation and drain).
    pub throughput_samples_per_s: f64,
    /// stored_at − ts.
    pub e2e_latency_ms: Latency,
    /// stored_at − received_at (gateway).
    pub ingest_latency_ms: Latency,
    /// Per incident kind: injected, and detection scores once the cloud detects events.
    pub events: BTreeMap<String, EventScore>,
    /// A glob DuckDB reads.
    pub readings_parquet_glob: String,
    /// Chaos actions done, with their times.
    pub chaos: Vec<String>,
    /// Readings the units refused (back-pressure) or found invalid.
    pub samples_refused: u64,
    /// Parquet files read back.
    pub parquet_files: usize,
    /// Units' MQTT sessions established.
    pub unit_connects: u64,
    /// Units' connection failures and drops.
    pub unit_connection_errors: u64,
    /// Units' re-sends after a timeout or reconnect.
    pub unit_resends: u64,
    /// Where the run's data lives.
    pub data_dir: String,
    /// A cluster of cloud nodes: what its membership changes did to shard ownership,
    /// and the check of every shard's generations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterReport>,
    /// With `--autoscale`: node counts over time, each scale step and why, and
    /// the signals read at every poll.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::autoscale::AutoscaleReport>,
    /// The models' predictions against the ground truth, per model and variant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<crate::predictions::ModelsReport>,
}

impl Report {
    /// Whether everything acked reached `readings`, once (and, for a cluster,
    /// every shard was owned again after every change, with one writer per
    /// generation).
    pub fn ok(&self) -> bool {
        self.models.as_ref().is_none_or(crate::predictions::ModelsReport::ok)
            && self.samples_lost == 0
            && self.samples_still_queued == 0
            && self.samples_duplicated == 0
            && self.samples_acked > 0
            && self.cluster.as_ref().is_none_or(ClusterReport::ok)
    }
}

/// Every shard's owner at one poll of the heads, and whether all are live nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnersAt {
    /// Seconds from the start of the run.
    pub t_ms: u64,
    /// Owner per shard (`None`: released or never claimed).
    pub owners: Vec<Option<String>>,
    /// Shards whose owner is not a live node at that moment.
    pub unowned: usize,
}

/// What one cluster change did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ClusterChange {
    /// The chaos action.
    pub action: String,
    /// When, seconds from the start.
    pub at_s: f64,
    /// Most shards without a live owner at once after it.
    pub unowned_max: usize,
    /// From the action until every shard had a live owner again (0: none lost
    /// one); `None`: not before the next action or the end.
    pub owned_again_ms: Option<u64>,
    /// From the action to the last ownership change it caused (rebalancing done).
    pub settled_ms: u64,
    /// Shards that changed owner (node to node).
    pub shards_moved: u64,
}

/// The cluster part of a report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterReport {
    /// Nodes at the start.
    pub nodes: usize,
    /// Per change.
    pub changes: Vec<ClusterChange>,
    /// Over the changes that took a node away: median time until every shard had a live owner again.
    pub owned_again_ms_p50: Option<u64>,
    /// … and the longest.
    pub owned_again_ms_max: Option<u64>,
    /// Shards that changed owner over the whole run.
    pub shard_moves: u64,
    /// The generation check: published files read.
    pub files_checked: usize,
    /// … (shard, generation) pairs.
    pub generations_checked: usize,
    /// … claims.
    pub claims_checked: usize,
    /// … what it found wrong (empty: one writer per generation, no fork).
    pub generation_violations: Vec<String>,
}

impl ClusterReport {
    /// Every change recovered, and the generations are sound.
    pub fn ok(&self) -> bool {
        self.generation_violations.is_empty() && self.changes.iter().all(|c| c.owned_again_ms.is_some())
    }
}

/// What each change did, from the polls of the heads (`polls`, in time order,
/// recorded whenever something changed) and the actions (name, ms from start).
pub fn cluster_changes(polls: &[OwnersAt], actions: &[(String, u64)], end_ms: u64) -> Vec<ClusterChange> {
    let mut out = Vec::new();
    for (i, (action, at)) in actions.iter().enumerate() {
        let until = actions.get(i + 1).map_or(end_ms, |(_, t)| *t);
        let before = polls.iter().rev().find(|p| p.t_ms < *at);
        let window: Vec<&OwnersAt> = polls.iter().filter(|p| p.t_ms >= *at && p.t_ms < until).collect();
        let mut change = ClusterChange {
            action: action.clone(),
            at_s: *at as f64 / 1000.0,
            unowned_max: window.iter().map(|p| p.unowned).max().unwrap_or(0),
            ..Default::default()
        };
        change.owned_again_ms = match window.iter().position(|p| p.unowned > 0) {
            None => Some(0),
            Some(lost) => window[lost..].iter().find(|p| p.unowned == 0).map(|p| p.t_ms - at),
        };
        let mut last: Vec<Option<String>> = before.map(|p| p.owners.clone()).unwrap_or_default();
        for p in &window {
            last.resize(p.owners.len(), None);
            let mut changed = false;
            for (s, o) in p.owners.iter().enumerate() {
                if o.is_some() && *o != last[s] {
                    if last[s].is_some() {
                        change.shards_moved += 1;
                    }
                    last[s] = o.clone();
                    changed = true;
                }
            }
            if changed {
                change.settled_ms = p.t_ms - at;
            }
        }
        out.push(change);
    }
    out
}

type Batches = HashMap<(String, u32, u32), u64>;

/// Samples of acked batches missing from `readings`, per batch.
fn missing<'a>(acked: &'a Batches, stored: &'a Stored) -> impl Iterator<Item = (&'a (String, u32, u32), u64)> + 'a {
    acked
        .iter()
        .map(|(k, n)| (k, n.saturating_sub(stored.per_batch.get(k).copied().unwrap_or(0))))
        .filter(|(_, m)| *m > 0)
}

/// Samples of acked batches missing from `readings` and not held in the gateway's queue.
pub fn lost(acked: &Batches, stored: &Stored, queued: &Batches) -> u64 {
    missing(acked, stored).filter(|(k, _)| !queued.contains_key(*k)).map(|(_, m)| m).sum()
}

/// Samples of acked batches missing from `readings` that the gateway still held.
pub fn missing_but_queued(acked: &Batches, stored: &Stored, queued: &Batches) -> u64 {
    missing(acked, stored).filter(|(k, _)| queued.contains_key(*k)).map(|(_, m)| m).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let l = Latency::of((1..=100).collect());
        assert_eq!((l.p50, l.p99, l.max), (51, 99, 100));
        assert_eq!(Latency::of(vec![]).max, 0);
    }

    fn incident(kind: &'static str, device: &str, start_ms: i64, matures: bool) -> Injected {
        Injected { device: device.into(), kind, wheel: None, start_ms, end_ms: start_ms + 60_000, matures }
    }

    #[test]
    fn an_incident_too_late_to_mature_is_listed_but_not_scored_as_a_miss() {
        let injected = [incident("overspeed", "v-1", 0, true), incident("overspeed", "v-2", 0, false)];
        let detected = [Detected {
            device: "v-1".into(),
            kind: "overspeed".into(),
            wheel: None,
            ts_ms: 10_000,
            detected_ms: 10_000,
        }];
        let s = &score(&detected, &injected, &["overspeed"])["overspeed"];
        assert_eq!((s.expected, s.unmatured, s.detected), (1, 1, Some(1)));
        assert_eq!(s.recall, Some(1.0));
        assert_eq!(s.precision, Some(1.0));
        // A matured incident that is missed still counts against recall.
        let s = &score(&[], &injected, &["overspeed"])["overspeed"];
        assert_eq!(s.recall, Some(0.0));
        // Only unmatured ones: no recall to speak of, not a zero.
        let s = &score(&[], &injected[1..], &["overspeed"])["overspeed"];
        assert_eq!((s.expected, s.unmatured, s.recall), (0, 1, None));
    }
}
