//! The unit's self-test: the device SDK and the drivers on a Cortex-M4 under
//! QEMU (`mps2-an386`), reporting over semihosting.
//!
//! The self-test first runs the sensor drivers on canned input (NMEA
//! sentences from a receiver, one garbled; a fuel sender's raw values through
//! the tank's calibration) and records what they give; then it records readings, seals them into a batch, opens the batch
//! with the unit's key (as the gateway would), takes the gateway's sealed ack
//! and refuses its replay, then "reboots": a new `Device` with the next boot epoch must seal batches
//! the old acks do not cover. Exit code 0 only when all of it holds.

#![no_std]
#![no_main]

use core::panic::PanicInfo;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use fleetline_device::wire::control::{self, AckRange};
use fleetline_device::wire::signals::kind;
use fleetline_device::wire::{DeviceId, DeviceKey, FleetId, open_batch};
use fleetline_device::{BootState, Config, ControlError, Device, FlushPolicy, OutboxFull, Reading};
use fleetline_unit::board::{self, RamFlash};

/// Samples per batch and sealed-batch bytes: the sizes the budget is set for.
const SAMPLES: usize = 60;
const BATCH_BYTES: usize = 1024;
const OUTBOX: usize = 8;

type Unit = Device<SAMPLES, BATCH_BYTES, OUTBOX>;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    hprintln!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}

fn config(key: &DeviceKey) -> Result<Config, &'static str> {
    Ok(Config {
        fleet: FleetId::new("demo").map_err(|_| "fleet id")?,
        device: DeviceId::new("v-00001").map_err(|_| "device id")?,
        key: key.clone(),
        flush: FlushPolicy { max_samples: SAMPLES as u16, max_bytes: BATCH_BYTES as u16, max_age_ms: 2_000 },
        resend_after_ms: 5_000,
        when_full: OutboxFull::DropOldest,
    })
}

/// Seals one batch of `n` readings and returns (its bytes, seq).
fn seal(unit: &mut Unit, t0: u64, n: u64, out: &mut [u8; BATCH_BYTES]) -> Result<(usize, u32), &'static str> {
    for i in 0..n {
        let r = Reading { kind: kind::SPEED, time_ms: 1_790_000_000_000 + t0 + i * 1000, value: 40.0 + i as f64 };
        unit.record(t0 + i * 1000, r).map_err(|_| "record")?;
    }
    let tx = unit.poll_transmit(t0 + n * 1000 + 2_000).ok_or("nothing to send")?;
    out[..tx.payload.len()].copy_from_slice(tx.payload);
    Ok((tx.payload.len(), tx.seq))
}

/// What a receiver sends in one epoch, and a line garbled on the wire.
const NMEA: &[u8] = b"$GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,*76\r\n\
$GPRMC,092750.000,A,5321.6802,N,00630.3372,W,20.5,54.7,280511,,,A*72\r\n\
$GPRMC,092751.000,A,5321.6802,N,00630.3372,W,2#.5,54.7,280511,,,A*4E\r\n";

/// The drivers on canned input, their readings recorded by `unit`.
fn sensors(unit: &mut Unit) -> Result<(), &'static str> {
    use fleetline_unit_drivers::fuel::Calibration;
    use fleetline_unit_drivers::gps::NmeaParser;
    let mut gps = NmeaParser::default();
    let mut fix = None;
    gps.feed(NMEA, |f| fix = Some(f));
    let fix = fix.ok_or("no fix from the receiver's sentences")?;
    let stats = gps.stats();
    if stats.fixes != 1 || stats.checksum_errors != 1 {
        return Err("the garbled sentence was not counted");
    }
    let t = 1_790_000_000_000;
    for (k, v) in
        [(kind::LATITUDE, fix.lat), (kind::LONGITUDE, fix.lon), (kind::SPEED, f64::from(fix.speed_kmh.unwrap_or(0.0)))]
    {
        unit.record(0, Reading { kind: k, time_ms: t, value: v }).map_err(|_| "record fix")?;
    }
    let tank = Calibration::new(&[(400, 0.0), (1_600, 100.0), (3_600, 400.0)]).map_err(|_| "calibration")?;
    let (litres, within) = tank.litres(2_600);
    if !within || !(249.9..=250.1).contains(&litres) {
        return Err("fuel calibration");
    }
    unit.record(0, Reading { kind: kind::FUEL_ABSOLUTE_LEVEL, time_ms: t, value: f64::from(litres) })
        .map_err(|_| "record fuel")?;
    // Integers: formatting floats would pull core's float printing into flash.
    hprintln!(
        "self-test: GPS fix lat {} lon {} (µ°), speed {} (0.1 km/h), {} sentence garbled; tank {} (0.1 l)",
        (fix.lat * 1e6) as i64,
        (fix.lon * 1e6) as i64,
        (fix.speed_kmh.unwrap_or(0.0) * 10.0) as i32,
        stats.checksum_errors,
        (litres * 10.0) as i32
    );
    Ok(())
}

fn self_test() -> Result<(), &'static str> {
    use fleetline_unit_drivers::persist::BootStore;
    board::paint_stack();
    let key = DeviceKey::from_bytes([7; 32]);
    // Power-up: the boot epoch from flash, one more than any before, written first.
    let image = cortex_m::singleton!(: [u8; board::FLASH_BYTES] = [0xff; board::FLASH_BYTES]).ok_or("flash taken")?;
    let (flash, restored) = RamFlash::load(image);
    let mut store = BootStore::new(flash, 0).map_err(|_| "boot store")?;
    let boot = store.next_boot().map_err(|_| "next boot")?;
    hprintln!(
        "self-test: power-up {} flash image: boot epoch {}",
        if restored { "with the saved" } else { "with a blank" },
        boot.epoch
    );
    // The device lives in a static (counted in the build's RAM), not on the stack.
    let slot = cortex_m::singleton!(: Option<Unit> = None).ok_or("device slot taken")?;
    let unit = Device::new_in(
        slot,
        config(&key)?,
        BootState { epoch: boot.epoch, last_command_counter: boot.command_counter },
    )
    .map_err(|_| "new")?;
    hprintln!("self-test: device state {} bytes", core::mem::size_of::<Unit>());
    sensors(unit)?;
    let mut buf = [0u8; BATCH_BYTES];
    let (len, seq) = seal(unit, 0, 20, &mut buf)?;
    let opened = open_batch(&mut buf[..len], &key).map_err(|_| "open")?;
    let mut samples = 0;
    for series in opened.series() {
        for s in series.map_err(|_| "series")?.samples().ok_or("samples")? {
            s.map_err(|_| "sample")?;
            samples += 1;
        }
    }
    if samples != 24 {
        return Err("batch does not hold the 24 readings");
    }
    hprintln!("self-test: sealed batch ({}, {}) of {} bytes, opened: {} readings", boot.epoch, seq, len, samples);
    let mut ack = [0u8; 128];
    let mut nonce = [0u8; 12];
    nonce[0] = 0x02;
    nonce[11] = 1;
    let n =
        control::seal_ack(&mut ack, &key, "gw-1", 1, nonce, &[AckRange { epoch: boot.epoch, first: seq, count: 1 }])
            .map_err(|_| "seal ack")?;
    let mut replay = ack;
    let outcome = unit.handle_ack(&mut ack[..n]).map_err(|_| "ack")?;
    if outcome.samples != 24 || !unit.is_idle() {
        return Err("the ack did not release the batch");
    }
    // The same ack again (a replay): refused by its counter, and counted.
    match unit.handle_ack(&mut replay[..n]) {
        Err(ControlError::Replayed) => {}
        _ => return Err("a replayed ack was not refused as a replay"),
    }
    if unit.stats().acks_replayed != 1 {
        return Err("the replayed ack was not counted");
    }
    hprintln!("self-test: ack released {} readings; its replay refused and counted", outcome.samples);
    // Reboot: the store hands out the next epoch; it starts at seq 0 and its
    // batches are new ones.
    let second = store.next_boot().map_err(|_| "reboot")?;
    if second.epoch <= boot.epoch {
        return Err("the epoch did not grow across a reboot");
    }
    let state = BootState { epoch: second.epoch, last_command_counter: second.command_counter };
    let rebooted = Device::new_in(slot, config(&key)?, state).map_err(|_| "reboot")?;
    let (len, seq) = seal(rebooted, 60_000, 5, &mut buf)?;
    let header = fleetline_device::wire::peek_header(&buf[..len]).map_err(|_| "header")?;
    if header.epoch != second.epoch || seq != 0 {
        return Err("after a reboot batches must come from the new epoch");
    }
    hprintln!("self-test: rebooted into epoch {}, first batch seq {}", header.epoch, seq);
    // The flash kept every write on the host as it happened.
    drop(store.release());
    hprintln!("self-test: flash image kept; last epoch {}; stack {} bytes", second.epoch, board::stack_used());
    Ok(())
}

#[entry]
fn main() -> ! {
    match self_test() {
        Ok(()) => {
            hprintln!("self-test: passed");
            debug::exit(debug::EXIT_SUCCESS);
        }
        Err(e) => {
            hprintln!("self-test: FAILED: {}", e);
            debug::exit(debug::EXIT_FAILURE);
        }
    }
    loop {}
}
