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
    // What an autoscaler reads per pod: this node's share of the backlog.
    let load = json(nodes[2].as_ref().unwrap().addr("http"), "/scaling/load").await;
    let owned = shards["shards"].as_array().unwrap().iter().filter(|s| s["owner"] == "cloud-2").count();
    assert_eq!(load["shards_owned"].as_u64(), Some(owned as u64), "{load}");
    assert!(load["backlog_records"].is_u64() && load["oldest_uncommitted_seconds"].is_f64(), "{load}");
    // What an autoscaler reading one URL sees: every ingest member's load, summed.
    let all = json(nodes[0].as_ref().unwrap().addr("http"), "/scaling/load?scope=cluster").await;
    assert_eq!(all["ingest_members"].as_u64(), Some(3), "{all}");
    assert_eq!(all["nodes"].as_array().map(Vec::len), Some(3), "{all}");
    assert_eq!(all["shards_owned"].as_u64(), Some(SHARDS as u64), "every shard owned once: {all}");
    let per_node: u64 = all["nodes"].as_array().unwrap().iter().map(|n| n["backlog_records"].as_u64().unwrap()).sum();
    assert_eq!(all["backlog_records"].as_u64(), Some(per_node), "{all}");
    assert_eq!(all["unanswered"].as_array().map(Vec::len), Some(0), "{all}");
    let avg: u64 = all["nodes"].as_array().unwrap().iter().map(|n| n["backlog_records_avg"].as_u64().unwrap()).sum();
    assert_eq!(all["backlog_records_avg"].as_u64(), Some(avg), "{all}");
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

/// Leases kept in memory and shared by a test's nodes: what the Kubernetes API
/// does for Leases (holder, transitions, renew time), so the manager's lease path
/// runs without an API server.
#[derive(Default)]
struct LeaseTable(std::sync::Mutex<BTreeMap<u16, Leased>>);

/// A lease: holder, transitions, last renewal.
type Leased = (Option<String>, u64, Instant);

impl LeaseTable {
    fn holders(&self) -> BTreeMap<u16, (Option<String>, u64)> {
        self.0.lock().unwrap().iter().map(|(s, (h, t, _))| (*s, (h.clone(), *t))).collect()
    }

    fn set(&self, shard: u16, holder: Option<&str>) {
        let mut t = self.0.lock().unwrap();
        let e = t.entry(shard).or_insert((None, 0, Instant::now()));
        if holder.is_some() {
            e.1 += 1;
        }
        *e = (holder.map(str::to_string), e.1, Instant::now());
    }
}

struct FakeLeases {
    table: std::sync::Arc<LeaseTable>,
    holder: String,
}

impl fleetline_cloud::cluster::ShardLeases for FakeLeases {
    fn acquire(&self, shard: u16, min_epoch: u64) -> futures::future::BoxFuture<'_, Result<u64, String>> {
        let mut t = self.table.0.lock().unwrap();
        let e = t.entry(shard).or_insert((None, 0, Instant::now()));
        let r = match &e.0 {
            Some(h) if *h == self.holder => {
                e.1 = e.1.max(min_epoch);
                e.2 = Instant::now();
                Ok(e.1)
            }
            // Nobody's leases lapse in this table: a holder holds until it lets go.
            Some(h) => Err(format!("held by {h}")),
            None => {
                *e = (Some(self.holder.clone()), (e.1 + 1).max(min_epoch), Instant::now());
                Ok(e.1)
            }
        };
        Box::pin(async move { r })
    }

    fn renew(&self, shard: u16) -> futures::future::BoxFuture<'_, Result<(), fleetline_cloud::cluster::RenewError>> {
        let t = self.table.0.lock().unwrap();
        let r = match t.get(&shard) {
            Some((Some(h), _, _)) if *h == self.holder => Ok(()),
            other => Err(fleetline_cloud::cluster::RenewError::Lost(format!("{other:?}"))),
        };
        Box::pin(async move { r })
    }

    fn release(&self, shard: u16) -> futures::future::BoxFuture<'_, ()> {
        let mut t = self.table.0.lock().unwrap();
        if let Some(e) = t.get_mut(&shard)
            && e.0.as_deref() == Some(self.holder.as_str())
        {
            e.0 = None;
        }
        Box::pin(async {})
    }
}

/// The manager's lease path, with in-process nodes on a shared Mosquitto: a
/// shard is taken only under its lease, with the lease's epoch in its head; a
/// lease taken away drops the shard at the next renewal and it is not taken back
/// while someone else holds it; a handover and a drain let go of the leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_are_taken_only_under_their_lease_and_dropped_when_it_is_lost() {
    use fleetline_cloud::cluster::{ClusterConfig, Mode};
    use fleetline_cloud::config::CloudConfig;
    use std::sync::Arc;
    const N: u16 = 8;
    let mosquitto = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let prov_path = dir.path().join("provisioning.toml");
    let prov = fleet(2, 1);
    prov.save(&prov_path).unwrap();
    let lake = dir.path().join("lake");
    let ports = [free_port(), free_port()];
    let cfg = |i: usize| {
        let mut c = CloudConfig {
            node_id: format!("cloud-{i}"),
            shard_count: N,
            provisioning: prov_path.clone(),
            ..Default::default()
        };
        c.broker.url = Some(format!("mqtt://127.0.0.1:{}", mosquitto.port));
        c.storage.url = lake.display().to_string();
        c.http.listen = format!("127.0.0.1:{}", ports[i]).parse().unwrap();
        c.cluster = ClusterConfig {
            mode: Mode::Static,
            peers: vec![format!("127.0.0.1:{}", ports[1 - i])],
            stable_margin: Duration::from_millis(500),
            probe_interval: Duration::from_millis(200),
            down_after: Duration::from_secs(1),
            round_interval: Duration::from_millis(200),
            max_moves_per_round: 8,
            ..Default::default()
        };
        c.validate().unwrap();
        c
    };
    let table = Arc::new(LeaseTable::default());
    let start = |i: usize| {
        let (cfg, table, prov) = (cfg(i), table.clone(), prov.clone());
        async move {
            let store = StoreSpec::parse(&cfg.storage).unwrap().open(&cfg.storage).unwrap();
            let leases = FakeLeases { table, holder: cfg.node_id.clone() };
            fleetline_cloud::node::start_with(
                &cfg,
                store,
                Arc::new(fleetline_cloud::keys::Keys::fixed(prov)),
                Arc::default(),
                None,
                Some((Arc::new(leases), Duration::from_millis(200), Duration::from_secs(2))),
            )
            .await
            .unwrap()
        }
    };
    let store = {
        let c = StorageConfig { url: lake.display().to_string(), ..Default::default() };
        StoreSpec::parse(&c).unwrap().open(&c).unwrap()
    };
    // Every shard's head names the lease's holder, under the lease's epoch.
    let agree = async |want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leases = table.holders();
            let mut ok = leases.len() == usize::from(N);
            for s in 0..N {
                let (h, _) = read_head(&store, s, N).await.unwrap();
                let lease = leases.get(&s).cloned().unwrap_or((None, 0));
                ok &= h.owner.is_some() && h.owner == lease.0 && h.epoch == lease.1;
                ok &= h.owner.as_deref().is_some_and(|o| want.contains(&o));
            }
            if ok {
                return leases;
            }
            assert!(Instant::now() < deadline, "heads and leases disagree: {leases:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    let a = start(0).await;
    let leases = agree(&["cloud-0"]).await;
    assert!(leases.values().all(|(_, epoch)| *epoch >= 1));

    // The lease of shard 3 is taken away: the node drops the shard at its next
    // renewal and does not take it back while the lease is held elsewhere.
    table.set(3, Some("intruder"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.cluster.local(3).is_some() {
        assert!(Instant::now() < deadline, "the shard was not dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.cluster.local(3).is_none(), "taken back while someone else holds the lease");
    let (head, _) = read_head(&store, 3, N).await.unwrap();
    assert_eq!(head.owner.as_deref(), Some("cloud-0"), "the head still names the last writer");
    // Let go: taken again under a newer epoch.
    let before = table.holders()[&3].1;
    table.set(3, None);
    let leases = agree(&["cloud-0"]).await;
    assert!(leases[&3].1 > before, "{leases:?}");

    // A second node: shards move to it under leases; the first let go of theirs.
    let b = start(1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leases = agree(&["cloud-0", "cloud-1"]).await;
        if leases.values().any(|(h, _)| h.as_deref() == Some("cloud-1")) {
            break;
        }
        assert!(Instant::now() < deadline, "nothing moved to cloud-1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The first node drains: everything is the second's, leases and heads.
    a.shutdown().await;
    agree(&["cloud-1"]).await;
    b.shutdown().await;
    assert!(table.holders().values().all(|(h, _)| h.is_none()), "a drained node lets go of its leases");
}
