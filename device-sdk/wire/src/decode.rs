//! Owned decoding of opened batches for gateways, cloud nodes and tools (`std`).

use std::string::String;
use std::vec::Vec;

use crate::WireError;
use crate::batch::OpenBatch;
use crate::signals::{self, SignalKind};

/// One sample of a known kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Kind id.
    pub kind: SignalKind,
    /// Unix time in milliseconds.
    pub ts_ms: i64,
    /// Fixed-point raw value.
    pub raw: i64,
    /// Engineering value in the signal's unit.
    pub value: f64,
}

/// A series whose kind this build does not know, kept byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownSeries {
    /// Kind id.
    pub kind: SignalKind,
    /// The series' encoded samples, exactly as received.
    pub raw: Vec<u8>,
}

/// A fully decoded batch.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedBatch {
    /// Fleet id.
    pub fleet: String,
    /// Device id.
    pub device: String,
    /// Schema id.
    pub schema: u16,
    /// Boot epoch.
    pub epoch: u32,
    /// Seq within the epoch.
    pub seq: u32,
    /// Base time, Unix ms.
    pub base_time_ms: u64,
    /// Samples of known kinds, series by series in body order.
    pub samples: Vec<Sample>,
    /// Series of kinds this build does not know.
    pub unknown: Vec<UnknownSeries>,
}

impl OpenBatch<'_> {
    /// Decodes every series; unknown kinds are kept raw, never dropped.
    pub fn decode(&self) -> Result<DecodedBatch, WireError> {
        let h = &self.header;
        let base = i64::try_from(h.base_time_ms).map_err(|_| WireError::Malformed("base time"))?;
        let mut samples = Vec::new();
        let mut unknown = Vec::new();
        for series in self.series() {
            let series = series?;
            match (signals::spec(series.kind), series.samples()) {
                (Some(spec), Some(iter)) => {
                    for s in iter {
                        let (t, raw) = s?;
                        let ts_ms = base.checked_add(t).ok_or(WireError::Malformed("sample time overflows"))?;
                        samples.push(Sample { kind: series.kind, ts_ms, raw, value: spec.value(raw) });
                    }
                }
                _ => unknown.push(UnknownSeries { kind: series.kind, raw: series.raw.to_vec() }),
            }
        }
        Ok(DecodedBatch {
            fleet: h.fleet.into(),
            device: h.device.into(),
            schema: h.schema,
            epoch: h.epoch,
            seq: h.seq,
            base_time_ms: h.base_time_ms,
            samples,
            unknown,
        })
    }
}
