//! The device side: the embedded broker, TLS in front of it, the provisioning
//! registry, and the ingest path from publish to durable ack.

pub mod broker;
pub mod ingest;
pub mod registry;
pub mod tls;
