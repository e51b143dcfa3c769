//! Retries by policy (Istio's `HTTPRetry`, as Envoy's router applies it): a loop of
//! [`one_try`]s, each bounded by the `per_try_timeout` and all by the rule's timeout, with a fully
//! jittered exponential back-off between them and the cluster's retry budget deciding whether a
//! retry may go at all.
//!
//! A request is tried again only if its body can be sent again: no body, or one that streamed to
//! the first try whole and within [`RETRY_BUFFER_LIMIT`] (kept as it went, so the first try is not
//! delayed). A larger or unfinished body is never retried.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};
use rand::Rng;

use super::forward::{one_try, AttemptError, Try};
use crate::{
    config::{GrpcCode, Retries, RetryCondition},
    data::{
        balance,
        cluster::{Cluster, ConnectError},
        pool::{BoxError, RequestBody},
    },
};

/// How much of a request body is kept for retries (Envoy's default per-request buffer limit).
pub const RETRY_BUFFER_LIMIT: usize = 1024 * 1024;

/// Sends `req` to `cluster` as `policy` says: tries again while the outcome is one `policy`
/// retries on, tries are left, the body can be sent again, the back-off ends before the rule's
/// `timeout` (counted from the end of the request, as for one try) and the cluster's retry budget
/// allows it. Without any timeout a try waits for `stream_idle`. Returns the last try's outcome.
pub(super) async fn send<'a>(
    cluster: &'a Cluster,
    policy: &Retries,
    req: Request<RequestBody>,
    hash: Option<u64>,
    h2: bool,
    grpc: bool,
    timeout: Option<Duration>,
    stream_idle: Duration,
) -> Try<'a> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let head = Head::of(&parts);
    let (body, kept) = Kept::wrap(body);
    let mut req = Request::from_parts(parts, body);
    let limit = match (policy.per_try_timeout, timeout) {
        (Some(p), Some(t)) => p.min(t),
        (p, t) => p.or(t).unwrap_or(stream_idle),
    };
    // Known once the first try has sent the whole request.
    let mut deadline = None;
    let mut retried = 0u32;
    let mut in_flight = None;
    loop {
        let tried = one_try(cluster, req, hash, h2, limit, deadline).await;
        drop(in_flight.take());
        let now = Instant::now();
        if retried == 0 {
            deadline = timeout.map(|t| kept.ended_at().unwrap_or(start) + t);
        }
        let overall_expired = deadline.is_some_and(|d| now >= d);
        if matches!(tried, Try::Timeout(_)) && !overall_expired {
            if let Some(b) = &cluster.retry_budget {
                b.per_try_timeouts.inc();
            }
        }
        if overall_expired || retried >= policy.attempts || !retriable(&tried, policy, grpc) {
            return tried;
        }
        let Some(body) = kept.replay() else { return tried };
        let pause = backoff(policy, retried);
        if deadline.is_some_and(|d| now + pause >= d) {
            return tried;
        }
        let Some(budget) = &cluster.retry_budget else { return tried };
        let Some(guard) = budget.acquire(cluster.in_flight()) else { return tried };
        // The response of the failed try is dropped unread: its connection closes.
        drop(tried);
        tokio::time::sleep(pause).await;
        in_flight = Some(guard);
        retried += 1;
        req = head.request(body);
    }
}

/// Whether `policy` retries on this outcome (Envoy's `retry_on` semantics).
fn retriable(tried: &Try, policy: &Retries, grpc: bool) -> bool {
    use RetryCondition::*;
    let on = |c| policy.on(c);
    match tried {
        Try::NoUpstream(ConnectError::Failed { .. }) | Try::Reset(_, AttemptError::Connect(_)) => {
            on(ConnectFailure) || on(FiveXx) || on(GatewayError)
        }
        // No endpoint, or a circuit breaker's refusal: another try would meet the same.
        Try::NoUpstream(_) => false,
        // The client's own body failed: its fault, not worth another try.
        Try::Reset(_, e) if e.is_client_body() => false,
        Try::Reset(_, AttemptError::Upstream(e)) => {
            on(Reset) || on(FiveXx) || on(GatewayError) || (on(RefusedStream) && refused_stream(e))
        }
        // A per-try timeout: Envoy's "no response at all".
        Try::Timeout(_) => on(Reset) || on(FiveXx) || on(GatewayError),
        Try::Response { resp, .. } => {
            let s = resp.status().as_u16();
            (on(FiveXx) && s >= 500)
                || (on(GatewayError) && matches!(s, 502..=504))
                || (on(Retriable4xx) && s == 409)
                || (on(RetriableStatusCodes) && policy.retriable_status_codes.contains(&s))
                || (grpc && grpc_retriable(resp.headers(), policy))
        }
    }
}

/// A trailers-only gRPC failure (the status in the response headers) that `policy` retries on.
fn grpc_retriable(headers: &HeaderMap, policy: &Retries) -> bool {
    let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<u8>().ok()) else {
        return false;
    };
    let condition = match GrpcCode(code) {
        GrpcCode::CANCELLED => RetryCondition::Cancelled,
        GrpcCode::DEADLINE_EXCEEDED => RetryCondition::DeadlineExceeded,
        GrpcCode::RESOURCE_EXHAUSTED => RetryCondition::ResourceExhausted,
        GrpcCode::UNAVAILABLE => RetryCondition::Unavailable,
        _ => return false,
    };
    policy.on(condition)
}

/// Whether an HTTP/2 upstream refused the stream (it was not processed, so it is safe to retry).
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// Envoy's back-off: a uniformly random pause up to `base * 2^retried`, capped at `max`.
fn backoff(policy: &Retries, retried: u32) -> Duration {
    let cap = policy.backoff_base.saturating_mul(1u32 << retried.min(16)).min(policy.backoff_max);
    balance::with_rng(|r| cap.mul_f64(r.random::<f64>()))
}

/// The parts of a request head a retry needs (a `request::Parts` cannot be cloned).
struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
}

impl Head {
    fn of(p: &http::request::Parts) -> Self {
        Self { method: p.method.clone(), uri: p.uri.clone(), version: p.version, headers: p.headers.clone() }
    }

    fn request(&self, body: RequestBody) -> Request<RequestBody> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// What of the request body is kept for another try.
enum Kept {
    /// There is no body.
    Empty,
    /// Kept as it streamed to the first try.
    Streamed(Arc<Mutex<Buffer>>),
}

#[derive(Default)]
struct Buffer {
    chunks: Vec<Bytes>,
    len: usize,
    /// The body ended, every byte kept.
    complete: bool,
    /// Too large, trailers or an error: not kept.
    given_up: bool,
    /// When the last byte went to the first try.
    ended: Option<Instant>,
}

impl Kept {
    fn wrap(body: RequestBody) -> (RequestBody, Kept) {
        if body.is_end_stream() {
            return (body, Kept::Empty);
        }
        let buffer = Arc::new(Mutex::new(Buffer::default()));
        (Tee { inner: body, buffer: buffer.clone() }.boxed_unsync(), Kept::Streamed(buffer))
    }

    /// When the first try had the whole request: the body's end, or `None` if it has none.
    fn ended_at(&self) -> Option<Instant> {
        match self {
            Kept::Empty => None,
            Kept::Streamed(b) => b.lock().expect("retry buffer lock poisoned").ended,
        }
    }

    /// The body again, if it can be sent again.
    fn replay(&self) -> Option<RequestBody> {
        match self {
            Kept::Empty => Some(Empty::new().map_err(BoxError::from).boxed_unsync()),
            Kept::Streamed(b) => {
                let b = b.lock().expect("retry buffer lock poisoned");
                if !b.complete || b.given_up {
                    return None;
                }
                let mut all = BytesMut::with_capacity(b.len);
                for c in &b.chunks {
                    all.extend_from_slice(c);
                }
                Some(Full::new(all.freeze()).map_err(|e| match e {}).boxed_unsync())
            }
        }
    }
}

/// The request body on its way to the first try, each data frame also kept in the buffer.
struct Tee {
    inner: RequestBody,
    buffer: Arc<Mutex<Buffer>>,
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(r) = &polled {
            let mut b = this.buffer.lock().expect("retry buffer lock poisoned");
            match r {
                Some(Ok(frame)) => match frame.data_ref() {
                    Some(d) if !b.given_up => {
                        if b.len + d.len() > RETRY_BUFFER_LIMIT {
                            b.given_up = true;
                            b.chunks = Vec::new();
                        } else {
                            b.len += d.len();
                            b.chunks.push(d.clone());
                        }
                    }
                    Some(_) => {}
                    None => b.given_up = true,
                },
                Some(Err(_)) => b.given_up = true,
                None => b.complete = true,
            }
            // hyper stops polling a body that says it has ended.
            if this.inner.is_end_stream() {
                b.complete = true;
            }
            if b.complete && b.ended.is_none() {
                b.ended = Some(Instant::now());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(base: u64, max: u64) -> Retries {
        Retries {
            attempts: 3,
            per_try_timeout: None,
            retry_on: vec![],
            retriable_status_codes: vec![],
            backoff_base: Duration::from_millis(base),
            backoff_max: Duration::from_millis(max),
        }
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = policy(25, 250);
        for retried in 0..8 {
            let cap = Duration::from_millis((25u64 << retried).min(250));
            for _ in 0..100 {
                assert!(backoff(&p, retried) <= cap);
            }
        }
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| backoff(&p, 3)).collect();
        assert!(distinct.len() > 10, "jittered");
    }

    #[tokio::test]
    async fn a_small_body_is_kept_a_large_one_is_not() {
        let body = |n: usize| Full::new(Bytes::from(vec![b'x'; n])).map_err(|e| match e {}).boxed_unsync();
        let (tee, kept) = Kept::wrap(body(10));
        assert!(kept.replay().is_none(), "not streamed yet");
        assert_eq!(tee.collect().await.unwrap().to_bytes().len(), 10);
        assert_eq!(kept.replay().unwrap().collect().await.unwrap().to_bytes().len(), 10);

        let (tee, kept) = Kept::wrap(body(RETRY_BUFFER_LIMIT + 1));
        tee.collect().await.unwrap();
        assert!(kept.replay().is_none(), "larger than the buffer limit");

        let (_, kept) = Kept::wrap(Empty::new().map_err(BoxError::from).boxed_unsync());
        assert!(kept.replay().unwrap().is_end_stream());
    }
}
