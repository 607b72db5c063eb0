//! Who may connect and whose batches open: the provisioning file, reloaded while
//! running. A file that fails to parse never replaces the loaded one.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fleetline_service::ProvisioningFile;
use fleetline_service::provisioning::Reloaded;
use fleetline_wire::provisioning::{DeviceEntry, Provisioning, ProvisioningError};
use fleetline_wire::topics::{self, Channel};
use fleetline_wire::{DeviceId, FleetId};

use crate::stats::reason;

/// The loaded provisioning file.
pub struct Registry(Arc<ProvisioningFile>);

impl Registry {
    /// Loads the file.
    pub fn load(path: &Path) -> Result<Self, ProvisioningError> {
        ProvisioningFile::load(path).map(|f| Self(Arc::new(f)))
    }

    /// The provisioning in force.
    pub fn snapshot(&self) -> Arc<Provisioning> {
        self.0.snapshot()
    }

    /// The file, for the reload loop.
    pub fn file(&self) -> Arc<ProvisioningFile> {
        self.0.clone()
    }

    /// Devices a reload revoked or removed: to be disconnected.
    pub fn revoked(change: &Reloaded) -> Vec<(FleetId, DeviceId)> {
        change
            .old
            .devices()
            .filter(|d| !d.revoked)
            .filter(|d| change.new.device(&d.fleet, &d.device).is_none_or(|n| n.revoked))
            .map(|d| (d.fleet, d.device))
            .collect()
    }

    /// Checks a device's MQTT CONNECT: client id and username must both be
    /// `{fleet}.{device}`, the device provisioned and not revoked, and the password
    /// derived from one of its valid keys.
    pub fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str> {
        if client_id != username {
            return Err(reason::BAD_USERNAME);
        }
        let (fleet, device) = parse_username(username).ok_or(reason::BAD_USERNAME)?;
        let p = self.snapshot();
        let entry = p.device(&fleet, &device).ok_or(reason::UNKNOWN_DEVICE)?;
        if entry.revoked {
            return Err(reason::REVOKED);
        }
        let now = SystemTime::now();
        if entry
            .keys_at(now)
            .any(|k| fleetline_service::constant_time_eq(&k.mqtt_password(username), password.as_bytes()))
        {
            Ok(())
        } else {
            Err(reason::BAD_PASSWORD)
        }
    }

    /// A device entry, if provisioned.
    pub fn device(&self, fleet: &FleetId, device: &DeviceId) -> Option<DeviceEntry> {
        self.snapshot().device(fleet, device).cloned()
    }
}

/// Splits `{fleet}.{device}`.
pub fn parse_username(username: &str) -> Option<(FleetId, DeviceId)> {
    let (f, d) = username.split_once('.')?;
    Some((FleetId::new(f).ok()?, DeviceId::new(d).ok()?))
}

impl fleetline_broker::Logins for Registry {
    fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str> {
        Registry::check_login(self, client_id, username, password)
    }

    /// A unit publishes only its own batches and reads only its own acks and
    /// commands.
    fn grants(&self, _client_id: &str, username: &str) -> Arc<dyn fleetline_broker::Grants> {
        Arc::new(match parse_username(username) {
            Some((fleet, device)) => UnitGrants {
                up: topics::device_topic(&fleet, &device, Channel::Up).as_str().to_string(),
                ack: topics::device_topic(&fleet, &device, Channel::Ack).as_str().to_string(),
                cmd: topics::device_topic(&fleet, &device, Channel::Cmd).as_str().to_string(),
            },
            None => UnitGrants { up: String::new(), ack: String::new(), cmd: String::new() },
        })
    }
}

/// One unit's topics.
struct UnitGrants {
    up: String,
    ack: String,
    cmd: String,
}

impl fleetline_broker::Grants for UnitGrants {
    fn may_publish(&self, topic: &str) -> bool {
        !self.up.is_empty() && topic == self.up
    }

    fn may_subscribe(&self, filter: &str) -> bool {
        !self.ack.is_empty() && (filter == self.ack || filter == self.cmd)
    }
}
