//! The provisioning file, reloaded when it changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use fleetline_wire::provisioning::{Provisioning, ProvisioningError};

/// The current provisioning, swapped whole on reload.
#[derive(Debug)]
pub struct Keys {
    path: PathBuf,
    current: RwLock<(Arc<Provisioning>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Keys {
    /// Loads the file.
    pub fn load(path: &Path) -> Result<Self, ProvisioningError> {
        let stamp = modified(path);
        let p = Provisioning::load(path)?;
        Ok(Self { path: path.into(), current: RwLock::new((Arc::new(p), stamp)) })
    }

    /// Keys from memory (tests, benchmarks).
    pub fn fixed(p: Provisioning) -> Self {
        Self { path: PathBuf::new(), current: RwLock::new((Arc::new(p), None)) }
    }

    /// The current provisioning.
    pub fn snapshot(&self) -> Arc<Provisioning> {
        self.current.read().map(|c| c.0.clone()).unwrap_or_default()
    }

    /// Reloads if the file changed; a broken file keeps the previous keys.
    /// A file that drops more than `max_removal` of the entries at once is refused.
    pub fn reload_if_changed(&self, max_removal: f64) -> Result<bool, ProvisioningError> {
        if self.path.as_os_str().is_empty() {
            return Ok(false);
        }
        let stamp = modified(&self.path);
        if self.current.read().map(|c| c.1 == stamp).unwrap_or(false) {
            return Ok(false);
        }
        let p = Provisioning::load(&self.path)?;
        let refused = self.snapshot().check_removal(&p, max_removal);
        if let Ok(mut c) = self.current.write() {
            // A refused file is remembered as seen (refused once per change), not loaded.
            *c = match refused {
                Ok(()) => (Arc::new(p), stamp),
                Err(_) => (c.0.clone(), stamp),
            };
        }
        refused.map(|()| true)
    }
}

impl fleetline_broker::Logins for Keys {
    /// Gateways log in with client id = username = gateway id, and the password
    /// derived from the gateway's key.
    fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str> {
        if client_id != username {
            return Err(fleetline_broker::reason::BAD_USERNAME);
        }
        let id = fleetline_wire::GatewayId::new(username).map_err(|_| fleetline_broker::reason::BAD_USERNAME)?;
        let p = self.snapshot();
        let gw = p.gateway(&id).ok_or("unknown_gateway")?;
        let expected = gw.key.mqtt_password(username);
        if fleetline_service::constant_time_eq(&expected, password.as_bytes()) {
            Ok(())
        } else {
            Err(fleetline_broker::reason::BAD_PASSWORD)
        }
    }
}
