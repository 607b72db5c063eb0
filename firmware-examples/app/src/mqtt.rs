//! MQTT 3.1.1, sans-IO: the packets a unit sends, encoded into caller buffers,
//! and the packets a broker sends, framed out of a fixed receive buffer.
//!
//! A unit needs little of MQTT: `CONNECT` with a username and password and a
//! clean session, `SUBSCRIBE` to its ack and command topics, `PUBLISH` of
//! sealed batches with QoS 1, `PUBACK` of what arrives with QoS 1, and
//! `PINGREQ` to keep the connection alive. That is all this module speaks;
//! anything else a broker sends (`PUBREC` of QoS 2, a `SUBSCRIBE` from the
//! wrong side) is [`DecodeError::Unexpected`] and the caller drops the
//! connection. A packet longer than the receive buffer is skipped byte by byte
//! and counted, never buffered.
//!
//! Pure: no I/O, no clock, no allocation.

/// Why a packet could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The buffer is too small for it.
    BufferTooSmall,
    /// A string or the payload is longer than MQTT allows.
    TooLong,
}

/// Why received bytes are not a packet this client takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The remaining length is not a valid variable-length integer.
    BadLength,
    /// The packet's fields do not add up (a string past the end, bad flags,
    /// a topic that is not UTF-8).
    Malformed,
    /// A packet type a broker does not send to this client (packet type given).
    Unexpected(u8),
}

/// `CONNACK`'s return code, when it refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// 1: the broker does not speak 3.1.1.
    Protocol,
    /// 2: the client id is not allowed.
    ClientId,
    /// 3: the service is unavailable.
    Unavailable,
    /// 4: bad username or password.
    Credentials,
    /// 5: not authorised.
    NotAuthorized,
    /// Any other code.
    Other(u8),
}

impl Refused {
    fn from_code(code: u8) -> Self {
        match code {
            1 => Refused::Protocol,
            2 => Refused::ClientId,
            3 => Refused::Unavailable,
            4 => Refused::Credentials,
            5 => Refused::NotAuthorized,
            c => Refused::Other(c),
        }
    }
}

/// A packet from the broker.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `CONNACK`.
    ConnAck {
        /// The broker kept a session for this client id.
        session_present: bool,
        /// `Ok` when the connection is accepted.
        result: Result<(), Refused>,
    },
    /// `PUBLISH`: a message on a subscribed topic.
    Publish {
        /// Its topic.
        topic: &'a str,
        /// Its payload, mutable so it can be opened in place.
        payload: &'a mut [u8],
        /// Its packet id when sent with QoS 1 (to be acknowledged with `PUBACK`).
        qos1_id: Option<u16>,
    },
    /// `PUBACK` of a QoS 1 publish this client sent.
    PubAck {
        /// Its packet id.
        id: u16,
    },
    /// `SUBACK`.
    SubAck {
        /// The packet id of the `SUBSCRIBE`.
        id: u16,
        /// Topics refused (return code `0x80`), out of `granted + refused`.
        refused: u8,
        /// Topics granted.
        granted: u8,
    },
    /// `PINGRESP`.
    PingResp,
}

const CONNECT: u8 = 0x10;
const CONNACK: u8 = 0x20;
const PUBLISH: u8 = 0x30;
const PUBACK: u8 = 0x40;
const SUBSCRIBE: u8 = 0x82;
const SUBACK: u8 = 0x90;
const PINGREQ: u8 = 0xc0;
const PINGRESP: u8 = 0xd0;
const DISCONNECT: u8 = 0xe0;

/// Largest remaining length MQTT allows.
const MAX_REMAINING: usize = 268_435_455;

/// A cursor writing into a caller's buffer.
struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Out<'_> {
    fn byte(&mut self, b: u8) -> Result<(), EncodeError> {
        *self.buf.get_mut(self.at).ok_or(EncodeError::BufferTooSmall)? = b;
        self.at += 1;
        Ok(())
    }
    fn bytes(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        self.buf.get_mut(self.at..self.at + b.len()).ok_or(EncodeError::BufferTooSmall)?.copy_from_slice(b);
        self.at += b.len();
        Ok(())
    }
    fn u16(&mut self, v: u16) -> Result<(), EncodeError> {
        self.bytes(&v.to_be_bytes())
    }
    /// A length-prefixed string or binary field.
    fn field(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        self.u16(u16::try_from(b.len()).map_err(|_| EncodeError::TooLong)?)?;
        self.bytes(b)
    }
    fn fixed(&mut self, first: u8, remaining: usize) -> Result<(), EncodeError> {
        if remaining > MAX_REMAINING {
            return Err(EncodeError::TooLong);
        }
        self.byte(first)?;
        let mut x = remaining;
        loop {
            let mut b = (x % 128) as u8;
            x /= 128;
            if x > 0 {
                b |= 0x80;
            }
            self.byte(b)?;
            if x == 0 {
                return Ok(());
            }
        }
    }
}

fn field_len(b: &[u8]) -> Result<usize, EncodeError> {
    if b.len() > usize::from(u16::MAX) { Err(EncodeError::TooLong) } else { Ok(2 + b.len()) }
}

/// `CONNECT` with a clean session, a username and a password, no will.
pub fn connect(
    buf: &mut [u8],
    client_id: &str,
    username: &str,
    password: &[u8],
    keep_alive_s: u16,
) -> Result<usize, EncodeError> {
    let remaining = 10 + field_len(client_id.as_bytes())? + field_len(username.as_bytes())? + field_len(password)?;
    let mut o = Out { buf, at: 0 };
    o.fixed(CONNECT, remaining)?;
    o.field(b"MQTT")?;
    o.byte(4)?; // protocol level: 3.1.1
    o.byte(0x80 | 0x40 | 0x02)?; // username, password, clean session
    o.u16(keep_alive_s)?;
    o.field(client_id.as_bytes())?;
    o.field(username.as_bytes())?;
    o.field(password)?;
    Ok(o.at)
}

/// The header of a QoS 1 `PUBLISH` of `payload_len` bytes (fixed header,
/// topic, packet id): the payload follows it on the wire, written straight
/// from where it lies.
pub fn publish_header(
    buf: &mut [u8],
    topic: &str,
    id: u16,
    dup: bool,
    payload_len: usize,
) -> Result<usize, EncodeError> {
    let remaining = field_len(topic.as_bytes())? + 2 + payload_len;
    let mut o = Out { buf, at: 0 };
    o.fixed(PUBLISH | 0x02 | if dup { 0x08 } else { 0 }, remaining)?;
    o.field(topic.as_bytes())?;
    o.u16(id)?;
    Ok(o.at)
}

/// `PUBACK` of a QoS 1 message received.
pub fn puback(buf: &mut [u8], id: u16) -> Result<usize, EncodeError> {
    let mut o = Out { buf, at: 0 };
    o.fixed(PUBACK, 2)?;
    o.u16(id)?;
    Ok(o.at)
}

/// `SUBSCRIBE` to `topics`, each with QoS 1.
pub fn subscribe(buf: &mut [u8], id: u16, topics: &[&str]) -> Result<usize, EncodeError> {
    let mut remaining = 2;
    for t in topics {
        remaining += field_len(t.as_bytes())? + 1;
    }
    let mut o = Out { buf, at: 0 };
    o.fixed(SUBSCRIBE, remaining)?;
    o.u16(id)?;
    for t in topics {
        o.field(t.as_bytes())?;
        o.byte(1)?;
    }
    Ok(o.at)
}

/// `PINGREQ`.
pub fn pingreq(buf: &mut [u8]) -> Result<usize, EncodeError> {
    let mut o = Out { buf, at: 0 };
    o.fixed(PINGREQ, 0)?;
    Ok(o.at)
}

/// `DISCONNECT`.
pub fn disconnect(buf: &mut [u8]) -> Result<usize, EncodeError> {
    let mut o = Out { buf, at: 0 };
    o.fixed(DISCONNECT, 0)?;
    Ok(o.at)
}

/// The fixed header at the front of `bytes`: (first byte, header length,
/// remaining length), or `None` while incomplete.
fn fixed_header(bytes: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = bytes.first() else { return Ok(None) };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = bytes.get(1 + i) else { return Ok(None) };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // A length in more bytes than it needs is malformed too.
            if i > 0 && b == 0 {
                return Err(DecodeError::BadLength);
            }
            return Ok(Some((first, 2 + i, remaining)));
        }
    }
    Err(DecodeError::BadLength)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, DecodeError> {
    let s = b.get(at..at + 2).ok_or(DecodeError::Malformed)?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

/// Decodes one whole packet (`bytes` is exactly one frame).
fn decode(bytes: &mut [u8], header: usize) -> Result<Packet<'_>, DecodeError> {
    let first = bytes[0];
    let body_len = bytes.len() - header;
    match first & 0xf0 {
        CONNACK if first == CONNACK && body_len == 2 => {
            let (flags, code) = (bytes[header], bytes[header + 1]);
            if flags & 0xfe != 0 {
                return Err(DecodeError::Malformed);
            }
            let result = if code == 0 { Ok(()) } else { Err(Refused::from_code(code)) };
            Ok(Packet::ConnAck { session_present: flags & 1 == 1, result })
        }
        PUBLISH => {
            let qos = (first >> 1) & 3;
            if qos > 1 {
                // This client subscribes with QoS 1: QoS 2 is a broker error (3 is invalid).
                return Err(DecodeError::Unexpected(first));
            }
            let (head, body) = bytes.split_at_mut(header);
            let _ = head;
            let topic_len = usize::from(u16_at(body, 0)?);
            let topic_end = 2 + topic_len;
            let id_end = topic_end + if qos == 1 { 2 } else { 0 };
            if id_end > body.len() {
                return Err(DecodeError::Malformed);
            }
            let qos1_id = if qos == 1 { Some(u16_at(body, topic_end)?) } else { None };
            if qos1_id == Some(0) {
                return Err(DecodeError::Malformed);
            }
            let (front, payload) = body.split_at_mut(id_end);
            let topic = core::str::from_utf8(&front[2..topic_end]).map_err(|_| DecodeError::Malformed)?;
            Ok(Packet::Publish { topic, payload, qos1_id })
        }
        PUBACK if first == PUBACK && body_len == 2 => Ok(Packet::PubAck { id: u16_at(bytes, header)? }),
        SUBACK if first == SUBACK && body_len >= 3 => {
            let id = u16_at(bytes, header)?;
            let (mut granted, mut refused) = (0u8, 0u8);
            for &code in &bytes[header + 2..] {
                match code {
                    0..=2 => granted = granted.saturating_add(1),
                    0x80 => refused = refused.saturating_add(1),
                    _ => return Err(DecodeError::Malformed),
                }
            }
            Ok(Packet::SubAck { id, granted, refused })
        }
        PINGRESP if first == PINGRESP && body_len == 0 => Ok(Packet::PingResp),
        CONNACK | PUBACK | SUBACK | PINGRESP => Err(DecodeError::Malformed),
        _ => Err(DecodeError::Unexpected(first)),
    }
}

/// What [`Receiver`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Packets decoded.
    pub packets: u32,
    /// Packets longer than the buffer, skipped unread.
    pub oversized: u32,
    /// Bytes skipped with them.
    pub skipped_bytes: u64,
}

/// The receive side of one connection: bytes in, packets out, in `N` bytes.
pub struct Receiver<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// Bytes of an oversized packet still to drop.
    skip: usize,
    /// The frame handed out by the last [`Receiver::next_packet`], dropped on the next call.
    taken: usize,
    stats: ReceiverStats,
}

impl<const N: usize> Default for Receiver<N> {
    fn default() -> Self {
        Self { buf: [0; N], len: 0, skip: 0, taken: 0, stats: ReceiverStats::default() }
    }
}

impl<const N: usize> Receiver<N> {
    /// Forgets everything buffered: a new connection.
    pub fn reset(&mut self) {
        self.len = 0;
        self.skip = 0;
        self.taken = 0;
    }

    /// What was counted (over every connection).
    pub fn stats(&self) -> ReceiverStats {
        self.stats
    }

    /// Where the next bytes read from the connection go (empty when full,
    /// which [`Receiver::next_packet`] never leaves it).
    pub fn space(&mut self) -> &mut [u8] {
        self.drop_taken();
        &mut self.buf[self.len..]
    }

    /// `n` bytes were read into [`Receiver::space`].
    pub fn filled(&mut self, n: usize) {
        let n = n.min(N - self.len);
        // Bytes of a packet being skipped never stay.
        let dropped = n.min(self.skip);
        self.skip -= dropped;
        self.stats.skipped_bytes += dropped as u64;
        if dropped > 0 {
            self.buf.copy_within(self.len + dropped..self.len + n, self.len);
        }
        self.len += n - dropped;
    }

    fn drop_taken(&mut self) {
        if self.taken > 0 {
            self.buf.copy_within(self.taken..self.len, 0);
            self.len -= self.taken;
            self.taken = 0;
        }
    }

    /// The next whole packet buffered, if any. An error means the stream
    /// cannot be trusted any more: drop the connection.
    pub fn next_packet(&mut self) -> Result<Option<Packet<'_>>, DecodeError> {
        self.drop_taken();
        loop {
            let Some((_, header, remaining)) = fixed_header(&self.buf[..self.len])? else {
                return Ok(None);
            };
            let total = header + remaining;
            if total > N {
                // Too big to hold: drop what is here and the rest as it comes.
                self.stats.oversized += 1;
                let here = self.len.min(total);
                self.stats.skipped_bytes += here as u64;
                self.buf.copy_within(here..self.len, 0);
                self.len -= here;
                self.skip = total - here;
                if self.skip > 0 {
                    return Ok(None);
                }
                continue;
            }
            if self.len < total {
                return Ok(None);
            }
            self.taken = total;
            self.stats.packets += 1;
            return decode(&mut self.buf[..total], header).map(Some);
        }
    }
}

#[cfg(test)]
mod tests;
