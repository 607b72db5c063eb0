//! The std client against a real Mosquitto broker, with `mosquitto_sub` and
//! `mosquitto_pub` playing the gateway.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use fleetline_device::client::{ClientConfig, ClientError, DeviceClient, SystemClock, TlsOptions};
use fleetline_device::wire::control::{self, AckRange, Command, random_nonce};
use fleetline_device::wire::signals::kind;
use fleetline_device::wire::{DeviceId, DeviceKey, FleetId, open_batch, peek_header};
use fleetline_device::{BootState, Config, FlushPolicy, OutboxFull, Reading};
use fleetline_testkit::{Mosquitto, Pki, Sub};

/// Publishes with `mosquitto_pub`, as a gateway would.
async fn publish(port: u16, topic: &str, payload: &[u8]) {
    assert!(fleetline_testkit::publish(port, topic, payload, &[]).await, "mosquitto_pub failed");
}

const KEY: [u8; 32] = [0x11; 32];

fn config(port: u16) -> ClientConfig {
    let device = Config {
        fleet: FleetId::new("acme").unwrap(),
        device: DeviceId::new("van-3").unwrap(),
        key: DeviceKey::from_bytes(KEY),
        flush: FlushPolicy { max_samples: 100, max_bytes: 2048, max_age_ms: 200 },
        resend_after_ms: 500,
        when_full: OutboxFull::Block,
    };
    let mut cfg = ClientConfig::new("127.0.0.1", port, device, BootState { epoch: 9, last_command_counter: 0 });
    cfg.backoff.initial = Duration::from_millis(50);
    cfg.backoff.max = Duration::from_millis(400);
    cfg
}

fn ack(counter: u64, ranges: &[AckRange], key: [u8; 32]) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let n =
        control::seal_ack(&mut buf, &DeviceKey::from_bytes(key), "gw-test", counter, random_nonce().unwrap(), ranges)
            .unwrap();
    buf.truncate(n);
    buf
}

const T0: u64 = 1_790_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_sealed_batches_that_mosquitto_sub_reads_back_and_honours_acks() {
    let broker = Mosquitto::start().await;
    let mut sub = Sub::start(broker.port, "fleetline/v1/+/+/up").await;
    let client = DeviceClient::spawn(config(broker.port), SystemClock::new()).unwrap();
    let readings: Vec<Reading> =
        (0..5).map(|i| Reading { kind: kind::SPEED, time_ms: T0 + i * 1000, value: 40.0 + i as f64 }).collect();
    let summary = client.record_all(readings.clone()).await.unwrap();
    assert_eq!(summary.accepted, 5);

    let (topic, mut payload) = sub.next().await;
    assert_eq!(topic, "fleetline/v1/acme/van-3/up");
    let header = peek_header(&payload).unwrap();
    assert_eq!((header.epoch, header.seq), (9, 0));
    let batch = open_batch(&mut payload, &DeviceKey::from_bytes(KEY)).unwrap().decode().unwrap();
    let got: Vec<_> = batch.samples.iter().map(|s| (s.ts_ms as u64, s.value)).collect();
    let want: Vec<_> = readings.iter().map(|r| (r.time_ms, r.value)).collect();
    assert_eq!(got, want);

    // Unacked, the batch comes again.
    let (_, again) = sub.next().await;
    assert_eq!(peek_header(&again).unwrap().seq, 0);

    // A forged ack changes nothing; the real one releases the batch.
    publish(
        broker.port,
        "fleetline/v1/acme/van-3/ack",
        &ack(1, &[AckRange { epoch: 9, first: 0, count: 1 }], [0x22; 32]),
    )
    .await;
    let real = ack(2, &[AckRange { epoch: 9, first: 0, count: 1 }], KEY);
    publish(broker.port, "fleetline/v1/acme/van-3/ack", &real).await;
    let stats = client.wait_for(Duration::from_secs(10), |s| s.core.batches_acked == 1).await;
    assert_eq!((stats.core.batches_acked, stats.core.samples_acked), (1, 5));
    assert_eq!(stats.core.acks_invalid, 1);
    assert!(stats.is_idle());

    // The same ack again is a replay.
    publish(broker.port, "fleetline/v1/acme/van-3/ack", &real).await;
    let stats = client.wait_for(Duration::from_secs(10), |s| s.core.acks_replayed == 1).await;
    assert_eq!(stats.core.acks_replayed, 1);

    // A command under the device key is applied once.
    let mut buf = vec![0u8; 256];
    let n = control::seal_command(
        &mut buf,
        &DeviceKey::from_bytes(KEY),
        "cloud",
        1,
        random_nonce().unwrap(),
        &Command::SetResendAfter { ms: 700 },
    )
    .unwrap();
    publish(broker.port, "fleetline/v1/acme/van-3/cmd", &buf[..n]).await;
    client.wait_for(Duration::from_secs(10), |s| s.commands == 1).await;
    assert_eq!(client.take_commands(), vec![Command::SetResendAfter { ms: 700 }]);

    let last = client.shutdown(Duration::from_secs(5)).await;
    assert!(last.is_idle());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_broker_restart_resubscribes_and_resends() {
    let broker = Mosquitto::start().await;
    let port = broker.port;
    let client = DeviceClient::spawn(config(port), SystemClock::new()).unwrap();
    client.wait_for(Duration::from_secs(10), |s| s.connected).await;
    broker.stop().await;
    client.wait_for(Duration::from_secs(10), |s| !s.connected).await;

    // Readings taken while the broker is down are sealed and held.
    let readings: Vec<Reading> = (0..3)
        .map(|i| Reading { kind: kind::FUEL_RELATIVE_LEVEL, time_ms: T0 + i * 10_000, value: 50.0 - i as f64 })
        .collect();
    client.record_all(readings).await.unwrap();
    let held = client.wait_for(Duration::from_secs(5), |s| s.outbox_batches == 1).await;
    assert_eq!(held.outbox_batches, 1);

    let broker = Mosquitto::start_on(port).await;
    let mut sub = Sub::start(port, "fleetline/v1/acme/van-3/up").await;
    let (_, payload) = sub.next().await;
    let h = peek_header(&payload).unwrap();
    assert_eq!((h.epoch, h.seq), (9, 0));
    // The ack reaches the client only if it resubscribed on the new session.
    publish(port, "fleetline/v1/acme/van-3/ack", &ack(1, &[AckRange { epoch: 9, first: 0, count: 1 }], KEY)).await;
    let stats = client.wait_for(Duration::from_secs(10), |s| s.core.batches_acked == 1).await;
    assert_eq!(stats.core.samples_acked, 3);
    assert!(stats.connects >= 2, "{stats:?}");
    assert!(stats.connection_errors >= 1);
    drop(client);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_mutual_tls_and_is_refused_without_a_client_certificate() {
    let pki = Pki::generate();
    let broker = Mosquitto::start_with(None, |dir| {
        std::fs::write(dir.join("ca.pem"), &pki.ca).unwrap();
        std::fs::write(dir.join("server.pem"), &pki.server.0).unwrap();
        std::fs::write(dir.join("server.key"), &pki.server.1).unwrap();
        format!(
            "cafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\nrequire_certificate true\n",
            dir.display()
        )
    })
    .await;

    let mut cfg = config(broker.port);
    cfg.tls = Some(TlsOptions {
        ca_pem: pki.ca.clone().into_bytes(),
        client_auth: Some((pki.client.0.clone().into_bytes(), pki.client.1.clone().into_bytes())),
    });
    let tls_dir = tempfile::tempdir().unwrap();
    let file = |name: &str, pem: &str| {
        let p = tls_dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (ca, cert, key) = (file("ca.pem", &pki.ca), file("c.pem", &pki.client.0), file("c.key", &pki.client.1));
    let mut sub =
        Sub::start_with(broker.port, "fleetline/v1/+/+/up", &["--cafile", &ca, "--cert", &cert, "--key", &key]).await;
    let client = DeviceClient::spawn(cfg.clone(), SystemClock::new()).unwrap();
    let stats = client.wait_for(Duration::from_secs(10), |s| s.connected).await;
    assert!(stats.connected, "{stats:?}");
    client.record(Reading { kind: kind::SPEED, time_ms: T0, value: 12.5 }).await.unwrap();
    let (_, mut payload) = sub.next().await;
    let batch = open_batch(&mut payload, &DeviceKey::from_bytes(KEY)).unwrap().decode().unwrap();
    assert_eq!(batch.samples[0].value, 12.5);
    drop(client);

    // Without a client certificate the broker refuses the handshake.
    cfg.tls = Some(TlsOptions { ca_pem: pki.ca.clone().into_bytes(), client_auth: None });
    let anonymous = DeviceClient::spawn(cfg.clone(), SystemClock::new()).unwrap();
    let stats = anonymous.wait_for(Duration::from_secs(3), |s| s.connection_errors >= 2).await;
    assert!(!stats.connected && stats.connection_errors >= 2, "{stats:?}");
    drop(anonymous);

    // A CA bundle without certificates is a configuration error, not a hang.
    cfg.tls = Some(TlsOptions { ca_pem: b"not a pem".to_vec(), client_auth: None });
    assert!(matches!(DeviceClient::spawn(cfg, SystemClock::new()), Err(ClientError::Tls(_))));
    broker.stop().await;
}
