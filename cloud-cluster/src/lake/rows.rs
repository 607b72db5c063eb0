//! Rows of the `readings`, `deadletter`, `aggregates`, `events` and
//! `predictions` datasets, and their Parquet encoding.
//!
//! Rows are buffered per Hive partition (`dt=YYYY-MM-DD/hour=HH`, UTC): readings
//! by the reading's own time, aggregates and predictions by their window's start, events by when
//! their condition began, dead letters by the time they were stored. A commit
//! writes one zstd Parquet file per dataset and partition it touched.
//!
//! Pure: rows in memory and their encoding to bytes; storing them is the commit's job.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::TimestampMillisecondBuilder;
use arrow_array::builder::{BinaryBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::partition::{hour_of, partition_dir};
use super::schema::{AGGREGATES_SCHEMA, DEADLETTER_SCHEMA, EVENTS_SCHEMA, PREDICTIONS_SCHEMA, READINGS_SCHEMA};
use crate::analytics::{AggregateRow, Event};

/// Strings shared by every row of one batch.
#[derive(Clone, Debug)]
pub struct BatchMeta {
    /// Fleet id.
    pub fleet: Arc<str>,
    /// Device id.
    pub device: Arc<str>,
    /// Boot epoch.
    pub epoch: u32,
    /// Seq.
    pub seq: u32,
    /// Gateway the batch came through.
    pub gateway: Arc<str>,
    /// When that gateway received it, Unix ms.
    pub received_at_ms: i64,
}

/// One sample.
#[derive(Clone, Debug)]
struct Reading {
    meta: Arc<BatchMeta>,
    ts_ms: i64,
    signal: &'static str,
    value: f64,
}

/// One dead letter.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Why (a fixed reason word).
    pub reason: &'static str,
    /// More about why.
    pub detail: String,
    /// Fleet, when known.
    pub fleet: Option<String>,
    /// Device, when known.
    pub device: Option<String>,
    /// Epoch, when known.
    pub epoch: Option<u32>,
    /// Seq, when known.
    pub seq: Option<u32>,
    /// The batch's base time, when known (a raw series' times are relative to it).
    pub ts_ms: Option<i64>,
    /// Reading kind, for unknown kinds.
    pub kind: Option<u16>,
    /// Schema id the batch named, when known.
    pub schema: Option<u16>,
    /// Gateway, when known.
    pub gateway: Option<String>,
    /// Bundle id, when known.
    pub bundle_id: Option<u64>,
    /// Gateway receive time, when known.
    pub received_at_ms: Option<i64>,
    /// The bytes: a sealed batch, a raw series, or a whole bundle.
    pub raw: Vec<u8>,
}

impl DeadLetter {
    /// A dead letter knowing nothing of its sender yet.
    pub fn new(reason: &'static str, detail: String, raw: Vec<u8>) -> Self {
        Self {
            reason,
            detail,
            fleet: None,
            device: None,
            epoch: None,
            seq: None,
            ts_ms: None,
            kind: None,
            schema: None,
            gateway: None,
            bundle_id: None,
            received_at_ms: None,
            raw,
        }
    }
}

/// An aggregate row with its vehicle.
#[derive(Clone, Debug)]
struct Aggregate {
    fleet: Arc<str>,
    device: Arc<str>,
    row: AggregateRow,
}

/// One row of `predictions`: a model's answer for a vehicle's closed window.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Fleet.
    pub fleet: Arc<str>,
    /// Device.
    pub device: Arc<str>,
    /// Window start, Unix ms.
    pub window_start: i64,
    /// Window end, Unix ms.
    pub window_end: i64,
    /// Model name.
    pub model: &'static str,
    /// Version that made it.
    pub version: u32,
    /// Variant label, or `shadow`.
    pub variant: Arc<str>,
    /// Risk (classifier) or value (regressor), in the model's unit.
    pub score: f32,
    /// Hash of the feature row it was made from.
    pub feature_hash: u64,
}

/// Rows waiting for the next commit, by partition.
#[derive(Debug, Default)]
pub struct Rows {
    readings: BTreeMap<i64, Vec<Reading>>,
    aggregates: BTreeMap<i64, Vec<Aggregate>>,
    events: BTreeMap<i64, Vec<Event>>,
    predictions: BTreeMap<i64, Vec<Prediction>>,
    deadletter: Vec<DeadLetter>,
    readings_len: usize,
    len: usize,
}

impl Rows {
    /// Adds one sample.
    pub fn push_reading(&mut self, meta: &Arc<BatchMeta>, ts_ms: i64, signal: &'static str, value: f64) {
        self.readings.entry(hour_of(ts_ms)).or_default().push(Reading { meta: meta.clone(), ts_ms, signal, value });
        self.len += 1;
        self.readings_len += 1;
    }

    /// Adds one closed window of a vehicle.
    pub fn push_aggregate(&mut self, fleet: &Arc<str>, device: &Arc<str>, row: AggregateRow) {
        let a = Aggregate { fleet: fleet.clone(), device: device.clone(), row };
        self.aggregates.entry(hour_of(a.row.start)).or_default().push(a);
        self.len += 1;
    }

    /// Adds one event.
    pub fn push_event(&mut self, e: Event) {
        self.events.entry(hour_of(e.ts_ms)).or_default().push(e);
        self.len += 1;
    }

    /// Adds one prediction.
    pub fn push_prediction(&mut self, p: Prediction) {
        self.predictions.entry(hour_of(p.window_start)).or_default().push(p);
        self.len += 1;
    }

    /// Predictions held.
    pub fn predictions(&self) -> impl Iterator<Item = &Prediction> {
        self.predictions.values().flatten()
    }

    /// Readings rows held.
    pub fn readings(&self) -> usize {
        self.readings_len
    }

    /// Events held, in the order they were detected per partition.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.values().flatten()
    }

    /// Adds one dead letter.
    pub fn push_deadletter(&mut self, d: DeadLetter) {
        self.deadletter.push(d);
        self.len += 1;
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Dead letters held.
    pub fn deadletters(&self) -> usize {
        self.deadletter.len()
    }

    /// Encodes everything as Parquet files: (dataset-relative file dir, bytes, rows).
    /// `stored_at_ms` is the commit time written into every row; `written_by` goes
    /// into each file's key-value metadata under [`WRITTEN_BY`].
    pub fn encode(
        &self,
        stored_at_ms: i64,
        written_by: &WrittenBy,
    ) -> Result<Vec<EncodedFile>, parquet::errors::ParquetError> {
        let stamp = serde_json::to_string(written_by).unwrap_or_default();
        let write_parquet = |batch: &RecordBatch| write_parquet_stamped(batch, Some(&stamp));
        let mut out = Vec::new();
        for (hour, rows) in &self.readings {
            let batch = readings_batch(rows, stored_at_ms)?;
            out.push(EncodedFile {
                dataset: "readings",
                partition: partition_dir(*hour),
                rows: rows.len(),
                bytes: write_parquet(&batch)?,
            });
        }
        for (hour, rows) in &self.aggregates {
            out.push(EncodedFile {
                dataset: "aggregates",
                partition: partition_dir(*hour),
                rows: rows.len(),
                bytes: write_parquet(&aggregates_batch(rows, stored_at_ms)?)?,
            });
        }
        for (hour, rows) in &self.events {
            out.push(EncodedFile {
                dataset: "events",
                partition: partition_dir(*hour),
                rows: rows.len(),
                bytes: write_parquet(&events_batch(rows, stored_at_ms)?)?,
            });
        }
        for (hour, rows) in &self.predictions {
            out.push(EncodedFile {
                dataset: "predictions",
                partition: partition_dir(*hour),
                rows: rows.len(),
                bytes: write_parquet(&predictions_batch(rows, stored_at_ms)?)?,
            });
        }
        if !self.deadletter.is_empty() {
            let batch = deadletter_batch(&self.deadletter, stored_at_ms)?;
            out.push(EncodedFile {
                dataset: "deadletter",
                partition: partition_dir(hour_of(stored_at_ms)),
                rows: self.deadletter.len(),
                bytes: write_parquet(&batch)?,
            });
        }
        Ok(out)
    }
}

/// One Parquet file of a commit.
#[derive(Debug)]
pub struct EncodedFile {
    /// `readings`, `aggregates`, `events`, `deadletter` or `predictions`.
    pub dataset: &'static str,
    /// `dt=…/hour=…`.
    pub partition: String,
    /// Rows in it.
    pub rows: usize,
    /// The file.
    pub bytes: Vec<u8>,
}

fn readings_batch(rows: &[Reading], stored_at_ms: i64) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let mut fleet = StringBuilder::with_capacity(n, n * 8);
    let mut device = StringBuilder::with_capacity(n, n * 12);
    let mut epoch = Int64Builder::with_capacity(n);
    let mut seq = Int64Builder::with_capacity(n);
    let mut ts = TimestampMillisecondBuilder::with_capacity(n);
    let mut signal = StringBuilder::with_capacity(n, n * 40);
    let mut value = Float64Builder::with_capacity(n);
    let mut gateway = StringBuilder::with_capacity(n, n * 8);
    let mut received = TimestampMillisecondBuilder::with_capacity(n);
    for r in rows {
        fleet.append_value(&*r.meta.fleet);
        device.append_value(&*r.meta.device);
        epoch.append_value(i64::from(r.meta.epoch));
        seq.append_value(i64::from(r.meta.seq));
        ts.append_value(r.ts_ms);
        signal.append_value(r.signal);
        value.append_value(r.value);
        gateway.append_value(&*r.meta.gateway);
        received.append_value(r.meta.received_at_ms);
    }
    let stored = arrow_array::TimestampMillisecondArray::from_value(stored_at_ms, n).with_timezone("UTC");
    let columns: Vec<ArrayRef> = vec![
        Arc::new(fleet.finish()),
        Arc::new(device.finish()),
        Arc::new(epoch.finish()),
        Arc::new(seq.finish()),
        Arc::new(ts.finish().with_timezone("UTC")),
        Arc::new(signal.finish()),
        Arc::new(value.finish()),
        Arc::new(gateway.finish()),
        Arc::new(received.finish().with_timezone("UTC")),
        Arc::new(stored),
    ];
    RecordBatch::try_new(READINGS_SCHEMA.clone(), columns)
}

fn aggregates_batch(rows: &[Aggregate], stored_at_ms: i64) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let strings = |f: &dyn Fn(&Aggregate) -> &str| -> ArrayRef {
        Arc::new(arrow_array::StringArray::from_iter_values(rows.iter().map(f)))
    };
    let times = |f: &dyn Fn(&Aggregate) -> i64| -> ArrayRef {
        Arc::new(arrow_array::TimestampMillisecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"))
    };
    let floats = |f: &dyn Fn(&AggregateRow) -> Option<f64>| -> ArrayRef {
        Arc::new(arrow_array::Float64Array::from_iter(rows.iter().map(|a| f(&a.row))))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|a| &a.fleet),
        strings(&|a| &a.device),
        strings(&|a| a.row.window),
        times(&|a| a.row.start),
        times(&|a| a.row.end),
        Arc::new(arrow_array::Int64Array::from_iter_values(rows.iter().map(|a| a.row.samples as i64))),
        floats(&|r| Some(r.distance_m)),
        Arc::new(arrow_array::Int64Array::from_iter_values(rows.iter().map(|a| a.row.speed_readings as i64))),
        floats(&|r| r.avg_speed_kmh),
        floats(&|r| r.max_speed_kmh),
        floats(&|r| r.fuel_used_l),
        floats(&|r| r.fuel_l_per_100km),
        Arc::new(arrow_array::Int64Array::from_iter_values(rows.iter().map(|a| a.row.tire_readings as i64))),
        floats(&|r| r.tire_pressure_min_kpa),
        floats(&|r| r.tire_pressure_mean_kpa),
        floats(&|r| r.tire_pressure_max_kpa),
        floats(&|r| r.leak_rate_kpa_h),
        Arc::new(arrow_array::TimestampMillisecondArray::from_value(stored_at_ms, n).with_timezone("UTC")),
    ];
    RecordBatch::try_new(AGGREGATES_SCHEMA.clone(), columns)
}

fn events_batch(rows: &[Event], stored_at_ms: i64) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let strings = |f: &dyn Fn(&Event) -> &str| -> ArrayRef {
        Arc::new(arrow_array::StringArray::from_iter_values(rows.iter().map(f)))
    };
    let times = |f: &dyn Fn(&Event) -> i64| -> ArrayRef {
        Arc::new(arrow_array::TimestampMillisecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|e| &e.id),
        strings(&|e| &e.fleet),
        strings(&|e| &e.device),
        strings(&|e| e.kind.as_str()),
        times(&|e| e.ts_ms),
        times(&|e| e.detected_ms),
        Arc::new(arrow_array::StringArray::from_iter(rows.iter().map(|e| e.wheel.as_deref()))),
        Arc::new(arrow_array::Float64Array::from_iter(rows.iter().map(|e| e.value))),
        strings(&|e| &e.detail),
        Arc::new(arrow_array::TimestampMillisecondArray::from_value(stored_at_ms, n).with_timezone("UTC")),
    ];
    RecordBatch::try_new(EVENTS_SCHEMA.clone(), columns)
}

fn predictions_batch(rows: &[Prediction], stored_at_ms: i64) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let strings = |f: &dyn Fn(&Prediction) -> &str| -> ArrayRef {
        Arc::new(arrow_array::StringArray::from_iter_values(rows.iter().map(f)))
    };
    let times = |f: &dyn Fn(&Prediction) -> i64| -> ArrayRef {
        Arc::new(arrow_array::TimestampMillisecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|p| &p.fleet),
        strings(&|p| &p.device),
        times(&|p| p.window_start),
        times(&|p| p.window_end),
        strings(&|p| p.model),
        Arc::new(arrow_array::Int64Array::from_iter_values(rows.iter().map(|p| i64::from(p.version)))),
        strings(&|p| &p.variant),
        Arc::new(arrow_array::Float64Array::from_iter_values(rows.iter().map(|p| f64::from(p.score)))),
        Arc::new(arrow_array::StringArray::from_iter_values(rows.iter().map(|p| format!("{:016x}", p.feature_hash)))),
        Arc::new(arrow_array::TimestampMillisecondArray::from_value(stored_at_ms, n).with_timezone("UTC")),
    ];
    RecordBatch::try_new(PREDICTIONS_SCHEMA.clone(), columns)
}

fn deadletter_batch(rows: &[DeadLetter], stored_at_ms: i64) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let mut reason = StringBuilder::new();
    let mut detail = StringBuilder::new();
    let mut fleet = StringBuilder::new();
    let mut device = StringBuilder::new();
    let mut epoch = Int64Builder::with_capacity(n);
    let mut seq = Int64Builder::with_capacity(n);
    let mut ts = TimestampMillisecondBuilder::with_capacity(n);
    let mut kind = Int32Builder::with_capacity(n);
    let mut gateway = StringBuilder::new();
    let mut bundle = Int64Builder::with_capacity(n);
    let mut received = TimestampMillisecondBuilder::with_capacity(n);
    let mut raw = BinaryBuilder::new();
    let mut schema = Int32Builder::with_capacity(n);
    for d in rows {
        schema.append_option(d.schema.map(i32::from));
        reason.append_value(d.reason);
        detail.append_value(&d.detail);
        fleet.append_option(d.fleet.as_deref());
        device.append_option(d.device.as_deref());
        epoch.append_option(d.epoch.map(i64::from));
        seq.append_option(d.seq.map(i64::from));
        ts.append_option(d.ts_ms);
        kind.append_option(d.kind.map(i32::from));
        gateway.append_option(d.gateway.as_deref());
        bundle.append_option(d.bundle_id.map(|b| b as i64));
        received.append_option(d.received_at_ms);
        raw.append_value(&d.raw);
    }
    let stored = arrow_array::TimestampMillisecondArray::from_value(stored_at_ms, n).with_timezone("UTC");
    let columns: Vec<ArrayRef> = vec![
        Arc::new(reason.finish()),
        Arc::new(detail.finish()),
        Arc::new(fleet.finish()),
        Arc::new(device.finish()),
        Arc::new(epoch.finish()),
        Arc::new(seq.finish()),
        Arc::new(ts.finish().with_timezone("UTC")),
        Arc::new(kind.finish()),
        Arc::new(gateway.finish()),
        Arc::new(bundle.finish()),
        Arc::new(received.finish().with_timezone("UTC")),
        Arc::new(stored),
        Arc::new(raw.finish()),
        Arc::new(schema.finish()),
    ];
    RecordBatch::try_new(DEADLETTER_SCHEMA.clone(), columns)
}

/// Writer settings of every dataset file: zstd, statistics, one row group per file
/// up to a million rows.
pub fn writer_properties() -> WriterProperties {
    properties(None)
}

fn properties(stamp: Option<&str>) -> WriterProperties {
    let kv = stamp.map(|s| vec![parquet::file::metadata::KeyValue::new(WRITTEN_BY.to_string(), s.to_string())]);
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(1 << 20))
        .set_created_by("fleetline-cloud".into())
        .set_key_value_metadata(kv)
        .build()
}

/// The key of a shard file's Parquet key-value metadata naming its writer.
pub const WRITTEN_BY: &str = "fleetline.written_by";

/// Who wrote a shard's file: which generation, under which claim of the shard's
/// head (see `shard::head`). Lets a checker prove from the files alone that each
/// generation had one writer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrittenBy {
    /// Node id.
    pub node: String,
    /// Shard.
    pub shard: u16,
    /// Generation.
    pub generation: u64,
    /// Claim number.
    pub claim: u64,
    /// Lease epoch (0 without leases).
    pub epoch: u64,
}

/// One record batch as a whole Parquet file in memory.
pub fn write_parquet(batch: &RecordBatch) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    write_parquet_stamped(batch, None)
}

/// [`write_parquet`] with a [`WRITTEN_BY`] stamp.
fn write_parquet_stamped(batch: &RecordBatch, stamp: Option<&str>) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let mut buf = Vec::with_capacity(batch.num_rows() * 4 + 4096);
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(properties(stamp)))?;
    w.write(batch)?;
    w.close()?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::partition::HOUR_MS;

    #[test]
    fn encodes_readings_and_deadletters_as_parquet() {
        let meta = Arc::new(BatchMeta {
            fleet: "f".into(),
            device: "d".into(),
            epoch: 1,
            seq: 2,
            gateway: "gw-1".into(),
            received_at_ms: 5,
        });
        let mut rows = Rows::default();
        rows.push_reading(&meta, 1_000, "Vehicle.Speed", 42.5);
        rows.push_reading(&meta, HOUR_MS + 1, "Vehicle.Speed", 43.0);
        rows.push_deadletter(DeadLetter {
            gateway: Some("gw-1".into()),
            bundle_id: Some(7),
            ..DeadLetter::new("auth_failed", "x".into(), vec![1, 2, 3])
        });
        let by = WrittenBy { node: "n".into(), shard: 0, generation: 1, claim: 2, epoch: 0 };
        let files = rows.encode(10, &by).unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(files[0].partition, "dt=1970-01-01/hour=00");
        assert_eq!(files[1].partition, "dt=1970-01-01/hour=01");
        assert_eq!((files[2].dataset, files[2].rows), ("deadletter", 1));
        for f in &files {
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(
                f.bytes.clone(),
            ))
            .unwrap()
            .build()
            .unwrap();
            let n: usize = reader.map(|b| b.unwrap().num_rows()).sum();
            assert_eq!(n, f.rows);
        }
    }
}
