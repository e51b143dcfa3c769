//! What is added to a pod, as plain data: the init container, the sidecar, their volumes and the
//! status annotation. [`Sidecar`] is decided once per workload (flags and annotations already
//! merged and validated); `workload` puts its parts into the pod template.
//!
//! The types below are the few Kubernetes fields the injector writes, serialised with the API's
//! camelCase names; they are not a Kubernetes client model.

use serde::{Deserialize, Serialize};

use super::Mode;
use crate::capture::CaptureArgs;

/// Container, volume and port names the injector owns. A pod that already has one of them
/// without the status annotation is refused rather than merged.
pub const INIT_NAME: &str = "mesh-init";
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

/// Everything injected into one workload.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub mode: Mode,
    pub init_image: String,
    pub proxy_image: String,
    /// mesh-proxy's readiness port: the readiness probe's target, so it is never captured inbound.
    pub readiness_port: u16,
    pub config_map: String,
    /// The sidecar as an init container with `restartPolicy: Always` (Kubernetes 1.29+), which
    /// starts before the application and lets a Job finish.
    pub native: bool,
    /// The validated capture flags, as the init container's arguments.
    pub capture_flags: Vec<String>,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
}

/// The status annotation's value: what was added, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Status {
    pub init_containers: Vec<String>,
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
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
    pub value_from: EnvVarSource,
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
    pub period_seconds: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpGet {
    pub path: &'static str,
    pub port: u16,
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
}

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
    /// Runs `mesh-init iptables` or `mesh-init ebpf` with the capture flags, as root with only
    /// the capabilities that mode needs.
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
                    value_from: EnvVarSource { field_ref: FieldRef { field_path: "metadata.uid" } },
                }],
                vec![
                    VolumeMount { name: CGROUP_VOLUME, mount_path: HOST_CGROUP, read_only: true },
                    VolumeMount { name: BPFFS_VOLUME, mount_path: HOST_BPFFS, read_only: false },
                ],
                vec!["BPF", "NET_ADMIN", "PERFMON"],
            ),
        };
        Container {
            name: INIT_NAME.into(),
            image: self.init_image.clone(),
            command,
            args,
            env,
            ports: vec![],
            readiness_probe: None,
            restart_policy: None,
            security_context: SecurityContext {
                allow_privilege_escalation: false,
                capabilities: Capabilities { add, drop: vec!["ALL"] },
                privileged: false,
                // iptables-legacy takes /run/xtables.lock.
                read_only_root_filesystem: false,
                run_as_group: 0,
                run_as_non_root: false,
                run_as_user: 0,
            },
            volume_mounts: mounts,
        }
    }

    /// mesh-proxy as the UID the capture exempts, with no capabilities.
    pub fn proxy_container(&self) -> Container {
        Container {
            name: PROXY_NAME.into(),
            image: self.proxy_image.clone(),
            command: vec![],
            args: vec!["--config".into(), format!("{CONFIG_DIR}/config.yaml")],
            env: vec![],
            // The admin port is not declared: the admin API stays on loopback.
            ports: vec![ContainerPort {
                name: READINESS_PORT_NAME,
                container_port: self.readiness_port,
                protocol: "TCP",
            }],
            // The kubelet probes the pod IP, so the config binds the readiness port (which serves
            // `GET /ready` alone) to 0.0.0.0; see deploy/README.md.
            readiness_probe: Some(Probe {
                http_get: HttpGet { path: "/ready", port: self.readiness_port },
                period_seconds: 2,
                failure_threshold: 30,
            }),
            restart_policy: self.native.then_some("Always"),
            security_context: SecurityContext {
                allow_privilege_escalation: false,
                capabilities: Capabilities { add: vec![], drop: vec!["ALL"] },
                privileged: false,
                read_only_root_filesystem: true,
                run_as_group: self.proxy_gid,
                run_as_non_root: true,
                run_as_user: self.proxy_uid,
            },
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
        let (init, containers) = if self.native {
            (vec![INIT_NAME.into(), PROXY_NAME.into()], vec![])
        } else {
            (vec![INIT_NAME.into()], vec![PROXY_NAME.into()])
        };
        Status {
            init_containers: init,
            containers,
            volumes: self.volumes().iter().map(|v| v.name.to_string()).collect(),
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
