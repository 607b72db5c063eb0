//! A `#![no_std]`, `#![no_main]` program that runs the device SDK core and sealing
//! on the host. If anything it uses pulled in `std`, linking would fail with a
//! duplicate `panic_impl` lang item; if the core misbehaves, it exits non-zero.

#![no_std]
#![no_main]

use core::panic::PanicInfo;

use fleetline_device::wire::control::{self, AckRange};
use fleetline_device::wire::signals::kind;
use fleetline_device::wire::{DeviceId, DeviceKey, FleetId, open_batch};
use fleetline_device::{BootState, Config, Device, FlushPolicy, OutboxFull, Reading};

// The C runtime provides `_start`, which calls `main` below, and `exit`.
#[link(name = "c")]
unsafe extern "C" {}

// The prebuilt `core` for this host target is compiled with unwinding and refers to
// the personality routine; with `panic = "abort"` it is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}

fn run() -> Result<(), u8> {
    let key = DeviceKey::from_bytes([3; 32]);
    let cfg = Config {
        fleet: FleetId::new("acme").map_err(|_| 2)?,
        device: DeviceId::new("mcu-1").map_err(|_| 2)?,
        key: key.clone(),
        flush: FlushPolicy { max_samples: 16, max_bytes: 256, max_age_ms: 1_000 },
        resend_after_ms: 5_000,
        when_full: OutboxFull::DropOldest,
    };
    let mut dev: Device<16, 256, 2> =
        Device::new(cfg, BootState { epoch: 1, last_command_counter: 0 }).map_err(|_| 3)?;
    for i in 0..10u64 {
        let r = Reading { kind: kind::SPEED, time_ms: 1_790_000_000_000 + i * 1000, value: 30.0 + i as f64 };
        dev.record(i * 1000, r).map_err(|_| 4)?;
    }
    // Sealed by age on the next poll.
    let mut copy = [0u8; 256];
    let (len, seq) = {
        let tx = dev.poll_transmit(10_000).ok_or(5)?;
        copy[..tx.payload.len()].copy_from_slice(tx.payload);
        (tx.payload.len(), tx.seq)
    };
    // The gateway's side, also without std: open, count samples, ack.
    let opened = open_batch(&mut copy[..len], &key).map_err(|_| 6)?;
    let mut samples = 0;
    for series in opened.series() {
        for s in series.map_err(|_| 7)?.samples().ok_or(7)? {
            s.map_err(|_| 7)?;
            samples += 1;
        }
    }
    if samples != 10 {
        return Err(8);
    }
    let mut ack = [0u8; 128];
    let mut nonce = [0u8; 12];
    nonce[0] = 0x02;
    nonce[11] = 1;
    let n = control::seal_ack(&mut ack, &key, "gw-1", 1, nonce, &[AckRange { epoch: 1, first: seq, count: 1 }])
        .map_err(|_| 9)?;
    let outcome = dev.handle_ack(&mut ack[..n]).map_err(|_| 10)?;
    if outcome.samples != 10 || !dev.is_idle() {
        return Err(11);
    }
    Ok(())
}

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    match run() {
        Ok(()) => 0,
        Err(code) => i32::from(code),
    }
}
