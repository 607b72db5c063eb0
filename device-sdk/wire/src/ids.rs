//! Fleet and device identifiers: short lowercase ASCII strings, stored inline.
//!
//! An id is `[a-z0-9-]{1,32}`. The alphabet keeps ids safe inside MQTT topics,
//! Parquet partition values and file names without escaping; `/` and `+` can never
//! appear, so a topic can be split on `/` unambiguously.

use core::fmt;

use crate::WireError;

/// Longest fleet or device id, in bytes.
pub const MAX_ID_LEN: usize = 32;

/// An id validated against `[a-z0-9-]{1,32}`, held without allocation.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShortId {
    len: u8,
    bytes: [u8; MAX_ID_LEN],
}

impl ShortId {
    /// Validates `s` and stores it inline.
    pub fn new(s: &str) -> Result<Self, WireError> {
        let raw = s.as_bytes();
        if raw.is_empty() || raw.len() > MAX_ID_LEN {
            return Err(WireError::InvalidId);
        }
        if !raw.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') {
            return Err(WireError::InvalidId);
        }
        let mut bytes = [0u8; MAX_ID_LEN];
        bytes[..raw.len()].copy_from_slice(raw);
        Ok(Self { len: raw.len() as u8, bytes })
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored, so this cannot fail; fall back to "" rather
        // than panic to keep the device side panic-free.
        core::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for ShortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ShortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(ShortId);

        impl $name {
            /// Validates `s` (`[a-z0-9-]{1,32}`).
            pub fn new(s: &str) -> Result<Self, WireError> {
                ShortId::new(s).map(Self)
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl core::str::FromStr for $name {
            type Err = WireError;
            fn from_str(s: &str) -> Result<Self, WireError> {
                Self::new(s)
            }
        }
    };
}

id_newtype!(
    /// The fleet (tenant) a vehicle belongs to.
    FleetId
);
id_newtype!(
    /// One vehicle unit within a fleet.
    DeviceId
);
id_newtype!(
    /// One edge gateway.
    GatewayId
);

/// A gateway's bundle id; unique per gateway. Bundles carry it and bundle acks
/// (control messages) name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct BundleId(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet_only() {
        assert_eq!(DeviceId::new("truck-0042").unwrap().as_str(), "truck-0042");
        assert!(DeviceId::new(&"a".repeat(32)).is_ok());
        for bad in ["", "Truck", "a/b", "a+b", "a b", "é", "#", &"a".repeat(33)] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
