//! On-disk formats of the queue: segment files and the ack ledger.
//!
//! ```text
//! segment = header record*
//! header  = "FLQS" version:u16le reserved:u16le first_id:u64le                 (16 bytes)
//! record  = len:u32le crc32c(len ‖ body):u32le body
//! body    = id:u64le shard:u16le samples:u32le received_at_ms:u64le batch     (version 2)
//!         |          shard:u16le samples:u32le received_at_ms:u64le batch     (version 1)
//! ledger  = entry*,  entry = len:u32le crc32c(len ‖ body):u32le postcard(Vec<(first_id:u64, count:u32)>)
//! ```
//!
//! Records are appended and fsynced in groups; a crash can tear only the last
//! records of the active segment. A damaged record (a flipped bit, a bad block) is
//! told apart from a torn tail by what follows it: the scan resynchronises on the
//! next offset whose length and checksum check out. If one does, the bytes between
//! are a hole and only the records in it are lost; if none does, they are a torn
//! tail and are cut. Version 2 records carry their id, so the records after a hole
//! keep their ids (and their acks in the ledger).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::index::RecordMeta;

/// Segment file magic.
pub(crate) const MAGIC: &[u8; 4] = b"FLQS";
/// Segment format version written.
pub(crate) const VERSION: u16 = 2;
/// The first segment format, still read: records without their id.
pub(crate) const VERSION_1: u16 = 1;
/// Bytes of a segment header.
pub(crate) const HEADER_LEN: u64 = 16;
/// Bytes of a record's length and checksum.
pub(crate) const FRAME_LEN: usize = 8;
/// Bytes of the metadata in a record body.
pub(crate) const META_LEN: usize = 2 + 4 + 8;
/// Bytes of the record id that starts a version 2 body.
pub(crate) const ID_LEN: usize = 8;
/// Largest record body accepted (a sealed batch is at most 64 KiB).
pub(crate) const MAX_BODY: usize = 1024 * 1024;

pub(crate) fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg").filter(|n| n.len() == 20).and_then(|n| n.parse().ok())
}

pub(crate) fn header(first: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&first.to_le_bytes());
    h
}

fn crc(len: u32, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), body)
}

/// Appends one framed record to `out`.
pub(crate) fn frame(out: &mut Vec<u8>, body: &[u8]) {
    let len = body.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc(len, body).to_le_bytes());
    out.extend_from_slice(body);
}

/// The body of a queued batch (version 2).
pub(crate) fn record_body(id: u64, meta: &RecordMeta, batch: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(ID_LEN + META_LEN + batch.len());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&meta.shard.to_le_bytes());
    b.extend_from_slice(&meta.samples.to_le_bytes());
    b.extend_from_slice(&meta.received_at_ms.to_le_bytes());
    b.extend_from_slice(batch);
    b
}

/// A record body taken apart.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Body<'a> {
    /// The record's id (version 2 only).
    pub(crate) id: Option<u64>,
    pub(crate) meta: RecordMeta,
    pub(crate) batch: &'a [u8],
}

/// Splits a record body of a segment of `version` into its parts.
pub(crate) fn parse_body(body: &[u8], version: u16) -> Option<Body<'_>> {
    let (id, rest) = if version >= VERSION {
        let (id, rest) = body.split_first_chunk::<ID_LEN>()?;
        (Some(u64::from_le_bytes(*id)), rest)
    } else {
        (None, body)
    };
    if rest.len() < META_LEN {
        return None;
    }
    let shard = u16::from_le_bytes([rest[0], rest[1]]);
    let samples = u32::from_le_bytes(rest[2..6].try_into().ok()?);
    let received_at_ms = u64::from_le_bytes(rest[6..14].try_into().ok()?);
    Some(Body { id, meta: RecordMeta { shard, samples, received_at_ms }, batch: &rest[META_LEN..] })
}

/// Checks one framed record at the start of `data`; its body if length and checksum hold.
pub(crate) fn check_frame(data: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?);
    let sum = u32::from_le_bytes(data.get(4..FRAME_LEN)?.try_into().ok()?);
    if len as usize > MAX_BODY {
        return None;
    }
    let body = data.get(FRAME_LEN..FRAME_LEN + len as usize)?;
    (crc(len, body) == sum).then_some(body)
}

/// Bytes between two valid records that do not check out: damaged records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hole {
    /// File offset of the first bad byte.
    pub(crate) offset: u64,
    /// The bad bytes.
    pub(crate) bytes: Vec<u8>,
}

/// What a scan of a segment or ledger file found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// (offset, framed length, body) of each valid record, in order.
    pub(crate) records: Vec<(u64, u32, Vec<u8>)>,
    /// Damaged stretches followed by a valid record, each before `records[at]`.
    pub(crate) holes: Vec<(usize, Hole)>,
    /// End of the last valid record; anything after it is a torn tail.
    pub(crate) valid_len: u64,
    /// Bytes after the last valid record.
    pub(crate) torn_bytes: u64,
    /// Those bytes (a torn tail, or the damaged end of a sealed segment).
    pub(crate) tail: Vec<u8>,
}

/// Reads framed records from `start` to the end of the file, resynchronising after
/// damaged bytes on the next offset where a whole record checks out.
pub(crate) fn scan_records(path: &Path, start: u64) -> io::Result<Scan> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    Ok(scan_bytes(&data, start as usize))
}

pub(crate) fn scan_bytes(data: &[u8], start: usize) -> Scan {
    let mut scan = Scan::default();
    let mut pos = start.min(data.len());
    let mut valid_end = pos;
    while pos < data.len() {
        if let Some(body) = check_frame(&data[pos..]) {
            let len = FRAME_LEN + body.len();
            if pos > valid_end {
                let hole = Hole { offset: valid_end as u64, bytes: data[valid_end..pos].to_vec() };
                scan.holes.push((scan.records.len(), hole));
            }
            scan.records.push((pos as u64, len as u32, body.to_vec()));
            pos += len;
            valid_end = pos;
        } else {
            pos += 1;
        }
    }
    scan.valid_len = valid_end as u64;
    scan.torn_bytes = (data.len() - valid_end) as u64;
    scan.tail = data[valid_end..].to_vec();
    scan
}

/// Reads and checks a segment header: (first id, format version); `None` if
/// missing, short or foreign.
pub(crate) fn read_header(path: &Path) -> io::Result<Option<(u64, u16)>> {
    let mut h = [0u8; HEADER_LEN as usize];
    let mut f = File::open(path)?;
    match f.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if &h[..4] != MAGIC || !(VERSION_1..=VERSION).contains(&version) {
        return Ok(None);
    }
    Ok(Some((u64::from_le_bytes(h[8..16].try_into().unwrap_or_default()), version)))
}

/// Makes directory entries (creates, renames, deletes) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
