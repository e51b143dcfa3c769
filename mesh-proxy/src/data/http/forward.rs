//! The upstream side of a request: an endpoint picked, a pooled or new connection, the request
//! sent and its response headers awaited within the rule's timeout.

use std::{sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use hyper::{body::Incoming, client::conn::http1::SendRequest};

use super::{
    access_log::AccessLog,
    body::{local_response, Done, ProxyBody, UpstreamBody},
    headers::{prepare_downstream_response, prepare_upstream_request},
    upgrade::Upgrade,
};
use crate::{
    data::{
        cluster::{Cluster, ConnectError, Endpoint},
        pool::Upstream,
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
    let sent = tokio::time::timeout(timeout, send(cluster, ep, upstream, req)).await;
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

/// Sends on `upstream`; if a pooled connection turns out to be closed before the request was
/// written, the request is sent again on a fresh connection to the same endpoint (not a retry:
/// the endpoint never saw it).
async fn send(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    upstream: Upstream,
    req: Request<Incoming>,
) -> Result<(Response<Incoming>, SendRequest<Incoming>), hyper::Error> {
    let Upstream { mut sender, reused } = upstream;
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
