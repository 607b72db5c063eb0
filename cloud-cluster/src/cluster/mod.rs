//! The cluster layer: which node owns which shard, and who runs the singletons.
//! Liveness only: who *should* own a shard comes from here, but safety — never
//! two writers of one shard's generation — comes from the shard's head, advanced
//! by compare-and-swap (`shard::head`), whatever this layer believes.
//!
//! - [`members`] (pure): members, roles, views.
//! - [`stable`] (pure): act only on a member set that held still.
//! - [`placement`] (pure): rendezvous hashing and rounds of moves.
//! - [`discovery`]: finding members (`single`, `static` with HTTP probes).
//! - [`kubernetes`] (feature `kubernetes`): members from pods, and Leases.
//! - [`config`]: `[cluster]`. [`state`]: what the node knows now, for HTTP and metrics.

pub mod config;
pub mod discovery;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod members;
pub mod placement;
pub mod stable;
pub mod state;

pub use config::{ClusterConfig, KubernetesConfig, Mode};
pub use members::{Member, Role, View};
pub use state::{ClusterState, Local, LocalShard};

/// Leases on shards (Kubernetes mode): a node takes a shard only under its lease,
/// renews it while it runs the shard, and releases it on handover.
pub trait ShardLeases: Send + Sync {
    /// Takes (or renews) the lease of `shard`; its epoch (the lease's transitions,
    /// at least `min_epoch`). `Err` says who holds it or why not.
    fn acquire(&self, shard: u16, min_epoch: u64) -> futures::future::BoxFuture<'_, Result<u64, String>>;
    /// Renews a held lease.
    fn renew(&self, shard: u16) -> futures::future::BoxFuture<'_, Result<(), RenewError>>;
    /// Lets go of a held lease.
    fn release(&self, shard: u16) -> futures::future::BoxFuture<'_, ()>;
}

/// Why a lease was not renewed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenewError {
    /// Someone else holds it now: stop at once.
    Lost(String),
    /// The API failed: the lease may still be ours until it expires.
    Failed(String),
}
