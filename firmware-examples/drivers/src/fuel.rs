//! The tank level from a float sender on an ADC channel, through a
//! calibration table (tanks are not cylinders: litres are not proportional to
//! the sender's voltage).
//!
//! `embedded-hal` 1.0 has no ADC trait, so the channel is [`AdcChannel`]:
//! one blocking conversion. Raw values between calibration points are
//! interpolated linearly; a value outside the table is clamped to its end and
//! counted (a sender that reads below empty or above full is drifting or
//! shorted).

/// One blocking conversion of an ADC channel.
pub trait AdcChannel {
    /// Why a conversion failed.
    type Error;
    /// A raw sample.
    fn read(&mut self) -> Result<u16, Self::Error>;
}

/// Most calibration points.
pub const MAX_POINTS: usize = 16;

/// Why a calibration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibrationError {
    /// Fewer than two points, or more than [`MAX_POINTS`].
    Points,
    /// Raw values must rise strictly from point to point.
    NotRising,
    /// Litres must not be negative or fall from point to point.
    Litres,
}

/// Raw ADC value → litres, piecewise linear.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    points: [(u16, f32); MAX_POINTS],
    len: usize,
}

impl Calibration {
    /// A table of (raw, litres) points, raw rising.
    pub fn new(points: &[(u16, f32)]) -> Result<Self, CalibrationError> {
        if points.len() < 2 || points.len() > MAX_POINTS {
            return Err(CalibrationError::Points);
        }
        for w in points.windows(2) {
            if w[1].0 <= w[0].0 {
                return Err(CalibrationError::NotRising);
            }
            // NaN litres fail this too.
            if w[1].1.partial_cmp(&w[0].1).is_none_or(core::cmp::Ordering::is_lt) {
                return Err(CalibrationError::Litres);
            }
        }
        if points[0].1.partial_cmp(&0.0).is_none_or(core::cmp::Ordering::is_lt)
            || !points[points.len() - 1].1.is_finite()
        {
            return Err(CalibrationError::Litres);
        }
        let mut table = [(0, 0.0); MAX_POINTS];
        table[..points.len()].copy_from_slice(points);
        Ok(Self { points: table, len: points.len() })
    }

    /// Litres for `raw`, and whether it lay within the table.
    pub fn litres(&self, raw: u16) -> (f32, bool) {
        let p = &self.points[..self.len];
        if raw < p[0].0 {
            return (p[0].1, false);
        }
        if raw > p[self.len - 1].0 {
            return (p[self.len - 1].1, false);
        }
        let i = p.iter().position(|(r, _)| *r >= raw).unwrap_or(self.len - 1);
        if p[i].0 == raw || i == 0 {
            return (p[i].1, true);
        }
        let (r0, l0) = p[i - 1];
        let (r1, l1) = p[i];
        (l0 + (l1 - l0) * f32::from(raw - r0) / f32::from(r1 - r0), true)
    }
}

/// What the gauge saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuelStats {
    /// Readings within the calibration.
    pub readings: u32,
    /// Raw values outside the calibration (clamped).
    pub out_of_range: u32,
    /// Conversions that failed.
    pub adc_errors: u32,
}

/// The fuel gauge.
#[derive(Debug)]
pub struct FuelGauge<A> {
    adc: A,
    calibration: Calibration,
    stats: FuelStats,
}

/// A reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Level {
    /// Litres in the tank.
    pub litres: f32,
    /// The raw value lay outside the calibration (litres clamped to its end).
    pub clamped: bool,
}

impl<A: AdcChannel> FuelGauge<A> {
    /// A gauge on `adc` with `calibration`.
    pub fn new(adc: A, calibration: Calibration) -> Self {
        Self { adc, calibration, stats: FuelStats::default() }
    }

    /// One conversion through the calibration.
    pub fn read(&mut self) -> Result<Level, A::Error> {
        let raw = self.adc.read().inspect_err(|_| self.stats.adc_errors += 1)?;
        let (litres, within) = self.calibration.litres(raw);
        if within {
            self.stats.readings += 1;
        } else {
            self.stats.out_of_range += 1;
        }
        Ok(Level { litres, clamped: !within })
    }

    /// What the gauge saw.
    pub fn stats(&self) -> FuelStats {
        self.stats
    }
}
