//! What a node knows of the cluster right now, shared by the task that manages
//! its shards (the writer) and the HTTP endpoint and metrics (readers).

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use super::config::Mode;
use super::members::{Member, Role, View};

/// Where one shard stands on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Local {
    /// Claiming its head and recovering.
    Acquiring,
    /// Owned: taking bundles.
    Owned,
    /// Handing over: committing, then releasing its head.
    Draining,
}

/// One shard on this node, since when (Unix ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LocalShard {
    /// State.
    pub state: Local,
    /// Since, Unix ms.
    pub since_ms: i64,
}

/// The node's picture of the cluster.
#[derive(Debug)]
pub struct ClusterState {
    /// This node.
    pub me: Member,
    /// How members are found.
    pub mode: Mode,
    /// Draining: tells peers to take its shards and give it none (a watch, so
    /// discovery learns it at once).
    leaving: tokio::sync::watch::Sender<bool>,
    /// Membership changes acted on.
    pub view_changes: AtomicU64,
    /// Shards taken over from a live or dead owner, or picked up after a release.
    pub acquired: AtomicU64,
    /// Shards handed over gracefully.
    pub released: AtomicU64,
    /// Shards lost to another node's claim.
    pub lost: AtomicU64,
    /// Kubernetes mode: this node holds the `jobs` singleton's lease.
    pub singleton_lease: AtomicBool,
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    view: Option<View>,
    view_since_ms: Option<i64>,
    raw: View,
    local: BTreeMap<u16, LocalShard>,
}

impl ClusterState {
    /// A node not yet in any view.
    pub fn new(me: Member, mode: Mode) -> Self {
        Self {
            me,
            mode,
            leaving: tokio::sync::watch::Sender::new(false),
            view_changes: AtomicU64::new(0),
            acquired: AtomicU64::new(0),
            released: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            singleton_lease: AtomicBool::new(false),
            inner: RwLock::default(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this node is draining.
    pub fn leaving(&self) -> bool {
        *self.leaving.borrow()
    }

    /// The node starts draining (for good).
    pub fn set_leaving(&self) {
        self.leaving.send_replace(true);
    }

    /// Follows the draining flag.
    pub fn watch_leaving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leaving.subscribe()
    }

    /// A new stable view, acted on at `now_ms`.
    pub fn set_view(&self, view: View, now_ms: i64) {
        let mut w = self.write();
        w.view = Some(view);
        w.view_since_ms = Some(now_ms);
        self.view_changes.fetch_add(1, Ordering::Relaxed);
    }

    /// The raw member set as discovered (not yet stable, maybe).
    pub fn set_raw(&self, raw: View) {
        self.write().raw = raw;
    }

    /// The stable view acted on, and since when (Unix ms).
    pub fn view(&self) -> Option<(View, i64)> {
        let r = self.read();
        Some((r.view.clone()?, r.view_since_ms?))
    }

    /// The raw member set.
    pub fn raw(&self) -> View {
        self.read().raw.clone()
    }

    /// Where `shard` stands here.
    pub fn local(&self, shard: u16) -> Option<LocalShard> {
        self.read().local.get(&shard).copied()
    }

    /// Every shard held here in some state.
    pub fn locals(&self) -> BTreeMap<u16, LocalShard> {
        self.read().local.clone()
    }

    /// Sets where `shard` stands (`None`: not held here).
    pub fn set_local(&self, shard: u16, state: Option<Local>, now_ms: i64) {
        let mut w = self.write();
        match state {
            Some(state) => {
                w.local.insert(shard, LocalShard { state, since_ms: now_ms });
            }
            None => {
                w.local.remove(&shard);
            }
        }
    }

    /// Whether this node runs the singletons of `role` (the lowest member with the
    /// role in the stable view).
    pub fn runs_singleton(&self, role: Role) -> bool {
        if self.leaving() || !self.me.has(role) {
            return false;
        }
        match self.mode {
            Mode::Single => true,
            Mode::Static => self.read().view.as_ref().and_then(|v| v.singleton(role)) == Some(self.me.id.as_str()),
            Mode::Kubernetes => self.singleton_lease.load(Ordering::Relaxed),
        }
    }
}
