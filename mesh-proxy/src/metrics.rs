//! Prometheus metrics, served as text by the admin API at `/stats/prometheus`.
//!
//! Label lookups in a `Family` take a lock, so the data plane never does them per request: the
//! handles it needs ([`RequestCounters`], a listener's connection counters) are looked up once when a
//! config snapshot or listener is built and cloned into it (a handle is an `Arc` to the value).

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub cluster: String,
    pub response_class: ResponseClass,
}

/// `2xx` .. `5xx`, as Envoy's `response_code_class` (the rare `1xx` final status is counted as `2xx`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ResponseClass {
    C2xx,
    C3xx,
    C4xx,
    C5xx,
}

impl EncodeLabelValue for ResponseClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Self::C2xx => "2xx",
            Self::C3xx => "3xx",
            Self::C4xx => "4xx",
            Self::C5xx => "5xx",
        })
    }
}

impl ResponseClass {
    const ALL: [ResponseClass; 4] = [Self::C2xx, Self::C3xx, Self::C4xx, Self::C5xx];

    fn index(status: u16) -> usize {
        match status {
            0..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    /// `file` or `discovery`.
    pub source: String,
    /// `applied` or `rejected`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub route: String,
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// `udp` or `tcp`.
    pub transport: String,
    /// `local` (from the config's names), `cache`, `upstream`, `failed` (SERVFAIL: no upstream
    /// answered) or `refused` (FORMERR, NOTIMP).
    pub answer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub route: String,
    /// `delay` or `abort`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub cluster: String,
    /// `retry` (one sent), `overflow` (not sent: the retry budget was spent) or `per_try_timeout`.
    pub event: String,
}

/// Every metric the proxy exports.
pub struct Metrics {
    /// Owns the descriptions; only read when encoding.
    registry: Registry,
    pub downstream_connections: Family<ListenerLabels, Counter>,
    pub downstream_connections_active: Family<ListenerLabels, Gauge>,
    pub requests: Family<RequestLabels, Counter>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub upstream_connect_failures: Family<ClusterLabels, Counter>,
    /// Requests a circuit breaker answered 503 (Envoy's `upstream_rq_pending_overflow`).
    pub upstream_rq_pending_overflow: Family<ClusterLabels, Counter>,
    pub outlier_ejections: Family<ClusterLabels, Counter>,
    pub outlier_ejections_active: Family<ClusterLabels, Gauge>,
    pub config_updates: Family<UpdateLabels, Counter>,
    /// Discovery polls that got no usable answer (unreachable, non-200); not a rejection.
    pub discovery_fetch_errors: Counter,
    pub dns_queries: Family<DnsLabels, Counter>,
    pub faults: Family<FaultLabels, Counter>,
    pub retry_events: Family<RetryLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh_proxy");
        let m = Self {
            registry: Registry::default(),
            downstream_connections: Family::default(),
            downstream_connections_active: Family::default(),
            requests: Family::default(),
            tcp_connections: Family::default(),
            upstream_connect_failures: Family::default(),
            upstream_rq_pending_overflow: Family::default(),
            outlier_ejections: Family::default(),
            outlier_ejections_active: Family::default(),
            config_updates: Family::default(),
            discovery_fetch_errors: Counter::default(),
            dns_queries: Family::default(),
            faults: Family::default(),
            retry_events: Family::default(),
        };
        registry.register("downstream_connections", "Connections accepted", m.downstream_connections.clone());
        registry.register(
            "downstream_connections_active",
            "Connections open now",
            m.downstream_connections_active.clone(),
        );
        registry.register("requests", "HTTP requests by route, cluster and response class", m.requests.clone());
        registry.register("tcp_connections", "TCP connections proxied by route and cluster", m.tcp_connections.clone());
        registry.register(
            "upstream_connect_failures",
            "Failed connects to an upstream endpoint",
            m.upstream_connect_failures.clone(),
        );
        registry.register(
            "upstream_rq_pending_overflow",
            "Requests answered 503 by a circuit breaker (connections, pending requests, requests in flight)",
            m.upstream_rq_pending_overflow.clone(),
        );
        registry.register("outlier_ejections", "Endpoints ejected by outlier detection", m.outlier_ejections.clone());
        registry.register(
            "outlier_ejections_active",
            "Endpoints ejected by outlier detection now",
            m.outlier_ejections_active.clone(),
        );
        registry.register("config_updates", "Configuration updates by source and result", m.config_updates.clone());
        registry.register(
            "discovery_fetch_errors",
            "Discovery polls without a usable answer",
            m.discovery_fetch_errors.clone(),
        );
        registry.register("dns_queries", "DNS queries by transport and how they were answered", m.dns_queries.clone());
        let access = &*crate::logging::access::COUNTERS;
        registry.register("access_log_lines", "Access-log lines queued for writing", access.lines.clone());
        registry.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because their writer fell behind",
            access.dropped.clone(),
        );
        registry.register("faults_injected", "Delays and aborts injected by route", m.faults.clone());
        registry.register(
            "upstream_retry_events",
            "Retries sent, retries refused by the retry budget, and tries past their per-try timeout",
            m.retry_events.clone(),
        );
        Self { registry, ..m }
    }

    /// The counters for one route → cluster pair, indexed by response class.
    pub fn request_counters(&self, route: &str, cluster: &str) -> RequestCounters {
        RequestCounters(ResponseClass::ALL.map(|response_class| {
            self.requests
                .get_or_create(&RequestLabels {
                    route: route.to_string(),
                    cluster: cluster.to_string(),
                    response_class,
                })
                .clone()
        }))
    }

    pub fn tcp_counter(&self, route: &str, cluster: &str) -> Counter {
        self.tcp_connections.get_or_create(&TcpLabels { route: route.into(), cluster: cluster.into() }).clone()
    }

    pub fn connect_failures(&self, cluster: &str) -> Counter {
        self.upstream_connect_failures.get_or_create(&ClusterLabels { cluster: cluster.into() }).clone()
    }

    pub fn overflows(&self, cluster: &str) -> Counter {
        self.upstream_rq_pending_overflow.get_or_create(&ClusterLabels { cluster: cluster.into() }).clone()
    }

    pub fn outlier_ejections(&self, cluster: &str) -> Counter {
        self.outlier_ejections.get_or_create(&ClusterLabels { cluster: cluster.into() }).clone()
    }

    pub fn outlier_ejections_active(&self, cluster: &str) -> Gauge {
        self.outlier_ejections_active.get_or_create(&ClusterLabels { cluster: cluster.into() }).clone()
    }

    pub fn dns_query(&self, transport: &str, answer: &str) -> Counter {
        self.dns_queries.get_or_create(&DnsLabels { transport: transport.into(), answer: answer.into() }).clone()
    }

    pub fn fault(&self, route: &str, kind: &str) -> Counter {
        self.faults.get_or_create(&FaultLabels { route: route.into(), kind: kind.into() }).clone()
    }

    pub fn retry_counter(&self, cluster: &str, event: &str) -> Counter {
        self.retry_events.get_or_create(&RetryLabels { cluster: cluster.into(), event: event.into() }).clone()
    }

    pub fn config_update(&self, source: &str, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.config_updates.get_or_create(&UpdateLabels { source: source.into(), result: result.into() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Request counters of one route → cluster pair, resolved once per snapshot.
#[derive(Clone, Debug)]
pub struct RequestCounters([Counter; 4]);

impl RequestCounters {
    pub fn record(&self, status: u16) {
        self.0[ResponseClass::index(status)].inc();
    }
}
