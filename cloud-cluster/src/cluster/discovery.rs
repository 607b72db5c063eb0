//! Finding the members, behind one trait ([`Discovery`]): every way of finding
//! them is a task that sends raw member sets (this node included, unless it is
//! leaving) into a watch channel; the node acts only on sets that held still
//! ([`Stabilizer`](super::stable::Stabilizer)).
//!
//! - `single`: this node alone, always.
//! - `static`: a fixed peer list, each probed with `GET /cluster/health`; a peer
//!   is a member while its last good answer is younger than `down_after`, and
//!   stops being one at once when it answers that it is leaving.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::members::{Member, Role, View};

/// What `GET /cluster/health` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Node id.
    pub node: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// Its version.
    pub version: String,
    /// Where it is reached.
    pub http: String,
    /// It is draining: hand nothing to it, take its shards.
    pub leaving: bool,
}

impl Health {
    /// The member it describes.
    pub fn member(&self) -> Member {
        Member {
            id: self.node.clone(),
            http: self.http.clone(),
            roles: self.roles.iter().copied().collect(),
            version: self.version.clone(),
        }
    }
}

/// A way of finding the members.
pub trait Discovery: Send {
    /// Runs until the node stops, sending the raw member set into `out` whenever
    /// it may have changed (this node left out while `leaving`).
    fn run(self: Box<Self>, leaving: watch::Receiver<bool>, out: watch::Sender<View>) -> BoxFuture<'static, ()>;
}

/// `single`: this node alone.
pub struct Single {
    /// This node.
    pub me: Member,
}

impl Discovery for Single {
    fn run(self: Box<Self>, leaving: watch::Receiver<bool>, out: watch::Sender<View>) -> BoxFuture<'static, ()> {
        Box::pin(single(self.me, leaving, out))
    }
}

/// `static`: a fixed peer list, probed over HTTP.
pub struct StaticPeers {
    /// This node.
    pub me: Member,
    /// The other nodes' HTTP endpoints (`host:port`).
    pub peers: Vec<String>,
    /// Probe timing.
    pub probing: Probing,
}

impl Discovery for StaticPeers {
    fn run(self: Box<Self>, leaving: watch::Receiver<bool>, out: watch::Sender<View>) -> BoxFuture<'static, ()> {
        Box::pin(static_peers(self.me, self.peers, self.probing, leaving, out))
    }
}

/// `single`: sends a view of `me` (empty while leaving) until `out` closes.
pub async fn single(me: Member, mut leaving: watch::Receiver<bool>, out: watch::Sender<View>) {
    loop {
        let view = if *leaving.borrow() { View::default() } else { View::new(vec![me.clone()]) };
        out.send_if_modified(|v| std::mem::replace(v, view.clone()) != view);
        if leaving.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Probe timing of `static`.
#[derive(Clone, Copy, Debug)]
pub struct Probing {
    /// Between probe rounds.
    pub interval: Duration,
    /// A peer whose probes failed this long is gone.
    pub down_after: Duration,
}

/// `static`: probes `peers` (`host:port`) every `probing.interval` and sends
/// the members.
pub async fn static_peers(
    me: Member,
    peers: Vec<String>,
    probing: Probing,
    leaving: watch::Receiver<bool>,
    out: watch::Sender<View>,
) {
    // reqwest's TLS takes the process-wide rustls provider.
    fleetline_service::tls::install_ring_provider();
    let client = match reqwest::Client::builder()
        .timeout(probing.interval.max(Duration::from_millis(500)))
        .connect_timeout(probing.interval.max(Duration::from_millis(500)))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client for peer probes");
            return;
        }
    };
    let mut last_good: BTreeMap<String, (Instant, Member)> = BTreeMap::new();
    let mut tick = tokio::time::interval(probing.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let probes = peers.iter().map(|p| {
            let client = client.clone();
            async move {
                let r = async {
                    let resp =
                        client.get(format!("http://{p}/cluster/health")).send().await.map_err(|e| e.to_string())?;
                    let body =
                        resp.error_for_status().map_err(|e| e.to_string())?.bytes().await.map_err(|e| e.to_string())?;
                    serde_json::from_slice::<Health>(&body).map_err(|e| e.to_string())
                }
                .await;
                (p.clone(), r)
            }
        });
        let now = Instant::now();
        for (peer, r) in futures::future::join_all(probes).await {
            match r {
                Ok(h) if h.leaving || h.node == me.id => {
                    last_good.remove(&peer);
                }
                Ok(h) => {
                    last_good.insert(peer, (now, h.member()));
                }
                Err(e) => tracing::debug!(peer, error = %e, "peer probe failed"),
            }
        }
        let mut members: Vec<Member> = last_good
            .values()
            .filter(|(at, _)| now.duration_since(*at) < probing.down_after)
            .map(|(_, m)| m.clone())
            .collect();
        if !*leaving.borrow() {
            members.push(me.clone());
        }
        let view = View::new(members);
        out.send_if_modified(|v| std::mem::replace(v, view.clone()) != view);
    }
}
