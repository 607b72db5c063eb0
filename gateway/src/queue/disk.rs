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

/// What recovery found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files found.
    pub segments: usize,
    /// Records still unacknowledged upstream.
    pub unacked: usize,
    /// Records already acknowledged (their segment was not yet deleted).
    pub acked: usize,
    /// Bytes truncated from torn or corrupt tails.
    pub truncated_bytes: u64,
    /// Segment files without a valid header (a crash during creation), removed.
    pub removed_empty: usize,
}

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

        // The ledger first: which ids are already acknowledged.
        let ledger_path = dir.join("acks.log");
        let mut acked: Vec<(u64, u32)> = Vec::new();
        if ledger_path.exists() {
            let scan = file::scan_records(&ledger_path, 0).map_err(io)?;
            for (_, _, body) in &scan.records {
                if let Ok(ranges) = postcard::from_bytes::<Vec<(u64, u32)>>(body) {
                    acked.extend(ranges);
                }
            }
            if scan.torn_bytes > 0 {
                truncate(&ledger_path, scan.valid_len).map_err(io)?;
                report.truncated_bytes += scan.torn_bytes;
            }
        }
        acked.sort_unstable();
        let is_acked = |id: u64| {
            let i = acked.partition_point(|(start, _)| *start <= id);
            i > 0 && {
                let (start, n) = acked[i - 1];
                id < start + u64::from(n)
            }
        };

        let mut firsts: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter_map(|e| file::parse_segment_name(&e.file_name().to_string_lossy()))
            .collect();
        firsts.sort_unstable();

        let mut index = QueueIndex::new(0, cfg.budget_bytes, cfg.segment_bytes, HEADER_LEN);
        let mut last_len = 0;
        for (n, first) in firsts.iter().copied().enumerate() {
            let path = file::segment_path(&dir, first);
            if file::read_header(&path).map_err(io)? != Some(first) {
                // Created but its header never became durable: nothing in it was acked to anyone.
                std::fs::remove_file(&path).map_err(io)?;
                report.removed_empty += 1;
                continue;
            }
            let scan = file::scan_records(&path, HEADER_LEN).map_err(io)?;
            if scan.torn_bytes > 0 {
                if n + 1 < firsts.len() {
                    tracing::error!(
                        segment = %path.display(),
                        bytes = scan.torn_bytes,
                        "corrupt record in a sealed segment; the rest of that segment is lost"
                    );
                }
                truncate(&path, scan.valid_len).map_err(io)?;
                report.truncated_bytes += scan.torn_bytes;
            }
            index.push_segment(first);
            report.segments += 1;
            for (offset, len, body) in scan.records {
                let Some((meta, batch)) = file::parse_body(&body) else { continue };
                let id = index.push_record(offset as u32, len, meta);
                if is_acked(id.0) {
                    index.ack(id);
                    report.acked += 1;
                } else {
                    report.unacked += 1;
                    on_unacked(id, meta, batch);
                }
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
            dir_dirty: true,
            deleted_since_compaction: true,
            readers: Default::default(),
            roll_next: false,
        };
        // Segments finished before the crash but not yet deleted go now.
        q.delete_finished().map_err(io)?;
        q.compact_ledger().map_err(io)?;
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
        self.buffer_first.is_some() || !self.pending_acks.is_empty()
    }

    /// Buffers a record; durable after the next successful [`DiskQueue::commit`].
    pub(crate) fn append(&mut self, meta: RecordMeta, batch: &[u8]) -> Result<(RecordId, Vec<Dropped>), QueueError> {
        let body = file::record_body(&meta, batch);
        if body.len() > file::MAX_BODY {
            return Err(QueueError::TooLarge { len: body.len() });
        }
        let len = (file::FRAME_LEN + body.len()) as u64;
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
        file::frame(&mut self.buffer, &body);
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
        let path = self.dir.join("acks.log");
        std::fs::rename(&tmp, &path)?;
        file::sync_dir(&self.dir)?;
        self.ledger = OpenOptions::new().append(true).open(&path)?;
        self.ledger_len = framed.len() as u64;
        self.deleted_since_compaction = false;
        Ok(())
    }

    /// Reads a committed, unacknowledged record.
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
        let body = &buf[file::FRAME_LEN..];
        Ok(file::parse_body(body).map(|(_, batch)| (meta, batch.to_vec())))
    }
}

fn truncate(path: &Path, len: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}
