//! Device batches: the header, the series body, sealing and opening.
//!
//! ```text
//! sealed  = header ‖ ChaCha20-Poly1305(body, aad = header, nonce = 01 000000 epoch:be32 seq:be32) ‖ tag[16]
//! header  = postcard(BatchHeader)            format, schema, fleet, device, epoch, seq, base_time_ms
//! body    = series*                          until the tag
//! series  = postcard((kind: u16, samples: &[u8]))   i.e. varint kind, varint length, bytes
//! samples = first: zigzag(t0 - base) zigzag(v0)
//!           then:  zigzag(dt - prev_dt) zigzag(dv)  (dv wrapped for cyclic signals)
//! ```
//!
//! Each series is length-prefixed, so a receiver that does not know a kind skips it
//! and keeps its bytes. Timestamps are delta-of-delta: a sensor sampled at a steady
//! rate costs one byte per sample for its time.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Nonce, Tag};
use serde::{Deserialize, Serialize};

use crate::WireError;
use crate::key::{DeviceKey, TAG_LEN, batch_nonce};
use crate::signals::{self, SignalKind, WireType};
use crate::varint::{Reader, Writer, varint_len, zigzag};

/// Version of the batch layout described in this module.
pub const BATCH_FORMAT: u8 = 1;

/// Longest header: format, schema (3), two ids of 32 bytes with length bytes,
/// epoch and seq (5 each), base time (10).
pub const MAX_HEADER_LEN: usize = 1 + 3 + 2 * 33 + 5 + 5 + 10;

/// Bytes a series' kind and length prefix take at most, counted by the batcher's bound.
pub const SERIES_OVERHEAD_BOUND: usize = 3 + 3;

/// Longest sealed batch the formats allow; receivers reject anything larger.
pub const MAX_SEALED_LEN: usize = 64 * 1024;

/// The cleartext header of a sealed batch. It is the AEAD's associated data, so it
/// cannot be altered, and it is readable before opening so a receiver can pick the
/// device's key and dedupe by (device, epoch, seq).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader<'a> {
    /// [`BATCH_FORMAT`].
    pub format: u8,
    /// Schema id the kinds refer to ([`signals::SCHEMA_V1`] for this table).
    pub schema: u16,
    /// Fleet id.
    pub fleet: &'a str,
    /// Device id.
    pub device: &'a str,
    /// Boot epoch: incremented and persisted by the unit at every boot.
    pub epoch: u32,
    /// Batch sequence number within the epoch, from 0.
    pub seq: u32,
    /// Unix time in milliseconds that sample times are relative to.
    pub base_time_ms: u64,
}

impl BatchHeader<'_> {
    /// Exactly the bytes postcard writes for this header.
    pub fn encoded_len(&self) -> usize {
        1 + varint_len(u64::from(self.schema))
            + varint_len(self.fleet.len() as u64)
            + self.fleet.len()
            + varint_len(self.device.len() as u64)
            + self.device.len()
            + varint_len(u64::from(self.epoch))
            + varint_len(u64::from(self.seq))
            + varint_len(self.base_time_ms)
    }
}

/// Delta state of one series; the encoder and the batcher's size bound share it so
/// the bound can never disagree with what is written.
#[derive(Clone, Copy, Debug, Default)]
pub struct SampleCodec {
    started: bool,
    prev_t: i64,
    prev_dt: i64,
    prev_v: i64,
}

impl SampleCodec {
    /// The state after a series' last sample `(t, v)`, whose predecessor (if any) was
    /// at time `before_t`; lets a batcher price its next sample without re-encoding.
    pub fn resume(last: (i64, i64), before_t: Option<i64>) -> Self {
        Self { started: true, prev_t: last.0, prev_dt: before_t.map_or(0, |b| last.0.wrapping_sub(b)), prev_v: last.1 }
    }

    /// The two integers written for a sample at offset `t` with raw value `v`.
    pub fn deltas(&self, wire: WireType, t: i64, v: i64) -> (i64, i64) {
        if !self.started {
            return (t, v);
        }
        let dt = t.wrapping_sub(self.prev_t);
        let dv = match wire {
            WireType::Delta => v.wrapping_sub(self.prev_v),
            WireType::Cyclic { modulus } => {
                let d = (v.wrapping_sub(self.prev_v)).rem_euclid(modulus);
                if d >= modulus - modulus / 2 { d - modulus } else { d }
            }
        };
        (dt.wrapping_sub(self.prev_dt), dv)
    }

    /// Bytes the sample would take.
    pub fn cost(&self, wire: WireType, t: i64, v: i64) -> usize {
        let (a, b) = self.deltas(wire, t, v);
        varint_len(zigzag(a)) + varint_len(zigzag(b))
    }

    /// Records the sample as written.
    pub fn advance(&mut self, t: i64, v: i64) {
        if self.started {
            self.prev_dt = t.wrapping_sub(self.prev_t);
        }
        self.started = true;
        self.prev_t = t;
        self.prev_v = v;
    }

    /// Inverse of [`SampleCodec::deltas`] for the decoder.
    fn undo(&mut self, wire: WireType, a: i64, b: i64) -> Result<(i64, i64), WireError> {
        if !self.started {
            self.advance(a, b);
            return Ok((a, b));
        }
        let overflow = || WireError::Malformed("sample delta overflows");
        let dt = self.prev_dt.checked_add(a).ok_or_else(overflow)?;
        let t = self.prev_t.checked_add(dt).ok_or_else(overflow)?;
        let v = match wire {
            WireType::Delta => self.prev_v.checked_add(b).ok_or_else(overflow)?,
            WireType::Cyclic { modulus } => self.prev_v.checked_add(b).ok_or_else(overflow)?.rem_euclid(modulus),
        };
        self.advance(t, v);
        Ok((t, v))
    }
}

struct OpenSeries {
    kind_at: usize,
    len_at: usize,
    data_at: usize,
    wire: WireType,
    codec: SampleCodec,
}

/// Writes one batch into a caller's buffer, then seals it in place. No allocation.
pub struct BatchWriter<'a> {
    out: Writer<'a>,
    header_len: usize,
    epoch: u32,
    seq: u32,
    series: Option<OpenSeries>,
}

/// Reserved bytes for a series length before its size is known.
const LEN_RESERVE: usize = 3;

impl<'a> BatchWriter<'a> {
    /// Starts a batch with `header` at the front of `buf`.
    pub fn new(buf: &'a mut [u8], header: &BatchHeader<'_>) -> Result<Self, WireError> {
        let needed = MAX_HEADER_LEN.min(buf.len());
        let header_len = postcard::to_slice(header, buf).map_err(|_| WireError::BufferTooSmall { needed })?.len();
        Ok(Self { out: Writer::new(buf, header_len), header_len, epoch: header.epoch, seq: header.seq, series: None })
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.out.pos()
    }

    /// True before anything past the header is written.
    pub fn is_empty(&self) -> bool {
        self.out.pos() == self.header_len
    }

    /// Opens a series of `kind`; its wire type comes from the signal table.
    pub fn begin_series(&mut self, kind: SignalKind) -> Result<(), WireError> {
        if self.series.is_some() {
            self.end_series()?;
        }
        let spec = signals::spec(kind).ok_or(WireError::UnknownKind(kind.0))?;
        let kind_at = self.out.pos();
        self.out.varint(u64::from(kind.0))?;
        let len_at = self.out.pos();
        self.out.put(&[0; LEN_RESERVE])?;
        self.series = Some(OpenSeries {
            kind_at,
            len_at,
            data_at: self.out.pos(),
            wire: spec.wire,
            codec: SampleCodec::default(),
        });
        Ok(())
    }

    /// Appends a sample at `t_offset_ms` from the base time with fixed-point value `raw`.
    pub fn push(&mut self, t_offset_ms: i64, raw: i64) -> Result<(), WireError> {
        let series = self.series.as_mut().ok_or(WireError::Malformed("sample outside a series"))?;
        let (a, b) = series.codec.deltas(series.wire, t_offset_ms, raw);
        self.out.zigzag(a)?;
        self.out.zigzag(b)?;
        series.codec.advance(t_offset_ms, raw);
        Ok(())
    }

    /// Appends a series as already-encoded bytes, of any kind, known or not. Used to
    /// carry series of kinds this build does not know, and to build test input.
    pub fn raw_series(&mut self, kind: u16, samples: &[u8]) -> Result<(), WireError> {
        self.end_series()?;
        if samples.is_empty() {
            return Err(WireError::Malformed("empty series"));
        }
        self.out.varint(u64::from(kind))?;
        self.out.varint(samples.len() as u64)?;
        self.out.put(samples)
    }

    /// Closes the open series, writing its length and closing the reserved gap.
    pub fn end_series(&mut self) -> Result<(), WireError> {
        let Some(series) = self.series.take() else {
            return Ok(());
        };
        let data_len = self.out.pos() - series.data_at;
        if data_len == 0 {
            // An empty series carries nothing; drop its kind and reserved length.
            self.out.set_pos(series.kind_at);
            return Ok(());
        }
        let mut len_buf = [0u8; LEN_RESERVE];
        let n = {
            let mut w = Writer::new(&mut len_buf, 0);
            w.varint(data_len as u64).map_err(|_| WireError::Malformed("series longer than 2 MiB"))?;
            w.pos()
        };
        let end = self.out.pos();
        let buf = self.out.buf_mut();
        buf[series.len_at..series.len_at + n].copy_from_slice(&len_buf[..n]);
        buf.copy_within(series.data_at..end, series.len_at + n);
        self.out.set_pos(end - (LEN_RESERVE - n));
        Ok(())
    }

    /// Encrypts the body in place and appends the tag; returns the sealed length.
    pub fn seal(mut self, key: &DeviceKey) -> Result<usize, WireError> {
        self.end_series()?;
        let body_end = self.out.pos();
        let total = body_end + TAG_LEN;
        if total > MAX_SEALED_LEN {
            return Err(WireError::TooLarge { len: total, max: MAX_SEALED_LEN });
        }
        self.out.put(&[0; TAG_LEN])?;
        let nonce = batch_nonce(self.epoch, self.seq);
        let buf = self.out.buf_mut();
        let (header, rest) = buf.split_at_mut(self.header_len);
        let body = &mut rest[..body_end - self.header_len];
        let tag = key
            .cipher()
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), header, body)
            .map_err(|_| WireError::TooLarge { len: total, max: MAX_SEALED_LEN })?;
        buf[body_end..total].copy_from_slice(&tag);
        Ok(total)
    }
}

/// Reads the cleartext header of a sealed batch without opening it.
pub fn peek_header(sealed: &[u8]) -> Result<BatchHeader<'_>, WireError> {
    if sealed.len() > MAX_SEALED_LEN {
        return Err(WireError::TooLarge { len: sealed.len(), max: MAX_SEALED_LEN });
    }
    let (header, rest): (BatchHeader<'_>, &[u8]) =
        postcard::take_from_bytes(sealed).map_err(|_| WireError::Malformed("batch header"))?;
    if header.format != BATCH_FORMAT {
        return Err(WireError::UnsupportedFormat(header.format));
    }
    if rest.len() < TAG_LEN {
        return Err(WireError::Truncated);
    }
    crate::ids::ShortId::new(header.fleet)?;
    crate::ids::ShortId::new(header.device)?;
    Ok(header)
}

/// An opened batch: its authenticated header and decrypted body.
#[derive(Clone, Copy, Debug)]
pub struct OpenBatch<'a> {
    /// The header, authenticated.
    pub header: BatchHeader<'a>,
    /// The decrypted series bytes.
    pub body: &'a [u8],
}

/// Verifies and decrypts a sealed batch in place. Any change to any byte, a wrong
/// key or a truncation gives an error; nothing is returned unauthenticated.
pub fn open_batch<'a>(sealed: &'a mut [u8], key: &DeviceKey) -> Result<OpenBatch<'a>, WireError> {
    let (header_len, epoch, seq) = {
        let header = peek_header(sealed)?;
        let rest_len = postcard::take_from_bytes::<BatchHeader<'_>>(sealed)
            .map_err(|_| WireError::Malformed("batch header"))?
            .1
            .len();
        (sealed.len() - rest_len, header.epoch, header.seq)
    };
    let body_end = sealed.len() - TAG_LEN;
    let (head, rest) = sealed.split_at_mut(header_len);
    let (body, tag) = rest.split_at_mut(body_end - header_len);
    key.cipher()
        .decrypt_in_place_detached(Nonce::from_slice(&batch_nonce(epoch, seq)), head, body, Tag::from_slice(tag))
        .map_err(|_| WireError::AuthenticationFailed)?;
    let head: &'a [u8] = head;
    let body: &'a [u8] = body;
    let header = postcard::from_bytes::<BatchHeader<'a>>(head).map_err(|_| WireError::Malformed("batch header"))?;
    Ok(OpenBatch { header, body })
}

impl<'a> OpenBatch<'a> {
    /// The series in the body, in order; unknown kinds are yielded too.
    pub fn series(&self) -> SeriesIter<'a> {
        SeriesIter { reader: Reader::new(self.body) }
    }
}

/// One series as found in a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series<'a> {
    /// Kind id, known to this build or not.
    pub kind: SignalKind,
    /// Encoded samples, kept as is for kinds this build does not know.
    pub raw: &'a [u8],
}

impl<'a> Series<'a> {
    /// Decodes the samples; `None` when the kind is not in this build's table.
    pub fn samples(&self) -> Option<SampleIter<'a>> {
        let spec = signals::spec(self.kind)?;
        Some(SampleIter { reader: Reader::new(self.raw), wire: spec.wire, codec: SampleCodec::default() })
    }
}

/// Iterator over the series of a body.
pub struct SeriesIter<'a> {
    reader: Reader<'a>,
}

impl<'a> Iterator for SeriesIter<'a> {
    type Item = Result<Series<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.reader.is_empty() {
            return None;
        }
        let item = (|| {
            let kind =
                u16::try_from(self.reader.varint()?).map_err(|_| WireError::Malformed("kind exceeds 16 bits"))?;
            let len = usize::try_from(self.reader.varint()?).map_err(|_| WireError::Truncated)?;
            let raw = self.reader.take(len)?;
            if raw.is_empty() {
                return Err(WireError::Malformed("empty series"));
            }
            Ok(Series { kind: SignalKind(kind), raw })
        })();
        if item.is_err() {
            // Stop after the first error: the rest of the body has no known framing.
            self.reader = Reader::new(&[]);
        }
        Some(item)
    }
}

/// The `(t_offset_ms, raw)` samples of a series encoded as `wire`, whatever its
/// kind: for series of kinds this build does not know, decoded with a definition
/// from elsewhere (a schema registry).
pub fn series_samples(raw: &[u8], wire: WireType) -> SampleIter<'_> {
    SampleIter { reader: Reader::new(raw), wire, codec: SampleCodec::default() }
}

/// Iterator over `(t_offset_ms, raw)` samples of one known series.
pub struct SampleIter<'a> {
    reader: Reader<'a>,
    wire: WireType,
    codec: SampleCodec,
}

impl Iterator for SampleIter<'_> {
    type Item = Result<(i64, i64), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.reader.is_empty() {
            return None;
        }
        let item = (|| {
            let a = self.reader.zigzag()?;
            let b = self.reader.zigzag()?;
            self.codec.undo(self.wire, a, b)
        })();
        if item.is_err() {
            self.reader = Reader::new(&[]);
        }
        Some(item)
    }
}
