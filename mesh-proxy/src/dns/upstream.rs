//! Forwarding a query to the pod's nameservers, in resolv.conf's order: over UDP from a fresh
//! socket (a random source port per query, and only the server's answer is read), again over TCP
//! when the answer comes back truncated; a server that does not answer within the timeout gives
//! way to the next. The proxy's own queries are not captured (mesh-init exempts its UID), so they
//! reach the real servers.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use super::wire::Response;

/// The largest UDP answer read from a server (EDNS's usual ceiling).
const MAX_UDP: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{server}: no answer within {timeout:?}")]
    Timeout { server: SocketAddr, timeout: Duration },
    #[error("{server}: {error}")]
    Io { server: SocketAddr, error: io::Error },
}

/// An upstream's answer: the message as received and what the proxy read of it.
pub struct Answer {
    pub message: Vec<u8>,
    pub parsed: Response,
    /// Whether it came over TCP (asked that way, or after a truncated UDP answer).
    pub over_tcp: bool,
}

pub struct Upstream {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
}

impl Upstream {
    /// Sends `query` (with ID `id`) to each server in turn until one answers; `tcp` when the client
    /// asked over TCP.
    pub async fn forward(&self, query: &[u8], id: u16, tcp: bool) -> Result<Answer, ForwardError> {
        let mut last = None;
        for &server in &self.servers {
            let attempt = async {
                if !tcp {
                    let message = udp(server, query, id).await?;
                    let parsed = parse(server, &message)?;
                    if !parsed.truncated {
                        return Ok(Answer { message, parsed, over_tcp: false });
                    }
                }
                let message = over_tcp(server, query).await?;
                let parsed = parse(server, &message)?;
                Ok(Answer { message, parsed, over_tcp: true })
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(error)) => last = Some(ForwardError::Io { server, error }),
                Err(_) => last = Some(ForwardError::Timeout { server, timeout: self.timeout }),
            }
        }
        Err(last.expect("resolv.conf always yields a nameserver"))
    }
}

fn parse(server: SocketAddr, message: &[u8]) -> io::Result<Response> {
    Response::parse(message).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{server}: {e}")))
}

async fn udp(server: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let any: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(any).await?;
    // Connected: the kernel drops datagrams from anyone but the server.
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A stray or stale datagram (another ID) is not the answer: keep waiting.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id && Response::is_response(&buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn over_tcp(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    s.set_nodelay(true)?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
    framed.extend_from_slice(query);
    s.write_all(&framed).await?;
    read_framed(&mut s).await
}

/// Reads one length-prefixed message (DNS over TCP, RFC 1035 §4.2.2).
pub async fn read_framed<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let mut message = vec![0u8; u16::from_be_bytes(len) as usize];
    r.read_exact(&mut message).await?;
    Ok(message)
}
