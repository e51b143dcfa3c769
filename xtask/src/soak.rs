//! `cargo xtask soak [--quick]`: mesh-proxy under everything at once for 10 minutes (2 with
//! `--quick`), issue 12's closing check: a steady keep-alive load and slow uploads that must all
//! be served, while the config is rewritten every second (every tenth write an empty or broken
//! file, which must be rejected), backends are restarted the way a rollout restarts them, and
//! hostile clients (slowloris, clients that never read, garbage bytes, half-closed requests) come
//! and go. Measured: requests served and failed (each failure with its reason), rejected and
//! applied updates, and the proxy's resident memory and descriptors over the run.
//!
//! The release binary runs in a namespace of its own (loopback only): the application dials the
//! listener directly and a route claims that address, so no capture rules are involved (the
//! reliability suite covers the proxy behind mesh-init's rules).
//!
//! A backend restart is a rollout's: the endpoint leaves the config, the backend gets SIGTERM 1 s
//! later, starts again and comes back into the config once it answers. A backend killed with
//! requests in flight on it loses them (the proxy has no retry policy by default, as Istio
//! without a VirtualService `retries`); that case is the reliability suite's and the drain's,
//! not counted here.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use mesh_lab::{try_wait_until, write_atomic, Netns, Proc, TempDir};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// 2 minutes instead of 10.
    #[arg(long)]
    pub quick: bool,
    /// A directory with mesh-proxy already built; else it is built in release mode.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

const LISTEN: &str = "127.0.0.1:15001";
const ADMIN: &str = "127.0.0.1:15090";
const BACKENDS: [&str; 3] = ["127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"];

/// A keep-alive HTTP/1.1 backend answering `ok <name>` (after reading any body). Arguments:
/// name, port.
const BACKEND_PY: &str = r#"
import sys, http.server
name, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        body = f"ok {name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = answer
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512
S(("127.0.0.1", port), H).serve_forever()
"#;

/// The config with the route to `endpoints`; `n` (the write's number) changes the file each time.
fn config(endpoints: &[&str], n: u64) -> String {
    let eps = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "# write {n}
admin: {{ address: \"{ADMIN}\" }}
drain_timeout: 1s
listeners:
  - {{ name: app, address: \"{LISTEN}\" }}
routes:
  - name: svc
    destinations: [\"{LISTEN}\"]
    protocol: http
    rules: [{{ clusters: [{{ name: backend }}] }}]
clusters:
  - {{ name: backend, connect_timeout: 1s }}
endpoints:
  - {{ cluster: backend, addresses: [{eps}] }}
"
    )
}

/// What the clients that must be served saw.
#[derive(Default)]
struct Tally {
    served: AtomicU64,
    failed: AtomicU64,
    /// The first failures, with their reasons.
    reasons: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, result: std::io::Result<u16>, what: &str) -> bool {
        match result {
            Ok(200) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                true
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut r = self.reasons.lock().unwrap();
                if r.len() < 20 {
                    r.push(format!("{what}: {other:?}"));
                }
                false
            }
        }
    }
}

/// Reads one response's status and its Content-Length body.
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before the status line"));
    }
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed in the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status)
}

fn connect() -> std::io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(LISTEN)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

/// A keep-alive client sending GETs one after another.
fn steady(stop: &AtomicBool, tally: &Tally) {
    let mut conn = connect().ok();
    while !stop.load(Ordering::Relaxed) {
        let result = match conn.as_mut() {
            Some(c) => c
                .get_mut()
                .write_all(format!("GET / HTTP/1.1\r\nHost: {LISTEN}\r\n\r\n").as_bytes())
                .and_then(|()| read_response(c)),
            None => Err(std::io::Error::other("could not connect")),
        };
        // A connection the proxy closed between two requests (its drain says so; here it never
        // drains) would be a failure too: every outcome but 200 counts.
        if !tally.record(result, "steady GET") {
            thread::sleep(Duration::from_millis(20));
            conn = connect().ok();
        }
    }
}

/// Uploads of 4 KiB in 16 pieces over ~1.6 s, on fresh connections.
fn slow_upload(stop: &AtomicBool, tally: &Tally) {
    while !stop.load(Ordering::Relaxed) {
        let result = connect().and_then(|mut c| {
            let head = format!("POST /up HTTP/1.1\r\nHost: {LISTEN}\r\nContent-Length: 4096\r\n\r\n");
            c.get_mut().write_all(head.as_bytes())?;
            for _ in 0..16 {
                thread::sleep(Duration::from_millis(100));
                c.get_mut().write_all(&[b'x'; 256])?;
            }
            read_response(&mut c)
        });
        tally.record(result, "slow upload");
    }
}

/// Hostile and careless clients in turn; only the half-closed request must be served.
fn hostile(stop: &AtomicBool, tally: &Tally) {
    let mut turn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let _ = (|| -> std::io::Result<()> {
            let mut c = connect()?;
            match turn % 4 {
                // Slowloris: half a request head, then silence.
                0 => {
                    c.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-a: ")?;
                    thread::sleep(Duration::from_secs(2));
                }
                // Pipelines 200 requests and never reads the answers.
                1 => {
                    let req = format!("GET / HTTP/1.1\r\nHost: {LISTEN}\r\n\r\n").repeat(200);
                    c.get_mut().write_all(req.as_bytes())?;
                    thread::sleep(Duration::from_secs(2));
                }
                // Not HTTP: a TLS ClientHello's first bytes, then garbage.
                2 => {
                    c.get_mut().write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")?;
                    let mut sink = Vec::new();
                    let _ = c.read_to_end(&mut sink);
                }
                // A request, then shutdown(SHUT_WR): must be served.
                _ => {
                    c.get_mut().write_all(format!("GET / HTTP/1.1\r\nHost: {LISTEN}\r\n\r\n").as_bytes())?;
                    c.get_mut().shutdown(Shutdown::Write)?;
                    tally.record(read_response(&mut c), "half-closed GET");
                }
            }
            Ok(())
        })();
    }
}

/// Where the backend being restarted is.
#[derive(Clone, Copy)]
enum Rollout {
    Serving,
    /// Out of the config since then.
    Out(usize, Instant),
    /// Started again, not answering yet.
    Starting(usize),
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn count_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains(needle)).count()
}

fn backend(ns: &Netns, i: usize) -> Proc {
    let port = BACKENDS[i].rsplit(':').next().unwrap();
    Proc::spawn(ns.command("python3").args(["-u", "-c", BACKEND_PY, &format!("b{i}"), port]))
}

fn answers(addr: &str) -> bool {
    TcpStream::connect(addr).is_ok()
}

pub fn run(args: SoakArgs) -> Result<()> {
    let bin = crate::scale::proxy_binary(&args.bin_dir)?;
    let length = if args.quick { Duration::from_secs(120) } else { Duration::from_secs(600) };
    let load = std::fs::read_to_string("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let dir = TempDir::new("soak");
    let path = dir.path().join("proxy.yaml");
    let log = dir.path().join("proxy.log");
    let ns = Netns::new("soak");
    let mut backends: Vec<Proc> = (0..BACKENDS.len()).map(|i| backend(&ns, i)).collect();
    ns.run(|| {
        try_wait_until(Duration::from_secs(10), "the backends", || {
            Ok(BACKENDS.iter().all(|b| answers(b)).then_some(()))
        })
    })?;
    let mut writes = 0u64;
    std::fs::write(&path, config(&BACKENDS, writes))?;
    let mut proxy = Proc::spawn_logged(
        "mesh-proxy",
        ns.command(&bin).arg("--config").arg(&path).args(["--workers", "2", "--log-level", "info,access=off"]),
        &log,
    );
    ns.run(|| {
        try_wait_until(Duration::from_secs(20), "mesh-proxy", || {
            proxy.ensure_running()?;
            Ok(answers(LISTEN).then_some(()))
        })
    })?;
    let pid = proxy.pid();
    eprintln!("soak: {} s, load average before: {load}", length.as_secs());

    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    let mut samples: Vec<(u64, usize)> = Vec::new();
    let (mut restarts, mut broken_writes) = (0u64, 0u64);
    ns.run(|| {
        thread::scope(|s| -> Result<()> {
            for _ in 0..4 {
                s.spawn(|| steady(&stop, &tally));
            }
            for _ in 0..2 {
                s.spawn(|| slow_upload(&stop, &tally));
            }
            s.spawn(|| hostile(&stop, &tally));
            let started = Instant::now();
            let mut rollout = Rollout::Serving;
            let mut next_restart = 0usize;
            let mut tick = 0u64;
            let result = (|| -> Result<()> {
                while started.elapsed() < length {
                    thread::sleep(Duration::from_secs(1));
                    tick += 1;
                    proxy.ensure_running()?;
                    // A rollout of one backend every 7 s: out of the config, SIGTERM 3 s later
                    // (longer than a slow upload), started again, back once it answers.
                    rollout = match rollout {
                        Rollout::Serving if tick.is_multiple_of(7) => Rollout::Out(next_restart, Instant::now()),
                        Rollout::Out(i, since) if since.elapsed() >= Duration::from_secs(3) => {
                            backends[i].signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(5));
                            backends[i] = backend(&ns, i);
                            restarts += 1;
                            Rollout::Starting(i)
                        }
                        Rollout::Starting(i) if !backends[i].is_running() => bail!("backend {i} did not start again"),
                        Rollout::Starting(i) if answers(BACKENDS[i]) => {
                            next_restart = (i + 1) % BACKENDS.len();
                            Rollout::Serving
                        }
                        other => other,
                    };
                    let out = match rollout {
                        Rollout::Out(i, _) | Rollout::Starting(i) => Some(i),
                        Rollout::Serving => None,
                    };
                    writes += 1;
                    let serving: Vec<&str> =
                        (0..BACKENDS.len()).filter(|&i| out != Some(i)).map(|i| BACKENDS[i]).collect();
                    let good = config(&serving, writes);
                    let text = match writes % 10 {
                        // Emptied (`: > file`), or cut inside the endpoint list: must be rejected.
                        0 if writes.is_multiple_of(20) => String::new(),
                        0 => good[..good.rfind("addresses: [").unwrap() + 13].to_string(),
                        _ => good,
                    };
                    if writes.is_multiple_of(10) {
                        broken_writes += 1;
                    }
                    write_atomic(&path, &text);
                    if tick.is_multiple_of(5) {
                        samples.push((rss_kib(pid), fds(pid)));
                    }
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            result
        })
    })?;
    proxy.ensure_running()?;
    let (served, failed) = (tally.served.load(Ordering::Relaxed), tally.failed.load(Ordering::Relaxed));
    let applied = count_lines(&log, "configuration applied");
    let rejected = count_lines(&log, "configuration update rejected");
    let (first, last) = (samples.first().copied().unwrap_or_default(), samples.last().copied().unwrap_or_default());
    let max_rss = samples.iter().map(|s| s.0).max().unwrap_or(0);
    let max_fds = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!("\n## mesh-proxy soak ({} s)\n", length.as_secs());
    let build = match &args.bin_dir {
        Some(d) => format!("the binary in {}", d.display()),
        None => "release build".to_string(),
    };
    println!(
        "`cargo xtask soak{}` ({build}, 2 data-plane workers; load average before: {load}):\n",
        if args.quick { " --quick" } else { "" }
    );
    println!("| | |\n|---|---|");
    println!(
        "| requests that had to be served (4 keep-alive GET loops, 2 slow-upload loops, half-closed GETs) | {} |",
        served + failed
    );
    println!("| failed | **{failed}** |");
    println!("| config writes / applied / rejected (of {broken_writes} empty or cut files) | {writes} / {applied} / {rejected} |");
    println!("| backend restarts (out of the config, SIGTERM, back) | {restarts} |");
    println!(
        "| proxy RSS first / max / last sample (every 5 s) | {:.1} / {:.1} / {:.1} MiB |",
        first.0 as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        last.0 as f64 / 1024.0
    );
    println!("| proxy descriptors first / max / last sample | {} / {max_fds} / {} |", first.1, last.1);
    for r in tally.reasons.lock().unwrap().iter() {
        println!("\nfailure: {r}");
    }
    drop(backends);
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    Ok(())
}
