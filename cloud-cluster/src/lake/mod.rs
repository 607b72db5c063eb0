//! The lake: the object store the node writes to, the datasets' schemas and
//! column names, and where every object lives.
//!
//! Depends on `analytics` for the row types it encodes, and on nothing else of
//! the node.

pub mod partition;
pub mod reason;
pub mod rows;
pub mod schema;
pub mod shared;
pub mod store;

pub use store::Store;
