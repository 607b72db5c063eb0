//! Fleetline's model runtime, kept out of the gateway and the device SDK:
//! the feature spec of each model the cloud runs ([`spec`], pure) and ONNX
//! plans run with tract ([`runtime`]).
//!
//! tract-onnx 0.23 loads `LinearRegressor` and the core operators but not
//! `TreeEnsembleRegressor`, `Scaler` or `ZipMap`, and its
//! `TreeEnsembleClassifier` neither loads skl2onnx's binary classifiers nor
//! scores fast; both tree-ensemble operators are registered here instead
//! ([`ops`], scored by [`forest`]). A model with an operator none of these
//! load is refused when it is loaded (at upload), with the operator's name.

pub mod forest;
pub mod ops;
pub mod runtime;
pub mod spec;

pub use runtime::{ModelError, Plan};
pub use spec::{KINDS, ModelKind, Signature, Window, feature_hash, features};
