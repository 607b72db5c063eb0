//! Control messages to a device or gateway: selective acks and commands.
//!
//! ```text
//! sealed = header ‖ ChaCha20-Poly1305(body, aad = header, nonce = header.nonce) ‖ tag[16]
//! header = postcard(ControlHeader)   format, kind, sender, counter, nonce[12] (first byte 0x02)
//! ack    = varint n, n × (epoch, first_seq, count)      same bytes as postcard's Vec<(u32, u32, u32)>
//! cmd    = postcard(Command)
//! ```
//!
//! Control messages are sealed with the receiver's own key, so only a holder of that
//! key (the gateway or cloud that provisioned it) can make one. The sender picks a
//! random nonce (one whose first byte is the control domain, never equal to a batch
//! nonce) and a counter that only grows; receivers drop a message whose counter they
//! have already passed. Acks are also idempotent by design: they name (epoch, seq)
//! ranges that were durable, and a device never reuses an (epoch, seq), so even an
//! ack replayed to a receiver that forgot the counter can release nothing that is
//! not durable.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Nonce, Tag};
use serde::{Deserialize, Serialize};

use crate::WireError;
use crate::key::{DOMAIN_CONTROL, DeviceKey, NONCE_LEN, TAG_LEN};
use crate::varint::{Reader, Writer};

/// Version of the control layout described in this module.
pub const CONTROL_FORMAT: u8 = 1;

/// Most ranges an ack may carry; receivers reject more.
pub const MAX_ACK_RANGES: usize = 64;

/// Longest control header: format, kind, sender id, counter, nonce.
pub const MAX_CONTROL_HEADER_LEN: usize = 1 + 1 + 33 + 10 + NONCE_LEN;

/// Longest sealed ack with [`MAX_ACK_RANGES`] ranges.
pub const MAX_ACK_LEN: usize = MAX_CONTROL_HEADER_LEN + 2 + MAX_ACK_RANGES * 15 + TAG_LEN;

/// What a control message is; part of the authenticated header, so an ack can never
/// be taken for a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ControlKind {
    /// Selective acknowledgement of durable batches (`…/ack`).
    Ack = 1,
    /// A command (`…/cmd`).
    Command = 2,
    /// Cloud → gateway acknowledgement of bundles (`fleetline/v1/gw/{gateway}/ack`).
    BundleAck = 3,
}

/// The cleartext, authenticated header of a control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlHeader<'a> {
    /// [`CONTROL_FORMAT`].
    pub format: u8,
    /// A [`ControlKind`] as its number.
    pub kind: u8,
    /// Id of the gateway or cloud node that sent it.
    pub sender: &'a str,
    /// Grows with every message the sender sends.
    pub counter: u64,
    /// Random per message, first byte `0x02`.
    pub nonce: [u8; NONCE_LEN],
}

/// Batches `first..first + count` of boot epoch `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AckRange {
    /// Boot epoch.
    pub epoch: u32,
    /// First seq in the range.
    pub first: u32,
    /// Number of consecutive seqs, at least 1.
    pub count: u32,
}

impl AckRange {
    /// Whether (epoch, seq) is named by this range.
    pub fn contains(&self, epoch: u32, seq: u32) -> bool {
        epoch == self.epoch && seq >= self.first && u64::from(seq) < u64::from(self.first) + u64::from(self.count)
    }
}

/// A command to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Seal the open batch now.
    FlushNow,
    /// Change when batches are sealed; zero fields keep their current value.
    SetFlushPolicy {
        /// Most samples in a batch.
        max_samples: u16,
        /// Most sealed bytes in a batch.
        max_bytes: u16,
        /// Oldest sample age before a batch is sealed, in ms.
        max_age_ms: u32,
    },
    /// Change how long an unacknowledged batch waits before it is re-sent.
    SetResendAfter {
        /// Milliseconds.
        ms: u32,
    },
}

fn seal_with(
    out: &mut [u8],
    key: &DeviceKey,
    header: &ControlHeader<'_>,
    body: impl FnOnce(&mut Writer<'_>) -> Result<(), WireError>,
) -> Result<usize, WireError> {
    if header.nonce[0] != DOMAIN_CONTROL {
        return Err(WireError::Malformed("control nonce outside the control domain"));
    }
    crate::ids::ShortId::new(header.sender)?;
    let header_len = postcard::to_slice(header, out)
        .map_err(|_| WireError::BufferTooSmall { needed: MAX_CONTROL_HEADER_LEN })?
        .len();
    let mut w = Writer::new(out, header_len);
    body(&mut w)?;
    let body_end = w.pos();
    w.put(&[0; TAG_LEN])?;
    let (head, rest) = out.split_at_mut(header_len);
    let tag = key
        .cipher()
        .encrypt_in_place_detached(Nonce::from_slice(&header.nonce), head, &mut rest[..body_end - header_len])
        .map_err(|_| WireError::Malformed("control message too large"))?;
    out[body_end..body_end + TAG_LEN].copy_from_slice(&tag);
    Ok(body_end + TAG_LEN)
}

/// Seals an ack naming `ranges` into `out`; returns its length.
pub fn seal_ack(
    out: &mut [u8],
    key: &DeviceKey,
    sender: &str,
    counter: u64,
    nonce: [u8; NONCE_LEN],
    ranges: &[AckRange],
) -> Result<usize, WireError> {
    if ranges.len() > MAX_ACK_RANGES {
        return Err(WireError::TooLarge { len: ranges.len(), max: MAX_ACK_RANGES });
    }
    let header = ControlHeader { format: CONTROL_FORMAT, kind: ControlKind::Ack as u8, sender, counter, nonce };
    seal_with(out, key, &header, |w| {
        w.varint(ranges.len() as u64)?;
        for r in ranges {
            w.varint(u64::from(r.epoch))?;
            w.varint(u64::from(r.first))?;
            w.varint(u64::from(r.count))?;
        }
        Ok(())
    })
}

/// Seals a command into `out`; returns its length.
pub fn seal_command(
    out: &mut [u8],
    key: &DeviceKey,
    sender: &str,
    counter: u64,
    nonce: [u8; NONCE_LEN],
    command: &Command,
) -> Result<usize, WireError> {
    let header = ControlHeader { format: CONTROL_FORMAT, kind: ControlKind::Command as u8, sender, counter, nonce };
    seal_with(out, key, &header, |w| {
        let mut tmp = [0u8; 16];
        let bytes = postcard::to_slice(command, &mut tmp).map_err(|_| WireError::Malformed("command"))?;
        w.put(bytes)
    })
}

/// Seals a bundle ack naming `ids` into `out` (see `bundle::seal_bundle_ack`).
#[cfg(feature = "std")]
pub fn seal_bundle_ack_into(
    out: &mut [u8],
    key: &DeviceKey,
    sender: &str,
    counter: u64,
    nonce: [u8; NONCE_LEN],
    ids: &[crate::ids::BundleId],
) -> Result<usize, WireError> {
    let header = ControlHeader { format: CONTROL_FORMAT, kind: ControlKind::BundleAck as u8, sender, counter, nonce };
    seal_with(out, key, &header, |w| {
        w.varint(ids.len() as u64)?;
        for id in ids {
            w.varint(id.0)?;
        }
        Ok(())
    })
}

/// An opened control message.
#[derive(Clone, Copy, Debug)]
pub struct OpenControl<'a> {
    /// The authenticated header.
    pub header: ControlHeader<'a>,
    body: &'a [u8],
}

/// Verifies and decrypts a control message of the `expected` kind in place.
pub fn open_control<'a>(
    sealed: &'a mut [u8],
    key: &DeviceKey,
    expected: ControlKind,
) -> Result<OpenControl<'a>, WireError> {
    let (header_len, nonce) = {
        let (header, rest): (ControlHeader<'_>, &[u8]) =
            postcard::take_from_bytes(sealed).map_err(|_| WireError::Malformed("control header"))?;
        if header.format != CONTROL_FORMAT {
            return Err(WireError::UnsupportedFormat(header.format));
        }
        if header.kind != expected as u8 {
            return Err(WireError::WrongControlKind(header.kind));
        }
        if header.nonce[0] != DOMAIN_CONTROL {
            return Err(WireError::Malformed("control nonce outside the control domain"));
        }
        if rest.len() < TAG_LEN {
            return Err(WireError::Truncated);
        }
        (sealed.len() - rest.len(), header.nonce)
    };
    let body_end = sealed.len() - TAG_LEN;
    let (head, rest) = sealed.split_at_mut(header_len);
    let (body, tag) = rest.split_at_mut(body_end - header_len);
    key.cipher()
        .decrypt_in_place_detached(Nonce::from_slice(&nonce), head, body, Tag::from_slice(tag))
        .map_err(|_| WireError::AuthenticationFailed)?;
    let head: &'a [u8] = head;
    let header = postcard::from_bytes(head).map_err(|_| WireError::Malformed("control header"))?;
    Ok(OpenControl { header, body })
}

impl<'a> OpenControl<'a> {
    /// The ranges of an ack, validated up front so iteration cannot fail.
    pub fn ack_ranges(&self) -> Result<AckRanges<'a>, WireError> {
        let mut r = Reader::new(self.body);
        let n = r.varint()?;
        if n > MAX_ACK_RANGES as u64 {
            return Err(WireError::TooLarge { len: n as usize, max: MAX_ACK_RANGES });
        }
        let start = r.clone();
        for _ in 0..n {
            r.varint_u32()?;
            r.varint_u32()?;
            if r.varint_u32()? == 0 {
                return Err(WireError::Malformed("empty ack range"));
            }
        }
        if !r.is_empty() {
            return Err(WireError::Malformed("trailing bytes after ack ranges"));
        }
        Ok(AckRanges { reader: start, left: n as usize })
    }

    /// The bundle ids of a bundle ack.
    #[cfg(feature = "std")]
    pub fn bundle_ids(&self) -> Result<std::vec::Vec<crate::ids::BundleId>, WireError> {
        let mut r = Reader::new(self.body);
        let n = r.varint()?;
        if n > 100_000 {
            return Err(WireError::TooLarge { len: n as usize, max: 100_000 });
        }
        let mut ids = std::vec::Vec::with_capacity(n as usize);
        for _ in 0..n {
            ids.push(crate::ids::BundleId(r.varint()?));
        }
        if !r.is_empty() {
            return Err(WireError::Malformed("trailing bytes after bundle ids"));
        }
        Ok(ids)
    }

    /// The command in a command message.
    pub fn command(&self) -> Result<Command, WireError> {
        let (cmd, rest) = postcard::take_from_bytes(self.body).map_err(|_| WireError::Malformed("command"))?;
        if !rest.is_empty() {
            return Err(WireError::Malformed("trailing bytes after command"));
        }
        Ok(cmd)
    }
}

/// Iterator over the validated ranges of an ack.
#[derive(Clone)]
pub struct AckRanges<'a> {
    reader: Reader<'a>,
    left: usize,
}

impl Iterator for AckRanges<'_> {
    type Item = AckRange;

    fn next(&mut self) -> Option<AckRange> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated in `ack_ranges`, so these reads succeed.
        let epoch = self.reader.varint_u32().ok()?;
        let first = self.reader.varint_u32().ok()?;
        let count = self.reader.varint_u32().ok()?;
        Some(AckRange { epoch, first, count })
    }
}

/// A fresh random control nonce (first byte is the control domain).
#[cfg(feature = "std")]
pub fn random_nonce() -> Result<[u8; NONCE_LEN], WireError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|_| WireError::NoRandomness)?;
    n[0] = DOMAIN_CONTROL;
    Ok(n)
}

/// A control nonce from `random` bytes (from a cryptographic generator the
/// caller keeps, where one system call per nonce would cost too much): its first
/// byte becomes the control domain.
pub fn control_nonce(mut random: [u8; NONCE_LEN]) -> [u8; NONCE_LEN] {
    random[0] = DOMAIN_CONTROL;
    random
}

/// Compresses `(epoch, seq)` pairs into as few ranges as possible.
#[cfg(feature = "std")]
pub fn ranges_from(mut seqs: std::vec::Vec<(u32, u32)>) -> std::vec::Vec<AckRange> {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: std::vec::Vec<AckRange> = std::vec::Vec::new();
    for (epoch, seq) in seqs {
        match out.last_mut() {
            Some(r) if r.epoch == epoch && u64::from(r.first) + u64::from(r.count) == u64::from(seq) => r.count += 1,
            _ => out.push(AckRange { epoch, first: seq, count: 1 }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_body_is_postcards_vec_of_triples() {
        let key = DeviceKey::from_bytes([1; 32]);
        let ranges = [AckRange { epoch: 3, first: 200, count: 5 }, AckRange { epoch: 4, first: 0, count: 1 }];
        let mut nonce = [9u8; NONCE_LEN];
        nonce[0] = DOMAIN_CONTROL;
        let mut buf = [0u8; 256];
        let n = seal_ack(&mut buf, &key, "gw-1", 42, nonce, &ranges).unwrap();
        let opened = open_control(&mut buf[..n], &key, ControlKind::Ack).unwrap();
        let triples: std::vec::Vec<(u32, u32, u32)> = ranges.iter().map(|r| (r.epoch, r.first, r.count)).collect();
        assert_eq!(opened.body, &postcard::to_allocvec(&triples).unwrap()[..]);
        assert_eq!(opened.ack_ranges().unwrap().collect::<std::vec::Vec<_>>(), ranges);
        assert_eq!(opened.header.counter, 42);
        assert_eq!(opened.header.sender, "gw-1");
    }

    #[test]
    fn ack_cannot_be_opened_as_command() {
        let key = DeviceKey::from_bytes([1; 32]);
        let mut buf = [0u8; 256];
        let n = seal_ack(&mut buf, &key, "gw-1", 1, random_nonce().unwrap(), &[]).unwrap();
        assert_eq!(
            open_control(&mut buf[..n], &key, ControlKind::Command).unwrap_err(),
            WireError::WrongControlKind(1)
        );
    }

    #[test]
    fn ranges_compress_runs() {
        let r = ranges_from(vec![(1, 5), (1, 3), (1, 4), (2, 0), (1, 9), (1, 4)]);
        assert_eq!(
            r,
            vec![
                AckRange { epoch: 1, first: 3, count: 3 },
                AckRange { epoch: 1, first: 9, count: 1 },
                AckRange { epoch: 2, first: 0, count: 1 }
            ]
        );
    }
}

/// How far ahead of the last counter a sender reserves, in counter units
/// (microseconds: one minute), so it persists its high-water mark about once a
/// minute rather than once per message.
pub const COUNTER_RESERVE: u64 = 60_000_000;

/// The rule for counters of control messages a sender issues: microseconds of
/// its wall clock, strictly above every counter issued before, *across restarts*.
///
/// Receivers remember the highest counter per sender and drop anything at or below
/// it, so a sender whose clock stepped back (an NTP correction at boot, a dead RTC
/// battery) must not start below what it issued before it restarted. The sender
/// keeps a high-water mark on durable storage: before issuing a counter above the
/// mark it raises the mark ([`CounterCore::next`] says when) and persists it first;
/// after a restart it continues above the persisted mark, whatever its clock says.
/// Sans-IO: the clock is an argument, persisting is the caller's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterCore {
    last: u64,
    reserved: u64,
}

impl CounterCore {
    /// Continues above a persisted high-water mark (0 for a new sender).
    pub fn resume(high_water: u64) -> Self {
        Self { last: high_water, reserved: high_water }
    }

    /// The next counter at wall-clock `now_us`, and the new high-water mark to
    /// persist *before* the counter is used, when it had to be raised.
    pub fn next(&mut self, now_us: u64) -> (u64, Option<u64>) {
        let next = now_us.max(self.last.saturating_add(1));
        self.last = next;
        if next <= self.reserved {
            return (next, None);
        }
        self.reserved = next.saturating_add(COUNTER_RESERVE);
        (next, Some(self.reserved))
    }

    /// The last counter issued.
    pub fn last(&self) -> u64 {
        self.last
    }
}

#[cfg(test)]
mod counter_tests {
    use super::{COUNTER_RESERVE, CounterCore};

    #[test]
    fn counters_grow_across_a_restart_with_the_clock_stepped_back() {
        let mut c = CounterCore::resume(0);
        let t0 = 1_800_000_000_000_000;
        let (a, mark) = c.next(t0);
        assert_eq!((a, mark), (t0, Some(t0 + COUNTER_RESERVE)));
        let (b, none) = c.next(t0 + 5);
        assert_eq!((b, none), (t0 + 5, None), "within the reserve: nothing to persist");
        let (same, _) = c.next(t0);
        assert_eq!(same, t0 + 6, "a clock that stands still or steps back still moves the counter");
        // Restart with the clock two hours earlier: above everything issued.
        let mut r = CounterCore::resume(mark.unwrap());
        let (x, _) = r.next(t0 - 7_200_000_000);
        assert!(x > same);
        // Past the reserve, a new mark is due before the counter is used.
        let (y, m) = r.next(t0 + 3 * COUNTER_RESERVE);
        assert_eq!(m, Some(y + COUNTER_RESERVE));
    }
}
