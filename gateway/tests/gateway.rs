//! The gateway as a process, with real device clients, a real upstream Mosquitto and
//! a stand-in cloud: delivery through crashes, outages and full budgets, and bad input.
//!
//! Sizes come from `FLEETLINE_SIZE` (`ci` by default, `full` in scripts/soak.sh).

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fleetline_device::OutboxFull;
use fleetline_device::client::{DeviceClient, SystemClock};
use fleetline_device::wire::FleetId;
use fleetline_device::wire::signals::kind;
use fleetline_testkit::cloud::FakeCloud;
use fleetline_testkit::fleet::{Fleet, Lcg, device_config, http_get};
use fleetline_testkit::procfs::open_fds;
use fleetline_testkit::provisioning::{device_id, device_key, fleet};
use fleetline_testkit::{Mosquitto, SwitchProxy, free_port};
use fleetline_wire::provisioning::Provisioning;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn full_size() -> bool {
    std::env::var("FLEETLINE_SIZE").is_ok_and(|s| s == "full")
}

/// A test's directory, provisioning, upstream broker and stand-in cloud.
struct Env {
    dir: tempfile::TempDir,
    prov: Provisioning,
    prov_path: PathBuf,
    upstream: Option<Mosquitto>,
    upstream_port: u16,
    cloud: FakeCloud,
}

impl Env {
    async fn new(devices: usize) -> Self {
        let dir = tempfile::Builder::new().prefix("fleetline-gw-test-").tempdir().unwrap();
        let prov = fleet(devices, 2);
        let prov_path = dir.path().join("provisioning.toml");
        prov.save(&prov_path).unwrap();
        let upstream = Mosquitto::start().await;
        let upstream_port = upstream.port;
        let cloud = FakeCloud::start(upstream_port, prov.clone()).await;
        Self { dir, prov, prov_path, upstream: Some(upstream), upstream_port, cloud }
    }

    /// Writes a gateway config; `extra` is appended TOML.
    fn config(&self, gw: usize, devices_port: u16, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("gw-{gw}.toml"));
        let text = format!(
            r#"id = "gw-{gw}"
data_dir = "{data}"
provisioning = "{prov}"
provisioning_reload = "100ms"
shard_count = 8
[devices]
listen = "127.0.0.1:{devices_port}"
[queue]
commit_interval = "2ms"
{extra}
[uplink]
host = "127.0.0.1"
port = {up}
bundle_max_age = "20ms"
resend_after = "2s"
backoff_initial = "50ms"
backoff_max = "300ms"
[http]
listen = "127.0.0.1:0"
"#,
            data = self.dir.path().join(format!("gw-{gw}-data")).display(),
            prov = self.prov_path.display(),
            up = self.upstream_port,
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    async fn stop_upstream(&mut self) {
        if let Some(m) = self.upstream.take() {
            m.stop().await;
        }
    }

    async fn start_upstream(&mut self) {
        self.upstream = Some(Mosquitto::start_on(self.upstream_port).await);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // On failure, show what the gateways logged.
        if std::thread::panicking() {
            for entry in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().take(25).collect::<Vec<_>>().into_iter().rev().collect();
                    eprintln!("--- {} (last lines)", p.display());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// A gateway process.
struct Gateway {
    child: Child,
    devices: SocketAddr,
    tls: Option<SocketAddr>,
    http: SocketAddr,
}

impl Gateway {
    async fn start(config: &Path) -> Self {
        Self::start_limited(config, None).await
    }

    /// Starts with extra environment variables.
    async fn start_with_env(config: &Path, vars: &[(&str, &str)]) -> Self {
        Self::spawn(config, None, vars).await
    }

    /// Starts with a file-size limit (in KiB) on everything the gateway writes.
    async fn start_limited(config: &Path, file_kib: Option<u32>) -> Self {
        Self::spawn(config, file_kib, &[]).await
    }

    async fn spawn(config: &Path, file_kib: Option<u32>, vars: &[(&str, &str)]) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(config.with_extension("log")).unwrap();
        let mut cmd = match file_kib {
            None => Command::new(env!("CARGO_BIN_EXE_fleetline-gateway")),
            Some(kib) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -f {kib} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_fleetline-gateway"));
                c
            }
        };
        cmd.envs(vars.iter().copied());
        let mut child = cmd
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,rumqttd=error")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("gateway started in time")
            .unwrap()
            .unwrap_or_else(|| panic!("gateway exited: see {}", config.with_extension("log").display()));
        let v: Value = serde_json::from_str(&line).unwrap();
        Self {
            child,
            devices: v["devices"].as_str().unwrap().parse().unwrap(),
            tls: v["devices_tls"].as_str().map(|a| a.parse().unwrap()),
            http: v["http"].as_str().unwrap().parse().unwrap(),
        }
    }

    /// SIGKILL.
    async fn kill9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait for the exit code.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap() as i32;
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.unwrap().unwrap()
    }

    async fn status(&self) -> Value {
        let body = http_get(self.http, "/status").await;
        serde_json::from_str(&body).unwrap()
    }
}

/// Every acked batch reached the cloud with all its samples; counts duplicates.
async fn assert_delivered(cloud: &FakeCloud, acked: &BTreeMap<(String, u32, u32), u16>) -> u64 {
    let s = cloud
        .wait_for(Duration::from_secs(120), |s| {
            acked.keys().all(|(d, e, q)| s.batches.contains_key(&("acme".to_string(), d.clone(), *e, *q)))
        })
        .await;
    let mut missing = vec![];
    for ((d, e, q), samples) in acked {
        match s.batches.get(&("acme".to_string(), d.clone(), *e, *q)) {
            Some(r) => assert_eq!(r.samples, usize::from(*samples), "{d} {e} {q}"),
            None => missing.push((d.clone(), *e, *q)),
        }
    }
    assert!(
        missing.is_empty(),
        "{} acked batches never reached the cloud, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(s.bad_batches, 0);
    s.duplicates()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acked_batch_survives_sigkill_of_the_gateway() {
    let (devices, kills) = if full_size() { (20, 20) } else { (4, 3) };
    let env = Env::new(devices).await;
    let port = free_port();
    let cfg = env.config(0, port, "");
    let mut gw = Gateway::start(&cfg).await;
    let mut fleet = Fleet::start(devices, port, Duration::from_millis(15), OutboxFull::Block);
    let mut rng = Lcg(7);
    let mut acked = BTreeMap::new();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(900))).await;
        gw.kill9().await;
        acked.extend(fleet.acked());
        tokio::time::sleep(Duration::from_millis(200)).await;
        gw = Gateway::start(&cfg).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.stop().await;
    acked.extend(fleet.drain(Duration::from_secs(60)).await);
    assert!(acked.len() > kills * 2, "load ran: {} batches acked", acked.len());
    let dups = assert_delivered(&env.cloud, &acked).await;
    let status = gw.status().await;
    eprintln!(
        "crash test: {} batches acked, {dups} duplicate deliveries deduped; gateway status {status}",
        acked.len()
    );
    assert_eq!(gw.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_backlog_drains_while_fresh_data_flows_and_a_moving_vehicle_loses_nothing() {
    let (devices, outage) = if full_size() { (16, Duration::from_secs(30)) } else { (4, Duration::from_secs(3)) };
    let mut env = Env::new(devices).await;
    // A slow backlog drain, so fresh data has something to overtake.
    let (p0, p1) = (free_port(), free_port());
    let gw0 = Gateway::start(&env.config(0, p0, "")).await;
    let slow = std::fs::read_to_string(env.config(0, p0, "")).unwrap().replace(
        "[uplink]\n",
        &format!("[uplink]\nbacklog_rate = \"{}\"\n", if full_size() { "64 KiB" } else { "2 KiB" }),
    );
    let cfg0 = env.dir.path().join("gw-0.toml");
    std::fs::write(&cfg0, slow).unwrap();
    gw0.terminate().await;
    let gw0 = Gateway::start(&cfg0).await;
    let gw1 = Gateway::start(&env.config(1, p1, "")).await;
    // The last vehicle reaches its gateway through a proxy that can move it.
    let mover = devices - 1;
    let proxy = SwitchProxy::start(gw0.devices).await;
    let proxy_port = proxy.addr.port();
    let mut fleet = Fleet::start_with(
        devices,
        |i| if i == mover { proxy_port } else { p0 },
        Duration::from_millis(10),
        OutboxFull::Block,
    );
    tokio::time::sleep(Duration::from_millis(800)).await;

    env.stop_upstream().await;
    tokio::time::sleep(outage / 2).await;
    // Mid-outage the vehicle drives to the other depot.
    proxy.switch(Some(gw1.devices));
    tokio::time::sleep(outage / 2).await;
    let held = gw0.status().await;
    assert!(held["queue"]["records"].as_u64().unwrap() > 0, "backlog held on disk: {held}");
    assert_eq!(held["upstream"]["connected"], false);

    let sealed_before: Vec<u64> = fleet.clients.iter().map(|c| c.stats().core.batches_sealed).collect();
    env.start_upstream().await;
    let reconnected = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.stop().await;
    let acked = fleet.drain(Duration::from_secs(90)).await;
    let dups = assert_delivered(&env.cloud, &acked).await;

    // Fresh batches (sealed after the uplink came back) arrived before the backlog finished draining.
    let s = env.cloud.snapshot();
    let mut first_fresh = None::<Instant>;
    let mut backlog_done = None::<Instant>;
    for ((_, d, _, seq), r) in &s.batches {
        let i: usize = d.trim_start_matches("dev-").parse().unwrap();
        if i == mover {
            continue;
        }
        if u64::from(*seq) >= sealed_before[i] {
            first_fresh = Some(first_fresh.map_or(r.first_at, |f| f.min(r.first_at)));
        } else if r.first_at > reconnected {
            backlog_done = Some(backlog_done.map_or(r.first_at, |b| b.max(r.first_at)));
        }
    }
    let (fresh, done) = (first_fresh.unwrap(), backlog_done.unwrap());
    eprintln!(
        "outage test: {} batches, {dups} duplicates; first fresh batch {:?} after reconnect, backlog drained after {:?}",
        acked.len(),
        fresh - reconnected,
        done - reconnected
    );
    assert!(fresh < done, "fresh data waited for the backlog");
    // The moving vehicle's batches went through both gateways.
    let via: std::collections::BTreeSet<String> =
        s.batches.iter().filter(|(k, _)| k.1 == device_id(mover).to_string()).map(|(_, r)| r.gateway.clone()).collect();
    assert_eq!(via.len(), 2, "vehicle seen via {via:?}");
    gw0.terminate().await;
    gw1.terminate().await;
}

/// Fills a small queue while the cloud is unreachable.
async fn fill_with_upstream_down(policy: &str) -> (Env, Gateway, Fleet) {
    let mut env = Env::new(4).await;
    env.stop_upstream().await;
    let port = free_port();
    let extra = format!("budget = \"256 KiB\"\nsegment = \"64 KiB\"\nwhen_full = \"{policy}\"");
    let gw = Gateway::start(&env.config(0, port, &extra)).await;
    let fleet = Fleet::start(4, port, Duration::from_millis(5), OutboxFull::Block);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = gw.status().await;
        let full =
            s["rejected"]["queue_full"].as_u64().unwrap_or(0) > 0 || s["dropped"]["batches"].as_u64().unwrap_or(0) > 20;
        if full || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (env, gw, fleet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_budget_under_backpressure_keeps_data_on_the_devices() {
    let (mut env, gw, mut fleet) = fill_with_upstream_down("backpressure").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = gw.status().await;
    assert!(s["rejected"]["queue_full"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["dropped"]["batches"], 0);
    assert!(s["queue"]["bytes"].as_u64().unwrap() <= 256 * 1024);
    let held: u64 = fleet.clients.iter().map(|c| c.stats().outbox_batches).sum();
    assert!(held > 0, "devices hold what the gateway could not take");
    env.start_upstream().await;
    fleet.stop().await;
    let acked = fleet.drain(Duration::from_secs(90)).await;
    assert_delivered(&env.cloud, &acked).await;
    gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_budget_under_drop_oldest_drops_oldest_first_and_counts_exactly() {
    let (mut env, gw, mut fleet) = fill_with_upstream_down("drop-oldest").await;
    fleet.stop().await;
    let acked = fleet.drain(Duration::from_secs(30)).await;
    env.start_upstream().await;
    let s = gw.status().await;
    let dropped = s["dropped"]["batches"].as_u64().unwrap();
    assert!(dropped > 0, "{s}");
    // Wait for everything still held to arrive.
    let cloud = env
        .cloud
        .wait_for(Duration::from_secs(60), |c| {
            let missing =
                acked.keys().filter(|(d, e, q)| !c.batches.contains_key(&("acme".into(), d.clone(), *e, *q))).count();
            missing as u64 <= dropped
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = gw.status().await;
    let lost = s["dropped"]["batches"].as_u64().unwrap() - s["dropped"]["then_delivered"].as_u64().unwrap();
    let missing: Vec<&(String, u32, u32)> =
        acked.keys().filter(|(d, e, q)| !cloud.batches.contains_key(&("acme".into(), d.clone(), *e, *q))).collect();
    assert_eq!(missing.len() as u64, lost, "every missing batch is counted as dropped, and only those: {s}");
    // Oldest first: per device, every lost seq is below every seq delivered after it.
    for i in 0..4 {
        let d = device_id(i).to_string();
        let lost: Vec<u32> = missing.iter().filter(|k| k.0 == d).map(|k| k.2).collect();
        if let Some(max_lost) = lost.iter().max() {
            let later = cloud.batches.keys().filter(|k| k.1 == d && k.3 > *max_lost).count();
            let min_lost = lost.iter().min().unwrap();
            let between = cloud.batches.keys().filter(|k| k.1 == d && k.3 > *min_lost && k.3 < *max_lost).count();
            assert_eq!(between, 0, "{d}: lost seqs are one oldest run");
            assert!(later > 0);
        }
    }
    eprintln!(
        "drop-oldest: {} batches acked to devices, {} dropped, {} of those delivered anyway, {} missing",
        acked.len(),
        dropped,
        s["dropped"]["then_delivered"],
        missing.len()
    );
    gw.terminate().await;
}

/// Operator faults on the provisioning file. Before: a file cut at an entry
/// boundary (valid TOML, 10 of 42 units) revoked the 32 missing units on reload,
/// and a rotated key left sessions opened with the old key running. Now the cut
/// file is refused (logged, counted) and every unit keeps working; a rotation
/// without a grace window ends the sessions opened with the old key, and the old
/// key no longer gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_provisioning_file_is_refused_and_a_rotated_key_ends_old_sessions() {
    let env = Env::new(40).await;
    let port = free_port();
    let gw = Gateway::start(&env.config(0, port, "")).await;
    let a = DeviceClient::spawn(device_config(0, port, OutboxFull::Block), SystemClock::new()).unwrap();
    let b = DeviceClient::spawn(device_config(30, port, OutboxFull::Block), SystemClock::new()).unwrap();
    for c in [&a, &b] {
        assert!(c.wait_for(Duration::from_secs(10), |s| s.connected).await.connected);
    }
    // The file cut short while being copied: 10 of 40 units (and the gateways).
    let full = std::fs::read_to_string(&env.prov_path).unwrap();
    let mut cut = env.prov.clone();
    let keep: Vec<_> = env.prov.devices().take(10).cloned().collect();
    cut = {
        let mut p = Provisioning::default();
        for g in cut.gateways() {
            p.upsert_gateway(g.clone());
        }
        for d in keep {
            p.upsert_device(d);
        }
        p
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    cut.save(&env.prov_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.status().await["provisioning_refused"] != 1 {
        assert!(Instant::now() < deadline, "{}", gw.status().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = gw.status().await;
    assert_eq!((s["revocations"].as_u64(), s["sessions_ended_by_keys"].as_u64()), (Some(0), Some(0)), "{s}");
    assert!(a.stats().connected && b.stats().connected, "every unit still in");
    let log = std::fs::read_to_string(env.dir.path().join("gw-0.log")).unwrap();
    assert!(log.contains("drops 30 of 42 entries"), "the log says what was refused");

    // The whole file back, with unit 30's key rotated and no grace window.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&env.prov_path, full).unwrap();
    let mut rotated = env.prov.clone();
    let mut entry = rotated.device(&FleetId::new("acme").unwrap(), &device_id(30)).unwrap().clone();
    entry.key = fleetline_device::wire::DeviceKey::from_bytes([0x5a; 32]);
    entry.previous = None;
    rotated.upsert_device(entry);
    tokio::time::sleep(Duration::from_millis(20)).await;
    rotated.save(&env.prov_path).unwrap();
    let s = b.wait_for(Duration::from_secs(10), |s| !s.connected).await;
    assert!(!s.connected, "the session opened with the old key ended");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = gw.status().await;
    assert!(s["sessions_ended_by_keys"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["logins_rejected"]["bad_password"].as_u64().unwrap_or(0) >= 1, "the old key is refused: {s}");
    assert!(a.stats().connected, "other units unaffected");
    a.shutdown(Duration::from_millis(100)).await;
    b.shutdown(Duration::from_millis(100)).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// The gateway restarted with its clock two hours back (an NTP step at boot, a
/// dead RTC battery). Before: its ack counters were wall-clock microseconds, units
/// remember the highest they saw, and every ack after the restart was refused as a
/// replay (40 of 150 batches acked, 614 re-sends in 90 s). Now the counter continues
/// above the mark kept in `data_dir/ack-counter` and units take the acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_restarted_with_its_clock_two_hours_back_keeps_acking() {
    let Some(lib) = faketime_lib() else {
        panic!("libfaketime is missing: scripts/test.sh installs it (Debian package libfaketime)");
    };
    let env = Env::new(4).await;
    let port = free_port();
    let cfg = env.config(0, port, "");
    let gw = Gateway::start(&cfg).await;
    let mut fleet = Fleet::start(4, port, Duration::from_millis(15), OutboxFull::Block);
    // Until acks flow (other tests may load the machine), then a little more.
    let deadline = Instant::now() + Duration::from_secs(15);
    while fleet.acked().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.kill9().await;
    let mut acked = fleet.acked();
    assert!(!acked.is_empty(), "acks flowed before the restart");
    let before = acked.len();
    let gw = Gateway::start_with_env(
        &cfg,
        &[
            ("LD_PRELOAD", lib.as_str()),
            ("FAKETIME", "-2h"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_DONT_RESET", "1"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.stop().await;
    acked.extend(fleet.drain(Duration::from_secs(30)).await);
    let rejected: u64 = fleet.clients.iter().map(|c| c.stats().core.acks_replayed).sum();
    assert!(acked.len() > before + 20, "acks after the restart: {} before, {} in all", before, acked.len());
    assert_eq!(rejected, 0, "no ack refused as a replay");
    assert_delivered(&env.cloud, &acked).await;
    let counter: u64 =
        std::fs::read_to_string(env.dir.path().join("gw-0-data/ack-counter")).unwrap().trim().parse().unwrap();
    assert!(counter > 0);
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Debian's libfaketime, if installed.
fn faketime_lib() -> Option<String> {
    ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .map(String::from)
}

/// Operator mistakes get an answer that names what is wrong: a taken port names
/// its address (exit 1), settings that parse but cannot work are refused at start
/// (exit 2) instead of failing later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_and_unworkable_settings_get_clear_errors() {
    let env = Env::new(1).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let run = |extra: &str, devices_port: u16| {
        let cfg = env.config(0, devices_port, extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetline-gateway"))
            .arg("--config")
            .arg(&cfg)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run("", port);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "the taken address is named: {err}");
    let free = free_port();
    for (extra, says) in [
        ("budget = \"1 MiB\"\nsegment = \"1 MiB\"", "queue.budget"),
        (
            "when_full = \"drop-oldest\"\n[devices.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"",
            "/nonexistent.pem",
        ),
    ] {
        let (code, err) = run(extra, free);
        assert!(code == Some(1) || code == Some(2), "{extra}: {code:?} {err}");
        assert!(err.contains(says), "{extra}: {err}");
    }
    // Unworkable values: checked at start (exit 2), not when they bite.
    let cfg = env.config(0, free, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("provisioning_reload = \"100ms\"", "provisioning_reload = \"0s\"");
    std::fs::write(&cfg, text).unwrap();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_fleetline-gateway")).arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("provisioning_reload"));
    drop(taken);
}

/// A gateway at its device session cap says so: readiness false (a balancer sends
/// new units elsewhere), the extra unit refused at once and counted; ready again
/// once sessions end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_is_false_while_device_sessions_are_at_the_cap() {
    let env = Env::new(3).await;
    let port = free_port();
    let cfg = env.config(0, port, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("[devices]\n", "[devices]\nmax_connections = 2\n");
    std::fs::write(&cfg, text).unwrap();
    let gw = Gateway::start(&cfg).await;
    assert_eq!(http_get(gw.http, "/health/ready").await, "ready");
    let mut fleet = Fleet::start(3, port, Duration::from_millis(50), OutboxFull::Block);
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = gw.status().await;
        if s["logins_rejected"]["server_busy"].as_u64().unwrap_or(0) > 0 && s["sessions"] == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s["session_cap"], 2, "{s}");
    assert_eq!(http_get(gw.http, "/health/ready").await, "device sessions at capacity");
    fleet.stop().await;
    drop(fleet);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(gw.http, "/health/ready").await != "ready" {
        assert!(Instant::now() < deadline, "ready again once sessions end: {}", gw.status().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// A flipped bit in a sealed queue segment, found at restart. Before: recovery cut
/// the segment at the damaged record and every later record in it was lost (103 of
/// 200 acked batches in the first report), without a counter. Now exactly the
/// damaged batch is lost, logged with its device and seq, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flipped_bit_in_a_queue_segment_loses_only_that_batch() {
    let mut env = Env::new(4).await;
    env.stop_upstream().await;
    let port = free_port();
    let cfg = env.config(0, port, "segment = \"64 KiB\"");
    let gw = Gateway::start(&cfg).await;
    let mut fleet = Fleet::start(4, port, Duration::from_millis(5), OutboxFull::Block);
    let queue = env.dir.path().join("gw-0-data/queue");
    let segments = || {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&queue)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while segments().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.stop().await;
    let acked = fleet.drain(Duration::from_secs(30)).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let segs = segments();
    assert!(segs.len() >= 3, "{segs:?}");

    // The middle record of the first (sealed) segment: its tag gets a flipped bit.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let mut records = vec![];
    let mut pos = 16;
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        records.push((pos, 8 + len));
        pos += 8 + len;
    }
    assert_eq!(pos, bytes.len());
    let (off, len) = records[records.len() / 2];
    // Body: id (8), shard (2), samples (4), received_at (8), then the sealed batch.
    let sealed = &bytes[off + 8 + 22..off + len];
    let h = fleetline_wire::peek_header(sealed).unwrap();
    let victim = (h.device.to_string(), h.epoch, h.seq);
    assert!(acked.contains_key(&victim), "the damaged batch was acked to its unit");
    bytes[off + len - 5] ^= 0x04;
    std::fs::write(&segs[0], &bytes).unwrap();

    env.start_upstream().await;
    let gw = Gateway::start(&cfg).await;
    let expected: Vec<_> = acked.keys().filter(|k| **k != victim).cloned().collect();
    let cloud = env
        .cloud
        .wait_for(Duration::from_secs(90), |c| {
            expected.iter().all(|(d, e, q)| c.batches.contains_key(&("acme".into(), d.clone(), *e, *q)))
        })
        .await;
    let missing: Vec<_> =
        acked.keys().filter(|(d, e, q)| !cloud.batches.contains_key(&("acme".into(), d.clone(), *e, *q))).collect();
    assert_eq!(missing, [&victim], "only the damaged batch is missing");
    let s = gw.status().await;
    assert_eq!(s["queue"]["lost_records"], 1, "{s}");
    let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap();
    let named = format!("{} epoch {} seq {}", victim.0, victim.1, victim.2);
    assert!(log.lines().any(|l| l.contains("lost") && l.contains(&named)), "the log names {named}");
    eprintln!("flipped bit: {} batches acked, 1 lost ({named}), {} segments", acked.len(), segs.len());
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// A sealed batch of device `i` with one speed sample per entry of `kinds`
/// (unknown kinds become raw series).
fn batch(i: usize, key_of: usize, seq: u32, unknown_kind: Option<u16>) -> Vec<u8> {
    use fleetline_device::wire::{BatchHeader, BatchWriter, SCHEMA_V1};
    let device = device_id(i).to_string();
    let header = BatchHeader {
        format: fleetline_device::wire::batch::BATCH_FORMAT,
        schema: SCHEMA_V1,
        fleet: "acme",
        device: &device,
        epoch: 77,
        seq,
        base_time_ms: 1_790_000_000_000,
    };
    let mut buf = vec![0u8; 1024];
    let mut w = BatchWriter::new(&mut buf, &header).unwrap();
    w.begin_series(kind::SPEED).unwrap();
    w.push(0, 420).unwrap();
    if let Some(k) = unknown_kind {
        w.raw_series(k, &[0, 2, 4]).unwrap();
    }
    let n = w.seal(&device_key(key_of)).unwrap();
    buf.truncate(n);
    buf
}

/// `mosquitto_pub` arguments logging in as device `i`.
fn login(i: usize) -> Vec<String> {
    let user = format!("acme.{}", device_id(i));
    let pass = String::from_utf8(device_key(i).mqtt_password(&user).to_vec()).unwrap();
    vec!["-i".into(), user.clone(), "-u".into(), user, "-P".into(), pass]
}

async fn pub_as(port: u16, i: usize, topic_device: usize, payload: &[u8], extra: &[&str]) -> bool {
    let topic = format!("fleetline/v1/acme/{}/up", device_id(topic_device));
    let mut args: Vec<String> = login(i);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ok = fleetline_testkit::publish(port, &topic, payload, &args).await;
    // Each call reconnects with the same client id; let the broker finish closing
    // the previous session first, as a real unit's reconnect backoff would.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_and_counted_while_everyone_else_is_served() {
    let mut env = Env::new(3).await;
    let pki = fleetline_testkit::Pki::generate();
    let (cert, key, ca) = (env.dir.path().join("gw.pem"), env.dir.path().join("gw.key"), env.dir.path().join("ca.pem"));
    std::fs::write(&cert, &pki.server.0).unwrap();
    std::fs::write(&key, &pki.server.1).unwrap();
    std::fs::write(&ca, &pki.ca).unwrap();
    let port = free_port();
    let tls = format!(
        "[devices.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout = \"1s\"\n",
        cert.display(),
        key.display()
    );
    let gw = Gateway::start(&env.config(0, port, &tls)).await;
    let tls_port = gw.tls.unwrap().port();

    // An honest vehicle keeps working throughout.
    let mut honest = Fleet::start(1, port, Duration::from_millis(20), OutboxFull::Block);

    // An idle client on the TLS port must not block anyone's handshake.
    let idle = tokio::net::TcpStream::connect(gw.tls.unwrap()).await.unwrap();

    // Logins.
    assert!(!fleetline_testkit::publish(port, "fleetline/v1/acme/dev-0001/up", b"x", &[]).await, "anonymous");
    let mut wrong = login(1);
    wrong[5] = "0".repeat(32);
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    assert!(!fleetline_testkit::publish(port, "t", b"x", &wrong).await, "wrong password");
    assert!(!fleetline_testkit::publish(port, "t", b"x", &["-i", "acme.ghost", "-u", "acme.ghost", "-P", "x"]).await);

    // Authenticated, but bad batches.
    let good = batch(1, 1, 1, None);
    assert!(pub_as(port, 1, 1, b"hello", &[]).await);
    assert!(pub_as(port, 1, 1, &good[..good.len() - 5], &[]).await);
    let mut tampered = good.clone();
    let last = tampered.len() - 20;
    tampered[last] ^= 1;
    assert!(pub_as(port, 1, 1, &tampered, &[]).await);
    assert!(pub_as(port, 1, 1, &batch(0, 0, 9, None), &[]).await, "another device's batch on my topic");
    assert!(pub_as(port, 1, 1, &batch(1, 0, 2, None), &[]).await, "sealed with another device's key");
    assert!(pub_as(port, 1, 1, &vec![7u8; 66 * 1024], &[]).await, "oversized");
    // Good ones: an unknown kind is kept, a replay is stored once.
    assert!(pub_as(port, 1, 1, &batch(1, 1, 3, Some(900)), &[]).await);
    assert!(pub_as(port, 1, 1, &good, &[]).await);
    // Over TLS, while the idle client still holds its connection.
    let ca_arg = ca.display().to_string();
    assert!(pub_as(tls_port, 1, 1, &good, &["--cafile", &ca_arg]).await, "TLS publish while an idle client waits");
    assert!(pub_as(tls_port, 1, 1, &batch(1, 1, 4, None), &["--cafile", &ca_arg]).await);

    // A forged ack on the uplink's ack topic.
    assert!(fleetline_testkit::publish(env.upstream_port, "fleetline/v1/gw/gw-0/ack", b"forged", &[]).await);

    // Revocation disconnects a connected device and refuses it from then on.
    let revoked = DeviceClient::spawn(device_config(2, port, OutboxFull::Block), SystemClock::new()).unwrap();
    let s = revoked.wait_for(Duration::from_secs(10), |s| s.connected).await;
    assert!(s.connected);
    let mut p = env.prov.clone();
    let mut entry = p.device(&FleetId::new("acme").unwrap(), &device_id(2)).unwrap().clone();
    entry.revoked = true;
    p.upsert_device(entry);
    // A new mtime even on coarse-grained file systems.
    tokio::time::sleep(Duration::from_millis(20)).await;
    p.save(&env.prov_path).unwrap();
    env.prov = p;
    let s = revoked.wait_for(Duration::from_secs(10), |s| !s.connected).await;
    assert!(!s.connected, "revoked device disconnected");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(idle);
    let status = gw.status().await;
    let r = &status["rejected"];
    let l = &status["logins_rejected"];
    eprintln!("bad input: rejected {r}, logins rejected {l}, tls {}, upstream {}", status["tls"], status["upstream"]);
    assert_eq!(r["malformed"], 1, "{status}");
    assert!(r["auth_failed"].as_u64().unwrap() >= 3, "truncated, tampered, wrong key: {status}");
    assert_eq!(r["topic_mismatch"], 1);
    assert_eq!(r["oversized"], 1);
    assert!(l["bad_username"].as_u64().unwrap() >= 1);
    assert!(l["bad_password"].as_u64().unwrap() >= 1);
    assert!(l["unknown_device"].as_u64().unwrap() >= 1);
    assert!(l["revoked"].as_u64().unwrap_or(0) >= 1, "the revoked device's reconnects are refused: {status}");
    assert!(status["revocations"].as_u64().unwrap() >= 1);
    assert!(status["tls"]["handshake_timeout"].as_u64().unwrap() >= 1);
    assert!(status["tls"]["sessions"].as_u64().unwrap() >= 2);
    // The replayed batch was either recognised by the gateway (re-acked, not stored)
    // or stored twice and deduped downstream; either way it is counted once below.
    assert_eq!(status["accepted"]["unknown_kind_series"], 1);
    assert!(status["upstream"]["acks_invalid"].as_u64().unwrap() >= 1);

    // The good batches of device 1 arrived once each; the honest vehicle lost nothing.
    honest.stop().await;
    let acked = honest.drain(Duration::from_secs(30)).await;
    assert_delivered(&env.cloud, &acked).await;
    let c = env.cloud.wait_for(Duration::from_secs(10), |c| c.device_batches("dev-0001") == 3).await;
    assert_eq!(c.device_batches("dev-0001"), 3, "seqs 1, 3 and 4");
    gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_errors_refuse_batches_without_losing_or_crashing() {
    let env = Env::new(3).await;
    let port = free_port();
    // Every file the gateway writes is cut off at 128 KiB: appends beyond fail with
    // EFBIG, as on a full disk, and the queue must roll back, count, and carry on.
    let gw = Gateway::start_limited(&env.config(0, port, "segment = \"1 MiB\""), Some(128)).await;
    let mut fleet = Fleet::start(3, port, Duration::from_millis(5), OutboxFull::Block);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = gw.status().await;
        if s["rejected"]["queue_error"].as_u64().unwrap_or(0) >= 2 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status["rejected"]["queue_error"].as_u64().unwrap_or(0) >= 2, "write errors seen: {status}");
    assert!(status["queue"]["io_errors"].as_u64().unwrap() >= 2);
    fleet.stop().await;
    let acked = fleet.drain(Duration::from_secs(60)).await;
    assert_delivered(&env.cloud, &acked).await;
    eprintln!(
        "write errors: {} batches acked and delivered; gateway refused {} on write errors",
        acked.len(),
        status["rejected"]["queue_error"]
    );
    assert_eq!(gw.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_uplink_uses_mutual_tls_when_configured() {
    let mut env = Env::new(2).await;
    let pki = fleetline_testkit::Pki::generate();
    let d = env.dir.path().to_path_buf();
    for (name, pem) in [
        ("ca.pem", &pki.ca),
        ("srv.pem", &pki.server.0),
        ("srv.key", &pki.server.1),
        ("gw.pem", &pki.client.0),
        ("gw.key", &pki.client.1),
    ] {
        std::fs::write(d.join(name), pem).unwrap();
    }
    // The upstream broker again, now with a second, mutual-TLS listener for gateways.
    env.stop_upstream().await;
    let tls_port = free_port();
    let dir = d.clone();
    env.upstream = Some(
        Mosquitto::start_with(Some(env.upstream_port), move |_| {
            format!(
                "listener {tls_port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/srv.pem\nkeyfile {0}/srv.key\nrequire_certificate true\n",
                dir.display()
            )
        })
        .await,
    );
    let port = free_port();
    let with_tls = |client_cert: bool| {
        let cfg = std::fs::read_to_string(env.config(0, port, "")).unwrap();
        let auth = if client_cert {
            format!(", cert = \"{0}/gw.pem\", key = \"{0}/gw.key\"", d.display())
        } else {
            String::new()
        };
        let cfg = cfg.replace(
            &format!("port = {}", env.upstream_port),
            &format!("port = {tls_port}\ntls = {{ ca = \"{}/ca.pem\"{auth} }}", d.display()),
        );
        let path = d.join(if client_cert { "mtls.toml" } else { "no-cert.toml" });
        std::fs::write(&path, cfg).unwrap();
        path
    };
    // Without a client certificate the broker refuses the uplink.
    let gw = Gateway::start(&with_tls(false)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = gw.status().await;
    assert_eq!(s["upstream"]["connected"], false, "{s}");
    assert!(s["upstream"]["last_error"].is_string());
    gw.terminate().await;
    // With one, data flows.
    let gw = Gateway::start(&with_tls(true)).await;
    let mut fleet = Fleet::start(2, port, Duration::from_millis(20), OutboxFull::Block);
    tokio::time::sleep(Duration::from_millis(800)).await;
    fleet.stop().await;
    let acked = fleet.drain(Duration::from_secs(30)).await;
    assert!(!acked.is_empty());
    assert_delivered(&env.cloud, &acked).await;
    assert_eq!(gw.status().await["upstream"]["connected"], true);
    gw.terminate().await;
}

/// A unit on a flapping link (or anyone holding one unit's credentials) in a loop of
/// connect → CONNECT → CONNACK → close must not take the device broker down for
/// everyone: every later login still gets its CONNACK, honest units keep delivering,
/// and readiness stays true because nothing is wedged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unit_reconnecting_in_a_tight_loop_does_not_take_the_broker_down() {
    use fleetline_testkit::raw::{connect_once, connect_packet, reconnect_storm};
    let env = Env::new(4).await;
    let port = free_port();
    let gw = Gateway::start(&env.config(0, port, "")).await;
    let mut honest = Fleet::start(1, port, Duration::from_millis(20), OutboxFull::Block);

    let cycles = if full_size() { 2_000 } else { 400 };
    let user = format!("acme.{}", device_id(1));
    let pass = device_key(1).mqtt_password(&user);
    // Two loops at once with the same id, as a unit with two stale sockets would.
    let (a, b) = tokio::join!(
        reconnect_storm(gw.devices, &user, &user, &pass, cycles),
        reconnect_storm(gw.devices, &user, &user, &pass, cycles),
    );
    let status = gw.status().await;
    eprintln!("reconnect storm: {a} + {b} of {} CONNACKs accepted; refused: {}", 2 * cycles, status["logins_rejected"]);

    // Other units still get in at once; the stormy one after a pause (reconnects
    // of one id are paced: a burst, then a few per second).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in [2, 3, 1] {
        let user = format!("acme.{}", device_id(i));
        let pass = device_key(i).mqtt_password(&user);
        let outcome =
            connect_once(gw.devices, &connect_packet(4, &user, Some((&user, &pass)), 30), Duration::from_secs(5)).await;
        assert_eq!(outcome.code(), Some(0), "device {i} after the storm: {outcome:?}");
    }
    let ready = http_get(gw.http, "/health/ready").await;
    assert_eq!(ready, "ready");
    let status = gw.status().await;
    assert_eq!(status["broker"]["panics"], 0, "{status}");
    assert!(status["logins_rejected"]["reconnect_rate"].as_u64().unwrap() > 0, "the storm was paced: {status}");

    honest.stop().await;
    let acked = honest.drain(Duration::from_secs(30)).await;
    assert!(!acked.is_empty());
    assert_delivered(&env.cloud, &acked).await;
    gw.terminate().await;
}

/// A logged-in MQTT session of device `i`, spoken by hand.
async fn raw_session(port: u16, i: usize) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let user = format!("acme.{}", device_id(i));
    let pass = device_key(i).mqtt_password(&user);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&fleetline_testkit::raw::connect_packet(4, &user, Some((&user, &pass[..])), 30)).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack[3], 0, "logged in");
    s
}

/// Sends `packet` on a fresh session of device `i`; what came back: `None` when
/// the front closed the session, else the first byte of the answer.
async fn answer_to(port: u16, i: usize, packet: &[u8]) -> Option<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = raw_session(port, i).await;
    s.write_all(packet).await.unwrap();
    let mut first = [0u8; 1];
    let got = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut first)).await {
        Ok(Ok(1)) => Some(first[0]),
        Ok(_) => None,
        Err(_) => panic!("neither an answer nor a close within 5 s"),
    };
    drop(s);
    // Let the broker finish with this client id before the next session takes it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    got
}

/// A unit publishes only its own batches and reads only its own acks and
/// commands; anything else ends its session and is counted, and an honest unit
/// next to it loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unit_may_use_only_its_own_topics() {
    let env = Env::new(3).await;
    let port = free_port();
    let gw = Gateway::start(&env.config(0, port, "")).await;
    let mut honest = Fleet::start(1, port, Duration::from_millis(20), OutboxFull::Block);
    let own = |channel: &str| format!("fleetline/v1/acme/{}/{channel}", device_id(1));

    // Its own batch topic works; another unit's, or a retained message, does not.
    assert!(pub_as(port, 1, 1, &batch(1, 1, 1, None), &[]).await, "own topic");
    assert!(!pub_as(port, 1, 0, &batch(1, 1, 2, None), &[]).await, "another unit's topic");
    assert!(!pub_as(port, 1, 1, &batch(1, 1, 3, None), &["-r"]).await, "retained");
    // Subscriptions: its own acks and commands only, and not too many.
    let suback = Some(0x90);
    assert_eq!(
        answer_to(port, 1, &fleetline_testkit::raw::subscribe_packet(&[own("ack"), own("cmd")])).await,
        suback,
        "own ack and cmd"
    );
    assert_eq!(answer_to(port, 1, &fleetline_testkit::raw::subscribe_packet(&["#".into()])).await, None, "everything");
    let other = format!("fleetline/v1/acme/{}/ack", device_id(0));
    assert_eq!(
        answer_to(port, 1, &fleetline_testkit::raw::subscribe_packet(&[other])).await,
        None,
        "another unit's acks"
    );
    assert_eq!(
        answer_to(port, 1, &fleetline_testkit::raw::subscribe_packet(&vec![own("ack"); 17])).await,
        None,
        "17 filters"
    );
    // A packet only a server sends, after a valid login.
    assert_eq!(answer_to(port, 1, &[0x90, 0x03, 0x00, 0x01, 0x00]).await, None, "a SUBACK from a client");

    let status = gw.status().await;
    let r = &status["packets_refused"];
    eprintln!("packets refused: {r}");
    assert_eq!(r["publish_denied"], 1, "{status}");
    assert_eq!(r["retain_denied"], 1, "{status}");
    assert_eq!(r["subscribe_denied"], 2, "{status}");
    assert_eq!(r["too_many_filters"], 1, "{status}");
    assert_eq!(r["malformed"], 1, "{status}");
    // Nothing refused reached the queue: only the one good batch of unit 1.
    honest.stop().await;
    let acked = honest.drain(Duration::from_secs(30)).await;
    assert_delivered(&env.cloud, &acked).await;
    let c = env.cloud.wait_for(Duration::from_secs(10), |c| c.device_batches("dev-0001") == 1).await;
    assert_eq!(c.device_batches("dev-0001"), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.cloud.snapshot().device_batches("dev-0001"), 1, "the refused batches never arrived");
    gw.terminate().await;
}

/// A connected unit costs the gateway one file descriptor (its socket): the
/// front serves sessions itself, with no loopback pair into a broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connected_unit_costs_one_file_descriptor() {
    let units = if full_size() { 1_000 } else { 200 };
    let env = Env::new(units).await;
    let port = free_port();
    let gw = Gateway::start(&env.config(0, port, "")).await;
    let pid = gw.child.id().unwrap();
    let before = open_fds(pid);
    let mut fleet = Fleet::start(units, port, Duration::from_millis(200), OutboxFull::Block);
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = gw.status().await;
        let acked_everyone = fleet.clients.iter().all(|c| c.stats().core.batches_acked > 0);
        if s["sessions"] == units && acked_everyone {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let during = open_fds(pid);
    let per_unit = (during - before) as f64 / units as f64;
    eprintln!("{units} units: {before} descriptors before, {during} with them: {per_unit:.3} per unit");
    assert!(per_unit <= 1.05, "{per_unit:.3} descriptors per unit");
    assert_eq!(s["front"]["deliveries_dropped"], 0, "{s}");
    fleet.stop().await;
    drop(fleet);
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds(pid) > before + 2 {
        assert!(Instant::now() < deadline, "descriptors released when units leave: {}", open_fds(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// The connect storm: every unit connected, the gateway killed and started again;
/// all of them are back within 60 s, none refused for reconnecting too fast or a
/// take-over that did not finish, and every acked batch reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_unit_is_back_soon_after_a_gateway_restart() {
    let units = if full_size() { 2_000 } else { 300 };
    let env = Env::new(units).await;
    let port = free_port();
    let cfg = env.config(0, port, "");
    let gw = Gateway::start(&cfg).await;
    let mut fleet = Fleet::start(units, port, Duration::from_millis(500), OutboxFull::Block);
    let all_connected = |s: &Value| s["sessions"] == units;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !all_connected(&gw.status().await) {
        assert!(Instant::now() < deadline, "first connect wave: {}", gw.status().await["sessions"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    gw.kill9().await;
    let mut acked = fleet.acked();
    let gw = Gateway::start(&cfg).await;
    let restarted = Instant::now();
    let s = loop {
        let s = gw.status().await;
        if all_connected(&s) {
            break s;
        }
        assert!(restarted.elapsed() < Duration::from_secs(60), "not every unit back in 60 s: {}", s["sessions"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let back = restarted.elapsed();
    eprintln!("{units} units back {back:?} after the restart; logins refused: {}", s["logins_rejected"]);
    for why in ["reconnect_rate", "takeover_stuck", "server_busy", "accept_failed"] {
        assert!(s["logins_rejected"][why].is_null(), "{why}: {s}");
    }
    fleet.stop().await;
    acked.extend(fleet.drain(Duration::from_secs(60)).await);
    assert_delivered(&env.cloud, &acked).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
}
