//! The connection into the cloud: bundles out, bundle acks in.
//!
//! rumqttc's event loop runs in its own task (reconnecting with exponential backoff
//! and jitter); this task owns the [`core::UplinkCore`] and the I/O around it:
//! resubscribing to the ack topic on every ConnAck, publishing what the core
//! decides, reading backlog from the queue, checking acks (sealed with this
//! gateway's key, counter above the last one from the same sender) and marking
//! released records acknowledged in the queue.

pub mod core;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetline_wire::DeviceKey;
use fleetline_wire::bundle::open_bundle_ack;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};

use crate::config::UplinkConfig;
use crate::queue::{QueueHandle, RecordId, StoredRecord};
use crate::stats::GatewayStats;

use self::core::{Limits, UplinkCore};

enum Net {
    Connected,
    Disconnected(String),
    Message(String, Vec<u8>),
}

fn tls(cfg: &crate::config::UplinkTls) -> anyhow::Result<TlsConfiguration> {
    let config = fleetline_service::tls::client_config(&cfg.ca, cfg.cert.as_deref(), cfg.key.as_deref())
        .context("uplink.tls")?;
    Ok(TlsConfiguration::Rustls(config))
}

/// Everything the uplink task needs.
pub struct Uplink {
    /// Settings.
    pub cfg: UplinkConfig,
    /// This gateway's id.
    pub gateway: String,
    /// This gateway's key.
    pub key: DeviceKey,
    /// The disk queue.
    pub queue: QueueHandle,
    /// Counters.
    pub stats: Arc<GatewayStats>,
    /// Lowest unacknowledged record at start.
    pub first_unacked: RecordId,
}

impl Uplink {
    /// Runs until `stop` turns true.
    pub async fn run(
        self,
        mut feed: mpsc::Receiver<StoredRecord>,
        mut dropped: mpsc::UnboundedReceiver<Vec<RecordId>>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let mut opts = MqttOptions::new(self.gateway.clone(), cfg.host.clone(), cfg.port);
        let password = self.key.mqtt_password(&self.gateway);
        opts.set_credentials(self.gateway.clone(), String::from_utf8_lossy(&password).into_owned());
        opts.set_keep_alive(cfg.keep_alive.max(Duration::from_secs(5)));
        opts.set_clean_session(true);
        let max_packet = cfg.bundle_max_bytes.0 as usize * 2 + 64 * 1024;
        opts.set_max_packet_size(64 * 1024, max_packet);
        opts.set_inflight(cfg.max_in_flight.min(u16::MAX as usize) as u16);
        opts.set_request_channel_capacity(cfg.max_in_flight * 2 + 16);
        if let Some(t) = &cfg.tls {
            opts.set_transport(Transport::Tls(tls(t)?));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, cfg.max_in_flight * 2 + 16);
        let (net_tx, mut net) = mpsc::channel(256);
        let (initial, max) = (cfg.backoff_initial, cfg.backoff_max);
        let net_task = tokio::spawn(async move {
            let mut backoff = fleetline_service::Backoff::new(initial, max);
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        Net::Connected
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => Net::Message(p.topic, p.payload.to_vec()),
                    Ok(_) => continue,
                    Err(e) => {
                        if net_tx.send(Net::Disconnected(e.to_string())).await.is_err() {
                            return;
                        }
                        backoff.wait().await;
                        continue;
                    }
                };
                if net_tx.send(ev).await.is_err() {
                    return;
                }
            }
        });

        let limits = Limits {
            max_batches: cfg.bundle_max_batches,
            max_bytes: cfg.bundle_max_bytes.0 as usize,
            max_age_ms: cfg.bundle_max_age.as_millis() as u64,
            max_in_flight: cfg.max_in_flight,
            resend_after_ms: cfg.resend_after.as_millis() as u64,
            backlog_rate: cfg.backlog_rate.0,
            live_first: cfg.live_first,
            live_bytes: 8 << 20,
        };
        // Bundle ids only grow across restarts: start from the clock in microseconds.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        let mut core = UplinkCore::new(limits, self.gateway.clone(), self.key.clone(), self.first_unacked, base);
        let start = Instant::now();
        let now_ms = || start.elapsed().as_millis() as u64;
        let ack_topic = fleetline_wire::topics::bundle_ack_topic(&self.gateway).as_str().to_string();
        let mut counters: HashMap<String, u64> = HashMap::new();
        let (backlog_tx, mut backlog_rx) = mpsc::channel(1);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = net.recv() => match ev {
                    Some(Net::Connected) => {
                        tracing::info!(host = %cfg.host, port = cfg.port, "uplink connected");
                        if let Err(e) = client.try_subscribe(&ack_topic, QoS::AtLeastOnce) {
                            tracing::warn!(error = %e, "could not queue the ack subscription");
                        }
                        core.on_connected(now_ms());
                        if let Ok(mut u) = self.stats.uplink.lock() {
                            u.connected = true;
                            u.connects += 1;
                        }
                    }
                    Some(Net::Disconnected(e)) => {
                        core.on_disconnected();
                        if let Ok(mut u) = self.stats.uplink.lock() {
                            if u.connected {
                                tracing::warn!(error = %e, "uplink disconnected");
                            }
                            u.connected = false;
                            u.last_error = Some(e);
                        }
                    }
                    Some(Net::Message(topic, payload)) if topic == ack_topic => {
                        self.on_ack(&mut core, &mut counters, &payload).await;
                    }
                    Some(Net::Message(topic, _)) => tracing::debug!(topic, "unexpected message on the uplink"),
                    None => break,
                },
                rec = feed.recv() => match rec {
                    Some(rec) => {
                        core.on_live(rec);
                        while let Ok(rec) = feed.try_recv() {
                            core.on_live(rec);
                        }
                    }
                    None => break,
                },
                Some(ids) = dropped.recv() => core.on_dropped(&ids),
                Some(result) = backlog_rx.recv() => match result {
                    Ok((records, next)) => core.on_backlog(now_ms(), records, next),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the backlog failed");
                        core.on_backlog_failed();
                    }
                },
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if let Some((from, n, bytes)) = core.backlog_request(now_ms()) {
                let queue = self.queue.clone();
                let tx = backlog_tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(queue.read_unacked(from, n, bytes).await).await;
                });
            }
            while let Some(p) = core.poll_publish(now_ms()) {
                let topic = fleetline_wire::topics::ingest_topic(p.shard).as_str().to_string();
                if client.try_publish(topic, QoS::AtLeastOnce, false, p.payload).is_err() {
                    // rumqttc's queue is full; the bundle stays in flight and is re-sent.
                    break;
                }
                metrics::counter!("fleetline_gateway_bundles_published_total").increment(1);
                if let Ok(mut u) = self.stats.uplink.lock() {
                    if p.resend {
                        u.bundles_resent += 1;
                    } else {
                        u.bundles_sent += 1;
                    }
                }
            }
            if let Ok(mut u) = self.stats.uplink.lock() {
                u.in_flight = core.in_flight() as u64;
            }
        }
        let _ = client.try_disconnect();
        net_task.abort();
        Ok(())
    }

    async fn on_ack(&self, core: &mut UplinkCore, counters: &mut HashMap<String, u64>, payload: &[u8]) {
        let (sender, counter, ids) = match open_bundle_ack(payload, &self.key) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "bundle ack rejected");
                metrics::counter!("fleetline_gateway_uplink_acks_rejected_total", "reason" => "invalid").increment(1);
                if let Ok(mut u) = self.stats.uplink.lock() {
                    u.acks_invalid += 1;
                }
                return;
            }
        };
        let last = counters.entry(sender).or_insert(0);
        if counter <= *last {
            metrics::counter!("fleetline_gateway_uplink_acks_rejected_total", "reason" => "replayed").increment(1);
            if let Ok(mut u) = self.stats.uplink.lock() {
                u.acks_replayed += 1;
            }
            return;
        }
        *last = counter;
        let released = core.on_ack(&ids);
        let n = released.records.len() as u64;
        if !released.records.is_empty() && self.queue.ack(released.records).await.is_err() {
            tracing::error!("disk queue stopped; acks not recorded");
        }
        if released.dropped_but_delivered > 0 {
            GatewayStats::add(&self.stats.dropped_then_delivered, released.dropped_but_delivered);
        }
        metrics::counter!("fleetline_gateway_batches_forwarded_total").increment(n);
        if let Ok(mut u) = self.stats.uplink.lock() {
            u.bundles_acked += released.bundles;
            u.batches_acked += n;
        }
    }
}
