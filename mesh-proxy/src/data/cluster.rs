//! Clusters and their endpoints as the data plane uses them: balancing, connecting with one retry on
//! another endpoint, per-endpoint counters; each endpoint's HTTP connections (HTTP/1.1 keep-alive,
//! one shared HTTP/2) are its [`pool`].
//!
//! [`pool`]: crate::data::pool
//!
//! Endpoints outlive config snapshots: a reload that keeps `cluster/ip:port` hands the same
//! [`Endpoint`] (its counters and idle connections) to the new snapshot, through the
//! [`EndpointRegistry`].

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::{
    config::{self, LbPolicy, UpstreamProtocol},
    data::{
        balance,
        pool::{self, Pool, Sender, Upstream},
        socket,
    },
    metrics::Metrics,
};

/// The name metrics and logs give traffic forwarded to its original destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Connect timeout for passthrough traffic, which has no cluster settings.
pub const PASSTHROUGH_CONNECT_TIMEOUT: Duration = config::DEFAULT_CONNECT_TIMEOUT;

/// Counters shown by `/clusters`.
#[derive(Debug, Default, Serialize)]
pub struct EndpointStats {
    pub active_connections: AtomicU64,
    pub total_connections: AtomicU64,
    /// Requests (HTTP) or connections (TCP) in flight: the load `least_request` compares.
    pub active_requests: AtomicU64,
    pub total_requests: AtomicU64,
    /// Failed connects, resets and timeouts.
    pub errors: AtomicU64,
}

/// One upstream address of one cluster.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub stats: EndpointStats,
    /// HTTP connections ready for another request.
    pub pool: Pool,
}

/// Decrements `active_connections` when the upstream connection it travels with closes.
pub struct ConnectionGuard(Arc<Endpoint>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.stats.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements `active_requests` when the request or TCP session ends.
pub struct RequestGuard(Arc<Endpoint>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.stats.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, stats: EndpointStats::default(), pool: Pool::default() }
    }

    /// Counts a request (or TCP session) until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> RequestGuard {
        self.stats.active_requests.fetch_add(1, Ordering::Relaxed);
        self.stats.total_requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    pub fn record_error(&self) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Opens a counted TCP connection.
    pub async fn connect(self: &Arc<Self>, timeout: Duration) -> io::Result<(TcpStream, ConnectionGuard)> {
        let stream = socket::connect(self.addr, None, timeout).await?;
        self.stats.active_connections.fetch_add(1, Ordering::Relaxed);
        self.stats.total_connections.fetch_add(1, Ordering::Relaxed);
        Ok((stream, ConnectionGuard(self.clone())))
    }

    /// A pooled connection of the given version if one is usable, else a new one: for HTTP/1.1
    /// an idle one, for HTTP/2 the endpoint's shared one.
    pub async fn http(self: &Arc<Self>, connect_timeout: Duration, h2: bool) -> io::Result<Upstream> {
        if h2 {
            return self.pool.h2(false, || self.connect_h2(connect_timeout)).await;
        }
        match self.pool.checkout().await {
            Some(sender) => Ok(Upstream { sender, reused: true }),
            None => Ok(Upstream { sender: self.connect_http(connect_timeout, false).await?, reused: false }),
        }
    }

    /// Opens a new, counted connection; an HTTP/2 one becomes the endpoint's shared one.
    pub async fn connect_http(self: &Arc<Self>, timeout: Duration, h2: bool) -> io::Result<Sender> {
        if h2 {
            return Ok(self.pool.h2(true, || self.connect_h2(timeout)).await?.sender);
        }
        let (stream, guard) = self.connect(timeout).await?;
        Ok(Sender::Http1(pool::handshake(stream, self.addr, guard).await?))
    }

    async fn connect_h2(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> io::Result<hyper::client::conn::http2::SendRequest<pool::RequestBody>> {
        let (stream, guard) = self.connect(timeout).await?;
        pool::handshake_h2(stream, self.addr, guard).await
    }
}

/// A set of equivalent endpoints and the policy that spreads load over them.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub policy: LbPolicy,
    pub connect_timeout: Duration,
    /// The HTTP version requests are sent to its endpoints in.
    pub protocol: UpstreamProtocol,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Round-robin cursor; shared by all threads, so relaxed atomic increments.
    rr: AtomicUsize,
    connect_failures: Counter,
}

/// No endpoint of a cluster could be connected to.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cluster {cluster} has no endpoints")]
    NoEndpoints { cluster: Arc<str> },
    #[error("cluster {cluster}: endpoint {addr}: {source}")]
    Failed { cluster: Arc<str>, addr: SocketAddr, source: io::Error },
}

impl Cluster {
    pub fn new(c: &config::Cluster, registry: &mut Registered<'_>, metrics: &Metrics) -> Self {
        let name: Arc<str> = Arc::from(c.name.as_str());
        let endpoints = c.endpoints.iter().map(|a| registry.get(&name, *a)).collect();
        Self {
            connect_failures: metrics.connect_failures(&name),
            name,
            policy: c.lb_policy,
            connect_timeout: c.connect_timeout,
            protocol: c.protocol,
            endpoints,
            rr: AtomicUsize::new(0),
        }
    }

    /// The original destination of one downstream connection as a cluster (Istio's
    /// PassthroughCluster), for HTTP requests no route claims.
    pub fn passthrough(addr: SocketAddr, connect_timeout: Duration, connect_failures: Counter) -> Self {
        Self {
            name: Arc::from(PASSTHROUGH_CLUSTER),
            policy: LbPolicy::RoundRobin,
            connect_timeout,
            // The application chose the protocol for the destination it dialled.
            protocol: UpstreamProtocol::Auto,
            endpoints: vec![Arc::new(Endpoint::new(addr))],
            rr: AtomicUsize::new(0),
            connect_failures,
        }
    }

    /// Picks an endpoint by the cluster's policy, avoiding `exclude`.
    pub fn pick(&self, exclude: Option<usize>) -> Option<usize> {
        balance::with_rng(|rng| {
            balance::pick_endpoint(
                self.policy,
                self.endpoints.len(),
                exclude,
                &self.rr,
                |i| self.endpoints[i].stats.active_requests.load(Ordering::Relaxed),
                rng,
            )
        })
    }

    pub fn record_connect_failure(&self, endpoint: &Endpoint, error: &io::Error) {
        endpoint.record_error();
        self.connect_failures.inc();
        tracing::warn!(cluster = %self.name, endpoint = %endpoint.addr, %error, "upstream connect failed");
    }

    /// Connects to an endpoint picked by the cluster's policy with `connect`; a failed connect is
    /// counted against its endpoint and retried once on another one. The one place that decides
    /// which endpoint a connection goes to, for TCP sessions and HTTP requests alike.
    pub async fn connect<'a, T, F, Fut>(&'a self, mut connect: F) -> Result<(&'a Arc<Endpoint>, T), ConnectError>
    where
        F: FnMut(&'a Arc<Endpoint>) -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        let mut exclude = None;
        let mut last = None;
        for _ in 0..2 {
            let Some(i) = self.pick(exclude) else { break };
            let ep = &self.endpoints[i];
            match connect(ep).await {
                Ok(c) => return Ok((ep, c)),
                Err(e) => {
                    self.record_connect_failure(ep, &e);
                    exclude = Some(i);
                    last = Some((ep.addr, e));
                }
            }
        }
        Err(match last {
            Some((addr, source)) => ConnectError::Failed { cluster: self.name.clone(), addr, source },
            None => ConnectError::NoEndpoints { cluster: self.name.clone() },
        })
    }
}

/// Cluster name and address.
type EndpointKey = (Arc<str>, SocketAddr);

/// Hands out the same [`Endpoint`] for the same cluster name and address across reloads, so
/// counters and pooled connections survive an update that keeps the endpoint.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    endpoints: Mutex<HashMap<EndpointKey, Weak<Endpoint>>>,
}

/// The registry locked for one snapshot build: one lock for all its endpoints.
pub struct Registered<'a>(std::sync::MutexGuard<'a, HashMap<EndpointKey, Weak<Endpoint>>>);

impl Registered<'_> {
    pub fn get(&mut self, cluster: &Arc<str>, addr: SocketAddr) -> Arc<Endpoint> {
        let key = (cluster.clone(), addr);
        if let Some(ep) = self.0.get(&key).and_then(Weak::upgrade) {
            return ep;
        }
        let ep = Arc::new(Endpoint::new(addr));
        self.0.insert(key, Arc::downgrade(&ep));
        ep
    }
}

impl EndpointRegistry {
    /// Locks the registry for a snapshot build.
    pub fn lock(&self) -> Registered<'_> {
        Registered(self.endpoints.lock().expect("registry lock poisoned"))
    }

    /// Forgets the endpoints no snapshot holds any more: once per update, after the swap (it was
    /// once per lookup, which made a 10,000-route config take 35 s to load).
    pub fn prune(&self) {
        self.endpoints.lock().expect("registry lock poisoned").retain(|_, w| w.strong_count() > 0);
    }
}
