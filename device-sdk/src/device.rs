//! The device state machine: readings in, sealed batches out, acks and commands in.
//!
//! Sans-IO: no sockets, no clock, no allocation. Every method takes the device
//! clock (`now_ms`, milliseconds from any origin, never going backwards) and the
//! transport does the I/O: it publishes what [`Device::poll_transmit`] returns and
//! feeds in what arrives on the ack and command topics.
//!
//! Pure: no I/O, no clock, no runtime.

use fleetline_wire::control::{self, AckRange, Command, ControlKind};
use fleetline_wire::ids::ShortId;
use fleetline_wire::signals::{self, QuantizeError, SignalKind};
use fleetline_wire::topics::{self, Channel, TopicBuf};
use fleetline_wire::{BatchWriter, DeviceId, DeviceKey, FleetId, WireError};

use crate::batcher::{Batcher, Fit, Limits, NewSample, batch_header, min_sealed_capacity};
use crate::outbox::{Outbox, Released};

/// When the open batch is sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushPolicy {
    /// Most samples in one batch (at most the batcher's capacity).
    pub max_samples: u16,
    /// Most bytes of one sealed batch (at most the outbox slot size).
    pub max_bytes: u16,
    /// Seal once the oldest sample in the open batch has waited this long.
    pub max_age_ms: u32,
}

/// What happens when a batch must be sealed and every outbox slot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxFull {
    /// Keep every sealed batch; [`Device::record`] refuses new readings with
    /// [`RecordError::Backpressure`] once the open batch is full too. Nothing is lost
    /// on the device; the caller decides what to do with the refused reading.
    Block,
    /// Evict the oldest unacknowledged batch to make room, counting the batch and
    /// its samples in [`Stats::batches_dropped`] and [`Stats::samples_dropped`].
    DropOldest,
}

/// Everything a device needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Fleet id.
    pub fleet: FleetId,
    /// Device id.
    pub device: DeviceId,
    /// The provisioned key.
    pub key: DeviceKey,
    /// When batches are sealed.
    pub flush: FlushPolicy,
    /// How long a published batch waits for its ack before it is published again.
    pub resend_after_ms: u32,
    /// Policy when the outbox is full.
    pub when_full: OutboxFull,
}

/// State the firmware persists across boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BootState {
    /// This boot's epoch. Must be greater than every earlier boot's: persist
    /// `epoch + 1` before the first batch is sealed, or nonces repeat.
    pub epoch: u32,
    /// Highest command counter accepted so far ([`Device::last_command_counter`]).
    pub last_command_counter: u64,
}

/// A configuration the device cannot run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `max_samples` is zero or exceeds the batcher capacity.
    MaxSamples,
    /// `max_bytes` cannot hold one sample, or exceeds the outbox slot size.
    MaxBytes,
    /// `resend_after_ms` or `max_age_ms` is zero.
    ZeroDuration,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ConfigError::MaxSamples => "flush.max_samples must be 1..=batcher capacity",
            ConfigError::MaxBytes => "flush.max_bytes must hold one sample and fit the outbox slot",
            ConfigError::ZeroDuration => "resend_after_ms and flush.max_age_ms must be positive",
        })
    }
}

impl core::error::Error for ConfigError {}

/// Why a reading was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The kind is not in the signal table.
    UnknownKind(u16),
    /// The value is outside the signal's valid range.
    OutOfRange(SignalKind),
    /// The value is NaN or infinite.
    NotFinite(SignalKind),
    /// Outbox and open batch are full under [`OutboxFull::Block`]; retry after acks.
    Backpressure,
    /// Every seq of this epoch is used; reboot with a new epoch.
    SeqExhausted,
    /// Sealing failed (an encoder limit; counted, the batch's readings are dropped).
    Seal(WireError),
}

impl core::fmt::Display for RecordError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RecordError::UnknownKind(k) => write!(f, "reading kind {k} is not in the signal table"),
            RecordError::OutOfRange(k) => write!(f, "value out of range for kind {}", k.0),
            RecordError::NotFinite(k) => write!(f, "value is not finite for kind {}", k.0),
            RecordError::Backpressure => f.write_str("outbox full: waiting for acks"),
            RecordError::SeqExhausted => f.write_str("sequence numbers of this boot epoch exhausted"),
            RecordError::Seal(e) => write!(f, "sealing failed: {e}"),
        }
    }
}

impl core::error::Error for RecordError {}

/// Why a control message was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// It does not open under this device's key, or is malformed.
    Invalid(WireError),
    /// Its counter is not above one already accepted from the same sender.
    Replayed,
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ControlError::Invalid(e) => write!(f, "control message rejected: {e}"),
            ControlError::Replayed => f.write_str("control message replayed"),
        }
    }
}

impl core::error::Error for ControlError {}

/// One reading: a signal value at a time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// Signal kind.
    pub kind: SignalKind,
    /// Unix time of the measurement, milliseconds.
    pub time_ms: u64,
    /// Value in the signal's unit.
    pub value: f64,
}

/// Counters of everything the device did or refused. All monotonic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Readings taken into a batch.
    pub readings_recorded: u64,
    /// Readings refused as invalid (unknown kind, out of range, not finite).
    pub readings_invalid: u64,
    /// Readings refused by back-pressure.
    pub readings_refused: u64,
    /// Batches sealed.
    pub batches_sealed: u64,
    /// Samples in sealed batches.
    pub samples_sealed: u64,
    /// Publishes, first sends and re-sends.
    pub publishes: u64,
    /// Re-sends after a timeout or reconnect.
    pub resends: u64,
    /// Batches released by an ack.
    pub batches_acked: u64,
    /// Samples in batches released by an ack.
    pub samples_acked: u64,
    /// Batches evicted under [`OutboxFull::DropOldest`] (or lost to a seal error).
    pub batches_dropped: u64,
    /// Samples in dropped batches.
    pub samples_dropped: u64,
    /// Acks that did not open or were malformed.
    pub acks_invalid: u64,
    /// Acks rejected by their counter.
    pub acks_replayed: u64,
    /// Valid acks that named nothing still held (late duplicates).
    pub acks_stale: u64,
    /// Commands that did not open or were malformed.
    pub commands_invalid: u64,
    /// Commands rejected by their counter.
    pub commands_replayed: u64,
    /// Commands applied.
    pub commands_applied: u64,
}

/// What an accepted ack released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Batches released.
    pub batches: u32,
    /// Samples in them.
    pub samples: u32,
}

/// A batch to publish, QoS 1, on [`Transmit::topic`].
#[derive(Clone, Copy, Debug)]
pub struct Transmit<'a> {
    /// `fleetline/v1/{fleet}/{device}/up`.
    pub topic: &'a str,
    /// The sealed batch.
    pub payload: &'a [u8],
    /// Its seq.
    pub seq: u32,
    /// Whether this is a re-send.
    pub resend: bool,
}

/// How many senders' ack counters are remembered.
const ACK_SENDERS: usize = 4;

/// Highest accepted ack counter per recent sender. A vehicle moving between
/// gateways sees several senders; an evicted sender's replay is still harmless,
/// since an ack can only name (epoch, seq) pairs that were durable.
#[derive(Clone, Copy, Default)]
struct AckGuard {
    /// (sender, highest counter, last use) per remembered sender.
    senders: [Option<(ShortId, u64, u64)>; ACK_SENDERS],
    tick: u64,
}

impl AckGuard {
    fn check_and_record(&mut self, sender: &str, counter: u64) -> Result<(), ControlError> {
        let id = ShortId::new(sender).map_err(ControlError::Invalid)?;
        self.tick += 1;
        let tick = self.tick;
        if let Some((_, highest, used)) = self.senders.iter_mut().flatten().find(|e| e.0 == id) {
            if counter <= *highest {
                return Err(ControlError::Replayed);
            }
            *highest = counter;
            *used = tick;
            return Ok(());
        }
        // A free entry, else the least recently used one.
        let slot = (0..ACK_SENDERS).min_by_key(|&i| self.senders[i].map_or(0, |e| e.2)).unwrap_or(0);
        self.senders[slot] = Some((id, counter, tick));
        Ok(())
    }
}

/// A vehicle unit's Fleetline state: `SAMPLES` readings in the open batch, `OUTBOX`
/// sealed batches of at most `BATCH_BYTES` bytes awaiting acks. Fixed size, no heap.
pub struct Device<const SAMPLES: usize, const BATCH_BYTES: usize, const OUTBOX: usize> {
    cfg: Config,
    epoch: u32,
    next_seq: u32,
    /// The open batch's header length for (epoch, seq, base time): it is asked
    /// for every reading and changes only with the batch.
    header_memo: core::cell::Cell<(u32, u32, u64, usize)>,
    seq_exhausted: bool,
    last_command: u64,
    batcher: Batcher<SAMPLES>,
    outbox: Outbox<BATCH_BYTES, OUTBOX>,
    acks: AckGuard,
    up_topic: TopicBuf,
    stats: Stats,
}

impl<const SAMPLES: usize, const BATCH_BYTES: usize, const OUTBOX: usize> Device<SAMPLES, BATCH_BYTES, OUTBOX> {
    /// Creates the device state for one boot.
    pub fn new(cfg: Config, boot: BootState) -> Result<Self, ConfigError> {
        validate(&cfg.flush, cfg.resend_after_ms, SAMPLES, BATCH_BYTES)?;
        Ok(Self::build(cfg, boot))
    }

    /// Like [`Device::new`], building the state in `slot` (a static on a
    /// microcontroller) rather than returning it: the outbox is kilobytes, and
    /// a value returned through a `Result` and moved into place is copied
    /// through the stack on the way, once per move. `slot` is left as it was
    /// when the configuration is refused.
    pub fn new_in(slot: &mut Option<Self>, cfg: Config, boot: BootState) -> Result<&mut Self, ConfigError> {
        validate(&cfg.flush, cfg.resend_after_ms, SAMPLES, BATCH_BYTES)?;
        Ok(slot.insert(Self::build(cfg, boot)))
    }

    /// The state of a checked configuration.
    #[inline(always)]
    fn build(cfg: Config, boot: BootState) -> Self {
        const {
            assert!(SAMPLES > 0 && OUTBOX > 0, "capacities must be positive");
            assert!(BATCH_BYTES <= u16::MAX as usize, "a batch is at most 65535 bytes");
        }
        let up_topic = topics::device_topic(&cfg.fleet, &cfg.device, Channel::Up);
        Self {
            epoch: boot.epoch,
            next_seq: 0,
            header_memo: core::cell::Cell::new((0, 0, 0, 0)),
            seq_exhausted: false,
            last_command: boot.last_command_counter,
            batcher: Batcher::new(),
            outbox: Outbox::new(),
            acks: AckGuard::default(),
            up_topic,
            stats: Stats::default(),
            cfg,
        }
    }

    /// The configuration in force (commands may have changed it).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Boot epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Highest command counter accepted; persist it with the epoch.
    pub fn last_command_counter(&self) -> u64 {
        self.last_command
    }

    /// Readings in the open batch.
    pub fn open_samples(&self) -> usize {
        self.batcher.len()
    }

    /// Sealed batches awaiting an ack.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Samples in sealed batches awaiting an ack.
    pub fn outbox_samples(&self) -> u32 {
        self.outbox.samples()
    }

    /// Whether every reading taken has been acknowledged.
    pub fn is_idle(&self) -> bool {
        self.batcher.is_empty() && self.outbox.len() == 0
    }

    /// Topic for [`Transmit`]s.
    pub fn up_topic(&self) -> TopicBuf {
        self.up_topic
    }

    /// Topic to subscribe to for acks.
    pub fn ack_topic(&self) -> TopicBuf {
        topics::device_topic(&self.cfg.fleet, &self.cfg.device, Channel::Ack)
    }

    /// Topic to subscribe to for commands.
    pub fn command_topic(&self) -> TopicBuf {
        topics::device_topic(&self.cfg.fleet, &self.cfg.device, Channel::Cmd)
    }

    /// MQTT username and client id: `{fleet}.{device}` (brokers refuse `/` in client ids).
    pub fn mqtt_username(&self) -> TopicBuf {
        topics::device_username(&self.cfg.fleet, &self.cfg.device)
    }

    /// MQTT password: derived from the key, never the key itself.
    pub fn mqtt_password(&self) -> [u8; 32] {
        self.cfg.key.mqtt_password(self.mqtt_username().as_str())
    }

    /// Takes a reading into the open batch, sealing the batch first when the
    /// reading would not fit.
    pub fn record(&mut self, now_ms: u64, reading: Reading) -> Result<(), RecordError> {
        let Some(spec) = signals::spec(reading.kind) else {
            self.stats.readings_invalid += 1;
            return Err(RecordError::UnknownKind(reading.kind.0));
        };
        let raw = spec.quantize(reading.value).map_err(|e| {
            self.stats.readings_invalid += 1;
            match e {
                QuantizeError::NotFinite => RecordError::NotFinite(reading.kind),
                QuantizeError::OutOfRange => RecordError::OutOfRange(reading.kind),
            }
        })?;
        if self.seq_exhausted {
            self.stats.readings_refused += 1;
            return Err(RecordError::SeqExhausted);
        }
        let sample = NewSample { kind: reading.kind, wire: spec.wire, time_ms: reading.time_ms, raw };
        let limits = Limits {
            max_samples: usize::from(self.cfg.flush.max_samples),
            max_sealed: self.max_sealed(),
            header_len: self.header_len(self.batcher.base_time_ms()),
        };
        if self.batcher.fit(&sample, limits) == Fit::SealFirst
            && let Err(e) = self.seal(now_ms)
        {
            self.stats.readings_refused += 1;
            return Err(e);
        }
        // A lone sample in a fresh batch always fits: the config check guarantees it.
        self.batcher.push(now_ms, &sample);
        self.stats.readings_recorded += 1;
        Ok(())
    }

    fn max_sealed(&self) -> usize {
        usize::from(self.cfg.flush.max_bytes).min(BATCH_BYTES)
    }

    fn header_len(&self, base_time_ms: u64) -> usize {
        let (epoch, seq, base, len) = self.header_memo.get();
        if len > 0 && (epoch, seq, base) == (self.epoch, self.next_seq, base_time_ms) {
            return len;
        }
        let len =
            batch_header(self.cfg.fleet.as_str(), self.cfg.device.as_str(), self.epoch, self.next_seq, base_time_ms)
                .encoded_len();
        self.header_memo.set((self.epoch, self.next_seq, base_time_ms, len));
        len
    }

    /// Seals the open batch into the outbox now, if it holds anything.
    pub fn flush(&mut self, now_ms: u64) -> Result<(), RecordError> {
        if self.batcher.is_empty() { Ok(()) } else { self.seal(now_ms) }
    }

    fn seal(&mut self, now_ms: u64) -> Result<(), RecordError> {
        if self.seq_exhausted {
            return Err(RecordError::SeqExhausted);
        }
        let slot = match self.outbox.free_slot() {
            Some(slot) => slot,
            None => match self.cfg.when_full {
                OutboxFull::Block => return Err(RecordError::Backpressure),
                OutboxFull::DropOldest => {
                    if let Some(r) = self.outbox.evict_oldest() {
                        self.stats.batches_dropped += 1;
                        self.stats.samples_dropped += u64::from(r.samples);
                    }
                    self.outbox.free_slot().ok_or(RecordError::Backpressure)?
                }
            },
        };
        let seq = self.next_seq;
        let samples = self.batcher.len() as u16;
        let header = self.batcher.header(self.cfg.fleet.as_str(), self.cfg.device.as_str(), self.epoch, seq);
        let result = (|| {
            let buf = self.outbox.buf_mut(slot);
            let mut w = BatchWriter::new(buf, &header)?;
            self.batcher.write_into(&mut w)?;
            w.seal(&self.cfg.key)
        })();
        // The seq is spent whether or not sealing worked: it may have touched a nonce.
        match self.next_seq.checked_add(1) {
            Some(n) => self.next_seq = n,
            None => self.seq_exhausted = true,
        }
        match result {
            Ok(len) => {
                self.outbox.commit(slot, self.epoch, seq, samples, len, now_ms);
                self.stats.batches_sealed += 1;
                self.stats.samples_sealed += u64::from(samples);
                Ok(())
            }
            Err(e) => {
                // Only reachable if the size bound were wrong; count, never panic.
                self.batcher = Batcher::new();
                self.stats.batches_dropped += 1;
                self.stats.samples_dropped += u64::from(samples);
                Err(RecordError::Seal(e))
            }
        }
    }

    /// Seals an aged batch and returns the next batch due for publishing, if any.
    /// Call it until it returns `None` whenever connected and something may be due
    /// ([`Device::poll_deadline`]). Each returned batch counts as sent at `now_ms`.
    pub fn poll_transmit(&mut self, now_ms: u64) -> Option<Transmit<'_>> {
        self.poll_seal(now_ms);
        let (slot, seq, resend) = self.outbox.take_due(now_ms, u64::from(self.cfg.resend_after_ms))?;
        self.stats.publishes += 1;
        if resend {
            self.stats.resends += 1;
        }
        Some(Transmit { topic: self.up_topic.as_str(), payload: self.outbox.sealed(slot), seq, resend })
    }

    /// Seals the open batch if its oldest reading has waited `max_age_ms`. Needed
    /// while disconnected too, so batches keep their intended size and age.
    pub fn poll_seal(&mut self, now_ms: u64) {
        if !self.batcher.is_empty()
            && now_ms.saturating_sub(self.batcher.opened_at_ms()) >= u64::from(self.cfg.flush.max_age_ms)
        {
            // Under back-pressure the batch stays open and is retried on the next poll.
            let _ = self.seal(now_ms);
        }
    }

    /// When `poll_transmit` next has something to do, on the device clock.
    pub fn poll_deadline(&self) -> Option<u64> {
        let age = (!self.batcher.is_empty())
            .then(|| self.batcher.opened_at_ms().saturating_add(u64::from(self.cfg.flush.max_age_ms)));
        match (age, self.outbox.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A new MQTT session: nothing published before is in flight any more, so every
    /// held batch is due again now.
    pub fn on_connected(&mut self, now_ms: u64) {
        self.outbox.all_due(now_ms);
    }

    /// Handles a message from the ack topic. `sealed` is decrypted in place.
    pub fn handle_ack(&mut self, sealed: &mut [u8]) -> Result<AckOutcome, ControlError> {
        self.handle_ack_with(sealed, |_| {})
    }

    /// Like [`Device::handle_ack`], calling `released` for every batch the ack releases.
    pub fn handle_ack_with(
        &mut self,
        sealed: &mut [u8],
        mut released: impl FnMut(Released),
    ) -> Result<AckOutcome, ControlError> {
        let (opened, ranges) = control::open_control(sealed, &self.cfg.key, ControlKind::Ack)
            .and_then(|o| o.ack_ranges().map(|r| (o, r)))
            .map_err(|e| {
                self.stats.acks_invalid += 1;
                ControlError::Invalid(e)
            })?;
        if let Err(e) = self.acks.check_and_record(opened.header.sender, opened.header.counter) {
            match e {
                ControlError::Replayed => self.stats.acks_replayed += 1,
                ControlError::Invalid(_) => self.stats.acks_invalid += 1,
            }
            return Err(e);
        }
        let mut outcome = AckOutcome::default();
        let stats = &mut self.stats;
        let named = |epoch: u32, seq: u32| ranges.clone().any(|r: AckRange| r.contains(epoch, seq));
        self.outbox.ack_where(named, |r: Released| {
            released(r);
            outcome.batches += 1;
            outcome.samples += u32::from(r.samples);
            stats.batches_acked += 1;
            stats.samples_acked += u64::from(r.samples);
        });
        if outcome.batches == 0 {
            self.stats.acks_stale += 1;
        }
        Ok(outcome)
    }

    /// Handles a message from the command topic, applying what concerns the core.
    /// The command is returned so the firmware can act on it and persist
    /// [`Device::last_command_counter`].
    pub fn handle_command(&mut self, now_ms: u64, sealed: &mut [u8]) -> Result<Command, ControlError> {
        let (opened, command) = control::open_control(sealed, &self.cfg.key, ControlKind::Command)
            .and_then(|o| o.command().map(|c| (o, c)))
            .map_err(|e| {
                self.stats.commands_invalid += 1;
                ControlError::Invalid(e)
            })?;
        if opened.header.counter <= self.last_command {
            self.stats.commands_replayed += 1;
            return Err(ControlError::Replayed);
        }
        match command {
            Command::FlushNow => {
                let _ = self.flush(now_ms);
            }
            Command::SetFlushPolicy { max_samples, max_bytes, max_age_ms } => {
                let mut p = self.cfg.flush;
                if max_samples != 0 {
                    p.max_samples = max_samples;
                }
                if max_bytes != 0 {
                    p.max_bytes = max_bytes;
                }
                if max_age_ms != 0 {
                    p.max_age_ms = max_age_ms;
                }
                if validate(&p, self.cfg.resend_after_ms, SAMPLES, BATCH_BYTES).is_err() {
                    self.stats.commands_invalid += 1;
                    return Err(ControlError::Invalid(WireError::Malformed("flush policy outside device limits")));
                }
                self.cfg.flush = p;
            }
            Command::SetResendAfter { ms } => {
                if ms == 0 {
                    self.stats.commands_invalid += 1;
                    return Err(ControlError::Invalid(WireError::Malformed("zero resend interval")));
                }
                self.cfg.resend_after_ms = ms;
            }
        }
        self.last_command = opened.header.counter;
        self.stats.commands_applied += 1;
        Ok(command)
    }
}

fn validate(flush: &FlushPolicy, resend_after_ms: u32, samples: usize, batch_bytes: usize) -> Result<(), ConfigError> {
    if flush.max_samples == 0 || usize::from(flush.max_samples) > samples {
        return Err(ConfigError::MaxSamples);
    }
    let max_bytes = usize::from(flush.max_bytes);
    if max_bytes < min_sealed_capacity() || max_bytes > batch_bytes {
        return Err(ConfigError::MaxBytes);
    }
    if resend_after_ms == 0 || flush.max_age_ms == 0 {
        return Err(ConfigError::ZeroDuration);
    }
    Ok(())
}
