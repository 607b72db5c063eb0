//! The provisioning file: which devices and gateways exist, and their keys.
//!
//! One TOML file, shared by gateways (to authenticate devices and open their
//! batches), cloud nodes (to open bundles and batches) and the simulator (which
//! writes it). Keys are 64 hex digits.
//!
//! ```toml
//! format = 1
//!
//! [[gateways]]
//! id = "gw-depot-1"
//! key = "<64 hex digits>"
//!
//! [[devices]]
//! fleet = "acme"
//! id = "truck-0042"
//! key = "<64 hex digits>"
//! # Key rotation: the previous key stays valid until this instant (RFC 3339, UTC).
//! previous_key = "<64 hex digits>"
//! previous_key_valid_until = "2026-12-01T00:00:00Z"
//! # A revoked device is refused at CONNECT and disconnected when the file reloads.
//! revoked = false
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::time::SystemTime;
use std::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, FleetId, GatewayId};
use crate::key::DeviceKey;

/// Version of the file layout.
pub const PROVISIONING_FORMAT: u32 = 1;

/// Why a provisioning file was rejected; a rejected file never replaces a loaded one.
#[derive(Debug, thiserror::Error)]
pub enum ProvisioningError {
    /// The file could not be read or written.
    #[error("provisioning file {path}: {source}")]
    Io {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML or not the expected shape.
    #[error("provisioning file is not valid: {0}")]
    Parse(String),
    /// A format this build does not read.
    #[error("provisioning format {0} is not supported (expected {PROVISIONING_FORMAT})")]
    UnsupportedFormat(u32),
    /// A reload would drop more entries than allowed at once (a file cut short
    /// at an entry boundary is valid TOML): refused, the loaded file stays.
    #[error(
        "provisioning file drops {missing} of {total} entries at once (more than the {allowed} allowed); \
         refused, the loaded one stays. Replace the file atomically (write, then rename), revoke \
         entries instead of deleting them, or raise provisioning_max_removal"
    )]
    TooManyRemoved {
        /// Entries (devices and gateways) loaded now but missing from the file.
        missing: usize,
        /// Entries loaded now.
        total: usize,
        /// Most that may go in one reload.
        allowed: usize,
    },
    /// An entry is invalid.
    #[error("provisioning entry {entry}: {reason}")]
    Entry {
        /// `fleet/device` or the gateway id.
        entry: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    format: u32,
    #[serde(default)]
    gateways: Vec<GatewayRepr>,
    #[serde(default)]
    devices: Vec<DeviceRepr>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayRepr {
    id: String,
    key: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceRepr {
    fleet: String,
    id: String,
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_key_valid_until: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    revoked: bool,
}

/// A provisioned device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Fleet.
    pub fleet: FleetId,
    /// Device.
    pub device: DeviceId,
    /// Current key.
    pub key: DeviceKey,
    /// Previous key and the instant it stops being accepted.
    pub previous: Option<(DeviceKey, SystemTime)>,
    /// Refused and disconnected.
    pub revoked: bool,
}

impl DeviceEntry {
    /// Keys accepted at `now`: the current one, then the previous one within its window.
    pub fn keys_at(&self, now: SystemTime) -> impl Iterator<Item = &DeviceKey> {
        let previous = self.previous.as_ref().filter(|(_, until)| now < *until).map(|(k, _)| k);
        std::iter::once(&self.key).chain(previous)
    }

    /// Opens a sealed batch of this device under the first key accepted at `now`
    /// that verifies it — the current key, then the previous one within its window —
    /// and hands the opened batch and that key to `f`. Every party that opens a
    /// device's batches (gateway, cloud, replay) goes through here, so a key
    /// rotation is honoured the same way everywhere.
    ///
    /// # Errors
    /// [`crate::WireError::AuthenticationFailed`] when no accepted key verifies it, or the
    /// error of a batch too damaged to try.
    pub fn open_batch<R>(
        &self,
        sealed: &[u8],
        now: SystemTime,
        f: impl FnOnce(crate::batch::OpenBatch<'_>, &DeviceKey) -> R,
    ) -> Result<R, crate::WireError> {
        let mut buf = sealed.to_vec();
        let mut last = crate::WireError::AuthenticationFailed;
        for key in self.keys_at(now) {
            buf.copy_from_slice(sealed);
            match crate::batch::open_batch(&mut buf, key) {
                Ok(opened) => return Ok(f(opened, key)),
                Err(e @ crate::WireError::AuthenticationFailed) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

/// A provisioned gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayEntry {
    /// Gateway id.
    pub id: GatewayId,
    /// Its key.
    pub key: DeviceKey,
}

/// The parsed, validated file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provisioning {
    devices: HashMap<(FleetId, DeviceId), DeviceEntry>,
    gateways: HashMap<GatewayId, GatewayEntry>,
}

impl Provisioning {
    /// Parses and validates TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, ProvisioningError> {
        let repr: FileRepr = toml::from_str(text).map_err(|e| ProvisioningError::Parse(e.to_string()))?;
        if repr.format != PROVISIONING_FORMAT {
            return Err(ProvisioningError::UnsupportedFormat(repr.format));
        }
        let mut out = Self::default();
        for g in repr.gateways {
            let bad = |reason: &str| ProvisioningError::Entry { entry: g.id.clone(), reason: reason.into() };
            let id = GatewayId::new(&g.id).map_err(|_| bad("gateway id must match [a-z0-9-]{1,32}"))?;
            let key = DeviceKey::from_hex(&g.key).map_err(|_| bad("key must be 64 hex digits"))?;
            if out.gateways.insert(id, GatewayEntry { id, key }).is_some() {
                return Err(bad("listed twice"));
            }
        }
        for d in repr.devices {
            let name = std::format!("{}/{}", d.fleet, d.id);
            let bad = |reason: &str| ProvisioningError::Entry { entry: name.clone(), reason: reason.into() };
            let fleet = FleetId::new(&d.fleet).map_err(|_| bad("fleet must match [a-z0-9-]{1,32}"))?;
            let device = DeviceId::new(&d.id).map_err(|_| bad("device id must match [a-z0-9-]{1,32}"))?;
            let key = DeviceKey::from_hex(&d.key).map_err(|_| bad("key must be 64 hex digits"))?;
            let previous = match (d.previous_key, d.previous_key_valid_until) {
                (None, None) => None,
                (Some(k), Some(until)) => {
                    let k = DeviceKey::from_hex(&k).map_err(|_| bad("previous_key must be 64 hex digits"))?;
                    let until = humantime::parse_rfc3339_weak(&until)
                        .map_err(|_| bad("previous_key_valid_until must be an RFC 3339 time"))?;
                    Some((k, until))
                }
                _ => return Err(bad("previous_key and previous_key_valid_until go together")),
            };
            let entry = DeviceEntry { fleet, device, key, previous, revoked: d.revoked };
            if out.devices.insert((fleet, device), entry).is_some() {
                return Err(bad("listed twice"));
            }
        }
        Ok(out)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ProvisioningError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProvisioningError::Io { path: path.to_path_buf(), source })?;
        Self::from_toml_str(&text)
    }

    /// Writes the file atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), ProvisioningError> {
        let io = |source| ProvisioningError::Io { path: path.to_path_buf(), source };
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(self.to_toml_string().as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The file's text, devices and gateways sorted by id.
    pub fn to_toml_string(&self) -> String {
        let hex = |k: &DeviceKey| k.as_bytes().iter().map(|b| std::format!("{b:02x}")).collect::<String>();
        let mut gateways: Vec<_> = self.gateways.values().collect();
        gateways.sort_by_key(|g| g.id);
        let mut devices: Vec<_> = self.devices.values().collect();
        devices.sort_by_key(|d| (d.fleet, d.device));
        let repr = FileRepr {
            format: PROVISIONING_FORMAT,
            gateways: gateways.iter().map(|g| GatewayRepr { id: g.id.to_string(), key: hex(&g.key) }).collect(),
            devices: devices
                .iter()
                .map(|d| DeviceRepr {
                    fleet: d.fleet.to_string(),
                    id: d.device.to_string(),
                    key: hex(&d.key),
                    previous_key: d.previous.as_ref().map(|(k, _)| hex(k)),
                    previous_key_valid_until: d
                        .previous
                        .as_ref()
                        .map(|(_, t)| humantime::format_rfc3339_seconds(*t).to_string()),
                    revoked: d.revoked,
                })
                .collect(),
        };
        toml::to_string(&repr).unwrap_or_default()
    }

    /// Adds or replaces a device.
    pub fn upsert_device(&mut self, entry: DeviceEntry) {
        self.devices.insert((entry.fleet, entry.device), entry);
    }

    /// Adds or replaces a gateway.
    pub fn upsert_gateway(&mut self, entry: GatewayEntry) {
        self.gateways.insert(entry.id, entry);
    }

    /// A device by ids.
    pub fn device(&self, fleet: &FleetId, device: &DeviceId) -> Option<&DeviceEntry> {
        self.devices.get(&(*fleet, *device))
    }

    /// A gateway by id.
    pub fn gateway(&self, id: &GatewayId) -> Option<&GatewayEntry> {
        self.gateways.get(id)
    }

    /// Every device.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceEntry> {
        self.devices.values()
    }

    /// Every gateway.
    pub fn gateways(&self) -> impl Iterator<Item = &GatewayEntry> {
        self.gateways.values()
    }

    /// Checks that replacing `self` by `new` drops at most `max_share` of the
    /// entries (devices and gateways) at once, and always allows dropping one.
    /// Revocations are not drops: they are explicit.
    pub fn check_removal(&self, new: &Provisioning, max_share: f64) -> Result<(), ProvisioningError> {
        let missing = self.devices.keys().filter(|k| !new.devices.contains_key(*k)).count()
            + self.gateways.keys().filter(|k| !new.gateways.contains_key(*k)).count();
        let total = self.devices.len() + self.gateways.len();
        let allowed = ((total as f64 * max_share.clamp(0.0, 1.0)).floor() as usize).max(1);
        if missing > allowed {
            return Err(ProvisioningError::TooManyRemoved { missing, total, allowed });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_dropping_too_many_entries_is_refused() {
        let entry = |i: usize| format!("[[devices]]\nfleet = \"acme\"\nid = \"d-{i}\"\nkey = \"{}\"\n", "1".repeat(64));
        let file = |n: usize| {
            let body: String = (0..n).map(entry).collect();
            Provisioning::from_toml_str(&format!("format = {PROVISIONING_FORMAT}\n{body}")).unwrap()
        };
        let full = file(42);
        // Cut at an entry boundary: valid TOML, 10 of 42 units.
        assert!(matches!(
            full.check_removal(&file(10), 0.25),
            Err(ProvisioningError::TooManyRemoved { missing: 32, total: 42, allowed: 10 })
        ));
        assert!(full.check_removal(&file(32), 0.25).is_ok(), "a quarter may go");
        assert!(file(3).check_removal(&file(2), 0.0).is_ok(), "one always may");
        assert!(full.check_removal(&file(0), 1.0).is_ok(), "1.0 allows anything");
    }

    const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const K2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn parses_validates_and_round_trips() {
        let text = std::format!(
            "format = 1\n[[gateways]]\nid = \"gw-1\"\nkey = \"{K1}\"\n\n[[devices]]\nfleet = \"acme\"\nid = \"t-1\"\nkey = \"{K2}\"\nprevious_key = \"{K1}\"\nprevious_key_valid_until = \"2030-01-01T00:00:00Z\"\n\n[[devices]]\nfleet = \"acme\"\nid = \"t-2\"\nkey = \"{K1}\"\nrevoked = true\n"
        );
        let p = Provisioning::from_toml_str(&text).unwrap();
        let d = p.device(&FleetId::new("acme").unwrap(), &DeviceId::new("t-1").unwrap()).unwrap();
        let before = humantime::parse_rfc3339("2029-12-31T23:59:59Z").unwrap();
        let after = humantime::parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(d.keys_at(before).count(), 2);
        assert_eq!(d.keys_at(after).count(), 1);
        assert!(p.device(&FleetId::new("acme").unwrap(), &DeviceId::new("t-2").unwrap()).unwrap().revoked);
        assert_eq!(Provisioning::from_toml_str(&p.to_toml_string()).unwrap(), p);
    }

    #[test]
    fn rejects_bad_entries_with_their_name() {
        let cases = [
            ("format = 2\n", "format 2"),
            ("format = 1\n[[devices]]\nfleet = \"Acme\"\nid = \"t\"\nkey = \"00\"\n", "Acme/t"),
            (
                &*std::format!(
                    "format = 1\n[[devices]]\nfleet = \"a\"\nid = \"t\"\nkey = \"{K1}\"\n[[devices]]\nfleet = \"a\"\nid = \"t\"\nkey = \"{K2}\"\n"
                ),
                "listed twice",
            ),
            ("format = 1\nsurprise = true\n", "unknown field"),
        ];
        for (text, needle) in cases {
            let err = Provisioning::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}
