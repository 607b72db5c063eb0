//! A cellular modem's TCP socket behind its UART: a [`Link`] in the AT dialect
//! the common modules speak in their non-transparent socket mode.
//!
//! | the unit sends | the modem answers |
//! |---|---|
//! | `ATE0` | `OK` (echo off; also: a modem is there) |
//! | `AT+CIPCLOSE` | `CLOSE OK` or `ERROR` (a socket a reset left open is dropped) |
//! | `AT+CIPSTART="TCP","host",port` | `OK`, then `CONNECT OK`, `ALREADY CONNECT` or `CONNECT FAIL` |
//! | `AT+CIPSEND=n`, then n bytes after the `> ` prompt | `SEND OK` or `SEND FAIL` |
//! | | `+IPD,n:` and n bytes: data from the peer |
//! | | `CLOSED`: the peer closed |
//!
//! Non-transparent mode, not the transparent data mode: every byte from the
//! peer arrives inside a length-prefixed `+IPD` frame, so a closed socket is a
//! `CLOSED` line that no payload can imitate, where a data-mode modem signals
//! it on its DCD pin (not wired on every board). Received data waits in a
//! fixed buffer; while it is full the UART is not read, and the modem holds
//! what follows (its own flow control).
//!
//! Every wait is bounded by the timeouts given: `dial` blocks for at most
//! `ate0 + close + start` and a write for `prompt + sent` per 1 KiB chunk; the
//! unit's watchdog period must exceed both.

use embedded_io::{Read, ReadReady, Write};

use crate::unit::{Clock, Link};

/// Bytes of received data held.
pub const RX_DATA: usize = 256;
/// Longest line the modem sends that is kept (longer ones are cut).
const LINE: usize = 48;
/// Most bytes one `AT+CIPSEND` carries.
const SEND_CHUNK: usize = 1024;

/// How long the modem may take, ms.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For `OK` to a plain command.
    pub command_ms: u32,
    /// For `CONNECT OK` after `AT+CIPSTART`.
    pub connect_ms: u32,
    /// For the `> ` prompt, and for `SEND OK` after the bytes.
    pub send_ms: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { command_ms: 300, connect_ms: 1_500, send_ms: 1_000 }
    }
}

/// What went wrong with the modem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModemError {
    /// The UART failed.
    Uart,
    /// No answer in time.
    Timeout,
    /// `ERROR`, `CONNECT FAIL` or `SEND FAIL`.
    Refused,
    /// No socket is open (never dialled, or the peer closed it).
    NotConnected,
}

impl embedded_io::Error for ModemError {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            ModemError::Uart => embedded_io::ErrorKind::Other,
            ModemError::Timeout => embedded_io::ErrorKind::TimedOut,
            ModemError::Refused => embedded_io::ErrorKind::ConnectionRefused,
            ModemError::NotConnected => embedded_io::ErrorKind::NotConnected,
        }
    }
}

/// What the modem said, as the parser saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Heard {
    ok: bool,
    error: bool,
    connect_ok: bool,
    connect_fail: bool,
    prompt: bool,
    send_ok: bool,
    send_fail: bool,
    close_ok: bool,
    closed: bool,
}

/// What the modem link counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModemStats {
    /// `+IPD` frames received.
    pub frames: u32,
    /// Lines the parser did not know (or cut to its buffer).
    pub unknown_lines: u32,
    /// `CLOSED` from the modem: the peer went away.
    pub peer_closed: u32,
    /// Waits that timed out.
    pub timeouts: u32,
}

/// A modem on `uart`, dialling `host:port` for the unit.
pub struct AtModem<U, C> {
    uart: U,
    clock: C,
    host: [u8; 64],
    host_len: usize,
    port: u16,
    timeouts: Timeouts,
    line: [u8; LINE],
    line_len: usize,
    /// Bytes of a `+IPD` frame still to come.
    frame_left: usize,
    data: [u8; RX_DATA],
    data_start: usize,
    data_end: usize,
    heard: Heard,
    connected: bool,
    stats: ModemStats,
}

impl<U: Read + Write + ReadReady, C: Clock> AtModem<U, C> {
    /// A modem that will dial `host` (at most 64 bytes) on `port`.
    pub fn new(uart: U, clock: C, host: &str, port: u16, timeouts: Timeouts) -> Self {
        let mut h = [0u8; 64];
        let n = host.len().min(64);
        h[..n].copy_from_slice(&host.as_bytes()[..n]);
        Self {
            uart,
            clock,
            host: h,
            host_len: n,
            port,
            timeouts,
            line: [0; LINE],
            line_len: 0,
            frame_left: 0,
            data: [0; RX_DATA],
            data_start: 0,
            data_end: 0,
            heard: Heard::default(),
            connected: false,
            stats: ModemStats::default(),
        }
    }

    /// What was counted.
    pub fn stats(&self) -> ModemStats {
        self.stats
    }

    /// Whether a socket is open.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    fn byte(&mut self, b: u8) {
        if self.frame_left > 0 {
            // Room was checked before the byte was read.
            self.data[self.data_end] = b;
            self.data_end += 1;
            self.frame_left -= 1;
            return;
        }
        if b == b'\n' || b == b'\r' {
            if self.line_len > 0 {
                self.line_done();
            }
            self.line_len = 0;
            return;
        }
        if self.line_len < LINE {
            self.line[self.line_len] = b;
            self.line_len += 1;
        }
        let line = &self.line[..self.line_len];
        if line == b"> " {
            self.heard.prompt = true;
            self.line_len = 0;
        } else if b == b':'
            && let Some(n) = line.strip_prefix(b"+IPD,").and_then(|d| d.strip_suffix(b":")).and_then(parse_len)
        {
            self.stats.frames += 1;
            self.frame_left = n;
            self.line_len = 0;
        }
    }

    fn line_done(&mut self) {
        let h = &mut self.heard;
        match &self.line[..self.line_len] {
            b"OK" => h.ok = true,
            b"ERROR" => h.error = true,
            b"CONNECT OK" | b"ALREADY CONNECT" => h.connect_ok = true,
            b"CONNECT FAIL" => h.connect_fail = true,
            b"SEND OK" => h.send_ok = true,
            b"SEND FAIL" => h.send_fail = true,
            b"CLOSE OK" => h.close_ok = true,
            b"CLOSED" => {
                h.closed = true;
                self.connected = false;
                self.stats.peer_closed += 1;
            }
            // What a modem says unasked (registration, signal) is not for the link.
            _ => self.stats.unknown_lines += 1,
        }
    }

    /// Takes what the UART holds, while there is room for frame data.
    fn pump(&mut self) -> Result<(), ModemError> {
        if self.data_start == self.data_end {
            self.data_start = 0;
            self.data_end = 0;
        }
        loop {
            if self.frame_left > 0 && self.data_end == RX_DATA {
                if self.data_start == 0 {
                    // Full of data the unit has not read: the modem waits.
                    return Ok(());
                }
                self.data.copy_within(self.data_start..self.data_end, 0);
                self.data_end -= self.data_start;
                self.data_start = 0;
            }
            if !self.uart.read_ready().map_err(|_| ModemError::Uart)? {
                return Ok(());
            }
            let mut buf = [0u8; 32];
            let room = if self.frame_left > 0 { (RX_DATA - self.data_end).min(self.frame_left) } else { 1 };
            let want = room.clamp(1, buf.len());
            let n = self.uart.read(&mut buf[..want]).map_err(|_| ModemError::Uart)?;
            if n == 0 {
                return Err(ModemError::Uart);
            }
            for &b in &buf[..n] {
                self.byte(b);
            }
        }
    }

    /// Pumps until `done` says so, failing at `fail` or after `ms`.
    fn wait(&mut self, ms: u32, done: fn(&Heard) -> bool, fail: fn(&Heard) -> bool) -> Result<(), ModemError> {
        let deadline = self.clock.now_ms() + u64::from(ms);
        loop {
            self.pump()?;
            if done(&self.heard) {
                return Ok(());
            }
            if fail(&self.heard) {
                return Err(ModemError::Refused);
            }
            if self.clock.now_ms() > deadline {
                self.stats.timeouts += 1;
                return Err(ModemError::Timeout);
            }
        }
    }

    fn command(&mut self, parts: &[&[u8]]) -> Result<(), ModemError> {
        self.heard = Heard { closed: self.heard.closed, ..Heard::default() };
        for p in parts {
            self.uart.write_all(p).map_err(|_| ModemError::Uart)?;
        }
        self.uart.write_all(b"\r").map_err(|_| ModemError::Uart)?;
        self.uart.flush().map_err(|_| ModemError::Uart)
    }

    fn send_chunk(&mut self, chunk: &[u8]) -> Result<(), ModemError> {
        let mut digits = [0u8; 5];
        let len = format_len(chunk.len(), &mut digits);
        self.command(&[b"AT+CIPSEND=", len])?;
        self.wait(self.timeouts.send_ms, |h| h.prompt, |h| h.error || h.closed)?;
        self.uart.write_all(chunk).map_err(|_| ModemError::Uart)?;
        self.uart.flush().map_err(|_| ModemError::Uart)?;
        self.wait(self.timeouts.send_ms, |h| h.send_ok, |h| h.send_fail || h.error || h.closed)
    }
}

fn parse_len(d: &[u8]) -> Option<usize> {
    if d.is_empty() || d.len() > 5 || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(d.iter().fold(0usize, |a, b| a * 10 + usize::from(b - b'0')))
}

fn format_len(mut n: usize, out: &mut [u8; 5]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            return &out[i..];
        }
    }
}

impl<U, C> embedded_io::ErrorType for AtModem<U, C> {
    type Error = ModemError;
}

impl<U: Read + Write + ReadReady, C: Clock> ReadReady for AtModem<U, C> {
    fn read_ready(&mut self) -> Result<bool, ModemError> {
        self.pump()?;
        Ok(self.data_start < self.data_end || !self.connected)
    }
}

impl<U: Read + Write + ReadReady, C: Clock> Read for AtModem<U, C> {
    /// Data the peer sent; 0 once the socket is closed and nothing is left.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ModemError> {
        self.pump()?;
        let n = buf.len().min(self.data_end - self.data_start);
        buf[..n].copy_from_slice(&self.data[self.data_start..self.data_start + n]);
        self.data_start += n;
        Ok(n)
    }
}

impl<U: Read + Write + ReadReady, C: Clock> Write for AtModem<U, C> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, ModemError> {
        if !self.connected {
            return Err(ModemError::NotConnected);
        }
        let chunk = &buf[..buf.len().min(SEND_CHUNK)];
        if chunk.is_empty() {
            return Ok(0);
        }
        self.send_chunk(chunk)?;
        Ok(chunk.len())
    }
    fn flush(&mut self) -> Result<(), ModemError> {
        Ok(())
    }
}

impl<U: Read + Write + ReadReady, C: Clock> Link for AtModem<U, C> {
    fn dial(&mut self) -> Result<(), ModemError> {
        self.connected = false;
        self.frame_left = 0;
        self.line_len = 0;
        self.data_start = 0;
        self.data_end = 0;
        self.command(&[b"ATE0"])?;
        self.wait(self.timeouts.command_ms, |h| h.ok, |h| h.error)?;
        // A socket the unit's reset left open: closed, or "ERROR" when none.
        self.command(&[b"AT+CIPCLOSE"])?;
        let _ = self.wait(self.timeouts.command_ms, |h| h.close_ok, |h| h.error);
        let mut digits = [0u8; 5];
        let port = format_len(usize::from(self.port), &mut digits);
        let host = self.host;
        self.command(&[b"AT+CIPSTART=\"TCP\",\"", &host[..self.host_len], b"\",", port])?;
        self.wait(self.timeouts.connect_ms, |h| h.connect_ok, |h| h.connect_fail || h.error)?;
        self.heard.closed = false;
        self.connected = true;
        Ok(())
    }

    fn hang_up(&mut self) {
        if self.connected && self.command(&[b"AT+CIPCLOSE"]).is_ok() {
            let _ = self.wait(self.timeouts.command_ms, |h| h.close_ok, |h| h.error);
        }
        self.connected = false;
        self.data_start = 0;
        self.data_end = 0;
    }
}

#[cfg(test)]
mod tests;
