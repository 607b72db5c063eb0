//! Pure: a shard takes dead letters in again after a schema fix (see
//! `crate::jobs::replay` for how they are read from the lake and sent round).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use fleetline_wire::decode::DecodedBatch;
use fleetline_wire::provisioning::Provisioning;
use fleetline_wire::{DeviceId, FleetId, peek_header};

use super::{ShardState, device_key};
use crate::lake::reason;
use crate::lake::rows::BatchMeta;
use crate::registry::SignalDef;
use crate::shard::replay::{ReplayItem, ReplayOutcome, intern};
use crate::telemetry::events as ev;

/// Opens a sealed batch of a dead letter again with its device's keys valid at `wall`.
fn reopen(sealed: &[u8], prov: &Provisioning, wall: SystemTime) -> Option<DecodedBatch> {
    let header = peek_header(sealed).ok()?;
    let entry = prov.device(&FleetId::new(header.fleet).ok()?, &DeviceId::new(header.device).ok()?)?;
    entry.open_batch(sealed, wall, |b, _| b.decode()).ok()?.ok()
}

impl ShardState {
    /// Takes dead letters in again, checked against the newest schema of `subject`
    /// (see [`crate::shard::replay`]); the rows and the replay marks commit together.
    pub fn replay(
        &mut self,
        items: &[ReplayItem],
        subject: &str,
        prov: Option<&Provisioning>,
        now: Instant,
        wall: SystemTime,
    ) -> ReplayOutcome {
        let mut out = ReplayOutcome::default();
        for item in items {
            out.candidates += 1;
            let Some(state) = self.devices.get_mut(&device_key(&item.fleet, &item.device)) else {
                // Not a device this shard stores (its batch was never authentic).
                out.still_invalid += 1;
                continue;
            };
            if state.replayed.contains(&item.key()) {
                out.already_replayed += 1;
                continue;
            }
            let times = self.validation.window(item.received_at_ms);
            let valid = |def: &SignalDef, ts: i64, v: f64| def.accepts(v) && times.check(ts).is_ok();
            let readings: Option<Vec<(i64, f64, &'static str)>> = if item.reason == reason::UNKNOWN_SCHEMA {
                // A whole batch under a schema id registered since: opened again with
                // the device's keys, every reading judged by that schema.
                let schema = self.registry.as_ref().and_then(|r| r.schema(item.schema?));
                prov.zip(schema).and_then(|(prov, schema)| {
                    let decoded = reopen(&item.raw, prov, wall)?;
                    decoded
                        .samples
                        .iter()
                        .map(|s| {
                            let def = schema.signal(s.kind.0)?;
                            valid(def, s.ts_ms, s.value).then(|| (s.ts_ms, s.value, intern(&def.path)))
                        })
                        .collect()
                })
            } else {
                // Judged by the newest schema of the subject its batch's schema belongs to.
                let schema = self.registry.as_ref().and_then(|r| {
                    let s = match item.schema {
                        Some(id) => r.subject_of(id, Some(subject))?,
                        None => subject.to_string(),
                    };
                    r.latest(&s)
                });
                schema.as_ref().and_then(|s| s.signal(item.kind)).and_then(|def| {
                    let path = intern(&def.path);
                    let rs = item.readings(def).ok()?;
                    rs.iter()
                        .all(|(ts, v)| valid(def, *ts, *v))
                        .then(|| rs.into_iter().map(|(ts, v)| (ts, v, path)).collect())
                })
            };
            let Some(readings) = readings else {
                out.still_invalid += 1;
                continue;
            };
            state.replayed.insert(item.key());
            let meta = Arc::new(BatchMeta {
                fleet: item.fleet.as_str().into(),
                device: item.device.as_str().into(),
                epoch: item.epoch,
                seq: item.seq,
                gateway: item.gateway.as_str().into(),
                received_at_ms: item.received_at_ms,
            });
            for (ts, v, path) in &readings {
                self.rows.push_reading(&meta, *ts, path, *v);
            }
            out.replayed += 1;
            out.readings += readings.len() as u64;
        }
        if out.replayed > 0 {
            self.opened_at.get_or_insert(now);
            self.stats.emit(ev::Replayed(out.replayed));
        }
        out
    }
}
