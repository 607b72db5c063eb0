//! Why a device batch is refused, in the words both ends use: the gateway when a
//! unit publishes it, the cloud when it opens it from a bundle. Each end adds
//! reasons of its own (topics and queue at the gateway, bundles and schemas in the
//! cloud); these are the ones they share, so a batch refused at either end is
//! counted under the same name.

/// A batch whose header does not parse, or whose ids are not valid.
pub const MALFORMED: &str = "malformed";
/// A batch of a device that is not provisioned.
pub const UNKNOWN_DEVICE: &str = "unknown_device";
/// A batch whose seal does not verify under any of its device's valid keys.
pub const AUTH_FAILED: &str = "auth_failed";
/// An authentic batch whose body does not decode.
pub const UNDECODABLE: &str = "undecodable";
/// An authentic batch from a boot epoch below its device's epoch floor (a replay).
pub const STALE_EPOCH: &str = "stale_epoch";
