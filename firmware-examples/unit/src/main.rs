//! A vehicle unit's firmware for a Cortex-M4: the main loop of
//! `fleetline_unit_app` on Arm's MPS2 AN386 as QEMU models it.
//!
//! Power-up: the next boot epoch from flash (written before it is used), the
//! watchdog started, SysTick as the loop's clock, a cellular modem's AT socket
//! interface on UART0 as the link (in QEMU a socket character device to
//! `scripts/at-modem.py`, which opens the TCP connections), the GNSS receiver,
//! tire receiver and fuel sender simulated on the board. Then the loop turns
//! forever, sleeping between SysTick interrupts, feeding the watchdog.
//!
//! Under test, the host file `fleetline-unit-run.cfg` (read over semihosting)
//! holds `acks=N seconds=S gateway=HOST:PORT`: the firmware then exits 0 once N batches are
//! acked by the gateway, 1 if S seconds pass first, reporting its stack use.
//! With `hang-after-ms=T` too, the loop stops turning after T ms (once: the
//! request is taken off the file), and the watchdog must reset the board.

#![no_std]
#![no_main]

use core::panic::PanicInfo;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use fleetline_device::wire::{DeviceId, DeviceKey, FleetId};
use fleetline_device::{Config, FlushPolicy, OutboxFull};
use fleetline_unit::board::{self, CmsdkWatchdog, RamFlash, SysTickClock, Uart};
use fleetline_unit_app::modem::{AtModem, Timeouts};
use fleetline_unit_app::sim::{FuelAdc, GpsUart, TpmsBus};
use fleetline_unit_app::unit::{Clock, Event, Parts, Settings, Unit};
use fleetline_unit_drivers::fuel::Calibration;

/// Samples per batch, sealed-batch bytes, outbox slots: the sizes the budget is set for.
const SAMPLES: usize = 60;
const BATCH_BYTES: usize = 1024;
const OUTBOX: usize = 8;

type Modem = AtModem<Uart, SysTickClock>;
type Now = fn() -> u64;
type Firmware =
    Unit<GpsUart<Now>, TpmsBus<Now>, FuelAdc<Now>, RamFlash, CmsdkWatchdog, Modem, SAMPLES, BATCH_BYTES, OUTBOX>;

/// The gateway the modem dials unless the host names another.
const GATEWAY: (&str, u16) = ("gateway.fleetline.internal", 1883);

/// The watchdog's period: above the longest wait of the modem (a dial).
const WATCHDOG_MS: u32 = 4_000;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    hprintln!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}

const RUN_CFG: &[u8] = b"fleetline-unit-run.cfg\0";

/// What the host asked of this run.
#[derive(Clone, Copy)]
struct Bounds {
    /// The gateway to dial, when not the default.
    gateway: Option<(&'static str, u16)>,
    /// Exit 0 after this many batches are acked.
    acks: u32,
    /// Exit 1 after this many seconds.
    seconds: u64,
    /// Stop turning the loop after this many ms, once (the watchdog's test).
    hang_after_ms: Option<u64>,
}

/// The run's bounds from the host, if it gave any.
fn run_bounds() -> Option<Bounds> {
    let buf = cortex_m::singleton!(: [u8; 160] = [0; 160])?;
    let n = board::host_read(RUN_CFG, buf)?;
    let text: &'static str = core::str::from_utf8(&buf[..n]).ok()?;
    let (mut acks, mut seconds, mut hang_after_ms, mut gateway) = (None, None, None, None);
    for word in text.split_whitespace() {
        match word.split_once('=') {
            Some(("acks", v)) => acks = v.parse().ok(),
            Some(("seconds", v)) => seconds = v.parse().ok(),
            Some(("hang-after-ms", v)) => hang_after_ms = v.parse().ok(),
            Some(("gateway", v)) => {
                gateway = v.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse().ok()?)));
            }
            _ => {}
        }
    }
    Some(Bounds { gateway, acks: acks?, seconds: seconds?, hang_after_ms })
}

/// A loop stuck in a driver: the watchdog is not fed and resets the board.
/// The host's request is taken off first, so the next boot runs normally.
fn hang(b: Bounds) -> ! {
    let mut text = [0u8; 160];
    let mut w = Cursor { buf: &mut text, len: 0 };
    let (host, port) = b.gateway.unwrap_or(GATEWAY);
    let _ = core::fmt::write(&mut w, format_args!("acks={} seconds={} gateway={host}:{port}\n", b.acks, b.seconds));
    let len = w.len;
    board::host_write(RUN_CFG, &text[..len]);
    hprintln!("unit: hanging at {} ms", board::millis());
    loop {
        cortex_m::asm::wfi();
    }
}

struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(core::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn settings() -> Result<Settings, &'static str> {
    Ok(Settings {
        device: Config {
            fleet: FleetId::new("demo").map_err(|_| "fleet id")?,
            device: DeviceId::new("v-00001").map_err(|_| "device id")?,
            key: DeviceKey::from_bytes([7; 32]),
            flush: FlushPolicy { max_samples: SAMPLES as u16, max_bytes: BATCH_BYTES as u16, max_age_ms: 1_000 },
            resend_after_ms: 3_000,
            when_full: OutboxFull::DropOldest,
        },
        keep_alive_s: 10,
        connect_timeout_ms: 3_000,
        backoff_initial_ms: 500,
        backoff_max_ms: 5_000,
        tpms_every_ms: 2_000,
        fuel_every_ms: 5_000,
        fuel_calibration: Calibration::new(&[(400, 0.0), (1_600, 100.0), (3_600, 400.0)]).map_err(|_| "calibration")?,
    })
}

fn run() -> Result<(), &'static str> {
    board::paint_stack();
    let core = cortex_m::Peripherals::take().ok_or("core peripherals taken")?;
    board::start_clock(core.SYST);
    board::take_host_time();
    let bounds = run_bounds();
    let image = cortex_m::singleton!(: [u8; board::FLASH_BYTES] = [0xff; board::FLASH_BYTES]).ok_or("flash taken")?;
    let (flash, _) = RamFlash::load(image);
    let (host, port) = bounds.and_then(|b| b.gateway).unwrap_or(GATEWAY);
    let parts = Parts {
        gps_uart: GpsUart::new(board::unix_s as Now, 1, 0),
        tpms_i2c: TpmsBus::new(board::unix_s as Now, 1),
        fuel_adc: FuelAdc::new(board::unix_s as Now, 1),
        flash,
        watchdog: CmsdkWatchdog::start(WATCHDOG_MS),
        link: AtModem::new(Uart::new(board::UART0, 115_200), SysTickClock, host, port, Timeouts::default()),
    };
    let mut clock = SysTickClock;
    // The unit lives in a static (counted in the build's RAM), not on the stack.
    let slot = cortex_m::singleton!(: Option<Firmware> = None).ok_or("unit slot taken")?;
    let unit = Unit::start_in(slot, parts, settings()?, clock.now_ms()).map_err(|_| "start")?;
    hprintln!(
        "unit: booted, epoch {}, unit state {} bytes, stack so far {}",
        unit.device().epoch(),
        core::mem::size_of::<Firmware>(),
        board::stack_used()
    );
    let mut acked = 0u32;
    let mut samples = 0u32;
    loop {
        let now = clock.now_ms();
        unit.poll(now, |e| match e {
            Event::Acked(r) => {
                acked += 1;
                samples += u32::from(r.samples);
                hprintln!("unit: batch ({}, {}) of {} readings acked", r.epoch, r.seq, r.samples);
            }
            Event::Connected => hprintln!("unit: connected"),
            Event::Disconnected(why) => hprintln!("unit: disconnected ({:?})", why),
            Event::Refused(code) => hprintln!("unit: refused ({:?})", code),
            Event::Command(counter) => hprintln!("unit: command {} applied", counter),
        });
        if let Some(b) = bounds {
            if b.hang_after_ms.is_some_and(|h| now >= h) {
                hang(b);
            }
            if acked >= b.acks {
                let s = unit.stats();
                hprintln!(
                    "unit: {} batches ({} readings) acked; {} polls, {} sessions, {} drops; GPS fixes {}; stack {} bytes",
                    acked,
                    samples,
                    s.polls,
                    s.sessions,
                    s.drops,
                    unit.gps_stats().fixes,
                    board::stack_used()
                );
                return Ok(());
            }
            if now > b.seconds * 1000 {
                return Err("the gateway did not ack in time");
            }
        }
        cortex_m::asm::wfi();
    }
}

#[entry]
fn main() -> ! {
    match run() {
        Ok(()) => {
            hprintln!("unit: passed");
            debug::exit(debug::EXIT_SUCCESS);
        }
        Err(e) => {
            hprintln!("unit: FAILED: {}", e);
            debug::exit(debug::EXIT_FAILURE);
        }
    }
    loop {}
}
