use super::*;

fn frame(first: u8, body: &[u8]) -> std::vec::Vec<u8> {
    extern crate std;
    let mut v = std::vec![first];
    let mut x = body.len();
    loop {
        let mut b = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            b |= 0x80;
        }
        v.push(b);
        if x == 0 {
            break;
        }
    }
    v.extend_from_slice(body);
    v
}

extern crate std;
use std::vec::Vec;

fn publish(topic: &str, id: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if let Some(id) = id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(if id.is_some() { 0x32 } else { 0x30 }, &body)
}

/// Feeds `bytes` in pieces of `step` and collects what the receiver gives.
fn feed<const N: usize>(
    rx: &mut Receiver<N>,
    bytes: &[u8],
    step: usize,
) -> Result<Vec<std::string::String>, DecodeError> {
    let mut out = Vec::new();
    for chunk in bytes.chunks(step) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let space = rx.space();
            let n = rest.len().min(space.len());
            space[..n].copy_from_slice(&rest[..n]);
            rx.filled(n);
            rest = &rest[n..];
            while let Some(p) = rx.next_packet()? {
                out.push(std::format!("{p:?}"));
            }
        }
    }
    Ok(out)
}

#[test]
fn connect_is_the_3_1_1_packet() {
    let mut buf = [0u8; 64];
    let n = connect(&mut buf, "f.d", "f.d", b"pw", 30).unwrap();
    let want: &[u8] = &[
        0x10, 24, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 30, 0, 3, b'f', b'.', b'd', 0, 3, b'f', b'.', b'd', 0, 2,
        b'p', b'w',
    ];
    assert_eq!(&buf[..n], want);
    assert_eq!(connect(&mut buf[..10], "f.d", "f.d", b"pw", 30), Err(EncodeError::BufferTooSmall));
}

#[test]
fn publish_header_subscribe_puback_ping() {
    let mut buf = [0u8; 64];
    let n = publish_header(&mut buf, "a/b", 7, false, 200).unwrap();
    // 200 + 5 + 2 = 207 remaining: two length bytes.
    assert_eq!(&buf[..n], &[0x32, 207, 1, 0, 3, b'a', b'/', b'b', 0, 7]);
    let n = publish_header(&mut buf, "a/b", 7, true, 0).unwrap();
    assert_eq!(buf[0], 0x3a);
    assert_eq!(n, 9);
    let n = subscribe(&mut buf, 9, &["x", "yz"]).unwrap();
    assert_eq!(&buf[..n], &[0x82, 11, 0, 9, 0, 1, b'x', 1, 0, 2, b'y', b'z', 1]);
    let n = puback(&mut buf, 0x1234).unwrap();
    assert_eq!(&buf[..n], &[0x40, 2, 0x12, 0x34]);
    let n = pingreq(&mut buf).unwrap();
    assert_eq!(&buf[..n], &[0xc0, 0]);
    let n = disconnect(&mut buf).unwrap();
    assert_eq!(&buf[..n], &[0xe0, 0]);
}

#[test]
fn broker_packets_decode_from_any_split() {
    let mut stream = Vec::new();
    stream.extend(frame(0x20, &[1, 0]));
    stream.extend(frame(0x90, &[0, 5, 1, 0x80]));
    stream.extend(publish("t/ack", Some(3), &[9; 300]));
    stream.extend(publish("t/cmd", None, b"hi"));
    stream.extend(frame(0x40, &[0, 2]));
    stream.extend(frame(0xd0, &[]));
    for step in [1, 2, 3, 7, 64, 4096] {
        let mut rx = Receiver::<512>::default();
        let got = feed(&mut rx, &stream, step).unwrap();
        assert_eq!(got.len(), 6, "step {step}: {got:?}");
        assert!(got[0].contains("session_present: true") && got[0].contains("Ok(())"));
        assert!(got[1].contains("id: 5, refused: 1, granted: 1"));
        assert!(got[2].contains("t/ack") && got[2].contains("Some(3)"));
        assert!(got[3].contains("t/cmd") && got[3].contains("None"));
        assert_eq!(got[4], "PubAck { id: 2 }");
        assert_eq!(got[5], "PingResp");
        assert_eq!(rx.stats().packets, 6);
    }
}

#[test]
fn refusals_are_named() {
    let mut rx = Receiver::<64>::default();
    let got = feed(&mut rx, &frame(0x20, &[0, 4]), 64).unwrap();
    assert!(got[0].contains("Err(Credentials)"), "{got:?}");
}

#[test]
fn an_oversized_packet_is_skipped_and_the_next_one_taken() {
    let mut stream = publish("t/ack", Some(1), &[0xaa; 5000]);
    stream.extend(frame(0x40, &[0, 9]));
    for step in [1, 13, 100, 6000] {
        let mut rx = Receiver::<256>::default();
        let got = feed(&mut rx, &stream, step).unwrap();
        assert_eq!(got, ["PubAck { id: 9 }"], "step {step}");
        assert_eq!(rx.stats().oversized, 1);
        assert_eq!(rx.stats().skipped_bytes, 5000 + 2 + 5 + 2 + 3);
    }
}

#[test]
fn broken_streams_are_errors() {
    let cases: &[(&[u8], DecodeError)] = &[
        // Five length bytes.
        (&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], DecodeError::BadLength),
        // A length in more bytes than needed.
        (&[0x40, 0x82, 0x00, 0, 1], DecodeError::BadLength),
        // QoS 2 publish: this client never asked for it.
        (&[0x34, 5, 0, 1, b't', 0, 1], DecodeError::Unexpected(0x34)),
        // A SUBSCRIBE from the broker.
        (&[0x82, 4, 0, 1, 0, 0], DecodeError::Unexpected(0x82)),
        // A topic longer than the packet.
        (&[0x30, 3, 0, 9, b't'], DecodeError::Malformed),
        // Packet id zero.
        (&[0x32, 5, 0, 1, b't', 0, 0], DecodeError::Malformed),
        // Topic not UTF-8.
        (&[0x30, 3, 0, 1, 0xff], DecodeError::Malformed),
        // A CONNACK with reserved flags, a PUBACK of the wrong length.
        (&[0x20, 2, 2, 0], DecodeError::Malformed),
        (&[0x40, 3, 0, 1, 0], DecodeError::Malformed),
        (&[0x90, 3, 0, 1, 7], DecodeError::Malformed),
    ];
    for (bytes, want) in cases {
        let mut rx = Receiver::<64>::default();
        assert_eq!(feed(&mut rx, bytes, 64).unwrap_err(), *want, "{bytes:x?}");
    }
}

proptest::proptest! {
    /// Whatever arrives, the receiver answers with packets, `None` or an error; never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), step in 1usize..80) {
        let mut rx = Receiver::<128>::default();
        let _ = feed(&mut rx, &bytes, step);
    }
}
