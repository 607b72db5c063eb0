//! Pure: the models the cloud knows, their features in input order, and how
//! a feature row is made from a vehicle's closed windows. No I/O, no clock.
//!
//! The features are those of `models/train.py`: computing them here the same
//! way (in `f64`, rounded to `f32` at the end) is what makes a model's
//! held-out metrics hold in the stream.

use serde::{Deserialize, Serialize};

/// One model the cloud can run: its name is the registry's model name and
/// fixes the features it takes and what its output means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Probability that a tire of the vehicle has a leak or puncture
    /// developing (a classifier: probabilities `[n, 2]`, column 1).
    TireRisk,
    /// Litres the window should use from how it was driven (a regressor).
    Fuel,
    /// The next window's average speed in km/h (a regressor).
    SpeedNext,
}

/// Every kind, in a fixed order.
pub const KINDS: [ModelKind; 3] = [ModelKind::TireRisk, ModelKind::Fuel, ModelKind::SpeedNext];

/// A feature: its name and unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Name, as in the model's card.
    pub name: &'static str,
    /// Unit.
    pub unit: &'static str,
}

const fn f(name: &'static str, unit: &'static str) -> Feature {
    Feature { name, unit }
}

const TIRE: [Feature; 6] = [
    f("tire_pressure_min_kpa", "kPa"),
    f("tire_pressure_mean_kpa", "kPa"),
    f("tire_pressure_spread_kpa", "kPa"),
    f("leak_rate_kpa_h", "kPa/h"),
    f("leak_rate_prev_kpa_h", "kPa/h"),
    f("pressure_min_change_kpa", "kPa"),
];
const FUEL: [Feature; 3] = [f("distance_km", "km"), f("avg_speed_kmh", "km/h"), f("max_speed_kmh", "km/h")];
const SPEED: [Feature; 5] = [
    f("avg_speed_kmh", "km/h"),
    f("avg_speed_prev_kmh", "km/h"),
    f("avg_speed_prev2_kmh", "km/h"),
    f("max_speed_kmh", "km/h"),
    f("distance_km", "km"),
];

/// What a model's graph declares: per input and output, whether it is
/// float32 and its shape (`None` for a symbolic or unknown dimension), and
/// which output is the first float32 one (the score).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// Inputs: (float32?, shape).
    pub inputs: Vec<(bool, Vec<Option<usize>>)>,
    /// Outputs: (float32?, shape).
    pub outputs: Vec<(bool, Vec<Option<usize>>)>,
    /// Index of the first float32 output, `usize::MAX` if none.
    pub score_output: usize,
}

impl Default for Signature {
    fn default() -> Self {
        Self { inputs: Vec::new(), outputs: Vec::new(), score_output: usize::MAX }
    }
}

impl ModelKind {
    /// The registry's name of the model.
    pub fn name(self) -> &'static str {
        match self {
            Self::TireRisk => "tire_risk",
            Self::Fuel => "fuel",
            Self::SpeedNext => "speed_next",
        }
    }

    /// The kind a registry name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        KINDS.into_iter().find(|k| k.name() == name)
    }

    /// Features in input order.
    pub fn features(self) -> &'static [Feature] {
        match self {
            Self::TireRisk => &TIRE,
            Self::Fuel => &FUEL,
            Self::SpeedNext => &SPEED,
        }
    }

    /// Whether the model is a classifier whose score is a probability.
    pub fn is_classifier(self) -> bool {
        matches!(self, Self::TireRisk)
    }

    /// Column of the score output that holds the score.
    pub fn score_column(self) -> usize {
        if self.is_classifier() { 1 } else { 0 }
    }

    /// Unit of the score.
    pub fn score_unit(self) -> &'static str {
        match self {
            Self::TireRisk => "probability",
            Self::Fuel => "l",
            Self::SpeedNext => "km/h",
        }
    }

    /// How many consecutive windows (the newest last) a feature row needs.
    pub fn history(self) -> usize {
        match self {
            Self::TireRisk => 2,
            Self::Fuel => 1,
            Self::SpeedNext => 3,
        }
    }

    /// Checks a graph's declared signature against this kind's spec: one
    /// float32 input of shape `[n, k]` (`k` the feature count), and a
    /// float32 output of shape `[n, 2]` for a classifier or `[n, 1]` for a
    /// regressor. Says what is wrong otherwise.
    pub fn check(self, sig: &Signature) -> Result<(), String> {
        let k = self.features().len();
        match sig.inputs.as_slice() {
            [(true, shape)] if shape.len() == 2 && shape[1] == Some(k) => {}
            [(true, shape)] => {
                return Err(format!("input shape {} is not [n, {k}] ({} features)", show(shape), self.name()));
            }
            [(false, _)] => return Err("input is not float32".into()),
            other => return Err(format!("{} inputs, the model takes one", other.len())),
        }
        let want = if self.is_classifier() { 2 } else { 1 };
        let Some((_, shape)) = sig.outputs.get(sig.score_output) else {
            return Err("no float32 output".into());
        };
        let cols = match shape.as_slice() {
            [_, c] => *c,
            [_] if want == 1 => Some(1),
            _ => return Err(format!("score output shape {} is not [n, {want}]", show(shape))),
        };
        match cols {
            Some(c) if c == want => Ok(()),
            // A width the graph does not declare is checked on the first run.
            None => Ok(()),
            Some(_) => Err(format!("score output shape {} is not [n, {want}]", show(shape))),
        }
    }
}

fn show(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string())).collect();
    format!("[{}]", dims.join(", "))
}

/// A vehicle's closed window as the features see it (a row of the
/// `aggregates` dataset). Missing measurements are `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Window start, Unix ms.
    pub start_ms: i64,
    /// Distance driven, m (`None` counts as 0, as in training).
    pub distance_m: Option<f64>,
    /// Mean speed, km/h.
    pub avg_speed_kmh: Option<f64>,
    /// Highest speed, km/h.
    pub max_speed_kmh: Option<f64>,
    /// Lowest tire pressure, kPa.
    pub tire_pressure_min_kpa: Option<f64>,
    /// Mean tire pressure, kPa.
    pub tire_pressure_mean_kpa: Option<f64>,
    /// Highest tire pressure, kPa.
    pub tire_pressure_max_kpa: Option<f64>,
    /// Fastest temperature-compensated pressure loss of any tire, kPa/h.
    pub leak_rate_kpa_h: Option<f64>,
}

/// The feature row of `kind` for the newest window of `history` (oldest
/// first), or `None` when the windows the model needs are not consecutive
/// (`step_ms` apart), are too few, or lack a measurement.
pub fn features(kind: ModelKind, history: &[Window], step_ms: i64) -> Option<Vec<f32>> {
    let need = kind.history();
    if history.len() < need {
        return None;
    }
    let w = &history[history.len() - need..];
    if w.windows(2).any(|p| p[1].start_ms - p[0].start_ms != step_ms) {
        return None;
    }
    let row: Vec<f64> = match kind {
        ModelKind::TireRisk => {
            let (prev, cur) = (&w[0], &w[1]);
            let pmin = cur.tire_pressure_min_kpa?;
            vec![
                pmin,
                cur.tire_pressure_mean_kpa?,
                cur.tire_pressure_max_kpa? - pmin,
                cur.leak_rate_kpa_h?,
                prev.leak_rate_kpa_h?,
                pmin - prev.tire_pressure_min_kpa?,
            ]
        }
        ModelKind::Fuel => {
            let cur = &w[0];
            vec![cur.distance_m.unwrap_or(0.0) / 1000.0, cur.avg_speed_kmh?, cur.max_speed_kmh?]
        }
        ModelKind::SpeedNext => {
            let (a, b, c) = (&w[0], &w[1], &w[2]);
            vec![
                c.avg_speed_kmh?,
                b.avg_speed_kmh?,
                a.avg_speed_kmh?,
                c.max_speed_kmh?,
                c.distance_m.unwrap_or(0.0) / 1000.0,
            ]
        }
    };
    if row.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(row.into_iter().map(|v| v as f32).collect())
}

/// A stable 64-bit hash of a feature row (FNV-1a over the values' bits), so
/// a stored prediction names the exact inputs it was made from.
pub fn feature_hash(row: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in row {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(start_ms: i64, avg: f64, pmin: f64, leak: f64) -> Window {
        Window {
            start_ms,
            distance_m: Some(1500.0),
            avg_speed_kmh: Some(avg),
            max_speed_kmh: Some(avg + 10.0),
            tire_pressure_min_kpa: Some(pmin),
            tire_pressure_mean_kpa: Some(pmin + 5.0),
            tire_pressure_max_kpa: Some(pmin + 8.0),
            leak_rate_kpa_h: Some(leak),
        }
    }

    #[test]
    fn tire_features_use_the_window_before() {
        let h = [w(0, 50.0, 230.0, 1.0), w(60_000, 55.0, 228.0, 4.0)];
        let row = features(ModelKind::TireRisk, &h, 60_000).expect("row");
        assert_eq!(row, vec![228.0, 233.0, 8.0, 4.0, 1.0, -2.0]);
    }

    #[test]
    fn a_gap_or_a_missing_value_gives_no_row() {
        let h = [w(0, 50.0, 230.0, 1.0), w(120_000, 55.0, 228.0, 4.0)];
        assert_eq!(features(ModelKind::TireRisk, &h, 60_000), None);
        assert_eq!(features(ModelKind::TireRisk, &h[1..], 60_000), None);
        let mut gap = h;
        gap[1].start_ms = 60_000;
        gap[0].leak_rate_kpa_h = None;
        assert_eq!(features(ModelKind::TireRisk, &gap, 60_000), None);
        assert!(features(ModelKind::Fuel, &gap[1..], 60_000).is_some());
    }

    #[test]
    fn speed_features_take_three_windows_newest_first() {
        let h = [w(0, 30.0, 230.0, 0.0), w(60_000, 40.0, 230.0, 0.0), w(120_000, 50.0, 230.0, 0.0)];
        let row = features(ModelKind::SpeedNext, &h, 60_000).expect("row");
        assert_eq!(row, vec![50.0, 40.0, 30.0, 60.0, 1.5]);
    }

    #[test]
    fn missing_distance_counts_as_zero_like_training() {
        let mut one = w(0, 0.0, 230.0, 0.0);
        one.distance_m = None;
        assert_eq!(features(ModelKind::Fuel, &[one], 60_000), Some(vec![0.0, 0.0, 10.0]));
    }

    #[test]
    fn signature_check_names_the_mismatch() {
        let sig = |k: usize, cols: usize| Signature {
            inputs: vec![(true, vec![None, Some(k)])],
            outputs: vec![(false, vec![None]), (true, vec![None, Some(cols)])],
            score_output: 1,
        };
        assert_eq!(ModelKind::TireRisk.check(&sig(6, 2)), Ok(()));
        assert!(ModelKind::TireRisk.check(&sig(5, 2)).unwrap_err().contains("[n, 6]"));
        assert!(ModelKind::Fuel.check(&sig(3, 2)).is_err());
        assert_eq!(ModelKind::Fuel.check(&sig(3, 1)), Ok(()));
        let mut ints = sig(3, 1);
        ints.inputs[0].0 = false;
        assert_eq!(ModelKind::Fuel.check(&ints), Err("input is not float32".into()));
    }

    #[test]
    fn feature_hash_tells_rows_apart() {
        assert_ne!(feature_hash(&[1.0, 2.0]), feature_hash(&[2.0, 1.0]));
        assert_eq!(feature_hash(&[1.0, 2.0]), feature_hash(&[1.0, 2.0]));
    }
}
