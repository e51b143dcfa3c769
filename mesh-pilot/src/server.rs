//! The two HTTP servers: discovery for the proxies, admin for operators.
//!
//! **Discovery** (`--listen`): `GET /ns/<namespace>/v1/{listeners,routes,clusters,endpoints}`, the
//! body mesh-proxy's discovery client already reads (`{"version_info", "resources"}`), and:
//! - `ETag` per type; `If-None-Match` with the current one answers `304` with no body.
//! - `X-Mesh-Snapshot` on every answer names the snapshot it came from (the four versions). A
//!   request that sends it back without waiting is *pinned*: answered from that snapshot while it
//!   is among the scope's recent ones, else `409`; so a poll's four answers are always from one
//!   snapshot and a route never names a cluster the same poll lacks.
//! - Long poll: `Prefer: wait=N` (RFC 7240) with `X-Mesh-Snapshot` holds the request until the
//!   scope has a snapshot other than that one, or `N` seconds (at most 60) have passed.
//! - Endpoint deltas: `X-Mesh-Delta: 1` with `If-None-Match` may be answered with only the
//!   clusters whose endpoints changed since that version (`X-Mesh-Delta` in the answer names the
//!   version it applies to); otherwise the full set.
//! - `503` until the adapters have synced; the proxy keeps what it has and asks again.
//!
//! **Admin** (`--admin`, loopback by default): `/debug/configz` (every object read),
//! `/debug/syncz` (proxy status, what `mesh-pilot status` prints), `/debug/endpointz` (services,
//! endpoints with labels and health, endpoints held back), `/debug/analyze` (findings; `?format=text`),
//! `/metrics` (Prometheus), `/ready`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{
    metrics::ResponseLabels,
    push::Shared,
    snapshot::{Snapshot, Type},
    status::Report,
};

pub use mesh_proxy::control::discovery::headers::{DELTA as DELTA_HEADER, SNAPSHOT as SNAPSHOT_HEADER};
/// The longest a long poll is held.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// A proxy is "connected" when it polled within this long (or is waiting now).
pub const CONNECTED_WITHIN: Duration = Duration::from_secs(70);

type Body = Full<Bytes>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Accepts connections until the task is dropped; each is served on its own task.
pub async fn serve<F, Fut>(listener: TcpListener, shared: Arc<Shared>, handler: F)
where
    F: Fn(Arc<Shared>, Request<Incoming>, SocketAddr) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handler(shared, req, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// `/ns/<namespace>/v1/<type>`.
fn parse_path(path: &str) -> Option<(&str, Type)> {
    let rest = path.strip_prefix("/ns/")?;
    let (ns, rest) = rest.split_once('/')?;
    let t = Type::from_path(rest.strip_prefix("v1/")?)?;
    let valid = !ns.is_empty()
        && ns.len() <= 63
        && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then_some((ns, t))
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|s| !s.is_empty())
}

/// `Prefer: wait=N` (seconds).
fn wait_preference(h: &HeaderMap) -> Option<Duration> {
    h.get_all(header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.split([',', ';']).find_map(|p| p.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok()))
        .map(|s| Duration::from_secs(s).min(MAX_WAIT))
}

/// The version in `If-None-Match: "v"` (quotes and weak marks dropped).
fn if_none_match(h: &HeaderMap) -> Option<&str> {
    header_str(h, "if-none-match").map(|v| v.trim_start_matches("W/").trim_matches('"'))
}

pub async fn discovery(shared: Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let Some((ns, t)) = parse_path(req.uri().path()) else {
        return reply(StatusCode::NOT_FOUND, "expected /ns/<namespace>/v1/{listeners,routes,clusters,endpoints}\n");
    };
    let h = req.headers();
    let report = Report::from_headers(h);
    if let Some(r) = &report {
        shared.status.seen(r, ns, &peer.to_string(), &shared.metrics);
    }
    let node = report.map(|r| r.node);
    let wait = wait_preference(h);
    let named = header_str(h, SNAPSHOT_HEADER).map(str::to_string);

    let mut rx = match shared.scope(ns).await {
        Some(rx) => rx,
        None => {
            // Not synced yet: a waiting proxy waits for that too.
            if let Some(w) = wait {
                let mut ready = shared.ready.subscribe();
                let _ = tokio::time::timeout(w, ready.wait_for(|r| *r)).await;
            }
            match shared.scope(ns).await {
                Some(rx) => rx,
                None => {
                    return reply(StatusCode::SERVICE_UNAVAILABLE, "mesh-pilot has not synced with its platform yet\n")
                }
            }
        }
    };
    let snap: Arc<Snapshot> = match (&named, wait) {
        (Some(v), Some(w)) => {
            // Long poll: until the scope moves past the snapshot the proxy has.
            if rx.borrow().version == *v {
                if let Some(n) = &node {
                    shared.status.waiting(n, 1);
                }
                let _ = tokio::time::timeout(w, rx.wait_for(|s| s.version != *v)).await;
                if let Some(n) = &node {
                    shared.status.waiting(n, -1);
                }
            }
            rx.borrow().clone()
        }
        (Some(v), None) => {
            let found = shared.scopes.read().expect("scopes lock").get(ns).and_then(|s| s.find(v));
            match found {
                Some(s) => s,
                None => return reply(StatusCode::CONFLICT, "that snapshot is gone; start the poll again\n"),
            }
        }
        (None, _) => rx.borrow().clone(),
    };
    answer(&shared, h, t, &snap, node.as_deref())
}

fn answer(shared: &Shared, h: &HeaderMap, t: Type, snap: &Snapshot, node: Option<&str>) -> Response<Body> {
    let version = snap.type_version(t);
    let have = if_none_match(h);
    let count = |answer: &str| {
        let labels = ResponseLabels { r#type: t.as_str().into(), answer: answer.into() };
        shared.metrics.responses.get_or_create(&labels).inc();
    };
    let mut resp = if have == Some(version) {
        count("not_modified");
        reply(StatusCode::NOT_MODIFIED, Bytes::new())
    } else {
        let delta = match (t, have, header_str(h, DELTA_HEADER)) {
            (Type::Endpoints, Some(since), Some("1")) => snap.endpoints_delta(since).map(|b| (since.to_string(), b)),
            _ => None,
        };
        if let Some(n) = node {
            if shared.status.last_sent(n, t).as_deref() != Some(version) {
                shared.metrics.push_latency.observe(snap.changed_at.elapsed().as_secs_f64());
            }
            shared.status.sent(n, t, version);
        }
        let mut r = match delta {
            Some((since, body)) => {
                count("delta");
                let mut r = reply(StatusCode::OK, body);
                if let Ok(v) = HeaderValue::from_str(&since) {
                    r.headers_mut().insert(DELTA_HEADER, v);
                }
                r
            }
            None => {
                count("full");
                reply(StatusCode::OK, snap.body(t))
            }
        };
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&snap.version) {
        resp.headers_mut().insert(SNAPSHOT_HEADER, v);
    }
    resp
}

pub async fn admin(shared: Arc<Shared>, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let text = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "format=text"));
    let debug = shared.debug.read().expect("debug lock").clone();
    let json = |v: serde_json::Result<Vec<u8>>| {
        let mut r = reply(StatusCode::OK, v.unwrap_or_default());
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    match req.uri().path() {
        "/debug/configz" => {
            let objects: Vec<serde_json::Value> = debug.config.iter().map(|o| o.to_json()).collect();
            json(serde_json::to_vec_pretty(&objects))
        }
        "/debug/endpointz" => json(serde_json::to_vec_pretty(&*debug.registry)),
        "/debug/syncz" => {
            shared.status.sweep(CONNECTED_WITHIN);
            json(serde_json::to_vec_pretty(&shared.status.syncz()))
        }
        "/debug/analyze" if text => {
            reply(StatusCode::OK, debug.findings.iter().map(|f| format!("{f}\n")).collect::<String>())
        }
        "/debug/analyze" => json(serde_json::to_vec_pretty(&*debug.findings)),
        "/metrics" => {
            shared.metrics.proxies_connected.set(shared.status.sweep(CONNECTED_WITHIN) as i64);
            let mut r = reply(StatusCode::OK, shared.metrics.encode());
            let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            r
        }
        "/ready" if *shared.ready.borrow() => reply(StatusCode::OK, "ready\n"),
        "/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "not synced\n"),
        _ => reply(
            StatusCode::NOT_FOUND,
            "/debug/configz /debug/syncz /debug/endpointz /debug/analyze[?format=text] /metrics /ready\n",
        ),
    }
}
