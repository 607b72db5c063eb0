//! A stand-in for the cloud's ingest: takes bundles from a broker, opens them and
//! every device batch inside with the provisioned keys, remembers what arrived, and
//! acks each bundle to its gateway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetline_wire::bundle::{open_bundle, peek_bundle, seal_bundle_ack};
use fleetline_wire::provisioning::Provisioning;
use fleetline_wire::{DeviceId, FleetId, GatewayId, open_batch, peek_header};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;

/// (fleet, device, epoch, seq) of a batch.
pub type BatchKey = (String, String, u32, u32);

/// One distinct batch as the cloud saw it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Samples of known kinds in it.
    pub samples: usize,
    /// Times it arrived (more than one means a duplicate to dedupe).
    pub copies: u32,
    /// Gateway that sent the first copy.
    pub gateway: String,
    /// When the first copy arrived.
    pub first_at: Instant,
}

/// Everything that arrived.
#[derive(Clone, Debug, Default)]
pub struct CloudState {
    /// Distinct batches.
    pub batches: HashMap<BatchKey, Received>,
    /// Bundles opened.
    pub bundles: u64,
    /// Bundles that did not open (unknown gateway, bad seal).
    pub bad_bundles: u64,
    /// Batches inside bundles that did not open.
    pub bad_batches: u64,
    /// Acks sent.
    pub acks: u64,
}

impl CloudState {
    /// Distinct batches of one device.
    pub fn device_batches(&self, device: &str) -> usize {
        self.batches.keys().filter(|k| k.1 == device).count()
    }

    /// Distinct samples over all batches.
    pub fn samples(&self) -> usize {
        self.batches.values().map(|r| r.samples).sum()
    }

    /// Batch arrivals beyond the first copy.
    pub fn duplicates(&self) -> u64 {
        self.batches.values().map(|r| u64::from(r.copies - 1)).sum()
    }
}

/// The running stand-in; stops on drop.
pub struct FakeCloud {
    state: Arc<Mutex<CloudState>>,
    acking: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl FakeCloud {
    /// Connects to the broker on `port` and starts consuming `fleetline/v1/ingest/+`.
    pub async fn start(port: u16, provisioning: Provisioning) -> Self {
        let state = Arc::new(Mutex::new(CloudState::default()));
        let acking = Arc::new(AtomicBool::new(true));
        let mut opts = MqttOptions::new(format!("fake-cloud-{}", std::process::id()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_max_packet_size(16 << 20, 64 << 10);
        opts.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let (st, ack_on) = (state.clone(), acking.clone());
        let task = tokio::spawn(async move {
            let mut counter = 0u64;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(fleetline_wire::topics::INGEST_FILTER, QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some((gateway, id, key)) = consume(&st, &provisioning, &p.payload)
                            && ack_on.load(Ordering::Relaxed)
                        {
                            counter += 1;
                            if let Ok(ack) = seal_bundle_ack(&key, "fake-cloud", counter, &[id]) {
                                let topic = fleetline_wire::topics::bundle_ack_topic(&gateway).as_str().to_string();
                                if client.try_publish(topic, QoS::AtLeastOnce, false, ack).is_ok()
                                    && let Ok(mut s) = st.lock()
                                {
                                    s.acks += 1;
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let cloud = Self { state, acking, task };
        // Wait for the subscription to be in place.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cloud
    }

    /// What arrived so far.
    pub fn snapshot(&self) -> CloudState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Turns acking on or off (off: a cloud that receives but never says durable).
    pub fn set_acking(&self, on: bool) {
        self.acking.store(on, Ordering::Relaxed);
    }

    /// Waits up to `timeout` for `pred`; returns the last snapshot.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&CloudState) -> bool) -> CloudState {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if pred(&s) || Instant::now() >= deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for FakeCloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn consume(
    state: &Mutex<CloudState>,
    p: &Provisioning,
    payload: &[u8],
) -> Option<(String, fleetline_wire::bundle::BundleId, fleetline_wire::DeviceKey)> {
    let bad = |state: &Mutex<CloudState>| {
        if let Ok(mut s) = state.lock() {
            s.bad_bundles += 1;
        }
    };
    let Ok(header) = peek_bundle(payload) else {
        bad(state);
        return None;
    };
    let Some(gw) = GatewayId::new(&header.gateway).ok().and_then(|g| p.gateway(&g)) else {
        bad(state);
        return None;
    };
    let Ok((header, entries)) = open_bundle(payload, &gw.key) else {
        bad(state);
        return None;
    };
    let now = Instant::now();
    let mut s = state.lock().ok()?;
    s.bundles += 1;
    for e in entries {
        let opened = peek_header(&e.batch).ok().and_then(|h| {
            let fleet = FleetId::new(h.fleet).ok()?;
            let device = DeviceId::new(h.device).ok()?;
            let entry = p.device(&fleet, &device)?;
            let mut buf = e.batch.clone();
            let decoded = open_batch(&mut buf, &entry.key).ok()?.decode().ok()?;
            Some(decoded)
        });
        let Some(d) = opened else {
            s.bad_batches += 1;
            continue;
        };
        let key = (d.fleet.clone(), d.device.clone(), d.epoch, d.seq);
        s.batches.entry(key).and_modify(|r| r.copies += 1).or_insert(Received {
            samples: d.samples.len(),
            copies: 1,
            gateway: header.gateway.clone(),
            first_at: now,
        });
    }
    Some((header.gateway, header.id, gw.key.clone()))
}
