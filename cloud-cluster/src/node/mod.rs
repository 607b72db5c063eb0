//! The composition root (nothing imports it): recovers every owned shard, starts
//! one task per shard, the ingest broker (embedded, behind login-checking
//! listeners) or a session with an external one, the HTTP endpoint, the jobs and
//! provisioning reloads; runs until told to stop, then shuts down in order
//! ([`Running::shutdown`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::CloudConfig;
use crate::http::{self, Ops, RenderMetrics};
use crate::ingest;
use crate::keys::Keys;
use crate::lake::store::{Store, StoreSpec};
use crate::registry::Registry;
use crate::shard::task::ShardSetup;
use crate::shard::{Published, Released, ShardDirectory, ShardHandle};
use crate::telemetry::{CloudStats, events as ev};

mod broker;

pub use broker::BrokerSessions;

/// Addresses the node listens on, printed at start-up as one JSON line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listening {
    /// Always `"listening"`.
    pub event: &'static str,
    /// Embedded broker, plain MQTT for gateways.
    pub broker: Option<String>,
    /// Embedded broker, TLS.
    pub broker_tls: Option<String>,
    /// HTTP.
    pub http: String,
}

/// Longest each shutdown step waits (for the broker to take the last acks, for a
/// shard to commit what it holds).
const SHUTDOWN_STEP: Duration = Duration::from_secs(10);

/// A running node, for the binary, tests and embedding.
pub struct Running {
    /// What it listens on.
    pub listening: Listening,
    /// The shards this node owns.
    pub shards: ShardDirectory,
    /// Counters.
    pub stats: Arc<CloudStats>,
    /// The embedded broker's sessions and the login check they passed.
    pub broker_sessions: Option<BrokerSessions>,
    /// One task per owned shard.
    shard_tasks: JoinSet<()>,
    /// The MQTT session (takes bundles, publishes acks and alerts).
    session: JoinHandle<()>,
    /// Where the end-of-stream marker goes, behind every released ack.
    released: mpsc::UnboundedSender<Released>,
    /// Everything else: HTTP, broker listeners, jobs, readiness.
    tasks: JoinSet<()>,
    /// The broker runs in this process and dies with it.
    embedded_broker: bool,
}

/// How long an embedded broker is kept up after the node's session has left, to
/// forward the last acks to the gateways' connections. The node cannot see that
/// delivery (it happens inside rumqttd and the front); an ack that does not make
/// it costs a re-sent bundle, acked as a duplicate by the next node.
const EMBEDDED_BROKER_LINGER: Duration = Duration::from_millis(200);

impl Running {
    /// Stops in order, each step waiting for its work rather than for time
    /// (each bounded, 10 s):
    /// 1. readiness turns false;
    /// 2. every shard commits what it holds; the acks that releases are queued;
    /// 3. the session publishes every queued ack and alert, then disconnects
    ///    (no more bundles come in); an embedded broker gets
    ///    200 ms to forward them;
    /// 4. HTTP, listeners and jobs stop;
    /// 5. the shard mailboxes close: each shard commits what came between 2 and 3
    ///    (left unacked: gateways send it again and it is deduped) and ends.
    pub async fn shutdown(mut self) {
        self.stats.ready.store(false, Ordering::Relaxed);
        for r in self.shards.flush_all().await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "a shard could not commit before stopping");
            }
        }
        let (done, queued) = oneshot::channel();
        if self.released.send(Released::EndOfStream { done }).is_ok() {
            let _ = tokio::time::timeout(SHUTDOWN_STEP, queued).await;
        }
        if tokio::time::timeout(SHUTDOWN_STEP, &mut self.session).await.is_err() {
            tracing::warn!("the broker did not take the last acks in time; gateways will send those bundles again");
            self.session.abort();
        } else if self.embedded_broker {
            tokio::time::sleep(EMBEDDED_BROKER_LINGER).await;
        }
        self.tasks.shutdown().await;
        drop(self.shards);
        drop(self.released);
        let shards = async { while self.shard_tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_STEP, shards).await.is_err() {
            tracing::warn!("shards still committing at the end of shutdown");
            self.shard_tasks.shutdown().await;
        }
    }
}

/// Runs a node until `stop` turns true, then shuts it down in order.
pub async fn run(
    cfg: CloudConfig,
    render: Option<RenderMetrics>,
    mut stop: watch::Receiver<bool>,
    on_listening: impl FnOnce(&Listening),
) -> anyhow::Result<()> {
    let stats = Arc::new(CloudStats::default());
    let keys =
        Arc::new(Keys::load(&cfg.provisioning).with_context(|| format!("loading {}", cfg.provisioning.display()))?);
    let spec = StoreSpec::parse(&cfg.storage)?;
    let store = spec.open(&cfg.storage).context("opening the object store")?;
    let running = start(&cfg, store, keys.clone(), stats.clone(), render).await?;
    on_listening(&running.listening);

    let sessions = running.broker_sessions.clone();
    let reloads = tokio::spawn(fleetline_broker::keep_provisioning(
        keys.file(),
        cfg.provisioning_reload.max(Duration::from_millis(100)),
        cfg.provisioning_max_removal,
        sessions,
        NodeReloads(stats.clone()),
    ));
    while stop.changed().await.is_ok() && !*stop.borrow() {}
    reloads.abort();
    tracing::info!("stopping: committing open segments");
    running.shutdown().await;
    Ok(())
}

/// Provisioning reloads at the node: nothing to do on a change but log it (keys are
/// looked up per bundle); refusals and ended sessions are counted.
struct NodeReloads(Arc<CloudStats>);

impl fleetline_broker::ReloadActions for NodeReloads {
    fn reloaded(&self, _change: &fleetline_service::provisioning::Reloaded) {
        tracing::info!("provisioning reloaded");
    }

    fn refused(&self, error: &fleetline_wire::provisioning::ProvisioningError) {
        self.0.emit(ev::ProvisioningRefused { error });
    }

    fn session_ended(&self, client_id: &str) {
        self.0.emit(ev::SessionEndedByKeys { client_id });
    }
}

/// Recovers the shards and starts every task; returns once the node takes data.
pub async fn start(
    cfg: &CloudConfig,
    store: Store,
    keys: Arc<Keys>,
    stats: Arc<CloudStats>,
    render: Option<RenderMetrics>,
) -> anyhow::Result<Running> {
    let registry = Arc::new(Registry::open(store.clone()).await.context("opening the schema registry")?);
    let (released, released_rx) = mpsc::unbounded_channel();
    let setup = ShardSetup {
        store: store.clone(),
        shard_count: cfg.shard_count,
        node: cfg.node_id.clone(),
        segment: cfg.segment.clone(),
        registry: registry.clone(),
        validation: cfg.validation.clone(),
        analytics: cfg.analytics.clone(),
        keys: keys.clone(),
        released: released.clone(),
        stats: stats.clone(),
    };
    // Single node: every shard is owned here.
    let owned: Vec<u16> = (0..cfg.shard_count).collect();
    let (shards, shard_tasks) = start_shards(&setup, &owned).await?;

    let mut tasks = JoinSet::new();
    let ingest = broker::start(cfg, &keys, &stats, &mut tasks).await?;
    let counter = ingest::AckCounter::open(store.clone(), &cfg.node_id).await?;
    let session = tokio::spawn(ingest::run(
        ingest.session,
        shards.clone(),
        released_rx,
        keys.clone(),
        cfg.node_id.clone(),
        stats.clone(),
        counter,
    ));

    let rollup = Arc::new(crate::jobs::rollup::RollupJob::new(store.clone(), &cfg.rollup));
    if cfg.rollup.enabled {
        // Single node: the job runs here (a cluster elects one node for it).
        tasks.spawn(rollup.clone().periodic(cfg.rollup.interval));
    }
    let ops = Ops {
        rollup,
        store,
        registry,
        node_id: cfg.node_id.clone(),
        shard_count: cfg.shard_count,
        stats: stats.clone(),
        shards: shards.clone(),
        metrics: render,
        token: cfg.http.token.clone(),
        read_token: cfg.http.read_token.clone(),
    };
    let (http_addr, server) = http::bind(cfg.http.listen, ops).await?;
    tasks.spawn(server);
    // Ready once the broker session is up (every shard is recovered already).
    let ready_stats = stats.clone();
    tasks.spawn(async move {
        while !ready_stats.broker_connected.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ready_stats.ready.store(true, Ordering::Relaxed);
    });
    let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    Ok(Running {
        listening: Listening {
            event: "listening",
            broker: addr(ingest.plain),
            broker_tls: addr(ingest.tls),
            http: http_addr.to_string(),
        },
        shards,
        stats,
        broker_sessions: ingest.sessions,
        shard_tasks,
        session,
        released,
        tasks,
        embedded_broker: cfg.broker.url.is_none(),
    })
}

/// Opens the owned shards (the datasets listed once, so each can tell whether they
/// hold files beyond its checkpoint) and starts a task for each; a shard that
/// cannot be opened starts down and keeps trying.
async fn start_shards(setup: &ShardSetup, owned: &[u16]) -> anyhow::Result<(ShardDirectory, JoinSet<()>)> {
    let published = Published::list(&setup.store).await.context("listing the datasets")?;
    let opened = futures::future::join_all(owned.iter().map(|id| setup.open(*id, &published))).await;
    let mut shards = ShardDirectory::new(setup.shard_count);
    let mut tasks = JoinSet::new();
    for (id, opened) in owned.iter().copied().zip(opened) {
        let (handle, inbox) = ShardHandle::channel(id, 64);
        shards.insert(handle);
        tasks.spawn(setup.clone().run(id, opened, inbox));
    }
    Ok((shards, tasks))
}
