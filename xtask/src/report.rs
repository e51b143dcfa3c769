//! The report: `results.md` (machine, date, command, one table per workload with ratios to the
//! direct path and to HAProxy, the goals and whether they were met) and `latency.svg` (latency
//! percentiles per path, drawn by hand: a few rectangles need no plotting library).

use std::{fmt::Write as _, process::Command};

use anyhow::Result;

use crate::{
    bench::{median, ms, PathSamples, Run, Workload},
    paths::PathKind,
};

/// Medians of one path's samples.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    ka: Wrk,
    close: Wrk,
    rate: [Option<f64>; 3],
    rate_cpu: Option<f64>,
    rate_errors: u64,
    rate_sent: u64,
    gbps: Option<f64>,
    h2_rps: Option<f64>,
    h2_cpu: Option<f64>,
    h2_errors: u64,
    fresh_kib: Option<f64>,
    held_kib: Option<f64>,
    peak_kib: Option<f64>,
    held: Option<f64>,
    failed: u32,
}

/// Medians of one wrk workload's repeats on one path.
#[derive(Debug, Default, Clone, Copy)]
struct Wrk {
    rps: Option<f64>,
    /// p50, p90, p99 in µs.
    lat: [Option<f64>; 3],
    cpu: Option<f64>,
    errors: u64,
}

fn percentiles(l: Vec<crate::load::Percentiles>) -> [Option<f64>; 3] {
    [
        median(l.iter().map(|p| p.p50).collect()),
        median(l.iter().map(|p| p.p90).collect()),
        median(l.iter().map(|p| p.p99).collect()),
    ]
}

fn wrk(samples: &[crate::bench::WrkSample]) -> Wrk {
    Wrk {
        rps: median(samples.iter().map(|w| w.rps).collect()),
        lat: percentiles(samples.iter().map(|w| w.latency).collect()),
        cpu: median(samples.iter().filter_map(|w| w.cpu_per_1k).collect()),
        errors: samples.iter().map(|w| w.errors).sum(),
    }
}

fn figures(s: &PathSamples) -> Figures {
    let m = |v: Vec<f64>| median(v);
    let pcts = percentiles;
    Figures {
        ka: wrk(&s.keep_alive),
        close: wrk(&s.close),
        rate: pcts(s.rate.iter().map(|r| r.latency).collect()),
        rate_cpu: m(s.rate.iter().filter_map(|r| r.cpu_per_1k).collect()),
        rate_errors: s.rate.iter().map(|r| r.errors).sum(),
        rate_sent: s.rate.iter().map(|r| r.sent).sum(),
        gbps: m(s.passthrough_gbps.clone()),
        h2_rps: m(s.h2.iter().map(|h| h.rps).collect()),
        h2_cpu: m(s.h2.iter().filter_map(|h| h.cpu_per_1k).collect()),
        h2_errors: s.h2.iter().map(|h| h.errors).sum(),
        fresh_kib: m(s.idle.iter().map(|i| i.fresh_kib as f64).collect()),
        held_kib: m(s.idle.iter().map(|i| i.held_kib as f64).collect()),
        peak_kib: m(s.idle.iter().map(|i| i.peak_kib as f64).collect()),
        held: m(s.idle.iter().map(|i| i.held as f64).collect()),
        failed: s.idle.iter().map(|i| i.failed).sum(),
    }
}

/// One wrk workload's table: a row per path, ratios to direct and to HAProxy.
#[allow(clippy::too_many_arguments)]
fn wrk_table(
    o: &mut String,
    title: &str,
    run: &Run,
    workload: Workload,
    fig: &[(PathKind, Figures)],
    direct: Option<Figures>,
    haproxy: Option<Figures>,
    pick: fn(&Figures) -> Wrk,
) -> std::fmt::Result {
    let (direct, haproxy) = (direct.as_ref().map(pick), haproxy.as_ref().map(pick));
    writeln!(o, "{title}\n")?;
    writeln!(o, "| path | req/s | × direct | × HAProxy | p50 | p90 | p99 | p99 × HAProxy | proxy CPU s / 1k req | CPU × HAProxy | errors (all repeats) |")?;
    writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (k, f) in fig {
        let w = pick(f);
        writeln!(
            o,
            "| {k} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            or_failed(run, *k, workload, num(w.rps, 0)),
            ratio(w.rps, direct.and_then(|d| d.rps)),
            ratio(w.rps, haproxy.and_then(|h| h.rps)),
            us(w.lat[0]),
            us(w.lat[1]),
            us(w.lat[2]),
            ratio(w.lat[2], haproxy.and_then(|h| h.lat[2])),
            num(w.cpu, 4),
            ratio(w.cpu, haproxy.and_then(|h| h.cpu)),
            w.errors
        )?;
    }
    Ok(())
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.decimals$}"))
}

fn us(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
        Some(v) if v >= 1000.0 => format!("{:.2} ms", v / 1000.0),
        Some(v) => format!("{v:.0} µs"),
    }
}

fn mib(kib: Option<f64>) -> String {
    kib.map_or("—".into(), |k| format!("{:.1} MiB", k / 1024.0))
}

/// `value / base` as "1.23×".
fn ratio(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
        _ => "—".into(),
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn first_line(s: String) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn tool_versions() -> String {
    let v = |cmd: &str, arg: &str| {
        let out = Command::new(cmd).arg(arg).output();
        out.map(|o| first_line(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))))
            .unwrap_or_default()
    };
    format!(
        "{}; {}; {}; caddy {}; {}",
        v("wrk", "--version").split(" Copyright").next().unwrap_or(""),
        v("haproxy", "-v").split(" - ").next().unwrap_or(""),
        v("nginx", "-v"),
        v("caddy", "version"),
        v("iperf3", "--version")
    )
}

/// The first figure of a row: "failed (see below)" when every attempt at it failed.
fn or_failed(run: &Run, kind: PathKind, workload: Workload, text: String) -> String {
    if text == "—" && run.failed.contains(&(kind, workload)) {
        "failed (see below)".into()
    } else {
        text
    }
}

pub fn markdown(run: &Run) -> Result<String> {
    let s = &run.settings;
    let fig: Vec<(PathKind, Figures)> = run.samples.iter().map(|(k, v)| (*k, figures(v))).collect();
    let get = |k: PathKind| fig.iter().find(|(p, _)| *p == k).map(|(_, f)| *f);
    let direct = get(PathKind::Direct);
    let haproxy = get(PathKind::Haproxy);
    let mut o = String::new();
    let commit =
        sh("git", &["-C", &crate::bench::workspace_root().display().to_string(), "rev-parse", "--short", "HEAD"]);
    let dirty = !sh(
        "git",
        &["-C", &crate::bench::workspace_root().display().to_string(), "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();

    writeln!(o, "# Benchmark results\n")?;
    writeln!(o, "Produced by `{}` — do not edit by hand; rerun it.\n", run.command)?;
    writeln!(o, "| | |\n|---|---|")?;
    writeln!(o, "| date | {} |", sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]))?;
    writeln!(
        o,
        "| machine | {} cores (`nproc`), {}, kernel {}, {} |",
        sh("nproc", &[]),
        cpu_model(),
        sh("uname", &["-r"]),
        mem_total()
    )?;
    writeln!(o, "| load before the run | {} (1/5/15 min) |", run.load_before)?;
    writeln!(o, "| commit | {commit}{} |", if dirty { " with uncommitted changes in the work tree" } else { "" })?;
    writeln!(o, "| binaries | {}, {} |", run.bins.mesh_init.display(), run.bins.mesh_proxy.display())?;
    writeln!(o, "| tools | {} |", tool_versions())?;
    writeln!(
        o,
        "| settings | {} repeats (medians shown), {} s per wrk/iperf3 run, fixed rate {} req/s for {} s, {} connections (wrk -t1), {} idle connections ({} repeat{}) |",
        s.repeats,
        s.duration.as_secs(),
        s.rate,
        s.rate_duration.as_secs_f64(),
        s.conns,
        s.idle_conns,
        s.idle_repeats,
        if s.idle_repeats == 1 { "" } else { "s" }
    )?;
    writeln!(o, "| run time | {:.0} s |", run.started.elapsed().as_secs_f64())?;
    writeln!(o)?;
    for note in &run.notes {
        writeln!(o, "> {note}\n")?;
    }

    writeln!(o, "## Setup\n")?;
    writeln!(
        o,
        "Each path has its own pod network namespace joined by a veth pair to one backend namespace running nginx \
         (1 worker, fixed 23-byte response, no access log) and an iperf3 server; nothing touches the machine's own namespace. \
         Sidecars run as UID 1337 with one data-plane thread, without an access log unless the path's name says \
         \"+ access log\" (then one line per request into a file); the client runs in the pod as root, \
         so its connections are intercepted. \
         The direct path has no proxy: its CPU and memory cells are empty, and those figures have ratios to HAProxy only.\n"
    )?;
    writeln!(o, "- **direct**: client → nginx, no interception.")?;
    writeln!(
        o,
        "- **haproxy (iptables)**: `mesh-init iptables -p 15000 -z 15000 -i * -b *`, HAProxy {} `nbthread 1` on :15000. HTTP workloads: `mode http` \
         with nginx as a *static* backend (the counterpart of mesh-proxy's configured route). TCP passthrough: HAProxy restarted \
         in `mode tcp` with `server 0.0.0.0:0`, which connects to the original destination (HAProxy reads SO_ORIGINAL_DST on \
         Linux), so it is a real passthrough.",
        first_line(sh("haproxy", &["-v"])).split_whitespace().nth(2).unwrap_or("")
    )?;
    writeln!(
        o,
        "- **mesh-proxy (iptables)**: the same rules, `mesh-proxy --workers 1 --log-level warn`, an `http` route for nginx; \
         iperf3's port matches no route and passes through to its original destination (`outbound_policy: allow_any`)."
    )?;
    writeln!(o, "- **mesh-proxy (eBPF)**: `mesh-init ebpf --cgroup <a cgroup of the run> --netns <pod>`, client and proxy in that cgroup.")?;
    writeln!(
        o,
        "- **nginx (iptables)**: the same rules, nginx `worker_processes 1; master_process off`, `proxy_pass` to an \
         `upstream` with `keepalive 64` and `proxy_http_version 1.1` (upstream keep-alive). No TCP passthrough: nginx \
         cannot connect to a redirected connection's original destination."
    )?;
    writeln!(
        o,
        "- **caddy (iptables)**: the same rules, Caddy {} with `GOMAXPROCS=1`, `reverse_proxy` to nginx (keep-alive \
         upstream by default), admin and automatic HTTPS off, no access log. No TCP passthrough (as nginx).",
        sh("caddy", &["version"]).split_whitespace().next().unwrap_or("")
    )?;
    writeln!(
        o,
        "- **nghttpx (iptables)**: the same rules, nghttpx `--workers=1 --single-thread`, a clear-text frontend on \
         :15000 (HTTP/1.1 and prior-knowledge h2c), nginx as its backend; the HTTP/2 peer. No TCP passthrough."
    )?;
    writeln!(
        o,
        "- **… + access log**: the same sidecar writing one line per request into a file: HAProxy `option httplog` to \
         `log stderr`; nginx's default `access_log` (a write per request); mesh-proxy's default (`--log-level info`: \
         lines formatted on the data-plane thread, written by another thread in batches). Not run for passthrough or \
         idle memory (they would repeat the plain path's figures).\n"
    )?;
    if !run.not_measured.is_empty() {
        writeln!(o, "**Not measured:**\n")?;
        for (k, why) in &run.not_measured {
            writeln!(o, "- {k}: not measured: {}", why.replace('\n', " "))?;
        }
        writeln!(o)?;
    }

    let title = format!("## HTTP/1.1 keep-alive, {} connections (wrk -t1 -c{})", s.conns, s.conns);
    wrk_table(&mut o, &title, run, Workload::KeepAlive, &fig, direct, haproxy, |f| f.ka)?;
    let title = format!("\n## A new connection per request (wrk -c{} -H 'Connection: close')", s.conns);
    wrk_table(&mut o, &title, run, Workload::Close, &fig, direct, haproxy, |f| f.close)?;

    writeln!(
        o,
        "\n## Fixed rate, {} req/s (open loop, 4 keep-alive connections, latency from the intended send time)\n",
        s.rate
    )?;
    writeln!(
        o,
        "`xtask load-rate` (Debian has no wrk2): connection k sends request i at start + (4i + k)/rate whatever happened before, \
         and latency counts from that intended time, so stalls are not hidden (no coordinated omission). \
         *Added* = this path's median percentile minus the direct path's.\n"
    )?;
    writeln!(o, "| path | p50 | p90 | p99 | added p50 | added p90 | added p99 | p99 × direct | p99 × HAProxy | proxy CPU s / 1k req | CPU × HAProxy | errors / sent (all repeats) |")?;
    writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (k, f) in &fig {
        let added = |i: usize| match (f.rate[i], direct.and_then(|d| d.rate[i])) {
            (Some(v), Some(d)) if *k != PathKind::Direct => format!("{:+.0} µs", v - d),
            _ => "—".into(),
        };
        writeln!(
            o,
            "| {k} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            or_failed(run, *k, Workload::Rate, us(f.rate[0])),
            us(f.rate[1]),
            us(f.rate[2]),
            added(0),
            added(1),
            added(2),
            ratio(f.rate[2], direct.and_then(|d| d.rate[2])),
            ratio(f.rate[2], haproxy.and_then(|h| h.rate[2])),
            num(f.rate_cpu, 4),
            ratio(f.rate_cpu, haproxy.and_then(|h| h.rate_cpu)),
            f.rate_errors,
            f.rate_sent
        )?;
    }

    writeln!(o, "\n## HTTP/2, one connection × 100 streams (h2load -t1 -c1 -m100, prior-knowledge h2c)\n")?;
    writeln!(
        o,
        "The backend (nginx) speaks HTTP/1.1: each proxy takes HTTP/2 from the client and forwards HTTP/1.1 over \
         keep-alive connections. Paths without HTTP/2 on the redirect port are not run. h2load reports throughput, \
         not percentiles.\n"
    )?;
    let nghttpx = get(PathKind::Nghttpx);
    writeln!(o, "| path | req/s | × HAProxy | × nghttpx | proxy CPU s / 1k req | errors (all repeats) |")?;
    writeln!(o, "|---|---:|---:|---:|---:|---:|")?;
    for (k, f) in fig.iter().filter(|(k, _)| k.runs(Workload::H2)) {
        writeln!(
            o,
            "| {k} | {} | {} | {} | {} | {} |",
            or_failed(run, *k, Workload::H2, num(f.h2_rps, 0)),
            ratio(f.h2_rps, haproxy.and_then(|h| h.h2_rps)),
            ratio(f.h2_rps, nghttpx.and_then(|n| n.h2_rps)),
            num(f.h2_cpu, 4),
            f.h2_errors
        )?;
    }

    writeln!(o, "\n## TCP bulk throughput through passthrough (iperf3, one stream, pod → backend)\n")?;
    writeln!(o, "| path | Gbit/s | × direct | × HAProxy |\n|---|---:|---:|---:|")?;
    for (k, f) in fig.iter().filter(|(k, _)| k.runs(Workload::Passthrough)) {
        writeln!(
            o,
            "| {k} | {} | {} | {} |",
            or_failed(run, *k, Workload::Passthrough, num(f.gbps, 2)),
            ratio(f.gbps, direct.and_then(|d| d.gbps)),
            ratio(f.gbps, haproxy.and_then(|h| h.gbps))
        )?;
    }

    writeln!(o, "\n## Memory: {} idle connections held (established, nothing sent)\n", s.idle_conns)?;
    writeln!(
        o,
        "The sidecar is restarted before each measurement. *Fresh*: VmRSS after start, no connection yet. *Holding*: VmRSS while the \
         connections are open. *Peak*: VmHWM at that moment (the process's peak so far).\n"
    )?;
    writeln!(o, "| path | fresh RSS | RSS holding | peak RSS (VmHWM) | holding × HAProxy | held (failed) |\n|---|---:|---:|---:|---:|---:|")?;
    for (k, f) in fig.iter().filter(|(k, _)| *k != PathKind::Direct && k.runs(Workload::Idle)) {
        writeln!(
            o,
            "| {k} | {} | {} | {} | {} | {} ({}) |",
            or_failed(run, *k, Workload::Idle, mib(f.fresh_kib)),
            mib(f.held_kib),
            mib(f.peak_kib),
            ratio(f.held_kib, haproxy.and_then(|h| h.held_kib)),
            num(f.held, 0),
            f.failed
        )?;
    }

    if !run.rules.is_empty() {
        writeln!(o, "\n## Rule installation (fresh namespace each time)\n")?;
        writeln!(
            o,
            "*Batch*: `mesh-init iptables --netns <ns> ...`, wall time of the whole command (one `iptables-restore --noflush`). \
             *Per rule*: the same rules, rendered by `mesh-init iptables --dry-run` for the namespace, replayed as one \
             `iptables -t nat -N/-A ...` call each (istio-iptables' way); both install the same number of rules (checked).\n"
        )?;
        writeln!(o, "| rule set | rules | backend | batch (median) | per rule (median) | per-rule calls | batch speed-up | goal (batch) |")?;
        writeln!(o, "|---|---:|---|---:|---:|---:|---:|---|")?;
        for (case, samples) in &run.rules {
            let batch = median(samples.iter().map(|x| ms(x.batch)).collect());
            let per_rule_v: Vec<f64> = samples.iter().filter_map(|x| x.per_rule.map(ms)).collect();
            let n_per_rule = per_rule_v.len();
            let per_rule = median(per_rule_v);
            let first = samples.first();
            writeln!(
                o,
                "| {} | {} | {} | {} | {}{} | {} | {} | < {:.0} ms: {} |",
                case.name,
                first.map_or("—".into(), |x| x.rules.to_string()),
                first.map_or("—".into(), |x| x.backend.clone()),
                batch.map_or("—".into(), |b| format!("{b:.1} ms")),
                per_rule.map_or("—".into(), |b| format!("{b:.1} ms")),
                if n_per_rule < samples.len() { format!(" ({n_per_rule} run)") } else { String::new() },
                first.map_or("—".into(), |x| x.calls.to_string()),
                ratio(per_rule, batch),
                case.goal_ms,
                met(batch.map(|b| b < case.goal_ms))
            )?;
        }
    }

    writeln!(o, "\n## Goals (from the issues)\n")?;
    writeln!(o, "| goal | measured | met |\n|---|---|---|")?;
    let mp = get(PathKind::MeshProxy);
    let v = |f: Option<Figures>, g: fn(&Figures) -> Option<f64>| f.as_ref().and_then(g);
    let rps_ratio = v(mp, |f| f.ka.rps).zip(v(haproxy, |h| h.ka.rps)).map(|(a, b)| a / b);
    writeln!(
        o,
        "| mesh-proxy keep-alive req/s ≥ HAProxy's | {} of HAProxy's | {} |",
        ratio_text(rps_ratio),
        met(rps_ratio.map(|r| r >= 1.0))
    )?;
    let mp_log = get(PathKind::MeshProxyLog);
    let log_ratio = v(mp_log, |f| f.ka.rps).zip(v(get(PathKind::HaproxyLog), |h| h.ka.rps)).map(|(a, b)| a / b);
    writeln!(
        o,
        "| keep-alive req/s, access log on, ≥ 1.0× HAProxy logging every request | {} | {} |",
        ratio_text(log_ratio),
        met(log_ratio.map(|r| r >= 1.0))
    )?;
    let peers = [PathKind::Haproxy, PathKind::Nginx, PathKind::Caddy];
    let best = peers.iter().filter_map(|&k| v(get(k), |f| f.ka.rps).map(|r| (k, r))).max_by(|a, b| a.1.total_cmp(&b.1));
    let best_ratio = v(mp, |f| f.ka.rps).zip(best).map(|(a, (_, b))| a / b);
    writeln!(
        o,
        "| keep-alive req/s, access log off, ≥ 1.2× the best of HAProxy, nginx, Caddy | {}{} | {} |",
        ratio_text(best_ratio),
        best.map_or(String::new(), |(k, _)| format!(" of {k}'s (the best of those measured)")),
        met(best_ratio.map(|r| r >= 1.2))
    )?;
    let p99_ratio = v(mp, |f| f.ka.lat[2]).zip(v(haproxy, |h| h.ka.lat[2])).map(|(a, b)| a / b);
    writeln!(
        o,
        "| mesh-proxy keep-alive p99 ≤ HAProxy's | {} of HAProxy's | {} |",
        ratio_text(p99_ratio),
        met(p99_ratio.map(|r| r <= 1.0))
    )?;
    let h2 = [PathKind::Haproxy, PathKind::Nghttpx]
        .map(|k| v(mp, |f| f.h2_rps).zip(v(get(k), |p| p.h2_rps)).map(|(a, b)| a / b));
    writeln!(
        o,
        "| HTTP/2 (h2load, 1 connection × 100 streams) req/s ≥ 1.0× HAProxy and nghttpx | {} of HAProxy's, {} of nghttpx's | {} |",
        ratio_text(h2[0]),
        ratio_text(h2[1]),
        met(h2[0].zip(h2[1]).map(|(a, b)| a >= 1.0 && b >= 1.0))
    )?;
    let added = v(mp, |f| f.rate[2]).zip(v(direct, |d| d.rate[2])).map(|(a, b)| a - b);
    writeln!(
        o,
        "| mesh-proxy adds < 0.1 ms at p99, {} req/s | {} | {} |",
        s.rate,
        added.map_or("—".into(), |a| format!("{:+.0} µs", a)),
        met(added.map(|a| a < 100.0))
    )?;
    let fresh = v(mp, |f| f.fresh_kib);
    writeln!(
        o,
        "| mesh-proxy idle RSS < 10 MiB | {} fresh; {} holding {} connections | {} |",
        mib(fresh),
        mib(v(mp, |f| f.held_kib)),
        s.idle_conns,
        met(fresh.map(|k| k < 10.0 * 1024.0))
    )?;
    let tp = v(mp, |f| f.gbps).zip(v(direct, |d| d.gbps)).map(|(a, b)| a / b);
    writeln!(
        o,
        "| mesh-proxy TCP passthrough ≥ 80% of direct | {} | {} |",
        tp.map_or("—".into(), |t| format!("{:.0}%", t * 100.0)),
        met(tp.map(|t| t >= 0.8))
    )?;
    let (k, label) = (PathKind::Ebpf, "eBPF");
    let e = get(k);
    let cmp = v(e, |f| f.rate[2]).zip(v(mp, |f| f.rate[2]));
    let measured = match (e, cmp) {
        (Some(e), Some((a, b))) => format!(
            "p50 {} vs {}, p99 {} vs {} (iptables)",
            us(e.rate[0]),
            us(mp.and_then(|m| m.rate[0])),
            us(Some(a)),
            us(Some(b))
        ),
        _ => run
            .not_measured
            .iter()
            .find(|(p, _)| *p == k)
            .map_or("—".into(), |(_, w)| format!("not measured: {}", w.replace('\n', " "))),
    };
    let ok = match (e, mp) {
        (Some(e), Some(m)) => {
            e.rate[0].zip(m.rate[0]).zip(e.rate[2].zip(m.rate[2])).map(|((a, b), (c, d))| a < b && c < d)
        }
        _ => None,
    };
    writeln!(
        o,
        "| {label} mode lower latency than iptables mode (fixed rate p50 and p99) | {measured} | {} |",
        met(ok)
    )?;

    writeln!(o, "\n![latency percentiles per path](latency.svg)\n")?;
    if !run.errors.is_empty() {
        writeln!(o, "## Failed measurements\n")?;
        for e in &run.errors {
            writeln!(o, "- {}", e.replace('\n', " "))?;
        }
    }
    Ok(o)
}

fn ratio_text(r: Option<f64>) -> String {
    r.map_or("—".into(), |r| format!("{:.2}×", r))
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map_or("unknown memory".into(), |k| format!("{:.0} GiB RAM", k / 1024.0 / 1024.0))
}

// ---------------------------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------------------------

const COLORS: [&str; 9] =
    ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d", "#bab0ac"];

/// Two panels of grouped bars (p50, p90, p99; one bar per path): the fixed-rate workload and the
/// keep-alive workload.
pub fn svg(run: &Run) -> String {
    let fig: Vec<(PathKind, Figures)> = run.samples.iter().map(|(k, v)| (*k, figures(v))).collect();
    // (title, per path: p50, p90, p99)
    type Panel = (String, Vec<(PathKind, [Option<f64>; 3])>);
    let panels: [Panel; 2] = [
        (
            format!("Fixed rate {} req/s: latency (µs, log scale)", run.settings.rate),
            fig.iter().map(|(k, f)| (*k, f.rate)).collect(),
        ),
        (
            format!("Keep-alive, {} connections, wrk: latency (µs, log scale)", run.settings.conns),
            fig.iter().map(|(k, f)| (*k, f.ka.lat)).collect(),
        ),
    ];
    let (pw, ph, top, left, bottom) = (460.0, 300.0, 60.0, 60.0, 40.0);
    let width = left + 2.0 * (pw + left);
    let height = top + ph + bottom + 24.0 * fig.len().max(1) as f64;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">mesh-init benchmark: latency percentiles per path (medians of {} repeats)</text>"#,
        run.settings.repeats
    );
    for (pi, (title, data)) in panels.iter().enumerate() {
        let x0 = left + pi as f64 * (pw + left);
        // Logarithmic: p50 and p99 differ by an order of magnitude or more.
        let values: Vec<f64> =
            data.iter().flat_map(|(_, v)| v.iter().flatten().copied()).filter(|v| *v > 0.0).collect();
        let lo = 10f64.powf(values.iter().fold(f64::MAX, |a, &b| a.min(b)).log10().floor()).min(100.0);
        let hi = 10f64.powf(values.iter().fold(1.0f64, |a, &b| a.max(b)).log10().ceil()).max(lo * 10.0);
        let y_of = |v: f64| top + ph - ph * (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
        let _ = writeln!(o, r#"<text x="{x0}" y="{}" font-weight="bold">{}</text>"#, top - 12.0, esc(title));
        let mut tick = lo;
        while tick <= hi * 1.001 {
            for m in [1.0, 2.0, 5.0] {
                let v = tick * m;
                if v > hi * 1.001 {
                    break;
                }
                let y = y_of(v);
                let stroke = if m == 1.0 { "#bbb" } else { "#eee" };
                let _ = writeln!(o, r#"<line x1="{x0}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="{stroke}"/>"#, x0 + pw);
                let _ = writeln!(
                    o,
                    r#"<text x="{}" y="{:.1}" text-anchor="end" font-size="10">{v:.0}</text>"#,
                    x0 - 4.0,
                    y + 4.0
                );
            }
            tick *= 10.0;
        }
        let _ = writeln!(o, r#"<line x1="{x0}" x2="{x0}" y1="{top}" y2="{}" stroke="black"/>"#, top + ph);
        let groups = ["p50", "p90", "p99"];
        let gw = pw / groups.len() as f64;
        let n = data.len().max(1) as f64;
        let bw = (gw * 0.8) / n;
        for (gi, g) in groups.iter().enumerate() {
            let gx = x0 + gi as f64 * gw + gw * 0.1;
            for (bi, (_, vals)) in data.iter().enumerate() {
                let Some(v) = vals[gi] else { continue };
                let h = top + ph - y_of(v);
                let x = gx + bi as f64 * bw;
                let _ = writeln!(
                    o,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{v:.0} µs</title></rect>"#,
                    top + ph - h,
                    bw * 0.9,
                    COLORS[bi % COLORS.len()]
                );
                let _ = writeln!(
                    o,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{v:.0}</text>"#,
                    x + bw * 0.45,
                    top + ph - h - 3.0
                );
            }
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{g}</text>"#,
                x0 + gi as f64 * gw + gw / 2.0,
                top + ph + 16.0
            );
        }
    }
    for (i, (k, _)) in fig.iter().enumerate() {
        let y = top + ph + bottom + 24.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{left}" y="{}" width="14" height="14" fill="{}"/>"#,
            y - 11.0,
            COLORS[i % COLORS.len()]
        );
        let _ = writeln!(o, r#"<text x="{}" y="{y}">{}</text>"#, left + 20.0, esc(k.label()));
    }
    o.push_str("</svg>\n");
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50×");
        assert_eq!(ratio(Some(3.0), None), "—");
    }
}
