//! `mesh-init inject`: adds the mesh to Kubernetes workloads, as `istioctl kube-inject` does.
//!
//! Every Pod template found in the input (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
//! ReplicationController, Job, CronJob, and the same inside a `v1/List`) gets:
//! - the init container `mesh-init`, running `mesh-init iptables` (NET_ADMIN and NET_RAW, root,
//!   not privileged) or, with `--mode ebpf`, `mesh-init ebpf` on the pod's cgroup (see
//!   deploy/README.md for why that needs the node's cgroup tree and bpffs);
//! - the sidecar `mesh-proxy`, as the proxy UID (1337) with no capabilities, reading
//!   `/etc/mesh-proxy/config.yaml` from the ConfigMap `<workload>-mesh-proxy`, with a readiness
//!   probe on its readiness port's `/ready` (the config's `readiness` section, Istio's 15021);
//! - the annotation `mesh-init.io/status`, listing what was added.
//!
//! Everything else is written back byte for byte. A workload is rewritten (losing its comments)
//! only when its injection changes, so injecting twice gives what injecting once gave: the
//! second run finds the status annotation, takes the previous injection out, puts the new one
//! in, and finds the document unchanged.
//!
//! Per-workload annotations (on the workload or its pod template; the template's win):
//!
//! | annotation | replaces |
//! |---|---|
//! | `mesh-init.io/inject: "false"` | opts the workload out (left untouched) |
//! | `mesh-init.io/mode` | `--mode` (`iptables` or `ebpf`) |
//! | `mesh-init.io/configMap` | `--config-map` |
//! | `mesh-init.io/proxyPort` | `--envoy-port` |
//! | `mesh-init.io/inboundCapturePort` | `--inbound-capture-port` |
//! | `mesh-init.io/includeOutboundIPRanges` | `--istio-service-cidr` |
//! | `mesh-init.io/excludeOutboundIPRanges` | `--istio-service-exclude-cidr` |
//! | `mesh-init.io/includeOutboundPorts` | `--istio-outbound-ports` |
//! | `mesh-init.io/excludeOutboundPorts` | `--istio-local-outbound-ports-exclude` |
//! | `mesh-init.io/includeInboundPorts` | `--istio-inbound-ports` |
//! | `mesh-init.io/excludeInboundPorts` | `--istio-local-exclude-ports` |
//! | `mesh-init.io/excludeInterfaces` | `--istio-exclude-interfaces` |
//! | `mesh-init.io/interceptionMode` | `--istio-inbound-interception-mode` |
//!
//! Values are checked by the init container's own validation, so a bad one is reported here,
//! naming the annotation and the workload, instead of by a pod stuck in `Init:Error`. The admin
//! port is always added to the inbound excludes: the kubelet's probe must reach it directly.
//!
//! Layout: `inject/documents.rs` cuts the stream, `annotations.rs` reads the overrides,
//! `containers.rs` is the plan (what is added, as data) and `workload.rs` finds the pod template
//! and puts the plan into it. deploy/README.md is the user's guide, with the eBPF mode's design.

mod annotations;
mod containers;
mod documents;
mod metrics;
mod pod;
mod probes;
mod resources;
mod workload;

use std::io::{Read, Write};

use serde_yaml::Value;

pub use annotations::{CAPTURE as CAPTURE_ANNOTATIONS, PREFIX, SETTINGS as SETTING_ANNOTATIONS, STATUS};
pub use containers::{INIT_NAME, PROXY_NAME, VALIDATION_NAME};
pub use pod::{Done, Refusal};
pub use workload::{template_path, workload_name};

use crate::capture::CaptureArgs;

/// The registry and path the images are named under, fully qualified so that a node never reads
/// `mesh-init:0.1.0` as `docker.io/library/mesh-init`. `MESH_IMAGE_HUB` at build time changes it;
/// `--hub` at run time too (scripts/image.sh takes the same `--hub`).
pub const DEFAULT_HUB: &str = match option_env!("MESH_IMAGE_HUB") {
    Some(hub) => hub,
    None => "localhost",
};
/// The crates' version, which scripts/image.sh tags the images with.
pub const DEFAULT_TAG: &str = env!("CARGO_PKG_VERSION");
/// The first Kubernetes minor with native sidecars on by default (beta in 1.29, GA in 1.33).
pub const MIN_NATIVE_SIDECAR: (u32, u32) = (1, 29);

/// `mesh-init inject`'s flags: the file to read and the [`Settings`].
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Kubernetes YAML to read (any number of `---` documents); `-` reads standard input.
    #[arg(short = 'f', long = "filename", default_value = "-")]
    pub filename: String,

    #[command(flatten)]
    pub settings: Settings,
}

/// How pods are injected: shared by `mesh-init inject` and `mesh-init webhook`. The capture
/// flags are those of `mesh-init iptables`, and become the init container's arguments. Their
/// defaults are the injector's (one proxy port for both directions, everything captured), not
/// istio-iptables' (`-p 15001 -z 15006`, nothing captured).
#[derive(Debug, Clone, clap::Args)]
#[command(
    mut_arg("envoy_port", |a| a.default_value(mesh_common::ports::PROXY_TEXT)),
    mut_arg("inbound_capture_port", |a| a.default_value(None::<&'static str>)),
    mut_arg("proxy_uid", |a| a.default_value(mesh_common::PROXY_UID_TEXT)),
    mut_arg("service_cidr", |a| a.default_value("*")),
    mut_arg("inbound_ports", |a| a.default_value("*")),
)]
pub struct Settings {
    /// Registry and path of both images (`<hub>/mesh-init:<tag>`, `<hub>/mesh-proxy:<tag>`).
    #[arg(long = "hub", default_value = DEFAULT_HUB)]
    pub hub: String,

    /// Tag of both images.
    #[arg(long = "tag", default_value = DEFAULT_TAG)]
    pub tag: String,

    /// Image of the sidecar container [default: <hub>/mesh-proxy:<tag>].
    #[arg(long = "proxy-image")]
    pub proxy_image: Option<String>,

    /// Image of the init container (the mesh-init binary, iptables and a shell) [default: <hub>/mesh-init:<tag>].
    #[arg(long = "init-image")]
    pub init_image: Option<String>,

    /// How the pod's traffic is captured: the init container installs iptables rules or eBPF
    /// programs, or (`validation`) the node installs the rules and the init container only
    /// checks them, with no privileges.
    #[arg(long = "mode", value_enum, default_value = "iptables")]
    pub mode: Mode,

    /// mesh-proxy's admin port (on loopback in the config); never captured inbound, as Istio
    /// excludes 15090.
    #[arg(long = "proxy-admin-port", default_value_t = mesh_common::ports::ADMIN, value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,

    /// mesh-proxy's readiness port (`readiness.address` in its config): the readiness and startup
    /// probes' target, never captured inbound.
    #[arg(long = "proxy-readiness-port", default_value_t = mesh_common::ports::READINESS, value_parser = clap::value_parser!(u16).range(1..))]
    pub readiness_port: u16,

    /// mesh-proxy's status port: the application's rewritten probes and the merged metrics
    /// (Istio's 15020), never captured inbound; 0 turns both off.
    #[arg(long = "proxy-status-port", default_value_t = mesh_common::ports::ISTIO_MERGED_METRICS)]
    pub status_port: u16,

    /// mesh-pilot's discovery address (`host:port`, e.g. `mesh-pilot.mesh-system:15010`, Istio's
    /// `discoveryAddress`): the sidecar takes its listeners, routes, clusters and endpoints from
    /// mesh-pilot's scope for the pod's namespace, over its ConfigMap's `discovery.url`. Sets
    /// `MESH_PROXY_DISCOVERY_ADDRESS`, and `POD_NAME`/`POD_NAMESPACE` from the downward API (the
    /// scope, and the proxy's name in `mesh-pilot status`).
    #[arg(long = "discovery-address")]
    pub discovery_address: Option<String>,

    /// ConfigMap holding the sidecar's `config.yaml` [default: WORKLOAD-mesh-proxy, after the workload's name].
    #[arg(long = "config-map")]
    pub config_map: Option<String>,

    /// Add mesh-proxy as a native sidecar (an init container with restartPolicy: Always and a
    /// startup probe): it is ready before the application starts and does not keep a Job
    /// running. `auto`: when --kubernetes-version is 1.29 or newer.
    #[arg(long = "native-sidecar", value_enum, default_value = "auto", num_args = 0..=1, default_missing_value = "true")]
    pub native_sidecar: NativeSidecar,

    /// The cluster's Kubernetes version (`1.30`, `v1.30.2`): decides `--native-sidecar auto`, and
    /// refuses native sidecars below 1.29.
    #[arg(long = "kubernetes-version", value_parser = parse_kubernetes_version)]
    pub kubernetes_version: Option<(u32, u32)>,

    /// Classic sidecar: start the application's containers only once the proxy is ready
    /// (Istio's holdApplicationUntilProxyStarts).
    #[arg(long = "hold-application-until-proxy-starts")]
    pub hold_application_until_proxy_starts: bool,

    /// Send the kubelet's HTTP and TCP probes of the application to the proxy's status port,
    /// which makes the real probe (Istio's rewriteAppHTTPProbe).
    #[arg(long = "rewrite-app-probers", default_value_t = true, action = clap::ArgAction::Set)]
    pub rewrite_app_probers: bool,

    /// Point the pod's prometheus.io annotations at the status port, which serves the proxy's
    /// metrics merged with the application's (Istio's enablePrometheusMerge).
    #[arg(long = "merge-metrics", default_value_t = true, action = clap::ArgAction::Set)]
    pub merge_metrics: bool,

    /// CPU request of the injected containers [default: 100m, Istio's].
    #[arg(long = "proxy-cpu")]
    pub proxy_cpu: Option<String>,
    /// Memory request of the injected containers [default: 128Mi].
    #[arg(long = "proxy-memory")]
    pub proxy_memory: Option<String>,
    /// CPU limit of the injected containers [default: 2000m].
    #[arg(long = "proxy-cpu-limit")]
    pub proxy_cpu_limit: Option<String>,
    /// Memory limit of the injected containers [default: 1024Mi].
    #[arg(long = "proxy-memory-limit")]
    pub proxy_memory_limit: Option<String>,

    #[command(flatten)]
    pub capture: CaptureArgs,
}

impl Settings {
    pub fn proxy_image(&self) -> String {
        self.proxy_image
            .clone()
            .unwrap_or_else(|| format!("{}/mesh-proxy:{}", self.hub.trim_end_matches('/'), self.tag))
    }

    pub fn init_image(&self) -> String {
        self.init_image.clone().unwrap_or_else(|| format!("{}/mesh-init:{}", self.hub.trim_end_matches('/'), self.tag))
    }

    /// The checks that need no workload: made once, before any input is read.
    pub fn check(&self) -> Result<(), Error> {
        self.capture.validate().map_err(|e| Error::Flag(e.to_string()))?;
        let hub = self.hub.trim_end_matches('/');
        if !(hub.contains('/') || hub.contains('.') || hub.contains(':') || hub == "localhost") {
            return Err(Error::Flag(format!(
                "--hub {hub:?} is not a registry host: a name without '.', ':' or '/' is read as docker.io/library/... on a node"
            )));
        }
        if let Some(address) = &self.discovery_address {
            check_discovery_address(address).map_err(|r| Error::Flag(format!("--discovery-address: {r}")))?;
        }
        Ok(())
    }
}

/// A `host:port` mesh-proxy's `--discovery-address` accepts (a DNS name, an IPv4 address or a
/// bracketed IPv6 one, and a port), so that a bad one is refused here rather than by a sidecar
/// that never starts.
fn check_discovery_address(address: &str) -> Result<(), String> {
    let bad = || format!("{address:?}: expected host:port, e.g. mesh-pilot.mesh-system:15010");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// `1.30`, `v1.30.2`, `1.30.1-gke.100`, as `kubectl version` or a node's kubeletVersion shows it.
fn parse_kubernetes_version(s: &str) -> Result<(u32, u32), String> {
    let t = s.trim().trim_start_matches('v');
    let mut parts = t.split(['.', '-', '+']);
    let major = parts.next().and_then(|p| p.parse().ok());
    let minor = parts.next().and_then(|p| p.parse().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => Ok((major, minor)),
        _ => Err(format!("{s:?} is not a Kubernetes version such as 1.30 or v1.30.2")),
    }
}

/// The interception mode of the injected init container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Iptables,
    Ebpf,
    /// The rules are installed on the node (as by Istio's CNI plugin); the init container only
    /// checks them (`mesh-init iptables --run-validation --skip-rule-apply`, Istio's
    /// istio-validation), as the proxy's user with no capabilities.
    Validation,
}

/// `--native-sidecar`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecar {
    Auto,
    True,
    False,
}

/// Why nothing was written. Each message names the file, document, workload and the field,
/// flag or annotation at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin}: document {document}: invalid YAML at line {line} column {column}: {message}")]
    Yaml { origin: String, document: usize, line: usize, column: usize, message: String },
    /// A command-line value `mesh-init iptables`/`ebpf` would refuse.
    #[error("{0}")]
    Flag(String),
    #[error("{at}: annotation {annotation}: {reason}")]
    Annotation { at: String, annotation: String, reason: String },
    #[error("{at}: {reason}")]
    Workload { at: String, reason: String },
    #[error("writing the output: {0}")]
    Write(std::io::Error),
}

impl Error {
    /// The error for a refused pod at `at`.
    pub fn refused(at: &str, refusal: Refusal) -> Self {
        match refusal {
            Refusal::Annotation(b) => Error::Annotation { at: at.into(), annotation: b.name, reason: b.reason },
            Refusal::Other(reason) => Error::Workload { at: at.into(), reason },
        }
    }
}

/// What an injection produced: the YAML, and one line per workload that was left alone and why,
/// or per thing about an injected one the user should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub yaml: String,
    pub notes: Vec<String>,
}

/// Reads `--filename`, writes the injected YAML to stdout and the notes to stderr.
pub fn run(args: &InjectArgs) -> Result<(), Error> {
    let (origin, text) = if args.filename == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| Error::Read { path: "standard input".into(), source })?;
        ("<stdin>".to_string(), text)
    } else {
        let text = std::fs::read_to_string(&args.filename)
            .map_err(|source| Error::Read { path: args.filename.clone(), source })?;
        (args.filename.clone(), text)
    };
    let outcome = inject(&text, &origin, &args.settings)?;
    for note in &outcome.notes {
        eprintln!("mesh-init inject: {note}");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(outcome.yaml.as_bytes()).and_then(|()| out.flush()).map_err(Error::Write)
}

/// Injects every workload of `text` (`origin` names it in messages). Nothing is returned unless
/// every document was understood.
pub fn inject(text: &str, origin: &str, settings: &Settings) -> Result<Outcome, Error> {
    // The flags alone must be acceptable before any workload is looked at.
    settings.check()?;
    let mut out = Outcome { yaml: String::with_capacity(text.len() * 2), notes: vec![] };
    for doc in documents::split(text) {
        let mut value = doc.parse().map_err(|e| Error::Yaml {
            origin: origin.into(),
            document: e.document,
            line: e.line,
            column: e.column,
            message: e.message,
        })?;
        let original = value.clone();
        let at = format!("{origin}: document {} (line {})", doc.number, doc.line);
        inject_object(&mut value, &at, settings, &mut out.notes)?;
        // Mapping equality ignores key order: a re-injection that only moved keys keeps the text.
        if value == original {
            out.yaml.push_str(doc.separator);
            out.yaml.push_str(doc.body);
        } else {
            // `--- {inline: document}` keeps only its `---`; a comment after `---` stays.
            out.yaml.push_str(if doc.separator.len() > 3 {
                doc.separator
            } else if doc.separator.is_empty() {
                ""
            } else {
                "---\n"
            });
            out.yaml.push_str(&serde_yaml::to_string(&value).expect("a parsed document serialises"));
        }
    }
    Ok(out)
}

/// Injects one object, or each item of a `v1/List`. Objects without a pod template pass
/// through; `at` locates the object in messages.
pub fn inject_object(obj: &mut Value, at: &str, settings: &Settings, notes: &mut Vec<String>) -> Result<(), Error> {
    let api_version = workload::get_str(obj, &["apiVersion"]).unwrap_or_default().to_string();
    let kind = workload::get_str(obj, &["kind"]).unwrap_or_default().to_string();
    if api_version == "v1" && kind == "List" {
        if let Some(Value::Sequence(items)) = obj.get_mut("items") {
            for (i, item) in items.iter_mut().enumerate() {
                inject_object(item, &format!("{at}, items[{i}]"), settings, notes)?;
            }
        }
        return Ok(());
    }
    let Some(path) = workload::template_path(&api_version, &kind) else { return Ok(()) };
    let name = workload::workload_name(obj, &kind);
    let at = format!("{at}: {kind} {}", name.as_deref().unwrap_or("(unnamed)"));
    workload::check_template(workload::get(obj, path), path)
        .map_err(|reason| Error::Workload { at: at.clone(), reason })?;
    let outer = (!path.is_empty()).then(|| workload::get(obj, &["metadata", "annotations"]).cloned()).flatten();
    let template = workload::get_mut(obj, path).expect("check_template found it");
    match pod::inject(template, name.as_deref(), outer.as_ref(), settings).map_err(|r| Error::refused(&at, r))? {
        Done::Injected(more) => notes.extend(more.into_iter().map(|n| format!("{at}: {n}"))),
        Done::Skipped(why) => notes.push(format!("{at}: {why}")),
    }
    Ok(())
}
