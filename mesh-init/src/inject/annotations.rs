//! The per-workload settings a pod carries in its annotations (and, for opting in or out, its
//! labels), under our names (`mesh-init.io/`) and under Istio's.
//!
//! Every setting has our name, and Istio's when Istio has one, so a workload written for Istio's
//! injector keeps its meaning here: `sidecar.istio.io/inject: "false"` opts out,
//! `traffic.sidecar.istio.io/excludeOutboundPorts` excludes, `sidecar.istio.io/proxyCPU` sizes the
//! sidecar. The two names of one setting must agree when both are given. An unknown name under
//! our prefix is an error (a misspelt exclude must not pass silently); an Istio name that has no
//! meaning here is reported in a note and otherwise ignored, since manifests written for Istio
//! carry many (log levels, bootstrap overrides) that are not about interception.

use std::collections::BTreeMap;

use serde_yaml::Value;

use crate::capture::CaptureArgs;

/// Every annotation the injector reads or writes under its own name starts with this.
pub const PREFIX: &str = "mesh-init.io/";
/// Written by the injector: what it added, so that a second run can replace exactly that.
pub const STATUS: &str = "mesh-init.io/status";
/// Istio's own status annotation: the pod was injected by Istio.
const ISTIO_STATUS: &str = "sidecar.istio.io/status";
/// The prefixes under which Istio's injector reads annotations.
const ISTIO_PREFIXES: &[&str] = &[
    "sidecar.istio.io/",
    "traffic.sidecar.istio.io/",
    "proxy.istio.io/",
    "status.sidecar.istio.io/",
    "readiness.status.sidecar.istio.io/",
    "prometheus.istio.io/",
];

/// A setting that is not a capture flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// `"false"` leaves the workload as it is; also read from labels (which win, as in Istio).
    Inject,
    /// `iptables`, `ebpf` or `validation`: overrides `--mode`.
    Mode,
    /// The ConfigMap holding the sidecar's config.yaml.
    ConfigMap,
    /// The sidecar's image.
    ProxyImage,
    ProxyCpu,
    ProxyMemory,
    ProxyCpuLimit,
    ProxyMemoryLimit,
    /// `"true"`/`"false"`: the sidecar as a native sidecar (an init container that keeps running).
    NativeSidecar,
    /// `"true"`: the application's containers start only once the proxy is ready.
    HoldApplication,
    /// `"false"` keeps the application's probes as they are.
    RewriteProbes,
    /// The proxy's status port (probes and merged metrics); `"0"` turns both off.
    StatusPort,
    /// `"false"` keeps the pod's own `prometheus.io/*` annotations.
    MergeMetrics,
    ReadinessInitialDelay,
    ReadinessPeriod,
    ReadinessFailureThreshold,
    /// Istio's ProxyConfig (YAML or JSON); see [`ProxyConfig`] for the fields that map.
    ProxyConfig,
}

/// Each setting: its key, our annotation, and Istio's when Istio has one.
pub const SETTINGS: &[(Key, &str, Option<&str>)] = &[
    (Key::Inject, "mesh-init.io/inject", Some("sidecar.istio.io/inject")),
    (Key::Mode, "mesh-init.io/mode", None),
    (Key::ConfigMap, "mesh-init.io/configMap", None),
    (Key::ProxyImage, "mesh-init.io/proxyImage", Some("sidecar.istio.io/proxyImage")),
    (Key::ProxyCpu, "mesh-init.io/proxyCPU", Some("sidecar.istio.io/proxyCPU")),
    (Key::ProxyMemory, "mesh-init.io/proxyMemory", Some("sidecar.istio.io/proxyMemory")),
    (Key::ProxyCpuLimit, "mesh-init.io/proxyCPULimit", Some("sidecar.istio.io/proxyCPULimit")),
    (Key::ProxyMemoryLimit, "mesh-init.io/proxyMemoryLimit", Some("sidecar.istio.io/proxyMemoryLimit")),
    (Key::NativeSidecar, "mesh-init.io/nativeSidecar", Some("sidecar.istio.io/nativeSidecar")),
    (Key::HoldApplication, "mesh-init.io/holdApplicationUntilProxyStarts", None),
    (Key::RewriteProbes, "mesh-init.io/rewriteAppProbers", Some("sidecar.istio.io/rewriteAppHTTPProbers")),
    (Key::StatusPort, "mesh-init.io/statusPort", Some("status.sidecar.istio.io/port")),
    (Key::MergeMetrics, "mesh-init.io/mergeMetrics", Some("prometheus.istio.io/merge-metrics")),
    (
        Key::ReadinessInitialDelay,
        "mesh-init.io/readinessInitialDelaySeconds",
        Some("readiness.status.sidecar.istio.io/initialDelaySeconds"),
    ),
    (
        Key::ReadinessPeriod,
        "mesh-init.io/readinessPeriodSeconds",
        Some("readiness.status.sidecar.istio.io/periodSeconds"),
    ),
    (
        Key::ReadinessFailureThreshold,
        "mesh-init.io/readinessFailureThreshold",
        Some("readiness.status.sidecar.istio.io/failureThreshold"),
    ),
    (Key::ProxyConfig, "mesh-init.io/proxyConfig", Some("proxy.istio.io/config")),
];

/// Traffic annotations: ours, Istio's, the capture flag each one replaces, and how it is set.
type Setter = fn(&mut CaptureArgs, String);
pub const CAPTURE: &[(&str, &str, &str, Setter)] = &[
    ("mesh-init.io/proxyPort", "", "--envoy-port", |a, v| a.envoy_port = v),
    ("mesh-init.io/inboundCapturePort", "", "--inbound-capture-port", |a, v| a.inbound_capture_port = Some(v)),
    (
        "mesh-init.io/includeOutboundIPRanges",
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "--istio-service-cidr",
        |a, v| a.service_cidr = v,
    ),
    (
        "mesh-init.io/excludeOutboundIPRanges",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "--istio-service-exclude-cidr",
        |a, v| a.service_exclude_cidr = v,
    ),
    (
        "mesh-init.io/includeOutboundPorts",
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "--istio-outbound-ports",
        |a, v| a.outbound_ports = v,
    ),
    (
        "mesh-init.io/excludeOutboundPorts",
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "--istio-local-outbound-ports-exclude",
        |a, v| a.outbound_ports_exclude = v,
    ),
    (
        "mesh-init.io/includeInboundPorts",
        "traffic.sidecar.istio.io/includeInboundPorts",
        "--istio-inbound-ports",
        |a, v| a.inbound_ports = v,
    ),
    (
        "mesh-init.io/excludeInboundPorts",
        "traffic.sidecar.istio.io/excludeInboundPorts",
        "--istio-local-exclude-ports",
        |a, v| a.inbound_ports_exclude = v,
    ),
    (
        "mesh-init.io/excludeInterfaces",
        "traffic.sidecar.istio.io/excludeInterfaces",
        "--istio-exclude-interfaces",
        |a, v| a.exclude_interfaces = v,
    ),
    (
        "mesh-init.io/interceptionMode",
        "sidecar.istio.io/interceptionMode",
        "--istio-inbound-interception-mode",
        |a, v| a.inbound_interception_mode = v,
    ),
];

/// An annotation that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAnnotation {
    pub name: String,
    pub reason: String,
}

impl BadAnnotation {
    pub fn new(name: &str, reason: impl Into<String>) -> Self {
        Self { name: name.into(), reason: reason.into() }
    }
}

/// The fields of Istio's ProxyConfig (`proxy.istio.io/config`) that have a meaning here.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    pub hold_application_until_proxy_starts: Option<bool>,
    pub status_port: Option<u16>,
    pub interception_mode: Option<String>,
    /// Worker threads: mesh-proxy's `--workers`. 0 means one per core, mesh-proxy's default.
    pub concurrency: Option<u16>,
    /// `--discovery-address` for this workload.
    pub discovery_address: Option<String>,
    /// Everything else, named in a note.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The settings of one workload: each value with the annotation (or label) it came from.
#[derive(Debug, Default)]
pub struct Annotations {
    settings: BTreeMap<Key, (String, String)>,
    capture: BTreeMap<&'static str, (String, String)>,
    /// The previous injection's status annotation.
    status: Option<String>,
    pub proxy_config: ProxyConfig,
    /// Istio annotations that mean nothing here, one line each.
    pub ignored: Vec<String>,
}

impl Annotations {
    /// Reads `annotations` (the workload's, then the pod template's, which win) and `labels`
    /// (the pod's: only the inject switches are read there, and they win over annotations).
    pub fn read(annotations: &[Option<&Value>], labels: Option<&Value>) -> Result<Self, BadAnnotation> {
        // The final value of each name: later maps override earlier ones, labels override both.
        let mut given: BTreeMap<String, String> = BTreeMap::new();
        for map in annotations.iter().flatten().filter_map(|m| m.as_mapping()) {
            for (k, v) in map {
                let Some(name) = k.as_str() else { continue };
                if !name.starts_with(PREFIX) && !ISTIO_PREFIXES.iter().any(|p| name.starts_with(p)) {
                    continue;
                }
                given.insert(name.to_string(), string_value(name, v)?);
            }
        }
        if let Some(map) = labels.and_then(Value::as_mapping) {
            for (k, v) in map {
                let Some(name) = k.as_str() else { continue };
                if SETTINGS
                    .iter()
                    .any(|(key, ours, istio)| *key == Key::Inject && (*ours == name || *istio == Some(name)))
                {
                    given.insert(name.to_string(), string_value(name, v)?);
                }
            }
        }

        let mut out = Self::default();
        for (name, value) in given {
            if name == STATUS {
                out.status = Some(value);
                continue;
            }
            if name == ISTIO_STATUS {
                return Err(BadAnnotation::new(
                    &name,
                    "the pod was injected by Istio's injector; remove Istio's containers and this annotation first",
                ));
            }
            if let Some((key, ..)) = SETTINGS.iter().find(|(_, ours, istio)| *ours == name || *istio == Some(&name)) {
                merge(&mut out.settings, *key, name, value)?;
            } else if let Some((ours, ..)) =
                CAPTURE.iter().find(|(ours, istio, ..)| *ours == name || (!istio.is_empty() && *istio == name))
            {
                merge(&mut out.capture, ours, name, value)?;
            } else if name.starts_with(PREFIX) {
                let mut names: Vec<&str> = SETTINGS.iter().map(|(_, ours, _)| *ours).collect();
                names.extend(CAPTURE.iter().map(|(ours, ..)| *ours));
                return Err(BadAnnotation::new(
                    &name,
                    format!("unknown annotation; mesh-init reads {}", names.join(", ")),
                ));
            } else {
                out.ignored.push(format!("{name} is not supported by mesh-init and was ignored"));
            }
        }
        if let Some((name, text)) = out.settings.get(&Key::ProxyConfig) {
            let config: ProxyConfig = serde_yaml::from_str(text)
                .map_err(|e| BadAnnotation::new(name, format!("not a ProxyConfig in YAML or JSON: {e}")))?;
            for field in config.other.keys() {
                out.ignored.push(format!("{name}: field {field} has no meaning in mesh-init and was ignored"));
            }
            out.proxy_config = config;
        }
        Ok(out)
    }

    /// The value of a setting and the name it was given under.
    pub fn get(&self, key: Key) -> Option<(&str, &str)> {
        self.settings.get(&key).map(|(name, value)| (value.as_str(), name.as_str()))
    }

    /// The previous injection's status annotation, if any.
    pub fn status(&self) -> Option<&str> {
        self.status.as_deref()
    }

    /// A `"true"`/`"false"` setting.
    pub fn flag(&self, key: Key) -> Result<Option<bool>, BadAnnotation> {
        match self.get(key) {
            None => Ok(None),
            Some((v, name)) => match v.trim() {
                "true" => Ok(Some(true)),
                "false" => Ok(Some(false)),
                _ => Err(BadAnnotation::new(name, format!("{v:?}: expected \"true\" or \"false\""))),
            },
        }
    }

    /// A number setting.
    pub fn number<T: std::str::FromStr>(&self, key: Key, what: &str) -> Result<Option<T>, BadAnnotation> {
        match self.get(key) {
            None => Ok(None),
            Some((v, name)) => {
                v.trim().parse().map(Some).map_err(|_| BadAnnotation::new(name, format!("{v:?}: expected {what}")))
            }
        }
    }

    /// False when the workload opted out.
    pub fn wants_injection(&self) -> Result<bool, BadAnnotation> {
        Ok(self.flag(Key::Inject)?.unwrap_or(true))
    }

    /// `base` with every traffic annotation applied, and for each flag replaced, the annotation
    /// that replaced it (to name it when validation refuses the value).
    pub fn apply_capture(&self, base: &CaptureArgs) -> (CaptureArgs, BTreeMap<&'static str, String>) {
        let mut args = base.clone();
        let mut from = BTreeMap::new();
        for (ours, _, flag, set) in CAPTURE {
            if let Some((name, value)) = self.capture.get(ours) {
                set(&mut args, value.clone());
                from.insert(*flag, name.clone());
            }
        }
        (args, from)
    }
}

/// Records `value` for a setting, refusing a second name of the same setting with another value.
fn merge<K: Ord + Copy>(
    map: &mut BTreeMap<K, (String, String)>,
    key: K,
    name: String,
    value: String,
) -> Result<(), BadAnnotation> {
    if let Some((other, previous)) = map.get(&key) {
        if previous.trim() != value.trim() {
            return Err(BadAnnotation::new(
                &name,
                format!("{value:?} contradicts {other}: {previous:?} (the same setting; give one, or the same value)"),
            ));
        }
        return Ok(());
    }
    map.insert(key, (name, value));
    Ok(())
}

fn string_value(name: &str, v: &Value) -> Result<String, BadAnnotation> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(BadAnnotation::new(
            name,
            format!(
                "annotation and label values are strings; quote it ({name}: \"{}\")",
                serde_yaml::to_string(other).unwrap_or_default().trim()
            ),
        )),
    }
}
