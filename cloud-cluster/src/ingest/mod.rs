//! The node's MQTT session with the ingest broker: takes bundles from the owned
//! shards' topics and hands each to its shard's task; publishes the sealed bundle
//! acks the shards release after their commits.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fleetline_wire::GatewayId;
use fleetline_wire::bundle::seal_bundle_ack;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;

use fleetline_wire::topics;

use crate::keys::Keys;

use crate::shard::{Released, ShardDirectory, ShardHandle};
use crate::telemetry::{CloudStats, events as ev};

/// Why a broker URL is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("broker.url {url:?} {why}")]
pub struct BadBrokerUrl {
    /// The URL.
    pub url: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// `(tls, host, port)` of `mqtt://host:port` or `mqtts://host:port`.
pub fn parse_broker_url(url: &str) -> Result<(bool, String, u16), BadBrokerUrl> {
    let bad = |why| BadBrokerUrl { url: url.to_string(), why };
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(bad("must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| bad("has a bad port"))?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(bad("names no host"));
    }
    Ok((tls, host.trim_matches(['[', ']']).to_string(), port))
}

/// How to reach the broker.
#[derive(Clone)]
pub struct Session {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Client id (and, with a password, username).
    pub client_id: String,
    /// Credentials.
    pub login: Option<(String, String)>,
    /// TLS.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Largest packet taken.
    pub max_packet: usize,
    /// Keep-alive.
    pub keep_alive: Duration,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A change of the shards the session takes bundles for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Take the shard's topic (the shard is in the directory).
    Subscribe(u16),
    /// Stop taking it.
    Unsubscribe(u16),
}

/// Runs the session until it is told to end ([`Released::EndOfStream`]): (re)connects with backoff,
/// subscribes on every ConnAck to the topics of the shards `shards` holds then,
/// follows `routes` as shards come and go, and routes bundles to their shard's
/// task (a bundle for a shard not held here is counted and left unacked: the
/// gateway sends it again, to the new owner).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    session: Session,
    shards: ShardDirectory,
    acks: mpsc::UnboundedReceiver<Released>,
    mut routes: mpsc::UnboundedReceiver<Route>,
    keys: Arc<Keys>,
    sender: String,
    stats: Arc<CloudStats>,
    counter: AckCounter,
) {
    let mut opts = MqttOptions::new(session.client_id.clone(), session.host.clone(), session.port);
    if let Some((u, p)) = &session.login {
        opts.set_credentials(u.clone(), p.clone());
    }
    opts.set_keep_alive(session.keep_alive.max(Duration::from_secs(5)));
    opts.set_clean_session(true);
    opts.set_max_packet_size(session.max_packet, 256 * 1024);
    opts.set_inflight(256);
    if let Some(tls) = &session.tls {
        opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.clone())));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let publisher = tokio::spawn(publish_acks(client.clone(), acks, keys, sender, stats.clone(), counter));
    // Ends the publisher with the session, however the session ends.
    let _publisher = AbortOnDrop(publisher);
    // Requests queue in the client while disconnected; every ConnAck subscribes
    // to what is owned then anyway.
    let router = client.clone();
    let _router = AbortOnDrop(tokio::spawn(async move {
        while let Some(route) = routes.recv().await {
            let r = match route {
                Route::Subscribe(s) => router.subscribe(topics::ingest_topic(s).as_str(), QoS::AtLeastOnce).await,
                Route::Unsubscribe(s) => router.unsubscribe(topics::ingest_topic(s).as_str()).await,
            };
            if r.is_err() {
                return;
            }
        }
    }));
    let mut backoff = fleetline_service::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                let owned: Vec<u16> = shards.owned().iter().map(ShardHandle::shard).collect();
                stats.emit(ev::BrokerConnected { host: &session.host, port: session.port, shards: owned.len() });
                let filters = owned.iter().map(|s| {
                    rumqttc::SubscribeFilter::new(topics::ingest_topic(*s).as_str().to_string(), QoS::AtLeastOnce)
                });
                for chunk in filters.collect::<Vec<_>>().chunks(32) {
                    if let Err(e) = client.subscribe_many(chunk.to_vec()).await {
                        tracing::warn!(error = %e, "subscribing failed");
                    }
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                // Asked to stop: every ack queued before is on its way to the broker.
                stats.emit(ev::BrokerLeft);
                return;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                match topics::parse_ingest_topic(&p.topic).and_then(|s| shards.get(s).ok()) {
                    Some(shard) => {
                        // Waiting here is the back-pressure: the broker holds the rest.
                        let _ = shard.bundle(Bytes::from(p.payload.to_vec())).await;
                    }
                    None => stats.emit(ev::Misrouted { topic: &p.topic }),
                }
            }
            Ok(_) => {}
            Err(e) => {
                stats.emit(ev::BrokerLost { error: &e });
                backoff.wait().await;
            }
        }
    }
}

/// Counters of this node's bundle acks, with their high-water mark in the object
/// store (`_fleetline/ack-counters/{node}`), so a node restarted with its clock
/// stepped back continues above what gateways saw before
/// (`fleetline_wire::control::CounterCore`).
pub struct AckCounter {
    core: fleetline_wire::control::CounterCore,
    store: crate::lake::store::Store,
    path: String,
}

impl AckCounter {
    /// Where a node's mark lives.
    pub fn path(node: &str) -> String {
        format!("_fleetline/ack-counters/{node}")
    }

    /// Loads the node's mark; a damaged one is an error naming it.
    pub async fn open(store: crate::lake::store::Store, node: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let path = Self::path(node);
        let mark = match store.get(&path).await.with_context(|| format!("reading {path}"))? {
            None => 0,
            Some(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .with_context(|| format!("ack counter {path} does not hold a number"))?,
        };
        Ok(Self { core: fleetline_wire::control::CounterCore::resume(mark), store, path })
    }

    /// The next counter; a raised mark is stored before the counter is returned.
    pub async fn next(&mut self) -> Result<u64, object_store::Error> {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let before = self.core;
        let (value, mark) = self.core.next(now);
        if let Some(mark) = mark
            && let Err(e) = self.store.put(&self.path, Bytes::from(format!("{mark}\n"))).await
        {
            self.core = before;
            return Err(e);
        }
        Ok(value)
    }
}

/// Most bundle ids in one ack message.
const IDS_PER_ACK: usize = 256;

async fn publish_acks(
    client: AsyncClient,
    mut acks: mpsc::UnboundedReceiver<Released>,
    keys: Arc<Keys>,
    sender: String,
    stats: Arc<CloudStats>,
    mut counter: AckCounter,
) {
    while let Some(out) = acks.recv().await {
        let (gateway, ids) = match out {
            Released::Acks { gateway, ids } => (gateway, ids),
            Released::EndOfStream { done } => {
                // Queued behind every publish above: the event loop sends them first.
                let _ = client.disconnect().await;
                let _ = done.send(());
                continue;
            }
            Released::Alert(e) => {
                // JSON with the event's id: a repeat after a restart is recognizable.
                let body = serde_json::to_vec(&e).unwrap_or_default();
                match client
                    .publish(topics::alert_topic(&e.fleet, &e.device).as_str(), QoS::AtLeastOnce, false, body)
                    .await
                {
                    Ok(()) => stats.emit(ev::AlertSent),
                    Err(_) => {
                        stats.emit(ev::AlertFailed);
                        return;
                    }
                }
                continue;
            }
        };
        let p = keys.snapshot();
        let Some(gw) = GatewayId::new(&gateway).ok().and_then(|g| p.gateway(&g).cloned()) else {
            tracing::warn!(gateway, "cannot ack: gateway no longer provisioned");
            continue;
        };
        for chunk in ids.chunks(IDS_PER_ACK) {
            let c = match counter.next().await {
                Ok(c) => c,
                Err(e) => {
                    // The gateway re-sends the bundle; it is acked again once the mark is stored.
                    tracing::error!(gateway, error = %e, "cannot store the ack counter's mark; acks withheld");
                    continue;
                }
            };
            let sealed = match seal_bundle_ack(&gw.key, &sender, c, chunk) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(gateway, error = %e, "cannot seal a bundle ack");
                    continue;
                }
            };
            if client
                .publish(topics::bundle_ack_topic(&gateway).as_str(), QoS::AtLeastOnce, false, sealed)
                .await
                .is_err()
            {
                return;
            }
            stats.emit(ev::AcksSent(chunk.len() as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        assert_eq!(parse_broker_url("mqtt://h:1").unwrap(), (false, "h".into(), 1));
        assert_eq!(parse_broker_url("mqtts://h").unwrap(), (true, "h".into(), 8883));
        assert_eq!(parse_broker_url("mqtt://[::1]:9").unwrap(), (false, "::1".into(), 9));
        assert!(parse_broker_url("tcp://h:1").is_err());
        assert!(parse_broker_url("mqtt://:1").is_err());
        assert!(parse_broker_url("mqtt://h:x").is_err());
    }
}
