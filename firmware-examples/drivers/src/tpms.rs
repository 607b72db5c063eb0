//! A tire-pressure (TPMS) receiver on I2C, as found in aftermarket units: it
//! hears the wheels' radio sensors and keeps the latest pressure and
//! temperature of each in registers.
//!
//! Register map (all big-endian):
//!
//! | register | bytes | meaning |
//! |---|---|---|
//! | `0x00` `WHO_AM_I` | 1 | `0x54` |
//! | `0x01` `WHEELS` | 1 | wheels paired, at most [`MAX_WHEELS`] |
//! | `0x10 + 4·i` | 4 | wheel `i`: status, pressure (u16, 0.1 kPa), temperature (i8, °C) |
//!
//! Status: bit 0 the value is fresh (heard since the last read), bit 1 the
//! sensor's battery is low, bit 7 the sensor was never heard. A pressure of
//! `0xFFFF` is the receiver's "no value".

use embedded_hal::i2c::I2c;

/// The receiver's default bus address.
pub const ADDRESS: u8 = 0x2a;
/// `WHO_AM_I`'s value.
pub const WHO_AM_I: u8 = 0x54;
/// Most wheels a receiver pairs.
pub const MAX_WHEELS: usize = 12;
/// Highest pressure a tire sensor reports, kPa (heavy trucks run near 900).
pub const MAX_KPA: f32 = 1_500.0;

const REG_WHO_AM_I: u8 = 0x00;
const REG_WHEELS: u8 = 0x01;
const REG_WHEEL0: u8 = 0x10;

/// One wheel's reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Wheel {
    /// Gauge pressure, kPa.
    pub pressure_kpa: f32,
    /// Temperature, °C.
    pub temperature_c: f32,
    /// Heard since the previous read.
    pub fresh: bool,
    /// The sensor's battery is low.
    pub battery_low: bool,
}

/// What went wrong.
#[derive(Debug, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus failed.
    Bus(E),
    /// Something answers at the address, but not a TPMS receiver.
    NotTpms(u8),
    /// The receiver sent a value no receiver sends (more wheels than it can
    /// pair, a pressure out of range).
    Garbage,
}

/// What the driver saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TpmsStats {
    /// Wheel readings taken.
    pub readings: u32,
    /// Bus errors.
    pub bus_errors: u32,
    /// Values no receiver sends.
    pub garbage: u32,
    /// Wheels with no value (never heard, or "no value").
    pub missing: u32,
}

/// The receiver.
#[derive(Debug)]
pub struct Tpms<I> {
    i2c: I,
    address: u8,
    stats: TpmsStats,
}

impl<I: I2c> Tpms<I> {
    /// Checks `WHO_AM_I` at `address`.
    pub fn new(i2c: I, address: u8) -> Result<Self, Error<I::Error>> {
        Self::probe(i2c, address).map_err(|(_, e)| e)
    }

    /// Like [`Tpms::new`], giving the bus back when nothing answers: a unit
    /// whose receiver is powered later probes again.
    pub fn probe(mut i2c: I, address: u8) -> Result<Self, (I, Error<I::Error>)> {
        let mut id = [0u8];
        if let Err(e) = i2c.write_read(address, &[REG_WHO_AM_I], &mut id) {
            return Err((i2c, Error::Bus(e)));
        }
        if id[0] != WHO_AM_I {
            return Err((i2c, Error::NotTpms(id[0])));
        }
        Ok(Self { i2c, address, stats: TpmsStats::default() })
    }

    /// What the driver saw.
    pub fn stats(&self) -> TpmsStats {
        self.stats
    }

    /// Gives the bus back.
    pub fn release(self) -> I {
        self.i2c
    }

    fn bus<T>(&mut self, r: Result<T, I::Error>) -> Result<T, Error<I::Error>> {
        r.map_err(|e| {
            self.stats.bus_errors += 1;
            Error::Bus(e)
        })
    }

    /// Reads every paired wheel into `out` (index = wheel); `None` where the
    /// receiver has no value. Returns how many wheels are paired.
    pub fn read(&mut self, out: &mut [Option<Wheel>; MAX_WHEELS]) -> Result<usize, Error<I::Error>> {
        let mut n = [0u8];
        let r = self.i2c.write_read(self.address, &[REG_WHEELS], &mut n);
        self.bus(r)?;
        let wheels = usize::from(n[0]);
        if wheels > MAX_WHEELS {
            self.stats.garbage += 1;
            return Err(Error::Garbage);
        }
        let mut raw = [0u8; 4 * MAX_WHEELS];
        let r = self.i2c.write_read(self.address, &[REG_WHEEL0], &mut raw[..4 * wheels]);
        self.bus(r)?;
        let mut fresh = [None; MAX_WHEELS];
        for (i, w) in raw[..4 * wheels].chunks_exact(4).enumerate() {
            let status = w[0];
            let pressure = u16::from_be_bytes([w[1], w[2]]);
            if status & 0x80 != 0 || pressure == 0xffff {
                self.stats.missing += 1;
                continue;
            }
            let kpa = f32::from(pressure) / 10.0;
            if kpa > MAX_KPA {
                self.stats.garbage += 1;
                return Err(Error::Garbage);
            }
            fresh[i] = Some(Wheel {
                pressure_kpa: kpa,
                temperature_c: f32::from(w[3] as i8),
                fresh: status & 0x01 != 0,
                battery_low: status & 0x02 != 0,
            });
            self.stats.readings += 1;
        }
        *out = fresh;
        Ok(wheels)
    }
}
