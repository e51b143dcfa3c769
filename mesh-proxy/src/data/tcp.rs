//! Opaque TCP: a routed session (a cluster per connection), passthrough to the original
//! destination, and the session's access-log line. Between two TCP sockets the bytes move by
//! [`splice`](mod@splice) (zero-copy, through a pipe); other streams are joined by [`copy`](mod@copy).
//! Both keep half-close and end a session idle for too long ([`idle`]).

pub mod copy;
mod idle;
pub mod splice;

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

pub use copy::copy;
pub use splice::splice;

use prometheus_client::metrics::counter::Counter;

use crate::{
    config::LbPolicy,
    data::{
        cluster::{Cluster, PASSTHROUGH_CLUSTER, PASSTHROUGH_CONNECT_TIMEOUT},
        route::RouteEntry,
        socket,
    },
    logging::access,
};

/// What a finished session moved.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Bytes from downstream to upstream.
    pub sent: u64,
    /// Bytes from upstream to downstream.
    pub received: u64,
}

/// A TCP route: the rule for `dst`, one cluster per connection by weight, one endpoint by the
/// cluster's policy — or `dst` itself for a passthrough cluster, when `original` allows it (with
/// the counter of failed connects to original destinations; `None`: `dst` is the proxy's own).
pub async fn route(
    entry: &RouteEntry,
    mut stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    original: Option<&Counter>,
    idle: Duration,
) {
    let Some(rule) = entry.tcp_rule(dst) else {
        log_unserved(
            "connection refused",
            peer,
            Some(&entry.name),
            None,
            None,
            &"no rule of the route takes a TCP connection to this destination",
        );
        return;
    };
    let target = rule.pick();
    target.tcp_connections.inc();
    let start = Instant::now();
    let passthrough;
    let mut cluster = &*target.cluster;
    if cluster.policy == LbPolicy::Passthrough {
        let Some(failures) = original else {
            log_unserved(
                "connection refused",
                peer,
                Some(&entry.name),
                Some(&cluster.name),
                None,
                &"a passthrough cluster for a connection that was not redirected (it would loop)",
            );
            return;
        };
        passthrough = Cluster::passthrough(dst, cluster.dial.timeout, failures.clone());
        cluster = &passthrough;
    }
    let dial = cluster.dial;
    match cluster.connect(cluster.source_hash(peer), |ep| ep.connect(&dial)).await {
        Ok((ep, (mut upstream, _conn_guard))) => {
            let _req = ep.start_request();
            let result = splice(&mut stream, &mut upstream, idle).await;
            log(
                peer,
                &entry.name,
                &target.cluster.name,
                Some(ep.addr),
                start,
                result.as_ref().ok(),
                result.as_ref().err(),
            );
            if result.is_err() {
                ep.record_error();
            }
        }
        Err(e) => {
            log_unserved(
                "connection closed: no endpoint",
                peer,
                Some(&entry.name),
                Some(&target.cluster.name),
                None,
                &e,
            );
        }
    }
}

/// Passthrough sessions and their failed connects, counted under the PassthroughCluster.
pub struct PassthroughCounters<'a> {
    pub sessions: &'a Counter,
    pub connect_failures: &'a Counter,
}

/// Unrouted traffic under `allow_any`: to the destination the application dialled.
pub async fn passthrough(
    counters: PassthroughCounters<'_>,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    idle: Duration,
) {
    counters.sessions.inc();
    let upstream = socket::connect(dst, None, PASSTHROUGH_CONNECT_TIMEOUT).await;
    if upstream.is_err() {
        counters.connect_failures.inc();
    }
    splice_logged(idle, stream, upstream, peer, dst, "passthrough", PASSTHROUGH_CLUSTER).await;
}

/// Copies between `stream` and a freshly connected `upstream` (or logs why there is none), under
/// the route and cluster names the access log and metrics give such traffic.
pub async fn splice_logged(
    idle: Duration,
    mut stream: TcpStream,
    upstream: io::Result<TcpStream>,
    peer: SocketAddr,
    dst: SocketAddr,
    route: &str,
    cluster: &str,
) {
    let start = Instant::now();
    match upstream {
        Ok(mut up) => {
            let result = splice(&mut stream, &mut up, idle).await;
            log(peer, route, cluster, Some(dst), start, result.as_ref().ok(), result.as_ref().err());
        }
        Err(e) => {
            log_unserved("connection closed: connect failed", peer, Some(route), Some(cluster), Some(dst), &e);
        }
    }
}

/// The access-log line of a finished TCP session.
fn log(
    peer: SocketAddr,
    route: &str,
    cluster: &str,
    endpoint: Option<SocketAddr>,
    start: Instant,
    transfer: Option<&Transfer>,
    error: Option<&io::Error>,
) {
    access::write(|l| {
        l.str("kind", "tcp")
            .display("peer", peer)
            .str("route", route)
            .str("cluster", cluster)
            .opt_display("endpoint", endpoint)
            .u64("sent", transfer.map_or(0, |t| t.sent))
            .u64("received", transfer.map_or(0, |t| t.received))
            .millis("duration_ms", start.elapsed())
            .opt_display("error", error);
    });
}

/// The access-log line of a TCP connection that got no session: `message` says what happened to
/// it, `reason` why.
pub fn log_unserved(
    message: &str,
    peer: SocketAddr,
    route: Option<&str>,
    cluster: Option<&str>,
    endpoint: Option<SocketAddr>,
    reason: &dyn std::fmt::Display,
) {
    access::write(|l| {
        l.message(message)
            .str("kind", "tcp")
            .display("peer", peer)
            .opt_str("route", route)
            .opt_str("cluster", cluster)
            .opt_display("endpoint", endpoint)
            .display("reason", reason);
    });
}
