//! The node's keys: the provisioning file (reloaded when it changes), and the
//! gateways' logins to the embedded broker it decides.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use fleetline_service::ProvisioningFile;
use fleetline_wire::provisioning::{Provisioning, ProvisioningError};

/// The provisioning file the node runs on: gateway and device keys.
#[derive(Debug)]
pub struct Keys(Arc<ProvisioningFile>);

impl Keys {
    /// Loads the file.
    pub fn load(path: &Path) -> Result<Self, ProvisioningError> {
        ProvisioningFile::load(path).map(|f| Self(Arc::new(f)))
    }

    /// Keys from memory (tests, benchmarks).
    pub fn fixed(p: Provisioning) -> Self {
        Self(Arc::new(ProvisioningFile::fixed(p)))
    }
}

impl Keys {
    /// The file, for the reload loop.
    pub fn file(&self) -> Arc<ProvisioningFile> {
        self.0.clone()
    }
}

impl Deref for Keys {
    type Target = ProvisioningFile;

    fn deref(&self) -> &ProvisioningFile {
        &self.0
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

    /// A gateway publishes bundles on the ingest topics and reads its own acks.
    fn grants(&self, _client_id: &str, username: &str) -> Arc<dyn fleetline_broker::Grants> {
        Arc::new(GatewayGrants { ack: fleetline_wire::topics::bundle_ack_topic(username).as_str().to_string() })
    }
}

/// A gateway's topics at the cloud's broker.
struct GatewayGrants {
    ack: String,
}

impl fleetline_broker::Grants for GatewayGrants {
    fn may_publish(&self, topic: &str) -> bool {
        fleetline_wire::topics::parse_ingest_topic(topic).is_some()
    }

    fn may_subscribe(&self, filter: &str) -> bool {
        filter == self.ack
    }
}
