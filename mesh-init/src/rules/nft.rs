//! Rendering a plan as an `nft -f` script: the same plan, the second syntax (`--native-nftables`).
//!
//! Each of our iptables tables becomes a table of our own in the plan's family (`ip` or `ip6`),
//! named as istio-iptables' native nftables mode names its (`istio-proxy-nat`, `-mangle`,
//! `-raw`), with base chains `prerouting` and `output` at the priorities of the iptables tables
//! they stand for (raw -300, mangle -150, nat -100; mangle's output is a `route` chain, so a mark
//! set there reroutes as in iptables) and our chains under istio-iptables' nft names
//! (`istio-output`, ...). Owning whole tables is what makes replacement and cleanup exact:
//! `add table` + `delete table` removes exactly what a previous run left, in the same
//! transaction as the new rules.

use std::fmt::Write;

use super::{Chain, Family, Match, Owned, Owner, Plan, Protocol, Rule, Table, Target};

impl Table {
    /// The nftables table standing for this iptables table.
    pub fn nft_name(self) -> &'static str {
        match self {
            Table::Raw => "istio-proxy-raw",
            Table::Mangle => "istio-proxy-mangle",
            Table::Nat => "istio-proxy-nat",
        }
    }

    pub fn from_nft_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.nft_name() == name)
    }

    /// The base chain declaration for `hook` (`prerouting` or `output`) in this table.
    fn base_chain(self, chain: Chain) -> String {
        let (kind, priority) = match (self, chain) {
            (Table::Raw, _) => ("filter", -300),
            (Table::Mangle, Chain::Output) => ("route", -150),
            (Table::Mangle, _) => ("filter", -150),
            (Table::Nat, _) => ("nat", -100),
        };
        format!("type {kind} hook {} priority {priority}; policy accept;", chain.nft_name())
    }
}

impl Owned {
    /// The chain's name in nftables (istio-iptables' nft names: lower case, `-`).
    pub fn nft_name(self) -> &'static str {
        match self {
            Owned::Inbound => "istio-inbound",
            Owned::InRedirect => "istio-in-redirect",
            Owned::Output => "istio-output",
            Owned::Redirect => "istio-redirect",
            Owned::Divert => "istio-divert",
            Owned::Tproxy => "istio-tproxy",
            Owned::OutputDns => "istio-output-dns",
            Owned::Drop => "istio-drop",
            Owned::Prerouting => "istio-prerouting",
        }
    }
}

impl Chain {
    pub fn nft_name(self) -> &'static str {
        match self {
            Chain::Prerouting => "prerouting",
            Chain::Output => "output",
            Chain::Owned(o) => o.nft_name(),
        }
    }

    pub fn from_nft_name(name: &str) -> Option<Chain> {
        match name {
            "prerouting" => Some(Chain::Prerouting),
            "output" => Some(Chain::Output),
            _ => Owned::ALL.into_iter().find(|o| o.nft_name() == name).map(Chain::Owned),
        }
    }
}

/// `ip` or `ip6`: the nftables family of the plan's tables.
pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The `nft -f` script that makes `plan` true where none of our tables exist: what `--dry-run
/// --native-nftables` prints and golden files hold.
pub fn render_nft(plan: &Plan) -> String {
    let fam = family_name(plan.family);
    let mut out = String::new();
    if let Some(r) = plan.tproxy_route {
        let ip = if plan.family == Family::V4 { "ip -4" } else { "ip -6" };
        writeln!(out, "# with the policy route: {ip} rule add fwmark {} lookup {}", r.mark, r.table).unwrap();
        writeln!(out, "#                        {ip} route replace local default dev lo table {}", r.table).unwrap();
    }
    for table in Table::ALL {
        let tp = plan.table(table);
        if tp.chains.is_empty() && tp.rules.is_empty() {
            continue;
        }
        writeln!(out, "table {fam} {} {{", table.nft_name()).unwrap();
        let mut chains: Vec<Chain> =
            [Chain::Prerouting, Chain::Output].into_iter().filter(|c| tp.rules.iter().any(|r| r.chain == *c)).collect();
        chains.extend(tp.chains.iter().map(|o| Chain::Owned(*o)));
        for chain in chains {
            writeln!(out, "\tchain {} {{", chain.nft_name()).unwrap();
            if !matches!(chain, Chain::Owned(_)) {
                writeln!(out, "\t\t{}", table.base_chain(chain)).unwrap();
            }
            for rule in tp.rules.iter().filter(|r| r.chain == chain) {
                writeln!(out, "\t\t{}", render_nft_rule(plan.family, rule)).unwrap();
            }
            writeln!(out, "\t}}").unwrap();
        }
        writeln!(out, "}}").unwrap();
    }
    out
}

/// The lines that remove all of our tables of `family`, whether they exist or not: `add table`
/// is a no-op for a table that exists, so the `delete` that follows cannot fail.
pub fn render_nft_removal(family: Family) -> String {
    let fam = family_name(family);
    let mut out = String::new();
    for table in Table::ALL {
        writeln!(out, "add table {fam} {}", table.nft_name()).unwrap();
        writeln!(out, "delete table {fam} {}", table.nft_name()).unwrap();
    }
    out
}

/// One rule: its statements, without the chain.
pub fn render_nft_rule(family: Family, rule: &Rule) -> String {
    let ip = family_name(family);
    let mut parts: Vec<String> = rule.matches.iter().map(|m| render_match(ip, m)).collect();
    parts.push(render_target(&rule.target));
    parts.join(" ")
}

fn ne(negate: bool) -> &'static str {
    if negate {
        "!= "
    } else {
        ""
    }
}

fn render_match(ip: &str, m: &Match) -> String {
    match m {
        Match::Protocol(Protocol::Tcp) => "meta l4proto tcp".into(),
        Match::Protocol(Protocol::Udp) => "meta l4proto udp".into(),
        Match::InInterface(i) => format!("iifname \"{i}\""),
        Match::OutInterface(i) => format!("oifname \"{i}\""),
        Match::Source(net) => format!("{ip} saddr {net}"),
        Match::Destination { net, negate } => format!("{ip} daddr {}{net}", ne(*negate)),
        Match::DestinationPorts { ports, negate } => {
            let items: Vec<String> =
                ports.iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
            match items.as_slice() {
                [one] => format!("th dport {}{one}", ne(*negate)),
                _ => format!("th dport {}{{ {} }}", ne(*negate), items.join(", ")),
            }
        }
        Match::SourcePort(p) => format!("th sport {p}"),
        Match::Owner { owner, negate } => match owner {
            Owner::Uid(u) => format!("meta skuid {}{u}", ne(*negate)),
            Owner::Gid(g) => format!("meta skgid {}{g}", ne(*negate)),
        },
        Match::Conntrack(states) => {
            let names: Vec<String> = states.iter().map(|s| s.name().to_lowercase()).collect();
            format!("ct state {}", names.join(","))
        }
        Match::Mark { mark, negate } => format!("meta mark {}{mark}", ne(*negate)),
        Match::ConnMark(mark) => format!("ct mark {mark}"),
    }
}

fn render_target(t: &Target) -> String {
    match t {
        Target::Jump(o) => format!("jump {}", o.nft_name()),
        Target::Return => "return".into(),
        Target::Accept => "accept".into(),
        Target::Drop => "drop".into(),
        Target::Redirect { port } => format!("redirect to :{port}"),
        Target::Tproxy { port, mark } => format!("tproxy to :{port} meta mark set {mark} accept"),
        Target::Mark(m) => format!("meta mark set {m}"),
        Target::SaveMark => "ct mark set meta mark".into(),
        Target::RestoreMark => "meta mark set ct mark".into(),
        Target::ConntrackZone(z) => format!("ct zone set {z}"),
    }
}

/// Reads our tables back from `nft -j list table ...` output (several documents may be
/// concatenated, one per table): the plan they amount to, and the rules that are not in
/// mesh-init's vocabulary (shown by `trace --live`, which cannot follow them).
pub fn parse_nft_json(family: Family, json: &str) -> (Plan, Vec<String>) {
    let mut plan = Plan { family, tables: Default::default(), tproxy_route: None };
    let mut unknown = Vec::new();
    let docs = serde_json::Deserializer::from_str(json).into_iter::<serde_json::Value>();
    for doc in docs.flatten() {
        let Some(items) = doc.get("nftables").and_then(|v| v.as_array()) else { continue };
        for item in items {
            if let Some(chain) = item.get("chain") {
                let table = chain["table"].as_str().and_then(Table::from_nft_name);
                let name = chain["name"].as_str().and_then(Chain::from_nft_name);
                if let (Some(table), Some(Chain::Owned(o))) = (table, name) {
                    plan.table_mut(table).chains.insert(o);
                }
            }
            let Some(rule) = item.get("rule") else { continue };
            let (Some(table), Some(chain)) = (
                rule["table"].as_str().and_then(Table::from_nft_name),
                rule["chain"].as_str().and_then(Chain::from_nft_name),
            ) else {
                continue;
            };
            match parse_rule(chain, rule["expr"].as_array().map(Vec::as_slice).unwrap_or_default()) {
                Some(r) => plan.table_mut(table).rules.push(r),
                None => unknown.push(format!("{} {}: {}", table.nft_name(), chain.nft_name(), rule["expr"])),
            }
        }
    }
    (plan, unknown)
}

fn parse_rule(chain: Chain, exprs: &[serde_json::Value]) -> Option<Rule> {
    use serde_json::Value;
    let mut matches = Vec::new();
    let mut target = None;
    let mut tproxy_port = None;
    let has_proto = |ms: &Vec<Match>| ms.iter().any(|m| matches!(m, Match::Protocol(_)));
    for e in exprs {
        let (kind, body) = e.as_object()?.iter().next()?;
        match kind.as_str() {
            "counter" => {}
            "match" => {
                let negate = match body["op"].as_str()? {
                    "==" | "in" => false,
                    "!=" => true,
                    _ => return None,
                };
                let left = &body["left"];
                let right = &body["right"];
                if let Some(key) = left.pointer("/meta/key").and_then(Value::as_str) {
                    let m = match key {
                        "l4proto" => Match::Protocol(protocol(right.as_str()?)?),
                        "iifname" if !negate => Match::InInterface(right.as_str()?.to_string()),
                        "oifname" if !negate => Match::OutInterface(right.as_str()?.to_string()),
                        "skuid" => Match::Owner { owner: Owner::Uid(number(right)?), negate },
                        "skgid" => Match::Owner { owner: Owner::Gid(number(right)?), negate },
                        "mark" => Match::Mark { mark: number(right)?, negate },
                        _ => return None,
                    };
                    matches.push(m);
                } else if let Some(key) = left.pointer("/ct/key").and_then(Value::as_str) {
                    let m = match key {
                        "mark" if !negate => Match::ConnMark(number(right)?),
                        "state" if !negate => {
                            let names: Vec<&str> = match right {
                                Value::String(s) => vec![s.as_str()],
                                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                                _ => return None,
                            };
                            let mut states: Vec<super::CtState> =
                                names.into_iter().map(ct_state).collect::<Option<_>>()?;
                            states.sort();
                            Match::Conntrack(states)
                        }
                        _ => return None,
                    };
                    matches.push(m);
                } else if let Some(payload) = left.get("payload") {
                    let proto = payload["protocol"].as_str()?;
                    match (proto, payload["field"].as_str()?) {
                        ("ip" | "ip6", field) => {
                            let net = prefix(right)?;
                            matches.push(match field {
                                "saddr" if !negate => Match::Source(net),
                                "daddr" => Match::Destination { net, negate },
                                _ => return None,
                            });
                        }
                        (l4, field) => {
                            if let Some(p) = protocol(l4) {
                                if !has_proto(&matches) {
                                    matches.push(Match::Protocol(p));
                                }
                            } else if l4 != "th" {
                                return None;
                            }
                            matches.push(match field {
                                "dport" => Match::DestinationPorts { ports: ports(right)?, negate },
                                "sport" if !negate => Match::SourcePort(u16::try_from(number(right)?).ok()?),
                                _ => return None,
                            });
                        }
                    }
                } else {
                    return None;
                }
            }
            "jump" => {
                target = Some(Target::Jump(match Chain::from_nft_name(body["target"].as_str()?)? {
                    Chain::Owned(o) => o,
                    _ => return None,
                }))
            }
            "return" => target = Some(Target::Return),
            "accept" => {
                if let Some(port) = tproxy_port {
                    target = target.or(Some(Target::Tproxy { port, mark: 0 }));
                } else {
                    target = Some(Target::Accept);
                }
            }
            "drop" => target = Some(Target::Drop),
            "redirect" => target = Some(Target::Redirect { port: u16::try_from(number(&body["port"])?).ok()? }),
            "tproxy" => tproxy_port = Some(u16::try_from(number(&body["port"])?).ok()?),
            "mangle" => {
                let key = &body["key"];
                let value = &body["value"];
                let set = if key.pointer("/meta/key").and_then(Value::as_str) == Some("mark") {
                    if value.pointer("/ct/key").and_then(Value::as_str) == Some("mark") {
                        Target::RestoreMark
                    } else {
                        Target::Mark(number(value)?)
                    }
                } else if key.pointer("/ct/key").and_then(Value::as_str) == Some("mark") {
                    Target::SaveMark
                } else if key.pointer("/ct/key").and_then(Value::as_str) == Some("zone") {
                    Target::ConntrackZone(u16::try_from(number(value)?).ok()?)
                } else {
                    return None;
                };
                target = match (tproxy_port, set) {
                    (Some(port), Target::Mark(mark)) => Some(Target::Tproxy { port, mark }),
                    (_, set) => Some(set),
                };
            }
            _ => return None,
        }
    }
    Some(Rule { chain, matches, target: target? })
}

fn protocol(s: &str) -> Option<Protocol> {
    match s {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => None,
    }
}

fn ct_state(s: &str) -> Option<super::CtState> {
    use super::CtState;
    match s {
        "new" => Some(CtState::New),
        "established" => Some(CtState::Established),
        "related" => Some(CtState::Related),
        "invalid" => Some(CtState::Invalid),
        _ => None,
    }
}

fn number(v: &serde_json::Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// An address (`"127.0.0.6"`, a host) or `{"prefix": {"addr": ..., "len": ...}}`.
fn prefix(v: &serde_json::Value) -> Option<ipnet::IpNet> {
    if let Some(s) = v.as_str() {
        return s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from);
    }
    let p = v.get("prefix")?;
    let addr: std::net::IpAddr = p["addr"].as_str()?.parse().ok()?;
    ipnet::IpNet::new(addr, u8::try_from(p["len"].as_u64()?).ok()?).ok()
}

/// A port, a `{"range": [a, b]}`, or a `{"set": [...]}` of those.
fn ports(v: &serde_json::Value) -> Option<super::PortRanges> {
    let one = |v: &serde_json::Value| -> Option<(u16, u16)> {
        if let Some(r) = v.get("range").and_then(|r| r.as_array()) {
            Some((u16::try_from(number(r.first()?)?).ok()?, u16::try_from(number(r.get(1)?)?).ok()?))
        } else {
            let p = u16::try_from(number(v)?).ok()?;
            Some((p, p))
        }
    };
    match v.get("set").and_then(|s| s.as_array()) {
        Some(items) => items.iter().map(one).collect(),
        None => Some(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{CtState, Owned};

    /// Rules as `nft -j list table` shows them after nft folded `meta l4proto tcp th dport` into
    /// `tcp dport` and a /32 into a host address.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"table": {"family": "ip", "name": "istio-proxy-mangle", "handle": 1}},
      {"chain": {"family": "ip", "table": "istio-proxy-mangle", "name": "istio-tproxy", "handle": 6}},
      {"rule": {"family": "ip", "table": "istio-proxy-mangle", "chain": "istio-tproxy", "handle": 9, "expr": [
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "127.0.0.1"}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"tproxy": {"port": 15006}},
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1337}}, {"accept": null}]}},
      {"rule": {"family": "ip", "table": "istio-proxy-mangle", "chain": "istio-inbound", "handle": 10, "expr": [
        {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                   "right": {"set": [53, {"range": [15000, 15008]}]}}},
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
        {"jump": {"target": "istio-divert"}}]}},
      {"rule": {"family": "ip", "table": "istio-proxy-mangle", "chain": "istio-inbound", "handle": 11, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "cpu"}}, "right": 1}}, {"accept": null}]}}]}"#;

    #[test]
    fn reads_listed_rules_back() {
        let (plan, unknown) = parse_nft_json(Family::V4, LISTED);
        let rules = &plan.table(Table::Mangle).rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].target, Target::Tproxy { port: 15006, mark: 1337 });
        assert_eq!(rules[0].matches[0], Match::Destination { net: "127.0.0.1/32".parse().unwrap(), negate: true });
        assert_eq!(rules[1].chain, Chain::Owned(Owned::Inbound));
        assert_eq!(
            rules[1].matches,
            vec![
                Match::Protocol(Protocol::Tcp),
                Match::DestinationPorts { ports: vec![(53, 53), (15000, 15008)], negate: true },
                Match::Conntrack(vec![CtState::Established, CtState::Related]),
            ]
        );
        assert_eq!(unknown.len(), 1, "a match mesh-init never writes is reported, not guessed: {unknown:?}");
    }
}
