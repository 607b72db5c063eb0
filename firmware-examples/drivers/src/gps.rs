//! NMEA 0183 from a GNSS receiver's UART.
//!
//! Bytes become sentences in a fixed 82-byte line buffer (the standard's
//! longest sentence); a sentence is used only when it starts with `$`, ends in
//! a checksum that matches, and parses as `GGA` or `RMC`. Anything else is
//! counted and dropped: an overlong line, a bad checksum, a sentence that does
//! not parse, bytes between sentences. `GGA` gives the position and satellites,
//! `RMC` speed over ground, course and validity; a [`Fix`] is reported on each
//! valid `RMC` (receivers send it once per epoch), with the latest `GGA`'s
//! altitude and satellites.

/// Longest NMEA sentence, `$` to `\n` inclusive.
pub const MAX_SENTENCE: usize = 82;

/// A position fix.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fix {
    /// Latitude, degrees (north positive).
    pub lat: f64,
    /// Longitude, degrees (east positive).
    pub lon: f64,
    /// Speed over ground, km/h.
    pub speed_kmh: Option<f32>,
    /// Course over ground, degrees from true north.
    pub course_deg: Option<f32>,
    /// Altitude above mean sea level, m (from the latest `GGA`).
    pub altitude_m: Option<f32>,
    /// Satellites used (from the latest `GGA`).
    pub satellites: Option<u32>,
    /// The fix's UTC time from the `RMC`'s date and time, Unix milliseconds:
    /// the unit's clock, since a receiver with a fix knows the time to a
    /// microsecond. `None` when the sentence has no date or time.
    pub time_ms: Option<u64>,
}

/// Unix milliseconds of a UTC date and time of day.
fn unix_ms(date: chrono::NaiveDate, time: chrono::NaiveTime) -> Option<u64> {
    use chrono::{Datelike, Timelike};
    // Days from the civil date (proleptic Gregorian), without tables.
    let (y, m, d) = (i64::from(date.year()), i64::from(date.month()), i64::from(date.day()));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + i64::from(time.num_seconds_from_midnight());
    let ms = secs.checked_mul(1000)? + i64::from(time.nanosecond() / 1_000_000);
    u64::try_from(ms).ok()
}

/// What the driver dropped and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpsStats {
    /// Sentences that passed the checksum.
    pub sentences: u32,
    /// Fixes reported.
    pub fixes: u32,
    /// Sentences whose checksum did not match, or had none.
    pub checksum_errors: u32,
    /// Sentences that passed the checksum but did not parse (or were not
    /// `GGA`/`RMC`, counted apart in `ignored`).
    pub unparsable: u32,
    /// Well-formed sentences of other types.
    pub ignored: u32,
    /// Lines longer than [`MAX_SENTENCE`].
    pub overlong: u32,
    /// Bytes outside any sentence (noise between lines).
    pub noise_bytes: u32,
    /// `RMC` sentences saying the receiver has no fix.
    pub no_fix: u32,
    /// Reads from the UART that failed.
    pub read_errors: u32,
}

/// Sentence assembly and parsing; feed it bytes.
#[derive(Debug)]
pub struct NmeaParser {
    line: [u8; MAX_SENTENCE],
    len: usize,
    /// In a line that outgrew the buffer: drop bytes until its end.
    skipping: bool,
    last_gga: Option<(Option<f32>, Option<u32>)>,
    stats: GpsStats,
}

impl Default for NmeaParser {
    fn default() -> Self {
        Self { line: [0; MAX_SENTENCE], len: 0, skipping: false, last_gga: None, stats: GpsStats::default() }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// The sentence between `$` and `*` if its two checksum digits match the XOR
/// of those bytes.
fn checked(line: &[u8]) -> Option<&str> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let body = line.strip_prefix(b"$")?;
    let star = body.iter().rposition(|b| *b == b'*')?;
    let (data, sum) = (&body[..star], &body[star + 1..]);
    if sum.len() != 2 {
        return None;
    }
    let want = (hex(sum[0])? << 4) | hex(sum[1])?;
    let got = data.iter().fold(0u8, |a, b| a ^ b);
    if got != want {
        return None;
    }
    core::str::from_utf8(line).ok()
}

impl NmeaParser {
    /// What was dropped and why.
    pub fn stats(&self) -> GpsStats {
        self.stats
    }

    /// Takes bytes as they came from the UART; calls `on_fix` for every fix.
    pub fn feed(&mut self, bytes: &[u8], mut on_fix: impl FnMut(Fix)) {
        for &b in bytes {
            if let Some(fix) = self.byte(b) {
                on_fix(fix);
            }
        }
    }

    fn byte(&mut self, b: u8) -> Option<Fix> {
        if b == b'$' {
            if self.len > 0 && !self.skipping {
                // A sentence that never ended: its bytes were noise.
                self.stats.noise_bytes += self.len as u32;
            }
            self.skipping = false;
            self.line[0] = b;
            self.len = 1;
            return None;
        }
        if b == b'\n' {
            let fix = if self.skipping || self.len == 0 { None } else { self.sentence() };
            self.len = 0;
            self.skipping = false;
            return fix;
        }
        if self.skipping {
            return None;
        }
        if self.len == 0 {
            self.stats.noise_bytes += 1;
            return None;
        }
        if self.len == MAX_SENTENCE {
            self.stats.overlong += 1;
            self.skipping = true;
            self.len = 0;
            return None;
        }
        self.line[self.len] = b;
        self.len += 1;
        None
    }

    fn sentence(&mut self) -> Option<Fix> {
        let line = &self.line[..self.len];
        let Some(text) = checked(line) else {
            self.stats.checksum_errors += 1;
            return None;
        };
        self.stats.sentences += 1;
        let kind = text.get(3..6);
        if !matches!(kind, Some("GGA" | "RMC")) {
            self.stats.ignored += 1;
            return None;
        }
        match nmea::parse_str(text) {
            Ok(nmea::ParseResult::GGA(g)) => {
                self.last_gga = Some((g.altitude, g.fix_satellites));
                None
            }
            Ok(nmea::ParseResult::RMC(r)) => {
                let (Some(lat), Some(lon)) = (r.lat, r.lon) else {
                    self.stats.no_fix += 1;
                    return None;
                };
                if r.status_of_fix == nmea::sentences::rmc::RmcStatusOfFix::Invalid {
                    self.stats.no_fix += 1;
                    return None;
                }
                if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                    self.stats.unparsable += 1;
                    return None;
                }
                self.stats.fixes += 1;
                let (altitude_m, satellites) = self.last_gga.unwrap_or((None, None));
                Some(Fix {
                    lat,
                    lon,
                    speed_kmh: r.speed_over_ground.map(|knots| knots * 1.852),
                    course_deg: r.true_course,
                    altitude_m,
                    satellites,
                    time_ms: r.fix_date.zip(r.fix_time).and_then(|(d, t)| unix_ms(d, t)),
                })
            }
            _ => {
                self.stats.unparsable += 1;
                None
            }
        }
    }
}

/// A GNSS receiver on a UART (anything `embedded_io::Read`).
#[derive(Debug)]
pub struct Gps<R> {
    uart: R,
    parser: NmeaParser,
}

impl<R: embedded_io::Read> Gps<R> {
    /// A receiver on `uart`.
    pub fn new(uart: R) -> Self {
        Self { uart, parser: NmeaParser::default() }
    }

    /// Reads what the UART has (one read, at most 64 bytes) and returns the
    /// newest fix among it. A failed read is counted and returned.
    pub fn poll(&mut self) -> Result<Option<Fix>, R::Error> {
        let mut buf = [0u8; 64];
        let n = match self.uart.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                self.parser.stats.read_errors += 1;
                return Err(e);
            }
        };
        let mut newest = None;
        self.parser.feed(&buf[..n], |f| newest = Some(f));
        Ok(newest)
    }

    /// What was dropped and why.
    pub fn stats(&self) -> GpsStats {
        self.parser.stats()
    }
}

impl<R: embedded_io::Read + embedded_io::ReadReady> Gps<R> {
    /// Like [`Gps::poll`], without waiting: `Ok(None)` when the UART holds
    /// nothing yet. For a main loop that must not block on the receiver.
    pub fn poll_ready(&mut self) -> Result<Option<Fix>, R::Error> {
        match self.uart.read_ready() {
            Ok(true) => self.poll(),
            Ok(false) => Ok(None),
            Err(e) => {
                self.parser.stats.read_errors += 1;
                Err(e)
            }
        }
    }
}
