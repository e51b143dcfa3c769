//! A config snapshot: the validated [`Config`] plus the runtime objects built from it (route table,
//! clusters). The data plane loads the current snapshot once per connection decision and once per
//! HTTP request; a reload builds a new one and swaps the pointer, so requests in flight finish on
//! the snapshot they started with and new ones see the new one.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::{
    config::Config,
    data::{
        cluster::{Cluster, EndpointRegistry},
        route::RouteTable,
    },
    metrics::Metrics,
};

/// Where a config came from and which version it is, for `/config_dump`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// `file:<path>`, or `discovery:<url>` when a discovery answer contributed.
    pub source: String,
    /// The file's content hash, plus the discovery `version_info`s.
    pub version: String,
}

#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub origin: Origin,
    pub routes: RouteTable,
    /// By name, in config order for the admin output.
    pub clusters: Vec<Arc<Cluster>>,
}

impl Snapshot {
    pub fn build(config: Config, origin: Origin, registry: &EndpointRegistry, metrics: &Metrics) -> Self {
        let clusters: Vec<Arc<Cluster>> =
            config.clusters.iter().map(|c| Arc::new(Cluster::new(c, registry, metrics))).collect();
        let by_name: HashMap<&str, Arc<Cluster>> = clusters.iter().map(|c| (&*c.name, c.clone())).collect();
        let routes = RouteTable::new(&config.routes, &by_name, metrics);
        Self { config: Arc::new(config), origin, routes, clusters }
    }
}

/// The current snapshot, swapped atomically by the control plane and read lock-free by workers.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
