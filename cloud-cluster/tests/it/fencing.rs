//! Two owners of one shard (a node that froze across a takeover, a split view):
//! exactly one commits each generation, the other is fenced out — drops the shard,
//! acks nothing — and nothing is published twice, also after the generations the
//! zombie knew were pruned while it was frozen. Against a local directory (racing
//! for real), memory, and S3 (moto, from `e2e`, one step at a time).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arrow_array::{Array, Int64Array, StringArray};
use fleetline_cloud::config::SegmentConfig;
use fleetline_cloud::lake::store::{StorageConfig, Store, StoreSpec};
use fleetline_cloud::shard::head::Writer;
use fleetline_cloud::shard::{Published, Shard, ShardError, read_head};
use fleetline_cloud::telemetry::CloudStats;
use fleetline_testkit::batches::{bundle, sealed_batch};
use fleetline_testkit::provisioning::{device_id, device_key, fleet, gateway_key};
use fleetline_wire::provisioning::Provisioning;
use fleetline_wire::shard::shard_of;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const SHARDS: u16 = 4;
const SAMPLES: usize = 3;
const BASE_MS: u64 = 1_796_180_000_000;

/// One shard's worth of traffic: bundles of batches of three devices of shard 0.
struct Traffic {
    prov: Provisioning,
    devices: Vec<usize>,
    next: u64,
}

impl Traffic {
    fn new() -> Self {
        let devices = (0..200).filter(|i| shard_of("acme", device_id(*i).as_str(), SHARDS).0 == 0).take(3).collect();
        Self { prov: fleet(200, 1), devices, next: 0 }
    }

    /// A bundle with seq `q` of every device.
    fn bundle(&mut self, q: u32) -> Vec<u8> {
        self.next += 1;
        let sealed: Vec<Vec<u8>> = self
            .devices
            .iter()
            .map(|i| {
                sealed_batch(
                    device_id(*i).as_str(),
                    &device_key(*i),
                    1,
                    q,
                    BASE_MS + u64::from(q % 100) * 1000,
                    SAMPLES,
                    None,
                )
            })
            .collect();
        bundle(&gateway_key(0), "gw-0", self.next, 0, &sealed, BASE_MS)
    }
}

async fn open(store: &Store, node: &str) -> Result<Shard, ShardError> {
    let cfg = SegmentConfig { max_rows: 1_000_000, ..Default::default() };
    let published = Published::list(store).await.unwrap();
    Shard::open_with(store.clone(), 0, SHARDS, Writer::unleased(node), cfg, Arc::new(CloudStats::default()), &published)
        .await
}

fn ingest(shard: &mut Shard, t: &Traffic, b: &[u8]) {
    shard.state.ingest(b, &t.prov, Instant::now(), SystemTime::now());
}

/// (device, seq) → rows over every readings file.
async fn readings(store: &Store) -> BTreeMap<(String, i64), usize> {
    let mut out = BTreeMap::new();
    for path in store.list("readings").await.unwrap() {
        let bytes = store.get(&path).await.unwrap().unwrap();
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap() {
            let b = b.unwrap();
            let dev = b.column_by_name("device_id").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            let seq = b.column_by_name("seq").unwrap().as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                *out.entry((dev.value(i).to_string(), seq.value(i))).or_default() += 1;
            }
        }
    }
    out
}

async fn assert_sound(store: &Store, seqs: std::ops::Range<i64>) {
    let rows = readings(store).await;
    assert_eq!(rows.len(), 3 * seqs.clone().count(), "every batch stored: {rows:?}");
    assert!(rows.values().all(|n| *n == SAMPLES), "each once: {rows:?}");
    let report = fleetline_cloud::jobs::generations::check(store, SHARDS).await.unwrap();
    assert!(report.ok(), "{report:#?}");
    assert!(report.files > 0 && report.claims >= 2, "{report:?}");
}

/// The frozen zombie: `a` holds the shard, takes a bundle, freezes before its
/// commit; `b` claims the shard, commits twice (pruning every checkpoint `a` knew,
/// and `b`'s own first one); `a` wakes and commits.
pub(crate) async fn a_frozen_owner_wakes_up_fenced_out(store: &Store) {
    let mut t = Traffic::new();
    let mut a = open(store, "a").await.unwrap();
    let b0 = t.bundle(0);
    ingest(&mut a, &t, &b0);
    assert_eq!(a.commit().await.unwrap().acks.len(), 1);
    // A bundle `a` takes and never commits: it freezes here.
    let b1 = t.bundle(1);
    ingest(&mut a, &t, &b1);

    let mut b = open(store, "b").await.unwrap();
    assert_eq!(b.head().claim, 2);
    assert_eq!(b.state.generation(), 1);
    // The gateway sends b1 again (never acked), then b2 and b3.
    for (q, bundle) in [(1, b1.clone()), (2, t.bundle(2))] {
        ingest(&mut b, &t, &bundle);
        let committed = b.commit().await.unwrap();
        assert_eq!(committed.acks.values().map(Vec::len).sum::<usize>(), 1, "seq {q}");
    }
    assert_eq!(b.state.generation(), 3);
    // Generation 1's and 2's checkpoints are gone: pruned while `a` was frozen.
    let left = store.list("_fleetline/checkpoints/shard-000").await.unwrap();
    assert_eq!(left.iter().filter(|p| p.ends_with(".ckpt")).count(), 1, "{left:?}");

    // `a` wakes: its commit of generation 2 loses the head's swap.
    let files_before = store.list("readings").await.unwrap();
    let err = a.commit().await.expect_err("a zombie's commit must fail");
    assert!(matches!(&err, ShardError::Fenced { by, .. } if by.contains('b')), "{err}");
    assert_eq!(store.list("readings").await.unwrap(), files_before, "the zombie published nothing");
    assert!(store.list("_fleetline/staging/shard-000").await.unwrap().is_empty(), "and left nothing staged");
    assert!(matches!(a.recover().await, Err(ShardError::Fenced { .. })), "it cannot take the shard back silently");
    // Its memory is gone: nothing it held is acked later.
    assert_eq!(a.state.status().pending_acks, 0);
    assert_eq!(a.commit().await.unwrap().acks.len(), 0);

    // `b` goes on; the gateway's next bundle lands once.
    let b3 = t.bundle(3);
    ingest(&mut b, &t, &b3);
    b.commit().await.unwrap();
    assert_sound(store, 0..4).await;
    let (head, _) = read_head(store, 0, SHARDS).await.unwrap();
    assert_eq!((head.owner.as_deref(), head.claim, head.generation), (Some("b"), 2, 4));
}

#[tokio::test]
async fn a_frozen_owner_wakes_up_fenced_out_in_memory_and_on_disk() {
    a_frozen_owner_wakes_up_fenced_out(&Store::memory()).await;
    let dir = tempfile::tempdir().unwrap();
    a_frozen_owner_wakes_up_fenced_out(&local(dir.path())).await;
}

fn local(dir: &std::path::Path) -> Store {
    let cfg = StorageConfig { url: dir.display().to_string(), ..Default::default() };
    StoreSpec::parse(&cfg).unwrap().open(&cfg).unwrap()
}

/// Two owners racing: every round one node claims the shard from the other (as a
/// split view would have it), both take the same bundle, and both commit at the
/// same instant on two threads. Exactly one commit wins each round; the loser
/// acks nothing and reopens (claiming back) for the next round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_owners_on_disk_never_both_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    let mut t = Traffic::new();
    let mut a = open(&store, "a").await.unwrap();
    let mut won = BTreeMap::<&str, u32>::new();
    const ROUNDS: u32 = 12;
    for q in 0..ROUNDS {
        // `b` claims: `a` still believes it owns the shard.
        let mut b = open(&store, "b").await.unwrap();
        let bundle = t.bundle(q);
        ingest(&mut a, &t, &bundle);
        ingest(&mut b, &t, &bundle);
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move {
                let r = a.commit().await;
                (a, r)
            }),
            tokio::spawn(async move {
                let r = b.commit().await;
                (b, r)
            }),
        );
        let ((_, ra), (nb, rb)) = (ra.unwrap(), rb.unwrap());
        let acked = |r: &Result<fleetline_cloud::shard::Committed, ShardError>| {
            r.as_ref().map(|c| c.acks.values().map(Vec::len).sum::<usize>()).unwrap_or(0)
        };
        match (&ra, &rb) {
            (Err(ShardError::Fenced { .. }), Ok(_)) => *won.entry("b").or_default() += 1,
            other => panic!("round {q}: exactly the newer claim commits: {other:?}"),
        }
        assert_eq!(acked(&ra) + acked(&rb), 1, "round {q}: one ack for the one bundle");
        // Next round `a` claims it back from `b`.
        drop(nb);
        a = open(&store, "a").await.unwrap();
    }
    assert_eq!(won.get("b"), Some(&ROUNDS));
    assert_sound(&store, 0..i64::from(ROUNDS)).await;
}

/// The claim lands between a commit's commit point and its moves: the new
/// owner finds the checkpoint under the head and publishes its files itself;
/// the old owner's moves then find them in place, and its commit stands and
/// acks. Every file lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_moves_the_new_owner_finished_still_stands() {
    let dir = tempfile::tempdir().unwrap();
    for store in [Store::memory(), local(dir.path())] {
        let mut t = Traffic::new();
        let mut a = open(&store, "a").await.unwrap();
        let bundle = t.bundle(0);
        ingest(&mut a, &t, &bundle);
        let hold = store.faults.hold_next_rename();
        let commit = tokio::spawn(async move { a.commit().await });
        hold.reached.notified().await;
        // `a` is past its commit point, its first move held: `b` claims.
        let b = open(&store, "b").await.unwrap();
        hold.release.notify_one();
        let committed = commit.await.unwrap().expect("the commit stands");
        assert_eq!(committed.acks.values().map(Vec::len).sum::<usize>(), 1, "its bundle is acked");
        let rows = readings(&store).await;
        assert_eq!(rows.len(), t.devices.len(), "{rows:?}");
        assert!(rows.values().all(|n| *n == SAMPLES), "each reading once: {rows:?}");
        assert!(store.list("_fleetline/staging").await.unwrap().is_empty(), "nothing left staged");
        drop(b);
        let report = fleetline_cloud::jobs::generations::check(&store, SHARDS).await.unwrap();
        assert!(report.ok(), "{report:#?}");
    }
}

/// A commit racing a claim: `a` commits in a loop while `b` claims the shard on
/// another thread. Whatever the interleaving, every bundle `a` had acked is
/// stored once and `b` starts from a generation that includes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_racing_commits_on_disk_loses_nothing_acked() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    for round in 0..6u32 {
        let mut t = Traffic::new();
        // Every round uses bundle ids and seqs of its own.
        t.next = u64::from(round) * 1000;
        let mut a = open(&store, "a").await.unwrap();
        let committer = tokio::spawn(async move {
            let mut acked = Vec::new();
            for q in round * 100..round * 100 + 40 {
                let b = t.bundle(q);
                ingest(&mut a, &t, &b);
                match a.commit().await {
                    Ok(c) if !c.acks.is_empty() => acked.push(q),
                    Ok(_) => {}
                    Err(ShardError::Fenced { .. }) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            acked
        });
        tokio::time::sleep(std::time::Duration::from_millis(u64::from(round) * 7 + 3)).await;
        let b = open(&store, "b").await.unwrap();
        let acked = committer.await.unwrap();
        let rows = readings(&store).await;
        for q in &acked {
            for d in &Traffic::new().devices {
                assert_eq!(
                    rows.get(&(device_id(*d).as_str().to_string(), i64::from(*q))),
                    Some(&SAMPLES),
                    "round {round} seq {q} device {d}: {:?} {rows:?}",
                    store.list("readings").await.unwrap()
                );
            }
        }
        assert!(rows.values().all(|n| *n == SAMPLES));
        drop(b);
        let report = fleetline_cloud::jobs::generations::check(&store, SHARDS).await.unwrap();
        assert!(report.ok(), "round {round}: {report:#?}");
    }
}
