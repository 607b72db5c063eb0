//! The signal table: every reading kind with its VSS path, unit, wire type and scale.
//!
//! This table is schema version 1 ([`SCHEMA_V1`]). Kind ids are stable forever: a
//! new signal gets a new id and a new schema version, an id is never reused. The
//! list in this crate's README is checked against the table by a test.

/// Schema id of the table in this file.
pub const SCHEMA_V1: u16 = 1;

/// A reading kind's numeric id on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SignalKind(pub u16);

/// Physical unit of a signal's engineering value (VSS unit names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Kilopascal.
    KiloPascal,
    /// Degree Celsius.
    Celsius,
    /// Percent.
    Percent,
    /// Litre.
    Litre,
    /// Litre per hour.
    LitrePerHour,
    /// Degree (angle or coordinate).
    Degree,
    /// Kilometre per hour.
    KilometrePerHour,
    /// Metre.
    Metre,
    /// Kilometre.
    Kilometre,
}

impl Unit {
    /// The VSS unit symbol.
    pub const fn symbol(self) -> &'static str {
        match self {
            Unit::KiloPascal => "kPa",
            Unit::Celsius => "celsius",
            Unit::Percent => "percent",
            Unit::Litre => "l",
            Unit::LitrePerHour => "l/h",
            Unit::Degree => "degrees",
            Unit::KilometrePerHour => "km/h",
            Unit::Metre => "m",
            Unit::Kilometre => "km",
        }
    }
}

/// How successive raw values of one series are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireType {
    /// First value as a zigzag varint, then zigzag deltas from the previous value.
    Delta,
    /// Like `Delta`, but values live in `0..modulus` and deltas wrap into
    /// `-modulus/2..modulus/2`, so a heading crossing north stays one byte.
    Cyclic {
        /// Size of the value circle in raw units.
        modulus: i64,
    },
}

/// One row of the signal table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SignalSpec {
    /// Wire id.
    pub kind: SignalKind,
    /// COVESA VSS path; also the `signal` column in Parquet.
    pub path: &'static str,
    /// Unit of the engineering value.
    pub unit: Unit,
    /// Encoding of successive raw values.
    pub wire: WireType,
    /// Engineering value = raw × 10^`scale_exp`.
    pub scale_exp: i8,
    /// Lowest valid engineering value.
    pub min: f64,
    /// Highest valid engineering value.
    pub max: f64,
}

/// Why an engineering value cannot be encoded for a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeError {
    /// NaN or infinite.
    NotFinite,
    /// Outside the signal's `min..=max`.
    OutOfRange,
}

const POW10: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

impl SignalSpec {
    /// Multiplier from raw to engineering units.
    pub fn scale(&self) -> f64 {
        let e = self.scale_exp.unsigned_abs() as usize;
        if self.scale_exp < 0 { 1.0 / POW10[e] } else { POW10[e] }
    }

    /// Engineering value to fixed-point raw, rounding to the nearest step.
    pub fn quantize(&self, value: f64) -> Result<i32, QuantizeError> {
        if !value.is_finite() {
            return Err(QuantizeError::NotFinite);
        }
        if value < self.min || value > self.max {
            return Err(QuantizeError::OutOfRange);
        }
        let e = self.scale_exp.unsigned_abs() as usize;
        let scaled = if self.scale_exp < 0 { value * POW10[e] } else { value / POW10[e] };
        // Round half away from zero without libm (not available in core).
        let rounded = if scaled >= 0.0 { scaled + 0.5 } else { scaled - 0.5 };
        let raw = rounded as i64;
        let raw = match self.wire {
            WireType::Cyclic { modulus } => raw.rem_euclid(modulus),
            WireType::Delta => raw,
        };
        i32::try_from(raw).map_err(|_| QuantizeError::OutOfRange)
    }

    /// Fixed-point raw to engineering value.
    pub fn value(&self, raw: i64) -> f64 {
        let e = self.scale_exp.unsigned_abs() as usize;
        if self.scale_exp < 0 { raw as f64 / POW10[e] } else { raw as f64 * POW10[e] }
    }
}

macro_rules! signal {
    ($kind:expr, $path:expr, $unit:ident, $wire:expr, $exp:expr, $min:expr, $max:expr) => {
        SignalSpec {
            kind: SignalKind($kind),
            path: $path,
            unit: Unit::$unit,
            wire: $wire,
            scale_exp: $exp,
            min: $min,
            max: $max,
        }
    };
}

macro_rules! wheel {
    ($pos:expr, $row:literal, $side:literal) => {
        [
            signal!(
                32 + 2 * $pos,
                concat!("Vehicle.Chassis.Axle.Row", $row, ".Wheel.", $side, ".Tire.Pressure"),
                KiloPascal,
                WireType::Delta,
                -1,
                0.0,
                1500.0
            ),
            signal!(
                33 + 2 * $pos,
                concat!("Vehicle.Chassis.Axle.Row", $row, ".Wheel.", $side, ".Tire.Temperature"),
                Celsius,
                WireType::Delta,
                -1,
                -60.0,
                200.0
            ),
        ]
    };
}

const HEADING: WireType = WireType::Cyclic { modulus: 3600 };

const TIRES: [[SignalSpec; 2]; 8] = [
    wheel!(0, "1", "Left"),
    wheel!(1, "1", "Right"),
    wheel!(2, "2", "Left"),
    wheel!(3, "2", "Right"),
    wheel!(4, "3", "Left"),
    wheel!(5, "3", "Right"),
    wheel!(6, "4", "Left"),
    wheel!(7, "4", "Right"),
];

/// Schema version 1, ordered by kind id.
const TABLE: [SignalSpec; 26] = [
    signal!(1, "Vehicle.CurrentLocation.Latitude", Degree, WireType::Delta, -7, -90.0, 90.0),
    signal!(2, "Vehicle.CurrentLocation.Longitude", Degree, WireType::Delta, -7, -180.0, 180.0),
    signal!(3, "Vehicle.Speed", KilometrePerHour, WireType::Delta, -1, 0.0, 400.0),
    signal!(4, "Vehicle.CurrentLocation.Heading", Degree, HEADING, -1, 0.0, 360.0),
    signal!(5, "Vehicle.CurrentLocation.Altitude", Metre, WireType::Delta, -1, -500.0, 9000.0),
    signal!(6, "Vehicle.CurrentLocation.HorizontalAccuracy", Metre, WireType::Delta, -1, 0.0, 10000.0),
    signal!(7, "Vehicle.TraveledDistance", Kilometre, WireType::Delta, -2, 0.0, 20_000_000.0),
    signal!(16, "Vehicle.Powertrain.FuelSystem.RelativeLevel", Percent, WireType::Delta, -1, 0.0, 100.0),
    signal!(17, "Vehicle.Powertrain.FuelSystem.AbsoluteLevel", Litre, WireType::Delta, -1, 0.0, 5000.0),
    signal!(18, "Vehicle.OBD.FuelRate", LitrePerHour, WireType::Delta, -2, 0.0, 1000.0),
    TIRES[0][0],
    TIRES[0][1],
    TIRES[1][0],
    TIRES[1][1],
    TIRES[2][0],
    TIRES[2][1],
    TIRES[3][0],
    TIRES[3][1],
    TIRES[4][0],
    TIRES[4][1],
    TIRES[5][0],
    TIRES[5][1],
    TIRES[6][0],
    TIRES[6][1],
    TIRES[7][0],
    TIRES[7][1],
];

/// Named kinds, for code that produces readings.
pub mod kind {
    use super::SignalKind;

    /// `Vehicle.CurrentLocation.Latitude`.
    pub const LATITUDE: SignalKind = SignalKind(1);
    /// `Vehicle.CurrentLocation.Longitude`.
    pub const LONGITUDE: SignalKind = SignalKind(2);
    /// `Vehicle.Speed`.
    pub const SPEED: SignalKind = SignalKind(3);
    /// `Vehicle.CurrentLocation.Heading`.
    pub const HEADING: SignalKind = SignalKind(4);
    /// `Vehicle.CurrentLocation.Altitude`.
    pub const ALTITUDE: SignalKind = SignalKind(5);
    /// `Vehicle.CurrentLocation.HorizontalAccuracy`.
    pub const HORIZONTAL_ACCURACY: SignalKind = SignalKind(6);
    /// `Vehicle.TraveledDistance` (odometer).
    pub const ODOMETER: SignalKind = SignalKind(7);
    /// `Vehicle.Powertrain.FuelSystem.RelativeLevel`.
    pub const FUEL_RELATIVE_LEVEL: SignalKind = SignalKind(16);
    /// `Vehicle.Powertrain.FuelSystem.AbsoluteLevel`.
    pub const FUEL_ABSOLUTE_LEVEL: SignalKind = SignalKind(17);
    /// `Vehicle.OBD.FuelRate`.
    pub const FUEL_RATE: SignalKind = SignalKind(18);

    /// A wheel position: axle row 1..=4 counted from the front, left or right.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Wheel {
        /// Axle row, 1..=4.
        pub row: u8,
        /// `false` for left, `true` for right.
        pub right: bool,
    }

    impl Wheel {
        fn index(self) -> Option<u16> {
            (1..=4).contains(&self.row).then(|| u16::from(self.row - 1) * 2 + u16::from(self.right))
        }
    }

    /// The first tire kind: wheel `i` has pressure at `TIRE_BASE + 2i` and
    /// temperature at `TIRE_BASE + 2i + 1`.
    const TIRE_BASE: u16 = 32;

    /// `Vehicle.Chassis.Axle.Row{r}.Wheel.{Left|Right}.Tire.Pressure`; `None` for rows past 4.
    pub fn tire_pressure(wheel: Wheel) -> Option<SignalKind> {
        wheel.index().map(|i| SignalKind(TIRE_BASE + 2 * i))
    }

    /// `Vehicle.Chassis.Axle.Row{r}.Wheel.{Left|Right}.Tire.Temperature`; `None` for rows past 4.
    pub fn tire_temperature(wheel: Wheel) -> Option<SignalKind> {
        wheel.index().map(|i| SignalKind(TIRE_BASE + 2 * i + 1))
    }

    /// Wheel positions the table has: four axle rows, left and right.
    pub const WHEELS: usize = 8;

    /// What a tire signal measures.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum TireQuantity {
        /// Gauge pressure, kPa.
        Pressure,
        /// Temperature, °C.
        Temperature,
    }

    /// The wheel (index `(row − 1) · 2 + right`, below [`WHEELS`]) and quantity of a
    /// tire signal; `None` for every other kind. The inverse of [`tire_pressure`]
    /// and [`tire_temperature`].
    #[inline]
    pub fn tire_of(kind: SignalKind) -> Option<(usize, TireQuantity)> {
        let i = usize::from(kind.0.checked_sub(TIRE_BASE)?);
        if i >= 2 * WHEELS {
            return None;
        }
        let quantity = if i % 2 == 0 { TireQuantity::Pressure } else { TireQuantity::Temperature };
        Some((i / 2, quantity))
    }
}

/// Every signal of schema version 1, sorted by kind.
pub static SIGNALS: [SignalSpec; 26] = TABLE;

/// Kinds below this are looked up by index (every kind of the table is).
const DIRECT: usize = 64;

/// Position in the table by kind, `u8::MAX` for none: a lookup per reading on
/// every unit must not search.
static BY_KIND: [u8; DIRECT] = {
    let mut t = [u8::MAX; DIRECT];
    let mut i = 0;
    while i < TABLE.len() {
        let k = TABLE[i].kind.0 as usize;
        if k < DIRECT {
            t[k] = i as u8;
        }
        i += 1;
    }
    t
};

/// Looks a kind up in schema version 1.
pub fn spec(kind: SignalKind) -> Option<&'static SignalSpec> {
    match BY_KIND.get(usize::from(kind.0)) {
        Some(&u8::MAX) => None,
        Some(&i) => SIGNALS.get(usize::from(i)),
        None => SIGNALS.binary_search_by_key(&kind, |s| s.kind).ok().map(|i| &SIGNALS[i]),
    }
}

/// Looks a VSS path up in schema version 1.
pub fn spec_by_path(path: &str) -> Option<&'static SignalSpec> {
    SIGNALS.iter().find(|s| s.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_lookup_agrees_with_a_search() {
        for k in 0..=u16::from(u8::MAX) * 2 {
            let kind = SignalKind(k);
            let searched = SIGNALS.iter().find(|s| s.kind == kind);
            assert_eq!(spec(kind).map(|s| s.kind), searched.map(|s| s.kind), "{k}");
        }
    }

    #[test]
    fn table_is_sorted_unique_and_fits_the_device_raw_type() {
        for pair in SIGNALS.windows(2) {
            assert!(pair[0].kind < pair[1].kind, "{pair:?}");
        }
        for s in &SIGNALS {
            assert!(s.min < s.max);
            assert!(s.quantize(s.min).is_ok() && s.quantize(s.max).is_ok(), "{}", s.path);
            assert!(spec_by_path(s.path).is_some());
        }
    }

    #[test]
    fn quantize_rounds_to_the_nearest_step_and_checks_range() {
        let lat = spec(kind::LATITUDE).unwrap();
        assert_eq!(lat.quantize(52.520_008_4).unwrap(), 525_200_084);
        assert_eq!(lat.quantize(-33.868_820_04).unwrap(), -338_688_200);
        assert_eq!(lat.quantize(91.0), Err(QuantizeError::OutOfRange));
        assert_eq!(lat.quantize(f64::NAN), Err(QuantizeError::NotFinite));
        let heading = spec(kind::HEADING).unwrap();
        assert_eq!(heading.quantize(360.0).unwrap(), 0);
        assert!((heading.value(3599) - 359.9).abs() < 1e-9);
        let wheel = kind::Wheel { row: 2, right: true };
        assert_eq!(
            spec(kind::tire_pressure(wheel).unwrap()).unwrap().path,
            "Vehicle.Chassis.Axle.Row2.Wheel.Right.Tire.Pressure"
        );
        assert!(kind::tire_pressure(kind::Wheel { row: 5, right: false }).is_none());
    }

    #[test]
    fn tire_kinds_map_back_to_their_wheel() {
        use kind::{TireQuantity, WHEELS, Wheel, tire_of, tire_pressure, tire_temperature};
        for i in 0..WHEELS {
            let w = Wheel { row: (i / 2 + 1) as u8, right: i % 2 == 1 };
            assert_eq!(tire_of(tire_pressure(w).unwrap()), Some((i, TireQuantity::Pressure)));
            assert_eq!(tire_of(tire_temperature(w).unwrap()), Some((i, TireQuantity::Temperature)));
        }
        assert_eq!(tire_of(kind::SPEED), None);
        assert_eq!(tire_of(SignalKind(48)), None);
    }
}
