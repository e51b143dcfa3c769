//! Opening upstream sockets, for endpoints, passthrough and the local application alike.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr` within `timeout`, optionally from source address `bind` (port chosen by the
/// kernel), with Nagle off: the proxy forwards what it gets and must not add latency.
pub async fn connect(addr: SocketAddr, bind: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    finish(socket, addr, timeout).await
}

/// Connects to `addr` from `source`, an address of another host (the client of a TPROXY'd
/// connection): a transparent socket (`IP_TRANSPARENT`, which needs `CAP_NET_ADMIN`) with `mark`,
/// the TPROXY mark mesh-init's rules route the answers back to this socket by.
pub async fn connect_transparent(
    addr: SocketAddr,
    source: IpAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    finish(TcpSocket::from_std_stream(socket.into()), addr, timeout).await
}

async fn finish(socket: TcpSocket, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Turns TCP keepalive on for `stream`: the first probe after `time` idle, then every `interval`,
/// `probes` unanswered ones closing the connection; what is not given keeps the kernel's value.
pub fn keepalive(
    stream: &TcpStream,
    time: Option<Duration>,
    interval: Option<Duration>,
    probes: Option<u32>,
) -> io::Result<()> {
    let mut k = socket2::TcpKeepalive::new();
    if let Some(t) = time {
        k = k.with_time(t);
    }
    if let Some(i) = interval {
        k = k.with_interval(i);
    }
    if let Some(p) = probes {
        k = k.with_retries(p);
    }
    socket2::SockRef::from(stream).set_tcp_keepalive(&k)
}
