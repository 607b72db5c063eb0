//! The queue's files, driven by [`QueueIndex`]: appends buffered per group commit,
//! fsync, the ack ledger, recovery and segment deletion. Synchronous; the actor in
//! `mod.rs` runs it on its own thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::file::{self, HEADER_LEN};
use super::index::{Admit, Dropped, QueueIndex, RecordId, RecordMeta};
use super::{FullPolicy, QueueConfig, QueueError};

/// Compact the ledger once it is this large and segments have gone since.
const LEDGER_COMPACT_BYTES: u64 = 1024 * 1024;
/// Ids acknowledged upstream.
const ACK_LEDGER: &str = "acks.log";
/// Ids of damaged records already reported lost, so each loss is reported once.
const LOSS_LEDGER: &str = "lost.log";

/// Recovery of one segment: what its damage costs.
struct SegmentRecovery<'a> {
    path: &'a Path,
    version: u16,
    acked: &'a IdRanges,
    known_lost: &'a IdRanges,
    report: &'a mut RecoveryReport,
    pending_lost: &'a mut Vec<(u64, u32)>,
    /// False after damage in a version 1 segment: the ids of later records are a
    /// guess, so their acks are not trusted (they are sent again; upstream dedupes).
    ids_reliable: bool,
}

impl SegmentRecovery<'_> {
    /// `bytes` at `offset` do not check out and stand for `lost_ids` records.
    fn damage(&mut self, index: &mut QueueIndex, offset: u64, bytes: &[u8], lost_ids: u64) {
        self.report.damaged_bytes += bytes.len() as u64;
        let first_lost = index.next_id().0;
        let (mut lost, mut delivered, mut known) = (0u64, 0u64, 0u64);
        for _ in 0..lost_ids {
            let id = index.push_lost().0;
            if self.known_lost.contains(id) {
                known += 1;
            } else if self.ids_reliable && self.acked.contains(id) {
                delivered += 1;
            } else {
                lost += 1;
                push_range(self.pending_lost, id);
            }
        }
        self.report.lost += lost as usize;
        self.report.damaged_acked += delivered as usize;
        let ids = first_lost..first_lost + lost_ids;
        let first_record = describe_damaged(bytes, self.version);
        if lost > 0 {
            tracing::error!(
                segment = %self.path.display(),
                offset,
                bytes = bytes.len(),
                ?ids,
                lost,
                first_record,
                "damaged records in the disk queue: lost"
            );
        } else if delivered > 0 {
            tracing::warn!(
                segment = %self.path.display(),
                offset,
                bytes = bytes.len(),
                ?ids,
                "damaged records in the disk queue were already delivered upstream; nothing lost"
            );
        } else if known == 0 {
            tracing::warn!(segment = %self.path.display(), offset, bytes = bytes.len(), "damaged bytes between records skipped");
        }
    }
}

/// The format of a segment whose header is damaged: version 2 if its first valid
/// record carries an id at or after the segment's first.
fn guess_version(path: &Path, first: u64) -> io::Result<u16> {
    let scan = file::scan_records(path, HEADER_LEN)?;
    let v2 = scan
        .records
        .first()
        .and_then(|(_, _, body)| file::parse_body(body, file::VERSION))
        .and_then(|b| b.id)
        .is_some_and(|id| id >= first && id - first < 1 << 32);
    Ok(if v2 { file::VERSION } else { file::VERSION_1 })
}

/// What recovery found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files found.
    pub segments: usize,
    /// Records still unacknowledged upstream.
    pub unacked: usize,
    /// Records already acknowledged (their segment was not yet deleted).
    pub acked: usize,
    /// Bytes truncated from torn tails.
    pub truncated_bytes: u64,
    /// Segment files without a valid header (a crash during creation), removed.
    pub removed_empty: usize,
    /// Records found damaged (their bytes do not check out) that were not yet
    /// acknowledged upstream: lost. Each is logged with its device and seq where
    /// those can still be read, and reported once (the loss ledger remembers it).
    pub lost: usize,
    /// Damaged records that had already been acknowledged upstream: nothing lost.
    pub damaged_acked: usize,
    /// Damaged stretches of bytes between valid records.
    pub damaged_bytes: u64,
}

/// Ranges of record ids, as the ack and loss ledgers hold them.
#[derive(Default)]
struct IdRanges(Vec<(u64, u32)>);

impl IdRanges {
    /// Reads a ledger file, cutting a torn tail; a damaged entry loses only itself.
    fn read(path: &Path, report: &mut RecoveryReport) -> io::Result<Self> {
        let mut ranges = Vec::new();
        if path.exists() {
            let scan = file::scan_records(path, 0)?;
            for (_, hole) in &scan.holes {
                tracing::warn!(
                    ledger = %path.display(),
                    offset = hole.offset,
                    bytes = hole.bytes.len(),
                    "damaged entry in a queue ledger skipped"
                );
            }
            for (_, _, body) in &scan.records {
                if let Ok(r) = postcard::from_bytes::<Vec<(u64, u32)>>(body) {
                    ranges.extend(r);
                }
            }
            if scan.torn_bytes > 0 {
                truncate(path, scan.valid_len)?;
                report.truncated_bytes += scan.torn_bytes;
            }
        }
        ranges.sort_unstable();
        Ok(Self(ranges))
    }

    fn contains(&self, id: u64) -> bool {
        let i = self.0.partition_point(|(start, _)| *start <= id);
        i > 0 && {
            let (start, n) = self.0[i - 1];
            id < start + u64::from(n)
        }
    }
}

/// Appends `id` to a list of ranges, merging with the last one.
fn push_range(ranges: &mut Vec<(u64, u32)>, id: u64) {
    match ranges.last_mut() {
        Some((start, count)) if *start + u64::from(*count) == id => *count += 1,
        _ => ranges.push((id, 1)),
    }
}

/// Device, epoch and seq of a damaged record, as far as its bytes still say.
fn describe_damaged(bytes: &[u8], version: u16) -> String {
    let body = bytes.get(file::FRAME_LEN..).unwrap_or_default();
    let Some(parsed) = file::parse_body(body, version) else { return "unreadable".into() };
    match fleetline_wire::peek_header(parsed.batch) {
        Ok(h) => format!("{}/{} epoch {} seq {}", h.fleet, h.device, h.epoch, h.seq),
        Err(_) => "unreadable".into(),
    }
}

/// Segments of the first format, by first id: records without ids, read differently.
type Versions = std::collections::HashMap<u64, u16>;

pub(crate) struct DiskQueue {
    dir: PathBuf,
    cfg: QueueConfig,
    index: QueueIndex,
    /// The active segment and its committed length.
    active: Option<(u64, File, u64)>,
    /// Framed records not yet written, and their first id.
    buffer: Vec<u8>,
    buffer_first: Option<RecordId>,
    ledger: File,
    ledger_len: u64,
    pending_acks: Vec<(u64, u32)>,
    /// Ids found lost and not yet in the loss ledger.
    pending_lost: Vec<(u64, u32)>,
    /// Records lost since start (recovery and reads).
    lost: u64,
    /// Format version of segments not written in the current one.
    versions: Versions,
    dir_dirty: bool,
    deleted_since_compaction: bool,
    /// Read handles of sealed segments, opened on demand.
    readers: std::collections::HashMap<u64, File>,
    /// A write to the active segment failed: start a new one before the next append,
    /// so one bad file (a file-size limit, a bad block) does not stop the queue.
    roll_next: bool,
}

impl DiskQueue {
    /// Opens (or creates) the queue in `cfg.dir`, recovering what is there.
    /// `on_unacked` sees every unacknowledged record, in id order.
    pub(crate) fn open(
        cfg: QueueConfig,
        mut on_unacked: impl FnMut(RecordId, RecordMeta, &[u8]),
    ) -> Result<(Self, RecoveryReport), QueueError> {
        let dir = cfg.dir.clone();
        let io = |e: io::Error| QueueError::Io { path: dir.clone(), error: e.to_string() };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut report = RecoveryReport::default();

        // The ledgers first: which ids are acknowledged, which already reported lost.
        let acked = IdRanges::read(&dir.join(ACK_LEDGER), &mut report).map_err(io)?;
        let known_lost = IdRanges::read(&dir.join(LOSS_LEDGER), &mut report).map_err(io)?;

        let mut firsts: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter_map(|e| file::parse_segment_name(&e.file_name().to_string_lossy()))
            .collect();
        firsts.sort_unstable();

        let mut index = QueueIndex::new(0, cfg.budget_bytes, cfg.segment_bytes, HEADER_LEN);
        let mut versions = Versions::new();
        let mut pending_lost = Vec::new();
        let mut last_len = 0;
        // Headers first: a stub left by a crash during creation is no segment (and
        // must not bound the ids of the one before it).
        let mut found: Vec<(u64, u16)> = Vec::new();
        for first in firsts {
            let path = file::segment_path(&dir, first);
            let version = match file::read_header(&path).map_err(io)? {
                Some((f, version)) if f == first => version,
                _ if std::fs::metadata(&path).map_err(io)?.len() <= HEADER_LEN => {
                    // Created but its header never became durable: nothing in it was acked to anyone.
                    std::fs::remove_file(&path).map_err(io)?;
                    report.removed_empty += 1;
                    continue;
                }
                _ => {
                    // A damaged header on a segment with records: keep the records.
                    let version = guess_version(&path, first).map_err(io)?;
                    tracing::error!(segment = %path.display(), version, "damaged segment header; reading its records anyway");
                    versions.insert(first, version);
                    version
                }
            };
            if version != file::VERSION {
                versions.insert(first, version);
            }
            found.push((first, version));
        }
        for (n, (first, version)) in found.iter().copied().enumerate() {
            let path = file::segment_path(&dir, first);
            // The next segment's first id bounds this one's ids: it was sealed at that id.
            let next_first = found.get(n + 1).map(|(f, _)| *f);
            let scan = file::scan_records(&path, HEADER_LEN).map_err(io)?;
            index.push_segment(first);
            report.segments += 1;
            let mut recovery = SegmentRecovery {
                path: &path,
                version,
                acked: &acked,
                known_lost: &known_lost,
                report: &mut report,
                pending_lost: &mut pending_lost,
                ids_reliable: true,
            };
            // A version 1 segment says only how many ids it held if it is sealed.
            let mut v1_unaccounted = next_first.map(|next| next.saturating_sub(first + scan.records.len() as u64));
            let mut holes = scan.holes.iter().peekable();
            for (k, (offset, len, body)) in scan.records.iter().enumerate() {
                let hole = holes.next_if(|(at, _)| *at == k).map(|(_, hole)| hole);
                let next_id = index.next_id().0;
                let parsed = file::parse_body(body, version)
                    .filter(|p| p.id.is_none_or(|id| id >= next_id && next_first.is_none_or(|next| id < next)));
                let Some(parsed) = parsed else {
                    // Checks out but cannot be here: bytes that happen to frame.
                    tracing::warn!(segment = %path.display(), offset, "record with an impossible id skipped");
                    recovery.report.damaged_bytes += u64::from(*len) + hole.map_or(0, |h| h.bytes.len() as u64);
                    continue;
                };
                let lost_ids = match (parsed.id, hole) {
                    // Version 2: the record says where it belongs.
                    (Some(id), _) => id - next_id,
                    (None, Some(_)) => {
                        // Version 1: at least one record per hole; what a sealed
                        // segment is missing beyond that goes to its last damage.
                        let last_damage = holes.peek().is_none() && scan.torn_bytes == 0;
                        recovery.ids_reliable = false;
                        match &mut v1_unaccounted {
                            Some(left) if last_damage => std::mem::take(left),
                            Some(left) => {
                                let n = (*left).min(1);
                                *left -= n;
                                n
                            }
                            None => 1,
                        }
                    }
                    (None, None) => 0,
                };
                if hole.is_some() || lost_ids > 0 {
                    let (at, bytes) = hole.map_or((*offset, &[][..]), |h| (h.offset, &h.bytes[..]));
                    recovery.damage(&mut index, at, bytes, lost_ids);
                }
                let id = index.push_record(*offset as u32, *len, parsed.meta);
                if recovery.ids_reliable && acked.contains(id.0) {
                    index.ack(id);
                    recovery.report.acked += 1;
                } else {
                    recovery.report.unacked += 1;
                    on_unacked(id, parsed.meta, parsed.batch);
                }
            }
            if scan.torn_bytes > 0 {
                let torn_at = scan.valid_len;
                match next_first {
                    // A sealed segment was whole when the next one began: its tail is damage.
                    Some(next) => {
                        let lost_ids = match &mut v1_unaccounted {
                            Some(left) if version == file::VERSION_1 => std::mem::take(left),
                            _ => next.saturating_sub(index.next_id().0),
                        };
                        recovery.damage(&mut index, torn_at, &scan.tail, lost_ids);
                    }
                    None => tracing::info!(
                        segment = %path.display(),
                        bytes = scan.torn_bytes,
                        "torn tail of the active segment cut (a write the crash interrupted)"
                    ),
                }
                truncate(&path, torn_at).map_err(io)?;
                recovery.report.truncated_bytes += scan.torn_bytes;
            }
            last_len = scan.valid_len;
        }
        let active = match index.segment_firsts().last() {
            Some(first) => {
                let f = OpenOptions::new().read(true).append(true).open(file::segment_path(&dir, first)).map_err(io)?;
                Some((first, f, last_len))
            }
            None => None,
        };
        // New records go to a segment of the current format.
        let roll_next = active.as_ref().is_some_and(|(first, _, _)| versions.contains_key(first));
        let ledger_path = dir.join(ACK_LEDGER);
        let ledger = OpenOptions::new().create(true).append(true).open(&ledger_path).map_err(io)?;
        let ledger_len = ledger.metadata().map_err(io)?.len();
        let mut q = Self {
            dir: dir.clone(),
            cfg,
            index,
            active,
            buffer: Vec::new(),
            buffer_first: None,
            ledger,
            ledger_len,
            pending_acks: Vec::new(),
            pending_lost,
            lost: report.lost as u64,
            versions,
            dir_dirty: true,
            deleted_since_compaction: true,
            readers: Default::default(),
            roll_next,
        };
        // Segments finished before the crash but not yet deleted go now; both
        // ledgers are rewritten with what live segments need (acks of ids no
        // segment holds any more must not mark a future record).
        q.delete_finished().map_err(io)?;
        q.compact_ledger().map_err(io)?;
        q.write_lost_ledger().map_err(io)?;
        file::sync_dir(&q.dir).map_err(io)?;
        Ok((q, report))
    }

    fn io_err(&self, e: io::Error) -> QueueError {
        QueueError::Io { path: self.dir.clone(), error: e.to_string() }
    }

    pub(crate) fn index(&self) -> &QueueIndex {
        &self.index
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.buffer_first.is_some() || !self.pending_acks.is_empty() || !self.pending_lost.is_empty()
    }

    /// Records found lost since start (damaged on disk before they were delivered).
    pub(crate) fn lost(&self) -> u64 {
        self.lost
    }

    /// Buffers a record; durable after the next successful [`DiskQueue::commit`].
    pub(crate) fn append(&mut self, meta: RecordMeta, batch: &[u8]) -> Result<(RecordId, Vec<Dropped>), QueueError> {
        let body_len = file::ID_LEN + file::META_LEN + batch.len();
        if body_len > file::MAX_BODY {
            return Err(QueueError::TooLarge { len: body_len });
        }
        let len = (file::FRAME_LEN + body_len) as u64;
        let mut dropped = Vec::new();
        if self.roll_next && self.index.segment_count() > 0 {
            self.roll()?;
            self.roll_next = false;
        }
        loop {
            match self.index.admit(len, self.cfg.policy == FullPolicy::DropOldest) {
                Admit::Append => break,
                Admit::Roll => {
                    self.roll()?;
                    break;
                }
                Admit::DropOldest => {
                    if let Some((first, lost)) = self.index.drop_oldest() {
                        self.readers.remove(&first);
                        let path = file::segment_path(&self.dir, first);
                        std::fs::remove_file(&path).map_err(|e| self.io_err(e))?;
                        self.dir_dirty = true;
                        self.deleted_since_compaction = true;
                        dropped.extend(lost);
                    }
                }
                Admit::Full => return Err(QueueError::Full),
            }
        }
        let Some((_, _, committed)) = &self.active else {
            return Err(QueueError::Io { path: self.dir.clone(), error: "no active segment".into() });
        };
        let offset = *committed + self.buffer.len() as u64;
        file::frame(&mut self.buffer, &file::record_body(self.index.next_id().0, &meta, batch));
        let id = self.index.push_record(offset as u32, len as u32, meta);
        self.buffer_first.get_or_insert(id);
        Ok((id, dropped))
    }

    /// Starts a new segment; anything buffered is committed to the old one first so
    /// a group commit never spans two files.
    fn roll(&mut self) -> Result<(), QueueError> {
        if self.buffer_first.is_some() {
            self.commit()?;
        }
        let first = self.index.next_id().0;
        let path = file::segment_path(&self.dir, first);
        // A file of this name can only be left by a roll that failed before the
        // index took it (a full disk while writing its header): it holds nothing
        // anyone was told is durable, so it is replaced, not an obstacle.
        let made = match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => OpenOptions::new().create_new(true).read(true).append(true).open(&path),
        }
        .and_then(|mut f| {
            f.write_all(&file::header(first))?;
            f.sync_data()?;
            file::sync_dir(&self.dir)?;
            Ok(f)
        });
        let f = match made {
            Ok(f) => f,
            Err(e) => {
                // Leave no stub behind; if even that fails, the next roll replaces it.
                let _ = std::fs::remove_file(&path);
                return Err(self.io_err(e));
            }
        };
        if let Some((old_first, old, _)) = self.active.take() {
            self.readers.insert(old_first, old);
        }
        self.index.push_segment(first);
        self.active = Some((first, f, HEADER_LEN));
        Ok(())
    }

    /// After a failed write: tries to get the queue appending again (starts the
    /// fresh segment the next append would need, or writes the pending acks).
    /// `Ok` once the queue can append; the caller retries until then.
    pub(crate) fn probe(&mut self) -> Result<(), QueueError> {
        if self.roll_next && self.index.segment_count() > 0 {
            self.roll()?;
            self.roll_next = false;
        }
        if self.has_pending() {
            self.commit()?;
        }
        Ok(())
    }

    /// Records acknowledged upstream; written to the ledger at the next commit.
    pub(crate) fn ack(&mut self, ids: &[RecordId]) -> usize {
        let mut n = 0;
        for id in ids {
            if self.index.ack(*id) {
                n += 1;
                match self.pending_acks.last_mut() {
                    Some((start, count)) if *start + u64::from(*count) == id.0 => *count += 1,
                    _ => self.pending_acks.push((id.0, 1)),
                }
            }
        }
        n
    }

    /// Writes and fsyncs buffered records and acks. On failure the buffered records
    /// are rolled back (the file is cut back to its committed length) and the error
    /// is returned; nothing reported durable is lost.
    pub(crate) fn commit(&mut self) -> Result<Option<RecordId>, QueueError> {
        let committed_upto = self.buffer_first.take();
        if let Some(first) = committed_upto {
            let buf = std::mem::take(&mut self.buffer);
            let Some((_, f, len)) = self.active.as_mut() else {
                return Err(QueueError::Io { path: self.dir.clone(), error: "no active segment".into() });
            };
            let result = f.write_all(&buf).and_then(|()| f.sync_data());
            match result {
                Ok(()) => *len += buf.len() as u64,
                Err(e) => {
                    let committed = *len;
                    let _ = f.set_len(committed);
                    self.index.truncate_from(first);
                    self.roll_next = true;
                    return Err(self.io_err(e));
                }
            }
        }
        if !self.pending_lost.is_empty() {
            self.write_lost_ledger().map_err(|e| self.io_err(e))?;
        }
        if !self.pending_acks.is_empty() {
            let body = postcard::to_allocvec(&self.pending_acks).unwrap_or_default();
            let mut framed = Vec::with_capacity(body.len() + file::FRAME_LEN);
            file::frame(&mut framed, &body);
            self.ledger.write_all(&framed).and_then(|()| self.ledger.sync_data()).map_err(|e| self.io_err(e))?;
            self.ledger_len += framed.len() as u64;
            self.pending_acks.clear();
            self.delete_finished().map_err(|e| self.io_err(e))?;
            if self.ledger_len > LEDGER_COMPACT_BYTES && self.deleted_since_compaction {
                self.compact_ledger().map_err(|e| self.io_err(e))?;
            }
        }
        if self.dir_dirty {
            file::sync_dir(&self.dir).map_err(|e| self.io_err(e))?;
            self.dir_dirty = false;
        }
        Ok(committed_upto.map(|_| RecordId(self.index.next_id().0.saturating_sub(1))))
    }

    fn delete_finished(&mut self) -> io::Result<()> {
        for first in self.index.take_finished() {
            self.readers.remove(&first);
            std::fs::remove_file(file::segment_path(&self.dir, first))?;
            self.dir_dirty = true;
            self.deleted_since_compaction = true;
        }
        Ok(())
    }

    /// Rewrites the ledger with only the acks of live segments (temp file, fsync, rename).
    fn compact_ledger(&mut self) -> io::Result<()> {
        let ranges = self.index.acked_ranges();
        let tmp = self.dir.join("acks.log.tmp");
        let mut framed = Vec::new();
        if !ranges.is_empty() {
            file::frame(&mut framed, &postcard::to_allocvec(&ranges).unwrap_or_default());
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&framed)?;
            f.sync_all()?;
        }
        let path = self.dir.join(ACK_LEDGER);
        std::fs::rename(&tmp, &path)?;
        file::sync_dir(&self.dir)?;
        self.ledger = OpenOptions::new().append(true).open(&path)?;
        self.ledger_len = framed.len() as u64;
        self.deleted_since_compaction = false;
        Ok(())
    }

    /// Rewrites the loss ledger with the lost ids of live segments (a handful).
    fn write_lost_ledger(&mut self) -> io::Result<()> {
        let ranges = self.index.lost_ranges();
        let path = self.dir.join(LOSS_LEDGER);
        self.pending_lost.clear();
        if ranges.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let tmp = self.dir.join("lost.log.tmp");
        let mut framed = Vec::new();
        file::frame(&mut framed, &postcard::to_allocvec(&ranges).unwrap_or_default());
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&framed)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        self.dir_dirty = true;
        Ok(())
    }

    /// Reads a committed, unacknowledged record. A record whose bytes no longer
    /// check out (damaged since recovery) is marked lost, logged and counted, and
    /// read as absent.
    pub(crate) fn read(&mut self, id: RecordId) -> Result<Option<(RecordMeta, Vec<u8>)>, QueueError> {
        let Some((first, offset, len, meta, acked)) = self.index.locate(id) else { return Ok(None) };
        if acked {
            return Ok(None);
        }
        let mut buf = vec![0u8; len as usize];
        let file = match &self.active {
            Some((f_first, f, committed)) if *f_first == first => {
                if u64::from(offset) + u64::from(len) > *committed {
                    return Ok(None); // not committed yet
                }
                f
            }
            _ => {
                if !self.readers.contains_key(&first) {
                    let f = File::open(file::segment_path(&self.dir, first)).map_err(|e| self.io_err(e))?;
                    self.readers.insert(first, f);
                }
                &self.readers[&first]
            }
        };
        file.read_exact_at(&mut buf, u64::from(offset))
            .map_err(|e| QueueError::Io { path: self.dir.clone(), error: e.to_string() })?;
        let version = self.versions.get(&first).copied().unwrap_or(file::VERSION);
        let whole = file::check_frame(&buf).filter(|body| body.len() + file::FRAME_LEN == buf.len());
        match whole.and_then(|body| file::parse_body(body, version)) {
            Some(body) if body.id.is_none_or(|i| i == id.0) => Ok(Some((meta, body.batch.to_vec()))),
            _ => {
                let segment = file::segment_path(&self.dir, first);
                tracing::error!(
                    segment = %segment.display(),
                    offset,
                    id = id.0,
                    record = describe_damaged(&buf, version),
                    "record damaged on disk since it was written: lost"
                );
                if self.index.mark_lost(id) {
                    self.lost += 1;
                    push_range(&mut self.pending_lost, id.0);
                }
                Ok(None)
            }
        }
    }
}

fn truncate(path: &Path, len: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}
