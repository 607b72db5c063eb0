//! Deterministic provisioning for tests.

use fleetline_wire::provisioning::{DeviceEntry, GatewayEntry, Provisioning};
use fleetline_wire::{DeviceId, DeviceKey, FleetId, GatewayId};

/// The key of device `i` (deterministic, distinct).
pub fn device_key(i: usize) -> DeviceKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k[8] = 0xd0;
    DeviceKey::from_bytes(k)
}

/// The key of gateway `i`.
pub fn gateway_key(i: usize) -> DeviceKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k[8] = 0x9a;
    DeviceKey::from_bytes(k)
}

/// Device id `i`: `dev-{i:04}`.
pub fn device_id(i: usize) -> DeviceId {
    DeviceId::new(&format!("dev-{i:04}")).expect("valid id")
}

/// Gateway id `i`: `gw-{i}`.
pub fn gateway_id(i: usize) -> GatewayId {
    GatewayId::new(&format!("gw-{i}")).expect("valid id")
}

/// `devices` devices in fleet `acme` and `gateways` gateways.
pub fn fleet(devices: usize, gateways: usize) -> Provisioning {
    let mut p = Provisioning::default();
    let fleet = FleetId::new("acme").expect("valid id");
    for i in 0..devices {
        p.upsert_device(DeviceEntry {
            fleet,
            device: device_id(i),
            key: device_key(i),
            previous: None,
            revoked: false,
        });
    }
    for i in 0..gateways {
        p.upsert_gateway(GatewayEntry { id: gateway_id(i), key: gateway_key(i) });
    }
    p
}
