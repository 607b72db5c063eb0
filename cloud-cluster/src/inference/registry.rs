//! The model registry: models → versions (ONNX bytes by sha256, the card, the
//! signature checked by loading it) and each model's deployment, kept in the
//! object store beside the schema registry, and the plans of what is
//! deployed, ready to score.
//!
//! ```text
//! _fleetline/models/state.json           versions and deployments (compare-and-swap)
//! _fleetline/models/{model}/{sha256}.onnx the files, create-only, by content
//! ```
//!
//! A version is registered only after its file is stored and tract has
//! loaded it against the model's feature spec, so every registered version
//! can run. A deployment names registered versions only. Every node reads
//! the state again every few seconds and swaps its [`ActiveSet`] in one
//! step once the plans it needs are loaded: commits in flight keep the set
//! they started with, so a swap or a rollback never pauses ingest, and each
//! prediction names the version that made it. On first start each model
//! without versions gets the one committed with the code (`models/`) as
//! version 1, deployed alone as variant `A`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use fleetline_inference::{KINDS, ModelKind, Plan};
use serde::{Deserialize, Serialize};

use super::deploy::{Deployment, Variant};
use crate::lake::shared::{Document, Edit, Shared, SharedError};
use crate::lake::store::Store;
use crate::telemetry::CloudStats;
use crate::telemetry::events::{self as ev, InternalEvent};

const STATE_PATH: &str = "_fleetline/models/state.json";
const STATE_FORMAT: u32 = 1;
/// Deployments remembered per model for rollbacks.
const HISTORY: usize = 16;
/// Largest model file taken.
pub const MAX_MODEL_BYTES: usize = 16 << 20;

/// The models committed with the code: (kind, ONNX, card).
const BUILTIN: [(ModelKind, &[u8], &str); 3] = [
    (
        ModelKind::TireRisk,
        include_bytes!("../../../models/tire_risk/model.onnx"),
        include_str!("../../../models/tire_risk/card.json"),
    ),
    (
        ModelKind::Fuel,
        include_bytes!("../../../models/fuel/model.onnx"),
        include_str!("../../../models/fuel/card.json"),
    ),
    (
        ModelKind::SpeedNext,
        include_bytes!("../../../models/speed_next/model.onnx"),
        include_str!("../../../models/speed_next/card.json"),
    ),
];

/// One registered version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Version number (from 1).
    pub version: u32,
    /// sha256 of the ONNX file, hex.
    pub sha256: String,
    /// File size.
    pub bytes: u64,
    /// The card as uploaded (features, training data, metrics).
    pub card: serde_json::Value,
    /// When it was registered, Unix ms.
    pub registered_ms: i64,
    /// `builtin` (committed with the code) or `upload`.
    pub source: String,
}

/// One model: its versions and deployments.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// Versions, oldest first.
    pub versions: Vec<ModelVersion>,
    /// What runs now (none: the model does not score).
    pub deployment: Option<Deployment>,
    /// Earlier deployments, newest last (for rollbacks).
    pub history: Vec<Deployment>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct State {
    format: u32,
    models: BTreeMap<String, ModelEntry>,
}

impl Document for State {
    const NAME: &'static str = "model registry state";
    fn fresh() -> Self {
        State { format: STATE_FORMAT, ..Default::default() }
    }
    fn check(&self) -> Result<(), String> {
        if self.format == STATE_FORMAT { Ok(()) } else { Err(format!("format {} is not {STATE_FORMAT}", self.format)) }
    }
}

impl From<SharedError> for ModelRegistryError {
    fn from(e: SharedError) -> Self {
        match e {
            SharedError::Store(e) => ModelRegistryError::Store(e),
            SharedError::Invalid(e) => ModelRegistryError::Invalid(e),
            SharedError::Contended => ModelRegistryError::Contended,
        }
    }
}

/// Why a registry change failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelRegistryError {
    /// No such model (HTTP 404).
    #[error("no model {0}; models are {1}")]
    UnknownModel(String, String),
    /// The file or the deployment cannot be used (HTTP 422).
    #[error("{0}")]
    Invalid(String),
    /// Nothing to roll back to (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The store failed (HTTP 500).
    #[error("model store: {0}")]
    Store(#[from] object_store::Error),
    /// Other nodes kept changing the registry (HTTP 503).
    #[error("the model registry kept changing under this change; try again")]
    Contended,
}

/// A live variant with its plan.
#[derive(Clone, Debug)]
pub struct LiveVariant {
    /// Label, version, weight.
    pub variant: Variant,
    /// The loaded version.
    pub plan: Arc<Plan>,
}

/// A model as it scores now.
#[derive(Clone, Debug)]
pub struct ActiveModel {
    /// Which model.
    pub kind: ModelKind,
    /// Live variants, in the deployment's order.
    pub variants: Vec<LiveVariant>,
    /// The shadow version and its plan.
    pub shadow: Option<(u32, Arc<Plan>)>,
    /// Alert threshold (classifiers).
    pub threshold: f64,
    /// When the deployment was made, Unix ms.
    pub deployed_ms: i64,
}

/// Everything deployed, as one snapshot: a commit scores with the set it took.
#[derive(Clone, Debug, Default)]
pub struct ActiveSet {
    /// Deployed models.
    pub models: Vec<ActiveModel>,
}

impl ActiveSet {
    /// The deployed model of `kind`.
    pub fn get(&self, kind: ModelKind) -> Option<&ActiveModel> {
        self.models.iter().find(|m| m.kind == kind)
    }
}

/// The registry (see the module docs).
pub struct ModelRegistry {
    store: Store,
    stats: Arc<CloudStats>,
    state: Shared<State>,
    /// Loaded plans by sha256.
    plans: Mutex<HashMap<String, Arc<Plan>>>,
    active: RwLock<Arc<ActiveSet>>,
    /// Per model, why its deployment could not be loaded here (cleared when it loads).
    load_errors: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry").finish_non_exhaustive()
    }
}

/// sha256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn model_path(name: &str, sha: &str) -> String {
    format!("_fleetline/models/{name}/{sha}.onnx")
}

fn kind_of(name: &str) -> Result<ModelKind, ModelRegistryError> {
    ModelKind::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = KINDS.iter().map(|k| k.name()).collect();
        ModelRegistryError::UnknownModel(name.into(), names.join(", "))
    })
}

/// Loads a plan off the async threads.
async fn load_plan(kind: ModelKind, bytes: Bytes) -> Result<Plan, String> {
    tokio::task::spawn_blocking(move || Plan::load(kind, &bytes))
        .await
        .map_err(|e| format!("loader task failed: {e}"))?
        .map_err(|e| e.to_string())
}

impl ModelRegistry {
    /// Loads the registry, registers and deploys the committed models of
    /// kinds that have no version yet, and loads what is deployed.
    pub async fn open(store: Store, stats: Arc<CloudStats>) -> Result<Self, ModelRegistryError> {
        let state = Shared::open(store.clone(), STATE_PATH).await?;
        let r = Self {
            store,
            stats,
            state,
            plans: Mutex::default(),
            active: RwLock::default(),
            load_errors: Mutex::default(),
        };
        for (kind, onnx, card) in BUILTIN {
            let has = r.read().models.get(kind.name()).is_some_and(|m| !m.versions.is_empty());
            if !has {
                let card: serde_json::Value = serde_json::from_str(card).unwrap_or_default();
                let v = r.register(kind.name(), Bytes::from_static(onnx), card, "builtin").await?;
                r.deploy(kind.name(), Deployment::only(v.version)).await?;
            }
        }
        r.reload_active().await;
        Ok(r)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read()
    }

    /// What scores now.
    pub fn active(&self) -> Arc<ActiveSet> {
        self.active.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Every model with its versions and deployment.
    pub fn models(&self) -> BTreeMap<String, ModelEntry> {
        self.read().models.clone()
    }

    /// One model.
    pub fn model(&self, name: &str) -> Result<ModelEntry, ModelRegistryError> {
        kind_of(name)?;
        Ok(self.read().models.get(name).cloned().unwrap_or_default())
    }

    /// Per model, why its deployment does not run here (empty when all do).
    pub fn load_errors(&self) -> BTreeMap<String, String> {
        self.load_errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The stored file of a version.
    pub async fn file(&self, name: &str, version: u32) -> Result<Bytes, ModelRegistryError> {
        let entry = self.model(name)?;
        let v = entry
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| ModelRegistryError::Invalid(format!("{name} has no version {version}")))?;
        self.store.get(&model_path(name, &v.sha256)).await?.ok_or_else(|| {
            ModelRegistryError::Invalid(format!("{name} version {version}: file missing from the store"))
        })
    }

    /// Registers `onnx` as the next version of `name`: refused unless tract
    /// loads it against the model's feature spec. The same bytes registered
    /// again return the version they already have.
    pub async fn register(
        &self,
        name: &str,
        onnx: Bytes,
        card: serde_json::Value,
        source: &str,
    ) -> Result<ModelVersion, ModelRegistryError> {
        let kind = kind_of(name)?;
        if onnx.len() > MAX_MODEL_BYTES {
            return Err(ModelRegistryError::Invalid(format!(
                "model file of {} bytes, at most {MAX_MODEL_BYTES}",
                onnx.len()
            )));
        }
        if !card.is_object() && !card.is_null() {
            return Err(ModelRegistryError::Invalid("the card must be a JSON object".into()));
        }
        let sha = sha256_hex(&onnx);
        if let Some(v) = self.read().models.get(name).and_then(|m| m.versions.iter().find(|v| v.sha256 == sha)) {
            return Ok(v.clone());
        }
        let plan = load_plan(kind, onnx.clone()).await.map_err(ModelRegistryError::Invalid)?;
        let path = model_path(name, &sha);
        match self.store.put_new(&path, onnx.clone()).await {
            Ok(()) => {}
            // Content-addressed: an object of this name holds these bytes (an
            // earlier attempt, or another node registering the same file).
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if let Ok(mut p) = self.plans.lock() {
            p.insert(sha.clone(), Arc::new(plan));
        }
        let bytes = onnx.len() as u64;
        let now = fleetline_service::unix_ms() as i64;
        self.change(|next| {
            let entry = next.models.entry(name.into()).or_default();
            if let Some(v) = entry.versions.iter().find(|v| v.sha256 == sha) {
                return Ok(Edit::Unchanged(v.clone()));
            }
            let v = ModelVersion {
                version: entry.versions.last().map_or(1, |v| v.version + 1),
                sha256: sha.clone(),
                bytes,
                card: card.clone(),
                registered_ms: now,
                source: source.into(),
            };
            entry.versions.push(v.clone());
            Ok(Edit::Changed(v))
        })
        .await
    }

    /// Deploys `d` for `name` after checking it against the registered
    /// versions and loading every version it runs; the previous deployment
    /// goes to the history.
    pub async fn deploy(&self, name: &str, mut d: Deployment) -> Result<Deployment, ModelRegistryError> {
        let kind = kind_of(name)?;
        let registered: Vec<u32> =
            self.read().models.get(name).map(|m| m.versions.iter().map(|v| v.version).collect()).unwrap_or_default();
        d.check(&registered).map_err(ModelRegistryError::Invalid)?;
        for v in d.versions() {
            self.plan_for(kind, v).await.map_err(ModelRegistryError::Invalid)?;
        }
        d.at_ms = fleetline_service::unix_ms() as i64;
        let deployed = self
            .change(|next| {
                let entry = next.models.entry(name.into()).or_default();
                let known: Vec<u32> = entry.versions.iter().map(|v| v.version).collect();
                d.check(&known).map_err(ModelRegistryError::Invalid)?;
                if let Some(old) = entry.deployment.replace(d.clone()) {
                    entry.history.push(old);
                    let excess = entry.history.len().saturating_sub(HISTORY);
                    entry.history.drain(..excess);
                }
                Ok(Edit::Changed(d.clone()))
            })
            .await?;
        self.reload_active().await;
        Ok(deployed)
    }

    /// Puts back the deployment before the current one.
    pub async fn rollback(&self, name: &str) -> Result<Deployment, ModelRegistryError> {
        kind_of(name)?;
        let now = fleetline_service::unix_ms() as i64;
        let back = self
            .change(|next| {
                let entry = next.models.entry(name.into()).or_default();
                let Some(mut previous) = entry.history.pop() else {
                    return Err(ModelRegistryError::Conflict(format!("{name} has no earlier deployment")));
                };
                previous.at_ms = now;
                entry.deployment = Some(previous.clone());
                Ok(Edit::Changed(previous))
            })
            .await?;
        self.reload_active().await;
        Ok(back)
    }

    /// Takes the model out of scoring (its versions stay registered).
    pub async fn undeploy(&self, name: &str) -> Result<(), ModelRegistryError> {
        kind_of(name)?;
        self.change(|next| {
            let entry = next.models.entry(name.into()).or_default();
            match entry.deployment.take() {
                Some(old) => {
                    entry.history.push(old);
                    Ok(Edit::Changed(()))
                }
                None => Ok(Edit::Unchanged(())),
            }
        })
        .await?;
        self.reload_active().await;
        Ok(())
    }

    /// The plan of a registered version, loaded once (file read from the
    /// store and checked against its sha256 on first use).
    pub async fn plan_for(&self, kind: ModelKind, version: u32) -> Result<Arc<Plan>, String> {
        let name = kind.name();
        let sha = self
            .read()
            .models
            .get(name)
            .and_then(|m| m.versions.iter().find(|v| v.version == version))
            .map(|v| v.sha256.clone())
            .ok_or_else(|| format!("{name} has no version {version}"))?;
        if let Some(p) = self.plans.lock().ok().and_then(|p| p.get(&sha).cloned()) {
            return Ok(p);
        }
        let bytes = self
            .store
            .get(&model_path(name, &sha))
            .await
            .map_err(|e| format!("{name} version {version}: {e}"))?
            .ok_or_else(|| format!("{name} version {version}: file missing from the store"))?;
        if sha256_hex(&bytes) != sha {
            return Err(format!("{name} version {version}: the stored file's sha256 is not the registered one"));
        }
        let plan = Arc::new(load_plan(kind, bytes).await.map_err(|e| format!("{name} version {version}: {e}"))?);
        if let Ok(mut p) = self.plans.lock() {
            p.insert(sha, plan.clone());
        }
        Ok(plan)
    }

    /// Builds the active set from the state: a model whose versions cannot
    /// all be loaded keeps what it ran before (and says why in
    /// [`load_errors`](Self::load_errors)).
    async fn reload_active(&self) {
        let models = self.models();
        let before = self.active();
        let mut next = ActiveSet::default();
        let mut errors = BTreeMap::new();
        for kind in KINDS {
            let Some(d) = models.get(kind.name()).and_then(|m| m.deployment.clone()) else { continue };
            match self.activate(kind, &d, models.get(kind.name())).await {
                Ok(m) => next.models.push(m),
                Err(e) => {
                    ev::ModelLoadFailed { model: kind.name(), error: &e }.emit(&self.stats);
                    errors.insert(kind.name().to_string(), e);
                    if let Some(old) = before.get(kind) {
                        next.models.push(old.clone());
                    }
                }
            }
        }
        let changed: Vec<String> = next
            .models
            .iter()
            .filter(|m| before.get(m.kind).is_none_or(|b| b.deployed_ms != m.deployed_ms))
            .map(|m| {
                let vs: Vec<String> = m
                    .variants
                    .iter()
                    .map(|v| format!("{}=v{}:{}", v.variant.label, v.variant.version, v.variant.weight))
                    .collect();
                let shadow = m.shadow.as_ref().map(|(v, _)| format!(" shadow=v{v}")).unwrap_or_default();
                format!("{} [{}]{shadow}", m.kind.name(), vs.join(" "))
            })
            .collect();
        if let Ok(mut a) = self.active.write() {
            *a = Arc::new(next);
        }
        if let Ok(mut e) = self.load_errors.lock() {
            *e = errors;
        }
        if !changed.is_empty() {
            ev::ModelsDeployed { models: &changed.join("; ") }.emit(&self.stats);
        }
    }

    async fn activate(
        &self,
        kind: ModelKind,
        d: &Deployment,
        entry: Option<&ModelEntry>,
    ) -> Result<ActiveModel, String> {
        let mut variants = Vec::with_capacity(d.variants.len());
        for v in &d.variants {
            variants.push(LiveVariant { variant: v.clone(), plan: self.plan_for(kind, v.version).await? });
        }
        let shadow = match d.shadow {
            Some(s) => Some((s, self.plan_for(kind, s).await?)),
            None => None,
        };
        let card_threshold = entry
            .and_then(|e| e.versions.iter().find(|v| Some(v.version) == d.variants.first().map(|v| v.version)))
            .and_then(|v| v.card.get("alert_threshold"))
            .and_then(serde_json::Value::as_f64);
        Ok(ActiveModel {
            kind,
            variants,
            shadow,
            threshold: d.threshold.or(card_threshold).unwrap_or(0.5),
            deployed_ms: d.at_ms,
        })
    }

    /// Reads the stored state again if another node changed it, and loads
    /// what it deploys; true if it had changed.
    pub async fn refresh(&self) -> Result<bool, ModelRegistryError> {
        let changed = self.state.refresh(|_| Ok::<_, ModelRegistryError>(())).await?;
        if changed {
            self.reload_active().await;
        }
        Ok(changed)
    }

    /// Reads the state again every `every` until dropped: every node runs
    /// what the cluster deployed within that (plus the time to load a new
    /// version's plan).
    pub async fn keep_fresh(self: Arc<Self>, every: std::time::Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "cannot read the model registry; keeping what is deployed");
            }
        }
    }

    /// Applies `edit` to the state as this node knows it and stores the
    /// result by compare-and-swap, redoing it on another node's change.
    async fn change<R>(
        &self,
        edit: impl FnMut(&mut State) -> Result<Edit<R>, ModelRegistryError>,
    ) -> Result<R, ModelRegistryError> {
        self.state.change(edit, |_| Ok(())).await
    }
}
