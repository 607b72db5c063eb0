//! The rollup job: hourly compacted copies of closed `readings` hours and daily
//! per-vehicle rollups, idempotent, redone when late data lands, `readings` untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use fleetline_cloud::config::SegmentConfig;
use fleetline_cloud::jobs::rollup::run_once;
use fleetline_cloud::lake::partition::{hour_of, partition_dir};
use fleetline_cloud::lake::store::Store;
use fleetline_cloud::shard::Shard;
use fleetline_cloud::telemetry::CloudStats;
use fleetline_testkit::batches::{bundle, sealed_batch};
use fleetline_testkit::provisioning::{device_id, device_key, fleet, gateway_key};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// 2026-11-26T00:00:00Z: a day boundary.
const DAY0: u64 = 1_795_651_200_000;
const HOUR: u64 = 3_600_000;

async fn batches_of(store: &Store, prefix: &str) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for p in store.list(prefix).await.unwrap() {
        let bytes = store.get(&p).await.unwrap().unwrap();
        out.extend(ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap().map(|b| b.unwrap()));
    }
    out
}

/// (device, seq, ts, value) of every readings row under `prefix`, sorted.
async fn reading_rows(store: &Store, prefix: &str) -> Vec<(String, i64, i64, String)> {
    let mut out = Vec::new();
    for b in batches_of(store, prefix).await {
        let dev = b.column_by_name("device_id").unwrap().as_string::<i32>().clone();
        let seq = b.column_by_name("seq").unwrap().as_primitive::<Int64Type>().clone();
        let ts = b.column_by_name("ts").unwrap().as_primitive::<arrow_array::types::TimestampMillisecondType>().clone();
        let v = b.column_by_name("value").unwrap().as_primitive::<Float64Type>().clone();
        for i in 0..b.num_rows() {
            out.push((dev.value(i).to_string(), seq.value(i), ts.value(i), format!("{:?}", v.value(i))));
        }
    }
    out.sort();
    out
}

async fn snapshot(store: &Store, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for p in store.list(prefix).await.unwrap() {
        out.insert(p.clone(), store.get(&p).await.unwrap().unwrap().to_vec());
    }
    out
}

#[tokio::test]
async fn rollups_are_idempotent_redone_for_late_data_and_leave_readings_alone() {
    let store = Store::memory();
    let prov = fleet(8, 1);
    let cfg = SegmentConfig { max_rows: 1_000_000, ..Default::default() };
    let mut shard = Shard::open(store.clone(), 0, 1, "test", cfg, Arc::new(CloudStats::default())).await.unwrap();
    // Two devices, 150 one-minute batches each (2.5 hours of a speed a second),
    // a commit every 10 batches: many small files per hour.
    for seq in 0..150u32 {
        let mut sealed = Vec::new();
        for d in 0..2 {
            let base = DAY0 + u64::from(seq) * 60_000;
            sealed.push(sealed_batch(device_id(d).as_str(), &device_key(d), 1, seq, base, 60, None));
        }
        let received = DAY0 + u64::from(seq + 1) * 60_000;
        shard.state.ingest(
            &bundle(&gateway_key(0), "gw-0", u64::from(seq) + 1, 0, &sealed, received),
            &prov,
            std::time::Instant::now(),
            std::time::SystemTime::now(),
        );
        if seq % 10 == 9 {
            shard.commit().await.unwrap();
        }
    }
    shard.commit().await.unwrap();
    let readings_before = snapshot(&store, "readings").await;
    assert!(readings_before.len() >= 15, "{} files", readings_before.len());

    // The day is over (and its grace): hours 00, 01 and 02 are closed, the day too.
    let later = (DAY0 + 26 * HOUR) as i64;
    let grace = Duration::from_secs(3600);
    let r = run_once(&store, grace, later).await.unwrap();
    assert_eq!((r.hours_written, r.days_written), (3, 1), "{r:?}");
    for h in 0..3 {
        let part = partition_dir(hour_of((DAY0 + h * HOUR) as i64));
        let copy = reading_rows(&store, &format!("readings_hourly/{part}")).await;
        assert_eq!(copy, reading_rows(&store, &format!("readings/{part}")).await, "{part}");
        assert_eq!(store.list(&format!("readings_hourly/{part}")).await.unwrap().len(), 1);
    }
    // The compacted hour is sorted by device and time.
    let copy = batches_of(&store, &format!("readings_hourly/{}", partition_dir(hour_of((DAY0 + HOUR) as i64)))).await;
    let ts = copy[0].column_by_name("ts").unwrap().as_primitive::<arrow_array::types::TimestampMillisecondType>();
    let dev = copy[0].column_by_name("device_id").unwrap().as_string::<i32>();
    assert!((1..copy[0].num_rows()).all(|i| (dev.value(i - 1), ts.value(i - 1)) <= (dev.value(i), ts.value(i))));

    // The daily rollup: two vehicles, two closed hour windows each (the third hour
    // is still open: no later data), 7,200 speed readings each.
    let daily = batches_of(&store, "vehicle_daily").await;
    assert_eq!(daily.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
    let hours = daily[0].column_by_name("hours").unwrap().as_primitive::<Int64Type>();
    let samples = daily[0].column_by_name("samples").unwrap().as_primitive::<Int64Type>();
    assert_eq!((hours.value(0), samples.value(0)), (2, 7_200));
    assert!(!daily[0].column_by_name("avg_speed_kmh").unwrap().is_null(0));

    // Again: nothing changes.
    let derived = snapshot(&store, "readings_hourly").await;
    let r = run_once(&store, grace, later).await.unwrap();
    assert_eq!((r.hours_written, r.days_written, r.hours_unchanged, r.days_unchanged), (0, 0, 3, 1));
    assert_eq!(snapshot(&store, "readings_hourly").await, derived);

    // Late data for a closed hour (a third vehicle's backlog): that hour is redone.
    let late = sealed_batch(device_id(2).as_str(), &device_key(2), 1, 0, DAY0 + HOUR + 60_000, 30, None);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 999, 0, &[late], DAY0 + 25 * HOUR),
        &prov,
        std::time::Instant::now(),
        std::time::SystemTime::now(),
    );
    shard.commit().await.unwrap();
    let r = run_once(&store, grace, later).await.unwrap();
    assert_eq!((r.hours_written, r.hours_unchanged), (1, 2), "{r:?}");
    let part = partition_dir(hour_of((DAY0 + HOUR) as i64));
    assert_eq!(part, "dt=2026-11-26/hour=01");
    let copy = reading_rows(&store, &format!("readings_hourly/{part}")).await;
    assert_eq!(copy, reading_rows(&store, &format!("readings/{part}")).await);
    assert_eq!(copy.iter().filter(|r| r.0 == "dev-0002").count(), 30);

    // `readings` only ever gained the late file.
    let after = snapshot(&store, "readings").await;
    for (p, bytes) in &readings_before {
        assert_eq!(after.get(p), Some(bytes), "{p} changed");
    }
    assert_eq!(after.len(), readings_before.len() + 1);

    // An hour still inside its grace is left alone.
    let r = run_once(&store, grace, (DAY0 + 3 * HOUR + 1) as i64).await.unwrap();
    assert_eq!(r.hours_written, 0);
}

/// Every dataset the node writes, in a local directory, read as-is by DuckDB and
/// by pyarrow (Hive partitions discovered, timestamps as UTC): the same row counts
/// as the node wrote.
#[tokio::test]
async fn every_dataset_reads_as_is_in_duckdb_and_pyarrow() {
    let dir = tempfile::tempdir().unwrap();
    let storage =
        fleetline_cloud::config::StorageConfig { url: dir.path().display().to_string(), ..Default::default() };
    let store = fleetline_cloud::lake::store::StoreSpec::parse(&storage).unwrap().open(&storage).unwrap();
    let prov = fleet(8, 1);
    let stats = Arc::new(CloudStats::default());
    let cfg = SegmentConfig { max_rows: 1_000_000, ..Default::default() };
    let mut shard = Shard::open(store.clone(), 0, 1, "test", cfg, stats.clone()).await.unwrap();
    // 90 minutes of speeds from 50 to 120 km/h (overspeed events), an unknown kind
    // in the first batch, and a garbage bundle: every dataset gets rows.
    for seq in 0..90u32 {
        let base = DAY0 + u64::from(seq) * 60_000;
        let unknown = (seq == 0).then_some(4242);
        // Speeds 50.0 + 0.1·((seq + i) mod 700): epoch 2 starts at seq 400, past 90 km/h.
        let (epoch, s) = if seq < 10 { (1, seq) } else { (2, seq - 10 + 400) };
        let b = sealed_batch(device_id(0).as_str(), &device_key(0), epoch, s, base, 60, unknown);
        shard.state.ingest(
            &bundle(&gateway_key(0), "gw-0", u64::from(seq) + 1, 0, &[b], base + 60_000),
            &prov,
            std::time::Instant::now(),
            std::time::SystemTime::now(),
        );
        if seq % 30 == 29 {
            shard.commit().await.unwrap();
        }
    }
    shard.state.ingest(b"garbage", &prov, std::time::Instant::now(), std::time::SystemTime::now());
    shard.commit().await.unwrap();
    run_once(&store, Duration::ZERO, (DAY0 + 25 * HOUR) as i64).await.unwrap();
    let datasets = ["readings", "aggregates", "events", "deadletter", "readings_hourly", "vehicle_daily"];
    let mut expected = Vec::new();
    for d in datasets {
        let n: usize = batches_of(&store, d).await.iter().map(RecordBatch::num_rows).sum();
        assert!(n > 0, "{d} is empty");
        expected.push(n);
    }
    let code = r#"
import duckdb, json, sys
import pyarrow.dataset as ds
root, names = sys.argv[1], sys.argv[2:]
con = duckdb.connect()
out = {}
for n in names:
    d = con.execute(f"SELECT count(*) FROM read_parquet('{root}/{n}/**/*.parquet', hive_partitioning = true)").fetchone()[0]
    cols = [c[0] for c in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{root}/{n}/**/*.parquet', hive_partitioning = true)").fetchall()]
    t = ds.dataset(f"{root}/{n}", format="parquet", partitioning="hive").to_table()
    out[n] = [d, t.num_rows, "dt" in cols and "dt" in t.column_names]
print(json.dumps(out))
"#;
    let mut args = vec![dir.path().display().to_string()];
    args.extend(datasets.iter().map(|d| d.to_string()));
    let out = std::process::Command::new(fleetline_testkit::python()).arg("-c").arg(code).args(&args).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (d, n) in datasets.iter().zip(expected) {
        assert_eq!(v[d], serde_json::json!([n, n, true]), "{d}: {v}");
    }
    eprintln!("DuckDB and pyarrow read every dataset: {v}");
}
