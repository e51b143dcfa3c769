//! Response bodies: made by the proxy, or streamed from an upstream. An upstream body returns its
//! connection to the endpoint's pool and writes the access-log line when it has been read to the
//! end, and is ended with an error after the stream idle timeout without a byte. A request body
//! streamed upstream says when it has been sent ([`RequestEnd`]): the route timeout starts there.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::{
    sync::oneshot,
    time::{Instant, Sleep},
};

use super::access_log::AccessLog;
use crate::data::{
    cluster::{Endpoint, RequestGuard},
    pool::{BoxError, RequestBody, Sender},
};

/// A response the proxy makes itself: `body` as plain text, or, to a gRPC request (`grpc`), a
/// trailers-only gRPC response — HTTP 200 whose only header block carries `grpc-status` and
/// `grpc-message` — which is what a gRPC client reads a call's failure from (it would see an HTTP
/// error status as a protocol error, losing the reason).
pub(super) fn local_response(grpc: bool, status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    if grpc {
        return grpc_response(grpc_status(status), body);
    }
    let mut resp = Response::new(ProxyBody::Local(Some(Bytes::from_static(body.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// A trailers-only gRPC response with status `code` (also for fault injection's gRPC aborts).
pub(super) fn grpc_response(code: u16, message: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(None));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    // The messages are printable ASCII, which grpc-message carries without percent-encoding.
    h.insert("grpc-message", HeaderValue::from_static(message));
    resp
}

/// The gRPC status of a response the proxy makes with HTTP `status`: gRPC's HTTP-to-gRPC table, as
/// Envoy applies it, except that the route timeout (504) is `DEADLINE_EXCEEDED`, the status a
/// client's own deadline gives.
pub(super) fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        504 => 4,              // DEADLINE_EXCEEDED
        429 | 502 | 503 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc`, `application/grpc+proto`...).
pub(super) fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A response body: produced by the proxy, or streamed from an upstream.
// The upstream variant carries the access-log fields inline: boxing them would cost an allocation
// per request to save bytes in a value that is never copied around.
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    Local(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
    pub(super) inner: Incoming,
    pub(super) idle: IdleTimer,
    pub(super) done: Option<Done>,
}

/// The upstream sent no byte of the response body for the stream idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no byte from the upstream for the stream idle timeout ({0:?})")]
pub struct StreamIdle(Duration);

/// The stream idle timeout of a response body: the time of the last frame, and a timer made only
/// when the body first has to wait (most small bodies never do), moved only when it fires early.
pub(super) struct IdleTimer {
    limit: Duration,
    last: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    pub(super) fn new(limit: Duration) -> Self {
        Self { limit, last: Instant::now(), timer: None }
    }

    fn active(&mut self) {
        self.last = Instant::now();
    }

    /// Whether the limit has passed since the last frame; else the task is woken when it would.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last + self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

pub(super) struct Done {
    pub(super) sender: Sender,
    pub(super) endpoint: Arc<Endpoint>,
    /// Keeps the request counted as active for `least_request` until the body is finished.
    pub(super) _guard: RequestGuard,
    pub(super) log: AccessLog,
    pub(super) bytes: u64,
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
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.active();
                if let (Some(d), Some(data)) = (this.done.as_mut(), frame.data_ref()) {
                    d.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {
                if this.idle.expired(cx) {
                    this.finish(false);
                    return Poll::Ready(Some(Err(StreamIdle(this.idle.limit).into())));
                }
            }
        }
        polled.map_err(BoxError::from)
    }
}

/// A request body on its way upstream that says, through its [`oneshot`], when it has all been
/// sent (or is dropped unsent).
pub(super) struct RequestEnd {
    inner: RequestBody,
    sent: Option<oneshot::Sender<()>>,
}

impl RequestEnd {
    /// `req` with its body watched, and the receiver told when it has been sent; `None` when it
    /// is empty (sent as soon as the head is), which costs nothing more.
    pub(super) fn watch(req: Request<RequestBody>) -> (Request<RequestBody>, Option<oneshot::Receiver<()>>) {
        if req.body().is_end_stream() {
            return (req, None);
        }
        let (tx, rx) = oneshot::channel();
        let req = req.map(|inner| RequestEnd { inner, sent: Some(tx) }.boxed_unsync());
        (req, Some(rx))
    }
}

impl Body for RequestEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            if let Some(tx) = this.sent.take() {
                let _ = tx.send(());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // hyper does not poll a body that says it is empty; that is a complete response too.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
