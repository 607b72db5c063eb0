//! Provisioned per-device (and per-gateway) keys, nonces and derived MQTT passwords.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};

use crate::WireError;

/// Bytes of an AEAD tag appended to every sealed message.
pub const TAG_LEN: usize = 16;
/// Bytes of a ChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 12;

/// Nonce domains: the first nonce byte says who made the nonce, so a device's
/// derived batch nonces and a sender's random control nonces can never collide.
pub(crate) const DOMAIN_BATCH: u8 = 0x01;
pub(crate) const DOMAIN_CONTROL: u8 = 0x02;
const DOMAIN_PASSWORD: u8 = 0x03;

/// A 256-bit ChaCha20-Poly1305 key provisioned into one device or gateway.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey([u8; 32]);

impl core::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

impl DeviceKey {
    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes (for provisioning files only).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, WireError> {
        let raw = s.as_bytes();
        if raw.len() != 64 {
            return Err(WireError::InvalidKey);
        }
        let mut out = [0u8; 32];
        for (i, pair) in raw.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or(WireError::InvalidKey)?;
            let lo = hex_val(pair[1]).ok_or(WireError::InvalidKey)?;
            out[i] = hi << 4 | lo;
        }
        Ok(Self(out))
    }

    pub(crate) fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new((&self.0).into())
    }

    /// The MQTT CONNECT password for `username`: 32 lowercase hex digits, a
    /// pseudorandom function of the key and the username. The key itself never
    /// leaves the device; a broker that learns the password learns nothing about it.
    pub fn mqtt_password(&self, username: &str) -> [u8; 32] {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[0] = DOMAIN_PASSWORD;
        // Sealing an empty message under a nonce reserved for this purpose yields a
        // tag that is a MAC of the username; it is the only message ever sealed
        // under that nonce with this key.
        let tag: Tag = self
            .cipher()
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), username.as_bytes(), &mut [])
            .unwrap_or_default();
        let mut out = [0u8; 32];
        for (i, b) in tag.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
        }
        out
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The nonce of a device batch: unique as long as (epoch, seq) is, which the SDK
/// guarantees by never reusing a seq within a boot epoch and requiring a fresh,
/// persisted epoch at every boot.
pub(crate) fn batch_nonce(epoch: u32, seq: u32) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[0] = DOMAIN_BATCH;
    n[4..8].copy_from_slice(&epoch.to_be_bytes());
    n[8..12].copy_from_slice(&seq.to_be_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_depends_on_key_and_username_and_is_not_the_key() {
        let k1 = DeviceKey::from_bytes([7; 32]);
        let k2 = DeviceKey::from_bytes([8; 32]);
        let p = k1.mqtt_password("acme/truck-1");
        assert_ne!(p, k1.mqtt_password("acme/truck-2"));
        assert_ne!(p, k2.mqtt_password("acme/truck-1"));
        assert_eq!(p, k1.mqtt_password("acme/truck-1"));
        assert!(p.iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(&p[..], &b"07".repeat(16)[..]);
    }

    #[test]
    fn hex_keys_round_trip() {
        let k = DeviceKey::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(k.as_bytes(), &[0xab; 32]);
        assert!(DeviceKey::from_hex("abc").is_err());
        assert!(DeviceKey::from_hex(&"zz".repeat(32)).is_err());
    }
}
