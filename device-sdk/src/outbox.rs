//! Sealed batches waiting for the gateway to say they are durable.
//!
//! Entries leave the outbox only when an ack names them, or, under the drop-oldest
//! policy, when room is needed and the oldest is evicted and counted. Acks may name
//! entries in any order, so slots are freed out of order; the oldest is always the
//! lowest (epoch, seq).
//!
//! Pure: no I/O, no clock, no runtime.

#[derive(Clone, Copy, Default)]
struct Entry {
    used: bool,
    epoch: u32,
    seq: u32,
    samples: u16,
    len: u16,
    /// Device clock at which the entry is (re)sent next.
    due_ms: u64,
    sends: u32,
}

/// A batch leaving the outbox for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Released {
    /// Boot epoch.
    pub epoch: u32,
    /// Seq.
    pub seq: u32,
    /// Samples it held.
    pub samples: u16,
    /// Times it was published.
    pub sends: u32,
}

/// `O` slots of `B` bytes each.
pub(crate) struct Outbox<const B: usize, const O: usize> {
    entries: [Entry; O],
    bufs: [[u8; B]; O],
}

impl<const B: usize, const O: usize> Outbox<B, O> {
    pub(crate) const fn new() -> Self {
        Self {
            entries: [Entry { used: false, epoch: 0, seq: 0, samples: 0, len: 0, due_ms: 0, sends: 0 }; O],
            bufs: [[0; B]; O],
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.used).count()
    }

    /// A free slot's buffer, to seal a batch into.
    pub(crate) fn free_slot(&mut self) -> Option<usize> {
        self.entries.iter().position(|e| !e.used)
    }

    pub(crate) fn buf_mut(&mut self, slot: usize) -> &mut [u8; B] {
        &mut self.bufs[slot]
    }

    /// Marks a slot holding a freshly sealed batch, due for sending at `now_ms`.
    pub(crate) fn commit(&mut self, slot: usize, epoch: u32, seq: u32, samples: u16, len: usize, now_ms: u64) {
        self.entries[slot] = Entry { used: true, epoch, seq, samples, len: len as u16, due_ms: now_ms, sends: 0 };
    }

    fn oldest(&self) -> Option<usize> {
        self.entries.iter().enumerate().filter(|(_, e)| e.used).min_by_key(|(_, e)| (e.epoch, e.seq)).map(|(i, _)| i)
    }

    /// Evicts the oldest entry.
    pub(crate) fn evict_oldest(&mut self) -> Option<Released> {
        let i = self.oldest()?;
        Some(self.release(i))
    }

    fn release(&mut self, i: usize) -> Released {
        let e = self.entries[i];
        self.entries[i].used = false;
        Released { epoch: e.epoch, seq: e.seq, samples: e.samples, sends: e.sends }
    }

    /// Releases every entry `pred` selects; calls `each` per released entry.
    pub(crate) fn ack_where(&mut self, pred: impl Fn(u32, u32) -> bool, mut each: impl FnMut(Released)) {
        for i in 0..O {
            let e = self.entries[i];
            if e.used && pred(e.epoch, e.seq) {
                each(self.release(i));
            }
        }
    }

    /// The entry due soonest, if it is due at `now_ms`; marks it sent and schedules
    /// its re-send `resend_after_ms` later.
    pub(crate) fn take_due(&mut self, now_ms: u64, resend_after_ms: u64) -> Option<(usize, u32, bool)> {
        let i = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.used && e.due_ms <= now_ms)
            .min_by_key(|(_, e)| (e.due_ms, e.epoch, e.seq))
            .map(|(i, _)| i)?;
        let e = &mut self.entries[i];
        let resend = e.sends > 0;
        e.sends = e.sends.saturating_add(1);
        e.due_ms = now_ms.saturating_add(resend_after_ms);
        Some((i, e.seq, resend))
    }

    pub(crate) fn sealed(&self, slot: usize) -> &[u8] {
        &self.bufs[slot][..usize::from(self.entries[slot].len)]
    }

    /// Soonest time anything is due.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.entries.iter().filter(|e| e.used).map(|e| e.due_ms).min()
    }

    /// Makes everything due at `now_ms` (after a reconnect, nothing is in flight).
    pub(crate) fn all_due(&mut self, now_ms: u64) {
        for e in self.entries.iter_mut().filter(|e| e.used) {
            e.due_ms = e.due_ms.min(now_ms);
        }
    }

    /// Samples held.
    pub(crate) fn samples(&self) -> u32 {
        self.entries.iter().filter(|e| e.used).map(|e| u32::from(e.samples)).sum()
    }
}
