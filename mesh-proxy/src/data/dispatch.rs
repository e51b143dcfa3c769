//! Deciding what to do with an accepted connection, as plain data ([`Plan`]); [`connection`] does it.
//!
//! [`connection`]: crate::data::connection
//!
//! The order: the proxy's own address (a connection that was not redirected) can only be routed,
//! never passed through, or the proxy would connect to itself; a redirected connection to a local
//! address is inbound; anything else is outbound: a route claiming the original destination, or,
//! when HTTP host routes exist for the port, detection; otherwise `outbound_policy`.

use std::net::SocketAddr;

use crate::{
    config::{OutboundPolicy, Protocol},
    data::{inbound::LocalAddrs, orig_dst::OriginalDst, snapshot::Snapshot},
};

/// What to do with traffic no route claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Forward to the original destination (Istio's PassthroughCluster).
    Passthrough(SocketAddr),
    /// Close the connection, or answer an HTTP request with an error, for this reason.
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not redirected: addressed to one of the proxy's own listeners, and no route claims it.
    OwnListener,
    /// `outbound_policy: registry_only` and no route claims it.
    RegistryOnly,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::OwnListener => "addressed to the proxy's own listener and no route claims it",
            Refusal::RegistryOnly => "no route claims it and outbound_policy is registry_only",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Redirected to a local address: to the local application, from 127.0.0.6.
    Inbound(SocketAddr),
    /// A route (index in the snapshot's route table) claims the original destination; HTTP
    /// requests whose authority names no route get `fallback`.
    Route {
        route: usize,
        protocol: Protocol,
        fallback: Fallback,
    },
    /// No route claims the address but HTTP host routes exist for its port: detect, and route per
    /// request if it is HTTP; `fallback` for the rest.
    Detect {
        fallback: Fallback,
    },
    Unrouted(Fallback),
}

/// Whether `addr` is one the proxy itself listens on.
fn is_own(snapshot: &Snapshot, addr: SocketAddr, local: &LocalAddrs) -> bool {
    snapshot.own_addrs.iter().any(|l| {
        l.port() == addr.port() && (l.ip() == addr.ip() || (l.ip().is_unspecified() && local.contains(addr.ip())))
    })
}

pub fn plan(snapshot: &Snapshot, dst: OriginalDst, local: &LocalAddrs) -> Plan {
    let addr = dst.addr;
    // Without SO_ORIGINAL_DST the local address is the destination: either one of our
    // listeners (dialled directly), or an address the connection was steered to without NAT
    // (the eBPF mode's sk_lookup), which is handled like a redirected one.
    let own = is_own(snapshot, addr, local);
    if !own && local.contains(addr.ip()) {
        return Plan::Inbound(addr);
    }
    let fallback = if own {
        Fallback::Refuse(Refusal::OwnListener)
    } else {
        match snapshot.routing.outbound_policy {
            OutboundPolicy::AllowAny => Fallback::Passthrough(addr),
            OutboundPolicy::RegistryOnly => Fallback::Refuse(Refusal::RegistryOnly),
        }
    };
    if let Some(i) = snapshot.routes.index_by_addr(addr) {
        return Plan::Route { route: i, protocol: snapshot.routes.routes[i].protocol, fallback };
    }
    // Straight to a listener, nothing can be passed through and a server-first protocol has no
    // server to wait for: any host route, even a port-less one, is worth detecting for.
    if snapshot.routes.has_host_routes_for(addr.port()) || (own && snapshot.routes.has_host_routes()) {
        return Plan::Detect { fallback };
    }
    Plan::Unrouted(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Config, RawConfig},
        data::{cluster::EndpointRegistry, snapshot::Origin},
        metrics::Metrics,
    };

    fn snapshot(yaml: &str) -> Snapshot {
        let Config { bootstrap, routing } = RawConfig::from_yaml("t", yaml).unwrap().validate().unwrap();
        let origin = Origin { source: "test".into(), version: "1".into() };
        // Bound as configured (no port 0 here).
        let own = routing.listeners.iter().map(|l| l.address).chain([bootstrap.admin]).collect();
        Snapshot::build(routing, origin, own, &EndpointRegistry::default(), &Metrics::new())
    }

    const CFG: &str = r#"
listeners: [{name: virtual, address: "0.0.0.0:15000"}, {name: lo, address: "127.0.0.1:16000"}]
clusters: [{name: c}]
routes:
  - {name: ip, destinations: ["10.96.0.20:9080", "127.0.0.1:16000"], protocol: http, rules: [{clusters: [{name: c}]}]}
  - {name: host, destinations: ["reviews:9080", "ratings"], rules: [{clusters: [{name: c}]}]}
"#;

    fn redirected(s: &str) -> OriginalDst {
        OriginalDst { addr: s.parse().unwrap(), redirected: true }
    }

    #[test]
    fn plans() {
        let s = snapshot(CFG);
        let local = LocalAddrs::from_addrs(["10.200.0.1".parse().unwrap()]);
        let p = |d| plan(&s, d, &local);
        assert_eq!(p(redirected("10.200.0.1:9080")), Plan::Inbound("10.200.0.1:9080".parse().unwrap()));
        let fallback = Fallback::Passthrough("10.96.0.20:9080".parse().unwrap());
        assert_eq!(p(redirected("10.96.0.20:9080")), Plan::Route { route: 0, protocol: Protocol::Http, fallback });
        let other = "10.96.0.99:9080".parse().unwrap();
        assert_eq!(p(redirected("10.96.0.99:9080")), Plan::Detect { fallback: Fallback::Passthrough(other) });
        // The port-less host route does not make port 80 detected (issue 13: it broke WebSocket
        // passthrough on every port).
        let other = "10.96.0.99:80".parse().unwrap();
        assert_eq!(p(redirected("10.96.0.99:80")), Plan::Unrouted(Fallback::Passthrough(other)));
        // Straight to a listener: routed when a route claims the address, never passed through.
        let direct = OriginalDst { addr: "127.0.0.1:16000".parse().unwrap(), redirected: false };
        let fallback = Fallback::Refuse(Refusal::OwnListener);
        assert_eq!(p(direct), Plan::Route { route: 0, protocol: Protocol::Http, fallback });
        let direct = OriginalDst { addr: "10.200.0.1:15000".parse().unwrap(), redirected: false };
        assert_eq!(p(direct), Plan::Detect { fallback: Fallback::Refuse(Refusal::OwnListener) });
        // Steered without NAT (no SO_ORIGINAL_DST, eBPF sk_lookup) to a local application port.
        let steered = OriginalDst { addr: "10.200.0.1:9080".parse().unwrap(), redirected: false };
        assert_eq!(p(steered), Plan::Inbound("10.200.0.1:9080".parse().unwrap()));
        // Redirected to the proxy's own port on a local address: would loop, so never passed
        // through (HTTP for a host route is still served).
        let own = Plan::Detect { fallback: Fallback::Refuse(Refusal::OwnListener) };
        assert_eq!(p(redirected("10.200.0.1:15000")), own);
        assert_eq!(p(redirected("127.0.0.1:15090")), own);
    }

    #[test]
    fn registry_only_refuses_the_unknown() {
        let s = snapshot(&format!("outbound_policy: registry_only\n{CFG}"));
        let local = LocalAddrs::default();
        assert_eq!(
            plan(&s, redirected("10.96.0.99:80"), &local),
            Plan::Unrouted(Fallback::Refuse(Refusal::RegistryOnly))
        );
    }
}
