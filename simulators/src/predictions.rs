//! The models' side of a run's report: the `predictions` dataset read back
//! and judged against the simulator's ground truth, per model and variant,
//! beside the rule-based detectors; and the checks that nothing was lost
//! (every window a model could score was scored once by a live variant),
//! every prediction is labelled with a version its variant ran, and each
//! split matched its weights over vehicles.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
use fleetline_cloud::jobs::rescore::MinuteRow;
use fleetline_cloud::lake::schema::col as c;
use fleetline_inference::{KINDS, ModelKind, Window};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use crate::report::{Detected, Injected, MATCH_SLACK_MS, parquet_files};

/// One row of `predictions`.
#[derive(Clone, Debug, PartialEq)]
pub struct PredRow {
    /// Device.
    pub device: String,
    /// Window start, Unix ms.
    pub window_start: i64,
    /// Window end.
    pub window_end: i64,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// Variant label or `shadow`.
    pub variant: String,
    /// Score.
    pub score: f64,
}

fn batches(dir: &Path) -> anyhow::Result<Vec<arrow_array::RecordBatch>> {
    let mut files = Vec::new();
    parquet_files(dir, &mut files)?;
    let mut out = Vec::new();
    for f in &files {
        for b in ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f)?)?.build()? {
            out.push(b?);
        }
    }
    Ok(out)
}

fn column<'a>(b: &'a arrow_array::RecordBatch, name: &str) -> anyhow::Result<&'a arrow_array::ArrayRef> {
    b.column_by_name(name).ok_or_else(|| anyhow::anyhow!("no column {name}"))
}

/// Every row of a `predictions` dataset directory.
pub fn read_predictions(dir: &Path) -> anyhow::Result<Vec<PredRow>> {
    let mut out = Vec::new();
    for b in batches(dir)? {
        let dev = column(&b, c::DEVICE_ID)?.as_string::<i32>().clone();
        let start = column(&b, c::WINDOW_START)?.as_primitive::<TimestampMillisecondType>().clone();
        let end = column(&b, c::WINDOW_END)?.as_primitive::<TimestampMillisecondType>().clone();
        let model = column(&b, c::MODEL)?.as_string::<i32>().clone();
        let version = column(&b, c::VERSION)?.as_primitive::<Int64Type>().clone();
        let variant = column(&b, c::VARIANT)?.as_string::<i32>().clone();
        let score = column(&b, c::SCORE)?.as_primitive::<Float64Type>().clone();
        for i in 0..b.num_rows() {
            out.push(PredRow {
                device: dev.value(i).to_string(),
                window_start: start.value(i),
                window_end: end.value(i),
                model: model.value(i).to_string(),
                version: version.value(i) as u32,
                variant: variant.value(i).to_string(),
                score: score.value(i),
            });
        }
    }
    Ok(out)
}

/// Every one-minute window of an `aggregates` dataset directory.
pub fn read_minutes(dir: &Path) -> anyhow::Result<Vec<MinuteRow>> {
    let mut out = Vec::new();
    for b in batches(dir)? {
        out.extend(fleetline_cloud::jobs::rescore::minute_rows(&b).map_err(anyhow::Error::msg)?);
    }
    Ok(out)
}

/// How early the tire-risk model fired against the rule-based `slow_leak`
/// detector, over the run's matured slow leaks (simulated seconds; positive:
/// the model first).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LeadTime {
    /// Slow leaks that matured within the run.
    pub incidents: u64,
    /// Found by both; the model no later than the rule.
    pub model_first: u64,
    /// Found by both; the rule first.
    pub rule_first: u64,
    /// Found by the model only.
    pub model_only: u64,
    /// Found by the rule only.
    pub rule_only: u64,
    /// Found by neither.
    pub neither: u64,
    /// Median lead where both found it, s.
    pub median_lead_s: Option<f64>,
    /// Quartiles of the lead, s.
    pub lead_p25_s: Option<f64>,
    /// Third quartile, s.
    pub lead_p75_s: Option<f64>,
}

/// One model's variant (or its shadow) judged against the ground truth.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VariantQuality {
    /// Model.
    pub model: String,
    /// Variant label or `shadow`.
    pub variant: String,
    /// Versions its predictions name.
    pub versions: Vec<u32>,
    /// Predictions.
    pub predictions: u64,
    /// Vehicles it scored.
    pub vehicles: u64,
    /// Tire risk: area under the ROC curve against "a tire incident is active
    /// in the window".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auc: Option<f64>,
    /// Tire risk: windows with an incident active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positives: Option<u64>,
    /// Tire risk: precision at the alert threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    /// Tire risk: recall at the alert threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
    /// Tire risk: lead over the rule-based `slow_leak` detector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lead_over_slow_leak: Option<LeadTime>,
    /// Regressors: mean absolute error (fuel: against the window's fuel used,
    /// windows without a fuel incident; speed_next: the next window's mean speed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mae: Option<f64>,
    /// Regressors: rows with a truth to compare.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared: Option<u64>,
}

/// A split's shares over vehicles against its weights.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SplitCheck {
    /// Model.
    pub model: String,
    /// Which deployment (its place in the run's plan).
    pub phase: String,
    /// Per variant: (weight share, vehicle share).
    pub shares: BTreeMap<String, (f64, f64)>,
    /// Vehicles scored under it.
    pub vehicles: u64,
    /// Largest difference, percentage points.
    pub worst_pp: f64,
    /// What the check allows: 3 points, or three standard deviations of a
    /// share drawn over this many vehicles when that is more (a small fleet
    /// cannot show a split to 3 points).
    pub allowed_pp: f64,
}

/// The models' part of a run's report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModelsReport {
    /// Deployments made during the run, in order, with when (s into the run).
    pub deployments: Vec<String>,
    /// Per model: windows whose features a live variant could score.
    pub expected: BTreeMap<String, u64>,
    /// Per model: live predictions stored.
    pub live: BTreeMap<String, u64>,
    /// Windows a live variant should have scored and none did.
    pub missing: u64,
    /// (model, window, vehicle) scored by live variants more than once.
    pub duplicated: u64,
    /// Predictions whose (variant, version) no deployment of the run had.
    pub mislabelled: u64,
    /// Per model and variant.
    pub variants: Vec<VariantQuality>,
    /// Splits against their weights.
    pub splits: Vec<SplitCheck>,
}

impl ModelsReport {
    /// Nothing missing, duplicated or mislabelled, and every split within
    /// what its fleet's size allows of its weights.
    pub fn ok(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.mislabelled == 0
            && self.splits.iter().all(|s| s.worst_pp <= s.allowed_pp)
    }
}

/// Area under the ROC curve (ties share their rank).
pub fn auc(scores: &[(f64, bool)]) -> Option<f64> {
    let pos = scores.iter().filter(|s| s.1).count();
    let neg = scores.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut v = scores.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1].0 == v[i].0 {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += rank * v[i..=j].iter().filter(|s| s.1).count() as f64;
        i = j + 1;
    }
    Some((rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos as f64 * neg as f64))
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * q).round() as usize])
}

/// A deployment as the run made it: model, (label → version, weight), shadow.
#[derive(Clone, Debug)]
pub struct PlannedDeployment {
    /// Model.
    pub model: String,
    /// Live variants: label, version, weight.
    pub variants: Vec<(String, u32, u32)>,
    /// Shadow version.
    pub shadow: Option<u32>,
    /// From this window end on (Unix ms of the fleet's clock; `i64::MIN`: from the start).
    pub from_ms: i64,
    /// Said in words for the report.
    pub said: String,
}

/// Judges `predictions` against the ground truth. `deployments`: what the run
/// deployed, in order; `threshold`: the tire-risk alert threshold;
/// `settle_ms`: how long after a swap predictions may still come from the
/// deployment before (commits in flight), left out of the split check.
pub fn judge(
    predictions: &[PredRow],
    minutes: &[MinuteRow],
    injected: &[Injected],
    detected: &[Detected],
    deployments: &[PlannedDeployment],
    threshold: f64,
    settle_ms: i64,
) -> ModelsReport {
    let mut r =
        ModelsReport { deployments: deployments.iter().map(|d| d.said.clone()).collect(), ..Default::default() };
    // Expected: windows whose features the shard could compute.
    let mut by_device: HashMap<&str, Vec<&MinuteRow>> = HashMap::new();
    for m in minutes {
        by_device.entry(&m.device).or_default().push(m);
    }
    let mut expected: BTreeSet<(String, String, i64)> = BTreeSet::new();
    for (dev, ws) in by_device.iter_mut() {
        ws.sort_by_key(|w| w.window.start_ms);
        ws.dedup_by_key(|w| w.window.start_ms);
        for i in 0..ws.len() {
            let history: Vec<Window> = ws[i.saturating_sub(2)..=i].iter().map(|w| w.window).collect();
            for k in KINDS {
                if fleetline_inference::features(k, &history, 60_000).is_some() {
                    expected.insert((k.name().to_string(), dev.to_string(), ws[i].window.start_ms));
                }
            }
        }
    }
    let mut live_seen: HashMap<(String, String, i64), u64> = HashMap::new();
    for p in predictions.iter().filter(|p| p.variant != "shadow") {
        *live_seen.entry((p.model.clone(), p.device.clone(), p.window_start)).or_default() += 1;
    }
    for k in KINDS {
        let name = k.name().to_string();
        r.expected.insert(name.clone(), expected.iter().filter(|e| e.0 == name).count() as u64);
        r.live.insert(name.clone(), live_seen.iter().filter(|(e, _)| e.0 == name).map(|(_, n)| n).sum());
    }
    r.missing = expected.iter().filter(|e| !live_seen.contains_key(*e)).count() as u64;
    r.duplicated = live_seen.values().filter(|n| **n > 1).count() as u64;
    // Labels: every (model, variant, version) must be one a deployment ran.
    let allowed: BTreeSet<(String, String, u32)> = deployments
        .iter()
        .flat_map(|d| {
            d.variants
                .iter()
                .map(|(l, v, _)| (d.model.clone(), l.clone(), *v))
                .chain(d.shadow.map(|s| (d.model.clone(), "shadow".to_string(), s)))
                .collect::<Vec<_>>()
        })
        .collect();
    r.mislabelled =
        predictions.iter().filter(|p| !allowed.contains(&(p.model.clone(), p.variant.clone(), p.version))).count()
            as u64;

    // Truths.
    let tire_kinds = ["slow_leak", "puncture"];
    let fuel_kinds = ["fuel_theft", "refuel"];
    let active = |dev: &str, kinds: &[&str], start: i64, end: i64| {
        injected.iter().any(|i| i.device == dev && kinds.contains(&i.kind) && i.start_ms < end && start < i.end_ms)
    };
    let minute: HashMap<(&str, i64), &MinuteRow> =
        minutes.iter().map(|m| ((m.device.as_str(), m.window.start_ms), m)).collect();

    let mut groups: BTreeMap<(String, String), Vec<&PredRow>> = BTreeMap::new();
    for p in predictions {
        groups.entry((p.model.clone(), p.variant.clone())).or_default().push(p);
    }
    for ((model, variant), ps) in &groups {
        let mut q = VariantQuality {
            model: model.clone(),
            variant: variant.clone(),
            versions: ps.iter().map(|p| p.version).collect::<BTreeSet<_>>().into_iter().collect(),
            predictions: ps.len() as u64,
            vehicles: ps.iter().map(|p| p.device.as_str()).collect::<BTreeSet<_>>().len() as u64,
            ..Default::default()
        };
        match ModelKind::from_name(model) {
            Some(ModelKind::TireRisk) => {
                let labelled: Vec<(f64, bool)> = ps
                    .iter()
                    .map(|p| (p.score, active(&p.device, &tire_kinds, p.window_start, p.window_end)))
                    .collect();
                q.auc = auc(&labelled);
                let pos = labelled.iter().filter(|l| l.1).count();
                let flagged = labelled.iter().filter(|l| l.0 >= threshold).count();
                let hits = labelled.iter().filter(|l| l.1 && l.0 >= threshold).count();
                q.positives = Some(pos as u64);
                q.precision = (flagged > 0).then(|| hits as f64 / flagged as f64);
                q.recall = (pos > 0).then(|| hits as f64 / pos as f64);
                q.lead_over_slow_leak = Some(lead_time(ps, injected, detected, threshold));
            }
            Some(ModelKind::Fuel) => {
                let errs: Vec<f64> = ps
                    .iter()
                    .filter(|p| !active(&p.device, &fuel_kinds, p.window_start, p.window_end))
                    .filter_map(|p| {
                        minute.get(&(p.device.as_str(), p.window_start))?.fuel_used_l.map(|f| (p.score - f).abs())
                    })
                    .collect();
                q.compared = Some(errs.len() as u64);
                q.mae = (!errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64);
            }
            Some(ModelKind::SpeedNext) => {
                let errs: Vec<f64> = ps
                    .iter()
                    .filter_map(|p| {
                        let next = minute.get(&(p.device.as_str(), p.window_start + 60_000))?;
                        Some((p.score - next.window.avg_speed_kmh?).abs())
                    })
                    .collect();
                q.compared = Some(errs.len() as u64);
                q.mae = (!errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64);
            }
            None => {}
        }
        r.variants.push(q);
    }

    // Splits: per deployment with more than one live variant, the vehicles of
    // each variant among the predictions made under it.
    for (i, d) in deployments.iter().enumerate() {
        if d.variants.len() < 2 {
            continue;
        }
        let until = deployments[i + 1..].iter().find(|n| n.model == d.model).map_or(i64::MAX, |n| n.from_ms);
        let from = d.from_ms.saturating_add(settle_ms);
        let mut vehicles: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for p in predictions.iter().filter(|p| p.model == d.model && p.variant != "shadow") {
            if p.window_end >= from && p.window_end < until.saturating_sub(settle_ms) {
                vehicles.entry(p.variant.as_str()).or_default().insert(p.device.as_str());
            }
        }
        let total_vehicles: usize = vehicles.values().map(BTreeSet::len).sum();
        let total_weight: u32 = d.variants.iter().map(|v| v.2).sum();
        let mut check = SplitCheck {
            model: d.model.clone(),
            phase: d.said.clone(),
            vehicles: total_vehicles as u64,
            allowed_pp: 3.0,
            ..Default::default()
        };
        for (label, _, weight) in &d.variants {
            let want = f64::from(*weight) / f64::from(total_weight.max(1));
            let sigma_pp = (want * (1.0 - want) / total_vehicles.max(1) as f64).sqrt() * 100.0;
            check.allowed_pp = check.allowed_pp.max(3.0 * sigma_pp);
            let got = vehicles.get(label.as_str()).map_or(0, BTreeSet::len) as f64 / total_vehicles.max(1) as f64;
            check.worst_pp = check.worst_pp.max((want - got).abs() * 100.0);
            check.shares.insert(label.clone(), (want, got));
        }
        r.splits.push(check);
    }
    r
}

/// Per matured slow leak: when the rule fired (`detected_ms` of the first
/// `slow_leak` event of that vehicle and wheel within the incident, give or
/// take [`MATCH_SLACK_MS`]) against when the model's risk first reached the
/// threshold (the end of the first such window overlapping the incident).
fn lead_time(ps: &[&PredRow], injected: &[Injected], detected: &[Detected], threshold: f64) -> LeadTime {
    let mut lt = LeadTime::default();
    let mut leads = Vec::new();
    for i in injected.iter().filter(|i| i.kind == "slow_leak" && i.matures) {
        lt.incidents += 1;
        let (from, to) = (i.start_ms - MATCH_SLACK_MS, i.end_ms.max(i.start_ms + 1000) + MATCH_SLACK_MS);
        let rule = detected
            .iter()
            .filter(|d| d.kind == "slow_leak" && d.device == i.device && (i.wheel.is_none() || d.wheel == i.wheel))
            .filter(|d| d.ts_ms >= from && d.ts_ms <= to)
            .map(|d| d.detected_ms)
            .min();
        let model = ps
            .iter()
            .filter(|p| {
                p.device == i.device && p.score >= threshold && p.window_end > i.start_ms && p.window_start <= to
            })
            .map(|p| p.window_end)
            .min();
        match (model, rule) {
            (Some(m), Some(r)) => {
                leads.push((r - m) as f64 / 1000.0);
                if m <= r {
                    lt.model_first += 1;
                } else {
                    lt.rule_first += 1;
                }
            }
            (Some(_), None) => lt.model_only += 1,
            (None, Some(_)) => lt.rule_only += 1,
            (None, None) => lt.neither += 1,
        }
    }
    leads.sort_by(f64::total_cmp);
    lt.median_lead_s = quantile(&leads, 0.5);
    lt.lead_p25_s = quantile(&leads, 0.25);
    lt.lead_p75_s = quantile(&leads, 0.75);
    lt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ties_as_half() {
        assert_eq!(auc(&[(0.1, false), (0.9, true)]), Some(1.0));
        assert_eq!(auc(&[(0.9, false), (0.1, true)]), Some(0.0));
        assert_eq!(auc(&[(0.5, false), (0.5, true)]), Some(0.5));
        assert_eq!(auc(&[(0.5, true)]), None);
    }

    fn minute(dev: &str, start: i64) -> MinuteRow {
        MinuteRow {
            fleet: "demo".into(),
            device: dev.into(),
            window: Window {
                start_ms: start,
                distance_m: Some(800.0),
                avg_speed_kmh: Some(50.0),
                max_speed_kmh: Some(60.0),
                tire_pressure_min_kpa: Some(880.0),
                tire_pressure_mean_kpa: Some(885.0),
                tire_pressure_max_kpa: Some(889.0),
                leak_rate_kpa_h: Some(0.2),
            },
            fuel_used_l: Some(0.25),
        }
    }

    fn pred(dev: &str, model: &str, start: i64, variant: &str, version: u32, score: f64) -> PredRow {
        PredRow {
            device: dev.into(),
            window_start: start,
            window_end: start + 60_000,
            model: model.into(),
            version,
            variant: variant.into(),
            score,
        }
    }

    #[test]
    fn a_window_left_unscored_or_scored_twice_or_by_an_unknown_version_is_counted() {
        let minutes: Vec<MinuteRow> = (0..3).map(|i| minute("v-1", i * 60_000)).collect();
        let deployments = vec![PlannedDeployment {
            model: "fuel".into(),
            variants: vec![("A".into(), 1, 1)],
            shadow: None,
            from_ms: i64::MIN,
            said: "fuel A=v1".into(),
        }];
        let mut preds = vec![pred("v-1", "fuel", 0, "A", 1, 0.2), pred("v-1", "fuel", 60_000, "A", 1, 0.2)];
        let r = judge(&preds, &minutes, &[], &[], &deployments, 0.5, 0);
        assert_eq!(r.expected["fuel"], 3);
        assert_eq!(r.expected["tire_risk"], 2);
        assert_eq!(r.expected["speed_next"], 1);
        // fuel: one of three missing; tire_risk and speed_next: none scored at all.
        assert_eq!(r.missing, 1 + 2 + 1);
        preds.push(pred("v-1", "fuel", 60_000, "A", 1, 0.2));
        preds.push(pred("v-1", "fuel", 120_000, "B", 7, 0.2));
        let r = judge(&preds, &minutes, &[], &[], &deployments, 0.5, 0);
        assert_eq!((r.duplicated, r.mislabelled), (1, 1));
        let fuel = r.variants.iter().find(|v| v.model == "fuel" && v.variant == "A").unwrap();
        assert!((fuel.mae.unwrap() - 0.05).abs() < 1e-9);
    }

    #[test]
    fn lead_time_is_the_rule_minus_the_model() {
        let incident = Injected {
            device: "v-1".into(),
            kind: "slow_leak",
            wheel: Some("row1.left".into()),
            start_ms: 600_000,
            end_ms: 3_600_000,
            matures: true,
        };
        let rule = Detected {
            device: "v-1".into(),
            kind: "slow_leak".into(),
            ts_ms: 700_000,
            detected_ms: 1_500_000,
            wheel: Some("row1.left".into()),
        };
        let early = pred("v-1", "tire_risk", 840_000, "A", 1, 0.9);
        let before = pred("v-1", "tire_risk", 0, "A", 1, 0.9);
        let lt = lead_time(&[&before, &early], &[incident], &[rule], 0.5);
        assert_eq!((lt.incidents, lt.model_first), (1, 1));
        assert_eq!(lt.median_lead_s, Some(600.0), "rule at 1500 s, model at 900 s");
    }
}
