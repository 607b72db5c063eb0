//! The stream stage: the feature rows of a commit's closed windows, scored
//! in one batch per model and variant with the active set the commit took.
//!
//! Runs on a blocking thread (the plans are CPU work). Scoring never fails
//! a commit: a batch a plan cannot run is counted and left unscored.

use std::sync::Arc;

use fleetline_inference::{ModelKind, feature_hash};

use super::deploy::{SHADOW, variant_index};
use super::registry::ActiveSet;
use crate::lake::rows::Prediction;

/// A closed window's feature rows, waiting for its commit to score them.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreRequest {
    /// Fleet.
    pub fleet: Arc<str>,
    /// Device.
    pub device: Arc<str>,
    /// Window start, Unix ms.
    pub window_start: i64,
    /// Window end, Unix ms.
    pub window_end: i64,
    /// Per model, the features in its input order.
    pub rows: Vec<(ModelKind, Vec<f32>)>,
}

/// A prediction with what the shard needs to act on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Scoring {
    /// The row of `predictions`.
    pub row: Prediction,
    /// The model.
    pub kind: ModelKind,
    /// The request it answers (its index in the commit's order).
    pub request: usize,
    /// For a live classifier score: the deployment's alert threshold.
    pub threshold: Option<f64>,
}

/// What scoring a commit's requests gave.
#[derive(Debug, Default)]
pub struct Scored {
    /// Predictions, in request order (live variants before the shadow).
    pub predictions: Vec<Scoring>,
    /// Rows not scored, by reason: `not_deployed` (the model has no
    /// deployment), `model_error` (its plan failed on the batch).
    pub skipped: Vec<(&'static str, ModelKind, u64)>,
}

/// Scores `requests` with `active`: per model, one batch per live variant
/// (each vehicle in the variant its hash picks) and one for the shadow.
pub fn score(active: &ActiveSet, requests: &[ScoreRequest]) -> Scored {
    let mut out = Scored::default();
    for kind in fleetline_inference::KINDS {
        let wanted: Vec<(usize, &[f32])> = requests
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.rows.iter().find(|(k, _)| *k == kind).map(|(_, row)| (i, row.as_slice())))
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let Some(model) = active.get(kind) else {
            out.skipped.push(("not_deployed", kind, wanted.len() as u64));
            continue;
        };
        let variants: Vec<_> = model.variants.iter().map(|v| v.variant.clone()).collect();
        let mut arms: Vec<Vec<(usize, &[f32])>> = vec![Vec::new(); variants.len()];
        for (i, row) in &wanted {
            let r = &requests[*i];
            arms[variant_index(&variants, kind.name(), &r.fleet, &r.device)].push((*i, row));
        }
        let threshold = kind.is_classifier().then_some(model.threshold);
        for (live, arm) in model.variants.iter().zip(&arms) {
            let label: Arc<str> = live.variant.label.as_str().into();
            run(&mut out, requests, kind, &live.plan, live.variant.version, &label, arm, threshold);
        }
        if let Some((version, plan)) = &model.shadow {
            run(&mut out, requests, kind, plan, *version, &SHADOW.into(), &wanted, None);
        }
    }
    out.predictions.sort_by_key(|p| (p.request, p.row.variant.as_ref() == SHADOW));
    out
}

#[allow(clippy::too_many_arguments)]
fn run(
    out: &mut Scored,
    requests: &[ScoreRequest],
    kind: ModelKind,
    plan: &fleetline_inference::Plan,
    version: u32,
    variant: &Arc<str>,
    rows: &[(usize, &[f32])],
    threshold: Option<f64>,
) {
    if rows.is_empty() {
        return;
    }
    let batch: Vec<f32> = rows.iter().flat_map(|(_, r)| r.iter().copied()).collect();
    match plan.run(&batch) {
        Ok(scores) if scores.len() == rows.len() => {
            for ((i, row), score) in rows.iter().zip(scores) {
                let r = &requests[*i];
                out.predictions.push(Scoring {
                    row: Prediction {
                        fleet: r.fleet.clone(),
                        device: r.device.clone(),
                        window_start: r.window_start,
                        window_end: r.window_end,
                        model: kind.name(),
                        version,
                        variant: variant.clone(),
                        score,
                        feature_hash: feature_hash(row),
                    },
                    kind,
                    request: *i,
                    threshold,
                });
            }
        }
        Ok(scores) => {
            tracing::warn!(
                model = kind.name(),
                version,
                got = scores.len(),
                rows = rows.len(),
                "model gave the wrong number of scores"
            );
            out.skipped.push(("model_error", kind, rows.len() as u64));
        }
        Err(e) => {
            tracing::warn!(model = kind.name(), version, error = %e, "model failed on a batch");
            out.skipped.push(("model_error", kind, rows.len() as u64));
        }
    }
}
