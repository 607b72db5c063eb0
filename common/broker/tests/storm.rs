//! The embedded broker under a reconnect storm: one client id in tight loops of
//! connect → CONNECT → CONNACK → close. Straight into rumqttd 0.20 such a loop
//! panics its accept path (a stale will handler of the same id) and poisons its
//! lock, after which no login ever gets a CONNACK; through the front (one session
//! per id, the previous one closed before the next reaches rumqttd) it never does,
//! and if rumqttd panics anyway the supervisor restarts its listener.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetline_broker::sessions::Sessions;
use fleetline_broker::{BrokerSettings, Front, FrontEvents, Logins};
use fleetline_testkit::raw::{connect_once, connect_packet, reconnect_storm};

struct AnyLogin;
impl Logins for AnyLogin {
    fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str> {
        if client_id == username && password == "pw" { Ok(()) } else { Err(fleetline_broker::reason::BAD_PASSWORD) }
    }

    fn grants(&self, _: &str, _: &str) -> Arc<dyn fleetline_broker::Grants> {
        Arc::new(fleetline_broker::Everything)
    }
}

struct NoEvents;
impl FrontEvents for NoEvents {
    fn login_refused(&self, _: &'static str) {}
    fn tls_session(&self) {}
    fn tls_failed(&self) {}
    fn tls_timed_out(&self) {}
    fn packet_refused(&self, _: &'static str) {}
}

fn settings() -> BrokerSettings {
    BrokerSettings {
        name: "storm".into(),
        max_connections: 100,
        max_packet: 64 * 1024,
        log_bytes: 1 << 20,
        small_logs: vec![],
        link_id: "storm-link".into(),
        link_filters: vec![],
    }
}

async fn login_works(addr: std::net::SocketAddr, id: &str, pass: &[u8]) -> bool {
    connect_once(addr, &connect_packet(4, id, Some((id, pass)), 30), Duration::from_secs(3)).await.code() == Some(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnect_storm_through_the_front_leaves_the_broker_answering() {
    let _ = tracing_subscriber::fmt().with_env_filter("rumqttd=error").with_test_writer().try_init();
    let (broker, _tx, _rx) = fleetline_broker::start(&settings(), fleetline_broker::new_secret()).await.unwrap();
    let mut front = Front::new(Arc::new(AnyLogin), Arc::new(NoEvents), &broker, 100);
    // Pacing off, so every round of the storm really reaches the broker.
    front.sessions = Arc::new(Sessions::with_pacing(1e9, 1e9));
    let (addr, accept) = front.bind("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let accept = tokio::spawn(accept);
    let cycles = 400;
    // One unit in a tight loop while another does the same.
    let (a, b) = tokio::join!(
        reconnect_storm(addr, "unit.1", "unit.1", b"pw", cycles),
        reconnect_storm(addr, "unit.5", "unit.5", b"pw", cycles)
    );
    eprintln!("through the front: {a} + {b} of {} rounds got CONNACK 0", 2 * cycles);
    assert_eq!((a, b), (cycles, cycles), "every round of a lone reconnecting unit gets in");
    // Two loops fighting over one id: each take-over closes the other's session
    // (as in any MQTT broker), but the broker itself must come through unharmed.
    let (c, d) = tokio::join!(
        reconnect_storm(addr, "unit.1", "unit.1", b"pw", 100),
        reconnect_storm(addr, "unit.1", "unit.1", b"pw", 100)
    );
    eprintln!("two loops on one id: {c} + {d} of 200 rounds got CONNACK 0");
    assert!(login_works(addr, "unit.2", b"pw").await);
    assert!(login_works(addr, "unit.1", b"pw").await);
    // Let the supervisor look (it probes every 2 s and reads the panic count).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(broker.health.panics.load(Ordering::Relaxed), 0);
    assert!(broker.health.healthy());
    accept.abort();

    // The same storm straight into rumqttd (run after the one above: panics are
    // counted process-wide).
    storm_straight_into_rumqttd().await;
}

/// What rumqttd alone does with such a storm, and the supervisor's answer to it.
async fn storm_straight_into_rumqttd() {
    let secret = fleetline_broker::new_secret();
    let (broker, _tx, _rx) = fleetline_broker::start(&settings(), secret.clone()).await.unwrap();
    // The loopback listener, bypassing the front: what rumqttd alone does.
    let (a, b) = tokio::join!(
        reconnect_storm(broker.addr, "unit.1", "unit.1", secret.as_bytes(), 400),
        reconnect_storm(broker.addr, "unit.1", "unit.1", secret.as_bytes(), 400)
    );
    let wedged = !login_works(broker.addr, "unit.3", secret.as_bytes()).await;
    eprintln!("straight into rumqttd: {a} + {b} of 800 got CONNACK 0; wedged afterwards: {wedged}");
    // Whatever happened, within a few probe rounds the broker answers again.
    let mut answered = false;
    for _ in 0..40 {
        if broker.health.healthy() && login_works(broker.addr, "unit.4", secret.as_bytes()).await {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let panics = broker.health.panics.load(Ordering::Relaxed);
    let restarts = broker.health.restarts.load(Ordering::Relaxed);
    eprintln!("panics {panics}, restarts {restarts}");
    assert!(answered, "the broker answers logins again");
    if wedged {
        assert!(restarts >= 1, "a wedged listener was restarted");
    }
}
