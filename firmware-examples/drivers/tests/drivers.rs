//! Every driver against scripted buses: good data, bus errors and garbage,
//! counted and never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction};
use fleetline_unit_drivers::fuel::{AdcChannel, Calibration, CalibrationError, FuelGauge};
use fleetline_unit_drivers::gps::{Gps, NmeaParser};
use fleetline_unit_drivers::tpms::{self, Error, MAX_WHEELS, Tpms};

fn gga() -> String {
    with_checksum("GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,")
}

fn rmc() -> String {
    with_checksum("GPRMC,092750.000,A,5321.6802,N,00630.3372,W,20.5,54.7,280511,,,A")
}

fn with_checksum(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("${body}*{sum:02X}\r\n")
}

#[test]
fn gga_then_rmc_gives_a_fix_in_km_h() {
    let mut p = NmeaParser::default();
    let mut fixes = Vec::new();
    p.feed(gga().as_bytes(), |f| fixes.push(f));
    p.feed(rmc().as_bytes(), |f| fixes.push(f));
    assert_eq!(fixes.len(), 1, "{:?}", p.stats());
    let f = fixes[0];
    assert!((f.lat - 53.361_336).abs() < 1e-5 && (f.lon + 6.505_62).abs() < 1e-5, "{f:?}");
    assert!((f.speed_kmh.unwrap() - 37.966).abs() < 1e-3);
    assert_eq!((f.satellites, f.altitude_m), (Some(8), Some(61.7)));
    // 2011-05-28 09:27:50 UTC: the unit's clock comes from the fix.
    assert_eq!(f.time_ms, Some(1_306_574_870_000));
    assert_eq!(p.stats().sentences, 2);
}

#[test]
fn the_fix_time_counts_leap_days_and_milliseconds() {
    let mut p = NmeaParser::default();
    let mut times = Vec::new();
    for body in [
        "GPRMC,235959.250,A,5321.6802,N,00630.3372,W,0.0,0.0,290224,,,A",
        "GPRMC,000000.000,A,5321.6802,N,00630.3372,W,0.0,0.0,010300,,,A",
        // No date: a fix, but no time.
        "GPRMC,000000.000,A,5321.6802,N,00630.3372,W,0.0,0.0,,,,A",
    ] {
        p.feed(with_checksum(body).as_bytes(), |f| times.push(f.time_ms));
    }
    assert_eq!(times, [Some(1_709_251_199_250), Some(951_868_800_000), None]);
}

#[test]
fn garbage_is_counted_and_the_next_good_sentence_still_parses() {
    let mut p = NmeaParser::default();
    let mut fixes = 0;
    // Noise, a flipped byte (checksum), no checksum, an overlong line, a
    // sentence of another type, a valid-checksum sentence that does not
    // parse, a cut-off sentence, a "no fix" RMC — then a good one.
    let mut flipped = rmc().into_bytes();
    flipped[20] ^= 0x01;
    let overlong = format!("$GPRMC,{}\r\n", "9".repeat(120));
    let inputs: Vec<Vec<u8>> = vec![
        b"\x00\xff garbage \r\n".to_vec(),
        flipped,
        b"$GPRMC,092750.000,A,5321.6802,N\r\n".to_vec(),
        overlong.into_bytes(),
        with_checksum("GPGSV,3,1,11,03,03,111,00").into_bytes(),
        with_checksum("GPRMC,xx,A,yy,N,zz,W,aa,bb,cc,,,A").into_bytes(),
        b"$GPGGA,0927".to_vec(),
        with_checksum("GPRMC,092750.000,V,,,,,,,280511,,,N").into_bytes(),
        rmc().as_bytes().to_vec(),
    ];
    for i in &inputs {
        p.feed(i, |_| fixes += 1);
    }
    let s = p.stats();
    assert_eq!(fixes, 1, "{s:?}");
    assert_eq!(s.checksum_errors, 2, "{s:?}");
    assert_eq!(s.overlong, 1);
    assert_eq!(s.ignored, 1);
    assert_eq!(s.unparsable, 1);
    assert_eq!(s.no_fix, 1);
    assert!(s.noise_bytes >= 12, "{s:?}");
    // Every byte value, in any order, never panics.
    let mut all: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    all.rotate_left(77);
    p.feed(&all, |_| {});
}

/// A UART that hands out scripted chunks, then errors, then nothing.
struct Uart {
    chunks: Vec<Result<Vec<u8>, ()>>,
}

#[derive(Debug)]
struct UartError;

impl embedded_io::Error for UartError {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = UartError;
}

impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, UartError> {
        if self.chunks.is_empty() {
            return Ok(0);
        }
        match self.chunks.remove(0) {
            Ok(c) => {
                let n = c.len().min(buf.len());
                buf[..n].copy_from_slice(&c[..n]);
                if n < c.len() {
                    self.chunks.insert(0, Ok(c[n..].to_vec()));
                }
                Ok(n)
            }
            Err(()) => Err(UartError),
        }
    }
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, UartError> {
        match self.chunks.first() {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(())) => {
                let _ = self.chunks.remove(0);
                Err(UartError)
            }
        }
    }
}

#[test]
fn poll_ready_never_waits_and_counts_a_failing_uart() {
    let rmc = rmc().into_bytes();
    let mut gps = Gps::new(Uart { chunks: vec![Err(()), Ok(rmc)] });
    assert!(gps.poll_ready().is_err());
    // A read takes at most 64 bytes: the sentence completes on the second.
    assert_eq!(gps.poll_ready().unwrap(), None);
    assert!(gps.poll_ready().unwrap().is_some());
    // Nothing more on the line: no wait, no fix.
    assert_eq!(gps.poll_ready().unwrap(), None);
    assert_eq!((gps.stats().read_errors, gps.stats().fixes), (1, 1));
}

#[test]
fn a_uart_split_mid_sentence_and_a_failed_read() {
    let rmc = rmc().into_bytes();
    let mut gps = Gps::new(Uart { chunks: vec![Ok(rmc[..30].to_vec()), Err(()), Ok(rmc[30..].to_vec())] });
    assert_eq!(gps.poll().unwrap(), None);
    assert!(gps.poll().is_err());
    let fix = gps.poll().unwrap().expect("the sentence completes across the failed read");
    assert!(fix.lat > 53.0);
    assert_eq!(gps.poll().unwrap(), None);
    assert_eq!((gps.stats().read_errors, gps.stats().fixes), (1, 1));
}

fn wheel(status: u8, deci_kpa: u16, temp: i8) -> [u8; 4] {
    let p = deci_kpa.to_be_bytes();
    [status, p[0], p[1], temp as u8]
}

#[test]
fn tpms_reads_every_paired_wheel() {
    let regs: Vec<u8> =
        [wheel(0x01, 8_870, 31), wheel(0x03, 8_580, 35), wheel(0x80, 0, 0), wheel(0x00, 0xffff, 0)].concat();
    let expectations = [
        Transaction::write_read(tpms::ADDRESS, vec![0x00], vec![tpms::WHO_AM_I]),
        Transaction::write_read(tpms::ADDRESS, vec![0x01], vec![4]),
        Transaction::write_read(tpms::ADDRESS, vec![0x10], regs),
    ];
    let bus = I2cMock::new(&expectations);
    let mut t = Tpms::new(bus, tpms::ADDRESS).unwrap();
    let mut out = [None; MAX_WHEELS];
    assert_eq!(t.read(&mut out).unwrap(), 4);
    let w0 = out[0].unwrap();
    assert_eq!((w0.pressure_kpa, w0.temperature_c, w0.fresh, w0.battery_low), (887.0, 31.0, true, false));
    let w1 = out[1].unwrap();
    assert!(w1.battery_low && (w1.pressure_kpa - 858.0).abs() < 1e-3);
    assert!(out[2].is_none() && out[3].is_none());
    assert_eq!((t.stats().readings, t.stats().missing), (2, 2));
    t.release().done();
}

#[test]
fn tpms_bus_errors_and_garbage_are_errors_and_counted() {
    // Something else at the address.
    let mut bus = I2cMock::new(&[Transaction::write_read(tpms::ADDRESS, vec![0x00], vec![0x68])]);
    assert!(matches!(Tpms::new(bus.clone(), tpms::ADDRESS), Err(Error::NotTpms(0x68))));
    bus.done();
    // Nothing answers yet: the bus comes back for the next probe, which finds the receiver.
    let bus = I2cMock::new(&[
        Transaction::write_read(tpms::ADDRESS, vec![0x00], vec![0]).with_error(embedded_hal::i2c::ErrorKind::Bus),
        Transaction::write_read(tpms::ADDRESS, vec![0x00], vec![tpms::WHO_AM_I]),
    ]);
    let Err((bus, Error::Bus(_))) = Tpms::probe(bus, tpms::ADDRESS) else { panic!("a bus error") };
    let found = Tpms::probe(bus, tpms::ADDRESS).map_err(|(_, e)| e).expect("found on the second probe");
    found.release().done();
    let expectations = [
        Transaction::write_read(tpms::ADDRESS, vec![0x00], vec![tpms::WHO_AM_I]),
        // A bus error, then more wheels than a receiver pairs, then a pressure
        // no tire has, then a good read.
        Transaction::write_read(tpms::ADDRESS, vec![0x01], vec![0]).with_error(embedded_hal::i2c::ErrorKind::Bus),
        Transaction::write_read(tpms::ADDRESS, vec![0x01], vec![200]),
        Transaction::write_read(tpms::ADDRESS, vec![0x01], vec![1]),
        Transaction::write_read(tpms::ADDRESS, vec![0x10], wheel(0x01, 60_000, 20).to_vec()),
        Transaction::write_read(tpms::ADDRESS, vec![0x01], vec![1]),
        Transaction::write_read(tpms::ADDRESS, vec![0x10], wheel(0x01, 8_800, 20).to_vec()),
    ];
    let mut t = Tpms::new(I2cMock::new(&expectations), tpms::ADDRESS).unwrap();
    let mut out = [None; MAX_WHEELS];
    assert!(matches!(t.read(&mut out), Err(Error::Bus(_))));
    assert!(matches!(t.read(&mut out), Err(Error::Garbage)));
    assert!(matches!(t.read(&mut out), Err(Error::Garbage)));
    assert_eq!(t.read(&mut out).unwrap(), 1);
    assert_eq!(out[0].unwrap().pressure_kpa, 880.0);
    let s = t.stats();
    assert_eq!((s.bus_errors, s.garbage, s.readings), (1, 2, 1));
    t.release().done();
}

/// An ADC that returns scripted conversions.
struct Adc(Vec<Result<u16, ()>>);

impl AdcChannel for Adc {
    type Error = ();
    fn read(&mut self) -> Result<u16, ()> {
        self.0.remove(0)
    }
}

#[test]
fn fuel_interpolates_clamps_and_counts() {
    // A tank narrower at the bottom: litres rise faster with the sender at the top.
    let cal = Calibration::new(&[(400, 0.0), (1_600, 100.0), (3_600, 400.0)]).unwrap();
    let mut g = FuelGauge::new(Adc(vec![Ok(1_000), Ok(2_600), Ok(100), Ok(4_095), Err(()), Ok(400)]), cal);
    assert!((g.read().unwrap().litres - 50.0).abs() < 1e-4);
    assert!((g.read().unwrap().litres - 250.0).abs() < 1e-3);
    let low = g.read().unwrap();
    assert!(low.clamped && low.litres == 0.0);
    let high = g.read().unwrap();
    assert!(high.clamped && high.litres == 400.0);
    assert!(g.read().is_err());
    assert_eq!(g.read().unwrap().litres, 0.0);
    let s = g.stats();
    assert_eq!((s.readings, s.out_of_range, s.adc_errors), (3, 2, 1));
}

#[test]
fn bad_calibrations_are_refused() {
    assert_eq!(Calibration::new(&[(1, 0.0)]), Err(CalibrationError::Points));
    assert_eq!(Calibration::new(&[(5, 0.0), (5, 1.0)]), Err(CalibrationError::NotRising));
    assert_eq!(Calibration::new(&[(1, 5.0), (2, 1.0)]), Err(CalibrationError::Litres));
    assert_eq!(Calibration::new(&[(1, -1.0), (2, 1.0)]), Err(CalibrationError::Litres));
    assert_eq!(Calibration::new(&[(1, 0.0), (2, f32::NAN)]), Err(CalibrationError::Litres));
}
