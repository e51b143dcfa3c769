//! The upstream side of a request: an endpoint picked, a pooled or new connection, the request
//! sent and its response headers awaited within the rule's timeout.

use std::{sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use hyper::{body::Incoming, client::conn::http1::SendRequest};

use super::{
    access_log::AccessLog,
    body::{local_response, Done, ProxyBody, UpstreamBody},
    headers::{prepare_downstream_response, prepare_upstream_request},
};
use crate::{
    data::{
        cluster::{Cluster, ConnectError, Endpoint},
        pool::Upstream,
    },
    metrics::RequestCounters,
};

/// Sends `req` to an endpoint of `cluster`; a failed connect is retried once on another endpoint.
pub(super) async fn forward(
    cluster: &Cluster,
    counters: &RequestCounters,
    route: &Arc<str>,
    mut req: Request<Incoming>,
    timeout: Duration,
    log: AccessLog,
) -> Response<ProxyBody> {
    let log = log.with_route(route).with_cluster(&cluster.name);
    prepare_upstream_request(&mut req);
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
