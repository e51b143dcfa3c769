//! One pod template: deciding its sidecar from the flags and its annotations, taking a previous
//! injection out, and putting the new one in. `mesh-init inject` calls this for the template of
//! every workload it reads; the admission webhook calls it for the Pod it is sent, so both give
//! the same pod for the same input.

use serde_yaml::{Mapping, Value};

use super::{
    annotations::{Annotations, BadAnnotation, Key, STATUS},
    containers::{
        self, ReadinessTiming, Sidecar, Status, BPFFS_VOLUME, CGROUP_VOLUME, CONFIG_VOLUME, INIT_NAME, PROXY_NAME,
        VALIDATION_NAME,
    },
    metrics, probes,
    resources::{self, Value4, Wanted},
    workload::get,
    Mode, NativeSidecar, Settings, MIN_NATIVE_SIDECAR,
};
use crate::capture::{CaptureConfig, InboundMode, InvalidFlag, Selection};

/// Why a pod cannot be injected: an annotation (named) or anything else (the reason names the
/// flag or field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Annotation(BadAnnotation),
    Other(String),
}

impl From<BadAnnotation> for Refusal {
    fn from(b: BadAnnotation) -> Self {
        Refusal::Annotation(b)
    }
}

/// What happened to a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Injected; one note per thing the user should know (ignored Istio annotations, probes left
    /// alone, the QoS class).
    Injected(Vec<String>),
    /// Left as it is, and why.
    Skipped(String),
}

/// Injects `template` (a Pod, or a workload's `spec.template`): `workload` names the workload
/// (the ConfigMap's default name comes from it) and `outer` holds the workload's own
/// annotations, which the template's override (None for a Pod).
pub fn inject(
    template: &mut Value,
    workload: Option<&str>,
    outer: Option<&Value>,
    settings: &Settings,
) -> Result<Done, Refusal> {
    let annotations = Annotations::read(
        &[outer, get(template, &["metadata", "annotations"])],
        get(template, &["metadata", "labels"]),
    )?;
    if !annotations.wants_injection()? {
        let (_, name) = annotations.get(Key::Inject).expect("an opt-out has a name");
        return Ok(Done::Skipped(format!("left as is ({name}: \"false\")")));
    }
    if get(template, &["spec", "hostNetwork"]).and_then(Value::as_bool) == Some(true) {
        return Ok(Done::Skipped(
            "left as is (hostNetwork: true; capturing would change the node's own traffic)".into(),
        ));
    }
    strip(template, annotations.status())?;
    let (mut sidecar, capture, mut notes) = decide(settings, &annotations, workload, template)?;
    notes.extend(annotations.ignored.iter().cloned());

    let spec = template.get_mut("spec").and_then(Value::as_mapping_mut).expect("check_template passed");
    let rewrite = annotations.flag(Key::RewriteProbes)?.unwrap_or(settings.rewrite_app_probers);
    if let (Some(port), true) = (sidecar.status_port, rewrite) {
        let captured = |p: u16| {
            !capture.exclude_inbound_ports.contains(&p)
                && match &capture.include_inbound_ports {
                    Selection::All => true,
                    Selection::Only(s) => s.contains(&p),
                }
        };
        let (json, probe_notes) = probes::rewrite(spec, &[sidecar.init_name(), PROXY_NAME], port, &captured);
        sidecar.probers = json;
        notes.extend(probe_notes);
    }
    let merge = annotations.flag(Key::MergeMetrics)?.unwrap_or(settings.merge_metrics);
    if let (Some(port), true) = (sidecar.status_port, merge) {
        let pod_annotations = mapping(mapping(template_map(template), "metadata"), "annotations");
        if let Some(json) = metrics::merge(pod_annotations, port) {
            sidecar.prometheus = json;
            sidecar.metrics_merged = true;
        }
    }
    apply(template, &sidecar);
    Ok(Done::Injected(notes))
}

/// `list` with `ports` in front (in that order), each once.
fn exclude_list(list: &str, ports: &[u16]) -> String {
    let mut out: Vec<String> = vec![];
    for p in ports {
        let p = p.to_string();
        if !list.split(',').any(|x| x.trim() == p) && !out.contains(&p) {
            out.push(p);
        }
    }
    if !list.trim().is_empty() {
        out.push(list.trim().to_string());
    }
    out.join(",")
}

/// The flags with the pod's annotations applied, validated as the init container will.
fn decide(
    settings: &Settings,
    annotations: &Annotations,
    workload: Option<&str>,
    template: &Value,
) -> Result<(Sidecar, CaptureConfig, Vec<String>), Refusal> {
    let bad = |name: &str, reason: String| Refusal::Annotation(BadAnnotation::new(name, reason));
    let mut notes = vec![];
    let mode = match annotations.get(Key::Mode).map(|(v, n)| (v.trim(), n)) {
        None => settings.mode,
        Some(("iptables", _)) => Mode::Iptables,
        Some(("ebpf", _)) => Mode::Ebpf,
        Some(("validation", _)) => Mode::Validation,
        Some((v, n)) => return Err(bad(n, format!("{v:?}: expected \"iptables\", \"ebpf\" or \"validation\""))),
    };
    let config_map = match (annotations.get(Key::ConfigMap), &settings.config_map, workload) {
        (Some((cm, n)), _, _) => check_name(cm).map_err(|r| bad(n, r))?,
        (None, Some(cm), _) => check_name(cm).map_err(|r| Refusal::Other(format!("--config-map: {r}")))?,
        (None, None, Some(name)) => check_name(&format!("{name}-mesh-proxy")).map_err(|r| {
            Refusal::Other(format!("the default ConfigMap name: {r}; set {} or --config-map", "mesh-init.io/configMap"))
        })?,
        (None, None, None) => {
            return Err(Refusal::Other(
                "the workload's name is unknown (no metadata.name, no owner), so the ConfigMap cannot be named after \
                 it; set mesh-init.io/configMap or --config-map"
                    .into(),
            ))
        }
    };

    // Ports of the proxy itself.
    let pc = &annotations.proxy_config;
    let status_port =
        match (annotations.number::<u16>(Key::StatusPort, "a port number, or 0 for none")?, pc.status_port) {
            (Some(p), _) => p,
            (None, Some(p)) => p,
            (None, None) => settings.status_port,
        };
    let status_port = (status_port != 0).then_some(status_port);
    if settings.readiness_port == settings.admin_port {
        return Err(Refusal::Other(format!(
            "--proxy-readiness-port: {} is also --proxy-admin-port; the readiness port must be its own (Istio's is 15021)",
            settings.readiness_port
        )));
    }
    if let Some(p) = status_port.filter(|p| [settings.readiness_port, settings.admin_port].contains(p)) {
        let from = annotations.get(Key::StatusPort).map_or("--proxy-status-port", |(_, n)| n);
        return Err(Refusal::Other(format!(
            "{from}: {p} is also the readiness or admin port; the status port must be its own (Istio's is 15020)"
        )));
    }

    let (mut capture, from) = annotations.apply_capture(&settings.capture);
    if let Some(m) = &pc.interception_mode {
        if !from.contains_key("--istio-inbound-interception-mode") {
            capture.inbound_interception_mode = m.clone();
        }
    }
    // The proxy's own ports are never captured inbound: readiness (the kubelet's probe must reach
    // it directly), admin (nothing arriving on the pod IP for it goes to the proxy, as Istio
    // excludes 15090) and status (the rewritten probes and the scraper).
    let mut own = vec![settings.readiness_port, settings.admin_port];
    own.extend(status_port);
    capture.inbound_ports_exclude = exclude_list(&capture.inbound_ports_exclude, &own);
    let blame = |flag: &str, reason: String| match from.get(flag) {
        Some(annotation) => bad(annotation, reason),
        None => Refusal::Other(format!("{flag}: {reason}")),
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
        return Err(Refusal::Other(
            "--proxy-uid: the sidecar runs as the first proxy UID, which must not be root (0)".into(),
        ));
    }

    // Native sidecar or classic, and holding the application back.
    let native = match annotations.flag(Key::NativeSidecar)? {
        Some(n) => n,
        None => match settings.native_sidecar {
            NativeSidecar::True => true,
            NativeSidecar::False => false,
            NativeSidecar::Auto => settings.kubernetes_version.is_some_and(|v| v >= MIN_NATIVE_SIDECAR),
        },
    };
    if let (true, Some(v)) = (native, settings.kubernetes_version) {
        if v < MIN_NATIVE_SIDECAR {
            let from = annotations.get(Key::NativeSidecar).map_or("--native-sidecar", |(_, n)| n);
            return Err(Refusal::Other(format!(
                "{from}: native sidecars need Kubernetes 1.{} or newer and --kubernetes-version is {}.{}",
                MIN_NATIVE_SIDECAR.1, v.0, v.1
            )));
        }
    }
    let hold = match (annotations.flag(Key::HoldApplication)?, pc.hold_application_until_proxy_starts) {
        (Some(h), _) => h,
        (None, Some(h)) => h,
        (None, None) => settings.hold_application_until_proxy_starts,
    };

    // Resources, keeping a Guaranteed pod Guaranteed.
    let value = |key: Key, flag: &str, given: &Option<String>, default: &str| match (annotations.get(key), given) {
        (Some((v, n)), _) => Value4 { value: v.to_string(), from: n.to_string(), explicit: true },
        (None, Some(v)) => Value4 { value: v.clone(), from: flag.to_string(), explicit: true },
        (None, None) => Value4 { value: default.to_string(), from: flag.to_string(), explicit: false },
    };
    let wanted = Wanted {
        cpu: value(Key::ProxyCpu, "--proxy-cpu", &settings.proxy_cpu, resources::DEFAULT_CPU),
        memory: value(Key::ProxyMemory, "--proxy-memory", &settings.proxy_memory, resources::DEFAULT_MEMORY),
        cpu_limit: value(
            Key::ProxyCpuLimit,
            "--proxy-cpu-limit",
            &settings.proxy_cpu_limit,
            resources::DEFAULT_CPU_LIMIT,
        ),
        memory_limit: value(
            Key::ProxyMemoryLimit,
            "--proxy-memory-limit",
            &settings.proxy_memory_limit,
            resources::DEFAULT_MEMORY_LIMIT,
        ),
    };
    let app: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|l| get(template, &["spec", l]).and_then(Value::as_sequence))
        .flatten()
        .collect();
    let (resources, note) = wanted.resolve(resources::is_guaranteed(app)).map_err(|b| {
        if b.from.starts_with("--") {
            Refusal::Other(format!("{}: {}", b.from, b.reason))
        } else {
            bad(&b.from, b.reason)
        }
    })?;
    notes.extend(note);

    let readiness = ReadinessTiming {
        initial_delay: annotations.number(Key::ReadinessInitialDelay, "a number of seconds")?.unwrap_or(0),
        period: annotations.number(Key::ReadinessPeriod, "a number of seconds")?.unwrap_or(15),
        failure_threshold: annotations.number(Key::ReadinessFailureThreshold, "a count")?.unwrap_or(4),
    };
    for (v, key) in
        [(readiness.period, Key::ReadinessPeriod), (readiness.failure_threshold, Key::ReadinessFailureThreshold)]
    {
        if v == 0 {
            let (_, n) = annotations.get(key).expect("only an annotation gives 0");
            return Err(bad(n, "must be at least 1".into()));
        }
    }
    let discovery_address = match &pc.discovery_address {
        Some(address) => {
            let (_, name) = annotations.get(Key::ProxyConfig).expect("a ProxyConfig field comes from its annotation");
            super::check_discovery_address(address).map_err(|r| bad(name, format!("discoveryAddress: {r}")))?;
            Some(address.clone())
        }
        None => settings.discovery_address.clone(),
    };
    let proxy_image = match annotations.get(Key::ProxyImage) {
        Some((image, _)) => image.trim().to_string(),
        None => settings.proxy_image(),
    };
    Ok((
        Sidecar {
            mode,
            init_image: settings.init_image(),
            proxy_image,
            readiness_port: settings.readiness_port,
            readiness,
            status_port,
            config_map,
            native,
            hold,
            capture_flags: containers::render_flags(&capture),
            proxy_uid,
            proxy_gid,
            resources,
            workers: pc.concurrency.filter(|&n| n > 0),
            discovery_address,
            probers: None,
            prometheus: None,
            metrics_merged: false,
            // What the init container is told (`render_flags`), not what this machine's
            // resolv.conf would make of it: the pod's has nameservers even where the injector's has none.
            dns_capture: capture.redirect_dns,
            tproxy_mark: (config.inbound_mode == InboundMode::Tproxy).then_some(config.tproxy_mark),
        },
        config,
        notes,
    ))
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

/// Removes what a previous injection added (as its status annotation lists it) and puts back
/// what it changed (probes, scrape annotations); or, when there was none, refuses a pod that
/// already uses the injector's names.
fn strip(template: &mut Value, previous: Option<&str>) -> Result<(), Refusal> {
    let spec = template.get_mut("spec").and_then(Value::as_mapping_mut).expect("check_template passed");
    let Some(previous) = previous else {
        let owned = [INIT_NAME, VALIDATION_NAME, PROXY_NAME, CONFIG_VOLUME, CGROUP_VOLUME, BPFFS_VOLUME];
        for list in ["initContainers", "containers", "volumes"] {
            if let Some(name) = names(spec, list).into_iter().find(|n| owned.contains(&n.as_str())) {
                return Err(Refusal::Other(format!(
                    "spec.{list} already has {name:?} but there is no {STATUS} annotation: it was not added by \
                     `mesh-init inject`; rename it, or remove it to inject"
                )));
            }
        }
        return Ok(());
    };
    let status: Status = serde_json::from_str(previous).map_err(|e| {
        Refusal::Annotation(BadAnnotation::new(
            STATUS,
            format!("{previous:?} is not what `mesh-init inject` writes ({e})"),
        ))
    })?;
    let env = proxy_env(spec);
    if let Some(json) = env.get(probes::PROBERS_ENV) {
        probes::restore(spec, json).map_err(Refusal::Other)?;
    }
    for (list, gone) in
        [("initContainers", &status.init_containers), ("containers", &status.containers), ("volumes", &status.volumes)]
    {
        if let Some(Value::Sequence(items)) = spec.get_mut(list) {
            items.retain(|item| !item.get("name").and_then(Value::as_str).is_some_and(|n| gone.iter().any(|g| g == n)));
            if items.is_empty() && list != "containers" {
                spec.shift_remove(list);
            }
        }
    }
    if let Some(Value::Mapping(metadata)) = template.get_mut("metadata") {
        if let Some(Value::Mapping(annotations)) = metadata.get_mut("annotations") {
            if status.metrics_merged {
                metrics::restore(annotations, env.get(metrics::PROMETHEUS_ENV).map(String::as_str))
                    .map_err(Refusal::Other)?;
            }
            annotations.shift_remove(STATUS);
            if annotations.is_empty() {
                metadata.shift_remove("annotations");
            }
        }
    }
    Ok(())
}

/// The previous sidecar's literal environment variables, by name.
fn proxy_env(spec: &Mapping) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for list in ["initContainers", "containers"] {
        let Some(Value::Sequence(items)) = spec.get(list) else { continue };
        for c in items.iter().filter(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_NAME)) {
            for e in c.get("env").and_then(Value::as_sequence).into_iter().flatten() {
                if let (Some(n), Some(v)) =
                    (e.get("name").and_then(Value::as_str), e.get("value").and_then(Value::as_str))
                {
                    out.insert(n.to_string(), v.to_string());
                }
            }
        }
    }
    out
}

fn names(spec: &Mapping, list: &str) -> Vec<String> {
    match spec.get(list) {
        Some(Value::Sequence(items)) => {
            items.iter().filter_map(|i| i.get("name").and_then(Value::as_str)).map(str::to_string).collect()
        }
        _ => vec![],
    }
}

/// Adds the sidecar to a template that has none. The classic sidecar's init container runs after
/// the application's (which therefore run uncaptured, as they did before the mesh); a native
/// sidecar and its init container run first, so later init containers already have the proxy.
/// A held classic sidecar is the first container, so the kubelet runs its postStart hook (which
/// waits for the proxy) before it starts the application's.
fn apply(template: &mut Value, sidecar: &Sidecar) {
    let init = to_value(&sidecar.init_container());
    let proxy = to_value(&sidecar.proxy_container());
    let spec = template.get_mut("spec").and_then(Value::as_mapping_mut).expect("check_template passed");
    if !spec.contains_key("initContainers") {
        // Where a reader looks for it: just before `containers`.
        let rest = std::mem::take(spec);
        for (k, v) in rest {
            if k.as_str() == Some("containers") {
                spec.insert("initContainers".into(), Value::Sequence(vec![]));
            }
            spec.insert(k, v);
        }
    }
    if sidecar.native {
        sequence(spec, "initContainers").splice(0..0, [init, proxy]);
    } else {
        sequence(spec, "initContainers").push(init);
        if sidecar.hold {
            sequence(spec, "containers").insert(0, proxy);
        } else {
            sequence(spec, "containers").push(proxy);
        }
    }
    sequence(spec, "volumes").extend(sidecar.volumes().iter().map(to_value));

    let status = serde_json::to_string(&sidecar.status()).expect("the status serialises");
    mapping(mapping(template_map(template), "metadata"), "annotations").insert(STATUS.into(), status.into());
}

/// The template as a mapping, with `metadata` placed before `spec` when it has to be created.
fn template_map(template: &mut Value) -> &mut Mapping {
    let template = template.as_mapping_mut().expect("check_template passed");
    if !matches!(template.get("metadata"), Some(Value::Mapping(_))) {
        let rest = std::mem::take(template);
        template.insert("metadata".into(), Value::Mapping(Mapping::new()));
        template.extend(rest.into_iter().filter(|(k, _)| k.as_str() != Some("metadata")));
    }
    template
}

/// The sequence under `key`, created (at the end) when absent or not a sequence.
fn sequence<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Vec<Value> {
    let slot = map.entry(key.into()).or_insert(Value::Null);
    if !slot.is_sequence() {
        *slot = Value::Sequence(vec![]);
    }
    slot.as_sequence_mut().expect("made a sequence above")
}

/// The mapping under `key`, created (at the end) when absent or not a mapping.
fn mapping<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    let slot = map.entry(key.into()).or_insert(Value::Null);
    if !slot.is_mapping() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut().expect("made a mapping above")
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_yaml::to_value(v).expect("the injected types serialise")
}
