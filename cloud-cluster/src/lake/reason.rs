//! Why a dead letter is one: the `reason` column of the `deadletter` dataset.

pub use fleetline_wire::reason::{AUTH_FAILED, MALFORMED, STALE_EPOCH, UNDECODABLE, UNKNOWN_DEVICE};

/// A bundle whose header or body does not parse.
pub const BUNDLE_MALFORMED: &str = "bundle_malformed";
/// A bundle from a gateway that is not provisioned.
pub const UNKNOWN_GATEWAY: &str = "unknown_gateway";
/// A bundle whose seal does not verify under its gateway's key.
pub const BUNDLE_AUTH_FAILED: &str = "bundle_auth_failed";
/// A batch of a device that hashes to another shard (shard counts differ).
pub const WRONG_SHARD: &str = "wrong_shard";
/// A series of a reading kind this build does not know (raw series kept).
pub const UNKNOWN_KIND: &str = "unknown_kind";
/// An authentic batch naming a schema id the registry does not have.
pub const UNKNOWN_SCHEMA: &str = "unknown_schema";
/// A reading of a kind its batch's schema does not list.
pub const NOT_IN_SCHEMA: &str = "not_in_schema";
/// A reading outside its signal's valid range in the batch's schema.
pub const OUT_OF_RANGE: &str = "out_of_range";
/// A reading dated further after its gateway's receipt than the allowed skew.
pub const FUTURE_TIMESTAMP: &str = "future_timestamp";
/// A reading dated before the epoch floor (a unit whose clock is not set).
pub const BEFORE_EPOCH_FLOOR: &str = "before_epoch_floor";

/// Whether a dead letter of this reason is an authentic batch, deduped by its
/// (device, epoch, seq) like stored batches; the others are deduped by a hash
/// of their bytes, since their sender is unproven.
pub fn is_authentic(reason: &str) -> bool {
    [UNDECODABLE, UNKNOWN_KIND, UNKNOWN_SCHEMA, NOT_IN_SCHEMA, OUT_OF_RANGE, FUTURE_TIMESTAMP, BEFORE_EPOCH_FLOOR]
        .contains(&reason)
}
