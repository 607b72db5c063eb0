//! What a session may do once logged in, and the check of each packet against it.

use rumqttc::mqttbytes::v4::Packet;

use crate::reason;

/// What one session may do once logged in.
pub trait Grants: Send + Sync {
    /// Whether it may publish to `topic`.
    fn may_publish(&self, topic: &str) -> bool;
    /// Whether it may subscribe to `filter` (as written, wildcards included).
    fn may_subscribe(&self, filter: &str) -> bool;
}

/// Grants everything (a broker whose logins need no topic permissions).
#[derive(Clone, Copy, Debug, Default)]
pub struct Everything;

impl Grants for Everything {
    fn may_publish(&self, _: &str) -> bool {
        true
    }

    fn may_subscribe(&self, _: &str) -> bool {
        true
    }
}

/// Most topic filters one session may subscribe to.
pub const MAX_FILTERS_PER_SESSION: usize = 16;

/// Whether a client's packet is within its grants; `filters` counts the session's
/// subscriptions.
pub fn check_packet(packet: &Packet, grants: &dyn Grants, filters: &mut usize) -> Result<(), &'static str> {
    match packet {
        Packet::Publish(p) => {
            if p.retain {
                return Err(reason::RETAIN_DENIED);
            }
            if !grants.may_publish(&p.topic) {
                return Err(reason::PUBLISH_DENIED);
            }
        }
        Packet::Subscribe(s) => {
            if s.filters.iter().any(|f| !grants.may_subscribe(&f.path)) {
                return Err(reason::SUBSCRIBE_DENIED);
            }
            *filters += s.filters.len();
            if *filters > MAX_FILTERS_PER_SESSION {
                return Err(reason::TOO_MANY_FILTERS);
            }
        }
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::Unsubscribe(_)
        | Packet::PingReq
        | Packet::Disconnect => {}
        // A second CONNECT, or what only a server sends.
        Packet::Connect(_) | Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            return Err(reason::MALFORMED);
        }
    }
    Ok(())
}
