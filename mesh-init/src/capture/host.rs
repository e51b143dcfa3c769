//! What validation needs from the machine: user and group names, the environment variables
//! istio-iptables reads besides its flags, and the pod's resolvers. Behind a trait so that tests
//! (Istio's own cases name a group `java`) can give their own answers.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

/// The machine as validation sees it.
pub trait Host {
    /// The UID of a user name (`/etc/passwd` or NSS), as iptables' `--uid-owner NAME` would.
    fn user_id(&self, name: &str) -> Option<u32>;
    /// The GID of a group name, as iptables' `--gid-owner NAME` would.
    fn group_id(&self, name: &str) -> Option<u32>;
    /// An environment variable that is not bound to a flag (`ENVOY_USER`, `ISTIO_META_DNS_CAPTURE`, ...).
    fn env(&self, name: &str) -> Option<String>;
    /// The resolver configuration DNS capture is limited to, and where it was read.
    fn resolv_conf(&self) -> (PathBuf, io::Result<String>);
}

/// The real machine. `resolv_conf` is the file glibc in the pod reads: `/etc/resolv.conf`, or
/// `/etc/netns/NAME/resolv.conf` for a named namespace that has one (what `ip netns exec NAME`
/// bind-mounts over it), unless `--resolv-conf` says otherwise.
#[derive(Debug, Clone)]
pub struct System {
    pub resolv_conf: PathBuf,
}

impl System {
    pub fn new(resolv_conf: Option<&Path>, netns: Option<&str>) -> System {
        let per_netns = netns
            .filter(|n| !n.contains('/'))
            .map(|n| Path::new("/etc/netns").join(n).join("resolv.conf"))
            .filter(|p| p.is_file());
        let resolv_conf = resolv_conf.map(Path::to_path_buf).or(per_netns).unwrap_or_else(|| "/etc/resolv.conf".into());
        System { resolv_conf }
    }
}

impl Host for System {
    fn user_id(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
    }
    fn group_id(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name).ok().flatten().map(|g| g.gid.as_raw())
    }
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn resolv_conf(&self) -> (PathBuf, io::Result<String>) {
        (self.resolv_conf.clone(), std::fs::read_to_string(&self.resolv_conf))
    }
}

/// The `nameserver` addresses of a resolv.conf, in order (a zone suffix such as `%eth0` dropped);
/// lines that are not an address are skipped, as glibc does.
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_in_order_without_zones() {
        let conf = "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n\
                    nameserver bogus\noptions ndots:5\nnameserver ::127.0.0.53\n";
        let got: Vec<String> = nameservers(conf).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.96.0.10", "fe80::1", "::7f00:35"]);
    }
}
