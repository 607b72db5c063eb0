//! Sets of (epoch, seq) kept as ranges: what a receiver already holds of a device.
//!
//! Every receiver dedupes by (device, epoch, seq). Seqs mostly arrive in order, so
//! a device's set is usually one range per boot epoch however many batches it sent;
//! gaps (a device that dropped its oldest batch, a broker that skipped a message)
//! cost one range each until they fill.
//!
//! Pure: no I/O, no clock, no runtime.

use std::collections::BTreeMap;
use std::vec::Vec;

use serde::{Deserialize, Serialize};

/// Half-open ranges `start..end` of seqs, per boot epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSet {
    epochs: BTreeMap<u32, Vec<(u32, u32)>>,
}

impl SeqSet {
    /// Whether (epoch, seq) is in the set.
    pub fn contains(&self, epoch: u32, seq: u32) -> bool {
        self.epochs.get(&epoch).is_some_and(|ranges| {
            let i = ranges.partition_point(|(start, _)| *start <= seq);
            i > 0 && seq < ranges[i - 1].1
        })
    }

    /// Adds (epoch, seq); `false` if it was already there.
    pub fn insert(&mut self, epoch: u32, seq: u32) -> bool {
        let ranges = self.epochs.entry(epoch).or_default();
        let i = ranges.partition_point(|(start, _)| *start <= seq);
        if i > 0 && seq < ranges[i - 1].1 {
            return false;
        }
        let end = seq.saturating_add(1);
        let joins_prev = i > 0 && ranges[i - 1].1 == seq;
        let joins_next = i < ranges.len() && ranges[i].0 == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                ranges[i - 1].1 = ranges[i].1;
                ranges.remove(i);
            }
            (true, false) => ranges[i - 1].1 = end,
            (false, true) => ranges[i].0 = seq,
            (false, false) => ranges.insert(i, (seq, end)),
        }
        true
    }

    /// Keeps only the `n` newest epochs (older boots do not send any more) and
    /// returns the newest epoch it forgot, if any. A receiver must refuse every
    /// batch at or below that epoch from then on (its *epoch floor*): the set can
    /// no longer tell whether such a batch was stored, and storing it again is
    /// exactly what a replay of a captured batch aims at.
    pub fn retain_epochs(&mut self, n: usize) -> Option<u32> {
        let mut forgot = None;
        while self.epochs.len() > n {
            let Some(oldest) = self.epochs.keys().next().copied() else { break };
            self.epochs.remove(&oldest);
            forgot = Some(oldest);
        }
        forgot
    }

    /// The oldest epoch held.
    pub fn oldest_epoch(&self) -> Option<u32> {
        self.epochs.keys().next().copied()
    }

    /// Number of ranges held (memory is proportional to it).
    pub fn range_count(&self) -> usize {
        self.epochs.values().map(Vec::len).sum()
    }

    /// Number of (epoch, seq) pairs held.
    pub fn len(&self) -> u64 {
        self.epochs.values().flatten().map(|(s, e)| u64::from(e - s)).sum()
    }

    /// The highest (epoch, seq) held.
    pub fn newest(&self) -> Option<(u32, u32)> {
        let (epoch, ranges) = self.epochs.iter().rev().find(|(_, r)| !r.is_empty())?;
        Some((*epoch, ranges.last()?.1 - 1))
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.epochs.values().all(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newest_is_the_end_of_the_last_range_of_the_newest_epoch() {
        let mut s = SeqSet::default();
        assert_eq!(s.newest(), None);
        for (e, q) in [(1, 0), (1, 1), (2, 5), (2, 3), (1, 9)] {
            s.insert(e, q);
        }
        assert_eq!(s.newest(), Some((2, 5)));
    }

    #[test]
    fn ranges_merge() {
        let mut s = SeqSet::default();
        for seq in [0, 1, 2, 5, 4, 3, 10] {
            assert!(s.insert(1, seq));
        }
        assert!(!s.insert(1, 4));
        assert_eq!(s.range_count(), 2);
        assert_eq!(s.len(), 7);
        assert!(s.contains(1, 5) && !s.contains(1, 6) && !s.contains(2, 0));
        s.insert(2, 0);
        s.insert(3, 0);
        assert_eq!(s.retain_epochs(2), Some(1));
        assert_eq!(s.retain_epochs(2), None);
        assert!(!s.contains(1, 0) && s.contains(3, 0));
        assert_eq!(s.oldest_epoch(), Some(2));
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in prop::collection::vec((0u32..3, 0u32..64), 0..300)) {
            let mut s = SeqSet::default();
            let mut model = std::collections::BTreeSet::new();
            for (e, q) in ops {
                prop_assert_eq!(s.insert(e, q), model.insert((e, q)));
            }
            for e in 0..3 {
                for q in 0..64 {
                    prop_assert_eq!(s.contains(e, q), model.contains(&(e, q)));
                }
            }
            prop_assert_eq!(s.len(), model.len() as u64);
        }
    }
}
