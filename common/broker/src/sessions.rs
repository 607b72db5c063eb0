//! One session per client id, decided by the front before the broker sees it.
//!
//! rumqttd 0.20 keeps a map of will handlers by client id and `unwrap`s a send
//! into the previous session's handler when the same id connects again; if that
//! session's task already ended without removing its entry (its link failed to
//! start), the send fails and the panic poisons the map's lock, after which no new
//! connection ever gets a CONNACK. A unit on a flapping link reconnects with its id
//! many times a second and, sooner or later, lands in that window.
//!
//! So the front never lets rumqttd see a take-over: before a new session of an id
//! is spliced to the broker, the previous one is told to stop and the front waits
//! until its broker connection is closed. Reconnects of one id are paced by a
//! token bucket (a burst, then a steady rate); a client over it gets CONNACK
//! "server unavailable" and is counted. Revocation ("kick") goes through the same
//! registry: the front closes the session, the broker sees an ordinary disconnect.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Sessions one id may start in a burst.
const BURST: f64 = 20.0;
/// Sessions per second one id may start after the burst.
const RATE: f64 = 5.0;
/// Longest wait for a previous session to close before refusing the new one.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Entries without a session are forgotten once idle this long (their bucket is full again).
const IDLE_FORGET: Duration = Duration::from_secs(10);

struct Slot {
    /// Serial of the session that holds the id, if one does.
    serial: Option<u64>,
    /// Set to true to make that session close.
    stop: watch::Sender<bool>,
    /// Turns true when that session's broker connection is closed.
    closed: watch::Receiver<bool>,
    tokens: f64,
    refilled: Instant,
    /// The login (username, password) the holding session opened with, so it can
    /// be checked again when keys change.
    login: Option<(String, String)>,
}

/// Why a session was not started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The id reconnects faster than the pacing allows.
    TooFast,
    /// The previous session of the id did not close in time.
    TakeoverStuck,
}

/// A session's handle: its stop signal, and the flag it sets when it is closed.
pub struct SessionGuard<'a> {
    registry: &'a Sessions,
    id: String,
    serial: u64,
    /// Turns true when the session must stop (taken over or kicked).
    pub stop: watch::Receiver<bool>,
    closed: watch::Sender<bool>,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let _ = self.closed.send(true);
        if let Ok(mut map) = self.registry.map.lock()
            && let Some(slot) = map.get_mut(&self.id)
            && slot.serial == Some(self.serial)
        {
            slot.serial = None;
            slot.login = None;
        }
    }
}

impl SessionGuard<'_> {
    /// Remembers the login this session opened with (see [`Sessions::recheck`]).
    pub fn remember_login(&self, username: &str, password: &str) {
        if let Ok(mut map) = self.registry.map.lock()
            && let Some(slot) = map.get_mut(&self.id)
            && slot.serial == Some(self.serial)
        {
            slot.login = Some((username.to_string(), password.to_string()));
        }
    }
}

/// The registry of live sessions by client id, shared by every listener of one broker.
pub struct Sessions {
    map: Mutex<HashMap<String, Slot>>,
    next: std::sync::atomic::AtomicU64,
    burst: f64,
    rate: f64,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::with_pacing(BURST, RATE)
    }
}

impl Sessions {
    /// A registry that lets one id start `burst` sessions at once and `rate` per
    /// second after that.
    pub fn with_pacing(burst: f64, rate: f64) -> Self {
        Self { map: Mutex::default(), next: Default::default(), burst, rate }
    }

    /// Starts a session for `id`: paces it, stops the previous session of the id
    /// and waits until that one's broker connection is closed.
    pub async fn begin(&self, id: &str) -> Result<SessionGuard<'_>, Refused> {
        let serial = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let previous = {
            let mut map = self.map.lock().map_err(|_| Refused::TakeoverStuck)?;
            if map.len() > 1024 && map.len().is_power_of_two() {
                map.retain(|_, s| s.serial.is_some() || now.duration_since(s.refilled) < IDLE_FORGET);
            }
            let slot = map.entry(id.to_string()).or_insert_with(|| {
                let (stop, _) = watch::channel(false);
                let (_, closed) = watch::channel(true);
                Slot { serial: None, stop, closed, tokens: self.burst, refilled: now, login: None }
            });
            slot.tokens = (slot.tokens + now.duration_since(slot.refilled).as_secs_f64() * self.rate).min(self.burst);
            slot.refilled = now;
            if slot.tokens < 1.0 {
                return Err(Refused::TooFast);
            }
            slot.tokens -= 1.0;
            // Tell the holder to stop, and take its "closed" flag to wait on.
            let _ = slot.stop.send(true);
            let previous = slot.closed.clone();
            let (stop, stop_rx) = watch::channel(false);
            let (closed_tx, closed_rx) = watch::channel(false);
            slot.serial = Some(serial);
            slot.login = None;
            slot.stop = stop;
            slot.closed = closed_rx;
            (previous, stop_rx, closed_tx)
        };
        let (mut previous, stop, closed) = previous;
        let guard = SessionGuard { registry: self, id: id.to_string(), serial, stop, closed };
        match tokio::time::timeout(TAKEOVER_WAIT, previous.wait_for(|c| *c)).await {
            // Closed, or its sender is gone (the session ended): either way it is over.
            Ok(_) => Ok(guard),
            Err(_) => Err(Refused::TakeoverStuck),
        }
    }

    /// Closes the session of `id`, if there is one (revocation).
    pub fn kick(&self, id: &str) -> bool {
        let Ok(map) = self.map.lock() else { return false };
        match map.get(id) {
            Some(slot) if slot.serial.is_some() => {
                let _ = slot.stop.send(true);
                true
            }
            _ => false,
        }
    }

    /// Checks every live session's login again (after keys changed: a rotation
    /// past the old key's window, a revocation) and closes those that no longer
    /// pass; returns their ids.
    pub fn recheck(&self, check: impl Fn(&str, &str, &str) -> Result<(), &'static str>) -> Vec<String> {
        let Ok(map) = self.map.lock() else { return Vec::new() };
        let mut closed = Vec::new();
        for (id, slot) in map.iter() {
            if let (Some(_), Some((user, pass))) = (slot.serial, &slot.login)
                && check(id, user, pass).is_err()
            {
                let _ = slot.stop.send(true);
                closed.push(id.clone());
            }
        }
        closed
    }

    /// Sessions holding an id now.
    pub fn live(&self) -> usize {
        self.map.lock().map(|m| m.values().filter(|s| s.serial.is_some()).count()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_new_session_waits_for_the_old_one_to_close() {
        let s = Sessions::default();
        let mut a = s.begin("x").await.unwrap();
        assert!(!*a.stop.borrow());
        let s2 = &s;
        let b = async move { s2.begin("x").await.map(|g| g.serial) };
        let closer = async move {
            a.stop.wait_for(|v| *v).await.unwrap();
            // The old session notices, closes its broker connection, and ends.
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a);
        };
        let (b, ()) = tokio::join!(b, closer);
        assert!(b.is_ok());
        assert_eq!(s.live(), 0);
    }

    #[tokio::test]
    async fn reconnects_of_one_id_are_paced_and_others_are_not_affected() {
        let s = Sessions::default();
        let mut ok = 0;
        for _ in 0..100 {
            if s.begin("x").await.is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, BURST as usize);
        assert_eq!(s.begin("x").await.err(), Some(Refused::TooFast));
        assert!(s.begin("y").await.is_ok());
    }

    #[tokio::test]
    async fn a_recheck_closes_sessions_whose_login_no_longer_passes() {
        let s = Sessions::default();
        let mut a = s.begin("a").await.unwrap();
        a.remember_login("a", "old");
        let mut b = s.begin("b").await.unwrap();
        b.remember_login("b", "new");
        let closed = s.recheck(|_, _, pass| if pass == "new" { Ok(()) } else { Err("bad_password") });
        assert_eq!(closed, ["a"]);
        assert!(*a.stop.borrow_and_update());
        assert!(!*b.stop.borrow_and_update());
    }

    #[tokio::test]
    async fn kick_stops_the_live_session() {
        let s = Sessions::default();
        let mut g = s.begin("x").await.unwrap();
        assert!(s.kick("x"));
        assert!(*g.stop.borrow_and_update());
        drop(g);
        assert!(!s.kick("x"));
    }
}
