//! `cargo xtask bench-pilot`: mesh-pilot at scale (issue 15's goal). A generated directory of
//! 1,000 services × 10 endpoints (each with its Pods, a DestinationRule with two subsets and a
//! 90/10 VirtualService) is served by `mesh-pilot serve --config-dir` pinned to one CPU, to 2,000
//! simulated proxies in this process (pinned to the other CPU) that long-poll their namespace's
//! endpoints the way mesh-proxy does (ETag, `Prefer: wait`, deltas, pinned fetches of the other
//! types when they move). One endpoint changes every 100 ms, by rewriting a service's file (so the
//! latency includes the file watch); every proxy's scope holds every service, so every change
//! concerns all 2,000.
//!
//! Measured: per change, the time from the file being written to the last proxy having the new
//! address (p50, p99, max), mesh-pilot's resident memory (VmRSS, VmHWM) and CPU, and the time of a
//! full config build with every scope rendered (from mesh-pilot's own histogram).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_lab::{write_atomic, Proc, TempDir};

#[derive(clap::Args)]
pub struct PilotArgs {
    #[arg(long, default_value = "1000")]
    pub services: usize,
    #[arg(long, default_value = "10")]
    pub endpoints: usize,
    #[arg(long, default_value = "20")]
    pub namespaces: usize,
    #[arg(long, default_value = "2000")]
    pub proxies: usize,
    /// Seconds of endpoint changes (one every --interval).
    #[arg(long, default_value = "30", value_parser = crate::parse_secs)]
    pub duration: Duration,
    /// Between two endpoint changes.
    #[arg(long, default_value = "0.1", value_parser = crate::parse_secs)]
    pub interval: Duration,
    /// Full config builds measured after the endpoint changes.
    #[arg(long, default_value = "5")]
    pub rebuilds: usize,
    /// A directory with mesh-pilot already built; else it is built in release mode.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where the report goes [default: bench/pilot.md in the workspace].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Base endpoint `e` of service `s`: 10.200.(s/25).(s%25*10+e).
fn endpoint_ip(s: usize, e: usize) -> String {
    format!("10.200.{}.{}", s / 25, (s % 25) * 10 + e)
}

/// Change `c` puts this address in place of its service's first endpoint; the proxies read the
/// change's number back from it.
fn marker_ip(c: usize) -> String {
    format!("10.200.{}.{}", 100 + (c / 256) % 100, c % 256)
}

fn marker_of(addr: &str) -> Option<usize> {
    let ip = addr.split(':').next()?;
    let o: Vec<usize> = ip.split('.').filter_map(|x| x.parse().ok()).collect();
    (o.len() == 4 && o[2] >= 100).then(|| (o[2] - 100) * 256 + o[3])
}

/// One service's file: Service, its Pods and EndpointSlice, a DestinationRule and a VirtualService.
fn service_file(s: usize, a: &PilotArgs, first: &str, v1_weight: u32) -> String {
    let ns = format!("ns-{}", s % a.namespaces);
    let name = format!("svc-{s}");
    let mut y = String::new();
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: 10.200.{}.{}\n  \
         ports: [{{name: http, port: 8080}}]\n  selector: {{app: {name}}}\n---\n",
        200 + s / 250,
        s % 250
    );
    let _ = write!(
        y,
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for e in 0..a.endpoints {
        let ip = if e == 0 { first.to_string() } else { endpoint_ip(s, e) };
        let _ = writeln!(
            y,
            "- {{addresses: [{ip}], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {name}-{e}}}}}"
        );
    }
    for e in 0..a.endpoints {
        let version = if e % 2 == 0 { "v1" } else { "v2" };
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-{e}, namespace: {ns}, labels: {{app: {name}, version: {version}}}}}\n\
             status: {{phase: Running, podIP: {}}}\n",
            endpoint_ip(s, e)
        );
    }
    let _ = write!(
        y,
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  host: {name}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  hosts: [{name}]\n  http:\n  - route:\n    - {{destination: {{host: {name}, subset: v1}}, weight: {v1_weight}}}\n    \
         - {{destination: {{host: {name}, subset: v2}}, weight: {}}}\n",
        100 - v1_weight
    );
    y
}

/// What the simulated proxies saw: per change and proxy, when (µs since start) it arrived.
struct Recorder {
    start: Instant,
    proxies: usize,
    arrivals: Vec<AtomicU64>,
    /// Proxies that have their first full config.
    ready: AtomicUsize,
    fetches: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn arrived(&self, change: usize, proxy: usize) {
        if let Some(slot) = self.arrivals.get(change * self.proxies + proxy) {
            let _ = slot.compare_exchange(0, self.now(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

struct Answer {
    status: u16,
    etag: String,
    snapshot: String,
    body: Bytes,
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    req: http::Request<Empty<Bytes>>,
) -> Result<Answer> {
    let resp = sender.send_request(req).await?;
    let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (status, etag, snapshot) = (resp.status().as_u16(), h("etag"), h("x-mesh-snapshot"));
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Answer { status, etag, snapshot, body })
}

/// One simulated proxy: mesh-proxy's discovery client, recording which changes reached it.
async fn proxy(addr: SocketAddr, ns: String, id: usize, rec: Arc<Recorder>) {
    let node = format!("proxy-{id}.{ns}");
    let base = format!("/ns/{ns}/v1");
    let mut first = true;
    while !rec.stop.load(Ordering::Relaxed) {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            rec.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
            continue;
        };
        tokio::spawn(conn);
        let (mut etag, mut snapshot, mut config) = (String::new(), String::new(), String::new());
        loop {
            if rec.stop.load(Ordering::Relaxed) {
                return;
            }
            let mut req = http::Request::get(format!("{base}/endpoints"))
                .header("host", "pilot")
                .header("x-mesh-node", &node)
                .header("x-mesh-delta", "1");
            if !snapshot.is_empty() {
                req =
                    req.header("if-none-match", &etag).header("x-mesh-snapshot", &snapshot).header("prefer", "wait=30");
            }
            let a = match get(&mut sender, req.body(Empty::new()).expect("request")).await {
                Ok(a) => a,
                Err(_) => {
                    rec.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            rec.fetches.fetch_add(1, Ordering::Relaxed);
            match a.status {
                200 => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&a.body) {
                        if v.get("since").is_some() {
                            for r in v["resources"].as_array().into_iter().flatten() {
                                for addr in r["addresses"].as_array().into_iter().flatten() {
                                    if let Some(c) = addr.as_str().and_then(marker_of) {
                                        rec.arrived(c, id);
                                    }
                                }
                            }
                        }
                    }
                    // The other types, pinned to this snapshot, when they moved.
                    let cfg: String = a.snapshot.split(' ').take(3).collect::<Vec<_>>().join(" ");
                    if cfg != config {
                        for t in ["listeners", "routes", "clusters"] {
                            let req = http::Request::get(format!("{base}/{t}"))
                                .header("host", "pilot")
                                .header("x-mesh-node", &node)
                                .header("x-mesh-snapshot", &a.snapshot)
                                .body(Empty::new())
                                .expect("request");
                            if get(&mut sender, req).await.is_err() {
                                rec.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        config = cfg;
                    }
                    etag = a.etag.trim_matches('"').to_string();
                    snapshot = a.snapshot;
                    if std::mem::take(&mut first) {
                        rec.ready.fetch_add(1, Ordering::Relaxed);
                    }
                }
                304 => {}
                _ => {
                    rec.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn proc_status(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with(field)).with_context(|| format!("{field} in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = s.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// `sum` and `count` of mesh-pilot's config build histogram.
async fn config_builds(admin: SocketAddr) -> Result<(f64, u64)> {
    let stream = tokio::net::TcpStream::connect(admin).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let a = get(&mut sender, http::Request::get("/metrics").header("host", "pilot").body(Empty::new())?).await?;
    let text = String::from_utf8_lossy(&a.body);
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let sum = value("mesh_pilot_snapshot_build_seconds_sum{kind=\"config\"}");
    let count = value("mesh_pilot_snapshot_build_seconds_count{kind=\"config\"}");
    Ok((sum, count as u64))
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub fn run(args: PilotArgs) -> Result<()> {
    let pilot = match &args.bin_dir {
        Some(d) => d.join("mesh-pilot"),
        None => {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            eprintln!("bench-pilot: cargo build --release -p mesh-pilot");
            let ok = Command::new(cargo)
                .current_dir(crate::bench::workspace_root())
                .args(["build", "--release", "-p", "mesh-pilot"])
                .status()?
                .success();
            if !ok {
                bail!("building mesh-pilot failed");
            }
            crate::bench::workspace_root().join("target/release/mesh-pilot")
        }
    };
    let load_before =
        std::fs::read_to_string("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    if hard < (args.proxies as u64) * 2 + 500 {
        bail!("the descriptor limit ({hard}) is too low for {} proxies", args.proxies);
    }
    let dir = TempDir::new("pilotbench");
    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg)?;
    for s in 0..args.services {
        std::fs::write(cfg.join(format!("svc-{s}.yaml")), service_file(s, &args, &endpoint_ip(s, 0), 90))?;
    }
    let (listen, admin) = (mesh_lab::free_port(), mesh_lab::free_port());
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(&pilot).args(["serve", "--config-dir"]).arg(&cfg);
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--log-level",
        "warn",
    ]);
    let mut server = Proc::spawn_logged("mesh-pilot", &mut cmd, &dir.path().join("pilot.log"));
    let pid = server.pid();
    // Read before pinning: afterwards this process sees one CPU.
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    pin_to_cpu(1)?;
    let listen: SocketAddr = format!("127.0.0.1:{listen}").parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse()?;
    let changes = (args.duration.as_secs_f64() / args.interval.as_secs_f64()).ceil() as usize;
    let rec = Arc::new(Recorder {
        start: Instant::now(),
        proxies: args.proxies,
        arrivals: (0..changes * args.proxies).map(|_| AtomicU64::new(0)).collect(),
        ready: AtomicUsize::new(0),
        fetches: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = rt.block_on(async {
        mesh_lab::wait_until_async(Duration::from_secs(120), "mesh-pilot to listen", || async {
            tokio::net::TcpStream::connect(admin).await.ok().map(|_| ())
        })
        .await;
        let t0 = Instant::now();
        for p in 0..args.proxies {
            tokio::spawn(proxy(listen, format!("ns-{}", p % args.namespaces), p, rec.clone()));
        }
        while rec.ready.load(Ordering::Relaxed) < args.proxies {
            server.ensure_running()?;
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("only {} of {} proxies got their config in 300 s", rec.ready.load(Ordering::Relaxed), args.proxies);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let connect_time = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_idle = proc_status(pid, "VmRSS:")?;

        // Endpoint changes, one every interval, each to the next service.
        let cpu0 = cpu_seconds(pid)?;
        let fetches0 = rec.fetches.load(Ordering::Relaxed);
        let mut written = Vec::with_capacity(changes);
        let mut tick = tokio::time::interval(args.interval);
        for c in 0..changes {
            tick.tick().await;
            let s = c % args.services;
            let path = cfg.join(format!("svc-{s}.yaml"));
            written.push(rec.now());
            write_atomic(&path, &service_file(s, &args, &marker_ip(c), 90));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cpu = cpu_seconds(pid)? - cpu0;
        let fetches = rec.fetches.load(Ordering::Relaxed) - fetches0;
        let rss_changes = proc_status(pid, "VmRSS:")?;

        // Full config builds: a VirtualService edit rebuilds every scope.
        let mut builds = Vec::new();
        for r in 0..args.rebuilds {
            let (sum0, count0) = config_builds(admin).await?;
            let s = r % args.services;
            write_atomic(&cfg.join(format!("svc-{s}.yaml")), &service_file(s, &args, &endpoint_ip(s, 0), 80 - r as u32));
            let (sum, _) = mesh_lab::wait_until_async(Duration::from_secs(30), "a config build", || async {
                config_builds(admin).await.ok().filter(|(_, c)| *c > count0)
            })
            .await;
            builds.push((sum - sum0) * 1000.0);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        rec.stop.store(true, Ordering::Relaxed);
        let hwm = proc_status(pid, "VmHWM:")?;

        // Per change: when the last proxy had it.
        let mut all = Vec::new();
        let mut missing = 0usize;
        let mut per_proxy = Vec::new();
        for (c, w) in written.iter().enumerate() {
            let mut last = 0u64;
            for p in 0..args.proxies {
                match rec.arrivals[c * args.proxies + p].load(Ordering::Relaxed) {
                    0 => missing += 1,
                    t => {
                        last = last.max(t);
                        per_proxy.push(t.saturating_sub(*w) as f64 / 1000.0);
                    }
                }
            }
            all.push(last.saturating_sub(*w) as f64 / 1000.0);
        }
        all.sort_by(f64::total_cmp);
        per_proxy.sort_by(f64::total_cmp);
        let mut out = String::new();
        let date = String::from_utf8(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output()?.stdout)?;
        let _ = writeln!(out, "# mesh-pilot at scale\n");
        let _ = writeln!(out, "`{}` on {} ({} cores; load before: {load_before}; the machine is shared with other engineers' builds).\n", crate::bench::command_line(), date.trim(), cores);
        let _ = writeln!(
            out,
            "{} services × {} endpoints (with their Pods, a DestinationRule with two subsets, a 90/10 VirtualService) in {} namespaces; \
             {} simulated proxies long-polling (ETag, `Prefer: wait=30`, endpoint deltas); mesh-pilot pinned to CPU 0 (`taskset -c 0`), \
             the proxies to CPU 1; one endpoint changed every {} ms for {} s by rewriting a service's file.\n",
            args.services, args.endpoints, args.namespaces, args.proxies, args.interval.as_millis(), args.duration.as_secs()
        );
        let _ = writeln!(out, "| measure | value | goal |\n|---|---:|---|");
        let _ = writeln!(out, "| change → every proxy has it, p50 | {:.0} ms | |", percentile(&all, 0.5));
        let _ = writeln!(out, "| change → every proxy has it, p99 | {:.0} ms | < 1 s |", percentile(&all, 0.99));
        let _ = writeln!(out, "| change → every proxy has it, max | {:.0} ms | |", all.last().copied().unwrap_or(f64::NAN));
        let _ = writeln!(out, "| change → one proxy has it, p50 / p99 | {:.0} / {:.0} ms | |", percentile(&per_proxy, 0.5), percentile(&per_proxy, 0.99));
        let _ = writeln!(out, "| (change, proxy) pairs never delivered | {missing} of {} | 0 |", changes * args.proxies);
        let _ = writeln!(out, "| mesh-pilot RSS: proxies connected / after the changes / peak (VmHWM) | {:.0} / {:.0} / {:.0} MiB | < 300 MB |", rss_idle as f64 / 1024.0, rss_changes as f64 / 1024.0, hwm as f64 / 1024.0);
        let _ = writeln!(out, "| mesh-pilot CPU during the changes | {:.0}% of one core | |", 100.0 * cpu / (args.duration.as_secs_f64() + 3.0));
        let _ = writeln!(out, "| discovery requests answered during the changes | {fetches} | |");
        let builds_txt: Vec<String> = builds.iter().map(|b| format!("{b:.0}")).collect();
        let _ = writeln!(out, "| full config build, every scope rendered ({} builds) | {} ms | < 200 ms |", builds.len(), builds_txt.join(", "));
        let _ = writeln!(out, "| all proxies connected and configured from cold | {:.1} s | |", connect_time.as_secs_f64());
        let _ = writeln!(out, "| client errors (reconnects, failed fetches) | {} | |", rec.errors.load(Ordering::Relaxed));
        anyhow::Ok(out)
    })?;
    drop(server);
    print!("{report}");
    let out = args.out.clone().unwrap_or_else(|| crate::bench::workspace_root().join("bench/pilot.md"));
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("bench-pilot: wrote {}", out.display());
    Ok(())
}
