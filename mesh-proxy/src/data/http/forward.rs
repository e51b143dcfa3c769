//! The upstream side of a request: an endpoint picked, a pooled or new connection, the request
//! sent and its response headers awaited within the rule's timeout.
//!
//! [`attempt`] is one try on one endpoint, and the one place a request is sent upstream. It
//! already absorbs the failure that is nobody's fault — a pooled connection the peer closed just
//! as it was reused — by sending the request again on a fresh connection to the same endpoint,
//! when that is safe. Retries by policy (another endpoint, another try after a 5xx) are a loop
//! of attempts around it.

use std::{sync::Arc, time::Duration};

use http::{request, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::{
    body::{Body, Incoming},
    client::conn::http1::SendRequest,
};

use super::{
    access_log::AccessLog,
    body::{local_response, Done, ProxyBody, UpstreamBody},
    headers::{prepare_downstream_response, prepare_upstream_request},
    upgrade::Upgrade,
};
use crate::{
    data::{
        cluster::{Cluster, ConnectError, Endpoint},
        pool::{BoxError, RequestBody, Upstream},
    },
    metrics::RequestCounters,
};

/// Sends `req` to an endpoint of `cluster`; a failed connect is retried once on another endpoint.
/// An upgrade the upstream accepts becomes a tunnel that ends after `idle` without a byte.
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    cluster: &Cluster,
    counters: &RequestCounters,
    route: &Arc<str>,
    mut req: Request<Incoming>,
    timeout: Duration,
    idle: Duration,
    log: AccessLog,
) -> Response<ProxyBody> {
    let log = log.with_route(route).with_cluster(&cluster.name);
    let upgrade = Upgrade::take(&mut req);
    let mut req = req.map(|body| body.map_err(BoxError::from).boxed_unsync());
    prepare_upstream_request(&mut req);
    if let Some(u) = &upgrade {
        u.restore_request_headers(req.headers_mut());
    }
    let (ep, upstream) = match cluster.connect(|ep| ep.http(cluster.connect_timeout)).await {
        Ok(c) => c,
        Err(e) => {
            counters.record(503);
            let why = match e {
                ConnectError::Failed { addr, source, .. } => {
                    format!("no endpoint could be connected to; last: {addr}: {source}")
                }
                ConnectError::NoEndpoints { .. } => "the cluster has no endpoints".to_string(),
            };
            log.local(StatusCode::SERVICE_UNAVAILABLE, &why, "no healthy upstream");
            return local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        }
    };
    let guard = ep.start_request();
    let log = log.with_endpoint(ep.addr);
    let sent = tokio::time::timeout(timeout, attempt(cluster, ep, upstream, req)).await;
    match sent {
        Ok(Ok((mut resp, sender))) => {
            counters.record(resp.status().as_u16());
            let status = resp.status();
            if let Some(u) = upgrade.filter(|u| u.accepted(status)) {
                // The upstream connection leaves HTTP (and its pool) for the tunnel.
                drop(sender);
                let chosen = resp.headers().get(http::header::UPGRADE).cloned();
                prepare_downstream_response(&mut resp);
                u.join(&mut resp, chosen, idle, log.with_status(status), guard);
                return resp.map(|_| ProxyBody::Local(None));
            }
            prepare_downstream_response(&mut resp);
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

/// One try of `req` on endpoint `ep`, over `upstream`.
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
) -> Result<(Response<Incoming>, SendRequest<RequestBody>), AttemptError> {
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
    let mut fresh = match ep.connect_http(cluster.connect_timeout).await {
        Ok(s) => s,
        Err(ce) => {
            cluster.record_connect_failure(ep, &ce);
            return Err(AttemptError::Connect(ce));
        }
    };
    let resp = fresh.send_request(again).await?;
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
