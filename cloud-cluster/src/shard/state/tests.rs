//! The shard's pure state on its own: no store, no tasks, time passed in.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fleetline_testkit::batches::{bundle, sealed_batch};
use fleetline_testkit::provisioning::{device_id, device_key, fleet, gateway_key};
use fleetline_wire::bundle::BundleId;
use fleetline_wire::provisioning::{DeviceEntry, Provisioning};
use fleetline_wire::shard::shard_of;
use fleetline_wire::{DeviceKey, FleetId};

use super::*;
use crate::lake::reason;
use crate::telemetry::CloudStats;

const SHARDS: u16 = 4;
const BASE_MS: u64 = 1_796_180_000_000;

/// Devices of shard 0, and one of another shard.
fn devices() -> (Vec<usize>, usize) {
    let home: Vec<usize> = (0..200).filter(|i| shard_of("acme", device_id(*i).as_str(), SHARDS).0 == 0).collect();
    let away = (0..200).find(|i| shard_of("acme", device_id(*i).as_str(), SHARDS).0 != 0).unwrap();
    (home, away)
}

fn state(cfg: SegmentConfig) -> (ShardState, Arc<CloudStats>) {
    let stats = Arc::new(CloudStats::default());
    (ShardState::new(0, SHARDS, "test", cfg, stats.clone()), stats)
}

fn batch(i: usize, epoch: u32, seq: u32) -> Vec<u8> {
    sealed_batch(device_id(i).as_str(), &device_key(i), epoch, seq, BASE_MS + u64::from(seq) * 10_000, 5, None)
}

fn gw_bundle(id: u64, batches: &[Vec<u8>]) -> Vec<u8> {
    bundle(&gateway_key(0), "gw-0", id, 0, batches, BASE_MS + 60_000)
}

fn wall() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(BASE_MS)
}

fn reasons(stats: &CloudStats) -> Vec<(&'static str, u64)> {
    stats.deadletters().into_iter().collect()
}

#[test]
fn new_batches_are_stored_once_and_their_bundles_acked_by_the_segment() {
    let (home, _) = devices();
    let prov = fleet(200, 1);
    let (mut s, stats) = state(SegmentConfig::default());
    let now = Instant::now();
    let b1 = gw_bundle(1, &[batch(home[0], 1, 0), batch(home[1], 1, 0)]);
    // The same batch again in another bundle (a resend through another path).
    let b2 = gw_bundle(2, &[batch(home[0], 1, 0), batch(home[0], 1, 1)]);
    s.ingest(&b1, &prov, now, wall());
    s.ingest(&b2, &prov, now, wall());
    assert_eq!(CloudStats::get(&stats.duplicates), 1);
    assert_eq!(CloudStats::get(&stats.samples_received), 15);
    let status = s.status();
    assert_eq!((status.pending_acks, status.devices), (2, 2));
    // The backlog an autoscaler reads: the segment's rows and bundle bytes.
    assert_eq!((status.open_rows, status.open_bytes), (15, (b1.len() + b2.len()) as u64));
    let (acks, rows) = s.take_segment();
    assert_eq!(s.status().open_bytes, 0, "taken with the segment");
    assert_eq!(acks["gw-0"], vec![BundleId(1), BundleId(2)]);
    let rows = rows.expect("rows to write");
    assert_eq!(rows.readings(), 15);
    let ckpt = s.checkpoint(1, 1, Vec::new(), &rows);
    let added = s.committed(&ckpt);
    assert_eq!((added.readings, added.batches), (15, 3));
    assert_eq!(s.generation(), 1);
    // Nothing open any more; the state lives on in the checkpoint.
    let (acks, rows) = s.take_segment();
    assert!(acks.is_empty() && rows.is_none());
}

#[test]
fn a_restored_shard_still_knows_what_it_stored() {
    let (home, _) = devices();
    let prov = fleet(200, 1);
    let (mut s, _) = state(SegmentConfig::default());
    s.ingest(&gw_bundle(1, &[batch(home[0], 1, 0)]), &prov, Instant::now(), wall());
    let (_, rows) = s.take_segment();
    let ckpt = s.checkpoint(1, 1, Vec::new(), &rows.unwrap());
    s.committed(&ckpt);
    // A new owner (or a restart) takes the checkpoint: the batch is a duplicate.
    let (mut again, stats) = state(SegmentConfig::default());
    again.restore(Some(ckpt));
    assert_eq!(again.generation(), 1);
    again.ingest(&gw_bundle(2, &[batch(home[0], 1, 0)]), &prov, Instant::now(), wall());
    assert_eq!(CloudStats::get(&stats.duplicates), 1);
    assert_eq!(again.take_segment().1.map(|r| r.readings()), None, "nothing to write");
    // Its bundle is still acked, and at once: nothing new is waiting to be written.
    let now = Instant::now();
    again.ingest(&gw_bundle(3, &[batch(home[0], 1, 0)]), &prov, now, wall());
    assert!(again.deadline().unwrap() <= now + Duration::from_millis(1));
    // The latest values came back with the checkpoint.
    let v = again.vehicle("acme", device_id(home[0]).as_str()).unwrap();
    assert!(v.signals.contains_key("Vehicle.Speed"), "{v:?}");
}

#[test]
fn the_segment_commits_at_its_age_limit_or_at_once_when_full() {
    let (home, _) = devices();
    let prov = fleet(200, 1);
    let cfg = SegmentConfig { max_age: Duration::from_secs(2), max_rows: 12, dedupe_epochs: 16 };
    let (mut s, _) = state(cfg);
    assert_eq!(s.deadline(), None, "nothing open");
    let t0 = Instant::now();
    s.ingest(&gw_bundle(1, &[batch(home[0], 1, 0)]), &prov, t0, wall());
    assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(2)));
    // Later bundles do not push the deadline.
    s.ingest(&gw_bundle(2, &[batch(home[0], 1, 1)]), &prov, t0 + Duration::from_secs(1), wall());
    assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(2)));
    // Full: at once.
    s.ingest(&gw_bundle(3, &[batch(home[0], 1, 2)]), &prov, t0 + Duration::from_secs(1), wall());
    assert_eq!(s.deadline(), Some(t0));
}

#[test]
fn what_cannot_be_used_becomes_a_dead_letter_once() {
    let (home, away) = devices();
    let prov = fleet(200, 1);
    let (mut s, stats) = state(SegmentConfig::default());
    let now = Instant::now();
    // A bundle of an unknown gateway, and one sealed with the wrong key.
    let stranger = bundle(&gateway_key(5), "gw-5", 1, 0, &[batch(home[0], 1, 0)], BASE_MS);
    let forged = bundle(&gateway_key(5), "gw-0", 1, 0, &[batch(home[0], 1, 0)], BASE_MS);
    s.ingest(&stranger, &prov, now, wall());
    s.ingest(&forged, &prov, now, wall());
    s.ingest(&forged, &prov, now, wall());
    // Batches: of another shard's device, of an unknown device, under a wrong key.
    let wrong_key = sealed_batch(device_id(home[1]).as_str(), &device_key(150), 1, 0, BASE_MS, 5, None);
    let stranger_dev = (200..2000).find(|i| shard_of("acme", device_id(*i).as_str(), SHARDS).0 == 0).unwrap();
    let unknown = batch(stranger_dev, 1, 0);
    let b = gw_bundle(2, &[batch(away, 1, 0), unknown.clone(), wrong_key.clone(), b"garbage".to_vec()]);
    s.ingest(&b, &prov, now, wall());
    // Unauthenticated dead letters are deduped by their bytes.
    s.ingest(&gw_bundle(3, &[unknown, wrong_key]), &prov, now, wall());
    let mut expected = vec![
        (reason::AUTH_FAILED, 1),
        (reason::BUNDLE_AUTH_FAILED, 1),
        (reason::MALFORMED, 1),
        (reason::UNKNOWN_DEVICE, 1),
        (reason::UNKNOWN_GATEWAY, 1),
        (reason::WRONG_SHARD, 1),
    ];
    expected.sort();
    assert_eq!(reasons(&stats), expected);
    assert_eq!(CloudStats::get(&stats.duplicates), 3);
    // The forged and unknown bundles are not acked; the others are.
    let (acks, _) = s.take_segment();
    assert_eq!(acks["gw-0"], vec![BundleId(2), BundleId(3)]);
    assert_eq!(acks.len(), 1);
}

#[test]
fn dead_letters_of_one_sender_are_bounded_per_interval_and_forgers_cannot_spend_a_gateways_allowance() {
    use crate::shard::{DeadLetterConfig, DeadLetterQuota};
    let (home, _) = devices();
    let prov = fleet(200, 1);
    let (mut s, stats) = state(SegmentConfig::default());
    let per = Duration::from_secs(60);
    s.set_deadletter_quota(Arc::new(DeadLetterQuota::new(DeadLetterConfig {
        quota: fleetline_service::ByteSize(64 * 1024),
        per,
    })));
    let t0 = Instant::now();
    // A stranger naming gw-0 floods 16 KiB bundles of garbage (each distinct).
    let garbage = |i: u32| {
        // Incompressible: bundles may be compressed.
        let mut x = u64::from(i) + 1;
        let g: Vec<u8> = (0..16 * 1024)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (x >> 56) as u8
            })
            .collect();
        bundle(&gateway_key(7), "gw-0", u64::from(i), 0, &[g], BASE_MS)
    };
    for i in 0..10 {
        s.ingest(&garbage(i), &prov, t0, wall());
    }
    let kept = stats.deadletters().values().sum::<u64>();
    let over = stats.deadletters_over_quota().values().sum::<u64>();
    assert!((3..=4).contains(&kept), "64 KiB of 16+ KiB letters: {kept}");
    assert_eq!(kept + over, 10, "every one counted, kept or over");
    assert!(stats.deadletters_over_quota().contains_key(reason::BUNDLE_AUTH_FAILED));
    // gw-0 itself (its seal verifies) still has its whole allowance: an unknown
    // reading kind from one of its units is kept.
    let wrong_key = sealed_batch(device_id(home[1]).as_str(), &device_key(150), 1, 0, BASE_MS, 5, None);
    s.ingest(&gw_bundle(100, &[wrong_key]), &prov, t0, wall());
    assert_eq!(stats.deadletters().get(reason::AUTH_FAILED), Some(&1));
    // The next interval starts afresh for the claimed sender too.
    s.ingest(&garbage(11), &prov, t0 + per, wall());
    assert_eq!(stats.deadletters().values().sum::<u64>(), kept + 2);
    // What was dropped is not in the segment.
    let (_, rows) = s.take_segment();
    assert_eq!(rows.unwrap().deadletters() as u64, kept + 2);
}

#[test]
fn readings_dated_in_the_future_or_before_the_floor_are_refused_late_ones_kept() {
    let (home, _) = devices();
    let prov = fleet(200, 1);
    let (mut s, stats) = state(SegmentConfig::default());
    let i = home[0];
    let received = BASE_MS + 3_600_000;
    let ahead = sealed_batch(device_id(i).as_str(), &device_key(i), 1, 0, received + 600_000, 1, None);
    let unset = sealed_batch(device_id(i).as_str(), &device_key(i), 1, 1, 1_000, 1, None);
    let late = sealed_batch(device_id(i).as_str(), &device_key(i), 1, 2, BASE_MS, 1, None);
    let b = bundle(&gateway_key(0), "gw-0", 1, 0, &[ahead, unset, late], received);
    s.ingest(&b, &prov, Instant::now(), wall());
    assert_eq!(reasons(&stats), vec![(reason::BEFORE_EPOCH_FLOOR, 1), (reason::FUTURE_TIMESTAMP, 1)]);
    let rows = s.take_segment().1.unwrap();
    assert_eq!((rows.readings(), rows.deadletters()), (1, 2), "the late reading kept");
}

#[test]
fn batches_of_a_forgotten_boot_epoch_are_never_stored_again() {
    let (home, _) = devices();
    let prov = fleet(200, 1);
    let cfg = SegmentConfig { dedupe_epochs: 2, ..Default::default() };
    let (mut s, stats) = state(cfg);
    let i = home[0];
    for (id, epoch) in [(1, 1), (2, 2), (3, 3)] {
        s.ingest(&gw_bundle(id, &[batch(i, epoch, 0)]), &prov, Instant::now(), wall());
    }
    // Epoch 1 is forgotten: a replay of it would otherwise be stored twice.
    s.ingest(&gw_bundle(4, &[batch(i, 1, 0)]), &prov, Instant::now(), wall());
    s.ingest(&gw_bundle(5, &[batch(i, 1, 0)]), &prov, Instant::now(), wall());
    assert_eq!(reasons(&stats), vec![(reason::STALE_EPOCH, 1)]);
    assert_eq!(CloudStats::get(&stats.duplicates), 1, "the second replay is a duplicate dead letter");
    assert_eq!(CloudStats::get(&stats.samples_received), 15);
}

#[test]
fn a_rotated_key_is_accepted_until_its_window_closes() {
    let (home, _) = devices();
    let i = home[0];
    let mut prov: Provisioning = fleet(200, 1);
    let until = wall() + Duration::from_secs(60);
    let new_key = DeviceKey::from_bytes([7; 32]);
    prov.upsert_device(DeviceEntry {
        fleet: FleetId::new("acme").unwrap(),
        device: device_id(i),
        key: new_key,
        previous: Some((device_key(i), until)),
        revoked: false,
    });
    let (mut s, stats) = state(SegmentConfig::default());
    // Sealed with the previous key: valid inside the window, refused after it.
    s.ingest(&gw_bundle(1, &[batch(i, 1, 0)]), &prov, Instant::now(), wall());
    s.ingest(&gw_bundle(2, &[batch(i, 1, 1)]), &prov, Instant::now(), until);
    assert_eq!(CloudStats::get(&stats.samples_received), 5);
    assert_eq!(reasons(&stats), vec![(reason::AUTH_FAILED, 1)]);
}

#[test]
fn a_unit_its_gateway_stops_hearing_while_hearing_others_is_silent_once() {
    let (home, _) = devices();
    let prov = fleet(200, 1);
    let (mut s, stats) = state(SegmentConfig::default());
    s.set_analytics(crate::analytics::AnalyticsConfig { silent_after: Duration::from_secs(60), ..Default::default() });
    let (a, b) = (home[0], home[1]);
    // Both units heard at the start; then only `a`, every 10 s of the gateway's clock.
    let at = |ms: u64, batches: &[Vec<u8>], id: u64| bundle(&gateway_key(0), "gw-0", id, 0, batches, BASE_MS + ms);
    s.ingest(&at(0, &[batch(a, 1, 0), batch(b, 1, 0)], 1), &prov, Instant::now(), wall());
    for i in 1..=12u32 {
        s.ingest(&at(u64::from(i) * 10_000, &[batch(a, 1, i)], u64::from(i) + 1), &prov, Instant::now(), wall());
    }
    assert_eq!(stats.events().get("silent"), Some(&1), "{:?}", stats.events());
    // Heard again: the silence ends; no second event while it talks.
    s.ingest(&at(130_000, &[batch(b, 1, 1)], 20), &prov, Instant::now(), wall());
    s.ingest(&at(140_000, &[batch(a, 1, 13), batch(b, 1, 2)], 21), &prov, Instant::now(), wall());
    assert_eq!(stats.events().get("silent"), Some(&1));
}

mod models {
    use super::*;
    use crate::analytics::AggregateRow;
    use crate::inference::registry::{ActiveModel, ActiveSet, LiveVariant};
    use crate::inference::{Variant, stage};
    use fleetline_inference::{ModelKind, Plan};

    fn window(start: i64, pmin: f64, leak: f64) -> AggregateRow {
        AggregateRow {
            window: "1m",
            start,
            end: start + MINUTE_MS,
            samples: 40,
            distance_m: 900.0,
            speed_readings: 6,
            avg_speed_kmh: Some(54.0),
            max_speed_kmh: Some(70.0),
            fuel_used_l: Some(0.3),
            fuel_l_per_100km: Some(33.0),
            tire_readings: 24,
            tire_pressure_min_kpa: Some(pmin),
            tire_pressure_mean_kpa: Some(if leak > 10.0 { 876.0 } else { pmin + 1.0 }),
            tire_pressure_max_kpa: Some(if leak > 10.0 { 881.0 } else { pmin + 2.0 }),
            leak_rate_kpa_h: Some(leak),
        }
    }

    fn plan(kind: ModelKind) -> Arc<Plan> {
        let path = format!("{}/../models/{}/model.onnx", env!("CARGO_MANIFEST_DIR"), kind.name());
        Arc::new(Plan::load(kind, &std::fs::read(path).unwrap()).unwrap())
    }

    fn tire_only(shadow: bool) -> ActiveSet {
        let live = |label: &str, version: u32| LiveVariant {
            variant: Variant { label: label.into(), version, weight: 1 },
            plan: plan(ModelKind::TireRisk),
        };
        ActiveSet {
            models: vec![ActiveModel {
                kind: ModelKind::TireRisk,
                variants: vec![live("A", 1), live("B", 2)],
                shadow: shadow.then(|| (3, plan(ModelKind::TireRisk))),
                threshold: 0.5,
                deployed_ms: 1,
            }],
        }
    }

    #[test]
    fn closed_windows_become_feature_rows_as_their_history_allows() {
        let (mut s, _) = state(SegmentConfig::default());
        let (f, d): (Arc<str>, Arc<str>) = ("acme".into(), "veh-1".into());
        let t0 = 1_796_180_040_000 / MINUTE_MS * MINUTE_MS;
        for i in 0..3 {
            s.take_output(&f, &d, Output { aggregates: vec![window(t0 + i * MINUTE_MS, 887.0, 0.3)], events: vec![] });
        }
        let kinds: Vec<Vec<ModelKind>> =
            s.take_scoring().iter().map(|r| r.rows.iter().map(|(k, _)| *k).collect()).collect();
        assert_eq!(
            kinds,
            vec![
                vec![ModelKind::Fuel],
                vec![ModelKind::TireRisk, ModelKind::Fuel],
                vec![ModelKind::TireRisk, ModelKind::Fuel, ModelKind::SpeedNext],
            ]
        );
        // A gap: the next window has no predecessor, only the one-window model scores it.
        s.take_output(&f, &d, Output { aggregates: vec![window(t0 + 5 * MINUTE_MS, 887.0, 0.3)], events: vec![] });
        let after_gap = s.take_scoring();
        assert_eq!(after_gap.len(), 1);
        assert_eq!(after_gap[0].rows.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![ModelKind::Fuel]);
        // The history goes into the checkpoint and comes back from it.
        let (_, rows) = s.take_segment();
        let ckpt = s.checkpoint(1, 1, Vec::new(), &rows.unwrap());
        assert_eq!(ckpt.models.len(), 1);
        assert_eq!(ckpt.models[0].windows.len(), 3);
        let (mut again, _) = state(SegmentConfig::default());
        again.restore(Some(ckpt));
        again.take_output(&f, &d, Output { aggregates: vec![window(t0 + 6 * MINUTE_MS, 887.0, 0.3)], events: vec![] });
        assert_eq!(again.take_scoring()[0].rows.len(), 2, "tire risk has its window before after a restart");
    }

    #[test]
    fn a_tire_risk_crossing_its_threshold_raises_one_event_and_the_shadow_none() {
        let (mut s, stats) = state(SegmentConfig::default());
        let t0 = 1_796_180_040_000 / MINUTE_MS * MINUTE_MS;
        let (f, d): (Arc<str>, Arc<str>) = ("acme".into(), "veh-1".into());
        // Steady, then a leak for three windows, steady again, a leak again.
        let plan = [
            (887.0, 0.3),
            (887.0, 0.3),
            (858.0, 84.0),
            (857.0, 85.0),
            (856.0, 86.0),
            (887.0, 0.2),
            (887.0, 0.3),
            (858.0, 84.0),
            (857.0, 84.0),
        ];
        let mut events = Vec::new();
        let mut predictions = Vec::new();
        for (i, (pmin, leak)) in plan.into_iter().enumerate() {
            s.take_output(
                &f,
                &d,
                Output { aggregates: vec![window(t0 + i as i64 * MINUTE_MS, pmin, leak)], events: vec![] },
            );
            let requests = s.take_scoring();
            let (_, rows) = s.take_segment();
            let mut rows = rows.unwrap();
            s.apply_scores(stage::score(&tire_only(true), &requests), &mut rows);
            events.extend(rows.events().cloned());
            predictions.extend(rows.predictions().cloned());
        }
        let at: Vec<i64> = events.iter().map(|e| (e.ts_ms - t0) / MINUTE_MS).collect();
        assert_eq!(at, vec![2, 7], "one event per crossing: {events:#?}");
        assert!(events.iter().all(|e| e.kind == EventKind::TireRisk && e.value.unwrap() >= 0.5));
        // Every window after the first scored by one live variant and the shadow.
        let tire: Vec<_> = predictions.iter().filter(|p| p.model == "tire_risk").collect();
        assert_eq!(tire.len(), 2 * (plan.len() - 1));
        assert_eq!(tire.iter().filter(|p| &*p.variant == "shadow").count(), plan.len() - 1);
        assert!(tire.iter().all(|p| (&*p.variant == "shadow") == (p.version == 3)));
        assert_eq!(stats.events().get("tire_risk"), Some(&2));
    }
}
