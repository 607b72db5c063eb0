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

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch};
use fleetline_wire::signals::WireType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::registry::SignalDef;
use crate::stats::reason;
use crate::store::Store;

/// Dead-letter reasons that hold readings a schema fix can make valid.
pub const REPLAYABLE: [&str; 4] =
    [reason::UNKNOWN_KIND, reason::NOT_IN_SCHEMA, reason::OUT_OF_RANGE, reason::UNKNOWN_SCHEMA];

/// One dead letter to take in again.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayItem {
    /// Fleet.
    pub fleet: String,
    /// Device.
    pub device: String,
    /// Boot epoch of its batch.
    pub epoch: u32,
    /// Seq of its batch.
    pub seq: u32,
    /// Why it was refused.
    pub reason: String,
    /// Reading kind.
    pub kind: u16,
    /// Reading time (one reading) or the batch's base time (a raw series).
    pub ts_ms: i64,
    /// Gateway that forwarded it.
    pub gateway: String,
    /// When that gateway received it.
    pub received_at_ms: i64,
    /// The raw series, or the value as f64 little-endian.
    pub raw: Vec<u8>,
    /// Schema id its batch named (absent in files written before it was recorded).
    pub schema: Option<u32>,
}

impl ReplayItem {
    /// What marks it as replayed in its device's state.
    pub fn key(&self) -> (u32, u32, u16, i64) {
        match self.reason.as_str() {
            reason::UNKNOWN_SCHEMA => (self.epoch, self.seq, u16::MAX, i64::MIN),
            reason::UNKNOWN_KIND => (self.epoch, self.seq, self.kind, i64::MIN),
            _ => (self.epoch, self.seq, self.kind, self.ts_ms),
        }
    }

    /// Its readings `(ts, value)` under `def`; `Err` when they do not decode.
    pub fn readings(&self, def: &SignalDef) -> Result<Vec<(i64, f64)>, String> {
        if self.reason == reason::UNKNOWN_KIND {
            let wire = match def.encoding.as_str() {
                "delta" => WireType::Delta,
                e => WireType::Cyclic {
                    modulus: e
                        .strip_prefix("cyclic/")
                        .and_then(|m| m.parse().ok())
                        .ok_or_else(|| format!("unknown encoding {e}"))?,
                },
            };
            let scale = 10f64.powi(i32::from(def.scale_exp));
            fleetline_wire::batch::series_samples(&self.raw, wire)
                .map(|s| {
                    let (t, raw) = s.map_err(|e| e.to_string())?;
                    Ok((self.ts_ms + t, raw as f64 * scale))
                })
                .collect()
        } else {
            let bytes: [u8; 8] = self.raw.as_slice().try_into().map_err(|_| "value is not 8 bytes".to_string())?;
            Ok(vec![(self.ts_ms, f64::from_le_bytes(bytes))])
        }
    }
}

/// What a replay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayOutcome {
    /// Dead letters read back that hold readings.
    pub candidates: u64,
    /// Taken in now.
    pub replayed: u64,
    /// Readings rows those added.
    pub readings: u64,
    /// Taken in by an earlier replay.
    pub already_replayed: u64,
    /// Still refused by the current schema (left for a later fix).
    pub still_invalid: u64,
}

impl std::ops::AddAssign for ReplayOutcome {
    fn add_assign(&mut self, o: Self) {
        self.candidates += o.candidates;
        self.replayed += o.replayed;
        self.readings += o.readings;
        self.already_replayed += o.already_replayed;
        self.still_invalid += o.still_invalid;
    }
}

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
        collect(&b?, out).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
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

fn collect(b: &RecordBatch, out: &mut Vec<ReplayItem>) -> Result<(), String> {
    let col = |n: &str| b.column_by_name(n).ok_or_else(|| format!("no column {n}"));
    let reason = col("reason")?.as_string::<i32>().clone();
    let fleet = col("fleet")?.as_string::<i32>().clone();
    let device = col("device_id")?.as_string::<i32>().clone();
    let epoch = col("epoch")?.as_primitive::<Int64Type>().clone();
    let seq = col("seq")?.as_primitive::<Int64Type>().clone();
    let ts = col("ts")?.as_primitive::<TimestampMillisecondType>().clone();
    let kind = col("kind")?.as_primitive::<Int32Type>().clone();
    let gateway = col("gateway_id")?.as_string::<i32>().clone();
    let received = col("received_at")?.as_primitive::<TimestampMillisecondType>().clone();
    let raw = col("raw")?.as_binary::<i32>().clone();
    let schema = b.column_by_name("schema_id").map(|c| c.as_primitive::<Int32Type>().clone());
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

/// A registered signal path as `&'static str` (the readings rows' signal column
/// holds static names). Each distinct path is kept once for the process's life:
/// bounded by what the registry holds.
pub fn intern(path: &str) -> &'static str {
    static PATHS: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Default::default);
    if let Some(s) = fleetline_wire::signals::spec_by_path(path) {
        return s.path;
    }
    let mut set = PATHS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = set.get(path) {
        return s;
    }
    let s: &'static str = Box::leak(path.to_string().into_boxed_str());
    set.insert(s);
    s
}
