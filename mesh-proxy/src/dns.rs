//! The DNS proxy, as Istio's agent runs one on port 15053: mesh-init's `--redirect-dns` rules send
//! the pod's queries here (UDP and TCP, IPv4 and IPv6); a name of the config's `hosts` section
//! (or a short form of one, through the pod's search domains: [`data::names`]) is answered from
//! the config, anything else is forwarded to the pod's own nameservers and their answer cached for
//! its TTL.
//!
//! - [`wire`]: the message format; [`resolv`]: resolv.conf; [`upstream`]: forwarding (UDP, TCP
//!   after truncation, the next server after a timeout); [`cache`]: answers kept for their TTL.
//!
//! Started only when the bootstrap's `dns` section (or `--dns-capture`) asks. Runs on the data
//! plane's runtime; reads the names from the same snapshot the routes come from, so a reload or a
//! discovery answer changes both at once.
//!
//! [`data::names`]: crate::data::names

pub mod cache;
pub mod resolv;
pub mod upstream;
pub mod wire;

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream, UdpSocket},
    runtime::Handle,
    sync::Semaphore,
};

use crate::{config::Dns, data::snapshot::SharedSnapshot, metrics::Metrics};
use cache::Cache;
use resolv::ResolvConf;
use upstream::Upstream;
use wire::{Query, Refused, RCODE_SERVFAIL};

/// The TTL of the answers the proxy gives from its config (Istio's agent's).
const LOCAL_TTL: u32 = 30;
/// Queries being answered at once; more are dropped (the client asks again), which bounds memory
/// and the sockets opened upstream.
const MAX_IN_FLIGHT: usize = 1024;
/// A TCP client that sends no query for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("dns.resolv_conf: {0}")]
    ResolvConf(#[from] resolv::ReadError),
    #[error("dns.addresses: binding {address} ({transport}): {error}")]
    Bind { address: SocketAddr, transport: &'static str, error: io::Error },
}

/// How a query was answered: the `answer` label of `mesh_proxy_dns_queries_total`.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// From the config's names.
    Local,
    Cache,
    Upstream,
    /// No upstream answered: SERVFAIL.
    Failed,
    /// Not a query the proxy answers (malformed: FORMERR; another opcode: NOTIMP).
    Refused,
}

/// The counters of one transport, looked up once.
struct Counters([Counter; 5]);

impl Counters {
    fn new(metrics: &Metrics, transport: &str) -> Self {
        Counters(["local", "cache", "upstream", "failed", "refused"].map(|answer| metrics.dns_query(transport, answer)))
    }

    fn count(&self, o: Outcome) {
        self.0[o as usize].inc();
    }
}

struct DnsProxy {
    snapshot: SharedSnapshot,
    search: Vec<String>,
    upstream: Upstream,
    cache: Cache,
    udp: Counters,
    tcp: Counters,
    in_flight: Arc<Semaphore>,
}

impl DnsProxy {
    /// The response to `message`, and the largest size the client takes over UDP; `None` when the
    /// message deserves no answer.
    async fn respond(&self, message: &[u8], tcp: bool) -> Option<(Vec<u8>, usize)> {
        let counters = if tcp { &self.tcp } else { &self.udp };
        let q = match Query::parse(message) {
            Ok(q) => q,
            Err(Refused::Drop) => return None,
            Err(Refused::Answer(a)) => {
                counters.count(Outcome::Refused);
                return Some((a, wire::CLASSIC_UDP_SIZE));
            }
        };
        let limit = q.udp_limit();
        if let (true, Some(name)) = (q.is_address_question(), &q.name) {
            let snapshot = self.snapshot.load();
            if let Some(addrs) = snapshot.names.lookup(name, &self.search) {
                counters.count(Outcome::Local);
                return Some((q.answer(addrs, LOCAL_TTL), limit));
            }
        }
        let now = Instant::now();
        if let Some(hit) = self.cache.get(&q, now) {
            counters.count(Outcome::Cache);
            return Some((hit, limit));
        }
        match self.upstream.forward(message, q.id, tcp).await {
            Ok(a) => {
                self.cache.put(&q, &a.message, &a.parsed, now);
                counters.count(Outcome::Upstream);
                Some((a.message, limit))
            }
            Err(e) => {
                tracing::debug!(name = q.name.as_deref().unwrap_or("-"), error = %e, "dns: no upstream answered");
                counters.count(Outcome::Failed);
                Some((q.error(RCODE_SERVFAIL), limit))
            }
        }
    }
}

/// Binds `settings.addresses` (UDP and TCP each) and serves them on `data`; returns the bound
/// addresses. An IPv6 address is skipped where the namespace has no IPv6.
pub fn start(
    settings: &Dns,
    snapshot: SharedSnapshot,
    metrics: &Metrics,
    data: &Handle,
) -> Result<Vec<SocketAddr>, StartError> {
    let resolv = ResolvConf::read(&settings.resolv_conf)?;
    let mut sockets = Vec::new();
    for &address in &settings.addresses {
        let bind_err = |transport, error| StartError::Bind { address, transport, error };
        let udp = match std::net::UdpSocket::bind(address) {
            Ok(s) => s,
            Err(e) if address.is_ipv6() && no_ipv6(&e) => {
                tracing::debug!(%address, error = %e, "dns: no IPv6 here; not listening on it");
                continue;
            }
            Err(e) => return Err(bind_err("udp", e)),
        };
        // Port 0 (tests): TCP on the port UDP got.
        let bound = udp.local_addr().map_err(|e| bind_err("udp", e))?;
        let tcp = std::net::TcpListener::bind(bound).map_err(|e| bind_err("tcp", e))?;
        for result in [udp.set_nonblocking(true), tcp.set_nonblocking(true)] {
            result.map_err(|e| bind_err("udp", e))?;
        }
        sockets.push((bound, udp, tcp));
    }
    tracing::info!(
        nameservers = ?resolv.nameservers,
        search = ?resolv.search,
        addresses = ?sockets.iter().map(|s| s.0).collect::<Vec<_>>(),
        "dns proxy listening"
    );
    let proxy = Arc::new(DnsProxy {
        snapshot,
        search: resolv.search,
        upstream: Upstream { servers: resolv.nameservers, timeout: resolv.timeout },
        cache: Cache::default(),
        udp: Counters::new(metrics, "udp"),
        tcp: Counters::new(metrics, "tcp"),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
    });
    let _guard = data.enter();
    let mut bound = Vec::new();
    for (address, udp, tcp) in sockets {
        let udp = UdpSocket::from_std(udp).map_err(|error| StartError::Bind { address, transport: "udp", error })?;
        let tcp = TcpListener::from_std(tcp).map_err(|error| StartError::Bind { address, transport: "tcp", error })?;
        data.spawn(serve_udp(proxy.clone(), Arc::new(udp)));
        data.spawn(serve_tcp(proxy.clone(), tcp));
        bound.push(address);
    }
    Ok(bound)
}

fn no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == nix::libc::EAFNOSUPPORT || code == nix::libc::EADDRNOTAVAIL)
}

async fn serve_udp(proxy: Arc<DnsProxy>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier answers surface here on some kernels: not fatal.
                tracing::debug!(error = %e, "dns: udp receive failed");
                continue;
            }
        };
        let Ok(permit) = proxy.in_flight.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "dns: too many queries in flight; dropped (the client retries)");
            continue;
        };
        let (proxy, socket, message) = (proxy.clone(), socket.clone(), buf[..n].to_vec());
        tokio::spawn(async move {
            if let Some((mut answer, limit)) = proxy.respond(&message, false).await {
                if answer.len() > limit {
                    // Too big for the client's UDP: the question with TC set, and it asks over TCP.
                    if let Ok(q) = Query::parse(&message) {
                        answer = q.truncated();
                    }
                }
                if let Err(e) = socket.send_to(&answer, peer).await {
                    tracing::debug!(%peer, error = %e, "dns: udp answer not sent");
                }
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(proxy: Arc<DnsProxy>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve_tcp_connection(proxy.clone(), stream, peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, "dns: tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Queries on one TCP connection, answered in order, until the client closes or goes idle.
async fn serve_tcp_connection(proxy: Arc<DnsProxy>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    loop {
        let message = match tokio::time::timeout(TCP_IDLE, upstream::read_framed(&mut stream)).await {
            Ok(Ok(m)) => m,
            _ => return,
        };
        let Some((answer, _)) = proxy.respond(&message, true).await else { return };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        framed.extend_from_slice(&answer);
        if let Err(e) = stream.write_all(&framed).await {
            tracing::debug!(%peer, error = %e, "dns: tcp answer not sent");
            return;
        }
    }
}
