//! A routing snapshot: the validated [`Routing`] plus the runtime objects built from it (route
//! table, clusters). The data plane loads the current snapshot once per connection decision and
//! once per HTTP request; the control side builds a new one for each update and swaps the pointer,
//! so requests in flight finish on the snapshot they started with and new ones see the new one.
//! Static settings (the bootstrap) are not in it: they never change while the process runs.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::{
    config::Routing,
    data::{
        cluster::{Cluster, EndpointRegistry},
        names::NameTable,
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
    pub routing: Routing,
    pub origin: Origin,
    pub routes: RouteTable,
    /// By name, in config order for the admin output.
    pub clusters: Vec<Arc<Cluster>>,
    /// The `hosts` section, for the DNS proxy.
    pub names: NameTable,
    /// The addresses the proxy's own sockets are bound to (listeners, their IPv6 companions, the
    /// admin API): a connection to one of them was not redirected and must never be passed
    /// through, or the proxy would connect to itself. Bound addresses rather than configured
    /// ones, so a port 0 in the config is the port the kernel chose.
    pub own_addrs: Vec<SocketAddr>,
}

impl Snapshot {
    pub fn build(
        routing: Routing,
        origin: Origin,
        own_addrs: Vec<SocketAddr>,
        registry: &EndpointRegistry,
        metrics: &Metrics,
    ) -> Self {
        let mut registered = registry.lock();
        let clusters: Vec<Arc<Cluster>> =
            routing.clusters.iter().map(|c| Arc::new(Cluster::new(c, &mut registered, metrics))).collect();
        drop(registered);
        let by_name: HashMap<&str, Arc<Cluster>> = clusters.iter().map(|c| (&*c.name, c.clone())).collect();
        let routes = RouteTable::new(&routing.routes, &by_name, metrics);
        let names = NameTable::new(&routing.hosts);
        Self { routing, origin, routes, clusters, names, own_addrs }
    }
}

/// The current snapshot, swapped atomically by the control side and read lock-free by workers.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
