//! VirtualServices → route rules. Every field of a VirtualService's `http` and `tcp` routes is
//! translated or reported here, each in one function.
//!
//! What cannot be carried is never approximated in a way that widens a rule: a match block with
//! a condition the proxy cannot test (a regex, a method, source labels) is left out, so the
//! requests it would have matched fall through to the next rule, and it is reported. Actions the
//! proxy lacks (mirroring, rewrites...) are reported and the rule keeps routing.
//!
//! Istio's default retry policy (applied when a route has no `retries`) is NOT emitted: it would
//! put the same `retries` on every rule of every scope for a behaviour only failures exercise;
//! routes without `retries` are served without retries (see notes/pilot.md, session 2).

use mesh_proxy::config::{Percent, RawAbort, RawDelay, RawFault, RawMatch, RawRetries, RawRule, RawWeightedCluster};

use super::{
    applies_to_sidecars, default_rule, proxy_protocol, resolve_host, ClusterOut, RouteOut, ServiceOut, Translator,
};
use crate::{
    analysis::{Code, Findings},
    istio::{Destination, HttpMatch, HttpRoute, StringMatch, TcpRoute, VirtualService},
    model::{Port, Protocol, Service},
    resource::{Body, Meta, Object},
};

/// The routes of every port of `svc`, from `vs` or Istio's default route.
pub(super) fn service_routes(t: &Translator, svc: &Service, vs: Option<&Object>, f: &mut Findings) -> ServiceOut {
    let mut out = ServiceOut::default();
    let spec = vs.and_then(|v| match &v.body {
        Body::VirtualService(s) => Some((&v.meta, &**s)),
        _ => None,
    });
    for port in &svc.ports {
        if port.protocol == Protocol::Udp {
            continue;
        }
        let mut rules = Vec::new();
        if let Some((meta, spec)) = spec {
            rules = match port.protocol {
                Protocol::Tcp => tcp_rules(t, meta, spec, svc, port, f, &mut out.referenced),
                Protocol::Http | Protocol::Http2 | Protocol::Unknown => {
                    let mut r = http_rules(t, meta, spec, svc, port, f, &mut out.referenced);
                    if r.is_empty() && port.protocol == Protocol::Unknown {
                        r = tcp_rules(t, meta, spec, svc, port, f, &mut out.referenced);
                    }
                    if port.protocol == Protocol::Http2 && r.iter().any(|r| !r.matcher.is_empty()) {
                        let msg = format!(
                            "port {} of {} is HTTP/2 or gRPC, which mesh-proxy routes per connection as TCP: only the first rule without a match applies",
                            port.number, svc.hostname
                        );
                        f.add(Code::NotCarriedByProxy, meta, "spec.http", msg);
                    }
                    r
                }
                Protocol::Udp => unreachable!("skipped above"),
            };
        }
        if rules.is_empty() {
            rules.push(default_rule(svc, port.number));
        }
        out.routes.push(RouteOut { port: port.number, protocol: proxy_protocol(port.protocol), rules });
    }
    out
}

fn http_rules(
    t: &Translator,
    meta: &Meta,
    spec: &VirtualService,
    svc: &Service,
    port: &Port,
    f: &mut Findings,
    refs: &mut Vec<ClusterOut>,
) -> Vec<RawRule> {
    let mut rules = Vec::new();
    for (i, hr) in spec.http.iter().enumerate() {
        let path = format!("spec.http[{i}]");
        f.not_carried(meta, &path, &hr.other);
        if hr.route.is_empty() {
            let msg =
                "no `route`: mesh-proxy has no redirect, direct response or delegation yet; this rule is left out";
            f.add(Code::NotCarriedByProxy, meta, &path, msg);
            continue;
        }
        let Some(matches) = http_matches(meta, &path, hr, port.number, f) else { continue };
        let clusters =
            weighted(t, meta, &path, hr.route.iter().map(|d| (&d.destination, d.weight, &d.other)), svc, port, f, refs);
        let timeout = timeout(meta, &path, hr, f);
        let retries = hr.retries.as_ref().map(|r| retries(meta, &format!("{path}.retries"), r, f));
        let fault = hr.fault.as_ref().and_then(|x| fault(meta, &format!("{path}.fault"), x, f));
        for matcher in matches {
            rules.push(RawRule {
                matcher: matcher.into_iter().collect(),
                clusters: clusters.clone(),
                timeout: timeout.clone(),
                retries: retries.clone(),
                fault: fault.clone(),
                ..Default::default()
            });
        }
    }
    rules
}

/// The match blocks of a rule that apply to sidecars on `port`, translated; `None` when none does
/// (the rule does not exist for this port). `[None]` is "every request".
fn http_matches(meta: &Meta, path: &str, hr: &HttpRoute, port: u16, f: &mut Findings) -> Option<Vec<Option<RawMatch>>> {
    if hr.matches.is_empty() {
        return Some(vec![None]);
    }
    let mut out = Vec::new();
    for (j, m) in hr.matches.iter().enumerate() {
        let mpath = format!("{path}.match[{j}]");
        // Other conditions are tested first so that a block for another port or gateway is not
        // reported as untranslatable on this one.
        if !applies_to_sidecars(&m.gateways) || m.port.is_some_and(|p| p != u32::from(port)) {
            continue;
        }
        if let Some(raw) = http_match(meta, &mpath, m, f) {
            out.push(Some(raw));
        }
    }
    (!out.is_empty()).then_some(out)
}

/// One match block, or `None` when a condition cannot be carried (the block is left out).
fn http_match(meta: &Meta, path: &str, m: &HttpMatch, f: &mut Findings) -> Option<RawMatch> {
    let mut ok = true;
    for key in m.other.keys() {
        let msg = format!("match condition `{key}` is not carried by mesh-proxy: this match block is left out");
        f.add(Code::NotCarriedByProxy, meta, format!("{path}.{key}"), msg);
        ok = false;
    }
    let mut raw = RawMatch::default();
    if let Some(uri) = &m.uri {
        match string_match(meta, &format!("{path}.uri"), uri, f) {
            Some(StringKind::Exact(s)) => raw.path = Some(s),
            Some(StringKind::Prefix(s)) => raw.path_prefix = Some(s),
            None => ok = false,
        }
    }
    for (name, sm) in &m.headers {
        let hpath = format!("{path}.headers.{name}");
        if name.starts_with(':') {
            let msg = format!("pseudo-header {name:?} is not carried by mesh-proxy: this match block is left out");
            f.add(Code::NotCarriedByProxy, meta, hpath, msg);
            ok = false;
            continue;
        }
        match string_match(meta, &hpath, sm, f) {
            Some(StringKind::Exact(v)) => {
                raw.headers.insert(name.clone(), v.into());
            }
            Some(StringKind::Prefix(_)) => {
                let msg =
                    "a header prefix match is not carried by mesh-proxy (exact only): this match block is left out";
                f.add(Code::NotCarriedByProxy, meta, format!("{hpath}.prefix"), msg);
                ok = false;
            }
            None => ok = false,
        }
    }
    ok.then_some(raw)
}

enum StringKind {
    Exact(String),
    Prefix(String),
}

fn string_match(meta: &Meta, path: &str, sm: &StringMatch, f: &mut Findings) -> Option<StringKind> {
    f.not_carried(meta, path, &sm.other);
    if sm.regex.is_some() {
        let msg = "a regex match is not carried by mesh-proxy: this match block is left out";
        f.add(Code::NotCarriedByProxy, meta, format!("{path}.regex"), msg);
        return None;
    }
    match (&sm.exact, &sm.prefix) {
        (Some(e), None) => Some(StringKind::Exact(e.clone())),
        (None, Some(p)) => Some(StringKind::Prefix(p.clone())),
        _ => {
            f.add(Code::SchemaValidationError, meta, path, "exactly one of exact, prefix or regex is required");
            None
        }
    }
}

/// A rule's `timeout`, passed as written (a value the proxy refuses is its NACK; analysis says
/// so first). Istio's `0s` means "no timeout", which the proxy has not: reported.
fn timeout(meta: &Meta, path: &str, hr: &HttpRoute, f: &mut Findings) -> Option<String> {
    let t = hr.timeout.as_ref()?;
    let field = format!("{path}.timeout");
    match mesh_proxy::parse::duration(t) {
        Ok(d) if d.is_zero() => {
            let msg = "0s (no timeout) is not carried by mesh-proxy: its default route timeout (15s) applies";
            f.add(Code::NotCarriedByProxy, meta, field, msg);
            None
        }
        Ok(_) => Some(t.clone()),
        Err(e) => {
            f.add(Code::SchemaValidationError, meta, field, e);
            Some(t.clone())
        }
    }
}

/// The `retryOn` conditions this build of mesh-proxy applies (its `RetryCondition`); any other
/// would make the proxy refuse the whole config, so it is left out of the list and reported.
const RETRY_ON: [&str; 11] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "resource-exhausted",
    "unavailable",
];

/// `retries` as written; `attempts` 0 (or left out, as Istio reads it) turns retrying off, and
/// an empty `retryOn` is Istio's default list (the proxy's too).
fn retries(meta: &Meta, path: &str, r: &crate::istio::HttpRetry, f: &mut Findings) -> RawRetries {
    f.not_carried(meta, path, &r.other);
    let attempts = r.attempts.unwrap_or(0);
    let attempts = u32::try_from(attempts).unwrap_or_else(|_| {
        f.add(Code::SchemaValidationError, meta, format!("{path}.attempts"), "attempts cannot be negative");
        0
    });
    let mut retry_on = Vec::new();
    for item in r.retry_on.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        if RETRY_ON.contains(&item) || item.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)) {
            retry_on.push(item.to_string());
        } else {
            let msg = format!("retry condition {item:?} is not carried by mesh-proxy: left out of retryOn");
            f.add(Code::NotCarriedByProxy, meta, format!("{path}.retryOn"), msg);
        }
    }
    RawRetries { attempts, per_try_timeout: r.per_try_timeout.clone(), retry_on, backoff: None }
}

/// `fault`: a fixed delay and an HTTP or gRPC abort, each for a percentage of requests (100 when
/// left out, as Istio). A part the proxy cannot apply is reported and left out.
fn fault(meta: &Meta, path: &str, x: &crate::istio::HttpFault, f: &mut Findings) -> Option<RawFault> {
    f.not_carried(meta, path, &x.other);
    let percent = |p: &Option<crate::istio::Percentage>, legacy: Option<i64>| {
        p.as_ref().map(|p| Percent(p.value)).or(legacy.map(|n| Percent(n as f64)))
    };
    let delay = x.delay.as_ref().and_then(|d| {
        let dpath = format!("{path}.delay");
        f.not_carried(meta, &dpath, &d.other);
        let Some(fixed) = &d.fixed_delay else {
            f.add(Code::NotCarriedByProxy, meta, dpath, "only a fixedDelay is carried by mesh-proxy: no delay");
            return None;
        };
        Some(RawDelay { fixed_delay: fixed.clone(), percentage: percent(&d.percentage, d.percent) })
    });
    let abort = x.abort.as_ref().and_then(|a| {
        let apath = format!("{path}.abort");
        f.not_carried(meta, &apath, &a.other);
        let http_status = match a.http_status.map(u16::try_from) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(_)) => {
                f.add(Code::SchemaValidationError, meta, format!("{apath}.httpStatus"), "not an HTTP status");
                return None;
            }
        };
        if http_status.is_none() && a.grpc_status.is_none() {
            f.add(Code::NotCarriedByProxy, meta, apath, "only httpStatus or grpcStatus is carried by mesh-proxy");
            return None;
        }
        Some(RawAbort { http_status, grpc_status: a.grpc_status.clone(), percentage: percent(&a.percentage, None) })
    });
    (delay.is_some() || abort.is_some()).then_some(RawFault { delay, abort })
}

fn tcp_rules(
    t: &Translator,
    meta: &Meta,
    spec: &VirtualService,
    svc: &Service,
    port: &Port,
    f: &mut Findings,
    refs: &mut Vec<ClusterOut>,
) -> Vec<RawRule> {
    for (i, tr) in spec.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        f.not_carried(meta, &path, &tr.other);
        if !tcp_applies(meta, &path, tr, port.number, f) || tr.route.is_empty() {
            continue;
        }
        let clusters =
            weighted(t, meta, &path, tr.route.iter().map(|d| (&d.destination, d.weight, &d.other)), svc, port, f, refs);
        // The proxy picks a TCP connection's cluster by the first rule without conditions.
        return vec![RawRule { clusters, ..Default::default() }];
    }
    Vec::new()
}

/// Whether some match block of a TCP route applies to sidecars on `port`; a block with a
/// condition the proxy cannot test never does.
fn tcp_applies(meta: &Meta, path: &str, tr: &TcpRoute, port: u16, f: &mut Findings) -> bool {
    if tr.matches.is_empty() {
        return true;
    }
    let mut any = false;
    for (j, m) in tr.matches.iter().enumerate() {
        if !applies_to_sidecars(&m.gateways) || m.port.is_some_and(|p| p != u32::from(port)) {
            continue;
        }
        if m.other.is_empty() {
            any = true;
        }
        for key in m.other.keys() {
            let msg = format!("match condition `{key}` is not carried by mesh-proxy: this match block is left out");
            f.add(Code::NotCarriedByProxy, meta, format!("{path}.match[{j}].{key}"), msg);
        }
    }
    any
}

/// Destinations with their weights, as Istio reads them: one destination takes everything;
/// several share by weight, which should add up to 100 (reported otherwise; the proxy's weights
/// are relative, so the shares stay proportional); a weight of 0 gets nothing.
#[allow(clippy::too_many_arguments)]
fn weighted<'a>(
    t: &Translator,
    meta: &Meta,
    path: &str,
    dests: impl Iterator<Item = (&'a Destination, Option<i64>, &'a crate::istio::Other)>,
    svc: &Service,
    port: &Port,
    f: &mut Findings,
    refs: &mut Vec<ClusterOut>,
) -> Vec<RawWeightedCluster> {
    let dests: Vec<_> = dests.collect();
    let mut out: Vec<RawWeightedCluster> = Vec::new();
    let mut names = Vec::new();
    let mut total: i64 = 0;
    for (k, (d, weight, other)) in dests.iter().enumerate() {
        let dpath = format!("{path}.route[{k}]");
        f.not_carried(meta, &dpath, other);
        let cluster = destination(t, meta, &format!("{dpath}.destination"), d, svc, port, f);
        let name = cluster.cluster.name.clone();
        names.push(name.clone());
        refs.push(cluster);
        let w = if dests.len() == 1 { 100 } else { weight.unwrap_or(0) };
        if w < 0 {
            f.add(Code::SchemaValidationError, meta, format!("{dpath}.weight"), "a weight cannot be negative");
            continue;
        }
        total += w;
        if w > 0 {
            out.push(RawWeightedCluster { name, weight: u32::try_from(w).unwrap_or(u32::MAX), headers: None });
        }
    }
    if dests.len() > 1 && total != 100 {
        let msg = format!("total destination weight {total} != 100");
        f.add(Code::SchemaValidationError, meta, format!("{path}.route"), msg);
    }
    if out.is_empty() {
        // Every weight 0 (or left out): share equally rather than route nowhere, and say so above.
        out = names.into_iter().map(|name| RawWeightedCluster { name, weight: 1, headers: None }).collect();
    }
    out
}

/// The cluster a destination names (`outbound|port|subset|host`).
fn destination(
    t: &Translator,
    meta: &Meta,
    path: &str,
    d: &Destination,
    svc: &Service,
    port: &Port,
    f: &mut Findings,
) -> ClusterOut {
    f.not_carried(meta, path, &d.other);
    let host = resolve_host(&d.host, &meta.key.namespace, &t.opts.domain);
    let target = t.registry.services.get(&host);
    let number = match (d.port.as_ref().and_then(|p| p.number), target) {
        (Some(n), _) => u16::try_from(n).unwrap_or(port.number),
        (None, Some(s)) if s.ports.len() == 1 => s.ports[0].number,
        (None, Some(s)) if s.hostname == svc.hostname => port.number,
        (None, Some(s)) => {
            if s.port(port.number).is_none() {
                let msg = format!(
                    "{} has more than one port and none is {}: give destination.port.number",
                    s.hostname, port.number
                );
                f.add(Code::VirtualServiceDestinationPortSelectorRequired, meta, path, msg);
            }
            port.number
        }
        (None, None) => port.number,
    };
    if let Some(sel) = &d.port {
        f.not_carried(meta, &format!("{path}.port"), &sel.other);
    }
    match target {
        None => {
            f.add(
                Code::ReferencedResourceNotFound,
                meta,
                format!("{path}.host"),
                format!("Referenced host not found: {:?}", d.host),
            );
        }
        Some(s) if s.port(number).is_none() => {
            let msg = format!("{} has no port {number}", s.hostname);
            f.add(Code::ReferencedResourceNotFound, meta, format!("{path}.port.number"), msg);
        }
        Some(_) => {
            if let Some(subset) = &d.subset {
                let defined = t.subsets.get(&host).is_some_and(|s| s.contains_key(subset));
                if !defined {
                    let msg = format!("Referenced host+subset in destinationrule not found: \"{}+{subset}\"", d.host);
                    f.add(Code::ReferencedResourceNotFound, meta, format!("{path}.subset"), msg);
                }
            }
        }
    }
    t.destination_cluster(&host, number, d.subset.as_deref())
}
