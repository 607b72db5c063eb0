//! Every MQTT topic of the system, built and parsed here only, without allocation.
//!
//! Devices ↔ gateway: `fleetline/v1/{fleet}/{device}/up` carries sealed batches from
//! a device; `…/ack` and `…/cmd` carry control messages to it. Gateway ↔ cloud:
//! `fleetline/v1/ingest/{shard}` carries a shard's bundles, `fleetline/v1/gw/{gateway}/ack`
//! the cloud's bundle acks. Cloud → subscribers: `fleetline/v1/alerts/{fleet}/{device}`.

use crate::ids::{DeviceId, FleetId};

/// Topic prefix of every Fleetline topic.
pub const PREFIX: &str = "fleetline/v1/";

/// Which of a device's three topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Device → gateway batches.
    Up,
    /// Gateway → device acks.
    Ack,
    /// Commands to the device.
    Cmd,
}

impl Channel {
    /// The topic's last level.
    pub const fn suffix(self) -> &'static str {
        match self {
            Channel::Up => "up",
            Channel::Ack => "ack",
            Channel::Cmd => "cmd",
        }
    }
}

/// A topic or MQTT username held inline; long enough for any two ids.
#[derive(Clone, Copy)]
pub struct TopicBuf {
    len: u8,
    buf: [u8; 96],
}

impl TopicBuf {
    fn from_parts(parts: &[&str]) -> Self {
        let mut out = Self { len: 0, buf: [0; 96] };
        for p in parts {
            let b = p.as_bytes();
            let start = usize::from(out.len);
            // Ids are at most 32 bytes, so every topic fits; saturate rather than panic.
            let end = (start + b.len()).min(out.buf.len());
            out.buf[start..end].copy_from_slice(&b[..end - start]);
            out.len = end as u8;
        }
        out
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl core::fmt::Debug for TopicBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// `fleetline/v1/{fleet}/{device}/{up|ack|cmd}`.
pub fn device_topic(fleet: &FleetId, device: &DeviceId, channel: Channel) -> TopicBuf {
    TopicBuf::from_parts(&[PREFIX, fleet.as_str(), "/", device.as_str(), "/", channel.suffix()])
}

/// The MQTT username (and client id) of a device: `{fleet}.{device}`. A dot, since
/// brokers refuse `/`, `+`, `#` and `$` in client ids; ids never contain one.
pub fn device_username(fleet: &FleetId, device: &DeviceId) -> TopicBuf {
    TopicBuf::from_parts(&[fleet.as_str(), ".", device.as_str()])
}

/// Every device's batches (the gateway's subscription).
pub const UP_FILTER: &str = "fleetline/v1/+/+/up";
/// Every device's acks.
pub const ACK_FILTER: &str = "fleetline/v1/+/+/ack";
/// Every device's commands.
pub const CMD_FILTER: &str = "fleetline/v1/+/+/cmd";
/// Every shard's bundles.
pub const INGEST_FILTER: &str = "fleetline/v1/ingest/+";
/// Every gateway's bundle acks.
pub const BUNDLE_ACK_FILTER: &str = "fleetline/v1/gw/+/ack";
/// Every vehicle's alerts.
pub const ALERT_FILTER: &str = "fleetline/v1/alerts/#";

const INGEST_PREFIX: &str = "fleetline/v1/ingest/";

/// `fleetline/v1/ingest/{shard}`: a shard's bundles, gateway → cloud.
pub fn ingest_topic(shard: u16) -> TopicBuf {
    let mut digits = [0u8; 5];
    let mut n = shard;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    TopicBuf::from_parts(&[INGEST_PREFIX, core::str::from_utf8(&digits[i..]).unwrap_or("0")])
}

/// The shard of an ingest topic; `None` for anything else.
pub fn parse_ingest_topic(topic: &str) -> Option<u16> {
    let n = topic.strip_prefix(INGEST_PREFIX)?;
    if n.is_empty() || n.len() > 5 || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok()
}

/// `fleetline/v1/gw/{gateway}/ack`: the cloud's bundle acks to one gateway.
pub fn bundle_ack_topic(gateway: &str) -> TopicBuf {
    TopicBuf::from_parts(&[PREFIX, "gw/", gateway, "/ack"])
}

/// `fleetline/v1/alerts/{fleet}/{device}`: a vehicle's alerts.
pub fn alert_topic(fleet: &str, device: &str) -> TopicBuf {
    TopicBuf::from_parts(&[PREFIX, "alerts/", fleet, "/", device])
}

/// Splits a device topic into its ids and channel; `None` for anything else.
pub fn parse_device_topic(topic: &str) -> Option<(FleetId, DeviceId, Channel)> {
    let rest = topic.strip_prefix(PREFIX)?;
    let mut it = rest.split('/');
    let fleet = FleetId::new(it.next()?).ok()?;
    let device = DeviceId::new(it.next()?).ok()?;
    let channel = match it.next()? {
        "up" => Channel::Up,
        "ack" => Channel::Ack,
        "cmd" => Channel::Cmd,
        _ => return None,
    };
    it.next().is_none().then_some((fleet, device, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let f = FleetId::new("acme").unwrap();
        let d = DeviceId::new(&"d".repeat(32)).unwrap();
        for c in [Channel::Up, Channel::Ack, Channel::Cmd] {
            let t = device_topic(&f, &d, c);
            assert_eq!(parse_device_topic(t.as_str()), Some((f, d, c)));
        }
        assert_eq!(device_topic(&f, &d, Channel::Up).as_str(), format!("fleetline/v1/acme/{}/up", "d".repeat(32)));
        assert_eq!(parse_device_topic("fleetline/v1/acme/x/up/extra"), None);
        assert_eq!(parse_device_topic("fleetline/v1/ACME/x/up"), None);
        assert_eq!(device_username(&f, &d).as_str(), format!("acme.{}", "d".repeat(32)));
    }

    #[test]
    fn cloud_topics_round_trip() {
        for shard in [0u16, 7, 10, 4095, u16::MAX] {
            let t = ingest_topic(shard);
            assert_eq!(t.as_str(), format!("fleetline/v1/ingest/{shard}"));
            assert_eq!(parse_ingest_topic(t.as_str()), Some(shard));
        }
        for bad in
            ["fleetline/v1/ingest/", "fleetline/v1/ingest/07", "fleetline/v1/ingest/65536", "fleetline/v1/ingest/1/x"]
        {
            assert_eq!(parse_ingest_topic(bad), None, "{bad}");
        }
        assert_eq!(bundle_ack_topic("gw-1").as_str(), "fleetline/v1/gw/gw-1/ack");
        assert_eq!(alert_topic("acme", "v-1").as_str(), "fleetline/v1/alerts/acme/v-1");
    }
}
