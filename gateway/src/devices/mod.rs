//! The device side: the provisioning registry (the embedded broker's login check)
//! and the ingest path from publish to durable ack.

pub mod ingest;
pub mod registry;
