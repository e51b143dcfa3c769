//! The status port (Istio's 15020): the application's probes and the pod's one scrape target.
//!
//! `mesh-init inject` rewrites the application's HTTP and TCP probes to
//! `GET /app-health/<container>/readyz|livez|startupz` on this port and hands the originals over in
//! `ISTIO_KUBE_APP_PROBERS` (Istio's variable and JSON); it points the pod's `prometheus.io/*`
//! annotations here and hands the application's own over in `ISTIO_PROMETHEUS_ANNOTATIONS`. So:
//!
//! - `GET /app-health/<container>/<probe>`: the original probe, made now. HTTP: the application's
//!   status code is answered as it is (the kubelet counts 200-399 as success), 503 when it could
//!   not be reached within the probe's `timeoutSeconds`; TCP: 200 when the connection opens, else
//!   503. 404 for a probe nobody registered.
//! - `GET /stats/prometheus`: the application's metrics (when it has an endpoint) followed by the
//!   proxy's own, in one answer. An application endpoint that fails is named in a comment line and
//!   the proxy's metrics are still served.
//!
//! The probes go to the pod's IP (`INSTANCE_IP`, from the downward API), as the kubelet's would,
//! or the probe's `host`. They leave from 127.0.0.6 (::6 for IPv6), the source the capture rules
//! let through: the proxy's user dialling its own pod IP over loopback is otherwise redirected to
//! the proxy's inbound port, and the probe would test the proxy rather than the application. The
//! server runs on the control runtime next to the admin API.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{control::Control, data::inbound};

/// Istio's variable: the original probes, by `/app-health/...` path.
pub const PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";
/// Istio's variable: the application's own `prometheus.io/*` annotations.
pub const PROMETHEUS_ENV: &str = "ISTIO_PROMETHEUS_ANNOTATIONS";
/// The kubelet's default probe timeout, when the probe names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the application's metrics may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// A variable that cannot be used; the proxy does not start with one.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{variable}: not the JSON the injector writes: {error}")]
    Json { variable: &'static str, error: serde_json::Error },
    #[error("{PROBERS_ENV}: {path:?}: {reason}")]
    Prober { path: String, reason: String },
    #[error("{PROMETHEUS_ENV}: port {port:?}: not a port number")]
    ScrapePort { port: String },
}

/// One original probe, as Kubernetes writes it (the fields the status server uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Prober {
    pub http_get: Option<HttpGet>,
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default)]
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: String,
    pub port: u16,
    pub host: Option<String>,
    pub scheme: Option<String>,
    #[serde(default)]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TcpSocketAction {
    pub port: u16,
    pub host: Option<String>,
}

/// The application's metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scrape {
    pub port: u16,
    pub path: String,
}

/// What the status server serves, read from the injector's variables at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub address: SocketAddr,
    pub probers: BTreeMap<String, Prober>,
    pub scrape: Option<Scrape>,
    /// Where probes without a `host` go: the pod's IP, or 127.0.0.1 when it is unknown.
    pub pod_ip: IpAddr,
}

impl Settings {
    /// Parses the injector's variables (absent ones mean nothing to probe or merge).
    pub fn new(
        address: SocketAddr,
        probers: Option<&str>,
        prometheus: Option<&str>,
        pod_ip: Option<IpAddr>,
    ) -> Result<Self, StatusError> {
        let probers: BTreeMap<String, Prober> = match probers.filter(|p| !p.trim().is_empty()) {
            Some(json) => {
                serde_json::from_str(json).map_err(|error| StatusError::Json { variable: PROBERS_ENV, error })?
            }
            None => BTreeMap::new(),
        };
        for (path, prober) in &probers {
            let bad = |reason: &str| StatusError::Prober { path: path.clone(), reason: reason.into() };
            let parts: Vec<&str> = path.split('/').collect();
            if !matches!(parts.as_slice(), ["", "app-health", c, "livez" | "readyz" | "startupz"] if !c.is_empty()) {
                return Err(bad("expected /app-health/<container>/livez, readyz or startupz"));
            }
            match (&prober.http_get, &prober.tcp_socket) {
                (Some(get), None) => {
                    if get.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case("http")) {
                        return Err(bad("only HTTP probes are made here (HTTPS ones are not rewritten)"));
                    }
                }
                (None, Some(_)) => {}
                _ => return Err(bad("expected exactly one of httpGet and tcpSocket")),
            }
        }
        let scrape = match prometheus.filter(|p| !p.trim().is_empty()) {
            Some(json) => {
                #[derive(Deserialize)]
                struct Annotations {
                    scrape: Option<String>,
                    path: Option<String>,
                    port: Option<String>,
                }
                let a: Annotations = serde_json::from_str(json)
                    .map_err(|error| StatusError::Json { variable: PROMETHEUS_ENV, error })?;
                match (a.scrape.as_deref().map(str::trim), a.port) {
                    (Some("false"), _) | (_, None) => None,
                    (_, Some(port)) => Some(Scrape {
                        port: port.trim().parse().map_err(|_| StatusError::ScrapePort { port: port.clone() })?,
                        path: a.path.filter(|p| !p.is_empty()).unwrap_or_else(|| "/metrics".into()),
                    }),
                }
            }
            None => None,
        };
        Ok(Self { address, probers, scrape, pod_ip: pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)) })
    }
}

/// Serves the status port on `listener` forever.
pub async fn serve(settings: Arc<Settings>, control: Arc<Control>, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "status accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (settings, control) = (settings.clone(), control.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (settings, control) = (settings.clone(), control.clone());
                async move { Ok::<_, Infallible>(handle(&settings, &control, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(settings: &Settings, control: &Control, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/stats/prometheus") => {
            let mut body = String::new();
            if let Some(scrape) = &settings.scrape {
                let target = SocketAddr::new(settings.pod_ip, scrape.port);
                match get(target, &scrape.path, None, &[], SCRAPE_TIMEOUT).await {
                    Ok((status, text)) if status.is_success() => {
                        let text = String::from_utf8_lossy(&text);
                        // An OpenMetrics end marker in the middle would end the scrape there.
                        let text = text.trim_end().strip_suffix("# EOF").unwrap_or(&text).trim_end();
                        body.push_str(text);
                        body.push('\n');
                    }
                    Ok((status, _)) => body.push_str(&format!(
                        "# mesh-proxy: the application's metrics at {target}{}: status {status}\n",
                        scrape.path
                    )),
                    Err(e) => body.push_str(&format!(
                        "# mesh-proxy: the application's metrics at {target}{}: {e}\n",
                        scrape.path
                    )),
                }
            }
            body.push_str(&control.metrics().encode());
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        (&Method::GET, p) if p.starts_with("/app-health/") => match settings.probers.get(p) {
            Some(prober) => probe(settings, prober).await,
            None => text(StatusCode::NOT_FOUND, format!("no probe registered for {p}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: GET /app-health/<container>/<probe>, GET /stats/prometheus\n".into(),
        ),
    }
}

/// Makes one original probe now.
async fn probe(settings: &Settings, prober: &Prober) -> Response<Full<Bytes>> {
    let timeout = match prober.timeout_seconds {
        0 => DEFAULT_TIMEOUT,
        s => Duration::from_secs(s),
    };
    let host = |h: &Option<String>| -> Result<IpAddr, String> {
        match h.as_deref().filter(|h| !h.is_empty()) {
            None => Ok(settings.pod_ip),
            Some(h) => h.parse().map_err(|_| format!("host {h:?} is not an IP address")),
        }
    };
    if let Some(get_action) = &prober.http_get {
        let ip = match host(&get_action.host) {
            Ok(ip) => ip,
            Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        };
        let path = if get_action.path.is_empty() { "/" } else { &get_action.path };
        let headers: Vec<(&str, &str)> =
            get_action.http_headers.iter().map(|h| (h.name.as_str(), h.value.as_str())).collect();
        // The kubelet's Host is the address it probes, unless the probe sets its own.
        let own_host = get_action.http_headers.iter().any(|h| h.name.eq_ignore_ascii_case("host"));
        let host_header = if own_host { None } else { Some(ip) };
        return match get(SocketAddr::new(ip, get_action.port), path, host_header, &headers, timeout).await {
            Ok((status, _)) => text(status, format!("application answered {}\n", status.as_u16())),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        };
    }
    let action = prober.tcp_socket.as_ref().expect("Settings::new checked one of the two");
    let ip = match host(&action.host) {
        Ok(ip) => ip,
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    };
    match connect(SocketAddr::new(ip, action.port), timeout).await {
        Ok(_) => text(StatusCode::OK, "connected\n".into()),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// A connection to `target` from the passthrough source (127.0.0.6 or ::6), which the capture
/// rules never redirect; loopback targets need no special source.
pub async fn connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(|e| format!("socket: {e}"))?;
    if !target.ip().is_loopback() {
        let source = if target.is_ipv4() { inbound::INBOUND_SOURCE_V4 } else { inbound::INBOUND_SOURCE_V6 };
        socket.bind(SocketAddr::new(source, 0)).map_err(|e| format!("binding {source}: {e}"))?;
    }
    match tokio::time::timeout(timeout, socket.connect(target)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connecting to {target}: {e}")),
        Err(_) => Err(format!("connecting to {target}: no answer within {timeout:?}")),
    }
}

/// `GET path` on `target` within `timeout`: the status and the body. `host` is the Host header's
/// address (None when the caller's headers carry their own).
pub async fn get(
    target: SocketAddr,
    path: &str,
    host: Option<IpAddr>,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let work = async {
        let stream = connect(target, timeout).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::get(path).header(header::USER_AGENT, "mesh-proxy-probe");
        if let Some(host) = host {
            req = req.header(header::HOST, SocketAddr::new(host, target.port()).to_string());
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Empty::new()).map_err(|e| format!("{path}: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("{target}{path}: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("{target}{path}: {e}"))?.to_bytes();
        Ok((status, body))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("{target}{path}: no answer within {timeout:?}")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "0.0.0.0:15020".parse().unwrap()
    }

    #[test]
    fn the_injectors_variables_are_read_and_checked() {
        let s = Settings::new(
            addr(),
            Some(r#"{"/app-health/web/readyz":{"httpGet":{"path":"/ready","port":8080,"scheme":"HTTP"},"timeoutSeconds":2},"/app-health/web/livez":{"tcpSocket":{"port":8080}}}"#),
            Some(r#"{"scrape":"true","path":"/m","port":"9102"}"#),
            None,
        )
        .unwrap();
        assert_eq!(s.probers.len(), 2);
        assert_eq!(s.probers["/app-health/web/readyz"].timeout_seconds, 2);
        assert_eq!(s.scrape, Some(Scrape { port: 9102, path: "/m".into() }));
        assert_eq!(s.pod_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));

        for (probers, want) in [
            (r#"{"/health/web":{"tcpSocket":{"port":1}}}"#, "expected /app-health/<container>/"),
            (r#"{"/app-health/web/readyz":{}}"#, "exactly one of httpGet and tcpSocket"),
            (r#"{"/app-health/web/readyz":{"httpGet":{"port":1,"scheme":"HTTPS"}}}"#, "only HTTP probes"),
            ("{not json", "ISTIO_KUBE_APP_PROBERS: not the JSON"),
        ] {
            let e = Settings::new(addr(), Some(probers), None, None).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let e = Settings::new(addr(), None, Some(r#"{"port":"http"}"#), None).unwrap_err().to_string();
        assert!(e.contains("ISTIO_PROMETHEUS_ANNOTATIONS: port \"http\""), "{e}");
        let off = Settings::new(addr(), None, Some(r#"{"scrape":"false","port":"9102"}"#), None).unwrap();
        assert_eq!(off.scrape, None);
    }
}
