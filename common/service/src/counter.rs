//! Counters of control messages (acks) that keep growing across restarts, with
//! their high-water mark in a small file (see `fleetline_wire::control::CounterCore`
//! for the rule): a sender restarted with its clock stepped back continues above
//! everything it issued before, so receivers do not take its acks for replays.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context;
use fleetline_wire::control::CounterCore;

/// A counter whose high-water mark lives in a file.
pub struct PersistentCounter {
    path: PathBuf,
    core: Mutex<CounterCore>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl PersistentCounter {
    /// Opens the mark at `path` (a new sender starts from its clock). A file that
    /// exists but does not hold a mark is an error naming it: starting from zero
    /// could issue counters receivers already passed.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mark = match std::fs::read_to_string(path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .with_context(|| format!("ack counter file {} does not hold a number", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading ack counter file {}", path.display())),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Self { path: path.to_path_buf(), core: Mutex::new(CounterCore::resume(mark)) })
    }

    /// The next counter. Raising the mark writes the file (temp file, fsync,
    /// rename, directory fsync) before the counter is returned; if that fails the
    /// error is returned and the counter is not used.
    pub fn next(&self) -> anyhow::Result<u64> {
        let mut core = self.core.lock().map_err(|_| anyhow::anyhow!("ack counter lock poisoned"))?;
        let before = *core;
        let (value, mark) = core.next(now_us());
        if let Some(mark) = mark
            && let Err(e) = persist(&self.path, mark)
        {
            *core = before;
            return Err(e);
        }
        Ok(value)
    }
}

fn persist(path: &Path, mark: u64) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{mark}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().with_context(|| format!("writing ack counter file {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn continues_above_the_persisted_mark_and_refuses_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ack-counter");
        let c = PersistentCounter::open(&path).unwrap();
        let a = c.next().unwrap();
        let b = c.next().unwrap();
        assert!(b > a);
        // Pretend the clock was far ahead when it ran: the mark is what counts.
        std::fs::write(&path, format!("{}\n", a + 3_600_000_000_000)).unwrap();
        let again = PersistentCounter::open(&path).unwrap();
        assert!(again.next().unwrap() > a + 3_600_000_000_000);
        std::fs::write(&path, "garbage").unwrap();
        let err = PersistentCounter::open(&path).err().unwrap().to_string();
        assert!(err.contains("ack-counter"), "{err}");
    }
}
