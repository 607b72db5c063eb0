//! The simulator's integration tests in one binary: the demo as users run it
//! (`demo`) and late data giving identical aggregates and events (`late_data`).
//! Run one group with `cargo test -p fleetline-sim --test it late_data::`.

mod demo;
mod late_data;
