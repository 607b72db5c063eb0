//! A vehicle's peripherals for a board that lacks them (a host, QEMU's MPS2),
//! behind the traits the drivers take: a GNSS receiver's UART giving `GGA` and
//! `RMC` once a second, a tire receiver's I2C registers for four wheels, a
//! fuel sender's ADC channel. Each reads the time from a function the board
//! gives (Unix seconds), so a unit restarted mid-drive finds the vehicle where
//! it is. Integers only: no float formatting ends up in a microcontroller's
//! flash.
//!
//! The vehicle drives out along a straight road for five minutes and back for
//! five, at 28 to 61 km/h; its tires sit at 850.0 to 879.9 kPa and 28 to 31 °C;
//! its tank drains and refills.
//!
//! Pure: the time comes in through the board's function.

use core::fmt::Write as _;

use embedded_hal::i2c::{ErrorKind, ErrorType as I2cErrorType, I2c, NoAcknowledgeSource, Operation};

use fleetline_unit_drivers::fuel::AdcChannel;
use fleetline_unit_drivers::tpms;

/// (year, month, day) of a count of days from 1970-01-01 (proleptic Gregorian).
pub fn civil(days: u64) -> (u32, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as u32, m as u32, d as u32)
}

/// Where vehicle `seed` is at Unix second `t`: latitude and longitude in
/// micro-degrees, speed in tenths of a knot, course in tenths of a degree.
pub fn position(seed: u32, t: u64) -> (i64, i64, u32, u32) {
    let step = (t % 600) as i64;
    let out = step < 300;
    let along = if out { step } else { 600 - step };
    let lat = 52_370_000 + i64::from(seed % 10) * 10_000 + 60 * along;
    let lon = 4_890_000 + 90 * along;
    let knots_10 = 150 + ((t % 90) as u32) * 2;
    (lat, lon, knots_10, if out { 563 } else { 2_363 })
}

/// A line being formatted.
struct Line {
    buf: [u8; 96],
    len: usize,
}

impl Line {
    const fn new() -> Self {
        Self { buf: [0; 96], len: 0 }
    }
    fn text(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(core::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `ddmm.mmmm,H` (or `dddmm.mmmm,H`) of micro-degrees.
fn dm(out: &mut Line, micro: i64, deg_digits: usize, pos: char, neg: char) -> core::fmt::Result {
    let a = micro.unsigned_abs();
    let (deg, frac) = (a / 1_000_000, a % 1_000_000);
    // µ° to 1e-4 minutes.
    let min_e4 = frac * 60 / 100;
    let hemisphere = if micro >= 0 { pos } else { neg };
    write!(out, "{deg:0deg_digits$}{:02}.{:04},{hemisphere}", min_e4 / 10_000, min_e4 % 10_000)
}

/// A GNSS receiver on a UART: each second, `GGA` then `RMC` for that second;
/// every `garble_every`-th sentence (0: none) with one byte corrupted, as on a
/// noisy line. A receiver that was not read for a while reports the current
/// second only.
pub struct GpsUart<T> {
    now_s: T,
    seed: u32,
    garble_every: u32,
    sentences: u32,
    next_s: u64,
    pending: [u8; 192],
    len: usize,
    at: usize,
}

impl<T: FnMut() -> u64> GpsUart<T> {
    /// The receiver of vehicle `seed`; `now_s` gives Unix seconds.
    pub fn new(now_s: T, seed: u32, garble_every: u32) -> Self {
        Self { now_s, seed, garble_every, sentences: 0, next_s: 0, pending: [0; 192], len: 0, at: 0 }
    }

    fn sentence(&mut self, body: &Line) {
        let sum = body.buf[..body.len].iter().fold(0u8, |a, b| a ^ b);
        let mut out = Line::new();
        if write!(out, "${}*{sum:02X}\r\n", body.text()).is_err() {
            return;
        }
        self.sentences = self.sentences.wrapping_add(1);
        if self.garble_every > 0 && self.sentences.is_multiple_of(self.garble_every) {
            out.buf[out.len / 2] ^= 0x04;
        }
        if let Some(dst) = self.pending.get_mut(self.len..self.len + out.len) {
            dst.copy_from_slice(&out.buf[..out.len]);
            self.len += out.len;
        }
    }

    fn refill(&mut self) {
        if self.at < self.len {
            return;
        }
        (self.at, self.len) = (0, 0);
        let t = (self.now_s)();
        if t < self.next_s {
            return;
        }
        self.next_s = t + 1;
        let (lat, lon, knots_10, course_10) = position(self.seed, t);
        let (h, m, s) = ((t / 3600) % 24, (t / 60) % 60, t % 60);
        let (y, mo, d) = civil(t / 86_400);
        let (mut lat_s, mut lon_s) = (Line::new(), Line::new());
        if dm(&mut lat_s, lat, 2, 'N', 'S').is_err() || dm(&mut lon_s, lon, 3, 'E', 'W').is_err() {
            return;
        }
        let (lat_s, lon_s) = (lat_s.text(), lon_s.text());
        let mut gga = Line::new();
        let mut rmc = Line::new();
        let ok = write!(gga, "GPGGA,{h:02}{m:02}{s:02}.000,{lat_s},{lon_s},1,9,0.9,12.5,M,46.0,M,,").is_ok()
            && write!(
                rmc,
                "GPRMC,{h:02}{m:02}{s:02}.000,A,{lat_s},{lon_s},{}.{},{}.{},{d:02}{mo:02}{:02},,,A",
                knots_10 / 10,
                knots_10 % 10,
                course_10 / 10,
                course_10 % 10,
                y % 100
            )
            .is_ok();
        if ok {
            self.sentence(&gga);
            self.sentence(&rmc);
        }
    }
}

impl<T> embedded_io::ErrorType for GpsUart<T> {
    type Error = core::convert::Infallible;
}

impl<T: FnMut() -> u64> embedded_io::ReadReady for GpsUart<T> {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        self.refill();
        Ok(self.at < self.len)
    }
}

impl<T: FnMut() -> u64> embedded_io::Read for GpsUart<T> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.refill();
        let n = buf.len().min(self.len - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Tire receiver register `reg` of vehicle `seed` at Unix second `t`.
pub fn tpms_register(seed: u32, reg: u8, t: u64) -> u8 {
    const WHEELS: u8 = 4;
    match reg {
        0x00 => tpms::WHO_AM_I,
        0x01 => WHEELS,
        r if (0x10..0x10 + 4 * WHEELS).contains(&r) => {
            let (wheel, byte) = (u64::from((r - 0x10) / 4), (r - 0x10) % 4);
            let p = 8_500 + ((t + wheel * 97 + u64::from(seed)) % 300) as u16;
            match byte {
                0 => 0x01,
                1 => (p >> 8) as u8,
                2 => p as u8,
                _ => 28 + ((t / 60 + wheel) % 4) as u8,
            }
        }
        _ => 0,
    }
}

/// The I2C bus with a tire receiver of four wheels at [`tpms::ADDRESS`].
pub struct TpmsBus<T> {
    now_s: T,
    seed: u32,
}

impl<T: FnMut() -> u64> TpmsBus<T> {
    /// The receiver of vehicle `seed`.
    pub fn new(now_s: T, seed: u32) -> Self {
        Self { now_s, seed }
    }
}

/// Nothing answered at that address.
#[derive(Debug)]
pub struct Nack;

impl embedded_hal::i2c::Error for Nack {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)
    }
}

impl<T> I2cErrorType for TpmsBus<T> {
    type Error = Nack;
}

impl<T: FnMut() -> u64> I2c for TpmsBus<T> {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<(), Nack> {
        if address != tpms::ADDRESS {
            return Err(Nack);
        }
        let t = (self.now_s)();
        let mut reg = 0u8;
        for op in operations {
            match op {
                Operation::Write(w) => reg = *w.first().ok_or(Nack)?,
                Operation::Read(r) => {
                    for b in r.iter_mut() {
                        *b = tpms_register(self.seed, reg, t);
                        reg = reg.wrapping_add(1);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A fuel sender: the raw value falls by one a second and wraps (a refill).
pub struct FuelAdc<T> {
    now_s: T,
    seed: u32,
}

impl<T: FnMut() -> u64> FuelAdc<T> {
    /// The sender of vehicle `seed`.
    pub fn new(now_s: T, seed: u32) -> Self {
        Self { now_s, seed }
    }
}

impl<T: FnMut() -> u64> AdcChannel for FuelAdc<T> {
    type Error = core::convert::Infallible;
    fn read(&mut self) -> Result<u16, Self::Error> {
        let t = (self.now_s)() + u64::from(self.seed) * 7;
        Ok(3_600 - (t % 3_000) as u16)
    }
}

#[cfg(test)]
mod tests;
