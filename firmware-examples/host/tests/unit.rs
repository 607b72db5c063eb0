//! The unit firmware on a host against the real gateway and cloud: its
//! readings reach `readings` exactly once across a gateway kill and a unit
//! power cut, and a wedged loop is reset by the watchdog.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetline_testkit::provisioning::{device_key, fleet};
use fleetline_testkit::{free_port, python};
use serde_json::Value;

fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_fleetline-unit-host")).with_file_name(name);
    assert!(p.exists(), "{} missing: build the workspace's binaries (cargo test --workspace does)", p.display());
    p
}

/// A child process whose stdout JSON lines are collected.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Proc {
    fn start(cmd: &mut Command, log: &Path) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = cmd
            .env("RUST_LOG", "info,rumqttd=error,rumqttc=error")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for the first line matching `pred`.
    fn wait_line(&mut self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.lines.lock().unwrap().iter().find(|v| pred(v)) {
                return v.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("process exited ({status}) waiting for {what}");
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Value {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

struct Env {
    dir: tempfile::TempDir,
    lake: PathBuf,
    gw_port: u16,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("fleetline-unit-test-").tempdir().unwrap();
        let prov = dir.path().join("provisioning.toml");
        fleet(1, 1).save(&prov).unwrap();
        let key: String = device_key(0).as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.path().join("dev-0000.key"), key).unwrap();
        let lake = dir.path().join("lake");
        let broker_port = free_port();
        std::fs::write(
            dir.path().join("cloud.toml"),
            format!(
                "node_id = \"cloud-1\"\nshard_count = 4\nprovisioning = \"{}\"\n[broker]\nlisten = \"127.0.0.1:{broker_port}\"\n[storage]\nurl = \"{}\"\n[segment]\nmax_age = \"300ms\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
                prov.display(),
                lake.display()
            ),
        )
        .unwrap();
        let gw_port = free_port();
        std::fs::write(
            dir.path().join("gw-0.toml"),
            format!(
                "id = \"gw-0\"\ndata_dir = \"{}\"\nprovisioning = \"{}\"\nshard_count = 4\n[devices]\nlisten = \"127.0.0.1:{gw_port}\"\n[queue]\ncommit_interval = \"2ms\"\n[uplink]\nhost = \"127.0.0.1\"\nport = {broker_port}\nbundle_max_age = \"20ms\"\nresend_after = \"2s\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"300ms\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
                dir.path().join("gw-0-data").display(),
                prov.display()
            ),
        )
        .unwrap();
        Self { dir, lake, gw_port }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cloud(&self) -> Proc {
        let mut p = Proc::start(
            Command::new(bin("fleetline-cloud")).arg("--config").arg(self.path("cloud.toml")),
            &self.path("cloud.log"),
        );
        p.wait_line(Duration::from_secs(60), "the cloud listening", |v| v.get("http").is_some());
        p
    }

    fn gateway(&self) -> Proc {
        let mut p = Proc::start(
            Command::new(bin("fleetline-gateway")).arg("--config").arg(self.path("gw-0.toml")),
            &self.path("gw-0.log"),
        );
        p.wait_line(Duration::from_secs(60), "the gateway listening", |v| v.get("http").is_some());
        p
    }

    fn unit(&self, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetline-unit-host"));
        cmd.args(["--gateway", &format!("127.0.0.1:{}", self.gw_port), "--fleet", "acme", "--device", "dev-0000"])
            .arg("--key-file")
            .arg(self.path("dev-0000.key"))
            .arg("--flash")
            .arg(self.path("dev-0000.flash"))
            .args(["--max-age-ms", "500", "--resend-after-ms", "1500", "--tpms-every-ms", "1000"])
            .args(["--fuel-every-ms", "1000", "--garble-every", "7"])
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::start(&mut cmd, &self.path("unit.log"))
    }

    /// Acked batches the unit reported: (epoch, seq) → samples.
    fn acked(unit: &Proc, into: &mut BTreeMap<(u32, u32), u64>) {
        for v in unit.lines().iter().filter(|v| v["event"] == "acked") {
            let key = (v["epoch"].as_u64().unwrap() as u32, v["seq"].as_u64().unwrap() as u32);
            let prev = into.insert(key, v["samples"].as_u64().unwrap());
            assert!(prev.is_none(), "batch {key:?} released twice");
        }
    }

    fn wait_acks(unit: &mut Proc, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while unit.lines().iter().filter(|v| v["event"] == "acked").count() < n {
            assert!(Instant::now() < deadline, "the unit saw fewer than {n} acks");
            assert!(unit.child.try_wait().unwrap().is_none(), "the unit exited");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in ["cloud.log", "gw-0.log", "unit.log"] {
                let text = std::fs::read_to_string(self.path(name)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {name} (last lines)");
                for l in &lines[lines.len().saturating_sub(20)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn query(lake: &Path) -> Value {
    let code = r#"
import duckdb, json, sys
glob = sys.argv[1] + "/readings/**/*.parquet"
con = duckdb.connect()
rows = con.execute(f"SELECT epoch, seq, count(*) FROM read_parquet('{glob}', hive_partitioning = true) WHERE device_id = 'dev-0000' GROUP BY ALL").fetchall()
dups = con.execute(f"SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM read_parquet('{glob}') GROUP BY device_id, epoch, seq, signal, ts)").fetchone()[0]
sig = con.execute(f"SELECT signal, count(*), min(value), max(value) FROM read_parquet('{glob}') GROUP BY signal ORDER BY signal").fetchall()
print(json.dumps({"rows": rows, "dups": int(dups), "signals": sig}))
"#;
    let out = Command::new(python()).arg("-c").arg(code).arg(lake).output().unwrap();
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_units_readings_are_stored_once_across_a_gateway_kill_and_a_power_cut() {
    // CI: one gateway kill and one power cut; scripts/soak.sh: four of each.
    let rounds = if std::env::var("FLEETLINE_SIZE").is_ok_and(|s| s == "full") { 4 } else { 1 };
    let env = Env::new();
    let cloud = env.cloud();
    let mut gw = env.gateway();
    let mut unit = env.unit(&[], &[]);
    let booted = unit.wait_line(Duration::from_secs(10), "boot", |v| v["event"] == "booted");
    let mut epochs = vec![booted["epoch"].as_u64().unwrap() as u32];
    let mut acked = BTreeMap::new();
    for _ in 0..rounds {
        Env::wait_acks(&mut unit, 3);
        // The gateway dies under the unit; the unit keeps sealing and redials.
        gw.kill9();
        std::thread::sleep(Duration::from_millis(1500));
        gw = env.gateway();
        let before = unit.lines().iter().filter(|v| v["event"] == "acked").count();
        Env::wait_acks(&mut unit, before + 3);
        let lines = unit.lines();
        assert!(lines.iter().any(|v| v["event"] == "disconnected"), "the unit saw the gateway go");
        assert!(lines.iter().filter(|v| v["event"] == "connected").count() >= 2, "and reconnected");

        // Power cut: the unit's RAM (open batch, outbox) is gone; its flash is not.
        unit.kill9();
        Env::acked(&unit, &mut acked);
        unit = env.unit(&[], &[]);
        let booted = unit.wait_line(Duration::from_secs(10), "boot", |v| v["event"] == "booted");
        let epoch = booted["epoch"].as_u64().unwrap() as u32;
        assert!(epoch > *epochs.last().unwrap(), "a larger epoch after the power cut: {epochs:?} then {epoch}");
        epochs.push(epoch);
    }
    Env::wait_acks(&mut unit, 3);
    unit.kill9();
    Env::acked(&unit, &mut acked);

    // The gateway hands everything to the cloud; the cloud commits it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let gw_http: SocketAddr = gw.lines()[0]["http"].as_str().unwrap().parse().unwrap();
    while http_get(gw_http, "/status")["queue"]["records"].as_u64() != Some(0) {
        assert!(Instant::now() < deadline, "the gateway's queue drained");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut stored = Value::Null;
    while Instant::now() < deadline {
        stored = query(&env.lake);
        let keys: Vec<(u32, u32)> = stored["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32))
            .collect();
        if acked.keys().all(|k| keys.contains(k)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let rows: BTreeMap<(u32, u32), u64> = stored["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ((r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32), r[2].as_u64().unwrap()))
        .collect();
    for (key, samples) in &acked {
        assert_eq!(rows.get(key), Some(samples), "acked batch {key:?}: its readings, once");
    }
    assert_eq!(stored["dups"].as_u64(), Some(0), "no reading twice");
    for e in &epochs {
        assert!(acked.keys().any(|k| k.0 == *e), "batches of epoch {e} acked");
    }
    // Batches stored but never acked to the unit: durable at the gateway when
    // the unit lost power before the ack arrived (a batch the gateway took
    // before it died is sent again and acked after the redial). Never more
    // than the outbox held at a power cut.
    let unacked: Vec<_> = rows.keys().filter(|k| !acked.contains_key(k)).collect();
    assert!(unacked.len() <= (rounds + 1) * 8, "{} stored batches the unit never saw acked", unacked.len());
    // What the sensors gave, through their drivers: positions on the road,
    // four tires at 850..880 kPa, the tank within its calibration.
    let signals: BTreeMap<String, (u64, f64, f64)> = stored["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s[0].as_str().unwrap().to_string(),
                (s[1].as_u64().unwrap(), s[2].as_f64().unwrap(), s[3].as_f64().unwrap()),
            )
        })
        .collect();
    let lat = signals["Vehicle.CurrentLocation.Latitude"];
    assert!(lat.1 > 52.0 && lat.2 < 53.0, "{lat:?}");
    let p = signals["Vehicle.Chassis.Axle.Row1.Wheel.Left.Tire.Pressure"];
    assert!(p.1 >= 850.0 && p.2 < 880.0, "{p:?}");
    let fuel = signals["Vehicle.Powertrain.FuelSystem.AbsoluteLevel"];
    assert!(fuel.1 >= 0.0 && fuel.2 <= 400.0, "{fuel:?}");
    assert!(signals.keys().filter(|k| k.contains("Tire.Pressure")).count() == 4, "{:?}", signals.keys());
    eprintln!(
        "unit through gateway kill and power cut: epochs {epochs:?}, {} batches acked to the unit, {} stored ({} never acked to it), {} readings, 0 duplicates",
        acked.len(),
        rows.len(),
        unacked.len(),
        rows.values().sum::<u64>()
    );
    drop(cloud);
}

#[test]
fn a_wedged_loop_is_reset_by_the_watchdog_into_the_next_epoch() {
    let env = Env::new();
    // No gateway: the unit dials and backs off; the loop still turns until it hangs.
    let mut unit = env.unit(&["--watchdog-ms", "600"], &[("FLEETLINE_UNIT_FAULT", "hang-after-ms=800")]);
    let first = unit.wait_line(Duration::from_secs(10), "boot", |v| v["event"] == "booted");
    unit.wait_line(Duration::from_secs(10), "the hang", |v| v["event"] == "hang");
    let reset = unit.wait_line(Duration::from_secs(10), "the reset", |v| v["event"] == "watchdog_reset");
    assert!(reset["unfed_ms"].as_u64().unwrap() >= 600, "{reset}");
    let status = unit.child.wait().unwrap();
    assert!(!status.success(), "the watchdog ended the process: {status}");
    let mut again = env.unit(&[], &[]);
    let second = again.wait_line(Duration::from_secs(10), "boot", |v| v["event"] == "booted");
    assert!(second["epoch"].as_u64() > first["epoch"].as_u64(), "{first} then {second}");
    // While the loop turns, the watchdog is fed: three seconds without a reset.
    std::thread::sleep(Duration::from_secs(3));
    assert!(again.child.try_wait().unwrap().is_none(), "a healthy loop is not reset");
    assert!(!again.lines().iter().any(|v| v["event"] == "watchdog_reset"));
}

/// A control nonce: the control domain's first byte, then `n`.
fn nonce(n: u64) -> [u8; 12] {
    let mut x = [0u8; 12];
    x[0] = 0x02;
    x[4..].copy_from_slice(&n.to_le_bytes());
    x
}

fn stats_where(unit: &mut Proc, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    unit.wait_line(Duration::from_secs(10), what, |v| v["event"] == "stats" && pred(v))
}

/// The unit's MQTT 3.1.1 client against another broker (Mosquitto), with the
/// test in the gateway's place: it opens the unit's batches, acks them,
/// replays the ack, sends a command, cuts the power, replays the command, and
/// sends garbage and an oversized message on the unit's topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_to_mosquitto_and_refuses_replays_across_a_power_cut() {
    use fleetline_device::wire::control::{AckRange, Command as UnitCommand, seal_ack, seal_command};
    use fleetline_device::wire::open_batch;
    use fleetline_testkit::{Mosquitto, Sub, publish};

    let env = Env::new();
    let broker = Mosquitto::start().await;
    let prefix = "fleetline/v1/acme/dev-0000";
    let mut up = Sub::start(broker.port, &format!("{prefix}/up")).await;
    let unit_on = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetline-unit-host"));
        cmd.args(["--gateway", &format!("127.0.0.1:{}", broker.port), "--fleet", "acme", "--device", "dev-0000"])
            .arg("--key-file")
            .arg(env.path("dev-0000.key"))
            .arg("--flash")
            .arg(env.path("dev-0000.flash"))
            .args(["--max-age-ms", "300", "--resend-after-ms", "60000"])
            .args(extra);
        Proc::start(&mut cmd, &env.path("unit.log"))
    };
    let mut unit = unit_on(&[]);
    unit.wait_line(Duration::from_secs(10), "connected", |v| v["event"] == "connected");
    let key = device_key(0);
    let (_, mut batch) = up.next().await;
    let opened = open_batch(&mut batch, &key).expect("the unit's batch opens with its key");
    let (epoch, seq) = (opened.header.epoch, opened.header.seq);

    let mut ack = [0u8; 256];
    let n = seal_ack(&mut ack, &key, "gw-0", 1, nonce(1), &[AckRange { epoch, first: seq, count: 1 }]).unwrap();
    assert!(publish(broker.port, &format!("{prefix}/ack"), &ack[..n], &[]).await);
    let acked = unit.wait_line(Duration::from_secs(10), "the ack", |v| v["event"] == "acked");
    assert_eq!((acked["epoch"].as_u64(), acked["seq"].as_u64()), (Some(u64::from(epoch)), Some(u64::from(seq))));
    // The same ack again: refused by its counter.
    assert!(publish(broker.port, &format!("{prefix}/ack"), &ack[..n], &[]).await);
    stats_where(&mut unit, "the replayed ack counted", |v| v["acks_replayed"] == 1);

    // A command; its counter reaches flash.
    let mut cmd = [0u8; 256];
    let n = seal_command(&mut cmd, &key, "cloud", 7, nonce(2), &UnitCommand::SetResendAfter { ms: 9_000 }).unwrap();
    let command = cmd[..n].to_vec();
    assert!(publish(broker.port, &format!("{prefix}/cmd"), &command, &[]).await);
    unit.wait_line(Duration::from_secs(10), "the command", |v| v["event"] == "command" && v["counter"] == 7);

    // Garbage and a message larger than the unit's receive buffer on its ack topic.
    assert!(publish(broker.port, &format!("{prefix}/ack"), b"not a sealed ack", &[]).await);
    assert!(publish(broker.port, &format!("{prefix}/ack"), &vec![0x5a; 20_000], &[]).await);
    let s = stats_where(&mut unit, "garbage and the oversized message counted", |v| {
        v["acks_invalid"] == 1 && v["rx_oversized"] == 1
    });
    assert_eq!(s["connected"], true, "still connected: {s}");
    assert_eq!(s["protocol_errors"], 0, "{s}");

    // Power cut; the counter comes back from flash, so the replayed command is refused.
    unit.kill9();
    let mut unit = unit_on(&[]);
    let booted = unit.wait_line(Duration::from_secs(10), "boot", |v| v["event"] == "booted");
    assert_eq!(booted["last_command_counter"], 7, "{booted}");
    assert!(booted["epoch"].as_u64() > Some(u64::from(epoch)), "{booted}");
    unit.wait_line(Duration::from_secs(10), "connected", |v| v["event"] == "connected");
    assert!(publish(broker.port, &format!("{prefix}/cmd"), &command, &[]).await);
    stats_where(&mut unit, "the replayed command counted", |v| v["commands_replayed"] == 1);
    assert!(!unit.lines().iter().any(|v| v["event"] == "command"), "a replayed command is not applied");
    drop(broker);
}
