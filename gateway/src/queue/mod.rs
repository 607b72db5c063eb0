//! The crash-safe disk queue between devices and the uplink.
//!
//! What it guarantees: a record is reported durable only after its bytes and every
//! byte before it are fsynced; after a crash at any instant, recovery keeps every
//! durable record and drops at most the torn, never-reported tail. Records are
//! acknowledged upstream in any order; a segment file is deleted once every record
//! in it is acknowledged, and acknowledgements are themselves logged and fsynced, so
//! that state survives restarts. When the byte budget is full, `backpressure`
//! refuses new records (the gateway then withholds device acks and devices keep
//! their data) and `drop-oldest` deletes the oldest segment, reporting every
//! unacknowledged record in it so each is counted.
//!
//! Group commit: appends are buffered and fsynced together at most every
//! `commit_interval`; each appender is answered once its record is durable. The
//! files are driven on a dedicated thread so fsyncs never block the async runtime.

mod disk;
mod file;
mod index;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

pub use disk::RecoveryReport;
pub use index::{Dropped, RecordId, RecordMeta};

use disk::DiskQueue;

/// What happens when the byte budget is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Refuse new records; devices keep their data until there is room.
    Backpressure,
    /// Delete the oldest segment and count every record and sample in it.
    DropOldest,
}

/// Queue settings.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// Directory of segment files and the ack ledger.
    pub dir: PathBuf,
    /// Most bytes of segment files.
    pub budget_bytes: u64,
    /// Target size of one segment file.
    pub segment_bytes: u64,
    /// Longest time an append waits for its group's fsync.
    pub commit_interval: Duration,
    /// Policy when the budget is full.
    pub policy: FullPolicy,
}

/// Why an append or the queue failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The budget is full under back-pressure.
    #[error("disk queue budget is full")]
    Full,
    /// The record is larger than a record may be.
    #[error("record of {len} bytes is too large for the disk queue")]
    TooLarge {
        /// Body size.
        len: usize,
    },
    /// A file operation failed (disk full, I/O error); nothing was reported durable.
    #[error("disk queue I/O in {path}: {error}")]
    Io {
        /// Queue directory.
        path: PathBuf,
        /// The OS error.
        error: String,
    },
    /// The queue thread has stopped.
    #[error("disk queue has stopped")]
    Stopped,
}

/// A durable append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The record's id.
    pub id: RecordId,
    /// Records deleted unacknowledged to make room (drop-oldest only).
    pub dropped: Vec<Dropped>,
}

/// A record read back for the uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// Id.
    pub id: RecordId,
    /// Metadata.
    pub meta: RecordMeta,
    /// The sealed device batch.
    pub batch: Vec<u8>,
}

/// Counters and gauges of the queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Records not yet acknowledged upstream.
    pub records: u64,
    /// Bytes of segment files.
    pub bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Receipt time of the oldest unacknowledged record, Unix ms.
    pub oldest_received_at_ms: Option<u64>,
    /// Records appended since start.
    pub appended: u64,
    /// Group commits (fsync rounds) since start.
    pub commits: u64,
    /// Records acknowledged upstream since start.
    pub acked: u64,
    /// Appends refused because the budget was full.
    pub refused_full: u64,
    /// Appends that failed on I/O.
    pub io_errors: u64,
    /// Records dropped unacknowledged (drop-oldest).
    pub dropped_records: u64,
    /// Samples in them.
    pub dropped_samples: u64,
    /// Records found damaged on disk before they were delivered upstream (a
    /// flipped bit, a bad block): lost, each logged with its device and seq where
    /// readable. Counted since start, recovery included.
    pub lost_records: u64,
    /// The last write failed and no write has worked since (a full disk, an I/O
    /// error): the queue cannot take records now. It retries by itself.
    pub failing: bool,
}

enum Cmd {
    Append(RecordMeta, Vec<u8>, oneshot::Sender<Result<Appended, QueueError>>),
    Ack(Vec<RecordId>),
    ReadUnacked { from: RecordId, max_records: usize, max_bytes: usize, reply: oneshot::Sender<ReadResult> },
    Sync(oneshot::Sender<()>),
}

type ReadResult = Result<(Vec<StoredRecord>, RecordId), QueueError>;

/// Async handle to the queue thread. Cloning shares the queue.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::Sender<Cmd>,
    stats: Arc<Mutex<QueueStats>>,
}

/// Opens the queue, calling `on_unacked` for every unacknowledged record found, and
/// starts its thread.
///
/// Every record that becomes durable is also offered to `feed` (if given), in id
/// order, without waiting: a full feed skips records, which the reader then finds
/// on disk.
pub fn open(
    cfg: QueueConfig,
    on_unacked: impl FnMut(RecordId, RecordMeta, &[u8]),
    feed: Option<mpsc::Sender<StoredRecord>>,
) -> Result<(QueueHandle, RecoveryReport, std::thread::JoinHandle<()>), QueueError> {
    let interval = cfg.commit_interval;
    let (queue, report) = DiskQueue::open(cfg, on_unacked)?;
    let stats = Arc::new(Mutex::new(QueueStats::default()));
    let (tx, rx) = mpsc::channel(4096);
    let thread_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name("fleetline-queue".into())
        .spawn(move || run(queue, rx, interval, thread_stats, feed))
        .map_err(|e| QueueError::Io { path: PathBuf::new(), error: e.to_string() })?;
    let handle = QueueHandle { tx, stats };
    if let Ok(mut s) = handle.stats.lock() {
        s.records = report.unacked as u64;
        s.lost_records = report.lost as u64;
    }
    Ok((handle, report, thread))
}

impl QueueHandle {
    /// Appends a record and waits until it is durable.
    pub async fn append(&self, meta: RecordMeta, batch: Vec<u8>) -> Result<Appended, QueueError> {
        let rx = self.append_start(meta, batch).await?;
        rx.await.map_err(|_| QueueError::Stopped)?
    }

    /// Queues an append and returns a receiver that resolves once it is durable, so a
    /// caller can keep many appends in one group commit.
    pub async fn append_start(
        &self,
        meta: RecordMeta,
        batch: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<Appended, QueueError>>, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Append(meta, batch, tx)).await.map_err(|_| QueueError::Stopped)?;
        Ok(rx)
    }

    /// Marks records acknowledged upstream (logged with the next commit).
    pub async fn ack(&self, ids: Vec<RecordId>) -> Result<(), QueueError> {
        self.tx.send(Cmd::Ack(ids)).await.map_err(|_| QueueError::Stopped)
    }

    /// Up to `max_records` / `max_bytes` of unacknowledged records from `from` on, in
    /// id order, and the id to continue from.
    pub async fn read_unacked(&self, from: RecordId, max_records: usize, max_bytes: usize) -> ReadResult {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::ReadUnacked { from, max_records, max_bytes, reply })
            .await
            .map_err(|_| QueueError::Stopped)?;
        rx.await.map_err(|_| QueueError::Stopped)?
    }

    /// Waits until everything sent before is committed.
    pub async fn sync(&self) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Sync(tx)).await.map_err(|_| QueueError::Stopped)?;
        rx.await.map_err(|_| QueueError::Stopped)
    }

    /// The latest counters.
    pub fn stats(&self) -> QueueStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

/// How often a failing queue tries to write again, and how often it looks for work meanwhile.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_POLL: Duration = Duration::from_millis(50);

type Waiter = (oneshot::Sender<Result<Appended, QueueError>>, Appended, RecordMeta, Vec<u8>);

fn run(
    mut q: DiskQueue,
    mut rx: mpsc::Receiver<Cmd>,
    interval: Duration,
    stats: Arc<Mutex<QueueStats>>,
    feed: Option<mpsc::Sender<StoredRecord>>,
) {
    let mut waiting: Vec<Waiter> = Vec::new();
    let mut syncs: Vec<oneshot::Sender<()>> = Vec::new();
    let mut local = QueueStats::default();
    let mut last_commit = Instant::now() - interval;
    let mut last_probe = Instant::now();
    loop {
        let cmd = if q.has_pending() || !syncs.is_empty() {
            match rx.try_recv() {
                Ok(cmd) => Some(cmd),
                Err(mpsc::error::TryRecvError::Empty) => {
                    let due = last_commit + interval;
                    let now = Instant::now();
                    if now < due && syncs.is_empty() {
                        std::thread::sleep(due - now);
                        continue;
                    }
                    None
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            }
        } else if local.failing {
            // Nothing to do but find out when writes work again (space freed):
            // probe now and then, so readiness recovers without waiting for traffic.
            match rx.try_recv() {
                Ok(cmd) => Some(cmd),
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(PROBE_POLL);
                    if last_probe.elapsed() >= PROBE_INTERVAL {
                        last_probe = Instant::now();
                        if q.probe().is_ok() {
                            tracing::info!("disk queue writes work again");
                            local.failing = false;
                            publish(&q, &mut local, &stats);
                        }
                    }
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.blocking_recv() {
                Some(cmd) => Some(cmd),
                None => break,
            }
        };
        match cmd {
            Some(Cmd::Append(meta, batch, reply)) => match q.append(meta, &batch) {
                Ok((id, dropped)) => {
                    local.appended += 1;
                    local.dropped_records += dropped.len() as u64;
                    local.dropped_samples += dropped.iter().map(|d| u64::from(d.meta.samples)).sum::<u64>();
                    waiting.push((reply, Appended { id, dropped }, meta, batch));
                }
                Err(e) => {
                    match &e {
                        QueueError::Full => local.refused_full += 1,
                        QueueError::Io { .. } => {
                            local.io_errors += 1;
                            if !local.failing {
                                tracing::error!(error = %e, "disk queue cannot append; retrying until writes work again");
                            }
                            local.failing = true;
                            last_probe = Instant::now();
                            publish(&q, &mut local, &stats);
                        }
                        _ => {}
                    }
                    let _ = reply.send(Err(e));
                }
            },
            Some(Cmd::Ack(ids)) => local.acked += q.ack(&ids) as u64,
            Some(Cmd::ReadUnacked { from, max_records, max_bytes, reply }) => {
                let _ = reply.send(read_unacked(&mut q, from, max_records, max_bytes));
            }
            Some(Cmd::Sync(reply)) => syncs.push(reply),
            None => {
                // Commit round: everything buffered becomes durable together.
                last_commit = Instant::now();
                let result = q.commit();
                match &result {
                    Ok(_) => {
                        local.commits += 1;
                        if local.failing {
                            tracing::info!("disk queue writes work again");
                        }
                        local.failing = false;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "disk queue commit failed; appends in this group are refused");
                        local.io_errors += waiting.len() as u64;
                        local.failing = true;
                        last_probe = Instant::now();
                    }
                }
                // Counters first, so whoever sees a durable append or a sync also sees it counted.
                publish(&q, &mut local, &stats);
                for (reply, appended, meta, batch) in waiting.drain(..) {
                    match &result {
                        Ok(_) => {
                            let id = appended.id;
                            let _ = reply.send(Ok(appended));
                            if let Some(feed) = &feed {
                                let _ = feed.try_send(StoredRecord { id, meta, batch });
                            }
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
                for s in syncs.drain(..) {
                    let _ = s.send(());
                }
                if rx.is_closed() && rx.is_empty() && !q.has_pending() {
                    break;
                }
            }
        }
    }
    let _ = q.commit();
}

fn publish(q: &DiskQueue, local: &mut QueueStats, stats: &Mutex<QueueStats>) {
    let index = q.index();
    local.records = index.unacked() as u64;
    local.bytes = index.total_bytes();
    local.segments = index.segment_count() as u64;
    local.lost_records = q.lost();
    local.oldest_received_at_ms =
        index.first_unacked().and_then(|id| index.locate(id)).map(|(_, _, _, meta, _)| meta.received_at_ms);
    if let Ok(mut s) = stats.lock() {
        *s = *local;
    }
}

fn read_unacked(q: &mut DiskQueue, from: RecordId, max_records: usize, max_bytes: usize) -> ReadResult {
    let ids: Vec<RecordId> = q.index().unacked_from(from).take(max_records).map(|(id, _)| id).collect();
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut next = from;
    for id in ids {
        if bytes >= max_bytes && !out.is_empty() {
            break;
        }
        next = RecordId(id.0 + 1);
        if let Some((meta, batch)) = q.read(id)? {
            bytes += batch.len();
            out.push(StoredRecord { id, meta, batch });
        }
    }
    if out.is_empty() {
        // Nothing unacked and committed at or after `from`: continue from the end.
        next = next.max(q.index().first_unacked().unwrap_or(q.index().next_id()));
    }
    Ok((out, next))
}
