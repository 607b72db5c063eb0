//! MPS2 AN386 peripherals as QEMU models them, and the host over semihosting.

use core::cell::Cell;

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use critical_section::Mutex;
use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash};

/// The board's system clock: 25 MHz.
pub const SYSCLK_HZ: u32 = 25_000_000;

fn read(addr: usize) -> u32 {
    // SAFETY: callers pass addresses of the board's memory-mapped registers.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn write(addr: usize, value: u32) {
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

// --- The host, over semihosting.

/// Reads the host file `path` (NUL-terminated) into `buf`; the bytes read.
pub fn host_read(path: &[u8], buf: &mut [u8]) -> Option<usize> {
    use cortex_m_semihosting::{nr, syscall};
    // SAFETY: semihosting calls with a NUL-terminated path and a buffer of the
    // length given; QEMU's semihosting implements them.
    unsafe {
        let h = syscall!(OPEN, path.as_ptr(), nr::open::R_BINARY, path.len() - 1) as isize;
        if h < 0 {
            return None;
        }
        let not_read = syscall!(READ, h, buf.as_mut_ptr(), buf.len());
        syscall!(CLOSE, h);
        Some(buf.len().saturating_sub(not_read))
    }
}

/// Replaces the host file `path` (NUL-terminated) with `bytes`.
pub fn host_write(path: &[u8], bytes: &[u8]) -> bool {
    use cortex_m_semihosting::{nr, syscall};
    // SAFETY: as in `host_read`.
    unsafe {
        let h = syscall!(OPEN, path.as_ptr(), nr::open::W_TRUNC_BINARY, path.len() - 1) as isize;
        if h < 0 {
            return false;
        }
        let not_written = syscall!(WRITE, h, bytes.as_ptr(), bytes.len());
        syscall!(CLOSE, h);
        not_written == 0
    }
}

/// The host's clock, Unix seconds (semihosting `SYS_TIME`).
pub fn host_unix_s() -> u64 {
    // SAFETY: SYS_TIME takes no argument.
    unsafe { cortex_m_semihosting::syscall!(TIME) as u64 }
}

// --- Flash.

/// Bytes of the unit's flash region: two 512-byte sectors for the boot store,
/// and two more unused.
pub const FLASH_BYTES: usize = 2048;
const FLASH_IMAGE: &[u8] = b"fleetline-unit-flash.bin\0";

/// The unit's flash as the boot store sees it. QEMU's MPS2 board has no
/// programmable flash, so it is RAM with NOR semantics (writes only clear
/// bits, erases set a sector), and every change is written through to a file
/// on the host over semihosting: a reset or a second QEMU run is the unit's
/// next power-up.
pub struct RamFlash(&'static mut [u8; FLASH_BYTES]);

impl RamFlash {
    /// Takes `image`, loading the host's copy when there is one; whether there was.
    pub fn load(image: &'static mut [u8; FLASH_BYTES]) -> (Self, bool) {
        image.fill(0xff);
        let restored = host_read(FLASH_IMAGE, image) == Some(FLASH_BYTES);
        if !restored {
            image.fill(0xff);
        }
        (Self(image), restored)
    }

    fn keep(&self) -> Result<(), FlashFault> {
        if host_write(FLASH_IMAGE, self.0) { Ok(()) } else { Err(FlashFault::Host) }
    }
}

/// A flash operation failed.
#[derive(Debug)]
pub enum FlashFault {
    /// Outside the region.
    Bounds,
    /// The host did not keep the image.
    Host,
}

impl NorFlashError for FlashFault {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            FlashFault::Bounds => NorFlashErrorKind::OutOfBounds,
            FlashFault::Host => NorFlashErrorKind::Other,
        }
    }
}

impl ErrorType for RamFlash {
    type Error = FlashFault;
}

impl ReadNorFlash for RamFlash {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashFault> {
        let o = offset as usize;
        bytes.copy_from_slice(self.0.get(o..o + bytes.len()).ok_or(FlashFault::Bounds)?);
        Ok(())
    }
    fn capacity(&self) -> usize {
        FLASH_BYTES
    }
}

impl NorFlash for RamFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 512;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashFault> {
        self.0.get_mut(from as usize..to as usize).ok_or(FlashFault::Bounds)?.fill(0xff);
        self.keep()
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashFault> {
        let o = offset as usize;
        for (d, s) in self.0.get_mut(o..o + bytes.len()).ok_or(FlashFault::Bounds)?.iter_mut().zip(bytes) {
            *d &= s;
        }
        self.keep()
    }
}

// --- The loop's clock: SysTick at 1 kHz.

static MILLIS: Mutex<Cell<u64>> = Mutex::new(Cell::new(0));

#[exception]
fn SysTick() {
    critical_section::with(|cs| {
        let m = MILLIS.borrow(cs);
        m.set(m.get() + 1);
    });
}

/// Starts SysTick interrupting every millisecond.
pub fn start_clock(mut syst: cortex_m::peripheral::SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(SYSCLK_HZ / 1000 - 1);
    syst.clear_current();
    syst.enable_counter();
    syst.enable_interrupt();
}

/// Milliseconds since [`start_clock`].
pub fn millis() -> u64 {
    critical_section::with(|cs| MILLIS.borrow(cs).get())
}

static UNIX_ORIGIN_S: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Takes the host's UTC (the simulated peripherals' time) at power-up.
pub fn take_host_time() {
    let origin = host_unix_s().saturating_sub(millis() / 1000);
    UNIX_ORIGIN_S.store(origin as u32, core::sync::atomic::Ordering::Relaxed);
}

/// Unix seconds now, from the host's UTC at power-up and the loop's clock.
pub fn unix_s() -> u64 {
    u64::from(UNIX_ORIGIN_S.load(core::sync::atomic::Ordering::Relaxed)) + millis() / 1000
}

/// [`millis`] as the loop's clock.
#[derive(Clone, Copy)]
pub struct SysTickClock;

impl fleetline_unit_app::unit::Clock for SysTickClock {
    fn now_ms(&mut self) -> u64 {
        millis()
    }
}

// --- CMSDK APB UART.

/// UART0's base address.
pub const UART0: usize = 0x4000_4000;
const UART_DATA: usize = 0x00;
const UART_STATE: usize = 0x04;
const UART_CTRL: usize = 0x08;
const UART_BAUDDIV: usize = 0x10;
const STATE_TX_FULL: u32 = 1;
const STATE_RX_FULL: u32 = 2;

/// A CMSDK APB UART, polled: one byte of receive buffer, as the hardware has.
pub struct Uart {
    base: usize,
    /// Bytes refused because the transmitter stayed full (a stalled peer).
    pub tx_stalls: u32,
}

impl Uart {
    /// Enables the UART at `base` (one of the board's, not otherwise in use).
    pub fn new(base: usize, baud: u32) -> Self {
        write(base + UART_BAUDDIV, (SYSCLK_HZ / baud).max(16));
        write(base + UART_CTRL, 0b11);
        Self { base, tx_stalls: 0 }
    }

    fn state(&self) -> u32 {
        read(self.base + UART_STATE)
    }
}

/// The UART's peer stopped taking bytes.
#[derive(Debug)]
pub struct Stalled;

impl embedded_io::Error for Stalled {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::TimedOut
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = Stalled;
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Stalled> {
        Ok(self.state() & STATE_RX_FULL != 0)
    }
}

impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Stalled> {
        let mut n = 0;
        while n < buf.len() {
            if self.state() & STATE_RX_FULL == 0 {
                if n > 0 {
                    break;
                }
                continue;
            }
            buf[n] = read(self.base + UART_DATA) as u8;
            n += 1;
        }
        Ok(n)
    }
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Stalled> {
        for (i, &b) in buf.iter().enumerate() {
            let deadline = millis() + 1_000;
            while self.state() & STATE_TX_FULL != 0 {
                if millis() > deadline {
                    self.tx_stalls += 1;
                    return if i > 0 { Ok(i) } else { Err(Stalled) };
                }
            }
            write(self.base + UART_DATA, u32::from(b));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Stalled> {
        Ok(())
    }
}

// --- CMSDK APB watchdog.

const WDOG: usize = 0x4000_8000;
const WDOG_LOAD: usize = 0x00;
const WDOG_CONTROL: usize = 0x08;
const WDOG_INTCLR: usize = 0x0c;
const WDOG_LOCK: usize = 0xc00;
const WDOG_UNLOCK: u32 = 0x1acc_e551;

/// The board's watchdog: it interrupts when `period_ms` pass unfed and resets
/// the board when another `period_ms` pass.
pub struct CmsdkWatchdog;

impl CmsdkWatchdog {
    /// Starts it.
    pub fn start(period_ms: u32) -> Self {
        write(WDOG + WDOG_LOCK, WDOG_UNLOCK);
        write(WDOG + WDOG_LOAD, (SYSCLK_HZ / 1000).saturating_mul(period_ms));
        // INTEN | RESEN.
        write(WDOG + WDOG_CONTROL, 0b11);
        write(WDOG + WDOG_LOCK, 0);
        Self
    }
}

impl fleetline_unit_app::unit::Watchdog for CmsdkWatchdog {
    fn feed(&mut self) {
        write(WDOG + WDOG_LOCK, WDOG_UNLOCK);
        write(WDOG + WDOG_INTCLR, 1);
        write(WDOG + WDOG_LOCK, 0);
    }
}

// --- Stack use.

const STACK_PAINT: u32 = 0x5afe_57ac;
/// Bytes below the stack's top that are painted and measured.
pub const STACK_WATCHED: usize = 48 * 1024;

unsafe extern "C" {
    static _stack_start: u32;
}

fn stack_top() -> usize {
    // Only the symbol's address is taken, never its value.
    core::ptr::addr_of!(_stack_start) as usize
}

/// Paints the watched stack below the current frame, so [`stack_used`] can
/// tell the deepest the stack went.
pub fn paint_stack() {
    let sp = cortex_m::register::msp::read() as usize;
    let bottom = stack_top() - STACK_WATCHED;
    let mut p = bottom;
    // Leave the current frame and what calls below it may need alone.
    while p < sp - 256 {
        write(p, STACK_PAINT);
        p += 4;
    }
}

/// The deepest stack use since [`paint_stack`], bytes.
pub fn stack_used() -> usize {
    let top = stack_top();
    let mut p = top - STACK_WATCHED;
    while p < top && read(p) == STACK_PAINT {
        p += 4;
    }
    top - p
}
