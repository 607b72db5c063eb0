//! Disk queue tests on real files: durability, recovery from torn writes at every
//! byte, acks across restarts, budgets under both policies.

use std::path::Path;
use std::time::Duration;

use super::disk::DiskQueue;
use super::*;

fn cfg(dir: &Path, budget: u64, segment: u64, policy: FullPolicy) -> QueueConfig {
    QueueConfig {
        dir: dir.to_path_buf(),
        budget_bytes: budget,
        segment_bytes: segment,
        commit_interval: Duration::from_millis(1),
        policy,
    }
}

fn meta(i: u64) -> RecordMeta {
    RecordMeta { shard: (i % 7) as u16, samples: 10 + i as u32, received_at_ms: 1_000 + i }
}

fn batch(i: u64) -> Vec<u8> {
    format!("batch-{i:05}-").repeat(1 + (i % 5) as usize).into_bytes()
}

/// (id, meta, batch) of a record seen by recovery.
type Seen = (u64, RecordMeta, Vec<u8>);

/// Opens the queue, returning what recovery reported as unacknowledged.
fn reopen(c: &QueueConfig) -> (DiskQueue, RecoveryReport, Vec<Seen>) {
    let mut seen = vec![];
    let (q, report) = DiskQueue::open(c.clone(), |id, m, b| seen.push((id.0, m, b.to_vec()))).unwrap();
    (q, report, seen)
}

#[test]
fn durable_records_survive_reopen_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 1 << 30, 300, FullPolicy::Backpressure);
    let (mut q, report, seen) = reopen(&c);
    assert_eq!((report, seen.len()), (RecoveryReport::default(), 0));
    for i in 0..20 {
        let (id, dropped) = q.append(meta(i), &batch(i)).unwrap();
        assert_eq!((id.0, dropped.len()), (i, 0));
        if i % 3 == 0 {
            q.commit().unwrap();
        }
    }
    q.commit().unwrap();
    assert!(q.index().segment_count() > 3, "small segments roll");
    drop(q);
    let (_, report, seen) = reopen(&c);
    assert_eq!(report.unacked, 20);
    let expected: Vec<_> = (0..20).map(|i| (i, meta(i), batch(i))).collect();
    assert_eq!(seen, expected);
}

#[test]
fn a_torn_tail_at_any_byte_keeps_every_record_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 1 << 30, 1 << 20, FullPolicy::Backpressure);
    let (mut q, _, _) = reopen(&c);
    for i in 0..5 {
        q.append(meta(i), &batch(i)).unwrap();
    }
    q.commit().unwrap();
    drop(q);
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let full = std::fs::read(&seg).unwrap();
    // Record boundaries, from a clean scan.
    let scan = file::scan_records(&seg, file::HEADER_LEN).unwrap();
    let ends: Vec<u64> = scan.records.iter().map(|(off, len, _)| off + u64::from(*len)).collect();
    for cut in file::HEADER_LEN as usize..=full.len() {
        std::fs::write(&seg, &full[..cut]).unwrap();
        let (_, report, seen) = reopen(&c);
        let complete = ends.iter().filter(|e| **e <= cut as u64).count();
        assert_eq!(seen.len(), complete, "cut at {cut}");
        for (i, (id, m, b)) in seen.iter().enumerate() {
            assert_eq!((*id, *m, b), (i as u64, meta(i as u64), &batch(i as u64)));
        }
        let boundary = ends.iter().chain([&file::HEADER_LEN]).any(|e| *e == cut as u64);
        assert_eq!(report.truncated_bytes == 0, boundary, "cut at {cut}");
        // After recovery the file is exactly the valid prefix and appends continue.
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len() as usize,
            ends.get(complete.wrapping_sub(1)).map_or(file::HEADER_LEN as usize, |e| *e as usize)
        );
    }
    // Garbage after the last record (a torn write of random bytes) is cut too.
    let mut garbage = full.clone();
    garbage.extend_from_slice(&[0xff, 0x00, 0x00, 0x00, 1, 2, 3]);
    std::fs::write(&seg, &garbage).unwrap();
    let (mut q, report, seen) = reopen(&c);
    assert_eq!((seen.len(), report.truncated_bytes), (5, 7));
    let (id, _) = q.append(meta(5), &batch(5)).unwrap();
    assert_eq!(id.0, 5);
    q.commit().unwrap();
    drop(q);
    assert_eq!(reopen(&c).2.len(), 6);
}

/// Framed records of a segment file: (offset, framed length).
fn records_of(seg: &Path) -> Vec<(usize, usize)> {
    let scan = file::scan_records(seg, file::HEADER_LEN).unwrap();
    assert!(scan.holes.is_empty() && scan.torn_bytes == 0);
    scan.records.iter().map(|(off, len, _)| (*off as usize, *len as usize)).collect()
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
}

fn segments(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| file::parse_segment_name(&e.unwrap().file_name().to_string_lossy()))
        .collect();
    v.sort();
    v
}

/// 60 records in segments of about 8; `acked` acknowledged upstream.
fn filled(dir: &Path, acked: &[u64]) -> QueueConfig {
    let c = cfg(dir, 1 << 30, 600, FullPolicy::Backpressure);
    let (mut q, _, _) = reopen(&c);
    for i in 0..60 {
        q.append(meta(i), &batch(i)).unwrap();
        q.commit().unwrap();
    }
    q.ack(&acked.iter().map(|i| RecordId(*i)).collect::<Vec<_>>());
    q.commit().unwrap();
    c
}

fn ids(seen: &[Seen]) -> Vec<u64> {
    seen.iter().map(|s| s.0).collect()
}

/// Before: recovery stopped at the first record that did not check out and cut
/// the rest of the segment (every later record lost, and in the active segment
/// without a word). Now only the damaged record is lost, counted once, and every
/// record after it keeps its id and its ack.
#[test]
fn a_flipped_bit_in_a_sealed_segment_loses_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let c = filled(dir.path(), &[0, 5]);
    let segs = segments(dir.path());
    assert!(segs.len() >= 5, "{segs:?}");
    // The middle record of the first segment, which also holds acked records.
    let seg = file::segment_path(dir.path(), segs[0]);
    let recs = records_of(&seg);
    assert!(recs.len() >= 5, "{recs:?}");
    let victim = recs.len() / 2;
    let (off, len) = recs[victim];
    flip(&seg, off + len / 2);
    let (mut q, report, seen) = reopen(&c);
    assert_eq!((report.lost, report.damaged_acked, report.truncated_bytes), (1, 0, 0), "{report:?}");
    assert_eq!(report.damaged_bytes, len as u64);
    let expected: Vec<u64> = (0..60).filter(|i| ![0, 5, victim as u64].contains(i)).collect();
    assert_eq!(ids(&seen), expected);
    for (id, m, b) in &seen {
        assert_eq!((m, b), (&meta(*id), &batch(*id)));
    }
    assert_eq!(q.lost(), 1);
    // Appends continue with the next id.
    assert_eq!(q.append(meta(60), &batch(60)).unwrap().0, RecordId(60));
    q.commit().unwrap();
    drop(q);
    // Reported once: the loss ledger remembers it.
    let (mut q, report, seen) = reopen(&c);
    assert_eq!((report.lost, report.damaged_bytes), (0, len as u64));
    assert_eq!(seen.len(), expected.len() + 1);
    // Once the rest of that segment is acked it is deleted like any other.
    let first_seg: Vec<RecordId> = (segs[0]..segs[1]).map(RecordId).collect();
    q.ack(&first_seg);
    q.commit().unwrap();
    assert!(!seg.exists());
    drop(q);
    let (_, report, _) = reopen(&c);
    assert_eq!((report.lost, report.damaged_bytes), (0, 0));
    assert!(!dir.path().join("lost.log").exists(), "the loss ledger holds only live segments' ids");
}

#[test]
fn a_flipped_bit_in_the_active_segment_is_damage_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 1 << 30, 1 << 20, FullPolicy::Backpressure);
    let (mut q, _, _) = reopen(&c);
    for i in 0..200 {
        q.append(meta(i), &batch(i)).unwrap();
    }
    q.commit().unwrap();
    drop(q);
    let seg = file::segment_path(dir.path(), 0);
    let recs = records_of(&seg);
    // The length field of record 100: the frame no longer even says where it ends.
    flip(&seg, recs[100].0 + 1);
    let (mut q, report, seen) = reopen(&c);
    assert_eq!((report.lost, report.truncated_bytes), (1, 0), "{report:?}");
    assert_eq!(ids(&seen), (0..200).filter(|i| *i != 100).collect::<Vec<_>>());
    // The hole stays where it is; new records go after the last good one.
    assert_eq!(q.append(meta(200), &batch(200)).unwrap().0, RecordId(200));
    q.commit().unwrap();
    drop(q);
    let (_, report, seen) = reopen(&c);
    assert_eq!((report.lost, seen.len()), (0, 200));
    assert_eq!(seen.last().unwrap().2, batch(200));
}

#[test]
fn damage_at_the_end_of_a_sealed_segment_is_counted_from_the_next_segments_first_id() {
    let dir = tempfile::tempdir().unwrap();
    let c = filled(dir.path(), &[]);
    let segs = segments(dir.path());
    let seg = file::segment_path(dir.path(), segs[1]);
    let recs = records_of(&seg);
    let (off, len) = *recs.last().unwrap();
    flip(&seg, off + len - 3);
    let (_, report, seen) = reopen(&c);
    let last = segs[2] - 1;
    assert_eq!((report.lost, report.truncated_bytes), (1, len as u64), "{report:?}");
    assert_eq!(ids(&seen), (0..60).filter(|i| *i != last).collect::<Vec<_>>());
}

#[test]
fn a_damaged_record_that_was_already_delivered_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = filled(dir.path(), &[2, 3]);
    let seg = file::segment_path(dir.path(), 0);
    let recs = records_of(&seg);
    flip(&seg, recs[3].0 + 20);
    let (_, report, seen) = reopen(&c);
    assert_eq!((report.lost, report.damaged_acked), (0, 1), "{report:?}");
    assert_eq!(ids(&seen), (0..60).filter(|i| ![2, 3].contains(i)).collect::<Vec<_>>());
}

#[test]
fn a_damaged_segment_header_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let c = filled(dir.path(), &[]);
    let segs = segments(dir.path());
    flip(&file::segment_path(dir.path(), segs[1]), 9);
    let (_, report, seen) = reopen(&c);
    assert_eq!((report.lost, report.removed_empty, seen.len()), (0, 0, 60), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_damaged_after_recovery_is_skipped_and_counted_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let c = filled(dir.path(), &[]);
    let (q, _, thread) = open(c.clone(), |_, _, _| {}, None).unwrap();
    let seg = file::segment_path(dir.path(), 0);
    let recs = records_of(&seg);
    flip(&seg, recs[1].0 + 30);
    let (records, next) = q.read_unacked(RecordId(0), 10, usize::MAX).await.unwrap();
    let read: Vec<u64> = records.iter().map(|r| r.id.0).collect();
    assert_eq!((read, next), ((0..10).filter(|i| *i != 1).collect(), RecordId(10)));
    let (records, _) = q.read_unacked(RecordId(0), 10, usize::MAX).await.unwrap();
    assert_eq!(records.iter().map(|r| r.id.0).collect::<Vec<_>>(), [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    q.sync().await.unwrap();
    assert_eq!(q.stats().lost_records, 1);
    drop(q);
    thread.join().unwrap();
    // Recovery finds the same hole and does not count it again.
    let (_, report, seen) = reopen(&c);
    assert_eq!((report.lost, seen.len()), (0, 59));
}

/// A segment of the first format (records without ids), as gateways wrote them
/// before: records keep their ids where the count says so, and new records go to
/// a segment of the current format.
#[test]
fn first_format_segments_are_read_and_their_damage_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 1 << 30, 1 << 20, FullPolicy::Backpressure);
    std::fs::create_dir_all(dir.path()).unwrap();
    let v1 = |first: u64, ids: std::ops::Range<u64>| {
        let mut bytes = file::header(first).to_vec();
        bytes[4..6].copy_from_slice(&file::VERSION_1.to_le_bytes());
        let mut offsets = vec![];
        for i in ids {
            offsets.push(bytes.len());
            let body = file::record_body(i, &meta(i), &batch(i));
            file::frame(&mut bytes, &body[file::ID_LEN..]);
        }
        std::fs::write(file::segment_path(dir.path(), first), &bytes).unwrap();
        offsets
    };
    let sealed = v1(0, 0..10);
    v1(10, 10..15);
    flip(&file::segment_path(dir.path(), 0), sealed[4] + 25);
    let (mut q, report, seen) = reopen(&c);
    assert_eq!(report.lost, 1, "{report:?}");
    assert_eq!(ids(&seen), (0..15).filter(|i| *i != 4).collect::<Vec<_>>());
    for (id, m, b) in &seen {
        assert_eq!((m, b), (&meta(*id), &batch(*id)));
    }
    assert_eq!(q.append(meta(15), &batch(15)).unwrap().0, RecordId(15));
    q.commit().unwrap();
    drop(q);
    assert_eq!(segments(dir.path()), [0, 10, 15], "new records in a new segment");
    assert_eq!(file::read_header(&file::segment_path(dir.path(), 15)).unwrap(), Some((15, file::VERSION)));
    let (_, _, seen) = reopen(&c);
    assert_eq!(seen.len(), 15);
}

#[test]
fn acks_survive_restarts_and_finished_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 1 << 30, 200, FullPolicy::Backpressure);
    let (mut q, _, _) = reopen(&c);
    for i in 0..12 {
        q.append(meta(i), &batch(i)).unwrap();
    }
    q.commit().unwrap();
    let segments_before = q.index().segment_count();
    // Out of order, across segments.
    let acked = [11, 0, 5, 1, 2, 3, 4, 7];
    assert_eq!(q.ack(&acked.iter().map(|i| RecordId(*i)).collect::<Vec<_>>()), acked.len());
    q.commit().unwrap();
    assert!(q.index().segment_count() < segments_before, "fully acked segments deleted");
    drop(q);
    let (mut q, report, seen) = reopen(&c);
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [6, 8, 9, 10]);
    assert_eq!(report.unacked, 4);
    // Acking the rest leaves only the (empty-of-work) active segment.
    q.ack(&[RecordId(6), RecordId(8), RecordId(9), RecordId(10)]);
    q.commit().unwrap();
    assert_eq!(q.index().unacked(), 0);
    assert_eq!(q.index().segment_count(), 1);
    drop(q);
    let (q, _, seen) = reopen(&c);
    assert!(seen.is_empty());
    assert_eq!(q.index().next_id(), RecordId(12), "ids never go back");
}

#[test]
fn a_segment_without_a_header_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 1 << 30, 1 << 20, FullPolicy::Backpressure);
    let (mut q, _, _) = reopen(&c);
    q.append(meta(0), &batch(0)).unwrap();
    q.commit().unwrap();
    drop(q);
    std::fs::write(file::segment_path(dir.path(), 1), b"FL").unwrap();
    let (_, report, seen) = reopen(&c);
    assert_eq!((report.removed_empty, seen.len()), (1, 1));
}

#[test]
fn backpressure_refuses_when_full_and_accepts_after_acks() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 600, 200, FullPolicy::Backpressure);
    let (mut q, _, _) = reopen(&c);
    let mut ids = vec![];
    loop {
        match q.append(meta(1), &batch(1)) {
            Ok((id, dropped)) => {
                assert!(dropped.is_empty());
                ids.push(id);
            }
            Err(QueueError::Full) => break,
            Err(e) => panic!("{e}"),
        }
        q.commit().unwrap();
    }
    assert!(ids.len() >= 6, "{}", ids.len());
    assert!(q.index().total_bytes() <= 600);
    q.ack(&ids[..4]);
    q.commit().unwrap();
    assert!(q.append(meta(1), &batch(1)).is_ok());
}

#[test]
fn drop_oldest_drops_oldest_first_and_reports_exactly_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 600, 200, FullPolicy::DropOldest);
    let (mut q, _, _) = reopen(&c);
    let mut dropped = vec![];
    for i in 0..40 {
        let (_, d) = q.append(meta(i), &batch(i)).unwrap();
        dropped.extend(d);
        q.commit().unwrap();
        assert!(q.index().total_bytes() <= 600);
    }
    let ids: Vec<u64> = dropped.iter().map(|d| d.id.0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
    assert_eq!(ids[0], 0);
    drop(q);
    let (_, _, seen) = reopen(&c);
    // Every record is either still held or was reported dropped, exactly once.
    let mut all: Vec<u64> = ids.iter().copied().chain(seen.iter().map(|s| s.0)).collect();
    all.sort();
    assert_eq!(all, (0..40).collect::<Vec<_>>());
    for d in &dropped {
        assert_eq!(d.meta, meta(d.id.0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actor_group_commits_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 1 << 30, 4096, FullPolicy::Backpressure);
    c.commit_interval = Duration::from_millis(5);
    let (q, _, thread) = open(c.clone(), |_, _, _| {}, None).unwrap();
    let mut pending = vec![];
    for i in 0..200 {
        pending.push(q.append_start(meta(i), batch(i)).await.unwrap());
    }
    for (i, rx) in pending.into_iter().enumerate() {
        assert_eq!(rx.await.unwrap().unwrap().id, RecordId(i as u64));
    }
    let s = q.stats();
    assert_eq!(s.appended, 200);
    assert!(s.commits < 100, "grouped: {} commits for 200 appends", s.commits);
    q.ack((0..50).map(RecordId).collect()).await.unwrap();
    q.sync().await.unwrap();
    let (records, next) = q.read_unacked(RecordId(0), 10, usize::MAX).await.unwrap();
    assert_eq!(records.iter().map(|r| r.id.0).collect::<Vec<_>>(), (50..60).collect::<Vec<_>>());
    assert_eq!(records[0].batch, batch(50));
    assert_eq!(next, RecordId(60));
    let (rest, next) = q.read_unacked(next, 1000, usize::MAX).await.unwrap();
    assert_eq!(rest.len(), 140);
    assert_eq!(next, RecordId(200));
    let (none, next) = q.read_unacked(next, 1000, usize::MAX).await.unwrap();
    assert!(none.is_empty());
    assert_eq!(next, RecordId(200));
    drop(q);
    thread.join().unwrap();
    let (_, report, _) = reopen(&c);
    assert_eq!(report.unacked, 150);
}

/// A roll that failed on a full disk left a stub segment file (a header or less)
/// under the next segment's name; before, every later roll failed with "File
/// exists" until the gateway restarted. Now the stub is replaced and appends go on.
#[test]
fn a_stub_segment_left_by_a_failed_roll_does_not_block_appends() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 1 << 30, 200, FullPolicy::Backpressure);
    let (mut q, _, _) = reopen(&c);
    q.append(meta(0), &batch(0)).unwrap();
    q.commit().unwrap();
    // What ENOSPC during the next roll left behind: the file, 16 bytes of nothing.
    let next = q.index().next_id().0;
    std::fs::write(file::segment_path(dir.path(), next), [0u8; 16]).unwrap();
    for i in 1..10 {
        q.append(meta(i), &batch(i)).unwrap();
        q.commit().unwrap();
    }
    assert!(q.index().segment_count() > 1, "rolled past the stub");
    q.probe().unwrap();
    drop(q);
    let (_, report, seen) = reopen(&c);
    assert_eq!((report.unacked, seen.len()), (10, 10));
}
