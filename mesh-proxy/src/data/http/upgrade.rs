//! HTTP/1.1 upgrades (`Upgrade: websocket`, or any other protocol) and `CONNECT` tunnels: the
//! handshake is an ordinary request (routed, balanced, forwarded on a pooled connection); when the
//! upstream accepts it (`101 Switching Protocols`, or a 2xx to `CONNECT`), both connections leave
//! HTTP and are joined as a TCP session (half-close, idle timeout; zero-copy [`splice`] between the
//! two sockets) whose bytes go into the request's access-log line.
//!
//! `Upgrade: h2c` is not an upgrade here: it is dropped (the request goes on as HTTP/1.1), so every
//! request stays routed on its own instead of a whole HTTP/2 connection following the first one.

use std::{io, time::Duration};

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::{
    body::Incoming,
    upgrade::{OnUpgrade, Upgraded},
};
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::access_log::AccessLog;
use crate::data::{
    cluster::RequestGuard,
    tcp::{copy, splice, Transfer},
};

/// A request that asks to leave HTTP: its downstream connection, handed over by hyper once the
/// response is sent, and what it asked for.
pub(super) struct Upgrade {
    downstream: OnUpgrade,
    /// The `Upgrade` header's value; `None` for `CONNECT`.
    protocol: Option<HeaderValue>,
}

/// Whether `headers` ask for an upgrade: an `Upgrade` header, and `upgrade` among `Connection`'s
/// tokens (RFC 9110 §7.8). `h2c` does not count (see the module's header).
fn requested_protocol(headers: &HeaderMap) -> Option<&HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    (named && !protocol.as_bytes().eq_ignore_ascii_case(b"h2c")).then_some(protocol)
}

impl Upgrade {
    /// Takes the downstream connection's upgrade out of `req` if it asks for one.
    pub(super) fn take(req: &mut Request<Incoming>) -> Option<Upgrade> {
        let protocol =
            if req.method() == Method::CONNECT { None } else { Some(requested_protocol(req.headers())?.clone()) };
        Some(Upgrade { downstream: hyper::upgrade::on(req), protocol })
    }

    /// Puts back what the hop-by-hop stripping removed from the request going upstream.
    pub(super) fn restore_request_headers(&self, headers: &mut HeaderMap) {
        if let Some(p) = &self.protocol {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, p.clone());
        }
    }

    /// Whether the upstream's answer switches the connection: `101` to an `Upgrade`, any 2xx to
    /// `CONNECT`. Anything else is an ordinary response and the connection stays HTTP.
    pub(super) fn accepted(&self, status: StatusCode) -> bool {
        match self.protocol {
            Some(_) => status == StatusCode::SWITCHING_PROTOCOLS,
            None => status.is_success(),
        }
    }

    /// Joins the two connections once hyper has handed both over (after the `101` is written
    /// downstream), copying until both sides are done or `idle` passes without a byte; the access
    /// log line is written then. `resp` is the upstream's accepting response, whose headers go
    /// downstream (the `Upgrade` it chose restored after the hop-by-hop stripping).
    pub(super) fn join(
        self,
        resp: &mut Response<Incoming>,
        upgrade_header: Option<HeaderValue>,
        idle: Duration,
        log: AccessLog,
        guard: RequestGuard,
    ) {
        if let Some(p) = upgrade_header {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut().insert(header::UPGRADE, p);
        }
        let upstream = hyper::upgrade::on(resp);
        let downstream = self.downstream;
        tokio::spawn(async move {
            let _guard = guard;
            let (down, up) = tokio::join!(downstream, upstream);
            match (down, up) {
                (Ok(down), Ok(up)) => log.tunnel(relay(down, up, idle).await),
                (Err(e), _) | (_, Err(e)) => log.tunnel(Err(std::io::Error::other(e))),
            }
        });
    }
}

/// Joins two upgraded connections until both sides are done. They are the TCP sockets hyper was
/// given, so they are taken back and spliced, after the bytes hyper read past the handshake (what
/// each side sent right behind it) are passed on; any other stream is copied.
async fn relay(down: Upgraded, up: Upgraded, idle: Duration) -> io::Result<Transfer> {
    let down = match down.downcast::<TokioIo<TcpStream>>() {
        Ok(d) => d,
        Err(down) => return copy(&mut TokioIo::new(down), &mut TokioIo::new(up), idle).await,
    };
    let early_up = down.read_buf.len() as u64;
    let mut d = down.io.into_inner();
    let t = match up.downcast::<TokioIo<TcpStream>>() {
        Ok(up) => {
            let mut u = up.io.into_inner();
            u.write_all(&down.read_buf).await?;
            d.write_all(&up.read_buf).await?;
            let t = splice(&mut d, &mut u, idle).await?;
            Transfer { received: t.received + up.read_buf.len() as u64, ..t }
        }
        Err(up) => {
            let mut u = TokioIo::new(up);
            u.write_all(&down.read_buf).await?;
            copy(&mut d, &mut u, idle).await?
        }
    };
    Ok(Transfer { sent: t.sent + early_up, ..t })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (header::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn an_upgrade_needs_both_headers_and_is_not_h2c() {
        let ws = map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(requested_protocol(&ws).unwrap(), "websocket");
        assert!(requested_protocol(&map(&[("upgrade", "websocket")])).is_none(), "Connection must name it");
        assert!(requested_protocol(&map(&[("connection", "upgrade")])).is_none());
        assert!(requested_protocol(&map(&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")])).is_none());
    }
}
