//! The cluster layer: which node owns which shard. Membership, leases, handover
//! and singletons build on the pieces here; what exists so far is placement.

pub mod placement;
