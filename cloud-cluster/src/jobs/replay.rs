//! `POST /deadletter/replay`: dead letters taken in again after a schema fix.
//!
//! Rows of the `deadletter` dataset that hold readings (`unknown_kind`: a raw
//! series; `not_in_schema`, `out_of_range`: one reading; `unknown_schema`: a whole
//! sealed batch, opened again and judged by the schema its id names now — every
//! reading must pass) are read back, sent to
//! their device's shard, and checked against the newest schema of the subject their
//! batch's schema id belongs to (the request's subject when the id is in several,
//! or for rows written before the id was recorded). What
//! now passes becomes `readings` rows; each dead letter is marked as replayed in
//! the device's state, which is committed together with the rows, so a replay run
//! twice, or interrupted and run again, stores each reading once. What still fails
//! stays where it is, for a later fix.

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::lake::reason;
use crate::lake::schema::col as c;
use crate::lake::store::Store;
use crate::registry::Registry;
use crate::shard::ShardDirectory;
use crate::shard::replay::{REPLAYABLE, ReplayItem, ReplayOutcome};

/// Most dead letters a replay holds in memory at once (it works through the
/// dataset in steps of about this many).
pub const REPLAY_STEP: usize = 50_000;

/// The files of the `deadletter` dataset.
pub async fn candidate_files(store: &Store) -> anyhow::Result<Vec<String>> {
    Ok(store.list("deadletter").await?.into_iter().filter(|p| p.ends_with(".parquet")).collect())
}

/// Appends the replayable dead letters of one file to `out`.
pub async fn read_file(store: &Store, path: &str, out: &mut Vec<ReplayItem>) -> anyhow::Result<()> {
    let Some(bytes) = store.get(path).await? else { return Ok(()) };
    for b in ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()? {
        collect(&b?, out).map_err(|e| e.context(path.to_string()))?;
    }
    Ok(())
}

/// Reads every replayable dead letter of the dataset (tests; the endpoint goes in steps).
pub async fn read_candidates(store: &Store) -> anyhow::Result<Vec<ReplayItem>> {
    let mut out = Vec::new();
    for path in candidate_files(store).await? {
        read_file(store, &path, &mut out).await?;
    }
    Ok(out)
}

fn collect(b: &RecordBatch, out: &mut Vec<ReplayItem>) -> anyhow::Result<()> {
    let col = |n: &str| b.column_by_name(n).ok_or_else(|| anyhow::anyhow!("no column {n}"));
    let reason = col(c::REASON)?.as_string::<i32>().clone();
    let fleet = col(c::FLEET)?.as_string::<i32>().clone();
    let device = col(c::DEVICE_ID)?.as_string::<i32>().clone();
    let epoch = col(c::EPOCH)?.as_primitive::<Int64Type>().clone();
    let seq = col(c::SEQ)?.as_primitive::<Int64Type>().clone();
    let ts = col(c::TS)?.as_primitive::<TimestampMillisecondType>().clone();
    let kind = col(c::KIND)?.as_primitive::<Int32Type>().clone();
    let gateway = col(c::GATEWAY_ID)?.as_string::<i32>().clone();
    let received = col(c::RECEIVED_AT)?.as_primitive::<TimestampMillisecondType>().clone();
    let raw = col(c::RAW)?.as_binary::<i32>().clone();
    let schema = b.column_by_name(c::SCHEMA_ID).map(|a| a.as_primitive::<Int32Type>().clone());
    for i in 0..b.num_rows() {
        let r = reason.value(i);
        if !REPLAYABLE.contains(&r) {
            continue;
        }
        // A whole batch (unknown_schema) has no kind.
        let no_kind = kind.is_null(i) && r != reason::UNKNOWN_SCHEMA;
        let unknown = [fleet.is_null(i), device.is_null(i), epoch.is_null(i), seq.is_null(i), no_kind];
        if unknown.iter().any(|n| *n) || ts.is_null(i) {
            continue;
        }
        out.push(ReplayItem {
            fleet: fleet.value(i).into(),
            device: device.value(i).into(),
            epoch: epoch.value(i) as u32,
            seq: seq.value(i) as u32,
            reason: r.into(),
            kind: if kind.is_null(i) { u16::MAX } else { kind.value(i) as u16 },
            ts_ms: ts.value(i),
            gateway: if gateway.is_null(i) { String::new() } else { gateway.value(i).into() },
            received_at_ms: if received.is_null(i) { ts.value(i) } else { received.value(i) },
            raw: raw.value(i).to_vec(),
            schema: schema.as_ref().filter(|s| !s.is_null(i)).map(|s| s.value(i) as u32),
        });
    }
    Ok(())
}

/// What a replay run did, over every shard.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ReplayReport {
    /// Subject judged by.
    pub subject: String,
    /// Summed over the shards.
    pub outcome: ReplayOutcome,
    /// Dead letters of devices whose shard this node does not own.
    pub not_owned_here: u64,
    /// Shards that could not take their part (down, or a failed commit).
    pub errors: Vec<String>,
}

impl ReplayReport {
    /// The report of a cluster from its members' reports on their own shards:
    /// each dead letter went to the one member owning its shard (or to none).
    pub fn merge(subject: String, reports: Vec<ReplayReport>, failed: Vec<String>) -> Self {
        let total = reports.first().map_or(0, |r| r.not_owned_here + r.outcome.candidates);
        let mut out = Self { subject, outcome: ReplayOutcome::default(), not_owned_here: 0, errors: failed };
        for r in reports {
            out.outcome += r.outcome;
            out.errors.extend(r.errors);
        }
        out.not_owned_here = total.saturating_sub(out.outcome.candidates);
        out
    }
}

/// Why a replay could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The subject has no schema to judge by.
    #[error("subject {0} has no schema")]
    NoSchema(String),
    /// The `deadletter` dataset could not be read.
    #[error("reading dead letters: {0:#}")]
    Lake(anyhow::Error),
}

/// Replays every dead letter that holds readings against the newest schema of
/// `subject`: works through the dataset in steps of about [`REPLAY_STEP`] dead
/// letters; each step's go to their shards, which commit before the next step.
pub async fn replay_all(
    store: &Store,
    registry: &Registry,
    shards: &ShardDirectory,
    subject: String,
) -> Result<ReplayReport, ReplayError> {
    if registry.latest(&subject).is_none() {
        return Err(ReplayError::NoSchema(subject));
    }
    let files = candidate_files(store).await.map_err(ReplayError::Lake)?;
    let mut report = ReplayReport { subject, outcome: ReplayOutcome::default(), not_owned_here: 0, errors: Vec::new() };
    let mut items = Vec::new();
    let mut files = files.into_iter().peekable();
    while let Some(path) = files.next() {
        read_file(store, &path, &mut items).await.map_err(ReplayError::Lake)?;
        if items.len() < REPLAY_STEP && files.peek().is_some() {
            continue;
        }
        let mut per_shard: Vec<Vec<ReplayItem>> = vec![Vec::new(); usize::from(shards.shard_count())];
        for item in items.drain(..) {
            let s = fleetline_wire::shard::shard_of(&item.fleet, &item.device, shards.shard_count()).0;
            per_shard[usize::from(s)].push(item);
        }
        let mut steps = Vec::new();
        for (s, items) in per_shard.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            match shards.get(s as u16) {
                Ok(shard) => {
                    let subject = report.subject.clone();
                    steps.push(async move { shard.replay(items, subject).await });
                }
                Err(_) => report.not_owned_here += items.len() as u64,
            }
        }
        for r in futures::future::join_all(steps).await {
            match r {
                Ok(o) => report.outcome += o,
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    Ok(report)
}
