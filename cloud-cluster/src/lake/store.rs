//! The object store under the datasets: a local directory (fsync on) or S3.
//!
//! Everything the node writes goes through [`Store`], which adds the few calls
//! the commit protocol needs on top of `object_store` and, for tests, a fault
//! plan that fails a chosen write the way a crash or an outage would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use serde::Deserialize;

/// The object store holding the datasets.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `file:///absolute/dir`, a plain directory path, or `s3://bucket/optional/prefix`.
    pub url: String,
    /// S3: endpoint of an S3-compatible service (unset: AWS).
    pub endpoint: Option<String>,
    /// S3: region.
    pub region: String,
    /// S3: access key id (unset: from the environment, `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// S3: secret key (unset: from the environment, `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// S3: allow plain HTTP to the endpoint (loopback test servers).
    pub allow_http: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: "fleetline-data".into(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
        }
    }
}

/// Where the datasets live, parsed from `storage.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// A local directory.
    Local(std::path::PathBuf),
    /// An S3 bucket and a key prefix (may be empty).
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix, without slashes at either end.
        prefix: String,
    },
}

/// Why a storage URL is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("storage.url {url:?}: {why}")]
pub struct BadStorageUrl {
    /// The URL.
    pub url: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl StoreSpec {
    /// Parses `file:///dir`, a plain path or `s3://bucket/prefix`.
    pub fn parse(cfg: &StorageConfig) -> Result<Self, BadStorageUrl> {
        let url = cfg.url.trim();
        let bad = |why| BadStorageUrl { url: url.to_string(), why };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("names no bucket"));
            }
            return Ok(Self::S3 { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("file URLs take an absolute path"));
            }
            return Ok(Self::Local(path.into()));
        }
        if url.contains("://") {
            return Err(bad("only file:// and s3:// are supported"));
        }
        if url.is_empty() {
            return Err(bad("is empty"));
        }
        Ok(Self::Local(url.into()))
    }

    /// Opens the store; a local directory is created if missing.
    pub fn open(&self, cfg: &StorageConfig) -> anyhow::Result<Store> {
        match self {
            Self::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| anyhow::anyhow!("creating the storage directory {}: {e}", dir.display()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?.with_fsync(true);
                let mut store = Store::new(Arc::new(fs), Path::default());
                store.local_dir = Some(dir.clone());
                Ok(store)
            }
            Self::S3 { bucket, prefix } => {
                // reqwest's TLS uses the process-wide rustls provider.
                fleetline_service::tls::install_ring_provider();
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(&cfg.region)
                    .with_allow_http(cfg.allow_http);
                if let Some(e) = &cfg.endpoint {
                    b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
                }
                if let Some(k) = &cfg.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(k) = &cfg.secret_access_key {
                    b = b.with_secret_access_key(k);
                }
                let mut store = Store::new(Arc::new(b.build()?), Path::from(prefix.as_str()));
                // S3 has no create-only copy without extra configuration: a move
                // onto an existing object is refused after a look (one writer
                // per shard makes the look enough).
                store.create_only_moves = false;
                Ok(store)
            }
        }
    }
}

/// Fails the `n`th write (put, rename, delete) from now, once, and every write
/// after it while `sticky`: a crash at that instant when the node is then thrown
/// away, an outage when it is kept.
#[derive(Debug, Default)]
pub struct FaultPlan {
    writes: AtomicU64,
    fail_at: AtomicU64,
    sticky: std::sync::atomic::AtomicBool,
    held_rename: std::sync::Mutex<Option<Arc<Hold>>>,
}

/// A rename held at its start (tests: another writer acting in the gap).
#[derive(Debug, Default)]
pub struct Hold {
    /// Notified when the held rename is reached.
    pub reached: tokio::sync::Notify,
    /// Notify once to let it go on.
    pub release: tokio::sync::Notify,
}

impl FaultPlan {
    /// Fails the `n`th write (1-based) from now; 0 disables.
    pub fn fail_write(&self, n: u64, sticky: bool) {
        self.writes.store(0, Ordering::SeqCst);
        self.fail_at.store(n, Ordering::SeqCst);
        self.sticky.store(sticky, Ordering::SeqCst);
    }

    /// Writes counted since the plan was set.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Stops failing.
    pub fn clear(&self) {
        self.fail_at.store(0, Ordering::SeqCst);
    }

    /// Holds the next rename (only that one) at its start until released.
    pub fn hold_next_rename(&self) -> Arc<Hold> {
        let hold = Arc::new(Hold::default());
        *self.held_rename.lock().unwrap_or_else(|e| e.into_inner()) = Some(hold.clone());
        hold
    }

    async fn wait_if_held(&self) {
        let hold = self.held_rename.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hold) = hold {
            hold.reached.notify_one();
            hold.release.notified().await;
        }
    }

    fn check(&self, what: &str, path: &Path) -> object_store::Result<()> {
        let at = self.fail_at.load(Ordering::SeqCst);
        if at == 0 {
            return Ok(());
        }
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == at || (n > at && self.sticky.load(Ordering::SeqCst)) {
            return Err(object_store::Error::Generic {
                store: "fault",
                source: format!("injected failure of write {n} ({what} {path})").into(),
            });
        }
        Ok(())
    }
}

/// The object store and the prefix the datasets live under.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: Path,
    /// Injected failures (tests).
    pub faults: Arc<FaultPlan>,
    /// The store refuses a move onto an existing object by itself (local: a hard
    /// link; memory). Otherwise [`Store::rename_new`] looks first.
    create_only_moves: bool,
    /// A local directory: its objects are swapped under an OS file lock, since
    /// `LocalFileSystem` has no conditional update.
    local_dir: Option<std::path::PathBuf>,
}

/// The version of an object a [`Store::swap`] expects to replace. On a local
/// directory it also carries a digest of the content: the e-tag there is inode,
/// mtime and size, which a later file could repeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    e_tag: Option<String>,
    version: Option<String>,
    digest: Option<u64>,
}

/// Why a [`Store::swap`] did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The object is not (or no longer) the version expected: someone else swapped
    /// it first.
    #[error("{path} changed since it was read")]
    Lost {
        /// The object.
        path: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] object_store::Error),
}

impl Store {
    /// Wraps a store; every path is taken relative to `root`.
    pub fn new(inner: Arc<dyn ObjectStore>, root: Path) -> Self {
        Self { inner, root, faults: Arc::default(), create_only_moves: true, local_dir: None }
    }

    /// An in-memory store (tests, benchmarks).
    pub fn memory() -> Self {
        Self::new(Arc::new(object_store::memory::InMemory::new()), Path::default())
    }

    fn full(&self, rel: &str) -> Path {
        let mut p = self.root.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    fn rel(&self, full: &Path) -> String {
        match full.prefix_match(&self.root) {
            Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
            None => full.to_string(),
        }
    }

    /// Writes an object atomically (readers see all of it or nothing).
    pub async fn put(&self, rel: &str, data: Bytes) -> object_store::Result<()> {
        let path = self.full(rel);
        self.faults.check("put", &path)?;
        self.inner.put(&path, PutPayload::from_bytes(data)).await.map(|_| ())
    }

    /// Writes an object that must not exist yet: never replaces a visible object
    /// (`AlreadyExists` instead).
    pub async fn put_new(&self, rel: &str, data: Bytes) -> object_store::Result<()> {
        let path = self.full(rel);
        self.faults.check("put", &path)?;
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.inner.put_opts(&path, PutPayload::from_bytes(data), opts).await.map(|_| ())
    }

    /// Moves an object to a name that must not exist yet (`AlreadyExists` instead).
    pub async fn rename_new(&self, from: &str, to: &str) -> object_store::Result<()> {
        let (from, to) = (self.full(from), self.full(to));
        self.faults.wait_if_held().await;
        self.faults.check("rename", &to)?;
        if self.create_only_moves {
            return self.inner.rename_if_not_exists(&from, &to).await;
        }
        match self.inner.head(&to).await {
            Ok(_) => Err(object_store::Error::AlreadyExists {
                path: to.to_string(),
                source: "refusing to replace a published object".into(),
            }),
            Err(object_store::Error::NotFound { .. }) => self.inner.rename(&from, &to).await,
            Err(e) => Err(e),
        }
    }

    /// Reads an object with its version; `None` if it does not exist.
    pub async fn get_versioned(&self, rel: &str) -> object_store::Result<Option<(Bytes, Version)>> {
        match self.inner.get(&self.full(rel)).await {
            Ok(r) => {
                let (e_tag, version) = (r.meta.e_tag.clone(), r.meta.version.clone());
                let bytes = r.bytes().await?;
                let digest = self.local_dir.is_some().then(|| fleetline_wire::shard::fnv1a64(&bytes));
                Ok(Some((bytes, Version { e_tag, version, digest })))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces an object only if it is still at version `expected` (`None`: only
    /// if it does not exist yet) — compare-and-swap, the one write two writers
    /// cannot both win. S3 and memory do it with a conditional put (`If-Match`,
    /// `If-None-Match`); a local directory under an exclusive lock on
    /// `.fleetline-swap.lock` in it, which every process on the machine takes.
    pub async fn swap(&self, rel: &str, expected: Option<&Version>, data: Bytes) -> Result<Version, SwapError> {
        let path = self.full(rel);
        self.faults.check("swap", &path)?;
        let lost = |e: object_store::Error| match e {
            object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => {
                SwapError::Lost { path: path.to_string() }
            }
            e => SwapError::Store(e),
        };
        let Some(dir) = &self.local_dir else {
            let mode = match expected {
                None => PutMode::Create,
                Some(v) => {
                    PutMode::Update(object_store::UpdateVersion { e_tag: v.e_tag.clone(), version: v.version.clone() })
                }
            };
            let r = self
                .inner
                .put_opts(&path, PutPayload::from_bytes(data), PutOptions { mode, ..Default::default() })
                .await
                .map_err(lost)?;
            return Ok(Version { e_tag: r.e_tag, version: r.version, digest: None });
        };
        let lock = LocalLock::take(dir)
            .await
            .map_err(|e| SwapError::Store(object_store::Error::Generic { store: "local", source: Box::new(e) }))?;
        let current = self.get_versioned(rel).await?.map(|(_, v)| v);
        if current.as_ref() != expected {
            return Err(SwapError::Lost { path: path.to_string() });
        }
        let digest = Some(fleetline_wire::shard::fnv1a64(&data));
        let r = self.inner.put(&path, PutPayload::from_bytes(data)).await?;
        drop(lock);
        Ok(Version { e_tag: r.e_tag, version: r.version, digest })
    }

    /// Reads an object; `None` if it does not exist.
    pub async fn get(&self, rel: &str) -> object_store::Result<Option<Bytes>> {
        match self.inner.get(&self.full(rel)).await {
            Ok(r) => r.bytes().await.map(Some),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether an object exists.
    pub async fn exists(&self, rel: &str) -> object_store::Result<bool> {
        match self.inner.head(&self.full(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Moves an object (local: one atomic rename; S3: copy, then delete).
    pub async fn rename(&self, from: &str, to: &str) -> object_store::Result<()> {
        let (from, to) = (self.full(from), self.full(to));
        self.faults.check("rename", &to)?;
        self.inner.rename(&from, &to).await
    }

    /// Deletes an object; a missing one is not an error.
    pub async fn delete(&self, rel: &str) -> object_store::Result<()> {
        let path = self.full(rel);
        self.faults.check("delete", &path)?;
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every object under `prefix` (recursively), relative to the root, sorted.
    pub async fn list(&self, prefix: &str) -> object_store::Result<Vec<String>> {
        let full = self.full(prefix);
        let prefix = if prefix.is_empty() { None } else { Some(&full) };
        let metas: Vec<_> = self.inner.list(prefix).try_collect().await?;
        let mut out: Vec<String> = metas.iter().map(|m| self.rel(&m.location)).collect();
        out.sort();
        Ok(out)
    }
}

/// An exclusive lock on a directory's swap lock file, held until dropped (the OS
/// releases it if the process dies).
struct LocalLock(std::fs::File);

impl LocalLock {
    async fn take(dir: &std::path::Path) -> std::io::Result<Self> {
        let path = dir.join(".fleetline-swap.lock");
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
            file.lock()?;
            Ok(Self(file))
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

impl Drop for LocalLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> Result<StoreSpec, BadStorageUrl> {
        StoreSpec::parse(&StorageConfig { url: url.into(), ..Default::default() })
    }

    #[test]
    fn urls_parse() {
        assert_eq!(spec("s3://b/x/y/").unwrap(), StoreSpec::S3 { bucket: "b".into(), prefix: "x/y".into() });
        assert_eq!(spec("s3://b").unwrap(), StoreSpec::S3 { bucket: "b".into(), prefix: String::new() });
        assert_eq!(spec("file:///d").unwrap(), StoreSpec::Local("/d".into()));
        assert_eq!(spec("data").unwrap(), StoreSpec::Local("data".into()));
        assert!(spec("file://rel").is_err());
        assert!(spec("gs://b").is_err());
        assert!(spec("s3:///x").is_err());
    }

    #[tokio::test]
    async fn put_get_list_rename_delete_under_a_prefix() {
        let s = Store::new(Arc::new(object_store::memory::InMemory::new()), Path::from("pre/fix"));
        s.put("a/b/c.bin", Bytes::from_static(b"1")).await.unwrap();
        s.put("a/d.bin", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(s.list("a").await.unwrap(), vec!["a/b/c.bin", "a/d.bin"]);
        s.rename("a/d.bin", "e/d.bin").await.unwrap();
        assert_eq!(s.get("e/d.bin").await.unwrap().unwrap(), Bytes::from_static(b"2"));
        assert!(s.get("a/d.bin").await.unwrap().is_none());
        s.delete("nothing").await.unwrap();
        // Create-only writes never replace what is there.
        assert!(matches!(
            s.put_new("e/d.bin", Bytes::from_static(b"3")).await,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        s.put("a/f.bin", Bytes::from_static(b"4")).await.unwrap();
        assert!(matches!(s.rename_new("a/f.bin", "e/d.bin").await, Err(object_store::Error::AlreadyExists { .. })));
        assert_eq!(s.get("e/d.bin").await.unwrap().unwrap(), Bytes::from_static(b"2"));
        s.rename_new("a/f.bin", "e/f.bin").await.unwrap();
        s.delete("e/f.bin").await.unwrap();
        s.faults.fail_write(2, false);
        s.put("x", Bytes::new()).await.unwrap();
        assert!(s.put("y", Bytes::new()).await.is_err());
        s.put("z", Bytes::new()).await.unwrap();
        assert_eq!(s.list("").await.unwrap(), vec!["a/b/c.bin", "e/d.bin", "x", "z"]);
    }

    async fn swaps_compare_and_set(store: &Store) {
        let v1 = store.swap("h", None, Bytes::from_static(b"1")).await.unwrap();
        assert!(matches!(store.swap("h", None, Bytes::from_static(b"x")).await, Err(SwapError::Lost { .. })));
        let (bytes, read) = store.get_versioned("h").await.unwrap().unwrap();
        assert_eq!((&bytes[..], &read), (&b"1"[..], &v1));
        let v2 = store.swap("h", Some(&v1), Bytes::from_static(b"2")).await.unwrap();
        // A writer still holding the old version has lost.
        assert!(matches!(store.swap("h", Some(&v1), Bytes::from_static(b"3")).await, Err(SwapError::Lost { .. })));
        store.swap("h", Some(&v2), Bytes::from_static(b"3")).await.unwrap();
        assert_eq!(store.get("h").await.unwrap().unwrap(), Bytes::from_static(b"3"));
    }

    #[tokio::test]
    async fn a_swap_from_a_stale_version_loses_in_memory_and_on_disk() {
        swaps_compare_and_set(&Store::memory()).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig { url: dir.path().display().to_string(), ..Default::default() };
        swaps_compare_and_set(&StoreSpec::parse(&cfg).unwrap().open(&cfg).unwrap()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_writers_on_disk_never_both_win_a_round() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig { url: dir.path().display().to_string(), ..Default::default() };
        let store = StoreSpec::parse(&cfg).unwrap().open(&cfg).unwrap();
        store.swap("counter", None, Bytes::from_static(b"0")).await.unwrap();
        let mut writers = Vec::new();
        for _ in 0..4 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let mut won = 0u64;
                for _ in 0..40 {
                    let (bytes, v) = store.get_versioned("counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&bytes).unwrap().parse().unwrap();
                    if store.swap("counter", Some(&v), Bytes::from((n + 1).to_string())).await.is_ok() {
                        won += 1;
                    }
                }
                won
            }));
        }
        let mut won = 0;
        for w in writers {
            won += w.await.unwrap();
        }
        // Every win is one increment: no two writers won from the same value.
        let last: u64 = std::str::from_utf8(&store.get("counter").await.unwrap().unwrap()).unwrap().parse().unwrap();
        assert_eq!(last, won);
        assert!(won >= 40, "some writer won every round it was alone: {won}");
    }
}
