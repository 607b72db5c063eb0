//! Against kube's mocked service (`tower-test`): the API calls as they go over
//! the wire, answered by hand.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use super::*;
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn client() -> (kube::Client, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "fleet"), handle)
}

async fn next(handle: &mut Handle) -> (Request<Body>, mock::SendResponse<Response<Body>>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the client called the API in time")
        .expect("the client is alive");
    let (group, resource, verb) = rbac_rule_of(&req);
    assert!(
        granted(&group, &resource, &verb),
        "{} {} needs `{group} {resource} {verb}`, which rbac.txt (and the chart's Role) does not grant",
        req.method(),
        req.uri()
    );
    (req, send)
}

/// The RBAC rule a request needs: (apiGroup, resource, verb), `core` for the core group.
fn rbac_rule_of(req: &Request<Body>) -> (String, String, String) {
    let parts: Vec<&str> = req.uri().path().trim_start_matches('/').split('/').collect();
    // /api/v1/namespaces/{ns}/{resource}[/{name}]
    // /apis/{group}/{version}/namespaces/{ns}/{resource}[/{name}]
    let (group, rest) = match parts.as_slice() {
        ["api", _v, rest @ ..] => ("core".to_string(), rest),
        ["apis", g, _v, rest @ ..] => (g.to_string(), rest),
        _ => panic!("unexpected API path {}", req.uri()),
    };
    let (resource, named) = match rest {
        ["namespaces", _ns, resource] => (resource.to_string(), false),
        ["namespaces", _ns, resource, _name] => (resource.to_string(), true),
        _ => panic!("a cluster-scoped or unexpected path {} (the node is namespaced)", req.uri()),
    };
    let query = req.uri().query().unwrap_or_default();
    let verb = match (req.method().as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if query.split('&').any(|kv| kv == "watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (m, _) => panic!("unexpected {m} {}", req.uri()),
    };
    (group, resource, verb.to_string())
}

/// Whether rbac.txt lists the rule.
fn granted(group: &str, resource: &str, verb: &str) -> bool {
    include_str!("rbac.txt").lines().filter(|l| !l.trim_start().starts_with('#')).any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some(group) && w.next() == Some(resource) && w.any(|v| v == verb)
    })
}

#[test]
fn the_rbac_list_is_read_as_the_chart_reads_it() {
    assert!(granted("core", "pods", "watch"));
    assert!(granted("coordination.k8s.io", "leases", "update"));
    assert!(!granted("coordination.k8s.io", "leases", "delete"));
    assert!(!granted("core", "secrets", "get"));
}

fn reply(status: u16, v: &Value) -> Response<Body> {
    Response::builder().status(status).body(Body::from(serde_json::to_vec(v).unwrap())).unwrap()
}

fn failure(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

async fn body(req: Request<Body>) -> Value {
    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap()
}

fn cfg() -> KubernetesConfig {
    KubernetesConfig { selector: "app=fleetline".into(), ..Default::default() }
}

fn pod(name: &str, ip: &str, ready: bool, roles: Option<&str>, rv: &str) -> Value {
    let mut labels = json!({"app": "fleetline", "app.kubernetes.io/version": "1.2.0"});
    if let Some(r) = roles {
        labels["fleetline.io/roles"] = json!(r);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "fleet", "resourceVersion": rv, "labels": labels},
           "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

fn ids(v: &View) -> Vec<&str> {
    v.members().iter().map(|m| m.id.as_str()).collect()
}

async fn changed(rx: &mut watch::Receiver<View>) -> View {
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.expect("a new member set").unwrap();
    rx.borrow_and_update().clone()
}

#[test]
fn a_member_is_a_ready_pod_with_an_ip() {
    let c = cfg();
    let p: Pod = serde_json::from_value(pod("cloud-0", "10.0.0.7", true, Some("ingest.jobs"), "1")).unwrap();
    let m = member_of(&p, &c).unwrap();
    assert_eq!((m.id.as_str(), m.http.as_str(), m.version.as_str()), ("cloud-0", "10.0.0.7:9580", "1.2.0"));
    assert!(m.has(Role::Ingest) && m.has(Role::Jobs) && !m.has(Role::Api));
    let all: Pod = serde_json::from_value(pod("cloud-1", "fd00::1", true, None, "1")).unwrap();
    let m = member_of(&all, &c).unwrap();
    assert_eq!((m.roles.len(), m.http.as_str()), (4, "[fd00::1]:9580"));
    let unready: Pod = serde_json::from_value(pod("cloud-2", "10.0.0.8", false, None, "1")).unwrap();
    assert!(member_of(&unready, &c).is_none());
    let no_ip: Pod = serde_json::from_value(pod("cloud-3", "", true, None, "1")).unwrap();
    assert!(member_of(&no_ip, &c).is_none());
    let mut going: Pod = serde_json::from_value(pod("cloud-4", "10.0.0.9", true, None, "1")).unwrap();
    going.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()));
    assert!(member_of(&going, &c).is_none(), "a terminating pod is leaving");
}

/// Listed, then watched: a pod turning unready leaves, a new Ready pod joins; the
/// watch stream ends and is resumed from the last resourceVersion; a deletion.
#[tokio::test]
async fn pods_are_listed_watched_and_the_watch_resumes_after_a_break() {
    let (client, mut handle) = client();
    let (tx, mut rx) = watch::channel(View::default());
    let (_leaving_tx, leaving) = watch::channel(false);
    let task = tokio::spawn(pods(Api::namespaced(client, "fleet"), cfg(), "cloud-0".into(), leaving, tx));

    let (req, send) = next(&mut handle).await;
    let q = req.uri().query().unwrap_or_default().to_string();
    assert_eq!(req.uri().path(), "/api/v1/namespaces/fleet/pods");
    assert!(q.contains("labelSelector=app%3Dfleetline") && !q.contains("watch=true"), "a list first: {q}");
    send.send_response(reply(
        200,
        &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"},
                "items": [pod("cloud-0", "10.0.0.1", true, None, "8"), pod("cloud-1", "10.0.0.2", true, None, "9")]}),
    ));
    assert_eq!(ids(&changed(&mut rx).await), ["cloud-0", "cloud-1"]);

    let (req, send) = next(&mut handle).await;
    let q = req.uri().query().unwrap_or_default().to_string();
    assert!(q.contains("watch=true") && q.contains("resourceVersion=10"), "then a watch from the list: {q}");
    let lines = [
        json!({"type": "MODIFIED", "object": pod("cloud-1", "10.0.0.2", false, None, "11")}),
        json!({"type": "ADDED", "object": pod("cloud-2", "10.0.0.3", true, Some("ingest"), "12")}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    // The body ends after these: the watch stream breaks.
    send.send_response(Response::new(Body::from(text.into_bytes())));
    let mut view = changed(&mut rx).await;
    if ids(&view) == ["cloud-0"] {
        view = changed(&mut rx).await;
    }
    assert_eq!(ids(&view), ["cloud-0", "cloud-2"], "cloud-1 unready left, cloud-2 joined");

    let (req, send) = next(&mut handle).await;
    let q = req.uri().query().unwrap_or_default().to_string();
    assert!(q.contains("watch=true") && q.contains("resourceVersion=12"), "resumed where it broke: {q}");
    let gone = json!({"type": "DELETED", "object": pod("cloud-0", "10.0.0.1", true, None, "13")});
    send.send_response(Response::new(Body::from(format!("{gone}\n").into_bytes())));
    assert_eq!(ids(&changed(&mut rx).await), ["cloud-2"]);
    task.abort();
}

fn lease(holder: Option<&str>, renewed_secs_ago: i64, transitions: i32, rv: &str) -> Value {
    let renewed = Timestamp::from_second(Timestamp::now().as_second() - renewed_secs_ago).unwrap();
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "fleetline-shard-003", "namespace": "fleet", "resourceVersion": rv},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": transitions,
                    "renewTime": MicroTime(renewed)}})
}

fn leases(client: kube::Client, holder: &str) -> Leases {
    Leases::new(Api::namespaced(client, "fleet"), holder, &cfg())
}

#[tokio::test]
async fn a_stale_taker_gets_409_and_does_not_hold_the_lease() {
    let (client, mut handle) = client();
    let l = leases(client, "cloud-1");
    let call = tokio::spawn(async move { l.acquire("fleetline-shard-003", 0).await });
    let (req, send) = next(&mut handle).await;
    assert_eq!(
        (req.method().as_str(), req.uri().path()),
        ("GET", "/apis/coordination.k8s.io/v1/namespaces/fleet/leases/fleetline-shard-003")
    );
    // Released by its last holder: free to take.
    send.send_response(reply(200, &lease(None, 100, 4, "41")));
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method().as_str(), "PUT");
    let sent = body(req).await;
    assert_eq!(sent["metadata"]["resourceVersion"], "41", "taken with the version read");
    assert_eq!(
        (sent["spec"]["holderIdentity"].as_str(), sent["spec"]["leaseTransitions"].as_i64()),
        (Some("cloud-1"), Some(5))
    );
    // Another node took it in between.
    send.send_response(reply(409, &failure(409, "Conflict")));
    assert!(matches!(call.await.unwrap(), Err(LeaseError::Conflict { .. })));
}

#[tokio::test]
async fn a_missing_lease_is_created_and_a_race_on_creation_is_a_conflict() {
    let (client, mut handle) = client();
    let l = leases(client, "cloud-1");
    let l2 = l.clone();
    let call = tokio::spawn(async move { l2.acquire("fleetline-shard-003", 7).await });
    let (_, send) = next(&mut handle).await;
    send.send_response(reply(404, &failure(404, "NotFound")));
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method().as_str(), "POST");
    let sent = body(req).await;
    assert_eq!(sent["spec"]["leaseTransitions"], 7, "the epoch never goes below the head's");
    send.send_response(reply(201, &sent));
    assert_eq!(call.await.unwrap().unwrap(), 7);

    let call = tokio::spawn(async move { l.acquire("fleetline-shard-003", 0).await });
    let (_, send) = next(&mut handle).await;
    send.send_response(reply(404, &failure(404, "NotFound")));
    let (_, send) = next(&mut handle).await;
    send.send_response(reply(409, &failure(409, "AlreadyExists")));
    assert!(matches!(call.await.unwrap(), Err(LeaseError::Conflict { .. })));
}

#[tokio::test]
async fn a_live_holder_keeps_its_lease_and_an_expired_one_is_taken_with_a_new_epoch() {
    let (client, mut handle) = client();
    let l = leases(client, "cloud-1");
    let l2 = l.clone();
    let call = tokio::spawn(async move { l2.acquire("fleetline-shard-003", 0).await });
    let (_, send) = next(&mut handle).await;
    send.send_response(reply(200, &lease(Some("cloud-0"), 2, 4, "50")));
    match call.await.unwrap() {
        Err(LeaseError::Held { by, .. }) => assert_eq!(by, "cloud-0"),
        other => panic!("{other:?}"),
    }
    let call = tokio::spawn(async move { l.acquire("fleetline-shard-003", 0).await });
    let (_, send) = next(&mut handle).await;
    // Not renewed for a minute, 15 s lease: its holder is gone.
    send.send_response(reply(200, &lease(Some("cloud-0"), 60, 4, "51")));
    let (req, send) = next(&mut handle).await;
    let sent = body(req).await;
    assert_eq!(
        (sent["spec"]["holderIdentity"].as_str(), sent["spec"]["leaseTransitions"].as_i64()),
        (Some("cloud-1"), Some(5))
    );
    send.send_response(reply(200, &sent));
    assert_eq!(call.await.unwrap().unwrap(), 5);
}

#[tokio::test]
async fn a_lease_lost_while_renewing_is_reported_lost() {
    let (client, mut handle) = client();
    let l = leases(client, "cloud-1");
    let l2 = l.clone();
    // Held here: the renewal goes through with the version read.
    let call = tokio::spawn(async move { l2.renew("fleetline-shard-003").await });
    let (_, send) = next(&mut handle).await;
    send.send_response(reply(200, &lease(Some("cloud-1"), 3, 5, "60")));
    let (req, send) = next(&mut handle).await;
    let sent = body(req).await;
    assert_eq!(sent["metadata"]["resourceVersion"], "60");
    send.send_response(reply(200, &sent));
    call.await.unwrap().unwrap();
    // Taken over (this node was cut off past the lease): lost.
    let l2 = l.clone();
    let call = tokio::spawn(async move { l2.renew("fleetline-shard-003").await });
    let (_, send) = next(&mut handle).await;
    send.send_response(reply(200, &lease(Some("cloud-2"), 1, 6, "61")));
    match call.await.unwrap() {
        Err(LeaseError::Lost { by, .. }) => assert_eq!(by, "cloud-2"),
        other => panic!("{other:?}"),
    }
    // Changed between the read and the write: lost too.
    let call = tokio::spawn(async move { l.renew("fleetline-shard-003").await });
    let (_, send) = next(&mut handle).await;
    send.send_response(reply(200, &lease(Some("cloud-1"), 3, 6, "62")));
    let (_, send) = next(&mut handle).await;
    send.send_response(reply(409, &failure(409, "Conflict")));
    assert!(matches!(call.await.unwrap(), Err(LeaseError::Lost { .. })));
}
