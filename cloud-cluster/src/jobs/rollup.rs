//! The rollup job: derived datasets written beside the ones the shards write,
//! never rewriting those.
//!
//! - `readings_hourly/dt=…/hour=…/readings.parquet`: one compacted copy of each
//!   closed `readings` hour (the hour ended `rollup.grace` ago): every row of the
//!   hour's many small commit files in one file, rows sorted by fleet, device, time
//!   and signal.
//! - `vehicle_daily/dt=…/vehicle_daily.parquet`: per vehicle per closed UTC day,
//!   from the day's 1-hour `aggregates` and its `events`: distance, fuel, speeds,
//!   tire pressure extremes, events by kind.
//!
//! Idempotent: each output records a fingerprint of the source files it was made
//! from (`_fleetline/rollup/state.json`); a run skips outputs whose sources are
//! unchanged, so running again changes nothing. Late data (a backlog landing in a
//! closed hour) adds source files: the next run writes that output again, whole,
//! replacing it in one put. A crash between an output and the state leaves the
//! output to be written again with the same content. In single-node mode the job
//! runs inside the node; a cluster runs it on one node at a time (a singleton).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use fleetline_wire::shard::fnv1a64;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::analytics::EventKind;
use crate::lake::partition::{DAY_MS, HOUR_MS, partition_start};
use crate::lake::rows::writer_properties;
use crate::lake::schema::READINGS_SCHEMA;
use crate::lake::schema::col as c;
use crate::lake::store::Store;

/// Rollup settings (`[rollup]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RollupConfig {
    /// Run the job in this node.
    pub enabled: bool,
    /// How often it runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long after an hour (a day) ends before it counts as closed.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for RollupConfig {
    fn default() -> Self {
        Self { enabled: true, interval: Duration::from_secs(300), grace: Duration::from_secs(3600) }
    }
}

const STATE: &str = "_fleetline/rollup/state.json";

/// What one run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RollupReport {
    /// Hourly copies written (new, or sources changed).
    pub hours_written: u64,
    /// Closed hours whose copy was up to date.
    pub hours_unchanged: u64,
    /// Daily rollups written.
    pub days_written: u64,
    /// Closed days whose rollup was up to date.
    pub days_unchanged: u64,
    /// Rows written.
    pub rows_written: u64,
}

/// Fingerprints of the sources of every output.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    format: u16,
    outputs: BTreeMap<String, String>,
}

/// Files of a dataset by partition directory (`dt=…/hour=…`).
async fn partitions(store: &Store, dataset: &str) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in store.list(dataset).await? {
        if !path.ends_with(".parquet") {
            continue;
        }
        if let Some((dir, _)) = path.strip_prefix(&format!("{dataset}/")).and_then(|p| p.rsplit_once('/')) {
            out.entry(dir.to_string()).or_default().push(path);
        }
    }
    for files in out.values_mut() {
        files.sort();
    }
    Ok(out)
}

fn fingerprint(files: &[String]) -> String {
    format!("{:016x}", fnv1a64(files.join("\n").as_bytes()))
}

async fn read_all(store: &Store, files: &[String]) -> anyhow::Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for f in files {
        let Some(bytes) = store.get(f).await? else { anyhow::bail!("{f} vanished while rolling up") };
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()? {
            out.push(b?);
        }
    }
    Ok(out)
}

fn encode(schema: SchemaRef, batches: &[RecordBatch]) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, Some(writer_properties()))?;
    for b in batches {
        w.write(b)?;
    }
    w.close()?;
    Ok(buf)
}

/// One hour's rows, sorted by fleet, device, time, signal (then the rest, for a
/// total order: the output depends only on the rows, not on file order).
fn compact_hour(batches: &[RecordBatch]) -> anyhow::Result<RecordBatch> {
    let all = arrow_select::concat::concat_batches(&READINGS_SCHEMA, batches)?;
    let col = |c: &str| all.column_by_name(c).ok_or_else(|| anyhow::anyhow!("readings without {c}"));
    let (fleet, dev, signal) =
        (col(c::FLEET)?.as_string::<i32>(), col(c::DEVICE_ID)?.as_string::<i32>(), col(c::SIGNAL)?.as_string::<i32>());
    let ts = col(c::TS)?.as_primitive::<TimestampMillisecondType>();
    let (epoch, seq) = (col(c::EPOCH)?.as_primitive::<Int64Type>(), col(c::SEQ)?.as_primitive::<Int64Type>());
    let value = col(c::VALUE)?.as_primitive::<Float64Type>();
    let stored = col(c::STORED_AT)?.as_primitive::<TimestampMillisecondType>();
    let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        (fleet.value(a), dev.value(a), ts.value(a), signal.value(a), epoch.value(a), seq.value(a))
            .cmp(&(fleet.value(b), dev.value(b), ts.value(b), signal.value(b), epoch.value(b), seq.value(b)))
            .then(value.value(a).total_cmp(&value.value(b)))
            .then(stored.value(a).cmp(&stored.value(b)))
    });
    let idx = arrow_array::UInt32Array::from(order);
    let sorted: Vec<ArrayRef> =
        all.columns().iter().map(|c| arrow_select::take::take(c.as_ref(), &idx, None)).collect::<Result<_, _>>()?;
    Ok(RecordBatch::try_new(READINGS_SCHEMA.clone(), sorted)?)
}

/// Schema of `vehicle_daily`.
pub fn daily_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("fleet", DataType::Utf8, false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("day", DataType::Date32, false),
        Field::new("hours", DataType::Int64, false),
        Field::new("samples", DataType::Int64, false),
        Field::new("distance_km", DataType::Float64, false),
        Field::new("avg_speed_kmh", DataType::Float64, true),
        Field::new("max_speed_kmh", DataType::Float64, true),
        Field::new("fuel_used_l", DataType::Float64, true),
        Field::new("fuel_l_per_100km", DataType::Float64, true),
        Field::new("tire_pressure_min_kpa", DataType::Float64, true),
        Field::new("tire_pressure_max_kpa", DataType::Float64, true),
        Field::new("events", DataType::Int64, false),
    ];
    for k in EventKind::ALL {
        fields.push(Field::new(format!("events_{k}"), DataType::Int64, false));
    }
    Arc::new(Schema::new(fields))
}

#[derive(Default)]
struct Day {
    hours: i64,
    samples: i64,
    distance_m: f64,
    speed_n: i64,
    speed_sum: f64,
    speed_max: Option<f64>,
    fuel: Option<f64>,
    tire_min: Option<f64>,
    tire_max: Option<f64>,
    events: BTreeMap<String, i64>,
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

/// One day's rollup rows from its aggregates and events.
fn daily_rows(day_start: i64, aggregates: &[RecordBatch], events: &[RecordBatch]) -> anyhow::Result<RecordBatch> {
    let mut days: BTreeMap<(String, String), Day> = BTreeMap::new();
    let f64s = |b: &RecordBatch, c: &str| -> anyhow::Result<arrow_array::Float64Array> {
        Ok(b.column_by_name(c)
            .ok_or_else(|| anyhow::anyhow!("aggregates without {c}"))?
            .as_primitive::<Float64Type>()
            .clone())
    };
    let opt = |a: &arrow_array::Float64Array, i: usize| (!a.is_null(i)).then(|| a.value(i));
    for b in aggregates {
        let col = |c: &str| b.column_by_name(c).ok_or_else(|| anyhow::anyhow!("aggregates without {c}"));
        let (fleet, dev, window) = (
            col(c::FLEET)?.as_string::<i32>(),
            col(c::DEVICE_ID)?.as_string::<i32>(),
            col(c::WINDOW)?.as_string::<i32>(),
        );
        let start = col(c::WINDOW_START)?.as_primitive::<TimestampMillisecondType>();
        let samples = col(c::SAMPLES)?.as_primitive::<Int64Type>();
        let speed_n = col(c::SPEED_READINGS)?.as_primitive::<Int64Type>();
        let (dist, avg, max, fuel) =
            (f64s(b, "distance_m")?, f64s(b, "avg_speed_kmh")?, f64s(b, "max_speed_kmh")?, f64s(b, "fuel_used_l")?);
        let (tmin, tmax) = (f64s(b, "tire_pressure_min_kpa")?, f64s(b, "tire_pressure_max_kpa")?);
        for i in 0..b.num_rows() {
            if window.value(i) != "1h" || start.value(i).div_euclid(DAY_MS) * DAY_MS != day_start {
                continue;
            }
            let d = days.entry((fleet.value(i).into(), dev.value(i).into())).or_default();
            d.hours += 1;
            d.samples += samples.value(i);
            d.distance_m += dist.value(i);
            if let Some(a) = opt(&avg, i) {
                d.speed_n += speed_n.value(i);
                d.speed_sum += a * speed_n.value(i) as f64;
            }
            d.speed_max = max_opt(d.speed_max, opt(&max, i));
            if let Some(f) = opt(&fuel, i) {
                d.fuel = Some(d.fuel.unwrap_or(0.0) + f);
            }
            d.tire_min = min_opt(d.tire_min, opt(&tmin, i));
            d.tire_max = max_opt(d.tire_max, opt(&tmax, i));
        }
    }
    for b in events {
        let col = |c: &str| b.column_by_name(c).ok_or_else(|| anyhow::anyhow!("events without {c}"));
        let (fleet, dev, kind) = (
            col(c::FLEET)?.as_string::<i32>(),
            col(c::DEVICE_ID)?.as_string::<i32>(),
            col(c::KIND)?.as_string::<i32>(),
        );
        let ts = col(c::TS)?.as_primitive::<TimestampMillisecondType>();
        for i in 0..b.num_rows() {
            if ts.value(i).div_euclid(DAY_MS) * DAY_MS == day_start {
                let d = days.entry((fleet.value(i).into(), dev.value(i).into())).or_default();
                *d.events.entry(kind.value(i).into()).or_default() += 1;
            }
        }
    }
    let rows: Vec<(&(String, String), &Day)> = days.iter().collect();
    let n = rows.len();
    let text = |f: &dyn Fn(&(String, String)) -> &str| -> ArrayRef {
        Arc::new(arrow_array::StringArray::from_iter_values(rows.iter().map(|(k, _)| f(k))))
    };
    let ints = |f: &dyn Fn(&Day) -> i64| -> ArrayRef {
        Arc::new(arrow_array::Int64Array::from_iter_values(rows.iter().map(|(_, d)| f(d))))
    };
    let floats = |f: &dyn Fn(&Day) -> Option<f64>| -> ArrayRef {
        Arc::new(arrow_array::Float64Array::from_iter(rows.iter().map(|(_, d)| f(d))))
    };
    let mut columns: Vec<ArrayRef> = vec![
        text(&|k| &k.0),
        text(&|k| &k.1),
        Arc::new(arrow_array::Date32Array::from(vec![(day_start / DAY_MS) as i32; n])),
        ints(&|d| d.hours),
        ints(&|d| d.samples),
        floats(&|d| Some(d.distance_m / 1000.0)),
        floats(&|d| (d.speed_n > 0).then(|| d.speed_sum / d.speed_n as f64)),
        floats(&|d| d.speed_max),
        floats(&|d| d.fuel),
        floats(&|d| d.fuel.filter(|_| d.distance_m >= 100.0).map(|f| f / (d.distance_m / 1000.0) * 100.0)),
        floats(&|d| d.tire_min),
        floats(&|d| d.tire_max),
        ints(&|d| d.events.values().sum()),
    ];
    for k in EventKind::ALL {
        columns.push(ints(&|d| d.events.get(k.as_str()).copied().unwrap_or(0)));
    }
    Ok(RecordBatch::try_new(daily_schema(), columns)?)
}

/// The job as a node runs it: one run at a time, periodic or on request.
pub struct RollupJob {
    store: Store,
    grace: Duration,
    lock: tokio::sync::Mutex<()>,
    /// The last run's report.
    pub last: std::sync::Mutex<Option<RollupReport>>,
}

impl RollupJob {
    /// A job over `store`.
    pub fn new(store: Store, cfg: &RollupConfig) -> Self {
        Self { store, grace: cfg.grace, lock: tokio::sync::Mutex::new(()), last: std::sync::Mutex::new(None) }
    }

    /// Runs once now (waits for a run in progress first).
    pub async fn run(&self) -> anyhow::Result<RollupReport> {
        let _one = self.lock.lock().await;
        let now = fleetline_service::unix_ms() as i64;
        let r = run_once(&self.store, self.grace, now).await?;
        metrics::counter!("fleetline_cloud_rollup_outputs_written_total").increment(r.hours_written + r.days_written);
        if let Ok(mut l) = self.last.lock() {
            *l = Some(r);
        }
        Ok(r)
    }

    /// Runs every `interval` until the process ends.
    /// Runs every `interval` while `holder()` says this node runs the singleton.
    pub async fn periodic(self: std::sync::Arc<Self>, interval: Duration, holder: impl Fn() -> bool) {
        loop {
            tokio::time::sleep(interval).await;
            if !holder() {
                continue;
            }
            match self.run().await {
                Ok(r) if r.hours_written + r.days_written > 0 => tracing::info!(?r, "rollup"),
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!("fleetline_cloud_rollup_failures_total").increment(1);
                    tracing::error!(error = %e, "rollup failed; next run retries");
                }
            }
        }
    }
}

/// Runs the job once at wall time `now_ms`.
pub async fn run_once(store: &Store, grace: Duration, now_ms: i64) -> anyhow::Result<RollupReport> {
    let (mut state, version): (State, _) = match store.get_versioned(STATE).await? {
        Some((b, v)) => (serde_json::from_slice(&b)?, Some(v)),
        None => (State { format: 1, outputs: BTreeMap::new() }, None),
    };
    let grace = grace.as_millis() as i64;
    let mut report = RollupReport::default();
    // The state only moves by compare-and-swap from the version this run read: a
    // second runner (a singleton briefly held twice) loses and stops; the outputs
    // both wrote are the same bytes from the same sources.
    let version = std::sync::Mutex::new(version);
    let save = async |state: &State| -> anyhow::Result<()> {
        let expected = version.lock().map(|v| v.clone()).unwrap_or_default();
        let bytes = Bytes::from(serde_json::to_vec_pretty(state)?);
        match store.swap(STATE, expected.as_ref(), bytes).await {
            Ok(v) => {
                if let Ok(mut current) = version.lock() {
                    *current = Some(v);
                }
                Ok(())
            }
            Err(crate::lake::store::SwapError::Lost { .. }) => {
                anyhow::bail!("another node ran the rollup at the same time; this run stops, the other's state stands")
            }
            Err(crate::lake::store::SwapError::Store(e)) => Err(e.into()),
        }
    };

    for (dir, files) in partitions(store, "readings").await? {
        let Some(start) = partition_start(&dir) else { continue };
        if start + HOUR_MS + grace > now_ms {
            continue;
        }
        let out = format!("readings_hourly/{dir}/readings.parquet");
        let fp = fingerprint(&files);
        if state.outputs.get(&out) == Some(&fp) {
            report.hours_unchanged += 1;
            continue;
        }
        let batches = read_all(store, &files).await?;
        let (bytes, rows) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<u8>, usize)> {
            let b = compact_hour(&batches)?;
            Ok((encode(READINGS_SCHEMA.clone(), std::slice::from_ref(&b))?, b.num_rows()))
        })
        .await??;
        store.put(&out, Bytes::from(bytes)).await?;
        state.outputs.insert(out, fp);
        save(&state).await?;
        report.hours_written += 1;
        report.rows_written += rows as u64;
    }

    // Days: the sources are the day's aggregates and events partitions.
    let mut by_day: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for dataset in ["aggregates", "events"] {
        for (dir, files) in partitions(store, dataset).await? {
            let day = dir.split('/').next().unwrap_or_default().to_string();
            by_day.entry(day).or_default().extend(files);
        }
    }
    for (day, files) in by_day {
        let Some(start) = partition_start(&day) else { continue };
        if start + DAY_MS + grace > now_ms {
            continue;
        }
        let files: Vec<String> = files.into_iter().collect();
        let out = format!("vehicle_daily/{day}/vehicle_daily.parquet");
        let fp = fingerprint(&files);
        if state.outputs.get(&out) == Some(&fp) {
            report.days_unchanged += 1;
            continue;
        }
        let (agg_files, ev_files): (Vec<String>, Vec<String>) =
            files.iter().cloned().partition(|f| f.starts_with("aggregates/"));
        let aggregates = read_all(store, &agg_files).await?;
        let events = read_all(store, &ev_files).await?;
        let batch = daily_rows(start, &aggregates, &events)?;
        report.rows_written += batch.num_rows() as u64;
        store.put(&out, Bytes::from(encode(daily_schema(), &[batch])?)).await?;
        state.outputs.insert(out, fp);
        save(&state).await?;
        report.days_written += 1;
    }
    Ok(report)
}
