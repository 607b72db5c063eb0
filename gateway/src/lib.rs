#![doc = include_str!("../README.md")]

pub mod app;
pub mod cli;
pub mod config;
pub mod devices;
pub mod http;
pub mod queue;
pub mod stats;
pub mod uplink;
