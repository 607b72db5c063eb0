//! Gateway → cloud bundles: many device batches, as received, in one sealed message.
//!
//! ```text
//! sealed = postcard(BundleHeader) ‖ ChaCha20-Poly1305(codec(postcard(Vec<BundleEntry>)), aad = header) ‖ tag[16]
//! ```
//!
//! The header names the gateway, the bundle id, the shard and the codec, and carries
//! a random nonce in the bundle domain (first byte `0x04`). The body is sealed with
//! the gateway's provisioned key: the ingest broker has no per-topic permissions, and
//! the cloud acks by bundle id, so without the seal another client could publish a
//! bundle under a live id and have the gateway drop the real one. Each device batch
//! inside keeps its own device seal; the cloud opens both.

use std::string::String;
use std::vec::Vec;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Nonce, Tag};
use serde::{Deserialize, Serialize};

use crate::WireError;
use crate::key::{DeviceKey, NONCE_LEN, TAG_LEN};

/// Version of the bundle layout described in this module.
pub const BUNDLE_FORMAT: u8 = 1;

/// Nonce domain of bundles.
const DOMAIN_BUNDLE: u8 = 0x04;

/// Largest decompressed body a receiver accepts (a guard against compression bombs).
pub const MAX_BUNDLE_BODY: usize = 16 * 1024 * 1024;

/// How the body is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is.
    None = 0,
    /// LZ4 block with the uncompressed size prepended (`lz4_flex::compress_prepend_size`).
    Lz4 = 1,
}

pub use crate::ids::BundleId;

/// The cleartext, authenticated header of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// [`BUNDLE_FORMAT`].
    pub format: u8,
    /// Sending gateway.
    pub gateway: String,
    /// Bundle id, acked by the cloud.
    pub id: BundleId,
    /// Shard of every batch inside.
    pub shard: u16,
    /// Body codec.
    pub codec: Codec,
    /// Number of entries.
    pub entries: u32,
    /// Random, first byte `0x04`.
    pub nonce: [u8; NONCE_LEN],
}

/// One device batch as the gateway received it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleEntry {
    /// Gateway time of receipt, Unix ms.
    pub received_at_ms: u64,
    /// The sealed device batch, byte for byte.
    #[serde(with = "as_bytes")]
    pub batch: Vec<u8>,
}

/// A byte vector as serde bytes: in postcard the same encoding as a sequence of
/// `u8` (a varint length, then the bytes), written and read in one piece instead
/// of byte by byte.
mod as_bytes {
    use std::vec::Vec;

    use serde::{Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> de::Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// Seals `entries` into a bundle.
pub fn seal_bundle(
    key: &DeviceKey,
    gateway: &str,
    id: BundleId,
    shard: u16,
    codec: Codec,
    entries: &[BundleEntry],
) -> Result<Vec<u8>, WireError> {
    crate::ids::ShortId::new(gateway)?;
    let plain = postcard::to_allocvec(entries).map_err(|_| WireError::Malformed("bundle entries"))?;
    let mut body = match codec {
        Codec::None => plain,
        Codec::Lz4 => lz4_flex::compress_prepend_size(&plain),
    };
    let mut nonce = crate::control::random_nonce()?;
    nonce[0] = DOMAIN_BUNDLE;
    let header = BundleHeader {
        format: BUNDLE_FORMAT,
        gateway: gateway.into(),
        id,
        shard,
        codec,
        entries: entries.len() as u32,
        nonce,
    };
    let mut out = postcard::to_allocvec(&header).map_err(|_| WireError::Malformed("bundle header"))?;
    let tag = key
        .cipher()
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &out, &mut body)
        .map_err(|_| WireError::TooLarge { len: body.len(), max: MAX_BUNDLE_BODY })?;
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Reads a bundle's header without opening it, to find the gateway's key.
pub fn peek_bundle(sealed: &[u8]) -> Result<BundleHeader, WireError> {
    let (header, rest): (BundleHeader, &[u8]) =
        postcard::take_from_bytes(sealed).map_err(|_| WireError::Malformed("bundle header"))?;
    if header.format != BUNDLE_FORMAT {
        return Err(WireError::UnsupportedFormat(header.format));
    }
    if header.nonce[0] != DOMAIN_BUNDLE {
        return Err(WireError::Malformed("bundle nonce outside the bundle domain"));
    }
    crate::ids::ShortId::new(&header.gateway)?;
    if rest.len() < TAG_LEN {
        return Err(WireError::Truncated);
    }
    Ok(header)
}

/// Verifies, decrypts and decompresses a bundle.
pub fn open_bundle(sealed: &[u8], key: &DeviceKey) -> Result<(BundleHeader, Vec<BundleEntry>), WireError> {
    let header = peek_bundle(sealed)?;
    let rest_len =
        postcard::take_from_bytes::<BundleHeader>(sealed).map_err(|_| WireError::Malformed("bundle header"))?.1.len();
    let header_len = sealed.len() - rest_len;
    let body_end = sealed.len() - TAG_LEN;
    let mut body = sealed[header_len..body_end].to_vec();
    key.cipher()
        .decrypt_in_place_detached(
            Nonce::from_slice(&header.nonce),
            &sealed[..header_len],
            &mut body,
            Tag::from_slice(&sealed[body_end..]),
        )
        .map_err(|_| WireError::AuthenticationFailed)?;
    let plain = match header.codec {
        Codec::None => body,
        Codec::Lz4 => {
            let claimed = body.get(..4).ok_or(WireError::Truncated)?;
            let size = u32::from_le_bytes([claimed[0], claimed[1], claimed[2], claimed[3]]) as usize;
            if size > MAX_BUNDLE_BODY {
                return Err(WireError::TooLarge { len: size, max: MAX_BUNDLE_BODY });
            }
            lz4_flex::decompress_size_prepended(&body).map_err(|_| WireError::Malformed("lz4 body"))?
        }
    };
    let entries: Vec<BundleEntry> = postcard::from_bytes(&plain).map_err(|_| WireError::Malformed("bundle entries"))?;
    if entries.len() != header.entries as usize {
        return Err(WireError::Malformed("bundle entry count"));
    }
    Ok((header, entries))
}

/// Seals an ack naming bundle ids, for the gateway that sent them.
pub fn seal_bundle_ack(key: &DeviceKey, sender: &str, counter: u64, ids: &[BundleId]) -> Result<Vec<u8>, WireError> {
    let mut out = std::vec![0u8; crate::control::MAX_CONTROL_HEADER_LEN + 16 + ids.len() * 10 + TAG_LEN];
    let n = crate::control::seal_bundle_ack_into(&mut out, key, sender, counter, crate::control::random_nonce()?, ids)?;
    out.truncate(n);
    Ok(out)
}

/// Opens a bundle ack; returns the sender, its counter and the ids.
pub fn open_bundle_ack(sealed: &[u8], key: &DeviceKey) -> Result<(String, u64, Vec<BundleId>), WireError> {
    let mut buf = sealed.to_vec();
    let opened = crate::control::open_control(&mut buf, key, crate::control::ControlKind::BundleAck)?;
    let ids: Vec<BundleId> = opened.bundle_ids()?;
    Ok((opened.header.sender.into(), opened.header.counter, ids))
}

#[cfg(test)]
mod tests {

    #[test]
    fn entries_encode_as_they_did_as_a_sequence_of_u8() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain {
            received_at_ms: u64,
            batch: Vec<u8>,
        }
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let batch: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let plain = Plain { received_at_ms: 1_790_000_000_123, batch: batch.clone() };
            let entry = BundleEntry { received_at_ms: plain.received_at_ms, batch };
            let old = postcard::to_allocvec(&plain).unwrap();
            assert_eq!(postcard::to_allocvec(&entry).unwrap(), old, "{len}");
            assert_eq!(postcard::from_bytes::<BundleEntry>(&old).unwrap(), entry);
        }
    }

    use super::*;

    fn entries() -> Vec<BundleEntry> {
        (0..20).map(|i| BundleEntry { received_at_ms: 1_790_000_000_000 + i, batch: vec![i as u8; 100] }).collect()
    }

    #[test]
    fn bundles_round_trip_compressed_and_plain() {
        let key = DeviceKey::from_bytes([5; 32]);
        for codec in [Codec::None, Codec::Lz4] {
            let sealed = seal_bundle(&key, "gw-1", BundleId(77), 3, codec, &entries()).unwrap();
            let (h, e) = open_bundle(&sealed, &key).unwrap();
            assert_eq!((h.gateway.as_str(), h.id, h.shard, h.codec), ("gw-1", BundleId(77), 3, codec));
            assert_eq!(e, entries());
        }
        let lz4 = seal_bundle(&key, "gw-1", BundleId(1), 0, Codec::Lz4, &entries()).unwrap();
        let plain = seal_bundle(&key, "gw-1", BundleId(1), 0, Codec::None, &entries()).unwrap();
        assert!(lz4.len() < plain.len() / 4, "{} vs {}", lz4.len(), plain.len());
    }

    #[test]
    fn tampering_and_wrong_keys_are_rejected() {
        let key = DeviceKey::from_bytes([5; 32]);
        let sealed = seal_bundle(&key, "gw-1", BundleId(1), 0, Codec::Lz4, &entries()).unwrap();
        assert_eq!(open_bundle(&sealed, &DeviceKey::from_bytes([6; 32])).unwrap_err(), WireError::AuthenticationFailed);
        for i in (0..sealed.len()).step_by(7) {
            let mut t = sealed.clone();
            t[i] ^= 0x10;
            assert!(open_bundle(&t, &key).is_err(), "flip at {i}");
        }
        for n in 0..sealed.len() {
            assert!(open_bundle(&sealed[..n], &key).is_err());
        }
    }

    #[test]
    fn bundle_acks_round_trip_and_do_not_open_as_device_acks() {
        let key = DeviceKey::from_bytes([5; 32]);
        let ids = [BundleId(1), BundleId(u64::MAX)];
        let sealed = seal_bundle_ack(&key, "cloud-0", 9, &ids).unwrap();
        assert_eq!(open_bundle_ack(&sealed, &key).unwrap(), ("cloud-0".into(), 9, ids.to_vec()));
        let mut copy = sealed.clone();
        assert!(crate::control::open_control(&mut copy, &key, crate::control::ControlKind::Ack).is_err());
    }
}
