//! Listening sockets and their accept loops, on the data-plane runtime.
//!
//! Listeners are keyed by address: an update that keeps an address keeps its socket (nothing is
//! re-bound, no connection attempt is refused), a new address is bound before anything is swapped
//! (so a bind failure rejects the whole update), and a removed one stops accepting while its
//! established connections carry on.
//!
//! A listener on `0.0.0.0:P` also listens on `[::]:P` (IPv6 only) when the namespace has IPv6, as
//! an Istio sidecar does on a dual-stack pod: mesh-init redirects IPv6 to the same port. A
//! listener on `[::]:P` is dual-stack by itself.
//!
//! A `transparent` listener's sockets have `IP_TRANSPARENT` (`IPV6_TRANSPARENT`), so that the
//! connections mesh-init's TPROXY rules deliver (addressed to the pod, not to the proxy) are
//! accepted; its connections carry the TPROXY mark to the inbound hand-off.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use socket2::{Domain, Socket, Type};
use tokio::{net::TcpListener, runtime::Handle, sync::oneshot};

use crate::{
    config,
    data::{connection, Proxy},
    drain,
    metrics::ListenerLabels,
};

/// Pending connections the kernel queues per listener.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
#[error("listener {name}: binding {address}: {error}")]
pub struct BindError {
    pub name: String,
    pub address: SocketAddr,
    pub error: io::Error,
}

/// A bound, running listener.
struct Running {
    name: String,
    /// Its TPROXY mark, if transparent: a socket cannot become (or stop being) transparent.
    transparent: Option<u32>,
    /// Where its sockets are bound (the configured address, with the kernel's port for port 0,
    /// and the IPv6 companion of `0.0.0.0`).
    bound: Vec<SocketAddr>,
    /// Dropping them stops the accept loops (one per socket).
    _stop: Vec<oneshot::Sender<()>>,
}

/// Sockets bound for an update, not yet accepting.
pub struct Prepared {
    bound: Vec<(config::Listener, Vec<std::net::TcpListener>)>,
    keep: Vec<SocketAddr>,
    /// The bound addresses of every listener the update keeps or adds.
    addresses: Vec<SocketAddr>,
}

impl Prepared {
    /// Where the listeners of the update are bound, once it is committed.
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }
}

/// What `/listeners` shows.
#[derive(Debug, Serialize)]
pub struct ListenerInfo {
    pub name: String,
    pub address: SocketAddr,
}

pub struct Listeners {
    /// Where accept loops and connections run.
    data: Handle,
    drain: Arc<drain::Trigger>,
    /// The TPROXY mark every listener takes when the command line says inbound arrives by TPROXY
    /// (`--inbound-tproxy-mark`, which `mesh-init inject` sets): the config, written for any
    /// interception mode, need not say `transparent`.
    tproxy: Option<u32>,
    running: Mutex<HashMap<SocketAddr, Running>>,
}

impl Listeners {
    pub fn new(data: Handle, drain: Arc<drain::Trigger>, tproxy: Option<u32>) -> Self {
        Self { data, drain, tproxy, running: Mutex::new(HashMap::new()) }
    }

    /// The TPROXY mark of `l`: its own, else the command line's.
    fn transparent(&self, l: &config::Listener) -> Option<u32> {
        l.transparent.or(self.tproxy)
    }

    /// Binds every listener of `wanted` that is not running yet. On error nothing changes.
    pub fn prepare(&self, wanted: &[config::Listener]) -> Result<Prepared, BindError> {
        let running = self.running.lock().expect("listeners lock poisoned");
        let mut prepared = Prepared { bound: Vec::new(), keep: Vec::new(), addresses: Vec::new() };
        for l in wanted {
            let err = |error| BindError { name: l.name.clone(), address: l.address, error };
            let transparent = self.transparent(l);
            if let Some(r) = running.get(&l.address) {
                if r.transparent != transparent {
                    let why = "transparent (or its tproxy_mark) cannot change while the address is bound; \
                               remove the listener in one update and add it back in the next, or restart";
                    return Err(err(io::Error::other(why)));
                }
                prepared.keep.push(l.address);
                prepared.addresses.extend(&r.bound);
                continue;
            }
            let mut sockets = vec![bind_with(l.address, false, transparent.is_some()).map_err(err)?];
            if l.address.ip() == std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
                let v6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), l.address.port());
                match bind_with(v6, true, transparent.is_some()) {
                    Ok(s) => sockets.push(s),
                    // No IPv6 in this namespace: the IPv4 listener is all there is.
                    Err(e) if no_ipv6(&e) => {
                        tracing::debug!(listener = %l.name, error = %e, "no IPv6 companion listener");
                    }
                    Err(e) => return Err(BindError { name: l.name.clone(), address: v6, error: e }),
                }
            }
            for s in &sockets {
                prepared.addresses.push(s.local_addr().map_err(err)?);
            }
            prepared.bound.push((l.clone(), sockets));
        }
        Ok(prepared)
    }

    /// Starts the newly bound listeners, whose connections `proxy` serves, and stops those the
    /// update dropped.
    pub fn commit(&self, prepared: Prepared, proxy: &Arc<Proxy>) {
        let mut running = self.running.lock().expect("listeners lock poisoned");
        running.retain(|addr, r| {
            let keep = prepared.keep.contains(addr);
            if !keep {
                tracing::info!(listener = %r.name, address = %addr, "listener removed: no longer accepting");
            }
            keep
        });
        for (l, sockets) in prepared.bound {
            let _guard = self.data.enter();
            let transparent = self.transparent(&l);
            let mut stops = Vec::with_capacity(sockets.len());
            let mut bound = Vec::with_capacity(sockets.len());
            for socket in sockets {
                let listener = match TcpListener::from_std(socket) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(listener = %l.name, error = %e, "cannot register the listening socket");
                        continue;
                    }
                };
                let local = listener.local_addr().unwrap_or(l.address);
                tracing::info!(listener = %l.name, address = %local, "listening");
                bound.push(local);
                let (stop_tx, stop_rx) = oneshot::channel();
                let labels = ListenerLabels { listener: l.name.clone() };
                self.data.spawn(accept_loop(
                    listener,
                    labels,
                    transparent,
                    proxy.clone(),
                    self.drain.handle(),
                    stop_rx,
                ));
                stops.push(stop_tx);
            }
            running.insert(l.address, Running { name: l.name, transparent, bound, _stop: stops });
        }
    }

    /// Stops every accept loop (the end of the drain: listeners accept until then).
    pub fn stop_all(&self) {
        self.running.lock().expect("listeners lock poisoned").clear();
    }

    /// Each socket of each running listener, with the address it is bound to.
    pub fn bound(&self) -> Vec<ListenerInfo> {
        let running = self.running.lock().expect("listeners lock poisoned");
        let mut v: Vec<_> = running
            .values()
            .flat_map(|r| r.bound.iter().map(|a| ListenerInfo { name: r.name.clone(), address: *a }))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn info(&self) -> Vec<ListenerInfo> {
        let running = self.running.lock().expect("listeners lock poisoned");
        let mut v: Vec<_> = running.iter().map(|(a, r)| ListenerInfo { name: r.name.clone(), address: *a }).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// The errors binding `[::]` gives where IPv6 is off.
pub(crate) fn no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == nix::libc::EAFNOSUPPORT || code == nix::libc::EADDRNOTAVAIL)
}

/// A non-blocking listening socket (the admin side's too).
pub(crate) fn bind(addr: SocketAddr, v6_only: bool) -> io::Result<std::net::TcpListener> {
    bind_with(addr, v6_only, false)
}

/// [`bind`], with `IP_TRANSPARENT` for a transparent listener.
fn bind_with(addr: SocketAddr, v6_only: bool, transparent: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if transparent {
        let set = if addr.is_ipv4() { socket.set_ip_transparent_v4(true) } else { socket.set_ip_transparent_v6(true) };
        set.map_err(|e| match e.raw_os_error() {
            Some(nix::libc::EPERM) => io::Error::new(
                e.kind(),
                "transparent: IP_TRANSPARENT needs CAP_NET_ADMIN (mesh-init inject grants it in TPROXY mode)",
            ),
            _ => e,
        })?;
    }
    // A restarted proxy must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    labels: ListenerLabels,
    transparent: Option<u32>,
    proxy: Arc<Proxy>,
    drain: drain::Handle,
    mut stop: oneshot::Receiver<()>,
) {
    let total = proxy.metrics.downstream_connections.get_or_create(&labels).clone();
    let active = proxy.metrics.downstream_connections_active.get_or_create(&labels).clone();
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                total.inc();
                active.inc();
                let (proxy, drain, active) = (proxy.clone(), drain.watch(), active.clone());
                tokio::spawn(async move {
                    connection::serve(proxy, stream, peer, transparent, drain).await;
                    active.dec();
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %labels.listener, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(listener = %labels.listener, "accept loop stopped");
}
