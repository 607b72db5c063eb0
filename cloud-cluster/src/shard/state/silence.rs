//! Pure: silence bookkeeping. A unit belongs to the gateway of its newest batch;
//! each gateway's clock, as this shard hears it, decides when its units are
//! silent (the one judgement not made on event time).

use std::sync::Arc;

use super::ShardState;
use crate::analytics::{Output, Who};

impl ShardState {
    /// A new batch (`key`) of a device came through `gateway`, received at
    /// `received_ms` by that gateway's clock. The unit is heard (not silent); it
    /// belongs to the gateway of its newest batch, and receipt times are only ever
    /// compared within one gateway's clock.
    pub(super) fn heard(&mut self, dkey: &str, gateway: &Arc<str>, received_ms: i64, key: (u32, u32)) {
        let Some(state) = self.devices.get_mut(dkey) else { return };
        if !state.analytics.is_silent()
            && let Some(w) = self.waiting.get_mut(&state.last_gateway)
        {
            w.remove(&(state.last_received_ms, dkey.to_string()));
        }
        let newer = state.last_gateway.is_empty() || key > state.last_batch;
        let moved = *state.last_gateway != **gateway && newer;
        if !moved {
            state.analytics.heard(received_ms, false);
        }
        if *state.last_gateway == **gateway {
            state.last_received_ms = state.last_received_ms.max(received_ms);
        } else if newer {
            state.last_gateway = gateway.to_string();
            state.last_received_ms = received_ms;
            state.analytics.heard(received_ms, true);
        }
        if newer {
            state.last_batch = key;
        }
        if !state.analytics.is_silent() {
            let entry = (state.last_received_ms, dkey.to_string());
            match self.waiting.get_mut(&state.last_gateway) {
                Some(w) => {
                    w.insert(entry);
                }
                None => {
                    self.waiting.insert(state.last_gateway.clone(), [entry].into());
                }
            }
        }
    }

    /// The gateway's clock reads `received_ms` (an entry it received then): units
    /// it has not heard for `silent_after` while hearing others without a pause are
    /// silent.
    pub(super) fn gateway_tick(&mut self, gateway: &Arc<str>, received_ms: i64) {
        let after = self.analytics.silent_after.as_millis() as i64;
        let (last, since) = self.clocks.entry(gateway.clone()).or_insert((received_ms, received_ms));
        if received_ms <= *last {
            return;
        }
        if received_ms - *last > after / 2 {
            // A pause: the gateway was away (or only silent units are left); start over.
            *since = received_ms;
        }
        *last = received_ms;
        self.dirty = true;
        let (now, since) = (*last, *since);
        if now - since <= after {
            return;
        }
        let Some(waiting) = self.waiting.get_mut(&**gateway) else { return };
        let mut silent = Vec::new();
        while let Some(first) = waiting.first()
            && first.0 < now - after
        {
            if let Some(w) = waiting.pop_first() {
                silent.push(w);
            }
        }
        for (last, dkey) in silent {
            let Some(state) = self.devices.get_mut(&dkey) else { continue };
            let mut out = Output::default();
            let who = Who { fleet: &state.fleet, device: &state.device };
            state.analytics.check_silent(&who, last, last.max(since), now, &self.analytics, &mut out);
            let (fleet, device): (Arc<str>, Arc<str>) = (state.fleet.as_str().into(), state.device.as_str().into());
            self.take_output(&fleet, &device, out);
        }
    }
}
