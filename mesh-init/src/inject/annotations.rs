//! The `mesh-init.io/` annotations a workload carries to change its own injection.
//!
//! The traffic annotations mirror Istio's `traffic.sidecar.istio.io/*` names so that a reader who
//! knows those knows these. Each one stands for exactly one capture flag and replaces that flag's
//! value for its workload; the result is checked by [`CaptureArgs::validate`], the same check
//! `mesh-init iptables` and `mesh-init ebpf` run, so an init container is never given arguments
//! it would refuse. An unknown name under the prefix is an error rather than a silent no-op: a
//! misspelt exclude would otherwise capture traffic the operator meant to leave alone.

use std::collections::BTreeMap;

use serde_yaml::Value;

use crate::capture::CaptureArgs;

/// Every annotation the injector reads or writes starts with this.
pub const PREFIX: &str = "mesh-init.io/";
/// `"false"` leaves the workload as it is; `"true"` (or absent) injects.
pub const INJECT: &str = "mesh-init.io/inject";
/// Written by the injector: what it added, so that a second run can replace exactly that.
pub const STATUS: &str = "mesh-init.io/status";
/// `iptables` or `ebpf`: overrides `--mode`.
pub const MODE: &str = "mesh-init.io/mode";
/// The ConfigMap holding the sidecar's config.yaml: overrides `--config-map` and the default
/// `<workload>-mesh-proxy`.
pub const CONFIG_MAP: &str = "mesh-init.io/configMap";

/// Traffic annotations, the capture flag each one replaces, and how it is set.
type Setter = fn(&mut CaptureArgs, String);
pub const CAPTURE: &[(&str, &str, Setter)] = &[
    ("mesh-init.io/proxyPort", "--envoy-port", |a, v| a.envoy_port = v),
    ("mesh-init.io/inboundCapturePort", "--inbound-capture-port", |a, v| a.inbound_capture_port = Some(v)),
    ("mesh-init.io/includeOutboundIPRanges", "--istio-service-cidr", |a, v| a.service_cidr = v),
    ("mesh-init.io/excludeOutboundIPRanges", "--istio-service-exclude-cidr", |a, v| a.service_exclude_cidr = v),
    ("mesh-init.io/includeOutboundPorts", "--istio-outbound-ports", |a, v| a.outbound_ports = v),
    ("mesh-init.io/excludeOutboundPorts", "--istio-local-outbound-ports-exclude", |a, v| a.outbound_ports_exclude = v),
    ("mesh-init.io/includeInboundPorts", "--istio-inbound-ports", |a, v| a.inbound_ports = v),
    ("mesh-init.io/excludeInboundPorts", "--istio-local-exclude-ports", |a, v| a.inbound_ports_exclude = v),
    ("mesh-init.io/excludeInterfaces", "--istio-exclude-interfaces", |a, v| a.exclude_interfaces = v),
    ("mesh-init.io/interceptionMode", "--istio-inbound-interception-mode", |a, v| a.inbound_interception_mode = v),
];

/// An annotation that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAnnotation {
    pub name: String,
    pub reason: String,
}

/// The workload's `mesh-init.io/` annotations: the workload's own, overridden by its pod
/// template's (for a Pod the two are the same map).
#[derive(Debug, Default)]
pub struct Annotations(BTreeMap<String, String>);

impl Annotations {
    pub fn read(maps: &[Option<&Value>]) -> Result<Self, BadAnnotation> {
        let mut out = BTreeMap::new();
        for map in maps.iter().flatten() {
            let Some(map) = map.as_mapping() else { continue };
            for (k, v) in map {
                let Some(name) = k.as_str().filter(|k| k.starts_with(PREFIX)) else { continue };
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => {
                        return Err(BadAnnotation {
                            name: name.into(),
                            reason: format!(
                                "annotation values are strings; quote it ({name}: \"{}\")",
                                serde_yaml::to_string(other).unwrap_or_default().trim()
                            ),
                        })
                    }
                };
                let known =
                    [INJECT, STATUS, MODE, CONFIG_MAP].contains(&name) || CAPTURE.iter().any(|(a, ..)| *a == name);
                if !known {
                    let mut names: Vec<&str> = vec![INJECT, MODE, CONFIG_MAP];
                    names.extend(CAPTURE.iter().map(|(a, ..)| *a));
                    return Err(BadAnnotation {
                        name: name.into(),
                        reason: format!("unknown annotation; mesh-init reads {}", names.join(", ")),
                    });
                }
                out.insert(name.to_string(), value);
            }
        }
        Ok(Self(out))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// False when the workload opted out.
    pub fn wants_injection(&self) -> Result<bool, BadAnnotation> {
        match self.get(INJECT).map(str::trim) {
            None | Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => {
                Err(BadAnnotation { name: INJECT.into(), reason: format!("{v:?}: expected \"true\" or \"false\"") })
            }
        }
    }

    /// `base` with every traffic annotation applied, and for each flag replaced, the annotation
    /// that replaced it (to name it when validation refuses the value).
    pub fn apply_capture(&self, base: &CaptureArgs) -> (CaptureArgs, BTreeMap<&'static str, &'static str>) {
        let mut args = base.clone();
        let mut from = BTreeMap::new();
        for (annotation, flag, set) in CAPTURE {
            if let Some(value) = self.get(annotation) {
                set(&mut args, value.to_string());
                from.insert(*flag, *annotation);
            }
        }
        (args, from)
    }
}
