//! The value grammars of the capture flags: ports, IDs, CIDRs, interface names, booleans. One
//! parser each; every error names the flag and the value.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;

use super::{host::Host, InvalidFlag};

/// The non-empty items of a comma list (istio-iptables skips empty items too: `6000,7000,`).
pub fn items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

pub fn port(flag: &'static str, s: &str) -> Result<u16, InvalidFlag> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(InvalidFlag::new(flag, s, "expected a port from 1 to 65535")),
    }
}

/// A comma list of ports; `a:b` or `a-b` ranges are accepted and expanded.
pub fn ports(flag: &'static str, list: &str) -> Result<BTreeSet<u16>, InvalidFlag> {
    let mut out = BTreeSet::new();
    for item in items(list) {
        if let Some((a, b)) = item.split_once([':', '-']) {
            let (a, b) = (port(flag, a)?, port(flag, b)?);
            if a > b {
                return Err(InvalidFlag::new(flag, item, "a port range must go from low to high"));
            }
            out.extend(a..=b);
        } else {
            out.insert(port(flag, item).map_err(|e| InvalidFlag { value: item.into(), ..e })?);
        }
    }
    Ok(out)
}

/// Whether IDs name users (`--uid-owner`) or groups (`--gid-owner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    User,
    Group,
}

/// A comma list of numeric IDs or names, resolved the way iptables resolves `--uid-owner NAME`.
pub fn ids(flag: &'static str, list: &str, kind: IdKind, host: &dyn Host) -> Result<Vec<u32>, InvalidFlag> {
    let mut out = Vec::new();
    for item in items(list) {
        let id = match item.parse::<u32>() {
            Ok(u32::MAX) => return Err(InvalidFlag::new(flag, item, "4294967295 is not a valid ID")),
            Ok(id) => id,
            Err(_) => {
                let found = match kind {
                    IdKind::User => host.user_id(item),
                    IdKind::Group => host.group_id(item),
                };
                let what = if kind == IdKind::User { "user" } else { "group" };
                found.ok_or_else(|| {
                    InvalidFlag::new(
                        flag,
                        item,
                        format!("expected a numeric ID or the name of a {what} of this system"),
                    )
                })?
            }
        };
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// A comma list of CIDRs (a bare address means one host), normalised to their network address,
/// and whether any was written with a loopback address (`127.1.2.3/32`), which istio-iptables
/// takes as "the loopback range is captured on purpose".
pub fn cidrs(flag: &'static str, list: &str) -> Result<(Vec<IpNet>, bool), InvalidFlag> {
    let mut out: Vec<IpNet> = Vec::new();
    let mut loopback = false;
    for item in items(list) {
        let net = match item.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match item.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(InvalidFlag::new(
                        flag,
                        item,
                        "expected an IPv4 or IPv6 CIDR such as 10.96.0.0/12 or fd00::/8",
                    ))
                }
            },
        };
        loopback |= net.addr().is_loopback();
        let net = net.trunc();
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok((out, loopback))
}

/// Interface names as the kernel accepts them (IFNAMSIZ, no '/', no whitespace).
pub fn interfaces(flag: &'static str, list: &str) -> Result<Vec<String>, InvalidFlag> {
    let mut out = Vec::new();
    for item in items(list) {
        let bad = item.len() > 15
            || item == "."
            || item == ".."
            || item.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if bad {
            return Err(InvalidFlag::new(
                flag,
                item,
                "expected an interface name of 1-15 characters without '/', ':' or spaces",
            ));
        }
        if !out.iter().any(|i| i == item) {
            out.push(item.to_string());
        }
    }
    Ok(out)
}

/// A 32-bit number, decimal or `0x` hexadecimal (a firewall mark, a routing table).
pub fn number(flag: &'static str, s: &str) -> Result<u32, InvalidFlag> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    match parsed {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(InvalidFlag::new(flag, s, "expected a number from 1 to 4294967295 (decimal or 0x hexadecimal)")),
    }
}

/// A boolean as Go's `strconv.ParseBool` reads it, which is how istio-iptables reads its
/// environment (`REDIRECT_DNS=1`, `ISTIO_META_DNS_CAPTURE=True`).
pub fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("expected true or false (or 1, 0, t, f), got {s:?}")),
    }
}
