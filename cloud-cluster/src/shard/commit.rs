//! The commit protocol against the lake: a shard's [`ShardState`] and the object
//! store it commits to.
//!
//! A commit makes the open segment durable and only then yields the bundle acks:
//!
//! 1. encode one Parquet file per dataset partition and put each under
//!    `_fleetline/staging/shard-NNN/` (outside every dataset: no reader sees it);
//! 2. put the checkpoint of generation g+1 (create-only, named by generation and
//!    claim), listing those files and where they go, with the dedupe state that
//!    includes them;
//! 3. swap the shard's [head](super::head) from the version this owner last wrote
//!    to one naming that checkpoint — **the commit point**. A swap that loses means
//!    another node claimed the shard: this one is fenced out, drops what it holds
//!    and acks nothing;
//! 4. move each staged file to its place in the dataset (local: an atomic rename;
//!    S3: a server-side copy, then a delete); a node that claimed the shard after
//!    step 3 finishes these same moves when it opens, and whichever moves a file
//!    first, it lands once and the commit stands;
//! 5. ack every bundle the segment holds.
//!
//! Opening a shard claims its head first, then loads the checkpoint the head
//! names, finishes its moves (a move done twice lands once), and deletes staged
//! files and checkpoints the head does not name (a crash or a fenced writer before
//! step 3 leaves those; their bundles were never acked and come again). So after a
//! crash at any instant, and with any number of nodes believing they own the
//! shard, every acked reading is in the dataset exactly once, and no reader ever
//! sees a partial or orphan file: objects appear whole (atomic put, rename, copy),
//! only after the head names the checkpoint that accounts for them. A failed
//! write inside a commit is handled the same way: the shard throws its memory
//! away and recovers from the store, if the head is still its own.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::checkpoint::{
    Checkpoint, DATASETS, Publish, checkpoint_dir, checkpoint_path, generation_of, published_of, published_path,
    staging_dir,
};
use super::error::ShardError;
use super::head::{Head, Writer, head_path};
use super::state::{Acks, SegmentConfig, ShardState};
use crate::analytics::Event;
use crate::inference::ModelRegistry;
use crate::lake::rows::WrittenBy;
use crate::lake::store::{Store, SwapError, Version};
use crate::telemetry::{CloudStats, events as ev};

/// Moves a committed file from staging to its place in the dataset. A move
/// another writer finished first (the node that claimed the shard, completing
/// the checkpoint its head names) counts as done: `false` then.
async fn move_to_place(store: &Store, p: &Publish) -> Result<bool, ShardError> {
    match store.rename_new(&p.staged, &p.published).await {
        Ok(()) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. } | object_store::Error::NotFound { .. })
            if store.exists(&p.published).await? =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// What a commit released: acks for gateways and alerts for the events it stored.
#[derive(Debug, Default)]
pub struct Committed {
    /// Bundle acks.
    pub acks: Acks,
    /// Events now durable in `events`, to publish as alerts.
    pub alerts: Vec<Event>,
}

/// Files every shard has published, by shard: (generation, object name).
#[derive(Clone, Debug, Default)]
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

/// How many times a claim is tried when the head keeps changing under it.
const CLAIM_ATTEMPTS: u32 = 8;

/// A shard's state, the lake it commits to, and its claim on the shard's head.
pub struct Shard {
    /// The pure state (ingest, dedupe, the open segment).
    pub state: ShardState,
    store: Store,
    stats: Arc<CloudStats>,
    writer: Writer,
    /// The head as this writer last wrote or read it, and that version.
    head: Head,
    version: Version,
    /// What scores the commit's closed windows (none: windows are not scored).
    models: Option<Arc<ModelRegistry>>,
}

/// Reads shard `id`'s head with its version. Without one (a lake written before
/// heads, or whose head was deleted) a head is made up from the newest
/// checkpoint found, with no version: the first claim creates it.
pub async fn read_head(store: &Store, id: u16, shard_count: u16) -> Result<(Head, Option<Version>), ShardError> {
    let path = head_path(id);
    match store.get_versioned(&path).await? {
        Some((bytes, version)) => {
            let head = Head::from_bytes(&bytes).map_err(|error| ShardError::DamagedHead { shard: id, path, error })?;
            if head.shard != id || head.shard_count != shard_count {
                return Err(ShardError::Inconsistent(format!(
                    "head of shard {}/{} found where shard {id}/{shard_count} was expected (shard_count changed?)",
                    head.shard, head.shard_count
                )));
            }
            Ok((head, Some(version)))
        }
        None => {
            let newest = store
                .list(&checkpoint_dir(id))
                .await?
                .into_iter()
                .filter_map(|p| generation_of(&p).map(|g| (g, p)))
                .max();
            Ok(match newest {
                Some((g, p)) => (Head::new(id, shard_count, g, Some(p)), None),
                None => (Head::new(id, shard_count, 0, None), None),
            })
        }
    }
}

impl Shard {
    /// Claims shard `id` for `node` (no lease) and recovers it; see [`Shard::open_with`].
    pub async fn open(
        store: Store,
        id: u16,
        shard_count: u16,
        node: &str,
        cfg: SegmentConfig,
        stats: Arc<CloudStats>,
    ) -> Result<Self, ShardError> {
        let published = Published::list(&store).await?;
        Self::open_with(store, id, shard_count, Writer::unleased(node), cfg, stats, &published).await
    }

    /// Claims shard `id` for `writer` (swaps the head to it: whoever held the shard
    /// before can no longer commit), then recovers it from the store: loads the
    /// checkpoint the head names, finishes its publishing, and removes staged files
    /// and checkpoints the head does not name. Refuses a shard whose datasets hold
    /// files beyond its checkpoint.
    pub async fn open_with(
        store: Store,
        id: u16,
        shard_count: u16,
        writer: Writer,
        cfg: SegmentConfig,
        stats: Arc<CloudStats>,
        published: &Published,
    ) -> Result<Self, ShardError> {
        let state = ShardState::new(id, shard_count, &writer.node, cfg, stats.clone());
        // A commit of the holder (or another claim) between the read and the
        // swap changes the version: read again and retry a few times.
        let mut attempts = 0;
        let (head, claimed, version) = loop {
            let (head, version) = read_head(&store, id, shard_count).await?;
            let claimed = head
                .claimed(&writer, fleetline_service::unix_ms() as i64)
                .map_err(|epoch| ShardError::Fenced { shard: id, by: format!("a holder under lease epoch {epoch}") })?;
            match store.swap(&head_path(id), version.as_ref(), Bytes::from(claimed.to_bytes())).await {
                Ok(v) => break (head, claimed, v),
                Err(SwapError::Lost { .. }) if attempts < CLAIM_ATTEMPTS => attempts += 1,
                Err(SwapError::Lost { .. }) => {
                    return Err(ShardError::Fenced { shard: id, by: "claims and commits that raced this one".into() });
                }
                Err(SwapError::Store(e)) => return Err(e.into()),
            }
        };
        stats.emit(ev::ShardClaimed {
            shard: id,
            claim: claimed.claim,
            epoch: claimed.epoch,
            from: head.owner.as_deref(),
            generation: claimed.generation,
        });
        let mut shard = Self { state, store, stats, writer, head: claimed, version, models: None };
        shard.load().await?;
        // Newest first: the message names the files furthest beyond.
        let generation = shard.state.generation();
        let mut beyond: Vec<&(u64, String)> = published.of(id).iter().filter(|(g, _)| *g > generation).collect();
        beyond.sort_by(|a, b| b.cmp(a));
        let beyond: Vec<String> = beyond.into_iter().map(|(_, p)| p.clone()).collect();
        if !beyond.is_empty() {
            let checkpoint = match &shard.head.checkpoint {
                None => "none found".to_string(),
                Some(p) => format!("{p}, generation {generation}"),
            };
            return Err(ShardError::AheadOfCheckpoint { shard: id, checkpoint, files: beyond });
        }
        Ok(shard)
    }

    /// This shard's id.
    pub fn id(&self) -> u16 {
        self.state.id()
    }

    /// Scores each commit's closed windows with what `models` has deployed.
    pub fn set_models(&mut self, models: Arc<ModelRegistry>) {
        self.models = Some(models);
    }

    /// The head as this writer holds it.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Drops everything in memory and reloads from the store (after a failed
    /// commit), if the head is still this writer's; [`ShardError::Fenced`] if not.
    pub async fn recover(&mut self) -> Result<(), ShardError> {
        let id = self.state.id();
        let (head, version) = read_head(&self.store, id, self.state.shard_count()).await?;
        let Some(version) = version.filter(|_| head.held_by(&self.writer, self.head.claim)) else {
            self.state.restore(None);
            return Err(ShardError::Fenced { shard: id, by: head.owner.unwrap_or_else(|| "nobody (released)".into()) });
        };
        self.head = head;
        self.version = version;
        self.load().await
    }

    /// Loads the head's checkpoint, finishes its moves, removes what it does not name.
    async fn load(&mut self) -> Result<(), ShardError> {
        let id = self.state.id();
        let ckpt = match &self.head.checkpoint {
            None => None,
            Some(path) => {
                let bytes = self
                    .store
                    .get(path)
                    .await?
                    .ok_or_else(|| ShardError::CheckpointLost { shard: id, path: path.clone() })?;
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
            && (c.shard != id || c.shard_count != self.state.shard_count() || c.generation != self.head.generation)
        {
            return Err(ShardError::Inconsistent(format!(
                "the head of shard {}/{} names a checkpoint of shard {}/{}, generation {} (head: {})",
                id,
                self.state.shard_count(),
                c.shard,
                c.shard_count,
                c.generation,
                self.head.generation
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
                // Another writer (the one fenced out) may finish this same move just now.
                if move_to_place(&self.store, p).await? {
                    tracing::info!(shard = id, file = p.published, "published a committed file after restart");
                }
            } else {
                return Err(ShardError::Inconsistent(format!(
                    "committed file {} is neither staged nor published",
                    p.published
                )));
            }
        }
        // Staged by a commit that never reached the head (a crash, or a writer
        // fenced out): not part of anything.
        let named: HashSet<&str> = publish.iter().map(|p| p.staged.as_str()).collect();
        for staged in self.store.list(&staging_dir(id)).await? {
            if !named.contains(staged.as_str()) {
                self.store.delete(&staged).await?;
                self.stats.emit(ev::OrphanRemoved { shard: id, file: &staged });
            }
        }
        // Every checkpoint but the head's is superseded or was never committed.
        for p in self.store.list(&checkpoint_dir(id)).await? {
            if generation_of(&p).is_some() && Some(&p) != self.head.checkpoint.as_ref() {
                self.store.delete(&p).await?;
            }
        }
        self.state.restore(ckpt);
        Ok(())
    }

    /// Commits the open segment (see the module docs); returns the acks it releases.
    /// On [`ShardError::Fenced`] another writer holds the shard: drop it, nothing
    /// it held is acked. On any other error nothing is acked and the caller must
    /// [`recover`](Self::recover).
    pub async fn commit(&mut self) -> Result<Committed, ShardError> {
        let (acks, rows) = self.state.take_segment();
        let requests = self.state.take_scoring();
        let Some(mut rows) = rows else { return Ok(Committed { acks, alerts: Vec::new() }) };
        if !requests.is_empty() {
            // The deployment as of now: a swap while this runs applies from
            // the next commit on.
            let active = self.models.as_ref().map(|m| m.active()).unwrap_or_default();
            let scored = tokio::task::spawn_blocking(move || crate::inference::stage::score(&active, &requests))
                .await
                .map_err(|e| ShardError::Inconsistent(format!("scoring task failed: {e}")))?;
            self.state.apply_scores(scored, &mut rows);
        }
        let id = self.state.id();
        let started = Instant::now();
        let generation = self.state.generation() + 1;
        let claim = self.head.claim;
        let stored_at = fleetline_service::unix_ms() as i64;
        let by = WrittenBy { node: self.writer.node.clone(), shard: id, generation, claim, epoch: self.writer.epoch };
        let (rows, files) = tokio::task::spawn_blocking(move || {
            let files = rows.encode(stored_at, &by);
            (rows, files)
        })
        .await
        .map_err(|e| ShardError::Inconsistent(format!("encoder task failed: {e}")))?;
        let files = files?;
        let mut publish = Vec::with_capacity(files.len());
        let mut written = 0u64;
        for (i, f) in files.into_iter().enumerate() {
            let staged = format!("{}/{generation:012}-{claim:08}-{i:03}.parquet", staging_dir(id));
            let published = published_path(f.dataset, &f.partition, id, generation);
            written += f.bytes.len() as u64;
            self.store.put(&staged, Bytes::from(f.bytes)).await?;
            publish.push(Publish { staged, published });
        }
        fault_point(CommitStep::Staged);
        let mut ckpt = self.state.checkpoint(generation, stored_at, publish, &rows);
        ckpt.claim = claim;
        ckpt.epoch = self.writer.epoch;
        // Create-only, under a name of this claim: no writer replaces another's.
        let path = checkpoint_path(id, generation, claim);
        self.store.put_new(&path, Bytes::from(ckpt.to_bytes())).await?;
        // The commit point: the head names the checkpoint, if it is still ours.
        let next = self.head.committed(generation, path.clone(), stored_at);
        match self.store.swap(&head_path(id), Some(&self.version), Bytes::from(next.to_bytes())).await {
            Ok(version) => {
                self.version = version;
            }
            Err(SwapError::Lost { .. }) => {
                // Fenced out: what this commit wrote is named by nothing; tidy it.
                for p in ckpt.publish.iter().map(|p| p.staged.as_str()).chain([path.as_str()]) {
                    let _ = self.store.delete(p).await;
                }
                self.state.restore(None);
                let by = read_head(&self.store, id, self.state.shard_count())
                    .await
                    .ok()
                    .and_then(|(h, _)| h.owner.map(|o| format!("{o} (claim {})", h.claim)))
                    .unwrap_or_else(|| "another writer".into());
                self.stats.emit(ev::FencedOut { shard: id, claim, generation, by: &by });
                return Err(ShardError::Fenced { shard: id, by });
            }
            Err(SwapError::Store(e)) => return Err(e.into()),
        }
        let previous = std::mem::replace(&mut self.head, next).checkpoint;
        fault_point(CommitStep::Checkpointed);
        // A node that claims the shard from here on finds this checkpoint under
        // the head and finishes these moves itself; whichever is first, each
        // file lands once, and this commit stands.
        for p in &ckpt.publish {
            move_to_place(&self.store, p).await?;
        }
        fault_point(CommitStep::Published);
        // Committed. The previous checkpoint is superseded; failing to delete it is harmless.
        if let Some(previous) = previous
            && let Err(e) = self.store.delete(&previous).await
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

    /// Lets go of the shard (a graceful handover): the head keeps its generation
    /// and names no owner, so the next owner claims it without waiting. Commit
    /// first: what the open segment holds is dropped unacked.
    pub async fn release(self) -> Result<(), ShardError> {
        let id = self.state.id();
        let next = self.head.released(fleetline_service::unix_ms() as i64);
        match self.store.swap(&head_path(id), Some(&self.version), Bytes::from(next.to_bytes())).await {
            Ok(_) => Ok(()),
            Err(SwapError::Lost { .. }) => Err(ShardError::Fenced { shard: id, by: "another writer".into() }),
            Err(SwapError::Store(e)) => Err(e.into()),
        }
    }
}
