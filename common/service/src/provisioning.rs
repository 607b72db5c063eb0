//! The provisioning file as a running process holds it: loaded once, checked for
//! changes now and then, swapped whole when a change is acceptable. Shared by the
//! gateway (device logins and batches) and the cloud node (gateway logins, bundles
//! and batches).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use fleetline_wire::provisioning::{Provisioning, ProvisioningError};

/// The provisioning in force, and the file it came from.
#[derive(Debug)]
pub struct ProvisioningFile {
    path: Option<PathBuf>,
    current: RwLock<Arc<Provisioning>>,
    /// Modification time of the last version looked at (loaded or refused).
    seen: Mutex<Option<SystemTime>>,
}

/// A reload that took effect: the provisioning before and after.
#[derive(Debug)]
pub struct Reloaded {
    /// In force until now.
    pub old: Arc<Provisioning>,
    /// In force from now.
    pub new: Arc<Provisioning>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ProvisioningFile {
    /// Loads the file.
    pub fn load(path: &Path) -> Result<Self, ProvisioningError> {
        let stamp = modified(path);
        let p = Provisioning::load(path)?;
        Ok(Self { path: Some(path.into()), current: RwLock::new(Arc::new(p)), seen: Mutex::new(stamp) })
    }

    /// Provisioning from memory, never reloaded (tests, benchmarks, the demo).
    pub fn fixed(p: Provisioning) -> Self {
        Self { path: None, current: RwLock::new(Arc::new(p)), seen: Mutex::new(None) }
    }

    /// The provisioning in force.
    pub fn snapshot(&self) -> Arc<Provisioning> {
        self.current.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// Reloads if the file changed since it was last looked at; the loaded one
    /// stays when the new one is refused. A file that does not parse is refused at
    /// every check until it does (it may be half written); one that parses but
    /// drops more than `max_removal` of the entries at once (a file cut short) is
    /// refused once per change.
    pub fn reload_if_changed(&self, max_removal: f64) -> Result<Option<Reloaded>, ProvisioningError> {
        let Some(path) = &self.path else { return Ok(None) };
        let stamp = modified(path);
        if self.seen.lock().map_or(true, |seen| *seen == stamp) {
            return Ok(None);
        }
        let new = Arc::new(Provisioning::load(path)?);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = stamp;
        }
        let old = self.snapshot();
        old.check_removal(&new, max_removal)?;
        if let Ok(mut c) = self.current.write() {
            *c = new.clone();
        }
        Ok(Some(Reloaded { old, new }))
    }
}
