extern crate std;

use std::cell::Cell;
use std::rc::Rc;
use std::vec::Vec;

use embedded_io::{Read, ReadReady};
use fleetline_unit_drivers::gps::NmeaParser;
use fleetline_unit_drivers::tpms::{MAX_WHEELS, Tpms};

use super::*;

#[test]
fn the_receivers_sentences_parse_with_the_driver_and_carry_the_time() {
    let t = Rc::new(Cell::new(1_790_000_123u64));
    let clock = t.clone();
    let mut uart = GpsUart::new(move || clock.get(), 3, 0);
    let mut parser = NmeaParser::default();
    let mut fixes = Vec::new();
    for _ in 0..3 {
        let mut buf = [0u8; 40];
        while uart.read_ready().unwrap() {
            let n = uart.read(&mut buf).unwrap();
            parser.feed(&buf[..n], |f| fixes.push(f));
        }
        t.set(t.get() + 1);
    }
    assert_eq!(fixes.len(), 3, "{:?}", parser.stats());
    assert_eq!(fixes[0].time_ms, Some(1_790_000_123_000));
    assert_eq!(fixes[2].time_ms, Some(1_790_000_125_000));
    let (lat, lon, knots_10, _) = position(3, 1_790_000_123);
    assert!((fixes[0].lat - lat as f64 / 1e6).abs() < 2e-6, "{:?}", fixes[0]);
    assert!((fixes[0].lon - lon as f64 / 1e6).abs() < 2e-6);
    assert!((f64::from(fixes[0].speed_kmh.unwrap()) - f64::from(knots_10) / 10.0 * 1.852).abs() < 0.01);
    assert_eq!(civil(1_790_000_123 / 86_400), (2026, 9, 21));
    assert_eq!(parser.stats().checksum_errors, 0);
}

#[test]
fn a_noisy_line_garbles_every_nth_sentence_and_the_driver_counts_it() {
    let t = Rc::new(Cell::new(1_800_000_000u64));
    let clock = t.clone();
    let mut uart = GpsUart::new(move || clock.get(), 0, 5);
    let mut parser = NmeaParser::default();
    for _ in 0..10 {
        let mut buf = [0u8; 64];
        while uart.read_ready().unwrap() {
            let n = uart.read(&mut buf).unwrap();
            parser.feed(&buf[..n], |_| {});
        }
        t.set(t.get() + 1);
    }
    let s = parser.stats();
    assert_eq!(s.checksum_errors, 4, "{s:?}");
}

#[test]
fn the_tire_receiver_answers_the_driver() {
    let mut t = Tpms::new(TpmsBus::new(|| 1_800_000_000, 1), tpms::ADDRESS).unwrap();
    let mut wheels = [None; MAX_WHEELS];
    assert_eq!(t.read(&mut wheels).unwrap(), 4);
    for w in wheels.iter().take(4) {
        let w = w.unwrap();
        assert!((850.0..880.0).contains(&w.pressure_kpa) && (28.0..32.0).contains(&w.temperature_c), "{w:?}");
    }
    assert!(Tpms::new(TpmsBus::new(|| 0, 1), 0x33).is_err(), "nothing at another address");
}
