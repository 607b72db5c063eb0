//! `[cluster]`: how a node finds the others and shares the shards with them.

use std::time::Duration;

use serde::Deserialize;

use super::members::Role;

/// How members are found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One node owns every shard (no peers, no probes).
    #[default]
    Single,
    /// A fixed list of peers, probed over HTTP (`GET /cluster/health`).
    Static,
    /// Pods of a label selector in this node's namespace, through the Kubernetes
    /// API; every shard and singleton is held under a Lease.
    Kubernetes,
}

/// `[cluster.kubernetes]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Namespace of the pods and leases (unset: `POD_NAMESPACE`, else the service
    /// account's namespace file).
    pub namespace: Option<String>,
    /// Label selector of the cluster's pods.
    pub selector: String,
    /// Pod label holding a pod's roles (`ingest.jobs`); a pod without it has all.
    pub roles_label: String,
    /// Pod label holding a pod's version (a rollout: two values at once).
    pub version_label: String,
    /// The port of every pod's HTTP endpoint.
    pub http_port: u16,
    /// Names of the cluster's Lease objects start with this.
    pub lease_prefix: String,
    /// A lease not renewed for this long may be taken.
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// How often held leases are renewed.
    #[serde(with = "humantime_serde")]
    pub renew_every: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            selector: "app.kubernetes.io/name=fleetline-cloud".into(),
            roles_label: "fleetline.io/roles".into(),
            version_label: "app.kubernetes.io/version".into(),
            http_port: 9580,
            lease_prefix: "fleetline-".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// The `[cluster]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `single` (default), `static` or `kubernetes`.
    pub mode: Mode,
    /// This node's roles.
    pub roles: Vec<Role>,
    /// Where peers reach this node's HTTP endpoint (`host:port`); unset: the
    /// address `http.listen` is bound to.
    pub advertise: Option<String>,
    /// Static mode: the other nodes' HTTP endpoints (`host:port`); none: a
    /// cluster of this node alone (on a shared broker, fenced like any other).
    pub peers: Vec<String>,
    /// This node's version as peers see it (two versions among the members: a
    /// rollout, during which live shards stay where they are). Unset: the build's.
    pub version: Option<String>,
    /// How long the member set must hold still before shards move.
    #[serde(with = "humantime_serde")]
    pub stable_margin: Duration,
    /// Static mode: how often peers are probed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Static mode: a peer whose probes have failed this long is gone.
    #[serde(with = "humantime_serde")]
    pub down_after: Duration,
    /// Most live shards a node hands over per round (shards without a live owner
    /// are placed at once).
    pub max_moves_per_round: usize,
    /// How often ownership is checked against the view.
    #[serde(with = "humantime_serde")]
    pub round_interval: Duration,
    /// How long a node waits for a live owner to hand a shard over before it
    /// takes the shard (fencing keeps that safe; the old owner's uncommitted
    /// bundles come again).
    #[serde(with = "humantime_serde")]
    pub handover_timeout: Duration,
    /// Kubernetes mode.
    pub kubernetes: KubernetesConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Single,
            roles: Role::ALL.to_vec(),
            advertise: None,
            peers: Vec::new(),
            version: None,
            stable_margin: Duration::from_secs(5),
            probe_interval: Duration::from_secs(1),
            down_after: Duration::from_secs(5),
            max_moves_per_round: 4,
            round_interval: Duration::from_secs(1),
            handover_timeout: Duration::from_secs(15),
            kubernetes: KubernetesConfig::default(),
        }
    }
}

impl ClusterConfig {
    /// Checks values that parse but cannot work; `Err` says which.
    pub fn check(&self) -> Result<(), String> {
        if self.roles.is_empty() {
            return Err("cluster.roles must name at least one role".into());
        }
        if self.max_moves_per_round == 0 {
            return Err("cluster.max_moves_per_round must be at least 1".into());
        }
        for (name, d) in [
            ("probe_interval", self.probe_interval),
            ("round_interval", self.round_interval),
            ("down_after", self.down_after),
        ] {
            if d.is_zero() {
                return Err(format!("cluster.{name} must be positive"));
            }
        }
        if self.mode == Mode::Kubernetes {
            if !cfg!(feature = "kubernetes") {
                return Err("cluster.mode = \"kubernetes\": this build has no Kubernetes support \
                            (built without the `kubernetes` feature)"
                    .into());
            }
            let k = &self.kubernetes;
            if k.renew_every.is_zero() || k.lease_duration < k.renew_every * 2 {
                return Err("cluster.kubernetes.lease_duration must be at least twice renew_every".into());
            }
            if k.selector.trim().is_empty() {
                return Err("cluster.kubernetes.selector must select the cluster's pods".into());
            }
        }
        if self.down_after < self.probe_interval {
            return Err("cluster.down_after must be at least cluster.probe_interval".into());
        }
        Ok(())
    }

    /// The version peers see.
    pub fn version(&self) -> String {
        self.version.clone().unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
    }
}
