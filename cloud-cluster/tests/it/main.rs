//! The cloud node's integration tests in one binary, so arrow, parquet and
//! object_store are linked once: the commit protocol (`commit`), three nodes through chaos (`cluster`), real processes end
//! to end (`e2e`), two owners of one shard (`fencing`), the model registry (`models`), the schema registry (`registry`) and the rollup job (`rollup`).
//! Run one group with `cargo test -p fleetline-cloud --test it e2e::`.

mod cluster;
mod commit;
mod e2e;
mod fencing;
mod models;
mod registry;
mod rollup;
