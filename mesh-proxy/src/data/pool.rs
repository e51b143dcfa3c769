//! Upstream HTTP/1.1 connections: started on a connected stream, kept idle between requests in the
//! endpoint's [`Pool`], handed out again when still usable. Knows nothing of endpoints: the
//! [`cluster`](crate::data::cluster) side owns a pool per endpoint and counts its connections.
//!
//! A connection is a hyper client connection: a [`SendRequest`] the request path holds and a
//! driver task that owns the socket and ends when the connection closes.

use std::{io, net::SocketAddr, sync::Mutex};

use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Idle upstream connections kept per endpoint; more are closed when they come back.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// HTTP/1.1 connections of one endpoint ready for another request. A plain mutex: held for a
/// push or a pop.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<SendRequest<Incoming>>>,
}

/// A connection ready for a request.
pub struct Upstream {
    pub sender: SendRequest<Incoming>,
    /// Taken from the pool rather than opened for this request: the peer may have closed it
    /// meanwhile, which is only seen when the request is written.
    pub reused: bool,
}

impl Pool {
    /// An idle pooled connection that is still usable, if there is one.
    pub async fn checkout(&self) -> Option<SendRequest<Incoming>> {
        loop {
            let mut sender = self.idle.lock().expect("pool lock poisoned").pop()?;
            // Waits only for a connection whose previous response is being finished; a closed one
            // errors at once and is dropped.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Returns a connection after its response was read to the end.
    pub fn checkin(&self, sender: SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(sender);
        }
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.lock().expect("pool lock poisoned").len()
    }
}

/// Starts HTTP/1.1 on a connected `stream` to `addr`. The connection's driver task runs until the
/// connection closes, and then drops `on_close` (the endpoint's count of open connections).
pub async fn handshake<G: Send + 'static>(
    stream: TcpStream,
    addr: SocketAddr,
    on_close: G,
) -> io::Result<SendRequest<Incoming>> {
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
