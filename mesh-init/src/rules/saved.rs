//! Reading rules back from `iptables-save` output: the parser of the grammar [`render`] writes,
//! in the normal form iptables-save prints it (`-m tcp --dport`, `--set-xmark 0x53a/0xffffffff`,
//! `--on-ip 0.0.0.0`, hexadecimal marks). `mesh-init trace --live` follows these.
//!
//! [`render`]: super::render

use super::{Chain, CtState, Family, Match, Owner, Plan, PortRanges, Protocol, Rule, Table, Target};

/// The rules of our chains and of the kernel's PREROUTING and OUTPUT in raw, mangle and nat, as a
/// plan; and the rules there that are not mesh-init's vocabulary (a foreign chain, an unknown
/// match), which are listed rather than guessed at.
pub fn parse_saved(family: Family, saved: &str) -> (Plan, Vec<String>) {
    let mut plan = Plan { family, tables: Default::default(), tproxy_route: None };
    let mut unknown = Vec::new();
    let mut table = None;
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Table::ALL.into_iter().find(|t| t.name() == name);
            continue;
        }
        let Some(t) = table else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(Chain::Owned(o)) = decl.split_whitespace().next().and_then(Chain::from_name) {
                plan.table_mut(t).chains.insert(o);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let Some(chain) = rule.split_whitespace().next().and_then(Chain::from_name) else { continue };
            match parse_rule(chain, rule) {
                Some(r) => plan.table_mut(t).rules.push(r),
                None => unknown.push(format!("{} -A {rule}", t.name())),
            }
        }
    }
    (plan, unknown)
}

/// Splits a saved rule into words, keeping a quoted comment as one.
fn words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn parse_rule(chain: Chain, rule: &str) -> Option<Rule> {
    let words = words(rule);
    let mut it = words.iter().skip(1).map(String::as_str).peekable();
    let mut matches = Vec::new();
    let mut negate = false;
    let mut module = "";
    let mut target = None;
    while let Some(w) = it.next() {
        if w == "!" {
            negate = true;
            continue;
        }
        let mut value = || it.next();
        let m = match w {
            "-p" => Some(Match::Protocol(protocol(value()?)?)).filter(|_| !negate),
            "-i" => Some(Match::InInterface(value()?.to_string())).filter(|_| !negate),
            "-o" => Some(Match::OutInterface(value()?.to_string())).filter(|_| !negate),
            "-s" => Some(Match::Source(value()?.parse().ok()?)).filter(|_| !negate),
            "-d" => Some(Match::Destination { net: value()?.parse().ok()?, negate }),
            "-m" => {
                module = value()?;
                None
            }
            "--dport" | "--dports" => Some(Match::DestinationPorts { ports: ports(value()?)?, negate }),
            "--sport" => Some(Match::SourcePort(value()?.parse().ok()?)).filter(|_| !negate),
            "--uid-owner" => Some(Match::Owner { owner: Owner::Uid(value()?.parse().ok()?), negate }),
            "--gid-owner" => Some(Match::Owner { owner: Owner::Gid(value()?.parse().ok()?), negate }),
            "--ctstate" => {
                let mut states: Vec<CtState> = value()?.split(',').map(ct_state).collect::<Option<_>>()?;
                states.sort();
                Some(Match::Conntrack(states)).filter(|_| !negate)
            }
            "--mark" => {
                let mark = masked(value()?)?;
                match module {
                    "mark" => Some(Match::Mark { mark, negate }),
                    "connmark" if !negate => Some(Match::ConnMark(mark)),
                    _ => return None,
                }
            }
            "--comment" => {
                value()?;
                None
            }
            "-j" => {
                let rest: Vec<&str> = it.by_ref().collect();
                target = Some(parse_target(rest.first()?, &rest[1..])?);
                None
            }
            _ => return None,
        };
        if negate && m.is_none() && w != "-m" {
            return None;
        }
        matches.extend(m);
        negate = false;
    }
    Some(Rule { chain, matches, target: target? })
}

fn parse_target(name: &str, opts: &[&str]) -> Option<Target> {
    let opt = |key: &str| opts.iter().position(|o| *o == key).and_then(|i| opts.get(i + 1)).copied();
    Some(match name {
        "RETURN" => Target::Return,
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "REDIRECT" => Target::Redirect { port: opt("--to-ports")?.parse().ok()? },
        "TPROXY" => Target::Tproxy { port: opt("--on-port")?.parse().ok()?, mark: masked(opt("--tproxy-mark")?)? },
        "MARK" => Target::Mark(masked(opt("--set-xmark").or_else(|| opt("--set-mark"))?)?),
        "CONNMARK" if opts.contains(&"--save-mark") => Target::SaveMark,
        "CONNMARK" if opts.contains(&"--restore-mark") => Target::RestoreMark,
        "CT" => Target::ConntrackZone(opt("--zone")?.parse().ok()?),
        other => match Chain::from_name(other)? {
            Chain::Owned(o) => Target::Jump(o),
            _ => return None,
        },
    })
}

fn protocol(s: &str) -> Option<Protocol> {
    match s {
        "tcp" | "6" => Some(Protocol::Tcp),
        "udp" | "17" => Some(Protocol::Udp),
        _ => None,
    }
}

fn ct_state(s: &str) -> Option<CtState> {
    match s {
        "NEW" => Some(CtState::New),
        "ESTABLISHED" => Some(CtState::Established),
        "RELATED" => Some(CtState::Related),
        "INVALID" => Some(CtState::Invalid),
        _ => None,
    }
}

/// `0x539`, `1337`, or either with a full `/0xffffffff` mask (another mask is not a plain mark).
fn masked(s: &str) -> Option<u32> {
    let (value, mask) = s.split_once('/').unwrap_or((s, "0xffffffff"));
    let num = |t: &str| match t.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    };
    (num(mask)? == u32::MAX).then_some(num(value)?)
}

/// `53`, `53,15008`, `30:40`.
fn ports(s: &str) -> Option<PortRanges> {
    s.split(',')
        .map(|p| match p.split_once(':') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => p.parse().ok().map(|x| (x, x)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rules as iptables-nft-save prints what mesh-init wrote.
    const SAVED: &str = "\
# Generated by iptables-nft-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_TPROXY - [0:0]
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff
-A ISTIO_PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A OUTPUT -p tcp -m tcp --dport 9 -j FOREIGN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -m comment --comment \"a note\" -m owner ! --gid-owner 5 -j RETURN
COMMIT
";

    #[test]
    fn reads_what_iptables_save_prints() {
        let (plan, unknown) = parse_saved(Family::V4, SAVED);
        let mangle = &plan.table(Table::Mangle).rules;
        assert_eq!(mangle[0].target, Target::Tproxy { port: 15006, mark: 1337 });
        assert_eq!(mangle[1].target, Target::Mark(1338));
        assert_eq!(mangle[2].matches[1], Match::Mark { mark: 1337, negate: false });
        assert_eq!(mangle[2].target, Target::SaveMark);
        let nat = &plan.table(Table::Nat).rules;
        assert_eq!(nat.len(), 3);
        assert_eq!(nat[1].matches[3], Match::DestinationPorts { ports: vec![(53, 53), (15008, 15008)], negate: true });
        assert_eq!(nat[2].matches, vec![Match::Owner { owner: Owner::Gid(5), negate: true }]);
        assert_eq!(unknown, vec!["nat -A OUTPUT -p tcp -m tcp --dport 9 -j FOREIGN"]);
    }
}
