//! The unit's peripherals, simulated behind the traits the firmware's drivers
//! take: a GNSS receiver writing NMEA sentences to a UART once a second, a
//! tire receiver answering on I2C from its register map, a fuel sender on an
//! ADC channel. The vehicle drives a loop at a varying speed; its state
//! follows the host's clock, so a restarted process ("power cut") picks the
//! drive up where it is.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use embedded_hal::i2c::{ErrorType as I2cErrorType, I2c, Operation, SevenBitAddress};
use fleetline_unit_drivers::fuel::AdcChannel;
use fleetline_unit_drivers::tpms;

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Where the simulated vehicle is at Unix second `t`: (lat, lon, km/h, course).
pub(crate) fn position(seed: u64, t: u64) -> (f64, f64, f64, f64) {
    // A circle of ~2 km radius around a depot, one lap per 10 minutes,
    // speed varying over a 90 s cycle.
    let phase = (t % 600) as f64 / 600.0 * std::f64::consts::TAU + seed as f64;
    let (lat0, lon0) = (52.37 + (seed % 10) as f64 * 0.01, 4.89);
    let lat = lat0 + 0.018 * phase.sin();
    let lon = lon0 + 0.029 * phase.cos();
    let speed = 45.0 + 25.0 * ((t % 90) as f64 / 90.0 * std::f64::consts::TAU).sin();
    let course = (phase.to_degrees() + 360.0) % 360.0;
    (lat, lon, speed, course)
}

fn nmea(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("${body}*{sum:02X}\r\n")
}

fn dm(value: f64, deg_digits: usize, pos: char, neg: char) -> String {
    let a = value.abs();
    let deg = a.trunc();
    let min = (a - deg) * 60.0;
    format!("{deg:0deg_digits$}{min:07.4},{}", if value >= 0.0 { pos } else { neg }, deg = deg as u32)
}

/// A GNSS receiver on a UART: `GGA` and `RMC` each second; every
/// `garble_every`-th sentence arrives with a corrupted byte (a noisy line).
pub(crate) struct GpsUart {
    seed: u64,
    next_s: u64,
    pending: VecDeque<u8>,
    sentences: u64,
    garble_every: u64,
}

impl GpsUart {
    /// A receiver for vehicle `seed`.
    pub(crate) fn new(seed: u64, garble_every: u64) -> Self {
        Self { seed, next_s: unix_ms() / 1000, pending: VecDeque::new(), sentences: 0, garble_every }
    }

    fn refill(&mut self) {
        let now_ms = unix_ms();
        while self.next_s * 1000 <= now_ms {
            let t = self.next_s;
            self.next_s += 1;
            // A receiver that fell behind (a stalled process) reports only the newest second.
            if t + 2 < now_ms / 1000 {
                continue;
            }
            let (lat, lon, kmh, course) = position(self.seed, t);
            let (h, m, s) = ((t / 3600) % 24, (t / 60) % 60, t % 60);
            let (y, mo, d) = civil(t / 86_400);
            let lat_s = dm(lat, 2, 'N', 'S');
            let lon_s = dm(lon, 3, 'E', 'W');
            let gga = nmea(&format!("GPGGA,{h:02}{m:02}{s:02}.000,{lat_s},{lon_s},1,9,0.9,12.5,M,46.0,M,,"));
            let rmc = nmea(&format!(
                "GPRMC,{h:02}{m:02}{s:02}.000,A,{lat_s},{lon_s},{:.2},{course:.1},{d:02}{mo:02}{:02},,,A",
                kmh / 1.852,
                y % 100
            ));
            for sentence in [gga, rmc] {
                self.sentences += 1;
                let mut bytes = sentence.into_bytes();
                if self.garble_every > 0 && self.sentences.is_multiple_of(self.garble_every) {
                    let i = bytes.len() / 2;
                    bytes[i] ^= 0x04;
                }
                self.pending.extend(bytes);
            }
        }
    }
}

/// (year, month, day) of a day count from 1970-01-01.
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as u64, m as u64, d as u64)
}

impl embedded_io::ErrorType for GpsUart {
    type Error = std::convert::Infallible;
}

impl embedded_io::ReadReady for GpsUart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        self.refill();
        Ok(!self.pending.is_empty())
    }
}

impl embedded_io::Read for GpsUart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.refill();
        let n = buf.len().min(self.pending.len());
        for (d, s) in buf.iter_mut().zip(self.pending.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

/// The I2C bus with a tire receiver of four wheels at [`tpms::ADDRESS`].
pub(crate) struct TpmsBus {
    seed: u64,
    reads: u32,
}

impl TpmsBus {
    /// The receiver of vehicle `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self { seed, reads: 0 }
    }

    fn register(&self, reg: u8, t: u64) -> u8 {
        const WHEELS: u8 = 4;
        match reg {
            0x00 => tpms::WHO_AM_I,
            0x01 => WHEELS,
            r if (0x10..0x10 + 4 * WHEELS).contains(&r) => {
                let (wheel, byte) = (u64::from((r - 0x10) / 4), (r - 0x10) % 4);
                // 850 kPa ± a slow wave per wheel, 30 °C ± 8.
                let wave = (((t + wheel * 97 + self.seed) % 300) as f64 / 300.0 * std::f64::consts::TAU).sin();
                let p = (8_500.0 + 150.0 * wave) as u16;
                let c = (30.0 + 8.0 * wave) as i8;
                match byte {
                    0 => 0x01,
                    1 => (p >> 8) as u8,
                    2 => p as u8,
                    _ => c as u8,
                }
            }
            _ => 0,
        }
    }
}

/// The bus failed (never, here; the drivers' tests script failures).
#[derive(Debug)]
pub(crate) struct BusError;

impl embedded_hal::i2c::Error for BusError {
    fn kind(&self) -> embedded_hal::i2c::ErrorKind {
        embedded_hal::i2c::ErrorKind::Other
    }
}

impl I2cErrorType for TpmsBus {
    type Error = BusError;
}

impl I2c<SevenBitAddress> for TpmsBus {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<(), BusError> {
        if address != tpms::ADDRESS {
            return Err(BusError);
        }
        self.reads += 1;
        let t = unix_ms() / 1000;
        let mut reg = 0u8;
        for op in operations {
            match op {
                Operation::Write(w) => reg = *w.first().ok_or(BusError)?,
                Operation::Read(r) => {
                    for b in r.iter_mut() {
                        *b = self.register(reg, t);
                        reg = reg.wrapping_add(1);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A fuel sender: the tank drains 0.5 % of its raw span a minute and refills at the bottom.
pub(crate) struct FuelAdc {
    seed: u64,
}

impl FuelAdc {
    /// The sender of vehicle `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self { seed }
    }
}

impl AdcChannel for FuelAdc {
    type Error = std::convert::Infallible;
    fn read(&mut self) -> Result<u16, Self::Error> {
        let minutes = unix_ms() / 60_000 + self.seed * 7;
        Ok(3_600 - ((minutes * 16) % 3_000) as u16)
    }
}

#[cfg(test)]
mod tests {
    use fleetline_unit_drivers::gps::NmeaParser;

    use super::*;

    #[test]
    fn sentences_parse_with_the_firmwares_driver_and_carry_the_time() {
        let t = 1_790_000_123;
        let (lat, lon, kmh, _) = position(3, t);
        let (y, mo, d) = civil(t / 86_400);
        assert_eq!((y, mo, d), (2026, 9, 21));
        let (h, m, s) = ((t / 3600) % 24, (t / 60) % 60, t % 60);
        let lat_s = dm(lat, 2, 'N', 'S');
        let lon_s = dm(lon, 3, 'E', 'W');
        let rmc = nmea(&format!(
            "GPRMC,{h:02}{m:02}{s:02}.000,A,{lat_s},{lon_s},{:.2},10.0,{d:02}{mo:02}{:02},,,A",
            kmh / 1.852,
            y % 100
        ));
        let mut parser = NmeaParser::default();
        let mut fix = None;
        parser.feed(rmc.as_bytes(), |f| fix = Some(f));
        let fix = fix.expect("a fix");
        assert_eq!(fix.time_ms, Some(t * 1000));
        assert!((fix.lat - lat).abs() < 1e-5 && (fix.lon - lon).abs() < 1e-5, "{fix:?}");
        assert!((f64::from(fix.speed_kmh.unwrap()) - kmh).abs() < 0.05);
    }
}
