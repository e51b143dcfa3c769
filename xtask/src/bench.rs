//! `xtask bench`: sets up the lab, runs every workload on every path — interleaved (each repeat
//! runs a workload on all paths before the next workload, starting with a different path each
//! time) and repeated — then the rule-install benchmark, and writes the report.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use mesh_lab::{interrupt, Proc};

use crate::{
    load::{self, Percentiles},
    network::Backend,
    paths::{self, BenchPath, Bins, PathKind, SidecarMode},
    report, rules,
};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Short runs (about 1 s a measurement, 3 repeats, rules per-rule replay once): under two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Paths to measure [default: all; the eBPF ones are reported "not measured" when
    /// `mesh-init ebpf` does not work in this build].
    #[arg(long, value_enum, value_delimiter = ',', num_args = 1..)]
    pub paths: Vec<PathKind>,
    /// Repeats of every measurement; the report shows medians [default: 3].
    #[arg(long)]
    pub repeats: Option<u32>,
    /// Seconds per load measurement [default: 10; --quick: 1].
    #[arg(long, value_parser = crate::parse_secs)]
    pub duration: Option<Duration>,
    /// Requests per second of the fixed-rate workload.
    #[arg(long, default_value = "1000")]
    pub rate: u32,
    /// Idle connections held for the memory figure.
    #[arg(long, default_value = "10000")]
    pub idle_conns: u32,
    /// Connections of the keep-alive and connection-per-request workloads.
    #[arg(long, default_value = "32")]
    pub conns: u32,
    /// Skip the rule-install benchmark.
    #[arg(long)]
    pub no_rules: bool,
    /// Directory with mesh-init and mesh-proxy already built (e.g. target/debug in tests);
    /// without it they are built in release mode first.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// A sentence for the report's header (e.g. "the machine was shared with other builds").
    #[arg(long)]
    pub note: Vec<String>,
    /// Where results.md and latency.svg go [default: the workspace's bench/].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The settings a run used, after defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub repeats: u32,
    pub duration: Duration,
    /// Fixed-rate runs last at least 2 s (1.5 s in quick mode), so that p99 rests on a couple of
    /// thousand samples at 1,000 req/s.
    pub rate_duration: Duration,
    pub rate: u32,
    pub conns: u32,
    pub idle_conns: u32,
    /// Repeats of the idle workload (it costs several seconds per path).
    pub idle_repeats: u32,
    /// Repeats of the per-rule replay of the large rule set (tens of seconds each).
    pub per_rule_repeats: u32,
}

impl Settings {
    fn from(args: &BenchArgs) -> Settings {
        let repeats = args.repeats.unwrap_or(3).max(1);
        let duration =
            args.duration.unwrap_or(if args.quick { Duration::from_secs(1) } else { Duration::from_secs(10) });
        Settings {
            repeats,
            duration,
            rate_duration: duration.max(if args.quick { Duration::from_millis(1500) } else { Duration::from_secs(2) }),
            rate: args.rate,
            conns: args.conns,
            idle_conns: args.idle_conns,
            idle_repeats: if args.quick { 1 } else { repeats },
            per_rule_repeats: if args.quick { 1 } else { repeats },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    KeepAlive,
    Close,
    Rate,
    Idle,
    Passthrough,
    /// h2load, one connection, 100 concurrent streams (prior-knowledge h2c).
    H2,
}

/// One wrk measurement.
#[derive(Debug, Clone)]
pub struct WrkSample {
    pub rps: f64,
    pub latency: Percentiles,
    pub errors: u64,
    /// Proxy CPU seconds per 1,000 requests (None on the direct path).
    pub cpu_per_1k: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct RateSample {
    pub latency: Percentiles,
    pub sent: u64,
    pub errors: u64,
    pub cpu_per_1k: Option<f64>,
}

/// One h2load measurement.
#[derive(Debug, Clone)]
pub struct H2Sample {
    pub rps: f64,
    pub errors: u64,
    pub cpu_per_1k: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct IdleSample {
    /// KiB resident right after a fresh start, before any connection.
    pub fresh_kib: u64,
    /// KiB resident while holding the connections.
    pub held_kib: u64,
    /// VmHWM at that moment: the peak of this process's life.
    pub peak_kib: u64,
    pub held: u32,
    pub failed: u32,
}

/// Everything measured on one path.
#[derive(Debug, Default)]
pub struct PathSamples {
    pub keep_alive: Vec<WrkSample>,
    pub close: Vec<WrkSample>,
    pub rate: Vec<RateSample>,
    pub passthrough_gbps: Vec<f64>,
    pub h2: Vec<H2Sample>,
    pub idle: Vec<IdleSample>,
}

/// The whole run, as the report needs it.
pub struct Run {
    pub settings: Settings,
    pub command: String,
    pub measured: Vec<PathKind>,
    pub not_measured: Vec<(PathKind, String)>,
    pub samples: BTreeMap<PathKind, PathSamples>,
    pub rules: Vec<(rules::RuleCase, Vec<rules::RuleSample>)>,
    /// Measurements that failed (the run goes on; the report lists them and the exit is non-zero).
    pub errors: Vec<String>,
    /// Which measurements those were, so that the tables can say "failed" instead of "—".
    pub failed: Vec<(PathKind, Workload)>,
    pub started: Instant,
    /// /proc/loadavg before the lab starts: how busy the machine was with other work.
    pub load_before: String,
    pub notes: Vec<String>,
    pub bins: Bins,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("xtask bench needs root: it creates network namespaces and cgroups");
    }
    for tool in ["wrk", "h2load", "iperf3", "nginx", "haproxy", "nsenter", "ip", "iptables-restore"] {
        paths::which(tool)?;
    }
    // Before anything of ours (the build included) runs: how busy the machine is with other work.
    let load_before =
        std::fs::read_to_string("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let fd_limit = raise_nofile_limit()?;
    let mut settings = Settings::from(&args);
    let mut notes = args.note.clone();
    // HAProxy reserves two descriptors per connection (client and server side) and refuses to
    // start when its maxconn does not fit the limit: hold as many as every sidecar can.
    let fit = (fd_limit.saturating_sub(200) / 2).min(u32::MAX as u64) as u32;
    if settings.idle_conns > fit {
        notes.push(format!(
            "{} idle connections were asked for; the descriptor limit here is {fd_limit} (raising it needs CAP_SYS_RESOURCE) \
             and HAProxy needs two descriptors per connection, so {fit} were held on every path.",
            settings.idle_conns
        ));
        settings.idle_conns = fit;
    }
    let command = command_line();
    let bins = match &args.bin_dir {
        Some(dir) => Bins { mesh_init: dir.join("mesh-init"), mesh_proxy: dir.join("mesh-proxy") },
        None => build_release()?,
    };
    for b in [&bins.mesh_init, &bins.mesh_proxy] {
        if !b.is_file() {
            bail!(
                "{} is missing: build it (`cargo build --release -p mesh-init -p mesh-proxy`) or drop --bin-dir",
                b.display()
            );
        }
    }
    let wanted: Vec<PathKind> = if args.paths.is_empty() { PathKind::ALL.to_vec() } else { args.paths.clone() };
    let mut run = Run {
        settings: settings.clone(),
        command,
        measured: vec![],
        not_measured: vec![],
        samples: BTreeMap::new(),
        rules: vec![],
        errors: vec![],
        failed: vec![],
        started: Instant::now(),
        load_before,
        notes,
        bins: bins.clone(),
    };

    let mut backend = Backend::start()?;
    let mut lab_paths: Vec<BenchPath> = Vec::new();
    for kind in wanted {
        if let Some(why) = paths::unavailable(kind, &bins) {
            eprintln!("bench: {kind}: not measured: {why}");
            run.not_measured.push((kind, why));
            continue;
        }
        match BenchPath::setup(kind, &mut backend, &bins, settings.idle_conns) {
            Ok(p) => {
                eprintln!("bench: {kind}: ready");
                run.measured.push(kind);
                run.samples.insert(kind, PathSamples::default());
                lab_paths.push(p);
            }
            Err(e) if kind.uses_ebpf() => {
                let why = format!("setting it up failed: {e:#}");
                eprintln!("bench: {kind}: not measured: {why}");
                run.not_measured.push((kind, why));
            }
            Err(e) => return Err(e.context(format!("setting up {kind}"))),
        }
        interrupt::check()?;
    }

    for r in 0..settings.repeats {
        for workload in
            [Workload::KeepAlive, Workload::Close, Workload::Rate, Workload::H2, Workload::Passthrough, Workload::Idle]
        {
            if workload == Workload::Idle && r >= settings.idle_repeats {
                continue;
            }
            // Rotate the order so that no path always runs first (or right after another).
            let n = lab_paths.len();
            for i in 0..n {
                interrupt::check()?;
                let path = &mut lab_paths[(i + r as usize) % n];
                let kind = path.kind;
                if !kind.runs(workload) {
                    continue;
                }
                if let Err(e) = measure(path, workload, &settings, run.samples.get_mut(&kind).expect("measured path")) {
                    let msg = format!("repeat {}: {workload:?} on {kind}: {e:#}", r + 1);
                    eprintln!("bench: FAILED {msg}");
                    run.errors.push(msg);
                    run.failed.push((kind, workload));
                    // A sidecar that died is restarted so that the other workloads still run.
                    if path.sidecar.as_mut().is_some_and(|s| s.proc.ensure_running().is_err()) {
                        path.restart_sidecar()?;
                    }
                }
            }
        }
    }
    drop(lab_paths);
    drop(backend);

    if !args.no_rules {
        for case in rules::cases() {
            let mut samples = Vec::new();
            for r in 0..settings.repeats {
                interrupt::check()?;
                // The large per-rule replay takes tens of seconds: fewer repeats in quick mode.
                let per_rule = case.args.is_empty() || r < settings.per_rule_repeats;
                match rules::measure(&bins.mesh_init, &case, per_rule) {
                    Ok(s) => {
                        eprintln!(
                            "bench: rules: {}: batch {:.1} ms, per rule {}",
                            case.name,
                            ms(s.batch),
                            s.per_rule.map_or("skipped".into(), |d| format!("{:.1} ms", ms(d)))
                        );
                        samples.push(s);
                    }
                    Err(e) => run.errors.push(format!("rules: {}: {e:#}", case.name)),
                }
            }
            run.rules.push((case, samples));
        }
    }

    let out = args.out.clone().unwrap_or_else(|| workspace_root().join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
    let md = out.join("results.md");
    let svg = out.join("latency.svg");
    std::fs::write(&svg, report::svg(&run)).with_context(|| format!("write {}", svg.display()))?;
    std::fs::write(&md, report::markdown(&run)?).with_context(|| format!("write {}", md.display()))?;
    eprintln!("bench: wrote {} and {} in {:.0} s", md.display(), svg.display(), run.started.elapsed().as_secs_f64());
    if !run.errors.is_empty() {
        bail!("{} measurement(s) failed (listed in {}):\n{}", run.errors.len(), md.display(), run.errors.join("\n"));
    }
    Ok(())
}

/// CPU time (user + system, all threads) `p` has used so far.
fn cpu_time(p: &Proc) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid()))?;
    // Fields after the `(comm)`, which may itself contain spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').context("malformed /proc/PID/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// (VmRSS, VmHWM) of `p` in KiB: resident now, and the peak over the process's life.
fn memory(p: &Proc) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid()))?;
    let field = |name: &str| -> Result<u64> {
        let line =
            status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name} in /proc/PID/status"))?;
        Ok(line.split_whitespace().nth(1).context("malformed status")?.parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn measure(path: &mut BenchPath, workload: Workload, s: &Settings, out: &mut PathSamples) -> Result<()> {
    let kind = path.kind;
    let mode = if workload == Workload::Passthrough { SidecarMode::Tcp } else { SidecarMode::Http };
    path.ensure_mode(mode)?;
    let cpu =
        |path: &BenchPath| -> Result<Option<Duration>> { path.sidecar.as_ref().map(|s| cpu_time(&s.proc)).transpose() };
    let per_1k = |before: Option<Duration>, after: Option<Duration>, requests: u64| -> Option<f64> {
        Some((after? - before?).as_secs_f64() * 1000.0 / requests.max(1) as f64)
    };
    match workload {
        Workload::KeepAlive | Workload::Close => {
            let before = cpu(path)?;
            let w = load::wrk(&path.pod, s.conns, s.duration, workload == Workload::Close)?;
            let after = cpu(path)?;
            eprintln!(
                "bench: {workload:?} {kind}: {:.0} req/s, p50 {:.0} us, p99 {:.0} us, {} errors",
                w.rps, w.latency.p50, w.latency.p99, w.errors
            );
            let sample = WrkSample {
                rps: w.rps,
                latency: w.latency,
                errors: w.errors,
                cpu_per_1k: per_1k(before, after, w.requests),
            };
            if workload == Workload::KeepAlive { &mut out.keep_alive } else { &mut out.close }.push(sample);
        }
        Workload::Rate => {
            let before = cpu(path)?;
            let r = load::rate(&path.pod, s.rate, s.rate_duration)?;
            let after = cpu(path)?;
            eprintln!(
                "bench: Rate {kind}: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, {} errors",
                r.latency.p50, r.latency.p90, r.latency.p99, r.errors
            );
            out.rate.push(RateSample {
                latency: r.latency,
                sent: r.sent,
                errors: r.errors,
                cpu_per_1k: per_1k(before, after, r.sent),
            });
        }
        Workload::H2 => {
            let before = cpu(path)?;
            let h = load::h2load(&path.pod, s.duration)?;
            let after = cpu(path)?;
            eprintln!("bench: H2 {kind}: {:.0} req/s, {} errors", h.rps, h.errors);
            out.h2.push(H2Sample { rps: h.rps, errors: h.errors, cpu_per_1k: per_1k(before, after, h.requests) });
        }
        Workload::Passthrough => {
            let bps = load::iperf3(&path.pod, s.duration)?;
            eprintln!("bench: Passthrough {kind}: {:.2} Gbit/s", bps / 1e9);
            out.passthrough_gbps.push(bps / 1e9);
        }
        Workload::Idle => {
            if path.sidecar.is_none() {
                return Ok(());
            }
            path.restart_sidecar()?;
            std::thread::sleep(Duration::from_millis(300));
            let proc = &path.sidecar.as_ref().expect("sidecar").proc;
            let (fresh_kib, _) = memory(proc)?;
            let (held, (held_kib, peak_kib)) = load::idle(&path.pod, s.idle_conns, || memory(proc))?;
            eprintln!(
                "bench: Idle {kind}: fresh {fresh_kib} KiB, {} connections held ({} failed): {held_kib} KiB, peak {peak_kib} KiB",
                held.held, held.failed
            );
            out.idle.push(IdleSample { fresh_kib, held_kib, peak_kib, held: held.held, failed: held.failed });
        }
    }
    Ok(())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Raises the soft descriptor limit to the hard one (children inherit it; nsenter -S keeps it
/// when it drops to UID 1337) and returns it. The hard limit itself can only be raised with
/// CAP_SYS_RESOURCE, which a container may not have.
fn raise_nofile_limit() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    Ok(hard)
}

/// The command as a user would retype it (shell-quoted).
pub(crate) fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:".contains(c)) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect();
    format!("cargo xtask {}", args.join(" "))
}

/// Builds the binaries under test in release mode, into the current target directory. mesh-init
/// is built with its default features (the eBPF mode) when that works, else without them (the
/// eBPF paths are then reported "not measured").
fn build_release() -> Result<Bins> {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let build = |extra: &[&str]| -> Result<bool> {
        eprintln!("bench: cargo build --release {}", extra.join(" "));
        let status = Command::new(&cargo).current_dir(&root).args(["build", "--release"]).args(extra).status()?;
        Ok(status.success())
    };
    if !build(&["-p", "mesh-proxy"])? {
        bail!("building mesh-proxy failed");
    }
    if !build(&["-p", "mesh-init"])? {
        eprintln!("bench: mesh-init with the eBPF feature does not build here; building the iptables mode only");
        if !build(&["-p", "mesh-init", "--no-default-features"])? {
            bail!("building mesh-init failed");
        }
    }
    let dir = target.join("release");
    Ok(Bins { mesh_init: dir.join("mesh-init"), mesh_proxy: dir.join("mesh-proxy") })
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Median of the values (the mean of the middle two for an even count); None when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}
