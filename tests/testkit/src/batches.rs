//! Sealed device batches and gateway bundles built directly with the wire format,
//! for tests that play a device or a gateway without running one.

use fleetline_wire::bundle::{BundleEntry, BundleId, Codec, seal_bundle};
use fleetline_wire::signals::kind;
use fleetline_wire::{BatchHeader, BatchWriter, DeviceKey, SCHEMA_V1};

/// A sealed batch of device `device` in fleet `acme`: `samples` speed readings one
/// second apart from `base_ms`, plus a series of unknown kind `unknown_kind` if given.
pub fn sealed_batch(
    device: &str,
    key: &DeviceKey,
    epoch: u32,
    seq: u32,
    base_ms: u64,
    samples: usize,
    unknown_kind: Option<u16>,
) -> Vec<u8> {
    sealed_batch_with_schema(SCHEMA_V1, device, key, epoch, seq, base_ms, samples, unknown_kind)
}

/// Like [`sealed_batch`], naming schema id `schema` in the header. Speeds run
/// 50.0, 50.1, … km/h from `seq`.
#[allow(clippy::too_many_arguments)] // A test builder: every field of the header.
pub fn sealed_batch_with_schema(
    schema: u16,
    device: &str,
    key: &DeviceKey,
    epoch: u32,
    seq: u32,
    base_ms: u64,
    samples: usize,
    unknown_kind: Option<u16>,
) -> Vec<u8> {
    let mut buf = vec![0u8; fleetline_wire::batch::MAX_SEALED_LEN];
    let header = BatchHeader {
        format: fleetline_wire::batch::BATCH_FORMAT,
        schema,
        fleet: "acme",
        device,
        epoch,
        seq,
        base_time_ms: base_ms,
    };
    let mut w = BatchWriter::new(&mut buf, &header).expect("header fits");
    w.begin_series(kind::SPEED).expect("series");
    for i in 0..samples {
        w.push(i as i64 * 1000, 500 + (seq as i64 + i as i64) % 700).expect("sample fits");
    }
    if let Some(kind) = unknown_kind {
        w.raw_series(kind, &[2, 4, 6, 8]).expect("raw series fits");
    }
    let n = w.seal(key).expect("seal");
    buf.truncate(n);
    buf
}

/// A sealed LZ4 bundle of `batches` from gateway `gateway` for `shard`.
pub fn bundle(
    key: &DeviceKey,
    gateway: &str,
    id: u64,
    shard: u16,
    batches: &[Vec<u8>],
    received_at_ms: u64,
) -> Vec<u8> {
    let entries: Vec<BundleEntry> = batches.iter().map(|b| BundleEntry { received_at_ms, batch: b.clone() }).collect();
    seal_bundle(key, gateway, BundleId(id), shard, Codec::Lz4, &entries).expect("bundle seals")
}
