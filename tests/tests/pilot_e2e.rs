//! mesh-pilot end to end (issue 15's "done when"): the files adapter on a directory of
//! Kubernetes-format platform objects and Istio-format rules, mesh-pilot in the remote namespace,
//! a pod with mesh-init's rules and mesh-proxy (UID 1337) taking everything from mesh-pilot, three
//! versions of `reviews` in the remote namespace, and the application dialling the service's
//! ClusterIP, which exists nowhere: only the config mesh-pilot serves makes it answer.
//!
//! Checked: shares within ±5% of the weights over 2,000 requests; replacing a rule file takes
//! effect at the proxy within 2 s with no failed request under load; a Pod added or removed
//! reaches the proxy within 1 s (by long poll: the proxy's poll interval is 5 s); a bad rule is
//! reported by `mesh-pilot analyze` and by the proxy's NACK in `mesh-pilot status` while traffic
//! keeps flowing on the last good config.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use mesh_e2e::{bin, capture_everything, script, PodNet, REMOTE_V4};
use mesh_lab::{privileged, try_wait_until, wait_until, write_atomic, Proc, TempDir};

/// reviews' ClusterIP: no host has it.
const SERVICE: &str = "10.200.100.1:9080";
const ADMIN: &str = "127.0.0.1:15090";
const PILOT_ADMIN: &str = "127.0.0.1:15014";
const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-pilot/tests/testdata/bookinfo/rules");
const REVIEWS: &str = "reviews.default.svc.cluster.local";

const PLATFORM: &str = "\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.200.100.1
  ports: [{name: http, port: 9080, targetPort: 9080}]
  selector: {app: reviews}
";

fn pod_yaml(version: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-{version}, namespace: default, labels: {{app: reviews, version: {version}}}}}\n\
         spec: {{containers: [{{name: reviews, image: reviews:{version}}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
    )
}

fn rule(name: &str) -> String {
    std::fs::read_to_string(Path::new(RULES).join(name)).unwrap()
}

struct Mesh {
    net: PodNet,
    config: TempDir,
    dir: TempDir,
    procs: Vec<Proc>,
}

impl Mesh {
    fn start() -> Mesh {
        let net = PodNet::new("pilot");
        let config = TempDir::new("pilot-config");
        let dir = TempDir::new("pilot-e2e");
        let mut mesh = Mesh { net, config, dir, procs: Vec::new() };
        for (v, ip) in [("v1", "10.200.1.1"), ("v2", "10.200.1.2"), ("v3", "10.200.1.3")] {
            mesh.net.add_remote_addr(&format!("{ip}/32"));
            let mut p =
                Proc::spawn(mesh.net.remote.command("python3").arg(script("name_server.py")).args([v, ip, "9080"]));
            p.wait_for_line("ready");
            mesh.procs.push(p);
        }
        mesh.config.write("platform.yaml", PLATFORM);
        mesh.config.write("pod-v1.yaml", &pod_yaml("v1", "10.200.1.1"));
        mesh.config.write("pod-v3.yaml", &pod_yaml("v3", "10.200.1.3"));
        mesh.config.write("destination-rule-all.yaml", &rule("destination-rule-all.yaml"));
        mesh.config.write("reviews.yaml", &rule("virtual-service-reviews-50-v3.yaml"));

        let mut cmd = mesh.net.remote.command(bin("mesh-pilot"));
        cmd.args(["serve", "--config-dir"]).arg(mesh.config.path());
        cmd.args(["--listen", &format!("{REMOTE_V4}:15010"), "--admin", PILOT_ADMIN, "--log-level", "warn"]);
        cmd.stderr(std::fs::File::create(mesh.dir.path().join("pilot.log")).unwrap());
        let mut pilot = Proc::spawn(&mut cmd);
        pilot.wait_for_line("mesh-pilot: discovery on");
        mesh.procs.push(pilot);

        capture_everything(&mesh.net.pod, "15090");
        let proxy_yaml = mesh.dir.write(
            "proxy.yaml",
            &format!(
                "admin: {{ address: {ADMIN} }}\nlisteners: [{{ name: virtual, address: 0.0.0.0:15000 }}]\n\
                 discovery: {{ url: http://{REMOTE_V4}:15010/ns/default, poll_interval: 5s }}\n"
            ),
        );
        let mut cmd = mesh.net.pod.command_as(1337, 1337, bin("mesh-proxy"));
        cmd.arg("--config").arg(&proxy_yaml).args(["--workers", "1"]);
        cmd.env("POD_NAME", "productpage-v1").env("POD_NAMESPACE", "default");
        cmd.stderr(std::fs::File::create(mesh.dir.path().join("proxy.log")).unwrap());
        mesh.procs.push(Proc::spawn(&mut cmd));
        let ready = mesh.net.pod.run(|| {
            try_wait_until(Duration::from_secs(20), "the proxy to have reviews' route from mesh-pilot", || {
                Ok(Http::connect(ADMIN)
                    .and_then(|mut c| c.get("/config_dump", &[]))
                    .ok()
                    .filter(|(s, b)| *s == 200 && b.contains(&format!("{REVIEWS}:9080")))
                    .map(|_| ()))
            })
        });
        if let Err(e) = ready {
            panic!("{e:#}\n{}", mesh.logs());
        }
        mesh
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("pilot.log:\n{}\nproxy.log:\n{}", read("pilot.log"), read("proxy.log"))
    }

    fn config_dump(&self) -> String {
        self.net
            .pod
            .run(|| Http::connect(ADMIN).and_then(|mut c| c.get("/config_dump", &[])).map(|r| r.1).unwrap_or_default())
    }

    /// The endpoints the proxy has for a cluster (from its /config_dump).
    fn proxy_endpoints(&self, cluster: &str) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&self.config_dump()).unwrap_or_default();
        v["config"]["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == cluster)
            .map(|c| {
                c["endpoints"].as_array().unwrap().iter().map(|e| e.as_str().unwrap_or_default().to_string()).collect()
            })
            .unwrap_or_default()
    }

    fn pilot(&self, args: &[&str]) -> (bool, String) {
        let out = self.net.remote.command(bin("mesh-pilot")).args(args).output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }
}

/// A blocking HTTP/1.1 keep-alive client: status and a Content-Length body.
struct Http {
    r: BufReader<TcpStream>,
    host: String,
}

impl Http {
    fn connect(addr: &str) -> std::io::Result<Http> {
        let sa: SocketAddr = addr.parse().unwrap();
        let s = TcpStream::connect_timeout(&sa, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(Http { r: BufReader::new(s), host: addr.to_string() })
    }

    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.r.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().map_err(std::io::Error::other)?;
                }
            }
        }
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Versions seen over `n` requests on one keep-alive connection.
fn shares(n: usize, headers: &[(&str, &str)]) -> std::collections::BTreeMap<String, usize> {
    let mut c = Http::connect(SERVICE).expect("connect to the ClusterIP through the redirect");
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (status, body) = c.get("/", headers).expect("a request");
        assert_eq!(status, 200, "{body}");
        *seen.entry(body).or_insert(0) += 1;
    }
    seen
}

/// Clients on keep-alive connections until stopped (bounded: 30 s, 60,000 requests each).
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(clients: usize) -> Load {
        let (stop, failures, total) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads = (0..clients)
            .map(|_| {
                let (stop, failures, total) = (stop.clone(), failures.clone(), total.clone());
                thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut c = Http::connect(SERVICE).expect("connect");
                    for _ in 0..60_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            return;
                        }
                        if !matches!(c.get("/", &[]), Ok((200, _))) {
                            failures.fetch_add(1, Ordering::Relaxed);
                            if let Ok(n) = Http::connect(SERVICE) {
                                c = n;
                            }
                        }
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { stop, failures, total, threads }
    }

    /// (requests, failures)
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (self.total.load(Ordering::Relaxed), self.failures.load(Ordering::Relaxed))
    }
}

#[test]
fn pilot_weights_rule_switch_endpoints_and_nack() {
    if !privileged("pilot_weights_rule_switch_endpoints_and_nack") {
        return;
    }
    let mesh = Mesh::start();
    let pod = &mesh.net.pod;

    // 50/50 v1/v3 (Istio's reviews-50-v3 rule): within ±5% over 2,000 requests.
    let seen = pod.run(|| shares(2000, &[]));
    for v in ["v1", "v3"] {
        let n = seen.get(v).copied().unwrap_or(0);
        assert!((900..=1100).contains(&n), "{v}: {n} of 2000 ({seen:?})");
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // The rule file replaced (all to v1) under load: in force within 2 s, no request fails.
    let took = pod.run(|| {
        let load = Load::start(4);
        thread::sleep(Duration::from_millis(300));
        let written = Instant::now();
        write_atomic(&mesh.config.path().join("reviews.yaml"), &rule("virtual-service-all-v1.yaml"));
        let took = wait_until(Duration::from_secs(10), "every answer to be v1", || {
            let mut c = Http::connect(SERVICE).ok()?;
            (0..20).all(|_| c.get("/", &[]).is_ok_and(|r| r.1 == "v1")).then(|| written.elapsed())
        });
        thread::sleep(Duration::from_millis(300));
        let (total, failures) = load.finish();
        assert!(total > 100, "the load ran ({total} requests)");
        assert_eq!(failures, 0, "{failures} of {total} requests failed during the switch");
        took
    });
    assert!(took < Duration::from_secs(2), "the new rule took {took:?} to reach the proxy\n{}", mesh.logs());

    // A Pod added reaches the proxy within 1 s; jason's rule routes to it; removed, within 1 s.
    write_atomic(&mesh.config.path().join("reviews.yaml"), &rule("virtual-service-reviews-jason-v2-v3.yaml"));
    let v2 = format!("outbound|9080|v2|{REVIEWS}");
    wait_until(Duration::from_secs(5), "the jason rule at the proxy", || {
        mesh.config_dump().contains("jason").then_some(())
    });
    let written = Instant::now();
    mesh.config.write("pod-v2.yaml", &pod_yaml("v2", "10.200.1.2"));
    let added = wait_until(Duration::from_secs(10), "v2's endpoint at the proxy", || {
        (mesh.proxy_endpoints(&v2) == ["10.200.1.2:9080"]).then(|| written.elapsed())
    });
    assert!(added < Duration::from_secs(1), "a new endpoint took {added:?}");
    let jason = pod.run(|| shares(50, &[("end-user", "jason")]));
    assert_eq!(jason.get("v2"), Some(&50), "{jason:?}");
    let written = Instant::now();
    std::fs::remove_file(mesh.config.path().join("pod-v2.yaml")).unwrap();
    let removed = wait_until(Duration::from_secs(10), "v2's endpoint gone", || {
        mesh.proxy_endpoints(&v2).is_empty().then(|| written.elapsed())
    });
    assert!(removed < Duration::from_secs(1), "a removed endpoint took {removed:?}");

    // A bad rule: reported by analyze (field and line) and by the proxy's NACK, while the last
    // good config keeps serving.
    let bad = rule("virtual-service-reviews-50-v3.yaml")
        .replace("  http:\n  - route:", "  http:\n  - timeout: 5 sec\n    route:");
    write_atomic(&mesh.config.path().join("reviews.yaml"), &bad);
    let (ok, out) = mesh.pilot(&["analyze", "-f", &mesh.config.path().display().to_string()]);
    assert!(!ok, "analyze should fail on the bad rule:\n{out}");
    let line = out.lines().find(|l| l.contains("spec.http[0].timeout")).unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("Error [IST0106] (VirtualService default/reviews)") && line.contains("reviews.yaml:10"),
        "{line}"
    );
    // Still jason → v2 and everyone else v3: the rules in force before the bad file.
    let status = wait_until(Duration::from_secs(10), "the proxy's NACK in mesh-pilot status", || {
        let (_, out) = mesh.pilot(&["status", "--admin", PILOT_ADMIN]);
        out.contains("ERROR").then_some(out)
    });
    let row = status.lines().find(|l| l.starts_with("productpage-v1.default")).unwrap_or_else(|| panic!("{status}"));
    assert_eq!(row.split_whitespace().collect::<Vec<_>>()[2..6], ["SYNCED", "SYNCED", "SYNCED", "ERROR"], "{status}");
    assert!(status.contains("NACK") && status.contains("timeout"), "{status}");
    let seen = pod.run(|| shares(100, &[]));
    assert_eq!(seen.get("v3"), Some(&100), "{seen:?}");
}
