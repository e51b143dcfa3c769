//! The pod's resolver configuration (`resolv.conf(5)`): the nameservers everything the config does
//! not know is forwarded to, and the search domains whose short forms of configured names the
//! proxy answers itself.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

/// glibc's defaults: a nameserver on the local host when none is listed, 5 s per try.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The proxy waits at most this long for one upstream, whatever resolv.conf says: the client
/// (glibc, 5 s by default) must get the proxy's SERVFAIL, or the next server's answer, before it
/// gives up itself.
const MAX_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    /// In order, port 53.
    pub nameservers: Vec<SocketAddr>,
    /// Lower case, no trailing dot.
    pub search: Vec<String>,
    /// How long one upstream is waited for.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {error}")]
pub struct ReadError {
    pub path: String,
    pub error: std::io::Error,
}

impl ResolvConf {
    pub fn read(path: &Path) -> Result<ResolvConf, ReadError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ReadError { path: path.display().to_string(), error })?;
        Ok(Self::parse(&text))
    }

    /// Parses as glibc does: unknown lines are ignored, the last `search`/`domain` wins, at most
    /// three nameservers, `options timeout:N`.
    pub fn parse(text: &str) -> ResolvConf {
        let mut nameservers = Vec::new();
        let mut search = Vec::new();
        let mut timeout = DEFAULT_TIMEOUT;
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // A link-local IPv6 address may carry a zone (`fe80::1%eth0`), which the
                    // proxy does not resolve: such a server is skipped.
                    if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        if nameservers.len() < 3 {
                            nameservers.push(SocketAddr::new(ip, 53));
                        }
                    }
                }
                Some("search") | Some("domain") => {
                    search =
                        words.map(|d| d.trim_end_matches('.').to_ascii_lowercase()).filter(|d| !d.is_empty()).collect();
                }
                Some("options") => {
                    for o in words {
                        if let Some(n) = o.strip_prefix("timeout:").and_then(|n| n.parse::<u64>().ok()) {
                            timeout = Duration::from_secs(n.max(1));
                        }
                    }
                }
                _ => {}
            }
        }
        if nameservers.is_empty() {
            nameservers.push(SocketAddr::from(([127, 0, 0, 1], 53)));
        }
        ResolvConf { nameservers, search, timeout: timeout.min(MAX_TIMEOUT) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubernetes_pods_resolv_conf() {
        let r = ResolvConf::parse(
            "# written by the kubelet\nsearch default.svc.cluster.local svc.cluster.local Cluster.Local.\n\
             nameserver 10.96.0.10\nnameserver fd00::a ; second\noptions ndots:5 timeout:1\n",
        );
        assert_eq!(r.nameservers, ["10.96.0.10:53".parse().unwrap(), "[fd00::a]:53".parse().unwrap()]);
        assert_eq!(r.search, ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]);
        assert_eq!(r.timeout, Duration::from_secs(1));
        let empty = ResolvConf::parse("");
        assert_eq!(empty.nameservers, ["127.0.0.1:53".parse().unwrap()]);
        assert_eq!(empty.timeout, MAX_TIMEOUT);
    }
}
