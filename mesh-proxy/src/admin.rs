//! The admin API, Envoy's names: `/config_dump`, `/clusters`, `/listeners`, `/stats/prometheus`,
//! `/ready`, `POST /logging?level=`, `POST /quitquitquit`. It runs on the control runtime, so a
//! saturated data plane does not hide what the proxy is doing.
//!
//! `/clusters` and `/listeners` answer Envoy's text format (`name::address::stat::value`) by
//! default and JSON with `?format=json`.
//!
//! [`readiness`]: the second port with `GET /ready` alone, for the kubelet. [`status`]: the
//! status port (Istio's 15020), the application's probes and the merged metrics. [`wait`]:
//! `mesh-proxy wait`, the postStart hook that holds the application until the proxy is ready.

pub mod peer;
pub mod readiness;
pub mod status;
pub mod wait;

use std::{
    convert::Infallible,
    fmt::Write,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, OnceLock},
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{net::TcpListener, sync::Notify};

use crate::{config::AdminMutations, control::Control, logging::LogHandle};

pub struct Admin {
    /// Set once the first config is in force; until then only `/` and `/ready` answer.
    pub control: OnceLock<Arc<Control>>,
    /// None when logging was not installed through [`crate::logging::init`] (library use).
    pub log: Option<LogHandle>,
    /// Notified by `/quitquitquit`; the process then drains as on SIGTERM.
    pub shutdown: Arc<Notify>,
    pub health: Arc<readiness::Health>,
    /// Who may `POST` (the bootstrap's `admin.mutations`).
    pub mutations: AdminMutations,
}

/// The two ends of one admin connection: whose it is is looked up when it asks for a change.
#[derive(Clone, Copy)]
struct Ends {
    peer: SocketAddr,
    local: SocketAddr,
}

/// Serves the admin API on `listener` forever.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        let Ok(local) = stream.local_addr() else { continue };
        let ends = Ends { peer, local };
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req, ends)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}\n")),
    }
}

/// A query parameter's value (percent-decoding `%2C` and `+` enough for log directives).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| {
            v.replace("%2C", ",").replace("%2c", ",").replace("%3D", "=").replace("%3d", "=").replace('+', " ")
        })
    })
}

#[derive(Serialize)]
struct EndpointView {
    address: std::net::SocketAddr,
    active_connections: u64,
    total_connections: u64,
    idle_connections: usize,
    active_requests: u64,
    total_requests: u64,
    errors: u64,
    /// Envoy's: `healthy`, or `/failed_outlier_check` while outlier detection ejects it.
    health_flags: &'static str,
}

#[derive(Serialize)]
struct ClusterView {
    name: String,
    lb_policy: crate::config::LbPolicy,
    endpoints: Vec<EndpointView>,
}

impl Admin {
    fn handle(&self, req: Request<Incoming>, ends: Ends) -> Response<Full<Bytes>> {
        if req.method() == Method::POST && matches!(req.uri().path(), "/logging" | "/quitquitquit") {
            if let Err(refusal) = self.may_change(ends) {
                tracing::warn!(peer = %ends.peer, path = req.uri().path(), reason = %refusal, "admin change refused");
                return text(StatusCode::FORBIDDEN, format!("{refusal}\n"));
            }
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/") => text(
                StatusCode::OK,
                "GET /config_dump\nGET /clusters[?format=json]\nGET /listeners[?format=json]\nGET /stats/prometheus\nGET /ready\nPOST /logging?level=LEVEL\nPOST /quitquitquit\n",
            ),
            (&Method::GET, "/ready") => self.health.answer(),
            _ => match self.control.get() {
                Some(control) => self.handle_serving(control, req),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "initializing: the first config is being built\n"),
            },
        }
    }

    /// Whether the connection `ends` may use the `POST` endpoints: only from the proxy's own
    /// user, unless `admin.mutations: anyone`.
    fn may_change(&self, ends: Ends) -> Result<(), String> {
        if self.mutations == AdminMutations::Anyone {
            return Ok(());
        }
        let own = nix::unistd::geteuid().as_raw();
        match peer::uid(ends.peer, ends.local) {
            Some(uid) if uid == own => Ok(()),
            Some(uid) => Err(format!(
                "only the proxy's own user (uid {own}) may change it; this connection is from uid {uid} \
                 (admin.mutations: anyone allows every user)"
            )),
            None => Err(format!(
                "only the proxy's own user (uid {own}) may change it; {} is not a socket of this network namespace",
                ends.peer
            )),
        }
    }

    fn handle_serving(&self, control: &Control, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let query = req.uri().query();
        let json_format = query_param(query, "format").as_deref() == Some("json");
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/config_dump") => {
                let snapshot = control.proxy.snapshot.load();
                #[derive(Serialize)]
                struct Endpoints<'a> {
                    cluster: &'a str,
                    addresses: &'a [std::net::SocketAddr],
                }
                /// The config as one file has it: the bootstrap and the routing in force side by
                /// side, with an `endpoints` section beside `clusters` (each cluster also lists
                /// its own).
                #[derive(Serialize)]
                struct Effective<'a> {
                    #[serde(flatten)]
                    bootstrap: &'a crate::config::Bootstrap,
                    #[serde(flatten)]
                    routing: &'a crate::config::Routing,
                    endpoints: Vec<Endpoints<'a>>,
                }
                #[derive(Serialize)]
                struct Dump<'a> {
                    version: &'a str,
                    source: &'a str,
                    config: Effective<'a>,
                    last_rejected: Option<crate::control::Rejection>,
                }
                let routing = &snapshot.routing;
                json(&Dump {
                    version: &snapshot.origin.version,
                    source: &snapshot.origin.source,
                    config: Effective {
                        bootstrap: &control.bootstrap,
                        routing,
                        endpoints: routing
                            .clusters
                            .iter()
                            .map(|c| Endpoints { cluster: &c.name, addresses: &c.endpoints })
                            .collect(),
                    },
                    last_rejected: control.last_rejected(),
                })
            }
            (&Method::GET, "/clusters") => {
                let snapshot = control.proxy.snapshot.load();
                let views: Vec<ClusterView> = snapshot
                    .clusters
                    .iter()
                    .map(|c| ClusterView {
                        name: c.name.to_string(),
                        lb_policy: c.policy,
                        endpoints: c
                            .endpoints
                            .iter()
                            .map(|e| EndpointView {
                                address: e.addr,
                                active_connections: e.stats.active_connections.load(Ordering::Relaxed),
                                total_connections: e.stats.total_connections.load(Ordering::Relaxed),
                                idle_connections: e.pool.idle_connections(),
                                active_requests: e.stats.active_requests.load(Ordering::Relaxed),
                                total_requests: e.stats.total_requests.load(Ordering::Relaxed),
                                errors: e.stats.errors.load(Ordering::Relaxed),
                                health_flags: if e.outlier.is_ejected() { "/failed_outlier_check" } else { "healthy" },
                            })
                            .collect(),
                    })
                    .collect();
                if json_format {
                    return json(&serde_json::json!({ "clusters": views }));
                }
                let mut out = String::new();
                for c in &views {
                    for e in &c.endpoints {
                        for (stat, v) in [
                            ("cx_active", e.active_connections),
                            ("cx_total", e.total_connections),
                            ("rq_active", e.active_requests),
                            ("rq_total", e.total_requests),
                            ("rq_error", e.errors),
                        ] {
                            let _ = writeln!(out, "{}::{}::{stat}::{v}", c.name, e.address);
                        }
                        let _ = writeln!(out, "{}::{}::health_flags::{}", c.name, e.address, e.health_flags);
                    }
                }
                text(StatusCode::OK, out)
            }
            (&Method::GET, "/listeners") => {
                let info = control.listeners.info();
                if json_format {
                    return json(&info);
                }
                let mut out = String::new();
                for l in info {
                    let _ = writeln!(out, "{}::{}", l.name, l.address);
                }
                text(StatusCode::OK, out)
            }
            (&Method::GET, "/stats/prometheus") => {
                let mut r = text(StatusCode::OK, control.metrics().encode());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (&Method::POST, "/logging") => {
                let Some(level) = query_param(query, "level") else {
                    return text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=debug (an EnvFilter string)\n");
                };
                match &self.log {
                    None => text(StatusCode::NOT_IMPLEMENTED, "logging was not set up by mesh-proxy\n"),
                    Some(h) => match h.set(&level) {
                        Ok(()) => {
                            tracing::info!(%level, "log level changed");
                            text(StatusCode::OK, format!("level: {level}\n"))
                        }
                        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                    },
                }
            }
            (&Method::POST, "/quitquitquit") => {
                self.shutdown.notify_one();
                text(StatusCode::OK, "OK\n")
            }
            (
                _,
                "/" | "/config_dump" | "/clusters" | "/listeners" | "/stats/prometheus" | "/ready" | "/logging"
                | "/quitquitquit",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            _ => text(StatusCode::NOT_FOUND, "not found; GET / lists the endpoints\n"),
        }
    }
}
