//! Unit tests of the sans-IO core: batching, sealing, the outbox and control messages.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use fleetline_wire::control::{self, AckRange, Command, random_nonce};
use fleetline_wire::signals::{SIGNALS, kind};
use fleetline_wire::{DeviceId, DeviceKey, FleetId, open_batch};
use proptest::prelude::*;

use crate::*;

const KEY: [u8; 32] = [0x5a; 32];
const T0: u64 = 1_790_000_000_000;

fn config(when_full: OutboxFull) -> Config {
    Config {
        fleet: FleetId::new("acme").unwrap(),
        device: DeviceId::new("truck-7").unwrap(),
        key: DeviceKey::from_bytes(KEY),
        flush: FlushPolicy { max_samples: 10, max_bytes: 400, max_age_ms: 5_000 },
        resend_after_ms: 1_000,
        when_full,
    }
}

type Small = Device<10, 400, 3>;

fn device(when_full: OutboxFull) -> Small {
    Device::new(config(when_full), BootState { epoch: 4, last_command_counter: 0 }).unwrap()
}

fn speed(i: u64) -> Reading {
    Reading { kind: kind::SPEED, time_ms: T0 + i * 1000, value: (i % 100) as f64 }
}

fn ack(sender: &str, counter: u64, ranges: &[AckRange]) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let n = control::seal_ack(&mut buf, &DeviceKey::from_bytes(KEY), sender, counter, random_nonce().unwrap(), ranges)
        .unwrap();
    buf.truncate(n);
    buf
}

fn seqs(epoch: u32, seqs: &[u32]) -> Vec<AckRange> {
    seqs.iter().map(|&s| AckRange { epoch, first: s, count: 1 }).collect()
}

/// Drains everything due, returning the seqs published.
fn publish_all(dev: &mut Small, now: u64) -> Vec<u32> {
    let mut out = vec![];
    while let Some(tx) = dev.poll_transmit(now) {
        out.push(tx.seq);
    }
    out
}

fn decode(payload: &[u8]) -> fleetline_wire::decode::DecodedBatch {
    let mut p = payload.to_vec();
    open_batch(&mut p, &DeviceKey::from_bytes(KEY)).unwrap().decode().unwrap()
}

#[test]
fn seals_on_count_and_the_batch_holds_exactly_the_readings() {
    let mut dev = device(OutboxFull::Block);
    for i in 0..10 {
        dev.record(0, speed(i)).unwrap();
    }
    assert_eq!(dev.outbox_len(), 0, "ten readings fill but do not overflow the batch");
    dev.record(0, speed(10)).unwrap();
    assert_eq!((dev.outbox_len(), dev.open_samples()), (1, 1));
    let tx = dev.poll_transmit(0).unwrap();
    assert_eq!((tx.seq, tx.resend, tx.topic), (0, false, "fleetline/v1/acme/truck-7/up"));
    let batch = decode(tx.payload);
    assert_eq!((batch.epoch, batch.seq, batch.device.as_str()), (4, 0, "truck-7"));
    let got: Vec<_> = batch.samples.iter().map(|s| (s.ts_ms as u64, s.value)).collect();
    let want: Vec<_> = (0..10).map(|i| (T0 + i * 1000, i as f64)).collect();
    assert_eq!(got, want);
}

#[test]
fn seals_on_age_and_on_bytes() {
    let mut dev = device(OutboxFull::Block);
    dev.record(100, speed(0)).unwrap();
    assert!(dev.poll_transmit(5_099).is_none());
    assert_eq!(dev.poll_deadline(), Some(5_100));
    assert_eq!(dev.poll_transmit(5_100).unwrap().seq, 0);

    // Latitudes jumping across the globe cost ~6 bytes a sample: 150 bytes are
    // reached long before 60 samples.
    let mut cfg = config(OutboxFull::Block);
    cfg.flush.max_samples = 60;
    cfg.flush.max_bytes = 150;
    let mut dev: Device<60, 400, 8> = Device::new(cfg, BootState::default()).unwrap();
    for i in 0..60u64 {
        let lat = if i % 2 == 0 { -89.0 } else { 89.0 };
        dev.record(0, Reading { kind: kind::LATITUDE, time_ms: T0 + i * 1000, value: lat }).unwrap();
    }
    dev.flush(0).unwrap();
    let mut sizes = vec![];
    let mut total = 0;
    while let Some(tx) = dev.poll_transmit(0) {
        sizes.push(tx.payload.len());
        total += decode(tx.payload).samples.len();
    }
    assert_eq!(total, 60);
    assert!(sizes.len() >= 3, "{sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 150), "{sizes:?}");
    // Every batch but the flushed remainder is sealed within a sample and the
    // series-framing slack of the limit.
    assert!(sizes[..sizes.len() - 1].iter().all(|&n| n >= 150 - 12), "{sizes:?}");
}

#[test]
fn rejects_invalid_readings_with_counted_errors() {
    let mut dev = device(OutboxFull::Block);
    let bad = |kind, value| Reading { kind, time_ms: T0, value };
    assert_eq!(dev.record(0, bad(fleetline_wire::SignalKind(999), 1.0)), Err(RecordError::UnknownKind(999)));
    assert_eq!(dev.record(0, bad(kind::SPEED, -5.0)), Err(RecordError::OutOfRange(kind::SPEED)));
    assert_eq!(dev.record(0, bad(kind::SPEED, f64::NAN)), Err(RecordError::NotFinite(kind::SPEED)));
    assert_eq!(dev.stats().readings_invalid, 3);
    assert!(dev.is_idle());
}

#[test]
fn lost_acks_mean_resends_until_acked() {
    let mut dev = device(OutboxFull::Block);
    dev.record(0, speed(0)).unwrap();
    dev.flush(0).unwrap();
    assert_eq!(publish_all(&mut dev, 0), [0]);
    assert_eq!(publish_all(&mut dev, 999), Vec::<u32>::new());
    assert_eq!(publish_all(&mut dev, 1_000), [0], "re-sent after the timeout");
    assert_eq!(dev.stats().resends, 1);
    let out = dev.handle_ack(&mut ack("gw-1", 1, &seqs(4, &[0]))).unwrap();
    assert_eq!(out, AckOutcome { batches: 1, samples: 1 });
    assert!(dev.is_idle());
    assert_eq!(publish_all(&mut dev, 10_000), Vec::<u32>::new());
}

#[test]
fn duplicated_reordered_and_gapped_acks_release_exactly_what_they_name() {
    let mut dev = device(OutboxFull::Block);
    for i in 0..3 {
        dev.record(0, speed(i)).unwrap();
        dev.flush(0).unwrap();
    }
    assert_eq!(publish_all(&mut dev, 0), [0, 1, 2]);
    // Gapped and reordered: seq 2 first, then 0; seq 1 never acked yet.
    assert_eq!(dev.handle_ack(&mut ack("gw-1", 10, &seqs(4, &[2]))).unwrap().batches, 1);
    assert_eq!(dev.handle_ack(&mut ack("gw-1", 11, &seqs(4, &[0]))).unwrap().batches, 1);
    // A duplicate of an earlier ack with a fresh counter names nothing held: stale.
    assert_eq!(dev.handle_ack(&mut ack("gw-1", 12, &seqs(4, &[0, 2]))).unwrap().batches, 0);
    assert_eq!(dev.stats().acks_stale, 1);
    // An ack for another epoch releases nothing of this one.
    assert_eq!(dev.handle_ack(&mut ack("gw-1", 13, &seqs(3, &[1]))).unwrap().batches, 0);
    assert_eq!(dev.outbox_len(), 1);
    // Seq 1 is the only one re-sent.
    assert_eq!(publish_all(&mut dev, 1_000), [1]);
    assert_eq!(dev.handle_ack(&mut ack("gw-1", 14, &[AckRange { epoch: 4, first: 0, count: 3 }])).unwrap().batches, 1);
    assert!(dev.is_idle());
    assert_eq!(dev.stats().batches_acked, 3);
}

#[test]
fn forged_and_replayed_acks_are_ignored_and_counted() {
    let mut dev = device(OutboxFull::Block);
    dev.record(0, speed(0)).unwrap();
    dev.flush(0).unwrap();
    publish_all(&mut dev, 0);

    // Forged: sealed with another key.
    let mut buf = vec![0u8; 256];
    let n = control::seal_ack(
        &mut buf,
        &DeviceKey::from_bytes([1; 32]),
        "gw-1",
        1,
        random_nonce().unwrap(),
        &seqs(4, &[0]),
    )
    .unwrap();
    assert!(matches!(dev.handle_ack(&mut buf[..n]), Err(ControlError::Invalid(_))));
    // Garbage.
    assert!(matches!(dev.handle_ack(&mut [1, 2, 3]), Err(ControlError::Invalid(_))));
    assert_eq!(dev.stats().acks_invalid, 2);
    assert_eq!(dev.outbox_len(), 1);

    // A captured ack for another batch, replayed after the counter moved on.
    let old = ack("gw-1", 5, &seqs(4, &[9]));
    assert_eq!(dev.handle_ack(&mut ack("gw-1", 6, &seqs(4, &[7]))).unwrap().batches, 0);
    assert_eq!(dev.handle_ack(&mut old.clone()), Err(ControlError::Replayed));
    let current = ack("gw-1", 7, &seqs(4, &[0]));
    assert_eq!(dev.handle_ack(&mut current.clone()).unwrap().batches, 1);
    assert_eq!(dev.handle_ack(&mut current.clone()), Err(ControlError::Replayed));
    assert_eq!(dev.stats().acks_replayed, 2);

    // Another gateway has its own counter.
    dev.record(0, speed(1)).unwrap();
    dev.flush(0).unwrap();
    assert_eq!(dev.handle_ack(&mut ack("gw-2", 1, &seqs(4, &[1]))).unwrap().batches, 1);
}

#[test]
fn block_policy_refuses_readings_and_loses_nothing() {
    let mut dev = device(OutboxFull::Block);
    // 3 outbox slots × 10 + 10 open readings.
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..60 {
        match dev.record(0, speed(i)) {
            Ok(()) => accepted += 1,
            Err(RecordError::Backpressure) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((accepted, refused), (40, 20));
    assert_eq!(dev.stats().readings_refused, 20);
    assert_eq!(dev.stats().batches_dropped, 0);
    // Aged batch cannot seal either; stays open.
    assert_eq!(publish_all(&mut dev, 10_000).len(), 3);
    assert_eq!(dev.open_samples(), 10);
    dev.handle_ack(&mut ack("gw-1", 1, &seqs(4, &[1]))).unwrap();
    // Room again: the aged batch seals on the next poll and new readings are taken.
    assert!(publish_all(&mut dev, 10_001).contains(&3));
    dev.record(10_001, speed(100)).unwrap();
    assert_eq!(dev.stats().samples_sealed, 40);
}

#[test]
fn drop_oldest_evicts_oldest_first_and_counts_exactly() {
    let mut dev = device(OutboxFull::DropOldest);
    for i in 0..60 {
        dev.record(0, speed(i)).unwrap();
    }
    // 5 batches sealed into 3 slots: seqs 0 and 1 evicted; 10 still open.
    assert_eq!(dev.stats().batches_sealed, 5);
    assert_eq!((dev.stats().batches_dropped, dev.stats().samples_dropped), (2, 20));
    let mut held = publish_all(&mut dev, 0);
    held.sort();
    assert_eq!(held, [2, 3, 4]);
    assert_eq!(dev.stats().readings_recorded, 60);
}

#[test]
fn reconnect_makes_everything_due_again() {
    let mut dev = device(OutboxFull::Block);
    for i in 0..2 {
        dev.record(0, speed(i)).unwrap();
        dev.flush(0).unwrap();
    }
    assert_eq!(publish_all(&mut dev, 0).len(), 2);
    assert!(publish_all(&mut dev, 10).is_empty());
    dev.on_connected(10);
    assert_eq!(publish_all(&mut dev, 10), [0, 1]);
}

#[test]
fn commands_apply_once_and_replays_or_forgeries_are_ignored() {
    let mut dev = device(OutboxFull::Block);
    let cmd = |counter, c: &Command| {
        let mut buf = vec![0u8; 256];
        let n =
            control::seal_command(&mut buf, &DeviceKey::from_bytes(KEY), "cloud", counter, random_nonce().unwrap(), c)
                .unwrap();
        buf.truncate(n);
        buf
    };
    let set = Command::SetFlushPolicy { max_samples: 5, max_bytes: 0, max_age_ms: 0 };
    let msg = cmd(3, &set);
    assert_eq!(dev.handle_command(0, &mut msg.clone()).unwrap(), set);
    assert_eq!(dev.config().flush.max_samples, 5);
    assert_eq!(dev.last_command_counter(), 3);
    assert_eq!(dev.handle_command(0, &mut msg.clone()), Err(ControlError::Replayed));
    let too_big = Command::SetFlushPolicy { max_samples: 500, max_bytes: 0, max_age_ms: 0 };
    assert!(matches!(dev.handle_command(0, &mut cmd(4, &too_big)), Err(ControlError::Invalid(_))));
    assert_eq!(dev.config().flush.max_samples, 5);
    // An ack is not a command even under the right key.
    assert!(matches!(dev.handle_command(0, &mut ack("cloud", 9, &[])), Err(ControlError::Invalid(_))));
    dev.record(0, speed(0)).unwrap();
    dev.handle_command(0, &mut cmd(5, &Command::FlushNow)).unwrap();
    assert_eq!(dev.outbox_len(), 1);
    // The counter survives a reboot through BootState.
    let mut rebooted: Small = Device::new(
        config(OutboxFull::Block),
        BootState { epoch: 5, last_command_counter: dev.last_command_counter() },
    )
    .unwrap();
    assert_eq!(rebooted.handle_command(0, &mut cmd(5, &Command::FlushNow)), Err(ControlError::Replayed));
}

#[test]
fn config_is_checked_against_capacities() {
    let mut cfg = config(OutboxFull::Block);
    cfg.flush.max_samples = 11;
    assert_eq!(Small::new(cfg.clone(), BootState::default()).err(), Some(ConfigError::MaxSamples));
    cfg.flush.max_samples = 10;
    cfg.flush.max_bytes = 401;
    assert_eq!(Small::new(cfg.clone(), BootState::default()).err(), Some(ConfigError::MaxBytes));
    cfg.flush.max_bytes = 20;
    assert_eq!(Small::new(cfg.clone(), BootState::default()).err(), Some(ConfigError::MaxBytes));
    cfg.flush.max_bytes = 400;
    cfg.resend_after_ms = 0;
    assert_eq!(Small::new(cfg, BootState::default()).err(), Some(ConfigError::ZeroDuration));
}

#[test]
fn mqtt_password_is_derived_not_the_key() {
    let dev = device(OutboxFull::Block);
    let pw = dev.mqtt_password();
    assert_eq!(dev.mqtt_username().as_str(), "acme.truck-7");
    assert_eq!(&pw, &DeviceKey::from_bytes(KEY).mqtt_password("acme.truck-7"));
    assert!(!pw.windows(2).all(|w| w == b"5a"));
}

fn arb_reading() -> impl Strategy<Value = (usize, f64, u64)> {
    (0..SIGNALS.len(), 0.0f64..1.0, 0u64..600_000)
}

proptest! {
    /// Whatever arrives, every sealed batch fits the byte limit, opens, and together
    /// the batches hold exactly the readings taken, in order per kind.
    #[test]
    fn sealed_batches_respect_limits_and_hold_every_reading(
        readings in prop::collection::vec(arb_reading(), 1..200),
        max_bytes in 140u16..400,
    ) {
        let mut cfg = config(OutboxFull::Block);
        cfg.flush.max_bytes = max_bytes;
        let mut dev: Device<10, 400, 64> = Device::new(cfg, BootState { epoch: 1, last_command_counter: 0 }).unwrap();
        let mut expected = vec![];
        for (i, frac, t) in readings {
            let spec = SIGNALS[i];
            let value = spec.min + (spec.max - spec.min) * frac;
            let r = Reading { kind: spec.kind, time_ms: T0 + t, value };
            dev.record(0, r).unwrap();
            let raw = spec.quantize(value).unwrap();
            expected.push((spec.kind.0, T0 + t, raw as i64));
        }
        dev.flush(0).unwrap();
        let mut got = vec![];
        while let Some(tx) = dev.poll_transmit(0) {
            prop_assert!(tx.payload.len() <= usize::from(max_bytes), "{} > {}", tx.payload.len(), max_bytes);
            let b = decode(tx.payload);
            got.extend(b.samples.iter().map(|s| (b.seq, s.kind.0, s.ts_ms as u64, s.raw)));
        }
        got.sort_by_key(|g| g.0);
        let mut got: Vec<_> = got.into_iter().map(|(_, k, t, r)| (k, t, r)).collect();
        got.sort();
        expected.sort();
        prop_assert_eq!(got, expected);
    }
}

#[derive(Clone, Debug)]
enum Op {
    Record(u8),
    Advance(u16),
    /// Ack a random subset of what was published, possibly stale or duplicated.
    Ack(Vec<u8>),
    Reconnect,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Record),
        2 => (0u16..3000).prop_map(Op::Advance),
        2 => prop::collection::vec(any::<u8>(), 0..6).prop_map(Op::Ack),
        1 => Just(Op::Reconnect),
    ]
}

proptest! {
    /// Acks lost, duplicated, reordered and gapped at random: the outbox never loses a
    /// batch, never stalls, and ends empty once the gateway acks everything it saw.
    #[test]
    fn outbox_survives_any_ack_pattern(ops in prop::collection::vec(arb_op(), 1..200), drop_oldest in any::<bool>()) {
        let policy = if drop_oldest { OutboxFull::DropOldest } else { OutboxFull::Block };
        let mut dev = device(policy);
        let mut now = 0u64;
        let mut published: Vec<u32> = vec![];
        let mut counter = 0;
        let mut recorded = 0u64;
        for op in ops {
            match op {
                Op::Record(v) => {
                    if dev.record(now, speed(u64::from(v))).is_ok() {
                        recorded += 1;
                    }
                }
                Op::Advance(ms) => now += u64::from(ms),
                Op::Ack(picks) if !published.is_empty() => {
                    let seqs_: Vec<u32> = picks.iter().map(|p| published[usize::from(*p) % published.len()]).collect();
                    counter += 1;
                    dev.handle_ack(&mut ack("gw-1", counter, &seqs(4, &seqs_))).unwrap();
                }
                Op::Ack(_) => {}
                Op::Reconnect => dev.on_connected(now),
            }
            published.extend(publish_all(&mut dev, now));
            let s = *dev.stats();
            // Every sealed batch is held, acked or counted as dropped.
            prop_assert_eq!(s.batches_sealed, dev.outbox_len() as u64 + s.batches_acked + s.batches_dropped);
            prop_assert!(dev.outbox_len() <= 3);
        }
        // The gateway finally acks everything ever published: nothing stays behind.
        dev.flush(now).ok();
        published.extend(publish_all(&mut dev, now));
        now += 1_000;
        published.extend(publish_all(&mut dev, now));
        counter += 1;
        let all: Vec<u32> = (0..dev.stats().batches_sealed as u32).collect();
        dev.handle_ack(&mut ack("gw-1", counter, &[AckRange { epoch: 4, first: 0, count: all.len().max(1) as u32 }])).unwrap();
        let s = *dev.stats();
        if dev.open_samples() == 0 {
            prop_assert_eq!(dev.outbox_len(), 0);
            prop_assert_eq!(s.samples_acked + s.samples_dropped, recorded);
        }
        if !drop_oldest {
            prop_assert_eq!(s.batches_dropped, 0);
        }
    }
}

#[test]
fn new_in_builds_in_the_slot_and_leaves_it_alone_on_a_refused_config() {
    let mut slot: Option<Small> = None;
    let mut bad = config(OutboxFull::Block);
    bad.flush.max_samples = 0;
    assert_eq!(Small::new_in(&mut slot, bad, BootState::default()).err(), Some(ConfigError::MaxSamples));
    assert!(slot.is_none());
    let dev = Small::new_in(&mut slot, config(OutboxFull::Block), BootState { epoch: 7, last_command_counter: 3 })
        .expect("a good config");
    assert_eq!((dev.epoch(), dev.last_command_counter()), (7, 3));
    dev.record(0, speed(0)).unwrap();
    assert_eq!(slot.as_ref().map(Small::open_samples), Some(1), "the device is the slot's");
}
