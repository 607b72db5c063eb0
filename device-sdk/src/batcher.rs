//! The open batch: readings collected since the last seal, with an exact upper bound
//! on the sealed size so a batch never outgrows its buffer or the packet limit.
//!
//! Pure: no I/O, no clock, no runtime.

use fleetline_wire::batch::{MAX_SEALED_LEN, SERIES_OVERHEAD_BOUND, SampleCodec};
use fleetline_wire::key::TAG_LEN;
use fleetline_wire::signals::{SignalKind, WireType};
use fleetline_wire::varint::varint_len;
use fleetline_wire::{BatchHeader, BatchWriter, WireError};

#[derive(Clone, Copy, Default)]
struct Slot {
    /// Milliseconds from the batch's base time.
    t: i32,
    raw: i32,
    kind: u16,
}

/// A validated, quantized reading on its way into the batch.
pub(crate) struct NewSample {
    pub(crate) kind: SignalKind,
    pub(crate) wire: WireType,
    pub(crate) time_ms: u64,
    pub(crate) raw: i32,
}

/// The limits a batch is sealed at.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_samples: usize,
    pub(crate) max_sealed: usize,
    pub(crate) header_len: usize,
}

/// What adding a sample would need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fit {
    /// It fits into the open batch.
    Fits,
    /// The open batch must be sealed first.
    SealFirst,
}

/// Up to `N` samples of any kinds, in arrival order.
pub(crate) struct Batcher<const N: usize> {
    slots: [Slot; N],
    len: usize,
    base_time_ms: u64,
    /// Device clock when the first sample arrived, for flush-on-age.
    opened_at_ms: u64,
    /// Upper bound of the sealed size without the header.
    body_bound: usize,
}

impl<const N: usize> Batcher<N> {
    pub(crate) const fn new() -> Self {
        Self { slots: [Slot { t: 0, raw: 0, kind: 0 }; N], len: 0, base_time_ms: 0, opened_at_ms: 0, body_bound: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn opened_at_ms(&self) -> u64 {
        self.opened_at_ms
    }

    pub(crate) fn base_time_ms(&self) -> u64 {
        self.base_time_ms
    }

    /// Bytes a sample costs in the open batch, counting a new series' framing.
    fn cost(&self, kind: SignalKind, wire: WireType, t: i64, raw: i64) -> usize {
        let mut last = None;
        let mut before = None;
        for s in self.slots[..self.len].iter().rev() {
            if s.kind == kind.0 {
                if last.is_none() {
                    last = Some(*s);
                } else {
                    before = Some(s.t as i64);
                    break;
                }
            }
        }
        match last {
            Some(l) => SampleCodec::resume((i64::from(l.t), i64::from(l.raw)), before).cost(wire, t, raw),
            None => SERIES_OVERHEAD_BOUND + SampleCodec::default().cost(wire, t, raw),
        }
    }

    /// Whether `sample` fits within `limits`.
    pub(crate) fn fit(&self, sample: &NewSample, limits: Limits) -> Fit {
        if self.len == 0 {
            return Fit::Fits;
        }
        if self.len >= limits.max_samples.min(N) {
            return Fit::SealFirst;
        }
        let Some(t) = self.offset(sample.time_ms) else {
            return Fit::SealFirst;
        };
        let cost = self.cost(sample.kind, sample.wire, i64::from(t), i64::from(sample.raw));
        if limits.header_len + self.body_bound + cost + TAG_LEN > limits.max_sealed.min(MAX_SEALED_LEN) {
            return Fit::SealFirst;
        }
        Fit::Fits
    }

    fn offset(&self, time_ms: u64) -> Option<i32> {
        let d = i128::from(time_ms) - i128::from(self.base_time_ms);
        i32::try_from(d).ok()
    }

    /// Adds a sample; the caller has checked [`Batcher::fit`].
    pub(crate) fn push(&mut self, now_ms: u64, sample: &NewSample) {
        if self.len == 0 {
            self.base_time_ms = sample.time_ms;
            self.opened_at_ms = now_ms;
            self.body_bound = 0;
        }
        let Some(t) = self.offset(sample.time_ms) else { return };
        if self.len >= N {
            return;
        }
        self.body_bound += self.cost(sample.kind, sample.wire, i64::from(t), i64::from(sample.raw));
        self.slots[self.len] = Slot { t, raw: sample.raw, kind: sample.kind.0 };
        self.len += 1;
    }

    /// Writes the open batch as series grouped by kind, in order of each kind's first
    /// sample, and empties it.
    pub(crate) fn write_into(&mut self, w: &mut BatchWriter<'_>) -> Result<(), WireError> {
        let samples = &self.slots[..self.len];
        for (i, first) in samples.iter().enumerate() {
            if samples[..i].iter().any(|s| s.kind == first.kind) {
                continue;
            }
            w.begin_series(SignalKind(first.kind))?;
            for s in samples[i..].iter().filter(|s| s.kind == first.kind) {
                w.push(i64::from(s.t), i64::from(s.raw))?;
            }
        }
        self.len = 0;
        self.body_bound = 0;
        Ok(())
    }

    /// The header of the open batch.
    pub(crate) fn header<'a>(&self, fleet: &'a str, device: &'a str, epoch: u32, seq: u32) -> BatchHeader<'a> {
        batch_header(fleet, device, epoch, seq, self.base_time_ms)
    }
}

/// A schema-1 batch header.
pub(crate) fn batch_header<'a>(fleet: &'a str, device: &'a str, epoch: u32, seq: u32, base: u64) -> BatchHeader<'a> {
    BatchHeader {
        format: fleetline_wire::batch::BATCH_FORMAT,
        schema: fleetline_wire::SCHEMA_V1,
        fleet,
        device,
        epoch,
        seq,
        base_time_ms: base,
    }
}

/// Worst-case sealed size of a single sample, so a configured byte limit can be
/// checked to admit at least one.
pub(crate) const fn min_sealed_capacity() -> usize {
    fleetline_wire::batch::MAX_HEADER_LEN + SERIES_OVERHEAD_BOUND + 2 * varint_len(u64::MAX) + TAG_LEN
}
