//! Clusters and their endpoints as the data plane uses them: balancing, connecting with one retry on
//! another endpoint, per-endpoint counters; each endpoint's HTTP connections (HTTP/1.1 keep-alive,
//! one shared HTTP/2) are its [`pool`].
//!
//! [`pool`]: crate::data::pool
//!
//! Endpoints outlive config snapshots: a reload that keeps `cluster/ip:port` hands the same
//! [`Endpoint`] (its counters, idle connections and outlier record) to the new snapshot, through
//! the [`EndpointRegistry`], and a cluster's circuit-breaker counts likewise.
//!
//! A cluster's traffic policy, each part an `Option` a cluster without it skips in one branch:
//! consistent hashing (`balance::hash`), circuit breakers ([`limits`]), outlier detection
//! ([`outlier`]).

pub mod limits;
pub mod outlier;

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

use http::{header, HeaderMap, HeaderValue, Uri};
use prometheus_client::metrics::counter::Counter;

use self::{
    limits::{Limits, Load, Overflow, RequestPermit},
    outlier::{Detector, Outcome},
};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::{
    config::{self, HashAlgorithm, HashKey, LbPolicy, TcpKeepalive, UpstreamProtocol},
    data::{
        balance::{
            self,
            hash::{key_hash, HashTable},
        },
        policy::RetryBudget,
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
    /// The circuit-breaker counts of its cluster (shared by all the cluster's endpoints).
    pub load: Arc<Load>,
    /// Its consecutive errors and ejection, for outlier detection.
    pub outlier: Arc<outlier::State>,
    /// A task closes its connections idle past the cluster's `idle_timeout` (one at a time).
    sweeping: std::sync::atomic::AtomicBool,
}

/// Decrements `active_connections` when the upstream connection it travels with closes.
pub struct ConnectionGuard(Arc<Endpoint>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.stats.active_connections.fetch_sub(1, Ordering::Relaxed);
        self.0.load.closed();
    }
}

/// Decrements `active_requests` when the request or TCP session ends, and releases the request's
/// place under its cluster's `max_requests`.
pub struct RequestGuard(Arc<Endpoint>, Option<RequestPermit>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.stats.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RequestGuard {
    /// Holds the request's `permit` as long as the request.
    pub fn with(mut self, permit: Option<RequestPermit>) -> Self {
        self.1 = permit;
        self
    }
}

impl Endpoint {
    pub fn new(addr: SocketAddr, load: Arc<Load>) -> Self {
        Self {
            addr,
            stats: EndpointStats::default(),
            pool: Pool::default(),
            load,
            outlier: Arc::default(),
            sweeping: Default::default(),
        }
    }

    /// Counts a request (or TCP session) until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> RequestGuard {
        self.stats.active_requests.fetch_add(1, Ordering::Relaxed);
        self.stats.total_requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone(), None)
    }

    pub fn record_error(&self) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Opens a counted TCP connection.
    pub async fn connect(self: &Arc<Self>, dial: &Dial) -> io::Result<(TcpStream, ConnectionGuard)> {
        self.open(dial, false).await
    }

    /// Opens a counted TCP connection; `reserved`: its cluster's [`Load`] already counts it (and
    /// is told when the connect fails).
    async fn open(self: &Arc<Self>, dial: &Dial, reserved: bool) -> io::Result<(TcpStream, ConnectionGuard)> {
        let connected = socket::connect(self.addr, None, dial.timeout).await;
        let connected = match (connected, &dial.keepalive) {
            (Ok(s), Some(k)) => socket::keepalive(&s, k.time, k.interval, k.probes).map(|()| s),
            (c, _) => c,
        };
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                if reserved {
                    self.load.closed();
                }
                return Err(e);
            }
        };
        if !reserved {
            self.load.opened();
        }
        self.stats.active_connections.fetch_add(1, Ordering::Relaxed);
        self.stats.total_connections.fetch_add(1, Ordering::Relaxed);
        Ok((stream, ConnectionGuard(self.clone())))
    }

    /// Returns a connection whose response was read to the end, and tells the requests waiting
    /// for one under a connection limit. Under an `idle_timeout`, makes sure a sweeper runs.
    pub fn checkin(self: &Arc<Self>, sender: Sender) {
        let timeout = self.load.idle_timeout();
        self.pool.checkin(sender, timeout.map(|_| std::time::Instant::now()));
        self.load.wake();
        if timeout.is_some() && !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().sweep());
        }
    }

    /// Closes the connections idle past the cluster's `idle_timeout`, every `idle_timeout`, until
    /// none is idle (a connection may so stay idle up to twice the timeout).
    async fn sweep(self: Arc<Self>) {
        while let Some(t) = self.load.idle_timeout() {
            tokio::time::sleep(t).await;
            let left = std::time::Instant::now().checked_sub(t).map_or(1, |d| self.pool.close_idle_before(d));
            if left > 0 {
                continue;
            }
            self.sweeping.store(false, Ordering::Release);
            // A connection returned meanwhile saw the sweeper running: take it on again.
            if self.pool.idle_connections() == 0 || self.sweeping.swap(true, Ordering::AcqRel) {
                return;
            }
        }
        self.sweeping.store(false, Ordering::Release);
    }

    /// A pooled connection of the given version if one is usable, else a new one: for HTTP/1.1
    /// an idle one, for HTTP/2 the endpoint's shared one.
    pub async fn http(self: &Arc<Self>, dial: &Dial, h2: bool) -> io::Result<Upstream> {
        if h2 {
            return self.pool.h2(false, || self.connect_h2(dial)).await;
        }
        match self.pool.checkout().await {
            Some(sender) => Ok(Upstream { sender, reused: true }),
            None => Ok(Upstream { sender: self.connect_http(dial, false).await?, reused: false }),
        }
    }

    /// Opens a new, counted connection; an HTTP/2 one becomes the endpoint's shared one.
    pub async fn connect_http(self: &Arc<Self>, dial: &Dial, h2: bool) -> io::Result<Sender> {
        if h2 {
            return Ok(self.pool.h2(true, || self.connect_h2(dial)).await?.sender);
        }
        self.connect_http1(dial, false).await
    }

    async fn connect_http1(self: &Arc<Self>, dial: &Dial, reserved: bool) -> io::Result<Sender> {
        let (stream, guard) = self.open(dial, reserved).await?;
        Ok(Sender::Http1(pool::handshake(stream, self.addr, guard).await?, 1))
    }

    async fn connect_h2(
        self: &Arc<Self>,
        dial: &Dial,
    ) -> io::Result<hyper::client::conn::http2::SendRequest<pool::RequestBody>> {
        let (stream, guard) = self.connect(dial).await?;
        pool::handshake_h2(stream, self.addr, guard).await
    }
}

/// How a cluster's endpoints are connected to.
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    pub timeout: Duration,
    /// TCP keepalive on its connections (Istio's `connectionPool.tcp.tcpKeepalive`); unset fields
    /// keep the kernel's values.
    pub keepalive: Option<TcpKeepalive>,
}

/// A set of equivalent endpoints and the policy that spreads load over them.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub policy: LbPolicy,
    /// How its endpoints are connected to.
    pub dial: Dial,
    /// The HTTP version requests are sent to its endpoints in.
    pub protocol: UpstreamProtocol,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Consistent hashing, which replaces `policy` for requests that carry the key.
    hash: Option<HashPolicy>,
    /// An HTTP/1.1 connection is closed after carrying this many requests (the last one is sent
    /// with `connection: close`, so the endpoint knows too).
    pub max_requests_per_connection: Option<u32>,
    /// Circuit breakers; their counts are in every endpoint's `load`.
    limits: Option<Limits>,
    /// The same `Load` as the endpoints', for clusters without endpoints too.
    load: Arc<Load>,
    outlier: Option<Detector>,
    /// Round-robin cursor; shared by all threads, so relaxed atomic increments.
    rr: AtomicUsize,
    connect_failures: Counter,
    /// Requests answered 503 by a circuit breaker.
    overflows: Counter,
    /// Bounds the retries of every rule that sends here (`data::policy`); none for the
    /// passthrough cluster, which no rule (so no retry policy) sends to.
    pub retry_budget: Option<RetryBudget>,
}

/// A cluster's consistent hashing: what the key is, and the table built from its endpoints.
#[derive(Debug)]
struct HashPolicy {
    key: HashKey,
    table: HashTable,
}

/// Where one request must go by its key: the key's hash, and the cookie to issue with the response
/// when the key is a cookie the request did not have.
#[derive(Debug)]
pub struct Affinity {
    pub hash: u64,
    pub set_cookie: Option<HeaderValue>,
}

/// No endpoint of a cluster could be connected to.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cluster {cluster} has no endpoints")]
    NoEndpoints { cluster: Arc<str> },
    #[error("cluster {cluster}: endpoint {addr}: {source}")]
    Failed { cluster: Arc<str>, addr: SocketAddr, source: io::Error },
    #[error("cluster {cluster}: {source}")]
    Overflow { cluster: Arc<str>, source: Overflow },
}

impl Cluster {
    pub fn new(c: &config::Cluster, registry: &mut Registered<'_>, metrics: &Metrics) -> Self {
        let name: Arc<str> = Arc::from(c.name.as_str());
        let load = registry.load(&name);
        load.set_idle_timeout(c.idle_timeout);
        let endpoints = c.endpoints.iter().map(|a| registry.get(&name, *a, &load)).collect();
        let hash = c.consistent_hash.as_ref().map(|h| HashPolicy {
            key: h.key.clone(),
            table: match h.algorithm {
                HashAlgorithm::RingHash { minimum_ring_size } => HashTable::ring(&c.endpoints, minimum_ring_size),
                HashAlgorithm::Maglev { table_size } => HashTable::maglev(&c.endpoints, table_size),
            },
        });
        Self {
            connect_failures: metrics.connect_failures(&name),
            name,
            policy: c.lb_policy,
            dial: Dial { timeout: c.connect_timeout, keepalive: c.tcp_keepalive },
            protocol: c.protocol,
            endpoints,
            hash,
            max_requests_per_connection: c.max_requests_per_connection,
            limits: Limits::new(&c.circuit_breakers),
            load,
            outlier: c.outlier_detection.clone().map(|o| {
                Detector::new(o, metrics.outlier_ejections(&c.name), metrics.outlier_ejections_active(&c.name))
            }),
            rr: AtomicUsize::new(0),
            overflows: metrics.overflows(&c.name),
            retry_budget: Some(RetryBudget::new(&c.name, &c.circuit_breakers, metrics)),
        }
    }

    /// The request's consistent-hash key, when the cluster hashes and the request has the key (or
    /// the cluster issues the cookie); `None` sends it by the cluster's `policy`, as Envoy does
    /// with a request that has no key.
    pub fn affinity(&self, uri: &Uri, headers: &HeaderMap, peer: SocketAddr) -> Option<Affinity> {
        let hash = self.hash.as_ref()?;
        let keyed = |key: &[u8]| Some(Affinity { hash: key_hash(key), set_cookie: None });
        match &hash.key {
            HashKey::Header(name) => keyed(headers.get(name.as_str())?.as_bytes()),
            HashKey::SourceIp => self.source_hash(peer).map(|hash| Affinity { hash, set_cookie: None }),
            HashKey::QueryParameter(name) => {
                let value = uri.query()?.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                })?;
                keyed(value.as_bytes())
            }
            HashKey::Cookie { name, path, ttl } => {
                if let Some(v) = cookie(headers, name) {
                    return keyed(v);
                }
                // Without a ttl the cookie is only read, never issued (Istio's semantics).
                let ttl = (*ttl)?;
                let value = format!("{:016x}", balance::with_rng(rand::Rng::random::<u64>));
                let mut set = format!("{name}={value}");
                if !ttl.is_zero() {
                    set.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
                }
                if let Some(p) = path {
                    set.push_str(&format!("; Path={p}"));
                }
                set.push_str("; HttpOnly");
                Some(Affinity { hash: key_hash(value.as_bytes()), set_cookie: HeaderValue::try_from(set).ok() })
            }
        }
    }

    /// The hash of the client's address when the cluster hashes by source IP (TCP sessions too).
    pub fn source_hash(&self, peer: SocketAddr) -> Option<u64> {
        match self.hash.as_ref()?.key {
            HashKey::SourceIp => Some(match peer.ip() {
                std::net::IpAddr::V4(ip) => key_hash(&ip.octets()),
                std::net::IpAddr::V6(ip) => key_hash(&ip.octets()),
            }),
            _ => None,
        }
    }

    /// The original destination of one downstream connection as a cluster (Istio's
    /// PassthroughCluster), for HTTP requests no route claims.
    pub fn passthrough(addr: SocketAddr, connect_timeout: Duration, connect_failures: Counter) -> Self {
        let load = Arc::new(Load::default());
        Self {
            name: Arc::from(PASSTHROUGH_CLUSTER),
            policy: LbPolicy::RoundRobin,
            dial: Dial { timeout: connect_timeout, keepalive: None },
            // The application chose the protocol for the destination it dialled.
            protocol: UpstreamProtocol::Auto,
            endpoints: vec![Arc::new(Endpoint::new(addr, load.clone()))],
            hash: None,
            max_requests_per_connection: None,
            limits: None,
            load,
            outlier: None,
            rr: AtomicUsize::new(0),
            connect_failures,
            overflows: Counter::default(),
            retry_budget: None,
        }
    }

    /// Picks an endpoint by the request's key `hash` if it has one, else by the cluster's policy,
    /// avoiding `exclude`.
    pub fn pick(&self, hash: Option<u64>, exclude: Option<usize>) -> Option<usize> {
        let ejecting = self.outlier.as_ref().is_some_and(|d| d.honoured(self.endpoints.iter().map(|e| &e.outlier)));
        let usable = |i: usize| Some(i) != exclude && !(ejecting && self.endpoints[i].outlier.is_ejected());
        if let (Some(h), Some(policy)) = (hash, &self.hash) {
            return policy.table.pick(h, usable);
        }
        let load = |i: usize| self.endpoints[i].stats.active_requests.load(Ordering::Relaxed);
        if !ejecting {
            return balance::with_rng(|rng| {
                balance::pick_endpoint(self.policy, self.endpoints.len(), exclude, &self.rr, load, rng)
            });
        }
        // Some endpoints are ejected: balance over the others (a list made only meanwhile).
        let healthy: Vec<usize> = (0..self.endpoints.len()).filter(|&i| usable(i)).collect();
        let j = balance::with_rng(|rng| {
            balance::pick_endpoint(self.policy, healthy.len(), None, &self.rr, |j| load(healthy[j]), rng)
        })?;
        Some(healthy[j])
    }

    /// A place for one more request under the cluster's `max_requests`, if it has one.
    pub fn admit(&self) -> Result<Option<RequestPermit>, ConnectError> {
        match self.limits.and_then(|l| l.max_requests) {
            None => Ok(None),
            Some(max) => self.load.admit(max).map(Some).map_err(|e| self.overflow(e)),
        }
    }

    /// Counts a request a circuit breaker refused.
    fn overflow(&self, source: Overflow) -> ConnectError {
        self.overflows.inc();
        ConnectError::Overflow { cluster: self.name.clone(), source }
    }

    /// An HTTP connection to `ep`: as [`Endpoint::http`], within the cluster's `max_connections`.
    /// At the bound, the request waits for a connection to come back to `ep`'s pool or to close
    /// (closing an idle one of another endpoint to make room), if fewer than
    /// `max_pending_requests` are waiting already; otherwise it overflows.
    pub async fn http(&self, ep: &Arc<Endpoint>, h2: bool) -> io::Result<Upstream> {
        let Some(max) = self.limits.and_then(|l| l.max_connections).filter(|_| !h2) else {
            return ep.http(&self.dial, h2).await;
        };
        let mut pending = None;
        loop {
            let freed = ep.load.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(sender) = ep.pool.checkout().await {
                return Ok(Upstream { sender, reused: true });
            }
            if ep.load.try_reserve(max) {
                return Ok(Upstream { sender: ep.connect_http1(&self.dial, true).await?, reused: false });
            }
            if pending.is_none() {
                let max_pending = self.limits.and_then(|l| l.max_pending);
                pending = Some(ep.load.enter_pending(max_pending).map_err(io::Error::other)?);
                // Room may be held by idle connections to other endpoints: close one.
                let _ = self.endpoints.iter().any(|other| !Arc::ptr_eq(other, ep) && other.pool.evict_idle());
            }
            freed.await;
        }
    }

    /// Counts how an exchange with `ep` ended, for outlier detection; ejects it when that is its
    /// last straw.
    pub fn record_outcome(&self, ep: &Arc<Endpoint>, outcome: Outcome) {
        if let Some(d) = &self.outlier {
            if d.record(&ep.outlier, outcome, self.endpoints.iter().map(|e| &e.outlier)) {
                tracing::warn!(cluster = %self.name, endpoint = %ep.addr, ?outcome, "endpoint ejected by outlier detection");
            }
        }
    }

    /// Requests (or TCP sessions) in flight to all its endpoints.
    pub fn in_flight(&self) -> u64 {
        self.endpoints.iter().map(|e| e.stats.active_requests.load(Ordering::Relaxed)).sum()
    }

    pub fn record_connect_failure(&self, endpoint: &Endpoint, error: &io::Error) {
        endpoint.record_error();
        self.connect_failures.inc();
        tracing::warn!(cluster = %self.name, endpoint = %endpoint.addr, %error, "upstream connect failed");
    }

    /// Connects to an endpoint picked by the key `hash` or the cluster's policy with `connect`; a
    /// failed connect is counted against its endpoint and retried once on another one (for a key,
    /// the next one along its ring or table). The one place that decides which endpoint a
    /// connection goes to, for TCP sessions and HTTP requests alike.
    pub async fn connect<'a, T, F, Fut>(
        &'a self,
        hash: Option<u64>,
        mut connect: F,
    ) -> Result<(&'a Arc<Endpoint>, T), ConnectError>
    where
        F: FnMut(&'a Arc<Endpoint>) -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        let mut exclude = None;
        let mut last = None;
        for _ in 0..2 {
            let Some(i) = self.pick(hash, exclude) else { break };
            let ep = &self.endpoints[i];
            match connect(ep).await {
                Ok(c) => return Ok((ep, c)),
                Err(e) if e.get_ref().is_some_and(|e| e.is::<Overflow>()) => {
                    let source = *e.into_inner().and_then(|e| e.downcast().ok()).expect("checked: an overflow");
                    return Err(self.overflow(source));
                }
                Err(e) => {
                    self.record_outcome(ep, Outcome::Failed);
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

/// The value of cookie `name` among the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(header::COOKIE).iter().find_map(|v| {
        v.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let value = pair[eq + 1..].trim_ascii();
            (pair[..eq].trim_ascii() == name.as_bytes())
                .then(|| value.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(value))
        })
    })
}

/// Cluster name and address.
type EndpointKey = (Arc<str>, SocketAddr);

/// Hands out the same [`Endpoint`] for the same cluster name and address across reloads, so
/// counters and pooled connections survive an update that keeps the endpoint; and the same
/// circuit-breaker [`Load`] for the same cluster name.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    endpoints: Mutex<HashMap<EndpointKey, Weak<Endpoint>>>,
    loads: Mutex<HashMap<Arc<str>, Weak<Load>>>,
}

/// The registry locked for one snapshot build: one lock for all its endpoints.
pub struct Registered<'a> {
    endpoints: std::sync::MutexGuard<'a, HashMap<EndpointKey, Weak<Endpoint>>>,
    loads: std::sync::MutexGuard<'a, HashMap<Arc<str>, Weak<Load>>>,
}

impl Registered<'_> {
    /// The circuit-breaker counts of `cluster`.
    pub fn load(&mut self, cluster: &Arc<str>) -> Arc<Load> {
        if let Some(l) = self.loads.get(cluster).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(Load::default());
        self.loads.insert(cluster.clone(), Arc::downgrade(&l));
        l
    }

    /// `load` is the cluster's, from [`Registered::load`].
    pub fn get(&mut self, cluster: &Arc<str>, addr: SocketAddr, load: &Arc<Load>) -> Arc<Endpoint> {
        let key = (cluster.clone(), addr);
        if let Some(ep) = self.endpoints.get(&key).and_then(Weak::upgrade) {
            return ep;
        }
        let ep = Arc::new(Endpoint::new(addr, load.clone()));
        self.endpoints.insert(key, Arc::downgrade(&ep));
        ep
    }
}

impl EndpointRegistry {
    /// Locks the registry for a snapshot build.
    pub fn lock(&self) -> Registered<'_> {
        Registered {
            endpoints: self.endpoints.lock().expect("registry lock poisoned"),
            loads: self.loads.lock().expect("registry lock poisoned"),
        }
    }

    /// Forgets the endpoints (and loads) no snapshot holds any more: once per update, after the
    /// swap (it was once per lookup, which made a 10,000-route config take 35 s to load).
    pub fn prune(&self) {
        self.endpoints.lock().expect("registry lock poisoned").retain(|_, w| w.strong_count() > 0);
        self.loads.lock().expect("registry lock poisoned").retain(|_, w| w.strong_count() > 0);
    }
}
