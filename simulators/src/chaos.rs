//! Chaos for the demo: a schedule of process kills, stops and uplink outages, the
//! gateway and cloud as child processes of this binary, and a TCP proxy on the
//! uplink that an outage cuts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Which process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The gateway.
    Gateway,
    /// The cloud node (the first one of a cluster).
    Cloud,
}

/// One thing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL, restart after 1 s.
    Kill(Target),
    /// SIGTERM, restart after the duration.
    Stop(Target, Duration),
    /// Cut gateway ↔ cloud for the duration.
    UplinkOutage(Duration),
    /// SIGKILL cloud node `i`; restart after the duration, or never.
    KillNode(usize, Option<Duration>),
    /// SIGTERM cloud node `i` (it hands its shards over), restart after the duration.
    StopNode(usize, Duration),
    /// SIGSTOP cloud node `i`, SIGCONT after the duration: it wakes believing it
    /// still owns its shards.
    FreezeNode(usize, Duration),
    /// Start one more cloud node.
    AddNode,
    /// SIGTERM cloud node `i` for good (scale-in).
    DrainNode(usize),
}

impl Action {
    /// Whether it needs a cluster (nodes that share an external broker).
    pub fn is_cluster(self) -> bool {
        matches!(
            self,
            Action::KillNode(..)
                | Action::StopNode(..)
                | Action::FreezeNode(..)
                | Action::AddNode
                | Action::DrainNode(_)
        )
    }
}

/// An action at a time from the start of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// When.
    pub at: Duration,
    /// What.
    pub action: Action,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |t: Target| if t == Target::Gateway { "gateway" } else { "cloud" };
        let at = humantime::format_duration(self.at);
        let d = humantime::format_duration;
        match self.action {
            Action::Kill(t) => write!(f, "kill-{}@{at}", name(t)),
            Action::Stop(t, dur) => write!(f, "stop-{}@{at}+{}", name(t), d(dur)),
            Action::UplinkOutage(dur) => write!(f, "uplink-outage@{at}+{}", d(dur)),
            Action::KillNode(i, None) => write!(f, "kill-node@{at}:{i}"),
            Action::KillNode(i, Some(dur)) => write!(f, "kill-node@{at}:{i}+{}", d(dur)),
            Action::StopNode(i, dur) => write!(f, "stop-node@{at}:{i}+{}", d(dur)),
            Action::FreezeNode(i, dur) => write!(f, "freeze-node@{at}:{i}+{}", d(dur)),
            Action::AddNode => write!(f, "add-node@{at}"),
            Action::DrainNode(i) => write!(f, "drain-node@{at}:{i}"),
        }
    }
}

/// A whole schedule (one command-line value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule(pub Vec<Step>);

/// Why a chaos schedule is refused: the item and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadSchedule(pub String);

impl std::str::FromStr for Schedule {
    type Err = BadSchedule;

    fn from_str(s: &str) -> Result<Self, BadSchedule> {
        parse_schedule(s).map(Self)
    }
}

/// Parses `kill-gateway@20s,uplink-outage@30s+15s,kill-cloud@45s,stop-gateway@50s+10s`
/// and the cluster's `kill-node@20s:1`, `stop-node@20s:1+5s`, `freeze-node@20s:1+8s`,
/// `add-node@30s`, `drain-node@40s:2` (`:i` is the node's index, from 0).
pub fn parse_schedule(text: &str) -> Result<Vec<Step>, BadSchedule> {
    let mut steps = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |why: String| BadSchedule(format!("{item:?}: {why}"));
        let (what, when) = item.split_once('@').ok_or_else(|| bad("expected ACTION@TIME".into()))?;
        let (at, dur) = match when.split_once('+') {
            Some((a, d)) => (a, Some(d)),
            None => (when, None),
        };
        let (at, node) = match at.split_once(':') {
            Some((a, n)) => (a, Some(n.parse::<usize>().map_err(|_| bad(format!("bad node index {n:?}")))?)),
            None => (at, None),
        };
        let at = humantime::parse_duration(at).map_err(|e| bad(e.to_string()))?;
        let dur = dur.map(humantime::parse_duration).transpose().map_err(|e| bad(e.to_string()))?;
        let node_of = || node.ok_or_else(|| bad(format!("{what} names a node: {what}@TIME:INDEX")));
        if node.is_some() && !what.ends_with("-node") {
            return Err(bad(format!("{what} takes no node index")));
        }
        let action = match (what, dur) {
            ("kill-gateway", None) => Action::Kill(Target::Gateway),
            ("kill-cloud", None) => Action::Kill(Target::Cloud),
            ("stop-gateway", Some(d)) => Action::Stop(Target::Gateway, d),
            ("stop-cloud", Some(d)) => Action::Stop(Target::Cloud, d),
            ("uplink-outage", Some(d)) => Action::UplinkOutage(d),
            ("kill-node", d) => Action::KillNode(node_of()?, d),
            ("stop-node", Some(d)) => Action::StopNode(node_of()?, d),
            ("freeze-node", Some(d)) => Action::FreezeNode(node_of()?, d),
            ("add-node", None) if node.is_none() => Action::AddNode,
            ("drain-node", None) => Action::DrainNode(node_of()?),
            ("kill-gateway" | "kill-cloud" | "add-node" | "drain-node", _) => {
                return Err(bad(format!("{what} takes no duration")));
            }
            ("stop-gateway" | "stop-cloud" | "uplink-outage" | "stop-node" | "freeze-node", None) => {
                return Err(bad(format!("needs a duration, e.g. {what}@30s+10s")));
            }
            _ => return Err(bad(format!("unknown action {what:?}"))),
        };
        steps.push(Step { at, action });
    }
    steps.sort_by_key(|s| s.at);
    Ok(steps)
}

/// A child process of this binary that prints one JSON "listening" line on start.
pub struct ChildProc {
    exe: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    /// The last start-up line.
    pub line: Value,
}

impl ChildProc {
    /// Starts `exe args…`, its stderr appended to `log`.
    pub async fn start(exe: &Path, args: Vec<String>, log: &Path) -> anyhow::Result<Self> {
        let mut p = Self::new(exe, args, log);
        p.restart().await?;
        Ok(p)
    }

    /// A process to start later ([`restart`](Self::restart)).
    pub fn new(exe: &Path, args: Vec<String>, log: &Path) -> Self {
        Self { exe: exe.into(), args, log: log.into(), child: None, line: Value::Null }
    }

    /// (Re)starts the process.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = tokio::process::Command::new(&self.exe)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("child did not start in time")??
            .with_context(|| format!("child exited at start; see {}", self.log.display()))?;
        self.line = serde_json::from_str(&line)?;
        self.child = Some(child);
        Ok(())
    }

    /// An address from the start-up line.
    pub fn addr(&self, key: &str) -> Option<String> {
        self.line[key].as_str().map(str::to_string)
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the running process.
    pub fn signal(&self, sig: &str) -> bool {
        let Some(pid) = self.child.as_ref().and_then(tokio::process::Child::id) else { return false };
        std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Whether it was started and not stopped since.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// SIGTERM, then wait (SIGKILL after 30 s).
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        match tokio::time::timeout(Duration::from_secs(30), c.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                let _ = c.start_kill();
                c.wait().await.ok()
            }
        }
    }
}

/// A Mosquitto broker on a free port (anonymous, in memory): the broker a cluster
/// of cloud nodes shares. Killed when dropped.
pub struct Mosquitto {
    child: tokio::process::Child,
    /// Its port.
    pub port: u16,
}

impl Mosquitto {
    /// Starts one, its config and log in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("mosquitto"));
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let conf = dir.join("mosquitto.conf");
            // `user root` keeps it from dropping to an account that cannot read `dir`.
            std::fs::write(
                &conf,
                format!(
                    "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 100000\nlog_dest file {}\n",
                    dir.join("mosquitto.log").display()
                ),
            )?;
            let mut child = tokio::process::Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| {
                    format!("starting {} (a cluster needs Mosquitto: apt-get install mosquitto)", bin.display())
                })?;
            for _ in 0..250 {
                if child.try_wait()?.is_some() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return Ok(Self { child, port });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill().await;
        }
        anyhow::bail!("mosquitto did not start; see {}", dir.join("mosquitto.log").display())
    }

    /// Kills it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A TCP proxy that can be cut: while down, it drops every connection.
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen`, forwards to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("proxy on {listen}"))?;
        let addr = listener.local_addr()?;
        let (up, up_rx) = watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                let mut up = up_rx.clone();
                if !*up.borrow() {
                    continue; // dropped: the outage
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = up.wait_for(|u| !*u) => {}
                    }
                });
            }
        });
        Ok(Self { addr, up, task })
    }

    /// Cuts (false) or restores (true) the link.
    pub fn set_up(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_sort() {
        let s = parse_schedule(
            "kill-gateway@20s,uplink-outage@30s+15s,kill-cloud@45s,stop-gateway@50s+10s, stop-cloud@5s+1s",
        )
        .unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(
            s[0],
            Step { at: Duration::from_secs(5), action: Action::Stop(Target::Cloud, Duration::from_secs(1)) }
        );
        assert_eq!(s[2].action, Action::UplinkOutage(Duration::from_secs(15)));
        assert_eq!(s[1].to_string(), "kill-gateway@20s");
        assert!(parse_schedule("kill-gateway@20s+1s").is_err());
        assert!(parse_schedule("stop-cloud@20s").is_err());
        assert!(parse_schedule("reboot@1s").is_err());
        assert!(parse_schedule("kill-cloud").is_err());
        assert!(parse_schedule("").unwrap().is_empty());
        let c = parse_schedule(
            "kill-node@5s:1,stop-node@6s:2+3s,freeze-node@7s:0+8s,add-node@9s,drain-node@10s:3,kill-node@11s:0+2s",
        )
        .unwrap();
        assert_eq!(c[0].action, Action::KillNode(1, None));
        assert_eq!(c[1].action, Action::StopNode(2, Duration::from_secs(3)));
        assert_eq!(c[2].action, Action::FreezeNode(0, Duration::from_secs(8)));
        assert_eq!((c[3].action, c[4].action), (Action::AddNode, Action::DrainNode(3)));
        assert_eq!(c[5].action, Action::KillNode(0, Some(Duration::from_secs(2))));
        assert!(c.iter().all(|s| s.action.is_cluster()));
        for (step, text) in c.iter().zip(["kill-node@5s:1", "stop-node@6s:2+3s", "freeze-node@7s:0+8s", "add-node@9s"])
        {
            assert_eq!(step.to_string(), text);
        }
        for bad in ["kill-node@5s", "freeze-node@5s:1", "add-node@5s:1", "kill-gateway@5s:1", "stop-node@5s:x+1s"] {
            assert!(parse_schedule(bad).is_err(), "{bad}");
        }
    }
}
