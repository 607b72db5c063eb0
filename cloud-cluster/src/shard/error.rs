//! Why a shard could not commit or recover.

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
    Checkpoint(#[from] super::checkpoint::CheckpointError),
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
        error: super::checkpoint::CheckpointError,
    },
    /// The shard's head does not load.
    #[error(
        "head {path} of shard {shard} is damaged ({error}); the shard stays down. Delete it: the node then \
         adopts the newest checkpoint (and `fleetline-cloud repair --shard {shard}` if files are beyond it)"
    )]
    DamagedHead {
        /// Shard.
        shard: u16,
        /// The head object.
        path: String,
        /// What is wrong with it.
        error: super::head::HeadError,
    },
    /// The head names a checkpoint that is not in the store.
    #[error(
        "checkpoint {path} of shard {shard}, named by its head, is missing; the shard stays down. \
         `fleetline-cloud repair --shard {shard}` rebuilds its state from the datasets"
    )]
    CheckpointLost {
        /// Shard.
        shard: u16,
        /// The checkpoint object.
        path: String,
    },
    /// Another node claimed the shard: this one may no longer commit for it.
    #[error("shard {shard} was claimed by {by}; this node no longer writes it")]
    Fenced {
        /// Shard.
        shard: u16,
        /// Who holds it now, as far as known.
        by: String,
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
