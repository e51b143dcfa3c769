//! Prometheus metrics, served by the admin server at `/metrics` (Istio's names in comments).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// `listeners`, `routes`, `clusters` or `endpoints`.
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// `config` (a debounced full build) or `endpoints` (an endpoint change).
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    /// From a change reaching mesh-pilot to a proxy receiving a snapshot with it
    /// (`pilot_proxy_convergence_time`).
    pub push_latency: Histogram,
    /// Proxies that polled within the last two long-poll periods (`pilot_xds`).
    pub proxies_connected: Gauge,
    /// Updates proxies reported as rejected (`pilot_total_xds_rejects`).
    pub nacks: Family<TypeLabels, Counter>,
    /// Time to build snapshots (`pilot_xds_push_time` is the closest).
    pub build_seconds: Family<BuildLabels, Histogram>,
    /// Answers by type: full bodies, deltas, 304s.
    pub responses: Family<ResponseLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub r#type: String,
    /// `full`, `delta` or `not_modified`.
    pub answer: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0].into_iter()
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("mesh_pilot");
        let push_latency = Histogram::new(latency_buckets());
        registry.register(
            "push_latency_seconds",
            "From a change seen by mesh-pilot to a proxy receiving it",
            push_latency.clone(),
        );
        let proxies_connected = Gauge::default();
        registry.register("proxies_connected", "Proxies that polled recently", proxies_connected.clone());
        let nacks = Family::<TypeLabels, Counter>::default();
        registry.register("nacks", "Updates the proxies reported as rejected", nacks.clone());
        let build_seconds =
            Family::<BuildLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "snapshot_build_seconds",
            "Time to build the snapshots of every scope",
            build_seconds.clone(),
        );
        let responses = Family::<ResponseLabels, Counter>::default();
        registry.register("discovery_responses", "Discovery answers by type and kind", responses.clone());
        Metrics { registry, push_latency, proxies_connected, nacks, build_seconds, responses }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
