//! The schema registry: the compatibility matrix, transitive modes, persistence,
//! and the REST API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::sync::Arc;

use fleetline_cloud::lake::store::Store;
use fleetline_cloud::registry::{Compatibility, READINGS_SUBJECT, Registry, RegistryError, Schema, check};
use serde_json::{Value, json};

fn sig(kind: u16, path: &str, unit: &str, min: f64, max: f64) -> Value {
    json!({"path": path, "kind": kind, "encoding": "delta", "scale_exp": -1, "unit": unit, "min": min, "max": max})
}

fn schema(signals: &[Value]) -> String {
    json!({ "signals": signals }).to_string()
}

fn base() -> Vec<Value> {
    vec![sig(3, "Vehicle.Speed", "km/h", 0.0, 300.0), sig(17, "Vehicle.Fuel", "l", 0.0, 2000.0)]
}

#[test]
fn the_compatibility_matrix() {
    use Compatibility::*;
    let old = Schema::parse(&schema(&base())).unwrap();
    let mut add = base();
    add.push(sig(32, "Vehicle.Tire", "kPa", 0.0, 1500.0));
    let remove = vec![base()[0].clone()];
    let mut widen = base();
    widen[0] = sig(3, "Vehicle.Speed", "km/h", 0.0, 400.0);
    let mut narrow = base();
    narrow[0] = sig(3, "Vehicle.Speed", "km/h", 0.0, 200.0);
    let mut unit = base();
    unit[0] = sig(3, "Vehicle.Speed", "m/s", 0.0, 300.0);
    let mut renamed = base();
    renamed[0] = sig(3, "Vehicle.Velocity", "km/h", 0.0, 300.0);
    // change → compatible under (BACKWARD, FORWARD, FULL, NONE)
    let cases: [(&str, Vec<Value>, [bool; 4]); 7] = [
        ("same", base(), [true, true, true, true]),
        ("add a kind", add, [true, false, false, true]),
        ("remove a kind", remove, [false, true, false, true]),
        ("widen a range", widen, [true, false, false, true]),
        ("narrow a range", narrow, [false, true, false, true]),
        ("change a unit", unit, [false, false, false, true]),
        ("rename a path", renamed, [false, false, false, true]),
    ];
    for (name, signals, expect) in cases {
        let new = Schema::parse(&schema(&signals)).unwrap();
        for (mode, want) in [Backward, Forward, Full, None].into_iter().zip(expect) {
            let problems = check(mode, &new, &[&old]);
            assert_eq!(problems.is_empty(), want, "{name} under {mode:?}: {problems:?}");
        }
        // With a single earlier version, transitive modes agree with the plain ones.
        for (mode, want) in [BackwardTransitive, ForwardTransitive, FullTransitive].into_iter().zip(expect) {
            assert_eq!(check(mode, &new, &[&old]).is_empty(), want, "{name} under {mode:?}");
        }
    }
}

#[test]
fn transitive_modes_check_every_earlier_version() {
    use Compatibility::*;
    let v1 = Schema::parse(&schema(&base())).unwrap();
    let v2 = Schema::parse(&schema(&base()[..1])).unwrap(); // kind 17 removed (allowed under NONE)
    let mut s3 = base()[..1].to_vec();
    s3.push(sig(32, "Vehicle.Tire", "kPa", 0.0, 1500.0));
    let v3 = Schema::parse(&schema(&s3)).unwrap();
    assert!(check(Backward, &v3, &[&v1, &v2]).is_empty(), "v3 reads v2");
    let p = check(BackwardTransitive, &v3, &[&v1, &v2]);
    assert!(p.len() == 1 && p[0].contains("kind 17"), "v3 cannot read v1: {p:?}");
    assert!(!check(FullTransitive, &v3, &[&v1, &v2]).is_empty());
}

#[test]
fn bad_schemas_are_refused() {
    for bad in [
        "not json".to_string(),
        schema(&[sig(3, "A", "x", 0.0, 1.0), sig(3, "B", "x", 0.0, 1.0)]),
        schema(&[sig(3, "A", "x", 0.0, 1.0), sig(4, "A", "x", 0.0, 1.0)]),
        schema(&[sig(3, "A", "x", 2.0, 1.0)]),
        json!({"signals": [{"path": "A", "kind": 1, "encoding": "zigzag", "scale_exp": 0, "unit": "x", "min": 0, "max": 1}]}).to_string(),
        json!({"signals": [], "extra": 1}).to_string(),
    ] {
        assert!(Schema::parse(&bad).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn ids_versions_modes_and_restarts() {
    let store = Store::memory();
    let r = Registry::open(store.clone()).await.unwrap();
    // First start: the SDK's signal table is fleetline.readings v1, id 1 (the wire's SCHEMA_V1).
    let v = r.version(READINGS_SUBJECT, None).unwrap();
    assert_eq!((v.version, v.id), (1, u32::from(fleetline_wire::SCHEMA_V1)));
    assert_eq!(Schema::parse(&v.schema).unwrap(), Schema::signal_table());
    // Adding a kind is backward compatible (the default mode).
    let mut table: Value = serde_json::from_str(&v.schema).unwrap();
    table["signals"].as_array_mut().unwrap().push(sig(200, "Vehicle.Cabin.Temperature", "celsius", -40.0, 90.0));
    let v2 = r.register(READINGS_SUBJECT, &table.to_string()).await.unwrap();
    assert_eq!((v2.version, v2.id), (2, 2));
    // The same schema again: the same version, no new id.
    assert_eq!(r.register(READINGS_SUBJECT, &table.to_string()).await.unwrap().version, 2);
    // An earlier version again is that version (as Confluent answers)…
    assert_eq!(r.register(READINGS_SUBJECT, &v.schema).await.unwrap().version, 1);
    // …but removing a kind is not backward compatible.
    let mut fewer = table.clone();
    fewer["signals"].as_array_mut().unwrap().retain(|s| s["kind"] != 3);
    let err = r.register(READINGS_SUBJECT, &fewer.to_string()).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Incompatible(m) if m[0].contains("kind 3")), "{err}");
    // …and the same text under another subject reuses its id.
    assert_eq!(r.register("other", &v.schema).await.unwrap().id, 1);
    r.set_compatibility(Some("other"), Compatibility::None).await.unwrap();
    assert_eq!(r.compatibility(Some("other")), Compatibility::None);
    assert_eq!(r.compatibility(None), Compatibility::Backward);
    // Everything survives a restart.
    let again = Registry::open(store).await.unwrap();
    assert_eq!(again.subjects(), vec!["fleetline.readings".to_string(), "other".to_string()]);
    assert_eq!(again.versions(READINGS_SUBJECT), Some(vec![1, 2]));
    assert_eq!(again.version(READINGS_SUBJECT, None).unwrap().id, 2);
    assert_eq!(again.schema(2).unwrap().signal(200).unwrap().unit, "celsius");
    assert_eq!(again.compatibility(Some("other")), Compatibility::None);
}

/// (status, JSON body or null).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    http_auth(addr, method, path, body, token.map(|t| format!("Bearer {t}"))).await
}

/// With the whole `Authorization` value.
async fn http_auth(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    authorization: Option<String>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let r =
        fleetline_testkit::http::request_with_auth(addr, method, path, authorization.as_deref(), body.as_deref()).await;
    (r.status, serde_json::from_str(&r.body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_rest_api_is_shaped_like_confluents() {
    let store = Store::memory();
    let models =
        Arc::new(fleetline_cloud::inference::ModelRegistry::open(store.clone(), Arc::default()).await.unwrap());
    let ops = crate::test_ops(store, models).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(fleetline_cloud::http::serve(listener, ops));
    let t = Some("tok");
    assert_eq!(http(addr, "GET", "/subjects", None, None).await, (200, json!(["fleetline.readings"])));
    assert_eq!(http(addr, "GET", "/subjects/fleetline.readings/versions", None, None).await, (200, json!([1])));
    let (c, latest) = http(addr, "GET", "/subjects/fleetline.readings/versions/latest", None, None).await;
    assert_eq!((c, latest["id"].clone(), latest["version"].clone()), (200, json!(1), json!(1)));
    let (c, by_id) = http(addr, "GET", "/schemas/ids/1", None, None).await;
    assert_eq!((c, by_id["schema"].clone()), (200, latest["schema"].clone()));
    assert_eq!(http(addr, "GET", "/schemas/ids/99", None, None).await.0, 404);
    assert_eq!(http(addr, "GET", "/subjects/nope/versions", None, None).await.0, 404);
    // Writes need the token.
    let s = json!({"schema": schema(&base())});
    assert_eq!(http(addr, "POST", "/subjects/trucks/versions", Some(s.clone()), None).await.0, 401);
    assert_eq!(
        http(addr, "POST", "/subjects/trucks/versions", Some(s.clone()), t).await,
        (200, json!({"id": 2, "version": 1}))
    );
    // Incompatible: 409, and the compatibility endpoint says why.
    let narrow = json!({"schema": schema(&[sig(3, "Vehicle.Speed", "km/h", 0.0, 100.0), base()[1].clone()])});
    let (c, e) = http(addr, "POST", "/subjects/trucks/versions", Some(narrow.clone()), t).await;
    assert_eq!((c, e["error_code"].clone()), (409, json!(409)));
    let (c, v) = http(addr, "POST", "/compatibility/subjects/trucks/versions/latest", Some(narrow.clone()), None).await;
    assert_eq!((c, v["is_compatible"].clone()), (200, json!(false)));
    assert!(v["messages"][0].as_str().unwrap().contains("range"));
    assert_eq!(http(addr, "POST", "/subjects/trucks/versions", Some(json!({"schema": "{"})), t).await.0, 422);
    // Modes, globally and per subject.
    assert_eq!(http(addr, "GET", "/config", None, None).await, (200, json!({"compatibilityLevel": "BACKWARD"})));
    assert_eq!(http(addr, "PUT", "/config/trucks", Some(json!({"compatibility": "FORWARD"})), None).await.0, 401);
    assert_eq!(
        http(addr, "PUT", "/config/trucks", Some(json!({"compatibility": "FORWARD"})), t).await,
        (200, json!({"compatibility": "FORWARD"}))
    );
    assert_eq!(http(addr, "GET", "/config/trucks", None, None).await.1, json!({"compatibilityLevel": "FORWARD"}));
    assert_eq!(http(addr, "PUT", "/config", Some(json!({"compatibility": "SIDEWAYS"})), t).await.0, 422);
    assert_eq!(
        http(addr, "POST", "/subjects/trucks/versions", Some(narrow), t).await,
        (200, json!({"id": 3, "version": 2}))
    );
    // The scheme is case-insensitive; a body over the limit is 413, not 422.
    let lower = Some("bearer tok".to_string());
    assert_eq!(http_auth(addr, "PUT", "/config", Some(json!({"compatibility": "NONE"})), lower).await.0, 200);
    let huge = json!({"schema": "x".repeat(3 << 20)});
    assert_eq!(http(addr, "POST", "/subjects/trucks/versions", Some(huge), t).await.0, 413);
    // Vehicle data needs a token: the read token or the admin one (then 421 here:
    // this node owns no shard, which proves the token passed).
    assert_eq!(http(addr, "GET", "/vehicles/acme/v-1", None, None).await.0, 401);
    assert_eq!(http(addr, "GET", "/vehicles/acme/v-1", None, Some("wrong")).await.0, 401);
    assert_eq!(http(addr, "GET", "/vehicles/acme/v-1", None, Some("read-only")).await.0, 421);
    assert_eq!(http(addr, "GET", "/vehicles/acme/v-1", None, t).await.0, 421);
    // The read token does not write.
    let s2 = json!({"schema": schema(&base())});
    assert_eq!(http(addr, "POST", "/subjects/other/versions", Some(s2), Some("read-only")).await.0, 401);
    server.abort();
}

/// Two nodes' registries over one store (a local directory, where the swap is an
/// OS lock): registrations racing from both never share an id, and each node sees
/// the other's after a refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_registering_at_once_never_reuse_an_id() {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        fleetline_cloud::lake::store::StorageConfig { url: dir.path().display().to_string(), ..Default::default() };
    let open = || fleetline_cloud::lake::store::StoreSpec::parse(&cfg).unwrap().open(&cfg).unwrap();
    let (a, b) = tokio::join!(Registry::open(open()), Registry::open(open()));
    let (a, b) = (Arc::new(a.unwrap()), Arc::new(b.unwrap()));
    // Both started on an empty store: one wrote the readings schema, the other took it.
    assert_eq!(a.version(READINGS_SUBJECT, None).unwrap().id, 1);
    assert_eq!(b.version(READINGS_SUBJECT, None).unwrap().id, 1);
    let mut tasks = Vec::new();
    for (n, reg) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..12u16 {
                let text = schema(&[sig(1000 + i * 2 + n as u16, &format!("Vehicle.Node{n}.S{i}"), "km/h", 0.0, 1.0)]);
                let v = reg.register(&format!("node{n}.s{i}"), &text).await.unwrap();
                ids.push(v.id);
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: std::collections::BTreeSet<u32> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "an id was handed out twice: {all:?}");
    a.refresh().await.unwrap();
    b.refresh().await.unwrap();
    for reg in [&a, &b] {
        assert_eq!(reg.subjects().len(), 25, "each node sees every subject");
        for id in &all {
            assert!(reg.schema(*id).is_some(), "schema {id} known");
        }
    }
    // A third node opening now sees everything too.
    assert_eq!(Registry::open(open()).await.unwrap().subjects().len(), 25);
}
