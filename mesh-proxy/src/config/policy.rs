//! Traffic policy: everything Istio's `VirtualService` and `DestinationRule` ask of a sidecar, in
//! the proxy's own words — request matching beyond path and exact headers, the actions of a rule
//! (redirect, direct response, rewrite, header operations, mirrors), timeouts and retries, fault
//! injection, local rate limits, and per cluster the balancing (consistent hashing included),
//! circuit breakers and outlier detection.
//!
//! Every Istio field has one field here (the table in mesh-proxy's README maps them), so the
//! control plane translates one to one; what Istio resolves at translation time (subsets,
//! port-level settings, source labels, gateways) becomes one cluster or one route per case there,
//! each carrying its own merged policy here. Every policy is optional: validation turns the input
//! (`Raw*`, snake_case, unknown fields refused) into typed values (regexes compiled, durations,
//! percentages and header names checked), and the data plane precomputes what it needs once per
//! snapshot, so a rule or cluster without a policy costs nothing per request.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

use ipnet::IpNet;
use serde::{
    de::{self, value::MapAccessDeserializer, value::SeqAccessDeserializer, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer, Serialize, Serializer,
};

use super::{invalid, Error};
use crate::parse::{self, serialize_duration};

// ---------------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------------

/// A percentage of requests, `0` to `100`, fractions allowed (Istio's `Percent`, a double).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Percent(pub f64);

/// By bits, so that the config types stay `Eq` (a NaN is refused by validation anyway).
impl PartialEq for Percent {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for Percent {}

impl Percent {
    pub const ALL: Percent = Percent(100.0);

    fn check(self, field: &str) -> Result<Percent, Error> {
        if !(self.0.is_finite() && (0.0..=100.0).contains(&self.0)) {
            return Err(invalid(field, format!("{} is not a percentage: give 0 to 100", self.0)));
        }
        Ok(self)
    }
}

/// How a string is matched (Istio's `StringMatch`): a bare string is an exact match; a map gives
/// one of `exact`, `prefix`, `regex` (RE2 syntax, matching the whole value), or nothing (`{}`:
/// the header or query parameter is present, whatever its value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawStringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

impl From<String> for RawStringMatch {
    fn from(exact: String) -> Self {
        Self { exact: Some(exact), ..Self::default() }
    }
}

/// The map form of [`RawStringMatch`], checked for unknown keys.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StringMatchFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl<'de> Deserialize<'de> for RawStringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawStringMatch;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string (exact match) or a map with one of exact, prefix, regex ({} = present)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawStringMatch::from(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let f = StringMatchFields::deserialize(MapAccessDeserializer::new(map))?;
                Ok(RawStringMatch { exact: f.exact, prefix: f.prefix, regex: f.regex })
            }
        }
        d.deserialize_any(V)
    }
}

/// An exact match is written back as a bare string, as it is usually written.
impl Serialize for RawStringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RawStringMatch { exact: Some(e), prefix: None, regex: None } => s.serialize_str(e),
            m => StringMatchFields { exact: m.exact.clone(), prefix: m.prefix.clone(), regex: m.regex.clone() }
                .serialize(s),
        }
    }
}

/// A rule's `match`: one block, or a list of blocks of which any may match.
pub(super) fn one_or_many<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a match block or a list of match blocks")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map)).map(|m| vec![m])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::<T>::deserialize(SeqAccessDeserializer::new(seq))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// One block is written back as a map, several as a list.
pub(super) fn serialize_one_or_many<S: Serializer, T: Serialize>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
    match v {
        [one] => one.serialize(s),
        many => many.serialize(s),
    }
}

/// Header operations for the request and the response (Istio's `Headers`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaders {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RawHeaderOperations>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<RawHeaderOperations>,
}

/// Istio's `HeaderOperations`: `set` replaces, `add` appends, `remove` deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderOperations {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Istio's `HTTPRedirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    /// Replaces the whole path (the query string is kept unless this has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derive_port: Option<DerivePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// 301 (default), 302, 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_code: Option<u16>,
}

/// Istio's `derivePort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DerivePort {
    /// 80 for http, 443 for https: the port is left out of `Location`.
    FromProtocolDefault,
    /// The port the request was sent to.
    FromRequestPort,
}

/// Istio's `HTTPDirectResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<RawBody>,
}

/// Istio's `HTTPBody`: text, or bytes in base64.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
}

/// Istio's `HTTPRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRewrite {
    /// Replaces the prefix the rule matched (the whole path after an exact or regex match; `/`
    /// when the rule has no path condition, as in Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex_rewrite: Option<RawRegexRewrite>,
    /// Replaces the `Host` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// Istio's `RegexRewrite`: every match of `match` in the path is replaced by `rewrite`, where
/// `\1` .. `\9` are the capture groups (RE2's notation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

/// Istio's `HTTPRetry`, plus Envoy's backoff.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    /// Retries after the first try (0 turns retrying off).
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Conditions (`5xx`, `gateway-error`, `reset`, `connect-failure`, `retriable-4xx`,
    /// `refused-stream`, `retriable-status-codes`, `cancelled`, `deadline-exceeded`,
    /// `resource-exhausted`, `unavailable`) and status codes (`"503"`); Istio's comma-separated
    /// `retryOn`, split. Empty: Istio's default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<RawBackoff>,
}

/// Envoy's retry back-off: fully jittered exponential, from `base_interval` up to `max_interval`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<String>,
}

/// Istio's `HTTPFaultInjection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<RawDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<RawAbort>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelay {
    pub fixed_delay: String,
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// A gRPC status name (`UNAVAILABLE`) or number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// One shadow destination (Istio's `mirror` + `mirrorPercentage`, or an entry of `mirrors`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirror {
    pub cluster: String,
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// A token bucket, as Envoy's `local_ratelimit` keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Bucket size: the burst allowed.
    pub max_tokens: u32,
    /// Tokens added every `fill_interval` (default `max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_fill: Option<u32>,
    pub fill_interval: String,
    /// One bucket per downstream connection instead of one shared by all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_connection: bool,
}

/// Istio's `consistentHash`: the key, and the algorithm (ring hash unless `maglev` is given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsistentHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<RawHttpCookie>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_source_ip: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_query_parameter_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<RawRingHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<RawMaglev>,
}

/// Istio's `HTTPCookie`: with a `ttl`, the proxy issues the cookie when the request has none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpCookie {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRingHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMaglev {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
}

/// Istio's `connectionPool.tcp.tcpKeepalive`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcpKeepalive {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// Envoy's circuit breakers (Istio's `connectionPool` limits). Absent: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreakers {
    /// Upstream connections to the whole cluster (`tcp.maxConnections`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection (`http.http1MaxPendingRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight (`http.http2MaxRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight (`http.maxRetries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Retries in flight as a share of requests in flight (Envoy's `retry_budget`; default 20 %
    /// with at least 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RawRetryBudget>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetryBudget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<Percent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retry_concurrency: Option<u32>,
}

/// Istio's `OutlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierDetection {
    /// Default 5; 0 turns this check off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<u32>,
    /// 502, 503, 504 and failures to connect; default 0 (off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Option<u32>,
}

/// Policy for one inbound port (traffic to the local application).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawInboundPort {
    pub port: u16,
    /// Requests to the application on this port, limited as Envoy's `local_ratelimit` on the
    /// inbound listener does: the port is then read as HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RawRateLimit>,
}

// ---------------------------------------------------------------------------------------------
// Validated
// ---------------------------------------------------------------------------------------------

/// A compiled RE2-syntax regular expression (the `regex` crate: no back-references, linear time).
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

impl Pattern {
    /// Anchored at both ends: Envoy and Istio match the whole value.
    fn whole(field: &str, source: &str) -> Result<Self, Error> {
        let regex = regex::Regex::new(&format!("^(?:{source})$"))
            .map_err(|e| invalid(field, format!("invalid regex {source:?}: {e}")))?;
        Ok(Self { source: source.to_string(), regex })
    }

    /// As written, for searching (a rewrite replaces every match).
    fn search(field: &str, source: &str) -> Result<Self, Error> {
        let regex = regex::Regex::new(source).map_err(|e| invalid(field, format!("invalid regex {source:?}: {e}")))?;
        Ok(Self { source: source.to_string(), regex })
    }

    pub fn regex(&self) -> &regex::Regex {
        &self.regex
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for Pattern {}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
    /// Present, whatever the value.
    Present,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value == e,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.regex.is_match(value),
            StringMatch::Present => true,
        }
    }
}

/// Header operations, names lower-cased and values checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeaderOperations {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderOperations {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Headers {
    #[serde(skip_serializing_if = "HeaderOperations::is_empty")]
    pub request: HeaderOperations,
    #[serde(skip_serializing_if = "HeaderOperations::is_empty")]
    pub response: HeaderOperations,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Redirect {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<RedirectPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    pub redirect_code: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedirectPort {
    Number(u16),
    Derive(DerivePort),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectResponse {
    pub status: u16,
    /// Shown as text (lossily, when the body was given as bytes).
    #[serde(serialize_with = "serialize_lossy")]
    pub body: Vec<u8>,
}

fn serialize_lossy<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri_regex_rewrite: Option<RegexRewrite>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: Pattern,
    /// In the `regex` crate's notation (`${1}`), translated from RE2's `\1`.
    pub rewrite: String,
}

/// What a response or failure must be for a retry, as a set of conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum RetryCondition {
    #[serde(rename = "5xx")]
    FiveXx,
    #[serde(rename = "gateway-error")]
    GatewayError,
    #[serde(rename = "reset")]
    Reset,
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    #[serde(rename = "refused-stream")]
    RefusedStream,
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
    #[serde(rename = "cancelled")]
    Cancelled,
    #[serde(rename = "deadline-exceeded")]
    DeadlineExceeded,
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
    #[serde(rename = "unavailable")]
    Unavailable,
}

impl RetryCondition {
    const ALL: [(&'static str, RetryCondition); 11] = [
        ("5xx", RetryCondition::FiveXx),
        ("gateway-error", RetryCondition::GatewayError),
        ("reset", RetryCondition::Reset),
        ("connect-failure", RetryCondition::ConnectFailure),
        ("retriable-4xx", RetryCondition::Retriable4xx),
        ("refused-stream", RetryCondition::RefusedStream),
        ("retriable-status-codes", RetryCondition::RetriableStatusCodes),
        ("cancelled", RetryCondition::Cancelled),
        ("deadline-exceeded", RetryCondition::DeadlineExceeded),
        ("resource-exhausted", RetryCondition::ResourceExhausted),
        ("unavailable", RetryCondition::Unavailable),
    ];
}

/// Envoy's default retry back-off.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retries {
    pub attempts: u32,
    #[serde(serialize_with = "serialize_opt_duration", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<RetryCondition>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_base: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_max: Duration,
}

impl Retries {
    pub fn on(&self, c: RetryCondition) -> bool {
        self.retry_on.contains(&c)
    }
}

pub fn serialize_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => serialize_duration(d, s),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delay {
    #[serde(serialize_with = "serialize_duration")]
    pub fixed_delay: Duration,
    pub percentage: Percent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Abort {
    pub status: AbortStatus,
    pub percentage: Percent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortStatus {
    Http(u16),
    Grpc(GrpcCode),
}

/// A gRPC status code (0..=16), shown by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcCode(pub u8);

impl GrpcCode {
    pub const NAMES: [&'static str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    pub const CANCELLED: GrpcCode = GrpcCode(1);
    pub const DEADLINE_EXCEEDED: GrpcCode = GrpcCode(4);
    pub const RESOURCE_EXHAUSTED: GrpcCode = GrpcCode(8);
    pub const UNAVAILABLE: GrpcCode = GrpcCode(14);

    fn parse(s: &str) -> Option<GrpcCode> {
        if let Ok(n) = s.parse::<u8>() {
            return (usize::from(n) < Self::NAMES.len()).then_some(GrpcCode(n));
        }
        let upper = s.to_ascii_uppercase();
        Self::NAMES.iter().position(|n| *n == upper).map(|i| GrpcCode(i as u8))
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[usize::from(self.0)]
    }
}

impl Serialize for GrpcCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mirror {
    pub cluster: String,
    pub percentage: Percent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    #[serde(serialize_with = "serialize_duration")]
    pub fill_interval: Duration,
    pub per_connection: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub algorithm: HashAlgorithm,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// Lower-case header name.
    Header(String),
    Cookie {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// Issue the cookie, with this Max-Age (0: a session cookie), when the request has none.
        #[serde(serialize_with = "serialize_opt_duration", skip_serializing_if = "Option::is_none")]
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

/// Envoy's defaults: a ring of at least 1024 entries; a Maglev table of 65537 (a prime).
pub const DEFAULT_MINIMUM_RING_SIZE: u32 = 1024;
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65537;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgorithm {
    RingHash { minimum_ring_size: u32 },
    Maglev { table_size: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcpKeepalive {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
    #[serde(serialize_with = "serialize_opt_duration", skip_serializing_if = "Option::is_none")]
    pub time: Option<Duration>,
    #[serde(serialize_with = "serialize_opt_duration", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
}

/// Envoy's retry budget defaults.
pub const DEFAULT_RETRY_BUDGET_PERCENT: f64 = 20.0;
pub const DEFAULT_MIN_RETRY_CONCURRENCY: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CircuitBreakers {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    pub retry_budget_percent: Percent,
    pub min_retry_concurrency: u32,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_pending_requests: None,
            max_requests: None,
            max_retries: None,
            retry_budget_percent: Percent(DEFAULT_RETRY_BUDGET_PERCENT),
            min_retry_concurrency: DEFAULT_MIN_RETRY_CONCURRENCY,
        }
    }
}

/// Envoy's outlier detection defaults (Istio's too), and Envoy's cap on an ejection.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_OUTLIER_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: u32,
    pub consecutive_gateway_errors: u32,
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundPort {
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

// ---------------------------------------------------------------------------------------------
// Validation, one function per input type; `field` is the path of the value being checked.
// ---------------------------------------------------------------------------------------------

fn opt_duration(field: &str, s: Option<&str>) -> Result<Option<Duration>, Error> {
    s.map(|s| parse::duration(s).map_err(|e| invalid(field, e))).transpose()
}

fn positive_duration(field: &str, s: &str) -> Result<Duration, Error> {
    let d = parse::duration(s).map_err(|e| invalid(field, e))?;
    if d.is_zero() {
        return Err(invalid(field, "must be greater than 0"));
    }
    Ok(d)
}

/// A header name, lower-cased.
pub(super) fn header_name(field: &str, name: &str) -> Result<String, Error> {
    let lower = name.to_ascii_lowercase();
    http::HeaderName::from_bytes(lower.as_bytes())
        .map_err(|_| invalid(field, format!("{name:?} is not a valid header name")))?;
    Ok(lower)
}

fn header_value(field: &str, value: &str) -> Result<(), Error> {
    http::HeaderValue::from_str(value).map_err(|_| invalid(field, format!("{value:?} is not a valid header value")))?;
    Ok(())
}

pub(super) fn string_match(field: &str, m: &RawStringMatch) -> Result<StringMatch, Error> {
    match (&m.exact, &m.prefix, &m.regex) {
        (None, None, None) => Ok(StringMatch::Present),
        (Some(e), None, None) => Ok(StringMatch::Exact(e.clone())),
        (None, Some(p), None) => Ok(StringMatch::Prefix(p.clone())),
        (None, None, Some(r)) => Ok(StringMatch::Regex(Pattern::whole(&format!("{field}.regex"), r)?)),
        _ => Err(invalid(field, "give one of exact, prefix or regex")),
    }
}

/// Header conditions by lower-case name; `what` is `headers` or `without_headers`.
pub(super) fn header_matches(
    field: &str,
    map: &BTreeMap<String, RawStringMatch>,
) -> Result<Vec<(String, StringMatch)>, Error> {
    map.iter()
        .map(|(name, m)| {
            let f = format!("{field}.{name}");
            Ok((header_name(&f, name)?, string_match(&f, m)?))
        })
        .collect()
}

pub(super) fn query_matches(
    field: &str,
    map: &BTreeMap<String, RawStringMatch>,
) -> Result<Vec<(String, StringMatch)>, Error> {
    map.iter().map(|(name, m)| Ok((name.clone(), string_match(&format!("{field}.{name}"), m)?))).collect()
}

pub(super) fn subnets(field: &str, list: &[String]) -> Result<Vec<IpNet>, Error> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let s = s.trim();
            // A bare address is a /32 (/128), as Istio reads it.
            s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
                invalid(format!("{field}[{i}]"), format!("invalid subnet {s:?}: expected a CIDR, e.g. 10.0.0.0/8"))
            })
        })
        .collect()
}

pub(super) fn headers(field: &str, h: &RawHeaders) -> Result<Headers, Error> {
    let ops = |f: String, o: &Option<RawHeaderOperations>| -> Result<HeaderOperations, Error> {
        let Some(o) = o else { return Ok(HeaderOperations::default()) };
        let pairs = |what: &str, m: &BTreeMap<String, String>| -> Result<Vec<(String, String)>, Error> {
            m.iter()
                .map(|(k, v)| {
                    let hf = format!("{f}.{what}.{k}");
                    let name = header_name(&hf, k)?;
                    header_value(&hf, v)?;
                    Ok((name, v.clone()))
                })
                .collect()
        };
        let remove = o
            .remove
            .iter()
            .enumerate()
            .map(|(i, k)| header_name(&format!("{f}.remove[{i}]"), k))
            .collect::<Result<_, _>>()?;
        Ok(HeaderOperations { set: pairs("set", &o.set)?, add: pairs("add", &o.add)?, remove })
    };
    Ok(Headers {
        request: ops(format!("{field}.request"), &h.request)?,
        response: ops(format!("{field}.response"), &h.response)?,
    })
}

pub(super) fn redirect(field: &str, r: &RawRedirect) -> Result<Redirect, Error> {
    if let Some(u) = &r.uri {
        if !u.starts_with('/') {
            return Err(invalid(format!("{field}.uri"), format!("{u:?} must start with /")));
        }
        http::uri::PathAndQuery::try_from(u.as_str())
            .map_err(|_| invalid(format!("{field}.uri"), format!("{u:?} is not a valid path")))?;
    }
    if let Some(a) = &r.authority {
        http::uri::Authority::try_from(a.as_str())
            .map_err(|_| invalid(format!("{field}.authority"), format!("{a:?} is not a valid authority")))?;
    }
    if let Some(s) = &r.scheme {
        http::uri::Scheme::try_from(s.as_str())
            .map_err(|_| invalid(format!("{field}.scheme"), format!("{s:?} is not a valid scheme")))?;
    }
    let port = match (r.port, r.derive_port) {
        (Some(_), Some(_)) => return Err(invalid(field, "give either port or derive_port, not both")),
        (Some(0), None) => return Err(invalid(format!("{field}.port"), "must be 1 to 65535")),
        (Some(p), None) => Some(RedirectPort::Number(p)),
        (None, Some(d)) => Some(RedirectPort::Derive(d)),
        (None, None) => None,
    };
    let redirect_code = r.redirect_code.unwrap_or(301);
    if ![301, 302, 303, 307, 308].contains(&redirect_code) {
        return Err(invalid(
            format!("{field}.redirect_code"),
            format!("{redirect_code} is not one of 301, 302, 303, 307, 308"),
        ));
    }
    Ok(Redirect { uri: r.uri.clone(), authority: r.authority.clone(), port, scheme: r.scheme.clone(), redirect_code })
}

pub(super) fn direct_response(field: &str, d: &RawDirectResponse) -> Result<DirectResponse, Error> {
    if !(200..=599).contains(&d.status) {
        return Err(invalid(format!("{field}.status"), format!("{} is not a final HTTP status (200-599)", d.status)));
    }
    let body = match &d.body {
        None => Vec::new(),
        Some(RawBody { string: Some(s), bytes: None }) => s.clone().into_bytes(),
        Some(RawBody { string: None, bytes: Some(b) }) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| invalid(format!("{field}.body.bytes"), format!("not base64: {e}")))?
        }
        Some(_) => return Err(invalid(format!("{field}.body"), "give one of string or bytes")),
    };
    Ok(DirectResponse { status: d.status, body })
}

pub(super) fn rewrite(field: &str, r: &RawRewrite) -> Result<Rewrite, Error> {
    if r.uri.is_some() && r.uri_regex_rewrite.is_some() {
        return Err(invalid(field, "give either uri or uri_regex_rewrite, not both"));
    }
    if let Some(u) = &r.uri {
        http::uri::PathAndQuery::try_from(u.as_str())
            .map_err(|_| invalid(format!("{field}.uri"), format!("{u:?} is not a valid path")))?;
    }
    if let Some(a) = &r.authority {
        header_value(&format!("{field}.authority"), a)?;
        http::uri::Authority::try_from(a.as_str())
            .map_err(|_| invalid(format!("{field}.authority"), format!("{a:?} is not a valid authority")))?;
    }
    let uri_regex_rewrite = match &r.uri_regex_rewrite {
        None => None,
        Some(rr) => Some(RegexRewrite {
            pattern: Pattern::search(&format!("{field}.uri_regex_rewrite.match"), &rr.pattern)?,
            rewrite: re2_substitution(&rr.rewrite),
        }),
    };
    Ok(Rewrite { uri: r.uri.clone(), uri_regex_rewrite, authority: r.authority.clone() })
}

/// RE2's `\1` capture references become the `regex` crate's `${1}`; a literal `$` is escaped.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// Istio's default `retryOn` when retries are given without one.
const DEFAULT_RETRY_ON: [RetryCondition; 5] = [
    RetryCondition::ConnectFailure,
    RetryCondition::RefusedStream,
    RetryCondition::Unavailable,
    RetryCondition::Cancelled,
    RetryCondition::RetriableStatusCodes,
];

pub(super) fn retries(field: &str, r: &RawRetries) -> Result<Retries, Error> {
    let per_try_timeout = opt_duration(&format!("{field}.per_try_timeout"), r.per_try_timeout.as_deref())?;
    if per_try_timeout.is_some_and(|d| d.is_zero()) {
        return Err(invalid(format!("{field}.per_try_timeout"), "must be greater than 0"));
    }
    let mut retry_on = Vec::new();
    let mut codes = Vec::new();
    for (i, item) in r.retry_on.iter().enumerate() {
        let item = item.trim();
        if let Ok(code) = item.parse::<u16>() {
            if !(100..=599).contains(&code) {
                return Err(invalid(format!("{field}.retry_on[{i}]"), format!("{code} is not an HTTP status")));
            }
            codes.push(code);
            continue;
        }
        let Some((_, c)) = RetryCondition::ALL.iter().find(|(n, _)| *n == item) else {
            let names: Vec<_> = RetryCondition::ALL.iter().map(|(n, _)| *n).collect();
            return Err(invalid(
                format!("{field}.retry_on[{i}]"),
                format!("unknown condition {item:?}: expected a status code or one of {}", names.join(", ")),
            ));
        };
        if !retry_on.contains(c) {
            retry_on.push(*c);
        }
    }
    if r.retry_on.is_empty() {
        retry_on = DEFAULT_RETRY_ON.to_vec();
        codes.push(503);
    } else if !codes.is_empty() && !retry_on.contains(&RetryCondition::RetriableStatusCodes) {
        retry_on.push(RetryCondition::RetriableStatusCodes);
    }
    let b = r.backoff.clone().unwrap_or_default();
    let backoff_base = match &b.base_interval {
        Some(s) => positive_duration(&format!("{field}.backoff.base_interval"), s)?,
        None => DEFAULT_BACKOFF_BASE,
    };
    let backoff_max = match &b.max_interval {
        Some(s) => positive_duration(&format!("{field}.backoff.max_interval"), s)?,
        None => backoff_base * 10,
    };
    if backoff_max < backoff_base {
        return Err(invalid(format!("{field}.backoff.max_interval"), "must not be less than base_interval"));
    }
    Ok(Retries {
        attempts: r.attempts,
        per_try_timeout,
        retry_on,
        retriable_status_codes: codes,
        backoff_base,
        backoff_max,
    })
}

pub(super) fn fault(field: &str, f: &RawFault) -> Result<Fault, Error> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err(invalid(field, "give delay, abort or both"));
    }
    let pct = |f: String, p: Option<Percent>| p.unwrap_or(Percent::ALL).check(&f);
    let delay = match &f.delay {
        None => None,
        Some(d) => Some(Delay {
            fixed_delay: parse::duration(&d.fixed_delay)
                .map_err(|e| invalid(format!("{field}.delay.fixed_delay"), e))?,
            percentage: pct(format!("{field}.delay.percentage"), d.percentage)?,
        }),
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let status = match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..=599).contains(&s) => AbortStatus::Http(s),
                (Some(s), None) => {
                    return Err(invalid(
                        format!("{field}.abort.http_status"),
                        format!("{s} is not an HTTP status (200-599)"),
                    ))
                }
                (None, Some(g)) => AbortStatus::Grpc(GrpcCode::parse(g).ok_or_else(|| {
                    invalid(
                        format!("{field}.abort.grpc_status"),
                        format!("unknown gRPC status {g:?}: e.g. UNAVAILABLE or 14"),
                    )
                })?),
                _ => return Err(invalid(format!("{field}.abort"), "give one of http_status or grpc_status")),
            };
            Some(Abort { status, percentage: pct(format!("{field}.abort.percentage"), a.percentage)? })
        }
    };
    Ok(Fault { delay, abort })
}

pub(super) fn mirror(field: &str, m: &RawMirror) -> Result<Mirror, Error> {
    Ok(Mirror {
        cluster: m.cluster.clone(),
        percentage: m.percentage.unwrap_or(Percent::ALL).check(&format!("{field}.percentage"))?,
    })
}

pub(super) fn rate_limit(field: &str, r: &RawRateLimit) -> Result<RateLimit, Error> {
    if r.max_tokens == 0 {
        return Err(invalid(format!("{field}.max_tokens"), "must be greater than 0"));
    }
    let tokens_per_fill = r.tokens_per_fill.unwrap_or(r.max_tokens);
    if tokens_per_fill == 0 {
        return Err(invalid(format!("{field}.tokens_per_fill"), "must be greater than 0"));
    }
    let fill_interval = parse::duration(&r.fill_interval).map_err(|e| invalid(format!("{field}.fill_interval"), e))?;
    // Envoy's lower bound: a finer interval would be a timer storm for nothing.
    if fill_interval < Duration::from_millis(50) {
        return Err(invalid(format!("{field}.fill_interval"), "must be at least 50ms"));
    }
    Ok(RateLimit { max_tokens: r.max_tokens, tokens_per_fill, fill_interval, per_connection: r.per_connection })
}

pub(super) fn consistent_hash(field: &str, c: &RawConsistentHash) -> Result<ConsistentHash, Error> {
    let mut keys = Vec::new();
    if let Some(h) = &c.http_header_name {
        keys.push(HashKey::Header(header_name(&format!("{field}.http_header_name"), h)?));
    }
    if let Some(k) = &c.http_cookie {
        let f = format!("{field}.http_cookie");
        if k.name.is_empty() || !k.name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)) {
            return Err(invalid(format!("{f}.name"), format!("{:?} is not a valid cookie name", k.name)));
        }
        if let Some(p) = &k.path {
            header_value(&format!("{f}.path"), p)?;
            if p.contains(';') {
                return Err(invalid(format!("{f}.path"), format!("{p:?} may not contain ';'")));
            }
        }
        let ttl = opt_duration(&format!("{f}.ttl"), k.ttl.as_deref())?;
        keys.push(HashKey::Cookie { name: k.name.clone(), path: k.path.clone(), ttl });
    }
    if c.use_source_ip {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = &c.http_query_parameter_name {
        if q.is_empty() {
            return Err(invalid(format!("{field}.http_query_parameter_name"), "must not be empty"));
        }
        keys.push(HashKey::QueryParameter(q.clone()));
    }
    if keys.len() != 1 {
        return Err(invalid(
            field,
            "give one of http_header_name, http_cookie, use_source_ip or http_query_parameter_name",
        ));
    }
    let algorithm = match (&c.ring_hash, &c.maglev) {
        (Some(_), Some(_)) => return Err(invalid(field, "give either ring_hash or maglev, not both")),
        (None, Some(m)) => {
            let table_size = m.table_size.unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE);
            if !is_prime(table_size) || table_size > 5_000_011 {
                return Err(invalid(
                    format!("{field}.maglev.table_size"),
                    format!("{table_size} must be a prime up to 5000011"),
                ));
            }
            HashAlgorithm::Maglev { table_size }
        }
        (r, None) => {
            let minimum_ring_size = r.as_ref().and_then(|r| r.minimum_ring_size).unwrap_or(DEFAULT_MINIMUM_RING_SIZE);
            if minimum_ring_size == 0 || minimum_ring_size > 8_388_608 {
                return Err(invalid(format!("{field}.ring_hash.minimum_ring_size"), "must be 1 to 8388608"));
            }
            HashAlgorithm::RingHash { minimum_ring_size }
        }
    };
    Ok(ConsistentHash { key: keys.remove(0), algorithm })
}

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d: &u32| d * d <= n).all(|d| !n.is_multiple_of(d))
}

pub(super) fn tcp_keepalive(field: &str, k: &RawTcpKeepalive) -> Result<TcpKeepalive, Error> {
    let time = opt_duration(&format!("{field}.time"), k.time.as_deref())?;
    let interval = opt_duration(&format!("{field}.interval"), k.interval.as_deref())?;
    for (name, d) in [("time", time), ("interval", interval)] {
        if d.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err(invalid(format!("{field}.{name}"), "must be at least 1s (the kernel counts in seconds)"));
        }
    }
    if k.probes == Some(0) {
        return Err(invalid(format!("{field}.probes"), "must be greater than 0"));
    }
    Ok(TcpKeepalive { probes: k.probes, time, interval })
}

pub(super) fn circuit_breakers(field: &str, c: &RawCircuitBreakers) -> Result<CircuitBreakers, Error> {
    for (name, v) in [("max_connections", c.max_connections), ("max_requests", c.max_requests)] {
        if v == Some(0) {
            return Err(invalid(format!("{field}.{name}"), "must be greater than 0 (leave it out for no limit)"));
        }
    }
    let budget = c.retry_budget.clone().unwrap_or_default();
    Ok(CircuitBreakers {
        max_connections: c.max_connections,
        max_pending_requests: c.max_pending_requests,
        max_requests: c.max_requests,
        max_retries: c.max_retries,
        retry_budget_percent: budget
            .budget_percent
            .unwrap_or(Percent(DEFAULT_RETRY_BUDGET_PERCENT))
            .check(&format!("{field}.retry_budget.budget_percent"))?,
        min_retry_concurrency: budget.min_retry_concurrency.unwrap_or(DEFAULT_MIN_RETRY_CONCURRENCY),
    })
}

pub(super) fn outlier_detection(field: &str, o: &RawOutlierDetection) -> Result<OutlierDetection, Error> {
    let d = |name: &str, s: &Option<String>, default| -> Result<Duration, Error> {
        match s {
            Some(s) => positive_duration(&format!("{field}.{name}"), s),
            None => Ok(default),
        }
    };
    let pct = |name: &str, v: Option<u32>, default: u32| -> Result<u32, Error> {
        let v = v.unwrap_or(default);
        if v > 100 {
            return Err(invalid(format!("{field}.{name}"), format!("{v} is not a percentage: give 0 to 100")));
        }
        Ok(v)
    };
    Ok(OutlierDetection {
        consecutive_5xx_errors: o.consecutive_5xx_errors.unwrap_or(DEFAULT_CONSECUTIVE_5XX),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval: d("interval", &o.interval, DEFAULT_OUTLIER_INTERVAL)?,
        base_ejection_time: d("base_ejection_time", &o.base_ejection_time, DEFAULT_BASE_EJECTION_TIME)?,
        max_ejection_percent: pct("max_ejection_percent", o.max_ejection_percent, DEFAULT_MAX_EJECTION_PERCENT)?,
        min_health_percent: pct("min_health_percent", o.min_health_percent, 0)?,
    })
}

pub(super) fn inbound_ports(field: &str, ports: &[RawInboundPort]) -> Result<Vec<InboundPort>, Error> {
    let mut out: Vec<InboundPort> = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if p.port == 0 {
            return Err(invalid(format!("{f}.port"), "must be 1 to 65535"));
        }
        if out.iter().any(|o| o.port == p.port) {
            return Err(invalid(format!("{f}.port"), format!("port {} is listed twice", p.port)));
        }
        let rate_limit = p.rate_limit.as_ref().map(|r| rate_limit(&format!("{f}.rate_limit"), r)).transpose()?;
        out.push(InboundPort { port: p.port, rate_limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re2_captures_become_regex_crate_captures() {
        assert_eq!(re2_substitution(r"\2/instance/\1"), "${2}/instance/${1}");
        assert_eq!(re2_substitution(r"a$b\\c"), r"a$$b\c");
    }

    #[test]
    fn grpc_status_by_name_or_number() {
        assert_eq!(GrpcCode::parse("UNAVAILABLE"), Some(GrpcCode(14)));
        assert_eq!(GrpcCode::parse("unavailable"), Some(GrpcCode(14)));
        assert_eq!(GrpcCode::parse("8"), Some(GrpcCode::RESOURCE_EXHAUSTED));
        assert_eq!(GrpcCode::parse("17"), None);
        assert_eq!(GrpcCode::parse("NOPE"), None);
    }

    #[test]
    fn regexes_match_the_whole_value() {
        let p = Pattern::whole("f", "v[0-9]+").unwrap();
        assert!(p.regex().is_match("v12"));
        assert!(!p.regex().is_match("xv12"));
        assert!(Pattern::whole("f", "(a").unwrap_err().to_string().starts_with("f: invalid regex"));
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(2) && !is_prime(65536) && !is_prime(1));
    }
}
