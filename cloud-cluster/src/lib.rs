//! The Fleetline cloud node.
//!
//! Takes gateway bundles from the ingest broker (embedded rumqttd or an external
//! broker), opens them and every device batch inside, dedupes by (device, epoch,
//! seq), writes the `readings` and `deadletter` datasets as zstd Parquet in Hive
//! partitions to an object store, and acks each bundle to its gateway only once
//! the segment holding it and the shard's checkpoint are committed. Every
//! per-shard state lives behind one owner (a shard task) and one checkpoint; a
//! single node owns every shard, the cluster adds owners on the same design.

pub mod analytics;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod http;
pub mod inference;
pub mod ingest;
pub mod jobs;
pub mod keys;
pub mod lake;
pub mod node;
pub mod registry;
pub mod shard;
pub mod telemetry;
