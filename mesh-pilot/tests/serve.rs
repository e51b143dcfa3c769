//! mesh-pilot serving, in-process on loopback: the files adapter on a directory the test edits,
//! the discovery API as a proxy uses it (ETag, long poll, pinned snapshots, endpoint deltas),
//! status reports and the admin API.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_lab::{wait_until_async, write_atomic, TempDir};
use mesh_pilot::{
    app::{self, Bound, Config, Platform},
    translate::Options,
};
use serde_json::Value;

const BOOKINFO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/bookinfo");

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> String {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer { status, headers, body }
}

fn copy(from: &str, dir: &Path) {
    let name = Path::new(from).file_name().unwrap();
    std::fs::copy(Path::new(BOOKINFO).join(from), dir.join(name)).unwrap();
}

async fn start(dir: &TempDir) -> Bound {
    let cfg = Config {
        platform: Platform::Files(dir.path().to_path_buf()),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        translate: Options { listener: None, ..Options::default() },
    };
    let pilot = app::start(cfg).await.unwrap();
    // The first build follows the first read of the directory; until then discovery answers 503.
    let admin = pilot.admin;
    wait_until_async(Duration::from_secs(5), "mesh-pilot ready", || async {
        (get(admin, "/ready", &[]).await.status == 200).then_some(())
    })
    .await;
    pilot
}

const RATINGS_V2_POD: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: ratings-v2-0, namespace: default, labels: {app: ratings, version: v2}}
spec: {containers: [{name: ratings, image: ratings:v2}]}
status: {phase: Running, podIP: 10.200.1.22}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_long_poll_pinned_snapshots_and_endpoint_deltas() {
    let dir = TempDir::new("pilot");
    copy("platform.yaml", dir.path());
    copy("rules/destination-rule-all.yaml", dir.path());
    let pilot = start(&dir).await;
    let d = pilot.discovery;

    // One poll: four answers of one snapshot; nothing unchanged is sent twice.
    let eps = get(d, "/ns/default/v1/endpoints", &[]).await;
    assert_eq!(eps.status, 200);
    let snapshot = eps.header("x-mesh-snapshot");
    let etag = eps.header("etag");
    let routes = get(d, "/ns/default/v1/routes", &[("x-mesh-snapshot", &snapshot)]).await;
    assert_eq!(routes.status, 200);
    assert_eq!(routes.header("x-mesh-snapshot"), snapshot);
    assert_eq!(routes.json()["resources"].as_array().unwrap().len(), 4);
    assert_eq!(get(d, "/ns/default/v1/listeners", &[]).await.json()["resources"], Value::Array(vec![]));
    assert_eq!(get(d, "/ns/default/v1/endpoints", &[("if-none-match", &etag)]).await.status, 304);

    // A long poll is answered as soon as an endpoint appears, with only what changed.
    let waiter = tokio::spawn(async move {
        let h = [
            ("if-none-match", etag.as_str()),
            ("x-mesh-snapshot", &snapshot),
            ("prefer", "wait=30"),
            ("x-mesh-delta", "1"),
        ];
        get(d, "/ns/default/v1/endpoints", &h).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the long poll returned without a change");
    dir.write("ratings-v2.yaml", RATINGS_V2_POD);
    let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("long poll woken").unwrap();
    assert_eq!(woke.status, 200);
    assert!(!woke.header("x-mesh-delta").is_empty());
    let changed: Vec<String> = woke.json()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cluster"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        changed,
        ["outbound|9080|v2|ratings.default.svc.cluster.local", "outbound|9080||ratings.default.svc.cluster.local"]
    );
    // The rest of that poll, pinned to the new snapshot: config did not move.
    let new_snapshot = woke.header("x-mesh-snapshot");
    let r2 = get(
        d,
        "/ns/default/v1/routes",
        &[("x-mesh-snapshot", &new_snapshot), ("if-none-match", &routes.header("etag"))],
    )
    .await;
    assert_eq!(r2.status, 304);

    // An unknown snapshot cannot be pinned.
    assert_eq!(get(d, "/ns/default/v1/routes", &[("x-mesh-snapshot", "gone")]).await.status, 409);

    // A config change (a new VirtualService) moves routes, after the debounce.
    dir.write(
        "vs.yaml",
        &std::fs::read_to_string(Path::new(BOOKINFO).join("rules/virtual-service-reviews-50-v3.yaml")).unwrap(),
    );
    let etag = routes.header("etag");
    let routes = wait_until_async(Duration::from_secs(5), "routes to change", || async {
        let r = get(d, "/ns/default/v1/routes", &[("if-none-match", &etag)]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert!(String::from_utf8_lossy(&routes.body).contains("outbound|9080|v3|reviews.default.svc.cluster.local"));

    // An empty endpoint set is served as empty.
    std::fs::remove_file(dir.path().join("ratings-v2.yaml")).unwrap();
    let empty = wait_until_async(Duration::from_secs(5), "ratings v2 to lose its endpoint", || async {
        let e = get(d, "/ns/default/v1/endpoints", &[]).await.json();
        let v2 = e["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["cluster"] == "outbound|9080|v2|ratings.default.svc.cluster.local")
            .cloned();
        v2.filter(|r| r["addresses"].as_array().unwrap().is_empty())
    })
    .await;
    assert_eq!(empty["addresses"], Value::Array(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_proxies_and_the_admin_api() {
    let dir = TempDir::new("pilot");
    copy("platform.yaml", dir.path());
    copy("rules/destination-rule-all.yaml", dir.path());
    dir.write("bad.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v9}\n");
    let pilot = start(&dir).await;
    let d = pilot.discovery;

    // A proxy polls all four, applies three... and reports it rejected the routes.
    let mut versions = Vec::new();
    for t in ["listeners", "routes", "clusters", "endpoints"] {
        let a = get(d, &format!("/ns/default/v1/{t}"), &[("x-mesh-node", "productpage-v1.default")]).await;
        versions.push(a.header("etag").trim_matches('"').to_string());
    }
    let applied = format!("{} - {} {}", versions[0], versions[2], versions[3]);
    let rejected = versions.join(" ");
    let h = [
        ("x-mesh-node", "productpage-v1.default"),
        ("x-mesh-applied", applied.as_str()),
        ("x-mesh-rejected", rejected.as_str()),
        ("x-mesh-error", "routes[3].rules[0].timeout: invalid duration"),
        ("if-none-match", &versions[3]),
    ];
    assert_eq!(get(d, "/ns/default/v1/endpoints", &h).await.status, 304);
    let syncz = get(pilot.admin, "/debug/syncz", &[]).await.json();
    let statuses: Vec<&str> =
        syncz[0]["types"].as_array().unwrap().iter().map(|t| t["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["SYNCED", "ERROR", "SYNCED", "SYNCED"]);
    assert_eq!(syncz[0]["error"], "routes[3].rules[0].timeout: invalid duration");
    let metrics = String::from_utf8(get(pilot.admin, "/metrics", &[]).await.body.to_vec()).unwrap();
    assert!(metrics.contains("mesh_pilot_nacks_total{type=\"routes\"} 1"), "{metrics}");
    assert!(metrics.contains("mesh_pilot_proxies_connected 1"), "{metrics}");

    // The analysis names the bad rule with its file and line.
    let findings = String::from_utf8(get(pilot.admin, "/debug/analyze?format=text", &[]).await.body.to_vec()).unwrap();
    let line = findings.lines().find(|l| l.contains("IST0101")).unwrap_or_else(|| panic!("{findings}"));
    assert!(line.contains("bad.yaml:8 spec.http[0].route[0].destination.subset"), "{line}");
    let endpointz = get(pilot.admin, "/debug/endpointz", &[]).await.json();
    assert_eq!(endpointz["endpoints"]["reviews.default.svc.cluster.local"].as_array().unwrap().len(), 3);
    let configz = get(pilot.admin, "/debug/configz", &[]).await.json();
    assert!(configz.as_array().unwrap().iter().any(|o| o["kind"] == "VirtualService" && o["name"] == "reviews"));

    // A file replaced by rename is read once, whole.
    write_atomic(&dir.path().join("bad.yaml"), "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n");
    wait_until_async(Duration::from_secs(5), "the finding to go", || async {
        let f = get(pilot.admin, "/debug/analyze?format=text", &[]).await.body;
        (!String::from_utf8_lossy(&f).contains("IST0101")).then_some(())
    })
    .await;
}
