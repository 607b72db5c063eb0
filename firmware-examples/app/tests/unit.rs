//! The unit's main loop against a scripted broker on a fake link, on a
//! clock the test moves: a session end to end, and the peers a unit meets in
//! the field — one that sends garbage, one that never answers, one that
//! refuses, one that swallows everything — each a drop, a count and a
//! redial with backoff, never a panic or a wedged loop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use embedded_hal::i2c::{ErrorType as I2cErrorType, I2c, Operation};
use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash};
use fleetline_device::wire::control::{AckRange, Command, seal_ack, seal_command};
use fleetline_device::wire::{DeviceId, DeviceKey, FleetId, open_batch};
use fleetline_device::{Config, FlushPolicy, OutboxFull};
use fleetline_unit_app::mqtt::Refused;
use fleetline_unit_app::unit::{Drop, Event, Link, Parts, Settings, Unit, Watchdog};
use fleetline_unit_drivers::fuel::{AdcChannel, Calibration};
use fleetline_unit_drivers::persist::BootStore;

// --- Fake peripherals.

/// NMEA bytes queued by the test.
#[derive(Default, Clone)]
struct Uart(Rc<RefCell<VecDeque<u8>>>);

impl embedded_io::ErrorType for Uart {
    type Error = std::convert::Infallible;
}
impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        Ok(!self.0.borrow().is_empty())
    }
}
impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let mut q = self.0.borrow_mut();
        let n = buf.len().min(q.len());
        for (d, s) in buf.iter_mut().zip(q.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

fn nmea(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("${body}*{sum:02X}\r\n")
}

/// A fix at 2026-11-28 10:00:`s` UTC.
fn fix(s: u32) -> String {
    nmea(&format!("GPRMC,1000{s:02}.000,A,5222.2000,N,00453.4000,E,20.0,90.0,281126,,,A"))
}

/// A bus where nothing answers (the receiver is not fitted).
struct NoTpms;
#[derive(Debug)]
struct Nack;
impl embedded_hal::i2c::Error for Nack {
    fn kind(&self) -> embedded_hal::i2c::ErrorKind {
        embedded_hal::i2c::ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address)
    }
}
impl I2cErrorType for NoTpms {
    type Error = Nack;
}
impl I2c for NoTpms {
    fn transaction(&mut self, _: u8, _: &mut [Operation<'_>]) -> Result<(), Nack> {
        Err(Nack)
    }
}

struct Adc;
impl AdcChannel for Adc {
    type Error = std::convert::Infallible;
    fn read(&mut self) -> Result<u16, Self::Error> {
        Ok(2_600)
    }
}

/// NOR flash in memory, shared with the test.
#[derive(Clone)]
struct Flash(Rc<RefCell<Vec<u8>>>);
#[derive(Debug)]
struct Bounds;
impl NorFlashError for Bounds {
    fn kind(&self) -> NorFlashErrorKind {
        NorFlashErrorKind::OutOfBounds
    }
}
impl ErrorType for Flash {
    type Error = Bounds;
}
impl ReadNorFlash for Flash {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Bounds> {
        let o = offset as usize;
        bytes.copy_from_slice(self.0.borrow().get(o..o + bytes.len()).ok_or(Bounds)?);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.0.borrow().len()
    }
}
impl NorFlash for Flash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 256;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), Bounds> {
        self.0.borrow_mut().get_mut(from as usize..to as usize).ok_or(Bounds)?.fill(0xff);
        Ok(())
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Bounds> {
        let o = offset as usize;
        let mut img = self.0.borrow_mut();
        for (d, s) in img.get_mut(o..o + bytes.len()).ok_or(Bounds)?.iter_mut().zip(bytes) {
            *d &= s;
        }
        Ok(())
    }
}

impl Flash {
    fn command_counter(&self) -> u64 {
        let mut store = BootStore::new(self.clone(), 0).unwrap();
        store.load().unwrap().map_or(0, |p| p.command_counter)
    }
}

#[derive(Clone, Default)]
struct Dog(Rc<RefCell<u32>>);
impl Watchdog for Dog {
    fn feed(&mut self) {
        *self.0.borrow_mut() += 1;
    }
}

/// The link: what the unit wrote, what the broker sends, whether a dial works.
#[derive(Default)]
struct Wire {
    up: bool,
    dial_fails: bool,
    dials: u32,
    written: Vec<u8>,
    to_unit: VecDeque<u8>,
    /// The command counter in flash at each PUBACK the unit wrote.
    counter_at_puback: Vec<u64>,
    flash: Option<Flash>,
}

#[derive(Clone, Default)]
struct FakeLink(Rc<RefCell<Wire>>);

#[derive(Debug)]
struct LinkDown;
impl embedded_io::Error for LinkDown {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::NotConnected
    }
}
impl embedded_io::ErrorType for FakeLink {
    type Error = LinkDown;
}
impl embedded_io::ReadReady for FakeLink {
    fn read_ready(&mut self) -> Result<bool, LinkDown> {
        let w = self.0.borrow();
        if !w.up {
            return Err(LinkDown);
        }
        Ok(!w.to_unit.is_empty())
    }
}
impl embedded_io::Read for FakeLink {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, LinkDown> {
        let mut w = self.0.borrow_mut();
        let n = buf.len().min(w.to_unit.len());
        for (d, s) in buf.iter_mut().zip(w.to_unit.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}
impl embedded_io::Write for FakeLink {
    fn write(&mut self, buf: &[u8]) -> Result<usize, LinkDown> {
        let mut w = self.0.borrow_mut();
        if !w.up {
            return Err(LinkDown);
        }
        if buf.first() == Some(&0x40) && buf.len() == 4 {
            let c = w.flash.as_ref().map_or(0, Flash::command_counter);
            w.counter_at_puback.push(c);
        }
        w.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), LinkDown> {
        Ok(())
    }
}
impl Link for FakeLink {
    fn dial(&mut self) -> Result<(), LinkDown> {
        let mut w = self.0.borrow_mut();
        w.dials += 1;
        if w.dial_fails {
            return Err(LinkDown);
        }
        w.up = true;
        w.written.clear();
        w.to_unit.clear();
        Ok(())
    }
    fn hang_up(&mut self) {
        self.0.borrow_mut().up = false;
    }
}

/// Client packets the unit wrote: (first byte, body).
fn packets(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let first = bytes[at];
        let (mut len, mut mul, mut i) = (0usize, 1usize, at + 1);
        loop {
            let b = bytes[i];
            len += usize::from(b & 0x7f) * mul;
            mul *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        out.push((first, bytes[i..i + len].to_vec()));
        at = i + len;
    }
    out
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut v = vec![first, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// A QoS 1 PUBLISH from the broker: the same bytes as the unit's own.
fn publish(topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 64];
    let n = fleetline_unit_app::mqtt::publish_header(&mut v, topic, id, false, payload.len()).unwrap();
    v.truncate(n);
    v.extend_from_slice(payload);
    v
}

type TestUnit = Unit<Uart, NoTpms, Adc, Flash, Dog, FakeLink, 16, 512, 4>;

struct Rig {
    unit: Box<Option<TestUnit>>,
    uart: Uart,
    link: FakeLink,
    flash: Flash,
    dog: Dog,
    key: DeviceKey,
    now: u64,
    events: Vec<Event>,
}

const KEEP_ALIVE_S: u16 = 4;

impl Rig {
    fn new() -> Self {
        let key = DeviceKey::from_bytes([9; 32]);
        let settings = Settings {
            device: Config {
                fleet: FleetId::new("acme").unwrap(),
                device: DeviceId::new("u-1").unwrap(),
                key: key.clone(),
                flush: FlushPolicy { max_samples: 16, max_bytes: 512, max_age_ms: 1_000 },
                resend_after_ms: 5_000,
                when_full: OutboxFull::DropOldest,
            },
            keep_alive_s: KEEP_ALIVE_S,
            connect_timeout_ms: 2_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 1_600,
            tpms_every_ms: 1_000,
            fuel_every_ms: 1_000,
            fuel_calibration: Calibration::new(&[(400, 0.0), (3_600, 400.0)]).unwrap(),
        };
        let (uart, link, dog) = (Uart::default(), FakeLink::default(), Dog::default());
        let flash = Flash(Rc::new(RefCell::new(vec![0xff; 1024])));
        link.0.borrow_mut().flash = Some(flash.clone());
        let parts = Parts {
            gps_uart: uart.clone(),
            tpms_i2c: NoTpms,
            fuel_adc: Adc,
            flash: flash.clone(),
            watchdog: dog.clone(),
            link: link.clone(),
        };
        let mut unit = Box::new(None);
        Unit::start_in(&mut unit, parts, settings, 0).unwrap();
        Self { unit, uart, link, flash, dog, key, now: 0, events: Vec::new() }
    }

    fn unit(&mut self) -> &mut TestUnit {
        self.unit.as_mut().as_mut().unwrap()
    }

    /// Polls every 10 ms for `ms`.
    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += 10;
            let now = self.now;
            let mut events = Vec::new();
            self.unit().poll(now, |e| events.push(e));
            self.events.extend(events);
        }
    }

    fn written(&self) -> Vec<(u8, Vec<u8>)> {
        packets(&self.link.0.borrow().written)
    }

    fn send(&self, bytes: &[u8]) {
        self.link.0.borrow_mut().to_unit.extend(bytes.iter().copied());
    }

    fn gps(&self, s: u32) {
        self.uart.0.borrow_mut().extend(fix(s).bytes());
    }

    /// CONNACK and SUBACK for the unit's CONNECT and SUBSCRIBE on its next dial.
    fn accept(&mut self) {
        let dials = self.link.0.borrow().dials;
        let deadline = self.now + 10_000;
        while self.link.0.borrow().dials == dials || !self.link.0.borrow().up {
            assert!(self.now < deadline, "the unit dials again");
            self.run(10);
        }
        self.run(10);
        let w = self.written();
        assert_eq!(w.first().map(|p| p.0), Some(0x10), "CONNECT first: {w:?}");
        self.send(&frame(0x20, &[0, 0]));
        self.run(20);
        let sub = self
            .written()
            .into_iter()
            .find(|p| p.0 == 0x82)
            .unwrap_or_else(|| panic!("SUBSCRIBE after CONNACK: {:?} {:?}", self.written(), self.events));
        self.send(&frame(0x90, &[sub.1[0], sub.1[1], 1, 1]));
        self.run(20);
        assert!(self.unit().is_connected());
    }

    fn drops(&self) -> Vec<Drop> {
        self.events.iter().filter_map(|e| if let Event::Disconnected(d) = e { Some(*d) } else { None }).collect()
    }
}

#[test]
fn a_session_publishes_sealed_batches_and_an_ack_releases_them() {
    let mut rig = Rig::new();
    rig.accept();
    let connect = &rig.written()[0].1;
    assert_eq!(&connect[..7], b"\0\x04MQTT\x04", "MQTT 3.1.1");
    assert_eq!(connect[7], 0xc2, "username, password, clean session");
    for s in 0..3 {
        rig.gps(s);
        rig.run(400);
    }
    rig.run(1_200);
    let pubs: Vec<_> = rig.written().into_iter().filter(|p| p.0 & 0xf0 == 0x30).collect();
    assert!(!pubs.is_empty(), "a batch was published");
    let body = &pubs[0].1;
    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    assert_eq!(&body[2..2 + tlen], b"fleetline/v1/acme/u-1/up");
    assert_eq!(pubs[0].0, 0x32, "QoS 1");
    let id = [body[2 + tlen], body[3 + tlen]];
    let mut sealed = body[4 + tlen..].to_vec();
    let opened = open_batch(&mut sealed, &rig.key).unwrap();
    let (epoch, seq) = (opened.header.epoch, opened.header.seq);
    assert_eq!(epoch, 1, "the first boot's epoch, from flash");
    rig.send(&frame(0x40, &id));
    let mut ack = [0u8; 256];
    let n = seal_ack(&mut ack, &rig.key, "gw-0", 1, nonce(1), &[AckRange { epoch, first: seq, count: 1 }]).unwrap();
    rig.send(&publish("fleetline/v1/acme/u-1/ack", 5, &ack[..n]));
    rig.run(50);
    assert!(rig.events.iter().any(|e| matches!(e, Event::Acked(r) if r.seq == seq)), "{:?}", rig.events);
    // The ack's QoS 1 publish is acknowledged.
    assert!(rig.written().iter().any(|p| p.0 == 0x40 && p.1 == [0, 5]));
    assert!(rig.unit().stats().pubacks >= 1);
    let polls = rig.unit().stats().polls;
    assert_eq!(u64::from(*rig.dog.0.borrow()), polls, "the watchdog is fed every turn of the loop");
}

fn nonce(n: u64) -> [u8; 12] {
    let mut x = [0u8; 12];
    x[0] = 0x02;
    x[4..].copy_from_slice(&n.to_le_bytes());
    x
}

#[test]
fn a_command_counter_is_in_flash_before_its_puback_and_a_replay_is_refused() {
    let mut rig = Rig::new();
    rig.accept();
    let mut cmd = [0u8; 256];
    let n = seal_command(&mut cmd, &rig.key, "cloud", 42, nonce(2), &Command::FlushNow).unwrap();
    rig.send(&publish("fleetline/v1/acme/u-1/cmd", 7, &cmd[..n]));
    rig.run(30);
    assert!(rig.events.contains(&Event::Command(42)));
    assert_eq!(rig.link.0.borrow().counter_at_puback, [42], "the counter was written before the PUBACK");
    rig.send(&publish("fleetline/v1/acme/u-1/cmd", 8, &cmd[..n]));
    rig.run(30);
    assert_eq!(rig.events.iter().filter(|e| matches!(e, Event::Command(_))).count(), 1);
    assert_eq!(rig.unit().device().stats().commands_replayed, 1);
    assert_eq!(rig.unit().stats().control_refused, 1);
    assert_eq!(rig.flash.command_counter(), 42);
}

#[test]
fn garbage_from_the_peer_drops_the_connection_and_redials_with_growing_backoff() {
    let mut rig = Rig::new();
    let mut dial_times = Vec::new();
    for _ in 0..4 {
        rig.run(10);
        while rig.link.0.borrow().dials as usize == dial_times.len() {
            rig.run(10);
        }
        dial_times.push(rig.now);
        // A reserved packet type, then noise.
        rig.send(&[0xf0, 0x00, 0xde, 0xad]);
        rig.run(10);
    }
    assert_eq!(rig.drops(), [Drop::Protocol; 4]);
    assert_eq!(rig.unit().stats().protocol_errors, 4);
    let gaps: Vec<u64> = dial_times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "backoff grows: {gaps:?}");
    assert!(gaps[0] >= 100, "{gaps:?}");
}

#[test]
fn a_broker_that_never_answers_or_refuses_is_dropped_and_counted() {
    let mut rig = Rig::new();
    rig.run(2_100);
    assert_eq!(rig.drops(), [Drop::Timeout], "no CONNACK in the connect timeout");
    rig.run(500);
    rig.send(&frame(0x20, &[0, 4]));
    rig.run(20);
    assert!(rig.events.contains(&Event::Refused(Refused::Credentials)), "{:?}", rig.events);
    assert_eq!(rig.drops().last(), Some(&Drop::Refused));
    // A SUBACK refusing a topic (an ACL that does not let the unit read its acks).
    let mut rig = Rig::new();
    rig.run(20);
    rig.send(&frame(0x20, &[0, 0]));
    rig.run(20);
    let sub = rig.written().into_iter().find(|p| p.0 == 0x82).unwrap();
    rig.send(&frame(0x90, &[sub.1[0], sub.1[1], 1, 0x80]));
    rig.run(20);
    assert_eq!(rig.drops(), [Drop::Refused]);
    assert_eq!(rig.unit().stats().refusals, 1);
}

#[test]
fn a_link_that_swallows_publishes_is_dropped_and_the_batches_sent_again() {
    let mut rig = Rig::new();
    rig.accept();
    for s in 0..8 {
        rig.gps(s);
        rig.run(1_000);
    }
    // PUBACKs never come: the session is declared dead within the keep-alive.
    let owed_from = rig.now - 8_000;
    rig.run(u64::from(KEEP_ALIVE_S) * 1000);
    assert!(rig.drops().contains(&Drop::Timeout), "{:?} since {owed_from}", rig.events);
    // Nothing was lost: the unit redials and the held batches go out again.
    let held = rig.unit().device().outbox_len();
    assert!(held > 0);
    rig.run(300);
    rig.accept();
    rig.run(50);
    let pubs = rig.written().into_iter().filter(|p| p.0 & 0xf0 == 0x30).count();
    assert!(pubs >= held.min(4), "{pubs} publishes after the redial, {held} held");
}

#[test]
fn a_dial_that_fails_is_retried_and_the_loop_keeps_reading_sensors() {
    let mut rig = Rig::new();
    rig.link.0.borrow_mut().dial_fails = true;
    for s in 0..5 {
        rig.gps(s);
        rig.run(1_000);
    }
    assert!(rig.drops().iter().all(|d| *d == Drop::Dial) && rig.drops().len() >= 3, "{:?}", rig.drops());
    let d = *rig.unit().device().stats();
    assert!(d.readings_recorded >= 5 * 4, "GPS and fuel readings kept coming: {d:?}");
    assert!(d.batches_sealed >= 1, "batches sealed while offline");
    assert!(rig.unit().stats().tpms_errors > 0, "the missing tire receiver is counted");
}
