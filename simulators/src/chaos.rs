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
    /// The cloud node.
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
        match self.action {
            Action::Kill(t) => write!(f, "kill-{}@{at}", name(t)),
            Action::Stop(t, d) => write!(f, "stop-{}@{at}+{}", name(t), humantime::format_duration(d)),
            Action::UplinkOutage(d) => write!(f, "uplink-outage@{at}+{}", humantime::format_duration(d)),
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

/// Parses `kill-gateway@20s,uplink-outage@30s+15s,kill-cloud@45s,stop-gateway@50s+10s`.
pub fn parse_schedule(text: &str) -> Result<Vec<Step>, BadSchedule> {
    let mut steps = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (what, when) =
            item.split_once('@').ok_or_else(|| BadSchedule(format!("{item:?}: expected ACTION@TIME")))?;
        let (at, dur) = match when.split_once('+') {
            Some((a, d)) => (a, Some(d)),
            None => (when, None),
        };
        let at = humantime::parse_duration(at).map_err(|e| BadSchedule(format!("{item:?}: {e}")))?;
        let dur = dur.map(humantime::parse_duration).transpose().map_err(|e| BadSchedule(format!("{item:?}: {e}")))?;
        let action = match (what, dur) {
            ("kill-gateway", None) => Action::Kill(Target::Gateway),
            ("kill-cloud", None) => Action::Kill(Target::Cloud),
            ("stop-gateway", Some(d)) => Action::Stop(Target::Gateway, d),
            ("stop-cloud", Some(d)) => Action::Stop(Target::Cloud, d),
            ("uplink-outage", Some(d)) => Action::UplinkOutage(d),
            ("kill-gateway" | "kill-cloud", Some(_)) => {
                return Err(BadSchedule(format!("{item:?}: kill-* takes no duration")));
            }
            ("stop-gateway" | "stop-cloud" | "uplink-outage", None) => {
                return Err(BadSchedule(format!("{item:?}: needs a duration, e.g. {what}@30s+10s")));
            }
            _ => return Err(BadSchedule(format!("{item:?}: unknown action {what:?}"))),
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
        let mut p = Self { exe: exe.into(), args, log: log.into(), child: None, line: Value::Null };
        p.restart().await?;
        Ok(p)
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
    }
}
