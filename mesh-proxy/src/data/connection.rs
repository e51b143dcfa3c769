//! What happens to each accepted connection: its original destination read, its [`Plan`] made,
//! the first bytes looked at where the plan leaves the protocol open, then HTTP or TCP to the end.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use crate::{
    config::Protocol,
    data::{
        detect::{self, Detected},
        dispatch::{self, Fallback, Plan},
        http::{self, ConnCtx},
        inbound, orig_dst, tcp, Proxy,
    },
    drain,
};

/// What a connection that turns out not to be HTTP gets.
enum Opaque {
    /// The route (index in the connection's snapshot) picks a cluster for the whole connection.
    Route(usize),
    Unrouted(Fallback),
}

/// Handles one accepted connection to its end. `transparent` is the TPROXY mark of a connection
/// accepted by a transparent listener: an inbound one is then handed over from the client's address.
pub async fn serve(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    transparent: Option<u32>,
    drain: drain::Watch,
) {
    let dst = match orig_dst::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "connection gone before it could be read");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    // The snapshot the decision is made on; a TCP session keeps using it (its route index
    // refers to it), HTTP loads the current one per request.
    let snapshot = proxy.snapshot.load_full();
    let idle = proxy.tcp_idle_timeout;
    let (protocol, fallback, opaque) = match dispatch::plan(&snapshot, dst, &proxy.local_addrs.load()) {
        Plan::Inbound(addr) => {
            let source = match transparent {
                Some(mark) => inbound::Source::Client { mark },
                None => inbound::Source::Passthrough,
            };
            return inbound::serve(&proxy.inbound_tcp, stream, peer, addr, source, idle).await;
        }
        Plan::Route { route, protocol, fallback } => (protocol, fallback, Opaque::Route(route)),
        Plan::Detect { fallback } => (Protocol::Auto, fallback, Opaque::Unrouted(fallback)),
        Plan::Unrouted(fallback) => (Protocol::Tcp, fallback, Opaque::Unrouted(fallback)),
    };
    let is_http = match protocol {
        Protocol::Http => true,
        Protocol::Tcp => false,
        Protocol::Auto => {
            matches!(detect::detect(&stream, detect::DETECT_TIMEOUT).await, Ok(Detected::Http1 | Detected::Http2))
        }
    };
    if is_http {
        let ctx = Arc::new(ConnCtx::new(proxy.clone(), dst.addr, peer, fallback, drain));
        return http::serve(ctx, stream).await;
    }
    match opaque {
        Opaque::Route(route) => {
            // A connection made straight to a listener has itself as its destination.
            let original = (!snapshot.own_addrs.contains(&dst.addr)).then_some(&proxy.passthrough_connect_failures);
            tcp::route(&snapshot.routes.routes[route], stream, peer, dst.addr, original, idle).await
        }
        Opaque::Unrouted(Fallback::Passthrough(dst)) => {
            let counters = tcp::PassthroughCounters {
                sessions: &proxy.passthrough_tcp,
                connect_failures: &proxy.passthrough_connect_failures,
            };
            tcp::passthrough(counters, stream, peer, dst, idle).await
        }
        Opaque::Unrouted(Fallback::Refuse(why)) => {
            tcp::log_unserved("connection refused", peer, None, None, None, &why.reason());
        }
    }
}
