//! A shard's head: the one object that says which generation of the shard is
//! committed and who may write the next one.
//!
//! ```text
//! _fleetline/checkpoints/shard-NNN/head.json
//! {"format":1,"shard":3,"shard_count":64,"generation":17,
//!  "checkpoint":"_fleetline/checkpoints/shard-003/000000000017-00000004.ckpt",
//!  "owner":"cloud-2","epoch":5,"claim":4,"at_ms":…,"claims":[…]}
//! ```
//!
//! The head only ever changes by compare-and-swap against the version its writer
//! read ([`Store::swap`](crate::lake::store::Store::swap)), so of two nodes that
//! both believe they own the shard, at most one advances it from any version:
//!
//! - **claim**: a new owner swaps in itself, the next claim number and its lease
//!   epoch, with generation and checkpoint unchanged, before it takes a bundle;
//!   every writer that held the shard before now fails its next swap;
//! - **commit**: the owner writes the generation's checkpoint under a name that
//!   carries its claim (create-only, so no writer can replace another's), then
//!   swaps the head to name it — the commit point;
//! - **release**: on a graceful handover the owner commits, then swaps the owner
//!   out, so the next claim does not have to wait for anything.
//!
//! Since every name a writer creates carries its claim number, a writer frozen
//! across a takeover and woken after old generations were pruned cannot re-create
//! a name anyone else uses; and whatever it writes, its swap fails, so nothing it
//! staged is ever named by the head. `claims` keeps the recent claims (which
//! generation each began at), for `/cluster/shards` and the generation checker.
//!
//! Pure: the format and the transitions; the commit protocol stores it.

use serde::{Deserialize, Serialize};

use super::checkpoint::checkpoint_dir;

/// Version of the head's layout.
pub const HEAD_FORMAT: u16 = 1;

/// How many claims a head remembers.
pub const CLAIMS_KEPT: usize = 256;

/// Where shard `shard`'s head lives (beside its checkpoints: whoever deletes the
/// checkpoints deletes the head with them).
pub fn head_path(shard: u16) -> String {
    format!("{}/head.json", checkpoint_dir(shard))
}

/// One claim of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Claim number (increases by one with every claim).
    pub claim: u64,
    /// Who claimed.
    pub owner: String,
    /// Their lease epoch (0 without leases).
    pub epoch: u64,
    /// The committed generation when it was claimed: the claim writes the ones after.
    pub from_generation: u64,
    /// When, Unix ms.
    pub at_ms: i64,
}

/// A shard's head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Layout version ([`HEAD_FORMAT`]).
    pub format: u16,
    /// Shard.
    pub shard: u16,
    /// Shards in the keyspace.
    pub shard_count: u16,
    /// Newest committed generation (0: nothing committed yet).
    pub generation: u64,
    /// That generation's checkpoint object (`None` before the first commit).
    pub checkpoint: Option<String>,
    /// Who holds the shard; `None` once released.
    pub owner: Option<String>,
    /// The holder's lease epoch (0 without leases; kept when released).
    pub epoch: u64,
    /// Number of the newest claim.
    pub claim: u64,
    /// When the head last changed, Unix ms.
    pub at_ms: i64,
    /// Recent claims, oldest first (at most [`CLAIMS_KEPT`]).
    pub claims: Vec<Claim>,
}

/// Why a head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// Not a head, or damaged.
    #[error("shard head damaged: {0}")]
    Damaged(String),
    /// Written by a newer version.
    #[error("shard head format {0} is newer than this build reads ({HEAD_FORMAT})")]
    Format(u16),
}

/// Who writes a shard: a node, under a lease epoch (0 without leases).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer {
    /// Node id.
    pub node: String,
    /// Lease epoch.
    pub epoch: u64,
}

impl Writer {
    /// A node without a lease.
    pub fn unleased(node: &str) -> Self {
        Self { node: node.into(), epoch: 0 }
    }
}

impl Head {
    /// The head of a shard nobody has written yet, or of one adopted from a
    /// checkpoint found without a head (written before heads existed).
    pub fn new(shard: u16, shard_count: u16, generation: u64, checkpoint: Option<String>) -> Self {
        Self {
            format: HEAD_FORMAT,
            shard,
            shard_count,
            generation,
            checkpoint,
            owner: None,
            epoch: 0,
            claim: 0,
            at_ms: 0,
            claims: Vec::new(),
        }
    }

    /// Serializes (JSON: operators read it).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data into a Vec cannot fail.
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses and checks a head.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HeadError> {
        #[derive(Deserialize)]
        struct Peek {
            format: u16,
        }
        let peek: Peek = serde_json::from_slice(bytes).map_err(|e| HeadError::Damaged(e.to_string()))?;
        if peek.format > HEAD_FORMAT {
            return Err(HeadError::Format(peek.format));
        }
        let head: Self = serde_json::from_slice(bytes).map_err(|e| HeadError::Damaged(e.to_string()))?;
        if head.checkpoint.is_none() != (head.generation == 0) {
            return Err(HeadError::Damaged("generation and checkpoint disagree".into()));
        }
        Ok(head)
    }

    /// Whether `writer` holds the shard under claim `claim`.
    pub fn held_by(&self, writer: &Writer, claim: u64) -> bool {
        self.owner.as_deref() == Some(writer.node.as_str()) && self.claim == claim && self.epoch == writer.epoch
    }

    /// The head after `writer` claims the shard at `now_ms`; refused (`Err`) when
    /// the head was claimed under a newer lease epoch than `writer`'s.
    pub fn claimed(&self, writer: &Writer, now_ms: i64) -> Result<Self, u64> {
        if writer.epoch < self.epoch {
            return Err(self.epoch);
        }
        let mut next = self.clone();
        next.format = HEAD_FORMAT;
        next.owner = Some(writer.node.clone());
        next.epoch = writer.epoch;
        next.claim = self.claim + 1;
        next.at_ms = now_ms;
        next.claims.push(Claim {
            claim: next.claim,
            owner: writer.node.clone(),
            epoch: writer.epoch,
            from_generation: self.generation,
            at_ms: now_ms,
        });
        if next.claims.len() > CLAIMS_KEPT {
            let extra = next.claims.len() - CLAIMS_KEPT;
            next.claims.drain(..extra);
        }
        Ok(next)
    }

    /// The head after its holder committed `generation` with checkpoint `checkpoint`.
    pub fn committed(&self, generation: u64, checkpoint: String, now_ms: i64) -> Self {
        Self { generation, checkpoint: Some(checkpoint), at_ms: now_ms, ..self.clone() }
    }

    /// The head after its holder let go.
    pub fn released(&self, now_ms: i64) -> Self {
        Self { owner: None, at_ms: now_ms, ..self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_commits_and_releases() {
        let a = Writer::unleased("a");
        let b = Writer { node: "b".into(), epoch: 3 };
        let h0 = Head::new(2, 8, 0, None);
        let h1 = h0.claimed(&a, 10).unwrap();
        assert!(h1.held_by(&a, 1) && !h1.held_by(&a, 0) && !h1.held_by(&b, 1));
        let h2 = h1.committed(1, "c1".into(), 11);
        assert!(h2.held_by(&a, 1));
        let h3 = h2.claimed(&b, 12).unwrap();
        assert_eq!((h3.claim, h3.generation, h3.epoch), (2, 1, 3));
        assert_eq!(h3.claims.iter().map(|c| (c.claim, c.from_generation)).collect::<Vec<_>>(), [(1, 0), (2, 1)]);
        // A writer under an older lease epoch cannot take it back.
        assert_eq!(h3.claimed(&a, 13), Err(3));
        let h4 = h3.released(14);
        assert!(h4.owner.is_none() && !h4.held_by(&b, 2));
        assert_eq!(Head::from_bytes(&h4.to_bytes()).unwrap(), h4);
    }

    #[test]
    fn damage_and_newer_formats_are_refused() {
        assert!(matches!(Head::from_bytes(b"{"), Err(HeadError::Damaged(_))));
        let mut h = Head::new(0, 1, 0, None);
        h.format = 9;
        assert!(matches!(Head::from_bytes(&h.to_bytes()), Err(HeadError::Format(9))));
        let mut h = Head::new(0, 1, 0, None);
        h.generation = 4;
        assert!(matches!(Head::from_bytes(&h.to_bytes()), Err(HeadError::Damaged(_))));
        let mut h = Head::new(0, 1, 0, None);
        for i in 0..CLAIMS_KEPT + 10 {
            h = h.claimed(&Writer::unleased("a"), i as i64).unwrap();
        }
        assert_eq!(h.claims.len(), CLAIMS_KEPT);
        assert_eq!(h.claims.last().map(|c| c.claim), Some(h.claim));
    }
}
