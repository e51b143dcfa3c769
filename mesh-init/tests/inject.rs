//! `mesh-init inject` against golden files, and every output (goldens and deploy/) against the
//! Kubernetes schema.
//!
//! Each `testdata/inject/<case>.yaml` is injected with the flags of its `# args:` line and must
//! give `<case>.golden.yaml` (`UPDATE_GOLDEN=1` rewrites them; review the diff). Every golden, and
//! every manifest under deploy/, must come back unchanged from a second injection and pass
//! `kubernetes-validate --strict` (PyPI `kubernetes-validate`, which ships the schemas, so this
//! runs offline). Without that tool the schema check is skipped with a message, except when `CI`
//! is set: there it fails. Each `testdata/inject/errors/<case>.yaml` must be refused with the
//! message of its `# expect:` line.
//!
//! The goldens, the error messages and the notes are checked through the binary (`mesh-init
//! inject -f FILE`, and `-f -` on stdin); the structural properties (idempotence, re-injection,
//! passthrough) through the library, which is what the binary calls.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser;
use mesh_init::inject::{self, InjectArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: InjectArgs,
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/inject")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the crate is in the workspace").to_path_buf()
}

/// The value of a `# key: value` header line, if the file has one.
fn header<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(&format!("# {key}:")).map(str::trim))
}

/// Inject flags from a `# args:` line (split on whitespace: no quoting needed so far).
fn args_of(text: &str) -> InjectArgs {
    let mut argv = vec!["inject"];
    argv.extend(header(text, "args").unwrap_or_default().split_whitespace());
    Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).args
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable directory").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn cases() -> Vec<PathBuf> {
    yaml_files(&testdata()).into_iter().filter(|p| !p.to_string_lossy().ends_with(".golden.yaml")).collect()
}

fn golden_of(input: &Path) -> PathBuf {
    input.with_extension("golden.yaml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `mesh-init inject -f FILE` with the flags of the file's `# args:` line.
fn run_binary(input: &Path) -> std::process::Output {
    let text = read(input);
    Command::new(env!("CARGO_BIN_EXE_mesh-init"))
        .arg("inject")
        .arg("-f")
        .arg(input)
        .args(header(&text, "args").unwrap_or_default().split_whitespace())
        .output()
        .expect("mesh-init runs")
}

fn run(text: &str, origin: &str, args: &InjectArgs) -> inject::Outcome {
    inject::inject(text, origin, &args.settings).unwrap_or_else(|e| panic!("{origin}: {e}"))
}

#[test]
fn goldens() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = vec![];
    for input in cases() {
        let out = run_binary(&input);
        assert!(out.status.success(), "{}: {}", input.display(), String::from_utf8_lossy(&out.stderr));
        let yaml = String::from_utf8(out.stdout).expect("UTF-8 output");
        let golden = golden_of(&input);
        if update {
            std::fs::write(&golden, &yaml).unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if yaml != want {
            failed.push(format!(
                "{} differs from {} (UPDATE_GOLDEN=1 rewrites it):\n{yaml}",
                input.display(),
                golden.display()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[test]
fn injecting_twice_is_injecting_once() {
    for input in cases() {
        let text = read(&input);
        let args = args_of(&text);
        let once = run(&text, "once", &args).yaml;
        let twice = run(&once, "twice", &args).yaml;
        assert_eq!(twice, once, "{}", input.display());
    }
}

#[test]
fn other_kinds_pass_through_byte_for_byte() {
    let input = testdata().join("passthrough.yaml");
    let text = read(&input);
    assert_eq!(run(&text, "passthrough", &args_of(&text)).yaml, text);
    // In a mixed file, the documents around the workload are kept as written, comments included.
    let text = read(&testdata().join("deployment.yaml"));
    let out = run(&text, "deployment", &args_of(&text)).yaml;
    let service = text.split("---\n").next().unwrap();
    let config_map = text.rsplit("---\n").next().unwrap();
    assert!(out.starts_with(service), "{out}");
    assert!(out.ends_with(config_map), "{out}");
}

#[test]
fn opted_out_and_host_network_workloads_are_left_alone_with_a_note() {
    let input = testdata().join("opt-out.yaml");
    let out = run_binary(&input);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), read(&input));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let notes: Vec<&str> = stderr.lines().collect();
    assert_eq!(notes.len(), 3, "{stderr}");
    assert!(notes[0].contains("Deployment ingress-gateway: left as is (mesh-init.io/inject: \"false\")"), "{stderr}");
    assert!(notes[1].contains("DaemonSet node-exporter: left as is (hostNetwork: true"), "{stderr}");
    assert!(notes[2].contains("Pod debug: left as is (sidecar.istio.io/inject: \"false\")"), "{stderr}");
}

#[test]
fn standard_input_is_read_with_dash() {
    let input = testdata().join("deployment.yaml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-init"))
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mesh-init runs");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), read(&input).as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), read(&golden_of(&input)));
}

#[test]
fn reinjecting_with_other_flags_replaces_the_previous_injection() {
    let text = read(&testdata().join("deployment.yaml"));
    let first = run(&text, "first", &args_of(&text)).yaml;
    let mut args = args_of(&text);
    args.settings.capture.envoy_port = "15001".into();
    let second = run(&first, "second", &args).yaml;
    assert_eq!(second, run(&text, "direct", &args).yaml);
    assert_eq!(second.matches("name: mesh-proxy\n").count(), 1, "{second}");
}

#[test]
fn bad_input_is_refused_naming_document_line_and_annotation() {
    let mut failed = vec![];
    for input in yaml_files(&testdata().join("errors")) {
        let text = read(&input);
        let expect = header(&text, "expect").unwrap_or_else(|| panic!("{}: no `# expect:` line", input.display()));
        // Messages start with the file name as given; the expectations use the bare name.
        let out = run_binary(&input);
        let stderr =
            String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", input.parent().unwrap().display()), "");
        if out.status.success() {
            failed.push(format!("{}: accepted:\n{}", input.display(), String::from_utf8_lossy(&out.stdout)));
        } else if !stderr.contains(expect) || !out.stdout.is_empty() {
            failed.push(format!(
                "{}: error {stderr:?} does not contain {expect:?} (or stdout was written)",
                input.display()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn bad_flags_are_refused_before_reading() {
    let mut args = args_of("");
    args.settings.capture.service_exclude_cidr = "10.0.0.0/33".into();
    let e = inject::inject("", "-", &args.settings).unwrap_err().to_string();
    assert!(e.contains("--istio-service-exclude-cidr"), "{e}");
    let mut args = args_of("");
    args.settings.discovery_address = Some("http://mesh-pilot:15010".into());
    let e = inject::inject("", "-", &args.settings).unwrap_err().to_string();
    assert_eq!(
        e,
        "--discovery-address: \"http://mesh-pilot:15010\": expected host:port, e.g. mesh-pilot.mesh-system:15010"
    );
}

/// The deploy/ examples are the injector's own output: injecting them again changes nothing.
/// `UPDATE_GOLDEN=1` injects them in place.
#[test]
fn deploy_manifests_are_current() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for path in deploy_manifests() {
        let text = read(&path);
        let out = run(&text, &path.display().to_string(), &args_of(&text));
        if update {
            std::fs::write(&path, &out.yaml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        } else {
            assert_eq!(out.yaml, text, "{} is not what `mesh-init inject` writes for it", path.display());
        }
    }
}

fn deploy_manifests() -> Vec<PathBuf> {
    let mut out = vec![];
    for dir in ["deploy/iptables", "deploy/ebpf", "deploy/validation"] {
        out.extend(yaml_files(&repo().join(dir)));
    }
    out.push(repo().join("deploy/webhook.yaml"));
    assert!(!out.is_empty(), "no manifests under deploy/");
    out
}

#[test]
fn outputs_match_the_kubernetes_schema() {
    let version = Command::new("kubernetes-validate").arg("--version").output();
    if !version.as_ref().is_ok_and(|o| o.status.success()) {
        let why = "kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0)";
        if std::env::var_os("CI").is_some() {
            panic!("{why}; CI is set, so the schema check may not be skipped");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let mut files: Vec<PathBuf> = cases().iter().map(|c| golden_of(c)).collect();
    files.extend(deploy_manifests());
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .expect("kubernetes-validate runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !report.contains("ERROR"), "kubernetes-validate --strict:\n{report}");
}

/// The eBPF init container's shell finds the pod-level cgroup for both kubelet cgroup drivers,
/// run by the real `sh` on a directory tree shaped like a node's (a fake `mesh-init` on PATH
/// prints what it would have been given).
#[test]
fn ebpf_init_script_finds_the_pod_cgroup() {
    let golden: serde_yaml::Value =
        serde_yaml::from_str(read(&testdata().join("ebpf.golden.yaml")).split("---\n").next().unwrap())
            .expect("the golden parses");
    let init = &golden["spec"]["template"]["spec"]["initContainers"][0];
    let command: Vec<String> = serde_yaml::from_value(init["command"].clone()).expect("a command list");
    let args: Vec<String> = serde_yaml::from_value(init["args"].clone()).expect("an args list");
    assert_eq!(command[..2], ["/bin/sh", "-c"]);

    let dir = mesh_lab::TempDir::new("inject");
    let root = dir.path();
    let tree = root.join("cgroup");
    let systemd = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b4f_77.slice";
    let cgroupfs = "kubepods/besteffort/pod5a1e-9c";
    for dir in [format!("{systemd}/cri-containerd-1.scope"), cgroupfs.into(), "kubepods/besteffort/pod5a1e-9c0".into()]
    {
        std::fs::create_dir_all(tree.join(dir)).unwrap();
    }
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("mesh-init"), "#!/bin/sh\necho \"$@\"\n").unwrap();
    std::fs::set_permissions(bin.join("mesh-init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = command[2].replace("/host/sys/fs/cgroup", tree.to_str().unwrap());
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let run = |uid: &str| {
        Command::new("/bin/sh")
            .args(["-c", &script, "mesh-init"])
            .args(&args)
            .env("POD_UID", uid)
            .env("PATH", &path)
            .output()
            .expect("sh runs")
    };
    let flags = args.join(" ");
    for (uid, cgroup) in [("0b4f-77", systemd), ("5a1e-9c", cgroupfs)] {
        let out = run(uid);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{uid}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            stdout.trim(),
            format!("ebpf --cgroup {}/{cgroup} --bpffs /host/sys/fs/bpf {flags}", tree.display()),
            "{uid}"
        );
    }
    let out = run("ffff-00");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cgroup for pod ffff-00"));
}

/// Every traffic annotation is checked as the flag it replaces, and a refusal names both.
#[test]
fn every_traffic_annotation_is_validated_as_its_flag() {
    for (annotation, _, flag, _) in inject::CAPTURE_ANNOTATIONS {
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n    {annotation}: \"not valid!\"\nspec:\n  containers: [{{name: web, image: nginx}}]\n"
        );
        let e = inject::inject(&pod, "pod.yaml", &args_of("").settings).expect_err(annotation).to_string();
        let want = format!("pod.yaml: document 1 (line 1): Pod web: annotation {annotation}: invalid value \"not valid!\" (for {flag})");
        assert!(e.starts_with(&want), "{e}\nwanted: {want}");
    }
}

/// The iptables init containers' arguments, as injected, are accepted by the real `mesh-init
/// iptables` (in its dry run, which changes nothing and needs no privileges).
#[test]
fn injected_iptables_arguments_are_accepted_by_mesh_init() {
    let mut seen = 0;
    let mut files: Vec<PathBuf> = cases().iter().map(|c| golden_of(c)).collect();
    files.extend(deploy_manifests());
    for file in files {
        let text = read(&file);
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("a golden parses");
            let mut templates = vec![];
            collect_templates(&doc, &mut templates);
            for spec in templates {
                let Some(inits) = spec.get("initContainers").and_then(|v| v.as_sequence()) else { continue };
                for init in inits.iter().filter(|c| c["name"] == "mesh-init" && c["args"][0] == "iptables") {
                    let args: Vec<String> = serde_yaml::from_value(init["args"].clone()).unwrap();
                    let out =
                        Command::new(env!("CARGO_BIN_EXE_mesh-init")).args(&args).arg("--dry-run").output().unwrap();
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    assert!(
                        out.status.success() && stdout.contains("-j REDIRECT"),
                        "{}: mesh-init {args:?} --dry-run: {}{stdout}",
                        file.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    seen += 1;
                }
            }
        }
    }
    assert!(seen >= 10, "only {seen} iptables init containers found");
}

/// Every pod spec below `v` (any mapping holding `containers`).
fn collect_templates<'a>(v: &'a serde_yaml::Value, out: &mut Vec<&'a serde_yaml::Value>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            if m.contains_key("containers") {
                out.push(v);
            }
            m.values().for_each(|c| collect_templates(c, out));
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|c| collect_templates(c, out)),
        _ => {}
    }
}

#[test]
fn readiness_port_flag_moves_the_probe_and_the_exclude() {
    let text = read(&testdata().join("pod.yaml"));
    let mut args = args_of(&text);
    args.settings.readiness_port = 16021;
    let yaml = run(&text, "pod.yaml", &args).yaml;
    let probe = yaml.split("readinessProbe:").nth(1).unwrap_or_else(|| panic!("no probe: {yaml}"));
    assert!(probe.contains("path: /ready\n") && probe.contains("port: 16021\n"), "{yaml}");
    assert!(yaml.contains("- 16021,15090,15020\n"), "{yaml}");
    assert!(yaml.contains("containerPort: 16021\n") && !yaml.contains("containerPort: 15090"), "{yaml}");

    args.settings.readiness_port = args.settings.admin_port;
    let e = inject::inject(&text, "pod.yaml", &args.settings).unwrap_err().to_string();
    assert!(e.contains("--proxy-readiness-port: 15090 is also --proxy-admin-port"), "{e}");
}

/// The Pod Security Standards level (Kubernetes' `pod-security.kubernetes.io/enforce` values)
/// that the injected containers and volumes need, by the standards' rules on the fields the
/// injector writes: baseline forbids privileged containers, capabilities beyond its list and
/// hostPath volumes; restricted also requires no privilege escalation, a non-root user, the
/// runtime's (or a local) seccomp profile, and all capabilities dropped (NET_BIND_SERVICE alone may
/// be added). This reads the standard as published; no API server runs here.
fn pod_security_level(containers: &[&serde_yaml::Value], volumes: &[&serde_yaml::Value]) -> &'static str {
    const BASELINE_CAPS: &[&str] = &[
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    let strs = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str()).map(str::to_string).collect()
    };
    let mut baseline = volumes.iter().all(|v| v.get("hostPath").is_none());
    let mut restricted = baseline;
    for c in containers {
        let sc = &c["securityContext"];
        let added = strs(&sc["capabilities"]["add"]);
        if sc["privileged"] == true || added.iter().any(|a| !BASELINE_CAPS.contains(&a.as_str())) {
            baseline = false;
        }
        let seccomp = sc["seccompProfile"]["type"].as_str();
        restricted &= sc["allowPrivilegeEscalation"] == false
            && sc["runAsNonRoot"] == true
            && sc["runAsUser"].as_u64().is_some_and(|u| u != 0)
            && matches!(seccomp, Some("RuntimeDefault" | "Localhost"))
            && strs(&sc["capabilities"]["drop"]).iter().any(|d| d == "ALL")
            && added.iter().all(|a| a == "NET_BIND_SERVICE");
    }
    match (baseline, restricted && baseline) {
        (_, true) => "restricted",
        (true, false) => "baseline",
        _ => "privileged",
    }
}

/// What each mode's injected containers need from the namespace's Pod Security level; the
/// README's table says the same.
#[test]
fn pod_security_level_of_each_mode() {
    for (case, want) in
        [("validation", "restricted"), ("pod", "privileged"), ("ebpf", "privileged"), ("native-auto", "privileged")]
    {
        let golden = read(&testdata().join(format!("{case}.golden.yaml")));
        let doc: serde_yaml::Value = serde_yaml::from_str(golden.split("---\n").next().unwrap()).unwrap();
        let mut templates = vec![];
        collect_templates(&doc, &mut templates);
        let spec = templates[0];
        let ours =
            ["mesh-init", "mesh-validation", "mesh-proxy", "mesh-proxy-config", "mesh-host-cgroup", "mesh-host-bpffs"];
        let injected = |list: &str| -> Vec<&serde_yaml::Value> {
            spec[list]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter(|c| ours.contains(&c["name"].as_str().unwrap_or("")))
                .collect()
        };
        let mut containers = injected("initContainers");
        containers.extend(injected("containers"));
        assert!(containers.len() >= 2, "{case}");
        assert_eq!(pod_security_level(&containers, &injected("volumes")), want, "{case}");
    }
}
