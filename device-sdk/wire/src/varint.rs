//! Byte cursors with postcard's integer encoding (LEB128 varints, zigzag for signed).
//!
//! The series and ack bodies are hand-framed so the device can write and read them
//! without allocation, but every integer in them uses exactly the encoding postcard
//! gives the same Rust types, so a `std` receiver could decode them with postcard too.

use crate::WireError;

/// Bytes a `u64` takes as a varint.
pub const fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Maps signed to unsigned so small magnitudes stay small (postcard's zigzag).
pub const fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
pub const fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends to a caller-provided buffer; never allocates.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8], pos: usize) -> Self {
        Self { buf, pos }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.pos]
    }

    pub(crate) fn buf_mut(&mut self) -> &mut [u8] {
        self.buf
    }

    pub(crate) fn set_pos(&mut self, pos: usize) {
        self.pos = pos;
    }

    pub(crate) fn put(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let end = self.pos + bytes.len();
        let dst = self.buf.get_mut(self.pos..end).ok_or(WireError::BufferTooSmall { needed: end })?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    pub(crate) fn varint(&mut self, mut v: u64) -> Result<(), WireError> {
        let mut tmp = [0u8; 10];
        let mut n = 0;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                tmp[n] = byte;
                n += 1;
                break;
            }
            tmp[n] = byte | 0x80;
            n += 1;
        }
        self.put(&tmp[..n])
    }

    pub(crate) fn zigzag(&mut self, v: i64) -> Result<(), WireError> {
        self.varint(zigzag(v))
    }
}

/// Reads from a borrowed slice; every read is bounds-checked and returns an error
/// instead of panicking on truncated or malformed input.
#[derive(Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, WireError> {
        let mut out = 0u64;
        for i in 0..10 {
            let byte = *self.buf.get(self.pos).ok_or(WireError::Truncated)?;
            self.pos += 1;
            if i == 9 && byte > 1 {
                return Err(WireError::Malformed("varint overflows 64 bits"));
            }
            out |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(WireError::Malformed("varint longer than 10 bytes"))
    }

    pub(crate) fn varint_u32(&mut self) -> Result<u32, WireError> {
        u32::try_from(self.varint()?).map_err(|_| WireError::Malformed("value exceeds 32 bits"))
    }

    pub(crate) fn zigzag(&mut self) -> Result<i64, WireError> {
        Ok(unzigzag(self.varint()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_postcard() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut buf = [0u8; 16];
            let mut w = Writer::new(&mut buf, 0);
            w.varint(v).unwrap();
            let ours = w.bytes().to_vec();
            assert_eq!(ours.len(), varint_len(v));
            assert_eq!(ours, postcard::to_allocvec(&v).unwrap());
            assert_eq!(Reader::new(&ours).varint().unwrap(), v);
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX, -123_456_789] {
            let mut buf = [0u8; 16];
            let mut w = Writer::new(&mut buf, 0);
            w.zigzag(v).unwrap();
            let ours = w.bytes().to_vec();
            assert_eq!(ours, postcard::to_allocvec(&v).unwrap());
            assert_eq!(Reader::new(&ours).zigzag().unwrap(), v);
        }
    }

    #[test]
    fn overlong_varints_are_errors() {
        assert!(Reader::new(&[0xff; 11]).varint().is_err());
        assert!(Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]).varint().is_err());
        assert!(Reader::new(&[0x80]).varint().is_err());
    }
}
