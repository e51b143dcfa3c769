//! `cargo xtask config-scale`: how long mesh-proxy takes to load and reload a large config, and
//! whether `/ready` answers meanwhile (issue 12, item 6: 10,000 routes × 10 endpoints once took
//! 35 s to load and 78 s to reload, with `/ready` unanswered throughout).
//!
//! The release binary runs alone in a namespace of its own (loopback only). Measured:
//! - start: from the spawn to the first `/ready` 200 (the file read, parsed, validated, built);
//! - each reload: from the proxy's own log, "config file read; applying it" to "configuration
//!   applied" (parse, validate, build, swap), and from the file's rename to that line;
//! - the slowest `/ready` answer on the admin and readiness ports while the reloads ran (a probe
//!   every 10 ms each);
//! - the proxy's resident memory after the reloads.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_lab::{try_wait_until, write_atomic, Netns, Proc, TempDir};

#[derive(clap::Args)]
pub struct ScaleArgs {
    #[arg(long, default_value = "10000")]
    pub routes: usize,
    /// Endpoints per route (each route has a cluster of its own).
    #[arg(long, default_value = "10")]
    pub endpoints: usize,
    #[arg(long, default_value = "5")]
    pub reloads: usize,
    /// A directory with mesh-proxy already built; else it is built in release mode.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

const ADMIN: &str = "127.0.0.1:15090";
const READINESS: &str = "127.0.0.1:15021";

/// `routes` routes each with its own cluster of `endpoints` endpoints; `variant` moves every
/// endpoint's port, so each variant is a different config throughout.
fn config(routes: usize, endpoints: usize, variant: usize) -> String {
    let mut y = format!(
        "admin: {{ address: {ADMIN} }}\nreadiness: {{ address: \"0.0.0.0:15021\" }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:15000 }}\nroutes:\n"
    );
    for i in 0..routes {
        y.push_str(&format!(
            "  - {{ name: r{i}, destinations: [\"svc-{i}.ns:80\"], protocol: http, rules: [{{ clusters: [{{ name: c{i} }}] }}] }}\n"
        ));
    }
    y.push_str("clusters:\n");
    for i in 0..routes {
        y.push_str(&format!("  - {{ name: c{i} }}\n"));
    }
    y.push_str("endpoints:\n");
    for i in 0..routes {
        let eps: Vec<String> = (0..endpoints)
            .map(|j| format!("\"10.200.{}.{}:{}\"", 10 + i / 256 % 240, i % 256, 1000 + variant * 100 + j))
            .collect();
        y.push_str(&format!("  - {{ cluster: c{i}, addresses: [{}] }}\n", eps.join(", ")));
    }
    y
}

/// One `GET /ready` on a fresh connection: (status, how long it took).
fn ready(addr: &str) -> (u16, Duration) {
    let start = Instant::now();
    let status = (|| -> Option<u16> {
        let addr: SocketAddr = addr.parse().ok()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    })();
    (status.unwrap_or(0), start.elapsed())
}

/// Seconds since midnight of a tracing timestamp (`2026-11-28T13:19:19.898329Z`).
fn log_time(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = t.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

fn log_lines(log: &Path) -> Vec<String> {
    let bytes = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&bytes).lines().map(str::to_string).collect()
}

/// CPU seconds (user + system) the process has used: `/proc/<pid>/stat`'s utime and stime, in
/// clock ticks of 10 ms.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 of `rest`, which starts at 3.
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (field(11) + field(12)) as f64 / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

pub fn run(args: ScaleArgs) -> Result<()> {
    let bin = proxy_binary(&args.bin_dir)?;
    let load = std::fs::read_to_string("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let dir = TempDir::new("scale");
    let path = dir.path().join("proxy.yaml");
    let log = dir.path().join("proxy.log");
    let first = config(args.routes, args.endpoints, 0);
    eprintln!(
        "config-scale: {} routes × {} endpoints, {:.1} MB of YAML; load average before: {load}",
        args.routes,
        args.endpoints,
        first.len() as f64 / 1e6
    );
    std::fs::write(&path, &first)?;
    let ns = Netns::new("scale");
    let started = Instant::now();
    let mut proxy = Proc::spawn_logged(
        "mesh-proxy",
        ns.command(&bin).arg("--config").arg(&path).args(["--workers", "1", "--log-level", "info"]),
        &log,
    );
    ns.run(|| {
        try_wait_until(Duration::from_secs(600), "the first /ready 200", || {
            proxy.ensure_running()?;
            Ok((ready(ADMIN).0 == 200).then_some(()))
        })
    })?;
    let start = started.elapsed();
    let start_cpu = cpu_secs(proxy.pid());
    eprintln!("config-scale: ready {:.3} s after the spawn", start.as_secs_f64());

    // Probes on both ports for the whole reload phase.
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(Mutex::new([(0u16, Duration::ZERO); 2]));
    let probes = ns.run(|| {
        std::thread::scope(|s| -> Result<Vec<(f64, f64, f64)>> {
            for (i, addr) in [ADMIN, READINESS].into_iter().enumerate() {
                let (stop, worst) = (stop.clone(), worst.clone());
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let (status, took) = ready(addr);
                        let mut w = worst.lock().unwrap();
                        if took > w[i].1 || status != 200 {
                            w[i] = (if status != 200 { status } else { w[i].0.max(status) }, took.max(w[i].1));
                        }
                        drop(w);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
            }
            let result = reloads(&args, &path, &log, &mut proxy);
            stop.store(true, Ordering::Relaxed);
            result
        })
    })?;
    let rss = rss_kib(proxy.pid());
    let worst = *worst.lock().unwrap();
    println!("\n## mesh-proxy config scale ({} routes × {} endpoints)\n", args.routes, args.endpoints);
    println!("`cargo xtask config-scale --routes {} --endpoints {}` (release build, one data-plane worker; load average before: {load}):\n", args.routes, args.endpoints);
    println!("| | |\n|---|---|");
    println!("| YAML | {:.1} MB |", first.len() as f64 / 1e6);
    println!("| start: spawn → first `/ready` 200 / CPU used | {:.3} s / {start_cpu:.2} s |", start.as_secs_f64());
    for (i, (build, total, cpu)) in probes.iter().enumerate() {
        println!(
            "| reload {}: file read → applied (log) / rename → applied / CPU used | {build:.3} s / {total:.3} s / {cpu:.2} s |",
            i + 1
        );
    }
    println!(
        "| slowest `/ready` during the reloads: admin / readiness | {:.1} ms / {:.1} ms (non-200 seen: {}) |",
        worst[0].1.as_secs_f64() * 1e3,
        worst[1].1.as_secs_f64() * 1e3,
        worst.iter().any(|w| w.0 != 200 && w.0 != 0)
    );
    println!("| resident memory after the reloads (VmRSS) | {:.1} MiB |", rss as f64 / 1024.0);
    Ok(())
}

/// Rewrites the file `args.reloads` times; for each, (read → applied, rename → applied, CPU)
/// seconds.
fn reloads(args: &ScaleArgs, path: &Path, log: &Path, proxy: &mut Proc) -> Result<Vec<(f64, f64, f64)>> {
    let mut out = Vec::new();
    for r in 1..=args.reloads {
        let text = config(args.routes, args.endpoints, r);
        let cpu = cpu_secs(proxy.pid());
        let before = log_lines(log).iter().filter(|l| l.contains("configuration applied")).count();
        let renamed = Instant::now();
        write_atomic(path, &text);
        let lines = try_wait_until(Duration::from_secs(600), "the reload applied", || {
            proxy.ensure_running()?;
            let lines = log_lines(log);
            if lines.iter().any(|l| l.contains("configuration update rejected")) {
                bail!("the reload was rejected: {}", lines.iter().rev().find(|l| l.contains("rejected")).unwrap());
            }
            Ok((lines.iter().filter(|l| l.contains("configuration applied")).count() > before).then_some(lines))
        })?;
        let total = renamed.elapsed().as_secs_f64();
        let read = lines.iter().rev().find(|l| l.contains("config file read; applying it")).and_then(|l| log_time(l));
        let applied = lines.iter().rev().find(|l| l.contains("configuration applied")).and_then(|l| log_time(l));
        let build = match (read, applied) {
            (Some(a), Some(b)) => b - a,
            _ => bail!("the log lacks the reload's timestamps"),
        };
        let cpu = cpu_secs(proxy.pid()) - cpu;
        eprintln!(
            "config-scale: reload {r}: read → applied {build:.3} s, rename → applied {total:.3} s, CPU {cpu:.2} s"
        );
        out.push((build, total, cpu));
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(out)
}

/// The release mesh-proxy: from `bin_dir`, or built now.
pub fn proxy_binary(bin_dir: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = bin_dir {
        return Ok(d.join("mesh-proxy"));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("cargo build --release -p mesh-proxy");
    let ok = Command::new(cargo)
        .current_dir(crate::bench::workspace_root())
        .args(["build", "--release", "-p", "mesh-proxy", "--bin", "mesh-proxy"])
        .status()
        .context("running cargo")?
        .success();
    if !ok {
        bail!("building mesh-proxy failed");
    }
    Ok(crate::bench::workspace_root().join("target/release/mesh-proxy"))
}
