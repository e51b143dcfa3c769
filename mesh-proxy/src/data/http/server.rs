//! The downstream side: one hyper HTTP/1.1 server per connection, the drain watched cheaply, and
//! the route decision per request (route, rule, weighted cluster, or the connection's fallback).

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

use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{
    access_log::AccessLog,
    body::{is_grpc, local_response, ProxyBody},
    fault,
    forward::{forward, Idle},
    headers::{looped, prepare_downstream_request},
};
use crate::{
    config::LbPolicy,
    data::{
        cluster::Cluster,
        detect::{self, Detected},
        dispatch::{Fallback, Refusal},
        route::RequestHead,
        Proxy,
    },
    drain,
};

/// Envoy's `max_request_headers_kb` default.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;
/// A client must send a request's headers within this long (slowloris bound).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2: streams a downstream connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// HTTP/2 flow-control windows towards a client: per stream, and per connection (which bounds what
/// one connection can make the proxy buffer, whatever its number of streams).
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;

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
    /// Counts the connection for the drain, and tells its responses to close the connection once
    /// the drain has begun.
    drain: drain::Watch,
}

impl ConnCtx {
    pub fn new(
        proxy: Arc<Proxy>,
        orig_dst: SocketAddr,
        peer: SocketAddr,
        fallback: Fallback,
        drain: drain::Watch,
    ) -> Self {
        Self { proxy, orig_dst, peer, fallback, passthrough: OnceLock::new(), drain }
    }
}

/// Serves HTTP on a downstream connection — HTTP/1.1, or HTTP/2 when it opens with the prior-
/// knowledge preface — until it closes. When the drain begins, an idle connection is closed and a
/// busy one closes once its requests in flight are answered: HTTP/1.1 responses say `Connection:
/// close`, HTTP/2 sends a GOAWAY. A connection accepted during the drain is served, each HTTP/1.1
/// response saying `Connection: close`.
pub async fn serve(ctx: Arc<ConnCtx>, stream: TcpStream) {
    let signaled = ctx.drain.signaled();
    // Accepted while draining: served, its responses close it (`handle`); closing it unserved
    // would be the "connection refused" the drain is there to avoid.
    let late = ctx.drain.is_draining();
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
        _ = ctx.drain.signaled(), if !late => return,
    }
    // Only a first `P` can start the HTTP/2 preface (or POST, PUT, PATCH): then look further.
    let h2 = first[0] == detect::H2_PREFACE[0]
        && matches!(detect::detect(&stream, detect::DETECT_TIMEOUT).await, Ok(Detected::Http2));
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    let io = TokioIo::new(stream);
    let result = if h2 {
        let conn = h2_builder().serve_connection(io, svc);
        // HTTP/2 has GOAWAY for the drain, also for a connection accepted during it.
        drive(conn, false, signaled, |c| c.graceful_shutdown()).await
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            // A client that sends its request then shuts its write side (`nc -N`, batch clients)
            // still gets the response: hyper's default takes the EOF for an abandoned connection.
            .half_close(true)
            // hyper refuses (431) a head that does not fit its buffer; the exact 60 KiB limit on
            // header bytes is checked per request in `handle`, which sees them parsed.
            .max_buf_size(MAX_HEADER_BYTES + 16 * 1024)
            // At most 100 headers (Envoy's `max_headers_count`) is hyper's default; set explicitly,
            // hyper would initialise its header arrays on every request.
            // Small responses: one flattened buffer and one write() beat writev's bookkeeping.
            .writev(false);
        // Upgrades (WebSocket, CONNECT) hand the connection over once their response is written.
        let conn = builder.serve_connection(io, svc).with_upgrades();
        drive(conn, late, signaled, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "downstream connection ended with an error");
    }
}

/// The HTTP/2 server's settings: every limit bounded, hyper's flood protections on.
fn h2_builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        // Streams one connection may have open: gRPC's and Envoy's usual order of magnitude;
        // a client that wants more queues them (or opens another connection).
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        // Flow control: what a client may send before the proxy has passed it upstream, per stream
        // and per connection (a fixed window; no adaptive growth to the bandwidth-delay product).
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_STREAM_WINDOW as usize)
        .max_header_list_size((MAX_HEADER_BYTES + 4 * 1024) as u32)
        // Rapid reset (CVE-2023-44487): streams the client opens and resets before the proxy
        // accepted them; past this many pending, GOAWAY. Streams the proxy had to reset for the
        // client's errors are bounded likewise (RUSTSEC-2024-0003). Both are hyper's defaults,
        // written here so that they stay on.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024);
    b
}

/// Runs a downstream connection until it ends, or the drain is `signaled` and `shutdown` has let
/// the requests in flight finish. A connection accepted `late` (during the drain) is left to run:
/// its responses close it.
async fn drive<C, E>(
    conn: C,
    late: bool,
    signaled: impl Future<Output = ()>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    if late {
        return conn.await;
    }
    // The drain signal is polled only when its own waker fired, not on every wake-up of the
    // connection (a `select!` would poll it, and lock its `Notify`, twice per request).
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
    match served {
        Some(r) => r,
        None => {
            shutdown(conn.as_mut());
            conn.await
        }
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

/// Answers one request; once the drain has begun, an HTTP/1 response asks the client to close the
/// connection (not a switch of protocols or a CONNECT tunnel, which leave HTTP anyway; HTTP/2 has
/// GOAWAY instead).
async fn handle(ctx: &ConnCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    let not_h1 = req.method() == Method::CONNECT || req.version() == Version::HTTP_2;
    let mut resp = respond(ctx, req).await;
    if ctx.drain.is_draining() && !not_h1 && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn respond(ctx: &ConnCtx, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let grpc = is_grpc(&req);
    let snapshot = ctx.proxy.snapshot.load_full();
    let bad = prepare_downstream_request(&mut req, ctx.orig_dst, ctx.peer);
    let log = AccessLog::start(&req, ctx.peer, start);
    if let Err(why) = bad {
        log.local(StatusCode::BAD_REQUEST, why.reason(), why.reason());
        return local_response(grpc, StatusCode::BAD_REQUEST, why.reason());
    }
    let header_bytes: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if header_bytes > MAX_HEADER_BYTES {
        let why = "request headers exceed 60 KiB";
        log.local(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why, why);
        let mut resp = local_response(grpc, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why);
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    if looped(req.headers()) {
        let why = "routing loop: the request came back to the proxy that forwarded it";
        log.local(StatusCode::LOOP_DETECTED, why, why);
        return local_response(grpc, StatusCode::LOOP_DETECTED, why);
    }
    // A CONNECT's authority is the tunnel's far end, not the server the application dialled:
    // only the original destination routes it.
    let connect = req.method() == Method::CONNECT;
    let authority = if connect { None } else { authority(&req) };
    let idle = Idle { tcp: ctx.proxy.tcp_idle_timeout, stream: ctx.proxy.stream_idle_timeout };
    let Some(route) = snapshot.routes.for_request(ctx.orig_dst, authority) else {
        return match ctx.fallback {
            Fallback::Passthrough(dst) => {
                let cluster = ctx.passthrough.get_or_init(|| Arc::new(ctx.proxy.passthrough_cluster(dst)));
                let counters = &ctx.proxy.passthrough_counters;
                forward(cluster, counters, &ctx.proxy.passthrough_route, req, None, None, None, idle, log).await
            }
            Fallback::Refuse(why) => {
                let status = match why {
                    Refusal::OwnListener => StatusCode::NOT_FOUND,
                    // Envoy refuses a CONNECT it may not tunnel with 403.
                    Refusal::RegistryOnly if connect => StatusCode::FORBIDDEN,
                    Refusal::RegistryOnly => StatusCode::BAD_GATEWAY,
                };
                log.local(status, why.reason(), why.reason());
                local_response(grpc, status, why.reason())
            }
        };
    };
    let head =
        RequestHead { method: req.method(), uri: req.uri(), headers: req.headers(), authority, dst: ctx.orig_dst };
    let Some((rule, _)) = route.rule_for(&head) else {
        let why = "no rule of the route matches the request";
        log.with_route(&route.name).local(StatusCode::NOT_FOUND, why, why);
        return local_response(grpc, StatusCode::NOT_FOUND, why);
    };
    let target = rule.pick();
    let mut retries = None;
    let mut log = log;
    if let Some(p) = &rule.policy {
        if let Some(f) = &p.fault {
            log = match fault::inject(f, grpc, log.with_route(&route.name)).await {
                Ok(log) => log,
                Err(aborted) => return aborted,
            };
        }
        retries = p.retries.as_ref();
    }
    let mut cluster = &target.cluster;
    if cluster.policy == LbPolicy::Passthrough {
        // Istio's PASSTHROUGH (Envoy's ORIGINAL_DST): the destination the application dialled,
        // on the connection's one-endpoint cluster, as its unrouted requests.
        if snapshot.own_addrs.contains(&ctx.orig_dst) {
            let why = "a passthrough cluster for a connection that was not redirected (it would loop)";
            log.with_route(&route.name).local(StatusCode::NOT_FOUND, why, why);
            return local_response(grpc, StatusCode::NOT_FOUND, why);
        }
        cluster = ctx.passthrough.get_or_init(|| Arc::new(ctx.proxy.passthrough_cluster(ctx.orig_dst)));
    }
    let affinity = cluster.affinity(req.uri(), req.headers(), ctx.peer);
    forward(cluster, &target.requests, &route.name, req, affinity, rule.timeout, retries, idle, log).await
}

/// The request's authority: the absolute URI's, else the Host header.
fn authority(req: &Request<Incoming>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
}
