//! The cluster layer: which node owns which shard, and who runs the singletons.
//! Liveness only: who *should* own a shard comes from here, but safety — never
//! two writers of one shard's generation — comes from the shard's head, advanced
//! by compare-and-swap (`shard::head`), whatever this layer believes.
//!
//! - [`members`] (pure): members, roles, views.
//! - [`stable`] (pure): act only on a member set that held still.
//! - [`placement`] (pure): rendezvous hashing and rounds of moves.
//! - [`discovery`]: finding members (`single`, `static` with HTTP probes).
//! - [`config`]: `[cluster]`. [`state`]: what the node knows now, for HTTP and metrics.

pub mod config;
pub mod discovery;
pub mod members;
pub mod placement;
pub mod stable;
pub mod state;

pub use config::{ClusterConfig, Mode};
pub use members::{Member, Role, View};
pub use state::{ClusterState, Local, LocalShard};
