//! The translation on BookInfo: Kubernetes-format platform objects and Istio-format rules (our own
//! files, written in the format of Istio's samples), through the files adapter's reader, the
//! model and the translator, to what a proxy of a namespace is served. Golden files under
//! `tests/golden/` (`UPDATE_GOLDEN=1` rewrites them; review the diff).

use std::path::{Path, PathBuf};

use mesh_pilot::{
    adapter::files,
    analysis::{Code, Finding},
    model::{Registry, Store},
    translate::{self, Options, ScopeConfig, Translator},
};
use mesh_proxy::config::{Percent, RawConfig, RawEndpoints};

fn testdata(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata").join(p)
}

fn store(paths: &[&str]) -> Store {
    let mut store = Store::default();
    let paths: Vec<PathBuf> = paths.iter().map(|p| testdata(p)).collect();
    store.apply(files::read(&paths).unwrap());
    store
}

/// A store from the platform fixture plus YAML text written in the test.
fn store_with(text: &str) -> Store {
    let dir = mesh_lab::TempDir::new("pilot");
    let rules = dir.write("rules.yaml", text);
    let mut s = store(&["bookinfo/platform.yaml", "bookinfo/rules/destination-rule-all.yaml"]);
    s.apply(files::read(&[rules]).unwrap());
    s
}

/// What a proxy in `ns` receives, as one proxy config (which must validate).
fn scope(store: &Store, ns: &str) -> (ScopeConfig, RawConfig) {
    let opts = Options::default();
    let registry = Registry::build(store, &opts.domain);
    let cfg = Translator::new(store, &registry, &opts).scope(ns);
    let raw = RawConfig {
        listeners: cfg.listeners.clone(),
        routes: cfg.routes.clone(),
        clusters: cfg.clusters.clone(),
        endpoints: cfg
            .clusters
            .iter()
            .zip(&cfg.eds)
            .map(|(c, k)| RawEndpoints {
                cluster: c.name.clone(),
                addresses: k.as_ref().map(|k| translate::endpoints(&registry, k)).unwrap_or_default(),
            })
            .collect(),
        ..Default::default()
    };
    raw.validate().unwrap_or_else(|e| panic!("the proxy refuses the scope's config: {e}"));
    (cfg, raw)
}

fn findings(store: &Store) -> Vec<Finding> {
    let opts = Options::default();
    let registry = Registry::build(store, &opts.domain);
    Translator::new(store, &registry, &opts).analyze()
}

fn golden(name: &str, raw: &RawConfig) {
    let text = serde_yaml::to_string(raw).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(want == text, "{} differs (UPDATE_GOLDEN=1 to rewrite):\n{text}", path.display());
}

fn route<'a>(raw: &'a RawConfig, name: &str) -> &'a mesh_proxy::config::RawRoute {
    raw.routes.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no route {name}"))
}

fn endpoints<'a>(raw: &'a RawConfig, cluster: &str) -> &'a [String] {
    &raw.endpoints.iter().find(|e| e.cluster == cluster).unwrap_or_else(|| panic!("no cluster {cluster}")).addresses
}

const REVIEWS: &str = "reviews.default.svc.cluster.local";

#[test]
fn default_routes_without_virtual_services() {
    let (_, raw) = scope(&store(&["bookinfo/platform.yaml"]), "default");
    let r = route(&raw, &format!("{REVIEWS}:9080"));
    assert_eq!(
        r.destinations,
        [
            "reviews.default.svc.cluster.local:9080",
            "reviews.default.svc:9080",
            "reviews.default:9080",
            "reviews:9080",
            "10.200.100.1:9080"
        ]
    );
    assert_eq!(r.rules.len(), 1);
    assert_eq!(r.rules[0].clusters[0].name, format!("outbound|9080||{REVIEWS}"));
    // Slices joined to their Pods; a named targetPort resolved on the Pod; a Pod not ready is not served.
    assert_eq!(
        endpoints(&raw, &format!("outbound|9080||{REVIEWS}")),
        ["10.200.1.11:9080", "10.200.1.12:9080", "10.200.1.13:9080"]
    );
    assert_eq!(endpoints(&raw, "outbound|9080||details.default.svc.cluster.local"), ["10.200.1.31:9081"]);
    assert!(endpoints(&raw, "outbound|9080||productpage.default.svc.cluster.local").is_empty());
    golden("bookinfo-default.yaml", &raw);
}

#[test]
fn short_names_only_for_the_services_own_namespace() {
    let (_, raw) = scope(&store(&["bookinfo/platform.yaml"]), "shop");
    let r = route(&raw, &format!("{REVIEWS}:9080"));
    assert!(!r.destinations.iter().any(|d| d == "reviews:9080"), "{:?}", r.destinations);
    assert!(r.destinations.iter().any(|d| d == "reviews.default:9080"));
}

#[test]
fn bookinfo_walkthrough_steps() {
    let base = ["bookinfo/platform.yaml", "bookinfo/rules/destination-rule-all.yaml"];
    let step = |file: &str| {
        let mut paths = base.to_vec();
        paths.push(file);
        scope(&store(&paths), "default").1
    };

    let raw = step("bookinfo/rules/virtual-service-all-v1.yaml");
    let r = route(&raw, &format!("{REVIEWS}:9080"));
    assert_eq!(r.rules.len(), 1);
    assert_eq!(r.rules[0].clusters.len(), 1);
    assert_eq!(r.rules[0].clusters[0].name, format!("outbound|9080|v1|{REVIEWS}"));
    assert_eq!(endpoints(&raw, &format!("outbound|9080|v1|{REVIEWS}")), ["10.200.1.11:9080"]);
    assert_eq!(endpoints(&raw, &format!("outbound|9080|v3|{REVIEWS}")), ["10.200.1.13:9080"]);
    golden("bookinfo-all-v1.yaml", &raw);

    let raw = step("bookinfo/rules/virtual-service-reviews-50-v3.yaml");
    let r = route(&raw, &format!("{REVIEWS}:9080"));
    let split: Vec<(String, u32)> = r.rules[0].clusters.iter().map(|c| (c.name.clone(), c.weight)).collect();
    assert_eq!(split, [(format!("outbound|9080|v1|{REVIEWS}"), 50), (format!("outbound|9080|v3|{REVIEWS}"), 50)]);
    golden("bookinfo-reviews-50-v3.yaml", &raw);

    let raw = step("bookinfo/rules/virtual-service-reviews-jason-v2-v3.yaml");
    let r = route(&raw, &format!("{REVIEWS}:9080"));
    assert_eq!(r.rules.len(), 2);
    let m = &r.rules[0].matcher[0];
    assert_eq!(m.headers.get("end-user").and_then(|h| h.exact.as_deref()), Some("jason"));
    assert_eq!(r.rules[0].clusters[0].name, format!("outbound|9080|v2|{REVIEWS}"));
    assert!(r.rules[1].matcher.is_empty());
    assert_eq!(r.rules[1].clusters[0].name, format!("outbound|9080|v3|{REVIEWS}"));
    golden("bookinfo-reviews-jason-v2-v3.yaml", &raw);
}

#[test]
fn the_walkthrough_rules_analyze_clean_except_for_missing_endpoints() {
    let s = store(&[
        "bookinfo/platform.yaml",
        "bookinfo/rules/destination-rule-all.yaml",
        "bookinfo/rules/virtual-service-all-v1.yaml",
    ]);
    let got: Vec<(Code, String, String)> =
        findings(&s).iter().map(|f| (f.code, f.resource.clone(), f.field.clone())).collect();
    assert_eq!(
        got,
        [
            // productpage's only Pod is not ready; no ratings Pod is labelled v2.
            (
                Code::SubsetSelectsNoEndpoints,
                "DestinationRule default/productpage".into(),
                "spec.subsets[0].labels".into()
            ),
            (Code::SubsetSelectsNoEndpoints, "DestinationRule default/ratings".into(), "spec.subsets[1].labels".into()),
        ]
    );
}

fn finding<'a>(fs: &'a [Finding], code: Code, field: &str) -> &'a Finding {
    fs.iter().find(|f| f.code == code && f.field == field).unwrap_or_else(|| {
        panic!("no {code:?} at {field} in:\n{}", fs.iter().map(|f| format!("{f}\n")).collect::<String>())
    })
}

#[test]
fn the_classic_503_trap_an_undefined_subset() {
    let s = store_with(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
        subset: v4
",
    );
    let fs = findings(&s);
    let f = finding(&fs, Code::ReferencedResourceNotFound, "spec.http[0].route[0].destination.subset");
    assert_eq!(f.line, Some(10));
    assert!(f.to_string().starts_with("Error [IST0101] (VirtualService default/reviews) "), "{f}");
    assert!(f.message.contains("reviews+v4"), "{f}");
    // The proxy is given a cluster without endpoints: requests get 503, as with Istio.
    let (_, raw) = scope(&s, "default");
    assert!(endpoints(&raw, &format!("outbound|9080|v4|{REVIEWS}")).is_empty());
}

#[test]
fn weights_conflicts_and_unknown_hosts_are_reported() {
    let s = store_with(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, creationTimestamp: \"2024-01-01T00:00:00Z\"}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 60
    - destination: {host: reviews, subset: v3}
      weight: 30
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-too, creationTimestamp: \"2024-02-01T00:00:00Z\"}
spec:
  hosts: [reviews, nosuch]
  http:
  - route:
    - destination: {host: reviews}
",
    );
    let fs = findings(&s);
    let w = finding(&fs, Code::SchemaValidationError, "spec.http[0].route");
    assert_eq!((w.resource.as_str(), w.line), ("VirtualService default/reviews", Some(7)));
    assert!(w.message.contains("90"), "{w}");
    let c = finding(&fs, Code::ConflictingMeshGatewayVirtualServiceHosts, "spec.hosts[0]");
    assert_eq!(c.resource, "VirtualService default/reviews-too");
    assert!(c.message.contains("the older, default/reviews, applies"), "{c}");
    let h = finding(&fs, Code::ReferencedResourceNotFound, "spec.hosts[1]");
    assert_eq!(h.line, Some(17));
    // The older rule applies; the shares stay proportional (60:30).
    let (_, raw) = scope(&s, "default");
    let weights: Vec<u32> =
        route(&raw, &format!("{REVIEWS}:9080")).rules[0].clusters.iter().map(|c| c.weight).collect();
    assert_eq!(weights, [60, 30]);
}

#[test]
fn fields_the_proxy_cannot_carry_are_reported_never_dropped_silently() {
    let s = store_with(
        "\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - uri: {regex: \"/api/.*\"}
    - uri: {prefix: /api}
      method: {exact: GET}
    - uri: {prefix: /v2}
      headers: {x-canary: {exact: \"1\"}}
    route:
    - destination: {host: reviews, subset: v2}
    retries: {attempts: 3, perTryTimeout: 2s}
    fault:
      abort: {httpStatus: 500, percentage: {value: 10}}
    timeout: 3s
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings-policy}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 1, maxRetries: 3, http2MaxRequests: 0, idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 1}
  subsets:
  - name: pooled
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpCookie: {name: user, ttl: 0s}, minimumRingSize: 1024}
      connectionPool:
        tcp: {tcpKeepalive: {time: 10s}}
        http: {maxRequestsPerConnection: 5, http1MaxPendingRequests: 2}
      outlierDetection: {consecutiveErrors: 2, baseEjectionTime: 1m}
",
    );
    let fs = findings(&s);
    for field in [
        "spec.http[0].retries",
        "spec.http[0].fault",
        "spec.trafficPolicy.connectionPool.tcp",
        "spec.trafficPolicy.outlierDetection",
        "spec.subsets[0].trafficPolicy",
        "spec.trafficPolicy.loadBalancer",
    ] {
        assert!(!fs.iter().any(|f| f.field.starts_with(field)), "{field} is carried: {fs:?}");
    }
    for (field, line) in [
        ("spec.http[0].match[0].uri.regex", 8),
        ("spec.http[0].match[1].method", 10),
        ("spec.trafficPolicy.connectionPool.http.maxRetries", 31),
    ] {
        assert_eq!(finding(&fs, Code::NotCarriedByProxy, field).line, Some(line), "{field}");
    }
    // Only the third match block survives; the timeout and the load balancer are carried.
    let (_, raw) = scope(&s, "default");
    let r = route(&raw, &format!("{REVIEWS}:9080"));
    assert_eq!(r.rules.len(), 2);
    let m = &r.rules[0].matcher[0];
    assert_eq!(
        (m.path_prefix.as_deref(), m.headers.get("x-canary").and_then(|h| h.exact.as_deref())),
        (Some("/v2"), Some("1"))
    );
    assert_eq!(r.rules[0].timeout.as_deref(), Some("3s"));
    let retries = r.rules[0].retries.as_ref().unwrap();
    assert_eq!((retries.attempts, retries.per_try_timeout.as_deref()), (3, Some("2s")));
    assert!(retries.retry_on.is_empty(), "Istio's default conditions, applied by the proxy");
    let abort = r.rules[0].fault.as_ref().and_then(|f| f.abort.as_ref()).unwrap();
    assert_eq!((abort.http_status, abort.percentage), (Some(500), Some(Percent(10.0))));
    // Istio's default retry policy is not emitted for a rule without `retries`.
    assert_eq!(r.rules[1].retries, None);
    let c = raw.clusters.iter().find(|c| c.name == "outbound|9080|v1|ratings.default.svc.cluster.local").unwrap();
    assert_eq!(c.lb_policy, mesh_proxy::config::LbPolicy::LeastRequest);
    assert_eq!(c.connect_timeout.as_deref(), Some("250ms"));
    // The subset's sections replace the rule's whole, as in Istio (its pool sets no maxConnections,
    // connectTimeout or idleTimeout); the deprecated consecutiveErrors = gateway errors.
    let c = raw.clusters.iter().find(|c| c.name == "outbound|9080|pooled|ratings.default.svc.cluster.local").unwrap();
    let cb = c.circuit_breakers.as_ref().unwrap();
    assert_eq!((cb.max_connections, cb.max_pending_requests), (None, Some(2)));
    assert_eq!((c.connect_timeout.as_deref(), c.idle_timeout.as_deref()), (None, None));
    assert_eq!(c.max_requests_per_connection, Some(5));
    assert_eq!(c.tcp_keepalive.as_ref().and_then(|k| k.time.as_deref()), Some("10s"));
    // The subset's consistent hash replaces the rule's LEAST_REQUEST.
    assert_eq!(c.lb_policy, mesh_proxy::config::LbPolicy::RoundRobin);
    let h = c.consistent_hash.as_ref().unwrap();
    assert_eq!(h.http_cookie.as_ref().map(|k| (k.name.as_str(), k.ttl.as_deref())), Some(("user", Some("0s"))));
    assert_eq!(h.ring_hash.as_ref().and_then(|r| r.minimum_ring_size), Some(1024));
    let od = c.outlier_detection.as_ref().unwrap();
    assert_eq!(
        (od.consecutive_5xx_errors, od.consecutive_gateway_errors, od.base_ejection_time.as_deref()),
        (None, Some(2), Some("1m"))
    );
    let top = raw.clusters.iter().find(|c| c.name == "outbound|9080|v1|ratings.default.svc.cluster.local").unwrap();
    assert_eq!(top.outlier_detection.as_ref().and_then(|o| o.consecutive_5xx_errors), Some(1));
    assert_eq!((top.max_requests_per_connection, top.tcp_keepalive.as_ref()), (None, None));
    // Istio's 0 = unlimited is left out; maxRetries is not carried.
    let cb = top.circuit_breakers.as_ref().unwrap();
    assert_eq!(
        (cb.max_connections, cb.max_pending_requests, cb.max_requests, cb.max_retries),
        (Some(1), Some(1), None, None)
    );
    assert_eq!(top.idle_timeout.as_deref(), Some("30s"));
}

#[test]
fn an_empty_endpoint_set_is_served_as_empty() {
    let (cfg, raw) = scope(&store(&["bookinfo/platform.yaml", "bookinfo/rules/destination-rule-all.yaml"]), "default");
    let v2 = "outbound|9080|v2|ratings.default.svc.cluster.local";
    assert!(cfg.clusters.iter().any(|c| c.name == v2));
    assert_eq!(endpoints(&raw, v2), [] as [String; 0]);
}

const RATINGS: &str = "ratings.default.svc.cluster.local";

/// BookInfo's fault-injection steps: jason's requests to ratings are delayed 7s, or aborted with 500.
#[test]
fn bookinfo_fault_injection_for_jason() {
    let base = ["bookinfo/platform.yaml", "bookinfo/rules/destination-rule-all.yaml"];
    for file in [
        "bookinfo/rules/virtual-service-ratings-test-delay.yaml",
        "bookinfo/rules/virtual-service-ratings-test-abort.yaml",
    ] {
        let mut paths = base.to_vec();
        paths.push(file);
        let s = store(&paths);
        let fs = findings(&s);
        assert!(!fs.iter().any(|f| f.code == Code::NotCarriedByProxy), "{file}: {fs:?}");
        let (_, raw) = scope(&s, "default");
        let r = route(&raw, &format!("{RATINGS}:9080"));
        assert_eq!(r.rules.len(), 2, "{file}");
        assert_eq!(r.rules[0].matcher[0].headers.get("end-user").and_then(|h| h.exact.as_deref()), Some("jason"));
        assert_eq!(r.rules[0].clusters[0].name, format!("outbound|9080|v1|{RATINGS}"));
        let fault = r.rules[0].fault.as_ref().unwrap_or_else(|| panic!("{file}: no fault"));
        if file.ends_with("delay.yaml") {
            let d = fault.delay.as_ref().unwrap();
            assert_eq!((d.fixed_delay.as_str(), d.percentage), ("7s", Some(Percent::ALL)));
            assert_eq!(fault.abort, None);
        } else {
            let a = fault.abort.as_ref().unwrap();
            assert_eq!((a.http_status, a.grpc_status.as_deref(), a.percentage), (Some(500), None, Some(Percent::ALL)));
            assert_eq!(fault.delay, None);
        }
        // Everyone else: no fault.
        assert!(r.rules[1].matcher.is_empty());
        assert_eq!(r.rules[1].fault, None);
    }
}

#[test]
fn retries_are_carried_and_unknown_conditions_reported() {
    let s = store_with(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings, subset: v1}
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: \"gateway-error,retriable-headers,503,connect-failure\"}
    fault:
      delay: {percent: 20, fixedDelay: 1s}
      abort: {grpcStatus: UNAVAILABLE}
",
    );
    let fs = findings(&s);
    let f = finding(&fs, Code::NotCarriedByProxy, "spec.http[0].retries.retryOn");
    assert!(f.message.contains("retriable-headers"), "{f}");
    let (_, raw) = scope(&s, "default");
    let rule = &route(&raw, &format!("{RATINGS}:9080")).rules[0];
    let r = rule.retries.as_ref().unwrap();
    assert_eq!((r.attempts, r.per_try_timeout.as_deref()), (4, Some("500ms")));
    assert_eq!(r.retry_on, ["gateway-error", "503", "connect-failure"]);
    let fault = rule.fault.as_ref().unwrap();
    assert_eq!(fault.delay.as_ref().map(|d| d.percentage), Some(Some(Percent(20.0))));
    let a = fault.abort.as_ref().unwrap();
    assert_eq!((a.http_status, a.grpc_status.as_deref(), a.percentage), (None, Some("UNAVAILABLE"), None));
}

#[test]
fn passthrough_clusters_take_no_endpoints() {
    let s = store_with(
        "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details-passthrough}
spec:
  host: details
  trafficPolicy:
    loadBalancer: {simple: PASSTHROUGH}
",
    );
    assert!(!findings(&s).iter().any(|f| f.field.contains("loadBalancer")));
    let (cfg, raw) = scope(&s, "default");
    let name = "outbound|9080||details.default.svc.cluster.local";
    let i = cfg.clusters.iter().position(|c| c.name == name).unwrap();
    assert_eq!(cfg.clusters[i].lb_policy, mesh_proxy::config::LbPolicy::Passthrough);
    assert_eq!(cfg.eds[i], None);
    assert_eq!(endpoints(&raw, name), [] as [String; 0]);
}
