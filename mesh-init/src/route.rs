//! The policy route of the TPROXY mode: packets carrying the TPROXY mark are delivered locally
//! (`ip rule add fwmark MARK lookup TABLE` and `ip route add local default dev lo table TABLE`, as
//! istio-iptables does), so that the transparent listener receives them. Shared by both
//! netfilter backends.

use crate::{
    iptables::{command, Error},
    rules::{Family, TproxyRoute},
};

/// Makes the policy route exist exactly once when `want` is set, and not at all otherwise. Only
/// rules for `want`'s mark or the mark of the TPROXY rule installed before (`previous`) are
/// touched; the tables they pointed at are flushed when given up.
pub fn reconcile(family: Family, want: Option<TproxyRoute>, previous: Option<u32>) -> Result<(), Error> {
    let ip = |args: &[&str]| {
        let mut full = vec![if family == Family::V4 { "-4" } else { "-6" }];
        full.extend_from_slice(args);
        command("ip", &full)
    };
    let listing = ip(&["rule", "show"])?;
    let ours = |r: &TproxyRoute| Some(r.mark) == want.map(|w| w.mark) || Some(r.mark) == previous;
    let present: Vec<TproxyRoute> = listing.lines().filter_map(parse_rule).filter(ours).collect();
    let mut kept = false;
    for r in &present {
        if Some(*r) == want && !kept {
            kept = true;
            continue;
        }
        ip(&["rule", "del", "fwmark", &r.mark.to_string(), "lookup", &r.table.to_string()])?;
        if want.is_none_or(|w| w.table != r.table) {
            ip(&["route", "flush", "table", &r.table.to_string()])?;
        }
    }
    if let Some(w) = want {
        let (mark, table) = (w.mark.to_string(), w.table.to_string());
        if !kept {
            ip(&["rule", "add", "fwmark", &mark, "lookup", &table])?;
        }
        ip(&["route", "replace", "local", "default", "dev", "lo", "table", &table])?;
    }
    Ok(())
}

/// Parses an `ip rule show` line such as `32765:\tfrom all fwmark 0x539 lookup 133`.
fn parse_rule(line: &str) -> Option<TproxyRoute> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1));
    let mark = after("fwmark")?;
    let mark = match mark.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex.split('/').next()?, 16).ok()?,
        None => mark.split('/').next()?.parse().ok()?,
    };
    let table = after("lookup")?.parse().ok()?;
    Some(TproxyRoute { mark, table })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_rule_lines() {
        let r = parse_rule("32765:\tfrom all fwmark 0x539 lookup 133").unwrap();
        assert_eq!((r.mark, r.table), (1337, 133));
        assert_eq!(parse_rule("0:\tfrom all lookup local"), None);
    }
}
