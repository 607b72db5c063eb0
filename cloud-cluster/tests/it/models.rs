//! The model registry: versions checked by loading them, deployments with
//! variants and a shadow, rollbacks, nodes converging on one store, damaged
//! files refused, and its REST API behind the bearer token.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::sync::Arc;

use base64::Engine;
use fleetline_cloud::inference::{Deployment, ModelRegistry, ModelRegistryError, Variant};
use fleetline_cloud::lake::store::Store;
use fleetline_inference::ModelKind;
use serde_json::{Value, json};

fn committed(kind: ModelKind) -> Vec<u8> {
    let path = format!("{}/../models/{}/model.onnx", env!("CARGO_MANIFEST_DIR"), kind.name());
    std::fs::read(path).unwrap()
}

/// The same model with an unknown protobuf field appended (field 100, one
/// byte): other bytes, another version, the same scores.
fn retagged(kind: ModelKind, tag: u8) -> Vec<u8> {
    let mut b = committed(kind);
    b.extend_from_slice(&[0xa2, 0x06, 0x01, tag]);
    b
}

fn split(a: u32, b: u32, wa: u32, wb: u32, shadow: Option<u32>) -> Deployment {
    Deployment {
        variants: vec![
            Variant { label: "A".into(), version: a, weight: wa },
            Variant { label: "B".into(), version: b, weight: wb },
        ],
        shadow,
        threshold: None,
        at_ms: 0,
    }
}

#[tokio::test]
async fn versions_deployments_and_rollbacks_converge_across_nodes() {
    let store = Store::memory();
    let one = ModelRegistry::open(store.clone(), Arc::default()).await.unwrap();
    // First start: the committed models, version 1 each, deployed alone.
    for kind in fleetline_inference::KINDS {
        let m = one.model(kind.name()).unwrap();
        assert_eq!(m.versions.len(), 1, "{kind:?}");
        assert_eq!(m.versions[0].source, "builtin");
        assert_eq!(m.deployment.as_ref().unwrap().variants[0].version, 1);
        assert!(one.active().get(kind).is_some());
    }
    assert_eq!(one.active().get(ModelKind::TireRisk).unwrap().threshold, 0.5, "the card's threshold");
    // A second node on the same store registers nothing twice.
    let two = ModelRegistry::open(store.clone(), Arc::default()).await.unwrap();
    assert_eq!(two.model("fuel").unwrap().versions.len(), 1);

    let v2 = one.register("tire_risk", retagged(ModelKind::TireRisk, 1).into(), json!({"note": "v2"}), "upload").await;
    let v2 = v2.unwrap();
    assert_eq!(v2.version, 2);
    let again = one.register("tire_risk", retagged(ModelKind::TireRisk, 1).into(), json!({}), "upload").await.unwrap();
    assert_eq!(again.version, 2, "the same bytes are the same version");
    one.deploy("tire_risk", split(1, 2, 50, 50, Some(2))).await.unwrap();
    let live = one.active();
    let tire = live.get(ModelKind::TireRisk).unwrap();
    assert_eq!(tire.variants.iter().map(|v| v.variant.version).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(tire.shadow.as_ref().map(|(v, _)| *v), Some(2));

    // The other node sees it on its next read.
    assert!(two.refresh().await.unwrap());
    assert_eq!(two.active().get(ModelKind::TireRisk).unwrap().variants.len(), 2);
    assert!(!two.refresh().await.unwrap(), "nothing new");
    // A rollback on the other node, seen by the first.
    let back = two.rollback("tire_risk").await.unwrap();
    assert_eq!(back.variants.len(), 1);
    assert!(one.refresh().await.unwrap());
    assert_eq!(one.active().get(ModelKind::TireRisk).unwrap().variants.len(), 1);
    assert!(one.active().get(ModelKind::TireRisk).unwrap().shadow.is_none());
    // Snapshots taken before a swap keep what they had.
    assert_eq!(live.get(ModelKind::TireRisk).unwrap().variants.len(), 2);
    // Undeployed: the model stops scoring everywhere, its versions stay.
    one.undeploy("fuel").await.unwrap();
    assert!(one.active().get(ModelKind::Fuel).is_none());
    two.refresh().await.unwrap();
    assert!(two.active().get(ModelKind::Fuel).is_none());
    assert_eq!(two.model("fuel").unwrap().versions.len(), 1);
    two.rollback("fuel").await.unwrap();
    assert!(two.active().get(ModelKind::Fuel).is_some());
}

#[tokio::test]
async fn files_and_deployments_that_cannot_run_are_refused_with_the_reason() {
    let store = Store::memory();
    let r = ModelRegistry::open(store.clone(), Arc::default()).await.unwrap();
    let invalid = |e: ModelRegistryError| match e {
        ModelRegistryError::Invalid(m) => m,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let m = invalid(r.register("tire_risk", committed(ModelKind::Fuel).into(), json!({}), "upload").await.unwrap_err());
    assert!(m.contains("[n, 6]"), "{m}");
    let m = invalid(r.register("fuel", b"not onnx at all".to_vec().into(), json!({}), "upload").await.unwrap_err());
    assert!(m.contains("does not load"), "{m}");
    let mut cut = committed(ModelKind::SpeedNext);
    cut.truncate(cut.len() / 2);
    invalid(r.register("speed_next", cut.into(), json!({}), "upload").await.unwrap_err());
    let m = invalid(r.register("fuel", committed(ModelKind::Fuel).into(), json!([1, 2]), "upload").await.unwrap_err());
    assert!(m.contains("card"), "{m}");
    assert!(matches!(
        r.register("brakes", committed(ModelKind::Fuel).into(), json!({}), "upload").await,
        Err(ModelRegistryError::UnknownModel(..))
    ));
    let m = invalid(r.deploy("fuel", split(1, 7, 1, 1, None)).await.unwrap_err());
    assert!(m.contains("version 7"), "{m}");
    assert!(matches!(r.rollback("speed_next").await, Err(ModelRegistryError::Conflict(_))));
    assert_eq!(r.model("fuel").unwrap().versions.len(), 1, "nothing registered by the refusals");

    // A deployed file damaged in the store: a node starting afresh keeps the
    // model out of scoring and says why; the others keep their loaded plan.
    let v2 = r.register("tire_risk", retagged(ModelKind::TireRisk, 2).into(), json!({}), "upload").await.unwrap();
    r.deploy("tire_risk", Deployment::only(v2.version)).await.unwrap();
    let path = format!("_fleetline/models/tire_risk/{}.onnx", v2.sha256);
    let mut bad = retagged(ModelKind::TireRisk, 2);
    bad[40] ^= 0xff;
    store.put(&path, bad.into()).await.unwrap();
    let fresh = ModelRegistry::open(store.clone(), Arc::default()).await.unwrap();
    assert!(fresh.active().get(ModelKind::TireRisk).is_none());
    assert!(fresh.load_errors()["tire_risk"].contains("sha256"), "{:?}", fresh.load_errors());
    assert!(fresh.active().get(ModelKind::Fuel).is_some(), "other models unaffected");
    assert!(r.active().get(ModelKind::TireRisk).is_some());
    // Deleted: the same.
    store.delete(&path).await.unwrap();
    let fresh = ModelRegistry::open(store.clone(), Arc::default()).await.unwrap();
    assert!(fresh.load_errors()["tire_risk"].contains("missing"), "{:?}", fresh.load_errors());
    // Rolled back to a file that is whole: every node runs again.
    r.rollback("tire_risk").await.unwrap();
    fresh.refresh().await.unwrap();
    assert!(fresh.active().get(ModelKind::TireRisk).is_some());
    assert!(fresh.load_errors().is_empty());
}

async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, String) {
    let body = body.map(|b| b.to_string());
    let auth = token.map(|t| format!("Bearer {t}"));
    let r = fleetline_testkit::http::request_with_auth(addr, method, path, auth.as_deref(), body.as_deref()).await;
    (r.status, r.body)
}

#[tokio::test]
async fn the_rest_api_uploads_deploys_and_rolls_back_behind_the_token() {
    let store = Store::memory();
    let models = Arc::new(ModelRegistry::open(store.clone(), Arc::default()).await.unwrap());
    let ops = crate::test_ops(store, models.clone()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(fleetline_cloud::http::serve(listener, ops));

    let file = retagged(ModelKind::Fuel, 3);
    let upload = json!({"onnx": base64::engine::general_purpose::STANDARD.encode(&file), "card": {"family": "LinearRegression"}});
    assert_eq!(http(addr, "POST", "/models/fuel/versions", Some(upload.clone()), None).await.0, 401);
    assert_eq!(http(addr, "POST", "/models/fuel/versions", Some(upload.clone()), Some("read-only")).await.0, 401);
    let (status, body) = http(addr, "POST", "/models/fuel/versions", Some(upload), Some("tok")).await;
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(created["version"], 2);
    let bad = json!({"onnx": "!!!"});
    assert_eq!(http(addr, "POST", "/models/fuel/versions", Some(bad), Some("tok")).await.0, 422);
    let wrong = json!({"onnx": base64::engine::general_purpose::STANDARD.encode(committed(ModelKind::TireRisk))});
    let (status, body) = http(addr, "POST", "/models/fuel/versions", Some(wrong), Some("tok")).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(http(addr, "POST", "/models/brakes/versions", Some(json!({"onnx": ""})), Some("tok")).await.0, 404);

    let d = json!({"variants": [{"label": "A", "version": 1, "weight": 70}, {"label": "B", "version": 2, "weight": 30}], "shadow": 2});
    assert_eq!(http(addr, "PUT", "/models/fuel/deployment", Some(d.clone()), None).await.0, 401);
    let (status, body) = http(addr, "PUT", "/models/fuel/deployment", Some(d), Some("tok")).await;
    assert_eq!(status, 200, "{body}");
    let bad = json!({"variants": [{"label": "A", "version": 9, "weight": 1}]});
    assert_eq!(http(addr, "PUT", "/models/fuel/deployment", Some(bad), Some("tok")).await.0, 422);
    let (status, body) = http(addr, "GET", "/models", None, None).await;
    assert_eq!(status, 200);
    let all: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all["fuel"]["deployment"]["variants"][1]["weight"], 30);
    assert_eq!(all["fuel"]["versions"][1]["card"]["family"], "LinearRegression");
    assert_eq!(models.active().get(ModelKind::Fuel).unwrap().variants.len(), 2);

    // The file itself needs a token, the read token will do.
    assert_eq!(http(addr, "GET", "/models/fuel/versions/2/onnx", None, None).await.0, 401);
    let r = fleetline_testkit::http::request_with_auth(
        addr,
        "GET",
        "/models/fuel/versions/2/onnx",
        Some("Bearer read-only"),
        None,
    )
    .await;
    assert_eq!(r.status, 200);

    assert_eq!(http(addr, "POST", "/models/fuel/rollback", None, Some("tok")).await.0, 200);
    assert_eq!(models.active().get(ModelKind::Fuel).unwrap().variants.len(), 1);
    let rescore = json!({"versions": [1, 2]});
    assert_eq!(http(addr, "POST", "/models/fuel/rescore", Some(rescore.clone()), None).await.0, 401);
    let (status, body) = http(addr, "POST", "/models/fuel/rescore", Some(rescore), Some("tok")).await;
    assert_eq!(status, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((r["windows"].as_u64(), r["versions"].as_array().map(Vec::len)), (Some(0), Some(2)), "an empty lake");
    assert_eq!(http(addr, "DELETE", "/models/fuel/deployment", None, Some("tok")).await.0, 204);
    assert!(models.active().get(ModelKind::Fuel).is_none());
    server.abort();
}

/// A lake with `vehicles` vehicles' one-minute windows over `minutes` minutes.
async fn lake_with_minutes(store: &Store, vehicles: usize, minutes: i64) {
    use fleetline_cloud::analytics::AggregateRow;
    use fleetline_cloud::lake::rows::{Rows, WrittenBy};
    let t0 = 1_796_180_000_000 / 3_600_000 * 3_600_000;
    let mut rows = Rows::default();
    for v in 0..vehicles {
        let (fleet, device): (Arc<str>, Arc<str>) = ("acme".into(), format!("veh-{v}").into());
        for m in 0..minutes {
            let speed = 30.0 + ((v as i64 * 7 + m * 13) % 60) as f64;
            let leaking = v % 5 == 0 && m > minutes / 2;
            rows.push_aggregate(
                &fleet,
                &device,
                AggregateRow {
                    window: "1m",
                    start: t0 + m * 60_000,
                    end: t0 + (m + 1) * 60_000,
                    samples: 40,
                    distance_m: speed / 60.0 * 1000.0,
                    speed_readings: 6,
                    avg_speed_kmh: Some(speed),
                    max_speed_kmh: Some(speed + 9.0),
                    fuel_used_l: Some(0.1 + speed / 400.0),
                    fuel_l_per_100km: None,
                    tire_readings: 24,
                    tire_pressure_min_kpa: Some(if leaking { 858.0 - m as f64 * 0.1 } else { 887.0 }),
                    tire_pressure_mean_kpa: Some(if leaking { 876.0 } else { 888.0 }),
                    tire_pressure_max_kpa: Some(if leaking { 881.0 } else { 889.0 }),
                    leak_rate_kpa_h: Some(if leaking { 84.0 } else { 0.3 }),
                },
            );
        }
    }
    let by = WrittenBy { node: "t".into(), shard: 0, generation: 1, claim: 1, epoch: 0 };
    for f in rows.encode(t0, &by).unwrap() {
        let path = format!("{}/{}/shard-000-000000000001.parquet", f.dataset, f.partition);
        store.put(&path, f.bytes.into()).await.unwrap();
    }
}

#[tokio::test]
async fn rescoring_compares_versions_on_the_same_history() {
    use fleetline_cloud::jobs::rescore::{RescoreRequest, rescore};
    let store = Store::memory();
    lake_with_minutes(&store, 20, 90).await;
    let models = ModelRegistry::open(store.clone(), Arc::default()).await.unwrap();
    let alt = std::fs::read(format!("{}/../models/speed_next/alternative.onnx", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let v2 = models.register("speed_next", alt.into(), json!({}), "upload").await.unwrap().version;
    let req = RescoreRequest { versions: vec![1, v2], ..Default::default() };
    let r = rescore(&store, &models, "speed_next", &req).await.unwrap();
    assert_eq!(r.windows, 20 * 90);
    assert_eq!(r.rows, 20 * 88, "three windows in a row per row");
    assert_eq!(r.versions.len(), 2);
    for v in &r.versions {
        assert_eq!(v.compared, Some(20 * 87), "the last row of each vehicle has no next window");
        assert!(v.mae.unwrap() > 0.0 && v.mae.unwrap() < 60.0, "{v:?}");
    }
    assert!(r.pairs[0].mean_abs_diff > 0.0, "two model families differ");

    // The same trees under two versions agree everywhere.
    let tire2 =
        models.register("tire_risk", retagged(ModelKind::TireRisk, 9).into(), json!({}), "upload").await.unwrap();
    let req = RescoreRequest { versions: vec![1, tire2.version], ..Default::default() };
    let r = rescore(&store, &models, "tire_risk", &req).await.unwrap();
    assert_eq!((r.pairs[0].mean_abs_diff, r.pairs[0].alert_agreement), (0.0, Some(1.0)));
    let above = r.versions[0].above_threshold.unwrap();
    assert!(above > 0.05 && above < 0.2, "a fifth of the vehicles leak for half the time: {above}");

    // A range: only its windows.
    let t0 = 1_796_180_000_000 / 3_600_000 * 3_600_000;
    let req = RescoreRequest {
        versions: vec![1],
        from_ms: Some(t0 + 10 * 60_000),
        to_ms: Some(t0 + 20 * 60_000),
        threshold: None,
    };
    assert_eq!(rescore(&store, &models, "fuel", &req).await.unwrap().windows, 20 * 10);
    // Versions that are not registered, or none.
    let bad = RescoreRequest { versions: vec![7], ..Default::default() };
    assert!(rescore(&store, &models, "fuel", &bad).await.is_err());
    assert!(rescore(&store, &models, "fuel", &RescoreRequest::default()).await.is_err());
}
