//! `fleetline-cloud repair --shard N`: rebuilds a shard's dedupe state from its
//! datasets when its checkpoint is lost, damaged or older than its files.
//!
//! Every batch a shard stored left rows in `readings` (its samples) or
//! `deadletter` (an authentic batch that could not be used), each carrying the
//! batch's (fleet, device, epoch, seq). Reading the shard's files beyond its
//! newest loadable checkpoint gives back the set of batches it stored; the
//! repair writes a checkpoint of the newest generation found, so the shard
//! numbers its next files after every existing one and refuses every batch it
//! already holds. Damaged checkpoints are moved to `_fleetline/damaged/` first,
//! not deleted.
//!
//! Not rebuilt (they fill again from new data): latest values per signal,
//! analytics windows and detectors, gateway clocks, and the hashes of dead
//! letters older than the loaded checkpoint.

use std::collections::{BTreeMap, VecDeque};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch};
use bytes::Bytes;
use fleetline_wire::shard::fnv1a64;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::lake::schema::col as c;
use crate::shard::checkpoint::{
    Checkpoint, DEADLETTER_SEEN_MAX, DeviceState, checkpoint_dir, checkpoint_path, damaged_dir, generation_of,
    published_of,
};

use crate::lake::reason;
use crate::lake::store::{Store, SwapError};
use crate::shard::commit::read_head;
use crate::shard::head::{Head, Writer, head_path};
use crate::shard::{Published, SegmentConfig, ShardError};

/// What a repair found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RepairReport {
    /// Shard.
    pub shard: u16,
    /// Generation of the checkpoint it started from (0: none loadable).
    pub from_generation: u64,
    /// Checkpoints that did not load, moved aside.
    pub damaged_checkpoints: Vec<String>,
    /// Dataset files beyond that checkpoint, read.
    pub files_read: usize,
    /// Generation of the checkpoint written (the newest found).
    pub generation: u64,
    /// Whether a checkpoint was written (false: nothing to repair).
    pub written: bool,
    /// Devices in the rebuilt state.
    pub devices: usize,
    /// Batches added to the dedupe state from the files read.
    pub batches_added: u64,
    /// Readings rows in the files read.
    pub readings: u64,
    /// Dead-letter rows in the files read.
    pub deadletters: u64,
}

/// Rebuilds shard `shard`'s checkpoint from its datasets; see the module docs.
/// Run it while the shard is down (a node keeps a shard down while its files are
/// beyond its checkpoint, and picks up the repaired checkpoint by itself).
pub async fn repair(
    store: &Store,
    shard: u16,
    shard_count: u16,
    node: &str,
    segment: &SegmentConfig,
) -> anyhow::Result<RepairReport> {
    anyhow::ensure!(shard < shard_count, "shard {shard} does not exist with shard_count {shard_count}");
    let mut report = RepairReport { shard, ..Default::default() };
    let (head, version) = match read_head(store, shard, shard_count).await {
        Ok(h) => h,
        Err(ShardError::DamagedHead { path, error, .. }) => {
            // Rebuilt from the checkpoints below; the damaged head goes aside.
            let aside = format!("{}/{}-head.json", damaged_dir(shard), fleetline_service::unix_ms());
            store.rename(&path, &aside).await?;
            tracing::warn!(from = path, to = aside, %error, "damaged head moved aside");
            read_head(store, shard, shard_count).await?
        }
        Err(e) => return Err(e.into()),
    };
    let (base, base_path, damaged) = newest_loadable(store, &head, shard_count).await?;
    report.from_generation = base.as_ref().map_or(0, |c| c.generation);
    let mut ckpt = base.unwrap_or_else(|| Checkpoint {
        shard,
        shard_count,
        generation: 0,
        committed_at_ms: 0,
        node: node.into(),
        devices: Vec::new(),
        deadletter_seen: Vec::new(),
        publish: Vec::new(),
        totals: Default::default(),
        clocks: Vec::new(),
        outbox: Vec::new(),
        claim: 0,
        epoch: 0,
        models: Vec::new(),
    });

    let published = Published::list(store).await?;
    let mut beyond: Vec<(u64, String)> =
        published.of(shard).iter().filter(|(g, _)| *g > report.from_generation).cloned().collect();
    beyond.sort();
    let newest = beyond.last().map_or(report.from_generation, |(g, _)| *g);
    let head_ok =
        (head.checkpoint == base_path && version.is_some()) || (head.checkpoint.is_none() && base_path.is_none());
    if beyond.is_empty() && damaged.is_empty() && head_ok {
        report.generation = report.from_generation;
        report.devices = ckpt.devices.len();
        return Ok(report);
    }

    let mut rebuilt = Rebuilt {
        devices: ckpt.devices.drain(..).map(|d| ((d.fleet.clone(), d.device.clone()), d)).collect(),
        hashes: ckpt.deadletter_seen.drain(..).collect(),
    };
    for (generation, path) in &beyond {
        let dataset = path.split('/').next().unwrap_or_default();
        if dataset != "readings" && dataset != "deadletter" {
            continue;
        }
        let bytes = store.get(path).await?.ok_or_else(|| anyhow::anyhow!("{path} vanished while repairing"))?;
        let batches = read_parquet(bytes).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?;
        report.files_read += 1;
        debug_assert_eq!(published_of(path).map(|(_, g)| g), Some(*generation));
        for batch in &batches {
            rebuilt.take(dataset == "readings", batch, &mut report);
        }
    }
    ckpt.totals.batches += report.batches_added;
    for state in rebuilt.devices.values_mut() {
        if let Some(forgot) = state.seen.retain_epochs(segment.dedupe_epochs) {
            state.epoch_floor = state.epoch_floor.max(forgot.saturating_add(1));
        }
    }
    while rebuilt.hashes.len() > DEADLETTER_SEEN_MAX {
        rebuilt.hashes.pop_front();
    }
    ckpt.devices = rebuilt.devices.into_values().collect();
    ckpt.deadletter_seen = rebuilt.hashes.into();
    ckpt.totals.readings += report.readings;
    ckpt.totals.deadletters += report.deadletters;
    ckpt.totals.files += beyond.len() as u64;
    ckpt.generation = newest;
    ckpt.committed_at_ms = fleetline_service::unix_ms() as i64;
    ckpt.node = node.into();
    ckpt.publish.clear();
    ckpt.outbox.clear();

    // Damaged checkpoints go aside (kept), so the new one can take the newest name.
    for path in &damaged {
        let name = path.rsplit('/').next().unwrap_or("checkpoint");
        let aside = format!("{}/{}-{name}", damaged_dir(shard), fleetline_service::unix_ms());
        store.rename(path, &aside).await?;
        tracing::warn!(from = path, to = aside, "damaged checkpoint moved aside");
    }
    report.generation = newest;
    report.devices = ckpt.devices.len();
    report.damaged_checkpoints = damaged;
    // The repair is a claim of its own: a node that held the shard is fenced out,
    // and the head ends released, so the next owner picks it up at once.
    let writer = Writer { node: node.into(), epoch: head.epoch };
    let now = fleetline_service::unix_ms() as i64;
    let claimed = head.claimed(&writer, now).map_err(|e| anyhow::anyhow!("head claimed under lease epoch {e}"))?;
    let path = match base_path.filter(|_| report.from_generation == newest) {
        // Only a damaged newer checkpoint (or the head) was in the way: the loaded one stays.
        Some(path) => Some(path),
        // Nothing was ever stored: the head starts over.
        None if newest == 0 => None,
        None => {
            let path = checkpoint_path(shard, newest, claimed.claim);
            ckpt.claim = claimed.claim;
            ckpt.epoch = writer.epoch;
            store.put_new(&path, Bytes::from(ckpt.to_bytes())).await?;
            report.written = true;
            Some(path)
        }
    };
    let next = match &path {
        Some(path) => claimed.committed(newest, path.clone(), now),
        None => Head { generation: 0, checkpoint: None, ..claimed },
    }
    .released(now);
    store.swap(&head_path(shard), version.as_ref(), Bytes::from(next.to_bytes())).await.map_err(|e| match e {
        SwapError::Lost { .. } => {
            anyhow::anyhow!("shard {shard}'s head changed during the repair: is a node running the shard?")
        }
        SwapError::Store(e) => e.into(),
    })?;
    tracing::info!(
        shard,
        checkpoint = path.as_deref().unwrap_or("-"),
        ?report,
        "shard state rebuilt from its datasets"
    );
    Ok(report)
}

/// The newest checkpoint of the shard that loads (and its name), and the newer
/// ones that do not. Only checkpoints up to the head's generation count: one
/// beyond it was written by a commit that never reached the head.
async fn newest_loadable(
    store: &Store,
    head: &Head,
    shard_count: u16,
) -> anyhow::Result<(Option<Checkpoint>, Option<String>, Vec<String>)> {
    let shard = head.shard;
    let mut checkpoints: Vec<(u64, bool, String)> = store
        .list(&checkpoint_dir(shard))
        .await?
        .into_iter()
        .filter_map(|p| generation_of(&p).map(|g| (g, Some(&p) == head.checkpoint.as_ref(), p)))
        .filter(|(g, _, _)| *g <= head.generation)
        .collect();
    // Newest last; of one generation, the head's own last.
    checkpoints.sort();
    let mut damaged = Vec::new();
    while let Some((_, _, path)) = checkpoints.pop() {
        let Some(bytes) = store.get(&path).await? else { continue };
        match Checkpoint::from_bytes(&bytes) {
            Ok(c) if c.shard == shard && c.shard_count == shard_count => return Ok((Some(c), Some(path), damaged)),
            Ok(c) => anyhow::bail!(
                "checkpoint {path} belongs to shard {}/{}, not {shard}/{shard_count}: is shard_count right?",
                c.shard,
                c.shard_count
            ),
            Err(e) => {
                tracing::warn!(checkpoint = path, error = %e, "damaged checkpoint; repairing past it");
                damaged.push(path);
            }
        }
    }
    Ok((None, None, damaged))
}

/// Dedupe state rebuilt from dataset rows.
struct Rebuilt {
    devices: BTreeMap<(String, String), DeviceState>,
    /// Hashes of unauthenticated dead letters, as the shard dedupes them.
    hashes: VecDeque<u64>,
}

impl Rebuilt {
    /// Takes the rows of one `readings` (or `deadletter`) record batch.
    fn take(&mut self, readings: bool, batch: &RecordBatch, report: &mut RepairReport) {
        let rows = Rows::of(batch);
        for i in 0..batch.num_rows() {
            if readings {
                report.readings += 1;
            } else {
                report.deadletters += 1;
                let why = rows.text(c::REASON, i).unwrap_or_default();
                if !reason::is_authentic(why) {
                    // Deduped by its bytes, as the shard does.
                    if let Some(raw) = rows.binary(c::RAW, i) {
                        self.hashes.push_back(fnv1a64(raw) ^ fnv1a64(why.as_bytes()).rotate_left(1));
                    }
                    continue;
                }
            }
            let (Some(fleet), Some(device), Some(epoch), Some(seq)) =
                (rows.text(c::FLEET, i), rows.text(c::DEVICE_ID, i), rows.int(c::EPOCH, i), rows.int(c::SEQ, i))
            else {
                continue;
            };
            let (Ok(epoch), Ok(seq)) = (u32::try_from(epoch), u32::try_from(seq)) else { continue };
            let state = self.devices.entry((fleet.to_string(), device.to_string())).or_insert_with(|| DeviceState {
                fleet: fleet.into(),
                device: device.into(),
                ..Default::default()
            });
            if state.seen.insert(epoch, seq) {
                report.batches_added += 1;
                if state.last_batch < (epoch, seq) {
                    state.last_batch = (epoch, seq);
                    if let (Some(gw), Some(at)) = (rows.text(c::GATEWAY_ID, i), rows.time(c::RECEIVED_AT, i)) {
                        state.last_gateway = gw.into();
                        state.last_received_ms = at;
                    }
                }
            }
        }
    }
}

fn read_parquet(bytes: Bytes) -> Result<Vec<RecordBatch>, parquet::errors::ParquetError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
}

/// Typed access to a record batch's columns by name; a missing or null value is `None`.
struct Rows<'a>(&'a RecordBatch);

impl<'a> Rows<'a> {
    fn of(batch: &'a RecordBatch) -> Self {
        Self(batch)
    }

    fn column(&self, name: &str) -> Option<&'a dyn Array> {
        self.0.column_by_name(name).map(|c| c.as_ref())
    }

    fn text(&self, name: &str, i: usize) -> Option<&'a str> {
        let c = self.column(name)?.as_string_opt::<i32>()?;
        c.is_valid(i).then(|| c.value(i))
    }

    fn int(&self, name: &str, i: usize) -> Option<i64> {
        let c = self.column(name)?.as_primitive_opt::<Int64Type>()?;
        c.is_valid(i).then(|| c.value(i))
    }

    fn time(&self, name: &str, i: usize) -> Option<i64> {
        let c = self.column(name)?.as_primitive_opt::<TimestampMillisecondType>()?;
        c.is_valid(i).then(|| c.value(i))
    }

    fn binary(&self, name: &str, i: usize) -> Option<&'a [u8]> {
        let c = self.column(name)?.as_binary_opt::<i32>()?;
        c.is_valid(i).then(|| c.value(i))
    }
}
