//! `mesh-init validate`: proving, from inside the namespace, that interception works.
//!
//! Like istio-validation it runs after the rules are in place and before the proxy starts: it
//! listens on the redirect port itself, dials an address that must be captured, and checks that
//! the connection arrived on the listener with that address as its `SO_ORIGINAL_DST`. A failure
//! exits non-zero with one sentence saying which step failed, so a pod never starts with traffic
//! silently bypassing its proxy.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use crate::orig_dst::original_dst;

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("cannot listen on any of {addrs} ({cause}); the proxy's ports must be free during validation")]
    ListenAny { addrs: String, cause: std::io::Error },
    #[error("cannot listen on {addr} ({cause}); run validate before the proxy starts, or check --envoy-port")]
    Listen { addr: SocketAddr, cause: std::io::Error },
    #[error(
        "running as UID {uid}, which is a proxy UID: its traffic is exempt by design; run validate as another user"
    )]
    ProxyUser { uid: u32 },
    #[error("connecting to {probe} failed ({cause}): outbound traffic is not redirected to port {port}")]
    Connect { probe: SocketAddr, port: u16, cause: std::io::Error },
    #[error("the connection to {probe} was not redirected to port {port} within {timeout:?}")]
    NotRedirected { probe: SocketAddr, port: u16, timeout: Duration },
    #[error("the redirected connection has no SO_ORIGINAL_DST ({cause})")]
    NoOriginalDst { cause: nix::Error },
    #[error("SO_ORIGINAL_DST is {got}, expected {probe}: the rules rewrite the destination wrongly")]
    WrongOriginalDst { probe: SocketAddr, got: SocketAddr },
    #[error("I/O on the validation connection failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks that a TCP connect to `probe` is redirected to `port` on this host and that the
/// original destination reads back as `probe`.
pub fn outbound(
    port: u16,
    probe: SocketAddr,
    proxy_uids: &[u32],
    timeout: Duration,
) -> Result<SocketAddr, ValidationError> {
    let uid = nix::unistd::geteuid().as_raw();
    if proxy_uids.contains(&uid) {
        return Err(ValidationError::ProxyUser { uid });
    }
    let bind: SocketAddr =
        if probe.is_ipv6() { (std::net::Ipv6Addr::UNSPECIFIED, port).into() } else { ([0, 0, 0, 0], port).into() };
    let listener = TcpListener::bind(bind).map_err(|cause| ValidationError::Listen { addr: bind, cause })?;
    listener.set_nonblocking(true)?;

    let mut client =
        TcpStream::connect_timeout(&probe, timeout).map_err(|cause| ValidationError::Connect { probe, port, cause })?;
    let deadline = Instant::now() + timeout;
    let mut accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(ValidationError::NotRedirected { probe, port, timeout })
            }
            Err(e) => return Err(e.into()),
        }
    };
    accepted.set_nonblocking(false)?;
    let got = original_dst(&accepted, probe.is_ipv6()).map_err(|cause| ValidationError::NoOriginalDst { cause })?;
    if got != probe {
        return Err(ValidationError::WrongOriginalDst { probe, got });
    }
    // A round trip proves the path carries data, not only a handshake.
    client.write_all(b"mesh-init validate\n")?;
    let mut buf = [0u8; 19];
    accepted.set_read_timeout(Some(timeout))?;
    accepted.read_exact(&mut buf)?;
    Ok(got)
}

/// istio-validation's check (`--run-validation`): listening on 127.0.0.1 on the proxy's ports,
/// a connection from 127.0.0.1 to 127.0.0.6:`probe_port` must arrive on one of them with that
/// original destination. Made by the proxy's UID, it proves the rule that sends the proxy's own
/// calls to its pod to the inbound port; made by another user, that the rules are absent.
pub fn istio_probe(ports: &[u16], probe_port: u16, timeout: Duration) -> Result<SocketAddr, ValidationError> {
    let mut listeners = Vec::new();
    let mut last_error = None;
    for &port in ports {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if listeners.iter().any(|(a, _): &(SocketAddr, TcpListener)| *a == addr) {
            continue;
        }
        match TcpListener::bind(addr) {
            Ok(l) => {
                l.set_nonblocking(true)?;
                listeners.push((addr, l));
            }
            Err(e) => last_error = Some(e),
        }
    }
    if listeners.is_empty() {
        let addrs = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(", ");
        let cause = last_error.unwrap_or_else(|| std::io::Error::other("no port given"));
        return Err(ValidationError::ListenAny { addrs, cause });
    }
    // 127.0.0.0/8 is local: the kernel picks 127.0.0.1 as the source, as istio-validation binds.
    let probe = SocketAddr::from((mesh_common::INBOUND_PASSTHROUGH_V4, probe_port));
    let port = ports[ports.len() - 1];
    let _client =
        TcpStream::connect_timeout(&probe, timeout).map_err(|cause| ValidationError::Connect { probe, port, cause })?;
    let deadline = Instant::now() + timeout;
    loop {
        for (_, l) in &listeners {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    let got = original_dst(&s, false).map_err(|cause| ValidationError::NoOriginalDst { cause })?;
                    if got != probe {
                        return Err(ValidationError::WrongOriginalDst { probe, got });
                    }
                    return Ok(got);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        if Instant::now() >= deadline {
            return Err(ValidationError::NotRedirected { probe, port, timeout });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A duration such as `500ms`, `5s` or `1m30s`: Go's grammar, as istio-iptables' `--probe-timeout`
/// takes it (a bare number is refused there too).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_common::duration::parse(s).map_err(|e| format!("invalid duration {:?}: {e}", s.trim()))
}
