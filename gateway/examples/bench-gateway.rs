//! Throughput benchmark: samples per second delivered to an upstream consumer from
//! 200 concurrent devices, through the Fleetline gateway (durable: every batch is
//! fsynced before its device is acked, and kept until the consumer acks it) and
//! through Mosquitto bridging to an upstream Mosquitto (in memory), on this machine,
//! with the same payloads.
//!
//! For each setting of batches in flight per device (`BENCH_IN_FLIGHT`, a comma
//! list, default `8,16,32`) the two are run `BENCH_REPEAT` times (default 3),
//! alternating, each after its own warm-up. One JSON line per setting: the median
//! rate of each with its min and max, the ratio of the medians and the min/max
//! of the per-round ratios; and CPU microseconds per batch of the broker side
//! (the gateway process; both Mosquittos) and of the devices' side (this process:
//! the load generator and the consumer), so a difference in rate can be read
//! against where the machine's two cores went. Also the gateway's resident memory.
//!
//! `scripts/bench-gateway.sh` builds and runs it (release), with the gateway binary.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark over known-good input.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetline_device::client::{ClientConfig, DeviceClient, SystemClock};
use fleetline_device::wire::signals::kind;
use fleetline_device::wire::{BatchHeader, BatchWriter, FleetId, SCHEMA_V1};
use fleetline_device::{BootState, Config, FlushPolicy, OutboxFull, Reading};
use fleetline_testkit::bench::{BenchGateway, bench_gateway_config};
use fleetline_testkit::procfs::{cpu_seconds, status_kib};
use fleetline_testkit::provisioning::{device_id, device_key, fleet};
use fleetline_testkit::{Mosquitto, free_port};
use fleetline_wire::bundle::{peek_bundle, seal_bundle_ack};
use fleetline_wire::provisioning::Provisioning;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const DEVICES: usize = 200;
const SAMPLES_PER_BATCH: usize = 60;
const WARMUP: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(10);
/// Batches each device may have unacknowledged: for Fleetline devices at most their
/// outbox depth (32 for `LinuxDevice`), and the Mosquitto publishers' MQTT in-flight
/// window. `BENCH_IN_FLIGHT` overrides the default of 32.
fn in_flight() -> u64 {
    IN_FLIGHT.load(Ordering::Relaxed)
}

static IN_FLIGHT: AtomicU64 = AtomicU64::new(32);

/// One run: samples per second, CPU µs per batch of the broker side and of this
/// process, peak RSS of the gateway (KiB, 0 for Mosquitto).
struct Run {
    rate: f64,
    broker_us_per_batch: f64,
    devices_us_per_batch: f64,
    peak_kib: u64,
    /// Acks the gateway sent per batch it took (Fleetline only).
    acks_per_batch: f64,
}

/// 60 readings: 20 × (speed, latitude, longitude) one second apart.
fn readings(t0: u64) -> Vec<Reading> {
    (0..SAMPLES_PER_BATCH as u64 / 3)
        .flat_map(|s| {
            let t = t0 + s * 1000;
            [
                Reading { kind: kind::SPEED, time_ms: t, value: 50.0 + (s % 7) as f64 },
                Reading { kind: kind::LATITUDE, time_ms: t, value: 52.0 + s as f64 * 1e-4 },
                Reading { kind: kind::LONGITUDE, time_ms: t, value: 13.0 + s as f64 * 1e-4 },
            ]
        })
        .collect()
}

/// Counts delivered batches at the upstream broker; for Fleetline bundles it reads
/// the entry count from the bundle header and acks the bundle.
async fn consumer(port: u16, prov: Option<Provisioning>, delivered: Arc<AtomicU64>) {
    let mut opts = MqttOptions::new("bench-consumer", "127.0.0.1", port);
    opts.set_max_packet_size(16 << 20, 1 << 16);
    opts.set_inflight(1000);
    let (client, mut el) = AsyncClient::new(opts, 4096);
    tokio::spawn(async move {
        let mut counter = 0;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let topic = if prov.is_some() { "fleetline/v1/ingest/+" } else { "fleetline/v1/+/+/up" };
                    let _ = client.try_subscribe(topic, QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => match &prov {
                    None => {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(prov) => {
                        let Ok(h) = peek_bundle(&p.payload) else { continue };
                        delivered.fetch_add(u64::from(h.entries), Ordering::Relaxed);
                        let gw = prov.gateway(&h.gateway.parse().unwrap()).unwrap();
                        counter += 1;
                        let ack = seal_bundle_ack(&gw.key, "bench", counter, &[h.id]).unwrap();
                        let _ = client.try_publish(
                            format!("fleetline/v1/gw/{}/ack", h.gateway),
                            QoS::AtLeastOnce,
                            false,
                            ack,
                        );
                    }
                },
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
}

/// Samples per second over the window, CPU per batch of `brokers` and of this
/// process, and peak RSS of `rss_of` during it.
async fn measure(delivered: &AtomicU64, brokers: &[u32], rss_of: Option<u32>) -> Run {
    tokio::time::sleep(WARMUP).await;
    let start_count = delivered.load(Ordering::Relaxed);
    let me = std::process::id();
    let cpu = || (brokers.iter().map(|p| cpu_seconds(*p)).sum::<f64>(), cpu_seconds(me));
    let (broker0, me0) = cpu();
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < WINDOW {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(pid) = rss_of {
            peak = peak.max(status_kib(pid, "VmRSS:"));
        }
    }
    let (broker1, me1) = cpu();
    let batches = (delivered.load(Ordering::Relaxed) - start_count).max(1);
    Run {
        rate: (batches * SAMPLES_PER_BATCH as u64) as f64 / start.elapsed().as_secs_f64(),
        broker_us_per_batch: (broker1 - broker0) * 1e6 / batches as f64,
        devices_us_per_batch: (me1 - me0) * 1e6 / batches as f64,
        peak_kib: peak,
        acks_per_batch: 0.0,
    }
}

async fn fleetline(prov: &Provisioning) -> (Run, u64) {
    let dir = tempfile::tempdir().unwrap();
    let prov_path = dir.path().join("provisioning.toml");
    prov.save(&prov_path).unwrap();
    let upstream = Mosquitto::start().await;
    let delivered = Arc::new(AtomicU64::new(0));
    consumer(upstream.port, Some(prov.clone()), delivered.clone()).await;
    let port = free_port();
    let cfg = bench_gateway_config(dir.path(), &prov_path, port, upstream.port, "");
    let mut gw = BenchGateway::start(&cfg).await;
    let pid = gw.pid;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = status_kib(pid, "VmRSS:");

    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = vec![];
    for i in 0..DEVICES {
        let device = Config {
            fleet: FleetId::new("acme").unwrap(),
            device: device_id(i),
            key: device_key(i),
            flush: FlushPolicy { max_samples: SAMPLES_PER_BATCH as u16, max_bytes: 4096, max_age_ms: 1000 },
            resend_after_ms: 10_000,
            when_full: OutboxFull::Block,
        };
        let cfg = ClientConfig::new("127.0.0.1", port, device, BootState { epoch: 1, last_command_counter: 0 });
        let client = DeviceClient::spawn(cfg, SystemClock::new()).unwrap();
        let running = running.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = 1_790_000_000_000u64;
            while running.load(Ordering::Relaxed) {
                // At the window: wait for an ack (the client's state changes), as
                // the Mosquitto publishers wait for a PUBACK.
                if client.stats().outbox_batches >= in_flight() {
                    client.wait_for(Duration::from_millis(100), |s| s.outbox_batches < in_flight()).await;
                    continue;
                }
                let taken = client.record_all(readings(t)).await.unwrap();
                client.flush().await.unwrap();
                if taken.refused > 0 {
                    // Outbox full: wait for an ack rather than spin.
                    client.wait_for(Duration::from_millis(100), |s| s.outbox_batches < in_flight()).await;
                }
                t += 60_000;
            }
        }));
    }
    let brokers: Vec<u32> = [Some(pid), upstream.pid()].into_iter().flatten().collect();
    let mut run = measure(&delivered, &brokers, Some(pid)).await;
    let status = gw.status().await;
    let batches = status["accepted"]["batches"].as_f64().unwrap_or(0.0);
    run.acks_per_batch = status["accepted"]["device_acks_sent"].as_f64().unwrap_or(0.0) / batches.max(1.0);
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    gw.kill().await;
    upstream.stop().await;
    (run, idle)
}

async fn mosquitto_bridge(batch: Vec<u8>) -> Run {
    let upstream = Mosquitto::start().await;
    let up = upstream.port;
    let edge = Mosquitto::start_with(None, move |_| {
        format!(
            "connection upstream\naddress 127.0.0.1:{up}\ntopic fleetline/v1/# out 1\ncleansession true\nmax_queued_messages 100000\n"
        )
    })
    .await;
    let delivered = Arc::new(AtomicU64::new(0));
    consumer(upstream.port, None, delivered.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = vec![];
    for i in 0..DEVICES {
        let mut opts = MqttOptions::new(format!("acme.{}", device_id(i)), "127.0.0.1", edge.port);
        opts.set_max_packet_size(1 << 16, 1 << 16);
        opts.set_inflight(in_flight() as u16);
        let (client, mut el) = AsyncClient::new(opts, 64);
        let running = running.clone();
        let payload = batch.clone();
        let topic = format!("fleetline/v1/acme/{}/up", device_id(i));
        tasks.push(tokio::spawn(async move {
            let publisher = tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    if client.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).await.is_err() {
                        break;
                    }
                }
            });
            loop {
                if el.poll().await.is_err() || publisher.is_finished() {
                    break;
                }
            }
        }));
    }
    let brokers: Vec<u32> = [edge.pid(), upstream.pid()].into_iter().flatten().collect();
    let run = measure(&delivered, &brokers, None).await;
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    edge.stop().await;
    upstream.stop().await;
    run
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn spread(v: &[f64]) -> (f64, f64) {
    (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(f64::NEG_INFINITY, f64::max))
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[tokio::main]
async fn main() {
    let prov = fleet(DEVICES, 1);
    // The same sealed 60-sample batch size the Fleetline devices send.
    let sample = {
        let header = BatchHeader {
            format: fleetline_device::wire::batch::BATCH_FORMAT,
            schema: SCHEMA_V1,
            fleet: "acme",
            device: "dev-0000",
            epoch: 1,
            seq: 0,
            base_time_ms: 1_790_000_000_000,
        };
        let mut buf = vec![0u8; 4096];
        let mut w = BatchWriter::new(&mut buf, &header).unwrap();
        for k in [kind::SPEED, kind::LATITUDE, kind::LONGITUDE] {
            w.begin_series(k).unwrap();
            for s in 0..20 {
                w.push(s * 1000, 500 + s).unwrap();
            }
        }
        let n = w.seal(&device_key(0)).unwrap();
        buf.truncate(n);
        buf
    };
    let settings: Vec<u64> = std::env::var("BENCH_IN_FLIGHT")
        .unwrap_or_else(|_| "8,16,32".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let repeat: usize = std::env::var("BENCH_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    for setting in settings {
        IN_FLIGHT.store(setting, Ordering::Relaxed);
        let (mut fl, mut mq, mut idle) = (Vec::new(), Vec::new(), 0);
        for round in 0..repeat {
            // Alternate which goes first, so a drift of the machine hits both.
            if round % 2 == 0 {
                let (run, i) = fleetline(&prov).await;
                fl.push(run);
                idle = i;
                mq.push(mosquitto_bridge(sample.clone()).await);
            } else {
                mq.push(mosquitto_bridge(sample.clone()).await);
                let (run, i) = fleetline(&prov).await;
                fl.push(run);
                idle = i;
            }
        }
        let rates = |runs: &[Run]| runs.iter().map(|r| r.rate).collect::<Vec<_>>();
        let (fr, mr) = (rates(&fl), rates(&mq));
        let ratios: Vec<f64> = fr.iter().zip(&mr).map(|(f, m)| f / m).collect();
        let (fmin, fmax) = spread(&fr);
        let (mmin, mmax) = spread(&mr);
        let (rmin, rmax) = spread(&ratios);
        let med = |runs: &[Run], f: fn(&Run) -> f64| (median(runs.iter().map(f).collect()) * 10.0).round() / 10.0;
        let line = serde_json::json!({
            "devices": DEVICES,
            "in_flight_per_device": setting,
            "rounds": repeat,
            "samples_per_batch": SAMPLES_PER_BATCH,
            "batch_bytes": sample.len(),
            "window_s": WINDOW.as_secs(),
            "fleetline_samples_per_s": { "median": median(fr.clone()).round(), "min": fmin.round(), "max": fmax.round() },
            "mosquitto_bridge_samples_per_s": { "median": median(mr.clone()).round(), "min": mmin.round(), "max": mmax.round() },
            "ratio": r3(median(fr) / median(mr)),
            "ratio_per_round": { "min": r3(rmin), "max": r3(rmax) },
            "cpu_us_per_batch": {
                "gateway": med(&fl, |r| r.broker_us_per_batch),
                "mosquitto_edge_and_upstream": med(&mq, |r| r.broker_us_per_batch),
                "fleetline_devices_and_consumer": med(&fl, |r| r.devices_us_per_batch),
                "mosquitto_publishers_and_consumer": med(&mq, |r| r.devices_us_per_batch),
            },
            "gateway_acks_per_batch": (median(fl.iter().map(|r| r.acks_per_batch).collect()) * 1000.0).round() / 1000.0,
            "gateway_rss_idle_kib": idle,
            "gateway_rss_load_kib": fl.iter().map(|r| r.peak_kib).max(),
            "fleetline_durable": true,
            "mosquitto_durable": false,
        });
        println!("{line}");
    }
}
