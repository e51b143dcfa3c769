//! Response bodies: made by the proxy, or streamed from an upstream. An upstream body returns its
//! connection to the endpoint's pool and writes the access-log line when it has been read to the
//! end.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};

use super::access_log::AccessLog;
use crate::data::{
    cluster::{Endpoint, RequestGuard},
    pool::RequestBody,
};

pub(super) fn local_response(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
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
    pub(super) inner: Incoming,
    pub(super) done: Option<Done>,
}

pub(super) struct Done {
    pub(super) sender: SendRequest<RequestBody>,
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
                done.endpoint.pool.checkin(done.sender);
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
