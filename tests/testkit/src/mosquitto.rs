//! Mosquitto and its command-line clients.

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A loopback port that was free a moment ago, for a process to bind later.
///
/// Chosen below the kernel's ephemeral range: the ports it hands to outgoing
/// connections never land there, so a port picked at a test's start is still
/// free when a node added (or restarted) minutes later binds it. Ports handed
/// out in this process are not handed out again.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32_768);
    const LOW: u16 = 10_000;
    if ephemeral_low > LOW + 1_000 {
        let random = RandomState::new();
        for attempt in 0u32..500 {
            let port = LOW + (random.hash_one(attempt) % u64::from(ephemeral_low - LOW)) as u16;
            let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
            let given = given.get_or_insert_with(HashSet::new);
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A Mosquitto on a loopback port; killed on drop.
pub struct Mosquitto {
    child: Child,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Starts on a free port, anonymous access.
    pub async fn start() -> Self {
        Self::start_with(None, |_| String::new()).await
    }

    /// Starts on `port` (after a restart, say).
    pub async fn start_on(port: u16) -> Self {
        Self::start_with(Some(port), |_| String::new()).await
    }

    /// Starts on `port` or a free one, retrying when another process takes the port
    /// first; `extra` adds listener settings given the config directory.
    pub async fn start_with(port: Option<u16>, extra: impl Fn(&Path) -> String) -> Self {
        for _ in 0..20 {
            let port = port.unwrap_or_else(free_port);
            let dir = tempfile::tempdir().expect("temp dir");
            let conf = dir.path().join("mosquitto.conf");
            // `user root` keeps Mosquitto from dropping to an account that cannot read the temp dir.
            let text = format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 100000\n{}",
                extra(dir.path())
            );
            std::fs::write(&conf, text).expect("writing mosquitto.conf");
            let mut child = Command::new(mosquitto_bin())
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("mosquitto is installed by scripts/test.sh");
            for _ in 0..250 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return Self { child, port, _dir: dir };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill().await;
            // A fixed port may still be held by a process that is going away.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("mosquitto did not start");
    }

    /// Kills it (SIGKILL) and waits.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }
}

fn mosquitto_bin() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() { "/usr/sbin/mosquitto" } else { "mosquitto" }
}

/// `mosquitto_sub` printing `topic hexpayload` per message, read into a channel.
pub struct Sub {
    lines: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    _child: Child,
}

impl Sub {
    /// Subscribes to `topic` on a loopback broker.
    pub async fn start(port: u16, topic: &str) -> Self {
        Self::start_with(port, topic, &[]).await
    }

    /// Same, with extra `mosquitto_sub` arguments (TLS files, credentials).
    pub async fn start_with(port: u16, topic: &str, extra: &[&str]) -> Self {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-F", "%t %x"])
            .args(extra)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub is installed by scripts/test.sh");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut out = BufReader::new(stdout).lines();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                if let Some((t, h)) = line.split_once(' ')
                    && let Ok(bytes) = hex::decode(h.trim())
                {
                    let _ = tx.send((t.to_string(), bytes));
                }
            }
        });
        // Give the subscription a moment; unacked data is re-sent anyway.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Self { lines, _child: child }
    }

    /// The next message, waiting up to ten seconds.
    pub async fn next(&mut self) -> (String, Vec<u8>) {
        tokio::time::timeout(Duration::from_secs(10), self.lines.recv())
            .await
            .expect("a message within ten seconds")
            .expect("mosquitto_sub running")
    }
}

/// Publishes `payload` with `mosquitto_pub` (QoS 1); `extra` adds arguments.
/// Returns whether `mosquitto_pub` succeeded.
pub async fn publish(port: u16, topic: &str, payload: &[u8], extra: &[&str]) -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("payload");
    std::fs::write(&file, payload).expect("writing payload");
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-f"])
        .arg(&file)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}
