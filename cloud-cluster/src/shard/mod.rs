//! One shard: its owner's whole state, and the commit protocol.
//!
//! Bundles for the shard are opened here, every device batch inside verified
//! with its device's key and deduped by (device, epoch, seq); new readings go to
//! the open segment, whatever cannot be used to dead letters. A commit makes the
//! open segment durable and only then yields the bundle acks (the protocol:
//! [`commit`]).
//!
//! - [`handle`]: the typed mailbox; the only way in from outside `shard/`.
//! - [`task`]: the actor that owns a shard.
//! - [`state`] (pure): ingest, dedupe, validation, silence, the open segment.
//! - [`quota`] (pure): dead-letter bytes per sender. [`validate`] (pure): reading checks. [`replay`] (pure): dead letters taken in again.
//! - [`checkpoint`] (pure): the checkpoint format. [`head`] (pure): the head, its claims and fencing.
//! - [`commit`]: commit and recovery against the lake, with fault points.

pub mod checkpoint;
pub mod commit;
mod error;
pub mod handle;
pub mod head;
pub mod quota;
pub mod replay;
pub mod state;
pub mod task;
pub mod validate;

pub use commit::{Committed, Published, Shard, read_head};
pub use error::ShardError;
pub use handle::{Inbox, LoadSample, Released, ShardDirectory, ShardHandle, ShardLoad, ShardMsg, ShardUnavailable};
pub use quota::{DeadLetterConfig, DeadLetterQuota};
pub use state::{SegmentConfig, ShardState, ShardStatus, VehicleState};
pub use validate::ValidationConfig;
