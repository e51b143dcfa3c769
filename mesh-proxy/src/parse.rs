//! The grammars of the values an operator writes and a client sends: durations, socket addresses
//! and `host[:port]` authorities. One parser each, so a route destination in the config and the
//! `Host` of a request are read by the same rules, and nothing else in the crate splits strings.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

/// Parses `250ms`, `1.5s`, `1m30s` (Go's grammar, shared by every part of the mesh: see
/// [`mesh_common::duration`]). A bare number is refused: the unit is never guessed.
pub fn duration(s: &str) -> Result<Duration, String> {
    mesh_common::duration::parse(s).map_err(|e| format!("invalid duration {:?}: {e}", s.trim()))
}

/// Renders a duration the way [`duration`] reads it (`250ms`, `5s`).
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    match ns {
        _ if ns.is_multiple_of(1_000_000_000) => format!("{}s", ns / 1_000_000_000),
        _ if ns.is_multiple_of(1_000_000) => format!("{}ms", ns / 1_000_000),
        _ if ns.is_multiple_of(1_000) => format!("{}us", ns / 1_000),
        _ => format!("{ns}ns"),
    }
}

/// serde's `serialize_with` for durations: the effective config in `/config_dump` shows them as
/// the file writes them.
pub fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// Parses `ip:port` (IPv6 as `[addr]:port`).
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("invalid address {s:?}: expected ip:port, e.g. 10.0.0.1:8080 or [fd00::1]:8080"))
}

/// `host[:port]` as a route destination names it and a request's authority carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority<'a> {
    pub host: Host<'a>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    Ip(IpAddr),
    /// A DNS name as written (case kept: the caller lower-cases when it must), without the
    /// trailing dot of a fully qualified name.
    Name(&'a str),
}

/// Why a string is not an authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityError {
    Port,
    /// An IPv6 address with a port but without brackets (`fd00::1:80` is ambiguous).
    UnbracketedIpv6,
    Host,
}

impl fmt::Display for AuthorityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthorityError::Port => "invalid port",
            AuthorityError::UnbracketedIpv6 => "write IPv6 as [addr]:port",
            AuthorityError::Host => "expected host[:port] or ip:port",
        })
    }
}

/// Parses `name`, `name:port`, `ipv4[:port]`, `[ipv6]` and `[ipv6]:port`. A name is 1-253 letters,
/// digits, `-`, `.` and `_`; a trailing dot (a fully qualified name) is dropped. On the request
/// path this runs once per request routed by authority: no allocation, one pass over the bytes.
pub fn authority(s: &str) -> Result<Authority<'_>, AuthorityError> {
    let port = |p: &str| p.parse::<u16>().map_err(|_| AuthorityError::Port);
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or(AuthorityError::Host)?;
        let ip: Ipv6Addr = ip.parse().map_err(|_| AuthorityError::Host)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(port(p)?),
            None if after.is_empty() => None,
            None => return Err(AuthorityError::Host),
        };
        return Ok(Authority { host: Host::Ip(ip.into()), port });
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => return Err(AuthorityError::UnbracketedIpv6),
        Some((h, p)) => (h, Some(port(p)?)),
        None => (s, None),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Ok(Authority { host: Host::Ip(ip.into()), port });
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid {
        return Err(AuthorityError::Host);
    }
    Ok(Authority { host: Host::Name(host), port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(duration("2m").unwrap(), Duration::from_secs(120));
        assert!(duration("1").is_err());
        assert!(duration("s").is_err());
        assert!(duration("1e400s").is_err());
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1500us");
    }

    #[test]
    fn authorities_split() {
        let name = |h, p| Ok(Authority { host: Host::Name(h), port: p });
        let ip = |h: &str, p| Ok(Authority { host: Host::Ip(h.parse().unwrap()), port: p });
        assert_eq!(authority("a:1"), name("a", Some(1)));
        assert_eq!(authority("a"), name("a", None));
        assert_eq!(authority("Reviews.:9080"), name("Reviews", Some(9080)));
        assert_eq!(authority("[::1]:5"), ip("::1", Some(5)));
        assert_eq!(authority("[::1]"), ip("::1", None));
        assert_eq!(authority("10.0.0.1"), ip("10.0.0.1", None));
        assert_eq!(authority("a:x"), Err(AuthorityError::Port));
        assert_eq!(authority("a:"), Err(AuthorityError::Port));
        assert_eq!(authority("[::1"), Err(AuthorityError::Host));
        assert_eq!(authority("[::1]x"), Err(AuthorityError::Host));
        assert_eq!(authority("fd00::1:80"), Err(AuthorityError::UnbracketedIpv6));
        assert_eq!(authority("a b:80"), Err(AuthorityError::Host));
        assert_eq!(authority(""), Err(AuthorityError::Host));
    }
}
