//! The queue's bookkeeping without any I/O: which records exist, where they are,
//! which are acknowledged upstream, what the budget allows and which segment files
//! can go. The file layer asks it what to do and carries it out.
//!
//! Pure: no I/O, no clock, no runtime.

use std::collections::VecDeque;

/// A record's position in the queue; ids only grow, across segments and restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(pub u64);

/// What the gateway keeps per record besides its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordMeta {
    /// Shard the record is bundled under.
    pub shard: u16,
    /// Samples in the device batch, for counting drops.
    pub samples: u32,
    /// When the gateway received it, Unix ms.
    pub received_at_ms: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    offset: u32,
    len: u32,
    meta: RecordMeta,
    /// Done with: acknowledged upstream, or lost.
    acked: bool,
    /// Damaged on disk; never sent.
    lost: bool,
}

/// One segment file's records.
#[derive(Debug)]
pub(super) struct SegmentMeta {
    /// Id of the first record; also the file's name.
    pub(super) first: u64,
    slots: Vec<Slot>,
    unacked: usize,
    /// File size including the header.
    pub(super) bytes: u64,
}

impl SegmentMeta {
    fn new(first: u64, header_len: u64) -> Self {
        Self { first, slots: Vec::new(), unacked: 0, bytes: header_len }
    }

    fn end(&self) -> u64 {
        self.first + self.slots.len() as u64
    }
}

/// What appending a record of some size requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// Append to the active segment.
    Append,
    /// Start a new segment, then append.
    Roll,
    /// Delete the oldest segment first (drop-oldest policy); it holds unacked records.
    DropOldest,
    /// Over budget under back-pressure.
    Full,
}

/// A record leaving the queue unacknowledged, under drop-oldest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// Its id.
    pub id: RecordId,
    /// Its metadata.
    pub meta: RecordMeta,
}

/// All segments, oldest first; the last one is the active segment.
#[derive(Debug)]
pub(super) struct QueueIndex {
    segments: VecDeque<SegmentMeta>,
    next_id: u64,
    total_bytes: u64,
    budget: u64,
    segment_target: u64,
    header_len: u64,
}

impl QueueIndex {
    /// An empty queue whose next record id is `next_id`.
    pub(super) fn new(next_id: u64, budget: u64, segment_target: u64, header_len: u64) -> Self {
        Self { segments: VecDeque::new(), next_id, total_bytes: 0, budget, segment_target, header_len }
    }

    /// Bytes of all segment files.
    pub(super) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Id the next record gets.
    pub(super) fn next_id(&self) -> RecordId {
        RecordId(self.next_id)
    }

    /// Records not yet acknowledged upstream.
    pub(super) fn unacked(&self) -> usize {
        self.segments.iter().map(|s| s.unacked).sum()
    }

    /// Number of segment files.
    pub(super) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// First id of every segment, oldest first.
    pub(super) fn segment_firsts(&self) -> impl Iterator<Item = u64> + '_ {
        self.segments.iter().map(|s| s.first)
    }

    /// The lowest unacknowledged record.
    pub(super) fn first_unacked(&self) -> Option<RecordId> {
        for seg in self.segments.iter().filter(|s| s.unacked > 0) {
            if let Some(i) = seg.slots.iter().position(|s| !s.acked) {
                return Some(RecordId(seg.first + i as u64));
            }
        }
        None
    }

    /// Registers a segment found on disk (recovery) or just created; ids continue from it.
    pub(super) fn push_segment(&mut self, first: u64) {
        self.segments.push_back(SegmentMeta::new(first, self.header_len));
        self.total_bytes += self.header_len;
        self.next_id = self.next_id.max(first);
    }

    /// Registers a record already on disk (recovery) or just written.
    pub(super) fn push_record(&mut self, offset: u32, len: u32, meta: RecordMeta) -> RecordId {
        let id = self.next_id;
        if let Some(seg) = self.segments.back_mut() {
            seg.slots.push(Slot { offset, len, meta, acked: false, lost: false });
            seg.unacked += 1;
            seg.bytes += u64::from(len);
            self.total_bytes += u64::from(len);
        }
        self.next_id += 1;
        RecordId(id)
    }

    /// Registers the id of a record that recovery found damaged beyond reading: it
    /// keeps its place (ids stay dense) but is never read or sent.
    pub(super) fn push_lost(&mut self) -> RecordId {
        let id = self.next_id;
        if let Some(seg) = self.segments.back_mut() {
            seg.slots.push(Slot { offset: 0, len: 0, meta: RecordMeta::default(), acked: true, lost: true });
        }
        self.next_id += 1;
        RecordId(id)
    }

    /// Marks a live record lost (its bytes no longer check out); `false` if unknown or done.
    pub(super) fn mark_lost(&mut self, id: RecordId) -> bool {
        match self.slot_mut(id) {
            Some((seg, i)) if !seg.slots[i].acked => {
                seg.slots[i].acked = true;
                seg.slots[i].lost = true;
                seg.unacked -= 1;
                true
            }
            _ => false,
        }
    }

    /// Decides how a record of `len` framed bytes gets in.
    pub(super) fn admit(&self, len: u64, drop_oldest: bool) -> Admit {
        let roll = match self.segments.back() {
            None => true,
            Some(active) => active.bytes + len > self.segment_target && !active.slots.is_empty(),
        };
        let extra = if roll { self.header_len } else { 0 };
        if self.total_bytes + len + extra <= self.budget {
            return if roll { Admit::Roll } else { Admit::Append };
        }
        // Over budget: only whole older segments can be freed.
        if drop_oldest && self.segments.len() > 1 {
            return Admit::DropOldest;
        }
        if drop_oldest && roll && self.segments.len() == 1 {
            // Seal the lone active segment so it becomes droppable.
            return Admit::Roll;
        }
        Admit::Full
    }

    /// Removes the oldest segment, returning its unacknowledged records.
    pub(super) fn drop_oldest(&mut self) -> Option<(u64, Vec<Dropped>)> {
        if self.segments.len() < 2 {
            return None;
        }
        let seg = self.segments.pop_front()?;
        self.total_bytes -= seg.bytes;
        let dropped = seg
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.acked)
            .map(|(i, s)| Dropped { id: RecordId(seg.first + i as u64), meta: s.meta })
            .collect();
        Some((seg.first, dropped))
    }

    fn slot_mut(&mut self, id: RecordId) -> Option<(&mut SegmentMeta, usize)> {
        let idx = self.segments.partition_point(|s| s.end() <= id.0);
        let seg = self.segments.get_mut(idx)?;
        if id.0 < seg.first {
            return None;
        }
        let i = (id.0 - seg.first) as usize;
        (i < seg.slots.len()).then_some((seg, i))
    }

    /// Forgets records from `id` on (a failed write is rolled back). Only records
    /// of the active segment can be rolled back.
    pub(super) fn truncate_from(&mut self, id: RecordId) {
        if let Some(seg) = self.segments.back_mut()
            && id.0 >= seg.first
        {
            let keep = (id.0 - seg.first) as usize;
            for s in seg.slots.drain(keep.min(seg.slots.len())..) {
                seg.bytes -= u64::from(s.len);
                self.total_bytes -= u64::from(s.len);
                if !s.acked {
                    seg.unacked -= 1;
                }
            }
            self.next_id = id.0;
        }
    }

    /// Marks a record acknowledged upstream; `false` if unknown or already acked.
    pub(super) fn ack(&mut self, id: RecordId) -> bool {
        match self.slot_mut(id) {
            Some((seg, i)) if !seg.slots[i].acked => {
                seg.slots[i].acked = true;
                seg.unacked -= 1;
                true
            }
            _ => false,
        }
    }

    /// Where a live record is: (segment first id, offset, framed length, meta).
    pub(super) fn locate(&self, id: RecordId) -> Option<(u64, u32, u32, RecordMeta, bool)> {
        let idx = self.segments.partition_point(|s| s.end() <= id.0);
        let seg = self.segments.get(idx)?;
        let i = id.0.checked_sub(seg.first)? as usize;
        let s = seg.slots.get(i)?;
        Some((seg.first, s.offset, s.len, s.meta, s.acked))
    }

    /// Unacknowledged records with ids in `from..`, in id order.
    pub(super) fn unacked_from(&self, from: RecordId) -> impl Iterator<Item = (RecordId, RecordMeta)> + '_ {
        self.segments.iter().filter(move |s| s.end() > from.0 && s.unacked > 0).flat_map(move |seg| {
            seg.slots.iter().enumerate().filter_map(move |(i, s)| {
                let id = seg.first + i as u64;
                (id >= from.0 && !s.acked).then_some((RecordId(id), s.meta))
            })
        })
    }

    /// Sealed segments whose every record is acknowledged: safe to delete.
    pub(super) fn take_finished(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        let active = self.segments.back().map(|s| s.first);
        self.segments.retain(|s| {
            let done = s.unacked == 0 && Some(s.first) != active;
            if done {
                out.push(s.first);
            }
            !done
        });
        self.total_bytes = self.segments.iter().map(|s| s.bytes).sum();
        out
    }

    /// Acked ranges of live segments, for compacting the ack ledger.
    pub(super) fn acked_ranges(&self) -> Vec<(u64, u32)> {
        self.ranges(|s| s.acked && !s.lost)
    }

    /// Lost ranges of live segments, for compacting the loss ledger.
    pub(super) fn lost_ranges(&self) -> Vec<(u64, u32)> {
        self.ranges(|s| s.lost)
    }

    fn ranges(&self, pick: impl Fn(&Slot) -> bool) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        for seg in &self.segments {
            for (i, s) in seg.slots.iter().enumerate() {
                if !pick(s) {
                    continue;
                }
                let id = seg.first + i as u64;
                match out.last_mut() {
                    Some((start, n)) if *start + u64::from(*n) == id => *n += 1,
                    _ => out.push((id, 1)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 16;

    fn meta(samples: u32) -> RecordMeta {
        RecordMeta { shard: 0, samples, received_at_ms: 0 }
    }

    fn append(q: &mut QueueIndex, len: u32, drop: bool) -> Result<(RecordId, Vec<Dropped>), ()> {
        let mut dropped = vec![];
        loop {
            match q.admit(u64::from(len), drop) {
                Admit::Append => break,
                Admit::Roll => {
                    let next = q.next_id().0;
                    q.push_segment(next);
                    break;
                }
                Admit::DropOldest => dropped.extend(q.drop_oldest().unwrap().1),
                Admit::Full => return Err(()),
            }
        }
        let offset = 0;
        Ok((q.push_record(offset, len, meta(len)), dropped))
    }

    #[test]
    fn rolls_segments_and_deletes_fully_acked_ones_out_of_order() {
        let mut q = QueueIndex::new(0, 10_000, 100 + H, H);
        for _ in 0..6 {
            append(&mut q, 50, false).unwrap();
        }
        assert_eq!(q.segment_firsts().collect::<Vec<_>>(), [0, 2, 4]);
        // Acks arrive out of order; segment 2 finishes first.
        assert!(q.ack(RecordId(3)));
        assert!(q.ack(RecordId(2)));
        assert!(!q.ack(RecordId(2)), "double ack");
        assert!(!q.ack(RecordId(99)), "unknown");
        assert_eq!(q.take_finished(), [2]);
        assert_eq!(q.first_unacked(), Some(RecordId(0)));
        for id in [0, 1, 4, 5] {
            q.ack(RecordId(id));
        }
        // The active segment stays even when done.
        assert_eq!(q.take_finished(), [0]);
        assert_eq!(q.segment_count(), 1);
        assert_eq!(q.unacked(), 0);
        assert_eq!(q.total_bytes(), H + 100);
    }

    #[test]
    fn back_pressure_refuses_and_drop_oldest_evicts_whole_oldest_segments() {
        let mut q = QueueIndex::new(0, 3 * (100 + H), 100 + H, H);
        for _ in 0..6 {
            append(&mut q, 50, false).unwrap();
        }
        assert!(append(&mut q, 50, false).is_err(), "budget reached");
        let (id, dropped) = append(&mut q, 50, true).unwrap();
        assert_eq!(id, RecordId(6));
        assert_eq!(dropped.iter().map(|d| d.id.0).collect::<Vec<_>>(), [0, 1]);
        // Acked records in a dropped segment are not reported as dropped.
        q.ack(RecordId(2));
        let (_, dropped) = append(&mut q, 50, true).unwrap();
        let (_, dropped2) = append(&mut q, 50, true).unwrap();
        let all: Vec<u64> = dropped.iter().chain(&dropped2).map(|d| d.id.0).collect();
        assert_eq!(all, [3]);
        assert!(q.total_bytes() <= 3 * (100 + H));
    }

    #[test]
    fn unacked_scan_and_ledger_ranges() {
        let mut q = QueueIndex::new(10, 10_000, 1_000, H);
        for _ in 0..8 {
            append(&mut q, 10, false).unwrap();
        }
        for id in [11, 12, 13, 16] {
            q.ack(RecordId(id));
        }
        let ids: Vec<u64> = q.unacked_from(RecordId(12)).map(|(id, _)| id.0).collect();
        assert_eq!(ids, [14, 15, 17]);
        assert_eq!(q.acked_ranges(), [(11, 3), (16, 1)]);
        assert_eq!(q.locate(RecordId(14)).map(|l| l.4), Some(false));
        assert!(q.locate(RecordId(18)).is_none());
    }
}
