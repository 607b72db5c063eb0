//! What is deployed of a model: its variants (A, B, C … with weights) and a
//! shadow version, and which variant scores which vehicle.
//!
//! A vehicle's variant is a function of (model, fleet, device) and the
//! weights alone: stable across restarts, nodes and shard moves, and the
//! same for every window of the vehicle until the weights change. Hashing
//! the model's name in keeps the splits of different models independent.
//!
//! Pure: no I/O, no clock.

use fleetline_wire::shard::fnv1a64;
use serde::{Deserialize, Serialize};

/// Most variants one model may have live at once.
pub const MAX_VARIANTS: usize = 8;

/// The shadow's label in the `predictions` dataset.
pub const SHADOW: &str = "shadow";

/// One live variant of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// Its label (`A`, `B`, `C`, …): letters and digits, at most 16.
    pub label: String,
    /// The registered version it runs.
    pub version: u32,
    /// Its share of vehicles, relative to the other variants' weights.
    pub weight: u32,
}

/// A model's deployment: the variants that score (and alert), and a shadow
/// version that scores every vehicle beside them, stored, never alerted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Live variants.
    pub variants: Vec<Variant>,
    /// Version scored in the shadow of the live ones.
    #[serde(default)]
    pub shadow: Option<u32>,
    /// Score at or above which a classifier's prediction raises an event and
    /// an alert (unset: the card's `alert_threshold`, else 0.5).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// When it was made, Unix ms (set by the registry).
    #[serde(default)]
    pub at_ms: i64,
}

impl Deployment {
    /// One variant `A` running `version` for every vehicle.
    pub fn only(version: u32) -> Self {
        Self {
            variants: vec![Variant { label: "A".into(), version, weight: 100 }],
            shadow: None,
            threshold: None,
            at_ms: 0,
        }
    }

    /// Checks the deployment against the registered versions: at least one
    /// variant, at most [`MAX_VARIANTS`], distinct well-formed labels, weights
    /// that are not all zero, and every version (the shadow's too)
    /// registered; a threshold, if set, within [0, 1].
    pub fn check(&self, registered: &[u32]) -> Result<(), String> {
        if self.variants.is_empty() {
            return Err("a deployment needs at least one variant".into());
        }
        if self.variants.len() > MAX_VARIANTS {
            return Err(format!("{} variants, at most {MAX_VARIANTS}", self.variants.len()));
        }
        let mut labels: Vec<&str> = Vec::new();
        for v in &self.variants {
            let ok = !v.label.is_empty()
                && v.label.len() <= 16
                && v.label.chars().all(|c| c.is_ascii_alphanumeric())
                && v.label != SHADOW;
            if !ok {
                return Err(format!("variant label {:?}: 1 to 16 letters or digits, not {SHADOW:?}", v.label));
            }
            if labels.contains(&v.label.as_str()) {
                return Err(format!("variant {} appears twice", v.label));
            }
            labels.push(&v.label);
            if !registered.contains(&v.version) {
                return Err(format!("variant {} names version {}, which is not registered", v.label, v.version));
            }
        }
        if self.variants.iter().map(|v| u64::from(v.weight)).sum::<u64>() == 0 {
            return Err("the variants' weights are all zero".into());
        }
        if let Some(s) = self.shadow
            && !registered.contains(&s)
        {
            return Err(format!("shadow version {s} is not registered"));
        }
        if let Some(t) = self.threshold
            && !(0.0..=1.0).contains(&t)
        {
            return Err(format!("threshold {t} is not within [0, 1]"));
        }
        Ok(())
    }

    /// Every version the deployment runs, the shadow's included.
    pub fn versions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.variants.iter().map(|v| v.version).chain(self.shadow).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The index of the variant that scores `(fleet, device)` for `model`.
    pub fn variant_for(&self, model: &str, fleet: &str, device: &str) -> usize {
        variant_index(&self.variants, model, fleet, device)
    }
}

/// The variant, among `variants` with their weights, that scores a vehicle:
/// its hash's place in [0, total weight).
pub fn variant_index(variants: &[Variant], model: &str, fleet: &str, device: &str) -> usize {
    let total: u64 = variants.iter().map(|v| u64::from(v.weight)).sum();
    if total == 0 {
        return 0;
    }
    let h = fnv1a64(format!("{model}\u{0}{fleet}\u{0}{device}").as_bytes());
    // Mix the bits: FNV's low bits follow the last bytes (often a counter).
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let h = h ^ (h >> 33);
    let mut point = h % total;
    for (i, v) in variants.iter().enumerate() {
        let w = u64::from(v.weight);
        if point < w {
            return i;
        }
        point -= w;
    }
    variants.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(weights: &[u32]) -> Deployment {
        Deployment {
            variants: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Variant {
                    label: ((b'A' + i as u8) as char).to_string(),
                    version: i as u32 + 1,
                    weight: *w,
                })
                .collect(),
            shadow: None,
            threshold: None,
            at_ms: 0,
        }
    }

    #[test]
    fn a_split_follows_its_weights_over_vehicles_within_three_percent() {
        let d = split(&[50, 30, 20]);
        let mut counts = [0usize; 3];
        let n = 10_000;
        for i in 0..n {
            counts[d.variant_for("tire_risk", "fleet-1", &format!("veh-{i:05}"))] += 1;
        }
        for (c, w) in counts.iter().zip([0.5, 0.3, 0.2]) {
            let share = *c as f64 / n as f64;
            assert!((share - w).abs() < 0.03, "{counts:?}");
        }
    }

    #[test]
    fn a_vehicle_keeps_its_variant_and_models_split_independently() {
        let d = split(&[50, 50]);
        let a = d.variant_for("tire_risk", "f", "v-1");
        assert!((0..10).all(|_| d.variant_for("tire_risk", "f", "v-1") == a));
        let same = (0..1000)
            .filter(|i| {
                let dev = format!("v-{i}");
                d.variant_for("tire_risk", "f", &dev) == d.variant_for("fuel", "f", &dev)
            })
            .count();
        assert!((350..650).contains(&same), "{same} of 1000 vehicles in the same arm of both models");
    }

    #[test]
    fn a_zero_weight_variant_scores_nobody() {
        let d = split(&[100, 0]);
        assert!((0..1000).all(|i| d.variant_for("fuel", "f", &format!("v{i}")) == 0));
    }

    #[test]
    fn bad_deployments_say_why() {
        let registered = [1, 2, 3];
        assert_eq!(split(&[50, 50]).check(&registered), Ok(()));
        assert!(split(&[]).check(&registered).is_err());
        assert!(split(&[0, 0]).check(&registered).unwrap_err().contains("zero"));
        assert!(split(&[1, 1, 1, 1]).check(&registered).unwrap_err().contains("version 4"));
        let mut d = split(&[1]);
        d.shadow = Some(9);
        assert!(d.check(&registered).unwrap_err().contains("shadow"));
        d.shadow = Some(2);
        d.threshold = Some(1.5);
        assert!(d.check(&registered).unwrap_err().contains("threshold"));
        d.threshold = None;
        d.variants[0].label = SHADOW.into();
        assert!(d.check(&registered).is_err());
        d.variants[0].label = "A".into();
        d.variants.push(d.variants[0].clone());
        assert!(d.check(&registered).unwrap_err().contains("twice"));
        assert_eq!(split(&[5, 5]).versions(), vec![1, 2]);
    }
}
