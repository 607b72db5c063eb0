extern crate std;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::vec::Vec;

use super::*;

/// A clock that moves a millisecond each time it is read.
#[derive(Clone, Default)]
struct Ticking(Rc<Cell<u64>>);

impl Clock for Ticking {
    fn now_ms(&mut self) -> u64 {
        self.0.set(self.0.get() + 1);
        self.0.get()
    }
}

/// A modem behind a UART, scripted: it answers commands as `answer` says and
/// the test queues what the peer sends.
#[derive(Default)]
struct FakeModem {
    to_unit: VecDeque<u8>,
    from_unit: Vec<u8>,
    line: Vec<u8>,
    /// Bytes of a CIPSEND still to take.
    sending: usize,
    sent: Vec<u8>,
    connect_reply: &'static [u8],
    silent: bool,
    /// Data bytes the unit read from the UART so far (for back-pressure).
    commands: Vec<std::string::String>,
}

#[derive(Clone, Default)]
struct Uart(Rc<RefCell<FakeModem>>);

impl FakeModem {
    fn say(&mut self, s: &[u8]) {
        self.to_unit.extend(s.iter().copied());
    }

    fn take(&mut self, b: u8) {
        self.from_unit.push(b);
        if self.sending > 0 {
            self.sent.push(b);
            self.sending -= 1;
            if self.sending == 0 {
                self.say(b"\r\nSEND OK\r\n");
            }
            return;
        }
        if b != b'\r' {
            self.line.push(b);
            return;
        }
        let line = std::string::String::from_utf8(core::mem::take(&mut self.line)).unwrap();
        self.commands.push(line.clone());
        if self.silent {
            return;
        }
        if line == "ATE0" {
            self.say(b"\r\nOK\r\n");
        } else if line == "AT+CIPCLOSE" {
            self.say(b"\r\nERROR\r\n");
        } else if line.starts_with("AT+CIPSTART=") {
            let reply = self.connect_reply;
            self.say(b"\r\nOK\r\n");
            self.say(reply);
        } else if let Some(n) = line.strip_prefix("AT+CIPSEND=") {
            self.sending = n.parse().unwrap();
            self.say(b"> ");
        } else {
            self.say(b"\r\nERROR\r\n");
        }
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = core::convert::Infallible;
}
impl ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        Ok(!self.0.borrow().to_unit.is_empty())
    }
}
impl Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let mut m = self.0.borrow_mut();
        let n = buf.len().min(m.to_unit.len());
        for (d, s) in buf.iter_mut().zip(m.to_unit.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}
impl Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let mut m = self.0.borrow_mut();
        for &b in buf {
            m.take(b);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

fn modem(connect_reply: &'static [u8]) -> (AtModem<Uart, Ticking>, Uart) {
    let uart = Uart::default();
    uart.0.borrow_mut().connect_reply = connect_reply;
    (AtModem::new(uart.clone(), Ticking::default(), "10.0.0.1", 1883, Timeouts::default()), uart)
}

fn read_all(m: &mut AtModem<Uart, Ticking>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 7];
    while m.read_ready().unwrap() {
        let n = m.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[test]
fn dial_sends_the_socket_commands_and_data_goes_both_ways_framed() {
    let (mut m, uart) = modem(b"\r\nCONNECT OK\r\n");
    m.dial().unwrap();
    assert!(m.is_connected());
    assert_eq!(uart.0.borrow().commands, ["ATE0", "AT+CIPCLOSE", "AT+CIPSTART=\"TCP\",\"10.0.0.1\",1883"]);
    m.write_all(&[0x10, 0x0d, 0xff]).unwrap();
    assert_eq!(uart.0.borrow().sent, [0x10, 0x0d, 0xff]);
    assert_eq!(uart.0.borrow().commands.last().unwrap(), "AT+CIPSEND=3");
    // A frame whose payload holds what looks like a modem line, and an unasked line.
    uart.0.borrow_mut().say(b"\r\n+IPD,10:CLOSED\r\n\x00\x01\r\n+CREG: 1\r\n\r\n+IPD,2:\x20\x02");
    assert_eq!(read_all(&mut m), b"CLOSED\r\n\x00\x01\x20\x02");
    assert!(m.is_connected(), "payload bytes never close the socket");
    assert_eq!(m.stats().frames, 2);
    assert_eq!(m.stats().unknown_lines, 1);
    // A write larger than a chunk goes out in several sends.
    let big = [0x5a; 2500];
    m.write_all(&big).unwrap();
    assert_eq!(uart.0.borrow().sent.len(), 3 + 2500);
    assert_eq!(uart.0.borrow().commands.iter().filter(|c| c.starts_with("AT+CIPSEND")).count(), 4);
}

#[test]
fn the_peer_closing_reads_as_end_of_stream_after_the_data() {
    let (mut m, uart) = modem(b"\r\nCONNECT OK\r\n");
    m.dial().unwrap();
    uart.0.borrow_mut().say(b"\r\n+IPD,3:abc\r\nCLOSED\r\n");
    let mut buf = [0u8; 8];
    assert!(m.read_ready().unwrap());
    assert_eq!(m.read(&mut buf).unwrap(), 3);
    assert!(m.read_ready().unwrap());
    assert_eq!(m.read(&mut buf).unwrap(), 0, "closed");
    assert!(!m.is_connected());
    assert_eq!(m.write(b"x"), Err(ModemError::NotConnected));
    assert_eq!(m.stats().peer_closed, 1);
}

#[test]
fn a_refused_connect_and_a_silent_modem_are_errors_in_bounded_time() {
    let (mut m, _) = modem(b"\r\nCONNECT FAIL\r\n");
    assert_eq!(m.dial(), Err(ModemError::Refused));
    assert!(!m.is_connected());
    let (mut m, uart) = modem(b"");
    uart.0.borrow_mut().silent = true;
    assert_eq!(m.dial(), Err(ModemError::Timeout));
    assert_eq!(m.stats().timeouts, 1);
    // The modem answers OK but the connect never completes.
    let (mut m, _) = modem(b"");
    assert_eq!(m.dial(), Err(ModemError::Timeout));
}

#[test]
fn a_full_receive_buffer_leaves_the_rest_with_the_modem() {
    let (mut m, uart) = modem(b"\r\nCONNECT OK\r\n");
    m.dial().unwrap();
    let frame_len = 1_000;
    for _ in 0..3 {
        let mut f = std::format!("\r\n+IPD,{frame_len}:").into_bytes();
        f.extend(std::iter::repeat_n(0x42u8, frame_len));
        uart.0.borrow_mut().say(&f);
    }
    assert!(m.read_ready().unwrap());
    let waiting = uart.0.borrow().to_unit.len();
    assert!(waiting > 0 && waiting < 3 * (frame_len + 12) - RX_DATA + 40, "{waiting} bytes left with the modem");
    assert_eq!(read_all(&mut m).len(), 3 * frame_len, "everything arrives as the unit reads");
}
