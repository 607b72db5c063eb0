//! Ingest benchmark on one core: samples per second through bundle open, batch
//! open + decode, dedupe and the Parquet commit to a local directory (fsync on),
//! against the limit: the same rows written straight to Parquet with the
//! `parquet` crate (same writer settings, same file count, fsync). Prints JSON.
//!
//! `cargo run --release -p fleetline-cloud --example bench-cloud`
//! (BENCH_DEVICES, BENCH_BATCHES per device, BENCH_SAMPLES per batch).
#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark: a panic is the report; stdout carries it.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use fleetline_cloud::config::SegmentConfig;
use fleetline_cloud::lake::rows::write_parquet;
use fleetline_cloud::lake::schema::READINGS_SCHEMA;
use fleetline_cloud::lake::store::StoreSpec;
use fleetline_cloud::shard::Shard;
use fleetline_cloud::telemetry::CloudStats;
use fleetline_testkit::batches::{bundle, sealed_batch};
use fleetline_testkit::provisioning::{device_id, device_key, fleet, gateway_key};
use fleetline_wire::shard::shard_of;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

async fn run() {
    let (devices, batches, samples) = (env("BENCH_DEVICES", 200), env("BENCH_BATCHES", 50), env("BENCH_SAMPLES", 60));
    let shard_count = 1u16;
    let prov = fleet(devices, 1);
    let base = 1_795_700_000_000u64;
    // Pre-sealed input: one bundle per round with one batch of every device.
    let mut bundles = Vec::new();
    for seq in 0..batches as u32 {
        let sealed: Vec<Vec<u8>> = (0..devices)
            .map(|i| {
                assert_eq!(shard_of("acme", device_id(i).as_str(), shard_count).0, 0);
                sealed_batch(
                    device_id(i).as_str(),
                    &device_key(i),
                    1,
                    seq,
                    base + u64::from(seq) * 60_000,
                    samples,
                    None,
                )
            })
            .collect();
        // Received after the last reading (readings dated after their receipt are refused).
        let received = base + batches as u64 * 60_000;
        bundles.push(bundle(&gateway_key(0), "gw-0", u64::from(seq) + 1, 0, &sealed, received));
    }
    let total = (devices * batches * samples) as f64;
    // Commit every 10 bundles: the file count both runs write.
    let per_commit = 10;

    let dir = tempfile::tempdir().unwrap();
    let cfg = fleetline_cloud::config::StorageConfig {
        url: dir.path().join("a").display().to_string(),
        ..Default::default()
    };
    let store = StoreSpec::parse(&cfg).unwrap().open(&cfg).unwrap();
    let seg = SegmentConfig { max_rows: usize::MAX, ..Default::default() };
    let mut shard = Shard::open(store, 0, shard_count, "bench", seg, Arc::new(CloudStats::default())).await.unwrap();
    let t = Instant::now();
    let mut files = 0;
    for chunk in bundles.chunks(per_commit) {
        for b in chunk {
            shard.state.ingest(b, &prov, Instant::now(), SystemTime::now());
        }
        shard.commit().await.unwrap();
        files += 1;
    }
    let pipeline_s = t.elapsed().as_secs_f64();
    let stored = shard.state.status().totals.readings as f64;
    assert_eq!(stored, total, "every sample stored");

    // The limit: the same rows, already decoded into columns, straight to Parquet files.
    let rows_per_file = devices * per_commit * samples;
    let n = rows_per_file;
    let mk = |s: &str| Arc::new(StringArray::from(vec![s; n])) as ArrayRef;
    let ts: Vec<i64> = (0..n as i64).map(|i| base as i64 + i * 1000).collect();
    let values: Vec<f64> = (0..n).map(|i| (i % 700) as f64 / 10.0).collect();
    let devs: Vec<String> = (0..n).map(|i| device_id(i / (per_commit * samples) % devices).to_string()).collect();
    let out = dir.path().join("b");
    std::fs::create_dir_all(&out).unwrap();
    let t = Instant::now();
    for f in 0..files {
        let columns: Vec<ArrayRef> = vec![
            mk("acme"),
            Arc::new(StringArray::from(devs.clone())),
            Arc::new(Int64Array::from(vec![1i64; n])),
            Arc::new(Int64Array::from((0..n as i64).map(|i| i % 50).collect::<Vec<_>>())),
            Arc::new(TimestampMillisecondArray::from(ts.clone()).with_timezone("UTC")),
            mk("Vehicle.Speed"),
            Arc::new(Float64Array::from(values.clone())),
            mk("gw-0"),
            Arc::new(TimestampMillisecondArray::from(vec![base as i64; n]).with_timezone("UTC")),
            Arc::new(TimestampMillisecondArray::from(vec![base as i64; n]).with_timezone("UTC")),
        ];
        let batch = RecordBatch::try_new(READINGS_SCHEMA.clone(), columns).unwrap();
        let bytes = write_parquet(&batch).unwrap();
        let path = out.join(format!("{f}.parquet"));
        let file = std::fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut &file, &bytes).unwrap();
        file.sync_all().unwrap();
    }
    let limit_s = t.elapsed().as_secs_f64();
    let (p, l) = (total / pipeline_s, total / limit_s);
    println!(
        "{}",
        serde_json::json!({
            "devices": devices,
            "batches": devices * batches,
            "samples": total,
            "files": files,
            "pipeline_samples_per_s": p.round(),
            "parquet_only_samples_per_s": l.round(),
            "ratio": (p / l * 1000.0).round() / 1000.0,
        })
    );
}
