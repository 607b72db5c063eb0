//! `fleetline-cloud check-generations`: proves from the lake alone that every
//! shard had one writer per generation and never forked.
//!
//! Every file a shard publishes carries, in its Parquet key-value metadata
//! (`fleetline.written_by`), the node, shard, generation, claim number and lease
//! epoch it was written under; every shard's head keeps its recent claims (who
//! claimed, and the generation each claim started after). The check reads both:
//!
//! 1. every published file is stamped, and its stamp names the shard and
//!    generation its object name carries;
//! 2. all files of one (shard, generation) share one writer (node and claim);
//! 3. along a shard's generations the claim never goes back (a writer fenced out
//!    by a newer claim never committed after it: no fork);
//! 4. each claim's generations lie inside its range by the head's history (after
//!    the generation it claimed at, up to the one the next claim started after),
//!    and its node is the one that made the claim;
//! 5. no file is of a generation beyond the shard's head.

use std::collections::BTreeMap;

use bytes::Bytes;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::Serialize;

use crate::lake::rows::{WRITTEN_BY, WrittenBy};
use crate::lake::store::Store;
use crate::shard::{Published, read_head};

/// What the check found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GenerationReport {
    /// Shards looked at.
    pub shards: u16,
    /// Published files read.
    pub files: usize,
    /// (shard, generation) pairs seen.
    pub generations: usize,
    /// Distinct claims that wrote files.
    pub claims: usize,
    /// Claims whose files fell outside the head's remembered history (older than
    /// it keeps): checked for order only.
    pub claims_beyond_history: usize,
    /// Every violation, in words; empty when the lake is sound.
    pub violations: Vec<String>,
}

impl GenerationReport {
    /// No violation.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

fn stamp_of(bytes: Bytes) -> Result<Option<WrittenBy>, String> {
    let reader = SerializedFileReader::new(bytes).map_err(|e| e.to_string())?;
    let kv = reader.metadata().file_metadata().key_value_metadata().cloned().unwrap_or_default();
    match kv.into_iter().find(|k| k.key == WRITTEN_BY).and_then(|k| k.value) {
        None => Ok(None),
        Some(v) => serde_json::from_str(&v).map(Some).map_err(|e| e.to_string()),
    }
}

/// Runs the check over shards `0..shard_count`.
pub async fn check(store: &Store, shard_count: u16) -> anyhow::Result<GenerationReport> {
    let mut report = GenerationReport { shards: shard_count, ..Default::default() };
    let published = Published::list(store).await?;
    for shard in 0..shard_count {
        let (head, _) = read_head(store, shard, shard_count).await?;
        // generation → (node, claim, first file seen)
        let mut writers: BTreeMap<u64, (String, u64, String)> = BTreeMap::new();
        for (generation, path) in published.of(shard) {
            report.files += 1;
            let Some(bytes) = store.get(path).await? else { continue };
            let stamp = match stamp_of(bytes) {
                Ok(Some(s)) => s,
                Ok(None) => {
                    report.violations.push(format!("{path}: no {WRITTEN_BY} stamp"));
                    continue;
                }
                Err(e) => {
                    report.violations.push(format!("{path}: unreadable ({e})"));
                    continue;
                }
            };
            if stamp.shard != shard || stamp.generation != *generation {
                report.violations.push(format!(
                    "{path}: stamped shard {} generation {}, named shard {shard} generation {generation}",
                    stamp.shard, stamp.generation
                ));
            }
            if *generation > head.generation {
                report.violations.push(format!(
                    "{path}: generation {generation} is beyond shard {shard}'s head ({})",
                    head.generation
                ));
            }
            match writers.get(generation) {
                Some((node, claim, first)) if (node, *claim) != (&stamp.node, stamp.claim) => {
                    report.violations.push(format!(
                        "shard {shard} generation {generation} has two writers: {node} claim {claim} ({first}) and \
                         {} claim {} ({path})",
                        stamp.node, stamp.claim
                    ));
                }
                Some(_) => {}
                None => {
                    writers.insert(*generation, (stamp.node.clone(), stamp.claim, path.clone()));
                }
            }
        }
        report.generations += writers.len();
        // Claims along the generations never go back.
        let mut last: Option<(u64, u64)> = None;
        for (g, (_, claim, path)) in &writers {
            if let Some((pg, pc)) = last
                && *claim < pc
            {
                report.violations.push(format!(
                    "shard {shard} forked: generation {g} ({path}) was written under claim {claim}, after \
                     generation {pg} under the newer claim {pc}"
                ));
            }
            last = Some((*g, *claim));
        }
        // Each claim's generations within its range by the head's history.
        let mut claims: BTreeMap<u64, Vec<(u64, &str)>> = BTreeMap::new();
        for (g, (node, claim, _)) in &writers {
            claims.entry(*claim).or_default().push((*g, node));
        }
        report.claims += claims.len();
        for (claim, gens) in &claims {
            let Some(i) = head.claims.iter().position(|c| c.claim == *claim) else {
                report.claims_beyond_history += 1;
                continue;
            };
            let c = &head.claims[i];
            let until = head.claims.get(i + 1).map_or(head.generation, |n| n.from_generation);
            for (g, node) in gens {
                if *g <= c.from_generation || *g > until {
                    report.violations.push(format!(
                        "shard {shard} generation {g} was written under claim {claim}, which held generations \
                         {}..={until}",
                        c.from_generation + 1
                    ));
                }
                if *node != c.owner {
                    report.violations.push(format!(
                        "shard {shard} generation {g}: written by {node} under claim {claim}, which {} made",
                        c.owner
                    ));
                }
            }
        }
    }
    Ok(report)
}
