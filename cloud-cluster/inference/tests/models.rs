//! The committed models load in tract, keep to their spec, and give the
//! answers their cards lead one to expect; models that do not fit are refused
//! with a reason.

use fleetline_inference::{KINDS, ModelError, ModelKind, Plan, Window, features};

fn model_bytes(kind: ModelKind) -> Vec<u8> {
    let path = format!("{}/../../models/{}/model.onnx", env!("CARGO_MANIFEST_DIR"), kind.name());
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn window(start_ms: i64, pmin: f64, leak: f64, avg: f64) -> Window {
    Window {
        start_ms,
        distance_m: Some(avg / 60.0 * 1000.0),
        avg_speed_kmh: Some(avg),
        max_speed_kmh: Some(avg + 12.0),
        tire_pressure_min_kpa: Some(pmin),
        tire_pressure_mean_kpa: Some(pmin + 4.0),
        tire_pressure_max_kpa: Some(pmin + 7.0),
        leak_rate_kpa_h: Some(leak),
    }
}

#[test]
fn every_committed_model_loads_and_scores_a_batch() {
    for kind in KINDS {
        let plan = Plan::load(kind, &model_bytes(kind)).expect("loads");
        let history =
            [window(0, 230.0, 0.5, 40.0), window(60_000, 230.0, 0.4, 45.0), window(120_000, 229.5, 0.6, 50.0)];
        let row = features(kind, &history, 60_000).expect("row");
        let batch: Vec<f32> = row.iter().copied().cycle().take(row.len() * 5).collect();
        let scores = plan.run(&batch).expect("runs");
        assert_eq!(scores.len(), 5, "{kind:?}");
        assert!(scores.iter().all(|s| s.is_finite()), "{kind:?}: {scores:?}");
        assert!(scores.windows(2).all(|p| p[0] == p[1]), "same rows, same scores");
        assert_eq!(plan.run(&[]).expect("empty"), Vec::<f32>::new());
    }
}

#[test]
fn tire_risk_separates_a_leak_from_a_steady_tire() {
    let plan = Plan::load(ModelKind::TireRisk, &model_bytes(ModelKind::TireRisk)).expect("loads");
    // Truck tires near 890 kPa; the held-out windows with a leak have the
    // lowest tire some 20 kPa under the others and losing 80 kPa/h.
    let steady =
        features(ModelKind::TireRisk, &[window(0, 887.0, 0.5, 50.0), window(60_000, 887.5, 0.4, 50.0)], 60_000)
            .expect("row");
    let mut low = window(60_000, 858.0, 84.0, 50.0);
    low.tire_pressure_mean_kpa = Some(876.0);
    low.tire_pressure_max_kpa = Some(881.0);
    let leaking = features(ModelKind::TireRisk, &[window(0, 858.5, 83.0, 50.0), low], 60_000).expect("row");
    let scores = plan.run(&[steady, leaking].concat()).expect("runs");
    assert!(scores[0] < 0.1, "steady tire scored {}", scores[0]);
    assert!(scores[1] > 0.9, "leaking tire scored {}", scores[1]);
    for s in scores {
        assert!((0.0..=1.0).contains(&s));
    }
}

#[test]
fn regressors_answer_in_their_units() {
    let fuel = Plan::load(ModelKind::Fuel, &model_bytes(ModelKind::Fuel)).expect("loads");
    let parked = fuel.run(&[0.0, 0.0, 0.0]).expect("runs")[0];
    let driving = fuel.run(&[1.5, 90.0, 110.0]).expect("runs")[0];
    assert!(driving > parked, "a 1.5 km window at 90 km/h burns more than standing still: {driving} vs {parked}");
    let speed = Plan::load(ModelKind::SpeedNext, &model_bytes(ModelKind::SpeedNext)).expect("loads");
    let next = speed.run(&[80.0, 80.0, 80.0, 95.0, 1.33]).expect("runs")[0];
    assert!((40.0..=120.0).contains(&next), "steady 80 km/h predicts {next}");
}

#[test]
fn a_model_for_other_features_is_refused_with_the_reason() {
    let err = Plan::load(ModelKind::TireRisk, &model_bytes(ModelKind::Fuel)).expect_err("fuel is not tire risk");
    assert!(matches!(err, ModelError::Signature(ref m) if m.contains("[n, 6]")), "{err}");
    let err = Plan::load(ModelKind::Fuel, &model_bytes(ModelKind::TireRisk)).expect_err("tire risk is not fuel");
    assert!(matches!(err, ModelError::Signature(_)), "{err}");
}

#[test]
fn garbage_truncated_and_flipped_files_are_refused_not_panicked_on() {
    assert!(matches!(Plan::load(ModelKind::Fuel, b"not a model"), Err(ModelError::Load(_) | ModelError::Signature(_))));
    assert!(Plan::load(ModelKind::Fuel, &[]).is_err());
    let good = model_bytes(ModelKind::TireRisk);
    assert!(Plan::load(ModelKind::TireRisk, &good[..good.len() / 2]).is_err(), "truncated");
    // Flipped bits either fail to load or load a model that still keeps to
    // the spec: never a panic.
    for at in (0..good.len()).step_by(good.len() / 40 + 1) {
        let mut bad = good.clone();
        bad[at] ^= 0x5a;
        if let Ok(plan) = std::panic::catch_unwind(|| Plan::load(ModelKind::TireRisk, &bad)).expect("no panic") {
            let _ = plan.run(&[230.0, 234.0, 7.0, 0.5, 0.4, 0.0]);
        }
    }
}

#[test]
fn a_ragged_batch_is_an_error() {
    let plan = Plan::load(ModelKind::Fuel, &model_bytes(ModelKind::Fuel)).expect("loads");
    assert!(matches!(plan.run(&[1.0, 2.0]), Err(ModelError::Batch { len: 2, features: 3 })));
}
