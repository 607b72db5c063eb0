//! The vehicle's peripherals, simulated on the board (QEMU's MPS2 has none of
//! them) behind the traits the drivers take, in integers (no float
//! formatting in flash): a GNSS receiver's UART giving `GGA` and `RMC` once a
//! second on the host's UTC time, a tire receiver's I2C registers for four
//! wheels, a fuel sender's ADC channel.

use core::fmt::Write as _;

use fleetline_unit_drivers::fuel::AdcChannel;
use fleetline_unit_drivers::tpms;

use crate::board::millis;

/// A sentence being formatted.
struct Line {
    buf: [u8; 96],
    len: usize,
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let b = s.as_bytes();
        let end = self.len + b.len();
        self.buf.get_mut(self.len..end).ok_or(core::fmt::Error)?.copy_from_slice(b);
        self.len = end;
        Ok(())
    }
}

/// (year, month, day) of a day count from 1970-01-01.
fn civil(days: u64) -> (u32, u32, u32) {
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

/// `ddmm.mmmm` (or `dddmm.mmmm`) of micro-degrees, with its hemisphere.
fn dm(out: &mut Line, micro: i64, deg_digits: usize, pos: char, neg: char) -> core::fmt::Result {
    let a = micro.unsigned_abs();
    let (deg, frac) = (a / 1_000_000, a % 1_000_000);
    // µ° → 1e-4 minutes.
    let min_e4 = frac * 60 / 100;
    write!(
        out,
        "{deg:0deg_digits$}{:02}.{:04},{}",
        min_e4 / 10_000,
        min_e4 % 10_000,
        if micro >= 0 { pos } else { neg }
    )
}

/// A GNSS receiver on a UART, on the host's clock.
pub struct GpsUart {
    /// Unix second at `millis() == 0`.
    origin_s: u64,
    next_s: u64,
    pending: [u8; 192],
    len: usize,
    at: usize,
}

impl GpsUart {
    /// A receiver whose UTC is the host's at power-up.
    pub fn new(unix_s: u64) -> Self {
        let origin_s = unix_s.saturating_sub(millis() / 1000);
        Self { origin_s, next_s: origin_s + millis() / 1000, pending: [0; 192], len: 0, at: 0 }
    }

    fn sentence(&mut self, body: core::fmt::Arguments<'_>) {
        let mut line = Line { buf: [0; 96], len: 0 };
        if line.write_fmt(body).is_err() {
            return;
        }
        let sum = line.buf[..line.len].iter().fold(0u8, |a, b| a ^ b);
        let mut out = Line { buf: [0; 96], len: 0 };
        if write!(out, "${}*{sum:02X}\r\n", core::str::from_utf8(&line.buf[..line.len]).unwrap_or("")).is_err() {
            return;
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
        self.at = 0;
        self.len = 0;
        let now_s = self.origin_s + millis() / 1000;
        if self.next_s > now_s {
            return;
        }
        // A receiver reports the current second only.
        let t = now_s;
        self.next_s = now_s + 1;
        let step = (t % 600) as i64;
        let (lat, lon) = (52_370_000 + 50 * step, 4_890_000 + 80 * step);
        let knots_10 = 250 + (t % 90) * 2;
        let (h, m, s) = ((t / 3600) % 24, (t / 60) % 60, t % 60);
        let (y, mo, d) = civil(t / 86_400);
        let mut lat_s = Line { buf: [0; 96], len: 0 };
        let mut lon_s = Line { buf: [0; 96], len: 0 };
        if dm(&mut lat_s, lat, 2, 'N', 'S').is_err() || dm(&mut lon_s, lon, 3, 'E', 'W').is_err() {
            return;
        }
        let lat_s = core::str::from_utf8(&lat_s.buf[..lat_s.len]).unwrap_or("");
        let lon_s = core::str::from_utf8(&lon_s.buf[..lon_s.len]).unwrap_or("");
        self.sentence(format_args!("GPGGA,{h:02}{m:02}{s:02}.000,{lat_s},{lon_s},1,9,0.9,12.5,M,46.0,M,,"));
        self.sentence(format_args!(
            "GPRMC,{h:02}{m:02}{s:02}.000,A,{lat_s},{lon_s},{}.{},45.0,{d:02}{mo:02}{:02},,,A",
            knots_10 / 10,
            knots_10 % 10,
            y % 100
        ));
    }
}

impl embedded_io::ErrorType for GpsUart {
    type Error = core::convert::Infallible;
}

impl embedded_io::ReadReady for GpsUart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        self.refill();
        Ok(self.at < self.len)
    }
}

impl embedded_io::Read for GpsUart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.refill();
        let n = buf.len().min(self.len - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// An I2C bus with a tire receiver of four wheels at [`tpms::ADDRESS`].
pub struct TpmsBus;

/// Nothing answered at that address.
#[derive(Debug)]
pub struct Nack;

impl embedded_hal::i2c::Error for Nack {
    fn kind(&self) -> embedded_hal::i2c::ErrorKind {
        embedded_hal::i2c::ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address)
    }
}

impl embedded_hal::i2c::ErrorType for TpmsBus {
    type Error = Nack;
}

fn register(reg: u8, t: u64) -> u8 {
    const WHEELS: u8 = 4;
    match reg {
        0x00 => tpms::WHO_AM_I,
        0x01 => WHEELS,
        r if (0x10..0x10 + 4 * WHEELS).contains(&r) => {
            let (wheel, byte) = (u64::from((r - 0x10) / 4), (r - 0x10) % 4);
            // 850.0..879.9 kPa, 28..31 °C.
            let p = 8_500 + ((t + wheel * 97) % 300) as u16;
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

impl embedded_hal::i2c::I2c for TpmsBus {
    fn transaction(&mut self, address: u8, operations: &mut [embedded_hal::i2c::Operation<'_>]) -> Result<(), Nack> {
        if address != tpms::ADDRESS {
            return Err(Nack);
        }
        let t = millis() / 1000;
        let mut reg = 0u8;
        for op in operations {
            match op {
                embedded_hal::i2c::Operation::Write(w) => reg = *w.first().ok_or(Nack)?,
                embedded_hal::i2c::Operation::Read(r) => {
                    for b in r.iter_mut() {
                        *b = register(reg, t);
                        reg = reg.wrapping_add(1);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A fuel sender: the tank drains slowly.
pub struct FuelAdc;

impl AdcChannel for FuelAdc {
    type Error = core::convert::Infallible;
    fn read(&mut self) -> Result<u16, Self::Error> {
        Ok(3_600 - ((millis() / 1000) % 3_000) as u16)
    }
}
