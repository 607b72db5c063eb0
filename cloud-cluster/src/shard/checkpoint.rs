//! A shard's checkpoint: everything its owner needs to resume, written with every
//! commit. The newest checkpoint *is* the commit point: the files it lists as
//! published are part of the datasets, and nothing else the shard wrote is.
//!
//! ```text
//! file = "FLCKPT" ‖ format: u16 LE ‖ postcard(Checkpoint) ‖ crc32c(everything before): u32 LE
//! ```
//!
//! Format 2 added each device's analytics state and the commit's alert outbox;
//! format 3 each device's epoch floor (batches from boot epochs below it are
//! refused: their dedupe state was forgotten); format 4 the writer's claim and
//! lease epoch (see [`head`](super::head)); format 5 each vehicle's last closed
//! windows for the models' features and whether its tire risk is above the
//! alert threshold. Formats 1 to 4 are still read (format 4 and older: no
//! window history, so a vehicle's first windows after the upgrade have fewer
//! predictions)
//! (format-1 devices start analytics afresh; older devices' floors start at the
//! oldest epoch their dedupe state holds, which is what format 2 could still tell;
//! before format 4 there were no claims: 0).
//!
//! Pure: the format and its checks, no I/O (the commit protocol stores it).

use fleetline_wire::seqset::SeqSet;
use serde::{Deserialize, Serialize};

use crate::analytics::{DeviceAnalytics, Event};

/// Version of the layout in this module.
pub const CHECKPOINT_FORMAT: u16 = 5;

const MAGIC: &[u8; 6] = b"FLCKPT";

/// Where a shard's checkpoints live.
pub fn checkpoint_dir(shard: u16) -> String {
    format!("_fleetline/checkpoints/shard-{shard:03}")
}

/// A checkpoint's object name: its generation and the claim that wrote it, so
/// two writers of one generation (one of them fenced) never meet on a name.
pub fn checkpoint_path(shard: u16, generation: u64, claim: u64) -> String {
    format!("{}/{generation:012}-{claim:08}.ckpt", checkpoint_dir(shard))
}

/// The generation a checkpoint's object name carries (also of names from before
/// claims: `{generation}.ckpt`).
pub fn generation_of(path: &str) -> Option<u64> {
    let name = path.rsplit('/').next()?.strip_suffix(".ckpt")?;
    name.split('-').next()?.parse().ok()
}

/// The datasets a shard publishes files into.
pub const DATASETS: [&str; 5] = ["readings", "aggregates", "events", "deadletter", "predictions"];

/// A published file's object name: `{dataset}/{partition}/shard-NNN-GGGGGGGGGGGG.parquet`.
pub fn published_path(dataset: &str, partition: &str, shard: u16, generation: u64) -> String {
    format!("{dataset}/{partition}/shard-{shard:03}-{generation:012}.parquet")
}

/// The shard and generation a published file's name carries.
pub fn published_of(path: &str) -> Option<(u16, u64)> {
    let name = path.rsplit('/').next()?.strip_prefix("shard-")?.strip_suffix(".parquet")?;
    let (shard, generation) = name.split_once('-')?;
    (shard.len() == 3 && generation.len() == 12).then_some(())?;
    Some((shard.parse().ok()?, generation.parse().ok()?))
}

/// Where damaged checkpoints are moved by a repair, kept for inspection.
pub fn damaged_dir(shard: u16) -> String {
    format!("_fleetline/damaged/shard-{shard:03}")
}

/// Where a shard stages files before they are published.
pub fn staging_dir(shard: u16) -> String {
    format!("_fleetline/staging/shard-{shard:03}")
}

/// The latest value of one signal of a vehicle.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    /// Reading kind.
    pub kind: u16,
    /// Reading time, Unix ms.
    pub ts_ms: i64,
    /// Value in the signal's unit.
    pub value: f64,
}

/// What a shard knows of one device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Fleet id.
    pub fleet: String,
    /// Device id.
    pub device: String,
    /// Batches stored, as (epoch, seq) ranges: the dedupe state.
    pub seen: SeqSet,
    /// Latest reading per signal, newest by reading time.
    pub latest: Vec<Latest>,
    /// Gateway of the last batch stored.
    pub last_gateway: String,
    /// When that gateway received it, Unix ms.
    pub last_received_ms: i64,
    /// The newest (epoch, seq) stored: a newer batch through another gateway moves the unit there.
    pub last_batch: (u32, u32),
    /// Windows, detectors and held batches.
    pub analytics: DeviceAnalytics,
    /// Dead letters taken in again (`POST /deadletter/replay`), by
    /// (epoch, seq, kind, reading time; `i64::MIN` for a whole raw series).
    pub replayed: std::collections::BTreeSet<(u32, u32, u16, i64)>,
    /// Batches from boot epochs below this are refused (dead letter `stale_epoch`):
    /// the dedupe state of those epochs was forgotten, so storing one could store
    /// it twice.
    pub epoch_floor: u32,
}

impl DeviceState {
    /// A reading of `kind` at `ts_ms`: the latest value of that signal unless a
    /// newer one is known.
    #[inline]
    pub fn note_latest(&mut self, kind: u16, ts_ms: i64, value: f64) {
        match self.latest.iter_mut().find(|l| l.kind == kind) {
            Some(l) if l.ts_ms <= ts_ms => *l = Latest { kind, ts_ms, value },
            Some(_) => {}
            None => self.latest.push(Latest { kind, ts_ms, value }),
        }
    }
}

/// Most hashes of unauthenticated dead letters a checkpoint remembers for dedupe.
pub const DEADLETTER_SEEN_MAX: usize = 65_536;

/// A file staged by a commit and published once its checkpoint is written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// Staged object.
    pub staged: String,
    /// Object in the dataset.
    pub published: String,
}

/// Totals since the shard was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Readings rows stored.
    pub readings: u64,
    /// Batches stored.
    pub batches: u64,
    /// Dead-letter rows stored.
    pub deadletters: u64,
    /// Files published.
    pub files: u64,
}

/// One shard's state as of one commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Shard.
    pub shard: u16,
    /// Shard count the shard belongs to (a node with another count must not load it).
    pub shard_count: u16,
    /// Commit generation; the first commit is 1.
    pub generation: u64,
    /// Commit time, Unix ms.
    pub committed_at_ms: i64,
    /// Node that wrote it.
    pub node: String,
    /// Per device.
    pub devices: Vec<DeviceState>,
    /// Hashes of dead letters stored whose sender cannot be authenticated (so no
    /// (device, epoch, seq) to dedupe by), oldest first, bounded.
    pub deadletter_seen: Vec<u64>,
    /// Files this commit publishes.
    pub publish: Vec<Publish>,
    /// Totals.
    pub totals: Totals,
    /// Gateways' clocks as this shard heard them (for silence detection).
    pub clocks: Vec<GatewayClock>,
    /// Events this commit stored, to publish as alerts (again after a restart:
    /// alert ids make the repeat recognizable).
    pub outbox: Vec<Event>,
    /// The claim of the shard's head under which it was written (0 before claims).
    pub claim: u64,
    /// The writer's lease epoch (0 without leases).
    pub epoch: u64,
    /// Per vehicle with closed windows: what the models remember.
    pub models: Vec<ModelMemory>,
}

/// What the models remember of one vehicle between commits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMemory {
    /// Fleet id.
    pub fleet: String,
    /// Device id.
    pub device: String,
    /// Its last closed one-minute windows, oldest first (as many as the
    /// model that looks furthest back needs).
    pub windows: Vec<fleetline_inference::Window>,
    /// Its tire risk was at or above the alert threshold in its newest
    /// scored window (an event is raised when this turns true).
    pub risk_high: bool,
}

/// A gateway's clock as a shard hears it: the latest receipt time of its entries,
/// and since when it has been heard without a pause.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayClock {
    /// Gateway id.
    pub gateway: String,
    /// Latest receipt time, Unix ms (the gateway's clock).
    pub last: i64,
    /// Start of the current unpaused run, Unix ms.
    pub since: i64,
}

/// Format 1, read for upgrades.
mod v1 {
    use super::{DeviceAnalytics, Latest, Publish, SeqSet, Totals};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub struct DeviceState {
        pub fleet: String,
        pub device: String,
        pub seen: SeqSet,
        pub latest: Vec<Latest>,
        pub last_gateway: String,
        pub last_received_ms: i64,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Checkpoint {
        pub shard: u16,
        pub shard_count: u16,
        pub generation: u64,
        pub committed_at_ms: i64,
        pub node: String,
        pub devices: Vec<DeviceState>,
        pub deadletter_seen: Vec<u64>,
        pub publish: Vec<Publish>,
        pub totals: Totals,
    }

    impl From<Checkpoint> for super::Checkpoint {
        fn from(c: Checkpoint) -> Self {
            Self {
                shard: c.shard,
                shard_count: c.shard_count,
                generation: c.generation,
                committed_at_ms: c.committed_at_ms,
                node: c.node,
                devices: c
                    .devices
                    .into_iter()
                    .map(|d| super::DeviceState {
                        last_batch: d.seen.newest().unwrap_or_default(),
                        analytics: d.seen.newest().map(DeviceAnalytics::resume_after).unwrap_or_default(),
                        fleet: d.fleet,
                        device: d.device,
                        seen: d.seen,
                        latest: d.latest,
                        last_gateway: d.last_gateway,
                        last_received_ms: d.last_received_ms,
                        replayed: Default::default(),
                        epoch_floor: 0,
                    })
                    .collect(),
                deadletter_seen: c.deadletter_seen,
                publish: c.publish,
                totals: c.totals,
                clocks: Vec::new(),
                outbox: Vec::new(),
                claim: 0,
                epoch: 0,
                models: Vec::new(),
            }
        }
    }
}

/// Format 2, read for upgrades.
mod v2 {
    use super::{DeviceAnalytics, Event, GatewayClock, Latest, Publish, SeqSet, Totals};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub struct DeviceState {
        pub fleet: String,
        pub device: String,
        pub seen: SeqSet,
        pub latest: Vec<Latest>,
        pub last_gateway: String,
        pub last_received_ms: i64,
        pub last_batch: (u32, u32),
        pub analytics: DeviceAnalytics,
        pub replayed: std::collections::BTreeSet<(u32, u32, u16, i64)>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Checkpoint {
        pub shard: u16,
        pub shard_count: u16,
        pub generation: u64,
        pub committed_at_ms: i64,
        pub node: String,
        pub devices: Vec<DeviceState>,
        pub deadletter_seen: Vec<u64>,
        pub publish: Vec<Publish>,
        pub totals: Totals,
        pub clocks: Vec<GatewayClock>,
        pub outbox: Vec<Event>,
    }

    impl From<Checkpoint> for super::Checkpoint {
        fn from(c: Checkpoint) -> Self {
            Self {
                shard: c.shard,
                shard_count: c.shard_count,
                generation: c.generation,
                committed_at_ms: c.committed_at_ms,
                node: c.node,
                devices: c
                    .devices
                    .into_iter()
                    .map(|d| super::DeviceState {
                        // Format 2 kept the newest epochs and forgot older ones
                        // without a trace: its memory starts at the oldest epoch held.
                        epoch_floor: d.seen.oldest_epoch().unwrap_or(0),
                        fleet: d.fleet,
                        device: d.device,
                        seen: d.seen,
                        latest: d.latest,
                        last_gateway: d.last_gateway,
                        last_received_ms: d.last_received_ms,
                        last_batch: d.last_batch,
                        analytics: d.analytics,
                        replayed: d.replayed,
                    })
                    .collect(),
                deadletter_seen: c.deadletter_seen,
                publish: c.publish,
                totals: c.totals,
                clocks: c.clocks,
                outbox: c.outbox,
                claim: 0,
                epoch: 0,
                models: Vec::new(),
            }
        }
    }
}

/// Format 3, read for upgrades.
mod v3 {
    use super::{DeviceState, Event, GatewayClock, Publish, Totals};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub struct Checkpoint {
        pub shard: u16,
        pub shard_count: u16,
        pub generation: u64,
        pub committed_at_ms: i64,
        pub node: String,
        pub devices: Vec<DeviceState>,
        pub deadletter_seen: Vec<u64>,
        pub publish: Vec<Publish>,
        pub totals: Totals,
        pub clocks: Vec<GatewayClock>,
        pub outbox: Vec<Event>,
    }

    impl From<Checkpoint> for super::Checkpoint {
        fn from(c: Checkpoint) -> Self {
            Self {
                shard: c.shard,
                shard_count: c.shard_count,
                generation: c.generation,
                committed_at_ms: c.committed_at_ms,
                node: c.node,
                devices: c.devices,
                deadletter_seen: c.deadletter_seen,
                publish: c.publish,
                totals: c.totals,
                clocks: c.clocks,
                outbox: c.outbox,
                claim: 0,
                epoch: 0,
                models: Vec::new(),
            }
        }
    }
}

/// Format 4, read for upgrades.
mod v4 {
    use super::{DeviceState, Event, GatewayClock, Publish, Totals};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub struct Checkpoint {
        pub shard: u16,
        pub shard_count: u16,
        pub generation: u64,
        pub committed_at_ms: i64,
        pub node: String,
        pub devices: Vec<DeviceState>,
        pub deadletter_seen: Vec<u64>,
        pub publish: Vec<Publish>,
        pub totals: Totals,
        pub clocks: Vec<GatewayClock>,
        pub outbox: Vec<Event>,
        pub claim: u64,
        pub epoch: u64,
    }

    impl From<Checkpoint> for super::Checkpoint {
        fn from(c: Checkpoint) -> Self {
            Self {
                shard: c.shard,
                shard_count: c.shard_count,
                generation: c.generation,
                committed_at_ms: c.committed_at_ms,
                node: c.node,
                devices: c.devices,
                deadletter_seen: c.deadletter_seen,
                publish: c.publish,
                totals: c.totals,
                clocks: c.clocks,
                outbox: c.outbox,
                claim: c.claim,
                epoch: c.epoch,
                models: Vec::new(),
            }
        }
    }
}

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Not a checkpoint, or damaged.
    #[error("checkpoint damaged: {0}")]
    Damaged(&'static str),
    /// Written by a newer version.
    #[error("checkpoint format {0} is newer than this build reads ({CHECKPOINT_FORMAT})")]
    Format(u16),
}

impl Checkpoint {
    /// Serializes with magic, format and CRC.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&CHECKPOINT_FORMAT.to_le_bytes());
        // Serializing plain data into a Vec cannot fail.
        out.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and checks a checkpoint.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CheckpointError> {
        if bytes.len() < MAGIC.len() + 2 + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(CheckpointError::Damaged("no checkpoint magic"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32c::crc32c(body) != crc {
            return Err(CheckpointError::Damaged("CRC mismatch"));
        }
        let format = u16::from_le_bytes([body[6], body[7]]);
        let damaged = |_| CheckpointError::Damaged("body does not parse");
        match format {
            1 => postcard::from_bytes::<v1::Checkpoint>(&body[8..]).map(Into::into).map_err(damaged),
            2 => postcard::from_bytes::<v2::Checkpoint>(&body[8..]).map(Into::into).map_err(damaged),
            3 => postcard::from_bytes::<v3::Checkpoint>(&body[8..]).map(Into::into).map_err(damaged),
            4 => postcard::from_bytes::<v4::Checkpoint>(&body[8..]).map(Into::into).map_err(damaged),
            CHECKPOINT_FORMAT => postcard::from_bytes(&body[8..]).map_err(damaged),
            _ => Err(CheckpointError::Format(format)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_1_checkpoints_load_and_analytics_resume_after_the_stored_batches() {
        let mut seen = SeqSet::default();
        for q in 0..10 {
            seen.insert(4, q);
        }
        let old = v1::Checkpoint {
            shard: 1,
            shard_count: 8,
            generation: 3,
            committed_at_ms: 7,
            node: "cloud-1".into(),
            devices: vec![v1::DeviceState {
                fleet: "f".into(),
                device: "d".into(),
                seen,
                latest: vec![],
                last_gateway: "gw-1".into(),
                last_received_ms: 6,
            }],
            deadletter_seen: vec![],
            publish: vec![],
            totals: Totals::default(),
        };
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&postcard::to_allocvec(&old).unwrap());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let c = Checkpoint::from_bytes(&bytes).unwrap();
        assert_eq!((c.shard, c.generation, c.devices.len()), (1, 3, 1));
        assert_eq!(c.devices[0].last_batch, (4, 9));
        assert_eq!(c.devices[0].analytics, DeviceAnalytics::resume_after((4, 9)));
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let mut seen = SeqSet::default();
        seen.insert(1, 0);
        seen.insert(1, 1);
        let c = Checkpoint {
            shard: 3,
            shard_count: 64,
            generation: 9,
            committed_at_ms: 1234,
            node: "cloud-1".into(),
            devices: vec![DeviceState {
                fleet: "f".into(),
                device: "d".into(),
                seen,
                latest: vec![Latest { kind: 3, ts_ms: 5, value: 1.5 }],
                last_gateway: "gw-1".into(),
                last_received_ms: 6,
                last_batch: (1, 1),
                analytics: Default::default(),
                replayed: [(1, 2, 3, i64::MIN)].into(),
                epoch_floor: 7,
            }],
            deadletter_seen: vec![42],
            publish: vec![Publish { staged: "a".into(), published: "b".into() }],
            totals: Totals { readings: 1, batches: 2, deadletters: 3, files: 4 },
            clocks: vec![GatewayClock { gateway: "gw-1".into(), last: 9, since: 3 }],
            outbox: Vec::new(),
            claim: 5,
            epoch: 2,
            models: vec![ModelMemory {
                fleet: "f".into(),
                device: "d".into(),
                windows: vec![fleetline_inference::Window {
                    start_ms: 60_000,
                    avg_speed_kmh: Some(42.0),
                    ..Default::default()
                }],
                risk_high: true,
            }],
        };
        let bytes = c.to_bytes();
        assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), c);
        // The same checkpoint as format 4 wrote it: everything but the models' memory.
        let old = v4::Checkpoint {
            shard: c.shard,
            shard_count: c.shard_count,
            generation: c.generation,
            committed_at_ms: c.committed_at_ms,
            node: c.node.clone(),
            devices: c.devices.clone(),
            deadletter_seen: c.deadletter_seen.clone(),
            publish: c.publish.clone(),
            totals: c.totals,
            clocks: c.clocks.clone(),
            outbox: c.outbox.clone(),
            claim: c.claim,
            epoch: c.epoch,
        };
        let mut v4_bytes = MAGIC.to_vec();
        v4_bytes.extend_from_slice(&4u16.to_le_bytes());
        v4_bytes.extend_from_slice(&postcard::to_allocvec(&old).unwrap());
        let crc = crc32c::crc32c(&v4_bytes);
        v4_bytes.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(Checkpoint::from_bytes(&v4_bytes).unwrap(), Checkpoint { models: Vec::new(), ..c.clone() });
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Checkpoint::from_bytes(&bad).is_err(), "flip at {i} went unnoticed");
        }
        assert!(Checkpoint::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert_eq!(generation_of(&checkpoint_path(3, 9, 4)), Some(9));
        assert_eq!(generation_of("_fleetline/checkpoints/shard-003/000000000009.ckpt"), Some(9));
    }
}
