//! Sessions served by the front itself, without a broker behind it.
//!
//! Where every login may only publish to the owner and read what the owner sends
//! it (a gateway's units: batches up, acks and commands down), a broker's router
//! adds nothing but cost: a loopback socket pair per session and a single thread
//! matching every topic against every filter. Here the front answers the CONNECT,
//! hands each checked PUBLISH to the owner through one channel, and delivers what
//! the owner publishes to the sessions subscribed to it through each session's
//! own channel. A session costs one file descriptor (its socket).
//!
//! MQTT 3.1.1 for the client: CONNACK, PUBACK once the owner has taken the
//! message (QoS 1), PUBREC/PUBCOMP (QoS 2, delivered once per packet id),
//! SUBACK with the granted QoS (at most 1), UNSUBACK, PINGRESP, and the session
//! closed when nothing arrives within one and a half keep-alives. Clean sessions
//! only; nothing is retained.
//!
//! Back-pressure instead of loss: what sessions hand to the owner is bounded in
//! bytes for all sessions together and in messages per session; a session over
//! either stops being read (TCP holds the client back) until the owner catches
//! up. Deliveries to a session whose own queue is full are dropped and counted
//! (the owner's messages here are acks, which the unit's re-send brings again).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{QoS, has_wildcards, matches};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::grants::{Grants, check_packet};
use crate::reason;

/// A message a session handed to the owner. Its permits go back when it is dropped.
pub struct Inbound {
    /// Client id of the session that sent it.
    pub client_id: Arc<str>,
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    _bytes: OwnedSemaphorePermit,
    _session: OwnedSemaphorePermit,
    taken: Arc<AtomicU64>,
}

impl Drop for Inbound {
    fn drop(&mut self) {
        self.taken.store(fleetline_service::unix_ms(), Ordering::Relaxed);
    }
}

/// One delivery to a session.
struct Outbound {
    topic: Arc<str>,
    payload: Bytes,
}

/// A session's subscription.
struct Route {
    serial: u64,
    qos: QoS,
    tx: mpsc::Sender<(Outbound, QoS)>,
}

/// Messages a session may have handed to the owner and not yet had taken.
pub const SESSION_INFLIGHT_IN: usize = 64;
/// QoS 1 deliveries a session may have unacknowledged; more wait in its queue.
pub const SESSION_INFLIGHT_OUT: usize = 32;
/// Deliveries waiting for one session; more are dropped and counted.
const SESSION_QUEUE: usize = 256;
/// Longest a PUBACK waits to share a write with what follows it.
const PUBACK_HOLD: Duration = Duration::from_millis(20);
/// A write to a client that takes longer ends its session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Accounting unit of the byte budget.
const BUDGET_UNIT: usize = 1024;

/// Routes between the sessions and the owner.
pub struct Switchboard {
    inbound: mpsc::UnboundedSender<Inbound>,
    budget: Arc<Semaphore>,
    budget_units: usize,
    exact: Mutex<HashMap<Arc<str>, Vec<Route>>>,
    wild: Mutex<Vec<(Arc<str>, Route)>>,
    next_serial: AtomicU64,
    /// Deliveries dropped because the session's queue was full.
    pub dropped: AtomicU64,
    /// Deliveries made.
    pub delivered: AtomicU64,
    /// Times a session waited for the owner (the byte budget was spent).
    pub held_back: AtomicU64,
    /// When the owner last finished with a message, ms since the Unix epoch.
    taken: Arc<AtomicU64>,
}

impl Switchboard {
    /// A switchboard whose sessions may hand the owner up to `budget_bytes` not yet
    /// taken; the owner reads what they send from the returned receiver.
    pub fn new(budget_bytes: usize) -> (Arc<Self>, mpsc::UnboundedReceiver<Inbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let units = budget_bytes.div_ceil(BUDGET_UNIT).max(1);
        let board = Self {
            inbound: tx,
            budget: Arc::new(Semaphore::new(units)),
            budget_units: units,
            exact: Mutex::default(),
            wild: Mutex::default(),
            next_serial: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            taken: Arc::new(AtomicU64::new(fleetline_service::unix_ms())),
        };
        (Arc::new(board), rx)
    }

    /// Bytes handed to the owner and not yet taken (in whole KiB).
    pub fn backlog_bytes(&self) -> usize {
        (self.budget_units - self.budget.available_permits()) * BUDGET_UNIT
    }

    /// Whether the owner is wedged: messages wait for it and it has finished
    /// none for `after` (readiness turns false).
    pub fn wedged(&self, now_ms: u64, after: Duration) -> bool {
        let idle = now_ms.saturating_sub(self.taken.load(Ordering::Relaxed));
        self.backlog_bytes() > 0 && idle >= after.as_millis() as u64
    }

    /// Publishes `payload` on `topic` at `qos` (at most) to every session
    /// subscribed to it, at once and without waiting; returns how many sessions it
    /// was queued for. Sessions are clean, so QoS 1 adds nothing to TCP's own
    /// delivery but an acknowledgement packet: idempotent messages go at QoS 0.
    pub fn publish(&self, topic: &str, payload: Bytes, qos: QoS) -> usize {
        let topic: Arc<str> = topic.into();
        let mut sent = 0;
        let mut offer = |r: &Route| {
            let out = Outbound { topic: topic.clone(), payload: payload.clone() };
            let qos = if qos == QoS::AtMostOnce { QoS::AtMostOnce } else { r.qos };
            match r.tx.try_send((out, qos)) {
                Ok(()) => sent += 1,
                Err(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("fleetline_broker_deliveries_dropped_total").increment(1);
                }
            }
        };
        if let Ok(exact) = self.exact.lock()
            && let Some(routes) = exact.get(&*topic)
        {
            routes.iter().for_each(&mut offer);
        }
        if let Ok(wild) = self.wild.lock() {
            wild.iter().filter(|(f, _)| matches(&topic, f)).for_each(|(_, r)| offer(r));
        }
        self.delivered.fetch_add(sent as u64, Ordering::Relaxed);
        sent
    }

    fn subscribe(&self, filter: &str, route: Route) {
        if has_wildcards(filter) {
            if let Ok(mut wild) = self.wild.lock() {
                wild.retain(|(f, r)| !(r.serial == route.serial && &**f == filter));
                wild.push((filter.into(), route));
            }
        } else if let Ok(mut exact) = self.exact.lock() {
            let routes = exact.entry(filter.into()).or_default();
            routes.retain(|r| r.serial != route.serial);
            routes.push(route);
        }
    }

    fn unsubscribe(&self, filter: &str, serial: u64) {
        if has_wildcards(filter) {
            if let Ok(mut wild) = self.wild.lock() {
                wild.retain(|(f, r)| !(r.serial == serial && &**f == filter));
            }
        } else if let Ok(mut exact) = self.exact.lock()
            && let Some(routes) = exact.get_mut(filter)
        {
            routes.retain(|r| r.serial != serial);
            if routes.is_empty() {
                exact.remove(filter);
            }
        }
    }

    /// Filters with at least one subscriber (exact and wildcard).
    pub fn filters(&self) -> usize {
        self.exact.lock().map_or(0, |m| m.len()) + self.wild.lock().map_or(0, |w| w.len())
    }
}

/// Who a session is and what it may do.
#[derive(Clone, Copy)]
pub struct Login<'a> {
    /// Client id.
    pub client_id: &'a str,
    /// Its grants.
    pub grants: &'a dyn Grants,
    /// Keep-alive in seconds (at least 1).
    pub keep_alive: u16,
    /// Largest packet it may send.
    pub max_packet: usize,
}

/// How a direct session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed, said DISCONNECT, or a write failed.
    Closed,
    /// Nothing arrived within one and a half keep-alives.
    KeepAlive,
    /// Taken over or kicked.
    Stopped,
    /// A packet outside the grants; the reason to count.
    Refused(&'static str),
}

/// A session's state while it runs.
struct Session<'a> {
    board: &'a Switchboard,
    serial: u64,
    client_id: Arc<str>,
    grants: &'a dyn Grants,
    per_session: Arc<Semaphore>,
    filters: Vec<String>,
    filter_count: usize,
    /// QoS 2 packet ids handed over and not yet released.
    qos2: HashSet<u16>,
    /// QoS 1 deliveries not yet acknowledged.
    unacked: HashSet<u16>,
    next_pkid: u16,
    out: BytesMut,
    /// `out` holds something other than PUBACKs: write it now.
    urgent: bool,
    /// PUBACKs alone in `out` are written by then.
    hold_until: Option<tokio::time::Instant>,
    tx: mpsc::Sender<(Outbound, QoS)>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        for f in std::mem::take(&mut self.filters) {
            self.board.unsubscribe(&f, self.serial);
        }
    }
}

/// Serves a logged-in session: CONNACK, then packets both ways until it ends.
/// `pending` holds what the client sent after its CONNECT.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    board: &Switchboard,
    client: S,
    login: Login<'_>,
    mut pending: BytesMut,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Ended {
    let Login { client_id, grants, keep_alive, max_packet } = login;
    let (mut rd, mut wr) = tokio::io::split(client);
    let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
    let mut s = Session {
        board,
        serial: board.next_serial.fetch_add(1, Ordering::Relaxed),
        client_id: client_id.into(),
        grants,
        per_session: Arc::new(Semaphore::new(SESSION_INFLIGHT_IN)),
        filters: Vec::new(),
        filter_count: 0,
        qos2: HashSet::new(),
        unacked: HashSet::new(),
        next_pkid: 0,
        out: BytesMut::with_capacity(256),
        urgent: false,
        hold_until: None,
        tx,
    };
    if ConnAck::new(ConnectReturnCode::Success, false).write(&mut s.out).is_err() || !flush(&mut wr, &mut s.out).await {
        return Ended::Closed;
    }
    // A read into a buffer without spare room would look like the end of the stream.
    pending.reserve(read_room(&pending, max_packet));
    let idle = Duration::from_millis(u64::from(keep_alive.max(1)) * 1500);
    let mut deadline = tokio::time::Instant::now() + idle;
    // A PUBLISH waiting for budget, with the permits it needs.
    let mut held: Option<(Publish, u32)> = None;
    loop {
        // Whole packets already buffered, unless one is held for budget.
        while held.is_none() {
            match next_packet(&mut pending, max_packet) {
                Ok(None) => break,
                Ok(Some(packet)) => match s.on_packet(packet) {
                    Step::Go => {}
                    Step::Hold(p, units) => held = Some((p, units)),
                    Step::End(e) => {
                        let _ = flush(&mut wr, &mut s.out).await;
                        return e;
                    }
                },
                Err(why) => return Ended::Refused(why),
            }
        }
        // PUBACKs alone wait a moment for company (the ack that follows a durable
        // batch, more PUBACKs): one write and one segment instead of several.
        let now = tokio::time::Instant::now();
        let due = s.out.len() >= 16 * 1024 || s.urgent || s.hold_until.is_some_and(|t| t <= now);
        if !s.out.is_empty() && due {
            if !flush(&mut wr, &mut s.out).await {
                return Ended::Closed;
            }
            s.urgent = false;
            s.hold_until = None;
        } else if !s.out.is_empty() && s.hold_until.is_none() {
            s.hold_until = Some(now + PUBACK_HOLD);
        }
        let hold_until = s.hold_until;
        let room = s.unacked.len() < SESSION_INFLIGHT_OUT;
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return Ended::Stopped,
            _ = tokio::time::sleep_until(deadline) => return Ended::KeepAlive,
            _ = tokio::time::sleep_until(hold_until.unwrap_or(deadline)), if hold_until.is_some() => {}
            Some((out, qos)) = rx.recv(), if room => {
                s.deliver(out, qos);
                // What else is queued goes out in the same write.
                while s.unacked.len() < SESSION_INFLIGHT_OUT && s.out.len() < 64 * 1024 {
                    let Ok((out, qos)) = rx.try_recv() else { break };
                    s.deliver(out, qos);
                }
            }
            permits = acquire(board, &s.per_session, held.as_ref().map(|h| h.1)), if held.is_some() => {
                let Some((p, _)) = held.take() else { continue };
                match permits {
                    Some(permits) => s.hand_over(p, permits),
                    None => return Ended::Closed,
                }
            }
            read = rd.read_buf(&mut pending), if held.is_none() => match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => {
                    deadline = tokio::time::Instant::now() + idle;
                    // Room for the rest of a partial packet, or a small read: an
                    // idle session of a depot's thousands holds little.
                    pending.reserve(read_room(&pending, max_packet));
                }
            },
        }
    }
}

/// What to do after a packet.
enum Step {
    Go,
    /// A PUBLISH that waits for this many budget units.
    Hold(Publish, u32),
    End(Ended),
}

impl Session<'_> {
    fn on_packet(&mut self, packet: Packet) -> Step {
        if let Err(why) = check_packet(&packet, self.grants, &mut self.filter_count) {
            return Step::End(Ended::Refused(why));
        }
        match packet {
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce && self.qos2.contains(&p.pkid) {
                    // A re-send of a message already handed over: acknowledge only.
                    self.write(&Packet::PubRec(PubRec::new(p.pkid)));
                    return Step::Go;
                }
                let units = p.payload.len().div_ceil(BUDGET_UNIT).max(1) as u32;
                match (
                    self.board.budget.clone().try_acquire_many_owned(units),
                    self.per_session.clone().try_acquire_owned(),
                ) {
                    (Ok(bytes), Ok(session)) => self.hand_over(p, (bytes, session)),
                    _ => {
                        self.board.held_back.fetch_add(1, Ordering::Relaxed);
                        return Step::Hold(p, units);
                    }
                }
            }
            Packet::PubAck(a) => {
                self.unacked.remove(&a.pkid);
            }
            Packet::PubRel(r) => {
                self.qos2.remove(&r.pkid);
                self.write(&Packet::PubComp(PubComp::new(r.pkid)));
            }
            // Nothing is sent at QoS 2, so these have nothing to complete.
            Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Subscribe(sub) => {
                let mut codes = Vec::with_capacity(sub.filters.len());
                for f in sub.filters {
                    let qos = if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                    self.board.subscribe(&f.path, Route { serial: self.serial, qos, tx: self.tx.clone() });
                    if !self.filters.contains(&f.path) {
                        self.filters.push(f.path);
                    }
                    codes.push(SubscribeReasonCode::Success(qos));
                }
                self.write(&Packet::SubAck(SubAck::new(sub.pkid, codes)));
            }
            Packet::Unsubscribe(u) => {
                for t in &u.topics {
                    self.board.unsubscribe(t, self.serial);
                    self.filters.retain(|f| f != t);
                }
                self.write(&Packet::UnsubAck(UnsubAck::new(u.pkid)));
            }
            Packet::PingReq => self.write(&Packet::PingResp),
            Packet::Disconnect => return Step::End(Ended::Closed),
            // `check_packet` refused the rest.
            _ => return Step::End(Ended::Refused(reason::MALFORMED)),
        }
        Step::Go
    }

    /// Gives a PUBLISH to the owner and acknowledges it to the client.
    fn hand_over(&mut self, p: Publish, (bytes, session): (OwnedSemaphorePermit, OwnedSemaphorePermit)) {
        let (qos, pkid) = (p.qos, p.pkid);
        let inbound = Inbound {
            client_id: self.client_id.clone(),
            topic: p.topic,
            payload: p.payload,
            _bytes: bytes,
            _session: session,
            taken: self.board.taken.clone(),
        };
        // The owner gone means the process is stopping; the client re-sends later.
        if self.board.inbound.send(inbound).is_err() {
            return;
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.write(&Packet::PubAck(PubAck::new(pkid))),
            QoS::ExactlyOnce => {
                self.qos2.insert(pkid);
                self.write(&Packet::PubRec(PubRec::new(pkid)));
            }
        }
    }

    /// Writes one delivery to the client.
    fn deliver(&mut self, out: Outbound, qos: QoS) {
        let mut p = Publish::new(&*out.topic, qos, Vec::new());
        p.payload = out.payload;
        if qos != QoS::AtMostOnce {
            // Packet ids not in use, 1..=65535.
            loop {
                self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
                if !self.unacked.contains(&self.next_pkid) {
                    break;
                }
            }
            p.pkid = self.next_pkid;
            self.unacked.insert(p.pkid);
        }
        self.write(&Packet::Publish(p));
    }

    fn write(&mut self, packet: &Packet) {
        self.urgent |= !matches!(packet, Packet::PubAck(_));
        // Every packet written here is far below the limit.
        let _ = packet.write(&mut self.out, usize::MAX);
    }
}

/// Waits for `units` of the shared byte budget and a slot of the session's own.
async fn acquire(
    board: &Switchboard,
    session: &Arc<Semaphore>,
    units: Option<u32>,
) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
    let units = units?;
    let own = session.clone().acquire_owned().await.ok()?;
    let bytes = board.budget.clone().acquire_many_owned(units).await.ok()?;
    Some((bytes, own))
}

/// Spare capacity to read into next: what a partial packet at the front still
/// needs, at least [`READ_CHUNK`].
fn read_room(buf: &BytesMut, max_packet: usize) -> usize {
    match rumqttc::mqttbytes::check(buf.iter(), max_packet) {
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => n.max(READ_CHUNK),
        _ => READ_CHUNK,
    }
}

/// Smallest read.
const READ_CHUNK: usize = 1024;

/// The next whole packet in `buf`, if there is one.
fn next_packet(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, &'static str> {
    match Packet::read(buf, max_packet) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(_) => Err(reason::MALFORMED),
    }
}

async fn flush<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut BytesMut) -> bool {
    let ok = matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(out)).await, Ok(Ok(())));
    out.clear();
    ok
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rumqttc::mqttbytes::v4::{PubRel, Subscribe, Unsubscribe};
    use tokio::io::DuplexStream;

    /// May publish to `up/…` and read `down/…` only.
    struct UpDown;

    impl Grants for UpDown {
        fn may_publish(&self, topic: &str) -> bool {
            topic.starts_with("up/")
        }

        fn may_subscribe(&self, filter: &str) -> bool {
            filter.starts_with("down/")
        }
    }

    struct Client {
        io: DuplexStream,
        buf: BytesMut,
    }

    impl Client {
        async fn send(&mut self, p: Packet) {
            let mut out = BytesMut::new();
            p.write(&mut out, usize::MAX).unwrap();
            self.io.write_all(&out).await.unwrap();
        }

        async fn recv(&mut self) -> Packet {
            tokio::time::timeout(Duration::from_secs(5), self.try_recv()).await.expect("a packet in time").unwrap()
        }

        /// The next packet, or `None` if none comes within 200 ms.
        async fn quiet(&mut self) -> Option<Packet> {
            tokio::time::timeout(Duration::from_millis(200), self.try_recv()).await.ok().flatten()
        }

        async fn try_recv(&mut self) -> Option<Packet> {
            loop {
                if let Ok(p) = Packet::read(&mut self.buf, 1 << 20) {
                    return Some(p);
                }
                if self.io.read_buf(&mut self.buf).await.ok()? == 0 {
                    return None;
                }
            }
        }
    }

    fn publish(topic: &str, qos: QoS, pkid: u16, len: usize) -> Packet {
        let mut p = Publish::new(topic, qos, vec![7u8; len]);
        p.pkid = pkid;
        Packet::Publish(p)
    }

    /// Starts a session on `board` with `keep_alive`; returns the client side, the
    /// session's end and its stop switch.
    async fn session(
        board: &Arc<Switchboard>,
        keep_alive: u16,
    ) -> (Client, tokio::task::JoinHandle<Ended>, tokio::sync::watch::Sender<bool>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let board = board.clone();
        let task = tokio::spawn(async move {
            let login = Login { client_id: "unit-1", grants: &UpDown, keep_alive, max_packet: 64 * 1024 };
            serve(&board, server, login, BytesMut::new(), &mut stop).await
        });
        let mut c = Client { io: client, buf: BytesMut::new() };
        assert!(matches!(c.recv().await, Packet::ConnAck(_)));
        (c, task, stop_tx)
    }

    #[tokio::test]
    async fn a_publish_is_handed_over_then_acknowledged_and_pings_are_answered() {
        let (board, mut rx) = Switchboard::new(1 << 20);
        let (mut c, task, _stop) = session(&board, 60).await;
        c.send(publish("up/1", QoS::AtLeastOnce, 7, 100)).await;
        assert_eq!(c.recv().await, Packet::PubAck(PubAck::new(7)));
        let got = rx.recv().await.unwrap();
        assert_eq!((&*got.client_id, got.topic.as_str(), got.payload.len()), ("unit-1", "up/1", 100));
        c.send(publish("up/1", QoS::AtMostOnce, 0, 10)).await;
        c.send(Packet::PingReq).await;
        assert_eq!(c.recv().await, Packet::PingResp);
        assert_eq!(rx.recv().await.unwrap().payload.len(), 10);
        c.send(Packet::Disconnect).await;
        assert_eq!(task.await.unwrap(), Ended::Closed);
    }

    #[tokio::test]
    async fn a_qos2_message_is_handed_over_once_per_packet_id() {
        let (board, mut rx) = Switchboard::new(1 << 20);
        let (mut c, _task, _stop) = session(&board, 60).await;
        for _ in 0..2 {
            c.send(publish("up/1", QoS::ExactlyOnce, 3, 10)).await;
            assert_eq!(c.recv().await, Packet::PubRec(PubRec::new(3)));
        }
        c.send(Packet::PubRel(PubRel::new(3))).await;
        assert_eq!(c.recv().await, Packet::PubComp(PubComp::new(3)));
        assert!(rx.recv().await.is_some());
        assert!(rx.try_recv().is_err(), "handed over once");
    }

    #[tokio::test]
    async fn deliveries_reach_subscribed_sessions_only_and_end_with_the_session() {
        let (board, _rx) = Switchboard::new(1 << 20);
        let (mut c, task, stop) = session(&board, 60).await;
        c.send(Packet::Subscribe(Subscribe::new("down/1", QoS::AtLeastOnce))).await;
        let Packet::SubAck(ack) = c.recv().await else { panic!("suback") };
        assert_eq!(ack.return_codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        // QoS 2 is granted as QoS 1.
        c.send(Packet::Subscribe(Subscribe::new("down/+", QoS::ExactlyOnce))).await;
        let Packet::SubAck(ack) = c.recv().await else { panic!("suback") };
        assert_eq!(ack.return_codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        assert_eq!(
            board.publish("down/1", Bytes::from_static(b"a"), QoS::AtLeastOnce),
            2,
            "the exact and the wildcard filter"
        );
        assert_eq!(board.publish("down/2", Bytes::from_static(b"b"), QoS::AtLeastOnce), 1);
        assert_eq!(board.publish("elsewhere", Bytes::from_static(b"c"), QoS::AtLeastOnce), 0);
        let mut ids = HashSet::new();
        for _ in 0..3 {
            let Packet::Publish(p) = c.recv().await else { panic!("publish") };
            assert_eq!(p.qos, QoS::AtLeastOnce);
            assert!(ids.insert(p.pkid), "distinct packet ids");
        }
        // At QoS 0 when the owner says so, whatever the subscription.
        assert_eq!(board.publish("down/2", Bytes::from_static(b"q0"), QoS::AtMostOnce), 1);
        let Packet::Publish(p) = c.recv().await else { panic!("publish") };
        assert_eq!((p.qos, p.pkid), (QoS::AtMostOnce, 0));
        c.send(Packet::Unsubscribe(Unsubscribe::new("down/+"))).await;
        assert!(matches!(c.recv().await, Packet::UnsubAck(_)));
        assert_eq!(board.publish("down/2", Bytes::from_static(b"b"), QoS::AtLeastOnce), 0);
        assert_eq!(board.filters(), 1);
        stop.send(true).unwrap();
        assert_eq!(task.await.unwrap(), Ended::Stopped);
        assert_eq!(board.filters(), 0, "a session's filters go with it");
        assert_eq!(board.publish("down/1", Bytes::from_static(b"a"), QoS::AtLeastOnce), 0);
    }

    #[tokio::test]
    async fn unacknowledged_deliveries_are_capped_and_an_overflowing_queue_drops() {
        let (board, _rx) = Switchboard::new(1 << 20);
        let (mut c, _task, _stop) = session(&board, 60).await;
        c.send(Packet::Subscribe(Subscribe::new("down/1", QoS::AtLeastOnce))).await;
        assert!(matches!(c.recv().await, Packet::SubAck(_)));
        let offered = SESSION_INFLIGHT_OUT + SESSION_QUEUE + 10;
        let queued: usize =
            (0..offered).map(|_| board.publish("down/1", Bytes::from_static(b"x"), QoS::AtLeastOnce)).sum();
        assert!(queued < offered && board.dropped.load(Ordering::Relaxed) as usize == offered - queued);
        let mut first = None;
        for _ in 0..SESSION_INFLIGHT_OUT {
            let Packet::Publish(p) = c.recv().await else { panic!("publish") };
            first.get_or_insert(p.pkid);
        }
        assert!(c.quiet().await.is_none(), "no more than {SESSION_INFLIGHT_OUT} unacknowledged");
        c.send(Packet::PubAck(PubAck::new(first.unwrap()))).await;
        assert!(matches!(c.recv().await, Packet::Publish(_)), "one acknowledged, one more sent");
    }

    #[tokio::test]
    async fn a_session_over_the_byte_budget_or_its_own_cap_is_held_back_not_dropped() {
        // Budget: 4 KiB for everyone.
        let (board, mut rx) = Switchboard::new(4 * 1024);
        let (mut c, _task, _stop) = session(&board, 60).await;
        for pkid in 1..=6 {
            c.send(publish("up/1", QoS::AtLeastOnce, pkid, 1000)).await;
        }
        for pkid in 1..=4 {
            assert_eq!(c.recv().await, Packet::PubAck(PubAck::new(pkid)));
        }
        assert!(c.quiet().await.is_none(), "held back: nothing acknowledged past the budget");
        assert_eq!(board.backlog_bytes(), 4 * 1024);
        assert!(board.held_back.load(Ordering::Relaxed) >= 1);
        assert!(!board.wedged(fleetline_service::unix_ms(), Duration::from_secs(5)));
        assert!(board.wedged(fleetline_service::unix_ms() + 5_000, Duration::from_secs(5)), "waiting, nothing taken");
        // The owner takes two: the held messages go through.
        drop((rx.recv().await, rx.recv().await));
        for pkid in 5..=6 {
            assert_eq!(c.recv().await, Packet::PubAck(PubAck::new(pkid)));
        }
        let mut got = 2;
        while let Ok(m) = rx.try_recv() {
            drop(m);
            got += 1;
        }
        assert_eq!(got, 6, "nothing lost");
        assert!(!board.wedged(fleetline_service::unix_ms() + 60_000, Duration::from_secs(5)), "nothing waits");

        // One session alone may not have more than its own share waiting.
        let (board, mut rx) = Switchboard::new(16 << 20);
        let (mut c, _task, _stop) = session(&board, 60).await;
        let n = SESSION_INFLIGHT_IN as u16 + 2;
        for pkid in 1..=n {
            c.send(publish("up/1", QoS::AtLeastOnce, pkid, 10)).await;
        }
        for pkid in 1..=SESSION_INFLIGHT_IN as u16 {
            assert_eq!(c.recv().await, Packet::PubAck(PubAck::new(pkid)));
        }
        assert!(c.quiet().await.is_none());
        drop(rx.recv().await);
        assert_eq!(c.recv().await, Packet::PubAck(PubAck::new(SESSION_INFLIGHT_IN as u16 + 1)));
    }

    #[tokio::test]
    async fn packets_outside_the_grants_end_the_session_and_nothing_goes_on() {
        let cases: Vec<(Packet, &str)> = vec![
            (publish("down/1", QoS::AtLeastOnce, 1, 10), reason::PUBLISH_DENIED),
            (Packet::Subscribe(Subscribe::new("up/#", QoS::AtLeastOnce)), reason::SUBSCRIBE_DENIED),
            (
                {
                    let mut p = Publish::new("up/1", QoS::AtLeastOnce, vec![1]);
                    p.retain = true;
                    p.pkid = 1;
                    Packet::Publish(p)
                },
                reason::RETAIN_DENIED,
            ),
            (Packet::PingResp, reason::MALFORMED),
        ];
        for (packet, why) in cases {
            let (board, mut rx) = Switchboard::new(1 << 20);
            let (mut c, task, _stop) = session(&board, 60).await;
            c.send(packet).await;
            assert_eq!(task.await.unwrap(), Ended::Refused(why));
            assert!(rx.try_recv().is_err());
        }
        // More filters than a session may hold.
        let (board, _rx) = Switchboard::new(1 << 20);
        let (mut c, task, _stop) = session(&board, 60).await;
        for i in 0..=crate::grants::MAX_FILTERS_PER_SESSION {
            c.send(Packet::Subscribe(Subscribe::new(format!("down/{i}"), QoS::AtLeastOnce))).await;
        }
        assert_eq!(task.await.unwrap(), Ended::Refused(reason::TOO_MANY_FILTERS));
        assert_eq!(board.filters(), 0);
        // Garbage, and a packet over the size limit.
        for bytes in [vec![0xf0u8, 0x00], {
            let mut out = BytesMut::new();
            publish("up/1", QoS::AtLeastOnce, 1, 70 * 1024).write(&mut out, usize::MAX).unwrap();
            out.to_vec()
        }] {
            let (board, _rx) = Switchboard::new(1 << 20);
            let (mut c, task, _stop) = session(&board, 60).await;
            c.io.write_all(&bytes).await.unwrap();
            assert_eq!(task.await.unwrap(), Ended::Refused(reason::MALFORMED));
        }
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_one_and_a_half_keep_alives() {
        let (board, _rx) = Switchboard::new(1 << 20);
        let started = std::time::Instant::now();
        let (_c, task, _stop) = session(&board, 1).await;
        assert_eq!(task.await.unwrap(), Ended::KeepAlive);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(4), "{took:?}");
    }
}
