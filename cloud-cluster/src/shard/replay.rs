//! Pure: what a dead-letter replay hands a shard — one dead letter that holds
//! readings — and what the shard reports back. The shard judges each item in
//! [`super::state::ShardState::replay`]; reading the items from the lake and
//! sending them round is `crate::jobs::replay`.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use fleetline_wire::signals::WireType;

use crate::lake::reason;
use crate::registry::SignalDef;

/// Dead-letter reasons that hold readings a schema fix can make valid.
pub const REPLAYABLE: [&str; 4] =
    [reason::UNKNOWN_KIND, reason::NOT_IN_SCHEMA, reason::OUT_OF_RANGE, reason::UNKNOWN_SCHEMA];

/// One dead letter to take in again.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayItem {
    /// Fleet.
    pub fleet: String,
    /// Device.
    pub device: String,
    /// Boot epoch of its batch.
    pub epoch: u32,
    /// Seq of its batch.
    pub seq: u32,
    /// Why it was refused.
    pub reason: String,
    /// Reading kind.
    pub kind: u16,
    /// Reading time (one reading) or the batch's base time (a raw series).
    pub ts_ms: i64,
    /// Gateway that forwarded it.
    pub gateway: String,
    /// When that gateway received it.
    pub received_at_ms: i64,
    /// The raw series, or the value as f64 little-endian.
    pub raw: Vec<u8>,
    /// Schema id its batch named (absent in files written before it was recorded).
    pub schema: Option<u32>,
}

impl ReplayItem {
    /// What marks it as replayed in its device's state.
    pub fn key(&self) -> (u32, u32, u16, i64) {
        match self.reason.as_str() {
            reason::UNKNOWN_SCHEMA => (self.epoch, self.seq, u16::MAX, i64::MIN),
            reason::UNKNOWN_KIND => (self.epoch, self.seq, self.kind, i64::MIN),
            _ => (self.epoch, self.seq, self.kind, self.ts_ms),
        }
    }

    /// Its readings `(ts, value)` under `def`; `Err` when they do not decode.
    pub fn readings(&self, def: &SignalDef) -> Result<Vec<(i64, f64)>, Undecodable> {
        if self.reason == reason::UNKNOWN_KIND {
            let wire = match def.encoding.as_str() {
                "delta" => WireType::Delta,
                e => WireType::Cyclic {
                    modulus: e.strip_prefix("cyclic/").and_then(|m| m.parse().ok()).ok_or(Undecodable::Encoding)?,
                },
            };
            let scale = 10f64.powi(i32::from(def.scale_exp));
            fleetline_wire::batch::series_samples(&self.raw, wire)
                .map(|s| {
                    let (t, raw) = s.map_err(Undecodable::Series)?;
                    Ok((self.ts_ms + t, raw as f64 * scale))
                })
                .collect()
        } else {
            let bytes: [u8; 8] = self.raw.as_slice().try_into().map_err(|_| Undecodable::NotAValue)?;
            Ok(vec![(self.ts_ms, f64::from_le_bytes(bytes))])
        }
    }
}

/// Why a dead letter's readings do not decode.
#[derive(Debug, thiserror::Error)]
pub enum Undecodable {
    /// The schema names an encoding this build does not know.
    #[error("unknown encoding")]
    Encoding,
    /// The raw series is damaged.
    #[error("series: {0}")]
    Series(fleetline_wire::WireError),
    /// A single reading's value is not 8 bytes.
    #[error("value is not 8 bytes")]
    NotAValue,
}

/// What a replay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayOutcome {
    /// Dead letters read back that hold readings.
    pub candidates: u64,
    /// Taken in now.
    pub replayed: u64,
    /// Readings rows those added.
    pub readings: u64,
    /// Taken in by an earlier replay.
    pub already_replayed: u64,
    /// Still refused by the current schema (left for a later fix).
    pub still_invalid: u64,
}

impl std::ops::AddAssign for ReplayOutcome {
    fn add_assign(&mut self, o: Self) {
        self.candidates += o.candidates;
        self.replayed += o.replayed;
        self.readings += o.readings;
        self.already_replayed += o.already_replayed;
        self.still_invalid += o.still_invalid;
    }
}

/// A registered signal path as `&'static str` (the readings rows' signal column
/// holds static names). Each distinct path is kept once for the process's life:
/// bounded by what the registry holds.
pub fn intern(path: &str) -> &'static str {
    static PATHS: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Default::default);
    if let Some(s) = fleetline_wire::signals::spec_by_path(path) {
        return s.path;
    }
    let mut set = PATHS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = set.get(path) {
        return s;
    }
    let s: &'static str = Box::leak(path.to_string().into_boxed_str());
    set.insert(s);
    s
}
