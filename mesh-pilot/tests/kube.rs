//! The Kubernetes adapter against kube-rs's own mock service (`tower_test::mock`, what kube's
//! tests use): no API server can run on this machine, so the mock answers the watchers' list and
//! watch requests with objects built here with k8s-openapi's types (and Istio's as JSON), and the
//! whole mesh-pilot serves them. What this proves: the watch glue (lists, watch events, sync
//! gating, a CRD that is not installed) and the translation of objects as the API server sends
//! them. What it does not: a real API server's behaviour (see README).

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Pod, PodStatus, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::client::Body;
use mesh_lab::wait_until_async;
use mesh_pilot::{
    adapter::kube::Source,
    app::{self, Config, Platform},
    translate::Options,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("default".into()),
        resource_version: Some("10".into()),
        labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

fn service() -> Service {
    Service {
        metadata: meta("reviews", &[("app", "reviews")]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.200.100.1".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 9080,
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            selector: Some(BTreeMap::from([("app".into(), "reviews".into())])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn endpoint(ip: &str, pod: &str, ready: bool) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        conditions: Some(EndpointConditions { ready: Some(ready), serving: Some(ready), terminating: Some(!ready) }),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            name: Some(pod.into()),
            namespace: Some("default".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice() -> EndpointSlice {
    EndpointSlice {
        metadata: meta("reviews-abc", &[("kubernetes.io/service-name", "reviews")]),
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort { name: Some("http".into()), port: Some(9080), ..Default::default() }]),
        endpoints: vec![
            endpoint("10.200.1.11", "reviews-v1", true),
            endpoint("10.200.1.13", "reviews-v3", true),
            // Terminating: known, not served.
            endpoint("10.200.1.19", "reviews-v1-old", false),
        ],
    }
}

fn pod(name: &str, version: &str, ip: &str) -> Pod {
    Pod {
        metadata: meta(name, &[("app", "reviews"), ("version", version)]),
        status: Some(PodStatus { pod_ip: Some(ip.into()), phase: Some("Running".into()), ..Default::default() }),
        ..Default::default()
    }
}

fn istio(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": kind,
           "metadata": {"name": name, "namespace": "default", "resourceVersion": "10"}, "spec": spec})
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": "10"}, "items": items})
}

/// What the mock API server holds: the list answer per path; `None` answers 404 (no such CRD).
fn lists() -> BTreeMap<&'static str, Option<Value>> {
    BTreeMap::from([
        ("/api/v1/services", Some(list("Service", vec![j(&service())]))),
        ("/apis/discovery.k8s.io/v1/endpointslices", Some(list("EndpointSlice", vec![j(&slice())]))),
        // reviews-v3's Pod has not arrived: its endpoint is held back.
        ("/api/v1/pods", Some(list("Pod", vec![j(&pod("reviews-v1", "v1", "10.200.1.11"))]))),
        (
            "/apis/networking.istio.io/v1/virtualservices",
            Some(list(
                "VirtualService",
                vec![istio(
                    "VirtualService",
                    "reviews",
                    json!({"hosts": ["reviews"], "http": [{"route": [
                        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                        {"destination": {"host": "reviews", "subset": "v3"}, "weight": 50}]}]}),
                )],
            )),
        ),
        (
            "/apis/networking.istio.io/v1/destinationrules",
            Some(list(
                "DestinationRule",
                vec![istio(
                    "DestinationRule",
                    "reviews",
                    json!({"host": "reviews", "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}}, {"name": "v3", "labels": {"version": "v3"}}]}),
                )],
            )),
        ),
        ("/apis/networking.istio.io/v1/serviceentries", Some(list("ServiceEntry", vec![]))),
        ("/apis/networking.istio.io/v1/workloadentries", Some(list("WorkloadEntry", vec![]))),
        ("/apis/networking.istio.io/v1/sidecars", Some(list("Sidecar", vec![]))),
        // Our CRD is not installed in this cluster.
        ("/apis/policy.mesh-init.io/v1alpha1/localratelimits", None),
    ])
}

fn j<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

/// Commands to the mock: hold a path's list until released; send watch events on a path.
enum Cmd {
    Release(&'static str),
    Event(&'static str, Value),
}

/// Serves the watchers' requests: lists (held for paths in `hold` until released), watches
/// (answered when the test sends events for that path, then the watcher asks again).
async fn mock_api(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    mut hold: Vec<&'static str>,
) {
    let lists = lists();
    let mut held: Vec<(&'static str, tower_test::mock::SendResponse<Response<Body>>)> = Vec::new();
    let mut watches: BTreeMap<&'static str, Vec<tower_test::mock::SendResponse<Response<Body>>>> = BTreeMap::new();
    // Events for a path whose watch request has not arrived yet.
    let mut queued: Vec<(&'static str, Value)> = Vec::new();
    let respond = |send: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: Vec<u8>| {
        send.send_response(Response::builder().status(status).body(Body::from(body)).unwrap());
    };
    let answer_list = |path: &str, send| {
        match &lists[path] {
        Some(v) => respond(send, 200, serde_json::to_vec(v).unwrap()),
        None => respond(send, 404, serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"})).unwrap()),
    }
    };
    loop {
        tokio::select! {
            req = handle.next_request() => {
                let Some((req, send)) = req else { return };
                let path = *lists.keys().find(|p| **p == req.uri().path()).unwrap_or_else(|| panic!("unexpected request {}", req.uri()));
                if req.uri().query().unwrap_or_default().contains("watch=true") {
                    match queued.iter().position(|(p, _)| *p == path) {
                        Some(i) => respond(send, 200, event_line(&queued.remove(i).1)),
                        None => watches.entry(path).or_default().push(send),
                    }
                } else if hold.contains(&path) {
                    held.push((path, send));
                } else {
                    answer_list(path, send);
                }
            }
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Release(path)) => {
                    hold.retain(|p| *p != path);
                    for (_, send) in held.extract_if(.., |(p, _)| *p == path) {
                        answer_list(path, send);
                    }
                }
                Some(Cmd::Event(path, event)) => match watches.get_mut(path).and_then(Vec::pop) {
                    Some(send) => respond(send, 200, event_line(&event)),
                    None => queued.push((path, event)),
                },
                None => return,
            }
        }
    }
}

/// A watch answer: one event, then the end of the body (the watcher then watches again).
fn event_line(event: &Value) -> Vec<u8> {
    let mut body = serde_json::to_vec(event).unwrap();
    body.push(b'\n');
    body
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path).header("host", addr.to_string()).body(Empty::<Bytes>::new()).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn addresses(eps: &Value, cluster: &str) -> Vec<String> {
    eps["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cluster"] == cluster)
        .map(|r| r["addresses"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_sync_then_serve_and_follow_events() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    // The EndpointSlice list is held: until it is answered, nothing may be served.
    tokio::spawn(mock_api(handle, cmd_rx, vec!["/apis/discovery.k8s.io/v1/endpointslices"]));
    let cfg = Config {
        platform: Platform::Kubernetes {
            source: Source::Client(client),
            istio_version: "v1".into(),
            resync: Duration::from_secs(300),
        },
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        translate: Options::default(),
    };
    let pilot = app::start(cfg).await.unwrap();
    let d = pilot.discovery;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(d, "/ns/default/v1/routes").await.0, 503, "served before every watcher listed");

    cmd_tx.send(Cmd::Release("/apis/discovery.k8s.io/v1/endpointslices")).unwrap();
    let routes = wait_until_async(Duration::from_secs(10), "mesh-pilot to sync", || async {
        let (s, v) = get(d, "/ns/default/v1/routes").await;
        (s == 200).then_some(v)
    })
    .await;
    let r = &routes["resources"][0];
    assert_eq!(r["name"], "reviews.default.svc.cluster.local:9080");
    assert_eq!(r["protocol"], "http");
    assert_eq!(
        r["rules"][0]["clusters"],
        json!([
        {"name": "outbound|9080|v1|reviews.default.svc.cluster.local", "weight": 50},
        {"name": "outbound|9080|v3|reviews.default.svc.cluster.local", "weight": 50}])
    );
    let (_, eps) = get(d, "/ns/default/v1/endpoints").await;
    // v1 served; v3's Pod not seen yet (held back); the terminating endpoint never.
    assert_eq!(addresses(&eps, "outbound|9080||reviews.default.svc.cluster.local"), ["10.200.1.11:9080"]);
    assert!(addresses(&eps, "outbound|9080|v3|reviews.default.svc.cluster.local").is_empty());
    let (_, endpointz) = get(pilot.admin, "/debug/endpointz").await;
    assert_eq!(endpointz["held_back"][0]["address"], "10.200.1.13");

    // The Pod arrives by a watch event: the held-back endpoint is served, with its labels.
    cmd_tx
        .send(Cmd::Event(
            "/api/v1/pods",
            json!({"type": "ADDED", "object": j(&pod("reviews-v3", "v3", "10.200.1.13"))}),
        ))
        .unwrap();
    wait_until_async(Duration::from_secs(5), "reviews v3 to get its endpoint", || async {
        let (_, eps) = get(d, "/ns/default/v1/endpoints").await;
        (addresses(&eps, "outbound|9080|v3|reviews.default.svc.cluster.local") == ["10.200.1.13:9080"]).then_some(())
    })
    .await;

    // The VirtualService is deleted: Istio's default route.
    let vs = istio("VirtualService", "reviews", json!({"hosts": ["reviews"]}));
    cmd_tx
        .send(Cmd::Event("/apis/networking.istio.io/v1/virtualservices", json!({"type": "DELETED", "object": vs})))
        .unwrap();
    wait_until_async(Duration::from_secs(5), "the default route", || async {
        let (_, routes) = get(d, "/ns/default/v1/routes").await;
        let c = routes["resources"][0]["rules"][0]["clusters"].clone();
        (c == json!([{"name": "outbound|9080||reviews.default.svc.cluster.local", "weight": 100}])).then_some(())
    })
    .await;
}
