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

use crate::cluster::discovery::{self, Discovery};
use crate::cluster::{ClusterState, Member, Mode, Role, View};
use crate::config::CloudConfig;
use crate::http::{self, Ops, RenderMetrics};
use crate::inference::ModelRegistry;
use crate::ingest;
use crate::keys::Keys;
use crate::lake::store::{Store, StoreSpec};
use crate::registry::Registry;
use crate::shard::task::ShardSetup;
use crate::shard::{Released, ShardDirectory};
use crate::telemetry::{CloudStats, events as ev};

mod broker;
mod ownership;

use ownership::Ownership;

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
    /// Its picture of the cluster.
    pub cluster: Arc<ClusterState>,
    /// The embedded broker's sessions and the login check they passed.
    pub broker_sessions: Option<BrokerSessions>,
    /// The task that runs the shards.
    ownership: JoinHandle<()>,
    commands: mpsc::Sender<ownership::Command>,
    /// The MQTT session (takes bundles, publishes acks and alerts).
    session: JoinHandle<()>,
    /// Where the end-of-stream marker goes, behind every released ack.
    released: mpsc::UnboundedSender<Released>,
    /// Everything else: HTTP, broker listeners, jobs, readiness, discovery.
    tasks: JoinSet<()>,
    /// The broker runs in this process and dies with it.
    embedded_broker: bool,
    /// How long a draining member keeps saying so before it stops.
    leave_notice: Duration,
}

/// How long an embedded broker is kept up after the node's session has left, to
/// forward the last acks to the gateways' connections. The node cannot see that
/// delivery (it happens inside rumqttd and the front); an ack that does not make
/// it costs a re-sent bundle, acked as a duplicate by the next node.
const EMBEDDED_BROKER_LINGER: Duration = Duration::from_millis(200);

/// How often a cluster member reads the schema registry again.
const REGISTRY_REFRESH: Duration = Duration::from_secs(2);

/// Longest a draining node waits for its shards to be handed over.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

impl Running {
    /// Stops in order, each step waiting for its work rather than for time
    /// (each bounded):
    /// 1. readiness turns false;
    /// 2. in a cluster, every shard is handed over (committed, acked, its head
    ///    released; peers see this node leaving and take them); a single node
    ///    commits every shard; the acks that releases are queued;
    /// 3. the session publishes every queued ack and alert, then disconnects
    ///    (no more bundles come in); an embedded broker gets
    ///    200 ms to forward them;
    /// 4. HTTP, listeners and jobs stop;
    /// 5. the shard mailboxes close: each shard commits what came between 2 and 3
    ///    (left unacked: gateways send it again and it is deduped) and ends.
    pub async fn shutdown(mut self) {
        self.stats.ready.store(false, Ordering::Relaxed);
        if self.cluster.mode == Mode::Single {
            for r in self.shards.flush_all().await {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "a shard could not commit before stopping");
                }
            }
        } else {
            let (done, drained) = oneshot::channel();
            if self.commands.send(ownership::Command::Drain(done)).await.is_ok()
                && tokio::time::timeout(DRAIN_WAIT, drained).await.is_err()
            {
                tracing::warn!("shards still being handed over at the end of the drain; peers will take them over");
            }
            // Peers learn that this node left from its health answer: keep answering
            // for two of their probes, or they take its released shards only once
            // its probes have failed for `down_after`.
            tokio::time::sleep(self.leave_notice).await;
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
        let (done, stopped) = oneshot::channel();
        if self.commands.send(ownership::Command::Stop(done)).await.is_ok() {
            let _ = stopped.await;
        }
        let _ = (&mut self.ownership).await;
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

/// Kubernetes mode: shard leases for the manager, the `jobs` singleton's lease,
/// and the pod watch to find the members with.
#[cfg(feature = "kubernetes")]
async fn kubernetes(
    cfg: &CloudConfig,
    cluster: &Arc<ClusterState>,
    manager: &mut Ownership,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Box<dyn Discovery>> {
    use crate::cluster::kubernetes as k8s;
    fleetline_service::tls::install_ring_provider();
    let k = &cfg.cluster.kubernetes;
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let ns =
        k8s::namespace(k).context("cannot tell the namespace: set cluster.kubernetes.namespace or POD_NAMESPACE")?;
    let leases = k8s::Leases::new(kube::Api::namespaced(client.clone(), &ns), &cfg.node_id, k);
    manager.use_leases(Arc::new(leases.clone()), k.renew_every, k.lease_duration);
    if cluster.me.has(Role::Jobs) {
        let (wants, holds) = (cluster.clone(), cluster.clone());
        tasks.spawn(k8s::singleton(
            leases,
            k.renew_every,
            move || !wants.leaving(),
            move |held| holds.singleton_lease.store(held, Ordering::Relaxed),
        ));
    }
    Ok(Box::new(k8s::Pods { api: kube::Api::namespaced(client, &ns), cfg: k.clone(), me: cfg.node_id.clone() }))
}

/// Recovers the shards and starts every task; returns once the node takes data
/// (a single node: every shard recovered; a cluster member: once it is up and
/// looking for its peers — shards come as the member set settles).
pub async fn start(
    cfg: &CloudConfig,
    store: Store,
    keys: Arc<Keys>,
    stats: Arc<CloudStats>,
    render: Option<RenderMetrics>,
) -> anyhow::Result<Running> {
    start_with(cfg, store, keys, stats, render, None).await
}

/// Shard leases from outside (tests of the lease path without an API server):
/// the leases, how often held ones are renewed, and how long one lasts.
pub type LeasesFrom = (Arc<dyn crate::cluster::ShardLeases>, Duration, Duration);

/// [`start`], taking shards only under `leases` (Kubernetes mode makes its own).
pub async fn start_with(
    cfg: &CloudConfig,
    store: Store,
    keys: Arc<Keys>,
    stats: Arc<CloudStats>,
    render: Option<RenderMetrics>,
    leases: Option<LeasesFrom>,
) -> anyhow::Result<Running> {
    let registry = Arc::new(Registry::open(store.clone()).await.context("opening the schema registry")?);
    let models =
        Arc::new(ModelRegistry::open(store.clone(), stats.clone()).await.context("opening the model registry")?);
    let (released, released_rx) = mpsc::unbounded_channel();
    let setup = ShardSetup {
        store: store.clone(),
        shard_count: cfg.shard_count,
        node: cfg.node_id.clone(),
        epoch: 0,
        segment: cfg.segment.clone(),
        registry: registry.clone(),
        models: Some(models.clone()),
        validation: cfg.validation.clone(),
        analytics: cfg.analytics.clone(),
        keys: keys.clone(),
        released: released.clone(),
        stats: stats.clone(),
        deadletter_quota: Arc::new(crate::shard::DeadLetterQuota::new(cfg.deadletters.clone())),
    };
    let http_listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding the HTTP listener {}", cfg.http.listen))?;
    let http_addr = http_listener.local_addr()?;
    let me = Member {
        id: cfg.node_id.clone(),
        http: cfg.cluster.advertise.clone().unwrap_or_else(|| http_addr.to_string()),
        roles: cfg.cluster.roles.iter().copied().collect(),
        version: cfg.cluster.version(),
    };
    let cluster = Arc::new(ClusterState::new(me.clone(), cfg.cluster.mode));
    let shards = ShardDirectory::new(cfg.shard_count);
    let (routes, routes_rx) = mpsc::unbounded_channel();
    let mut manager = Ownership::new(cluster.clone(), cfg.cluster.clone(), setup, shards.clone(), routes);
    if let Some((leases, renew_every, duration)) = leases {
        manager.use_leases(leases, renew_every, duration);
    }
    if cfg.cluster.mode == Mode::Single && me.has(Role::Ingest) {
        // Every shard is owned here: recovered before anything else starts.
        let owned: Vec<u16> = (0..cfg.shard_count).collect();
        manager.start_with(&owned).await?;
    }

    let mut tasks = JoinSet::new();
    let (raw_tx, raw_rx) = watch::channel(View::default());
    let finder: Box<dyn Discovery> = match cfg.cluster.mode {
        Mode::Single => Box::new(discovery::Single { me: me.clone() }),
        Mode::Static => Box::new(discovery::StaticPeers {
            me: me.clone(),
            peers: cfg.cluster.peers.clone(),
            probing: discovery::Probing { interval: cfg.cluster.probe_interval, down_after: cfg.cluster.down_after },
        }),
        Mode::Kubernetes => {
            #[cfg(feature = "kubernetes")]
            {
                kubernetes(cfg, &cluster, &mut manager, &mut tasks).await?
            }
            #[cfg(not(feature = "kubernetes"))]
            anyhow::bail!("cluster.mode = \"kubernetes\" needs a build with the `kubernetes` feature");
        }
    };
    tasks.spawn(finder.run(cluster.watch_leaving(), raw_tx));
    let (commands, commands_rx) = mpsc::channel(4);
    let ownership = tokio::spawn(manager.run(raw_rx, commands_rx));

    let ingest = broker::start(cfg, &keys, &stats, &mut tasks).await?;
    let counter = ingest::AckCounter::open(store.clone(), &cfg.node_id).await?;
    let session = tokio::spawn(ingest::run(
        ingest.session,
        shards.clone(),
        released_rx,
        routes_rx,
        keys.clone(),
        cfg.node_id.clone(),
        stats.clone(),
        counter,
    ));

    if cfg.cluster.mode != Mode::Single {
        // Other nodes register schemas and deploy models too.
        tasks.spawn(registry.clone().keep_fresh(REGISTRY_REFRESH));
        tasks.spawn(models.clone().keep_fresh(crate::inference::MODELS_REFRESH));
    }
    let rollup = Arc::new(crate::jobs::rollup::RollupJob::new(store.clone(), &cfg.rollup));
    if cfg.rollup.enabled && me.has(Role::Jobs) {
        // A singleton: in a cluster it runs on one `jobs` member at a time.
        let holder = cluster.clone();
        tasks.spawn(rollup.clone().periodic(cfg.rollup.interval, move || holder.runs_singleton(Role::Jobs)));
    }
    let ops = Ops {
        rollup,
        store,
        registry,
        models,
        node_id: cfg.node_id.clone(),
        shard_count: cfg.shard_count,
        stats: stats.clone(),
        shards: shards.clone(),
        cluster: cluster.clone(),
        metrics: render,
        token: cfg.http.token.clone(),
        read_token: cfg.http.read_token.clone(),
    };
    tasks.spawn(http::serve(http_listener, ops));
    // Load signals for autoscalers: the backlog sampled ten times a second for
    // the window's mean (a commit empties a segment once per `segment.max_age`,
    // so a slower sampler would beat against it), the gauges set every second.
    let (load_shards, load_stats, shard_count) = (shards.clone(), stats.clone(), cfg.shard_count);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(crate::telemetry::LOAD_SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tick.tick().await;
            let loads = load_shards.loads();
            load_stats.sample_load(loads.iter().map(|l| l.open_rows).sum(), loads.iter().map(|l| l.bytes).sum());
            if n % 10 == 0 {
                let shards: Vec<(u16, u64, u64, f64)> =
                    loads.iter().map(|l| (l.shard, l.open_rows, l.bytes, l.oldest_wait_ms as f64 / 1000.0)).collect();
                load_stats.emit(ev::Backlog { shard_count, shards: &shards });
            }
        }
    });
    // Ready once the broker session is up (a single node has recovered every
    // shard already) and, in a cluster, once a stable member set was acted on.
    let ready_stats = stats.clone();
    let ready_cluster = cluster.clone();
    tasks.spawn(async move {
        while !ready_stats.broker_connected.load(Ordering::Relaxed)
            || (ready_cluster.mode != Mode::Single && ready_cluster.view().is_none())
        {
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
        cluster,
        broker_sessions: ingest.sessions,
        ownership,
        commands,
        session,
        released,
        tasks,
        embedded_broker: cfg.broker.url.is_none(),
        leave_notice: cfg.cluster.probe_interval * 2,
    })
}
