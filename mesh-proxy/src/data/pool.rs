//! Upstream HTTP/1.1 connections: started on a connected stream, kept idle between requests in the
//! endpoint's [`Pool`], handed out again when still usable. Knows nothing of endpoints: the
//! [`cluster`](crate::data::cluster) side owns a pool per endpoint and counts its connections.
//!
//! A connection is a hyper client connection: a [`SendRequest`] the request path holds and a
//! driver task that owns the socket and ends when the connection closes — also when the peer
//! closes it while it is idle, which marks the [`SendRequest`] closed: such a connection is never
//! handed out again and does not count as idle.
//!
//! A pooled connection the peer closes *while* it is being reused (its FIN crossing our request)
//! fails the request; the request path sends it again on a fresh connection when that is safe
//! (`data/http/forward.rs`), which is why [`Upstream::reused`] exists.

use std::{io, net::SocketAddr, sync::Mutex};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Any error a request body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request sent upstream: the client's body as it streams in, or one the proxy
/// made (empty, for a request sent again). Boxed, so the request path can wrap the client's
/// body (timers, the end of the request) without the pool knowing how.
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle upstream connections kept per endpoint; more are closed when they come back.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// HTTP/1.1 connections of one endpoint ready for another request. A plain mutex: held for a
/// push or a pop.
#[derive(Debug, Default)]
pub struct Pool {
    /// Most recently returned last: handed out first, as the least likely to have been closed by
    /// the peer's keep-alive timeout.
    idle: Mutex<Vec<SendRequest<RequestBody>>>,
}

/// A connection ready for a request.
pub struct Upstream {
    pub sender: SendRequest<RequestBody>,
    /// Taken from the pool rather than opened for this request: the peer may have closed it
    /// meanwhile, which is only seen when the request is written.
    pub reused: bool,
}

impl Pool {
    /// An idle pooled connection that is still usable, if there is one.
    pub async fn checkout(&self) -> Option<SendRequest<RequestBody>> {
        loop {
            let mut sender = self.idle.lock().expect("pool lock poisoned").pop()?;
            // Closed by the peer while idle: dropped here, never handed out.
            if sender.is_closed() {
                continue;
            }
            // Waits only for a connection whose previous response is being finished; one that
            // closed meanwhile errors at once and is dropped.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Returns a connection after its response was read to the end. When the pool is full, the
    /// connections the peer closed meanwhile are evicted first to make room.
    pub fn checkin(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        if idle.len() >= MAX_IDLE_PER_ENDPOINT {
            idle.retain(|s| !s.is_closed());
        }
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(sender);
        }
    }

    /// Idle connections still open (those the peer closed are evicted as they are counted).
    pub fn idle_connections(&self) -> usize {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        idle.retain(|s| !s.is_closed());
        idle.len()
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
