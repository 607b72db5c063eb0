//! A JSON document in the store that every node reads and any node may edit
//! (the schema registry's state, the model registry's): each node keeps a
//! copy with the version it read; an edit is applied to that copy and stored
//! by compare-and-swap, and when another node changed the document first the
//! node reads theirs (after a jittered wait) and edits again.

use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::store::{Store, SwapError, Version};

/// What a [`Shared`] document is.
pub trait Document: Serialize + DeserializeOwned + Clone {
    /// Its name in errors ("registry state").
    const NAME: &'static str;
    /// The document before anything was stored.
    fn fresh() -> Self;
    /// Why a stored document cannot be used (a format this build does not read).
    fn check(&self) -> Result<(), String>;
}

/// Why a [`Shared`] document could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] object_store::Error),
    /// The stored document does not parse or is of another format.
    #[error("{0}")]
    Invalid(String),
    /// Other nodes kept changing the document while this one tried.
    #[error("the document kept changing under this change")]
    Contended,
}

/// What an edit of the document came to.
pub enum Edit<R> {
    /// Nothing to store (the answer stands as it is).
    Unchanged(R),
    /// Store the edited document, then answer.
    Changed(R),
}

/// How many times a change is redone when other nodes keep changing the document.
const SWAP_ATTEMPTS: u32 = 16;

/// The document at `path`, as this node knows it.
#[derive(Debug)]
pub struct Shared<T> {
    store: Store,
    path: &'static str,
    state: RwLock<T>,
    /// The stored document's version as last read or written (`None`: not stored yet).
    version: RwLock<Option<Version>>,
    write: tokio::sync::Mutex<()>,
}

impl<T: Document> Shared<T> {
    /// Reads the document (a fresh one when none is stored).
    pub async fn open(store: Store, path: &'static str) -> Result<Self, SharedError> {
        let (state, version) = Self::load(&store, path).await?;
        Ok(Self { store, path, state: RwLock::new(state), version: RwLock::new(version), write: Default::default() })
    }

    async fn load(store: &Store, path: &str) -> Result<(T, Option<Version>), SharedError> {
        Ok(match store.get_versioned(path).await? {
            Some((b, version)) => {
                let doc: T =
                    serde_json::from_slice(&b).map_err(|e| SharedError::Invalid(format!("{}: {e}", T::NAME)))?;
                doc.check().map_err(|e| SharedError::Invalid(format!("{} {e}", T::NAME)))?;
                (doc, Some(version))
            }
            None => (T::fresh(), None),
        })
    }

    /// The document as this node knows it.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn install(&self, state: T, version: Option<Version>) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = state;
        *self.version.write().unwrap_or_else(PoisonError::into_inner) = version;
    }

    /// Reads the stored document again; if another node changed it, `adopt`
    /// sees it first (an error keeps the copy this node has) and it becomes
    /// this node's. True if it had changed.
    pub async fn refresh<E: From<SharedError>>(&self, adopt: impl FnOnce(&T) -> Result<(), E>) -> Result<bool, E> {
        let (state, version) = Self::load(&self.store, self.path).await?;
        if *self.version.read().unwrap_or_else(PoisonError::into_inner) == version {
            return Ok(false);
        }
        adopt(&state)?;
        self.install(state, version);
        Ok(true)
    }

    /// Applies `edit` to this node's copy and stores the result by
    /// compare-and-swap; when another node changed the document first, reads
    /// theirs (through `adopt`, as [`Shared::refresh`]) and edits again.
    pub async fn change<R, E: From<SharedError>>(
        &self,
        mut edit: impl FnMut(&mut T) -> Result<Edit<R>, E>,
        adopt: impl Fn(&T) -> Result<(), E>,
    ) -> Result<R, E> {
        let _w = self.write.lock().await;
        let mut backoff =
            fleetline_service::Backoff::new(std::time::Duration::from_millis(5), std::time::Duration::from_millis(200));
        for _ in 0..SWAP_ATTEMPTS {
            let mut next = self.read().clone();
            let r = match edit(&mut next)? {
                Edit::Unchanged(r) => return Ok(r),
                Edit::Changed(r) => r,
            };
            let bytes = serde_json::to_vec_pretty(&next).unwrap_or_default();
            let expected = self.version.read().unwrap_or_else(PoisonError::into_inner).clone();
            match self.store.swap(self.path, expected.as_ref(), Bytes::from(bytes)).await {
                Ok(version) => {
                    self.install(next, Some(version));
                    return Ok(r);
                }
                Err(SwapError::Lost { .. }) => {}
                Err(SwapError::Store(e)) => return Err(SharedError::Store(e).into()),
            }
            backoff.wait().await;
            self.refresh(&adopt).await?;
        }
        Err(SharedError::Contended.into())
    }
}
