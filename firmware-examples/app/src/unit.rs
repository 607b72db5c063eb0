//! The unit's main loop: sensors in, the SDK's device state in the middle,
//! MQTT over a link out, the watchdog fed while the loop turns.
//!
//! One [`Unit::poll`] does a bounded amount of work and never waits: it takes
//! what the GPS receiver's UART holds, reads the tire receiver and the fuel
//! gauge when they are due, seals and publishes due batches, takes what the
//! broker sent (acks release batches, commands are applied and their counter
//! written to flash before they are acknowledged), keeps the connection alive
//! and redials with backoff when it is lost, and feeds the watchdog last. A
//! loop that stops turning — a link write that hangs, a bus that never
//! answers — is not fed, and the watchdog resets the unit; the boot store
//! then hands out the next epoch, so nothing sealed after the reset reuses a
//! nonce.
//!
//! Time: readings carry the GPS receiver's UTC time (the `RMC` sentence's date
//! and time, carried forward on the loop's monotonic clock between fixes);
//! until the first fix, sensor readings are not taken and are counted.

use embedded_hal::i2c::I2c;
use embedded_io::{Read, ReadReady, Write};
use embedded_storage::nor_flash::NorFlash;
use fleetline_device::wire::control::MAX_ACK_LEN;
use fleetline_device::wire::signals::{SignalKind, kind};
use fleetline_device::{BootState, Config, ConfigError, ControlError, Device, Reading, Released};
use fleetline_unit_drivers::fuel::{AdcChannel, Calibration, FuelGauge};
use fleetline_unit_drivers::gps::{Fix, Gps};
use fleetline_unit_drivers::persist::{BootStore, PersistError};
use fleetline_unit_drivers::tpms::{self, MAX_WHEELS, Tpms};

use crate::mqtt::{self, Packet, Receiver};

/// The unit's watchdog. `embedded-hal` 1.0 has no watchdog trait: this is
/// the one operation the loop needs. Started before the loop, by the platform.
pub trait Watchdog {
    /// Restarts the countdown.
    fn feed(&mut self);
}

/// The loop's monotonic clock: milliseconds since power-up, never going back.
pub trait Clock {
    /// Now.
    fn now_ms(&mut self) -> u64;
}

/// A byte stream to the gateway's broker: a TCP socket of an IP stack, or a
/// modem's data mode behind its UART. `read` is called only when
/// `read_ready` says it will not wait, and returning 0 means the peer closed.
pub trait Link: Read + Write + ReadReady {
    /// Opens a connection (dropping any before). May take the platform's
    /// connect timeout; the watchdog's period must exceed it.
    fn dial(&mut self) -> Result<(), Self::Error>;
    /// Drops the connection.
    fn hang_up(&mut self);
}

/// Receive buffer: the largest ack the gateway sends, its topic and header.
pub const RX_BYTES: usize = MAX_ACK_LEN + 128;

/// QoS 1 publishes sent and not yet acknowledged by the broker, at most.
const MAX_INFLIGHT: u8 = 4;

/// Reads of the link in one poll, at most (the sensors must keep their turn).
const READS_PER_POLL: usize = 4;

/// What the unit runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The SDK's configuration (fleet, device, key, flush and resend policy).
    pub device: Config,
    /// MQTT keep-alive, seconds.
    pub keep_alive_s: u16,
    /// Connect, CONNACK and SUBACK must come within this, ms.
    pub connect_timeout_ms: u32,
    /// First redial delay, ms; doubled per failure up to `backoff_max_ms`.
    pub backoff_initial_ms: u32,
    /// Longest redial delay, ms.
    pub backoff_max_ms: u32,
    /// Tire receiver read period, ms.
    pub tpms_every_ms: u32,
    /// Fuel gauge read period, ms.
    pub fuel_every_ms: u32,
    /// The tank's calibration.
    pub fuel_calibration: Calibration,
}

/// The unit's hardware, as the loop sees it.
pub struct Parts<U, I, A, F, W, L> {
    /// The GPS receiver's UART.
    pub gps_uart: U,
    /// The bus of the tire receiver (at [`tpms::ADDRESS`]).
    pub tpms_i2c: I,
    /// The fuel sender's ADC channel.
    pub fuel_adc: A,
    /// The flash region of the boot store (two erase sectors from offset 0).
    pub flash: F,
    /// The watchdog, started.
    pub watchdog: W,
    /// The link to the gateway.
    pub link: L,
}

/// Why the unit cannot start.
#[derive(Debug)]
pub enum StartError {
    /// The boot store failed: without a fresh epoch no batch may be sealed.
    Persist(PersistError),
    /// The SDK refused the configuration.
    Config(ConfigError),
}

/// Something the platform may log or show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The broker accepted the connection and the subscriptions.
    Connected,
    /// The connection was dropped, and why.
    Disconnected(Drop),
    /// The broker refused the connection (CONNACK's code).
    Refused(mqtt::Refused),
    /// An ack released a batch: the gateway holds it durably.
    Acked(Released),
    /// A command was applied; its counter is in flash.
    Command(u64),
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Dialling failed.
    Dial,
    /// The peer closed it.
    Closed,
    /// A read or write failed.
    Io,
    /// The broker sent something this client does not take.
    Protocol,
    /// No CONNACK, SUBACK or PINGRESP in time.
    Timeout,
    /// The broker refused the connection or a subscription.
    Refused,
}

/// Counters of the loop (the drivers and the SDK keep their own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnitStats {
    /// Loop turns.
    pub polls: u64,
    /// Dials attempted.
    pub dials: u32,
    /// Sessions that reached subscribed.
    pub sessions: u32,
    /// Connections dropped, by any cause.
    pub drops: u32,
    /// Of which: timeouts.
    pub timeouts: u32,
    /// Of which: protocol errors.
    pub protocol_errors: u32,
    /// CONNACKs or SUBACKs refusing.
    pub refusals: u32,
    /// QoS 1 publishes acknowledged by the broker.
    pub pubacks: u64,
    /// Messages on topics this unit did not subscribe to.
    pub stray_messages: u32,
    /// Acks and commands refused by the SDK (invalid or replayed; the SDK's
    /// stats say which).
    pub control_refused: u32,
    /// Failed writes of the command counter to flash.
    pub persist_errors: u32,
    /// Sensor readings not taken because the unit has no time yet.
    pub no_time: u32,
    /// Readings the SDK refused (invalid, back-pressure; its stats say which).
    pub readings_refused: u32,
    /// Tire receiver errors (bus, garbage, not found).
    pub tpms_errors: u32,
    /// Fuel gauge errors.
    pub fuel_errors: u32,
    /// GPS UART errors.
    pub gps_errors: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    Down { retry_at: u64 },
    Connecting { since: u64 },
    Subscribing { since: u64, id: u16 },
    Up,
}

/// UTC from the GPS fix, carried on the monotonic clock.
#[derive(Clone, Copy, Debug)]
struct TimeBase {
    unix_ms: u64,
    at_ms: u64,
}

/// A unit: `S` samples per batch, `B`-byte sealed batches, `O` in the outbox.
pub struct Unit<U, I, A, F, W, L, const S: usize, const B: usize, const O: usize> {
    device: Device<S, B, O>,
    settings: Settings,
    gps: Gps<U>,
    tpms: TpmsSlot<I>,
    fuel: FuelGauge<A>,
    store: BootStore<F>,
    watchdog: W,
    link: L,
    rx: Receiver<RX_BYTES>,
    net: Net,
    backoff_ms: u32,
    next_id: u16,
    inflight: u8,
    /// When the oldest publish still without a PUBACK was sent (or the last
    /// PUBACK came, while more are owed).
    owed_since: Option<u64>,
    last_sent_ms: u64,
    ping_since: Option<u64>,
    time: Option<TimeBase>,
    next_tpms_ms: u64,
    next_fuel_ms: u64,
    stats: UnitStats,
}

/// The tire receiver, or its bus while the receiver has not answered.
enum TpmsSlot<I> {
    Found(Tpms<I>),
    /// `None` only for the moment of a probe.
    Missing(Option<I>),
}

impl<U, I, A, F, W, L, const S: usize, const B: usize, const O: usize> Unit<U, I, A, F, W, L, S, B, O>
where
    U: Read + ReadReady,
    I: I2c,
    A: AdcChannel,
    F: NorFlash,
    W: Watchdog,
    L: Link,
{
    /// Powers up into `slot`: the next boot epoch from flash (written before
    /// it is used), the SDK's state for this boot, the drivers on their buses.
    /// The tire receiver is probed now and again at each read until it answers.
    ///
    /// Built in place: a unit is kilobytes (the outbox), and a microcontroller
    /// whose stack had to hold it twice over at power-up would need RAM for
    /// nothing else. `slot` is typically a static.
    pub fn start_in(
        slot: &mut Option<Self>,
        parts: Parts<U, I, A, F, W, L>,
        settings: Settings,
        now_ms: u64,
    ) -> Result<&mut Self, StartError> {
        let mut store = BootStore::new(parts.flash, 0).map_err(StartError::Persist)?;
        let boot = store.next_boot().map_err(StartError::Persist)?;
        let device = Device::new(
            settings.device.clone(),
            BootState { epoch: boot.epoch, last_command_counter: boot.command_counter },
        )
        .map_err(StartError::Config)?;
        let unit = slot.insert(Self {
            device,
            gps: Gps::new(parts.gps_uart),
            tpms: TpmsSlot::Missing(Some(parts.tpms_i2c)),
            fuel: FuelGauge::new(parts.fuel_adc, settings.fuel_calibration),
            store,
            watchdog: parts.watchdog,
            link: parts.link,
            rx: Receiver::default(),
            net: Net::Down { retry_at: now_ms },
            backoff_ms: settings.backoff_initial_ms.max(1),
            next_id: 1,
            inflight: 0,
            owed_since: None,
            last_sent_ms: now_ms,
            ping_since: None,
            time: None,
            next_tpms_ms: now_ms,
            next_fuel_ms: now_ms,
            stats: UnitStats::default(),
            settings,
        });
        unit.probe_tpms();
        Ok(unit)
    }

    /// The SDK's device state (epoch, outbox, its stats).
    pub fn device(&self) -> &Device<S, B, O> {
        &self.device
    }

    /// The loop's counters.
    pub fn stats(&self) -> &UnitStats {
        &self.stats
    }

    /// The GPS driver's counters.
    pub fn gps_stats(&self) -> fleetline_unit_drivers::gps::GpsStats {
        self.gps.stats()
    }

    /// The tire driver's counters (zero until the receiver answered).
    pub fn tpms_stats(&self) -> tpms::TpmsStats {
        match &self.tpms {
            TpmsSlot::Found(t) => t.stats(),
            TpmsSlot::Missing(_) => tpms::TpmsStats::default(),
        }
    }

    /// The MQTT receiver's counters (oversized packets skipped).
    pub fn rx_stats(&self) -> mqtt::ReceiverStats {
        self.rx.stats()
    }

    /// The fuel gauge's counters.
    pub fn fuel_stats(&self) -> fleetline_unit_drivers::fuel::FuelStats {
        self.fuel.stats()
    }

    /// Whether a session is up (connected and subscribed).
    pub fn is_connected(&self) -> bool {
        self.net == Net::Up
    }

    /// UTC now, Unix ms, once the GPS has given a fix with a time.
    pub fn unix_ms(&self, now_ms: u64) -> Option<u64> {
        self.time.map(|t| t.unix_ms + now_ms.saturating_sub(t.at_ms))
    }

    /// One turn of the loop at `now_ms`; `on_event` hears what happened.
    /// Returns the loop clock by which it should run again (it may run sooner).
    pub fn poll(&mut self, now_ms: u64, mut on_event: impl FnMut(Event)) -> u64 {
        self.stats.polls += 1;
        self.poll_gps(now_ms);
        if now_ms >= self.next_tpms_ms {
            self.next_tpms_ms = now_ms + u64::from(self.settings.tpms_every_ms);
            self.read_tpms(now_ms);
        }
        if now_ms >= self.next_fuel_ms {
            self.next_fuel_ms = now_ms + u64::from(self.settings.fuel_every_ms);
            self.read_fuel(now_ms);
        }
        self.device.poll_seal(now_ms);
        if let Err(why) = self.poll_net(now_ms, &mut on_event) {
            self.drop_link(now_ms, why, &mut on_event);
        }
        self.watchdog.feed();
        let mut wake = self.next_tpms_ms.min(self.next_fuel_ms);
        if let Some(d) = self.device.poll_deadline() {
            wake = wake.min(d);
        }
        if let Net::Down { retry_at } = self.net {
            wake = wake.min(retry_at);
        }
        wake
    }

    fn record(&mut self, now_ms: u64, kind: SignalKind, time_ms: u64, value: f64) {
        if self.device.record(now_ms, Reading { kind, time_ms, value }).is_err() {
            self.stats.readings_refused += 1;
        }
    }

    fn poll_gps(&mut self, now_ms: u64) {
        let fix = match self.gps.poll_ready() {
            Ok(Some(fix)) => fix,
            Ok(None) => return,
            Err(_) => {
                self.stats.gps_errors += 1;
                return;
            }
        };
        let Fix { lat, lon, speed_kmh, course_deg, altitude_m, time_ms, .. } = fix;
        let Some(t) = time_ms else {
            self.stats.no_time += 1;
            return;
        };
        self.time = Some(TimeBase { unix_ms: t, at_ms: now_ms });
        self.record(now_ms, kind::LATITUDE, t, lat);
        self.record(now_ms, kind::LONGITUDE, t, lon);
        for (k, v) in [(kind::SPEED, speed_kmh), (kind::HEADING, course_deg), (kind::ALTITUDE, altitude_m)] {
            if let Some(v) = v {
                self.record(now_ms, k, t, f64::from(v));
            }
        }
    }

    fn probe_tpms(&mut self) {
        if let TpmsSlot::Missing(bus) = &mut self.tpms
            && let Some(i2c) = bus.take()
        {
            match Tpms::probe(i2c, tpms::ADDRESS) {
                Ok(t) => self.tpms = TpmsSlot::Found(t),
                Err((i2c, _)) => {
                    self.stats.tpms_errors += 1;
                    *bus = Some(i2c);
                }
            }
        }
    }

    fn read_tpms(&mut self, now_ms: u64) {
        self.probe_tpms();
        let TpmsSlot::Found(t) = &mut self.tpms else { return };
        let mut wheels = [None; MAX_WHEELS];
        let paired = match t.read(&mut wheels) {
            Ok(n) => n,
            Err(_) => {
                self.stats.tpms_errors += 1;
                return;
            }
        };
        let Some(time) = self.unix_ms(now_ms) else {
            self.stats.no_time += 1;
            return;
        };
        for (i, w) in wheels.iter().enumerate().take(paired.min(kind::WHEELS)) {
            let Some(w) = w.filter(|w| w.fresh) else { continue };
            let wheel = kind::Wheel { row: (i / 2) as u8 + 1, right: i % 2 == 1 };
            if let (Some(p), Some(c)) = (kind::tire_pressure(wheel), kind::tire_temperature(wheel)) {
                self.record(now_ms, p, time, f64::from(w.pressure_kpa));
                self.record(now_ms, c, time, f64::from(w.temperature_c));
            }
        }
    }

    fn read_fuel(&mut self, now_ms: u64) {
        let level = match self.fuel.read() {
            Ok(l) => l,
            Err(_) => {
                self.stats.fuel_errors += 1;
                return;
            }
        };
        let Some(time) = self.unix_ms(now_ms) else {
            self.stats.no_time += 1;
            return;
        };
        self.record(now_ms, kind::FUEL_ABSOLUTE_LEVEL, time, f64::from(level.litres));
    }

    fn send(&mut self, bytes: &[u8], now_ms: u64) -> Result<(), Drop> {
        self.link.write_all(bytes).map_err(|_| Drop::Io)?;
        self.link.flush().map_err(|_| Drop::Io)?;
        self.last_sent_ms = now_ms;
        Ok(())
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    fn poll_net(&mut self, now_ms: u64, on_event: &mut impl FnMut(Event)) -> Result<(), Drop> {
        let timeout = u64::from(self.settings.connect_timeout_ms);
        match self.net {
            Net::Down { retry_at } => {
                if now_ms < retry_at {
                    return Ok(());
                }
                self.stats.dials += 1;
                self.link.dial().map_err(|_| Drop::Dial)?;
                self.rx.reset();
                let mut buf = [0u8; 128];
                let user = self.device.mqtt_username();
                let password = self.device.mqtt_password();
                let n = mqtt::connect(&mut buf, user.as_str(), user.as_str(), &password, self.settings.keep_alive_s)
                    .map_err(|_| Drop::Protocol)?;
                self.net = Net::Connecting { since: now_ms };
                self.send(&buf[..n], now_ms)
            }
            Net::Connecting { since } | Net::Subscribing { since, .. } => {
                self.receive(now_ms, on_event)?;
                if matches!(self.net, Net::Connecting { .. } | Net::Subscribing { .. })
                    && now_ms.saturating_sub(since) > timeout
                {
                    return Err(Drop::Timeout);
                }
                if self.net == Net::Up { self.transmit(now_ms) } else { Ok(()) }
            }
            Net::Up => {
                self.receive(now_ms, on_event)?;
                self.transmit(now_ms)?;
                let keep_alive = u64::from(self.settings.keep_alive_s) * 1000;
                // A link that swallows bytes (a modem whose connection dropped
                // without a word) shows as PUBACKs that stop coming.
                if self.owed_since.is_some_and(|t| now_ms.saturating_sub(t) > keep_alive.max(timeout)) {
                    return Err(Drop::Timeout);
                }
                if let Some(since) = self.ping_since {
                    if now_ms.saturating_sub(since) > keep_alive.max(timeout) {
                        return Err(Drop::Timeout);
                    }
                } else if keep_alive > 0 && now_ms.saturating_sub(self.last_sent_ms) >= keep_alive / 2 {
                    let mut buf = [0u8; 2];
                    let n = mqtt::pingreq(&mut buf).map_err(|_| Drop::Protocol)?;
                    self.send(&buf[..n], now_ms)?;
                    self.ping_since = Some(now_ms);
                }
                Ok(())
            }
        }
    }

    fn transmit(&mut self, now_ms: u64) -> Result<(), Drop> {
        while self.inflight < MAX_INFLIGHT {
            let id = self.packet_id();
            let Some(tx) = self.device.poll_transmit(now_ms) else { break };
            let mut head = [0u8; 80];
            let n =
                mqtt::publish_header(&mut head, tx.topic, id, false, tx.payload.len()).map_err(|_| Drop::Protocol)?;
            self.link.write_all(&head[..n]).map_err(|_| Drop::Io)?;
            self.link.write_all(tx.payload).map_err(|_| Drop::Io)?;
            self.link.flush().map_err(|_| Drop::Io)?;
            self.last_sent_ms = now_ms;
            if self.inflight == 0 {
                self.owed_since = Some(now_ms);
            }
            self.inflight += 1;
        }
        Ok(())
    }

    fn receive(&mut self, now_ms: u64, on_event: &mut impl FnMut(Event)) -> Result<(), Drop> {
        for _ in 0..READS_PER_POLL {
            if !self.link.read_ready().map_err(|_| Drop::Io)? {
                break;
            }
            let space = self.rx.space();
            let n = self.link.read(space).map_err(|_| Drop::Io)?;
            if n == 0 {
                return Err(Drop::Closed);
            }
            self.rx.filled(n);
            while self.handle_one(now_ms, on_event)? {}
        }
        Ok(())
    }

    /// Handles the next buffered packet; `false` when none is whole yet.
    fn handle_one(&mut self, now_ms: u64, on_event: &mut impl FnMut(Event)) -> Result<bool, Drop> {
        let mut reply = [0u8; 128];
        let mut reply_len = 0;
        let packet = self.rx.next_packet().map_err(|_| Drop::Protocol)?;
        let Some(packet) = packet else { return Ok(false) };
        match packet {
            Packet::ConnAck { result, .. } => {
                if !matches!(self.net, Net::Connecting { .. }) {
                    return Err(Drop::Protocol);
                }
                if let Err(code) = result {
                    self.stats.refusals += 1;
                    on_event(Event::Refused(code));
                    return Err(Drop::Refused);
                }
                let id = self.packet_id();
                let (ack, cmd) = (self.device.ack_topic(), self.device.command_topic());
                reply_len =
                    mqtt::subscribe(&mut reply, id, &[ack.as_str(), cmd.as_str()]).map_err(|_| Drop::Protocol)?;
                self.net = Net::Subscribing { since: self.since(), id };
            }
            Packet::SubAck { id, granted, refused } => {
                let Net::Subscribing { id: want, .. } = self.net else { return Err(Drop::Protocol) };
                if id != want {
                    return Err(Drop::Protocol);
                }
                if refused > 0 || granted != 2 {
                    self.stats.refusals += 1;
                    return Err(Drop::Refused);
                }
                self.net = Net::Up;
                self.stats.sessions += 1;
                self.backoff_ms = self.settings.backoff_initial_ms.max(1);
                self.inflight = 0;
                self.owed_since = None;
                self.ping_since = None;
                // A new session: everything held is due again.
                self.device.on_connected(now_ms);
                on_event(Event::Connected);
            }
            Packet::PubAck { .. } => {
                self.inflight = self.inflight.saturating_sub(1);
                self.owed_since = (self.inflight > 0).then_some(now_ms);
                self.stats.pubacks += 1;
            }
            Packet::PingResp => self.ping_since = None,
            Packet::Publish { topic, payload, qos1_id } => {
                let (ack, cmd) = (self.device.ack_topic(), self.device.command_topic());
                if topic == ack.as_str() {
                    let result = self.device.handle_ack_with(payload, |r| on_event(Event::Acked(r)));
                    if result.is_err() {
                        self.stats.control_refused += 1;
                    }
                } else if topic == cmd.as_str() {
                    match self.device.handle_command(now_ms, payload) {
                        Ok(_) => {
                            let counter = self.device.last_command_counter();
                            // Written before the broker hears it was taken.
                            if self.store.accept_command(self.device.epoch(), counter).is_err() {
                                self.stats.persist_errors += 1;
                            }
                            on_event(Event::Command(counter));
                        }
                        Err(ControlError::Replayed | ControlError::Invalid(_)) => self.stats.control_refused += 1,
                    }
                } else {
                    self.stats.stray_messages += 1;
                }
                if let Some(id) = qos1_id {
                    reply_len = mqtt::puback(&mut reply, id).map_err(|_| Drop::Protocol)?;
                }
            }
        }
        if reply_len > 0 {
            self.send(&reply[..reply_len], now_ms)?;
        }
        Ok(true)
    }

    fn since(&self) -> u64 {
        match self.net {
            Net::Connecting { since } | Net::Subscribing { since, .. } => since,
            _ => 0,
        }
    }

    fn drop_link(&mut self, now_ms: u64, why: Drop, on_event: &mut impl FnMut(Event)) {
        self.link.hang_up();
        self.rx.reset();
        self.inflight = 0;
        self.owed_since = None;
        self.ping_since = None;
        self.stats.drops += 1;
        match why {
            Drop::Timeout => self.stats.timeouts += 1,
            Drop::Protocol => self.stats.protocol_errors += 1,
            _ => {}
        }
        // Jitter from the device's key-derived password and the epoch: units
        // that lost one gateway together do not redial in step.
        let spread = u64::from(self.device.mqtt_password()[0]) ^ u64::from(self.device.epoch() & 0xff);
        let jitter = u64::from(self.backoff_ms) * spread / 1024;
        self.net = Net::Down { retry_at: now_ms + u64::from(self.backoff_ms) + jitter };
        self.backoff_ms = self.backoff_ms.saturating_mul(2).min(self.settings.backoff_max_ms.max(1));
        on_event(Event::Disconnected(why));
    }
}
