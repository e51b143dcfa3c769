//! The configuration: what the operator writes (YAML or JSON) and the validated form the proxy runs.
//!
//! One file carries two parts:
//! - the [`bootstrap`] (admin, readiness, discovery, drain and idle timeouts): read once at start,
//!   fixed until the process exits;
//! - the [`routing`] (listeners, routes, clusters, endpoints, outbound policy): replaced by a file
//!   reload, section by section by discovery answers, validated against the bootstrap.
//!
//! Input types (`Raw*`) mirror the file one to one and reject unknown fields, so a typo is an
//! error naming the field and its line instead of a silently ignored setting. `validate` turns them
//! into the typed form, where every reference has been checked and every string parsed (by the
//! grammars of [`crate::parse`]); nothing past this module sees a string address or duration.
//! Discovery answers carry the same `Raw*` objects, so both sources go through the same checks.
//! [`load`] reads the file, at start and on every reload alike.

pub mod bootstrap;
pub mod loops;
pub mod policy;
pub mod routing;

use std::{
    fmt,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use bootstrap::{
    AdminMutations, Bootstrap, Discovery, Dns, RawAdmin, RawBootstrap, RawDiscovery, RawDns, RawReadiness, Readiness,
};
pub use policy::*;
pub use routing::{
    Cluster, Destination, HostEntry, LbPolicy, Listener, Match, OutboundPolicy, PathMatch, Protocol, RawCluster,
    RawEndpoints, RawHostEntry, RawListener, RawMatch, RawRoute, RawRouting, RawRule, RawWeightedCluster, Route,
    Routing, Rule, UpstreamProtocol, WeightedCluster, DEFAULT_CONNECT_TIMEOUT,
};

/// A configuration that could not be read, parsed or accepted. Never applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// serde_yaml's message names the field path, the offending key and its line and column.
    #[error("{origin}: {error}")]
    Yaml { origin: String, error: serde_yaml::Error },
    /// serde_json's message carries the line and column.
    #[error("{origin}: {error}")]
    Json { origin: String, error: serde_json::Error },
    /// Nothing but blanks and comments: never a config. A file being written, truncated by
    /// `: > file` or replaced by an empty one would otherwise remove every listener.
    #[error(
        "{origin}: the config is empty; an empty file is never a valid config (write `{{}}` for one without listeners)"
    )]
    Empty { origin: String },
    /// Parsed, but a value is wrong; `field` is the path to it, e.g. `routes[0].rules[1].clusters[0].name`.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> Error {
    Error::Invalid { field: field.into(), reason: reason.to_string() }
}

/// The file as written: both parts side by side, as deploy/'s ConfigMaps have it. One flat
/// struct because serde's `deny_unknown_fields` (and the line numbers of its errors) does not see
/// through `flatten`; [`RawConfig::split`] makes the two parts. Serialisable, so a control plane
/// can write what the proxy reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<RawAdmin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<RawReadiness>,
    #[serde(default)]
    pub outbound_policy: OutboundPolicy,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub clusters: Vec<RawCluster>,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoints>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<RawHostEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<RawDns>,
    /// Policy per inbound port (traffic to the local application).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<RawInboundPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<RawDiscovery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_minimum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_idle_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<String>,
}

/// A whole file validated: what the proxy would run if it started with it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub bootstrap: Bootstrap,
    pub routing: Routing,
}

impl RawConfig {
    /// Parses YAML (which also reads JSON). `origin` names the source in errors (a path or URL).
    pub fn from_yaml(origin: &str, text: &str) -> Result<Self, Error> {
        let blank = |l: &str| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
        };
        if text.lines().all(blank) {
            return Err(Error::Empty { origin: origin.to_string() });
        }
        serde_yaml::from_str(text).map_err(|error| Error::Yaml { origin: origin.to_string(), error })
    }

    /// The two parts.
    pub fn split(self) -> (RawBootstrap, RawRouting) {
        let bootstrap = RawBootstrap {
            admin: self.admin,
            readiness: self.readiness,
            discovery: self.discovery,
            dns: self.dns,
            drain_timeout: self.drain_timeout,
            drain_minimum: self.drain_minimum,
            tcp_idle_timeout: self.tcp_idle_timeout,
            stream_idle_timeout: self.stream_idle_timeout,
        };
        let routing = RawRouting {
            outbound_policy: self.outbound_policy,
            listeners: self.listeners,
            routes: self.routes,
            clusters: self.clusters,
            endpoints: self.endpoints,
            hosts: self.hosts,
            inbound: self.inbound,
        };
        (bootstrap, routing)
    }

    /// Checks both parts as the proxy does at start: the bootstrap, then the routing against it.
    /// The proxy itself validates the routing later, once merged with discovery answers; this is
    /// for whoever writes a file for it (deploy/'s examples, mesh-pilot's translation).
    pub fn validate(&self) -> Result<Config, Error> {
        let (bootstrap, routing) = self.clone().split();
        let bootstrap = bootstrap.validate()?;
        let routing = routing.validate(&bootstrap)?;
        Ok(Config { bootstrap, routing })
    }
}

/// What the command line sets over the file's bootstrap. [`load`] applies it at start and on every
/// reload alike, so a reloaded file is compared with the running bootstrap like for like (applied
/// at start only, every reload would be refused as a `discovery.url` change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Replaces (or supplies) `discovery.url`; the file's `poll_interval` and `node` stay.
    pub discovery_url: Option<String>,
}

impl Overrides {
    /// `--discovery-address host:port` (mesh-pilot's discovery port): this pod's namespace scope
    /// there, `http://host:port/ns/<namespace>`, the URL mesh-pilot serves each namespace at.
    pub fn discovery_address(address: &str, namespace: Option<&str>) -> Result<Self, Error> {
        const FLAG: &str = "--discovery-address";
        let authority = address
            .parse::<http::uri::Authority>()
            .ok()
            .filter(|a| a.port_u16().is_some() && !a.as_str().contains('@') && !a.host().is_empty())
            .ok_or_else(|| {
                invalid(FLAG, format!("{address:?}: expected host:port, e.g. mesh-pilot.mesh-system:15010"))
            })?;
        let namespace = namespace.map(str::trim).filter(|n| !n.is_empty()).ok_or_else(|| {
            invalid(FLAG, "needs the pod's namespace: --pod-namespace or POD_NAMESPACE (mesh-init inject sets it)")
        })?;
        let label = namespace.len() <= 63
            && namespace.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !namespace.starts_with('-')
            && !namespace.ends_with('-');
        if !label {
            return Err(invalid("--pod-namespace", format!("{namespace:?} is not a Kubernetes namespace name")));
        }
        Ok(Self { discovery_url: Some(format!("http://{authority}/ns/{namespace}")) })
    }

    fn apply(&self, bootstrap: &mut RawBootstrap) {
        if let Some(url) = &self.discovery_url {
            match &mut bootstrap.discovery {
                Some(d) => d.url = url.clone(),
                None => bootstrap.discovery = Some(RawDiscovery { url: url.clone(), poll_interval: None, node: None }),
            }
        }
    }
}

/// The config file, read: its bootstrap validated, its routing parsed (validated once merged with
/// any discovery answers, by the control side).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    /// Applied to this file's bootstrap, and to the next reload's.
    pub overrides: Overrides,
    /// A short hash of the content: the file's version in `/config_dump`.
    pub version: String,
    pub bootstrap: Bootstrap,
    pub routing: RawRouting,
}

/// A config file that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct LoadError {
    /// The content hash, when the file could be read.
    pub version: Option<String>,
    pub error: Error,
}

/// Reads, parses and checks the config file, with the command line's `overrides`: at start and on
/// every reload.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Loaded, LoadError> {
    read(path)?.parse(overrides)
}

/// The config file's content, read but not parsed: its version tells a reload whether there is
/// anything new before the (for a large file, costly) parse.
pub struct FileText {
    pub path: PathBuf,
    /// A short hash of the content.
    pub version: String,
    text: String,
}

/// Reads the config file.
pub fn read(path: &Path) -> Result<FileText, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| LoadError { version: None, error: Error::Read { path: path.display().to_string(), error } })?;
    Ok(FileText { path: path.to_path_buf(), version: content_version(&text), text })
}

impl FileText {
    /// Parses the content and checks its bootstrap, with the command line's `overrides` applied.
    pub fn parse(self, overrides: &Overrides) -> Result<Loaded, LoadError> {
        let FileText { path, version, text } = self;
        let checked = RawConfig::from_yaml(&path.display().to_string(), &text).and_then(|raw| {
            let (mut bootstrap, routing) = raw.split();
            overrides.apply(&mut bootstrap);
            Ok((bootstrap.validate()?, routing))
        });
        match checked {
            Ok((bootstrap, routing)) => Ok(Loaded { path, overrides: overrides.clone(), version, bootstrap, routing }),
            Err(error) => Err(LoadError { version: Some(version), error }),
        }
    }
}

/// A short content hash.
fn content_version(text: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The typed-payload envelope every discovery endpoint answers with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryResponse<T> {
    pub version_info: String,
    pub resources: Vec<T>,
}

/// An endpoints answer that holds only the clusters whose endpoints changed since the version
/// `since` (the one the proxy named in `If-None-Match`); the others are as they were.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsDelta {
    pub version_info: String,
    pub since: String,
    pub resources: Vec<RawEndpoints>,
}

impl<T: serde::de::DeserializeOwned> DiscoveryResponse<T> {
    pub fn from_json(origin: &str, body: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(body).map_err(|error| Error::Json { origin: origin.to_string(), error })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{bootstrap::DEFAULT_ADMIN_ADDRESS, routing::parse_destination, *};

    const EXAMPLE: &str = r#"
admin: { address: 127.0.0.1:15090 }
outbound_policy: allow_any
listeners:
  - name: virtual
    address: 0.0.0.0:15000
routes:
  - name: reviews
    destinations: ["reviews:9080", "10.96.0.20:9080"]
    protocol: http
    rules:
      - match: { path_prefix: /, headers: { end-user: jason } }
        clusters: [{ name: reviews-v2, weight: 100 }]
      - clusters: [{ name: reviews-v1, weight: 50 }, { name: reviews-v3, weight: 50 }]
clusters:
  - name: reviews-v1
    lb_policy: round_robin
    connect_timeout: 1s
  - name: reviews-v2
  - name: reviews-v3
    lb_policy: least_request
endpoints:
  - cluster: reviews-v1
    addresses: ["10.200.1.11:9080", "10.200.1.12:9080"]
discovery:
  url: http://127.0.0.1:8500/mesh
  poll_interval: 1s
"#;

    fn validate(origin: &str, yaml: &str) -> Result<(Bootstrap, Routing), Error> {
        let c = RawConfig::from_yaml(origin, yaml)?.validate()?;
        Ok((c.bootstrap, c.routing))
    }

    fn err(yaml: &str) -> String {
        match validate("test.yaml", yaml) {
            Ok(_) => panic!("accepted: {yaml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_issue_example_validates() {
        let (b, c) = validate("x", EXAMPLE).unwrap();
        assert_eq!(c.listeners[0].address, "0.0.0.0:15000".parse().unwrap());
        assert_eq!(c.routes[0].destinations[0], Destination::Host { host: "reviews".into(), port: Some(9080) });
        assert_eq!(c.routes[0].destinations[1], Destination::Addr("10.96.0.20:9080".parse().unwrap()));
        let exact = StringMatch::Exact("jason".to_string());
        assert_eq!(c.routes[0].rules[0].matches[0].headers, vec![("end-user".to_string(), exact)]);
        assert_eq!(c.routes[0].rules[0].timeout, None, "no timeout unless one is given, as Istio");
        assert_eq!(c.clusters[0].connect_timeout, Duration::from_secs(1));
        assert_eq!(c.clusters[0].endpoints.len(), 2);
        assert_eq!(c.clusters[1].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(b.discovery.unwrap().poll_interval, Duration::from_secs(1));
    }

    #[test]
    fn an_empty_file_is_never_a_config() {
        for text in ["", "\n  \n", "# all commented out\n# listeners: []\n", "---\n"] {
            let e = RawConfig::from_yaml("proxy.yaml", text).unwrap_err().to_string();
            assert!(e.starts_with("proxy.yaml: the config is empty"), "{text:?}: {e}");
        }
        // An explicit empty mapping is a choice, not an accident.
        assert_eq!(RawConfig::from_yaml("proxy.yaml", "{}").unwrap(), RawConfig::default());
    }

    #[test]
    fn json_is_accepted() {
        let (b, c) = validate("x", r#"{"listeners": [{"name": "a", "address": "127.0.0.1:1"}]}"#).unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(b.admin, DEFAULT_ADMIN_ADDRESS);
    }

    #[test]
    fn readiness_is_optional_and_checked() {
        let (c, _) = validate("x", "readiness: { address: 0.0.0.0:15021 }\n").unwrap();
        assert_eq!(c.readiness, Some(Readiness { address: "0.0.0.0:15021".parse().unwrap() }));
        assert_eq!(RawBootstrap::default().validate().unwrap().readiness, None);
        let e = err("readiness: { address: 0.0.0.0:15090 }\n");
        let want = "readiness.address: 0.0.0.0:15090 overlaps admin.address 127.0.0.1:15090; use its own port (Istio's is 15021)";
        assert_eq!(e, want);
        let e = err("readiness: { address: 127.0.0.1:1 }\nlisteners: [{ name: a, address: 127.0.0.1:1 }]\n");
        assert_eq!(e, "listeners[0].address: 127.0.0.1:1 is the readiness address");
        assert!(err("readiness: { address: 0.0.0.0:15021, path: /ready }\n").contains("unknown field `path`"));
        assert!(err("readiness: { address: nowhere }\n").starts_with("readiness.address: "));
    }

    #[test]
    fn transparent_listeners_carry_the_tproxy_mark() {
        let listener = |extra: &str| format!("listeners: [{{ name: in, address: 0.0.0.0:15006{extra} }}]\n");
        let (_, r) = validate("x", &listener(", transparent: true")).unwrap();
        assert_eq!(r.listeners[0].transparent, Some(1337), "mesh-init's default -t");
        let (_, r) = validate("x", &listener(", transparent: true, tproxy_mark: 7")).unwrap();
        assert_eq!(r.listeners[0].transparent, Some(7));
        assert_eq!(validate("x", &listener("")).unwrap().1.listeners[0].transparent, None);
        assert_eq!(err(&listener(", tproxy_mark: 7")), "listeners[0].tproxy_mark: only a transparent listener has one");
        assert_eq!(err(&listener(", transparent: true, tproxy_mark: 0")), "listeners[0].tproxy_mark: must not be 0");
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let e = err("listeners:\n  - name: a\n    adress: 127.0.0.1:1\n");
        assert!(e.contains("unknown field `adress`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.starts_with("test.yaml: "), "{e}");
    }

    #[test]
    fn undefined_cluster_is_named() {
        let e = err("routes:\n - name: r\n   destinations: [a:1]\n   rules: [{clusters: [{name: nope, weight: 1}]}]\n");
        assert_eq!(e, r#"routes[0].rules[0].clusters[0].name: cluster "nope" is not defined in clusters"#);
    }

    #[test]
    fn zero_weight_is_refused() {
        let e = err("clusters: [{name: c}]\nroutes:\n - name: r\n   destinations: [a:1]\n   rules: [{clusters: [{name: c, weight: 0}]}]\n");
        assert_eq!(e, "routes[0].rules[0].clusters[0].weight: weight must be greater than 0");
    }

    #[test]
    fn bad_addresses_and_durations_are_named() {
        let e = err("listeners: [{name: a, address: 'localhost:80'}]");
        assert!(e.starts_with("listeners[0].address: invalid address \"localhost:80\""), "{e}");
        let e = err("clusters: [{name: c, connect_timeout: 5}]");
        assert!(e.starts_with("clusters[0].connect_timeout: invalid duration \"5\""), "{e}");
        let e = err("clusters: [{name: c}]\nendpoints: [{cluster: c, addresses: ['1.2.3.4']}]");
        assert!(e.starts_with("endpoints[0].addresses[0]: invalid address"), "{e}");
        let e = err("endpoints: [{cluster: c, addresses: []}]");
        assert!(e.starts_with("endpoints[0].cluster: cluster \"c\" is not defined"), "{e}");
    }

    #[test]
    fn a_destination_belongs_to_one_route() {
        let e = err(
            "clusters: [{name: c}]\nroutes:\n - {name: a, destinations: ['x:1'], rules: [{clusters: [{name: c}]}]}\n - {name: b, destinations: ['X:1'], rules: [{clusters: [{name: c}]}]}\n",
        );
        assert_eq!(e, r#"routes[1].destinations[0]: x:1 is already routed by route "a""#);
    }

    #[test]
    fn bad_enum_value_lists_choices() {
        let e = err("outbound_policy: allow_some");
        assert!(e.contains("allow_any") && e.contains("registry_only"), "{e}");
    }

    /// A route with one rule around `rule`, and clusters `c` and `d`.
    fn rule(rule: &str) -> String {
        format!("clusters: [{{name: c}}, {{name: d}}]\nroutes:\n - name: r\n   destinations: [a:1]\n   rules:\n    - {rule}\n")
    }

    #[test]
    fn match_blocks_one_or_many_and_string_matches() {
        let (_, c) =
            validate("x", &rule("{match: {headers: {a: x, b: {prefix: y}, c: {}}}, clusters: [{name: c}]}")).unwrap();
        let m = &c.routes[0].rules[0].matches;
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].headers[1], ("b".to_string(), StringMatch::Prefix("y".into())));
        assert_eq!(m[0].headers[2], ("c".to_string(), StringMatch::Present));
        let (_, c) = validate(
            "x",
            &rule("{match: [{path: /a}, {path_regex: '/b.*', method: {exact: GET}}], clusters: [{name: c}]}"),
        )
        .unwrap();
        assert_eq!(c.routes[0].rules[0].matches.len(), 2);
        // Written back as read: one block as a map, an exact match as a bare string.
        let raw = RawConfig::from_yaml("x", &rule("{match: {headers: {a: x}}, clusters: [{name: c}]}")).unwrap();
        let back = serde_yaml::to_string(&raw.routes[0].rules[0]).unwrap();
        assert!(back.contains("match:\n  headers:\n    a: x\n"), "{back}");
    }

    #[test]
    fn policy_errors_name_the_field() {
        let cases = [
            (
                "{match: {headers: {a: {exact: x, regex: y}}}, clusters: [{name: c}]}",
                "routes[0].rules[0].match.headers.a: give one of exact, prefix or regex",
            ),
            (
                "{match: [{path: /}, {path_regex: '('}], clusters: [{name: c}]}",
                "routes[0].rules[0].match[1].path_regex.regex: invalid regex",
            ),
            (
                "{match: {path: /, path_regex: x}, clusters: [{name: c}]}",
                "routes[0].rules[0].match: give one of path_prefix, path or path_regex",
            ),
            (
                "{match: {destination_subnets: [10.0.0.0/33]}, clusters: [{name: c}]}",
                "routes[0].rules[0].match.destination_subnets[0]: invalid subnet",
            ),
            (
                "{clusters: [{name: c}], redirect: {uri: /x}}",
                "routes[0].rules[0]: give exactly one of clusters, redirect or direct_response",
            ),
            (
                "{redirect: {uri: /x, redirect_code: 200}}",
                "routes[0].rules[0].redirect.redirect_code: 200 is not one of",
            ),
            ("{direct_response: {status: 99}}", "routes[0].rules[0].direct_response.status: 99"),
            (
                "{direct_response: {status: 200, body: {bytes: '***'}}}",
                "routes[0].rules[0].direct_response.body.bytes: not base64",
            ),
            (
                "{clusters: [{name: c}], retries: {attempts: 2, retry_on: [5xx, bogus]}}",
                "routes[0].rules[0].retries.retry_on[1]: unknown condition \"bogus\"",
            ),
            (
                "{clusters: [{name: c}], fault: {abort: {grpc_status: NOPE}}}",
                "routes[0].rules[0].fault.abort.grpc_status: unknown gRPC status",
            ),
            (
                "{clusters: [{name: c}], fault: {delay: {fixed_delay: 1s, percentage: 101}}}",
                "routes[0].rules[0].fault.delay.percentage: 101 is not a percentage",
            ),
            (
                "{clusters: [{name: c}], mirrors: [{cluster: nope}]}",
                "routes[0].rules[0].mirrors[0].cluster: cluster \"nope\" is not defined",
            ),
            (
                "{clusters: [{name: c}], rate_limit: {max_tokens: 1, fill_interval: 10ms}}",
                "routes[0].rules[0].rate_limit.fill_interval: must be at least 50ms",
            ),
            (
                "{clusters: [{name: c, headers: {request: {set: {'a b': x}}}}]}",
                "routes[0].rules[0].clusters[0].headers.request.set.a b: \"a b\" is not a valid header name",
            ),
            (
                "{clusters: [{name: c}], rewrite: {uri: /a, uri_regex_rewrite: {match: x, rewrite: y}}}",
                "routes[0].rules[0].rewrite: give either uri or uri_regex_rewrite",
            ),
            ("{clusters: [{name: c}], retries: {attempts: 1, retry_ons: []}}", "unknown field `retry_ons`"),
        ];
        for (r, want) in cases {
            let e = err(&rule(r));
            assert!(e.contains(want), "{r}\n got: {e}\nwant: {want}");
        }
        let cluster_cases = [
            (
                "{name: c, lb_policy: random, consistent_hash: {use_source_ip: true}}",
                "clusters[0]: give either lb_policy or consistent_hash, not both",
            ),
            (
                "{name: c, consistent_hash: {use_source_ip: true, http_header_name: x}}",
                "clusters[0].consistent_hash: give one of",
            ),
            (
                "{name: c, consistent_hash: {use_source_ip: true, maglev: {table_size: 65536}}}",
                "clusters[0].consistent_hash.maglev.table_size: 65536 must be a prime",
            ),
            (
                "{name: c, circuit_breakers: {max_connections: 0}}",
                "clusters[0].circuit_breakers.max_connections: must be greater than 0",
            ),
            (
                "{name: c, outlier_detection: {max_ejection_percent: 101}}",
                "clusters[0].outlier_detection.max_ejection_percent: 101",
            ),
            (
                "{name: c, outlier_detection: {interval: 0s}}",
                "clusters[0].outlier_detection.interval: must be greater than 0",
            ),
            ("{name: c, tcp_keepalive: {time: 500ms}}", "clusters[0].tcp_keepalive.time: must be at least 1s"),
        ];
        for (c, want) in cluster_cases {
            let e = err(&format!("clusters: [{c}]"));
            assert!(e.contains(want), "{c}\n got: {e}\nwant: {want}");
        }
        let e = err("inbound: [{port: 80}, {port: 80}]");
        assert_eq!(e, "inbound[1].port: port 80 is listed twice");
    }

    #[test]
    fn destinations_parse() {
        assert_eq!(parse_destination("[fd00::1]:80").unwrap(), Destination::Addr("[fd00::1]:80".parse().unwrap()));
        assert_eq!(parse_destination("Reviews").unwrap(), Destination::Host { host: "reviews".into(), port: None });
        assert!(parse_destination("10.0.0.1").is_err());
        assert!(parse_destination("fd00::1:80").is_err());
        assert!(parse_destination("a b:80").is_err());
    }

    #[test]
    fn discovery_address_is_the_namespace_scope_and_bad_values_name_the_flag() {
        let o = Overrides::discovery_address("mesh-pilot.mesh-system:15010", Some("bookinfo")).unwrap();
        assert_eq!(o.discovery_url.as_deref(), Some("http://mesh-pilot.mesh-system:15010/ns/bookinfo"));
        let err = |a: &str, ns: Option<&str>| Overrides::discovery_address(a, ns).unwrap_err().to_string();
        let want = "--discovery-address: \"mesh-pilot\": expected host:port, e.g. mesh-pilot.mesh-system:15010";
        assert_eq!(err("mesh-pilot", Some("a")), want);
        assert!(err("http://x:1", Some("a")).starts_with("--discovery-address: "));
        assert!(err("u@x:1", Some("a")).starts_with("--discovery-address: "));
        assert!(err("x:1", None).contains("POD_NAMESPACE"));
        assert_eq!(err("x:1", Some("Bad_NS")), "--pod-namespace: \"Bad_NS\" is not a Kubernetes namespace name");
    }
}
