//! The provisioning reload loop both servers run: check the file now and then,
//! act on a change, report a refusal, and end every session whose login no longer
//! passes (a revoked peer, a key rotated past its window).

use std::sync::Arc;
use std::time::Duration;

use fleetline_service::ProvisioningFile;
use fleetline_service::provisioning::Reloaded;
use fleetline_wire::provisioning::ProvisioningError;

use crate::front::Logins;
use crate::sessions::Sessions;

/// What a server does when its provisioning changes, and how it reports it.
pub trait ReloadActions: Send + Sync + 'static {
    /// A changed file took effect.
    fn reloaded(&self, change: &Reloaded);
    /// A changed file was refused; the loaded one stays.
    fn refused(&self, error: &ProvisioningError);
    /// A session ended because its login no longer passes.
    fn session_ended(&self, client_id: &str);
}

/// Checks `file` every `every` until dropped; `sessions` (with the login check they
/// passed) are rechecked after every check.
pub async fn keep_provisioning(
    file: Arc<ProvisioningFile>,
    every: Duration,
    max_removal: f64,
    sessions: Option<(Arc<Sessions>, Arc<dyn Logins>)>,
    actions: impl ReloadActions,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match file.reload_if_changed(max_removal) {
            Ok(Some(change)) => actions.reloaded(&change),
            Ok(None) => {}
            Err(e) => actions.refused(&e),
        }
        if let Some((sessions, logins)) = &sessions {
            for id in sessions.recheck(|c, u, p| logins.check_login(c, u, p)) {
                actions.session_ended(&id);
            }
        }
    }
}
