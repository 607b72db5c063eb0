//! Depot benchmark: one gateway (its own process, release build) and thousands of
//! real SDK clients (`DeviceClient`, in several load-generator processes) at the
//! demo's per-unit rate — location, speed and heading every second, fuel every
//! 10 s, tires every 30 s, a batch every 2 s — or at night's (a reading every
//! 10 s, a batch a minute). Upstream: Mosquitto and a stand-in cloud that checks
//! every batch and acks the bundles.
//!
//! Prints one JSON line: units, the connect time of the whole fleet, batches and
//! samples acked per second over the window, the ack round trip from seal to ack
//! (p50, p99, max), connection errors after the first connect wave, the gateway's
//! CPU (cores) and RSS (idle, peak, per unit), descriptors per unit, and at the
//! end whether every acked batch reached the cloud. With `--storm`, the gateway
//! is killed (SIGKILL) after the window and started again: the time until every
//! unit is back, and the logins it refused on the way.
//!
//! `bench-depot [--units N] [--night] [--window S] [--storm] [--workers W]`;
//! `scripts/bench-depot.sh` runs the set (3,000, 8,000, 15,000 units, and 15,000
//! at night). Not part of CI.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)] // A benchmark over known-good input.

use std::collections::{BTreeMap, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetline_device::client::{ClientConfig, DeviceClient, SystemClock};
use fleetline_device::wire::FleetId;
use fleetline_device::wire::signals::kind;
use fleetline_device::{BootState, Config, FlushPolicy, OutboxFull, Reading};
use fleetline_testkit::bench::{BenchGateway, bench_gateway_config};
use fleetline_testkit::cloud::FakeCloud;
use fleetline_testkit::procfs::{cpu_seconds, open_fds, status_kib};
use fleetline_testkit::provisioning::{device_id, device_key, fleet};
use fleetline_testkit::{Mosquitto, free_port};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Units per load-generator process.
const UNITS_PER_WORKER: usize = 4_000;

#[derive(Clone, Copy)]
struct Rate {
    /// Seconds between readings.
    every_s: u64,
    /// Readings between batches.
    batch_every: u64,
}

const DAY: Rate = Rate { every_s: 1, batch_every: 2 };
const NIGHT: Rate = Rate { every_s: 10, batch_every: 6 };

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if args.get(1).map(String::as_str) == Some("worker") {
        rt.block_on(worker(&args[2..]));
    } else {
        rt.block_on(orchestrate(&args[1..]));
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

// ---------------------------------------------------------------- latency histogram

/// Milliseconds to a bucket: 1 ms steps to 1 s, 10 ms to 10 s, 100 ms beyond.
fn bucket(ms: u64) -> u64 {
    match ms {
        0..1_000 => ms,
        1_000..10_000 => 1_000 + (ms - 1_000) / 10,
        _ => 1_900 + ((ms - 10_000) / 100).min(10_000),
    }
}

/// A bucket's upper bound in milliseconds.
fn bucket_ms(b: u64) -> u64 {
    match b {
        0..1_000 => b + 1,
        1_000..1_900 => 1_000 + (b - 1_000 + 1) * 10,
        _ => 10_000 + (b - 1_900 + 1) * 100,
    }
}

fn percentile(hist: &BTreeMap<u64, u64>, p: f64) -> Option<u64> {
    let total: u64 = hist.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64 * p).ceil() as u64).max(1);
    let mut seen = 0;
    for (b, n) in hist {
        seen += n;
        if seen >= rank {
            return Some(bucket_ms(*b));
        }
    }
    None
}

// ---------------------------------------------------------------- load generator

#[derive(Default)]
struct WorkerCounters {
    connected: AtomicU64,
    sealed: AtomicU64,
    acked: AtomicU64,
    samples_acked: AtomicU64,
    unmatched_acks: AtomicU64,
    refused: AtomicU64,
}

/// `worker <port> <first> <count> <night 0|1> <spread_ms>`: runs `count` units from
/// index `first`; prints a status line every second, takes `measure` and `stop`
/// `pause` and `stop` on stdin (latencies are kept between `measure` and `pause`),
/// prints a final line.
async fn worker(args: &[String]) {
    let port: u16 = args[0].parse().unwrap();
    let first: usize = args[1].parse().unwrap();
    let count: usize = args[2].parse().unwrap();
    let rate = if args[3] == "1" { NIGHT } else { DAY };
    let spread = Duration::from_millis(args[4].parse().unwrap());
    let counters = Arc::new(WorkerCounters::default());
    let measuring = Arc::new(AtomicBool::new(false));
    let stopping = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(BTreeMap::<u64, u64>::new()));
    let clients = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let start = tokio::time::Instant::now();
    let mut units = tokio::task::JoinSet::new();
    for n in 0..count {
        let i = first + n;
        let (counters, measuring, stopping, hist, clients) =
            (counters.clone(), measuring.clone(), stopping.clone(), hist.clone(), clients.clone());
        // Units come up spread over `spread`, as a depot's do.
        let at = start + spread.mul_f64(n as f64 / count.max(1) as f64);
        units.spawn(async move {
            tokio::time::sleep_until(at).await;
            let device = Config {
                fleet: FleetId::new("acme").unwrap(),
                device: device_id(i),
                key: device_key(i),
                // Batches are sealed by this loop's flushes only.
                flush: FlushPolicy { max_samples: 250, max_bytes: 2048, max_age_ms: 3_600_000 },
                resend_after_ms: 10_000,
                when_full: OutboxFull::Block,
            };
            let mut cfg = ClientConfig::new("127.0.0.1", port, device, BootState { epoch: 1, last_command_counter: 0 });
            cfg.keep_alive = Duration::from_secs(60);
            let client = Arc::new(DeviceClient::spawn(cfg, SystemClock::new()).unwrap());
            clients.lock().unwrap().push(client.clone());
            run_unit(i, &client, rate, &counters, &measuring, &stopping, &hist).await;
        });
    }
    // Status lines and commands.
    let status = {
        let (counters, clients) = (counters.clone(), clients.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (mut connected, mut connects, mut errors, mut outbox, mut resends) = (0u64, 0u64, 0u64, 0u64, 0u64);
                for c in clients.lock().unwrap().iter() {
                    let s = c.stats();
                    connected += u64::from(s.connected);
                    connects += s.connects;
                    errors += s.connection_errors;
                    outbox += s.outbox_batches;
                    resends += s.core.resends;
                }
                counters.connected.store(connected, Ordering::Relaxed);
                let line = json!({
                    "t": "status", "connected": connected, "connects": connects, "connection_errors": errors,
                    "sealed": counters.sealed.load(Ordering::Relaxed), "acked": counters.acked.load(Ordering::Relaxed),
                    "samples_acked": counters.samples_acked.load(Ordering::Relaxed), "outbox": outbox, "resends": resends,
                });
                println!("{line}");
            }
        })
    };
    // Commands on stdin, read on a thread of their own.
    let (cmd_tx, mut commands) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if cmd_tx.send(line).is_err() {
                return;
            }
        }
    });
    while let Some(cmd) = commands.recv().await {
        match cmd.as_str() {
            "measure" => {
                hist.lock().unwrap().clear();
                measuring.store(true, Ordering::Relaxed);
            }
            "pause" => measuring.store(false, Ordering::Relaxed),
            "stop" => break,
            _ => {}
        }
    }
    // Stop taking readings; seal what is open; wait until every outbox is empty.
    measuring.store(false, Ordering::Relaxed);
    stopping.store(true, Ordering::Relaxed);
    while units.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(120);
    let all: Vec<_> = clients.lock().unwrap().clone();
    for c in &all {
        let left = deadline.saturating_duration_since(Instant::now());
        c.wait_for(left, |s| s.outbox_batches == 0 && s.open_samples == 0).await;
        for r in c.take_acked() {
            counters.acked.fetch_add(1, Ordering::Relaxed);
            counters.samples_acked.fetch_add(u64::from(r.samples), Ordering::Relaxed);
        }
    }
    status.abort();
    let (mut outbox, mut errors, mut connects) = (0, 0, 0);
    for c in &all {
        let s = c.stats();
        outbox += s.outbox_batches;
        errors += s.connection_errors;
        connects += s.connects;
    }
    let hist: Vec<(u64, u64)> = hist.lock().unwrap().iter().map(|(b, n)| (*b, *n)).collect();
    let line = json!({
        "t": "final", "sealed": counters.sealed.load(Ordering::Relaxed), "acked": counters.acked.load(Ordering::Relaxed),
        "samples_acked": counters.samples_acked.load(Ordering::Relaxed), "outbox_left": outbox,
        "connection_errors": errors, "connects": connects, "unmatched_acks": counters.unmatched_acks.load(Ordering::Relaxed),
        "readings_refused": counters.refused.load(Ordering::Relaxed), "hist": hist,
    });
    println!("{line}");
}

/// One unit: readings on its schedule, a flush every `batch_every` readings (the
/// seal time kept by seq), and every ack matched to its seal.
async fn run_unit(
    i: usize,
    client: &DeviceClient,
    rate: Rate,
    counters: &WorkerCounters,
    measuring: &AtomicBool,
    stopping: &AtomicBool,
    hist: &Mutex<BTreeMap<u64, u64>>,
) {
    let every = Duration::from_secs(rate.every_s);
    // Each unit's readings at its own phase within the period.
    let phase = Duration::from_millis((i as u64 * 7_919) % (rate.every_s * 1000));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seals: VecDeque<(u32, Instant)> = VecDeque::new();
    let mut next_seq = 0u32;
    let mut readings = 0u64;
    let mut acked_seen = 0u64;
    let mut t_ms = 1_790_000_000_000u64 + i as u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if stopping.load(Ordering::Relaxed) {
                    if !readings.is_multiple_of(rate.batch_every) {
                        let _ = client.flush().await;
                        counters.sealed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                t_ms += rate.every_s * 1000;
                readings += 1;
                let s = readings as f64;
                let mut batch = vec![
                    Reading { kind: kind::LATITUDE, time_ms: t_ms, value: 52.5 + (i % 100) as f64 * 1e-3 + s * 1e-5 },
                    Reading { kind: kind::LONGITUDE, time_ms: t_ms, value: 13.4 + (i % 97) as f64 * 1e-3 + s * 1e-5 },
                    Reading { kind: kind::SPEED, time_ms: t_ms, value: 40.0 + (readings % 30) as f64 },
                    Reading { kind: kind::HEADING, time_ms: t_ms, value: (readings * 3 % 360) as f64 },
                ];
                if (readings * rate.every_s).is_multiple_of(10) {
                    batch.push(Reading { kind: kind::FUEL_RELATIVE_LEVEL, time_ms: t_ms, value: 60.0 - s * 1e-3 });
                }
                if (readings * rate.every_s).is_multiple_of(30) {
                    for w in 0..4u8 {
                        let wheel = kind::Wheel { row: 1 + w / 2, right: w % 2 == 1 };
                        batch.push(Reading { kind: kind::tire_pressure(wheel).unwrap(), time_ms: t_ms, value: 240.0 });
                        batch.push(Reading { kind: kind::tire_temperature(wheel).unwrap(), time_ms: t_ms, value: 30.0 });
                    }
                }
                if let Ok(summary) = client.record_all(batch).await {
                    counters.refused.fetch_add(summary.refused as u64, Ordering::Relaxed);
                }
                if readings.is_multiple_of(rate.batch_every) && client.flush().await.is_ok() {
                    seals.push_back((next_seq, Instant::now()));
                    next_seq += 1;
                    counters.sealed.fetch_add(1, Ordering::Relaxed);
                }
            }
            s = client.wait_for(Duration::from_secs(3_600), |s| s.core.batches_acked > acked_seen) => {
                acked_seen = s.core.batches_acked;
                let now = Instant::now();
                for r in client.take_acked() {
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                    counters.samples_acked.fetch_add(u64::from(r.samples), Ordering::Relaxed);
                    while seals.front().is_some_and(|(seq, _)| *seq < r.seq) && seals.len() > 64 {
                        seals.pop_front();
                    }
                    match seals.iter().position(|(seq, _)| *seq == r.seq) {
                        Some(at) => {
                            let (_, sealed) = seals.remove(at).unwrap();
                            if measuring.load(Ordering::Relaxed) {
                                let ms = now.duration_since(sealed).as_millis() as u64;
                                *hist.lock().unwrap().entry(bucket(ms)).or_default() += 1;
                            }
                        }
                        None => {
                            counters.unmatched_acks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- orchestrator

struct Worker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    last: Arc<Mutex<Value>>,
    done: Arc<Mutex<Option<Value>>>,
}

impl Worker {
    fn spawn(port: u16, first: usize, count: usize, night: bool, spread: Duration) -> Self {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["worker", &port.to_string(), &first.to_string(), &count.to_string()])
            .arg(if night { "1" } else { "0" })
            .arg(spread.as_millis().to_string())
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let last = Arc::new(Mutex::new(json!({})));
        let done = Arc::new(Mutex::new(None));
        let (l, d) = (last.clone(), done.clone());
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                if v["t"] == "final" {
                    *d.lock().unwrap() = Some(v);
                } else {
                    *l.lock().unwrap() = v;
                }
            }
        });
        Self { child, stdin, last, done }
    }

    fn get(&self, key: &str) -> u64 {
        self.last.lock().unwrap()[key].as_u64().unwrap_or(0)
    }

    async fn say(&mut self, cmd: &str) {
        let _ = self.stdin.write_all(format!("{cmd}\n").as_bytes()).await;
        let _ = self.stdin.flush().await;
    }
}

fn sum(workers: &[Worker], key: &str) -> u64 {
    workers.iter().map(|w| w.get(key)).sum()
}

/// Waits until `n` units are connected; returns the time it took from `since`.
async fn wait_connected(workers: &[Worker], n: u64, since: Instant, timeout: Duration) -> Option<f64> {
    while since.elapsed() < timeout {
        if sum(workers, "connected") >= n {
            return Some(since.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn orchestrate(args: &[String]) {
    let units: usize = flag(args, "--units").map_or(3_000, |v| v.parse().unwrap());
    let night = args.iter().any(|a| a == "--night");
    let storm = args.iter().any(|a| a == "--storm");
    let window =
        Duration::from_secs(flag(args, "--window").map_or(if night { 180 } else { 60 }, |v| v.parse().unwrap()));
    let n_workers: usize =
        flag(args, "--workers").map_or(units.div_ceil(UNITS_PER_WORKER).max(2), |v| v.parse().unwrap());
    let rate = if night { NIGHT } else { DAY };

    let dir = tempfile::Builder::new().prefix("fleetline-bench-depot-").tempdir().unwrap();
    let prov = fleet(units, 1);
    let prov_path = dir.path().join("provisioning.toml");
    prov.save(&prov_path).unwrap();
    let upstream = Mosquitto::start().await;
    let cloud = FakeCloud::start(upstream.port, prov.clone()).await;
    let port = free_port();
    let cfg = bench_gateway_config(dir.path(), &prov_path, port, upstream.port, "max_connections = 20000");
    let mut gw = BenchGateway::start(&cfg).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_idle, fds_idle) = (status_kib(gw.pid, "VmRSS:"), open_fds(gw.pid));

    // Units come up over 10 s (a depot's units do not all start in one instant).
    let spread = Duration::from_secs(10);
    let started = Instant::now();
    let per = units.div_ceil(n_workers);
    let mut workers: Vec<Worker> = (0..n_workers)
        .filter(|w| w * per < units)
        .map(|w| Worker::spawn(port, w * per, per.min(units - w * per), night, spread))
        .collect();
    let connect_s = wait_connected(&workers, units as u64, started, Duration::from_secs(300)).await;
    let errors_after_wave = sum(&workers, "connection_errors");
    let (rss_connected, fds_connected) = (status_kib(gw.pid, "VmRSS:"), open_fds(gw.pid));

    // Warm up for two batch periods, then measure.
    tokio::time::sleep(Duration::from_secs(rate.every_s * rate.batch_every * 2).max(Duration::from_secs(5))).await;
    for w in &mut workers {
        w.say("measure").await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (acked0, samples0, cpu0, t0) =
        (sum(&workers, "acked"), sum(&workers, "samples_acked"), cpu_seconds(gw.pid), Instant::now());
    let mut rss_peak = 0;
    let mut min_connected = u64::MAX;
    while t0.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_peak = rss_peak.max(status_kib(gw.pid, "VmRSS:"));
        min_connected = min_connected.min(sum(&workers, "connected"));
    }
    let secs = t0.elapsed().as_secs_f64();
    for w in &mut workers {
        w.say("pause").await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let batches_per_s = (sum(&workers, "acked") - acked0) as f64 / secs;
    let samples_per_s = (sum(&workers, "samples_acked") - samples0) as f64 / secs;
    let gateway_cores = (cpu_seconds(gw.pid) - cpu0) / secs;
    let errors_in_window = sum(&workers, "connection_errors") - errors_after_wave;
    let gw_status = gw.status().await;

    // The connect storm: the gateway killed and started again with every unit connected.
    let storm_report = if storm {
        gw.kill().await;
        let down = Instant::now();
        while sum(&workers, "connected") > 0 && down.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        gw = BenchGateway::start(&cfg).await;
        let restarted = Instant::now();
        let back = wait_connected(&workers, units as u64, restarted, Duration::from_secs(120)).await;
        let s = gw.status().await;
        Some(json!({
            "all_back_s": back,
            "logins_rejected": s["logins_rejected"],
            "sessions": s["sessions"],
        }))
    } else {
        None
    };

    for w in &mut workers {
        w.say("stop").await;
    }
    let mut finals = vec![];
    for w in &mut workers {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(v) = w.done.lock().unwrap().clone() {
                finals.push(v);
                break;
            }
            assert!(Instant::now() < deadline, "a load generator did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = w.child.wait().await;
    }
    let fsum = |k: &str| finals.iter().map(|f| f[k].as_u64().unwrap_or(0)).sum::<u64>();
    let mut hist = BTreeMap::new();
    for f in &finals {
        for pair in f["hist"].as_array().unwrap() {
            *hist.entry(pair[0].as_u64().unwrap()).or_insert(0u64) += pair[1].as_u64().unwrap();
        }
    }
    let acked = fsum("acked");
    let in_cloud = cloud.wait_for(Duration::from_secs(120), |s| s.batches.len() as u64 >= acked).await;
    let line = json!({
        "units": units,
        "profile": if night { "night: a reading every 10 s, a batch a minute" } else { "day: readings every second, a batch every 2 s" },
        "load_processes": workers.len(),
        "connect_all_s": connect_s.map(|s| (s * 10.0).round() / 10.0),
        "connect_spread_s": spread.as_secs(),
        "window_s": secs.round(),
        "batches_per_s": batches_per_s.round(),
        "samples_per_s": samples_per_s.round(),
        "ack_ms": {
            "p50": percentile(&hist, 0.50),
            "p99": percentile(&hist, 0.99),
            "max": percentile(&hist, 1.0),
            "acks": hist.values().sum::<u64>(),
        },
        "connection_errors_after_connect_wave": errors_in_window,
        "min_connected_in_window": min_connected,
        "gateway": {
            "cpu_cores": (gateway_cores * 100.0).round() / 100.0,
            "rss_idle_kib": rss_idle,
            "rss_connected_kib": rss_connected,
            "rss_peak_kib": rss_peak,
            "rss_per_unit_kib": ((rss_peak.saturating_sub(rss_idle)) as f64 / units as f64 * 100.0).round() / 100.0,
            "fds_per_unit": ((fds_connected.saturating_sub(fds_idle)) as f64 / units as f64 * 1000.0).round() / 1000.0,
            "front": gw_status["front"],
            "rejected": gw_status["rejected"],
            "packets_refused": gw_status["packets_refused"],
            "logins_rejected": gw_status["logins_rejected"],
        },
        "storm": storm_report,
        "end": {
            "sealed": fsum("sealed"),
            "acked": acked,
            "unacked_left": fsum("outbox_left"),
            "in_cloud": in_cloud.batches.len(),
            "lost": acked.saturating_sub(in_cloud.batches.len() as u64),
            "unmatched_acks": fsum("unmatched_acks"),
            "readings_refused": fsum("readings_refused"),
        },
    });
    println!("{line}");
    gw.kill().await;
    upstream.stop().await;
}
