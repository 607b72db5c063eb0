//! Integration tests of the wire formats: golden vectors, round trips, tampering.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use fleetline_wire::batch::BATCH_FORMAT;
use fleetline_wire::control::{self, AckRange, Command, ControlKind};
use fleetline_wire::signals::{self, SIGNALS, SignalKind, kind};
use fleetline_wire::{
    BatchHeader, BatchWriter, DeviceKey, SCHEMA_V1, WireError, open_batch, open_control, peek_header,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::path::PathBuf;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// A batch description as it appears in a golden vector.
#[derive(Clone, Debug)]
struct BatchSpec {
    key: [u8; 32],
    fleet: String,
    device: String,
    epoch: u32,
    seq: u32,
    base_time_ms: u64,
    known: Vec<(u16, Vec<(i64, i64)>)>,
    unknown: Vec<(u16, Vec<u8>)>,
}

impl BatchSpec {
    fn seal(&self) -> Vec<u8> {
        let header = BatchHeader {
            format: BATCH_FORMAT,
            schema: SCHEMA_V1,
            fleet: &self.fleet,
            device: &self.device,
            epoch: self.epoch,
            seq: self.seq,
            base_time_ms: self.base_time_ms,
        };
        let mut buf = vec![0u8; 16 * 1024];
        assert_eq!(header.encoded_len(), postcard::to_allocvec(&header).unwrap().len());
        let mut w = BatchWriter::new(&mut buf, &header).unwrap();
        for (k, samples) in &self.known {
            w.begin_series(SignalKind(*k)).unwrap();
            for (t, v) in samples {
                w.push(*t, *v).unwrap();
            }
        }
        for (k, raw) in &self.unknown {
            w.raw_series(*k, raw).unwrap();
        }
        let n = w.seal(&DeviceKey::from_bytes(self.key)).unwrap();
        buf.truncate(n);
        buf
    }

    fn to_json(&self, description: &str) -> Value {
        json!({
            "type": "batch",
            "description": description,
            "key": hex::encode(self.key),
            "header": {"format": BATCH_FORMAT, "schema": SCHEMA_V1, "fleet": self.fleet, "device": self.device,
                       "epoch": self.epoch, "seq": self.seq, "base_time_ms": self.base_time_ms},
            "series": self.known.iter().map(|(k, s)| json!({"kind": k, "path": signals::spec(SignalKind(*k)).unwrap().path, "samples": s})).collect::<Vec<_>>(),
            "unknown_series": self.unknown.iter().map(|(k, r)| json!({"kind": k, "raw": hex::encode(r)})).collect::<Vec<_>>(),
            "sealed": hex::encode(self.seal()),
        })
    }

    fn from_json(v: &Value) -> Self {
        let h = &v["header"];
        Self {
            key: hex::decode(v["key"].as_str().unwrap()).unwrap().try_into().unwrap(),
            fleet: h["fleet"].as_str().unwrap().into(),
            device: h["device"].as_str().unwrap().into(),
            epoch: h["epoch"].as_u64().unwrap() as u32,
            seq: h["seq"].as_u64().unwrap() as u32,
            base_time_ms: h["base_time_ms"].as_u64().unwrap(),
            known: v["series"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let samples = s["samples"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_i64().unwrap(), p[1].as_i64().unwrap()))
                        .collect();
                    (s["kind"].as_u64().unwrap() as u16, samples)
                })
                .collect(),
            unknown: v["unknown_series"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["kind"].as_u64().unwrap() as u16, hex::decode(s["raw"].as_str().unwrap()).unwrap()))
                .collect(),
        }
    }
}

fn drive_spec() -> BatchSpec {
    let secs = |n: i64| (0..n).map(move |i| i * 1000);
    BatchSpec {
        key: core::array::from_fn(|i| i as u8),
        fleet: "acme".into(),
        device: "truck-0042".into(),
        epoch: 7,
        seq: 1234,
        base_time_ms: 1_790_000_000_000,
        known: vec![
            (
                kind::LATITUDE.0,
                secs(5).zip([525_200_084, 525_200_321, 525_200_560, 525_200_801, 525_201_040]).collect(),
            ),
            (
                kind::LONGITUDE.0,
                secs(5).zip([134_049_540, 134_049_702, 134_049_861, 134_050_020, 134_050_185]).collect(),
            ),
            (kind::SPEED.0, secs(5).zip([523, 531, 540, 544, 538]).collect()),
            // Crosses north: 359.5° → 0.2° → 1.0°, and a 250 ms late sample.
            (kind::HEADING.0, vec![(0, 3595), (1000, 3598), (2000, 2), (3250, 10)]),
            (kind::tire_pressure(kind::Wheel { row: 1, right: false }).unwrap().0, vec![(-400, 8120), (9600, 8118)]),
            (kind::FUEL_RELATIVE_LEVEL.0, vec![(0, 623)]),
        ],
        unknown: vec![],
    }
}

fn golden_batches() -> Vec<(&'static str, &'static str, BatchSpec)> {
    let minimal = BatchSpec {
        key: [0x42; 32],
        fleet: "f".into(),
        device: "d".into(),
        epoch: 0,
        seq: 0,
        base_time_ms: 0,
        known: vec![(kind::SPEED.0, vec![(0, 0)])],
        unknown: vec![],
    };
    let mut unknown = drive_spec();
    unknown.seq = 1235;
    unknown.known.truncate(1);
    unknown.unknown = vec![(900, vec![0x00, 0x02, 0x02, 0x04]), (65535, vec![0xff, 0x01])];
    vec![
        ("batch-minimal", "one speed sample of 0 km/h at the base time", minimal),
        (
            "batch-drive",
            "five seconds of location, speed and heading (crossing north), a tire sample from before the base time, fuel",
            drive_spec(),
        ),
        ("batch-unknown-kinds", "a known series followed by two series of kinds schema 1 does not define", unknown),
    ]
}

fn golden_controls() -> Vec<(&'static str, Value, Vec<u8>)> {
    let key = DeviceKey::from_bytes(core::array::from_fn(|i| i as u8));
    let mut nonce = [0u8; 12];
    nonce[0] = 0x02;
    nonce[11] = 1;
    let ranges = [AckRange { epoch: 7, first: 1230, count: 5 }, AckRange { epoch: 8, first: 0, count: 1 }];
    let mut buf = [0u8; 512];
    let n = control::seal_ack(&mut buf, &key, "gw-depot-1", 1_790_000_000_000_123, nonce, &ranges).unwrap();
    let ack = buf[..n].to_vec();
    nonce[11] = 2;
    let cmd = Command::SetFlushPolicy { max_samples: 120, max_bytes: 1024, max_age_ms: 30_000 };
    let n = control::seal_command(&mut buf, &key, "cloud", 99, nonce, &cmd).unwrap();
    let cmd_bytes = buf[..n].to_vec();
    vec![
        (
            "ack-two-ranges",
            json!({"type": "ack", "description": "an ack naming seqs 1230..1235 of epoch 7 and seq 0 of epoch 8",
                   "key": hex::encode(key.as_bytes()), "sender": "gw-depot-1", "counter": 1_790_000_000_000_123u64,
                   "ranges": ranges.iter().map(|r| json!([r.epoch, r.first, r.count])).collect::<Vec<_>>(),
                   "sealed": hex::encode(&ack)}),
            ack,
        ),
        (
            "command-set-flush-policy",
            json!({"type": "command", "description": "SetFlushPolicy { max_samples: 120, max_bytes: 1024, max_age_ms: 30000 }",
                   "key": hex::encode(key.as_bytes()), "sender": "cloud", "counter": 99, "sealed": hex::encode(&cmd_bytes)}),
            cmd_bytes,
        ),
    ]
}

/// Golden vectors pin every byte. Set `FLEETLINE_BLESS_VECTORS=1` to rewrite them after
/// a deliberate format change (and bump the format version).
#[test]
fn golden_vectors() {
    let bless = std::env::var_os("FLEETLINE_BLESS_VECTORS").is_some();
    let mut all: Vec<(String, Value)> =
        golden_batches().into_iter().map(|(name, desc, spec)| (name.to_string(), spec.to_json(desc))).collect();
    all.extend(golden_controls().into_iter().map(|(n, v, _)| (n.to_string(), v)));
    for (name, value) in &all {
        let path = vectors_dir().join(format!("{name}.json"));
        if bless {
            std::fs::write(&path, serde_json::to_string_pretty(value).unwrap() + "\n").unwrap();
            continue;
        }
        let stored: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(&stored["sealed"], &value["sealed"], "{name}: encoder output changed");
        // And the stored bytes still decode to the stored description.
        let mut sealed = hex::decode(stored["sealed"].as_str().unwrap()).unwrap();
        let key = DeviceKey::from_hex(stored["key"].as_str().unwrap()).unwrap();
        match stored["type"].as_str().unwrap() {
            "batch" => {
                let spec = BatchSpec::from_json(&stored);
                let decoded = open_batch(&mut sealed, &key).unwrap().decode().unwrap();
                assert_eq!((decoded.epoch, decoded.seq), (spec.epoch, spec.seq));
                let mut expected = Vec::new();
                for (k, samples) in &spec.known {
                    for (t, raw) in samples {
                        expected.push((*k, spec.base_time_ms as i64 + t, *raw));
                    }
                }
                let got: Vec<_> = decoded.samples.iter().map(|s| (s.kind.0, s.ts_ms, s.raw)).collect();
                assert_eq!(got, expected, "{name}");
                let unknown: Vec<_> = decoded.unknown.iter().map(|u| (u.kind.0, u.raw.clone())).collect();
                assert_eq!(unknown, spec.unknown, "{name}");
            }
            "ack" => {
                let opened = open_control(&mut sealed, &key, ControlKind::Ack).unwrap();
                let ranges: Vec<Value> =
                    opened.ack_ranges().unwrap().map(|r| json!([r.epoch, r.first, r.count])).collect();
                assert_eq!(Value::from(ranges), stored["ranges"]);
                assert_eq!(opened.header.counter, stored["counter"].as_u64().unwrap());
            }
            "command" => {
                let opened = open_control(&mut sealed, &key, ControlKind::Command).unwrap();
                assert_eq!(
                    opened.command().unwrap(),
                    Command::SetFlushPolicy { max_samples: 120, max_bytes: 1024, max_age_ms: 30_000 }
                );
            }
            other => panic!("unknown vector type {other}"),
        }
    }
}

#[test]
fn every_truncation_and_bit_flip_of_a_sealed_batch_is_rejected() {
    let key = DeviceKey::from_bytes(drive_spec().key);
    let sealed = drive_spec().seal();
    for len in 0..sealed.len() {
        let mut cut = sealed[..len].to_vec();
        assert!(open_batch(&mut cut, &key).is_err(), "truncated to {len} accepted");
    }
    for byte in 0..sealed.len() {
        for bit in 0..8 {
            let mut flipped = sealed.clone();
            flipped[byte] ^= 1 << bit;
            assert!(open_batch(&mut flipped, &key).is_err(), "flip of bit {bit} in byte {byte} accepted");
        }
    }
}

#[test]
fn every_truncation_and_bit_flip_of_an_ack_is_rejected() {
    let (_, stored, ack) = golden_controls().remove(0);
    let key = DeviceKey::from_hex(stored["key"].as_str().unwrap()).unwrap();
    for len in 0..ack.len() {
        assert!(open_control(&mut ack[..len].to_vec(), &key, ControlKind::Ack).is_err());
    }
    for byte in 0..ack.len() {
        for bit in 0..8 {
            let mut flipped = ack.clone();
            flipped[byte] ^= 1 << bit;
            assert!(open_control(&mut flipped, &key, ControlKind::Ack).is_err(), "byte {byte} bit {bit}");
        }
    }
}

#[test]
fn a_wrong_key_can_neither_open_nor_forge() {
    let spec = drive_spec();
    let sealed = spec.seal();
    let wrong = DeviceKey::from_bytes([0xee; 32]);
    assert_eq!(open_batch(&mut sealed.clone(), &wrong).unwrap_err(), WireError::AuthenticationFailed);
    // A batch forged under another key, claiming to be this device, does not open under its key.
    let mut forged_spec = spec.clone();
    forged_spec.key = [0xee; 32];
    let mut forged = forged_spec.seal();
    let right = DeviceKey::from_bytes(spec.key);
    assert_eq!(open_batch(&mut forged, &right).unwrap_err(), WireError::AuthenticationFailed);
    // Nor can the header be moved onto another device's ciphertext.
    let mut other = spec.clone();
    other.device = "truck-0043".into();
    let other_sealed = other.seal();
    let header_len = |b: &[u8]| {
        let rest = postcard::take_from_bytes::<BatchHeader<'_>>(b).unwrap().1.len();
        b.len() - rest
    };
    let mut spliced = sealed[..header_len(&sealed)].to_vec();
    spliced.extend_from_slice(&other_sealed[header_len(&other_sealed)..]);
    assert!(open_batch(&mut spliced, &right).is_err());
}

#[test]
fn unknown_kinds_survive_decoding_byte_for_byte() {
    let (_, _, spec) = golden_batches().remove(2);
    let mut sealed = spec.seal();
    let decoded = open_batch(&mut sealed, &DeviceKey::from_bytes(spec.key)).unwrap().decode().unwrap();
    assert_eq!(decoded.unknown.len(), 2);
    assert_eq!(decoded.unknown[0].kind, SignalKind(900));
    assert_eq!(decoded.unknown[0].raw, vec![0x00, 0x02, 0x02, 0x04]);
    assert_eq!(decoded.samples.len(), 5);
}

#[test]
fn header_is_readable_before_opening() {
    let sealed = drive_spec().seal();
    let h = peek_header(&sealed).unwrap();
    assert_eq!((h.fleet, h.device, h.epoch, h.seq), ("acme", "truck-0042", 7, 1234));
    assert!(peek_header(&sealed[..3]).is_err());
}

#[test]
fn the_readme_signal_table_matches_the_code() {
    let readme = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let rows: Vec<Vec<String>> = readme
        .lines()
        .filter(|l| l.starts_with("| ") && l.split('|').nth(1).is_some_and(|c| c.trim().parse::<u16>().is_ok()))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect())
        .collect();
    assert_eq!(rows.len(), SIGNALS.len(), "README lists {} signals, the table has {}", rows.len(), SIGNALS.len());
    for (row, spec) in rows.iter().zip(SIGNALS.iter()) {
        let wire = match spec.wire {
            signals::WireType::Delta => "delta".to_string(),
            signals::WireType::Cyclic { modulus } => format!("cyclic {modulus}"),
        };
        let expected = vec![
            spec.kind.0.to_string(),
            spec.path.to_string(),
            spec.unit.symbol().to_string(),
            wire,
            spec.scale_exp.to_string(),
            format!("{}", spec.min),
            format!("{}", spec.max),
        ];
        assert_eq!(row, &expected);
    }
}

#[test]
fn replayed_control_messages_are_recognizable_by_counter_only_the_key_holder_can_change() {
    let key = DeviceKey::from_bytes([3; 32]);
    let mut buf = [0u8; 128];
    let n = control::seal_command(&mut buf, &key, "cloud", 5, control::random_nonce().unwrap(), &Command::FlushNow)
        .unwrap();
    // Raising the counter of a captured message breaks its tag.
    let mut bumped = buf[..n].to_vec();
    let counter_at = 1 + 1 + 1 + "cloud".len();
    bumped[counter_at] = 6;
    assert_eq!(open_control(&mut bumped, &key, ControlKind::Command).unwrap_err(), WireError::AuthenticationFailed);
}

fn arb_series() -> impl Strategy<Value = (u16, Vec<(i64, i64)>)> {
    (0..SIGNALS.len()).prop_flat_map(|i| {
        let spec = SIGNALS[i];
        let (lo, hi) = (spec.quantize(spec.min).unwrap() as i64, spec.quantize(spec.max).unwrap() as i64);
        let (lo, hi) = if matches!(spec.wire, signals::WireType::Cyclic { .. }) { (0, 3599) } else { (lo, hi) };
        prop::collection::vec((-86_400_000i64..86_400_000, lo..=hi), 1..40).prop_map(move |s| (spec.kind.0, s))
    })
}

proptest! {
    #[test]
    fn random_batches_round_trip(
        epoch in any::<u32>(),
        seq in any::<u32>(),
        base in 0u64..4_000_000_000_000,
        known in prop::collection::vec(arb_series(), 0..8),
        unknown in prop::collection::vec((100u16..200, prop::collection::vec(any::<u8>(), 1..30)), 0..3),
    ) {
        let base = base.max(86_400_000);
        let spec = BatchSpec { key: [9; 32], fleet: "fleet-a".into(), device: "dev-1".into(), epoch, seq, base_time_ms: base, known, unknown };
        let mut sealed = spec.seal();
        let decoded = open_batch(&mut sealed, &DeviceKey::from_bytes(spec.key)).unwrap().decode().unwrap();
        let expected: Vec<_> = spec.known.iter().flat_map(|(k, s)| s.iter().map(move |(t, v)| (*k, base as i64 + t, *v))).collect();
        let got: Vec<_> = decoded.samples.iter().map(|s| (s.kind.0, s.ts_ms, s.raw)).collect();
        prop_assert_eq!(got, expected);
        let unknown: Vec<_> = decoded.unknown.iter().map(|u| (u.kind.0, u.raw.clone())).collect();
        prop_assert_eq!(unknown, spec.unknown);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let key = DeviceKey::from_bytes([9; 32]);
        let _ = open_batch(&mut bytes.clone(), &key);
        let _ = peek_header(&bytes);
        let _ = open_control(&mut bytes.clone(), &key, ControlKind::Ack);
    }
}
