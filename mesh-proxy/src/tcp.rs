//! Opaque TCP: connecting upstream and copying bytes both ways.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream},
};

/// Connects to `addr` within `timeout`, optionally from source address `bind` (port chosen by the
/// kernel), with Nagle off: the proxy forwards what it gets and must not add latency.
pub async fn connect(addr: SocketAddr, bind: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What a finished copy moved.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub sent: u64,
    pub received: u64,
    pub duration: Duration,
}

/// Copies both ways until both sides are done. When one side finishes sending, the other side's
/// write half is shut down (a FIN, not a reset), and the other direction keeps flowing: protocols
/// that half-close (`shutdown(SHUT_WR)` then read the answer) work through the proxy.
pub async fn splice<A, B>(downstream: &mut A, upstream: &mut B) -> io::Result<Transfer>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    let (sent, received) = tokio::io::copy_bidirectional(downstream, upstream).await?;
    Ok(Transfer { sent, received, duration: start.elapsed() })
}
