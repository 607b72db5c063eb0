//! A raw MQTT client for attack tests: hand-made CONNECT packets of any protocol
//! level, read back the CONNACK code, and loops of connect → CONNECT → CONNACK →
//! close as a unit on a flapping link (or an attacker) produces them.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn push_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

/// A SUBSCRIBE packet (QoS 1 for every filter, packet id 1).
pub fn subscribe_packet(filters: &[String]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    for f in filters {
        push_str(&mut body, f.as_bytes());
        body.push(1);
    }
    let mut out = vec![0x82];
    push_remaining_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// A CONNECT packet. `level` is the protocol level: 3 (MQTT 3.1, "MQIsdp"),
/// 4 (3.1.1) or 5 (MQTT 5, with an empty property block).
pub fn connect_packet(level: u8, client_id: &str, login: Option<(&str, &[u8])>, keep_alive: u16) -> Vec<u8> {
    let mut var = Vec::new();
    push_str(&mut var, if level == 3 { b"MQIsdp" } else { b"MQTT" });
    var.push(level);
    let mut flags = 0x02; // clean session
    if login.is_some() {
        flags |= 0xC0;
    }
    var.push(flags);
    var.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        var.push(0); // no properties
    }
    push_str(&mut var, client_id.as_bytes());
    if let Some((user, pass)) = login {
        push_str(&mut var, user.as_bytes());
        push_str(&mut var, pass);
    }
    let mut out = vec![0x10];
    push_remaining_length(&mut out, var.len());
    out.extend_from_slice(&var);
    out
}

/// What a server answered to a CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// A CONNACK: its first bytes after the fixed header (flags, code).
    ConnAck {
        /// Packet bytes after the fixed header.
        body: Vec<u8>,
    },
    /// The server closed the connection without a CONNACK.
    Closed,
    /// Nothing within the timeout.
    TimedOut,
    /// The TCP connection could not be made.
    Refused,
}

impl ConnectOutcome {
    /// The return code of an MQTT 3.1/3.1.1 CONNACK (or the reason code of MQTT 5).
    pub fn code(&self) -> Option<u8> {
        match self {
            Self::ConnAck { body } => body.get(1).copied(),
            _ => None,
        }
    }
}

/// Sends `packet` on a new connection and reads the CONNACK (or what happened instead).
/// The connection is closed on return.
pub async fn connect_once(addr: SocketAddr, packet: &[u8], timeout: Duration) -> ConnectOutcome {
    let Ok(Ok(mut s)) = tokio::time::timeout(timeout, TcpStream::connect(addr)).await else {
        return ConnectOutcome::Refused;
    };
    if s.write_all(packet).await.is_err() {
        return ConnectOutcome::Closed;
    }
    let read = async {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.ok()?;
        if head[0] != 0x20 {
            return Some(ConnectOutcome::Closed);
        }
        let mut body = vec![0u8; usize::from(head[1] & 0x7f)];
        s.read_exact(&mut body).await.ok()?;
        Some(ConnectOutcome::ConnAck { body })
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Some(o)) => o,
        Ok(None) => ConnectOutcome::Closed,
        Err(_) => ConnectOutcome::TimedOut,
    }
}

/// `cycles` rounds of connect → CONNECT → CONNACK → close with one login, as fast
/// as the server answers; returns how many rounds got a CONNACK with code 0.
pub async fn reconnect_storm(addr: SocketAddr, client_id: &str, user: &str, pass: &[u8], cycles: usize) -> usize {
    let packet = connect_packet(4, client_id, Some((user, pass)), 30);
    let mut ok = 0;
    for _ in 0..cycles {
        if connect_once(addr, &packet, Duration::from_secs(2)).await.code() == Some(0) {
            ok += 1;
        }
    }
    ok
}
