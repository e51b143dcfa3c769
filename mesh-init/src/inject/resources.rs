//! CPU and memory for the injected containers: Istio's defaults and annotations, checked as the
//! API server would check them, and the pod's QoS class kept.
//!
//! Without requests a quota-bound namespace rejects the pod and a CPU autoscaler has no base;
//! without limits equal to requests a Guaranteed pod drops to Burstable. So: requests and limits
//! as Istio writes them (requests 100m/128Mi, limits 2000m/1024Mi, each replaceable by a flag or
//! `sidecar.istio.io/proxyCPU`, `proxyMemory`, `proxyCPULimit`, `proxyMemoryLimit`), and in a pod
//! whose own containers are Guaranteed, the values the user did not set are matched to the ones
//! they did (a missing limit takes the request, a missing request the limit) so the pod stays
//! Guaranteed.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_yaml::Value;

/// Istio's defaults for the sidecar (values.yaml `global.proxy.resources`).
pub const DEFAULT_CPU: &str = "100m";
pub const DEFAULT_MEMORY: &str = "128Mi";
pub const DEFAULT_CPU_LIMIT: &str = "2000m";
pub const DEFAULT_MEMORY_LIMIT: &str = "1024Mi";

/// `resources` of a container, as the API writes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Resources {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<&'static str, String>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty() && self.requests.is_empty()
    }
}

/// One of the four values, with where it came from (to blame it) and whether the user chose it.
#[derive(Debug, Clone)]
pub struct Value4 {
    pub value: String,
    pub from: String,
    pub explicit: bool,
}

/// The four values before the QoS rule; an empty value means "none".
#[derive(Debug, Clone)]
pub struct Wanted {
    pub cpu: Value4,
    pub memory: Value4,
    pub cpu_limit: Value4,
    pub memory_limit: Value4,
}

/// A value that is not a Kubernetes quantity, or a request above its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadResource {
    pub from: String,
    pub reason: String,
}

impl Wanted {
    /// The resources to write, and a note when the pod's QoS class changes or is kept by
    /// matching values. `guaranteed` says whether the application's containers alone are
    /// Guaranteed.
    pub fn resolve(mut self, guaranteed: bool) -> Result<(Resources, Option<String>), BadResource> {
        for v in [&self.cpu, &self.memory, &self.cpu_limit, &self.memory_limit] {
            if !v.value.is_empty() {
                parse_quantity(&v.value).map_err(|reason| BadResource {
                    from: v.from.clone(),
                    reason: format!("{:?}: {reason}", v.value),
                })?;
            }
        }
        let mut note = None;
        if guaranteed {
            let mut matched = vec![];
            for (request, limit) in [(&mut self.cpu, &mut self.cpu_limit), (&mut self.memory, &mut self.memory_limit)] {
                match (request.explicit, limit.explicit) {
                    (true, true) => {}
                    (true, false) => {
                        limit.value = request.value.clone();
                        matched.push(limit.from.clone());
                    }
                    _ => {
                        // Neither or only the limit given: the request decides the reservation.
                        // The smaller default (the request) keeps a Guaranteed pod schedulable.
                        if limit.explicit {
                            request.value = limit.value.clone();
                            matched.push(request.from.clone());
                        } else {
                            limit.value = request.value.clone();
                            matched.push(limit.from.clone());
                        }
                    }
                }
            }
            let equal = |a: &Value4, b: &Value4| {
                !a.value.is_empty() && parse_quantity(&a.value).ok() == parse_quantity(&b.value).ok()
            };
            note = Some(if equal(&self.cpu, &self.cpu_limit) && equal(&self.memory, &self.memory_limit) {
                format!(
                    "the application is Guaranteed; the sidecar's requests and limits are made equal to keep it so \
                     ({} matched; set them to choose)",
                    matched.join(", ")
                )
            } else {
                "the application is Guaranteed but the sidecar's requests and limits differ as annotated: the pod \
                 is Burstable"
                    .to_string()
            });
        }
        for (request, limit) in [(&self.cpu, &self.cpu_limit), (&self.memory, &self.memory_limit)] {
            if request.value.is_empty() || limit.value.is_empty() {
                continue;
            }
            if parse_quantity(&request.value).expect("checked") > parse_quantity(&limit.value).expect("checked") {
                return Err(BadResource {
                    from: request.from.clone(),
                    reason: format!(
                        "{:?} is above the limit {:?} ({}); the API server refuses a request above its limit",
                        request.value, limit.value, limit.from
                    ),
                });
            }
        }
        let mut out = Resources::default();
        for (limit, name, v) in [
            (false, "cpu", &self.cpu),
            (false, "memory", &self.memory),
            (true, "cpu", &self.cpu_limit),
            (true, "memory", &self.memory_limit),
        ] {
            if !v.value.is_empty() {
                let map = if limit { &mut out.limits } else { &mut out.requests };
                map.insert(name, v.value.trim().to_string());
            }
        }
        Ok((out, note))
    }
}

/// A Kubernetes quantity (`100m`, `1.5`, `128Mi`, `1e3`, `2G`) as a number of base units.
pub fn parse_quantity(s: &str) -> Result<f64, String> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let err = || "not a Kubernetes quantity (such as 100m, 0.5, 128Mi or 1G)".to_string();
    let s = s.trim();
    let (number, multiplier) = match SUFFIXES.iter().find(|(suffix, _)| s.ends_with(suffix)) {
        Some((suffix, m)) => (&s[..s.len() - suffix.len()], *m),
        None => match s.find(['e', 'E']) {
            Some(i) => {
                let exp: i32 = s[i + 1..].parse().map_err(|_| err())?;
                (&s[..i], 10f64.powi(exp))
            }
            None => (s, 1.0),
        },
    };
    let digits = number.strip_prefix('+').unwrap_or(number);
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1
        && digits != ".";
    if !ok {
        return Err(err());
    }
    digits.parse::<f64>().map(|n| n * multiplier).map_err(|_| err())
}

/// True when every container of the pod spec (init containers included, the injector's left
/// out by the caller) has CPU and memory limits, and requests that are absent or equal to them:
/// Kubernetes' definition of the Guaranteed QoS class.
pub fn is_guaranteed<'a>(containers: impl IntoIterator<Item = &'a Value>) -> bool {
    let mut any = false;
    for c in containers {
        any = true;
        let resources = c.get("resources");
        for name in ["cpu", "memory"] {
            let limit = resources.and_then(|r| r.get("limits")).and_then(|l| l.get(name)).and_then(quantity_of);
            let request = resources.and_then(|r| r.get("requests")).and_then(|l| l.get(name));
            let Some(limit) = limit else { return false };
            if let Some(request) = request {
                if quantity_of(request) != Some(limit) {
                    return false;
                }
            }
        }
    }
    any
}

fn quantity_of(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => parse_quantity(s).ok(),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_the_api_reads_them() {
        for (q, want) in [
            ("100m", 0.1),
            ("2", 2.0),
            ("0.5", 0.5),
            ("128Mi", 134_217_728.0),
            ("1G", 1e9),
            ("1e3", 1000.0),
            ("2000m", 2.0),
        ] {
            assert!((parse_quantity(q).unwrap() - want).abs() < 1e-9, "{q}");
        }
        for bad in ["", "abc", "1.2.3", "10 m", "-1", "Mi", "1x"] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn v(value: &str, from: &str, explicit: bool) -> Value4 {
        Value4 { value: value.into(), from: from.into(), explicit }
    }

    fn defaults() -> Wanted {
        Wanted {
            cpu: v(DEFAULT_CPU, "--proxy-cpu", false),
            memory: v(DEFAULT_MEMORY, "--proxy-memory", false),
            cpu_limit: v(DEFAULT_CPU_LIMIT, "--proxy-cpu-limit", false),
            memory_limit: v(DEFAULT_MEMORY_LIMIT, "--proxy-memory-limit", false),
        }
    }

    #[test]
    fn a_guaranteed_pod_stays_guaranteed() {
        let (r, note) = defaults().resolve(true).unwrap();
        assert_eq!(r.requests, r.limits);
        assert_eq!(r.limits["cpu"], "100m");
        assert!(note.unwrap().contains("--proxy-cpu-limit, --proxy-memory-limit matched"));
        let mut w = defaults();
        w.cpu_limit = v("500m", "sidecar.istio.io/proxyCPULimit", true);
        let (r, _) = w.resolve(true).unwrap();
        assert_eq!((r.requests["cpu"].as_str(), r.limits["cpu"].as_str()), ("500m", "500m"));
        let (r, note) = defaults().resolve(false).unwrap();
        assert_eq!((r.requests["cpu"].as_str(), r.limits["cpu"].as_str()), ("100m", "2000m"));
        assert!(note.is_none());
    }

    #[test]
    fn a_request_above_its_limit_is_refused_naming_it() {
        let mut w = defaults();
        w.memory = v("2Gi", "sidecar.istio.io/proxyMemory", true);
        let e = w.resolve(false).unwrap_err();
        assert_eq!(e.from, "sidecar.istio.io/proxyMemory");
        assert!(e.reason.contains("above the limit \"1024Mi\""), "{e:?}");
    }

    #[test]
    fn qos_is_read_as_kubernetes_defines_it() {
        let pod: Value = serde_yaml::from_str(
            "- {name: a, resources: {limits: {cpu: 1, memory: 1Gi}}}\n\
             - {name: b, resources: {limits: {cpu: 500m, memory: 64Mi}, requests: {cpu: '0.5', memory: 64Mi}}}\n",
        )
        .unwrap();
        assert!(is_guaranteed(pod.as_sequence().unwrap()));
        let pod: Value =
            serde_yaml::from_str("- {name: a, resources: {limits: {cpu: 1, memory: 1Gi}, requests: {cpu: 500m}}}\n")
                .unwrap();
        assert!(!is_guaranteed(pod.as_sequence().unwrap()));
        let pod: Value = serde_yaml::from_str("- {name: a}\n").unwrap();
        assert!(!is_guaranteed(pod.as_sequence().unwrap()));
    }
}
