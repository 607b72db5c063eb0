//! Simulated vehicles, deterministic from (seed, index): a route of stops around a
//! depot, a speed profile, a fuel model with refuels, tire pressure that follows
//! tire temperature, GPS noise and dropouts, a drifting unit clock, and injected
//! incidents whose ground truth is recorded for scoring.
//!
//! [`Vehicle::step`] advances one simulated second and returns what the unit
//! measured in it (nothing while the unit is silent).

use fleetline_cloud::analytics::EventKind;
use fleetline_device::Reading;
use fleetline_wire::signals::kind::{self, Wheel};
use serde::Serialize;

use crate::rng::Rng;

/// Earth radius, metres.
const EARTH_M: f64 = 6_371_000.0;
/// Wheels simulated: axle rows 1 and 2, left and right.
pub const WHEELS: [Wheel; 4] = [
    Wheel { row: 1, right: false },
    Wheel { row: 1, right: true },
    Wheel { row: 2, right: false },
    Wheel { row: 2, right: true },
];

/// Kinds of injected incidents (and of refuels, which happen by themselves).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKind {
    /// A tire loses about 1.5 kPa per minute until the end of the run.
    SlowLeak,
    /// A tire loses its pressure within a minute; the vehicle stops.
    Puncture,
    /// Fuel drains while the vehicle is parked.
    FuelTheft,
    /// The tank is filled at a stop.
    Refuel,
    /// The driver keeps well above the limit for a while.
    Overspeed,
    /// The unit sends nothing for a while (the vehicle keeps driving).
    Silent,
}

impl IncidentKind {
    /// The cloud's event kind that finds it.
    pub fn event_kind(self) -> EventKind {
        match self {
            Self::SlowLeak => EventKind::SlowLeak,
            Self::Puncture => EventKind::Puncture,
            Self::FuelTheft => EventKind::FuelTheft,
            Self::Refuel => EventKind::Refuel,
            Self::Overspeed => EventKind::Overspeed,
            Self::Silent => EventKind::Silent,
        }
    }

    /// Its name: in `ground-truth.json`, the same as its event kind's.
    pub fn name(self) -> &'static str {
        self.event_kind().as_str()
    }

    /// Every kind.
    pub const ALL: [Self; 6] =
        [Self::SlowLeak, Self::Puncture, Self::FuelTheft, Self::Refuel, Self::Overspeed, Self::Silent];

    /// Simulated seconds from its start before the cloud's default detectors can
    /// see an incident lasting `len_s`. A slow leak loses 1.5 kPa a minute and the
    /// slow-leak detector wants a falling trend over 60 % of its 10-minute window
    /// (tire readings every 30 s): about 8 minutes. A puncture, a theft (15 l/min
    /// once the vehicle stands, fuel read every 10 s) and overspeed show within a
    /// minute; a silence is judged once it has lasted most of its length (the demo
    /// sets `silent_after` from it).
    pub fn maturity_s(self, len_s: u64) -> u64 {
        match self {
            Self::SlowLeak => 480,
            Self::Puncture | Self::FuelTheft | Self::Overspeed => 60,
            Self::Silent => len_s,
            Self::Refuel => 0,
        }
    }
}

/// How the fleet's activity varies over the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Every vehicle drives all the time.
    #[default]
    Steady,
    /// Shifts by local time of day, depots spread over time zones (UTC−3…UTC+3):
    /// off shift, vehicles park and units report only every minute.
    Daily,
    /// A third of the fleet is a reserve that drives only from 40 % to 70 % of the run.
    Surge,
}

/// One incident, in ground truth.
#[derive(Clone, Debug, Serialize)]
pub struct Incident {
    /// What.
    pub kind: IncidentKind,
    /// Vehicle index.
    pub vehicle: usize,
    /// Wheel index into [`WHEELS`] for tire incidents.
    pub wheel: Option<usize>,
    /// Start, simulated seconds from the run's start.
    pub start_s: u64,
    /// End, simulated seconds from the run's start.
    pub end_s: u64,
    /// Whether the run lasts long enough after its start for the detectors to see
    /// it ([`IncidentKind::maturity_s`]); one that cannot is still injected and
    /// listed, but not scored as a miss.
    pub matures: bool,
}

/// A vehicle's fixed traits.
#[derive(Clone, Debug)]
pub struct VehicleSpec {
    /// Index in the fleet.
    pub index: usize,
    /// Stops it drives between, (lat, lon) in degrees; the first is the depot.
    pub stops: Vec<(f64, f64)>,
    /// Cruise speed, km/h.
    pub cruise_kmh: f64,
    /// Speed limit the overspeed incident exceeds, km/h.
    pub limit_kmh: f64,
    /// Tank, litres.
    pub tank_l: f64,
    /// Consumption while driving, l/100 km.
    pub consumption: f64,
    /// Cold tire pressure, kPa.
    pub cold_kpa: f64,
    /// Ambient temperature, °C.
    pub ambient_c: f64,
    /// Unit clock error: offset (ms) and drift (parts per million).
    pub clock_offset_ms: f64,
    /// Drift, ppm.
    pub clock_drift_ppm: f64,
    /// Injected incidents.
    pub incidents: Vec<Incident>,
    /// Activity profile.
    pub profile: Profile,
    /// Local time offset of its depot, hours.
    pub tz_offset_h: i64,
    /// Shift start, local hour.
    pub shift_start_h: i64,
    /// Part of the surge reserve.
    pub reserve: bool,
    /// Length of the run, simulated seconds.
    pub duration_s: u64,
}

impl VehicleSpec {
    /// The vehicle `index` of a fleet built from `seed`, for a run of `duration_s`.
    pub fn generate(seed: u64, index: usize, fleet_size: usize, duration_s: u64, profile: Profile) -> Self {
        let mut depots = Rng::new(seed, u64::MAX);
        let depot_count = fleet_size.div_ceil(100).max(1);
        let depot = index % depot_count;
        let mut dep = (0.0, 0.0);
        for _ in 0..=depot {
            dep = (52.52 + depots.range(-0.3, 0.3), 13.40 + depots.range(-0.45, 0.45));
        }
        let mut r = Rng::new(seed, index as u64);
        let mut stops = vec![dep];
        for _ in 0..r.range(3.0, 7.0) as usize {
            let d = r.range(1_500.0, 12_000.0);
            let b = r.range(0.0, 360.0);
            stops.push(offset(dep, d, b));
        }
        let cruise_kmh = r.range(45.0, 85.0);
        let mut incidents = Vec::new();
        let d = duration_s.max(60);
        let mut maybe = |r: &mut Rng, kind: IncidentKind, p: f64, len: u64| {
            if r.chance(p) {
                // Early enough to mature within the run where the run is long enough.
                let latest = (d as f64 * 0.6).min(d.saturating_sub(kind.maturity_s(len)) as f64).max(d as f64 * 0.1);
                let start = r.range(d as f64 * 0.1, latest) as u64;
                let wheel =
                    matches!(kind, IncidentKind::SlowLeak | IncidentKind::Puncture).then(|| (r.unit() * 4.0) as usize);
                let matures = start + kind.maturity_s(len) <= duration_s;
                incidents.push(Incident {
                    kind,
                    vehicle: index,
                    wheel,
                    start_s: start,
                    end_s: (start + len).min(d),
                    matures,
                });
            }
        };
        maybe(&mut r, IncidentKind::SlowLeak, 0.02, d);
        maybe(&mut r, IncidentKind::Puncture, 0.01, 60);
        maybe(&mut r, IncidentKind::FuelTheft, 0.01, (d / 5).clamp(30, 600));
        maybe(&mut r, IncidentKind::Overspeed, 0.02, (d / 6).clamp(20, 300));
        maybe(&mut r, IncidentKind::Silent, 0.01, (d / 8).clamp(15, 1800));
        Self {
            index,
            stops,
            cruise_kmh,
            limit_kmh: 90.0,
            tank_l: r.range(300.0, 600.0),
            consumption: r.range(25.0, 38.0),
            cold_kpa: r.range(780.0, 880.0),
            ambient_c: r.range(2.0, 24.0),
            clock_offset_ms: r.normal() * 800.0,
            clock_drift_ppm: r.normal() * 40.0,
            incidents,
            profile,
            tz_offset_h: (depot % 7) as i64 - 3,
            shift_start_h: 5 + (r.unit() * 5.0) as i64,
            reserve: index % 3 == 2,
            duration_s,
        }
    }

    /// Whether the vehicle is on duty at simulated second `t` of a run starting at `t0_ms`.
    pub fn on_duty(&self, t: u64, t0_ms: u64) -> bool {
        match self.profile {
            Profile::Steady => true,
            Profile::Daily => {
                let local_h = ((t0_ms / 1000 + t) as i64 / 3600 + self.tz_offset_h).rem_euclid(24);
                (local_h - self.shift_start_h).rem_euclid(24) < 9
            }
            Profile::Surge => !self.reserve || (t * 10 >= self.duration_s * 4 && t * 10 < self.duration_s * 7),
        }
    }

    fn active(&self, kind: IncidentKind, t: u64) -> Option<&Incident> {
        self.incidents.iter().find(|i| i.kind == kind && i.start_s <= t && t < i.end_s)
    }
}

/// A point `dist_m` from `from` on bearing `bearing_deg`.
fn offset(from: (f64, f64), dist_m: f64, bearing_deg: f64) -> (f64, f64) {
    let (lat, b) = (from.0.to_radians(), bearing_deg.to_radians());
    let dlat = dist_m * b.cos() / EARTH_M;
    let dlon = dist_m * b.sin() / (EARTH_M * lat.cos());
    (from.0 + dlat.to_degrees(), from.1 + dlon.to_degrees())
}

/// Distance (m) and bearing (degrees) from `a` to `b`, flat-earth (short hops).
fn hop(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    let y = (b.0 - a.0).to_radians() * EARTH_M;
    let x = (b.1 - a.1).to_radians() * EARTH_M * a.0.to_radians().cos();
    ((x * x + y * y).sqrt(), x.atan2(y).to_degrees().rem_euclid(360.0))
}

/// A vehicle's changing state.
#[derive(Clone, Debug)]
pub struct Vehicle {
    /// Traits.
    pub spec: VehicleSpec,
    rng: Rng,
    t: u64,
    pos: (f64, f64),
    next_stop: usize,
    speed_kmh: f64,
    heading: f64,
    odometer_km: f64,
    fuel_l: f64,
    parked_s: u64,
    tire_c: [f64; 4],
    lost_kpa: [f64; 4],
    gps_dropout_s: u64,
    /// Refuels that happened (ground truth).
    pub refuels: Vec<Incident>,
}

impl Vehicle {
    /// A vehicle at its depot, parked for a moment, with a partly full tank.
    pub fn new(spec: VehicleSpec, seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x5eed, spec.index as u64);
        let fuel_l = spec.tank_l * rng.range(0.25, 0.95);
        let parked_s = rng.range(0.0, 20.0) as u64;
        Self {
            pos: spec.stops[0],
            tire_c: [spec.ambient_c; 4],
            spec,
            rng,
            t: 0,
            next_stop: 1,
            speed_kmh: 0.0,
            heading: 0.0,
            odometer_km: 0.0,
            fuel_l,
            parked_s,
            lost_kpa: [0.0; 4],
            gps_dropout_s: 0,
            refuels: Vec::new(),
        }
    }

    /// Simulated seconds since the start.
    pub fn elapsed_s(&self) -> u64 {
        self.t
    }

    /// Advances one second of simulated time starting at Unix ms `t0_ms + t·1000`;
    /// returns what the unit measured, stamped by the unit's (drifting) clock.
    pub fn step(&mut self, t0_ms: u64, out: &mut Vec<Reading>) {
        let t = self.t;
        self.t += 1;
        let s = &self.spec;
        let theft = s.active(IncidentKind::FuelTheft, t).is_some();
        let punctured = s.incidents.iter().any(|i| i.kind == IncidentKind::Puncture && i.start_s <= t);
        let on_duty = s.on_duty(t, t0_ms);
        // Driving or parked.
        if theft || punctured || !on_duty {
            self.parked_s = self.parked_s.max(1);
        }
        let target = if self.parked_s > 0 {
            0.0
        } else if s.active(IncidentKind::Overspeed, t).is_some() {
            s.limit_kmh + 25.0
        } else {
            s.cruise_kmh
        };
        // ±1.5 m/s² ≈ ±5.4 km/h per second.
        self.speed_kmh +=
            (target - self.speed_kmh).clamp(-5.4, 5.4) + self.rng.normal() * 0.3 * f64::from(u8::from(target > 0.0));
        self.speed_kmh = self.speed_kmh.max(0.0);
        let step_m = self.speed_kmh / 3.6;
        let stop = s.stops[self.next_stop % s.stops.len()];
        let (dist, bearing) = hop(self.pos, stop);
        if self.parked_s > 0 {
            self.parked_s -= 1;
            self.fuel_l -= 0.0008; // idling
        } else if dist <= step_m.max(5.0) {
            self.pos = stop;
            self.next_stop += 1;
            self.parked_s = self.rng.range(20.0, 90.0) as u64;
            if self.fuel_l < s.tank_l * 0.2 {
                self.refuels.push(Incident {
                    kind: IncidentKind::Refuel,
                    vehicle: s.index,
                    wheel: None,
                    start_s: t,
                    end_s: t + 1,
                    matures: true,
                });
                self.fuel_l = s.tank_l * self.rng.range(0.9, 1.0);
            }
        } else {
            self.pos = offset(self.pos, step_m, bearing);
            self.heading = bearing;
            self.odometer_km += step_m / 1000.0;
            self.fuel_l -= s.consumption * step_m / 100_000.0;
        }
        if theft {
            self.fuel_l -= 0.25; // 15 l/min out of the tank
        }
        self.fuel_l = self.fuel_l.max(0.0);
        // Tires warm with speed; pressure follows temperature; leaks subtract.
        for w in 0..4 {
            let hot = s.ambient_c + self.speed_kmh * 0.35;
            self.tire_c[w] += (hot - self.tire_c[w]) / 300.0;
            let leaking = s.incidents.iter().find(|i| i.wheel == Some(w) && i.start_s <= t);
            match leaking.map(|i| i.kind) {
                Some(IncidentKind::SlowLeak) => self.lost_kpa[w] += 1.5 / 60.0,
                Some(IncidentKind::Puncture) => {
                    self.lost_kpa[w] = (self.lost_kpa[w] + s.cold_kpa / 60.0).min(s.cold_kpa - 50.0)
                }
                _ => {}
            }
        }
        if s.active(IncidentKind::Silent, t).is_some() {
            return;
        }
        // Parked off duty, a unit reports once a minute.
        if !on_duty && !t.is_multiple_of(60) {
            return;
        }
        // The unit's clock.
        let true_ms = t0_ms as f64 + t as f64 * 1000.0;
        let unit_ms = (true_ms + s.clock_offset_ms + t as f64 * 1000.0 * s.clock_drift_ppm * 1e-6).max(0.0) as u64;
        let at = |k, v: f64| Reading { kind: k, time_ms: unit_ms, value: v };
        if self.gps_dropout_s > 0 {
            self.gps_dropout_s -= 1;
        } else if self.rng.chance(0.002) {
            self.gps_dropout_s = self.rng.range(5.0, 30.0) as u64;
        } else {
            let noisy = offset(self.pos, self.rng.normal().abs() * 3.0, self.rng.range(0.0, 360.0));
            out.push(at(kind::LATITUDE, noisy.0));
            out.push(at(kind::LONGITUDE, noisy.1));
            out.push(at(kind::HEADING, (self.heading * 10.0).round() / 10.0 % 360.0));
        }
        out.push(at(kind::SPEED, (self.speed_kmh * 10.0).round() / 10.0));
        if t.is_multiple_of(10) {
            out.push(at(kind::FUEL_ABSOLUTE_LEVEL, (self.fuel_l * 10.0).round() / 10.0));
            out.push(at(kind::FUEL_RELATIVE_LEVEL, (self.fuel_l / s.tank_l * 1000.0).round() / 10.0));
            out.push(at(kind::ODOMETER, (self.odometer_km * 10.0).round() / 10.0));
        }
        if t.is_multiple_of(30) {
            for (w, wheel) in WHEELS.iter().enumerate() {
                // Gauge pressure: the gas law holds for the absolute pressure.
                let abs = (s.cold_kpa + 101.325) * (self.tire_c[w] + 273.15) / (s.ambient_c + 273.15);
                let hot = (abs - 101.325 - self.lost_kpa[w]).max(0.0);
                if let (Some(p), Some(c)) = (kind::tire_pressure(*wheel), kind::tire_temperature(*wheel)) {
                    out.push(at(p, (hot * 10.0).round() / 10.0));
                    out.push(at(c, (self.tire_c[w] * 10.0).round() / 10.0));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(seed: u64, index: usize, secs: u64) -> (Vehicle, Vec<Reading>) {
        let mut v = Vehicle::new(VehicleSpec::generate(seed, index, 1000, secs, Profile::Steady), seed);
        let mut out = Vec::new();
        for _ in 0..secs {
            v.step(1_795_700_000_000, &mut out);
        }
        (v, out)
    }

    #[test]
    fn the_same_seed_drives_the_same_way() {
        let (a, ra) = drive(7, 3, 600);
        let (_, rb) = drive(7, 3, 600);
        assert_eq!(ra, rb);
        let (_, rc) = drive(8, 3, 600);
        assert_ne!(ra, rc);
        assert!(a.odometer_km > 1.0, "drove {} km", a.odometer_km);
    }

    #[test]
    fn every_reading_is_in_range_for_its_signal() {
        for i in 0..50 {
            let (_, out) = drive(1, i, 900);
            for r in &out {
                let spec = fleetline_wire::signals::spec(r.kind).unwrap();
                assert!(r.value >= spec.min && r.value <= spec.max, "{r:?}");
            }
        }
    }

    #[test]
    fn profiles_shape_activity() {
        let day0 = 1_795_651_200_000; // 2026-11-26T00:00Z
        let spec = VehicleSpec::generate(1, 2, 1000, 86_400, Profile::Daily);
        let on: usize = (0..24).filter(|h| spec.on_duty(h * 3600, day0)).count();
        assert_eq!(on, 9, "a nine-hour shift");
        // Depots in other time zones work other UTC hours.
        let other = (0..1000)
            .map(|i| VehicleSpec::generate(1, i, 1000, 86_400, Profile::Daily))
            .find(|s| s.tz_offset_h != spec.tz_offset_h || s.shift_start_h != spec.shift_start_h)
            .unwrap();
        assert!((0..24).any(|h| spec.on_duty(h * 3600, day0) != other.on_duty(h * 3600, day0)));
        let reserve = VehicleSpec::generate(1, 2, 1000, 1000, Profile::Surge);
        assert!(
            reserve.reserve && !reserve.on_duty(100, day0) && reserve.on_duty(500, day0) && !reserve.on_duty(800, day0)
        );
        // Off duty, a unit reports once a minute.
        let mut v = Vehicle::new(VehicleSpec::generate(1, 2, 1000, 600, Profile::Surge), 1);
        let mut out = Vec::new();
        // Off duty until 40 % of the 600 s run: reports at 0, 60, 120 and 180 s only.
        for _ in 0..240 {
            v.step(day0, &mut out);
        }
        let speeds = out.iter().filter(|r| r.kind == kind::SPEED).count();
        assert_eq!(speeds, 4);
    }

    #[test]
    fn incidents_show_in_the_readings() {
        // Find vehicles with a puncture and with a theft among many.
        let mut seen = (false, false);
        for i in 0..2000 {
            let spec = VehicleSpec::generate(5, i, 2000, 600, Profile::Steady);
            if let Some(p) = spec.incidents.iter().find(|x| x.kind == IncidentKind::Puncture) {
                let wheel = WHEELS[p.wheel.unwrap()];
                let (_, out) = drive(5, i, 600);
                let k = kind::tire_pressure(wheel).unwrap();
                let last = out.iter().rev().find(|r| r.kind == k).unwrap();
                assert!(last.value < 200.0, "punctured tire at {} kPa", last.value);
                seen.0 = true;
            }
            if let Some(th) = spec.incidents.iter().find(|x| x.kind == IncidentKind::FuelTheft) {
                let (_, out) = drive(5, i, th.end_s + 11);
                let fuel: Vec<f64> =
                    out.iter().filter(|r| r.kind == kind::FUEL_ABSOLUTE_LEVEL).map(|r| r.value).collect();
                let drop = fuel.windows(2).map(|w| w[0] - w[1]).fold(0.0, f64::max);
                assert!(drop > 1.0, "theft drains the tank (largest 10 s drop {drop} l)");
                seen.1 = true;
            }
        }
        assert!(seen.0 && seen.1);
    }
}
