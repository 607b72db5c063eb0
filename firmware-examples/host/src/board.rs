//! The host "board": flash in a file, a watchdog thread, a TCP link to the
//! gateway, the loop's clock and the peripherals' (`fleetline_unit_app::sim`).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read as _, Seek, SeekFrom, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash};
use fleetline_unit_app::unit::{Clock, Link, Watchdog};

/// Erase sector of the file flash (a common external SPI NOR's).
pub(crate) const SECTOR: usize = 4096;

/// NOR flash of two sectors kept in a file: erases set bytes to `0xff`,
/// writes only clear bits (as the chip does), and each change reaches the
/// file before the call returns. A process killed at any point leaves the
/// file as a chip cut off between two operations.
pub(crate) struct FileFlash {
    file: File,
    image: Vec<u8>,
}

/// A flash operation failed.
#[derive(Debug)]
pub(crate) enum FlashError {
    /// Outside the region, or not aligned.
    Bounds,
    /// The file could not be written.
    Io,
}

impl NorFlashError for FlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            FlashError::Bounds => NorFlashErrorKind::OutOfBounds,
            FlashError::Io => NorFlashErrorKind::Other,
        }
    }
}

impl FileFlash {
    /// Opens the image at `path`, blank (all `0xff`) when new.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut image = Vec::new();
        file.read_to_end(&mut image)?;
        image.resize(2 * SECTOR, 0xff);
        Ok(Self { file, image })
    }

    fn persist(&mut self, from: usize, to: usize) -> Result<(), FlashError> {
        let io = |_| FlashError::Io;
        self.file.seek(SeekFrom::Start(from as u64)).map_err(io)?;
        self.file.write_all(&self.image[from..to]).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

impl ErrorType for FileFlash {
    type Error = FlashError;
}

impl ReadNorFlash for FileFlash {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashError> {
        let o = offset as usize;
        bytes.copy_from_slice(self.image.get(o..o + bytes.len()).ok_or(FlashError::Bounds)?);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.image.len()
    }
}

impl NorFlash for FileFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashError> {
        let (f, t) = (from as usize, to as usize);
        if f % SECTOR != 0 || t % SECTOR != 0 || t < f {
            return Err(FlashError::Bounds);
        }
        self.image.get_mut(f..t).ok_or(FlashError::Bounds)?.fill(0xff);
        self.persist(f, t)
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashError> {
        let o = offset as usize;
        for (d, s) in self.image.get_mut(o..o + bytes.len()).ok_or(FlashError::Bounds)?.iter_mut().zip(bytes) {
            *d &= s;
        }
        self.persist(o, o + bytes.len())
    }
}

/// A watchdog: a thread that aborts the process (the host's reset) when
/// the loop has not fed it for `period`.
pub(crate) struct ThreadWatchdog {
    fed_ms: Arc<AtomicU64>,
    start: Instant,
}

impl ThreadWatchdog {
    /// Starts the countdown.
    pub(crate) fn start(period: Duration) -> Self {
        let start = Instant::now();
        let fed_ms = Arc::new(AtomicU64::new(0));
        let fed = fed_ms.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(period / 10);
                let since = start.elapsed().as_millis() as u64 - fed.load(Ordering::Relaxed);
                if since > period.as_millis() as u64 {
                    // Said from another thread, waited for a moment only: a
                    // loop wedged while holding stdout must not stop the reset.
                    std::thread::spawn(move || {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{{\"event\":\"watchdog_reset\",\"unfed_ms\":{since}}}");
                        let _ = out.flush();
                    });
                    std::thread::sleep(Duration::from_millis(100));
                    std::process::abort();
                }
            }
        });
        Self { fed_ms, start }
    }
}

impl Watchdog for ThreadWatchdog {
    fn feed(&mut self) {
        self.fed_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// The host's clock, Unix seconds: the simulated peripherals' time.
pub(crate) fn unix_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the process started.
pub(crate) struct MonoClock(pub(crate) Instant);

impl Clock for MonoClock {
    fn now_ms(&mut self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// A TCP connection to the gateway's device port, non-blocking for reads;
/// a write that cannot finish within `write_timeout` fails.
pub(crate) struct TcpLink {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    connect_timeout: Duration,
    write_timeout: Duration,
}

impl TcpLink {
    /// A link that dials `addr`.
    pub(crate) fn new(addr: SocketAddr, connect_timeout: Duration, write_timeout: Duration) -> Self {
        Self { addr, stream: None, connect_timeout, write_timeout }
    }

    fn stream(&mut self) -> Result<&mut TcpStream, std::io::Error> {
        self.stream.as_mut().ok_or_else(|| std::io::Error::from(ErrorKind::NotConnected))
    }
}

impl embedded_io::ErrorType for TcpLink {
    type Error = std::io::Error;
}

impl embedded_io::ReadReady for TcpLink {
    fn read_ready(&mut self) -> Result<bool, std::io::Error> {
        let mut probe = [0u8; 1];
        match self.stream()?.peek(&mut probe) {
            // Zero is the peer's close: `read` reports it.
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl embedded_io::Read for TcpLink {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, std::io::Error> {
        loop {
            match self.stream()?.read(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

impl embedded_io::Write for TcpLink {
    fn write(&mut self, buf: &[u8]) -> Result<usize, std::io::Error> {
        let deadline = Instant::now() + self.write_timeout;
        loop {
            match self.stream()?.write(buf) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    if Instant::now() > deadline {
                        return Err(ErrorKind::TimedOut.into());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> Result<(), std::io::Error> {
        Ok(())
    }
}

impl Link for TcpLink {
    fn dial(&mut self) -> Result<(), std::io::Error> {
        self.stream = None;
        let s = TcpStream::connect_timeout(&self.addr, self.connect_timeout)?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        self.stream = Some(s);
        Ok(())
    }
    fn hang_up(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
