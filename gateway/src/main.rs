//! The `fleetline-gateway` binary.
fn main() {}
