//! MQTT client for Linux-class units: the sans-IO core driven over rumqttc.
//!
//! Two tasks per unit. One drives rumqttc's event loop and reconnects with
//! exponential backoff and jitter; it never blocks on anything else, so a slow
//! consumer can never stall keep-alives or a reconnect. The other owns the
//! [`Device`] core: it takes readings, publishes due batches with QoS 1 while
//! connected, resubscribes to its ack and command topics on every ConnAck (rumqttc
//! starts each clean session without subscriptions), and re-sends everything held
//! after a reconnect. Batches stay in the core's outbox until an ack names them,
//! whatever happens to the connection.

mod clock;
mod config;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Backoff, ClientConfig, TlsOptions};

use crate::device::{ConfigError, Device, Reading, RecordError, Stats};
use fleetline_wire::control::{Command, MAX_ACK_LEN};
use fleetline_wire::topics::{self, Channel};

/// Why the client could not start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The core rejected the configuration.
    #[error("device configuration: {0}")]
    Config(#[from] ConfigError),
    /// TLS material could not be used.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The reading was not taken.
    #[error("reading not recorded: {0}")]
    Record(#[from] RecordError),
    /// The client has shut down.
    #[error("client has shut down")]
    Closed,
}

/// A snapshot of the client's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// The core's counters.
    pub core: Stats,
    /// Whether an MQTT session is up.
    pub connected: bool,
    /// Sessions established.
    pub connects: u64,
    /// Connection failures and drops.
    pub connection_errors: u64,
    /// Publishes that could not be queued to rumqttc (re-sent later by the core).
    pub publish_queue_full: u64,
    /// Readings in the open batch.
    pub open_samples: u64,
    /// Sealed batches awaiting an ack.
    pub outbox_batches: u64,
    /// Samples in them.
    pub outbox_samples: u64,
    /// Commands received and applied.
    pub commands: u64,
}

impl ClientStats {
    /// Nothing open, nothing awaiting an ack.
    pub fn is_idle(&self) -> bool {
        self.open_samples == 0 && self.outbox_batches == 0
    }
}

enum Request {
    Record(Vec<Reading>, oneshot::Sender<RecordSummary>),
    Flush(oneshot::Sender<()>),
}

/// Outcome of [`DeviceClient::record_all`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordSummary {
    /// Readings taken.
    pub accepted: u32,
    /// Readings refused by back-pressure (the outbox is full).
    pub refused: u32,
    /// Readings refused as invalid.
    pub invalid: u32,
    /// The first error seen, if any.
    pub first_error: Option<RecordError>,
}

/// Handle to a running unit client. Dropping it stops the client.
pub struct DeviceClient {
    requests: mpsc::Sender<Request>,
    stats: watch::Receiver<ClientStats>,
    commands: Arc<Mutex<Vec<Command>>>,
    acked: Arc<Mutex<Vec<crate::Released>>>,
    core_task: JoinHandle<()>,
    net_task: JoinHandle<()>,
    mqtt: AsyncClient,
}

/// Default capacities for Linux-class units: 512 readings per batch, 32 batches of
/// up to 4 KiB held for acks (≈ 140 KiB per unit).
pub type LinuxDevice = Device<512, 4096, 32>;

impl DeviceClient {
    /// Starts a client with [`LinuxDevice`] capacities on the current tokio runtime.
    pub fn spawn<C: Clock>(cfg: ClientConfig, clock: C) -> Result<Self, ClientError> {
        Self::spawn_with::<512, 4096, 32, C>(cfg, clock)
    }

    /// Starts a client with the given core capacities.
    pub fn spawn_with<const S: usize, const B: usize, const O: usize, C: Clock>(
        cfg: ClientConfig,
        clock: C,
    ) -> Result<Self, ClientError> {
        let device: Box<Device<S, B, O>> = Box::new(Device::new(cfg.device.clone(), cfg.boot)?);
        let username = device.mqtt_username();
        let password = device.mqtt_password();
        let mut opts = MqttOptions::new(username.as_str(), cfg.host.clone(), cfg.port);
        opts.set_credentials(username.as_str(), String::from_utf8_lossy(&password).into_owned());
        opts.set_keep_alive(cfg.keep_alive.max(Duration::from_secs(5)));
        opts.set_clean_session(true);
        // Outgoing packets up to a full batch plus topic and header; incoming up to the largest ack.
        opts.set_max_packet_size(MAX_ACK_LEN + 256, B + 256);
        opts.set_request_channel_capacity(O + 16);
        opts.set_inflight(O.clamp(1, u16::MAX as usize) as u16);
        if let Some(tls) = &cfg.tls {
            opts.set_transport(Transport::Tls(tls_config(tls)?));
        }
        let (mqtt, mut eventloop) = AsyncClient::new(opts, O + 16);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_connection_timeout(cfg.connect_timeout.as_secs().max(1));
        eventloop.set_network_options(net);
        let (net_tx, net_rx) = mpsc::channel(64);
        let net_task = tokio::spawn(drive_network(eventloop, net_tx, cfg.backoff));
        let (req_tx, req_rx) = mpsc::channel(64);
        let (stats_tx, stats_rx) = watch::channel(ClientStats::default());
        let commands = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let core = Core {
            acked: acked.clone(),
            device,
            mqtt: mqtt.clone(),
            clock,
            stats: ClientStats::default(),
            stats_tx,
            connected: false,
            commands: commands.clone(),
        };
        let core_task = tokio::spawn(core.run(req_rx, net_rx, cfg.tick));
        Ok(Self { requests: req_tx, stats: stats_rx, commands, acked, core_task, net_task, mqtt })
    }

    /// Records one reading.
    pub async fn record(&self, reading: Reading) -> Result<(), ClientError> {
        let summary = self.record_all(vec![reading]).await?;
        match summary.first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Records readings in order; each is taken or refused on its own.
    pub async fn record_all(&self, readings: Vec<Reading>) -> Result<RecordSummary, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(Request::Record(readings, tx)).await.map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Seals the open batch now.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(Request::Flush(tx)).await.map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// The latest snapshot of the client's state.
    pub fn stats(&self) -> ClientStats {
        *self.stats.borrow()
    }

    /// Commands applied so far, oldest first, drained.
    pub fn take_commands(&self) -> Vec<Command> {
        self.commands.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default()
    }

    /// Batches released by acks so far, in the order their acks arrived, drained.
    pub fn take_acked(&self) -> Vec<crate::Released> {
        self.acked.lock().map(|mut a| std::mem::take(&mut *a)).unwrap_or_default()
    }

    /// Waits until `pred` holds for a snapshot, or `timeout` passes; returns the last snapshot.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&ClientStats) -> bool) -> ClientStats {
        let mut rx = self.stats.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| pred(s))).await;
        *rx.borrow()
    }

    /// Flushes and waits (bounded) until every reading is acknowledged, then stops.
    /// Returns the final snapshot; check [`ClientStats::is_idle`] for success.
    pub async fn shutdown(self, drain: Duration) -> ClientStats {
        let _ = self.flush().await;
        let last = self.wait_for(drain, ClientStats::is_idle).await;
        let _ = self.mqtt.try_disconnect();
        self.core_task.abort();
        self.net_task.abort();
        last
    }
}

impl Drop for DeviceClient {
    fn drop(&mut self) {
        self.core_task.abort();
        self.net_task.abort();
    }
}

fn tls_config(tls: &TlsOptions) -> Result<TlsConfiguration, ClientError> {
    let err = |e: &dyn std::fmt::Display| ClientError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut tls.ca_pem.as_slice()) {
        roots.add(cert.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls("no CA certificate in ca_pem".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_root_certificates(roots);
    let config = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain =
                rustls_pemfile::certs(&mut chain.as_slice()).collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))?;
            let key = rustls_pemfile::private_key(&mut key.as_slice())
                .map_err(|e| err(&e))?
                .ok_or_else(|| ClientError::Tls("no private key in client key PEM".into()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| err(&e))?
        }
    };
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

enum NetEvent {
    Connected,
    Message(String, Vec<u8>),
    Disconnected(String),
}

/// Polls rumqttc forever; after a failure waits out the backoff before polling
/// again (which reconnects).
async fn drive_network(mut eventloop: EventLoop, tx: mpsc::Sender<NetEvent>, backoff: Backoff) {
    let mut delay = backoff.initial;
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = backoff.initial;
                NetEvent::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => NetEvent::Message(p.topic, p.payload.to_vec()),
            Ok(_) => continue,
            Err(e) => {
                let requests_done = matches!(e, ConnectionError::RequestsDone);
                if tx.send(NetEvent::Disconnected(e.to_string())).await.is_err() || requests_done {
                    return;
                }
                let jitter = rand::thread_rng().gen_range(0.5..1.5);
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay = (delay * 2).min(backoff.max);
                continue;
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

struct Core<const S: usize, const B: usize, const O: usize, C> {
    device: Box<Device<S, B, O>>,
    mqtt: AsyncClient,
    clock: C,
    stats: ClientStats,
    stats_tx: watch::Sender<ClientStats>,
    connected: bool,
    commands: Arc<Mutex<Vec<Command>>>,
    acked: Arc<Mutex<Vec<crate::Released>>>,
}

impl<const S: usize, const B: usize, const O: usize, C: Clock> Core<S, B, O, C> {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>, mut net: mpsc::Receiver<NetEvent>, tick: Duration) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = net.recv() => match ev {
                    Some(ev) => self.on_net(ev),
                    None => return,
                },
                req = requests.recv() => match req {
                    Some(req) => self.on_request(req),
                    None => return,
                },
                _ = ticker.tick() => {}
            }
            self.pump();
            self.publish_stats();
        }
    }

    fn on_net(&mut self, ev: NetEvent) {
        let now = self.clock.now_ms();
        match ev {
            NetEvent::Connected => {
                info!(device = self.device.mqtt_username().as_str(), "connected");
                self.connected = true;
                self.stats.connects += 1;
                for topic in [self.device.ack_topic(), self.device.command_topic()] {
                    if let Err(e) = self.mqtt.try_subscribe(topic.as_str(), QoS::AtLeastOnce) {
                        warn!(error = %e, "subscribe could not be queued");
                    }
                }
                self.device.on_connected(now);
            }
            NetEvent::Disconnected(e) => {
                if self.connected {
                    warn!(device = self.device.mqtt_username().as_str(), error = %e, "disconnected");
                } else {
                    debug!(error = %e, "connect failed");
                }
                self.connected = false;
                self.stats.connection_errors += 1;
            }
            NetEvent::Message(topic, mut payload) => {
                if payload.len() > MAX_ACK_LEN {
                    debug!(topic, len = payload.len(), "oversized control message ignored");
                    return;
                }
                match topics::parse_device_topic(&topic).map(|t| t.2) {
                    Some(Channel::Ack) => match self.device.handle_ack_with(&mut payload, |r| {
                        if let Ok(mut a) = self.acked.lock() {
                            a.push(r);
                        }
                    }) {
                        Ok(out) => debug!(batches = out.batches, samples = out.samples, "ack"),
                        Err(e) => debug!(error = %e, "ack ignored"),
                    },
                    Some(Channel::Cmd) => match self.device.handle_command(now, &mut payload) {
                        Ok(cmd) => {
                            info!(?cmd, "command applied");
                            self.stats.commands += 1;
                            if let Ok(mut c) = self.commands.lock() {
                                c.push(cmd);
                            }
                        }
                        Err(e) => warn!(error = %e, "command ignored"),
                    },
                    _ => debug!(topic, "message on an unexpected topic ignored"),
                }
            }
        }
    }

    fn on_request(&mut self, req: Request) {
        let now = self.clock.now_ms();
        match req {
            Request::Record(readings, reply) => {
                let mut summary = RecordSummary::default();
                for r in readings {
                    match self.device.record(now, r) {
                        Ok(()) => summary.accepted += 1,
                        Err(e) => {
                            match e {
                                RecordError::Backpressure | RecordError::SeqExhausted | RecordError::Seal(_) => {
                                    summary.refused += 1
                                }
                                _ => summary.invalid += 1,
                            }
                            summary.first_error.get_or_insert(e);
                        }
                    }
                }
                let _ = reply.send(summary);
            }
            Request::Flush(reply) => {
                let _ = self.device.flush(now);
                let _ = reply.send(());
            }
        }
    }

    /// Seals aged batches and, while connected, hands everything due to rumqttc.
    fn pump(&mut self) {
        let now = self.clock.now_ms();
        if !self.connected {
            self.device.poll_seal(now);
            return;
        }
        while let Some(tx) = self.device.poll_transmit(now) {
            if self.mqtt.try_publish(tx.topic, QoS::AtLeastOnce, false, tx.payload.to_vec()).is_err() {
                // rumqttc's queue is full; the core re-sends after `resend_after_ms`.
                self.stats.publish_queue_full += 1;
                break;
            }
        }
    }

    fn publish_stats(&mut self) {
        self.stats.core = *self.device.stats();
        self.stats.connected = self.connected;
        self.stats.open_samples = self.device.open_samples() as u64;
        self.stats.outbox_batches = self.device.outbox_len() as u64;
        self.stats.outbox_samples = u64::from(self.device.outbox_samples());
        let snapshot = self.stats;
        self.stats_tx.send_if_modified(|s| {
            let changed = *s != snapshot;
            *s = snapshot;
            changed
        });
    }
}
