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
mod workload;

use std::io::{Read, Write};

use serde_yaml::Value;

pub use annotations::{CAPTURE as CAPTURE_ANNOTATIONS, CONFIG_MAP, INJECT, MODE, PREFIX, STATUS};
pub use containers::{INIT_NAME, PROXY_NAME};

use crate::capture::{CaptureArgs, InvalidFlag};
use annotations::{Annotations, BadAnnotation};
use containers::Sidecar;

/// The image tags the Dockerfile's targets are built as by default.
pub const DEFAULT_PROXY_IMAGE: &str = concat!("mesh-proxy:", env!("CARGO_PKG_VERSION"));
pub const DEFAULT_INIT_IMAGE: &str = concat!("mesh-init:", env!("CARGO_PKG_VERSION"));

/// `mesh-init inject`'s flags. The capture flags are those of `mesh-init iptables`, and become
/// the init container's arguments. Their defaults are the injector's (one proxy port for both
/// directions, everything captured), not istio-iptables' (`-p 15001 -z 15006`, nothing captured).
#[derive(Debug, Clone, clap::Args)]
#[command(
    mut_arg("envoy_port", |a| a.default_value(mesh_common::ports::PROXY_TEXT)),
    mut_arg("inbound_capture_port", |a| a.default_value(None::<&'static str>)),
    mut_arg("proxy_uid", |a| a.default_value(mesh_common::PROXY_UID_TEXT)),
    mut_arg("service_cidr", |a| a.default_value("*")),
    mut_arg("inbound_ports", |a| a.default_value("*")),
)]
pub struct InjectArgs {
    /// Kubernetes YAML to read (any number of `---` documents); `-` reads standard input.
    #[arg(short = 'f', long = "filename", default_value = "-")]
    pub filename: String,

    /// Image of the sidecar container.
    #[arg(long = "proxy-image", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,

    /// Image of the init container (the mesh-init binary, iptables and a shell).
    #[arg(long = "init-image", default_value = DEFAULT_INIT_IMAGE)]
    pub init_image: String,

    /// How the init container intercepts traffic.
    #[arg(long = "mode", value_enum, default_value = "iptables")]
    pub mode: Mode,

    /// mesh-proxy's admin port (on loopback in the config); never captured inbound, as Istio
    /// excludes 15090.
    #[arg(long = "proxy-admin-port", default_value_t = mesh_common::ports::ADMIN, value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,

    /// mesh-proxy's readiness port (`readiness.address` in its config): the readiness probe's
    /// target, never captured inbound.
    #[arg(long = "proxy-readiness-port", default_value_t = mesh_common::ports::READINESS, value_parser = clap::value_parser!(u16).range(1..))]
    pub readiness_port: u16,

    /// ConfigMap holding the sidecar's `config.yaml` [default: WORKLOAD-mesh-proxy, after the workload's name].
    #[arg(long = "config-map")]
    pub config_map: Option<String>,

    /// Add mesh-proxy as a native sidecar (an init container with restartPolicy: Always,
    /// Kubernetes 1.29+): it starts before the application and does not keep a Job running.
    #[arg(long = "native-sidecar")]
    pub native_sidecar: bool,

    #[command(flatten)]
    pub capture: CaptureArgs,
}

/// The interception mode of the injected init container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Iptables,
    Ebpf,
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

/// What an injection produced: the YAML, and one line per workload that was left alone and why.
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
    let outcome = inject(&text, &origin, args)?;
    for note in &outcome.notes {
        eprintln!("mesh-init inject: {note}");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(outcome.yaml.as_bytes()).and_then(|()| out.flush()).map_err(Error::Write)
}

/// Injects every workload of `text` (`origin` names it in messages). Nothing is returned unless
/// every document was understood.
pub fn inject(text: &str, origin: &str, args: &InjectArgs) -> Result<Outcome, Error> {
    // The flags alone must be acceptable before any workload is looked at.
    args.capture.validate().map_err(|e| Error::Flag(e.to_string()))?;
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
        inject_object(&mut value, &at, args, &mut out.notes)?;
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

/// Injects one object, or each item of a `v1/List`.
fn inject_object(obj: &mut Value, at: &str, args: &InjectArgs, notes: &mut Vec<String>) -> Result<(), Error> {
    let api_version = workload::get_str(obj, &["apiVersion"]).unwrap_or_default().to_string();
    let kind = workload::get_str(obj, &["kind"]).unwrap_or_default().to_string();
    if api_version == "v1" && kind == "List" {
        if let Some(Value::Sequence(items)) = obj.get_mut("items") {
            for (i, item) in items.iter_mut().enumerate() {
                inject_object(item, &format!("{at}, items[{i}]"), args, notes)?;
            }
        }
        return Ok(());
    }
    let Some(path) = workload::template_path(&api_version, &kind) else { return Ok(()) };
    let name = workload::get_str(obj, &["metadata", "name"]).map(str::to_string);
    let at = format!("{at}: {kind} {}", name.as_deref().unwrap_or("(unnamed)"));
    let fail = |reason: String| Error::Workload { at: at.clone(), reason };
    let bad = |b: BadAnnotation| Error::Annotation { at: at.clone(), annotation: b.name, reason: b.reason };

    workload::check_template(workload::get(obj, path), path).map_err(fail)?;
    let mut template_annotations = path.to_vec();
    template_annotations.extend(["metadata", "annotations"]);
    let annotations = Annotations::read(&[
        workload::get(obj, &["metadata", "annotations"]),
        workload::get(obj, &template_annotations),
    ])
    .map_err(bad)?;
    if !annotations.wants_injection().map_err(bad)? {
        notes.push(format!("{at}: left as is ({INJECT}: \"false\")"));
        return Ok(());
    }
    let mut spec_path = path.to_vec();
    spec_path.extend(["spec", "hostNetwork"]);
    if workload::get(obj, &spec_path).and_then(Value::as_bool) == Some(true) {
        notes.push(format!("{at}: left as is (hostNetwork: true; capturing would change the node's own traffic)"));
        return Ok(());
    }
    let sidecar = decide(args, &annotations, name.as_deref()).map_err(|e| match e {
        Decision::Annotation(b) => bad(b),
        Decision::Flag(reason) => fail(reason),
    })?;
    let template = workload::get_mut(obj, path).expect("check_template found it");
    workload::strip(template, annotations.get(STATUS)).map_err(fail)?;
    workload::apply(template, &sidecar);
    Ok(())
}

/// Why a workload's sidecar could not be decided: a bad annotation, or a command-line value that
/// only this workload's settings make unusable.
enum Decision {
    Annotation(BadAnnotation),
    Flag(String),
}

/// The flags with the workload's annotations applied, validated as the init container will.
fn decide(args: &InjectArgs, annotations: &Annotations, name: Option<&str>) -> Result<Sidecar, Decision> {
    let bad = |name: &str, reason: String| Decision::Annotation(BadAnnotation { name: name.into(), reason });
    let mode = match annotations.get(MODE).map(str::trim) {
        None => args.mode,
        Some("iptables") => Mode::Iptables,
        Some("ebpf") => Mode::Ebpf,
        Some(v) => return Err(bad(MODE, format!("{v:?}: expected \"iptables\" or \"ebpf\""))),
    };
    let config_map = match (annotations.get(CONFIG_MAP), &args.config_map, name) {
        (Some(cm), _, _) => check_name(cm).map_err(|r| bad(CONFIG_MAP, r))?,
        (None, Some(cm), _) => check_name(cm).map_err(|r| Decision::Flag(format!("--config-map: {r}")))?,
        (None, None, Some(name)) => check_name(&format!("{name}-mesh-proxy"))
            .map_err(|r| Decision::Flag(format!("the default ConfigMap name: {r}; set {CONFIG_MAP}")))?,
        (None, None, None) => {
            return Err(Decision::Flag(format!(
                "metadata.name is missing, so the ConfigMap cannot be named after it; set {CONFIG_MAP} or --config-map"
            )))
        }
    };

    let (mut capture, from) = annotations.apply_capture(&args.capture);
    if args.readiness_port == args.admin_port {
        return Err(Decision::Flag(format!(
            "--proxy-readiness-port: {} is also --proxy-admin-port; the readiness port must be its own (Istio's is 15021)",
            args.readiness_port
        )));
    }
    // The kubelet's readiness probe must reach the readiness port itself, not the proxy's
    // listener; the admin port is excluded too, as Istio does, so nothing arriving on the pod IP
    // for it is handed to the proxy. Readiness first: `15021,15090,<the rest>`.
    for port in [args.admin_port, args.readiness_port] {
        let port = port.to_string();
        if !capture.inbound_ports_exclude.split(',').any(|p| p.trim() == port) {
            capture.inbound_ports_exclude = match capture.inbound_ports_exclude.trim() {
                "" => port,
                list => format!("{port},{list}"),
            };
        }
    }
    let blame = |flag: &str, reason: String| match from.get(flag) {
        Some(annotation) => bad(annotation, reason),
        None => Decision::Flag(format!("{flag}: {reason}")),
    };
    let config = capture.validate().map_err(|e: InvalidFlag| {
        let reason = format!("invalid value {:?} (for {}): {}", e.value, e.flag, e.reason);
        blame(e.flag, reason)
    })?;
    if mode == Mode::Ebpf {
        crate::ebpf_limits::check(&config).map_err(|e| blame(e.flag, e.reason))?;
    }
    let (proxy_uid, proxy_gid) = (config.proxy_uids[0], config.proxy_gids[0]);
    if proxy_uid == 0 {
        return Err(Decision::Flag(
            "--proxy-uid: the sidecar runs as the first proxy UID, which must not be root (0)".into(),
        ));
    }
    Ok(Sidecar {
        mode,
        init_image: args.init_image.clone(),
        proxy_image: args.proxy_image.clone(),
        readiness_port: args.readiness_port,
        config_map,
        native: args.native_sidecar,
        capture_flags: containers::render_flags(&capture),
        proxy_uid,
        proxy_gid,
    })
}

/// A ConfigMap name: a DNS subdomain (RFC 1123), as the API server requires.
fn check_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!("{name:?} is not a valid ConfigMap name (lower-case letters, digits, '-' and '.', at most 253)"))
    }
}
