//! The pod spec `mesh-init inject` writes, run for real: the containers exactly as injected (the
//! init container's user and capabilities, the validation step, the sidecar as 1337 with no
//! capabilities), an application calling another pod through both proxies, the kubelet's probes
//! (the sidecar's readiness and startup probes, the application's probe rewritten to the status
//! port), and a rollout: a second server pod becomes ready, the client's endpoints move to it and
//! the first server pod gets SIGTERM, while the client keeps calling. Every request is counted.
//!
//! Two runtimes run the same scenario from the same injected YAML:
//! - `injected_pods_in_podman` (ignored by `cargo test`; `scripts/pod-test.sh` builds the images
//!   and runs it): real `podman pod`s, the images of `scripts/image.sh`, `--read-only`,
//!   `--cap-drop=all --cap-add=…`, `--user`, `no-new-privileges`, the busybox application image.
//! - `injected_pods_as_processes_roll_out_without_failures` (CI): each container is a process in
//!   the pod's network namespace with the spec's user, group and capabilities (`setpriv`: bounding
//!   set, no new privileges), the binaries of this build, python's http.server and curl as the
//!   applications. What it cannot show: a read-only root and image contents.
//!
//! The network is ours: a "node" namespace with a bridge, one veth per pod into it (podman's pods
//! are created with `--network none`; podman never touches the machine's namespace). The kubelet's
//! probes come from the node namespace to the pod IP, as a kubelet's do. Everything is named
//! `mesh-kube-<pid>-<n>` and removed on drop, also when the test fails.
//!
//! The rollout loses no request thanks to mesh-proxy's drain (issue 12): the old pod's proxy keeps
//! accepting after SIGTERM until the client's proxy has moved to the new endpoints. The count of
//! failed requests during the rollout is always printed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_e2e::bin;
use mesh_lab::{check, privileged, unique, wait_until, write_atomic, Netns, Proc, TempDir};
use serde_json::Value;

const NODE_IP: &str = "10.200.16.1";
/// The address the client application dials: a Service's, which only the client's proxy knows.
const SERVICE: &str = "10.200.16.100:8080";
const HUB: &str = "localhost";

// ------------------------------------------------------------------------------------------
// The injected pod spec, as a runtime needs it.

/// One container of the injected pod.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    image: String,
    command: Vec<String>,
    args: Vec<String>,
    /// Literal values, and the downward API's `status.podIP` / `metadata.uid` resolved.
    env: Vec<(String, String)>,
    user: u32,
    group: u32,
    caps: Vec<String>,
    read_only: bool,
    no_new_privs: bool,
    /// (mount path, volume name, read only)
    mounts: Vec<(String, String, bool)>,
    readiness: Option<(String, u16)>,
    startup: Option<(String, u16)>,
    post_start: Option<Vec<String>>,
    /// An init container that keeps running: a native sidecar.
    restart_always: bool,
}

struct PodSpec {
    init: Vec<Spec>,
    containers: Vec<Spec>,
}

impl PodSpec {
    /// Reads the (only) Pod of `yaml`, as `mesh-init inject` wrote it.
    fn parse(yaml: &str, pod_ip: &str) -> PodSpec {
        let pod: Value = serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(yaml).unwrap()).unwrap();
        let spec = &pod["spec"];
        let list = |key: &str| -> Vec<Spec> {
            spec[key].as_array().into_iter().flatten().map(|c| Spec::parse(c, pod_ip)).collect()
        };
        PodSpec { init: list("initContainers"), containers: list("containers") }
    }
}

impl Spec {
    fn parse(c: &Value, pod_ip: &str) -> Spec {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().map(|s| s.as_str().unwrap().to_string()).collect()
        };
        let sc = &c["securityContext"];
        let probe = |p: &Value| {
            p.get("httpGet")
                .map(|g| (g["path"].as_str().unwrap_or("/").to_string(), g["port"].as_u64().unwrap() as u16))
        };
        Spec {
            name: c["name"].as_str().unwrap().into(),
            image: c["image"].as_str().unwrap().into(),
            command: strings(&c["command"]),
            args: strings(&c["args"]),
            env: c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let value = match e.pointer("/valueFrom/fieldRef/fieldPath").and_then(Value::as_str) {
                        Some("status.podIP") => pod_ip.to_string(),
                        Some("metadata.uid") => "0b4f-77".to_string(),
                        Some(other) => panic!("no downward API value for {other}"),
                        None => e["value"].as_str().unwrap_or_default().to_string(),
                    };
                    (e["name"].as_str().unwrap().to_string(), value)
                })
                .collect(),
            user: sc["runAsUser"].as_u64().unwrap_or(0) as u32,
            group: sc["runAsGroup"].as_u64().unwrap_or(0) as u32,
            caps: strings(&sc["capabilities"]["add"]),
            read_only: sc["readOnlyRootFilesystem"] == true,
            no_new_privs: sc["allowPrivilegeEscalation"] == false,
            mounts: c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    (m["mountPath"].as_str().unwrap().into(), m["name"].as_str().unwrap().into(), m["readOnly"] == true)
                })
                .collect(),
            readiness: c.get("readinessProbe").and_then(probe),
            startup: c.get("startupProbe").and_then(probe),
            post_start: c.pointer("/lifecycle/postStart/exec/command").map(strings),
            restart_always: c["restartPolicy"] == "Always",
        }
    }
}

// ------------------------------------------------------------------------------------------
// The node: a namespace with a bridge, and the kubelet's probes from it.

struct Node {
    ns: Netns,
    next: u8,
}

impl Node {
    fn new() -> Node {
        let ns = Netns::new("kube");
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "br0"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Node { ns, next: 2 }
    }

    /// Joins the network namespace at `netns` (a path; `ip` knows it as `target`, a PID or a
    /// name) to the bridge; returns its address.
    fn attach(&mut self, netns: &Path, target_for_ip: &str) -> String {
        let ip = format!("10.200.16.{}", self.next);
        let host = format!("veth{}", self.next);
        self.next += 1;
        let target = netns.to_str().unwrap();
        check(Command::new("ip").args([
            "-n",
            self.ns.name(),
            "link",
            "add",
            &host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
        ]));
        check(Command::new("ip").args(["-n", self.ns.name(), "link", "set", "eth0", "netns", target_for_ip]));
        self.ns.ip(&["link", "set", &host, "master", "br0", "up"]);
        let inside = |args: &[&str]| {
            check(Command::new("nsenter").arg(format!("--net={target}")).arg("ip").args(args));
        };
        inside(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["route", "add", "default", "via", NODE_IP]);
        ip
    }

    /// The kubelet's HTTP probe: success is a status from 200 to 399.
    fn probe(&self, ip: &str, (path, port): &(String, u16)) -> Result<u16, String> {
        let out = self
            .ns
            .command("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3"])
            .arg(format!("http://{ip}:{port}{path}"))
            .output()
            .unwrap();
        let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        if (200..400).contains(&code) {
            Ok(code)
        } else {
            Err(format!("GET http://{ip}:{port}{path}: {code}"))
        }
    }

    fn wait_probe(&self, ip: &str, probe: &(String, u16), what: &str) {
        wait_until(Duration::from_secs(30), what, || self.probe(ip, probe).ok());
    }
}

// ------------------------------------------------------------------------------------------
// The two runtimes.

enum Runtime {
    Podman,
    Processes,
}

/// A running pod of either runtime.
struct Pod {
    name: String,
    ip: String,
    netns: PathBuf,
    runtime: RuntimeState,
    /// The ConfigMap volume's directory (config.yaml), mounted at /etc/mesh-proxy.
    config: TempDir,
}

enum RuntimeState {
    Podman,
    /// The pod's namespace (ours) and its containers' processes.
    Processes {
        _ns: Netns,
        procs: BTreeMap<String, Proc>,
    },
}

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", repo().join("scripts/containers.conf"));
    c
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

impl Pod {
    /// An empty pod on `node`, with `config` as its sidecar's config.yaml.
    fn create(runtime: &Runtime, node: &mut Node, config: &str) -> Pod {
        let name = unique("kube");
        let dir = TempDir::new("kube");
        dir.write("config.yaml", config);
        match runtime {
            Runtime::Podman => {
                check(podman().args(["pod", "create", "--name", &name, "--network", "none"]));
                check(podman().args(["pod", "start", &name]));
                let infra = String::from_utf8(
                    check(podman().args(["pod", "inspect", &name, "--format", "{{.InfraContainerID}}"])).stdout,
                )
                .unwrap();
                let pid = String::from_utf8(
                    check(podman().args(["inspect", infra.trim(), "--format", "{{.State.Pid}}"])).stdout,
                )
                .unwrap();
                let netns = PathBuf::from(format!("/proc/{}/ns/net", pid.trim()));
                let ip = node.attach(&netns, pid.trim());
                Pod { name, ip, netns, runtime: RuntimeState::Podman, config: dir }
            }
            Runtime::Processes => {
                let ns = Netns::new("kube");
                let netns = ns.path();
                let ip = node.attach(&netns, ns.name());
                Pod {
                    name,
                    ip,
                    netns,
                    runtime: RuntimeState::Processes { _ns: ns, procs: BTreeMap::new() },
                    config: dir,
                }
            }
        }
    }

    /// The command that runs `spec` in this pod (detached for podman).
    fn command(&self, spec: &Spec, detached: bool) -> Command {
        match &self.runtime {
            RuntimeState::Podman => {
                let mut c = podman();
                c.args(["run", "--pod", &self.name, "--name", &format!("{}-{}", self.name, spec.name)]);
                c.args(["--user", &format!("{}:{}", spec.user, spec.group), "--cap-drop=all"]);
                for cap in &spec.caps {
                    c.arg(format!("--cap-add={cap}"));
                }
                if spec.read_only {
                    c.args(["--read-only", "--read-only-tmpfs=false"]);
                }
                if spec.no_new_privs {
                    c.args(["--security-opt", "no-new-privileges"]);
                }
                for (k, v) in &spec.env {
                    c.arg("-e").arg(format!("{k}={v}"));
                }
                for (path, volume, ro) in &spec.mounts {
                    assert_eq!(volume, "mesh-proxy-config", "only the config volume is known here");
                    c.arg("-v").arg(format!(
                        "{}:{path}:{}",
                        self.config.path().display(),
                        if *ro { "ro" } else { "rw" }
                    ));
                }
                if !spec.command.is_empty() {
                    c.arg("--entrypoint").arg(serde_json::to_string(&spec.command).unwrap());
                }
                // Run-to-completion containers are removed when they end (their output is read
                // from the foreground run), so one may be run again, as the kubelet retries.
                c.arg(if detached { "-d" } else { "--rm" });
                c.arg(&spec.image).args(&spec.args);
                c
            }
            RuntimeState::Processes { .. } => {
                // setpriv: the user and group, the capability bounding set (what root keeps across
                // exec), no inheritable capabilities, and no new privileges, as the spec says.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", self.netns.display())).arg("setpriv");
                c.args([format!("--reuid={}", spec.user), format!("--regid={}", spec.group), "--clear-groups".into()]);
                let caps: String = spec.caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
                c.arg(format!("--bounding-set=-all{caps}")).arg("--inh-caps=-all");
                if spec.no_new_privs {
                    c.arg("--no-new-privs");
                }
                c.arg("--");
                let (program, rest) = match spec.command.split_first() {
                    Some((p, rest)) => (p.clone(), rest.to_vec()),
                    None => (local_binary(&spec.image), vec![]),
                };
                c.arg(program).args(rest);
                let config_dir = self.config.path().display().to_string();
                c.args(spec.args.iter().map(|a| a.replace("/etc/mesh-proxy", &config_dir)));
                c.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
                c.envs(spec.env.iter().cloned());
                c
            }
        }
    }

    /// Runs an init container to completion (exit 0 required); returns its output.
    fn run_init(&self, spec: &Spec) -> Result<String, String> {
        let out = self.command(spec, false).stdin(Stdio::null()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{} exited {}: {text}", spec.name, out.status))
        }
    }

    fn start(&mut self, spec: &Spec) {
        match &mut self.runtime {
            RuntimeState::Podman => {
                let out = self.command(spec, true).output().unwrap();
                assert!(out.status.success(), "{}: {}", spec.name, String::from_utf8_lossy(&out.stderr));
            }
            RuntimeState::Processes { .. } => {
                let mut cmd = self.command(spec, true);
                let log = self.config.path().join(format!("{}.log", spec.name));
                let proc = Proc::spawn_logged(&spec.name, &mut cmd, &log);
                let RuntimeState::Processes { procs, .. } = &mut self.runtime else { unreachable!() };
                procs.insert(spec.name.clone(), proc);
            }
        }
    }

    /// `exec` in a running container (a postStart hook); its exit status.
    fn exec(&self, spec: &Spec, command: &[String]) -> bool {
        match &self.runtime {
            RuntimeState::Podman => podman()
                .args(["exec", &format!("{}-{}", self.name, spec.name)])
                .args(command)
                .status()
                .unwrap()
                .success(),
            RuntimeState::Processes { .. } => {
                let mut hook = spec.clone();
                hook.command = vec![local_binary(&spec.image)];
                hook.args = command[1..].to_vec();
                self.command(&hook, false).status().unwrap().success()
            }
        }
    }

    /// What a container printed.
    fn logs(&self, container: &str) -> String {
        match &self.runtime {
            RuntimeState::Podman => {
                let out = podman().args(["logs", &format!("{}-{container}", self.name)]).output().unwrap();
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
            }
            RuntimeState::Processes { .. } => {
                std::fs::read_to_string(self.config.path().join(format!("{container}.log"))).unwrap_or_default()
            }
        }
    }

    /// SIGTERM to every container at once, as the kubelet does for a classic pod; waits for them.
    fn terminate(&mut self, grace: Duration) {
        match &mut self.runtime {
            RuntimeState::Podman => {
                check(podman().args(["pod", "stop", "-t", &grace.as_secs().to_string(), &self.name]));
            }
            RuntimeState::Processes { procs, .. } => {
                for p in procs.values() {
                    p.signal(nix::sys::signal::Signal::SIGTERM);
                }
                for p in procs.values_mut() {
                    p.signal_and_wait(nix::sys::signal::Signal::SIGTERM, grace);
                }
            }
        }
    }

    /// Runs the injected pod as the kubelet would: init containers in order (a native sidecar
    /// starts and must pass its startup probe before the next), then the containers in order,
    /// each postStart hook to its end before the next container; then waits for every readiness
    /// probe.
    fn run(&mut self, spec: &PodSpec, node: &Node) {
        self.run_init_containers(spec, node);
        self.run_containers(spec, node);
    }

    fn run_init_containers(&mut self, spec: &PodSpec, node: &Node) {
        for c in &spec.init {
            if c.restart_always {
                self.start(c);
                node.wait_probe(&self.ip, c.startup.as_ref().unwrap(), &format!("{}'s startup probe", c.name));
            } else {
                let out = self.run_init(c).unwrap_or_else(|e| panic!("pod {}: {e}", self.name));
                eprintln!("pod {} init {}: {}", self.name, c.name, out.trim());
            }
        }
    }

    fn run_containers(&mut self, spec: &PodSpec, node: &Node) {
        for c in &spec.containers {
            self.start(c);
            if let Some(hook) = &c.post_start {
                assert!(self.exec(c, hook), "{}'s postStart hook failed", c.name);
            }
        }
        for c in spec.init.iter().chain(&spec.containers) {
            if let Some(probe) = &c.readiness {
                node.wait_probe(&self.ip, probe, &format!("{}'s readiness probe ({}:{})", c.name, probe.0, probe.1));
            }
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let RuntimeState::Podman = self.runtime {
            let _ = podman().args(["pod", "rm", "-f", "-t", "0", &self.name]).output();
        }
    }
}

/// The binary of this build that an image holds.
fn local_binary(image: &str) -> String {
    let name = image.rsplit('/').next().unwrap().split(':').next().unwrap();
    bin(name).display().to_string()
}

// ------------------------------------------------------------------------------------------
// The scenario.

/// The sidecar's config: the readiness port for the kubelet, one port for both directions, and
/// on the client the Service's route to `endpoints`.
fn proxy_config(endpoints: &[&str]) -> String {
    let mut c = String::from(
        "admin: { address: \"127.0.0.1:15090\" }\nreadiness: { address: \"0.0.0.0:15021\" }\noutbound_policy: allow_any\ndrain_timeout: 5s\nlisteners:\n  - { name: virtual, address: \"0.0.0.0:15000\" }\n",
    );
    if !endpoints.is_empty() {
        let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        c += &format!(
            "routes:\n  - name: server\n    destinations: [\"{SERVICE}\"]\n    protocol: http\n    rules:\n      - clusters: [{{ name: server, weight: 100 }}]\nclusters:\n  - {{ name: server }}\nendpoints:\n  - {{ cluster: server, addresses: [{}] }}\n",
            list.join(", ")
        );
    }
    c
}

/// `mesh-init inject` on a one-pod manifest.
fn inject(pod_yaml: &str, flags: &[&str]) -> String {
    let mut child = Command::new(bin("mesh-init"))
        .args(["inject", "-f", "-", "--hub", HUB])
        .args(flags)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), pod_yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "inject: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The applications, per runtime: a server answering its version on / and 200 on /ready (which
/// keeps serving 3 s after SIGTERM, as a well-behaved server with a shutdown delay does), and a
/// client calling the Service in a loop, one line per request (with busybox, `nc`: Debian 12's
/// static busybox `wget` crashes on every request; busybox `nc` closes the connection when its
/// input ends, so the request is followed by a pause long enough for the answer, and four loops
/// run side by side).
fn app(runtime: &Runtime, role: &str, version: &str) -> (String, Vec<String>) {
    let server = format!(
        "mkdir -p /tmp/www && echo {version} > /tmp/www/index.html && echo ok > /tmp/www/ready && \
         (httpd -f -p 8080 -h /tmp/www & pid=$!; trap 'sleep 3; kill $pid; exit 0' TERM; wait $pid)"
    );
    let (host, port) = SERVICE.split_once(':').unwrap();
    let client = format!(
        "call() {{ while :; do r=$({{ printf 'GET / HTTP/1.0\\r\\nHost: server\\r\\n\\r\\n'; sleep 0.05; }} | nc -w 3 {host} {port} 2>/dev/null); \
         case \"$r\" in *' 200 '*v1*) echo 'ok v1';; *' 200 '*v2*) echo 'ok v2';; *) echo fail;; esac; done; }}; \
         call & call & call & call & wait"
    );
    match (runtime, role) {
        (Runtime::Podman, "server") => {
            (format!("{HUB}/mesh-test-app:0.1.0"), vec!["/bin/sh".into(), "-c".into(), server])
        }
        (Runtime::Podman, _) => (format!("{HUB}/mesh-test-app:0.1.0"), vec!["/bin/sh".into(), "-c".into(), client]),
        (Runtime::Processes, "server") => {
            let py = format!(
                "import http.server,signal,sys,threading,time\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        b=b'{version}\\n'\n        self.send_response(200); self.send_header('Content-Length',str(len(b))); self.end_headers(); self.wfile.write(b)\n    def log_message(self,*a): pass\ns=http.server.ThreadingHTTPServer(('0.0.0.0',8080),H)\nsignal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=lambda: (time.sleep(3), s.shutdown())).start())\ns.serve_forever()\n"
            );
            ("host".into(), vec!["python3".into(), "-c".into(), py])
        }
        (Runtime::Processes, _) => {
            let sh = format!(
                "while :; do if b=$(curl -s -f --max-time 3 http://{SERVICE}/); then echo \"ok $b\"; else echo fail; fi; done"
            );
            ("host".into(), vec!["/bin/sh".into(), "-c".into(), sh])
        }
    }
}

fn pod_manifest(name: &str, image: &str, command: &[String], probe: bool) -> String {
    let probe =
        if probe { "\n    readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 1}" } else { "" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: app\n    image: {image}\n    command: {}\n    ports: [{{containerPort: 8080}}]{probe}\n",
        serde_json::to_string(command).unwrap()
    )
}

/// The validation step of an iptables-mode pod: the injected capture flags checked as Istio
/// CNI's istio-validation checks them, as UID 1337 with no capabilities.
fn validation_of(init: &Spec) -> Spec {
    let mut v = init.clone();
    v.name = format!("{}-validation", init.name);
    v.args.extend(["--run-validation".into(), "--skip-rule-apply".into()]);
    v.user = 1337;
    v.group = 1337;
    v.caps.clear();
    v.read_only = true;
    v
}

/// The counts of the client's log.
fn tally(log: &str) -> (usize, usize, BTreeMap<String, usize>) {
    let (mut ok, mut failed, mut by) = (0, 0, BTreeMap::new());
    for line in log.lines() {
        if let Some(v) = line.strip_prefix("ok ") {
            ok += 1;
            *by.entry(v.trim().to_string()).or_default() += 1;
        } else if line.trim() == "fail" {
            failed += 1;
        }
    }
    (ok, failed, by)
}

/// Runs the scenario; `strict` also requires that no request failed during the rollout.
fn scenario(runtime: Runtime, strict: bool) {
    let mut node = Node::new();

    // Server v1: iptables mode, classic sidecar; its probe rewritten to the status port.
    let (image, cmd) = app(&runtime, "server", "v1");
    let yaml = inject(&pod_manifest("server", &image, &cmd, true), &[]);
    let mut v1 = Pod::create(&runtime, &mut node, &proxy_config(&[]));
    let spec = PodSpec::parse(&yaml, &v1.ip);
    assert_eq!(spec.init[0].caps, ["NET_ADMIN", "NET_RAW"], "the injected capabilities");
    assert_eq!((spec.containers[1].user, spec.containers[1].read_only), (1337, true));
    let app_probe = spec.containers[0].readiness.clone().unwrap();
    assert_eq!(app_probe, ("/app-health/app/readyz".to_string(), 15020), "the application's probe is rewritten");
    v1.run_init_containers(&spec, &node);
    // The validation step as the proxy's user, with no capabilities, before the proxy starts.
    let out = v1.run_init(&validation_of(&spec.init[0])).unwrap_or_else(|e| panic!("validation: {e}"));
    assert!(out.contains("validation"), "{out}");
    v1.run_containers(&spec, &node);

    // Client: native sidecar (Kubernetes 1.30), held back by its startup probe.
    let (image, cmd) = app(&runtime, "client", "");
    let yaml = inject(&pod_manifest("client", &image, &cmd, false), &["--kubernetes-version", "1.30"]);
    let mut client = Pod::create(&runtime, &mut node, &proxy_config(&[&format!("{}:8080", v1.ip)]));
    let spec = PodSpec::parse(&yaml, &client.ip);
    assert!(spec.init[1].restart_always && spec.init[1].startup.is_some(), "a native sidecar with a startup probe");
    client.run(&spec, &node);
    let first = mesh_lab::try_wait_until(Duration::from_secs(20), "the client's first answers from v1", || {
        Ok((tally(&client.logs("app")).2.get("v1").copied().unwrap_or(0) >= 20).then_some(()))
    });
    if let Err(e) = first {
        let tail = |pod: &Pod, c: &str| pod.logs(c).lines().rev().take(15).collect::<Vec<_>>().join("\n");
        panic!(
            "{e}\nclient app:\n{}\nclient proxy:\n{}\nv1 proxy:\n{}",
            tail(&client, "app"),
            tail(&client, "mesh-proxy"),
            tail(&v1, "mesh-proxy")
        );
    }

    // Server v2: validation mode. Its init container fails until the node installs the rules.
    let (image, cmd) = app(&runtime, "server", "v2");
    let yaml = inject(&pod_manifest("server", &image, &cmd, true), &["--mode", "validation"]);
    let mut v2 = Pod::create(&runtime, &mut node, &proxy_config(&[]));
    let spec = PodSpec::parse(&yaml, &v2.ip);
    let validation = &spec.init[0];
    assert_eq!((validation.user, validation.caps.len(), validation.read_only), (1337, 0, true));
    let refused = v2.run_init(validation).expect_err("validation passed without rules");
    assert!(refused.contains("validation failed"), "{refused}");
    // The node's part (a CNI plugin's): the same flags, installed from outside the pod.
    let flags: Vec<&String> =
        validation.args[1..].iter().filter(|a| !a.starts_with("--run") && !a.starts_with("--skip")).collect();
    check(Command::new(bin("mesh-init")).arg("iptables").args(flags).arg("--netns").arg(&v2.netns));
    v2.run(&spec, &node);

    // The rollout: the client's endpoints move to v2, and v1 gets SIGTERM at the same moment
    // (Kubernetes does both on the pod's deletion, without ordering them).
    let before = tally(&client.logs("app"));
    let started = Instant::now();
    write_atomic(&client.config.path().join("config.yaml"), &proxy_config(&[&format!("{}:8080", v2.ip)]));
    v1.terminate(Duration::from_secs(10));
    let terminated = started.elapsed();
    wait_until(Duration::from_secs(20), "the client's answers from v2", || {
        (tally(&client.logs("app")).2.get("v2").copied().unwrap_or(0) >= 50).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed, by) = tally(&client.logs("app"));
    eprintln!(
        "pod-test: requests {} (before the rollout {}), failed {failed} ({} during the rollout), by version {by:?}; v1 took {terminated:?} to stop",
        ok + failed,
        before.0 + before.1,
        failed - before.1
    );
    assert_eq!(before.1, 0, "requests failed before the rollout");
    assert!(by.get("v2").is_some_and(|&n| n >= 50), "v2 serves after the rollout");
    if strict {
        assert_eq!(failed, 0, "requests failed during the rollout (mesh-proxy's drain: issue 12)");
    }
    drop(client);
    drop(v2);
}

/// The scenario as processes (what CI runs), with no request lost during the rollout. Before
/// mesh-proxy's drain (issue 12) its listeners closed at SIGTERM, so the requests the client's
/// proxy sent to the old pod before its endpoint update landed were refused (2-6 of ~400 per run
/// on 2026-11-28); with the drain, 0 in 8 runs of 344-761 requests.
#[test]
fn injected_pods_as_processes_roll_out_without_failures() {
    if !privileged("injected_pods_as_processes_roll_out_without_failures") {
        return;
    }
    scenario(Runtime::Processes, true);
}

/// The same in real podman pods with the images (`scripts/pod-test.sh` builds them and runs
/// this); the rollout's failures are printed, as in CI's run.
#[test]
#[ignore = "needs the images and podman: scripts/pod-test.sh"]
fn injected_pods_in_podman() {
    assert!(nix::unistd::geteuid().is_root(), "podman pods with our own network namespaces need root");
    scenario(Runtime::Podman, false);
}
