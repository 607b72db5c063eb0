//! How the rest of the node talks to a shard: a typed handle over its mailbox,
//! and the directory of the shards a node owns. Everything outside `shard/`
//! (ingest, HTTP, jobs, the node) reaches a shard only through these.

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

/// A shard's mailbox.
#[derive(Clone, Debug)]
pub struct ShardHandle {
    shard: u16,
    tx: mpsc::Sender<ShardMsg>,
}

impl ShardHandle {
    /// A handle and the receiving end of its mailbox, holding `depth` messages.
    pub fn channel(shard: u16, depth: usize) -> (Self, mpsc::Receiver<ShardMsg>) {
        let (tx, rx) = mpsc::channel(depth);
        (Self { shard, tx }, rx)
    }

    /// The shard.
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Hands a bundle to the shard, waiting while its mailbox is full (the
    /// back-pressure towards the broker).
    pub async fn bundle(&self, payload: Bytes) -> Result<(), ShardUnavailable> {
        self.tx.send(ShardMsg::Bundle { payload }).await.map_err(|_| self.stopped())
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
