//! Pure: how many dead-letter bytes one sender may have stored per interval.
//!
//! Dead letters keep what could not be used, whole, so a corrected schema or key
//! can take it in later. Without a bound, anyone who can publish to an ingest
//! topic stores a packet's worth of garbage per message. Each sender has a byte
//! allowance per interval, node-wide (every shard of the node charges the same
//! account); what is over it is counted and dropped. A sender is the gateway that
//! sealed the bundle when its seal verified (`Proven`), or the gateway a bundle
//! merely names (`Claimed`): a stranger naming a real gateway spends the claimed
//! account, never the proven one, so forged bundles cannot crowd out a gateway's
//! own dead letters. The clock comes in as an argument.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleetline_service::ByteSize;
use serde::Deserialize;

/// The allowance.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Bytes of dead letters one sender may have stored per `per`, on one node.
    pub quota: ByteSize,
    /// The interval.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self { quota: ByteSize(16 << 20), per: Duration::from_secs(60) }
    }
}

/// Who a dead letter is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender<'a> {
    /// The gateway whose bundle seal verified.
    Proven(&'a str),
    /// The gateway a bundle names without proof (or none, when it names none).
    Claimed(Option<&'a str>),
}

/// Accounts kept before old ones are swept.
const SWEEP_AT: usize = 4096;

/// Every sender's use in its current interval, shared by the node's shards.
#[derive(Debug)]
pub struct DeadLetterQuota {
    cfg: DeadLetterConfig,
    accounts: Mutex<HashMap<(bool, String), (Instant, u64)>>,
}

impl DeadLetterQuota {
    /// A quota with `cfg`'s allowance.
    pub fn new(cfg: DeadLetterConfig) -> Self {
        Self { cfg, accounts: Mutex::default() }
    }

    /// Charges `bytes` to `sender` at `now`: `true` if they fit its allowance
    /// (and are now spent), `false` if they are over it (nothing spent).
    pub fn admit(&self, sender: Sender<'_>, bytes: u64, now: Instant) -> bool {
        let key = match sender {
            Sender::Proven(g) => (true, g.to_string()),
            Sender::Claimed(g) => (false, g.unwrap_or("").to_string()),
        };
        let Ok(mut accounts) = self.accounts.lock() else { return false };
        if accounts.len() >= SWEEP_AT {
            let per = self.cfg.per;
            accounts.retain(|_, (start, _)| now.saturating_duration_since(*start) < per);
        }
        let (start, used) = accounts.entry(key).or_insert((now, 0));
        if now.saturating_duration_since(*start) >= self.cfg.per {
            *start = now;
            *used = 0;
        }
        if used.saturating_add(bytes) > self.cfg.quota.0 {
            return false;
        }
        *used += bytes;
        true
    }
}

impl Default for DeadLetterQuota {
    fn default() -> Self {
        Self::new(DeadLetterConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sender_has_its_own_allowance_per_interval() {
        let q = DeadLetterQuota::new(DeadLetterConfig { quota: ByteSize(1000), per: Duration::from_secs(60) });
        let t0 = Instant::now();
        assert!(q.admit(Sender::Claimed(Some("gw-1")), 600, t0));
        assert!(!q.admit(Sender::Claimed(Some("gw-1")), 600, t0), "over the allowance");
        assert!(q.admit(Sender::Claimed(Some("gw-1")), 400, t0), "what fits still fits");
        // A forger naming gw-1 does not spend gw-1's own (proven) allowance.
        assert!(q.admit(Sender::Proven("gw-1"), 1000, t0));
        assert!(q.admit(Sender::Claimed(Some("gw-2")), 1000, t0));
        assert!(q.admit(Sender::Claimed(None), 1000, t0));
        assert!(!q.admit(Sender::Claimed(None), 1, t0));
        // The next interval starts afresh.
        assert!(q.admit(Sender::Claimed(Some("gw-1")), 1000, t0 + Duration::from_secs(60)));
        // A clock read earlier than the interval's start changes nothing.
        assert!(!q.admit(Sender::Claimed(Some("gw-1")), 1, t0));
    }

    #[test]
    fn accounts_of_past_intervals_are_swept() {
        let q = DeadLetterQuota::new(DeadLetterConfig { quota: ByteSize(10), per: Duration::from_secs(1) });
        let t0 = Instant::now();
        for i in 0..SWEEP_AT {
            assert!(q.admit(Sender::Claimed(Some(&format!("g{i}"))), 10, t0));
        }
        assert!(q.admit(Sender::Claimed(Some("late")), 10, t0 + Duration::from_secs(2)));
        assert_eq!(q.accounts.lock().unwrap().len(), 1);
    }
}
