//! The access-log line of one HTTP request, filled in as the request makes its way and handed to
//! [`logging::access`](crate::logging::access) (formatted on this thread, written by another) when
//! the response ends. Nothing is kept per request when access logging is off; when it is on, the
//! URI and the route and cluster names are shared with the request and the snapshot, not copied.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::{HeaderValue, Method, Request, StatusCode, Uri};
use hyper::body::Incoming;

use crate::logging::access;

/// The access-log line of one request, filled in as the request makes its way.
pub(super) struct AccessLog {
    /// None when access logging is off: then nothing is copied per request.
    fields: Option<LogFields>,
}

#[derive(Clone)]
pub(super) struct LogFields {
    start: Instant,
    /// The downstream client.
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    route: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    status: u16,
    /// `x-request-id`, made by the proxy when the client sent none: ties the line to the request
    /// the backends saw.
    request_id: Option<HeaderValue>,
}

impl AccessLog {
    pub(super) fn start(req: &Request<Incoming>, peer: SocketAddr, start: Instant) -> Self {
        Self {
            fields: access::enabled().then(|| LogFields {
                start,
                peer,
                method: req.method().clone(),
                uri: req.uri().clone(),
                route: None,
                cluster: None,
                endpoint: None,
                status: 0,
                request_id: req.headers().get("x-request-id").cloned(),
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut LogFields)) -> Self {
        if let Some(fields) = self.fields.as_mut() {
            f(fields);
        }
        self
    }

    pub(super) fn with_route(self, r: &Arc<str>) -> Self {
        self.with(|f| f.route = Some(r.clone()))
    }

    pub(super) fn with_cluster(self, c: &Arc<str>) -> Self {
        self.with(|f| f.cluster = Some(c.clone()))
    }

    pub(super) fn with_endpoint(&self, e: SocketAddr) -> Self {
        AccessLog { fields: self.fields.as_ref().map(|f| LogFields { endpoint: Some(e), ..f.clone() }) }
    }

    pub(super) fn with_status(self, s: StatusCode) -> Self {
        self.with(|f| f.status = s.as_u16())
    }

    /// A response the proxy made itself; `body` is what the client gets.
    pub(super) fn local(self, status: StatusCode, reason: &str, body: &str) {
        if let Some(f) = self.fields {
            emit(&f, status.as_u16(), body.len() as u64, Some(reason));
        }
    }

    /// An upgraded or `CONNECT` request whose tunnel has ended: the bytes each way.
    pub(super) fn tunnel(self, result: std::io::Result<crate::data::tcp::Transfer>) {
        if let Some(f) = self.fields {
            let (sent, received) = result.as_ref().map_or((0, 0), |t| (t.sent, t.received));
            access::write(|l| {
                l.str("kind", "tunnel")
                    .display("peer", f.peer)
                    .display("method", &f.method)
                    .display("path", &f.uri)
                    .opt_str("route", f.route.as_deref())
                    .opt_str("cluster", f.cluster.as_deref())
                    .opt_display("endpoint", f.endpoint)
                    .u64("status", u64::from(f.status))
                    .u64("sent", sent)
                    .u64("received", received)
                    .millis("duration_ms", f.start.elapsed())
                    .opt_display("error", result.as_ref().err());
            });
        }
    }

    pub(super) fn finish(self, bytes: u64, complete: bool) {
        if let Some(f) = self.fields {
            emit(&f, f.status, bytes, (!complete).then_some("response body not completed"));
        }
    }
}

fn emit(f: &LogFields, status: u16, bytes: u64, reason: Option<&str>) {
    access::write(|l| {
        l.str("kind", "http")
            .display("peer", f.peer)
            .display("method", &f.method)
            .display("path", &f.uri)
            .opt_str("route", f.route.as_deref())
            .opt_str("cluster", f.cluster.as_deref())
            .opt_display("endpoint", f.endpoint)
            .u64("status", u64::from(status))
            .u64("bytes", bytes)
            .opt_str("request_id", f.request_id.as_ref().and_then(|v| v.to_str().ok()))
            .millis("duration_ms", f.start.elapsed())
            .opt_str("reason", reason);
    });
}
