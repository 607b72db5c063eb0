//! Pure: a shard's whole state and every decision about it — opening bundles and
//! batches, dedupe by (device, epoch, seq), validation, latest values, silence
//! bookkeeping, analytics, the models' feature rows and what their scores
//! raise, the open segment and the acks it holds, and what a commit writes. No I/O and no clock: `now` (for the segment's age) and `wall`
//! (for key validity) come in as arguments; the commit protocol in
//! [`super::commit`] carries out what this state decides against the lake.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fleetline_wire::bundle::{BundleId, open_bundle, peek_bundle};
use fleetline_wire::decode::DecodedBatch;
use fleetline_wire::provisioning::Provisioning;
use fleetline_wire::shard::{fnv1a64, shard_of};
use fleetline_wire::signals;
use fleetline_wire::{BatchHeader, DeviceId, FleetId, GatewayId, WireError, peek_header};
use serde::Deserialize;

use super::checkpoint::{Checkpoint, DEADLETTER_SEEN_MAX, DeviceState, GatewayClock, ModelMemory, Publish, Totals};
use super::quota::{DeadLetterQuota, Sender};
use super::validate::{ValidationConfig, check_value};
use crate::analytics::{AggregateRow, AnalyticsConfig, Event, EventKind, MINUTE_MS, Output, Pt, Who, event_id};
use crate::inference::stage::{ScoreRequest, Scored};
use crate::lake::reason;
use crate::lake::rows::{BatchMeta, DeadLetter, Rows};
use crate::registry::{Registry, Schema};
use crate::telemetry::{CloudStats, events as ev};

/// Bundle acks a commit released: gateway → bundle ids.
pub type Acks = BTreeMap<String, Vec<BundleId>>;

/// When a shard commits its open segment.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    /// Longest data waits in an open segment (also the ack latency towards gateways).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Most rows in an open segment.
    pub max_rows: usize,
    /// Boot epochs remembered per device for dedupe (older boots do not send any more).
    pub dedupe_epochs: usize,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self { max_age: Duration::from_secs(2), max_rows: 500_000, dedupe_epochs: 16 }
    }
}

/// A shard's state for `/status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ShardStatus {
    /// Shard.
    pub shard: u16,
    /// Last committed generation.
    pub generation: u64,
    /// Rows in the open segment.
    pub open_rows: usize,
    /// Bundles waiting for the next commit to be acked.
    pub pending_acks: usize,
    /// Bytes of the bundles taken since the last commit (the segment's backlog).
    pub open_bytes: u64,
    /// How long the oldest of them has waited for its commit, ms (the task fills
    /// it in: it owns the clock).
    pub oldest_uncommitted_ms: Option<u64>,
    /// Devices known.
    pub devices: usize,
    /// Dedupe ranges held (memory is proportional).
    pub dedupe_ranges: usize,
    /// Last commit, Unix ms.
    pub last_commit_ms: Option<i64>,
    /// Totals since the shard was created.
    pub totals: Totals,
}

/// The latest state of one vehicle, for the HTTP query.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VehicleState {
    /// Fleet.
    pub fleet: String,
    /// Device.
    pub device: String,
    /// Gateway of the last batch.
    pub last_gateway: String,
    /// When that gateway received it, Unix ms.
    pub last_received_ms: i64,
    /// Latest value per signal (VSS path → time and value).
    pub signals: BTreeMap<String, (i64, f64)>,
}

/// Where a batch came from: its gateway, bundle and receipt time.
struct Receipt<'a> {
    gateway: &'a Arc<str>,
    bundle: u64,
    received_at_ms: i64,
}

impl Receipt<'_> {
    /// A dead letter of a batch received so, carrying `raw` (the sealed batch, a
    /// raw series, a value).
    fn deadletter(
        &self,
        reason: &'static str,
        detail: String,
        h: Option<&BatchHeader<'_>>,
        raw: Vec<u8>,
    ) -> DeadLetter {
        DeadLetter {
            fleet: h.map(|h| h.fleet.into()),
            device: h.map(|h| h.device.into()),
            epoch: h.map(|h| h.epoch),
            seq: h.map(|h| h.seq),
            ts_ms: h.map(|h| h.base_time_ms as i64),
            schema: h.map(|h| h.schema),
            gateway: Some(self.gateway.to_string()),
            bundle_id: Some(self.bundle),
            received_at_ms: Some(self.received_at_ms),
            ..DeadLetter::new(reason, detail, raw)
        }
    }
}

/// One shard's state and its open segment.
pub struct ShardState {
    id: u16,
    shard_count: u16,
    node: String,
    cfg: SegmentConfig,
    stats: Arc<CloudStats>,
    generation: u64,
    last_commit_ms: Option<i64>,
    devices: HashMap<String, DeviceState>,
    deadletter_seen: VecDeque<u64>,
    deadletter_set: HashSet<u64>,
    totals: Totals,
    rows: Rows,
    open_batches: u64,
    open_bytes: u64,
    opened_at: Option<Instant>,
    acks: BTreeMap<String, BTreeSet<BundleId>>,
    registry: Option<Arc<Registry>>,
    validation: ValidationConfig,
    analytics: AnalyticsConfig,
    /// Per gateway: its clock, and its units not flagged silent by last receipt.
    clocks: HashMap<Arc<str>, (i64, i64)>,
    waiting: HashMap<String, BTreeSet<(i64, String)>>,
    /// Alerts of the newest commit, to publish again after a restart.
    resend: Vec<Event>,
    /// State changed since the last commit (a commit without rows still checkpoints it).
    dirty: bool,
    /// Dead-letter bytes per sender, shared by the node's shards.
    quota: Arc<DeadLetterQuota>,
    /// The `now` of the bundle being taken in.
    now: Option<Instant>,
    /// Per vehicle (`fleet/device`): its last closed windows and tire-risk state.
    models: HashMap<String, ModelMemory>,
    /// Feature rows of windows closed in the open segment, scored by its commit.
    scoring: Vec<ScoreRequest>,
}

fn device_key(fleet: &str, device: &str) -> String {
    format!("{fleet}/{device}")
}

impl ShardState {
    /// A shard that has committed nothing yet.
    pub fn new(id: u16, shard_count: u16, node: &str, cfg: SegmentConfig, stats: Arc<CloudStats>) -> Self {
        Self {
            id,
            shard_count,
            node: node.into(),
            cfg,
            stats,
            generation: 0,
            last_commit_ms: None,
            devices: HashMap::new(),
            deadletter_seen: VecDeque::new(),
            deadletter_set: HashSet::new(),
            totals: Totals::default(),
            rows: Rows::default(),
            open_batches: 0,
            open_bytes: 0,
            opened_at: None,
            acks: BTreeMap::new(),
            registry: None,
            validation: Default::default(),
            analytics: Default::default(),
            clocks: HashMap::new(),
            waiting: HashMap::new(),
            resend: Vec::new(),
            dirty: false,
            quota: Arc::default(),
            now: None,
            models: HashMap::new(),
            scoring: Vec::new(),
        }
    }

    /// This shard's id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Shards in the node's keyspace.
    pub fn shard_count(&self) -> u16 {
        self.shard_count
    }

    /// Last committed generation (0: none).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Analytics settings.
    pub fn set_analytics(&mut self, cfg: AnalyticsConfig) {
        self.analytics = cfg;
    }

    /// The node's dead-letter allowance per sender (see [`super::quota`]).
    pub fn set_deadletter_quota(&mut self, quota: Arc<DeadLetterQuota>) {
        self.quota = quota;
    }

    /// Validates readings against the registry: a batch's schema id must be
    /// registered, and each reading listed in that schema and within its range.
    /// Without a registry only the build's own signal table applies.
    pub fn set_registry(&mut self, registry: Arc<Registry>) {
        self.registry = Some(registry);
    }

    /// Clock sanity limits.
    pub fn set_validation(&mut self, v: ValidationConfig) {
        self.validation = v;
    }

    /// Forgets the open segment and takes the state of checkpoint `ckpt` (none: a
    /// shard that has committed nothing). Its outbox becomes the alerts to send again.
    pub fn restore(&mut self, ckpt: Option<Checkpoint>) {
        self.rows = Rows::default();
        self.scoring.clear();
        self.dirty = false;
        self.open_batches = 0;
        self.open_bytes = 0;
        self.opened_at = None;
        self.acks.clear();
        self.clocks.clear();
        self.waiting.clear();
        match ckpt {
            Some(c) => {
                self.clocks =
                    c.clocks.into_iter().map(|g| (Arc::from(g.gateway.as_str()), (g.last, g.since))).collect();
                self.resend = c.outbox;
                self.generation = c.generation;
                self.last_commit_ms = Some(c.committed_at_ms);
                self.totals = c.totals;
                self.devices = c.devices.into_iter().map(|d| (device_key(&d.fleet, &d.device), d)).collect();
                self.deadletter_set = c.deadletter_seen.iter().copied().collect();
                self.deadletter_seen = c.deadletter_seen.into();
                self.models = c.models.into_iter().map(|m| (device_key(&m.fleet, &m.device), m)).collect();
            }
            None => {
                self.generation = 0;
                self.last_commit_ms = None;
                self.totals = Totals::default();
                self.devices.clear();
                self.deadletter_seen.clear();
                self.deadletter_set.clear();
                self.resend.clear();
                self.models.clear();
            }
        }
        for (k, d) in &self.devices {
            if !d.last_gateway.is_empty() && !d.analytics.is_silent() {
                self.waiting.entry(d.last_gateway.clone()).or_default().insert((d.last_received_ms, k.clone()));
            }
        }
    }

    /// Alerts committed before the last restart, to publish again (once).
    pub fn take_resend(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.resend)
    }

    /// Takes one bundle as published on this shard's topic, at `now` (`wall`
    /// decides which device keys are valid). Its batches are opened, deduped,
    /// validated and added to the open segment; the bundle is acked by the commit
    /// that makes them durable.
    pub fn ingest(&mut self, payload: &[u8], prov: &Provisioning, now: Instant, wall: SystemTime) {
        self.stats.emit(ev::BundleReceived);
        self.now = Some(now);
        let header = match peek_bundle(payload) {
            Ok(h) => h,
            Err(e) => return self.bundle_deadletter(reason::BUNDLE_MALFORMED, e.to_string(), None, None, payload, now),
        };
        let gw_key = GatewayId::new(&header.gateway).ok().and_then(|g| prov.gateway(&g)).map(|g| g.key.clone());
        let Some(gw_key) = gw_key else {
            let detail = format!("gateway {:?} is not provisioned", header.gateway);
            return self.bundle_deadletter(reason::UNKNOWN_GATEWAY, detail, Some(&header.gateway), None, payload, now);
        };
        let (header, entries) = match open_bundle(payload, &gw_key) {
            Ok(b) => b,
            Err(e) => {
                let r = if matches!(e, WireError::AuthenticationFailed) {
                    reason::BUNDLE_AUTH_FAILED
                } else {
                    reason::BUNDLE_MALFORMED
                };
                return self.bundle_deadletter(
                    r,
                    e.to_string(),
                    Some(&header.gateway),
                    Some(header.id.0),
                    payload,
                    now,
                );
            }
        };
        if header.shard != self.id {
            // Gateways put each bundle on its shard's topic; a mismatch is a forged
            // or misrouted header. The batches are still checked one by one below.
            tracing::warn!(shard = self.id, header_shard = header.shard, "bundle for another shard on this topic");
        }
        let gateway: Arc<str> = header.gateway.as_str().into();
        for e in &entries {
            let from = Receipt { gateway: &gateway, bundle: header.id.0, received_at_ms: e.received_at_ms as i64 };
            self.ingest_batch(&from, &e.batch, prov, wall);
            self.gateway_tick(&gateway, e.received_at_ms as i64);
        }
        self.acks.entry(header.gateway).or_default().insert(header.id);
        self.open_bytes += payload.len() as u64;
        self.opened_at.get_or_insert(now);
    }

    /// One batch of a bundle: authenticated, deduped, then its readings validated
    /// into the open segment; whatever cannot be used becomes a dead letter.
    fn ingest_batch(&mut self, from: &Receipt<'_>, sealed: &[u8], prov: &Provisioning, wall: SystemTime) {
        let (header, decoded) = match self.authenticate(from, sealed, prov, wall) {
            Ok(opened) => opened,
            Err(d) => return self.hashed_deadletter(*d, Sender::Proven(from.gateway)),
        };
        // Authentic from here on: (device, epoch, seq) identifies the batch.
        let dkey = device_key(header.fleet, header.device);
        let floor = self.devices.get(&dkey).map_or(0, |d| d.epoch_floor);
        if header.epoch < floor {
            // Authentic, but from a boot epoch whose dedupe state is forgotten: a
            // replay of a captured batch, or a backlog older than anything kept.
            // Kept as a dead letter (once per distinct batch), never stored again.
            let detail = format!("boot epoch {} is below the device's epoch floor {}", header.epoch, floor);
            let d = from.deadletter(reason::STALE_EPOCH, detail, Some(&header), sealed.to_vec());
            return self.hashed_deadletter(d, Sender::Proven(from.gateway));
        }
        if !self.first_sight(&dkey, &header) {
            self.stats.emit(ev::Duplicate);
            return;
        }
        let batch_key = (header.epoch, header.seq);
        self.heard(&dkey, from.gateway, from.received_at_ms, batch_key);
        let schema = match (decoded, &self.registry) {
            (Err(e), _) => Err(from.deadletter(reason::UNDECODABLE, e.to_string(), Some(&header), sealed.to_vec())),
            (Ok(d), None) => Ok((d, None)),
            (Ok(d), Some(r)) => match r.schema(u32::from(header.schema)) {
                Some(s) => Ok((d, Some(s))),
                None => {
                    let detail = format!("schema id {} is not registered", header.schema);
                    Err(from.deadletter(reason::UNKNOWN_SCHEMA, detail, Some(&header), sealed.to_vec()))
                }
            },
        };
        let pts = match schema {
            Ok((decoded, schema)) => self.store_readings(from, &header, &dkey, decoded, schema.as_deref()),
            Err(d) => {
                // Authentic but unusable: kept whole, and analytics moves past it.
                self.push_deadletter(d, Sender::Proven(from.gateway));
                Vec::new()
            }
        };
        self.analyze(&dkey, batch_key, pts);
    }

    /// Opens a batch: its header parses, its device lives on this shard and is
    /// provisioned, and one of the device's valid keys verifies the seal. The body
    /// is decoded (a body that does not decode is still authentic). An `Err` is a
    /// dead letter whose sender is unproven.
    #[allow(clippy::type_complexity)] // (authentic header, decoded body or why not)
    fn authenticate<'s>(
        &self,
        from: &Receipt<'_>,
        sealed: &'s [u8],
        prov: &Provisioning,
        wall: SystemTime,
    ) -> Result<(BatchHeader<'s>, Result<DecodedBatch, WireError>), Box<DeadLetter>> {
        let refuse = |reason, detail: String, h: Option<&BatchHeader<'_>>| {
            Box::new(from.deadletter(reason, detail, h, sealed.to_vec()))
        };
        let header = peek_header(sealed).map_err(|e| refuse(reason::MALFORMED, e.to_string(), None))?;
        let (Ok(fleet), Ok(device)) = (FleetId::new(header.fleet), DeviceId::new(header.device)) else {
            return Err(refuse(reason::MALFORMED, "bad fleet or device id".into(), Some(&header)));
        };
        let home = shard_of(header.fleet, header.device, self.shard_count).0;
        if home != self.id {
            let detail = format!("device belongs to shard {home} of {}", self.shard_count);
            return Err(refuse(reason::WRONG_SHARD, detail, Some(&header)));
        }
        let Some(entry) = prov.device(&fleet, &device) else {
            return Err(refuse(reason::UNKNOWN_DEVICE, "device is not provisioned".into(), Some(&header)));
        };
        // Opened (and decoded) once, under whichever valid key verifies.
        match entry.open_batch(sealed, wall, |b, _| b.decode()) {
            Ok(decoded) => Ok((header, decoded)),
            Err(_) => {
                Err(refuse(reason::AUTH_FAILED, "seal does not verify under the device's keys".into(), Some(&header)))
            }
        }
    }

    /// Records an authentic batch as seen; false when it was seen before (a
    /// duplicate: dropped, its bundle still acked).
    fn first_sight(&mut self, dkey: &str, header: &BatchHeader<'_>) -> bool {
        let state = self.devices.entry(dkey.to_string()).or_insert_with(|| DeviceState {
            fleet: header.fleet.into(),
            device: header.device.into(),
            ..Default::default()
        });
        if !state.seen.insert(header.epoch, header.seq) {
            return false;
        }
        if let Some(forgot) = state.seen.retain_epochs(self.cfg.dedupe_epochs) {
            state.epoch_floor = state.epoch_floor.max(forgot.saturating_add(1));
        }
        self.open_batches += 1;
        self.dirty = true;
        true
    }

    /// Validates each reading of a new batch (time, and the schema when one is in
    /// use); valid ones become rows and the device's latest values, the others
    /// dead letters that keep the reading for a later replay. Returns what
    /// analytics gets.
    fn store_readings(
        &mut self,
        from: &Receipt<'_>,
        header: &BatchHeader<'_>,
        dkey: &str,
        decoded: DecodedBatch,
        schema: Option<&Schema>,
    ) -> Vec<Pt> {
        let meta = Arc::new(BatchMeta {
            fleet: header.fleet.into(),
            device: header.device.into(),
            epoch: header.epoch,
            seq: header.seq,
            gateway: from.gateway.clone(),
            received_at_ms: from.received_at_ms,
        });
        let mut refused = Vec::new();
        let mut pts = Vec::with_capacity(decoded.samples.len());
        let Some(state) = self.devices.get_mut(dkey) else { return pts };
        let times = self.validation.window(from.received_at_ms);
        for s in &decoded.samples {
            let Some(spec) = signals::spec(s.kind) else { continue };
            let checked = times.check(s.ts_ms).and_then(|()| match schema {
                Some(schema) => check_value(schema, header.schema, s.kind.0, s.value).map(|_| ()),
                None => Ok(()),
            });
            if let Err(r) = checked {
                refused.push((r, *s));
                continue;
            }
            pts.push(Pt { ts: s.ts_ms, kind: s.kind.0, value: s.value });
            self.rows.push_reading(&meta, s.ts_ms, spec.path, s.value);
            state.note_latest(s.kind.0, s.ts_ms, s.value);
        }
        self.stats.emit(ev::SamplesAccepted(pts.len() as u64));
        for (r, s) in refused {
            // The reading itself (value as f64 little-endian) with its kind and time,
            // so a corrected schema can take it in later.
            let mut d = from.deadletter(r.reason, r.detail, Some(header), s.value.to_le_bytes().to_vec());
            d.kind = Some(s.kind.0);
            d.ts_ms = Some(s.ts_ms);
            self.push_deadletter(d, Sender::Proven(from.gateway));
        }
        for u in decoded.unknown {
            let detail = format!("reading kind {} is not in schema {}", u.kind.0, header.schema);
            let mut d = from.deadletter(reason::UNKNOWN_KIND, detail, Some(header), u.raw);
            d.kind = Some(u.kind.0);
            self.push_deadletter(d, Sender::Proven(from.gateway));
        }
        pts
    }

    /// A device's batch, as analytics sees it (every new (epoch, seq) once).
    fn analyze(&mut self, dkey: &str, key: (u32, u32), pts: Vec<Pt>) {
        let Some(state) = self.devices.get_mut(dkey) else { return };
        let mut out = Output::default();
        let before = state.analytics.counts;
        let who = Who { fleet: &state.fleet, device: &state.device };
        state.analytics.offer(&who, key, pts, &self.analytics, &mut out);
        let after = state.analytics.counts;
        let (late_samples, gaps_skipped) =
            (after.late_samples - before.late_samples, after.gaps_skipped - before.gaps_skipped);
        if late_samples + gaps_skipped > 0 {
            self.stats.emit(ev::AnalyticsAdvanced { aggregates: 0, late_samples, gaps_skipped });
        }
        if out.aggregates.is_empty() && out.events.is_empty() {
            return;
        }
        let (fleet, device): (Arc<str>, Arc<str>) = (state.fleet.as_str().into(), state.device.as_str().into());
        self.take_output(&fleet, &device, out);
    }

    fn take_output(&mut self, fleet: &Arc<str>, device: &Arc<str>, out: Output) {
        let aggregates = out.aggregates.len() as u64;
        if aggregates > 0 {
            self.stats.emit(ev::AnalyticsAdvanced { aggregates, late_samples: 0, gaps_skipped: 0 });
        }
        for row in out.aggregates {
            if row.window == "1m" {
                self.remember_window(fleet, device, &row);
            }
            self.rows.push_aggregate(fleet, device, row);
        }
        for e in out.events {
            self.stats.emit(ev::EventRaised { kind: e.kind.as_str(), fleet, device });
            self.rows.push_event(e);
        }
    }

    /// A vehicle's one-minute window closed: it joins the vehicle's last
    /// windows, and each model's feature row for it waits for the commit.
    fn remember_window(&mut self, fleet: &Arc<str>, device: &Arc<str>, row: &AggregateRow) {
        let w = fleetline_inference::Window {
            start_ms: row.start,
            distance_m: Some(row.distance_m),
            avg_speed_kmh: row.avg_speed_kmh,
            max_speed_kmh: row.max_speed_kmh,
            tire_pressure_min_kpa: row.tire_pressure_min_kpa,
            tire_pressure_mean_kpa: row.tire_pressure_mean_kpa,
            tire_pressure_max_kpa: row.tire_pressure_max_kpa,
            leak_rate_kpa_h: row.leak_rate_kpa_h,
        };
        let memory = self.models.entry(device_key(fleet, device)).or_insert_with(|| ModelMemory {
            fleet: fleet.to_string(),
            device: device.to_string(),
            ..Default::default()
        });
        // Windows close in event-time order; one that does not follow (a
        // replayed old window) is not a feature of what comes after.
        if memory.windows.last().is_some_and(|last| last.start_ms >= w.start_ms) {
            return;
        }
        memory.windows.push(w);
        let keep = fleetline_inference::KINDS.iter().map(|k| k.history()).max().unwrap_or(1);
        let excess = memory.windows.len().saturating_sub(keep);
        memory.windows.drain(..excess);
        let rows: Vec<_> = fleetline_inference::KINDS
            .into_iter()
            .filter_map(|k| fleetline_inference::features(k, &memory.windows, MINUTE_MS).map(|r| (k, r)))
            .collect();
        if !rows.is_empty() {
            self.scoring.push(ScoreRequest {
                fleet: fleet.clone(),
                device: device.clone(),
                window_start: row.start,
                window_end: row.end,
                rows,
            });
        }
    }

    /// The feature rows of the open segment's windows, for its commit to score.
    pub fn take_scoring(&mut self) -> Vec<ScoreRequest> {
        std::mem::take(&mut self.scoring)
    }

    /// What scoring the commit's rows gave: the predictions join `rows`, and a
    /// live tire-risk score at or above its threshold for a vehicle that was
    /// below it raises a `tire_risk` event (and so an alert). The shadow's
    /// scores are stored and nothing more.
    pub fn apply_scores(&mut self, scored: Scored, rows: &mut Rows) {
        let mut counts: BTreeMap<(&'static str, Arc<str>), u64> = BTreeMap::new();
        for s in scored.predictions {
            *counts.entry((s.row.model, s.row.variant.clone())).or_default() += 1;
            if let Some(threshold) = s.threshold
                && let Some(memory) = self.models.get_mut(&device_key(&s.row.fleet, &s.row.device))
            {
                let high = f64::from(s.row.score) >= threshold;
                if high && !memory.risk_high {
                    let (fleet, device) = (&s.row.fleet, &s.row.device);
                    let e = Event {
                        id: event_id(fleet, device, EventKind::TireRisk, None, s.row.window_start),
                        fleet: fleet.to_string(),
                        device: device.to_string(),
                        kind: EventKind::TireRisk,
                        ts_ms: s.row.window_start,
                        detected_ms: s.row.window_end,
                        wheel: None,
                        value: Some(f64::from(s.row.score)),
                        detail: format!(
                            "tire risk {:.3} at or above {threshold} ({} v{}, variant {})",
                            s.row.score,
                            s.kind.name(),
                            s.row.version,
                            s.row.variant
                        ),
                    };
                    self.stats.emit(ev::EventRaised { kind: e.kind.as_str(), fleet, device });
                    rows.push_event(e);
                }
                memory.risk_high = high;
            }
            rows.push_prediction(s.row);
        }
        for ((model, variant), n) in counts {
            self.stats.emit(ev::Predicted { model, variant: &variant, n });
        }
        for (reason, kind, n) in scored.skipped {
            self.stats.emit(ev::PredictionsSkipped { model: kind.name(), reason, n });
        }
    }

    fn bundle_deadletter(
        &mut self,
        reason: &'static str,
        detail: String,
        gateway: Option<&str>,
        bundle: Option<u64>,
        payload: &[u8],
        now: Instant,
    ) {
        let d = DeadLetter {
            gateway: gateway.map(Into::into),
            bundle_id: bundle,
            ..DeadLetter::new(reason, detail, payload.to_vec())
        };
        self.hashed_deadletter(d, Sender::Claimed(gateway));
        self.opened_at.get_or_insert(now);
    }

    /// A dead letter whose sender is not authenticated: deduped by a hash of its bytes.
    fn hashed_deadletter(&mut self, d: DeadLetter, sender: Sender<'_>) {
        let h = fnv1a64(&d.raw) ^ fnv1a64(d.reason.as_bytes()).rotate_left(1);
        if !self.deadletter_set.insert(h) {
            self.stats.emit(ev::Duplicate);
            return;
        }
        self.deadletter_seen.push_back(h);
        while self.deadletter_seen.len() > DEADLETTER_SEEN_MAX {
            if let Some(old) = self.deadletter_seen.pop_front() {
                self.deadletter_set.remove(&old);
            }
        }
        self.push_deadletter(d, sender);
    }

    /// Keeps a dead letter if its sender's allowance holds its bytes; counts and
    /// drops it otherwise.
    fn push_deadletter(&mut self, d: DeadLetter, sender: Sender<'_>) {
        let bytes = d.raw.len() as u64;
        if let Some(now) = self.now
            && !self.quota.admit(sender, bytes, now)
        {
            self.stats.emit(ev::DeadLetterOverQuota { shard: self.id, reason: d.reason, bytes });
            return;
        }
        self.stats.emit(ev::DeadLettered { shard: self.id, reason: d.reason, detail: &d.detail });
        self.rows.push_deadletter(d);
    }

    /// When the open segment must be committed: at once when it is full or holds
    /// only acks (every batch a duplicate of committed data), else at its age limit.
    pub fn deadline(&self) -> Option<Instant> {
        let opened = self.opened_at?;
        if self.rows.len() >= self.cfg.max_rows || (self.rows.is_empty() && !self.acks.is_empty()) {
            return Some(opened);
        }
        Some(opened + self.cfg.max_age)
    }

    /// Closes the open segment: the acks it holds, and its rows when there is
    /// anything to write (rows, or state changed since the last commit). A commit
    /// that then fails must [`restore`](Self::restore) from the lake: rows and acks
    /// taken here are gone from memory.
    pub fn take_segment(&mut self) -> (Acks, Option<Rows>) {
        let acks: Acks =
            std::mem::take(&mut self.acks).into_iter().map(|(g, ids)| (g, ids.into_iter().collect())).collect();
        self.opened_at = None;
        self.open_bytes = 0;
        if self.rows.is_empty() && !self.dirty {
            return (acks, None);
        }
        (acks, Some(std::mem::take(&mut self.rows)))
    }

    /// The checkpoint of generation `generation` that commits `rows` (taken by
    /// [`take_segment`](Self::take_segment)) staged as `publish`, at `stored_at_ms`.
    pub fn checkpoint(&self, generation: u64, stored_at_ms: i64, publish: Vec<Publish>, rows: &Rows) -> Checkpoint {
        let mut totals = self.totals;
        totals.readings += rows.readings() as u64;
        totals.deadletters += rows.deadletters() as u64;
        totals.batches += self.open_batches;
        totals.files += publish.len() as u64;
        Checkpoint {
            shard: self.id,
            shard_count: self.shard_count,
            generation,
            committed_at_ms: stored_at_ms,
            node: self.node.clone(),
            devices: self.devices.values().cloned().collect(),
            deadletter_seen: self.deadletter_seen.iter().copied().collect(),
            publish,
            totals,
            clocks: self
                .clocks
                .iter()
                .map(|(g, (last, since))| GatewayClock { gateway: g.to_string(), last: *last, since: *since })
                .collect(),
            outbox: rows.events().cloned().collect(),
            // The commit protocol stamps its claim.
            claim: 0,
            epoch: 0,
            models: self.models.values().cloned().collect(),
        }
    }

    /// Checkpoint `ckpt` is written and its files are published: the shard is at
    /// its generation. Returns the totals it added.
    pub fn committed(&mut self, ckpt: &Checkpoint) -> Totals {
        let added = Totals {
            readings: ckpt.totals.readings - self.totals.readings,
            batches: ckpt.totals.batches - self.totals.batches,
            deadletters: ckpt.totals.deadletters - self.totals.deadletters,
            files: ckpt.totals.files - self.totals.files,
        };
        self.generation = ckpt.generation;
        self.last_commit_ms = Some(ckpt.committed_at_ms);
        self.totals = ckpt.totals;
        self.open_batches = 0;
        self.dirty = false;
        added
    }

    /// Status for `/status`.
    pub fn status(&self) -> ShardStatus {
        ShardStatus {
            shard: self.id,
            generation: self.generation,
            open_rows: self.rows.len(),
            pending_acks: self.acks.values().map(BTreeSet::len).sum(),
            open_bytes: self.open_bytes,
            oldest_uncommitted_ms: None,
            devices: self.devices.len(),
            dedupe_ranges: self.devices.values().map(|d| d.seen.range_count()).sum(),
            last_commit_ms: self.last_commit_ms,
            totals: self.totals,
        }
    }

    /// A vehicle's latest state, if this shard knows it.
    pub fn vehicle(&self, fleet: &str, device: &str) -> Option<VehicleState> {
        let d = self.devices.get(&device_key(fleet, device))?;
        Some(VehicleState {
            fleet: d.fleet.clone(),
            device: d.device.clone(),
            last_gateway: d.last_gateway.clone(),
            last_received_ms: d.last_received_ms,
            signals: d
                .latest
                .iter()
                .filter_map(|l| {
                    signals::spec(signals::SignalKind(l.kind)).map(|s| (s.path.to_string(), (l.ts_ms, l.value)))
                })
                .collect(),
        })
    }

    /// Rows in the open segment.
    pub fn open_rows(&self) -> usize {
        self.rows.len()
    }

    /// Bytes of the bundles in the open segment.
    pub fn open_bytes(&self) -> u64 {
        self.open_bytes
    }

    /// When the open segment was opened (none: nothing is open).
    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }
}

mod replay;
mod silence;

#[cfg(test)]
mod tests;
