//! Whose socket is at the other end of an admin connection.
//!
//! `SO_PEERCRED` answers this for Unix sockets only; for a TCP connection over loopback the
//! kernel's socket table does: `/proc/self/net/tcp` (and `tcp6`) list every socket of the
//! namespace with its owner's UID, so the peer is the socket whose local address is our peer's
//! and whose remote address is our end. This is what `ss -e` shows. A peer outside the namespace
//! (the admin address bound beyond loopback) has no entry: its UID is unknown.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The UID owning the socket `peer` connected to us at `local`, if this namespace has it.
pub fn uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let tables: &[&str] = match (peer, local) {
        (SocketAddr::V4(_), _) => &["/proc/self/net/tcp", "/proc/self/net/tcp6"],
        (SocketAddr::V6(_), _) => &["/proc/self/net/tcp6"],
    };
    tables.iter().find_map(|t| std::fs::read_to_string(t).ok().and_then(|text| find(&text, peer, local)))
}

/// The `uid` column of the line of `table` whose local address is `peer` and remote `local`.
fn find(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (cols.get(1)?, cols.get(2)?, cols.get(7)?);
        (same(parse(l)?, peer) && same(parse(r)?, local)).then(|| uid.parse().ok()).flatten()
    })
}

/// An IPv4 peer may appear in `tcp6` as `::ffff:a.b.c.d`.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:port` (IPv6): the address in the kernel's byte
/// order, 32-bit word by word, the port in hex.
fn parse(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::swap_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3ACA 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 1001 1 0 100 0 0 10 0
   1: 0100007F:D431 0100007F:3ACA 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0 20 4 30 10 -1
   2: 0100007F:3ACA 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1337        0 1003 1 0 20 4 30 10 -1
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:D432 00000000000000000000000001000000:3ACA 01 00000000:00000000 00:00000000 00000000  1000        0 2001 1 0 20 4 30 10 -1
";

    #[test]
    fn the_peer_socket_and_its_owner_are_found() {
        let admin: SocketAddr = "127.0.0.1:15050".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(find(TCP, client, admin), Some(0));
        assert_eq!(find(TCP, "127.0.0.1:1".parse().unwrap(), admin), None);
        let admin6: SocketAddr = "[::1]:15050".parse().unwrap();
        assert_eq!(find(TCP6, "[::1]:54322".parse().unwrap(), admin6), Some(1000));
    }

    #[test]
    fn this_connection_is_ours() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(uid(peer, listener.local_addr().unwrap()), Some(nix::unistd::geteuid().as_raw()));
    }
}
