//! The data plane: every accepted connection, from the listening socket to the upstream.
//!
//! In the order a connection meets it:
//! - [`accept`]: listening sockets and accept loops, kept across reloads when unchanged;
//! - [`orig_dst`]: where a redirected connection was going (`SO_ORIGINAL_DST`);
//! - [`dispatch`]: the decision per connection (inbound, routed, detect, passthrough, refused), as data;
//! - [`connection`]: carries that decision out, with [`detect`] (HTTP/1 or opaque, from the first
//!   bytes, with a bounded wait) where the plan leaves the protocol open;
//! - [`http`]: a hyper server per downstream connection, a route per request, the request forwarded
//!   on a connection from the endpoint's [`pool`];
//! - [`tcp`]: a session per connection (routed or passthrough), bytes spliced (zero-copy) with half-close;
//!   [`inbound`]: to the local application from 127.0.0.6; [`socket`]: connecting upstream;
//! - [`snapshot`]: the routing state the control side builds and swaps: the [`route`] table, the
//!   [`cluster`]s with their endpoints (connecting, with one retry on another endpoint) and the
//!   [`names`] the DNS proxy answers;
//!   [`balance`]: the load-balancing choices; [`policy`]: a rule's and a cluster's traffic
//!   policies (retries, fault injection, the retry budget) as the request path applies them.
//!
//! [`Proxy`] is what every connection task shares. Nothing here imports the control side, and no
//! two files here import each other: the leaves ([`socket`], [`pool`], [`balance`]) know nothing
//! of clusters or routes, which know nothing of sessions.

pub mod accept;
pub mod balance;
pub mod cluster;
pub mod connection;
pub mod detect;
pub mod dispatch;
pub mod http;
pub mod inbound;
pub mod names;
pub mod orig_dst;
pub mod policy;
pub mod pool;
pub mod route;
pub mod snapshot;
pub mod socket;
pub mod tcp;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;

use crate::{
    data::{
        cluster::{Cluster, PASSTHROUGH_CLUSTER, PASSTHROUGH_CONNECT_TIMEOUT},
        inbound::LocalAddrs,
        snapshot::SharedSnapshot,
    },
    metrics::{Metrics, RequestCounters},
};

/// Everything a data-plane task needs; one per process, shared by all workers.
pub struct Proxy {
    /// The config in force; loaded (an atomic pointer read) per connection and per request.
    pub snapshot: SharedSnapshot,
    pub metrics: Arc<Metrics>,
    /// This namespace's addresses, to tell inbound from outbound; refreshed by the control plane.
    pub local_addrs: ArcSwap<LocalAddrs>,
    /// Requests forwarded to their original destination.
    pub passthrough_counters: RequestCounters,
    /// The route name access logs give those requests, made once rather than per request.
    pub passthrough_route: Arc<str>,
    pub(crate) passthrough_connect_failures: Counter,
    pub(crate) passthrough_tcp: Counter,
    pub(crate) inbound_tcp: Counter,
    /// The bootstrap's `tcp_idle_timeout`, fixed for the life of the process.
    pub tcp_idle_timeout: Duration,
    /// The bootstrap's `stream_idle_timeout`, likewise.
    pub stream_idle_timeout: Duration,
}

impl Proxy {
    pub fn new(
        snapshot: SharedSnapshot,
        metrics: Arc<Metrics>,
        local_addrs: LocalAddrs,
        tcp_idle_timeout: Duration,
        stream_idle_timeout: Duration,
    ) -> Self {
        Self {
            passthrough_counters: metrics.request_counters("passthrough", PASSTHROUGH_CLUSTER),
            passthrough_route: Arc::from("passthrough"),
            passthrough_connect_failures: metrics.connect_failures(PASSTHROUGH_CLUSTER),
            passthrough_tcp: metrics.tcp_counter("passthrough", PASSTHROUGH_CLUSTER),
            inbound_tcp: metrics.tcp_counter("inbound", "InboundPassthroughCluster"),
            snapshot,
            metrics,
            local_addrs: ArcSwap::from_pointee(local_addrs),
            tcp_idle_timeout,
            stream_idle_timeout,
        }
    }

    pub fn passthrough_cluster(&self, dst: SocketAddr) -> Cluster {
        Cluster::passthrough(dst, PASSTHROUGH_CONNECT_TIMEOUT, self.passthrough_connect_failures.clone())
    }
}
