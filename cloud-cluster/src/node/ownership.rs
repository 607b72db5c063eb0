//! Which shards this node runs: follows the stable member view, starts a shard
//! task for each shard placed here, hands over the ones placed elsewhere, and
//! keeps the directory, the broker subscriptions and `/cluster/shards` in step.
//!
//! A round (every `round_interval`, and at once on a new stable view):
//! 1. **hand over** owned shards the view places on another member — at most
//!    `max_moves_per_round`, none while a rollout is in progress (members of two
//!    versions), all of them while draining: unsubscribe, then the task commits
//!    (its acks go out), releases the shard's head and ends;
//! 2. **take** shards placed here that this node does not run, once their head
//!    says nobody holds them, or this node (a restart), or a node that is not a
//!    member (dead, frozen, gone); a shard a live member still holds is taken only
//!    after `handover_timeout`. Taking = a task that claims the head (fencing out
//!    whoever held it), recovers, and then subscribes.
//!
//! Nothing here is needed for safety: if two nodes run one shard at once, the
//! head's compare-and-swap lets exactly one of them commit; the other's task
//! ends fenced out and this manager drops it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{Id, JoinSet};

use crate::cluster::placement;
use crate::cluster::stable::Stabilizer;
use crate::cluster::{ClusterConfig, ClusterState, Local, RenewError, Role, ShardLeases, View};
use crate::ingest::Route;
use crate::shard::task::{Ended, ShardSetup};
use crate::shard::{Published, ShardDirectory, ShardError, ShardHandle, read_head};
use crate::telemetry::events as ev;

/// What the node asks of the manager.
pub(super) enum Command {
    /// Hand every shard over and take none; answered when none is left.
    Drain(oneshot::Sender<()>),
    /// Close every mailbox (each shard commits what it holds) and end.
    Stop(oneshot::Sender<()>),
}

/// The manager's state; runs as one task.
pub(super) struct Ownership {
    cluster: Arc<ClusterState>,
    cfg: ClusterConfig,
    setup: ShardSetup,
    shards: ShardDirectory,
    routes: mpsc::UnboundedSender<Route>,
    tasks: JoinSet<(u16, Ended)>,
    task_ids: BTreeMap<Id, u16>,
    aborts: BTreeMap<u16, tokio::task::AbortHandle>,
    rounds: u64,
    opened_tx: mpsc::UnboundedSender<(u16, bool)>,
    opened_rx: mpsc::UnboundedReceiver<(u16, bool)>,
    /// Shards placed here but held by a live member, since when.
    waiting: BTreeMap<u16, Instant>,
    /// When each shard placed here started to be wanted (for handover durations).
    wanted_at: BTreeMap<u16, (Instant, &'static str)>,
    view: Option<View>,
    draining: Option<Vec<oneshot::Sender<()>>>,
    /// Kubernetes mode: shards are taken only under their lease, renewed this often.
    leases: Option<(Arc<dyn ShardLeases>, Duration)>,
    /// … which lapses this long after its last renewal.
    lease_duration: Duration,
    /// Last renewal (or taking) of each lease held here.
    renewed: BTreeMap<u16, Instant>,
}

/// Every how many rounds owned shards' heads are checked.
const VERIFY_EVERY: u64 = 4;

/// Longest the node waits for its shards to stop.
const STOP_WAIT: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    fleetline_service::unix_ms() as i64
}

impl Ownership {
    pub(super) fn new(
        cluster: Arc<ClusterState>,
        cfg: ClusterConfig,
        setup: ShardSetup,
        shards: ShardDirectory,
        routes: mpsc::UnboundedSender<Route>,
    ) -> Self {
        let (opened_tx, opened_rx) = mpsc::unbounded_channel();
        Self {
            cluster,
            cfg,
            setup,
            shards,
            routes,
            tasks: JoinSet::new(),
            task_ids: BTreeMap::new(),
            aborts: BTreeMap::new(),
            rounds: 0,
            opened_tx,
            opened_rx,
            waiting: BTreeMap::new(),
            wanted_at: BTreeMap::new(),
            view: None,
            draining: None,
            leases: None,
            lease_duration: Duration::ZERO,
            renewed: BTreeMap::new(),
        }
    }

    /// Takes shards only under their lease from now on, renewing held ones every `renew_every`.
    pub(super) fn use_leases(&mut self, leases: Arc<dyn ShardLeases>, renew_every: Duration, duration: Duration) {
        self.leases = Some((leases, renew_every));
        self.lease_duration = duration;
    }

    /// Opens `owned` together (the datasets listed once) and starts their tasks,
    /// before the broker session exists: a single node is ready with every shard
    /// recovered. A shard that cannot be opened starts down and keeps trying.
    pub(super) async fn start_with(&mut self, owned: &[u16]) -> anyhow::Result<()> {
        use anyhow::Context;
        let published = Published::list(&self.setup.store).await.context("listing the datasets")?;
        let opened = futures::future::join_all(owned.iter().map(|id| self.setup.open(*id, &published))).await;
        for (id, opened) in owned.iter().copied().zip(opened) {
            let (handle, inbox) = ShardHandle::channel(id, 64);
            self.shards.insert(handle);
            self.cluster.set_local(id, Some(Local::Owned), now_ms());
            let setup = self.setup.clone();
            let h = self.tasks.spawn(async move { (id, setup.run(id, opened, inbox).await) });
            self.task_ids.insert(h.id(), id);
            self.aborts.insert(id, h);
        }
        Ok(())
    }

    /// Runs until stopped: follows raw member sets from `raw`, acts on stable ones.
    pub(super) async fn run(mut self, mut raw: watch::Receiver<View>, mut commands: mpsc::Receiver<Command>) {
        let mut stable = Stabilizer::new(self.cfg.stable_margin);
        // Nothing is known until discovery sends its first set.
        let mut discovering = true;
        let mut tick = tokio::time::interval(self.cfg.round_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew = tokio::time::interval(self.leases.as_ref().map_or(Duration::from_secs(3600), |l| l.1));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = stable.next_check().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                changed = raw.changed(), if discovering => {
                    if changed.is_ok() {
                        let set = raw.borrow_and_update().clone();
                        self.cluster.set_raw(set.clone());
                        stable.observe(set, Instant::now());
                    } else {
                        tracing::error!("member discovery stopped; shards stay where they are");
                        discovering = false;
                    }
                }
                _ = tick.tick() => {}
                _ = renew.tick(), if self.leases.is_some() => self.renew_leases().await,
                _ = tokio::time::sleep_until(wake.into()) => {}
                Some(joined) = self.tasks.join_next_with_id() => {
                    self.ended(joined);
                }
                Some((id, fenced)) = self.opened_rx.recv() => self.opened(id, fenced),
                cmd = commands.recv() => match cmd {
                    Some(Command::Drain(done)) => {
                        self.cluster.set_leaving();
                        self.draining.get_or_insert_with(Vec::new).push(done);
                    }
                    Some(Command::Stop(done)) => {
                        self.stop().await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.stop().await;
                        return;
                    }
                },
            }
            if let Some(view) = stable.poll(Instant::now()) {
                self.new_view(view);
            }
            self.round().await;
            let locals = self.cluster.locals();
            let count = |state: Local| locals.values().filter(|l| l.state == state).count();
            self.setup.stats.emit(ev::ShardsHeld {
                owned: count(Local::Owned),
                acquiring: count(Local::Acquiring),
                draining: count(Local::Draining),
            });
            if self.draining.is_some() && locals.is_empty() {
                for done in self.draining.as_mut().map(std::mem::take).unwrap_or_default() {
                    let _ = done.send(());
                }
            }
        }
    }

    fn new_view(&mut self, view: View) {
        let before = self.view.as_ref().map(|v| v.members().iter().map(|m| m.id.as_str()).collect::<Vec<_>>());
        let after: Vec<&str> = view.members().iter().map(|m| m.id.as_str()).collect();
        self.setup.stats.emit(ev::MembershipChanged {
            members: &after,
            before: before.as_deref(),
            rollout: view.rollout(),
        });
        self.cluster.set_view(view.clone(), now_ms());
        self.view = Some(view);
        let now = Instant::now();
        let me = self.cluster.me.id.clone();
        for (s, t) in self.target().unwrap_or_default().iter().enumerate() {
            let s = s as u16;
            if t.as_deref() == Some(me.as_str()) && self.cluster.local(s).is_none() {
                self.wanted_at.entry(s).or_insert((now, "membership change"));
            }
        }
    }

    /// Where every shard should be under the current view (`None` before the first).
    fn target(&self) -> Option<Vec<Option<String>>> {
        let view = self.view.as_ref()?;
        let ingest = if self.draining.is_some() { Vec::new() } else { view.with_role(Role::Ingest) };
        Some(self.placed(&ingest))
    }

    /// Every shard's owner by placement over `ingest`.
    fn placed(&self, ingest: &[&str]) -> Vec<Option<String>> {
        placement::target(self.setup.shard_count, ingest).into_iter().map(|o| o.map(str::to_string)).collect()
    }

    /// Placement over the stable view's members that are still discovered (the
    /// stable view minus members that left since), when it differs from the view's.
    fn fresh_target(&self) -> Option<Vec<Option<String>>> {
        let view = self.view.as_ref()?;
        let raw = self.cluster.raw();
        let gone = view.members().iter().any(|m| !raw.contains(&m.id));
        if !gone {
            return None;
        }
        let ingest: Vec<&str> = view.with_role(Role::Ingest).into_iter().filter(|m| raw.contains(m)).collect();
        Some(self.placed(&ingest))
    }

    async fn round(&mut self) {
        let Some(target) = self.target() else { return };
        let me = self.cluster.me.id.clone();
        self.rounds += 1;
        if self.rounds.is_multiple_of(VERIFY_EVERY) {
            self.verify(&me).await;
        }
        let locals = self.cluster.locals();
        // 1. Hand over.
        let rollout = self.view.as_ref().is_some_and(View::rollout);
        // Not handed over: a shard placed here by the stable view, or by the set
        // without members that left since (a released shard taken early).
        let fresh = self.fresh_target();
        let stays = |s: u16| {
            target[usize::from(s)].as_deref() == Some(me.as_str())
                || fresh.as_ref().is_some_and(|f| f[usize::from(s)].as_deref() == Some(me.as_str()))
        };
        let mut handover: Vec<u16> =
            locals.iter().filter(|(s, l)| l.state == Local::Owned && !stays(**s)).map(|(s, _)| *s).collect();
        if self.draining.is_none() {
            if rollout {
                handover.clear();
            }
            handover.truncate(self.cfg.max_moves_per_round);
        }
        if !handover.is_empty() {
            self.hand_over(&handover, &target).await;
        }
        // 2. Take.
        if self.draining.is_some() {
            return;
        }
        let mine = |t: &[Option<String>], s: u16| t[usize::from(s)].as_deref() == Some(me.as_str());
        let mut wanted: Vec<u16> =
            (0..self.setup.shard_count).filter(|s| mine(&target, *s) && !locals.contains_key(s)).collect();
        self.waiting.retain(|s, _| wanted.contains(s));
        self.wanted_at.retain(|s, _| wanted.contains(s) || locals.contains_key(s));
        // A member that left gracefully released its shards and is gone from the
        // discovered set already: their next owners under the set without it take
        // them now rather than after the stable margin (released shards only).
        let early: Vec<u16> = match fresh {
            Some(fresh) => (0..self.setup.shard_count)
                .filter(|s| mine(&fresh, *s) && !mine(&target, *s) && !locals.contains_key(s))
                .collect(),
            None => Vec::new(),
        };
        wanted.extend(&early);
        if wanted.is_empty() {
            return;
        }
        let view = self.view.clone().unwrap_or_default();
        let heads =
            futures::future::join_all(wanted.iter().map(|s| read_head(&self.setup.store, *s, self.setup.shard_count)))
                .await;
        let now = Instant::now();
        let mut take = Vec::new();
        let mut heads_epoch = BTreeMap::new();
        for (s, head) in wanted.into_iter().zip(heads) {
            if let Ok((h, _)) = &head {
                heads_epoch.insert(s, h.epoch);
            }
            if self.leases.is_some() {
                // The lease decides: held and renewed by a live owner, or free.
                let why = match &head {
                    Ok((h, _)) if h.owner.is_none() => "released",
                    Ok(_) => "its lease is free or expired",
                    Err(_) => "its head does not load",
                };
                self.wanted_at.entry(s).or_insert((now, why));
                take.push((s, why));
                continue;
            }
            if early.contains(&s) {
                match head {
                    Ok((h, _)) if h.owner.is_none() => {
                        self.wanted_at.entry(s).or_insert((now, "released by a member that left"));
                        take.push((s, "released by a member that left"));
                    }
                    _ => {}
                }
                continue;
            }
            let why = match head {
                // The task will say what is wrong with it (and stay down).
                Err(_) => "its head does not load",
                Ok((h, _)) => match h.owner {
                    None => "released",
                    Some(o) if o == me => "held by this node before",
                    Some(o) if !view.contains(&o) => "its owner is not a member",
                    Some(_) => {
                        let since = *self.waiting.entry(s).or_insert(now);
                        if now.duration_since(since) < self.cfg.handover_timeout {
                            continue;
                        }
                        "its owner did not hand it over in time"
                    }
                },
            };
            self.wanted_at.entry(s).or_insert((now, why));
            take.push((s, why));
        }
        if take.is_empty() {
            return;
        }
        let published = match Published::list(&self.setup.store).await {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the datasets; taking shards later");
                return;
            }
        };
        for (s, why) in take {
            let epoch = match &self.leases {
                None => 0,
                Some((leases, _)) => {
                    let min_epoch = heads_epoch.get(&s).copied().unwrap_or(0);
                    match leases.acquire(s, min_epoch).await {
                        Ok(epoch) => {
                            self.renewed.insert(s, Instant::now());
                            epoch
                        }
                        Err(e) => {
                            tracing::debug!(shard = s, error = e, "shard lease not taken; trying again next round");
                            continue;
                        }
                    }
                }
            };
            self.waiting.remove(&s);
            self.acquire(s, why, epoch, published.clone());
        }
    }

    /// Renews the lease of every shard held here; a shard whose lease was lost
    /// (this node was cut off past the lease) is dropped at once.
    async fn renew_leases(&mut self) {
        let Some((leases, _)) = self.leases.clone() else { return };
        let held: Vec<u16> = self.cluster.locals().into_keys().collect();
        let results = futures::future::join_all(held.iter().map(|s| leases.renew(*s))).await;
        let (every, now) = (self.leases.as_ref().map_or(Duration::ZERO, |l| l.1), Instant::now());
        for (s, r) in held.into_iter().zip(results) {
            let why = match r {
                Ok(()) => {
                    self.renewed.insert(s, now);
                    continue;
                }
                Err(RenewError::Lost(e)) => e,
                // The API failed: the lease is still ours until it may lapse.
                Err(RenewError::Failed(e)) => {
                    let last = *self.renewed.entry(s).or_insert(now);
                    if now.duration_since(last) + every < self.lease_duration {
                        tracing::warn!(shard = s, error = e, "could not renew the shard's lease; trying again");
                        continue;
                    }
                    format!("not renewed before it could lapse ({e})")
                }
            };
            tracing::warn!(shard = s, why, "the shard's lease was lost; dropping the shard here");
            if let Some(task) = self.aborts.get(&s) {
                task.abort();
            }
        }
    }

    /// Drops owned shards whose head names another owner: a shard taken over
    /// while this node was frozen or cut off learns it at its next commit, but one
    /// that gets no data would never commit, and would sit here as a zombie.
    async fn verify(&mut self, me: &str) {
        let owned: Vec<u16> =
            self.cluster.locals().into_iter().filter(|(_, l)| l.state == Local::Owned).map(|(s, _)| s).collect();
        let heads =
            futures::future::join_all(owned.iter().map(|s| read_head(&self.setup.store, *s, self.setup.shard_count)))
                .await;
        for (s, head) in owned.into_iter().zip(heads) {
            let Ok((h, _)) = head else { continue };
            if h.owner.as_deref() != Some(me) && self.cluster.local(s).map(|l| l.state) == Some(Local::Owned) {
                tracing::warn!(
                    shard = s,
                    owner = h.owner.as_deref().unwrap_or("-"),
                    claim = h.claim,
                    "the shard's head names another owner; dropping it here"
                );
                if let Some(task) = self.aborts.get(&s) {
                    task.abort();
                }
            }
        }
    }

    fn acquire(&mut self, id: u16, why: &'static str, epoch: u64, published: Arc<Published>) {
        tracing::info!(shard = id, why, epoch, "taking the shard");
        let (handle, inbox) = ShardHandle::channel(id, 64);
        self.shards.insert(handle);
        self.cluster.set_local(id, Some(Local::Acquiring), now_ms());
        let mut setup = self.setup.clone();
        setup.epoch = epoch;
        let opened_tx = self.opened_tx.clone();
        let h = self.tasks.spawn(async move {
            let opened = setup.open(id, &published).await;
            let _ = opened_tx.send((id, matches!(opened, Err(ShardError::Fenced { .. }))));
            (id, setup.run(id, opened, inbox).await)
        });
        self.task_ids.insert(h.id(), id);
        self.aborts.insert(id, h);
    }

    /// A task finished opening (or fenced out at once): subscribe to its topic.
    fn opened(&mut self, id: u16, fenced: bool) {
        if fenced || self.cluster.local(id).map(|l| l.state) != Some(Local::Acquiring) {
            return;
        }
        let _ = self.routes.send(Route::Subscribe(id));
        self.cluster.set_local(id, Some(Local::Owned), now_ms());
        self.cluster.acquired.fetch_add(1, Ordering::Relaxed);
        let (since, why) = self.wanted_at.remove(&id).unwrap_or((Instant::now(), "started"));
        self.setup.stats.emit(ev::ShardTaken { shard: id, why, took: since.elapsed() });
    }

    async fn hand_over(&mut self, shards: &[u16], target: &[Option<String>]) {
        let mut releases = Vec::new();
        for &s in shards {
            let Ok(handle) = self.shards.get(s) else { continue };
            self.cluster.set_local(s, Some(Local::Draining), now_ms());
            let _ = self.routes.send(Route::Unsubscribe(s));
            let to = target[usize::from(s)].clone();
            releases.push(async move {
                let started = Instant::now();
                (s, to, handle.release().await, started.elapsed())
            });
        }
        for (s, to, result, took) in futures::future::join_all(releases).await {
            match result {
                Ok(()) => {
                    self.setup.stats.emit(ev::ShardHandedOver { shard: s, to: to.as_deref(), took });
                }
                Err(e) => {
                    // The commit failed: keep the shard and try again next round.
                    tracing::warn!(shard = s, error = %e, "handover failed; keeping the shard for now");
                    if self.cluster.local(s).is_some() {
                        let _ = self.routes.send(Route::Subscribe(s));
                        self.cluster.set_local(s, Some(Local::Owned), now_ms());
                    }
                }
            }
        }
    }

    fn ended(&mut self, joined: Result<(Id, (u16, Ended)), tokio::task::JoinError>) {
        let (id, ended) = match joined {
            Ok((tid, (id, ended))) => {
                self.task_ids.remove(&tid);
                (id, ended)
            }
            Err(e) => {
                let Some(id) = self.task_ids.remove(&e.id()) else { return };
                if e.is_cancelled() {
                    (id, Ended::Fenced { by: "another node (its head names another owner)".into() })
                } else {
                    tracing::error!(shard = id, error = %e, "shard task failed");
                    (id, Ended::Fenced { by: "nobody: the task failed".into() })
                }
            }
        };
        self.aborts.remove(&id);
        self.shards.remove(id);
        self.cluster.set_local(id, None, now_ms());
        self.renewed.remove(&id);
        if let Some((leases, _)) = &self.leases {
            // Only a lease still held here is let go.
            let leases = leases.clone();
            tokio::spawn(async move { leases.release(id).await });
        }
        match ended {
            Ended::Released => {
                self.cluster.released.fetch_add(1, Ordering::Relaxed);
            }
            Ended::Fenced { .. } => {
                let _ = self.routes.send(Route::Unsubscribe(id));
                self.cluster.lost.fetch_add(1, Ordering::Relaxed);
            }
            Ended::Stopped => {}
        }
    }

    /// Closes every mailbox; each task commits what it holds and ends.
    async fn stop(&mut self) {
        for s in 0..self.setup.shard_count {
            self.shards.remove(s);
        }
        let all = async {
            while let Some(j) = self.tasks.join_next_with_id().await {
                self.ended(j);
            }
        };
        if tokio::time::timeout(STOP_WAIT, all).await.is_err() {
            tracing::warn!("shards still committing at the end of shutdown");
            self.tasks.shutdown().await;
        }
    }
}
