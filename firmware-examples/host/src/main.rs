//! A vehicle unit's firmware on a host: the firmware's main loop
//! (`fleetline_unit_app::unit::Unit`, the same code the Cortex-M build runs)
//! with a TCP socket to the gateway as its link, simulated peripherals behind
//! the `embedded-hal`/`embedded-io` traits its drivers take, a file as its
//! flash and a thread as its watchdog.
//!
//! ```sh
//! fleetline-unit-host --gateway 127.0.0.1:1883 --fleet acme --device dev-0000 \
//!     --key-file dev-0000.key --flash dev-0000.flash
//! ```
//!
//! It prints one JSON line per event on stdout (`booted` with the boot
//! epoch, `connected`, `disconnected` and why, `acked` per batch the gateway
//! holds durably, `command`, `watchdog_reset`) and a `stats` line every two
//! seconds. Killing the process is the unit's power cut: the next run boots
//! with a larger epoch from the flash file, and readings not yet acked are
//! gone with the RAM, as on the unit.
//!
//! `FLEETLINE_UNIT_FAULT=hang-after-ms=N` stops the loop after N ms, without
//! feeding the watchdog, to show the reset.

mod board;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use fleetline_device::wire::{DeviceId, DeviceKey, FleetId};
use fleetline_device::{Config, FlushPolicy, OutboxFull};
use fleetline_unit_app::sim;
use fleetline_unit_app::unit::{Clock, Event, Parts, Settings, Unit};
use fleetline_unit_drivers::fuel::Calibration;
use serde_json::json;

/// The sizes the Cortex-M build is budgeted for.
const SAMPLES: usize = 60;
const BATCH_BYTES: usize = 1024;
const OUTBOX: usize = 8;

struct Args {
    gateway: std::net::SocketAddr,
    fleet: String,
    device: String,
    key_file: PathBuf,
    flash: PathBuf,
    seed: u64,
    watchdog_ms: u64,
    max_age_ms: u32,
    resend_after_ms: u32,
    tpms_every_ms: u32,
    fuel_every_ms: u32,
    garble_every: u64,
}

const USAGE: &str = "usage: fleetline-unit-host --gateway HOST:PORT --fleet ID --device ID --key-file PATH --flash PATH \
[--seed N] [--watchdog-ms 8000] [--max-age-ms 2000] [--resend-after-ms 5000] [--tpms-every-ms 5000] \
[--fuel-every-ms 10000] [--garble-every 50]";

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut kv = std::collections::BTreeMap::new();
    while let Some(k) = it.next() {
        let Some(name) = k.strip_prefix("--") else { return Err(format!("unexpected argument {k}")) };
        let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        kv.insert(name.to_string(), v);
    }
    let mut take = |k: &str| kv.remove(k);
    let num = |v: Option<String>, d: u64, k: &str| -> Result<u64, String> {
        v.map_or(Ok(d), |s| s.parse().map_err(|_| format!("--{k}: not a number: {s}")))
    };
    let need = |v: Option<String>, k: &str| v.ok_or_else(|| format!("--{k} is required"));
    let device = need(take("device"), "device")?;
    let seed_default = device.bytes().fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b))) % 1000;
    let args = Args {
        gateway: need(take("gateway"), "gateway")?.parse().map_err(|e| format!("--gateway: {e}"))?,
        fleet: need(take("fleet"), "fleet")?,
        device,
        key_file: need(take("key-file"), "key-file")?.into(),
        flash: need(take("flash"), "flash")?.into(),
        seed: num(take("seed"), seed_default, "seed")?,
        watchdog_ms: num(take("watchdog-ms"), 8_000, "watchdog-ms")?,
        max_age_ms: num(take("max-age-ms"), 2_000, "max-age-ms")? as u32,
        resend_after_ms: num(take("resend-after-ms"), 5_000, "resend-after-ms")? as u32,
        tpms_every_ms: num(take("tpms-every-ms"), 5_000, "tpms-every-ms")? as u32,
        fuel_every_ms: num(take("fuel-every-ms"), 10_000, "fuel-every-ms")? as u32,
        garble_every: num(take("garble-every"), 50, "garble-every")?,
    };
    if let Some(k) = kv.keys().next() {
        return Err(format!("unknown option --{k}"));
    }
    Ok(args)
}

fn emit(v: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn event_json(e: Event) -> serde_json::Value {
    match e {
        Event::Connected => json!({"event": "connected"}),
        Event::Disconnected(why) => json!({"event": "disconnected", "why": format!("{why:?}")}),
        Event::Refused(code) => json!({"event": "refused", "code": format!("{code:?}")}),
        Event::Acked(r) => {
            json!({"event": "acked", "epoch": r.epoch, "seq": r.seq, "samples": r.samples, "sends": r.sends})
        }
        Event::Command(counter) => json!({"event": "command", "counter": counter}),
    }
}

fn run(args: Args) -> Result<(), String> {
    let key_text = std::fs::read_to_string(&args.key_file).map_err(|e| format!("{}: {e}", args.key_file.display()))?;
    let key = DeviceKey::from_hex(key_text.trim()).map_err(|e| format!("{}: {e}", args.key_file.display()))?;
    let device = Config {
        fleet: FleetId::new(&args.fleet).map_err(|e| format!("--fleet: {e}"))?,
        device: DeviceId::new(&args.device).map_err(|e| format!("--device: {e}"))?,
        key,
        flush: FlushPolicy { max_samples: SAMPLES as u16, max_bytes: BATCH_BYTES as u16, max_age_ms: args.max_age_ms },
        resend_after_ms: args.resend_after_ms,
        when_full: OutboxFull::DropOldest,
    };
    let settings = Settings {
        device,
        keep_alive_s: 30,
        connect_timeout_ms: 5_000,
        backoff_initial_ms: 200,
        backoff_max_ms: 5_000,
        tpms_every_ms: args.tpms_every_ms,
        fuel_every_ms: args.fuel_every_ms,
        fuel_calibration: Calibration::new(&[(400, 0.0), (1_600, 100.0), (3_600, 400.0)])
            .map_err(|e| format!("calibration: {e:?}"))?,
    };
    let flash = board::FileFlash::open(&args.flash).map_err(|e| format!("{}: {e}", args.flash.display()))?;
    let watchdog_period = Duration::from_millis(args.watchdog_ms);
    let seed = args.seed as u32;
    let parts = Parts {
        gps_uart: sim::GpsUart::new(board::unix_s, seed, args.garble_every as u32),
        tpms_i2c: sim::TpmsBus::new(board::unix_s, seed),
        fuel_adc: sim::FuelAdc::new(board::unix_s, seed),
        flash,
        watchdog: board::ThreadWatchdog::start(watchdog_period),
        link: board::TcpLink::new(args.gateway, Duration::from_secs(2), Duration::from_secs(2)),
    };
    let mut clock = board::MonoClock(Instant::now());
    let mut slot = Box::new(None);
    let unit =
        Unit::<_, _, _, _, _, _, SAMPLES, BATCH_BYTES, OUTBOX>::start_in(&mut slot, parts, settings, clock.now_ms())
            .map_err(|e| format!("start: {e:?}"))?;
    emit(json!({"event": "booted", "epoch": unit.device().epoch(),
        "last_command_counter": unit.device().last_command_counter(),
        "state_bytes": std::mem::size_of_val(unit)}));
    let hang_after = std::env::var("FLEETLINE_UNIT_FAULT")
        .ok()
        .and_then(|f| f.strip_prefix("hang-after-ms=").and_then(|n| n.parse::<u64>().ok()));
    let mut next_stats = 0;
    loop {
        let now = clock.now_ms();
        if hang_after.is_some_and(|h| now >= h) {
            emit(json!({"event": "hang"}));
            // A loop stuck in a driver: the watchdog is not fed.
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        let wake = unit.poll(now, |e| emit(event_json(e)));
        if now >= next_stats {
            next_stats = now + 2_000;
            let (d, u) = (unit.device().stats(), unit.stats());
            emit(json!({"event": "stats", "epoch": unit.device().epoch(), "connected": unit.is_connected(),
                "recorded": d.readings_recorded, "sealed": d.batches_sealed, "acked": d.batches_acked,
                "samples_acked": d.samples_acked, "resends": d.resends, "dropped": d.batches_dropped,
                "outbox": unit.device().outbox_len(), "dials": u.dials, "sessions": u.sessions, "drops": u.drops,
                "pubacks": u.pubacks, "no_time": u.no_time, "control_refused": u.control_refused,
                "acks_replayed": d.acks_replayed, "commands_replayed": d.commands_replayed,
                "acks_invalid": d.acks_invalid, "protocol_errors": u.protocol_errors,
                "rx_oversized": unit.rx_stats().oversized, "persist_errors": u.persist_errors,
                "last_command_counter": unit.device().last_command_counter(), "readings_refused": u.readings_refused,
                "gps_checksum_errors": unit.gps_stats().checksum_errors, "gps_fixes": unit.gps_stats().fixes,
                "tpms_readings": unit.tpms_stats().readings, "fuel_readings": unit.fuel_stats().readings}));
        }
        // No interrupts on a host: the socket is polled, at most 5 ms apart.
        let sleep = wake.saturating_sub(clock.now_ms()).clamp(1, 5);
        std::thread::sleep(Duration::from_millis(sleep));
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetline-unit-host: {e}");
            ExitCode::from(1)
        }
    }
}
