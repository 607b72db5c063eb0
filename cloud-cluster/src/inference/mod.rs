//! Predictive inference in the stream: the model registry (versions,
//! deployments with A/B/C variants and a shadow, kept in the object store),
//! the split of vehicles between variants, and the stage that scores a
//! commit's closed windows.
//!
//! The flow: a shard's analytics close a vehicle's one-minute window →
//! the shard computes each model's feature row from the vehicle's last
//! windows ([`fleetline_inference::features`]; the last three windows are in
//! the checkpoint, so a restart or a handover loses no history) → at commit
//! the rows are scored in a batch per model and variant on a blocking thread
//! ([`stage::score`]) → the predictions are rows of the `predictions`
//! dataset in the same commit, and a tire risk crossing the deployment's
//! threshold (live variants only) is a `tire_risk` event and an alert.
//!
//! - [`deploy`] (pure): deployments and the split by vehicle hash;
//! - [`registry`]: versions and deployments in the store, plans, the active set;
//! - [`stage`]: scoring a commit's requests.

pub mod deploy;
pub mod registry;
pub mod stage;

pub use deploy::{Deployment, Variant};
pub use registry::{ActiveSet, ModelRegistry, ModelRegistryError};
pub use stage::{ScoreRequest, Scored, Scoring};

/// How often a node reads the model registry again.
pub const MODELS_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);
