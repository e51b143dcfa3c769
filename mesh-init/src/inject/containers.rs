//! What is added to a pod, as plain data: the init container, the sidecar, their volumes and the
//! status annotation. [`Sidecar`] is decided once per pod (flags and annotations already merged
//! and validated); `pod` puts its parts into the pod template.
//!
//! The types below are the few Kubernetes fields the injector writes, serialised with the API's
//! camelCase names; they are not a Kubernetes client model.

use serde::{Deserialize, Serialize};

use super::{metrics, probes, resources::Resources, Mode};
use crate::capture::CaptureArgs;

/// Container, volume and port names the injector owns. A pod that already has one of them
/// without the status annotation is refused rather than merged.
pub const INIT_NAME: &str = "mesh-init";
pub const VALIDATION_NAME: &str = "mesh-validation";
pub const PROXY_NAME: &str = "mesh-proxy";
pub const CONFIG_VOLUME: &str = "mesh-proxy-config";
pub const CGROUP_VOLUME: &str = "mesh-host-cgroup";
pub const BPFFS_VOLUME: &str = "mesh-host-bpffs";
const READINESS_PORT_NAME: &str = "mesh-ready";

/// Where the sidecar reads its config (the ConfigMap's `config.yaml` key).
pub const CONFIG_DIR: &str = "/etc/mesh-proxy";
/// Where the eBPF-mode init container sees the node's cgroup2 tree and bpffs. Not under /sys:
/// container runtimes' default AppArmor profile denies writes below /sys/fs/ except cgroup.
pub const HOST_CGROUP: &str = "/host/sys/fs/cgroup";
pub const HOST_BPFFS: &str = "/host/sys/fs/bpf";
/// mesh-proxy's binary in its image.
pub const PROXY_BINARY: &str = "/usr/local/bin/mesh-proxy";
/// The variable through which mesh-proxy learns where to serve the status port (application
/// probes, merged metrics): mesh-proxy's `--status-address`.
pub const STATUS_ADDRESS_ENV: &str = "MESH_PROXY_STATUS_ADDRESS";
/// mesh-proxy's `--discovery-address`: mesh-pilot's `host:port`.
pub const DISCOVERY_ADDRESS_ENV: &str = "MESH_PROXY_DISCOVERY_ADDRESS";

/// Finds the pod's own cgroup in the node's tree from the pod UID (the downward API's
/// `metadata.uid`), then runs `mesh-init ebpf` on it with the capture flags ("$@"). The name is
/// `pod<uid>` with the cgroupfs driver and `kubepods[-<qos>]-pod<uid with _>.slice` with the
/// systemd driver; the depth varies with the QoS class and the kubelet's cgroup root.
const EBPF_SCRIPT: &str = r#"set -eu
u=$(printf %s "$POD_UID" | tr - _)
cg=$(find /host/sys/fs/cgroup -maxdepth 6 -type d \( -name "pod$POD_UID" -o -name "*-pod$u.slice" \) -print -quit)
if [ -z "$cg" ]; then echo "mesh-init: no cgroup for pod $POD_UID under /host/sys/fs/cgroup" >&2; exit 1; fi
exec mesh-init ebpf --cgroup "$cg" --bpffs /host/sys/fs/bpf "$@"
"#;

/// When and how often the kubelet asks the sidecar whether it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadinessTiming {
    pub initial_delay: u32,
    pub period: u32,
    pub failure_threshold: u32,
}

/// Everything injected into one workload.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub mode: Mode,
    pub init_image: String,
    pub proxy_image: String,
    /// mesh-proxy's readiness port: the readiness and startup probes' target, never captured.
    pub readiness_port: u16,
    pub readiness: ReadinessTiming,
    /// mesh-proxy's status port (application probes, merged metrics); None when turned off.
    pub status_port: Option<u16>,
    pub config_map: String,
    /// The sidecar as an init container with `restartPolicy: Always` (Kubernetes 1.29+), which
    /// starts, and passes its startup probe, before anything after it starts.
    pub native: bool,
    /// Classic sidecar only: first among the containers, with a postStart hook that returns when
    /// the proxy is ready; the kubelet starts the next container only then.
    pub hold: bool,
    /// The validated capture flags, as the init container's arguments.
    pub capture_flags: Vec<String>,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub resources: Resources,
    /// mesh-proxy's `--workers` (Istio's `concurrency`).
    pub workers: Option<u16>,
    /// mesh-pilot's `host:port`, where the proxy takes its config from.
    pub discovery_address: Option<String>,
    /// [`probes::PROBERS_ENV`]: the application's original probes.
    pub probers: Option<String>,
    /// [`metrics::PROMETHEUS_ENV`]: the application's own scrape annotations.
    pub prometheus: Option<String>,
    /// Whether the pod's scrape annotations were pointed at the status port.
    pub metrics_merged: bool,
    /// The capture redirects the pod's DNS (`--redirect-dns`): the proxy must answer it
    /// (`MESH_PROXY_DNS_CAPTURE`, as Istio sets `ISTIO_META_DNS_CAPTURE` on its proxy).
    pub dns_capture: bool,
    /// Inbound is TPROXY'd (`-m TPROXY`) with this mark (`-t`): the proxy is told so
    /// (`MESH_PROXY_INBOUND_TPROXY_MARK`, its listeners become transparent) and needs
    /// `CAP_NET_ADMIN` for its transparent listener and hand-off.
    pub tproxy_mark: Option<u32>,
}

/// The status annotation's value: what was added, by name, and what was changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Status {
    pub init_containers: Vec<String>,
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
    /// The pod's `prometheus.io/*` annotations were pointed at the status port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics_merged: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<&'static str>,
    pub security_context: SecurityContext,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    pub field_ref: FieldRef,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldRef {
    pub field_path: &'static str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: &'static str,
    pub container_port: u16,
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub http_get: HttpGet,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<u32>,
    pub period_seconds: u32,
    pub timeout_seconds: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpGet {
    pub path: &'static str,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub post_start: ExecHandler,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExecHandler {
    pub exec: Exec,
}

#[derive(Debug, Clone, Serialize)]
pub struct Exec {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    pub allow_privilege_escalation: bool,
    pub capabilities: Capabilities,
    pub privileged: bool,
    pub read_only_root_filesystem: bool,
    pub run_as_group: u32,
    pub run_as_non_root: bool,
    pub run_as_user: u32,
    /// The runtime's default filter: what Pod Security's restricted level asks for. Not on the
    /// eBPF init container, whose bpf() and perf_event_open() some runtimes' defaults refuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seccomp_profile: Option<SeccompProfile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeccompProfile {
    #[serde(rename = "type")]
    pub kind: &'static str,
}

const RUNTIME_DEFAULT: Option<SeccompProfile> = Some(SeccompProfile { kind: "RuntimeDefault" });

/// mesh-proxy's `--dns-capture` as an environment variable.
const DNS_CAPTURE_ENV: &str = "MESH_PROXY_DNS_CAPTURE";
/// mesh-proxy's `--inbound-tproxy-mark` as an environment variable.
const TPROXY_MARK_ENV: &str = "MESH_PROXY_INBOUND_TPROXY_MARK";

#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<&'static str>,
    pub drop: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: &'static str,
    pub mount_path: &'static str,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPath>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigMapSource {
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostPath {
    pub path: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl Sidecar {
    /// The init container's name in this mode.
    pub fn init_name(&self) -> &'static str {
        if self.mode == Mode::Validation {
            VALIDATION_NAME
        } else {
            INIT_NAME
        }
    }

    /// Runs `mesh-init iptables` or `mesh-init ebpf` with the capture flags, as root with only
    /// the capabilities that mode needs; or, when the rules are installed by the node,
    /// `mesh-init iptables --run-validation --skip-rule-apply` (Istio's istio-validation) as the
    /// proxy's user with none.
    pub fn init_container(&self) -> Container {
        let (command, args, env, mounts, add) = match self.mode {
            // NET_RAW: iptables opens a raw socket to talk to the kernel's xtables.
            Mode::Iptables => {
                let mut args = vec!["iptables".to_string()];
                args.extend(self.capture_flags.iter().cloned());
                (vec![], args, vec![], vec![], vec!["NET_ADMIN", "NET_RAW"])
            }
            // BPF: load programs and maps; NET_ADMIN: the program types are networking ones and
            // are attached to a cgroup and a network namespace; PERFMON: lets the verifier accept
            // the pointer handling it accepts for root (see deploy/README.md).
            Mode::Ebpf => (
                vec!["/bin/sh".into(), "-c".into(), EBPF_SCRIPT.into(), "mesh-init".into()],
                self.capture_flags.clone(),
                vec![EnvVar {
                    name: "POD_UID",
                    value: None,
                    value_from: Some(EnvVarSource { field_ref: FieldRef { field_path: "metadata.uid" } }),
                }],
                vec![
                    VolumeMount { name: CGROUP_VOLUME, mount_path: HOST_CGROUP, read_only: true },
                    VolumeMount { name: BPFFS_VOLUME, mount_path: HOST_BPFFS, read_only: false },
                ],
                vec!["BPF", "NET_ADMIN", "PERFMON"],
            ),
            // istio-validation's arguments: the rules' flags, then check without installing.
            Mode::Validation => {
                let mut args = vec!["iptables".to_string()];
                args.extend(self.capture_flags.iter().cloned());
                args.extend(["--run-validation".to_string(), "--skip-rule-apply".to_string()]);
                (vec![], args, vec![], vec![], vec![])
            }
        };
        let security_context = if self.mode == Mode::Validation {
            // Istio CNI's istio-validation: the proxy's user, nothing added, read-only: what Pod
            // Security's baseline and restricted levels admit.
            self.unprivileged()
        } else {
            SecurityContext {
                allow_privilege_escalation: false,
                capabilities: Capabilities { add, drop: vec!["ALL"] },
                privileged: false,
                // iptables-legacy takes /run/xtables.lock.
                read_only_root_filesystem: false,
                run_as_group: 0,
                run_as_non_root: false,
                run_as_user: 0,
                seccomp_profile: if self.mode == Mode::Iptables { RUNTIME_DEFAULT } else { None },
            }
        };
        Container {
            name: self.init_name().into(),
            image: self.init_image.clone(),
            command,
            args,
            env,
            ports: vec![],
            resources: self.resources.clone(),
            lifecycle: None,
            readiness_probe: None,
            startup_probe: None,
            restart_policy: None,
            security_context,
            volume_mounts: mounts,
        }
    }

    /// The proxy's user and group, no capabilities, read-only root, the runtime's seccomp filter.
    fn unprivileged(&self) -> SecurityContext {
        SecurityContext {
            allow_privilege_escalation: false,
            capabilities: Capabilities { add: vec![], drop: vec!["ALL"] },
            privileged: false,
            read_only_root_filesystem: true,
            run_as_group: self.proxy_gid,
            run_as_non_root: true,
            run_as_user: self.proxy_uid,
            seccomp_profile: RUNTIME_DEFAULT,
        }
    }

    /// The sidecar's security context in TPROXY mode, as Istio's injector writes it: user 0 with
    /// the proxy's group and `NET_ADMIN` alone. Kubernetes gives a non-root container no
    /// capability it could use (no ambient capabilities), and user 0 is also what keeps the
    /// transparent hand-off to the application out of the rules' redirect of the proxy UID's
    /// connections to the pod (with user 1337 the hand-off comes back to the proxy); the rules
    /// exempt the proxy's outbound traffic by its group.
    fn tproxy_context(&self) -> SecurityContext {
        SecurityContext {
            capabilities: Capabilities { add: vec!["NET_ADMIN"], drop: vec!["ALL"] },
            run_as_non_root: false,
            run_as_user: 0,
            ..self.unprivileged()
        }
    }

    /// mesh-proxy as the UID the capture exempts, with no capabilities (in TPROXY mode, see
    /// [`Self::tproxy_context`]).
    pub fn proxy_container(&self) -> Container {
        let mut args = vec!["--config".into(), format!("{CONFIG_DIR}/config.yaml")];
        if let Some(workers) = self.workers {
            args.extend(["--workers".into(), workers.to_string()]);
        }
        let mut env = vec![];
        if self.dns_capture {
            env.push(EnvVar { name: DNS_CAPTURE_ENV, value: Some("true".into()), value_from: None });
        }
        if let Some(mark) = self.tproxy_mark {
            env.push(EnvVar { name: TPROXY_MARK_ENV, value: Some(mark.to_string()), value_from: None });
        }
        if let Some(port) = self.status_port {
            env.push(EnvVar { name: STATUS_ADDRESS_ENV, value: Some(format!("0.0.0.0:{port}")), value_from: None });
            // Where the application's probes go, as the kubelet's would (Istio's variable).
            env.push(EnvVar {
                name: "INSTANCE_IP",
                value: None,
                value_from: Some(EnvVarSource { field_ref: FieldRef { field_path: "status.podIP" } }),
            });
        }
        if let Some(address) = &self.discovery_address {
            env.push(EnvVar { name: DISCOVERY_ADDRESS_ENV, value: Some(address.clone()), value_from: None });
            // The namespace is the discovery scope; the name identifies the proxy to mesh-pilot.
            for (name, field_path) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
                env.push(EnvVar {
                    name,
                    value: None,
                    value_from: Some(EnvVarSource { field_ref: FieldRef { field_path } }),
                });
            }
        }
        for (name, value) in [(probes::PROBERS_ENV, &self.probers), (metrics::PROMETHEUS_ENV, &self.prometheus)] {
            if let Some(value) = value {
                env.push(EnvVar { name, value: Some(value.clone()), value_from: None });
            }
        }
        let ready = |initial_delay, period, timeout, failure_threshold| Probe {
            http_get: HttpGet { path: "/ready", port: self.readiness_port },
            initial_delay_seconds: initial_delay,
            period_seconds: period,
            timeout_seconds: timeout,
            failure_threshold,
        };
        let r = self.readiness;
        Container {
            name: PROXY_NAME.into(),
            image: self.proxy_image.clone(),
            command: vec![],
            args,
            env,
            // The admin port is not declared: the admin API stays on loopback.
            ports: vec![ContainerPort {
                name: READINESS_PORT_NAME,
                container_port: self.readiness_port,
                protocol: "TCP",
            }],
            resources: self.resources.clone(),
            // The kubelet runs a postStart hook to its end before it starts the next container.
            lifecycle: (self.hold && !self.native).then(|| Lifecycle {
                post_start: ExecHandler {
                    exec: Exec {
                        command: vec![
                            PROXY_BINARY.into(),
                            "wait".into(),
                            "--readiness-port".into(),
                            self.readiness_port.to_string(),
                        ],
                    },
                },
            }),
            // The kubelet probes the pod IP, so the config binds the readiness port (which serves
            // `GET /ready` alone) to 0.0.0.0; see deploy/README.md. Istio's timings: readiness
            // every 15 s once started; the startup probe every second until the proxy is ready
            // (10 minutes at most), which for a native sidecar is what holds the application back.
            readiness_probe: Some(ready(
                (r.initial_delay > 0).then_some(r.initial_delay),
                r.period,
                3,
                r.failure_threshold,
            )),
            startup_probe: Some(ready(None, 1, 3, 600)),
            restart_policy: self.native.then_some("Always"),
            security_context: if self.tproxy_mark.is_some() { self.tproxy_context() } else { self.unprivileged() },
            volume_mounts: vec![VolumeMount { name: CONFIG_VOLUME, mount_path: CONFIG_DIR, read_only: true }],
        }
    }

    pub fn volumes(&self) -> Vec<Volume> {
        let mut v = vec![Volume {
            name: CONFIG_VOLUME,
            config_map: Some(ConfigMapSource { name: self.config_map.clone() }),
            host_path: None,
        }];
        if self.mode == Mode::Ebpf {
            v.push(Volume {
                name: CGROUP_VOLUME,
                config_map: None,
                host_path: Some(HostPath { path: "/sys/fs/cgroup", kind: "Directory" }),
            });
            v.push(Volume {
                name: BPFFS_VOLUME,
                config_map: None,
                host_path: Some(HostPath { path: "/sys/fs/bpf", kind: "Directory" }),
            });
        }
        v
    }

    pub fn status(&self) -> Status {
        let init = self.init_name().to_string();
        let (init, containers) =
            if self.native { (vec![init, PROXY_NAME.into()], vec![]) } else { (vec![init], vec![PROXY_NAME.into()]) };
        Status {
            init_containers: init,
            containers,
            volumes: self.volumes().iter().map(|v| v.name.to_string()).collect(),
            metrics_merged: self.metrics_merged,
        }
    }
}

/// The capture flags in the form istio-iptables' injector writes them (short letters), leaving
/// out those at `mesh-init iptables`' own defaults (istio-iptables'). `-z` is always written:
/// the injector's default is "same as -p", mesh-init iptables' is 15006. `args` has been validated.
pub fn render_flags(args: &CaptureArgs) -> Vec<String> {
    let mut out = vec!["-p".to_string(), args.envoy_port.trim().to_string()];
    let inbound = args.inbound_capture_port.as_deref().filter(|z| !z.trim().is_empty()).unwrap_or(&args.envoy_port);
    out.extend(["-z".to_string(), inbound.trim().to_string()]);
    let flags: [(&str, &str, &str); 17] = [
        ("-e", &args.inbound_tunnel_port, "15008"),
        ("-u", args.proxy_uid.as_deref().unwrap_or(""), ""),
        ("-g", args.proxy_gid.as_deref().unwrap_or(""), ""),
        ("-i", &args.service_cidr, ""),
        ("-x", &args.service_exclude_cidr, ""),
        ("-q", &args.outbound_ports, ""),
        ("-o", &args.outbound_ports_exclude, ""),
        ("-b", &args.inbound_ports, ""),
        ("-d", &args.inbound_ports_exclude, ""),
        ("-c", &args.exclude_interfaces, ""),
        ("-k", &args.kube_virt_interfaces, ""),
        ("-m", &args.inbound_interception_mode, "REDIRECT"),
        ("-t", &args.tproxy_mark, "1337"),
        ("-r", &args.tproxy_route_table, "133"),
        ("--outbound-owner-groups", &args.outbound_owner_groups, "*"),
        ("--outbound-owner-groups-exclude", &args.outbound_owner_groups_exclude, ""),
        ("--outbound-ipv4-loopback-cidr", &args.ipv4_loopback_cidr, "127.0.0.1/32"),
    ];
    for (flag, value, default) in flags {
        if !value.trim().eq_ignore_ascii_case(default) {
            out.extend([flag.to_string(), value.trim().to_string()]);
        }
    }
    if args.redirect_dns {
        out.extend(["--redirect-dns".to_string(), "--dns-port".to_string(), args.dns_port.trim().to_string()]);
    }
    for (flag, on) in [("--capture-all-dns", args.capture_all_dns), ("--drop-invalid", args.drop_invalid)] {
        if on {
            out.push(flag.to_string());
        }
    }
    out
}
