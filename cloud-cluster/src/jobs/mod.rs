//! Work over the whole lake rather than one shard's stream: the hourly-to-daily
//! rollup, dead-letter replay, re-scoring history with model versions, the offline
//! repair of a shard's checkpoint, and the
//! check that every shard had one writer per generation. In a cluster the first
//! two run on one node at a time.

pub mod generations;
pub mod repair;
pub mod replay;
pub mod rescore;
pub mod rollup;
