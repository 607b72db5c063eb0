//! Re-scoring: registered versions of a model run over history — the
//! `aggregates` dataset's one-minute windows in a time range — so versions
//! are compared on the same rows before one is deployed. Runs on nodes with
//! the `inference` role (`POST /models/{model}/rescore`), reads the lake and
//! writes nothing.
//!
//! Features come from each vehicle's windows exactly as the shard computes
//! them. The regressors are compared with what happened (the window's fuel
//! used; the next window's mean speed); tire risk, which the lake holds no
//! truth for, by its score distribution, the share at or above the alert
//! threshold, and how often two versions agree on alerting.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, TimestampMillisecondType};
use fleetline_inference::{ModelKind, Plan, Window};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::analytics::MINUTE_MS;
use crate::inference::ModelRegistry;
use crate::lake::partition::partition_start;
use crate::lake::schema::col as c;
use crate::lake::store::Store;

/// Most windows one re-scoring reads (narrow the range for more).
pub const MAX_WINDOWS: usize = 2_000_000;

/// What to re-score.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RescoreRequest {
    /// Versions to compare (registered ones).
    pub versions: Vec<u32>,
    /// Windows starting at or after this, Unix ms (unset: the lake's first).
    #[serde(default)]
    pub from_ms: Option<i64>,
    /// Windows starting before this, Unix ms (unset: the lake's last).
    #[serde(default)]
    pub to_ms: Option<i64>,
    /// Alert threshold for a classifier (unset: 0.5).
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// One version over the rows.
#[derive(Clone, Debug, Serialize)]
pub struct VersionScore {
    /// Version.
    pub version: u32,
    /// Mean score.
    pub mean: f64,
    /// Classifier: share of rows at or above the threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub above_threshold: Option<f64>,
    /// Regressor: mean absolute error against what happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mae: Option<f64>,
    /// Regressor: rows with a truth to compare.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared: Option<u64>,
}

/// Two versions side by side on the same rows.
#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    /// First version.
    pub a: u32,
    /// Second version.
    pub b: u32,
    /// Mean |a − b|.
    pub mean_abs_diff: f64,
    /// Largest |a − b|.
    pub max_abs_diff: f64,
    /// Classifier: share of rows where both alert or both do not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_agreement: Option<f64>,
}

/// The comparison.
#[derive(Clone, Debug, Serialize)]
pub struct RescoreReport {
    /// Model.
    pub model: String,
    /// Range read (window starts), Unix ms.
    pub from_ms: Option<i64>,
    /// End of the range.
    pub to_ms: Option<i64>,
    /// One-minute windows read.
    pub windows: u64,
    /// Windows the model's features could be made for.
    pub rows: u64,
    /// Per version.
    pub versions: Vec<VersionScore>,
    /// Per pair of versions.
    pub pairs: Vec<Agreement>,
}

/// Why a re-scoring could not run.
#[derive(Debug, thiserror::Error)]
pub enum RescoreError {
    /// The request cannot be served (HTTP 422).
    #[error("{0}")]
    Invalid(String),
    /// Reading the lake failed (HTTP 500).
    #[error("{0}")]
    Lake(String),
}

/// A vehicle's closed one-minute window as the models see it (a row of
/// `aggregates` with `window = '1m'`).
#[derive(Clone, Debug, PartialEq)]
pub struct MinuteRow {
    /// Fleet.
    pub fleet: String,
    /// Device.
    pub device: String,
    /// The window's features.
    pub window: Window,
    /// Fuel used in the window, l.
    pub fuel_used_l: Option<f64>,
}

/// The one-minute windows of one batch of `aggregates` (other windows skipped).
pub fn minute_rows(b: &arrow_array::RecordBatch) -> Result<Vec<MinuteRow>, String> {
    let col = |name: &str| b.column_by_name(name).ok_or_else(|| format!("no column {name}"));
    let dev = col(c::DEVICE_ID)?.as_string::<i32>().clone();
    let fleet = col(c::FLEET)?.as_string::<i32>().clone();
    let window = col(c::WINDOW)?.as_string::<i32>().clone();
    let start = col(c::WINDOW_START)?.as_primitive::<TimestampMillisecondType>().clone();
    let f = |name: &str| col(name).map(|a| a.as_primitive::<Float64Type>().clone());
    let (dist, avg, max, fuel) = (f(c::DISTANCE_M)?, f(c::AVG_SPEED_KMH)?, f(c::MAX_SPEED_KMH)?, f(c::FUEL_USED_L)?);
    let (pmin, pmean, pmax, leak) = (
        f(c::TIRE_PRESSURE_MIN_KPA)?,
        f(c::TIRE_PRESSURE_MEAN_KPA)?,
        f(c::TIRE_PRESSURE_MAX_KPA)?,
        f(c::LEAK_RATE_KPA_H)?,
    );
    let opt = |a: &arrow_array::Float64Array, i: usize| (!a.is_null(i)).then(|| a.value(i));
    Ok((0..b.num_rows())
        .filter(|i| window.value(*i) == "1m")
        .map(|i| MinuteRow {
            fleet: fleet.value(i).to_string(),
            device: dev.value(i).to_string(),
            window: Window {
                start_ms: start.value(i),
                distance_m: opt(&dist, i),
                avg_speed_kmh: opt(&avg, i),
                max_speed_kmh: opt(&max, i),
                tire_pressure_min_kpa: opt(&pmin, i),
                tire_pressure_mean_kpa: opt(&pmean, i),
                tire_pressure_max_kpa: opt(&pmax, i),
                leak_rate_kpa_h: opt(&leak, i),
            },
            fuel_used_l: opt(&fuel, i),
        })
        .collect())
}

/// Reads the one-minute windows of `aggregates` whose partitions meet the range.
async fn read_minutes(
    store: &Store,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
) -> Result<BTreeMap<String, Vec<MinuteRow>>, RescoreError> {
    let lake = |e: &dyn std::fmt::Display| RescoreError::Lake(format!("reading aggregates: {e}"));
    let mut out: BTreeMap<String, Vec<MinuteRow>> = BTreeMap::new();
    let mut n = 0usize;
    for path in store.list("aggregates").await.map_err(|e| lake(&e))? {
        let Some(dir) = path.strip_prefix("aggregates/").and_then(|p| p.rsplit_once('/')).map(|(d, _)| d) else {
            continue;
        };
        let Some(hour) = partition_start(dir) else { continue };
        if from_ms.is_some_and(|f| hour + 3_600_000 <= f)
            || to_ms.is_some_and(|t| hour >= t)
            || !path.ends_with(".parquet")
        {
            continue;
        }
        let Some(bytes) = store.get(&path).await.map_err(|e| lake(&e))? else { continue };
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).and_then(|b| b.build()).map_err(|e| lake(&e))?;
        for b in reader {
            let b = b.map_err(|e| lake(&e))?;
            for m in minute_rows(&b).map_err(|e| lake(&format!("{path}: {e}")))? {
                let s = m.window.start_ms;
                if from_ms.is_some_and(|f| s < f) || to_ms.is_some_and(|t| s >= t) {
                    continue;
                }
                n += 1;
                if n > MAX_WINDOWS {
                    return Err(RescoreError::Invalid(format!(
                        "more than {MAX_WINDOWS} windows in the range; narrow it with from_ms and to_ms"
                    )));
                }
                out.entry(format!("{}/{}", m.fleet, m.device)).or_default().push(m);
            }
        }
    }
    Ok(out)
}

/// Re-scores `model`'s `versions` over the range and compares them.
pub async fn rescore(
    store: &Store,
    models: &ModelRegistry,
    model: &str,
    req: &RescoreRequest,
) -> Result<RescoreReport, RescoreError> {
    let kind = ModelKind::from_name(model).ok_or_else(|| RescoreError::Invalid(format!("no model {model}")))?;
    if req.versions.is_empty() || req.versions.len() > 8 {
        return Err(RescoreError::Invalid("give one to eight versions".into()));
    }
    let mut plans: Vec<(u32, Arc<Plan>)> = Vec::new();
    for v in &req.versions {
        plans.push((*v, models.plan_for(kind, *v).await.map_err(RescoreError::Invalid)?));
    }
    let minutes = read_minutes(store, req.from_ms, req.to_ms).await?;
    let threshold = req.threshold.unwrap_or(0.5);
    let (from_ms, to_ms) = (req.from_ms, req.to_ms);
    tokio::task::spawn_blocking(move || compare(kind, minutes, &plans, threshold, from_ms, to_ms))
        .await
        .map_err(|e| RescoreError::Lake(format!("scoring task failed: {e}")))?
}

fn compare(
    kind: ModelKind,
    mut minutes: BTreeMap<String, Vec<MinuteRow>>,
    plans: &[(u32, Arc<Plan>)],
    threshold: f64,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
) -> Result<RescoreReport, RescoreError> {
    let mut rows: Vec<f32> = Vec::new();
    let mut truth: Vec<Option<f64>> = Vec::new();
    let mut windows = 0u64;
    for ws in minutes.values_mut() {
        ws.sort_by_key(|m| m.window.start_ms);
        ws.dedup_by_key(|m| m.window.start_ms);
        windows += ws.len() as u64;
        for i in 0..ws.len() {
            let history: Vec<Window> = ws[i.saturating_sub(kind.history() - 1)..=i].iter().map(|m| m.window).collect();
            let Some(row) = fleetline_inference::features(kind, &history, MINUTE_MS) else {
                continue;
            };
            rows.extend(row);
            truth.push(match kind {
                ModelKind::TireRisk => None,
                ModelKind::Fuel => ws[i].fuel_used_l,
                ModelKind::SpeedNext => ws
                    .get(i + 1)
                    .filter(|n| n.window.start_ms == ws[i].window.start_ms + MINUTE_MS)
                    .and_then(|n| n.window.avg_speed_kmh),
            });
        }
    }
    let k = kind.features().len();
    let mut scores: Vec<(u32, Vec<f32>)> = Vec::new();
    for (v, plan) in plans {
        let mut out = Vec::with_capacity(truth.len());
        for chunk in rows.chunks(4096 * k) {
            out.extend(plan.run(chunk).map_err(|e| RescoreError::Lake(format!("version {v}: {e}")))?);
        }
        scores.push((*v, out));
    }
    let n = truth.len().max(1) as f64;
    let versions = scores
        .iter()
        .map(|(v, s)| {
            let errs: Vec<f64> =
                s.iter().zip(&truth).filter_map(|(p, t)| t.map(|t| (f64::from(*p) - t).abs())).collect();
            VersionScore {
                version: *v,
                mean: s.iter().map(|x| f64::from(*x)).sum::<f64>() / n,
                above_threshold: kind
                    .is_classifier()
                    .then(|| s.iter().filter(|x| f64::from(**x) >= threshold).count() as f64 / n),
                mae: (!kind.is_classifier() && !errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64),
                compared: (!kind.is_classifier()).then_some(errs.len() as u64),
            }
        })
        .collect();
    let mut pairs = Vec::new();
    for (i, (a, sa)) in scores.iter().enumerate() {
        for (b, sb) in &scores[i + 1..] {
            let diffs: Vec<f64> = sa.iter().zip(sb).map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs()).collect();
            pairs.push(Agreement {
                a: *a,
                b: *b,
                mean_abs_diff: diffs.iter().sum::<f64>() / n,
                max_abs_diff: diffs.iter().copied().fold(0.0, f64::max),
                alert_agreement: kind.is_classifier().then(|| {
                    sa.iter()
                        .zip(sb)
                        .filter(|(x, y)| (f64::from(**x) >= threshold) == (f64::from(**y) >= threshold))
                        .count() as f64
                        / n
                }),
            });
        }
    }
    Ok(RescoreReport { model: kind.name().into(), from_ms, to_ms, windows, rows: truth.len() as u64, versions, pairs })
}
