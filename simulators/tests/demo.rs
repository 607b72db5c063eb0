//! The demo as users run it: the binary, a CI-sized fleet, the report's verdict,
//! and the dataset read back by DuckDB.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("FLEETLINE_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(venv.exists(), "no Python with duckdb: run scripts/test.sh once, or set FLEETLINE_PYTHON");
    venv
}

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
    let expected: u64 = r["events"].as_object().unwrap().values().map(|e| e["expected"].as_u64().unwrap()).sum();
    assert_eq!(truth.as_array().unwrap().len() as u64, expected);
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
