//! The commit protocol against the lake: a shard's [`ShardState`] and the object
//! store it commits to.
//!
//! A commit makes the open segment durable and only then yields the bundle acks:
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

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::checkpoint::{
    Checkpoint, DATASETS, Publish, checkpoint_dir, checkpoint_path, generation_of, published_of, published_path,
    staging_dir,
};
use super::error::ShardError;
use super::state::{Acks, SegmentConfig, ShardState};
use crate::analytics::Event;
use crate::lake::store::Store;
use crate::telemetry::{CloudStats, events as ev};

/// What a commit released: acks for gateways and alerts for the events it stored.
#[derive(Debug, Default)]
pub struct Committed {
    /// Bundle acks.
    pub acks: Acks,
    /// Events now durable in `events`, to publish as alerts.
    pub alerts: Vec<Event>,
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

/// A shard's state and the lake it commits to.
pub struct Shard {
    /// The pure state (ingest, dedupe, the open segment).
    pub state: ShardState,
    store: Store,
    stats: Arc<CloudStats>,
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
        let state = ShardState::new(id, shard_count, node, cfg, stats.clone());
        let mut shard = Self { state, store, stats };
        shard.recover().await?;
        // Newest first: the message names the files furthest beyond.
        let generation = shard.state.generation();
        let mut beyond: Vec<&(u64, String)> = published.of(id).iter().filter(|(g, _)| *g > generation).collect();
        beyond.sort_by(|a, b| b.cmp(a));
        let beyond: Vec<String> = beyond.into_iter().map(|(_, p)| p.clone()).collect();
        if !beyond.is_empty() {
            let checkpoint = match generation {
                0 => "none found".to_string(),
                g => format!("{}, generation {g}", checkpoint_path(id, g)),
            };
            return Err(ShardError::AheadOfCheckpoint { shard: id, checkpoint, files: beyond });
        }
        Ok(shard)
    }

    /// This shard's id.
    pub fn id(&self) -> u16 {
        self.state.id()
    }

    /// Drops everything in memory and reloads from the store (after a failed commit).
    pub async fn recover(&mut self) -> Result<(), ShardError> {
        let id = self.state.id();
        let checkpoints = self.store.list(&checkpoint_dir(id)).await?;
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
                    shard: id,
                    path: path.clone(),
                    error,
                })?;
                Some(c)
            }
        };
        let publish = ckpt.as_ref().map(|c| c.publish.clone()).unwrap_or_default();
        if let Some(c) = &ckpt
            && (c.shard != id || c.shard_count != self.state.shard_count())
        {
            return Err(ShardError::Inconsistent(format!(
                "checkpoint of shard {}/{} found where shard {}/{} was expected (shard_count changed?)",
                c.shard,
                c.shard_count,
                id,
                self.state.shard_count()
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
                            id, p.published
                        )));
                    }
                    None => {}
                }
            } else if self.store.exists(&p.staged).await? {
                self.store.rename_new(&p.staged, &p.published).await?;
                tracing::info!(shard = id, file = p.published, "published a committed file after restart");
            } else {
                return Err(ShardError::Inconsistent(format!(
                    "committed file {} is neither staged nor published",
                    p.published
                )));
            }
        }
        // Staged by a commit that never reached its checkpoint: not part of anything.
        let named: HashSet<&str> = publish.iter().map(|p| p.staged.as_str()).collect();
        for staged in self.store.list(&staging_dir(id)).await? {
            if !named.contains(staged.as_str()) {
                self.store.delete(&staged).await?;
                self.stats.emit(ev::OrphanRemoved { shard: id, file: &staged });
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
        self.state.restore(ckpt);
        Ok(())
    }

    /// Commits the open segment (see the module docs); returns the acks it releases.
    /// On error nothing is acked and the caller must [`recover`](Self::recover).
    pub async fn commit(&mut self) -> Result<Committed, ShardError> {
        let (acks, rows) = self.state.take_segment();
        let Some(rows) = rows else { return Ok(Committed { acks, alerts: Vec::new() }) };
        let id = self.state.id();
        let started = Instant::now();
        let generation = self.state.generation() + 1;
        let stored_at = fleetline_service::unix_ms() as i64;
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
            let staged = format!("{}/{generation:012}-{i:03}.parquet", staging_dir(id));
            let published = published_path(f.dataset, &f.partition, id, generation);
            written += f.bytes.len() as u64;
            self.store.put(&staged, Bytes::from(f.bytes)).await?;
            publish.push(Publish { staged, published });
        }
        fault_point(CommitStep::Staged);
        let ckpt = self.state.checkpoint(generation, stored_at, publish, &rows);
        // Create-only: a checkpoint or a dataset file is never replaced.
        self.store.put_new(&checkpoint_path(id, generation), Bytes::from(ckpt.to_bytes())).await?;
        fault_point(CommitStep::Checkpointed);
        for p in &ckpt.publish {
            self.store.rename_new(&p.staged, &p.published).await?;
        }
        fault_point(CommitStep::Published);
        // Committed. The previous checkpoint is superseded; failing to delete it is harmless.
        if generation > 1
            && let Err(e) = self.store.delete(&checkpoint_path(id, generation - 1)).await
        {
            tracing::warn!(shard = id, error = %e, "could not delete a superseded checkpoint");
        }
        let added = self.state.committed(&ckpt);
        self.stats.emit(ev::Committed {
            shard: id,
            generation,
            readings: added.readings,
            batches: added.batches,
            files: added.files,
            bytes: written,
            at_ms: stored_at,
            took: started.elapsed(),
        });
        Ok(Committed { acks, alerts: ckpt.outbox })
    }
}
