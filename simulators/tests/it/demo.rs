//! The demo as users run it: the binary, a CI-sized fleet, the report's verdict,
//! and the dataset read back by DuckDB.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::path::Path;
use std::process::Command;

use fleetline_testkit::python;
use serde_json::Value;

fn demo(args: &[&str]) -> (Value, tempfile::TempDir) {
    let dir = tempfile::Builder::new().prefix("fleetline-sim-test-").tempdir().unwrap();
    let report = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetline-sim"))
        .arg("demo")
        .args(args)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--report-json")
        .arg(&report)
        .arg("--report-html")
        .arg(&html)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo failed ({:?}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), v, "stdout carries the same report");
    (v, dir)
}

#[test]
fn a_ci_sized_demo_loses_nothing_and_duplicates_nothing() {
    let (r, _dir) = demo(&["--vehicles", "100", "--duration", "15s", "--seed", "3"]);
    eprintln!("demo report: {r}");
    assert_eq!(r["vehicles"], 100);
    let sent = r["samples_sent"].as_u64().unwrap();
    assert!(sent > 100 * 15 * 3, "about five readings per vehicle-second: {sent}");
    assert_eq!(r["samples_acked"], r["samples_sent"], "every reading acked after the drain");
    assert_eq!(r["samples_stored"], r["samples_acked"]);
    assert_eq!(r["samples_lost"], 0);
    assert_eq!(r["samples_duplicated"], 0);
    assert!(r["e2e_latency_ms"]["p50"].as_i64().unwrap() > 0);
    // The glob in the report is what DuckDB reads, and it agrees.
    let glob = r["readings_parquet_glob"].as_str().unwrap();
    let out = Command::new(python())
        .arg("-c")
        .arg("import duckdb, sys; print(duckdb.connect().execute(f\"SELECT count(DISTINCT (device_id, epoch, seq, signal, ts)) FROM read_parquet('{sys.argv[1]}', hive_partitioning = true)\").fetchone()[0])")
        .arg(glob)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r["samples_stored"].to_string());
}

#[test]
fn simulated_time_runs_faster_and_ground_truth_is_written() {
    let (r, dir) = demo(&["--vehicles", "40", "--duration", "8s", "--time-scale", "60", "--seed", "9"]);
    assert_eq!(r["samples_lost"], 0);
    assert_eq!(r["samples_duplicated"], 0);
    // Eight minutes of driving in eight seconds: sixty times the readings of real time.
    assert!(r["samples_stored"].as_u64().unwrap() > 40 * 8 * 60 * 3, "{r}");
    let truth: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("data/ground-truth.json")).unwrap()).unwrap();
    // Every incident is listed: scored (`expected`) or, started too late in the run
    // to be seen, counted apart (`unmatured`) and marked so in the ground truth.
    let events = r["events"].as_object().unwrap();
    let expected: u64 = events.values().map(|e| e["expected"].as_u64().unwrap()).sum();
    let unmatured: u64 = events.values().map(|e| e["unmatured"].as_u64().unwrap()).sum();
    assert_eq!(truth.as_array().unwrap().len() as u64, expected + unmatured);
    let late = truth.as_array().unwrap().iter().filter(|i| i["matures"] == false).count() as u64;
    assert_eq!(late, unmatured);
    // The cloud's events are read back and scored: every kind has a detected count,
    // and whatever was detected was real (the model's incidents are unambiguous).
    for (kind, e) in r["events"].as_object().unwrap() {
        assert!(e["detected"].is_u64(), "{kind}: {e}");
        if let Some(p) = e["precision"].as_f64() {
            assert!(p >= 0.99, "{kind}: {e}");
        }
    }
    let detected: u64 = r["events"].as_object().unwrap().values().map(|e| e["detected"].as_u64().unwrap()).sum();
    assert!(detected > 0, "{r}");
}

#[test]
fn a_ci_sized_chaos_demo_loses_nothing_and_duplicates_nothing() {
    let (r, dir) = demo(&[
        "--vehicles",
        "50",
        "--duration",
        "20s",
        "--seed",
        "4",
        "--chaos",
        "kill-gateway@4s,uplink-outage@7s+3s,kill-cloud@12s,stop-gateway@15s+2s",
    ]);
    eprintln!("chaos demo report: {r}");
    assert_eq!(r["samples_lost"], 0);
    assert_eq!(r["samples_duplicated"], 0);
    assert_eq!(r["samples_stored"], r["samples_acked"]);
    assert_eq!(r["samples_acked"], r["samples_sent"]);
    let chaos: Vec<&str> = r["chaos"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(chaos.len(), 4, "{chaos:?}");
    assert!(chaos.iter().all(|c| !c.contains("FAILED")), "{chaos:?}");
    assert!(chaos[3].contains("exit Some(0)"), "a stopped gateway exits cleanly: {chaos:?}");
    // The processes really ran apart from the simulator, and logged.
    assert!(dir.path().join("data/gw-1.log").exists() && dir.path().join("data/cloud.log").exists());
    // The HTML report: self-contained (no scripts, no external references), four charts, the verdict.
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 4);
    assert!(html.contains("nothing lost, nothing duplicated"));
    assert!(html.contains("kill-cloud@12s"));
    assert!(
        !html.contains("<script") && !html.contains("http://")
            || html.matches("http://").count() == html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
    );
}

/// Three cloud nodes sharing a Mosquitto, under a kill, a freeze past the probe
/// timeout (the node wakes as a zombie), an added node and a drain.
#[test]
fn a_ci_sized_cluster_demo_loses_nothing_through_node_chaos() {
    let (r, dir) = demo(&[
        "--vehicles",
        "40",
        "--duration",
        "32s",
        "--seed",
        "6",
        "--cloud-nodes",
        "3",
        "--chaos",
        "kill-node@4s:0,freeze-node@11s:1+6s,add-node@20s,drain-node@25s:2",
    ]);
    eprintln!("cluster demo report: {}", r["cluster"]);
    assert_eq!(r["samples_lost"], 0);
    assert_eq!(r["samples_duplicated"], 0);
    assert_eq!(r["samples_stored"], r["samples_acked"]);
    assert_eq!(r["samples_acked"], r["samples_sent"]);
    let c = &r["cluster"];
    assert_eq!(c["nodes"], 3);
    assert_eq!(c["generation_violations"], serde_json::json!([]), "{c}");
    assert!(c["generations_checked"].as_u64().unwrap() > 0 && c["claims_checked"].as_u64().unwrap() > 3, "{c}");
    let changes = c["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 4, "{c}");
    assert!(changes.iter().all(|x| x["owned_again_ms"].is_u64()), "every change recovered: {c}");
    // The kill and the freeze took shards away from their owner; the others took them.
    assert!(changes[0]["shards_moved"].as_u64().unwrap() > 0 && changes[1]["shards_moved"].as_u64().unwrap() > 0);
    assert!(c["shard_moves"].as_u64().unwrap() >= 4, "{c}");
    let chaos: Vec<&str> = r["chaos"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(chaos[3].contains("exit Some(0)"), "a drained node exits cleanly: {chaos:?}");
    for i in 0..4 {
        assert!(dir.path().join(format!("data/cloud-{i}.log")).exists());
    }
}

/// The autoscaler grows the cluster for the surge profile's reserve vehicles and
/// shrinks it again (each scale-in a drain), and nothing is lost or duplicated.
#[test]
fn a_ci_sized_autoscaled_surge_grows_and_shrinks_the_cluster_and_loses_nothing() {
    let (r, _dir) = demo(&[
        "--vehicles",
        "40",
        "--duration",
        "45s",
        "--seed",
        "8",
        "--profile",
        "surge",
        "--autoscale",
        "--min-nodes",
        "1",
        "--max-nodes",
        "3",
        // About 1 300 records/s before the surge and 1 900 during it (the reserve
        // third drives from 40 % to 70 % of the run).
        "--target-rate",
        "1600",
        "--scale-down-stabilization",
        "5s",
        "--scale-down-every",
        "5s",
    ]);
    let a = &r["autoscale"];
    eprintln!("autoscale: {}", a["steps"]);
    assert_eq!(r["samples_lost"], 0);
    assert_eq!(r["samples_duplicated"], 0);
    assert_eq!(r["samples_stored"], r["samples_acked"]);
    assert_eq!(r["samples_acked"], r["samples_sent"]);
    let counts: Vec<u64> = a["node_counts"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    assert_eq!(counts.first(), Some(&1), "{a}");
    assert!(a["peak_nodes"].as_u64().unwrap() >= 2, "the surge added a node: {}", a["steps"]);
    assert_eq!(counts.last(), Some(&1), "and the cluster shrank back after it: {}", a["steps"]);
    let timeline = a["timeline"].as_array().unwrap();
    assert!(timeline.len() > 30, "one reading a second");
    let peak_rate = timeline.iter().map(|p| p["rate"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(peak_rate > 1600.0, "the surge shows in the rate: {peak_rate}");
    let c = &r["cluster"];
    assert_eq!(c["generation_violations"], serde_json::json!([]), "{c}");
    let changes = c["changes"].as_array().unwrap();
    assert!(changes.len() >= 2, "{c}");
    assert!(changes.iter().all(|x| x["owned_again_ms"].is_u64()), "every scale step left every shard owned: {c}");
}

/// A child process of the simulator's binary that prints one JSON line on start.
struct Child(std::process::Child, Value);

impl Child {
    fn start(args: &[&str], log: &Path) -> Self {
        use std::io::BufRead;
        let mut c = Command::new(env!("CARGO_BIN_EXE_fleetline-sim"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}; see {}", log.display()));
        Self(c, v)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_fleet_command_drives_a_real_gateway_with_a_provisioned_fleet() {
    let dir = tempfile::Builder::new().prefix("fleetline-sim-fleet-").tempdir().unwrap();
    let d = dir.path();
    let prov = d.join("provisioning.toml");
    let provision = |args: &[&str], out: &std::path::Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_fleetline-sim")).args(args).arg("--out").arg(out).output().unwrap();
        assert!(o.status.success());
        (std::fs::read_to_string(out).unwrap(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // Random keys unless asked; derived ones repeat and say so loudly.
    let (a, quiet) = provision(&["provision", "--vehicles", "30"], &prov);
    let (b, _) = provision(&["provision", "--vehicles", "30"], &d.join("other.toml"));
    assert!(a != b && quiet.is_empty(), "random keys differ per run");
    let (c, warning) = provision(&["provision", "--vehicles", "3", "--insecure-seed", "5"], &d.join("s1.toml"));
    let (e, _) = provision(&["provision", "--vehicles", "3", "--insecure-seed", "5"], &d.join("s2.toml"));
    assert!(c == e && warning.contains("WARNING"), "{warning}");
    std::fs::write(
        d.join("cloud.toml"),
        format!(
            "shard_count = 4\nprovisioning = \"{}\"\n[broker]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"{}\"\n[segment]\nmax_age = \"500ms\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
            prov.display(),
            d.join("lake").display()
        ),
    )
    .unwrap();
    let cloud = Child::start(&["__cloud", "--config", d.join("cloud.toml").to_str().unwrap()], &d.join("cloud.log"));
    let broker: std::net::SocketAddr = cloud.1["broker"].as_str().unwrap().parse().unwrap();
    std::fs::write(
        d.join("gw.toml"),
        format!(
            "id = \"gw-1\"\ndata_dir = \"{}\"\nprovisioning = \"{}\"\nshard_count = 4\n[devices]\nlisten = \"127.0.0.1:0\"\n[uplink]\nport = {}\n[http]\nlisten = \"127.0.0.1:0\"\n",
            d.join("gw").display(),
            prov.display(),
            broker.port()
        ),
    )
    .unwrap();
    let gw = Child::start(&["__gateway", "--config", d.join("gw.toml").to_str().unwrap()], &d.join("gw.log"));
    let out = Command::new(env!("CARGO_BIN_EXE_fleetline-sim"))
        .args(["fleet", "--gateway", gw.1["devices"].as_str().unwrap(), "--provisioning"])
        .arg(&prov)
        .args(["--vehicles", "30", "--duration", "6s", "--time-scale", "30", "--profile", "surge"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("fleet report: {r}");
    assert!(r["samples_sent"].as_u64().unwrap() > 1000);
    assert_eq!(r["samples_acked"], r["samples_sent"]);
    assert_eq!(r["connects"], 30);
    drop(gw);
    drop(cloud);
}
