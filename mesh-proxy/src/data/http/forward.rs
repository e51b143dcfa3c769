//! The upstream side of a request: an endpoint picked, a pooled or new connection (HTTP/1.1 or the
//! endpoint's shared HTTP/2 one, as the cluster says), the request sent and its response headers
//! awaited within the rule's timeout — or the gRPC call's own `grpc-timeout`.
//!
//! [`attempt`] is one try on one endpoint, and the one place a request is sent upstream. It
//! already absorbs the failure that is nobody's fault — a pooled connection the peer closed just
//! as it was reused — by sending the request again on a fresh connection to the same endpoint,
//! when that is safe. Retries by policy (another endpoint, another try after a 5xx) are a loop
//! of [`one_try`]s around it, in [`retry`](super::retry).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use http::{request, HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};

use super::{
    access_log::AccessLog,
    body::{is_grpc, local_response, Done, IdleTimer, ProxyBody, RequestEnd, UpstreamBody},
    headers::{prepare_downstream_response, prepare_upstream_request},
    retry,
    upgrade::Upgrade,
};
use crate::{
    config::{Retries, UpstreamProtocol},
    data::{
        cluster::{outlier::Outcome, Affinity, Cluster, ConnectError, Endpoint, RequestGuard},
        pool::{BoxError, RequestBody, Sender, Upstream},
    },
    metrics::RequestCounters,
};

/// How long traffic may pause: a tunnel (an accepted upgrade or CONNECT) with no byte either way
/// for `tcp` ends; an HTTP response with no byte from the upstream for `stream` — its headers
/// awaited without a route timeout, or its body — is ended (Envoy's `stream_idle_timeout`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Idle {
    pub tcp: Duration,
    pub stream: Duration,
}

/// Sends `req` to an endpoint of `cluster` (the one its `affinity` hashes to, if it has one, and
/// the cookie it must be issued goes with the response); a failed connect is retried once on
/// another endpoint, and the rule's `retries` policy, when it has one, tries again as it says
/// ([`retry::send`]).
/// The response headers must come within `timeout` (or `idle.stream` without one) from the end of
/// the request — not its start: a slow upload is not the upstream's delay (Envoy); with retries,
/// `timeout` bounds all the tries. A gRPC call's `grpc-timeout` replaces `timeout` (as Envoy does
/// when `max_grpc_timeout` is set: the client's deadline is the call's), and the errors the proxy
/// answers it with are gRPC statuses.
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    cluster: &Cluster,
    counters: &RequestCounters,
    route: &Arc<str>,
    mut req: Request<Incoming>,
    affinity: Option<Affinity>,
    timeout: Option<Duration>,
    retries: Option<&Retries>,
    idle: Idle,
    log: AccessLog,
) -> Response<ProxyBody> {
    let log = log.with_route(route).with_cluster(&cluster.name);
    let grpc = is_grpc(&req);
    let timeout = if grpc { grpc_timeout(req.headers()).or(timeout) } else { timeout };
    let downstream_h2 = req.version() == Version::HTTP_2;
    let upgrade = Upgrade::take(&mut req);
    // Upgrades and CONNECT are HTTP/1.1's: they go upstream in it whatever the cluster says.
    let h2 = upgrade.is_none()
        && match cluster.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Auto => downstream_h2,
        };
    let mut req = req.map(|body| body.map_err(BoxError::from).boxed_unsync());
    prepare_upstream_request(&mut req, h2);
    if let Some(u) = &upgrade {
        u.restore_request_headers(req.headers_mut());
    }
    let hash = affinity.as_ref().map(|a| a.hash);
    let timed = timeout.is_some() || retries.is_some_and(|r| r.per_try_timeout.is_some());
    let tried = match retries {
        // An upgrade hands its connection over: it is not tried twice.
        Some(r) if upgrade.is_none() => retry::send(cluster, r, req, hash, h2, grpc, timeout, idle.stream).await,
        _ => one_try(cluster, req, hash, h2, timeout.unwrap_or(idle.stream), None).await,
    };
    match tried {
        Try::Response { mut resp, sender, ep, guard } => {
            let log = log.with_endpoint(ep.addr);
            counters.record(resp.status().as_u16());
            let status = resp.status();
            if let Some(u) = upgrade.filter(|u| u.accepted(status)) {
                // The upstream connection leaves HTTP (and its pool) for the tunnel.
                drop(sender);
                let chosen = resp.headers().get(http::header::UPGRADE).cloned();
                prepare_downstream_response(&mut resp, downstream_h2);
                u.join(&mut resp, chosen, idle.tcp, log.with_status(status), guard);
                return resp.map(|_| ProxyBody::Local(None));
            }
            prepare_downstream_response(&mut resp, downstream_h2);
            if let Some(cookie) = affinity.and_then(|a| a.set_cookie) {
                resp.headers_mut().append(http::header::SET_COOKIE, cookie);
            }
            resp.map(|inner| {
                ProxyBody::Upstream(UpstreamBody {
                    inner,
                    idle: IdleTimer::new(idle.stream),
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
        Try::NoUpstream(e) => {
            counters.record(503);
            let (why, body) = match e {
                ConnectError::Failed { addr, source, .. } => {
                    (format!("no endpoint could be connected to; last: {addr}: {source}"), "no healthy upstream")
                }
                ConnectError::NoEndpoints { .. } => ("the cluster has no endpoints".to_string(), "no healthy upstream"),
                // Envoy's words and header for a circuit breaker's refusal.
                ConnectError::Overflow { source, .. } => (
                    format!("upstream_rq_pending_overflow: {source}"),
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                ),
            };
            log.local(StatusCode::SERVICE_UNAVAILABLE, &why, body);
            let mut resp = local_response(grpc, StatusCode::SERVICE_UNAVAILABLE, body);
            if why.starts_with("upstream_rq_pending_overflow") {
                resp.headers_mut().insert("x-envoy-overloaded", http::HeaderValue::from_static("true"));
            }
            resp
        }
        Try::Reset(ep, e) => {
            let (status, body) = if e.is_client_body() {
                (StatusCode::BAD_REQUEST, "invalid request body")
            } else if e.is_invalid_response() {
                (StatusCode::BAD_GATEWAY, "upstream sent an invalid response")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers")
            };
            counters.record(status.as_u16());
            log.with_endpoint(ep.addr).local(status, &format!("{body}: {e}"), body);
            local_response(grpc, status, body)
        }
        Try::Timeout(ep) => {
            counters.record(504);
            let why = if timed { "upstream request timeout" } else { "stream idle timeout" };
            log.with_endpoint(ep.addr).local(StatusCode::GATEWAY_TIMEOUT, why, why);
            local_response(grpc, StatusCode::GATEWAY_TIMEOUT, why)
        }
    }
}

/// How one try of a request ended.
pub(super) enum Try<'a> {
    /// Response headers arrived (any status).
    Response { resp: Response<Incoming>, sender: Sender, ep: &'a Arc<Endpoint>, guard: RequestGuard },
    /// No endpoint could be connected to, or there is none.
    NoUpstream(ConnectError),
    /// The exchange failed before the response headers.
    Reset(&'a Arc<Endpoint>, AttemptError),
    /// No response headers in time.
    Timeout(&'a Arc<Endpoint>),
}

/// One try: an endpoint picked and connected to, `req` sent ([`attempt`]), its response headers
/// awaited for `limit` from the end of the request, and not past `deadline`; `hash` is the
/// request's consistent-hash key, if the cluster hashes. A failure that is
/// not the client's is counted against the endpoint.
pub(super) async fn one_try(
    cluster: &Cluster,
    mut req: Request<RequestBody>,
    hash: Option<u64>,
    h2: bool,
    limit: Duration,
    deadline: Option<Instant>,
) -> Try<'_> {
    let connected = match cluster.admit() {
        Ok(permit) => cluster.connect(hash, |ep| cluster.http(ep, h2)).await.map(|c| (c, permit)),
        Err(e) => Err(e),
    };
    let ((ep, upstream), permit) = match connected {
        Ok(c) => c,
        Err(e) => return Try::NoUpstream(e),
    };
    // Not on an upgrade, whose connection leaves HTTP anyway.
    let upgrading = req.method() == http::Method::CONNECT || req.headers().contains_key(http::header::UPGRADE);
    if !upgrading && cluster.max_requests_per_connection.is_some_and(|max| upstream.sender.is_last(max)) {
        req.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    let (req, sent) = RequestEnd::watch(req);
    let guard = ep.start_request().with(permit);
    let expired = async {
        if let Some(rx) = sent {
            let _ = rx.await; // sent, or the body failed: either way the request is over
        }
        let mut end = Instant::now() + limit;
        if let Some(d) = deadline {
            end = end.min(d);
        }
        tokio::time::sleep_until(end.into()).await
    };
    let outcome = tokio::select! {
        r = attempt(cluster, ep, upstream, req, h2) => Ok(r),
        () = expired => Err(()),
    };
    match outcome {
        Ok(Ok((resp, sender))) => {
            cluster.record_outcome(ep, Outcome::Status(resp.status().as_u16()));
            Try::Response { resp, sender, ep, guard }
        }
        Ok(Err(e)) => {
            if !e.is_client_body() {
                ep.record_error();
                cluster.record_outcome(ep, Outcome::Failed);
            }
            Try::Reset(ep, e)
        }
        Err(()) => {
            ep.record_error();
            cluster.record_outcome(ep, Outcome::Status(504));
            Try::Timeout(ep)
        }
    }
}

/// How an [`attempt`] failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum AttemptError {
    /// The fresh connection to send the request again on could not be opened.
    #[error("reconnecting: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
}

impl AttemptError {
    /// The client's request body failed while it was sent (an invalid chunk, a reset): the
    /// client's fault (400), not the endpoint's.
    pub(super) fn is_client_body(&self) -> bool {
        matches!(self, AttemptError::Upstream(e) if e.is_user() && std::error::Error::source(e).is_some())
    }

    /// The upstream answered with something that is not HTTP (502, Envoy's answer).
    pub(super) fn is_invalid_response(&self) -> bool {
        matches!(self, AttemptError::Upstream(e) if e.is_parse() || e.is_parse_too_large() || e.is_parse_status())
    }
}

/// One try of `req` on endpoint `ep`, over `upstream` (HTTP/2 when `h2`).
///
/// A connection taken from the pool may have been closed by the peer while it sat idle (a
/// server's keep-alive timeout, or one that closes after every response without saying so); that
/// is only seen when it is used. If it fails before any byte of the response arrived, the request
/// goes again, once, on a fresh connection to the same endpoint — when that is safe:
/// - the request was never written (hyper hands it back): any request;
/// - it was written: only an idempotent method without a body ([`Replay`]), since the peer may
///   have acted on it (RFC 9110 §9.2.2), and a body streamed from the client is not kept.
///
/// Otherwise the error is returned. Either way the endpoint is not blamed here: closing an idle
/// connection is allowed (RFC 9112 §9.6); the caller counts a failure the second try also meets.
pub(super) async fn attempt(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    upstream: Upstream,
    req: Request<RequestBody>,
    h2: bool,
) -> Result<(Response<Incoming>, Sender), AttemptError> {
    let Upstream { mut sender, reused } = upstream;
    let replay = if reused { Replay::of(&req) } else { None };
    let again = match sender.try_send_request(req).await {
        Ok(resp) => return Ok((resp, sender)),
        Err(mut e) => match (e.take_message(), replay) {
            (Some(req), _) if reused => req,
            (None, Some(replay)) if closed_before_response(e.error()) => replay.request(),
            _ => return Err(e.into_error().into()),
        },
    };
    tracing::debug!(endpoint = %ep.addr, "pooled connection closed by the peer; sending on a fresh one");
    let mut fresh = match ep.connect_http(&cluster.dial, h2).await {
        Ok(s) => s,
        Err(ce) => {
            cluster.record_connect_failure(ep, &ce);
            return Err(AttemptError::Connect(ce));
        }
    };
    let resp = fresh.try_send_request(again).await.map_err(|e| e.into_error())?;
    Ok((resp, fresh))
}

/// Whether `e` says the connection ended (EOF, reset) before the response head was complete.
fn closed_before_response(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof);
        }
        source = s.source();
    }
    false
}

/// The head of a request that can be written again after it was consumed: an idempotent method
/// and no body.
struct Replay(request::Parts);

impl Replay {
    fn of(req: &Request<RequestBody>) -> Option<Replay> {
        if !req.method().is_idempotent() || !req.body().is_end_stream() {
            return None;
        }
        let mut head = Request::new(());
        *head.method_mut() = req.method().clone();
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        Some(Replay(head.into_parts().0))
    }

    fn request(self) -> Request<RequestBody> {
        Request::from_parts(self.0, Empty::new().map_err(BoxError::from).boxed_unsync())
    }
}

/// A gRPC call's deadline from its `grpc-timeout` header: up to 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`). A malformed value is ignored, as gRPC servers ignore it.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        let t = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", http::HeaderValue::from_static(v));
            grpc_timeout(&h)
        };
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "123456789m", "1x", "-1S", "1.5S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }
}
