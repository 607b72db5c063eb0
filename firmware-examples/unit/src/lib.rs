//! The board support both firmware images share, for Arm's MPS2 AN386
//! (Cortex-M4) as QEMU models it: the CMSDK UART and watchdog, SysTick as the
//! loop's clock, the unit's flash (RAM with NOR semantics whose image the host
//! keeps over semihosting), and the host's UTC for the simulated peripherals
//! (`fleetline_unit_app::sim`: QEMU's board has no GNSS receiver, tire
//! receiver or fuel sender).

#![no_std]

pub mod board;
