//! On-disk formats of the queue: segment files and the ack ledger.
//!
//! ```text
//! segment = header record*
//! header  = "FLQS" version:u16le reserved:u16le first_id:u64le                 (16 bytes)
//! record  = len:u32le crc32c(len ‖ body):u32le body
//! body    = shard:u16le samples:u32le received_at_ms:u64le batch              (a sealed device batch)
//! ledger  = entry*,  entry = len:u32le crc32c(len ‖ body):u32le postcard(Vec<(first_id:u64, count:u32)>)
//! ```
//!
//! Records are appended and fsynced in groups; a crash can tear only the last
//! record of the active segment. Recovery keeps every record before the first one
//! that does not check out and truncates the rest.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::index::RecordMeta;

/// Segment file magic.
pub(crate) const MAGIC: &[u8; 4] = b"FLQS";
/// Segment format version.
pub(crate) const VERSION: u16 = 1;
/// Bytes of a segment header.
pub(crate) const HEADER_LEN: u64 = 16;
/// Bytes of a record's length and checksum.
pub(crate) const FRAME_LEN: usize = 8;
/// Bytes of the fixed part of a record body.
pub(crate) const META_LEN: usize = 2 + 4 + 8;
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

/// The body of a queued batch.
pub(crate) fn record_body(meta: &RecordMeta, batch: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(META_LEN + batch.len());
    b.extend_from_slice(&meta.shard.to_le_bytes());
    b.extend_from_slice(&meta.samples.to_le_bytes());
    b.extend_from_slice(&meta.received_at_ms.to_le_bytes());
    b.extend_from_slice(batch);
    b
}

/// Splits a record body into its metadata and batch.
pub(crate) fn parse_body(body: &[u8]) -> Option<(RecordMeta, &[u8])> {
    if body.len() < META_LEN {
        return None;
    }
    let shard = u16::from_le_bytes([body[0], body[1]]);
    let samples = u32::from_le_bytes(body[2..6].try_into().ok()?);
    let received_at_ms = u64::from_le_bytes(body[6..14].try_into().ok()?);
    Some((RecordMeta { shard, samples, received_at_ms }, &body[META_LEN..]))
}

/// What a scan of a segment or ledger file found.
#[derive(Debug)]
pub(crate) struct Scan {
    /// (offset, framed length, body) of each valid record, in order.
    pub(crate) records: Vec<(u64, u32, Vec<u8>)>,
    /// Length of the valid prefix; anything after it is torn or corrupt.
    pub(crate) valid_len: u64,
    /// Bytes after the valid prefix.
    pub(crate) torn_bytes: u64,
}

/// Reads framed records from `start` until the end or the first bad one.
pub(crate) fn scan_records(path: &Path, start: u64) -> io::Result<Scan> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut pos = start as usize;
    let mut records = Vec::new();
    while pos + FRAME_LEN <= data.len() {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
        let sum = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        let body_start = pos + FRAME_LEN;
        let Some(body) = data.get(body_start..body_start + len as usize) else { break };
        if len as usize > MAX_BODY || crc(len, body) != sum {
            break;
        }
        records.push((pos as u64, (FRAME_LEN + body.len()) as u32, body.to_vec()));
        pos = body_start + body.len();
    }
    let valid_len = pos.min(data.len()) as u64;
    Ok(Scan { records, valid_len, torn_bytes: data.len() as u64 - valid_len })
}

/// Reads and checks a segment header; `None` if missing, short or foreign.
pub(crate) fn read_header(path: &Path) -> io::Result<Option<u64>> {
    let mut h = [0u8; HEADER_LEN as usize];
    let mut f = File::open(path)?;
    match f.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if &h[..4] != MAGIC || u16::from_le_bytes([h[4], h[5]]) != VERSION {
        return Ok(None);
    }
    Ok(Some(u64::from_le_bytes(h[8..16].try_into().unwrap_or_default())))
}

/// Makes directory entries (creates, renames, deletes) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
