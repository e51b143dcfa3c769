//! Upstream HTTP connections of one endpoint, behind one interface ([`Sender`]) for both versions:
//! HTTP/1.1 connections started on a connected stream, kept idle between requests in the
//! endpoint's [`Pool`] and handed out again when still usable; and one multiplexed HTTP/2
//! connection that every request to the endpoint shares. Knows nothing of endpoints: the
//! [`cluster`](crate::data::cluster) side owns a pool per endpoint and counts its connections.
//!
//! A connection is a hyper client connection: a sender the request path holds and a driver task
//! that owns the socket and ends when the connection closes — also when the peer closes it while
//! it is idle, which marks the sender closed: such a connection is never handed out again and
//! does not count as idle.
//!
//! A pooled connection the peer closes *while* it is being reused (its FIN crossing our request)
//! fails the request; the request path sends it again on a fresh connection when that is safe
//! (`data/http/forward.rs`), which is why [`Upstream::reused`] exists.

use std::{io, net::SocketAddr, sync::Mutex, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1::SendRequest, http2, TrySendError},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// Any error a request body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request sent upstream: the client's body as it streams in, or one the proxy
/// made (empty, for a request sent again). Boxed, so the request path can wrap the client's
/// body (timers, the end of the request) without the pool knowing how.
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle upstream connections kept per endpoint; more are closed when they come back.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// HTTP/2 flow control towards an endpoint: what the endpoint may send before the proxy has passed
/// it on downstream, per stream and per connection (hyper's defaults are 2 and 5 MiB: a slow
/// downstream would let every upstream connection buffer that much).
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// Largest response header block accepted from an endpoint (Envoy's 60 KiB, plus HPACK overhead).
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;

/// A connection ready for a request.
pub enum Sender {
    /// With the number of requests the connection has carried, this one included (a cluster's
    /// `max_requests_per_connection` closes it after the last).
    Http1(SendRequest<RequestBody>, u32),
    /// A handle on the endpoint's shared HTTP/2 connection (cloned per request).
    Http2(http2::SendRequest<RequestBody>),
}

impl Sender {
    /// Sends `req`; the request comes back in the error if the connection closed before it was
    /// written (a pooled connection the peer closed meanwhile, an HTTP/2 connection going away).
    pub async fn try_send_request(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        match self {
            Sender::Http1(s, _) => s.try_send_request(req).await,
            Sender::Http2(s) => s.try_send_request(req).await,
        }
    }

    /// Whether this request is the `max`-th on an HTTP/1.1 connection (HTTP/2 is not counted).
    pub fn is_last(&self, max: u32) -> bool {
        matches!(self, Sender::Http1(_, n) if *n >= max)
    }
}

/// An idle HTTP/1.1 connection, the requests it has carried, and since when it is idle (kept only
/// under a cluster's `idle_timeout`).
type Idle = (SendRequest<RequestBody>, u32, Option<std::time::Instant>);

/// The connections of one endpoint. Plain mutexes: each is held for a push, a pop or a clone.
#[derive(Debug, Default)]
pub struct Pool {
    /// HTTP/1.1 connections ready for another request. Most recently returned last: handed out
    /// first, as the least likely to have been closed by the peer's keep-alive timeout.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection every request to this endpoint shares, while it is usable.
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// Held while an HTTP/2 connection is being opened, so that the requests that find none wait
    /// for that one instead of each opening their own.
    h2_connecting: tokio::sync::Mutex<()>,
}

/// A connection ready for a request.
pub struct Upstream {
    pub sender: Sender,
    /// Taken from the pool rather than opened for this request: the peer may have closed it
    /// meanwhile, which is only seen when the request is written.
    pub reused: bool,
}

impl Pool {
    /// An idle pooled HTTP/1.1 connection that is still usable, if there is one.
    pub async fn checkout(&self) -> Option<Sender> {
        loop {
            let (mut sender, served, _) = self.idle.lock().expect("pool lock poisoned").pop()?;
            // Closed by the peer while idle: dropped here, never handed out.
            if sender.is_closed() {
                continue;
            }
            // Waits only for a connection whose previous response is being finished; one that
            // closed meanwhile errors at once and is dropped.
            if sender.ready().await.is_ok() {
                return Some(Sender::Http1(sender, served + 1));
            }
        }
    }

    /// Returns a connection after its response was read to the end. When the pool is full, the
    /// connections the peer closed meanwhile are evicted first to make room. An HTTP/2 handle is
    /// just dropped: the connection stays shared in the pool. `since`: when it became idle, for a
    /// cluster that closes idle connections ([`Pool::close_idle_before`]).
    pub fn checkin(&self, sender: Sender, since: Option<std::time::Instant>) {
        let Sender::Http1(sender, served) = sender else { return };
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        if idle.len() >= MAX_IDLE_PER_ENDPOINT {
            idle.retain(|(s, ..)| !s.is_closed());
        }
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push((sender, served, since));
        }
    }

    /// Closes one idle HTTP/1.1 connection, if there is one: room under a cluster's connection
    /// limit for a request to another endpoint.
    pub fn evict_idle(&self) -> bool {
        self.idle.lock().expect("pool lock poisoned").pop().is_some()
    }

    /// Closes the idle HTTP/1.1 connections idle since before `deadline`; returns how many stay idle.
    pub fn close_idle_before(&self, deadline: std::time::Instant) -> usize {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        idle.retain(|(s, _, since)| !s.is_closed() && since.is_none_or(|t| t >= deadline));
        idle.len()
    }

    /// The shared HTTP/2 connection if it is usable.
    fn shared_h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let slot = self.h2.lock().expect("pool lock poisoned");
        slot.as_ref().filter(|s| s.is_ready()).cloned()
    }

    /// The shared HTTP/2 connection, opened with `connect` if there is none usable (one opening at
    /// a time; the others wait for it). `fresh` replaces even a usable-looking one: the caller saw
    /// it fail.
    pub async fn h2<F, Fut>(&self, fresh: bool, connect: F) -> io::Result<Upstream>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = io::Result<http2::SendRequest<RequestBody>>>,
    {
        if !fresh {
            if let Some(s) = self.shared_h2() {
                return Ok(Upstream { sender: Sender::Http2(s), reused: true });
            }
        }
        let _connecting = self.h2_connecting.lock().await;
        if !fresh {
            if let Some(s) = self.shared_h2() {
                return Ok(Upstream { sender: Sender::Http2(s), reused: true });
            }
        }
        let s = connect().await?;
        *self.h2.lock().expect("pool lock poisoned") = Some(s.clone());
        Ok(Upstream { sender: Sender::Http2(s), reused: false })
    }

    /// Idle connections still open (those the peer closed are evicted as they are counted), and
    /// the shared HTTP/2 connection.
    pub fn idle_connections(&self) -> usize {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        idle.retain(|(s, ..)| !s.is_closed());
        idle.len() + usize::from(self.shared_h2().is_some())
    }
}

/// Starts HTTP/1.1 on a connected `stream` to `addr`. The connection's driver task runs until the
/// connection closes, and then drops `on_close` (the endpoint's count of open connections).
pub async fn handshake<G: Send + 'static>(
    stream: TcpStream,
    addr: SocketAddr,
    on_close: G,
) -> io::Result<SendRequest<RequestBody>> {
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        // An upgrade (WebSocket, CONNECT) hands the socket over to a tunnel instead of closing it.
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended");
        }
        drop(on_close);
    });
    Ok(sender)
}

/// Starts HTTP/2 (prior knowledge) on a connected `stream` to `addr`, as [`handshake`] does
/// HTTP/1.1. Streams beyond the endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS` wait for a free one.
pub async fn handshake_h2<G: Send + 'static>(
    stream: TcpStream,
    addr: SocketAddr,
    on_close: G,
) -> io::Result<http2::SendRequest<RequestBody>> {
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        // A connection whose endpoint stopped answering is found out by pings, not by the next
        // request's timeout: every request to the endpoint shares it.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(endpoint = %addr, error = %e, "upstream HTTP/2 connection ended");
        }
        drop(on_close);
    });
    Ok(sender)
}
