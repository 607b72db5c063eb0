//! Work over the whole lake rather than one shard's stream: the hourly-to-daily
//! rollup, dead-letter replay, and the offline repair of a shard's checkpoint. In a
//! cluster the first two run on one node at a time.

pub mod repair;
pub mod replay;
pub mod rollup;
