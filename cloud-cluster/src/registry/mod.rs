//! The schema registry: versioned schemas per subject, Confluent's compatibility
//! modes, ids assigned and persisted by the registry (in the object store).
//!
//! A schema lists signals: VSS path, kind id (the wire id), encoding (`delta` or
//! `cyclic/<modulus>`) and decimal scale of the raw value, unit, valid range. The
//! batch header's schema id is a registry id; on first start the node registers
//! the SDK's signal table as subject `fleetline.readings`, which gets id 1
//! (`SCHEMA_V1`).
//!
//! Compatibility, with "reader R can read data written under W" meaning: every kind
//! of W is in R with the same path, unit, encoding and scale, and R's valid range
//! contains W's (otherwise data valid when written becomes invalid when read):
//! - `BACKWARD`: the new schema can read data written under the latest one
//!   (kinds may be added and ranges widened; removing a kind or narrowing fails);
//! - `FORWARD`: the latest can read data written under the new one (kinds may be
//!   removed and ranges narrowed);
//! - `FULL`: both;
//! - `*_TRANSITIVE`: the same against every earlier version, not only the latest;
//! - `NONE`: anything that parses.
//!
//! Re-registering a schema a subject already has returns its existing version.
//!
//! Several nodes share one registry: its state object changes only by
//! compare-and-swap against the version a node read (a node that lost the race
//! reads again and redoes its change), so two nodes never hand out one id twice;
//! every node reads the state again every few seconds ([`Registry::refresh`]).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::lake::shared::{Document, Edit, Shared, SharedError};
use crate::lake::store::Store;

pub mod model;

pub use model::{Compatibility, Schema, SignalDef, can_read, check};

/// Subject of the readings schema.
pub const READINGS_SUBJECT: &str = "fleetline.readings";

const STATE_PATH: &str = "_fleetline/registry/state.json";
const STATE_FORMAT: u32 = 1;

/// The persisted registry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    format: u32,
    next_id: u32,
    /// id → canonical schema text.
    schemas: BTreeMap<u32, String>,
    /// subject → ids, version = index + 1.
    subjects: BTreeMap<String, Vec<u32>>,
    compatibility: Compatibility,
    subject_compatibility: BTreeMap<String, Compatibility>,
}

impl Document for State {
    const NAME: &'static str = "registry state";
    fn fresh() -> Self {
        State { format: STATE_FORMAT, next_id: 1, ..Default::default() }
    }
    fn check(&self) -> Result<(), String> {
        if self.format == STATE_FORMAT { Ok(()) } else { Err(format!("format {} is not {STATE_FORMAT}", self.format)) }
    }
}

impl From<SharedError> for RegistryError {
    fn from(e: SharedError) -> Self {
        match e {
            SharedError::Store(e) => RegistryError::Store(e),
            SharedError::Invalid(e) => RegistryError::Invalid(e),
            SharedError::Contended => RegistryError::Contended,
        }
    }
}

/// Why a registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The schema does not parse or is inconsistent (HTTP 422).
    #[error("invalid schema: {0}")]
    Invalid(String),
    /// Incompatible under the subject's mode (HTTP 409).
    #[error("schema is incompatible: {}", .0.join("; "))]
    Incompatible(Vec<String>),
    /// Persisting failed (HTTP 500).
    #[error("registry store: {0}")]
    Store(#[from] object_store::Error),
    /// Other nodes kept changing the registry while this one tried (HTTP 503).
    #[error("the registry kept changing under this change; try again")]
    Contended,
}

/// A registered version.
#[derive(Clone, Debug, Serialize)]
pub struct Version {
    /// Subject.
    pub subject: String,
    /// Version (from 1).
    pub version: u32,
    /// Schema id.
    pub id: u32,
    /// Canonical schema text.
    pub schema: String,
}

/// The registry: state in memory, every change written to the store first.
#[derive(Debug)]
pub struct Registry {
    state: Shared<State>,
    parsed: RwLock<BTreeMap<u32, Arc<Schema>>>,
}

impl Registry {
    /// Loads the registry; on first start registers the signal table as
    /// `fleetline.readings` (id 1).
    pub async fn open(store: Store) -> Result<Self, RegistryError> {
        let state = Shared::open(store, STATE_PATH).await?;
        let parsed = Self::parse_all(&state.read())?;
        let r = Self { state, parsed: RwLock::new(parsed) };
        if r.versions(READINGS_SUBJECT).is_none() {
            r.register(READINGS_SUBJECT, &Schema::signal_table().canonical()).await?;
        }
        Ok(r)
    }

    fn parse_all(state: &State) -> Result<BTreeMap<u32, Arc<Schema>>, RegistryError> {
        let mut parsed = BTreeMap::new();
        for (id, text) in &state.schemas {
            parsed.insert(*id, Arc::new(Schema::parse(text).map_err(|e| RegistryError::Invalid(e.0))?));
        }
        Ok(parsed)
    }

    /// Reads the stored state again if another node changed it; true if it had.
    pub async fn refresh(&self) -> Result<bool, RegistryError> {
        self.state.refresh(|state| self.adopt(state)).await
    }

    /// Parses the schemas of a state read from the store before it becomes this
    /// node's: a schema that does not parse keeps the state this node has.
    fn adopt(&self, state: &State) -> Result<(), RegistryError> {
        let parsed = Self::parse_all(state)?;
        if let Ok(mut p) = self.parsed.write() {
            *p = parsed;
        }
        Ok(())
    }

    /// Reads the state again every `every` until dropped (a cluster's nodes see
    /// each other's registrations within that).
    pub async fn keep_fresh(self: Arc<Self>, every: std::time::Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.refresh().await {
                Ok(true) => tracing::info!("schema registry changed on another node; reloaded"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the schema registry; keeping what is loaded"),
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read()
    }

    /// A schema by id.
    pub fn schema(&self, id: u32) -> Option<Arc<Schema>> {
        self.parsed.read().ok()?.get(&id).cloned()
    }

    /// Subjects.
    pub fn subjects(&self) -> Vec<String> {
        self.read().subjects.keys().cloned().collect()
    }

    /// A subject's versions.
    pub fn versions(&self, subject: &str) -> Option<Vec<u32>> {
        self.read().subjects.get(subject).map(|ids| (1..=ids.len() as u32).collect())
    }

    /// The subject schema id `id` was registered under: `prefer` when it is one of
    /// them, else `fleetline.readings`, else the first by name.
    pub fn subject_of(&self, id: u32, prefer: Option<&str>) -> Option<String> {
        let st = self.read();
        let mut with: Vec<&String> = st.subjects.iter().filter(|(_, ids)| ids.contains(&id)).map(|(s, _)| s).collect();
        with.sort_by_key(|s| (Some(s.as_str()) != prefer, s.as_str() != READINGS_SUBJECT, s.as_str()));
        with.first().map(|s| (*s).clone())
    }

    /// The newest schema of `subject`.
    pub fn latest(&self, subject: &str) -> Option<Arc<Schema>> {
        self.schema(self.version(subject, None)?.id)
    }

    /// One version (`None`: latest).
    pub fn version(&self, subject: &str, version: Option<u32>) -> Option<Version> {
        let st = self.read();
        let ids = st.subjects.get(subject)?;
        let v = version.unwrap_or(ids.len() as u32);
        let id = *ids.get((v as usize).checked_sub(1)?)?;
        Some(Version { subject: subject.into(), version: v, id, schema: st.schemas.get(&id)?.clone() })
    }

    /// The mode that applies to `subject`.
    pub fn compatibility(&self, subject: Option<&str>) -> Compatibility {
        let st = self.read();
        subject.and_then(|s| st.subject_compatibility.get(s).copied()).unwrap_or(st.compatibility)
    }

    /// Why `text` could not be registered under `subject` now (empty: it could).
    pub fn test(&self, subject: &str, text: &str) -> Result<Vec<String>, RegistryError> {
        let new = Schema::parse(text).map_err(|e| RegistryError::Invalid(e.0))?;
        let ids = self.read().subjects.get(subject).cloned().unwrap_or_default();
        let earlier: Vec<Arc<Schema>> = ids.iter().filter_map(|id| self.schema(*id)).collect();
        let refs: Vec<&Schema> = earlier.iter().map(AsRef::as_ref).collect();
        Ok(check(self.compatibility(Some(subject)), &new, &refs))
    }

    /// Registers `text` under `subject`; returns its version.
    pub async fn register(&self, subject: &str, text: &str) -> Result<Version, RegistryError> {
        let canonical = Schema::parse(text).map_err(|e| RegistryError::Invalid(e.0))?.canonical();
        let (id, version) = self
            .change(|next| {
                let existing = next.schemas.iter().find(|(_, t)| **t == canonical).map(|(id, _)| *id);
                if let Some(id) = existing
                    && let Some(pos) = next.subjects.get(subject).and_then(|ids| ids.iter().position(|i| *i == id))
                {
                    return Ok(Edit::Unchanged((id, pos as u32 + 1)));
                }
                let problems = self.test(subject, &canonical)?;
                if !problems.is_empty() {
                    return Err(RegistryError::Incompatible(problems));
                }
                let id = existing.unwrap_or_else(|| {
                    let id = next.next_id;
                    next.next_id += 1;
                    id
                });
                next.schemas.insert(id, canonical.clone());
                let ids = next.subjects.entry(subject.into()).or_default();
                ids.push(id);
                Ok(Edit::Changed((id, ids.len() as u32)))
            })
            .await?;
        if let Ok(mut p) = self.parsed.write() {
            p.entry(id).or_insert_with(|| Arc::new(Schema::parse(&canonical).unwrap_or(Schema { signals: vec![] })));
        }
        Ok(Version { subject: subject.into(), version, id, schema: canonical })
    }

    /// Sets the global mode, or a subject's.
    pub async fn set_compatibility(&self, subject: Option<&str>, mode: Compatibility) -> Result<(), RegistryError> {
        self.change(|next| {
            match subject {
                Some(s) => {
                    next.subject_compatibility.insert(s.into(), mode);
                }
                None => next.compatibility = mode,
            }
            Ok(Edit::Changed(()))
        })
        .await
    }

    /// Applies `edit` to the state as this node knows it and stores the result
    /// by compare-and-swap; when another node changed the state first, adopts
    /// theirs (after a jittered wait) and edits again.
    async fn change<R>(
        &self,
        edit: impl FnMut(&mut State) -> Result<Edit<R>, RegistryError>,
    ) -> Result<R, RegistryError> {
        self.state.change(edit, |state| self.adopt(state)).await
    }
}
