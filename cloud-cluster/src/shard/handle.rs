//! How the rest of the node talks to a shard: a typed handle over its mailbox,
//! and the directory of the shards a node owns. Everything outside `shard/`
//! (ingest, HTTP, jobs, the node) reaches a shard only through these.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::replay::{ReplayItem, ReplayOutcome};
use super::state::{ShardStatus, VehicleState};

/// Why a request to a shard was not carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardUnavailable {
    /// The shard cannot be opened (a damaged checkpoint, files beyond it, a store
    /// that cannot be read); it keeps trying.
    #[error("shard {shard} is down: {why}")]
    Down {
        /// Shard.
        shard: u16,
        /// Why.
        why: String,
    },
    /// The commit the request needed failed; the shard recovered from the store.
    #[error("shard {shard}: commit failed: {why}")]
    CommitFailed {
        /// Shard.
        shard: u16,
        /// The store's or encoder's error.
        why: String,
    },
    /// The shard's task has stopped (the node is shutting down).
    #[error("shard {shard} has stopped")]
    Stopped {
        /// Shard.
        shard: u16,
    },
    /// This node does not own the shard.
    #[error("shard {shard} is not owned by this node")]
    NotOwned {
        /// Shard.
        shard: u16,
    },
}

/// A reply to a request.
pub type Reply<T> = oneshot::Sender<Result<T, ShardUnavailable>>;

/// What a shard task is asked (its mailbox).
pub enum ShardMsg {
    /// A bundle from the shard's topic.
    Bundle {
        /// The sealed bundle as published.
        payload: Bytes,
    },
    /// Commit now; answers when done.
    Flush {
        /// Done, or why not.
        reply: Reply<()>,
    },
    /// Current status (a shard that is down does not answer).
    Status {
        /// The status.
        reply: oneshot::Sender<ShardStatus>,
    },
    /// A vehicle's latest state.
    Vehicle {
        /// Fleet.
        fleet: String,
        /// Device.
        device: String,
        /// Its state, if the shard knows it.
        reply: Reply<Option<VehicleState>>,
    },
    /// Hand the shard over: commit what is held (its acks go out), release the
    /// shard's head, and end.
    Release {
        /// Released, or why not (what was held stays unacked and comes again).
        reply: Reply<()>,
    },
    /// Dead letters to take in again under the newest schema of `subject`; answers
    /// once what was taken in is committed.
    Replay {
        /// The dead letters, all of devices of this shard.
        items: Vec<ReplayItem>,
        /// Subject to judge by.
        subject: String,
        /// What the replay did.
        reply: Reply<ReplayOutcome>,
    },
}

/// What a shard holds that is not committed yet, readable without asking its
/// task (which may be busy committing): bundles in its mailbox, and the open
/// segment as the task last left it. The load signals are read from here.
#[derive(Debug, Default)]
pub struct ShardLoad {
    inbox_bytes: AtomicU64,
    /// When each bundle in the mailbox was put there (the mailbox is FIFO).
    inbox_since: Mutex<VecDeque<Instant>>,
    open_rows: AtomicU64,
    open_bytes: AtomicU64,
    /// When the open segment was opened, as [`mono_ms`] + 1; 0: nothing open.
    open_since: AtomicU64,
}

/// Milliseconds on the process's monotonic clock (clock steps do not move it).
fn mono_ms(at: Instant) -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    at.saturating_duration_since(*BASE.get_or_init(Instant::now)).as_millis() as u64
}

/// A shard's load at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadSample {
    /// The shard.
    pub shard: u16,
    /// Rows in the open segment.
    pub open_rows: u64,
    /// Bytes taken and not committed: the open segment's bundles and those
    /// waiting in the mailbox.
    pub bytes: u64,
    /// Bundles waiting in the mailbox.
    pub inbox_bundles: u64,
    /// How long the oldest of them has waited here, ms: since the open segment
    /// was opened, or since the mailbox's oldest bundle was put there.
    pub oldest_wait_ms: u64,
}

impl ShardLoad {
    fn queued(&self, bytes: u64) {
        if let Ok(mut q) = self.inbox_since.lock() {
            q.push_back(Instant::now());
        }
        self.inbox_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn dequeued(&self, bytes: u64) {
        if let Ok(mut q) = self.inbox_since.lock() {
            q.pop_front();
        }
        self.inbox_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The task's note of its open segment: rows, bytes, and when it was opened
    /// (`None`: nothing open).
    pub fn set_open(&self, rows: u64, bytes: u64, opened_at: Option<Instant>) {
        self.open_rows.store(rows, Ordering::Relaxed);
        self.open_bytes.store(bytes, Ordering::Relaxed);
        self.open_since.store(opened_at.map_or(0, |t| mono_ms(t) + 1), Ordering::Relaxed);
    }

    /// The load now.
    pub fn sample(&self, shard: u16) -> LoadSample {
        let now = Instant::now();
        let since = self.open_since.load(Ordering::Relaxed);
        let open_wait = if since > 0 { mono_ms(now).saturating_sub(since - 1) } else { 0 };
        let (inbox_bundles, inbox_wait) = self.inbox_since.lock().map_or((0, 0), |q| {
            (q.len() as u64, q.front().map_or(0, |t| now.saturating_duration_since(*t).as_millis() as u64))
        });
        LoadSample {
            shard,
            open_rows: self.open_rows.load(Ordering::Relaxed),
            bytes: self.open_bytes.load(Ordering::Relaxed) + self.inbox_bytes.load(Ordering::Relaxed),
            inbox_bundles,
            oldest_wait_ms: open_wait.max(inbox_wait),
        }
    }
}

/// The receiving end of a shard's mailbox, keeping [`ShardLoad`]'s mailbox
/// figures as bundles are taken out.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<ShardMsg>,
    load: Arc<ShardLoad>,
}

impl Inbox {
    /// The next message (cancel-safe, as `mpsc::Receiver::recv`).
    pub async fn recv(&mut self) -> Option<ShardMsg> {
        let m = self.rx.recv().await;
        if let Some(ShardMsg::Bundle { payload }) = &m {
            self.load.dequeued(payload.len() as u64);
        }
        m
    }

    /// The shard's load, for the task to note its open segment in.
    pub fn load(&self) -> &ShardLoad {
        &self.load
    }
}

/// A shard's mailbox.
#[derive(Clone, Debug)]
pub struct ShardHandle {
    shard: u16,
    tx: mpsc::Sender<ShardMsg>,
    load: Arc<ShardLoad>,
}

impl ShardHandle {
    /// A handle and the receiving end of its mailbox, holding `depth` messages.
    pub fn channel(shard: u16, depth: usize) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(depth);
        let load = Arc::new(ShardLoad::default());
        (Self { shard, tx, load: load.clone() }, Inbox { rx, load })
    }

    /// The shard's load now, without asking its task.
    pub fn load(&self) -> LoadSample {
        self.load.sample(self.shard)
    }

    /// The shard.
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Hands a bundle to the shard, waiting while its mailbox is full (the
    /// back-pressure towards the broker).
    pub async fn bundle(&self, payload: Bytes) -> Result<(), ShardUnavailable> {
        let permit = self.tx.reserve().await.map_err(|_| self.stopped())?;
        self.load.queued(payload.len() as u64);
        permit.send(ShardMsg::Bundle { payload });
        Ok(())
    }

    /// Commits the shard now.
    pub async fn flush(&self) -> Result<(), ShardUnavailable> {
        self.ask(|reply| ShardMsg::Flush { reply }).await
    }

    /// The shard's status; `None` while it is down or stopped.
    pub async fn status(&self) -> Option<ShardStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ShardMsg::Status { reply }).await.ok()?;
        rx.await.ok()
    }

    /// A vehicle's latest state.
    pub async fn vehicle(&self, fleet: String, device: String) -> Result<Option<VehicleState>, ShardUnavailable> {
        self.ask(|reply| ShardMsg::Vehicle { fleet, device, reply }).await
    }

    /// Commits, releases the shard's head and ends the task (a graceful handover).
    pub async fn release(&self) -> Result<(), ShardUnavailable> {
        self.ask(|reply| ShardMsg::Release { reply }).await
    }

    /// Takes dead letters in again and commits them.
    pub async fn replay(&self, items: Vec<ReplayItem>, subject: String) -> Result<ReplayOutcome, ShardUnavailable> {
        self.ask(|reply| ShardMsg::Replay { items, subject, reply }).await
    }

    async fn ask<T>(&self, msg: impl FnOnce(Reply<T>) -> ShardMsg) -> Result<T, ShardUnavailable> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(msg(reply)).await.map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> ShardUnavailable {
        ShardUnavailable::Stopped { shard: self.shard }
    }
}

/// The shards of the keyspace, with a handle for each one this node owns. Shared:
/// every clone sees shards come and go as ownership changes.
#[derive(Clone, Debug)]
pub struct ShardDirectory {
    handles: std::sync::Arc<std::sync::RwLock<Vec<Option<ShardHandle>>>>,
}

impl ShardDirectory {
    /// A directory of `shard_count` shards, none owned yet.
    pub fn new(shard_count: u16) -> Self {
        Self { handles: std::sync::Arc::new(std::sync::RwLock::new(vec![None; usize::from(shard_count)])) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<ShardHandle>>> {
        self.handles.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Option<ShardHandle>>> {
        self.handles.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Owns `handle`'s shard.
    pub fn insert(&self, handle: ShardHandle) {
        if let Some(slot) = self.write().get_mut(usize::from(handle.shard)) {
            *slot = Some(handle);
        }
    }

    /// No longer owns `shard`.
    pub fn remove(&self, shard: u16) -> Option<ShardHandle> {
        self.write().get_mut(usize::from(shard)).and_then(Option::take)
    }

    /// Shards in the keyspace.
    pub fn shard_count(&self) -> u16 {
        self.read().len() as u16
    }

    /// The handle of `shard`, if owned here.
    pub fn get(&self, shard: u16) -> Result<ShardHandle, ShardUnavailable> {
        self.read().get(usize::from(shard)).cloned().flatten().ok_or(ShardUnavailable::NotOwned { shard })
    }

    /// The shard a device belongs to.
    pub fn shard_of(&self, fleet: &str, device: &str) -> u16 {
        fleetline_wire::shard::shard_of(fleet, device, self.shard_count()).0
    }

    /// The handle of the shard a device belongs to.
    pub fn of_device(&self, fleet: &str, device: &str) -> Result<ShardHandle, ShardUnavailable> {
        self.get(self.shard_of(fleet, device))
    }

    /// Every owned shard's handle.
    pub fn owned(&self) -> Vec<ShardHandle> {
        self.read().iter().flatten().cloned().collect()
    }

    /// Every owned shard's load now, without asking their tasks.
    pub fn loads(&self) -> Vec<LoadSample> {
        self.read().iter().flatten().map(ShardHandle::load).collect()
    }

    /// Commits every owned shard now (concurrently); one result per shard.
    pub async fn flush_all(&self) -> Vec<Result<(), ShardUnavailable>> {
        let owned = self.owned();
        futures::future::join_all(owned.iter().map(ShardHandle::flush)).await
    }

    /// Status of every owned shard that answers.
    pub async fn statuses(&self) -> Vec<ShardStatus> {
        let owned = self.owned();
        futures::future::join_all(owned.iter().map(ShardHandle::status)).await.into_iter().flatten().collect()
    }
}

/// What shards release after a commit, for the node's MQTT session to publish.
#[derive(Debug)]
pub enum Released {
    /// Bundle acks for a gateway.
    Acks {
        /// Gateway id.
        gateway: String,
        /// Bundles now durable.
        ids: Vec<fleetline_wire::bundle::BundleId>,
    },
    /// An alert for a stored event.
    Alert(crate::analytics::Event),
    /// The node is stopping: everything released before this is published; the
    /// session then disconnects, and `done` is answered once that is under way.
    EndOfStream {
        /// Answered when the disconnect is queued behind the last publish.
        done: tokio::sync::oneshot::Sender<()>,
    },
}
