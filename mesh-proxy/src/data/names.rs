//! The names the config gives virtual addresses (its `hosts` section), as the DNS proxy looks them
//! up: built once per snapshot, a query is a few hash lookups.
//!
//! A query is answered for a configured name when it is that name, or that name with one of the
//! pod's search domains taken off: with resolv.conf's `search default.svc.cluster.local
//! svc.cluster.local cluster.local`, the entry `reviews.default.svc.cluster.local` answers
//! `reviews`, `reviews.default`, `reviews.default.svc` and itself — the forms Istio's agent
//! answers, derived from the pod's own search list rather than from Kubernetes' naming.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::config::HostEntry;

#[derive(Debug, Default)]
pub struct NameTable {
    /// Lower-case names without a trailing dot.
    names: HashMap<Box<str>, Arc<[IpAddr]>>,
}

impl NameTable {
    pub fn new(hosts: &[HostEntry]) -> Self {
        let names = hosts.iter().map(|h| (h.name.as_str().into(), h.addresses.as_slice().into())).collect();
        NameTable { names }
    }

    /// The addresses of `qname` (lower case, no trailing dot), directly or through one of the
    /// `search` domains.
    pub fn lookup(&self, qname: &str, search: &[String]) -> Option<&[IpAddr]> {
        if let Some(a) = self.names.get(qname) {
            return Some(a);
        }
        search.iter().find_map(|domain| self.names.get(format!("{qname}.{domain}").as_str())).map(|a| &a[..])
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_their_search_domain_forms() {
        let hosts = [HostEntry {
            name: "reviews.default.svc.cluster.local".into(),
            addresses: vec!["10.96.0.20".parse().unwrap(), "fd00::20".parse().unwrap()],
        }];
        let t = NameTable::new(&hosts);
        let search: Vec<String> =
            ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"].map(String::from).into();
        for q in ["reviews", "reviews.default", "reviews.default.svc", "reviews.default.svc.cluster.local"] {
            assert_eq!(t.lookup(q, &search).map(|a| a.len()), Some(2), "{q}");
        }
        assert!(t.lookup("reviews", &[]).is_none(), "without a search list only the full name");
        assert!(t.lookup("ratings", &search).is_none());
        assert!(t.lookup("reviews.other", &search).is_none());
    }
}
