//! What happens to each accepted connection: its plan carried out to the end.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;

use crate::{
    config::Protocol,
    data::{
        cluster::{PASSTHROUGH_CLUSTER, PASSTHROUGH_CONNECT_TIMEOUT},
        detect::{self, Detected},
        dispatch::{self, Fallback, Plan},
        http::{self, ConnCtx},
        inbound, orig_dst,
        snapshot::Snapshot,
        tcp, Proxy,
    },
    drain,
};

impl Proxy {
    /// Handles one accepted connection to its end.
    pub async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, drain: drain::Watch) {
        let dst = match orig_dst::original_dst(&stream) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection gone before it could be read");
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        // The snapshot the decision is made on; a TCP session keeps using it (its route index
        // refers to it), HTTP loads the current one per request.
        let snapshot = self.snapshot.load_full();
        let plan = dispatch::plan(&snapshot, dst, &self.local_addrs.load());
        match plan {
            Plan::Inbound(addr) => {
                let timeout = crate::config::DEFAULT_CONNECT_TIMEOUT;
                self.inbound_tcp.inc();
                let upstream = inbound::connect_local(addr, timeout).await;
                let idle = snapshot.config.tcp_idle_timeout;
                splice_logged(idle, stream, upstream, peer, addr, "inbound", "InboundPassthroughCluster").await;
            }
            Plan::Route { route, protocol, fallback } => {
                let protocol = match protocol {
                    Protocol::Auto => match detect::detect(&stream, detect::DETECT_TIMEOUT).await {
                        Ok(Detected::Http1) => Protocol::Http,
                        _ => Protocol::Tcp,
                    },
                    p => p,
                };
                match protocol {
                    Protocol::Http => {
                        let ctx = Arc::new(ConnCtx::new(self.clone(), dst.addr, peer, fallback));
                        http::serve(ctx, stream, drain).await;
                    }
                    _ => self.tcp_route(stream, peer, &snapshot, route).await,
                }
            }
            Plan::Detect { fallback } => match detect::detect(&stream, detect::DETECT_TIMEOUT).await {
                Ok(Detected::Http1) => {
                    let ctx = Arc::new(ConnCtx::new(self.clone(), dst.addr, peer, fallback));
                    http::serve(ctx, stream, drain).await;
                }
                _ => self.unrouted(stream, peer, fallback).await,
            },
            Plan::Unrouted(fallback) => self.unrouted(stream, peer, fallback).await,
        }
    }

    async fn unrouted(&self, stream: TcpStream, peer: SocketAddr, fallback: Fallback) {
        match fallback {
            Fallback::Passthrough(dst) => {
                self.passthrough_tcp.inc();
                let upstream = tcp::connect(dst, None, PASSTHROUGH_CONNECT_TIMEOUT).await;
                if upstream.is_err() {
                    self.passthrough_connect_failures.inc();
                }
                let idle = self.snapshot.load().config.tcp_idle_timeout;
                splice_logged(idle, stream, upstream, peer, dst, "passthrough", PASSTHROUGH_CLUSTER).await;
            }
            Fallback::Refuse(why) => {
                tracing::info!(target: "access", kind = "tcp", %peer, reason = why.reason(), "connection refused");
                drop(stream);
            }
        }
    }

    /// A TCP route: one cluster per connection by weight, one endpoint by the cluster's policy.
    async fn tcp_route(&self, mut stream: TcpStream, peer: SocketAddr, snapshot: &Snapshot, route: usize) {
        let entry = &snapshot.routes.routes[route];
        let Some(rule) = entry.tcp_rule() else {
            tracing::info!(target: "access", kind = "tcp", %peer, route = &*entry.name, reason = "the route has no rule without conditions for TCP", "connection refused");
            return;
        };
        let target = rule.pick();
        target.tcp_connections.inc();
        let start = Instant::now();
        match target.cluster.connect_tcp().await {
            Ok((ep, mut upstream, _conn_guard)) => {
                let _req = ep.start_request();
                let idle = snapshot.config.tcp_idle_timeout;
                let result = tcp::splice(&mut stream, &mut upstream, idle).await;
                log_tcp(
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
                tracing::info!(target: "access", kind = "tcp", %peer, route = &*entry.name, cluster = &*target.cluster.name, reason = %e, "connection closed: no endpoint");
            }
        }
    }
}

async fn splice_logged(
    idle: std::time::Duration,
    mut stream: TcpStream,
    upstream: std::io::Result<TcpStream>,
    peer: SocketAddr,
    dst: SocketAddr,
    route: &str,
    cluster: &str,
) {
    let start = Instant::now();
    match upstream {
        Ok(mut up) => {
            let result = tcp::splice(&mut stream, &mut up, idle).await;
            log_tcp(peer, route, cluster, Some(dst), start, result.as_ref().ok(), result.as_ref().err());
        }
        Err(e) => {
            tracing::info!(target: "access", kind = "tcp", %peer, route, cluster, endpoint = %dst, reason = %e, "connection closed: connect failed");
        }
    }
}

fn log_tcp(
    peer: SocketAddr,
    route: &str,
    cluster: &str,
    endpoint: Option<SocketAddr>,
    start: Instant,
    transfer: Option<&tcp::Transfer>,
    error: Option<&std::io::Error>,
) {
    tracing::info!(
        target: "access",
        kind = "tcp",
        %peer,
        route,
        cluster,
        endpoint = %endpoint.map_or_else(|| "-".into(), |e| e.to_string()),
        sent = transfer.map_or(0, |t| t.sent),
        received = transfer.map_or(0, |t| t.received),
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        error = %error.map_or_else(|| "-".into(), |e| e.to_string()),
    );
}
