//! One shard: its owner's whole state, and the commit protocol.
//!
//! Bundles for the shard are opened here, every device batch inside verified
//! with its device's key and deduped by (device, epoch, seq); new readings go to
//! the open segment, whatever cannot be used to dead letters. A commit makes the
//! open segment durable and only then yields the bundle acks:
//!
//! 1. encode one Parquet file per dataset partition and put each under
//!    `_fleetline/staging/shard-NNN/` (outside every dataset: no reader sees it);
//! 2. put the checkpoint of generation g+1, listing those files and where they go,
//!    with the dedupe state that includes them — **the commit point**;
//! 3. move each staged file to its place in the dataset (local: an atomic rename;
//!    S3: a server-side copy, then a delete);
//! 4. ack every bundle the segment holds.
//!
//! Recovery loads the newest checkpoint, finishes its moves, and deletes staged
//! files no checkpoint names (a crash before step 2 leaves those; their bundles
//! were never acked and come again). So after a crash at any instant every acked
//! reading is in the dataset exactly once, and no reader ever sees a partial or
//! orphan file: objects appear whole (atomic put, rename, copy), only after the
//! checkpoint that accounts for them. A failed write inside a commit is handled
//! the same way: the shard throws its memory away and recovers from the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fleetline_wire::bundle::{BundleId, open_bundle, peek_bundle};
use fleetline_wire::provisioning::Provisioning;
use fleetline_wire::shard::{fnv1a64, shard_of};
use fleetline_wire::signals;
use fleetline_wire::{DeviceId, FleetId, GatewayId, WireError, open_batch, peek_header};
use serde::Deserialize;

use crate::analytics::{AnalyticsConfig, Event, Output, Pt, Who};
use crate::checkpoint::{
    Checkpoint, DATASETS, DeviceState, Latest, Publish, Totals, checkpoint_dir, checkpoint_path, generation_of,
    published_of, published_path, staging_dir,
};
use crate::rows::{BatchMeta, DeadLetter, Rows};
use crate::stats::{CloudStats, reason};
use crate::store::Store;

/// Most hashes of unauthenticated dead letters remembered for dedupe.
pub const DEADLETTER_SEEN_MAX: usize = 65_536;

/// Bundle acks a commit released: gateway → bundle ids.
pub type Acks = BTreeMap<String, Vec<BundleId>>;

/// What a commit released: acks for gateways and alerts for the events it stored.
#[derive(Debug, Default)]
pub struct Committed {
    /// Bundle acks.
    pub acks: Acks,
    /// Events now durable in `events`, to publish as alerts.
    pub alerts: Vec<Event>,
}

/// Why a commit or a recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The object store refused or failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// Parquet encoding failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// A checkpoint is unreadable.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Stored state contradicts itself; refusing to guess.
    #[error("inconsistent shard state: {0}")]
    Inconsistent(String),
    /// The newest checkpoint does not load.
    #[error(
        "checkpoint {path} of shard {shard} is damaged ({error}); the shard stays down. \
         `fleetline-cloud repair --shard {shard}` rebuilds its state from the datasets"
    )]
    DamagedCheckpoint {
        /// Shard.
        shard: u16,
        /// The checkpoint object.
        path: String,
        /// What is wrong with it.
        error: crate::checkpoint::CheckpointError,
    },
    /// The datasets hold files of generations the newest checkpoint does not
    /// account for: the checkpoint was lost or restored from an older copy.
    /// Starting would number new files from that checkpoint and meet those.
    #[error(
        "shard {shard}: {count} dataset files are newer than its checkpoint ({checkpoint}), newest {examples}; \
         the checkpoint was lost or restored from an older copy. The shard stays down rather than write \
         past them: `fleetline-cloud repair --shard {shard}` rebuilds its state from the datasets",
        count = files.len(),
        examples = files.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
    )]
    AheadOfCheckpoint {
        /// Shard.
        shard: u16,
        /// The newest checkpoint, or that there is none.
        checkpoint: String,
        /// The files beyond it.
        files: Vec<String>,
    },
}

/// When a shard commits its open segment.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    /// Longest data waits in an open segment (also the ack latency towards gateways).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Most rows in an open segment.
    pub max_rows: usize,
    /// Boot epochs remembered per device for dedupe (older boots do not send any more).
    pub dedupe_epochs: usize,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self { max_age: Duration::from_secs(2), max_rows: 500_000, dedupe_epochs: 16 }
    }
}

/// Clock sanity: readings dated too far after their gateway received them, or
/// before a floor (units whose clocks read 1970), go to dead letters. Late data is
/// never refused: backlogs are normal.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Largest allowed `ts − received_at`.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Earliest allowed reading time (RFC 3339).
    #[serde(with = "humantime_serde")]
    pub epoch_floor: std::time::SystemTime,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_future_skew: Duration::from_secs(300),
            // 2020-01-01T00:00:00Z
            epoch_floor: std::time::UNIX_EPOCH + Duration::from_secs(1_577_836_800),
        }
    }
}

impl ValidationConfig {
    /// The floor in Unix ms.
    pub fn floor_ms(&self) -> i64 {
        self.epoch_floor.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }
}

/// What a shard task is asked (its mailbox).
pub enum ShardMsg {
    /// A bundle from the shard's topic.
    Bundle(Bytes),
    /// Commit now; answers when done.
    Flush(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Current status.
    Status(tokio::sync::oneshot::Sender<ShardStatus>),
    /// A vehicle's latest state.
    Vehicle(String, String, tokio::sync::oneshot::Sender<Option<VehicleState>>),
    /// Dead letters to take in again under the newest schema of a subject; answers
    /// once what was taken in is committed.
    Replay(
        Vec<crate::replay::ReplayItem>,
        String,
        tokio::sync::oneshot::Sender<Result<crate::replay::ReplayOutcome, String>>,
    ),
}

/// Commits every shard now.
pub async fn flush_all(shards: &[Option<tokio::sync::mpsc::Sender<ShardMsg>>]) -> Vec<Result<(), String>> {
    let mut waits = Vec::new();
    for s in shards.iter().flatten() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if s.send(ShardMsg::Flush(tx)).await.is_ok() {
            waits.push(rx);
        }
    }
    let mut out = Vec::new();
    for w in waits {
        out.push(w.await.unwrap_or_else(|_| Err("shard task gone".into())));
    }
    out
}

/// Files every shard has published, by shard: (generation, object name).
#[derive(Debug, Default)]
pub struct Published(BTreeMap<u16, Vec<(u64, String)>>);

impl Published {
    /// Lists the datasets once (a node lists for all its shards together).
    pub async fn list(store: &Store) -> object_store::Result<Self> {
        let mut by_shard: BTreeMap<u16, Vec<(u64, String)>> = BTreeMap::new();
        for dataset in DATASETS {
            for path in store.list(dataset).await? {
                if let Some((shard, generation)) = published_of(&path) {
                    by_shard.entry(shard).or_default().push((generation, path));
                }
            }
        }
        Ok(Self(by_shard))
    }

    /// One shard's files.
    pub fn of(&self, shard: u16) -> &[(u64, String)] {
        self.0.get(&shard).map_or(&[], Vec::as_slice)
    }
}

/// Where a test may stop the process to play a crash (`FLEETLINE_CLOUD_FAULT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitStep {
    /// Segment files staged, checkpoint not yet written.
    Staged,
    /// Checkpoint written, files not yet published.
    Checkpointed,
    /// Files published, acks not yet sent.
    Published,
}

/// Fault hook: with `FLEETLINE_CLOUD_FAULT=abort:<staged|checkpointed|published>:<n>`
/// the process aborts (as a SIGKILL would leave it) the `n`th time any shard
/// reaches that step. Used by the crash tests; unset in production.
fn fault_point(step: CommitStep) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PLAN: OnceLock<Option<(CommitStep, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let plan = PLAN.get_or_init(|| {
        let v = std::env::var("FLEETLINE_CLOUD_FAULT").ok()?;
        let mut parts = v.split(':');
        (parts.next()? == "abort").then_some(())?;
        let step = match parts.next()? {
            "staged" => CommitStep::Staged,
            "checkpointed" => CommitStep::Checkpointed,
            "published" => CommitStep::Published,
            _ => return None,
        };
        Some((step, parts.next()?.parse().ok()?))
    });
    if let Some((at, n)) = *plan
        && at == step
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == n
    {
        tracing::error!(?step, "FLEETLINE_CLOUD_FAULT: aborting");
        std::process::abort();
    }
}

/// A shard's state for `/status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ShardStatus {
    /// Shard.
    pub shard: u16,
    /// Last committed generation.
    pub generation: u64,
    /// Rows in the open segment.
    pub open_rows: usize,
    /// Bundles waiting for the next commit to be acked.
    pub pending_acks: usize,
    /// Devices known.
    pub devices: usize,
    /// Dedupe ranges held (memory is proportional).
    pub dedupe_ranges: usize,
    /// Last commit, Unix ms.
    pub last_commit_ms: Option<i64>,
    /// Totals since the shard was created.
    pub totals: Totals,
}

/// The latest state of one vehicle, for the HTTP query.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VehicleState {
    /// Fleet.
    pub fleet: String,
    /// Device.
    pub device: String,
    /// Gateway of the last batch.
    pub last_gateway: String,
    /// When that gateway received it, Unix ms.
    pub last_received_ms: i64,
    /// Latest value per signal (VSS path → time and value).
    pub signals: BTreeMap<String, (i64, f64)>,
}

/// One shard and its open segment.
pub struct Shard {
    id: u16,
    shard_count: u16,
    node: String,
    cfg: SegmentConfig,
    store: Store,
    stats: Arc<CloudStats>,
    generation: u64,
    last_commit_ms: Option<i64>,
    devices: HashMap<String, DeviceState>,
    deadletter_seen: VecDeque<u64>,
    deadletter_set: HashSet<u64>,
    totals: Totals,
    rows: Rows,
    open_batches: u64,
    opened_at: Option<Instant>,
    acks: BTreeMap<String, BTreeSet<BundleId>>,
    registry: Option<Arc<crate::registry::Registry>>,
    validation: ValidationConfig,
    analytics: AnalyticsConfig,
    /// Per gateway: its clock, and its units not flagged silent by last receipt.
    clocks: HashMap<Arc<str>, (i64, i64)>,
    waiting: HashMap<String, BTreeSet<(i64, String)>>,
    /// Alerts of the newest commit, to publish again after a restart.
    resend: Vec<Event>,
    /// State changed since the last commit (a commit without rows still checkpoints it).
    dirty: bool,
}

/// Opens a sealed batch of a dead letter again with its device's current keys.
fn reopen(sealed: &[u8], prov: &Provisioning) -> Option<fleetline_wire::decode::DecodedBatch> {
    let header = peek_header(sealed).ok()?;
    let entry = prov.device(&FleetId::new(header.fleet).ok()?, &DeviceId::new(header.device).ok()?)?;
    let mut buf = sealed.to_vec();
    for key in entry.keys_at(SystemTime::now()) {
        buf.copy_from_slice(sealed);
        if let Ok(b) = open_batch(&mut buf, key) {
            return b.decode().ok();
        }
    }
    None
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn device_key(fleet: &str, device: &str) -> String {
    format!("{fleet}/{device}")
}

impl Shard {
    /// Recovers shard `id` from the store: loads the newest checkpoint, finishes its
    /// publishing, and removes staged files no checkpoint names. Refuses a shard
    /// whose datasets hold files beyond its checkpoint.
    pub async fn open(
        store: Store,
        id: u16,
        shard_count: u16,
        node: &str,
        cfg: SegmentConfig,
        stats: Arc<CloudStats>,
    ) -> Result<Self, ShardError> {
        let published = Published::list(&store).await?;
        Self::open_with(store, id, shard_count, node, cfg, stats, &published).await
    }

    /// [`Shard::open`] with the datasets already listed.
    pub async fn open_with(
        store: Store,
        id: u16,
        shard_count: u16,
        node: &str,
        cfg: SegmentConfig,
        stats: Arc<CloudStats>,
        published: &Published,
    ) -> Result<Self, ShardError> {
        let mut shard = Self {
            id,
            shard_count,
            node: node.into(),
            cfg,
            store,
            stats,
            generation: 0,
            last_commit_ms: None,
            devices: HashMap::new(),
            deadletter_seen: VecDeque::new(),
            deadletter_set: HashSet::new(),
            totals: Totals::default(),
            rows: Rows::default(),
            open_batches: 0,
            opened_at: None,
            acks: BTreeMap::new(),
            registry: None,
            validation: Default::default(),
            analytics: Default::default(),
            clocks: HashMap::new(),
            waiting: HashMap::new(),
            resend: Vec::new(),
            dirty: false,
        };
        shard.recover().await?;
        // Newest first: the message names the files furthest beyond.
        let mut beyond: Vec<&(u64, String)> = published.of(id).iter().filter(|(g, _)| *g > shard.generation).collect();
        beyond.sort_by(|a, b| b.cmp(a));
        let beyond: Vec<String> = beyond.into_iter().map(|(_, p)| p.clone()).collect();
        if !beyond.is_empty() {
            let checkpoint = match shard.generation {
                0 => "none found".to_string(),
                g => format!("{}, generation {g}", checkpoint_path(id, g)),
            };
            return Err(ShardError::AheadOfCheckpoint { shard: id, checkpoint, files: beyond });
        }
        Ok(shard)
    }

    /// Drops everything in memory and reloads from the store (after a failed commit).
    pub async fn recover(&mut self) -> Result<(), ShardError> {
        self.rows = Rows::default();
        self.dirty = false;
        self.open_batches = 0;
        self.opened_at = None;
        self.acks.clear();
        let checkpoints = self.store.list(&checkpoint_dir(self.id)).await?;
        let newest = checkpoints.iter().filter_map(|p| generation_of(p).map(|g| (g, p))).max();
        let ckpt = match newest {
            None => None,
            Some((_, path)) => {
                let bytes = self
                    .store
                    .get(path)
                    .await?
                    .ok_or_else(|| ShardError::Inconsistent(format!("checkpoint {path} vanished while loading")))?;
                let c = Checkpoint::from_bytes(&bytes).map_err(|error| ShardError::DamagedCheckpoint {
                    shard: self.id,
                    path: path.clone(),
                    error,
                })?;
                Some(c)
            }
        };
        let publish = ckpt.as_ref().map(|c| c.publish.clone()).unwrap_or_default();
        if let Some(c) = &ckpt
            && (c.shard != self.id || c.shard_count != self.shard_count)
        {
            return Err(ShardError::Inconsistent(format!(
                "checkpoint of shard {}/{} found where shard {}/{} was expected (shard_count changed?)",
                c.shard, c.shard_count, self.id, self.shard_count
            )));
        }
        // Finish publishing what the newest commit staged.
        for p in &publish {
            if self.store.exists(&p.published).await? {
                match self.store.get(&p.staged).await? {
                    // A move that copied and crashed before its delete: the same bytes twice.
                    Some(staged) if self.store.get(&p.published).await?.is_some_and(|b| b == staged) => {
                        self.store.delete(&p.staged).await?;
                    }
                    Some(_) => {
                        return Err(ShardError::Inconsistent(format!(
                            "shard {}: committed file {} is staged, but another file of that name is already \
                             published; refusing to replace it",
                            self.id, p.published
                        )));
                    }
                    None => {}
                }
            } else if self.store.exists(&p.staged).await? {
                self.store.rename_new(&p.staged, &p.published).await?;
                tracing::info!(shard = self.id, file = p.published, "published a committed file after restart");
            } else {
                return Err(ShardError::Inconsistent(format!(
                    "committed file {} is neither staged nor published",
                    p.published
                )));
            }
        }
        // Staged by a commit that never reached its checkpoint: not part of anything.
        let named: HashSet<&str> = publish.iter().map(|p| p.staged.as_str()).collect();
        for staged in self.store.list(&staging_dir(self.id)).await? {
            if !named.contains(staged.as_str()) {
                self.store.delete(&staged).await?;
                self.stats.count(&self.stats.orphans_removed, 1);
                tracing::info!(shard = self.id, file = staged, "removed a file staged by an uncommitted segment");
            }
        }
        // Older checkpoints are superseded.
        if let Some((newest, _)) = newest {
            for p in &checkpoints {
                if generation_of(p).is_some_and(|g| g < newest) {
                    self.store.delete(p).await?;
                }
            }
        }
        self.clocks.clear();
        self.waiting.clear();
        match ckpt {
            Some(c) => {
                self.clocks =
                    c.clocks.into_iter().map(|g| (Arc::from(g.gateway.as_str()), (g.last, g.since))).collect();
                self.resend = c.outbox;
                self.generation = c.generation;
                self.last_commit_ms = Some(c.committed_at_ms);
                self.totals = c.totals;
                self.devices = c.devices.into_iter().map(|d| (device_key(&d.fleet, &d.device), d)).collect();
                self.deadletter_set = c.deadletter_seen.iter().copied().collect();
                self.deadletter_seen = c.deadletter_seen.into();
            }
            None => {
                self.generation = 0;
                self.last_commit_ms = None;
                self.totals = Totals::default();
                self.devices.clear();
                self.deadletter_seen.clear();
                self.deadletter_set.clear();
                self.resend.clear();
            }
        }
        for (k, d) in &self.devices {
            if !d.last_gateway.is_empty() && !d.analytics.is_silent() {
                self.waiting.entry(d.last_gateway.clone()).or_default().insert((d.last_received_ms, k.clone()));
            }
        }
        Ok(())
    }

    /// Alerts committed before the last restart, to publish again (once).
    pub fn take_resend(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.resend)
    }

    /// Takes dead letters in again, checked against the newest schema of `subject`
    /// (see [`crate::replay`]); the rows and the replay marks commit together.
    pub fn replay(
        &mut self,
        items: &[crate::replay::ReplayItem],
        subject: &str,
        prov: Option<&Provisioning>,
    ) -> crate::replay::ReplayOutcome {
        let mut out = crate::replay::ReplayOutcome::default();
        let latest_ok = self.validation.max_future_skew.as_millis() as i64;
        let floor = self.validation.floor_ms();
        for item in items {
            out.candidates += 1;
            let Some(state) = self.devices.get_mut(&device_key(&item.fleet, &item.device)) else {
                // Not a device this shard stores (its batch was never authentic).
                out.still_invalid += 1;
                continue;
            };
            if state.replayed.contains(&item.key()) {
                out.already_replayed += 1;
                continue;
            }
            let valid = |def: &crate::registry::SignalDef, ts: i64, v: f64| {
                v >= def.min && v <= def.max && ts >= floor && ts <= item.received_at_ms + latest_ok
            };
            let readings: Option<Vec<(i64, f64, &'static str)>> = if item.reason == reason::UNKNOWN_SCHEMA {
                // A whole batch under a schema id registered since: opened again with
                // the device's keys, every reading judged by that schema.
                let schema = self.registry.as_ref().and_then(|r| r.schema(item.schema?));
                prov.zip(schema).and_then(|(prov, schema)| {
                    let decoded = reopen(&item.raw, prov)?;
                    decoded
                        .samples
                        .iter()
                        .map(|s| {
                            let def = schema.signal(s.kind.0)?;
                            valid(def, s.ts_ms, s.value).then(|| (s.ts_ms, s.value, crate::replay::intern(&def.path)))
                        })
                        .collect()
                })
            } else {
                // Judged by the newest schema of the subject its batch's schema belongs to.
                let schema = self.registry.as_ref().and_then(|r| {
                    let s = match item.schema {
                        Some(id) => r.subject_of(id, Some(subject))?,
                        None => subject.to_string(),
                    };
                    r.latest(&s)
                });
                schema.as_ref().and_then(|s| s.signal(item.kind)).and_then(|def| {
                    let path = crate::replay::intern(&def.path);
                    let rs = item.readings(def).ok()?;
                    rs.iter()
                        .all(|(ts, v)| valid(def, *ts, *v))
                        .then(|| rs.into_iter().map(|(ts, v)| (ts, v, path)).collect())
                })
            };
            let Some(readings) = readings else {
                out.still_invalid += 1;
                continue;
            };
            state.replayed.insert(item.key());
            let meta = Arc::new(BatchMeta {
                fleet: item.fleet.as_str().into(),
                device: item.device.as_str().into(),
                epoch: item.epoch,
                seq: item.seq,
                gateway: item.gateway.as_str().into(),
                received_at_ms: item.received_at_ms,
            });
            for (ts, v, path) in &readings {
                self.rows.push_reading(&meta, *ts, path, *v);
            }
            out.replayed += 1;
            out.readings += readings.len() as u64;
        }
        if out.replayed > 0 {
            self.opened_at.get_or_insert_with(Instant::now);
            self.stats.count(&self.stats.replayed, out.replayed);
        }
        out
    }

    /// Analytics settings.
    pub fn set_analytics(&mut self, cfg: AnalyticsConfig) {
        self.analytics = cfg;
    }

    /// Validates readings against the registry: a batch's schema id must be
    /// registered, and each reading listed in that schema and within its range.
    /// Without a registry only the build's own signal table applies.
    pub fn set_registry(&mut self, registry: Arc<crate::registry::Registry>) {
        self.registry = Some(registry);
    }

    /// Clock sanity limits.
    pub fn set_validation(&mut self, v: ValidationConfig) {
        self.validation = v;
    }

    /// This shard's id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Takes one bundle as published on this shard's topic.
    pub fn ingest(&mut self, payload: &[u8], prov: &Provisioning) {
        self.stats.count(&self.stats.bundles_received, 1);
        let header = match peek_bundle(payload) {
            Ok(h) => h,
            Err(e) => return self.bundle_deadletter(reason::BUNDLE_MALFORMED, e.to_string(), None, None, payload),
        };
        let gw_key = GatewayId::new(&header.gateway).ok().and_then(|g| prov.gateway(&g)).map(|g| g.key.clone());
        let Some(gw_key) = gw_key else {
            let detail = format!("gateway {:?} is not provisioned", header.gateway);
            return self.bundle_deadletter(reason::UNKNOWN_GATEWAY, detail, Some(&header.gateway), None, payload);
        };
        let (header, entries) = match open_bundle(payload, &gw_key) {
            Ok(b) => b,
            Err(e) => {
                let r = if matches!(e, WireError::AuthenticationFailed) {
                    reason::BUNDLE_AUTH_FAILED
                } else {
                    reason::BUNDLE_MALFORMED
                };
                return self.bundle_deadletter(r, e.to_string(), Some(&header.gateway), Some(header.id.0), payload);
            }
        };
        if header.shard != self.id {
            // Gateways put each bundle on its shard's topic; a mismatch is a forged
            // or misrouted header. The batches are still checked one by one below.
            tracing::warn!(shard = self.id, header_shard = header.shard, "bundle for another shard on this topic");
        }
        let gateway: Arc<str> = header.gateway.as_str().into();
        let now = SystemTime::now();
        for e in &entries {
            self.ingest_batch(&gateway, header.id.0, e.received_at_ms as i64, &e.batch, prov, now);
            self.gateway_tick(&gateway, e.received_at_ms as i64);
        }
        self.acks.entry(header.gateway).or_default().insert(header.id);
        self.opened_at.get_or_insert_with(Instant::now);
    }

    fn ingest_batch(
        &mut self,
        gateway: &Arc<str>,
        bundle: u64,
        received_at_ms: i64,
        sealed: &[u8],
        prov: &Provisioning,
        now: SystemTime,
    ) {
        // A dead letter of this batch, carrying `raw` (the sealed batch, a raw series, a value).
        let dl = |reason: &'static str, detail: String, h: Option<&fleetline_wire::BatchHeader<'_>>, raw: Vec<u8>| {
            DeadLetter {
                fleet: h.map(|h| h.fleet.into()),
                device: h.map(|h| h.device.into()),
                epoch: h.map(|h| h.epoch),
                seq: h.map(|h| h.seq),
                ts_ms: h.map(|h| h.base_time_ms as i64),
                schema: h.map(|h| h.schema),
                gateway: Some(gateway.to_string()),
                bundle_id: Some(bundle),
                received_at_ms: Some(received_at_ms),
                ..DeadLetter::new(reason, detail, raw)
            }
        };
        let header = match peek_header(sealed) {
            Ok(h) => h,
            Err(e) => return self.hashed_deadletter(dl(reason::MALFORMED, e.to_string(), None, sealed.to_vec())),
        };
        let (Ok(fleet), Ok(device)) = (FleetId::new(header.fleet), DeviceId::new(header.device)) else {
            return self.hashed_deadletter(dl(
                reason::MALFORMED,
                "bad fleet or device id".into(),
                Some(&header),
                sealed.to_vec(),
            ));
        };
        let home = shard_of(header.fleet, header.device, self.shard_count).0;
        if home != self.id {
            let detail = format!("device belongs to shard {home} of {}", self.shard_count);
            return self.hashed_deadletter(dl(reason::WRONG_SHARD, detail, Some(&header), sealed.to_vec()));
        }
        let Some(entry) = prov.device(&fleet, &device) else {
            return self.hashed_deadletter(dl(
                reason::UNKNOWN_DEVICE,
                "device is not provisioned".into(),
                Some(&header),
                sealed.to_vec(),
            ));
        };
        // Open (and decode) once, under whichever valid key verifies.
        let mut buf = sealed.to_vec();
        let mut opened = None;
        for key in entry.keys_at(now) {
            buf.copy_from_slice(sealed);
            if let Ok(batch) = open_batch(&mut buf, key) {
                opened = Some(batch.decode());
                break;
            }
        }
        let Some(decoded) = opened else {
            return self.hashed_deadletter(dl(
                reason::AUTH_FAILED,
                "seal does not verify under the device's keys".into(),
                Some(&header),
                sealed.to_vec(),
            ));
        };
        // Authentic from here on: (device, epoch, seq) identifies the batch.
        let dkey = device_key(header.fleet, header.device);
        let floor = self.devices.get(&dkey).map_or(0, |d| d.epoch_floor);
        if header.epoch < floor {
            // Authentic, but from a boot epoch whose dedupe state is forgotten: a
            // replay of a captured batch, or a backlog older than anything kept.
            // Kept as a dead letter (once per distinct batch), never stored again.
            let detail = format!("boot epoch {} is below the device's epoch floor {}", header.epoch, floor);
            return self.hashed_deadletter(dl(reason::STALE_EPOCH, detail, Some(&header), sealed.to_vec()));
        }
        let state = self.devices.entry(dkey.clone()).or_insert_with(|| DeviceState {
            fleet: header.fleet.into(),
            device: header.device.into(),
            ..Default::default()
        });
        if !state.seen.insert(header.epoch, header.seq) {
            self.stats.count(&self.stats.duplicates, 1);
            return;
        }
        if let Some(forgot) = state.seen.retain_epochs(self.cfg.dedupe_epochs) {
            state.epoch_floor = state.epoch_floor.max(forgot.saturating_add(1));
        }
        self.open_batches += 1;
        self.dirty = true;
        let batch_key = (header.epoch, header.seq);
        self.heard(&dkey, gateway, received_at_ms, batch_key);
        let Some(state) = self.devices.get_mut(&dkey) else { return };
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                let d = dl(reason::UNDECODABLE, e.to_string(), Some(&header), sealed.to_vec());
                self.push_deadletter(d);
                return self.analyze(&dkey, batch_key, Vec::new());
            }
        };
        let schema = match &self.registry {
            None => None,
            Some(r) => match r.schema(u32::from(header.schema)) {
                Some(s) => Some(s),
                None => {
                    let detail = format!("schema id {} is not registered", header.schema);
                    let d = dl(reason::UNKNOWN_SCHEMA, detail, Some(&header), sealed.to_vec());
                    self.push_deadletter(d);
                    return self.analyze(&dkey, batch_key, Vec::new());
                }
            },
        };
        let meta = Arc::new(BatchMeta {
            fleet: header.fleet.into(),
            device: header.device.into(),
            epoch: header.epoch,
            seq: header.seq,
            gateway: gateway.clone(),
            received_at_ms,
        });
        let mut invalid = Vec::new();
        let mut accepted = 0u64;
        let mut pts = Vec::with_capacity(decoded.samples.len());
        let latest_ok = received_at_ms.saturating_add(self.validation.max_future_skew.as_millis() as i64);
        let floor = self.validation.floor_ms();
        for s in &decoded.samples {
            let Some(spec) = signals::spec(s.kind) else { continue };
            if s.ts_ms > latest_ok {
                let why = format!("dated {} ms after its gateway received it", s.ts_ms - received_at_ms);
                invalid.push((reason::FUTURE_TIMESTAMP, *s, why));
                continue;
            }
            if s.ts_ms < floor {
                invalid.push((reason::BEFORE_EPOCH_FLOOR, *s, format!("dated {} ms, before the epoch floor", s.ts_ms)));
                continue;
            }
            if let Some(schema) = &schema {
                match schema.signal(s.kind.0) {
                    None => {
                        let why = format!("kind {} is not in schema {}", s.kind.0, header.schema);
                        invalid.push((reason::NOT_IN_SCHEMA, *s, why));
                        continue;
                    }
                    Some(def) if s.value < def.min || s.value > def.max => {
                        let why = format!("{} = {} outside {}..{}", def.path, s.value, def.min, def.max);
                        invalid.push((reason::OUT_OF_RANGE, *s, why));
                        continue;
                    }
                    Some(_) => {}
                }
            }
            accepted += 1;
            pts.push(Pt { ts: s.ts_ms, kind: s.kind.0, value: s.value });
            self.rows.push_reading(&meta, s.ts_ms, spec.path, s.value);
            match state.latest.iter_mut().find(|l| l.kind == s.kind.0) {
                Some(l) if l.ts_ms <= s.ts_ms => *l = Latest { kind: s.kind.0, ts_ms: s.ts_ms, value: s.value },
                Some(_) => {}
                None => state.latest.push(Latest { kind: s.kind.0, ts_ms: s.ts_ms, value: s.value }),
            }
        }
        self.stats.count(&self.stats.samples_received, accepted);
        for (why, s, detail) in invalid {
            // The reading itself (value as f64 little-endian) with its kind and time,
            // so a corrected schema can take it in later.
            let mut d = dl(why, detail, Some(&header), s.value.to_le_bytes().to_vec());
            d.kind = Some(s.kind.0);
            d.ts_ms = Some(s.ts_ms);
            self.push_deadletter(d);
        }
        for u in decoded.unknown {
            let mut d = dl(
                reason::UNKNOWN_KIND,
                format!("reading kind {} is not in schema {}", u.kind.0, header.schema),
                Some(&header),
                u.raw,
            );
            d.kind = Some(u.kind.0);
            self.push_deadletter(d);
        }
        self.analyze(&dkey, batch_key, pts);
    }

    /// A device's batch, as analytics sees it (every new (epoch, seq) once).
    fn analyze(&mut self, dkey: &str, key: (u32, u32), pts: Vec<Pt>) {
        let Some(state) = self.devices.get_mut(dkey) else { return };
        let mut out = Output::default();
        let before = state.analytics.counts;
        let who = Who { fleet: &state.fleet, device: &state.device };
        state.analytics.offer(&who, key, pts, &self.analytics, &mut out);
        let after = state.analytics.counts;
        self.stats.count(&self.stats.late_samples, after.late_samples - before.late_samples);
        self.stats.count(&self.stats.gaps_skipped, after.gaps_skipped - before.gaps_skipped);
        if out.aggregates.is_empty() && out.events.is_empty() {
            return;
        }
        let (fleet, device): (Arc<str>, Arc<str>) = (state.fleet.as_str().into(), state.device.as_str().into());
        self.take_output(&fleet, &device, out);
    }

    fn take_output(&mut self, fleet: &Arc<str>, device: &Arc<str>, out: Output) {
        self.stats.count(&self.stats.aggregates, out.aggregates.len() as u64);
        for row in out.aggregates {
            self.rows.push_aggregate(fleet, device, row);
        }
        for e in out.events {
            self.stats.event(&e.kind);
            self.rows.push_event(e);
        }
    }

    /// An authentic batch of a device came through `gateway`, received at `received_ms`.
    /// A new batch (`key`) of a device came through `gateway`, received at
    /// `received_ms` by that gateway's clock. The unit is heard (not silent); it
    /// belongs to the gateway of its newest batch, and receipt times are only ever
    /// compared within one gateway's clock.
    fn heard(&mut self, dkey: &str, gateway: &Arc<str>, received_ms: i64, key: (u32, u32)) {
        let Some(state) = self.devices.get_mut(dkey) else { return };
        if !state.analytics.is_silent()
            && let Some(w) = self.waiting.get_mut(&state.last_gateway)
        {
            w.remove(&(state.last_received_ms, dkey.to_string()));
        }
        let newer = state.last_gateway.is_empty() || key > state.last_batch;
        let moved = *state.last_gateway != **gateway && newer;
        if !moved {
            state.analytics.heard(received_ms, false);
        }
        if *state.last_gateway == **gateway {
            state.last_received_ms = state.last_received_ms.max(received_ms);
        } else if newer {
            state.last_gateway = gateway.to_string();
            state.last_received_ms = received_ms;
            state.analytics.heard(received_ms, true);
        }
        if newer {
            state.last_batch = key;
        }
        if !state.analytics.is_silent() {
            let entry = (state.last_received_ms, dkey.to_string());
            match self.waiting.get_mut(&state.last_gateway) {
                Some(w) => {
                    w.insert(entry);
                }
                None => {
                    self.waiting.insert(state.last_gateway.clone(), [entry].into());
                }
            }
        }
    }

    /// The gateway's clock reads `received_ms` (an entry it received then): units
    /// it has not heard for `silent_after` while hearing others without a pause are
    /// silent.
    fn gateway_tick(&mut self, gateway: &Arc<str>, received_ms: i64) {
        let after = self.analytics.silent_after.as_millis() as i64;
        let (last, since) = self.clocks.entry(gateway.clone()).or_insert((received_ms, received_ms));
        if received_ms <= *last {
            return;
        }
        if received_ms - *last > after / 2 {
            // A pause: the gateway was away (or only silent units are left); start over.
            *since = received_ms;
        }
        *last = received_ms;
        self.dirty = true;
        let (now, since) = (*last, *since);
        if now - since <= after {
            return;
        }
        let Some(waiting) = self.waiting.get_mut(&**gateway) else { return };
        let mut silent = Vec::new();
        while let Some(first) = waiting.first()
            && first.0 < now - after
        {
            if let Some(w) = waiting.pop_first() {
                silent.push(w);
            }
        }
        for (last, dkey) in silent {
            let Some(state) = self.devices.get_mut(&dkey) else { continue };
            let mut out = Output::default();
            let who = Who { fleet: &state.fleet, device: &state.device };
            state.analytics.check_silent(&who, last, last.max(since), now, &self.analytics, &mut out);
            let (fleet, device): (Arc<str>, Arc<str>) = (state.fleet.as_str().into(), state.device.as_str().into());
            self.take_output(&fleet, &device, out);
        }
    }

    fn bundle_deadletter(
        &mut self,
        reason: &'static str,
        detail: String,
        gateway: Option<&str>,
        bundle: Option<u64>,
        payload: &[u8],
    ) {
        self.hashed_deadletter(DeadLetter {
            gateway: gateway.map(Into::into),
            bundle_id: bundle,
            ..DeadLetter::new(reason, detail, payload.to_vec())
        });
        self.opened_at.get_or_insert_with(Instant::now);
    }

    /// A dead letter whose sender is not authenticated: deduped by a hash of its bytes.
    fn hashed_deadletter(&mut self, d: DeadLetter) {
        let h = fnv1a64(&d.raw) ^ fnv1a64(d.reason.as_bytes()).rotate_left(1);
        if !self.deadletter_set.insert(h) {
            self.stats.count(&self.stats.duplicates, 1);
            return;
        }
        self.deadletter_seen.push_back(h);
        while self.deadletter_seen.len() > DEADLETTER_SEEN_MAX {
            if let Some(old) = self.deadletter_seen.pop_front() {
                self.deadletter_set.remove(&old);
            }
        }
        self.push_deadletter(d);
    }

    fn push_deadletter(&mut self, d: DeadLetter) {
        self.stats.deadletter(d.reason);
        tracing::debug!(shard = self.id, reason = d.reason, detail = d.detail, "dead letter");
        self.rows.push_deadletter(d);
    }

    /// When the open segment must be committed: at once when it is full or holds
    /// only acks (every batch a duplicate of committed data), else at its age limit.
    pub fn deadline(&self) -> Option<Instant> {
        let opened = self.opened_at?;
        if self.rows.len() >= self.cfg.max_rows || (self.rows.is_empty() && !self.acks.is_empty()) {
            return Some(opened);
        }
        Some(opened + self.cfg.max_age)
    }

    /// Commits the open segment (see the module docs); returns the acks it releases.
    /// On error nothing is acked and the caller must [`recover`](Self::recover).
    pub async fn commit(&mut self) -> Result<Committed, ShardError> {
        let acks: Acks =
            std::mem::take(&mut self.acks).into_iter().map(|(g, ids)| (g, ids.into_iter().collect())).collect();
        self.opened_at = None;
        if self.rows.is_empty() && !self.dirty {
            return Ok(Committed { acks, alerts: Vec::new() });
        }
        let started = Instant::now();
        let generation = self.generation + 1;
        let stored_at = now_ms();
        let rows = std::mem::take(&mut self.rows);
        let (rows, files) = tokio::task::spawn_blocking(move || {
            let files = rows.encode(stored_at);
            (rows, files)
        })
        .await
        .map_err(|e| ShardError::Inconsistent(format!("encoder task failed: {e}")))?;
        let files = files?;
        let mut publish = Vec::with_capacity(files.len());
        let mut written = 0u64;
        for (i, f) in files.into_iter().enumerate() {
            let staged = format!("{}/{generation:012}-{i:03}.parquet", staging_dir(self.id));
            let published = published_path(f.dataset, &f.partition, self.id, generation);
            written += f.bytes.len() as u64;
            self.store.put(&staged, Bytes::from(f.bytes)).await?;
            publish.push(Publish { staged, published });
        }
        fault_point(CommitStep::Staged);
        let mut totals = self.totals;
        totals.readings += rows.readings() as u64;
        totals.deadletters += rows.deadletters() as u64;
        totals.batches += self.open_batches;
        totals.files += publish.len() as u64;
        let ckpt = Checkpoint {
            shard: self.id,
            shard_count: self.shard_count,
            generation,
            committed_at_ms: stored_at,
            node: self.node.clone(),
            devices: self.devices.values().cloned().collect(),
            deadletter_seen: self.deadletter_seen.iter().copied().collect(),
            publish: publish.clone(),
            totals,
            clocks: self
                .clocks
                .iter()
                .map(|(g, (last, since))| crate::checkpoint::GatewayClock {
                    gateway: g.to_string(),
                    last: *last,
                    since: *since,
                })
                .collect(),
            outbox: rows.events().cloned().collect(),
        };
        // Create-only: a checkpoint or a dataset file is never replaced.
        self.store.put_new(&checkpoint_path(self.id, generation), Bytes::from(ckpt.to_bytes())).await?;
        fault_point(CommitStep::Checkpointed);
        for p in &publish {
            self.store.rename_new(&p.staged, &p.published).await?;
        }
        fault_point(CommitStep::Published);
        // Committed. The previous checkpoint is superseded; failing to delete it is harmless.
        if generation > 1
            && let Err(e) = self.store.delete(&checkpoint_path(self.id, generation - 1)).await
        {
            tracing::warn!(shard = self.id, error = %e, "could not delete a superseded checkpoint");
        }
        let new_readings = totals.readings - self.totals.readings;
        let new_batches = totals.batches - self.totals.batches;
        self.generation = generation;
        self.last_commit_ms = Some(stored_at);
        self.totals = totals;
        self.open_batches = 0;
        self.dirty = false;
        let s = &self.stats;
        s.count(&s.commits, 1);
        s.count(&s.readings_stored, new_readings);
        s.count(&s.batches_stored, new_batches);
        s.count(&s.bytes_written, written);
        s.last_commit_ms.store(stored_at, std::sync::atomic::Ordering::Relaxed);
        metrics::histogram!("fleetline_cloud_commit_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(shard = self.id, generation, rows = rows.len(), files = publish.len(), "committed");
        Ok(Committed { acks, alerts: ckpt.outbox })
    }

    /// Status for `/status`.
    pub fn status(&self) -> ShardStatus {
        ShardStatus {
            shard: self.id,
            generation: self.generation,
            open_rows: self.rows.len(),
            pending_acks: self.acks.values().map(BTreeSet::len).sum(),
            devices: self.devices.len(),
            dedupe_ranges: self.devices.values().map(|d| d.seen.range_count()).sum(),
            last_commit_ms: self.last_commit_ms,
            totals: self.totals,
        }
    }

    /// A vehicle's latest state, if this shard knows it.
    pub fn vehicle(&self, fleet: &str, device: &str) -> Option<VehicleState> {
        let d = self.devices.get(&device_key(fleet, device))?;
        Some(VehicleState {
            fleet: d.fleet.clone(),
            device: d.device.clone(),
            last_gateway: d.last_gateway.clone(),
            last_received_ms: d.last_received_ms,
            signals: d
                .latest
                .iter()
                .filter_map(|l| {
                    signals::spec(signals::SignalKind(l.kind)).map(|s| (s.path.to_string(), (l.ts_ms, l.value)))
                })
                .collect(),
        })
    }

    /// How long since the open segment was opened (for tests and status).
    pub fn open_for(&self) -> Option<Duration> {
        self.opened_at.map(|t| t.elapsed())
    }
}
