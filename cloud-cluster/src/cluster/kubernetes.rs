//! Kubernetes mode: members are the Ready pods of a label selector in the node's
//! namespace (listed and watched through the API, like Akka's Cluster
//! Bootstrap), and a node takes a shard, or runs a singleton, only under a
//! `coordination.k8s.io/v1` Lease.
//!
//! A lease is taken with the `resourceVersion` it was read at, so of two nodes
//! taking one lease at once the API lets one through and answers the other 409.
//! Its `leaseTransitions` counts holders: that count is the epoch the shard's head
//! and every generation written under the lease carry, and a writer under an
//! older epoch can no longer claim the head. The leases decide who *should*
//! write; the head's compare-and-swap still decides who *can*.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::watch;

use super::config::KubernetesConfig;
use super::members::{Member, Role, View};

/// The namespace the node runs in: configured, `POD_NAMESPACE`, or the service
/// account's.
pub fn namespace(cfg: &KubernetesConfig) -> Option<String> {
    cfg.namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The member a pod is: Ready, with an IP, not being deleted. Roles from the
/// roles label (all without one), version from the version label.
pub fn member_of(pod: &Pod, cfg: &KubernetesConfig) -> Option<Member> {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready =
        status.conditions.as_ref().is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let ip = status.pod_ip.as_ref().filter(|ip| !ip.is_empty())?;
    if !ready {
        return None;
    }
    let labels = meta.labels.as_ref();
    let roles = match labels.and_then(|l| l.get(&cfg.roles_label)) {
        Some(v) => Role::parse_list(v).0,
        None => Role::ALL.into_iter().collect(),
    };
    let version = labels.and_then(|l| l.get(&cfg.version_label)).cloned().unwrap_or_else(|| "unknown".into());
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.clone() };
    Some(Member { id: meta.name.clone()?, http: format!("{host}:{}", cfg.http_port), roles, version })
}

/// `kubernetes` discovery: the pods of the selector in a namespace.
pub struct Pods {
    /// The namespace's pods.
    pub api: Api<Pod>,
    /// Selector and labels.
    pub cfg: KubernetesConfig,
    /// This node's id (its pod's name).
    pub me: String,
}

impl super::discovery::Discovery for Pods {
    fn run(self: Box<Self>, leaving: watch::Receiver<bool>, out: watch::Sender<View>) -> BoxFuture<'static, ()> {
        Box::pin(pods(self.api, self.cfg, self.me, leaving, out))
    }
}

/// Lists and watches the pods; sends the members (this node left out while it is
/// leaving) after every complete listing and every change. A broken watch is
/// resumed (with backoff) by kube's watcher, re-listing when it must.
pub async fn pods(
    api: Api<Pod>,
    cfg: KubernetesConfig,
    me: String,
    leaving: watch::Receiver<bool>,
    out: watch::Sender<View>,
) {
    let stream = watcher(api, watcher::Config::default().labels(&cfg.selector)).default_backoff();
    futures::pin_mut!(stream);
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Pod>> = None;
    let mut listed = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(p)) => {
                if let (Some(l), Some(name)) = (listing.as_mut(), p.metadata.name.clone()) {
                    l.insert(name, p);
                }
            }
            Ok(watcher::Event::InitDone) => {
                pods = listing.take().unwrap_or_default();
                listed = true;
            }
            Ok(watcher::Event::Apply(p)) => {
                if let Some(name) = p.metadata.name.clone() {
                    pods.insert(name, p);
                }
            }
            Ok(watcher::Event::Delete(p)) => {
                if let Some(name) = &p.metadata.name {
                    pods.remove(name);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "watching the cluster's pods failed; resuming");
                continue;
            }
        }
        if !listed {
            continue;
        }
        let away = *leaving.borrow();
        let members: Vec<Member> =
            pods.values().filter_map(|p| member_of(p, &cfg)).filter(|m| !(away && m.id == me)).collect();
        let view = View::new(members);
        out.send_if_modified(|v| std::mem::replace(v, view.clone()) != view);
    }
    tracing::error!("the pod watch ended");
}

/// Why a lease was not taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else holds it, and renews it.
    #[error("lease {name} is held by {by}")]
    Held {
        /// Lease.
        name: String,
        /// Holder.
        by: String,
    },
    /// Another taker changed it between the read and the write (HTTP 409).
    #[error("lease {name} changed while it was being taken")]
    Conflict {
        /// Lease.
        name: String,
    },
    /// A lease this node held is now someone else's (or nobody's).
    #[error("lease {name} was lost to {by}")]
    Lost {
        /// Lease.
        name: String,
        /// Holder now.
        by: String,
    },
    /// The API failed.
    #[error("lease {name}: {error}")]
    Api {
        /// Lease.
        name: String,
        /// The error.
        error: kube::Error,
    },
}

/// The cluster's leases, held as `holder`.
#[derive(Clone)]
pub struct Leases {
    api: Api<Lease>,
    holder: String,
    duration: Duration,
    prefix: String,
}

fn is_409(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

impl Leases {
    /// Leases in `api`'s namespace, held as `holder`.
    pub fn new(api: Api<Lease>, holder: &str, cfg: &KubernetesConfig) -> Self {
        Self { api, holder: holder.into(), duration: cfg.lease_duration, prefix: cfg.lease_prefix.clone() }
    }

    /// The lease of shard `shard`.
    pub fn shard_lease(&self, shard: u16) -> String {
        format!("{}shard-{shard:03}", self.prefix)
    }

    /// The lease of a singleton.
    pub fn singleton_lease(&self, name: &str) -> String {
        format!("{}singleton-{name}", self.prefix)
    }

    fn api_error(name: &str) -> impl Fn(kube::Error) -> LeaseError + '_ {
        move |error| LeaseError::Api { name: name.into(), error }
    }

    fn spec_now(&self, transitions: i64) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            lease_transitions: Some(transitions.clamp(0, i64::from(i32::MAX)) as i32),
            ..Default::default()
        }
    }

    /// Takes lease `name` (creating it if missing), or renews it if held here;
    /// returns its epoch (`leaseTransitions`, at least `min_epoch`).
    pub async fn acquire(&self, name: &str, min_epoch: u64) -> Result<u64, LeaseError> {
        let err = Self::api_error(name);
        let min_epoch = min_epoch.min(i32::MAX as u64) as i64;
        let Some(mut lease) = self.api.get_opt(name).await.map_err(&err)? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
                spec: Some(self.spec_now(min_epoch.max(1))),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(l) => Ok(transitions(&l)),
                Err(e) if is_409(&e) => Err(LeaseError::Conflict { name: name.into() }),
                Err(e) => Err(err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_here = holder.as_deref() == Some(self.holder.as_str());
        if let Some(by) = &holder
            && !held_here
            && !expired(&spec, Timestamp::now())
        {
            return Err(LeaseError::Held { name: name.into(), by: by.clone() });
        }
        let before = i64::from(spec.lease_transitions.unwrap_or(0));
        let mut next = if held_here {
            LeaseSpec { renew_time: Some(MicroTime(Timestamp::now())), ..spec }
        } else {
            self.spec_now((before + 1).max(min_epoch))
        };
        if held_here && before < min_epoch {
            next.lease_transitions = Some(min_epoch as i32);
        }
        lease.spec = Some(next);
        // `replace` sends the resourceVersion it read: a stale taker gets 409.
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(l) => Ok(transitions(&l)),
            Err(e) if is_409(&e) => Err(LeaseError::Conflict { name: name.into() }),
            Err(e) => Err(err(e)),
        }
    }

    /// Renews lease `name`, held here; [`LeaseError::Lost`] if it is not anymore.
    pub async fn renew(&self, name: &str) -> Result<(), LeaseError> {
        let err = Self::api_error(name);
        let mut lease = self.api.get(name).await.map_err(&err)?;
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Err(LeaseError::Lost {
                name: name.into(),
                by: spec.holder_identity.unwrap_or_else(|| "nobody".into()),
            });
        }
        lease.spec = Some(LeaseSpec { renew_time: Some(MicroTime(Timestamp::now())), ..spec });
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            // Changed since the read: whoever changed it, it is not a renewal of ours.
            Err(e) if is_409(&e) => Err(LeaseError::Lost { name: name.into(), by: "a concurrent writer".into() }),
            Err(e) => Err(err(e)),
        }
    }

    /// Lets go of lease `name` if held here (its transitions stay).
    pub async fn release(&self, name: &str) -> Result<(), LeaseError> {
        let err = Self::api_error(name);
        let Some(mut lease) = self.api.get_opt(name).await.map_err(&err)? else { return Ok(()) };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        lease.spec = Some(LeaseSpec { holder_identity: None, renew_time: None, ..spec });
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_409(&e) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

fn transitions(l: &Lease) -> u64 {
    l.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0).max(0) as u64
}

/// A lease whose holder stopped renewing it.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = &spec.renew_time else { return true };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    renewed.as_second().saturating_add(duration) < now.as_second()
}

impl super::ShardLeases for Leases {
    fn acquire(&self, shard: u16, min_epoch: u64) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(
            async move { Leases::acquire(self, &self.shard_lease(shard), min_epoch).await.map_err(|e| e.to_string()) },
        )
    }

    fn renew(&self, shard: u16) -> BoxFuture<'_, Result<(), super::RenewError>> {
        Box::pin(async move {
            Leases::renew(self, &self.shard_lease(shard)).await.map_err(|e| match e {
                LeaseError::Api { .. } => super::RenewError::Failed(e.to_string()),
                e => super::RenewError::Lost(e.to_string()),
            })
        })
    }

    fn release(&self, shard: u16) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = Leases::release(self, &self.shard_lease(shard)).await {
                tracing::warn!(shard, error = %e, "could not release the shard's lease; it expires");
            }
        })
    }
}

/// Holds the `jobs` singleton's lease while `wanted()` (a `jobs` member, not
/// leaving): takes or renews it every `every`, and says through `held` whether
/// this node holds it.
pub async fn singleton(leases: Leases, every: Duration, wanted: impl Fn() -> bool, held: impl Fn(bool)) {
    let name = leases.singleton_lease("jobs");
    let mut holding = false;
    loop {
        if wanted() {
            let r = if holding { leases.renew(&name).await.map(|_| 0) } else { leases.acquire(&name, 0).await };
            let now = r.is_ok();
            if now != holding {
                tracing::info!(held = now, lease = name, "the jobs singleton moved");
            }
            holding = now;
        } else if holding {
            let _ = leases.release(&name).await;
            holding = false;
        }
        held(holding);
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests;
