//! HTTP/1.1: one hyper server per downstream connection, a route decision per request, and the
//! request forwarded on a pooled keep-alive connection to the chosen endpoint.
//!
//! The config snapshot is loaded per request, so a keep-alive connection follows reloads and gets
//! the configured split request by request. Envoy's limits apply: 60 KiB of request headers and 100
//! headers (431 beyond), 400 for malformed requests (hyper answers both and closes).

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
    task::{Context, Poll, Wake, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::{
    cluster::{Cluster, Endpoint, RequestGuard},
    dispatch::{Fallback, Refusal},
    drain,
    metrics::RequestCounters,
    proxy::Proxy,
};

/// Envoy's `max_request_headers_kb` default.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;
/// A client must send a request's headers within this long (slowloris bound).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect timeout for passthrough requests, which have no cluster settings.
pub const PASSTHROUGH_CONNECT_TIMEOUT: Duration = crate::config::DEFAULT_CONNECT_TIMEOUT;

/// What every request on one downstream connection shares.
pub struct ConnCtx {
    pub proxy: Arc<Proxy>,
    pub orig_dst: SocketAddr,
    pub peer: SocketAddr,
    /// For requests no route claims.
    pub fallback: Fallback,
    /// The original destination as a one-endpoint cluster, made on the first passthrough request
    /// and kept for the connection so its upstream connection is reused.
    passthrough: OnceLock<Arc<Cluster>>,
}

impl ConnCtx {
    pub fn new(proxy: Arc<Proxy>, orig_dst: SocketAddr, peer: SocketAddr, fallback: Fallback) -> Self {
        Self { proxy, orig_dst, peer, fallback, passthrough: OnceLock::new() }
    }
}

/// Serves HTTP/1.1 on a downstream connection until it closes or the drain starts (then the
/// request in flight finishes and the connection closes).
pub async fn serve(ctx: Arc<ConnCtx>, stream: TcpStream, drain: drain::Watch) {
    // Until the client sends its first bytes, the connection costs only its socket and this
    // task: hyper allocates its read and write buffers (about 11 KiB) as soon as it is polled,
    // which 10,000 idle keep-alive clients would multiply. `readable()` is no use here: tokio
    // reports a fresh socket readable before any data arrived; a one-byte peek waits for data.
    // The wait is bounded like hyper's own wait for a request head.
    let mut first = [0u8; 1];
    tokio::select! {
        peeked = tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)) => {
            if !matches!(peeked, Ok(Ok(n)) if n > 0) {
                return; // closed, failed or silent for HEADER_READ_TIMEOUT before sending anything
            }
        }
        _ = drain.signaled() => return,
    }
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // hyper refuses (431) a head that does not fit its buffer; the exact 60 KiB limit on
        // header bytes is checked per request in `handle`, which sees them parsed.
        .max_buf_size(MAX_HEADER_BYTES + 16 * 1024)
        // At most 100 headers (Envoy's `max_headers_count`) is hyper's default; set explicitly,
        // hyper would initialise its header arrays on every request.
        // Small responses: one flattened buffer and one write() beat writev's bookkeeping.
        .writev(false);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    // The drain signal is polled only when its own waker fired, not on every wake-up of the
    // connection (a `select!` would poll it, and lock its `Notify`, twice per request).
    let signaled = drain.signaled();
    tokio::pin!(signaled);
    let gate = Arc::new(DrainGate { woken: AtomicBool::new(true), task: Mutex::new(None) });
    let gate_waker = Waker::from(gate.clone());
    let served = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if gate.woken.swap(false, Ordering::AcqRel) {
            *gate.task.lock().expect("drain gate lock poisoned") = Some(cx.waker().clone());
            if signaled.as_mut().poll(&mut Context::from_waker(&gate_waker)).is_ready() {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    })
    .await;
    let result = match served {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "downstream connection ended with an error");
    }
}

/// The waker the drain signal of one connection is polled with: it marks the signal as worth
/// polling and wakes the connection's task (recorded each time the signal is polled; a task's
/// waker does not change).
struct DrainGate {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for DrainGate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(w) = self.task.lock().expect("drain gate lock poisoned").as_ref() {
            w.wake_by_ref();
        }
    }
}

async fn handle(ctx: &ConnCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let snapshot = ctx.proxy.snapshot.load_full();
    let log = AccessLog::start(&req, ctx.peer, start);
    let header_bytes: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if header_bytes > MAX_HEADER_BYTES {
        let why = "request headers exceed 60 KiB";
        log.local(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why, why);
        let mut resp = local_response(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why);
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let Some(route) = snapshot.routes.for_request(ctx.orig_dst, authority(&req)) else {
        return match ctx.fallback {
            Fallback::Passthrough(dst) => {
                let cluster = ctx.passthrough.get_or_init(|| Arc::new(ctx.proxy.passthrough_cluster(dst)));
                let counters = &ctx.proxy.passthrough_counters;
                forward(
                    cluster,
                    counters,
                    &ctx.proxy.passthrough_route,
                    req,
                    crate::config::DEFAULT_REQUEST_TIMEOUT,
                    log,
                )
                .await
            }
            Fallback::Refuse(why) => {
                let status = match why {
                    Refusal::OwnListener => StatusCode::NOT_FOUND,
                    Refusal::RegistryOnly => StatusCode::BAD_GATEWAY,
                };
                log.local(status, why.reason(), why.reason());
                local_response(status, why.reason())
            }
        };
    };
    let Some(rule) = route.rule_for(req.uri().path(), req.headers()) else {
        let why = "no rule of the route matches the request";
        log.with_route(&route.name).local(StatusCode::NOT_FOUND, why, why);
        return local_response(StatusCode::NOT_FOUND, why);
    };
    let target = rule.pick();
    forward(&target.cluster, &target.requests, &route.name, req, rule.timeout, log).await
}

/// The request's authority: the absolute URI's, else the Host header.
fn authority(req: &Request<Incoming>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// Sends `req` to an endpoint of `cluster`; a failed connect is retried once on another endpoint.
async fn forward(
    cluster: &Cluster,
    counters: &RequestCounters,
    route: &Arc<str>,
    mut req: Request<Incoming>,
    timeout: Duration,
    log: AccessLog,
) -> Response<ProxyBody> {
    let log = log.with_route(route).with_cluster(&cluster.name);
    prepare_upstream_request(&mut req);
    let mut exclude = None;
    let mut failure = None;
    for _ in 0..2 {
        let Some(i) = cluster.pick(exclude) else { break };
        let ep = &cluster.endpoints[i];
        let (sender, reused) = match ep.checkout().await {
            Some(s) => (s, true),
            None => match ep.connect_http(cluster.connect_timeout).await {
                Ok(s) => (s, false),
                Err(e) => {
                    cluster.record_connect_failure(ep, &e);
                    failure = Some(format!("{}: {e}", ep.addr));
                    exclude = Some(i);
                    continue;
                }
            },
        };
        let guard = ep.start_request();
        let log = log.with_endpoint(ep.addr);
        let sent = tokio::time::timeout(timeout, send(cluster, ep, sender, reused, req)).await;
        return match sent {
            Ok(Ok((mut resp, sender))) => {
                counters.record(resp.status().as_u16());
                prepare_downstream_response(&mut resp);
                let status = resp.status();
                resp.map(|inner| {
                    ProxyBody::Upstream(UpstreamBody {
                        inner,
                        done: Some(Done {
                            sender,
                            endpoint: ep.clone(),
                            _guard: guard,
                            log: log.with_status(status),
                            bytes: 0,
                        }),
                    })
                })
            }
            Ok(Err(e)) => {
                ep.record_error();
                counters.record(503);
                let why = format!("upstream reset before response headers: {e}");
                let body = "upstream connect error or disconnect/reset before headers";
                log.local(StatusCode::SERVICE_UNAVAILABLE, &why, body);
                local_response(StatusCode::SERVICE_UNAVAILABLE, body)
            }
            Err(_) => {
                ep.record_error();
                counters.record(504);
                log.local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout", "upstream request timeout");
                local_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
        };
    }
    counters.record(503);
    let why = match failure {
        Some(f) => format!("no endpoint could be connected to; last: {f}"),
        None => "the cluster has no endpoints".to_string(),
    };
    log.local(StatusCode::SERVICE_UNAVAILABLE, &why, "no healthy upstream");
    local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
}

/// Sends on `sender`; if a pooled connection turns out to be closed before the request was
/// written, the request is sent again on a fresh connection to the same endpoint.
async fn send(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    mut sender: SendRequest<Incoming>,
    reused: bool,
    req: Request<Incoming>,
) -> Result<(Response<Incoming>, SendRequest<Incoming>), hyper::Error> {
    match sender.try_send_request(req).await {
        Ok(resp) => Ok((resp, sender)),
        Err(mut e) => match e.take_message() {
            Some(req) if reused => {
                let mut fresh = match ep.connect_http(cluster.connect_timeout).await {
                    Ok(s) => s,
                    Err(ce) => {
                        cluster.record_connect_failure(ep, &ce);
                        return Err(e.into_error());
                    }
                };
                let resp = fresh.send_request(req).await?;
                Ok((resp, fresh))
            }
            _ => Err(e.into_error()),
        },
    }
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// The two hop-by-hop names `http` has no constant for, after those of [`HOP_BY_HOP`].
const HOP_BY_HOP_OTHER: [&str; 2] = ["keep-alive", "proxy-connection"];

/// Which hop-by-hop name `name` is: an index into [`HOP_BY_HOP`] then [`HOP_BY_HOP_OTHER`].
fn hop_by_hop_index(name: &header::HeaderName) -> Option<usize> {
    HOP_BY_HOP
        .iter()
        .position(|h| h == name)
        .or_else(|| HOP_BY_HOP_OTHER.iter().position(|h| name == h).map(|i| HOP_BY_HOP.len() + i))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds the hop-by-hop headers present (usually none, or Connection
    // alone), so only those are removed: no hashed removal of absent names per message, no
    // name parsing, no allocation.
    let mut found = 0u8;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            found |= 1 << i;
        }
    }
    if found == 0 {
        return;
    }
    // Headers named in Connection are hop-by-hop too; only those present need a removal.
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // keep-alive is in `found` already; skipping it spares parsing the common token.
        .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("keep-alive") && headers.contains_key(*n))
        .filter_map(|n| header::HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| hop_by_hop_index(n).is_none())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(n);
        }
    }
    for (i, n) in HOP_BY_HOP_OTHER.iter().enumerate() {
        if found & (1 << (HOP_BY_HOP.len() + i)) != 0 {
            headers.remove(*n);
        }
    }
}

fn prepare_upstream_request(req: &mut Request<Incoming>) {
    strip_hop_by_hop(req.headers_mut());
    *req.version_mut() = Version::HTTP_11;
    if let Some(a) = req.uri().authority() {
        // Absolute-form from a client that thinks it talks to a forward proxy: origin-form
        // upstream, the authority in Host.
        if !req.headers().contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if let Ok(uri) = pq.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
}

fn prepare_downstream_response(resp: &mut Response<Incoming>) {
    // The upstream's connection management (close, HTTP/1.0) is its hop's business; the downstream
    // connection stays keep-alive.
    let chunked = resp.headers().get(header::TRANSFER_ENCODING).is_some();
    strip_hop_by_hop(resp.headers_mut());
    if chunked {
        resp.headers_mut().insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    *resp.version_mut() = Version::HTTP_11;
}

fn local_response(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Some(Bytes::from_static(body.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// A response body: produced by the proxy, or streamed from an upstream.
pub enum ProxyBody {
    Local(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(u) => Pin::new(u).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(b) => b.is_none(),
            ProxyBody::Upstream(u) => u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream(u) => u.inner.size_hint(),
        }
    }
}

/// An upstream response body; when it has been read to the end its connection goes back to the
/// endpoint's pool and the access-log line is written.
pub struct UpstreamBody {
    inner: Incoming,
    done: Option<Done>,
}

struct Done {
    sender: SendRequest<Incoming>,
    endpoint: Arc<Endpoint>,
    /// Keeps the request counted as active for `least_request` until the body is finished.
    _guard: RequestGuard,
    log: AccessLog,
    bytes: u64,
}

impl UpstreamBody {
    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            if complete {
                done.endpoint.checkin(done.sender);
            } else {
                done.endpoint.record_error();
            }
            done.log.finish(done.bytes, complete);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(data)) = (this.done.as_mut(), frame.data_ref()) {
                    d.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // hyper does not poll a body that says it is empty; that is a complete response too.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// The access-log line of one request, filled in as the request makes its way.
struct AccessLog {
    /// None when access logging is off: then nothing is copied per request.
    fields: Option<Box<LogFields>>,
}

struct LogFields {
    start: Instant,
    /// The downstream client.
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    route: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    status: u16,
}

impl AccessLog {
    fn start(req: &Request<Incoming>, peer: SocketAddr, start: Instant) -> Self {
        let on = tracing::enabled!(target: "access", tracing::Level::INFO);
        Self {
            fields: on.then(|| {
                Box::new(LogFields {
                    start,
                    peer,
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    route: None,
                    cluster: None,
                    endpoint: None,
                    status: 0,
                })
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut LogFields)) -> Self {
        if let Some(fields) = self.fields.as_deref_mut() {
            f(fields);
        }
        self
    }

    fn with_route(self, r: &Arc<str>) -> Self {
        self.with(|f| f.route = Some(r.clone()))
    }

    fn with_cluster(self, c: &Arc<str>) -> Self {
        self.with(|f| f.cluster = Some(c.clone()))
    }

    fn with_endpoint(&self, e: SocketAddr) -> Self {
        AccessLog { fields: self.fields.as_ref().map(|f| Box::new(LogFields { endpoint: Some(e), ..clone_fields(f) })) }
    }

    fn with_status(self, s: StatusCode) -> Self {
        self.with(|f| f.status = s.as_u16())
    }

    /// A response the proxy made itself; `body` is what the client gets.
    fn local(self, status: StatusCode, reason: &str, body: &str) {
        if let Some(f) = self.fields {
            emit(&f, status.as_u16(), body.len() as u64, Some(reason));
        }
    }

    fn finish(self, bytes: u64, complete: bool) {
        if let Some(f) = self.fields {
            emit(&f, f.status, bytes, (!complete).then_some("response body not completed"));
        }
    }
}

fn clone_fields(f: &LogFields) -> LogFields {
    LogFields {
        start: f.start,
        peer: f.peer,
        method: f.method.clone(),
        uri: f.uri.clone(),
        route: f.route.clone(),
        cluster: f.cluster.clone(),
        endpoint: f.endpoint,
        status: f.status,
    }
}

fn emit(f: &LogFields, status: u16, bytes: u64, reason: Option<&str>) {
    tracing::info!(
        target: "access",
        kind = "http",
        peer = %f.peer,
        method = %f.method,
        path = %f.uri,
        route = f.route.as_deref().unwrap_or("-"),
        cluster = f.cluster.as_deref().unwrap_or("-"),
        endpoint = %f.endpoint.map_or_else(|| "-".to_string(), |e| e.to_string()),
        status,
        bytes,
        duration_ms = f.start.elapsed().as_secs_f64() * 1000.0,
        reason = reason.unwrap_or("-"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_stripped() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, X-Trace , close"),
            ("x-trace", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("trailer", "x"),
            ("proxy-authorization", "basic x"),
            ("end-user", "jason"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "end-user"]);
        // A header named `close` is removed when Connection names it.
        let mut h = map(&[("connection", "close"), ("close", "1"), ("via", "x")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["via"]);
        // Nothing hop-by-hop: nothing changes.
        let mut h = map(&[("host", "a"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }
}
