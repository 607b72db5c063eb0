//! The device side: the embedded broker, TLS in front of it, the provisioning
//! registry, and the ingest path from publish to durable ack.

pub mod broker;
pub mod front;
pub mod ingest;
pub mod registry;
