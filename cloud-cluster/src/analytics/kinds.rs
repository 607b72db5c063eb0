//! Event kinds: the `kind` column of `events`, alert payloads and counters.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What an event found. Stored and sent by name (`slow_leak`, …), so checkpoints
/// and the dataset read the same as when kinds were plain strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A tire well below the vehicle's other tires.
    LowPressure,
    /// A tire losing pressure steadily (temperature-compensated).
    SlowLeak,
    /// A tire losing a large part of its pressure between two readings.
    Puncture,
    /// Fuel leaving the tank while the vehicle stands.
    FuelTheft,
    /// The tank level rising.
    Refuel,
    /// Speed above the limit for longer than the hold time.
    Overspeed,
    /// A unit its gateway no longer hears while it hears others.
    Silent,
    /// The tire-risk model's score crossed its alert threshold (a leak or
    /// puncture predicted; raised by a live variant, never by a shadow).
    TireRisk,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [Self; 8] = [
        Self::LowPressure,
        Self::SlowLeak,
        Self::Puncture,
        Self::FuelTheft,
        Self::Refuel,
        Self::Overspeed,
        Self::Silent,
        Self::TireRisk,
    ];

    /// Its name in the datasets and alerts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LowPressure => "low_pressure",
            Self::SlowLeak => "slow_leak",
            Self::Puncture => "puncture",
            Self::FuelTheft => "fuel_theft",
            Self::Refuel => "refuel",
            Self::Overspeed => "overspeed",
            Self::Silent => "silent",
            Self::TireRisk => "tire_risk",
        }
    }

    /// The kind of a name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown event kind {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            let json = serde_json::to_string(&k).unwrap_or_default();
            assert_eq!(json, format!("\"{k}\""));
            // Postcard (checkpoints) stores the name too: the same bytes as a string.
            assert_eq!(postcard::to_allocvec(&k).ok(), postcard::to_allocvec(k.as_str()).ok());
        }
        assert_eq!(EventKind::parse("nope"), None);
    }
}
