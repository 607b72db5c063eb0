//! Prints one JSON line sizing the wire format on a realistic 10-minute drive.
//!
//! 1 Hz latitude, longitude, speed and heading; four tires' pressure and temperature
//! and the fuel level, absolute level and rate every 10 s; batches of up to 60 s.
//! Every header, tag and framing byte is counted. The same samples are also encoded
//! as plain JSON and as a natural protobuf message (prost), both given the same
//! 16-byte AEAD tag per batch so the comparison is like for like.
//!
//! `cargo run --release -p fleetline-device --example wire_size`

#![allow(clippy::unwrap_used)] // A benchmark over fixed, known-good input.

use std::time::Instant;

use fleetline_device::wire::control::{self, AckRange};
use fleetline_device::wire::signals::{self, SignalKind, kind};
use fleetline_device::wire::{DeviceId, DeviceKey, FleetId, open_batch};
use fleetline_device::{BootState, Config, Device, FlushPolicy, OutboxFull, Reading};
use prost::Message;

const T0: u64 = 1_790_000_000_000;
const DRIVE_S: u64 = 600;
const TAG: usize = 16;

/// Small deterministic generator so the figures repeat exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn noise(&mut self, amplitude: f64) -> f64 {
        (self.next() * 2.0 - 1.0) * amplitude
    }
}

/// The drive: urban stop-and-go, then a highway stretch, with GPS noise.
fn drive() -> Vec<Reading> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut lat, mut lon) = (52.520_008, 13.404_954);
    let mut heading: f64 = 350.0;
    let mut speed: f64 = 0.0;
    let mut fuel_l = 310.0;
    let mut out = Vec::new();
    for s in 0..DRIVE_S {
        let t = T0 + s * 1000;
        let target = match s {
            0..=119 => {
                if (s / 30) % 2 == 0 {
                    45.0
                } else {
                    0.0
                }
            }
            120..=479 => 92.0,
            _ => 30.0,
        };
        speed += (target - speed).clamp(-6.0, 3.0) + rng.noise(0.4);
        speed = speed.max(0.0);
        heading = (heading + rng.noise(2.0) + if s % 90 < 5 { 18.0 } else { 0.0 }).rem_euclid(360.0);
        let metres = speed / 3.6;
        lat += metres * heading.to_radians().cos() / 111_320.0;
        lon += metres * heading.to_radians().sin() / (111_320.0 * lat.to_radians().cos());
        fuel_l -= speed * 0.00009;
        let gps = |v: f64, rng: &mut Rng| v + rng.noise(0.000_02);
        out.push(Reading { kind: kind::LATITUDE, time_ms: t, value: gps(lat, &mut rng) });
        out.push(Reading { kind: kind::LONGITUDE, time_ms: t, value: gps(lon, &mut rng) });
        out.push(Reading { kind: kind::SPEED, time_ms: t, value: speed });
        out.push(Reading { kind: kind::HEADING, time_ms: t, value: heading });
        if s % 10 == 0 {
            for (i, wheel) in [(1, false), (1, true), (2, false), (2, true)].into_iter().enumerate() {
                let w = kind::Wheel { row: wheel.0, right: wheel.1 };
                let temp = 18.0 + s as f64 / 60.0 + i as f64 * 0.3 + rng.noise(0.2);
                let pressure = 820.0 + (temp - 18.0) * 2.8 + rng.noise(0.6);
                out.push(Reading { kind: kind::tire_pressure(w).unwrap(), time_ms: t + 120, value: pressure });
                out.push(Reading { kind: kind::tire_temperature(w).unwrap(), time_ms: t + 120, value: temp });
            }
            out.push(Reading { kind: kind::FUEL_RELATIVE_LEVEL, time_ms: t + 250, value: fuel_l / 400.0 * 100.0 });
            out.push(Reading { kind: kind::FUEL_ABSOLUTE_LEVEL, time_ms: t + 250, value: fuel_l });
            out.push(Reading { kind: kind::FUEL_RATE, time_ms: t + 250, value: speed * 0.32 + 1.1 + rng.noise(0.2) });
        }
    }
    out
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbBatch {
    #[prost(string, tag = "1")]
    fleet: String,
    #[prost(string, tag = "2")]
    device: String,
    #[prost(uint32, tag = "3")]
    epoch: u32,
    #[prost(uint32, tag = "4")]
    seq: u32,
    #[prost(uint64, tag = "5")]
    base_time_ms: u64,
    #[prost(message, repeated, tag = "6")]
    readings: Vec<PbReading>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbReading {
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(uint32, tag = "2")]
    offset_ms: u32,
    #[prost(double, tag = "3")]
    value: f64,
}

type Unit = Device<512, 4096, 16>;

fn config() -> Config {
    Config {
        fleet: FleetId::new("acme").unwrap(),
        device: DeviceId::new("truck-0042").unwrap(),
        key: DeviceKey::from_bytes([0x42; 32]),
        flush: FlushPolicy { max_samples: 512, max_bytes: 4096, max_age_ms: 60_000 },
        resend_after_ms: 10_000,
        when_full: OutboxFull::Block,
    }
}

/// Runs the drive through a fresh device; returns the sealed batches.
fn encode(readings: &[Reading], keep: bool) -> Vec<Vec<u8>> {
    let mut dev = Unit::new(config(), BootState { epoch: 1, last_command_counter: 0 }).unwrap();
    let mut batches = Vec::new();
    let mut ack_buf = [0u8; 256];
    let mut counter = 0;
    let mut drain = |dev: &mut Unit, now: u64, batches: &mut Vec<Vec<u8>>| {
        let mut seqs = Vec::new();
        while let Some(tx) = dev.poll_transmit(now) {
            if keep {
                batches.push(tx.payload.to_vec());
            }
            seqs.push(tx.seq);
        }
        for seq in seqs {
            counter += 1;
            let n = control::seal_ack(
                &mut ack_buf,
                &config().key,
                "gw",
                counter,
                control::random_nonce().unwrap(),
                &[AckRange { epoch: 1, first: seq, count: 1 }],
            )
            .unwrap();
            dev.handle_ack(&mut ack_buf[..n]).unwrap();
        }
    };
    for r in readings {
        let now = r.time_ms - T0;
        dev.record(now, *r).unwrap();
        drain(&mut dev, now, &mut batches);
    }
    dev.flush(DRIVE_S * 1000).unwrap();
    drain(&mut dev, DRIVE_S * 1000, &mut batches);
    batches
}

fn main() {
    let readings = drive();
    let samples = readings.len();
    let batches = encode(&readings, true);
    let sealed_bytes: usize = batches.iter().map(Vec::len).sum();

    let mut json_bytes = 0;
    let mut pb_bytes = 0;
    let mut decoded_samples = 0;
    for sealed in &batches {
        let mut b = sealed.clone();
        let d = open_batch(&mut b, &config().key).unwrap().decode().unwrap();
        decoded_samples += d.samples.len();
        let json = serde_json::json!({
            "fleet": d.fleet, "device": d.device, "epoch": d.epoch, "seq": d.seq,
            "readings": d.samples.iter().map(|s| serde_json::json!({
                "signal": signals::spec(s.kind).unwrap().path, "ts": s.ts_ms, "value": s.value,
            })).collect::<Vec<_>>(),
        });
        json_bytes += serde_json::to_vec(&json).unwrap().len() + TAG;
        let pb = PbBatch {
            fleet: d.fleet.clone(),
            device: d.device.clone(),
            epoch: d.epoch,
            seq: d.seq,
            base_time_ms: d.base_time_ms,
            readings: d
                .samples
                .iter()
                .map(|s| PbReading {
                    kind: u32::from(s.kind.0),
                    offset_ms: (s.ts_ms - d.base_time_ms as i64) as u32,
                    value: s.value,
                })
                .collect(),
        };
        pb_bytes += pb.encoded_len() + TAG;
    }
    assert_eq!(decoded_samples, samples, "every sample survives the round trip");

    // Encode cost: record + seal (and the ack bookkeeping), repeated to dominate noise.
    let rounds = 50;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(encode(std::hint::black_box(&readings), false));
    }
    let encode_ns = start.elapsed().as_nanos() as f64 / (rounds * samples) as f64;

    let per = |b: usize| (b as f64 / samples as f64 * 1000.0).round() / 1000.0;
    let kinds: std::collections::BTreeSet<SignalKind> = readings.iter().map(|r| r.kind).collect();
    let line = serde_json::json!({
        "drive_s": DRIVE_S,
        "samples": samples,
        "signals": kinds.len(),
        "batches": batches.len(),
        "sealed_bytes": sealed_bytes,
        "bytes_per_sample": per(sealed_bytes),
        "json_bytes_per_sample": per(json_bytes),
        "protobuf_bytes_per_sample": per(pb_bytes),
        "ratio_to_protobuf": (sealed_bytes as f64 / pb_bytes as f64 * 1000.0).round() / 1000.0,
        "encode_ns_per_sample": encode_ns.round(),
        "sdk_state_bytes": std::mem::size_of::<Device<60, 512, 8>>(),
        "sdk_state_config": "Device<60 samples, 512-byte batches, 8-batch outbox>",
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{line}");
    }
}
