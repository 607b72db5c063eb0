//! The shard's commit protocol against an in-memory object store: exactly once
//! after a failure at every write, dedupe in any order, dead letters, and no
//! partial or orphan file visible to a reader of the datasets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arrow_array::{Array, Int64Array, StringArray};
use fleetline_cloud::config::SegmentConfig;
use fleetline_cloud::lake::store::Store;
use fleetline_cloud::shard::Shard;
use fleetline_cloud::telemetry::CloudStats;
use fleetline_testkit::batches::{bundle, sealed_batch};
use fleetline_testkit::provisioning::{device_id, device_key, fleet, gateway_key};
use fleetline_wire::provisioning::Provisioning;
use fleetline_wire::shard::shard_of;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const SHARDS: u16 = 4;
const SAMPLES: usize = 5;
const BASE_MS: u64 = 1_796_180_000_000;

/// Devices of shard 0.
fn devices_of_shard0(n: usize) -> Vec<usize> {
    (0..200).filter(|i| shard_of("acme", device_id(*i).as_str(), SHARDS).0 == 0).take(n).collect()
}

/// (device, epoch, seq) → rows, over every file a reader globbing `readings/` sees.
async fn readings(store: &Store) -> BTreeMap<(String, i64, i64), usize> {
    let mut out = BTreeMap::new();
    for path in store.list("readings").await.unwrap() {
        assert!(path.ends_with(".parquet"), "a reader would see {path}");
        let bytes = store.get(&path).await.unwrap().unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
        for b in reader {
            let b = b.unwrap();
            let dev = b.column_by_name("device_id").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            let epoch = b.column_by_name("epoch").unwrap().as_any().downcast_ref::<Int64Array>().unwrap();
            let seq = b.column_by_name("seq").unwrap().as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                *out.entry((dev.value(i).to_string(), epoch.value(i), seq.value(i))).or_default() += 1;
            }
        }
    }
    out
}

async fn deadletter_reasons(store: &Store) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for path in store.list("deadletter").await.unwrap() {
        let bytes = store.get(&path).await.unwrap().unwrap();
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap() {
            let b = b.unwrap();
            let r = b.column_by_name("reason").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            for i in 0..r.len() {
                *out.entry(r.value(i).to_string()).or_default() += 1;
            }
        }
    }
    out
}

fn cfg() -> SegmentConfig {
    SegmentConfig { max_rows: 1_000_000, ..Default::default() }
}

async fn open(store: &Store) -> Result<Shard, fleetline_cloud::shard::ShardError> {
    Shard::open(store.clone(), 0, SHARDS, "test", cfg(), Arc::new(CloudStats::default())).await
}

/// A gateway's bundles: (id, payload, batch keys inside).
type Bundles = Vec<(u64, Vec<u8>, Vec<(String, i64, i64)>)>;

/// Six bundles over three devices, with batches repeated across bundles (a
/// re-send, a vehicle seen through two gateways) and out of order.
fn gateway_bundles() -> Bundles {
    let devs = devices_of_shard0(3);
    let mut out = Vec::new();
    let plan: [&[(usize, u32)]; 6] = [
        &[(0, 0), (1, 0)],
        &[(0, 1), (2, 0)],
        &[(0, 1), (1, 2)],
        &[(1, 1), (2, 1)],
        &[(0, 3), (0, 2)],
        &[(2, 1), (1, 2)],
    ];
    for (b, batches) in plan.iter().enumerate() {
        let mut sealed = Vec::new();
        let mut keys = Vec::new();
        for (d, seq) in batches.iter() {
            let i = devs[*d];
            let dev = device_id(i);
            sealed.push(sealed_batch(
                dev.as_str(),
                &device_key(i),
                7,
                *seq,
                BASE_MS + u64::from(*seq) * 60_000,
                SAMPLES,
                None,
            ));
            keys.push((dev.as_str().to_string(), 7i64, i64::from(*seq)));
        }
        out.push((b as u64 + 1, bundle(&gateway_key(0), "gw-0", b as u64 + 1, 0, &sealed, BASE_MS), keys));
    }
    out
}

/// Plays the gateway against a shard until every bundle is acked, failing the
/// store's `fail_at`th write once; `crash` throws the shard away at the failure
/// (a process crash), otherwise the same shard recovers (an outage). Returns
/// whether the run got as far as the failing write.
async fn run_with_failure(fail_at: u64, crash: bool) -> (bool, Store, BTreeSet<(String, i64, i64)>) {
    let store = Store::memory();
    let prov: Provisioning = fleet(200, 1);
    let bundles = gateway_bundles();
    let mut shard = open(&store).await.unwrap();
    store.faults.fail_write(fail_at, false);
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut acked_batches = BTreeSet::new();
    let mut failed = false;
    for round in 0..10 {
        // Two bundles per commit, re-sending whatever is not acked yet.
        let pending: Vec<_> = bundles.iter().filter(|b| !acked.contains(&b.0)).collect();
        if pending.is_empty() {
            break;
        }
        for chunk in pending.chunks(2) {
            for (_, payload, _) in chunk {
                shard.state.ingest(payload, &prov, Instant::now(), SystemTime::now());
            }
            match shard.commit().await {
                Ok(acks) => {
                    for id in acks.acks.get("gw-0").into_iter().flatten() {
                        acked.insert(id.0);
                        let b = bundles.iter().find(|b| b.0 == id.0).unwrap();
                        acked_batches.extend(b.2.iter().cloned());
                    }
                }
                Err(_) => {
                    failed = true;
                    if crash {
                        drop(shard);
                        shard = open(&store).await.unwrap();
                    } else {
                        shard.recover().await.unwrap();
                    }
                }
            }
        }
        assert!(round < 9, "bundles never all acked");
    }
    let reached = store.faults.writes() >= fail_at;
    store.faults.clear();
    (failed || reached, store, acked_batches)
}

#[tokio::test]
async fn every_acked_batch_is_stored_exactly_once_whatever_write_fails() {
    let mut hit = 0;
    for crash in [true, false] {
        for fail_at in 1..200 {
            let (failed, store, acked) = run_with_failure(fail_at, crash).await;
            let rows = readings(&store).await;
            for key in &acked {
                assert_eq!(rows.get(key), Some(&SAMPLES), "fail_at {fail_at} crash {crash}: {key:?} not stored once");
            }
            // Nothing stored that was not sent, nothing doubled.
            assert!(rows.values().all(|n| *n == SAMPLES), "fail_at {fail_at}: duplicated rows {rows:?}");
            assert_eq!(rows.len(), 9, "fail_at {fail_at} crash {crash}");
            // A fresh owner finds no staged leftovers after recovery.
            let _ = open(&store).await.unwrap();
            assert!(store.list("_fleetline/staging").await.unwrap().is_empty());
            if !failed {
                break;
            }
            hit += 1;
        }
    }
    assert!(hit >= 20, "only {hit} failure points exercised");
}

#[tokio::test]
async fn dedupes_in_any_order_and_dead_letters_what_it_cannot_use() {
    let store = Store::memory();
    let mut prov: Provisioning = fleet(200, 2);
    let devs = devices_of_shard0(2);
    let (a, b) = (device_id(devs[0]), device_id(devs[1]));
    let batch = |dev: &fleetline_wire::DeviceId, i: usize, seq: u32, unknown: Option<u16>| {
        sealed_batch(dev.as_str(), &device_key(i), 1, seq, BASE_MS, SAMPLES, unknown)
    };
    let mut shard = open(&store).await.unwrap();
    // Seqs 5, 3, 4, 3 again (via another gateway), then 0: gaps and reordering.
    let b1 =
        bundle(&gateway_key(0), "gw-0", 1, 0, &[batch(&a, devs[0], 5, None), batch(&a, devs[0], 3, None)], BASE_MS);
    let b2 =
        bundle(&gateway_key(1), "gw-1", 1, 0, &[batch(&a, devs[0], 3, None), batch(&a, devs[0], 4, None)], BASE_MS);
    // Wrong key (b's batch sealed with a's key), an unknown kind, garbage.
    let forged = sealed_batch(b.as_str(), &device_key(devs[0]), 1, 0, BASE_MS, SAMPLES, None);
    let b3 = bundle(
        &gateway_key(0),
        "gw-0",
        2,
        0,
        &[forged.clone(), batch(&b, devs[1], 1, Some(999)), vec![1, 2, 3], batch(&a, devs[0], 0, None)],
        BASE_MS,
    );
    // A bundle sealed with the wrong gateway key, and a corrupt one.
    let b4 = bundle(&gateway_key(1), "gw-0", 3, 0, &[batch(&a, devs[0], 9, None)], BASE_MS);
    let mut b5 = bundle(&gateway_key(0), "gw-0", 4, 0, &[batch(&a, devs[0], 9, None)], BASE_MS);
    let n = b5.len();
    b5[n - 20] ^= 0xff;
    for p in [&b1, &b2, &b3, &b4, &b5, &b1, &b3, &b4] {
        shard.state.ingest(p, &prov, Instant::now(), SystemTime::now());
    }
    let acks = shard.commit().await.unwrap();
    let ids = |g: &str| acks.acks.get(g).map(|v| v.iter().map(|i| i.0).collect::<Vec<_>>()).unwrap_or_default();
    assert_eq!(ids("gw-0"), vec![1, 2], "authentic bundles acked, forged ones not");
    assert_eq!(ids("gw-1"), vec![1]);
    // Re-sent after the commit: acked at once, nothing new stored.
    shard.state.ingest(&b2, &prov, Instant::now(), SystemTime::now());
    assert!(shard.state.deadline().unwrap() <= std::time::Instant::now());
    assert_eq!(shard.commit().await.unwrap().acks.get("gw-1").unwrap().len(), 1);
    let rows = readings(&store).await;
    let seqs: Vec<i64> = rows.keys().filter(|k| k.0 == a.as_str()).map(|k| k.2).collect();
    assert_eq!(seqs, vec![0, 3, 4, 5]);
    assert_eq!(rows.get(&(b.as_str().to_string(), 1, 1)), Some(&SAMPLES), "known kinds of a batch with an unknown one");
    assert!(rows.values().all(|n| *n == SAMPLES));
    let dl = deadletter_reasons(&store).await;
    let expect: BTreeMap<String, usize> =
        [("auth_failed", 1), ("unknown_kind", 1), ("malformed", 1), ("bundle_auth_failed", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(dl, expect);
    // An unknown device's batch is kept too, once provisioning no longer lists it.
    prov = fleet(0, 2);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 9, 0, &[batch(&a, devs[0], 20, None)], BASE_MS),
        &prov,
        Instant::now(),
        SystemTime::now(),
    );
    shard.commit().await.unwrap();
    assert_eq!(deadletter_reasons(&store).await.get("unknown_device"), Some(&1));
    // The state survives a restart: the same batches are still duplicates.
    let mut again = open(&store).await.unwrap();
    let prov = fleet(200, 2);
    again.state.ingest(&b1, &prov, Instant::now(), SystemTime::now());
    again.state.ingest(&b3, &prov, Instant::now(), SystemTime::now());
    again.commit().await.unwrap();
    assert_eq!(readings(&store).await, rows);
    assert_eq!(again.state.status().totals.batches, 5);
    let v = again.state.vehicle("acme", a.as_str()).unwrap();
    assert_eq!(v.last_gateway, "gw-0");
    assert!(v.signals.contains_key("Vehicle.Speed"));
}

#[tokio::test]
async fn readings_are_validated_against_the_batchs_registered_schema() {
    use fleetline_cloud::registry::{Registry, Schema};
    use fleetline_testkit::batches::sealed_batch_with_schema;
    let store = Store::memory();
    let registry = Arc::new(Registry::open(store.clone()).await.unwrap());
    // Schema 2: the signal table with speed limited to 0..80 km/h.
    let mut narrow = Schema::signal_table();
    narrow.signals.iter_mut().find(|s| s.kind == 3).unwrap().max = 80.0;
    let v = registry.register("fleetline.readings.eu", &narrow.canonical()).await.unwrap();
    assert_eq!(v.id, 2);
    let prov = fleet(200, 1);
    let dev = devices_of_shard0(1)[0];
    let name = device_id(dev);
    let mut shard = open(&store).await.unwrap();
    shard.state.set_registry(registry);
    // 40 speeds from 50.0 km/h up: the ones above 80 are out of range under schema 2.
    let in_v1 = sealed_batch_with_schema(1, name.as_str(), &device_key(dev), 1, 0, BASE_MS, 40, None);
    let in_v2 = sealed_batch_with_schema(2, name.as_str(), &device_key(dev), 1, 1, BASE_MS, 40, None);
    let unknown = sealed_batch_with_schema(77, name.as_str(), &device_key(dev), 1, 2, BASE_MS, 40, None);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 1, 0, &[in_v1, in_v2, unknown], BASE_MS),
        &prov,
        Instant::now(),
        SystemTime::now(),
    );
    shard.commit().await.unwrap();
    let rows = readings(&store).await;
    let key = |seq: i64| (name.as_str().to_string(), 1i64, seq);
    assert_eq!(rows.get(&key(0)), Some(&40), "schema 1 allows up to 400 km/h");
    // Speeds 50.0 + 0.1·(1 + i) for i in 0..40 are all ≤ 80: seq 1 from 50.1 to 54.0.
    assert_eq!(rows.get(&key(1)), Some(&40));
    assert_eq!(rows.get(&key(2)), None, "an unknown schema id stores nothing");
    let dl = deadletter_reasons(&store).await;
    assert_eq!(dl.get("unknown_schema"), Some(&1));
    // Now readings that break schema 2's range.
    let fast = sealed_batch_with_schema(2, name.as_str(), &device_key(dev), 1, 300, BASE_MS, 40, None);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 2, 0, &[fast], BASE_MS),
        &prov,
        Instant::now(),
        SystemTime::now(),
    );
    shard.commit().await.unwrap();
    // seq 300: values 50.0 + 0.1·((300 + i) % 700) = 80.0 … 83.9: 80.0 passes, 39 do not.
    assert_eq!(readings(&store).await.get(&key(300)), Some(&1));
    assert_eq!(deadletter_reasons(&store).await.get("out_of_range"), Some(&39));
}

#[tokio::test]
async fn clocks_far_ahead_or_unset_are_refused_but_late_data_is_not() {
    let store = Store::memory();
    let prov = fleet(200, 1);
    let dev = devices_of_shard0(1)[0];
    let name = device_id(dev);
    let mut shard = open(&store).await.unwrap();
    let received = BASE_MS;
    // Dated an hour after receipt; dated 1970; dated two days before receipt (a backlog).
    let ahead = sealed_batch(name.as_str(), &device_key(dev), 1, 0, received + 3_600_000, 5, None);
    let unset = sealed_batch(name.as_str(), &device_key(dev), 1, 1, 1_000, 5, None);
    let late = sealed_batch(name.as_str(), &device_key(dev), 1, 2, received - 2 * 86_400_000, 5, None);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 1, 0, &[ahead, unset, late], received),
        &prov,
        Instant::now(),
        SystemTime::now(),
    );
    shard.commit().await.unwrap();
    let rows = readings(&store).await;
    assert_eq!(rows.get(&(name.as_str().to_string(), 1, 2)), Some(&SAMPLES), "late data is stored");
    assert_eq!(rows.len(), 1);
    let dl = deadletter_reasons(&store).await;
    assert_eq!(dl.get("future_timestamp"), Some(&SAMPLES));
    assert_eq!(dl.get("before_epoch_floor"), Some(&SAMPLES));
}

/// Rows of one signal in `readings`.
async fn signal_rows(store: &Store, signal: &str) -> usize {
    let mut n = 0;
    for path in store.list("readings").await.unwrap() {
        let bytes = store.get(&path).await.unwrap().unwrap();
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap() {
            let b = b.unwrap();
            let s = b.column_by_name("signal").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            n += (0..s.len()).filter(|i| s.value(*i) == signal).count();
        }
    }
    n
}

#[tokio::test]
async fn dead_letters_are_replayed_exactly_once_after_a_schema_fix() {
    use fleetline_cloud::jobs::replay::read_candidates;
    use fleetline_cloud::registry::{READINGS_SUBJECT, Registry, Schema};
    use fleetline_testkit::batches::sealed_batch_with_schema;
    let store = Store::memory();
    let registry = Arc::new(Registry::open(store.clone()).await.unwrap());
    let mut narrow = Schema::signal_table();
    narrow.signals.iter_mut().find(|s| s.kind == 3).unwrap().max = 80.0;
    registry.register("fleetline.readings.eu", &narrow.canonical()).await.unwrap();
    let prov = fleet(200, 1);
    let dev = devices_of_shard0(1)[0];
    let name = device_id(dev);
    let mut shard = open(&store).await.unwrap();
    shard.state.set_registry(registry.clone());
    // A kind no schema has yet (a raw series of two samples), and 39 speeds over schema 2's range.
    let unknown = sealed_batch(name.as_str(), &device_key(dev), 1, 0, BASE_MS, 3, Some(200));
    let fast = sealed_batch_with_schema(2, name.as_str(), &device_key(dev), 1, 300, BASE_MS, 40, None);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 1, 0, &[unknown, fast], BASE_MS + 60_000),
        &prov,
        Instant::now(),
        SystemTime::now(),
    );
    shard.commit().await.unwrap();
    let dl = deadletter_reasons(&store).await;
    assert_eq!((dl.get("unknown_kind"), dl.get("out_of_range")), (Some(&1), Some(&39)));

    // Before any fix nothing passes.
    let items = read_candidates(&store).await.unwrap();
    assert_eq!(items.len(), 40);
    let o = shard.state.replay(&items, READINGS_SUBJECT, Some(&prov), Instant::now(), SystemTime::now());
    assert_eq!((o.candidates, o.replayed, o.still_invalid), (40, 0, 40));

    // The fix: kind 200 added to fleetline.readings (backward compatible).
    let mut with_cabin = Schema::signal_table();
    let mut cabin = with_cabin.signals[0].clone();
    (cabin.kind, cabin.path, cabin.unit) = (200, "Vehicle.Cabin.Temperature".into(), "celsius".into());
    (cabin.encoding, cabin.scale_exp, cabin.min, cabin.max) = ("delta".into(), -1, -40.0, 90.0);
    with_cabin.signals.push(cabin);
    registry.register(READINGS_SUBJECT, &with_cabin.canonical()).await.unwrap();
    let o = shard.state.replay(&items, READINGS_SUBJECT, Some(&prov), Instant::now(), SystemTime::now());
    assert_eq!((o.replayed, o.readings, o.still_invalid), (1, 2, 39));
    // A crash before the commit loses the replay with everything else; run again.
    drop(shard);
    let mut shard = open(&store).await.unwrap();
    shard.state.set_registry(registry.clone());
    assert_eq!(signal_rows(&store, "Vehicle.Cabin.Temperature").await, 0);
    assert_eq!(
        shard.state.replay(&items, READINGS_SUBJECT, Some(&prov), Instant::now(), SystemTime::now()).replayed,
        1
    );
    shard.commit().await.unwrap();
    assert_eq!(signal_rows(&store, "Vehicle.Cabin.Temperature").await, 2);
    // Again, and again after a restart: nothing more.
    assert_eq!(
        shard.state.replay(&items, READINGS_SUBJECT, Some(&prov), Instant::now(), SystemTime::now()).already_replayed,
        1
    );
    drop(shard);
    let mut shard = open(&store).await.unwrap();
    shard.state.set_registry(registry.clone());
    let o = shard.state.replay(&items, READINGS_SUBJECT, Some(&prov), Instant::now(), SystemTime::now());
    assert_eq!((o.replayed, o.already_replayed), (0, 1));

    // Widening schema 2's speed range lets the 39 in, under that subject.
    let mut wide = narrow.clone();
    wide.signals.iter_mut().find(|s| s.kind == 3).unwrap().max = 90.0;
    registry.register("fleetline.readings.eu", &wide.canonical()).await.unwrap();
    let o = shard.state.replay(&items, "fleetline.readings.eu", Some(&prov), Instant::now(), SystemTime::now());
    assert_eq!((o.replayed, o.readings), (39, 39), "{o:?}");
    shard.commit().await.unwrap();
    let key = (name.as_str().to_string(), 1i64, 300i64);
    assert_eq!(readings(&store).await.get(&key), Some(&40), "the batch whole, each reading once");
    let o = shard.state.replay(
        &read_candidates(&store).await.unwrap(),
        "fleetline.readings.eu",
        Some(&prov),
        Instant::now(),
        SystemTime::now(),
    );
    assert_eq!(o.replayed, 0);
}

#[tokio::test]
async fn the_alerts_of_the_last_commit_are_sent_again_after_a_restart() {
    let store = Store::memory();
    let prov = fleet(200, 1);
    let dev = devices_of_shard0(1)[0];
    let name = device_id(dev);
    let mut shard = open(&store).await.unwrap();
    // Speeds from 50 to 94.9 km/h: one overspeed.
    let fast = sealed_batch(name.as_str(), &device_key(dev), 1, 0, BASE_MS, 450, None);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 1, 0, &[fast], BASE_MS + 450_000),
        &prov,
        Instant::now(),
        SystemTime::now(),
    );
    let committed = shard.commit().await.unwrap();
    assert_eq!(committed.alerts.len(), 1);
    assert_eq!(committed.alerts[0].kind, fleetline_cloud::analytics::EventKind::Overspeed);
    drop(shard);
    let mut shard = open(&store).await.unwrap();
    let again = shard.state.take_resend();
    assert_eq!(again, committed.alerts, "same event, same id");
    assert!(shard.state.take_resend().is_empty());
    // A later commit without events supersedes them.
    let slow = sealed_batch(name.as_str(), &device_key(dev), 1, 1, BASE_MS + 450_000, 5, None);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 2, 0, &[slow], BASE_MS + 460_000),
        &prov,
        Instant::now(),
        SystemTime::now(),
    );
    assert!(shard.commit().await.unwrap().alerts.is_empty());
    drop(shard);
    assert!(open(&store).await.unwrap().state.take_resend().is_empty());
}

#[tokio::test]
async fn a_batch_under_an_unregistered_schema_is_replayed_once_its_id_exists() {
    use fleetline_cloud::jobs::replay::read_candidates;
    use fleetline_cloud::registry::{Registry, Schema};
    use fleetline_testkit::batches::sealed_batch_with_schema;
    let store = Store::memory();
    let registry = Arc::new(Registry::open(store.clone()).await.unwrap());
    let prov = fleet(200, 1);
    let dev = devices_of_shard0(1)[0];
    let name = device_id(dev);
    let mut shard = open(&store).await.unwrap();
    shard.state.set_registry(registry.clone());
    // Schema id 3 does not exist yet (the registry holds only id 1).
    let early = sealed_batch_with_schema(3, name.as_str(), &device_key(dev), 1, 0, BASE_MS, 40, None);
    shard.state.ingest(
        &bundle(&gateway_key(0), "gw-0", 1, 0, &[early], BASE_MS + 60_000),
        &prov,
        Instant::now(),
        SystemTime::now(),
    );
    shard.commit().await.unwrap();
    assert_eq!(deadletter_reasons(&store).await.get("unknown_schema"), Some(&1));
    let items = read_candidates(&store).await.unwrap();
    assert_eq!(shard.state.replay(&items, "any", Some(&prov), Instant::now(), SystemTime::now()).still_invalid, 1);
    // Ids 2 and 3 registered (two distinct schemas); id 3 allows speeds to 250 km/h.
    for max in [300.0, 250.0] {
        let mut s = Schema::signal_table();
        s.signals.iter_mut().find(|d| d.kind == 3).unwrap().max = max;
        registry.register(&format!("fleetline.readings.max{max}"), &s.canonical()).await.unwrap();
    }
    let o = shard.state.replay(&items, "any", Some(&prov), Instant::now(), SystemTime::now());
    assert_eq!((o.replayed, o.readings), (1, 40), "{o:?}");
    shard.commit().await.unwrap();
    let key = (name.as_str().to_string(), 1i64, 0i64);
    assert_eq!(readings(&store).await.get(&key), Some(&40));
    assert_eq!(shard.state.replay(&items, "any", Some(&prov), Instant::now(), SystemTime::now()).already_replayed, 1);
}

/// A captured batch from a boot epoch the shard has since forgotten (it keeps the
/// newest `dedupe_epochs`) must never be stored again: before the epoch floor it
/// was taken for new, stored, its epoch forgotten again, and so on per replay.
#[tokio::test]
async fn a_replayed_batch_from_a_forgotten_epoch_is_stored_once_ever() {
    let store = Store::memory();
    let prov: Provisioning = fleet(200, 1);
    let i = devices_of_shard0(1)[0];
    let dev = device_id(i);
    let batch = |epoch: u32| sealed_batch(dev.as_str(), &device_key(i), epoch, 0, BASE_MS, SAMPLES, None);
    let captured = batch(1);
    let mut shard = open(&store).await.unwrap();
    let mut id = 0;
    let mut send = |shard: &mut Shard, b: &[u8]| {
        id += 1;
        shard.state.ingest(
            &bundle(&gateway_key(0), "gw-0", id, 0, &[b.to_vec()], BASE_MS),
            &prov,
            Instant::now(),
            SystemTime::now(),
        );
    };
    send(&mut shard, &captured);
    // Sixteen reboots later, epoch 1 is out of the dedupe window.
    for epoch in 2..=17 {
        send(&mut shard, &batch(epoch));
    }
    shard.commit().await.unwrap();
    // The replay, three times, and once more after a restart.
    for _ in 0..3 {
        send(&mut shard, &captured);
    }
    shard.commit().await.unwrap();
    let mut shard = open(&store).await.unwrap();
    send(&mut shard, &captured);
    let committed = shard.commit().await.unwrap();
    assert_eq!(committed.acks.get("gw-0").map(Vec::len), Some(1), "the replay's bundle is acked (it is dead-lettered)");
    let rows = readings(&store).await;
    assert_eq!(rows.get(&(dev.as_str().to_string(), 1, 0)), Some(&SAMPLES), "stored once, at first sight");
    assert_eq!(rows.len(), 17);
    assert_eq!(deadletter_reasons(&store).await.get("stale_epoch"), Some(&1), "the replay is a dead letter, once");
}

/// Every dataset file of the store and its bytes.
async fn dataset_files(store: &Store) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for dataset in fleetline_cloud::shard::checkpoint::DATASETS {
        for path in store.list(dataset).await.unwrap() {
            out.insert(path.clone(), store.get(&path).await.unwrap().unwrap().to_vec());
        }
    }
    out
}

/// A partial restore of the lake on a real directory. Before: with one shard's
/// checkpoint deleted, the shard started at generation 0 and its next commit
/// renamed a new file onto a published `readings` file (869 acked readings
/// replaced by 10). Now the shard refuses to start, naming itself and the files;
/// `repair` rebuilds its dedupe state from the datasets; replays are refused and
/// new files come after every existing one; no published byte ever changes.
/// The same for a checkpoint restored from an older copy, and a damaged one.
#[tokio::test]
async fn a_lost_or_old_checkpoint_keeps_the_shard_down_until_repaired_and_nothing_is_overwritten() {
    use fleetline_cloud::shard::ShardError;
    use fleetline_cloud::shard::checkpoint::checkpoint_dir;
    use fleetline_cloud::shard::commit::read_head;
    let head_checkpoint = |store: fleetline_cloud::lake::store::Store| async move {
        read_head(&store, 0, SHARDS).await.unwrap().0.checkpoint.expect("a committed head")
    };
    let dir = tempfile::tempdir().unwrap();
    let storage = fleetline_cloud::config::StorageConfig {
        url: format!("file://{}", dir.path().display()),
        ..Default::default()
    };
    let store = fleetline_cloud::lake::store::StoreSpec::parse(&storage).unwrap().open(&storage).unwrap();
    let prov: Provisioning = fleet(200, 1);
    let devs = devices_of_shard0(3);
    let mut next_bundle = 0;
    let mut bundle_of = |seqs: std::ops::Range<u32>| {
        next_bundle += 1;
        let sealed: Vec<Vec<u8>> = devs
            .iter()
            .flat_map(|i| {
                seqs.clone().map(move |q| {
                    sealed_batch(
                        device_id(*i).as_str(),
                        &device_key(*i),
                        3,
                        q,
                        BASE_MS + u64::from(q) * 1000,
                        SAMPLES,
                        None,
                    )
                })
            })
            .collect();
        bundle(&gateway_key(0), "gw-0", next_bundle, 0, &sealed, BASE_MS)
    };
    let mut sent = Vec::new();
    let mut shard = open(&store).await.unwrap();
    let mut old_checkpoint = None;
    for g in 0..5u32 {
        let b = bundle_of(g * 4..g * 4 + 4);
        shard.state.ingest(&b, &prov, Instant::now(), SystemTime::now());
        sent.push(b);
        shard.commit().await.unwrap();
        if g == 1 {
            let path = head_checkpoint(store.clone()).await;
            old_checkpoint = Some((store.get(&path).await.unwrap().unwrap(), path));
        }
    }
    assert_eq!(shard.state.status().generation, 5);
    drop(shard);
    let files = dataset_files(&store).await;
    let stored = readings(&store).await;
    assert_eq!(stored.len(), 3 * 20);

    // 1. The checkpoint is lost.
    for p in store.list(&checkpoint_dir(0)).await.unwrap() {
        store.delete(&p).await.unwrap();
    }
    let err = open(&store).await.err().expect("a shard with files beyond its checkpoint must not start");
    assert!(matches!(err, ShardError::AheadOfCheckpoint { shard: 0, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("shard 0") && msg.contains("shard-000-000000000005.parquet") && msg.contains("repair"),
        "{msg}"
    );
    let report = fleetline_cloud::jobs::repair::repair(&store, 0, SHARDS, "test", &cfg()).await.unwrap();
    assert_eq!((report.from_generation, report.generation, report.written), (0, 5, true), "{report:?}");
    assert_eq!(report.batches_added, 60);
    let mut shard = open(&store).await.unwrap();
    assert_eq!(shard.state.status().generation, 5);
    // Every earlier bundle again (a gateway re-sending), and one new one.
    for b in &sent {
        shard.state.ingest(b, &prov, Instant::now(), SystemTime::now());
    }
    shard.state.ingest(&bundle_of(20..22), &prov, Instant::now(), SystemTime::now());
    let committed = shard.commit().await.unwrap();
    assert_eq!(committed.acks.get("gw-0").map(Vec::len), Some(6), "replays acked, not stored");
    drop(shard);
    let after = readings(&store).await;
    assert_eq!(after.len(), 3 * 22);
    assert!(after.values().all(|n| *n == SAMPLES), "every batch stored once");
    let now = dataset_files(&store).await;
    for (path, bytes) in &files {
        assert_eq!(now.get(path), Some(bytes), "{path} is unchanged");
    }
    assert!(now.keys().any(|p| p.ends_with("shard-000-000000000006.parquet")));

    // 2. A checkpoint restored from an older copy (generation 2 of 6).
    for p in store.list(&checkpoint_dir(0)).await.unwrap() {
        store.delete(&p).await.unwrap();
    }
    let (old_bytes, old_path) = old_checkpoint.unwrap();
    store.put(&old_path, old_bytes).await.unwrap();
    let err = open(&store).await.err().expect("an old checkpoint must not start the shard");
    assert!(err.to_string().contains(&format!("{old_path}, generation 2")), "{err}");
    let report = fleetline_cloud::jobs::repair::repair(&store, 0, SHARDS, "test", &cfg()).await.unwrap();
    assert_eq!((report.from_generation, report.generation, report.batches_added), (2, 6, 3 * 14), "{report:?}");
    let mut shard = open(&store).await.unwrap();
    for b in &sent {
        shard.state.ingest(b, &prov, Instant::now(), SystemTime::now());
    }
    shard.commit().await.unwrap();
    assert_eq!(shard.state.status().generation, 6, "nothing new to store");
    drop(shard);

    // 3. The checkpoint is damaged: named, and moved aside by the repair.
    let path = head_checkpoint(store.clone()).await;
    let mut bytes = store.get(&path).await.unwrap().unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    store.delete(&path).await.unwrap();
    store.put(&path, bytes.into()).await.unwrap();
    let err = open(&store).await.err().expect("a damaged checkpoint must not start the shard");
    assert!(matches!(err, ShardError::DamagedCheckpoint { .. }), "{err}");
    assert!(err.to_string().contains(&path) && err.to_string().contains("shard 0"), "{err}");
    let report = fleetline_cloud::jobs::repair::repair(&store, 0, SHARDS, "test", &cfg()).await.unwrap();
    assert_eq!((report.from_generation, report.generation, report.damaged_checkpoints.len()), (0, 6, 1));
    assert_eq!(store.list("_fleetline/damaged/shard-000").await.unwrap().len(), 1, "kept for inspection");
    let mut shard = open(&store).await.unwrap();
    for b in &sent {
        shard.state.ingest(b, &prov, Instant::now(), SystemTime::now());
    }
    shard.commit().await.unwrap();
    drop(shard);
    assert_eq!(readings(&store).await, after, "nothing stored twice");
    // A second repair has nothing to do.
    let report = fleetline_cloud::jobs::repair::repair(&store, 0, SHARDS, "test", &cfg()).await.unwrap();
    assert!(!report.written, "{report:?}");
}
