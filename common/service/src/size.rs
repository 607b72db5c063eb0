//! Sizes in configuration files.

use serde::{Deserialize, Deserializer};

/// Why a size does not parse.
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    /// No number in front.
    #[error("{0:?} is not a size")]
    NotASize(String),
    /// A unit that is not B, KiB, MiB, GiB, KB, MB or GB.
    #[error("unknown size unit {unit:?} in {text:?}")]
    UnknownUnit {
        /// The unit.
        unit: String,
        /// The whole text.
        text: String,
    },
}

/// A byte size written as `"16 MiB"`, `"512KiB"`, `"1GB"` or a plain number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a size with an optional unit (B, KiB, MiB, GiB, KB, MB, GB).
    pub fn parse(s: &str) -> Result<Self, SizeError> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num.parse().map_err(|_| SizeError::NotASize(s.to_string()))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" | "k" => 1 << 10,
            "mib" | "m" => 1 << 20,
            "gib" | "g" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            other => return Err(SizeError::UnknownUnit { unit: other.to_string(), text: s.to_string() }),
        };
        Ok(Self((n * mult as f64) as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            N(u64),
            S(String),
        }
        match Repr::deserialize(d)? {
            Repr::N(n) => Ok(Self(n)),
            Repr::S(s) => Self::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("16 MiB").unwrap().0, 16 << 20);
        assert_eq!(ByteSize::parse("512KiB").unwrap().0, 512 << 10);
        assert_eq!(ByteSize::parse("1GB").unwrap().0, 1_000_000_000);
        assert_eq!(ByteSize::parse("42").unwrap().0, 42);
        assert!(ByteSize::parse("12 parsecs").is_err());
    }
}
