//! A cluster of real cloud processes (static membership, HTTP probes) sharing a
//! real Mosquitto, under load from a gateway: a node killed, a node frozen past
//! its probe timeout and woken (a zombie that still believes it owns shards), a
//! node added and a node drained. Every acked reading is in `readings` exactly
//! once, the generation check finds one writer per generation, and every shard
//! is owned by a live node again after each change.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fleetline_cloud::lake::store::{StorageConfig, Store, StoreSpec};
use fleetline_cloud::shard::read_head;
use fleetline_device::OutboxFull;
use fleetline_testkit::fleet::{Fleet, http_get};
use fleetline_testkit::provisioning::fleet;
use fleetline_testkit::{Mosquitto, free_port};
use serde_json::Value;
use tokio::process::Command;

use crate::e2e::{Proc, assert_exactly_once, duckdb_readings, gateway_binary};

const SHARDS: u16 = 16;

struct Cluster {
    dir: tempfile::TempDir,
    lake: PathBuf,
    ports: Vec<u16>,
    broker: u16,
    prov: PathBuf,
}

impl Cluster {
    fn config(&self, i: usize) -> PathBuf {
        let peers: Vec<String> =
            self.ports.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| format!("\"127.0.0.1:{p}\"")).collect();
        let path = self.dir.path().join(format!("cloud-{i}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"node_id = "cloud-{i}"
shard_count = {SHARDS}
provisioning = "{prov}"
[broker]
url = "mqtt://127.0.0.1:{broker}"
[storage]
url = "{lake}"
[segment]
max_age = "300ms"
[http]
listen = "127.0.0.1:{port}"
[cluster]
mode = "static"
peers = [{peers}]
stable_margin = "1s"
probe_interval = "250ms"
down_after = "1500ms"
round_interval = "250ms"
handover_timeout = "4s"
max_moves_per_round = 4
"#,
                prov = self.prov.display(),
                broker = self.broker,
                lake = self.lake.display(),
                port = self.ports[i],
                peers = peers.join(", "),
            ),
        )
        .unwrap();
        path
    }

    async fn node(&self, i: usize) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetline-cloud"));
        cmd.arg("--config").arg(self.config(i));
        Proc::start(cmd, &self.dir.path().join(format!("cloud-{i}.log"))).await
    }

    fn store(&self) -> Store {
        let cfg = StorageConfig { url: self.lake.display().to_string(), ..Default::default() };
        StoreSpec::parse(&cfg).unwrap().open(&cfg).unwrap()
    }

    /// Waits until every shard's head names one of `live` (the checks of `/cluster/shards`
    /// read the same heads); returns how long it took.
    async fn all_owned_by(&self, live: &[&str], timeout: Duration) -> Duration {
        let store = self.store();
        let started = Instant::now();
        loop {
            let mut owners = BTreeMap::new();
            for s in 0..SHARDS {
                let owner = read_head(&store, s, SHARDS).await.ok().and_then(|(h, _)| h.owner);
                owners.insert(s, owner);
            }
            if owners.values().all(|o| o.as_deref().is_some_and(|o| live.contains(&o))) {
                return started.elapsed();
            }
            assert!(started.elapsed() < timeout, "shards not all owned by {live:?} in time: {owners:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = tempfile::Builder::new().prefix("fleetline-cluster-failed-").tempdir().unwrap().keep();
            let _ = std::process::Command::new("cp").arg("-r").arg(self.dir.path()).arg(&kept).status();
            eprintln!("--- logs and lake kept in {}", kept.display());
            for name in ["cloud-0.log", "cloud-1.log", "cloud-2.log", "cloud-3.log", "gw-0.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {name} (last lines)");
                for l in &lines[lines.len().saturating_sub(25)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn signal(p: &Proc, sig: &str) {
    let pid = p.child.id().unwrap();
    let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(ok.success());
}

async fn json(addr: std::net::SocketAddr, path: &str) -> Value {
    serde_json::from_str(&http_get(addr, path).await).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_loses_nothing_through_a_kill_a_freeze_an_add_and_a_drain() {
    let devices = 6;
    let mosquitto = Mosquitto::start().await;
    let dir = tempfile::Builder::new().prefix("fleetline-cluster-test-").tempdir().unwrap();
    let prov = dir.path().join("provisioning.toml");
    fleet(devices, 1).save(&prov).unwrap();
    let c = Cluster {
        lake: dir.path().join("lake"),
        ports: (0..4).map(|_| free_port()).collect(),
        broker: mosquitto.port,
        prov: prov.clone(),
        dir,
    };
    let mut nodes: Vec<Option<Proc>> = Vec::new();
    for i in 0..3 {
        nodes.push(Some(c.node(i).await));
    }
    let took = c.all_owned_by(&["cloud-0", "cloud-1", "cloud-2"], Duration::from_secs(30)).await;
    eprintln!("three nodes own every shard {took:?} after start");
    // Spread over the three (rendezvous placement of 16 shards).
    let shards = json(nodes[0].as_ref().unwrap().addr("http"), "/cluster/shards").await;
    let owners: std::collections::BTreeSet<&str> =
        shards["shards"].as_array().unwrap().iter().filter_map(|s| s["owner"].as_str()).collect();
    assert_eq!(owners.len(), 3, "{shards}");
    let members = json(nodes[1].as_ref().unwrap().addr("http"), "/cluster/members").await;
    assert_eq!(members["members"]["members"].as_array().map(Vec::len), Some(3), "{members}");

    let gw_cfg = c.dir.path().join("gw-0.toml");
    std::fs::write(
        &gw_cfg,
        format!(
            "id = \"gw-0\"\ndata_dir = \"{}\"\nprovisioning = \"{}\"\nshard_count = {SHARDS}\n[devices]\nlisten = \"127.0.0.1:0\"\n[queue]\ncommit_interval = \"2ms\"\n[uplink]\nhost = \"127.0.0.1\"\nport = {}\nbundle_max_age = \"20ms\"\nresend_after = \"2s\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"300ms\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
            c.dir.path().join("gw-0-data").display(),
            prov.display(),
            mosquitto.port
        ),
    )
    .unwrap();
    let mut cmd = Command::new(gateway_binary());
    cmd.arg("--config").arg(&gw_cfg);
    let gw = Proc::start(cmd, &c.dir.path().join("gw-0.log")).await;
    let mut fleet = Fleet::start(devices, gw.addr("devices").port(), Duration::from_millis(20), OutboxFull::Block);
    let mut acked = BTreeMap::new();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. Kill cloud-0: its shards go to the others once it is missed.
    nodes[0].take().unwrap().kill9().await;
    let took = c.all_owned_by(&["cloud-1", "cloud-2"], Duration::from_secs(30)).await;
    eprintln!("kill: every shard owned again after {took:?}");
    acked.extend(fleet.acked());

    // 2. Freeze cloud-1 past its probe timeout; its shards move to cloud-2; then it
    //    wakes believing it still owns them, and is fenced out.
    signal(nodes[1].as_ref().unwrap(), "STOP");
    let took = c.all_owned_by(&["cloud-2"], Duration::from_secs(30)).await;
    eprintln!("freeze: every shard owned by cloud-2 after {took:?}");
    signal(nodes[1].as_ref().unwrap(), "CONT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let took = c.all_owned_by(&["cloud-1", "cloud-2"], Duration::from_secs(30)).await;
    eprintln!("thaw: every shard owned by a live node after {took:?}");
    acked.extend(fleet.acked());

    // 3. Add cloud-3: it takes its share, a few shards per round.
    nodes.push(Some(c.node(3).await));
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let s = json(nodes[3].as_ref().unwrap().addr("http"), "/cluster/shards").await;
        let mine = s["shards"].as_array().map_or(0, |a| a.iter().filter(|x| x["owner"] == "cloud-3").count());
        if mine > 0 {
            eprintln!("add: cloud-3 owns {mine} shards");
            break;
        }
        assert!(Instant::now() < deadline, "the new node took no shard: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    acked.extend(fleet.acked());

    // 4. Drain cloud-2 (SIGTERM): it hands every shard over and exits 0.
    let status = nodes[2].take().unwrap().terminate().await;
    assert_eq!(status.code(), Some(0));
    let took = c.all_owned_by(&["cloud-1", "cloud-3"], Duration::from_secs(30)).await;
    eprintln!("drain: every shard owned again after {took:?}");

    fleet.stop().await;
    acked.extend(fleet.drain(Duration::from_secs(60)).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = gw.status().await;
        if s["queue"]["records"].as_u64() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster acked everything: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(acked.len() > 50, "load ran: {} batches", acked.len());
    let (rows, dups) = duckdb_readings(&c.lake).await;
    assert_exactly_once(&acked, &rows, dups);
    // Any node answers for any vehicle (the owner answers through it), and a
    // dead-letter replay asked of any node runs once, across the members.
    for n in [1, 3] {
        let http = nodes[n].as_ref().unwrap().addr("http");
        for d in 0..devices {
            let r =
                fleetline_testkit::http::request(http, "GET", &format!("/vehicles/acme/dev-{d:04}"), None, None).await;
            assert_eq!(r.status, 200, "cloud-{n}, device {d}: {r:?}");
        }
        let r = fleetline_testkit::http::request(http, "POST", "/deadletter/replay", None, Some("{}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        let rep: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            (rep["not_owned_here"].as_u64(), rep["errors"].as_array().map(Vec::len)),
            (Some(0), Some(0)),
            "{rep}"
        );
    }
    let report = fleetline_cloud::jobs::generations::check(&c.store(), SHARDS).await.unwrap();
    assert!(report.ok(), "{report:#?}");
    let one = json(nodes[1].as_ref().unwrap().addr("http"), "/status").await;
    eprintln!(
        "cluster: {} batches acked and stored once; {} generations over {} claims checked; cloud-1 fencing refusals {}",
        acked.len(),
        report.generations,
        report.claims,
        one["fencing_refusals"]
    );
    assert_eq!(gw.terminate().await.code(), Some(0));
    for n in nodes.into_iter().flatten() {
        assert_eq!(n.terminate().await.code(), Some(0));
    }
}
